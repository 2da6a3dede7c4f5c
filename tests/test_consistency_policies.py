"""The policies use consistency (issue 17 §4): the precision step's reference-consistency floor and the
temperature policy's self-consistency floor, driven through the agent with the events the quality probe records."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cli import tuner
from tuner.core.agent import Agent
from tuner.core.arbiter import Arbiter
from tuner.policies.precision import PrecisionConfig, PrecisionPolicy
from tuner.records import Event, Knobs


@dataclass
class _Tick:
    t: float
    values: dict[str, Any]
    events: list[Event] = field(default_factory=list)


class _Sent:
    """A channel that takes every command (the answer comes as a command_result event)."""

    def __init__(self) -> None:
        self.n = 0

    def apply(self, action: Any, knobs: Any) -> tuple[str, dict[str, Any]]:
        self.n += 1
        return "sent", {"command_id": f"c{self.n}"}


LOW_MEMORY = {"sys_mem_available_bytes": 1.0, "sys_mem_total_bytes": 10.0}
CFG = PrecisionConfig(ladder=("fp32", "int8"), min_headroom=0.2, release_headroom=0.4, trigger_s=1.0, hold_s=30.0,
                      settle_s=3.0, reference_wait_s=10.0)


def reference(t: float, precision: str, normalised: float | None, mean: float = 0.5) -> Event:
    return Event(t, "quality_reference", {"backend": "minilm", "precision": precision, "previous": "fp32",
                                          "mean": mean, "min": 0.03, "identical": 2, "n": 24, "scored": 24,
                                          "unrelated_mean": 0.311, "normalised": normalised})


def run_precision(cfg: PrecisionConfig, normalised: float | None, *, canary: bool = True, mean: float = 0.5,
                  reference_at: float | None = 6.0, seconds: float = 25.0) -> tuple[Agent, PrecisionPolicy]:
    """Low memory from the start: the policy steps to int8 at ~1 s; the client answers at 2 s (KL and top-1 well
    within budget, the canary answers sent when ``canary``); the scorer's figure arrives at ``reference_at``."""
    pol = PrecisionPolicy(cfg)
    agent = Agent([pol], Arbiter(bounds=pol.bounds, cooldown_s={"precision": 0.0}), _Sent(), None,
                  knobs=Knobs(precision="fp32"))
    answered = set()
    for i in range(int(seconds * 10)):
        t = round(i * 0.1, 6)
        ev: list[Event] = []
        for cid in list(agent.pending):
            sent_at = next(a.t for a in agent.applied if a.result.get("command_id") == cid)
            if cid not in answered and t >= sent_at + 1.0:
                answered.add(cid)
                _, action, _ = agent.pending[cid]
                result: dict[str, Any] = {"precision": action.value, "kl": 0.0042, "top1": 1.0, "changed": True}
                if canary and action.value == "int8":
                    result.update(canary_answers=24, canary_identical=2)
                ev.append(Event(t, "command_result", {"id": cid, "cmd": "precision", "ok": True, "result": result}))
        if reference_at is not None and abs(t - reference_at) < 1e-9:
            ev.append(reference(t, "int8", normalised, mean))
        agent.step(_Tick(t, dict(LOW_MEMORY), ev))
    return agent, pol


def moves(agent: Agent) -> list[tuple[str, str]]:
    return [(str(a.action.value), a.outcome) for a in agent.applied if a.action.knob == "precision"]


def test_a_step_whose_answers_drift_is_rolled_back_though_kl_and_top1_passed() -> None:
    agent, pol = run_precision(CFG, normalised=0.263)
    assert moves(agent)[:4] == [("int8", "sent"), ("int8", "done"), ("fp32", "sent"), ("fp32", "done")]
    assert len(moves(agent)) == 4 and pol.phase == "hold"  # held: no second try within hold_s
    back = [a for a in agent.applied if a.outcome == "sent"][1]
    assert back.action.reason.startswith("quality guard: canary answers at int8 drifted from fp32's: reference "
                                         "consistency 0.500 (minilm), 0.26 of the way from unrelated answers (0.311)")
    assert "under the floor 0.5; KL 0.0042 and top-1 1.000 were within budget" in back.action.reason
    ev = back.action.evidence  # the three figures of the step
    assert ev["kl"] == 0.0042 and ev["top1"] == 1.0 and ev["reference"]["normalised"] == 0.263
    assert ev["reference"]["floor"] == 0.5 and ev["reference"]["backend"] == "minilm"


