"""The whole class in one step: the time of one step of K LoRA runs stepped together (one
forward and backward over their batches, peftcore.cohort) against one run's step.

    python -m bench.cohort [--device cpu|cuda] [--ks 1 4 8 32] [--batch 64]

Each K is a cohort of distinct runs (own phi seed and data stream) on the shared base,
default LoRA preset, no evaluations; the cohorts are timed alternately (median of 7 repeats
of 5 steps), so a busy moment on a shared machine slows them all alike. Prints a markdown
row per K: ms per step, that over one run's step, and runs trained per second of step.
"""
import argparse

import torch

import peftcore
from peftcore.cohort import Cohort
from peftcore.presets import PRESETS
from peftcore.timing import side_by_side
from peftcore.train import Trainer

from .common import machine


def cohort_of(base, k, device, batch):
    models = [peftcore.get_peft_model(base, PRESETS["LORA"].config, seed=i) for i in range(k)]
    return Cohort([Trainer(m, "times_3", 10**9, seed=i, batch_size=batch, eval_every=10**9, device=device)
                   for i, m in enumerate(models)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the app's runs train
    device = peftcore.resolve_device(args.device)
    base = peftcore.load_base(device=device)
    ks = sorted({1, *args.ks})  # one run alone is the yardstick
    cohorts = {k: cohort_of(base, k, device, args.batch) for k in ks}
    ms = side_by_side({k: lambda c=c: [c.step() for _ in range(5)] for k, c in cohorts.items()},
                      repeats=7, warmup=2, device=device)
    print(f"`python -m bench.cohort --device {device} --ks {' '.join(map(str, ks))}`\n")
    print(f"machine: {machine()}, batch {args.batch} per run\n")
    print("| K runs together | ms per step | x one run's step | runs' steps per second |")
    print("|---:|---:|---:|---:|")
    for k, t in ms.items():
        print(f"| {k} | {1000 * t / 5:.1f} | {t / ms[1]:.2f} | {5 * k / t:.1f} |")


if __name__ == "__main__":
    main()
