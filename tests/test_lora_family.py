"""LoRA's options against HF peft 0.21.2 on the same base: rsLoRA's scaling, DoRA's magnitude
(outputs, files both ways, merges, mixed batches), the inits that keep the base untouched, and
the optimizers LoRA+ and LoRA-FA as peft builds them."""
import copy
import json
from dataclasses import replace

import pytest
import torch

import peftcore
from mixed import assert_rows_equal_alone
from phi import randomize
from peftcore import BASE_ROW, LoraConfig, PeftModel, fingerprint, get_peft_model
from peftcore.methods.lora import project_b_grads

peft = pytest.importorskip("peft")

OPTIONS = [dict(use_rslora=True, r=4, lora_alpha=8), dict(use_dora=True), dict(use_dora=True, use_rslora=True, r=8),
           dict(init_lora_weights="gaussian"), dict(init_lora_weights="orthogonal", r=2)]


def hf_twin(base, config):
    """HF peft's model of the same config over a copy of the base."""
    fields = dict(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                  use_rslora=config.use_rslora, use_dora=config.use_dora, init_lora_weights=config.init_lora_weights)
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**fields))


def with_phi(base, **options):
    ours = get_peft_model(base, LoraConfig(target_modules=("q", "up", "v"), **options), seed=0)
    randomize(ours, scale=0.05)
    return ours


@pytest.mark.parametrize("options", OPTIONS, ids=repr)
def test_same_phi_same_outputs_same_saved_names(base, batch, options):
    ours = with_phi(base, **options)
    theirs = hf_twin(base, ours.peft_config["default"])
    state = ours.adapter_state_dict()
    assert set(state) == set(peft.get_peft_model_state_dict(theirs))
    peft.set_peft_model_state_dict(theirs, state)
    torch.testing.assert_close(ours(batch[0]), theirs.eval()(batch[0]), atol=1e-5, rtol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.adapter_num_params("default") == ours.peft_config["default"].num_params(base.config)


@pytest.mark.parametrize("options", [dict(use_dora=True, use_rslora=True, r=2), dict(init_lora_weights="gaussian")], ids=repr)
def test_files_load_both_ways(base, batch, tmp_path, options):
    ours = with_phi(base, **options)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(batch[0]), ours(batch[0]), atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(base, tmp_path / "theirs")
    loaded = back.peft_config["default"]  # peft writes target_modules as a set: any order
    assert replace(loaded, target_modules=tuple(sorted(loaded.target_modules))) == ours.peft_config["default"]
    torch.testing.assert_close(back(batch[0]), ours(batch[0]), atol=1e-5, rtol=0)


def test_rslora_is_lora_at_rank_one_and_grows_by_sqrt_r(base, batch):
    plain, rs = (with_phi(base, r=1, lora_alpha=4, use_rslora=flag) for flag in (False, True))
    torch.testing.assert_close(rs(batch[0]), plain(batch[0]), atol=0, rtol=0)  # same seed, same phi
    for r in (4, 16):
        ratio = LoraConfig(r=r, use_rslora=True).scaling / LoraConfig(r=r).scaling
        assert ratio == pytest.approx(r ** 0.5)


def test_dora_merges_and_rides_in_a_mixed_batch_beside_plain_lora(base, base_fp, batch):
    model = with_phi(base, use_dora=True)
    model.add_adapter("plain", LoraConfig(target_modules=("q", "up", "v")), seed=1)
    randomize(model, "plain", seed=2, scale=0.05)
    assert_rows_equal_alone(model, batch[0][:4], ["default", "plain", BASE_ROW, "default"])
    model.set_adapter("default")
    x, out = batch[0], model(batch[0])
    theirs = hf_twin(base, model.peft_config["default"])
    peft.set_peft_model_state_dict(theirs, model.adapter_state_dict("default"))
    torch.testing.assert_close(theirs.merge_and_unload().eval()(x), out, atol=1e-5, rtol=0)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model.merge_and_unload()(x), out, atol=1e-5, rtol=1e-5)
    assert fingerprint(base) == base_fp


