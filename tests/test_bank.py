"""One base, many tasks: files, the bank, mixed-task batches, merging."""
import copy
import io
import json
import pickle
import sys

import pytest
import torch

import peftcore
from peftcore import analysis
from peftcore import (BASE_ROW, AdapterConfig, AdapterLoadError, LoraConfig, PeftModel,
                      PromptTuningConfig, fingerprint, get_peft_model)
from peftcore.methods.config import StackCache
from peftcore.serialization import CONFIG_NAME, MAX_FILE_BYTES, WEIGHTS_NAME
from safetensors.torch import save as st_save
from phi import randomize

CONFIGS = {"lora": LoraConfig(r=2, target_modules=("q", "v", "up")), "lora8": LoraConfig(r=8, lora_alpha=8, target_modules=("k", "down")),
           "adapter": AdapterConfig(bottleneck_size=8), "adapter3": AdapterConfig(bottleneck_size=3, target_sublayers=("mlp",)),
           "prompt": PromptTuningConfig(num_virtual_tokens=4), "prompt7": PromptTuningConfig(num_virtual_tokens=7)}


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


@pytest.fixture
def bank(base):
    """A fresh bank per test (13 ms): the tests set its active phi and its tasks."""
    return build_bank(base)


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip(bank, base, batch, tmp_path, name):
    bank.set_adapter(name)
    bank.adapter_task[name] = "times_3"
    bank.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    rec = cfg["peftcore"]
    assert rec["base_fingerprint"] == fingerprint(base) and rec["task"] == "times_3"
    assert rec["num_params"] == CONFIGS[name].num_params(base.config) and rec["method"] == CONFIGS[name].peft_type
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert loaded.active_adapter == "default"  # its only phi
    assert torch.equal(loaded(batch[0]), bank(batch[0]))
    assert loaded.adapter_task["default"] == "times_3"


def test_single_file_carries_its_config(bank, base, batch):
    bank.set_adapter("adapter")
    data = peftcore.adapter_to_bytes(bank, "adapter")
    model = PeftModel(base)
    peftcore.load_adapter(model, "up", data)
    model.set_adapter("up")
    assert torch.equal(model(batch[0]), bank(batch[0]))


def state(model):
    """What a load must not change: the phi held, the active one, what trains, the module tree."""
    return dict(phi=list(model.peft_config), active=model.active_adapter,
                trains=[n for n, p in model.named_parameters() if p.requires_grad],
                names=[n for n, _ in model.named_parameters()], modules=[type(m) for m in model.modules()])


def test_a_loaded_phi_is_available_not_active(bank, base, batch):
    """As HF peft's load_adapter: the new phi joins the model; what runs and trains stays."""
    model = get_peft_model(base, LoraConfig())
    trains, out = model.trainable_parameters(), model(batch[0])
    peftcore.load_adapter(model, "new", peftcore.adapter_to_bytes(bank, "adapter"))
    assert list(model.peft_config) == ["default", "new"] and model.active_adapter == "default"
    now = model.trainable_parameters()  # the same Parameter objects, no more
    assert len(now) == len(trains) and all(a is b for a, b in zip(now, trains))
    assert torch.equal(model(batch[0]), out)
    model.set_adapter("new")
    bank.set_adapter("adapter")
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
    "unknown method": (lambda d: _rewrite(d, edit_config=lambda c: (c.update(peft_type="NOT_A_METHOD"), c["peftcore"].update(method="NOT_A_METHOD"))), "unknown method"),
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
    before = state(bank)
    with pytest.raises(AdapterLoadError, match=message):
        peftcore.load_adapter(bank, "newcomer", data)
    assert bank.peft_config == names_before and state(bank) == before
    for n, out in outputs_before.items():
        bank.set_adapter(n)
        assert torch.equal(bank(batch[0]), out)
    assert fingerprint(base) == base_fp


# a file refused after its phi was plugged in (tensors that do not match its own config), into
# a model holding another method: the wrapper layers made for the file must go again
REFUSED_LATE = ["wrong shape", "missing tensor", "extra tensor", "NaN"]


@pytest.mark.parametrize("host, file", [("adapter", "lora"), ("lora", "adapter"), ("lora", "prompt")])
@pytest.mark.parametrize("case", REFUSED_LATE)
def test_a_refused_file_leaves_the_model_exactly_as_it_was(bank, base, batch, host, file, case):
    model = get_peft_model(base, CONFIGS[host])
    before, out = state(model), model(batch[0])
    make, message = BAD_FILES[case]
    with pytest.raises(AdapterLoadError, match=message):
        peftcore.load_adapter(model, "newcomer", make(_good_file(bank, file)))
    assert state(model) == before and torch.equal(model(batch[0]), out)


