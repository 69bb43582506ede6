"""Several runs over one frozen base, stepped as one: the whole class in one step.

    cohort = Cohort([Trainer(model_a, "add_5", seed=1), Trainer(model_b, "complement", seed=2)])
    while cohort.trainers:
        for trainer, event in cohort.step(): ...

One forward and one backward go over the runs' concatenated batches: the frozen base's
matmuls see every row at once, and each run's rows go through its own phi as a batched
matmul (the mixed-batch idea of serving, with gradients). Each run keeps its own Trainer:
optimizer, schedule, seed, data stream, evaluations. The loss backpropagated is the sum of
the runs' losses; their phi are disjoint, so each phi's gradient is its own run's.

LoRA (without dropout) and bottleneck adapters can ride together; runs of other methods,
or on another base, batch size or device, train alone (a cohort of one is plain train()).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import AdapterConfig, AdapterLayer
from .lora import LoraConfig, LoraLinear
from .peft_model import PeftModel, shared_view
from .train import NonFiniteLossError, TrainEvent


def cohort_key(model, batch_size=64, device="cpu"):
    """Runs with equal keys can be stepped together; None: this run trains alone."""
    if not isinstance(model, PeftModel) or model.full or model._merged is not None:
        return None
    cfg = model.peft_config.get(model.active_adapter)
    if isinstance(cfg, LoraConfig) and not cfg.lora_dropout:  # dropout draws from the global RNG
        kind = ("LORA", tuple(sorted(cfg.target_modules)))
    elif isinstance(cfg, AdapterConfig):
        kind = ("BOTTLENECK_ADAPTER",)
    else:
        return None
    return id(model._base[0]), kind, batch_size, str(device)


def _pad_to(t, size, dim):
    """`t` zero-padded along `dim` to `size`: a run with a smaller r or bottleneck beside a
    larger one (zero rank rows add nothing; zero bottleneck units give gelu(0) = 0)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


class CohortLora(nn.Module):
    """A frozen Linear plus K runs' LoRA: row group k goes through run k's B A."""

    def __init__(self, base_layer, loras):
        super().__init__()
        self.base_layer = base_layer
        self.loras = [(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
                      for layer, name in loras]  # plain lists: the runs' Parameters are not ours
        self.r = max(a.shape[0] for a, _, _ in self.loras)

    def forward(self, x):
        out = self.base_layer(x)
        A = torch.stack([_pad_to(a, self.r, 0) for a, _, _ in self.loras])  # (K, r, d_in)
        B = torch.stack([_pad_to(b, self.r, 1) * s for _, b, s in self.loras])  # (K, d_out, r), scaled
        h = torch.bmm(x.reshape(len(self.loras), -1, x.shape[-1]), A.transpose(1, 2))
        return out + torch.bmm(h, B.transpose(1, 2)).view(out.shape)


class CohortAdapter(nn.Module):
    """A sublayer plus K runs' bottlenecks: row group k goes through run k's."""

    def __init__(self, sublayer, bottlenecks):
        super().__init__()
        self.sublayer = sublayer
        self.bottlenecks = [(b.down.weight, b.down.bias, b.up.weight, b.up.bias) for b in bottlenecks]
        self.b = max(wd.shape[0] for wd, _, _, _ in self.bottlenecks)

    def forward(self, x, *args):
        h = self.sublayer(x, *args)
        Wd = torch.stack([_pad_to(wd, self.b, 0) for wd, _, _, _ in self.bottlenecks])  # (K, b, d)
        bd = torch.stack([_pad_to(bd, self.b, 0) for _, bd, _, _ in self.bottlenecks])  # (K, b)
        Wu = torch.stack([_pad_to(wu, self.b, 1) for _, _, wu, _ in self.bottlenecks])  # (K, d, b)
        bu = torch.stack([bu for _, _, _, bu in self.bottlenecks])  # (K, d)
        hs = h.reshape(len(self.bottlenecks), -1, h.shape[-1])
        z = F.gelu(torch.baddbmm(bd[:, None], hs, Wd.transpose(1, 2)))
        return h + torch.baddbmm(bu[:, None], z, Wu.transpose(1, 2)).view(h.shape)


def carrier(models):
    """A view of the models' shared base whose phi layers route row group k through
    models[k]'s active phi. Built once per cohort membership."""
    view = shared_view(models[0]._base[0])
    modules = [dict(m.base_model.named_modules()) for m in models]
    names = [m.active_adapter for m in models]
    for path, layer in modules[0].items():
        if not isinstance(layer, (LoraLinear, AdapterLayer)):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = view.get_submodule(parent_path)
        if isinstance(layer, LoraLinear):
            wrapper = CohortLora(getattr(parent, child), [(mods[path], n) for mods, n in zip(modules, names)])
        else:
            wrapper = CohortAdapter(getattr(parent, child), [mods[path].adapters[n] for mods, n in zip(modules, names)])
        setattr(parent, child, wrapper)
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
