"""The training loop, top to bottom (read it like nanoGPT's ``train.py``).

One optimizer step takes one *accumulation window*: the next ``k = --gradient_accumulation_steps``
micro-batches (fewer at the end of an epoch)::

    N = target tokens in the window, summed over all processes
    for each micro-batch:  loss = NLL sum / N  (× world size, since DDP averages);  backward
    → the window's gradient is ∇ (total NLL / N): batch b × k equals one batch of b·k, short windows too
    grad norm (logged before clipping), clip to --max_grad_norm
    loss not finite? skip the step (stop after --max_nonfinite_steps in a row)
    lr = get_lr(step); AdamW step; zero the gradients
    log; evaluate every --eval_every steps; checkpoint every --save_every steps

Output directory (``--output_dir``)::

    adapter/                 the final adapter (adapter_config.json + adapter_model.safetensors)
    best/                    the adapter with the lowest eval loss so far
    checkpoints/step-N/      resumable training state (see :mod:`minipeft.training.checkpoint`); last K + best
    metrics.jsonl            one record per step and per evaluation (see :mod:`minipeft.training.metrics`)
    metrics.json             the run's summary (written by :mod:`minipeft.cli.train`)
    train_config.json        every setting of the run
    loss_curve.png           train and eval loss (with the ``plot`` extra)
    .minipeft                marker: minipeft wrote this folder (each folder it writes has one; see
                             :mod:`minipeft.core.safe_files`); .minipeft.lock while a run writes here

Only rank 0 writes files and prints; every process runs the same steps.
"""

import itertools
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minipeft.model.adapter_files import peft_state_dict
from minipeft.core.errors import UserError
from minipeft.core.finite import first_nonfinite_tensor
from minipeft.core.safe_files import (is_empty_directory, is_ours, make_directory, mark_as_ours, remove_incomplete,
                                 remove_our_directory)
from minipeft.training.checkpoint import (capture_rng_state, list_checkpoints, load_checkpoint, prune_checkpoints,
                                          resolve_resume, restore_rng_state, save_checkpoint)
from minipeft.training.config import TrainingConfig
from minipeft.training.distributed import DistributedContext, gradient_sync, wrap_for_data_parallel
from minipeft.training.loss import causal_lm_loss_sum, count_target_tokens, perplexity
from minipeft.training.metrics import (MetricsLog, format_eval_line, format_log_line, format_plan_line,
                                       micro_batch_size)
from minipeft.training.optimizer import build_optimizer
from minipeft.training.precision import cast_frozen_weights, native_bf16
from minipeft.training.schedule import get_lr, warmup_steps_for
from minipeft.core.transformers_api import enable_activation_checkpointing

# LoRA's B (and an adapter's up-projection) starts at zero, so on the first step A's gradient is exactly
# zero; from the second step on every trainable parameter must have had a non-zero gradient.
GRADIENT_CHECK_STEPS = 2


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision auto``: bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with
    AMX or AVX512_BF16; see :mod:`minipeft.training.precision`), else fp32; fp16 only on CUDA (it needs a
    grad scaler)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"--precision fp16 needs a CUDA GPU (fp16 gradients need a grad scaler); on {device.type} "
                        "use --precision bf16 or fp32")
    return precision


