"""Regenerate the shipped base: `python -m peftcore.pretrain` (about 5 minutes on 2 cores).

Deterministic for a given torch version and thread count: fixed seeds, fixed data stream.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from .base import BASE_META_PATH, BASE_PATH, fingerprint, save_base
from .model import BaseConfig, ToyTransformer
from .tasks import PRETRAIN_TASKS, VOCAB_SIZE, answer_metrics


def mixed_batch(batch_size, generator):
    """Each row from a random pretraining task."""
    tasks = list(PRETRAIN_TASKS.values())
    picks = torch.randint(0, len(tasks), (batch_size,), generator=generator)
    parts = [tasks[i].batch(int((picks == i).sum()), generator) for i in range(len(tasks))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def pretrain(steps=6000, batch_size=64, lr=3e-3, seed=0, log_every=500):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ToyTransformer(BaseConfig(vocab_size=VOCAB_SIZE))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        x, y = mixed_batch(batch_size, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    return model.eval()


def evaluate(model):
    with torch.no_grad():
        return {name: answer_metrics(model(x), y)[0]
                for name, task in PRETRAIN_TASKS.items() for x, y in [task.eval_set()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--out", default=str(BASE_PATH))
    ap.add_argument("--meta", default=str(BASE_META_PATH))
    args = ap.parse_args()
    model = pretrain(steps=args.steps)
    acc = evaluate(model)
    for name, a in acc.items():
        print(f"{name:16s} exact match {a:.3f}")
    n = sum(p.numel() for p in model.parameters())
    save_base(model, args.out, args.meta, params=n, pretrain_steps=args.steps,
              pretrain_exact_match=acc, torch_version=torch.__version__)
    print(f"saved {args.out}: {n:,} params, fingerprint {fingerprint(model)[:16]}")


if __name__ == "__main__":
    main()
