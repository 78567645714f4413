"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

DoRA splits every adapted weight into a *direction* and a *magnitude* and learns them separately: the
direction with an ordinary LoRA update, the magnitude with one number per output feature::

        W' = m · (W + s·B A) / ‖W + s·B A‖_c          (paper, eq. 5)

- ``W`` is the frozen weight seen as ``(out, in)``; ``‖·‖_c`` is the L2 norm of each output row, taken over
  the input dimension (the paper calls it the column norm of ``W`` stored ``(in, out)``; we follow peft and
  compute it on the ``(out, in)`` view, for ``nn.Linear`` and GPT-2 ``Conv1D`` alike). Shape ``(out,)``.
- ``m`` (``lora_magnitude_vector``, shape ``(out,)``) starts at ``‖W + s·B A‖_c``. With B = 0 that is
  ``‖W‖_c``, so ``W' = W`` and a fresh adapter leaves the outputs unchanged.
- The norm is treated as a constant in the backward pass (section 4.3 of the paper: "we suggest treating
  ‖V + ΔV‖_c as a constant, thereby detaching it from the gradient graph"), exactly as peft does; it still
  follows ΔV in the forward pass. This saves memory and barely changes accuracy.
- The bias (GPT-2 has one) is not rescaled: ``y = W' x + b``.
- Parameters added per target layer: ``r · (in + out) + out`` (LoRA's count plus the magnitude vector).
  GPT-2 small, r=8 on ``c_attn`` (768 -> 2304): 8 · (768 + 2304) + 2304 = 26,880 per block, × 12 = 322,560.

Select it as peft does, with ``LoRAConfig(use_dora=True)`` (``--modification_type dora``): :func:`apply_dora`
then runs LoRA's :func:`apply_lora` with :class:`DoRALinear` layers instead of :class:`LoRALinear`. Saved tensors are LoRA's plus
``...lora_magnitude_vector`` ``[out_features]``, with no ``.weight``: that is what peft 0.21 writes to disk
(in memory peft keeps it as ``lora_magnitude_vector.default.weight`` and strips the suffix when saving), so
files cross over in both directions.
"""

import torch
from torch import nn

from minipeft.core.errors import UserError
from minipeft.core.method import Method
from minipeft.methods.lora import METHOD as LORA
from minipeft.methods.lora import LoRAConfig, LoRALinear, apply_lora


class DoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose adapted weight is renormalised row by row to a learned magnitude.

    Forward, without materialising ``W'`` (``x (..., in) -> (..., out)``)::

        scale = m / ‖W + s·B A‖_c                                   # (out,), detached norm
        y     = scale · (W x + s · B A x) + b
              = base(x) + (scale - 1) · W x + scale · s · B A x      # what the code computes

    With LoRA dropout active in training, the LoRA branch and the ``W x`` term both see ``dropout(x)``
    (as in peft), while ``base(x)`` sees ``x``.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool = True):
        super().__init__(base_layer, r, alpha, dropout, use_rslora, init_lora_weights)
        # m, shape (out,), starts at ‖W + s·B A‖_c. A plain parameter, so the file key is peft's on-disk name.
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    def base_weight_out_in(self) -> torch.Tensor:
        """The frozen weight as ``(out, in)`` in float32 (``Conv1D`` stores it ``(in, out)``)."""
        weight = self.base_layer.weight.float()
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·B A‖_c``: L2 norm of each output row, shape ``(out,)``; no gradient flows through it."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)
        return torch.linalg.norm(self.base_weight_out_in() + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # W x + b, (..., out)
        if self.merged or not self.adapter_enabled:
            return result
        lora_input = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_output = result.to(lora_input.dtype)  # reuse W x + b
        else:
            base_output = self.base_layer(lora_input.to(x.dtype)).to(lora_input.dtype)  # W·dropout(x) + b
        bias = self.base_layer.bias
        weight_times_input = base_output - bias if bias is not None else base_output  # W x, (..., out)
        scale = self.lora_magnitude_vector / self.weight_norm()  # (out,), broadcasts over (..., out)
        lora_output = self.lora_B(self.lora_A(lora_input)) * self.scaling  # (..., out)
        update = (scale - 1) * weight_times_input + scale * lora_output
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W' = m · (W + ΔW) / ‖W + ΔW‖_c`` in float32, in the base layer's layout (:meth:`merge` writes it)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        direction = self.base_weight_out_in() + delta  # (out, in)
        norm = torch.linalg.norm(direction, dim=1, keepdim=True)  # (out, 1)
        merged = self.lora_magnitude_vector.view(-1, 1) / norm * direction  # (out, in)
        return merged.T if self.fan_in_fan_out else merged


def apply_dora(model: nn.Module, config: LoRAConfig) -> None:
    """Apply LoRA with :class:`DoRALinear` layers (``config.use_dora`` is True, as peft records DoRA)."""
    if not config.use_dora:
        raise UserError("DoRA needs LoRAConfig(use_dora=True); with use_dora=False this is plain LoRA")
    apply_lora(model, config, layer_class=DoRALinear)


METHOD = Method(
    name="dora", config_class=LoRAConfig, apply=apply_dora, peft_type="LORA", mergeable=True, order=20,
    learning_rate=1e-3, learning_rate_source="as LoRA (DoRA trains the same matrices plus a magnitude)",
    variant_of="lora", variant_settings={"use_dora": True},  # LoRAConfig(use_dora=True), as peft records DoRA
    file_defaults=LORA.file_defaults, whole_number_fields=LORA.whole_number_fields,
    flag_values_not_on_4bit=LORA.flag_values_not_on_4bit)
