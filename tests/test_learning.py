"""Each method really learns within its default preset's budget (on CPU), and pretraining
matters. Budgets are steps, not seconds: the results do not depend on machine speed.
The thresholds sit a little below what bench/presets.py measured (BENCHMARKS.md)."""
import functools

import pytest

import peftcore
from peftcore.presets import PRESETS

# (method, task) -> (min held-out exact match, min held-out token accuracy). Where a method
# does not solve a task within budget, the token accuracy it does reach is still checked;
# an untrained phi sits near 0.2. Prompt tuning learns only rotate_right_add_2 here: the
# other new tasks need a new digit map, and a soft prompt can only steer what the frozen
# base already computes (Lester et al. find prompt tuning catches up only at billions of
# parameters). That lesson is shown in the app, not asserted away.
SOLVED = (0.9, 0.95)
EXPECTED = {
    ("LoRA", "add_5"): SOLVED, ("LoRA", "complement"): SOLVED, ("LoRA", "reverse_add_1"): SOLVED,
    ("LoRA", "rotate_right_add_2"): SOLVED, ("LoRA", "sort"): (0.0, 0.5),
    ("Adapter", "add_5"): SOLVED, ("Adapter", "complement"): SOLVED, ("Adapter", "reverse_add_1"): (0.0, 0.7),
    ("Adapter", "rotate_right_add_2"): SOLVED, ("Adapter", "sort"): (0.0, 0.45),
    ("Prompt tuning", "rotate_right_add_2"): SOLVED,
    ("Full fine-tuning", "add_5"): SOLVED, ("Full fine-tuning", "complement"): SOLVED,
    ("Full fine-tuning", "reverse_add_1"): SOLVED, ("Full fine-tuning", "rotate_right_add_2"): (0.0, 0.8),
    ("Full fine-tuning", "sort"): (0.0, 0.65),
}

# method -> task where the same phi on a random frozen base must lose at least half the exact match
RANDOM_BASE = {"LoRA": "add_5", "Adapter": "add_5", "Prompt tuning": "rotate_right_add_2"}


@functools.lru_cache(maxsize=None)
def result(method, task, random_base=False):
    base = peftcore.random_base() if random_base else peftcore.load_base()
    preset = PRESETS[method]
    model = peftcore.get_peft_model(base, preset.config, seed=0)
    last = peftcore.run(model, task, device="cpu", **preset.train)
    return last.eval_exact, last.eval_token, model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method, task", list(EXPECTED), ids="-".join)
def test_preset_learns(method, task):
    exact, token, _ = result(method, task)
    min_exact, min_token = EXPECTED[method, task]
    assert exact >= min_exact and token >= min_token, (exact, token)


def test_phi_sizes_of_the_presets(base):
    n = sum(p.numel() for p in base.parameters())
    for method, limit in [("LoRA", 0.01), ("Prompt tuning", 0.01), ("Adapter", 0.05)]:
        assert PRESETS[method].config.num_params(base.config) <= limit * n, method


def test_lora_reaches_90_percent_of_full_fine_tuning_on_3_of_4_tasks():
    tasks = [t for t in peftcore.TASKS if t != "sort"]
    close = [t for t in tasks if result("LoRA", t)[0] >= 0.9 * result("Full fine-tuning", t)[0]]
    assert len(close) >= 3, close


@pytest.mark.parametrize("method", list(RANDOM_BASE))
def test_pretraining_matters(method):
    """The same phi on a randomly initialised frozen base learns clearly less."""
    task = RANDOM_BASE[method]
    pretrained, random = result(method, task), result(method, task, random_base=True)
    assert random[0] <= pretrained[0] - 0.5, (pretrained, random)
