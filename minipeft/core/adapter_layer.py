"""What a method's layer promises the rest of minipeft: the :class:`AdapterLayer` contract.

A *method layer* takes the place of one frozen layer of the model (a projection, usually) and adds the
method's small trainable part around it::

    before:  block.attn.c_attn = Conv1D(768 -> 2304)
    after:   block.attn.c_attn = LoRALinear(base_layer=Conv1D(768 -> 2304), lora_A, lora_B)
                                 └─ an AdapterLayer: the frozen layer inside, the method's parameters beside it

Everything that is not a method asks the layer, never guesses by attribute names (torchtune's
``AdapterModule.adapter_params()``, peft's ``BaseTunerLayer`` play the same part):

- :class:`~minipeft.PeftModel`, the optimizer, bf16 storage and multi-adapter serving find the method's
  layers by ``isinstance(module, AdapterLayer)`` (:func:`adapter_layers`);
- ``disable_adapters`` sets :attr:`adapter_enabled` to False: the layer then computes exactly what its
  ``base_layer`` computes;
- :func:`~minipeft.get_peft_model` (what trains), the optimizer's weight-decay rule and bf16 storage of the
  frozen weights ask :meth:`adapter_parameters`: what the method *added*, as opposed to the frozen base
  layer inside;
- ``merge_adapter`` and export call :meth:`merge` / :meth:`unmerge`; a layer whose update is no change of a
  weight (a bottleneck adapter, an added bias) says ``mergeable = False`` and refuses with an error.

The contract, for a subclass:

- call ``super().__init__(base_layer)`` first, then add its parameters: every parameter outside
  ``base_layer`` is the method's and trains (:func:`~minipeft.get_peft_model` makes it so). A tensor the
  layer uses but never trains (VeRA's frozen random projections) is a buffer, not a parameter;
- in ``forward``, return ``self.base_layer(x)`` unchanged when ``not self.adapter_enabled or self.merged``;
- if its update folds into the base weight: set the class attribute ``mergeable = True`` and write
  :meth:`merged_weight`, the weight ``W'`` that computes base + update (LoRA: ``W + s·B A``). :meth:`merge`
  keeps a copy of ``W`` and writes ``W'`` in its place; :meth:`unmerge` copies ``W`` back, exactly (never
  ``W' - ΔW``, which rounding would not return to ``W``). A layer that changes more than the weight (IA3
  also scales the bias) extends both.

Prompt-learning methods (prompt and prefix tuning) put no layer into the model; their module sits beside
it and has a contract of its own, :class:`~minipeft.core.virtual_tokens.PromptEncoder`.
"""

from typing import ClassVar

import torch
from torch import nn

from minipeft.core.errors import UserError
from minipeft.core.inject import QuantizedLinear


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus a method's trainable part (see the module docstring).

    Attributes:
        base_layer: the layer this one replaced; its weights stay frozen (and are shared, not copied).
        adapter_enabled: True runs the method; False makes the layer compute exactly ``base_layer(x)``.
        merged: True while the update is folded into ``base_layer``'s weight (then the branch is skipped).
        mergeable: class attribute: whether :meth:`merge` can fold the update into the base weight.
    """

    mergeable: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_enabled = True
        self.merged = False

    def adapter_parameters(self) -> dict:
        """``{name: parameter}`` of what the method added: every parameter outside ``base_layer``.

        Names are relative to this layer (``lora_A.weight``, ``lora_magnitude_vector``, ``adapter.up.bias``).
        """
        return {name: parameter for name, parameter in self.named_parameters()
                if not name.startswith("base_layer.")}

    def merged_weight(self) -> torch.Tensor:
        """``W'``, float32, in ``base_layer.weight``'s own layout (``(in, out)`` for GPT-2's Conv1D): the
        weight with which ``base_layer`` alone computes what this layer computes. Mergeable layers write it."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base_layer``'s weight (``W <- W'``, computed in float32); the method's branch is
        skipped until :meth:`unmerge`. A layer that is not ``mergeable`` refuses."""
        if not self.mergeable:
            raise UserError(f"{type(self).__name__}: this method's update cannot be merged into the base weights")
        if self.merged:
            return
        if isinstance(self.base_layer, QuantizedLinear):  # its weight is a dequantized copy: ΔW would be lost
            raise UserError(self.base_layer.merge_refusal)
        weight = self.base_layer.weight
        self.weight_before_merge = weight.detach().clone()
        weight.copy_(self.merged_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge weight; a layer that is not ``mergeable`` was never merged."""
        if not self.mergeable:
            raise UserError(f"{type(self).__name__}: this method's update cannot be merged into the base weights")
        if not self.merged:
            return
        self.base_layer.weight.copy_(self.weight_before_merge)
        del self.weight_before_merge
        self.merged = False


def adapter_layers(model: nn.Module) -> list:
    """Every method layer in ``model``, in module order."""
    return [module for module in model.modules() if isinstance(module, AdapterLayer)]
