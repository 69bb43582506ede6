"""The whole class in one step: runs stepped together train as they would alone.

Tolerances. One step: 1e-5 on every phi tensor and loss. On a Xeon (AVX-512, torch 2.13 CPU)
a run in a cohort is bit-identical to the run alone; on an AMD EPYC the batched kernels round
differently (1e-6 after a step), and training amplifies that: LoRA at lr 3e-2 ends 16 steps
up to 6e-3 apart (phi of size ~0.15), its loss 1e-2. So a whole run is held to DRIFT, and
the routing check to 10x DRIFT: a row routed through the wrong run's phi misses by 0.2."""
import pytest
import torch

import peftcore
from peftcore import AdapterConfig, FullFineTuneConfig, LoraConfig, PromptTuningConfig
from peftcore.cohort import Cohort, cohort_key
from peftcore.service.executors import RunSpec
from peftcore.service.runs import DONE, FAILED, QUEUED, RUNNING, STOPPED, RunManager
from peftcore.train import NonFiniteLossError, Trainer, train

TOL = 1e-5    # one step: the same gradients, the same update
DRIFT = 2e-2  # a whole run: rounding amplified by training on another CPU's kernels
# evaluations are compared between runs, not held to a floor: 64 held-out rows each (512 cost
# most of a 16-step run)
SHORT = dict(batch_size=16, eval_every=4, eval_size=64)
LORA_RUNS = [  # config, task, seed, steps, lr: ranks, scalings, tasks and budgets all differ
    (LoraConfig(r=3), "times_3", 1, 16, 1e-2),
    (LoraConfig(r=2), "complement", 2, 9, 3e-2),
    (LoraConfig(r=8, lora_alpha=12), "times_3", 3, 16, 1e-2),
    (LoraConfig(r=4), "sort", 4, 5, 1e-3),
]
ADAPTER_RUNS = [(AdapterConfig(8), "times_3", 1, 12, 1e-2), (AdapterConfig(3), "complement", 2, 7, 1e-2)]
MLP_ADAPTER_RUNS = [(AdapterConfig(8, target_sublayers=("mlp",)), "times_3", 1, 12, 3e-2),  # the preset's placement
                    (AdapterConfig(16, target_sublayers=("mlp",)), "reverse_add_1", 2, 7, 3e-2)]
KINDS = dict(argvalues=[LORA_RUNS, ADAPTER_RUNS, MLP_ADAPTER_RUNS], ids=["lora", "adapter", "adapter after mlp"])


def phi(model):
    return [p.detach().clone() for _, p in model.named_adapter_parameters()]


def alone(base, runs):
    out = []
    for cfg, task, seed, steps, lr in runs:
        model = peftcore.get_peft_model(base, cfg, seed=seed)
        events = list(train(model, task, steps, lr=lr, seed=seed, **SHORT))
        out.append((phi(model), events))
    return out


def together(base, runs):
    models = [peftcore.get_peft_model(base, cfg, seed=seed) for cfg, _, seed, _, _ in runs]
    trainers = [Trainer(m, task, steps, lr=lr, seed=seed, **SHORT)
                for m, (_, task, seed, steps, lr) in zip(models, runs)]
    cohort, events = Cohort(trainers), {t: [] for t in trainers}
    while cohort.trainers:
        for t, event in cohort.step():
            events[t].append(event)
    return [(phi(m), events[t]) for m, t in zip(models, trainers)]


def assert_same(a, b, tol):
    for (phi_a, events_a), (phi_b, events_b) in zip(a, b):
        assert len(events_a) == len(events_b)
        for x, y in zip(phi_a, phi_b):
            assert torch.allclose(x, y, rtol=0, atol=tol), (x - y).abs().max()
        for e, f in zip(events_a, events_b):
            assert abs(e.loss - f.loss) <= 2 * tol
            assert (e.eval_exact is None) == (f.eval_exact is None)
            assert e.eval_exact is None or abs(e.eval_exact - f.eval_exact) <= 5 * tol


@pytest.mark.parametrize("runs", **KINDS)
def test_one_step_in_a_cohort_is_the_step_alone(base, runs):
    one = [(cfg, task, seed, 1, lr) for cfg, task, seed, _, lr in runs]
    assert_same(together(base, one), alone(base, one), TOL)


@pytest.mark.parametrize("runs", **KINDS)
def test_a_run_in_a_cohort_trains_as_it_would_alone(base, runs):
    assert_same(together(base, runs), alone(base, runs), DRIFT)


