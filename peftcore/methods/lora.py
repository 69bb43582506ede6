"""LoRA: a low-rank update beside a frozen Linear.  y = W x + (B A x) * lora_alpha / r

A starts kaiming-uniform and B at zero, so at step 0 the model is exactly the base.
One LoraLinear holds every adapter for its projection (keyed by name, as in HF peft);
a shared `route` says which one a forward uses, or, for a mixed batch, which per row.

The options practitioners reach for, with HF peft's names:
  use_rslora          scaling lora_alpha / sqrt(r) instead of / r (rank-stabilised LoRA)
  use_dora            DoRA: a magnitude per output row times the normalised direction of W + B A
  init_lora_weights   True (kaiming A, zero B), "gaussian" (A ~ N(0, 1/r)), "orthogonal"
  optimizer           "adamw"; "loraplus" (B learns loraplus_lr_ratio times faster than A, as
                      peft's create_loraplus_optimizer); "lorafa" (A frozen, B's gradient
                      projected, as peft's create_lorafa_optimizer). How phi trains, not what it
                      is: saved in the file's "peftcore" record.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MergeablePhiLayer, PeftConfig, base_modules, check_range, pad_to
from .registry import Method, Preset, register
from .. import merging

from ..model import PROJECTIONS as TARGETABLE, projection_shapes  # noqa: E402 - the model's projections

INITS = (True, "gaussian", "orthogonal")
OPTIMIZERS = ("adamw", "loraplus", "lorafa")
# HF peft's inits that start from an SVD or quantisation of W: they write W - B A into the base
# weights, which here are one base shared by every phi
REWRITES_THE_BASE = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class LoraConfig(PeftConfig):
    peft_type = "LORA"
    training_fields = ("optimizer", "loraplus_lr_ratio")
    r: int = 4
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple = ("q", "v")
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: object = True
    optimizer: str = "adamw"
    loraplus_lr_ratio: float = 16.0

    def validate(self):
        check_range("r", self.r, 1, 256)
        check_range("lora_alpha", self.lora_alpha, 1, 4096, (int, float))
        check_range("lora_dropout", self.lora_dropout, 0.0, 0.9, (int, float))
        bad = [m for m in self.target_modules if m not in TARGETABLE]
        if not self.target_modules or bad:
            raise ValueError(f"target_modules must be a non-empty subset of {TARGETABLE}, got {list(self.target_modules)}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(REWRITES_THE_BASE):
            raise ValueError(f"init_lora_weights={init!r} writes into the base's weights (HF peft subtracts its "
                             "starting B A from W), and here one frozen base serves every phi: use "
                             f"{', '.join(repr(i) for i in INITS)}")
        if not (init is True or (isinstance(init, str) and init in INITS)):
            raise ValueError(f"init_lora_weights must be one of {', '.join(repr(i) for i in INITS)}, got {init!r}")
        if init == "orthogonal" and self.r % 2:
            raise ValueError(f"init_lora_weights='orthogonal' needs an even r (as HF peft), got r={self.r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check_range("loraplus_lr_ratio", self.loraplus_lr_ratio, 1, 64, (int, float))

    def hf_optimizer(self, lr):
        if self.optimizer == "loraplus":
            return ("import torch\nfrom peft.optimizers import create_loraplus_optimizer\n\n"
                    f"optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr={lr:g}, "
                    f"loraplus_lr_ratio={self.loraplus_lr_ratio:g})\n")
        if self.optimizer == "lorafa":
            return ("from peft.optimizers import create_lorafa_optimizer\n\n"
                    f"optimizer = create_lorafa_optimizer(model, r={self.r}, lora_alpha={self.lora_alpha}, lr={lr:g}, "
                    f"use_rslora={self.use_rslora})\n")
        return None

    @property
    def scaling(self):
        """What B A is multiplied by: lora_alpha / r, or / sqrt(r) with use_rslora."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def num_params(self, base_config):
        """Closed form: r * (d_in + d_out) per targeted projection, plus d_out with DoRA."""
        shapes = projection_shapes(base_config)
        per_layer = sum(self.r * sum(shapes[t]) + self.use_dora * shapes[t][1] for t in self.target_modules)
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
    containers, per_adapter, wraps = ("lora_A", "lora_B", "lora_magnitude_vector"), ("lora_dropout", "scaling"), "base_layer"

    def __init__(self, base_layer: nn.Linear, route):
        super().__init__()
        self.base_layer = base_layer
        self.route = route
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's adapters only
        self.lora_dropout = nn.ModuleDict()
        self.scaling = {}

    def add(self, name, cfg: LoraConfig, generator=None):
        d_in, d_out = self.base_layer.in_features, self.base_layer.out_features
        w = self.base_layer.weight
        self.lora_A[name] = nn.Linear(d_in, cfg.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(cfg.r, d_out, bias=False, device=w.device, dtype=w.dtype)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if cfg.init_lora_weights == "orthogonal":
                a, b = orthogonal_pair(cfg.r, d_in, d_out, generator)
                A.copy_(a), B.copy_(b)
            else:
                if cfg.init_lora_weights == "gaussian":
                    nn.init.normal_(A, std=1 / cfg.r, generator=generator)
                else:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
                nn.init.zeros_(B)
        self.lora_dropout[name] = LoraDropout(cfg.lora_dropout, self.route) if cfg.lora_dropout else nn.Identity()
        self.scaling[name] = cfg.scaling
        if cfg.use_dora:  # the magnitude starts as the row norms of W + B A: the base's own output
            self.lora_magnitude_vector[name] = nn.Parameter(self._norm(name).clone())

    def _norm(self, name):
        """Row norms of W + scaling B A, detached: DoRA treats them as a constant (its paper, 4.3)."""
        w = self.get_base_layer().weight
        return torch.linalg.norm(w + self.delta_weight(name).detach(), dim=1).detach()

    def dora_scale(self, name):
        """DoRA's magnitude over the row norms: what multiplies W + B A, row by row."""
        return self.lora_magnitude_vector[name] / self._norm(name)

    def delta_weight(self, name):
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def folded(self, name):
        w = self.base_layer.weight + self.delta_weight(name).detach()
        return w * self.dora_scale(name).detach()[:, None] if name in self.lora_magnitude_vector else w

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
            return self._mixed(x, out)
        name = self.route.active
        if name in self.lora_magnitude_vector:
            return self._dora(x, out, name)
        if name in self.lora_A:
            h = self.lora_A[name](self.lora_dropout[name](x))
            # out + h (scaling B)^T as one fused addmm (fewer kernels: this model is tiny). The
            # scaling goes on B, as in the stacks of mixed batches and cohorts: then a run
            # trained in a cohort rounds exactly as it does alone
            scaled_B = self.lora_B[name].weight * self.scaling[name]
            out = torch.addmm(out.flatten(0, -2), h.flatten(0, -2), scaled_B.t()).view(out.shape)
        return out

    def _dora(self, x, out, name):
        """HF peft's DoRA forward: out + (s - 1) W x' + s (B A x') scaling, s = m / |W + B A| by
        row, x' the dropped-out input (x itself when dropout is off or in eval)."""
        dropped = self.lora_dropout[name](x)
        base = out if dropped is x else F.linear(dropped, self.get_base_layer().weight)
        scale = self.dora_scale(name)
        lora = self.lora_B[name](self.lora_A[name](dropped)) * self.scaling[name]
        return out + (scale - 1) * base + scale * lora

    # --- mixed batches: each row its own adapter, as batched gathers + bmm (Punica's idea)
    def _stacks(self):
        """A (N+1, r_max, d_in), B (N+1, d_out, r_max) with scaling folded into B; slot 0 is
        all zeros (rows without a LoRA here). Cached until an adapter changes."""
        names = list(self.lora_A)
        tensors = [t for n in names for t in (self.lora_A[n].weight, self.lora_B[n].weight)] + \
            list(self.lora_magnitude_vector.values())
        return self._stack_cache.get(self.route.generation, tensors, lambda: self._build_stacks(names))

    def _build_stacks(self, names):
        """(A, B, scale): the stacks of stack_lora, and DoRA's row scales (N+1, d_out), ones
        for every plain LoRA and slot 0, or None when no phi here is DoRA's."""
        w = self.base_layer.weight
        none = (w.new_zeros(1, w.shape[1]), w.new_zeros(w.shape[0], 1), 1.0)  # slot 0: no LoRA here
        A, B = stack_lora([none] + [(self.lora_A[n].weight.detach(), self.lora_B[n].weight.detach(),
                                     self.scaling[n]) for n in names])
        ones = w.new_ones(w.shape[0])
        scale = torch.stack([ones] + [self.dora_scale(n).detach() if n in self.lora_magnitude_vector else ones
                                      for n in names]) if len(self.lora_magnitude_vector) else None
        return A, B, scale

    def _mixed(self, x, out):
        """`out` (W x) plus each row's LoRA; a DoRA row as _dora computes it, by its own scale."""
        A, B, scale = self._stacks()
        slots = self.route.slots(list(self.lora_A), x.device)
        h = torch.bmm(x, A[slots].transpose(1, 2))  # (batch, T, r_max)
        lora = torch.bmm(h, B[slots].transpose(1, 2))  # (batch, T, d_out)
        if scale is None:
            return out + lora
        s = scale[slots][:, None]  # (batch, 1, d_out); 1 for a plain LoRA's row, where this is out + lora
        return out + (s - 1) * out + s * lora


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


def orthogonal_pair(r, d_in, d_out, generator=None):
    """HF peft's "orthogonal" init: A and B from the odd and even rows of one random orthogonal
    r x r matrix, so B A = 0 (the rows are orthogonal) while neither factor is zero."""
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
    a = (torch.randn(d_in, r // 2, generator=generator) @ q[0::2, :]).T / 10.0
    b = torch.randn(r // 2, d_out, generator=generator).T @ q[1::2, :] / 10.0
    return a, b


def cohort_kind(cfg):
    """LoRA runs on the same projections ride together (ranks pad); CohortLora has neither
    dropout nor DoRA's magnitude."""
    return None if cfg.lora_dropout or cfg.use_dora else ("LORA", tuple(sorted(cfg.target_modules)))


@torch.no_grad()
def combined(sources, options, rank, generator=None):
    """(A, B, magnitude) of one projection's `sources`, [(LoraLinear, adapter, weight)], combined
    as HF peft 0.21.2's add_weighted_adapter combines them, for a new phi of scaling 1 (so each
    source's own scaling goes into the factors); magnitude is None unless the sources are DoRA's.
      cat:        A = [w_i s_i A_i] stacked, B = [B_i] side by side: B A = sum w_i s_i B_i A_i exactly
      svd, *_svd: the sources' updates s_i B_i A_i combined (a weighted sum; ties, dare, pruning on
                  the updates), then the best rank-`rank` pair of the result (merging.low_rank)
      linear, ties, dare_*, magnitude_prune: A and B combined factor by factor with weights
                  sign(w_i) sqrt|w_i s_i| and sqrt|w_i s_i|: B A has the cross terms B_i A_j, so it
                  is not the weighted sum of the updates (peft's, reproduced)
    DoRA's magnitudes: the base's row norms plus the same combination of each source's offset from
    them (where a fresh DoRA magnitude starts), so that one source at weight 1 comes back."""
    if not sources:
        raise ValueError("none of the adapters to combine is on this projection")
    if options.combination_type == "cat":
        A = torch.cat([layer.lora_A[n].weight * w * layer.scaling[n] for layer, n, w in sources], 0)
        B = torch.cat([layer.lora_B[n].weight for layer, n, _ in sources], 1)
        A, B = pad_to(A, rank, 0), pad_to(B, rank, 1)
    elif options.truncates:
        deltas = [layer.delta_weight(n) for layer, n, _ in sources]
        w = torch.tensor([w for _, _, w in sources]).to(deltas[0].device)
        delta = merging.combine(options.base_kind, deltas, w, options.density, options.majority_sign_method, generator)
        A, B = merging.low_rank(delta, rank, options.svd_clamp, options.svd_full_matrices, options.svd_driver)
    else:
        scaled = [w * layer.scaling[n] for layer, n, w in sources]
        w_A = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])  # the sign on A only
        w_B = torch.tensor([math.sqrt(abs(x)) for x in scaled])
        first = sources[0][0].lora_A[sources[0][1]].weight

        def factor(attr, w):  # A first, then B: the order peft draws dare's masks in
            tensors = [getattr(layer, attr)[n].weight for layer, n, _ in sources]
            return merging.combine(options.base_kind, tensors, w.to(first.device), options.density,
                                   options.majority_sign_method, generator).to(first.dtype)
        A, B = factor("lora_A", w_A), factor("lora_B", w_B)
    magnitude = None
    if any(n in layer.lora_magnitude_vector for layer, n, _ in sources):
        norm = torch.linalg.norm(sources[0][0].get_base_layer().weight, dim=1)
        offsets = [layer.lora_magnitude_vector[n] - norm for layer, n, _ in sources]
        w = torch.tensor([w for _, _, w in sources]).to(norm.device)
        magnitude = norm + merging.combine(options.base_kind, offsets, w, options.density,
                                           options.majority_sign_method, generator)
    return A, B, magnitude


def combine(model, adapters, weights, name, options, seed=None):
    """Add phi `name`: `adapters` combined with `weights` as HF peft 0.21.2's
    add_weighted_adapter (combined() says how). Its config is the first source's with
    r = lora_alpha = the new rank (scaling 1: the sources' scalings are in its factors), and,
    unlike peft 0.21.2, use_rslora off: peft keeps the first source's use_rslora, and its scaling
    lora_alpha / sqrt(r) = sqrt(r) makes the merged update sqrt(r) times too big (HF peft issue
    #3761). The new rank: the sum of the sources' for cat; svd_rank, or the largest source rank,
    for svd and the *_svd forms; the sources' one r for the rest. One adapter is scaled, never
    truncated (peft makes any combination_type "linear" then). The targets: every projection
    any source targets (a source absent from a projection adds nothing there), as peft.
    DoRA's phi combine with DoRA's only (see combined())."""
    configs = [model.peft_config[a] for a in adapters]
    if len({c.use_dora for c in configs}) > 1:
        raise ValueError("DoRA and plain LoRA phi cannot be combined into one: a DoRA phi rescales each row of the "
                         "weight, a plain one does not. Combine the DoRA phi and the plain ones apart.")
    if len(adapters) == 1:
        options = replace(options, combination_type="linear")
    ranks, kind = [c.r for c in configs], options.combination_type
    if kind == "cat":
        rank = sum(ranks)
    elif options.truncates:
        rank = options.svd_rank or max(ranks)
    elif len(set(ranks)) > 1:
        raise ValueError(f"combination_type={kind!r} combines A and B entry by entry, so every adapter needs the same "
                         f"r; these have r = {ranks}. Use cat or svd (or a *_svd form) for different ranks.")
    else:
        rank = ranks[0]
    targets = tuple(t for t in TARGETABLE if any(t in c.target_modules for c in configs))
    config = replace(configs[0], r=rank, lora_alpha=rank, use_rslora=False, target_modules=targets,
                     init_lora_weights=True, optimizer=LoraConfig.optimizer,
                     loraplus_lr_ratio=LoraConfig.loraplus_lr_ratio)
    try:
        config.validate()
    except ValueError as e:
        raise ValueError(f"the merged phi would have r = {rank} ({kind}): {e}") from None
    model.inject_adapter(name, config, seed)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    with torch.no_grad():
        for layer in [m for m in layers if m.has_phi(name)]:
            # the sources on this projection: in this layer, or in another LoraLinear of its stack of
            # wrappers (a LoRA added after another method wrapped the projection gets a layer of its own)
            here = [m for m in layers if m.get_base_layer() is layer.get_base_layer()]
            sources = [(next(m for m in here if m.has_phi(a)), a, w) for a, w in zip(adapters, weights)
                       if any(m.has_phi(a) for m in here)]
            A, B, magnitude = combined(sources, options, rank, generator)
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)
            if magnitude is not None:
                layer.lora_magnitude_vector[name].copy_(magnitude)


def _layers(model, name):
    return [m for m in model.modules() if isinstance(m, LoraLinear) and m.has_phi(name)]


def optimizer_groups(model, name, cfg, lr):
    """LoRA+ (Hayou et al., 2024): B (and DoRA's magnitude) at loraplus_lr_ratio times A's
    learning rate, as peft's create_loraplus_optimizer. LoRA-FA (Zhang et al., 2023): A stays
    frozen and B's gradient is projected by (A A^T)^-1 / scaling^2, as peft's LoraFAOptimizer."""
    if cfg.optimizer == "adamw":
        return None
    layers = _layers(model, name)
    A = [m.lora_A[name].weight for m in layers]
    B = [m.lora_B[name].weight for m in layers] + [m.lora_magnitude_vector[name] for m in layers
                                                   if name in m.lora_magnitude_vector]
    if cfg.optimizer == "loraplus":
        return [dict(params=A, lr=lr), dict(params=B, lr=lr * cfg.loraplus_lr_ratio)]
    pairs = [(m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name]) for m in layers]
    return [dict(params=B, lr=lr, before_step=lambda: project_b_grads(pairs))]


