"""LoKr (Edalati et al., KronA, 2022; the LyCORIS family): a Kronecker product of two small
matrices beside a frozen Linear.

    y = W x + (W1 kron W2) x * alpha / r

As HF peft: d_out = a b and d_in = c d are each split into two factors near their square
root (factorization(): 128 = 8 x 16), W1 is a x c and W2 is b x d. W1 is a full matrix
(a low-rank pair W1a W1b with decompose_both, when r < max(a, c) / 2); W2 is a low-rank pair
W2a W2b when r < max(b, d) / 2, else a full matrix. rank(W1 kron W2) = rank(W1) rank(W2): on a
128 x 128 projection an 8 x 8 W1 and a rank-r W2 reach rank 8 r from 64 + 32 r numbers, and a
full W2 (r >= 8) full rank from 320. As in HF peft, W1 (or W1a) starts at zero, the rest
kaiming-uniform, so at step 0 the model is exactly the base.

The layer is LoHa's (loha.py: LycorisLinear): a delta weight folded into W in a forward,
stacked for mixed batches and cohorts.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import PeftConfig
from .loha import LYCORIS_HF_FIELDS, LycorisLinear, _kaiming, check_lycoris, lycoris_cohort_kind, plug_lycoris
from ..model import projection_shapes
from .registry import Method, Preset, register


def factorization(dimension: int, factor: int = -1) -> tuple:
    """HF peft's (lycoris_utils / lokr.layer): `dimension` as m * n, m <= n, m as close to the
    square root as the divisors allow (or to `factor`, when it is positive: factor itself
    when it divides the dimension, in the order (factor, dimension // factor))."""
    if factor > 0 and (dimension % factor) == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def kron_shapes(cfg, d_in, d_out):
    """HF peft's plan for one Linear: W1's shape (a, c), W2's shape (b, d), and whether each
    is one full matrix (else a rank-r pair)."""
    in_m, in_n = factorization(d_in, cfg.decompose_factor)
    out_l, out_k = factorization(d_out, cfg.decompose_factor)
    use_w1 = not (cfg.decompose_both and cfg.r < max(out_l, in_m) / 2)
    use_w2 = not (cfg.r < max(out_k, in_n) / 2)
    return (out_l, in_m), (out_k, in_n), use_w1, use_w2


def rank_bound(cfg, d_in, d_out):
    """The largest rank W1 kron W2 can reach on a (d_out, d_in) projection: rank(W1) rank(W2)."""
    (a, c), (b, d), use_w1, use_w2 = kron_shapes(cfg, d_in, d_out)
    return (min(a, c) if use_w1 else min(a, c, cfg.r)) * (min(b, d) if use_w2 else min(b, d, cfg.r))


@dataclass
class LoKrConfig(PeftConfig):
    peft_type = "LOKR"
    r: int = 8
    alpha: int = 8
    rank_dropout: float = 0.0      # training: each output row of the delta dropped with this probability
    module_dropout: float = 0.0    # training: the whole delta of a projection skipped with this probability
    decompose_both: bool = False   # W1 a low-rank pair too (when r < max(a, c) / 2)
    decompose_factor: int = -1     # -1: factors near the square root; else the factor to split off
    rank_dropout_scale: bool = False  # rescale the rows rank dropout keeps
    target_modules: tuple = ("q", "v")

    def validate(self):
        check_lycoris(self)
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        factor = self.decompose_factor
        if factor != -1 and (isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= 4096):
            raise ValueError(f"decompose_factor must be -1 or a number from 1 to 4096, got {factor!r}")

    def num_params(self, base_config):
        """Closed form from the factorization: W1 (a c, or r (a + c)) plus W2 (b d, or r (b + d))
        per targeted projection."""
        total = 0
        for t in set(self.target_modules):
            (a, c), (b, d), use_w1, use_w2 = kron_shapes(self, *projection_shapes(base_config)[t])
            total += (a * c if use_w1 else self.r * (a + c)) + (b * d if use_w2 else self.r * (b + d))
        return total * base_config.n_layer


class LoKrLinear(LycorisLinear):
    containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    per_adapter = (*LycorisLinear.per_adapter, "rank_dropout_scale")

    def __init__(self, base_layer, route):
        super().__init__(base_layer, route)
        self.rank_dropout_scale = {}

    def create(self, cfg, d_in, d_out):
        (a, c), (b, d), use_w1, use_w2 = kron_shapes(cfg, d_in, d_out)
        w1 = [("lokr_w1", torch.empty(a, c))] if use_w1 else \
            [("lokr_w1_a", torch.empty(a, cfg.r)), ("lokr_w1_b", torch.empty(cfg.r, c))]
        w2 = [("lokr_w2", torch.empty(b, d))] if use_w2 else \
            [("lokr_w2_a", torch.empty(b, cfg.r)), ("lokr_w2_b", torch.empty(cfg.r, d))]
        return w1 + w2

    def add(self, name, cfg, generator=None):
        self.rank_dropout_scale[name] = cfg.rank_dropout_scale
        super().add(name, cfg, generator)  # a failure there is removed whole, this entry too

    def init(self, name, generator):
        # as HF peft's reset_adapter_parameters: W1 (or W1a) at zero, so the update starts at zero
        if name in self.lokr_w1:
            nn.init.zeros_(self.lokr_w1[name].data)
        else:
            nn.init.zeros_(self.lokr_w1_a[name].data)
            _kaiming(self.lokr_w1_b[name].data, generator)
        if name in self.lokr_w2:
            _kaiming(self.lokr_w2[name].data, generator)
        else:
            _kaiming(self.lokr_w2_a[name].data, generator)
            _kaiming(self.lokr_w2_b[name].data, generator)

    def factors(self, name):
        """(W1, W2), each built from its low-rank pair where it is one."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        w2 = self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return w1, w2

    def delta_weight(self, name):
        w1, w2 = self.factors(name)
        return torch.kron(w1, w2.contiguous()) * self.scaling[name]  # HF peft's make_kron

    def plus_delta(self, weight, name):
        return torch.add(weight, torch.kron(*self.factors(name)), alpha=self.scaling[name])  # scaling fused in

    def _rescale_rank_dropout(self, name):
        return self.rank_dropout_scale[name]


register(Method(
    LoKrConfig, plug=lambda model, name, cfg, g: plug_lycoris(LoKrLinear, model, name, cfg, g),
    layers=(LoKrLinear,), mergeable=True, cohort_kind=lycoris_cohort_kind,
    # three factors multiply: at 20 every r <= 32, alpha <= 128 on all six projections still serves
    # finite rows (at 30, r=8 does not); training at lr 0.1 reached 3.3 at most
    max_abs_value=20.0,
    hf_fields=LYCORIS_HF_FIELDS, hf_peft="module", slug="lokr",
    # r=1 on q and v: a full 8 x 8 W1 times a rank-1 W2, each 128 x 128 update up to rank 8 from 96
    # numbers (0.10% of the base). Larger ones learn on a random frozen base too, which would make
    # phi the learner rather than a steer of what the base knows: r=4 on q, k, v, o (rank 32)
    # solved all four tasks there on 5 of 5 seeds, r=1 and r=2 on q, k, v, o most of them on
    # seed 0 (BENCHMARKS.md, "LoRA's family")
    preset=Preset(LoKrConfig(r=1, alpha=8, target_modules=("q", "v")),
                  dict(steps=300, lr=1e-2, batch_size=32))))
