"""``tuner demo`` as a user runs it: a real child process under the sidecar, a real trace."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner
from tuner.trace import read_trace

# tuner demo runs the built-in torch model; CI runs the fast suite on the oldest and newest Python without torch
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (the torch extra)")


def workload_summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{") and '"workload"' in ln]
    assert lines, stdout
    return json.loads(lines[-1])


def test_demo_headless_records_every_request_with_latency_repetition_and_memory(tmp_path: Path) -> None:
    trace = tmp_path / "demo.jsonl"
    cp = tuner("demo", "--headless", "--duration", "20", "--trace", str(trace), timeout=180)
    assert cp.returncode == 0, cp.stderr
    own = workload_summary(cp.stdout)  # what the inference process measured itself
    assert own["client_connected"] is True
    assert own["requests_done"] >= 40, own  # (on an overloaded machine the drain cap may leave some unserved)
    d = read_trace(trace)
    assert d.header.get("demo", {}).get("workload") == "tuner.demo.workload"
    reqs = d.requests()
    assert len(reqs) == own["requests_done"]  # every finished request reached the trace
    assert sum(e.data["tokens"] for e in reqs) == own["tokens"]
    for e in reqs:
        x = e.data
        assert x["ttft_seconds"] > 0 and x["e2e_seconds"] >= x["ttft_seconds"], x
        assert x["tokens"] <= 1 or x["tpot_seconds"] > 0, x
        # seq-rep-4 needs 4 tokens: an answer of 1-3 (an early end of sequence) reads None, never 0
        assert (x["seq_rep_4"] is None) if x["tokens"] <= 3 else 0 <= x["seq_rep_4"] <= 1, x
        assert 0 <= x["rep_32"] <= 1 and isinstance(x["loop"], bool), x
        assert x["temperature"] == pytest.approx(0.8) and x["precision"] == "fp32" and x["batch_size"] >= 1
    own_ttft = own["ttft_p50_seconds"]
    trace_ttft = float(np.median([e.data["ttft_seconds"] for e in reqs]))
    assert math.isclose(trace_ttft, own_ttft, rel_tol=0.2, abs_tol=0.02), (trace_ttft, own_ttft)
    # memory beside every request: the process tree's RSS from the CPU probe and the heap the client reported
    rss = d.column("tree_rss_bytes")
    alloc = d.column("alloc_allocated_bytes")
    for e in reqs:
        i = int(np.searchsorted(d.times, e.t))
        window = slice(max(0, i - 20), min(len(d.times), i + 20))
        assert np.any(rss[window] > 100 << 20), e.t
        assert np.any(alloc[window] > 0), e.t
    assert "requests" in cp.stderr.lower() or "ttft" in cp.stderr.lower(), cp.stderr  # the printed summary


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "--duration 0 must be more than 0 seconds"),
        (["--requests", "0"], "--requests 0 must be at least 1"),
        (["--rate", "-1"], "--rate -1 must be more than 0"),
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--observe-only"], "--observe-only needs --policy"),
        (["--mirostat", "--mirostat-tau", "0"], "--mirostat-tau 0 must be more than 0 bits"),
    ],
)
def test_demo_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    cp = tuner("demo", "--headless", "--trace", str(tmp_path / "t.jsonl"), *args, timeout=60)
    assert message in assert_one_line_error(cp)
    assert not (tmp_path / "t.jsonl").exists()  # refused before anything started


def test_demo_leak_grows_a_registered_cache(tmp_path: Path) -> None:
    cp = tuner("demo", "--headless", "--requests", "24", "--rate", "50", "--leak", timeout=180, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    (trace,) = (tmp_path / "traces").glob("*-demo.jsonl")  # the default trace name says what ran
    own = workload_summary(cp.stdout)
    assert own["leak_entries"] == 24  # one entry per request (conversation), never evicted
    per_request = own["leak_bytes"] / own["leak_entries"]
    assert 0.2e6 < per_request < 3e6, per_request
    assert len(read_trace(trace).requests()) == 24


def test_workload_runs_without_a_sidecar() -> None:
    import subprocess

    from tests.cli import tuner_env

    cp = subprocess.run([sys.executable, "-m", "tuner.demo.workload", "--requests", "6", "--rate", "0",
                         "--max-new-tokens", "16"], capture_output=True, text=True, env=tuner_env(), timeout=120)
    assert cp.returncode == 0, cp.stderr
    own = workload_summary(cp.stdout)
    assert own["client_connected"] is False and own["requests_done"] == 6 and own["tokens"] > 0


def test_workload_bounds_the_drain_and_closes_the_rest_as_failed() -> None:
    import subprocess

    from tests.cli import tuner_env

    cp = subprocess.run([sys.executable, "-m", "tuner.demo.workload", "--duration", "1", "--rate", "200",
                         "--batch-size", "4", "--max-new-tokens", "16", "--drain-seconds", "0"],
                        capture_output=True, text=True, env=tuner_env(), timeout=120)
    assert cp.returncode == 0, cp.stderr
    own = workload_summary(cp.stdout)
    assert own["requests_failed"] > 50 and own["requests_done"] < 100, own


def test_workload_carries_out_precision_and_cleanup_commands_from_a_real_channel() -> None:
    """What the policies will do to the demo: switch it to int8 and clean its leak, mid-run."""
    import subprocess
    import time

    from tests.cli import tuner_env
    from tuner.link.channel import ChannelServer
    from tuner.records import Knobs

    server = ChannelServer()
    server.start()
    msgs: list[dict] = []
    try:
        p = subprocess.Popen([sys.executable, "-m", "tuner.demo.workload", "--requests", "60", "--rate", "30",
                              "--leak", "--max-new-tokens", "48"],
                             env=tuner_env(TUNER_SOCKET=server.path), stdout=subprocess.PIPE, text=True)
        sent: dict[str, str | None] = {}
        deadline = time.monotonic() + 170
        while p.poll() is None and time.monotonic() < deadline:
            msgs += [m for _, m in server.drain()]
            done = sum(m.get("type") == "request" for m in msgs)
            if "knobs" not in sent and server.clients():
                server.broadcast_knobs(Knobs(temperature=0.3, batch_size=4))
                sent["knobs"] = "sent"
            if "precision" not in sent and done >= 10:
                sent["precision"] = server.send_command("precision", {"precision": "int8"})
            if "cleanup" not in sent and done >= 30:
                sent["cleanup"] = server.send_command("cleanup", {"steps": ["caches", "gc", "malloc_trim"]})
            time.sleep(0.05)
        out, _ = p.communicate(timeout=30)
        time.sleep(0.3)
        msgs += [m for _, m in server.drain()]
    finally:
        server.close()
    own = workload_summary(out)
    results = {m["cmd"]: m for m in msgs if m.get("type") == "command_result"}
    prec = results["precision"]
    assert prec["ok"] and prec["id"] == sent["precision"], prec
    assert prec["result"]["param_bytes_after"] < 0.4 * prec["result"]["param_bytes_before"]
    assert prec["result"]["top1"] >= 0.75 and prec["result"]["kl"] < 0.1  # the canary guard's figures
    clean = results["cleanup"]
    assert clean["ok"] and clean["result"]["steps"][0]["entries"] >= 30, clean
    assert clean["result"]["reclaimed_bytes"] > 10 << 20, clean  # the cleared leak came back as RSS
    assert own["leak_entries"] < 60 and own["precision"] == "int8"
    reqs = [m for m in msgs if m.get("type") == "request"]
    assert len(reqs) == 60
    assert reqs[-1]["precision"] == "int8" and reqs[-1]["temperature"] == 0.3 and reqs[-1]["batch_size"] <= 4
