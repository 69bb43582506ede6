"""Many phi become one: the arithmetic of PeftModel.add_weighted_adapter, torch only.

A method that combines its phi (its registry hook `combine`) hands its tensors here: task
arithmetic (a weighted sum), TIES (Yadav et al., 2023: keep each tensor's largest entries,
elect a sign per entry, average those that agree), DARE (Yu et al., 2023: drop entries at
random, rescale the rest by 1 / density) and magnitude pruning, each as HF peft 0.21.2's
peft/utils/merge_utils.py computes it, so that a merge here equals peft's to the bit; and the
truncated SVD that turns a full update back into a low-rank pair.

What differs from peft on purpose: the random drops of DARE take a torch.Generator (None:
torch's global RNG, which is what peft uses), so that a merge can be repeated.
"""
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Optional

import torch

# HF peft's combination types, in its order. The *_svd forms combine full updates and truncate
# the result to a rank; the others combine low-rank factors or whole phi tensors.
COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
PRUNING = ("ties", "dare_ties", "dare_linear", "magnitude_prune")  # these need a density
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")  # cuSOLVER's: CUDA only, as torch.linalg.svd says


@dataclass(frozen=True)
class MergeOptions:
    """add_weighted_adapter's options, with HF peft 0.21.2's names and defaults."""
    combination_type: str = "svd"
    svd_rank: Optional[int] = None         # the *svd forms' rank; None: the largest source rank
    svd_clamp: Optional[float] = None      # a quantile of |U S| and |Vh| entries to clamp at; None: none
    svd_full_matrices: bool = True
    svd_driver: Optional[str] = None
    density: Optional[float] = None        # the fraction kept by ties, dare_* and magnitude_prune
    majority_sign_method: str = "total"

    def validate(self):
        if self.combination_type not in COMBINATIONS:
            raise ValueError(f"combination_type must be one of {', '.join(COMBINATIONS)}, got {self.combination_type!r}")
        if self.svd_rank is not None and (isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int)
                                          or self.svd_rank < 1):
            raise ValueError(f"svd_rank must be a whole number of at least 1 (or None), got {self.svd_rank!r}")
        if self.svd_clamp is not None and not (_real(self.svd_clamp) and 0 <= self.svd_clamp <= 1):
            raise ValueError(f"svd_clamp is a quantile: a number from 0 to 1 (or None), got {self.svd_clamp!r}")
        if not isinstance(self.svd_full_matrices, bool):
            raise ValueError(f"svd_full_matrices must be true or false, got {self.svd_full_matrices!r}")
        if self.svd_driver not in SVD_DRIVERS:
            raise ValueError(f"svd_driver must be one of {SVD_DRIVERS}, got {self.svd_driver!r}")
        if self.density is not None and not (_real(self.density) and 0 < self.density <= 1):
            raise ValueError(f"density is the fraction of entries kept: a number above 0 and at most 1, got {self.density!r}")
        if self.density is None and self.base_kind in PRUNING:
            raise ValueError(f"combination_type={self.combination_type!r} prunes: give it a density "
                             "(the fraction of entries kept, above 0 and at most 1)")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ValueError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, "
                             f"got {self.majority_sign_method!r}")

    @property
    def base_kind(self):
        """The combination without its truncation: "ties_svd" -> "ties"; "svd", "cat" and
        "linear" are plain weighted sums ("task_arithmetic")."""
        kind = self.combination_type.removesuffix("_svd")
        return "task_arithmetic" if kind in ("svd", "cat", "linear") else kind

    @property
    def truncates(self):
        """Whether it combines full updates and truncates them by an SVD (svd and the *_svd forms)."""
        return self.combination_type.endswith("svd")

    def changed(self, **allowed):
        """{option: value} of the options not at their default (nor at a value in `allowed`)."""
        default = asdict(MergeOptions())
        return {k: v for k, v in asdict(self).items() if v != default[k] and v not in allowed.get(k, ())}


