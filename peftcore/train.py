"""One training loop for the app, the tests and the benchmarks: a generator of events.

    for event in train(model, "times_3", steps=300):
        print(event.step, event.loss, event.eval_exact)

Only phi's parameters are given to the optimizer; the frozen base never gets a gradient.
"""
import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .tasks import EVAL_SIZE, answer_metrics, get_task


SOLVED = 0.99  # held-out exact match that counts as solved, at two evaluations in a row


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainEvent:
    step: int
    steps: int             # the step budget
    loss: float
    train_exact: float     # on the current batch
    eval_exact: Optional[float]   # on the held-out set, when evaluated at this step
    eval_token: Optional[float]
    elapsed: float         # seconds since the start
    examples_per_s: float
    done: bool = False

    def to_dict(self):
        return asdict(self)


def resolve_device(device="auto"):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def held_out(model, task, device=None, batch_size=512, size=EVAL_SIZE):
    """(logits, targets) of the model in eval mode on the first `size` examples of the task's
    fixed held-out set."""
    device = device or next(model.parameters()).device
    x, y = get_task(task).eval_set(device, size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return logits, y


def evaluate(model, task, device=None, batch_size=512, size=EVAL_SIZE):
    """(exact match, token accuracy) on the first `size` examples of the task's fixed held-out set."""
    return answer_metrics(*held_out(model, task, device, batch_size, size))


def solved_at(events, target=SOLVED):
    """The evaluation at which the task counts as solved: the first of two evaluations in a
    row at `target` or above (one lucky evaluation is not enough). None if it never is."""
    evals = [e for e in events if e.eval_exact is not None]
    return next((a for a, b in zip(evals, evals[1:]) if a.eval_exact >= target and b.eval_exact >= target), None)


class Trainer:
    """One run's training state: its data stream, optimizer, schedule and step count.

    `train()` steps one Trainer through its own model; peftcore.cohort steps several over
    one frozen base in a single forward and backward. A step is: `next_batch()`, a forward,
    `loss()`, a backward of that loss (zero_grad first), then `update()` for the event.
    Arguments as train()'s."""

    def __init__(self, model, task, steps=300, max_seconds=None, lr=1e-2, batch_size=64, seed=0,
                 weight_decay=0.0, eval_every=25, device="auto", clip=1.0, stop_when_solved=False, patience=None,
                 eval_size=EVAL_SIZE):
        if not 1 <= eval_size <= EVAL_SIZE:
            raise ValueError(f"eval_size must be 1 to {EVAL_SIZE} (the held-out set's size), not {eval_size}")
        self.model, self.task, self.device = model, get_task(task), resolve_device(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if self.params[0].device.type != torch.device(self.device).type:
            raise ValueError(f"model is on {self.params[0].device}, training asked for {self.device}")
        self.steps, self.max_seconds, self.batch_size = steps, max_seconds, batch_size
        self.eval_every, self.clip, self.stop_when_solved, self.patience = eval_every, clip, stop_when_solved, patience
        self.eval_size = eval_size
        self.best, self.since_best = -1.0, 0  # the best held-out exact match so far, and evaluations since
        self.generator = torch.Generator().manual_seed(seed)  # private: concurrent runs never share an RNG
        if hasattr(model, "route"):  # dropout's masks: a stream of their own, so dropout on or off
            model.route.generator = torch.Generator(self.device).manual_seed(seed + 1)  # keeps the data order
        if hasattr(model, "adapter_task") and getattr(model, "active_adapter", None):
            model.adapter_task[model.active_adapter] = self.task.name  # recorded in saved files
        groups = model.optimizer_groups(lr) if hasattr(model, "optimizer_groups") else None
        self.opt = torch.optim.AdamW(groups or self.params, lr=lr, weight_decay=weight_decay)
        warmup = max(1, steps // 10)
        self.sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay
            self.opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        self.step, self.streak, self.done = 0, 0, False  # streak: evaluations in a row at SOLVED
        model.train()
        self.t0 = time.perf_counter()

    def step_alone(self):
        """One whole step of this run through its own model; its TrainEvent (a cohort steps
        several runs' forward and backward as one instead)."""
        x, y = self.next_batch()
        logits = self.model(x)
        loss = self.loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return self.update(loss, logits, y)

    def next_batch(self):
        """The next step's (inputs, targets) from this run's own stream."""
        self.step += 1
        return self.task.batch(self.batch_size, self.generator, self.device)

    def loss(self, logits, y):
        """This step's loss; a non-finite one raises before any optimizer step."""
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} at step {self.step}; "
                                     "phi keeps its last finite value (try a lower learning rate)")
        return loss

    def update(self, loss, logits, y):
        """After the backward: clip, step, evaluate when due; the step's TrainEvent."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(f"gradient became {grad_norm.item()} at step {self.step}; "
                                     "phi keeps its last finite value (try a lower learning rate)")
        for group in self.opt.param_groups:  # a method's own gradient transform (LoRA-FA's projection)
            if "before_step" in group:
                group["before_step"]()
        self.opt.step()
        self.sched.step()
        elapsed = time.perf_counter() - self.t0
        last = self.step >= self.steps or (self.max_seconds is not None and elapsed >= self.max_seconds)
        ev_exact = ev_token = None
        if last or self.step % self.eval_every == 0:
            ev_exact, ev_token = evaluate(self.model, self.task, self.device, size=self.eval_size)
            self.model.train()
            self.streak = self.streak + 1 if ev_exact >= SOLVED else 0
            self.best, self.since_best = (ev_exact, 0) if ev_exact > self.best else (self.best, self.since_best + 1)
            last = last or (self.stop_when_solved and self.streak >= 2) or stuck(self.since_best, self.patience)
        self.done = last
        if last:
            self.model.eval()
        return TrainEvent(self.step, self.steps, loss.item(), answer_metrics(logits.detach(), y)[0],
                          ev_exact, ev_token, elapsed, self.step * self.batch_size / max(elapsed, 1e-9), last)


def stuck(evaluations_since_best, patience):
    """Whether a run has stopped improving: `patience` evaluations in a row without a better
    held-out exact match (None: never). What makes a race end when its slowest run is not
    going anywhere (prompt tuning on a new digit map: 0% from its first evaluation on)."""
    return patience is not None and evaluations_since_best >= patience


def train(model, task, steps=300, **kwargs):
    """Train `model`'s trainable parameters on `task`; yield a TrainEvent per step.

    Keywords: max_seconds=None, lr=1e-2, batch_size=64, seed=0, weight_decay=0.0,
    eval_every=25, device="auto", clip=1.0, stop_when_solved=False, patience=None,
    eval_size=512 (each evaluation scores the first eval_size examples of the task's fixed
    held-out set; the app always scores all 512). `seed` fixes the data stream and LoRA dropout's masks; phi's initial values are fixed by
    get_peft_model's seed.

    Budget: `steps`, and optionally `max_seconds` of wall time, whichever ends first;
    with `stop_when_solved`, also the step at which the task counts as solved (solved_at);
    with `patience`, also the evaluation at which it has stopped improving (stuck).
    The model must already be on `device` (the shared base is loaded per device).
    A non-finite loss raises NonFiniteLossError before the optimizer step, so phi keeps
    its last finite value.
    """
    trainer = Trainer(model, task, steps, **kwargs)
    try:
        while not trainer.done:
            yield trainer.step_alone()
    finally:
        model.eval()


def run(model, task, **kwargs):
    """Train to the end and return the last event."""
    event = None
    for event in train(model, task, **kwargs):
        pass
    return event


def warm_up(base, device="cpu", stop=None):
    """Pay a process's one-time training setup now: the first optimizer, forward, backward
    and evaluation in a process cost ~3 s on CPU (lazy imports, kernel selection), which a
    server should not add to its first student's run. Trains a throwaway phi (the first
    registered method's preset) for 2 steps; returns early, between steps, once `stop` (a
    threading.Event: peftcore.service.warmup runs this in a thread) is set."""
    from .peft_model import get_peft_model
    from .methods.registry import METHODS
    if stop is not None and stop.is_set():
        return
    model = get_peft_model(base, next(iter(METHODS.values())).preset.config, seed=0)
    for _ in train(model, "times_3", steps=2, batch_size=8, eval_every=1, device=device):
        if stop is not None and stop.is_set():
            break
