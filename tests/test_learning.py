"""Each method really learns within its default preset's budget (on CPU; a run stops once
solved, as the live demo does), and pretraining matters. Budgets are steps, not seconds: the results do not depend on machine speed.

Float rounding differs between CPUs and thread counts, and a run that sits on a knife edge
on one machine falls the other way on another. So each claim here is one that held for
every one of 5 seeds in `python -m bench.presets --seeds 5` (peftcore/preset_table.json)
and on torch's AVX2 kernels too (BENCHMARKS.md), asserted with a margin; a row that
depends on the seed (prefix tuning's compositions, prompt tuning) is not asserted run by run:
the recorded table says how often it solves, and a test checks that the table is current.

Every floor (a method solves a task) is trained here, live. A ceiling (a run stays low) and a
random base's gap are asserted for every method from the recorded table, over 5 seeds and
more strictly than one run could be; live, one run of each kind checks that today's code
still stays low (full fine-tuning on sort, prompt tuning on a new digit map) and that the
random base is random (LoRA's): those runs train their whole budget, and one per kind keeps
the suite short.
The runs go two at a time in worker processes (one torch thread each), started as soon
as the module's first test asks.
"""
import concurrent.futures as cf
import multiprocessing as mp
import os

import pytest
import torch

import peftcore
from bench.presets import one_run
from peftcore.presets import PRESETS, SOLVES_AT, longer_budget, robustness

SEED = 0
NEW_MAPS = ("times_3", "complement")
COMPOSITIONS = ("reverse_add_1", "rotate_right_add_2")
# (method, task): held-out exact match at least this. Every seed of 5 solved it, on both kernel
# sets: the lesson holds for every student, whatever the seed.
SOLVES = {
    **{(m, t): 0.9 for m in ("LORA", "BOTTLENECK_ADAPTER", "FULL", "IA3") for t in NEW_MAPS + COMPOSITIONS},
    # prefix tuning: the new maps, every seed of 0-9 at 0.96 or more. Its compositions solve
    # seeds 0-4 but not 6 and 8 (BENCHMARKS.md): not asserted run by run
    **{("PREFIX_TUNING", t): 0.85 for t in NEW_MAPS},
}
# (method, task): held-out exact match at most this. Sorting is a new algorithm, not a mix of
# the skills the base learned: no method solves it in a live budget. A soft prompt can only
# steer what the frozen base computes, so it cannot make a new digit map. A run's ceiling sits
# far below SOLVES_AT and above every recorded seed by 0.2 (or by half the ceiling, if less).
STAYS_LOW = {("LORA", "sort"): 0.7, ("BOTTLENECK_ADAPTER", "sort"): 0.5, ("FULL", "sort"): 0.7,
             ("PROMPT_TUNING", "times_3"): 0.1}
STAYS_LOW_LIVE = [("FULL", "sort"), ("PROMPT_TUNING", "times_3")]  # the rest: the recorded table only
# Checked in the recorded table only (no run here): every method's best seed on sort, far
# from solved (the best, full fine-tuning, reaches 0.33 on one seed).
RECORDED_LOW = {**{(m, "sort"): 0.6 for m in PRESETS}, ("PROMPT_TUNING", "complement"): 0.05}
# method -> (task, how much lower the same phi scores on a random frozen base, and on what).
# Prompt tuning solves reverse_add_1 on some seeds only, so its gap is in token accuracy.
RANDOM_BASE = {"LORA": ("times_3", "exact", 0.8), "BOTTLENECK_ADAPTER": ("times_3", "exact", 0.8),
               "IA3": ("complement", "exact", 0.8), "PREFIX_TUNING": ("reverse_add_1", "exact", 0.8),
               "PROMPT_TUNING": ("reverse_add_1", "token", 0.25)}
RANDOM_BASE_LIVE = ["LORA"]  # the rest: the recorded table only
RANDOM_BASE_CEILING = 0.1  # a random frozen base: below this exact match on every task, every seed

# As the live demo does: a run stops at its first held-out exact match >= SOLVES_AT. Every
# claim above is a floor such a run meets when it stops, or a ceiling that a run stopping there
# would already break; a run that never solves trains its whole budget.
STOP_WHEN_SOLVED = dict(stop_when_solved=True)

