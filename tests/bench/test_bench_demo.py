"""Demo throughput: the tuner client on vs off in the same run, and tokens/s per batch size.

On vs off: the goal (<= 1% slowdown, issue: Inference side) is asserted the way the cost arises, as CPU the
client takes from the inference process: its per-call costs measured in this run - ``r.token()``, a request's
open + close on a connected client, and the sender thread's CPU per finished request of the demo's size (its
own thread's ``schedstat``, ns) - times the calls each client-on run made, plus the sender's idle wake-ups
(a connected idle process against a no-op one, in ns) over the run's length, over that run's CPU time.  Printed
beside it, not asserted: wall-clock tokens/s of alternating runs (best vs best, and the median of pairs), which
swing +-10% between runs on a shared machine, ten times the effect; and the workload's own view (its calls
timed inside it, its sender thread's CPU from ``/proc/.../stat``, in 10 ms ticks).

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
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bench.goals import judge

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


def test_demo_throughput_client_on_vs_off(benchmark: Any, tmp_path: Path) -> None:
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
    from tests.bench.test_bench_client import client_call_costs_us, idle_shares, sender_cpu
    from tuner.client import Client
    from tuner.link.channel import ChannelServer

    server = ChannelServer()  # the per-call costs, on a client connected as the workload's is (its own server)
    server.start()
    probe_client = Client(server.path)
    try:
        deadline = time.monotonic() + 5
        while not probe_client.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe_client.connected
        token_us, request_us = client_call_costs_us(probe_client)
    finally:
        probe_client.close()
        server.close()
    sender_us = sender_cpu(tmp_path, ids_per_request=64, n=5000)["sender_cpu_us_per_request"]  # --*-new-tokens 64
    idle_on, idle_off = idle_shares("3")
    idle = max(0.0, idle_on - idle_off)  # the sender's wake-ups every 50 ms, as a share of a core
    chan = DrainedChannel()
    on: list[float] = []
    off: list[float] = []
    cpu_on: list[float] = []
    cpu_off: list[float] = []
    client_share: list[float] = []  # per client-on run: its calls x their measured costs / the run's CPU
    timed_share: list[float] = []  # the same with the calls as timed inside the workload

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
                    calls = (r["tokens"] * token_us + r["requests_done"] * (request_us + sender_us)) / 1e6
                    client_share.append((calls + idle * r["seconds"]) / r["cpu_seconds"])
                    timed_share.append((r["client_call_seconds"] + r["client_thread_cpu_seconds"]) / r["cpu_seconds"])

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
    share = max(client_share)
    benchmark.extra_info.update(tokens_per_second_on=on, tokens_per_second_off=off, on_over_off=ratios,
                                median_pair_slowdown=median_slowdown, best_vs_best_slowdown=slowdown,
                                tokens_per_cpu_second_on=cpu_on, tokens_per_cpu_second_off=cpu_off,
                                client_cpu_share=client_share, client_cpu_share_timed_in_workload=timed_share,
                                token_call_us=token_us, request_open_close_us=request_us,
                                sender_us_per_request=sender_us, idle_core_share=idle)  # fmt: skip
    print(f"\ndemo decode tokens/s client on {[round(x) for x in on]} off {[round(x) for x in off]}; "
          f"best-vs-best slowdown {slowdown:.2%}; median pair slowdown {median_slowdown:.2%} (wall clock, printed "
          f"only); the workload's own view (calls timed inside it, sender thread in 10 ms ticks): "
          f"{[f'{x:.3%}' for x in timed_share]} of its CPU")  # fmt: skip
    judge("client on vs off: <= 1% slowdown (the client's share of the inference's CPU)", share <= 0.01,
          f"{share:.3%} in the worst of {len(client_share)} runs ({[f'{x:.3%}' for x in client_share]}; r.token() "
          f"{token_us:.3f} us, open + close {request_us:.2f} us, sending {sender_us:.2f} us; idle wake-ups "
          f"{idle:.4%} of a core)")  # fmt: skip


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


def test_demo_repetition_penalty_cost_per_decoding_step() -> None:
    """The penalty's share of a decoding step (model step + sampling) at batch 8, 16 and 32: the sampling with
    the penalty (``SeenTokens``) against without it, timed interleaved in this process over the same logits, and
    the per-row rule it replaced (a set, a tensor and an indexed read and write per row per step) beside it.
    Goal: <= 2% of the step at every size (the tuned arm of a held-out cell runs penalized, the untuned not)."""
    import torch

    from tuner.demo.model import BatchDecoder, load
    from tuner.demo.sampling import SamplingParams, SeenTokens, mask_specials, sample

    torch.set_num_threads(2)
    model = load()
    params, plain = SamplingParams(temperature=0.5, repetition_penalty=1.3), SamplingParams(temperature=0.5)

    def per_row(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
        out = mask_specials(logits.float()).clone()
        for row, ids in enumerate(history):
            idx = torch.tensor(sorted(set(ids)), dtype=torch.long)
            vals = out[row, idx]
            out[row, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
        return out

    shares = {}
    for b in (8, 16, 32):
        prompts = [[65 + (i * 7 + j) % 50 for j in range(100)] for i in range(b)]
        with torch.inference_mode():
            dec = BatchDecoder(model, prompts, 64)
            logits = dec.prefill()
            seen = SeenTokens(prompts, logits.size(-1))
            hist = [list(p) for p in prompts]
            t_step, t_plain, t_pen, t_row = [], [], [], []
            for _ in range(48):
                t0 = time.perf_counter()
                nxt = sample(logits, plain)
                t1 = time.perf_counter()
                sample(logits, params, seen)
                seen.add(nxt)
                t2 = time.perf_counter()
                per_row(logits, hist, 1.3)
                for h, t in zip(hist, nxt.tolist(), strict=True):
                    h.append(t)
                t3 = time.perf_counter()
                logits = dec.step(nxt)
                t4 = time.perf_counter()
                t_plain.append(t1 - t0)
                t_pen.append(t2 - t1)
                t_row.append(t3 - t2)
                t_step.append(t4 - t3)
        step, pl = statistics.median(t_step), statistics.median(t_plain)
        share = max(0.0, statistics.median(t_pen) - pl) / (step + pl)
        row_share = max(0.0, statistics.median(t_row)) / (step + pl)
        shares[b] = share
        print(f"\nbatch {b}: model step {step * 1e3:.2f} ms, sampling {pl * 1e3:.3f} ms; the penalty adds "
              f"{(statistics.median(t_pen) - pl) * 1e3:.3f} ms ({share:.2%} of a step); the per-row rule "
              f"{statistics.median(t_row) * 1e3:.3f} ms with its specials mask ({row_share:.2%})")
    judge("repetition penalty: <= 2% of a decoding step at batch 8, 16, 32", max(shares.values()) <= 0.02,
          ", ".join(f"batch {b}: {s:.2%}" for b, s in shares.items()))
