"""NF4: the 4-bit NormalFloat base of QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

QLoRA trains an ordinary LoRA adapter on a base model whose frozen linear weights are stored in 4 bits::

     packed codes (uint8, 2 per byte) ──┐
     absmax codes (uint8, 1 per 64)  ──►├─► dequantize (compute dtype) ──► W x ──┐
     absmax scales (fp32, 1 per 64·256) ┘                                         + ──► h = W_nf4 x + s · B A x
     x ──────────────────────────────────────────► dropout ─► A ─► B (fp32) ──────┘

**The 16 NormalFloat levels.** Pretrained weights are roughly normal with mean 0. A 4-bit code has 16
values; NF4 puts them at *quantiles* of N(0, 1), so that each code is used about equally often, then scales
them to [-1, 1]. With ``δ = 0.9677083`` (a tail cut-off: ½ (1 - 1/(2·15) + 1 - 1/(2·16)), so the outermost
quantile is finite) and ``Φ⁻¹`` the normal quantile function:

    positive: Φ⁻¹(p) for 8 evenly spaced p from δ down to 0.5 (the last one, 0.5, dropped)  -> 8 values
    negative: -Φ⁻¹(p) for 7 evenly spaced p from δ down to 0.5 (0.5 dropped)               -> 7 values
    zero:     0 exactly (zero weights and padding stay exact)                              -> 1 value
    levels  = sorted(all 16) / max|·|                                                       in [-1, 1]

It is asymmetric (8 positive, 7 negative levels) so that 0 is a level. :func:`derive_nf4_levels` computes
this; :data:`NF4_LEVELS` is bitsandbytes' published float32 table (the two agree to ~1e-7), used so our
codes equal bitsandbytes' bit for bit.

**Block-wise absmax.** The weight, flattened row by row, is cut into blocks of 64 values; each block is
divided by its largest ``|w|`` (``absmax``, one float32 per block) and each value gets the code of the
nearest level (ties and the exact rule: nearest by the midpoints between levels, as bitsandbytes does)::

    code_i = argmin_k |w_i / absmax_block - level_k|          w_i ≈ level[code_i] · absmax_block

**Packing.** Two codes per byte, the first value of each pair in the high nibble: ``byte = c_0 << 4 | c_1``
(bitsandbytes' order). A ``(out, in)`` weight becomes ``out·in / 2`` bytes.

**Double quantization** (QLoRA §3). One float32 absmax per 64 weights costs 32/64 = 0.5 bit per weight. The
absmaxes are themselves quantized: subtract their mean (``offset``, they are all positive), then quantize to
8 bits block-wise (blocks of 256 absmaxes, one float32 scale per block) with bitsandbytes' signed 8-bit
*dynamic* code (:func:`dynamic_8bit_levels`). bitsandbytes' CPU kernel picks each 8-bit code through a
65,536-entry lookup table over [-1, 1] rather than by exact nearest level (:func:`quantize_8bit_dynamic`);
we do the same, so the 8-bit codes match too (it differs from exact nearest in ~0.2% of the scales, by one
code, at values that lie almost exactly between two levels).

**Memory per weight** (bits):

    without double quantization:  4 + 32/64                  = 4.5      (0.1406 of float32)
    with double quantization:     4 + 8/64 + 32/(64·256)     = 4.127    (0.1290 of float32)

so SmolLM2-135M's linear layers (106.2 M weights, 425 MB in float32) take ≈ 54.8 MB. Embeddings, norms and
the LM head stay in full precision (bitsandbytes' default), unless ``quantize_lm_head``.

**Forward.** :class:`Linear4bit` dequantizes its weight in the compute dtype (bfloat16 where the hardware
has native bf16 matmuls, else float32), multiplies, and throws the dense weight away; the backward pass
dequantizes again instead of keeping it, so a training step never holds the whole base in full precision.
The base is frozen: only ``x`` gets a gradient through it.
"""

import gc
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from minipeft.errors import UserError

BLOCKSIZE = 64          # weights per absmax
ABSMAX_BLOCKSIZE = 256  # absmaxes per second-level scale (double quantization)

# bitsandbytes' NF4 table (bitsandbytes/backends/utils.py, _NF4_QUANT_TABLE), float32, sorted.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)

