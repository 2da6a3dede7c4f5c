"""``tuner report --html``: summary card numbers against independent numpy, every figure present or said
missing, no network anywhere, and the page rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.cli import ROOT, assert_one_line_error, tuner
from tests.test_report import MiB, make_trace
from tuner.outputs.html_report import FIGURES, WINDOW_S, trace_windows
from tuner.trace import read_trace

FIGURE_IDS = [f.__name__.removeprefix("fig_") for f in FIGURES]


class Page(HTMLParser):
    """What the page holds: card values, figure sections, plots, missing notes, every URL-bearing attribute."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.card: dict[str, str | None] = {}
        self.card_shown: dict[str, str] = {}
        self.sections: list[str] = []
        self.plots: dict[str, int] = {}
        self.missing: dict[str, str] = {}
        self.tags: set[str] = set()
        self.urls: list[str] = []
        self._section: str | None = None
        self._missing: str | None = None
        self._card_key: str | None = None
        self._in_value = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        for name in ("src", "href", "xlink:href", "action", "data"):
            if a.get(name):
                self.urls.append(str(a[name]))
        if tag == "section" and (a.get("id") or "").startswith("fig-"):
            self._section = str(a["id"])[4:]
            self.sections.append(self._section)
        if tag == "svg" and "plot" in (a.get("class") or "") and self._section:
            self.plots[self._section] = self.plots.get(self._section, 0) + 1
        if tag == "p" and a.get("data-missing"):
            self._missing = str(a["data-missing"])
            self.missing[self._missing] = ""
        if tag == "div" and a.get("data-key"):
            self._card_key = str(a["data-key"])
            self.card[self._card_key] = a.get("data-value")
        if tag == "div" and a.get("class") == "value" and self._card_key:
            self._in_value = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "p":
            self._missing = None
        if tag == "div" and self._in_value:
            self._in_value = False
            self._card_key = None

    def handle_data(self, data: str) -> None:
        if self._missing:
            self.missing[self._missing] += data
        if self._in_value and self._card_key:
            self.card_shown[self._card_key] = self.card_shown.get(self._card_key, "") + data


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Page]:
    d = tmp_path_factory.mktemp("html")
    trace = make_trace(d / "t.jsonl", seconds=120, leak_bytes_per_s=1 * MiB)
    out = d / "t.html"
    cp = tuner("report", str(trace), "--html", str(out))
    assert cp.returncode == 0, cp.stderr
    assert f"wrote {out}" in cp.stderr
    assert "memory trend per minute" in cp.stdout  # the text report still prints
    return trace, out, Page(out.read_text())


def raw(trace: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    return [r for r in recs if r["k"] == "tick"], [r for r in recs if r["k"] == "event" and r["kind"] == "request"]


def check_card_against_numpy(trace: Path, page: Page) -> None:
    """Every number of the summary card, recomputed here from the raw JSON lines with plain numpy."""
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    ticks = [r for r in recs if r["k"] == "tick"]
    reqs = [r for r in recs if r["k"] == "event" and r["kind"] == "request"]
    end = [r for r in recs if r["k"] == "end"]
    d = [r["data"] for r in reqs]

    def card(key: str) -> float:
        v = page.card[key]
        assert v is not None, key
        return float(v)

    def vals(fld: str) -> list[float]:
        return [x[fld] for x in d if x.get(fld) is not None]

    assert card("duration_seconds") == pytest.approx(max([t["t"] for t in ticks] + [e["t"] for e in end]))
    assert card("requests") == len(reqs)
    for key, fld, q in (
        ("ttft_p50_seconds", "ttft_seconds", 50),
        ("ttft_p95_seconds", "ttft_seconds", 95),
        ("tpot_p50_seconds", "tpot_seconds", 50),
        ("tpot_p95_seconds", "tpot_seconds", 95),
    ):
        assert card(key) == pytest.approx(np.percentile(vals(fld), q)), key
    starts = np.array([r["t"] - (x.get("e2e_seconds") or 0.0) for r, x in zip(reqs, d, strict=True)])
    ends = np.array([r["t"] for r in reqs])
    assert card("tokens_per_second") == pytest.approx(sum(vals("tokens")) / (ends.max() - starts.min()))
    for key in ("tree_rss_bytes", "gpu_mem_used_bytes/0", "tree_uss_bytes"):
        got = [t["m"][key] for t in ticks if t["m"].get(key) is not None]
        if got:
            assert card("peak_rss_bytes" if key == "tree_rss_bytes" else f"peak:{key}") == pytest.approx(max(got))
    assert card("seq_rep_4_median") == pytest.approx(np.median(vals("seq_rep_4")))
    assert card("loop_share") == pytest.approx(np.mean(vals("loop")))
    # leak slope per minute: Theil-Sen of the per-stretch minima (memory read as 0 = no live process left out)
    pts = [(t["t"] / 60, t["m"]["tree_rss_bytes"]) for t in ticks if (t["m"].get("tree_rss_bytes") or 0) > 0]
    t = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    edges = np.linspace(t.min(), t.max(), 13)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, 11)
    ex = (edges[:-1] + edges[1:]) / 2
    ey = np.array([y[idx == i].min() for i in range(12)])
    slopes = [(ey[j] - ey[i]) / (ex[j] - ex[i]) for i in range(12) for j in range(i + 1, 12)]
    assert card("leak_per_minute") == pytest.approx(np.median(slopes))


