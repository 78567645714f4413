"""``PeftModel``: a frozen base model plus one PEFT method, with one interface for every method.

>>> model = AutoModelForCausalLM.from_config(GPT2Config())
>>> peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
>>> peft_model.parameter_stats().trainable
294912

Two kinds of method live behind it:

- methods that edit layers in place (LoRA, DoRA, IA3, bottleneck adapters, BitFit, selective freezing):
  the base model's forward already includes them; the layers they put in are
  :class:`~minipeft.core.adapter_layer.AdapterLayer` s, which this class switches off, merges and asks what
  they add, through that contract only;
- prompt-learning methods (prompt tuning, prefix tuning), which keep a ``prompt_encoder`` beside the base
  model (a :class:`~minipeft.core.virtual_tokens.PromptEncoder`) and rewrite the inputs before each forward
  (``prompt_encoder.prepare_inputs(...)``).

What the adapter trains, and what its file holds, is decided once, when it is applied: the parameters the
method left trainable (``adapter_parameter_names``).

A PeftModel is built in one of two ways, both here: :func:`get_peft_model` (a method's config, fresh adapter)
and :func:`load_adapter` (an adapter directory: its config, then its tensors). The files themselves are
:mod:`minipeft.model.adapter_files`, which knows nothing of this class.
"""

import copy
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from minipeft.core.adapter_layer import AdapterLayer, adapter_layers
from minipeft.core.errors import UserError
from minipeft.core.generation import generate
from minipeft.core.inject import ModuleToSave, count_parameters, format_parameter_table, freeze
from minipeft.core.inject import replace_module, wrap_modules_to_save
from minipeft.methods import adapter_kind, method_for_config
from minipeft.model.adapter_files import CONFIG_NAME, load_peft_state_dict, read_adapter
from minipeft.model.adapter_files import save_adapter as write_adapter_files


class PeftModel(nn.Module):
    """A base model with one PEFT method applied (build it with :func:`get_peft_model`).

    Attributes:
        base_model: the transformers model, with adapter layers swapped in where the method puts them.
        prompt_encoder: the prompt/prefix module of prompt-learning methods, else None.
        peft_config: the method's config (a dataclass from the method's module).
        adapter_parameter_names: names, in ``self.named_parameters()``, of what the adapter trains and saves.
    """

    def __init__(self, base_model: nn.Module, peft_config, prompt_encoder: nn.Module = None,
                 in_place_parameter_names=()):
        super().__init__()
        self.base_model = base_model
        self.prompt_encoder = prompt_encoder
        self.peft_config = peft_config
        self.adapter_parameter_names = [name for name, p in self.named_parameters() if p.requires_grad]
        # Base weights the method trains where they are (selective freezing, BitFit, LoRA's bias modes):
        # there is no untouched copy of them to switch back to.
        self.in_place_parameter_names = list(in_place_parameter_names)

    @property
    def config(self):
        """The base model's transformers config."""
        return self.base_model.config

    @property
    def method(self):
        """The :class:`~minipeft.core.method.Method` record of this adapter's method."""
        return method_for_config(self.peft_config)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """Same arguments and outputs as the base model's forward."""
        if self.prompt_encoder is not None and self.prompt_encoder.adapter_enabled:
            inputs = self.prompt_encoder.prepare_inputs(self.base_model, input_ids=input_ids,
                                                        attention_mask=attention_mask, labels=labels, **kwargs)
            return self.base_model(**inputs)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, input_ids, attention_mask=None, **generation_kwargs):
        """Generate with the adapter (our own KV-cached loop, the same for every method; see
        :mod:`minipeft.core.generation`). Returns the new tokens only, ``(batch, new_tokens)``."""
        return generate(self, input_ids, attention_mask=attention_mask, **generation_kwargs)

    @contextmanager
    def disable_adapters(self):
        """``with peft_model.disable_adapters():`` runs the plain base model.

        Switches off every method layer, every ``modules_to_save`` copy and the prompt encoder (each has an
        ``adapter_enabled`` switch; off, it computes what the base model computes).
        """
        layers = adapter_layers(self.base_model)
        if any(layer.merged for layer in layers):
            raise UserError("cannot disable a merged adapter: call unmerge_adapter() first")
        if self.in_place_parameter_names:
            raise UserError(f"cannot disable this adapter: it trains base weights in place "
                            f"({self.in_place_parameter_names[0]}, ...), so no untouched base model is kept")
        switches = layers + [module for module in self.base_model.modules() if isinstance(module, ModuleToSave)]
        if self.prompt_encoder is not None:
            switches.append(self.prompt_encoder)
        previous = [switch.adapter_enabled for switch in switches]
        for switch in switches:
            switch.adapter_enabled = False
        try:
            yield self
        finally:
            for switch, enabled in zip(switches, previous):
                switch.adapter_enabled = enabled

    # -- parameters ---------------------------------------------------------------------------------------
    def parameter_stats(self):
        """Exact ``ParameterStats(trainable, total)``; equals peft's ``get_nb_trainable_parameters()``."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        stats = self.parameter_stats()
        print(f"trainable params: {stats.trainable:,} || all params: {stats.total:,} || "
              f"trainable%: {stats.ratio:.4f}")

    def parameter_table(self, group_layers: bool = True) -> str:
        return format_parameter_table(self, group_layers)

    def adapter_parameters(self) -> dict:
        """``{name: parameter}`` for everything the adapter trains (and its file stores)."""
        parameters = dict(self.named_parameters())
        return {name: parameters[name] for name in self.adapter_parameter_names}

    def set_trainable(self, trainable: bool = True) -> None:
        """Make the adapter trainable again (or not) without touching the frozen base."""
        freeze(self)
        for parameter in self.adapter_parameters().values():
            parameter.requires_grad_(trainable)

    # -- merging ------------------------------------------------------------------------------------------
    def _mergeable_layers(self):
        method = self.method
        if not method.mergeable:
            raise UserError(f"{adapter_kind(method.name)} cannot be merged into the weights "
                            f"({method.why_not_mergeable})")
        return adapter_layers(self.base_model)

    def merge_adapter(self) -> None:
        """Fold the adapter into the base weights in place (LoRA, DoRA, IA3); undo with unmerge_adapter()."""
        for layer in self._mergeable_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self._mergeable_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """A plain transformers model with the adapter merged in, built on a copy (this model is unchanged).

        Trained ``modules_to_save`` copies replace their originals. If the trained copy (or an adapted layer)
        is an output head that was tied to the input embedding, the head is untied and the result's config
        says ``tie_word_embeddings=False``; otherwise tied weights stay tied.
        """
        self._mergeable_layers()  # raises for methods that cannot merge
        model = copy.deepcopy(self.base_model)
        for name, module in list(model.named_modules()):
            if isinstance(module, ModuleToSave):
                replace_module(model, name, module.modules_to_save)
                if module.original_module.weight is model.get_input_embeddings().weight:
                    model.config.tie_word_embeddings = False
            elif isinstance(module, AdapterLayer):
                if module.base_layer.weight is model.get_input_embeddings().weight:
                    # An adapted output head tied to the input embedding: merging into the shared tensor would
                    # change the embedding too, so the head gets its own copy first (and the config says so).
                    module.base_layer.weight = nn.Parameter(module.base_layer.weight.detach().clone())
                    model.config.tie_word_embeddings = False
                module.merge()
                replace_module(model, name, module.base_layer)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    # -- files --------------------------------------------------------------------------------------------
    def save_adapter(self, directory, tensors: dict = None, **metadata) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's layout, docs/peft_format.md);
        ``tensors``: given for a sharded model (see :func:`minipeft.model.adapter_files.save_adapter`)."""
        write_adapter_files(self, directory, tensors, **metadata)

    save_pretrained = save_adapter  # the name peft users know

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory, is_trainable: bool = False) -> "PeftModel":
        """Load an adapter directory (written by minipeft or by peft) onto ``base_model``."""
        return load_adapter(base_model, directory, is_trainable=is_trainable)


