"""The sidecar's end of the channel to ``tuner.client``: a Unix socket, one background thread.

The socket and its connections are ``tuner.link.server``'s (shared with the live feed): a private 0700
directory from ``tempfile.mkdtemp`` unless one is given, a socket born 0600, and every connection's peer
checked with ``SO_PEERCRED``: any uid other than ours is refused — told why in one ``refused`` frame
(``{"type": "refused", "reason": ...}``), then closed, counted (``stats()["rejected_peers"]``) and kept
for ``refusals()`` (the output probe puts them in the trace).

Wire format (both directions, ``tuner.link.wire``): a 4-byte big-endian length, then that many bytes of
UTF-8 JSON holding one object ``{"v": 1, "type": ..., ...}``.  Never pickle.  A frame that is oversized
(``> max_message_bytes``), not JSON, not an object, of another version, of an unknown type or with
fields of the wrong type is dropped and counted (``stats()["malformed"]``), and *that* connection is
closed; everybody else goes on being served.

Client -> sidecar types: ``hello``, ``request``, ``status``, ``oom``, ``alloc``, ``command_result``, ``quality``
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

import json
import os
import socket
import time
import uuid
from collections import deque
from typing import Any

from tuner.link.server import Conn, UnixServer
from tuner.link.wire import VERSION, PeerCred, dumps, frame
from tuner.records import ROW_FIELDS, ROW_IDS, Knobs

MESSAGES_PER_TURN = 64
MAX_CLIENTS = 256
OUT_BUFFER_BYTES = 1 << 20
QUEUE_MESSAGES = 20_000
QUEUE_BYTES = 32 << 20
EVENTS_KEPT = 1024
MIN_SHARE = 16
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
    "alloc": {"allocated_bytes": _OPT_NUM, "reserved_bytes": _OPT_NUM, "heap": _OPT_STR},
    "command_result": {"id": (str,), "cmd": (str,), "ok": (bool,), "result": (dict, type(None)), "error": _OPT_STR},
    # consistency (tuner.quality.probe): a sampled response with its second answer, or a canary round
    "quality": {"kind": (str,), "id": (int, str, type(None)), "prompt": _OPT_STR, "answer": _OPT_STR,
                "second": _OPT_STR, "prompt_chars": (int, type(None)), "answer_chars": (int, type(None)),
                "second_chars": (int, type(None)), "temperature": _OPT_NUM, "precision": _OPT_STR,
                "previous": _OPT_STR, "tag": _OPT_STR, "reference": _LIST, "answers": _LIST},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "hello": ("pid",),
    "request": ("tokens", "created", "end"),
    "requests": ("rows",),
    "status": ("active", "dropped"),
    "oom": (),
    "alloc": (),
    "command_result": ("id", "cmd", "ok"),
    "quality": ("kind",),
}


class MessageError(ValueError):
    """A frame that breaks the protocol (the connection that sent it gets closed)."""


def encode(msg: dict[str, Any]) -> bytes:
    """One frame: length prefix + compact UTF-8 JSON (``v`` added when missing)."""
    return frame(dumps(msg if "v" in msg else {"v": VERSION, **msg}))


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
    if kind == "quality":
        for name in ("reference", "answers"):
            if any(not isinstance(x, str) for x in msg.get(name) or ()):
                raise MessageError(f"quality: {name} must be strings")
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
            _check_ids(row[ROW_IDS])
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


class _Conn(Conn):
    __slots__ = ("outbuf",)

    def __init__(self, sock: socket.socket, n: int, pid: int, uid: int, max_frame: int) -> None:
        super().__init__(sock, n, pid, uid, max_frame)
        self.outbuf = bytearray()  # frames queued by any thread (lock held), not yet taken for sending


class ChannelServer(UnixServer[_Conn]):
    """The Unix-socket server the inference's ``tuner.client`` connects to (path goes in ``TUNER_SOCKET``)."""

    thread_name = "tuner-channel"
    accept_per_turn = 64
    listen_backlog = 64
    messages_per_turn = MESSAGES_PER_TURN

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
        self._queue_messages = queue_messages
        self._queue_bytes = queue_bytes
        self._out_cap = out_buffer_bytes
        self._max_clients = max_clients
        # the inbound queue, one FIFO per connection: (arrival, message, size); drained round-robin
        self._queues: dict[int, deque[tuple[float, dict[str, Any], int]]] = {}
        self._queued = 0
        self._queued_bytes = 0
        self._events: deque[tuple[float, dict[str, Any]]] = deque(maxlen=EVENTS_KEPT)
        self._refused: deque[dict[str, Any]] = deque(maxlen=64)
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
        path = None if directory is None else os.path.join(directory, "channel.sock")
        super().__init__(
            path, dir_prefix="tuner-", sock_name="channel.sock", max_frame=max_message_bytes, peer_cred=peer_cred
        )
        self.directory = os.path.dirname(self.path)

    # -- public API (any thread) --------------------------------------------------------------------
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
            welcome = encode({"type": "welcome", **self._welcome})
            for c in self._conns.values():
                self._queue_out(c, welcome)
        self._wake()

    def broadcast_knobs(self, knobs: Knobs) -> int:
        """Push the knobs to every connected client; returns how many took them.  Once one did, clients that
        connect later get them too; knobs no client took are dropped (the caller records a failure)."""
        knobs_frame = encode({"type": "knobs", **knobs.as_dict()})
        with self._lock:
            reached = 0
            for c in self._conns.values():
                reached += self._queue_out(c, knobs_frame)
            if reached:
                self._knobs_frame = knobs_frame
        self._wake()
        return reached

    def send_command(self, cmd: str, args: dict[str, Any]) -> str | None:
        """Ask every connected client to run ``cmd``; the id comes back in their ``command_result``."""
        cid = uuid.uuid4().hex[:12]
        command = encode({"type": "command", "id": cid, "cmd": cmd, "args": args})
        sent = False
        with self._lock:
            for c in self._conns.values():
                sent = self._queue_out(c, command) or sent
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

    def __enter__(self) -> ChannelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server's hooks (lock held where noted) -------------------------------------------------
    def _admit(self, sock: socket.socket, n: int, pid: int, uid: int) -> _Conn | None:
        """Lock held."""
        if len(self._conns) >= self._max_clients:
            self._counts["refused_full"] += 1
            return None
        c = _Conn(sock, n, pid, uid, self.max_message_bytes)
        self._counts["connections"] += 1
        self._queue_out(c, encode({"type": "welcome", **self._welcome}))
        if self._knobs_frame is not None:
            self._queue_out(c, self._knobs_frame)
        self._events.append(
            (c.connected_at, {"v": VERSION, "type": "client_connect", "pid": pid, "uid": uid, "conn": c.n})
        )
        return c

    def _refusal_frame(self, reason: str) -> bytes:
        return encode({"type": "refused", "reason": reason})

    def _on_refused(self, pid: int, uid: int, reason: str) -> None:
        """Lock held."""
        self._counts["rejected_peers"] += 1
        self._refused.append({"pid": pid, "uid": uid, "reason": reason})

    def _queue_out(self, c: _Conn, data: bytes) -> bool:
        """Lock held.  Append a frame to a connection's output; drop and count it when the buffer is full."""
        if c.closed:
            return False
        if len(c.outbuf) + len(c.pending) + len(data) > self._out_cap:
            self._counts["out_dropped"] += 1
            return False
        c.outbuf += data
        return True

    def _take_out(self, c: _Conn) -> bytearray | None:
        """Lock held."""
        out = c.outbuf
        if not out:
            return None
        c.outbuf = bytearray()
        return out

    def _has_out(self, c: _Conn) -> bool:
        return bool(c.outbuf)

    def _on_drop(self, c: _Conn, event: bool) -> None:
        """Lock held."""
        c.outbuf = bytearray()
        if event:
            self._events.append(
                (time.monotonic(), {"v": VERSION, "type": "client_disconnect", "pid": c.pid, "uid": c.uid, "conn": c.n})
            )

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

    def _on_input(self, c: _Conn, limit: int | None) -> None:
        """Validate frames until ``limit`` messages (a ``requests`` frame counts its rows); the first bad
        frame closes ``c``."""
        now = time.monotonic()
        good: list[tuple[dict[str, Any], int]] = []
        frames = c.frames
        bad = False
        while limit is None or len(good) < limit:
            body = frames.pop()
            if body is None:
                bad = frames.oversized is not None
                break
            size = len(body)
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
        if bad:
            self._drop(c)
