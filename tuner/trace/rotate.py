"""Rotated traces: one recording cut into segments, closed segments gzip-compressed, a retention bound;
and finding a rotated recording's files from any one of them or a glob.

A sidecar that runs for weeks writes ~1.4 GB a day at 10 Hz.  ``RotatingTraceWriter`` (a ``TraceWriter``)
starts a new segment once the current one reaches a size or an age (``Rotation``), right after a flush:
every record goes to exactly one segment, in order, and no tick waits for the switch (the new file gets
its header in the sampler thread; compressing and deleting happen in a background thread).

Segments of ``run.jsonl``: ``run.jsonl`` (segment 0), ``run.000001.jsonl``, ``run.000002.jsonl``, ...
Each starts with the recording's header plus ``"segment": {"set", "index", "base", "t"}`` (the set's
random id, the segment's number, the name of segment 0, the trace time it starts at; times stay seconds
since the recording started) and has its own columnar companion while it is plain.  A closed segment is
compressed to ``<segment>.gz``: written as ``<segment>.gz.tmp``, fsynced, renamed, the directory fsynced —
only then are the plain segment and its companion deleted.  ``--trace-keep N`` keeps the newest N closed
segments (the live one besides), deleting the oldest.

Compression is gzip from the standard library: no existing dependency of the tuner serves zstd (the
``zstandard`` package is not one of them; ``compression.zstd`` arrives with Python 3.14 and the tuner
runs on 3.10+).  A trace's JSON compresses ~10x with it.

A SIGKILL at any moment leaves a readable set: a ``.gz.tmp`` is never read; a segment present both plain
and compressed (killed between the rename and the delete) is read once, from the plain file; a last
segment killed before its header was complete is skipped with a warning.

Readers (``read_trace``, ``iter_records``, ``TraceFollower``; so ``tuner report|replay|tui|export``) take
a rotated recording as one trace given any of its files, its first file's name after that was compressed,
or a glob (quoted, expanded here): ``trace_files`` finds the segments and orders them by their headers.
"""

from __future__ import annotations

import errno
import glob
import gzip
import os
import queue
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tuner.trace.format import TraceError, _loads
from tuner.trace.writer import TraceWriter

GZ = ".gz"
_TMP = ".tmp"
_COLS = ".cols"
MIN_ROTATE_BYTES = 64 * 1024
MIN_ROTATE_SECONDS = 1.0
_HEADER_MAX = 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_RETRY_S = 10.0
"""After a failed switch (the new segment could not be created), the recording stays in the current
segment and the switch is tried again after this many seconds of trace time."""

_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_TIME_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SPEC = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*")


@dataclass(frozen=True)
class Rotation:
    """When a segment ends: at ``max_bytes`` of trace, or ``max_seconds`` after it began (whichever comes
    first; either may be None); ``keep``: closed segments kept (None = all)."""

    max_bytes: int | None = None
    max_seconds: float | None = None
    keep: int | None = None


