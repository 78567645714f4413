"""NF4: the 4-bit NormalFloat base of QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

QLoRA trains an ordinary LoRA adapter on a base model whose frozen linear weights are stored in 4 bits::

     packed codes (uint8, 2 per byte) ──┐
     absmax codes (uint8, 1 per 64)  ──►├─► dequantize (compute dtype) ──► W x ──┐
     absmax scales (fp32, 1 per 64·256) ┘                                         + ──► h = W_nf4 x + s · B A x
     x ──────────────────────────────────────────► dropout ─► A ─► B (fp32) ──────┘

The format (the 16 levels, block-wise absmax, packing, double quantization, memory per weight) is
:mod:`minipeft.quantization.nf4_format`: about 4.13 bits per weight, so SmolLM2-135M's linear layers take ≈ 54.8 MB
instead of 425 MB. Embeddings, norms and the LM head stay in full precision (bitsandbytes' default), unless
``quantize_lm_head``.

**Forward.** :class:`Linear4bit` dequantizes its weight in the compute dtype (bfloat16 where the hardware
has native bf16 matmuls, else float32), multiplies, and throws the dense weight away; the backward pass
dequantizes again instead of keeping it, so a training step never holds the whole base in full precision.
The base is frozen: only ``x`` gets a gradient through it.
"""

import gc
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from minipeft.core.inject import QuantizedLinear, replace_module
from minipeft.quantization.nf4_format import NF4Weight, dequantize_nf4, quantize_nf4


