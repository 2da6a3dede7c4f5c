"""The built-in demo model: committed weights that load safely, behave like a trained LM (it loops when greedy,
repeats less as temperature rises), batch correctly, and the samplers do what they say."""

from __future__ import annotations

import json
import statistics

import pytest

# CI runs the fast suite on the oldest and newest Python without the torch extra (its wheel is for one Python)
torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")

from tuner.demo.corpus import held_out_prompts, split_topics  # noqa: E402
from tuner.demo.curve import has_loop, measure, rep_w, seq_rep_n  # noqa: E402
from tuner.demo.model import CONFIG_FILE, WEIGHTS_FILE, BatchDecoder, TinyLlama, load, param_count  # noqa: E402
from tuner.demo.sampling import Mirostat, SamplingParams, SeenTokens, apply_repetition_penalty, generate, sample  # noqa: E402
from tuner.demo.tokenizer import BOS, EOS, ByteTokenizer  # noqa: E402
from tuner.demo.train import evaluate, to_ids  # noqa: E402

tok = ByteTokenizer()


@pytest.fixture(scope="module")
def model() -> TinyLlama:
    torch.set_num_threads(2)
    return load()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return [tok.encode(p, bos=True) for p in held_out_prompts(8, seed=3)]


def test_committed_weights_are_small_and_load_as_plain_tensors() -> None:
    assert WEIGHTS_FILE.stat().st_size <= 20 << 20
    state = torch.load(WEIGHTS_FILE, map_location="cpu", weights_only=True)  # no pickled code
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    info = json.loads(CONFIG_FILE.read_text())
    assert info["params"] == sum(v.numel() for v in state.values())
    assert info["seed"] == 0 and info["train_seconds"] <= 20 * 60


def test_model_is_trained_held_out_loss_matches_the_card(model: TinyLlama) -> None:
    _, held = split_topics()
    loss = evaluate(model, to_ids(held), model.cfg.max_seq, max_windows=10_000)  # all windows, as the card
    card = json.loads(CONFIG_FILE.read_text())["held_out_loss_nats_per_byte"]
    assert loss < 1.8  # an untrained byte model scores ln(264) = 5.6
    assert abs(loss - card) < 0.01, (loss, card)
    assert param_count(model) == json.loads(CONFIG_FILE.read_text())["params"]


def test_tokenizer_round_trips_text_and_drops_specials() -> None:
    text = "def f(x):\n    return x ** 2  # “quoted” é"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and max(ids[1:-1]) < 256
    assert tok.decode(ids) == text


def test_batched_left_padded_decoding_equals_one_by_one(model: TinyLlama, prompts: list[list[int]]) -> None:
    batched = generate(model, prompts[:4], 24, SamplingParams(temperature=0.0), stop_at_eos=False)
    for p, out in zip(prompts[:4], batched, strict=True):
        assert generate(model, [p], 24, SamplingParams(temperature=0.0), stop_at_eos=False)[0] == out


def test_kv_cache_steps_equal_a_full_forward(model: TinyLlama, prompts: list[list[int]]) -> None:
    p = prompts[0]
    with torch.inference_mode():
        dec = BatchDecoder(model, [p], 4)
        dec.prefill()
        logits = dec.step(torch.tensor([ord("a")]))
        full = model(torch.tensor([[*p, ord("a")]]))[0, -1]
    assert torch.allclose(logits[0], full, atol=1e-4)


def test_greedy_decoding_visibly_loops(model: TinyLlama, prompts: list[list[int]]) -> None:
    outs = generate(model, prompts, 160, SamplingParams(temperature=0.0), stop_at_eos=False)
    loops = [has_loop(o) for o in outs]
    assert sum(loops) >= len(outs) // 2, [tok.decode(o) for o in outs]
    assert statistics.fmean(seq_rep_n(o) for o in outs) > 0.3


def test_repetition_falls_as_temperature_rises(model: TinyLlama, prompts: list[list[int]]) -> None:
    cold = measure(model, prompts, 128, 0.0, seed=0)
    warm = measure(model, prompts, 128, 1.0, seed=0)
    assert cold["seq_rep_4"] > warm["seq_rep_4"] + 0.1, (cold, warm)
    assert cold["loop"] > warm["loop"]


