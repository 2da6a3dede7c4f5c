"""--consistency end to end: the CLI options, a user's inference process with tuner.client under `tuner run`, the
demo; what reaches the trace (scores, never texts without --record-text) and what does not change."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.cli import assert_one_line_error, tuner
from tuner.link.channel import MessageError, validate

SCRIPT = textwrap.dedent(
    """
    import time
    from tuner import client
    c = client.connect()
    deadline = time.monotonic() + 10
    while not c.consistency and time.monotonic() < deadline:  # the welcome arrives with the connection
        with c.request(prompt_tokens=1):
            pass
        time.sleep(0.05)
    sampled = 0
    for i in range(12):
        prompt = f"Question {i}: why does ice float on water?"
        with c.request(prompt_tokens=8) as r:
            r.started()
            answer = "Ice floats because it is less dense than liquid water."
            for w in answer.split():
                r.token(len(w))
            if r.sampled:
                sampled += 1
                r.consistency(answer, "Ice is less dense than liquid water, which is why it floats.", prompt)
    late = c.request(prompt_tokens=1)
    with late:
        late.token(1)
    late.consistency("a late second answer", "a late second answer", "late")  # after the request ended
    print("sampled", sampled, "consistency", c.consistency, flush=True)
    c.close(timeout=30)  # the default 1 s flush can lose queued requests on a starved machine
    """
)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(recs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r["data"] for r in recs if r.get("k") == "event" and r.get("kind") == kind]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--consistency", "bert"], "--consistency 'bert': use minilm, minilm:DIR, embeddings:URL or lexical"),
        (["--consistency", "lexical", "--consistency-rate", "0"], "--consistency-rate 0: give a share"),
        (["--consistency", "lexical", "--consistency-rate", "1.5"], "--consistency-rate 1.5: give a share"),
        (["--consistency", "lexical", "--consistency-queue", "0"], "--consistency-queue 0: must be at least 1"),
        (["--consistency", "embeddings:http://192.0.2.7:8000/v1"], "not a loopback address"),
        (["--canary", "x.txt"], "--canary needs --consistency BACKEND"),
        (["--consistency", "lexical", "--canary", "/nonexistent/c.txt"], "canary file /nonexistent/c.txt: No such"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], words: str, tmp_path: Path) -> None:
    cp = tuner("run", "--headless", "--trace", str(tmp_path / "t.jsonl"), *args, "--", "true")
    assert words in assert_one_line_error(cp)
    assert not (tmp_path / "t.jsonl").exists()


def test_channel_validates_quality_messages() -> None:
    ok = {"v": 1, "type": "quality", "kind": "canary", "reference": ["a", "b"], "answers": ["a", "c"]}
    assert validate(json.dumps(ok).encode())["kind"] == "canary"
    for bad in ({**ok, "reference": ["a", 3]}, {**ok, "kind": 5}, {"v": 1, "type": "quality"},
                {**ok, "answer": ["x"]}):
        with pytest.raises(MessageError):
            validate(json.dumps(bad).encode())


def test_null_client_requests_are_never_sampled() -> None:
    from tuner import client

    c = client.NullClient()
    with c.request(prompt_tokens=1) as r:
        assert r.sampled is False
        r.consistency("a", "b", "c")
    assert c.consistency is False and c.canary_prompts == () and c.report_canary(["a"], ["b"]) is False


def test_sampled_requests_are_scored_and_only_scores_reach_the_trace(tmp_path: Path) -> None:
    script = tmp_path / "infer.py"
    script.write_text(SCRIPT)
    trace = tmp_path / "t.jsonl"
    cp = tuner("run", "--headless", "--trace", str(trace), "--consistency", "lexical", "--consistency-rate", "1",
               "--", "python", str(script), timeout=180)
    assert cp.returncode == 0, cp.stderr
    assert "sampled 12 consistency True" in cp.stdout
    assert "consistency scorer ready: lexical-chrf (lexical)" in cp.stderr
    recs = records(trace)
    header = recs[0]
    assert header["quality"]["backend"] == "lexical-chrf" and header["quality"]["semantic"] is False
    assert header["quality"]["rate"] == 1.0
    q = events(recs, "quality")
    assert len(q) == 13  # the 12 sampled requests and the late one
    for d in q[:12]:
        assert d["backend"] == "lexical-chrf" and d["source"] == "in-process" and 0.3 < d["self_consistency"] < 1
        assert d["relevance"] is not None and "answer" not in d and "prompt" not in d and "second" not in d
    assert q[12]["self_consistency"] == 1.0
    text = trace.read_text()
    assert "less dense" not in text and "Question" not in text  # no text without --record-text
    reqs = events(recs, "request")
    assert sum(1 for r in reqs if r["prompt_tokens"] == 8) == 12  # second answers are no requests
    ticks = [r for r in recs if r.get("k") == "tick"]
    last = next(r["m"] for r in reversed(ticks) if "quality_scored_total" in r.get("m", {}))
    assert last["quality_scored_total"] == 13 and last["quality_dropped_total"] == 0
    assert any("quality_self_consistency_ratio/lexical-chrf" in r.get("m", {}) for r in ticks)
    # tuner report: the consistency section names the backend, and says it is lexical
    rep = tuner("report", str(trace))
    assert rep.returncode == 0, rep.stderr
    assert ("consistency  lexical-chrf (lexical: shared characters, not meaning), self-check AUC 1.00, 100% of "
            "requests sampled: 13 responses scored (13 in-process)") in rep.stdout
    assert "  self-consistency   mean " in rep.stdout and "  relevance          mean " in rep.stdout
    js = json.loads(tuner("report", "--json", str(trace)).stdout)["consistency"]
    assert js["backend"] == "lexical-chrf" and js["scored"] == 13 and js["self_consistency"]["n"] == 13
    assert js["by_temperature"] == [] and js["precision_steps"] == []


def test_record_text_keeps_the_texts_with_the_scores(tmp_path: Path) -> None:
    script = tmp_path / "infer.py"
    script.write_text(SCRIPT)
    trace = tmp_path / "t.jsonl"
    cp = tuner("run", "--headless", "--record-text", "--trace", str(trace), "--consistency", "lexical",
               "--consistency-rate", "1", "--", "python", str(script), timeout=180)
    assert cp.returncode == 0, cp.stderr
    q = events(records(trace), "quality")
    assert q and q[0]["second"] == "Ice is less dense than liquid water, which is why it floats."
    assert q[0]["prompt"].startswith("Question")


def test_a_model_that_is_not_a_model_leaves_everything_else_running(tmp_path: Path) -> None:
    script = tmp_path / "infer.py"
    script.write_text(SCRIPT)
    not_a_model = tmp_path / "model"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("weights elsewhere")
    trace = tmp_path / "t.jsonl"
    cp = tuner("run", "--headless", "--trace", str(trace), "--consistency", f"minilm:{not_a_model}",
               "--consistency-rate", "1", "--", "python", str(script), timeout=180)
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    reason = f"minilm model {not_a_model}: not a model folder (no config.json)"
    assert f"tuner: consistency scorer failed: {reason}; consistency is not measured, everything else goes on" \
        in cp.stderr
    recs = records(trace)
    (b,) = events(recs, "quality_backend")
    assert b["state"] == "failed" and b["reason"] == reason
    assert sum(1 for r in events(recs, "request") if r["prompt_tokens"] == 8) == 12
    q = events(recs, "quality")
    assert q and all(d["self_consistency"] is None and reason in d["reason"] for d in q)
    assert any(r.get("k") == "note" and "consistency scorer failed" in r.get("msg", "") for r in recs)
    rep = tuner("report", str(trace))
    assert f"consistency  minilm (semantic): scorer failed: {reason}; not measured" in rep.stdout


def test_a_workload_that_ends_at_once_still_learns_why_the_scorer_did_not_load(tmp_path: Path) -> None:
    """A workload that exits at once ended the session before the scorer had failed: the report said "0 responses
    scored" and no reason.  The last sample now waits briefly for a scorer still starting: the reason is printed
    and in the report (or, on a host too loaded to start it in that time, the report says it was still starting)."""
    trace = tmp_path / "t.jsonl"
    cp = tuner("run", "--headless", "--trace", str(trace), "--consistency", f"minilm:{tmp_path / 'nothing'}",
               "--", "python", "-c", "print(1)", timeout=180)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    reason = f"minilm model {tmp_path / 'nothing'}: not a folder"
    rep = tuner("report", str(trace)).stdout
    assert "responses scored" not in rep, rep
    if "still starting" in rep:  # (the child did not get as far as its path check in 3 s)
        assert "consistency  minilm (semantic): scorer still starting when the session ended" in rep, rep
    else:
        assert f"tuner: consistency scorer failed: {reason}" in cp.stderr, cp.stderr
        assert f"consistency  minilm (semantic): scorer failed: {reason}; not measured" in rep, rep


def test_demo_with_consistency(tmp_path: Path) -> None:
    """The demo makes a second answer in the same batch for sampled requests; the scorer scores both."""
    pytest.importorskip("torch", reason="needs torch (the torch extra): tuner demo runs the built-in model")
    trace = tmp_path / "d.jsonl"
    cp = tuner("demo", "--headless", "--quiet", "--duration", "8", "--rate", "4", "--trace", str(trace),
               "--consistency", "lexical", "--consistency-rate", "0.5", timeout=300)
    assert cp.returncode == 0, cp.stderr
    recs = records(trace)
    q = events(recs, "quality")
    reqs = events(recs, "request")
    assert len(q) >= 3 and len(reqs) >= 10
    assert all(d["temperature"] == 0.8 and d["precision"] == "fp32" for d in q)
    # an answer the model ends at once (EOS first) is empty: None with the reason, never a made-up score
    assert all(d["self_consistency"] is not None or "empty answer" in d["reason"] for d in q)
    assert sum(d["self_consistency"] is not None for d in q) >= 2
    assert {d["id"] for d in q} <= {r["id"] for r in reqs}


def test_tuned_generator_makes_second_answers_in_the_same_batch_and_canary_rounds() -> None:
    """tuner.integrations.hf with a real (tiny) tokenizer and model and a real channel: every request sampled
    (rate 1), each batch gets its twin rows, the pairs reach the sidecar decoded; a precision change sends a
    canary round."""
    import time

    torch = pytest.importorskip("torch", reason="needs torch (the torch extra)")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.test_hf import EOS, PAD, tiny_llama
    from tuner.client import Client
    from tuner.integrations.hf import TunedGenerator
    from tuner.link.channel import ChannelServer

    vocab = {"<pad>": PAD, "<s>": 1, "</s>": EOS, **{f"w{i}": i for i in range(3, 64)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    server = ChannelServer()
    server.set_welcome(consistency_rate=1.0)
    server.start()
    c = Client(server.path)
    torch.manual_seed(0)
    gen = TunedGenerator(tiny_llama(), client=c, tokenizer=tok, temperature=0.9, batch_size=4, max_new_tokens=6,
                         generate_kwargs={"min_new_tokens": 6}, canary_prompts=["w5 w6 w7", "w9 w10", "w11"],
                         canary_tokens=4)
    got: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 10
        while not c.consistency and time.monotonic() < deadline:
            time.sleep(0.02)
        prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14, 15], [1, 20]]
        outs = gen.generate(prompts)
        server.send_command("precision", {"precision": "int8"})
        while not c._commands and time.monotonic() < deadline:
            time.sleep(0.02)
        gen.step()  # runs the command between batches
        while time.monotonic() < deadline + 10:
            got.extend(m for _, m in server.drain())
            if any(m.get("kind") == "canary" for m in got) and sum(m.get("type") == "request" for m in got) >= 4:
                break
            time.sleep(0.05)
    finally:
        gen.close()
        c.close()
        server.close()
    selfs = [m for m in got if m.get("type") == "quality" and m.get("kind") == "self"]
    reqs = [m for m in got if m.get("type") == "request"]
    assert len(selfs) == 4 and len(reqs) == 4
    assert all(m["batch_size"] == 4 for m in reqs)  # the twin rows are not counted in the batch
    by_answer = {m["answer"] for m in selfs}
    assert by_answer == {tok.decode(o, skip_special_tokens=True) for o in outs}
    assert all(len(m["second"].split()) <= 6 and m["prompt"].startswith("w") for m in selfs)
    (canary,) = [m for m in got if m.get("kind") == "canary"]
    assert canary["precision"] == "int8" and canary["previous"] == "fp32"
    assert len(canary["reference"]) == len(canary["answers"]) == 3


def test_prometheus_labels_each_figure_with_its_backend() -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tuner.outputs.prometheus import PrometheusExporter

    e = PrometheusExporter(("127.0.0.1", 0))
    try:
        e.update({"quality_self_consistency_ratio/minilm": 0.42, "quality_relevance_ratio/minilm": 0.2,
                  "quality_reference_consistency_ratio/minilm": None, "quality_scored_total": 7.0,
                  "quality_scorer_rss_bytes": 4.5e8}, {})
        with urllib.request.urlopen(f"http://127.0.0.1:{e.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        e.close()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert got[("tuner_quality_self_consistency_ratio", (("backend", "minilm"),))] == 0.42
    assert got[("tuner_quality_relevance_ratio", (("backend", "minilm"),))] == 0.2
    assert got[("tuner_quality_scored_total", ())] == 7.0 and got[("tuner_quality_scorer_rss_bytes", ())] == 4.5e8
    assert "tuner_quality_reference_consistency_ratio" not in text  # None is left out, never NaN


def test_live_view_line_names_the_backend() -> None:
    from tuner.tui.model import Model

    m = Model()
    m.apply({"k": "header", "quality": {"backend": "lexical-chrf", "semantic": False}, "probes": {}})
    m.apply({"k": "tick", "t": 1.0, "m": {"quality_jobs": 0.0}})
    assert m.quality_line(1.0) == "consistency (lexical-chrf, lexical): no scores yet"
    m.apply({"k": "tick", "t": 2.0, "m": {"quality_jobs": 0.0, "quality_self_consistency_ratio/lexical-chrf": 0.31,
                                          "quality_relevance_ratio/lexical-chrf": 0.12}})
    assert m.quality_line(2.0) == "consistency (lexical-chrf, lexical): self 0.31, relevance 0.12"
    plain = Model()
    plain.apply({"k": "header", "probes": {}})
    assert plain.quality_line(0.0) is None


def test_the_sampled_share_is_the_rate_over_any_stretch_and_its_places_vary() -> None:
    """A client given --consistency-rate 0.02 by a real channel: one request in each block of 50, never 3 or 12
    in 400 as a coin per request gave; two clients sample different requests."""
    import time

    from tuner.client import Client
    from tuner.link.channel import ChannelServer

    server = ChannelServer()
    server.set_welcome(consistency_rate=0.02)
    server.start()
    clients = [Client(server.path), Client(server.path)]
    try:
        deadline = time.monotonic() + 10
        while not all(c.consistency for c in clients) and time.monotonic() < deadline:
            time.sleep(0.02)
        places: list[list[int]] = []
        for c in clients:
            picked = []
            for i in range(400):
                with c.request(prompt_tokens=1) as r:
                    if r.sampled:
                        picked.append(i)
            places.append(picked)
    finally:
        for c in clients:
            c.close()
        server.close()
    for picked in places:
        assert len(picked) == 8, picked
        assert [p // 50 for p in picked] == list(range(8)), picked  # one in each block of 50
    assert places[0] != places[1]  # random places (equal by chance: 50**-8)
