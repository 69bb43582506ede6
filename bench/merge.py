"""Many phi become one: each combination of add_weighted_adapter for 2, 10 and 30 LoRA phi, timed
as a class would use it (merge, then score the merged phi on every source task in one mixed batch
of their held-out sets), and what the merged phi reaches on each task. Issue 34's target: 30 phi
merged and scored in at most 2 s on 2 CPU cores.

The phi are the library's trained LoRA phi, one per task; a class of N is those, each "student"
a copy with seeded noise of 1% of the phi's scale (a class trains the same tasks with other seeds;
training 30 here would take minutes). Weights 1/N each (the mean), or 1 each (the sum: task
arithmetic).

    python -m bench.merge [--sizes 2 10 30] [--repeats 5] [--weights mean sum] [--task times_3]

A class on one task (--task, the default class) merges into a phi that still solves it; phi of
different tasks do not merge into one that does any of them: their inputs look alike, so one
model cannot tell which map to apply.
"""
import argparse
import statistics
import time

import torch

import peftcore
from peftcore import PeftModel, library
from peftcore.tasks import answer_metrics

from .common import machine

COMBINATIONS = {"cat": {}, "svd": {}, "linear": {}, "ties": dict(density=0.5), "magnitude_prune": dict(density=0.5),
                "dare_linear": dict(density=0.5, seed=0), "dare_ties": dict(density=0.5, seed=0),
                "ties_svd": dict(density=0.5)}


def class_bank(base, n, task=None):
    """A bank holding n LoRA phi: the library's, cycled over its tasks (or all of `task`), each
    copy with seeded noise."""
    bank, shipped = PeftModel(base), [(name, d) for name, d in library.entries() if name.startswith("lora-")
                                      and (task is None or d.name == task)]
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        name, d = shipped[i % len(shipped)]
        student = f"s{i}"
        bank.load_adapter(d, student)
        with torch.no_grad():
            for _, p in bank.named_adapter_parameters(student):
                p.add_(torch.randn(p.shape, generator=g) * 0.01 * p.abs().mean())
        bank._bump()
    return bank


def merge_and_score(bank, students, kind, options, repeat, weight):
    """Seconds to merge the students' phi and score the result on their tasks in one mixed batch,
    and the merged phi's exact match per task."""
    tasks = sorted({bank.adapter_task[s] for s in students})
    sets = [peftcore.TASKS[t].eval_set() for t in tasks]
    x = torch.cat([s[0] for s in sets])
    t0 = time.perf_counter()
    merged = f"merged-{kind}-{repeat}"
    bank.add_weighted_adapter(students, [weight] * len(students), merged, combination_type=kind, **options)
    with torch.no_grad():
        logits = bank(x, adapter_names=[merged] * len(x))
    seconds = time.perf_counter() - t0
    exact, start = {}, 0
    for task, (xs, ys) in zip(tasks, sets):
        exact[task] = answer_metrics(logits[start:start + len(xs)], ys)[0]
        start += len(xs)
    bank.delete_adapter(merged)
    return seconds, exact


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", type=int, default=[2, 10, 30])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", nargs="*", default=["mean", "sum"], choices=["mean", "sum"])
    ap.add_argument("--task", default=None, help="every student on this task (default: the library's five, cycled)")
    args = ap.parse_args()
    base = peftcore.load_base()
    print(f"machine: {machine()}; median of {args.repeats}")
    print("| phi | weights | combination | seconds (merge + score) | exact match of the merged phi per task |\n"
          "|---:|---|---|---:|---|")
    for n in args.sizes:
        bank = class_bank(base, n, args.task)
        students = [f"s{i}" for i in range(n)]
        for weighting in args.weights:
            weight = 1 / n if weighting == "mean" else 1.0
            for kind, options in COMBINATIONS.items():
                runs = [merge_and_score(bank, students, kind, options, r, weight) for r in range(args.repeats)]
                seconds = statistics.median(s for s, _ in runs)
                exact = ", ".join(f"{t} {e:.2f}" for t, e in runs[0][1].items())
                print(f"| {n} | {weighting} | {kind} | {seconds:.3f} | {exact} |", flush=True)


if __name__ == "__main__":
    main()
