"""Core records that cross boundaries: samples, events, actions, knobs.

Metric keys are flat strings: ``<name>`` or ``<name>/<device>`` where the name is snake_case and ends in
its unit (``_bytes``, ``_seconds``, ``_ratio``, ``_count``, ``_celsius``, ``_watts``, ``_hertz``,
``_per_second``).  ``_ratio`` is a fraction where 1.0 means "one whole unit busy" (a CPU ratio of 1.5 is
one and a half cores).  The device part (``gpu_util_ratio/0``) becomes a ``device`` label in Prometheus.
Times are seconds on the monotonic clock, relative to the start of the trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Value = float | None

UNIT_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_bytes", "bytes"),
    ("_seconds", "seconds"),
    ("_ratio", "ratio"),
    ("_count", "count"),
    ("_celsius", "celsius"),
    ("_watts", "watts"),
    ("_hertz", "hertz"),
    ("_per_second", "per_second"),
    ("_total", "count"),
)


def split_key(key: str) -> tuple[str, str | None]:
    """``'gpu_util_ratio/0'`` -> ``('gpu_util_ratio', '0')``; a key without a device -> ``(key, None)``."""
    name, sep, dev = key.partition("/")
    return name, (dev if sep else None)


def unit_of(key: str) -> str:
    """The unit a metric key declares by its suffix, or ``'value'``."""
    name, _ = split_key(key)
    for suffix, unit in UNIT_SUFFIXES:
        if name.endswith(suffix):
            return unit
    return "value"


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened at one instant: a request finished, a process exited, a probe slowed down."""

    t: float
    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sample:
    """One probe's reading at one tick.  Missing values are ``None``.

    ``procs`` holds per-process values keyed by PID (for probes that see the process tree), and
    ``events`` anything the probe noticed while sampling (a process that exited between two ticks).
    """

    probe: str
    t: float
    values: Mapping[str, Value]
    procs: Mapping[int, Mapping[str, Any]] | None = None
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class Knobs:
    """The values the inference side reads.  ``None`` means "the user's own setting, untouched"."""

    temperature: float | None = None
    repetition_penalty: float | None = None
    batch_size: int | None = None
    precision: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "repetition_penalty": self.repetition_penalty,
            "batch_size": self.batch_size,
            "precision": self.precision,
        }


@dataclass(frozen=True, slots=True)
class Action:
    """A policy's decision: set ``knob`` to ``value`` (or run a command such as ``cleanup``), with why."""

    policy: str
    knob: str
    value: Any
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Applied:
    """What became of an action: ``applied``, ``clamped``, ``rejected``, ``failed`` or ``dry-run``."""

    t: float
    action: Action
    outcome: str
    previous: Any = None
    result: Mapping[str, Any] = field(default_factory=dict)
