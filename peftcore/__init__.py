"""peftcore: a frozen pretrained toy base and real PEFT methods (LoRA, bottleneck
adapters, prompt tuning, and full fine-tuning as the baseline) with HF peft's names.
Never imports streamlit.

Each method registers itself when its file is imported (registry.py); importing the
package imports them all, in the order the app lists them.
"""
from .base import base_file_bytes, fingerprint, load_base, random_base
from .lora import LoraConfig
from .adapter import AdapterConfig
from .ia3 import IA3Config
from .prompt import PromptTuningConfig
from .prefix import PrefixTuningConfig
from .full import FullFineTuneConfig
from .model import BaseConfig, ToyTransformer
from .peft_model import BASE_ROW, PeftModel, get_peft_model
from .registry import METHODS, Method, UnknownMethod, method_of, register
from .tasks import DIGIT_MAPS, PRETRAIN_TASKS, ROUTINGS, TASKS, Task, skill_grid
from .train import NonFiniteLossError, TrainEvent, evaluate, resolve_device, run, train

__version__ = "0.1.0"
from .serialization import AdapterLoadError, adapter_to_bytes, load_adapter, saved_bytes  # noqa: E402
