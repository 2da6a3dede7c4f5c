"""What the policies achieve on the real demo model (issue 4, section 8): as ratios against baselines run in
the same session, through the real ``tuner demo`` CLI; figures read back from the traces.  One run each,
except the batch size without an SLO: ``TUNER_EFFECT_BATCH_ROUNDS`` interleaved rounds judged on the median
ratio (one run each could not tell batch 54 from 64 on this shared host).

``.venv/bin/pytest tests/bench/test_bench_effects.py -m bench -p no:randomly -s``

Each test prints its table and replaces its own section of ``docs/effects.md`` (so one test can be rerun
alone with ``-k``), then asserts the goals: a goal not met fails the test after the figures are written.

Scale (the defaults take ~48 minutes on 2 shared cores: leak 7, batch 23, temperature 16, precision 1.5;
the issue asked for ~25: lower the knobs below):

- ``TUNER_EFFECT_REQUESTS``: requests per leak run (default 1000; the issue asks 2,000: the three leak runs
  then take ~14 minutes instead of 7).
- ``TUNER_EFFECT_SECONDS``: seconds of arrivals of a fixed batch-size run (default 30); tuned batch runs last
  ``TUNER_EFFECT_TUNED_SECONDS`` (default 210); ``TUNER_EFFECT_BATCH_ROUNDS`` rounds of the no-SLO batch
  comparison (default 3: the batch part takes ~23 minutes, ~13 with 1).  Every temperature baseline runs
  ``TUNER_EFFECT_TEMP_SECONDS`` (120), the tuned temperature run ``TUNER_EFFECT_TEMP_TUNED_SECONDS`` (300: 24
  windows after the warm-up instead of 6; the temperature part takes ~16 minutes).
- ``TUNER_EFFECT_DOC``: where the sections go (default ``docs/effects.md``; empty: nowhere).
- ``TUNER_EFFECT_KEEP``: a directory to keep the traces in (default: pytest's temporary directory).

Definitions (all computed from the trace's ``request`` events and samples):

- *Throughput*: the demo forms static batches; requests of one batch share a start time (end - e2e +
  queue), so whole batches are grouped and throughput = their tokens / (start of the batch after the last
  one - start of the first one).  The first batch (warm-up) and batches started in the first
  ``SETTLE_S`` of a window are left out.
- *Service TTFT*: TTFT minus the time queued (what the batch size costs; under overload the queue dwarfs
  it), p95.
- *RSS floor*: the minimum of ``tree_rss_bytes`` over a slice of the run (the leak detector also reads the
  lower envelope); growth = floor over the last 20% of requests / floor over the first 20% - 1.
- *Repetition windows*: responses grouped by end time into ``TEMP_WINDOW_S`` windows (at least 5 each);
  a window is in the band when its mean seq-rep-4 is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomli: a dependency before 3.11
    import tomli as tomllib

from tuner.policies.cleanup import LEAK_TRIGGERS
from tuner.trace import TraceData, read_trace

pytestmark = [pytest.mark.bench, pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "policies" / "presets"
LEAK_REQUESTS = int(os.environ.get("TUNER_EFFECT_REQUESTS", "1000"))
FIXED_S = float(os.environ.get("TUNER_EFFECT_SECONDS", "30"))
TUNED_S = float(os.environ.get("TUNER_EFFECT_TUNED_SECONDS", "210"))
DOC = os.environ.get("TUNER_EFFECT_DOC", str(ROOT / "docs" / "effects.md"))
SETTLE_S = 3.0
TEMP_WINDOW_S = 10.0
TEMP_WARMUP_S = 60.0
BATCH_RATE = 40.0  # arrivals per second: over capacity at every batch size here (queue full, rejections)
TEMP_RATE = 5.0
REQUESTED_T = 0.5
TEMP_S = float(os.environ.get("TUNER_EFFECT_TEMP_SECONDS", "120"))
TEMP_TUNED_S = float(os.environ.get("TUNER_EFFECT_TEMP_TUNED_SECONDS", "300"))
"""The tuned temperature run: its goal counts the windows after the warm-up, 6 of them in 120 s (one window
out of the band is then 17 points); 300 s give 24.  Its first ``TEMP_S`` are shown apart, on the prompts the
baselines saw."""
"""Every temperature run (tuned and baselines) lasts this long: the seeded prompt stream is the same only over
the same length (45 s baselines saw the first 236 prompts, the tuned run 1,049)."""
SWEEP = (1, 2, 4, 8, 16, 32, 64)
COMMAND = "TUNER_EFFECT_REQUESTS={r} .venv/bin/pytest tests/bench/test_bench_effects.py -m bench -p no:randomly -s"


def tuner_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TUNER_SOCKET", None)
    return env


# -- running the real CLI ------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    trace: Path
    returncode: int
    wall_s: float
    data: TraceData
    report: dict[str, Any]
    stderr: str
    stdout: str = ""

    def workload(self) -> dict[str, Any]:
        """The workload's own summary line (its counts: arrived, done, rejected, failed; its capacity)."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{") and '"workload"' in ln]
        return json.loads(lines[-1]) if lines else {}

    def requests(self) -> list[dict[str, Any]]:
        out = []
        for e in self.data.requests():
            d = dict(e.data)
            d["t"] = e.t
            out.append(d)
        return out

    def actions(self, knob: str | None = None) -> list[dict[str, Any]]:
        return [a for a in self.data.actions if knob is None or a.get("knob") == knob]


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keep = os.environ.get("TUNER_EFFECT_KEEP")
    if keep:
        p = Path(keep)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("effects")