def test_a_wrong_route_would_be_caught(base):
    """The check has teeth: two runs of one config that differ only in seed end far more
    than 10x DRIFT apart, so a row sent through the other run's phi could not pass."""
    runs = [(LoraConfig(r=2), "times_3", seed, 9, 1e-2) for seed in (1, 2)]
    a, b = together(base, runs), alone(base, runs[::-1])
    assert max((x - y).abs().max().item() for x, y in zip(a[0][0], b[0][0])) > 10 * DRIFT


def test_a_run_that_breaks_leaves_the_others_untouched(base):
    models = [peftcore.get_peft_model(base, cfg, seed=seed) for cfg, _, seed, _, _ in LORA_RUNS[:2]]
    with torch.no_grad():
        next(p for _, p in models[1].named_adapter_parameters()).fill_(float("nan"))
    trainers = [Trainer(m, task, 6, lr=lr, seed=seed, **SHORT)
                for m, (_, task, seed, _, lr) in zip(models, LORA_RUNS[:2])]
    cohort = Cohort(trainers)
    first = dict(cohort.step())
    assert isinstance(first[trainers[1]], NonFiniteLossError) and cohort.trainers == trainers[:1]
    while cohort.trainers:
        cohort.step()
    expected = alone(base, [(*LORA_RUNS[0][:3], 6, LORA_RUNS[0][4])])[0][0]
    assert all(torch.allclose(x, y, rtol=0, atol=DRIFT) for x, y in zip(phi(models[0]), expected))


def test_who_may_ride_together(base):
    key = lambda cfg, **kw: cohort_key(peftcore.get_peft_model(base, cfg, seed=0), **kw)
    assert key(LoraConfig(r=2)) == key(LoraConfig(r=8, lora_alpha=4))  # ranks pad to the largest
    assert key(LoraConfig(target_modules=("q",))) != key(LoraConfig(target_modules=("q", "v")))
    assert key(LoraConfig()) != key(LoraConfig(), batch_size=32)
    assert key(AdapterConfig(3)) == key(AdapterConfig(16)) != key(LoraConfig())
    mlp_only = AdapterConfig(16, target_sublayers=("mlp",))  # wraps other layers: another cohort
    assert key(mlp_only) == key(AdapterConfig(3, target_sublayers=("mlp",))) != key(AdapterConfig(16))
    other_base = peftcore.random_base(seed=1)
    assert cohort_key(peftcore.get_peft_model(other_base, LoraConfig(), seed=0)) != key(LoraConfig())
    for alone_only in (LoraConfig(lora_dropout=0.1), PromptTuningConfig(), FullFineTuneConfig()):
        assert key(alone_only) is None


def test_the_manager_lets_a_cohort_ride_in_one_slot(base):
    manager = RunManager(max_concurrent=1, max_cohort=3, torch_threads=None)
    start = lambda cfg, seed, steps=12, owner="a": manager.start(
        RunSpec(cfg.to_dict(), "times_3", seed, train=dict(steps=steps, **SHORT, device="cpu")),
        owner=owner)
    runs = [start(LoraConfig(r=2), seed, owner=f"s{seed}") for seed in range(4)]
    prompt = start(PromptTuningConfig(), 9)
    assert [r.status for r in runs] == [RUNNING] * 3 + [QUEUED]  # 3 share the slot; the 4th waits
    assert prompt.status == QUEUED and manager.place_in_line(prompt) == 2
    manager.stop(runs[1], owner="s1")
    for r in runs + [prompt]:
        r.wait(120)
    assert [r.status for r in runs] == [DONE, STOPPED, DONE, DONE] and prompt.status == DONE
    assert len(runs[1].events) < 12 and all(len(r.events) == 12 for r in (runs[0], runs[2], runs[3]))
    assert runs[3].started >= runs[1].started  # it took the place the stop freed, or the next lane
    expected = alone(base, [(LoraConfig(r=2), "times_3", 0, 12, 1e-2)])[0][0]
    assert all(torch.allclose(x, y, rtol=0, atol=DRIFT) for x, y in zip(phi(runs[0].model), expected))


def test_bad_settings_fail_one_run_not_its_lane(base):
    manager = RunManager(max_concurrent=1, max_cohort=2, torch_threads=None)
    train = dict(steps=6, batch_size=16, eval_every=3, device="cpu")
    good = manager.start(RunSpec(LoraConfig().to_dict(), "times_3", 0, train=train))
    bad = manager.start(RunSpec(LoraConfig().to_dict(), "no_such_task", 1, train=train))
    assert good.wait(60).status == DONE and bad.wait(60).status == FAILED
    assert "no_such_task" in bad.error
