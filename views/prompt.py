"""Prompt tuning as the app shows it."""
from . import Control, Diagram, MethodView, phi_node, register_view


def diagram(cfg):
    return Diagram((phi_node("P", f"P: {cfg.num_virtual_tokens} virtual tokens"),
                    'P -> x [color="#e65100", label="prepended"];'))


register_view(MethodView(
    "PROMPT_TUNING", "Prompt tuning", "#772500", dash="longdash", symbol="x",
    controls=(Control("num_virtual_tokens", "num_virtual_tokens", "How many trainable embeddings go in front of the "
                      "input.", 1, 64, 1, link="num_virtual_tokens"),),
    formulas=(r"X' = [\,P\,;\, E(x)\,]", r"P \in \mathbb{R}^{n \times d}", r"|\phi| = n\, d"),
    words="n trainable embeddings in front of the input: the model is untouched, only what it reads changes.",
    diagram=diagram,
    never_solves="A soft prompt steers the frozen model only through its input, and on a model this small that is "
                 "rarely enough: in Lester et al. (2021) prompt tuning caught up with full fine-tuning only at "
                 "billions of parameters."))
