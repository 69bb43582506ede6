"""Saving and loading phi: safetensors plus JSON, never pickle.

A phi file is HF peft's layout: `adapter_model.safetensors` (tensor names without the
adapter name) and `adapter_config.json` (HF peft's config fields plus a "peftcore"
record: method, task, base fingerprint, parameter count, version). The same config also
rides in the safetensors header, so one uploaded .safetensors file is self-contained.

Loading checks everything it can before it touches the model and rolls back on failure,
so a refused file leaves the model exactly as it was: the same phi, the same active one,
the same parameters training, the same module tree. A loaded phi is not made active.

Values must be finite and at most MAX_ABS_VALUE in magnitude once cast to the model's dtype:
a finite but absurd value (1e30) would turn the rows it serves into NaN.
"""
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from .merging import COMBINATIONS
from .methods import registry

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
MAX_FILE_BYTES = 16 * 2**20  # a phi is kilobytes; a full fine-tuned toy model about 3 MB
MAX_HEADER_BYTES = 2**20     # a header lists a few hundred tensors at most
MAX_JSON_DEPTH = 16          # a real config nests 3 deep; Python's parser recurses per level
# what a phi tensor may be stored as: plain floats, cast to the model's dtype (float8 and
# the like have no isfinite, and complex or integer weights are not weights)
LOADABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Far above what training makes, low enough that a phi at the bound still serves finite rows.
# Measured |value| at most: 13.5 in a shipped phi (prefix), 13.5 for the presets at their
# budgets, 19.7 for every method at the app's extremes (lr 0.1, 1000 steps; times_3), 1.5 in a full
# fine-tuned copy. At 1e4 a LoRA phi (r=1 already) overflows the next layer norm into NaN; at
# 1e3 every method stays finite, LoRA at r=64, alpha=128 on all six projections included.
MAX_ABS_VALUE = 1e3
TASK_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")


class AdapterLoadError(ValueError):
    """Any reason a phi file cannot be loaded; the message names it."""


def _version():
    from . import __version__
    return __version__


def adapter_config(model, adapter_name):
    cfg = model.peft_config[adapter_name]
    n = sum(p.numel() for _, p in model.named_adapter_parameters(adapter_name)) if not model.full \
        else sum(p.numel() for p in model.base_model.parameters())
    record = {"method": cfg.peft_type, "task": model.adapter_task.get(adapter_name),
              "base_fingerprint": model.base_fingerprint, "num_params": n, "version": _version()}
    if adapter_name in getattr(model, "adapter_merged_from", {}):
        record["merged_from"] = model.adapter_merged_from[adapter_name]
    out = cfg.to_dict()
    training = {f: out.pop(f) for f in cfg.training_fields}
    if training:  # how phi was trained (LoRA+): HF peft's config has no such field, the record keeps it
        record["training"] = training
    out.update(registry.method_of(cfg).hf_fields)  # the fields HF peft's config of the method expects
    if "target_modules" in out:
        out["target_modules"] = sorted(out["target_modules"])
    out["peftcore"] = record
    return out


def adapter_to_bytes(model, adapter_name=None):
    """One self-contained .safetensors file: tensors plus config in the header."""
    adapter_name = adapter_name or model.active_adapter
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict(adapter_name).items()}
    meta = {"adapter_config": json.dumps(adapter_config(model, adapter_name))}
    return st_save(tensors, metadata=meta)


