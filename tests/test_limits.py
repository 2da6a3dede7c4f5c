"""The binding memory limit and the time-to-limit projection (``tuner.core.limits``), through the window and
the agent as the policies see them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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
from tuner.records import Action, Applied, Event, Knobs

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
    clean = Action("cleanup", "cleanup", ["gc"], "test", {"trigger": "projection"})
    w.add_action(Applied(19.9, clean, "sent", None, {"command_id": "c1"}))
    w.update(
        20.0,
        {},
        [Event(20.0, "command_result", {"cmd": "cleanup", "ok": True, "result": {"reclaimed_bytes": 1 * MIB}})],
    )
    feed(w, 20.1, 25.0, lambda t: 300 * MIB + leak * t)
    held = w.memory_pressure()  # 5 s of data since the cleanup: no new verdict, the episode is held
    assert held is not None and not held.fresh and held.since == mp.since
    feed(w, 25.0, 36.0, lambda t: 300 * MIB + leak * t)
    mp = w.memory_pressure()
    assert mp is not None and mp.cleanup_helped is False and mp.escalate
    # a cleanup that gives back the growth since the one before helped: no escalation
    w.add_action(Applied(35.9, clean, "sent", None, {"command_id": "c2"}))
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


# -- the policies on the projection, closed loop (tests/replay/sim.py as the plant) ------------------------
from tests.replay.sim import Sim, SimActuator  # noqa: E402
from tuner.core.policy_config import build_agent, load_policy, parse_policy  # noqa: E402
from tuner.errors import UserError  # noqa: E402


@dataclass
class Contained(Sim):
    """The simulator's process in a memory cgroup: its RSS is the cgroup's working set.  ``reclaimable``
    False: the leak is held by something no cleanup step reaches (only the allocator cache comes back)."""

    limit: float = 640 * MIB
    reclaimable: bool = True
    cache_grows: bool = True
    """False: the allocator cache stays put (a flat workload: only batches' working memory comes and goes)."""

    def command(self, cid: str, action: Action) -> None:
        leaked = self.leaked
        super().command(cid, action)
        if action.knob == "cleanup" and not self.reclaimable:
            res = self.pending[-1].data["result"]
            res["reclaimed_bytes"] -= leaked - self.leaked
            self.leaked = leaked

    def tick(self) -> Any:
        tk = super().tick()
        if not self.cache_grows:
            self.cache = 0.0
        tk.values["cgroup_mem_limit_bytes"] = self.limit
        tk.values["cgroup_mem_working_set_bytes"] = tk.values["tree_rss_bytes"]
        tk.values["sys_mem_used_bytes"] = tk.values["tree_rss_bytes"]
        if self.t == self.dt:
            tk.events.append(Event(self.t, "cgroup", {"memory": {"version": 1, "path": "/pod"}}))
        return tk


def plant(**kw: Any) -> Contained:
    return Contained(seed=kw.pop("seed", 3), mem_total=24 * GIB, mem_used_base=150 * MIB, weights_bytes=100 * MIB,
                     per_seq_bytes=2 * MIB, tokens_per_request=32, **kw)  # fmt: skip


def run_loop(preset: str, sim: Contained, seconds: float) -> tuple[Any, list[Any], float]:
    """The preset's agent driving the plant for ``seconds``; (agent, actions, peak working set / limit)."""
    sink = Sink()
    agent = build_agent(load_policy(preset), SimActuator(sim), sink)
    peak = 0.0
    while sim.t < seconds:
        tk = sim.tick()
        agent.step(tk)
        peak = max(peak, tk.values["cgroup_mem_working_set_bytes"] / sim.limit)
    return agent, sink.actions, peak


@pytest.mark.parametrize("preset", ["interactive", "offline", "edge"])
def test_a_leak_is_cleaned_up_on_its_time_to_limit_long_before_min_requests(preset: str) -> None:
    sim = plant(leak_per_request=1 * MIB)  # ~6 MB/s at batch 8: 640 MiB in about a minute
    _, acts, peak = run_loop(preset, sim, 150.0)
    proj = [a for a in acts if a.action.knob == "cleanup" and a.action.evidence.get("trigger") == "projection"]
    assert proj, [a.action.reason for a in acts]
    first = proj[0]
    ev = first.action.evidence
    assert 0 < ev["time_to_limit_s"] < ev["horizon_s"] and ev["limit"].startswith("cgroup /pod working set")
    assert first.outcome == "applied" and first.t < 40.0
    assert peak < 1.0  # never reached the limit
    assert sim.done < 1000  # far fewer requests than the leak watch's min_requests (offline: 1000)
    # each cleanup gave the leak back: no smaller batch, no lower precision for it
    assert not [a for a in acts if "did not help" in a.action.reason], [a.action.reason for a in acts]


@pytest.mark.parametrize("preset", ["interactive", "offline", "edge"])
def test_a_flat_workload_near_its_limit_gets_no_cleanup_storm(preset: str) -> None:
    sim = plant(leak_per_request=0.0, cache_grows=False)
    sim.limit = 420 * MIB  # a sawtooth at ~80-90% of the limit, for ten minutes
    _, acts, peak = run_loop(preset, sim, 600.0)
    assert 0.6 < peak < 1.0
    cleanups = [a for a in acts if a.action.knob == "cleanup" and a.outcome == "applied"]
    assert not [a for a in cleanups if a.action.evidence.get("trigger") == "projection"]
    assert len(cleanups) <= 3, [(a.t, a.action.reason) for a in cleanups]  # periodic ones only


def test_an_unreclaimable_leak_escalates_cleanup_then_batch_then_precision() -> None:
    sim = plant(leak_per_request=0.5 * MIB, reclaimable=False)
    sim.limit = 900 * MIB
    _, acts, _ = run_loop("interactive", sim, 200.0)
    done = [a for a in acts if a.outcome in ("applied", "clamped")]
    cleanup = next(a for a in done if a.action.knob == "cleanup" and a.action.evidence.get("trigger") == "projection")
    smaller = next(a for a in done if a.action.knob == "batch_size" and "cleanup did not help" in a.action.reason)
    lower = next(a for a in done if a.action.knob == "precision" and "smaller batch did not help" in a.action.reason)
    assert cleanup.t < smaller.t < lower.t
    assert smaller.action.value < smaller.previous and lower.action.value == "int8"
    for a in (smaller, lower):
        assert a.action.evidence["time_to_limit_s"] < a.action.evidence["horizon_s"]
    # no step back up while the pressure lasts
    later = [a for a in done if a.t > smaller.t and a.action.knob == "batch_size"]
    assert all(a.action.value <= smaller.action.value for a in later)
    assert not [a for a in done if a.t > lower.t and a.action.knob == "precision"]


def test_offline_presets_without_precision_stop_at_the_batch() -> None:
    sim = plant(leak_per_request=0.5 * MIB, reclaimable=False)
    sim.limit = 900 * MIB
    _, acts, _ = run_loop("offline", sim, 200.0)  # precision is switched off in the offline preset
    assert any(a.action.knob == "batch_size" and "cleanup did not help" in a.action.reason for a in acts)
    assert not [a for a in acts if a.action.knob == "precision" and a.outcome != "rejected"]


def test_the_horizon_is_validated_and_can_be_switched_off() -> None:
    for name, horizon in (("interactive", 120), ("offline", 300), ("edge", 180)):
        assert load_policy(name).agent.limit_horizon_s == horizon
    table = {"cleanup": {}}
    assert parse_policy({"agent": {"limit_horizon_s": False}, **table}).agent.limit_horizon_s is None
    for bad in (0, -5, 1e9):
        with pytest.raises(UserError, match=r"agent\.limit_horizon_s"):
            parse_policy({"agent": {"limit_horizon_s": bad}, **table})
    with pytest.raises(UserError, match=r"cleanup\.projection_every_s"):
        parse_policy({"cleanup": {"projection_every_s": 0.5}})


def test_an_episode_of_pressure_is_announced_once_in_the_trace_and_on_screen() -> None:
    said: list[str] = []
    notes: list[str] = []

    class Notes(Sink):
        def note(self, t: float, msg: str, level: str = "info", **data: Any) -> None:
            notes.append(f"{level}: {msg}")

    agent = Agent([Always()], Arbiter(), DryRunActuator(), Notes(), say=said.append)
    agent.window.horizon_s = 120.0
    for i in range(400):
        t = i * 0.1
        agent.step(T(t, {**host(2 * GIB), "cgroup_mem_limit_bytes": 640 * MIB,
                         "cgroup_mem_working_set_bytes": 300 * MIB + 5 * MIB * t}))  # fmt: skip
    assert len(said) == 1 and said[0].startswith("memory: cgroup working set ") and "limit in" in said[0]
    assert notes == [f"warn: {said[0]}"]


def test_a_projected_cleanup_held_back_by_the_cooldown_is_asked_again_at_once() -> None:
    from tuner.policies.cleanup import CleanupConfig, CleanupPolicy

    w = Window(keys=[])
    w.horizon_s = 120.0
    feed(w, 0.0, 20.0, lambda t: 300 * MIB + 5 * MIB * t)
    pol = CleanupPolicy(CleanupConfig())
    first = pol.decide(w, Knobs())
    assert first and first[0].evidence["trigger"] == "projection"
    pol.feedback(Applied(w.t, first[0], "rejected", None, {"why": "cooldown: cleanup changed 10 s ago"}))
    feed(w, 20.0, 21.0, lambda t: 300 * MIB + 5 * MIB * t)
    again = pol.decide(w, Knobs())
    assert again and again[0].evidence["trigger"] == "projection"  # not projection_every_s later


@pytest.mark.parametrize(("ttl", "since_last", "passes"), [(40.0, 25.0, False), (12.0, 25.0, True), (16.0, 18.0, True),
                                                           (30.0, 18.0, False), (None, 29.0, False)])  # fmt: skip
def test_a_projected_cleanup_passes_the_cooldown_only_when_waiting_would_reach_the_limit(
    ttl: float | None, since_last: float, passes: bool
) -> None:
    """Cooldown 30 s: a cleanup projected to the limit in less than twice what is left of the cooldown, or in
    less than a command may wait for the current batch (15 s), goes through; otherwise it waits."""
    arb = Arbiter(cooldown_s={"cleanup": 30.0})
    arb.last_change["cleanup"] = 100.0
    ev: dict[str, Any] = {"trigger": "projection", "urgent": True}
    if ttl is not None:
        ev["time_to_limit_s"] = ttl
    (d,) = arb.resolve(100.0 + since_last, [Action("cleanup", "cleanup", ["gc"], "projected", ev)], Knobs())
    assert (d.outcome != "rejected") is passes, d


def test_a_flat_reading_right_after_a_cleanup_does_not_end_the_episode() -> None:
    w = Window(keys=[])
    w.horizon_s = 120.0
    feed(w, 0.0, 20.0, lambda t: 300 * MIB + 5 * MIB * t)
    assert w.memory_pressure() is not None
    w.update(20.0, {}, [Event(20.0, "command_result", {"cmd": "cleanup", "ok": True,
                                                       "result": {"reclaimed_bytes": 90 * MIB}})])  # fmt: skip
    rng = np.random.default_rng(5)
    feed(w, 20.1, 40.0, lambda t: 320 * MIB + rng.normal(0, 3 * MIB))  # flat since the cleanup, 20 s of it
    mp = w.memory_pressure()
    assert mp is not None and not mp.fresh  # held: the episode goes on (no batch increase meanwhile)
    feed(w, 40.0, 56.0, lambda t: 320 * MIB + rng.normal(0, 3 * MIB))  # 36 s flat: a verdict
    assert w.memory_pressure() is None


def test_a_batch_change_beside_a_cleanup_does_not_make_it_look_helpful() -> None:
    """The batch halves in the same tick the cleanup is sent (the demo, unreclaimable leak): the growth the
    cleanup was sent to undo is still the one it was projected on."""
    w = Window(keys=[])
    w.horizon_s = 120.0
    feed(w, 0.0, 20.0, lambda t: 300 * MIB + 5 * MIB * t)
    assert w.memory_pressure() is not None
    clean = Action("cleanup", "cleanup", ["gc"], "test", {"trigger": "projection"})
    w.add_action(Applied(19.95, clean, "sent", None, {"command_id": "c1"}))
    w.add_action(Applied(19.95, Action("batch_size", "batch_size", 4, "test"), "applied", 8))
    w.update(20.0, {}, [Event(20.0, "command_result", {"cmd": "cleanup", "ok": True,
                                                       "result": {"reclaimed_bytes": 2 * MIB}})])  # fmt: skip
    feed(w, 20.1, 34.0, lambda t: 300 * MIB + 5 * MIB * t)
    mp = w.memory_pressure()
    assert mp is not None and mp.cleanup_helped is False and mp.escalate
