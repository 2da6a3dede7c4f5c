"""Write the synthetic-but-realistic traces under ``tests/replay/`` and their expected replay decisions.

    .venv/bin/python -m tests.replay.generate            # traces + expected files
    .venv/bin/python -m tests.replay.generate --expected # only re-derive the expected files

Each trace is recorded the way a live session records one: the agent (with the scenario's policy)
steps first and its actions land before the tick, then the tick and its events — with the simulator
of ``tests/replay/sim.py`` standing in for the inference process (it answers commands too).  The
expected file holds what ``tuner replay`` decides on that trace; ``tests/test_replay.py`` compares.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.replay.sim import Sim, SimActuator
from tuner.core.policy_config import build_agent, load_policy
from tuner.trace import TraceWriter, make_header

HERE = Path(__file__).resolve().parent

SCENARIOS: dict[str, tuple[str, Callable[[], Sim], int, str]] = {
    # name: (policy, simulator, ticks, what it shows)
    "interactive": (
        "interactive",
        lambda: Sim(seed=11, dt=0.25, temperature=0.3, rep_slope=0.4, batch_size=8, tokens_per_request=96),
        1200,
        "repetitive at the requested 0.3: the repetition penalty first (to its 1.3 maximum), then a probe up in "
        "temperature; batch explored to the knee under a 1 s TTFT SLO",
    ),
    "edge_oom": (
        "edge",
        lambda: Sim(seed=12, dt=0.25, batch_size=8, tokens_per_request=96, mem_total=6.0e9, oom_batch=12),
        800,
        "memory-tight: headroom under 25% -> precision step-down; an OOM at 12 halves the batch, ceiling, cleanup",
    ),
    "offline_leak": (
        "offline",
        lambda: Sim(seed=13, dt=1.0, batch_size=8, tokens_per_request=256, leak_per_request=3e6),
        1500,
        "a leak of 3 MB per request: Theil-Sen + Mann-Kendall on allocated memory triggers cleanups",
    ),
}


def record(name: str) -> Path:
    policy, make, ticks, what = SCENARIOS[name]
    sim = make()
    path = HERE / f"{name}.jsonl"
    header = make_header(
        probes={"sim": {"available": True, "reason": None, "metrics": {}}},
        interval_s=sim.dt,
        command=["sim", name],
        pid=1,
        extra={"started_mono": 0.0, "policy": policy, "observe_only": False, "scenario": what},
    )
    header.update(host="replay-fixture", platform="synthetic", started_unix=0.0, python="3", versions={})
    with TraceWriter(path, header) as w:
        agent = build_agent(load_policy(policy), SimActuator(sim), w)
        for _ in range(ticks):
            tk = sim.tick()
            agent.step(tk)
            w.tick(tk.t, tk.values)
            for e in tk.events:
                w.event(e)
        w.end(sim.t, exit_code=0)
    return path


def expected(name: str) -> list[dict[str, Any]]:
    from tuner.commands.replay import load, replay

    policy = SCENARIOS[name][0]
    decisions = replay(load(str(HERE / f"{name}.jsonl")), load_policy(policy)).decisions
    return [decision_row(a) for a in decisions]


def decision_row(a: Any) -> dict[str, Any]:
    return {"t": a.t, "policy": a.action.policy, "knob": a.action.knob, "value": a.action.value, "outcome": a.outcome}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expected", action="store_true", help="only re-derive the expected decision files")
    args = ap.parse_args()
    for name in SCENARIOS:
        if not args.expected:
            record(name)
        rows = expected(name)
        (HERE / f"{name}.expected.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(name, len(rows), "decisions")


if __name__ == "__main__":
    main()
