"""IA3: the properties every method keeps (no-op at init, only phi trains, mixed-batch rows,
merging, files, cohorts), parity with HF peft's IA3 both ways, and that its preset learns."""
import copy
import json

import pytest
import torch

import peftcore
import peftcore.methods.ia3  # registers IA3
from mixed import assert_rows_equal_alone
from peftcore import (BASE_ROW, AdapterConfig, LoraConfig, PeftModel, PromptTuningConfig, analysis,
                      fingerprint, get_peft_model)
from peftcore.cohort import Cohort, carrier, cohort_key
from peftcore.methods.ia3 import CohortIA3, IA3Config, IA3Linear
from peftcore.train import Trainer, train
from phi import randomize

TOL = 1e-5
DRIFT = 2e-2  # a whole cohort run against the run alone (tests/test_cohort.py says why)
WIDE = IA3Config(target_modules=("q", "k", "v", "o", "up", "down"), feedforward_modules=("up", "down"))
CONFIGS = [IA3Config(), WIDE, IA3Config(target_modules=("v", "up"), feedforward_modules=())]


def same_config(a, b):
    """Equal as sets of names: files keep target_modules sorted, HF peft in any order (a set)."""
    names = lambda c: (set(c.target_modules), set(c.feedforward_modules))
    return type(a) is type(b) and names(a) == names(b)


# ------------------------------------------------------------------ the config and the count
def test_validate_names_the_field():
    for bad, field in [(IA3Config(target_modules=()), "target_modules"), (IA3Config(target_modules=("x",)), "target_modules"),
                       (IA3Config(target_modules=("k", "v"), feedforward_modules=("down",)), "feedforward_modules")]:
        with pytest.raises(ValueError, match=field):
            bad.validate()


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_param_count_is_the_closed_form(base, config):
    assert get_peft_model(base, config).adapter_num_params("default") == config.num_params(base.config)


def test_the_paper_layout_is_the_smallest_phi(base):
    """k, v and the MLP's hidden units: 4 * (128 + 128 + 512) = 3,072, about 0.4% of the base."""
    assert IA3Config().num_params(base.config) == 3072
    assert 0.3 < 100 * 3072 / sum(p.numel() for p in base.parameters()) < 0.5


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_no_op_at_init(base, batch, config):
    assert torch.equal(get_peft_model(base, config)(batch[0]), base(batch[0]))


def test_training_changes_only_ia3(base, base_fp):
    model = get_peft_model(base, WIDE, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".ia3_l." in n for n in trainable)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    peftcore.run(model, "times_3", steps=5, device="cpu", lr=1e-2)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(not torch.equal(b, a) for b, a in zip(before, model.trainable_parameters()))
    assert fingerprint(base) == base_fp


# ------------------------------------------------------------------ a bank
def build_bank(base, dtype=torch.float64):
    """IA3 beside every other kind of phi, LoRA first on an overlapping projection (v): there
    IA3 wraps the LoRA wrapper."""
    model = PeftModel(copy.deepcopy(base).to(dtype) if dtype != torch.float32 else base)
    configs = {"lora": LoraConfig(r=2, target_modules=("q", "v")), "adapter": AdapterConfig(4),
               "prompt": PromptTuningConfig(3), "ia3": IA3Config(), "ia3_wide": WIDE, "ia3_out": CONFIGS[2]}
    for i, (name, cfg) in enumerate(configs.items()):
        model.add_adapter(name, cfg, seed=i)
        randomize(model, name, i, scale=0.3)
    return model.eval()


@pytest.mark.parametrize("dtype, names", [
    (torch.float64, ["ia3", BASE_ROW, "lora", "ia3_wide", "adapter", "prompt", "ia3_out", "ia3"]),
    # without a prompt in the batch attention stays causal, so float32 holds 1e-5 too
    (torch.float32, ["ia3", BASE_ROW, "ia3_wide", "lora", "ia3_out", "adapter", "ia3_wide"])], ids=["float64", "float32"])