_executor = None
_futures = {}


def _runs_of(item):
    """The (method, task, random base) runs a collected test of this module needs."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    name = getattr(item, "originalname", item.name)
    if name in ("test_preset_solves", "test_preset_stays_low"):
        return [(params["method"], params["task"], False)]
    if name == "test_pretraining_matters":
        task = RANDOM_BASE[params["method"]][0]
        return [(params["method"], task, False), (params["method"], task, True)]
    if name == "test_lora_matches_full_fine_tuning_on_every_task_but_sort":
        return [(m, t, False) for m in ("LORA", "FULL") for t in NEW_MAPS + COMPOSITIONS]
    return []


def _submit(key):
    global _executor
    if _executor is None:
        jobs = max(1, min(2, os.cpu_count() or 1))
        _executor = cf.ProcessPoolExecutor(jobs, mp.get_context("spawn"), initializer=torch.set_num_threads,
                                           initargs=(1,))
    if key not in _futures:
        method, task, random_base = key
        _futures[key] = _executor.submit(one_run, (method, task, SEED, random_base, {}, STOP_WHEN_SOLVED))
    return _futures[key]


@pytest.fixture(scope="module", autouse=True)
def _runs_in_parallel(request):
    """Start every run the selected tests of this module need, in test order, so both
    cores work while the first tests wait for their results."""
    for item in request.session.items:
        if item.module is request.module:
            for key in _runs_of(item):
                _submit(key)
    yield
    if _executor is not None:
        _executor.shutdown(cancel_futures=True)


def result(method, task, random_base=False):
    """dict(exact, token, ...) of the preset's run with SEED (see bench.presets.one_run)."""
    return _submit((method, task, random_base)).result()


@pytest.mark.parametrize("method, task", list(SOLVES), ids=[f"{m} {t}" for m, t in SOLVES])
def test_preset_solves(method, task):
    r = result(method, task)
    assert r["exact"] >= SOLVES[method, task], r


@pytest.mark.parametrize("method, task", STAYS_LOW_LIVE, ids=[f"{m} {t}" for m, t in STAYS_LOW_LIVE])
def test_preset_stays_low(method, task):
    r = result(method, task)
    assert r["exact"] <= STAYS_LOW[method, task], r


@pytest.mark.parametrize("method", RANDOM_BASE_LIVE)
def test_pretraining_matters(method):
    """The same phi on a randomly initialised frozen base learns clearly less."""
    task, metric, gap = RANDOM_BASE[method]
    pretrained, random = result(method, task), result(method, task, random_base=True)
    assert random[metric] <= pretrained[metric] - gap, (pretrained, random)


def test_lora_matches_full_fine_tuning_on_every_task_but_sort():
    for task in NEW_MAPS + COMPOSITIONS:
        lora, full = result("LORA", task), result("FULL", task)
        assert lora["exact"] >= 0.9 * full["exact"], (task, lora, full)


def test_phi_sizes_of_the_presets(base):
    n = sum(p.numel() for p in base.parameters())
    for method, limit in [("LORA", 0.01), ("PROMPT_TUNING", 0.01), ("BOTTLENECK_ADAPTER", 0.05), ("IA3", 0.01),
                          ("PREFIX_TUNING", 0.05)]:
        assert PRESETS[method].config.num_params(base.config) <= limit * n, method


