"""Every optimisation, apart from the reference code it speeds up. A training run switches them on.

Each module here computes what a reference elsewhere in minipeft computes, in less time or memory, and has a
test that it equals that reference (outputs and gradients, stated tolerances):

- :mod:`~minipeft.fast.loss`: logits only at the target positions, the head fused into the cross-entropy
  (reference :func:`minipeft.training.loss.causal_lm_loss_sum`; ``tests/test_fast_loss.py``);
- :mod:`~minipeft.fast.lora_dropout`: LoRA's dropout drawn by its gaps on a CPU, ``x`` kept instead of a
  masked copy (reference :class:`minipeft.methods.lora.LoRALinear`; ``tests/test_fast_lora_dropout.py``);
- :mod:`~minipeft.fast.rms_norm`: Llama's RMSNorm with a hand-written backward that keeps a third of the
  memory (reference: transformers' own norm; ``tests/test_fast_rms_norm.py``);
- :func:`~minipeft.core.c_heap.large_tensors_mapped`: on a CPU, tensors of 1 MiB and more in mappings of their
  own, so the forward's freed temporaries do not stay resident between the activations it keeps (reference:
  the C library's default heap; ``tests/test_c_heap.py``);
- :mod:`~minipeft.fast.compile`: ``--compile``, the transformer blocks through ``torch.compile`` (reference:
  the eager blocks; ``tests/test_fast_compile.py``);
- :mod:`~minipeft.fast.nf4_dequant` and :mod:`~minipeft.fast.nf4_cpu_kernel`: a 4-bit layer's weight
  dequantized in one pass (on a CPU by a small C kernel, into a reused buffer), bit for bit the reference
  :func:`minipeft.quantization.nf4_format.dequantize_nf4` (``tests/test_fast_nf4_kernel.py``,
  ``tests/test_fast_nf4_dequant.py``). Training runs switch it on, and so does generation
  (:func:`fast_generation`).

:func:`switched_on` is where a run turns on the module swaps. Every swap goes through
:func:`~minipeft.fast.swap.swapped_in`: it sets a parent's attribute (as adapter injection does), never a class
or a ``forward`` of transformers, and puts the very same modules back on the way out, without raising.
The loss is chosen by the run itself (:func:`minipeft.training.loop.start_run`).
"""

from contextlib import ExitStack, contextmanager

import torch

from minipeft.core.c_heap import large_tensors_mapped
from minipeft.fast.compile import compiled_blocks
from minipeft.fast.lora_dropout import dropout_by_gaps
from minipeft.fast.nf4_dequant import fused_nf4_dequantization
from minipeft.fast.rms_norm import use_memory_lean_rms_norm


@contextmanager
def switched_on(model: torch.nn.Module, device: torch.device, compile: bool, warn=None):
    """Within the ``with``: the optimisations of a training run on ``model`` (a PeftModel) on ``device``.

    - on a CPU, LoRA's dropout by its gaps (a GPU draws per entry in one fused kernel), 4-bit layers
      dequantized by the C kernel, and large tensors in mappings of their own (peak memory is what the step
      holds);
    - with ``compile``, the blocks compiled; without, Llama-style norms memory-lean (compiled blocks fuse them
      anyway).
    """
    with ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(dropout_by_gaps(model, warn))  # before compiling: the graph sees the swap
            stack.enter_context(fused_nf4_dequantization(model, cpu_only=True))
            stack.enter_context(large_tensors_mapped(warn=warn))
        if compile:
            stack.enter_context(compiled_blocks(model, device, warn))
        else:
            stack.enter_context(use_memory_lean_rms_norm(model, warn))
        yield


@contextmanager
def fast_generation(model: torch.nn.Module):
    """Within the ``with``: generation's optimisations on ``model``: its 4-bit layers on a CPU dequantized by the
    C kernel into a reused buffer (a token multiplies each weight once, so dequantizing is a token's cost)."""
    with fused_nf4_dequantization(model, cpu_only=True):
        yield
