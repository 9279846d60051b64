"""Optional compiled CPU kernels, built on first use with the system C compiler.

EM routing reads its factored votes about ten times per layer and training step
(:class:`capsnet.routing._em_votes.VoteReader`); in eager PyTorch each read is several passes over
vote-sized data. ``em_votes.c`` does each read in one pass, multiplying every vote row out in
a small buffer, and the M-step in one pass per parent. ``dense_routing.c`` routes a DenseCaps
layer without gradients (inference) image by image, its votes made and read in cache
(:func:`dense_route`). Both are plain C (no PyTorch headers), compiled once per machine with ``cc
-O3 -march=native -fopenmp`` into one library in a cache folder and loaded with :mod:`ctypes`. It links
``libgomp.so.1`` by soname, so it runs on the OpenMP runtime PyTorch already loaded, with
``torch.get_num_threads()`` threads (a second runtime's spinning threads would fight PyTorch's
for the cores). Without OpenMP it is built serial.

Everything falls back to the eager code when the kernels are off or cannot be built, so a
machine without a compiler loses speed, never results. The library reads no environment
variable; :func:`configure` sets what the command line reads from ``CAPSNET_KERNELS``,
``CAPSNET_CACHE`` and ``CC``:

* ``mode``: ``"auto"`` (build on first use, warn once and fall back if that fails), ``"off"``
  (the eager code; also :func:`set_enabled`\\ ``(False)``) or ``"required"`` (a build failure
  is an error);
* ``cache``: the folder (default ``~/.cache/capsnet``) whose ``kernels/`` holds the library;
* ``compiler``: the C compiler (default ``cc``), given ``timeout`` seconds per run.

:func:`build` builds (or loads) the library now, as the command line does at start. Processes
that build at once (``torchrun`` ranks) take turns on a lock file beside the library: the first
compiles, the others load what it wrote.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch.autograd import forward_ad

try:
    import fcntl
except ImportError:  # not POSIX: builders are not serialised (each renames a finished file into place)
    fcntl = None

__all__ = ["EMSteps", "EMVotes", "MODES", "Settings", "build", "configure", "dense_route", "dense_votes", "em_steps", "em_votes", "enabled", "set_enabled", "settings"]

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("em_votes.c", "dense_routing.c"))
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99")
_LIBS = ("-lm",)
_OPENMP = ("-fopenmp",), ("-fopenmp-simd",)  # tried in this order
MODES = ("auto", "off", "required")


@dataclass(frozen=True)
class Settings:
    """How the kernels are built and used; see the module docstring."""

    mode: str = "auto"
    cache: Optional[Path] = None  # None: ~/.cache/capsnet
    compiler: str = "cc"
    timeout: float = 300.0  # seconds per compiler run: a hung compiler must not hang training


_lock = threading.Lock()
_settings = Settings()
_library: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None
_enabled: Optional[bool] = None  # None: follow the settings' mode
_private: Optional[Path] = None  # the temporary cache folder, when the cache folder is not writable


def configure(
    *, mode: str = "auto", cache: Union[str, os.PathLike, None] = None, compiler: str = "cc", timeout: float = 300.0
) -> None:
    """Set how the kernels are built and used (all of it: unnamed settings return to their defaults).

    A failed build is forgotten, so the next use tries again with the new settings; a library
    already loaded stays loaded.
    """
    global _settings, _failed
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not compiler:
        raise ValueError("compiler must name a C compiler, got an empty string")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    with _lock:
        _settings = Settings(mode, None if cache is None else Path(cache), compiler, float(timeout))
        _failed = None


def settings() -> Settings:
    """The settings in force (see :func:`configure`)."""
    return _settings


def set_enabled(flag: Optional[bool]) -> None:
    """Use the compiled kernels (True), the eager code (False), or follow the settings' mode (None)."""
    global _enabled
    _enabled = flag


def enabled() -> bool:
    """Whether routing should try the compiled kernels now."""
    if _enabled is not None:
        return _enabled
    return _settings.mode != "off"


