"""Atomic, checksummed checkpoints that load without running code.

File layout: the 8-byte magic ``CAPSNET1``, the 32-byte SHA-256 of the body, then the body
(``torch.save`` bytes). Loading verifies the digest before unpickling with
``weights_only=True``, so a truncated, bit-flipped or hostile file is refused with a
clear message and never executes anything.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_checkpoint", "load_latest", "rotate_and_save", "save_checkpoint"]

log = logging.getLogger(__name__)

MAGIC = b"CAPSNET1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or unsafe."""


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


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    A crash or a full disk during the write leaves the previous file at ``path`` intact
    and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(body).digest())
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` after verifying its SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    advice = "Resume from an earlier checkpoint (training does this by itself) or retrain."
    if data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: it does not start with {MAGIC!r}, so it is not a capsnet checkpoint or is damaged. {advice}")
    digest, body = data[len(MAGIC) : len(MAGIC) + 32], memoryview(data)[len(MAGIC) + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: its SHA-256 does not match (truncated or corrupt). {advice}")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or malformed pickles
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {first}). {advice}") from exc


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


def load_latest(path: str | Path, map_location: str | torch.device = "cpu", *, keep: int = 16) -> tuple[dict[str, Any], Path] | None:
    """The newest loadable checkpoint among ``path``, ``<stem>.1``, ... (None when there is none).

    A damaged newer file is skipped with a warning; if files exist but none loads, raises.
    """
    path = Path(path)
    candidates = [p for p in (_rotated(path, k) for k in range(keep)) if p.exists()]
    staged = path.with_name(f".{path.name}.new")
    if staged.exists():  # killed between writing the new file and renaming it: it is complete and newest
        candidates.insert(0, staged)
    errors = []
    for candidate in candidates:
        try:
            return load_checkpoint(candidate, map_location), candidate
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
            errors.append(str(exc))
    if errors:
        raise CheckpointError("no loadable checkpoint; every candidate is damaged:\n  " + "\n  ".join(errors))
    return None
