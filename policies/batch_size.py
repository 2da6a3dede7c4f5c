"""Batch size: the most tokens/s the memory and the latency SLO allow — at the knee, not at the wall.

Each candidate batch size is *measured*: after a change, responses that end in the first ``settle_s``
are ignored (they were batched under the old size), then ``measure_s`` of responses give one
measurement: generated tokens / elapsed time, p95 TTFT and TPOT, how many responses.

State machine (the Zeus power-limit optimizer's shape: each state knows what it waits for):

- ``measure``  waiting for the current batch size's measurement (TTFT there is *service* time: the
  request's time to first token minus its time in the queue, since under overload a smaller batch
  only makes the queue longer).  With *static* batches (each batch's requests start together and the
  next batch starts after the last of them ended: the demo, a hand-written loop) tokens/s is taken over
  whole batches that started after the settle time — their tokens / (start of the batch after them -
  start of the first) — and the window lasts until ``min_batches`` of them completed: counting the
  responses that happen to end in a 10 s window swung 2-3x at batch 32-64 on the demo, where one batch
  takes 5-15 s, and the policy settled below the knee.  Otherwise (continuous batching) it is the
  tokens of the responses that ended in the window / its length;
- ``explore``  doubling while throughput still rises by ``min_gain`` (or rises at all right after a doubling
  that gained: one more look, since a window's noise can hide a real gain), the SLO holds and memory
  has ``min_headroom``; then ``refine``: the midpoint between the knee and a measured neighbour while the gap
  is at least ``refine_min_gap`` and more than ``refine_min_frac`` of the knee (a golden-section-like
  shrink on measured windows; finer steps than a quarter of the size change the throughput by less than
  one window's noise on a shared machine: 48, 56, 52, 54 were bisected there and 54 held by chance);
- ``confirm``  (``confirm = true``) before holding, the knee and its strongest rival (the best feasible
  measured size above it; else, when no size above missed the SLO, the largest below it that missed the
  tolerance by less than the tolerance again) are measured once more, back to back, and the knee is
  chosen again from the pooled figures (a size measured more than once counts the mean of its windows).
  One window swings 10-30% with the other jobs of a shared host, as much as 32 and 64 differ on the demo:
  a lucky window made a size look within ``knee_tolerance`` of the best;
- ``hold``     at the knee: the *smallest* measured size within ``knee_tolerance`` of the best feasible
  throughput (on this machine 32 gives 420 tok/s and 64 gives 419 at 2.8x the TTFT: 32 is chosen);
  re-tunes when the request rate or the prompt-length mix shifts by ``retune_shift``, and halves when
  the SLO is missed for a whole measurement window;
- an ``oom`` event at any time: halve, mark the OOM size as a ceiling (never tried again until the
  memory headroom has risen by ``ceiling_release`` over what it was at the OOM), ask for a cleanup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tuner.core.window import Window
from tuner.policies.base import Bounds, Policy
from tuner.records import Action, Applied, Knobs


@dataclass(frozen=True)
class BatchConfig:
    min: int = 1
    max: int = 256
    start: int | None = None
    """Starting batch size when the agent knows none (None: 8, or ``min`` when 8 is out of bounds)."""
    settle_s: float = 2.0
    measure_s: float = 10.0
    min_requests: int = 8
    min_batches: int = 3
    """With static batches: whole batches a measurement needs (until ``max_wait_s``)."""
    max_wait_s: float = 60.0
    min_gain: float = 0.05
    knee_tolerance: float = 0.05
    refine_min_gap: int = 4
    refine_min_frac: float = 0.25
    """Refine only while the gap to the neighbour is more than this share of the knee (and >= ``refine_min_gap``)."""
    confirm: bool = True
    """Measure the knee and its strongest larger rival once more, back to back, before holding."""
    slo_ttft_p95_s: float | None = None
    slo_tpot_p95_s: float | None = None
    min_headroom: float = 0.10
    retune_shift: float = 0.3
    ceiling_release: float = 0.10
    cleanup_steps: tuple[str, ...] = ("caches", "gc", "empty_cache", "malloc_trim")


@dataclass(frozen=True)
class Measurement:
    batch: int
    tokens_per_second: float
    ttft_p95: float | None
    tpot_p95: float | None
    requests: int
    rate: float
    prompt_mean: float | None
    windows: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "tok_s": self.tokens_per_second,
            "ttft_p95": self.ttft_p95,
            "tpot_p95": self.tpot_p95,
            "n": self.requests,
            "windows": self.windows,
        }


def _pool(old: Measurement, new: Measurement) -> Measurement:
    """Two measurements of one batch size as one: the mean of their windows (tokens/s and the p95s); the
    request rate and prompt mix are the newest (what a held knee compares later load with)."""
    n = old.windows + new.windows

    def mean(a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return b if a is None else a
        return (a * old.windows + b * new.windows) / n

    return Measurement(
        batch=new.batch,
        tokens_per_second=(old.tokens_per_second * old.windows + new.tokens_per_second * new.windows) / n,
        ttft_p95=mean(old.ttft_p95, new.ttft_p95),
        tpot_p95=mean(old.tpot_p95, new.tpot_p95),
        requests=old.requests + new.requests,
        rate=new.rate,
        prompt_mean=new.prompt_mean,
        windows=n,
    )


def _p95(x: np.ndarray) -> float:
    """The 95th percentile with linear interpolation (numpy's default), without ``np.percentile``'s
    overhead (~30 us a call; this is a sort and two reads)."""
    s = np.sort(x)
    pos = 0.95 * (s.size - 1)
    lo = int(pos)
    hi = min(lo + 1, s.size - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def _service_ttft(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Time to first token without the time spent queued (what the batch size itself costs)."""
    ttft, queue = cols["ttft_seconds"], cols["queue_seconds"]
    service = ttft - np.where(np.isnan(queue), 0.0, queue)
    return np.maximum(service[~np.isnan(service)], 0.0)


def _saturated(cols: dict[str, np.ndarray]) -> bool:
    """A backlog: the median request waited in the queue more than twice its own service time."""
    q, e2e = cols["queue_seconds"], cols["e2e_seconds"]
    ok = np.isfinite(q) & np.isfinite(e2e)
    if not ok.any():
        return False
    return bool(np.median(q[ok]) > 2.0 * np.median(np.maximum(e2e[ok] - q[ok], 0.0)))


def _static_batches(cols: dict[str, np.ndarray], since: float) -> tuple[float | None, int, np.ndarray] | None:
    """Tokens/s over the whole static batches that started at or after ``since``; None when the requests
    do not look statically batched.

    A request started at ``t - e2e + queue``; requests starting within 1 ms of each other form a batch.
    Static batching shows as requests starting together and every batch ending before the next one
    starts.  The last batch seen may still be running (some of its requests not yet reported), so it
    only marks where the one before ended.  Returns (tokens/s or None while no batch is complete,
    complete batches, mask of the requests used).
    """
    t, e2e, queue, tok = cols["t"], cols["e2e_seconds"], cols["queue_seconds"], cols["tokens"]
    start = t - e2e + queue
    ok = np.isfinite(start) & np.isfinite(tok)
    keep = np.zeros(t.size, dtype=bool)
    if int(ok.sum()) < 2:
        return None
    idx = np.flatnonzero(ok)
    order = idx[np.argsort(start[idx], kind="stable")]
    s = start[order]
    group = np.concatenate(([0], np.cumsum(np.diff(s) > 1e-3)))
    n_groups = int(group[-1]) + 1
    firsts = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
    if n_groups == 1:  # one batch so far (they started together), still running: nothing complete
        return None, 0, keep
    ends = np.maximum.reduceat(t[order], firsts)
    # static: each batch ended (its last response) before the next began; 10 ms for timestamp rounding.
    # Judged on every batch seen (also those that started before ``since``).
    if np.any(ends[:-1] > s[firsts[1:]] + 0.01):
        return None
    g_start = s[firsts]
    use = np.flatnonzero(g_start[:-1] >= since)  # complete batches (a successor started) from ``since`` on
    if use.size == 0:
        return None, 0, keep
    span = float(g_start[use[-1] + 1] - g_start[use[0]])
    if span <= 0:
        return None, 0, keep
    sel = np.isin(group, use)
    keep[order[sel]] = True
    return float(tok[order[sel]].sum()) / span, int(use.size), keep


class BatchSizePolicy(Policy):
    name = "batch_size"
    knobs = ("batch_size", "cleanup")
    keys = ("req_tpot_p95_seconds",)

    def __init__(self, cfg: BatchConfig) -> None:
        if not 0.0 <= cfg.refine_min_frac <= 1.0:
            raise ValueError(f"refine_min_frac = {cfg.refine_min_frac:g} is out of range (0 to 1)")
        super().__init__({"batch_size": Bounds(cfg.min, cfg.max)})
        self.cfg = cfg
        self.phase = "measure"
        self.changed_at: float | None = None
        self.measured: dict[int, Measurement] = {}
        self.ceiling: int | None = None
        self.ceiling_headroom: float | None = None
        self.next_phase = "explore"
        self.hold_ref: Measurement | None = None
        self.slo_bad_since: float | None = None
        self.refine_lo: int | None = None
        self.next_shift_check = 0.0
        self.windows = 0
        """Measurement windows completed (all tunings): the evidence of every action carries it."""
        self.last_service_ttft: float | None = None
        self.next_slo_check = 0.0
        self.confirmed = False
        """This tuning's knee has been confirmed (or needed no confirmation): at most once per tuning."""
        self.confirm_queue: list[int] = []
        """Sizes still to measure again before the knee is chosen from the pooled figures."""

    def status(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "ceiling": self.ceiling,
            "measured": {b: round(m.tokens_per_second, 1) for b, m in sorted(self.measured.items())},
            "windows": self.windows,
        }

    # -- helpers ------------------------------------------------------------------------------------
    def _feasible(self, m: Measurement) -> bool:
        c = self.cfg
        if c.slo_ttft_p95_s is not None and m.ttft_p95 is not None and m.ttft_p95 > c.slo_ttft_p95_s:
            return False
        return not (c.slo_tpot_p95_s is not None and m.tpot_p95 is not None and m.tpot_p95 > c.slo_tpot_p95_s)

    def _knee(self) -> int | None:
        ok = [m for m in self.measured.values() if self._feasible(m)]
        if not ok:
            return None
        best = max(m.tokens_per_second for m in ok)
        return min(m.batch for m in ok if m.tokens_per_second >= (1 - self.cfg.knee_tolerance) * best)

    def _new_tuning(self) -> None:
        """Forget the measurements (load shifted, SLO missed): the next knee is confirmed afresh."""
        self.measured.clear()
        self.confirmed = False
        self.confirm_queue = []

    def _rival(self, knee: int) -> int | None:
        """The size a lucky or unlucky window may have ranked wrongly against the knee: the best feasible
        measured size above it (the knee won on the tolerance, not on throughput), else the largest
        feasible size below it that missed the tolerance by less than the tolerance again (a flat top where
        one lucky window made the larger size look best)."""
        ok = {b: m for b, m in self.measured.items() if self._feasible(m)}
        above = [m for b, m in ok.items() if b > knee]
        if above:
            return max(above, key=lambda m: m.tokens_per_second).batch
        if any(b > knee for b in self.measured):
            return None  # the SLO caps the knee: the largest size that meets it, whatever is below
        best = max(m.tokens_per_second for m in ok.values())
        floor = (1 - 2 * self.cfg.knee_tolerance) * best
        near = [b for b, m in ok.items() if b < knee and m.tokens_per_second >= floor]
        return max(near) if near else None

    def _refine_gap(self, gap: int, knee: int) -> bool:
        c = self.cfg
        return gap >= c.refine_min_gap and gap > c.refine_min_frac * knee

    def _cap(self, b: int) -> int:
        hi = self.cfg.max if self.ceiling is None else min(self.cfg.max, self.ceiling - 1)
        return max(self.cfg.min, min(int(b), hi))

    def _measure(self, w: Window, batch: int) -> Measurement | None:
        c = self.cfg
        if self.changed_at is None:
            self.changed_at = w.t - c.settle_s  # the batch size was there before we looked
        start = self.changed_at + c.settle_s
        elapsed = w.t - start
        if elapsed < c.measure_s:
            return None
        cols = w.request_columns(
            start, ("t", "tokens", "ttft_seconds", "queue_seconds", "e2e_seconds", "tpot_seconds", "prompt_tokens")
        )
        n = int(cols["tokens"].size)
        if n < c.min_requests and elapsed < c.max_wait_s:
            return None
        static = _static_batches(cols, start)
        if static is not None and static[0] is not None and (static[1] >= c.min_batches or elapsed >= c.max_wait_s):
            rate, _, keep = static
            assert rate is not None
            cols = {k: v[keep] for k, v in cols.items()}
            n = int(keep.sum())
            tokens_per_second = rate
        elif static is not None and elapsed < c.max_wait_s:
            return None  # static batches: wait for whole ones
        else:
            tokens_per_second = float(np.nansum(cols["tokens"])) / elapsed
        ttft, tpot = _service_ttft(cols), cols["tpot_seconds"]
        tpot = tpot[~np.isnan(tpot)]
        prompt = cols["prompt_tokens"][~np.isnan(cols["prompt_tokens"])]
        return Measurement(
            batch=batch,
            tokens_per_second=tokens_per_second,
            ttft_p95=_p95(ttft) if ttft.size else None,
            tpot_p95=_p95(tpot) if tpot.size else None,
            requests=n,
            rate=n / elapsed,
            prompt_mean=float(prompt.mean()) if prompt.size else None,
        )

    def _evidence(self, w: Window, **more: Any) -> dict[str, Any]:
        headroom, dev = w.headroom()
        ev: dict[str, Any] = {
            "measured": {str(b): m.as_dict() for b, m in sorted(self.measured.items())},
            "headroom": headroom,
            "device": dev,
            "ceiling": self.ceiling,
            "windows": self.windows,
        }
        ev.update(more)
        return ev

    def _go(self, w: Window, cur: int, new: int, reason: str, **more: Any) -> list[Action]:
        new = self._cap(new)
        if new == cur:
            return []
        return [self.act("batch_size", new, reason, **self._evidence(w, **more))]

    # -- decisions ----------------------------------------------------------------------------------
    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        c = self.cfg
        w = window
        headroom, _ = w.headroom()
        for e in w.events:
            if e.kind == "oom":
                return self._oom(w, knobs, e.data.get("batch_size"), headroom)
        if (
            self.ceiling is not None
            and headroom is not None
            and self.ceiling_headroom is not None
            and headroom >= self.ceiling_headroom + c.ceiling_release
        ):
            self.ceiling = None  # memory freed since the OOM: the ceiling no longer holds
            self.ceiling_headroom = None
        if knobs.batch_size is None:
            start = c.start if c.start is not None else (8 if c.min <= 8 <= c.max else c.min)
            self.phase, self.next_phase = "measure", "explore"
            return [self.act("batch_size", self._cap(start), "starting batch size", **self._evidence(w))]
        cur = int(knobs.batch_size)
        if self.phase == "measure":
            m = self._measure(w, cur)
            if m is None:
                return []
            self.windows += 1
            old = self.measured.get(cur)
            self.measured[cur] = _pool(old, m) if old is not None else m
            if self.confirm_queue and self.confirm_queue[0] == cur and self.next_phase == "confirm":
                self.confirm_queue.pop(0)
            self.phase = self.next_phase
        if self.phase == "explore":
            return self._explore(w, cur, headroom)
        if self.phase == "refine":
            return self._refine(w, cur)
        if self.phase == "confirm":
            return self._confirm(w, cur)
        if self.phase == "hold":
            return self._hold(w, cur)
        return []

    def _explore(self, w: Window, cur: int, headroom: float | None) -> list[Action]:
        c = self.cfg
        m = self.measured[cur]
        prev = self.measured.get(cur // 2) if cur > 1 else None
        gaining = prev is None or m.tokens_per_second > prev.tokens_per_second * (1 + c.min_gain)
        # still rising, by less than min_gain, right after a doubling that gained: one window's noise can
        # hide a real gain (16 -> 32 measured +4.6% on the demo, 64 then gave another +15%): one more look
        before = self.measured.get(cur // 4) if cur > 3 else None
        prev_gained = prev is not None and (
            before is None or prev.tokens_per_second > before.tokens_per_second * (1 + c.min_gain)
        )
        rising = prev is not None and prev_gained and m.tokens_per_second > prev.tokens_per_second
        room = headroom is None or headroom >= c.min_headroom
        nxt = self._cap(cur * 2)
        if self._feasible(m) and (gaining or rising) and room and nxt > cur and nxt not in self.measured:
            self.next_phase = "explore"
            self.phase = "measure"
            return self._go(w, cur, nxt, f"exploring: {cur} gave {m.tokens_per_second:.0f} tok/s, trying {nxt}")
        if not self._feasible(m) and cur // 2 >= c.min and cur // 2 not in self.measured:
            self.next_phase = "explore"
            self.phase = "measure"
            return self._go(w, cur, cur // 2, f"exploring: {cur} misses the latency SLO, trying {cur // 2}")
        self.phase = "refine"
        return self._refine(w, cur)

    def _refine(self, w: Window, cur: int) -> list[Action]:
        """Bisect the interval where the knee lies: above the current knee when the next larger size
        measured was better by more than the tolerance or missed the SLO (the knee is between them),
        else below it (the next smaller size was worse by more than the tolerance)."""
        c = self.cfg
        knee = self._knee()
        if knee is None:  # nothing feasible measured: the smallest size is the best we can do
            self.phase = "measure"
            self.next_phase = "hold"
            return self._go(w, cur, c.min, "no measured batch size meets the SLO: smallest")
        k = self.measured[knee]
        upper = min((b for b in self.measured if b > knee), default=None)
        lower = max((b for b in self.measured if b < knee), default=None)
        mid: int | None = None
        if upper is not None and self._refine_gap(upper - knee, knee):
            u = self.measured[upper]
            if not self._feasible(u) or u.tokens_per_second > k.tokens_per_second * (1 + c.knee_tolerance):
                mid = (knee + upper) // 2
        if mid is None and lower is not None and self._refine_gap(knee - lower, knee):
            mid = (lower + knee) // 2
        if mid is not None:
            mid = self._cap(mid)
            if mid not in self.measured and mid != knee:
                self.phase, self.next_phase = "measure", "refine"
                return self._go(w, cur, mid, f"refining around the knee {knee}: trying {mid}", knee=knee)
        if c.confirm and not self.confirmed:
            self.confirmed = True
            rival = self._rival(knee)
            if rival is not None:
                # the rival first (unless it was just measured), the knee last: a confirmed knee is held
                # without another move
                self.confirm_queue = [knee] if cur == rival else [rival, knee]
                return self._confirm(w, cur)
        return self._settle(w, cur, knee)

    def _confirm(self, w: Window, cur: int) -> list[Action]:
        """Measure the next size of the confirmation again; when none is left, choose the knee from the
        pooled figures and hold it."""
        c = self.cfg
        while self.confirm_queue and self._cap(self.confirm_queue[0]) != self.confirm_queue[0]:
            self.confirm_queue.pop(0)  # above a ceiling set since: not measurable
        if self.confirm_queue:
            nxt = self.confirm_queue[0]
            self.phase, self.next_phase = "measure", "confirm"
            if nxt == cur:  # measure it again from now, without a change
                self.changed_at = w.t - c.settle_s
                return []
            knee = self._knee()
            return self._go(
                w, cur, nxt, f"confirming the knee {knee}: measuring {nxt} again (the pooled figures decide)",
                knee=knee,
            )
        knee = self._knee()
        if knee is None:
            return self._refine(w, cur)  # nothing feasible any more: the smallest size
        return self._settle(w, cur, knee)

    def _settle(self, w: Window, cur: int, knee: int) -> list[Action]:
        """Hold the knee (moving there first when the current size is another)."""
        self.confirm_queue = []
        self.phase = "measure" if knee != cur else "hold"
        self.next_phase = "hold"
        self.hold_ref = self.measured.get(knee)
        self.slo_bad_since = None
        if knee == cur:
            return []
        best = self.measured[knee]
        return self._go(w, cur, knee, f"knee: {knee} gives {best.tokens_per_second:.0f} tok/s", knee=knee)

    def _hold(self, w: Window, cur: int) -> list[Action]:
        c = self.cfg
        if self.hold_ref is None:
            self.hold_ref = self.measured.get(cur)
        # SLO missed for a whole measurement window: halve.  TTFT is judged without the queueing: under
        # overload a smaller batch only lengthens the queue (the precision policy and the user own that).
        slo_missed = False
        ttft: float | None = None
        tpot = w.current("req_tpot_p95_seconds")
        if c.slo_ttft_p95_s is not None and w.t >= self.next_slo_check:
            self.next_slo_check = w.t + c.measure_s / 4
            cols = w.request_columns(w.t - c.measure_s, ("ttft_seconds", "queue_seconds"))
            service = _service_ttft(cols)
            self.last_service_ttft = _p95(service) if service.size >= c.min_requests else None
        if c.slo_ttft_p95_s is not None:
            ttft = self.last_service_ttft
        if c.slo_ttft_p95_s is not None and ttft is not None and ttft > c.slo_ttft_p95_s:
            slo_missed = True
        if c.slo_tpot_p95_s is not None and tpot is not None and tpot > c.slo_tpot_p95_s:
            slo_missed = True
        if slo_missed:
            if self.slo_bad_since is None:
                self.slo_bad_since = w.t
            elif w.t - self.slo_bad_since >= c.measure_s and cur > c.min:
                self.slo_bad_since = None
                self._new_tuning()
                self.phase, self.next_phase = "measure", "explore"
                return self._go(
                    w, cur, cur // 2, "latency SLO missed for a whole window: halving", ttft_p95=ttft, tpot_p95=tpot
                )
        else:
            self.slo_bad_since = None
        # load or prompt mix shifted: re-tune
        ref = self.hold_ref
        if ref is not None and w.t >= self.next_shift_check:
            self.next_shift_check = w.t + c.measure_s / 2
            since = w.t - c.measure_s * 2
            cols = w.request_columns(since, ("tokens", "prompt_tokens", "queue_seconds", "e2e_seconds"))
            n = cols["tokens"].size
            if n >= c.min_requests * 2:
                rate = n / (c.measure_s * 2)
                prompt = cols["prompt_tokens"][~np.isnan(cols["prompt_tokens"])]
                pm = float(prompt.mean()) if prompt.size else None
                # saturated (a backlog: requests wait longer than they take to serve): the completion rate
                # is the service rate, which moves with the machine, not the demand; only the prompt mix
                # says something then.  On the shared demo host this re-tuned a held knee twice in 200 s.
                shift_rate = 0.0 if _saturated(cols) else abs(rate - ref.rate) / max(ref.rate, 1e-9)
                shift_prompt = (
                    abs(pm - ref.prompt_mean) / max(ref.prompt_mean, 1e-9)
                    if pm is not None and ref.prompt_mean
                    else 0.0
                )
                if max(shift_rate, shift_prompt) > c.retune_shift:
                    self._new_tuning()
                    self.hold_ref = None
                    start = self._cap(max(c.min, cur // 4))
                    self.phase, self.next_phase = "measure", "explore"
                    if start == cur:
                        self.changed_at = w.t
                        return []
                    return self._go(
                        w,
                        cur,
                        start,
                        f"re-tuning: request rate {ref.rate:.2f} -> {rate:.2f}/s, prompt mean "
                        f"{ref.prompt_mean or 0:.0f} -> {pm or 0:.0f} tokens",
                        shift_rate=shift_rate,
                        shift_prompt=shift_prompt,
                    )
        return []

    def _oom(self, w: Window, knobs: Knobs, oom_bs: Any, headroom: float | None) -> list[Action]:
        c = self.cfg
        cur = knobs.batch_size if knobs.batch_size is not None else c.start or c.min
        b = int(oom_bs) if isinstance(oom_bs, (int, float)) and not isinstance(oom_bs, bool) and oom_bs >= 1 else cur
        self.ceiling = max(c.min + 1, b) if self.ceiling is None else min(self.ceiling, max(c.min + 1, b))
        self.ceiling_headroom = headroom
        for k in [k for k in self.measured if k >= self.ceiling]:
            del self.measured[k]
        self.confirm_queue = []
        new = self._cap(max(c.min, min(cur, b) // 2))
        self.phase, self.next_phase = "measure", "hold"
        self.changed_at = w.t
        ev = self._evidence(w, oom_batch=b, urgent=True)
        acts = [self.act("cleanup", list(c.cleanup_steps), f"out of memory at batch {b}: freeing memory", **ev)]
        if new != cur:
            acts.insert(
                0, self.act("batch_size", new, f"out of memory at batch {b}: halving, ceiling {self.ceiling}", **ev)
            )
        return acts

    def feedback(self, applied: Applied) -> None:
        if applied.action.knob == "batch_size" and applied.outcome in ("applied", "clamped", "dry-run"):
            self.changed_at = applied.t
            if applied.outcome == "clamped":
                self.phase = "measure"
        elif (
            applied.action.knob == "batch_size"
            and applied.outcome in ("rejected", "failed")
            and self.phase == "measure"
            and self.next_phase in ("explore", "refine", "confirm")
        ):
            # not changed.  A cooldown passes: propose again from the same measurements.  Anything else
            # (memory pressure, no client) ends the exploration here.
            if str(applied.result.get("why", "")).startswith("cooldown"):
                self.phase = self.next_phase
            else:
                self.phase = "hold" if self.measured else "measure"
                self.changed_at = applied.t
                self.confirm_queue = []
