"""What every method shares: a config with a peft_type and a round trip through JSON, the phi
layer every method's layer is (PhiLayer, and MergeablePhiLayer for phi that folds into a
weight), and the helpers for stacking many phi (the cache of mixed batches, padding to one size)."""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn


@dataclass
class PeftConfig:
    peft_type = "BASE"  # class attribute: HF peft's name for the method
    # fields that say how phi trains, not what it is (LoRA+'s learning-rate ratio): HF peft has
    # them as optimizer arguments, so a saved file keeps them in its "peftcore" record
    training_fields = ()

    def to_dict(self):
        d = asdict(self)
        d["peft_type"] = self.peft_type
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"peft_type"}
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs)

    def validate(self):
        """Raise ValueError naming the bad field. Subclasses add their checks."""

    def hf_optimizer(self, lr):
        """HF peft code that builds the optimizer phi trains with here, where it is one of peft's
        own (LoRA+), or None for a plain optimizer."""
        return None


def check_range(name, value, lo, hi, kind=(int,)):
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number from {lo} to {hi}, got {value!r}")


class StackCache:
    """A value built from phi tensors (a layer's stacked weights for mixed batches), rebuilt
    when the model's generation moves or any tensor is replaced, moved or written in place.

    The key holds the tensors themselves and compares them with `is`: while cached they
    cannot be freed, so a new phi can never pass for an old one by reusing its memory
    (a key of data_ptr() alone can be fooled that way)."""

    def __init__(self):
        self.clear()

    def clear(self):
        self._tensors, self._state, self.value = (), None, None

    def get(self, generation, tensors, build):
        tensors = tuple(tensors)
        state = (generation, tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))
        same = state == self._state and len(tensors) == len(self._tensors) and \
            all(a is b for a, b in zip(tensors, self._tensors))
        if not same:
            self.value = build()
            self._tensors, self._state = tensors, state
        return self.value


def pad_to(t, size, dim):
    """`t` zero-padded along `dim` to `size`: a run with a smaller r or bottleneck beside a
    larger one (zero rank rows add nothing; zero bottleneck units give gelu(0) = 0)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def base_modules(module):
    """The modules of the base architecture: never into phi containers (ModuleDicts and
    ParameterDicts), so that an adapter's own `up` and `down` are not mistaken for the MLP's."""
    yield module
    for child in module.children():
        if not isinstance(child, (torch.nn.ModuleDict, torch.nn.ParameterDict)):
            yield from base_modules(child)


def unwrapped(module):
    """The base's own module under any stack of PEFT wrappers (LoRA's on k and v, an
    adapter or a prefix around attention)."""
    return module.get_base_layer() if isinstance(module, PhiLayer) and module.wraps else module


def wrapper_of(module, kind):
    """The wrapper of class `kind` in the stack of wrappers `module` heads, or None."""
    while not isinstance(module, kind) and isinstance(module, PhiLayer) and module.wraps:
        module = module.wrapped()
    return module if isinstance(module, kind) else None


class PhiLayer(nn.Module):
    """What every method's layer is: it holds phi by adapter name, and it either wraps a module
    (the projection, sublayer or other method's wrapper it stands in for) or stands alone (a
    prompt encoder). A method's layer names its attributes, and the code here (and in PeftModel)
    reads them; generic code never spells a method's attribute.

    containers:  attributes holding phi's tensors by adapter name (ModuleDicts, ParameterDicts);
                 the first says which names the layer holds
    per_adapter: other attributes keyed by adapter name (a scale, a flag), removed with them
    wraps:       the attribute holding the wrapped module, or None"""
    containers = ()
    per_adapter = ()
    wraps = None

    def __init__(self):
        super().__init__()
        self._stack_cache = StackCache()

    def has_phi(self, name=None):
        """Whether the layer holds phi `name` (or any phi)."""
        held = getattr(self, self.containers[0])
        return name in held if name is not None else len(held) > 0

    def remove(self, name):
        if not self.has_phi(name):
            return
        for attr in (*self.containers, *self.per_adapter):
            held = getattr(self, attr)
            if name in held:  # a container an option fills (DoRA's magnitude) may lack it
                del held[name]
        self._stack_cache.clear()  # let the removed phi go now, not at the next mixed batch

    def fixed_state(self, name):
        """{saved name: tensor} of what a file of phi `name` also holds that never trains: values
        its config fixes (a random projection drawn from a seed and shared by the model), under
        HF peft's saved names. Loading checks a file's against them and never writes them."""
        return {}

    def wrapped(self):
        """The module right under this wrapper (maybe another method's wrapper)."""
        return getattr(self, self.wraps)

    def get_base_layer(self):
        """The module under every wrapper (HF peft's get_base_layer)."""
        layer = self.wrapped()
        while isinstance(layer, PhiLayer) and layer.wraps:
            layer = layer.wrapped()
        return layer

    def unloaded(self, name):
        """What stands in this wrapper's place once phi is unloaded (merge_and_unload): the
        module under it, itself unloaded if it is a wrapper too."""
        under = self.wrapped()
        return under.unloaded(name) if isinstance(under, PhiLayer) and under.wraps else under


class MergeablePhiLayer(PhiLayer):
    """A phi layer around a Linear whose phi folds into the weight (`folded`). merge() keeps the
    folded weight beside the shared base's, never writing into it; unloaded() is a plain Linear."""

    def __init__(self):
        super().__init__()
        self.merged_adapter = None  # the adapter folded into merged_weight, if any
        self.merged_weight = None   # the folded weight, never written into the base's

    def folded(self, name):
        """The wrapped Linear's weight with phi `name` folded in."""
        raise NotImplementedError

    def merge(self, name):
        self.merged_adapter = name
        self.merged_weight = self.folded(name).detach()

    def unmerge(self):
        self.merged_adapter = self.merged_weight = None

    def unloaded(self, name):
        """A plain Linear in this wrapper's place, phi `name` folded in; another method's phi:
        the wrapper under it unloads itself."""
        under = self.wrapped()
        if not self.has_phi(name) and isinstance(under, PhiLayer) and under.wraps:
            return under.unloaded(name)
        w = (self.folded(name) if self.has_phi(name) else self.get_base_layer().weight).detach()
        plain = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        plain.weight = nn.Parameter(w, requires_grad=False)
        return plain