def save_pretrained(model, save_directory, adapter_name=None):
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
def _json(raw, what):
    """json.loads, bounded: its size first, then its nesting (a 100,000-deep array makes the
    parser raise RecursionError; anything deeper than a config needs is refused too)."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise AdapterLoadError(f"{what} is not UTF-8 text") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise AdapterLoadError(f"{what} is {len(raw):,} characters, over the {MAX_HEADER_BYTES:,} limit")
    try:
        value = json.loads(raw)
    except RecursionError:  # raised cleanly by the C parser at the recursion limit
        raise AdapterLoadError(f"{what} nests too deep, over the limit of {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise AdapterLoadError(f"{what} is not valid JSON: {e}") from None
    deepest, todo = 0, [(value, 1)]  # the depth, counted without recursion
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    if deepest > MAX_JSON_DEPTH:
        raise AdapterLoadError(f"{what} nests {deepest} levels deep, over the limit of {MAX_JSON_DEPTH}")
    return value


def _parse_tensors(data: bytes):
    if len(data) > MAX_FILE_BYTES:
        raise AdapterLoadError(f"file is {len(data):,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")
    if len(data) < 8:
        raise AdapterLoadError(f"not a safetensors file: only {len(data)} bytes")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise AdapterLoadError("not a safetensors file (a pickle, a truncated or a random file?): "
                               "its header length points past the end of the file")
    header = _json(data[8:8 + header_len], "the safetensors header")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"not a valid safetensors file: {e}") from None
    meta = header.get("__metadata__") or {} if isinstance(header, dict) else {}
    return tensors, meta


def _parse_config(raw):
    d = _json(raw, "adapter config") if isinstance(raw, (str, bytes, bytearray)) else raw
    if not isinstance(d, dict):
        raise AdapterLoadError("adapter config must be a JSON object")
    record = d.get("peftcore") or {}
    if not isinstance(record, dict):
        raise AdapterLoadError("the config's \"peftcore\" record must be a JSON object")
    _check_record(record)
    method, peft_type = record.get("method"), d.get("peft_type")
    if peft_type is not None and not isinstance(peft_type, str):
        raise AdapterLoadError(f"peft_type must be a string, got {type(peft_type).__name__}")
    if method and peft_type and method != peft_type:
        raise AdapterLoadError(f"the config contradicts itself: peft_type says {peft_type!r}, "
                               f"peftcore.method says {method!r}")
    peft_type = method or peft_type
    if peft_type not in registry.METHODS:
        raise AdapterLoadError(f"unknown method {peft_type!r}; known: {sorted(registry.METHODS)}")
    cls = registry.METHODS[peft_type].config_cls
    training = record.get("training") or {}
    if not isinstance(training, dict) or set(training) - set(cls.training_fields):
        raise AdapterLoadError(f"the config's peftcore.training must be an object of {list(cls.training_fields)}, "
                               f"got {_short(training)}")
    fields = {k: v for k, v in {**d, **training}.items() if k in cls.__dataclass_fields__}
    for k, v in fields.items():  # a tuple field is a JSON list of strings (a bare "qv" iterates too)
        if isinstance(cls.__dataclass_fields__[k].default, tuple) and \
                not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise AdapterLoadError(f"bad {peft_type} config: {k} must be a list of names, got {_short(v)}")
    try:
        cfg = cls.from_dict(fields)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"bad {peft_type} config: {e}") from None
    return cfg, record


def _short(v):
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _check_record(record):
    """The "peftcore" record's fields have the types the app relies on (a task that is a
    number once made every page that shows the phi raise)."""
    rules = {"method": (str, None), "task": (str, TASK_RE), "base_fingerprint": (str, HEX64_RE),
             "num_params": (int, None), "version": (str, None)}
    for k, (kind, pattern) in rules.items():
        v = record.get(k)
        if v is None or v == "":  # absent: a file trained on no named task, an HF peft file
            continue
        if isinstance(v, bool) or not isinstance(v, kind) or (pattern and not pattern.fullmatch(v)) or \
                (kind is str and len(v) > 64):
            want = {"task": "a task name (1-64 letters, digits, '_', '.', '-')", "base_fingerprint": "a sha256 in hex",
                    "num_params": "a whole number"}.get(k, "text of at most 64 characters")
            raise AdapterLoadError(f"the config's peftcore.{k} must be {want}, got {_short(v)}")
    if record.get("merged_from") is not None:
        _check_merged_from(record["merged_from"])


def task_label(task, merged_from=None):
    """What a list shows for a phi's task: its task, else the tasks it was merged from, else "?"."""
    tasks = sorted({t for t in (merged_from or {}).get("tasks", ()) if t})
    return task or (f"merge of {' + '.join(tasks)}"[:64] if tasks else "?")


MAX_MERGED_FROM = 200  # sources a merged phi's file may name (a class holds at most 120 phi)


def _check_merged_from(merged):
    """How a merged phi was made (PeftModel.add_weighted_adapter): its combination_type, and one
    plain name, weight and task (or none) per source."""
    from .peft_model import NAME_RE  # (peft_model imports this module lazily)
    if not isinstance(merged, dict) or set(merged) != {"combination_type", "sources", "weights", "tasks"}:
        raise AdapterLoadError("the config's peftcore.merged_from must hold combination_type, sources, weights "
                               "and tasks")
    sources, weights, tasks = merged["sources"], merged["weights"], merged["tasks"]
    if merged["combination_type"] not in COMBINATIONS:
        raise AdapterLoadError(f"peftcore.merged_from.combination_type must be one of HF peft's, got "
                               f"{_short(merged['combination_type'])}")
    lists = (sources, weights, tasks)
    if not all(isinstance(x, list) for x in lists) or not 1 <= len(sources) <= MAX_MERGED_FROM or \
            len({len(x) for x in lists}) != 1:
        raise AdapterLoadError(f"peftcore.merged_from names 1-{MAX_MERGED_FROM} sources, one weight and one task "
                               "each")
    if not all(isinstance(a, str) and NAME_RE.fullmatch(a) for a in sources) or \
            not all(isinstance(t, str) and TASK_RE.fullmatch(t) for t in tasks if t is not None) or \
            not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise AdapterLoadError("peftcore.merged_from: each source is a plain name (1-64 letters, digits, '_', '-'), "
                               "a finite weight and a task name or null")


