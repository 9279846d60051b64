"""Optional compiled CPU kernels, built on first use with the system C compiler.

EM routing reads its factored votes about ten times per layer and training step
(:class:`capsnet.routing.em._VoteReader`); in eager PyTorch each read is several passes over
vote-sized data. ``em_votes.c`` does each read in one pass, multiplying every vote row out in
a small buffer. It is plain C (no PyTorch headers), compiled once per machine with ``cc -O3
-march=native -fopenmp`` into a cache folder and loaded with :mod:`ctypes`. It links
``libgomp.so.1`` by soname, so it runs on the OpenMP runtime PyTorch already loaded, with
``torch.get_num_threads()`` threads (a second runtime's spinning threads would fight PyTorch's
for the cores). Without OpenMP it is built serial.

Everything falls back to the eager code when the kernels are off or cannot be built, so a
machine without a compiler loses speed, never results:

* ``CAPSNET_KERNELS=0`` (or :func:`set_enabled`\\ ``(False)``) turns them off; ``=1`` makes a
  build failure an error instead of a warning;
* ``CAPSNET_CACHE`` (default ``~/.cache/capsnet``) holds the built library under ``kernels/``;
* ``CC`` names the compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["EMVotes", "em_votes", "enabled", "set_enabled"]

_SOURCE = Path(__file__).with_name("em_votes.c")
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99")
_OPENMP = ("-fopenmp",), ("-fopenmp-simd",)  # tried in this order
_ENV = "CAPSNET_KERNELS"

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None
_enabled: Optional[bool] = None  # None: follow the environment
_private: Optional[Path] = None  # the temporary cache folder, when the cache folder is not writable


def set_enabled(flag: Optional[bool]) -> None:
    """Use the compiled kernels (True), the eager code (False), or follow ``CAPSNET_KERNELS`` (None)."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    """Whether routing should try the compiled kernels now."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(_ENV, "auto").strip().lower() not in ("0", "false", "off", "no")


