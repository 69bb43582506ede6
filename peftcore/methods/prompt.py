"""Prompt tuning (Lester et al., 2021): n trainable embeddings in front of the input.

The virtual tokens are prepended after the real tokens' position embeddings are added,
so the real tokens keep the positions the base was pretrained on. Predictions are read
at the real tokens' positions only.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import PeftConfig, PhiLayer, check_range
from .registry import Method, Preset, register


@dataclass
class PromptTuningConfig(PeftConfig):
    peft_type = "PROMPT_TUNING"
    num_virtual_tokens: int = 8

    def validate(self):
        check_range("num_virtual_tokens", self.num_virtual_tokens, 1, 64)

    def num_params(self, base_config):
        """Closed form: n * d."""
        return self.num_virtual_tokens * base_config.d_model


class PromptEmbedding(nn.Module):
    def __init__(self, cfg: PromptTuningConfig, token_embedding: nn.Embedding, generator=None):
        super().__init__()
        # start from real vocabulary embeddings (sampled), a better start than noise
        ids = torch.randint(0, token_embedding.num_embeddings, (cfg.num_virtual_tokens,), generator=generator)
        self.embedding = nn.Parameter(token_embedding.weight.detach()[ids.to(token_embedding.weight.device)].clone())


class PromptEncoder(PhiLayer):
    """Every prompt of a model, keyed by adapter name; puts the routed one(s) in front.
    An input layer (`prepends`): PeftModel runs it on the embeddings of the rows it serves."""
    prepends = True
    containers = ("prompts",)

    def __init__(self, route):
        super().__init__()
        self.route = route
        self.prompts = nn.ModuleDict()

    def add(self, name, cfg: PromptTuningConfig, token_embedding, generator=None):
        self.prompts[name] = PromptEmbedding(cfg, token_embedding, generator)

    def serves(self, names):
        """Whether any of the phi `names` a forward uses is one of these prompts."""
        return any(n in self.prompts for n in names)

    def forward(self, embeds):
        """embeds (B, T, d) -> (x, attn_mask, n): x has n positions in front of the real
        tokens; attn_mask is None unless rows carry prompts of unequal length."""
        if self.route.rows is not None:
            return self._mixed(embeds)
        p = self.prompts[self.route.active]
        B, T, d = embeds.shape
        n = p.embedding.shape[0]
        return torch.cat([p.embedding.expand(B, n, d), embeds], dim=1), None, n

    def _stack(self):
        """(N+1, n_max, d) right-aligned prompts, slot 0 empty, and their lengths."""
        tensors = [p.embedding for p in self.prompts.values()]
        return self._stack_cache.get(self.route.generation, tensors, lambda: self._build_stack(tensors))

    @staticmethod
    def _build_stack(tensors):
        embs = [t.detach() for t in tensors]
        n_max = max(e.shape[0] for e in embs)
        stack = embs[0].new_zeros(len(embs) + 1, n_max, embs[0].shape[1])
        for i, e in enumerate(embs, start=1):
            stack[i, n_max - e.shape[0]:] = e
        lengths = torch.tensor([0] + [e.shape[0] for e in embs], device=stack.device)
        return stack, lengths

    def _mixed(self, embeds):
        B, T, d = embeds.shape
        stack, lengths = self._stack()
        slots = self.route.slots(list(self.prompts), embeds.device)
        n = stack.shape[1]
        L = n + T
        # a row sees its own virtual tokens (right-aligned) and, causally, its real tokens
        used = torch.arange(n, device=embeds.device)[None] >= n - lengths[slots][:, None]
        keys = torch.cat([used, used.new_ones(B, T)], dim=1)
        causal = torch.ones(L, L, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None] & keys[:, None, :]
        mask |= torch.eye(L, dtype=torch.bool, device=embeds.device)  # no row attends to nothing
        return torch.cat([stack[slots], embeds], dim=1), mask[:, None], n


def add_prompt(model, name, cfg, generator=None):
    """The model's prompt encoder (made on first use) holds prompt `name`."""
    if getattr(model, "prompt_encoder", None) is None:
        model.prompt_encoder = PromptEncoder(model.route)
    model.prompt_encoder.add(name, cfg, model.base_model.embed.tok, generator)


register(Method(
    PromptTuningConfig, plug=add_prompt, layers=(PromptEncoder,), starts_as_base=False, slug="prompt",
    hf_peft="transformers",
    # prompt tuning wants a high learning rate (Lester et al. used 0.3)
    preset=Preset(PromptTuningConfig(num_virtual_tokens=8), dict(steps=200, lr=1e-1, batch_size=32))))
