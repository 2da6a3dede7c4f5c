"""The agent loop: safety properties over random sample streams (hypothesis), a raising or misbehaving
policy is disabled and reported while the agent runs on, knob columns, command results, the channel."""

from __future__ import annotations

import itertools
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.core.actuator import ChannelActuator, DryRunActuator
from tuner.core.agent import Agent
from tuner.core.policy_config import build_agent, load_policy
from tuner.core.window import Window
from tuner.policies.base import Policy
from tuner.records import Action, Event, Knobs


class Tick:
    def __init__(self, t: float, values: dict[str, Any], events: list[Event] | None = None) -> None:
        self.t, self.values, self.events = t, values, events or []


class Notes:
    def __init__(self) -> None:
        self.actions: list[Any] = []
        self.notes: list[tuple[float, str, str]] = []

    def action(self, a: Any) -> None:
        self.actions.append(a)

    def note(self, t: float, msg: str, level: str = "info", **data: Any) -> None:
        self.notes.append((t, msg, level))


finite = st.floats(0, 1e12, allow_nan=False)
maybe = st.one_of(st.none(), finite)
tick_values = st.fixed_dictionaries(
    {
        "req_seq_rep_4_ratio": st.one_of(st.none(), st.floats(0, 1)),
        "req_ttft_p95_seconds": st.one_of(st.none(), st.floats(0, 20)),
        "req_tpot_p95_seconds": st.one_of(st.none(), st.floats(0, 2)),
        "req_tokens_per_second": st.one_of(st.none(), st.floats(0, 2000)),
        "req_done_total": maybe,
        "tree_rss_bytes": maybe,
        "alloc_allocated_bytes": maybe,
        "alloc_reserved_bytes": maybe,
        "sys_mem_available_bytes": st.floats(0, 8e9),
        "sys_mem_total_bytes": st.just(8e9),
    }
)
request = st.fixed_dictionaries(
    {
        "temperature": st.one_of(st.none(), st.floats(0, 2)),
        "seq_rep_4": st.one_of(st.none(), st.floats(0, 1)),
        "tokens": st.integers(0, 500),
        "prompt_tokens": st.integers(0, 2000),
        "ttft_seconds": st.one_of(st.none(), st.floats(0, 10)),
        "tpot_seconds": st.one_of(st.none(), st.floats(0, 1)),
        "batch_size": st.integers(1, 64),
        "precision": st.sampled_from(["fp32", "bf16", "int8"]),
    }
)
extra_event = st.one_of(
    st.builds(lambda b: ("oom", {"pid": 1, "batch_size": b}), st.one_of(st.none(), st.integers(-3, 300))),
    st.builds(
        lambda ok, kl: (
            "command_result",
            {"id": "c1", "cmd": "precision", "ok": ok, "result": {"kl": kl}, "error": None},
        ),
        st.booleans(),
        st.floats(0, 1),
    ),
)
stream = st.lists(
    st.tuples(st.floats(0.05, 3.0), tick_values, st.lists(request, max_size=3), st.lists(extra_event, max_size=1)),
    min_size=1,
    max_size=80,
)


@settings(max_examples=30, deadline=None)
@given(preset=st.sampled_from(["interactive", "offline", "edge"]), ticks=stream)
def test_knobs_stay_in_bounds_and_respect_cooldowns(preset: str, ticks: list) -> None:
    config = load_policy(preset)
    notes = Notes()
    agent = build_agent(config, DryRunActuator(), notes)
    bounds = config.bounds()
    cooldown = config.agent.cooldown_s
    t = 0.0
    for dt, values, reqs, extra in ticks:
        t += dt
        events = [Event(t, "request", r) for r in reqs] + [Event(t, k, d) for k, d in extra]
        agent.step(Tick(t, dict(values), events))
        for knob, b in bounds.items():
            v = getattr(agent.knobs, knob)
            if v is not None and knob != "temperature" and knob != "precision":  # those two are learned too
                assert b.contains(v), (knob, v)
    assert not [n for n in notes.notes if "disabled" in n[1]], notes.notes  # no policy crashed on the stream
    last: dict[str, float] = {}
    for a in notes.actions:
        if a.outcome not in ("dry-run", "applied", "clamped"):
            continue
        kb = bounds.get(a.action.knob)
        if kb is not None:
            assert kb.contains(a.action.value), (a.action.knob, a.action.value)
        urgent = a.action.evidence.get("urgent") is True
        if a.action.knob in last and not urgent:
            assert a.t - last[a.action.knob] >= cooldown.get(a.action.knob, 0.0) - 1e-9, a
        last[a.action.knob] = a.t


