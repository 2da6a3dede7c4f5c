"""The two committed traces say what they are: ``traces/example-demo.jsonl`` is a real recording of
``tuner demo`` (made by ``make example-trace``, within 60 s and 1 MB), ``tests/data/synthetic-demo.jsonl``
is generated (its header says so) and its generator reproduces it byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.make_synthetic_trace import FIXTURE, write

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "traces" / "example-demo.jsonl"


def test_example_trace_is_a_real_demo_recording_within_its_limits() -> None:
    assert EXAMPLE.stat().st_size <= 1_000_000
    lines = EXAMPLE.read_text().splitlines()
    header, end = json.loads(lines[0]), json.loads(lines[-1])
    assert "synthetic" not in header and header["host"] not in ("synthetic", "demo-host", "replay-fixture")
    assert header["command"][1:3] == ["-m", "tuner.demo.workload"]  # the demo's real inference process
    assert header["policy"] == "interactive" and header["observe_only"] is False
    assert end["k"] == "end" and 0 < end["t"] <= 60
    recs = [json.loads(x) for x in lines[1:]]
    assert sum(r["k"] == "event" and r.get("kind") == "request" for r in recs) > 50  # the model served requests
    assert any(r["k"] == "action" for r in recs)
    assert "example-trace:" in (ROOT / "Makefile").read_text()


def test_synthetic_fixture_says_so_and_is_reproducible(tmp_path: Path) -> None:
    header = json.loads(FIXTURE.read_text().splitlines()[0])
    assert header["host"] == "synthetic" and "no process ran" in header["synthetic"]
    assert header["command"][0] == "tests/helpers/make_synthetic_trace.py"
    again = write(tmp_path / "again.jsonl")
    assert again.read_bytes() == FIXTURE.read_bytes()
