"""``--compile``: the transformer blocks through ``torch.compile``, for the length of a run.

**What it buys.** In eager mode every PyTorch operation is its own pass over memory. A Llama block in bf16
is ~7 matmuls and ~60 small operations (RMSNorm's upcast, square, mean, rsqrt, multiply, downcast; rotary's
halves, negation and products; SiLU times up; the residual adds) plus as many again in the backward, each
reading and writing a whole ``(B, T, d)`` tensor. ``torch.compile`` captures a block's ``forward`` as a graph
(TorchDynamo), derives its backward graph ahead of time (AOTAutograd), and TorchInductor writes C++/OpenMP
loops that run each chain of element-wise operations as one pass, calling oneDNN for the matmuls. SmolLM2-135M,
LoRA r=8 on every projection, bf16, no dropout, 2 AMX cores: 1.42× the eager tokens/s, 1.36× peft + the
Trainer with its own ``torch_compile=True`` (``docs/benchmarks.md``).

**What it costs.** Compiling: on 2 cores ~40–60 s for SmolLM2's training graph and ~25 s for the evaluation
graph (no gradients), once per run; ~0.5 GiB more peak memory (the written-out attention keeps its
probabilities). Inductor caches what it compiled on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under
``/tmp``): the next run of the same model starts in seconds. It pays once the steps saved outweigh that: the
README's 113-step SmolLM2 run broke even on a cold cache (6 min 14 s against 6 min 16 s eager), longer runs
or a warm cache gain. With dropout drawn on a CPU (LoRA's, or GPT-2's own 0.1) it gains nothing: the random
draws cost what the fusion saves. It needs a C++ compiler (``g++``), as TorchInductor does on a CPU.

**How, and why so.**

- *Blocks, not the model.* Every block runs the same code on its own weights; with the weights passed as
  graph inputs (``torch._dynamo``'s default for ``nn.Module``), one compiled block serves all N. The first
  block is compiled a second time, since its input does not require grad (the embedding is frozen).
- *``dynamic=True``.* Batches are padded to their longest record, so the length changes every step; a graph
  with a symbolic batch and length is compiled once, instead of once per length.
- *On a CPU, attention written out* (transformers' ``eager``: ``softmax(Q Kᵀ / √d + mask) V``) instead of
  SDPA's flash kernel: Inductor fuses the softmax and its backward, while PyTorch's CPU flash-attention
  backward in bf16 takes ~10× its forward (25 ms vs 2.6 ms for SmolLM2's 9 heads at 8 × 256). On a GPU the
  flash kernels stay.
- *No key/value cache while training* (``config.use_cache = False``): a cache is only needed to generate,
  and its state would be one more thing the compiled graph is specialised on. A prefix method's own cache is
  still passed, as with ``--gradient_checkpointing``.
- LoRA dropout on a CPU draws its mask outside the graph (:func:`minipeft.fast.lora_dropout.dropped_input_projection`,
  a graph break in each adapted layer), which costs most of the gain: SmolLM2 bf16 with ``lora_dropout=0.05``
  goes from 5.0 s to 4.4 s a step where without dropout it goes from 4.1 s to 2.6 s.

Everything is undone on exit: the blocks run uncompiled again, attention and cache settings are
restored, so generation after training runs eagerly (a KV cache grows each step, a poor fit for a graph).
"""

import shutil
from contextlib import contextmanager

import torch

from minipeft.core.errors import UserError
from minipeft.core.layers import transformer_blocks
from minipeft.fast.swap import warn_at_run_time


def check_compiler_available(device: torch.device) -> None:
    """TorchInductor compiles C++ on a CPU: without a compiler ``--compile`` would fail at the first step."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        raise UserError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; none was found: "
                        "install one, or train without --compile")


@contextmanager
def compiled_blocks(peft_model, device: torch.device, warn=None):
    """Within the ``with``: each transformer block compiled (see the module docstring); ``warn(message)``
    (default :func:`~minipeft.fast.swap.warn_at_run_time`) hears of any setting that could not be changed or put back.

    Compiling goes through torch's own ``nn.Module.compile`` (the module's call, hooks included, runs the
    compiled graph), never through an assignment to a transformers module's ``forward``; undoing it resets
    what ``compile`` set. Nothing here raises on the way out: a run never ends in a traceback because an
    optimisation could not be undone.
    """
    warn = warn or warn_at_run_time
    base_model = peft_model.base_model
    config = base_model.config
    saved_use_cache = getattr(config, "use_cache", None)
    saved_attention = getattr(config, "_attn_implementation", None)
    try:
        blocks = list(transformer_blocks(peft_model))
    except UserError:
        raise UserError(f"--compile: cannot find the transformer blocks of {type(base_model).__name__}") from None
    config.use_cache = False
    if device.type == "cpu" and saved_attention == "sdpa":
        set_attention(base_model, "eager", warn)
    for block in blocks:
        block.compile(dynamic=True)
    try:
        yield
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; the class default is None
        if getattr(config, "_attn_implementation", None) != saved_attention:
            set_attention(base_model, saved_attention, warn)
        config.use_cache = saved_use_cache


def set_attention(model, implementation: str, warn) -> None:
    """transformers' public ``set_attn_implementation``; on failure the model keeps its attention, loudly."""
    try:
        model.set_attn_implementation(implementation)
    except Exception as error:  # noqa: BLE001 (an optimisation's setting, never worth the run)
        warn(f"warning: --compile could not set the attention implementation to {implementation!r} ({error}); "
             "the model keeps its own")
