"""Saving and loading phi: safetensors plus JSON, never pickle.

A phi file is HF peft's layout: `adapter_model.safetensors` (tensor names without the
adapter name) and `adapter_config.json` (HF peft's config fields plus a "peftcore"
record: method, task, base fingerprint, parameter count, version). The same config also
rides in the safetensors header, so one uploaded .safetensors file is self-contained.

Loading checks everything it can before it touches the model and rolls back on failure,
so a refused file leaves the model exactly as it was: the same phi, the same active one,
the same parameters training, the same module tree. A loaded phi is not made active.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from .peft_model import CONFIGS, FullFineTuneConfig, PeftModel

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
MAX_FILE_BYTES = 16 * 2**20  # a phi is kilobytes; a full fine-tuned toy model about 3 MB


class AdapterLoadError(ValueError):
    """Any reason a phi file cannot be loaded; the message names it."""


def _version():
    from . import __version__
    return __version__


def adapter_config(model: PeftModel, adapter_name):
    cfg = model.peft_config[adapter_name]
    n = sum(p.numel() for _, p in model.named_adapter_parameters(adapter_name)) if not model.full \
        else sum(p.numel() for p in model.base_model.parameters())
    record = {"method": cfg.peft_type, "task": model.adapter_task.get(adapter_name),
              "base_fingerprint": model.base_fingerprint, "num_params": n, "version": _version()}
    out = cfg.to_dict()
    if cfg.peft_type == "LORA":  # the fields HF peft's LoraConfig expects to find
        out.update(bias="none", fan_in_fan_out=False, inference_mode=True, task_type=None,
                   base_model_name_or_path=None, modules_to_save=None, init_lora_weights=True)
        out["target_modules"] = sorted(out["target_modules"])
    out["peftcore"] = record
    return out


def adapter_to_bytes(model: PeftModel, adapter_name=None):
    """One self-contained .safetensors file: tensors plus config in the header."""
    adapter_name = adapter_name or model.active_adapter
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict(adapter_name).items()}
    meta = {"adapter_config": json.dumps(adapter_config(model, adapter_name))}
    return st_save(tensors, metadata=meta)


def save_pretrained(model: PeftModel, save_directory, adapter_name=None):
    adapter_name = adapter_name or model.active_adapter
    d = Path(save_directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / WEIGHTS_NAME).write_bytes(adapter_to_bytes(model, adapter_name))
    (d / CONFIG_NAME).write_text(json.dumps(adapter_config(model, adapter_name), indent=2) + "\n")
    return d


def saved_bytes(save_directory):
    """Bytes on disk of a saved phi's tensors file."""
    return (Path(save_directory) / WEIGHTS_NAME).stat().st_size


# ------------------------------------------------------------------------- loading
def _parse_tensors(data: bytes):
    if len(data) > MAX_FILE_BYTES:
        raise AdapterLoadError(f"file is {len(data):,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")
    if len(data) < 8:
        raise AdapterLoadError(f"not a safetensors file: only {len(data)} bytes")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise AdapterLoadError("not a safetensors file (a pickle, a truncated or a random file?): "
                               "its header length points past the end of the file")
    try:
        header = json.loads(data[8:8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"not a valid safetensors file: {e}") from None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    return tensors, meta


def _parse_config(raw):
    try:
        d = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError as e:
        raise AdapterLoadError(f"adapter config is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise AdapterLoadError("adapter config must be a JSON object")
    record = d.get("peftcore") or {}
    if not isinstance(record, dict):
        raise AdapterLoadError("the config's \"peftcore\" record must be a JSON object")
    method, peft_type = record.get("method"), d.get("peft_type")
    if method and peft_type and method != peft_type:
        raise AdapterLoadError(f"the config contradicts itself: peft_type says {peft_type!r}, "
                               f"peftcore.method says {method!r}")
    peft_type = method or peft_type
    if peft_type not in CONFIGS:
        raise AdapterLoadError(f"unknown method {peft_type!r}; known: {sorted(CONFIGS)}")
    cls = CONFIGS[peft_type]
    fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
    try:
        cfg = cls.from_dict(fields)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"bad {peft_type} config: {e}") from None
    return cfg, record


def load_adapter(model: PeftModel, adapter_name, data: bytes, config=None):
    """Add phi `adapter_name` to `model` from safetensors bytes (config from `config`
    or from the file's header), not active: as HF peft's load_adapter, set_adapter to use it.
    Raises AdapterLoadError and leaves `model` exactly as it was."""
    tensors, meta = _parse_tensors(data)
    raw = config if config is not None else meta.get("adapter_config")
    if raw is None:
        raise AdapterLoadError("no adapter config: neither adapter_config.json nor one in the file's header")
    cfg, record = _parse_config(raw)
    want = record.get("base_fingerprint")
    if want and want != model.base_fingerprint:
        raise AdapterLoadError(f"this phi was trained on another base: file's base fingerprint {want[:16]}..., "
                               f"this base {model.base_fingerprint[:16]}...")
    if adapter_name in model.peft_config:
        raise AdapterLoadError(f"an adapter named {adapter_name!r} is already loaded")
    if isinstance(cfg, FullFineTuneConfig) and model.peft_config:
        raise AdapterLoadError("a full fine-tuned model needs a model of its own, not a bank")
    try:
        model.inject_adapter(adapter_name, cfg)  # the active phi and what trains stay as they are
    except ValueError as e:
        raise AdapterLoadError(str(e)) from None
    try:
        _copy_checked(model, adapter_name, tensors)
    except BaseException:
        model.delete_adapter(adapter_name)  # roll back, wrappers made for it included
        raise
    if record.get("task"):
        model.adapter_task[adapter_name] = record["task"]
    return model


def _copy_checked(model, adapter_name, tensors):
    target = model.adapter_state_dict(adapter_name)
    missing, extra = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
    if missing or extra:
        raise AdapterLoadError(f"tensor names do not match the config: missing {missing[:3]}"
                               f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for k, t in tensors.items():
        if t.shape != target[k].shape:
            raise AdapterLoadError(f"{k} has shape {list(t.shape)}, expected {list(target[k].shape)}")
        if not t.is_floating_point():
            raise AdapterLoadError(f"{k} has dtype {t.dtype}, expected a floating point tensor")
        if not torch.isfinite(t).all():
            raise AdapterLoadError(f"{k} holds non-finite values (NaN or inf)")
    with torch.no_grad():
        for k, t in tensors.items():
            target[k].copy_(t.to(target[k].dtype))


def from_pretrained(base, model_id, adapter_name="default"):
    """PeftModel.from_pretrained(base, directory): a new PeftModel over a view of `base`."""
    model = PeftModel(base)
    load_adapter_dir(model, model_id, adapter_name)
    model.set_adapter(adapter_name)  # its only phi: active, as in HF peft
    return model


def load_adapter_dir(model, directory, adapter_name):
    d = Path(directory)
    weights, config = d / WEIGHTS_NAME, d / CONFIG_NAME
    for f in (weights, config):
        if not f.is_file():
            raise AdapterLoadError(f"{f} does not exist")
    if weights.stat().st_size > MAX_FILE_BYTES:
        raise AdapterLoadError(f"{weights} is {weights.stat().st_size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")
    return load_adapter(model, adapter_name, weights.read_bytes(), config.read_text())
