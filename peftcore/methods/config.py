"""What every method shares: a config with a peft_type and a round trip through JSON, and
the helpers for stacking many phi (the cache of mixed batches, padding to one size)."""
from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class PeftConfig:
    peft_type = "BASE"  # class attribute: HF peft's name for the method

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
    while hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    return module
