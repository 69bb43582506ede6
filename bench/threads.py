"""Why the app and the tests use one torch thread: a training step with 1 and 2 intra-op
threads, on its own and beside one other busy process (as on a shared server).

    python -m bench.threads
"""
import multiprocessing as mp

import torch

import peftcore
from peftcore.presets import PRESETS
from peftcore.timing import median_seconds

from .common import machine
from .core import make_step


def busy(stop):
    """Another tenant: one thread of back-to-back matmuls."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a @ a


def step_ms(threads, method="LORA", reps=7):
    torch.set_num_threads(threads)
    base = peftcore.load_base()
    model = peftcore.get_peft_model(base, PRESETS[method].config, seed=0)
    step, _ = make_step(model, peftcore.TASKS["times_3"].batch(64, torch.Generator().manual_seed(0)))
    return 1000 * median_seconds(lambda: [step() for _ in range(5)], repeats=reps) / 5


def main():
    print(f"machine: {machine().split(',')[0]}, {mp.cpu_count()} cores\n")
    print("| method | neighbour | 1 thread ms/step | 2 threads ms/step | 2 threads / 1 thread |")
    print("|---|---|---:|---:|---:|")
    for neighbour in (False, True):
        stop = mp.Event()
        proc = mp.Process(target=busy, args=(stop,), daemon=True) if neighbour else None
        if proc:
            proc.start()
        try:
            for method in ("LORA", "FULL"):
                one, two = step_ms(1, method), step_ms(2, method)
                print(f"| {method} | {'one busy process' if neighbour else 'none'} | {one:.1f} | {two:.1f} | {two / one:.2f} |",
                      flush=True)
        finally:
            if proc:
                stop.set()
                proc.join()
    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
