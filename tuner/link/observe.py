"""Live feed of a session's trace records for viewers (``tuner tui --connect SOCKET``).

Wire: a Unix stream socket; each frame is a 4-byte big-endian length and a UTF-8 JSON object (never
pickle).  Server -> viewer: trace record dicts (the header first, then a bounded backlog of recent
records, then every published record).  Viewer -> server: commands such as
``{"cmd": "policy", "name": "temperature", "enabled": false}``, read by the session with
``drain_commands()``.

``publish()`` never blocks the caller (the sampler thread of the session): each viewer has a bounded
queue; when a viewer is slow the oldest records are dropped, counted, and the viewer is told with a
``{"k": "note", "level": "warn", "msg": "viewer dropped N records"}`` record.  Only peers with the same
user id (``SO_PEERCRED``) are served; the socket file is 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import stat
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from tuner.link.channel import peer_refusal

MAX_COMMAND_BYTES = 64 * 1024
MAX_RECORD_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct(">I")
_CRED = struct.Struct("3i")


def encode(obj: Mapping[str, Any]) -> bytes:
    """One frame: length prefix + compact UTF-8 JSON."""
    body = json.dumps(obj, separators=(",", ":"), default=str).encode()
    return _LEN.pack(len(body)) + body


def _encode_or_none(record: Mapping[str, Any]) -> bytes | None:
    try:
        frame = encode(record)
    except (TypeError, ValueError):
        return None
    return frame if len(frame) <= MAX_RECORD_BYTES else None


def valid_command(obj: Any) -> dict[str, Any] | None:
    """A viewer command the session understands, or None."""
    if not isinstance(obj, dict):
        return None
    if obj.get("cmd") == "policy" and isinstance(obj.get("name"), str) and isinstance(obj.get("enabled"), bool):
        return {"cmd": "policy", "name": obj["name"][:200], "enabled": obj["enabled"]}
    return None


class _Viewer:
    __slots__ = ("dropped", "inbuf", "out", "pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out: deque[bytes] = deque()
        self.pending = memoryview(b"")
        self.dropped = 0
        self.inbuf = b""


class ObserverServer:
    """Serves published trace records to any number of viewers on a Unix socket.

    ``path`` None makes a private 0700 directory for the socket.  ``backlog`` is how many recent records
    a new viewer receives after the header; ``queue_limit`` bounds each viewer's unsent records.
    """

    def __init__(self, path: str | None = None, *, backlog: int = 3000, queue_limit: int = 2000) -> None:
        self._own_dir: str | None = None
        if path is None:
            self._own_dir = tempfile.mkdtemp(prefix="tuner-observe-")
            path = os.path.join(self._own_dir, "observer.sock")
        self.path = path
        self.queue_limit = queue_limit
        self._header: bytes | None = None
        self._backlog: deque[bytes] = deque(maxlen=backlog)
        self._viewers: dict[int, _Viewer] = {}
        self._commands: deque[dict[str, Any]] = deque(maxlen=256)
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0
        self.rejected_peers = 0
        self.malformed = 0
        self._listener = self._bind(path)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(17, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead session
            else:
                raise OSError(98, f"another session serves {path}")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            os.chmod(path, 0o600)
            s.listen(16)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    # -- API used by the session --------------------------------------------------------------------
    def start(self) -> None:
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="tuner-observer", daemon=True)
        self._thread.start()

    def publish(self, record: Mapping[str, Any]) -> None:
        """Queue a record for every viewer; never blocks, never raises for an unencodable record.  (The
        session forwards the trace writer's encoded lines with :meth:`publish_line` instead.)"""
        if self._closed.is_set():
            return
        frame = _encode_or_none(record)
        if frame is not None:
            self._queue(frame, record.get("k") == "header")

    def publish_line(self, line: bytes, kind: str) -> None:
        """Like :meth:`publish` for a record the trace writer already encoded (its JSON line): framed as is."""
        if not self._closed.is_set() and len(line) <= MAX_RECORD_BYTES:
            self._queue(_LEN.pack(len(line)) + line, kind == "header")

    def _queue(self, frame: bytes, is_header: bool) -> None:
        """Into the backlog (the header replaces it) and every viewer's bounded queue; wake the I/O thread."""
        with self._lock:
            self.published += 1
            if is_header:
                self._header = frame
                self._backlog.clear()
            else:
                self._backlog.append(frame)
            if not self._viewers:
                return
            for v in self._viewers.values():
                if len(v.out) >= self.queue_limit:
                    v.out.popleft()
                    v.dropped += 1
                v.out.append(frame)
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
            return len(self._viewers)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            for v in self._viewers.values():
                v.sock.close()
            self._viewers.clear()
        self._listener.close()
        with contextlib.suppress(OSError):
            self._sel.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._own_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._own_dir)

    def __enter__(self) -> ObserverServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O thread ----------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken (pipe full) or closing

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                events = self._sel.select(timeout=1.0)
            except OSError:
                return
            for key, mask in events:
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                else:
                    v = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(v)
            self._flush_all()

    def _accept(self) -> None:
        for _ in range(16):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                time.sleep(0.05)  # out of descriptors: back off rather than spin
                return
            try:
                pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            except OSError:
                pid, uid = -1, -1
            # Only our own user, as on the channel (a root sidecar used to serve every uid: the live feed
            # carries the inference's numbers and takes policy commands).
            refusal = peer_refusal(pid, uid, os.getuid())
            if refusal is not None:
                self.rejected_peers += 1
                with contextlib.suppress(OSError):  # say why in one record, never waiting on the peer
                    sock.send(encode({"k": "note", "level": "error", "msg": refusal}), socket.MSG_DONTWAIT)
                sock.close()
                continue
            sock.setblocking(False)
            v = _Viewer(sock)
            with self._lock:
                if self._header is not None:  # never dropped: it goes out before any queued record
                    v.pending = memoryview(self._header)
                v.out.extend(list(self._backlog)[-self.queue_limit :])
                self._viewers[sock.fileno()] = v
            self._sel.register(sock, selectors.EVENT_READ, v)

    def _drop(self, v: _Viewer) -> None:
        with self._lock:
            self._viewers.pop(v.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(v.sock)
        v.sock.close()

    def _read(self, v: _Viewer) -> None:
        try:
            data = v.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(v)
            return
        v.inbuf += data
        while len(v.inbuf) >= 4:
            (n,) = _LEN.unpack_from(v.inbuf)
            if n > MAX_COMMAND_BYTES:
                self.malformed += 1
                self._drop(v)
                return
            if len(v.inbuf) < 4 + n:
                break
            body, v.inbuf = v.inbuf[4 : 4 + n], v.inbuf[4 + n :]
            try:
                cmd = valid_command(json.loads(body))
            except (ValueError, UnicodeDecodeError):
                cmd = None
            if cmd is None:
                self.malformed += 1
            else:
                self._commands.append(cmd)

    def _flush_all(self) -> None:
        with self._lock:
            viewers = list(self._viewers.values())
        for v in viewers:
            self._flush(v)

    def _flush(self, v: _Viewer) -> None:
        while True:
            if not v.pending:
                with self._lock:
                    if v.dropped:
                        n, v.dropped = v.dropped, 0
                        frame = encode({"k": "note", "level": "warn", "msg": f"viewer dropped {n} records", "n": n})
                    elif v.out:
                        frame = v.out.popleft()
                    else:
                        frame = b""
                if not frame:
                    self._want_write(v, False)
                    return
                v.pending = memoryview(frame)
            try:
                sent = v.sock.send(v.pending, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self._want_write(v, True)
                return
            except OSError:
                self._drop(v)
                return
            v.pending = v.pending[sent:]

    def _want_write(self, v: _Viewer, on: bool) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            if self._sel.get_key(v.sock).events != mask:
                self._sel.modify(v.sock, mask, v)


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
        self._buf = bytearray()
        self._send_lock = threading.Lock()

    def _fill(self, n: int, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sock.settimeout(left)
            else:
                self._sock.settimeout(None)
            try:
                chunk = self._sock.recv(max(65536, n - len(self._buf)))
            except TimeoutError:
                return False
            except OSError as exc:
                raise ConnectionError(str(exc)) from None
            if not chunk:
                raise ConnectionError("the session closed the live feed")
            self._buf += chunk
        return True

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next record, or None when none arrived within ``timeout``."""
        if not self._fill(4, timeout):
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > MAX_RECORD_BYTES:
            raise ConnectionError(f"frame of {n} bytes is larger than allowed")
        if not self._fill(4 + n, timeout if timeout is None else max(timeout, 5.0)):
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
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
            rec = self.recv(0.0005) if len(self._buf) < 4 else self.recv(1.0)
            if rec is None:
                break
            out.append(rec)
        return out

    def send_command(self, cmd: Mapping[str, Any]) -> None:
        frame = encode(cmd)
        with self._send_lock:
            self._sock.settimeout(2.0)
            try:
                self._sock.sendall(frame)
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