def parse_rotation(spec: str, keep: int | None = None) -> Rotation:
    """``--trace-rotate``: a size (``1GiB``, ``500MB``), an age (``6h``, ``30m``, ``90s``, ``1d``) or both
    (``1GiB,6h``; ``1GiB|6h``): the segment ends at whichever comes first.  ``ValueError`` (one line) for
    anything else."""
    max_bytes: int | None = None
    max_seconds: float | None = None
    parts = [s for s in re.split(r"[,|]", spec)]
    if not spec.strip() or any(not s.strip() for s in parts):
        raise ValueError(f"--trace-rotate {spec!r}: give a size (1GiB, 500MB), an age (6h, 30m) or both (1GiB,6h)")
    for part in parts:
        m = _SPEC.fullmatch(part)
        if m is None:
            raise ValueError(f"--trace-rotate {spec!r}: {part.strip()!r} is not a size (1GiB) or an age (6h)")
        value, unit = float(m.group(1)), m.group(2)
        if unit.lower() in _SIZE_UNITS and unit[-1] in "bB" and (unit.lower() == "b" or unit[0] in "kKmMgGtT"):
            if max_bytes is not None:
                raise ValueError(f"--trace-rotate {spec!r}: two sizes")
            max_bytes = int(value * _SIZE_UNITS[unit.lower()])
            if max_bytes < MIN_ROTATE_BYTES:
                raise ValueError(f"--trace-rotate {spec!r}: a segment must hold at least 64KiB")
        elif unit in _TIME_UNITS:
            if max_seconds is not None:
                raise ValueError(f"--trace-rotate {spec!r}: two ages")
            max_seconds = value * _TIME_UNITS[unit]
            if max_seconds < MIN_ROTATE_SECONDS:
                raise ValueError(f"--trace-rotate {spec!r}: a segment must last at least 1s")
        else:
            raise ValueError(
                f"--trace-rotate {spec!r}: unknown unit {unit!r} (sizes: B, KiB, MiB, GiB, TiB, KB, MB, GB, TB; "
                "ages: s, m, h, d)"
            )
    if keep is not None and keep < 0:
        raise ValueError(f"--trace-keep {keep}: give 0 or more closed segments to keep")
    return Rotation(max_bytes, max_seconds, keep)


# -- names -----------------------------------------------------------------------------------------------


def _split(base: Path) -> tuple[str, str]:
    suffix = base.suffix
    return base.name[: len(base.name) - len(suffix)], suffix


def segment_path(base: Path, index: int) -> Path:
    """Segment ``index`` of the recording whose first segment is ``base``: ``run.jsonl``,
    ``run.000001.jsonl``, ...  (plain; compressed it is this name plus ``.gz``)."""
    if index == 0:
        return base
    stem, suffix = _split(base)
    return base.with_name(f"{stem}.{index:06d}{suffix}")


def _member_re(base: Path) -> re.Pattern[str]:
    stem, suffix = _split(base)
    return re.compile(rf"{re.escape(stem)}(?:\.(\d{{6,}}))?{re.escape(suffix)}(\.gz)?")


def members(base: Path) -> dict[int, list[Path]]:
    """The files named like segments of ``base`` (plain or ``.gz``; never ``.tmp`` or ``.cols``), by the
    index in their names."""
    pat = _member_re(base)
    out: dict[int, list[Path]] = {}
    try:
        names = os.listdir(base.parent if str(base.parent) else ".")
    except OSError:
        return out
    for name in names:
        m = pat.fullmatch(name)
        if m is not None:
            out.setdefault(int(m.group(1) or 0), []).append(base.with_name(name))
    return out


def leftovers(base: Path) -> list[Path]:
    """Files an earlier rotated recording into ``base`` left (segments after the first, compressed copies,
    their companions, a compression cut short): what ``--overwrite`` removes, and what makes ``--trace``
    refuse without it."""
    stem, suffix = _split(base)
    pat = re.compile(rf"{re.escape(stem)}(?:\.\d{{6,}})?{re.escape(suffix)}(?:\.gz(?:\.tmp)?|\.cols)?")
    try:
        names = os.listdir(base.parent if str(base.parent) else ".")
    except OSError:
        return []
    out = []
    for name in sorted(names):
        if pat.fullmatch(name) and name not in (base.name, base.name + _COLS):
            out.append(base.with_name(name))
    return out


# -- reading a set ---------------------------------------------------------------------------------------


def open_file(path: Path) -> BinaryIO:
    """A trace file for reading: a ``.gz`` one decompressed as it is read."""
    if path.name.endswith(GZ):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def read_header(path: Path) -> dict[str, Any] | None:
    """The file's header record if its first line is a complete inference-tuner header, else None."""
    try:
        with open_file(path) as f:
            line = f.readline(_HEADER_MAX)
    except (OSError, EOFError, zlib.error, ValueError):
        return None
    if not line.endswith(b"\n"):
        return None
    try:
        rec = _loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if type(rec) is not dict or rec.get("k") != "header" or rec.get("tool") != "inference-tuner":
        return None
    return rec


