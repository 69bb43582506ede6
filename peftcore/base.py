"""Loading the shipped, frozen base and fingerprinting tensors."""
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import BaseConfig, ToyTransformer

WEIGHTS_DIR = Path(__file__).parent / "weights"
BASE_PATH = WEIGHTS_DIR / "base.safetensors"
BASE_META_PATH = WEIGHTS_DIR / "base.json"


def fingerprint(module_or_state) -> str:
    """A stable sha256 over every tensor: names, shapes, dtypes and bytes, in name order."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_base(model, path=BASE_PATH, meta_path=BASE_META_PATH, **extra):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    meta = {"config": model.config.to_dict(), "fingerprint": fingerprint(state), **extra}
    Path(meta_path).write_text(json.dumps(meta, indent=2) + "\n")


def load_base(path=BASE_PATH, meta_path=BASE_META_PATH, device="cpu"):
    """The pretrained toy base, frozen, in eval mode. Never trains anything."""
    meta = json.loads(Path(meta_path).read_text())
    model = ToyTransformer(BaseConfig(**meta["config"]))
    model.load_state_dict(load_file(str(path)))
    return freeze(model).to(device)


def random_base(seed=0, device="cpu"):
    """A randomly initialised frozen base of the same shape: the control that shows
    why pretraining matters."""
    meta = json.loads(BASE_META_PATH.read_text())
    model = ToyTransformer(BaseConfig(**meta["config"]))
    g = torch.Generator().manual_seed(seed)  # private: safe beside training threads
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # the same init as ToyTransformer's, from our generator
                p.normal_(0.0, 0.02, generator=g)
    return freeze(model).to(device)


def base_file_bytes(path=BASE_PATH) -> int:
    return Path(path).stat().st_size
