"""Training in bf16: which hardware computes it natively, and where the frozen weights live.

**Where bf16 is native.** A CUDA GPU that says so (``torch.cuda.is_bf16_supported()``), and an x86 CPU with
AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``) in ``/proc/cpuinfo``: there a bf16 matmul is several
times faster than fp32 (AMX: ~14× on the machine of ``docs/benchmarks.md``). Elsewhere oneDNN *emulates*
bf16 and it can be 80× slower than fp32, so ``--precision auto`` picks fp32 there.

**Mixed precision for a frozen base.** Autocast keeps every weight in float32 and casts it to bf16 at each
matmul, every forward: for a full fine-tune that float32 copy is the optimizer's master weight, but a
frozen base weight is never updated, so its float32 copy only costs memory (4 bytes a weight instead of 2)
and a cast per use (autocast caches casts only for weights that require grad). :func:`cast_frozen_weights`
therefore stores the *frozen* floating-point parameters in bf16 once, and leaves every trainable parameter
(LoRA A/B, adapters, prompts, an unfrozen head) in float32, so the optimizer still updates float32 masters;
autocast stays on and casts those small trainable weights to bf16 for their matmuls. Buffers are left
alone (Llama's rotary ``inv_freq`` must stay float32). Same FLOPs, half the weight memory, no per-step
cast of the base; the residual stream then runs in bf16 (as with a model loaded with ``dtype=bfloat16``).
"""

from functools import lru_cache

import torch

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.virtual_tokens import PromptEncoder

LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware (CUDA with bf16; CPU with AMX or AVX512_BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return False


def adapter_added_parameters(model: torch.nn.Module) -> set:
    """``id()`` of every parameter a method *added*: what its layers and prompt encoder declare
    (``adapter_parameters()``, never the frozen ``base_layer`` inside; a ``modules_to_save`` copy is not added)."""
    ids = set()
    for module in model.modules():
        if isinstance(module, (AdapterLayer, PromptEncoder)):
            ids.update(id(parameter) for parameter in module.adapter_parameters().values())
    return ids


def trains_base_weights(model: torch.nn.Module) -> bool:
    """Whether a parameter of the base (not one a method added) trains: BitFit, selective fine-tuning,
    ``modules_to_save``, LoRA ``bias="all"``. Such a run keeps its base in float32 (see below)."""
    added = adapter_added_parameters(model)
    return any(parameter.requires_grad and id(parameter) not in added for parameter in model.parameters())


def load_dtype(precision: str) -> torch.dtype:
    """The dtype a run loads its base model in: bfloat16 for a bf16 run (the frozen weights would be stored
    in it anyway, so float32 never needs to exist), else float32 (fp16 runs keep float32 weights: autocast)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cast_frozen_weights(model: torch.nn.Module, precision: str) -> int:
    """Store the frozen floating-point parameters of ``model`` in bf16/fp16 (``precision``), in place.

    Trainable parameters stay as they are (float32: the optimizer's masters). A parameter shared by
    several modules (tied embeddings) is cast once. No-op for ``fp32``, and when a *base* parameter trains
    (BitFit, selective fine-tuning, ``modules_to_save``, LoRA ``bias="all"``): a float32 bias or norm inside
    a bf16 layer would work under autocast but not in a later plain forward (generation), so such runs keep
    autocast's float32 weights. Returns how many parameters were cast.
    """
    dtype = LOW_PRECISION_DTYPES.get(precision)
    if dtype is None:
        return 0
    if trains_base_weights(model):
        return 0
    cast = 0
    for parameter in model.parameters():  # each shared parameter once
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            cast += 1
    return cast