def _cache_dir() -> Path:
    """``<cache>/kernels`` (default ``~/.cache/capsnet/kernels``), or, when that cannot be
    created (a read-only home), a fresh private folder in the temporary directory: a shared,
    predictable one would let another user plant the library this process loads. The private
    folder is removed when the process exits."""
    root = _settings.cache or Path(os.path.expanduser("~")) / ".cache" / "capsnet"
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
        atexit.register(_remove_private)
    return _private


def _remove_private() -> None:
    """Delete the private temporary folder (at exit; a loaded library stays mapped)."""
    global _private
    if _private is not None:
        shutil.rmtree(_private, ignore_errors=True)
        _private = None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        info = []
    return platform.machine() + "".join(info)


class _BuildLock:
    """An exclusive ``flock`` on ``path`` across processes (a no-op without ``fcntl``)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a")  # closed in __exit__
        if fcntl is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)  # waits while another process builds
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


def _compile(compiler: str, target: Path, timeout: float) -> None:
    """Compile :data:`_SOURCES` into ``target``, beside it first and renamed into place: a
    concurrent reader never loads a partial file."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for openmp in _OPENMP:
            command = [compiler, *_FLAGS, *openmp, *map(str, _SOURCES), "-o", tmp, *_LIBS]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{compiler} took more than {timeout:g} s on {_names()}") from None
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{compiler} failed on {_names()}:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _names() -> str:
    return " and ".join(source.name for source in _SOURCES)


