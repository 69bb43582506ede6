"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every targeted
projection, and two trainable scaling vectors per projection.

    y = W x + Lambda_b B Lambda_d A x        Lambda_b = diag(vera_lambda_b), Lambda_d = diag(vera_lambda_d)

A (r, d_in max) and B (d_out max, r) are drawn once per adapter from `projection_prng_key`, with
HF peft's own generator and kaiming-uniform bound, sized to the largest input and output among
the adapter's targets, and sliced per projection (A[:, :d_in], B[:d_out]). They are buffers,
never trained: phi is only lambda_b (d_out, zeros at first: step 0 is exactly the base) and
lambda_d (r, d_initial) per projection, r + d_out numbers. The same key draws the same A, B as
HF peft, so a file is complete without them; with save_projection (peft's default) they ride
in it as `base_model.vera_A` and `base_model.vera_B`, and loading checks them against the key.

Unlike HF peft (one key for every adapter of a model), each adapter of a bank draws its own
pair from its own config; adapters whose configs draw the same pair share one tensor.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MergeablePhiLayer, PeftConfig, PhiLayer, base_modules, check_range, unwrapped, wrapper_of
from .lora import LoraDropout
from .registry import Method, Preset, register
from ..model import PROJECTIONS, projection_shapes

SAVED_A, SAVED_B = "base_model.vera_A", "base_model.vera_B"  # HF peft's names in adapter_model.safetensors


@dataclass
class VeraConfig(PeftConfig):
    peft_type = "VERA"
    r: int = 256                  # HF peft's default: far higher than a LoRA's, as only r numbers train per projection
    target_modules: tuple = ("q", "v")
    projection_prng_key: int = 0  # the seed of the shared A and B
    save_projection: bool = True  # write A and B into the file (HF peft's default)
    vera_dropout: float = 0.0
    d_initial: float = 0.1        # lambda_d's first value (lambda_b starts at zero)

    def validate(self):
        check_range("r", self.r, 1, 1024)
        check_range("projection_prng_key", self.projection_prng_key, 0, 2**63 - 1)
        if not isinstance(self.save_projection, bool):
            raise ValueError(f"save_projection must be true or false, got {self.save_projection!r}")
        check_range("vera_dropout", self.vera_dropout, 0.0, 0.9, (int, float))
        check_range("d_initial", self.d_initial, -10.0, 10.0, (int, float))
        bad = [m for m in self.target_modules if m not in PROJECTIONS]
        if not self.target_modules or bad:
            raise ValueError(f"target_modules must be a non-empty subset of {PROJECTIONS}, got {list(self.target_modules)}")

    def num_params(self, base_config):
        """Closed form: r + d_out per targeted projection (lambda_d and lambda_b); A and B are frozen."""
        shapes = projection_shapes(base_config)
        return sum(self.r + shapes[t][1] for t in set(self.target_modules)) * base_config.n_layer


def _kaiming_init(shape, generator):
    """HF peft's _kaiming_init (tuners/vera/model.py), step for step: kaiming-uniform on fan_in
    = shape[1], gain sqrt(2), drawn on the CPU in float32 from `generator`."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def draw_projections(r, projection_prng_key, d_in, d_out):
    """(A (r, d_in), B (d_out, r)): the pair HF peft draws for this key, A first."""
    generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
    A = _kaiming_init((r, d_in), generator)
    B = _kaiming_init((d_out, r), generator)
    return A, B


class BufferDict(nn.Module):
    """Tensors by adapter name, as buffers: they move with the model (.to()) but are never
    parameters, so nothing trains them or counts them as phi."""

    def __getitem__(self, name):
        return self._buffers[name]

    def __setitem__(self, name, tensor):
        self.register_buffer(name, tensor)

    def __delitem__(self, name):
        del self._buffers[name]

    def __contains__(self, name):
        return name in self._buffers

    def __iter__(self):
        return iter(self._buffers)

    def __len__(self):
        return len(self._buffers)


class VeraProjections(PhiLayer):
    """The model's frozen pairs (HF peft's VeraModel.vera_A and vera_B), one per adapter name,
    made on the first VeRA adapter and dropped with the last. It holds no phi: the model finds
    it as its child, never among the method's layers; each VeraLinear reads it by reference."""
    containers = ("vera_A", "vera_B")

    def __init__(self):
        super().__init__()
        self.vera_A = BufferDict()
        self.vera_B = BufferDict()
        self.saved = {}  # adapter name -> save_projection
        self.drawn = {}  # adapter name -> (r, key, d_in, d_out): adapters drawing the same pair share it

    def add(self, name, cfg: VeraConfig, d_in, d_out, like: torch.Tensor):
        signature = (cfg.r, cfg.projection_prng_key, d_in, d_out)
        twin = next((n for n, s in self.drawn.items() if s == signature and n in self.vera_A), None)
        if twin is not None and self.vera_A[twin].device == like.device and self.vera_A[twin].dtype == like.dtype:
            A, B = self.vera_A[twin], self.vera_B[twin]
        else:
            A, B = (t.to(device=like.device, dtype=like.dtype) for t in draw_projections(*signature))
        self.vera_A[name], self.vera_B[name] = A, B
        self.saved[name], self.drawn[name] = cfg.save_projection, signature

    def remove(self, name):
        super().remove(name)
        self.saved.pop(name, None)
        self.drawn.pop(name, None)