def test_mixed_batch_rows_equal_single_runs(base, dtype, names):
    bank = build_bank(base, dtype)
    x = peftcore.TASKS["times_3"].batch(len(names), torch.Generator().manual_seed(3))[0]
    assert_rows_equal_alone(bank, x, names, atol=TOL)


# float64: W' x against (W x) * l is exact algebra to 1e-13; float32 rounds 2e-4 apart on logits
# of size ~14 (as a merged LoRA does, tests/test_bank.py)
@pytest.mark.parametrize("name", ["ia3", "ia3_wide", "ia3_out"])
def test_merge_unmerge_and_unload(base, base_fp, batch, name):
    bank = build_bank(base)
    bank.set_adapter(name)
    want = bank(batch[0])
    bank.merge_adapter()
    torch.testing.assert_close(bank(batch[0]), want, atol=TOL, rtol=0)
    assert bank.merged_adapter == name
    bank.unmerge_adapter()
    assert torch.equal(bank(batch[0]), want)
    plain = bank.merge_and_unload()
    assert type(plain) is type(base) and not any(hasattr(m, "ia3_l") or hasattr(m, "lora_A") for m in plain.modules())
    torch.testing.assert_close(plain(batch[0]), want, atol=TOL, rtol=0)
    assert analysis.merged_vs_unmerged(bank, name, batch[0][:4], repeats=1)["max_abs_diff"] < TOL
    assert fingerprint(base) == base_fp


def test_lora_under_ia3_still_merges_and_unloads(base, batch):
    bank = build_bank(base)
    bank.set_adapter("lora")
    want = bank(batch[0])
    torch.testing.assert_close(bank.merge_and_unload()(batch[0]), want, atol=TOL, rtol=0)
    bank.delete_adapter("ia3"), bank.delete_adapter("ia3_wide"), bank.delete_adapter("ia3_out")
    assert not any(isinstance(m, IA3Linear) for m in bank.modules())  # unwrapped back to the LoRA
    assert torch.equal(bank(batch[0]), want)


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_round_trip(base, batch, tmp_path, config):
    model = get_peft_model(base, config)
    randomize(model, scale=0.3)
    model.adapter_task["default"] = "times_3"
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["peftcore"]["num_params"] == config.num_params(base.config)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert same_config(loaded.peft_config["default"], config) and loaded.adapter_task["default"] == "times_3"
    assert torch.equal(loaded(batch[0]), model(batch[0]))
    again = PeftModel(base)
    peftcore.load_adapter(again, "up", peftcore.adapter_to_bytes(model))
    again.set_adapter("up")
    assert torch.equal(again(batch[0]), model(batch[0]))


# ------------------------------------------------------------------ HF peft
peft = pytest.importorskip("peft")


def hf_ia3(base, config):
    return peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=list(config.target_modules), feedforward_modules=list(config.feedforward_modules)))


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_same_vectors_same_outputs_as_hf_peft(base, batch, config):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.3)
    theirs = hf_ia3(base, config)
    hf_state = theirs.state_dict()
    with torch.no_grad():
        for key, t in ours.adapter_state_dict().items():  # our saved names and shapes are HF's
            assert hf_state[key + ".default"].shape == t.shape
            hf_state[key + ".default"].copy_(t)
    torch.testing.assert_close(ours(batch[0]), theirs.eval()(batch[0]), atol=TOL, rtol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("config", CONFIGS[:2], ids=repr)
def test_hf_peft_loads_our_ia3_file(base, batch, tmp_path, config):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.3)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert isinstance(theirs.peft_config["default"], peft.IA3Config)
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=TOL, rtol=0)


@pytest.mark.parametrize("config", CONFIGS[:2], ids=repr)
def test_we_load_hf_peft_ia3_file(base, batch, tmp_path, config):
    theirs = hf_ia3(base, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:
                p.normal_(1, 0.3)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base, tmp_path)
    assert same_config(ours.peft_config["default"], config)
    torch.testing.assert_close(ours(batch[0]), theirs.eval()(batch[0]), atol=TOL, rtol=0)


