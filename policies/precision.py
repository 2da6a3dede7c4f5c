"""Precision: step down (fp32 -> bf16/fp16 -> int8, along the configured ladder) when memory headroom
stays under a threshold, or the latency SLO stays missed after the batch size went down; step back
up once the pressure has been gone for ``hold_s``.

The quality guard runs on the inference side (``PrecisionManager``: a fixed canary prompt set, KL
divergence and top-1 agreement against the fp32 reference).  Its figures come back in the
``precision`` command's result; over this policy's budget (``max_kl`` / ``min_top1``) the policy
rolls back to the previous precision and holds there for ``hold_s``; a refusal by the client (its own
guard, or no handler) also holds.  Memory and speed before and after each change are recorded in the
evidence of the next decision (``last_change``), and a change that made things *slower* while it
was made for latency is rolled back (bf16 on this CPU ran 3.5x slower: never assume a step helps).

States: ``watch`` -> ``pending`` (command sent, awaiting its result) -> ``settle`` (measuring after)
-> ``watch``; ``hold`` after a refusal or a rollback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.core.window import Window
from tuner.policies.base import BITS, Bounds, Policy
from tuner.records import Action, Applied, Knobs


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
    batch_tried_s: float = 30.0
    """The SLO counts as "not fixed by a smaller batch" when the batch went down within this long."""


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
        }

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
        if self.phase == "rollback":
            return self.decide_rollback(knobs)
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
        headroom, dev = w.headroom()
        ttft = w.current("req_ttft_p95_seconds")
        low_mem = headroom is not None and headroom < c.min_headroom
        slo_missed = c.slo_ttft_p95_s is not None and ttft is not None and ttft > c.slo_ttft_p95_s
        pressure = low_mem or (slo_missed and self._batch_tried(w))
        level = self._level(knobs)
        if pressure:
            self.calm_since = None
            if self.pressure_since is None:
                self.pressure_since = w.t
            if w.t - self.pressure_since >= c.trigger_s and level + 1 < len(c.ladder):
                self.cause = "memory" if low_mem else "latency"
                why = (
                    f"memory headroom {headroom:.0%} on {dev} under {c.min_headroom:.0%}"
                    if low_mem and headroom is not None
                    else f"p95 TTFT {ttft:.2f} s over the SLO {c.slo_ttft_p95_s:g} s after a smaller batch"
                )
                return [self._step(w, knobs, c.ladder[level + 1], f"{why}: stepping down")]
            return []
        self.pressure_since = None
        calm = (headroom is None or headroom >= c.release_headroom) and not slo_missed
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

    def _batch_tried(self, w: Window) -> bool:
        """Did a smaller batch get a chance: the batch size went down lately, or a decrease was refused
        (already at its minimum)?"""
        recent = list(w.actions)[-16:]
        for a in recent:
            if a.action.knob != "batch_size" or not isinstance(a.previous, (int, float)):
                continue
            if not isinstance(a.action.value, (int, float)) or a.action.value >= a.previous:
                continue
            if a.outcome in ("applied", "clamped", "dry-run") and w.t - a.t <= self.cfg.batch_tried_s:
                return True
            if a.outcome == "rejected":
                return True
        return False

    def _step(self, w: Window, knobs: Knobs, to: str, reason: str) -> Action:
        self.before = self._snapshot(w)
        self.phase = "pending"
        self.changed_at = w.t
        self.rolling_back = False
        self.last_change = {"from": knobs.precision or self.cfg.ladder[0], "to": to, "before": self.before}
        return self.act(
            "precision",
            to,
            reason,
            before=self.before,
            budget={"max_kl": self.cfg.max_kl, "min_top1": self.cfg.min_top1},
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
        else:
            self.phase = "settle"

    def pending_rollback(self) -> bool:
        return self.phase == "rollback"

    def decide_rollback(self, knobs: Knobs) -> list[Action]:
        prev = self.last_change.get("from")
        if not prev:
            self.phase = "hold"
            return []
        self.phase, self.rolling_back = "pending", True
        return [
            self.act(
                "precision",
                prev,
                f"quality guard: KL {self.last_change.get('kl')} / top-1 {self.last_change.get('top1')} over budget "
                f"(max KL {self.cfg.max_kl}, min top-1 {self.cfg.min_top1}): rolling back and holding",
                urgent=True,
                **{k: v for k, v in self.last_change.items() if k in ("kl", "top1", "from", "to")},
            )
        ]
