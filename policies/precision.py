"""Precision: step down (fp32 -> bf16/fp16 -> int8, along the configured ladder) when memory headroom
stays under a threshold (or the binding limit is projected within the horizon and neither a cleanup nor a
smaller batch gave the room back: ``Window.memory_pressure()``), or when the latency SLO stays missed and a
smaller batch was tried *and measured* not to fix it; step back up once the cause has been gone for ``hold_s``.

Latency here is the *service* time to first token (TTFT minus the time queued), p95 over the last
``latency_window_s``: a queue is a matter of throughput (the batch policy's), and a precision step taken on
queueing latency changed the model for a backlog a larger batch could drain (the demo, seed 7: int8 while
the batch policy re-searched from batch 2).  "Tried and measured": the batch policy applied a smaller batch
(within ``batch_tried_s``, or it is still in force, and after this policy's last step) and either the requests
served at it still missed the SLO (at least ``min_requests`` of them, service p95 over the SLO), or the batch
policy undid it because the queue grew (its action's ``cause = "queue"``).  The cause is gone when the service
TTFT predicted back at the higher precision (the current p95 times the ratio measured across the step) is
``release_margin`` under the SLO (latency), or the headroom is back over ``release_headroom`` (memory).

The quality guard runs on the inference side (``PrecisionManager``: a fixed canary prompt set, KL
divergence and top-1 agreement against the fp32 reference).  Its figures come back in the
``precision`` command's result; over this policy's budget (``max_kl`` / ``min_top1``) the policy
rolls back to the previous precision and holds there for ``hold_s``; a refusal by the client (its own
guard, or no handler) also holds.  Memory and speed before and after each change are recorded in the
evidence of the next decision (``last_change``), and a change that made things *slower* while it
was made for latency is rolled back (bf16 on this CPU ran 3.5x slower: never assume a step helps).

With ``--consistency`` the step is also judged by its answers (issue 17): the inference side answers a canary
prompt set at fp32 (once) and after the step, the sidecar's scorer compares them (``quality_reference``
events), and the step commits only if that reference consistency, normalised against the same run's baseline
(the fp32 answers of *different* canary prompts), stays at or above ``min_reference`` as well as KL and top-1
within their budgets; otherwise it rolls back and holds.  The three figures are kept with the step
(``last_change``: ``kl``, ``top1``, ``reference``) and in the rollback's evidence.  On the demo int8 kept KL at
0.004 and top-1 at 1.0 while only 2 of 24 greedy canary answers stayed the same (normalised 0.26): token-level
figures alone miss it (docs/quality.md).

States: ``watch`` -> ``pending`` (command sent, awaiting its result) -> ``verify`` (awaiting the reference
consistency, with ``--consistency``) -> ``settle`` (measuring after) -> ``watch``; ``hold`` after a refusal or a
rollback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuner.core.window import Window
from tuner.policies.base import Bounds, Policy
from tuner.policies.batch_size import service_ttft_p95
from tuner.records import BITS, Action, Applied, Knobs


@dataclass(frozen=True)
class PrecisionConfig:
    ladder: tuple[str, ...] = ("fp32", "bf16", "int8")
    min_headroom: float = 0.15
    release_headroom: float = 0.30
    slo_ttft_p95_s: float | None = None
    trigger_s: float = 10.0
    hold_s: float = 120.0
    settle_s: float = 15.0
    max_kl: float = 0.05
    min_top1: float = 0.9
    max_slowdown: float = 0.2
    """A step made for latency that lowers tokens/s by more than this share is rolled back."""
    retry_s: float = 10.0
    """After a command that could not be sent (no client connected), wait this long before trying again."""
    batch_tried_s: float = 120.0
    """A smaller batch counts as tried when it was applied within this long (or is still in force)."""
    latency_window_s: float = 20.0
    """Service TTFT p95 over the requests that ended in this many seconds."""
    min_requests: int = 8
    """Requests a service TTFT figure needs."""
    release_margin: float = 0.2
    """Latency cause gone: the TTFT predicted at the higher precision is this share under the SLO."""
    min_reference: float = 0.5
    """Reference consistency floor (``--consistency``): a step down commits only if the canary prompts' answers
    stay at least this close to their fp32 answers, *normalised* against the same run's baseline (the fp32
    answers of different canary prompts): 1 = the same answers, 0 = no closer than another prompt's.  The
    backend's own scale drops out (docs/quality.md).  0: off."""
    reference_wait_s: float = 60.0
    """How long after the step's result to wait for the reference figure (the scorer's queue); then it commits on
    KL / top-1 alone and says so."""


