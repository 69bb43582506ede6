"""LoRA: a low-rank update beside a frozen Linear.  y = W x + (B A x) * lora_alpha / r

A starts kaiming-uniform and B at zero, so at step 0 the model is exactly the base.
One LoraLinear holds every adapter for its projection (keyed by name, as in HF peft);
a shared `route` says which one a forward uses, or, for a mixed batch, which per row.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MergeablePhiLayer, PeftConfig, base_modules, check_range, pad_to
from .registry import Method, Preset, register

from ..model import PROJECTIONS as TARGETABLE  # noqa: E402 - the model's projection names


@dataclass
class LoraConfig(PeftConfig):
    peft_type = "LORA"
    r: int = 4
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple = ("q", "v")

    def validate(self):
        check_range("r", self.r, 1, 256)
        check_range("lora_alpha", self.lora_alpha, 1, 4096, (int, float))
        check_range("lora_dropout", self.lora_dropout, 0.0, 0.9, (int, float))
        bad = [m for m in self.target_modules if m not in TARGETABLE]
        if not self.target_modules or bad:
            raise ValueError(f"target_modules must be a non-empty subset of {TARGETABLE}, got {list(self.target_modules)}")

    def num_params(self, base_config):
        """Closed form: r * (d_in + d_out) per targeted projection."""
        d, m = base_config.d_model, base_config.d_mlp
        shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (d, m), "down": (m, d)}
        per_layer = sum(self.r * sum(shapes[t]) for t in self.target_modules)
        return per_layer * base_config.n_layer


class LoraDropout(nn.Dropout):
    """nn.Dropout whose masks come from the run's own generator (`route.generator`, set by the
    Trainer), so that runs in other threads never shift this run's stream and a seed repeats
    its run. Without one (a loop of your own), torch's global generator, as nn.Dropout."""

    def __init__(self, p, route):
        super().__init__(p)
        self.route = route

    def forward(self, x):
        generator = self.route.generator
        if not self.training or generator is None:
            return super().forward(x)
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=generator)
        return x * keep / (1 - self.p)


