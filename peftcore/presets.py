"""Default presets: a config plus a training budget per method, sized for a live demo:
each finishes within 15 s on 2 CPU cores with one torch thread (see BENCHMARKS.md), so
the step budgets differ with each method's step time."""
from dataclasses import dataclass, field

from .adapter import AdapterConfig
from .config import PeftConfig
from .lora import LoraConfig
from .peft_model import FullFineTuneConfig
from .prompt import PromptTuningConfig


@dataclass
class Preset:
    config: PeftConfig
    train: dict = field(default_factory=dict)  # keyword arguments of peftcore.train


PRESETS = {
    # rank 1 on many projections beats a higher rank on few at the same budget (LoRA paper, Table 6)
    "LoRA": Preset(LoraConfig(r=1, lora_alpha=4, target_modules=("q", "k", "v", "o", "up")), dict(steps=300, lr=1e-2, batch_size=32)),
    "Adapter": Preset(AdapterConfig(bottleneck_size=16), dict(steps=300, lr=3e-2, batch_size=32)),
    # prompt tuning wants a high learning rate (Lester et al. used 0.3)
    "Prompt tuning": Preset(PromptTuningConfig(num_virtual_tokens=8), dict(steps=200, lr=1e-1, batch_size=32)),
    "Full fine-tuning": Preset(FullFineTuneConfig(), dict(steps=220, lr=1e-3, batch_size=32)),
}