def _linear(module):
    """The Linear under any stack of phi wrappers."""
    module = unwrapped(module)
    return module if isinstance(module, nn.Linear) else None


class VeraLinear(MergeablePhiLayer):
    """Wraps one projection (a Linear, or another method's wrapper of it); holds every VeRA
    adapter's two vectors for it, keyed by name, and reads the shared A, B of the model's
    VeraProjections, sliced to its own size."""
    containers, per_adapter, wraps = ("vera_lambda_b", "vera_lambda_d"), ("vera_dropout",), "base_layer"

    def __init__(self, base_layer, route, projections: VeraProjections):
        super().__init__()
        self.base_layer = base_layer
        self.route = route
        self._projections = [projections]  # in a list: the model's, not a submodule of every layer
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.d_out, self.d_in = _linear(base_layer).weight.shape  # where A and B are sliced

    @property
    def projections(self):
        return self._projections[0]

    # as a Linear, for a method that wraps this wrapper in turn
    weight = property(lambda self: _linear(self).weight)
    in_features = property(lambda self: _linear(self).in_features)
    out_features = property(lambda self: _linear(self).out_features)

    def add(self, name, cfg: VeraConfig):
        w = self.weight
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), device=w.device,
                                                           dtype=w.dtype))
        self.vera_dropout[name] = LoraDropout(cfg.vera_dropout, self.route) if cfg.vera_dropout else nn.Identity()

    def remove(self, name):
        if self.has_phi(name):
            self.projections.remove(name)  # every layer of the adapter asks; the first one takes it
        super().remove(name)

    def fixed_state(self, name):
        """The shared pair under HF peft's saved names, when the adapter's config saves it."""
        p = self.projections
        if not self.has_phi(name) or not p.saved.get(name):
            return {}
        return {SAVED_A: p.vera_A[name], SAVED_B: p.vera_B[name]}

    def scaled(self, name):
        """(Lambda_d A, Lambda_b B), sliced to this projection: (r, d_in) and (d_out, r)."""
        A = self.projections.vera_A[name][:, :self.d_in]
        B = self.projections.vera_B[name][:self.d_out]
        return self.vera_lambda_d[name][:, None] * A, self.vera_lambda_b[name][:, None] * B

    def delta_weight(self, name):
        A, B = self.scaled(name)
        return B @ A

    def folded(self, name):
        return self.weight + self.delta_weight(name).detach()

    def forward(self, x):
        # the merged weight serves its own adapter only (never a mixed batch or another phi)
        if self.merged_weight is not None and self.route.rows is None and self.route.active == self.merged_adapter:
            return F.linear(x, self.merged_weight)
        out = self.base_layer(x)
        if self.route.rows is not None:
            return out + self._mixed(x)
        name = self.route.active
        if name not in self.vera_lambda_b:
            return out
        A, B = self.scaled(name)
        h = self.vera_dropout[name](x).flatten(0, -2)
        if A.shape[0] * (A.shape[1] + B.shape[0]) < A.shape[1] * B.shape[0]:
            delta = torch.addmm(out.flatten(0, -2), h @ A.t(), B.t())  # low rank is cheaper: through r
        else:
            delta = torch.addmm(out.flatten(0, -2), h, (B @ A).t())  # r as large as the projection: one matrix
        return delta.view(out.shape)

    # --- mixed batches: each row its own B A, one gather from a stack (slot 0: zeros)
    def _stacks(self):
        names = list(self.vera_lambda_b)
        tensors = [t for n in names for t in (self.vera_lambda_b[n], self.vera_lambda_d[n],
                                               self.projections.vera_A[n], self.projections.vera_B[n])]
        return self._stack_cache.get(self.route.generation, tensors, lambda: self._build_stacks(names))

    def _build_stacks(self, names):
        w = self.weight
        with torch.no_grad():
            return torch.stack([w.new_zeros(w.shape)] + [self.delta_weight(n) for n in names])  # (N+1, out, in)

    def _mixed(self, x):
        deltas = self._stacks()
        slots = self.route.slots(list(self.vera_lambda_b), x.device)
        return torch.bmm(x, deltas[slots].transpose(1, 2))


