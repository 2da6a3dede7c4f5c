"""What every policy is: a named state machine that reads a ``Window`` and proposes ``Action``s.

A policy never actuates.  ``decide(window, knobs)`` may change only the policy's own state (its phase,
its measurements); the agent tells it what became of each proposal (``feedback``) and what the
inference side answered to a command (``on_result``).  It declares the knobs it may touch and their
bounds: an action outside them disables the policy (the agent reports it and runs on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.core.window import Window
from tuner.records import Action, Applied, Knobs

COMMAND_KNOBS: tuple[str, ...] = ("precision", "cleanup")
"""Knobs that are carried out by a command on the inference side (a result comes back later)."""


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds ``[lo, hi]`` of a knob, or the allowed values of a categorical one."""

    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value != value:  # NaN
            return False
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def clamp(self, value: Any) -> Any:
        if self.choices is not None or not isinstance(value, (int, float)):
            return value
        if self.lo is not None and value < self.lo:
            value = type(value)(self.lo)
        if self.hi is not None and value > self.hi:
            value = type(value)(self.hi)
        return value


class Policy:
    """Base class: subclasses set ``name``, ``knobs`` and ``keys`` and implement ``decide``."""

    name: str = "policy"
    knobs: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    """Metric keys the policy reads (the agent's window keeps only what some policy reads)."""
    prefixes: tuple[str, ...] = ()
    interval_s: float = 1.0
    """The agent asks at most this often (and at once when an event such as ``oom`` arrives)."""

    def __init__(self, bounds: Mapping[str, Bounds] | None = None) -> None:
        self.bounds: dict[str, Bounds] = dict(bounds or {})
        self.phase = "warmup"

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        raise NotImplementedError

    def feedback(self, applied: Applied) -> None:
        """What became of one of this policy's actions (``applied``, ``clamped``, ``dry-run``,
        ``rejected``, ``failed``)."""

    def on_result(self, t: float, action: Action, ok: bool, result: Mapping[str, Any], error: str | None) -> None:
        """The inference side's answer to a command this policy asked for (precision, cleanup)."""

    def allows(self, action: Action) -> str | None:
        """None when ``action`` is within this policy's knobs and bounds, else why not."""
        if action.knob not in self.knobs:
            return f"knob {action.knob!r} is not one of {self.name}'s ({', '.join(self.knobs)})"
        b = self.bounds.get(action.knob)
        if b is not None and not b.contains(action.value):
            return f"{action.knob} = {action.value!r} is outside its bounds {describe(b)}"
        return None

    def status(self) -> dict[str, Any]:
        """The state for people and the TUI."""
        return {"phase": self.phase}

    def act(self, knob: str, value: Any, reason: str, **evidence: Any) -> Action:
        evidence.setdefault("phase", self.phase)
        return Action(self.name, knob, value, reason, {k: _rounded(v) for k, v in evidence.items()})


def describe(b: Bounds) -> str:
    if b.choices is not None:
        return "{" + ", ".join(b.choices) + "}"
    return f"[{b.lo:g}, {b.hi:g}]" if b.lo is not None and b.hi is not None else f"[{b.lo}, {b.hi}]"


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return None
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x) for x in v]
    return v
