"""What a run sets up before its first step: the precision, gradient checkpointing, the output directory.

- ``--precision auto`` becomes bf16 where the hardware computes it natively, else fp32
  (:func:`resolve_precision`); the forward pass then runs under :func:`autocast_for`'s context;
- ``--gradient_checkpointing`` recomputes activations in the backward (:func:`enable_gradient_checkpointing`);
- ``--output_dir``: a new run never silently replaces an earlier run's outputs, nor files minipeft did not
  write (:func:`check_output_dir`); the directory is created and marked as minipeft's
  (:func:`prepare_output_dir`).
"""

from contextlib import nullcontext
from pathlib import Path

import torch

from minipeft.core.errors import UserError
from minipeft.files.safe_files import (check_ours_to_replace, is_empty_directory, is_ours, make_directory,
                                      mark_as_ours, record_as_ours)
from minipeft.core.transformers_api import enable_activation_checkpointing
from minipeft.training.checkpoint import ADAPTER_DIR, list_checkpoints
from minipeft.training.config import TrainingConfig
from minipeft.training.precision import native_bf16


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
RUN_OUTPUTS = (ADAPTER_DIR, "best", "checkpoints", "metrics.jsonl")


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
    for name in found:  # the marker says minipeft made the folder, not that it wrote every file in it
        check_ours_to_replace(output_dir / name, "--output_dir")


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir``; mark it as minipeft's when it is new or empty (a user's folder stays unmarked)."""
    output_dir = Path(output_dir)
    new = not output_dir.exists() or is_empty_directory(output_dir)
    make_directory(output_dir)
    if new:
        mark_as_ours(output_dir)
        record_as_ours(output_dir / "metrics.jsonl")  # appended to, not written atomically: recorded beforehand

