"""The one place that edits models: find target modules, swap in adapter layers, freeze, count.

Every PEFT method goes through these functions, so that "what does this method train?" has one answer:

1. :func:`find_target_modules` turns a user's ``target_modules`` into exact module names.
   A list matches a module whose name *is* an entry or *ends with* ``"." + entry`` (``"c_attn"`` matches
   ``transformer.h.3.attn.c_attn``); a single string is a regular expression that must match the whole
   name. ``layers_to_transform`` keeps only modules inside the listed transformer blocks.
2. :func:`replace_module` puts the new layer where the old one was (``setattr`` on its parent).
3. :func:`freeze` sets ``requires_grad=False`` for real, so frozen weights get no gradient and no
   optimizer state; a method then unfreezes exactly the parameters it trains.
4. :func:`count_parameters` and :func:`parameter_table` report what is trainable. Tied parameters (GPT-2's
   ``lm_head.weight`` *is* ``wte.weight``) are counted once, as ``peft`` and ``model.num_parameters()`` do.

The layers a method puts in are :class:`~minipeft.core.adapter_layer.AdapterLayer` subclasses, which declare
what they add (torchtune's idea, not substring matching); :class:`ModuleToSave` is the one wrapper of this
module's own: a trainable copy of a whole base module, which is not a method layer.
"""

import copy
import re
from dataclasses import dataclass

from torch import nn

from minipeft.core.errors import UserError

# Names of the ModuleList that holds the transformer blocks, in the architectures transformers ships
# (GPT-2: transformer.h, Llama: model.layers, T5/others: block(s), BERT: layer).
LAYER_LIST_NAMES = ("h", "layers", "blocks", "block", "layer")


