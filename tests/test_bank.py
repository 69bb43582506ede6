"""One base, many tasks: files, the bank, mixed-task batches, merging."""
import copy
import json
import pickle

import pytest
import torch

import peftcore
from peftcore import (BASE_ROW, AdapterConfig, AdapterLoadError, LoraConfig, PeftModel,
                      PromptTuningConfig, fingerprint, get_peft_model)
from peftcore.serialization import CONFIG_NAME, MAX_FILE_BYTES, WEIGHTS_NAME
from safetensors.torch import save as st_save

CONFIGS = {"lora": LoraConfig(r=2, target_modules=("q", "v", "up")), "lora8": LoraConfig(r=8, lora_alpha=8, target_modules=("k", "down")),
           "adapter": AdapterConfig(bottleneck_size=8), "adapter3": AdapterConfig(bottleneck_size=3),
           "prompt": PromptTuningConfig(num_virtual_tokens=4), "prompt7": PromptTuningConfig(num_virtual_tokens=7)}


def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def build_bank(base, dtype=torch.float32):
    """A bank over `base` (a float64 copy of it when asked) holding every config in CONFIGS."""
    model = PeftModel(base if dtype == torch.float32 else copy.deepcopy(base).to(dtype))
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model.add_adapter(name, cfg, seed=i)
        randomize(model, name, i)
    return model.eval()


# float64 shows the algebra is exact to 1e-5; in float32 different kernels (masked vs causal
# attention, merged vs split matmuls) round differently: up to ~1e-4 on logits of size ~14.
DTYPES = [(torch.float64, 1e-5), (torch.float32, 5e-4)]


@pytest.fixture(scope="module")
def bank(base):
    return build_bank(base)


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip(bank, base, batch, tmp_path, name):
    bank.set_adapter(name)
    bank.adapter_task[name] = "add_5"
    bank.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    rec = cfg["peftcore"]
    assert rec["base_fingerprint"] == fingerprint(base) and rec["task"] == "add_5"
    assert rec["num_params"] == CONFIGS[name].num_params(base.config) and rec["method"] == CONFIGS[name].peft_type
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(loaded(batch[0]), bank(batch[0]))
    assert loaded.adapter_task["default"] == "add_5"


def test_single_file_carries_its_config(bank, base, batch):
    bank.set_adapter("adapter")
    data = peftcore.adapter_to_bytes(bank, "adapter")
    model = PeftModel(base)
    peftcore.load_adapter(model, "up", data)
    assert torch.equal(model(batch[0]), bank(batch[0]))


def _good_file(bank, name="lora"):
    return peftcore.adapter_to_bytes(bank, name)


