"""The run service of a class: a fair queue, identical runs computed once, owners, stop
when solved. Real (short) training runs, no mocks."""
import threading

import pytest
import torch

import peftcore
from peftcore import LoraConfig
from peftcore.presets import PRESETS
from peftcore.service.executors import RunSpec
from peftcore.service.runs import DONE, QUEUED, RUNNING, STOPPED, QueueFull, RunManager
from peftcore.train import SOLVED, TrainEvent, solved_at

CFG = LoraConfig(r=1, lora_alpha=4, target_modules=("q", "v"))
# short runs, compared with runs: 64 held-out rows per evaluation (512 cost most of such a run)
SHORT = dict(batch_size=8, eval_every=10, eval_size=64, device="cpu")


def spec(steps=20, seed=0):
    return RunSpec(CFG.to_dict(), "times_3", seed, train=dict(steps=steps, **SHORT))


def start(manager, base, owner="a", shared=False, steps=20, seed=0, **kw):
    """A run of `base` (not shared unless `shared`: then an equal run is joined)."""
    s = spec(steps, seed)
    return manager.start(s, label="LoRA", owner=owner, shared=shared, model=s.build(base), **kw)


def test_more_runs_than_slots_wait_first_come_first_served(base):
    manager = RunManager(max_concurrent=1, torch_threads=None)
    runs = [start(manager, base, owner=f"s{i}") for i in range(3)]
    assert [r.status for r in runs] == [RUNNING, QUEUED, QUEUED]
    assert [manager.place_in_line(r) for r in runs] == [None, 1, 2]
    for r in runs:
        r.wait(60)
    assert [r.status for r in runs] == [DONE] * 3
    assert runs[0].started <= runs[1].started <= runs[2].started  # in the order they came


def test_the_wait_estimate_counts_the_steps_ahead(base):
    manager = RunManager(max_concurrent=1, torch_threads=None)
    start(manager, base, steps=10).wait(60)  # one measured run: seconds per step known
    first, second, third = (start(manager, base, owner=f"s{i}", steps=40) for i in range(3))
    wait2, wait3 = manager.estimated_wait(second), manager.estimated_wait(third)
    per_step = manager.seconds_per_step()
    assert wait2 is not None and wait2 <= 40 * per_step + 1e-9
    assert wait3 == pytest.approx(wait2 + 40 * per_step)  # one more whole run ahead
    for r in (first, second, third):
        manager.stop(r, r.owners.copy().pop())


def test_a_cap_on_waiting_runs_refuses_with_a_message(base):
    manager = RunManager(max_concurrent=1, max_waiting=1, torch_threads=None)
    running, waiting = start(manager, base, owner="a", steps=200), start(manager, base, owner="b")
    with pytest.raises(QueueFull, match=r"queue is full \(1 runs waiting") as refused:
        start(manager, base, owner="c")
    assert refused.value.reason == "server"
    assert len(manager.runs) == 2  # the refused start left nothing behind
    manager.stop(waiting, "b")  # a stop frees the place at once
    assert waiting.status == STOPPED and manager.place_in_line(waiting) is None
    start(manager, base, owner="c")
    manager.stop(running, "a")


def test_the_queue_is_fair_across_owners(base):
    """Round-robin by owner: B's first waiting run goes before A's second, not after all of A's;
    a newcomer's first run also goes before A's second."""
    manager = RunManager(max_concurrent=1, max_cohort=1, max_per_owner=None, torch_threads=None)
    blocker = start(manager, base, owner="x", steps=400)
    a = [start(manager, base, owner="a", steps=400)] + [start(manager, base, owner="a", steps=3) for _ in range(4)]
    b = start(manager, base, owner="b", steps=3)
    assert [manager.place_in_line(r) for r in a + [b]] == [1, 3, 4, 5, 6, 2]
    manager.stop(blocker, "x")
    assert blocker.wait(60).status == STOPPED and a[0].status == RUNNING
    c = start(manager, base, owner="c", steps=3)  # arrives while A's first trains
    assert [manager.place_in_line(r) for r in (b, c, *a[1:])] == [1, 2, 3, 4, 5, 6]
    manager.stop(a[0], "a")
    for r in a + [b, c]:
        r.wait(60)
    assert all(r.status == DONE for r in a[1:] + [b, c])
    assert sorted(a + [b, c], key=lambda r: r.started) == [a[0], b, c, *a[1:]]  # B's is dispatched second


