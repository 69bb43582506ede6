"""The default race, timed: every method's preset on one task, the same steps (the longest
preset's), started together on the in-process run service as the Train page starts them, with
Stop when solved on. Each race once with and once without stopping a run that has stopped
improving (ui.runs.PATIENCE_STEPS), alternately, median of --repeats.

    python -m bench.race [--task times_3] [--repeats 3]

Prints a markdown row per setting: seconds until the last run ends, and each run's last step.
"""
import argparse
import math
import statistics
import time

import peftcore
from peftcore.presets import PRESETS
from peftcore.service.executors import RunSpec
from peftcore.service.runs import RunManager

from .common import machine

PATIENCE_STEPS = 100  # as ui.runs.PATIENCE_STEPS (bench imports no app module)
EVAL_EVERY = 25       # ui.runs.eval_every(300)


def race(manager, base_fp, task, patience, seed):
    steps = max(p.train["steps"] for p in PRESETS.values())
    runs = []
    for peft_type, preset in PRESETS.items():
        train = dict(preset.train, steps=steps, eval_every=EVAL_EVERY, device="cpu", stop_when_solved=True)
        if patience:
            train["patience"] = math.ceil(PATIENCE_STEPS / EVAL_EVERY)
        runs.append(manager.start(RunSpec(preset.config.to_dict(), task, seed, "pretrained", base_fp, train),
                                  label=peft_type, owner=f"bench-{peft_type}", shared=False))
    t0 = time.perf_counter()
    while not all(r.finished for r in runs):
        time.sleep(0.05)
    return time.perf_counter() - t0, {r.label: r.last.step for r in runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="times_3")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = peftcore.load_base()
    manager = RunManager(max_per_owner=10, max_per_client=100, base_of=lambda which, device: base)
    fp = peftcore.fingerprint(base)
    times, steps = {False: [], True: []}, {}
    for i in range(args.repeats):
        for patience in (False, True):
            seconds, steps[patience] = race(manager, fp, args.task, patience, seed=i)
            times[patience].append(seconds)
    print(f"Default race on {args.task}, {len(PRESETS)} methods, {manager.max_concurrent} slots; {machine()}")
    print("| stops a run that stopped improving | race (s), median | runs' last steps (last repeat) |")
    print("|---|---|---|")
    for patience in (False, True):
        print(f"| {'yes' if patience else 'no'} | {statistics.median(times[patience]):.1f} "
              f"({', '.join(f'{t:.1f}' for t in times[patience])}) | "
              f"{', '.join(f'{k} {v}' for k, v in steps[patience].items())} |")


if __name__ == "__main__":
    main()
