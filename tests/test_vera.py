"""peftcore's VeRA against HF peft's on the same base (peft is a test-only dependency), and
what is VeRA's own: the shared frozen pair drawn from projection_prng_key, saved or not, checked
on load, one pair per adapter of a bank."""
import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import peftcore
from mixed import assert_rows_equal_alone
from peftcore import BASE_ROW, PeftModel, get_peft_model
from peftcore.methods.vera import VeraConfig, VeraProjections
from peftcore.serialization import AdapterLoadError
from phi import randomize

peft = pytest.importorskip("peft")

CONFIGS = [VeraConfig(r=16, target_modules=("q", "up"), projection_prng_key=7),
           VeraConfig(target_modules=("k", "o", "down")),  # peft's defaults: r=256, key 0
           VeraConfig(r=8, target_modules=("v",), projection_prng_key=3, save_projection=False)]


def hf_vera(base, config):
    hf_config = peft.VeraConfig(r=config.r, target_modules=list(config.target_modules),
                                projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
                                vera_dropout=config.vera_dropout, d_initial=config.d_initial)
    return peft.get_peft_model(copy.deepcopy(base), hf_config)


def hf_saved(model, tmp_path):
    """The tensors HF peft writes to adapter_model.safetensors."""
    model.save_pretrained(tmp_path / "hf")
    return load_file(tmp_path / "hf" / "adapter_model.safetensors")


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_the_same_key_draws_peft_s_projections(base, config):
    ours = get_peft_model(base, config)
    theirs = hf_vera(base, config)
    assert torch.equal(ours.vera_projections.vera_A["default"], theirs.base_model.vera_A["default"])
    assert torch.equal(ours.vera_projections.vera_B["default"], theirs.base_model.vera_B["default"])
    other = get_peft_model(base, VeraConfig(r=config.r, target_modules=config.target_modules,
                                            projection_prng_key=config.projection_prng_key + 1))
    assert not torch.equal(other.vera_projections.vera_A["default"], ours.vera_projections.vera_A["default"])


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_same_vectors_same_outputs_keys_and_counts(base, batch, tmp_path, config):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.05, replace=True)
    theirs = hf_vera(base, config)
    hf_state = theirs.state_dict()
    with torch.no_grad():
        for key, t in ours.adapter_state_dict().items():
            if ".vera_lambda_" in key:
                hf_state[key.replace(".vera_lambda_b", ".vera_lambda_b.default")
                         .replace(".vera_lambda_d", ".vera_lambda_d.default")].copy_(t)
    theirs.eval()
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=1e-5, rtol=0)
    assert set(ours.adapter_state_dict()) == set(hf_saved(theirs, tmp_path))  # our saved keys are peft's
    trainable = ours.get_nb_trainable_parameters()[0]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable == config.num_params(base.config) == ours.adapter_num_params("default")
    assert not any("vera_A" in n or "vera_B" in n for n, _ in ours.named_parameters())  # buffers, never parameters