def test_a_cap_per_owner_counts_every_tab_and_says_why(base):
    manager = RunManager(max_concurrent=1, max_per_owner=2, torch_threads=None)
    running, waiting = start(manager, base, owner="a", steps=400), start(manager, base, owner="a")
    with pytest.raises(QueueFull, match="You already have 2 runs training or waiting") as refused:
        start(manager, base, owner="a")  # from any tab: the owner is the visitor
    assert refused.value.reason == "owner" and len(manager.runs) == 2
    other = start(manager, base, owner="b")  # another visitor is not refused
    manager.stop(waiting, "a")  # a stop frees a place under the cap at once
    again = start(manager, base, owner="a")
    for r, o in ((running, "a"), (other, "b"), (again, "a")):
        manager.stop(r, o)


def test_a_cap_per_client_address_counts_every_visitor_on_it(base):
    manager = RunManager(max_concurrent=1, max_per_client=2, torch_threads=None)
    runs = [start(manager, base, owner=o, client="10.0.0.7", steps=400) for o in ("a", "b")]
    with pytest.raises(QueueFull, match="This address already has 2 runs") as refused:
        start(manager, base, owner="c", client="10.0.0.7")  # a fresh cookie, the same machine
    assert refused.value.reason == "client"
    runs += [start(manager, base, owner="d", client="10.0.0.8"), start(manager, base, owner="e")]
    for r in runs:
        manager.stop(r, r.owners.copy().pop())


def test_joining_an_identical_run_counts_toward_the_joiners_cap(base):
    manager = RunManager(max_concurrent=2, max_per_owner=1, torch_threads=None)
    run = start(manager, base, owner="a", shared=True, steps=400)
    mine = start(manager, base, owner="b", steps=400)
    with pytest.raises(QueueFull) as refused:
        start(manager, base, owner="b", shared=True, steps=400)  # b is at its cap: joining would be one more
    assert refused.value.reason == "owner" and run.owners == {"a"}
    assert start(manager, base, owner="c", shared=True, steps=400) is run and run.owners == {"a", "c"}
    manager.stop(mine, "b")
    assert start(manager, base, owner="b", shared=True, steps=400) is run  # under its cap again: b may join
    for o in ("a", "b", "c"):
        manager.stop(run, o)


def test_a_visitors_own_second_tab_is_not_another_visitor(base):
    manager = RunManager(max_concurrent=1, max_per_owner=1, torch_threads=None)
    run = start(manager, base, owner="a", shared=True, steps=400)
    assert start(manager, base, owner="a", shared=True, steps=400) is run  # a second tab: allowed at the cap
    assert run.joined == 1 and run.other_owners("a") == 0  # not "shared with 1 other"
    start(manager, base, owner="b", shared=True, steps=400)
    assert run.other_owners("a") == 1 and run.other_owners("b") == 1 and run.joined == 2
    for o in ("a", "b"):
        manager.stop(run, o)


def test_identical_runs_are_computed_once_and_each_gets_the_same_phi(base):
    manager = RunManager(max_concurrent=2, torch_threads=None)
    first, second = start(manager, base, owner="a", shared=True), start(manager, base, owner="b", shared=True)
    assert second is first and first.shared and first.owners == {"a", "b"}
    other = start(manager, base, owner="c", shared=True, seed=1)  # any difference: its own run
    assert other is not first
    first.wait(60)
    alone = peftcore.get_peft_model(base, CFG, seed=0)
    peftcore.run(alone, "times_3", steps=20, **SHORT)
    for (_, p), (_, q) in zip(first.model.named_adapter_parameters(), alone.named_adapter_parameters()):
        assert torch.equal(p, q)  # the shared computation is the one each would have run
    assert start(manager, base, owner="d", shared=True) is not first  # a finished run is not joined


def test_only_owners_stop_and_a_shared_run_stops_when_its_last_owner_leaves(base):
    manager = RunManager(max_concurrent=1, torch_threads=None)
    run = start(manager, base, owner="a", shared=True, steps=400)
    start(manager, base, owner="b", shared=True, steps=400)
    assert not manager.stop(run, "stranger") and run.owners == {"a", "b"}  # a shared link can't stop it
    assert not manager.stop(run, "a")  # a leaves; b still trains it
    assert run.owners == {"b"} and not run._stop.is_set()
    assert manager.stop(run, "b")
    assert run.wait(60).status == STOPPED


