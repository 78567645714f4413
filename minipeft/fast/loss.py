"""The causal-LM loss at the target positions only, the head fused into the cross-entropy: the same numbers
as the reference :func:`minipeft.training.loss.causal_lm_loss_sum`, less time and memory.

**Logits only where there is a target.** The head (``hidden → vocab``) is the largest single matmul of a small
model (GPT-2 small: 38.6 M of its 124 M weights, ~31% of the FLOPs), yet the prompt, the padding and each
row's last position carry no label. The model is therefore asked for logits only where the *shifted* label is
not -100, through transformers' own ``logits_to_keep`` argument given as a boolean ``(B, T')`` mask
(``slice_logits_to_keep`` selects ``hidden[mask]`` before ``lm_head``), so it returns ``(N, V)`` logits for
the N target tokens instead of ``(B, T', V)``: the head's FLOPs and the logits' memory (and their gradient's)
shrink by the share of positions without a label. It goes through the model's normal forward, so it works
through a PeftModel for every method and through DistributedDataParallel. The training run uses it when the
model's forward takes ``logits_to_keep`` as a mask (:func:`accepts_logits_to_keep`), else the reference.

**The ``(N, V)`` logits never held whole** when the head is a plain ``nn.Linear`` (LoRA, DoRA, IA3,
adapters, prefix and prompt tuning leave it so): a forward pre-hook on the head takes its input, the
``(N, d)`` hidden states, and hands the head an empty batch; :func:`linear_cross_entropy_sum` then runs
head + cross-entropy a chunk of rows at a time. SmolLM2 at N = 1,000 targets: the float32 logits, their
log-softmax and its gradient are 3 × 197 MB; chunked, 67 MB at a time. Each chunk's gradient is
``softmax - onehot`` (known in the forward, since the loss is a plain sum), so it is turned into the
hidden states' (and, if the head trains, the weight's) gradient at once, and the backward only scales
it: no second pass over the head. The head's weight is used as the model stores it, and the matmul
runs in what autocast chooses (bf16 under ``--precision bf16``), as ``lm_head`` itself would.

**No padding mask for right-padded batches** (:func:`without_right_padding_mask`): SDPA's ``is_causal``
kernel and its grouped-query path instead of a built ``(B, 1, T, T)`` mask.

Equal to the reference: ``tests/test_fast_loss.py`` (loss and every trainable parameter's gradient, every
method, GPT-2 and Llama, right/left-padded and packed batches).
"""

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from minipeft.core.transformers_api import BOOLEAN_LOGITS_TO_KEEP
from minipeft.core.virtual_tokens import PromptEncoder
from minipeft.data.batching import model_inputs
from minipeft.data.tokenization import IGNORE_INDEX


def target_only_loss_sum(model, batch: dict):
    """``(nll_sum, n_target_tokens)`` of a causal LM on one batch, as :func:`~minipeft.training.loss.causal_lm_loss_sum`
    computes them (the same arguments and results), for a model that :func:`accepts_logits_to_keep`."""
    labels = batch["labels"]
    shift_labels = labels[:, 1:]  # (B, T-1): the label at t+1 is what position t predicts
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): True where a position predicts a target
    keep[:, :-1] = shift_labels != IGNORE_INDEX
    prepended = positions_prepended(model)  # prompt tuning: P virtual tokens before the real ones, no target
    if prepended:
        keep = torch.cat([keep.new_zeros(keep.shape[0], prepended), keep], dim=1)  # (B, P + T)
    targets = shift_labels[keep[:, -labels.shape[1]:][:, :-1]]  # (N,) in the same row-major order as the mask
    # Packed batches go in without their 2-D mask (transformers then builds the block-diagonal one from
    # position_ids), left-padded ones with position_ids: see minipeft.data.batching.model_inputs.
    inputs = without_right_padding_mask(model_inputs(batch))
    head = plain_output_head(model)
    if head is None:
        logits = model(**inputs, logits_to_keep=keep).logits  # (N, V): hidden[keep] @ W_headᵀ
        nll_sum = F.cross_entropy(logits.float(), targets, reduction="sum")  # softmax in float32
    else:
        with head_input_captured(head) as captured:
            model(**inputs, logits_to_keep=keep)  # the head itself sees 0 rows
        nll_sum = linear_cross_entropy_sum(captured["hidden"], head.weight, head.bias, targets)  # (N, d) -> ()
    return nll_sum, torch.tensor(targets.numel(), device=labels.device)


def without_right_padding_mask(inputs: dict) -> dict:
    """``inputs`` without ``attention_mask`` when every row is right-padded (``1 … 1 0 … 0``): the causal mask
    alone then gives every real token the same attention, and so the same loss and gradients.

    Under a causal mask a real token at position ``t`` attends to positions ``≤ t``, which in a right-padded
    row are all real: the padding mask hides nothing from it. The padding positions' own outputs change
    (they now attend to the row), but no loss is taken there and no real token reads them, so they get no
    gradient either. Without a 2-D mask transformers uses SDPA's ``is_causal`` kernel and its grouped-query
    path (SmolLM2: 3 key/value heads for 9 query heads are not copied 3 times, forward and backward), and
    builds no ``(B, 1, T, T)`` mask. Left-padded and packed batches keep what they have.
    """
    mask = inputs.get("attention_mask")
    if mask is None or "position_ids" in inputs or (mask[:, 1:] > mask[:, :-1]).any():
        return inputs  # no mask, or positions given (left padding, packing), or a 0 followed by a 1
    return {name: value for name, value in inputs.items() if name != "attention_mask"}


