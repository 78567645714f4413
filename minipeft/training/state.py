"""What a training run carries from step to step.

- :class:`TrainState`: the run's progress (step, epoch, position in the data, best eval loss, ...): what a
  checkpoint stores besides tensors, as JSON;
- :class:`RunPlan`: the run's arithmetic, fixed before the first step (steps, warmup, when to evaluate);
- :class:`TrainingRun`: both, with the model, optimizer and metrics log: what the functions of
  :mod:`minipeft.training.loop` share instead of closures or globals;
- :class:`TrainResult`: what :func:`~minipeft.training.loop.train` returns.
"""

import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from minipeft.core.errors import UserError
from minipeft.training.config import TrainingConfig
from minipeft.training.distributed import DistributedContext
from minipeft.training.gradients import GradientCheck
from minipeft.training.metrics import MetricsLog


@dataclass
class TrainState:
    """Everything about the run's progress that a checkpoint stores besides tensors (saved as JSON)."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0
    batches_done: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0  # non-padding input tokens, all processes
    train_seconds: float = 0.0
    epoch_nll: float = 0.0  # this epoch's summed NLL and target tokens: the reported train loss
    epoch_target_tokens: int = 0
    eval_loss_before: float | None = None
    eval_perplexity_before: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    eval_step: int | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    gradient_check_done: bool = False


# A count in a checkpoint beyond this is not one a run reached (2**53: where a float stops counting exactly).
MAX_COUNT = 2 ** 53


def check_saved_state(values, source: str) -> dict:
    """The ``trainer`` block of a checkpoint's state as :class:`TrainState` takes it, each field checked by its
    annotation: counts are integers in [0, 2**53), sums and losses finite numbers ≥ 0 (a loss that was undefined
    is saved as null, where the field allows None), steps of an evaluation at most ``step``, flags true or false.

    Raises:
        UserError: naming ``source`` and the field (``trainer_state.json: "step" must be ...``): a checkpoint
            edited by hand or damaged is refused before a single value of it is used.
    """
    if not isinstance(values, dict):
        raise UserError(f"{source}: \"trainer\" must be an object of the run's progress, got {values!r:.60}")
    known = {item.name: item for item in fields(TrainState)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{source}: unknown field \"{unknown[0]}\" in \"trainer\" (not a state this version wrote)")
    if "step" not in values:
        raise UserError(f"{source}: \"trainer\" has no \"step\"")
    for name, value in values.items():
        problem = _field_problem(value, known[name].type)
        if problem is None and name in ("eval_step", "best_step") and value is not None \
                and isinstance(values["step"], int) and value > values["step"]:
            problem = f"at most \"step\" ({values['step']})"
        if problem is not None:
            raise UserError(f"{source}: \"{name}\" must be {problem}, got {value!r:.60}")
    return dict(values)


def _field_problem(value, annotation) -> str | None:
    """What ``value`` should be for a field annotated ``annotation``, or None when it is that."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(annotation)) if union else {annotation}
    optional = type(None) in kinds
    if value is None and optional:
        return None
    if bool in kinds:
        return None if isinstance(value, bool) else "true or false"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if int in kinds:
        if not (number and isinstance(value, int) and 0 <= value < MAX_COUNT):
            return f"an integer from 0 to {MAX_COUNT - 1}" + (" or null" if optional else "")
    elif float in kinds:
        if not (number and math.isfinite(value) and 0 <= value < MAX_COUNT):
            return "a finite number ≥ 0" + (" or null" if optional else "")
    return None


@dataclass
class RunPlan:
    """The run's arithmetic, fixed before the first step. Every count is of *optimizer* steps (windows)."""

    accumulation: int  # k = --gradient_accumulation_steps micro-batches per window
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    save_every: int
    precision: str  # fp32, bf16 or fp16 (--precision auto resolved)


@dataclass
class TrainingRun:
    """What the steps of one run share: made by :func:`start_run`, read and updated by the functions below."""

    config: TrainingConfig
    plan: RunPlan
    context: DistributedContext
    model: torch.nn.Module  # the PeftModel: what is saved, checked and evaluated
    ddp_model: torch.nn.Module  # what runs forward and backward: DDP(model) under torchrun, else model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    trainable: list  # the parameters that are clipped
    autocast: object  # the forward pass's autocast context (autocast_for)
    adapter_metadata: dict  # goes into every saved adapter's config
    loss_sum: object  # (model, batch) -> (nll_sum, n_targets): the reference loss or the fast one, equal to it
    state: TrainState = field(default_factory=TrainState)
    metrics: MetricsLog | None = None
    gradient_check: GradientCheck | None = None  # None once passed
    rng_to_restore: tuple | None = None  # a resumed run's random state, restored where its data continues
    interval: dict = field(default_factory=lambda: {"nll": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0,
                                                    "grad_norm": 0.0, "steps": 0})  # sums since the last log line
    outcome: str = "finished"  # or "early_stopped", "interrupted"
    kept_checkpoints: set = field(default_factory=set)  # old checkpoints kept: they hold a user's files

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"


@dataclass
class TrainResult:
    """What :func:`~minipeft.training.loop.train` returns: how the run ended, where it got, and its plan."""

    outcome: str  # "finished", "early_stopped" or "interrupted" (a failed run raises instead)
    signal: int | None  # the signal that interrupted it (SIGINT: Ctrl-C, or SIGTERM), else None
    state: TrainState  # the progress at the end: step, eval losses, best step, tokens seen, ...
    plan: RunPlan  # total_steps, steps_per_epoch, warmup_steps, eval_every, save_every, precision
    last_checkpoint: Path  # checkpoints/step-N of the last step: where --resume latest continues