def test_a_step_that_keeps_the_answers_commits() -> None:
    agent, pol = run_precision(CFG, normalised=0.71, mean=0.8)
    assert moves(agent) == [("int8", "sent"), ("int8", "done")]
    assert agent.knobs.precision == "int8"
    ref = pol.last_change["reference"]
    assert ref["normalised"] == 0.71 and ref["mean"] == 0.8 and pol.last_change["kl"] == 0.0042


def test_no_figure_in_time_commits_on_kl_and_top1_and_says_so() -> None:
    agent, pol = run_precision(CFG, normalised=None, reference_at=None)
    assert moves(agent) == [("int8", "sent"), ("int8", "done")]
    assert pol.last_change["reference"] == {"normalised": None,
                                            "reason": "no reference consistency figure within 10 s"}


def test_a_figure_that_could_not_be_measured_does_not_block() -> None:
    agent, pol = run_precision(CFG, normalised=None)
    assert moves(agent) == [("int8", "sent"), ("int8", "done")]
    assert pol.last_change["reference"]["normalised"] is None


def test_floor_off_or_no_scorer_means_kl_and_top1_alone() -> None:
    from dataclasses import replace

    agent, pol = run_precision(replace(CFG, min_reference=0.0), normalised=0.1)
    assert moves(agent) == [("int8", "sent"), ("int8", "done")] and "reference" not in pol.last_change
    agent, pol = run_precision(CFG, normalised=0.1, canary=False)  # the client sent no canary answers
    assert moves(agent) == [("int8", "sent"), ("int8", "done")] and "reference" not in pol.last_change


@pytest.mark.slow
@pytest.mark.parametrize("floor", [0.5, 0.0])
def test_demo_precision_step_with_the_floor_on_and_off(floor: float, tmp_path: Path) -> None:
    """The real demo under `tuner demo --policy`: a policy that always sees memory pressure steps to int8; the
    int8 canary answers drift (lexical backend), so with the floor on the step is rolled back, off it stays."""
    policy = tmp_path / "p.toml"
    policy.write_text(textwrap.dedent(f"""
        [agent]
        cooldown_s = {{ precision = 5 }}
        [precision]
        ladder = ["fp32", "int8"]
        min_headroom = 0.99
        release_headroom = 1.0
        trigger_s = 2.0
        hold_s = 600.0
        settle_s = 5.0
        min_reference = {floor}
        """))
    trace = tmp_path / "t.jsonl"
    cp = tuner("demo", "--headless", "--quiet", "--duration", "35", "--policy", str(policy), "--trace", str(trace),
               "--consistency", "lexical", timeout=600)
    assert cp.returncode == 0, cp.stderr
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    acts = [(r["value"], r["outcome"]) for r in recs if r.get("k") == "action" and r["knob"] == "precision"
            and r["outcome"] in ("sent", "done")]
    refs = [r["data"] for r in recs if r.get("k") == "event" and r.get("kind") == "quality_reference"]
    assert acts[:2] == [("int8", "sent"), ("int8", "done")]
    assert refs and refs[0]["precision"] == "int8" and refs[0]["normalised"] < 0.5
    if floor:
        assert acts[2:4] == [("fp32", "sent"), ("fp32", "done")]
    else:
        assert acts == [("int8", "sent"), ("int8", "done")]


