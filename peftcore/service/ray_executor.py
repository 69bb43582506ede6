"""Training on Ray: worker processes on this machine or a cluster, and one run service that
every web server of a lecture hall shares. Ray is imported here only, when first used:
peftcore works without it (pip install -r requirements-ray.txt to have it).

    manager = ray_manager()            # RAY_ADDRESS, or a local Ray started here
    run = manager.start(None, "times_3", owner="a", spec=RunSpec(config.to_dict()), steps=300)

- The service is one named, detached actor (RunService, namespace NAMESPACE): it holds the
  one RunManager (fair queue, identical runs computed once, owners, caps, reap) whose
  executor is a pool of Worker actors, one per slot. A second web server that asks for it
  gets the same actor (get_if_exists), so both share one line and one set of runs.
- A Worker (one process, num_cpus=1, or a GPU) rebuilds each run from its data
  (executors.WorkerRuns: the shipped base, fingerprint checked), steps its lane's runs as
  one Cohort and answers each `step` call with the events since the last one; the
  service's lane thread asks again until the runs end, so a stop lands between steps.
  At the end phi comes back as safetensors bytes. A worker that dies fails its runs with
  a clear message; a fresh one takes its slot.
- RayRunManager is RunManager's interface for the pages, in each web process: its runs
  are mirrors (executors' Run objects) that one thread per process refreshes from the
  service, so a page reads plain attributes and never waits on Ray. A finished run's
  phi enters its mirror's model through the loader's checks, on this process's base.
- On a network: a local Ray (no RAY_ADDRESS) listens on 127.0.0.1 only, with Ray's token auth;
  a head at RAY_ADDRESS is joined only if it requires its token (connect says why not, in a line).

Streaming generators (num_returns="streaming") would also stream events, but a stop must
reach a running task between steps and a cohort must take runs that come later: a
worker actor answering calls does both with no channel beside Ray's own.
"""
import atexit
import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import torch

from .executors import ADAPTER, SHIPPED_BASES, RemoteError, RunSpec, WorkerRuns, describe, load_trained
from .runs import DONE, FAILED, QUEUED, STOPPED, QueueFull, Run, RunManager, finished_beyond

log = logging.getLogger("peftcore.ray")
NAMESPACE = "peft-playground"  # fixed: every web server of a class finds the same service
SERVICE = "run-service"
STEP_S = 0.05  # a worker steps up to this long per call: events reach the page at 20 Hz, a stop in 50 ms
POLL_S = 0.25  # a web process refreshes its mirrors this often (its pages poll every 0.75 s)
HEARTBEAT_S = 5.0  # an owner no web server reported connected for this long counts as gone
GPU_COHORT = 32  # runs a GPU worker steps together (runs.default_cohort_size's)
WORKER_DIED = ("the worker process training this run stopped (it was killed, or ran out of memory); "
               "the other runs go on: press Train to run it again")


class RayUnavailable(RuntimeError):
    """Ray is not installed or not reachable: the message says which, in one line."""


# ------------------------------------------------------------------ connecting
def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("Ray is not installed (pip install -r requirements-ray.txt)") from None
    return ray


