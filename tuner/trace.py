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
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
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


class TraceError(Exception):
    """A trace that cannot be read; the message is one line, fit to show a user."""


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


class TraceWriter:
    """Appends records to a trace file (created 0600, its directory 0700 if created).

    ``write()`` and the record helpers encode at once and keep the line; ``flush()`` writes every kept
    line with one ``os.write``.  A failed write (disk full, file system gone read-only) keeps what was not
    written — the tail of a half-written line first, so the file never gets a torn line in the middle —
    up to ``BUFFER_LIMIT`` bytes (the oldest whole lines dropped and counted in ``dropped``), sets
    ``error`` and retries on the next flush.  A trace file removed while recording is created again (the
    header first, then a note saying so).  Writing the header at open failing raises ``OSError``.
    """

    def __init__(self, path: str | os.PathLike[str], header: Mapping[str, Any]) -> None:
        self.path = Path(path)
        make_private_dirs(self.path.parent)
        self._fd = _open_private(self.path, os.O_TRUNC)
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

    # -- records -------------------------------------------------------------------------------------
    def write(self, rec: Mapping[str, Any]) -> None:
        """Encode ``rec`` as one line and keep it for the next flush.  Never raises for its content."""
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
        if self._listeners:  # they get a record of their own: cleaned, and not the caller's dicts
            rec: dict[str, Any] = {"k": "tick", "t": round(t, 6), "m": {k: _clean(v) for k, v in values.items()}}
            if procs:
                rec["p"] = {str(pid): dict(v) for pid, v in procs.items()}
            self.write(rec)
            return
        # Encoded at once, so the caller's dicts need no copy; orjson writes NaN/inf as null itself.
        self.write({"k": "tick", "t": round(t, 6), "m": values, "p": procs} if procs else
                   {"k": "tick", "t": round(t, 6), "m": values})  # fmt: skip

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
        if self._pending:
            data += b"\n".join(self._pending) + b"\n"
            self._pending.clear()
            self._pending_bytes = 0
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self._carry = data[getattr(exc, "written", 0) :]
            return self._failed(exc)
        self._carry = b""
        self.error = None
        return True

    def _failed(self, exc: OSError) -> bool:
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

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        os.close(self._fd)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------
# Reading

_TOO_LONG = None
"""Stands for a line longer than ``MAX_LINE_BYTES`` in what ``_chunks`` yields (its bytes are not kept)."""


def _chunks(f: BinaryIO) -> Iterator[tuple[list[bytes | None], bool]]:
    """The file's lines (without newlines) a few MiB at a time; ``True`` with the last batch when the file
    does not end with a newline (its last line is torn).  Lines over ``MAX_LINE_BYTES`` come as ``None``
    and are never held whole in memory."""
    carry = b""
    skipping = False  # inside a too-long line already reported
    while True:
        chunk = f.read(_READ_CHUNK)
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


def _batches(
    p: Path, skip_bad: bool, warnings: list[str] | None
) -> Generator[list[dict[str, Any]], None, None]:
    """The trace's records a few MiB at a time: ``[header]`` first, then lists of records.

    A batch of well-formed lines is parsed in one list comprehension; a batch with anything odd in it
    (a blank, torn, corrupt or too-long line) goes line by line to say which line and what."""
    f = _open_trace(p)
    loads = orjson.loads
    try:
        lineno = 0
        try:
            for lines, torn in _chunks(f):
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
                    try:
                        recs.append(_parse_line(raw, lineno))
                    except TraceError as exc:
                        if not raw.strip():
                            continue
                        if torn and i == last:
                            if warnings is not None:
                                warnings.append(f"{p}: last line {lineno} is incomplete (torn write); ignored")
                            break
                        if not skip_bad:
                            raise TraceError(f"{p}: {exc} (use --skip-bad to read past it)") from None
                        if warnings is not None:
                            warnings.append(f"{p}: {exc}; skipped")
                if recs:
                    yield recs
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
            yield from recs
    finally:
        batches.close()


@dataclass
class TraceData:
    """A whole trace in memory: metric columns as numpy arrays, the rest as lists."""

    path: Path
    header: dict[str, Any]
    times: np.ndarray
    columns: dict[str, np.ndarray]
    procs: list[tuple[float, dict[str, Any]]]
    events: list[Event]
    actions: list[dict[str, Any]]
    notes: list[dict[str, Any]]
    skipped: int
    end: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)

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
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    return math.nan


_Group = tuple[list[int], list[dict[str, Any]], list[np.ndarray]]
"""One key layout's ticks: their indices, their value dicts not yet converted, the converted blocks."""


def _convert(rows: list[dict[str, Any]], width: int) -> np.ndarray:
    """Value dicts of one layout -> a (rows x width) float64 block, in one numpy call."""
    flat = list(chain.from_iterable(map(dict.values, rows)))
    try:
        block = np.array(flat, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # a string, a list, a huge int among the values
        block = np.array([_as_float(v) for v in flat], dtype=np.float64)
    return block.reshape(len(rows), width)


def _settle(groups: dict[tuple[str, ...], _Group]) -> None:
    """Convert the dicts gathered so far to float64 blocks (8 bytes a value instead of a float object
    held by a dict), so memory follows the trace's size in values, not in Python objects."""
    for keys, (_, rows, blocks) in groups.items():
        if rows:
            blocks.append(_convert(rows, len(keys)))
            rows.clear()


def _columns(n: int, groups: dict[tuple[str, ...], _Group]) -> dict[str, np.ndarray]:
    """Tick values grouped by key layout -> one float64 column per key (NaN where a tick lacks it).

    Ticks almost always share a handful of layouts (the same probes every tick, USS every few ticks), so
    each group converts to a 2-D array in a few numpy calls instead of one call per metric per tick."""
    _settle(groups)
    columns: dict[str, np.ndarray] = {}
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
    return columns


def read_trace(path: str | os.PathLike[str], *, skip_bad: bool = False) -> TraceData:
    """Load a trace.  Raises ``TraceError`` (one line) for anything that is not a readable trace."""
    warnings: list[str] = []
    batches = _batches(Path(path), skip_bad, warnings)
    times: list[float] = []
    # Tick values grouped by key layout (see ``_columns``); ticks come in long runs of one layout.
    groups: dict[tuple[str, ...], _Group] = {}
    last_keys: tuple[str, ...] | None = None
    last_idx: list[int] = []
    last_rows: list[dict[str, Any]] = []
    procs: list[tuple[float, dict[str, Any]]] = []
    events: list[Event] = []
    actions: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    skipped = 0
    end: dict[str, Any] | None = None
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of fresh dicts, none cyclic: the collector would only rescan them
    try:
        header = next(batches)[0]
        for recs in batches:
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
                            last_idx, last_rows, _ = groups.setdefault(keys, ([], [], []))
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
        columns = _columns(len(times), groups)
    finally:
        batches.close()
        if gc_was_on:
            gc.enable()
    return TraceData(
        path=Path(path),
        header=header,
        times=np.asarray(times, dtype=np.float64),
        columns=columns,
        procs=procs,
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
