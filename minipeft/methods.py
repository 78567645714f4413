"""The PEFT methods minipeft knows, by the name users pass as ``--modification_type``.

Each method lives in its own module with its config dataclass beside it; this table only says where,
what its ``peft_type`` is in adapter files, and whether its update can be merged into the weights.
Every ``apply`` function has the same shape: ``apply(model, config) -> prompt_encoder | None`` — it edits
``model`` in place (the model is already frozen) and returns the prompt/prefix module that prompt-learning
methods keep beside the base model, or None.
"""

import importlib
from dataclasses import dataclass

from minipeft.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str               # --modification_type
    module: str             # where the method lives
    config_class_name: str  # its config dataclass
    apply_name: str         # apply(model, config) -> prompt_encoder | None
    peft_type: str          # "peft_type" in adapter_config.json (peft's own name where peft has the method)
    mergeable: bool
    why_not_mergeable: str = ""

    @property
    def config_class(self):
        return getattr(importlib.import_module(self.module), self.config_class_name)

    def apply(self, model, config):
        return getattr(importlib.import_module(self.module), self.apply_name)(model, config)


METHODS = {
    method.name: method
    for method in [
        Method("lora", "minipeft.lora", "LoRAConfig", "apply_lora", "LORA", mergeable=True),
        Method("dora", "minipeft.lora", "LoRAConfig", "apply_lora", "LORA", mergeable=True),
        Method("ia3", "minipeft.ia3", "IA3Config", "apply_ia3", "IA3", mergeable=True),
        Method("adapter", "minipeft.adapters", "AdapterConfig", "apply_adapters", "BOTTLENECK_ADAPTER",
               mergeable=False, why_not_mergeable="a bottleneck adapter has a nonlinearity between its "
               "down and up projections, so it is not a change of any existing weight"),
        Method("prefix", "minipeft.prefix", "PrefixTuningConfig", "apply_prefix_tuning", "PREFIX_TUNING",
               mergeable=False, why_not_mergeable="prefixes are extra attention keys and values, "
               "not a change of any weight"),
        Method("prompt", "minipeft.prompt", "PromptTuningConfig", "apply_prompt_tuning", "PROMPT_TUNING",
               mergeable=False, why_not_mergeable="virtual tokens are extra inputs, not a change of any weight"),
        Method("selective", "minipeft.freeze", "SelectiveConfig", "apply_selective", "SELECTIVE",
               mergeable=False, why_not_mergeable="selective fine-tuning trains the base weights themselves; "
               "save the full model instead"),
        Method("bitfit", "minipeft.bitfit", "BitFitConfig", "apply_bitfit", "BITFIT",
               mergeable=False, why_not_mergeable="BitFit trains the base biases themselves; "
               "save the full model instead"),
    ]
}


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
