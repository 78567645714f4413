"""The PEFT methods minipeft knows, by the name users pass as ``--modification_type``.

Each method lives in its own module with its config dataclass beside it; this table only says where,
what its ``peft_type`` is in adapter files, and whether its update can be merged into the weights.
Every ``apply`` function has the same shape: ``apply(model, config) -> prompt_encoder | None`` — it edits
``model`` in place (the model is already frozen) and returns the prompt/prefix module that prompt-learning
methods keep beside the base model, or None.
"""

import importlib
from dataclasses import dataclass

from minipeft.core.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str               # --modification_type
    module: str             # where the method lives
    config_class_name: str  # its config dataclass
    apply_name: str         # apply(model, config) -> prompt_encoder | None
    peft_type: str          # "peft_type" in adapter_config.json (peft's own name where peft has the method)
    mergeable: bool
    learning_rate: float    # the default peak learning rate (AdamW) of train_llm.py and compare
    learning_rate_source: str  # where that rate comes from
    why_not_mergeable: str = ""

    @property
    def config_class(self):
        return getattr(importlib.import_module(self.module), self.config_class_name)

    def apply(self, model, config):
        return getattr(importlib.import_module(self.module), self.apply_name)(model, config)


# Default learning rates, one per method, for AdamW and short runs (tens to hundreds of steps). How far a
# method's parameters sit from the loss sets its rate: matrices added beside frozen weights (LoRA, adapters)
# take ~1e-3; a few vectors or virtual tokens need 3e-3 to 3e-2; base weights (selective) need what full
# fine-tuning uses. Each method's docs page repeats its rate and source. ``--learning_rate`` overrides.
METHODS = {
    method.name: method
    for method in [
        Method("lora", "minipeft.methods.lora", "LoRAConfig", "apply_lora", "LORA", mergeable=True,
               learning_rate=1e-3, learning_rate_source="between the LoRA paper's 2e-4 (GPT-2, 5 epochs) and "
               "peft's causal-LM LoRA example's 3e-3 (20 epochs)"),
        Method("dora", "minipeft.methods.dora", "LoRAConfig", "apply_dora", "LORA", mergeable=True,
               learning_rate=1e-3, learning_rate_source="as LoRA (DoRA trains the same matrices plus a magnitude)"),
        Method("ia3", "minipeft.methods.ia3", "IA3Config", "apply_ia3", "IA3", mergeable=True,
               learning_rate=3e-3, learning_rate_source="Liu et al. 2022 (T-Few), the IA3 paper: 3e-3"),
        Method("adapter", "minipeft.methods.adapter", "AdapterConfig", "apply_adapters", "BOTTLENECK_ADAPTER",
               mergeable=False, learning_rate=1e-3, learning_rate_source="Houlsby et al. 2019, inside their sweep "
               "{3e-5, 3e-4, 3e-3}",
               why_not_mergeable="a bottleneck adapter has a nonlinearity between its "
               "down and up projections, so it is not a change of any existing weight"),
        Method("prefix", "minipeft.methods.prefix", "PrefixTuningConfig", "apply_prefix_tuning", "PREFIX_TUNING",
               mergeable=False, learning_rate=1e-2, learning_rate_source="peft's prefix-tuning example (1e-2)",
               why_not_mergeable="prefixes are extra attention keys and values, not a change of any weight"),
        Method("prompt", "minipeft.methods.prompt", "PromptTuningConfig", "apply_prompt_tuning", "PROMPT_TUNING",
               mergeable=False, learning_rate=3e-2, learning_rate_source="peft's prompt-tuning example with "
               "AdamW (3e-2); Lester et al. 2021 use 0.3 with Adafactor, whose steps scale with the weights",
               why_not_mergeable="virtual tokens are extra inputs, not a change of any weight"),
        Method("selective", "minipeft.methods.selective", "SelectiveConfig", "apply_selective", "SELECTIVE",
               mergeable=False, learning_rate=1e-4, learning_rate_source="full fine-tuning practice for small "
               "language models (1e-5 to 1e-4), at its top for short runs",
               why_not_mergeable="selective fine-tuning trains the base weights themselves; "
               "save the full model instead"),
        Method("bitfit", "minipeft.methods.bitfit", "BitFitConfig", "apply_bitfit", "BITFIT",
               mergeable=False, learning_rate=1e-3, learning_rate_source="Ben Zaken et al. 2021, the top of "
               "their sweep {1e-4, 4e-4, 7e-4, 1e-3}",
               why_not_mergeable="BitFit trains the base biases themselves; save the full model instead"),
    ]
}


def default_learning_rate(name: str) -> float:
    """The default peak learning rate of method ``name`` (see :data:`METHODS`)."""
    return METHODS[name].learning_rate


def method_for_config(config) -> Method:
    """The :class:`Method` a config object belongs to (DoRA is LoRA with ``use_dora=True``, as in peft)."""
    for method in METHODS.values():
        if type(config).__name__ == method.config_class_name and type(config).__module__ == method.module:
            if method.peft_type == "LORA":
                return METHODS["dora" if getattr(config, "use_dora", False) else "lora"]
            return method
    raise UserError(f"{type(config).__name__} is not the config of a minipeft method")


def method_for_peft_type(peft_type: str, source: str = "adapter_config.json") -> Method:
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted({method.peft_type for method in METHODS.values()})
    raise UserError(f"{source}: peft_type {peft_type!r} is not supported (known: {', '.join(known)})")


# --- command-line flags ------------------------------------------------------------------------------------
# The flags of every method, shared by modify_llm.py, train_llm.py and `python -m minipeft compare`. A flag
# of one method given with another method is an error, never silently ignored.


