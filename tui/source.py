"""Where trace records come from: a trace file (followed or replayed), a live session, a test queue.

Every source has the same small interface, read from a worker thread:
``read(timeout) -> list[dict] | None`` (records that arrived, ``[]`` none yet, ``None`` the source is done),
``send_command(cmd) -> str | None`` (``None`` when sent, else why it cannot be), ``close()``,
``replay`` (a finished recording: the app plays it with a playhead) and ``describe``.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from tuner.errors import UserError
from tuner.trace import TraceError, TraceFollower, trace_files


class RecordSource(Protocol):
    replay: bool
    describe: str

    def read(self, timeout: float) -> list[dict[str, Any]] | None: ...

    def send_command(self, cmd: Mapping[str, Any]) -> str | None: ...

    def close(self) -> None: ...


def _has_end(path: Path) -> bool:
    """True if the last complete line of the file is an ``end`` record (a finished recording)."""
    if path.name.endswith(".gz"):  # a compressed last segment: read through to its end
        import gzip

        tail = b""
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 20):
                tail = (tail + chunk)[-65536:]
    else:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read(65536)
    lines = [ln for ln in tail.split(b"\n") if ln.strip()]
    return bool(lines) and b'"k":"end"' in lines[-1].replace(b" ", b"")


class FileSource:
    """A trace file: a finished one (ends with an ``end`` record) is replayed, a growing one followed.  A
    rotated recording (given by any of its files or a glob) is one trace, from its first segment."""

    def __init__(self, path: str | os.PathLike[str], *, poll_interval: float = 0.1) -> None:
        files, _ = trace_files(path)
        p = files[0]
        if not p.exists():
            raise UserError(f"{p}: no such file")
        if p.is_dir():
            raise UserError(f"{p}: is a directory, not a trace file")
        if not p.is_file():  # a device or a FIFO: /dev/zero would be read without end
            raise UserError(f"{p}: not a regular file, not a trace")
        try:
            self.replay = _has_end(files[-1])
            self._f = TraceFollower(p)
            first = self._f.poll(max_bytes=1 << 20)
        except PermissionError:
            raise UserError(f"{p}: permission denied") from None
        except OSError as exc:
            raise UserError(f"cannot read {p}: {exc.strerror or exc}") from None
        if not first:
            self._f.close()
            empty = p.stat().st_size == 0
            raise TraceError(f"{p}: empty file, not a trace" if empty else
                             f"{p}: not an inference-tuner trace (no complete first line)")
        self._first: list[dict[str, Any]] | None = first
        self.path = p
        self.poll_interval = poll_interval
        self.describe = f"{'replay' if self.replay else 'following'} {p.name}"

    def read(self, timeout: float) -> list[dict[str, Any]] | None:
        if self._first is not None:
            out, self._first = self._first, None
            return out
        try:
            recs = self._f.poll()
        except (OSError, ValueError):
            return None
        if recs:
            return recs
        if self.replay:
            return None
        time.sleep(min(timeout, self.poll_interval))
        return []

    def send_command(self, cmd: Mapping[str, Any]) -> str | None:
        if self.replay:
            return "replay: a recorded trace's policies cannot be changed"
        return "following a file: connect to the session (tuner tui --connect SOCKET) to change policies"

    def close(self) -> None:
        self._f.close()


class SocketSource:
    """A running session's observer socket (``tuner.observe.ObserverServer``)."""

    replay = False

    def __init__(self, path: str) -> None:
        from tuner.link.observe import ObserverClient

        if not os.path.exists(path):
            raise UserError(f"{path}: no such socket (is the session running? it prints its live-view socket)")
        try:
            self._c = ObserverClient(path)
        except OSError as exc:
            raise UserError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self.path = path
        self.describe = "live"
        self.error: str | None = None

    def read(self, timeout: float) -> list[dict[str, Any]] | None:
        try:
            return self._c.recv_many(timeout)
        except (ConnectionError, ValueError) as exc:
            self.error = str(exc)
            return None

    def send_command(self, cmd: Mapping[str, Any]) -> str | None:
        try:
            self._c.send_command(cmd)
        except ConnectionError as exc:
            return f"session gone: {exc}"
        return None

    def close(self) -> None:
        self._c.close()


class QueueSource:
    """Records put in by a test (``put``/``put_many``); ``finish()`` ends it.  ``live`` sources accept
    commands (kept in ``sent``), like a session's socket."""

    def __init__(self, records: Iterable[Mapping[str, Any]] = (), *, replay: bool = False, live: bool = True) -> None:
        self.q: queue.Queue[list[dict[str, Any]] | None] = queue.Queue()
        self.replay = replay
        self.live = live and not replay
        self.describe = "replay" if replay else "live"
        self.sent: list[dict[str, Any]] = []
        recs = [dict(r) for r in records]
        if recs:
            self.q.put(recs)
        if replay:
            self.q.put(None)

    def put(self, rec: Mapping[str, Any]) -> None:
        self.q.put([dict(rec)])

    def put_many(self, recs: Iterable[Mapping[str, Any]]) -> None:
        self.q.put([dict(r) for r in recs])

    def finish(self) -> None:
        self.q.put(None)

    def read(self, timeout: float) -> list[dict[str, Any]] | None:
        try:
            first = self.q.get(timeout=timeout)
        except queue.Empty:
            return []
        if first is None:
            return None
        out = list(first)
        while True:
            try:
                more = self.q.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self.q.put(None)
                break
            out.extend(more)
        return out

    def send_command(self, cmd: Mapping[str, Any]) -> str | None:
        if self.replay:
            return "replay: a recorded trace's policies cannot be changed"
        if not self.live:
            return "following a file: connect to the session (tuner tui --connect SOCKET) to change policies"
        self.sent.append(dict(cmd))
        return None

    def close(self) -> None:
        pass
