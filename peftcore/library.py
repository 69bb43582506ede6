"""The ready library: one trained phi per downstream task for each PEFT method, shipped
in the repo so the many-tasks page is ready the moment it opens.

Regenerate with `python -m peftcore.library` (a few minutes on 2 cores).
"""
import json
from pathlib import Path

from .peft_model import PeftModel
from .presets import PRESETS
from .serialization import saved_bytes

LIBRARY_DIR = Path(__file__).parent / "library"
METHOD_SLUGS = {"LoRA": "lora", "Adapter": "adapter", "Prompt tuning": "prompt"}


def entries():
    """[(adapter name, directory)] for every shipped phi, e.g. ("lora-add_5", .../lora/add_5)."""
    return [(f"{d.parent.name}-{d.name}", d) for d in sorted(LIBRARY_DIR.glob("*/*")) if d.is_dir()]


def load_library(base, model: PeftModel = None):
    """A PeftModel (a bank) over `base` holding every shipped phi."""
    model = model if model is not None else PeftModel(base)
    for name, d in entries():
        model.load_adapter(d, name)
    return model


def index():
    """name -> {method, task, eval_exact, eval_token, bytes}: what build() measured."""
    path = LIBRARY_DIR / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def build(tasks=None):
    import peftcore
    base = peftcore.load_base()
    measured = {}
    for method, slug in METHOD_SLUGS.items():
        preset = PRESETS[method]
        for task in tasks or peftcore.TASKS:
            model = peftcore.get_peft_model(base, preset.config, seed=0)
            last = peftcore.run(model, task, device="cpu", **preset.train)
            out = model.save_pretrained(LIBRARY_DIR / slug / task)
            measured[f"{slug}-{task}"] = dict(method=method, task=task, eval_exact=last.eval_exact,
                                              eval_token=last.eval_token, bytes=saved_bytes(out))
            print(f"{slug:8s} {task:20s} exact {last.eval_exact:.3f}  {saved_bytes(out):,} bytes", flush=True)
    (LIBRARY_DIR / "index.json").write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    build()
