"""The gradients of one optimizer step: token-exact accumulation over a window, and a check that they reach
every trainable parameter.

One optimizer step takes one *accumulation window*: the next ``k = --gradient_accumulation_steps``
micro-batches (fewer at the end of an epoch). :func:`accumulate_gradients` runs forward and backward over
them so that ``.grad`` holds ``∇ (total NLL / total target tokens)``; :class:`GradientCheck` stops a run
whose adapter silently receives no gradient.
"""

import torch

from minipeft.core.errors import UserError
from minipeft.training.distributed import DistributedContext, gradient_sync
from minipeft.training.loss import causal_lm_loss_sum, count_target_tokens
from minipeft.training.sharding import full_tensor


def accumulate_gradients(model, window: list, context: DistributedContext, autocast, scaler=None,
                         loss_sum=causal_lm_loss_sum) -> tuple:
    """Forward and backward over one accumulation window (a list of micro-batches).

    Each micro-batch's loss is its NLL *sum* divided by the target tokens of the whole window on all
    processes, so the gradients that add up in ``.grad`` are those of ``total NLL / total target tokens``:
    batch b × accumulation k gives the gradient of one batch of b·k, whatever the token counts and however
    short the window. Under DDP the loss is multiplied by the world size, because DDP *averages* gradients.

    ``loss_sum(model, batch) -> (nll_sum, n_targets)``: the reference loss, or a faster one equal to it
    (a training run passes :func:`minipeft.fast.loss.target_only_loss_sum`).

    Returns ``(window NLL, target tokens, input tokens)``, each summed over all processes.
    """
    device = context.device
    # 1) target tokens in the whole window, all processes: the loss's denominator
    (n_targets,) = context.all_reduce_sum([sum(count_target_tokens(batch) for batch in window)])
    loss_scale = context.world_size / max(n_targets, 1)
    # 2) forward and backward one micro-batch at a time; DDP exchanges gradients after the last one only
    window_nll = torch.zeros((), device=device)
    for index, batch in enumerate(window):
        batch = {key: value.to(device) for key, value in batch.items()}
        with gradient_sync(model, sync=index == len(window) - 1):
            with autocast:
                nll_sum, _ = loss_sum(model, batch)
            loss = nll_sum * loss_scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        window_nll += nll_sum.detach()
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in window)
    window_nll, n_tokens = context.all_reduce_sum([window_nll.item(), n_tokens])
    return window_nll, int(n_targets), int(n_tokens)


# LoRA's B (and an adapter's up-projection) starts at zero, so on the first step A's gradient is exactly
# zero; from the second step on every trainable parameter must have had a non-zero gradient.
GRADIENT_CHECK_STEPS = 2


class GradientCheck:
    """After the first steps, every trainable parameter must have received a non-zero gradient.

    Catches what would otherwise train in silence: a parameter the forward never uses (DDP's "unused
    parameters" error, on one process too), or gradient checkpointing that cuts the graph before an adapter.
    """

    def __init__(self, model, gradient_checkpointing: bool):
        self.waiting = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        self.gradient_checkpointing = gradient_checkpointing
        self.steps = 0

    def observe(self, model) -> bool:
        """Look at this step's gradients; True once the check has passed."""
        for name, parameter in model.named_parameters():
            # (a sharded gradient is gathered: one process's piece of it may be all zero, or empty)
            if name in self.waiting and parameter.grad is not None and bool(full_tensor(parameter.grad).ne(0).any()):
                self.waiting.discard(name)
        self.steps += 1
        if self.steps < GRADIENT_CHECK_STEPS:
            return False
        if self.waiting:
            names = sorted(self.waiting)
            cause = ("gradient checkpointing cut them off; run without --gradient_checkpointing"
                     if self.gradient_checkpointing else
                     "the forward pass never uses them; check --target_modules / --modules_to_save")
            raise UserError(f"{len(names)} trainable parameters received no gradient in the first "
                            f"{GRADIENT_CHECK_STEPS} steps ({names[0]}, ...): {cause}")
        return True
