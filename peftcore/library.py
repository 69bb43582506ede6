"""The ready library: one trained phi per downstream task for each PEFT method, shipped
in the repo so the many-tasks page is ready the moment it opens.

Regenerate with `python -m peftcore.library` (a few minutes on 2 cores).
"""
import json
from pathlib import Path

from .peft_model import PeftModel
from .presets import PRESETS
from .serialization import AdapterLoadError, saved_bytes

LIBRARY_DIR = Path(__file__).parent / "library"
METHOD_SLUGS = {"LoRA": "lora", "Adapter": "adapter", "Prompt tuning": "prompt"}


def entries():
    """[(adapter name, directory)] for every shipped phi, e.g. ("lora-add_5", .../lora/add_5)."""
    return [(f"{d.parent.name}-{d.name}", d) for d in sorted(LIBRARY_DIR.glob("*/*")) if d.is_dir()]


def load_library(base):
    """(bank, errors): a PeftModel over `base` holding every shipped phi that loads, and a
    message for each one that does not (skipped, never fatal)."""
    model, errors = PeftModel(base), []
    for name, d in entries():
        try:
            model.load_adapter(d, name)
        except (AdapterLoadError, OSError) as e:
            errors.append(f"{name}: {e}")
    return model, errors


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
    # what each shipped phi reached, for the record (tests check the files still do)
    (LIBRARY_DIR / "index.json").write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    build()
