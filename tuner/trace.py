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
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuner import __version__
from tuner.records import Applied, Event, Sample

SCHEMA_VERSION = 1
MAX_LINE_BYTES = 16 * 1024 * 1024
_PENDING_LIMIT = 200_000
_CARRY_LIMIT = 64 * 1024 * 1024


class TraceError(Exception):
    """A trace that cannot be read; the message is one line, fit to show a user."""


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


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


class TraceWriter:
    """Appends records to a trace file (created 0600).  ``flush()`` writes everything pending.

    A failed write (disk full, file removed from under us) keeps the pending lines — up to a bound, the
    oldest dropped and counted — reports once through ``error``, and retries on the next flush.
    """

    def __init__(self, path: str | os.PathLike[str], header: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._pending: list[str] = []
        self._carry = b""
        self._dumps = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode
        self.error: str | None = None
        self.dropped = 0
        self.records = 0
        self._closed = False
        self._listeners: list[Callable[[Mapping[str, Any]], None]] = []
        self.header = dict(header)
        self.write(self.header)
        self.flush()

    # -- records -------------------------------------------------------------------------------------
    def write(self, rec: Mapping[str, Any]) -> None:
        try:
            line = self._dumps(rec)
        except ValueError:  # NaN/inf inside: replace them, a trace is strict JSON for other tools
            line = self._dumps(json.loads(json.dumps(rec, default=str), parse_constant=lambda _: None))
        self._pending.append(line)
        self.records += 1
        for fn in self._listeners:
            try:
                fn(rec)
            except Exception:  # an observer must never stop the recording
                self._listeners.remove(fn)
                break
        if len(self._pending) > _PENDING_LIMIT:
            drop = len(self._pending) - _PENDING_LIMIT
            del self._pending[:drop]
            self.dropped += drop

    def add_listener(self, fn: Callable[[Mapping[str, Any]], None]) -> None:
        """Call ``fn(record)`` for every record written from now on (live observers, the TUI).  A
        listener that raises is removed; the trace goes on."""
        self._listeners.append(fn)

    def tick(self, t: float, values: Mapping[str, Any], procs: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        rec: dict[str, Any] = {"k": "tick", "t": round(t, 6), "m": {k: _clean(v) for k, v in values.items()}}
        if procs:
            rec["p"] = {str(pid): dict(v) for pid, v in procs.items()}
        self.write(rec)

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
    def flush(self) -> bool:
        """Write everything pending.  False (and ``error`` set) when the write failed: what was not
        written is kept (bounded; the oldest whole lines dropped and counted) and the next flush retries."""
        if self._closed or not (self._pending or self._carry):
            return True
        data = self._carry + ("\n".join(self._pending) + "\n").encode() if self._pending else self._carry
        self._pending.clear()
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            carry = bytes(view)
            if len(carry) > _CARRY_LIMIT:
                cut = carry.find(b"\n", len(carry) - _CARRY_LIMIT)
                self.dropped += carry[: cut + 1].count(b"\n")
                carry = carry[cut + 1 :]
            self._carry = carry
            if self.error is None:
                self.error = f"cannot write trace {self.path}: {exc.strerror or exc}"
            return False
        self._carry = b""
        self.error = None
        return True

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


def _parse_line(raw: bytes, lineno: int) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TraceError(f"line {lineno} is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("k"), str):
        raise TraceError(f"line {lineno} is not a trace record (no kind 'k')")
    return rec


def check_header(rec: Mapping[str, Any], path: Path) -> None:
    if rec.get("k") != "header" or rec.get("tool") != "inference-tuner":
        raise TraceError(f"{path}: not an inference-tuner trace (the first line is not its header)")
    schema = rec.get("schema")
    if schema != SCHEMA_VERSION:
        raise TraceError(
            f"{path}: trace schema version {schema!r} is not supported (this tuner reads {SCHEMA_VERSION})"
        )


def iter_records(
    path: str | os.PathLike[str], *, skip_bad: bool = False, warnings: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Every record of a trace, the header first.  Raises ``TraceError`` with a one-line message."""
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed in finally below
    except FileNotFoundError:
        raise TraceError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{p}: is a directory, not a trace file") from None
    except PermissionError:
        raise TraceError(f"{p}: permission denied") from None
    try:
        first = f.readline(MAX_LINE_BYTES + 1)
        if not first.strip():
            raise TraceError(f"{p}: empty file, not a trace")
        if b"\x00" in first or not first.lstrip().startswith(b"{"):
            raise TraceError(f"{p}: not an inference-tuner trace (binary or foreign content)")
        try:
            header = _parse_line(first, 1)
        except TraceError:
            raise TraceError(f"{p}: not an inference-tuner trace (the first line is not its header)") from None
        check_header(header, p)
        yield header
        lineno = 1
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                msg = f"{p}: line {lineno} is longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB"
                if not skip_bad:
                    raise TraceError(msg + " (use --skip-bad to read past it)")
                if warnings is not None:
                    warnings.append(msg + "; skipped")
                # consume the rest of the line
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE_BYTES + 1)
                continue
            if not raw.strip():
                continue
            torn = not raw.endswith(b"\n")
            try:
                yield _parse_line(raw, lineno)
            except TraceError as exc:
                if torn:
                    if warnings is not None:
                        warnings.append(f"{p}: last line {lineno} is incomplete (torn write); ignored")
                    break
                if not skip_bad:
                    raise TraceError(f"{p}: {exc} (use --skip-bad to read past it)") from None
                if warnings is not None:
                    warnings.append(f"{p}: {exc}; skipped")
    finally:
        f.close()


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


def read_trace(path: str | os.PathLike[str], *, skip_bad: bool = False) -> TraceData:
    """Load a trace.  Raises ``TraceError`` (one line) for anything that is not a readable trace."""
    warnings: list[str] = []
    it = iter_records(path, skip_bad=skip_bad, warnings=warnings)
    header = next(it)
    times: list[float] = []
    rows: list[dict[str, Any]] = []
    procs: list[tuple[float, dict[str, Any]]] = []
    events: list[Event] = []
    actions: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    skipped = 0
    end: dict[str, Any] | None = None
    for rec in it:
        k = rec["k"]
        try:
            if k == "tick":
                t = float(rec["t"])
                times.append(t)
                m = rec.get("m")
                rows.append(m if isinstance(m, dict) else {})
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
        except (KeyError, TypeError, ValueError):
            if not skip_bad:
                raise TraceError(f"{path}: a '{k}' record is malformed (use --skip-bad to read past it)") from None
            warnings.append(f"{path}: a malformed '{k}' record was skipped")
    keys: dict[str, None] = {}
    for r in rows:
        for key in r:
            keys[key] = None
    columns: dict[str, np.ndarray] = {}
    for key in keys:
        try:
            columns[key] = np.array([r.get(key) for r in rows], dtype=np.float64)
        except (TypeError, ValueError):
            columns[key] = np.array(
                [v if isinstance(v, (int, float)) else None for v in (r.get(key) for r in rows)], dtype=np.float64
            )
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
        self._lineno = 0
        self.header: dict[str, Any] | None = None
        self.bad_lines = 0

    def poll(self, max_bytes: int = 8 * 1024 * 1024) -> list[dict[str, Any]]:
        chunk = self._f.read(max_bytes)
        if not chunk:
            return []
        data = self._buf + chunk
        lines = data.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > MAX_LINE_BYTES:  # a runaway line: drop it rather than grow without bound
            self._buf = b""
            self.bad_lines += 1
        out: list[dict[str, Any]] = []
        for raw in lines:
            self._lineno += 1
            if not raw.strip():
                continue
            try:
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