def write_policy(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """A policy TOML from plain tables (values: numbers, bools, strings, lists, one-level dicts)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {val(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def preset_table(preset: str, table: str) -> dict[str, Any]:
    with open(PRESETS / f"{preset}.toml", "rb") as f:
        return dict(tomllib.load(f).get(table, {}))


def run_demo(
    dirpath: Path, name: str, args: Iterable[str], *, stop_after: float | None = None, timeout: float = 900,
    report: bool = True,
) -> Run:
    """``tuner demo --headless`` with ``args``; SIGINT after ``stop_after`` seconds (as Ctrl-C would)."""
    trace = dirpath / f"{name}.jsonl"
    trace.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tuner", "demo", "--headless", "--quiet", "--trace", str(trace), *args]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tuner_env(), cwd=dirpath)
    try:
        if stop_after is not None:
            try:
                p.wait(timeout=stop_after)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    wall = time.monotonic() - t0
    assert "Traceback" not in err, err
    doc: dict[str, Any] = {}
    if report:
        rep = subprocess.run(
            [sys.executable, "-m", "tuner", "report", "--json", str(trace)],
            capture_output=True, text=True, env=tuner_env(), timeout=300,
        )
        assert rep.returncode == 0, rep.stderr
        doc = json.loads(rep.stdout)
    run = Run(name, trace, p.returncode, wall, read_trace(trace), doc, err, out)
    print(f"  [{name}] {wall:.0f} s, exit {p.returncode}, {len(run.requests())} requests", flush=True)
    return run


# -- figures from a trace ---------------------------------------------------------------------------------
@dataclass
class Batch:
    start: float
    tokens: int
    size: int
    service_ttft: list[float] = field(default_factory=list)


def batches(requests: list[dict[str, Any]]) -> list[Batch]:
    """Requests grouped into the static batches they ran in (same start time within 1 ms)."""
    rows = []
    for r in requests:
        e2e, q = r.get("e2e_seconds"), r.get("queue_seconds")
        if e2e is None or q is None:
            continue
        rows.append((r["t"] - e2e + q, r))
    rows.sort(key=lambda x: x[0])
    out: list[Batch] = []
    for start, r in rows:
        if not out or start - out[-1].start > 1e-3:
            out.append(Batch(start, 0, 0))
        b = out[-1]
        b.tokens += int(r.get("tokens") or 0)
        b.size += 1
        if r.get("ttft_seconds") is not None:
            b.service_ttft.append(max(0.0, r["ttft_seconds"] - r["queue_seconds"]))
    return out


@dataclass
class Throughput:
    tokens_per_second: float | None
    batches: int
    service_ttft_p95: float | None
    mean_batch: float | None
    tokens_per_cpu_second: float | None = None


def cpu_seconds(data: TraceData | None, a: float, b: float) -> float | None:
    """CPU seconds the inference process tree used in [a, b] (``tree_cpu_ratio`` integrated)."""
    if data is None:
        return None
    t, cpu = data.times, data.column("tree_cpu_ratio")
    m = (t >= a) & (t <= b) & np.isfinite(cpu)
    if int(m.sum()) < 2:
        return None
    tt, cc = t[m], cpu[m]
    return float(np.sum((cc[1:] + cc[:-1]) / 2 * np.diff(tt)))


def throughput(
    requests: list[dict[str, Any]], since: float, until: float = float("inf"), data: TraceData | None = None
) -> Throughput:
    """Whole batches started in [since, until), the first one of the run excluded."""
    bs = batches(requests)[1:]
    idx = [i for i, b in enumerate(bs) if since <= b.start < until]
    if len(idx) < 2:
        return Throughput(None, len(idx), None, None)
    used = idx[:-1]  # the last one's end is the next one's start: it needs a successor
    a, b = bs[used[0]].start, bs[idx[-1]].start
    span = b - a
    tok = sum(bs[i].tokens for i in used)
    ttft = [x for i in used for x in bs[i].service_ttft]
    cpu = cpu_seconds(data, a, b)
    return Throughput(
        tok / span if span > 0 else None,
        len(used),
        float(np.percentile(ttft, 95)) if ttft else None,
        statistics.fmean(bs[i].size for i in used),
        tok / cpu if cpu else None,
    )


def failed_requests(run: Run) -> int:
    return int((run.report.get("requests") or {}).get("failed") or 0)


def fmt(v: Any, spec: str = ".0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def ok(met: bool) -> str:
    return "met" if met else "**not met**"


# -- docs/effects.md ---------------------------------------------------------------------------------------
HEAD = """# Effects of the policies on the demo model

Measured by `tests/bench/test_bench_effects.py` (issue 4, section 8): every figure is one run of the real
`tuner demo` CLI, read back from its trace, and compared with baselines run in the same session.  Machine:
2 CPU cores shared with other jobs, no GPU; torch on CPU.  Absolute figures swing with the other jobs;
read the ratios.  Each section says how to rerun it.
"""


def write_section(key: str, text: str) -> None:
    print("\n" + text, flush=True)
    if not DOC:
        return
    path = Path(DOC)
    doc = path.read_text() if path.exists() else HEAD
    begin, end = f"<!-- effects:{key} -->", f"<!-- /effects:{key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        doc = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        order = ["heldout", "repeats", "leak-shapes", "leak", "batch", "temperature", "precision"]
        doc = doc.rstrip() + "\n\n" + block + "\n"
        # keep the sections in a stable order
        parts = {k: re.search(f"<!-- effects:{k} -->.*?<!-- /effects:{k} -->", doc, flags=re.S) for k in order}
        found = [(k, m.group(0)) for k, m in parts.items() if m]
        for _, blk in found:
            doc = doc.replace(blk, "")
        doc = doc.rstrip() + "\n\n" + "\n\n".join(b for _, b in found) + "\n"
    path.write_text(re.sub(r"\n{3,}", "\n\n", doc))


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def timed(benchmark: Any, fn: Callable[[], Any]) -> Any:
    """One round through pytest-benchmark (it records the wall time of the whole experiment)."""
    return benchmark.pedantic(fn, rounds=1, iterations=1)


# -- leak ---------------------------------------------------------------------------------------------------
LEAK_POLICY: dict[str, dict[str, Any]] = {
    "agent": {"cooldown_s": {"cleanup": 5}},
    "cleanup": {"leak_watch": True, "min_requests": 150, "check_every_s": 10.0, "sample_every_s": 0.5},
}
LEAK_RATE = 10.0


@dataclass
class Rss:
    start_floor: float
    end_floor: float
    peak: float
    mean: float

    @property
    def growth(self) -> float:
        return self.end_floor / self.start_floor - 1.0


def rss_figures(run: Run) -> Rss:
    """RSS floors over the first and last 20% of the run's requests (by end time)."""
    ends = sorted(r["t"] for r in run.requests())
    assert len(ends) >= 20, f"{run.name}: only {len(ends)} requests finished"
    t, rss = run.data.times, run.data.column("tree_rss_bytes")
    keep = np.isfinite(rss) & (rss > 0)
    t, rss = t[keep], rss[keep]
    n = len(ends)
    first = (t >= ends[0]) & (t <= ends[n // 5])
    last = (t >= ends[-(n // 5)]) & (t <= ends[-1])
    during = (t >= ends[0]) & (t <= ends[-1])
    return Rss(float(rss[first].min()), float(rss[last].min()), float(rss[during].max()), float(rss[during].mean()))


TOOK = ("applied", "clamped", "sent", "pending")
"""Outcomes of an action that was carried out (``tuner.core.agent.CARRIED_OUT`` less ``dry-run``): a command to the
inference process (cleanup, precision) is ``sent`` and its result comes back as ``done`` / ``refused``.  Before
this, cleanups and precision steps were counted on ``applied`` / ``clamped`` only, which such commands have not
been since c3b7a52 (2026-12-03 12:21 UTC).  Checked on the kept traces: H7's and H8's (all 168 runs) and 36 of H6's
hold no cleanup or precision action at all, so their zero counts stand; earlier sets' traces were not kept."""


def cleanups(run: Run) -> list[dict[str, Any]]:
    """Cleanup commands the policy sent, with their results joined."""
    acts = run.actions("cleanup")
    sent = [a for a in acts if a.get("outcome") in TOOK]
    done = [a for a in acts if a.get("outcome") in ("done", "refused")]
    for i, a in enumerate(sent):
        a["reclaimed"] = (done[i].get("result") or {}).get("reclaimed_bytes") if i < len(done) else None
    return sent


def test_leak_cleanup(trace_dir: Path, benchmark: Any) -> None:
    policy = write_policy(trace_dir / "leak.toml", LEAK_POLICY)
    base = ["--requests", str(LEAK_REQUESTS), "--rate", f"{LEAK_RATE:g}"]

    def experiment() -> dict[str, Run]:
        return {
            "uncontrolled": run_demo(trace_dir, "leak-uncontrolled", [*base, "--leak"]),
            "cleanup": run_demo(trace_dir, "leak-cleanup", [*base, "--leak", "--policy", str(policy)]),
            "no-leak": run_demo(trace_dir, "noleak-cleanup", [*base, "--policy", str(policy)]),
        }

    runs = timed(benchmark, experiment)
    rows = []
    fig: dict[str, tuple[Rss, list[dict[str, Any]]]] = {}
    for key, run in runs.items():
        rss = rss_figures(run)
        cl = cleanups(run)
        fig[key] = (rss, cl)
        leak_cl = [c for c in cl if (c.get("evidence") or {}).get("trigger") in LEAK_TRIGGERS]
        reclaimed = [c["reclaimed"] for c in cl if isinstance(c.get("reclaimed"), (int, float))]
        rows.append(
            f"| {key} | {len(run.requests())} | {rss.start_floor / 2**20:.0f} | {rss.end_floor / 2**20:.0f} | "
            f"{rss.growth:+.1%} | {rss.peak / rss.start_floor - 1:+.0%} | {rss.mean / rss.start_floor - 1:+.0%} | "
            f"{len(cl)} ({len(leak_cl)} leak-triggered) | "
            f"{fmt(statistics.fmean(reclaimed) / 2**20 if reclaimed else None, '.0f')} | {run.returncode} |"
        )
    unc, ctl = fig["uncontrolled"][0], fig["cleanup"][0]
    false_leak = [c for c in fig["no-leak"][1] if (c.get("evidence") or {}).get("trigger") in LEAK_TRIGGERS]
    goals = [
        ("uncontrolled RSS growth >= 20%", f"{unc.growth:+.1%}", unc.growth >= 0.20),
        ("with the cleanup policy <= 3%", f"{ctl.growth:+.1%}", ctl.growth <= 0.03),
        ("no false cleanup storm without --leak (leak-triggered cleanups: 0)", str(len(false_leak)),
         len(false_leak) == 0),
    ]
    text = "\n".join(
        [
            "## Leak: cleanup policy against the injected leak",
            "",
            f"{stamp()}. `tuner demo --requests {LEAK_REQUESTS} --rate {LEAK_RATE:g} [--leak] [--policy leak.toml]` "
            f"({LEAK_REQUESTS} requests per run: the issue's 2,000 scaled to keep the whole benchmark near 25 "
            "minutes; `TUNER_EFFECT_REQUESTS=2000` restores it).  `--leak` keeps every request's KV tensors in a "
            "never-evicted prefix cache (~1 MB a request).  Policy file (cleanup only, leak-triggered, no "
            "periodic cleanup):",
            "",
            "```toml",
            (trace_dir / "leak.toml").read_text().strip(),
            "```",
            "",
            "RSS floor = minimum of the process tree's RSS over the first / last 20% of the requests (the "
            "lower envelope, as the leak test reads it); peak and mean are over the whole serving time, "
            "relative to the first floor.",
            "",
            "| run | requests | floor first 20% (MiB) | floor last 20% (MiB) | floor growth | peak | mean | "
            "cleanups | mean reclaimed (MiB) | exit |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "| goal | measured | |",
            "|---|---|---|",
            *[f"| {g} | {m} | {ok(b)} |" for g, m, b in goals],
            "",
            f"Reproduce: `{COMMAND.format(r=LEAK_REQUESTS)} -k leak_cleanup`",
        ]
    )
    write_section("leak", text)
    for run in runs.values():
        assert run.returncode == 0, (run.name, run.stderr[-2000:])
    assert [g for g, _, b in goals if not b] == []


# -- batch size -----------------------------------------------------------------------------------------------
def batch_policy(slo: float | None) -> dict[str, dict[str, Any]]:
    t = preset_table("interactive", "batch_size")
    if slo is None:
        t["slo_ttft_p95_s"] = False
    else:
        t["slo_ttft_p95_s"] = slo
    agent = preset_table("interactive", "agent")
    return {"agent": agent, "batch_size": t}


@dataclass
class Tuned:
    run: Run
    final: int | None
    windows: int | None
    reached_s: float | None
    hold: Throughput
    changes: int
    measured: str = "-"


def tuned_figures(run: Run) -> Tuned:
    """What the batch policy settled on: its last change.  Decision windows = the batch sizes it applied up to
    then, the starting one included: each applied size opens one measurement window (a size measured again
    to confirm the knee counts again; the last one is the window at the size it holds)."""
    acts = [a for a in run.actions("batch_size") if a.get("outcome") in TOOK]
    reqs = run.requests()
    first = min((r["t"] - r["e2e_seconds"] for r in reqs if r.get("e2e_seconds") is not None), default=0.0)
    if not acts:
        return Tuned(run, None, None, None, throughput(reqs, first + SETTLE_S, data=run.data), 0)
    last = acts[-1]
    ev = last.get("evidence") or {}
    seen = ", ".join(f"{b}: {round(m.get('tok_s') or 0)}" + (f" (x{m['windows']})" if (m.get("windows") or 1) > 1
                                                             else "")
                     for b, m in sorted((ev.get("measured") or {}).items(), key=lambda kv: int(kv[0])))
    return Tuned(run, int(last["value"]), len(acts), last["t"] - first,
                 throughput(reqs, last["t"] + SETTLE_S, data=run.data), len(acts), seen or "-")


def fixed_figures(run: Run) -> Throughput:
    reqs = run.requests()
    first = min((r["t"] - r["e2e_seconds"] for r in reqs if r.get("e2e_seconds") is not None), default=0.0)
    return throughput(reqs, first + SETTLE_S, data=run.data)


BATCH_ROUNDS = int(os.environ.get("TUNER_EFFECT_BATCH_ROUNDS", "3"))
"""Rounds of the no-SLO comparison: round 1 sweeps every size; later rounds rerun round 1's best fixed size
and the tuned run, alternating their order (one run each could not tell 54 from 64 here)."""


def test_batch_size(trace_dir: Path, benchmark: Any) -> None:
    slo = float(preset_table("interactive", "batch_size")["slo_ttft_p95_s"])
    pol_free = write_policy(trace_dir / "batch.toml", batch_policy(None))
    pol_slo = write_policy(trace_dir / "batch-slo.toml", batch_policy(slo))
    common = ["--rate", f"{BATCH_RATE:g}"]

    def fixed(b: int, rnd: int = 1) -> Run:
        secs = FIXED_S * (2.5 if b >= 64 else 1.5 if b >= 32 else 1.0)  # >= 4 whole batches (64: ~13 s each)
        return run_demo(trace_dir, f"batch-fixed-{b}" + (f"-r{rnd}" if rnd > 1 else ""),
                        [*common, "--duration", f"{secs + 60:g}", "--batch-size", str(b)], stop_after=secs + 6)

    def tuned(name: str, pol: Path) -> Run:
        return run_demo(trace_dir, name, [*common, "--duration", f"{TUNED_S + 60:g}", "--policy", str(pol)],
                        stop_after=TUNED_S + 6)

    def per_cpu(t: Throughput | None) -> float | None:
        return t.tokens_per_cpu_second if t is not None else None

    def experiment() -> tuple[dict[int, Run], Run, Run, list[tuple[int, Run, Run, str]]]:
        # interleaved so a change in the machine's other load hits baselines and tuned runs alike
        order: list[int | str] = [8, 1, 64, "free", 2, 32, 4, 16, "slo"]
        fixed_runs: dict[int, Run] = {}
        runs: dict[str, Run] = {}
        for item in order:
            if isinstance(item, int):
                fixed_runs[item] = fixed(item)
            else:
                runs[item] = tuned(f"batch-tuned-{item}", pol_free if item == "free" else pol_slo)
        # later rounds: round 1's best fixed size (per CPU-second) against the tuned run, order alternating
        cand = {b: per_cpu(fixed_figures(r)) for b, r in fixed_runs.items()}
        top = max((b for b, v in cand.items() if v is not None), key=lambda b: cand[b] or 0.0, default=max(SWEEP))
        more: list[tuple[int, Run, Run, str]] = []
        for rnd in range(2, BATCH_ROUNDS + 1):
            if rnd % 2 == 0:
                tr = tuned(f"batch-tuned-free-r{rnd}", pol_free)
                fr = fixed(top, rnd)
                more.append((top, fr, tr, "tuned, fixed"))
            else:
                fr = fixed(top, rnd)
                tr = tuned(f"batch-tuned-free-r{rnd}", pol_free)
                more.append((top, fr, tr, "fixed, tuned"))
        return fixed_runs, runs["free"], runs["slo"], more

    fixed_runs, free_run, slo_run, more = timed(benchmark, experiment)
    sweep: dict[int, Throughput] = {b: fixed_figures(run) for b, run in fixed_runs.items()}

    def wall(t: Throughput | None) -> float | None:
        return t.tokens_per_second if t is not None else None

    def best(metric: Callable[[Throughput | None], float | None], slo_only: bool) -> int | None:
        cand = [b for b, t in sweep.items() if metric(t) is not None
                and (not slo_only or (t.service_ttft_p95 is not None and t.service_ttft_p95 <= slo))]
        return max(cand, key=lambda b: metric(sweep[b]) or 0.0) if cand else None

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    assert best(wall, False) is not None, "no fixed batch size gave a throughput"
    largest = max(SWEEP)
    free, withslo = tuned_figures(free_run), tuned_figures(slo_run)
    sweep_rows = [
        f"| {b} | {fmt(t.tokens_per_second)} | {fmt(t.tokens_per_cpu_second)} | {fmt(t.service_ttft_p95, '.2f')} | "
        f"{t.batches} | {'yes' if t.service_ttft_p95 is not None and t.service_ttft_p95 <= slo else 'no'} | "
        f"{fixed_runs[b].returncode} |"
        for b, t in sorted(sweep.items())
    ]
    tuned_rows = []
    crashes = sum(1 for r in [*fixed_runs.values(), free_run, slo_run, *(x for _, f, t, _ in more for x in (f, t))]
                  if r.returncode != 0)
    round_rows = []
    free_ratios: list[tuple[float | None, float | None]] = []  # (per CPU-s, wall) per round
    free_windows: list[int | None] = []
    for label, tf, slo_only in (("no SLO", free, False), (f"TTFT p95 <= {slo:g} s", withslo, True)):
        bw, bc = best(wall, slo_only), best(per_cpu, slo_only)
        r_wall = ratio(wall(tf.hold), wall(sweep.get(bw) if bw is not None else None))
        r_cpu = ratio(per_cpu(tf.hold), per_cpu(sweep.get(bc) if bc is not None else None))
        tuned_rows.append(
            f"| {label} (round 1) | {fmt(tf.final, 'd')} | {fmt(tf.windows, 'd')} | {fmt(tf.reached_s)} | "
            f"{fmt(tf.hold.tokens_per_second)} | {fmt(tf.hold.tokens_per_cpu_second)} | "
            f"{fmt(tf.hold.service_ttft_p95, '.2f')} | {fmt(bw, 'd')} / {fmt(bc, 'd')} | "
            f"{fmt(r_wall, '.2f')} / {fmt(r_cpu, '.2f')} | "
            f"{fmt(ratio(wall(tf.hold), wall(sweep.get(largest))), '.2f')} / "
            f"{fmt(ratio(per_cpu(tf.hold), per_cpu(sweep.get(largest))), '.2f')} | "
            f"{fmt(ratio(wall(tf.hold), wall(sweep.get(8))), '.2f')} / "
            f"{fmt(ratio(per_cpu(tf.hold), per_cpu(sweep.get(8))), '.2f')} |"
        )
        if not slo_only:
            fb = sweep.get(bc) if bc is not None else None
            r1_wall = ratio(wall(tf.hold), wall(fb))  # against the same fixed run as per CPU-second
            free_ratios.append((r_cpu, r1_wall))
            free_windows.append(tf.windows)
            round_rows.append(
                f"| 1 | sweep, tuned at position 4 | {fmt(tf.final, 'd')} | {fmt(tf.windows, 'd')} | "
                f"{fmt(tf.reached_s)} | {tf.measured} | {fmt(tf.hold.tokens_per_second)} / "
                f"{fmt(tf.hold.tokens_per_cpu_second)} | {fmt(bc, 'd')} | {fmt(wall(fb))} / {fmt(per_cpu(fb))} | "
                f"{fmt(r1_wall, '.2f')} / {fmt(r_cpu, '.2f')} |"
            )
    for rnd, (b, fr, tr, how) in enumerate(more, start=2):
        tf, fb = tuned_figures(tr), fixed_figures(fr)
        r_cpu, r_wall = ratio(per_cpu(tf.hold), per_cpu(fb)), ratio(wall(tf.hold), wall(fb))
        free_ratios.append((r_cpu, r_wall))
        free_windows.append(tf.windows)
        round_rows.append(
            f"| {rnd} | {how} | {fmt(tf.final, 'd')} | {fmt(tf.windows, 'd')} | {fmt(tf.reached_s)} | {tf.measured} | "
            f"{fmt(tf.hold.tokens_per_second)} / {fmt(tf.hold.tokens_per_cpu_second)} | {b} | "
            f"{fmt(wall(fb))} / {fmt(per_cpu(fb))} | {fmt(r_wall, '.2f')} / {fmt(r_cpu, '.2f')} |"
        )
    cpu_r = [c for c, _ in free_ratios if c is not None]
    wall_r = [w for _, w in free_ratios if w is not None]
    # a round without a figure (no whole batch after the last change) counts as a miss, not as absent
    med_cpu = statistics.median([c if c is not None else 0.0 for c, _ in free_ratios]) if free_ratios else None
    med_wall = statistics.median(wall_r) if wall_r else None
    worst_windows = max((w if w is not None else 99) for w in free_windows) if free_windows else None
    goals = [
        (f"no SLO: tuned >= 95% of the best fixed batch, median of {len(free_ratios)} rounds per CPU-second "
         "(wall-clock in brackets)",
         f"{fmt(med_cpu, '.0%')} ({fmt(med_wall, '.0%')}); rounds {', '.join(fmt(c, '.0%') for c in cpu_r)}",
         med_cpu is not None and med_cpu >= 0.95),
        ("no SLO: settled within 10 decision windows (every round)",
         ", ".join(fmt(w, "d") for w in free_windows), worst_windows is not None and worst_windows <= 10),
    ]
    bc = best(per_cpu, True)
    r_cpu = ratio(per_cpu(withslo.hold), per_cpu(sweep.get(bc) if bc is not None else None))
    bw = best(wall, True)
    r_wall = ratio(wall(withslo.hold), wall(sweep.get(bw) if bw is not None else None))
    ok_slo = withslo.hold.service_ttft_p95 is not None and withslo.hold.service_ttft_p95 <= slo
    goals += [
        (f"TTFT p95 <= {slo:g} s: tuned >= 95% of the best fixed batch within the SLO, per CPU-second (wall-clock "
         "in brackets; round 1 only)", f"{fmt(r_cpu, '.0%')} ({fmt(r_wall, '.0%')})",
         r_cpu is not None and r_cpu >= 0.95),
        (f"TTFT p95 <= {slo:g} s: the tuned batch meets the SLO", fmt(withslo.hold.service_ttft_p95, ".2f"), ok_slo),
        (f"TTFT p95 <= {slo:g} s: settled within 10 decision windows", fmt(withslo.windows, "d"),
         withslo.windows is not None and withslo.windows <= 10),
        ("zero crashes (all runs exit 0, no OOM)", str(crashes), crashes == 0),
    ]
    top = more[0][0] if more else None
    text = "\n".join(
        [
            "## Batch size: tuned against an exhaustive sweep",
            "",
            f"{stamp()}. Arrivals at {BATCH_RATE:g}/s, over capacity at every batch size (the queue stays full, "
            "extra arrivals are rejected), so throughput is the machine's.  Fixed runs: "
            f"`tuner demo --rate {BATCH_RATE:g} --batch-size B` stopped after {FIXED_S:g} s ({FIXED_S * 1.5:g} s "
            f"at 32, {FIXED_S * 2.5:g} s at 64: one batch of 64 takes ~13 s here); tuned runs: "
            f"`tuner demo --rate {BATCH_RATE:g} --policy batch.toml` for {TUNED_S:g} s (the interactive preset's "
            "`[agent]` and `[batch_size]` tables, SLO off / on).  Round 1 sweeps every size, interleaved: "
            "8, 1, 64, tuned, 2, 32, 4, 16, tuned-with-SLO; "
            f"rounds 2-{BATCH_ROUNDS} rerun round 1's best fixed size per CPU-second ({fmt(top, 'd')}) and the "
            "tuned run without SLO, their order alternating, and the no-SLO goal is judged on the median of the "
            "rounds' ratios (one run each could not tell 54 from 64 here: batch 64 gave 876 tok/s in a tuned run's "
            "window and 1,171 in its own run minutes apart).  Throughput = tokens of whole batches / their span; "
            "the tuned figure is measured after its last change (the batch size it settled on).  "
            "Per CPU-second = the same tokens / "
            "the CPU seconds the inference process used over that span (`tree_cpu_ratio` integrated): the other "
            "jobs on this machine take a varying share of the 2 cores, which moves the wall-clock figure of runs "
            "minutes apart by 30% or more, while the work per CPU-second is what the batch size changes.  The "
            "goals are judged per CPU-second; wall-clock figures are shown beside them.  Decision windows = "
            "batch sizes applied until the last change, the starting one included (each opens one measurement "
            "window; a size measured again to confirm the knee counts again).",
            "",
            "Round 1, the sweep:",
            "",
            "| fixed batch | tok/s | tok per CPU-s | service TTFT p95 (s) | whole batches | meets the SLO | exit |",
            "|---|---|---|---|---|---|---|",
            *sweep_rows,
            "",
            f"Best fixed (wall / per CPU-s): {fmt(best(wall, False), 'd')} / {fmt(best(per_cpu, False), 'd')}; "
            f"within the SLO: {fmt(best(wall, True), 'd')} / {fmt(best(per_cpu, True), 'd')}.  \"Largest batch "
            "that fits\" (Lightning's batch-size finder doubles until OOM): memory never ran out here, so it is "
            f"the largest swept, {largest}; fixed default 8.",
            "",
            "| tuned | settled on | decision windows | seconds to the last change | tok/s after | "
            "tok per CPU-s after | service TTFT p95 (s) | best fixed (wall / CPU) | / best fixed (wall / CPU) | "
            f"/ largest ({largest}) | / fixed 8 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *tuned_rows,
            "",
            "No SLO, every round (the policy's own measurements in tok/s, `xN`: N windows pooled):",
            "",
            "| round | order | settled on | decision windows | seconds to the last change | policy's measurements | "
            "tuned tok/s / per CPU-s | fixed | fixed tok/s / per CPU-s | tuned / fixed (wall / CPU) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *round_rows,
            "",
            "| goal | measured | |",
            "|---|---|---|",
            *[f"| {g} | {m} | {ok(b)} |" for g, m, b in goals],
            "",
            f"Reproduce: `{COMMAND.format(r=LEAK_REQUESTS)} -k batch`",
        ]
    )
    write_section("batch", text)
    assert [g for g, _, b in goals if not b] == []


# -- temperature ------------------------------------------------------------------------------------------------
@dataclass
class TempFig:
    windows: int
    in_band: float | None
    in_band_after: float | None
    distance: float | None
    seq_rep_4: float | None
    temps: str
    after_in: int = 0
    after_n: int = 0


def temp_figures(run: Run, band: tuple[float, float], nominal_t: float | None = None,
                 until: float | None = None) -> TempFig:
    """Band, distance and temperatures over the run; with ``until``, over the responses that ended in its first
    ``until`` seconds (counted from the first request's arrival)."""
    reqs = [r for r in run.requests() if r.get("seq_rep_4") is not None]
    if not reqs:
        return TempFig(0, None, None, None, None, "-")
    t0 = min(r["t"] - (r.get("e2e_seconds") or 0.0) for r in reqs)
    if until is not None:
        reqs = [r for r in reqs if r["t"] - t0 < until]
    wins: dict[int, list[float]] = {}
    for r in reqs:
        wins.setdefault(int((r["t"] - t0) // TEMP_WINDOW_S), []).append(r["seq_rep_4"])
    means = [(k, statistics.fmean(v)) for k, v in sorted(wins.items()) if len(v) >= 5]
    inside = [band[0] <= m <= band[1] for _, m in means]
    after = [band[0] <= m <= band[1] for k, m in means if k * TEMP_WINDOW_S >= TEMP_WARMUP_S]
    temps = [nominal_t if nominal_t is not None else r.get("temperature") for r in reqs]
    tv = [float(x) for x in temps if isinstance(x, (int, float))]
    used = sorted({round(x, 2) for x in tv})
    return TempFig(
        len(means),
        sum(inside) / len(inside) if inside else None,
        sum(after) / len(after) if after else None,
        statistics.fmean(abs(x - REQUESTED_T) for x in tv) if tv else None,
        statistics.fmean(r["seq_rep_4"] for r in reqs),
        ", ".join(f"{x:g}" for x in used[:8]) + (" ..." if len(used) > 8 else ""),
        sum(after),
        len(after),
    )


def test_temperature(trace_dir: Path, benchmark: Any) -> None:
    t = preset_table("interactive", "temperature")
    t["requested"] = REQUESTED_T
    band = (float(t["band_low"]), float(t["band_high"]))
    agent = preset_table("interactive", "agent")
    pol = write_policy(trace_dir / "temperature.toml", {"agent": agent, "temperature": t})
    common = ["--rate", f"{TEMP_RATE:g}", "--temperature", f"{REQUESTED_T:g}"]

    def experiment() -> dict[str, tuple[Run, float | None]]:
        out: dict[str, tuple[Run, float | None]] = {}

        def fixed(temp: float) -> None:
            out[f"fixed T={temp:g}"] = (
                run_demo(trace_dir, f"temp-fixed-{temp:g}", ["--rate", f"{TEMP_RATE:g}", "--temperature", f"{temp:g}",
                                                              "--duration", f"{TEMP_S:g}"]),
                temp,
            )

        fixed(REQUESTED_T)
        out["tuned (policy)"] = (
            run_demo(trace_dir, "temp-tuned", [*common, "--duration", f"{TEMP_TUNED_S:g}", "--policy", str(pol)]),
            None,
        )
        fixed(0.8)
        for tau in (5.0, 1.0):
            out[f"Mirostat v2 tau={tau:g}"] = (
                run_demo(trace_dir, f"temp-mirostat-{tau:g}",
                         [*common, "--duration", f"{TEMP_S:g}", "--mirostat", "--mirostat-tau", f"{tau:g}"]),
                1.0,  # Mirostat samples at T = 1 and truncates by surprise
            )
        fixed(1.0)
        return out

    runs = timed(benchmark, experiment)
    rows = []
    figs: dict[str, TempFig] = {}

    def row(name: str, f: TempFig, code: int) -> str:
        return (
            f"| {name} | {f.windows} | {fmt(f.in_band, '.0%')} | {fmt(f.in_band_after, '.0%')} "
            f"({f.after_in}/{f.after_n}) | {fmt(f.seq_rep_4, '.3f')} | {fmt(f.distance, '.2f')} | {f.temps} | {code} |"
        )

    for name, (run, nominal) in runs.items():
        f = temp_figures(run, band, nominal)
        figs[name] = f
        rows.append(row(name + (f", {TEMP_TUNED_S:g} s" if nominal is None else ""), f, run.returncode))
        if nominal is None:  # the same run over the baselines' length: the prompts they saw
            rows.append(row(f"{name}, its first {TEMP_S:g} s", temp_figures(run, band, None, until=TEMP_S),
                            run.returncode))
    tuned = figs["tuned (policy)"]
    # a fixed temperature has no convergence: its whole run counts
    best_fixed_in_band = [f for n, f in figs.items() if n.startswith("fixed") and (f.in_band or 0) >= 0.9]
    closest = min((f.distance for f in best_fixed_in_band if f.distance is not None), default=None)
    goals = [
        (f"tuned: windows in the band after {TEMP_WARMUP_S:g} s >= 90%",
         f"{fmt(tuned.in_band_after, '.0%')} ({tuned.after_in} of {tuned.after_n} windows)",
         (tuned.in_band_after or 0.0) >= 0.9),
        ("tuned: closer to the request than the nearest fixed temperature that holds the band",
         f"{fmt(tuned.distance, '.2f')} vs {fmt(closest, '.2f')}",
         tuned.distance is not None and (closest is None or tuned.distance <= closest + 1e-9)),
    ]
    text = "\n".join(
        [
            "## Temperature: repetition band and distance from the requested temperature",
            "",
            f"{stamp()}. The user asks for T = {REQUESTED_T:g}; band {band[0]:g}-{band[1]:g} seq-rep-4 (the "
            "interactive preset's `[temperature]` table with `requested` set; max 1.0).  "
            f"`tuner demo --rate {TEMP_RATE:g} --temperature {REQUESTED_T:g} --policy temperature.toml` for "
            f"{TEMP_TUNED_S:g} s against fixed temperatures and Mirostat v2 (`--mirostat --mirostat-tau TAU`, eta "
            f"0.1; tau 5 is llama.cpp's default, tau 1 scaled to this byte model), {TEMP_S:g} s each (the seeded "
            "prompt stream draws prompts independently, so a longer run sees more of the same mix; the tuned "
            f"run's first {TEMP_S:g} s are shown apart: the very prompts the baselines saw).  The tuned run is "
            f"longer so that its goal rests on {(TEMP_TUNED_S - TEMP_WARMUP_S) / TEMP_WINDOW_S:g} windows after the "
            f"warm-up, not {(TEMP_S - TEMP_WARMUP_S) / TEMP_WINDOW_S:g}.  Windows: responses by end time in "
            f"{TEMP_WINDOW_S:g} s windows (>= 5 "
            f"responses); the goal counts windows after the first {TEMP_WARMUP_S:g} s (the policy's "
            "convergence), the whole-run share is shown too.  Distance = mean |T - requested| over responses "
            "(Mirostat samples at T = 1).",
            "",
            "| run | windows | in band (all) | in band after warm-up (windows) | mean seq-rep-4 | mean distance | "
            "temperatures used | exit |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "| goal | measured | |",
            "|---|---|---|",
            *[f"| {g} | {m} | {ok(b)} |" for g, m, b in goals],
            "",
            f"Reproduce: `{COMMAND.format(r=LEAK_REQUESTS)} -k temperature`",
        ]
    )
    write_section("temperature", text)
    for run, _ in runs.values():
        assert run.returncode == 0, (run.name, run.stderr[-2000:])
    assert [g for g, _, b in goals if not b] == []


# -- precision --------------------------------------------------------------------------------------------------
PRECISION_POLICY: dict[str, dict[str, Any]] = {
    "agent": {"cooldown_s": {"precision": 5}},
    "precision": {
        "ladder": ["fp32", "bf16", "int8"],
        "min_headroom": 0.99,  # forced memory pressure: every step is taken
        "release_headroom": 1.0,
        "trigger_s": 15.0,
        "settle_s": 15.0,
        "hold_s": 3600.0,
        "max_kl": 0.05,
        "min_top1": 0.9,
    },
}


def test_precision(trace_dir: Path, benchmark: Any) -> None:
    pol = write_policy(trace_dir / "precision.toml", PRECISION_POLICY)
    dur = 75.0

    def experiment() -> Run:
        return run_demo(trace_dir, "precision", ["--rate", f"{BATCH_RATE:g}", "--duration", f"{dur:g}",
                                                  "--policy", str(pol)], stop_after=dur + 8)

    run = timed(benchmark, experiment)
    acts = run.actions("precision")
    results = [a for a in acts if a.get("outcome") in ("done", "refused")]
    reqs = run.requests()
    t_rss, rss = run.data.times, run.data.column("tree_rss_bytes")
    changes: list[tuple[float, str]] = [(0.0, "fp32")]
    for a in results:
        if a.get("outcome") == "done":
            changes.append((float(a["t"]), str(a["value"])))
    rows = []
    speeds: dict[str, float | None] = {}
    speeds_cpu: dict[str, float | None] = {}
    for i, (t_from, prec) in enumerate(changes):
        t_to = changes[i + 1][0] if i + 1 < len(changes) else float("inf")
        mine = [r for r in reqs if r.get("precision") == prec]  # the precision its batch started in
        tps = [r["tokens"] / (r["tpot_seconds"] * max(1, r["tokens"] - 1)) for r in mine
               if r.get("tpot_seconds") and r.get("tokens", 0) > 1]
        span = np.isfinite(rss) & (t_rss >= t_from + 2) & (t_rss < min(t_to, t_rss[-1] + 1))
        speed = throughput(mine, -1.0, data=run.data)  # the phase's batches but its first
        speeds[prec] = speed.tokens_per_second
        speeds_cpu[prec] = speed.tokens_per_cpu_second
        res = next((a.get("result") or {} for a in results if a.get("value") == prec), {}) if i else {}
        rows.append(
            f"| {prec} | {len(mine)} | {fmt(speed.tokens_per_second)} | {fmt(speed.tokens_per_cpu_second)} | "
            f"{fmt(statistics.median(tps) if tps else None)} | "
            f"{fmt(float(np.median(rss[span])) / 2**20 if span.any() else None)} | "
            f"{fmt(res.get('param_bytes_after'), ',')} | {fmt(res.get('kl'), '.2g')} | {fmt(res.get('top1'), '.2f')} | "
            f"{fmt(res.get('seconds'), '.2f')} |"
        )
    first = next((a.get("result") or {} for a in results), {})
    p32 = first.get("param_bytes_before")
    last_res = results[-1].get("result") or {} if results else {}
    p_end = last_res.get("param_bytes_after")
    int8 = next((a.get("result") or {} for a in results if a.get("value") == "int8" and a.get("outcome") == "done"),
                None)
    goals = [
        ("every step down passed the guard (KL <= 0.05, top-1 >= 0.9) or was rolled back",
         ", ".join(f"{a['value']}: {a['outcome']}" for a in results) or "no step",
         bool(results) and all(a.get("outcome") == "done" for a in results)),
        ("int8 reached, weights smaller", f"{fmt(p32, ',')} -> {fmt(p_end, ',')} bytes",
         int8 is not None and p32 is not None and p_end is not None and p_end < p32),
    ]
    def rel(d: dict[str, float | None], p: str) -> float | None:
        base, x = d.get("fp32"), d.get(p)
        return x / base if base and x is not None else None

    ratio_int8, ratio_bf16 = rel(speeds, "int8"), rel(speeds, "bf16")
    cpu_int8, cpu_bf16 = rel(speeds_cpu, "int8"), rel(speeds_cpu, "bf16")
    text = "\n".join(
        [
            "## Precision: memory and speed at each step, with the guard's figures",
            "",
            f"{stamp()}. `tuner demo --rate {BATCH_RATE:g} --duration {dur:g} --policy precision.toml` (over "
            "capacity: the queue stays full, so throughput is the machine's at each precision): the "
            "headroom threshold is set above what the machine has (forced memory pressure), so the policy walks "
            "the whole ladder fp32 -> bf16 -> int8; the client's guard compares the next-token distributions of "
            "8 canary prompts with the fp32 reference.  Throughput per phase = whole batches run at that "
            "precision / their span; decode tok/s = per request (1 / TPOT), median.",
            "",
            "```toml",
            pol.read_text().strip(),
            "```",
            "",
            "| precision | requests | tok/s (batches) | tok per CPU-s | decode tok/s per request | "
            "RSS median (MiB) | weight bytes | KL (nats) | top-1 | switch (s) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Throughput relative to fp32 (wall-clock / per CPU-second): bf16 {fmt(ratio_bf16, '.2f')} / "
            f"{fmt(cpu_bf16, '.2f')}, int8 {fmt(ratio_int8, '.2f')} / {fmt(cpu_int8, '.2f')}; weights "
            f"{fmt(p32, ',')} -> {fmt(p_end, ',')} bytes"
            + (f" ({p_end / p32:.0%})" if p32 and p_end else "") + ".",
            "",
            "| goal | measured | |",
            "|---|---|---|",
            *[f"| {g} | {m} | {ok(b)} |" for g, m, b in goals],
            "",
            f"Reproduce: `{COMMAND.format(r=LEAK_REQUESTS)} -k precision`",
        ]
    )
    write_section("precision", text)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [g for g, _, b in goals if not b] == []


# -- held-out evaluation (issue 14) -------------------------------------------------------------------------------
# Develop on seed 0; judge on held-out seeds x workload shapes, 90 s runs, untuned and tuned paired per cell, the
# best fixed setting (chosen per shape on the dev seed by a sweep) run on the held-out seeds too.  Every run is
# one line of HELDOUT_FILE (committed as the runs come); docs/effects.md's held-out section is rendered from it.
HELDOUT_FILE = Path(os.environ.get("TUNER_EFFECT_HELDOUT_FILE",
                                   str(ROOT / "tests" / "bench" / "effects_heldout.jsonl")))
SHAPES = ("steady", "step", "burst", "ramp", "mix")
DEV_SEED = 0
HELDOUT_S = float(os.environ.get("TUNER_EFFECT_HELDOUT_SECONDS", "90"))
HELDOUT_SETS: dict[str, tuple[int, ...]] = {"H1": (101, 102, 103, 104, 105), "H2": (106, 107, 108, 109, 110),
                                            "H3": (111, 112, 113, 114, 115), "H4": (116, 117, 118, 119, 120),
                                            "H5": (121, 122, 123, 124, 125), "H6": (126, 127, 128, 129, 130),
                                            "H7": (131, 132, 133, 134, 135), "H8": (136, 137, 138, 139, 140),
                                            "H9": (141, 142, 143, 144, 145)}
"""Held-out seed sets in the order they are spent: a policy change after a held-out run is judged on the next."""
HELDOUT_SET = os.environ.get("TUNER_EFFECT_SET", "H1")
HELDOUT_BUDGET_S = float(os.environ.get("TUNER_EFFECT_BUDGET_S", str(3 * 3600)))
"""Wall time the held-out matrix may take in this session; cells left are listed as missing (rerun to go on)."""
STEADY_RATE = 5.0
DEV_SIZES = (4, 16, 32)
"""Fixed batch sizes swept on the dev seed besides the untuned 8 (64: one static batch ~13 s, a TTFT SLO of 1 s
cannot hold)."""
DEV_TEMPS = (0.7, 0.8, 1.0)
"""Fixed temperatures swept on the dev seed (steady shape) for the nearest one that holds the band."""
NOISE_CELLS = 3
"""Cells (the first ones) whose untuned run is repeated: the untuned-vs-untuned spread is the noise band."""
BAND_WARMUP_S = 30.0
HELDOUT_SLO = float(preset_table("interactive", "batch_size")["slo_ttft_p95_s"])
HELDOUT_BAND = (float(preset_table("interactive", "temperature")["band_low"]),
                float(preset_table("interactive", "temperature")["band_high"]))


def heldout_args(seed: int, shape: str, *, batch: int = 8, temp: float = REQUESTED_T, policy: str | None = None,
                 mirostat: float | None = None, capacity: float | None = None) -> list[str]:
    args = ["--seed", str(seed), "--temperature", f"{temp:g}", "--batch-size", str(batch),
            "--duration", f"{HELDOUT_S:g}"]
    if shape == "steady":
        args += ["--rate", f"{STEADY_RATE:g}"]
    else:
        args += ["--workload", shape] + (["--capacity", f"{capacity:g}"] if capacity is not None else [])
    if policy is not None:
        args += ["--policy", policy]
    if mirostat is not None:
        args += ["--mirostat", "--mirostat-tau", f"{mirostat:g}"]
    return args


def band_share(reqs: list[dict[str, Any]], t0: float) -> tuple[int, int]:
    """(windows in the band, windows) over 10 s windows of responses by end time after the warm-up (>= 5 each)."""
    wins: dict[int, list[float]] = {}
    for r in reqs:
        if r.get("seq_rep_4") is None or r["t"] - t0 < BAND_WARMUP_S:
            continue
        wins.setdefault(int((r["t"] - t0) // TEMP_WINDOW_S), []).append(float(r["seq_rep_4"]))
    means = [statistics.fmean(v) for v in wins.values() if len(v) >= 5]
    return sum(HELDOUT_BAND[0] <= m <= HELDOUT_BAND[1] for m in means), len(means)


def heldout_figures(run: Run) -> dict[str, Any]:
    """SLO attainment = requests whose first token came within the SLO / requests that *arrived* (rejected,
    failed and drained-out ones are misses); throughput = tokens of the finished requests / the workload's
    whole run (from the first arrival to its end, drain included)."""
    w = run.workload()
    reqs = run.requests()
    arrived = int(w.get("requests_arrived") or 0)
    attained = sum(1 for r in reqs if r.get("ttft_seconds") is not None and r["ttft_seconds"] <= HELDOUT_SLO)
    tokens = sum(int(r.get("tokens") or 0) for r in reqs)
    seconds = float(w.get("seconds") or 0.0)
    t0 = min((r["t"] - r["e2e_seconds"] for r in reqs if r.get("e2e_seconds") is not None), default=0.0)
    inb, nw = band_share(reqs, t0)
    temps = [float(r["temperature"]) for r in reqs if isinstance(r.get("temperature"), (int, float))]
    ttft = [r["ttft_seconds"] for r in reqs if r.get("ttft_seconds") is not None]
    batch_acts = [a for a in run.actions("batch_size") if a.get("outcome") in TOOK]
    prec = [a for a in run.actions("precision") if a.get("outcome") in TOOK]
    return {
        "arrived": arrived, "done": int(w.get("requests_done") or 0), "rejected": int(w.get("requests_rejected") or 0),
        "failed": int(w.get("requests_failed") or 0), "attained": attained,
        "attainment": attained / arrived if arrived else None, "tokens": tokens, "seconds": round(seconds, 3),
        "throughput": tokens / seconds if seconds > 0 else None, "band_in": inb, "band_windows": nw,
        "band_share": inb / nw if nw else None,
        "distance": statistics.fmean(abs(x - REQUESTED_T) for x in temps) if temps else None,
        "ttft_p95": float(np.percentile(ttft, 95)) if ttft else None,
        "capacity_rps": w.get("capacity_rps"), "capacity_measured": w.get("capacity_measured"),
        "batch_moves": [[round(float(a["t"]), 1), a["value"], str(a.get("reason", ""))[:90]] for a in batch_acts],
        "precision_moves": [[round(float(a["t"]), 1), a["value"], str(a.get("reason", ""))[:120]] for a in prec],
        "exit": run.returncode, "wall_s": round(run.wall_s, 1),
    }


def load_heldout(path: Path | None = None) -> list[dict[str, Any]]:
    path = HELDOUT_FILE if path is None else path
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def git_commit() -> str | None:
    """The short commit the runs are made at (recorded with each run)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or None


def load_record(start: tuple[float, float, float], end: tuple[float, float, float]) -> dict[str, float]:
    """The 1-min load average at a run's start and end (and the 5-min at its end), as each record keeps it."""
    return {"start_1m": round(start[0], 2), "end_1m": round(end[0], 2), "end_5m": round(end[1], 2)}


def append_record(path: Path, rec: dict[str, Any]) -> None:
    """One run, one line (the runs resume where the file stops)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def heldout_run(trace_dir: Path, set_name: str, seed: int, shape: str, arm: str, *, out: Path | None = None,
                **kw: Any) -> dict[str, Any]:
    """One run of a cell, appended to ``out`` (the held-out record unless given)."""
    out = HELDOUT_FILE if out is None else out
    args = heldout_args(seed, shape, **kw)
    load0 = os.getloadavg()
    run = run_demo(trace_dir, f"{set_name}-s{seed}-{shape}-{arm}", args, report=False, timeout=HELDOUT_S + 900)
    load1 = os.getloadavg()
    rec = {"set": set_name, "seed": seed, "shape": shape, "arm": arm, "utc": stamp(), "commit": git_commit(),
           "command": "tuner demo --headless " + " ".join(args),
           "batch_size": kw.get("batch", 8), "temperature": kw.get("temp", REQUESTED_T),
           "policy": kw.get("policy"), "mirostat": kw.get("mirostat"), **heldout_figures(run),
           "load": load_record(load0, load1)}
    append_record(out, rec)
    print(f"  [{set_name} seed {seed} {shape} {arm}] attainment {fmt(rec['attainment'], '.1%')}, "
          f"{fmt(rec['throughput'])} tok/s, band {rec['band_in']}/{rec['band_windows']}", flush=True)
    return rec


def interactive_tables() -> dict[str, dict[str, Any]]:
    """The interactive preset's tables with the requested temperature set (the temperature policy's ``requested``)."""
    tables = {name: preset_table("interactive", name) for name in ("agent", "temperature", "batch_size",
                                                                    "precision", "cleanup")}
    tables["temperature"]["requested"] = REQUESTED_T
    return tables


def tuned_policy(trace_dir: Path) -> str:
    """The held-out matrix's tuned arm: the interactive preset, T 0.5 requested."""
    return str(write_policy(trace_dir / "interactive-t05.toml", interactive_tables()))


def cell_capacity(recs: list[dict[str, Any]], set_name: str, seed: int, shape: str) -> float | None:
    """The capacity the cell's first run measured: later runs of the cell are given it (the same stream)."""
    for r in recs:
        if (r["set"], r["seed"], r["shape"]) == (set_name, seed, shape) and r.get("capacity_measured"):
            return float(r["capacity_rps"])
    return None


def run_cell(trace_dir: Path, recs: list[dict[str, Any]], set_name: str, seed: int, shape: str,
             arms: list[tuple[str, dict[str, Any]]], deadline: float) -> bool:
    """Run the arms of one cell not yet recorded, in order; False when the budget ran out."""
    have = {r["arm"] for r in recs if (r["set"], r["seed"], r["shape"]) == (set_name, seed, shape)}
    for arm, kw in arms:
        if arm in have:
            continue
        if time.monotonic() > deadline:
            return False
        cap = cell_capacity(recs, set_name, seed, shape) if shape != "steady" else None
        rec = heldout_run(trace_dir, set_name, seed, shape, arm, capacity=cap, **kw)
        recs.append(rec)
    return True


@pytest.mark.timeout(int(HELDOUT_BUDGET_S) + 3600)
def test_heldout_dev_sweep(trace_dir: Path) -> None:
    """Seed 0 only (the development seed): untuned, tuned and the fixed sweep per shape; fixed temperatures on
    the steady shape.  Chooses the best fixed setting per shape for the held-out runs."""
    pol = tuned_policy(trace_dir)
    recs = load_heldout()
    deadline = time.monotonic() + HELDOUT_BUDGET_S
    for i, shape in enumerate(SHAPES):
        pair: list[tuple[str, dict[str, Any]]] = [("untuned", {}), ("tuned", {"policy": pol})]
        arms = (pair if i % 2 == 0 else pair[::-1]) + [(f"fixed-{b}", {"batch": b}) for b in DEV_SIZES]
        if shape == "steady":
            arms += [(f"fixed-T{t:g}", {"temp": t}) for t in DEV_TEMPS]
        assert run_cell(trace_dir, recs, "dev", DEV_SEED, shape, arms, deadline), "out of budget"
    write_section("heldout", render_heldout(load_heldout()))


def best_fixed(recs: list[dict[str, Any]]) -> tuple[dict[str, int], float | None]:
    """Per shape, the batch size with the best SLO attainment on the dev seed (throughput breaks ties within one
    point); and the fixed temperature nearest the request that held the band on the dev seed (>= 90% of its
    windows), else the one with the best band share."""
    dev = [r for r in recs if r["set"] == "dev"]
    sizes: dict[str, int] = {}
    for shape in SHAPES:
        cand = [r for r in dev if r["shape"] == shape and (r["arm"] == "untuned" or r["arm"].startswith("fixed-"))
                and not r["arm"].startswith("fixed-T") and r.get("attainment") is not None]
        if not cand:
            continue
        top = max(r["attainment"] for r in cand)
        near = [r for r in cand if r["attainment"] >= top - 0.01]
        sizes[shape] = int(max(near, key=lambda r: r.get("throughput") or 0.0)["batch_size"])
    temps = [r for r in dev if r["arm"].startswith("fixed-T") or (r["shape"] == "steady" and r["arm"] == "untuned")]
    held = [r for r in temps if (r.get("band_share") or 0.0) >= 0.9]
    pick = (min(held, key=lambda r: abs(r["temperature"] - REQUESTED_T)) if held
            else max(temps, key=lambda r: r.get("band_share") or 0.0) if temps else None)
    return sizes, float(pick["temperature"]) if pick is not None else None


@pytest.mark.timeout(int(HELDOUT_BUDGET_S) + 3600)
def test_heldout_matrix(trace_dir: Path) -> None:
    """The held-out seeds of ``TUNER_EFFECT_SET`` x the shapes: untuned and tuned (order alternating cell by cell),
    the best fixed setting, an untuned repeat in the first ``NOISE_CELLS`` cells, Mirostat in the first seed's
    cells.  Resumes where the file stops; stops at the budget and lists what is missing."""
    recs = load_heldout()
    sizes, temp = best_fixed(recs)
    assert set(sizes) == set(SHAPES) and temp is not None, "run test_heldout_dev_sweep first"
    pol = tuned_policy(trace_dir)
    seeds = HELDOUT_SETS[HELDOUT_SET]
    deadline = time.monotonic() + HELDOUT_BUDGET_S
    cells = [(seed, shape) for seed in seeds for shape in SHAPES]
    for i, (seed, shape) in enumerate(cells):
        pair: list[tuple[str, dict[str, Any]]] = [("untuned", {}), ("tuned", {"policy": pol})]
        arms = (pair if i % 2 == 0 else pair[::-1]) + [("fixed", {"batch": sizes[shape], "temp": temp})]
        if i < NOISE_CELLS:
            arms.append(("untuned-repeat", {}))
        if seed == seeds[0]:
            arms.append(("mirostat", {"mirostat": 5.0}))
        if not run_cell(trace_dir, recs, HELDOUT_SET, seed, shape, arms, deadline):
            break
    write_section("heldout", render_heldout(load_heldout()))


# -- repeated pairs: whether a cell's loss is the policy's or the host's ---------------------------------------------
REPEATS_FILE = Path(os.environ.get("TUNER_EFFECT_REPEATS_FILE",
                                   str(ROOT / "tests" / "bench" / "effects_repeats.jsonl")))
"""Runs of ``test_heldout_repeats``, kept apart from the held-out record: a cell's verdict stays its first pair's."""
REPEAT_CELLS = os.environ.get("TUNER_EFFECT_REPEAT", "")
"""The cells whose pair to run again: ``SET:SEED:SHAPE``, comma-separated (``H7:133:steady,H8:138:step``)."""
REPEAT_N = int(os.environ.get("TUNER_EFFECT_REPEAT_N", "2"))
"""Rounds per cell; a round is the pair twice, untuned first (a), then tuned first (b): 4 runs, ~6-7 minutes."""
REPEAT_ORDERS: dict[str, tuple[str, str]] = {"a": ("untuned", "tuned"), "b": ("tuned", "untuned")}


def repeat_cells(spec: str) -> list[tuple[str, int, str]]:
    """``SET:SEED:SHAPE,...`` -> cells of the held-out sets (a clear error for anything else)."""
    cells = []
    for part in filter(None, (x.strip() for x in spec.split(","))):
        bits = part.split(":")
        if (len(bits) != 3 or bits[0] not in HELDOUT_SETS or not bits[1].isdigit()
                or int(bits[1]) not in HELDOUT_SETS[bits[0]] or bits[2] not in SHAPES):
            raise ValueError(f"TUNER_EFFECT_REPEAT: {part!r} is not a held-out cell (SET:SEED:SHAPE, e.g. "
                             "H7:133:steady)")
        cells.append((bits[0], int(bits[1]), bits[2]))
    return cells


@pytest.mark.skipif(not REPEAT_CELLS, reason="TUNER_EFFECT_REPEAT names the cells whose pairs to repeat")
@pytest.mark.timeout(int(HELDOUT_BUDGET_S) + 3600)
def test_heldout_repeats(trace_dir: Path) -> None:
    """A held-out cell's untuned and tuned runs again, ``REPEAT_N`` rounds of both orders on the cell's stream (its
    first run's capacity), into ``REPEATS_FILE``: a loss the policy makes recurs in either order, round after round;
    one the host made does not.  Resumes where the file stops; rendered as docs/effects.md's ``repeats`` section."""
    try:
        cells = repeat_cells(REPEAT_CELLS)
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)  # the user's setting: one line, no traceback
    recs = load_heldout()
    pol = tuned_policy(trace_dir)
    deadline = time.monotonic() + HELDOUT_BUDGET_S
    for set_name, seed, shape in cells:
        cap = cell_capacity(recs, set_name, seed, shape)
        assert shape == "steady" or cap is not None, f"{set_name} {seed} {shape}: the cell was never run"
        have = {r["arm"] for r in load_heldout(REPEATS_FILE) if (r["set"], r["seed"], r["shape"]) ==
                (set_name, seed, shape)}
        for k in range(1, REPEAT_N + 1):
            for order, arms in REPEAT_ORDERS.items():
                for arm in arms:
                    name = f"{arm}-r{k}{order}"
                    if name in have:
                        continue
                    if time.monotonic() > deadline:
                        write_section("repeats", render_repeats(load_heldout(REPEATS_FILE), recs))
                        return
                    heldout_run(trace_dir, set_name, seed, shape, name, out=REPEATS_FILE, capacity=cap,
                                **({"policy": pol} if arm == "tuned" else {}))
    write_section("repeats", render_repeats(load_heldout(REPEATS_FILE), recs))


def render_repeats(reps: list[dict[str, Any]], recs: list[dict[str, Any]]) -> str:
    """Per repeated cell: its first (held-out) pair, then each repeated pair; tuned minus untuned attainment."""
    out = ["## Repeated pairs: whether a cell's loss is the policy's or the host's", "",
           f"Rendered {stamp()} from `tests/bench/effects_repeats.jsonl` (one line per run).  A held-out cell's "
           "untuned and tuned runs again, the same commands on the cell's stream, in rounds of both orders (a: "
           "untuned first, b: tuned first): `TUNER_EFFECT_REPEAT=SET:SEED:SHAPE TUNER_EFFECT_REPEAT_N=N make effects "
           "EFFECTS_K=repeats`.  The cell's verdict above stays its first pair's; a loss that is the policy's recurs "
           "in either order, one the host made does not.  A repeat runs the policies of its commit (last column), "
           "which may be newer than the first pair's.", ""]
    if not reps:
        return "\n".join([*out, "No repeated pairs recorded yet."])
    for set_name, seed, shape in sorted({(r["set"], r["seed"], r["shape"]) for r in reps}):
        mine = {r["arm"]: r for r in reps if (r["set"], r["seed"], r["shape"]) == (set_name, seed, shape)}
        first = {r["arm"]: r for r in recs if (r["set"], r["seed"], r["shape"]) == (set_name, seed, shape)}
        pairs: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]] = [
            ("held-out", "-", first.get("tuned"), first.get("untuned"))]
        ids = sorted({a.split("-r", 1)[1] for a in mine if "-r" in a}, key=lambda x: (int(x[:-1]), x[-1]))
        pairs += [(f"r{i}", i[-1], mine.get(f"tuned-r{i}"), mine.get(f"untuned-r{i}")) for i in ids]
        out += [f"### {set_name} seed {seed} {shape}", "",
                "| pair | order | attainment tuned / untuned | tuned - untuned | throughput tuned / untuned | tuned "
                "batch moves | UTC tuned / untuned | load tuned / untuned | commit |",
                "|---|---|---|---|---|---|---|---|---|"]
        diffs: list[tuple[str, float]] = []
        for pid, order, t, u in pairs:
            if t is None or u is None:
                out.append(f"| {pid} | {order} | (incomplete) | | | | | | |")
                continue
            d = ((t["attainment"] or 0.0) - (u["attainment"] or 0.0)) * 100
            if pid != "held-out":
                diffs.append((order, d))
            moves = " ".join(str(m[1]) for m in t.get("batch_moves") or []) or "-"
            out.append(f"| {pid} | {order} | {fmt(t['attainment'], '.1%')} / {fmt(u['attainment'], '.1%')} | "
                       f"{d:+.1f} pts | {fmt(t['throughput'])} / {fmt(u['throughput'])} | {moves} | "
                       f"{t['utc'][11:16]} / {u['utc'][11:16]} | {load_text(t)} / {load_text(u)} | "
                       f"{t.get('commit') or '-'} |")
        if diffs:
            worse = [f"{o}" for o, d in diffs if d < -NEVER_WORSE * 100]
            out += ["", f"Repeated pairs: {len(diffs)}; tuned - untuned attainment mean "
                    f"{statistics.fmean(d for _, d in diffs):+.1f} points (range {min(d for _, d in diffs):+.1f} to "
                    f"{max(d for _, d in diffs):+.1f}); tuned more than 5 points worse in {len(worse)} "
                    f"({', '.join(f'order {o}' for o in worse) or 'none'})."]
        out.append("")
    return "\n".join(out).rstrip()


NEVER_WORSE = 0.05
"""A cell is worse when tuned loses more than 5 points of attainment or 5% of throughput to untuned, and more
than the untuned-vs-untuned spread."""


def noise_band(recs: list[dict[str, Any]]) -> tuple[float, float, list[str]]:
    """The largest untuned-vs-untuned spread of the repeated cells: (attainment points, throughput share, rows)."""
    att, thr, rows = 0.0, 0.0, []
    by = {(r["seed"], r["shape"], r["arm"]): r for r in recs}
    for (seed, shape, arm), r in sorted(by.items()):
        if arm != "untuned-repeat" or (seed, shape, "untuned") not in by:
            continue
        u = by[(seed, shape, "untuned")]
        da = abs((u["attainment"] or 0) - (r["attainment"] or 0))
        dt = abs((u["throughput"] or 0) - (r["throughput"] or 0)) / max(u["throughput"] or 1e-9, 1e-9)
        att, thr = max(att, da), max(thr, dt)
        rows.append(f"| {seed} | {shape} | {fmt(u['attainment'], '.1%')} / {fmt(r['attainment'], '.1%')} | "
                    f"{fmt(u['throughput'])} / {fmt(r['throughput'])} | {da * 100:.1f} pts | {dt:.1%} |")
    return att, thr, rows


def cell_verdict(t: dict[str, Any], u: dict[str, Any], att_noise: float, thr_noise: float) -> tuple[bool, str]:
    """Worse (and why) under the never-worse rule: more than 5 points / 5% and more than the noise."""
    why = []
    da = (u["attainment"] or 0.0) - (t["attainment"] or 0.0)
    if da > NEVER_WORSE and da > att_noise:
        why.append(f"attainment -{da * 100:.1f} pts")
    ut, tt = u["throughput"] or 0.0, t["throughput"] or 0.0
    dt = (ut - tt) / ut if ut > 0 else 0.0
    if dt > NEVER_WORSE and dt > thr_noise:
        why.append(f"throughput -{dt:.1%}")
    return bool(why), ", ".join(why)


def away_s(r: dict[str, Any], base: int = 8) -> float:
    """Seconds a tuned run spent at a batch size other than ``base`` (from its applied moves to the run's end,
    taken as the first move + the workload's length): the exposure to what the batch policy did."""
    moves = [(float(t), int(v)) for t, v, _ in r.get("batch_moves") or []]
    if not moves:
        return 0.0
    end = moves[0][0] + float(r.get("seconds") or 0.0)
    return sum(max(0.0, min(nt, end) - t) for (t, v), (nt, _) in zip(moves, [*moves[1:], (end, base)], strict=True)
               if v != base)


def shown(command: str) -> str:
    """A run's command as the doc shows it: the policy file by its name (its text is in the doc)."""
    return re.sub(r"--policy \S*/([^/\s]+)", r"--policy \1", command)


def render_heldout(recs: list[dict[str, Any]]) -> str:
    out = [
        "## Held-out evaluation (issue 14)",
        "",
        f"Rendered {stamp()} from `tests/bench/effects_heldout.jsonl` (one line per run).  Every run is `tuner demo "
        f"--headless` for {HELDOUT_S:g} s of arrivals (then the queue drains, at most 60 s), T = {REQUESTED_T:g} "
        f"asked; *untuned* = no policy (batch 8, T {REQUESTED_T:g}), *tuned* = `--policy interactive` with "
        f"`requested = {REQUESTED_T:g}` (all four policies), *fixed* = the best fixed setting chosen per shape on "
        f"the dev seed ({DEV_SEED}) by a sweep.  Shapes: `steady` at --rate {STEADY_RATE:g}; the others against "
        "the capacity the cell's first run measured (the cell's other runs are given it: the same stream).  "
        f"SLO attainment = requests whose first token came within {HELDOUT_SLO:g} s / requests that arrived "
        "(rejected, failed, drained out = misses); throughput = tokens of finished requests / the whole run, drain "
        f"included; band = 10 s windows (>= 5 responses, after {BAND_WARMUP_S:g} s) with mean seq-rep-4 in "
        f"{HELDOUT_BAND[0]:g}-{HELDOUT_BAND[1]:g}.  A cell is *worse* when tuned loses more than 5 points of "
        "attainment or 5% of throughput to untuned *and* more than the untuned-vs-untuned spread measured in the "
        "repeated cells.  The tuned runs' policy file, `interactive-t05.toml`:",
        "",
        "```toml",
        Path(tuned_policy(Path(tempfile.mkdtemp()))).read_text().strip(),
        "```",
    ]
    dev = [r for r in recs if r["set"] == "dev"]
    if dev:
        sizes, temp = best_fixed(recs)
        out += ["", f"### Dev seed {DEV_SEED} (in-sample: the policy was developed on it)", "",
                "| shape | arm | batch | T | capacity (req/s) | arrived | attainment | throughput (tok/s) | band | "
                "TTFT p95 (s) | batch moves |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(dev, key=lambda r: (SHAPES.index(r["shape"]), r["arm"])):
            out.append(f"| {r['shape']} | {r['arm']} | {r['batch_size']} | {r['temperature']:g} | "
                       f"{fmt(r.get('capacity_rps'), '.2f')} | {r['arrived']} | {fmt(r['attainment'], '.1%')} | "
                       f"{fmt(r['throughput'])} | {r['band_in']}/{r['band_windows']} | {fmt(r['ttft_p95'], '.2f')} | "
                       f"{' '.join(str(m[1]) for m in r['batch_moves']) or '-'} |")
        out += ["", "Best fixed per shape (attainment first, throughput within one point): " +
                ", ".join(f"{s} {b}" for s, b in sizes.items()) + f"; fixed temperature {fmt(temp, 'g')} (the "
                "nearest to the request that held the band on the dev seed, else the best band share)."]
    for set_name in [s for s in HELDOUT_SETS if any(r["set"] == s for r in recs)]:
        out += render_heldout_set(set_name, [r for r in recs if r["set"] == set_name], recs)
    return "\n".join(out)


def short_of(have: float | None, want: float | None, noise: float, *, relative: bool) -> float | None:
    """How far ``have`` falls short of ``want`` (points, or a share of ``want``) when that counts as a miss under
    the noise rule (more than 5 points / 5% *and* more than the noise), else None."""
    if want is None:
        return None
    gap = want - (have or 0.0)
    if relative:
        gap = gap / want if want > 0 else 0.0
    return gap if gap > NEVER_WORSE and gap > noise else None


def load_text(r: dict[str, Any] | None) -> str:
    ld = (r or {}).get("load")
    return f"{ld['start_1m']:.1f}->{ld['end_1m']:.1f}" if ld else "-"


LATE_ARMS = ("untuned-late", "tuned-late")
"""Arms rerun later in a session (``late_rows``): shown and listed, never judged."""


def late_rows(mine: list[dict[str, Any]]) -> list[str]:
    """A cell's arm rerun later in the session (arms ``untuned-late``, ``tuned-late``: the cell's command again, at
    another load): how much the host moves a cell.  Shown beside the first runs; the verdicts stay the first
    runs' (a rerun is evidence about the host, not a second chance), and the noise band, measured back to back
    like the pairs it judges, does not use them."""
    by = {(r["seed"], r["shape"], r["arm"]): r for r in mine}
    rows = [f"| {s} | {sh} | {a[:-5]} | {fmt(u['attainment'], '.1%')} / {fmt(r['attainment'], '.1%')} | "
            f"{fmt(u['throughput'])} / {fmt(r['throughput'])} | {load_text(u)} / {load_text(r)} | "
            f"{u['utc'][11:16]} / {r['utc'][11:16]} |"
            for (s, sh, a), r in sorted(by.items())
            if a in LATE_ARMS and (u := by.get((s, sh, a[:-5])))]
    if not rows:
        return []
    return ["Arms rerun later, at another load (the same command and stream; first run / rerun; the verdicts below "
            "are the first runs', the noise band does not use these):", "",
            "| seed | shape | arm | attainment | throughput | load (1-min) | UTC |", "|---|---|---|---|---|---|---|",
            *rows, ""]


def render_heldout_set(set_name: str, mine: list[dict[str, Any]], recs: list[dict[str, Any]]) -> list[str]:
    """One held-out set: the cells (tuned / untuned / best fixed), the noise, the goals of issue 14 §2 per cell
    and over the cells, the worst cell, the command of every run."""
    att_noise, thr_noise, noise_rows = noise_band(mine)
    _, fixed_t = best_fixed(recs)
    by = {(r["seed"], r["shape"], r["arm"]): r for r in mine}
    rows, goal_rows, worse, strict, missing, cmds = [], [], [], [], [], []
    miss: dict[str, list[str]] = {"batch attainment": [], "batch throughput": [], "band": [], "distance": []}
    worst: tuple[float, str] | None = None
    cells = 0
    for seed in HELDOUT_SETS[set_name]:
        for shape in SHAPES:
            t, u, f = (by.get((seed, shape, arm)) for arm in ("tuned", "untuned", "fixed"))
            for arm in ("untuned", "tuned", "fixed", "untuned-repeat", "mirostat", *LATE_ARMS):
                x = by.get((seed, shape, arm))
                if x is not None:
                    cmds.append(f"- seed {seed} {shape} {arm} ({x['utc'][11:16]}, load {load_text(x)}): "
                                f"`{shown(x['command'])}`")
            if t is None or u is None or f is None:
                missing.append(f"{seed}/{shape}")
                continue
            cells += 1
            cell = f"{seed} {shape}"
            bad, why = cell_verdict(t, u, att_noise, thr_noise)
            if bad:
                worse.append(f"{cell} ({why})")
            bad5, why5 = cell_verdict(t, u, 0.0, 0.0)
            if bad5:
                strict.append(f"{cell} ({why5})")
            gap = min((t["attainment"] or 0) - (u["attainment"] or 0),
                      ((t["throughput"] or 0) - (u["throughput"] or 0)) / max(u["throughput"] or 1e-9, 1e-9))
            if worst is None or gap < worst[0]:
                worst = (gap, cell)
            ba = short_of(t["attainment"], f["attainment"], att_noise, relative=False)
            bt = short_of(t["throughput"], f["throughput"], thr_noise, relative=True)
            band_ok = (t["band_share"] or 0.0) >= 0.9
            dist_ok = t["distance"] is not None and f["distance"] is not None and t["distance"] < f["distance"]
            for key, missed in (("batch attainment", ba is not None), ("batch throughput", bt is not None),
                                ("band", not band_ok), ("distance", not dist_ok)):
                if missed:
                    miss[key].append(cell)

            def trio(key: str, spec: str, t: Any = t, u: Any = u, f: Any = f) -> str:
                return " / ".join(fmt(x.get(key) if x else None, spec) for x in (t, u, f))

            per = " / ".join(fmt(x["tokens"] / x["done"] if x and x.get("tokens") and x.get("done") else None, ".1f")
                             for x in (t, u, f))
            rows.append(
                f"| {seed} | {shape} | {trio('attainment', '.1%')} | {trio('throughput', '.0f')} | {per} | "
                f"{trio('band_share', '.0%')} | {' '.join(str(m[1]) for m in t['batch_moves']) or '-'} "
                f"({away_s(t):.0f}) | {' '.join(str(m[1]) for m in t['precision_moves']) or '-'} | "
                f"{load_text(t)} / {load_text(u)} |")
            goal_rows.append(
                f"| {seed} | {shape} | {'**worse**: ' + why if bad else 'not worse'} | "
                f"{'worse: ' + why5 if bad5 else 'not worse'} | "
                f"{'met' if ba is None else f'**missed** by {ba * 100:.1f} pts'} | "
                f"{'met' if bt is None else f'**missed** by {bt:.1%}'} | "
                f"{t['band_in']}/{t['band_windows']} {'met' if band_ok else '**missed**'} | "
                f"{fmt(t['distance'], '.2f')} vs {fmt(f['distance'], '.2f')} "
                f"{'met' if dist_ok else '**missed**'} (fixed band {fmt(f['band_share'], '.0%')}) |")
    tuned = [by[k] for k in by if k[2] == "tuned" and f"{k[0]}/{k[1]}" not in missing]
    mirostat = [by[k] for k in by if k[2] == "mirostat"]
    pooled = sum(r["band_in"] for r in tuned) / max(1, sum(r["band_windows"] for r in tuned))
    fixed_runs = [by[(r["seed"], r["shape"], "fixed")] for r in tuned]
    fixed_pooled = sum(r["band_in"] for r in fixed_runs) / max(1, sum(r["band_windows"] for r in fixed_runs))
    loads = [v for r in mine if r.get("load") for v in (r["load"]["start_1m"], r["load"]["end_1m"])]
    total = len(HELDOUT_SETS[set_name]) * len(SHAPES)
    out = ["", f"### Held-out set {set_name}: seeds {', '.join(map(str, HELDOUT_SETS[set_name]))} "
           f"({cells} of {total} cells done)", "",
           f"Runs {min(r['utc'] for r in mine)} to {max(r['utc'] for r in mine)}"
           + (f"; load average (1-min, at the start and end of each run, recorded since seed 102 step) "
              f"{min(loads):.1f}-{max(loads):.1f} on the 2 cores" if loads else "")
           + ".  Figures are tuned / untuned / best fixed; load is tuned / untuned (1-min, start->end).", "",
           "| seed | shape | attainment | throughput (tok/s) | tokens an answer | band share | "
           "tuned batch moves (s away from 8) | tuned precision | load |", "|---|---|---|---|---|---|---|---|---|",
           *rows, "",
           "Noise (untuned run twice in the same cell):", "",
           "| seed | shape | attainment | throughput | spread | spread |", "|---|---|---|---|---|---|",
           *noise_rows, "",
           f"Noise band used: {att_noise * 100:.1f} points of attainment, {thr_noise:.1%} of throughput (the "
           "largest spread of the repeated cells).", "", *late_rows(mine),
           "#### The goals of issue 14 §2, cell by cell", "",
           "Never worse: tuned against untuned, worse only when it loses more than 5 points / 5% *and* more than "
           "the noise band; the next column applies the 5% alone, to show what the noise allowance forgives.  Batch: "
           "tuned attainment against the best fixed setting's, throughput against 95% of it, the same noise rule "
           "(missed = short by more than 5 points / 5% and more than the noise band).  Temperature: tuned windows in "
           "the band after the warm-up (>= 90% to meet) and the mean distance of the tuned temperatures from the "
           f"request against the best fixed temperature's ({fmt(fixed_t, 'g')}; met when closer).", "",
           "| seed | shape | never worse (noise rule) | never worse (5% alone) | batch: attainment >= fixed | "
           "batch: throughput >= 95% fixed | temperature: band >= 90% | temperature: distance tuned vs fixed |",
           "|---|---|---|---|---|---|---|---|", *goal_rows, ""]
    prec = [(r["seed"], r["shape"], m) for r in tuned for m in r["precision_moves"]]

    def cells_text(key: str) -> str:
        return f"{cells - len(miss[key])} of {cells} cells" + (f"; missed: {', '.join(miss[key])}" if miss[key]
                                                                 else "")

    out += [
        "| goal | measured | |", "|---|---|---|",
        f"| never worse than untuned (every cell, noise rule) | {cells - len(worse)} of {cells} cells not worse"
        + (f"; worse: {'; '.join(worse)}" if worse else "") + f" | {ok(not worse and cells > 0)} |",
        f"| (the same by 5% alone, no noise allowance) | {cells - len(strict)} of {cells} cells"
        + (f"; worse: {'; '.join(strict)}" if strict else "") + " | - |",
        f"| batch: attainment >= the best fixed setting's | {cells_text('batch attainment')} | "
        f"{ok(not miss['batch attainment'] and cells > 0)} |",
        f"| batch: throughput >= 95% of the best fixed setting's | {cells_text('batch throughput')} | "
        f"{ok(not miss['batch throughput'] and cells > 0)} |",
        f"| temperature: >= 90% of windows in the band after {BAND_WARMUP_S:g} s | {cells_text('band')}; "
        f"pooled over the tuned runs' windows {fmt(pooled, '.0%')} (best fixed T {fmt(fixed_t, 'g')}: "
        f"{fmt(fixed_pooled, '.0%')})"
        + (f"; Mirostat tau 5 (seed {mirostat[0]['seed']}): "
           f"{', '.join(r['shape'] + ' ' + fmt(r['band_share'], '.0%') for r in mirostat)}" if mirostat else "")
        + f" | {ok(not miss['band'] and cells > 0)} |",
        f"| temperature: closer to the request than the best fixed temperature | {cells_text('distance')} | "
        f"{ok(not miss['distance'] and cells > 0)} |",
        f"| interplay: precision steps in tuned runs | {len(prec)}"
        + (": " + "; ".join(f"seed {s} {sh} {m[1]} at {m[0]} s ({m[2]})" for s, sh, m in prec) if prec else "")
        + " | - |",
    ]
    if worst is not None:
        out += ["", f"Worst cell (the largest loss to untuned, attainment points or throughput share): {worst[1]} "
                f"({worst[0] * 100:+.1f})."]
    if missing:
        out += ["", f"Cells not done yet: {', '.join(missing)}."]
    out += ["", "<details><summary>Command of every run (UTC time, 1-min load average at its start -> end)</summary>",
            "", *cmds, "", "</details>"]
    return out


# -- the leak on every shape (issue 14 §2: "leak contained on every shape with one") -------------------------------
LEAK_SHAPES_FILE = Path(os.environ.get("TUNER_EFFECT_LEAK_SHAPES_FILE",
                                       str(ROOT / "tests" / "bench" / "effects_leak_shapes.jsonl")))
"""Runs of ``test_leak_by_shape`` (one line per run; resumes where the file stops)."""
LEAK_SHAPES_SEED_TEXT = os.environ.get("TUNER_EFFECT_LEAK_SEED", "154")
LEAK_SHAPES_SEED = int(LEAK_SHAPES_SEED_TEXT) if LEAK_SHAPES_SEED_TEXT.isdigit() else -1
"""A seed no policy was developed or judged on (the held-out sets use 101-140; the next one, H9, 141-145).  The
seeds before it are kept as runs not judged (``LEAK_OTHER``)."""
LEAK_OTHER = {
    150: "the tuned arm with the preset's leak watch as shipped (`-preset`): 442 requests in 90 s never reach its "
         "1,000 before the first test, so no test ran and no cleanup; stopped after steady",
    151: "the sensitive leak watch before the cleanup policy sampled its series from the window (46fedc5): sampled "
         "once a second at decide time, under burst's batch changes every ~20 s (each restarts the series) no test "
         "ever had its 20 points — no cleanup while RSS grew +409%; steady and step were cleaned up twice each, "
         "every ~31 s, a sawtooth whose last-20% floor sat at +11.9% / +104.9% (the 3-point rule missed both); "
         "stopped after burst (its no-leak run started while the fix was being written)",
    152: "after 46fedc5, before f48d8c7: steady and step contained (-0.7% and +23.2% against untuned +160.5% and "
         "+297.0%), burst not (+210.2% against +380.9%): the preset's 30 s cleanup cooldown rejected the cleanup at "
         "42.2 s, the batch changed at 44.7 s and restarted the series, the next one went out at 63.4 s (ramp's "
         "tuned run the same: held at 53.5 s, out at 64.2 s); stopped during ramp for the fix",
    153: "after f48d8c7, before 38ec366: contained on all 5 shapes, but one leak-triggered cleanup in a run without "
         "the leak (ramp, 41.6 s, 20 s after the batch went 8 -> 16: RSS +129 MB per 1,000 requests, p = 0.0013, "
         "while the C heap's allocated stayed flat — its own free pages back in use; gc for nothing, 57 MB trimmed "
         "that were in use again within a second)",
}
"""Runs of other seeds: why they are not judged."""
LEAK_ARMS = ("untuned-leak", "tuned-leak", "tuned-noleak")
LEAK_REAL = 0.20
"""The leak is there in a shape when the untuned run's RSS floor grows by at least this much."""
LEAK_CONTAINED_PTS = 0.03
LEAK_CONTAINED_SHARE = 0.25
"""Contained: the tuned run's RSS floor growth with the leak is within 3 points of the same policy's growth without
it on the same stream (what the batch moves alone cost), under 3% (the in-sample goal, ``test_leak_cleanup``), or at
most a quarter of the untuned run's growth with the leak.  The last clause was added after seed 151 and before seed
152: a leak test needs 150 requests after each cleanup, so over 90 s the floor saws (seed 151 steady: cleanups at
31 s and 63 s, 217 MB each, the last-20% floor +11.9% against untuned +162%) and where the run ends on that saw
decides the 3-point rule."""


def leak_policy(trace_dir: Path) -> str:
    """The tuned arm's policy (``tuned_policy``: the ``interactive`` preset) with the leak watch as sensitive as
    the in-sample leak test's (``LEAK_POLICY``: a test on 150 requests every 10 s): the preset's 1,000 requests
    and 60 s are for servers that run for hours, and a 90 s run at 5 requests/s finishes ~450."""
    tables = interactive_tables()
    tables["cleanup"].update(LEAK_POLICY["cleanup"])
    return str(write_policy(trace_dir / "interactive-t05-leakwatch.toml", tables))


def leak_shape_run(trace_dir: Path, seed: int, shape: str, arm: str, policy: str,
                   capacity: float | None) -> dict[str, Any]:
    """One run of the leak-by-shape matrix: the held-out figures plus the RSS floors and the cleanups sent."""
    args = heldout_args(seed, shape, policy=policy if arm.startswith("tuned") else None, capacity=capacity)
    if arm.endswith("-leak"):
        args.append("--leak")
    load0 = os.getloadavg()
    run = run_demo(trace_dir, f"L-s{seed}-{shape}-{arm}", args, report=False, timeout=HELDOUT_S + 900)
    load1 = os.getloadavg()
    rss = rss_figures(run)
    cl = cleanups(run)
    reclaimed = [c["reclaimed"] for c in cl if isinstance(c.get("reclaimed"), (int, float))]
    rec = {"seed": seed, "shape": shape, "arm": arm, "utc": stamp(), "commit": git_commit(),
           "command": "tuner demo --headless " + " ".join(Path(a).name if a == policy else a for a in args),
           **heldout_figures(run), "rss_start_mib": rss.start_floor / 2**20, "rss_end_mib": rss.end_floor / 2**20,
           "rss_growth": rss.growth,
           "rss_peak_growth": rss.peak / rss.start_floor - 1.0, "cleanups": len(cl),
           "leak_cleanups": sum(1 for c in cl if (c.get("evidence") or {}).get("trigger") in LEAK_TRIGGERS),
           "reclaimed_mib": statistics.fmean(reclaimed) / 2**20 if reclaimed else None,
           "load": load_record(load0, load1)}
    append_record(LEAK_SHAPES_FILE, rec)
    print(f"  [leak seed {seed} {shape} {arm}] RSS floor {rec['rss_growth']:+.1%}, {len(cl)} cleanups, attainment "
          f"{fmt(rec['attainment'], '.1%')}, exit {rec['exit']}", flush=True)
    return rec


def leak_verdicts(recs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], bool | None, str]]:
    """Per shape with all three arms: (shape, arms, contained or None when the leak was not there, why)."""
    out: list[tuple[str, dict[str, Any], bool | None, str]] = []
    for shape in SHAPES:
        arms = {r["arm"]: r for r in recs if r["shape"] == shape}
        if not all(a in arms for a in LEAK_ARMS):
            continue
        u, t, n = arms["untuned-leak"], arms["tuned-leak"], arms["tuned-noleak"]
        if u["rss_growth"] < LEAK_REAL:
            out.append((shape, arms, None, f"no leak to contain (untuned {u['rss_growth']:+.1%})"))
            continue
        allowed = max(LEAK_CONTAINED_PTS, n["rss_growth"] + LEAK_CONTAINED_PTS, LEAK_CONTAINED_SHARE * u["rss_growth"])
        good = t["rss_growth"] <= allowed and t["exit"] == 0
        out.append((shape, arms, good, f"{t['rss_growth']:+.1%} against <= {allowed:+.1%} (untuned "
                    f"{u['rss_growth']:+.1%}, tuned without the leak {n['rss_growth']:+.1%})"))
    return out


def leak_row(r: dict[str, Any]) -> str:
    moves = " ".join(str(m[1]) for m in r.get("batch_moves") or []) or "-"
    return (f"| {r['seed']} | {r['shape']} | {r['arm']} | {r['rss_start_mib']:.0f} -> {r['rss_end_mib']:.0f} | "
            f"{r['rss_growth']:+.1%} | {r['rss_peak_growth']:+.0%} | {r['cleanups']} ({r['leak_cleanups']}) | "
            f"{fmt(r['reclaimed_mib'], '.0f')} | {fmt(r['attainment'], '.1%')} | {fmt(r['throughput'])} | {moves} | "
            f"{r['exit']} | {r['utc'][11:16]} | {load_text(r)} |")


def render_leak_shapes(recs: list[dict[str, Any]], seed: int = LEAK_SHAPES_SEED) -> str:
    """The section: ``seed``'s three arms per shape and the goals; other runs (the preset's leak watch as shipped)
    listed after them."""
    mine = [r for r in recs if r["seed"] == seed and r["arm"] in LEAK_ARMS]
    other = [r for r in recs if r not in mine]
    utc = sorted(r["utc"] for r in mine)
    head = ("| seed | shape | arm | RSS floor first -> last 20% (MiB) | floor growth | peak "
            "| cleanups (leak-triggered) | mean reclaimed (MiB) | attainment | throughput (tok/s) | batch moves | exit "
            "| UTC | load |")
    out = ["## The leak on every shape (issue 14: cleanup held out)", "",
           f"Rendered {stamp()} from `tests/bench/effects_leak_shapes.jsonl`; runs {utc[0] if utc else '-'} to "
           f"{utc[-1] if utc else '-'}.  Seed {seed} (never used to develop or judge a policy), the five held-out "
           "shapes, 90 s of arrivals each, three arms: untuned with `--leak` (every request's KV tensors kept in a "
           "never-evicted prefix cache, ~1 MB a request), tuned with `--leak`, and the same tuned policy without "
           "the leak (what the batch moves alone do to memory, and the storm check).  Tuned = the held-out "
           "matrix's policy (the `interactive` preset, T 0.5 requested) with its leak watch as sensitive as the "
           "in-sample leak test's (a test on 150 requests every 10 s, where the preset waits for 1,000 requests "
           "and tests once a minute: a 90 s run at 5 requests/s finishes ~450).  RSS floor = the least RSS of the "
           "process tree over the first / last 20% of the requests.  Contained = the tuned run's floor growth "
           f"with the leak at most {LEAK_CONTAINED_PTS:.0%} above the tuned run's without it, under "
           f"{LEAK_CONTAINED_PTS:.0%}, or at most {LEAK_CONTAINED_SHARE:.0%} of the untuned run's (the last "
           f"clause added after seed 151's sawtooth, before seed {seed} ran).  `make effects "
           "EFFECTS_K=leak_by_shape` (resumes where the file stops).", "", head, "|---" * 14 + "|"]
    for shape in SHAPES:
        for arm in LEAK_ARMS:
            r = next((x for x in mine if x["shape"] == shape and x["arm"] == arm), None)
            if r is not None:
                out.append(leak_row(r))
    verdicts = leak_verdicts(mine)
    noleak = [r for r in mine if r["arm"] == "tuned-noleak"]
    storms = [r for r in noleak if r["leak_cleanups"] > 0]
    contained = [s for s, _, v, _ in verdicts if v]
    missed = [f"{s}: {why}" for s, _, v, why in verdicts if v is False]
    absent = [f"{s}: {why}" for s, _, v, why in verdicts if v is None]
    judged = sum(1 for v in verdicts if v[2] is not None)
    out += ["", "| goal | measured | |", "|---|---|---|",
            f"| leak contained on every shape with one | {len(contained)} of {judged} shapes"
            + (f"; missed: {'; '.join(missed)}" if missed else "")
            + (f"; without a leak to contain: {'; '.join(absent)}" if absent else "") + " | "
            f"{ok(not missed and bool(contained) and len(verdicts) == len(SHAPES))} |",
            f"| no cleanup storm without a leak (leak-triggered cleanups in the tuned runs without it) | "
            f"{sum(r['leak_cleanups'] for r in noleak)} in {len(noleak)} runs | {ok(not storms and bool(noleak))} |"]
    if verdicts:
        out += ["", "Per shape: " + "; ".join(f"{s} {why}" for s, _, _, why in verdicts) + "."]
    if other:
        seeds = sorted({r["seed"] for r in other})
        out += ["", "Other runs (not judged): " + "; ".join(f"seed {s}: {LEAK_OTHER.get(s, 'not the judged seed')}"
                                                          for s in seeds) + ".", "", head, "|---" * 14 + "|",
                *map(leak_row, other)]
    out += ["", "<details><summary>Command of every run</summary>", "",
            *[f"- seed {r['seed']} {r['shape']} {r['arm']} ({r['utc'][11:16]}): `{r['command']}`" for r in recs],
            "", "</details>"]
    return "\n".join(out).rstrip()


@pytest.mark.timeout(int(HELDOUT_BUDGET_S) + 3600)
def test_leak_by_shape(trace_dir: Path) -> None:
    """Issue 14 §2, cleanup: the leak contained on every shape with one, no storm on any without.  Each shape's
    first run measures the capacity its later runs are given (the same stream); resumes where the file stops."""
    recs = load_heldout(LEAK_SHAPES_FILE)
    pol = leak_policy(trace_dir)
    deadline = time.monotonic() + HELDOUT_BUDGET_S
    if LEAK_SHAPES_SEED < 0:  # the user's setting: one line, no traceback
        pytest.fail(f"TUNER_EFFECT_LEAK_SEED: {LEAK_SHAPES_SEED_TEXT!r} is not a seed (a whole number, e.g. 154)",
                    pytrace=False)
    seed = LEAK_SHAPES_SEED
    for i, shape in enumerate(SHAPES):
        pair = list(LEAK_ARMS[:2]) if i % 2 == 0 else list(LEAK_ARMS[1::-1])
        have = {r["arm"] for r in recs if (r["seed"], r["shape"]) == (seed, shape)}
        for arm in [*pair, LEAK_ARMS[2]]:
            if arm in have:
                continue
            if time.monotonic() > deadline:
                break
            cap = next((float(r["capacity_rps"]) for r in recs if (r["seed"], r["shape"]) == (seed, shape)
                        and r.get("capacity_measured")), None) if shape != "steady" else None
            recs.append(leak_shape_run(trace_dir, seed, shape, arm, pol, cap))
    mine = [r for r in recs if r["seed"] == seed]
    write_section("leak-shapes", render_leak_shapes(recs))
    assert all(r["exit"] == 0 for r in mine), [(r["shape"], r["arm"], r["exit"]) for r in mine if r["exit"]]
    verdicts = leak_verdicts(mine)
    assert len(verdicts) == len(SHAPES), "the budget ran out before every shape was run: run again to resume"
    assert [why for _, _, v, why in verdicts if v is False] == []
    assert not [r for r in mine if r["arm"] == "tuned-noleak" and r["leak_cleanups"] > 0]
