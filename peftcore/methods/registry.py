"""The method registry, as HF peft registers one method per folder: each method declares
itself once, at the end of its own file (lora.py, adapter.py, prompt.py, ia3.py, prefix.py,
full.py), and generic code (PeftModel, cohorts, files, the store, presets, the library)
asks here and never names a method. A config no method registered is an error.

    register(Method(LoraConfig, plug=add_lora, layers=(LoraLinear,), mergeable=True, cohort_kind=...,
                    slug="lora", preset=Preset(...)))

A method's layers are PhiLayers (config.py): what they hold and wrap, they name themselves.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Preset:
    """A method's default for a live demo: its config and the keyword arguments of train()."""
    config: object
    train: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    config_cls: type               # its PeftConfig subclass; config_cls.peft_type is its key
    plug: Callable                 # plug(model, adapter_name, config, generator): puts its phi in
    preset: Preset                 # what a live run of it trains by default
    slug: str                      # its short name in files and phi names ("lora" -> lora-times_3)
    layers: tuple = ()             # its PhiLayer classes, which hold its phi by adapter name
    shares_base: bool = True       # False: a whole trainable copy (no bank, no class, no mixed batch)
    mergeable: bool = False        # folds into the base's weights (merge_adapter, merge_and_unload)
    starts_as_base: bool = True    # its fresh phi changes no output (False: a prompt or prefix is there at once)
    cohort_kind: Optional[Callable] = None  # config -> hashable (runs of one kind ride together), or
                                            # None for a config that trains alone
    hf_fields: dict = field(default_factory=dict)  # what HF peft's config of it also expects to read
    hf_peft: str = ""              # where HF peft runs it: "module" (any torch module), "transformers"
                                   # (a transformers model only), "" (peft has no such method)
    optimizer_groups: Optional[Callable] = None  # (model, name, config, lr) -> AdamW's parameter groups
                                   # (a group may carry "before_step", a callable run on its gradients
                                   # before each step), or None for one group of every trainable tensor
    frozen_phi: Optional[Callable] = None  # (model, name, config) -> phi tensors that are saved but never
                                   # train (LoRA-FA's A), or None
    max_abs_value: Optional[float] = None  # the largest |value| a file of its phi may hold, where
                                   # serialization's MAX_ABS_VALUE is too high (phi multiplied by phi)
    combine: Optional[Callable] = None  # (model, adapters, weights, adapter_name, options, seed): adds phi
                                   # adapter_name, the weighted combination of phi `adapters` (PeftModel.
                                   # add_weighted_adapter; options: a merging.MergeOptions), or None for a
                                   # method whose phi do not combine
    combinations: tuple = ()       # the combination_types its combine takes, the first its default

    @property
    def peft_type(self):
        return self.config_cls.peft_type

    @property
    def containers(self):
        """The attributes of its layers that hold phi's tensors by adapter name."""
        return tuple({c: None for cls in self.layers for c in cls.containers})


METHODS = {}  # peft_type -> Method, in the order the methods registered


class UnknownMethod(TypeError):
    """A config, or a peft_type in a file, that no method registered."""


def register(method: Method) -> Method:
    """Add a method; its peft_type, slug and the attributes its layers hold phi in must be its
    own (saved names and phi names are built from them)."""
    from .config import PhiLayer
    if method.peft_type in METHODS:
        raise ValueError(f"a method with peft_type {method.peft_type!r} is already registered")
    bad = [cls.__name__ for cls in method.layers if not (isinstance(cls, type) and issubclass(cls, PhiLayer))]
    if bad:
        raise TypeError(f"{method.peft_type}: its layers must be PhiLayers (peftcore.methods.config): {bad}")
    for other in METHODS.values():
        if method.slug == other.slug:
            raise ValueError(f"{method.peft_type}: the slug {method.slug!r} is {other.peft_type}'s")
        shared = set(method.containers) & set(other.containers)
        if shared:
            raise ValueError(f"{method.peft_type}: {sorted(shared)} already hold {other.peft_type}'s phi")
    METHODS[method.peft_type] = method
    return method


def unregister(peft_type):
    """Take a method out again (a test's toy method)."""
    METHODS.pop(peft_type, None)


def method_of(config) -> Method:
    """The registered method of a config object, or of a peft_type string."""
    peft_type = config if isinstance(config, str) else getattr(config, "peft_type", None)
    method = METHODS.get(peft_type) if isinstance(peft_type, str) else None
    if method is None or (not isinstance(config, str) and type(config) is not method.config_cls):
        raise UnknownMethod(f"no method is registered for {config!r}; known: {', '.join(METHODS)}")
    return method


def layer_types():
    """Every module class that holds phi, across the registered methods."""
    return tuple({cls: None for m in METHODS.values() for cls in m.layers})


def containers():
    """Every attribute name under which a phi layer holds phi by adapter name."""
    return tuple({c: None for m in METHODS.values() for c in m.containers})


def wrapper_attributes():
    """Every attribute name under which a phi layer keeps the module it wraps."""
    return tuple({cls.wraps: None for cls in layer_types() if cls.wraps})


def bankable():
    """The peft_types whose phi share a base in a bank (a full fine-tune is a whole model)."""
    return tuple(t for t, m in METHODS.items() if m.shares_base)
