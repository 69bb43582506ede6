"""Bottleneck adapters as the app shows them."""
from . import PHI_EDGE, Control, Diagram, MethodView, phi_node, register_view


def diagram(cfg):
    label = f"adapter\\nd→{cfg.bottleneck_size}→d"
    return Diagram((phi_node("ad1", label), phi_node("ad2", label),
                    f"o -> ad1 {PHI_EDGE}; ad1 -> add1 {PHI_EDGE}; down -> ad2 {PHI_EDGE}; ad2 -> add2 {PHI_EDGE};"),
                   skip=frozenset({("o", "add1"), ("down", "add2")}))


register_view(MethodView(
    "BOTTLENECK_ADAPTER", "Adapter", "#2ca02c",
    controls=(Control("bottleneck_size", "bottleneck_size", "Width of the adapter's bottleneck: d -> b -> d after "
                      "each sublayer.", 1, 128, 1),),
    formulas=(r"h \leftarrow h + W_{up}\, \mathrm{GELU}(W_{down}\, h)",
              r"W_{down} \in \mathbb{R}^{b \times d},\quad W_{up} \in \mathbb{R}^{d \times b},\quad W_{up,0} = 0",
              r"|\phi| = 2\,(2 d b + b + d) \text{ per block}"),
    words="A small bottleneck MLP after the attention and after the MLP of every block.",
    diagram=diagram))
