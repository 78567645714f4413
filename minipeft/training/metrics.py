"""Seeing a run: the log line, ``metrics.jsonl`` (one record per step and per evaluation), ``metrics.json``
(the summary), and the loss-curve PNG.

``metrics.jsonl`` records (one JSON object a line, appended and flushed as the run goes, so a crashed run
still has its curve; a resumed run first drops the records after its checkpoint's step)::

    {"kind": "train", "step": 10, "epoch": 0, "loss": 2.31, "lr": 0.002, "grad_norm": 0.83,
     "target_tokens": 1712, "tokens": 4010, "tokens_per_s": 9120.4, "seconds": 4.4}
    {"kind": "eval", "step": 50, "epoch": 0, "eval_loss": 1.87, "eval_perplexity": 6.49, "eval_tokens": 9180}

The plot needs the ``plot`` extra (matplotlib, imported only here and only when plotting).
"""

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from minipeft.fast import fast_generation
from minipeft.files.json_limits import loads_bounded
from minipeft.files.atomic import cannot_write
from minipeft.files.manifest import record_appended, record_as_ours
from minipeft.files.safe_files import write_file_atomically, write_text_atomically
from minipeft.quantization.nf4 import has_4bit_layers


def read_metrics(path: Path) -> list:
    """The records of a ``metrics.jsonl`` (a line cut short by a kill, or one that is not a record with a
    whole ``step``, is skipped; lines are read within :mod:`minipeft.files.json_limits`' bounds)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                record = loads_bounded(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


class MetricsLog:
    """Appends records to ``metrics.jsonl``; does nothing on processes other than rank 0."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:  # a new run starts a new file
            self.path.unlink(missing_ok=True)
            record_as_ours(self.path, appended=True)  # in a folder minipeft marked: its own, by name
        else:  # a resumed run keeps the curve up to its checkpoint, so it continues without a seam
            kept = [record for record in read_metrics(self.path) if record["step"] <= resume_step]
            write_text_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))
            self.mark()

    def mark(self) -> None:
        """A record point: the marker notes what the log holds now (its size and sha256), so that an edit of
        these lines is seen later (``--overwrite_output_dir`` stops on it) and appends after them are not."""
        if self.enabled:
            record_appended(self.path)

    def write(self, record: dict) -> None:
        """Append one record; a NaN or infinite number is written as null (JSON has no NaN)."""
        if self.enabled:
            record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                      for key, value in record.items()}
            try:
                with open(self.path, "a") as file:
                    file.write(json.dumps(record) + "\n")
            except OSError as error:  # a full disk: one line naming the file
                raise cannot_write(self.path, error) from None


def format_log_line(epoch: int, step: int, total_steps: int, loss: float, perplexity: float, lr: float,
                    grad_norm: float, tokens_per_s: float) -> str:
    """The seed's line, plus gradient norm and throughput:
    ``Epoch 0 | Step 10/6501 | Loss: 8.5234 | PPL: 4123.45 | LR: 1.00e-05 | Grad norm: 1.234 | Tokens/s: 9,120``"""
    return (f"Epoch {epoch} | Step {step}/{total_steps} | Loss: {loss:.4f} | PPL: {perplexity:.2f} | "
            f"LR: {lr:.2e} | Grad norm: {grad_norm:.3f} | Tokens/s: {tokens_per_s:,.0f}")


def micro_batch_size(train_loader) -> tuple:
    """``(records per micro-batch, real tokens per micro-batch or None)`` on one process.

    From the batch sampler of :func:`minipeft.data.build_dataloaders` (its ``batch_size`` and the token
    length of every record), else from a list of ready batches (their rows and attention masks).
    """
    sampler = getattr(train_loader, "batch_sampler", None)
    if hasattr(sampler, "batch_size") and hasattr(sampler, "lengths"):
        return sampler.batch_size, sampler.batch_size * float(sum(sampler.lengths)) / max(len(sampler.lengths), 1)
    if isinstance(train_loader, (list, tuple)) and train_loader:
        records = train_loader[0]["input_ids"].shape[0]
        masks = [batch.get("attention_mask", torch.ones_like(batch["input_ids"])) for batch in train_loader]
        return records, sum(int(mask.sum()) for mask in masks) / len(masks)
    return getattr(train_loader, "batch_size", None) or 1, None


