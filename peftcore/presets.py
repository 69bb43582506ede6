"""Default presets: a config plus a training budget per method, sized for a live demo.

The budgets are steps, not seconds, so what a preset learns does not depend on the
machine's speed; how long it takes does. preset_table.json holds the seconds and machine of
each row (`robustness`); BENCHMARKS.md ("The presets") the figures and the commands.

Each preset was chosen so that its *worst* of 5 seeds (seed = phi's init and the data
order) still shows the lesson, not for one lucky run: `python -m bench.presets --seeds 5`
measures it, and `--write` records the table this module reads back. On the grid base
(pretrain.py) LoRA, the adapter, IA3 and full fine-tuning solve every task but sort on every
seed; prefix tuning the two new digit maps on every seed of 0-9 and each composition on 9 of
those 10; prompt tuning one row on some seeds; no method learns sort in a live budget. The
app shows how often, from the table, and what a longer budget recorded apart (`longer_budget`)
reached.
"""
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .methods.registry import METHODS, Preset  # noqa: F401 - Preset is the type of PRESETS' values


class _Presets(Mapping):
    """peft_type -> Preset of every registered method (each declares its own, in its file)."""

    def __getitem__(self, peft_type):
        return METHODS[peft_type].preset

    def __iter__(self):
        return iter(METHODS)

    def __len__(self):
        return len(METHODS)


PRESETS = _Presets()

SOLVES_AT = 0.9  # held-out exact match from which a seed counts as solving the task in the
                 # recorded table (stop-when-solved, train.SOLVED, asks more: 99% twice in a row)
TABLE_PATH = Path(__file__).parent / "preset_table.json"


def preset_record(method, options=None) -> dict:
    """The preset (with `options` set in its config) as the recorded table stores it, to tell
    a stale row from a current one."""
    preset = PRESETS[method]
    return {"config": replace(preset.config, **(options or {})).to_dict(), "train": dict(preset.train)}


def variant_key(method, options=None) -> str:
    """The table's row of a method's preset with some config options set ("LORA use_dora=true"),
    or of the preset itself (its peft_type)."""
    return " ".join([method] + [f"{k}={json.dumps(v)}" for k, v in sorted((options or {}).items())])


@lru_cache(maxsize=1)
def _table():
    try:
        return json.loads(TABLE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def robustness(method: str, task: str, base: str = "pretrained", options=None) -> Optional[dict]:
    """What `python -m bench.presets --seeds N --write` measured for the preset of the method
    with peft_type `method`
    on `task`, over seeds 0..N-1, or None where nothing was recorded for the preset as it
    is now (a preset changed since the table was written counts as not recorded). `options`:
    a variant of the preset, some config fields set (`bench.presets --config use_dora=true --write`).

    base: "pretrained" or "random base". The dict holds:
      min, median, max   held-out exact match over the seeds (floats in 0..1)
      solved, seeds      how many of the seeds reached exact >= SOLVES_AT, out of how many
      exact, peak, drop  per seed (index = seed): the final exact match, the best one on the
                         way, and the largest fall below the best so far (a knife edge)
      token_min, token_median, token_max, token   held-out token accuracy (token: per seed)
      seconds_median     median wall seconds of one run, on `machine`
      machine            where it was measured (CPU model, cores, torch threads, torch)
      preset             the config and training arguments measured
    e.g. f"solves it in {r['solved']} of {r['seeds']} seeds".
    """
    row = _table().get(base, {}).get(variant_key(method, options), {}).get(task)
    if row is None or method not in PRESETS or not _is_current(row.get("preset"), method, options):
        return None
    return dict(row)


def _is_current(recorded, method, options=None) -> bool:
    """Whether a recorded preset is the method's preset now. Fields a config gained since
    the table was written (LoRA's use_dora) read as their defaults: the same preset."""
    preset = PRESETS[method]
    try:
        now = replace(preset.config, **(options or {}))
        config = {k: v for k, v in recorded["config"].items() if k != "peft_type"}
        return now.from_dict(config) == now and recorded["train"] == dict(preset.train)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def budget_key(base: str, steps: int) -> str:
    """The table's key for a longer budget than the presets' own: `bench.presets --steps N --write`."""
    return f"{base}, {steps} steps"


def longer_budget(method: str, task: str, base: str = "pretrained"):
    """The longest budget recorded beyond the preset's own for the method on `task`, as
    (steps, robustness row), or None. It shows what more steps buy where a live budget
    solves nothing (sort)."""
    pattern = re.escape(base) + r", (\d+) steps"  # budget_key's form
    budgets = sorted((int(m[1]), key) for key in _table() if (m := re.fullmatch(pattern, key)))
    for steps, key in reversed(budgets):
        if row := robustness(method, task, key):
            return steps, row
    return None