def default_compute_dtype(device=None) -> torch.dtype:
    """bfloat16 where matmuls in it are native (CUDA with bf16; CPUs with AVX512-BF16 or AMX), else float32."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else torch.float32


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ Wᵀ`` with ``W`` dequantized in the forward pass and again in the backward pass: the dense
    ``(out, in)`` weight lives only inside each call, never until the backward. No gradient for ``W``."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype, transient=True).T  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.layer.dequantize(grad_output.dtype, transient=True)
        return grad_output @ weight, None  # (..., out) @ (out, in) -> (..., in)


class Linear4bit(QuantizedLinear):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` whose weight is stored in NF4 (see the module docstring).

    The quantized weight is always the ``(out, in)`` view (``Conv1D``'s ``(in, out)`` weight is transposed
    once, before quantizing, as bitsandbytes does), so the blocks run along input rows for both layer kinds.
    The bias stays in full precision. ``fan_in_fan_out`` remembers the original layout: the adapter files
    of a LoRA on this layer are the same as on the float layer.

    Shapes: ``x (..., in) -> (..., out)``; computed in ``compute_dtype``, returned in ``x``'s dtype.
    """

    STATE = ("packed", "absmax", "absmax_codes", "absmax_scales", "absmax_offset")  # NF4Weight's tensors
    merge_refusal = ("cannot merge into a 4-bit (NF4) base layer; dequantize the base first "
                     "(minipeft.quantization.nf4.dequantize_model; `python -m minipeft merge` does it and says so)")

    def __init__(self, layer: nn.Module, double_quant: bool = True, compute_dtype: torch.dtype = None):
        super().__init__()
        if isinstance(layer, Conv1D):
            self.in_features, self.out_features = layer.weight.shape
            weight = layer.weight.detach().T  # (in, out) -> (out, in)
        elif isinstance(layer, nn.Linear):
            self.in_features, self.out_features = layer.in_features, layer.out_features
            weight = layer.weight.detach()
        else:
            raise TypeError(f"Linear4bit quantizes nn.Linear and Conv1D, not {type(layer).__name__}")
        self.fan_in_fan_out = isinstance(layer, Conv1D)
        self.original_dtype = layer.weight.dtype
        self.compute_dtype = compute_dtype or default_compute_dtype(layer.weight.device)
        quantized = quantize_nf4(weight, double_quant)
        self.blocksize = quantized.blocksize
        for name in self.STATE:
            self.register_buffer(name, getattr(quantized, name))  # None for the state this layer does not use
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.dequantize_with = None  # (weight, dtype, transient) -> the same bits, faster (minipeft.fast.nf4_dequant)

    def store_codes_as_parameters(self) -> None:
        """Hold the integer codes (``packed``, ``absmax_codes``) as frozen uint8 parameters instead of buffers,
        same names and bytes: FSDP2 shards parameters only (:mod:`minipeft.training.sharding`), and never casts
        integers to bf16. The float32 scales stay buffers, replicated and never cast: with double quantization
        that is 32 bits per 64·256 weights, 0.05% of the 4-bit bytes (without it, the float32 ``absmax``: 11%)."""
        for name in ("packed", "absmax_codes"):
            if self._buffers.get(name) is not None:
                codes = self._buffers.pop(name)
                self.register_parameter(name, nn.Parameter(codes, requires_grad=False))

    def counted_weights(self) -> int:
        """2 weights per packed byte, as peft counts (the float layer's count, plus one for an odd size's padding)."""
        return 2 * self.packed.numel()

    def quantized_weight(self) -> NF4Weight:
        return NF4Weight(shape=(self.out_features, self.in_features), blocksize=self.blocksize,
                         **{name: getattr(self, name) for name in self.STATE})

    def dequantize(self, dtype: torch.dtype = torch.float32, transient: bool = False) -> torch.Tensor:
        """The weight as ``(out, in)`` in ``dtype``: a new tensor on each call, unless ``transient`` (the caller
        multiplies with it at once and keeps nothing), where a fast path may write it into memory it reuses."""
        fast = getattr(self, "dequantize_with", None)
        if fast is None:
            return dequantize_nf4(self.quantized_weight(), dtype)
        return fast(self.quantized_weight(), dtype, transient)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the original layer's layout (``Conv1D``: ``(in, out)``), float32. A new
        tensor on every read, for code that reads ``layer.weight`` (DoRA's row norms); writing to it changes
        nothing, so merging refuses a 4-bit base (:func:`dequantize_model` first)."""
        weight = self.dequantize(torch.float32)
        return weight.T if self.fan_in_fan_out else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = _DequantizedMatmul.apply(x.to(self.compute_dtype), self)  # (..., out)
        if self.bias is not None:
            result = result + self.bias.to(self.compute_dtype)
        return result.to(x.dtype)

    def to_dense(self, dtype: torch.dtype = None) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) holding the dequantized weight, in ``dtype`` (default: the
        original layer's)."""
        dtype = dtype or self.original_dtype
        weight = self.dequantize(torch.float32)  # (out, in)
        device = weight.device
        if self.fan_in_fan_out:
            layer = Conv1D(self.out_features, self.in_features).to(device=device, dtype=dtype)
            weight = weight.T
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        layer.requires_grad_(False)
        return layer

    def extra_repr(self) -> str:
        quant = "nf4 + double quant" if self.absmax is None else "nf4"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{quant}, blocksize={self.blocksize}, compute_dtype={self.compute_dtype}")


# --- whole models -------------------------------------------------------------------------------------------

QUANTIZE_CHOICES = ("none", "nf4")


def quantizable_layers(model: nn.Module, quantize_lm_head: bool = False) -> list:
    """Names of the ``nn.Linear``/``Conv1D`` layers that :func:`quantize_model` replaces: all of them except
    the output head (unless ``quantize_lm_head``); embeddings and norms are not linear layers."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and (quantize_lm_head or module is not head)]


def quantize_model(model: nn.Module, quantize_lm_head: bool = False, double_quant: bool = True,
                   compute_dtype: torch.dtype = None) -> list:
    """Replace every linear layer of ``model`` by a :class:`Linear4bit`, in place, one layer at a time: each
    float weight is freed as soon as its layer is quantized. Returns the names of the replaced layers."""
    names = quantizable_layers(model, quantize_lm_head)
    for name in names:
        layer = model.get_submodule(name)
        replace_module(model, name, Linear4bit(layer, double_quant, compute_dtype))
        del layer  # the float weight's last reference (unless tied to another module)
    gc.collect()
    model.is_quantized_nf4 = True
    return names


def dequantize_model(model: nn.Module, dtype: torch.dtype = None) -> int:
    """Replace every :class:`Linear4bit` in ``model`` (also inside adapter layers) by its dense float layer,
    in place; returns how many. Used before merging an adapter trained on a 4-bit base."""
    names = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_dense(dtype))
    if hasattr(model, "is_quantized_nf4"):
        del model.is_quantized_nf4
    return len(names)


def has_4bit_layers(model: nn.Module) -> bool:
    return any(isinstance(module, Linear4bit) for module in model.modules())


@dataclass
class MemoryStats:
    """The base model's weight memory, float vs NF4 (real bytes of parameters and quantization buffers)."""

    linear_params: int          # weights in the quantized layers (biases not included)
    linear_float_bytes: int     # those weights in their original float dtype
    linear_nf4_bytes: int       # packed codes + absmax state
    other_bytes: int            # everything else (embeddings, norms, biases, a full-precision LM head)
    packed_bytes: int           # the packed codes alone (peft counts each byte as 2 parameters)
    float_params_total: int     # every parameter of the float model

    def lines(self) -> list:
        bits = 8 * self.linear_nf4_bytes / self.linear_params
        before = self.linear_float_bytes + self.other_bytes
        after = self.linear_nf4_bytes + self.other_bytes
        peft_total = self.float_params_total - self.linear_params + 2 * self.packed_bytes
        return [
            f"Quantized linear weights: {self.linear_params:,} weights, {self.linear_float_bytes / 1e6:,.1f} MB -> "
            f"{self.linear_nf4_bytes / 1e6:,.1f} MB ({bits:.3f} bits per weight, "
            f"{self.linear_nf4_bytes / self.linear_float_bytes:.4f}x; real bytes)",
            f"Base model memory: {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB ({after / before:.3f}x; real bytes, "
            f"embeddings/norms/biases unchanged)",
            f"Bytes per base parameter: {before / self.float_params_total:.3f} -> "
            f"{after / self.float_params_total:.3f} (real bytes / {self.float_params_total:,} float parameters)",
            f"Total parameters as peft counts a 4-bit model: {peft_total:,} (packed 4-bit weights as 2 per byte; "
            f"padding included); as weights: {self.float_params_total:,}",
        ]


def memory_stats(model: nn.Module) -> MemoryStats:
    """:class:`MemoryStats` of a model whose linear layers are (some of them) :class:`Linear4bit`."""
    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    linear_params = sum(layer.in_features * layer.out_features for layer in layers)
    float_bytes = sum(layer.in_features * layer.out_features * torch.finfo(layer.original_dtype).bits // 8
                      for layer in layers)
    nf4_bytes = sum(layer.quantized_weight().nbytes() for layer in layers)
    packed_bytes = sum(layer.packed.numel() for layer in layers)
    parameters = list(model.parameters())
    other = sum(p.numel() * p.element_size() for p in parameters)
    return MemoryStats(linear_params, float_bytes, nf4_bytes, other, packed_bytes,
                       sum(p.numel() for p in parameters) + linear_params)
