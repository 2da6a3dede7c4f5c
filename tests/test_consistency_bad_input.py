"""Issue 17's bad input, each through the CLI as a user meets it (``tuner run --consistency ... -- python infer.py``):
weights that fail the checks, an embeddings endpoint that answers with the wrong dimension, empty answers and
answers of 100,000 characters.  Each is a one-line reason, the figure is None, every request is still recorded.
(A model path that is not a model: ``tests/test_consistency_wiring.py``.)"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli import tuner, tuner_popen

# A user's inference: 12 answered requests, every one sampled (--consistency-rate 1).  Requests 3 and 7 answer
# nothing, 5 and 9 answer 100,000 characters; the rest a sentence and its paraphrase.  With GO set it first waits
# for that file (the test flips the endpoint's behaviour in between).
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from tuner import client
    c = client.connect()
    deadline = time.monotonic() + 10
    while not c.consistency and time.monotonic() < deadline:  # the welcome arrives with the connection
        time.sleep(0.05)
    go = os.environ.get("GO")
    if go:
        deadline = time.monotonic() + 600
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.05)
    answer = "Ice floats because it is less dense than liquid water."
    second = "Ice is less dense than liquid water, which is why it floats."
    for i in range(12):
        prompt = f"Question {i}: why does ice float on water?"
        with c.request(prompt_tokens=8) as r:
            r.started()
            a, b = answer, second
            if i in (3, 7):
                a, b = "", ""
            elif i in (5, 9):
                a, b = "ice " * 25_000, "water " * 16_666 + "ice "
            r.token(max(1, len(a) // 4))
            r.consistency(a, b, prompt)
    print("done", flush=True)
    c.close(timeout=30)  # the default 1 s flush lost all 12 requests once at load ~20 (the sender thread starved)
    """
)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(recs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r["data"] for r in recs if r.get("k") == "event" and r.get("kind") == kind]


def answered(recs: list[dict[str, Any]]) -> int:
    return sum(1 for d in events(recs, "request") if d.get("prompt_tokens") == 8)


