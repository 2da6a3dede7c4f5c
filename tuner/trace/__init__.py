"""Append-only JSON Lines traces: writer, reader (into numpy columns) and follower (for growing files).

One JSON object a line.  The first line is the header; then records, each with a kind ``k``:

- ``tick``   ``{"k":"tick","t":1.2,"m":{metric: value},"p":{pid: {...}}}`` — one tick's readings
- ``skip``   ``{"k":"skip","t":1.3,"n":2}`` — ticks missed because the sampler was late
- ``event``  ``{"k":"event","t":1.4,"kind":"request","data":{...}}``
- ``action`` ``{"k":"action","t":1.5,"policy":...,"knob":...,"value":...,"outcome":...,...}``
- ``note``   ``{"k":"note","t":1.6,"level":"warn","msg":"..."}``
- ``end``    ``{"k":"end","t":9.0,"exit_code":0}``

Times are seconds since the trace started, on the monotonic clock; the header carries the wall-clock
start for display.  The writer flushes with ``os.write`` on every tick, so a reader (or a crash) sees
every completed tick; a torn last line is skipped with a warning.

Lines are encoded with ``orjson`` (the standard ``json`` module for what orjson refuses: integers beyond
64 bits, lone surrogates) and read with it (``json`` again for what orjson refuses but older writers
produced).  The format is plain JSON either way: non-ASCII text is UTF-8 rather than ``\\u`` escapes and
exponents are shorter (``1e-7``), which any JSON reader parses to the same values.

Next to a trace ``T`` the writer keeps a columnar companion ``T.cols`` (see ``columns_path``): the same
ticks' times and metric values as float64 columns, in blocks, each naming the byte range of ``T`` it
stands for and that range's CRC-32.  It only makes ``read_trace`` fast (parsing floats out of JSON is
the cost of reading a trace): ``read_trace`` takes a block only after checking it against the bytes of
``T`` it covers, and parses ``T`` itself wherever a block is missing, torn, stale or does not match —
with exactly the same result.  ``T`` stays the record; the companion can be deleted at any time.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import operator
import os
import platform
import socket
import stat
import struct
import sys
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, compress, repeat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from tuner import __version__
from tuner.records import Applied, Event, Sample

SCHEMA_VERSION = 1
MAX_LINE_BYTES = 16 * 1024 * 1024
"""A longer line is corrupt (the largest real records — request events with text — are far below)."""
BUFFER_LIMIT = 32 * 1024 * 1024
"""Bytes kept in memory while the trace cannot be written (disk full); beyond it the oldest are dropped."""
_AUTO_FLUSH_BYTES = 1024 * 1024
_READ_CHUNK = 1024 * 1024
_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_dumps = orjson.dumps


class TraceError(Exception):
    """A trace that cannot be read; the message is one line, fit to show a user."""


def _round6(t: Any) -> Any:
    """``round(t, 6)`` (a tick's time as written), in a third of its time for the usual float times.

    ``round`` rounds the exact binary value to 6 decimals through a decimal string.  Here ``y = t * 1e6``
    is within 2**-14 of that exact value (|y| < 2**40); unless ``y`` is within 0.001 of a tie, the nearest
    integer ``k`` is the same for both, and ``k / 1e6`` (``k`` exact, one correctly rounded division) is
    the double nearest ``k``e-6, which is what ``round`` returns.  Zero (its sign) and the rest: ``round``."""
    if type(t) is float:
        y = t * 1e6
        if -1e12 < y < 1e12:
            k = round(y)
            if k and -0.499 < y - k < 0.499:
                return k / 1e6
    return round(t, 6)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


_json_dumps = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def _encode_std(rec: Mapping[str, Any]) -> bytes:
    """The standard library's encoding, for what orjson refuses (ints beyond 64 bits, lone surrogates)."""
    try:
        line = _json_dumps(rec)
    except ValueError:  # NaN/inf inside: replace them, a trace is strict JSON for other tools
        line = _json_dumps(json.loads(json.dumps(rec, default=str), parse_constant=lambda _: None))
    return line.encode()


def encode_record(rec: Mapping[str, Any]) -> bytes:
    """One record as one line of JSON (no newline).  NaN and infinities become ``null``."""
    try:
        return orjson.dumps(rec, default=str, option=_OPTS)
    except TypeError:
        return _encode_std(rec)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses but json accepts (older writers: escaped lone surrogates, 1e400)
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def package_versions(names: Iterable[str] = ("psutil", "numpy", "textual", "torch", "nvidia-ml-py")) -> dict:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def make_header(
    *,
    probes: Mapping[str, Mapping[str, Any]],
    interval_s: float,
    command: list[str] | None = None,
    pid: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The first line of a trace: what was measured, where, with what, in which units."""
    units: dict[str, str] = {}
    for p in probes.values():
        units.update(p.get("metrics", {}))
    hdr: dict[str, Any] = {
        "k": "header",
        "schema": SCHEMA_VERSION,
        "tool": "inference-tuner",
        "version": __version__,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": package_versions(),
        "started_unix": time.time(),
        "interval_s": interval_s,
        "command": command,
        "pid": pid,
        "probes": {k: dict(v) for k, v in probes.items()},
        "units": units,
    }
    if extra:
        hdr.update(extra)
    return hdr


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (a trace can hold prompts and paths)."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_TRUNC; a trace is private
    except OSError:
        pass
    return fd


_os_write = os.write  # a test stands a failing disk in here


def _write_all(fd: int, data: bytes) -> int:
    """Write ``data``; returns how many bytes went out before an ``OSError`` (re-raised with ``.written``)."""
    view = memoryview(data)
    done = 0
    while done < len(data):
        try:
            n = _os_write(fd, view[done:])
        except InterruptedError:
            continue
        except OSError as exc:
            exc.written = done  # type: ignore[attr-defined]
            raise
        if n == 0:
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            err.written = done  # type: ignore[attr-defined]
            raise err
        done += n
    return done


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


class TraceWriter:
    """Appends records to a trace file (created 0600, its directory 0700 if created).

    ``write()`` and the record helpers encode at once and keep the line; ``flush()`` writes every kept
    line with one ``os.write``.  A failed write (disk full, file system gone read-only) keeps what was not
    written — the tail of a half-written line first, so the file never gets a torn line in the middle —
    up to ``BUFFER_LIMIT`` bytes (the oldest whole lines dropped and counted in ``dropped``), sets
    ``error`` and retries on the next flush.  A trace file removed while recording is created again (the
    header first, then a note saying so).  Writing the header at open failing raises ``OSError``.

    It also writes the trace's columnar companion (``columns_path``): each tick's values dict is kept (by
    reference: do not change it after ``tick``) until a flush has made about ``_COLS_BLOCK_BYTES`` of the
    trace durable, then converted to one block.  Any failure of the companion only removes it (readers
    then parse the trace); a failed trace write leaves the range it touched out of the companion.
    """

    def __init__(self, path: str | os.PathLike[str], header: Mapping[str, Any]) -> None:
        self.path = Path(path)
        make_private_dirs(self.path.parent)
        self._fd = _open_private(self.path, os.O_TRUNC)
        try:  # an overwritten trace's companion must not outlive it (a new one is made below)
            os.unlink(columns_path(self.path))
        except OSError:
            pass
        self._cols: _ColumnsOut | None = None
        self._cols_rows: list[Any] | None = None  # (t, values, has processes) of each tick, flat
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._carry = b""
        self.error: str | None = None
        self.dropped = 0
        self.records = 0
        self.reopened = 0
        self._closed = False
        self._listeners: list[Callable[[Mapping[str, Any]], None]] = []
        self._line_listeners: list[Callable[[bytes, str], None]] = []
        self.header = dict(header)
        self._header_line = encode_record(self.header) + b"\n"
        try:
            _write_all(self._fd, self._header_line)
        except OSError:
            os.close(self._fd)
            try:
                os.unlink(self.path)  # a torn header would only make an unreadable file
            except OSError:
                pass
            raise
        self.records = 1
        self._last_t: Any = 0.0
        try:
            if stat.S_ISREG(os.fstat(self._fd).st_mode):
                self._cols = _ColumnsOut(self.path, self._header_line)
                self._cols_rows = []
        except Exception:  # no companion then: the trace is read by parsing it
            self._cols = None

    # -- records -------------------------------------------------------------------------------------
    def write(self, rec: Mapping[str, Any]) -> None:
        """Encode ``rec`` as one line and keep it for the next flush.  Never raises for its content."""
        if self._cols_rows is not None and rec.get("k") == "tick":
            self._cols_skip()  # a tick line the companion's rows do not describe: that block is left out
        self._write(rec)

    def _write(self, rec: Mapping[str, Any]) -> None:
        try:
            line = encode_record(rec)
        except Exception as exc:  # circular data, a __str__ that raises: record that, not the crash
            line = encode_record(
                {"k": "note", "t": self._last_t, "level": "error",
                 "msg": f"a '{rec.get('k')}' record could not be encoded: {type(exc).__name__}: {exc}"}
            )  # fmt: skip
        t = rec.get("t")
        if type(t) is float or type(t) is int:
            self._last_t = t
        self._keep(line)
        if self._line_listeners:
            self._tell_line(line, str(rec.get("k")))
        if self._listeners:
            self._tell(rec)

    def _keep(self, line: bytes) -> None:
        self._pending.append(line)
        self._pending_bytes += len(line) + 1
        self.records += 1
        if self._pending_bytes > _AUTO_FLUSH_BYTES:
            self.flush()

    def _tell(self, rec: Mapping[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(rec)
            except Exception:  # an observer must never stop the recording
                self._listeners.remove(fn)

    def _tell_line(self, line: bytes, kind: str) -> None:
        for fn in list(self._line_listeners):
            try:
                fn(line, kind)
            except Exception:  # an observer must never stop the recording
                self._line_listeners.remove(fn)

    def add_line_listener(self, fn: Callable[[bytes, str], None]) -> None:
        """Call ``fn(line, kind)`` with every record's encoded JSON (no newline) and its ``k``, as written
        from now on: what the live feed forwards as is (no copy of the tick's dicts, no second encoding).
        A listener that raises is removed; the trace goes on."""
        self._line_listeners.append(fn)

    def add_listener(self, fn: Callable[[Mapping[str, Any]], None]) -> None:
        """Call ``fn(record)`` for every record written from now on (live observers, the TUI).  A
        listener that raises is removed; the trace goes on."""
        self._listeners.append(fn)

    def tick(self, t: float, values: Mapping[str, Any], procs: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        """One tick's readings, encoded at once.  ``values`` is kept by reference for the companion until
        its next block: do not change it afterwards (the sampler and replay make a new dict every tick).
        The same dict given for two ticks of a block is noticed, and that block is read from the trace."""
        if type(t) is float and -1e6 < t < 1e6:  # _round6, inline (the hot path)
            y = t * 1e6
            k = round(y)
            tt = k / 1e6 if k and -0.499 < y - k < 0.499 else round(t, 6)
        else:
            tt = _round6(t)
        rec: dict[str, Any]
        if self._listeners:  # they get a record of their own: cleaned, and not the caller's dicts
            values = {k: _clean(v) for k, v in values.items()}
            rec = {"k": "tick", "t": tt, "m": values}
            if procs:
                rec["p"] = {str(pid): dict(v) for pid, v in procs.items()}
                procs = rec["p"]
        else:  # encoded at once, so the caller's dicts need no copy; orjson writes NaN/inf as null itself
            rec = {"k": "tick", "t": tt, "m": values, "p": procs} if procs else {"k": "tick", "t": tt, "m": values}
        # What write() does, inline (the sampler's hot path), plus the companion's row.
        try:
            line = _dumps(rec, default=str, option=_OPTS)
        except Exception:
            line = b""
        rows = self._cols_rows
        if not line:
            try:
                line = encode_record(rec)
            except Exception as exc:  # circular data, a __str__ that raises: record that, not the crash
                line = encode_record(
                    {"k": "note", "t": self._last_t, "level": "error",
                     "msg": f"a 'tick' record could not be encoded: {type(exc).__name__}: {exc}"}
                )  # fmt: skip
                if rows is not None:
                    self._cols_skip()
                rows = None
        if rows is not None:
            if type(values) is dict and (not procs or type(procs) is dict):
                # kept by reference (a copy cost 0.7 us a record, more than a third of the companion);
                # a dict given twice in one block (a caller refilling one dict) leaves that block out
                rows += (tt, values, bool(procs))
            else:  # another mapping, or procs written as a string (a malformed tick): read from the trace
                self._cols_skip()
        if type(tt) is float or type(tt) is int:
            self._last_t = tt
        self._pending.append(line)
        self._pending_bytes += len(line) + 1
        self.records += 1
        if self._pending_bytes > _AUTO_FLUSH_BYTES:
            self.flush()
        if self._line_listeners:
            self._tell_line(line, "tick")
        if self._listeners:
            self._tell(rec)

    def samples(self, t: float, samples: Iterable[Sample]) -> None:
        """Merge one tick's samples into a tick record; their events become event records."""
        values: dict[str, Any] = {}
        procs: dict[int, dict[str, Any]] = {}
        events: list[Event] = []
        for s in samples:
            values.update(s.values)
            if s.procs:
                for pid, pv in s.procs.items():
                    procs.setdefault(pid, {}).update(pv)
            events.extend(s.events)
        self.tick(t, values, procs)
        for e in events:
            self.event(e)

    def skip(self, t: float, n: int) -> None:
        self.write({"k": "skip", "t": round(t, 6), "n": n})

    def event(self, e: Event) -> None:
        self.write({"k": "event", "t": round(e.t, 6), "kind": e.kind, "data": dict(e.data)})

    def action(self, a: Applied) -> None:
        act = a.action
        self.write(
            {
                "k": "action",
                "t": round(a.t, 6),
                "policy": act.policy,
                "knob": act.knob,
                "value": act.value,
                "previous": a.previous,
                "outcome": a.outcome,
                "reason": act.reason,
                "evidence": dict(act.evidence),
                "result": dict(a.result),
            }
        )

    def note(self, t: float, msg: str, level: str = "info", **data: Any) -> None:
        rec: dict[str, Any] = {"k": "note", "t": round(t, 6), "level": level, "msg": msg}
        if data:
            rec["data"] = data
        self.write(rec)

    def end(self, t: float, **data: Any) -> None:
        self.write({"k": "end", "t": round(t, 6), **data})

    # -- I/O -----------------------------------------------------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        """Bytes encoded but not yet on disk."""
        return len(self._carry) + self._pending_bytes

    def flush(self) -> bool:
        """Write everything pending.  False (and ``error`` set) when the write failed: what was not
        written is kept (bounded; the oldest whole lines dropped and counted) and the next flush retries."""
        if self._closed or not (self._pending or self._carry):
            return True
        try:
            self._check_file()
        except OSError as exc:
            return self._failed(exc)
        data = self._carry
        n_lines = len(self._pending)
        if self._pending:
            self._pending.append(b"")  # the last line's newline, without copying the joined lines again
            data += b"\n".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            written = getattr(exc, "written", 0)
            self._carry = data[written:]
            if self._cols is not None:
                self._cols.failed(written)
            return self._failed(exc)
        self._carry = b""
        self.error = None
        if self._cols is not None:
            self._cols_durable(data, n_lines, False)
        return True

    def _cols_durable(self, data: bytes, n_lines: int, final: bool) -> None:
        assert self._cols is not None and self._cols_rows is not None
        try:
            self._cols.durable(self._cols_rows, data, n_lines, final)
        except Exception:  # disk full, EIO, a file size limit, its directory gone: readers parse the trace
            self._cols_abandon()

    def _cols_skip(self) -> None:
        if self._cols is not None:
            self._cols.skip = True

    def _cols_abandon(self) -> None:
        cols, self._cols, self._cols_rows = self._cols, None, None
        if cols is not None:
            cols.abandon()

    def _failed(self, exc: OSError) -> bool:
        self._cols_skip()
        self._bound()
        self.error = f"cannot write trace {self.path}: {exc.strerror or exc}"
        return False

    def _bound(self) -> None:
        """Keep at most ``BUFFER_LIMIT`` bytes unwritten: drop the oldest whole lines, never the tail of
        the line half on disk (without it the file would have a torn line in the middle)."""
        excess = self.buffered_bytes - BUFFER_LIMIT
        if excess <= 0:
            return
        carry = self._carry
        head = carry.find(b"\n") + 1  # the first (maybe partly written) line stays
        if 0 < head < len(carry):
            cut = carry.find(b"\n", min(head + excess, len(carry)) - 1)
            cut = len(carry) - 1 if cut < 0 else cut
            self.dropped += carry.count(b"\n", head, cut + 1)
            excess -= cut + 1 - head
            self._carry = carry[:head] + carry[cut + 1 :]
        while excess > 0 and self._pending:
            line = self._pending.pop(0)
            self._pending_bytes -= len(line) + 1
            excess -= len(line) + 1
            self.dropped += 1

    def _check_file(self) -> None:
        """Create the trace again if it was removed while recording (its records would go nowhere)."""
        if os.fstat(self._fd).st_nlink > 0:
            return
        try:  # some file systems report no links at all: only a path that is gone means "removed"
            os.stat(self.path)
            return
        except OSError:
            pass
        fd = _open_private(self.path, os.O_EXCL) if self.path.parent.is_dir() else -1
        if fd < 0:
            make_private_dirs(self.path.parent)
            fd = _open_private(self.path, os.O_EXCL)
        note = encode_record(
            {"k": "note", "t": self._last_t, "level": "warn",
             "msg": "the trace file was removed while recording; the records before this note went with it"}
        )  # fmt: skip
        try:
            _write_all(fd, self._header_line + note + b"\n")
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(self._fd)
        self._fd = fd
        self._carry = b""  # the tail of a line whose start was in the removed file
        self.reopened += 1
        self._cols_abandon()  # its offsets were the removed file's

    def close(self) -> None:
        if self._closed:
            return
        ok = self.flush()
        self._closed = True
        os.close(self._fd)
        if self._cols is not None:
            if ok:  # the last, partial block
                self._cols_durable(b"", 0, True)
            if self._cols is not None:
                self._cols.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------
# Reading

_TOO_LONG = None
"""Stands for a line longer than ``MAX_LINE_BYTES`` in what ``_chunks`` yields (its bytes are not kept)."""


def _chunks(f: BinaryIO, limit: int | None = None) -> Iterator[tuple[list[bytes | None], bool]]:
    """The file's lines (without newlines) a few MiB at a time, from where ``f`` is to its end or for
    ``limit`` bytes; ``True`` with the last batch when they do not end with a newline (the last line is
    torn).  Lines over ``MAX_LINE_BYTES`` come as ``None`` and are never held whole in memory."""
    carry = b""
    skipping = False  # inside a too-long line already reported
    while True:
        if limit is None:
            chunk = f.read(_READ_CHUNK)
        else:
            chunk = f.read(min(_READ_CHUNK, limit)) if limit > 0 else b""
            limit -= len(chunk)
        if not chunk:
            break
        if skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                continue
            chunk = chunk[nl + 1 :]
            skipping = False
        data = carry + chunk if carry else chunk
        lines: list[bytes | None] = data.split(b"\n")  # type: ignore[assignment]
        tail = lines.pop()
        carry = tail if isinstance(tail, bytes) else b""
        if len(data) > MAX_LINE_BYTES:
            lines = [ln if ln is None or len(ln) <= MAX_LINE_BYTES else _TOO_LONG for ln in lines]
        if len(carry) > MAX_LINE_BYTES:
            lines.append(_TOO_LONG)
            carry, skipping = b"", True
        if lines:
            yield lines, False
    if carry:
        yield [carry], True


_TIMED = frozenset(("tick", "skip", "event", "action", "note", "end"))
_INT_T = 2**53


def _well_formed(rec: Any) -> bool:
    """A dict with a kind; the kinds this reader knows have a numeric ``t`` and the shapes the writer
    gives them (unknown kinds pass, for newer writers)."""
    if type(rec) is not dict:
        return False
    k = rec.get("k")
    if type(k) is not str:
        return False
    if k not in _TIMED:
        return True
    t = rec.get("t")
    if type(t) is not float and (type(t) is not int or not -_INT_T < t < _INT_T):  # no bool, no 10**400
        return False
    if k == "tick":
        m, p = rec.get("m"), rec.get("p")
        return (m is None or type(m) is dict) and (p is None or type(p) is dict)
    if k == "event":
        d = rec.get("data")
        return d is None or type(d) is dict
    if k == "skip":
        return type(rec.get("n", 1)) is int
    return True


def _parse_line(raw: bytes, lineno: int) -> dict[str, Any]:
    try:
        rec = _loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:80]
        raise TraceError(f"line {lineno} is not valid JSON ({why})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("k"), str):
        raise TraceError(f"line {lineno} is not a trace record (no kind 'k')")
    if not _well_formed(rec):
        raise TraceError(f"line {lineno}: a '{rec['k'][:20]}' record is malformed")
    return rec


def check_header(rec: Mapping[str, Any], path: Path) -> None:
    if rec.get("k") != "header" or rec.get("tool") != "inference-tuner":
        raise TraceError(f"{path}: not an inference-tuner trace (the first line is not its header)")
    schema = rec.get("schema")
    if schema != SCHEMA_VERSION:
        raise TraceError(
            f"{path}: trace schema version {schema!r} is not supported (this tuner reads {SCHEMA_VERSION})"
        )


def _open_trace(p: Path) -> BinaryIO:
    try:
        f = open(p, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise TraceError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{p}: is a directory, not a trace file") from None
    except PermissionError:
        raise TraceError(f"{p}: permission denied") from None
    except OSError as exc:
        raise TraceError(f"cannot read {p}: {exc.strerror or exc}") from None
    return f


def _read_header(batch: list[bytes | None], p: Path, torn: bool) -> dict[str, Any]:
    first = batch[0]
    if first is _TOO_LONG:
        raise TraceError(f"{p}: not an inference-tuner trace (binary or foreign content)")
    assert first is not None
    if not first.strip():
        if any(ln is None or ln.strip() for ln in batch):
            raise TraceError(f"{p}: not an inference-tuner trace (the first line is not its header)")
        raise TraceError(f"{p}: empty file, not a trace")
    if b"\x00" in first or not first.lstrip().startswith(b"{"):
        raise TraceError(f"{p}: not an inference-tuner trace (binary or foreign content)")
    try:
        header = _parse_line(first, 1)
    except TraceError:
        if torn and len(batch) == 1 and first.replace(b" ", b"").startswith(b'{"k":"header"'):
            raise TraceError(
                f"{p}: not an inference-tuner trace yet: the file ends inside its header line (truncated)"
            ) from None
        raise TraceError(f"{p}: not an inference-tuner trace (the first line is not its header)") from None
    check_header(header, p)
    return header


def _line_record(raw: bytes, lineno: int, p: Path, skip_bad: bool, warnings: list[str] | None) -> dict[str, Any] | None:
    """One whole line (not torn, not too long) as ``_batches`` reads it: the record, or None for a blank
    line or a bad one skipped with a warning (``skip_bad``); else a bad line is a ``TraceError``."""
    try:
        return _parse_line(raw, lineno)
    except TraceError as exc:
        if not raw.strip():
            return None
        if not skip_bad:
            raise TraceError(f"{p}: {exc} (use --skip-bad to read past it)") from None
        if warnings is not None:
            warnings.append(f"{p}: {exc}; skipped")
        return None


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


def _batches(
    p: Path, skip_bad: bool, warnings: list[str] | None, columns: bool = False
) -> Generator[list[dict[str, Any]] | _Covered, None, None]:
    """The trace's records a few MiB at a time: ``[header]`` first, then lists of records.

    A batch of well-formed lines is parsed in one list comprehension; a batch with anything odd in it
    (a blank, torn, corrupt or too-long line) goes line by line to say which line and what.

    With ``columns``, the ranges a companion block stands for (checked against the trace's bytes) come as
    one ``_Covered`` each instead: their ticks' columns, and their other lines parsed (as lines, with the
    same errors and warnings).  Everything else is parsed from the trace as without it."""
    f = _open_trace(p)
    loads = orjson.loads
    lineno = 0

    def parse(chunks: Iterable[tuple[list[bytes | None], bool]]) -> Generator[list[dict[str, Any]], None, None]:
        nonlocal lineno
        for lines, torn in chunks:
            if lineno == 0:
                yield [_read_header(lines, p, torn)]
                lineno = 1
                lines = lines[1:]
                if not lines:
                    continue
            if not torn:
                try:
                    recs = [loads(raw) for raw in lines]  # type: ignore[arg-type]
                except (orjson.JSONDecodeError, TypeError):
                    pass
                else:
                    if all(map(_well_formed, recs)):
                        lineno += len(lines)
                        yield recs
                        continue
            recs = []
            last = len(lines) - 1
            for i, raw in enumerate(lines):
                lineno += 1
                if raw is None:
                    msg = f"{p}: line {lineno} is longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB"
                    if not skip_bad:
                        raise TraceError(msg + " (use --skip-bad to read past it)")
                    if warnings is not None:
                        warnings.append(msg + "; skipped")
                    continue
                if torn and i == last and raw.strip():
                    try:
                        recs.append(_parse_line(raw, lineno))
                    except TraceError:
                        if warnings is not None:
                            warnings.append(f"{p}: last line {lineno} is incomplete (torn write); ignored")
                    break
                rec = _line_record(raw, lineno, p, skip_bad, warnings)
                if rec is not None:
                    recs.append(rec)
            if recs:
                yield recs

    def others(blk: _Block) -> bool:
        """Parse the block's lines that are not ticks (numbered from ``lineno``); False if one is a tick
        after all (then the block is not used).  Errors are the ones reading them line by line gives."""
        lines = blk.lines
        try:  # all well-formed (the usual): parsed in one go, as ``parse`` does a batch
            recs = [loads(lines[i]) for i in blk.others]
        except (orjson.JSONDecodeError, TypeError):
            pass
        else:
            if all(map(_well_formed, recs)):
                if any(rec["k"] == "tick" for rec in recs):
                    return False
                blk.covered.recs = recs
                return True
        found: list[str] = []
        recs = blk.covered.recs
        for i in blk.others:
            rec = _line_record(lines[i], lineno + i + 1, p, skip_bad, found)
            if rec is not None:
                if rec["k"] == "tick":
                    return False
                recs.append(rec)
        if warnings is not None:
            warnings.extend(found)
        return True

    try:
        try:
            cf = _open_companion(p, f) if columns else None
            if cf is not None:
                try:
                    pos = 0
                    size = os.fstat(f.fileno()).st_size
                    for fields, payload in _companion_blocks(cf):
                        try:
                            blk = _check_block(f, size, pos, fields, payload)
                        except (OSError, ValueError, TypeError, MemoryError, orjson.JSONDecodeError):
                            blk = None
                        if blk is None:
                            continue
                        f.seek(pos)
                        yield from parse(_chunks(f, blk.start - pos))
                        if others(blk):
                            yield blk.covered
                            lineno += len(blk.lines)
                        else:
                            yield from parse([(blk.lines, False)])  # type: ignore[list-item]
                        pos = blk.end
                    f.seek(pos)
                finally:
                    cf.close()
            yield from parse(_chunks(f))
        except OSError as exc:
            raise TraceError(f"cannot read {p}: {exc.strerror or exc}") from None
        except MemoryError:
            raise TraceError(f"{p}: too large to read into memory") from None
        if lineno == 0:
            raise TraceError(f"{p}: empty file, not a trace")
    finally:
        f.close()


def iter_records(
    path: str | os.PathLike[str], *, skip_bad: bool = False, warnings: list[str] | None = None
) -> Generator[dict[str, Any], None, None]:
    """Every record of a trace, the header first.  Raises ``TraceError`` with a one-line message.

    A torn last line (a writer killed mid-write) is skipped with a warning; a bad line elsewhere (not
    JSON, not a record, a known kind without a numeric ``t`` or with the wrong shape, longer than
    ``MAX_LINE_BYTES``) is an error naming it, or with ``skip_bad`` skipped with a warning."""
    batches = _batches(Path(path), skip_bad, warnings)
    try:
        for recs in batches:
            yield from recs  # type: ignore[misc]
    finally:
        batches.close()


_ProcsPart = list[tuple[float, dict[str, Any]]] | tuple[np.ndarray, list[bytes]]


def _load_procs(parts: list[_ProcsPart]) -> list[tuple[float, dict[str, Any]]]:
    """``TraceData.procs`` from the parts ``read_trace`` kept: parsed ones, and (times, lines) of ticks
    read from a companion, whose ``"p"`` is parsed now."""
    out: list[tuple[float, dict[str, Any]]] = []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for part in parts:
            if isinstance(part, list):
                out.extend(part)
            else:
                t, lines = part
                out.extend(zip(t.tolist(), [_loads(ln)["p"] for ln in lines], strict=True))
    finally:
        if gc_was_on:
            gc.enable()
    return out


class TraceData:
    """A whole trace in memory: metric columns as numpy arrays, the rest as lists.

    ``procs`` (each tick's ``"p"``, for the ticks that have one) is parsed when first asked for if the
    trace was read through its companion (most callers never need it)."""

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        times: np.ndarray,
        columns: dict[str, np.ndarray],
        procs: list[tuple[float, dict[str, Any]]] | Callable[[], list[tuple[float, dict[str, Any]]]],
        events: list[Event],
        actions: list[dict[str, Any]],
        notes: list[dict[str, Any]],
        skipped: int,
        end: dict[str, Any] | None,
        warnings: list[str] | None = None,
    ) -> None:
        self.path = path
        self.header = header
        self.times = times
        self.columns = columns
        self._procs = procs
        self.events = events
        self.actions = actions
        self.notes = notes
        self.skipped = skipped
        self.end = end
        self.warnings: list[str] = [] if warnings is None else warnings

    @property
    def procs(self) -> list[tuple[float, dict[str, Any]]]:
        p = self._procs
        if not isinstance(p, list):
            p = self._procs = p()
        return p

    @procs.setter
    def procs(self, value: list[tuple[float, dict[str, Any]]]) -> None:
        self._procs = value

    def __repr__(self) -> str:
        return (f"TraceData(path={str(self.path)!r}, ticks={len(self.times)}, columns={len(self.columns)}, "
                f"events={len(self.events)}, actions={len(self.actions)}, notes={len(self.notes)})")  # fmt: skip

    @property
    def duration(self) -> float:
        last = float(self.times[-1]) if len(self.times) else 0.0
        if self.end is not None:
            last = max(last, float(self.end.get("t", 0.0)))
        return last

    def column(self, key: str) -> np.ndarray:
        """A metric's values per tick (NaN where missing); all-NaN if the trace never had it."""
        col = self.columns.get(key)
        if col is None:
            return np.full(len(self.times), np.nan)
        return col

    def requests(self) -> list[Event]:
        return [e for e in self.events if e.kind == "request"]


def _as_float(v: Any) -> float:
    """One metric value as ``_convert`` makes it: numbers as floats (+-inf for ints beyond float64), a
    string as numpy parses it (NaN if it cannot), anything else NaN."""
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    if isinstance(v, str):
        try:
            return float(np.array([v], dtype=np.float64)[0])
        except (TypeError, ValueError, OverflowError):
            return math.nan
    return math.nan


_Group = tuple[list[int], list[dict[str, Any]], list[np.ndarray]]
"""One key layout's ticks: their indices, their value dicts not yet converted, the converted blocks."""


def _convert(rows: list[dict[str, Any]], width: int) -> np.ndarray:
    """Value dicts of one layout -> a (rows x width) float64 block, in one numpy call.  Each value comes
    out the same whatever its neighbours (``_as_float``), so how a trace is cut in blocks never shows."""
    flat = list(chain.from_iterable(map(dict.values, rows)))
    try:
        block = np.array(flat, dtype=np.float64)
        if block.ndim != 1:  # lists of one length among the values
            raise ValueError
    except (TypeError, ValueError, OverflowError):  # a non-numeric string, a list, a huge int among them
        block = np.array([_as_float(v) for v in flat], dtype=np.float64)
    return block.reshape(len(rows), width)


def _settle(groups: dict[tuple[str, ...], _Group]) -> None:
    """Convert the dicts gathered so far to float64 blocks (8 bytes a value instead of a float object
    held by a dict), so memory follows the trace's size in values, not in Python objects."""
    for keys, (_, rows, blocks) in groups.items():
        if rows:
            blocks.append(_convert(rows, len(keys)))
            rows.clear()


def _columns(
    n: int,
    groups: dict[tuple[str, ...], _Group],
    order: Iterable[str] = (),
    covered: list[tuple[int, list[str], np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Tick values grouped by key layout (and blocks read from a companion: first tick, keys, ticks x keys)
    -> one float64 column per key (NaN where a tick lacks it), in order of the keys' first appearance.

    Ticks almost always share a handful of layouts (the same probes every tick, USS every few ticks), so
    each group converts to a 2-D array in a few numpy calls instead of one call per metric per tick."""
    _settle(groups)
    columns: dict[str, np.ndarray] = {}
    if covered:
        columns = {key: np.full(n, np.nan) for key in order}
    for keys, (idx, _, blocks) in groups.items():
        block = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        whole = len(idx) == n
        sel = None if whole else np.asarray(idx, dtype=np.intp)
        for j, key in enumerate(keys):
            col = columns.get(key)
            if col is None:
                if whole:
                    columns[key] = block[:, j].copy()
                    continue
                col = columns[key] = np.full(n, np.nan)
            col[sel] = block[:, j]
    for base, ckeys, values in covered or ():
        stop = base + len(values)
        for j, key in enumerate(ckeys):
            columns[key][base:stop] = values[:, j]
    return columns


def read_trace(path: str | os.PathLike[str], *, skip_bad: bool = False) -> TraceData:
    """Load a trace.  Raises ``TraceError`` (one line) for anything that is not a readable trace.

    Ranges its columnar companion stands for (``columns_path``; checked against the trace's bytes) are
    taken from it instead of parsing their ticks; the result is the same either way."""
    warnings: list[str] = []
    batches = _batches(Path(path), skip_bad, warnings, columns=True)
    times: list[float] = []
    # Tick values grouped by key layout (see ``_columns``); ticks come in long runs of one layout.
    groups: dict[tuple[str, ...], _Group] = {}
    order: dict[str, None] = {}  # metric keys in order of first appearance
    covered: list[tuple[int, list[str], np.ndarray]] = []
    last_keys: tuple[str, ...] | None = None
    last_idx: list[int] = []
    last_rows: list[dict[str, Any]] = []
    procs: list[tuple[float, dict[str, Any]]] = []
    procs_parts: list[_ProcsPart] = [procs]
    events: list[Event] = []
    actions: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    skipped = 0
    end: dict[str, Any] | None = None
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of fresh dicts, none cyclic: the collector would only rescan them
    try:
        header = next(batches)[0]  # type: ignore[index]
        for item in batches:
            if type(item) is _Covered:
                covered.append((len(times), item.keys, item.values))
                order.update(dict.fromkeys(item.keys))
                times.extend(item.t.tolist())
                if item.p_lines:
                    procs = []
                    procs_parts += [(item.p_t, item.p_lines), procs]
                recs = item.recs
            else:
                recs = item  # type: ignore[assignment]
            for rec in recs:
                k = rec["k"]
                try:
                    if k == "tick":
                        t = float(rec["t"])
                        m = rec.get("m")
                        if type(m) is not dict:
                            m = {}
                        keys = tuple(m)
                        if keys != last_keys:
                            last_keys = keys
                            group = groups.get(keys)
                            if group is None:
                                group = groups[keys] = ([], [], [])
                                order.update(dict.fromkeys(keys))
                            last_idx, last_rows, _ = group
                        last_idx.append(len(times))
                        last_rows.append(m)
                        times.append(t)
                        p = rec.get("p")
                        if p:
                            procs.append((t, p))
                    elif k == "event":
                        events.append(Event(float(rec["t"]), str(rec.get("kind", "")), rec.get("data") or {}))
                    elif k == "action":
                        actions.append(rec)
                    elif k == "note":
                        notes.append(rec)
                    elif k == "skip":
                        skipped += int(rec.get("n", 1))
                    elif k == "end":
                        end = rec
                except (KeyError, TypeError, ValueError, OverflowError):
                    if not skip_bad:
                        raise TraceError(
                            f"{path}: a '{k}' record is malformed (use --skip-bad to read past it)"
                        ) from None
                    warnings.append(f"{path}: a malformed '{k}' record was skipped")
            _settle(groups)
        columns = _columns(len(times), groups, order, covered)
    finally:
        batches.close()
        if gc_was_on:
            gc.enable()
    return TraceData(
        path=Path(path),
        header=header,
        times=np.asarray(times, dtype=np.float64),
        columns=columns,
        procs=procs if len(procs_parts) == 1 else lambda: _load_procs(procs_parts),
        events=events,
        actions=actions,
        notes=notes,
        skipped=skipped,
        end=end,
        warnings=warnings,
    )


class TraceFollower:
    """Reads a growing trace incrementally: ``poll()`` returns the complete records added since the last
    call (the header first).  A partial last line waits for its newline."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 - owned by the follower, closed by close()
        self._buf = b""
        self._skipping = False
        self._lineno = 0
        self.header: dict[str, Any] | None = None
        self.bad_lines = 0

    def poll(self, max_bytes: int = 8 * 1024 * 1024) -> list[dict[str, Any]]:
        chunk = self._f.read(max_bytes)
        if not chunk:
            return []
        if self._skipping:  # the rest of a runaway line
            nl = chunk.find(b"\n")
            if nl < 0:
                return []
            chunk, self._skipping = chunk[nl + 1 :], False
            self._lineno += 1
        data = self._buf + chunk
        lines = data.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > MAX_LINE_BYTES:  # a runaway line: drop it rather than grow without bound
            if self.header is None and not lines:
                raise TraceError(f"{self.path}: not an inference-tuner trace")
            self._buf, self._skipping = b"", True
            self.bad_lines += 1
        out: list[dict[str, Any]] = []
        for raw in lines:
            self._lineno += 1
            if not raw.strip():
                continue
            try:
                if len(raw) > MAX_LINE_BYTES:
                    raise TraceError(f"line {self._lineno} is too long")
                rec = _parse_line(raw, self._lineno)
            except TraceError:
                if self.header is None:
                    raise TraceError(f"{self.path}: not an inference-tuner trace") from None
                self.bad_lines += 1
                continue
            if self.header is None:
                check_header(rec, self.path)
                self.header = rec
            out.append(rec)
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TraceFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_trace_path(command: list[str] | None, directory: str | os.PathLike[str] = "traces") -> Path:
    """``traces/<UTC time>-<command>.jsonl``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = "session"
    if command:
        prog = Path(command[0]).name
        if prog.startswith("python") and len(command) > 1:
            rest = [c for c in command[1:] if not c.startswith("-")]
            prog = Path(rest[0]).stem if rest else prog
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in prog)[:40] or "session"
    base = Path(directory) / f"{stamp}-{name}.jsonl"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.stem}-{i}.jsonl")
        i += 1
    return path
