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

:func:`use_memory_lean_rms_norm` puts a :class:`LeanRMSNorm` module in place of each of a model's Llama-style
norms for the length of a training run, the way adapters are put in (the parent's attribute is set; no class
or instance of transformers is patched), and puts the originals back afterwards. The forward is transformers'
own, operation for operation, so the outputs are the same bits (``tests/test_fast_rms_norm.py``; gradients within
float32 rounding).

**When transformers changes.** A norm is swapped only if it looks as expected (a 1-D ``weight``, a number
``variance_epsilon``, nothing else) *and* its own forward gives the same bits as :class:`LeanRMSNorm` on a probe
input; any other norm keeps transformers' forward, and the run says so in one line. Putting the norms back
never raises: a run does not end in a traceback because a memory optimisation could not be undone.
"""

import torch
from torch import nn

from minipeft.fast.swap import Swap, swapped_in, warn_at_run_time

# The norms whose forward is LlamaRMSNorm's exactly (``weight * normalised.to(input_dtype)``, weight not
# offset by 1 as in Gemma): by class name, so that no transformers model module has to be imported here.
# Each is still checked against LeanRMSNorm before it is swapped (swap_refusal).
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


class LeanRMSNorm(nn.Module):
    """Stands in for one Llama-style norm during a run: the *same* ``weight`` parameter, the forward through
    :class:`RMSNormFunction`; its ``state_dict`` key is the original's (``weight``)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight  # the same Parameter: optimizer, requires_grad and checkpoints see no change
        self.variance_epsilon = float(norm.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def swap_refusal(norm: nn.Module):
    """Why ``norm`` cannot be swapped (a phrase), or None when it computes exactly what LeanRMSNorm does."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return "it has no 1-D weight"
    if not isinstance(getattr(norm, "variance_epsilon", None), (float, int)):
        return "it has no numeric variance_epsilon"
    if len(list(norm.parameters())) != 1 or list(norm.buffers()) or list(norm.children()):
        return "it holds more than a weight"
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(2, weight.shape[0], generator=generator) * 3).to(weight.device, weight.dtype)
    with torch.no_grad():
        if not torch.equal(norm(probe), LeanRMSNorm(norm)(probe)):
            return "its forward computes something else"
    return None


def use_memory_lean_rms_norm(model: nn.Module, warn=None):
    """Within the ``with``: every Llama-style RMSNorm of ``model`` replaced by a :class:`LeanRMSNorm`
    (:func:`~minipeft.fast.swap.swapped_in`: the very same norms are back afterwards, without raising).

    Yields the number swapped. ``warn(message)`` (default :func:`~minipeft.fast.swap.warn_at_run_time`) hears of
    each kind of norm left as it was, and of anything that could not be put back.
    """
    warn = warn or warn_at_run_time
    swaps, refused = [], {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ not in LLAMA_STYLE_RMS_NORMS:
                continue
            reason = swap_refusal(child)
            if reason is not None:
                refused.setdefault(type(child).__name__, reason)
                continue
            swaps.append(Swap(parent, {name: LeanRMSNorm(child)}, shared=("weight",)))
    for class_name, reason in refused.items():
        warn(f"note: {class_name} keeps transformers' own forward, so the memory-lean RMSNorm is not used "
             f"({reason}); training is unaffected, only its memory is not reduced")
    return swapped_in(swaps, warn, what="an RMSNorm",
                      if_left="the model keeps the memory-lean RMSNorm, which computes the same values")
