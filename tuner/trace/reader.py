"""Reading a whole trace: ``read_trace`` into numpy columns, ``iter_records`` record by record."""

from __future__ import annotations

import gc
import gzip
import os
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

from tuner.records import RENAMED, Event, renamed
from tuner.trace.columns import _Block, _check_block, _companion_blocks, _Covered, _open_companion
from tuner.trace.format import (
    _INT_T,
    MAX_LINE_BYTES,
    TraceError,
    _as_float,
    _loads,
    check_header,
    renamed_header,
    renamed_procs,
    renamed_record,
)
from tuner.trace.rotate import GZ, SegmentInfo, open_file, segment_info, trace_files

_READ_CHUNK = 1024 * 1024

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


def _open_trace(p: Path) -> BinaryIO:
    try:
        f = open_file(p)  # a compressed segment (``.gz``) is decompressed as it is read
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
            cf = _open_companion(p, f) if columns and not p.name.endswith(GZ) else None
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
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a compressed segment cut short or damaged
            raise TraceError(f"{p}: the compressed trace is damaged ({exc})") from None
        except OSError as exc:
            raise TraceError(f"cannot read {p}: {exc.strerror or exc}") from None
        except MemoryError:
            raise TraceError(f"{p}: too large to read into memory") from None
        if lineno == 0:
            raise TraceError(f"{p}: empty file, not a trace")
    finally:
        f.close()


def _trace_batches(
    path: str | os.PathLike[str], skip_bad: bool, warnings: list[str] | None, columns: bool = False
) -> Generator[list[dict[str, Any]] | _Covered, None, None]:
    """``_batches`` over the trace ``path`` names: one file, or a rotated recording's segments in order
    (``tuner.trace.rotate.trace_files``) read as one trace — the first segment's header, then each
    segment's records (its own header checked and left out)."""
    files, notes = trace_files(path)
    if warnings is not None:
        warnings.extend(notes)
    if len(files) == 1:
        yield from _batches(files[0], skip_bad, warnings, columns)
        return
    first: SegmentInfo | None = None
    for f in files:
        batches = _batches(f, skip_bad, warnings, columns)
        try:
            header = next(batches)
            seg = segment_info(header[0])  # type: ignore[index,arg-type]
            if first is None:
                first = seg
                yield header
            elif seg is None or seg.set != first.set:  # changed on disk since trace_files looked
                raise TraceError(f"{f}: not a segment of the same recording as {files[0]}")
            yield from batches
        finally:
            batches.close()


def iter_records(
    path: str | os.PathLike[str], *, skip_bad: bool = False, warnings: list[str] | None = None
) -> Generator[dict[str, Any], None, None]:
    """Every record of a trace, the header first.  Raises ``TraceError`` with a one-line message.

    A torn last line (a writer killed mid-write) is skipped with a warning; a bad line elsewhere (not
    JSON, not a record, a known kind without a numeric ``t`` or with the wrong shape, longer than
    ``MAX_LINE_BYTES``) is an error naming it, or with ``skip_bad`` skipped with a warning."""
    batches = _trace_batches(path, skip_bad, warnings)
    try:
        for recs in batches:
            yield from map(renamed_record, recs)  # type: ignore[arg-type]
    finally:
        batches.close()


_ProcsPart = list[tuple[float, dict[str, Any]]] | tuple[np.ndarray, list[bytes]]


def _load_procs(parts: list[_ProcsPart], old: bool = False) -> list[tuple[float, dict[str, Any]]]:
    """``TraceData.procs`` from the parts ``read_trace`` kept: parsed ones, and (times, lines) of ticks
    read from a companion, whose ``"p"`` is parsed now.  ``old``: a trace with names since renamed
    (``RENAMED``), whose per-process fields are renamed here."""
    if len(parts) == 1 and isinstance(parts[0], list) and not old:
        return parts[0]
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
    if old:
        out = [(t, renamed_procs(p)) for t, p in out]
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
    batches = _trace_batches(path, skip_bad, warnings, columns=True)
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
        header = renamed_header(next(batches)[0])  # type: ignore[index,arg-type]
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
        old = not RENAMED.keys().isdisjoint(columns)
        columns = renamed(columns)  # keys renamed since the trace was written: once a column, not a value
    finally:
        batches.close()
        if gc_was_on:
            gc.enable()
    return TraceData(
        path=Path(path),
        header=header,
        times=np.asarray(times, dtype=np.float64),
        columns=columns,
        procs=_load_procs(procs_parts, old) if len(procs_parts) == 1 else lambda: _load_procs(procs_parts, old),
        events=events,
        actions=actions,
        notes=notes,
        skipped=skipped,
        end=end,
        warnings=warnings,
    )
