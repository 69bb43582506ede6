"""Bottleneck adapters as the app shows them."""
from peftcore.methods.adapter import SUBLAYERS

from . import PHI_EDGE, Control, Diagram, MethodView, phi_node, register_view


# where each sublayer's adapter goes in the block diagram: (its node, the sublayer's last node, its add)
PLACES = {"attn": ("ad1", "o", "add1"), "mlp": ("ad2", "down", "add2")}


def diagram(cfg):
    label = f"adapter\\nd→{cfg.bottleneck_size}→d"
    places = [PLACES[sub] for sub in cfg.target_sublayers]
    return Diagram(tuple(phi_node(node, label) for node, _, _ in places)
                   + tuple(f"{out} -> {node} {PHI_EDGE}; {node} -> {add} {PHI_EDGE};" for node, out, add in places),
                   skip=frozenset((out, add) for _, out, add in places))


register_view(MethodView(
    "BOTTLENECK_ADAPTER", "Adapter", "#ae8a9e", dash="dot", symbol="diamond",
    not_in_hf_peft="HF peft has no bottleneck adapter: Houlsby-style adapters live in the separate `adapters` "
                   "library (AdapterHub), whose bottleneck configs (`SeqBnConfig`, `DoubleSeqBnConfig`) are the nearest to this one.",
    controls=(Control("bottleneck_size", "bottleneck_size", "Width of the adapter's bottleneck: d -> b -> d after "
                      "each adapted sublayer.", 1, 128, 1),
              Control("target_sublayers", "target_sublayers", "Which sublayers of every block get an adapter: the "
                      "MLP only (Pfeiffer et al.), or the attention too (Houlsby et al.).", options=SUBLAYERS,
                      link="adapter_target_sublayers")),
    formulas=(r"h \leftarrow h + W_{up}\, \mathrm{GELU}(W_{down}\, h)",
              r"W_{down} \in \mathbb{R}^{b \times d},\quad W_{up} \in \mathbb{R}^{d \times b},\quad W_{up,0} = 0",
              r"|\phi| = s\,(2 d b + b + d) \text{ per block, } s \text{ adapted sublayers}"),
    words="A small bottleneck MLP added to a sublayer's output in every block: after the MLP only (Pfeiffer et al.; "
          "the preset), or after the attention too (Houlsby et al.; target_sublayers=(\"attn\", \"mlp\")).",
    diagram=diagram))
