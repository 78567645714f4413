"""NF4 dequantization on the CPU in one pass of C (reference: :func:`minipeft.quantization.nf4_format.dequantize_nf4`).

A 4-bit layer dequantizes its whole weight for every forward. Generating one token multiplies each weight once
(a matrix-vector product, ~0.1 ns a weight in bf16), so the dequantization is the token's cost: the reference
takes ~1.8 ns a weight in four passes over full-size float32 tensors, and Inductor's kernel
(:mod:`minipeft.fast.nf4_dequant`) ~0.7 ns, because its 16-level lookup is a scalar gather per weight.

Here the lookup is one AVX-512 instruction for 16 weights: ``vpermps`` picks, for each of 16 lanes, one of 16
floats held in a register, which is exactly NF4's table. For 8 packed bytes (16 weights of one 64-weight block)::

    bytes  = b0 b1 ... b7                     (uint8; byte i holds weights 2i (high nibble) and 2i+1 (low))
    lanes  = b0 b0 b1 b1 ... b7 b7            (16 × int32: each byte twice)
    codes  = (lanes >> [4,0,4,0,...]) & 15    (16 × int32, in the weights' order)
    values = level[codes] · absmax[block]     (16 × float32: vpermps, then one multiply)
    out    = round_to_nearest_even(values)    (16 × bfloat16, or stored as float32)

The absmax of each block is first dequantized from its 8-bit code as the reference does
(``dynamic_level[code] · scale[block // 256] + offset``, a multiply then an add, never fused: the kernel is built
with ``-ffp-contract=off``). Every step is the reference's float32 arithmetic, so the result is the same bits
(``tests/test_fast_nf4_kernel.py``). A CPU without AVX-512 runs the same loop in plain C, one weight at a time.

The C source below is compiled once per machine by the system's C compiler (``cc``, ~1 s) into
``~/.cache/minipeft/kernels`` and called through ``ctypes`` with the tensors' data pointers; no PyTorch headers,
no ``torch.compile``. Without a compiler, :func:`nf4_kernel` is None and callers use the reference.
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from minipeft.quantization.nf4_format import (ABSMAX_BLOCKSIZE, DYNAMIC_8BIT_LEVELS, NF4_LEVELS, NF4Weight,
                                              dequantize_nf4)

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

/* float32 -> bfloat16, round to nearest even (torch's rounding; the values here are finite). */
static inline uint16_t bf16_round(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* absmax[b] = dynamic[codes[b]] * scales[b / 256] + offset, in float32, as the reference computes it. */
static void block_absmax(const uint8_t *codes, const float *scales, float offset, const float *dynamic,
                         int64_t blocks, float *absmax) {
    for (int64_t b = 0; b < blocks; b++) {
        float scaled = dynamic[codes[b]] * scales[b / 256];
        absmax[b] = scaled + offset;
    }
}

static void blocks_plain(const uint8_t *packed, const float *absmax, const float *levels, int64_t first,
                         int64_t last, int bf16, void *out) {
    for (int64_t b = first; b < last; b++) {
        for (int64_t i = b * 32; i < b * 32 + 32; i++) {
            float high = levels[packed[i] >> 4] * absmax[b], low = levels[packed[i] & 15] * absmax[b];
            if (bf16) { ((uint16_t *)out)[2 * i] = bf16_round(high); ((uint16_t *)out)[2 * i + 1] = bf16_round(low); }
            else { ((float *)out)[2 * i] = high; ((float *)out)[2 * i + 1] = low; }
        }
    }
}

__attribute__((target("avx512f")))
static void blocks_avx512(const uint8_t *packed, const float *absmax, const float *levels, int64_t first,
                          int64_t last, int bf16, void *out) {
    const __m512 table = _mm512_loadu_ps(levels);
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i low4 = _mm512_set1_epi32(15);
    const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i round_bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    for (int64_t b = first; b < last; b++) {
        const __m512 scale = _mm512_set1_ps(absmax[b]);
        for (int64_t q = 0; q < 4; q++) {                       /* 4 × 16 weights = one 64-weight block */
            const int64_t byte = b * 32 + q * 8, weight = 2 * byte;
            __m128i eight = _mm_loadl_epi64((const __m128i *)(packed + byte));   /* 8 bytes */
            __m512i lanes = _mm512_permutexvar_epi32(twice, _mm512_cvtepu8_epi32(eight));
            __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(lanes, shifts), low4);
            __m512 values = _mm512_mul_ps(_mm512_permutexvar_ps(codes, table), scale);
            if (bf16) {
                __m512i bits = _mm512_castps_si512(values);
                __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
                bits = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, round_bias), lsb), 16);
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + weight), _mm512_cvtepi32_epi16(bits));
            } else {
                _mm512_storeu_ps((float *)out + weight, values);
            }
        }
    }
}

/* The whole weight: n_blocks blocks of 64 weights (32 packed bytes each); absmax is scratch of n_blocks floats
   when codes != NULL (double quantization), else the float32 absmax itself. Rows of blocks are shared among
   `threads` OpenMP threads. */
int nf4_dequantize(const uint8_t *packed, int64_t n_blocks, float *absmax, const uint8_t *codes,
                   const float *scales, float offset, const float *dynamic, const float *levels, int bf16,
                   void *out, int threads, int allow_wide) {
    if (codes) block_absmax(codes, scales, offset, dynamic, n_blocks, absmax);
    int wide = allow_wide && __builtin_cpu_supports("avx512f");
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t part = 0; part < threads; part++) {
        int64_t first = n_blocks * part / threads, last = n_blocks * (part + 1) / threads;
        if (wide) blocks_avx512(packed, absmax, levels, first, last, bf16, out);
        else blocks_plain(packed, absmax, levels, first, last, bf16, out);
    }
    return wide;
}
"""

