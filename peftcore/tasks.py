"""Synthetic digit tasks: the base pretrains on some, PEFT learns the others.

A sequence is [task token, 8 digits, SEP, 8 answer digits]. The model reads the first
17 tokens and must predict the 8 answer digits. Exact match under teacher forcing equals
exact match under greedy decoding: if every answer digit is right given a right prefix,
greedy decoding produces that same prefix.
"""
from dataclasses import dataclass
from typing import Callable

import torch

N_DIGITS = 8
SEP = 10
FIRST_TASK_TOKEN = 11
ANSWER_START = N_DIGITS + 1  # input position of SEP, which predicts the first answer digit
SEQ_LEN = 2 * N_DIGITS + 2
EVAL_SIZE = 512


@dataclass(frozen=True)
class Task:
    name: str
    token: int
    description: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # (B, 8) digits -> (B, 8) answer

    def batch(self, n, generator=None, device="cpu"):
        """(inputs, targets): inputs (n, 17); targets (n, 17) with -100 everywhere but the
        8 answer digits (the SEP is given, not predicted: scoring it would inflate accuracy)."""
        digits = torch.randint(0, 10, (n, N_DIGITS), generator=generator)
        seq = torch.cat([torch.full((n, 1), self.token), digits,
                         torch.full((n, 1), SEP), self.fn(digits)], dim=1)
        inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        targets[:, :ANSWER_START] = -100
        return inputs.to(device), targets.to(device)

    def eval_set(self, device="cpu"):
        """A fixed held-out set: the same examples on every machine and every call."""
        g = torch.Generator().manual_seed(10_000 + self.token)
        return self.batch(EVAL_SIZE, generator=g, device=device)


def _rotate(k):
    return lambda d: torch.roll(d, -k, dims=1)


def _add(k):
    return lambda d: (d + k) % 10


def _make(specs, first_token):
    return {name: Task(name, first_token + i, desc, fn)
            for i, (name, desc, fn) in enumerate(specs)}


# What the base learns in pretraining: routing digits (copy, reverse, rotate) and
# mapping them (add k, modulo 10).
PRETRAIN_TASKS = _make([
    ("copy", "copy the digits", lambda d: d.clone()),
    ("reverse", "reverse the digits", lambda d: d.flip(1)),
    ("rotate_left_1", "rotate the digits one place left", _rotate(1)),
    ("rotate_right_1", "rotate the digits one place right", _rotate(-1)),
    ("add_1", "add 1 to each digit (mod 10)", _add(1)),
    ("add_2", "add 2 to each digit (mod 10)", _add(2)),
    ("add_3", "add 3 to each digit (mod 10)", _add(3)),
], FIRST_TASK_TOKEN)

# What PEFT learns: tasks the base never saw, each with its own new task token.
TASKS = _make([
    ("add_5", "add 5 to each digit (mod 10): a new shift", _add(5)),
    ("complement", "replace each digit d by 9 - d: a new digit map", lambda d: 9 - d),
    ("reverse_add_1", "reverse the digits, then add 1 to each (mod 10): two known skills composed",
     lambda d: (d.flip(1) + 1) % 10),
    ("rotate_right_add_2", "rotate one place right, then add 2 to each (mod 10): two known skills composed",
     lambda d: (torch.roll(d, 1, dims=1) + 2) % 10),
    ("sort", "sort the digits in ascending order: a new algorithm, hard for a small phi",
     lambda d: d.sort(1).values),
], FIRST_TASK_TOKEN + len(PRETRAIN_TASKS))

ALL_TASKS = {**PRETRAIN_TASKS, **TASKS}
VOCAB_SIZE = FIRST_TASK_TOKEN + len(ALL_TASKS)


def get_task(task):
    if isinstance(task, Task):
        return task
    if task not in ALL_TASKS:
        raise KeyError(f"unknown task {task!r}; choose one of {sorted(ALL_TASKS)}")
    return ALL_TASKS[task]


def answer_metrics(logits, targets):
    """Exact match (all 8 answer digits right) and token accuracy, as floats."""
    mask = targets != -100
    correct = (logits.argmax(-1) == targets) | ~mask
    exact = correct.all(dim=1).float().mean().item()
    token = (correct & mask).sum().item() / mask.sum().item()
    return exact, token


def decode(tokens):
    """Token ids to a readable string: digits as digits, SEP as '|', task tokens as <name>."""
    names = {t.token: t.name for t in ALL_TASKS.values()}
    out = []
    for t in tokens.tolist():
        out.append(str(t) if t < 10 else "|" if t == SEP else f"<{names.get(t, t)}>")
    return "".join(out)