def connect(address=None, num_cpus=None):
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), or start one on this machine with
    `num_cpus` worker slots. Raises RayUnavailable with the reason, fast."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    _set_ray_env(address)
    ray = _ray()
    if ray.is_initialized():
        return ray
    try:
        if address:
            _check_reachable(address)
            _check_token_auth(address)
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            _start_local(ray, num_cpus)
    except RayUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to join is "not reachable", said in a line
        raise RayUnavailable(f"Ray at {address or 'a local start'} could not be joined: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return ray


def _set_ray_env(address):
    """Token auth always, and loopback only for a Ray on this machine. Ray reads both when it
    is imported: set them first (set after the import, the README's lecture-hall command fell
    back in-process: "InvalidAuthToken")."""
    # a local start has token auth by Ray's default; a joining driver is never switched to it
    # by Ray, and a head without it is refused anyway (_check_token_auth)
    os.environ["RAY_AUTH_MODE"] = "token"
    host = address.rpartition(":")[0].strip("[]") if address else "127.0.0.1"
    if host == "localhost" or host == "::1" or host.startswith("127."):
        # Ray's switch for a one-machine Ray (its default on macOS and Windows): without it Ray
        # replaces 127.0.0.1 by this machine's network address and listens on every interface
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _check_reachable(address, timeout=3.0):
    """A head's GCS port answers a TCP connect, else fail now (ray.init retries for a minute)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout).close()
    except OSError as e:
        raise RayUnavailable(f"Ray is not reachable at {address} ({e.strerror or e})") from None


# Run in a child process with RAY_AUTH_MODE=disabled: asks the head's GCS once without a token,
# then once with this machine's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
HEAD_PROBE = """
import os, sys
from ray._raylet import AuthenticationTokenLoader, Config, GcsClient
from ray.exceptions import AuthenticationError

def answers():
    try:
        GcsClient(address=sys.argv[1]).internal_kv_get(b"peft-probe", None, timeout=5)
        return True
    except AuthenticationError:
        return False

try:
    if answers():
        print("open")
    else:
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # as Ray's own switch to token mode (authentication_token_setup)
        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()
        print("no token" if not loader.has_token(ignore_auth_mode=True) else "ok" if answers() else "refused")
except Exception as e:
    print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
"""
COPY_TOKEN = "copy the head's ~/.ray/auth_token to this machine (or set RAY_AUTH_TOKEN)"
HEAD_REFUSED = {
    "open": "the Ray head at {} does not require token authentication: anyone on the network could run "
            "code on it; start it as the README says (RAY_AUTH_MODE=token)",
    "no token": "the Ray head at {} requires a token and this server has none: " + COPY_TOKEN,
    "refused": "the Ray head at {} refused this server's token: " + COPY_TOKEN,
}


def _check_token_auth(address, timeout=30):
    """Join only a head that refuses a process without its token (any process that can reach an
    open head runs code as its user) and opens to ours. Asked from a child process: Ray's auth
    mode is one setting per process, and this one must stay in token mode."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    try:
        done = subprocess.run([sys.executable, "-c", HEAD_PROBE, address], env=env, capture_output=True,
                              text=True, timeout=timeout)
        answer = (done.stdout.strip().splitlines() or [f"no answer (exit {done.returncode})"])[-1]
    except subprocess.TimeoutExpired:
        answer = f"no answer in {timeout} s"
    if answer != "ok":
        raise RayUnavailable(HEAD_REFUSED[answer].format(address) if answer in HEAD_REFUSED else
                             f"could not check that the Ray head at {address} requires token authentication ({answer})")


def _start_local(ray, num_cpus):
    """Start Ray here. From a thread that stays alive: Ray's processes die with the thread that
    started them (PR_SET_PDEATHSIG), and a Streamlit script thread ends with its script run."""
    done, failed = threading.Event(), []
    # Ray starts its worker processes at nice 15 by default (ps: ray::Worker at 15): here they
    # train beside the web server (nice 0) on the same cores, and whenever the cores are
    # oversubscribed a nice-15 process gets 36/1024 of a nice-0 one's share. At 0 they
    # compete as the in-process lanes do (BENCHMARKS.md, "The lecture hall").
    os.environ.setdefault("RAY_worker_niceness", "0")

    def hold():
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=NAMESPACE,
                     log_to_driver=False, _node_ip_address="127.0.0.1")
            _check_loopback(ray)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            failed.append(e)
        done.set()
        if not failed:
            threading.Event().wait()  # for the life of the process

    threading.Thread(target=hold, daemon=True, name="ray-local").start()
    done.wait()
    if failed:
        raise failed[0]