def test_the_inits_start_from_the_base_and_draw_as_peft(base, batch):
    gaussian = get_peft_model(base, LoraConfig(r=8, init_lora_weights="gaussian"), seed=0)
    A = torch.cat([w for k, w in gaussian.adapter_state_dict().items() if "lora_A" in k])
    assert A.std().item() == pytest.approx(1 / 8, rel=0.05)  # peft: normal, std 1 / r
    orthogonal = get_peft_model(base, LoraConfig(r=4, init_lora_weights="orthogonal"), seed=0)
    layer = next(m for m in orthogonal.modules() if hasattr(m, "delta_weight"))
    assert layer.lora_B["default"].weight.abs().min() > 0  # neither factor is zero, yet B A is
    assert layer.delta_weight("default").abs().max() < 1e-6
    torch.testing.assert_close(orthogonal(batch[0]), base(batch[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4", "loftq"])
def test_inits_that_rewrite_the_base_are_refused_saying_why(base, init):
    with pytest.raises(ValueError, match="writes into the base's weights"):
        get_peft_model(base, LoraConfig(init_lora_weights=init))


def test_loraplus_groups_as_peft_builds_them(base):
    ours = get_peft_model(base, LoraConfig(use_dora=True, optimizer="loraplus", loraplus_lr_ratio=8), seed=0)
    ratio_of = {id(p): g["lr"] / 1e-3 for g in ours.optimizer_groups(1e-3) for p in g["params"]}
    theirs = hf_twin(base, ours.peft_config["default"])
    from peft.optimizers import create_loraplus_optimizer
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8)
    their_ratio = {n: g["lr"] / 1e-3 for g in opt.param_groups for p in g["params"]
                   for n, q in theirs.named_parameters() if q is p}
    ours_named = {n.replace("base_model.", "base_model.model.", 1): ratio_of[id(p)] for n, p in ours.named_parameters()
                  if p.requires_grad}
    strip = lambda n: n.replace(".base_layer", "").replace(".default", "").replace("vector.weight", "vector")  # noqa: E731
    assert {strip(n): r for n, r in their_ratio.items()} == {strip(n): r for n, r in ours_named.items()}
    assert sorted(set(ratio_of.values())) == [1.0, 8.0]


def test_lorafa_freezes_A_and_projects_B_s_gradient(base):
    config = LoraConfig(r=2, optimizer="lorafa")
    model = get_peft_model(base, config, seed=0)
    layers = [m for m in model.modules() if hasattr(m, "delta_weight")]
    assert all(not m.lora_A["default"].weight.requires_grad for m in layers)
    assert model.get_nb_trainable_parameters()[0] == sum(m.lora_B["default"].weight.numel() for m in layers)
    A, B = layers[0].lora_A["default"].weight, layers[0].lora_B["default"].weight
    B.grad = torch.randn(B.shape, generator=torch.Generator().manual_seed(0))
    raw = B.grad.clone()
    project_b_grads([(A, B, config.scaling)])
    # the projection inverts A A^T: undoing it gives the raw gradient back
    torch.testing.assert_close(B.grad @ (A @ A.T) * config.scaling ** 2, raw, atol=1e-4, rtol=1e-4)
    A_before = A.detach().clone()
    event = peftcore.run(model, "times_3", steps=3, lr=1e-2, device="cpu", eval_every=10_000, batch_size=8)
    assert torch.equal(A, A_before) and event.step == 3


def test_how_it_trained_is_in_the_record_and_comes_back(base, tmp_path):
    model = get_peft_model(base, LoraConfig(optimizer="loraplus", loraplus_lr_ratio=4.0), seed=0)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "optimizer" not in saved and saved["peftcore"]["training"] == {"optimizer": "loraplus", "loraplus_lr_ratio": 4.0}
    assert PeftModel.from_pretrained(base, tmp_path).peft_config["default"] == model.peft_config["default"]