def autocast_for(precision: str, device: torch.device):
    """The forward pass's autocast context: matmuls run in bf16/fp16; trainable weights stay float32 (the
    frozen ones are stored in bf16 by :func:`~minipeft.training.precision.cast_frozen_weights`)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def enable_gradient_checkpointing(peft_model) -> None:
    """Recompute each block's activations during backward instead of keeping them.

    Non-reentrant checkpointing (``use_reentrant=False``): the reentrant variant only backpropagates into a
    block when its *input* requires grad, which with a frozen embedding it does not, so LoRA's B would
    silently stay zero. The loop's gradient check would catch that.
    """
    base_model = peft_model.base_model
    if not getattr(base_model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient_checkpointing: {type(base_model).__name__} does not support it")
    enable_activation_checkpointing(base_model, use_reentrant=False)
    base_model.config.use_cache = False


# What :func:`train` writes into --output_dir (a new run there would replace these); train_llm.py adds its own.
RUN_OUTPUTS = ("adapter", "best", "checkpoints", "metrics.jsonl")


def check_output_dir(config: TrainingConfig, outputs: tuple = RUN_OUTPUTS) -> None:
    """A new run does not silently replace an earlier run's ``outputs``, and never files minipeft did not write."""
    output_dir = Path(config.output_dir)
    if (output_dir.exists() or output_dir.is_symlink()) and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: is a file, expected a directory")
    found = [name for name in outputs if (output_dir / name).exists()]
    if config.resume or not found:
        return
    if not config.overwrite_output_dir:
        if list_checkpoints(output_dir / "checkpoints"):
            raise UserError(f"--output_dir {output_dir}: holds checkpoints of an earlier run; pass --resume latest "
                            "to continue it, --overwrite_output_dir to start over, or another --output_dir")
        raise UserError(f"--output_dir {output_dir}: holds an earlier run's outputs ({', '.join(found)}) and no "
                        "checkpoint to resume; pass --overwrite_output_dir to replace them, or another --output_dir")
    if not is_ours(output_dir):
        raise UserError(f"--output_dir {output_dir}: holds {', '.join(found)}, not written by minipeft (no .minipeft "
                        "marker); refusing to replace them: choose another --output_dir")


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir``; mark it as minipeft's when it is new or empty (a user's folder stays unmarked)."""
    output_dir = Path(output_dir)
    new = not output_dir.exists() or is_empty_directory(output_dir)
    make_directory(output_dir)
    if new:
        mark_as_ours(output_dir)


def divergence_message(what: str, steps: int, precision: str, checkpoints: list) -> str:
    """The one line for a run stopped by non-finite steps: what was not finite, what to try, where to go back.

    Every checkpoint holds finite weights (the loop saves no other), so the newest one is a good one.
    """
    remedies = "lower --learning_rate" + (" or use --precision fp32" if precision != "fp32" else "")
    where = (f"the last good checkpoint (finite weights) is {checkpoints[-1]}" if checkpoints
             else "no checkpoint was saved before it")
    note = ", while the loss was finite" if what == "gradient norm" else ""
    return (f"training diverged: the {what} was not finite for {steps} steps in a row{note} "
            f"(--max_nonfinite_steps); {remedies}; {where}")


def set_epoch(loader, epoch: int) -> None:
    """Tell the loader's sampler which epoch it is (its shuffle order is a function of seed and epoch)."""
    for owner in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, return. A second Ctrl-C
    interrupts at once (``KeyboardInterrupt``)."""

    def __init__(self):
        self.requested = False
        self.signal_number = None  # which signal asked: the exit status is 128 + it (130 Ctrl-C, 143 SIGTERM)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_number = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                   "(Ctrl-C again to stop at once)")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        for number in previous:
            signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


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
            if name in self.waiting and parameter.grad is not None and bool(parameter.grad.ne(0).any()):
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


def accumulate_gradients(model, window: list, context: DistributedContext, autocast, scaler=None) -> tuple:
    """Forward and backward over one accumulation window (a list of micro-batches).

    Each micro-batch's loss is its NLL *sum* divided by the target tokens of the whole window on all
    processes, so the gradients that add up in ``.grad`` are those of ``total NLL / total target tokens``:
    batch b × accumulation k gives the gradient of one batch of b·k, whatever the token counts and however
    short the window. Under DDP the loss is multiplied by the world size, because DDP *averages* gradients.

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
                nll_sum, _ = causal_lm_loss_sum(model, batch)
            loss = nll_sum * loss_scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        window_nll += nll_sum.detach()
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in window)
    window_nll, n_tokens = context.all_reduce_sum([window_nll.item(), n_tokens])
    return window_nll, int(n_targets), int(n_tokens)