@pytest.mark.parametrize("file, says", [("prompt", {"peft_type": "LORA"}), ("lora", {"method": "PROMPT_TUNING"})])
def test_a_config_that_contradicts_itself_is_refused(bank, base, file, says):
    """peft_type and peftcore.method name different methods: refused, naming both."""
    def edit(c):
        c.update({k: v for k, v in says.items() if k == "peft_type"})
        c["peftcore"].update({k: v for k, v in says.items() if k == "method"})
    data = _rewrite(_good_file(bank, file), edit_config=edit)
    model = PeftModel(base)
    with pytest.raises(AdapterLoadError, match="peft_type says '(LORA|PROMPT_TUNING)', peftcore.method says "
                                               "'(PROMPT_TUNING|LORA)'"):
        peftcore.load_adapter(model, "x", data)
    assert not model.peft_config


def test_missing_directory_files(base, tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        PeftModel.from_pretrained(base, tmp_path)


def test_never_unpickles(bank, base, tmp_path, monkeypatch):
    """Real pickle payloads of phi's tensors (torch.save, zip and legacy format, and a plain
    pickle) as the weights file and as uploaded bytes: refused, and no unpickler ran: neither
    Python's (every one raises the audit event pickle.find_class) nor torch's weights-only one."""
    ran, watching = [], [True]
    sys.addaudithook(lambda event, args: ran.append(event) if watching[0] and event == "pickle.find_class" else None)
    restricted = torch._weights_only_unpickler.Unpickler
    monkeypatch.setattr(restricted, "load", lambda self, load=restricted.load: ran.append("weights-only") or load(self))
    bank.set_adapter("prompt")
    bank.save_pretrained(tmp_path)
    phi = bank.adapter_state_dict("prompt")
    payloads = [pickle.dumps(phi)]
    for zipped in (True, False):
        buf = io.BytesIO()
        torch.save(phi, buf, _use_new_zipfile_serialization=zipped)
        payloads.append(buf.getvalue())
    try:
        for payload in payloads:
            (tmp_path / WEIGHTS_NAME).write_bytes(payload)
            with pytest.raises(AdapterLoadError, match="safetensors"):
                PeftModel.from_pretrained(base, tmp_path)
            with pytest.raises(AdapterLoadError, match="safetensors"):
                peftcore.load_adapter(PeftModel(base), "upload", payload)
        assert ran == []
        for weights_only in (False, True):  # the watchers do see it when torch.load reads a payload
            loaded = torch.load(io.BytesIO(payloads[1]), weights_only=weights_only)
            assert all(torch.equal(loaded[k], t) for k, t in phi.items())
        assert "pickle.find_class" in ran and "weights-only" in ran
    finally:
        watching[0] = False


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


def storage_bytes(tensors):
    """Bytes of the distinct storages behind `tensors`: memory really held, aliases counted once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_memory_counts_the_base_once(bank, base):
    """The bank's figures against the storage it really holds: the base once (the view
    aliases it), every phi once beside it."""
    mem = bank.memory_bytes()
    assert mem["base"] == storage_bytes(base.parameters()) == 798_720 * 4
    assert mem["base"] + sum(mem["phi"].values()) == storage_bytes([*bank.parameters(), *base.parameters()])
    for name, cfg in CONFIGS.items():
        assert mem["phi"][name] == 4 * cfg.num_params(base.config)


# ------------------------------------------------------------------ mixed batches
@pytest.mark.parametrize("dtype, atol", DTYPES)
def test_mixed_batch_rows_equal_single_runs(base, dtype, atol):
    bank = build_bank(base, dtype)
    base = bank._base[0]
    names = [BASE_ROW, *CONFIGS] * 3
    x = torch.cat([peftcore.TASKS[t].batch(len(names) // 4 + 1, torch.Generator().manual_seed(i))[0]
                   for i, t in enumerate(["times_3", "sort", "complement", "reverse_add_1"])])[: len(names)]
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
    peftcore.run(model, "times_3", steps=3, device="cpu")
    model.eval()
    torch.testing.assert_close(model(batch[0][:2], adapter_names=["default"] * 2), model(batch[0][:2]), atol=1e-5, rtol=0)
    assert not torch.allclose(first, model(batch[0][:2]))


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt"])
def test_a_reloaded_name_never_serves_stale_phi(base, batch, method):
    """Delete a phi, load other weights under its name, again and again: the new tensors
    often land at the freed address, which fooled a cache keyed on data_ptr()."""
    bank = build_bank(base)
    files = []
    for seed in (10, 11):  # two phi of the same config, different weights
        donor = PeftModel(base)
        donor.add_adapter(method, CONFIGS[method], seed=seed)
        randomize(donor, method, seed)
        files.append(peftcore.adapter_to_bytes(donor, method))
    x = batch[0][:4]
    names = [method, "lora8", BASE_ROW, method]
    for i in range(20):
        bank(x, adapter_names=names)  # the stacks are cached here...
        bank.delete_adapter(method)
        peftcore.load_adapter(bank, method, files[i % 2])
        mixed = bank(x, adapter_names=names)  # ...and must not be reused here
        bank.set_adapter(method)
        torch.testing.assert_close(mixed[[0, 3]], bank(x[[0, 3]]), atol=5e-4, rtol=0, msg=f"reload {i}")


def test_stack_cache_is_not_fooled_by_a_reused_address():
    """A new tensor at a freed one's address with the same _version is what a data_ptr() key
    cannot tell apart (the test above needs the allocator's luck: on a 2-core CPU it hits for
    LoRA and prompts, not for adapters). Made exact here: a second tensor over the same storage."""
    old = torch.zeros(4)
    new = torch.empty(0).set_(old.untyped_storage(), 0, old.shape)
    with torch.no_grad():
        old.add_(0)  # the same _version for both
    assert new.data_ptr() == old.data_ptr() and new._version == old._version and new is not old
    cache, builds = StackCache(), []
    for generation, tensors, label in [(0, [old], "old"), (0, [new], "new"), (0, [new], "again"),
                                       (1, [new], "next generation")]:
        cache.get(generation, tensors, lambda: builds.append(label))
    with torch.no_grad():
        new.add_(1)  # written in place
    cache.get(1, [new], lambda: builds.append("written"))
    assert builds == ["old", "new", "next generation", "written"]


def test_generation_grows_on_every_change(bank, base, batch):
    """The app keys its caches on model.generation: it must move on every change of phi."""
    model = PeftModel(base)
    changes = {
        "add": lambda: model.add_adapter("a", LoraConfig()),
        "load": lambda: peftcore.load_adapter(model, "b", _good_file(bank, "adapter")),
        "enter training mode": model.train,
        "leave training mode": model.eval,
        "merge": model.merge_adapter,
        "unmerge": model.unmerge_adapter,
        "train": lambda: peftcore.run(model, "times_3", steps=2, device="cpu"),
        "move": lambda: model.to(torch.float64),
        "delete": lambda: model.delete_adapter("b"),
    }
    for what, change in changes.items():
        before = model.generation
        change()
        assert isinstance(model.generation, int) and model.generation > before, what
    before = model.generation
    model(batch[0], adapter_names=["a"] * len(batch[0]))
    analysis.generate(model, batch[0][:, :10])
    model.set_adapter("a")
    model.eval()
    assert model.generation == before  # serving and switching change no phi
    assert not PeftModel(base).training  # a bank that only serves is never in training mode


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
    assert not any(isinstance(m, peftcore.methods.lora.LoraLinear) for m in plain.modules())
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
    with pytest.raises(ValueError, match="merges"):
        bank.merge_adapter()


def merged_bank(base, batch):
    """A bank with LoRA lora8 merged, and each phi's output before the merge."""
    bank = build_bank(base)
    outs = {n: (bank.set_adapter(n), bank(batch[0]))[1] for n in CONFIGS}
    bank.set_adapter("lora8")
    bank.merge_adapter()
    return bank, outs


