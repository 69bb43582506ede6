"""LoRA as the app shows it."""
from peftcore.model import PROJECTIONS

from . import AROUND, PHI_EDGE, Control, Diagram, MethodView, phi_node, register_view


def diagram(cfg):
    lines = []
    for t in cfg.target_modules:
        before, after = AROUND[t]
        lines += [phi_node(f"lora_{t}", f"B A ({t})\\nr = {cfg.r}"),
                  f"{before} -> lora_{t} {PHI_EDGE}; lora_{t} -> {after} {PHI_EDGE};"]
    return Diagram(tuple(lines))


register_view(MethodView(
    "LORA", "LoRA", "#2d0ff0", dash="solid", symbol="circle",
    controls=(Control("r", "r (rank)", "Rank of the update B A: phi grows linearly with r.", 1, 64, 1),
              Control("lora_alpha", "lora_alpha", "The update is scaled by lora_alpha / r.", 1, 128, 1),
              # pills, not a multiselect: in a column all six stay in view
              Control("target_modules", "target_modules", "Which projections of every block get a LoRA: attention "
                      "q, k, v, o and MLP up, down.", options=PROJECTIONS),
              Control("lora_dropout", "lora_dropout", "Dropout on the LoRA branch's input while training.",
                      0.0, 0.5, 0.05)),
    formulas=(r"h = W x + \frac{\alpha}{r}\, B A x",
              r"A \in \mathbb{R}^{r \times d_{in}},\quad B \in \mathbb{R}^{d_{out} \times r},\quad B_0 = 0",
              r"|\phi| = r\,(d_{in} + d_{out}) \text{ per projection}"),
    words="A low-rank update beside each targeted projection; W stays frozen. B starts at zero, so training "
          "starts from exactly the base.",
    diagram=diagram, rank=lambda cfg: cfg.r))
