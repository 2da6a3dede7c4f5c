"""The columnar companion ``T.cols`` of trace ``T``: float64 blocks, each used only where it matches ``T``.

The companion holds the same ticks' times and metric values as float64 columns, in blocks, each naming
the byte range of ``T`` it stands for and that range's CRC-32.  It only makes ``read_trace`` fast (parsing
floats out of JSON is the cost of reading a trace): ``read_trace`` takes a block only after checking it
against the bytes of ``T`` it covers, and parses ``T`` itself wherever a block is missing, torn, stale or
does not match — with exactly the same result.  ``T`` stays the record; the companion can be deleted at
any time.
"""

from __future__ import annotations

import errno
import math
import operator
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, compress, repeat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from tuner.trace.format import _INT_T, MAX_LINE_BYTES, _as_float, _open_private

# ------------------------------------------------------------------------------------------------------
# The columnar companion: layout (all integers little-endian)
#
#   file header  _COLS_HEAD: magic, version, CRC-32 and length (newline included) of the trace's header line
#   blocks       _BLOCK (+ CRC-32 of its packed fields), then the payload:
#                t (float64 x ticks), values (float64 x ticks x keys, one tick's keys after another's;
#                NaN where a tick lacks the key or its value is null), has_p (uint8 x ticks: the tick line
#                has a non-empty "p"), keys (JSON list of the metric keys, in order of first appearance)
#
# A block covers the trace's bytes [start, end): whole lines, ``n_lines`` of them, ``n_ticks`` of which are
# tick lines, all written by ``TraceWriter.tick`` (any other line in the range is read from the trace).

_COLS_SUFFIX = ".cols"
_COLS_MAGIC = b"TUNERCOL"
_COLS_VERSION = 1
_COLS_HEAD = struct.Struct("<8sIIQ")
_BLOCK = struct.Struct("<4sQQIIIIIQI")
_BLOCK_CRC = struct.Struct("<I")
_BLOCK_TAG = b"BLK1"
_COLS_BLOCK_BYTES = 1024 * 1024
"""A block is written once a flush has made this many trace bytes durable since the last one (and at
close): what a killed writer leaves uncovered, and what the writer holds (references) meanwhile."""
_COLS_CONVERT_ROWS = 4096
_TICK_PREFIX = b'{"k":"tick",'
_JUST_FLOAT = {float}
_PLAIN = frozenset((float, int, bool, type(None)))
"""Metric value types whose JSON reads back as the same number (NaN/inf floats are written as null)."""

_cols_write = os.write  # a test stands a failing disk for the companion in here


def columns_path(path: str | os.PathLike[str]) -> Path:
    """The columnar companion of trace ``path``: ``<path>.cols`` (``run.jsonl`` -> ``run.jsonl.cols``)."""
    p = Path(path)
    return p.with_name(p.name + _COLS_SUFFIX)


def _json_number(v: Any) -> float:
    """What ``read_trace`` makes of a plain value ``v`` once written as JSON (``_PLAIN`` types only)."""
    if type(v) is float:
        return v if math.isfinite(v) else math.nan
    return _as_float(v)


def _plain_block(vals: list[Any]) -> np.ndarray | None:
    """Plain values -> float64 exactly as ``read_trace`` reads them back from the trace; None for others
    (a numpy scalar, a float subclass, a string: their JSON need not read back as the same number).  One
    pass over the types in C, one numpy conversion (``marshal`` did both in one call, but it is on the
    project's list of modules that never enter trace code: ``tests/test_security.py``)."""
    types = set(map(type, vals))
    if types == _JUST_FLOAT:  # the usual case
        a = np.fromiter(vals, np.float64, len(vals))
        inf = np.isinf(a)  # NaN and infinities are written as null
        if inf.any():
            a[inf] = np.nan
        return a
    if not types <= _PLAIN:
        return None
    try:
        a = np.array(vals, dtype=np.float64)
    except OverflowError:  # an int beyond float64: read back as +-inf
        return np.array([_json_number(v) for v in vals], dtype=np.float64)
    inf = np.isinf(a)  # here only from float values (ints that large raised): written as null
    if inf.any():
        a[inf] = np.nan
    return a


