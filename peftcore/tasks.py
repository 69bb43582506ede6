"""Synthetic digit tasks: the base pretrains on some, PEFT learns the others.

The pretraining tasks are a grid of skills, a routing (copy, reverse, rotate) times a digit
map (add 0-3), less two held-out cells; the downstream tasks are those two cells (new
compositions of known skills), two new digit maps, and sort (a new algorithm).

A sequence is [task token, 8 digits, SEP, 8 answer digits]. The model reads the first
17 tokens and must predict the 8 answer digits. Exact match under teacher forcing equals
exact match under greedy decoding: if every answer digit is right given a right prefix,
greedy decoding produces that same prefix.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional, Tuple

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
    skills: Optional[Tuple[str, str]] = None  # (routing, digit map): its cell of the grid, if it has one

    def batch(self, n, generator=None, device="cpu"):
        """(inputs, targets): inputs (n, 17); targets (n, 17) with -100 everywhere but the
        8 answer digits (the SEP is given, not predicted: scoring it would inflate accuracy)."""
        digits = torch.randint(0, 10, (n, N_DIGITS), generator=generator)
        seq = torch.cat([torch.full((n, 1), self.token), digits,
                         torch.full((n, 1), SEP), self.fn(digits)], dim=1)
        inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        targets[:, :ANSWER_START] = -100
        return inputs.to(device), targets.to(device)

    @cached_property
    def reads_positions(self):
        """Whether an answer depends on where the input's digits are, not only on which
        digits are present: False for sort, whose answer is the same for any shuffle of its
        input. Measured on the held-out inputs against a shuffle of each row."""
        digits = self.eval_set()[0][:, 1:ANSWER_START]
        shuffled = digits[:, torch.randperm(N_DIGITS, generator=torch.Generator().manual_seed(0))]
        return not torch.equal(self.fn(digits), self.fn(shuffled))

    def eval_set(self, device="cpu", n=EVAL_SIZE):
        """The first `n` examples of a fixed held-out set of EVAL_SIZE: the same examples on
        every machine and every call."""
        g = torch.Generator().manual_seed(10_000 + self.token)
        inputs, targets = self.batch(EVAL_SIZE, generator=g, device=device)
        return inputs[:n], targets[:n]


def _rotate(k):
    return lambda d: torch.roll(d, -k, dims=1)


def _add(k):
    return lambda d: (d + k) % 10


# The skills a base learns, as a real model's skills compose: where each answer digit comes
# from (a routing) and what is done to it (a digit map).
ROUTINGS = {
    "copy": ("copy the digits", lambda d: d),
    "reverse": ("reverse the digits", lambda d: d.flip(1)),
    "rotate_left": ("rotate the digits one place left", _rotate(1)),
    "rotate_right": ("rotate the digits one place right", _rotate(-1)),
}
DIGIT_MAPS = {f"add_{k}": (f"add {k} to each digit (mod 10)", _add(k)) for k in range(4)}

# What PEFT learns: tasks the base never saw, each with its own new task token; every answer
# differs from every pretraining task's. The two compositions are cells of the grid, held out
# of pretraining: new compositions of skills the base has.
_DOWNSTREAM = [
    # times_3 (a permutation: 3 and 10 share no factor) replaced add_5, a map next to the known
    # add 0-3, where prefix tuning stalled on most seeds (BENCHMARKS.md, "times_3 in place of add_5")
    ("times_3", "multiply each digit by 3 (mod 10): a new digit map", lambda d: d * 3 % 10, None),
    ("complement", "replace each digit d by 9 - d: a new digit map", lambda d: 9 - d, None),
    ("reverse_add_1", "reverse the digits, then add 1 to each (mod 10): two known skills composed",
     lambda d: (d.flip(1) + 1) % 10, ("reverse", "add_1")),
    ("rotate_right_add_2", "rotate one place right, then add 2 to each (mod 10): two known skills composed",
     lambda d: (torch.roll(d, 1, dims=1) + 2) % 10, ("rotate_right", "add_2")),
    ("sort", "sort the digits in ascending order: a new algorithm, hard for a small phi",
     lambda d: d.sort(1).values, None),
]
HELD_OUT = {skills for *_, skills in _DOWNSTREAM if skills}


def _cell_name(routing, digit_map):
    if digit_map == "add_0":
        return {"rotate_left": "rotate_left_1", "rotate_right": "rotate_right_1"}.get(routing, routing)
    return digit_map if routing == "copy" else f"{routing}_{digit_map}"


def _cell(routing, digit_map, token):
    (route_desc, route), (map_desc, mapping) = ROUTINGS[routing], DIGIT_MAPS[digit_map]
    desc = route_desc if digit_map == "add_0" else map_desc if routing == "copy" else f"{route_desc}, then {map_desc}"
    return Task(_cell_name(routing, digit_map), token, desc, lambda d: mapping(route(d)) % 10,
                skills=(routing, digit_map))


# What the base learns in pretraining: every cell of the grid but the held-out ones
# (copy, reverse, rotate_left_1, add_1, reverse_add_2, ...).
_CELLS = [(r, m) for m in DIGIT_MAPS for r in ROUTINGS if (r, m) not in HELD_OUT]
PRETRAIN_TASKS = {t.name: t for t in (_cell(r, m, FIRST_TASK_TOKEN + i) for i, (r, m) in enumerate(_CELLS))}
TASKS = {name: Task(name, FIRST_TASK_TOKEN + len(PRETRAIN_TASKS) + i, desc, fn, skills)
         for i, (name, desc, fn, skills) in enumerate(_DOWNSTREAM)}

ALL_TASKS = {**PRETRAIN_TASKS, **TASKS}
VOCAB_SIZE = FIRST_TASK_TOKEN + len(ALL_TASKS)


def skill_grid():
    """{(routing, digit map): task} over the whole grid: a pretraining task, or the downstream
    task held out in that cell."""
    return {t.skills: t for t in ALL_TASKS.values() if t.skills}


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
