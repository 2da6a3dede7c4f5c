"""``tuner.client``: the few calls an inference process makes so the sidecar sees its requests.

```python
from tuner import client
c = client.connect()                 # a no-op client when TUNER_SOCKET is unset
with c.request(prompt_tokens=n) as r:
    r.started()                      # optional: decoding began (queue time ends here)
    for ids in decode():
        r.token(ids)                 # an int or a list of ints; ~0.3 us, never blocks
c.poll()                             # between batches: runs commands the sidecar sent (on this thread)
```

Consistency (the sidecar runs with ``--consistency``): a request may come back ``r.sampled``; the loop then makes a
second answer to the same prompt at the same settings (in the same batch: not a request, so it counts in no
latency, throughput or batch statistic) and passes ``r.consistency(answer, second, prompt)`` before the ``with``
ends.  After a precision change the loop answers the canary prompts (``c.canary_prompts``, or its own set) and
passes them with the full-precision answers to ``c.report_canary(reference, answers, precision=...)``.  The texts
go to the sidecar, which scores them in its scorer process; the trace gets scores (texts only with
``--record-text``).

What is timed (``time.monotonic()`` stamps taken in this process; the sidecar turns them into seconds,
``tuner.link.channel.expand_rows``):

- ``queue_seconds`` = ``started()`` - ``request()`` (0 when ``started()`` is never called);
- ``ttft_seconds`` = first ``token()``/``text()`` - ``request()`` (what the user waits, queue included);
- ``tpot_seconds`` = (last token call - first token call) / (tokens - tokens of the first call);
- ``e2e_seconds`` = end of the ``with`` block - ``request()``;
- ``tokens_per_second`` = tokens / (end - ``started()``).

A request whose ``with`` body raises is not reported (it is counted as ``failed``).  The token ids go to
the sidecar (at most 65536 a request, and fewer if the frame would exceed the sidecar's announced
``max_message_bytes``; ``tokens`` is always the full count, repetition is measured on what was sent).

Design — the inference comes first:

- The hot path (``r.token``) touches only the request object: one ``time.monotonic()`` (vDSO, no
  syscall) and a ``list.append``.  No lock, no I/O.  The finished request goes, as one item, onto a
  bounded ``deque``; when it is full the oldest is dropped and counted.
- A daemon sender thread does everything else: connects (and reconnects with back-off when the sidecar
  goes away, so a new sidecar on the same path is picked up), encodes finished requests in batches (one
  ``requests`` frame of up to 256 rows), sends without blocking, receives knobs and commands.  The token
  ids go to the sidecar, which computes the repetition measures there: encoding ids costs this process
  ~0.1 us a token, computing seq-rep-4/rep-32/loop here would cost ~0.7 us a token of its GIL; the
  sender's whole cost is ~0.3 us a token (tests/bench/test_bench_client.py).
- Knobs arrive as a new frozen ``Knobs`` object swapped into ``c.knobs`` (one atomic assignment).
- Commands (``precision``, ``cleanup``) run on the inference's own thread inside ``poll()``; their
  result goes back as ``command_result``.
- Nothing here raises into the caller; after ``os.fork()`` the child gets a fresh, reconnecting client.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import sys
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from random import random as _random
from typing import Any

from tuner import reclaim
from tuner.link.wire import HEADER, VERSION, FrameBuffer, dumps, encode
from tuner.records import PRECISIONS, ROW_IDS, ROW_TEXT, Knobs

__all__ = ["Client", "NullClient", "Request", "connect"]

QUEUE_REQUESTS = 4096
QUEUE_IDS = 1_000_000  # token ids waiting to be sent, at most (~40 MB): the inference's memory is bounded too
CONTROL_KEPT = 256
MAX_IDS = 65536
OUT_BUFFER_BYTES = 4 << 20
POLL_S = 0.05
STATUS_EVERY_S = 1.0
# a change in the requests in flight is sent this soon (at most this often): the batch policy's early backlog rule
# reads ``req_active``, and at 1 s a rate step showed ~1 s late (H4, 2026-12-04: the step up came 2.9-4.8 s after
# the step; every second at the old size adds a queue the larger one must work off)
STATUS_CHANGE_S = 0.2
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
MAX_FRAME = 1 << 20
# the sidecar's welcome (its options, e.g. record_text) is awaited this long on the sender thread, never the
# inference's: on a loaded host 1 s was not enough and the first requests went out without their text
WELCOME_WAIT_S = 5.0
LOOP_MAX_N = 64
ROWS_PER_FRAME = 256
IDS_PER_FRAME = 8192  # one C encode call holds the GIL: keep each well under a millisecond

_monotonic = time.monotonic
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # EPIPE, never SIGPIPE, on a peer that hung up


class Request:
    """One request's timing and tokens.  Use as a context manager from ``Client.request``."""

    __slots__ = (
        "_client",
        "_gen",
        "batch_capacity",
        "batch_size",
        "created",
        "ended",
        "first",
        "id",
        "ids",
        "last",
        "loop_ngrams",
        "n_first",
        "precision",
        "prompt_tokens",
        "quality",
        "sampled",
        "t_started",
        "temperature",
        "texts",
    )

    def __init__(
        self,
        client: Client,
        rid: int,
        prompt_tokens: int | None,
        batch_size: int | None,
        batch_capacity: int | None,
        temperature: float | None,
        precision: str | None,
    ) -> None:
        self._client = client
        self._gen = client._gen
        self.id = rid
        self.prompt_tokens = prompt_tokens
        self.batch_size = batch_size
        self.batch_capacity = batch_capacity
        self.temperature = temperature
        self.precision = precision
        self.ids: list[Any] = []
        self.texts: list[str] = []
        self.first: float | None = None
        self.last = 0.0
        self.n_first = 0
        self.t_started: float | None = None
        self.loop_ngrams = client._loop_ngrams
        self.sampled = client._consistency_rate > 0.0 and client._take_sample()
        """Whether the sidecar measures this request's consistency: make a second answer to its prompt at the
        same settings (in the same batch) and pass both to ``consistency()``.  Decided here, once: one request
        at a random place in each block of 1/rate requests (``Client._take_sample``)."""
        self.quality: tuple[str | None, str, str | None] | None = None
        self.ended = False
        self.created = _monotonic()

    def started(self) -> None:
        """Mark the moment decoding began for this request (ends its queue time)."""
        self.t_started = _monotonic()

    def token(self, ids: Any) -> None:
        """One generated token id, or several (a list, tuple, numpy array or tensor)."""
        now = _monotonic()
        if type(ids) is int:
            self.ids.append(ids)
        else:
            self._many(ids)
        if self.first is None:
            self.first = now
            self.n_first = len(self.ids)
        self.last = now

    def _many(self, ids: Any) -> None:
        try:
            tolist = getattr(ids, "tolist", None)
            if tolist is not None:
                ids = tolist()
            if isinstance(ids, (list, tuple)):
                self.ids.extend(ids)
            else:
                self.ids.append(ids)
        except Exception:
            self.ids.append(0)

    def text(self, chunk: str) -> None:
        """A streamed text chunk (proxy streams): each whitespace-separated word counts as one token, a
        non-empty chunk without any word (``"\\n"``) as one; words are identified by CRC-32 for the
        repetition measures."""
        now = _monotonic()
        if not chunk:
            return
        try:
            words = chunk.split()
            if words:
                self.ids.extend([zlib.crc32(w.encode("utf-8", "replace")) for w in words])
            else:
                self.ids.append(zlib.crc32(chunk.encode("utf-8", "replace")))
            self.texts.append(chunk)  # a reference; sent only if the sidecar records text
        except Exception:
            return
        if self.first is None:
            self.first = now
            self.n_first = len(self.ids)
        self.last = now

    def response_text(self, text: str) -> None:
        """The response as text, kept for the trace when the sidecar records text (``--record-text``; see
        ``Client.record_text``).  Counts no tokens: for a loop that reports token ids with ``token()``."""
        if isinstance(text, str) and text:
            self.texts.append(text)

    def consistency(self, answer: str, second: str | None = None, prompt: str | None = None) -> None:
        """For a ``sampled`` request: its answer, the second answer to the same prompt at the same settings (or
        None), and the prompt (for chat, the last user message; for relevance).  Sent when the request ends, or at
        once when it already has (a second answer that finished after the first); the sidecar scores them in its
        scorer process and records the scores (texts only with ``--record-text``).  Does nothing on a request
        that is not sampled."""
        if self.sampled and isinstance(answer, str) and self.quality is None:
            self.quality = (prompt if isinstance(prompt, str) else None, answer,
                            second if isinstance(second, str) else None)
            c = self._client
            if self.ended and self._gen is c._gen:
                c._control.append(_quality_message(self))
                c._wake.set()

    def __enter__(self) -> Request:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        end = _monotonic()
        c = self._client
        if self._gen is not c._gen:
            return  # begun before a fork, ended in the child: the parent's request, not this process's
        self.ended = True
        if self.quality is not None and exc_type is None:
            c._control.append(_quality_message(self))
        with c._lock:
            c._active -= 1
            if exc_type is not None:
                c._failed += 1
                return
            q = c._queue
            n = len(self.ids)
            if len(q) >= QUEUE_REQUESTS or c._ids_in - c._ids_out + n > QUEUE_IDS:
                c._dropped_hot += 1  # full (the sidecar is slow or gone): drop this one, count it
                return
            c._ids_in += n
            q.append((self, end, n))


