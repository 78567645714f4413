"""NF4, the format: QLoRA's 4-bit NormalFloat codes (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

How a float weight becomes 4-bit codes and back, bit for bit as bitsandbytes does it. The layer that stores its
weight this way, and quantizing whole models: :mod:`minipeft.quantization.nf4`.

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
"""

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F


BLOCKSIZE = 64          # weights per absmax
ABSMAX_BLOCKSIZE = 256  # absmaxes per second-level scale (double quantization)

# bitsandbytes' NF4 table (bitsandbytes/backends/utils.py, _NF4_QUANT_TABLE), float32, sorted.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32, device="cpu")  # cpu even if first imported under a `with torch.device("meta")`

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
        boundaries = torch.linspace(0.1, 1, 2 ** exponent + 1, dtype=torch.float32, device="cpu")
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # 2^exponent levels, midway between boundaries
        levels += ((10 ** (exponent - 6)) * means).tolist()
        levels += (-(10 ** (exponent - 6)) * means).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32, device="cpu")


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


QUANTIZE_CHUNK = 1 << 22  # weights quantized at a time (a multiple of 2 and of any block size up to 2^21)


def quantize_4bit_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE):
    """Block-wise NF4 quantization: ``(packed uint8 (ceil(n/2),), absmax float32 (ceil(n/blocksize),))``.

    ``weight`` is read flattened row by row (any shape); codes are packed two per byte, high nibble first.
    Blocks are independent, so a large weight is quantized :data:`QUANTIZE_CHUNK` weights at a time (whole
    blocks, whole bytes): the float32 and index temporaries are those of one chunk (~100 MB), not of the
    weight, and the result is the same bits.
    """
    n = weight.numel()
    if n > QUANTIZE_CHUNK and QUANTIZE_CHUNK % blocksize == 0:
        flat = weight.reshape(-1)
        parts = [quantize_4bit_nf4(flat[start:start + QUANTIZE_CHUNK], blocksize)
                 for start in range(0, n, QUANTIZE_CHUNK)]
        return torch.cat([packed for packed, _ in parts]), torch.cat([absmax for _, absmax in parts])
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
