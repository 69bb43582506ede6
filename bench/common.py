"""Shared benchmark helpers: median timings of callables measured side by side."""
import platform
import statistics
import time

import torch

torch.set_num_threads(1)  # see BENCHMARKS.md: on 2 shared cores one thread per op is faster


def machine():
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, reps=7, inner=10, warmup=2, device="cpu"):
    """Median seconds per call of each fn, alternating between them on every repetition so
    that a noisy machine slows all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}
