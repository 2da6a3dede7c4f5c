"""The arbiter: turns the policies' proposals of one tick into decisions.

In order:
0. **validity** — an unknown knob, or a value the knob cannot hold (a number that is not finite, a bool or
   a string for a numeric knob, a fractional batch size, a precision not in ``PRECISIONS``, a negative
   temperature, a batch size under 1) is rejected: whatever a policy returns, no knob is ever set
   outside its bounds (property-tested in ``tests/test_faults_policy.py``);
1. **bounds** — a value outside the knob's configured bounds is clamped (outcome ``clamped``); one that
   cannot be brought inside them (an integer knob between two integers) is rejected;
2. **no-ops** — setting a knob to the value it already has is dropped silently;
3. **conflicts** — under memory pressure (a precision step-down proposed this tick, or headroom below
   the pressure threshold) a batch-size *increase* is rejected: less memory first, more work later;
4. **priority** — one decision per knob per tick: the proposal of the policy listed first in
   ``priority`` wins, the others are rejected;
5. **cooldown** — a knob changed less than its cooldown ago is not changed again (rejected).
   Commands (cleanup) have a cooldown too.  The exceptions, marked ``urgent`` by their policy: a
   batch-size *decrease* answering an out-of-memory report (waiting would mean more OOMs), a
   precision step back *up* undoing a change the quality guard failed, and a cleanup whose evidence projects
   the memory limit (``time_to_limit_s``) within twice what is left of the cooldown, or within the time a
   command may wait for the current batch (``COMMAND_DELAY_S``).

The arbiter is deterministic and keeps only the time each knob last changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.policies.base import Bounds
from tuner.records import BITS, PRECISIONS, Action, Knobs


@dataclass(frozen=True)
class Decision:
    action: Action
    outcome: str
    """``accept``, ``clamped`` (accepted with ``action.value`` changed) or ``rejected``."""
    why: str = ""


@dataclass
class Arbiter:
    bounds: Mapping[str, Bounds] = field(default_factory=dict)
    cooldown_s: Mapping[str, float] = field(default_factory=dict)
    priority: Sequence[str] = ("cleanup", "precision", "batch_size", "temperature")
    pressure_headroom: float | None = None
    """Headroom ratio under which memory counts as under pressure (batch increases are refused)."""
    last_change: dict[str, float] = field(default_factory=dict)

    def _rank(self, policy: str) -> int:
        try:
            return list(self.priority).index(policy)
        except ValueError:
            return len(self.priority)

    def resolve(
        self, t: float, proposals: Sequence[Action], knobs: Knobs, headroom: float | None = None
    ) -> list[Decision]:
        out: list[Decision] = []
        by_knob: dict[str, list[Action]] = {}
        for a in proposals:
            by_knob.setdefault(a.knob, []).append(a)
        step_down = any(
            a.knob == "precision"
            and isinstance(a.value, str)
            and a.value in PRECISIONS
            and _bits(a.value) < _bits(knobs.precision)
            for a in proposals
        )
        pressure = step_down or (
            self.pressure_headroom is not None and headroom is not None and headroom < self.pressure_headroom
        )
        for knob in sorted(by_knob, key=lambda k: min(self._rank(a.policy) for a in by_knob[k])):
            cands = sorted(by_knob[knob], key=lambda a: self._rank(a.policy))
            winner: Decision | None = None
            for a in cands:
                if winner is not None:
                    out.append(Decision(a, "rejected", f"{winner.action.policy} has priority on {knob}"))
                    continue
                winner = self._one(t, a, knobs, pressure, step_down)
                if winner is not None:  # None: a no-op, let a lower-priority proposal be heard
                    out.append(winner)
        for d in out:
            if d.outcome in ("accept", "clamped"):
                self.last_change[d.action.knob] = t
        return out

    def _one(self, t: float, a: Action, knobs: Knobs, pressure: bool, step_down: bool) -> Decision | None:
        outcome = "accept"
        why = ""
        bad = _invalid(a.knob, a.value)
        if bad:
            return Decision(a, "rejected", bad)
        b = self.bounds.get(a.knob)
        value: Any = a.value
        if a.knob == "batch_size" and type(value) is not int:
            value = int(value)  # an integral float (checked by _invalid)
            a = Action(a.policy, a.knob, value, a.reason, a.evidence)
        if b is not None and a.knob != "cleanup":
            if b.choices is not None:
                if value not in b.choices:
                    return Decision(a, "rejected", f"{value!r} is not one of the allowed {a.knob} values")
            else:
                clamped = _clamp(b, value, integer=a.knob == "batch_size")
                if clamped is None or _invalid(a.knob, clamped):  # bounds with no valid value (a config slip)
                    return Decision(a, "rejected", f"{value!r} cannot be brought inside the {a.knob} bounds")
                if clamped != value:
                    outcome, why, value = "clamped", f"clamped from {value!r} to bounds", clamped
                    a = Action(a.policy, a.knob, value, a.reason, a.evidence)
        if a.knob != "cleanup" and getattr(knobs, a.knob, None) == value:
            return None
        if a.knob == "batch_size" and pressure:
            cur = knobs.batch_size
            if cur is not None and isinstance(value, (int, float)) and value > cur:
                why = (
                    "a precision step-down outranks a batch increase under memory pressure"
                    if step_down
                    else "memory headroom is under the pressure threshold: no batch increase"
                )
                return Decision(a, "rejected", why)
        cool = self.cooldown_s.get(a.knob, 0.0)
        last = self.last_change.get(a.knob)
        urgent = a.evidence.get("urgent") is True and (
            # an OOM response cannot wait, nor can undoing a precision the quality guard failed
            (
                a.knob == "batch_size"
                and knobs.batch_size is not None
                and isinstance(value, (int, float))
                and value < knobs.batch_size
            )
            or (a.knob == "precision" and _bits(str(value)) > _bits(knobs.precision))
            or (a.knob == "cleanup" and last is not None and _before_cooldown(a, cool - (t - last)))
        )
        # times are trace times to the microsecond: 1.336658 - 0.336658 is 0.99999999..., which is 1 s
        if last is not None and round(t - last, 6) < cool and not urgent:
            return Decision(a, "rejected", f"cooldown: {a.knob} changed {t - last:.2f} s ago (cooldown {cool:g} s)")
        return Decision(a, outcome, why)


def narrow_bounds(
    bounds: Mapping[str, Bounds], *, temperature: Sequence[float] | None = None, batch_max: int | None = None
) -> dict[str, Bounds]:
    """``bounds`` narrowed to what carries the knobs out can do (``tuner proxy`` sends a temperature clamped
    into ``temperature`` = (lo, hi) and caps concurrency at ``batch_max``).  With them the arbiter clamps
    first, so the value an action records is the value used; a range with no usable value leaves nothing to
    set (the action is rejected).  ``tuner replay`` narrows the same way from a proxy trace's header."""
    out = dict(bounds)
    if temperature is not None:
        lo, hi = float(temperature[0]), float(temperature[1])
        t = bounds.get("temperature") or Bounds()
        out["temperature"] = Bounds(
            max(lo, t.lo) if t.lo is not None else lo, min(hi, t.hi) if t.hi is not None else hi
        )
    if batch_max is not None:
        b = bounds.get("batch_size") or Bounds()
        out["batch_size"] = Bounds(b.lo, min(batch_max, b.hi) if b.hi is not None else batch_max)
    return out


