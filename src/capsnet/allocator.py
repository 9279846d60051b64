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
instead of per 4 KiB), so the resident peak is the live peak, at 13-33% more time per training
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


def _policy_name(value: str, where: str) -> str:
    name = value.strip().lower() or "keep"
    if name not in POLICIES:
        raise ValueError(f"{where} is not a malloc policy: expected one of {', '.join(POLICIES)} "
                         "(an empty CAPSNET_MALLOC means keep); see capsnet/allocator.py")
    return name


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


#: mallopt settings of each policy. keep: no mmap at all, and a trim threshold of the largest
#: int (never trim); compact: a fixed mmap threshold; system: glibc's defaults.
_OPTIONS = {
    "keep": [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)],
    "compact": [(_M_MMAP_THRESHOLD, COMPACT_MMAP_THRESHOLD)],
    "system": [],
}
#: glibc's defaults, put back if a policy could only be set in part.
_DEFAULTS = [(_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024), (_M_MMAP_THRESHOLD, 128 * 1024)]


def _set(policy: str) -> bool:
    """Put the process under ``policy``; True if it now runs under it (False: not glibc)."""
    global _applied
    if _applied is not None:
        if _applied != policy:
            raise RuntimeError(f"this process already runs under the malloc policy {_applied!r}; "
                               f"{policy!r} can only be chosen before another one is set")
        return True
    if policy == "system":
        _applied = policy
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if all(mallopt(param, value) == 1 for param, value in _OPTIONS[policy]):  # mallopt returns 1 on success
        _applied = policy
        return True
    for param, value in _DEFAULTS:  # set in part: back to glibc's defaults rather than half a policy
        mallopt(param, value)
    return False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no mmap, no trimming); True if it now does.

    A no-op returning False off Linux/glibc. Affects the whole process from this call on; blocks
    already allocated keep their pages. RuntimeError if another policy was applied before.
    ``CAPSNET_MALLOC`` is read by :func:`apply_policy` (the command line), not here.
    """
    return _set("keep")


def compact_memory() -> bool:
    """Return large freed blocks to the system: resident peak = live peak; True if applied.

    A fixed mmap threshold of :data:`COMPACT_MMAP_THRESHOLD` (glibc raises its default threshold
    after each free of a mapped block, up to 32 MiB, which lets the heap fragment again), and
    ``THP_MEM_ALLOC_ENABLE=1`` unless the environment sets it: PyTorch then backs CPU tensors of
    2 MiB and more by transparent huge pages where the kernel allows. PyTorch reads that variable
    at its first CPU allocation, so the huge pages only come when this is called before any tensor
    exists (the command line does); without them the policy holds, with 4 KiB page faults. A no-op
    returning False off Linux/glibc. RuntimeError if another policy was applied before.
    """
    applied = _set("compact")
    if applied:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return applied


def apply_policy(policy: Optional[str] = None) -> str:
    """Apply ``policy`` (default: the ``CAPSNET_MALLOC`` variable, unset or empty meaning ``keep``);
    returns what the process now runs under: the policy, or ``"system"`` where it could not be
    set (not glibc).

    ValueError for a name not in :data:`POLICIES` (naming the variable when it came from there);
    RuntimeError if another policy was applied before.
    """
    if policy is None:
        policy = _policy_name(os.environ.get(_ENV, ""), f"{_ENV}={os.environ.get(_ENV, '')!r}")
    else:
        policy = _policy_name(policy, repr(policy))
    applied = compact_memory() if policy == "compact" else _set(policy)
    return policy if applied else "system"
