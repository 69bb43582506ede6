"""Regenerate the shipped base: `python -m peftcore.pretrain` (about 8 minutes on one core).

The base learns the skills a downstream task composes, the way a real model has them:
- Each pretraining task is a cell of a grid, a routing (copy, reverse, rotate) times a digit
  map (add 0-3), and its task token's row is the sum of a routing vector and a map vector.
- Some rows name a mix of tasks (two with weights lambda and 1 - lambda, or all of them
  equally) and are trained toward the same mix of their answers. The base so learns that a
  task row between known rows means an answer between theirs: a new task is a direction in
  which phi's gradient finds the skills it needs, not a wall.
- Every downstream task token starts at the mean of the pretraining rows (as transformers'
  resize_token_embeddings starts new rows): the base meets it unsure (3-4 nats per digit,
  near the ln 10 = 2.3 of a guess), not confidently wrong.

Deterministic for a given torch version: fixed seeds, a fixed data stream, one torch thread
(another thread count sums in another order and makes another base).
"""
import argparse
import time

import torch
import torch.nn.functional as F

from .base import BASE_META_PATH, BASE_PATH, fingerprint, save_base
from .model import BaseConfig, ToyTransformer
from .tasks import ANSWER_START, DIGIT_MAPS, PRETRAIN_TASKS, ROUTINGS, SEP, TASKS, VOCAB_SIZE, answer_metrics

_TASKS = list(PRETRAIN_TASKS.values())


def mixture_batch(batch_size, generator, p_pair=0.15, p_all=0.05):
    """(inputs, weights, soft targets): weights (B, n tasks) says which tasks a row names
    (one-hot, a pair, or all equally); the soft targets (B, 8, vocab) are the same mix of
    those tasks' answers. The answer fed to the model is one task's, drawn by weight."""
    n, g = len(_TASKS), generator
    first = torch.randint(0, n, (batch_size,), generator=g)
    second = (first + torch.randint(1, n, (batch_size,), generator=g)) % n  # another task
    lam = torch.rand(batch_size, 1, generator=g)
    kind = torch.rand(batch_size, 1, generator=g)
    one_hot = lambda i: F.one_hot(i, n).float()
    weights = torch.where(kind < p_pair, lam * one_hot(first) + (1 - lam) * one_hot(second), one_hot(first))
    weights = torch.where((kind >= p_pair) & (kind < p_pair + p_all), torch.full_like(weights, 1 / n), weights)
    digits = torch.randint(0, 10, (batch_size, 8), generator=g)
    answers = torch.stack([t.fn(digits) for t in _TASKS], dim=1)  # (B, n, 8)
    fed = torch.multinomial(weights, 1, generator=g)[:, 0]
    seq = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), digits,
                     torch.full((batch_size, 1), SEP), answers[torch.arange(batch_size), fed]], dim=1)
    soft = torch.einsum("bn,bnlv->blv", weights, F.one_hot(answers, VOCAB_SIZE).float())
    return seq[:, :-1], weights, soft


class SkillRows(torch.nn.Module):
    """Task rows as routing vector + map vector, trained with the base, written into its
    token embedding at the end."""

    def __init__(self, d_model):
        super().__init__()
        self.routing = torch.nn.Parameter(0.02 * torch.randn(len(ROUTINGS), d_model))
        self.digit_map = torch.nn.Parameter(0.02 * torch.randn(len(DIGIT_MAPS), d_model))
        self.register_buffer("r", torch.tensor([list(ROUTINGS).index(t.skills[0]) for t in _TASKS]))
        self.register_buffer("m", torch.tensor([list(DIGIT_MAPS).index(t.skills[1]) for t in _TASKS]))

    def forward(self):
        return self.routing[self.r] + self.digit_map[self.m]  # (n tasks, d_model)


def forward_mixed(model, rows, inputs, weights):
    x = model.embed.tok(inputs)
    x = torch.cat([(weights @ rows())[:, None], x[:, 1:]], dim=1)  # position 0: the named mix of task rows
    return model(inputs_embeds=x + model.embed.pos(torch.arange(inputs.shape[1])))


def pretrain(steps=6000, batch_size=64, lr=3e-3, seed=0, log_every=500, p_pair=0.15, p_all=0.05):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ToyTransformer(BaseConfig(vocab_size=VOCAB_SIZE))
    rows = SkillRows(model.config.d_model)
    params = list(model.named_parameters()) + list(rows.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2 and "embed" not in n and n not in ("routing", "digit_map")]
    rest = [p for n, p in params if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        x, w, soft = mixture_batch(batch_size, g, p_pair, p_all)
        logits = forward_mixed(model, rows, x, w)[:, ANSWER_START:]
        # over the ten digits only: the answer is a digit; scoring the other tokens too left a
        # base on which LoRA stuck at a uniform guess on add_5 (BENCHMARKS.md, issue 16)
        loss = -(soft[..., :10] * F.log_softmax(logits[..., :10], -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)
    with torch.no_grad():
        task_rows = rows()
        for t, row in zip(_TASKS, task_rows):
            model.embed.tok.weight[t.token] = row
        for t in TASKS.values():
            model.embed.tok.weight[t.token] = task_rows.mean(0)
    return model.eval()


def evaluate(model):
    with torch.no_grad():
        return {name: answer_metrics(model(x), y)[0]
                for name, task in PRETRAIN_TASKS.items() for x, y in [task.eval_set()]}


def first_loss(model):
    """The base's loss per answer digit on each downstream task before any training: how far
    a new task starts from what the base knows (ln 10 = 2.3 is "unsure among the digits")."""
    with torch.no_grad():
        return {name: F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).item()
                for name, task in TASKS.items() for x, y in [task.eval_set()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--out", default=str(BASE_PATH))
    ap.add_argument("--meta", default=str(BASE_META_PATH))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model = pretrain(steps=args.steps)
    seconds = time.time() - t0
    acc, loss0 = evaluate(model), first_loss(model)
    for name, a in acc.items():
        print(f"{name:20s} exact match {a:.3f}")
    for name, loss in loss0.items():
        print(f"{name:20s} loss before training {loss:.2f} nats per digit")
    n = sum(p.numel() for p in model.parameters())
    save_base(model, args.out, args.meta, params=n, pretrain_steps=args.steps, pretrain_seconds=round(seconds),
              pretrain_exact_match=acc, downstream_first_loss=loss0,
              torch_version=torch.__version__)
    print(f"saved {args.out}: {n:,} params, fingerprint {fingerprint(model)[:16]}, {seconds:.0f} s")


if __name__ == "__main__":
    main()
