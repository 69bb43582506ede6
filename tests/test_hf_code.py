""""Copy as HF peft code" (issue 32, item 9): the code a result offers builds, with HF peft
0.21.2, what the run built. On this app's base it loads the downloaded phi file and gives the
app's outputs to 1e-5; on a real model, peft takes the config as written."""
import pytest
import torch

import peftcore
from peftcore import IA3Config, LoraConfig, get_peft_model, hf_code
from peftcore.presets import PRESETS
from phi import randomize

peft = pytest.importorskip("peft")

ON_MODULES = [PRESETS["LORA"].config, LoraConfig(r=3, lora_alpha=5, target_modules=("v", "up", "down")),
              PRESETS["IA3"].config, IA3Config(target_modules=("q", "up"), feedforward_modules=("up",))]


@pytest.mark.parametrize("config", ON_MODULES, ids=repr)
def test_the_code_for_this_base_gives_the_apps_outputs(base, batch, config, tmp_path):
    ours = get_peft_model(base, config)
    randomize(ours, scale=0.05 if config.peft_type == "LORA" else 0.3)
    file = tmp_path / "my-phi.safetensors"
    file.write_bytes(peftcore.adapter_to_bytes(ours))  # what the Download button gives
    code = hf_code.on_this_base(config, str(file))
    namespace = {}
    exec(compile(code, "copied from the app", "exec"), namespace)  # noqa: S102 - our own generated code
    theirs = namespace["model"]
    assert isinstance(theirs, peft.PeftModel)
    ours.eval()
    torch.testing.assert_close(theirs(batch[0]), ours(batch[0]), atol=1e-5, rtol=0)
    assert theirs.get_nb_trainable_parameters()[0] == ours.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method", list(peftcore.METHODS))
def test_peft_takes_the_config_written_for_a_real_model(method):
    config = PRESETS[method].config
    code = hf_code.on_a_real_model(config)
    if not peftcore.METHODS[method].hf_peft:  # no such method in peft: no code, and the page says why
        assert code is None and hf_code.on_this_base(config, "x.safetensors") is None
        return
    compile(code, "copied from the app", "exec")
    hub_config = eval(hf_code.config_call(config, hub=True), {"peft": peft})  # noqa: S307 - our own text
    assert type(hub_config).__name__ == type(config).__name__ and hub_config.peft_type.value == method
    for name, value in config.to_dict().items():
        if name not in ("peft_type", *config.training_fields):
            got = getattr(hub_config, name)
            want = [hf_code.HUB_NAMES[m] for m in value] if name.endswith("_modules") else value
            assert (sorted(got) if isinstance(got, (set, list)) else got) == (sorted(want) if isinstance(want, list)
                                                                               else want), name


def test_every_method_without_peft_code_says_what_to_use_instead():
    import views
    for method in peftcore.METHODS.values():
        assert bool(method.hf_peft) != bool(views.view_of(method.peft_type).not_in_hf_peft), method.peft_type


@pytest.mark.parametrize("optimizer", ["loraplus", "lorafa"])
def test_the_optimizer_code_builds_peft_s_optimizer_as_it_trained_here(base, tmp_path, optimizer):
    """LoRA+ and LoRA-FA are how phi trained, not config fields: the code builds peft's optimizer."""
    config = LoraConfig(r=2, optimizer=optimizer, loraplus_lr_ratio=8)
    file = tmp_path / "phi.safetensors"
    file.write_bytes(peftcore.adapter_to_bytes(get_peft_model(base, config)))
    namespace = {}
    exec(compile(hf_code.on_this_base(config, str(file)), "copied", "exec"), namespace)  # noqa: S102 - our own code
    real = hf_code.on_a_real_model(config, lr=3e-3)
    optimizer_code = real[real.index("# how phi trained here"):]
    exec(compile(optimizer_code, "copied", "exec"), namespace)  # noqa: S102 - our own generated code
    lrs = sorted({g["lr"] for g in namespace["optimizer"].param_groups if g["params"]})
    assert lrs == ([3e-3, 8 * 3e-3] if optimizer == "loraplus" else [3e-3])
