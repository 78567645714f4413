"""The run's plan, fixed before its first step: how many optimizer steps, the warmup, when to evaluate and
save (:func:`plan_run`), and the lines that spell it out, with what the plan will not do that its numbers
suggest (:func:`plan_lines`)."""

import math

import torch

from minipeft.core.errors import UserError
from minipeft.training.config import TrainingConfig
from minipeft.training.metrics import format_plan_line, micro_batch_size
from minipeft.training.prepare import resolve_precision
from minipeft.training.schedule import warmup_steps_for
from minipeft.training.state import RunPlan


def plan_run(config: TrainingConfig, train_loader, device: torch.device) -> RunPlan:
    """Steps, schedule and precision of the run (``--eval_every`` defaults to five evaluations per run)."""
    k = config.gradient_accumulation_steps
    if len(train_loader) == 0:
        raise UserError("the training set is empty: no batch to train on")
    steps_per_epoch = math.ceil(len(train_loader) / k)  # the last window of an epoch may be short
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio)
    eval_every = config.eval_every or max(1, total_steps // 5)
    return RunPlan(accumulation=k, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   warmup_steps=warmup_steps, eval_every=eval_every, save_every=config.save_every or eval_every,
                   precision=resolve_precision(config.precision, device))


def plan_lines(plan: RunPlan, config: TrainingConfig, train_loader, processes: int, device) -> list:
    """The plan line (the effective batch spelled out, :func:`~minipeft.training.metrics.format_plan_line`),
    then a note for each number of it the run will not reach."""
    records, tokens = micro_batch_size(train_loader)  # per process; the effective batch multiplies them
    lines = [format_plan_line(plan.total_steps, plan.steps_per_epoch, records, plan.accumulation, processes, tokens,
                              config.learning_rate, config.lr_schedule, plan.warmup_steps, plan.precision, device)]
    if plan.accumulation > len(train_loader):  # the plan line's records per step are then not reached
        lines.append(f"note: --gradient_accumulation_steps {plan.accumulation:,} is more than the "
                     f"{len(train_loader):,} micro-batches of an epoch: each optimizer step takes the epoch's "
                     f"{len(train_loader):,}")
    if plan.warmup_steps >= plan.total_steps > 0:  # the peak is never reached: say what the run gets
        peak = config.learning_rate * plan.total_steps / (plan.warmup_steps + 1)
        warmup = (f"--warmup_steps {plan.warmup_steps:,}" if config.warmup_steps is not None else
                  f"the warmup of {plan.warmup_steps:,} step{'s' * (plan.warmup_steps != 1)} (warmup ratio "
                  f"{config.warmup_ratio:g})")
        lines.append(f"note: {warmup} is not shorter than the run's "
                     f"{plan.total_steps:,} steps: the learning rate never reaches its peak "
                     f"{config.learning_rate:g} (it ends at {peak:.3g})")
    return lines
