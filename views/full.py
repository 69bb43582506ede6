"""Full fine-tuning, the baseline, as the app shows it."""
from . import BLOCK, Diagram, MethodView, register_view

WEIGHTS = frozenset(n for n, _ in BLOCK if n not in ("x", "out", "add1", "add2")) | {"k", "v"}

register_view(MethodView(
    "FULL", "Full fine-tuning", "#222222", dash="dash", symbol="square",
    not_in_hf_peft="Full fine-tuning needs no PEFT library: every weight trains, as a plain training loop (or "
                   "transformers' `Trainer`) does on the whole model.",
    formulas=(r"\theta \leftarrow \theta - \eta\, \nabla_\theta \mathcal{L}(\theta)", r"|\phi| = |\theta|"),
    words="Every weight trains: a whole new model per task.",
    diagram=lambda cfg: Diagram(phi=WEIGHTS),
    note="Every weight trains, on a private copy of the base: the baseline PEFT is measured against."))
