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


def _latency_run(after_decrease_ttft: float, queue_s: float = 0.0, undo_cause: str | None = None) -> list[str]:
    """The precision policy alone, fed requests whose TTFT is 2 s (``queue_s`` of it queued) until a batch
    decrease 8 -> 4 at t = 10 s, then ``after_decrease_ttft`` of service time (plus the same queue); with
    ``undo_cause``, the batch policy undoes the decrease at t = 25 s for that cause.  Returns the precision
    decisions as "value@t"."""
    from tuner.records import Action, Applied

    cfg = PrecisionConfig(slo_ttft_p95_s=0.5, trigger_s=1.0, latency_window_s=10.0)
    pol = PrecisionPolicy(cfg)
    agent = Agent(
        [pol], Arbiter(bounds=pol.bounds), DryRunActuator(), None, knobs=Knobs(precision="fp32", batch_size=8)
    )
    for i in range(600):
        t = round(i * 0.1, 6)
        service = 2.0 if t < 10.0 else after_decrease_ttft
        ev = [Event(t, "request", {"tokens": 32, "queue_seconds": queue_s, "ttft_seconds": queue_s + service,
                                   "e2e_seconds": queue_s + service + 0.3})] if i % 2 == 0 else []
        if i == 100:
            agent.window.add_action(Applied(t, Action("batch_size", "batch_size", 4, "slo", {"cause": "latency"}),
                                            "applied", 8))
        if i == 250 and undo_cause is not None:
            agent.window.add_action(Applied(t, Action("batch_size", "batch_size", 8, "undo", {"cause": undo_cause}),
                                            "applied", 4))
        agent.step(_Tick(t, {}, ev))
    return [f"{a.action.value}@{a.t:g}" for a in agent.applied if a.action.knob == "precision"]


def test_latency_steps_down_only_after_a_smaller_batch_was_measured_not_to_fix_it() -> None:
    """Service TTFT 2 s against a 0.5 s SLO: nothing before the batch went down (t = 10 s), nothing while the
    requests served at the smaller batch are still being measured (the latency window, 10 s), then a step."""
    moves = _latency_run(after_decrease_ttft=1.5)
    assert len(moves) == 1 and moves[0].startswith("bf16@")
    assert float(moves[0].split("@")[1]) >= 20.0


def test_a_smaller_batch_that_fixes_the_latency_means_no_precision_step() -> None:
    assert _latency_run(after_decrease_ttft=0.2) == []


def test_queueing_latency_is_not_a_precision_matter() -> None:
    """TTFT 2.1 s, but 2 s of it queued (service 0.1 s): a backlog is the batch policy's to drain."""
    assert _latency_run(after_decrease_ttft=0.1, queue_s=2.0) == []


def test_a_smaller_batch_undone_because_the_queue_grew_counts_as_tried() -> None:
    """The smaller batch met the SLO (0.2 s) but grew the queue, and the batch policy undid it: the latency
    that comes back at the larger size is the precision policy's."""

    moves = _latency_run(after_decrease_ttft=0.2, undo_cause="queue")
    assert moves == []  # the requests after the undo still meet it in this run: nothing to do
    from tuner.records import Action, Applied

    pol = PrecisionPolicy(PrecisionConfig(slo_ttft_p95_s=0.5, trigger_s=1.0, latency_window_s=10.0))
    agent = Agent([pol], Arbiter(bounds=pol.bounds), DryRunActuator(), None,
                  knobs=Knobs(precision="fp32", batch_size=8))
    for i in range(400):
        t = round(i * 0.1, 6)
        service = 0.2 if 10.0 <= t < 25.0 else 2.0
        ev = [Event(t, "request", {"tokens": 32, "queue_seconds": 0.0, "ttft_seconds": service,
                                   "e2e_seconds": service + 0.3})] if i % 2 == 0 else []
        if i == 100:
            agent.window.add_action(Applied(t, Action("batch_size", "batch_size", 4, "slo"), "applied", 8))
        if i == 250:
            agent.window.add_action(Applied(t, Action("batch_size", "batch_size", 8, "queue grew",
                                                      {"cause": "queue"}), "applied", 4))
        agent.step(_Tick(t, {}, ev))
    steps = [a for a in agent.applied if a.action.knob == "precision"]
    assert [a.action.value for a in steps] == ["bf16"] and steps[0].t > 25.0
    assert "grew the queue" in steps[0].action.reason


def test_closed_loop_the_precision_step_waits_for_the_batch_and_returns_when_the_cause_is_gone() -> None:
    """A plant with a queue (``QueueSim``): 1,200-token prompts make even batch 1 miss the 1 s SLO.  With the
    interactive preset's batch and precision tables, the batch policy steps 8 -> 4 -> 2 -> 1, each measured;
    int8 comes only after the smallest batch was measured missing, and fp32 comes back once the prompts are
    short again (the cause gone for the hold period)."""
    from tests.replay.sim import QueueActuator, QueueSim
    from tuner.core.policy_config import build_agent, load_policy, parse_policy

    preset = load_policy("interactive")
    data = {"agent": {"cooldown_s": dict(preset.agent.cooldown_s)},
            "batch_size": {"min": 1, "max": 64, "slo_ttft_p95_s": 1.0},
            "precision": {"ladder": ["fp32", "int8"], "slo_ttft_p95_s": 1.0, "hold_s": 30.0}}
    sim = QueueSim(seed=5, rate=lambda t: 0.2, prompt_tokens=lambda t: 1200.0 if t < 300 else 64.0)
    agent = build_agent(parse_policy(data), QueueActuator(sim), None)
    for _ in range(int(500 / sim.dt)):
        agent.step(sim.tick())
    applied = [a for a in agent.applied if a.outcome in ("applied", "clamped")]
    batch = [(a.t, a.action.value) for a in applied if a.action.knob == "batch_size"]
    prec = [(a.t, a.action.value) for a in applied if a.action.knob == "precision"]
    assert [v for _, v in batch] == [8, 4, 2, 1]
    assert [v for _, v in prec] == ["int8", "fp32"]
    assert prec[0][0] >= batch[-1][0] + 20.0  # after the requests at batch 1 were measured
    assert prec[1][0] > 300.0  # back once the long prompts are gone


class _Tick:
    def __init__(self, t: float, values: dict, events: list) -> None:
        self.t, self.values, self.events = t, values, events


class _Refusing:
    def apply(self, action, knobs):  # type: ignore[no-untyped-def]
        return "applied", {"command_id": "x1"}
