"""Each method's default preset on each downstream task: phi%, accuracy, wall seconds.

    python -m bench.presets [--random-base]
"""
import argparse
import time

import peftcore
from peftcore.presets import PRESETS

from .common import machine


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--random-base", action="store_true", help="PEFT on a randomly initialised frozen base")
    ap.add_argument("--tasks", nargs="*", default=list(peftcore.TASKS))
    ap.add_argument("--methods", nargs="*", default=list(PRESETS))
    args = ap.parse_args()
    base = peftcore.random_base() if args.random_base else peftcore.load_base()
    n_base = sum(p.numel() for p in base.parameters())
    print(f"machine: {machine()}; base {'random' if args.random_base else 'pretrained'}")
    print(f"| method | phi % | task | exact match | token acc | seconds |")
    print(f"|---|---:|---|---:|---:|---:|")
    for method in args.methods:
        preset = PRESETS[method]
        if args.random_base and method == "Full fine-tuning":
            continue
        for task in args.tasks:
            model = peftcore.get_peft_model(base, preset.config, seed=0)
            t0 = time.perf_counter()
            last = peftcore.run(model, task, device="cpu", **preset.train)
            secs = time.perf_counter() - t0
            phi = model.get_nb_trainable_parameters()[0]
            print(f"| {method} | {100 * phi / n_base:.2f} | {task} | {last.eval_exact:.3f} | "
                  f"{last.eval_token:.3f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
