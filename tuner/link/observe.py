"""Live feed of a session's trace records for viewers (``tuner tui --connect SOCKET``).

Wire: a Unix stream socket (``tuner.link.server``: private directory, socket born 0600, same-user peers
only); each frame is a 4-byte big-endian length and a UTF-8 JSON object (``tuner.link.wire``; never
pickle).  Server -> viewer: trace record dicts (the header first, then a bounded backlog of recent
records, then every published record).  Viewer -> server: commands such as
``{"cmd": "policy", "name": "temperature", "enabled": false}``, read by the session with
``drain_commands()``.

``publish()`` never blocks the caller (the sampler thread of the session): each viewer has a bounded
queue; when a viewer is slow the oldest records are dropped, counted, and the viewer is told with a
``{"k": "note", "level": "warn", "msg": "viewer dropped N records"}`` record.  A peer of another user
(``SO_PEERCRED``) gets one ``{"k": "note", "level": "error"}`` record saying why and is closed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from tuner.link.server import Conn, UnixServer
from tuner.link.wire import FrameBuffer, encode, frame

MAX_COMMAND_BYTES = 64 * 1024
MAX_RECORD_BYTES = 16 * 1024 * 1024


def _encode_or_none(record: Mapping[str, Any]) -> bytes | None:
    try:
        data = encode(record, lenient=True)
    except (TypeError, ValueError):
        return None
    return data if len(data) <= MAX_RECORD_BYTES else None


def valid_command(obj: Any) -> dict[str, Any] | None:
    """A viewer command the session understands, or None."""
    if not isinstance(obj, dict):
        return None
    if obj.get("cmd") == "policy" and isinstance(obj.get("name"), str) and isinstance(obj.get("enabled"), bool):
        return {"cmd": "policy", "name": obj["name"][:200], "enabled": obj["enabled"]}
    return None


class _Viewer(Conn):
    __slots__ = ("dropped", "out")

    def __init__(self, sock: socket.socket, n: int, pid: int, uid: int) -> None:
        super().__init__(sock, n, pid, uid, MAX_COMMAND_BYTES)
        self.out: deque[bytes] = deque()
        self.dropped = 0


class ObserverServer(UnixServer[_Viewer]):
    """Serves published trace records to any number of viewers on a Unix socket.

    ``path`` None makes a private 0700 directory for the socket.  ``backlog`` is how many recent records
    a new viewer receives after the header; ``queue_limit`` bounds each viewer's unsent records.
    """

    thread_name = "tuner-observer"
    accept_per_turn = 16
    listen_backlog = 16

    def __init__(self, path: str | None = None, *, backlog: int = 3000, queue_limit: int = 2000) -> None:
        self.queue_limit = queue_limit
        self._header: bytes | None = None
        self._recent: deque[bytes] = deque(maxlen=backlog)
        self._commands: deque[dict[str, Any]] = deque(maxlen=256)
        self.published = 0
        self.rejected_peers = 0
        self.malformed = 0
        super().__init__(path, dir_prefix="tuner-observe-", sock_name="observer.sock", max_frame=MAX_COMMAND_BYTES)

    # -- API used by the session --------------------------------------------------------------------
    def publish(self, record: Mapping[str, Any]) -> None:
        """Queue a record for every viewer; never blocks, never raises for an unencodable record.  (The
        session forwards the trace writer's encoded lines with :meth:`publish_line` instead.)"""
        if self._stop:
            return
        data = _encode_or_none(record)
        if data is not None:
            self._queue(data, record.get("k") == "header")

    def publish_line(self, line: bytes, kind: str) -> None:
        """Like :meth:`publish` for a record the trace writer already encoded (its JSON line): framed as is."""
        if not self._stop and len(line) <= MAX_RECORD_BYTES:
            self._queue(frame(line), kind == "header")

    def _queue(self, data: bytes, is_header: bool) -> None:
        """Into the backlog (the header replaces it) and every viewer's bounded queue; wake the I/O thread.
        A slow viewer loses its oldest records (counted; it is told how many before its next record)."""
        with self._lock:
            self.published += 1
            if is_header:
                self._header = data
                self._recent.clear()
            else:
                self._recent.append(data)
            if not self._conns:
                return
            for v in self._conns.values():
                if len(v.out) >= self.queue_limit:
                    v.out.popleft()
                    v.dropped += 1
                v.out.append(data)
        self._wake()

    def drain_commands(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while self._commands:
            try:
                out.append(self._commands.popleft())
            except IndexError:
                break
        return out

    def viewers(self) -> int:
        with self._lock:
            return len(self._conns)

    def __enter__(self) -> ObserverServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server's hooks (lock held where noted) -------------------------------------------------
    def _admit(self, sock: socket.socket, n: int, pid: int, uid: int) -> _Viewer:
        """Lock held."""
        v = _Viewer(sock, n, pid, uid)
        if self._header is not None:  # never dropped: it goes out before any queued record
            v.pending = memoryview(self._header)
        v.out.extend(list(self._recent)[-self.queue_limit :])
        return v

    def _refusal_frame(self, reason: str) -> bytes:
        # Only our own user, as on the channel (a root sidecar used to serve every uid: the live feed
        # carries the inference's numbers and takes policy commands).
        return encode({"k": "note", "level": "error", "msg": reason})

    def _on_refused(self, pid: int, uid: int, reason: str) -> None:
        self.rejected_peers += 1

    def _on_input(self, v: _Viewer, limit: int | None) -> None:
        for body in v.frames.take(limit):
            try:
                cmd = valid_command(json.loads(body))
            except (ValueError, UnicodeDecodeError):
                cmd = None
            if cmd is None:
                self.malformed += 1
            else:
                self._commands.append(cmd)
        if v.frames.oversized is not None:
            self.malformed += 1
            self._drop(v)

    def _take_out(self, v: _Viewer) -> bytes | None:
        """Lock held."""
        if v.dropped:
            n, v.dropped = v.dropped, 0
            return encode({"k": "note", "level": "warn", "msg": f"viewer dropped {n} records", "n": n})
        if v.out:
            return v.out.popleft()
        return None

    def _has_out(self, v: _Viewer) -> bool:
        return bool(v.out) or v.dropped > 0


class ObserverClient:
    """A viewer: ``recv()`` returns the next record (or None on timeout), ``send_command()`` a command.
    Raises ``ConnectionError`` once the session is gone."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._frames = FrameBuffer(MAX_RECORD_BYTES)
        self._send_lock = threading.Lock()

    def _fill(self, n: int, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._frames) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(None)
            try:
                chunk = self._sock.recv(max(65536, n - len(self._frames)))
            except TimeoutError:
                return False
            except OSError as exc:
                raise ConnectionError(str(exc)) from None
            if not chunk:
                raise ConnectionError("the session closed the live feed")
            self._frames.feed(chunk)
        return True

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next record, or None when none arrived within ``timeout``."""
        frames = self._frames
        if not frames.ready():  # else a whole frame is already here
            if not self._fill(4, timeout):
                return None
            n = frames.next_size() or 0
            if frames.oversized is not None:
                raise ConnectionError(f"frame of {n} bytes is larger than allowed")
            if not self._fill(4 + n, timeout if timeout is None else max(timeout, 5.0)):
                return None
        (body,) = frames.take(1)
        rec = json.loads(body)
        return rec if isinstance(rec, dict) else None

    def recv_many(self, timeout: float, limit: int = 10000) -> list[dict[str, Any]]:
        """Everything that arrives within ``timeout`` (returns early once something came and the socket is idle)."""
        out: list[dict[str, Any]] = []
        first = self.recv(timeout)
        if first is None:
            return out
        out.append(first)
        while len(out) < limit:
            rec = self.recv(0.0005) if len(self._frames) < 4 else self.recv(1.0)
            if rec is None:
                break
            out.append(rec)
        return out

    def send_command(self, cmd: Mapping[str, Any]) -> None:
        data = encode(cmd, lenient=True)
        with self._send_lock:
            self._sock.settimeout(2.0)
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise ConnectionError(str(exc)) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def __enter__(self) -> ObserverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
