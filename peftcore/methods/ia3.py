"""(IA)^3 (Liu et al., 2022): learned vectors that rescale what some projections see or give.

    k = l_k * (W_k x)      v = l_v * (W_v x)      down(l_ff * gelu(up(x)))

As in HF peft: a module in `feedforward_modules` has its *input* rescaled (a vector of
in_features: for `down`, the MLP's hidden activation), any other target its *output* (a
vector of out_features). The vectors start at one, so at step 0 the model is exactly the
base. They are stored in HF peft's shapes, (out, 1) and (1, in): the shapes that also fold
into W by broadcasting, W * l, which is how a merge works.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MergeablePhiLayer, PeftConfig, base_modules, unwrapped
from ..model import PROJECTIONS, projection_shapes
from .registry import Method, Preset, register


@dataclass
class IA3Config(PeftConfig):
    peft_type = "IA3"
    target_modules: tuple = ("k", "v", "down")
    feedforward_modules: tuple = ("down",)  # of target_modules: these scale their input

    def validate(self):
        bad = [m for m in self.target_modules if m not in PROJECTIONS]
        if not self.target_modules or bad:
            raise ValueError(f"target_modules must be a non-empty subset of {PROJECTIONS}, got {list(self.target_modules)}")
        stray = [m for m in self.feedforward_modules if m not in self.target_modules]
        if stray:
            raise ValueError(f"feedforward_modules must be a subset of target_modules {list(self.target_modules)}, "
                             f"got {list(self.feedforward_modules)}")

    def num_params(self, base_config):
        """Closed form: one number per input (feedforward) or output feature of each target."""
        shapes = projection_shapes(base_config)  # (in, out)
        per_layer = sum(shapes[t][0 if t in self.feedforward_modules else 1] for t in set(self.target_modules))
        return per_layer * base_config.n_layer


def _linear(module):
    """The Linear under any stack of phi wrappers (a LoRA may already wrap this projection)."""
    module = unwrapped(module)
    return module if isinstance(module, nn.Linear) else None


class IA3Linear(MergeablePhiLayer):
    """Wraps one projection (a Linear, or another method's wrapper of it) and rescales its
    input or output by the routed adapter's vector. One IA3Linear holds every adapter for its
    projection, keyed by name; whether a vector scales the input is per adapter."""
    containers, per_adapter, wraps = ("ia3_l",), ("is_feedforward",), "base_layer"

    def __init__(self, base_layer, route):
        super().__init__()
        self.base_layer = base_layer
        self.route = route
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = {}  # adapter name -> True: scales the input

    # as a Linear, for a method that wraps this wrapper in turn
    weight = property(lambda self: _linear(self).weight)
    in_features = property(lambda self: _linear(self).in_features)
    out_features = property(lambda self: _linear(self).out_features)

    def add(self, name, feedforward):
        w = self.weight
        shape = (1, w.shape[1]) if feedforward else (w.shape[0], 1)  # HF peft's shapes
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=w.device, dtype=w.dtype))  # as HF peft
        self.is_feedforward[name] = feedforward

    def folded(self, name):
        return self.weight * self.ia3_l[name].detach()  # (out, 1) scales rows, (1, in) columns

    @staticmethod
    def cohort(base_layer, members):
        """The cohort's layer in this one's place: row group k through members[k] = (layer, name)."""
        return CohortIA3(base_layer, [(layer.ia3_l[name], layer.is_feedforward[name]) for layer, name in members])

    def forward(self, x):
        # the merged weight serves its own adapter only (never a mixed batch or another phi)
        if self.merged_weight is not None and self.route.rows is None and self.route.active == self.merged_adapter:
            return F.linear(x, self.merged_weight)
        if self.route.rows is not None:
            return self._mixed(x)
        name = self.route.active
        if name not in self.ia3_l:
            return self.base_layer(x)
        l = self.ia3_l[name].flatten()
        return self.base_layer(x * l) if self.is_feedforward[name] else self.base_layer(x) * l

    # --- mixed batches: each row's vector is one gather from a stack (slot 0: ones)
    def _stacks(self):
        names = list(self.ia3_l)
        return self._stack_cache.get(self.route.generation, [self.ia3_l[n] for n in names],
                                     lambda: self._build_stacks(names))

    def _build_stacks(self, names):
        """(inputs, outputs): (N+1, in) and (N+1, out) stacks of vectors, ones where a phi
        scales the other side or is not here; None for a side no phi here scales."""
        w = self.weight

        def side(feedforward, size):
            if feedforward not in self.is_feedforward.values():
                return None
            ones = w.new_ones(size)
            return torch.stack([ones] + [self.ia3_l[n].detach().flatten() if self.is_feedforward[n] == feedforward
                                         else ones for n in names])
        return side(True, w.shape[1]), side(False, w.shape[0])

    def _mixed(self, x):
        inputs, outputs = self._stacks()
        slots = self.route.slots(list(self.ia3_l), x.device)
        if inputs is not None:
            x = x * inputs[slots][:, None]
        out = self.base_layer(x)
        return out if outputs is None else out * outputs[slots][:, None]


# --- cohorts (peftcore.cohort): K runs' rows in one batch, each through its own phi, with gradients
class CohortIA3(nn.Module):
    """A frozen Linear plus K runs' vectors: row group k is rescaled by run k's (runs of one
    cohort_kind agree on which side each projection scales)."""

    def __init__(self, base_layer, vectors):
        super().__init__()
        self.base_layer = base_layer
        self.vectors = [v for v, _ in vectors]  # a plain list: the runs' Parameters are not ours
        self.feedforward = vectors[0][1]

    def _scale(self, h):
        l = torch.stack([v.flatten() for v in self.vectors])  # every step: the runs' phi change
        return (h.reshape(len(self.vectors), -1, h.shape[-1]) * l[:, None]).view(h.shape)

    def forward(self, x):
        return self.base_layer(self._scale(x)) if self.feedforward else self._scale(self.base_layer(x))


def add_ia3(model, name, cfg: IA3Config, generator=None):
    """Wrap every targeted projection of the model's view (once) and give it vector `name`.
    Vectors start at one: nothing to draw, so `generator` is unused."""
    for parent in list(base_modules(model.base_model)):
        for child_name, child in list(parent.named_children()):
            if child_name not in cfg.target_modules or _linear(child) is None:
                continue
            if not isinstance(child, IA3Linear):
                child = IA3Linear(child, model.route)
                setattr(parent, child_name, child)
            child.add(name, child_name in cfg.feedforward_modules)


def combine(model, adapters, weights, name, options, seed=None):
    """Add phi `name`: each projection's vector the weighted sum of the sources' vectors,
    sum_i w_i l_i, as HF peft 0.21.2's IA3 add_weighted_adapter (there is no other
    combination_type for vectors). The sources must target the same projections, scaling the
    same side of each: a vector a source does not have there is not zero but the identity, and
    peft's sum would count it as zero."""
    changed = options.changed(combination_type=("linear",))
    if changed:
        raise ValueError(f"IA3 phi combine by the weighted sum of their vectors (combination_type 'linear'), as HF "
                         f"peft does; {changed} belong to low-rank merges")
    configs = [model.peft_config[a] for a in adapters]
    first = configs[0]
    for adapter, config in zip(adapters, configs):
        if set(config.target_modules) != set(first.target_modules) or \
                set(config.feedforward_modules) != set(first.feedforward_modules):
            raise ValueError(f"IA3 phi combine only over the same projections, scaled on the same side: {adapters[0]!r} "
                             f"targets {sorted(first.target_modules)} (inputs of {sorted(first.feedforward_modules)}), "
                             f"{adapter!r} {sorted(config.target_modules)} (inputs of {sorted(config.feedforward_modules)})")
    model.inject_adapter(name, replace(first), seed)
    layers = [m for m in model.modules() if isinstance(m, IA3Linear)]
    with torch.no_grad():
        for layer in [m for m in layers if m.has_phi(name)]:
            # the sources on this projection: here, or in another IA3Linear of its stack of wrappers
            here = [m for m in layers if m.get_base_layer() is layer.get_base_layer()]
            vector = torch.zeros_like(layer.ia3_l[name])
            for adapter, weight in zip(adapters, weights):
                holder = next((m for m in here if m.has_phi(adapter)), None)
                if holder is not None:
                    vector += holder.ia3_l[adapter] * weight
            layer.ia3_l[name].copy_(vector)