def test_a_run_whose_owners_all_left_is_reaped_after_a_grace(base):
    manager = RunManager(max_concurrent=1, torch_threads=None, grace_s=0.0)
    run, waiting = start(manager, base, owner="gone", steps=400), start(manager, base, owner="here", steps=5)
    manager.reap(connected=lambda owner: owner == "here")
    assert run.wait(60).status == STOPPED  # the closed tab's run freed the slot...
    assert waiting.wait(60).status == DONE  # ...and the next one in line trained
    kept = RunManager(max_concurrent=1, torch_threads=None, grace_s=60.0)
    refreshing = start(kept, base, owner="refresh", steps=400)
    kept.reap(connected=lambda owner: False)  # a refresh: gone for a moment, within the grace
    assert not refreshing._stop.is_set()
    kept.stop(refreshing, "refresh")


def test_starts_from_many_threads_join_one_run(base):
    manager = RunManager(max_concurrent=2, torch_threads=None)
    got = []
    threads = [threading.Thread(target=lambda i=i: got.append(start(manager, base, owner=f"s{i}", shared=True)))
               for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.id for r in got}) == 1 and len(got[0].owners) == 12 and got[0].joined == 11
    got[0].wait(60)


def ev(step, exact):
    return TrainEvent(step, 100, 1.0, 0.0, exact, exact, 0.1 * step, 1.0)


def test_solved_means_two_evaluations_in_a_row():
    events = [ev(10, 0.5), ev(20, SOLVED), ev(30, 0.9), ev(40, 1.0), ev(50, SOLVED)]
    assert solved_at(events).step == 40  # the lucky evaluation at 20 alone does not count
    assert solved_at(events[:4]) is None


def test_stop_when_solved_ends_the_run_at_the_confirming_evaluation(base):
    model = peftcore.get_peft_model(base, PRESETS["LORA"].config, seed=0)
    events = list(peftcore.train(model, "complement", steps=300, lr=1e-2, batch_size=32, eval_every=10,
                                 device="cpu", stop_when_solved=True))
    first = solved_at(events)
    assert first is not None, [e.eval_exact for e in events if e.eval_exact is not None]
    assert events[-1].step == first.step + 10 < 300 and events[-1].done


EXIT_WHILE_TRAINING = """
import time, peftcore
from peftcore.service.executors import RunSpec
from peftcore.service.runs import RUNNING, RunManager
run = RunManager().start(RunSpec(peftcore.LoraConfig().to_dict(), "times_3", train=dict(steps=100_000, device="cpu")))
while run.status != RUNNING or not run.events:
    time.sleep(0.01)
"""  # and exit, the run mid-training


def test_a_process_that_exits_while_a_run_trains_exits_cleanly():
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, "-c", EXIT_WHILE_TRAINING], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


EXIT_DURING_WARM_UP = """
import sys, time, peftcore
from peftcore.service.warmup import start_warm_up
start_warm_up(peftcore.load_base(), "cpu")
time.sleep(float(sys.argv[1]))
"""  # and exit, the warm-up anywhere from not started to inside torch


@pytest.mark.parametrize("after_s", [0.0, 1.0, 2.5])
def test_a_process_that_exits_during_the_warm_up_exits_cleanly(after_s):
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, "-c", EXIT_DURING_WARM_UP, str(after_s)],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # 134 ("terminate called...") before the fix


def test_a_runs_model_is_built_outside_the_managers_lock(base):
    """A run is one object (RunSpec) the manager builds its model from; the build takes the
    server's time, never its lock: another visitor's start goes on meanwhile."""
    building, release = threading.Event(), threading.Event()

    def slow_base(which, device):
        building.set()
        release.wait(30)
        return base
    manager = RunManager(max_concurrent=1, torch_threads=None, base_of=slow_base)
    built = []
    t = threading.Thread(target=lambda: built.append(manager.start(spec(steps=5), owner="a")))
    t.start()
    assert building.wait(30)
    other = start(manager, base, owner="b", steps=5)  # its model given: no build
    assert manager.runs[other.id] is other and not built
    release.set()
    t.join(30)
    assert built and built[0].spec == spec(steps=5) and built[0].wait(60).status == DONE
    other.wait(60)


def test_both_run_services_keep_one_protocol():
    """The in-process manager and the Ray client are one interface to the app: every call of
    RunService, with the same parameter names in the same order (defaults may differ)."""
    import inspect

    from peftcore.service.ray_executor import RayRunManager
    from peftcore.service.runs import RunService
    calls = [n for n, v in vars(RunService).items() if callable(v) and not n.startswith("_")]
    assert calls
    for cls in (RunManager, RayRunManager):
        for name in calls:
            want = list(inspect.signature(getattr(RunService, name)).parameters)
            have = list(inspect.signature(getattr(cls, name)).parameters)
            assert have[:len(want)] == want, (cls.__name__, name, have)
    assert isinstance(RunManager(max_concurrent=1, torch_threads=None), RunService)
