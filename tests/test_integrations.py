"""tuner.integrations: cleanup (measured RSS), precision (int8/bf16 on the demo model, with the quality guard),
and the decode-loop helper talking to a real channel socket."""

from __future__ import annotations

import gc
import sys
import time
from typing import Any

import pytest

# CI runs the fast suite on the oldest and newest Python without the torch extra (its wheel is for one Python)
torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")

from tuner.demo.corpus import held_out_prompts  # noqa: E402
from tuner.demo.model import BatchDecoder, TinyLlama, load  # noqa: E402
from tuner.demo.tokenizer import ByteTokenizer  # noqa: E402
from tuner.integrations.cleanup import STEPS, malloc_stats, rss_bytes, run_cleanup  # noqa: E402
from tuner.integrations.precision import (  # noqa: E402
    PrecisionError,
    PrecisionManager,
    apply_precision,
    current_precision,
    model_bytes,
)
from tuner.integrations.torch_loop import TorchLoop  # noqa: E402

linux_glibc = pytest.mark.skipif(malloc_stats() is None, reason="needs glibc (mallinfo2/malloc_trim)")


class ListCache:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def __len__(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        self.items.clear()


# -- cleanup ---------------------------------------------------------------------------------------------
def test_cleanup_runs_steps_cheapest_first_and_reports_each() -> None:
    cache = ListCache()
    cache.items.extend(range(10))
    out = run_cleanup(["malloc_trim", "gc", "empty_cache", "caches"], [cache])
    assert [s["step"] for s in out["steps"]] == list(STEPS)
    assert len(cache) == 0
    assert out["steps"][0]["entries"] == 10
    for s in out["steps"]:
        assert s["seconds"] >= 0 and isinstance(s["reclaimed_bytes"], int)
    if not torch.cuda.is_available():
        assert "no CUDA device" in out["steps"][2]["skipped"]
    assert out["rss_before_bytes"] - out["rss_after_bytes"] == out["reclaimed_bytes"]


def test_cleanup_rejects_unknown_steps() -> None:
    with pytest.raises(ValueError, match="unknown cleanup step"):
        run_cleanup(["caches", "defrag"], [])


def test_cleanup_of_no_caches_says_so() -> None:
    out = run_cleanup(["caches"], [])
    assert out["steps"][0]["skipped"] == "no caches registered"


@linux_glibc
def test_cleanup_reclaims_measured_bytes_after_freeing_many_small_tensors() -> None:
    gc.collect()
    run_cleanup(["malloc_trim"], [])
    base = rss_bytes()
    cache = ListCache()
    keep: list[torch.Tensor] = []
    for i in range(30_000):  # 4 KB tensors from the C heap, interleaved with small survivors (fragmentation)
        cache.items.append(torch.ones(1024))
        if i % 16 == 0:
            keep.append(torch.ones(4))
    grown = rss_bytes() - base
    assert grown > 60 << 20, f"allocating 120 MB of tensors grew RSS by only {grown >> 20} MB"
    out = run_cleanup(["caches", "gc", "malloc_trim"], [cache])
    by_step = {s["step"]: s for s in out["steps"]}
    assert by_step["caches"]["entries"] == 30_000
    assert out["reclaimed_bytes"] > 0.5 * grown, out
    # the heap kept most freed pages (survivors pin the arena); malloc_trim is what hands them back
    assert by_step["malloc_trim"]["reclaimed_bytes"] > 0.25 * grown, out
    assert len(keep) > 0


@linux_glibc
def test_malloc_stats_sees_heap_growth() -> None:
    before = malloc_stats()
    assert before is not None
    blobs = [bytearray(2048) for _ in range(10_000)]
    after = malloc_stats()
    assert after is not None
    assert after["allocated_bytes"] - before["allocated_bytes"] > 15 << 20
    assert after["reserved_bytes"] >= after["allocated_bytes"]
    del blobs


# -- precision -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def canary_ids() -> list[list[int]]:
    tok = ByteTokenizer()
    return [tok.encode(p, bos=True) for p in held_out_prompts(12, seed=7, max_bytes=96)]


def next_logits(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        assert isinstance(model, TinyLlama)
        return BatchDecoder(model, prompts, 1).prefill()


def test_int8_shrinks_parameter_bytes_and_keeps_top1_agreement(canary_ids: list[list[int]]) -> None:
    model = load()
    ref = next_logits(model, canary_ids)
    fp32_bytes = model_bytes(model)
    q = apply_precision(model, "int8")
    assert current_precision(q) == "int8"
    int8_bytes = model_bytes(q)
    assert int8_bytes < 0.4 * fp32_bytes, (int8_bytes, fp32_bytes)  # Linear weights 4 B -> 1 B
    new = next_logits(q, canary_ids)
    top1 = (ref.argmax(-1) == new.argmax(-1)).float().mean().item()
    assert top1 >= 0.9, top1


def test_precision_manager_steps_down_and_back_up_exactly(canary_ids: list[list[int]]) -> None:
    model = load()
    ref = next_logits(model, canary_ids)
    pm = PrecisionManager(model, canary=lambda m: next_logits(m, canary_ids))
    seen: list[str] = []
    pm.listeners.append(lambda m, p: seen.append(p))
    try:
        r = pm.set("bf16")
        assert r["param_bytes_after"] * 2 == r["param_bytes_before"] and r["top1"] >= 0.9
        r = pm.set("int8")  # from bf16: rebuilt from the fp32 reference, then quantized
        assert r["previous"] == "bf16" and r["param_bytes_after"] < r["param_bytes_before"]
        assert 0 <= r["kl"] < 0.5 and r["top1"] >= 0.9
        r = pm.set("fp32")
        assert r["changed"] and current_precision(pm.model) == "fp32"
        assert torch.equal(next_logits(pm.model, canary_ids), ref)  # nothing lost on the way down and up
        assert seen == ["bf16", "int8", "fp32"]
        assert pm.set("fp32")["changed"] is False
    finally:
        pm.close()


def test_quality_guard_refuses_and_rolls_back(canary_ids: list[list[int]]) -> None:
    model = load()
    ref = next_logits(model, canary_ids)
    pm = PrecisionManager(model, reference="memory", canary=lambda m: next_logits(m, canary_ids), max_kl=0.0)
    with pytest.raises(PrecisionError, match="refused by the quality guard: KL"):
        pm.set("int8")
    assert pm.precision == "fp32" and current_precision(pm.model) == "fp32"
    assert torch.equal(next_logits(pm.model, canary_ids), ref)


def test_unknown_precision_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        apply_precision(torch.nn.Linear(2, 2), "int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_int8_on_cuda_without_bitsandbytes_is_refused_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.integrations import precision

    monkeypatch.setattr(precision, "_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(precision.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PrecisionError, match="needs bitsandbytes"):
        apply_precision(torch.nn.Linear(2, 2), "int8")


# -- the decode-loop helper against a real channel socket ------------------------------------------------
def wait_for(pred: Any, timeout: float = 5.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_torch_loop_reads_knobs_and_runs_commands_from_the_sidecar(canary_ids: list[list[int]]) -> None:
    from tuner.client import Client
    from tuner.link.channel import ChannelServer
    from tuner.records import Knobs

    server = ChannelServer()
    server.start()
    c = Client(server.path)
    cache = ListCache()
    cache.items.extend(range(5))
    loop = TorchLoop(load(), client=c, temperature=0.8, batch_size=8, caches=[cache],
                     canary=lambda m: next_logits(m, canary_ids))
    got: list[dict[str, Any]] = []
    try:
        assert loop.settings().temperature == 0.8 and loop.settings().batch_size == 8
        wait_for(lambda: server.clients())
        server.broadcast_knobs(Knobs(temperature=0.3, batch_size=3))
        s = wait_for(lambda: loop.settings() if loop.settings().batch_size == 3 else None)
        assert s.temperature == 0.3 and s.repetition_penalty == 1.0 and s.precision == "fp32"

        req = loop.request(5, batch_size=1, settings=s)
        req.started()
        req.token(65)
        req.token([66, 67])
        loop.finish(req)

        cid = server.send_command("precision", {"precision": "int8"})
        assert cid is not None
        wait_for(lambda: c._commands)
        loop.between_batches()  # the command runs here, on the inference thread
        assert current_precision(loop.model) == "int8"
        cid2 = server.send_command("cleanup", {"steps": ["caches", "gc"]})
        wait_for(lambda: c._commands)
        loop.between_batches()
        assert len(cache) == 0

        def results() -> bool:
            got.extend(m for _, m in server.drain())
            return sum(m.get("type") == "command_result" for m in got) >= 2

        wait_for(results)
    finally:
        c.close()
        server.close()
        loop.close()
    res = {m["id"]: m for m in got if m.get("type") == "command_result"}
    assert res[cid]["ok"] and res[cid]["result"]["param_bytes_after"] < res[cid]["result"]["param_bytes_before"]
    assert res[cid]["result"]["top1"] >= 0.9
    assert res[cid2]["ok"] and res[cid2]["result"]["steps"][0]["entries"] == 5
    reqs = [m for m in got if m.get("type") == "request"]
    assert reqs and reqs[0]["tokens"] == 3 and reqs[0]["ids"] == [65, 66, 67]
    assert reqs[0]["temperature"] == 0.3 and reqs[0]["batch_capacity"] == 3
    if sys.platform.startswith("linux"):
        alloc = [m for m in got if m.get("type") == "alloc"]
        assert alloc and alloc[-1]["reserved_bytes"] >= alloc[-1]["allocated_bytes"] > 0
        assert alloc[-1]["heap"] == "host"  # a CPU model: glibc's heap, whose free bytes are in the RSS


def test_torch_loop_without_sidecar_uses_the_users_settings() -> None:
    from tuner.client import NullClient

    loop = TorchLoop(torch.nn.Sequential(torch.nn.Linear(4, 4)), client=NullClient(), temperature=0.5, batch_size=2)
    try:
        s = loop.settings()
        assert (s.temperature, s.batch_size, s.precision) == (0.5, 2, "fp32")
        r = loop.request(3, settings=s)
        r.token(1)
        loop.finish(r)
        loop.between_batches()
        assert loop.handle_oom(torch.OutOfMemoryError("CUDA out of memory"), 2) is True
        assert loop.handle_oom(ValueError("x"), 2) is False
    finally:
        loop.close()


def test_memory_reports_are_paced_by_their_own_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.client import NullClient

    class Connected(NullClient):
        connected = True

        def __init__(self) -> None:
            super().__init__()
            self.reports: list[tuple[int | None, int | None]] = []

        def report_memory(
            self, allocated_bytes: int | None, reserved_bytes: int | None, heap: str | None = None
        ) -> None:
            self.reports.append((allocated_bytes, reserved_bytes))

    c = Connected()
    loop = TorchLoop(torch.nn.Sequential(torch.nn.Linear(4, 4)), client=c)
    try:
        def slow_memory() -> tuple[int, int, str]:
            time.sleep(0.005)  # a heap so fragmented that reading it costs 5 ms
            return 1, 2, "host"

        monkeypatch.setattr(loop, "memory", slow_memory)
        for _ in range(20):
            loop.between_batches()
        assert c.reports == [(1, 2)]
        assert loop.memory_read_seconds is not None and loop._next_memory - time.monotonic() > 3.0  # ~1000x cost
        loop._next_memory = 0.0
        monkeypatch.setattr(loop, "memory", lambda: (3, 4, "host"))  # cheap again: back to once a second
        loop.between_batches()
        loop.between_batches()
        assert c.reports == [(1, 2), (3, 4)] and loop._next_memory - time.monotonic() <= 1.0
        nobody = TorchLoop(torch.nn.Linear(2, 2), client=NullClient())
        monkeypatch.setattr(nobody, "memory", lambda: pytest.fail("read memory with no sidecar to tell"))
        nobody.between_batches()
        nobody.close()
    finally:
        loop.close()


def test_disk_reference_leaves_no_file_behind(canary_ids: list[list[int]]) -> None:
    import glob
    import tempfile

    pattern = f"{tempfile.gettempdir()}/tuner-precision-*"
    before = set(glob.glob(pattern))
    pm = PrecisionManager(load())  # reference="disk"
    assert set(glob.glob(pattern)) == before  # unlinked from the start: a SIGKILL leaves nothing either
    pm.set("int8")
    pm.set("fp32")
    assert current_precision(pm.model) == "fp32"
    pm.close()
