"""Prefix tuning as the app shows it."""
from . import PHI_EDGE, Control, Diagram, MethodView, phi_node, register_view


def diagram(cfg):
    return Diagram((phi_node("prefix", f"P_K, P_V: {cfg.num_virtual_tokens} virtual keys\\nand values, every layer"),
                    f'prefix -> attn {PHI_EDGE};'))


register_view(MethodView(
    "PREFIX_TUNING", "Prefix tuning", "#0098ff", dash="longdashdot", symbol="cross",
    controls=(Control("num_virtual_tokens", "num_virtual_tokens", "How many trainable keys and values go in front "
                      "of every layer's attention.", 1, 64, 1, link="prefix_num_virtual_tokens"),),
    formulas=(r"K' = [\,P_K\,;\, W_k x\,],\quad V' = [\,P_V\,;\, W_v x\,] \text{ in every layer}",
              r"P_K, P_V \in \mathbb{R}^{n \times d}",
              r"|\phi| = 2\, n\, d \text{ per block}"),
    words="Trainable keys and values in front of every layer's attention: deep prompts. Prompt tuning changes only "
          "what the first layer reads; a prefix steers every layer.",
    diagram=diagram,
    lesson="a prompt in every layer, and what steering cannot do. A soft prompt is read by the first layer only; "
           "a prefix hands every layer keys and values to attend to. Both only add to what the frozen base's "
           "attention reads, never change its weights. For a mix of skills the base has (a composition) that "
           "can be enough for both. A new digit map is where they part: a prompt, read once at the input, "
           "rarely builds one on a base this small, while a prefix adds a learned term to every layer's "
           "attention output, and stacked over the layers those terms can make the map. The rows say how "
           "often each solves each task over 5 seeds; compare them with LoRA's and IA3's, which change the "
           "base's projections themselves."))
