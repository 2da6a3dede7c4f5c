"""A private Unix-socket server on one background thread: what the channel and the live feed share.

- The socket: without a path, in a fresh private directory (0700, ``tempfile.mkdtemp``); it is born 0600
  (bound under ``umask 0o177``, then chmod), so there is no moment in which another user may connect.  A
  given path that holds a socket nobody answers on (a dead session's) is replaced; one that is served,
  or is not a socket, is an error (``OSError`` saying which).
- Every connection's peer is checked with ``SO_PEERCRED`` (``tuner.link.wire.peer_refusal``); a refused
  peer is told why in one frame, never waited on, and closed.
- One thread runs a selector over the listener, a wake-up socket pair and the connections; input is split
  into frames (``tuner.link.wire.FrameBuffer``), output leaves from each connection's pending bytes
  without ever blocking; other threads queue output under the lock and ``_wake()`` the loop.

Subclasses decide what frames mean and what each connection is sent next — their queue rules (which
message is dropped when someone is too fast or too slow) are theirs; see the ``_admit`` ... ``_on_drop``
hooks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from typing import Generic, TypeVar

from tuner.link.wire import FrameBuffer, PeerCred, peer_refusal, so_peercred

_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # EPIPE, never SIGPIPE, on a peer that hung up
_LISTEN = "listen"
_WAKE = "wake"
_NOTHING = memoryview(b"")


def clear_stale_socket(path: str) -> None:
    """Make ``path`` free for a new socket: remove a socket file nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the stale socket of a dead session
        return
    except OSError as exc:  # a full backlog, no permission: somebody may still be there
        raise OSError(exc.errno, f"{path}: cannot tell whether another session serves it ({exc})") from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another session serves {path}")