def _check_loopback(ray):
    """A local Ray listens on 127.0.0.1 only, or not at all: Ray imported before _set_ray_env
    ran would listen on the network."""
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith("127.0.0.1:"):
        ray.shutdown()
        raise RayUnavailable(f"a local Ray would listen on the network ({gcs}), not on 127.0.0.1 only: "
                             "Ray was imported before peftcore.service.ray_executor.connect")


# ------------------------------------------------------------------ the worker processes
class Worker:
    """One worker process (a Ray actor): a lane's runs, rebuilt from data, on its device."""

    def __init__(self, device="cpu"):
        torch.set_num_threads(1)  # as the in-process lanes: same kernels, same bits
        self.runs = WorkerRuns(device)
        from ..train import warm_up
        try:  # its first run pays no one-time setup (~3 s: lazy imports, kernel selection)
            warm_up(self.runs.base("pretrained")[0], device)
        except Exception:  # noqa: BLE001 - best effort: a failing warm-up must not kill the worker
            # (an actor whose __init__ raises is dead, and every run on it would only say "the
            # worker stopped"); a run that fails the same way says why on its page
            log.exception("warming up a worker failed; its runs will report their own errors")

    def pid(self):
        return os.getpid()

    def add(self, run_id, spec):
        return self.runs.add(run_id, spec)

    def step(self, max_s=STEP_S):
        return self.runs.step(max_s)

    def finish(self, run_id):
        return self.runs.finish(run_id)


class WorkerPool:
    """The service's executor: a lane takes a free worker process and gives it back at its
    end; a dead one is replaced. Created inside the service actor."""
    needs_model = False  # runs are data; the workers build the models

    def __init__(self, cpu_workers, gpu_workers=0):
        ray = _ray()
        self._actor = ray.remote(Worker)
        self._lock = threading.Lock()
        self.free = [self._new("cuda") for _ in range(gpu_workers)] + [self._new("cpu") for _ in range(cpu_workers)]
        self.slots = len(self.free)
        self.busy = {}  # run id -> the worker training it

    def _new(self, device):
        gpu = device == "cuda"
        handle = self._actor.options(num_cpus=1, num_gpus=1 if gpu else 0).remote(device)
        return dict(handle=handle, device=device, capacity=GPU_COHORT if gpu else 1)

    def cohort_key(self, run):
        return run.spec.cohort_key(run.kwargs.get("batch_size", 64))

    def open(self, run):
        """A session on a free worker: a GPU one for a run that can ride in a cohort."""
        with self._lock:
            worker = next((w for w in self.free if (w["capacity"] > 1) == (run.cohort is not None)), self.free[0])
            self.free.remove(worker)
        return WorkerSession(self, worker)

    def give_back(self, worker, dead):
        if dead:
            _ray().kill(worker["handle"], no_restart=True)
            worker = self._new(worker["device"])  # starts in the background; its first call waits for it
        with self._lock:
            self.free.append(worker)

    def pids(self):
        """{run id: pid of the worker process training it}."""
        with self._lock:
            busy = dict(self.busy)
        return {run_id: _ray().get(w["handle"].pid.remote()) for run_id, w in busy.items()}


class WorkerSession:
    """A lane on one worker process (executors' session interface)."""

    def __init__(self, pool, worker):
        self.pool, self.worker, self.capacity = pool, worker, worker["capacity"]
        self.runs, self.dead = {}, False

    def __len__(self):
        return len(self.runs)

    def _call(self, method, *args):
        ray = _ray()
        if self.dead:
            raise RemoteError(WORKER_DIED)
        try:
            return ray.get(getattr(self.worker["handle"], method).remote(*args))
        except ray.exceptions.RayActorError:
            self.dead = True
            raise RemoteError(WORKER_DIED) from None

    def add(self, run):
        error = self._call("add", run.id, run.spec.to_dict())
        if error:
            raise RemoteError(error)
        self.runs[run.id] = run
        self.pool.busy[run.id] = self.worker

    def step(self):
        try:
            out = self._call("step", STEP_S)
        except RemoteError as e:
            return [(run, e) for run in self.runs.values()]
        return [(self.runs[i], event if event is not None else RemoteError(error)) for i, event, error in out]

    def remove(self, run):
        self.pool.busy.pop(run.id, None)
        if self.runs.pop(run.id, None) is not None and not self.dead:
            run.phi = self._call("finish", run.id)

    def close(self):
        self.pool.give_back(self.worker, self.dead)


