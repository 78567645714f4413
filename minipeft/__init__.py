"""minipeft: parameter-efficient fine-tuning of causal language models, in plain PyTorch.

The public API, by what a user does with it:

- apply a method: :func:`get_peft_model` with a method's config (:class:`LoRAConfig`, ...), or
  :func:`apply_method` by name, as ``--modification_type`` does;
- count: :meth:`PeftModel.parameter_stats`, :func:`count_parameters`;
- save and load adapters in peft's format: :meth:`PeftModel.save_adapter`, :func:`load_adapter`;
- load models offline: :func:`load_model_and_tokenizer` (``"builtin"``, ``"gpt2"``, ``"smollm2-135m"``, ...).
"""

from minipeft.adapter_io import load_adapter, save_adapter
from minipeft.errors import UserError
from minipeft.inject import ParameterStats, count_parameters
from minipeft.lora import LoRAConfig, LoRALinear
from minipeft.models import load_model_and_tokenizer
from minipeft.multi_adapter import MultiAdapterModel
from minipeft.peft_model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig", "LoRALinear", "MultiAdapterModel", "ParameterStats", "PeftModel", "UserError", "count_parameters",
    "get_peft_model", "load_adapter", "load_model_and_tokenizer", "save_adapter",
]
