"""Demo throughput: the tuner client on vs off in the same run, and tokens/s per batch size.

On vs off: wall-clock tokens/s of alternating runs (best vs best, and the median of pairs), and - robust to
other jobs on the machine - the client's share of the inference process's CPU (its per-token calls on the
decode thread plus its sender thread), which is what a CPU-bound inference loses to it.

``.venv/bin/pytest tests/bench/test_bench_demo.py -m bench --benchmark-enable -s``
Knobs: ``TUNER_BENCH_REQUESTS`` (requests per run, default 32), ``TUNER_BENCH_PAIRS`` (on/off pairs,
default 5), ``TUNER_BENCH_BATCHES`` (batch sizes, default "1,2,4,8,16,32").
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.bench
ROOT = Path(__file__).resolve().parents[2]


def tuner_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TUNER_SOCKET", None)
    env.update(extra)
    return env


def run_workload(args: list[str], socket_path: str | None) -> dict[str, Any]:
    env = tuner_env(**({"TUNER_SOCKET": socket_path} if socket_path else {}))
    cp = subprocess.run(
        [sys.executable, "-m", "tuner.demo.workload", "--threads", "1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert cp.returncode == 0, cp.stderr
    return json.loads([ln for ln in cp.stdout.splitlines() if ln.startswith("{")][-1])


class DrainedChannel:
    """A real sidecar channel whose messages are consumed, as the session's sampler would."""

    def __init__(self) -> None:
        from tuner.link.channel import ChannelServer

        self.server = ChannelServer()
        self.server.start()
        self.stop = threading.Event()
        self.received = 0
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stop.wait(0.1):
            self.received += sum(1 for _, m in self.server.drain() if m.get("type") == "request")

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.received += sum(1 for _, m in self.server.drain() if m.get("type") == "request")
        self.server.close()


def test_demo_throughput_client_on_vs_off(benchmark: Any) -> None:
    n = int(os.environ.get("TUNER_BENCH_REQUESTS", "32"))
    pairs = int(os.environ.get("TUNER_BENCH_PAIRS", "5"))
    args = [
        "--requests",
        str(n),
        "--rate",
        "0",
        "--batch-size",
        "8",
        "--min-new-tokens",
        "64",
        "--max-new-tokens",
        "64",
        "--seed",
        "0",
    ]
    chan = DrainedChannel()
    on: list[float] = []
    off: list[float] = []
    cpu_on: list[float] = []
    cpu_off: list[float] = []
    client_share: list[float] = []

    def one_pair() -> None:
        for first_on in (len(on) % 2 == 0,):  # alternate which goes first against drift in machine load
            order = [True, False] if first_on else [False, True]
            for use in order:
                r = run_workload(args, chan.server.path if use else None)
                assert r["client_connected"] is use
                (on if use else off).append(r["decode_tokens_per_second"])
                (cpu_on if use else cpu_off).append(r["tokens_per_cpu_second"])
                if use:
                    assert r["client_thread_cpu_seconds"] is not None
                    client_share.append((r["client_thread_cpu_seconds"] + r["client_call_seconds"]) / r["cpu_seconds"])

    try:
        benchmark.pedantic(one_pair, rounds=pairs, iterations=1)
    finally:
        chan.close()
    assert chan.received == n * pairs  # every request of every client-on run reached the sidecar
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    median_slowdown = 1.0 - statistics.median(ratios)
    # other processes on the machine only ever slow a run down, so each side's best run is its least
    # disturbed estimate; compare best with best
    slowdown = 1.0 - max(on) / max(off)
    # The client's cost is CPU work inside the inference process: its per-token calls on the decode thread
    # (timed in the workload) and its sender thread (CPU time from /proc). Their share of the process's CPU
    # is the slowdown a CPU-bound inference pays, measured without the wall-clock noise of a shared machine.
    share = max(client_share)
    benchmark.extra_info.update(tokens_per_second_on=on, tokens_per_second_off=off, on_over_off=ratios,
                                median_pair_slowdown=median_slowdown, best_vs_best_slowdown=slowdown,
                                tokens_per_cpu_second_on=cpu_on, tokens_per_cpu_second_off=cpu_off,
                                client_cpu_share=client_share)
    print(f"\ndemo decode tokens/s client on {[round(x) for x in on]} off {[round(x) for x in off]}; "
          f"best-vs-best slowdown {slowdown:.2%}; median pair slowdown {median_slowdown:.2%}\n"
          f"client's share of the inference process's CPU {[f'{x:.3%}' for x in client_share]}")
    assert share <= 0.01, f"the client takes {share:.2%} of the inference's CPU (goal <= 1%)"
    # wall clock on a machine shared with other jobs swings +-20%: only a gross regression fails here
    assert slowdown <= 0.10, f"client on is {slowdown:.1%} slower in wall time (goal <= 1% on a quiet machine)"


def test_demo_tokens_per_second_by_batch_size(benchmark: Any) -> None:
    sizes = [int(s) for s in os.environ.get("TUNER_BENCH_BATCHES", "1,2,4,8,16,32").split(",")]
    rows: dict[int, dict[str, Any]] = {}

    def sweep() -> None:
        for b in sizes:
            r = run_workload(
                [
                    "--requests",
                    str(2 * b),
                    "--rate",
                    "0",
                    "--batch-size",
                    str(b),
                    "--min-new-tokens",
                    "64",
                    "--max-new-tokens",
                    "64",
                    "--seed",
                    "0",
                ],
                None,
            )
            rows[b] = {
                "decode_tokens_per_second": r["decode_tokens_per_second"],
                "ttft_p50_seconds": r["ttft_p50_seconds"],
                "tpot_p50_seconds": r["tpot_p50_seconds"],
            }

    benchmark.pedantic(sweep, rounds=1, iterations=1)
    benchmark.extra_info["by_batch_size"] = rows
    print("\n| batch | decode tok/s | TTFT p50 s | TPOT p50 s |\n|---|---|---|---|")
    for b, r in rows.items():
        print(
            f"| {b} | {r['decode_tokens_per_second']:.0f} | {r['ttft_p50_seconds']:.3f} | {r['tpot_p50_seconds']:.4f} |"
        )
    tps = [rows[b]["decode_tokens_per_second"] for b in sizes]
    assert max(tps) > 1.5 * tps[0]  # batching pays on this machine (the batch policy has a curve to climb)