# ------------------------------------------------------------------ the service
class RunService:
    """The one RunManager of a class, in a named actor; every web server calls it. Answers
    are plain data: a refusal is {"refused": message, "reason": cap}, never an exception."""

    def __init__(self, cpu_workers, gpu_workers=0, manager_kwargs=None):
        self.pool = WorkerPool(cpu_workers, gpu_workers)
        self.manager = RunManager(executor=self.pool, torch_threads=None, **(manager_kwargs or {}))
        self.seen = {}  # owner -> when a web server last reported it connected

    def start(self, spec, label, owner, client, shared):
        self.seen[owner] = time.time()
        try:
            run = self.manager.start(RunSpec.from_dict(spec), label, owner=owner, client=client, shared=shared)
        except QueueFull as e:
            return {"refused": str(e), "reason": e.reason}
        return self._snapshot(run, -1)

    def stop(self, run_id, owner):
        run = self.manager.runs.get(run_id)
        return run is not None and self.manager.stop(run, owner)

    def reap(self, connected):
        """`connected`: owners one web server has open tabs of. An owner is gone when no
        server reported it for HEARTBEAT_S, and its runs are reaped after the grace."""
        now = time.time()
        for owner in connected:
            self.seen[owner] = now
        self.manager.reap(lambda o: o is None or now - self.seen.get(o, 0.0) < HEARTBEAT_S)

    def poll(self, known):
        """{run id: its snapshot from event `n` on} for {run id: n} (n = -1: the whole run)."""
        return {i: self._snapshot(self.manager.runs[i], n) if i in self.manager.runs else None
                for i, n in known.items()}

    def line(self, run_id):
        """(place in line, estimated wait in s) of a waiting run; (None, None) otherwise."""
        run = self.manager.runs.get(run_id)
        if run is None:
            return None, None
        return self.manager.place_in_line(run), self.manager.estimated_wait(run)

    def phi(self, run_id):
        run = self.manager.runs.get(run_id)
        return run.phi if run is not None else None

    def info(self):
        return dict(slots=self.manager.max_concurrent, active=len(self.manager.active()),
                    seconds_per_step=self.manager.seconds_per_step())

    def worker_pids(self):
        return self.pool.pids()

    def _snapshot(self, run, n):
        # `at` first, then the state: a snapshot with a later `at` saw every change that an
        # earlier one saw (starts from several threads answer out of order: a mirror must not
        # go back to an older owner list)
        snap = dict(at=time.monotonic(), id=run.id, status=run.status, events=run.events[max(n, 0):], error=run.error,
                    owners=sorted(run.owners, key=str), joined=run.joined, started=run.started)
        if n < 0:  # the whole run: what a mirror is built from
            snap.update(spec=run.spec.to_dict(), label=run.label)
        return snap


def service(name=SERVICE, cpu_workers=None, gpu_workers=None, **manager_kwargs):
    """The named run service, created on first use with one worker per CPU (and per GPU) of
    the cluster as it is now; later calls, from any process, get the same actor."""
    ray = _ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if gpu_workers is None else gpu_workers
    cpus = max(1, int(resources.get("CPU", 1)) - gpus) if cpu_workers is None else cpu_workers
    actor = ray.remote(RunService).options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                                           num_cpus=0, max_concurrency=64)
    return actor.remote(cpus, gpus, manager_kwargs)


# ------------------------------------------------------------------ a web process's side
@functools.lru_cache(maxsize=None)
def shipped_base(name, device="cpu"):
    """This process's copy of a shipped base (the app passes its own cached bases instead)."""
    return SHIPPED_BASES[name](device=device)