def format_plan_line(total_steps: int, steps_per_epoch: int, records: int, accumulation: int, processes: int,
                     tokens_per_micro_batch, learning_rate: float, schedule: str, warmup_steps: int,
                     precision: str, device) -> str:
    """The run's plan, the effective batch spelled out:
    ``Training: 225 optimizer steps (225 per epoch) | 8 records per micro-batch × 1 accumulation × 1 process =
    8 records per optimizer step, ~1,480 tokens per step | lr 0.001 cosine, warmup 0 | fp32 on cpu``"""
    per_step = records * accumulation * processes
    tokens = (f", ~{tokens_per_micro_batch * accumulation * processes:,.0f} tokens per step"
              if tokens_per_micro_batch else "")
    return (f"Training: {total_steps} optimizer steps ({steps_per_epoch} per epoch) | {records} records per "
            f"micro-batch × {accumulation} accumulation × {processes} process{'es' if processes > 1 else ''} = "
            f"{per_step} records per optimizer step{tokens} | lr {learning_rate:g} {schedule}, warmup {warmup_steps} "
            f"| {precision} on {device}")


def format_eval_line(step: int, total_steps: int, eval_loss: float, eval_perplexity: float, best: bool) -> str:
    return (f"Eval | Step {step}/{total_steps} | Eval loss: {eval_loss:.4f} | Eval PPL: {eval_perplexity:.2f}"
            + (" | best so far" if best else ""))


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: CUDA's largest allocation on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda_allocated"}
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    megabytes = kilobytes / 2**20 if sys.platform == "darwin" else kilobytes / 2**10
    return {"peak_memory_mb": megabytes, "peak_memory_kind": "process_peak_rss"}


def directory_size(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def smooth_losses(losses: list, target_tokens: list, window: int) -> list:
    """Token-weighted running mean: point i is ``Σ loss_j·n_j / Σ n_j`` over steps ``j`` in ``(i - window, i]``
    (``n_j``: target tokens of step j), i.e. the mean NLL per target token of those steps, the same way the
    log line and the eval loss are computed. A plain mean would give a 20-token step as much weight as a
    2,000-token one."""
    smoothed = []
    for i in range(len(losses)):
        start = max(0, i - window + 1)
        tokens = sum(target_tokens[start:i + 1])
        smoothed.append(sum(loss * n for loss, n in zip(losses[start:i + 1], target_tokens[start:i + 1])) / tokens
                        if tokens else losses[i])
    return smoothed


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = None):
    """Train loss per step and eval loss per evaluation, as a PNG; returns its path, or None (with a
    one-line notice) when matplotlib is not installed. The title defaults to the run directory's name."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: loss curve not drawn: matplotlib is not installed (pip install 'minipeft[plot]'); "
              f"the numbers are in {metrics_path}")
        return None
    records = read_metrics(metrics_path)
    train = [(record["step"], record["loss"], record.get("target_tokens") or 1) for record in records
             if record["kind"] == "train" and record["loss"] is not None]  # skipped non-finite steps: null
    evals = [(record["step"], record["eval_loss"]) for record in records
             if record["kind"] == "eval" and record["eval_loss"] is not None]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses, target_tokens = zip(*train)
        axes.plot(steps, losses, label="train loss (per step)", linewidth=0.8, alpha=0.4)
        window = max(1, len(losses) // 25)  # a running mean, so that the trend shows through the noise
        if window > 1:
            axes.plot(steps, smooth_losses(losses, target_tokens, window), linewidth=1.5,
                      label=f"train loss (last {window} steps, token-weighted)")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", linewidth=2)
    axes.set_title(title or f"Loss curve: {Path(metrics_path).resolve().parent.name}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per target token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_file_atomically(png_path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)
    return Path(png_path)


def measure_inference_speed(peft_model, batch: dict, new_tokens: int = 32) -> float:
    """Greedy KV-cached generation speed, batch 1: new tokens per second (after one warm-up token); 2 tokens
    on a 4-bit base, which dequantizes every layer for every token (a 3B-shaped model on 2 CPU cores: ~50 s
    a token, so 32 would outlast a short run)."""
    new_tokens = min(new_tokens, 2) if has_4bit_layers(peft_model) else new_tokens
    prompt = batch["input_ids"][:1, :16].to(next(peft_model.parameters()).device)
    with fast_generation(peft_model):  # as train_llm.py's users generate (minipeft/fast)
        peft_model.generate(prompt, max_new_tokens=1)
        started = time.perf_counter()
        generated = peft_model.generate(prompt, max_new_tokens=new_tokens)  # no EOS given: exactly new_tokens
        return generated.shape[1] / (time.perf_counter() - started)
