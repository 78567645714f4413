"""NF4 dequantization in one pass over the weight (reference: :func:`minipeft.quantization.nf4_format.dequantize_nf4`).

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

one read of the codes and one write of the result. The absmaxes (``n/64`` values, double-quantized) are
dequantized by the reference function first: they are 1/64 of the work, and computing them the same way keeps
the result bit for bit the reference's (``tests/test_fast_nf4_dequant.py``). Weights whose size is not a
whole number of blocks (never a real model's linear layer) take the reference path. Without a C++ compiler
the kernel cannot be built: the reference is used, and the run says so once.

:func:`fused_nf4_dequantization` switches it on for every 4-bit layer of a model (each layer's
``dequantize_with``, an attribute of minipeft's own layer) and back off on exit.
"""

import shutil
import warnings
from contextlib import contextmanager

import torch

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


def dequantize_nf4_fused(weight: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as ``weight.shape`` in ``dtype``, equal bit for bit to :func:`dequantize_nf4`."""
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


@contextmanager
def fused_nf4_dequantization(model: torch.nn.Module):
    """Within the ``with``: every :class:`Linear4bit` of ``model`` dequantizes with :func:`dequantize_nf4_fused`."""
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.dequantize_with = dequantize_nf4_fused
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.dequantize_with = None
