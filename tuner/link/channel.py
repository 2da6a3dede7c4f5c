"""The sidecar's end of the channel to ``tuner.client``: a Unix socket, one background thread.

Security: the socket lives in a private directory (0700, from ``tempfile.mkdtemp``) and is itself 0600;
every connection's peer is checked with ``SO_PEERCRED`` and any uid other than ours is refused — told
why in one ``refused`` frame (``{"type": "refused", "reason": ...}``), then closed, counted
(``stats()["rejected_peers"]``) and kept for ``refusals()`` (the output probe puts them in the trace).

Wire format (both directions): a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding
one object ``{"v": 1, "type": ..., ...}``.  Never pickle.  A frame that is oversized
(``> max_message_bytes``), not JSON, not an object, of another version, of an unknown type or with
fields of the wrong type is dropped and counted (``stats()["malformed"]``), and *that* connection is
closed; everybody else goes on being served.

Client -> sidecar types: ``hello``, ``request``, ``status``, ``oom``, ``alloc``, ``command_result``
(see ``tuner.client``).  Sidecar -> client: ``welcome`` (options such as ``record_text``), ``knobs``,
``command``.  Each message ``drain()`` returns is stamped with the sender's ``pid`` (from
``SO_PEERCRED``, not from the client's word) and a connection number ``conn``; connections opening and
closing appear as ``client_connect`` / ``client_disconnect`` messages (types no client may send).

Memory is bounded everywhere.  The inbound queue (count and bytes) is split fairly: one FIFO per
connection, each holding at most its share — half the queue / the connections, at least ``MIN_SHARE`` —
beyond which that connection's own oldest message is dropped and counted (and when the whole queue is
full, the oldest of the connection holding most); ``drain(max_messages)`` takes a bounded batch,
round-robin between connections.  So a flood neither fills the queue nor delays a well-behaved client's
messages: it only loses its own.  Each connection's input holds one frame at most and its output buffer
is bounded (a message that does not fit is dropped and counted), and so is the number of connections.
A flooding connection gets at most 64 messages parsed per turn and is not read while complete frames of
it wait, so it cannot starve the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from tuner.records import Knobs

VERSION = 1
HEADER = struct.Struct(">I")
READ_CHUNK = 64 * 1024
MESSAGES_PER_TURN = 64
MAX_CLIENTS = 256
OUT_BUFFER_BYTES = 1 << 20
QUEUE_MESSAGES = 20_000
QUEUE_BYTES = 32 << 20
EVENTS_KEPT = 1024
MIN_SHARE = 16
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # EPIPE, never SIGPIPE, on a peer that hung up

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
_LIST = (list,)
# type -> {field: allowed python types}; listed fields are optional unless in _REQUIRED.
_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"pid": (int,), "client": _OPT_STR, "python": _OPT_STR},
    "request": {
        "id": (int, str),
        "prompt_tokens": (int, type(None)),
        "tokens": (int,),
        "created": _NUM,
        "end": _NUM,
        "queue_seconds": _OPT_NUM,
        "ttft_seconds": _OPT_NUM,
        "tpot_seconds": _OPT_NUM,
        "e2e_seconds": _OPT_NUM,
        "tokens_per_second": _OPT_NUM,
        "ids": _LIST,
        "batch_size": (int, type(None)),
        "batch_capacity": (int, type(None)),
        "temperature": _OPT_NUM,
        "precision": _OPT_STR,
        "text": _OPT_STR,
        "loop_min_n": (int, type(None)),
        "loop_max_n": (int, type(None)),
    },
    "requests": {"rows": (list,)},
    "status": {"active": (int,), "dropped": (int,), "failed": (int,), "sent": (int,)},
    "oom": {"batch_size": (int, type(None))},
    "alloc": {"allocated_bytes": _OPT_NUM, "reserved_bytes": _OPT_NUM},
    "command_result": {"id": (str,), "cmd": (str,), "ok": (bool,), "result": (dict, type(None)), "error": _OPT_STR},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "hello": ("pid",),
    "request": ("tokens", "created", "end"),
    "requests": ("rows",),
    "status": ("active", "dropped"),
    "oom": (),
    "alloc": (),
    "command_result": ("id", "cmd", "ok"),
}


# A ``requests`` message batches finished requests as rows (lists) in this order: raw monotonic stamps from
# the client; the server derives the seconds the ``request`` messages carry (see ``expand_rows``).
ROW_FIELDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("id", (int, str)),
    ("prompt_tokens", (int, type(None))),
    ("tokens", (int,)),
    ("created", _NUM),
    ("started", _OPT_NUM),
    ("first", _OPT_NUM),
    ("last", _OPT_NUM),
    ("n_first", (int,)),
    ("end", _NUM),
    ("ids", _LIST),
    ("batch_size", (int, type(None))),
    ("batch_capacity", (int, type(None))),
    ("temperature", _OPT_NUM),
    ("precision", _OPT_STR),
    ("loop_min_n", (int, type(None))),
    ("loop_max_n", (int, type(None))),
    ("text", _OPT_STR),
)


class MessageError(ValueError):
    """A frame that breaks the protocol (the connection that sent it gets closed)."""


def encode(msg: dict[str, Any]) -> bytes:
    """One frame: length prefix + compact UTF-8 JSON (``v`` added when missing)."""
    if "v" not in msg:
        msg = {"v": VERSION, **msg}
    body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    return HEADER.pack(len(body)) + body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: Python accepts them, the protocol does not


def validate(body: bytes) -> dict[str, Any]:
    """Parse and check one client frame's body; raise ``MessageError`` saying what is wrong."""
    try:
        msg = json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise MessageError("not a JSON object")
    if msg.get("v") != VERSION:
        raise MessageError(f"unsupported version {msg.get('v')!r}")
    kind = msg.get("type")
    schema = _SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise MessageError(f"unknown type {kind!r}")
    for name in _REQUIRED[kind]:  # type: ignore[index]
        if name not in msg:
            raise MessageError(f"{kind}: missing {name}")
    for name, types in schema.items():
        if name in msg:
            value = msg[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise MessageError(f"{kind}: bad {name}")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1 << 63:
                raise MessageError(f"{kind}: {name} out of range")
    if kind == "request" and "ids" in msg:
        _check_ids(msg["ids"])
    if kind == "requests":
        for row in msg["rows"]:
            if not isinstance(row, list) or len(row) != len(ROW_FIELDS):
                raise MessageError("requests: a row of the wrong shape")
            for value, (name, types) in zip(row, ROW_FIELDS, strict=True):
                if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                    raise MessageError(f"requests: bad {name}")
                if type(value) is int and abs(value) > 1 << 63:
                    raise MessageError(f"requests: {name} out of range")
            _check_ids(row[9])
    return msg


def _check_ids(ids: list[Any]) -> None:
    if ids and (set(map(type, ids)) != {int} or min(ids) < -(1 << 63) or max(ids) >= 1 << 63):  # C loops only
        raise MessageError("request: ids must be 64-bit integers")


def expand_rows(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """A validated ``requests`` message -> one ``request`` message per row, with the derived timings:
    queue = started - created (0 without started), TTFT = first - created, TPOT = (last - first) /
    (tokens - tokens of the first call), e2e = end - created, tokens/s = tokens / (end - started)."""
    out = []
    for row in msg["rows"]:
        r = dict(zip((name for name, _ in ROW_FIELDS), row, strict=True))
        created, end, n = r["created"], r["end"], r["tokens"]
        started = r.pop("started")
        started = created if started is None else started
        first, last, n_first = r.pop("first"), r.pop("last"), r.pop("n_first")
        span = end - started
        r["type"] = "request"
        r["v"] = VERSION
        r["queue_seconds"] = started - created
        r["ttft_seconds"] = first - created if first is not None else None
        r["tpot_seconds"] = (
            (last - first) / (n - n_first) if first is not None and last is not None and n > n_first else None
        )
        r["e2e_seconds"] = end - created
        r["tokens_per_second"] = n / span if span > 0 and n else None
        if r["text"] is None:
            del r["text"]
        out.append(r)
    return out


def peer_refusal(pid: int, uid: int, my_uid: int) -> str | None:
    """Why a peer may not use the channel (None when it may).  Only the sidecar's own user may talk to
    it — not even root when the sidecar is not root; a peer whose credentials cannot be read is refused."""
    if uid == my_uid and uid >= 0:
        return None
    if uid < 0:
        return "the peer's credentials could not be read (SO_PEERCRED): refused"
    return f"process {pid} runs as uid {uid}; only uid {my_uid}, the user running the tuner, may use this channel"


def peer_allowed(uid: int, my_uid: int) -> bool:
    """Only the sidecar's own user may talk to it (not even root, when the sidecar is not root)."""
    return peer_refusal(-1, uid, my_uid) is None


PeerCred = Callable[[socket.socket], tuple[int, int, int]]


def so_peercred(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of a connected Unix-socket peer, as the kernel recorded them at connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class _Conn:
    __slots__ = (
        "closed",
        "connected_at",
        "inbuf",
        "n",
        "outbuf",
        "pid",
        "registered",
        "sock",
        "uid",
        "want_write",
    )

    def __init__(self, sock: socket.socket, n: int, pid: int, uid: int) -> None:
        self.sock = sock
        self.n = n
        self.pid = pid
        self.uid = uid
        self.connected_at = time.monotonic()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.want_write = False
        self.registered = False
        self.closed = False


class ChannelServer:
    """The Unix-socket server the inference's ``tuner.client`` connects to (path goes in ``TUNER_SOCKET``)."""

    def __init__(
        self,
        directory: str | None = None,
        max_message_bytes: int = 1 << 20,
        *,
        peer_cred: PeerCred | None = None,
        queue_messages: int = QUEUE_MESSAGES,
        queue_bytes: int = QUEUE_BYTES,
        out_buffer_bytes: int = OUT_BUFFER_BYTES,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self._peer_cred = peer_cred or so_peercred
        self._queue_messages = queue_messages
        self._queue_bytes = queue_bytes
        self._out_cap = out_buffer_bytes
        self._max_clients = max_clients
        self._my_uid = os.getuid()
        self._own_dir = directory is None
        self.directory = tempfile.mkdtemp(prefix="tuner-") if directory is None else directory
        self.path = os.path.join(self.directory, "channel.sock")
        self._lock = threading.Lock()
        # the inbound queue, one FIFO per connection: (arrival, message, size); drained round-robin
        self._queues: dict[int, deque[tuple[float, dict[str, Any], int]]] = {}
        self._queued = 0
        self._queued_bytes = 0
        self._events: deque[tuple[float, dict[str, Any]]] = deque(maxlen=EVENTS_KEPT)
        self._refused: deque[dict[str, Any]] = deque(maxlen=64)
        self._conns: dict[int, _Conn] = {}
        self._backlog: set[int] = set()  # connections holding complete frames not yet parsed (loop thread)
        self._next_conn = 0
        self._welcome: dict[str, Any] = {"max_message_bytes": max_message_bytes}
        self._knobs_frame: bytes | None = None
        self._counts = {
            "malformed": 0,
            "rejected_peers": 0,
            "received": 0,
            "dropped": 0,
            "out_dropped": 0,
            "refused_full": 0,
            "connections": 0,
        }
        self._sel = selectors.DefaultSelector()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            old = os.umask(0o177)  # the socket is born 0600: no window in which others may connect
            try:
                self._listener.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self._listener.listen(64)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        except BaseException:
            self._listener.close()
            if self._own_dir:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    # -- public API (any thread) --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tuner-channel", daemon=True)
            self._thread.start()

    def drain(self, max_messages: int | None = None) -> list[tuple[float, dict[str, Any]]]:
        """What was received since the last call, in arrival order: ``(monotonic arrival, message)``, and
        every connect/disconnect.  With ``max_messages``, at most that many client messages, taken
        round-robin between the connections (each connection's oldest first), so a flooding one cannot
        delay the others; the rest waits for the next call."""
        with self._lock:
            queues = self._queues
            out: list[tuple[float, dict[str, Any]]] = []
            if max_messages is None or max_messages >= self._queued:
                for q in queues.values():
                    out.extend((t, m) for t, m, _ in q)
                queues.clear()
                self._queued = 0
                self._queued_bytes = 0
            else:
                budget = max(0, max_messages)
                while budget > 0 and queues:
                    per = max(1, budget // len(queues))
                    for conn in list(queues):
                        q = queues[conn]
                        for _ in range(min(per, len(q), budget)):
                            t, m, size = q.popleft()
                            out.append((t, m))
                            self._queued_bytes -= size
                            budget -= 1
                        if not q:
                            del queues[conn]
                        if budget <= 0:
                            break
                self._queued -= len(out)
            events = list(self._events)
            self._events.clear()
        if events:
            out.extend(events)
        out.sort(key=lambda x: x[0])  # per-connection runs, already in order: a cheap merge
        return out

    def refusals(self) -> list[dict[str, Any]]:
        """Peers refused since the last call (``{"pid", "uid", "reason"}``; the last 64 at most; all of
        them are counted in ``stats()["rejected_peers"]``)."""
        with self._lock:
            out = list(self._refused)
            self._refused.clear()
        return out

    def set_welcome(self, **options: Any) -> None:
        """Options every client is told on connect (e.g. ``record_text=True``); sent to current ones too."""
        with self._lock:
            self._welcome.update(options)
            frame = encode({"type": "welcome", **self._welcome})
            for c in self._conns.values():
                self._queue_out(c, frame)
        self._wake()

    def broadcast_knobs(self, knobs: Knobs) -> int:
        """Push the knobs to every connected client; returns how many took them.  Once one did, clients that
        connect later get them too; knobs no client took are dropped (the caller records a failure)."""
        frame = encode({"type": "knobs", **knobs.as_dict()})
        with self._lock:
            reached = 0
            for c in self._conns.values():
                reached += self._queue_out(c, frame)
            if reached:
                self._knobs_frame = frame
        self._wake()
        return reached

    def send_command(self, cmd: str, args: dict[str, Any]) -> str | None:
        """Ask every connected client to run ``cmd``; the id comes back in their ``command_result``."""
        cid = uuid.uuid4().hex[:12]
        frame = encode({"type": "command", "id": cid, "cmd": cmd, "args": args})
        sent = False
        with self._lock:
            for c in self._conns.values():
                sent = self._queue_out(c, frame) or sent
        if not sent:
            return None
        self._wake()
        return cid

    def clients(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"pid": c.pid, "uid": c.uid, "connected_at": c.connected_at, "conn": c.n} for c in self._conns.values()
            ]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "clients": len(self._conns), "queued": self._queued}

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        with self._lock:
            for c in list(self._conns.values()):
                self._drop_conn(c, event=False)
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(Exception):
                self._sel.unregister(s)
            s.close()
        self._sel.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._own_dir:  # the session may have put its observer socket here too: it is closing as well
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> ChannelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (lock held where noted) ----------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0", _NOSIGNAL)

    def _queue_out(self, c: _Conn, frame: bytes) -> bool:
        """Lock held.  Append a frame to a connection's output; drop and count it when the buffer is full."""
        if c.closed:
            return False
        if len(c.outbuf) + len(frame) > self._out_cap:
            self._counts["out_dropped"] += 1
            return False
        c.outbuf += frame
        return True

    def _share(self) -> int:
        """Lock held.  The queued messages one connection may hold: half the queue split between them."""
        return max(MIN_SHARE, self._queue_messages // (2 * max(1, len(self._conns))))

    def _drop_oldest(self) -> None:
        """Lock held.  The queue is full: the oldest message of the connection holding the most goes."""
        conn = max(self._queues, key=lambda n: len(self._queues[n]))
        q = self._queues[conn]
        _, _, size = q.popleft()
        if not q:
            del self._queues[conn]
        self._queued -= 1
        self._queued_bytes -= size
        self._counts["dropped"] += 1

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
                try:
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        conn: _Conn = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(conn)
                        if mask & selectors.EVENT_WRITE and not conn.closed:
                            with self._lock:
                                self._flush(conn)
                except Exception:  # one bad connection must never stop the server
                    if isinstance(key.data, _Conn):
                        with self._lock:
                            self._drop_conn(key.data)
            served = {key.data.n for key, _ in ready if isinstance(key.data, _Conn)}
            for n in list(self._backlog - served):
                c = self._conns.get(n)
                if c is None:
                    self._backlog.discard(n)
                    continue
                try:
                    self._parse(c)
                except Exception:
                    with self._lock:
                        self._drop_conn(c)
            with self._lock:
                for c in list(self._conns.values()):
                    if c.outbuf and not c.want_write:
                        self._flush(c)

    def _accept(self) -> None:
        for _ in range(64):
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
            with self._lock:
                refusal = peer_refusal(pid, uid, self._my_uid)
                if refusal is not None:
                    self._counts["rejected_peers"] += 1
                    with contextlib.suppress(OSError):  # one frame saying why, never waiting on the peer
                        sock.send(encode({"type": "refused", "reason": refusal}), socket.MSG_DONTWAIT | _NOSIGNAL)
                    sock.close()
                    self._refused.append({"pid": pid, "uid": uid, "reason": refusal})
                    continue
                if len(self._conns) >= self._max_clients:
                    self._counts["refused_full"] += 1
                    sock.close()
                    continue
                sock.setblocking(False)
                self._next_conn += 1
                c = _Conn(sock, self._next_conn, pid, uid)
                self._conns[c.n] = c
                self._counts["connections"] += 1
                self._queue_out(c, encode({"type": "welcome", **self._welcome}))
                if self._knobs_frame is not None:
                    self._queue_out(c, self._knobs_frame)
                self._events.append(
                    (c.connected_at, {"v": VERSION, "type": "client_connect", "pid": pid, "uid": uid, "conn": c.n})
                )
                self._set_interest(c)

    def _read(self, c: _Conn) -> None:
        """Take more bytes only when no complete frame of this connection waits (backpressure), then parse.

        So its input holds at most one incomplete frame (<= max_message_bytes) plus one read."""
        if c.n in self._backlog:
            self._parse(c)
            return
        try:
            data = c.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._parse(c, limit=None)  # what it sent before closing still counts
            with self._lock:
                self._drop_conn(c)
            return
        c.inbuf += data
        self._parse(c)

    def _parse(self, c: _Conn, limit: int | None = MESSAGES_PER_TURN) -> None:
        """Validate up to ``limit`` complete frames; a connection with more waits for its next turn."""
        buf = c.inbuf
        now = time.monotonic()
        good: list[tuple[dict[str, Any], int]] = []
        bad = False
        pos = 0
        while len(buf) - pos >= 4 and (limit is None or len(good) < limit):
            (size,) = HEADER.unpack_from(buf, pos)
            if size > self.max_message_bytes:
                bad = True
                break
            if len(buf) - pos - 4 < size:
                break
            body = bytes(buf[pos + 4 : pos + 4 + size])
            pos += 4 + size
            try:
                msg = validate(body)
            except MessageError:
                bad = True
                break
            if msg["type"] == "requests":
                rows = expand_rows(msg)
                for r in rows:
                    r["pid"], r["conn"] = c.pid, c.n
                    good.append((r, size // max(1, len(rows))))
                continue
            msg["pid"] = c.pid
            msg["conn"] = c.n
            good.append((msg, size))
        del buf[:pos]
        if not bad and len(buf) >= 4 and len(buf) - 4 >= HEADER.unpack_from(buf, 0)[0]:
            self._backlog.add(c.n)  # a complete frame is still waiting
        else:
            self._backlog.discard(c.n)
        with self._lock:
            share = self._share()
            q = self._queues.get(c.n)
            for msg, size in good:
                self._counts["received"] += 1
                if q is None:
                    q = self._queues[c.n] = deque()
                if len(q) >= share:  # over its share of the queue: its own oldest goes, not the others'
                    _, _, old = q.popleft()
                    self._queued -= 1
                    self._queued_bytes -= old
                    self._counts["dropped"] += 1
                q.append((now, msg, size))
                self._queued += 1
                self._queued_bytes += size
                while self._queued > self._queue_messages or self._queued_bytes > self._queue_bytes:
                    self._drop_oldest()
                q = self._queues.get(c.n)  # None if dropping emptied it: made again for the next message
            if bad:
                self._counts["malformed"] += 1
                self._drop_conn(c)

    def _flush(self, c: _Conn) -> None:
        """Lock held.  Write what the socket takes now; watch for writability while anything is left."""
        if c.closed:
            return
        if c.outbuf:
            try:
                n = c.sock.send(c.outbuf, _NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._drop_conn(c)
                return
            del c.outbuf[:n]
        want = bool(c.outbuf)
        if want != c.want_write:
            c.want_write = want
            self._set_interest(c)

    def _set_interest(self, c: _Conn) -> None:
        """Lock held.  Watch ``c`` for reading, and for writing while output waits."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.want_write else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            if not events:
                if c.registered:
                    c.registered = False
                    self._sel.unregister(c.sock)
            elif c.registered:
                self._sel.modify(c.sock, events, c)
            else:
                self._sel.register(c.sock, events, c)
                c.registered = True

    def _drop_conn(self, c: _Conn, *, event: bool = True) -> None:
        """Lock held."""
        if c.closed:
            return
        c.closed = True
        self._conns.pop(c.n, None)
        if c.registered:
            c.registered = False
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(c.sock)
        c.sock.close()
        c.inbuf = bytearray()
        c.outbuf = bytearray()
        self._backlog.discard(c.n)
        if event:
            self._events.append(
                (time.monotonic(), {"v": VERSION, "type": "client_disconnect", "pid": c.pid, "uid": c.uid, "conn": c.n})
            )