@torch.inference_mode()
def evaluate(model, loader, context: DistributedContext, autocast, max_batches: int = None) -> tuple:
    """``(loss, perplexity, target_tokens)`` over the validation set: loss = total NLL / total target tokens
    (all processes), perplexity = exp(loss). A progress bar (on a terminal, main process) like training's."""
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=context.device)
    total_targets = torch.zeros((), dtype=torch.int64, device=context.device)
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    n_batches = max_batches if n_batches is None else min(max_batches or n_batches, n_batches)
    batches = tqdm(itertools.islice(loader, max_batches), total=n_batches, desc="eval", unit="batch", leave=False,
                   dynamic_ncols=True, disable=True if not context.is_main else None)
    started, n_tokens = time.perf_counter(), 0
    for batch in batches:
        batch = {key: value.to(context.device) for key, value in batch.items()}
        with autocast:
            nll_sum, n_targets = causal_lm_loss_sum(model, batch)
        total_nll += nll_sum.double()
        total_targets += n_targets
        n_tokens += int(batch["attention_mask"].sum())
        batches.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - started):,.0f}")
    model.train(was_training)
    total_nll, total_targets = context.all_reduce_sum([total_nll.item(), total_targets.item()])
    if total_targets == 0:
        return float("nan"), float("nan"), 0
    return total_nll / total_targets, perplexity(total_nll, total_targets), int(total_targets)