def _block_values(ms: list[Any]) -> tuple[list[str], np.ndarray] | None:
    """Ticks' value dicts -> (keys in order of first appearance, ticks x keys float64); None when a tick's
    JSON would not read back as these numbers (a non-string key, a string or other value); ``TypeError``
    for a value mapping that is not a dict."""
    n = len(ms)
    first = ms[0]
    width = len(first)
    flat_keys = list(chain.from_iterable(ms))
    if len(flat_keys) == width * n and flat_keys == list(first) * n:  # one layout throughout (the usual)
        keys = list(first)
        if not all(type(k) is str for k in keys):
            return None
        block = _plain_block(list(chain.from_iterable(map(dict.values, ms))))
        if block is None:
            return None
        return keys, block.reshape(n, width)
    layouts: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(ms):
        layouts.setdefault(tuple(m), []).append(i)
    order: dict[str, int] = {}
    for lay in layouts:
        if not all(type(k) is str for k in lay):
            return None
        for k in lay:
            order.setdefault(k, len(order))
    out = np.full((n, len(order)), np.nan)
    for lay, idx in layouts.items():
        block = _plain_block(list(chain.from_iterable(ms[i].values() for i in idx)))
        if block is None:
            return None
        if lay:
            out[np.ix_(idx, [order[k] for k in lay])] = block.reshape(len(idx), len(lay))
    return list(order), out


_Part = tuple[np.ndarray, np.ndarray, list[str], np.ndarray]
"""Converted ticks: times, has_p, keys (first appearance), values (ticks x keys)."""


def _convert_rows(rows: list[Any]) -> _Part | None:
    """Ticks as ``tick`` keeps them (time, values, has processes; flat, three items a tick) -> a part of a
    block; None when they cannot be stored exactly (then their range is read from the trace)."""
    ts = rows[0::3]
    if not {float, int}.issuperset(map(type, ts)):
        return None
    try:
        t = np.array(ts, dtype=np.float64)
    except OverflowError:
        return None
    if not np.isfinite(t).all() or (np.abs(t) >= _INT_T).any():
        return None  # a null or out-of-range time: a malformed tick, read (and reported) from the trace
    ms = rows[1::3]
    if len(set(map(id, ms))) != len(ms):  # one dict given for two ticks: it may have changed since
        return None
    try:
        kv = _block_values(ms)
    except TypeError:  # not a dict
        return None
    if kv is None:
        return None
    return t, np.array(rows[2::3], dtype=np.uint8), kv[0], kv[1]


def _block_bytes(parts: list[_Part], start: int, end: int, crc: int, n_lines: int) -> bytes:
    """One companion block from the parts of the ticks in trace bytes [start, end)."""
    if len(parts) == 1:
        t, has_p, keys, values = parts[0]
    else:
        t = np.concatenate([p[0] for p in parts])
        has_p = np.concatenate([p[1] for p in parts])
        keys = parts[0][2]
    if len(parts) == 1:
        pass
    elif all(p[2] == keys for p in parts):
        values = np.concatenate([p[3] for p in parts])
    else:  # the keys changed between parts: their union, in order of first appearance
        order: dict[str, int] = {}
        for p in parts:
            for k in p[2]:
                order.setdefault(k, len(order))
        keys = list(order)
        values = np.full((len(t), len(keys)), np.nan)
        row = 0
        for _, _, pkeys, pvalues in parts:
            values[row : row + len(pvalues), [order[k] for k in pkeys]] = pvalues
            row += len(pvalues)
    kj = orjson.dumps(keys)
    pieces = (t.data, np.ascontiguousarray(values).data, has_p.data, kj)
    payload_crc = 0
    for piece in pieces:
        payload_crc = zlib.crc32(piece, payload_crc)
    size = sum(piece.nbytes if isinstance(piece, memoryview) else len(piece) for piece in pieces)
    head = _BLOCK.pack(_BLOCK_TAG, start, end, crc, n_lines, len(t), len(keys), len(kj), size, payload_crc)
    return b"".join((head, _BLOCK_CRC.pack(zlib.crc32(head)), *pieces))


