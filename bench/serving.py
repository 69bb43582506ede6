"""Serving many tasks from one base: a mixed-task batch against a swap-per-request loop,
a single-task batch of the same size and HF peft's mixed `adapter_names` forward.

    python -m bench.serving [--device cpu|cuda] [--adapters 16] [--requests 64]
"""
import argparse
import copy
import random
import statistics
import time

import torch

import peftcore
from peftcore import PeftModel
from peftcore.presets import PRESETS

from peftcore.timing import side_by_side

from .common import machine


def lora_bank(base, n, config, seed=0):
    """A bank of n LoRA phi with random (trained-looking) weights."""
    bank = PeftModel(base)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        bank.add_adapter(f"task{i}", config, seed=i)
        with torch.no_grad():
            for _, p in bank.named_adapter_parameters(f"task{i}"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return bank.eval()


def hf_bank(base, ours, names):
    import peft
    cfg = ours.peft_config[names[0]]
    hf_cfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules))
    model = peft.get_peft_model(copy.deepcopy(base), hf_cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, hf_cfg)
    state = model.state_dict()
    with torch.no_grad():
        for name in names:
            for key, t in ours.adapter_state_dict(name).items():
                state[key.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}.")].copy_(t)
    return model.eval()


def swap_latency(model, names, reps=200):
    t = []
    for i in range(reps):
        t0 = time.perf_counter()
        model.set_adapter(names[i % len(names)])
        t.append(time.perf_counter() - t0)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    base = peftcore.load_base(device=args.device)
    config = PRESETS["LORA"].config
    bank = lora_bank(base, args.adapters, config).to(args.device)
    names = list(bank.peft_config)
    rng = random.Random(0)
    rows = [rng.choice(names) for _ in range(args.requests)]
    x = torch.cat([peftcore.TASKS[t].batch(1, torch.Generator().manual_seed(i))[0]
                   for i, t in zip(range(args.requests), rng.choices(list(peftcore.TASKS), k=args.requests))]).to(args.device)

    def swap_loop():
        with torch.no_grad():
            for i, name in enumerate(rows):
                bank.set_adapter(name)
                bank(x[i:i + 1])

    def single_task():
        bank.set_adapter(names[0])
        with torch.no_grad():
            bank(x)

    fns = {"mixed batch (peftcore)": lambda: bank(x, adapter_names=rows),
           "swap per request (peftcore)": swap_loop,
           "single-task batch (peftcore)": single_task}
    hf = None
    try:
        hf = hf_bank(base, bank, names)
        with torch.no_grad():
            diff = (hf(x, adapter_names=rows) - bank(x, adapter_names=rows)).abs().max().item()

        def hf_mixed():
            with torch.no_grad():
                hf(x, adapter_names=rows)
        fns["mixed batch (HF peft)"] = hf_mixed
    except ImportError:
        diff = None
    secs = side_by_side(fns, repeats=args.reps, inner=3, warmup=1, device=args.device)
    mixed = secs["mixed batch (peftcore)"]
    print(f"machine: {machine()}")
    print(f"{args.adapters} resident LoRA phi ({config.r=}, {config.target_modules=}), "
          f"{args.requests} requests of mixed tasks, median of {args.reps}\n")
    print("| forward | ms | requests / s | mixed batch's throughput / this |")
    print("|---|---:|---:|---:|")
    for k, s in secs.items():
        print(f"| {k} | {1000 * s:.2f} | {args.requests / s:,.0f} | {s / mixed:.2f} |")
    phi = bank.memory_bytes()["phi"][names[0]]
    base_bytes = bank.memory_bytes()["base"]
    print(f"\nswap latency (set_adapter): peftcore {1e6 * swap_latency(bank, names):.1f} us"
          + (f", HF peft {1e6 * swap_latency(hf, names):.1f} us" if hf else ""))
    print(f"bytes per phi {phi:,} vs base {base_bytes:,}: {100 * phi / base_bytes:.2f}%; "
          f"{args.adapters} phi resident: {base_bytes + args.adapters * phi:,} bytes "
          f"vs {args.adapters} full models {args.adapters * base_bytes:,}")
    if diff is not None:
        print(f"max |difference| peftcore vs HF peft mixed outputs: {diff:.2e}")
    merge_table(bank, base, names[0], x, args)


def merge_table(bank, base, name, x, args):
    """merge_and_unload() against the unmerged LoRA and the bare base, one batch of requests."""
    bank.set_adapter(name)
    plain = bank.merge_and_unload()
    with torch.no_grad():
        diff = (plain(x) - bank(x)).abs().max().item()
        secs = side_by_side({"bare base": lambda: base(x), "LoRA unmerged": lambda: bank(x),
                                    "LoRA merge_and_unload()": lambda: plain(x)},
                             repeats=args.reps, inner=5, device=args.device)
    print(f"\n| single-task forward, batch {len(x)} | ms | x bare base |\n|---|---:|---:|")
    for k, v in secs.items():
        print(f"| {k} | {1000 * v:.2f} | {v / secs['bare base']:.2f} |")
    print(f"max |merged - unmerged| {diff:.2e}")


if __name__ == "__main__":
    main()
