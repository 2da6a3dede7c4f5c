"""The binding memory limit and the time-to-limit projection (``tuner.core.limits``), through the window and
the agent as the policies see them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tuner.core import limits
from tuner.core.actuator import DryRunActuator
from tuner.core.agent import Agent
from tuner.core.arbiter import Arbiter
from tuner.core.limits import DictReader, LimitTerm, TermSource, project
from tuner.core.window import Window
from tuner.policies.base import Policy
from tuner.records import Action, Event, Knobs

MIB = 1 << 20
GIB = 1 << 30


def host(used: float, total: float = 23.5 * GIB) -> dict[str, float]:
    return {"sys_mem_total_bytes": total, "sys_mem_available_bytes": total - used, "sys_mem_used_bytes": used}


def test_the_cgroup_binds_when_it_leaves_less_room_than_the_host() -> None:
    # the host is 94% free (22 GiB left), the cgroup 98% free (195 MiB left): the cgroup kills first
    vals = {**host(1.4 * GIB), "cgroup_mem_limit_bytes": 200 * MIB, "cgroup_mem_working_set_bytes": 5 * MIB}
    ts = limits.terms(DictReader(vals, {"cgroup": "/kubepods/pod1"}))
    assert [t.name for t in ts] == ["cgroup", "host"]
    assert ts[0].describe() == "cgroup /kubepods/pod1 working set 5 MiB of 200 MiB"
    # no cgroup limit (None = unlimited): the host binds
    vals["cgroup_mem_limit_bytes"] = None
    b = limits.binding(DictReader(vals))
    assert b is not None and b.name == "host" and b.describe().startswith("host memory used 1.4 GiB of 23.5 GiB")


def test_across_memories_the_least_free_share_binds() -> None:
    vals = {
        **host(1 * GIB),
        "cgroup_mem_limit_bytes": 8 * GIB,
        "cgroup_mem_working_set_bytes": 6 * GIB,  # 25% free
        "gpu_mem_used_bytes/0": 70 * GIB,
        "gpu_mem_total_bytes/0": 80 * GIB,  # 12.5% free: binds though it has the most room
    }
    ts = limits.terms(DictReader(vals))
    assert [t.name for t in ts] == ["gpu/0", "cgroup", "host"]
    w = Window(keys=[])
    w.update(0.0, vals)
    h, name = w.headroom()
    assert name == "gpu/0" and h == pytest.approx(0.125)


@pytest.fixture
def kv_source() -> Iterator[None]:
    def kv(r: Any) -> Iterator[LimitTerm]:
        u = r.latest("engine_kv_cache_usage_ratio")
        if u is not None:
            yield LimitTerm("kv_cache", u, 1.0, "KV cache used", unit="ratio", series="engine_kv_cache_usage_ratio")

    def broken(r: Any) -> Iterator[LimitTerm]:
        raise RuntimeError("a contributed source with a bug")

    before = list(limits.SOURCES)
    limits.register(TermSource("kv_cache", ("engine_kv_cache_usage_ratio",), (), kv))
    limits.register(TermSource("broken", (), (), broken))
    try:
        yield
    finally:
        limits.SOURCES[:] = before


def test_a_contributed_term_binds_through_the_same_rule(kv_source: None) -> None:
    w = Window(keys=[])  # built after the registration: it keeps the source's keys
    w.update(0.0, {**host(1 * GIB), "engine_kv_cache_usage_ratio": 0.97})
    b = w.binding()
    assert b is not None and b.name == "kv_cache" and b.describe() == "kv_cache KV cache used 97% of 100%"
    assert w.headroom()[1] == "kv_cache"


def floor_series(
    seconds: float,
    rate: float,
    *,
    base: float = 300 * MIB,
    ramp_s: float = 0.0,
    seed: int = 0,
    saw: float = 30 * MIB,
    hz: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A working set: a start-up ramp, a batch sawtooth with noise, and a floor rising ``rate`` bytes/s."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, seconds, 1.0 / hz)
    y = base + rate * t + saw * ((t % 2.0) / 2.0) + rng.normal(0, 2 * MIB, t.size)
    if ramp_s:
        y = np.where(t < ramp_s, base * t / ramp_s, y)
    return t, y


def test_a_leak_is_projected_to_the_limit_from_its_current_rate() -> None:
    t, y = floor_series(30.0, 5 * MIB, ramp_s=4.0)
    limit = 640 * MIB
    p = project(t, y, limit, float(y[-1]))
    assert p.verdict == "rising" and p.slope is not None
    assert p.slope == pytest.approx(5 * MIB, rel=0.3)  # the recent rate, not inflated by the start-up ramp
    assert p.seconds == pytest.approx((limit - y[-1]) / (5 * MIB), rel=0.3)


@pytest.mark.parametrize("seed", range(20))
def test_a_flat_workload_has_no_time_to_limit(seed: int) -> None:
    # a sawtooth near the limit, with noise and a start-up ramp: nothing to act on
    t, y = floor_series(60.0, 0.0, base=560 * MIB, ramp_s=4.0, seed=seed)
    p = project(t, y, 640 * MIB, float(y[-1]))
    assert p.seconds is None or p.seconds > 600, p


def test_too_little_data_is_said_so() -> None:
    t, y = floor_series(5.0, 5 * MIB)
    assert project(t, y, 640 * MIB, float(y[-1])).verdict == "insufficient data"


def feed(w: Window, t0: float, t1: float, ws: Any, limit: float = 640 * MIB, hz: float = 10.0) -> None:
    for t in np.arange(t0, t1, 1.0 / hz):
        w.update(
            round(float(t), 6),
            {**host(2 * GIB), "cgroup_mem_limit_bytes": limit, "cgroup_mem_working_set_bytes": ws(t)},
        )


def test_window_pressure_restarts_after_a_cleanup_and_knows_whether_it_helped() -> None:
    w = Window(keys=[])
    w.horizon_s = 120.0
    w.update(0.0, {}, [Event(0.0, "cgroup", {"memory": {"version": 1, "path": "/pod"}})])
    leak = 5 * MIB
    feed(w, 0.1, 20.0, lambda t: 300 * MIB + leak * t)
    mp = w.memory_pressure()
    assert mp is not None and mp.cleanup_helped is None and not mp.escalate
    assert mp.term.describe().startswith("cgroup /pod working set")
    assert 30 < mp.seconds < 80 and mp.evidence()["time_to_limit_s"] == pytest.approx(mp.seconds, abs=0.1)
    # a cleanup gave back almost nothing: the trend restarts after its result, then escalation
    w.update(
        20.0,
        {},
        [Event(20.0, "command_result", {"cmd": "cleanup", "ok": True, "result": {"reclaimed_bytes": 1 * MIB}})],
    )
    feed(w, 20.1, 25.0, lambda t: 300 * MIB + leak * t)
    assert w.memory_pressure() is None  # 5 s of data since the cleanup: no verdict yet
    feed(w, 25.0, 36.0, lambda t: 300 * MIB + leak * t)
    mp = w.memory_pressure()
    assert mp is not None and mp.cleanup_helped is False and mp.escalate
    # a cleanup that gives back most of the growth helped: no escalation
    w.update(
        36.0,
        {},
        [Event(36.0, "command_result", {"cmd": "cleanup", "ok": True, "result": {"reclaimed_bytes": 150 * MIB}})],
    )
    feed(w, 36.1, 50.0, lambda t: 300 * MIB + leak * (t - 36.0))
    mp = w.memory_pressure()
    assert mp is not None and mp.cleanup_helped is True and not mp.escalate
    w.limit_columns()
    w.update(50.05, {})
    assert w.limit_columns() == {}  # written once per projection, not every tick
    w.update(53.0, {})
    cols = w.limit_columns()
    assert cols["mem_time_to_limit_seconds"] > 0 and 0 < cols["mem_headroom_ratio"] < 1


def test_a_flat_window_never_signals_pressure() -> None:
    w = Window(keys=[])
    w.horizon_s = 300.0
    rng = np.random.default_rng(1)
    feed(w, 0.0, 120.0, lambda t: 600 * MIB + 20 * MIB * ((t % 2) / 2) + rng.normal(0, 2 * MIB))
    assert w.memory_pressure() is None


class Always(Policy):
    name = "always"
    knobs = ("temperature",)

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        return [self.act("temperature", 0.5 + 0.01 * (window.ticks % 7), "test")]


class Sink:
    def __init__(self) -> None:
        self.actions: list[Any] = []

    def action(self, a: Any) -> None:
        self.actions.append(a)

    def note(self, t: float, msg: str, level: str = "info", **data: Any) -> None:
        pass


class T:
    def __init__(self, t: float, values: dict[str, Any], events: list[Event] | None = None) -> None:
        self.t, self.values, self.events = t, values, events or []


def test_every_action_names_the_binding_limit_and_the_ticks_carry_it() -> None:
    sink = Sink()
    agent = Agent([Always()], Arbiter(), DryRunActuator(), sink)
    agent.window.horizon_s = 120.0
    vals = {**host(2 * GIB), "cgroup_mem_limit_bytes": 640 * MIB}
    written: list[dict[str, Any]] = []
    for i in range(300):
        t = i * 0.1
        v = {**vals, "cgroup_mem_working_set_bytes": 300 * MIB + 5 * MIB * t}
        ev = [Event(t, "cgroup", {"memory": {"path": "/kubepods/pod1"}})] if i == 0 else []
        agent.step(T(t, v, ev))
        written.append(v)
    assert sink.actions
    for a in sink.actions:
        ev = a.action.evidence
        assert ev["limit"].startswith("cgroup /kubepods/pod1 working set ") and "of 640 MiB" in ev["limit"]
        assert 0 < ev["limit_headroom"] < 1
    assert any("time_to_limit_s" in a.action.evidence for a in sink.actions[-5:])
    assert any("mem_time_to_limit_seconds" in v for v in written)
    assert sum("mem_headroom_ratio" in v for v in written) <= 31  # once a second, not every tick


@pytest.mark.parametrize("seed", range(30))
def test_the_small_sample_estimators_are_the_stats_modules(seed: int) -> None:
    """The projection's envelope, Mann-Kendall and Theil-Sen are ``tuner.core.stats``'s, written out for a
    dozen points: same numbers on random series (ties included)."""
    from tuner.core.stats import lower_envelope, mann_kendall, theil_sen

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 700))
    x = np.sort(rng.uniform(0, 60, n))
    x[: n // 10] = np.round(x[: n // 10])  # repeated times
    y = np.round(rng.normal(0, 1, n).cumsum() * (1 + seed % 3), 1)  # ties in y
    bins = int(rng.integers(6, 13))
    ex, ey = limits.envelope(x, y, bins)
    sx, sy = lower_envelope(x, y, bins)
    assert np.allclose(ex, sx) and np.allclose(ey, sy)
    s, p = limits.mk_small(ey.tolist())
    s2, _, p2 = mann_kendall(ey)
    assert s == s2 and p == pytest.approx(p2)
    assert limits.ts_small(ex.tolist(), ey.tolist()) == pytest.approx(theil_sen(ex, ey)[0])
