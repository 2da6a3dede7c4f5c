"""``TraceFollower``: the complete records a growing trace gained since the last poll."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuner.trace.format import MAX_LINE_BYTES, TraceError, check_header, renamed_record
from tuner.trace.reader import _parse_line


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
            out.append(renamed_record(rec))
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TraceFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