def test_sampled_text_is_readable_ish(model: TinyLlama, prompts: list[list[int]]) -> None:
    g = torch.Generator().manual_seed(0)
    outs = generate(model, prompts, 128, SamplingParams(temperature=0.7), generator=g, stop_at_eos=False)
    text = " ".join(tok.decode(o) for o in outs)
    words = text.split()
    common = {"the", "a", "of", "is", "to", "and", "in", "be", "object", "that", "for", "as", "an", "or"}
    assert sum(w.lower().strip(".,") in common for w in words) > 0.1 * len(words), text
    assert sum(ch.isprintable() or ch in "\n\t" for ch in text) > 0.98 * len(text)


def test_top_k_1_is_greedy_and_penalty_lowers_repetition(model: TinyLlama, prompts: list[list[int]]) -> None:
    logits = torch.randn(3, 264)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, SamplingParams(temperature=1.5, top_k=1), generator=g),
                       sample(logits, SamplingParams(temperature=0.0)))
    g = torch.Generator().manual_seed(1)
    tiny_p = sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), generator=g)
    assert torch.equal(tiny_p, sample(logits, SamplingParams(temperature=0.0)))
    plain = generate(model, prompts, 128, SamplingParams(temperature=0.0), stop_at_eos=False)
    pen = generate(model, prompts, 128, SamplingParams(temperature=0.0, repetition_penalty=1.3), stop_at_eos=False)
    assert statistics.fmean(map(seq_rep_n, pen)) < statistics.fmean(map(seq_rep_n, plain))


def test_the_penalty_mask_is_the_ctrl_rule_on_each_rows_tokens_so_far() -> None:
    """The (rows, vocab) mask gives what the rule gives row by row: a seen token's positive logit divided by
    the penalty, a negative one multiplied, an unseen one (or -inf) untouched; the step's picks are added."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 264, generator=g) * 3
    logits[:, 256:] = float("-inf")
    history = [[65, 66, 65, BOS], [], [0, 255], list(range(0, 256, 7))]
    seen = SeenTokens(history, 264)

    def by_row(x: torch.Tensor, hist: list[list[int]], p: float) -> torch.Tensor:
        out = x.clone()
        for row, ids in enumerate(hist):
            for i in set(ids):
                v = x[row, i]  # a float32 tensor: the same arithmetic as the mask's
                out[row, i] = v / p if v > 0 else v * p
        return out

    assert torch.equal(apply_repetition_penalty(logits, seen.mask, 1.3), by_row(logits, history, 1.3))
    assert apply_repetition_penalty(logits, seen.mask, 1.0) is logits
    picks = torch.tensor([70, 71, 72, 0])
    seen.add(picks)
    history = [[*h, int(t)] for h, t in zip(history, picks, strict=True)]
    assert torch.equal(apply_repetition_penalty(logits, seen.mask, 0.8), by_row(logits, history, 0.8))
    assert seen.mask.sum(-1).tolist() == [len(set(h)) for h in history]


def test_specials_other_than_eos_are_never_sampled() -> None:
    logits = torch.full((2, 264), -10.0)
    logits[:, 258] = 50.0  # PAD
    logits[:, 65] = 0.0
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == [65, 65]


def test_mirostat_holds_observed_surprise_near_tau(model: TinyLlama, prompts: list[list[int]]) -> None:
    def run(tau: float) -> tuple[float, list[float]]:
        g = torch.Generator().manual_seed(0)
        m = Mirostat(len(prompts), tau=tau, eta=0.1)
        generate(model, prompts, 160, mirostat=m, generator=g, stop_at_eos=False)
        return statistics.fmean(s for row in m.surprise for s in row[40:]), m.mu

    low, _ = run(0.5)  # below the model's own ~1.1 bits/byte: truncation holds surprise near tau
    assert 0.25 < low < 0.75, low
    high, mu = run(5.0)  # llama.cpp's default is above it: mu only grows, nothing is truncated (= T 1.0)
    assert high > low + 0.4 and min(mu) > 10.0, (high, mu)


def test_repetition_measures_on_known_sequences() -> None:
    assert seq_rep_n([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 9)
    assert seq_rep_n(list(range(20))) == 0.0
    assert rep_w([1, 2, 1, 2]) == pytest.approx(2 / 3)
    assert has_loop([9, *([1, 2, 3, 4] * 3)]) and not has_loop([1, 2, 3, 4] * 2)
