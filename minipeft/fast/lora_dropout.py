"""LoRA dropout on a CPU, drawn by its gaps and kept as positions: the same dropout, less time and memory.

The reference (:class:`minipeft.methods.lora.LoRALinear`) computes ``s · B A dropout(x)`` with ``nn.Dropout``:
a Bernoulli draw per entry of ``x``, and autograd keeps the masked copy ``dropout(x)`` for ``∂/∂A``. For the
length of a run on a CPU, :func:`dropout_by_gaps` swaps two of each LoRA layer's children, the way adapters
are put in (the parent's attribute is set; no ``forward`` is assigned)::

    reference                                   during a CPU run
    lora_dropout = nn.Dropout(p)        ──►     lora_dropout = nn.Identity()
    lora_A       = nn.Linear(in, r)     ──►     lora_A       = DroppedProjection(the same weight, p)
                                                             = A (x ⊙ mask) / (1 - p)

so ``lora_B(lora_A(lora_dropout(x)))`` computes what the reference does, the ``state_dict`` keys stay
``lora_A.weight``, and the optimizer sees the same Parameter. Two savings:

- **The draw.** The dropped positions of a Bernoulli(p) process are the partial sums of independent
  Geometric(p) gaps (:func:`dropped_positions`): about ``p·n`` random numbers instead of ``n`` (p = 0.05:
  20× fewer; a per-entry draw was 18% of a SmolLM2 bf16 step). On a GPU the per-entry draw is one fused
  kernel and this loop would wait for the device, so nothing is swapped there.
- **The memory.** :class:`DroppedInputProjection` keeps ``x`` (which the model keeps anyway) and the
  positions for the backward, not a masked copy of ``x``: one tensor the size of ``x`` less per adapted
  layer (SmolLM2, 7 projections × 30 blocks at 8 × 256 tokens: ~600 MB).

Equal to the reference: ``tests/test_fast_lora_dropout.py`` (the distribution, the formula, the gradients).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minipeft.fast.swap import Swap, swapped_in
from minipeft.methods.lora import LoRALinear


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """The positions dropout zeroes in a flattened tensor of ``n`` entries, each independently with
    probability ``p``: an increasing ``(k,)`` long tensor, ``k ≈ p·n``.

    Same distribution as ``bernoulli(p)`` per entry: the gaps between consecutive dropped positions are
    independent Geometric(p) on {1, 2, ...} (``P(gap = k) = (1 - p)^(k-1) p``), so

        position_k = gap_1 + ... + gap_k - 1
    """
    chunks, last = [], -1  # last: the last dropped position found so far
    while last < n:  # until the process has passed the end
        expected = (n - last) * p
        gaps = torch.empty(int(expected + 6 * math.sqrt(expected) + 16), dtype=torch.long).geometric_(p)
        positions = last + gaps.cumsum(0)  # (k,) increasing
        chunks.append(positions)
        last = int(positions[-1])
    chunks[-1] = chunks[-1][:int(torch.searchsorted(chunks[-1], n))]  # only the last chunk passes the end
    return torch.cat(chunks)


def zeroed_at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with the entries at ``positions`` of its flattened view set to 0 (differentiable)."""
    return x.reshape(-1).index_fill(0, positions, 0).view(x.shape)


def zero_dropped_entries(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with each entry set to 0 independently with probability ``p`` (dropout's mask, *not* divided by
    ``1 - p``), at :func:`dropped_positions`. Differentiable: the dropped entries get no gradient."""
    return zeroed_at(x, dropped_positions(x.numel(), p))


@torch.compiler.disable  # under --compile: run eagerly (the loop's length depends on its draws), see below
def dropped_input_projection(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``A (x ⊙ mask)`` for a fresh dropout mask of probability ``p``: ``x (..., in)``, ``A (r, in)`` -> ``(..., r)``.

    Under ``torch.compile`` (``--compile``) this runs eagerly, a break in the compiled graph: TorchInductor's
    own per-entry draw on a CPU cost more than that break (SmolLM2 bf16, p = 0.05: 5.0 s a step against 4.4 s).
    """
    return DroppedInputProjection.apply(x, weight, dropped_positions(x.numel(), p))


class DroppedInputProjection(torch.autograd.Function):
    """``A (x ⊙ mask)``, keeping for the backward ``x`` and the dropped positions, not a masked copy of ``x``::

        forward    x (..., in), A (r, in), positions (k,)  ->  (x ⊙ mask) Aᵀ  (..., r)
        backward   ∂/∂x = (g A) ⊙ mask                       (..., in)
                   ∂/∂A = gᵀ (x ⊙ mask)                       (r, in), the masked copy rebuilt

    ``A`` is used in ``x``'s dtype (bf16 under autocast, as ``F.linear`` would cast it); its gradient is
    returned in ``A``'s own (float32).
    """

    @staticmethod
    def forward(ctx, x, weight, positions):
        weight_as_x = weight.to(x.dtype)  # (r, in)
        ctx.save_for_backward(x, weight_as_x, positions)
        ctx.weight_dtype = weight.dtype
        return zeroed_at(x, positions) @ weight_as_x.T  # (..., in) @ (in, r) -> (..., r); the copy is freed here

    @staticmethod
    def backward(ctx, grad):  # grad: (..., r)
        x, weight_as_x, positions = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight_as_x  # (..., r) @ (r, in) -> (..., in)
            grad_x.view(-1).index_fill_(0, positions, 0)  # a dropped entry gets no gradient
        if ctx.needs_input_grad[1]:
            masked = zeroed_at(x, positions).view(-1, x.shape[-1])  # (N, in), rebuilt
            grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ masked).to(ctx.weight_dtype)  # (r, N) @ (N, in)
        return grad_x, grad_weight, None


class DroppedProjection(nn.Module):
    """Stands in for ``lora_A`` during a CPU run: ``A dropout(x)`` in training, ``A x`` in evaluation.

    Holds the *same* ``weight`` Parameter as the ``nn.Linear`` it replaces (its ``state_dict`` key stays
    ``weight``). In training: ``A (x ⊙ mask) / (1 - p)``, dropout's ``1 / (1 - p)`` applied to the r-wide
    result instead of the in-wide input (the same value, ``in / r`` times fewer multiplies).
    """

    def __init__(self, lora_A: nn.Linear, p: float):
        super().__init__()
        self.weight = lora_A.weight  # (r, in), the same Parameter
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., r)
        if not self.training:
            return F.linear(x, self.weight)
        return dropped_input_projection(x, self.weight, self.p) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, p={self.p}"


def dropout_by_gaps(model: nn.Module, warn=None):
    """Within the ``with``: every :class:`LoRALinear` of ``model`` with dropout drops by gaps (module docstring).

    Only LoRA's own layer (not DoRA's, whose dropout also changes its norm term). Yields the number of layers
    swapped. Each layer's two children are put back together (:func:`~minipeft.fast.swap.swapped_in`), never
    raising: ``warn(message)`` (default :func:`~minipeft.fast.swap.warn_at_run_time`) hears of a layer that
    could not be restored, which then keeps computing the same dropout.
    """
    swaps = [Swap(layer, {"lora_A": DroppedProjection(layer.lora_A, layer.lora_dropout.p),
                          "lora_dropout": nn.Identity()},  # the dropout now happens inside lora_A
                  shared=("weight",))  # lora_A's Parameter: the run may give it a new one (a resume)
             for layer in model.modules()
             if type(layer) is LoRALinear and isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p > 0]
    return swapped_in(swaps, warn, what="LoRA's dropout",
                      if_left="the layer keeps dropout by gaps, which draws the same dropout")
