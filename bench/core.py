"""Per method: trainable params, ms per training step, memory; peftcore LoRA vs HF peft.

    python -m bench.core [--device cpu|cuda] [--reps 7]

Steps of all methods are timed side by side (interleaved), median of several runs, and
reported as ratios to full fine-tuning measured in the same run.
"""
import argparse
import copy

import torch
import torch.nn.functional as F

import peftcore
from peftcore.presets import PRESETS

from peftcore.timing import side_by_side

from .common import machine


def make_step(model, batch, lr=1e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    x, y = batch

    def step():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, opt


def state_bytes(model, opt):
    """Bytes of what training adds per run: gradients and AdamW moments (measured on the tensors)."""
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return grads + moments


def peak_bytes(step, device):
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def hf_lora(base, cfg):
    import peft
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules)))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    device = args.device
    base = peftcore.load_base(device=device)
    n_base = sum(p.numel() for p in base.parameters())
    batch = peftcore.TASKS["times_3"].batch(64, torch.Generator().manual_seed(0), device=device)
    print(f"machine: {machine()}; batch 64 x 17 tokens\n")

    models, steps, opts = {}, {}, {}
    for name, preset in PRESETS.items():
        models[name] = peftcore.get_peft_model(base, preset.config)
        steps[name], opts[name] = make_step(models[name], batch)
    lora_cfg = PRESETS["LORA"].config
    try:
        models["HF peft LoRA"] = hf_lora(base, lora_cfg)
        steps["HF peft LoRA"], opts["HF peft LoRA"] = make_step(models["HF peft LoRA"], batch)
    except ImportError:
        print("(peft not installed: HF comparison skipped)")
    secs = side_by_side(steps, repeats=args.reps, inner=10, warmup=2, device=device)
    full = "FULL"
    full_state = state_bytes(models[full], opts[full])
    full_peak = peak_bytes(steps[full], device)
    print("| method | trainable params | % of base | ms / step | x full FT | grad+AdamW bytes | x full FT | peak GPU MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sb = state_bytes(model, opts[name])
        peak = peak_bytes(steps[name], device)
        print(f"| {name} | {trainable:,} | {100 * trainable / n_base:.2f} | {1000 * secs[name]:.1f} | "
              f"{secs[name] / secs[full]:.2f} | {sb:,} | {sb / full_state:.3f} | "
              f"{'-' if peak is None else f'{peak / 2**20:.1f} ({peak / full_peak:.2f}x)'} |")

    if "HF peft LoRA" in models:  # same A and B in both, then compare outputs
        ours, theirs = peftcore.get_peft_model(base, lora_cfg), models["HF peft LoRA"]
        g = torch.Generator().manual_seed(1)
        hf_state = theirs.state_dict()
        with torch.no_grad():
            for key, t in ours.adapter_state_dict().items():
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
                hf_state[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")].copy_(t)
            diff = (ours(batch[0]) - theirs.eval()(batch[0])).abs().max().item()
        print(f"\npeftcore LoRA vs HF peft LoRA ({lora_cfg.r=}, {lora_cfg.target_modules=}): "
              f"max |output difference| {diff:.2e}; step time ratio peftcore/HF "
              f"{secs['LORA'] / secs['HF peft LoRA']:.2f}")


if __name__ == "__main__":
    main()
