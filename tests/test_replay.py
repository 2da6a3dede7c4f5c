"""``tuner replay`` as a user runs it: decisions match the expected files of the recorded fixtures,
two runs are identical, ``--out`` writes a counterfactual trace, bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    result = replay(load(str(HERE / f"{name}.jsonl")), load_policy(policy))
    decisions, notes = result.decisions, result.notes
    want = json.loads((HERE / f"{name}.expected.json").read_text())
    got = [decision_row(a) for a in decisions]
    assert got == want, "decisions changed: if intended, run `python -m tests.replay.generate --expected`"
    assert notes == []


def test_fixtures_tell_their_story() -> None:
    """The expected files are not just whatever came out: each scenario shows what it is for."""
    inter = json.loads((HERE / "interactive.expected.json").read_text())
    temps = [d["value"] for d in inter if d["knob"] == "temperature"]
    assert temps and temps[-1] > 0.3  # repetitive at 0.3: the temperature went up ...
    pens = [(d["t"], d["value"]) for d in inter if d["knob"] == "repetition_penalty"]
    first_t = min(d["t"] for d in inter if d["knob"] == "temperature")
    assert [v for _, v in pens] == [1.15, 1.3] and pens[-1][0] < first_t  # ... after the top (2 steps)
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
    carried = [a for a in live.actions if a["outcome"] in ("applied", "clamped", "sent")]
    assert carried, "the live run took no decision"
    assert "knob_batch_size" in live.columns and not all(v != v for v in live.column("knob_batch_size"))
    doc = json.loads(tuner("replay", str(trace), "--json").stdout)
    assert doc["diff"]["recorded"] == len(carried)
    assert doc["diff"]["same"] == doc["diff"]["recorded"] == doc["diff"]["replayed"], doc["diff"]
    assert doc["diverged_at"] is None, doc["open_loop"]  # same decisions at the same ticks, same knob columns


# -- where a counterfactual trace stops being the policy's (open loop) -----------------------------------


def rewrite(src: Path, dst: Path, fn: Any) -> Path:
    """``src`` with every record passed through ``fn`` (which edits it in place)."""
    lines = []
    for line in src.read_text().splitlines():
        r = json.loads(line)
        fn(r)
        lines.append(json.dumps(r))
    dst.write_text("\n".join(lines) + "\n")
    return dst


def test_a_replay_that_differs_at_a_known_tick_is_marked_there_everywhere(tmp_path: Path) -> None:
    """The recording carried out batch 12 at t=12.5 where the edge policy decides 16: the counterfactual
    trace's metrics after 12.5 s are not what the policy would have caused, and every output says so."""

    def edit(r: dict[str, Any]) -> None:
        if r["k"] == "action" and r["t"] == 12.5 and r["knob"] == "batch_size":
            r["value"] = 12

    rec = rewrite(HERE / "edge_oom.jsonl", tmp_path / "rec.jsonl", edit)
    cf = tmp_path / "cf.jsonl"
    cp = tuner("replay", str(rec), "--out", str(cf))
    assert cp.returncode == 0, cp.stderr
    assert "diverges at t=12.50 s: the replay carries out batch_size=16; the recording carried out batch_size=12" in (
        cp.stdout
    )
    assert "metrics after t=12.50 s are the recording's, not what this policy would have caused" in cp.stdout
    doc = json.loads(tuner("replay", str(rec), "--json").stdout)
    assert doc["diverged_at"] == 12.5 and doc["diff"]["diverged_at"] == 12.5
    d = read_trace(cf)
    assert d.header["replay_diverged_at"] == 12.5 and "batch_size=12" in d.header["replay_diverged_why"]
    (mark,) = [n for n in d.notes if (n.get("data") or {}).get("replay_diverged")]
    assert mark["t"] == 12.5 and mark["level"] == "warn" and "not what this policy would have caused" in mark["msg"]
    # the report, its JSON and its HTML page
    rep = tuner("report", str(cf))
    assert rep.returncode == 0, rep.stderr
    assert "replay    a replay of" in rep.stdout
    assert "metrics after t=12.50 s are the recording's, not what this policy would have caused" in rep.stdout
    js = json.loads(tuner("report", str(cf), "--json").stdout)
    assert js["replay"]["diverged_at"] == 12.5 and js["replay"]["policy"] == "edge"
    html = tmp_path / "cf.html"
    assert tuner("report", str(cf), "--html", str(html)).returncode == 0
    page = html.read_text()
    assert "id='replay-mark'" in page and "metrics after t=12.50 s are the recording&#x27;s" in page
    # compare: the recording against its counterfactual
    cmp_ = tuner("compare", str(rec), str(cf))
    assert cmp_.returncode == 0, cmp_.stderr
    assert "B is a replay of" in cmp_.stdout and "metrics after t=12.50 s" in cmp_.stdout
    cj = json.loads(tuner("compare", "--json", str(rec), str(cf)).stdout)
    assert cj["a_replay"] is None and cj["b_replay"]["diverged_at"] == 12.5
    chtml = tmp_path / "cmp.html"
    assert tuner("compare", str(rec), str(cf), "--html", str(chtml)).returncode == 0
    assert "id='replay-mark-b'" in chtml.read_text() and "id='replay-mark-a'" not in chtml.read_text()


