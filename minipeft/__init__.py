"""minipeft: parameter-efficient fine-tuning of causal language models, in plain PyTorch.

The public API, by what a user does with it:

- apply a method: :func:`get_peft_model` with a method's config (:class:`LoRAConfig`, :class:`IA3Config`, ...;
  every registered method's config is exported here by its class name);
- count: :meth:`PeftModel.parameter_stats`, :func:`count_parameters`;
- save and load adapters in peft's format: :meth:`PeftModel.save_adapter`, :func:`load_adapter`;
- load models offline: :func:`load_model_and_tokenizer` (``"builtin"``, ``"gpt2"``, ``"smollm2-135m"``, ...).

The package is laid out in layers, one folder per meaning (``builtin``, ``core``, ``files``, ``quantization``,
``loading``, ``methods``, ``model``, ``data``, ``fast``, ``training``, ``inference``, ``pretraining``, ``cli``);
each imports only the ones before it. The picture, one line per folder: ``docs/architecture.md``.

Names are imported on first use (``minipeft.LoRAConfig`` loads torch then), so ``import minipeft`` and
``python -m minipeft --help`` are instant, and Ctrl-C while torch loads is handled by the command line.
"""

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "UserError": "minipeft.core.errors",
    "ParameterStats": "minipeft.core.inject",
    "count_parameters": "minipeft.core.inject",
    "load_model_and_tokenizer": "minipeft.loading.models",
    "LoRALinear": "minipeft.methods.lora",
    "PeftModel": "minipeft.model.peft_model",
    "get_peft_model": "minipeft.model.peft_model",
    "load_adapter": "minipeft.model.peft_model",
    "save_adapter": "minipeft.model.adapter_files",
    "MultiAdapterModel": "minipeft.inference.multi_adapter",
}


def _config_classes() -> dict:
    """``{class name: config class}`` of every registered method (LoRAConfig, IA3Config, ...)."""
    from minipeft.methods import METHODS  # why: on first use only, so that `import minipeft` loads no torch

    return {method.config_class.__name__: method.config_class for method in METHODS.values()}


def __getattr__(name: str):
    """``minipeft.<name>``: import the defining module on first use (PEP 562)."""
    import importlib

    if name == "__all__":  # what `from minipeft import *` takes: the names above and every method's config
        return [*_EXPORTS, *_config_classes()]
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name.endswith("Config") and not name.startswith("_"):
        configs = _config_classes()
        if name in configs:
            return configs[name]
    raise AttributeError(f"module 'minipeft' has no attribute {name!r}")


def __dir__() -> list:
    return sorted([*globals(), *_EXPORTS, *_config_classes()])

