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

The kept heap also fragments: freed blocks between long-lived ones cannot always take the next
step's larger requests, so the resident peak exceeds the live peak (Efficient-CapsNet at batch
128: 450-490 MB kept against about 380 MB live). :func:`compact_memory` is the other trade: a
fixed mmap threshold of 1 MiB (every block of at least 1 MiB is mapped fresh and unmapped on
``free``, and glibc no longer raises the threshold after such a free) with PyTorch's
transparent huge pages for large tensors (``THP_MEM_ALLOC_ENABLE=1``: one fault per 2 MiB
instead of per 4 KiB), so the resident peak is the live peak, at 15-30% more time per training
step (docs/performance.md, "A compact heap").

The command line applies the policy that ``CAPSNET_MALLOC`` names at start (:func:`apply_policy`):
``keep`` (default, :func:`keep_freed_memory`), ``compact`` (:func:`compact_memory`) or
``system`` (glibc's defaults). Library users opt in by calling one of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

__all__ = ["POLICIES", "apply_policy", "compact_memory", "keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
_ENV = "CAPSNET_MALLOC"
#: The values of ``CAPSNET_MALLOC``; an empty or unset variable means ``keep``.
POLICIES = ("keep", "compact", "system")
#: Blocks of at least this many bytes are mapped fresh under :func:`compact_memory`.
COMPACT_MMAP_THRESHOLD = 1 << 20
_applied: Optional[str] = None  # the policy this process runs under, once one was set


def _env_policy() -> str:
    value = os.environ.get(_ENV, "").strip().lower() or "keep"
    if value not in POLICIES:
        raise ValueError(f"{_ENV}={os.environ[_ENV]!r} is not a malloc policy: expected one of {', '.join(POLICIES)} "
                         f"(or unset, meaning keep); see capsnet/allocator.py")
    return value


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _set(policy: str, options: list[tuple[int, int]]) -> bool:
    global _applied
    if _applied is not None:
        if _applied != policy:
            raise RuntimeError(f"this process already runs under the malloc policy {_applied!r}; "
                               f"{policy!r} can only be chosen before another one is set")
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success.
    if all(bool(mallopt(param, value)) for param, value in options):
        _applied = policy
    return _applied == policy


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no mmap, no trimming); True if it now does.

    A no-op returning False off Linux/glibc and when ``CAPSNET_MALLOC`` names another policy
    (``system`` or ``compact``). Affects the whole process from this call on; blocks already
    allocated keep their pages. RuntimeError if :func:`compact_memory` was applied before.
    """
    if _applied is None and _env_policy() != "keep":
        return False
    # Trim threshold: the largest int, i.e. never trim.
    return _set("keep", [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)])


def compact_memory() -> bool:
    """Return large freed blocks to the system: resident peak = live peak; True if applied.

    A fixed mmap threshold of :data:`COMPACT_MMAP_THRESHOLD` (glibc raises its default threshold
    after each free of a mapped block, up to 32 MiB, which lets the heap fragment again), and
    ``THP_MEM_ALLOC_ENABLE=1`` unless the environment sets it: PyTorch then backs CPU tensors of
    2 MiB and more by transparent huge pages where the kernel allows (it reads the variable at its
    first such allocation, so call this first). A no-op returning False off Linux/glibc.
    RuntimeError if :func:`keep_freed_memory` was applied before.
    """
    applied = _set("compact", [(_M_MMAP_THRESHOLD, COMPACT_MMAP_THRESHOLD)])
    if applied:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return applied


def apply_policy(policy: Optional[str] = None) -> str:
    """Apply ``policy`` (default: ``CAPSNET_MALLOC``, unset meaning ``keep``); returns what the
    process now runs under: the policy, or ``"system"`` where it could not be set (not glibc).

    ValueError for a name not in :data:`POLICIES`, naming the variable.
    """
    policy = _env_policy() if policy is None else policy
    if policy not in POLICIES:
        raise ValueError(f"malloc policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == "keep":
        applied = _set("keep", [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)])
    elif policy == "compact":
        applied = compact_memory()
    else:
        if _applied is not None:
            raise RuntimeError(f"this process already runs under the malloc policy {_applied!r}; "
                               "'system' can only be chosen before another one is set")
        applied = False
    return policy if applied else "system"