def test_a_replay_that_never_differs_says_so(tmp_path: Path) -> None:
    cf = tmp_path / "cf.jsonl"
    cp = tuner("replay", str(HERE / "edge_oom.jsonl"), "--out", str(cf))
    assert cp.returncode == 0, cp.stderr
    assert "diverges: never" in cp.stdout and "its metrics are what this policy caused" in cp.stdout
    d = read_trace(cf)
    assert d.header["replay_diverged_at"] is None
    assert not [n for n in d.notes if (n.get("data") or {}).get("replay_diverged")]
    rep = tuner("report", str(cf)).stdout
    assert "its decisions are the recording's throughout, so its metrics are what this policy caused" in rep
    assert "not what this policy would have caused" not in rep
    assert json.loads(tuner("report", str(cf), "--json").stdout)["replay"]["diverged_at"] is None
    assert json.loads(tuner("report", str(HERE / "edge_oom.jsonl"), "--json").stdout)["replay"] is None


def test_a_knob_the_recording_did_not_run_with_diverges_there(tmp_path: Path) -> None:
    """The same decisions, but the recorded precision stayed 32 bits from 8 s (as when the inference side
    refuses the change): the replay's fp16 is not what ran, so its metrics stop counting there."""

    def edit(r: dict[str, Any]) -> None:
        if r["k"] == "tick" and r["t"] >= 8.0:
            r["m"]["knob_precision_bits"] = 32

    rec = rewrite(HERE / "edge_oom.jsonl", tmp_path / "rec.jsonl", edit)
    doc = json.loads(tuner("replay", str(rec), "--json").stdout)
    assert doc["diff"]["same"] == doc["diff"]["recorded"]  # the decisions themselves are the same
    assert doc["diverged_at"] == 8.0
    assert "knob_precision_bits was 32 in the recording, 16 in the replay" in doc["open_loop"]


def test_an_observe_only_recording_diverges_at_the_first_decision(tmp_path: Path) -> None:
    """Nothing a recording made with --observe-only decided reached the process: replayed with the same
    policy, the decisions are the same but the metrics stop being the policy's at its first one."""

    def edit(r: dict[str, Any]) -> None:
        if r["k"] == "header":
            r["observe_only"] = True

    rec = rewrite(HERE / "edge_oom.jsonl", tmp_path / "rec.jsonl", edit)
    doc = json.loads(tuner("replay", str(rec), "--json").stdout)
    first = min(d["t"] for d in doc["decisions"] if d["outcome"] == "dry-run")
    assert doc["diverged_at"] == first == 0.25
    assert "the recording changed nothing" in doc["open_loop"]


def test_no_client_in_the_recording_fails_in_the_replay_as_it_did_live(tmp_path: Path) -> None:
    """Where the recorded channel had no client (chan_clients 0) the live actuator could set nothing: the
    replay's decisions there fail the same way instead of pretending to be carried out."""

    def edit(r: dict[str, Any]) -> None:
        if r["k"] == "tick":
            r["m"]["chan_clients"] = 0 if r["t"] < 2.0 else 1
        if r["k"] == "action" and r["t"] == 0.25:
            r["outcome"], r["result"] = "failed", {"error": "the knobs reached no client"}

    rec = rewrite(HERE / "edge_oom.jsonl", tmp_path / "rec.jsonl", edit)
    doc = json.loads(tuner("replay", str(rec), "--json").stdout)
    early = [d for d in doc["decisions"] if d["t"] < 2.0 and d["outcome"] != "rejected"]
    assert early and all(d["outcome"] == "failed" for d in early)
    assert "reached no client" in json.dumps(early)
    later = [d for d in doc["decisions"] if d["t"] >= 2.0 and d["knob"] == "batch_size"]
    assert later[0]["outcome"] == "dry-run" and later[0]["value"] == 8  # set once a client is there
