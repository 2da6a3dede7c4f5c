"""The bytes on tuner's Unix sockets: length-prefixed JSON frames and who may send them (stdlib only).

A frame is a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one object; never
pickle.  ``FrameBuffer`` splits a byte stream into frames' bodies and stops for good at a frame declared
larger than its limit (the stream cannot be trusted after it).  ``peer_refusal`` is the one peer rule of
every server: only the user running the tuner may connect, judged on the kernel's ``SO_PEERCRED``.

Used by the channel and the live feed (``tuner.link.channel``, ``tuner.link.observe``) and by
``tuner.client``, which is imported inside users' inference: keep this module to the standard library.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import Any

VERSION = 1
"""The channel protocol's version: the ``v`` of every message between ``tuner.client`` and the sidecar."""
HEADER = struct.Struct(">I")
_unpack = HEADER.unpack_from
_CRED = struct.Struct("3i")

_DUMPS = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_DUMPS_LENIENT = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def dumps(obj: Any, *, lenient: bool = False) -> bytes:
    """A frame's body: compact UTF-8 JSON; NaN and infinities raise ``ValueError`` (JSON has none).
    ``lenient`` writes values JSON does not know as their ``str``; otherwise they raise ``TypeError``."""
    return (_DUMPS_LENIENT if lenient else _DUMPS)(obj).encode()


def frame(body: bytes) -> bytes:
    """Length prefix + ``body``."""
    return HEADER.pack(len(body)) + body


def encode(obj: Any, *, lenient: bool = False) -> bytes:
    """One frame holding ``obj`` (see ``dumps``)."""
    body = dumps(obj, lenient=lenient)
    return HEADER.pack(len(body)) + body


class FrameBuffer:
    """Bytes read from one stream, taken off the front as frames' bodies.

    A frame whose declared length exceeds ``max_size`` ends the split: ``oversized`` then holds that
    length, ``take`` returns nothing more and ``ready`` is False (the caller closes the stream)."""

    __slots__ = ("_buf", "max_size", "oversized")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self.max_size = max_size
        self.oversized: int | None = None

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> None:
        self._buf = bytearray()

    def take(self, limit: int | None = None) -> list[bytes]:
        """The complete frames' bodies at the front, oldest first (at most ``limit``)."""
        buf = self._buf
        end = len(buf)
        bodies: list[bytes] = []
        pos = 0
        if self.oversized is None:
            max_size = self.max_size
            unpack = HEADER.unpack_from
            while end - pos >= 4 and (limit is None or len(bodies) < limit):
                (size,) = unpack(buf, pos)
                if size > max_size:
                    self.oversized = size
                    break
                if end - pos - 4 < size:
                    break
                bodies.append(bytes(buf[pos + 4 : pos + 4 + size]))
                pos += 4 + size
        if pos:
            del buf[:pos]
        return bodies

    def pop(self) -> bytes | None:
        """The body of the complete frame at the front, taken off; None when none is complete."""
        buf = self._buf
        if self.oversized is not None or len(buf) < 4:
            return None
        (size,) = _unpack(buf, 0)
        if size > self.max_size:
            self.oversized = size
            return None
        end = 4 + size
        if len(buf) < end:
            return None
        body = bytes(buf[4:end])
        del buf[:end]
        return body

    def ready(self) -> bool:
        """Whether a complete frame waits (``take`` would return one)."""
        buf = self._buf
        if self.oversized is not None or len(buf) < 4:
            return False
        (size,) = HEADER.unpack_from(buf, 0)
        if size > self.max_size:
            self.oversized = size
            return False
        return len(buf) - 4 >= size

    def next_size(self) -> int | None:
        """The declared length of the next frame once its header is in (None before); sets ``oversized``
        when it exceeds the limit."""
        if len(self._buf) < 4:
            return None
        (size,) = HEADER.unpack_from(self._buf, 0)
        if size > self.max_size:
            self.oversized = size
        return size


# -- who may connect ---------------------------------------------------------------------------------
PeerCred = Callable[[socket.socket], tuple[int, int, int]]


def so_peercred(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of a connected Unix-socket peer, as the kernel recorded them at connect."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid, gid


def peer_refusal(pid: int, uid: int, my_uid: int) -> str | None:
    """Why a peer may not connect (None when it may).  Only the server's own user may talk to it — not
    even root when the server is not root; a peer whose credentials could not be read (uid -1) is refused."""
    if uid == my_uid and uid >= 0:
        return None
    if uid < 0:
        return "the peer's credentials could not be read (SO_PEERCRED): refused"
    return f"process {pid} runs as uid {uid}; only uid {my_uid}, the user running the tuner, may use this channel"


def peer_allowed(uid: int, my_uid: int) -> bool:
    """Only the server's own user may talk to it (not even root, when the server is not root)."""
    return peer_refusal(-1, uid, my_uid) is None