class _NullRequest:
    __slots__ = ()
    sampled = False

    def consistency(self, answer: str, second: str | None = None, prompt: str | None = None) -> None:
        pass

    def started(self) -> None:
        pass

    def token(self, ids: Any) -> None:
        pass

    def text(self, chunk: str) -> None:
        pass

    def response_text(self, text: str) -> None:
        pass

    def __enter__(self) -> _NullRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_REQUEST = _NullRequest()


class NullClient:
    """What ``connect()`` returns without a sidecar: every call is accepted and does nothing."""

    connected = False
    record_text = False
    consistency = False
    canary_prompts: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.knobs = Knobs()

    def report_canary(self, reference: Sequence[str], answers: Sequence[str], **_: Any) -> bool:
        return False

    def request(self, prompt_tokens: int | None = None, **_: Any) -> Any:
        return _NULL_REQUEST

    def on_precision(self, fn: Callable[[str], dict[str, Any]]) -> None:
        pass

    def on_cleanup(self, fn: Callable[[list[str]], dict[str, Any]]) -> None:
        pass

    def register_cache(self, obj: object) -> None:
        pass

    def set_loop_ngrams(self, min_n: int, max_n: int) -> None:
        pass

    def report_oom(self, batch_size: int | None = None) -> None:
        pass

    def report_memory(self, allocated_bytes: int | None, reserved_bytes: int | None, heap: str | None = None) -> None:
        pass

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass


