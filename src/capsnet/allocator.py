"""Large CPU tensors without page faults: keep freed memory in the process (glibc).

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with fresh
``mmap`` pages and unmaps them on ``free``. A training step allocates and frees the same large
tensors every time (EM routing's ``(I, B, L, J)`` assignments are 20-45 MB, the CapsNet's
PrimaryCaps input at batch 128 is 52 MB), so every step faults their pages in again, and the
kernel zero-fills each 4 KiB page: on the 2-core VM of docs/performance.md that costs about 3
ns per float, more than the arithmetic on it (an 88 MB tensor: 59 ms allocated and filled
fresh against 6 ms reused). :func:`keep_freed_memory` turns mmap off for ``malloc`` (every
block comes from the heap) and stops the heap from being trimmed, so freed blocks are reused
without faults. The price: the heap keeps its high-water mark until the process exits, and
blocks no longer go back to the system between steps; measured peak resident sizes moved by
-80 to +140 MB (docs/performance.md, "The allocator").

The command line calls it at start (``capsnet train`` etc.); ``CAPSNET_MALLOC=system`` keeps
glibc's defaults. Library users opt in by calling it. PyTorch's own alternative,
``THP_MEM_ALLOC_ENABLE=1`` (huge pages for large tensors), must be set before the first tensor
is allocated and still faults once per 2 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_ENV = "CAPSNET_MALLOC"
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no mmap, no trimming); True if it now does.

    A no-op returning False off Linux/glibc and when ``CAPSNET_MALLOC=system``. Affects the
    whole process from this call on; blocks already allocated keep their pages.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(_ENV, "").strip().lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Trim threshold: the largest int, i.e. never trim.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
