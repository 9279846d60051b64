"""Atomic, checksummed checkpoints that load without running code, and the run directory's lock.

File layout: the 8-byte magic ``CAPSNET1``, the 32-byte SHA-256 of the body, then the body
(``torch.save`` bytes). Loading verifies the digest before unpickling with
``weights_only=True``, so a truncated, bit-flipped or hostile file is refused with a
clear message and never executes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock, so runs sharing a directory are not detected there
    fcntl = None

__all__ = [
    "CheckpointError", "DamagedCheckpointError", "RunDirectoryBusyError", "atomic_write", "load_checkpoint", "load_latest",
    "remove_temporary_files", "rotate_and_save", "run_lock", "save_checkpoint", "set_aside_damaged",
]

log = logging.getLogger(__name__)

MAGIC = b"CAPSNET1"
#: Temporary files of :func:`atomic_write` are ``.<name>.<random>.tmp`` beside their target.
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"
#: A file that failed its checksum is renamed ``<name>.damaged`` once a good one replaces it.
DAMAGED = ".damaged"
LOCK = ".lock"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or unsafe, or cannot be loaded here."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's bytes are not what was written: wrong magic or SHA-256 (truncated, corrupt)."""


class RunDirectoryBusyError(ValueError):
    """Another live process trains into the same run directory."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    A crash or a full disk during the write leaves the previous file at ``path`` intact
    and no temporary file behind (a SIGKILL leaves one, removed by :func:`remove_temporary_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder``; returns them.

    Only safe while no other process writes there: call it holding :func:`run_lock`.
    """
    removed = []
    for orphan in Path(folder).glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        if orphan.is_file():
            orphan.unlink(missing_ok=True)
            removed.append(orphan)
    return removed


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``folder`` while the block runs.

    ``flock`` on ``<folder>/.lock``: the operating system drops it when the holder exits or
    dies, so it is never stale. Raises :class:`RunDirectoryBusyError` naming the folder
    while another process holds it.
    """
    folder = Path(folder)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise RunDirectoryBusyError(
                    f"{folder} is in use by another training run (process {holder}); wait for it to end, "
                    "or train into another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`atomic_write`): a failed write keeps the previous file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    return atomic_write(path, MAGIC + hashlib.sha256(body).digest() + body)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` after verifying its SHA-256.

    Raises :class:`DamagedCheckpointError` when the bytes are not what was written, and
    :class:`CheckpointError` when they are but loading fails (out of memory, a pickle that
    ``weights_only=True`` refuses, another torch version): that file is not damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    advice = "Resume from an earlier checkpoint (training does this by itself) or retrain."
    if data[: len(MAGIC)] != MAGIC:
        raise DamagedCheckpointError(f"checkpoint {path} cannot be loaded: it does not start with {MAGIC!r}, so it is not a capsnet checkpoint or is damaged. {advice}")
    digest, body = data[len(MAGIC) : len(MAGIC) + 32], memoryview(data)[len(MAGIC) + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise DamagedCheckpointError(f"checkpoint {path} cannot be loaded: its SHA-256 does not match (truncated or corrupt). {advice}")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or malformed pickles
        first = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, MemoryError):
            hint = "free memory (or load it onto another device) and try again"
        else:
            hint = f"it holds objects that weights_only=True refuses, or another torch version wrote it (this is torch {torch.__version__})"
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first}), although it is intact "
            f"(its SHA-256 matches): it is not damaged, so keep it; {hint}"
        ) from exc


def _rotated(path: Path, k: int) -> Path:
    return path if k == 0 else path.with_name(f"{path.stem}.{k}{path.suffix}")


def rotate_and_save(payload: dict[str, Any], path: str | Path, keep: int) -> Path:
    """Save ``payload`` as ``path`` and keep the ``keep - 1`` previous ones as ``<stem>.1``, ``<stem>.2``...

    The new file is complete on disk before any old one moves, so a crash at any point
    leaves at least one good checkpoint among ``path`` and its rotations.
    """
    path = Path(path)
    staged = save_checkpoint(payload, path.with_name(f".{path.name}.new"))
    for k in range(keep - 1, 0, -1):
        if _rotated(path, k - 1).exists():
            os.replace(_rotated(path, k - 1), _rotated(path, k))
    os.replace(staged, path)
    _fsync_dir(path.parent)
    return path


def set_aside_damaged(path: Path) -> Path:
    """Rename the damaged ``path`` to ``<name>.damaged`` (kept for inspection, never loaded again)."""
    aside = path.with_name(path.name + DAMAGED)
    os.replace(path, aside)
    return aside


def load_latest(
    path: str | Path, map_location: str | torch.device = "cpu", *, keep: int = 16, set_aside: bool = False
) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint among ``path``, ``<stem>.1``, ... (None when there is none).

    A damaged newer file is skipped with a warning; with ``set_aside`` it is then renamed
    ``<name>.damaged``, so that the next rotation cannot move it over the good file loaded
    here. If files exist but none loads, raises (and moves nothing). A file that is intact
    but fails to load (:func:`load_checkpoint`) is raised at once, not skipped.
    """
    path = Path(path)
    candidates = [p for p in (_rotated(path, k) for k in range(keep)) if p.exists()]
    staged = path.with_name(f".{path.name}.new")
    if staged.exists():  # killed between writing the new file and renaming it: it is complete and newest
        candidates.insert(0, staged)
    damaged = []
    for candidate in candidates:
        try:
            found = load_checkpoint(candidate, map_location), candidate
        except DamagedCheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
            damaged.append((candidate, str(exc)))
            continue
        if set_aside:
            for bad, _ in damaged:
                log.warning("set the damaged %s aside as %s; delete it once you no longer need it", bad, set_aside_damaged(bad).name)
        return found
    if damaged:
        raise DamagedCheckpointError("no loadable checkpoint; every candidate is damaged:\n  " + "\n  ".join(e for _, e in damaged))
    return None
