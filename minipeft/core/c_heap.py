"""The C heap under PyTorch's CPU tensors, and the two settings of it minipeft uses.

A CPU tensor's memory comes from the C library's ``malloc`` (PyTorch keeps no cache of its own on a CPU). With
glibc, a request at or above the *mmap threshold* gets a mapping of its own, given back to the system the
moment the tensor is freed; anything smaller is carved out of the heap, and a freed piece of the heap stays
resident until ``malloc`` reuses it. The threshold starts at 128 KiB and rises (up to 32 MiB) each time a
mapped block is freed, so after the first freed activation every tensor under 32 MiB lives in the heap.

A training step's forward is exactly the bad case: it interleaves tensors autograd keeps (saved for the
backward) with temporaries it frees at once, all of 1-32 MiB at the sizes people train at. The freed
temporaries leave holes between the kept tensors that nothing smaller can fill, so the heap grows by their
size as well, and after the backward frees everything the holes stay resident. Measured on a Llama-3.2-1B
shape, LoRA, batch 4 × 512 (``bench/bench_training_ckpt.py``): peak RSS 7.71 GB with the default, 6.13 GB with
tensors from 1 MiB up in mappings of their own; after the step, 5.09 GB against 2.88 GB resident.

- :func:`release_freed_memory`: glibc's ``malloc_trim(0)``, every whole free page of the heap back to the
  system, wherever it lies (the loader calls it after each quantized tensor).
- :func:`large_tensors_mapped`: within the ``with``, every allocation of ``MAPPED_FROM_BYTES`` or more gets
  its own mapping (``mallopt(M_MMAP_THRESHOLD, ...)``), so peak memory is what the step holds, not what it
  once held. The cost is a page fault for each page of a new tensor (the kernel hands over zeroed pages),
  small beside the matmuls that fill it (``docs/benchmarks.md``).

Both are no-ops where the C library is not glibc (macOS, musl): the plain path, with that library's own
behaviour.
"""

import ctypes
import ctypes.util
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's <malloc.h>
MAPPED_FROM_BYTES = 1 << 20  # 1 MiB: a Llama-3.2-1B activation row block is 4 KiB per token, so ~256 tokens
DYNAMIC_MAX_BYTES = 32 << 20  # where glibc's own threshold ends up after freed mappings (64-bit DEFAULT_MMAP_THRESHOLD_MAX)

_glibc = []


def glibc():
    """glibc as a ``ctypes.CDLL`` when the process runs on it (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not _glibc:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        _glibc.append(libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")
                      else None)
    return _glibc[0]


def release_freed_memory() -> None:
    """Hand the pages that freed tensors left inside the C heap back to the system (``malloc_trim(0)``)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def large_tensors_mapped(from_bytes: int = MAPPED_FROM_BYTES, warn=None):
    """Within the ``with``: allocations of ``from_bytes`` or more in mappings of their own (see the module
    docstring), and the heap's free pages handed back on the way out.

    glibc has no call that turns its rising threshold back on, so on the way out the threshold is set to where
    that rise ends (32 MiB). ``warn`` gets one line if glibc refuses the setting (then nothing changes).
    """
    libc = glibc()
    if libc is None:
        yield  # not glibc: its own allocator, as it is
        return
    if libc.mallopt(M_MMAP_THRESHOLD, int(from_bytes)) != 1:
        if warn is not None:
            warn(f"the C library refused mallopt(M_MMAP_THRESHOLD, {from_bytes}); training keeps its default "
                 "heap (peak memory may be higher)")
        yield
        return
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_MAX_BYTES)
        libc.malloc_trim(0)