# Rows of the head's output computed at a time: 2**24 float32 logits = 64 MiB (341 rows of SmolLM2's 49,152).
CHUNK_LOGITS = 2**24


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                             chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """``Σ_i CE(hidden_i W^T + b, target_i)``, a float32 scalar, without holding the ``(N, V)`` logits.

    Args:
        hidden: ``(N, d)`` the head's input at the target positions.
        weight: ``(V, d)`` the head's weight; bias: ``(V,)`` or None.
        targets: ``(N,)`` token ids (none is -100: only target positions reach here).
        chunk_logits: how many logits one chunk of rows may hold.

    The softmax runs in float32 (``logits.float()``), like the reference loss. With grad
    enabled the gradients are formed chunk by chunk in the forward (:class:`LinearCrossEntropy`).
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_logits)
    return _linear_cross_entropy(hidden, weight, bias, targets, chunk_logits, (False, False, False))[0]


def _linear_cross_entropy(hidden, weight, bias, targets, chunk_logits, needs_grad):
    """``(nll_sum, grad_hidden, grad_weight, grad_bias)``: the loss, and its gradients where ``needs_grad``."""
    n_rows = max(1, chunk_logits // weight.shape[0])
    nll_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad[1] else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_grad[2] else None
    for start in range(0, hidden.shape[0], n_rows):
        rows = slice(start, start + n_rows)
        h, t = hidden[rows], targets[rows]  # (n, d), (n,)
        logits = F.linear(h, weight, bias)  # (n, V), in the matmul's dtype (autocast: bf16)
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # softmax in float32, row by row
        target_log_probs = log_probs.gather(1, t[:, None]).squeeze(1)  # (n,)
        nll_sum -= target_log_probs.sum()
        if not any(needs_grad):
            continue
        # d(Σ nll)/d logits = softmax(logits) - onehot(target), (n, V), in the logits' dtype (as autograd would
        # hand it to the head's matmul); the target's p - 1 is formed in float32, then rounded once.
        grad_logits = log_probs.exp_() if logits.dtype == torch.float32 else torch.softmax(logits, dim=-1)
        grad_logits[torch.arange(len(t), device=t.device), t] = (target_log_probs.exp() - 1).to(grad_logits.dtype)
        if needs_grad[2]:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
        if needs_grad[0]:
            grad_hidden[rows] = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)  # (n, V) @ (V, d)
        if needs_grad[1]:
            grad_weight += (grad_logits.T @ h.to(grad_logits.dtype)).float()  # (V, n) @ (n, d) -> (V, d)
    return nll_sum, grad_hidden, grad_weight, grad_bias


class LinearCrossEntropy(torch.autograd.Function):
    """Head + summed cross-entropy whose gradients are computed in the forward, chunk by chunk.

    The loss is ``Σ nll``, so ``∂loss/∂logits = softmax - onehot`` needs nothing from the backward but the
    scalar ``grad_output``: the forward forms ``∂loss/∂hidden = (softmax - onehot) W`` (and ``∂loss/∂W``,
    ``∂loss/∂b`` when they train) and the backward multiplies them by it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_logits):
        needs_grad = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        nll_sum, *gradients = _linear_cross_entropy(hidden, weight, bias, targets, chunk_logits, needs_grad)
        ctx.gradients = gradients
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return nll_sum

    @staticmethod
    def backward(ctx, grad_output):
        grads = [None if g is None else (g * grad_output).to(dtype) for g, dtype in zip(ctx.gradients, ctx.dtypes)]
        ctx.gradients = None
        return (*grads, None, None)


def plain_output_head(model):
    """The model's output head when it is a plain ``nn.Linear`` the chunked loss can stand in for, else None.

    None for a head an adapter wraps (LoRA on ``lm_head``, ``modules_to_save``), and for models that change
    the logits after the head (Gemma 2's soft-capping, Cohere's logit scale): they take the logits path.
    """
    lm = transformers_model(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    config = getattr(lm, "config", None)
    if type(head) is not torch.nn.Linear or getattr(config, "final_logit_softcapping", None) is not None \
            or hasattr(config, "logit_scale"):
        return None
    return head


@contextmanager
def head_input_captured(head: torch.nn.Module):
    """Within the block, ``head`` records its input as ``captured["hidden"]`` and computes on 0 rows of it."""
    captured = {}

    def take_input(module, args):
        (hidden,) = args  # (N, d): hidden[logits_to_keep]
        captured["hidden"] = hidden
        return (hidden[:0],)  # the head returns (0, V) logits: its work is done by linear_cross_entropy_sum

    handle = head.register_forward_pre_hook(take_input)
    try:
        yield captured
    finally:
        handle.remove()


def transformers_model(model):
    """The transformers causal LM: a PeftModel's ``base_model``, or the model itself."""
    model = unwrap(model)
    return model.base_model if hasattr(model, "prompt_encoder") else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (``.module``), else ``model``."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def accepts_logits_to_keep(model) -> bool:
    """Whether the transformers model's forward takes ``logits_to_keep`` (GPT-2, Llama and most causal LMs) as
    a boolean mask (the installed transformers is recent enough: :data:`BOOLEAN_LOGITS_TO_KEEP`)."""
    forward = transformers_model(model).forward
    return BOOLEAN_LOGITS_TO_KEEP and "logits_to_keep" in inspect.signature(forward).parameters


def positions_prepended(model) -> int:
    """How many positions the model puts before the real tokens: prompt tuning's ``P``, else 0 (prefix tuning
    puts its virtual tokens in the key/value cache, not in the sequence): the prompt encoder says
    (:meth:`~minipeft.core.virtual_tokens.PromptEncoder.positions_prepended`)."""
    encoder = getattr(unwrap(model), "prompt_encoder", None)  # a PeftModel's (or MultiAdapterModel's active one)
    return encoder.positions_prepended() if isinstance(encoder, PromptEncoder) else 0