@dataclass(frozen=True)
class SegmentInfo:
    set: str
    index: int
    base: str


def segment_info(header: Mapping[str, Any] | None) -> SegmentInfo | None:
    """The header's ``segment`` entry, if it is a well-formed one."""
    seg = header.get("segment") if header is not None else None
    if type(seg) is not dict:
        return None
    sid, idx, base = seg.get("set"), seg.get("index"), seg.get("base")
    if type(sid) is not str or type(idx) is not int or idx < 0 or type(base) is not str:
        return None
    if not base or "/" in base or base in (".", ".."):
        return None
    return SegmentInfo(sid, idx, base)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def trace_files(path: str | os.PathLike[str]) -> tuple[list[Path], list[str]]:
    """The files to read, in order, for the trace named ``path``, and warnings about the set.

    - a file whose header has no ``segment``: itself (an unrotated trace);
    - a segment of a rotated recording: every segment of that recording beside it (any one of them
      names the whole recording), in order, one file each (plain preferred over ``.gz``);
    - a name that is not there but whose ``.gz`` is (``run.jsonl`` after its compression): as that; one
      whose later segments are (segment 0 deleted by ``--trace-keep``): those;
    - a glob (``'traces/run*'``; quoted, so the shell leaves it): the segments it matches, which must be of
      one recording.
    Anything else comes back as ``[path]``, for the reader to say what is wrong with it."""
    p = Path(path)
    text = os.fspath(path)
    if not os.path.lexists(p):
        if _is_glob(text):
            matches = [Path(m) for m in sorted(glob.glob(text))
                       if not m.endswith((_TMP, _COLS)) and os.path.isfile(m)]  # fmt: skip
            if not matches:
                raise TraceError(f"{text}: no file matches")
            if len(matches) > 1:
                return _from_glob(text, matches)
            p = matches[0]
        else:
            gz = p.with_name(p.name + GZ)
            if not gz.is_file():
                # segment 0 deleted by --trace-keep: the recording's later segments go by its name
                later = sorted((i, f) for i, fs in members(p).items() for f in fs if f.is_file())
                for _, f in later:
                    seg = segment_info(read_header(f))
                    if seg is not None and seg.base == p.name:
                        return _assemble([f for _, f in later], seg.set, text)
                return [p], []
            p = gz
    if not p.is_file():
        return [p], []
    seg = segment_info(read_header(p))
    if seg is None:
        return [p], []
    candidates = [f for fs in members(p.parent / seg.base).values() for f in fs if f.is_file()]
    if p not in candidates:  # renamed by hand: still the file asked for
        candidates.append(p)
    return _assemble(candidates, seg.set, text)


def _from_glob(text: str, matches: list[Path]) -> tuple[list[Path], list[str]]:
    sets: dict[str, None] = {}
    unrotated = 0
    for f in matches:
        seg = segment_info(read_header(f))
        if seg is not None:
            sets[seg.set] = None
        elif f.name.endswith(GZ) or read_header(f) is not None:
            unrotated += 1
    if len(sets) == 1 and not unrotated:
        return _assemble(matches, next(iter(sets)), text)
    n = len(sets) + unrotated
    raise TraceError(
        f"{text}: matches {len(matches)} files of {n} different recordings; give a pattern (or a file) of one"
        if n > 1 else f"{text}: matches {len(matches)} files that are not one rotated recording; give one file"
    )


