"""What a training run carries from step to step.

- :class:`TrainState`: the run's progress (step, epoch, position in the data, best eval loss, ...): what a
  checkpoint stores besides tensors, as JSON;
- :class:`RunPlan`: the run's arithmetic, fixed before the first step (steps, warmup, when to evaluate);
- :class:`TrainingRun`: both, with the model, optimizer and metrics log: what the functions of
  :mod:`minipeft.training.loop` share instead of closures or globals;
- :class:`TrainResult`: what :func:`~minipeft.training.loop.train` returns.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

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
