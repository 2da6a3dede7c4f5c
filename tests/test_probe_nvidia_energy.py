"""Energy per generated token (issue 16 §1): live in the trace (the key the TUI and Prometheus show), over the
whole run in ``tuner report`` — and ``None`` with the reason when other processes compute on the device.  The
real path: ``tuner run`` with the fake NVML in the subprocess and a child that reports its requests through
``tuner.client``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli import tuner
from tests.test_probe_nvidia_deadline import _env
from tuner.core.energy import KEY, EnergyPerToken, over_run
from tuner.core.sampler import Tick
from tuner.records import Event
from tuner.tui.model import Model

CHILD = """
import time
from tuner import client
c = client.connect()
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    with c.request(prompt_tokens=8) as r:
        r.started()
        for _ in range(50):
            r.token(7)
    time.sleep(0.1)  # 50 tokens every ~0.1 s: ~500 tokens/s
c.close()
"""


def tick(t: float, values: dict[str, Any], tokens: int = 0, final: bool = True) -> Tick:
    events = [Event(t, "request", {"tokens": tokens})] if tokens else []
    return Tick(t, [], dict(values), {}, events, final)


def gpu(joules: float, *, ours: float = 1.0, others: float | None = 0.0, dev: str = "0") -> dict[str, Any]:
    return {
        f"gpu_energy_joules_total/{dev}": joules,
        f"gpu_power_watts/{dev}": 300.0,
        f"gpu_tree_procs/{dev}": ours,
        f"gpu_tree_mem_bytes/{dev}": 1e9 if ours else 0.0,
        f"gpu_other_procs/{dev}": others,
    }


def test_live_figure_over_the_window_and_the_reason_when_shared() -> None:
    notes: list[str] = []
    hook = EnergyPerToken(lambda t, m, lv: notes.append(m), window_s=10.0)
    out = []
    for k in range(40):  # 300 W, 100 tokens a second: 3 J a token
        tk = tick(k * 0.5, {**gpu(1000.0 + 150.0 * k), **gpu(5e6 + 1e3 * k, ours=0.0, dev="1")}, tokens=50)
        hook.step(tk)
        out.append(tk.values.get(KEY))
    assert out[-1] == pytest.approx(3.0, rel=0.06)  # GPU 1 (not ours, busier) is not counted
    tk = tick(20.0, {**gpu(4000.0, others=1.0), **gpu(6e6, ours=0.0, dev="1")}, tokens=50)
    hook.step(tk)
    assert tk.values[KEY] is None
    assert notes == ["energy per token not computed: 1 other process computes on GPU 0 (its energy counter is the "
                     "device's)"]  # fmt: skip
    tk = tick(20.5, gpu(4075.0), tokens=50)
    hook.step(tk)
    assert tk.values[KEY] is not None and notes[-1] == "energy per token computed again"
    mid = tick(20.6, gpu(4080.0), tokens=50, final=False)  # fast rates: written on a batch's last tick only
    hook.step(mid)
    assert KEY not in mid.values


def test_unknown_attribution_is_a_reason_and_no_gpu_is_no_key() -> None:
    hook = EnergyPerToken()
    tk = tick(0.0, {"gpu_energy_joules_total/0": 1.0, "gpu_tree_procs/0": None, "gpu_tree_mem_bytes/0": None,
                    "gpu_other_procs/0": None}, tokens=10)  # fmt: skip
    hook.step(tk)
    assert tk.values[KEY] is None  # CUDA shows it the device, processes cannot be told apart
    idle = EnergyPerToken()
    tk = tick(0.0, gpu(1.0, ours=0.0), tokens=10)
    idle.step(tk)
    assert KEY not in tk.values  # the inference uses no GPU: nothing to say


def test_over_run_skips_counter_restarts_and_needs_tokens() -> None:
    cols = {
        "gpu_energy_joules_total/0": [100.0, 200.0, 300.0, 5.0, 105.0],  # the driver reloaded at the 4th tick
        "gpu_tree_procs/0": [1.0] * 5,
        "gpu_other_procs/0": [0.0] * 5,
        "cpu_package_energy_joules_total/0": [0.0, 10.0, 20.0, 30.0, 40.0],
    }
    arrays = {k: np.array(v) for k, v in cols.items()}
    times = np.arange(5.0)
    e = over_run(arrays, times, [100.0, 100.0])
    assert e["gpu_joules"] == 300.0 and e["joules_per_token"] == 1.5 and e["reason"] is None
    assert e["gpu_mean_watts"] == 75.0 and e["cpu_package_joules"] == 40.0 and e["cpu_joules_per_token"] == 0.2
    none = over_run(arrays, times, [])
    assert none["joules_per_token"] is None and "no generated tokens" in none["reason"]
    arrays["gpu_other_procs/0"] = np.array([0.0, 2.0, 0.0, 0.0, 0.0])
    shared = over_run(arrays, times, [200.0])
    assert shared["joules_per_token"] is None and shared["reason"].startswith("other processes (up to 2) computed")


def _run(tmp_path: Path, spec: dict[str, Any], seconds: float) -> tuple[Path, subprocess.CompletedProcess[str]]:
    trace = tmp_path / "t.jsonl"
    cp = subprocess.run(
        [sys.executable, "-m", "tuner", "run", "--headless", "--trace", str(trace), "--",
         sys.executable, "-c", CHILD.format(seconds=seconds)],
        env=_env(spec), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    return trace, cp


def test_tuner_run_records_energy_per_token_and_report_shows_it(tmp_path: Path) -> None:
    spec = {"gpus": [{"preset": "h200", "power_mw": 200_000, "children_mem": 2 << 30}, {"preset": "rtx_4090"}]}
    trace, _ = _run(tmp_path, spec, 4.0)
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    live = [r["m"][KEY] for r in recs if r["k"] == "tick" and r["m"].get(KEY) is not None]
    tokens = sum(r["data"]["tokens"] for r in recs if r["k"] == "event" and r["kind"] == "request")
    assert live and tokens > 300
    rep = tuner("report", str(trace), "--json")
    assert rep.returncode == 0, rep.stderr
    e = json.loads(rep.stdout)["energy"]
    assert e["devices"] == ["0"] and e["tokens"] == tokens  # GPU 1 is not the command's
    ticks = [r["t"] for r in recs if r["k"] == "tick" and r["m"].get("gpu_energy_joules_total/0") is not None]
    assert e["gpu_joules"] == pytest.approx(200.0 * (ticks[-1] - ticks[0]), rel=0.05)  # the counter integrates 200 W
    assert e["gpu_mean_watts"] == pytest.approx(200.0, rel=0.05)
    assert e["joules_per_token"] == pytest.approx(e["gpu_joules"] / tokens)
    text = tuner("report", str(trace)).stdout
    assert "energy    GPU 0 " in text and "J per generated token" in text
    m = Model()
    m.apply_many(recs)
    line = m.energy_line(m.last_t - 1.0) or ""  # the live view's header (before the command's last tick)
    assert line.startswith("energy ") and line.endswith("J/token, 200 W")


def test_another_process_on_the_gpu_means_no_figure_with_the_reason(tmp_path: Path) -> None:
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        spec = {"gpus": [{"preset": "h200", "children_mem": 2 << 30, "processes": [[neighbour.pid, 1 << 30]]}]}
        trace, _ = _run(tmp_path, spec, 2.5)
    finally:
        neighbour.kill()
        neighbour.wait()
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    assert all(r["m"].get(KEY) is None for r in recs if r["k"] == "tick")
    notes = [r["msg"] for r in recs if r["k"] == "note"]
    want = "energy per token not computed: 1 other process computes on GPU 0 (its energy counter is the device's)"
    assert want in notes
    e = json.loads(tuner("report", str(trace), "--json").stdout)["energy"]
    assert e["joules_per_token"] is None and e["reason"].startswith("other processes (up to 1) computed on GPU 0")
    assert "per token n/a: other processes" in tuner("report", str(trace)).stdout
    m = Model()
    m.apply_many(recs)
    assert (m.energy_line(m.last_t - 1.0) or "").startswith("energy/token n/a: 1 other process computes on GPU 0")


def test_prometheus_serves_energy_per_token(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"gpus": [{"preset": "h200", "children_mem": 2 << 30}]}
    trace = tmp_path / "t.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner", "run", "--headless", "--quiet", "--trace", str(trace), "--prometheus",
         f"127.0.0.1:{port}", "--", sys.executable, "-c", CHILD.format(seconds=60.0)],
        env=_env(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline and "tuner_gpu_energy_per_token_joules " not in body:
            time.sleep(0.3)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                continue
        lines = [ln for ln in body.splitlines() if ln.startswith("tuner_gpu_energy_per_token_joules ")]
        assert lines and float(lines[0].split()[1]) > 0, body[-2000:]
        assert 'tuner_gpu_energy_joules_total{device="0"}' in body
    finally:
        proc.terminate()  # Ctrl-C's way: the tuner stops the command and writes its trace
        proc.wait(timeout=120)


def test_report_shows_the_clients_own_memory_where_the_trees_is_unknown(tmp_path: Path) -> None:
    from tuner.trace import TraceWriter, make_header

    why = "the tuner runs in a PID namespace other than the host's (pid:[4026532198]): NVML reports host PIDs"
    probes = {"nvidia": {"available": True, "reason": None, "metrics": {}, "detail": {"attribution": why}}}
    trace = tmp_path / "t.jsonl"
    w = TraceWriter(trace, make_header(probes=probes, interval_s=0.1, command=["serve"]))
    for k in range(20):
        reserved = 3 * 2**30 if k > 5 else None
        w.tick(k * 0.1, {"gpu_mem_used_bytes/0": 9e9, "gpu_mem_total_bytes/0": 8e10, "gpu_tree_mem_bytes/0": None,
                         "alloc_reserved_bytes": reserved, "alloc_allocated_bytes": 2**31})  # fmt: skip
    w.end(2.0)
    w.close()
    s = json.loads(tuner("report", str(trace), "--json").stdout)
    assert s["gpu_tree_memory"] == {"reason": why, "client_reserved_bytes": 3 * 2**30,
                                    "client_allocated_bytes": 2**31}  # fmt: skip
    text = tuner("report", str(trace)).stdout
    assert f"GPU mem   the tree's per-process GPU memory is unknown: {why}; the client reports 3 GiB reserved " \
           "by its allocator (not the CUDA context)" in text  # fmt: skip