def add_vera(model, name, cfg: VeraConfig, generator=None):
    """Wrap every targeted projection of the model's view (once) and give it adapter `name`;
    the model's VeraProjections (made on first use) draws the adapter's A and B from
    cfg.projection_prng_key, sized to the largest of its targets. The vectors start at fixed
    values (lambda_b zeros, lambda_d d_initial): nothing to draw, so `generator` is unused."""
    targets = [(parent, child_name, child) for parent in list(base_modules(model.base_model))
               for child_name, child in list(parent.named_children())
               if child_name in cfg.target_modules and _linear(child) is not None]
    if not targets:
        raise ValueError(f"no projection of the model is among target_modules {list(cfg.target_modules)}")
    if getattr(model, "vera_projections", None) is None:
        model.vera_projections = VeraProjections()  # dropped with the last adapter (an empty phi layer)
    weights = [_linear(child).weight for _, _, child in targets]
    for parent, child_name, child in targets:
        layer = wrapper_of(child, VeraLinear)  # one VeraLinear per projection, under other methods' wrappers too
        if layer is None:
            layer = VeraLinear(child, model.route, model.vera_projections)
            setattr(parent, child_name, layer)
        layer.add(name, cfg)
    # last: a failure above leaves no pair behind (the layers holding `name` are rolled back)
    model.vera_projections.add(name, cfg, max(w.shape[1] for w in weights), max(w.shape[0] for w in weights),
                               like=weights[0])


register(Method(
    VeraConfig, plug=add_vera, layers=(VeraLinear,), mergeable=True, slug="vera", hf_peft="module",
    cohort_kind=None,  # each run trains alone
    # what HF peft's VeraConfig expects to find in adapter_config.json
    hf_fields=dict(fan_in_fan_out=False, bias="none", init_weights=True, modules_to_save=None,
                   layers_to_transform=None, layers_pattern=None, inference_mode=True, task_type=None,
                   base_model_name_or_path=None),
    # save_projection off: the pair is drawn again from its key (as peft does), so a file holds only
    # the vectors (3 KB, not 67 KB): the smallest phi of the family, on disk too
    preset=Preset(VeraConfig(r=64, target_modules=("v",), save_projection=False),
                  dict(steps=300, lr=5e-2, batch_size=32))))
