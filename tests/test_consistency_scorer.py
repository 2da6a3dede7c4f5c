"""The scorer child process (tuner.quality.scorer) and the sidecar's quality probe (tuner.quality.probe): real
child processes, the lexical backend (fast) unless a test says otherwise."""

from __future__ import annotations

import os
import signal
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cli import tuner_env
from tuner.quality.probe import QualityOptions, QualityProbe
from tuner.quality.scorer import ScorerProcess
from tuner.records import Event


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", tuner_env()["PYTHONPATH"])


def wait_for(cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_scorer_scores_and_reports_its_usage() -> None:
    s = ScorerProcess("lexical")
    try:
        wait_for(lambda: s.state == "ready")
        assert s.ready_info is not None and s.ready_info["backend"]["name"] == "lexical-chrf"
        assert s.ready_info["self_check"]["auc"] >= 0.95
        assert s.submit(1, [("the same text", "the same text"), ("", "x")])
        (res,) = wait_for(s.results)
        assert res["id"] == 1 and res["scores"] == [1.0, None] and res["reasons"] == [None, "empty answer"]
        rss, cpu = s.usage()
        assert rss is not None and rss > 5e6 and cpu is not None and cpu > 0
    finally:
        s.close()
    assert s.proc.returncode == 0
    assert s.usage() == (None, None)


def test_scorer_queue_is_bounded() -> None:
    """Jobs wait in the parent's queue, one at a time in the child: past the bound the oldest go, counted."""
    s = ScorerProcess("lexical", queue=2)
    try:
        for i in range(10):  # before the child is ready (starting Python takes far longer than this loop)
            s.submit(i, [("a b c", "a b d")])
        assert s.dropped == 8 and s.queued == 2
        got: list[dict[str, Any]] = []
        wait_for(lambda: got.extend(s.results()) or len(got) == 2)
        assert [r["id"] for r in got] == [8, 9]
    finally:
        s.close()


def test_scorer_that_cannot_load_says_why_and_refuses_jobs() -> None:
    s = ScorerProcess("minilm:/nonexistent/model")
    try:
        wait_for(lambda: s.state == "failed")
        assert s.reason == "minilm model /nonexistent/model: not a folder"
        assert s.submit(1, [("a", "b")]) is False
    finally:
        s.close()


def test_scorer_that_dies_is_reported() -> None:
    s = ScorerProcess("lexical")
    try:
        wait_for(lambda: s.state == "ready")
        os.kill(s.pid, signal.SIGKILL)
        wait_for(lambda: s.state == "exited")
        assert s.reason is not None and s.reason.startswith("the scorer exited with code -9")
        assert s.submit(2, [("a", "b")]) is False
    finally:
        s.close()


# -- the probe -------------------------------------------------------------------------------------------------
_seen: weakref.WeakKeyDictionary[QualityProbe, list[Event]] = weakref.WeakKeyDictionary()
"""Events each probe gave so far (by the probe itself: an id() is reused once its object is collected, and a
new probe then read an earlier test's events)."""


def collect(probe: QualityProbe, kind: str, n: int = 1, timeout: float = 60.0) -> tuple[list[Event], dict[str, Any]]:
    """Sample ``probe`` until it has given ``n`` events of ``kind`` (counting those of earlier calls); returns
    them and the latest values."""
    seen = _seen.setdefault(probe, [])
    values: dict[str, Any] = {}

    def got() -> list[Event]:
        return [e for e in seen if e.kind == kind]

    def more() -> bool:
        s = probe.sample(time.monotonic() - probe.t0)
        seen.extend(s.events)
        values.update(s.values)
        return len(got()) >= n

    wait_for(more, timeout)
    return got()[-n:], values


def test_probe_scores_sampled_responses_and_canary_rounds() -> None:
    p = QualityProbe(QualityOptions("lexical"), t0=time.monotonic())
    try:
        (ready,), _ = collect(p, "quality_backend")
        assert ready.data["state"] == "ready" and ready.data["backend"]["semantic"] is False
        p.submit({"kind": "self", "id": 7, "prompt": "The for statement is used to",
                  "answer": "iterate over the elements of a sequence", "second": "iterate over the items of a list",
                  "temperature": 0.8, "precision": "fp32", "source": "in-process"})
        (ev,), values = collect(p, "quality")
        d = ev.data
        assert d["id"] == 7 and d["backend"] == "lexical-chrf" and d["semantic"] is False
        assert 0 < d["self_consistency"] < 1 and 0 <= d["relevance"] < 1 and "reason" not in d
        assert "answer" not in d and "prompt" not in d  # no text in the trace without --record-text
        assert values["quality_self_consistency_ratio/lexical-chrf"] == d["self_consistency"]
        assert values["quality_relevance_ratio/lexical-chrf"] == d["relevance"]
        assert values["quality_scored_total"] == 1 and values["quality_dropped_total"] == 0
        assert values["quality_scorer_rss_bytes"] > 0
        ref = ["a list display is a series", "the loop ends", "a slicing selects items", "the operator yields"]
        new = ["a list display is a series", "the loop stops", "slices select a range", "the operator yields"]
        p.submit({"kind": "canary", "tag": "int8", "precision": "int8", "previous": "fp32", "reference": ref,
                  "answers": new})
        (ev,), values = collect(p, "quality_reference")
        d = ev.data
        assert d["n"] == 4 and d["scored"] == 4 and d["identical"] == 2 and d["precision"] == "int8"
        assert 0.5 < d["mean"] < 1 and d["min"] < d["mean"] and 0 < d["unrelated_mean"] < d["mean"]
        assert d["normalised"] == pytest.approx((d["mean"] - d["unrelated_mean"]) / (1 - d["unrelated_mean"]))
        assert values["quality_reference_consistency_ratio/lexical-chrf"] == d["mean"]
    finally:
        p.close()


def test_probe_bad_answers_are_none_with_a_reason() -> None:
    p = QualityProbe(QualityOptions("lexical"), t0=time.monotonic(), record_text=True)
    try:
        p.submit({"kind": "self", "id": 1, "prompt": "p", "answer": "", "second": "something"})
        p.submit({"kind": "self", "id": 2, "prompt": "p", "answer": "x" * 20_001, "answer_chars": 100_000,
                  "second": "y"})
        p.submit({"kind": "self", "id": 3, "prompt": "hello there", "answer": "hello there"})  # no second answer
        p.submit({"kind": "canary", "tag": "t", "reference": ["only one"], "answers": ["only one"]})
        events, values = collect(p, "quality", 3)
        by = {e.data["id"]: e.data for e in events}
        assert by[1]["self_consistency"] is None and by[1]["reason"] == "relevance: empty answer; self: empty answer"
        assert by[2]["self_consistency"] is None and by[2]["relevance"] is None
        assert by[2]["reason"] == ("relevance: the answer has 100000 characters, over the scorer's limit of 20000; "
                                   "self: the answer has 100000 characters, over the scorer's limit of 20000")
        assert by[3]["self_consistency"] is None and by[3]["relevance"] == 1.0 and "reason" not in by[3]
        assert by[3]["answer"] == "hello there"  # --record-text: the texts go with the scores
        refs, _ = collect(p, "quality_reference")
        assert refs[0].data["mean"] is None and refs[0].data["reason"] == "1 canary answers (need 2)"
        assert values["quality_unscored_total"] == 4
        assert any("consistency not measured for a response" in m for m, _ in p.take_notes())
    finally:
        p.close()


def test_probe_with_a_scorer_that_failed_goes_on_without_scores() -> None:
    p = QualityProbe(QualityOptions("minilm:/nonexistent"), t0=time.monotonic())
    try:
        (ev,), values = collect(p, "quality_backend")
        assert ev.data == {"state": "failed", "backend": {"name": "minilm"},
                           "reason": "minilm model /nonexistent: not a folder"}
        notes = p.take_notes()
        assert notes == [("consistency scorer failed: minilm model /nonexistent: not a folder; consistency is not "
                          "measured, everything else goes on", "warn")]
        p.submit({"kind": "self", "id": 1, "prompt": "p", "answer": "a", "second": "b"})
        (q,), values = collect(p, "quality")
        assert q.data["self_consistency"] is None and "not a folder" in q.data["reason"]
        assert values["quality_self_consistency_ratio/minilm"] is None and values["quality_jobs"] is None
    finally:
        p.close()


def slow_python(tmp_path: Path, seconds: float) -> str:
    """The scorer's interpreter, ``seconds`` late."""
    slow = tmp_path / f"slow-python-{seconds:g}"
    slow.write_text(f"#!/bin/sh\nsleep {seconds:g}\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    return str(slow)


def test_the_last_sample_waits_for_a_starting_scorer_to_say_it_failed(tmp_path: Path) -> None:
    """A session that ends while the scorer is still starting (a workload that exits at once): the last sample
    waits a moment for it, so its failure and the reason reach the trace — nothing was sampled to wait for."""
    p = QualityProbe(QualityOptions("minilm:/nonexistent"), t0=time.monotonic(),
                     scorer=ScorerProcess("minilm:/nonexistent", python=slow_python(tmp_path, 1)))
    try:
        first = p.sample(time.monotonic() - p.t0)
        assert p.scorer.state == "starting" and not first.events
        p.finishing()
        last = p.sample(time.monotonic() - p.t0)
        (ev,) = [e for e in last.events if e.kind == "quality_backend"]
        assert ev.data == {"state": "failed", "backend": {"name": "minilm"},
                           "reason": "minilm model /nonexistent: not a folder"}
    finally:
        p.close()


def test_a_scorer_still_starting_at_the_end_is_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the scorer has not started within the last sample's wait, the trace says it was still starting (the
    report's reason), instead of an empty consistency section."""
    from tuner.quality import probe as probe_mod
    from tuner.quality.report import render, summarize

    monkeypatch.setattr(probe_mod, "FINAL_START_WAIT_S", 0.3)
    p = QualityProbe(QualityOptions("minilm:/nonexistent"), t0=time.monotonic(),
                     scorer=ScorerProcess("minilm:/nonexistent", python=slow_python(tmp_path, 30)))
    try:
        p.finishing()
        t = time.monotonic()
        last = p.sample(time.monotonic() - p.t0)
        assert 0.3 <= time.monotonic() - t < 5.0
        (ev,) = [e for e in last.events if e.kind == "quality_backend"]
        why = "still starting when the session ended (waited 0.3 s): it did not say whether it loaded"
        assert ev.data == {"state": "starting", "backend": {"name": "minilm"}, "reason": why}
        assert ("consistency scorer " + why, "warn") in p.take_notes()
        s = summarize({"quality": p.opts.header()}, list(last.events), [])
        assert s is not None and s["state"] == "starting"
        assert render(s) == ["", f"consistency  minilm (semantic): scorer {why}; not measured"]
    finally:
        p.close()


def test_responses_queued_while_the_scorer_starts_say_why_when_it_fails(tmp_path: Path) -> None:
    """A response sampled before the scorer has loaded waits in its queue; when loading then fails, that
    response still gets its ``quality`` event, unscored with the scorer's reason (it was lost before)."""
    slow = tmp_path / "slow-python"  # the scorer's interpreter, one second late: the jobs are queued first
    slow.write_text(f"#!/bin/sh\nsleep 1\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    p = QualityProbe(QualityOptions("minilm:/nonexistent"), t0=time.monotonic(),
                     scorer=ScorerProcess("minilm:/nonexistent", python=str(slow)))
    try:
        for i in (1, 2):
            p.submit({"kind": "self", "id": i, "prompt": "p", "answer": "a", "second": "b"})
        first = p.sample(time.monotonic() - p.t0)
        assert p.scorer.state == "starting" and not [e for e in first.events if e.kind == "quality"]
        assert p.scorer.queued == 2
        got, values = collect(p, "quality", 2)
        assert sorted(e.data["id"] for e in got) == [1, 2]
        for e in got:
            assert e.data["self_consistency"] is None and e.data["relevance"] is None
            assert e.data["reason"] == ("relevance: minilm model /nonexistent: not a folder; "
                                        "self: minilm model /nonexistent: not a folder")
        assert values["quality_unscored_total"] == 4
    finally:
        p.close()
