"""Issue 7 faults: a policy that raises or proposes what no knob may hold; no knob ever outside its bounds.

- Live: a real sampler thread (CPU probe on a real inference process, output probe on a real channel),
  the agent with a raising policy, one proposing out of its own bounds, one with *no* bounds of its own
  proposing garbage (NaN, inf, negative, strings, bools, huge), and a healthy one, actuating over the
  channel to a real ``tuner.client``.  The faulty ones are disabled with a warning note in the trace that
  ``tuner report`` shows; ticks and the healthy policy go on; every knob the inference process ever
  received is inside the configured bounds.
- Property (hypothesis): whatever proposals the arbiter gets, an accepted or clamped decision is a valid
  value inside the knob's bounds; through the agent, the actuator is never handed knobs outside them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cli import tuner, tuner_env
from tuner.core.actuator import ChannelActuator, DryRunActuator
from tuner.core.agent import Agent
from tuner.core.arbiter import Arbiter
from tuner.core.sampler import Sampler, Tick
from tuner.core.window import Window
from tuner.link.channel import ChannelServer
from tuner.policies.base import Bounds, Policy
from tuner.probes.base import Probe
from tuner.probes.cpu import CpuProbe
from tuner.probes.output import OutputProbe
from tuner.records import PRECISIONS, Action, Event, Knobs
from tuner.trace import TraceWriter, make_header

BOUNDS = {
    "temperature": Bounds(0.1, 1.5),
    "repetition_penalty": Bounds(1.0, 1.3),
    "batch_size": Bounds(1, 16),
    "precision": Bounds(choices=("fp32", "bf16")),
}
GARBAGE: list[Any] = [math.nan, math.inf, -math.inf, -3.0, "hot", True, None, 1e9, 2.5, 0, [1], {"x": 1}, -1]


def within(knobs: Knobs, bounds: dict[str, Bounds] = BOUNDS) -> list[str]:
    """What in ``knobs`` is outside ``bounds`` (or of the wrong kind); empty when all is well."""
    bad = []
    for f in fields(Knobs):
        v = getattr(knobs, f.name)
        if v is None:
            continue
        b = bounds.get(f.name)
        if f.name == "batch_size" and type(v) is not int:
            bad.append(f"batch_size {v!r}")
        elif f.name == "precision" and v not in PRECISIONS:
            bad.append(f"precision {v!r}")
        elif b is not None and not b.contains(v):
            bad.append(f"{f.name} {v!r}")
    return bad


class Boom(Policy):
    name = "boom"
    knobs = ("temperature",)
    interval_s = 0.1

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        if window.t > 0.5:
            raise RuntimeError("kaput")
        return []


class Wild(Policy):
    name = "wild"
    knobs = ("batch_size",)
    interval_s = 0.1

    def __init__(self) -> None:
        super().__init__({"batch_size": Bounds(1, 16)})

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        return [self.act("batch_size", 4096, "more!")] if window.t > 0.7 else []


class Sneaky(Policy):
    """No bounds of its own: everything it proposes reaches the arbiter, which alone stands in the way."""

    name = "sneaky"
    knobs = ("temperature", "batch_size", "repetition_penalty", "precision")
    interval_s = 0.05
    i = 0

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        self.i += 1
        v = GARBAGE[self.i % len(GARBAGE)]
        knob = self.knobs[self.i % len(self.knobs)]
        return [self.act(knob, v, "garbage")]


class Steady(Policy):
    name = "steady"
    knobs = ("temperature",)
    interval_s = 0.1
    n = 0

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        self.n += 1
        return [self.act("temperature", 0.5 + (self.n % 2) * 0.25, "flip")]


# The inference: reports every distinct knobs object it is given, until told to stop.
KNOB_WATCHER = r"""
import json, sys, time
from tuner import client
c = client.connect()
seen = None
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    with c.request(prompt_tokens=1) as r:
        r.token(1)
    c.poll()
    k = c.knobs
    if k is not seen:
        seen = k
        print(json.dumps(k.as_dict()), flush=True)
    time.sleep(0.005)
