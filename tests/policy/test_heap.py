import os
import subprocess
import sys

import pytest

from policy import heap

glibc_only = pytest.mark.skipif(heap._LIBC is None, reason="glibc's mallopt")

CHURN = """
import ctypes, resource
from policy.heap import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def faults_per_step():  # a step's pattern: a few MB-sized blocks written, then freed; its first time not counted
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(900 << 10) for _ in range(6)]
        for block in blocks:
            libc.memset(block, 1, 900 << 10)
        for block in blocks:
            libc.free(block)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return max(counts[1:])

libc.free(libc.malloc(1 << 20))  # glibc's dynamic thresholds now 1 MB (mmap) and 2 MB (trim)
default = faults_per_step()
print(default, keep_freed_memory(), faults_per_step())
"""


@glibc_only
def test_freed_blocks_are_reused_not_faulted_in_again():
    """glibc hands the 5 MB a step freed back to the OS (more than its 2 MB trim threshold) and faults the pages
    in again the next step (~1,300 faults; clt's trainer at bench.train's shape: 900-2,500 a step); after
    keep_freed_memory, as the dictionary trainers and the collectors run, the step reuses them."""
    user_set = heap.user_malloc_settings()
    env = {k: v for k, v in os.environ.items() if k not in user_set}  # glibc's defaults, whatever this shell set
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True, env=env).stdout
    default, kept, faults = out.split()
    assert int(default) > 1000  # the pattern faults under glibc's defaults
    assert kept == "True"
    assert int(faults) < 10


@glibc_only
@pytest.mark.parametrize(
    "name, value", [("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000"), ("MALLOC_TOP_PAD_", "0")]
)
def test_glibc_settings_the_user_gave_are_kept(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert heap.keep_freed_memory() is False


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(heap, "_LIBC", None)
    assert heap.keep_freed_memory() is False
    heap.release_free_memory()  # a no-op
