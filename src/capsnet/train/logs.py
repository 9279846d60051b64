"""Metric logs: a long-format CSV and TensorBoard event files, written without TensorFlow.

The event file is the TFRecord framing (length, masked CRC-32C, payload, masked CRC-32C)
around hand-encoded ``Event`` protocol buffers holding scalar summaries, which
TensorBoard reads as it reads its own.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
import struct
import time
from pathlib import Path

from .checkpoint import atomic_write

__all__ = ["MetricsLogger", "EventFileWriter", "read_events", "read_metrics_csv"]


log = logging.getLogger(__name__)


class _RecordAppender:
    """Appends whole records to a file: a write the file system stops part way (ENOSPC, EFBIG)
    is cut back to where it began, so the file never ends in a torn record.

    Unbuffered: each record is on disk (in the page cache) when :meth:`append` returns.
    """

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: bytes) -> None:
        start = os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except BaseException:
            os.ftruncate(self._fd, start)  # shrinking needs no free space
            raise

    def close(self) -> None:
        os.close(self._fd)


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    msg = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        msg += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items()
        )
        msg += _length_delimited(5, values)  # Event.summary = Summary{value: [Value{tag, simple_value}]}
    return msg


class EventFileWriter:
    """Append scalar summaries to a TensorBoard event file in ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self._file = _RecordAppender(self.path)
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.append(header + struct.pack("<I", _masked_crc(header)) + record + struct.pack("<I", _masked_crc(record)))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._write(_event(time.time(), step, scalars=scalars))

    def close(self) -> None:
        self._file.close()


def read_events(path: str | Path) -> list[tuple[int, str, float]]:
    """``(step, tag, value)`` for every scalar in an event file; checks every CRC."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8 : pos + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        record = data[pos + 12 : pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] != _masked_crc(record):
            raise ValueError(f"{path}: bad record CRC at byte {pos}")
        pos += 16 + length
        out.extend(_parse_event(record))
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _parse_fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        yield number, value


def _parse_event(record: bytes) -> list[tuple[int, str, float]]:
    step, out = 0, []
    for number, value in _parse_fields(record):
        if number == 2:
            step = value
        elif number == 5:
            for _, v in _parse_fields(value):
                fields = dict(_parse_fields(v))
                out.append((step, fields[1].decode(), struct.unpack("<f", fields[2])[0]))
    return out


class MetricsLogger:
    """Writes every scalar to ``metrics.csv`` (step, tag, value, wall time) and to TensorBoard.

    Each :meth:`log` call appends whole lines or nothing (a full disk leaves no torn row).
    On resume, rows logged after the checkpoint's step by the interrupted run are dropped,
    and so are rows at that step whose tag starts with one of ``again`` (the resumed run logs
    them again), so the CSV describes exactly one history; that rewrite is atomic.
    """

    fields = ("step", "tag", "value", "time")

    def __init__(self, out_dir: str | Path, *, resume_step: int | None = None, again: tuple[str, ...] = ()):
        out_dir = Path(out_dir)
        self.csv_path = out_dir / "metrics.csv"
        rows = []
        if resume_step is not None and self.csv_path.exists():
            rows = [
                [r["step"], r["tag"], r["value"], r["time"]]
                for r in read_metrics_csv(self.csv_path)
                if r["step"] < resume_step or (r["step"] == resume_step and not r["tag"].startswith(again))
            ]
        atomic_write(self.csv_path, _csv_lines([self.fields, *rows]))
        self._csv = _RecordAppender(self.csv_path)
        self.events = EventFileWriter(out_dir / "tensorboard")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = f"{time.time():.3f}"
        self._csv.append(_csv_lines([step, tag, f"{float(value):.6g}", now] for tag, value in scalars.items()))
        self.events.add_scalars(step, scalars)

    def close(self) -> None:
        self._csv.close()
        self.events.close()


def _csv_lines(rows) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode()


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts with typed ``step`` and ``value``.

    A last line without its line end (cut short by a full disk or a kill) is dropped with a
    warning; any other malformed line is a ValueError naming it.
    """
    with open(path, newline="") as f:
        *lines, tail = f.read().split("\n")
    if tail:
        log.warning("%s: dropped its last line %r, which was cut short (a full disk or a killed run)", path, tail)
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            step, tag, value, when = next(csv.reader([line]))
            rows.append({"step": int(step), "tag": tag, "value": float(value), "time": float(when)})
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {line!r} is not a row of step,tag,value,time ({exc})") from None
    return rows
