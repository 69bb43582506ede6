"""The storage arithmetic of "one base, many tasks", in units of one base model or bytes.

PEFT stores one shared base plus T slivers of size p (a fraction of the base): 1 + T*p.
Full fine-tuning stores a whole model per task: T. PEFT wins once T > 1/(1-p).
"""
from dataclasses import dataclass

import numpy as np


def peft_storage(tasks, p):
    """Base models' worth of storage for `tasks` tasks with phi a fraction `p` of the base."""
    return 1 + np.asarray(tasks, dtype=float) * p


def full_storage(tasks):
    return np.asarray(tasks, dtype=float) * 1.0


def break_even(p):
    """The T at which both cost the same: 1 + T p = T. Infinite when p >= 1."""
    return float("inf") if p >= 1 else 1 / (1 - p)


def lora_params(r, d_in, d_out, n_modules):
    """LoRA's closed form: r * (d_in + d_out) per targeted projection."""
    return r * (d_in + d_out) * n_modules


@dataclass(frozen=True)
class BaseSize:
    """A base model to price storage in bytes: parameter count and bytes per parameter."""
    name: str
    params: int
    bytes_per_param: int = 2  # 16-bit weights
    d_model: int = 0
    n_layer: int = 0

    @property
    def bytes(self):
        return self.params * self.bytes_per_param

    def lora_qv_bytes(self, r=4):
        """Bytes of LoRA rank r on the q and v projections of every layer."""
        return lora_params(r, self.d_model, self.d_model, 2 * self.n_layer) * self.bytes_per_param


# Well-known sizes (public figures: parameter count, hidden size, layers).
KNOWN_BASES = {
    "LLaMA-2 7B": BaseSize("LLaMA-2 7B", 6_738_415_616, 2, 4096, 32),
    "LLaMA-2 70B": BaseSize("LLaMA-2 70B", 68_976_648_192, 2, 8192, 80),
    "GPT-3 175B": BaseSize("GPT-3 175B", 175_000_000_000, 2, 12288, 96),
}


def phi_that_fit(gpu_bytes, base_bytes, phi_bytes):
    """How many phi stay resident beside one base in `gpu_bytes` (weights only)."""
    free = gpu_bytes - base_bytes
    return max(0, int(free // phi_bytes)) if phi_bytes > 0 else 0


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
