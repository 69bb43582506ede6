"""IA3 as the app shows it."""
from peftcore.model import PROJECTIONS

from . import AROUND, PHI_EDGE, Control, Diagram, MethodView, phi_node, register_view


def diagram(cfg):
    """A vector l beside each target: before it where it scales the input, after it otherwise."""
    lines, skip = [], set()
    for t in cfg.target_modules:
        before, after = AROUND[t]
        a, b = (before, t) if t in cfg.feedforward_modules else (t, after)
        lines += [phi_node(f"ia3_{t}", f"× l ({t} {'input' if a == before else 'output'})"),
                  f"{a} -> ia3_{t} {PHI_EDGE}; ia3_{t} -> {b} {PHI_EDGE};"]
        skip.add((a, b))
    return Diagram(tuple(lines), skip=frozenset(skip))


register_view(MethodView(
    "IA3", "IA3", "#84941c", dash="dashdot", symbol="triangle-up",
    controls=(Control("target_modules", "target_modules", "Which projections of every block get a learned vector "
                      "that rescales them.", options=PROJECTIONS, link="ia3_target_modules"),
              Control("feedforward_modules", "feedforward_modules", "Of those, the ones whose input is rescaled (the "
                      "MLP's hidden activation, for down) instead of their output.", options=PROJECTIONS)),
    formulas=(r"k = l_k \odot W_k x,\quad v = l_v \odot W_v x",
              r"h = W_{down}\,\big(l_{ff} \odot \mathrm{GELU}(W_{up} x)\big)",
              r"l \in \mathbb{R}^{d},\quad l_0 = 1,\quad |\phi| = d_k + d_v + d_{ff} \text{ per block}"),
    words="Learned vectors that rescale the keys, the values and the MLP's hidden activation: no new matrix at "
          "all. They start at one, so training starts from exactly the base, and they fold into W.",
    diagram=diagram,
    lesson="the smallest phi here (see its phi %): a vector per scaled projection, no matrix at all. Compare "
           "its rows and its size with LoRA's."))
