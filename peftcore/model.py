"""The toy base: a small decoder-only transformer with named projections.

Every Linear that a PEFT method may target has a short, stable name (q, k, v, o in
attention; up, down in the MLP), so `target_modules=["q", "v"]` means what it means
in HF peft. The model knows nothing about PEFT: methods wrap it from the outside.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


PROJECTIONS = ("q", "k", "v", "o", "up", "down")  # the Linears a method may target, by name


def projection_shapes(config):
    """(d_in, d_out) of each projection, by name: what a method's closed-form phi size reads."""
    d, m = config.d_model, config.d_mlp
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (d, m), "down": (m, d)}


@dataclass
class BaseConfig:
    vocab_size: int = 30  # 10 digits, SEP, 19 task tokens (see tasks.py)
    block_size: int = 18  # longest sequence of real tokens
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512

    def to_dict(self):
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: BaseConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x, attn_mask=None, prefix=None):
        """attn_mask: bool (B, 1, T, T), True = may attend; None = causal. prefix: keys and
        values in front of the real ones, as transformers' past key values: (k, v, keep),
        k and v (B, n_head, P, head_dim), keep a bool (B, P) of the prefix slots each row
        may attend (None = all). A query sees every kept prefix slot and its real positions."""
        B, T, C = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if prefix is not None:
            pk, pv, keep = prefix
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            # an explicit mask: is_causal would put the diagonal in the wrong corner of (T, P + T)
            real = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if attn_mask is None else attn_mask
            front = torch.ones(1, pk.shape[2], dtype=torch.bool, device=x.device) if keep is None else keep
            rows = max(front.shape[0], real.shape[0] if real.dim() == 4 else 1)
            attn_mask = torch.cat([front[:, None, None, :].expand(rows, 1, T, -1), real.expand(rows, 1, T, T)], dim=-1)
        if attn_mask is None:  # the fast path: no mask tensor
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o(y.transpose(1, 2).reshape(B, T, C))

    def _heads(self, t):
        """(B, T, C) -> (B, n_head, T, C // n_head)."""
        B, T, C = t.shape
        return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def weights(self, x):
        """The causal attention probabilities (B, n_head, T, T) over its own keys: what the
        fast path computes without returning them (peftcore.analysis reads them)."""
        q, k = self._heads(self.q(x)), self._heads(self.k(x))
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)


class MLP(nn.Module):
    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, prefix=None):
        # prefix only when given: a wrapper of attn (a PEFT layer) need not know the keyword
        h = self.ln1(x)
        x = x + (self.attn(h, attn_mask) if prefix is None else self.attn(h, attn_mask, prefix=prefix))
        return x + self.mlp(self.ln2(x))


class Embeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(pos)


class ToyTransformer(nn.Module):
    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx=None, inputs_embeds=None, attn_mask=None, prefix=None):
        """Logits for every position. Soft prompts pass `inputs_embeds` (already
        embedded, virtual tokens in front) and, for rows of unequal prompt length, a
        boolean `attn_mask` (B, 1, T, T) where True means "may attend". `prefix`: one
        (k, v, keep) per block, keys and values in front of its attention's own (Attention)."""
        x = self.embed(idx) if inputs_embeds is None else inputs_embeds
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask) if prefix is None else block(x, attn_mask, prefix=prefix[i])
        return self.head(self.ln_f(x))