def _real(x):
    """A finite real number (numpy's scalars too), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_weights(adapters, weights):
    """The weights as floats, one finite real number per adapter."""
    weights = list(weights)
    if len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if not all(_real(w) for w in weights):
        raise ValueError(f"weights must be finite real numbers, got {weights!r}")
    return [float(w) for w in weights]


# ------------------------------------------------------------------ pruning
def magnitude_based_pruning(tensor, density):
    """`tensor` with all but its int(density * numel) largest entries (by size) set to zero."""
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    top_k = torch.topk(tensor.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor, density, rescale, generator=None):
    """`tensor` with each entry kept with probability `density` (drawn from `generator`, or
    torch's global RNG when None), divided by `density` when `rescale` (DARE: the same mean)."""
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor, density, method, rescale=False, generator=None):
    """Keep a fraction `density` of `tensor`'s entries: the largest ("magnitude") or a random
    draw ("random"). A density of 1 keeps everything and draws nothing."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be at least 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale, generator)
    raise ValueError(f"unknown pruning method {method!r}")


# ------------------------------------------------------------------ combining
def _weighted(tensors, weights):
    """The stacked tensors times their weights (weights broadcast over each tensor)."""
    weights = weights.view(weights.shape + (1,) * (tensors.dim() - weights.dim()))
    return tensors * weights


def majority_sign_mask(tensors, method="total"):
    """TIES's sign election over stacked tensors: per entry, whether each tensor's sign is the
    one with the larger total ("total") or the larger count ("frequency"); a tie elects +."""
    sign = tensors.sign()
    if method == "total":
        magnitude = tensors.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {method!r}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_merge(tensors, mask):
    """Per entry, the mean of the (weighted) entries whose sign was elected."""
    return (tensors * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors, weights):
    """sum_i weights[i] * tensors[i]."""
    return _weighted(torch.stack(tensors, dim=0), weights).sum(dim=0)


def magnitude_prune(tensors, weights, density):
    """Task arithmetic over each tensor's `density` largest entries."""
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors, weights, density, majority_sign_method="total"):
    """TIES: each tensor's largest entries, a sign elected per entry from the (unweighted)
    pruned tensors, the weighted entries of that sign averaged."""
    stacked = torch.stack([prune(t, density, "magnitude") for t in tensors], dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def dare_linear(tensors, weights, density, generator=None):
    """DARE: task arithmetic over random drops rescaled by 1 / density."""
    return task_arithmetic([prune(t, density, "random", True, generator) for t in tensors], weights)


def dare_ties(tensors, weights, density, majority_sign_method="total", generator=None):
    """DARE's random drops, then TIES's sign election and disjoint mean."""
    stacked = torch.stack([prune(t, density, "random", True, generator) for t in tensors], dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, weights), mask)


def combine(kind, tensors, weights, density=None, majority_sign_method="total", generator=None):
    """One tensor from `tensors` (all one shape) and `weights` (a 1-D tensor) by `kind`:
    "task_arithmetic", "ties", "dare_linear", "dare_ties" or "magnitude_prune" (a
    MergeOptions' base_kind)."""
    if kind == "task_arithmetic":
        return task_arithmetic(tensors, weights)
    if kind == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method, generator)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ValueError(f"unknown combination {kind!r}")


def low_rank(delta, rank, clamp=None, full_matrices=True, driver=None):
    """(A, B) with B A the best rank-`rank` approximation of `delta` (out, in): B = U S and
    A = Vh of its SVD, cut to `rank`, and with `clamp` (a quantile) every entry of both held
    within +-that quantile of their entries, as peft (after kohya-ss's svd_merge_lora)."""
    if rank > min(delta.shape):
        raise ValueError(f"svd_rank {rank} is above the rank a {delta.shape[0]} x {delta.shape[1]} update can have "
                         f"({min(delta.shape)})")
    if driver is not None and delta.device.type != "cuda":
        raise ValueError(f"svd_driver={driver!r} is one of cuSOLVER's: it works only on phi held on a CUDA device "
                         "(leave it None elsewhere)")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B


def energy_kept(delta, rank):
    """The fraction of `delta`'s squared Frobenius norm its best rank-`rank` approximation keeps
    (sum of the top `rank` squared singular values over all of them): 1.0 for a zero update."""
    s2 = torch.linalg.svdvals(delta) ** 2
    total = s2.sum()
    return 1.0 if total == 0 else (s2[:rank].sum() / total).item()
