"""LoHa (Hyeon-Woo et al., FedPara, 2022; the LyCORIS family): a Hadamard product of two
low-rank matrices beside a frozen Linear.

    y = W x + ((W1a W1b) * (W2a W2b)) x * alpha / r        (* elementwise)

Each factor has rank r, but their elementwise product can reach rank r^2: LoHa with r=4 has
the parameters of a LoRA of rank 8 and can reach rank 16. As in HF peft, W1a, W1b and W2a
start kaiming-uniform and W2b at zero, so at step 0 the model is exactly the base.

What LoHa and LoKr (lokr.py) share lives here, as HF peft's lycoris_utils.py: a layer whose
phi builds a whole delta weight of the projection's shape (LycorisLinear). A forward folds it
into the frozen weight (one matmul), a mixed batch gathers each row's delta from a stack,
and a cohort stacks its runs' weights into one batched matmul.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MergeablePhiLayer, PeftConfig, base_modules, check_range, unwrapped, wrapper_of
from .registry import Method, Preset, register

from ..model import PROJECTIONS as TARGETABLE, projection_shapes  # noqa: E402 - the model's projections


def check_lycoris(cfg):
    """The fields LoHa and LoKr share (HF peft's names)."""
    check_range("r", cfg.r, 1, 256)
    check_range("alpha", cfg.alpha, 1, 4096, (int, float))
    # a row of the delta survives with probability 1 - rank_dropout: at 0.5 every row of a
    # 128-row delta is dropped at once (a 0/0 in peft's rescaling) with odds 2^-128
    check_range("rank_dropout", cfg.rank_dropout, 0.0, 0.5, (int, float))
    check_range("module_dropout", cfg.module_dropout, 0.0, 0.9, (int, float))
    bad = [m for m in cfg.target_modules if m not in TARGETABLE]
    if not cfg.target_modules or bad:
        raise ValueError(f"target_modules must be a non-empty subset of {TARGETABLE}, got {list(cfg.target_modules)}")


@dataclass
class LoHaConfig(PeftConfig):
    peft_type = "LOHA"
    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0    # training: each output row of the delta dropped with this probability
    module_dropout: float = 0.0  # training: the whole delta of a projection skipped with this probability
    target_modules: tuple = ("q", "v")

    def validate(self):
        check_lycoris(self)

    def num_params(self, base_config):
        """Closed form: two rank-r pairs, 2 r (d_in + d_out), per targeted projection."""
        shapes = projection_shapes(base_config)
        return sum(2 * self.r * sum(shapes[t]) for t in set(self.target_modules)) * base_config.n_layer


def _kaiming(t, generator):
    """HF peft's init of a LyCORIS factor (kaiming-uniform, a = sqrt(5)), drawn from `generator`."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


class LycorisLinear(MergeablePhiLayer):
    """A Linear (or another method's wrapper of it) plus phi that builds a delta weight of the
    Linear's shape, `delta_weight(name)`, scaled by alpha / r: LoHa's and LoKr's layer. One
    holds every adapter for its projection, keyed by name; a shared `route` says which one a
    forward uses, or, for a mixed batch, which per row.

    Subclasses name `containers` (ParameterDicts, as HF peft's) and write `create` and
    `delta_weight`. An adapter need not be in every container (LoKr's w1 is one matrix or a
    low-rank pair), so which names the layer holds is read from `scaling`."""
    wraps = "base_layer"
    per_adapter = ("scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer, route):
        super().__init__()
        self.base_layer = base_layer
        self.route = route
        for attr in self.containers:
            setattr(self, attr, nn.ParameterDict())
        self.scaling, self.rank_dropout, self.module_dropout = {}, {}, {}

    # as a Linear, for a method that wraps this wrapper in turn
    weight = property(lambda self: unwrapped(self).weight)
    in_features = property(lambda self: unwrapped(self).in_features)
    out_features = property(lambda self: unwrapped(self).out_features)

    def has_phi(self, name=None):
        return name in self.scaling if name is not None else len(self.scaling) > 0

    def add(self, name, cfg, generator=None):
        w = self.weight
        # first: `scaling` says the layer holds `name`, so a failure below is removed whole
        self.scaling[name] = cfg.alpha / cfg.r
        self.rank_dropout[name], self.module_dropout[name] = cfg.rank_dropout, cfg.module_dropout
        for attr, t in self.create(cfg, w.shape[1], w.shape[0]):
            getattr(self, attr)[name] = nn.Parameter(t.to(device=w.device, dtype=w.dtype))
        self.init(name, generator)

    def create(self, cfg, d_in, d_out):
        """[(container, empty tensor)] of one adapter."""
        raise NotImplementedError

    def init(self, name, generator):
        """HF peft's reset_adapter_parameters, drawn from `generator`."""
        raise NotImplementedError

    def delta_weight(self, name):
        """The update of the Linear's weight, (d_out, d_in), scaling included."""
        raise NotImplementedError

    def plus_delta(self, weight, name):
        """weight + delta_weight(name), as a forward computes it (a method may fuse the sum)."""
        return weight + self.delta_weight(name)

    def tensors(self, name):
        return [getattr(self, attr)[name] for attr in self.containers if name in getattr(self, attr)]

    def folded(self, name):
        return self.weight + self.delta_weight(name).detach()

    # --- training: HF peft's rank and module dropout, from the run's own generator
    def _draw(self, n):
        g = self.route.generator
        return torch.rand(n, generator=g, device=g.device if g is not None else "cpu")

    def _skipped(self, name):
        """Module dropout: in training, the whole delta skipped for this forward."""
        p = self.module_dropout[name]
        return bool(self.training and p and self._draw(1).item() <= p)

    def _rescale_rank_dropout(self, name):
        return True  # LoHa's rows that survive are rescaled (by 1 / their share); LoKr's by option

    def _dropped(self, delta, name):
        """Rank dropout's mask on the delta's rows (training with rank_dropout only)."""
        keep = (self._draw(delta.shape[0]) > self.rank_dropout[name]).to(device=delta.device, dtype=delta.dtype)
        if self._rescale_rank_dropout(name):
            keep = keep / keep.mean()
        return delta * keep[:, None]

    def _training_delta(self, name):
        delta = self.delta_weight(name)
        return self._dropped(delta, name) if self.training and self.rank_dropout[name] else delta

    def forward(self, x):
        # the merged weight serves its own adapter only: a mixed batch, another adapter or
        # disable_adapter() must never see it
        if self.merged_weight is not None and self.route.rows is None and self.route.active == self.merged_adapter:
            return F.linear(x, self.merged_weight)
        if self.route.rows is not None:
            return self.base_layer(x) + self._mixed(x)
        name = self.route.active
        if not self.has_phi(name) or self._skipped(name):
            return self.base_layer(x)
        base = self.base_layer
        if not isinstance(base, nn.Linear):  # another method's wrapper: its output plus ours
            return base(x) + F.linear(x, self._training_delta(name))
        # folded into W: one matmul instead of two (fewer kernels: this model is tiny)
        dropped = self.training and self.rank_dropout[name]
        weight = base.weight + self._training_delta(name) if dropped else self.plus_delta(base.weight, name)
        return F.linear(x, weight, base.bias)

    # --- mixed batches: each row's delta gathered from a stack (slot 0: zeros, no phi here)
    def _stacks(self):
        names = list(self.scaling)
        tensors = [t for n in names for t in self.tensors(n)]
        return self._stack_cache.get(self.route.generation, tensors, lambda: self._build_stacks(names))

    def _build_stacks(self, names):
        with torch.no_grad():
            return torch.stack([torch.zeros_like(self.weight)] + [self.delta_weight(n) for n in names])

    def _mixed(self, x):
        """Each row times its own delta: one matmul per phi present in the batch (rows of no phi
        here cost nothing; a gather of a whole delta per row cost a batch's worth of weights)."""
        slots = self.route.slots(list(self.scaling), x.device)
        stacks = self._stacks()
        out = x.new_zeros(*x.shape[:-1], stacks.shape[1])
        for slot in slots.unique().tolist():
            if slot:
                rows = slots == slot
                out[rows] = x[rows] @ stacks[slot].T
        return out

    @staticmethod
    def cohort(base_layer, members):
        """The cohort's layer in this one's place: row group k through members[k] = (layer, name)."""
        return CohortLycoris(base_layer, members)


# --- cohorts (peftcore.cohort): K runs' rows in one batch, each through its own phi, with gradients
class CohortLycoris(nn.Module):
    """A frozen Linear plus K runs' delta weights: row group k goes through W + run k's delta,
    one batched matmul over the stack of the K weights."""

    def __init__(self, base_layer, members):
        super().__init__()
        self.base_layer = base_layer
        self.members = list(members)  # (layer, name), a plain list: the runs' layers are not ours

    def forward(self, x):
        W = self.base_layer.weight
        weights = torch.stack([layer.plus_delta(W, name) for layer, name in self.members])  # every step
        out = torch.bmm(x.reshape(len(self.members), -1, x.shape[-1]), weights.transpose(1, 2))
        out = out.view(*x.shape[:-1], -1)
        return out if self.base_layer.bias is None else out + self.base_layer.bias


def plug_lycoris(layer_cls, model, name, cfg, generator=None):
    """Wrap every targeted projection of the model's view (once: a layer of `layer_cls` already
    in its stack of wrappers takes the new adapter) and give it adapter `name`. A projection
    another method already wraps (LoRA, IA3) is wrapped as it is."""
    for parent in list(base_modules(model.base_model)):
        for child_name, child in list(parent.named_children()):
            if child_name not in cfg.target_modules or not isinstance(unwrapped(child), nn.Linear):
                continue
            layer = wrapper_of(child, layer_cls)
            if layer is None:
                layer = layer_cls(child, model.route)
                setattr(parent, child_name, layer)
            layer.add(name, cfg, generator)


def lycoris_cohort_kind(cfg):
    """Runs on the same projections ride together (their deltas all have the projections'
    shapes, whatever r); a run with dropout trains alone (CohortLycoris has none)."""
    if cfg.rank_dropout or cfg.module_dropout:
        return None
    return (cfg.peft_type, tuple(sorted(set(cfg.target_modules))))


# the fields HF peft's LyCORIS configs also carry, as their defaults say (conv and pattern options:
# none apply to this base's Linears)
LYCORIS_HF_FIELDS = dict(use_effective_conv2d=False, init_weights=True, rank_pattern={}, alpha_pattern={},
                         exclude_modules=None, layers_to_transform=None, layers_pattern=None, modules_to_save=None,
                         inference_mode=True, task_type=None, base_model_name_or_path=None)


class LoHaLinear(LycorisLinear):
    containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def create(self, cfg, d_in, d_out):
        return [("hada_w1_a", torch.empty(d_out, cfg.r)), ("hada_w1_b", torch.empty(cfg.r, d_in)),
                ("hada_w2_a", torch.empty(d_out, cfg.r)), ("hada_w2_b", torch.empty(cfg.r, d_in))]

    def init(self, name, generator):
        # as HF peft: one zero factor is enough for a zero update at the start
        _kaiming(self.hada_w1_a[name].data, generator)
        _kaiming(self.hada_w1_b[name].data, generator)
        _kaiming(self.hada_w2_a[name].data, generator)
        nn.init.zeros_(self.hada_w2_b[name].data)

    def delta_weight(self, name):
        # HF peft's make_weight, in its order of operations
        return ((self.hada_w1_a[name] @ self.hada_w1_b[name]) * (self.hada_w2_a[name] @ self.hada_w2_b[name])) \
            * self.scaling[name]

    def plus_delta(self, weight, name):
        # one fused kernel for product, scaling and sum (fewer kernels: this model is tiny)
        return torch.addcmul(weight, self.hada_w1_a[name] @ self.hada_w1_b[name],
                             self.hada_w2_a[name] @ self.hada_w2_b[name], value=self.scaling[name])


register(Method(
    LoHaConfig, plug=lambda model, name, cfg, g: plug_lycoris(LoHaLinear, model, name, cfg, g),
    layers=(LoHaLinear,), mergeable=True, cohort_kind=lycoris_cohort_kind,
    # four factors multiply: at 10 every r <= 32, alpha <= 128 on all six projections still serves
    # finite rows (at 30, r=8 does not); training at lr 0.1 for 1000 steps reached 5.7 at most
    max_abs_value=10.0,
    hf_fields=LYCORIS_HF_FIELDS, hf_peft="module", slug="loha",
    # r=1 on q, k, v, o, as LoRA's preset (twice its phi, 1% of the base). Higher ranks learn on a
    # random frozen base too: r=4 on q and v (rank up to 16) solved all four tasks there on 5 of 5
    # seeds and reached 0.73 on sort, r=2 on q, k, v, o all four on seed 0 (BENCHMARKS.md,
    # "LoRA's family"); the r^2 lesson is the Train page's r slider
    preset=Preset(LoHaConfig(r=1, alpha=8, target_modules=("q", "k", "v", "o")),
                  dict(steps=300, lr=1e-2, batch_size=32))))