# Both levels of every possible byte: PAIR_LEVELS[byte] = (level[byte >> 4], level[byte & 15]), (256, 2).
# Dequantizing is then one gather per byte instead of two shifts and two gathers.
PAIR_LEVELS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], dim=1)


def derive_nf4_levels(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels from normal quantiles (see the module docstring), in float64, sorted."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return levels / levels.abs().max()


def dynamic_8bit_levels() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map``), 256 sorted float32 levels in [-1, 1].

    Dettmers 2015: after the sign, the number of leading zero bits is a decimal exponent ``e`` (0..6) and
    the remaining bits are a linear fraction, so there are ``2^e`` levels per sign in ``10^(e-6)·(0.1, 1]``:
    fine steps near zero, coarse near one. Plus 0 and 1: 2·(1+2+...+64) + 2 = 256 levels.
    """
    levels = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # 2^exponent levels, midway between boundaries
        levels += ((10 ** (exponent - 6)) * means).tolist()
        levels += (-(10 ** (exponent - 6)) * means).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32)


DYNAMIC_8BIT_LEVELS = dynamic_8bit_levels()


def _blocks(values: torch.Tensor, blocksize: int):
    """Flatten ``values`` to float32, zero-pad to whole blocks: ``((n_blocks, blocksize), absmax (n_blocks,))``.
    A zero-padded tail does not change its block's absmax."""
    flat = values.reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def _scaled(blocks: torch.Tensor, absmax: torch.Tensor, n: int) -> torch.Tensor:
    """Each value divided by its block's absmax (as ``x · (1/absmax)``, bitsandbytes' rounding), in [-1, 1]."""
    inverse = 1.0 / absmax.clamp(min=1e-38)  # an all-zero block stays zero
    return torch.clamp(blocks * inverse[:, None], -1, 1).reshape(-1)[:n]


def quantize_4bit_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE):
    """Block-wise NF4 quantization: ``(packed uint8 (ceil(n/2),), absmax float32 (ceil(n/blocksize),))``.

    ``weight`` is read flattened row by row (any shape); codes are packed two per byte, high nibble first.
    """
    n = weight.numel()
    blocks, absmax = _blocks(weight, blocksize)
    midpoints = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2  # 15 decision boundaries between the 16 levels
    scaled = F.pad(_scaled(blocks, absmax, n), (0, n % 2))  # an odd count gets one more value, 0, to fill a byte
    codes = torch.bucketize(scaled, midpoints.to(weight.device)).to(torch.uint8)  # (n or n+1,), codes 0..15
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),)
    return packed, absmax


def quantize_8bit_dynamic(values: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE):
    """Block-wise 8-bit quantization with :data:`DYNAMIC_8BIT_LEVELS`: ``(codes uint8 (n,), absmax (n_blocks,))``.

    The code of each scaled value ``v ∈ [-1, 1]`` is looked up as bitsandbytes' CPU kernel does: ``v`` is
    rounded to one of 65,536 evenly spaced points ``t_j = -1 + 2j/65535`` (``j = ⌊(v+1)/2 · 65535 + ½⌋``)
    and gets the level nearest to ``t_j``. This is exact nearest up to one grid step (3e-5).
    """
    n = values.numel()
    blocks, absmax = _blocks(values, blocksize)
    levels = DYNAMIC_8BIT_LEVELS.to(values.device)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=values.device)) / 65535.0
    table = torch.searchsorted((levels[:-1] + levels[1:]) * 0.5, grid)  # level index for every grid point
    grid_index = (((_scaled(blocks, absmax, n) + 1.0) * 0.5) * 65535.0 + 0.5).long()  # (n,), in 0..65535
    return table[grid_index].to(torch.uint8), absmax


def dequantize_8bit_dynamic(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE):
    """Inverse of :func:`quantize_8bit_dynamic`: ``level[code] · absmax_block``, float32, shape ``(n,)``."""
    n = codes.numel()
    values = DYNAMIC_8BIT_LEVELS.to(codes.device)[codes.long()]
    return (F.pad(values, (0, -n % blocksize)).view(-1, blocksize) * absmax[:, None]).reshape(-1)[:n]


