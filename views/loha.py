"""LoHa as the app shows it."""
import json

import peftcore
from peftcore.base import BASE_META_PATH
from peftcore.methods.loha import LoHaConfig
from peftcore.model import PROJECTIONS, BaseConfig, projection_shapes

from . import Benchmark, Control, MethodView, beside_projections, register_view

BASE = BaseConfig(**json.loads(BASE_META_PATH.read_text())["config"])  # the shipped base's
SHAPES = projection_shapes(BASE)


def rank(cfg):
    """The largest rank its update can reach: r^2 (a Hadamard product of two rank-r matrices),
    at most the smallest targeted projection's full rank."""
    return min(cfg.r ** 2, *(min(SHAPES[t]) for t in cfg.target_modules))


def lesson():
    """The counter-lesson, at the preset's r and at a larger one (numbers computed, not typed)."""
    r, d = peftcore.METHODS["LOHA"].preset.config.r, min(SHAPES["q"])
    big = LoHaConfig(r=8, target_modules=("q",))
    return (f"a counter-lesson to low rank: the elementwise (Hadamard) product of two rank-r matrices can reach rank "
            f"r², not 2r: r = {big.r} reaches rank {rank(big)} of {d} from the parameters of a rank-{2 * big.r} LoRA. "
            f"Few parameters need not mean a low-rank update. The preset keeps r = {r} (rank "
            f"{rank(LoHaConfig(r=r, target_modules=('q',)))}) for a reason measured on the random frozen base "
            "of the pretraining experiment below: from rank 4 on, LoHa learned these tasks on a random frozen base too (BENCHMARKS.md), "
            "so its phi would be learning the task instead of steering what the base already knows.")


def diagram(cfg):
    return beside_projections(cfg, "loha", lambda t: f"(W1a W1b) ⊙ (W2a W2b) ({t})\\nr = {cfg.r}")


register_view(MethodView(
    "LOHA", "LoHa", "#44785a", dash="10px,2px,2px,2px,2px,2px", symbol="hexagram",
    controls=(Control("r", "r (rank of each factor)", "Rank of each of the two low-rank factors; their elementwise "
                      "product can reach rank r². phi grows linearly with r.", 1, 32, 1, link="loha_r"),
              Control("alpha", "alpha", "The update is scaled by alpha / r.", 1, 128, 1, link="loha_alpha"),
              Control("target_modules", "target_modules", "Which projections of every block get a LoHa: attention "
                      "q, k, v, o and MLP up, down.", options=PROJECTIONS, link="loha_target_modules")),
    formulas=(r"h = W x + \frac{\alpha}{r}\,\big( (W_{1a} W_{1b}) \odot (W_{2a} W_{2b}) \big)\, x",
              r"W_{1a}, W_{2a} \in \mathbb{R}^{d_{out} \times r},\quad W_{1b}, W_{2b} \in \mathbb{R}^{r \times d_{in}},"
              r"\quad W_{2b,0} = 0",
              r"\operatorname{rank} \le r^2,\quad |\phi| = 2\,r\,(d_{in} + d_{out}) \text{ per projection}"),
    words="Two low-rank products multiplied entry by entry beside each targeted projection; W stays frozen. One "
          "factor starts at zero, so training starts from exactly the base.",
    diagram=diagram, rank=rank, family="low-rank update", in_default_race=False,
    trains="two pairs of low-rank factors per projection, multiplied entry by entry",
    benchmark=Benchmark(0.4185, "r 32, q and v", 18_350_080),
    lesson=lesson()))
