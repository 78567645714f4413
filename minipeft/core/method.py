"""What a PEFT method tells the rest of minipeft about itself: one :class:`Method` record per method.

Each method module (``minipeft/methods/lora.py``, ``ia3.py``, ...) ends with its own record::

    METHOD = Method(name="lora", config_class=LoRAConfig, apply=apply_lora, peft_type="LORA", mergeable=True,
                    learning_rate=1e-3, learning_rate_source="...", order=10)

and :mod:`minipeft.methods` collects the records of every module in its folder into ``METHODS``. So adding a
method is adding one module: nothing else lists the methods. The record holds the objects themselves (the
config class, the apply function), not their names, so a reader can follow them with "go to definition".

Every rule that belongs to one method lives in its record, so generic code (the command line, adapter files,
training) asks the record and names no method: which method is a variant of which (DoRA of LoRA), what cannot
run on a 4-bit base or under FSDP, what ``compare`` runs by default, how a file's missing keys are read.

This module defines only the record; it imports no method (the methods import it).
"""

from dataclasses import dataclass, field
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
        flag_values_not_on_4bit: ``((flag, value, why), ...)``: settings of a method that itself works on a
            4-bit base but, so set, would train the base's own tensors (LoRA's ``("--lora_bias", "all", ...)``).
            The commands refuse ``--quantize nf4`` with any of them, whatever the method, before loading.
        why_not_sharded: for a method ``--sharding fsdp`` cannot run, why (it continues ``--sharding fsdp with
            --modification_type NAME: ``). Empty: FSDP shards it.
        variant_of: the method this one is a variant of, sharing its config class, ``peft_type`` and flags
            (DoRA: ``"lora"``, as peft records DoRA as ``LoraConfig(use_dora=True)``); its module may import that
            method's module. Empty: a method of its own.
        variant_settings: the config values that make a config of the shared class this method
            (DoRA: ``{"use_dora": True}``): the command line sets them, and
            :func:`~minipeft.methods.method_for_config` picks the method whose settings a config matches.
        in_compare_by_default: whether ``python -m minipeft compare`` runs it when ``--methods`` is not given
            (``--methods all`` runs every method).
        compare_settings: ``compare_settings(model) -> {flag dest: value}``: values ``compare`` gives flags the
            user left out, for a method that has no usable default (selective: train the last block). None:
            the config's defaults.
        from_flags: ``from_flags(given, model, tokenizer) -> config``: builds the config from the fields the
            command line gave (``{field: value}``) where that needs the model or tokenizer (prompt tuning's
            init text, selective's layers). None: ``config_class(**given)``.
        file_defaults: ``{field: value}`` that peft assumes for a key its ``adapter_config.json`` lacks, where
            that differs from the config's own default (LoRA: ``lora_alpha`` 8): a file is read as peft reads it.
        whole_number_fields: float fields written as integers when whole, as peft writes them (``lora_alpha``:
            16, not 16.0).
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
    flag_values_not_on_4bit: tuple = ()
    why_not_sharded: str = ""
    variant_of: str = ""
    variant_settings: dict = field(default_factory=dict, hash=False)
    in_compare_by_default: bool = True
    compare_settings: Callable = None
    from_flags: Callable = None
    file_defaults: dict = field(default_factory=dict, hash=False)
    whole_number_fields: tuple = ()

    @property
    def module(self) -> str:
        """The module the method lives in (``minipeft.methods.lora``): where its ``apply`` is defined."""
        return self.apply.__module__
