"""peftcore's LoRA against HF peft's on the same base (peft is a test-only dependency)."""
import copy

import pytest
import torch

import peftcore
from peftcore import LoraConfig, get_peft_model
from phi import randomize

peft = pytest.importorskip("peft")


def hf_lora(base, config):
    hf_config = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                target_modules=list(config.target_modules))
    return peft.get_peft_model(copy.deepcopy(base), hf_config)


@pytest.mark.parametrize("config", [LoraConfig(), LoraConfig(r=8, lora_alpha=8, target_modules=("q", "k", "v", "o", "up", "down"))], ids=repr)
def test_same_A_B_same_outputs_and_counts(base, batch, config):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.05, replace=True)
    theirs = hf_lora(base, config)
    hf_state = theirs.state_dict()
    with torch.no_grad():
        for key, t in ours.adapter_state_dict().items():  # our saved keys are HF's saved keys
            hf_key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            hf_state[hf_key].copy_(t)
    theirs.eval()
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=1e-5, rtol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_hf_peft_loads_our_lora_file(base, batch, tmp_path):
    ours = get_peft_model(base, LoraConfig(r=4, target_modules=("q", "v", "up")))
    randomize(ours, scale=0.05, replace=True)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(ours(batch[0]), theirs(batch[0]), atol=1e-5, rtol=0)


def test_we_load_hf_peft_lora_file(base, batch, tmp_path):
    theirs = hf_lora(base, LoraConfig(r=2, lora_alpha=4, target_modules=("k", "o")))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path)
    ours = peftcore.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(ours(batch[0]), theirs.eval()(batch[0]), atol=1e-5, rtol=0)


def test_merged_lora_guards_as_hf_peft(base, batch):
    """While a LoRA is merged, both libraries refuse a mixed batch, and set_adapter warns and
    unmerges before it switches."""
    config = LoraConfig(r=2, target_modules=("q", "v"))
    ours = get_peft_model(base, config)
    ours.add_adapter("other", config)
    theirs = hf_lora(base, config)
    theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q", "v"]))
    for model in (ours, theirs):
        model.eval()
        model.set_adapter("default")
        model.merge_adapter()
        with pytest.raises(ValueError, match="adapter_names.*merged"):
            model(batch[0][:2], adapter_names=["default", "other"])
        with pytest.warns(UserWarning, match="Unmerging the model first"):
            model.set_adapter("other")
        model(batch[0][:2], adapter_names=["default", "other"])  # unmerged: served again