def _build() -> ctypes.CDLL:
    compiler, timeout = _settings.compiler, _settings.timeout
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC to one)")
    source = b"".join(path.read_bytes() for path in _SOURCES)
    key = hashlib.sha256(source + " ".join((compiler, *_FLAGS, *_LIBS, _cpu_id())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"em_votes-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _BuildLock(target.with_suffix(".lock")):
            if not target.exists():  # another process may have built it while this one waited
                _compile(compiler, target, timeout)
    lib = ctypes.CDLL(str(target))
    votes_p, f_p, i64, i32 = ctypes.POINTER(_Votes), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.capsnet_max_row.restype = ctypes.c_int
    lib.capsnet_moments.argtypes = [votes_p, f_p, f_p, f_p, f_p, i32]
    lib.capsnet_quadratic.argtypes = [votes_p, f_p, f_p, f_p, f_p, i32]
    ptrs = ctypes.POINTER(ctypes.c_void_p)
    lib.capsnet_gradient.argtypes = [votes_p, i64, ptrs, ptrs, ptrs, i64, i64, f_p, i32]
    lib.capsnet_gradient_4x4.argtypes = [votes_p, i64, ptrs, ptrs, ptrs, f_p, f_p, f_p, i32]
    f32 = ctypes.c_float
    lib.capsnet_m_step.argtypes = [i64, i64, f_p, f_p, f_p, f_p, f32, f32, f_p, f_p, f_p, f_p, f_p, i32]
    lib.capsnet_m_step_backward.argtypes = [i64, i64, f_p, f_p, f_p, f32, f_p, f_p, f_p, f_p, f_p, f_p, f_p, f_p, f_p, f32, f32,
                                            f_p, f_p, f_p, i32]
    lib.capsnet_type_lanes.restype = ctypes.c_int
    widths = (8, 16) if lib.capsnet_type_lanes() == 16 else (8,)
    lanes = [getattr(lib, f"capsnet_{read}_lanes{k}") for k in widths for read in ("quadratic", "moments")]
    for fn in lanes:
        fn.argtypes = [votes_p, f_p, f_p, f_p, f_p, f_p, f_p, i32]
    lib.capsnet_max_terms.restype = ctypes.c_int
    for k in widths:
        fn = getattr(lib, f"capsnet_gradient_lanes{k}")
        fn.argtypes = [votes_p, i64, ptrs, ptrs, ptrs, f_p, f_p, f_p, f_p, i32]
        lanes.append(fn)
    lib.capsnet_dense_route.argtypes = [i64, i64, i64, i64, i64, f_p, f_p, f_p, i32, i32, ctypes.c_double, f_p, f_p, f_p, i32]
    lib.capsnet_dense_route.restype = ctypes.c_int
    lib.capsnet_dense_votes.argtypes = [i64, i64, i64, i64, i64, f_p, f_p, f_p, f_p, i32]
    for fn in (lib.capsnet_moments, lib.capsnet_quadratic, lib.capsnet_gradient, lib.capsnet_gradient_4x4,
               lib.capsnet_m_step, lib.capsnet_m_step_backward, lib.capsnet_dense_votes, *lanes):
        fn.restype = None
    return lib


def _required_error(reason: str) -> RuntimeError:
    return RuntimeError(f"the compiled kernels are required (CAPSNET_KERNELS=1, or mode='required') but could not be built: {reason}")


def _load() -> Optional[ctypes.CDLL]:
    """The kernels library, built on first call; None (with one warning) if it cannot be built."""
    global _library, _failed
    if _failed is not None and _settings.mode == "required":
        raise _required_error(_failed)
    if _library is not None or _failed is not None:
        return _library
    with _lock:
        if _library is None and _failed is None:
            try:
                _library = _build()
            except (OSError, RuntimeError) as err:
                _failed = str(err)
                if _settings.mode == "required":
                    raise _required_error(str(err)) from err
                warnings.warn(f"capsnet: the compiled kernels are unavailable, EM routing and DigitCaps inference: each falls back to eager PyTorch (slower): {err}", RuntimeWarning, stacklevel=3)
    return _library


def build() -> bool:
    """Build (or load) the kernels now rather than at EM routing's first call; whether they are
    usable. Off: False without building. A failure warns once (``"auto"``) or raises
    ``RuntimeError`` (``"required"``)."""
    return enabled() and _load() is not None


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

    Same maps as :class:`capsnet.routing._em_votes.VoteReader` (``moments``, ``quadratic`` and the
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
        # The moments and quadratic reads with the vector lanes over parent types, where J is a
        # multiple of the lanes (capsnet_{moments,quadratic}_lanes<L>): the transforms and the
        # centre transposed to [element][type] once here, the E-step's inputs and the moments at each read.
        self.lanes = next((k for k in (16, 8) if k <= lib.capsnet_type_lanes() and types % k == 0), None)
        if m is None:
            self.lanes = None
        if self.lanes is not None:
            self.wt = m.permute(0, 2, 3, 1).contiguous()  # (G, 4 m, 4 r, J)
            self.ct = self._by_type(c)
            self.quadratic_lanes = getattr(lib, f"capsnet_quadratic_lanes{self.lanes}")
            self.moments_lanes = getattr(lib, f"capsnet_moments_lanes{self.lanes}")
            self.gradient_lanes = getattr(lib, f"capsnet_gradient_lanes{self.lanes}")

    def _by_type(self, t: torch.Tensor) -> torch.Tensor:
        """``(rows J, 16)`` -> ``(rows, 16, J)``, contiguous."""
        return t.view(self.rows, -1, 16).transpose(1, 2).contiguous()

    def moments(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sum_i r_i X_i``, ``sum_i r_i X_i^2`` (``(N, D)`` each) and ``sum_i r_i`` (``(N,)``) for ``r`` ``(I, N)``."""
        r = _f32(r)
        m0 = r.new_empty(self.shape[1])
        if self.lanes is not None:
            m1t, m2t = (r.new_empty((self.rows, 16, self.votes.types)) for _ in range(2))
            self.moments_lanes(self.ref, _ptr(self.wt), _ptr(self.ct), _ptr(r), _ptr(m1t), _ptr(m2t), _ptr(m0),
                               torch.get_num_threads())  # fmt: skip
            return tuple(t.transpose(1, 2).reshape(self.shape[1:]) for t in (m1t, m2t)) + (m0,)
        m1 = r.new_empty(self.shape[1:])
        m2 = torch.empty_like(m1)
        self.lib.capsnet_moments(self.ref, _ptr(r), _ptr(m1), _ptr(m2), _ptr(m0), torch.get_num_threads())
        return m1, m2, m0

    def quadratic(self, u1: torch.Tensor, u2: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
        """``u0 + sum_d X u1 + X^2 u2`` for ``u1, u2`` ``(N, D)``, ``u0`` ``(N,)``; returns ``(I, N)``."""
        u1, u2, u0 = _f32(u1), _f32(u2), _f32(u0)
        q = u1.new_empty(self.shape[:2])
        if self.lanes is not None:
            u1t, u2t = self._by_type(u1), self._by_type(u2)
            self.quadratic_lanes(self.ref, _ptr(self.wt), _ptr(self.ct), _ptr(u1t), _ptr(u2t), _ptr(u0), _ptr(q),
                                 torch.get_num_threads())  # fmt: skip
            return q
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
        if self.lanes is not None and 1 <= len(terms) <= self.lib.capsnet_max_terms():  # the lanes over types
            groups, types = m.shape[0], self.votes.types
            terms = [(left, self._by_type(r1), self._by_type(r2)) for left, r1, r2 in terms]
            partial = m.new_zeros((threads, groups, 16, types)) if matrices else None
            self.gradient_lanes(self.ref, len(terms), *_term_arrays(terms), _ptr(self.wt), _ptr(self.ct),
                                None if grad_p is None else _ptr(grad_p),
                                None if partial is None else _ptr(partial), threads)  # fmt: skip
            grad_m = None if partial is None else partial.sum(0).view(groups, 4, 4, types).permute(0, 3, 1, 2).contiguous()
            return grad_p, grad_m
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
    if not enabled() or _traced():
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


def _opt(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class EMSteps:
    """The M-step and its adjoint per parent, compiled (``capsnet_m_step``, ``capsnet_m_step_backward``
    in ``em_votes.c``): one pass over the ``(N, D)`` tensors where the eager code makes about twenty.
    Every tensor is contiguous float32 on the CPU (:func:`em_steps` checks the inputs' kind)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def m_step(self, m1, m2, mass, centre, eps: float, var_floor: float):
        """``(mu - c, var, u1, u2)`` ``(N, D)`` and ``sum_d mu^2 / (2 var)`` ``(N,)`` from the moments."""
        m1, m2, mass, centre = (t.contiguous() for t in (m1, m2, mass, centre))
        n, dim = m1.shape
        mu, var, u1, u2 = (torch.empty_like(m1) for _ in range(4))
        quad = mass.new_empty(n)
        self.lib.capsnet_m_step(n, dim, _ptr(m1), _ptr(m2), _ptr(mass), _ptr(centre), eps, var_floor,
                                _ptr(mu), _ptr(var), _ptr(u1), _ptr(u2), _ptr(quad), torch.get_num_threads())  # fmt: skip
        return mu, var, u1, u2, quad

    def m_step_backward(self, g_u1, g_u2, g_const, gscale: float, g_mu, g_cost, m1, m2, mass, mu, var, bv, sum_lv,
                        eps: float, cost_scale: float):
        """The gradients ``(N, D), (N, D), (N,)`` of an M-step's moments: see ``capsnet_m_step_backward``."""
        tensors = [None if t is None else t.contiguous() for t in (g_u1, g_u2, g_const, g_mu, g_cost, m1, m2, mass, mu, var, bv, sum_lv)]
        g_u1, g_u2, g_const, g_mu, g_cost, m1, m2, mass, mu, var, bv, sum_lv = tensors
        n, dim = m1.shape
        g_m1, g_m2 = torch.empty_like(m1), torch.empty_like(m1)
        g_mass = mass.new_empty(n)
        self.lib.capsnet_m_step_backward(n, dim, _opt(g_u1), _opt(g_u2), _opt(g_const), gscale, _opt(g_mu), _opt(g_cost),
                                         _ptr(m1), _ptr(m2), _ptr(mass), _ptr(mu), _ptr(var), _ptr(bv), _ptr(sum_lv), eps,
                                         cost_scale, _ptr(g_m1), _ptr(g_m2), _ptr(g_mass), torch.get_num_threads())  # fmt: skip
        return g_m1, g_m2, g_mass


def em_steps(like: torch.Tensor) -> Optional[EMSteps]:
    """The compiled M-step for routing on tensors like ``like``, or None where the eager code
    must run (kernels off or unavailable, not a plain float32 CPU tensor)."""
    if not enabled() or _traced() or type(like) not in (torch.Tensor, torch.nn.Parameter):
        return None
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return None
    lib = _load()
    return None if lib is None else EMSteps(lib)


def _traced() -> bool:
    """Whether ``torch.compile`` is tracing: a traced tensor has no memory for C to read."""
    return torch.compiler.is_compiling()


def _dense_library(*tensors: Optional[torch.Tensor]) -> Optional[ctypes.CDLL]:
    """The library, where the dense kernels apply to ``tensors`` (None entries skipped): kernels on,
    not traced by ``torch.compile``, plain float32 CPU tensors without forward-mode tangents (the
    kernels have no forward derivative; the eager path carries them)."""
    tensors = [t for t in tensors if t is not None]
    if not enabled() or _traced() or any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    if any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return None
    return _load()


#: Children per vector row of ``dense_routing.c`` (its ``LANES``): the weights' layout pads ``I`` to it.
_DENSE_LANES = 16


def dense_route(u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], iterations: int, leaky: bool,
                eps: float) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Votes and Procedure 1 of a dense capsule layer without gradients, compiled (``capsnet_dense_route``
    in ``dense_routing.c``): ``(poses (B, J, D), coupling (B, J, I), logits (B, J, I))`` as
    :func:`capsnet.routing.dynamic._route` returns them on the votes of ``u`` (``(B, I, E)``), ``weight``
    (``(J, I, D, E)``) and ``bias`` (``(J, 1, D)`` or None); the same to float32 rounding. None where
    the eager code must run (kernels off or unavailable, not plain float32 CPU tensors). No autograd:
    the caller runs it only where no input needs a gradient."""
    lib = _dense_library(u, weight, bias)
    if lib is None:
        return None
    batch, n_in, in_dim = u.shape
    n_out, _, dim, _ = weight.shape
    pad = -n_in % _DENSE_LANES
    # (J, I, D, E) -> (J, I' / LANES, E, D, LANES), zero past I: one contiguous block per parent and LANES children
    blocks = torch.nn.functional.pad(weight.detach(), (0, 0, 0, 0, 0, pad)).view(n_out, -1, _DENSE_LANES, dim, in_dim)
    blocks = blocks.permute(0, 1, 4, 3, 2).contiguous()
    u = u.detach().contiguous()
    flat_bias = None if bias is None else bias.detach().reshape(n_out, dim).contiguous()
    poses = u.new_empty(batch, n_out, dim)
    coupling, logits = u.new_empty(batch, n_out, n_in), u.new_empty(batch, n_out, n_in)
    failed = lib.capsnet_dense_route(batch, n_in, n_out, dim, in_dim, _ptr(u), _ptr(blocks), _opt(flat_bias), int(iterations),
                                     int(leaky), float(eps), _ptr(poses), _ptr(coupling), _ptr(logits), torch.get_num_threads())  # fmt: skip
    if failed:
        per_thread = 4 * ((4 * n_out * dim + 2 * n_out + 4 * in_dim + 2) * (n_in + pad) + n_out * dim) / 2**20
        raise MemoryError(f"capsnet: the compiled dense routing could not allocate its {per_thread:.1f} MB buffer per thread; "
                          "free memory, or run with fewer threads or with the kernels off (CAPSNET_KERNELS=0)")
    return poses, coupling, logits


def dense_votes(u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The votes ``W_ij u_i (+ bias_j)`` of a dense capsule layer as a contiguous ``(B, J, I, D)``
    tensor, compiled (``capsnet_dense_votes`` in ``dense_routing.c``; no autograd): what
    :class:`capsnet.routing.dense._DenseRouting` keeps for its backward pass, without the eager
    path's copy between layouts. None where the eager code must run (as :func:`dense_route`)."""
    lib = _dense_library(u, weight, bias)
    if lib is None:
        return None
    batch, n_in, in_dim = u.shape
    n_out, _, dim, _ = weight.shape
    w_t = weight.detach().transpose(2, 3).contiguous()  # (J, I, E, D)
    u = u.detach().contiguous()
    flat_bias = None if bias is None else bias.detach().reshape(n_out, dim).contiguous()
    out = u.new_empty(batch, n_out, n_in, dim)
    lib.capsnet_dense_votes(batch, n_in, n_out, dim, in_dim, _ptr(u), _ptr(w_t), _opt(flat_bias), _ptr(out), torch.get_num_threads())
    return out