def by_request(recs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The ``quality`` events by the request's place in the script (their ids follow the requests')."""
    ids = sorted(d["id"] for d in events(recs, "request") if d.get("prompt_tokens") == 8)
    return {ids.index(d["id"]): d for d in events(recs, "quality") if d["id"] in ids}


def run_after_verdict(tmp_path: Path, consistency: list[str], srv: Any = None) -> tuple[int, str, str, Path]:
    """``tuner run --consistency ... -- python infer.py`` where the script sends its requests once the trace has
    the scorer's verdict (``quality_backend``: ready or failed) — a user's inference runs for minutes, this one
    for a moment.  With ``srv`` (an embeddings server), its answers switch to the wrong dimension then."""
    script = tmp_path / "infer.py"
    script.write_text(SCRIPT)
    trace = tmp_path / "t.jsonl"
    go = tmp_path / "go"
    p = tuner_popen("run", "--headless", "--trace", str(trace), *consistency, "--consistency-rate", "1", "--",
                    "env", f"GO={go}", "python", str(script))
    try:
        deadline = time.monotonic() + 600  # MiniLM took 55 s to load at load 12 on 2 cores (nice 5)
        while not (trace.exists() and events(records_so_far(trace), "quality_backend")):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "no verdict from the scorer within 600 s"
            time.sleep(0.1)
        if srv is not None:
            srv.mode = "dim"
        go.touch()
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, out, err, trace


@pytest.mark.timeout(900)
def test_empty_answers_and_answers_of_100k_characters(tmp_path: Path) -> None:
    code, out, err, trace = run_after_verdict(tmp_path, ["--consistency", "lexical"])
    assert code == 0, err
    assert "Traceback" not in err and "done" in out
    recs = records(trace)
    assert answered(recs) == 12
    q = by_request(recs)
    assert sorted(q) == list(range(12))
    for i in (3, 7):
        assert q[i]["self_consistency"] is None and q[i]["relevance"] is None
        assert q[i]["reason"] == "relevance: empty answer; self: empty answer"
    long = "the answer has 100000 characters, over the scorer's limit of 20000"
    for i in (5, 9):
        assert q[i]["self_consistency"] is None and q[i]["relevance"] is None
        assert q[i]["reason"] == f"relevance: {long}; self: {long}"
        assert "\n" not in q[i]["reason"]
    for i in (0, 1, 2, 4, 6, 8, 10, 11):
        assert q[i]["self_consistency"] is not None and 0 < q[i]["self_consistency"] < 1, q[i]
    ticks = [r["m"] for r in recs if r.get("k") == "tick"]
    means = [m["quality_self_consistency_ratio/lexical-chrf"] for m in ticks
             if m.get("quality_self_consistency_ratio/lexical-chrf") is not None]
    assert means and means[-1] == pytest.approx(q[0]["self_consistency"])  # the window mean of the scored ones
    assert max(m.get("quality_unscored_total") or 0 for m in ticks) == 8  # measures: 4 answers x (self, relevance)
    rep = tuner("report", str(trace))
    assert rep.returncode == 0, rep.stderr


def wrong_weights(kind: str, folder: Path) -> list[str]:
    """A model folder that fails one of the checks, and the options that reach that check."""
    from tuner.quality import backends as B

    src = B.packaged_model_dir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    if kind == "pickled":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle: never unpickled")
        return []
    if kind == "sha":
        data = bytearray((src / "model.safetensors").read_bytes())
        data[-1] ^= 1  # one bit of the last weight
        (folder / "model.safetensors").write_bytes(bytes(data))
        return []
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)  # the right files, the wrong model: random weights do not separate meaning
    (folder / "config.json").unlink()
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder, safe_serialization=True)
    return ["--consistency-unpinned"]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("pickled", "no model.safetensors (pytorch_model.bin is pickled and never loaded)"),
        ("sha", "is not the pinned 53aa51172d142c89"),
        ("random", "self-check failed: paraphrases rank above unrelated pairs with ROC AUC"),
    ],
)
@pytest.mark.timeout(900)
def test_weights_that_fail_the_checks(kind: str, reason: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="needs the consistency extra")
    folder = tmp_path / "model"
    folder.mkdir()
    extra = wrong_weights(kind, folder)
    code, out, err, trace = run_after_verdict(tmp_path, ["--consistency", f"minilm:{folder}", *extra])
    assert code == 0, err
    assert "Traceback" not in err and "done" in out
    (line,) = [ln for ln in err.splitlines() if ln.startswith("tuner: consistency scorer failed")]
    assert reason in line and line.endswith("consistency is not measured, everything else goes on"), line
    recs = records(trace)
    (b,) = events(recs, "quality_backend")
    assert b["state"] == "failed" and reason in b["reason"] and "\n" not in b["reason"]
    assert answered(recs) == 12
    q = by_request(recs)
    assert sorted(q) == list(range(12))
    assert all(d["self_consistency"] is None and d["relevance"] is None for d in q.values())
    assert all(reason in q[i]["reason"] for i in (0, 1, 2, 4, 6, 8, 10, 11))  # the others: empty, too long
    ticks = [r["m"] for r in recs if r.get("k") == "tick"]
    assert all(m.get("quality_self_consistency_ratio/minilm") is None for m in ticks)
    rep = tuner("report", str(trace))
    assert "scorer failed" in rep.stdout and reason in rep.stdout
    assert "requests  12" in rep.stdout


@pytest.mark.timeout(900)
def test_an_embeddings_endpoint_that_answers_with_the_wrong_dimension(tmp_path: Path) -> None:
    """The endpoint passes the self-check with 256 dimensions, then answers with 128: each score None with the
    reason, the requests recorded, the run exits 0."""
    from tests.helpers.embeddings_server import EmbeddingsServer

    with EmbeddingsServer() as srv:
        code, out, err, trace = run_after_verdict(tmp_path, ["--consistency", f"embeddings:{srv.url}/v1"], srv)
    assert code == 0, err
    assert "Traceback" not in err and "done" in out
    (ready,) = events(records(trace), "quality_backend")
    assert ready["state"] == "ready" and ready["backend"]["dimension"] == 256
    recs = records(trace)
    assert answered(recs) == 12
    q = events(recs, "quality")
    assert len(q) == 12
    wrong = "embeddings endpoint returned a 128-dimension vector, expected 256"
    scored_long_or_empty = [d for d in q if "characters" in d["reason"] or "empty answer" in d["reason"]]
    assert len(scored_long_or_empty) == 4
    rest = [d for d in q if d not in scored_long_or_empty]
    assert all(d["self_consistency"] is None and d["reason"] == f"relevance: {wrong}; self: {wrong}" for d in rest)


@pytest.mark.timeout(900)
def test_an_embeddings_endpoint_that_times_out(tmp_path: Path) -> None:
    """The endpoint answers only after 15 s: the self-check gives up at 10 s, one line, the run goes on.  (The
    script sends its requests after the verdict: sent at once, a run shorter than the scorer's start-up plus the
    10 s timeout ended before the verdict at load ~20, and its responses were left unscored with a note.)"""
    from tests.helpers.embeddings_server import EmbeddingsServer

    with EmbeddingsServer() as srv:
        srv.mode, srv.delay = "slow", 15.0
        code, out, err, trace = run_after_verdict(tmp_path, ["--consistency", f"embeddings:{srv.url}/v1"])
    assert code == 0, err
    assert "Traceback" not in err and "done" in out
    reason = "embeddings self-check: embeddings endpoint: no answer within 10 s"
    (line,) = [ln for ln in err.splitlines() if ln.startswith("tuner: consistency scorer failed")]
    assert line == f"tuner: consistency scorer failed: {reason}; consistency is not measured, everything else goes on"
    recs = records(trace)
    assert answered(recs) == 12
    q = by_request(recs)
    assert sorted(q) == list(range(12))
    assert all(d["self_consistency"] is None and d["relevance"] is None for d in q.values())
    assert all(reason in q[i]["reason"] for i in (0, 1, 2, 4, 6, 8, 10, 11))


def records_so_far(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a trace being written."""
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]