def _rewrite(data, edit_tensors=None, edit_config=None):
    """Re-save a phi file with its tensors and/or config edited."""
    from safetensors.torch import load
    tensors = load(data)
    header_len = int.from_bytes(data[:8], "little")
    cfg = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["adapter_config"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(cfg)
    return st_save(tensors, metadata={"adapter_config": json.dumps(cfg)})


def _first(t):
    return sorted(t)[0]


BAD_FILES = {
    "other base": (lambda d: _rewrite(d, edit_config=lambda c: c["peftcore"].update(base_fingerprint="ab" * 32)), "another base"),
    "wrong shape": (lambda d: _rewrite(d, lambda t: t.update({_first(t): torch.zeros(3, 3)})), "shape"),
    "missing tensor": (lambda d: _rewrite(d, lambda t: t.pop(_first(t))), "missing"),
    "extra tensor": (lambda d: _rewrite(d, lambda t: t.update(extra=torch.zeros(2))), "unexpected"),
    "NaN": (lambda d: _rewrite(d, lambda t: t[_first(t)].fill_(float("nan"))), "non-finite"),
    "inf": (lambda d: _rewrite(d, lambda t: t[_first(t)].fill_(float("inf"))), "non-finite"),
    "pickle": (lambda d: pickle.dumps({"w": torch.zeros(2)}), "safetensors"),
    "truncated": (lambda d: d[: len(d) // 2], "safetensors"),
    "random bytes": (lambda d: bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).tolist()), "safetensors"),
    "empty": (lambda d: b"", "safetensors"),
    "bad config json": (lambda d: st_save({"x": torch.zeros(1)}, metadata={"adapter_config": "{not json"}), "JSON"),
    "unknown method": (lambda d: _rewrite(d, edit_config=lambda c: (c.update(peft_type="IA3"), c["peftcore"].update(method="IA3"))), "unknown method"),
    "bad field": (lambda d: _rewrite(d, edit_config=lambda c: c.update(r=-3)), "r must be"),
    "no config": (lambda d: st_save({"x": torch.zeros(1)}), "no adapter config"),
    "too big": (lambda d: d + b"\0" * (MAX_FILE_BYTES + 1), "limit"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_refused_and_change_nothing(bank, base, base_fp, batch, case):
    make, message = BAD_FILES[case]
    data = make(_good_file(bank))
    names_before = dict(bank.peft_config)
    outputs_before = {n: (bank.set_adapter(n), bank(batch[0]))[1] for n in names_before}
    params_before = sum(1 for _ in bank.parameters())
    with pytest.raises(AdapterLoadError, match=message):
        peftcore.load_adapter(bank, "newcomer", data)
    assert bank.peft_config == names_before and sum(1 for _ in bank.parameters()) == params_before
    for n, out in outputs_before.items():
        bank.set_adapter(n)
        assert torch.equal(bank(batch[0]), out)
    assert fingerprint(base) == base_fp


def test_missing_directory_files(base, tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        PeftModel.from_pretrained(base, tmp_path)


def test_never_unpickles(bank, tmp_path, monkeypatch):
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    bank.set_adapter("prompt")
    bank.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(AdapterLoadError):
        PeftModel.from_pretrained(bank._base[0], tmp_path)


def test_measured_bytes(bank, tmp_path):
    bank.set_adapter("lora")
    bank.save_pretrained(tmp_path)
    n = CONFIGS["lora"].num_params(bank.base_model.config)
    size = peftcore.saved_bytes(tmp_path)
    assert 4 * n < size < 4 * n + 4096  # float32 tensors plus a small header
    assert peftcore.base_file_bytes() > 4 * 796_000


# ------------------------------------------------------------------ the bank
def test_set_adapter_is_o1_and_copies_nothing(bank, batch):
    ptrs = {id(p): p.data_ptr() for p in bank.parameters()}
    bank.set_adapter("lora")
    a = bank(batch[0])
    bank.set_adapter("adapter")
    b = bank(batch[0])
    assert not torch.equal(a, b)
    assert {id(p): p.data_ptr() for p in bank.parameters()} == ptrs
    assert bank.active_adapter == "adapter"


def test_disable_adapter_runs_the_base(bank, base, batch):
    bank.set_adapter("lora8")
    with bank.disable_adapter():
        assert torch.equal(bank(batch[0]), base(batch[0]))
    assert bank.active_adapter == "lora8" and not torch.equal(bank(batch[0]), base(batch[0]))


def test_add_then_delete_restores(base, batch):
    model = get_peft_model(base, LoraConfig())
    randomize(model, "default", 0)
    before = model(batch[0])
    model.add_adapter("extra", AdapterConfig())
    model.delete_adapter("extra")
    model.set_adapter("default")
    assert torch.equal(model(batch[0]), before)
    assert set(model.peft_config) == {"default"}
    with pytest.raises(KeyError, match="extra"):
        model.set_adapter("extra")


def test_memory_counts_the_base_once(bank, base):
    mem = bank.memory_bytes()
    assert mem["base"] == sum(p.numel() * 4 for p in base.parameters())
    for name, cfg in CONFIGS.items():
        assert mem["phi"][name] == 4 * cfg.num_params(base.config)


# ------------------------------------------------------------------ mixed batches
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_mixed_batch_rows_equal_single_runs(base, dtype, atol):
    bank = build_bank(base, dtype)
    base = bank._base[0]
    names = [BASE_ROW, *CONFIGS] * 3
    x = torch.cat([peftcore.TASKS[t].batch(len(names) // 4 + 1, torch.Generator().manual_seed(i))[0]
                   for i, t in enumerate(["add_5", "sort", "complement", "reverse_add_1"])])[: len(names)]
    mixed = bank(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == BASE_ROW:
            alone = base(x[i:i + 1])
        else:
            bank.set_adapter(name)
            alone = bank(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=atol, rtol=0)


def test_mixed_batch_sees_training(base, batch):
    model = get_peft_model(base, LoraConfig())
    first = model(batch[0][:2], adapter_names=["default", "default"])
    peftcore.run(model, "add_5", steps=3, device="cpu")
    model.eval()
    torch.testing.assert_close(model(batch[0][:2], adapter_names=["default"] * 2), model(batch[0][:2]), atol=1e-5, rtol=0)
    assert not torch.allclose(first, model(batch[0][:2]))


def test_mixed_batch_errors(bank, batch):
    with pytest.raises(KeyError, match="nope"):
        bank(batch[0][:2], adapter_names=["lora", "nope"])
    with pytest.raises(ValueError, match="3 names for a batch of 2"):
        bank(batch[0][:2], adapter_names=["lora"] * 3)


# ------------------------------------------------------------------ merging
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_merge_and_unload(base, base_fp, batch, dtype, atol):
    bank = build_bank(base, dtype)
    base = bank._base[0]
    base_fp = fingerprint(base)
    bank.set_adapter("lora")
    want = bank(batch[0])
    plain = bank.merge_and_unload()
    assert type(plain) is type(base)
    assert not any(isinstance(m, peftcore.lora.LoraLinear) for m in plain.modules())
    torch.testing.assert_close(plain(batch[0]), want, atol=atol, rtol=0)
    assert fingerprint(base) == base_fp
    torch.testing.assert_close(bank(batch[0]), want, atol=0, rtol=0)  # the bank itself is unchanged


@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_merge_and_unmerge(base, base_fp, batch, dtype, atol):
    bank = build_bank(base, dtype)
    bank.set_adapter("lora8")
    want = bank(batch[0])
    bank.merge_adapter()
    torch.testing.assert_close(bank(batch[0]), want, atol=atol, rtol=0)
    bank.unmerge_adapter()
    assert torch.equal(bank(batch[0]), want)
    assert fingerprint(base) == base_fp  # the shared float32 base
    bank.set_adapter("adapter")
    with pytest.raises(ValueError, match="LoRA"):
        bank.merge_adapter()


# ------------------------------------------------------------------ the shipped library
def test_library_loads_and_still_scores_what_it_recorded(base):
    from peftcore.library import LIBRARY_DIR, load_library
    bank, errors = load_library(base)
    recorded = json.loads((LIBRARY_DIR / "index.json").read_text())
    assert not errors and set(bank.peft_config) == set(recorded)
    assert {r["task"] for r in recorded.values()} == set(peftcore.TASKS)
    for name, r in recorded.items():
        bank.set_adapter(name)
        assert bank.adapter_task[name] == r["task"]
        assert peftcore.evaluate(bank, r["task"])[0] == pytest.approx(r["eval_exact"], abs=0.01), name
