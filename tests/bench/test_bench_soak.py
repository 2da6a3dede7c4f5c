"""The soak checker (tools/soak_check.py, run by ``make soak``) judges what it is meant to judge.

Traces are written with the real ``TraceWriter`` (10 Hz ticks for 15 simulated minutes) and the checker
runs as ``make soak`` runs it, a subprocess; each case changes one thing and must flip one verdict.
The soak itself (15 minutes of CPU) is not run here: ``make soak``, figures in docs/soak.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli import ROOT, tuner_env
from tuner.records import Event
from tuner.trace import TraceWriter, make_header

MIB = 1 << 20
SECONDS = 900
HZ = 10


def write(path: Path, *, sidecar_leak_mib_min: float = 0.0, inference_controlled: bool = True,
          drop_end: bool = False, gap_at: float | None = None, requests: int = 100) -> Path:
    w = TraceWriter(path, make_header(probes={}, interval_s=1 / HZ, command=["demo"],
                                      extra={"policy": "interactive", "policies": ["cleanup"]}))
    n = SECONDS * HZ
    ticks = 0
    for i in range(n):
        t = i / HZ
        if gap_at is not None and gap_at <= t < gap_at + 5:
            continue
        leak = (t % 120 if inference_controlled else t) * 2 * MIB  # 2 MiB/s; cleaned every 2 min when held
        w.tick(t, {"self_rss_bytes": 50 * MIB + sidecar_leak_mib_min * MIB * t / 60 + (i % 7) * 4096,
                   "tree_rss_bytes": 300 * MIB + leak, "chan_dropped_total": 0})
        ticks += 1
    for k in range(requests):
        w.event(Event(k * SECONDS / requests, "request", {"tokens": 10}))
    if not drop_end:
        w.end(SECONDS, ticks=ticks, skipped=0, exit_code=0)
    w.close()
    return path


def check(trace: Path, work: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    args = [sys.executable, str(ROOT / "tools" / "soak_check.py"), str(trace), "--json"]
    if work is not None:
        wp = trace.with_suffix(".out")
        wp.write_text("tuner: noise\n" + json.dumps({"workload": "tuner.demo", **work}) + "\n")
        args += ["--workload", str(wp)]
    cp = subprocess.run(args, capture_output=True, text=True, env=tuner_env(), timeout=60)
    assert cp.returncode in (0, 1), cp.stderr
    return cp.returncode, json.loads(cp.stdout)


def test_a_healthy_soak_passes(tmp_path: Path) -> None:
    rc, r = check(write(tmp_path / "ok.jsonl"), {"requests_done": 100, "leak_bytes": 400 * MIB, "leak_entries": 20})
    assert rc == 0 and all(r["verdicts"].values()), r
    assert r["sidecar_rss"]["growth_mib"] == pytest.approx(0, abs=0.1)
    # start (median of the first 30 s: 330 MiB) + 20 MiB a request x 100 requests
    assert r["inference_memory"]["uncontrolled_projection_mib"] == pytest.approx(330 + 20 * 100, abs=1)


@pytest.mark.parametrize(("case", "verdict"), [
    ({"sidecar_leak_mib_min": 2.0}, "sidecar RSS flat"),
    ({"inference_controlled": False}, "inference memory controlled"),
    ({"drop_end": True}, "trace complete"),
    ({"gap_at": 400.0}, "trace complete"),
])
def test_each_failure_flips_its_verdict(tmp_path: Path, case: dict[str, Any], verdict: str) -> None:
    rc, r = check(write(tmp_path / "bad.jsonl", **case))
    assert rc == 1 and r["verdicts"][verdict] is False, r
    assert [k for k, ok in r["verdicts"].items() if not ok] == [verdict]


def test_a_request_missing_from_the_trace_is_incomplete(tmp_path: Path) -> None:
    rc, r = check(write(tmp_path / "t.jsonl", requests=99), {"requests_done": 100})
    assert rc == 1 and r["complete"]["requests_in_trace"] == 99 and not r["verdicts"]["trace complete"]
