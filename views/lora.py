"""LoRA as the app shows it."""
import math

import peftcore

from peftcore.methods.lora import INITS, OPTIMIZERS
from peftcore.model import PROJECTIONS

from . import Benchmark, Control, MethodView, Variant, beside_projections, register_view


RATIO = peftcore.METHODS["LORA"].preset.config.loraplus_lr_ratio  # LoRA+'s, in the preset
FAMILY = "LoRA's family: rsLoRA, DoRA, inits, LoRA+, LoRA-FA"


def explain(cfg):
    """What the chosen options change, with this config's own numbers."""
    plain = cfg.lora_alpha / cfg.r
    if cfg.use_rslora:
        words = [f"rsLoRA scales B A by α/√r = {cfg.lora_alpha}/√{cfg.r} = {cfg.scaling:.3g}, plain LoRA by "
                 f"α/r = {plain:.3g}: " + ("the same at r = 1; raise r to see them part." if cfg.r == 1 else
                                           f"{math.sqrt(cfg.r):.3g} times plain's at r = {cfg.r}.")]
    else:
        words = [f"B A is scaled by α/r = {cfg.lora_alpha}/{cfg.r} = {plain:.3g}."]
    if cfg.use_dora:
        words.append("DoRA adds a magnitude per output row (d_out numbers per projection): it still merges into W, "
                     "but trains alone, not in a cohort.")
    if cfg.init_lora_weights == "orthogonal":
        words.append("Orthogonal: A and B both start non-zero, yet B A = 0 (they take alternate rows of one "
                     "orthogonal matrix).")
    if cfg.optimizer == "loraplus":
        words.append(f"LoRA+: B learns {cfg.loraplus_lr_ratio:g} times faster than A.")
    elif cfg.optimizer == "lorafa":
        words.append("LoRA-FA: A stays at its random start and only B trains (its gradient projected through A), "
                     "so the trainable count is B's alone; the saved phi still holds A.")
    return " ".join(words)


def diagram(cfg):
    return beside_projections(cfg, "lora", lambda t: f"B A ({t})\\nr = {cfg.r}")


register_view(MethodView(
    "LORA", "LoRA", "#5118fe", dash="solid", symbol="circle",
    controls=(Control("r", "r (rank)", "Rank of the update B A: phi grows linearly with r.", 1, 64, 1),
              Control("lora_alpha", "lora_alpha", "The update is scaled by lora_alpha / r.", 1, 128, 1),
              # pills, not a multiselect: in a column all six stay in view
              Control("target_modules", "target_modules", "Which projections of every block get a LoRA: attention "
                      "q, k, v, o and MLP up, down.", options=PROJECTIONS),
              Control("lora_dropout", "lora_dropout", "Dropout on the LoRA branch's input while training.",
                      0.0, 0.5, 0.05),
              Control("use_rslora", "use_rslora (rsLoRA)", "Scale the update by lora_alpha / sqrt(r) instead of "
                      "lora_alpha / r: the same at r = 1, larger as r grows.", options=(False, True), group=FAMILY),
              Control("use_dora", "use_dora (DoRA)", "Split each output row of W + B A into a trained magnitude and "
                      "a normalised direction.", options=(False, True), group=FAMILY),
              Control("init_lora_weights", "init_lora_weights", "How A and B start; every choice starts from exactly "
                      "the base. PiSSA and OLoRA are not offered: HF peft starts them by writing into W, and here one "
                      "frozen base serves every phi.", options=INITS, one=True,
                      labels=("default (kaiming A, zero B)", "gaussian", "orthogonal (even r)"), group=FAMILY),
              Control("optimizer", "optimizer", "AdamW on A and B; LoRA+ gives B a higher learning rate; LoRA-FA "
                      "freezes A and trains B alone.", options=OPTIMIZERS, one=True,
                      labels=("AdamW", "LoRA+", "LoRA-FA"), group=FAMILY),
              Control("loraplus_lr_ratio", "loraplus_lr_ratio (LoRA+)", "How many times A's learning rate B gets.",
                      1.0, 32.0, 1.0, group=FAMILY)),
    formulas=(r"h = W x + \frac{\alpha}{r}\, B A x",
              r"A \in \mathbb{R}^{r \times d_{in}},\quad B \in \mathbb{R}^{d_{out} \times r},\quad B_0 = 0",
              r"|\phi| = r\,(d_{in} + d_{out}) \text{ per projection}"),
    words="A low-rank update beside each targeted projection; W stays frozen. B starts at zero, so training "
          "starts from exactly the base.",
    diagram=diagram, rank=lambda cfg: cfg.r, explain=explain,
    family="low-rank update", trains="A and B beside each projection",
    # HF peft's figures (views.PEFT_BENCHMARK), from its result files of June 2025 (DoRA: January 2026)
    benchmark=Benchmark(0.4822, "r 32, q and v", 9_175_040),
    variants=(Variant("rsLoRA", {"use_rslora": True}, "A and B, scaled by α/√r (the same as LoRA at the preset's r = 1)",
                      Benchmark(0.5299, "r 64, q and v; plain LoRA at r 64: 48.9%", 18_350_080)),
              Variant("DoRA", {"use_dora": True}, "A, B and a magnitude per output row",
                      Benchmark(0.4943, "r 32, q and v", 9_289_728)),
              Variant("LoRA+", {"optimizer": "loraplus"}, f"A, and B at {RATIO:g} times A's learning rate",
                      why=f"at the preset's learning rate, B's is {RATIO:g} times it: on the two new digit maps most "
                          "seeds overshoot and end near chance (HF peft's docs pair LoRA+ with a lower learning "
                          "rate); the two compositions of skills the base knows still solve on every seed."),
              Variant("LoRA-FA", {"optimizer": "lorafa"}, "B only: A stays at its random start",
                      Benchmark(0.4299, "r 32, q and v", 3_670_016),
                      why="at the preset's rank 1, a frozen random A gives each projection one fixed input "
                          "direction to read: enough to recombine what the base knows (the compositions solve), "
                          "not to make the new digit maps in 300 steps."))))