@torch.no_grad()
def project_b_grads(pairs, delta=1e-8):
    """LoRA-FA's gradient for B with A frozen: grad_B (A A^T + delta I)^-1 / scaling^2."""
    for A, B, scaling in pairs:
        if B.grad is not None:
            gram = A @ A.T + delta * torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
            B.grad.copy_(B.grad @ torch.linalg.pinv(gram) / scaling ** 2)


def frozen_phi(model, name, cfg):
    """LoRA-FA's A: saved with the phi, never trained."""
    return [m.lora_A[name].weight for m in _layers(model, name)] if cfg.optimizer == "lorafa" else []


# the fields HF peft's LoraConfig expects to find in adapter_config.json
HF_FIELDS = dict(bias="none", fan_in_fan_out=False, inference_mode=True, task_type=None, base_model_name_or_path=None,
                 modules_to_save=None)

register(Method(
    LoraConfig, plug=lambda model, name, cfg, g: add_lora(model.base_model, name, cfg, model.route, g),
    layers=(LoraLinear,), mergeable=True, cohort_kind=cohort_kind, optimizer_groups=optimizer_groups,
    frozen_phi=frozen_phi, combine=combine, combinations=merging.COMBINATIONS,
    hf_fields=HF_FIELDS, hf_peft="module", slug="lora",
    # rank 1 on many projections beats a higher rank on few at the same budget (LoRA paper, Table 6);
    # the attention's four, as the paper adapted attention only: with the MLP's up too, the same
    # phi learned sort from scratch on a random frozen base (0.150 on its best seed; BENCHMARKS.md)
    preset=Preset(LoraConfig(r=1, lora_alpha=4, target_modules=("q", "k", "v", "o")),
                  dict(steps=300, lr=1e-2, batch_size=32))))