def _assemble(files: list[Path], set_id: str, shown: str) -> tuple[list[Path], list[str]]:
    by_index: dict[int, Path] = {}
    unreadable: list[Path] = []
    for f in files:
        seg = segment_info(read_header(f))
        if seg is None:
            unreadable.append(f)
            continue
        if seg.set != set_id:
            continue
        prev = by_index.get(seg.index)
        if prev is None or (prev.name.endswith(GZ) and not f.name.endswith(GZ)):
            by_index[seg.index] = f  # killed between a compression's rename and the delete: the plain one
    warnings: list[str] = []
    order = sorted(by_index)
    if not order:
        raise TraceError(f"{shown}: no segment of the recording has a readable header")
    if order[0] > 0:
        warnings.append(f"{shown}: segments 0-{order[0] - 1} of this recording are not here (deleted by "
                        f"--trace-keep, or moved); reading from segment {order[0]}")  # fmt: skip
    gaps = sorted(set(range(order[0], order[-1] + 1)) - set(order))
    if gaps:
        warnings.append(f"{shown}: segment(s) {', '.join(map(str, gaps))} of this recording are missing; "
                        "their records are not in this reading")  # fmt: skip
    for f in unreadable:
        warnings.append(f"{f}: no complete trace header (a recording stopped as it began this segment?); ignored")
    return [by_index[i] for i in order], warnings


def next_segment(current: Path, header: Mapping[str, Any], *, scan: bool = True) -> Path | None:
    """The file of the segment after the one ``current`` holds (``header`` is its header), plain or
    compressed, once it exists with a complete header of the same recording; else None.  Used by the
    follower to cross from one segment to the next.  ``scan``: if the very next one is not there, also
    look (one directory listing) for a later one (the next deleted by retention meanwhile)."""
    seg = segment_info(header)
    if seg is None:
        return None
    base = current.parent / seg.base
    nxt = segment_path(base, seg.index + 1)
    for f in (nxt, nxt.with_name(nxt.name + GZ)):
        if f.is_file():
            s = segment_info(read_header(f))
            if s is not None and s.set == seg.set and s.index == seg.index + 1:
                return f
    if not scan:
        return None
    # the next one is gone (retention) while later ones exist: the nearest later one
    later = sorted(i for i in members(base) if i > seg.index + 1)
    for i in later:
        f = segment_path(base, i)
        for g in (f, f.with_name(f.name + GZ)):
            s = segment_info(read_header(g)) if g.is_file() else None
            if s is not None and s.set == seg.set:
                return g
    return None


# -- writing ---------------------------------------------------------------------------------------------


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def compress_segment(path: Path) -> Path:
    """``path`` -> ``path.gz``: written to ``path.gz.tmp``, fsynced, renamed, the directory fsynced; only
    then are ``path`` and its companion deleted.  Raises ``OSError`` with ``path`` untouched (the partial
    ``.tmp`` removed)."""
    gz = path.with_name(path.name + GZ)
    tmp = gz.with_name(gz.name + _TMP)
    if os.path.lexists(gz):
        raise OSError(errno.EEXIST, f"{gz.name} exists already")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as raw:
            fd = -1
            with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, compresslevel=6, mtime=0) as out:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)  # zlib lets go of the GIL while it compresses
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, gz)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)
    os.unlink(path)
    _unlink(path.with_name(path.name + _COLS))
    return gz


class _Housekeeper:
    """A background thread that compresses closed segments and applies the retention bound, so the
    sampler thread never waits on either.  What it has to say is kept in ``messages`` for the writer to
    record from the sampler thread."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self.closed: list[Path] = []  # closed segments on disk (plain or .gz), oldest first; guarded by _lock
        self.messages: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._q: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, path: Path) -> None:
        with self._lock:
            self.closed.append(path)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tuner-trace-rotate", daemon=True)
            self._thread.start()
        self._q.put(path)

    def _run(self) -> None:
        try:  # a lower priority for this thread only (Linux: a thread is a task): compressing yields to all
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        while True:
            path = self._q.get()
            if path is None:
                return
            try:
                self._one(path)
            except Exception as exc:  # never let the thread die: the next segments still need it
                self.messages.put(("warn", f"trace rotation: {type(exc).__name__}: {exc}"))

    def _doomed(self, path: Path) -> bool:
        with self._lock:
            return self.keep is not None and path in self.closed[: max(0, len(self.closed) - self.keep)]

    def _one(self, path: Path) -> None:
        if not self._doomed(path):  # about to be deleted anyway: not worth compressing
            try:
                gz = compress_segment(path)
            except OSError as exc:
                self.messages.put(("warn", f"could not compress trace segment {path.name} "
                                           f"({exc.strerror or exc}); it stays uncompressed"))  # fmt: skip
            else:
                with self._lock:
                    self.closed[self.closed.index(path)] = gz
        self._retain()

    def _retain(self) -> None:
        if self.keep is None:
            return
        with self._lock:
            n = len(self.closed) - self.keep
            doomed, self.closed[:] = self.closed[: max(0, n)], self.closed[max(0, n) :]
        for p in doomed:
            _unlink(p)
            _unlink(p.with_name(p.name + _COLS))

    def close(self) -> None:
        """Finish what was submitted (compressions included) and stop the thread."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None