class _ColumnsOut:
    """The companion being written; the ``TraceWriter`` gives up on it (``abandon``) at its first failure."""

    def __init__(self, trace: Path, header_line: bytes) -> None:
        self.path = columns_path(trace)
        self.fd = _open_private(self.path, os.O_TRUNC)
        try:
            self.ino = os.fstat(self.fd).st_ino
            self._write(_COLS_HEAD.pack(_COLS_MAGIC, _COLS_VERSION, zlib.crc32(header_line), len(header_line)))
        except BaseException:
            self.abandon()
            raise
        self.start = self.end = len(header_line)  # trace bytes: the current block's start, the durable end
        self.crc = 0
        self.lines = 0
        self.skip = False  # the current block's range lost lines or holds one the rows do not describe
        self.bad = False  # a tick of the current block cannot be stored exactly
        self.parts: list[_Part] = []

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = _cols_write(self.fd, view)
            except InterruptedError:
                continue
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]

    def durable(self, rows: list[Any], data: bytes, n_lines: int, final: bool) -> None:
        """``data`` (``n_lines`` whole lines, the ticks of ``rows`` among them) is now in the trace.

        Rows are converted at a block's end (or every ``_COLS_CONVERT_ROWS`` ticks, when ticks are small:
        the dicts kept stay few); one conversion has a fixed cost of ~20 numpy calls."""
        self.end += len(data)
        if self.skip:  # the range since the last block is read from the trace; the next one starts here
            rows.clear()
            self.parts.clear()
            self.start, self.crc, self.lines, self.skip, self.bad = self.end, 0, 0, False, False
            return
        self.crc = zlib.crc32(data, self.crc)
        self.lines += n_lines
        block_end = final or self.end - self.start >= _COLS_BLOCK_BYTES
        if rows and (block_end or len(rows) >= 3 * _COLS_CONVERT_ROWS):
            part = None if self.bad else _convert_rows(rows)
            rows.clear()
            if part is None:
                self.bad = True  # this block is left out
            else:
                self.parts.append(part)
        if block_end:
            block = _block_bytes(self.parts, self.start, self.end, self.crc, self.lines) if self.parts else None
            if self.bad:
                block = None
            self.parts.clear()
            self.start, self.crc, self.lines, self.bad = self.end, 0, 0, False
            if block is not None:
                self._write(block)

    def failed(self, written: int) -> None:
        """A trace write failed after ``written`` bytes: the current block's range is not what the rows say."""
        self.end += written
        self.skip = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abandon(self) -> None:
        """Close and remove the companion (only if the path is still ours): readers then parse the trace."""
        fd, self.fd = self.fd, -1
        try:
            mine = fd >= 0 and os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except OSError:
            mine = False
        if mine:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


# -- reading: the blocks that match the trace ----------------------------------------------------------


@dataclass
class _Covered:
    """A companion block that matches the trace: its ticks' columns, and its other lines parsed."""

    t: np.ndarray
    keys: list[str]
    values: np.ndarray
    """ticks x keys"""
    p_t: np.ndarray
    p_lines: list[bytes]
    """The lines of the ticks with processes, parsed for ``TraceData.procs`` when it is first asked for."""
    recs: list[dict[str, Any]]


@dataclass
class _Block:
    """A companion block whose bytes, counts and payload match the trace's lines ``start``..``end``."""

    start: int
    end: int
    lines: list[bytes]
    others: list[int]
    """Indices (in ``lines``) of the lines that are not ticks."""
    covered: _Covered


