"""Bottleneck adapters: a small MLP added to a sublayer's output, before the residual.

    h = sublayer(x);  h + up(gelu(down(h)))

Houlsby et al. (2019) put one after the attention and one after the MLP of every block;
Pfeiffer et al. (2021) after the MLP only, at half the parameters (the preset's choice:
BENCHMARKS.md). `target_sublayers` says which. `up` starts at zero, so at step 0 the model
is exactly the base.
"""
import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PeftConfig, PhiLayer, check_range, pad_to
from .registry import Method, Preset, register


SUBLAYERS = ("attn", "mlp")  # a block's sublayers, by the names model.Block gives them


@dataclass
class AdapterConfig(PeftConfig):
    peft_type = "BOTTLENECK_ADAPTER"
    bottleneck_size: int = 8
    target_sublayers: Tuple[str, ...] = SUBLAYERS  # Houlsby's two; ("mlp",) is Pfeiffer's one

    def validate(self):
        check_range("bottleneck_size", self.bottleneck_size, 1, 512)
        subs = self.target_sublayers
        if not (isinstance(subs, tuple) and subs and all(s in SUBLAYERS for s in subs) and len(set(subs)) == len(subs)):
            raise ValueError(f"target_sublayers must name one or both of {list(SUBLAYERS)}, got {subs!r}")

    def num_params(self, base_config):
        """Closed form: 2*d*b + b + d per adapter, one per target sublayer of each block."""
        d, b = base_config.d_model, self.bottleneck_size
        return (2 * d * b + b + d) * len(self.target_sublayers) * base_config.n_layer


class Bottleneck(nn.Module):
    def __init__(self, d, b, device=None, dtype=None, generator=None):
        super().__init__()
        self.down = nn.Linear(d, b, device=device, dtype=dtype)
        self.up = nn.Linear(b, d, device=device, dtype=dtype)
        # nn.Linear's own init, redrawn from `generator` so concurrent runs stay reproducible
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.uniform_(self.down.bias, -d ** -0.5, d ** -0.5, generator=generator)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(F.gelu(self.down(h)))


class AdapterLayer(PhiLayer):
    """Wraps one sublayer (a block's attention or MLP) and adds the active bottleneck."""
    containers, wraps = ("adapters",), "sublayer"

    def __init__(self, sublayer, d_model, route):
        super().__init__()
        self.sublayer = sublayer
        self.d_model = d_model
        self.route = route
        self.adapters = nn.ModuleDict()

    def add(self, name, cfg: AdapterConfig, like: torch.Tensor, generator=None):
        self.adapters[name] = Bottleneck(self.d_model, cfg.bottleneck_size, like.device, like.dtype, generator)

    @staticmethod
    def cohort(sublayer, members):
        """The cohort's layer in this one's place: row group k through members[k] = (layer, name)."""
        return CohortAdapter(sublayer, [layer.adapters[name] for layer, name in members])

    def forward(self, x, *args, **kwargs):
        h = self.sublayer(x, *args, **kwargs)  # attn_mask, prefix: the sublayer's own
        if self.route.rows is not None:
            return h + self._mixed(h)
        name = self.route.active
        return h + self.adapters[name](h) if name in self.adapters else h

    # --- mixed batches: gather each row's stacked weights, then bmm
    def _stacks(self):
        names = list(self.adapters)
        tensors = [p for n in names for p in self.adapters[n].parameters()]
        return self._stack_cache.get(self.route.generation, tensors, lambda: self._build_stacks(names))

    def _build_stacks(self, names):
        like, d = next(self.sublayer.parameters()), self.d_model
        none = (like.new_zeros(1, d), like.new_zeros(1), like.new_zeros(d, 1), like.new_zeros(d))  # slot 0
        return stack_bottlenecks([none] + [tuple(t.detach() for t in _tensors(self.adapters[n])) for n in names])

    def _mixed(self, h):
        Wd, bd, Wu, bu = self._stacks()
        slots = self.route.slots(list(self.adapters), h.device)
        # padded bottleneck units have zero weights and bias: gelu(0) = 0, so they add nothing
        z = F.gelu(torch.bmm(h, Wd[slots].transpose(1, 2)) + bd[slots, None])
        return torch.bmm(z, Wu[slots].transpose(1, 2)) + bu[slots, None]


def _tensors(bottleneck):
    return bottleneck.down.weight, bottleneck.down.bias, bottleneck.up.weight, bottleneck.up.bias


def stack_bottlenecks(bottlenecks):
    """[(W_down, b_down, W_up, b_up)] -> the same four stacked (K, ...), zero-padded to the
    largest bottleneck (zero units give gelu(0) = 0: they add nothing). The stacks of mixed
    batches and of cohorts."""
    b = max(wd.shape[0] for wd, _, _, _ in bottlenecks)
    return (torch.stack([pad_to(wd, b, 0) for wd, _, _, _ in bottlenecks]),
            torch.stack([pad_to(bd, b, 0) for _, bd, _, _ in bottlenecks]),
            torch.stack([pad_to(wu, b, 1) for _, _, wu, _ in bottlenecks]),
            torch.stack([bu for _, _, _, bu in bottlenecks]))


# --- cohorts (peftcore.cohort): K runs' rows in one batch, each through its own phi, with gradients
class CohortAdapter(nn.Module):
    """A sublayer plus K runs' bottlenecks: row group k goes through run k's."""

    def __init__(self, sublayer, bottlenecks):
        super().__init__()
        self.sublayer = sublayer
        self.bottlenecks = [_tensors(b) for b in bottlenecks]

    def forward(self, x, *args, **kwargs):
        h = self.sublayer(x, *args, **kwargs)
        Wd, bd, Wu, bu = stack_bottlenecks(self.bottlenecks)  # every step: the runs' phi change
        hs = h.reshape(len(self.bottlenecks), -1, h.shape[-1])
        z = F.gelu(torch.baddbmm(bd[:, None], hs, Wd.transpose(1, 2)))
        return h + torch.baddbmm(bu[:, None], z, Wu.transpose(1, 2)).view(h.shape)


def add_adapter_layers(view, name, cfg: AdapterConfig, route, generator=None):
    """Wrap each block's target sublayers (once) and give them bottleneck `name`."""
    d = view.config.d_model
    like = view.head.weight
    for block in view.blocks:
        for sub in SUBLAYERS:
            if sub not in cfg.target_sublayers:
                continue
            layer = getattr(block, sub)
            if not isinstance(layer, AdapterLayer):
                layer = AdapterLayer(layer, d, route)
                setattr(block, sub, layer)
            layer.add(name, cfg, like, generator)


register(Method(
    AdapterConfig, plug=lambda model, name, cfg, g: add_adapter_layers(model.base_model, name, cfg, model.route, g),
    layers=(AdapterLayer,), slug="adapter",
    cohort_kind=lambda cfg: ("BOTTLENECK_ADAPTER", tuple(sorted(cfg.target_sublayers))),  # the same layers wrapped
    # after the MLP only: with an adapter after the attention too, a solved run's held-out exact
    # match fell by more than 0.1 on the way in some seeds on AVX2 kernels (0.365 on add_5 seed
    # 0); after the MLP only, none did (BENCHMARKS.md). lr 3e-2: on the grid base (issue 16)
    # lr 1e-2 is too slow for 300 steps (exact 0.3-0.86 on an earlier probe)
    preset=Preset(AdapterConfig(bottleneck_size=16, target_sublayers=("mlp",)),
                  dict(steps=300, lr=3e-2, batch_size=32))))
