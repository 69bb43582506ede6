"""PeftModel: the frozen base plus any number of named phi, HF peft style.

`get_peft_model(base, config)` never modifies `base`: it builds a *view*, a copy of the
module tree whose Parameters alias the base's storage (no weights copied), and plugs
phi into the view. One base object can serve every browser session at once.

Generic: what a method is and how it plugs in comes from the registry (registry.py; each
method registers in its own file). Nothing here names a method.
"""
import copy
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .methods import registry
from .base import fingerprint
from .merging import MergeOptions, check_weights
from .methods.config import MergeablePhiLayer, PeftConfig, PhiLayer

BASE_ROW = "__base__"  # the name of "no phi" in a mixed batch
NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


@dataclass
class Route:
    """Which phi a forward uses: one name (`active`, None = the bare base) or, for a
    mixed batch, one name per row (`rows`). Every phi layer of a model shares it, and with
    it the model's `generation`, which keys the layers' caches of stacked phi."""
    active: Optional[str] = None
    rows: Optional[list] = None
    generation: int = 0
    generator: Optional[torch.Generator] = None  # the training run's own stream, for dropout
    _slots: dict = field(default_factory=dict, repr=False)

    def slots(self, names, device):
        """Each row's index into a layer's stack of phi `names` (slot i+1 holds names[i];
        0 = no phi here). Built once per mixed forward for all layers holding the same phi."""
        key = (tuple(names), str(device))
        if key not in self._slots:
            slot_of = {n: i for i, n in enumerate(names, 1)}
            self._slots[key] = torch.tensor([slot_of.get(r, 0) for r in self.rows], device=device)
        return self._slots[key]


