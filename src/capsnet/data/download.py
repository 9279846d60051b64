"""Checksummed, atomic downloads: a file is either complete and verified or absent."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from .errors import DataError

__all__ = ["download_file", "md5sum", "verify_md5"]

log = logging.getLogger(__name__)

#: Hint appended to every data error: the two ways a user can supply the files.
DATA_HINT = (
    "Point the data root (the --data option or the CAPSNET_DATA environment variable) at a folder "
    "that holds the files, or pass download=True / --download on a machine with internet access."
)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Raise :class:`DataError` unless ``path`` exists and has MD5 ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing. {DATA_HINT}")
    got = md5sum(path)
    if got != expected:
        raise DataError(
            f"{path} fails its checksum: expected MD5 {expected}, got {got} (the file is truncated or corrupt). "
            f"Delete it and download it again. {DATA_HINT}"
        )


def download_file(urls: Sequence[str], dest: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch ``dest`` from the first mirror that answers, verify its MD5, then move it into place.

    The bytes go to a temporary file in the destination folder and are renamed only
    after the checksum matches, so an interrupted or corrupt download never leaves a
    file that looks complete. A mismatch deletes the temporary file and tries the next mirror.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s", url)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while block := response.read(1 << 20):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            got = md5sum(tmp)
            if got != md5:
                failures.append(f"{url}: MD5 {got}, expected {md5}")
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            failures.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(
        f"could not download {dest.name} into {dest.parent}; tried:\n  " + "\n  ".join(failures) + f"\n"
        f"If this machine is offline, copy the file there by hand. {DATA_HINT}"
    )
