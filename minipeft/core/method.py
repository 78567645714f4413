"""What a PEFT method tells the rest of minipeft about itself: one :class:`Method` record per method.

Each method module (``minipeft/methods/lora.py``, ``ia3.py``, ...) ends with its own record::

    METHOD = Method(name="lora", config_class=LoRAConfig, apply=apply_lora, peft_type="LORA", mergeable=True,
                    learning_rate=1e-3, learning_rate_source="...", order=10)

and :mod:`minipeft.methods` collects the records of every module in its folder into ``METHODS``. So adding a
method is adding one module: nothing else lists the methods. The record holds the objects themselves (the
config class, the apply function), not their names, so a reader can follow them with "go to definition".

This module defines only the record; it imports no method (the methods import it).
"""

from dataclasses import dataclass
from typing import Callable

# The order of a method that gives none: after every built-in method (whose orders are 10 .. 80).
LAST = 1000


@dataclass(frozen=True)
class Method:
    """One PEFT method, by the name users pass as ``--modification_type``.

    Args:
        name: ``--modification_type`` (and the name of its module in ``minipeft/methods/``).
        config_class: its config dataclass; ``config_class()`` is the method with its default settings.
        apply: ``apply(model, config) -> prompt_encoder | None``. It edits the frozen ``model`` in place (an
            adapter layer put where each target was, see :mod:`minipeft.core.adapter_layer`) and returns the
            :class:`~minipeft.core.virtual_tokens.PromptEncoder` that prompt-learning methods keep beside
            the base model, or None.
        peft_type: ``"peft_type"`` in ``adapter_config.json``: peft's own name where peft has the method
            (LoRA and DoRA share ``"LORA"``: DoRA is ``LoRAConfig(use_dora=True)``, as in peft).
        mergeable: whether the update can be folded into the base weights (``merge_adapter``, export).
        learning_rate: the default peak learning rate (AdamW) of ``train_llm.py`` and ``compare``.
        learning_rate_source: where that rate comes from (a paper, peft's example).
        why_not_mergeable: for a method that cannot be merged, why, in words an error message can use.
        order: where the method is listed (``--modification_type`` choices, ``compare``'s methods): by
            ``order``, then by name. The built-in methods use 10, 20, ... 80; a new method may leave the
            default (:data:`LAST`) and is listed after them.
        save_extra: ``save_extra(peft_model) -> {file key: tensor}``: tensors that belong to the method as a
            whole rather than to one layer (VeRA's shared random projections, which peft writes as
            ``base_model.vera_A`` and ``base_model.vera_B``). They are written into
            ``adapter_model.safetensors`` under exactly these keys, beside the per-layer tensors. None: nothing
            extra.
        load_extra: ``load_extra(peft_model, tensors, source) -> None``: receives the file's tensors that no
            adapter parameter claimed (``{file key: tensor}``, possibly empty) after the per-layer tensors were
            checked and before any is copied. It copies what it knows into the model and raises a
            :class:`~minipeft.core.errors.UserError` naming ``source`` (the file) for anything it does not know
            or anything missing. None: an unclaimed tensor is an error (``tensor ... has no place in this
            model``).
        why_not_on_4bit: for a method that cannot train on a 4-bit (NF4, ``--quantize nf4``) base, why, in
            words an error message can use: the commands refuse the pair before loading anything. Empty: the
            method works on a 4-bit base (it trains only weights of its own, beside the frozen base).
    """

    name: str
    config_class: type
    apply: Callable
    peft_type: str
    mergeable: bool
    learning_rate: float
    learning_rate_source: str
    why_not_mergeable: str = ""
    order: int = LAST
    save_extra: Callable = None
    load_extra: Callable = None
    why_not_on_4bit: str = ""

    @property
    def module(self) -> str:
        """The module the method lives in (``minipeft.methods.lora``): where its ``apply`` is defined."""
        return self.apply.__module__
