"""LoRA's family in the training loop: each member's preset (a variant is LoRA's preset with its
option set) trained for a few steps at the same batch, alternating with LoRA's so that a busy
moment slows them all alike; the median seconds per step and the ratio to LoRA's. Issue 33's
target: every new member within 1.2x LoRA's step.

    python -m bench.family [--steps 20] [--repeats 5] [--batch-size 32]
"""
import argparse
from dataclasses import replace

import peftcore
from peftcore.presets import PRESETS
from peftcore.timing import side_by_side
from peftcore.train import Trainer

from .common import machine

MEMBERS = {"LoRA": ("LORA", {}), "rsLoRA": ("LORA", {"use_rslora": True}), "DoRA": ("LORA", {"use_dora": True}),
           "LoRA+": ("LORA", {"optimizer": "loraplus"}), "LoRA-FA": ("LORA", {"optimizer": "lorafa"}),
           "VeRA": ("VERA", {}), "LoHa": ("LOHA", {}), "LoKr": ("LOKR", {})}


def steps_of(base, method, options, steps, batch_size):
    """A call that takes `steps` training steps of one run of the member (its Trainer, as
    train() steps it), with no evaluation: the step alone is timed."""
    config = replace(PRESETS[method].config, **options)
    model = peftcore.get_peft_model(base, config, seed=0)
    trainer = Trainer(model, "times_3", steps=10**9, lr=PRESETS[method].train["lr"], batch_size=batch_size,
                      eval_every=10**9, device="cpu")

    def train():
        for _ in range(steps):
            trainer.step_alone()
    return train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    base = peftcore.load_base()
    fns = {name: steps_of(base, m, o, args.steps, args.batch_size) for name, (m, o) in MEMBERS.items()}
    seconds = side_by_side(fns, repeats=args.repeats)
    print(f"machine: {machine()}; {args.steps} training steps at batch {args.batch_size}, median of "
          f"{args.repeats}, alternating")
    print("| member | ms per step | ratio to LoRA |\n|---|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {1000 * s / args.steps:.1f} | {s / seconds['LoRA']:.2f} |")


if __name__ == "__main__":
    main()