def module_matches(name: str, target_modules) -> bool:
    """True when the module called ``name`` is selected by ``target_modules`` (see the module docstring)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def layer_index(name: str, layers_pattern=None):
    """The transformer block a module lives in: ``transformer.h.3.attn.c_attn`` -> 3; None outside blocks."""
    list_names = (layers_pattern,) if isinstance(layers_pattern, str) else (layers_pattern or LAYER_LIST_NAMES)
    for list_name in list_names:
        match = re.search(rf"(?:^|\.){re.escape(list_name)}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def find_target_modules(model: nn.Module, target_modules, layers_to_transform=None, layers_pattern=None,
                        flag: str = "target_modules") -> list:
    """Exact names of the modules selected by ``target_modules`` (and ``layers_to_transform``).

    Raises:
        UserError: when nothing matches, naming the targets and showing what module names look like.
    """
    if not target_modules:
        raise UserError(f"{flag}: no target modules given")
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise UserError(f"{flag} {target_modules!r}: not a regular expression ({error})") from None
    names = [name for name, _ in model.named_modules() if name and module_matches(name, target_modules)]
    # A target inside a module we already wrapped (``c_attn.base_layer``) is not a new target.
    names = [name for name in names if not any(name.startswith(other + ".") for other in names)]
    if layers_to_transform is not None:
        names = [name for name in names if layer_index(name, layers_pattern) in set(layers_to_transform)]
    if not names:
        examples = [name for name, module in model.named_modules() if name and not list(module.children())][:4]
        where = f" in layers {list(layers_to_transform)}" if layers_to_transform is not None else ""
        raise UserError(f"{flag} {target_modules!r} matched no module of {type(model).__name__}{where}; "
                        f"module names look like {', '.join(examples)}")
    return names


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put ``new_module`` where the submodule called ``name`` is."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


def freeze(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter: no gradient, no optimizer state."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def unfreeze_biases(model: nn.Module, adapted_names: list, which: str) -> None:
    """peft's ``bias`` setting of LoRA and VeRA: ``"none"`` trains no bias, ``"all"`` every bias in the model,
    ``"lora_only"`` / ``"vera_only"`` the biases of the adapted layers (``adapted_names``, whose base layers
    now sit at ``<name>.base_layer``)."""
    if which == "all":
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.requires_grad_(True)
    elif which.endswith("_only"):
        for name in adapted_names:
            bias = model.get_submodule(name).base_layer.bias
            if bias is not None:
                bias.requires_grad_(True)


class ModuleToSave(nn.Module):
    """A fully trainable copy of a whole module (``modules_to_save``, e.g. ``lm_head``), beside the frozen
    original, which :meth:`PeftModel.disable_adapters` switches back to.

    Tied embeddings: in GPT-2 and SmolLM2 ``lm_head.weight`` is the same tensor as the input embedding.
    The copy is a new tensor, so training it *unties* the output head from the input embedding (the input
    embedding stays frozen). The adapter file stores the copy as ``base_model.model.lm_head.weight``.
    Parameters added: every parameter of the module, again.
    """

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = copy.deepcopy(original_module)
        for parameter in self.modules_to_save.parameters():
            parameter.requires_grad_(True)
        self.adapter_enabled = True

    def forward(self, *args, **kwargs):
        module = self.modules_to_save if self.adapter_enabled else self.original_module
        return module(*args, **kwargs)

    @property
    def weight(self):
        """The weight in use (code that reads ``model.lm_head.weight``, e.g. a chunked loss, sees the copy)."""
        return (self.modules_to_save if self.adapter_enabled else self.original_module).weight


def wrap_modules_to_save(model: nn.Module, modules_to_save) -> list:
    """Replace each module named in ``modules_to_save`` by a :class:`ModuleToSave`; returns the names."""
    names = find_target_modules(model, modules_to_save, flag="modules_to_save")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, ModuleToSave):
            replace_module(model, name, ModuleToSave(module))
    return names


@dataclass
class ParameterStats:
    """Exact parameter counts; ``ratio`` is a percentage (trainable / total · 100)."""

    trainable: int
    total: int

    @property
    def ratio(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"Total parameters: {self.total:,}\n"
                f"Trainable parameters: {self.trainable:,}\n"
                f"Frozen parameters: {self.total - self.trainable:,}\n"
                f"Trainable ratio: {self.ratio:.4f}%")


class QuantizedLinear(nn.Module):
    """What the core knows of a quantized, frozen linear base layer; :class:`minipeft.quantization.nf4.Linear4bit`
    is one. Methods adapt it like an ``nn.Linear``; nothing may merge into it.

    Attributes a subclass sets: ``in_features``, ``out_features``, ``fan_in_fan_out`` (the layout of the layer it
    replaced) and the class attribute ``merge_refusal`` (the error that says what to do instead of merging).
    """

    merge_refusal = "cannot merge into a quantized base layer; dequantize the base first"

    def counted_weights(self) -> int:
        """How many weights it stands for in a parameter count (peft's way of counting packed bytes)."""
        raise NotImplementedError


def count_parameters(model: nn.Module) -> ParameterStats:
    """Total and trainable parameter counts; tied parameters counted once (same as peft's
    ``get_nb_trainable_parameters()``).

    A quantized base layer (:class:`QuantizedLinear`; QLoRA's 4-bit one) holds its frozen weight as packed bytes,
    not as a parameter; it is counted as peft counts it (:meth:`QuantizedLinear.counted_weights`).
    """
    parameters = list(model.parameters())  # ``parameters()`` yields a shared tensor once
    packed = sum(module.counted_weights() for module in model.modules() if isinstance(module, QuantizedLinear))
    return ParameterStats(trainable=sum(p.numel() for p in parameters if p.requires_grad),
                          total=sum(p.numel() for p in parameters) + packed)


def parameter_table(model: nn.Module, group_layers: bool = True) -> list:
    """One row per parameter: ``(name, shape, count, trainable)``.

    With ``group_layers`` the rows of identical parameters in different transformer blocks are merged:
    ``transformer.h.*.attn.c_attn.lora_A.weight`` with a count ``×12`` (rows then hold
    ``(name, shape, count_total, trainable, n_layers)``).
    """
    rows = [(name, tuple(p.shape), p.numel(), p.requires_grad) for name, p in model.named_parameters()]
    if not group_layers:
        return rows
    grouped = {}
    for name, shape, count, trainable in rows:
        key = (re.sub(r"\.(\d+)\.", ".*.", name, count=1), shape, trainable)
        total, layers = grouped.get(key, (0, 0))
        grouped[key] = (total + count, layers + 1)
    return [(name, shape, total, trainable, layers) for (name, shape, trainable), (total, layers) in grouped.items()]


def format_parameter_table(model: nn.Module, group_layers: bool = True) -> str:
    """The trainability table as text (see :func:`parameter_table`)."""
    lines = [f"{'parameter':<58} {'shape':<14} {'count':>13}  trainable"]
    for row in parameter_table(model, group_layers):
        name, shape, count, trainable = row[:4]
        if group_layers and row[4] > 1:
            name = f"{name} (x{row[4]})"
        lines.append(f"{name:<58} {'x'.join(map(str, shape)):<14} {count:>13,}  {'yes' if trainable else 'no'}")
    return "\n".join(lines)