# -- temperature: the self-consistency floor -------------------------------------------------------------------
def run_temperature(floor: float, seconds: float = 900.0, seed: int = 3) -> tuple[Agent, Any, list[float]]:
    """A plant where repetition falls with temperature (the band's centre needs T ~1.18) and self-consistency
    falls too (under 0.8 of its value at the requested 0.8 above T ~0.97); a response every 0.1 s, one in four
    scored for consistency.  The repetition penalty lowers repetition."""
    import random

    from tuner.core.actuator import DryRunActuator
    from tuner.policies.temperature import TemperatureConfig, TemperaturePolicy

    rng = random.Random(seed)
    cfg = TemperatureConfig(requested=0.8, min=0.2, max=1.5, max_step=0.15, probe_step=0.1, dwell_min_s=10.0,
                            consistency_floor=floor, consistency_min=8, window_responses=0)
    pol = TemperaturePolicy(cfg)
    agent = Agent([pol], Arbiter(bounds=pol.bounds, cooldown_s={"temperature": 1.0, "repetition_penalty": 1.0}),
                  DryRunActuator(), None, knobs=Knobs(temperature=0.8, repetition_penalty=1.0))
    temps = []
    for i in range(int(seconds * 10)):
        t = round(i * 0.1, 6)
        temp = agent.knobs.temperature or 0.8
        pen = agent.knobs.repetition_penalty or 1.0
        temps.append(temp)
        rep = max(0.0, 0.45 - 0.33 * temp - 0.4 * (pen - 1.0) + rng.gauss(0, 0.02))
        ev = [Event(t, "request", {"temperature": temp, "seq_rep_4": rep, "tokens": 64})]
        if i % 4 == 0:
            sc = 0.25 - 0.3 * (temp - 0.8) + rng.gauss(0, 0.02)
            ev.append(Event(t, "quality", {"temperature": temp, "self_consistency": sc, "backend": "minilm"}))
        agent.step(_Tick(t, {"quality_jobs": 0.0}, ev))  # the scorer runs
    return agent, pol, temps


def test_temperature_is_not_bought_past_the_consistency_floor() -> None:
    agent, pol, temps = run_temperature(0.8)
    moves = [(a.action.knob, a.action.value, a.action.reason) for a in agent.applied if a.outcome == "dry-run"]
    assert pol._floor() is not None and abs(pol._floor() - 0.2) < 0.02  # 0.8 of ~0.25 measured at T 0.8
    assert any(k == "repetition_penalty" and "under the floor" in r and "raising the repetition penalty" in r
               for k, _, r in moves), moves
    last_minutes = temps[-3000:]
    assert max(last_minutes) <= 1.0  # never settled past the floor (~0.97)
    assert (agent.knobs.repetition_penalty or 1.0) > 1.0


def test_without_the_floor_the_temperature_goes_where_repetition_wants() -> None:
    agent, pol, temps = run_temperature(0.0)
    assert max(temps[-3000:]) >= 1.05 and pol._floor() is None
    assert not any("floor" in a.action.reason for a in agent.applied)


def test_report_lists_each_precision_step_with_its_three_figures() -> None:
    from tuner.quality.report import render, summarize

    actions = [
        {"t": 20.9, "knob": "precision", "value": "int8", "previous": None, "outcome": "done", "reason": "memory",
         "result": {"previous": "fp32", "kl": 0.0042, "top1": 1.0, "canary_answers": 24}},
        {"t": 42.4, "knob": "precision", "value": "fp32", "previous": "int8", "outcome": "done",
         "reason": "quality guard: canary answers at int8 drifted", "result": {"previous": "int8", "kl": 0.0}},
    ]
    events = [Event(1.0, "quality_backend", {"state": "ready", "backend": {"name": "minilm", "model":
                                                                          "all-MiniLM-L6-v2"},
                                             "self_check": {"auc": 1.0}}),
              Event(10.0, "quality", {"self_consistency": 0.3, "relevance": 0.2, "temperature": 0.8}),
              reference(24.0, "int8", 0.263, 0.493)]
    s = summarize({"quality": {"backend": "minilm", "semantic": True, "rate": 0.02}}, events, actions)
    assert s is not None
    (step, back) = s["precision_steps"]
    assert (step["from"], step["to"], step["kl"], step["top1"], step["reference"], step["normalised"]) == \
        ("fp32", "int8", 0.0042, 1.0, 0.493, 0.263)
    assert step["rolled_back"] and not step["rollback"] and back["rollback"]
    text = "\n".join(render(s))
    assert "precision fp32 -> int8 at 20.9 s: KL 0.0042, top-1 1.000, reference 0.493 (2/24 answers the same; " \
           "normalised 0.26 vs unrelated 0.311): rolled back" in text
    assert "precision int8 -> fp32 at 42.4 s: the quality guard's rollback" in text
    assert summarize({}, events, actions) is None


