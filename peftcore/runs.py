"""Training runs in background threads, so a web page can start, poll and stop them.

A run lives in the server process, not in the page: a rerun, a widget change or a
refresh of the page only re-reads `run.events`. A server-wide limit bounds how many
runs train at once; the rest wait their turn in a queue.
"""
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import torch

from .train import train

QUEUED, RUNNING, DONE, STOPPED, FAILED = "queued", "running", "done", "stopped", "failed"


@dataclass
class Run:
    model: object
    task: str
    label: str = ""
    kwargs: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    status: str = QUEUED
    events: list = field(default_factory=list)  # TrainEvents, appended by the worker
    error: str = ""
    created: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread = field(default=None, repr=False)

    def stop(self):
        self._stop.set()

    @property
    def finished(self):
        return self.status in (DONE, STOPPED, FAILED)

    @property
    def last(self):
        return self.events[-1] if self.events else None

    def wait(self, timeout=None):
        if self._thread is not None:
            self._thread.join(timeout)
        return self


class RunManager:
    """Starts runs in daemon threads, at most `max_concurrent` training at once; keeps at
    most `max_kept` runs, dropping the oldest finished ones first."""

    def __init__(self, max_concurrent=4, max_kept=64, torch_threads=1):
        # Many small runs at once: parallel across runs, one thread inside each op. Two
        # OpenMP threads per tiny matmul on busy cores run several times slower (BENCHMARKS.md).
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.max_concurrent = max_concurrent
        self.max_kept = max_kept
        self._slots = threading.Semaphore(max_concurrent)
        self._lock = threading.Lock()
        self.runs = {}

    def start(self, model, task, label="", **train_kwargs) -> Run:
        run = Run(model, task, label, train_kwargs)
        run._thread = threading.Thread(target=self._work, args=(run,), daemon=True, name=f"run-{run.id}")
        with self._lock:
            self._forget_finished()
            self.runs[run.id] = run
        run._thread.start()
        return run

    def _forget_finished(self):
        """Bound the server's memory: drop the oldest finished runs beyond max_kept."""
        finished = sorted((r for r in self.runs.values() if r.finished), key=lambda r: r.created)
        for run in finished[:max(0, len(self.runs) + 1 - self.max_kept)]:
            del self.runs[run.id]

    def active(self):
        with self._lock:
            return [r for r in self.runs.values() if not r.finished]

    def _work(self, run):
        while not self._slots.acquire(timeout=0.1):  # queued: a stop cancels it
            if run._stop.is_set():
                run.status = STOPPED
                return
        try:
            run.status = RUNNING
            for event in train(run.model, run.task, **run.kwargs):
                run.events.append(event)
                if run._stop.is_set():
                    run.status = STOPPED
                    break
            else:
                run.status = DONE
        except Exception as e:  # shown on the page; the server and other runs carry on
            run.error = f"{type(e).__name__}: {e}"
            run.status = FAILED
            traceback.print_exc()
        finally:
            run.model.eval()
            self._slots.release()
