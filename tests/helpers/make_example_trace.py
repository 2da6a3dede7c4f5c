"""Write ``traces/example-demo.jsonl``: a deterministic (seeded) 3-minute, 10 Hz demo-like recording.

A CPU-only host (nvidia/npu probes unavailable with their reasons), a demo workload with Poisson
requests, a slow RSS leak, and a few policy actions whose knob changes show in the knob columns and the
request figures.  Run: ``python tests/helpers/make_example_trace.py [OUT] [--seconds S]``.  Used as the
fixture of the TUI's snapshot tests; the same function feeds a growing trace in the tmux test.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tuner.records import Action, Applied, Event  # noqa: E402
from tuner.trace import TraceWriter, make_header  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
PROBES: dict[str, dict[str, Any]] = {
    "cpu": {
        "available": True,
        "reason": None,
        "metrics": {
            "tree_cpu_ratio": "ratio",
            "tree_rss_bytes": "bytes",
            "tree_uss_bytes": "bytes",
            "tree_threads_count": "count",
            "tree_procs_count": "count",
            "sys_cpu_ratio": "ratio",
            "sys_mem_total_bytes": "bytes",
            "sys_mem_available_bytes": "bytes",
            "sys_mem_used_bytes": "bytes",
        },
    },
    "nvidia": {"available": False, "reason": "NVML library not found (libnvidia-ml.so.1)", "metrics": {}},
    "ascend_npu": {"available": False, "reason": "npu-smi not found", "metrics": {}},
    "intel_npu": {"available": False, "reason": "no /sys/class/accel device", "metrics": {}},
    "output": {"available": True, "reason": None, "metrics": {"req_ttft_p50_seconds": "seconds"}},
}

# (time, policy, knob, new value, reason)
ACTIONS: list[tuple[float, str, str, Any, str]] = [
    (42.0, "repetition", "repetition_penalty", 1.15, "seq-rep-4 0.24 above target 0.12 for 10 s"),
    (75.0, "repetition", "temperature", 0.9, "loops in 30% of responses"),
    (110.0, "memory", "cleanup", "caches,gc", "RSS growing 2.1 MiB/min (leak trend) over 60 s"),
    (140.0, "latency", "batch_size", 4, "TTFT p95 1.4 s above 1.0 s target"),
    (165.0, "memory", "precision", "bf16", "RSS 78% of the memory budget"),
]


def header(seconds: float) -> dict[str, Any]:
    h = make_header(
        probes=PROBES,
        interval_s=0.1,
        command=["python", "-m", "tuner.demo", "--leak"],
        pid=4242,
        extra={
            "started_mono": 1000.0,
            "channel_socket": None,
            "observer_socket": None,
            "policy": "interactive",
            "observe_only": False,
            "policies": ["repetition", "memory", "latency"],
            "targets": {"req_seq_rep_4_ratio": [0.0, 0.12]},
        },
    )
    # fixed host facts so the file is byte-for-byte reproducible
    h.update(
        host="demo-host",
        platform="Linux-6.1-x86_64",
        python="3.11.9",
        version="0.1.0",
        versions={"psutil": "7.0.0", "numpy": "2.2.0", "textual": "8.2.8", "torch": None, "nvidia-ml-py": None},
        started_unix=1_790_000_000.0,
    )
    return h


def write(out: Path, seconds: float = 180.0, seed: int = 7, realtime: bool = False) -> Path:
    """Write the trace; ``realtime`` paces it at 10 Hz (a growing file for follow-mode tests)."""
    rng = random.Random(seed)
    knobs = {"temperature": 1.1, "repetition_penalty": 1.0, "batch_size": 8, "precision": "fp32"}
    bits = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8}
    rss = 612 * MiB
    next_req = 0.4
    req_id = 0
    recent: list[dict[str, Any]] = []
    done = 0
    acts = list(ACTIONS)
    n = round(seconds * 10)
    start = time.monotonic()
    with TraceWriter(out, header(seconds)) as w:
        for i in range(1, n + 1):
            t = i / 10
            if realtime:
                delay = start + t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            while acts and acts[0][0] <= t:
                at, pol, knob, value, reason = acts.pop(0)
                prev = knobs.get(knob)
                result: dict[str, Any] = {}
                if knob == "cleanup":
                    freed = int(rss * 0.06)
                    rss -= freed
                    result = {"reclaimed_bytes": freed}
                    prev = None
                else:
                    knobs[knob] = value
                    if knob == "precision":
                        result = {"rss_before_bytes": rss, "rss_after_bytes": int(rss * 0.7)}
                        rss = int(rss * 0.7)
                w.action(Applied(t, Action(pol, knob, value, reason, {"t": at}), "applied", prev, result))
            # workload: Poisson arrivals, ~2.5 requests/s; knobs change the figures
            rep_base = 0.26 - 0.09 * (knobs["repetition_penalty"] - 1.0) / 0.15 - 0.08 * (knobs["temperature"] < 1.0)
            while next_req <= t:
                req_id += 1
                bs = int(knobs["batch_size"])
                ttft = max(0.05, rng.gauss(0.25 + 0.11 * bs, 0.08))
                tpot = max(0.005, rng.gauss(0.018 + 0.002 * bs, 0.003))
                toks = rng.randint(24, 200)
                rep = min(1.0, max(0.0, rng.gauss(rep_base, 0.05)))
                loop = rng.random() < rep * 1.2
                ev = {
                    "id": f"r{req_id}",
                    "pid": 4242,
                    "prompt_tokens": rng.randint(8, 120),
                    "tokens": toks,
                    "queue_seconds": round(max(0.0, rng.gauss(0.05 * bs, 0.02)), 4),
                    "ttft_seconds": round(ttft, 4),
                    "tpot_seconds": round(tpot, 5),
                    "e2e_seconds": round(ttft + toks * tpot, 4),
                    "tokens_per_second": round(1 / tpot, 2),
                    "seq_rep_4": round(rep, 4),
                    "rep_32": round(rep * 0.8, 4),
                    "loop": loop,
                    "batch_size": bs,
                    "temperature": knobs["temperature"],
                    "precision": knobs["precision"],
                }
                w.event(Event(round(next_req, 3), "request", ev))
                recent.append({"t": next_req, **ev})
                done += 1
                next_req += rng.expovariate(2.5)
            recent = [r for r in recent if r["t"] > t - 10]
            ttfts = sorted(r["ttft_seconds"] for r in recent)
            tpots = sorted(r["tpot_seconds"] for r in recent)

            def pct(xs: list[float], q: float) -> float | None:
                return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

            rss += int(rng.gauss(3.6 * MiB / 600 * 6, 20_000))  # ~2 MiB/min leak with noise
            cpu = max(0.0, 1.2 + 0.5 * math.sin(t / 7) + rng.gauss(0, 0.1))
            used = int(9.4 * GiB + rss + rng.gauss(0, 8 * MiB))
            values: dict[str, Any] = {
                "tree_cpu_ratio": round(cpu, 3),
                "tree_rss_bytes": rss,
                "tree_uss_bytes": int(rss * 0.93),
                "tree_threads_count": 14,
                "tree_procs_count": 2,
                "sys_cpu_ratio": round(min(1.0, cpu / 2 + 0.05), 3),
                "sys_mem_total_bytes": 16 * GiB,
                "sys_mem_used_bytes": used,
                "sys_mem_available_bytes": 16 * GiB - used,
                "req_ttft_p50_seconds": pct(ttfts, 0.5),
                "req_ttft_p95_seconds": pct(ttfts, 0.95),
                "req_tpot_p50_seconds": pct(tpots, 0.5),
                "req_tpot_p95_seconds": pct(tpots, 0.95),
                "req_tokens_per_second": round(sum(r["tokens"] for r in recent) / 10, 2) if recent else None,
                "req_requests_per_second": round(len(recent) / 10, 2),
                "req_done_count": done,
                "req_active_count": min(int(knobs["batch_size"]), 1 + rng.randint(0, 3)),
                "req_seq_rep_4_ratio": round(sum(r["seq_rep_4"] for r in recent) / len(recent), 4) if recent else None,
                "req_loop_ratio": round(sum(r["loop"] for r in recent) / len(recent), 4) if recent else None,
                "chan_clients_count": 1,
                "knob_temperature": knobs["temperature"],
                "knob_repetition_penalty": knobs["repetition_penalty"],
                "knob_batch_size": knobs["batch_size"],
                "knob_precision_bits": bits[str(knobs["precision"])],
            }
            procs = {
                4242: {"name": "python", "rss_bytes": int(rss * 0.97), "cpu_ratio": round(cpu * 0.95, 3)},
                4250: {"name": "tokenizer-work", "rss_bytes": int(rss * 0.03), "cpu_ratio": round(cpu * 0.05, 3)},
            }
            w.tick(t, values, procs)
            if realtime:
                w.flush()
        w.end(n / 10, exit_code=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default=str(ROOT / "traces" / "example-demo.jsonl"))
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--realtime", action="store_true", help="write at 10 Hz (a growing file)")
    a = ap.parse_args()
    write(Path(a.out), a.seconds, realtime=a.realtime)


if __name__ == "__main__":
    main()