class LoraLinear(MergeablePhiLayer):
    containers, per_adapter, wraps = ("lora_A", "lora_B"), ("lora_dropout", "scaling"), "base_layer"

    def __init__(self, base_layer: nn.Linear, route):
        super().__init__()
        self.base_layer = base_layer
        self.route = route
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling = {}

    def add(self, name, cfg: LoraConfig, generator=None):
        d_in, d_out = self.base_layer.in_features, self.base_layer.out_features
        w = self.base_layer.weight
        self.lora_A[name] = nn.Linear(d_in, cfg.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(cfg.r, d_out, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = LoraDropout(cfg.lora_dropout, self.route) if cfg.lora_dropout else nn.Identity()
        self.scaling[name] = cfg.lora_alpha / cfg.r

    def delta_weight(self, name):
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def folded(self, name):
        return self.base_layer.weight + self.delta_weight(name).detach()

    @staticmethod
    def cohort(base_layer, members):
        """The cohort's layer in this one's place: row group k through members[k] = (layer, name)."""
        return CohortLora(base_layer, members)

    def forward(self, x):
        # the merged weight serves its own adapter only: a mixed batch, another adapter or
        # disable_adapter() must never see it
        if self.merged_weight is not None and self.route.rows is None and self.route.active == self.merged_adapter:
            return F.linear(x, self.merged_weight)
        out = self.base_layer(x)
        if self.route.rows is not None:
            return out + self._mixed(x)
        name = self.route.active
        if name in self.lora_A:
            h = self.lora_A[name](self.lora_dropout[name](x))
            # out + h (scaling B)^T as one fused addmm (fewer kernels: this model is tiny). The
            # scaling goes on B, as in the stacks of mixed batches and cohorts: then a run
            # trained in a cohort rounds exactly as it does alone
            scaled_B = self.lora_B[name].weight * self.scaling[name]
            out = torch.addmm(out.flatten(0, -2), h.flatten(0, -2), scaled_B.t()).view(out.shape)
        return out

    # --- mixed batches: each row its own adapter, as batched gathers + bmm (Punica's idea)
    def _stacks(self):
        """A (N+1, r_max, d_in), B (N+1, d_out, r_max) with scaling folded into B; slot 0 is
        all zeros (rows without a LoRA here). Cached until an adapter changes."""
        names = list(self.lora_A)
        tensors = [t for n in names for t in (self.lora_A[n].weight, self.lora_B[n].weight)]
        return self._stack_cache.get(self.route.generation, tensors, lambda: self._build_stacks(names))

    def _build_stacks(self, names):
        w = self.base_layer.weight
        none = (w.new_zeros(1, w.shape[1]), w.new_zeros(w.shape[0], 1), 1.0)  # slot 0: no LoRA here
        return stack_lora([none] + [(self.lora_A[n].weight.detach(), self.lora_B[n].weight.detach(),
                                     self.scaling[n]) for n in names])

    def _mixed(self, x):
        A, B = self._stacks()
        slots = self.route.slots(list(self.lora_A), x.device)
        h = torch.bmm(x, A[slots].transpose(1, 2))  # (batch, T, r_max)
        return torch.bmm(h, B[slots].transpose(1, 2))  # (batch, T, d_out)


def stack_lora(loras):
    """[(A, B, scaling)] -> A (K, r_max, d_in), B (K, d_out, r_max), scaling folded into B and
    zero-padded to the largest rank: the stacks of mixed batches and of cohorts."""
    r = max(a.shape[0] for a, _, _ in loras)
    return (torch.stack([pad_to(a, r, 0) for a, _, _ in loras]),
            torch.stack([pad_to(b, r, 1) * s for _, b, s in loras]))


# --- cohorts (peftcore.cohort): K runs' rows in one batch, each through its own phi, with gradients
class CohortLora(nn.Module):
    """A frozen Linear plus K runs' LoRA: row group k goes through run k's B A."""

    def __init__(self, base_layer, loras):
        super().__init__()
        self.base_layer = base_layer
        self.loras = [(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
                      for layer, name in loras]  # plain lists: the runs' Parameters are not ours

    def forward(self, x):
        out = self.base_layer(x)
        A, B = stack_lora(self.loras)  # every step: the runs' phi change
        h = torch.bmm(x.reshape(len(self.loras), -1, x.shape[-1]), A.transpose(1, 2))
        return out + torch.bmm(h, B.transpose(1, 2)).view(out.shape)


def add_lora(view, name, cfg: LoraConfig, route, generator=None):
    """Wrap every targeted projection of `view` (once) and give it adapter `name`. A
    projection another method already wraps (IA3's vectors) is wrapped as it is."""
    for parent in list(base_modules(view)):
        for child_name, child in list(parent.named_children()):
            if child_name not in cfg.target_modules:
                continue
            if isinstance(child, nn.Linear) or (isinstance(child, MergeablePhiLayer) and not isinstance(child, LoraLinear)):
                child = LoraLinear(child, route)
                setattr(parent, child_name, child)
            if isinstance(child, LoraLinear):
                child.add(name, cfg, generator)


def cohort_kind(cfg):
    """LoRA runs on the same projections ride together (ranks pad); CohortLora has no dropout."""
    return None if cfg.lora_dropout else ("LORA", tuple(sorted(cfg.target_modules)))


# the fields HF peft's LoraConfig expects to find in adapter_config.json
HF_FIELDS = dict(bias="none", fan_in_fan_out=False, inference_mode=True, task_type=None, base_model_name_or_path=None,
                 modules_to_save=None, init_lora_weights=True)

register(Method(
    LoraConfig, plug=lambda model, name, cfg, g: add_lora(model.base_model, name, cfg, model.route, g),
    layers=(LoraLinear,), mergeable=True, cohort_kind=cohort_kind,
    hf_fields=HF_FIELDS, hf_peft="module", slug="lora",
    # rank 1 on many projections beats a higher rank on few at the same budget (LoRA paper, Table 6);
    # the attention's four, as the paper adapted attention only: with the MLP's up too, the same
    # phi learned sort from scratch on a random frozen base (0.150 on its best seed; BENCHMARKS.md)
    preset=Preset(LoraConfig(r=1, lora_alpha=4, target_modules=("q", "k", "v", "o")),
                  dict(steps=300, lr=1e-2, batch_size=32))))
