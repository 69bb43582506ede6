"""VeRA as the app shows it."""
from peftcore.model import PROJECTIONS

from . import Benchmark, Control, MethodView, beside_projections, register_view


def diagram(cfg):
    return beside_projections(cfg, "vera", lambda t: f"Λb B Λd A ({t})\\nr = {cfg.r}")


register_view(MethodView(
    "VERA", "VeRA", "#420056", dash="2px,2px,8px,2px", symbol="hourglass",
    controls=(Control("r", "r (rank)", "Rows of the shared random A (columns of B). Only r numbers per projection "
                      "train for it (lambda_d), so r can be far higher than a LoRA's.", 1, 512, 1, link="vera_r"),
              Control("target_modules", "target_modules", "Which projections of every block get VeRA's two vectors: "
                      "attention q, k, v, o and MLP up, down.", options=PROJECTIONS, link="vera_target_modules")),
    formulas=(r"h = W x + \Lambda_b\, B\, \Lambda_d\, A\, x",
              r"A \in \mathbb{R}^{r \times d_{in}},\ B \in \mathbb{R}^{d_{out} \times r} \text{ frozen, random, shared};"
              r"\quad \Lambda_b = \mathrm{diag}(b),\ \Lambda_d = \mathrm{diag}(d),\ b_0 = 0",
              r"|\phi| = r + d_{out} \text{ per projection}"),
    words="One pair of frozen random matrices, A and B, drawn once from a seed and shared by every layer; only two "
          "scaling vectors per targeted projection train (d scales A's r rows, b scales the output). b starts at "
          "zero, so training starts from exactly the base. Since A and B come from the seed, a file needs only the "
          "vectors: the smallest phi of the LoRA family.",
    diagram=diagram, rank=lambda cfg: cfg.r, family="low-rank update", in_default_race=False,
    trains="two vectors per projection; A and B are frozen, random, drawn from a seed",
    benchmark=Benchmark(0.3685, "r 256, q and v", 129_024),
    lesson="a low-rank update whose matrices are not learned at all: random, frozen and shared, with only a scale "
           "per row and per output trained. Compare its phi % with LoRA's at the same r, and how high an r and a "
           "learning rate it needs to learn the same task."))