def train(model, train_loader, val_loader, config: TrainingConfig, context: DistributedContext = None,
          adapter_metadata: dict = None) -> dict:
    """Train ``model`` (a :class:`~minipeft.PeftModel`) and return the run's state and outcome.

    ``train_loader`` yields batches (dicts of ``(B, T)`` tensors; see :mod:`minipeft.training.loss`) and has a
    ``len``; ``val_loader`` may be None (no evaluation). ``adapter_metadata`` goes into every saved adapter's
    config (the data template, the training settings).
    """
    context = context or DistributedContext()
    adapter_metadata = adapter_metadata or {}
    output_dir = Path(config.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    device = context.device

    def say(message: str, file=None) -> None:
        if context.is_main:
            tqdm.write(message, file=file)

    # -- the plan: steps, schedule, precision ----------------------------------------------------------
    k = config.gradient_accumulation_steps
    if len(train_loader) == 0:
        raise UserError("the training set is empty: no batch to train on")
    steps_per_epoch = math.ceil(len(train_loader) / k)  # the last window of an epoch may be short
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = warmup_steps_for(total_steps, config.warmup_steps, config.warmup_ratio)
    eval_every = config.eval_every or max(1, total_steps // 5)
    save_every = config.save_every or eval_every
    precision = resolve_precision(config.precision, device)
    autocast = autocast_for(precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32

    def lr_at(step: int) -> float:
        return get_lr(step, schedule=config.lr_schedule, learning_rate=config.learning_rate,
                      total_steps=total_steps, warmup_steps=warmup_steps, min_lr=config.min_lr)

    # -- model, optimizer ------------------------------------------------------------------------------
    model.to(device)
    cast_frozen_weights(model, precision)  # bf16/fp16: frozen weights stored in half precision, no fp32 copy
    model.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = build_optimizer(model, config.learning_rate, config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    ddp_model = wrap_for_data_parallel(model, context)  # == model on one process

    # -- a fresh run, or one resumed from a checkpoint -------------------------------------------------
    state, rng_to_restore = TrainState(), None
    if config.resume:
        checkpoint = resolve_resume(config.resume, output_dir)
        saved = load_checkpoint(checkpoint, model, optimizer, scaler, context.rank)
        rng_to_restore = saved.pop("rng")
        state = TrainState(**saved)
        if state.batches_done > len(train_loader):
            raise UserError(f"--resume {config.resume}: {checkpoint} is {state.batches_done} batches into epoch "
                            f"{state.epoch}, but this run's data gives only {len(train_loader)} batches per epoch; "
                            "resume with the original --dataset_path and data settings")
        say(f"resumed from {checkpoint}: step {state.step}, epoch {state.epoch}, "
            f"{state.batches_done} batches into it")
        if rng_to_restore is None:
            say("note: the checkpoint has no random state for this process (another number of processes?); "
                "dropout will differ from the original run")
    elif context.is_main:
        check_output_dir(config)
    if context.is_main:
        prepare_output_dir(output_dir)
        prepare_output_dir(checkpoints_dir)
        remove_incomplete(checkpoints_dir)
        remove_incomplete(output_dir)
        if config.overwrite_output_dir:  # the earlier run's checkpoints and best adapter are not this run's
            prune_checkpoints(checkpoints_dir, keep_last=0)
            remove_our_directory(output_dir / "best", "--output_dir")
    metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=context.is_main,
                         resume_step=state.step if config.resume else None)
    gradient_check = None if state.gradient_check_done else GradientCheck(model, config.gradient_checkpointing)

    def save_adapter_to(directory: Path, **extra) -> None:
        if context.is_main:
            model.save_adapter(directory, **adapter_metadata, **extra)  # atomic; refuses non-finite weights

    def save_training_state() -> Path:
        rng_states = context.all_gather_objects(capture_rng_state())  # every process's generators
        path = checkpoints_dir / f"step-{state.step}"
        bad = first_nonfinite_tensor(peft_state_dict(model))  # a checkpoint is a state worth going back to
        if bad is not None:
            say(f"warning: step {state.step}: adapter tensor {bad} is not finite; no checkpoint saved", file=sys.stderr)
            return path
        if context.is_main:
            save_checkpoint(path, model, optimizer, scaler, asdict(state), rng_states, adapter_metadata)
            prune_checkpoints(checkpoints_dir, config.save_total_limit, keep_steps=[state.best_step])
        return path

    def run_evaluation() -> None:
        started = time.perf_counter()
        loss, ppl, n_targets = evaluate(model, val_loader, context, autocast, config.eval_max_batches)
        seconds = time.perf_counter() - started
        # a NaN eval loss is never "best" (nan < x is False, but so would be the first-evaluation shortcut)
        improved = math.isfinite(loss) and (state.best_eval_loss is None or loss < state.best_eval_loss)
        state.eval_loss, state.eval_perplexity, state.eval_step = loss, ppl, state.step
        if improved:
            state.best_eval_loss, state.best_step, state.evals_without_improvement = loss, state.step, 0
            save_adapter_to(output_dir / "best", best_step=state.step, best_eval_loss=loss)
        else:
            state.evals_without_improvement += 1
        metrics.write({"kind": "eval", "step": state.step, "epoch": state.epoch, "eval_loss": loss,
                       "eval_perplexity": ppl, "eval_tokens": n_targets, "eval_seconds": seconds})
        say(format_eval_line(state.step, total_steps, loss, ppl, improved))

    # -- the base model's eval loss, before any training -----------------------------------------------
    if val_loader is not None and state.eval_loss_before is None:
        started = time.perf_counter()
        loss, ppl, n_targets = evaluate(model, val_loader, context, autocast, config.eval_max_batches)
        state.eval_loss_before, state.eval_perplexity_before = loss, ppl
        metrics.write({"kind": "eval", "step": 0, "epoch": 0, "eval_loss": loss, "eval_perplexity": ppl,
                       "eval_tokens": n_targets, "eval_seconds": time.perf_counter() - started})
        say(f"Eval before training | Eval loss: {loss:.4f} | Eval PPL: {ppl:.2f} | {n_targets:,} target tokens")

    records, tokens = micro_batch_size(train_loader)  # per process; the effective batch multiplies them
    say(format_plan_line(total_steps, steps_per_epoch, records, k, context.world_size, tokens, config.learning_rate,
                         config.lr_schedule, warmup_steps, precision, device))
    progress = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                    disable=True if not context.is_main else None)  # None: only on a terminal
    interval = {"nll": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0, "grad_norm": 0.0, "steps": 0}
    outcome = "finished"
    stop = StopRequest()
    with stop.installed():
        while state.step < total_steps and outcome == "finished":
            # -- one epoch (or the rest of one, after a resume) ----------------------------------------
            set_epoch(train_loader, state.epoch)
            batches = iter(train_loader) if state.batches_done < len(train_loader) else iter(())
            for _ in range(state.batches_done):  # resume: skip what the checkpoint had already consumed
                next(batches)
            if rng_to_restore is not None:  # ... and only then continue the random streams where they were
                restore_rng_state(*rng_to_restore)
                rng_to_restore = None
            epoch_finished = True
            while state.step < total_steps:
                window = list(itertools.islice(batches, k))
                if not window:
                    break
                started = time.perf_counter()
                # 1-2) forward and backward over the window: .grad = ∇ (window NLL / window target tokens)
                window_nll, n_targets, n_tokens = accumulate_gradients(ddp_model, window, context, autocast, scaler)
                step_loss = window_nll / n_targets if n_targets else float("nan")
                (stop_votes,) = context.all_reduce_sum([stop.requested])  # any process asked: all stop together
                # 3) gradient norm before clipping (clipping to inf only measures), then clip
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf))
                # 4) the optimizer step, unless the loss is not finite
                lr = lr_at(state.step)
                if math.isfinite(step_loss) and (math.isfinite(grad_norm) or scaler is not None):
                    state.nonfinite_in_a_row = 0
                    if gradient_check is not None and gradient_check.observe(model):
                        state.gradient_check_done, gradient_check = True, None
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if scaler is not None:
                        scaler.step(optimizer)  # skips the step itself when fp16 gradients overflowed
                        scaler.update()
                    else:
                        optimizer.step()
                    state.epoch_nll += window_nll
                    state.epoch_target_tokens += int(n_targets)
                else:
                    state.nonfinite_in_a_row += 1
                    # a NaN loss always makes the gradient NaN too; a finite loss with an overflowing gradient is rarer
                    what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                    say(f"warning: step {state.step + 1}: loss {step_loss} / grad norm {grad_norm} is not finite; "
                        f"step skipped ({state.nonfinite_in_a_row} in a row)", file=sys.stderr)
                    if scaler is not None:
                        scaler.update()  # lowers the scale
                    if state.nonfinite_in_a_row >= config.max_nonfinite_steps:
                        raise UserError(divergence_message(what, state.nonfinite_in_a_row, precision,
                                                           list_checkpoints(checkpoints_dir)))
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batches_done += len(window)
                state.tokens_seen += int(n_tokens)
                seconds = time.perf_counter() - started
                state.train_seconds += seconds

                # 5) log: every step to metrics.jsonl and the bar, every --log_every steps a line
                metrics.write({"kind": "train", "step": state.step, "epoch": state.epoch, "loss": step_loss,
                               "lr": lr, "grad_norm": grad_norm, "target_tokens": int(n_targets),
                               "tokens": int(n_tokens), "tokens_per_s": n_tokens / seconds,
                               "seconds": state.train_seconds})
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / seconds:,.0f}")
                for key, value in (("nll", window_nll), ("targets", n_targets), ("tokens", n_tokens),
                                   ("seconds", seconds), ("grad_norm", grad_norm), ("steps", 1)):
                    interval[key] += value
                if state.step % config.log_every == 0 or state.step == total_steps:
                    mean_loss = interval["nll"] / max(interval["targets"], 1)
                    say(format_log_line(state.epoch, state.step, total_steps, mean_loss, perplexity(
                        interval["nll"], interval["targets"]), lr, interval["grad_norm"] / interval["steps"],
                        interval["tokens"] / interval["seconds"]))
                    interval = dict.fromkeys(interval, 0)

                # 6) evaluate, keep the best adapter, maybe stop early
                if val_loader is not None and (state.step % eval_every == 0 or state.step == total_steps):
                    run_evaluation()
                    if config.early_stopping_patience and \
                            state.evals_without_improvement >= config.early_stopping_patience:
                        say(f"early stopping: no better eval loss in {state.evals_without_improvement} evaluations "
                            f"(best {state.best_eval_loss:.4f} at step {state.best_step})")
                        outcome = "early_stopped"
                if stop_votes:
                    outcome = "interrupted"

                # 7) checkpoint
                if state.step % save_every == 0 or state.step == total_steps or outcome != "finished":
                    save_training_state()
                if outcome != "finished":
                    epoch_finished = False
                    break
            else:
                epoch_finished = False  # stopped at total_steps in the middle of the epoch
            if epoch_finished:
                state.epoch += 1
                state.batches_done = 0
                state.epoch_nll, state.epoch_target_tokens = 0.0, 0
    progress.close()

    # -- the end: the final adapter -----------------------------------------------------------------------
    if outcome != "interrupted":
        save_adapter_to(output_dir / "adapter", step=state.step)
    context.barrier()
    return {"outcome": outcome, "signal": stop.signal_number, "state": asdict(state),
            "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "warmup_steps": warmup_steps, "eval_every": eval_every, "save_every": save_every, "precision": precision,
            "last_checkpoint": str(checkpoints_dir / f"step-{state.step}")}
