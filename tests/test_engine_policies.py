"""Policies on a serving engine's own signals (``tuner.probes.engine``): its KV cache as a memory limit, its
token rate for the knee search, its queue as saturation, its preemptions as memory pressure — and the same
through the real ``tuner proxy`` CLI with a policy, against a fake vLLM whose KV cache is nearly full."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.test_proxy import AppServer
from tests.test_proxy_engines import MSGS, FakeVllm, start_proxy
from tuner.core import limits
from tuner.core.window import Window
from tuner.policies.batch_size import ENGINE_KEYS, BatchConfig, BatchSizePolicy, engine_preemptions
from tuner.records import Event
from tuner.trace import read_trace

CFG = BatchConfig(min=1, max=64, start=4, settle_s=1.0, measure_s=10.0, min_requests=4)


def window_with(engine: dict[str, list[float]] | None = None, seconds: float = 12.0,
                queue: float = 0.0) -> Window:
    """12 s of ticks at 10 Hz; a request of 10 tokens ends every 0.5 s (~20 tok/s by the requests); ``engine``:
    key -> one value per second (held between scrapes, as the engine probe's values are)."""
    w = Window(keys=["req_tpot_p95_seconds", *ENGINE_KEYS, "engine_kv_cache_usage_ratio"])
    for i in range(int(seconds * 10) + 1):
        t = round(i * 0.1, 6)
        values: dict[str, float | None] = {}
        for key, per_s in (engine or {}).items():
            values[key] = per_s[min(int(t), len(per_s) - 1)]
        events = []
        if i % 5 == 0 and i:
            # each request runs 1.2 s, overlapping the next (continuous batching), in batches half full
            events.append(Event(t, "request", {"tokens": 10, "ttft_seconds": 0.05 + queue, "tpot_seconds": 0.01,
                                               "e2e_seconds": 1.2 + queue, "queue_seconds": queue, "batch_size": 2,
                                               "prompt_tokens": 20}))
        w.update(t, values, events)
    return w


def measure(w: Window) -> tuple[float, bool]:
    pol = BatchSizePolicy(CFG)
    pol.changed_at = 0.0
    m = pol._measure(w, 4)
    assert m is not None
    return m.tokens_per_second, m.saturated


def test_the_knee_search_counts_the_engines_tokens() -> None:
    by_requests, _ = measure(window_with())
    assert by_requests == pytest.approx(10 * 22 / 11.0, rel=0.01)  # the requests' own usage counts
    # the engine made more: merged chunks, streams cut short, another client on it — its rate is the truth
    rate, _ = measure(window_with({"engine_generation_tokens_per_second": [90.0] * 6 + [110.0] * 7}))
    assert rate == pytest.approx(100.0, rel=0.06)


def test_the_engines_queue_is_saturation() -> None:
    _, saturated = measure(window_with())
    assert not saturated  # nobody waits in the proxy and the batches ran half full: the demand set the pace
    _, saturated = measure(window_with({"engine_requests_waiting": [2.0] * 13}))
    assert saturated  # the engine held requests in its own queue: the server set the pace


def test_preemptions_and_a_full_kv_cache_leave_no_room_to_grow() -> None:
    pol = BatchSizePolicy(CFG)
    calm = window_with({"engine_preemptions_total": [3.0] * 13, "engine_kv_cache_usage_ratio": [0.5] * 13})
    assert engine_preemptions(calm, 10.0) == 0 and pol._memory_room(calm)
    preempting = window_with({"engine_preemptions_total": [3.0] * 8 + [5.0] * 5,
                              "engine_kv_cache_usage_ratio": [0.5] * 13})
    assert engine_preemptions(preempting, 10.0) == 2 and not pol._memory_room(preempting)
    restarted = window_with({"engine_preemptions_total": [30.0] * 8 + [0.0] * 5})
    assert engine_preemptions(restarted, 10.0) == 0  # a counter going down is a restart, not preemptions
    full = window_with({"engine_kv_cache_usage_ratio": [0.5] * 10 + [0.96] * 3})
    assert full.headroom() == (pytest.approx(0.04), "kv_cache") and not pol._memory_room(full)
    b = full.binding()
    assert b is not None and b.describe() == "kv_cache used 96% of 100%"


def test_kv_cache_is_a_term_of_the_one_binding_rule() -> None:
    values = {"engine_kv_cache_usage_ratio": 0.3, "sys_mem_available_bytes": 4e9, "sys_mem_total_bytes": 16e9}
    names = [t.name for t in limits.terms(limits.DictReader(values))]
    assert names == ["host", "kv_cache"]  # the host is tighter (25% free) than the KV cache (70%)
    values["engine_kv_cache_usage_ratio"] = 0.9
    assert limits.binding(limits.DictReader(values)).name == "kv_cache"  # type: ignore[union-attr]


def run_behind_proxy(kv: float, tmp_path: Path) -> list[dict[str, object]]:
    """Eight clients streaming slow answers through ``tuner proxy --policy`` (batch size from 2) for 12 s, vLLM's
    KV cache at ``kv``: the queue in the proxy (three times the service time: a backlog by the policy's rule,
    over twice) makes the policy want a larger batch.  Its batch actions."""
    import asyncio

    import openai

    f = FakeVllm()
    f.kv = kv
    up = AppServer(f.app)
    policy = tmp_path / "b.toml"
    policy.write_text("[batch_size]\nmin = 1\nmax = 16\nstart = 2\nsettle_s = 0.5\nmeasure_s = 3.0\n"
                      "min_requests = 4\nconfirm = false\n")
    trace = tmp_path / f"kv{kv}.jsonl"
    p = start_proxy(up.url, trace, "--policy", str(policy))

    async def client(c: openai.AsyncOpenAI, until: float) -> None:
        while time.monotonic() < until:
            s = await c.chat.completions.create(model="m", messages=MSGS, stream=True, user="slow")  # type: ignore[arg-type]
            async for _ in s:
                pass

    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=p.url, api_key="k", max_retries=0, timeout=60)
        until = time.monotonic() + 12
        await asyncio.gather(*(client(c, until) for _ in range(8)))

    try:
        asyncio.run(main())
    finally:
        p.stop()
        up.close()
    td = read_trace(trace)
    kvs = [v for v in td.column("engine_kv_cache_usage_ratio") if v == v and v is not None]
    assert kvs and kvs[-1] == kv
    return [a for a in td.actions if a["knob"] == "batch_size"]