class Boom(Policy):
    name = "boom"
    knobs = ("temperature",)

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        if window.t > 1.0:
            raise RuntimeError("kaput")
        return []


class Wild(Policy):
    name = "wild"
    knobs = ("batch_size",)

    def __init__(self) -> None:
        from tuner.policies.base import Bounds

        super().__init__({"batch_size": Bounds(1, 16)})

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        return [self.act("batch_size", 4096, "more!")] if window.t > 2.0 else []


class Steady(Policy):
    name = "steady"
    knobs = ("temperature",)

    def decide(self, window: Window, knobs: Knobs) -> list[Action]:
        # always a change from the current value (alternating by tick count could land on the current
        # value each time the cooldown ends, e.g. a 1 s cooldown over 0.05 s ticks)
        return [self.act("temperature", 0.5 if knobs.temperature == 0.6 else 0.6, "flip")]


@given(st.lists(st.floats(0.05, 0.5), min_size=60, max_size=120))
@settings(max_examples=20, deadline=None)
def test_a_raising_or_out_of_bounds_policy_is_disabled_and_reported_and_the_agent_runs_on(dts: list[float]) -> None:
    from tuner.core.arbiter import Arbiter

    notes = Notes()
    agent = Agent([Boom(), Wild(), Steady()], Arbiter(cooldown_s={"temperature": 1.0}), DryRunActuator(), notes)
    t = 0.0
    for dt in dts:
        t += dt
        agent.step(Tick(t, {}))
    assert agent.enabled == {"boom": False, "wild": False, "steady": True}
    assert "RuntimeError: kaput" in (agent.disabled_reason["boom"] or "")
    assert "outside its bounds" in (agent.disabled_reason["wild"] or "")
    warned = [m for _, m, lv in notes.notes if lv == "warn"]
    assert any(m.startswith("policy boom disabled") for m in warned)
    assert any(m.startswith("policy wild disabled") for m in warned)
    flips = [a for a in notes.actions if a.outcome == "dry-run"]
    assert len(flips) >= 2  # the healthy policy kept acting
    assert all(b.t - a.t >= 1.0 - 1e-6 for a, b in itertools.pairwise(flips))  # its cooldown (t to the us)
    assert all(a.action.value != 4096 for a in notes.actions)
    # and it can be switched back on from the live view
    agent.set_enabled("boom", True)
    assert agent.enabled["boom"] and "boom" not in agent.disabled_reason


def test_set_enabled_unknown_policy_is_a_key_error() -> None:
    agent = build_agent(load_policy("interactive"), DryRunActuator(), None)
    try:
        agent.set_enabled("nope", False)
    except KeyError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("no KeyError")
    agent.set_enabled("temperature", False)
    assert agent.status()["temperature"]["enabled"] is False


def test_knob_columns_are_added_to_the_tick_before_it_is_recorded() -> None:
    agent = build_agent(load_policy("interactive"), DryRunActuator(), None)
    tk = Tick(
        0.1,
        {"sys_mem_available_bytes": 4e9, "sys_mem_total_bytes": 8e9},
        [Event(0.05, "request", {"temperature": 0.7, "precision": "int8", "seq_rep_4": 0.0, "tokens": 3})],
    )
    agent.step(tk)
    assert tk.values["knob_batch_size"] == 8  # the batch policy's start
    assert tk.values["knob_temperature"] == 0.7  # learned from what the inference side reported
    assert tk.values["knob_precision_bits"] == 8


def test_command_results_reach_the_policy_and_are_recorded() -> None:
    from tuner.core.arbiter import Arbiter

    seen: list[tuple[bool, dict]] = []

    class Asker(Policy):
        name = "asker"
        knobs = ("cleanup",)

        def decide(self, window: Window, knobs: Knobs) -> list[Action]:
            return [self.act("cleanup", ["gc"], "why not")] if window.ticks == 1 else []

        def on_result(self, t: float, action: Action, ok: bool, result: Any, error: str | None) -> None:
            seen.append((ok, dict(result)))

    class Fixed:
        def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict]:
            return "sent", {"command_id": "abc"}

    notes = Notes()
    agent = Agent([Asker()], Arbiter(), Fixed(), notes)
    agent.step(Tick(0.1, {}))
    res = {"reclaimed_bytes": 12345, "steps": [{"step": "gc", "reclaimed_bytes": 12345, "seconds": 0.1}]}
    agent.step(Tick(0.2, {}, [Event(0.2, "command_result", {"id": "other", "ok": True, "result": {}})]))
    agent.step(
        Tick(0.3, {}, [Event(0.3, "command_result", {"id": "abc", "cmd": "cleanup", "ok": True, "result": res})])
    )
    assert seen == [(True, res)]
    assert [(a.outcome, a.result.get("reclaimed_bytes")) for a in notes.actions] == [("sent", None), ("done", 12345)]