@pytest.mark.parametrize("config", CONFIGS[::2], ids=repr)
def test_hf_peft_loads_our_vera_file(base, batch, tmp_path, config):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.05, replace=True)
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert ("base_model.vera_A" in saved) == config.save_projection
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", CONFIGS[::2], ids=repr)
def test_we_load_hf_peft_vera_file(base, batch, tmp_path, config):
    theirs = hf_vera(base, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(base, tmp_path)
    loaded = ours.peft_config["default"]  # peft saves target_modules as a set: any order
    assert replace(loaded, target_modules=sorted(loaded.target_modules)) == \
        replace(config, target_modules=sorted(config.target_modules))
    torch.testing.assert_close(ours(batch[0]), theirs.eval()(batch[0]), atol=1e-5, rtol=0)


def test_a_file_whose_projection_is_not_its_key_s_is_refused(base, batch, tmp_path):
    """A file's A and B are checked against what its projection_prng_key draws: a file whose
    pair came from another key (or was edited) would serve other outputs than it trained with.
    The bank is left as it was."""
    ours = get_peft_model(base, VeraConfig(r=8, target_modules=("q", "v"), projection_prng_key=1))
    randomize(ours, scale=0.05, replace=True)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["projection_prng_key"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    bank = get_peft_model(base, VeraConfig(r=4, target_modules=("up",)), adapter_name="mine")
    before = bank(batch[0])
    with pytest.raises(AdapterLoadError, match=r"base_model\.vera_[AB] is not the frozen tensor this config makes"):
        bank.load_adapter(tmp_path, "other")
    assert list(bank.peft_config) == ["mine"] and list(bank.vera_projections.vera_A) == ["mine"]
    assert torch.equal(bank(batch[0]), before)
    config["projection_prng_key"] = 1  # its own key: loads, and serves what it was trained to
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    bank.load_adapter(tmp_path, "other")
    bank.set_adapter("other")
    assert torch.equal(bank(batch[0]), ours(batch[0]))


def test_a_bank_holds_each_adapter_s_own_pair_and_drops_them_with_it(base, batch):
    """HF peft allows one key per model; a bank holds students' adapters of any key and r,
    each with its own pair (one tensor for adapters whose configs draw the same), and mixed
    rows still equal their lone runs."""
    bank = get_peft_model(base, VeraConfig(r=16, target_modules=("q", "v"), projection_prng_key=1), adapter_name="a")
    bank.add_adapter("b", VeraConfig(r=32, target_modules=("v", "down"), projection_prng_key=2))
    bank.add_adapter("c", VeraConfig(r=16, target_modules=("q", "v"), projection_prng_key=1))
    randomize(bank, seed=1, scale=0.05)
    pairs = bank.vera_projections
    assert pairs.vera_A["a"] is pairs.vera_A["c"] and pairs.vera_A["b"].shape == (32, 512)
    assert_rows_equal_alone(bank, batch[0][:5], ["a", "b", BASE_ROW, "c", "b"])
    for name in ("a", "b"):
        bank.delete_adapter(name)
    assert list(pairs.vera_A) == ["c"]
    bank.delete_adapter("c")
    assert not any(isinstance(m, VeraProjections) for m in bank.modules())
    assert torch.equal(bank(batch[0]), base(batch[0]))


@pytest.mark.parametrize("field, value", [("r", 0), ("projection_prng_key", -1), ("save_projection", "yes"),
                                          ("d_initial", float("nan")), ("target_modules", ("q", "w"))])
def test_a_bad_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VeraConfig(**{field: value}).validate()


def test_vera_dropout_trains_and_a_seed_repeats_its_run(base):
    config = VeraConfig(r=16, target_modules=("q", "v"), vera_dropout=0.2)
    runs = []
    for _ in range(2):
        model = get_peft_model(base, copy.deepcopy(config), seed=0)
        peftcore.run(model, "times_3", steps=3, lr=5e-2, device="cpu", seed=0, eval_every=10_000)
        runs.append(torch.cat([p.detach().flatten() for _, p in model.named_adapter_parameters("default")]))
    assert torch.equal(*runs) and runs[0].abs().sum() > 0


def test_the_copied_peft_code_gives_the_apps_outputs(base, batch, tmp_path):
    """"Copy as HF peft code" for a VeRA run: peft draws the same pair from the key and reads
    the downloaded file (its projections included) into it."""
    from peftcore import hf_code
    from peftcore.presets import PRESETS
    config = PRESETS["VERA"].config
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.05)
    file = tmp_path / "my-phi.safetensors"
    file.write_bytes(peftcore.adapter_to_bytes(ours))
    namespace = {}
    exec(compile(hf_code.on_this_base(config, str(file)), "copied from the app", "exec"), namespace)  # noqa: S102
    ours.eval()
    torch.testing.assert_close(namespace["model"](batch[0]), ours(batch[0]), atol=1e-5, rtol=0)
    assert namespace["model"].get_nb_trainable_parameters()[0] == ours.get_nb_trainable_parameters()[0]


def test_one_vera_layer_per_projection_beside_other_methods_wrappers(base, batch):
    """A second VeRA adapter finds the projection's VeraLinear under a LoRA that wraps it since,
    and rows of all three still equal their lone runs."""
    from peftcore import LoraConfig
    from peftcore.methods.vera import VeraLinear
    bank = get_peft_model(base, VeraConfig(r=8, target_modules=("q", "v")), adapter_name="v1")
    bank.add_adapter("lora", LoraConfig(r=2, target_modules=("q",)))
    bank.add_adapter("v2", VeraConfig(r=4, target_modules=("q", "up"), projection_prng_key=5))
    randomize(bank, seed=2, scale=0.05)
    assert sum(isinstance(m, VeraLinear) for m in bank.modules()) == 3 * base.config.n_layer  # q, v, up
    assert_rows_equal_alone(bank, batch[0][:4], ["v1", "lora", "v2", BASE_ROW])