def shared_view(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose Parameters alias the original's tensors.

    New Module and Parameter objects, same storage: wrapping, `.to()`, hooks, `training` or
    requires_grad changes on the view never reach the original or another view."""
    clone = module.__new__(type(module))
    # every dict, set or list in __dict__ is per-module state (hooks of every kind, the
    # non-persistent buffer set...): the view gets its own copy, never the original's object
    clone.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in module.__dict__.items()}
    clone._parameters = {k: None if p is None else nn.Parameter(p.data, requires_grad=False)
                         for k, p in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {k: None if m is None else shared_view(m) for k, m in module._modules.items()}
    return clone


class PeftModel(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.route = Route()
        self.base_model = shared_view(base)
        self._base = [base]  # in a list so it is not registered as a submodule
        self._layers = None  # cache of _phi_layers()
        self._merged = None  # the adapter folded into merged weights, if any
        self.peft_config = {}  # adapter name -> config
        self.adapter_task = {}  # adapter name -> the task it was trained on, when known
        self.adapter_merged_from = {}  # adapter name -> how add_weighted_adapter made it (saved in its file)
        self.base_fingerprint = fingerprint(base)
        self.full = False
        # the base's mode (a frozen base is in eval mode): a bank that only serves never
        # enters training mode, so serving never moves its generation
        super().train(base.training)

    # ---------------------------------------------------------------- generation
    @property
    def generation(self) -> int:
        """An int that grows on every add, delete, load, merge, unmerge, move (`.to()`) and
        training: key any cache of what phi computes on it (never on id() or data_ptr())."""
        return self.route.generation

    def _bump(self):
        self.route.generation += 1

    def train(self, mode=True):
        # phi changes only in training mode (train() starts there): any call in or out of it
        # moves the generation, so a cache keyed on it never outlives a training run
        if mode or self.training:
            self._bump()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)  # .to(), .half(), ...: tensors replaced
        self._bump()
        return out

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name, config: PeftConfig, seed=None):
        """Add phi `adapter_name` and make it active (so that it trains). `seed` draws its
        initial values from a private generator (reproducible even with other runs in other
        threads); None uses torch's global RNG, as HF peft does."""
        self.inject_adapter(adapter_name, config, seed)
        self.set_adapter(adapter_name)

    def inject_adapter(self, adapter_name, config: PeftConfig, seed=None):
        """Add phi `adapter_name` without making it active: the active adapter and what
        trains stay as they were (HF peft's load_adapter does the same)."""
        if not NAME_RE.fullmatch(str(adapter_name)) or adapter_name == BASE_ROW:
            raise ValueError(f"adapter name must be 1-64 letters, digits, '_' or '-', got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        method = registry.method_of(config)  # an unknown config is an error, never a full fine-tune
        if self.full or (not method.shares_base and self.peft_config):
            raise ValueError("full fine-tuning is a whole trainable copy; it cannot share a model with phi")
        config.validate()
        try:
            self._plug(adapter_name, config, None if seed is None else torch.Generator().manual_seed(seed))
        except BaseException:
            self._remove(adapter_name)  # half plugged in: take out what was
            raise
        self.peft_config[adapter_name] = config
        for _, p in self.named_adapter_parameters(adapter_name):
            p.requires_grad_(False)  # only the active phi trains
        self._bump()

    def _plug(self, adapter_name, config, g):
        self._layers = None
        registry.method_of(config).plug(self, adapter_name, config, g)
        self._layers = None

    def delete_adapter(self, adapter_name):
        """Remove phi `adapter_name`; wrapper layers it leaves empty are unwrapped, so the
        module tree is what it would be had the adapter never been added."""
        self._check(adapter_name)
        self._remove(adapter_name)

    def _remove(self, adapter_name):
        if self._merged == adapter_name:
            self.unmerge_adapter()
        if self.full:  # back to a view of the shared base
            self.base_model, self.full, self._layers = shared_view(self._base[0]), False, None
        for layer in self._phi_layers():
            layer.remove(adapter_name)
        self._unwrap_empty()
        self.peft_config.pop(adapter_name, None)
        self.adapter_task.pop(adapter_name, None)
        self.adapter_merged_from.pop(adapter_name, None)
        if self.route.active == adapter_name:
            self.route.active = None
        self._bump()

    def _unwrap_empty(self):
        """Put back the wrapped module wherever a phi wrapper holds no phi any more, and drop
        a model-level phi layer (a prompt encoder) left empty."""
        for child_name, child in list(self.named_children()):
            if child is not self.base_model and isinstance(child, PhiLayer) and not child.has_phi():
                delattr(self, child_name)
        for parent in list(self.base_model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, PhiLayer) and child.wraps and not child.has_phi():  # a wrapper left empty
                    setattr(parent, child_name, child.wrapped())
        self._layers = None

    def set_adapter(self, adapter_name):
        """Point the route at another phi: no tensor moves, only the requires_grad flags of the
        old and the new phi flip (a cost that does not grow with the number of phi held).
        Only the active phi trains. A merged LoRA is unmerged first, as in HF peft."""
        self._check(adapter_name)
        if self._merged is not None:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
            self.unmerge_adapter()
        previous, self.route.active = self.route.active, adapter_name
        # invariant: only the active phi requires grad, so only two adapters need a flip
        if previous in self.peft_config and previous != adapter_name:
            for _, p in self.named_adapter_parameters(previous):
                p.requires_grad_(False)
        for _, p in self.named_adapter_parameters(adapter_name):
            p.requires_grad_(True)
        frozen = registry.method_of(self.peft_config[adapter_name]).frozen_phi
        for p in frozen(self, adapter_name, self.peft_config[adapter_name]) if frozen else ():
            p.requires_grad_(False)
        if self.full:
            for p in self.base_model.parameters():
                p.requires_grad_(True)

    @property
    def active_adapter(self):
        return self.route.active

    @contextmanager
    def disable_adapter(self):
        """Run the bare base inside the block (a merged LoRA's weights are not used there:
        they serve only their own adapter)."""
        saved = self.route.active
        self.route.active = None
        try:
            yield
        finally:
            self.route.active = saved

    def _check(self, adapter_name):
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter named {adapter_name!r}; have {sorted(self.peft_config)}")

    def _phi_layers(self):
        """The modules that hold phi, found once per change of structure (set_adapter is hot)."""
        return self._found_layers()[1]

    def _named_phi_layers(self):
        """(module path, layer) of every phi layer, found once per change of structure."""
        return self._found_layers()[0]

    def _found_layers(self):
        if self._layers is None:
            kinds = registry.layer_types()
            named = [(n, m) for n, m in self.named_modules() if isinstance(m, kinds)]
            self._layers = named, [m for _, m in named]
        return self._layers

    def _input_layers(self, names):
        """The phi layers that change a forward's input embeddings (a soft prompt) for `names`."""
        return [m for m in self._phi_layers() if getattr(m, "prepends", False) and m.serves(names)]

    def named_adapter_parameters(self, adapter_name=None):
        """(adapter name, parameter) for every phi parameter, or those of one adapter."""
        containers = registry.containers()  # once: set_adapter runs this, and it is hot
        for layer in self._phi_layers():
            for attr in containers:
                container = getattr(layer, attr, {})
                names = list(container) if adapter_name is None else [adapter_name] if adapter_name in container else []
                for name in names:
                    held = container[name]  # a module (a ModuleDict's) or a Parameter (a ParameterDict's)
                    for p in [held] if isinstance(held, nn.Parameter) else held.parameters():
                        yield name, p

    def adapter_state_dict(self, adapter_name=None):
        """phi's tensors under names without the adapter name (HF peft's saved layout)."""
        adapter_name = adapter_name or self.route.active
        self._check(adapter_name)
        if self.full:  # the whole copy is phi
            return {_hf_key(k.split("."), adapter_name): t for k, t in self.state_dict().items()
                    if k.startswith("base_model.")}
        out = {}  # from the layers holding it, not the whole state_dict: loading the library, 147 -> 48 ms
        for path, layer in self._named_phi_layers():
            for attr in layer.containers:
                held = getattr(layer, attr)
                if adapter_name not in held:
                    continue
                held = held[adapter_name]
                items = [("", held.detach())] if isinstance(held, nn.Parameter) else held.state_dict().items()
                for name, t in items:
                    key = ".".join(p for p in (path, attr, adapter_name, name) if p)
                    out[_hf_key(key.split("."), adapter_name)] = t
        out.update(self.fixed_state_dict(adapter_name))
        return out

    def fixed_state_dict(self, adapter_name):
        """The part of adapter_state_dict that never trains (PhiLayer.fixed_state): loading a
        file checks these tensors against the model's and never writes them."""
        out = {}
        for layer in self._phi_layers():
            out.update({k: t.detach() for k, t in layer.fixed_state(adapter_name).items()})
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, idx, adapter_names=None):
        """Logits at the real tokens. `adapter_names`: one phi name per row (BASE_ROW for
        none) to run a mixed batch in one pass; inference only."""
        if adapter_names is not None:
            return self._mixed_forward(idx, adapter_names)
        return self._run(idx, [self.route.active])

    def _run(self, idx, names):
        """The view's logits at the real tokens, the input layers serving `names` (a soft
        prompt) run on the embeddings first."""
        view = self.base_model
        inputs = self._input_layers(names)
        if not inputs:
            return view(idx)
        x, mask, n = view.embed(idx), None, 0
        for layer in inputs:
            x, mask, added = layer(x)
            n += added
        return view(inputs_embeds=x, attn_mask=mask)[:, n:]

    def _mixed_forward(self, idx, adapter_names):
        names = list(adapter_names)
        if len(names) != idx.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {idx.shape[0]} rows")
        unknown = sorted(set(names) - set(self.peft_config) - {BASE_ROW})
        if unknown:
            raise KeyError(f"unknown adapter name(s) {unknown}; have {sorted(self.peft_config)} and {BASE_ROW!r}")
        if self._merged is not None:  # as HF peft: a merged W would serve every row
            merged = self.peft_config[self._merged].peft_type
            raise ValueError(f"Cannot pass `adapter_names` while the {merged} adapter {self._merged!r} is merged; "
                             "call unmerge_adapter() first.")
        if len(set(names)) == 1 and names[0] != BASE_ROW and not self.training:
            return self._one_phi_forward(idx, names[0])
        self.route.rows, self.route._slots = names, {}
        try:
            with torch.no_grad():
                return self._run(idx, names)
        finally:
            self.route.rows, self.route._slots = None, {}

    def _one_phi_forward(self, idx, name):
        """A batch whose rows all name one phi: that phi's own forward (a third less time than
        gathering it row by row for a whole held-out set), the active adapter left as it was."""
        active = self.route.active
        self.route.active = name
        try:
            with torch.no_grad():
                return self._run(idx, [name])
        finally:
            self.route.active = active

    # ---------------------------------------------------------------- counting
    def get_nb_trainable_parameters(self):
        """(trainable, all): HF peft's figures. All = base + every resident phi."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self):
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_num_params(self, adapter_name):
        return sum(p.numel() for _, p in self.named_adapter_parameters(adapter_name))

    def memory_bytes(self):
        """{"base": bytes of the frozen base (held once), "phi": {name: bytes}} in memory."""
        phi = {name: sum(p.numel() * p.element_size() for _, p in self.named_adapter_parameters(name))
               for name in self.peft_config}
        base = sum(p.numel() * p.element_size() for p in self._base[0].parameters())
        return {"base": base, "phi": phi}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_groups(self, lr):
        """AdamW's parameter groups for training the active phi, as its method wants them
        (LoRA+ gives B a higher learning rate), or None for one group of every trainable tensor."""
        name = self.route.active
        config = self.peft_config.get(name)
        groups = registry.method_of(config).optimizer_groups if config is not None else None
        return groups(self, name, config, lr) if groups else None

    # ---------------------------------------------------------------- files
    def save_pretrained(self, save_directory, adapter_name=None):
        """Write adapter_model.safetensors and adapter_config.json (HF peft's layout)."""
        from .serialization import save_pretrained
        return save_pretrained(self, save_directory, adapter_name)

    @classmethod
    def from_pretrained(cls, base, model_id, adapter_name="default"):
        """A new PeftModel over a view of `base` with the phi saved in directory `model_id`,
        active (its only phi), as in HF peft."""
        model = cls(base)
        model.load_adapter(model_id, adapter_name)
        model.set_adapter(adapter_name)
        return model

    def load_adapter(self, model_id, adapter_name):
        """Add the phi saved in directory `model_id` under `adapter_name`, not active (as in
        HF peft: set_adapter to use it). A refused file leaves the model exactly as it was."""
        from .serialization import load_adapter_dir
        return load_adapter_dir(self, model_id, adapter_name)

    # ---------------------------------------------------------------- merging
    def _merge_layers(self, name=None):
        """The phi layers that can fold phi into a merged weight (those holding `name`)."""
        return [m for m in self._phi_layers() if isinstance(m, MergeablePhiLayer) and (name is None or m.has_phi(name))]

    def _check_mergeable(self, name, what):
        cfg = self.peft_config.get(name)
        if cfg is None or not registry.method_of(cfg).mergeable:
            mergeable = [t for t, m in registry.METHODS.items() if m.mergeable]
            raise ValueError(f"{what} needs an active adapter of a method that merges ({', '.join(mergeable)}), "
                             f"active is {name!r}")

    def merge_adapter(self):
        """Fold the active adapter into merged copies of its weights; the shared base is
        untouched. Until unmerge_adapter(), set_adapter() unmerges first and mixed batches
        are refused."""
        name = self.route.active
        self._check_mergeable(name, "merging")
        self.unmerge_adapter()
        for layer in self._merge_layers(name):
            layer.merge(name)
        self._merged = name
        self._bump()

    def unmerge_adapter(self):
        for layer in self._merge_layers():
            layer.unmerge()
        self._merged = None
        self._bump()

    @property
    def merged_adapter(self):
        """The adapter folded into merged weights, or None."""
        return self._merged

    def merge_and_unload(self):
        """A plain base-architecture model with the active adapter folded in. Weights it did
        not touch still alias the base; merged ones are new tensors."""
        name = self.route.active
        self._check_mergeable(name, "merge_and_unload")
        plain = shared_view(self.base_model)
        _unwrap(plain, name)
        return plain.eval()

    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                             svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                             majority_sign_method="total", seed=None):
        """Add phi `adapter_name`, the phi `adapters` combined with `weights`, as HF peft's
        add_weighted_adapter (same names, same defaults; peftcore.merging says what each
        combination_type computes). All the adapters must be of one method that combines its
        phi (its registry entry's `combine`). The new phi is not made active; its task is the
        sources' where they share one, else it has none; adapter_merged_from[adapter_name] (and its
        file) records the combination_type, the sources (the adapters), their weights and tasks.

        Unlike HF peft: a name that exists is an error (peft returns without a word), and
        `seed` draws dare_*'s random drops from a private generator (None: torch's global RNG,
        as peft), so that a merge can be repeated. A refused merge leaves the model as it was."""
        if not NAME_RE.fullmatch(str(adapter_name)) or adapter_name == BASE_ROW:
            raise ValueError(f"adapter name must be 1-64 letters, digits, '_' or '-', got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} already exists: choose a new name for the merged "
                             "phi (HF peft would silently keep the old one)")
        adapters = [adapters] if isinstance(adapters, str) else list(adapters)
        if not adapters:
            raise ValueError("add_weighted_adapter needs at least one adapter to combine")
        for name in adapters:
            self._check(name)
        weights = check_weights(adapters, weights)
        options = MergeOptions(combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density,
                               majority_sign_method)
        options.validate()
        kinds = {self.peft_config[name].peft_type for name in adapters}
        if len(kinds) > 1:
            raise ValueError(f"adapters of different methods ({', '.join(sorted(kinds))}) cannot be combined into one")
        method = registry.method_of(self.peft_config[adapters[0]])
        if method.combine is None:
            combinable = [t for t, m in registry.METHODS.items() if m.combine is not None]
            raise ValueError(f"{method.peft_type} phi cannot be combined; add_weighted_adapter combines "
                             f"{', '.join(combinable)} phi")
        try:
            method.combine(self, adapters, weights, adapter_name, options, seed)
        except BaseException:
            if adapter_name in self.peft_config:
                self._remove(adapter_name)  # half made: take it out again
            raise
        tasks = [self.adapter_task.get(name) for name in adapters]
        if len(set(tasks)) == 1 and tasks[0] is not None:
            self.adapter_task[adapter_name] = tasks[0]
        self.adapter_merged_from[adapter_name] = dict(combination_type=combination_type, sources=adapters,
                                                      weights=weights, tasks=tasks)
        self._bump()


def _hf_key(parts, adapter_name):
    """base_model.blocks.0.attn.q.<container>.<adapter>.weight -> base_model.model.blocks.0.attn.q.<container>.weight:
    HF peft's saved layout (no adapter name, no wrapper's attribute, the model under base_model.model)."""
    out = []
    for i, part in enumerate(parts):
        # wrappers (a phi layer around a projection or sublayer) and adapter names are not part of the saved name
        if part in registry.wrapper_attributes() or (i and parts[i - 1] in registry.containers() and part == adapter_name):
            continue  # wrappers and adapter names are not part of the saved name
        out.append(part)
    if out[0] == "base_model":
        out.insert(1, "model")
    return ".".join(out)


def _unwrap(module, name):
    """Replace every phi wrapper by what it unloads to: plain modules, phi `name` folded in."""
    for child_name, child in list(module.named_children()):
        if isinstance(child, PhiLayer) and child.wraps:
            child = child.unloaded(name)
            setattr(module, child_name, child)
        _unwrap(child, name)


def get_peft_model(base: nn.Module, config: PeftConfig, adapter_name="default", seed=None) -> PeftModel:
    """A PeftModel over a view of `base` with one phi; `base` itself is never modified."""
    model = PeftModel(base)
    model.add_adapter(adapter_name, config, seed)
    return model

