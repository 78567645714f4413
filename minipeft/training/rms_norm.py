"""RMSNorm with a hand-written backward: the same numbers as Llama's, a third of its memory.

Llama-family models (Llama, Mistral, Qwen2, SmolLM2) normalise each hidden vector ``x`` (size ``d``) by its
root mean square, in float32 whatever the model's dtype, then scale it::

    rstd = 1 / sqrt(mean(x²) + ε)          (..., 1)   float32
    x̂    = x · rstd                         (..., d)   float32, then rounded to x's dtype
    y    = w ⊙ x̂                            (..., d)

Written as transformers writes it (``LlamaRMSNorm.forward``), autograd keeps for the backward a float32
copy of ``x``, ``x · rstd`` in float32 and in bf16, and ``rstd``: with a bf16 residual stream that is ~5
bytes per entry kept per norm, where the backward needs only ``x`` itself (2 bytes) and ``rstd``. Two norms a
block, 30 blocks, 8 × 256 tokens × 576 for SmolLM2: ~360 MB of the step's peak memory. :class:`RMSNormFunction`
keeps only those two and derives the gradient by hand (with ``g`` the gradient of ``y``)::

    ∂L/∂w = Σ_rows g ⊙ x̂
    ∂L/∂x = rstd · (ĝ − x̂ · mean(ĝ ⊙ x̂))      where ĝ = g ⊙ w, in float32

:func:`use_memory_lean_rms_norm` swaps it into a model's norms for the length of a training run; the forward
is transformers' own, operation for operation, so the outputs are the same bits
(``tests/test_rms_norm.py``; gradients within float32 rounding).
"""

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

# The norms whose forward is LlamaRMSNorm's exactly (``weight * normalised.to(input_dtype)``, weight not
# offset by 1 as in Gemma): by class name, so that no transformers model module has to be imported here.
LLAMA_STYLE_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


class RMSNormFunction(torch.autograd.Function):
    """``y = w ⊙ (x · rstd)`` (see the module docstring); keeps ``x`` and ``rstd`` for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):  # x (..., d), weight (d,)
        x_float = x.to(torch.float32)
        rstd = torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x_float * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # grad (..., d)
        x, weight, rstd = ctx.saved_tensors
        normalised = x.to(torch.float32) * rstd  # x̂ (..., d), float32
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            rows = grad.reshape(-1, grad.shape[-1]) * normalised.to(x.dtype).reshape(-1, grad.shape[-1])
            grad_weight = rows.sum(0).to(weight.dtype)  # (d,)
        if ctx.needs_input_grad[0]:
            grad_normalised = (grad * weight).to(torch.float32)  # ĝ (..., d), the product in y's dtype as autograd
            mean_term = (grad_normalised * normalised).mean(-1, keepdim=True)  # (..., 1)
            grad_x = (rstd * (grad_normalised - normalised * mean_term)).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm_forward(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """What a swapped norm's ``forward`` runs: :class:`RMSNormFunction` with the norm's weight and ε."""
    return RMSNormFunction.apply(hidden_states, norm.weight, norm.variance_epsilon)


@contextmanager
def use_memory_lean_rms_norm(model: nn.Module):
    """Within the ``with``: every Llama-style RMSNorm of ``model`` runs :class:`RMSNormFunction`."""
    norms = [module for module in model.modules() if type(module).__name__ in LLAMA_STYLE_RMS_NORMS
             and hasattr(module, "variance_epsilon")]
    for norm in norms:
        # An attribute on this instance, in front of the class's forward: ``del`` below brings that back.
        norm.forward = partial(rms_norm_forward, norm)
    try:
        yield len(norms)
    finally:
        for norm in norms:
            del norm.forward
