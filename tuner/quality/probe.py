"""The quality probe: semantic consistency in the sidecar, measured by the scorer child process.

Texts arrive as ``quality`` messages (from ``tuner.client`` through the channel, or from ``tuner proxy``'s
shadow requests): a sampled response with its prompt and, when the loop made one, a second answer to the same
prompt at the same settings; or a canary round (the fp32 reference answers and the answers after a knob change).
The probe turns each into a scorer job (bounded queue; the oldest is dropped and counted when it is full) and,
at each sample, the scorer's results into events and values.  The texts are kept only until scored; the trace
gets scores (texts only with ``--record-text``).

Measures (0..1, the backend's similarity, ``tuner.quality.backends``):

- **self-consistency**: the response vs the second answer;
- **relevance**: the response vs its prompt (for chat: the last user message);
- **reference consistency**: each canary prompt's answer after a precision change vs its fp32 answer, averaged;
  with the *same-run baseline* the policies compare against: the mean similarity of the fp32 answers of
  *different* canary prompts (``unrelated_mean``: what "unrelated" scores on this model with this backend) and
  ``normalised = (mean - unrelated_mean) / (1 - unrelated_mean)`` (1: the same answers, 0: no closer than
  another prompt's answer).

Events: ``quality`` per scored response (``self_consistency``, ``relevance``, the temperature and precision it
was sampled at, ``source``, ``reason`` when a measure is None); ``quality_reference`` per canary round;
``quality_backend`` when the scorer is ready or failed (what it loaded, the weights' SHA-256, the self-check).

Values (the backend's name is the key's ``/<part>``, a ``backend`` label in Prometheus):
``quality_self_consistency_ratio/<backend>``, ``quality_relevance_ratio/<backend>`` (means over the responses
scored in the last ``window_s``), ``quality_reference_consistency_ratio/<backend>`` (the last canary round's
mean); ``quality_scored_total`` (responses and canary rounds scored), ``quality_dropped_total`` (jobs dropped:
queue full), ``quality_unscored_total`` (measures that came back None), ``quality_jobs`` (waiting now),
``quality_scorer_rss_bytes`` and ``quality_scorer_cpu_seconds_total`` (the scorer process).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuner.quality.backends import MAX_CHARS, parse_spec
from tuner.records import Event, Sample

WINDOW_S = 120.0
WINDOW_KEEP = 4096
DEFAULT_RATE = 0.02
REFERENCE_MIN_PAIRS = 2
FINAL_WAIT_S = 10.0
FINAL_START_WAIT_S = 3.0
"""The last sample waits this long at most for a scorer still starting, with nothing to score: its failure
(a bad model path fails in well under a second) is the one thing the summary would otherwise miss."""


@dataclass(frozen=True)
class QualityOptions:
    """``--consistency`` and its options."""

    backend: str
    rate: float = DEFAULT_RATE
    queue: int = 64
    window_s: float = WINDOW_S
    unpinned: bool = False
    remote: bool = False
    model: str | None = None
    timeout: float = 10.0
    canary: tuple[str, ...] = ()
    """Canary prompts from ``--canary FILE`` (sent to the inference side in the welcome); empty: the loop's own
    set (the demo ships one)."""

    @property
    def backend_name(self) -> str:
        return parse_spec(self.backend, allow_remote=self.remote).name

    def header(self) -> dict[str, Any]:
        return {"backend": self.backend_name, "spec": self.backend, "semantic": self.backend_name != "lexical-chrf",
                "rate": self.rate, "queue": self.queue, "window_s": self.window_s, "canary_prompts": len(self.canary)
                or None, "unpinned": self.unpinned}


@dataclass
class _Job:
    kind: str
    t: float
    meta: dict[str, Any]
    slots: list[str]
    """What each pair of the job measures: ``self``, ``relevance``, ``canary:<i>``, ``baseline:<i>``."""
    reasons: dict[str, str]


def _chars(msg: dict[str, Any], field: str) -> int:
    n = msg.get(f"{field}_chars")
    text = msg.get(field)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    return len(text) if isinstance(text, str) else 0


class QualityProbe:
    name = "quality"
    per_batch = True

    def __init__(self, opts: QualityOptions, *, t0: float, record_text: bool = False, scorer: Any = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.t0 = t0
        self.record_text = record_text
        self.backend = opts.backend_name
        self.semantic = self.backend != "lexical-chrf"
        self.log = log or (lambda msg: None)
        if scorer is None:
            from tuner.quality.scorer import ScorerProcess

            scorer = ScorerProcess(opts.backend, unpinned=opts.unpinned, remote=opts.remote, model=opts.model,
                                   timeout=opts.timeout, queue=opts.queue)
        self.scorer = scorer
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._inbox: deque[dict[str, Any]] = deque(maxlen=4 * max(1, opts.queue))
        self._inbox_dropped = 0
        self._jobs: dict[int, _Job] = {}
        self._self: deque[tuple[float, float]] = deque(maxlen=WINDOW_KEEP)
        self._rel: deque[tuple[float, float]] = deque(maxlen=WINDOW_KEEP)
        self._reference: float | None = None
        self._scored = 0
        self._unscored = 0
        self._notes: list[tuple[str, str]] = []
        self._state_seen = "starting"
        self._reasons_noted: set[str] = set()
        self._final = False
        self.k_self = f"quality_self_consistency_ratio/{self.backend}"
        self.k_rel = f"quality_relevance_ratio/{self.backend}"
        self.k_ref = f"quality_reference_consistency_ratio/{self.backend}"

    # -- the probe protocol -------------------------------------------------------------------------
    def available(self) -> str | None:
        return None

    def metrics(self) -> dict[str, str]:
        return {self.k_self: "ratio", self.k_rel: "ratio", self.k_ref: "ratio", "quality_scored_total": "count",
                "quality_dropped_total": "count", "quality_unscored_total": "count", "quality_jobs": "count",
                "quality_scorer_rss_bytes": "bytes", "quality_scorer_cpu_seconds_total": "seconds"}

    def describe(self) -> dict[str, Any]:
        return {**self.opts.header(), "scorer_pid": getattr(self.scorer, "pid", None)}

    def close(self) -> None:
        self.scorer.close()

    def take_notes(self) -> list[tuple[str, str]]:
        out, self._notes = self._notes, []
        return out

    # -- input (any thread: the output probe's, the proxy's) ------------------------------------------
    @property
    def rate(self) -> float:
        return self.opts.rate

    def submit(self, msg: dict[str, Any]) -> None:
        """A ``quality`` message (``kind`` ``self`` or ``canary``); never blocks."""
        with self._lock:
            if len(self._inbox) == self._inbox.maxlen:
                self._inbox_dropped += 1
            self._inbox.append(msg)

    # -- one sample ---------------------------------------------------------------------------------
    def sample(self, now: float) -> Sample:
        events: list[Event] = []
        self._state(now, events)
        with self._lock:
            inbox = list(self._inbox)
            self._inbox.clear()
        for msg in inbox:
            try:
                ev = self._queue(now, msg)
            except Exception:  # a message we cannot use: skip it
                ev = None
            if ev is not None:
                events.append(ev)
        start = time.monotonic()
        deadline = start + FINAL_WAIT_S if self._final else 0.0
        starting_deadline = start + FINAL_START_WAIT_S if self._final else 0.0
        while True:
            state = self.scorer.state  # read before the results: a child that ended has sent all it will
            for res in self.scorer.results():
                ev = self._result(now, res)
                if ev is not None:
                    events.append(ev)
            left = time.monotonic()
            # the session's last tick: the responses sampled so far get their scores, and a scorer still starting
            # gets a moment to say whether it loaded (a workload that ended at once left it no time)
            scoring = bool(self._jobs) and left < deadline and state in ("starting", "ready")
            if not (scoring or (state == "starting" and left < starting_deadline)):
                break
            time.sleep(0.02)
        self._state(now, events)  # (it may have become ready, or failed, meanwhile)
        if state in ("failed", "exited") and self._jobs:
            # Responses queued while the scorer was starting, or in it when it died: never scored, each says why.
            why = self.scorer.reason or f"the scorer {state}"
            for jid in sorted(self._jobs):
                events.append(self._never_scored(now, self._jobs.pop(jid), why))
        if self._final and self._jobs:
            self._notes.append((f"{len(self._jobs)} sampled responses not scored before the end", "info"))
            self._jobs.clear()
        if self._final and state == "starting":
            why = (f"still starting when the session ended (waited {FINAL_START_WAIT_S:g} s): it did not say whether "
                   "it loaded")
            events.append(Event(now, "quality_backend", {"state": "starting", "backend": {"name": self.backend},
                                                         "reason": why}))
            self._notes.append((f"consistency scorer {why}", "warn"))
        return Sample(self.name, now, self._values(now), events=tuple(events))

    def finishing(self) -> None:
        """The session is ending: the last sample waits (``FINAL_WAIT_S`` at most) for what is being scored."""
        self._final = True

    def _state(self, now: float, events: list[Event]) -> None:
        state = self.scorer.state
        if state == self._state_seen:
            return
        self._state_seen = state
        if state == "ready":
            info = self.scorer.ready_info or {}
            b = info.get("backend") or {}
            events.append(Event(now, "quality_backend", {"state": "ready", **info}))
            check = info.get("self_check") or {}
            msg = (f"consistency scorer ready: {b.get('name', self.backend)} "
                   f"({'semantic' if b.get('semantic') else 'lexical'}), loaded in {info.get('load_seconds')} s, "
                   f"self-check AUC {check.get('auc')}")
            self._notes.append((msg, "info"))
            self.log(msg)
        else:
            why = self.scorer.reason or state
            events.append(Event(now, "quality_backend", {"state": state, "backend": {"name": self.backend},
                                                         "reason": why}))
            msg = f"consistency scorer {state}: {why}; consistency is not measured, everything else goes on"
            self._notes.append((msg, "warn"))
            self.log(msg)

    def _queue(self, now: float, msg: dict[str, Any]) -> Event | None:
        kind = msg.get("kind")
        pairs: list[tuple[str, str]] = []
        slots: list[str] = []
        reasons: dict[str, str] = {}
        fields = ("id", "temperature", "precision") if kind == "self" else ("tag", "precision", "previous",
                                                                              "temperature")
        meta: dict[str, Any] = {k: msg.get(k) for k in fields}
        if kind == "self":
            meta["source"] = msg.get("source") or "in-process"
        if kind == "self":
            answer, second, prompt = msg.get("answer"), msg.get("second"), msg.get("prompt")
            too_long = {f: n for f in ("answer", "second", "prompt") if (n := _chars(msg, f)) > MAX_CHARS}

            def over(*fields: str) -> str | None:
                for f in fields:
                    if f in too_long:
                        return f"the {f} has {too_long[f]} characters, over the scorer's limit of {MAX_CHARS}"
                return None

            if second is not None or "second" in too_long:
                r = over("answer", "second")
                if r is not None:
                    reasons["self"] = r
                else:
                    pairs.append((str(answer or ""), str(second or "")))
                    slots.append("self")
            if prompt is not None or "prompt" in too_long:
                r = over("prompt", "answer")
                if r is not None:
                    reasons["relevance"] = r
                else:
                    pairs.append((str(prompt or ""), str(answer or "")))
                    slots.append("relevance")
            if self.record_text:
                meta.update(prompt=prompt, answer=answer, second=second)
        elif kind == "canary":
            ref = [str(x) for x in msg.get("reference") or []]
            new = [str(x) for x in msg.get("answers") or []]
            n = min(len(ref), len(new))
            if n < REFERENCE_MIN_PAIRS:
                return Event(now, "quality_reference", {**meta, "backend": self.backend, "mean": None, "n": n,
                                                        "reason": f"{n} canary answers (need {REFERENCE_MIN_PAIRS})"})
            for i in range(n):
                pairs.append((ref[i], new[i]))
                slots.append(f"canary:{i}")
            for i in range(n):  # the same-run baseline: fp32 answers of different prompts
                pairs.append((ref[i], ref[(i + 1) % n]))
                slots.append(f"baseline:{i}")
            meta["identical"] = sum(1 for i in range(n) if ref[i] == new[i])
            meta["n"] = n
        else:
            return None
        if not pairs:
            job = _Job(str(kind), now, meta, [], reasons)
            return self._finish(now, job, [], [])
        jid = next(self._ids)
        job = _Job(str(kind), now, meta, slots, reasons)
        if not self.scorer.submit(jid, pairs):
            return self._never_scored(now, job, self.scorer.reason or "the scorer is not running")
        self._jobs[jid] = job
        if len(self._jobs) > 4 * max(1, self.opts.queue):  # jobs the scorer dropped never come back
            for old in sorted(self._jobs)[: len(self._jobs) - 4 * self.opts.queue]:
                del self._jobs[old]
        return None

    def _never_scored(self, now: float, job: _Job, why: str) -> Event:
        """The event of a job the scorer will never score: each of its measures says ``why``."""
        reasons = dict(job.reasons)
        for s in job.slots:
            reasons.setdefault(s.split(":")[0], why)
        return self._finish(now, _Job(job.kind, job.t, job.meta, [], reasons), [], [])

    def _result(self, now: float, res: dict[str, Any]) -> Event | None:
        job = self._jobs.pop(res.get("id"), None)  # type: ignore[arg-type]
        if job is None:
            return None
        scores = list(res.get("scores") or [])
        reasons = list(res.get("reasons") or [])
        if len(scores) != len(job.slots):
            scores = [None] * len(job.slots)
            reasons = ["the scorer answered the wrong number of scores"] * len(job.slots)
        job.meta["scorer_seconds"] = res.get("seconds")
        job.meta["scorer_cpu_seconds"] = res.get("cpu_seconds")
        return self._finish(now, job, scores, reasons)

    def _finish(self, now: float, job: _Job, scores: list[Any], reasons: list[Any]) -> Event:
        got: dict[str, float | None] = {}
        why: dict[str, str] = dict(job.reasons)
        failed: dict[str, int] = {}
        for slot, s, r in zip(job.slots, scores, reasons, strict=True):
            ok = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
            got[slot] = float(s) if ok else None
            if not ok:
                kind = slot.split(":")[0]
                failed[kind] = failed.get(kind, 0) + 1
                why.setdefault(kind, str(r or "no score"))
        for kind, k in failed.items():
            if k > 1 or job.kind == "canary":  # a canary round: how many of its pairs
                why[kind] = f"{k} pairs, e.g. {why[kind]}"
        self._scored += 1
        if job.kind == "self":
            sc, rel = got.get("self"), got.get("relevance")
            if sc is not None:
                self._self.append((now, sc))
            if rel is not None:
                self._rel.append((now, rel))
            nones = sum(1 for k in ("self", "relevance") if k in why)
            self._unscored += nones
            data = {**job.meta, "backend": self.backend, "semantic": self.semantic, "self_consistency": sc,
                    "relevance": rel}
            if why:
                data["reason"] = "; ".join(f"{k}: {v}" for k, v in sorted(why.items()))
                self._note_reason(data["reason"])
            return Event(now, "quality", data)
        n = int(job.meta.get("n") or 0)
        ref = [got.get(f"canary:{i}") for i in range(n)]
        base = [got.get(f"baseline:{i}") for i in range(n)]
        r_ok = [x for x in ref if x is not None]
        b_ok = [x for x in base if x is not None]
        mean = sum(r_ok) / len(r_ok) if r_ok else None
        unrel = sum(b_ok) / len(b_ok) if b_ok else None
        norm = None
        if mean is not None and unrel is not None and unrel < 1.0:
            norm = (mean - unrel) / (1.0 - unrel)
        self._unscored += len(ref) - len(r_ok)
        if mean is not None:
            self._reference = mean
        data = {**job.meta, "backend": self.backend, "semantic": self.semantic, "mean": mean,
                "min": min(r_ok) if r_ok else None, "scored": len(r_ok), "unrelated_mean": unrel,
                "normalised": norm}
        if why:
            data["reason"] = "; ".join(f"{k}: {v}" for k, v in sorted(why.items()))
            self._note_reason(data["reason"])
        return Event(now, "quality_reference", data)

    def _note_reason(self, reason: str) -> None:
        key = reason.split(":")[0] + ":" + reason.split(":")[1][:40] if ":" in reason else reason
        if key not in self._reasons_noted and len(self._reasons_noted) < 32:
            self._reasons_noted.add(key)
            self._notes.append((f"consistency not measured for a response: {reason}", "info"))

    def _values(self, now: float) -> dict[str, float | None]:
        lo = now - self.opts.window_s
        for d in (self._self, self._rel):
            while d and d[0][0] < lo:
                d.popleft()
        rss, cpu = self.scorer.usage()
        running = self.scorer.state in ("starting", "ready")
        return {
            self.k_self: sum(x for _, x in self._self) / len(self._self) if self._self else None,
            self.k_rel: sum(x for _, x in self._rel) / len(self._rel) if self._rel else None,
            self.k_ref: self._reference,
            "quality_scored_total": float(self._scored),
            "quality_dropped_total": float(self.scorer.dropped + self._inbox_dropped),
            "quality_unscored_total": float(self._unscored),
            "quality_jobs": float(self.scorer.queued) if running else None,
            "quality_scorer_rss_bytes": rss if running else None,
            "quality_scorer_cpu_seconds_total": cpu,
        }