@dataclass
class NF4Weight:
    """A weight in NF4: what :class:`Linear4bit` keeps instead of its float tensor.

    Attributes:
        packed: uint8 ``(ceil(n/2),)``, two codes per byte.
        absmax: float32 ``(n_blocks,)`` without double quantization, else None.
        absmax_codes: uint8 ``(n_blocks,)``, the absmaxes minus ``absmax_offset`` in 8 bits (double quant).
        absmax_scales: float32 ``(ceil(n_blocks/256),)``, one per 256 absmaxes (double quant).
        absmax_offset: float32 ``()``, the mean absmax (double quant).
        shape: the weight's shape; blocksize: weights per absmax (64).
    """

    packed: torch.Tensor
    shape: tuple
    absmax: torch.Tensor = None
    absmax_codes: torch.Tensor = None
    absmax_scales: torch.Tensor = None
    absmax_offset: torch.Tensor = None
    blocksize: int = BLOCKSIZE

    def tensors(self) -> dict:
        names = ("packed", "absmax", "absmax_codes", "absmax_scales", "absmax_offset")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def nbytes(self) -> int:
        """The real storage in bytes."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.tensors().values())


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> NF4Weight:
    """Quantize a float tensor to NF4 (bitsandbytes' ``quantize_4bit(quant_type="nf4",
    compress_statistics=double_quant)``, bit for bit)."""
    packed, absmax = quantize_4bit_nf4(weight, blocksize)
    if not double_quant:
        return NF4Weight(packed, tuple(weight.shape), absmax=absmax, blocksize=blocksize)
    offset = absmax.mean()  # absmaxes are all positive; centre them so the signed 8-bit code fits them
    codes, scales = quantize_8bit_dynamic(absmax - offset, ABSMAX_BLOCKSIZE)
    return NF4Weight(packed, tuple(weight.shape), absmax_codes=codes, absmax_scales=scales, absmax_offset=offset,
                     blocksize=blocksize)


def dequantize_nf4(weight: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``level[code] · absmax_block`` in float32, cast to ``dtype`` (bitsandbytes' ``dequantize_4bit``)."""
    absmax = weight.absmax
    if absmax is None:  # double quantization: absmax ≈ dequantized 8-bit code + offset
        absmax = dequantize_8bit_dynamic(weight.absmax_codes, weight.absmax_scales) + weight.absmax_offset
    n = math.prod(weight.shape)
    pairs = PAIR_LEVELS.to(weight.packed.device).index_select(0, weight.packed.int())  # (bytes, 2) float32
    values = pairs.view(-1)  # (2·bytes,): one more than n when n is odd
    if values.numel() != n or n % weight.blocksize:
        values = F.pad(values[:n], (0, -n % weight.blocksize))  # whole blocks
    values = values.view(-1, weight.blocksize) * absmax[:, None]  # (n_blocks, 64) · (n_blocks, 1)
    return values.view(-1)[:n].view(weight.shape).to(dtype)


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
        return x @ layer.dequantize(x.dtype).T  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ ctx.layer.dequantize(grad_output.dtype), None  # (..., out) @ (out, in) -> (..., in)


