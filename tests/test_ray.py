"""The run service on both executors (issue 17): one contract, run in this process and on Ray
worker processes; a worker killed mid-run; starts from other threads; Ray not reachable;
a process without the head's token cannot join; two `streamlit run` servers sharing one Ray
run service. (The app's own local Ray, started from a script thread, and the README's head:
tests/test_ray_network.py.)

One single-node Ray (`ray start --head` as the README has it: 127.0.0.1 only, token auth;
harness.servers.ray_head) serves the whole test session; it is real Ray, never mocked.
Where Ray is not installed these tests skip, except in CI (PEFT_REQUIRE_BROWSER, set by
.ci/run, means the setup ran: a missing Ray fails there)."""
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

import peftcore
from peftcore import LoraConfig
from peftcore.service.executors import BaseMismatch, RunSpec, WorkerRuns, load_trained
from peftcore.service.runs import DONE, FAILED, QUEUED, RUNNING, STOPPED, QueueFull, RunManager

from conftest import ROOT

CFG = LoraConfig(r=1, lora_alpha=4, target_modules=("q", "v"))
KW = dict(batch_size=8, eval_every=5, eval_size=64, device="cpu", lr=1e-2)  # 64 held-out rows: runs are compared with runs


def _ray():
    # what peftcore.service.ray_executor.connect sets before Ray is imported (Ray reads them then): this
    # process joins the session's head on 127.0.0.1, with its token
    os.environ.update(RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        import ray
    except ImportError:
        if os.environ.get("PEFT_REQUIRE_BROWSER"):
            raise RuntimeError("ray is missing in CI: tests/setup.sh installs requirements-ray.txt") from None
        pytest.skip("ray is not installed (pip install -r requirements-ray.txt)")
    return ray


@pytest.fixture(scope="module")
def ray_head():
    """A single-node Ray for this module's tests (harness.servers.ray_head: its own process
    group, 127.0.0.1 only, token auth, its token in RAY_AUTH_TOKEN meanwhile), stopped after
    them: an idle head costs about a tenth of a core, which the rest of the session needs."""
    _ray()
    from harness.servers import ray_head as start_head
    with start_head(num_cpus=4) as head:
        yield head


@pytest.fixture(scope="module")
def ray_address(ray_head):
    """This process joined to this module's head, as a web server joins it."""
    ray = _ray()
    deadline = time.time() + 60
    while True:
        try:
            ray.init(address=ray_head.address, namespace="peft-playground", log_to_driver=False)
            break
        except ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(1)
    yield ray_head.address
    ray.shutdown()


def ray_service(**kw):
    from peftcore.service.ray_executor import RayRunManager, service
    return RayRunManager(service(f"test-{uuid.uuid4().hex[:6]}", **kw))


def close(manager):
    if hasattr(manager, "service"):
        manager.shutdown()
        _ray().kill(manager.service)
    else:
        manager.shutdown()


@pytest.fixture(scope="module", params=["inprocess", "ray"])
def manager(request):
    """One slot and a fair line: a run service per executor for the contract below."""
    if request.param == "ray":
        request.getfixturevalue("ray_address")
        m = ray_service(cpu_workers=1, gpu_workers=0, max_concurrent=1, max_per_owner=3)
    else:
        m = RunManager(max_concurrent=1, max_cohort=1, max_per_owner=3, torch_threads=None)
    yield m
    close(m)


def spec(base_fp, seed=0, steps=10):
    return RunSpec(CFG.to_dict(), "times_3", seed, fingerprint=base_fp, train=dict(steps=steps, **KW))


def start(manager, base, base_fp, owner, seed=0, steps=10, shared=False, **kw):
    return manager.start(spec(base_fp, seed, steps), label="LoRA", owner=owner, shared=shared, **kw)


def values(events):
    return [(e.step, e.loss, e.train_exact, e.eval_exact, e.eval_token, e.done) for e in events]


def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------ the contract
def test_same_seed_same_events_and_bit_identical_phi(manager, base, base_fp):
    run = start(manager, base, base_fp, "a", seed=7, steps=12).wait(120)
    alone = spec(base_fp, 7).build(base)
    events = list(peftcore.train(alone, "times_3", steps=12, **KW, seed=7))
    assert run.status == DONE, run.error
    assert values(run.events) == values(events)  # values, not elapsed
    assert peftcore.adapter_to_bytes(run.model) == peftcore.adapter_to_bytes(alone)
    assert run.model.get_nb_trainable_parameters() == alone.get_nb_trainable_parameters()


def test_identical_runs_are_computed_once(manager, base, base_fp):
    first = start(manager, base, base_fp, "a", seed=1, shared=True)
    second = start(manager, base, base_fp, "b", seed=1, shared=True)
    assert second is first and first.owners == {"a", "b"} and first.joined == 1
    assert first.wait(120).status == DONE
    again = start(manager, base, base_fp, "c", seed=1, shared=True)
    assert again is not first  # a finished run is not joined
    assert again.wait(120).status == DONE


def test_only_owners_stop_and_a_stopped_run_keeps_its_phi(manager, base, base_fp):
    run = start(manager, base, base_fp, "a", steps=5000)
    wait_for(lambda: len(run.events) >= 3)
    assert not manager.stop(run, "stranger") and run.owners == {"a"}
    assert manager.stop(run, "a")
    assert run.wait(60).status == STOPPED and 3 <= len(run.events) < 5000
    again = spec(base_fp).build(base)
    for _ in zip(range(len(run.events)), peftcore.train(again, "times_3", steps=5000, **KW, seed=0)):
        pass  # the same number of steps in the core: the phi a stop hands back is that one
    assert peftcore.adapter_to_bytes(run.model) == peftcore.adapter_to_bytes(again)


def test_the_line_is_fair_across_owners_and_caps_say_why(manager, base, base_fp):
    blocker = start(manager, base, base_fp, "x", steps=5000)
    wait_for(lambda: blocker.status == RUNNING)
    a1, a2 = start(manager, base, base_fp, "a", seed=1), start(manager, base, base_fp, "a", seed=2)
    b = start(manager, base, base_fp, "b", seed=3)
    assert [r.status for r in (a1, a2, b)] == [QUEUED] * 3
    assert [manager.place_in_line(r) for r in (a1, b, a2)] == [1, 2, 3]  # b before a's second
    a3 = start(manager, base, base_fp, "a", seed=4)
    with pytest.raises(QueueFull, match="You already have 3 runs") as refused:
        start(manager, base, base_fp, "a", seed=5)
    assert refused.value.reason == "owner"
    for r, o in ((a3, "a"), (a2, "a"), (blocker, "x")):
        manager.stop(r, o)
    for r in (a1, b):
        assert r.wait(120).status == DONE, r.error
    assert a1.started <= b.started


# ------------------------------------------------------------------ faults and threads
def test_a_long_class_keeps_at_most_max_kept_finished_runs(manager, base, base_fp):
    """However many runs a class starts, the oldest finished ones beyond max_kept are
    forgotten; a Ray mirror so forgotten is adopted again, phi and all, on its next lookup."""
    wait_for(lambda: not manager.active(), 120)  # only finished runs before these
    kept, manager.max_kept = manager.max_kept, 2
    try:
        runs = [start(manager, base, base_fp, "a", seed=20 + i, steps=2).wait(120) for i in range(3)]
        assert [r.status for r in runs] == [DONE] * 3
        assert list(dict.keys(manager.runs)) == [runs[1].id, runs[2].id]
        if hasattr(manager, "service"):
            assert runs[0].id in manager.runs  # the service still has it
            again = manager.runs[runs[0].id]
            assert again is not runs[0] and again.status == DONE and values(again.events) == values(runs[0].events)
            assert peftcore.adapter_to_bytes(again.model) == peftcore.adapter_to_bytes(runs[0].model)
        else:
            assert runs[0].id not in manager.runs
    finally:
        manager.max_kept = kept


def test_a_worker_killed_mid_run_fails_that_run_only_and_its_slot_comes_back(ray_address, base, base_fp):
    manager = ray_service(cpu_workers=2, gpu_workers=0)
    try:
        victim, other = start(manager, base, base_fp, "a", steps=5000), start(manager, base, base_fp, "b", seed=1, steps=5000)
        wait_for(lambda: len(victim.events) >= 2 and len(other.events) >= 2, 120)
        pid = manager.worker_pids()[victim.id]
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0  # not Ray's default nice 15: it trains beside the web server
        os.kill(pid, signal.SIGKILL)
        assert victim.wait(60).status == FAILED
        assert "worker process training this run stopped" in victim.error and "\n" not in victim.error
        seen = len(other.events)
        wait_for(lambda: len(other.events) > seen + 2)  # the other run trains on
        assert other.status == RUNNING
        again = start(manager, base, base_fp, "a", seed=2, steps=10)  # the dead worker's slot, a fresh process
        assert again.wait(120).status == DONE, again.error
        manager.stop(other, "b")
        assert other.wait(60).status == STOPPED
    finally:
        close(manager)


def test_starting_from_other_threads_works(ray_address, base, base_fp):
    manager = ray_service(cpu_workers=1, gpu_workers=0)
    try:
        got = []
        threads = [threading.Thread(target=lambda i=i: got.append(
            start(manager, base, base_fp, f"s{i}", shared=True, steps=10))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({r.id for r in got}) == 1 and len(got[0].owners) == 4
        assert got[0].wait(120).status == DONE
    finally:
        close(manager)


def test_a_worker_refuses_another_base_and_a_bad_config_in_one_line(base_fp):
    worker = WorkerRuns("cpu")
    other = "0" * 64
    error = worker.add("r1", spec(other, steps=5).to_dict())
    assert error.startswith(f"{BaseMismatch.__name__}: this worker's pretrained base is {base_fp[:16]}")
    assert "different base files" in error and "\n" not in error
    bad = dict(CFG.to_dict(), r=-1)
    assert worker.add("r2", RunSpec(bad, "times_3", fingerprint=base_fp, train=dict(steps=5, **KW)).to_dict()).startswith(
        "ValueError: r must be")
    assert not worker.session  # nothing was queued


def test_phi_from_a_worker_enters_through_the_loaders_checks(base, base_fp):
    worker = WorkerRuns("cpu")
    assert worker.add("r", spec(base_fp, steps=3).to_dict()) is None
    while worker.session:
        worker.step()
    data = worker.finish("r")
    assert peftcore.adapter_to_bytes(load_trained(base, data)) == data
    with pytest.raises(peftcore.AdapterLoadError, match="trained on another base"):
        load_trained(peftcore.random_base(), data)


NOT_REACHABLE = """
import logging, ui
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
print(type(ui.make_manager("ray")).__name__)
"""


def test_ray_not_reachable_logs_one_line_and_trains_in_process():
    from harness.servers import free_port
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-c", NOT_REACHABLE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.stdout.strip().splitlines()[-1:] == ["RunManager"], done.stderr[-3000:]
    assert "Ray is not reachable at 127.0.0.1" in done.stderr and "training runs in this web process" in done.stderr
    assert "Traceback" not in done.stderr and time.time() - t0 < 60


JOIN = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('joined')"


def test_a_process_without_the_heads_token_cannot_join(ray_head, tmp_path):
    """The session's head, started as the README says: every port on 127.0.0.1, and Ray's GCS
    refuses a process that sends no token or another token ("InvalidAuthToken"); its own
    token joins. (A driver tries once: RAY_gcs_server_port_wait_time_s=1, not 20 tries.)"""
    from test_ray_network import listening, off_loopback, process_tree
    sockets = listening(process_tree(ray_head.pid))
    assert int(ray_head.address.rpartition(":")[2]) in {p for _, _, p in sockets} and off_loopback(sockets) == []
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_server_port_wait_time_s="1")
    tries = {"no token": dict(RAY_AUTH_MODE="disabled"), "another token": dict(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
             "its token": dict(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.environ["RAY_AUTH_TOKEN"])}
    procs = {who: subprocess.Popen([sys.executable, "-c", JOIN, ray_head.address], env={**env, **extra}, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who, extra in tries.items()}
    out = {who: proc.communicate(timeout=120) for who, proc in procs.items()}
    assert out["its token"][0].strip() == "joined", out["its token"][1][-2000:]
    for who in ("no token", "another token"):
        assert "joined" not in out[who][0] and "InvalidAuthToken" in out[who][1], (who, out[who][1][-2000:])


# ------------------------------------------------------------------ two web servers, one line
def test_two_web_servers_share_one_fair_line_and_compute_identical_runs_once(ray_address, new_page, monkeypatch):
    """Two `streamlit run` on two ports against one Ray: a teacher's long run holds the only
    worker, so the students' runs wait; a student on either server sees their place in the
    one line, and the same default run pressed on both servers is one computation."""
    from harness.servers import streamlit_server
    from harness.browser import wait_ready
    from peftcore.service.ray_executor import RayRunManager, service
    from test_browser import see
    name = f"test-two-{uuid.uuid4().hex[:6]}"
    for k, v in dict(PEFT_EXECUTOR="ray", RAY_ADDRESS=ray_address, PEFT_RAY_SERVICE=name).items():
        monkeypatch.setenv(k, v)
    teacher = RayRunManager(service(name, cpu_workers=1, gpu_workers=0))  # the servers find this one
    try:
        with streamlit_server() as a, streamlit_server() as b:
            pages = {}
            for who, server in (("a", a), ("b1", b), ("b2", b)):
                pages[who] = new_page()
                pages[who].goto(f"{server.url}/train")
                wait_ready(pages[who])
            box = pages["b2"].get_by_test_id("stSidebar").get_by_role("spinbutton", name="Seed")
            box.fill("5")
            box.press("Enter")
            wait_ready(pages["b2"])
            hold = teacher.start(RunSpec(CFG.to_dict(), "times_3", fingerprint=peftcore.fingerprint(peftcore.load_base()),
                                         train=dict(steps=100_000, **KW)), owner=None)
            wait_for(lambda: hold.status == RUNNING)
            for who in ("a", "b1", "b2"):
                pages[who].get_by_role("button", name="Train", exact=True).click()
                wait_ready(pages[who])
            see(pages["a"], "waiting: number 1 in line")
            see(pages["b1"], "waiting: number 1 in line")  # joined a's run, from the other server
            see(pages["b1"], "shared with 1 other visitor")
            see(pages["b2"], "waiting: number 2 in line")
            teacher.stop(hold, None)
            for who in ("a", "b1", "b2"):
                see(pages[who], "Results on times_3", timeout=180_000)
            see(pages["a"], "This run was shared: 2 starts")
            for page in pages.values():
                assert page.locator("[data-testid=stException]").count() == 0
    finally:
        close(teacher)
