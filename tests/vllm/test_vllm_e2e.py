"""End to end against a real vLLM serving the demo model (``make test-vllm``): what a user of
``tuner demo --export-hf`` and ``tuner proxy`` in front of vLLM sees."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.demo_greedy import demo_greedy
from tests.test_proxy import ProxyProcess
from tests.vllm.lab import MODEL, VLLMServer, Watch, burst
from tuner.demo.export_hf import ALLOWED_TOKEN_IDS
from tuner.demo.tokenizer import ByteTokenizer
from tuner.demo.train import held_out_prompts
from tuner.trace import read_trace

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]


def short_prompts(n: int, seed: int) -> list[str]:
    """Held-out prompts of at most 64 bytes: with 160 new tokens they fit vLLM's 256-token context."""
    return held_out_prompts(n, seed=seed, max_bytes=64)


def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_vllm_greedy_output_equals_the_demo_greedy_ids(vllm: VLLMServer) -> None:
    """The export served by vLLM continues 8 held-out prompts exactly as the demo model does (32 greedy tokens,
    sampling restricted to what the demo's sampler can produce); prompts tokenize to the demo's ids."""
    tok = ByteTokenizer()
    for p in held_out_prompts(8, seed=4242):
        ids = tok.encode(p, bos=True)
        r = httpx.post(
            vllm.url + "/completions",
            timeout=120,
            json={
                "model": MODEL,
                "prompt": p,
                "max_tokens": 32,
                "temperature": 0,
                "return_token_ids": True,
                "allowed_token_ids": ALLOWED_TOKEN_IDS,
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["prompt_token_ids"] == ids
        assert choice["token_ids"] == demo_greedy(ids, 32), p
    # the chat template gives the demo server's chat prompt: BOS + the contents joined by newlines
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a tuple?"}]
    r = httpx.post(
        vllm.url + "/chat/completions",
        timeout=120,
        json={"model": MODEL, "messages": msgs, "max_tokens": 4, "temperature": 0, "return_token_ids": True},
    )
    assert r.status_code == 200, r.text
    assert r.json()["prompt_token_ids"] == tok.encode("Answer briefly.\nWhat is a tuple?", bos=True)


def test_a_concurrency_limit_from_a_policy_shows_in_vllm_running_requests(vllm: VLLMServer, tmp_path: Path) -> None:
    """8 streams straight to vLLM run 8 at once; through ``tuner proxy --policy`` whose batch-size decision is
    2, vLLM's own ``num_requests_running`` never passes 2 and reaches it."""
    prompts = short_prompts(8, seed=21)
    body = {"max_tokens": 160, "ignore_eos": True, "temperature": 0.8, "stream_options": {"include_usage": True}}
    with Watch(vllm, ("vllm:num_requests_running",)) as direct:
        burst(vllm.url, prompts, **body)
    vllm.settled()
    policy = tmp_path / "b2.toml"
    policy.write_text("[batch_size]\nmin = 2\nmax = 2\nstart = 2\n")
    trace = tmp_path / "b2.jsonl"
    proxy = ProxyProcess(vllm.root, trace, "--policy", str(policy), "--pid", str(vllm.pid))
    try:
        wait_for(lambda: '"k":"action"' in trace.read_text(), 60, "the batch-size action")
        with Watch(vllm, ("vllm:num_requests_running",)) as proxied:
            out = burst(proxy.url, prompts, **body)
    finally:
        proxy.stop()
    vllm.settled()
    assert [s.usage["completion_tokens"] for s in out if s.usage] == [160] * 8  # every answer complete
    assert max(direct.values("vllm:num_requests_running")) >= 6, direct.seen
    running = proxied.values("vllm:num_requests_running")
    assert max(running) == 2, running
    (act,) = [a for a in read_trace(trace).actions if a["knob"] == "batch_size"]
    assert act["value"] == 2 and act["outcome"] == "applied"
