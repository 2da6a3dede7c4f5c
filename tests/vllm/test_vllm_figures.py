"""Issue 15 §6, against the real vLLM, direct and through ``tuner proxy`` in the same run: the TTFT the proxy adds,
the tokens/s lost at 8 and 32 streams, and what scraping vLLM's ``/metrics`` once a second costs (the proxy's CPU
and vLLM's).  Figures are printed (BENCHMARKS.md takes them from a run); what is asserted is that every stream
arrived whole both ways.

- TTFT: one request at a time (16 new tokens), bare-socket client, direct, proxied and through a bare asyncio
  TCP relay process (bytes in, bytes out: what one more process hop costs on this machine at this load), the
  order rotating, ``TTFT_PAIRS`` rounds: the difference of the medians and the median (and quartiles) of the
  paired differences.
- tokens/s: N concurrent streams of ``TOKENS`` tokens (``ignore_eos``), ``PAIRS`` rounds each of direct,
  proxied and direct asking what the proxy asks vLLM for (``continuous_usage_stats``: usage on every chunk),
  the order rotating; the loss is 1 - the median of the (proxied / direct) ratios, with its quartiles.  The
  proxy shares the 2 cores with vLLM and the client here, and on a shared machine the rounds swing with other
  jobs: the CPU figures are the steadier reading — vLLM's processes' CPU per token direct, proxied and direct
  with usage on every chunk (does the proxy make vLLM work more, and is it that request?), and the proxy's own
  CPU per token, as a share of vLLM's (what, on a CPU-bound host, it can take from vLLM).
- scrape cost: two proxies idle side by side for 20 s, one scraping (the default), one with
  ``--no-engine-metrics``: the difference of their CPU; and vLLM's API-server process CPU over 20 s idle with
  the scraping proxy against 20 s without any proxy.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.test_proxy import ProxyProcess
from tests.vllm.lab import VLLMServer, burst, closed_loop
from tests.vllm.test_vllm_e2e import short_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]
PAIRS = int(os.environ.get("TUNER_VLLM_PAIRS", "12"))
TTFT_PAIRS = 60
RELAY = Path(__file__).resolve().parents[1] / "bench" / "test_bench_proxy_cpu.py"  # run as a script: --relay URL
TOKENS = 64  # a stream: rounds of ~2 s (8 streams) and ~4 s (32) on the 2-core machine: many short pairs


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def test_figures_direct_against_proxied(vllm: VLLMServer, tmp_path: Path) -> None:
    api = psutil.Process(vllm.pid)
    prompts = short_prompts(64, seed=31)
    figures: dict[str, object] = {"load_avg_1m_start": round(os.getloadavg()[0], 1)}
    # vLLM's own CPU at idle, no scraper: the baseline of the scrape cost on its side
    vllm.settled()
    time.sleep(1.0)
    c0 = _cpu(api)
    time.sleep(20.0)
    idle_plain = _cpu(api) - c0
    env = {**os.environ, "PYTHONPATH": str(RELAY.parents[2])}  # the script imports tests.bench
    relay = subprocess.Popen([sys.executable, str(RELAY), "--relay", vllm.root], stderr=subprocess.PIPE, text=True,
                             env=env)
    assert relay.stderr is not None
    m = re.search(r"relay on (http://\S+)", relay.stderr.readline())
    assert m, "the relay did not start"
    relay_root = m.group(1)
    scraping = ProxyProcess(vllm.root, tmp_path / "scrape.jsonl", "--pid", str(vllm.pid))
    quiet = ProxyProcess(vllm.root, tmp_path / "quiet.jsonl", "--pid", str(vllm.pid), "--no-engine-metrics")
    try:
        ps, pq = psutil.Process(scraping.proc.pid), psutil.Process(quiet.proc.pid)
        time.sleep(3.0)  # the first scrapes (and imports) behind
        s0, q0, a0 = _cpu(ps), _cpu(pq), _cpu(api)
        time.sleep(20.0)
        s1, q1, a1 = _cpu(ps), _cpu(pq), _cpu(api)
        figures["scrape_cost_proxy_cores"] = round((s1 - s0 - (q1 - q0)) / 20.0, 5)
        figures["scrape_cost_vllm_cores"] = round((a1 - a0 - idle_plain) / 20.0, 5)
        figures["proxy_idle_cores"] = round((q1 - q0) / 20.0, 5)
        quiet.stop()
        # TTFT added: one at a time, direct / proxied / through a bare TCP relay, the order rotating
        body = {"max_tokens": 16, "temperature": 0.8}
        closed_loop(scraping.root, prompts[:4], 1, **body)  # warm-up
        closed_loop(relay_root, prompts[:4], 1, **body)
        arms: dict[str, list[float]] = {vllm.root: [], scraping.root: [], relay_root: []}
        order = list(arms)
        for i in range(TTFT_PAIRS):
            for root in order[i % 3 :] + order[: i % 3]:
                arms[root].extend(closed_loop(root, [prompts[i % 64]], 1, **body))
        d, p, r = arms[vllm.root], arms[scraping.root], arms[relay_root]
        figures["ttft_direct_p50_ms"] = round(statistics.median(d) * 1e3, 2)
        figures["ttft_proxied_p50_ms"] = round(statistics.median(p) * 1e3, 2)
        figures["ttft_added_p50_ms"] = round((statistics.median(p) - statistics.median(d)) * 1e3, 2)
        diffs = [b - a for a, b in zip(d, p, strict=True)]
        figures["ttft_added_paired_p50_ms"] = round(statistics.median(diffs) * 1e3, 2)
        figures["ttft_added_paired_iqr_ms"] = [round(x * 1e3, 2) for x in statistics.quantiles(diffs, n=4)[::2]]
        # what one more process hop costs on this machine now: a relay that only copies bytes
        figures["ttft_relay_added_paired_p50_ms"] = round(
            statistics.median(b - a for a, b in zip(d, r, strict=True)) * 1e3, 2
        )
        # tokens/s at 8 and 32 streams; CPU of vLLM's processes and of the proxy over the same rounds
        tree = [api, *api.children(recursive=True)]
        for n in (8, 32):
            ratios: list[float] = []
            rates: dict[str, list[float]] = {"direct": [], "proxied": [], "direct_usage": []}
            vllm_cpu: dict[str, list[float]] = {"direct": [], "proxied": [], "direct_usage": []}
            proxy_cpu: list[float] = []
            for i in range(PAIRS):
                # direct, proxied, and direct asking what the proxy asks vLLM for (usage on every chunk): does that
                # request make vLLM work more?  The order rotates.
                sides = [("direct", vllm.url, False), ("proxied", scraping.url, False),
                         ("direct_usage", vllm.url, True)]
                for name, url, continuous in sides[i % 3 :] + sides[: i % 3]:
                    v0, x0, t = sum(_cpu(q) for q in tree), _cpu(ps), time.monotonic()
                    out = burst(
                        url,
                        prompts[:n],
                        max_tokens=TOKENS,
                        ignore_eos=True,
                        temperature=0.8,
                        stream_options={"include_usage": True, "continuous_usage_stats": continuous},
                    )
                    wall = time.monotonic() - t
                    v1, x1 = sum(_cpu(q) for q in tree), _cpu(ps)
                    assert [s.usage["completion_tokens"] for s in out if s.usage] == [TOKENS] * n
                    rates[name].append(TOKENS * n / wall)
                    vllm_cpu[name].append((v1 - v0) / (TOKENS * n))
                    if name == "proxied":
                        proxy_cpu.append((x1 - x0) / (TOKENS * n))
                ratios.append(rates["proxied"][-1] / rates["direct"][-1])
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            figures[f"tokens_per_s_direct_{n}"] = round(statistics.median(rates["direct"]), 1)
            figures[f"tokens_per_s_proxied_{n}"] = round(statistics.median(rates["proxied"]), 1)
            figures[f"tokens_per_s_lost_pct_{n}"] = round((1 - statistics.median(ratios)) * 100, 2)
            figures[f"tokens_per_s_lost_pct_iqr_{n}"] = [round((1 - q3) * 100, 1), round((1 - q1) * 100, 1)]
            figures[f"pair_ratios_{n}"] = [round(x, 3) for x in ratios]
            # on a CPU-bound host what the proxy can take from vLLM is CPU: its own, and any extra in vLLM
            figures[f"vllm_cpu_ms_per_token_direct_{n}"] = round(statistics.median(vllm_cpu["direct"]) * 1e3, 3)
            figures[f"vllm_cpu_ms_per_token_proxied_{n}"] = round(statistics.median(vllm_cpu["proxied"]) * 1e3, 3)
            figures[f"vllm_cpu_ms_per_token_direct_usage_{n}"] = round(
                statistics.median(vllm_cpu["direct_usage"]) * 1e3, 3
            )
            figures[f"proxy_cpu_ms_per_token_{n}"] = round(statistics.median(proxy_cpu) * 1e3, 4)
            figures[f"proxy_cpu_of_vllm_pct_{n}"] = round(
                statistics.median(proxy_cpu) / statistics.median(vllm_cpu["proxied"]) * 100, 2
            )
    finally:
        if quiet.proc.poll() is None:
            quiet.stop()
        scraping.stop()
        relay.terminate()
        relay.wait(timeout=10)
    figures["load_avg_1m_end"] = round(os.getloadavg()[0], 1)
    figures["pairs"] = PAIRS
    print("\nvLLM direct vs proxied: " + json.dumps(figures))