"""


def test_faulty_policies_disabled_and_reported_live_agent_runs_on_knobs_in_bounds(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with ChannelServer() as channel:
        child = subprocess.Popen(
            [sys.executable, "-c", KNOB_WATCHER, "3"],
            env=tuner_env(TUNER_SOCKET=channel.path),
            stdout=subprocess.PIPE,
            text=True,
        )
        t0 = time.monotonic()
        probes: list[Probe] = [CpuProbe([child.pid]), OutputProbe(channel, t0=t0)]
        writer = TraceWriter(trace, make_header(probes={}, interval_s=0.02, command=["knob-watcher"]))
        agent = Agent(
            [Boom(), Wild(), Sneaky(), Steady()],
            Arbiter(bounds=BOUNDS, cooldown_s={"temperature": 0.2}),
            ChannelActuator(channel),
            writer,
        )

        def record(tick: Tick) -> None:
            writer.tick(tick.t, tick.values, tick.procs)
            for e in tick.events:
                writer.event(e)
            writer.flush()

        sampler = Sampler(
            probes, interval=0.02, t0=t0, hooks=[agent.step, record], on_note=lambda t, m, lv: writer.note(t, m, lv)
        )
        sampler.start()
        out, _ = child.communicate(timeout=30)
        time.sleep(0.1)
        sampler.stop()
        hooks_left = list(sampler.hooks)
        writer.end(time.monotonic() - t0, exit_code=child.returncode)
        writer.close()
        sampler.close()
    assert child.returncode == 0
    assert len(hooks_left) == 2  # the agent was never thrown out of the sampler
    assert agent.enabled == {"boom": False, "wild": False, "sneaky": True, "steady": True}
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    notes = {r["data"]["policy"]: r for r in recs if r["k"] == "note" and "policy" in r.get("data", {})}
    assert set(notes) == {"boom", "wild"}
    assert "RuntimeError: kaput" in notes["boom"]["msg"] and notes["boom"]["level"] == "warn"
    assert "outside its bounds" in notes["wild"]["msg"]
    last_note = max(n["t"] for n in notes.values())
    assert sum(1 for r in recs if r["k"] == "tick" and r["t"] > last_note + 1.0) >= 20  # ticking on
    steady = [r for r in recs if r["k"] == "action" and r.get("policy") == "steady" and r["outcome"] == "applied"]
    assert len(steady) >= 3 and max(a["t"] for a in steady) > last_note + 1.0  # the healthy one acted on
    sneaky = [r for r in recs if r["k"] == "action" and r.get("policy") == "sneaky"]
    assert any(a["outcome"] == "rejected" for a in sneaky)
    seen = [Knobs(**json.loads(line)) for line in out.splitlines()]
    assert len(seen) >= 3  # the inference really was steered
    assert [k for k in seen if within(k)] == []  # and never outside the bounds
    cp = tuner("report", str(trace), "--json")
    assert cp.returncode == 0, cp.stderr
    warnings = json.loads(cp.stdout)["warnings"]
    assert any("policy boom disabled" in w for w in warnings)
    assert any("policy wild disabled" in w for w in warnings)


# -- properties -----------------------------------------------------------------------------------------
KNOB_NAMES = ["temperature", "repetition_penalty", "batch_size", "precision", "cleanup", "nonsense"]
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**6), 10**6),
    st.booleans(),
    st.none(),
    st.sampled_from([*PRECISIONS, "fp64", ""]),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def bounds_st(draw: st.DrawFn) -> dict[str, Bounds]:
    out: dict[str, Bounds] = {}
    for knob in ("temperature", "repetition_penalty", "batch_size"):
        if draw(st.booleans()):
            a = draw(st.floats(-5, 50, allow_nan=False))
            b = draw(st.floats(-5, 50, allow_nan=False))
            lo, hi = min(a, b), max(a, b)
            out[knob] = Bounds(draw(st.sampled_from([lo, None])), draw(st.sampled_from([hi, None])))
    if draw(st.booleans()):
        out["precision"] = Bounds(choices=tuple(draw(st.lists(st.sampled_from(PRECISIONS), min_size=1, unique=True))))
    return out


def valid(knob: str, value: Any, bounds: dict[str, Bounds]) -> bool:
    if knob == "cleanup":
        return True
    if knob == "precision":
        return value in PRECISIONS and ("precision" not in bounds or bounds["precision"].contains(value))
    if knob not in ("temperature", "repetition_penalty", "batch_size"):
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if knob == "batch_size" and (type(value) is not int or value < 1):
        return False
    if (knob == "temperature" and value < 0) or (knob == "repetition_penalty" and value <= 0):
        return False
    b = bounds.get(knob)
    return b is None or b.contains(value)


knobs_st = st.builds(
    Knobs,
    temperature=st.one_of(st.none(), st.floats(0, 2)),
    repetition_penalty=st.one_of(st.none(), st.floats(0.5, 2)),
    batch_size=st.one_of(st.none(), st.integers(1, 64)),
    precision=st.one_of(st.none(), st.sampled_from(PRECISIONS)),
)


@settings(max_examples=300, deadline=None)
@given(
    bounds=bounds_st(),
    knobs=knobs_st,
    proposals=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(KNOB_NAMES), values, st.booleans()), max_size=8
    ),
    headroom=st.one_of(st.none(), st.floats(0, 1)),
    t=st.floats(0, 1e6),
)
def test_arbiter_never_accepts_a_value_outside_bounds(
    bounds: dict[str, Bounds],
    knobs: Knobs,
    proposals: list[tuple[str, str, Any, bool]],
    headroom: float | None,
    t: float,
) -> None:
    arb = Arbiter(bounds=bounds, cooldown_s={"temperature": 1.0}, priority=("a", "b"), pressure_headroom=0.1)
    acts = [Action(p, k, v, "r", {"urgent": u}) for p, k, v, u in proposals]
    for d in arb.resolve(t, acts, knobs, headroom):
        assert d.outcome in ("accept", "clamped", "rejected")
        if d.outcome != "rejected":
            assert valid(d.action.knob, d.action.value, bounds), d


@dataclass
class Scripted(Policy):
    """Proposes whatever hypothesis drew, one batch per tick."""

    script: list[list[tuple[str, Any]]] = field(default_factory=list)
    name: str = "scripted"
    knobs: tuple[str, ...] = ("temperature", "repetition_penalty", "batch_size", "precision", "cleanup")
    interval_s: float = 0.0

    def __post_init__(self) -> None:
        super().__init__({})

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        batch = self.script.pop(0) if self.script else []
        return [self.act(k, v, "drawn") for k, v in batch]


class Recording(DryRunActuator):
    def __init__(self) -> None:
        super().__init__()
        self.handed: list[Knobs] = []

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]:
        self.handed.append(knobs)
        return super().apply(action, knobs)


@settings(max_examples=100, deadline=None)
@given(
    bounds=bounds_st(),
    script=st.lists(st.lists(st.tuples(st.sampled_from(KNOB_NAMES[:5]), values), max_size=3), min_size=1, max_size=15),
)
def test_agent_never_hands_the_actuator_knobs_outside_bounds(
    bounds: dict[str, Bounds], script: list[list[tuple[str, Any]]]
) -> None:
    act = Recording()
    agent = Agent([Scripted(script=list(script))], Arbiter(bounds=bounds), act, None)
    for i in range(len(script) + 1):
        agent.step(Tick(i * 0.1, [], {}, {}, [Event(i * 0.1, "noop", {})]))
    for k in [*act.handed, agent.knobs]:
        for f in fields(Knobs):
            v = getattr(k, f.name)
            assert v is None or valid(f.name, v, bounds), (f.name, v, bounds)
