"""Prefix tuning (Li & Liang, 2021), the deep prompts of P-tuning v2 (Liu et al., 2022):
n trainable keys and values in front of the real ones in every layer's attention.

    attention(q, [P_k; K], [P_v; V])      per block; P_k, P_v (n, d) trained, the base frozen

Prompt tuning (prompt.py) puts n vectors in front of the *input* only: what they say must
survive every frozen layer above them. A prefix speaks to each layer's attention directly.
The keys and values are handed to the base's attention as transformers' past key values
(model.Attention's `prefix`); they carry no position, as cached keys carry none of their own.

Direct, as HF peft's `prefix_projection=False`: no MLP reparameterisation, phi is the keys
and values themselves, n_layer * 2 * n * d numbers.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import PeftConfig, PhiLayer, check_range, unwrapped, wrapper_of
from ..model import BaseConfig
from .registry import Method, Preset, register


@dataclass
class PrefixTuningConfig(PeftConfig):
    peft_type = "PREFIX_TUNING"
    num_virtual_tokens: int = 8

    def validate(self):
        check_range("num_virtual_tokens", self.num_virtual_tokens, 1, 64)

    def num_params(self, base_config):
        """Closed form: n_layer * 2 * n * d (a key and a value per virtual token per layer)."""
        return base_config.n_layer * 2 * self.num_virtual_tokens * base_config.d_model


class Prefix(nn.Module):
    """One adapter's prefix in one layer: n keys and n values, each (n, d_model)."""

    def __init__(self, key, value):
        super().__init__()
        self.key = nn.Parameter(key)
        self.value = nn.Parameter(value)


class PrefixAttention(PhiLayer):
    """Wraps a block's attention (or a wrapper of it) and puts the routed prefix in front of
    its keys and values. Any other argument (attn_mask) passes through to the wrapped module."""

    containers, wraps = ("prefixes",), "sublayer"

    def __init__(self, sublayer, n_head, route):
        super().__init__()
        self.sublayer = sublayer
        self.n_head = n_head
        self.route = route
        self.prefixes = nn.ModuleDict()

    def add(self, name, key, value):
        self.prefixes[name] = Prefix(key, value)

    def _heads(self, t):
        """(..., n, d) -> (..., n_head, n, head_dim): the base's layout of keys and values."""
        return t.unflatten(-1, (self.n_head, -1)).transpose(-3, -2)

    def forward(self, x, *args, **kwargs):
        if self.route.rows is not None:
            if not any(r in self.prefixes for r in self.route.rows):
                return self.sublayer(x, *args, **kwargs)
            prefix = self._mixed(x.device)
        elif self.route.active in self.prefixes:
            p = self.prefixes[self.route.active]
            B = x.shape[0]
            prefix = (self._heads(p.key).expand(B, -1, -1, -1), self._heads(p.value).expand(B, -1, -1, -1), None)
        else:
            return self.sublayer(x, *args, **kwargs)
        return self.sublayer(x, *args, prefix=prefix, **kwargs)

    # --- mixed batches: each row its own prefix, right-aligned and padded to the longest
    def _stack(self):
        tensors = [t for p in self.prefixes.values() for t in (p.key, p.value)]
        return self._stack_cache.get(self.route.generation, tensors, lambda: self._build_stack(tensors))

    def _build_stack(self, tensors):
        """K, V (N+1, n_head, n_max, head_dim), slot 0 empty, and each slot's length."""
        keys, values = [t.detach() for t in tensors[0::2]], [t.detach() for t in tensors[1::2]]
        n_max = max(k.shape[0] for k in keys)
        K = keys[0].new_zeros(len(keys) + 1, n_max, keys[0].shape[1])
        V = torch.zeros_like(K)
        for i, (k, v) in enumerate(zip(keys, values), start=1):
            K[i, n_max - k.shape[0]:], V[i, n_max - v.shape[0]:] = k, v
        lengths = torch.tensor([0] + [k.shape[0] for k in keys], device=K.device)
        return self._heads(K), self._heads(V), lengths

    def _mixed(self, device):
        K, V, lengths = self._stack()
        slots = self.route.slots(list(self.prefixes), device)
        n_max = K.shape[2]
        # a row attends only its own slots; the padding in front of a shorter prefix, and every
        # slot of a row with no prefix here (slot 0, length 0), are masked out
        keep = torch.arange(n_max, device=device)[None] >= n_max - lengths[slots][:, None]
        return K[slots], V[slots], keep


def add_prefix(model, name, cfg: PrefixTuningConfig, generator=None):
    """Wrap each block's attention (once) and give it prefix `name`.

    Init, drawn from `generator`: values normal with std 0.02 (the base's own init scale), so
    the prefix adds almost nothing to what attention reads at step 0; keys normal with std 1,
    so the virtual tokens start apart and each can come to answer other queries. With near-zero
    keys too, every virtual token starts the same and gets the same gradient: n=16 solved 3 of
    the 20 non-sort runs (bench.presets, 5 seeds); keys at std 1 solved 12 of 20, and 17 of 20
    at n=32 (BENCHMARKS.md, "Prefix tuning's init"). Starting from the keys *and values* the
    base makes for sampled tokens (norms ~7) grabbed attention at step 0 and learned nothing."""
    view = model.base_model
    w = view.head.weight
    for block in view.blocks:
        layer = wrapper_of(block.attn, PrefixAttention)
        if layer is None:
            layer = block.attn = PrefixAttention(block.attn, unwrapped(block.attn).n_head, model.route)
        shape = (cfg.num_virtual_tokens, view.config.d_model)
        key, value = (torch.randn(shape, generator=generator).mul_(std).to(w.device, w.dtype) for std in (1.0, 0.02))
        layer.add(name, key, value)


_TOY = BaseConfig()  # the shape of the shipped base (weights/base.json)
# what HF peft's PrefixTuningConfig also carries; it fills the shapes from the model's config
HF_FIELDS = dict(task_type=None, inference_mode=True, base_model_name_or_path=None, revision=None,
                 num_layers=_TOY.n_layer, token_dim=_TOY.d_model, num_attention_heads=_TOY.n_head,
                 num_transformer_submodules=1, encoder_hidden_size=_TOY.d_model, prefix_projection=False,
                 modules_to_save=None)

register(Method(
    PrefixTuningConfig, plug=add_prefix, layers=(PrefixAttention,), starts_as_base=False, slug="prefix",
    hf_peft="transformers",
    hf_fields=HF_FIELDS,
    # a high learning rate, as prompt tuning's. n=32 (bench.presets, 5 seeds, keys at std 1):
    # times_3, complement and both compositions on 5 of 5 (seeds 5-9: the maps 5 each, the
    # compositions 4 each). Fewer: n=16 (12 of the 20 on seeds 0-4, with add_5 for times_3);
    # on add_5 n=64 solved 0 of 5 (BENCHMARKS.md, "Prefix tuning's init")
    preset=Preset(PrefixTuningConfig(num_virtual_tokens=32), dict(steps=300, lr=1e-1, batch_size=32))))