def load_adapter(model, adapter_name, data: bytes, config=None):
    """Add phi `adapter_name` to `model` from safetensors bytes (config from `config`
    or from the file's header), not active: as HF peft's load_adapter, set_adapter to use it.
    Raises AdapterLoadError and leaves `model` exactly as it was."""
    try:
        return _load_adapter(model, adapter_name, data, config)
    except AdapterLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a file no check foresaw is still a refused file, never a crash
        raise AdapterLoadError(f"this file could not be loaded ({type(e).__name__})") from None


def _load_adapter(model, adapter_name, data, config):
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
    if not registry.method_of(cfg).shares_base and model.peft_config:
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
    if record.get("task"):  # checked by _check_record: a plain task name
        model.adapter_task[adapter_name] = record["task"]
    if record.get("merged_from") is not None:  # checked by _check_record
        model.adapter_merged_from[adapter_name] = record["merged_from"]
    return model


def _copy_checked(model, adapter_name, tensors):
    target = model.adapter_state_dict(adapter_name)
    missing, extra = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
    if missing or extra:
        raise AdapterLoadError(f"tensor names do not match the config: missing {missing[:3]}"
                               f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    served, bound = {}, max_abs_value(model.peft_config[adapter_name])
    for k, t in tensors.items():
        if t.shape != target[k].shape:
            raise AdapterLoadError(f"{k} has shape {list(t.shape)}, expected {list(target[k].shape)}")
        if t.dtype not in LOADABLE_DTYPES:
            raise AdapterLoadError(f"{k} has dtype {str(t.dtype).replace('torch.', '')}, expected one of "
                                   f"{', '.join(str(d).replace('torch.', '') for d in LOADABLE_DTYPES)}")
        served[k] = t.to(target[k].dtype)
        # checked after the cast: float64 1e300 becomes inf in float32
        if not torch.isfinite(served[k]).all():
            raise AdapterLoadError(f"{k} holds non-finite values (NaN or inf) as {target[k].dtype}")
        _check_magnitude(k, served[k], bound)
    fixed = model.fixed_state_dict(adapter_name)  # frozen values the config fixes: checked, never written
    for k in fixed:
        if not (torch.equal(served[k], target[k]) or torch.equal(tensors[k], target[k].to(tensors[k].dtype))):
            raise AdapterLoadError(f"{k} is not the frozen tensor this config makes (drawn from another seed, or "
                                   f"edited): the phi would serve other outputs than it was trained with")
    with torch.no_grad():
        for k, t in served.items():
            if k not in fixed:
                target[k].copy_(t)


def max_abs_value(config):
    """The bound on a file's values for the method of `config`: MAX_ABS_VALUE, or lower where
    the method multiplies phi by phi (LoHa's four factors make 1e3 an update of 1e12)."""
    return registry.method_of(config).max_abs_value or MAX_ABS_VALUE


def _check_magnitude(name, t, bound):
    """Refuse a value no training here could make: finite, yet it would turn served rows into NaN."""
    if t.numel() and float(t.abs().max()) > bound:
        value = float(t.flatten()[t.abs().argmax()])
        raise AdapterLoadError(f"a value of {_over_bound(value, bound)} in tensor {name} is over the bound of "
                               f"{bound:g} in magnitude: no training here makes numbers that large")


def _over_bound(value, bound):
    """`value` in the fewest digits that still read as over the bound (1000.00006, not 1000)."""
    for digits in (3, 5, 9):
        text = f"{value:.{digits}g}"
        if abs(float(text)) > bound:
            return text
    return repr(value)


def load_adapter_dir(model, directory, adapter_name):
    d = Path(directory)
    weights, config = d / WEIGHTS_NAME, d / CONFIG_NAME
    for f in (weights, config):
        if not f.is_file():
            raise AdapterLoadError(f"{f} does not exist")
    if weights.stat().st_size > MAX_FILE_BYTES:
        raise AdapterLoadError(f"{weights} is {weights.stat().st_size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")
    return load_adapter(model, adapter_name, weights.read_bytes(), config.read_text())