def test_through_the_proxy_a_full_kv_cache_holds_the_batch(tmp_path: Path) -> None:
    """The same load twice: with vLLM's KV cache half full the policy raises the proxy's concurrency limit;
    at 97% every decision names the KV cache as the binding limit and the limit stays where it was."""
    free = run_behind_proxy(0.5, tmp_path)
    assert max(int(a["value"]) for a in free if a["outcome"] == "applied") > 2, free  # type: ignore[call-overload]
    full = run_behind_proxy(0.97, tmp_path)
    assert full and all("kv_cache used 97%" in a["evidence"]["limit"] for a in full), full  # type: ignore[index,operator]
    assert all(a["value"] <= 2 for a in full if a["outcome"] == "applied"), full  # type: ignore[operator]


def test_cleanup_through_vllm_without_dev_mode_is_not_supported_once(tmp_path: Path) -> None:
    """The cleanup policy every second behind the proxy, vLLM without VLLM_SERVER_DEV_MODE: its admin call is
    made once (404), recorded as not supported, and not made again."""
    f = FakeVllm()
    up = AppServer(f.app)
    policy = tmp_path / "c.toml"
    policy.write_text("[cleanup]\nevery_s = 1.0\nleak_watch = false\n[agent.cooldown_s]\ncleanup = 0.5\n")
    trace = tmp_path / "c.jsonl"
    p = start_proxy(up.url, trace, "--policy", str(policy))
    try:
        time.sleep(5)
    finally:
        p.stop()
        up.close()
    acts = [a for a in read_trace(trace).actions if a["knob"] == "cleanup"]
    outcomes = [a["outcome"] for a in acts]
    assert outcomes[:2] == ["sent", "not supported"], acts
    assert "VLLM_SERVER_DEV_MODE=1" in str(acts[1]["result"]["error"])
    assert outcomes.count("not supported") <= 2 and len(acts) <= 3, acts  # said once more at most, no flood
    assert f.resets == 0
