"""Each method really learns within its default preset's budget (on CPU), and pretraining
matters. Budgets are steps, not seconds: the results do not depend on machine speed.
The thresholds sit a little below what bench/presets.py measured (BENCHMARKS.md)."""
import functools

import pytest

import peftcore
from peftcore.presets import PRESETS

# (method, task) -> (min held-out exact match, min held-out token accuracy)
EXPECTED = {}


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


@pytest.mark.parametrize("method", ["LoRA", "Adapter", "Prompt tuning"])
def test_pretraining_matters(method):
    """The same phi on a randomly initialised frozen base learns clearly less."""
    task = RANDOM_BASE_TASK[method]
    pretrained, random = result(method, task), result(method, task, random_base=True)
    assert random[1] < pretrained[1] - 0.2, (pretrained, random)
    assert random[0] <= 0.05
