"""tuner.integrations.hf on a tiny LlamaForCausalLM built from a config (no download)."""

from __future__ import annotations

import time
from typing import Any

import pytest

# CI runs the fast suite on the oldest and newest Python without the torch extra (its wheel is for one Python)
torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")

transformers = pytest.importorskip("transformers", reason="needs transformers (the torch extra)")

from tuner.integrations.hf import TunedGenerator  # noqa: E402
from tuner.integrations.precision import current_precision  # noqa: E402

EOS = 2
PAD = 0


def tiny_llama() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14, 15], [1, 20]]


def wait_for(pred: Any, timeout: float = 5.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_greedy_batches_match_unbatched_generate() -> None:
    from tuner.client import NullClient

    model = tiny_llama()
    gen = TunedGenerator(model, client=NullClient(), temperature=0.0, batch_size=3, max_new_tokens=8)
    try:
        outs = gen.generate(PROMPTS)
    finally:
        gen.close()
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=PAD,
                             eos_token_id=EOS)[0, len(prompt):].tolist()
        if EOS in ref:
            ref = ref[: ref.index(EOS)]
        assert out == ref  # left padding + streaming give exactly what a lone generate gives


def test_knobs_win_over_the_same_keys_in_generate_kwargs() -> None:
    """A knob recorded as applied is what generate uses: generate_kwargs cannot silently override it."""
    from tuner.client import NullClient
    from tuner.integrations.torch_loop import BatchSettings

    gen = TunedGenerator(tiny_llama(), client=NullClient(), max_new_tokens=4,
                         generate_kwargs={"temperature": 0.2, "do_sample": False, "repetition_penalty": 1.0,
                                          "top_p": 0.9, "min_new_tokens": 2})
    try:
        cfg = gen._generation_config(BatchSettings(0.9, 1.3, 4, "fp32"))
        assert (cfg.temperature, cfg.do_sample, cfg.repetition_penalty) == (0.9, True, 1.3)
        assert cfg.top_p == 0.9 and cfg.min_new_tokens == 2  # the rest stays the user's
        greedy = gen._generation_config(BatchSettings(0.0, 1.0, 4, "fp32"))
        assert greedy.do_sample is False
    finally:
        gen.close()


def test_events_knobs_and_commands_through_a_real_channel() -> None:
    from tuner.client import Client
    from tuner.link.channel import ChannelServer
    from tuner.records import Knobs

    server = ChannelServer()
    server.start()
    c = Client(server.path)
    model = tiny_llama()
    gen = TunedGenerator(model, client=c, temperature=0.0, batch_size=8, max_new_tokens=6,
                         generate_kwargs={"min_new_tokens": 6})
    got: list[dict[str, Any]] = []
    try:
        wait_for(lambda: server.clients())
        server.broadcast_knobs(Knobs(temperature=0.9, batch_size=2))
        wait_for(lambda: c.knobs.batch_size == 2)
        for p in PROMPTS:
            gen.submit(p)
        done = gen.step()
        assert len(done) == 2 and len(gen.queue) == 2  # the batch-size knob grouped the queue
        assert gen.last_settings is not None and gen.last_settings.temperature == 0.9
        cid = server.send_command("precision", {"precision": "int8"})
        assert cid is not None
        wait_for(lambda: c._commands)
        done += gen.step()  # the command runs between batches; this batch still ran at fp32
        assert current_precision(gen.model) == "int8"
        for p in PROMPTS[:2]:
            gen.submit([*p, 3])
        done += gen.step()  # ... and these on the int8 model
        assert len(done) == 6 and all(len(out) == 6 for _, out in done)

        def drained() -> bool:
            got.extend(m for _, m in server.drain())
            return sum(m.get("type") == "request" for m in got) >= 6 and any(
                m.get("type") == "command_result" for m in got)

        wait_for(drained)
    finally:
        gen.close()
        c.close()
        server.close()
    reqs = sorted((m for m in got if m.get("type") == "request"), key=lambda m: m["id"])
    by_prompt = {tuple(h.input_ids): out for h, out in done}
    for m, p in zip(reqs, [*PROMPTS, *([*q, 3] for q in PROMPTS[:2])], strict=True):
        assert m["prompt_tokens"] == len(p)
        assert m["ids"] == by_prompt[tuple(p)]  # every streamed token reached the sidecar, in order
        assert m["ttft_seconds"] > 0 and m["tpot_seconds"] > 0 and m["temperature"] == 0.9
    assert [(m["precision"], m["batch_size"]) for m in reqs] == [("fp32", 2)] * 4 + [("int8", 2)] * 2
    res = next(m for m in got if m.get("type") == "command_result")
    assert res["ok"] and res["result"]["param_bytes_after"] < res["result"]["param_bytes_before"]


def test_oom_halves_the_batch_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.client import NullClient

    model = tiny_llama()
    real = model.generate
    sizes: list[int] = []

    def generate(**kw: Any) -> Any:
        n = kw["input_ids"].shape[0]
        sizes.append(n)
        if n > 2:
            raise torch.OutOfMemoryError("CPU out of memory (simulated)")
        return real(**kw)

    monkeypatch.setattr(model, "generate", generate)
    client = NullClient()
    reported: list[int | None] = []
    monkeypatch.setattr(client, "report_oom", lambda batch_size=None: reported.append(batch_size))
    gen = TunedGenerator(model, client=client, temperature=0.0, batch_size=4, max_new_tokens=3)
    try:
        outs = gen.generate(PROMPTS)
    finally:
        gen.close()
    assert sizes == [4, 2, 2] and reported == [4]
    assert all(len(o) <= 3 for o in outs) and gen.oom_ceiling == 2


def test_precision_round_trip_keeps_tied_embeddings_tied() -> None:
    from tuner.integrations.precision import PrecisionManager, model_bytes

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        ref = model(x).logits
    fp32_bytes = model_bytes(model)
    assert fp32_bytes < sum(p.numel() * 4 for p in model.state_dict().values())  # the tied matrix counted once
    pm = PrecisionManager(model)
    try:
        assert pm.set("int8")["param_bytes_after"] < fp32_bytes
        r = pm.set("fp32")
        m = pm.model
        assert m.lm_head.weight is m.model.embed_tokens.weight  # one matrix again, not two copies
        assert r["param_bytes_after"] == fp32_bytes
        with torch.inference_mode():
            assert torch.equal(m(x).logits, ref)
    finally:
        pm.close()