COMMAND_DELAY_S = 15.0
"""A command runs between batches: on the demo one batch takes up to ~15 s."""


def _before_cooldown(a: Action, remaining: float) -> bool:
    """The action's projected time to the memory limit is shorter than twice what is left of the cooldown, or
    than a command may take to run (the projection follows the memory *floor*, and its rate moves: in the demo
    a cleanup held back with 14 s projected and 9 s of cooldown left saw the working set at 96% of the limit,
    and one held while its projection fell 40 -> 4 s in step with the cooldown at 94%)."""
    ttl = a.evidence.get("time_to_limit_s")
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool):
        return False
    return ttl < 2.0 * remaining or ttl < COMMAND_DELAY_S


NUMERIC_KNOBS: tuple[str, ...] = ("temperature", "repetition_penalty", "batch_size")


def _invalid(knob: str, value: Any) -> str | None:
    """Why ``value`` can never be set on ``knob`` (None when it can); what the client would refuse too."""
    if knob == "cleanup":
        return None
    if knob == "precision":
        if isinstance(value, str) and value in PRECISIONS:
            return None
        return f"precision {value!r} is not one of {', '.join(PRECISIONS)}"
    if knob not in NUMERIC_KNOBS:
        return f"unknown knob {knob!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{knob} = {value!r} is not a finite number"
    if knob == "batch_size":
        if value != int(value):
            return f"batch_size = {value!r} is not a whole number"
        if value < 1:
            return f"batch_size = {value!r} is under 1"
    elif knob == "temperature" and value < 0:
        return f"temperature = {value!r} is negative"
    elif knob == "repetition_penalty" and value <= 0:
        return f"repetition_penalty = {value!r} is not positive"
    return None


def _clamp(b: Bounds, value: float, *, integer: bool) -> float | None:
    """``value`` brought inside ``[b.lo, b.hi]`` (whole numbers for an integer knob), None if impossible."""
    lo, hi = b.lo, b.hi
    if integer:
        lo = None if lo is None else math.ceil(lo)
        hi = None if hi is None else math.floor(hi)
    if lo is not None and hi is not None and lo > hi:
        return None
    if lo is not None and value < lo:
        value = int(lo) if integer else float(lo)
    if hi is not None and value > hi:
        value = int(hi) if integer else float(hi)
    return value if b.contains(value) else None


def _bits(p: str | None) -> int:
    return BITS.get(p or "fp32", 32)
