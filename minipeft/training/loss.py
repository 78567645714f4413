"""The causal language-modelling loss: the one place where labels are shifted.

Batches carry ``labels`` aligned with ``input_ids`` (Hugging Face's convention; -100 marks a token that is
not trained on, e.g. the prompt or padding). Position ``t`` predicts token ``t + 1``, so the logits lose
their last position and the labels their first::

    input_ids   [ A   B   C   D ]        logits[:, :-1]  predicts  [ B   C   D ]
    labels      [-100 -100 C  D ]        labels[:, 1:]   =         [-100 C   D ]   -> 2 target tokens

    nll_sum = Σ_{t : label[t+1] ≠ -100}  -log softmax(logits[t])[label[t+1]]

The model is called *without* labels, so that Hugging Face does not shift (a second time) or average.
We return the *sum* of the negative log-likelihoods and the number of target tokens: the training loop
divides by the number of target tokens of the whole accumulation window (all micro-batches, all processes),
which makes ``batch b × accumulation k`` compute the same gradient as one batch of ``b·k``. Averaging
per micro-batch instead weights a token in a short micro-batch more than one in a long micro-batch (the
2024 transformers Trainer bug). Perplexity is ``exp(total NLL / total target tokens)`` over a whole
validation set, for the same reason.

This is the reference. A training run computes the same numbers faster, with logits only at the target
positions and the head fused into the cross-entropy: :mod:`minipeft.fast.loss`.
"""

import math

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
    labels = batch["labels"]
    logits = model(**model_inputs(batch)).logits  # (B, T', V); T' = T, or P + T when prompt tuning prepends P
    logits = logits[:, -labels.shape[1]:, :]  # (B, T, V): the positions that line up with the labels
    shift_logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1 ...
    shift_labels = labels[:, 1:]  # (B, T-1):    ... which is the label at t+1
    nll_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(),  # softmax in float32
                              shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll_sum, (shift_labels != IGNORE_INDEX).sum()


def perplexity(total_nll: float, total_target_tokens: int) -> float:
    """``exp(total NLL / total target tokens)``; ``inf`` when that overflows (a diverged model)."""
    if total_target_tokens <= 0:
        return float("nan")
    mean_nll = total_nll / total_target_tokens
    return math.exp(mean_nll) if mean_nll < 700 else float("inf")
