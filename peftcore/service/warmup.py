"""A server's warm-up in the background: the core's warm_up (the first optimizer, forward,
backward and evaluation of a process, ~3 s on CPU) in a daemon thread, stopped and joined at
exit."""
import atexit
import threading
import time

from ..train import warm_up

_WARM_UPS = []  # (thread, stop event) of every warm-up started by start_warm_up


def start_warm_up(base, device="cpu"):
    """Run warm_up in a daemon thread (a server's start-up) and return the thread. At exit
    it is stopped between steps and joined: a daemon thread still inside a torch op while
    the interpreter tears torch down aborts the process ("terminate called...", exit 134)."""
    stop = threading.Event()
    thread = threading.Thread(target=warm_up, args=(base, device, stop), daemon=True, name="warm-up")
    _WARM_UPS[:] = [(t, e) for t, e in _WARM_UPS if t.is_alive()] + [(thread, stop)]
    thread.start()
    return thread


@atexit.register
def _stop_warm_ups(timeout=30.0):
    """Stop every warm-up and wait (bounded) for each to leave torch."""
    for _, stop in _WARM_UPS:
        stop.set()
    deadline = time.time() + timeout
    for thread, _ in _WARM_UPS:
        thread.join(max(0.0, deadline - time.time()))
