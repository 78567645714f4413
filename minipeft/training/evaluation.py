"""Evaluation: the loss and perplexity over the validation set, token-weighted on all processes."""

import itertools
import time

import torch
from tqdm import tqdm

from minipeft.training.distributed import DistributedContext
from minipeft.training.loss import causal_lm_loss_sum, perplexity


@torch.no_grad()  # not inference_mode: FSDP2 reuses its all-gather buffers in training, which inference tensors forbid
def evaluate(model, loader, context: DistributedContext, autocast, max_batches: int = None,
             loss_sum=causal_lm_loss_sum) -> tuple:
    """``(loss, perplexity, target_tokens)`` over the validation set: loss = total NLL / total target tokens
    (all processes), perplexity = exp(loss). A progress bar (on a terminal, main process) like training's.
    ``loss_sum``: the reference loss or one equal to it (as in
    :func:`~minipeft.training.gradients.accumulate_gradients`)."""
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=context.device)
    total_targets = torch.zeros((), dtype=torch.int64, device=context.device)
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    n_batches = max_batches if n_batches is None else min(max_batches or n_batches, n_batches)
    batches = tqdm(itertools.islice(loader, max_batches), total=n_batches, desc="eval", unit="batch", leave=False,
                   dynamic_ncols=True, disable=True if not context.is_main else None)
    # FSDP gathers each block's weights inside forward, a collective every process must join, but validation
    # batches are not padded (each record counts once), so a process may have fewer: it then runs forwards on one
    # masked token, which add nothing, until it has run as many as the process with the most.
    most = max(context.all_gather_objects(n_batches or 0)) if context.is_sharded and context.is_distributed else 0
    started, n_tokens = time.perf_counter(), 0
    for batch in batches:
        batch = {key: value.to(context.device) for key, value in batch.items()}
        with autocast:
            nll_sum, n_targets = loss_sum(model, batch)
        total_nll += nll_sum.double()
        total_targets += n_targets
        n_tokens += int(batch["attention_mask"].sum())
        batches.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - started):,.0f}")
    idle = {"input_ids": torch.zeros((1, 1), dtype=torch.long, device=context.device),
            "attention_mask": torch.ones((1, 1), dtype=torch.long, device=context.device),
            "labels": torch.full((1, 1), -100, dtype=torch.long, device=context.device)}
    for _ in range(most - (n_batches or 0)):
        with autocast:
            loss_sum(model, idle)
    model.train(was_training)
    total_nll, total_targets = context.all_reduce_sum([total_nll.item(), total_targets.item()])
    if total_targets == 0:
        return float("nan"), float("nan"), 0
    return total_nll / total_targets, perplexity(total_nll, total_targets), int(total_targets)
