"""Training runs in background threads, so a web page can start, watch and stop them.

A run lives in the server process, not in the page: a rerun, a widget change or a
refresh only re-reads `run.events`. The manager is built for a class on one server:

- a fair queue: at most `max_concurrent` runs train at once (one per core: more would
  only make every run crawl); the rest wait round-robin by owner: a visitor's k-th waiting
  run waits behind every other visitor's earlier-ranked ones, so many tabs cannot crowd out
  a newcomer. Each waiting run has its place in line and an estimate of the wait;
- bounded per visitor: an owner (a visitor, across tabs) may have `max_per_owner` runs
  training or waiting, a client address `max_per_client`, the server `max_waiting` waiting;
  beyond a cap a start raises QueueFull, whose message tells the visitor why;
- identical runs computed once: a shared start whose spec equals a queued or training run's
  joins it, so thirty students pressing Train on the defaults cost one computation;
- cohorts: a slot is a lane, a thread that steps its runs together (peftcore.cohort: one
  forward and backward for all). A run that can ride in a training lane of its cohort
  (same base, method family, batch size and device) joins it at the next step instead of
  waiting for a slot, up to `max_cohort` runs per lane. On a GPU that is nearly free; on
  a CPU it is not (the step's cost grows with its rows, BENCHMARKS.md), so there a lane
  holds one run and the rest queue: more runs than cores wait rather than all crawl;
- owners: a run belongs to the owners who started or joined it. Only an owner may stop
  it; a stop detaches that owner, and the run stops when no owner is left, or when
  `reap()` finds none of its owners still connected;
- executors: this file decides which run trains when; an executor (peftcore.service.executors)
  trains it. In-process, the default: a lane is a thread stepping a Cohort of live models.
  Ray (peftcore.service.ray_executor): a lane drives a worker process that rebuilds the run from
  its RunSpec (data) and sends its events and phi back; the same RunManager then lives in
  one named actor, shared by every web server of a lecture hall.
"""
import atexit
import collections
import os
import threading
import time
import traceback
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..train import resolve_device
from .executors import InProcess, describe, shipped_base

QUEUED, RUNNING, DONE, STOPPED, FAILED = "queued", "running", "done", "stopped", "failed"


class QueueFull(RuntimeError):
    """A start refused by a cap; the message tells the visitor why. `reason` names the cap:
    "owner" (this visitor's runs, across tabs), "client" (this address's) or "server"."""

    def __init__(self, message, reason="server"):
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class Run:
    spec: object  # the whole run as data (executors.RunSpec): config, task, seed, base, training arguments
    model: object = None  # its live model where it trains or shows here (None in a Ray service)
    label: str = ""
    key: object = None  # runs with equal keys are the same computation (None: never joined)
    cohort: object = None  # runs with equal cohort keys may train together (None: alone)
    phi: bytes = None  # phi's file bytes, when a worker process trained it (None in-process)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    status: str = QUEUED
    events: list = field(default_factory=list)  # TrainEvents, appended by the worker
    error: str = ""
    owners: set = field(default_factory=set)  # who may stop it; it trains while any is left
    clients: dict = field(default_factory=dict)  # owner -> the address it started or joined from
    joined: int = 0  # starts that joined this run instead of computing it again (any owner's)
    created: float = field(default_factory=time.time)
    started: float = None
    _round: int = field(default=0, repr=False)  # its place in the fair queue's round-robin
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _ended: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self):
        return self.status in (DONE, STOPPED, FAILED)

    @property
    def shared(self):
        return self.joined > 0

    def other_owners(self, owner):
        """Visitors other than `owner` who share this run: a visitor's own second tab is not one."""
        return len(self.owners - {owner})

    @property
    def last(self):
        return self.events[-1] if self.events else None

    @property
    def task(self):
        return self.spec.task

    @property
    def kwargs(self):
        """train()'s keyword arguments (a fresh dict: the spec is the one carrier)."""
        return self.spec.train_kwargs

    @property
    def steps(self):
        return self.spec.train.get("steps", 0)

    def wait(self, timeout=None):
        self._ended.wait(timeout)
        return self


@dataclass(eq=False)
class Lane:
    """A training slot: one thread stepping its runs together through an executor's session
    (a Cohort in this process, or one worker process)."""
    cohort: object  # the runs' cohort key; None: a lane of one run
    session: object = None  # the executor's: where its runs train
    capacity: int = 1  # runs it may step together
    runs: list = field(default_factory=list)  # placed here; a new one starts at the next step
    thread: threading.Thread = None


