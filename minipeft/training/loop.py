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
    metrics.json             the run's summary (:mod:`minipeft.training.report`; written by ``train_llm.py``)
    train_config.json        every setting of the run
    loss_curve.png           train and eval loss (with the ``plot`` extra)
    .minipeft                marker: minipeft wrote this folder (each folder it writes has one; see
                             :mod:`minipeft.files.safe_files`); .minipeft.lock while a run writes here

Only rank 0 writes files and prints; every process runs the same steps. Under ``--sharding fsdp`` each process
holds 1/N of the model (:mod:`minipeft.training.sharding`); the steps are the same.

:func:`train` below is that list, one named function per step; the functions share one
:class:`~minipeft.training.state.TrainingRun`. Their parts live beside this module, in ``gradients.py``
(accumulation), ``evaluation.py``, ``prepare.py`` (precision), ``run_dir.py`` (the output directory, its lock
and ``--resume``) and ``signals.py`` (Ctrl-C).
"""

import itertools
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from minipeft.core.errors import UserError
from minipeft.core.finite import first_nonfinite_tensor
from minipeft.files.safe_files import remove_incomplete, remove_our_directory
from minipeft.fast import switched_on
from minipeft.fast.compile import check_compiler_available
from minipeft.fast.loss import accepts_logits_to_keep, target_only_loss_sum
from minipeft.training.checkpoint import (capture_rng_state, list_checkpoints, load_checkpoint, prune_checkpoints,
                                          restore_rng_state, save_checkpoint)
from minipeft.training.config import TrainingConfig
from minipeft.training.distributed import DistributedContext, wrap_for_data_parallel
from minipeft.training.evaluation import evaluate
from minipeft.training.gradients import GradientCheck, accumulate_gradients
from minipeft.training.loss import causal_lm_loss_sum, perplexity
from minipeft.training.metrics import MetricsLog, format_eval_line, format_log_line
from minipeft.training.optimizer import build_optimizer
from minipeft.training.outcome import divergence_message, failure_message
from minipeft.training.precision import cast_frozen_weights
from minipeft.training.plan import plan_lines, plan_run
from minipeft.training.prepare import autocast_for, enable_gradient_checkpointing
from minipeft.training.resume_checks import check_position_fits
from minipeft.training.run_dir import RunDir, open_run_dir, prepare_output_dir
from minipeft.training.schedule import get_lr
from minipeft.training.sharding import (adapter_tensors, full_norm, full_optimizer_state, load_full_adapter_state,
                                        load_full_optimizer_state, is_sharded, shard_model)
from minipeft.training.signals import StopRequest
from minipeft.training.state import RunPlan, TrainingRun, TrainResult, TrainState


def train(model, train_loader, val_loader, config: TrainingConfig, context: DistributedContext = None,
          adapter_metadata: dict = None, run_dir: RunDir = None) -> TrainResult:
    """Train ``model`` (a :class:`~minipeft.PeftModel`) and return how the run ended (:class:`TrainResult`).

    ``train_loader`` yields batches (dicts of ``(B, T)`` tensors; see :mod:`minipeft.training.loss`) and has a
    ``len``; ``val_loader`` may be None (no evaluation). ``adapter_metadata`` goes into every saved adapter's
    config (the data template, the training settings).

    ``run_dir``: ``config.output_dir`` opened by :func:`~minipeft.training.run_dir.open_run_dir` (checked,
    locked, ``--resume`` resolved), as the command line does before it loads the model; without it, ``train``
    opens the directory itself and closes it when the run ends.
    """
    context = context or DistributedContext()
    if run_dir is not None and Path(run_dir.path) != Path(config.output_dir):
        raise ValueError(f"run_dir {run_dir.path} is not config.output_dir {config.output_dir}")
    with nullcontext(run_dir) if run_dir is not None else open_run_dir(config, context.is_main) as run_dir:
        plan = plan_run(config, train_loader, context.device)
        run = start_run(model, config, plan, context, adapter_metadata or {})  # model, optimizer, DDP
        resume_or_start_fresh(run, run_dir, train_loader)  # the state of a checkpoint, or a fresh start
        stop = StopRequest()
        # the optimisations of minipeft/fast (dropout by gaps, lean norms or --compile), each equal to the reference
        warn = lambda message: say(run, message, file=sys.stderr)  # noqa: E731
        with nullcontext() if context.is_sharded else switched_on(model, context.device, config.compile, warn):
            if val_loader is not None and run.state.eval_loss_before is None:
                evaluate_before_training(run, val_loader)
            for line in plan_lines(plan, config, train_loader, context.world_size, context.device):
                say(run, line)
            progress = tqdm(total=plan.total_steps, initial=run.state.step, unit="step", dynamic_ncols=True,
                            disable=True if not context.is_main else None)  # None: only on a terminal
            with stop.installed():
                while run.state.step < plan.total_steps and run.outcome == "finished":
                    batches = epoch_batches(run, train_loader)  # this epoch's, or the rest of it after a resume
                    train_epoch(run, batches, val_loader, stop, progress)
            progress.close()
        return finish(run, stop)


# -- before the first step ----------------------------------------------------------------------------------
def start_run(model, config: TrainingConfig, plan: RunPlan, context: DistributedContext,
              adapter_metadata: dict) -> TrainingRun:
    """The model on its device in its precision, in training mode; DDP around it or FSDP2 sharding it, then
    the optimizer (over the sharded parameters). (FSDP2 owns its units' modules: :func:`train` swaps none.)"""
    device = context.device
    autocast = autocast_for(plan.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    if not is_sharded(model):  # (sharding.build_sharded gives it on its device, cast and in pieces)
        model.to(device)
        cast_frozen_weights(model, plan.precision)  # bf16/fp16: frozen weights stored in half precision
    model.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.compile:
        check_compiler_available(device)
    if context.is_sharded and not is_sharded(model):
        shard_model(model, device, context.world_size, plan.precision, config.fsdp_cpu_offload)
    optimizer = build_optimizer(model, config.learning_rate, config.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if plan.precision == "fp16" else None
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    ddp_model = wrap_for_data_parallel(model, context)  # == model on one process
    return TrainingRun(config=config, plan=plan, context=context, model=model, ddp_model=ddp_model,
                       optimizer=optimizer, scaler=scaler, trainable=trainable, autocast=autocast,
                       adapter_metadata=adapter_metadata, loss_sum=loss_for(model))


def loss_for(model):
    """The loss at the target positions only (:mod:`minipeft.fast.loss`) where the model can be asked for
    logits there (a boolean ``logits_to_keep``), else the reference: the same numbers either way."""
    return target_only_loss_sum if accepts_logits_to_keep(model) else causal_lm_loss_sum


def resume_or_start_fresh(run: TrainingRun, run_dir: RunDir, train_loader) -> None:
    """``--resume``: load the checkpoint's weights, optimizer and state (``run_dir`` resolved which one). Then
    prepare the checkpoints directory (rank 0) and open ``metrics.jsonl``."""
    config, context, output_dir, checkpoints_dir = run.config, run.context, run.output_dir, run.checkpoints_dir
    checkpoint = run_dir.resume_from
    if checkpoint is not None:
        loaders = dict(load_adapter=load_full_adapter_state, load_optimizer=load_full_optimizer_state) \
            if context.is_sharded else {}  # every process reads the full tensors and keeps its piece
        saved = load_checkpoint(checkpoint, run.model, run.optimizer, run.scaler, context.rank, **loaders,
                                current=run.adapter_metadata, new_data=config.resume_new_data)  # the same run?
        run.rng_to_restore = saved.pop("rng")
        run.state = TrainState(**saved)
        check_position_fits(run.state, checkpoint, config.resume, len(train_loader), run.plan.total_steps)
        say(run, f"resumed from {checkpoint}: step {run.state.step}, epoch {run.state.epoch}, "
                 f"{run.state.batches_done} batches into it")
        if run.rng_to_restore is None:
            say(run, "note: the checkpoint has no random state for this process (another number of processes?); "
                     "dropout will differ from the original run")
    if run_dir.restarted:
        say(run, f"note: --resume {config.resume}: {output_dir} holds no checkpoint yet (the run stopped before its "
                 "first, or before it began); starting it over from step 0")
    if context.is_main:
        prepare_output_dir(checkpoints_dir)
        remove_incomplete(checkpoints_dir)
        remove_incomplete(output_dir)
        if config.overwrite_output_dir:  # the earlier run's checkpoints and best adapter are not this run's
            prune_checkpoints(checkpoints_dir, keep_last=0)
            remove_our_directory(output_dir / "best", "--output_dir")
    run.metrics = MetricsLog(output_dir / "metrics.jsonl", enabled=context.is_main,
                             resume_step=run.state.step if checkpoint is not None else None)
    if not run.state.gradient_check_done:
        run.gradient_check = GradientCheck(run.model, config.gradient_checkpointing)


def evaluate_before_training(run: TrainingRun, val_loader) -> None:
    """The base model's eval loss, before any training: the number to beat."""
    started = time.perf_counter()
    loss, ppl, n_targets = evaluate(run.model, val_loader, run.context, run.autocast, run.config.eval_max_batches,
                                 run.loss_sum)
    run.state.eval_loss_before, run.state.eval_perplexity_before = loss, ppl
    run.metrics.write({"kind": "eval", "step": 0, "epoch": 0, "eval_loss": loss, "eval_perplexity": ppl,
                       "eval_tokens": n_targets, "eval_seconds": time.perf_counter() - started})
    say(run, f"Eval before training | Eval loss: {loss:.4f} | Eval PPL: {ppl:.2f} | {n_targets:,} target tokens")


# -- the steps ----------------------------------------------------------------------------------------------
def epoch_batches(run: TrainingRun, train_loader):
    """An iterator over this epoch's micro-batches, past those a resumed checkpoint had already consumed (all
    of them, at an epoch's end: then none, and no loader iterator drawing a seed the uninterrupted run never drew)."""
    set_epoch(train_loader, run.state.epoch)
    batches = iter(train_loader) if run.state.batches_done < len(train_loader) else iter(())
    for _ in itertools.islice(batches, run.state.batches_done):  # resume: skip what the checkpoint consumed
        pass
    if run.rng_to_restore is not None:  # ... and only then continue the random streams where they were
        restore_rng_state(*run.rng_to_restore)
        run.rng_to_restore = None
    return batches


def train_epoch(run: TrainingRun, batches, val_loader, stop: StopRequest, progress) -> None:
    """Optimizer steps, one per window of ``k`` micro-batches, until the batches run out (then the next epoch
    begins), the run reaches its last step, or it stops early."""
    while run.state.step < run.plan.total_steps and run.outcome == "finished":
        window = list(itertools.islice(batches, run.plan.accumulation))
        if not window:  # the epoch is complete
            run.state.epoch += 1
            run.state.batches_done = 0
            run.state.epoch_nll, run.state.epoch_target_tokens = 0.0, 0
            return
        train_step(run, window, val_loader, stop, progress)


def train_step(run: TrainingRun, window: list, val_loader, stop: StopRequest, progress) -> None:
    """One optimizer step over one window: forward and backward, clip and step, log, evaluate, checkpoint."""
    state, plan = run.state, run.plan
    started = time.perf_counter()
    # 1-2) forward and backward over the window: .grad = ∇ (window NLL / window target tokens)
    window_nll, n_targets, n_tokens = accumulate_gradients(run.ddp_model, window, run.context, run.autocast,
                                                           run.scaler, run.loss_sum)
    step_loss = window_nll / n_targets if n_targets else float("nan")
    (stop_votes,) = run.context.all_reduce_sum([stop.requested])  # any process asked: all stop together
    # 3-4) clip, then the optimizer step unless the loss is not finite
    grad_norm, lr = optimizer_step(run, window_nll, n_targets, step_loss)
    state.step += 1
    state.batches_done += len(window)
    state.tokens_seen += int(n_tokens)
    seconds = time.perf_counter() - started
    state.train_seconds += seconds
    # 5) log: every step to metrics.jsonl and the bar, every --log_every steps a line
    log_step(run, progress, step_loss, lr, grad_norm, window_nll, n_targets, n_tokens, seconds)
    # 6) evaluate, keep the best adapter, maybe stop early
    if val_loader is not None and (state.step % plan.eval_every == 0 or state.step == plan.total_steps):
        evaluate_and_keep_best(run, val_loader)
        patience = run.config.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            say(run, f"early stopping: no better eval loss in {state.evals_without_improvement} evaluations "
                     f"(best {state.best_eval_loss:.4f} at step {state.best_step})")
            run.outcome = "early_stopped"
    if stop_votes:
        run.outcome = "interrupted"
    # 7) checkpoint (a Ctrl-C waits for it to be written whole)
    if state.step % plan.save_every == 0 or state.step == plan.total_steps or run.outcome != "finished":
        with stop.deferred(stopping=run.outcome == "interrupted"):
            save_training_state(run)


def optimizer_step(run: TrainingRun, window_nll: float, n_targets: int, step_loss: float) -> tuple:
    """Clip the gradient, then take the AdamW step at ``get_lr(step)``, or skip it when the loss or the
    gradient is not finite; zero the gradients. Returns ``(grad norm before clipping, lr)``."""
    state, optimizer, scaler, config = run.state, run.optimizer, run.scaler, run.config
    # gradient norm before clipping (clipping to inf only measures), then clip
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = float(full_norm(torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm or math.inf)))
    lr = get_lr(state.step, schedule=config.lr_schedule, learning_rate=config.learning_rate,
                total_steps=run.plan.total_steps, warmup_steps=run.plan.warmup_steps, min_lr=config.min_lr)
    if math.isfinite(step_loss) and (math.isfinite(grad_norm) or scaler is not None):
        state.nonfinite_in_a_row = 0
        if run.gradient_check is not None and run.gradient_check.observe(run.model):
            state.gradient_check_done, run.gradient_check = True, None
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
        say(run, f"warning: step {state.step + 1}: loss {step_loss} / grad norm {grad_norm} is not finite; "
                 f"step skipped ({state.nonfinite_in_a_row} in a row)", file=sys.stderr)
        if scaler is not None:
            scaler.update()  # lowers the scale
        if state.nonfinite_in_a_row >= config.max_nonfinite_steps:
            raise UserError(divergence_message(what, state.nonfinite_in_a_row, run.plan.precision,
                                               list_checkpoints(run.checkpoints_dir)))
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def log_step(run: TrainingRun, progress, step_loss: float, lr: float, grad_norm: float, window_nll: float,
             n_targets: int, n_tokens: int, seconds: float) -> None:
    """A ``metrics.jsonl`` record and the progress bar every step; a log line every ``--log_every`` steps
    (its loss: all target tokens since the previous line)."""
    state, interval = run.state, run.interval
    run.metrics.write({"kind": "train", "step": state.step, "epoch": state.epoch, "loss": step_loss,
                       "lr": lr, "grad_norm": grad_norm, "target_tokens": int(n_targets),
                       "tokens": int(n_tokens), "tokens_per_s": n_tokens / seconds,
                       "seconds": state.train_seconds})
    progress.update(1)
    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / seconds:,.0f}")
    for key, value in (("nll", window_nll), ("targets", n_targets), ("tokens", n_tokens),
                       ("seconds", seconds), ("grad_norm", grad_norm), ("steps", 1)):
        interval[key] += value
    if state.step % run.config.log_every == 0 or state.step == run.plan.total_steps:
        mean_loss = interval["nll"] / max(interval["targets"], 1)
        say(run, format_log_line(state.epoch, state.step, run.plan.total_steps, mean_loss, perplexity(
            interval["nll"], interval["targets"]), lr, interval["grad_norm"] / interval["steps"],
            interval["tokens"] / interval["seconds"]))
        run.interval = dict.fromkeys(interval, 0)


def evaluate_and_keep_best(run: TrainingRun, val_loader) -> None:
    """Evaluate; an eval loss lower than every earlier one saves the adapter to ``best/``."""
    state = run.state
    started = time.perf_counter()
    loss, ppl, n_targets = evaluate(run.model, val_loader, run.context, run.autocast, run.config.eval_max_batches,
                                 run.loss_sum)
    seconds = time.perf_counter() - started
    # a NaN eval loss is never "best" (nan < x is False, but so would be the first-evaluation shortcut)
    improved = math.isfinite(loss) and (state.best_eval_loss is None or loss < state.best_eval_loss)
    state.eval_loss, state.eval_perplexity, state.eval_step = loss, ppl, state.step
    if improved:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = loss, state.step, 0
        save_adapter_to(run, run.output_dir / "best", best_step=state.step, best_eval_loss=loss)
    else:
        state.evals_without_improvement += 1
    run.metrics.write({"kind": "eval", "step": state.step, "epoch": state.epoch, "eval_loss": loss,
                       "eval_perplexity": ppl, "eval_tokens": n_targets, "eval_seconds": seconds})
    say(run, format_eval_line(state.step, run.plan.total_steps, loss, ppl, improved))


def save_training_state(run: TrainingRun) -> None:
    """A checkpoint at this step (rank 0 writes it; every process gives its random state), then prune."""
    state = run.state
    rng_states = run.context.all_gather_objects(capture_rng_state())  # every process's generators
    adapter = adapter_tensors(run.model, run.context.is_sharded)  # FSDP2: gathered to rank 0 (every process takes part)
    optimizer_state = full_optimizer_state(run.model, run.optimizer) if run.context.is_sharded else None
    if not run.context.is_main:
        return
    bad = first_nonfinite_tensor(adapter)  # a checkpoint is a state worth going back to
    if bad is not None:
        say(run, f"warning: step {state.step}: adapter tensor {bad} is not finite; no checkpoint saved",
            file=sys.stderr)
        return
    save_checkpoint(run.checkpoints_dir / f"step-{state.step}", run.model, run.optimizer, run.scaler,
                    asdict(state), rng_states, run.adapter_metadata, adapter, optimizer_state)
    run.metrics.mark()  # (with each checkpoint: the log's lines so far are the run's)
    kept = prune_checkpoints(run.checkpoints_dir, run.config.save_total_limit, keep_steps=[state.best_step])
    for path in set(kept) - run.kept_checkpoints:
        say(run, f"warning: {path} holds files minipeft did not write; kept (delete it yourself when done)",
            file=sys.stderr)
    run.kept_checkpoints |= set(kept)


# -- the end ------------------------------------------------------------------------------------------------
def finish(run: TrainingRun, stop: StopRequest) -> TrainResult:
    """Save the final adapter (unless interrupted: the checkpoint is the way back; or failed: one line, no
    adapter, see :mod:`minipeft.training.outcome`) and sum the run up."""
    if run.outcome != "interrupted":
        tensors = adapter_tensors(run.model, run.context.is_sharded)
        failure = failure_message(run.state, run.optimizer, tensors, run.plan.precision)
        if run.context.all_reduce_sum([failure is not None])[0]:  # every process fails together
            raise UserError(f"training failed: {failure or 'on another process'}")
        save_adapter_to(run, run.output_dir / "adapter", tensors, step=run.state.step)
        run.metrics.mark()
    run.context.barrier()
    return TrainResult(outcome=run.outcome, signal=stop.signal_number, state=run.state, plan=run.plan,
                       last_checkpoint=run.checkpoints_dir / f"step-{run.state.step}")


# -- small parts --------------------------------------------------------------------------------------------
def say(run: TrainingRun, message: str, file=None) -> None:
    """Print a line above the progress bar, on rank 0 only."""
    if run.context.is_main:
        tqdm.write(message, file=file)


def save_adapter_to(run: TrainingRun, directory: Path, tensors: dict = None, **extra) -> None:
    tensors = adapter_tensors(run.model, run.context.is_sharded) if tensors is None else tensors
    if run.context.is_main:  # atomic; refuses non-finite weights
        run.model.save_adapter(directory, tensors=tensors, **run.adapter_metadata, **extra)


def set_epoch(loader, epoch: int) -> None:
    """Tell the loader's sampler which epoch it is (its shuffle order is a function of seed and epoch)."""
    for owner in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return
