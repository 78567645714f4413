"""A model's layers as every method sees them: the transformer blocks, block specs such as ``"0-5,-1"``,
norms, and the shape of a linear layer (``nn.Linear``, GPT-2's ``Conv1D`` or a :class:`QuantizedLinear`)."""

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from minipeft.core.errors import UserError
from minipeft.core.inject import LAYER_LIST_NAMES, QuantizedLinear

# The linear layers a method such as LoRA, IA3 or VeRA can adapt: dense, GPT-2's transposed Conv1D, quantized.
LINEAR_LAYERS = (nn.Linear, Conv1D, QuantizedLinear)


def layer_features(layer: nn.Module):
    """``(in_features, out_features, fan_in_fan_out)`` of an ``nn.Linear``, a GPT-2 ``Conv1D`` or a quantized layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape  # Conv1D keeps its weight as (in, out)
        return in_features, out_features, True
    if isinstance(layer, QuantizedLinear):  # a 4-bit base (QLoRA) keeps the layout of the layer it replaced
        return layer.in_features, layer.out_features, layer.fan_in_fan_out
    raise TypeError(type(layer).__name__)


def default_target_modules(model: nn.Module, defaults: dict) -> list:
    """The layers a method adapts when the user names none: ``defaults[model_type]`` (each method has its table)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise UserError(f"--target_modules: no default targets for model type {model_type!r}; "
                        "name the layers to adapt, e.g. --target_modules q_proj,v_proj")
    return list(defaults[model_type])


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of transformer blocks (GPT-2 ``transformer.h``, Llama ``model.layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in LAYER_LIST_NAMES:
            return module
    raise UserError(f"--freeze_layers: cannot find the transformer blocks of {type(model).__name__} "
                    f"(looked for a ModuleList called {', '.join(LAYER_LIST_NAMES)})")


def num_hidden_layers(model: nn.Module) -> int:
    """How many transformer blocks ``model`` has (GPT-2 ``n_layer``, Llama ``num_hidden_layers``)."""
    return len(transformer_blocks(model))


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm (torch's, or a model's own such as ``LlamaRMSNorm``)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def resolve_layer_indices(indices, num_layers: int, flag: str) -> list:
    """Sorted unique non-negative block indices; ``-1`` means ``num_layers - 1``.

    Raises:
        UserError: naming ``flag`` for an index outside ``-num_layers .. num_layers - 1``.
    """
    resolved = set()
    for index in indices:
        if not -num_layers <= index < num_layers:
            raise UserError(f"{flag}: layer {index} is out of range; this model has {num_layers} layers "
                            f"(0..{num_layers - 1}, or -{num_layers}..-1 counted from the top)")
        resolved.add(index % num_layers)
    return sorted(resolved)


def parse_layer_spec(spec: str, num_layers: int, flag: str) -> list:
    """Parse ``"0,1,2,3"``, ``"0-5"`` (inclusive) or ``"-1,-2"`` into sorted unique block indices.

    >>> parse_layer_spec("0-2,-1", 12, "--freeze_layers")
    [0, 1, 2, 11]
    """
    indices = []
    for item in (part.strip() for part in spec.split(",")):
        if re.fullmatch(r"-?\d+", item):
            indices.append(int(item))
        elif re.fullmatch(r"\d+-\d+", item):
            first, last = (int(value) for value in item.split("-"))
            if first > last:
                raise UserError(f"{flag}: range {item!r} runs backwards; write it as {last}-{first}")
            # past the last layer the first index out of range is enough (0-99999999999999999999 overflowed range())
            indices.extend(range(first, min(last, max(first, num_layers)) + 1))
        else:
            raise UserError(f"{flag}: {item!r} is not a layer index or range; use e.g. 0,1,2 or 0-5 or -1,-2")
    return resolve_layer_indices(indices, num_layers, flag)