class Linear4bit(nn.Module):
    """A frozen ``nn.Linear`` or GPT-2 ``Conv1D`` whose weight is stored in NF4 (see the module docstring).

    The quantized weight is always the ``(out, in)`` view (``Conv1D``'s ``(in, out)`` weight is transposed
    once, before quantizing, as bitsandbytes does), so the blocks run along input rows for both layer kinds.
    The bias stays in full precision. ``fan_in_fan_out`` remembers the original layout: the adapter files
    of a LoRA on this layer are the same as on the float layer.

    Shapes: ``x (..., in) -> (..., out)``; computed in ``compute_dtype``, returned in ``x``'s dtype.
    """

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
        for name in ("packed", "absmax", "absmax_codes", "absmax_scales", "absmax_offset"):
            self.register_buffer(name, getattr(quantized, name))  # None for the state this layer does not use
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def quantized_weight(self) -> NF4Weight:
        return NF4Weight(shape=(self.out_features, self.in_features), blocksize=self.blocksize,
                         **{name: tensor for name, tensor in self.named_buffers(recurse=False)})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``(out, in)`` in ``dtype``: a new tensor on each call."""
        return dequantize_nf4(self.quantized_weight(), dtype)

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
    from minipeft.inject import replace_module

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
    from minipeft.inject import replace_module

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


# --- command-line flags and the checks that go with them ------------------------------------------------------

def add_quantize_arguments(parser, from_adapter: bool = False) -> None:
    """``--quantize`` and ``--quantize_lm_head``. With ``from_adapter`` (generate, merge) the default is what
    the adapter was trained on (recorded in its ``adapter_config.json``), else none."""
    default = "the adapter's, else none" if from_adapter else "none"
    parser.add_argument("--quantize", default=None if from_adapter else "none",
                        help=f"none or nf4: store the frozen base's linear layers in 4-bit NormalFloat (QLoRA); "
                             f"embeddings, norms and the LM head stay in full precision (default: {default})")
    parser.add_argument("--quantize_lm_head", action="store_true", default=None if from_adapter else False,
                        help="with --quantize nf4: quantize the output head too")


def resolve_quantize(args, adapter_dir=None, log=print) -> None:
    """Fill ``args.quantize``/``args.quantize_lm_head`` left unset from the adapter's record (generate, merge)."""
    recorded = {}
    if adapter_dir is not None:
        from minipeft.adapter_io import read_adapter_config

        recorded = (read_adapter_config(adapter_dir).get("minipeft") or {}).get("quantization") or {}
    if args.quantize is None:
        args.quantize = recorded.get("quantize", "none")
        if args.quantize != "none":
            log(f"--quantize {args.quantize}: the adapter was trained on a 4-bit ({args.quantize}) base "
                "(adapter_config.json); pass --quantize none for the full-precision base")
    if args.quantize_lm_head is None:
        args.quantize_lm_head = bool(recorded.get("quantize_lm_head", False)) and args.quantize == "nf4"


def check_quantize_arguments(args) -> bool:
    """Validate ``--quantize``/``--quantize_lm_head`` (and the method flags they rule out); True for nf4."""
    if args.quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {args.quantize!r}: choose none or nf4")
    if args.quantize == "none":
        if getattr(args, "quantize_lm_head", False):
            raise UserError("--quantize_lm_head needs --quantize nf4")
        return False
    method = getattr(args, "modification_type", None)
    if method in ("selective", "bitfit"):
        what = "base weights" if method == "selective" else "the biases of the base's linear layers"
        raise UserError(f"--quantize nf4 with --modification_type {method}: {method} trains {what}, and a 4-bit "
                        "base is frozen; use lora, dora, ia3, adapter, prefix or prompt, or --quantize none")
    if getattr(args, "lora_bias", None) == "all":
        raise UserError("--quantize nf4 with --lora_bias all: that trains every bias of the 4-bit base; "
                        "use --lora_bias none or lora_only")
    return True


def check_not_quantized_folder(name: str) -> None:
    """Refuse a folder that is not a float base model: an adapter folder, or a model already quantized."""
    import json
    from pathlib import Path

    folder = Path(name)
    if not folder.is_dir():
        return
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise UserError(f"--model {name}: is an adapter folder, not a base model; give the float base model "
                        "(--quantize nf4 quantizes it while loading) and the adapter with --adapter")
    config = folder / "config.json"
    if config.is_file():
        try:
            quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if quantization:
            raise UserError(f"--model {name}: config.json has a quantization_config "
                            f"({quantization.get('quant_method', '?')}); give the full-precision base model, "
                            "--quantize nf4 quantizes it while loading")


# --- loading, layer by layer ---------------------------------------------------------------------------------

def place_tensor(model: nn.Module, name: str, tensor: torch.Tensor, targets: set,
                 dtype: torch.dtype = torch.float32) -> None:
    """Put one checkpoint tensor into a model built on the meta device; a weight of a layer in ``targets``
    is quantized on arrival (the layer becomes a :class:`Linear4bit`), so its float copy lives only here.
    Every other tensor is stored in ``dtype`` (the 4-bit codes are those of the float32 weight either way)."""
    from minipeft.inject import replace_module

    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not (module_name in targets and attribute == "weight"):
        tensor = tensor.to(dtype)
    if attribute in module._parameters:
        setattr(module, attribute, nn.Parameter(tensor, requires_grad=False))
    else:
        module.register_buffer(attribute, tensor)
    if module_name in targets and attribute == "weight":
        replace_module(model, module_name, Linear4bit(module))  # a bias arriving later lands on the Linear4bit


