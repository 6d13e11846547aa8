"""glibc's malloc under torch's CPU tensors: keep freed memory for the next step, or hand it back to the OS.

torch takes a CPU tensor's memory from malloc. A training step allocates and frees the same few-MB tensors
(normalised batches, predictions, gradients) every time; with glibc's defaults the freed space at the heap's top
soon exceeds what glibc keeps (its trim threshold: twice the largest block it has yet freed from mmap, so a few
MB unless the process once freed a big block), it returns those pages to the OS, and the next step faults them in
again: hundreds to thousands of page faults a step for clt's trainer, a visible share of the step (bench.train).
`keep_freed_memory` fixes both thresholds at the values glibc's own heuristic ends at (32 MB,
64 MB), so the step reuses its pages. Elsewhere than glibc (macOS, musl, Windows) both functions do nothing.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 * 2**20
"""Blocks under this come from the heap (glibc's largest dynamic mmap threshold on 64-bit)."""
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
"""Free space at the heap's top beyond this goes back to the OS (glibc pairs its dynamic threshold with twice it)."""


def _glibc() -> ctypes.CDLL | None:
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # ValueError where the C library is not glibc
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):
        return None


_LIBC = _glibc()


def user_malloc_settings() -> list[str]:
    """The environment variables by which the user set glibc's malloc: GLIBC_TUNABLES where it holds
    glibc.malloc.*, and MALLOC_*_."""
    names = [name for name in os.environ if name.startswith("MALLOC_") and name.endswith("_")]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return names


def keep_freed_memory() -> bool:
    """Let glibc keep up to TRIM_THRESHOLD of freed memory for reuse and serve blocks under MMAP_THRESHOLD from its
    heap, for the rest of this process; True if set. Settings the user gave glibc (`user_malloc_settings`) are left
    as they are."""
    if _LIBC is None or user_malloc_settings():
        return False
    mmap_set = _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mmap_set and _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Hand all freed heap memory back to the OS now (glibc's malloc_trim), for loops whose resident size would
    otherwise creep up with what they have freed."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