def test_a_temperature_is_under_the_floor_only_by_more_than_its_noise() -> None:
    """consistency_z: 9 scattered responses at T 1.0 averaging a little under the floor do not count as under it
    (the mean is within 1.64 standard errors); the point estimate (z = 0) counts them; a clear drop counts with
    either."""
    from tuner.policies.temperature import TemperatureConfig, TemperaturePolicy

    def policy(z: float, at_1: list[float]) -> TemperaturePolicy:
        pol = TemperaturePolicy(TemperatureConfig(requested=0.8, consistency_floor=0.8, consistency_min=8,
                                                  consistency_z=z))
        pol.requested = 0.8
        ys = [(0.8, 0.25)] * 20 + [(1.0, y) for y in at_1]
        pol.consistency = {}
        for temp, y in ys:
            g = pol.consistency.setdefault(temp, [0.0, 0.0, 0.0, 0.0])
            g[0], g[1], g[3] = g[0] + 1, g[1] + y, g[3] + y * y
        return pol

    noisy = [0.05, 0.35, 0.10, 0.30, 0.12, 0.28, 0.15, 0.25, 0.16]  # mean 0.196 under the floor 0.2, se ~0.035
    assert policy(1.64, noisy)._floor() == pytest.approx(0.2)
    assert policy(1.64, noisy)._under_floor(1.0) is None
    assert policy(0.0, noisy)._under_floor(1.0) == pytest.approx(sum(noisy) / 9)
    clear = [0.10, 0.12, 0.09, 0.11, 0.10, 0.13, 0.08, 0.11, 0.10]
    assert policy(1.64, clear)._under_floor(1.0) == pytest.approx(sum(clear) / 9)


def test_policy_run_summary_command(tmp_path: Path) -> None:
    """``python -m tuner.demo.consistency policy TRACE`` (docs/quality.md's table of the temperature policy's runs)
    on a recorded trace: temperatures set, holds at the floor, 10 s windows in the repetition band, scored
    self-consistency; a file that is not a trace is one line."""
    import subprocess
    import sys

    from tests.cli import tuner_env
    from tuner.trace import TraceWriter, make_header

    trace = tmp_path / "run.jsonl"
    with TraceWriter(trace, make_header(probes={}, interval_s=0.1, command=["demo"])) as w:
        for i in range(30):  # 30 s: windows 0-9 s and 10-19 s in the band (0.05), 20-29 s above it (0.3)
            temp = 0.5 if i < 12 else 0.65
            w.event(Event(float(i), "request", {"id": i, "tokens": 64, "seq_rep_4": 0.05 if i < 20 else 0.3,
                                                "temperature": temp}))
            if i % 3 == 0:
                w.event(Event(i + 0.5, "quality", {"id": i, "temperature": temp, "self_consistency": 0.2 + i / 100,
                                                   "backend": "minilm"}))
        w.write({"k": "action", "t": 11.5, "policy": "temperature", "knob": "temperature", "value": 0.65,
                 "previous": 0.5, "outcome": "applied", "reason": "probe"})
        w.write({"k": "action", "t": 25.0, "policy": "temperature", "knob": "repetition_penalty", "value": 1.1,
                 "previous": 1.0, "outcome": "applied", "reason": "T 0.8 is under the floor: raising the repetition "
                                                                "penalty"})
        w.end(30.0)
    cp = subprocess.run([sys.executable, "-m", "tuner.demo.consistency", "policy", str(trace), "--last", "10",
                         "--json"], capture_output=True, text=True, timeout=300, env=tuner_env())
    assert cp.returncode == 0, cp.stderr
    (r,) = json.loads(cp.stdout)["runs"]
    assert (r["requests"], r["temperature_first"], r["temperature_max"], r["temperature_last_mean"]) == \
        (30, 0.5, 0.65, 0.65)
    assert (r["temperature_moves"], r["penalty_max"], r["floor_actions"]) == (1, 1.1, 1)
    assert (r["windows"], r["windows_in_band"], r["scored"]) == (3, 2, 10)
    assert r["self_consistency"] == pytest.approx(0.2 + 13.5 / 100)
    bad = tmp_path / "x.txt"
    bad.write_text("not a trace\n")
    cp = subprocess.run([sys.executable, "-m", "tuner.demo.consistency", "policy", str(bad)], capture_output=True,
                        text=True, timeout=300, env=tuner_env())
    assert cp.returncode == 2 and len(cp.stderr.strip().splitlines()) == 1 and "Traceback" not in cp.stderr
