"""The ready library: one trained phi per downstream task for each PEFT method (every
registered method that shares the base), shipped
in the repo so the many-tasks page is ready the moment it opens.

Regenerate with `python -m peftcore.library` (about 4 minutes on one core of the 2-core
Xeon in BENCHMARKS.md), after `python -m bench.presets --seeds 5 --jobs 2 --write`.

Each phi is its method's preset trained with one seed: the first seed that solved the task
in the recorded 5-seed table (peftcore/preset_table.json), else seed 0. index.json records
that seed, what the shipped phi scores, and the table's row (worst / median / best seed and
how many solved), so a fragile row reads as fragile, not as one lucky run.
"""
import json
from pathlib import Path

from .methods import registry
from .peft_model import PeftModel
from .presets import SOLVES_AT, robustness
from .serialization import AdapterLoadError, saved_bytes

LIBRARY_DIR = Path(__file__).parent / "library"


def method_slugs():
    """peft_type -> slug (the folder and the phi names' prefix) of every method in the library."""
    return {t: registry.METHODS[t].slug for t in registry.bankable()}


def entries():
    """[(adapter name, directory)] for every shipped phi, e.g. ("lora-times_3", .../lora/times_3)."""
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


def _library_seed(table):
    """The first seed that solved the task in the recorded table, else 0."""
    solving = [s for s, exact in enumerate(table["exact"]) if exact >= SOLVES_AT] if table else []
    return solving[0] if solving else 0


def build(tasks=None, methods=None):
    """Train and save the library's phi (every bankable method, or those of `methods`:
    peft_types), keeping the index's rows of the others."""
    import peftcore
    base = peftcore.load_base()
    index = LIBRARY_DIR / "index.json"
    measured = json.loads(index.read_text()) if methods and index.exists() else {}
    for method, slug in method_slugs().items():
        if methods and method not in methods:
            continue
        preset = registry.METHODS[method].preset
        for task in tasks or peftcore.TASKS:
            table = robustness(method, task)
            seed = _library_seed(table)
            model = peftcore.get_peft_model(base, preset.config, seed=seed)
            last = peftcore.run(model, task, device="cpu", seed=seed, **preset.train)
            out = model.save_pretrained(LIBRARY_DIR / slug / task)
            measured[f"{slug}-{task}"] = dict(
                method=method, task=task, seed=seed, eval_exact=last.eval_exact, eval_token=last.eval_token,
                bytes=saved_bytes(out),
                seeds=None if table is None else {k: table[k] for k in ("min", "median", "max", "solved", "seeds")})
            print(f"{slug:8s} {task:20s} seed {seed} exact {last.eval_exact:.3f}  {saved_bytes(out):,} bytes",
                  flush=True)
    # what each shipped phi reached, for the record (tests check the files still do)
    index.write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    import sys

    import torch
    torch.set_num_threads(1)  # as the recorded table was measured: the same rounding, the same seed outcome
    build(methods=sys.argv[1:] or None)  # python -m peftcore.library [PEFT_TYPE ...]
