"""peftcore: a frozen pretrained toy base and real PEFT methods (LoRA, bottleneck
adapters, prompt tuning) with HF peft's names. Never imports streamlit."""
from .adapter import AdapterConfig
from .base import base_file_bytes, fingerprint, load_base, random_base
from .lora import LoraConfig
from .model import BaseConfig, ToyTransformer
from .peft_model import BASE_ROW, FullFineTuneConfig, PeftModel, get_peft_model
from .prompt import PromptTuningConfig
from .tasks import PRETRAIN_TASKS, TASKS, Task
from .train import NonFiniteLossError, TrainEvent, evaluate, resolve_device, run, train

__version__ = "0.1.0"
from .serialization import AdapterLoadError, adapter_to_bytes, load_adapter, saved_bytes