class _Runs(dict):
    """Run id -> mirror. A run started by another web server (a shared link) is adopted on
    first lookup; unknown ids are remembered, so a stale link costs one call."""

    def __init__(self, manager):
        super().__init__()
        self._manager, self._unknown = manager, set()

    def __contains__(self, run_id):
        if dict.__contains__(self, run_id):
            return True
        if not isinstance(run_id, str) or not run_id.isalnum() or len(run_id) > 32 or run_id in self._unknown:
            return False
        if len(self._unknown) > 4096:
            self._unknown.clear()
        if self._manager._adopt(run_id) is None:
            self._unknown.add(run_id)
            return False
        return True


class RayRunManager:
    """RunManager's interface, for one web process, over the shared RunService."""

    def __init__(self, service_handle, base_of=None, poll_s=POLL_S, max_kept=256):
        self.ray, self.service = _ray(), service_handle
        self.base_of = base_of or shipped_base  # (base name, device) -> this process's base
        self.poll_s, self.runs = poll_s, _Runs(self)
        self.max_kept = max_kept  # mirrors held; a forgotten one is adopted again when next looked up
        self._lock = threading.Lock()  # mirrors are updated by the sync thread and by stop()
        self._line, self._last_reap, self._closed = {}, 0.0, threading.Event()
        self._at = {}  # run id -> the service's `at` of the newest snapshot applied to its mirror
        info = self.ray.get(service_handle.info.remote())
        self.max_concurrent = info["slots"]
        self._thread = threading.Thread(target=self._sync, daemon=True, name="ray-runs-sync")
        self._thread.start()
        _CLIENTS.append(self)

    # ---------------------------------------------------------------- the interface
    def start(self, spec, label="", owner=None, client=None, shared=True) -> Run:
        """As RunManager.start: the run travels to the service as data."""
        snap = self.ray.get(self.service.start.remote(spec.to_dict(), label, owner, client, shared))
        if "refused" in snap:
            raise QueueFull(snap["refused"], snap["reason"])
        self._line.clear()
        with self._lock:
            run = self.runs.get(snap["id"]) or self._mirror(snap)
            self._apply(run, {**snap, "events": snap["events"][len(run.events):]})
        return run

    def stop(self, run, owner=None):
        stops = self.ray.get(self.service.stop.remote(run.id, owner))
        self._line.clear()
        self._refresh([run])
        return stops

    def reap(self, connected):
        """Report this process's connected owners to the service (at most once a second)."""
        now = time.time()
        if now - self._last_reap < 1.0:
            return
        self._last_reap = now
        owners = {o for r in list(self.runs.values()) if not r.finished for o in r.owners}
        self.service.reap.remote([o for o in owners if connected(o)])

    def active(self):
        return [r for r in list(self.runs.values()) if not r.finished]

    def place_in_line(self, run):
        return self._line_of(run)[0]

    def estimated_wait(self, run):
        return self._line_of(run)[1]

    def seconds_per_step(self):
        return self.ray.get(self.service.info.remote())["seconds_per_step"]

    def worker_pids(self):
        """{run id: pid of the worker process training it} (tests kill one)."""
        return self.ray.get(self.service.worker_pids.remote())

    def shutdown(self, timeout=5.0):
        """Stop following the service (its runs go on for the other web servers)."""
        self._closed.set()
        self._thread.join(timeout)

    # ---------------------------------------------------------------- mirrors
    def _line_of(self, run):
        """A waiting run's place and wait, asked once per half second (a page asks both)."""
        if run.status != QUEUED:
            return None, None
        cached = self._line.get(run.id)
        if cached is None or time.time() - cached[0] > 0.5:
            cached = self._line[run.id] = (time.time(), *self.ray.get(self.service.line.remote(run.id)))
        return cached[1:]

    def _mirror(self, snap):
        """A Run here for a run of the service, its model built on this process's base
        (untrained until its phi comes back). Holds the lock."""
        spec = RunSpec.from_dict(snap["spec"])
        from ..train import resolve_device
        base = self.base_of(spec.base, resolve_device(spec.train.get("device", "auto")))
        run = Run(spec, spec.build(base), snap["label"], id=snap["id"])
        for old in finished_beyond(self.runs, self.max_kept):  # as RunManager: memory bounded over a class
            dict.__delitem__(self.runs, old.id)
            self._at.pop(old.id, None)
        dict.__setitem__(self.runs, run.id, run)
        return run

    def _adopt(self, run_id):
        snap = self.ray.get(self.service.poll.remote({run_id: -1}))[run_id]
        if snap is None:
            return None
        with self._lock:
            run = dict.get(self.runs, run_id) or self._mirror(snap)
            self._apply(run, snap)
        return run

    def _apply(self, run, snap):
        """Bring a mirror up to its snapshot. A finished run's status comes last, once its
        model holds the trained phi. Holds the lock."""
        if run.finished:
            return
        if snap is None:
            snap = dict(status=FAILED, error="the run service no longer has this run (it was restarted)", events=[])
        run.events.extend(snap["events"])  # always new ones: every caller slices them by count
        at = snap.get("at")
        if at is not None and at < self._at.get(run.id, at):
            return  # an older answer than one applied already (a start on another thread)
        if at is not None:
            self._at[run.id] = at
        run.owners, run.joined = set(snap.get("owners", ())), snap.get("joined", run.joined)
        run.error, run.started = snap.get("error", ""), snap.get("started", run.started)
        status = snap["status"]
        if status in (DONE, STOPPED):
            status = self._install_phi(run, status)
        run.status = status
        if run.finished:
            run._ended.set()

    def _install_phi(self, run, status):
        """Load the worker's phi into the mirror's model, with an uploaded file's checks."""
        from ..serialization import AdapterLoadError
        data = self.ray.get(self.service.phi.remote(run.id))
        if data is None:  # stopped before it ever trained: the untrained phi is its phi
            return status
        try:
            run.model = load_trained(run.model._base[0], data)
        except AdapterLoadError as e:
            run.error = f"the phi the worker sent back does not load here: {e}"
            return FAILED
        return status

    def _refresh(self, runs):
        runs = [r for r in runs if not r.finished]
        if not runs:
            return
        known = {r.id: len(r.events) for r in runs}
        snaps = self.ray.get(self.service.poll.remote(known))
        with self._lock:
            for run in runs:
                snap = snaps.get(run.id)
                if snap is not None:  # skip what another update (a stop) applied meanwhile
                    snap = {**snap, "events": snap["events"][len(run.events) - known[run.id]:]}
                self._apply(run, snap)

    def _sync(self):
        """Keep every unfinished mirror fresh, one call per POLL_S for all of them."""
        while not self._closed.wait(self.poll_s):
            try:
                self._refresh(list(self.runs.values()))
            except self.ray.exceptions.RayActorError:
                with self._lock:
                    for run in [r for r in self.runs.values() if not r.finished]:
                        self._apply(run, dict(status=FAILED, events=[], error="the run service stopped"))
            except Exception:  # noqa: BLE001 - logged; the next poll tries again
                log.exception("refreshing runs from the run service failed")


_CLIENTS = []


@atexit.register
def _close_clients():
    for client in _CLIENTS:
        client.shutdown()


def ray_manager(base_of=None, address=None, num_cpus=None, name=SERVICE, **manager_kwargs):
    """A RayRunManager on the named service of the cluster at `address` ($RAY_ADDRESS; none:
    a local Ray of `num_cpus`), creating the service if this is its first web server.
    Raises RayUnavailable (one line) when Ray is not installed or not reachable."""
    connect(address, num_cpus)
    return RayRunManager(service(name, **manager_kwargs), base_of)