def _cache_dir() -> Path:
    """``$CAPSNET_CACHE/kernels`` (default ``~/.cache/capsnet/kernels``), or, when that cannot be
    created (a read-only home), a fresh private folder in the temporary directory: a shared,
    predictable one would let another user plant the library this process loads."""
    root = os.environ.get("CAPSNET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "capsnet")
    folder = Path(root) / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    global _private
    if _private is None:
        _private = Path(tempfile.mkdtemp(prefix="capsnet-kernels-"))  # mode 0o700, ours alone
    return _private


def _cpu_id() -> str:
    """What ``-march=native`` depends on: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        info = []
    return platform.machine() + "".join(info)


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC to one)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *_FLAGS, _cpu_id())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"em_votes-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed into place: concurrent builders never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            for openmp in _OPENMP:
                done = subprocess.run([compiler, *_FLAGS, *openmp, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
                if done.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{compiler} failed on {_SOURCE.name}:\n{done.stderr.strip()}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    votes_p, f_p, i64, i32 = ctypes.POINTER(_Votes), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.capsnet_max_row.restype = ctypes.c_int
    lib.capsnet_moments.argtypes = [votes_p, f_p, f_p, f_p, f_p, i32]
    lib.capsnet_quadratic.argtypes = [votes_p, f_p, f_p, f_p, f_p, i32]
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    lib.capsnet_gradient.argtypes = [votes_p, i64, ptrs, ptrs, ptrs, i64, i64, f_p, i32]
    lib.capsnet_gradient_4x4.argtypes = [votes_p, i64, ptrs, ptrs, ptrs, f_p, f_p, f_p, i32]
    for fn in (lib.capsnet_moments, lib.capsnet_quadratic, lib.capsnet_gradient, lib.capsnet_gradient_4x4):
        fn.restype = None
    return lib


def _load() -> Optional[ctypes.CDLL]:
    """The kernels library, built on first call; None (with one warning) if it cannot be built."""
    global _library, _failed
    if _failed is not None and os.environ.get(_ENV, "").strip() == "1":
        raise RuntimeError(f"CAPSNET_KERNELS=1 but the EM kernels could not be built: {_failed}")
    if _library is not None or _failed is not None:
        return _library
    with _lock:
        if _library is None and _failed is None:
            try:
                _library = _build()
            except (OSError, RuntimeError) as err:
                _failed = str(err)
                if os.environ.get(_ENV, "").strip() == "1":
                    raise RuntimeError(f"CAPSNET_KERNELS=1 but the EM kernels could not be built: {err}") from err
                warnings.warn(f"capsnet: EM routing falls back to eager PyTorch (slower): {err}", RuntimeWarning, stacklevel=3)
    return _library


class _Votes(ctypes.Structure):
    _fields_ = [
        ("poses", ctypes.c_void_p),
        ("transforms", ctypes.c_void_p),
        ("centre", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("matrices", ctypes.c_void_p),
        ("doubled", ctypes.c_void_p),
        ("slots", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("types", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("inner", ctypes.c_int64),
        ("per_group", ctypes.c_int64),
    ]


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _f32(t: torch.Tensor) -> torch.Tensor:
    """What the C code reads: contiguous float32 (a no-op for routing's own tensors)."""
    return t.to(torch.float32).contiguous()


class EMVotes:
    """Factored votes ``X = poses @ transforms - centre + offsets`` read by the compiled kernels.

    Same maps as :class:`capsnet.routing.em._VoteReader` (``moments``, ``quadratic`` and the
    gradient chunks), same shapes: ``I`` child slots, ``N = rows J`` parents, ``D`` pose elements.
    The tensors are kept (contiguous float32 CPU) for as long as this object lives.
    """

    def __init__(self, lib: ctypes.CDLL, poses, transforms, offsets, matrices, centre, shape):
        slots, batch, num_patches, types, dim = shape
        self.lib = lib
        groups, group_rows, inner = poses.shape
        self.rows = batch * num_patches
        self.shape = (slots, self.rows * types, dim)
        self.keep = [t.contiguous() for t in (poses, transforms, centre)]
        doubled = None if matrices is None else torch.cat([matrices, matrices], -1).contiguous()  # (G, J, 4, 8)
        self.keep += [None if t is None else t.contiguous() for t in (offsets, matrices, doubled)]
        p, w, c, o, m, m2 = self.keep
        self.votes = _Votes(_ptr(p), _ptr(w), _ptr(c), *(None if t is None else _ptr(t) for t in (o, m, m2)),
                            slots, self.rows, types, dim, inner, slots // groups)  # fmt: skip
        self.ref = ctypes.byref(self.votes)

    def moments(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sum_i r_i X_i``, ``sum_i r_i X_i^2`` (``(N, D)`` each) and ``sum_i r_i`` (``(N,)``) for ``r`` ``(I, N)``."""
        r = _f32(r)
        m1 = r.new_empty(self.shape[1:])
        m2 = torch.empty_like(m1)
        m0 = r.new_empty(self.shape[1])
        self.lib.capsnet_moments(self.ref, _ptr(r), _ptr(m1), _ptr(m2), _ptr(m0), torch.get_num_threads())
        return m1, m2, m0

    def quadratic(self, u1: torch.Tensor, u2: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
        """``u0 + sum_d X u1 + X^2 u2`` for ``u1, u2`` ``(N, D)``, ``u0`` ``(N,)``; returns ``(I, N)``."""
        u1, u2, u0 = _f32(u1), _f32(u2), _f32(u0)
        q = u1.new_empty(self.shape[:2])
        self.lib.capsnet_quadratic(self.ref, _ptr(u1), _ptr(u2), _ptr(u0), _ptr(q), torch.get_num_threads())
        return q

    def gradient(self, terms, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Children ``[start, stop)`` of ``sum_k <L_k (x) R1_k, X> + <L_k (x) R2_k, X^2>``'s gradient
        into ``out`` ``(stop - start, N, D)``, contiguous float32; ``terms`` are ``(L (I, N), R1 (N, D),
        R2 (N, D))``."""
        if out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"gradient writes contiguous float32, got {out.dtype} (contiguous: {out.is_contiguous()})")
        terms = [tuple(_f32(t) for t in term) for term in terms]
        arrays = _term_arrays(terms)
        self.lib.capsnet_gradient(self.ref, len(terms), *arrays, start, stop, _ptr(out), torch.get_num_threads())
        return out

    @property
    def has_matrices(self) -> bool:
        """Whether the votes are 4x4 products :meth:`factor_gradients` can differentiate directly."""
        return self.keep[4] is not None

    def factor_gradients(self, terms, poses: bool, matrices: bool):
        """The same gradient taken straight to the factors of 4x4 votes ``V = M W``, one pass
        over all children: ``(d poses (G, R, 16) or None, d matrices (G, J, 4, 4) or None)``."""
        threads = torch.get_num_threads()
        terms = [tuple(_f32(t) for t in term) for term in terms]
        p, m = self.keep[0], self.keep[4]
        grad_p = torch.empty_like(p) if poses else None
        partial = m.new_zeros((threads, *m.shape)) if matrices else None
        transposed = m.transpose(-1, -2).contiguous()
        self.lib.capsnet_gradient_4x4(self.ref, len(terms), *_term_arrays(terms), _ptr(transposed),
                                      None if grad_p is None else _ptr(grad_p),
                                      None if partial is None else _ptr(partial), threads)  # fmt: skip
        return grad_p, None if partial is None else partial.sum(0)


def _term_arrays(terms):
    """Three C arrays of pointers: every term's left, right1 and right2."""
    return [(ctypes.c_void_p * len(terms))(*(_ptr(t[k]) for t in terms)) for k in range(3)]


def em_votes(poses, transforms, offsets, matrices, centre, shape) -> Optional[EMVotes]:
    """Compiled reads of factored votes, or None where the eager code must run (kernels off or
    unavailable, not float32 on CPU, a row longer than the kernels buffer, autograd tracing).

    ``matrices`` ``(G, J, 4, 4)``, when given, are the 4x4 transforms that ``transforms`` was
    built from (``capsnet.layers.matrix._block_weight``): the kernels then multiply 4x4 matrices
    instead of the three-quarters-zero ``(16, J 16)`` blocks."""
    if not enabled():
        return None
    if matrices is not None and (shape[4] != 16 or poses.shape[-1] != 16 or matrices.shape[1:] != (shape[3], 4, 4)):
        matrices = None
    tensors = [t for t in (poses, transforms, offsets, matrices, centre) if t is not None]
    # Plain tensors and parameters only: fake, functorch-wrapped and other subclass tensors have no data pointer.
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    lib = _load()
    if lib is None or shape[3] * shape[4] > lib.capsnet_max_row():
        return None
    return EMVotes(lib, poses, transforms, offsets, matrices, centre, shape)
