"""``TraceWriter`` appends records to a trace and keeps its columnar companion; ``default_trace_path`` names one."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from tuner.records import Applied, Event, Sample
from tuner.trace.columns import _ColumnsOut, columns_path
from tuner.trace.format import _OPTS, _clean, _open_private, _round6, encode_record, make_private_dirs

BUFFER_LIMIT = 32 * 1024 * 1024
"""Bytes kept in memory while the trace cannot be written (disk full); beyond it the oldest are dropped."""
_AUTO_FLUSH_BYTES = 1024 * 1024
_dumps = orjson.dumps

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

    def _switch_file(self, path: Path, header: Mapping[str, Any]) -> None:
        """Go on in a new file ``path`` (created, never replaced: ``FileExistsError`` if it is there),
        which starts with ``header``; the current file and its companion are closed complete.  Only with
        nothing pending (after a successful ``flush``).  Raises ``OSError`` with the current file kept
        (then nothing changed); ``self.header`` stays the recording's first header."""
        assert not (self._pending or self._carry) and not self._closed
        line = encode_record(header) + b"\n"
        fd = _open_private(path, os.O_EXCL)
        try:
            _write_all(fd, line)
        except OSError:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        if self._cols is not None:  # the old file's last, partial block
            self._cols_durable(b"", 0, True)
            if self._cols is not None:
                self._cols.close()
        self._cols, self._cols_rows = None, None
        os.close(self._fd)
        self._fd, self.path, self._header_line = fd, path, line
        self.records += 1
        try:
            self._cols = _ColumnsOut(path, line)
            self._cols_rows = []
        except Exception:  # no companion then: the segment is read by parsing it
            self._cols = None

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