def test_card_numbers_equal_an_independent_numpy_computation(full: tuple[Path, Path, Page]) -> None:
    trace, _, page = full
    check_card_against_numpy(trace, page)
    assert page.card["peak:gpu_mem_used_bytes/0"] is not None
    assert page.card_shown["leak_per_minute"].startswith("leak (+")


@pytest.mark.parametrize(
    "trace",
    [ROOT / "tests" / "data" / "synthetic-demo.jsonl", ROOT / "traces" / "example-demo.jsonl"],
    ids=["synthetic-fixture", "real-demo-recording"],
)
def test_card_numbers_on_the_committed_demo_traces(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.html"
    cp = tuner("report", str(trace), "--html", str(out))
    assert cp.returncode == 0, cp.stderr
    page = Page(out.read_text())
    check_card_against_numpy(trace, page)
    assert not page.missing, page.missing  # a demo run has every figure


def test_windows_equal_an_independent_computation(full: tuple[Path, Path, Page]) -> None:
    trace, _, _ = full
    ticks, reqs = raw(trace)
    w = trace_windows(read_trace(trace))
    n = len(w["start"])
    assert n == 12
    for i in range(n):
        lo, hi = i * WINDOW_S, (i + 1) * WINDOW_S
        inside = [r["data"] for r in reqs if lo <= r["t"] < hi]
        assert w["n_requests"][i] == len(inside)
        assert w["tokens_per_second"][i] == pytest.approx(sum(x["tokens"] for x in inside) / WINDOW_S)
        assert w["rep_mean"][i] == pytest.approx(np.mean([x["seq_rep_4"] for x in inside]))
        batches = {t["m"]["knob_batch_size"] for t in ticks if lo <= t["t"] < hi}
        if len(batches) == 1:
            assert w["batch_size"][i] == batches.pop()
        else:
            assert np.isnan(w["batch_size"][i])


def test_every_figure_is_drawn_and_the_page_needs_no_network(full: tuple[Path, Path, Page]) -> None:
    _, out, page = full
    assert page.sections == FIGURE_IDS
    assert page.plots == dict.fromkeys(FIGURE_IDS, 1), page.missing
    assert not page.missing
    text = out.read_text()
    assert not re.search(r"https?:", text, flags=re.I)  # not even an XML namespace
    assert not re.search(r"//[a-z0-9.-]+\.[a-z]{2,}/", text, flags=re.I)
    assert not ({"script", "img", "link", "iframe", "object", "embed"} & page.tags)
    assert all(u.startswith("#") for u in page.urls), page.urls  # only in-page SVG references
    assert '<table class="actions">' in text and "queue grew at 30 s" in text
    hovers = re.findall(r"<title>(#\d+ [^<]*)</title>", text)  # each action's reason on hover in the knob plot
    assert len(hovers) == 6 and "#1 batch: batch_size 4 -&gt; 8 (applied): queue grew at 30 s" in hovers


@pytest.mark.parametrize(
    ("kw", "missing"),
    [
        (dict(requests=False), {"latency", "throughput", "repetition", "throughput_vs_batch",
                                "repetition_vs_temperature"}),
        (dict(memory=False), {"memory"}),
        (dict(memory=False, gpu=False, knobs=False, requests=False, seconds=0.1),
         set(FIGURE_IDS) - {"utilization"}),
    ],
    ids=["no-requests", "no-memory", "single-tick"],
)  # fmt: skip
def test_bad_input_gives_a_report_that_says_what_is_missing(tmp_path: Path, kw: dict, missing: set[str]) -> None:
    trace = make_trace(tmp_path / "t.jsonl", **{"seconds": 40, **kw})
    out = tmp_path / "t.html"
    cp = tuner("report", str(trace), "--html", str(out))
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    page = Page(out.read_text())
    assert page.sections == FIGURE_IDS
    assert set(page.missing) == missing, page.missing
    for fid, why in page.missing.items():
        assert why.startswith("Missing: no ") or why.startswith("Missing: could not"), (fid, why)
        assert "could not draw" not in why, why
    assert set(page.plots) == set(FIGURE_IDS) - missing
    if "latency" in missing:
        assert page.card_shown["requests"] == "no requests"


def test_html_output_errors_are_one_line(tmp_path: Path) -> None:
    trace = make_trace(tmp_path / "t.jsonl", seconds=5)
    assert "is a directory" in assert_one_line_error(tuner("report", str(trace), "--html", str(tmp_path)))
    err = assert_one_line_error(tuner("report", str(trace), "--html", str(trace / "o.html")))  # parent is a file
    assert "cannot write" in err


BROWSER_OWN_HOSTS = re.compile(r"^https?://([a-z0-9-]+\.)*(google\.com|googleapis\.com|gvt1\.com)(/|$)")
"""Chromium's own background traffic (component updates, time, accounts), not the page's."""


def page_fetches(netlog: Path) -> list[str]:
    urls = set(re.findall(r'"url":"([^"]+)"', netlog.read_text(errors="replace")))
    return sorted(u for u in urls if re.match(r"^(https?|wss?|ftp)://", u) and not BROWSER_OWN_HOSTS.match(u))


@pytest.mark.integration
def test_headless_chromium_renders_every_plot(full: tuple[Path, Path, Page], tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium (Debian package chromium, installed by .ci/run) is not installed")
    _, out, _ = full

    def browse(target: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / ('profile-' + name)}", f"--log-net-log={tmp_path / (name + '.net.json')}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", *extra, target.as_uri()]  # fmt: skip
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stderr[-2000:]
        return cp

    # control: the checks below do see a console error and a fetch when a page has them
    control = tmp_path / "control.html"
    control.write_text('<html><body><script>console.error("ctl")</script><img src="http://example.invalid/x.png">')
    cp = browse(control, "control", "--dump-dom")
    assert "CONSOLE" in cp.stderr and page_fetches(tmp_path / "control.net.json") == ["http://example.invalid/x.png"]

    dom = browse(out, "report", "--dump-dom")
    page = Page(dom.stdout)
    assert page.sections == FIGURE_IDS
    assert page.plots == dict.fromkeys(FIGURE_IDS, 1)
    for fid in FIGURE_IDS:  # every plot has drawn content
        block = dom.stdout.split(f'id="fig-{fid}"', 1)[1].split("</section>", 1)[0]
        assert block.count("<path") > 10, fid
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    assert page_fetches(tmp_path / "report.net.json") == []
    png = tmp_path / "shot.png"
    browse(out, "shot", "--window-size=1300,3000", f"--screenshot={png}")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000


def test_decimate_keeps_extremes_and_order() -> None:
    from tuner.outputs.html_report import decimate

    rng = np.random.default_rng(0)
    x = np.arange(100_000) * 0.1
    y = np.cumsum(rng.normal(size=x.size))
    y[12_345] = 1e6  # a one-sample spike must survive
    y[777] = np.nan
    dx, dy = decimate(x, y, 500)
    assert dx.size <= 1000
    assert np.all(np.diff(dx) >= 0)
    assert dy.max() == 1e6 and dy.min() == np.nanmin(y)
    sx, sy = decimate(x[:50], y[:50], 500)  # short series pass through (finite points only)
    assert sx.size == 50 and np.array_equal(sy, y[:50])