def load_streaming(model: nn.Module, tensors, quantize_lm_head: bool = False,
                   dtype: torch.dtype = torch.float32) -> list:
    """Fill ``model`` (built on the meta device) from ``tensors``, an iterable of ``(name, float tensor)`` read
    one at a time, quantizing the linear layers as their weights arrive: peak memory is the quantized model
    plus one float tensor, not the float model. Embeddings, norms and biases are kept in ``dtype``.
    Returns the names of the quantized layers."""
    targets = set(quantizable_layers(model, quantize_lm_head))
    for name, tensor in tensors:
        place_tensor(model, name, tensor, targets, dtype)
        del tensor
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the head shares the embedding (it was never in the file)
    if quantize_lm_head and isinstance(model.get_output_embeddings(), nn.Linear):
        quantize_model(model, quantize_lm_head=True)  # a tied head: quantized from the embedding
    for module_name, module in model.named_modules():  # buffers computed in __init__ (rotary inv_freq)
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)) and "Rotary" in type(module).__name__:
            from minipeft.inject import replace_module

            replace_module(model, module_name, type(module)(config=model.config))
    still_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise RuntimeError(f"not in the checkpoint: {', '.join(still_meta[:5])}")
    gc.collect()
    return [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]


def gguf_tensors(path, model: nn.Module):
    """``(hf_name, float32 tensor)`` for each tensor of a GGUF file, dequantized one at a time (transformers'
    own name mapping and Llama q/k un-permutation; the file itself is memory-mapped)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, read_field)

    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    mapping = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        rows = tensor.data.shape[0]  # (rows, bytes per row) of a memory-mapped quantized tensor
        weights = None
        for start in range(0, rows, 4096):  # dequantize in row chunks: no full-size temporaries
            chunk = dequantize(tensor.data[start:start + 4096], tensor.tensor_type)
            if weights is None:
                weights = np.empty((rows, *chunk.shape[1:]), dtype=np.float32)
            weights[start:start + len(chunk)] = chunk
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=mapping,
                                   parsed_parameters={})
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))


def load_smollm2_streaming(quantize_lm_head: bool = False, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M with NF4 linear layers, quantized while its GGUF file is read (see :func:`load_streaming`);
    the rest of the model in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from minipeft.models import SMOLLM2_NAME, smollm2_gguf_path

    path = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = load_streaming(model, gguf_tensors(path, model), quantize_lm_head, dtype)
    model.config.name_or_path = model.name_or_path = SMOLLM2_NAME
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), names


def load_base_model(name: str, quantize: str = "none", quantize_lm_head: bool = False,
                    dtype: torch.dtype = torch.float32, log=print):
    """``(model, tokenizer)`` like :func:`minipeft.models.load_model_and_tokenizer`, with the linear layers in
    NF4 when ``quantize == "nf4"``. SmolLM2 streams: each tensor is quantized (from float32) as it is read
    from the file, and the rest is stored in ``dtype``. Other models are loaded in ``dtype``, then quantized
    one layer at a time, each float weight freed as soon as its layer is quantized (peak: the float model)."""
    from minipeft.models import SMOLLM2_NAME, load_model_and_tokenizer

    check_not_quantized_folder(name)
    if quantize == "nf4" and name == SMOLLM2_NAME:
        model, tokenizer, names = load_smollm2_streaming(quantize_lm_head, dtype)
    elif quantize == "nf4":
        model, tokenizer = load_model_and_tokenizer(name, dtype)
        names = quantize_model(model, quantize_lm_head)
    else:
        return load_model_and_tokenizer(name, dtype)
    layer = model.get_submodule(names[0])
    log(f"Quantized {len(names)} linear layers to NF4 (block {BLOCKSIZE}, double quant; compute dtype "
        f"{str(layer.compute_dtype).replace('torch.', '')})" + (", LM head included" if quantize_lm_head else ""))
    return model, tokenizer