def test_channel_actuator_reaches_a_real_client(tmp_path: Any) -> None:
    """Nothing is recorded as applied that could not take effect: with no client a knob or a command fails
    (and the knob is not kept for later); a knob that reached the client is applied (it shows in c.knobs);
    a command is sent (its effect comes back later as done or refused)."""
    from tuner import client
    from tuner.core.actuator import NO_CLIENT_COMMAND, NO_CLIENT_KNOBS
    from tuner.link.channel import ChannelServer

    server = ChannelServer(str(tmp_path))
    server.start()
    act = ChannelActuator(server)
    assert act.apply(Action("p", "cleanup", ["gc"], "r"), Knobs()) == ("failed", {"error": NO_CLIENT_COMMAND})
    assert act.apply(Action("p", "batch_size", 2, "r"), Knobs(batch_size=2)) == ("failed", {"error": NO_CLIENT_KNOBS})
    c = client.connect(server.path)
    try:
        with c.request(prompt_tokens=1) as r:  # the client connects lazily on its first report
            r.token(1)
        deadline = time.monotonic() + 5
        while not server.clients() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.knobs.batch_size is None  # the failed 2 was not kept and given on connect
        got = act.apply(Action("p", "batch_size", 4, "r"), Knobs(temperature=0.5, batch_size=4))
        assert got == ("applied", {"clients": 1})
        while c.knobs.batch_size != 4 and time.monotonic() < deadline:
            c.poll()
            time.sleep(0.02)
        assert c.knobs.batch_size == 4 and c.knobs.temperature == 0.5
        outcome, res = act.apply(Action("p", "cleanup", ["gc"], "r"), Knobs())
        assert outcome == "sent" and res["command_id"]
    finally:
        c.close()
        server.close()


def test_the_same_failure_again_is_recorded_once() -> None:
    """A policy retrying while no client is connected: the first failure is in the trace, the repeats are
    not (the policy still hears each); a success in between starts afresh."""
    from tuner.core.arbiter import Arbiter

    class Starter(Policy):
        name = "starter"
        knobs = ("batch_size",)
        interval_s = 0.1

        def decide(self, window: Window, knobs: Knobs) -> list[Action]:
            return [self.act("batch_size", 8, "starting batch size")] if knobs.batch_size is None else []

    class NoClientYet:
        connected = False

        def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict]:
            return ("applied", {"clients": 1}) if self.connected else ("failed", {"error": "no client"})

    notes = Notes()
    act = NoClientYet()
    agent = Agent([Starter()], Arbiter(cooldown_s={"batch_size": 10.0}), act, notes)
    for i in range(5):
        agent.step(Tick(0.1 * (i + 1), {}))
    act.connected = True
    agent.step(Tick(0.6, {}))
    # a failed change starts no cooldown: the retry at 0.6 s is carried out, not rejected for 10 s
    assert [(a.t, a.outcome) for a in notes.actions] == [(0.1, "failed"), (0.6, "applied")]
    assert agent.knobs.batch_size == 8


def test_observe_only_never_actuates() -> None:
    class Spy:
        calls = 0

        def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict]:
            Spy.calls += 1
            return "applied", {}

    agent = build_agent(load_policy("interactive"), Spy(), None, observe_only=True)
    for i in range(30):
        agent.step(Tick(i * 0.5, {"sys_mem_available_bytes": 1e8, "sys_mem_total_bytes": 8e9}))
    assert Spy.calls == 0
    assert agent.applied and all(a.outcome == "dry-run" for a in agent.applied if a.outcome != "rejected")


def test_a_policy_raising_in_feedback_or_on_result_is_disabled_too() -> None:
    from tuner.core.arbiter import Arbiter

    class Fragile(Policy):
        name = "fragile"
        knobs = ("batch_size", "cleanup")

        def decide(self, window: Window, knobs: Knobs) -> list[Action]:
            return [self.act("batch_size", 2, "go")]

        def feedback(self, applied: Any) -> None:
            raise ValueError("feedback bug")

    notes = Notes()
    agent = Agent([Fragile(), Steady()], Arbiter(), DryRunActuator(), notes)
    for i in range(30):
        agent.step(Tick(i * 0.5, {}))
    assert agent.enabled == {"fragile": False, "steady": True}
    assert "ValueError: feedback bug" in agent.disabled_reason["fragile"]
    assert agent.knobs.batch_size == 2  # what was carried out stays carried out
