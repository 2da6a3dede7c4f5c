"""The output probe: what ``tuner.client`` reports from inside the inference process.

Each ``sample(now)`` drains the channel and turns client messages into trace events — ``request``
(one per finished request, at its end, in trace time), ``client_connect`` / ``client_disconnect``,
``oom``, ``command_result`` — and rolling values over the last ``window_s`` seconds of finished
requests.  Repetition (seq-rep-4, rep-32, loop, distinct-2; definitions in ``probes.repetition``) is
computed here, in the sidecar, from the token ids the client sends.

Clients send ``time.monotonic()`` stamps; on Linux that clock is system-wide (``CLOCK_MONOTONIC``), so
a request's end maps to trace time as ``end - t0``.

Rolling values (``None`` when the window holds no data):

- ``req_ttft_p50/p95_seconds``, ``req_tpot_p50/p95_seconds``, ``req_e2e_p50_seconds``,
  ``req_queue_p50_seconds``: percentiles (linear interpolation) over requests that ended in the window;
- ``req_tokens_per_second``, ``req_requests_per_second``: generated tokens and finished requests in the
  window / the window's length (shorter at the start of a session: the time since the first client);
- ``req_done_total``: finished requests so far; ``req_active``: requests in flight, summed over the
  connected clients (their last status, sent every second);
- ``req_batch_occupancy_ratio``: mean of ``batch_size / batch_capacity`` over requests that report both;
- ``req_seq_rep_4_ratio``, ``req_rep_32_ratio``: means over responses in the window;
  ``req_loop_ratio``: share of them with a loop; ``req_distinct_2_ratio``: distinct-2 over the last
  ``distinct_last`` responses;
- ``chan_clients``; ``chan_dropped_total``: messages lost so far — client-side drops (bounded
  queues) + messages the sidecar refused as malformed + its inbound queue overflowing;
- ``alloc_allocated_bytes``, ``alloc_reserved_bytes``: the last allocator figures a client reported;
  ``alloc_host_free_bytes``: reserved - allocated when those figures are the host C heap's (the client said
  ``heap="host"``: free bytes inside glibc's arenas, resident or not, part of the process's address space),
  None for a device allocator or when the client did not say.

Notes (``take_notes()``, written to the trace by the sampler and listed by ``tuner report``): a peer the
channel refused (another user: who and why), and messages lost — when ``chan_dropped_total`` grew, at
most once every ``DROP_NOTE_EVERY_S`` of trace time, with the count split by cause.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tuner.probes.repetition import Distinct2, response_repetition
from tuner.records import Event, Sample

METRICS: dict[str, str] = {
    "req_ttft_p50_seconds": "seconds",
    "req_ttft_p95_seconds": "seconds",
    "req_tpot_p50_seconds": "seconds",
    "req_tpot_p95_seconds": "seconds",
    "req_e2e_p50_seconds": "seconds",
    "req_queue_p50_seconds": "seconds",
    "req_tokens_per_second": "per_second",
    "req_requests_per_second": "per_second",
    "req_done_total": "count",
    "req_active": "count",
    "req_batch_occupancy_ratio": "ratio",
    "req_seq_rep_4_ratio": "ratio",
    "req_rep_32_ratio": "ratio",
    "req_loop_ratio": "ratio",
    "req_distinct_2_ratio": "ratio",
    "chan_clients": "count",
    "chan_dropped_total": "count",
    "alloc_allocated_bytes": "bytes",
    "alloc_reserved_bytes": "bytes",
    "alloc_host_free_bytes": "bytes",
}

PASSED_ON: tuple[str, ...] = ("aborted", "answer_ttft_seconds", "operation", "model", "stream", "engine",
                              "chunk_gaps")
"""Request fields kept as the client sent them: ``aborted`` (``client`` / ``upstream``: a stream cut short, its
tokens those generated until then), ``answer_ttft_seconds`` (a reasoning model's first answer token); from
``tuner proxy``, for the OpenTelemetry GenAI metrics: ``operation`` (``chat`` / ``text_completion``),
``model`` (as the client asked), ``stream``, ``engine`` (behind the proxy), ``chunk_gaps`` (``{"counts",
"sum"}``: the times between output chunks in ``tuner.records.GENAI_DURATION_BUCKETS``)."""
WINDOW_KEEP = 20_000  # rolling values over the latest 20k requests at most: each sample sorts the window
DROP_NOTE_EVERY_S = 5.0
MAX_MESSAGES_PER_SECOND = 5_000  # what one sample takes from the channel, at most, per second since the last
MIN_MESSAGES_PER_SAMPLE = 500
MAX_SPAN_S = 0.25  # a late sample does not take a bigger batch (that would make the next one later still)
REFUSAL_NOTES_PER_TICK = 5
LOOP_MAX_N = 64  # finished requests kept for the rolling window, at most


class Channel(Protocol):
    def drain(self) -> list[tuple[float, dict[str, Any]]]: ...
    # optional: ``refusals() -> [{"pid", "uid", "reason"}]`` (``tuner.channel.ChannelServer``)
    def clients(self) -> list[dict[str, Any]]: ...
    def stats(self) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class _Done:
    t: float
    tokens: int
    ttft: float | None
    tpot: float | None
    e2e: float | None
    queue: float | None
    seq_rep_4: float | None
    rep_32: float | None
    loop: bool
    occupancy: float | None


def _takes_max_messages(channel: Any) -> bool:
    import inspect

    try:
        return "max_messages" in inspect.signature(channel.drain).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default) of an already sorted list."""
    n = len(sorted_values)
    if n == 0:
        return None
    pos = (n - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    f = float(x)
    return f if math.isfinite(f) else None


class OutputProbe:
    name = "output"
    per_batch = True
    """At fast rates the sampler reads this probe once a batch (100 ms), not at every tick: its values are
    statistics over windows of seconds and its events carry the client's own timestamps."""

    def __init__(
        self,
        channel: Channel,
        *,
        t0: float,
        window_s: float = 30.0,
        record_text: bool = False,
        distinct_last: int = 100,
        loop_min_n: int = 1,
        loop_max_n: int = 8,
        quality: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.channel = channel
        self.t0 = t0
        self.window_s = window_s
        self.record_text = record_text
        self.loop_min_n = loop_min_n
        self.loop_max_n = loop_max_n
        self._quality = quality
        """Where ``quality`` messages (texts for the consistency scorer) go: ``tuner.quality.probe``; dropped
        when None (the sidecar does not measure consistency)."""
        self._done: deque[_Done] = deque(maxlen=WINDOW_KEEP)
        self._distinct = Distinct2(distinct_last)
        self._done_count = 0
        self._stats_key: tuple[int, int, int] = (-1, -1, -1)
        self._stats: dict[str, float | None] = {}
        self._stats_tokens = 0
        self._first_t: float | None = None
        self._status: dict[int, dict[str, Any]] = {}  # conn -> last status
        self._dropped_gone = 0  # client-side drops of clients that have disconnected
        self._alloc: dict[str, float | None] = {
            "alloc_allocated_bytes": None,
            "alloc_reserved_bytes": None,
            "alloc_host_free_bytes": None,
        }
        self._notes: list[tuple[str, str]] = []
        self._lost: dict[str, int] = {}
        self._lost_noted = 0
        self._lost_note_t = -math.inf
        self._refusals = getattr(channel, "refusals", None)
        self._bounded_drain = _takes_max_messages(channel)
        self._last_sample: float | None = None
        self._final = False
        set_welcome = getattr(channel, "set_welcome", None)
        if set_welcome is not None:
            set_welcome(record_text=record_text)

    def available(self) -> str | None:
        return None

    def metrics(self) -> dict[str, str]:
        return dict(METRICS)

    def close(self) -> None:
        pass

    # -- one tick -----------------------------------------------------------------------------------
    def sample(self, now: float) -> Sample:
        """A flood cannot stall the sampler: one sample handles at most ``MAX_MESSAGES_PER_SECOND`` times the
        time since the previous one; the rest waits in the channel's bounded (and fair) queue."""
        events: list[Event] = []
        if self._bounded_drain and not self._final:
            since = 0.1 if self._last_sample is None else min(MAX_SPAN_S, max(0.0, now - self._last_sample))
            cap = max(MIN_MESSAGES_PER_SAMPLE, int(MAX_MESSAGES_PER_SECOND * since))
            drained = self.channel.drain(max_messages=cap)  # type: ignore[call-arg]
        else:
            drained = self.channel.drain()
        self._last_sample = now
        for arrived, msg in drained:
            try:
                ev = self._handle(arrived - self.t0, msg)
            except Exception:  # a message the validator let through but we cannot use: skip it
                ev = None
            if ev is not None:
                events.append(ev)
        values = self._values(now)
        self._note_refusals()
        self._note_drops(now, values.get("chan_dropped_total"))
        return Sample(self.name, now, values, events=tuple(events))

    def finishing(self) -> None:
        """The session is ending: the next sample takes everything the channel still holds."""
        self._final = True

    def take_notes(self) -> list[tuple[str, str]]:
        """Notes for the trace since the last call: ``[(message, level)]``."""
        out, self._notes = self._notes, []
        return out

    def _note_refusals(self) -> None:
        if self._refusals is None:
            return
        try:
            refused = list(self._refusals())
        except Exception:
            return
        for r in refused[:REFUSAL_NOTES_PER_TICK]:
            self._notes.append((f"channel refused a connection: {r.get('reason')}", "warn"))
        if len(refused) > REFUSAL_NOTES_PER_TICK:
            self._notes.append((f"channel refused {len(refused) - REFUSAL_NOTES_PER_TICK} more connections", "warn"))

    def _note_drops(self, now: float, total: float | None) -> None:
        if total is None or total <= self._lost_noted or now - self._lost_note_t < DROP_NOTE_EVERY_S:
            return
        n = int(total)
        parts = ", ".join(
            f"{label} {self._lost[key]}"
            for key, label in (
                ("queue", "sidecar queue full"),
                ("malformed", "malformed frames"),
                ("client", "inference-side queues full or sidecar unreachable"),
            )
            if self._lost.get(key)
        )
        full = self._lost.get("refused_full", 0)
        extra = f"; {full} connections refused (too many clients)" if full else ""
        self._notes.append(
            (f"channel: {n} messages lost so far (+{n - self._lost_noted}): {parts or 'unknown cause'}{extra}", "warn")
        )
        self._lost_noted = n
        self._lost_note_t = now

    def _handle(self, t_arrived: float, msg: dict[str, Any]) -> Event | None:
        kind = msg.get("type")
        pid = msg.get("pid")
        if kind == "request":
            return self._request(msg)
        if kind == "status":
            self._status[int(msg["conn"])] = msg
            return None
        if kind == "quality":
            if self._quality is not None:
                self._quality(msg)
            return None
        if kind == "alloc":
            allocated, reserved = _num(msg.get("allocated_bytes")), _num(msg.get("reserved_bytes"))
            free = None
            if msg.get("heap") == "host" and allocated is not None and reserved is not None:
                free = max(0.0, reserved - allocated)
            self._alloc = {
                "alloc_allocated_bytes": allocated,
                "alloc_reserved_bytes": reserved,
                "alloc_host_free_bytes": free,
            }
            return None
        if kind == "oom":
            return Event(t_arrived, "oom", {"pid": pid, "batch_size": msg.get("batch_size")})
        if kind == "command_result":
            return Event(
                t_arrived,
                "command_result",
                {
                    "id": msg.get("id"),
                    "cmd": msg.get("cmd"),
                    "ok": bool(msg.get("ok")),
                    "result": msg.get("result") or {},
                    "error": msg.get("error"),
                },
            )
        if kind == "request_error":  # tuner proxy: a request that ended in an error (no tokens, no timings)
            keys = ("error", "e2e_seconds", "operation", "model", "stream", "engine")
            data = {k: msg.get(k) for k in keys if k in msg}
            return Event(t_arrived, "request_error", data)
        if kind == "client_connect":
            if self._first_t is None:
                self._first_t = t_arrived
            return Event(t_arrived, "client_connect", {"pid": pid, "uid": msg.get("uid")})
        if kind == "client_disconnect":
            st = self._status.pop(int(msg["conn"]), None)
            if st is not None:
                self._dropped_gone += int(st.get("dropped", 0))
            return Event(t_arrived, "client_disconnect", {"pid": pid, "uid": msg.get("uid")})
        return None

    def _request(self, msg: dict[str, Any]) -> Event:
        t = float(msg["end"]) - self.t0
        ids = msg.get("ids") or []
        lo, hi = msg.get("loop_min_n"), msg.get("loop_max_n")
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= LOOP_MAX_N):
            lo, hi = self.loop_min_n, self.loop_max_n  # the client's own choice (set_loop_ngrams) when sane
        rep = response_repetition(ids, loop_min_n=lo, loop_max_n=hi)
        self._distinct.add_response(ids)
        bs, cap = msg.get("batch_size"), msg.get("batch_capacity")
        occupancy = (bs / cap) if isinstance(bs, int) and isinstance(cap, int) and cap > 0 else None
        done = _Done(
            t=t,
            tokens=int(msg["tokens"]),
            ttft=_num(msg.get("ttft_seconds")),
            tpot=_num(msg.get("tpot_seconds")),
            e2e=_num(msg.get("e2e_seconds")),
            queue=_num(msg.get("queue_seconds")),
            seq_rep_4=rep.seq_rep_4,
            rep_32=rep.rep_32,
            loop=rep.loop,
            occupancy=occupancy,
        )
        self._done.append(done)
        self._done_count += 1
        if self._first_t is None:
            self._first_t = t - (done.e2e or 0.0)
        data: dict[str, Any] = {
            "id": msg.get("id"),
            "pid": msg.get("pid"),
            "prompt_tokens": msg.get("prompt_tokens"),
            "tokens": done.tokens,
            "queue_seconds": done.queue,
            "ttft_seconds": done.ttft,
            "tpot_seconds": done.tpot,
            "e2e_seconds": done.e2e,
            "tokens_per_second": _num(msg.get("tokens_per_second")),
            "seq_rep_4": rep.seq_rep_4,
            "rep_32": rep.rep_32,
            "loop": rep.loop,
            "batch_size": bs,
            "temperature": _num(msg.get("temperature")),
            "precision": msg.get("precision"),
        }
        if self.record_text and isinstance(msg.get("text"), str):
            data["text"] = msg["text"]
        for key in PASSED_ON:  # what only some clients know (the proxy): present when they do
            if key in msg:
                data[key] = msg[key]
        return Event(t, "request", data)

    def _window_stats(self, win: list[_Done]) -> dict[str, float | None]:
        def col(name: str) -> list[float]:
            return sorted(x for d in win if (x := getattr(d, name)) is not None)

        ttft, tpot, e2e, queue = col("ttft"), col("tpot"), col("e2e"), col("queue")
        st: dict[str, float | None] = {
            "req_ttft_p50_seconds": percentile(ttft, 0.5),
            "req_ttft_p95_seconds": percentile(ttft, 0.95),
            "req_tpot_p50_seconds": percentile(tpot, 0.5),
            "req_tpot_p95_seconds": percentile(tpot, 0.95),
            "req_e2e_p50_seconds": percentile(e2e, 0.5),
            "req_queue_p50_seconds": percentile(queue, 0.5),
        }
        for key, name in (
            ("req_batch_occupancy_ratio", "occupancy"),
            ("req_seq_rep_4_ratio", "seq_rep_4"),
            ("req_rep_32_ratio", "rep_32"),
        ):
            xs = [x for d in win if (x := getattr(d, name)) is not None]
            st[key] = sum(xs) / len(xs) if xs else None
        st["req_loop_ratio"] = sum(1 for d in win if d.loop) / len(win) if win else None
        self._stats_tokens = sum(d.tokens for d in win)
        return st

    def _values(self, now: float) -> dict[str, float | None]:
        done = self._done
        lo = now - self.window_s
        while done and done[0].t < lo:
            done.popleft()
        v: dict[str, float | None] = dict.fromkeys(METRICS)
        # The window's statistics change only when a request ends or leaves the window: at 100 Hz most ticks
        # would sort the same columns again, so they are kept until then.
        key = (self._done_count, len(done), id(done[0]) if done else 0)
        if key != self._stats_key:
            self._stats_key, self._stats = key, self._window_stats(list(done))
        v.update(self._stats)
        if self._first_t is not None:
            span = min(self.window_s, now - min(self._first_t, now))
            if span > 0:
                v["req_tokens_per_second"] = self._stats_tokens / span
                v["req_requests_per_second"] = len(done) / span
        v["req_done_total"] = float(self._done_count) if self._done_count or self._first_t is not None else None
        v["req_distinct_2_ratio"] = self._distinct.value
        live: set[int] | None = None
        try:
            clients = self.channel.clients()
            v["chan_clients"] = float(len(clients))
            if all("conn" in c for c in clients):  # the status of a client already gone does not count
                live = {int(c["conn"]) for c in clients}
            st = self.channel.stats()
            self._lost["queue"] = int(st.get("dropped", 0))
            self._lost["malformed"] = int(st.get("malformed", 0))
            self._lost["refused_full"] = int(st.get("refused_full", 0))
            server_lost = self._lost["queue"] + self._lost["malformed"]
        except Exception:
            server_lost = 0
        active = [int(s.get("active", 0)) for conn, s in self._status.items() if live is None or conn in live]
        if active:
            v["req_active"] = float(sum(active))
        client_lost = self._dropped_gone + sum(int(s.get("dropped", 0)) for s in self._status.values())
        self._lost["client"] = client_lost
        v["chan_dropped_total"] = float(server_lost + client_lost)
        v.update(self._alloc)
        return v
