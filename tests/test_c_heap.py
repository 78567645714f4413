"""The C heap settings (minipeft.core.c_heap): large tensors in mappings of their own give freed memory back.

Each case runs in a fresh process: the allocator's threshold is process-wide state.
"""

import subprocess
import sys
import textwrap

import pytest

from minipeft.core.c_heap import glibc

# A forward in miniature: 40 pairs of (kept, freed) 4 MiB tensors, interleaved as autograd's saved activations
# and its temporaries are, after one 16 MiB tensor was freed (which raises glibc's threshold to 16 MiB, as the
# first freed activation of a real step does). Prints how many MiB of the freed 160 MiB stayed resident.
SCRIPT = textwrap.dedent("""
    import sys, torch
    from minipeft.core.c_heap import large_tensors_mapped
    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    def forward_in_miniature():
        del_me = torch.ones(4 << 20)  # 16 MiB, freed: glibc's dynamic threshold rises to it
        del del_me
        kept, freed = [], []
        for _ in range(40):
            freed.append(torch.ones(1 << 20))  # 4 MiB each, pages touched
            kept.append(torch.ones(1 << 20))
        before = rss_mib()
        freed.clear()
        return before - rss_mib(), kept
    if sys.argv[1] == "mapped":
        with large_tensors_mapped():
            released, kept = forward_in_miniature()
    else:
        released, kept = forward_in_miniature()
    print(f"{160 - released:.0f}")
""")


def resident_after_free(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc() is None or not sys.platform.startswith("linux"), reason="glibc's malloc on Linux")
def test_freed_temporaries_leave_with_large_tensors_mapped():
    default, mapped = resident_after_free("default"), resident_after_free("mapped")
    assert default > 100, f"the default heap kept only {default:.0f} of 160 MiB: the scenario no longer shows the hole"
    assert mapped < 20, f"{mapped:.0f} of 160 MiB freed stayed resident with large tensors mapped"


class FakeLibc:
    def __init__(self, accepts: bool):
        self.accepts, self.calls = accepts, []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1 if self.accepts else 0

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_threshold_set_then_put_where_glibc_leaves_it(monkeypatch):
    from minipeft.core import c_heap

    libc = FakeLibc(accepts=True)
    monkeypatch.setattr(c_heap, "_glibc", [libc])
    with c_heap.large_tensors_mapped():
        assert libc.calls == [("mallopt", c_heap.M_MMAP_THRESHOLD, c_heap.MAPPED_FROM_BYTES)]
    assert libc.calls[1:] == [("mallopt", c_heap.M_MMAP_THRESHOLD, 32 << 20), ("malloc_trim", 0)]


def test_a_refused_setting_is_said_and_changes_nothing(monkeypatch):
    from minipeft.core import c_heap

    libc, said = FakeLibc(accepts=False), []
    monkeypatch.setattr(c_heap, "_glibc", [libc])
    with c_heap.large_tensors_mapped(warn=said.append):
        pass
    assert len(said) == 1 and "M_MMAP_THRESHOLD" in said[0]
    assert libc.calls == [("mallopt", c_heap.M_MMAP_THRESHOLD, c_heap.MAPPED_FROM_BYTES)]  # nothing to undo


def test_without_glibc_nothing_is_called(monkeypatch):
    from minipeft.core import c_heap

    monkeypatch.setattr(c_heap, "_glibc", [None])
    with c_heap.large_tensors_mapped(warn=lambda line: pytest.fail(line)):
        pass
    c_heap.release_freed_memory()  # no libc: a no-op, no error