def test_the_recorded_table_is_current_and_backs_these_claims():
    """Every preset has a row of at least 5 seeds for every task, measured with the preset
    as it is now (else: python -m bench.presets --seeds 5 --jobs 2 --write), and the rows
    agree with what the tests above assert for one seed."""
    for method in PRESETS:
        for task in peftcore.TASKS:
            r = robustness(method, task)
            assert r is not None and r["seeds"] >= 5, (method, task, "not recorded for this preset")
            assert r["min"] <= r["median"] <= r["max"] and 0 <= r["solved"] <= r["seeds"]
    for (method, task), floor in SOLVES.items():
        r = robustness(method, task)
        assert r["solved"] == r["seeds"] and r["min"] >= max(floor, SOLVES_AT), (method, task, r)
        assert max(r["drop"]) <= 0.1, (method, task, "fell by more than 0.1 on the way", r["drop"])
    for (method, task), ceiling in STAYS_LOW.items():
        assert robustness(method, task)["max"] <= ceiling - min(0.2, ceiling / 2), (method, task)
    for (method, task), ceiling in RECORDED_LOW.items():
        assert robustness(method, task)["max"] <= ceiling, (method, task)
    for method, (task, metric, gap) in RANDOM_BASE.items():
        pre, rnd = robustness(method, task), robustness(method, task, "random base")
        assert rnd is not None, (method, task, "no random-base row for this preset")
        worst_pretrained = pre["min"] if metric == "exact" else pre["token_min"]
        best_random = rnd["max"] if metric == "exact" else rnd["token_max"]
        assert best_random <= worst_pretrained - gap, (method, pre, rnd)
    for method in PRESETS:
        if not peftcore.METHODS[method].shares_base:
            continue
        for task in peftcore.TASKS:
            rnd = robustness(method, task, "random base")
            assert rnd is not None and rnd["seeds"] >= 5, (method, task, "no 5-seed random-base row")
            assert rnd["max"] < RANDOM_BASE_CEILING, (method, task, rnd)


def test_sort_wants_more_steps_and_more_than_rank_1():
    """The sort lesson, from the longer budget recorded apart (bench.presets --methods FULL
    LORA --tasks sort --steps 1000 --write): given about 4x a live run's steps, full fine-tuning
    sorts on every seed, far above what any live run reaches; LoRA r=1 with as many steps
    gets most of the way, and solves it on fewer seeds."""
    steps, full = longer_budget("FULL", "sort")
    lora_steps, lora = longer_budget("LORA", "sort")
    assert steps == lora_steps >= 3 * PRESETS["FULL"].train["steps"]
    assert full["seeds"] >= 5 and full["solved"] == full["seeds"]
    assert full["min"] >= max(robustness(m, "sort")["max"] for m in PRESETS) + 0.4
    assert lora["solved"] < lora["seeds"] and lora["median"] < full["min"]


def test_a_prefix_in_every_layer_gets_further_than_a_prompt_at_the_input():
    """The recorded table (5 seeds) backs the Inside page's lesson: on the new digit maps every
    seed of prefix tuning gets more answer digits right than the best seed of prompt tuning.
    (Prefix tuning solves both on 5 of 5 seeds; prompt tuning neither.)"""
    for task in NEW_MAPS:
        prefix, prompt = robustness("PREFIX_TUNING", task), robustness("PROMPT_TUNING", task)
        assert prefix["token_min"] > prompt["token_max"] + 0.2, (task, prefix, prompt)


# LoRA's family, checked in the recorded table only (each row is 5 seeds; no live run here, so
# the suite stays short): what each member's preset solves, and what the Inside page says of
# the variants that solve less than LoRA.
FAMILY_SOLVES = [(m, {}) for m in ("VERA", "LOHA", "LOKR")] + [("LORA", {"use_dora": True})]


@pytest.mark.parametrize("method, options", FAMILY_SOLVES, ids=[f"{m} {o}" for m, o in FAMILY_SOLVES])
def test_the_family_solves_what_lora_solves_on_every_seed(method, options):
    for task in NEW_MAPS + COMPOSITIONS:
        r = robustness(method, task, options=options)
        assert r is not None and r["seeds"] >= 5, (method, options, task, "not recorded for this preset")
        assert r["solved"] == r["seeds"], (method, options, task, r["exact"])


def test_what_the_page_says_of_lora_plus_and_lora_fa_is_the_table():
    """LoRA+ at the preset's learning rate: the new maps end near chance on most seeds, the
    compositions solve. LoRA-FA (A frozen) at rank 1: the compositions solve, the new maps not."""
    for options in ({"optimizer": "loraplus"}, {"optimizer": "lorafa"}):
        for task in COMPOSITIONS:
            r = robustness("LORA", task, options=options)
            assert r["solved"] == r["seeds"] >= 5, (options, task, r["exact"])
        for task in NEW_MAPS:
            r = robustness("LORA", task, options=options)
            assert r["solved"] < r["seeds"] and r["median"] < 0.5, (options, task, r["exact"])
    for task in NEW_MAPS:
        assert robustness("LORA", task, options={"optimizer": "loraplus"})["token_median"] < 0.2  # near chance: 0.1
