"""Full fine-tuning, the baseline PEFT is measured against: a trainable copy of every weight
of the base, no phi. A whole model per task: it shares no base, so it never joins a bank,
a class or a mixed batch."""
from dataclasses import dataclass

from .config import PeftConfig
from .registry import Method, Preset, register


@dataclass
class FullFineTuneConfig(PeftConfig):
    peft_type = "FULL"

    def num_params(self, base_config):
        return None  # every parameter of the copy


def make_copy(model, name, cfg, generator=None):
    """Give the model a real copy of the base's weights: full fine-tuning writes every one."""
    model.full = True
    for p in model.base_model.parameters():
        p.data = p.data.clone()


register(Method(FullFineTuneConfig, plug=make_copy, slug="full", shares_base=False,
                preset=Preset(FullFineTuneConfig(), dict(steps=220, lr=1e-3, batch_size=32))))
