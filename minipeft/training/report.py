"""What a finished run reports: ``metrics.json`` (its summary) and the lines ``train_llm.py`` prints at the end.

- :func:`run_summary`: the summary, from the :class:`~minipeft.training.state.TrainResult` and the model;
- :func:`quantization_cost_line`: after a ``--quantize nf4`` run, what quantizing the base cost in eval loss;
- :func:`summary_lines`: the eval loss before -> after (and a hint when it hardly moved), the speeds, and
  where each output went.

``metrics.json`` fields: ``train_loss`` is the last epoch's (or the current partial epoch's) total NLL / total
target tokens; speeds are tokens per second; a number that is not finite is written as null.
"""

import gc
import math
import time
from dataclasses import asdict
from pathlib import Path

from minipeft.loading.streaming import load_base_model
from minipeft.methods import METHODS
from minipeft.training.metrics import directory_size, measure_inference_speed, peak_memory
from minipeft.training.prepare import autocast_for
from minipeft.training.quantization_cost import COMPUTE_DTYPES, float_model_fits, measure_quantization_cost
from minipeft.training.state import RunPlan, TrainResult

# An eval loss that moved less than this (relative) after a run usually means too small a learning rate.
LOW_CHANGE = 0.05


def run_summary(result: TrainResult, peft_model, stats, model_name: str, method: str, inference_batch: dict,
                context, output_dir: Path, started: float) -> dict:
    """``metrics.json``: the run's outcome, losses, steps, speeds, memory and adapter size. ``stats``: the
    model's parameter counts, taken before training (a sharded model holds pieces); ``inference_batch`` gives
    the prompt of the generation speed; ``started``: ``time.perf_counter()`` when the command began."""
    state = result.state
    return {
        "model": model_name,
        "modification_type": method,
        "outcome": result.outcome,
        "trainable_params": stats.trainable,
        "total_params": stats.total,
        "trainable_ratio_percent": stats.ratio,
        # the last epoch's (or the current partial epoch's) loss: total NLL / total target tokens of its steps
        "train_loss": state.epoch_nll / state.epoch_target_tokens if state.epoch_target_tokens else None,
        "eval_loss_before": state.eval_loss_before,
        "eval_perplexity_before": state.eval_perplexity_before,
        "eval_loss": state.eval_loss,
        "eval_perplexity": state.eval_perplexity,
        "best_eval_loss": state.best_eval_loss,
        "best_step": state.best_step,
        "steps": state.step,
        "epochs": state.step / result.plan.steps_per_epoch,
        "train_minutes": state.train_seconds / 60,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "train_tokens": state.tokens_seen,
        "train_tokens_per_s": state.tokens_seen / state.train_seconds if state.train_seconds else None,
        # (a sharded model generates only with every process taking part: not measured)
        "inference_tokens_per_s": None if context.is_sharded else measure_inference_speed(peft_model,
                                                                                          inference_batch),
        **peak_memory(context.device),
        "adapter_size_bytes": directory_size(Path(output_dir) / "adapter"),
        "world_size": context.world_size,
        "device": str(context.device),
        "precision": result.plan.precision,
    }


def plan_record(plan: RunPlan) -> dict:
    """The resolved plan, as ``train_config.json`` records it (the accumulation is already a setting)."""
    return {key: value for key, value in asdict(plan).items() if key != "accumulation"}


def quantization_cost_line(model_name: str, quantize_lm_head: bool, precision: str, val_loader, device,
                           n_parameters: int) -> tuple:
    """``(line, fields for metrics.json)``: the base's eval loss in float and in NF4 on the first validation
    batches (no fields when not measured). Run after training and after the peak memory was read, so the float
    copy it loads is in neither the run nor its figures."""
    if val_loader is None:
        return "Loss change of quantizing the base to NF4: not measured (no validation set)", {}
    gc.collect()
    if not float_model_fits(n_parameters, device):
        return ("Loss change of quantizing the base to NF4: not measured (a float copy of the base does not fit in "
                "the free memory)"), {}
    float_model, _ = load_base_model(model_name, "none", log=lambda message: None)
    cost = measure_quantization_cost(float_model.to(device), val_loader, autocast_for(precision, device), device,
                                     quantize_lm_head, COMPUTE_DTYPES[precision])
    del float_model
    gc.collect()
    return cost.line(), {"eval_loss_float_base": cost.float_loss, "eval_loss_nf4_base": cost.nf4_loss,
                         "quantization_cost_batches": cost.batches}


def summary_lines(summary: dict, result: TrainResult, method: str, learning_rate: float, output_dir: Path,
                  cost_line: str = None, curve: Path = None) -> list:
    """The lines printed after a run: eval loss before -> after, speeds and memory, where everything went."""
    state, output_dir, lines = result.state, Path(output_dir), [""]
    if state.eval_loss is not None and state.eval_loss_before:
        change = (state.eval_loss - state.eval_loss_before) / state.eval_loss_before
        lines.append(f"Eval loss: {state.eval_loss_before:.4f} before training -> {state.eval_loss:.4f} after "
                     f"({change:+.1%}); perplexity {state.eval_perplexity_before:.2f} -> {state.eval_perplexity:.2f}")
        if abs(change) < LOW_CHANGE:
            lines.append(low_change_hint(method, learning_rate))
    speed = summary["inference_tokens_per_s"]  # None: not measured (a sharded model generates only all together)
    lines.append(f"Trained {state.step} step{'s' * (state.step != 1)} in {state.train_seconds:.1f} s "
                 f"({significant(summary['train_tokens_per_s'] or 0)} tokens/s); generation "
                 + ("not measured (sharded)" if speed is None else f"{significant(speed)} tokens/s")
                 + f"; peak memory {summary['peak_memory_mb']:,.0f} MB")
    if cost_line is not None:
        lines.append(cost_line)
    lines.append(f"adapter:      {output_dir / 'adapter'}/ ({summary['adapter_size_bytes']:,} bytes)")
    if state.best_step is not None:
        lines.append(f"best adapter: {output_dir / 'best'}/ (step {state.best_step}, "
                     f"eval loss {state.best_eval_loss:.4f})")
    lines.append(f"checkpoints:  {output_dir / 'checkpoints'}/ (resume with --resume latest)")
    lines.append(f"metrics:      {output_dir / 'metrics.json'}, {output_dir / 'metrics.jsonl'}")
    if curve is not None:
        lines.append(f"loss curve:   {curve}")
    return lines


def low_change_hint(method: str, learning_rate: float) -> str:
    """One line for a run whose eval loss hardly moved: the rate used against the method's default and source."""
    default = METHODS[method]
    if learning_rate < default.learning_rate:
        return (f"hint: the eval loss moved less than {LOW_CHANGE:.0%}; the learning rate may be too low for this "
                f"method: {method} ran at {learning_rate:g}, its default is {default.learning_rate:g} "
                f"({default.learning_rate_source})")
    return (f"hint: the eval loss moved less than {LOW_CHANGE:.0%}; more steps (--max_steps, --epochs) or a higher "
            f"--learning_rate than {learning_rate:g} may help")


def significant(value: float, digits: int = 2) -> str:
    """``value`` with at least ``digits`` significant digits and thousands separators: 0.2134 -> "0.21",
    14.8 -> "15", 578.3 -> "578", 12345.6 -> "12,346" (a speed of 0.2 tokens/s is not "0")."""
    if not value or value != value or value in (float("inf"), float("-inf")):
        return f"{value or 0:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"
