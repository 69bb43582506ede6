"""Several runs over one frozen base, stepped as one: the whole class in one step.

    cohort = Cohort([Trainer(model_a, "times_3", seed=1), Trainer(model_b, "complement", seed=2)])
    while cohort.trainers:
        for trainer, event in cohort.step(): ...

One forward and one backward go over the runs' concatenated batches: the frozen base's
matmuls see every row at once, and each run's rows go through its own phi as a batched
matmul (the mixed-batch idea of serving, with gradients). Each run keeps its own Trainer:
optimizer, schedule, seed, data stream, evaluations. The loss backpropagated is the sum of
the runs' losses; their phi are disjoint, so each phi's gradient is its own run's.

Which runs ride together is each method's to say (its registry entry's cohort_kind: LoRA
without dropout, bottleneck adapters...); how, its phi layer's `cohort(base_layer, members)`.
Runs of other methods, or on another base, batch size or device, train alone (a cohort of
one is plain train()).
"""
import torch

from .methods import registry
from .peft_model import PeftModel, shared_view
from .train import NonFiniteLossError, TrainEvent


def cohort_key(model, batch_size=64, device="cpu"):
    """Runs with equal keys can be stepped together; None: this run trains alone."""
    if not isinstance(model, PeftModel) or model.full or model._merged is not None:
        return None
    cfg = model.peft_config.get(model.active_adapter)
    method = registry.method_of(cfg) if cfg is not None else None
    kind = method.cohort_kind(cfg) if method and method.cohort_kind else None
    if kind is None:
        return None
    return id(model._base[0]), kind, batch_size, str(device)


def carrier(models):
    """A view of the models' shared base whose phi layers route row group k through
    models[k]'s active phi. Built once per cohort membership."""
    view = shared_view(models[0]._base[0])
    modules = [dict(m.base_model.named_modules()) for m in models]
    names = [m.active_adapter for m in models]
    for path, layer in modules[0].items():
        if not hasattr(layer, "cohort"):  # not a phi layer that rides in cohorts
            continue
        parent_path, _, child = path.rpartition(".")
        parent = view.get_submodule(parent_path)
        setattr(parent, child, layer.cohort(getattr(parent, child), [(mods[path], n) for mods, n in zip(modules, names)]))
    return view


class Cohort:
    """Trainers whose models share a cohort_key, stepped together; finished or failed
    runs leave it. A cohort of one steps through its own model, exactly as train()."""

    def __init__(self, trainers=()):
        self.trainers = []
        self._forward = None
        self.add(*trainers)

    def add(self, *trainers):
        self.trainers.extend(trainers)
        self._forward = None

    def remove(self, trainer):
        self.trainers.remove(trainer)
        self._forward = None

    def step(self):
        """One step of every run. Returns (trainer, TrainEvent or the exception that ended
        it) for each; done and failed runs have left the cohort."""
        if self._forward is None:
            models = [t.model for t in self.trainers]
            self._forward = models[0] if len(models) == 1 else carrier(models)
        batches = [t.next_batch() for t in self.trainers]
        logits = self._forward(torch.cat([x for x, _ in batches]))
        logits = logits.view(len(self.trainers), -1, *logits.shape[1:])
        results, losses = {}, {}
        for t, (_, y), lg in zip(self.trainers, batches, logits):
            try:
                losses[t] = t.loss(lg, y)
            except NonFiniteLossError as e:  # that run ends; the others' rows never met its phi
                results[t] = e
            t.opt.zero_grad(set_to_none=True)
        if losses:
            torch.stack(list(losses.values())).sum().backward()
        for t, (_, y), lg in zip(self.trainers, batches, logits):
            if t in losses:
                try:
                    results[t] = t.update(losses[t], lg, y)
                except NonFiniteLossError as e:
                    results[t] = e
        out = [(t, results[t]) for t in self.trainers]
        for t, r in out:
            if not isinstance(r, TrainEvent) or r.done:
                self.remove(t)
        return out