def default_cohort_size():
    """Runs one lane steps together: 32 on a GPU (a step of 32 costs little more than one);
    1 on a CPU, where a step's time grows with its rows (K=32: ~30x one run's step)."""
    return 32 if torch.cuda.is_available() else 1


def default_concurrency():
    """One training run per core the process may use (the GPU, when present, takes a few
    more: its runs are bound by kernel launches, not by the device)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores) + (4 if torch.cuda.is_available() else 0)


_MANAGERS = weakref.WeakSet()


@atexit.register
def _stop_every_run():
    """Stop the runs before the interpreter exits: a daemon thread still inside a torch op
    while the process tears torch down aborts it ("terminate called...", exit code 134)."""
    for manager in list(_MANAGERS):
        manager.shutdown()


def finished_beyond(runs, max_kept):
    """The oldest finished runs of `runs` (id -> Run) to drop so that one more fits in
    `max_kept`: how a manager bounds its memory over a long class."""
    finished = sorted((r for r in runs.values() if r.finished), key=lambda r: r.created)
    return finished[:max(0, len(runs) + 1 - max_kept)]


@runtime_checkable
class RunService(Protocol):
    """What the app asks of a run service, in this process (RunManager) or shared over Ray
    (ray_executor.RayRunManager): tests/test_runs.py checks both against it."""
    runs: dict  # run id -> Run: the runs this service holds (or mirrors)

    def start(self, spec, label="", owner=None, client=None, shared=True) -> Run: ...

    def stop(self, run, owner=None) -> bool: ...

    def reap(self, connected) -> None: ...

    def active(self) -> list: ...

    def place_in_line(self, run): ...

    def estimated_wait(self, run): ...

    def seconds_per_step(self): ...

    def shutdown(self, timeout=10.0) -> None: ...


class RunManager:
    """Starts runs in daemon threads through a queue fair across owners; keeps at most
    `max_kept` runs, dropping the oldest finished ones first. The per-owner and per-client
    caps apply to starts that name an owner / a client (a script passing neither is not a
    visitor). A class behind one NAT or proxy shares one address: raise max_per_client there."""

    def __init__(self, max_concurrent=None, max_waiting=60, max_kept=256, torch_threads=1, grace_s=20.0,
                 max_cohort=None, max_per_owner=4, max_per_client=8, executor=None, base_of=None):
        # Many small runs at once: parallel across runs, one thread inside each op. Two
        # OpenMP threads per tiny matmul on busy cores run several times slower (BENCHMARKS.md).
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.executor = executor or InProcess()
        self.base_of = base_of or shipped_base  # (base name, device) -> the frozen base a run's model wraps
        self.max_concurrent = max_concurrent or self.executor.slots or default_concurrency()  # lanes
        self.max_cohort = max_cohort or default_cohort_size()  # runs per lane (in-process)
        self.max_waiting = max_waiting
        self.max_per_owner, self.max_per_client = max_per_owner, max_per_client  # None: no cap
        self.max_kept = max_kept
        self.grace_s = grace_s  # how long a run outlives its last connected owner (a refresh)
        self._lock = threading.Lock()
        self._queue = collections.deque()  # waiting runs in arrival order; _line() is the fair order
        self._round = 0  # the latest round a waiting run was dispatched from
        self._running = set()  # runs placed in a lane, until they end
        self._lanes = []
        self._orphaned = {}  # run id -> when it was first seen with no owner connected
        self._last_reap = 0.0
        self.runs = {}
        _MANAGERS.add(self)

    # ------------------------------------------------------------ starting and joining
    def start(self, spec, label="", owner=None, client=None, shared=True, model=None) -> Run:
        """Queue run `spec` (executors.RunSpec) for `owner` (a visitor) from `client` (an
        address) and return it; with `shared`, a live run of an equal spec is joined and
        returned instead. Raises QueueFull when a cap refuses the start. Where runs train in
        this process, the model is built from the spec on `base_of`'s base (or given as
        `model`), outside the lock: another start waits for no build."""
        key = spec.key() if shared else None
        with self._lock:
            twin = self._join(key, owner, client)
        if twin is not None:
            return twin
        if self.executor.needs_model and model is None:
            model = spec.build(self.base_of(spec.base, resolve_device(spec.train.get("device", "auto"))))
        with self._lock:
            twin = self._join(key, owner, client)  # an equal run may have started meanwhile
            if twin is not None:
                return twin
            run = Run(spec, model if self.executor.needs_model else None, label, key=key,
                      owners={owner}, clients={owner: client})
            run.cohort = self.executor.cohort_key(run)
            # Round-robin by owner: a run's round is one after its owner's last waiting run,
            # and never before the round now being dispatched, so a visitor's k-th waiting
            # run goes after every other visitor's earlier ones. Rounds are fixed on arrival:
            # a place in line only moves forward (a newcomer may take its fair place ahead).
            mine = [r._round + 1 for r in self._queue if owner in r.owners]
            run._round = max([self._round] + mine)
            self._forget_finished()
            self.runs[run.id] = run
            self._queue.append(run)
            self._dispatch()
        return run

    def _join(self, key, owner, client):
        """The live run of `key` with `owner` joined to it, or None; QueueFull if a cap
        refuses this start. Holds the lock."""
        twin = self._twin(key)
        self._check_caps(owner, client, twin)
        if twin is not None:
            twin.joined += 1
            twin.owners.add(owner)
            twin.clients[owner] = client
        return twin

    def _check_caps(self, owner, client, twin):
        """Raise QueueFull if this start would put `owner`, `client` or the server over its
        cap. A join counts toward the joiner's caps, unless it already shares that run (a
        second tab of the same visitor)."""
        live = [r for r in self.runs.values() if not r.finished]
        if owner is not None and self.max_per_owner and not (twin and owner in twin.owners):
            n = sum(owner in r.owners for r in live)
            if n >= self.max_per_owner:
                raise QueueFull(f"You already have {n} runs training or waiting (across your tabs): "
                                "stop one or wait for one to finish.", "owner")
        if client is not None and self.max_per_client and not (twin and client in twin.clients.values()):
            n = sum(client in r.clients.values() for r in live)
            if n >= self.max_per_client:
                raise QueueFull(f"This address already has {n} runs training or waiting (every visitor on "
                                "it counts): stop one or wait for one to finish.", "client")
        if twin is None and len(self._queue) >= self.max_waiting:
            raise QueueFull(f"The server's queue is full ({len(self._queue)} runs waiting for "
                            f"{self.max_concurrent} training slots): try again in a minute.", "server")

    def _line(self):
        """The waiting runs in dispatch order: by round, then arrival. Holds the lock."""
        return sorted(self._queue, key=lambda r: r._round)  # stable: a round keeps arrival order

    def _twin(self, key):
        if key is None:
            return None
        return next((r for r in self.runs.values() if r.key == key and not r.finished and not r._stop.is_set()), None)

    def _dispatch(self):
        """Place queued runs in the fair order: into a training lane of their cohort with room,
        else into a free slot (a new lane); the others keep their place. Holds the lock."""
        for run in self._line():
            lane = next((ln for ln in self._lanes if run.cohort is not None and ln.cohort == run.cohort
                         and len(ln.runs) < ln.capacity), None)
            if lane is None and len(self._lanes) < self.max_concurrent:
                session = self.executor.open(run)
                lane = Lane(run.cohort, session, getattr(session, "capacity", None) or self.max_cohort)
                self._lanes.append(lane)
                lane.thread = threading.Thread(target=self._work, args=(lane,), daemon=True, name=f"run-{run.id}")
                lane.thread.start()
            if lane is not None:
                self._round = max(self._round, run._round)
                self._queue.remove(run)
                lane.runs.append(run)
                self._running.add(run)
                run.status, run.started = RUNNING, time.time()

    def _forget_finished(self):
        """Bound the server's memory: drop the oldest finished runs beyond max_kept."""
        for run in finished_beyond(self.runs, self.max_kept):
            del self.runs[run.id]

    # ------------------------------------------------------------ stopping
    def stop(self, run, owner=None):
        """Detach `owner` from `run`; stop it when no owner is left. Returns whether the run
        stops. Someone who does not own the run changes nothing."""
        with self._lock:
            if owner not in run.owners:
                return False
            run.owners.discard(owner)
            run.clients.pop(owner, None)
            if run.owners:
                return False
            self._cancel(run)
            return True

    def _cancel(self, run):
        run._stop.set()
        if run in self._queue:  # never started: it leaves the line at once
            self._queue.remove(run)
            run.status = STOPPED
            run._ended.set()

    def shutdown(self, timeout=10.0):
        """Stop every run, waiting ones first, and wait up to `timeout` s for the lanes' threads to end."""
        with self._lock:
            for run in list(self._queue) + list(self._running):
                self._cancel(run)
            threads = [lane.thread for lane in self._lanes]
        deadline = time.time() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.time()))

    def reap(self, connected):
        """Stop runs none of whose owners is `connected(owner)` for `grace_s` seconds: a
        closed tab frees its slot, a refresh (back within the grace) keeps its run. Every
        session's live panel calls it; at most one pass a second does the work."""
        now = time.time()
        if now - self._last_reap < 1.0:
            return
        self._last_reap = now
        with self._lock:
            for run in list(self._queue) + list(self._running):
                if any(connected(o) for o in run.owners):
                    self._orphaned.pop(run.id, None)
                elif now - self._orphaned.setdefault(run.id, now) >= self.grace_s:
                    run.owners.clear()
                    run.clients.clear()
                    self._cancel(run)
                    self._orphaned.pop(run.id, None)

    # ------------------------------------------------------------ the line
    def active(self):
        with self._lock:
            return [r for r in self.runs.values() if not r.finished]

    def place_in_line(self, run):
        """1 for the next run to start (in the fair order), None once it trains (or ended)."""
        with self._lock:
            return self._line().index(run) + 1 if run in self._queue else None

    def seconds_per_step(self):
        """Measured: wall seconds per training step of recent runs, one slot each."""
        with self._lock:  # a start on another thread may add a run meanwhile
            runs = list(self.runs.values())
        recent = [r for r in runs if r.last and r.last.step >= 5][-16:]
        if not recent:
            return None
        return sum(r.last.elapsed / r.last.step for r in recent) / len(recent)

    def estimated_wait(self, run):
        """Seconds until `run` gets a slot: the steps left ahead of it, over the slots.
        None before any run has been measured on this server."""
        per_step = self.seconds_per_step()
        place = self.place_in_line(run)
        if per_step is None or place is None:
            return None
        with self._lock:
            ahead = self._line()[:place - 1]
            left = [r.steps - (r.last.step if r.last else 0) for r in self._running]
        # the slots free up as the running runs end, then each waiting run takes one
        slots = sorted(left + [0] * (self.max_concurrent - len(left)))
        for r in ahead:
            slots[0] += r.steps
            slots.sort()
        return slots[0] * per_step

    # ------------------------------------------------------------ the worker
    def _work(self, lane):
        """Step the lane's runs together until none is left; new runs join between steps."""
        session, joined = lane.session, set()
        while True:
            with self._lock:
                joining = [r for r in lane.runs if r not in joined]
                if not lane.runs:
                    session.close()  # its slot (a worker process) is free again for the dispatch below
                    self._lanes.remove(lane)
                    self._dispatch()
                    return
            for run in joining:
                joined.add(run)
                try:
                    session.add(run)
                except Exception as e:  # bad settings: shown on the page; the lane carries on
                    self._end(lane, run, FAILED, e)
            if not session:
                continue
            stepped = {}  # a worker may send several steps of a run at once, in order
            for run, result in session.step():
                if run in stepped and stepped[run] is None:
                    continue  # it ended earlier in this batch
                if isinstance(result, Exception):
                    self._end(lane, run, FAILED, result)
                    stepped[run] = None
                    continue
                run.events.append(result)
                stepped[run] = result
                if result.done:
                    self._end(lane, run, DONE)
                    stepped[run] = None
            for run, last in stepped.items():
                if last is not None and run._stop.is_set():  # between steps: phi keeps what it learned
                    self._end(lane, run, STOPPED)

    def _end(self, lane, run, status, error=None):
        if error is not None:  # shown on the page; the server and the other runs carry on
            run.error = describe(error)
            traceback.print_exception(error)
        try:
            lane.session.remove(run)  # its phi is final now (a worker's comes back as file bytes)
        except Exception as e:  # its phi could not be had (the worker died at the end): it failed
            status, run.error = FAILED, describe(e)
        run.status = status
        with self._lock:
            lane.runs.remove(run)
            self._running.discard(run)
            self._orphaned.pop(run.id, None)
            self._dispatch()  # its place in the lane, or the lane itself, may go to a waiting run
        run._ended.set()
