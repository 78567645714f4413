"""BitFit: train only the bias terms (Ben Zaken, Ravfogel & Goldberg 2021, "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models",
https://arxiv.org/abs/2106.10199).

Every weight matrix stays frozen; each bias ``b`` of ``y = W x + b`` (and of every LayerNorm) is trained.
That is about 0.1 % of a model, and the paper finds it competitive with full fine-tuning on small and
medium data sets.

- GPT-2 has biases everywhere; BitFit trains the existing ones, in place. GPT-2 small, per block:
  ``ln_1`` 768 + ``c_attn`` 2,304 + attn ``c_proj`` 768 + ``ln_2`` 768 + ``c_fc`` 3,072 + mlp ``c_proj``
  768 = 8,448; × 12 blocks + ``ln_f`` 768 = **102,144** (0.082 % of 124,439,808).
- Llama-family models (Llama, Mistral, SmolLM2) have *no* biases at all: no Linear bias, RMSNorm has a
  weight only. So that BitFit still means something there, minipeft gives every bias-less projection inside
  the transformer blocks a new bias vector, initialised to zero (so the outputs are unchanged at the start)
  and trained: ``y = W x + b_new`` (:class:`LinearWithAddedBias`). Per block that is the output widths of
  q, k, v, o, gate, up and down; tiny GQA Llama below (hidden 64, kv width 32, MLP 128): 512 per block.
  SmolLM2-135M: 30 × (576 + 192 + 192 + 576 + 1,536 + 1,536 + 576) = 155,520. Models with some biases
  (Qwen2: q, k, v only) get both: their own biases trained, new ones where there are none.
- Count: ``Σ len(b)`` over the trained biases (existing + added).
- ``target_modules`` restricts BitFit to the biases of the named modules (a bias-less ``nn.Linear`` target
  gets an added bias).
- Not mergeable in minipeft's sense: the trained biases *are* base parameters on GPT-2 (save the full model
  to export); only the added Llama biases can be switched off with ``disable_adapters``.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.errors import UserError
from minipeft.core.inject import find_target_modules, layer_index, replace_module
from minipeft.core.layers import layer_features
from minipeft.core.method import Method
from minipeft.core.options import target_modules_option


@dataclass
class BitFitConfig:
    """BitFit settings (peft has no such method; ``peft_type`` is minipeft's own).

    Args:
        target_modules: None trains every bias in the model (adding zero biases to the bias-less
            projections inside the blocks); names, suffixes or one regex (``--target_modules``) restrict
            BitFit to the biases of those modules.
        modules_to_save: modules trained in full beside the biases, e.g. ``["lm_head"]``.
    """

    peft_type: ClassVar[str] = "BITFIT"

    target_modules: object = target_modules_option()
    modules_to_save: object = None

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple)):
            raise UserError(f"{name('target_modules')} must be module names or a regex, got {self.target_modules!r}")


class LinearWithAddedBias(AdapterLayer):
    """A frozen bias-less ``nn.Linear`` plus a trainable bias that starts at zero: ``y = W x + b``.

    Shapes: ``x (..., in) -> (..., out)``; ``bias (out,)``. The saved name is ``<layer>.bias``.
    Not mergeable in minipeft (see the module docstring): :meth:`merge` refuses.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        _, out_features, _ = layer_features(base_layer)
        self.bias = nn.Parameter(torch.zeros(out_features, device=base_layer.weight.device))  # float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if not self.adapter_enabled:
            return result
        return (result + self.bias).to(result.dtype)


def add_bias(model: nn.Module, name: str) -> None:
    replace_module(model, name, LinearWithAddedBias(model.get_submodule(name)))


def apply_bitfit(model: nn.Module, config: BitFitConfig) -> None:
    """Make the biases of ``model`` (or of the target modules) the only trainable parameters (in place).

    Raises:
        UserError: when a target module has no bias and is not a linear layer a bias could be added to.
    """
    config.validate()
    if config.target_modules is None:
        for name, parameter in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                parameter.requires_grad_(True)
        biasless = [name for name, module in model.named_modules()
                    if layer_index(name) is not None and isinstance(module, nn.Linear) and module.bias is None]
        for name in biasless:
            add_bias(model, name)
        return
    for name in find_target_modules(model, config.target_modules):
        module = model.get_submodule(name)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
        elif isinstance(module, (nn.Linear, Conv1D)):
            add_bias(model, name)
        else:
            raise UserError(f"--target_modules: {name} ({type(module).__name__}) has no bias, and BitFit adds "
                            "biases only to nn.Linear layers; target linear layers or norms with a bias")


METHOD = Method(
    name="bitfit", config_class=BitFitConfig, apply=apply_bitfit, peft_type="BITFIT",
    mergeable=False, order=80,
    learning_rate=1e-3, learning_rate_source="Ben Zaken et al. 2021, the top of "
    "their sweep {1e-4, 4e-4, 7e-4, 1e-3}",
    why_not_mergeable="BitFit trains the base biases themselves; save the full model instead",
    why_not_on_4bit="bitfit trains the biases of the base's linear layers, and a 4-bit base is frozen")