class PrecisionPolicy(Policy):
    name = "precision"
    knobs = ("precision",)
    keys = ("req_ttft_p95_seconds", "req_tokens_per_second", "tree_rss_bytes")

    def __init__(self, cfg: PrecisionConfig) -> None:
        super().__init__({"precision": Bounds(choices=tuple(cfg.ladder))})
        self.cfg = cfg
        self.phase = "watch"
        self.pressure_since: float | None = None
        self.calm_since: float | None = None
        self.hold_until = 0.0
        self.before: dict[str, Any] = {}
        self.last_change: dict[str, Any] = {}
        self.changed_at = 0.0
        self.cause = ""
        self.rolling_back = False
        self.stepped_at = -math.inf
        """When this policy last changed the precision (a batch tried before that was tried at another one)."""
        self.references: list[tuple[float, dict[str, Any]]] = []
        """Recent ``quality_reference`` figures (time, data): the canary rounds the scorer measured."""

    def status(self) -> dict[str, Any]:
        return {"phase": self.phase, "hold_until": self.hold_until, "last_change": self.last_change}

    def _snapshot(self, w: Window) -> dict[str, Any]:
        headroom, dev = w.headroom()
        return {
            "headroom": headroom,
            "device": dev,
            "rss_bytes": w.mean("tree_rss_bytes", 5.0),
            "tok_s": w.mean("req_tokens_per_second", 10.0),
            "ttft_p95": w.mean("req_ttft_p95_seconds", 10.0),
            "service_ttft_p95": self._service_ttft(w),
        }

    def _service_ttft(self, w: Window, since: float | None = None, until: float | None = None) -> float | None:
        """p95 service TTFT (TTFT - queue) of the requests that ended in the last ``latency_window_s`` (at
        least the last ``min_requests`` of ``hold_s``), or of those that *started* in ``(since, until]``; None
        with fewer than ``min_requests``."""
        c = self.cfg
        cols = w.request_columns(w.t - max(c.latency_window_s, c.hold_s) if since is None else since,
                                 ("t", "ttft_seconds", "queue_seconds", "e2e_seconds"))
        if since is None:  # the last latency_window_s, or the last min_requests when fewer ended in it
            n = max(int(np.count_nonzero(cols["t"] > w.t - c.latency_window_s)), c.min_requests)
            cols = {k: v[-n:] for k, v in cols.items()}
        else:
            start = cols["t"] - cols["e2e_seconds"] + np.where(np.isnan(cols["queue_seconds"]), 0.0,
                                                                cols["queue_seconds"])
            keep = (start > since) & (start <= (w.t if until is None else until))
            cols = {k: v[keep] for k, v in cols.items()}
        return service_ttft_p95(cols, c.min_requests)

    def _low_memory(self, w: Window) -> str | None:
        """Why memory counts as under pressure (None when it does not): headroom under ``min_headroom``, or the
        binding limit projected within the horizon after a cleanup and then a smaller batch did not help (the
        batch went down in this episode, or the episode outlasted ``batch_tried_s``)."""
        headroom, dev = w.headroom()
        if headroom is not None and headroom < self.cfg.min_headroom:
            return f"memory headroom {headroom:.0%} on {dev} under {self.cfg.min_headroom:.0%}"
        mp = w.memory_pressure()
        if mp is not None and mp.escalate:
            lowered = any(a.action.knob == "batch_size" and a.outcome in ("applied", "clamped", "pending", "dry-run")
                          and a.t >= mp.since and isinstance(a.previous, (int, float))
                          and isinstance(a.action.value, (int, float)) and a.action.value < a.previous
                          for a in w.actions)  # fmt: skip
            if lowered or w.t - mp.since >= self.cfg.batch_tried_s:
                return f"{mp.describe()}; a cleanup and a smaller batch did not help"
        return None

    def _level(self, knobs: Knobs) -> int:
        p = knobs.precision or self.cfg.ladder[0]
        ladder = self.cfg.ladder
        if p in ladder:
            return ladder.index(p)
        # a precision outside the ladder (e.g. fp16 with a bf16 ladder): the rung with the same bits
        for i, q in enumerate(ladder):
            if BITS[q] == BITS.get(p, 32):
                return i
        return 0

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        c = self.cfg
        w = window
        for e in w.events:
            if e.kind == "quality_reference":
                self.references = [*self.references[-7:], (e.t, dict(e.data))]
        if self.phase == "verify":
            self._verify(w.t)
        if self.phase == "rollback":
            return self.decide_rollback(knobs)
        if self.phase == "verify":
            return []
        if self.phase == "pending":
            if w.t - self.changed_at > c.hold_s:  # no answer came (client gone): hold, then look again
                self.phase, self.hold_until, self.rolling_back = "hold", w.t + c.hold_s, False
            return []
        if self.phase == "settle":
            if w.t - self.changed_at < c.settle_s:
                return []
            after = self._snapshot(w)
            self.last_change = {**self.last_change, "after": after}
            self.phase = "watch"
            b_tok, a_tok = self.before.get("tok_s"), after.get("tok_s")
            if (
                self.cause == "latency"
                and b_tok
                and a_tok is not None
                and a_tok < (1 - c.max_slowdown) * b_tok
                and self.last_change.get("from")
            ):
                prev = self.last_change["from"]
                self.phase, self.hold_until, self.rolling_back = "pending", w.t + c.hold_s, True
                self.changed_at = w.t
                return [
                    self.act(
                        "precision",
                        prev,
                        f"{knobs.precision} made decoding slower ({b_tok:.0f} -> {a_tok:.0f} tok/s): rolling back",
                        before=self.before,
                        after=after,
                        urgent=True,
                    )
                ]
        if self.phase == "hold" and w.t < self.hold_until:
            return []
        if self.phase == "hold":
            self.phase = "watch"
        headroom, _ = w.headroom()
        low_mem = self._low_memory(w)
        ttft = self._service_ttft(w) if c.slo_ttft_p95_s is not None else None
        slo_missed = c.slo_ttft_p95_s is not None and ttft is not None and ttft > c.slo_ttft_p95_s
        tried = self._batch_tried(w) if slo_missed else None
        pressure = low_mem is not None or tried is not None
        level = self._level(knobs)
        if pressure:
            self.calm_since = None
            if self.pressure_since is None:
                self.pressure_since = w.t
            if w.t - self.pressure_since >= c.trigger_s and level + 1 < len(c.ladder):
                self.cause = "memory" if low_mem is not None else "latency"
                why = low_mem or f"service TTFT p95 {ttft:.2f} s over the SLO {c.slo_ttft_p95_s:g} s; {tried}"
                return [self._step(w, knobs, c.ladder[level + 1], f"{why}: stepping down", service_ttft_p95=ttft)]
            return []
        self.pressure_since = None
        latency_calm = self._latency_calm(ttft)
        if latency_calm is None:  # too few requests to tell: neither calm nor pressed
            return []
        calm = (headroom is None or headroom >= c.release_headroom) and latency_calm and w.memory_pressure() is None
        if level > 0 and calm:
            if self.calm_since is None:
                self.calm_since = w.t
            if w.t - self.calm_since >= c.hold_s:
                self.cause = "release"
                self.calm_since = None
                return [self._step(w, knobs, c.ladder[level - 1], "pressure gone for the hold period: stepping up")]
        elif not calm:
            self.calm_since = None
        return []

    def _batch_tried(self, w: Window) -> str | None:
        """How a smaller batch was tried and measured not to fix the latency (None: it was not): the latest
        batch decrease (applied within ``batch_tried_s``, or still in force, and since this policy's last
        step) was undone because the queue grew, or the requests that started while it was in force still
        missed the SLO."""
        c = self.cfg
        slo = c.slo_ttft_p95_s
        acts = [a for a in w.actions if a.action.knob == "batch_size" and a.outcome in ("applied", "clamped", "dry-run")
                and isinstance(a.action.value, (int, float)) and isinstance(a.previous, (int, float))]
        for i in range(len(acts) - 1, -1, -1):
            dec = acts[i]
            if dec.t < self.stepped_at:
                return None  # tried at another precision: the batch is tried again at this one first
            if dec.action.value >= dec.previous:
                continue
            later = acts[i + 1] if i + 1 < len(acts) else None
            if later is not None and w.t - later.t > c.batch_tried_s:
                return None  # long ago, and no longer in force
            undone = later is not None and later.action.value > dec.action.value
            if undone and later is not None and later.action.evidence.get("cause") == "queue":
                return f"batch {dec.action.value} (from {dec.previous}) grew the queue and was undone"
            if later is None and w.t - dec.t < c.latency_window_s:
                return None  # still being measured
            p95 = self._service_ttft(w, since=dec.t, until=later.t if later is not None else None)
            if p95 is not None and slo is not None and p95 > slo:
                return f"still {p95:.2f} s at batch {dec.action.value} (from {dec.previous})"
            return None
        return None

    def _latency_calm(self, ttft: float | None) -> bool | None:
        """The latency cause is gone: the service TTFT predicted at the higher precision (now times the ratio
        measured across the step, when this policy stepped for latency) is ``release_margin`` under the SLO;
        None when a step for latency is in force and too few requests ended to tell."""
        c = self.cfg
        if c.slo_ttft_p95_s is None:
            return True
        if ttft is None:
            return None if self.last_change.get("cause") == "latency" else True
        ratio = 1.0
        if self.last_change.get("cause") == "latency":
            b = (self.last_change.get("before") or {}).get("service_ttft_p95")
            a = (self.last_change.get("after") or {}).get("service_ttft_p95")
            ratio = b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > a else 1.0
        return ttft * ratio <= (1 - c.release_margin) * c.slo_ttft_p95_s

    def _step(self, w: Window, knobs: Knobs, to: str, reason: str, **more: Any) -> Action:
        self.before = self._snapshot(w)
        self.stepped_at = w.t
        self.phase = "pending"
        self.changed_at = w.t
        self.rolling_back = False
        self.last_change = {"from": knobs.precision or self.cfg.ladder[0], "to": to, "before": self.before,
                            "cause": self.cause}
        return self.act(
            "precision",
            to,
            reason,
            before=self.before,
            budget={"max_kl": self.cfg.max_kl, "min_top1": self.cfg.min_top1},
            cause=self.cause,
            **more,
        )

    def feedback(self, applied: Applied) -> None:
        if applied.action.knob != "precision":
            return
        if applied.outcome == "dry-run":  # no result will come: go on as if applied
            self.changed_at = applied.t
            self.phase = "hold" if self.rolling_back else "settle"
        elif applied.outcome in ("rejected", "failed"):
            if self.rolling_back and applied.outcome == "rejected":  # it must still happen: try again
                self.phase, self.rolling_back = "rollback", False
                return
            self.phase = "watch" if applied.outcome == "rejected" else "hold"
            if applied.outcome == "failed":  # e.g. no client connected yet: look again soon
                self.hold_until = applied.t + self.cfg.retry_s

    def on_result(self, t: float, action: Action, ok: bool, result: Mapping[str, Any], error: str | None) -> None:
        c = self.cfg
        if self.rolling_back:
            self.phase, self.rolling_back = "hold", False
            self.hold_until = max(self.hold_until, t + c.hold_s)
            return
        if not ok:
            self.phase, self.hold_until = "hold", t + c.hold_s
            self.last_change = {**self.last_change, "refused": error}
            return
        kl, top1 = result.get("kl"), result.get("top1")
        self.last_change = {**self.last_change, "kl": kl, "top1": top1, "result": dict(result)}
        over = (isinstance(kl, (int, float)) and kl > c.max_kl) or (
            isinstance(top1, (int, float)) and top1 < c.min_top1
        )
        self.changed_at = t
        if over:
            self.phase = "rollback"
            self.hold_until = t + c.hold_s
        elif c.min_reference > 0 and isinstance(result.get("canary_answers"), int) and result["canary_answers"] > 0:
            self.phase = "verify"  # the canary answers went to the scorer: its figure decides (``_verify``)
        else:
            self.phase = "settle"

    def _verify(self, t: float) -> None:
        """The step's reference consistency arrived (or did not in time): commit, or roll back and hold."""
        c = self.cfg
        to = self.last_change.get("to")
        got = next((d for at, d in reversed(self.references) if at >= self.changed_at - 1.0 and d.get("precision")
                    == to), None)
        if got is None:
            if t - self.changed_at < c.reference_wait_s:
                return
            self.last_change = {**self.last_change, "reference": {"normalised": None, "reason": "no reference "
                                f"consistency figure within {c.reference_wait_s:g} s"}}
            self.phase = "settle"
            return
        ref = {k: got.get(k) for k in ("backend", "mean", "min", "identical", "n", "unrelated_mean", "normalised",
                                       "reason")}
        ref["floor"] = c.min_reference
        self.last_change = {**self.last_change, "reference": ref}
        norm = got.get("normalised")
        if isinstance(norm, (int, float)) and norm < c.min_reference:
            self.phase = "rollback"
            self.hold_until = t + c.hold_s
        else:  # above the floor, or not measurable (the reason is kept with the step)
            self.phase = "settle"

    def decide_rollback(self, knobs: Knobs) -> list[Action]:
        prev = self.last_change.get("from")
        if not prev:
            self.phase = "hold"
            return []
        self.phase, self.rolling_back = "pending", True
        ref = self.last_change.get("reference")
        norm = ref.get("normalised") if isinstance(ref, dict) else None
        if isinstance(norm, (int, float)) and norm < self.cfg.min_reference:
            assert isinstance(ref, dict)
            kl, top1 = self.last_change.get("kl"), self.last_change.get("top1")
            figures = (f"KL {kl:.4g} and top-1 {top1:.3f} were within budget" if isinstance(kl, (int, float))
                       and isinstance(top1, (int, float)) else "KL and top-1 were not measured")
            why = (f"quality guard: canary answers at {self.last_change.get('to')} drifted from fp32's: reference "
                   f"consistency {ref.get('mean'):.3f} ({ref.get('backend')}), {norm:.2f} of the way from unrelated "
                   f"answers ({ref.get('unrelated_mean'):.3f}) to the same answers, under the floor "
                   f"{self.cfg.min_reference:g}; {figures}: rolling back and holding")
        else:
            why = (f"quality guard: KL {self.last_change.get('kl')} / top-1 {self.last_change.get('top1')} over "
                   f"budget (max KL {self.cfg.max_kl}, min top-1 {self.cfg.min_top1}): rolling back and holding")
        return [
            self.act(
                "precision",
                prev,
                why,
                urgent=True,
                **{k: v for k, v in self.last_change.items() if k in ("kl", "top1", "from", "to", "reference")},
            )
        ]
