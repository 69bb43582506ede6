"""The PEFT methods: the registry (registry.py), the configuration and layer code they share
(config.py), and one file per method, each with HF peft's names. A method registers itself when
its file is imported; importing this package imports them all, in the order the app lists them."""
from . import registry
from .lora import LoraConfig
from .adapter import AdapterConfig
from .ia3 import IA3Config
from .prompt import PromptTuningConfig
from .prefix import PrefixTuningConfig
from .vera import VeraConfig
from .loha import LoHaConfig
from .lokr import LoKrConfig
from .full import FullFineTuneConfig

__all__ = ["registry", "LoraConfig", "AdapterConfig", "IA3Config", "PromptTuningConfig",
           "PrefixTuningConfig", "VeraConfig", "LoHaConfig", "LoKrConfig", "FullFineTuneConfig"]
