"""Core records that cross boundaries: samples, events, actions, knobs.

Metric keys are flat strings: ``<name>`` or ``<name>/<device>``, snake_case (``docs/conventions.md``):

- a measurement ends in its unit: ``_bytes``, ``_seconds``, ``_ratio``, ``_celsius``, ``_watts``,
  ``_joules``, ``_hertz``, ``_per_second``.  ``_ratio`` is 0..1, except the CPU of a process or a tree,
  which is cores' worth (1.5 = one and a half cores busy);
- a count of things at this moment is the plural noun with no suffix (``tree_threads``);
- a value that only grows since a start ends in ``_total`` (``req_done_total``, ``<x>_seconds_total``),
  after its unit if it has one; a decrease means the source restarted;
- never ``_count`` (Prometheus reserves it for histograms and summaries).

The device part (``gpu_util_ratio/0``) becomes a ``device`` label in Prometheus.  Keys renamed since
older traces were written are in ``RENAMED``; the trace reader applies it, so old traces read with
today's names.  Times are seconds on the monotonic clock, relative to the start of the trace.
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
    ("_celsius", "celsius"),
    ("_watts", "watts"),
    ("_joules", "joules"),
    ("_hertz", "hertz"),
    ("_per_second", "per_second"),
)
"""Unit suffixes of metric names; a name with none of them (after an optional ``_total``) is a count."""

RENAMED: dict[str, str] = {
    "tree_threads_count": "tree_threads",
    "tree_fds_count": "tree_fds",
    "tree_procs_count": "tree_procs",
    "req_done_count": "req_done_total",
    "req_active_count": "req_active",
    "chan_clients_count": "chan_clients",
    "chan_dropped_count": "chan_dropped_total",
    "threads_count": "threads",  # per-process fields (``Sample.procs``)
    "fds_count": "fds",
}
"""Old name -> today's, for metric keys and per-process fields of traces written before the rename."""
_OLD_NAMES = frozenset(RENAMED)


def split_key(key: str) -> tuple[str, str | None]:
    """``'gpu_util_ratio/0'`` -> ``('gpu_util_ratio', '0')``; a key without a device -> ``(key, None)``."""
    name, sep, dev = key.partition("/")
    return name, (dev if sep else None)


def unit_of(key: str) -> str:
    """The unit a metric key declares by its suffix (``_total`` aside): ``'bytes'``, ``'seconds'``, ...;
    ``'count'`` for a name without one (a number of things: ``tree_threads``, ``req_done_total``), but
    ``'value'`` for the knob columns the agent adds (``knob_temperature``: a setting, not a measurement)."""
    name, _ = split_key(key)
    if name.startswith("knob_"):
        return "value"
    name = name.removesuffix("_total")
    for suffix, unit in UNIT_SUFFIXES:
        if name.endswith(suffix):
            return unit
    return "count"


def renamed(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with old key names (``RENAMED``) replaced by today's, order kept: a new dict, or
    ``values`` itself when it holds none (then it costs one set test)."""
    if _OLD_NAMES.isdisjoint(values):
        return values
    return {RENAMED.get(k, k): v for k, v in values.items()}


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


PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
"""The numeric precisions a model may be switched between (the ``precision`` knob)."""
BITS: dict[str, int] = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8}
"""Bits per weight of each precision."""

GENAI_DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                                              20.48, 40.96, 81.92)  # fmt: skip
"""The OpenTelemetry GenAI conventions' advised buckets (semantic-conventions v1.41.0) for operation
durations and the time per output chunk: the proxy counts its chunk gaps in them (``chunk_gaps``)."""

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
ROW_FIELDS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("id", (int, str)),
    ("prompt_tokens", _OPT_INT),
    ("tokens", (int,)),
    ("created", _NUM),
    ("started", _OPT_NUM),
    ("first", _OPT_NUM),
    ("last", _OPT_NUM),
    ("n_first", (int,)),
    ("end", _NUM),
    ("ids", (list,)),
    ("batch_size", _OPT_INT),
    ("batch_capacity", _OPT_INT),
    ("temperature", _OPT_NUM),
    ("precision", _OPT_STR),
    ("loop_min_n", _OPT_INT),
    ("loop_max_n", _OPT_INT),
    ("text", _OPT_STR),
)
"""A finished request as one row of the channel's ``requests`` message (``tuner.client`` writes rows in this
order, ``tuner.link.channel`` checks and expands them): field name and the Python types it may hold."""
ROW_IDS = [name for name, _ in ROW_FIELDS].index("ids")
ROW_TEXT = [name for name, _ in ROW_FIELDS].index("text")
