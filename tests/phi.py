"""Phi moved off its init without training, as the tests need it: seeded noise on every
parameter of one adapter (or of all), or of a full copy's trainable weights."""
import torch


def randomize(model, name=None, seed=0, scale=0.1, replace=False):
    """Add (or, with `replace`, write) normal noise of std `scale`, drawn from `seed` in each
    parameter's dtype, to phi `name` (every phi when None; a full fine-tune's whole copy)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for _, p in model.named_adapter_parameters(name)] or list(model.trainable_parameters())
    assert params, "no phi to randomize"
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * scale
            p.copy_(noise) if replace else p.add_(noise)
    model._bump()
