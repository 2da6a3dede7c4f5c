"""``TraceFollower``: the complete records a growing trace gained since the last poll (a rotated recording's
segments one after the other)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tuner.trace.format import MAX_LINE_BYTES, TraceError, check_header, renamed_record
from tuner.trace.reader import _parse_line
from tuner.trace.rotate import next_segment, open_file, segment_info, trace_files


class TraceFollower:
    """Reads a growing trace incrementally: ``poll()`` returns the complete records added since the last
    call (the header first).  A partial last line waits for its newline.

    A rotated recording (``tuner.trace.rotate``) is followed from its first segment on disk: at the end
    of a segment, once the next one exists, the rest of this one is read and the follower goes on in the
    next (its header checked, not returned again).  ``path`` is the file being read now."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        files, _ = trace_files(path)
        self.path = files[0]
        self._f = open_file(self.path)
        self._buf = b""
        self._skipping = False
        self._lineno = 0
        self.header: dict[str, Any] | None = None
        self._seg_header: dict[str, Any] | None = None  # the header of the file being read
        self._set: str | None = None  # a later segment's header must name this recording
        self._scanned = 0.0  # when the directory was last listed for a later segment
        self.bad_lines = 0

    def _next_file(self) -> Path | None:
        if self._seg_header is None or segment_info(self._seg_header) is None:
            return None
        now = time.monotonic()
        scan = now - self._scanned >= 2.0  # a listing at most every 2 s while at the live segment's end
        if scan:
            self._scanned = now
        return next_segment(self.path, self._seg_header, scan=scan)

    def _switch(self, nxt: Path) -> None:
        if self._buf or self._skipping:  # a segment ends with a whole line; this one did not (torn)
            self.bad_lines += 1
            self._buf, self._skipping = b"", False
        seg = segment_info(self._seg_header)
        assert seg is not None
        self._f.close()
        self._f = open_file(nxt)
        self.path = nxt
        self._lineno = 0
        self._seg_header = None
        self._set = seg.set

    def poll(self, max_bytes: int = 8 * 1024 * 1024) -> list[dict[str, Any]]:
        chunk = self._f.read(max_bytes)
        if not chunk:
            nxt = self._next_file()
            if nxt is None:
                return []
            chunk = self._f.read(max_bytes)  # written before the next segment began
            if not chunk:
                self._switch(nxt)
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
            if self._seg_header is None and not lines:
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
                if self._seg_header is None:
                    raise TraceError(f"{self.path}: not an inference-tuner trace") from None
                self.bad_lines += 1
                continue
            if self._seg_header is None:
                check_header(rec, self.path)
                self._seg_header = rec
                if self._set is not None:  # a later segment: its header is not a record of the trace
                    seg = segment_info(rec)
                    if seg is None or seg.set != self._set:
                        raise TraceError(f"{self.path}: not a segment of the recording being followed")
                    continue
                self.header = rec
            out.append(renamed_record(rec))
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TraceFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