class RotatingTraceWriter(TraceWriter):
    """A ``TraceWriter`` that ends a segment and starts the next at ``rotation``'s size or age, after a
    flush (nothing pending), on the thread that flushes: no record is lost or split.  Closed segments go to
    a background thread that compresses them and deletes the oldest beyond ``rotation.keep``.  ``log``
    (from the sampler thread) hears of failures, which are also written into the trace as notes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: Mapping[str, Any],
        rotation: Rotation,
        *,
        log: Callable[[str], None] | None = None,
    ) -> None:
        base = Path(path)
        self.base = base
        self.rotation = rotation
        self.index = 0
        self.set_id = os.urandom(8).hex()
        self._log = log
        self._seg_t0: float = 0.0
        self._retry_at: float | None = None
        self._final = False  # the end record written or closing: no new segment after that
        self._house = _Housekeeper(rotation.keep)
        for stale in leftovers(base):  # an earlier rotated recording here (``--overwrite`` said yes)
            _unlink(stale)
        super().__init__(path, {**header, "segment": {"set": self.set_id, "index": 0, "base": base.name, "t": 0.0}})

    def _due(self) -> bool:
        r = self.rotation
        t = self._last_t if type(self._last_t) in (float, int) else 0.0
        if self._retry_at is not None and t < self._retry_at:
            return False
        if r.max_seconds is not None and t - self._seg_t0 >= r.max_seconds:
            return True
        if r.max_bytes is not None:
            try:
                return os.fstat(self._fd).st_size >= r.max_bytes
            except OSError:
                return False
        return False

    def flush(self) -> bool:
        self._drain_messages()
        ok = super().flush()
        if ok and not self._final and self._due():
            self._rotate()
        return ok

    def _rotate(self) -> None:
        t = self._last_t if type(self._last_t) in (float, int) else 0.0
        index = self.index + 1
        path = segment_path(self.base, index)
        header = {**self.header, "segment": {"set": self.set_id, "index": index, "base": self.base.name, "t": t}}
        old = self.path
        try:
            self._switch_file(path, header)
        except OSError as exc:
            self._retry_at = t + _RETRY_S
            msg = f"cannot start trace segment {path.name} ({exc.strerror or exc}); recording goes on in {old.name}"
            self.note(t, msg, "warn")
            if self._log is not None:
                self._log(msg)
            return
        self.index, self._seg_t0, self._retry_at = index, float(t), None
        self._house.submit(old)

    def _drain_messages(self) -> None:
        while True:
            try:
                level, msg = self._house.messages.get_nowait()
            except queue.Empty:
                return
            self.note(self._last_t if type(self._last_t) in (float, int) else 0.0, msg, level)
            if self._log is not None:
                self._log(msg)

    def end(self, t: float, **data: Any) -> None:
        """The end record, after the closed segments are compressed (what that had to say comes first)."""
        self._final = True
        self._finish_house()
        self._drain_messages()
        super().end(t, **data)

    def _finish_house(self) -> None:
        started = time.monotonic()
        self._house.close()
        if self._log is not None and time.monotonic() - started > 2:
            self._log(f"compressed the closed trace segments of {self.base.name}")

    def close(self) -> None:
        if self._closed:
            return
        self._final = True
        self._finish_house()
        self._drain_messages()
        super().close()