def get_peft_model(model: nn.Module, config) -> PeftModel:
    """Freeze ``model`` and apply the method ``config`` describes; returns a :class:`PeftModel`.

    The config is copied (methods fill in defaults such as ``target_modules``), so the caller's object is
    not changed.
    """
    method = method_for_config(config)
    config = copy.deepcopy(config)
    if hasattr(config, "check_model"):  # sizes against the model, before anything is allocated
        config.check_model(model)
    freeze(model)
    base_parameters = {id(parameter) for parameter in model.parameters()}
    prompt_encoder = method.apply(model, config)
    for layer in adapter_layers(model):  # what a method layer adds trains (it is new, so it already does)
        for parameter in layer.adapter_parameters().values():
            parameter.requires_grad_(True)
    if getattr(config, "modules_to_save", None):
        wrap_modules_to_save(model, config.modules_to_save)
    in_place = [f"base_model.{name}" for name, parameter in model.named_parameters()
                if parameter.requires_grad and id(parameter) in base_parameters]
    peft_model = PeftModel(model, config, prompt_encoder, in_place)
    if not peft_model.adapter_parameter_names:
        raise UserError(f"{method.name}: these settings leave no parameter to train")  # (compare has --methods)
    return peft_model


def load_adapter(base_model, directory, is_trainable: bool = False):
    """Apply the adapter saved in ``directory`` to ``base_model``; returns a :class:`PeftModel`.

    With ``is_trainable=True`` the adapter's parameters can be trained further (any method, prompt and
    prefix tuning included); otherwise everything is frozen.

    Raises:
        UserError: for a missing or pickled weights file, or the first tensor whose name or shape does
            not fit this model.
    """
    config, state, source = read_adapter(directory)
    if hasattr(config, "check_model"):  # a field of the file (its "r"), named after the file
        try:
            config.check_model(base_model)
        except UserError as error:
            raise UserError(f"{Path(directory) / CONFIG_NAME}: {error}") from None
    try:
        peft_model = get_peft_model(base_model, config)
    except UserError as error:  # the file's settings, not flags: "target_modules ...", after the file
        raise UserError(f"{Path(directory) / CONFIG_NAME}: {str(error).removeprefix('--')}") from None
    load_peft_state_dict(peft_model, state, source=source)
    peft_model.set_trainable(is_trainable)
    return peft_model