def _open_companion(p: Path, f: BinaryIO) -> BinaryIO | None:
    """The companion of trace ``p`` (open as ``f``, at its start) if it was written for this trace — its
    header line's length and CRC match — positioned at its first block; else None."""
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        cf = open(columns_path(p), "rb")  # noqa: SIM115 - the caller closes it
    except (OSError, ValueError):
        return None
    try:
        head = cf.read(_COLS_HEAD.size)
        if len(head) == _COLS_HEAD.size:
            magic, version, crc, length = _COLS_HEAD.unpack(head)
            if magic == _COLS_MAGIC and version == _COLS_VERSION and 0 < length <= MAX_LINE_BYTES:
                try:
                    first = f.read(length)
                finally:
                    f.seek(0)
                if len(first) == length and first.find(b"\n") == length - 1 and zlib.crc32(first) == crc:
                    return cf
    except (OSError, ValueError, struct.error):
        pass
    cf.close()
    return None


def _companion_blocks(cf: BinaryIO) -> Iterator[tuple[tuple[Any, ...], bytes]]:
    """The companion's blocks (fields, payload) up to its end or the first torn or corrupt one."""
    size = _BLOCK.size + _BLOCK_CRC.size
    try:
        while True:
            head = cf.read(size)
            if len(head) < size:
                return
            fields = _BLOCK.unpack_from(head)
            (head_crc,) = _BLOCK_CRC.unpack_from(head, _BLOCK.size)
            if fields[0] != _BLOCK_TAG or zlib.crc32(head[: _BLOCK.size]) != head_crc:
                return
            payload = cf.read(fields[8])
            if len(payload) != fields[8] or zlib.crc32(payload) != fields[9]:
                return
            yield fields, payload
    except (OSError, ValueError, MemoryError, struct.error):
        return


def _check_block(f: BinaryIO, size: int, pos: int, fields: tuple[Any, ...], payload: bytes) -> _Block | None:
    """The block if it stands for the trace's bytes it names (after ``pos``): they are whole lines with
    the CRC, line and tick counts it recorded; else None (that range is then parsed from the trace)."""
    _, start, end, crc, n_lines, n_ticks, n_keys, keys_len, payload_len, _ = fields
    if not (pos <= start < end <= size and 0 < n_ticks <= n_lines):
        return None
    if payload_len != 8 * n_ticks * (1 + n_keys) + n_ticks + keys_len:
        return None
    f.seek(start - 1)
    data = f.read(end - start + 1)
    if len(data) != end - start + 1 or data[0] != 10 or data[-1] != 10:
        return None
    if zlib.crc32(memoryview(data)[1:]) != crc:
        return None
    lines = data.split(b"\n")
    if len(lines) != n_lines + 2:
        return None
    del lines[0]
    lines.pop()
    if len(data) > MAX_LINE_BYTES and max(map(len, lines)) > MAX_LINE_BYTES:
        return None  # read from the trace, which says so
    if n_ticks == n_lines:
        if data.count(b"\n" + _TICK_PREFIX) != n_ticks:
            return None
        ticks, others = lines, []
    else:
        is_tick = list(map(bytes.startswith, lines, repeat(_TICK_PREFIX)))
        ticks = list(compress(lines, is_tick))
        if len(ticks) != n_ticks:
            return None
        others = list(compress(range(n_lines), map(operator.not_, is_tick)))
    keys = orjson.loads(payload[payload_len - keys_len :])
    if type(keys) is not list or len(keys) != n_keys or not all(type(k) is str for k in keys):
        return None
    if len(set(keys)) != n_keys:
        return None
    t = np.frombuffer(payload, np.float64, n_ticks, 0)
    values = np.frombuffer(payload, np.float64, n_keys * n_ticks, 8 * n_ticks).reshape(n_ticks, n_keys)
    has_p = np.frombuffer(payload, np.uint8, n_ticks, 8 * n_ticks * (1 + n_keys))
    p_idx = np.flatnonzero(has_p)
    p_lines = ticks if len(p_idx) == n_ticks else [ticks[i] for i in p_idx.tolist()]
    return _Block(start, end, lines, others, _Covered(t, keys, values, t[p_idx], p_lines, []))