# ------------------------------------------------------------------ cohorts
RUNS = [(IA3Config(), "times_3", 1, 3e-2), (IA3Config(target_modules=("down", "v", "k")), "complement", 2, 1e-1),
        (IA3Config(), "times_3", 3, 1e-2)]


def _phi(model):
    return [p.detach().clone() for _, p in model.named_adapter_parameters()]


def _compare(base, steps, tol):
    alone = []
    for cfg, task, seed, lr in RUNS:
        model = get_peft_model(base, cfg, seed=seed)
        for _ in train(model, task, steps, lr=lr, seed=seed, batch_size=16, eval_every=4, eval_size=64):
            pass
        alone.append(_phi(model))
    models = [get_peft_model(base, cfg, seed=seed) for cfg, _, seed, _ in RUNS]
    assert sum(isinstance(m, CohortIA3) for m in carrier(models).modules()) == 3 * base.config.n_layer
    cohort = Cohort([Trainer(m, task, steps, lr=lr, seed=seed, batch_size=16, eval_every=4, eval_size=64)
                     for m, (_, task, seed, lr) in zip(models, RUNS)])
    while cohort.trainers:
        cohort.step()
    for model, want in zip(models, alone):
        for x, y in zip(_phi(model), want):
            assert torch.allclose(x, y, rtol=0, atol=tol), (x - y).abs().max()


def test_ia3_runs_ride_together(base):
    key = lambda cfg: cohort_key(get_peft_model(base, cfg, seed=0))
    assert key(IA3Config()) == key(IA3Config(target_modules=("down", "k", "v"))) is not None
    assert key(IA3Config()) != key(IA3Config(feedforward_modules=())) != key(LoraConfig())


def test_one_step_in_a_cohort_is_the_step_alone(base):
    _compare(base, 1, TOL)


def test_a_run_in_a_cohort_trains_as_it_would_alone(base):
    _compare(base, 12, DRIFT)


# the lesson (the preset, seed 0, solves times_3) is test_learning.py's test_preset_solves[IA3 times_3],
# the same run trained once


# ------------------------------------------------------------------ with LoRA on one projection
def test_lora_added_after_ia3_on_a_shared_projection(base):
    model = PeftModel(base)
    model.add_adapter("ia3", IA3Config())
    model.add_adapter("lora", LoraConfig(target_modules=("q", "v")))
    assert model.adapter_num_params("lora") == LoraConfig(target_modules=("q", "v")).num_params(base.config)


def test_a_lora_under_ia3_saves_hf_names(base):
    model = PeftModel(base)
    model.add_adapter("lora", LoraConfig(target_modules=("q", "v")))
    model.add_adapter("ia3", IA3Config())
    assert not any("base_layer" in k for k in model.adapter_state_dict("lora"))


def test_lora_over_ia3_trains_serves_and_unloads_both_ways(base):
    """Either order on a shared projection: each phi saves HF's names, loads back, and a
    mixed batch of both equals each alone; merge_and_unload folds the active one only."""
    x = peftcore.TASKS["times_3"].batch(4, torch.Generator().manual_seed(0))[0]
    for first, second in [("lora", "ia3"), ("ia3", "lora")]:
        model = PeftModel(base)
        configs = {"lora": LoraConfig(target_modules=("q", "v")), "ia3": IA3Config()}
        for name in (first, second):
            model.add_adapter(name, configs[name], seed=1)
        with torch.no_grad():
            for _, p in model.named_adapter_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        assert_rows_equal_alone(model, x, ["lora", "ia3", "__base__", "lora"])
        for name in ("lora", "ia3"):
            again = PeftModel(base)
            peftcore.load_adapter(again, name, peftcore.adapter_to_bytes(model, name))
            again.set_adapter(name)
            model.set_adapter(name)
            assert torch.allclose(again(x), model(x), atol=1e-5), (first, name)
            plain = model.merge_and_unload()
            assert torch.allclose(plain(x), model(x), atol=2e-4), (first, name)
