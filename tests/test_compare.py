"""``tuner compare A B``: ratios B/A per figure with verdicts; a figure only one side has shows as missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_error, tuner
from tests.test_report import MiB, make_trace
from tests.test_report_html import FIGURE_IDS, Page


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cmp")
    a = make_trace(d / "a.jsonl", seconds=90, leak_bytes_per_s=1 * MiB)
    b = make_trace(d / "b.jsonl", seconds=45, gpu=False, requests=False, knobs=False, seed=5)  # fewer metrics
    return a, b


def peak_rss(path: Path) -> float:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return max(r["m"]["tree_rss_bytes"] for r in recs if r["k"] == "tick")


def test_compare_json_keeps_figures_one_side_lacks(pair: tuple[Path, Path]) -> None:
    a, b = pair
    cp = tuner("compare", "--json", str(a), str(b))
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["a"] == str(a) and res["b"] == str(b)
    figs = {f["id"]: f for f in res["figures"]}
    assert list(figs) == FIGURE_IDS  # nothing dropped
    for fid in ("latency", "throughput", "repetition", "knobs", "throughput_vs_batch", "repetition_vs_temperature"):
        assert figs[fid]["verdict"] == "missing in B", fid
        assert figs[fid]["a_missing"] is None and figs[fid]["b_missing"].startswith("no "), fid
        assert all(n["verdict"] == "missing in B" and n["a"] is not None for n in figs[fid]["numbers"]), fid
    mem = {n["label"]: n for n in figs["memory"]["numbers"]}
    expect = peak_rss(b) / peak_rss(a)
    assert mem["peak tree RSS"]["ratio"] == pytest.approx(expect)
    assert mem["peak tree RSS"]["verdict"] == ("better in B" if expect < 0.95 else "about the same")
    assert mem["peak gpu_mem_used_bytes/0"]["verdict"] == "missing in B"
    util = {n["label"]: n for n in figs["utilization"]["numbers"]}
    assert util["median gpu_util_ratio/0"]["b"] is None and util["median tree_cpu_ratio"]["ratio"] is not None


def test_compare_verdicts_follow_the_direction_of_better(tmp_path: Path) -> None:
    """B is A with every latency halved: latency is better in B, throughput unchanged."""
    a = make_trace(tmp_path / "a.jsonl", seconds=40)
    lines = []
    for line in a.read_text().splitlines():
        r = json.loads(line)
        if r["k"] == "event" and r["kind"] == "request":
            r["data"]["ttft_seconds"] /= 2
            r["data"]["tpot_seconds"] /= 2
        lines.append(json.dumps(r))
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(lines) + "\n")
    res = json.loads(tuner("compare", "--json", str(a), str(b)).stdout)
    figs = {f["id"]: f for f in res["figures"]}
    lat = {n["label"]: n for n in figs["latency"]["numbers"]}
    assert lat["TTFT p50"]["ratio"] == pytest.approx(0.5)
    assert lat["TPOT p95"]["verdict"] == "better in B"
    assert figs["latency"]["verdict"] == "better in B"
    assert figs["throughput"]["verdict"] == "about the same"
    assert figs["memory"]["verdict"] == "about the same"


def test_compare_text_and_html_side_by_side(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    out = tmp_path / "cmp.html"
    cp = tuner("compare", str(a), str(b), "--html", str(out))
    assert cp.returncode == 0, cp.stderr
    assert "peak tree RSS" in cp.stdout and "missing in B" in cp.stdout and "B/A" in cp.stdout
    text = out.read_text()
    page = Page(text)
    assert page.sections == FIGURE_IDS
    # every figure has two sides: A always drawn here, B drawn or said missing
    assert page.plots["memory"] == 2 and page.plots["utilization"] == 2
    assert page.plots["latency"] == 1 and "latency" in page.missing
    assert text.count('class="side"') == len(FIGURE_IDS)
    assert "http:" not in text and "https:" not in text
    assert "<table id='ratios'>" in text
    ratio = peak_rss(b) / peak_rss(a)
    assert f"<td class='num'>{ratio:.3g}</td>" in text


def test_compare_bad_inputs_are_one_line_errors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = pair
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert "empty file" in assert_one_line_error(tuner("compare", str(a), str(empty)))
    assert "no such file" in assert_one_line_error(tuner("compare", str(tmp_path / "x.jsonl"), str(a)))
    assert "is a directory" in assert_one_line_error(tuner("compare", str(a), str(a), "--html", str(tmp_path)))


def test_single_tick_traces_compare_without_errors(tmp_path: Path) -> None:
    a = make_trace(tmp_path / "a.jsonl", seconds=0.1, requests=False, knobs=False)
    b = make_trace(tmp_path / "b.jsonl", seconds=0.1, requests=False, knobs=False, seed=3)
    cp = tuner("compare", "--json", str(a), str(b))
    assert cp.returncode == 0, cp.stderr
    figs = {f["id"]: f for f in json.loads(cp.stdout)["figures"]}
    assert figs["latency"]["verdict"] == "missing in both"
    mem = {n["label"]: n for n in figs["memory"]["numbers"]}
    assert mem["RSS floor slope per minute"]["verdict"] == "missing in both"
    assert np.isfinite(mem["peak tree RSS"]["ratio"])


@pytest.mark.parametrize(
    ("a", "b", "better", "ratio", "verdict"),
    [
        (100.0, 50.0, "lower", 0.5, "better in B"),
        (100.0, 200.0, "higher", 2.0, "better in B"),
        (100.0, 103.0, "lower", 1.03, "about the same"),
        (100.0, 50.0, None, 0.5, "lower in B"),
        (-2.0, -1.0, "lower", 0.5, "worse in B"),  # a falling slope that falls less: higher, so worse
        (59.0, -1.8, "lower", None, "better in B"),  # sign change: no ratio, judged by value
        (0.0, 0.0, "lower", None, "about the same"),
        (None, 1.0, "lower", None, "missing in A"),
        (1.0, None, "lower", None, "missing in B"),
    ],
)
def test_verdict_rules(a: float | None, b: float | None, better: str | None, ratio: float | None, verdict: str) -> None:
    from tuner.outputs.html_report import _verdict

    got_ratio, got_verdict = _verdict(a, b, better)
    assert got_verdict == verdict
    assert got_ratio == (pytest.approx(ratio) if ratio is not None else None)


def test_numbers_do_not_depend_on_drawing(pair: tuple[Path, Path]) -> None:
    from tuner.outputs.html_report import compare
    from tuner.outputs.report import summarize
    from tuner.trace import read_trace

    a, b = (read_trace(p) for p in pair)
    sa, sb = summarize(a), summarize(b)
    drawn, pairs = compare(a, sa, b, sb, draw=True)
    quick, qpairs = compare(a, sa, b, sb, draw=False)
    assert drawn == quick
    assert all(x.svg == "" or x.svg is None for x, _ in qpairs)
    assert all(x.svg for x, _ in pairs if x.missing is None)
