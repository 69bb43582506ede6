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
    """A base model to price storage in bytes: parameter count, bytes per parameter, and the
    attention shapes that size LoRA on q and v."""
    name: str
    params: int
    bytes_per_param: int = 2  # 16-bit weights
    d_model: int = 0
    n_layer: int = 0
    n_head: int = 0
    n_kv_head: int = 0  # grouped-query attention: fewer k/v heads than q heads (0: as many)

    @property
    def bytes(self):
        return self.params * self.bytes_per_param

    @property
    def kv_width(self):
        """Output width of the k and v projections: n_kv_head * head_dim (d_model without GQA)."""
        if not (self.n_head and self.n_kv_head):
            return self.d_model
        return self.n_kv_head * (self.d_model // self.n_head)

    def lora_qv_bytes(self, r=4):
        """Bytes of LoRA rank r on the q (d_model -> d_model) and v (d_model -> kv_width)
        projections of every layer."""
        q = lora_params(r, self.d_model, self.d_model, self.n_layer)
        v = lora_params(r, self.d_model, self.kv_width, self.n_layer)
        return (q + v) * self.bytes_per_param


# Public shapes, each from its source (tests/test_storage_bytes.py checks the arithmetic):
KNOWN_BASES = {
    # meta-llama/Llama-2-7b-hf config.json: hidden_size 4096, num_hidden_layers 32,
    # num_attention_heads 32, num_key_value_heads 32 (no GQA); intermediate 11008, vocab 32000
    # give 6,738,415,616 parameters.
    "LLaMA-2 7B": BaseSize("LLaMA-2 7B", 6_738_415_616, 2, 4096, 32, 32, 32),
    # meta-llama/Llama-2-70b-hf config.json: hidden_size 8192, num_hidden_layers 80,
    # num_attention_heads 64, num_key_value_heads 8 (GQA: k and v are 8 * 128 = 1024 wide);
    # intermediate 28672, vocab 32000 give 68,976,648,192 parameters.
    "LLaMA-2 70B": BaseSize("LLaMA-2 70B", 68_976_648_192, 2, 8192, 80, 64, 8),
    # Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1: n_params 175.0B,
    # n_layers 96, d_model 12288, n_heads 96, d_head 128 (multi-head attention, no GQA).
    "GPT-3 175B": BaseSize("GPT-3 175B", 175_000_000_000, 2, 12288, 96, 96, 96),
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


def toy_lora_qv_bytes(base_config, r=4, bytes_per_param=4):
    """Bytes of LoRA rank r on q and v of every layer of the toy base (float32): the toy's
    row of the bytes table, by the same arithmetic as the known bases'."""
    d = base_config.d_model
    return 2 * lora_params(r, d, d, base_config.n_layer) * bytes_per_param