register(Method(
    IA3Config, plug=add_ia3, layers=(IA3Linear,), mergeable=True, slug="ia3", hf_peft="module", combine=combine,
    combinations=("linear",),
    cohort_kind=lambda cfg: ("IA3", tuple(sorted(cfg.target_modules)), tuple(sorted(cfg.feedforward_modules))),
    # what HF peft's IA3Config expects to find in adapter_config.json
    hf_fields=dict(fan_in_fan_out=False, init_ia3_weights=True, modules_to_save=None, inference_mode=True,
                   task_type=None, base_model_name_or_path=None),
    # vectors want a high lr (an earlier base, worst of 5 seeds: 1e-2 solves nothing, 3e-2 reaches
    # 0.986, 1e-1 0.998). The paper's k, v, down plus the output of up: on add_5 the paper's
    # layout solved 1 of 5 seeds, this one 4 of 5 at batch 32, lr 0.1. Clipping the gradient's
    # norm at 0.25 (it acts on the first, large steps: 32 of 300 on add_5) makes batch 32 as
    # sure as batch 64 was, at half the cost per step: add_5 15 of 15 seeds at lr 0.07 (lr 0.1:
    # 9 of 10) (BENCHMARKS.md, "IA3 at batch 32, clipped")
    preset=Preset(IA3Config(target_modules=("k", "v", "up", "down")), dict(steps=300, lr=7e-2, batch_size=32, clip=0.25))))
