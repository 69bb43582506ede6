"""peftcore: the teaching core. A frozen pretrained toy base and real PEFT methods (LoRA and its
options, bottleneck adapters, IA3, prompt and prefix tuning, VeRA, LoHa, LoKr, and full
fine-tuning as the baseline) with
HF peft's names; torch only, usable from a notebook. Never imports streamlit, and loads
nothing of the run service (peftcore.service) around it.

The methods live in peftcore.methods, one file each; each registers itself when imported, and
importing the package imports them all, in the order the app lists them.
"""
from .base import base_file_bytes, fingerprint, load_base, random_base
from .methods import (AdapterConfig, FullFineTuneConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig,
                      PrefixTuningConfig, PromptTuningConfig, VeraConfig)
from .model import BaseConfig, ToyTransformer
from .peft_model import BASE_ROW, PeftModel, get_peft_model
from .methods.registry import METHODS, Method, UnknownMethod, method_of, register
from .tasks import DIGIT_MAPS, PRETRAIN_TASKS, ROUTINGS, TASKS, Task, skill_grid
from .train import NonFiniteLossError, TrainEvent, evaluate, resolve_device, run, train

__version__ = "0.1.0"
from .serialization import AdapterLoadError, adapter_to_bytes, load_adapter, saved_bytes  # noqa: E402