def test_disable_adapter_while_merged_runs_the_bare_base(base, batch):
    bank, outs = merged_bank(base, batch)
    with bank.disable_adapter():
        assert torch.equal(bank(batch[0]), base(batch[0]))
    assert bank.merged_adapter == "lora8"  # the merge still serves lora8 after the block
    torch.testing.assert_close(bank(batch[0]), outs["lora8"], atol=5e-4, rtol=0)


def test_set_adapter_while_merged_unmerges(base, batch):
    """As HF peft: a warning, then the merge is undone and the other phi runs."""
    bank, outs = merged_bank(base, batch)
    with pytest.warns(UserWarning, match="Unmerging"):
        bank.set_adapter("adapter")
    assert bank.merged_adapter is None
    assert torch.equal(bank(batch[0]), outs["adapter"])
    bank.set_adapter("lora8")
    assert torch.equal(bank(batch[0]), outs["lora8"])


def test_mixed_batch_while_merged_is_refused(base, batch):
    bank, _ = merged_bank(base, batch)
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        bank(batch[0][:2], adapter_names=["lora8", BASE_ROW])
    bank.unmerge_adapter()
    bank(batch[0][:2], adapter_names=["lora8", BASE_ROW])


def test_deleting_the_merged_lora_unmerges(base, batch):
    bank, outs = merged_bank(base, batch)
    bank.delete_adapter("lora8")
    assert bank.merged_adapter is None
    bank.set_adapter("lora")
    assert torch.equal(bank(batch[0]), outs["lora"])


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


@pytest.mark.parametrize("name", ["lora", "adapter", "prompt"])
def test_a_batch_whose_rows_all_name_one_phi_is_that_phi_s_own_forward(bank, batch, name):
    """Every row through one phi (a merged phi scored on its held-out sets) takes that phi's own
    forward: the same logits as a batch of mixed rows gives them, the active adapter untouched."""
    x = batch[0][:6]
    bank.set_adapter("lora8")
    one = bank(x, adapter_names=[name] * len(x))
    assert bank.active_adapter == "lora8"
    mixed = bank(x, adapter_names=[name] * (len(x) - 1) + [BASE_ROW])  # the row-by-row path
    torch.testing.assert_close(one[:-1], mixed[:-1], atol=5e-4, rtol=1e-5)
    bank.set_adapter(name)
    torch.testing.assert_close(one, bank(x), atol=0, rtol=0)
