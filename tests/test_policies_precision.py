"""Precision policy: steps down under memory pressure, rolls back and holds when the inference side's
quality guard figures are over budget, holds after a refusal, steps back up when the pressure is gone."""

from __future__ import annotations

from tests.replay.sim import Sim, SimActuator
from tuner.core.actuator import DryRunActuator
from tuner.core.agent import Agent
from tuner.core.arbiter import Arbiter
from tuner.core.window import Window
from tuner.policies.precision import PrecisionConfig, PrecisionPolicy
from tuner.records import Event, Knobs

CFG = PrecisionConfig(
    ladder=("fp32", "bf16", "int8"),
    min_headroom=0.2,
    release_headroom=0.4,
    trigger_s=2.0,
    hold_s=30.0,
    settle_s=3.0,
    max_kl=0.05,
    min_top1=0.9,
)


def agent_for(sim: Sim, cfg: PrecisionConfig = CFG) -> Agent:
    pol = PrecisionPolicy(cfg)
    return Agent([pol], Arbiter(bounds=pol.bounds, cooldown_s={"precision": 1.0}), SimActuator(sim), None)


def moves(agent: Agent) -> list[tuple[str, str]]:
    return [(str(a.action.value), a.outcome) for a in agent.applied if a.action.knob == "precision"]


def test_memory_pressure_steps_down_and_records_the_guard_figures() -> None:
    # 8 GB host, 6.3 GB used at fp32 -> 21% headroom... under 20% with the batch: step down
    sim = Sim(seed=1, mem_total=5.5e9, batch_size=8, tokens_per_request=64)
    agent = agent_for(sim)
    for _ in range(200):
        agent.step(sim.tick())
    assert moves(agent)[:2] == [("bf16", "applied"), ("bf16", "done")]
    done = next(a for a in agent.applied if a.outcome == "done")
    assert done.result["kl"] == 0.004 and done.result["top1"] == 0.99  # measured by the inference side
    assert agent.knobs.precision in ("bf16", "int8")
    step = next(a for a in agent.applied if a.outcome == "applied")
    assert step.action.evidence["before"]["headroom"] < 0.2


def test_quality_over_budget_rolls_back_and_holds() -> None:
    sim = Sim(seed=2, mem_total=5.5e9, batch_size=8, tokens_per_request=64, kl_extra=0.2)  # every step: KL > 0.05
    agent = agent_for(sim)
    for _ in range(300):  # 30 s: shorter than the hold
        agent.step(sim.tick())
    assert moves(agent)[:4] == [("bf16", "applied"), ("bf16", "done"), ("fp32", "applied"), ("fp32", "done")]
    assert len(moves(agent)) == 4  # held: no second try within hold_s
    assert sim.precision == "fp32" and agent.knobs.precision == "fp32"
    pol = agent.policies[0]
    assert isinstance(pol, PrecisionPolicy) and pol.phase == "hold"


def test_a_refusal_keeps_the_knob_and_holds() -> None:
    pol = PrecisionPolicy(CFG)
    agent = Agent([pol], Arbiter(bounds=pol.bounds), _Refusing(), None, knobs=Knobs(precision="fp32"))
    t = 0.0
    for i in range(100):
        t = i * 0.1
        ev = (
            [
                Event(
                    t,
                    "command_result",
                    {
                        "id": "x1",
                        "cmd": "precision",
                        "ok": False,
                        "result": {},
                        "error": "int8 refused by the quality guard",
                    },
                )
            ]
            if i == 40
            else []
        )
        agent.step(_Tick(t, {"sys_mem_available_bytes": 1.0, "sys_mem_total_bytes": 10.0}, ev))
    outcomes = [(a.action.value, a.outcome) for a in agent.applied]
    assert outcomes[:2] == [("bf16", "applied"), ("bf16", "refused")]
    assert agent.knobs.precision == "fp32"  # refused: nothing changed
    assert pol.phase == "hold"


def test_steps_back_up_after_the_pressure_is_gone_for_the_hold_period() -> None:
    pol = PrecisionPolicy(CFG)
    w = Window(keys=["sys_mem_available_bytes", "sys_mem_total_bytes"])
    k = Knobs(precision="int8")
    out = []
    for i in range(400):
        w.update(i * 0.1, {"sys_mem_available_bytes": 6.0, "sys_mem_total_bytes": 10.0})
        out += pol.decide(w, k)
    assert [(a.knob, a.value) for a in out] == [("precision", "bf16")]
    assert out[0].evidence["phase"] == "pending"


def test_latency_slo_alone_does_not_step_down_until_a_smaller_batch_was_tried() -> None:
    cfg = PrecisionConfig(slo_ttft_p95_s=0.5, trigger_s=1.0)
    pol = PrecisionPolicy(cfg)
    agent = Agent(
        [pol], Arbiter(bounds=pol.bounds), DryRunActuator(), None, knobs=Knobs(precision="fp32", batch_size=8)
    )
    for i in range(100):
        agent.step(_Tick(i * 0.1, {"req_ttft_p95_seconds": 2.0}, []))
    assert agent.applied == []
    from tuner.records import Action, Applied

    agent.window.add_action(Applied(10.0, Action("batch_size", "batch_size", 4, "slo"), "applied", 8))
    for i in range(100, 200):
        agent.step(_Tick(i * 0.1, {"req_ttft_p95_seconds": 2.0}, []))
    assert [(a.action.value, a.outcome) for a in agent.applied][:1] == [("bf16", "dry-run")]


class _Tick:
    def __init__(self, t: float, values: dict, events: list) -> None:
        self.t, self.values, self.events = t, values, events


class _Refusing:
    def apply(self, action, knobs):  # type: ignore[no-untyped-def]
        return "applied", {"command_id": "x1"}
