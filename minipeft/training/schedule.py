"""The learning-rate schedule, written out by hand (as nanoGPT's ``get_lr``).

Steps are *optimizer* steps (one per accumulation window), counted from 0. The lr is set on the optimizer
before every step, so the schedule has no state of its own: a resumed run only needs the step number.

With ``w = warmup_steps``, ``T = total_steps`` and ``progress = (step - w) / (T - w)`` (0 -> 1 after warmup)::

    step       0 ........ w ........................ T
    warmup     lr/(w+1) ↗ lr        (every schedule)
    constant              lr ─────────────────────── lr
    linear                lr ╲______________________ min_lr      straight line
    cosine                lr ‾‾‾‾‾‾╲╲╲______________ min_lr      ½(1 + cos π·progress): flat at both ends

- warmup (every schedule): ``lr · (step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``; it never
  gives 0, so the first step already trains (and the gradient check after it has something to check);
- ``constant``: ``lr`` after warmup;
- ``linear``: from ``lr`` down to ``min_lr`` along ``progress = (step - warmup) / (total - warmup)``;
- ``cosine``: ``min_lr + ½ (1 + cos(π · progress)) · (lr - min_lr)`` (Loshchilov & Hutter 2016, SGDR,
  https://arxiv.org/abs/1608.03983, without restarts).
"""

import math

from minipeft.core.errors import UserError

SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps_for(total_steps: int, warmup_steps: int = None, warmup_ratio: float = None) -> int:
    """Warmup length in optimizer steps, from ``--warmup_steps`` or ``--warmup_ratio`` (not both)."""
    if warmup_steps is not None and warmup_ratio is not None:
        raise UserError("--warmup_steps and --warmup_ratio: give one of them, not both")
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise UserError(f"--warmup_steps {warmup_steps}: must be 0 or more")
        return warmup_steps
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"--warmup_ratio {warmup_ratio}: must be in [0, 1)")
        return math.ceil(warmup_ratio * total_steps)
    return 0


def get_lr(step: int, *, schedule: str, learning_rate: float, total_steps: int, warmup_steps: int = 0,
           min_lr: float = 0.0) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a run of ``total_steps`` steps."""
    if schedule not in SCHEDULES:
        raise UserError(f"--lr_schedule {schedule}: choose one of {', '.join(SCHEDULES)}")
    # 1) linear warmup
    if step < warmup_steps:
        return learning_rate * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return learning_rate
    # 2) decay from learning_rate to min_lr over the steps after warmup
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)  # past total_steps: stay at min_lr
    if schedule == "linear":
        coefficient = 1.0 - progress
    else:
        coefficient = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coefficient * (learning_rate - min_lr)
