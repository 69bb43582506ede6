"""Timing for a noisy, shared machine: medians of repeats, alternating between the things
compared so that a busy moment slows them all alike (a ratio measured this way is fair)."""
import statistics
import time

import torch


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def side_by_side(fns: dict, repeats=7, inner=1, warmup=1, device="cpu"):
    """{name: median seconds per call} of each fn, measured alternately."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn, repeats=7, device="cpu"):
    return side_by_side({"fn": fn}, repeats, device=device)["fn"]
