"""One method's run in ``python -m minipeft compare``: apply, train, evaluate, time, answer (:func:`compare_method`).

:mod:`minipeft.cli.compare` parses the flags, loads the model and the data once and calls
:func:`compare_method` for each method in turn, on a fresh copy of the base model; the row it returns goes to
:mod:`minipeft.cli.compare_report`, which only formats. What is measured:

- peak memory (:class:`PeakMemory`): CUDA's peak allocation, or the process's peak RSS on CPU (Linux);
- generation speed (:func:`generation_speed`): greedy, KV-cached, batch 1, a fixed number of new tokens, the
  median of three runs, unmerged and (for methods that can merge) merged;
- the train loss of the last steps (:func:`recent_train_loss`, token-weighted), the eval losses before and
  after, the adapter's size on disk;
- greedy answers to held-out instructions (:func:`answer`).
"""

import argparse
import copy
import gc
import signal
import statistics
import time
from pathlib import Path

import torch

from minipeft.cli.arguments import config_from_args, method_flags
from minipeft.core.generation import generate
from minipeft.files.safe_files import remove_our_directory
from minipeft.inference.prompts import generate_texts
from minipeft.methods import METHODS, method_for_config
from minipeft.model.peft_model import get_peft_model
from minipeft.training import train, TrainingConfig
from minipeft.training.metrics import directory_size, read_metrics

TRAIN_LOSS_LAST_STEPS = 10


# --- what is measured -----------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory over a stretch of code: CUDA's max allocation, or (CPU, Linux) the process's peak RSS
    after resetting the kernel's high-water mark; None where neither can be measured."""
    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size (VmHWM)
        except OSError:
            pass

    def peak_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            pass
        return None


@torch.no_grad()
def generation_speed(model, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy KV-cached generation, batch 1, exactly ``new_tokens`` tokens (no EOS): the median tokens/s."""
    generate(model, prompt_ids, max_new_tokens=2)  # warm-up
    speeds = []
    for _ in range(repeats):
        started = time.perf_counter()
        generated = generate(model, prompt_ids, max_new_tokens=new_tokens)
        speeds.append(generated.shape[1] / (time.perf_counter() - started))
    return statistics.median(speeds)


def recent_train_loss(metrics_path: Path, last_steps: int = TRAIN_LOSS_LAST_STEPS):
    """Token-weighted mean train loss of the last ``last_steps`` optimizer steps in ``metrics.jsonl``."""
    steps = [record for record in read_metrics(metrics_path)
             if record["kind"] == "train" and record["loss"] is not None][-last_steps:]
    targets = sum(record["target_tokens"] for record in steps)
    return sum(record["loss"] * record["target_tokens"] for record in steps) / targets if targets else None


# --- one method ---------------------------------------------------------------------------------------------------

def method_config(name: str, args, model, tokenizer):
    """The config of method ``name`` from the method flags that apply to it (the others are left out)."""
    values = {flag.dest: getattr(args, flag.dest) if name in flag.methods else None
              for flag in method_flags().values()}
    compare_settings = METHODS[name].compare_settings  # selective: train the last block, its flag has no default
    for dest, value in (compare_settings(model) if compare_settings else {}).items():
        if values[dest] is None:
            values[dest] = value
    return config_from_args(argparse.Namespace(modification_type=name, **values), model, tokenizer)


def answer(model, tokenizer, prompts: list, template: str, max_new_tokens: int) -> list:
    """Greedy replies to held-out ``prompts`` (:class:`~minipeft.inference.prompts.Prompt`), one line each."""
    if not prompts:
        return []
    texts = generate_texts(model, tokenizer, prompts, template, max_new_tokens=max_new_tokens,
                           batch_size=1).texts  # one at a time: no padding
    return [" ".join(text.split()) for text in texts]


class MethodInterrupted(Exception):
    """A signal stopped one method's training: compare stops too, and exits with 128 + the signal's number."""
    def __init__(self, method: str, signal_number: int):
        super().__init__(method)
        self.method, self.signal_number = method, signal_number


def compare_method(name: str, base_model, tokenizer, loaders, args, template: str, learning_rate: float,
                   device: torch.device, speed_prompt: torch.Tensor, prompts: list = ()) -> dict:
    """Apply, train, evaluate and time one method on a copy of ``base_model``; returns its row."""
    train_loader, val_loader = loaders
    output_dir = Path(args.output_dir) / name
    memory = PeakMemory(device)
    memory.reset()
    torch.manual_seed(args.seed)  # the same adapter initialisation stream for every method
    model = copy.deepcopy(base_model)
    peft_model = get_peft_model(model, method_config(name, args, model, tokenizer))
    stats = peft_model.parameter_stats()
    config = TrainingConfig(output_dir=str(output_dir), max_steps=args.max_steps, learning_rate=learning_rate,
                            warmup_ratio=0.1, eval_every=args.max_steps, save_every=args.max_steps,
                            save_total_limit=1, log_every=max(1, args.max_steps // 3), precision=args.precision,
                            device=str(device), eval_max_batches=args.eval_max_batches, seed=args.seed,
                            overwrite_output_dir=True)
    started = time.perf_counter()
    result = train(peft_model, train_loader, val_loader, config,
                   adapter_metadata={"base_model_name_or_path": args.model, "template": template})
    wall_seconds = time.perf_counter() - started
    if result.outcome == "interrupted":  # Ctrl-C or SIGTERM: the loop saved a checkpoint; stop comparing
        raise MethodInterrupted(name, result.signal or signal.SIGINT)
    peak = memory.peak_mb()
    state = result.state
    remove_our_directory(output_dir / "checkpoints")  # the optimizer state is not compared
    peft_model.eval()
    speed_unmerged = generation_speed(peft_model, speed_prompt, args.speed_tokens)
    generations = answer(peft_model, tokenizer, list(prompts), template, args.generation_tokens)
    mergeable = method_for_config(peft_model.peft_config).mergeable
    speed_merged = None
    if mergeable:
        merged = peft_model.merge_and_unload()
        speed_merged = generation_speed(merged, speed_prompt, args.speed_tokens)
        del merged
    row = {
        "method": name,
        "trainable_params": stats.trainable,
        "total_params": stats.total,
        "trainable_percent": stats.ratio,
        "learning_rate": learning_rate,
        "steps": state.step,
        "train_seconds": state.train_seconds,
        "wall_seconds": wall_seconds,
        "peak_memory_mb": peak,
        "train_loss": recent_train_loss(output_dir / "metrics.jsonl"),
        "eval_loss_before": state.eval_loss_before,
        "eval_loss": state.eval_loss,
        "eval_perplexity": state.eval_perplexity,
        "adapter_bytes": directory_size(output_dir / "adapter"),
        "tokens_per_s_unmerged": speed_unmerged,
        "tokens_per_s_merged": speed_merged,
        "adapter_dir": str(output_dir / "adapter"),
        "generations": generations,
    }
    del peft_model, model
    gc.collect()
    return row
