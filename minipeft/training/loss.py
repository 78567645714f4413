"""The causal language-modelling loss: the one place where labels are shifted.

Batches carry ``labels`` aligned with ``input_ids`` (Hugging Face's convention; -100 marks a token that is
not trained on, e.g. the prompt or padding). Position ``t`` predicts token ``t + 1``, so the logits lose
their last position and the labels their first::

    input_ids   [ A   B   C   D ]        logits[:, :-1]  predicts  [ B   C   D ]
    labels      [-100 -100 C  D ]        labels[:, 1:]   =         [-100 C   D ]   -> 2 target tokens

The model is called *without* labels, so that Hugging Face does not shift (a second time) or average.
We return the *sum* of the negative log-likelihoods and the number of target tokens: the training loop
divides by the number of target tokens of the whole accumulation window (all micro-batches, all processes),
which makes ``batch b × accumulation k`` compute the same gradient as one batch of ``b·k``. Averaging
per micro-batch instead weights a token in a short micro-batch more than one in a long micro-batch (the
2024 transformers Trainer bug). Perplexity is ``exp(total NLL / total target tokens)`` over a whole
validation set, for the same reason.

Only the positions that have a target reach the LM head. The head (``hidden → vocab``) is the largest single
matmul of a small model (GPT-2 small: 38.6 M of its 124 M weights, ~31% of the FLOPs), yet the prompt,
the padding and each row's last position carry no label. The model is therefore asked for logits only
where the *shifted* label is not -100, through transformers' own ``logits_to_keep`` argument given as a
boolean ``(B, T')`` mask (``slice_logits_to_keep`` selects ``hidden[mask]`` before ``lm_head``), so it
returns ``(N, V)`` logits for the N target tokens instead of ``(B, T', V)``: the head's FLOPs and the
logits' memory (and their gradient's) shrink by the share of positions without a label. Same numbers as
computing every logit and ignoring -100 (tests/test_performance_equivalence.py checks loss and gradients).
It goes through the model's normal forward, so it works through a PeftModel for every method and through
DistributedDataParallel. Models whose forward has no ``logits_to_keep`` take the plain path.
"""

import inspect
import math

import torch
import torch.nn.functional as F

from minipeft.data.batching import model_inputs

IGNORE_INDEX = -100


def count_target_tokens(batch: dict) -> int:
    """How many tokens of ``batch`` the loss is computed on (after the shift, as in :func:`causal_lm_loss_sum`)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(model, batch: dict):
    """``(nll_sum, n_target_tokens)`` of a causal LM on one batch.

    Args:
        model: a causal LM (a :class:`~minipeft.PeftModel`, a transformers model, or DDP around either)
            whose output has ``.logits``.
        batch: ``input_ids (B, T)``, ``attention_mask (B, T)``, ``labels (B, T)`` unshifted with -100 where no
            loss is taken, optionally ``position_ids (B, T)`` (packing).

    Returns:
        ``nll_sum``: a float32 scalar tensor, the summed cross-entropy over the target tokens;
        ``n_target_tokens``: a long scalar tensor.
    """
    if not accepts_logits_to_keep(model):
        return causal_lm_loss_sum_all_logits(model, batch)
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
    logits = model(**model_inputs(batch), logits_to_keep=keep).logits  # (N, V): hidden[keep] @ W_headᵀ
    nll_sum = F.cross_entropy(logits.float(), targets, reduction="sum")  # softmax in float32
    return nll_sum, torch.tensor(targets.numel(), device=labels.device)


def causal_lm_loss_sum_all_logits(model, batch: dict):
    """The plain path of :func:`causal_lm_loss_sum`: logits at every position, -100 ignored (same result).

    Kept for models without ``logits_to_keep``, and as the reference the equivalence tests compare with.
    """
    labels = batch["labels"]
    logits = model(**model_inputs(batch)).logits  # (B, T', V); T' = T, or P + T when prompt tuning prepends P
    logits = logits[:, -labels.shape[1]:, :]  # (B, T, V): the positions that line up with the labels
    shift_logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1 ...
    shift_labels = labels[:, 1:]  # (B, T-1):    ... which is the label at t+1
    nll_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(),  # softmax in float32
                              shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll_sum, (shift_labels != IGNORE_INDEX).sum()


def unwrap(model):
    """The model inside DistributedDataParallel (``.module``), else ``model``."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def transformers_model(model):
    """The transformers causal LM: a PeftModel's ``base_model``, or the model itself."""
    model = unwrap(model)
    return model.base_model if hasattr(model, "prompt_encoder") else model


def accepts_logits_to_keep(model) -> bool:
    """Whether the transformers model's forward takes ``logits_to_keep`` (GPT-2, Llama and most causal LMs)."""
    return "logits_to_keep" in inspect.signature(transformers_model(model).forward).parameters


def positions_prepended(model) -> int:
    """How many positions the model puts before the real tokens: prompt tuning's ``P``, else 0 (prefix tuning
    puts its virtual tokens in the key/value cache, not in the sequence)."""
    from minipeft.prompt import PromptEmbedding  # imported here: the loss does not otherwise need the methods

    encoder = getattr(unwrap(model), "prompt_encoder", None)
    if isinstance(encoder, PromptEmbedding) and encoder.adapter_enabled:
        return encoder.num_virtual_tokens
    return 0


def perplexity(total_nll: float, total_target_tokens: int) -> float:
    """``exp(total NLL / total target tokens)``; ``inf`` when that overflows (a diverged model)."""
    if total_target_tokens <= 0:
        return float("nan")
    mean_nll = total_nll / total_target_tokens
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")
