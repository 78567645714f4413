"""What a run sets up before its first step: the precision and gradient checkpointing.

- ``--precision auto`` becomes bf16 where the hardware computes it natively, else fp32
  (:func:`resolve_precision`); the forward pass then runs under :func:`autocast_for`'s context;
- ``--gradient_checkpointing`` recomputes activations in the backward (:func:`enable_gradient_checkpointing`).

The output directory is opened, checked and locked by :mod:`minipeft.training.run_dir`.
"""

from contextlib import nullcontext

import torch

from minipeft.core.errors import UserError
from minipeft.core.transformers_api import enable_activation_checkpointing
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

