"""This machine's matmul peak, per precision: the FLOP/s a large, well-shaped ``torch.matmul`` reaches.

Training throughput is quoted as a share of this figure (achieved FLOP/s ÷ matmul peak), so that a
number measured on a loaded 2-core machine can be compared with one measured elsewhere. A matmul of
``(m, k) @ (k, n)`` costs ``2·m·k·n`` FLOPs; the shapes below are GPT-2 small's MLP at 2,048 tokens
(``2048×768 @ 768×3072`` and back), the largest matmuls of the benchmark's training step.

    python bench/matmul_peak.py                       # fp32 and bf16, 2 threads
    python bench/matmul_peak.py --threads 1 --seconds 5

bf16 on a CPU without native bf16 instructions (no AVX512_BF16 / AMX) is emulated by oneDNN and can be
*slower* than fp32: the script measures it rather than assuming.
"""

import argparse
import time

import torch

SHAPES = [(2048, 768, 3072), (2048, 3072, 768)]  # (m, k, n)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_flags() -> list:
    """The CPU's matmul-relevant instruction sets (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return [flag for flag in wanted if flag in flags]


def matmul_peak(precision: str, seconds: float = 2.0) -> float:
    """Best FLOP/s of ``torch.matmul`` over :data:`SHAPES` in ``precision`` ("fp32" or "bf16").

    Each shape runs repeatedly for about ``seconds``; the best single call counts (on a shared machine the
    best call is the one least disturbed by other processes, which is what a peak means).
    """
    dtype = DTYPES[precision]
    best = 0.0
    for m, k, n in SHAPES:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        torch.matmul(a, b)  # warm-up: oneDNN picks and caches its kernel
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2, this machine's cores)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per shape and precision (default: 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU flags: {' '.join(cpu_flags()) or 'unknown'}; torch {torch.__version__}, {args.threads} threads")
    peaks = {precision: matmul_peak(precision, args.seconds) for precision in DTYPES}
    for precision, peak in peaks.items():
        print(f"{precision}: {peak / 1e9:7.1f} GFLOP/s")
    print(f"bf16 / fp32: {peaks['bf16'] / peaks['fp32']:.2f}x")


if __name__ == "__main__":
    main()
