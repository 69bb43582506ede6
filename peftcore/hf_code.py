"""The HF peft code that builds what a run here built, for a student to take home: the same
config, field by field under peft's names, on a real model from the Hub, and (where peft runs
the method on any torch module) on this app's own base with the phi file downloaded here,
where it gives the app's outputs (tests/test_hf_code.py runs it with peft)."""
from .methods.registry import method_of

# A small causal LM on the Hub whose projections are this base's names plus "_proj"
REAL_MODEL = "Qwen/Qwen2.5-0.5B"
HUB_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "up": "up_proj", "down": "down_proj"}


def config_call(config, hub=False):
    """`peft.LoraConfig(r=1, ...)`: the config's own fields, which carry peft's names; on a Hub
    model (hub=True) its module names are the model's and the task is causal language modelling."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("peft_type", *config.training_fields)}
    if hub:
        fields = {k: [HUB_NAMES.get(m, m) for m in v] if k.endswith("_modules") else v for k, v in fields.items()}
        fields = {"task_type": "CAUSAL_LM", **fields}
    return f"peft.{type(config).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def on_this_base(config, file_name):
    """Code that loads `file_name` (a phi file from this app) into HF peft over this app's base,
    or None where peft cannot run the method on a plain torch module."""
    if method_of(config).hf_peft != "module":
        return None
    return (f"# HF peft on this app's toy base (pip install peft==0.21.2; peftcore is this app's package)\n"
            f"import peft\n"
            f"from safetensors.torch import load_file\n"
            f"from peftcore import load_base\n\n"
            f"model = peft.get_peft_model(load_base(), {config_call(config)})\n"
            f"peft.set_peft_model_state_dict(model, load_file({file_name!r}))  # the phi you downloaded\n"
            f"model.eval()\n")


def on_a_real_model(config, lr=1e-4):
    """Code that builds the same config on REAL_MODEL (and the optimizer, where the config trains
    with one of peft's own, at learning rate `lr`), or None where HF peft has no such method."""
    if not method_of(config).hf_peft:
        return None
    optimizer = config.hf_optimizer(lr)
    return (f"# The same config on a real model from the Hub (pip install peft==0.21.2 transformers)\n"
            f"import peft\n"
            f"from transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({REAL_MODEL!r})\n"
            f"model = peft.get_peft_model(base, {config_call(config, hub=True)})\n"
            f"model.print_trainable_parameters()\n" + (f"\n# how phi trained here\n{optimizer}" if optimizer else ""))