def bind_private(path: str, backlog: int) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path``, 0600 from its first moment."""
    clear_stale_socket(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class Conn:
    """One accepted peer.  ``pending`` is output being written (loop thread only)."""

    __slots__ = ("closed", "connected_at", "frames", "n", "pending", "pid", "sock", "uid", "want_write")

    def __init__(self, sock: socket.socket, n: int, pid: int, uid: int, max_frame: int) -> None:
        self.sock = sock
        self.n = n
        self.pid = pid
        self.uid = uid
        self.connected_at = time.monotonic()
        self.frames = FrameBuffer(max_frame)
        self.pending = _NOTHING
        self.want_write = False
        self.closed = False


C = TypeVar("C", bound=Conn)


class UnixServer(Generic[C]):
    """The base of ``ChannelServer`` and ``ObserverServer``: socket, peer check, selector loop, output.

    ``path`` None makes a private directory (``dir_prefix``) holding ``sock_name``; it is removed on
    ``close()`` with whatever else was put there.  ``messages_per_turn`` bounds the frames taken from
    one connection per loop turn: a connection with more waiting is not read again until they are taken
    (its input holds at most one incomplete frame plus one read), so a flood cannot starve the others.
    What a message is (a channel ``requests`` frame holds many) is the subclass's to count."""

    thread_name = "tuner-link"
    accept_per_turn = 64
    listen_backlog = 64
    read_chunk = 64 * 1024
    messages_per_turn: int | None = None

    def __init__(
        self, path: str | None, *, dir_prefix: str, sock_name: str, max_frame: int, peer_cred: PeerCred | None = None
    ) -> None:
        own_dir = None
        if path is None:
            own_dir = tempfile.mkdtemp(prefix=dir_prefix)
            path = os.path.join(own_dir, sock_name)
        try:
            self._listener = bind_private(path, self.listen_backlog)
        except BaseException:
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)
            raise
        self.path = path
        self._own_dir = own_dir
        self._max_frame = max_frame
        self._peer_cred = peer_cred or so_peercred
        self._my_uid = os.getuid()
        self._lock = threading.Lock()
        self._conns: dict[int, C] = {}
        self._next_conn = 0
        self._backlog: set[int] = set()  # connections holding complete frames not yet taken (loop thread)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, _LISTEN)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)

    # -- hooks (lock held unless said otherwise) --------------------------------------------------------
    def _admit(self, sock: socket.socket, n: int, pid: int, uid: int) -> C | None:
        """A connection object for an accepted peer (queue its first output here), or None to close it."""
        raise NotImplementedError

    def _refusal_frame(self, reason: str) -> bytes:
        """The one frame a refused peer receives (no lock needed)."""
        raise NotImplementedError

    def _on_refused(self, pid: int, uid: int, reason: str) -> None:
        """Count / keep a refused peer."""

    def _on_input(self, c: C, limit: int | None) -> None:
        """Loop thread, lock NOT held: take frames from ``c.frames`` and act on them — at most ``limit``
        messages' worth (all with None); ``c.frames.oversized`` set means the stream is broken.  Call
        ``_drop(c)`` to close it."""
        raise NotImplementedError

    def _take_out(self, c: C) -> bytes | bytearray | None:
        """The next bytes to send to ``c`` (taken off its queue), or None when nothing waits."""
        raise NotImplementedError

    def _has_out(self, c: C) -> bool:
        """Lock NOT held, a hint: whether output may be waiting for ``c``."""
        return True

    def _on_drop(self, c: C, event: bool) -> None:
        """``c`` is gone (``event`` False when the server is closing)."""

    # -- life -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2)
        for c in list(self._conns.values()):
            self._drop(c, event=False)
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(Exception):
                self._sel.unregister(s)
            s.close()
        self._sel.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def _wake(self) -> None:
        """Any thread: make the loop turn now (queued output goes out)."""
        with contextlib.suppress(OSError):  # already woken (buffer full) or closing
            self._wake_w.send(b"\0", _NOSIGNAL)

    # -- the loop thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            try:
                ready = self._sel.select(timeout=0 if self._backlog else 0.5)
            except OSError:
                if self._stop:
                    return
                raise
            for key, mask in ready:
                if self._stop:
                    return
                data = key.data
                if data is _LISTEN:
                    self._accept()
                elif data is _WAKE:
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                else:
                    try:
                        if mask & selectors.EVENT_READ:
                            self._read(data)
                        if mask & selectors.EVENT_WRITE and not data.closed:
                            self._flush(data)
                    except Exception:  # one bad connection must never stop the server
                        self._drop(data)
            if self._backlog:
                served = {key.data.n for key, _ in ready if isinstance(key.data, Conn)}
                for n in list(self._backlog - served):
                    c = self._conns.get(n)
                    if c is None:
                        self._backlog.discard(n)
                        continue
                    try:
                        self._input(c, self.messages_per_turn)
                    except Exception:
                        self._drop(c)
            for c in list(self._conns.values()):
                if not c.want_write and (c.pending or self._has_out(c)):
                    self._flush(c)

    def _accept(self) -> None:
        for _ in range(self.accept_per_turn):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                time.sleep(0.05)  # EMFILE and friends: the listener stays readable; do not spin on it
                return
            try:
                pid, uid, _gid = self._peer_cred(sock)
            except OSError:
                pid, uid = -1, -1
            refusal = peer_refusal(pid, uid, self._my_uid)
            if refusal is not None:
                with self._lock:  # counted before the peer can see its connection closed
                    self._on_refused(pid, uid, refusal)
                with contextlib.suppress(OSError):  # one frame saying why, never waiting on the peer
                    sock.send(self._refusal_frame(refusal), socket.MSG_DONTWAIT | _NOSIGNAL)
                sock.close()
                continue
            sock.setblocking(False)
            with self._lock:
                self._next_conn += 1
                c = self._admit(sock, self._next_conn, pid, uid)
                if c is not None:
                    self._conns[c.n] = c
            if c is None:
                sock.close()
                continue
            try:
                self._sel.register(sock, selectors.EVENT_READ, c)
            except (ValueError, OSError):
                self._drop(c)

    def _read(self, c: C) -> None:
        """Take more bytes only when no complete frame of ``c`` waits (backpressure), then its frames."""
        if c.n in self._backlog:
            self._input(c, self.messages_per_turn)
            return
        try:
            data = c.sock.recv(self.read_chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._input(c, None)  # what it sent before closing still counts
            self._drop(c)
            return
        c.frames.feed(data)
        self._input(c, self.messages_per_turn)

    def _input(self, c: C, limit: int | None) -> None:
        self._on_input(c, limit)
        frames = c.frames
        if limit is not None and not c.closed and (frames.ready() or frames.oversized is not None):
            self._backlog.add(c.n)  # a complete frame (or a broken one, to close it) waits for the next turn
        else:
            self._backlog.discard(c.n)

    def _flush(self, c: C) -> None:
        """Write what the socket takes now; watch for writability while anything is left."""
        while True:
            if not c.pending:
                with self._lock:
                    if c.closed:
                        return
                    chunk = self._take_out(c)
                if not chunk:
                    self._want_write(c, False)
                    return
                c.pending = memoryview(chunk)
            try:
                n = c.sock.send(c.pending, _NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self._want_write(c, True)
                return
            except OSError:
                self._drop(c)
                return
            c.pending = c.pending[n:]

    def _want_write(self, c: C, on: bool) -> None:
        if on == c.want_write or c.closed:
            return
        c.want_write = on
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0), c)

    def _drop(self, c: C, *, event: bool = True) -> None:
        """Close ``c`` (loop thread, or ``close()`` once the loop stopped)."""
        with self._lock:
            if c.closed:
                return
            c.closed = True
            self._conns.pop(c.n, None)
            self._on_drop(c, event)
        self._backlog.discard(c.n)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(c.sock)
        c.sock.close()
        c.frames.clear()
        c.pending = _NOTHING
