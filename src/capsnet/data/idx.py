"""Reader and writer for the IDX format of MNIST and Fashion-MNIST (gzip or raw).

Header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then
one big-endian int32 per dimension, then the payload in row-major order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["read_idx", "write_idx"]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_maybe_gzipped(path: Path, missing_hint: str = "") -> bytes:
    """The bytes of ``path``, gunzipped when they start with the gzip magic; DataError if missing or truncated."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} is missing{'. ' + missing_hint if missing_hint else ''}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path} is not a complete gzip file ({exc}); it is truncated or corrupt: delete it and fetch it again") from None


def read_idx(path: str | Path, *, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file into a NumPy array with the file's dimensions.

    Raises :class:`DataError` naming the file on a bad magic number, a wrong number
    of dimensions or a payload that is shorter or longer than the header says.
    """
    path = Path(path)
    data = read_maybe_gzipped(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(
            f"{path} is not an IDX file: magic bytes {data[:4].hex() or '(empty)'}, expected 0000 08 <ndim> "
            f"(0x00000803 for images, 0x00000801 for labels)"
        )
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"{path} has {ndim} dimension(s), expected {expected_ndim} (magic 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes, header needs {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        raise DataError(
            f"{path} holds {got} payload bytes but its header {dims} needs {expected}: the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` (uint8) as IDX; gzip when ``compress`` or when the name ends in ``.gz``."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes() + array.tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
