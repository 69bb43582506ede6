"""The ready library: one trained phi per downstream task for each PEFT method, shipped
in the repo so the many-tasks page is ready the moment it opens.

Regenerate with `python -m peftcore.library` (a few minutes on 2 cores).
"""
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


def build(tasks=None):
    import peftcore
    base = peftcore.load_base()
    for method, slug in METHOD_SLUGS.items():
        preset = PRESETS[method]
        for task in tasks or peftcore.TASKS:
            model = peftcore.get_peft_model(base, preset.config)
            last = peftcore.run(model, task, device="cpu", **preset.train)
            out = model.save_pretrained(LIBRARY_DIR / slug / task)
            print(f"{slug:8s} {task:20s} exact {last.eval_exact:.3f}  {saved_bytes(out):,} bytes", flush=True)


if __name__ == "__main__":
    build()
