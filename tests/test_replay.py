"""``tuner replay`` as a user runs it: decisions match the expected files of the recorded fixtures,
two runs are identical, ``--out`` writes a counterfactual trace, bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, tuner
from tests.replay.generate import SCENARIOS, decision_row
from tuner.commands.replay import load, replay
from tuner.core.policy_config import load_policy
from tuner.trace import TraceWriter, make_header, read_trace

HERE = Path(__file__).parent / "replay"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_decisions_match_the_expected_file(name: str) -> None:
    policy = SCENARIOS[name][0]
    decisions, notes = replay(load(str(HERE / f"{name}.jsonl")), load_policy(policy))
    want = json.loads((HERE / f"{name}.expected.json").read_text())
    got = [decision_row(a) for a in decisions]
    assert got == want, "decisions changed: if intended, run `python -m tests.replay.generate --expected`"
    assert notes == []


def test_fixtures_tell_their_story() -> None:
    """The expected files are not just whatever came out: each scenario shows what it is for."""
    inter = json.loads((HERE / "interactive.expected.json").read_text())
    temps = [d["value"] for d in inter if d["knob"] == "temperature"]
    assert temps and temps[-1] > 0.3  # repetitive at 0.3: the temperature went up
    batches = [d["value"] for d in inter if d["knob"] == "batch_size"]
    assert 64 not in batches  # the 1 s TTFT SLO stops it before 64
    edge = json.loads((HERE / "edge_oom.expected.json").read_text())
    assert edge[1]["knob"] == "precision" and edge[1]["value"] == "fp16"
    assert any(d["knob"] == "cleanup" for d in edge)
    leak = json.loads((HERE / "offline_leak.expected.json").read_text())
    assert [d for d in leak if d["knob"] == "cleanup"]


def test_cli_prints_decisions_and_the_difference() -> None:
    cp = tuner("replay", str(HERE / "edge_oom.jsonl"))
    assert cp.returncode == 0, cp.stderr
    assert "with policy edge" in cp.stdout
    assert "precision fp32 -> fp16" in cp.stdout
    assert "out of memory at batch 16" in cp.stdout
    assert "decisions: 5 carried out in replay, 5 in the recording, 5 the same" in cp.stdout


def test_cli_json_is_deterministic_and_shows_the_diff_against_another_policy() -> None:
    a = tuner("replay", str(HERE / "interactive.jsonl"), "--json")
    b = tuner("replay", str(HERE / "interactive.jsonl"), "--json")
    assert a.returncode == 0 and a.stdout == b.stdout
    doc = json.loads(a.stdout)
    assert doc["diff"]["same"] == doc["diff"]["recorded"] == doc["diff"]["replayed"]  # dry run == live recording
    other = json.loads(tuner("replay", str(HERE / "interactive.jsonl"), "--policy", "offline", "--json").stdout)
    assert other["policy"] == "offline" and other["diff"]["changes"]  # a different policy decides differently
    assert not any(d["knob"] == "temperature" for d in other["decisions"])


def test_out_writes_a_counterfactual_trace(tmp_path: Path) -> None:
    out = tmp_path / "cf.jsonl"
    cp = tuner("replay", str(HERE / "edge_oom.jsonl"), "--policy", "interactive", "--out", str(out))
    assert cp.returncode == 0, cp.stderr
    orig, cf = read_trace(HERE / "edge_oom.jsonl"), read_trace(out)
    assert cf.header["replay_of"].endswith("edge_oom.jsonl") and cf.header["policy"] == "interactive"
    assert len(cf.times) == len(orig.times) and len(cf.requests()) == len(orig.requests())
    assert (cf.column("tree_rss_bytes") == orig.column("tree_rss_bytes")).all()  # the recorded samples
    assert {a["outcome"] for a in cf.actions} <= {"dry-run", "rejected"}  # the new decisions, nothing else
    assert not any(a["knob"] == "precision" for a in cf.actions)  # interactive's ladder has no fp16 step here
    kb = cf.column("knob_batch_size")
    last_set = [a["value"] for a in cf.actions if a["knob"] == "batch_size" and a["outcome"] == "dry-run"][-1]
    assert kb[-1] == last_set


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    err = assert_one_line_error(tuner("replay", str(tmp_path / "missing.jsonl")))
    assert "no such file" in err
    plain = tmp_path / "plain.jsonl"
    with TraceWriter(plain, make_header(probes={}, interval_s=0.1)) as w:
        w.tick(0.1, {"x_ratio": 1.0})
    err = assert_one_line_error(tuner("replay", str(plain)))
    assert "recorded without a policy" in err
    err = assert_one_line_error(tuner("replay", str(HERE / "edge_oom.jsonl"), "--out", str(HERE / "edge_oom.jsonl")))
    assert "must not be the trace" in err


@pytest.mark.slow
def test_replay_of_a_live_demo_run_makes_the_live_decisions(tmp_path: Path) -> None:
    """The agent cannot tell live from replay: the decisions a live `tuner demo --policy` took (knobs over
    the real channel to the real model) come out of `tuner replay` of its trace, one for one."""
    policy = tmp_path / "p.toml"
    policy.write_text(
        "[temperature]\nmin = 0.2\nmax = 1.0\nmin_requests = 4\n"
        "[batch_size]\nmin = 1\nmax = 32\nmeasure_s = 5.0\nsettle_s = 1.0\nmin_requests = 4\n"
    )
    trace = tmp_path / "live.jsonl"
    cp = tuner(
        "demo",
        "--headless",
        "--quiet",
        "--duration",
        "25",
        "--policy",
        str(policy),
        "--trace",
        str(trace),
        "--temperature",
        "0.3",
        timeout=300,
    )
    assert cp.returncode == 0, cp.stderr
    live = read_trace(trace)
    carried = [a for a in live.actions if a["outcome"] in ("applied", "clamped")]
    assert carried, "the live run took no decision"
    assert "knob_batch_size" in live.columns and not all(v != v for v in live.column("knob_batch_size"))
    doc = json.loads(tuner("replay", str(trace), "--json").stdout)
    assert doc["diff"]["recorded"] == len(carried)
    assert doc["diff"]["same"] == doc["diff"]["recorded"] == doc["diff"]["replayed"], doc["diff"]