CACHE_DIR = Path(os.environ.get("MINIPEFT_KERNEL_CACHE", Path.home() / ".cache" / "minipeft" / "kernels"))
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
_loaded = {}


def _build() -> ctypes.CDLL:
    """Compile :data:`C_SOURCE` (once per source and flags; kept in :data:`CACHE_DIR`) and load it."""
    key = hashlib.sha256((C_SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    library = CACHE_DIR / f"nf4_dequantize_{key}.so"
    if not library.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
            source, built = Path(scratch) / "nf4.c", Path(scratch) / "nf4.so"
            source.write_text(C_SOURCE)
            subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(source), "-o", str(built)], check=True,
                           capture_output=True, text=True)
            os.replace(built, library)  # atomic: a concurrent build never loads half a file
    kernel = ctypes.CDLL(str(library))
    kernel.nf4_dequantize.restype = ctypes.c_int
    kernel.nf4_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return kernel


def nf4_kernel():
    """The compiled kernel (built once per machine, loaded once per process), or None where it cannot be built
    (no C compiler, or one that fails): then the reference is used, and the run says so once."""
    if "kernel" not in _loaded:
        try:
            _loaded["kernel"] = _build()
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            warnings.warn(f"the C NF4 kernel could not be built ({str(detail).strip()[:200]}); using the reference "
                          "dequantization", stacklevel=3)
            _loaded["kernel"] = None
    return _loaded["kernel"]


def kernel_handles(weight: NF4Weight, dtype: torch.dtype) -> bool:
    """Whether :func:`dequantize_nf4_kernel` computes ``weight`` itself (else it returns the reference's result):
    CPU tensors, float32 or bfloat16 out, whole 64-weight blocks, double quantization with 256 absmaxes a scale."""
    n = weight.packed.numel() * 2
    return (weight.packed.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and weight.blocksize == 64 and n == torch.Size(weight.shape).numel() and n % 64 == 0
            and ABSMAX_BLOCKSIZE == 256 and nf4_kernel() is not None)


def dequantize_nf4_kernel(weight: NF4Weight, dtype: torch.dtype = torch.float32, out: torch.Tensor = None,
                          wide: bool = True) -> torch.Tensor:
    """The weight as ``weight.shape`` in ``dtype``, equal bit for bit to :func:`dequantize_nf4`; written by the C
    kernel into the result directly (no float32 temporaries), or by the reference where the kernel does not apply.
    ``out``: a contiguous tensor of that shape and dtype to write into (reused memory: no page faults).
    ``wide=False``: the plain C loop even where AVX-512 is there (so every CPU's tests check both loops)."""
    if not kernel_handles(weight, dtype):
        return dequantize_nf4(weight, dtype)
    packed = weight.packed.contiguous()
    n_blocks = packed.numel() // 32
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype)
    if weight.absmax is None:  # double quantization: the kernel writes the float32 absmaxes into scratch first
        absmax = torch.empty(n_blocks, dtype=torch.float32)
        codes, scales = weight.absmax_codes.contiguous(), weight.absmax_scales.contiguous()
        codes_pointer, scales_pointer, offset = codes.data_ptr(), scales.data_ptr(), float(weight.absmax_offset)
    else:
        absmax = weight.absmax.float().contiguous()
        codes_pointer = scales_pointer = None
        offset = 0.0
    nf4_kernel().nf4_dequantize(packed.data_ptr(), n_blocks, absmax.data_ptr(), codes_pointer, scales_pointer, offset,
                                DYNAMIC_8BIT_LEVELS.data_ptr(), NF4_LEVELS.data_ptr(), int(dtype == torch.bfloat16),
                                out.data_ptr(), max(1, min(torch.get_num_threads(), n_blocks // 1024 or 1)), int(wide))
    return out
