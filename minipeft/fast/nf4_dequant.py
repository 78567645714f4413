"""Faster NF4 dequantization, the reference's bits (reference: :func:`minipeft.quantization.nf4_format.dequantize_nf4`).

A :class:`~minipeft.quantization.nf4.Linear4bit` dequantizes its whole weight on every forward (and again in
the backward). The reference does it in four passes over ``n`` weights, each a full-size tensor::

    pairs  = PAIR_LEVELS[packed]            (n/2, 2) float32     gather by byte
    padded = pad(pairs)                                          (only for a ragged last block)
    scaled = pairs.view(-1, 64) · absmax    (n/64, 64) float32
    out    = scaled.to(dtype)               (out, in) dtype

:func:`dequantize_nf4_fused` computes the same numbers with one kernel written by ``torch.compile``: for each
byte, both nibbles' levels times the block's absmax, in float32, rounded once to ``dtype``::

    out[2i]   = dtype(level[packed[i] >> 4] · absmax[2i // 64])
    out[2i+1] = dtype(level[packed[i] & 15] · absmax[2i // 64])

Inductor writes it as two loops (read with ``TORCH_LOGS=output_code``): a scalar one that gathers both levels of
each byte into float32 buffers, then a vectorized one that scales and rounds; still ~2× faster than the
reference, no more, because the gather is one scalar load per weight. The absmaxes (``n/64`` values, double-quantized) are
dequantized by the reference function first: they are 1/64 of the work, and computing them the same way keeps
the result bit for bit the reference's (``tests/test_fast_nf4_dequant.py``). Weights whose size is not a
whole number of blocks (never a real model's linear layer) take the reference path. Without a C++ compiler
the kernel cannot be built: the reference is used, and the run says so once.

:func:`fused_nf4_dequantization` switches the fastest of the two for each 4-bit layer of a model on (each
layer's ``dequantize_with``, an attribute of minipeft's own layer) and back off on exit: on a CPU, the C kernel
of :mod:`minipeft.fast.nf4_cpu_kernel` (~4× faster than this one on the development machine, AVX-512), writing
the weights a layer multiplies with at once into a workspace it reuses; elsewhere (CUDA), this one.

**The workspace.** A new tensor of tens of MB is a fresh mapping from the kernel, and its first write page-faults
on every page: on the development machine, allocating a 2048 × 8192 bf16 weight costs ~5 times dequantizing it
into memory already touched. So within the ``with``, the dequantized weight of a forward or backward matmul
(``Linear4bit.dequantize(..., transient=True)``, used once and dropped) is written into one tensor per
``(size, dtype)``, reused by every layer of that size: the extra memory is one weight of each distinct size in the
compute dtype (SmolLM2-135M in bf16: 3 sizes, 2.7 MB; Llama-3.2-1B: 3 sizes, 44 MB; Llama-3.1-8B: 3 sizes, 159 MB), not a copy per layer.
Weights that outlive the call (``layer.weight``, ``to_dense``) are always new tensors.
"""

import shutil
import warnings
from contextlib import contextmanager

import torch

from minipeft.fast.nf4_cpu_kernel import dequantize_nf4_kernel, kernel_handles
from minipeft.quantization.nf4 import Linear4bit
from minipeft.quantization.nf4_format import NF4_LEVELS, NF4Weight, dequantize_8bit_dynamic, dequantize_nf4


def _levels_times_absmax(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``(n/64, 64)`` in ``dtype``: both nibbles of each byte looked up and scaled by the block's absmax."""
    high = levels[(packed >> 4).long()]  # (n/2,) float32
    low = levels[(packed & 15).long()]
    values = torch.stack([high, low], dim=-1).view(absmax.shape[0], -1)  # (n/64, 64): pairs in order
    return (values * absmax[:, None]).to(dtype)


_compiled = {}


def _kernel():
    """The compiled kernel (built once per process), or None where no C++ compiler is found."""
    if "kernel" not in _compiled:
        if shutil.which("g++") is None and shutil.which("clang++") is None:
            warnings.warn("fast NF4 dequantization needs a C++ compiler (g++); using the reference", stacklevel=3)
            _compiled["kernel"] = None
        else:
            _compiled["kernel"] = torch.compile(_levels_times_absmax, dynamic=True)
    return _compiled["kernel"]


def dequantize_nf4_fused(weight: NF4Weight, dtype: torch.dtype = torch.float32, transient: bool = False) -> torch.Tensor:
    """The weight as ``weight.shape`` in ``dtype``, equal bit for bit to :func:`dequantize_nf4` (``transient`` is
    accepted for ``Linear4bit.dequantize_with`` and changes nothing: the result is always a new tensor)."""
    n = weight.packed.numel() * 2
    with warnings.catch_warnings():  # Inductor's first import of torch.jit warns about torch.jit itself
        warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning)
        kernel = _kernel()
        if kernel is None or n % weight.blocksize or n != torch.Size(weight.shape).numel():
            return dequantize_nf4(weight, dtype)
        absmax = weight.absmax
        if absmax is None:  # double quantization: the reference's float32 absmax, n/64 values
            absmax = dequantize_8bit_dynamic(weight.absmax_codes, weight.absmax_scales) + weight.absmax_offset
        levels = NF4_LEVELS.to(weight.packed.device)
        return kernel(weight.packed, absmax, levels, dtype).view(weight.shape)


class CPUKernelDequantization:
    """``Linear4bit.dequantize_with`` on a CPU: :func:`dequantize_nf4_kernel`, a transient weight written into a
    workspace tensor per ``(size, dtype)`` (see the module docstring)."""

    def __init__(self):
        self.workspace = {}

    def __call__(self, weight: NF4Weight, dtype: torch.dtype, transient: bool = False) -> torch.Tensor:
        if not transient or not kernel_handles(weight, dtype):
            return dequantize_nf4_kernel(weight, dtype)
        size = torch.Size(weight.shape).numel()
        if (size, dtype) not in self.workspace:
            self.workspace[size, dtype] = torch.empty(size, dtype=dtype)
        return dequantize_nf4_kernel(weight, dtype, out=self.workspace[size, dtype].view(weight.shape))

    def workspace_bytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in self.workspace.values())


@contextmanager
def fused_nf4_dequantization(model: torch.nn.Module, cpu_only: bool = False):
    """Within the ``with``: every :class:`Linear4bit` of ``model`` dequantizes with the fastest function of the
    reference's bits for its device: on a CPU the C kernel (one :class:`CPUKernelDequantization`, its workspace
    shared by the model's layers and freed on exit), else :func:`dequantize_nf4_fused` (``cpu_only``: layers on
    other devices keep the reference, as runs and generation do: the compiled kernel is measured on CPUs only).
    Yields how many layers."""
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)
              and (module.packed.device.type == "cpu" or not cpu_only)]
    on_cpu = CPUKernelDequantization()
    for layer in layers:
        layer.dequantize_with = on_cpu if layer.packed.device.type == "cpu" else dequantize_nf4_fused
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.dequantize_with = None
