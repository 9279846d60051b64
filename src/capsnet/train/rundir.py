"""A run directory: its files, the claim on it (lock, earlier run, temporary files), where to resume."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .checkpoint import DAMAGED, load_latest, remove_temporary_files, run_lock
from .distributed import Dist

__all__ = ["BEST", "LAST", "RUN_FILES", "SUMMARY", "RunExistsError"]

log = logging.getLogger("capsnet.train.loop")  # the training log's name, as before the split

LAST, BEST, SUMMARY = "last.pt", "best.pt", "metrics.json"
#: What a run in a directory consists of (glob patterns): a new run there is refused, or deletes them with overwrite.
RUN_FILES = ("last*.pt", f".{LAST}.new", BEST, "metrics.csv", SUMMARY, "*" + DAMAGED, "tensorboard/events.out.tfevents.*")


class RunExistsError(ValueError):
    """A new run was asked for in a directory that already holds one."""


@contextlib.contextmanager
def claim_run_dir(out: Path, dist: Dist, *, resume: bool, overwrite: bool):
    """Rank 0 holds ``out`` while the block runs: locked, checked for an earlier run, cleared of temporary files."""
    if not dist.is_main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        if not resume:
            _refuse_or_clear_earlier_run(out, overwrite)
        removed = remove_temporary_files(out)
        if removed:
            log.info("removed %d temporary file(s) that a killed run left in %s: %s", len(removed), out, ", ".join(p.name for p in removed))
        yield


def _refuse_or_clear_earlier_run(out: Path, overwrite: bool) -> None:
    files = sorted({p for pattern in RUN_FILES for p in out.glob(pattern)})
    if not files:
        return
    names = ", ".join(p.relative_to(out).as_posix() for p in files[:4]) + (", ..." if len(files) > 4 else "")
    if not overwrite:
        raise RunExistsError(
            f"{out} already holds a run ({names}); pass --resume to continue it, another --out to start a new run, "
            "or --overwrite to delete it and start again"
        )
    for p in files:
        p.unlink()
    log.warning("overwrite: deleted the earlier run in %s (%s)", out, names)


def resume_point(out: Path, dist: Dist, device: str) -> Optional[tuple[dict, Path]]:
    """The newest good checkpoint in ``out``: rank 0 sets the damaged newer ones aside before the others look."""
    found = load_latest(out / LAST, map_location=device, set_aside=True) if dist.is_main else None
    dist.barrier()
    if not dist.is_main:
        found = load_latest(out / LAST, map_location=device)
    if found is None:
        log.info("no checkpoint in %s: starting from scratch", out)
    return found


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """The bar on stderr. Without a terminal (a log file, a pipe) it redraws at most every 30 s,
    instead of 10 times a second, so that the file does not fill with carriage returns."""
    tty = enabled and sys.stderr is not None and sys.stderr.isatty()
    interval = 0.1 if tty else 30.0
    return tqdm(
        total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=interval, maxinterval=max(10.0, interval)
    )
