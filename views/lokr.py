"""LoKr as the app shows it."""
import peftcore
from peftcore.methods.lokr import LoKrConfig, kron_shapes, rank_bound
from peftcore.model import PROJECTIONS

from . import Benchmark, Control, MethodView, beside_projections, register_view
from .loha import BASE, SHAPES


def rank(cfg):
    """The largest rank its update can reach, rank(W1) rank(W2), on the smallest targeted
    projection: full rank once W2 is a full matrix (r at least half its larger side)."""
    return min(rank_bound(cfg, *SHAPES[t]) for t in cfg.target_modules)


def _full_at(d):
    """The smallest r at which W2 is a full matrix on a d x d projection, as a config on it."""
    r = next(r for r in range(1, d + 1) if kron_shapes(LoKrConfig(r=r), d, d)[3])
    return LoKrConfig(r=r, target_modules=("q",))


D = min(SHAPES["q"])
(A, C), (B, D2), _, _ = kron_shapes(LoKrConfig(), D, D)  # the factors' shapes do not depend on r
FULL = _full_at(D)
PRESET = peftcore.METHODS["LOKR"].preset.config


def diagram(cfg):
    def label(t):
        (a, c), (b, d), _, use_w2 = kron_shapes(cfg, *SHAPES[t])
        return f"W1 ⊗ W2 ({t})\\n{a}×{c} ⊗ {b}×{d}" + ("" if use_w2 else f", rank {cfg.r}")
    return beside_projections(cfg, "lokr", label)


register_view(MethodView(
    "LOKR", "LoKr", "#695370", dash="6px,2px,6px,6px", symbol="bowtie",
    controls=(Control("r", "r (rank of W2)", "Rank of the larger Kronecker factor W2 while r is below half its "
                      "larger side; from there W2 is a full matrix and the update can reach full rank.", 1, 32, 1,
                      link="lokr_r"),
              Control("alpha", "alpha", "The update is scaled by alpha / r.", 1, 128, 1, link="lokr_alpha"),
              Control("target_modules", "target_modules", "Which projections of every block get a LoKr: attention "
                      "q, k, v, o and MLP up, down.", options=PROJECTIONS, link="lokr_target_modules")),
    formulas=(r"h = W x + \frac{\alpha}{r}\,(W_1 \otimes W_2)\, x,\quad d_{out} = a\,b,\ d_{in} = c\,d",
              r"W_1 \in \mathbb{R}^{a \times c},\ W_{1,0} = 0,\quad W_2 = W_{2a} W_{2b} \in \mathbb{R}^{b \times d}"
              r"\ (\text{rank } r \text{ while } r < \max(b, d)/2)",
              r"\operatorname{rank}(W_1 \otimes W_2) = \operatorname{rank} W_1 \cdot \operatorname{rank} W_2,\quad"
              r"|\phi| = a c + r\,(b + d) \text{ per projection}"),
    words=f"A Kronecker product of two small matrices beside each targeted projection: a {D} × {D} update from a "
          f"W1 of {A} × {C} and a W2 of {B} × {D2}. W1 starts at zero, so training starts from exactly the base; full rank "
          f"is possible.",
    diagram=diagram, rank=rank, family="low-rank update", in_default_race=False,
    trains="two Kronecker factors per projection (the larger one low-rank)",
    benchmark=Benchmark(0.3601, "r 32, q and v", 279_552),
    lesson=f"a counter-lesson to low rank: a Kronecker product multiplies ranks, so a W1 of {A} × {C} and a W2 of "
           f"rank r reach rank {min(A, C)} r on a {D} × {D} projection, and once W2 is full (r ≥ {FULL.r}) the update can "
           f"have full rank, {rank(FULL)}, from {FULL.num_params(BASE) // BASE.n_layer:,} numbers where a rank-{D} "
           f"LoRA needs {2 * D * D:,}. The preset's r = {PRESET.r} reaches rank {rank(PRESET)} from "
           f"{PRESET.num_params(BASE) // BASE.n_layer // len(PRESET.target_modules):,} numbers per projection (a "
           f"LoRA of that rank needs {2 * D * rank(PRESET):,}). Few parameters need not mean a low-rank update. The "
           "preset stays on q and v for a reason measured on the random frozen base of the pretraining experiment below: on q, k, v and o "
           "LoKr learned these tasks on a random frozen base too (BENCHMARKS.md), so its phi would be learning the "
           "task instead of steering what the base already knows."))