_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class Client:
    """Talks to the sidecar at ``path``; keeps working (as a no-op) whenever the sidecar is not there."""

    def __init__(self, path: str, *, start: bool = True) -> None:
        self.path = path
        self.knobs = Knobs()
        self._precision_fn: Callable[[str], dict[str, Any]] | None = None
        self._cleanup_fn: Callable[[list[str]], dict[str, Any]] | None = None
        self._caches: list[object] = []
        self._closing = False
        self._close_by = 0.0  # close()'s deadline (monotonic)
        self.refused: str | None = None
        """Why the sidecar refused this process (it runs as another user), or None."""
        self._start = start
        self._last_alloc = 0.0
        self._loop_ngrams: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._init_state()
        _clients.add(self)
        if start:
            self._thread = threading.Thread(target=self._sender, name="tuner-client", daemon=True)
            self._thread.start()

    def _init_state(self) -> None:
        """Everything the sender thread owns or shares; rebuilt in a forked child."""
        # Request bookkeeping shared by the inference threads and the sender: ``_active``/``_failed``/
        # ``_dropped_hot``/``_ids_in`` and the queue append change together under ``_lock`` (the status the
        # sender snapshots under it is consistent, and no count is lost whatever the interpreter's thread
        # switching); starting the sender is under it too (two threads' first request() after a fork
        # started two senders on one socket).  ``_gen`` is new in a forked child: a request begun before
        # the fork and ended after it is the parent's and leaves the child's counts alone (it made them -1).
        self._lock = threading.Lock()
        self._gen = object()
        self._queue: deque[tuple[Request, float, int]] = deque()  # bounded in Request.__exit__
        # single-writer counters (no lost updates between threads): *_in/_hot by the inference thread,
        # *_out and _dropped by the sender thread
        self._ids_in = 0
        self._ids_out = 0
        self._dropped_hot = 0
        self._control: deque[dict[str, Any]] = deque(maxlen=CONTROL_KEPT)
        self._commands: deque[dict[str, Any]] = deque(maxlen=CONTROL_KEPT)
        self._ids = iter(range(1, 1 << 62)).__next__
        self._active = 0
        self._failed = 0
        self._dropped = 0
        self._sent = 0
        self._record_text = False
        self._consistency_rate = 0.0
        self._sample_lock = threading.Lock()
        self._sample_n = 0  # requests counted since the rate was set
        self._sample_block = 0.0  # where the current block of 1/rate requests starts
        self._sample_at = 0.0  # the request count at which the block's sample is taken
        self._canary: tuple[str, ...] = ()
        self._max_message = MAX_FRAME
        self._backoff = BACKOFF_MIN_S
        self._sock: socket.socket | None = None
        self._wake = threading.Event()
        self._thread = None
        self._pid = os.getpid()

    def _set_consistency_rate(self, rate: float) -> None:
        with self._sample_lock:
            self._consistency_rate = rate
            self._sample_n, self._sample_block = 0, 0.0
            self._sample_at = (1.0 - _random()) / rate if rate > 0 else 0.0

    def _take_sample(self) -> bool:
        """Stratified sampling: one request in each block of 1/rate, at a uniformly random place in it.  The
        share sampled is the rate over any stretch of requests (+- one), where a coin per request gave 3 to 12 second
        answers in 400 requests at 2% (the cost of measuring swung with that luck), and no fixed period of the
        traffic can line up with the samples as a fixed stride could."""
        with self._sample_lock:
            rate = self._consistency_rate
            if rate <= 0.0:
                return False
            self._sample_n += 1
            if self._sample_n < self._sample_at:
                return False
            self._sample_block += 1.0 / rate
            self._sample_at = self._sample_block + (1.0 - _random()) / rate
            return True

    # -- the inference thread ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def record_text(self) -> bool:
        """Whether the sidecar records response text (``--record-text``): worth decoding ids to text only then."""
        return self._record_text

    @property
    def consistency(self) -> bool:
        """Whether the sidecar measures consistency (``--consistency``): requests may come back ``sampled``, and
        canary rounds (``report_canary``) are scored."""
        return self._consistency_rate > 0.0

    @property
    def canary_prompts(self) -> tuple[str, ...]:
        """The canary prompts the sidecar was given (``--canary FILE``); empty: use the loop's own set."""
        return self._canary

    def report_canary(self, reference: Sequence[str], answers: Sequence[str], *, precision: str | None = None,
                      previous: str | None = None, temperature: float | None = None, tag: str | None = None) -> bool:
        """A canary round: the reference answers (full precision) and the answers after a knob change, prompt by
        prompt.  Sent only to a sidecar that measures consistency (returns whether it was queued)."""
        if not self.consistency:
            return False
        ref = [_cap(str(x)) for x in reference]
        new = [_cap(str(x)) for x in answers]
        self._control.append({"type": "quality", "kind": "canary", "reference": ref, "answers": new,
                              "precision": precision if isinstance(precision, str) else None,
                              "previous": previous if isinstance(previous, str) else None,
                              "temperature": _opt_float(temperature), "tag": str(tag) if tag is not None else None})
        self._wake.set()
        return True

    @property
    def dropped(self) -> int:
        """Finished requests that never reached a sidecar (queue full, sidecar absent or too slow)."""
        return self._dropped + self._dropped_hot

    def request(
        self,
        prompt_tokens: int | None = None,
        *,
        batch_size: int | None = None,
        batch_capacity: int | None = None,
        temperature: float | None = None,
        precision: str | None = None,
    ) -> Request:
        """Start timing a request.  ``batch_size``: sequences in the batch it runs in; ``batch_capacity``:
        the batch size limit in force (default the ``batch_size`` knob); temperature/precision default to
        the knobs."""
        if self._thread is None and self._start and not self._closing:
            self._restart_thread()
        k = self.knobs
        with self._lock:
            self._active += 1
        return Request(
            self,
            self._ids(),
            prompt_tokens,
            batch_size,
            batch_capacity if batch_capacity is not None else k.batch_size,
            temperature if temperature is not None else k.temperature,
            precision if precision is not None else k.precision,
        )

    def on_precision(self, fn: Callable[[str], dict[str, Any]]) -> None:
        """``fn(precision) -> dict`` switches the model; raise to refuse (the reason is ``str(exc)``)."""
        self._precision_fn = fn

    def on_cleanup(self, fn: Callable[[list[str]], dict[str, Any]]) -> None:
        """``fn(steps) -> dict`` replaces the default cleanup (``tuner.reclaim.run_cleanup``)."""
        self._cleanup_fn = fn

    def set_loop_ngrams(self, min_n: int, max_n: int) -> None:
        """The n-gram lengths the sidecar's loop detector looks at for this process's responses (default
        1..8, right for word-piece tokens).  A byte-level tokenizer wants longer ones, e.g. 4..40, or
        ``"   "`` already counts as a loop."""
        if 1 <= min_n <= max_n <= LOOP_MAX_N:
            self._loop_ngrams = (int(min_n), int(max_n))

    def register_cache(self, obj: object) -> None:
        """A cache (``obj.clear()``) the cleanup policy may empty.  Held by a strong reference."""
        self._caches.append(obj)

    def report_oom(self, batch_size: int | None = None) -> None:
        self._control.append({"type": "oom", "batch_size": _opt_int(batch_size)})

    def report_memory(self, allocated_bytes: int | None, reserved_bytes: int | None, heap: str | None = None) -> None:
        """The framework allocator's figures.  ``heap`` says whose they are: ``"host"`` for the process's C heap
        (glibc ``mallinfo2``: its free bytes are part of the RSS), ``"cuda"`` for a device's caching allocator,
        ``None`` when unknown."""
        self._control.append(
            {
                "type": "alloc",
                "allocated_bytes": _opt_int(allocated_bytes),
                "reserved_bytes": _opt_int(reserved_bytes),
                "heap": heap,
            }
        )

    def poll(self) -> None:
        """Run pending commands on this thread; report the framework allocator (CUDA) at most once a second."""
        if self._commands:
            self._run_commands()
        if "torch" in sys.modules:
            now = _monotonic()
            if now - self._last_alloc >= 1.0:
                self._last_alloc = now
                self._report_torch_memory()

    def close(self, timeout: float = 1.0) -> None:
        """Send what is queued (for up to ``timeout`` s) and disconnect."""
        if self._closing:
            return
        self._close_by = _monotonic() + timeout
        self._closing = True
        t = self._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            self._wake.set()
            t.join(timeout)
        with contextlib.suppress(Exception):
            if self._sock is not None:
                # read what the sidecar sent and we did not (a late welcome): a Unix socket closed with
                # unread input resets the peer, which could then lose the last frames we sent it
                self._sock.setblocking(False)
                with contextlib.suppress(OSError):
                    while self._sock.recv(65536):
                        pass
                self._sock.close()
        self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands (inference thread) ------------------------------------------------------------------
    def _run_commands(self) -> None:
        while self._commands:
            try:
                msg = self._commands.popleft()
            except IndexError:
                return
            cmd = str(msg.get("cmd"))
            raw = msg.get("args")
            args: dict[str, Any] = raw if isinstance(raw, dict) else {}
            ok, result, error = False, None, None
            try:
                if cmd == "precision":
                    result, error = self._do_precision(args)
                elif cmd == "cleanup":
                    result, error = self._do_cleanup(args)
                else:
                    error = f"unknown command {cmd!r}"
                ok = error is None
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            if result is not None and not isinstance(result, dict):
                result = {"value": repr(result)}
            self._control.append(
                {
                    "type": "command_result",
                    "id": str(msg.get("id")),
                    "cmd": cmd,
                    "ok": ok,
                    "result": _jsonable(result) if result is not None else None,
                    "error": error,
                }
            )
            self._wake.set()

    def _do_precision(self, args: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        precision = args.get("precision")
        if precision not in PRECISIONS:
            return None, f"unknown precision {precision!r} (use one of {', '.join(PRECISIONS)})"
        if self._precision_fn is None:
            return None, "no precision handler registered (c.on_precision)"
        result = self._precision_fn(precision)
        self.knobs = _replace_knobs(self.knobs, precision=precision)
        return (result if isinstance(result, dict) else {}), None

    def _do_cleanup(self, args: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """The cleanup's result, and an error when no step could run (every one skipped: nothing was freed
        on purpose, so the sidecar records ``refused``, not ``done``)."""
        raw = args.get("steps")
        steps = [str(s) for s in raw] if isinstance(raw, list) else list(reclaim.STEPS)
        if self._cleanup_fn is not None:
            out = self._cleanup_fn(steps)
            result = out if isinstance(out, dict) else {}
        else:
            result = default_cleanup(steps, self._caches)
        done = result.get("steps")
        if isinstance(done, list) and done and all(isinstance(d, dict) and d.get("skipped") for d in done):
            why = "; ".join(f"{d.get('step')}: {d.get('skipped')}" for d in done)
            return result, f"no cleanup step could run ({why})"
        return result, None

    def _report_torch_memory(self) -> None:
        try:
            torch = sys.modules["torch"]
            cuda = torch.cuda
            if cuda.is_available() and cuda.is_initialized():
                self.report_memory(int(cuda.memory_allocated()), int(cuda.memory_reserved()), heap="cuda")
        except Exception:
            pass

    # -- fork ------------------------------------------------------------------------------------------
    def _after_fork_in_child(self) -> None:
        sock = self._sock
        self._init_state()  # new queues, no socket, no thread: started again by the next request()
        if sock is not None:
            with contextlib.suppress(Exception):
                os.close(sock.detach())  # the parent's connection stays the parent's: no shutdown() here

    def _restart_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return  # another inference thread got here first: one sender per client
            self._thread = threading.Thread(target=self._sender, name="tuner-client", daemon=True)
            self._thread.start()

    # -- the sender thread -----------------------------------------------------------------------------
    def _sender(self) -> None:
        self._backoff = BACKOFF_MIN_S
        next_try = 0.0
        while True:
            try:
                if self._sock is None:
                    if self._closing:
                        return
                    now = _monotonic()
                    if now >= next_try:
                        next_try = now + self._backoff  # reset only once a sidecar has welcomed us
                        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                        if self._connect():
                            continue
                    self._discard_queued()
                    self._wake.wait(min(POLL_S * 2, max(0.0, next_try - _monotonic())))
                    self._wake.clear()
                    continue
                if not self._serve():
                    return
            except Exception:  # the client must outlive anything: drop the connection and retry
                self._disconnect()

    def _connect(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._in = FrameBuffer(MAX_FRAME)
        try:
            s.settimeout(1.0)
            s.connect(self.path)
            self._await_welcome(s, _monotonic() + WELCOME_WAIT_S)
            s.setblocking(False)
        except OSError:
            s.close()
            return False
        self._sock = s
        hello = {"type": "hello", "pid": os.getpid(), "client": "tuner.client", "python": sys.version.split()[0]}
        self._out = bytearray(_frame(hello))
        return True

    def _await_welcome(self, s: socket.socket, deadline: float) -> None:
        """The sidecar greets first (options such as ``record_text``): read that before sending anything."""
        while not self._in.ready() and self._in.oversized is None:
            # close() shortens the wait to its own timeout (less a margin to send what is queued)
            left = (min(deadline, self._close_by - 0.25) if self._closing else deadline) - _monotonic()
            if left <= 0:
                return  # an older sidecar that does not greet, or close()'s time is up: go on without
            s.settimeout(min(left, POLL_S))
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionResetError("sidecar closed the channel")
            self._in.feed(data)
        self._parse()

    def _disconnect(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            with contextlib.suppress(Exception):
                s.close()

    def _discard_queued(self) -> None:
        """No sidecar: what was queued cannot be delivered; count it as dropped."""
        n = len(self._queue)
        for _ in range(n):
            try:
                _, _, k = self._queue.popleft()
            except IndexError:
                break
            self._ids_out += k
            self._dropped += 1
        self._control.clear()

    def _serve(self) -> bool:
        """One connected session; returns False when the client is closing (after a last flush)."""
        sock = self._sock
        assert sock is not None
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        last_status = 0.0
        last_active = -1
        try:
            while self._sock is sock:
                closing = self._closing
                self._fill_out()
                now = _monotonic()
                since = now - last_status
                if since >= STATUS_EVERY_S or closing or (since >= STATUS_CHANGE_S and self._active != last_active):
                    last_status = now
                    with self._lock:
                        active, failed, dropped_hot = self._active, self._failed, self._dropped_hot
                    last_active = active
                    self._put(
                        {
                            "type": "status",
                            "active": active,
                            "dropped": self._dropped + dropped_hot,
                            "failed": failed,
                            "sent": self._sent,
                        }
                    )
                if self._out:
                    try:
                        n = sock.send(self._out, _NOSIGNAL)
                        del self._out[:n]
                    except (BlockingIOError, InterruptedError):
                        pass
                if closing:
                    deadline = _monotonic() + 1.0
                    while (self._out or self._queue) and _monotonic() < deadline:
                        self._fill_out()
                        sock.setblocking(True)
                        sock.settimeout(max(0.01, deadline - _monotonic()))
                        n = sock.send(self._out, _NOSIGNAL)
                        del self._out[:n]
                    return False
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
                sel.modify(sock, events)
                for _key, mask in sel.select(POLL_S):
                    if mask & selectors.EVENT_READ:
                        try:
                            data = sock.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        if not data:
                            raise ConnectionResetError("sidecar closed the channel")
                        self._in.feed(data)
                        self._parse()
        finally:
            sel.close()
        return True

    def _put(self, msg: dict[str, Any]) -> bool:
        try:
            frame = _frame(msg)
        except (TypeError, ValueError):  # NaN/inf or an unencodable value from a handler: drop, count
            return False
        if len(frame) - 4 > self._max_message or len(self._out) + len(frame) > OUT_BUFFER_BYTES:
            return False
        self._out += frame
        return True

    def _fill_out(self) -> None:
        while self._control and len(self._out) < OUT_BUFFER_BYTES:
            msg = self._control.popleft()
            self._put(msg)
        q = self._queue
        while q and len(self._out) < OUT_BUFFER_BYTES:
            rows: list[list[Any]] = []
            ids = 0
            while q and len(rows) < ROWS_PER_FRAME and ids < IDS_PER_FRAME:
                try:
                    req, end, k = q.popleft()
                except IndexError:
                    break
                self._ids_out += k
                rows.append(self._row(req, end))
                ids += k
            sent = self._put_rows(rows)
            self._sent += sent
            self._dropped += len(rows) - sent
            time.sleep(0)  # hand the GIL back to the inference between batches (no convoy behind us)

    def _row(self, r: Request, end: float) -> list[Any]:
        """One finished request as a ``requests`` row (``tuner.records.ROW_FIELDS`` order): raw monotonic
        stamps; the sidecar derives queue/TTFT/TPOT/e2e from them with the formulas in this module's doc."""
        ids = r.ids
        n = len(ids)
        ng = r.loop_ngrams
        return [
            r.id,
            _opt_int(r.prompt_tokens),
            n,
            r.created,
            r.t_started,
            r.first,
            r.last if r.first is not None else None,
            r.n_first,
            end,
            ids[:MAX_IDS] if n > MAX_IDS else ids,
            _opt_int(r.batch_size),
            _opt_int(r.batch_capacity),
            _opt_float(r.temperature),
            r.precision if isinstance(r.precision, str) else None,
            ng[0] if ng else None,
            ng[1] if ng else None,
            "".join(r.texts)[:200_000] if self._record_text and r.texts else None,
        ]

    def _put_rows(self, rows: list[list[Any]]) -> int:
        """Frame rows as one ``requests`` message (split when over the sidecar's limit); returns rows sent."""
        if not rows:
            return 0
        msg = {"v": VERSION, "type": "requests", "rows": rows}
        try:
            body = dumps(msg)
        except TypeError:  # numpy / torch scalars among the ids
            for row in rows:
                row[ROW_IDS] = _int_ids(row[ROW_IDS])
            try:
                body = dumps(msg)
            except (TypeError, ValueError):
                return 0
        except ValueError:
            return 0
        if len(body) > self._max_message:
            if len(rows) > 1:
                half = len(rows) // 2
                return self._put_rows(rows[:half]) + self._put_rows(rows[half:])
            row = list(rows[0])
            if row[ROW_TEXT] is not None:
                row[ROW_TEXT] = None
            elif row[ROW_IDS]:
                row[ROW_IDS] = row[ROW_IDS][: len(row[ROW_IDS]) // 2]
            else:
                return 0
            return self._put_rows([row])
        if len(self._out) + len(body) + 4 > OUT_BUFFER_BYTES:
            return 0
        self._out += HEADER.pack(len(body))
        self._out += body
        return len(rows)

    def _parse(self) -> None:
        frames = self._in
        for body in frames.take():
            try:
                msg = json.loads(body)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("v") == VERSION:
                self._handle(msg)
        if frames.oversized is not None:
            raise ConnectionResetError("oversized frame from the sidecar")

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "knobs":
            self.knobs = _knobs_from(msg, self.knobs)
        elif kind == "command":
            self._commands.append(msg)
        elif kind == "refused":  # another user's sidecar: it said why; keep trying (backing off), quietly
            reason = msg.get("reason")
            self.refused = str(reason)[:500] if reason is not None else "refused"
            raise ConnectionRefusedError(self.refused)
        elif kind == "welcome":
            self.refused = None
            self._backoff = BACKOFF_MIN_S
            self._record_text = bool(msg.get("record_text", False))
            rate = _opt_float(msg.get("consistency_rate"))
            self._set_consistency_rate(min(1.0, rate) if rate is not None and rate > 0 else 0.0)
            canary = msg.get("canary")
            if isinstance(canary, list) and all(isinstance(p, str) for p in canary):
                self._canary = tuple(canary)
            limit = msg.get("max_message_bytes")
            if type(limit) is int and limit >= 1024:
                self._max_message = limit


# -- helpers ------------------------------------------------------------------------------------------
def _frame(msg: dict[str, Any]) -> bytes:
    """A message to the sidecar, framed; a value JSON does not know (a handler's result) goes as its str."""
    return encode({"v": VERSION, **msg}, lenient=True)


TEXT_SENT = 20_001
"""Characters of a text sent for consistency at most (one more than the scorer reads: a longer text is reported
with its length, ``<field>_chars``, and scored None with the reason)."""


def _cap(text: str) -> str:
    return text if len(text) <= TEXT_SENT else text[:TEXT_SENT]


def _quality_message(r: Request) -> dict[str, Any]:
    assert r.quality is not None
    prompt, answer, second = r.quality
    msg: dict[str, Any] = {"type": "quality", "kind": "self", "id": r.id, "answer": _cap(answer),
                           "answer_chars": len(answer), "temperature": _opt_float(r.temperature),
                           "precision": r.precision if isinstance(r.precision, str) else None}
    if prompt is not None:
        msg.update(prompt=_cap(prompt), prompt_chars=len(prompt))
    if second is not None:
        msg.update(second=_cap(second), second_chars=len(second))
    return msg


def _opt_int(x: Any) -> int | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        return int(x)
    except (TypeError, ValueError, OverflowError):
        return None


def _opt_float(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def _int_ids(ids: list[Any]) -> list[int]:
    out: list[int] = []
    for x in ids:
        if type(x) is int:
            out.append(x)
        else:
            try:
                out.append(int(x))
            except (TypeError, ValueError, OverflowError):
                out.append(hash(x) & 0x7FFFFFFF)
    return out


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str, allow_nan=False))
    except (TypeError, ValueError):
        return {"value": repr(obj)}


def _replace_knobs(k: Knobs, **changes: Any) -> Knobs:
    d = k.as_dict()
    d.update(changes)
    return Knobs(**d)


def _knobs_from(msg: dict[str, Any], old: Knobs) -> Knobs:
    """A knobs message -> a new ``Knobs``; a value of the wrong type keeps the old one."""
    t = _opt_float(msg.get("temperature"))
    rp = _opt_float(msg.get("repetition_penalty"))
    bs = msg.get("batch_size")
    p = msg.get("precision")
    return Knobs(
        temperature=t if t is None or t >= 0 else old.temperature,
        repetition_penalty=rp if rp is None or rp > 0 else old.repetition_penalty,
        batch_size=bs if bs is None or (type(bs) is int and bs >= 1) else old.batch_size,
        precision=p if p is None or p in PRECISIONS else old.precision,
    )


def default_cleanup(steps: Sequence[str], caches: Sequence[object]) -> dict[str, Any]:
    """What a ``cleanup`` command runs without an ``on_cleanup`` handler: ``tuner.reclaim.run_cleanup``."""
    return reclaim.run_cleanup(list(steps), list(caches))


# -- the process-wide client ------------------------------------------------------------------------
_default: Client | None = None
_default_lock = threading.Lock()


def connect(path: str | None = None) -> Client | NullClient:
    """The process's client for ``path`` (default ``$TUNER_SOCKET``); a ``NullClient`` when there is none.

    A client whose sidecar is absent still works (every call is cheap and does nothing useful) and keeps
    trying to connect in the background, so a sidecar started later, or restarted, is picked up.
    """
    global _default
    path = path or os.environ.get("TUNER_SOCKET")
    if not path:
        return NullClient()
    with _default_lock:
        if _default is not None and _default.path == path and not _default._closing:
            return _default
        try:
            _default = Client(path)
        except Exception:
            return NullClient()
        return _default


def _after_fork() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    for c in list(_clients):
        with contextlib.suppress(Exception):
            c._after_fork_in_child()


def _at_exit() -> None:
    for c in list(_clients):
        with contextlib.suppress(Exception):
            if c._pid == os.getpid():
                c.close(timeout=1.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
import atexit  # noqa: E402

atexit.register(_at_exit)
