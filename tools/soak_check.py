"""Check a soak run's trace: the sidecar's own RSS stays flat, the inference's memory stays controlled,
the trace is complete.  ``make soak`` runs it after ``tuner demo --headless --leak --duration 900 --policy
interactive``; by hand::

    .venv/bin/python tools/soak_check.py TRACE [--workload STDOUT_FILE] [--json]

``--workload`` is the demo's stdout (the workload's own JSON summary line): its request count must equal
the trace's, and its leak size gives what the inference would have grown to without cleanups.

Checks (each printed with its figures, exit 1 if one fails):

- trace complete: it has its end record; the end record's tick count equals the ticks in the file; no tick
  gap over ``--max-gap`` seconds; no line the reader had to skip; no channel drops; every request the
  workload finished is in it.
- sidecar RSS flat (``self_rss_bytes``, after ``--warmup`` seconds): the last minute's median within
  ``--max-sidecar-growth-mib`` of the first minute's, and the least-squares slope of the second half under
  ``--max-sidecar-slope-mib-min``.
- inference memory controlled (``tree_rss_bytes``): the peak of the last third of the run no higher than
  ``--max-peak-ratio`` times the peak before it (a leak that the cleanups did not hold grows every third),
  and, with ``--workload``, the peak under ``--max-uncontrolled-share`` of what the leak alone would have
  reached (start + leak per request x requests).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tuner.trace import TraceData, TraceError, read_trace  # noqa: E402

MIB = 1 << 20


def workload_summary(path: Path) -> dict[str, Any] | None:
    """The last ``{"workload": ...}`` JSON line of the demo's stdout."""
    found = None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"workload"' in line:
            try:
                found = json.loads(line)
            except ValueError:
                continue
    return found


def _window(t: np.ndarray, v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    sel = (t >= lo) & (t < hi) & np.isfinite(v)
    return v[sel]


def _slope_per_min(t: np.ndarray, v: np.ndarray) -> float:
    ok = np.isfinite(v)
    if ok.sum() < 10:
        return float("nan")
    return float(np.polyfit(t[ok], v[ok], 1)[0] * 60.0)


def check(d: TraceData, work: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    t = d.times
    duration = d.duration
    out: dict[str, Any] = {"trace": str(d.path), "duration_s": round(duration, 1), "ticks": len(t),
                           "policies": d.header.get("policies"), "policy": d.header.get("policy")}
    verdicts: dict[str, bool] = {}

    # -- complete ------------------------------------------------------------------------------------
    end = d.end or {}
    gaps = np.diff(t) if len(t) > 1 else np.array([0.0])
    requests = d.requests()
    dropped = d.column("chan_dropped_total")
    out["complete"] = {
        "end_record": d.end is not None,
        "end_ticks": end.get("ticks"),
        "skipped_ticks": end.get("skipped", d.skipped),
        "max_tick_gap_s": round(float(gaps.max()), 3),
        "unreadable_lines": len(d.warnings),
        "channel_dropped": int(np.nanmax(dropped)) if np.isfinite(dropped).any() else 0,
        "requests_in_trace": len(requests),
        "requests_done_by_workload": work.get("requests_done") if work else None,
        "exit_code": end.get("exit_code"),
    }
    c = out["complete"]
    verdicts["trace complete"] = bool(
        c["end_record"] and c["end_ticks"] == len(t) and c["max_tick_gap_s"] <= args.max_gap
        and c["unreadable_lines"] == 0 and c["channel_dropped"] == 0
        and (work is None or c["requests_in_trace"] == c["requests_done_by_workload"])
    )

    # -- the sidecar's own RSS -------------------------------------------------------------------------
    rss = d.column("self_rss_bytes") / MIB
    first = _window(t, rss, args.warmup, args.warmup + 60)
    last = _window(t, rss, duration - 60, duration + 1)
    half = t >= args.warmup + (duration - args.warmup) / 2
    side = {
        "first_minute_median_mib": round(float(np.median(first)), 1) if len(first) else None,
        "last_minute_median_mib": round(float(np.median(last)), 1) if len(last) else None,
        "max_mib": round(float(np.nanmax(rss)), 1) if np.isfinite(rss).any() else None,
        "slope_second_half_mib_per_min": round(_slope_per_min(t[half], rss[half]), 3),
    }
    if side["first_minute_median_mib"] is not None and side["last_minute_median_mib"] is not None:
        side["growth_mib"] = round(side["last_minute_median_mib"] - side["first_minute_median_mib"], 1)
    out["sidecar_rss"] = side
    verdicts["sidecar RSS flat"] = bool(
        side.get("growth_mib") is not None and side["growth_mib"] <= args.max_sidecar_growth_mib
        and side["slope_second_half_mib_per_min"] <= args.max_sidecar_slope_mib_min
    )

    # -- the inference's memory ----------------------------------------------------------------------
    tree = d.column("tree_rss_bytes") / MIB
    cut = duration * 2 / 3
    before, after = _window(t, tree, 0, cut), _window(t, tree, cut, duration + 1)
    start = _window(t, tree, 0, 30)
    cleanups = [e.data for e in d.events if e.kind == "command_result" and e.data.get("cmd") == "cleanup"]
    reclaimed = [float((r.get("result") or {}).get("reclaimed_bytes") or 0) for r in cleanups if r.get("ok")]
    inf: dict[str, Any] = {
        "start_mib": round(float(np.median(start)), 1) if len(start) else None,
        "peak_first_two_thirds_mib": round(float(before.max()), 1) if len(before) else None,
        "peak_last_third_mib": round(float(after.max()), 1) if len(after) else None,
        "end_mib": round(float(after[-1]), 1) if len(after) else None,
        "cleanups_ok": len(reclaimed),
        "cleanups_failed": len(cleanups) - len(reclaimed),
        "reclaimed_total_mib": round(sum(reclaimed) / MIB, 1),
    }
    if work and work.get("leak_entries"):
        per_req = work["leak_bytes"] / work["leak_entries"]
        inf["leak_per_request_mib"] = round(per_req / MIB, 3)
        if inf["start_mib"] is not None:
            inf["uncontrolled_projection_mib"] = round(inf["start_mib"] + per_req * len(requests) / MIB, 1)
    peak = max(inf["peak_first_two_thirds_mib"] or 0.0, inf["peak_last_third_mib"] or 0.0)
    if inf.get("uncontrolled_projection_mib"):
        inf["peak_over_uncontrolled_ratio"] = round(peak / inf["uncontrolled_projection_mib"], 3)
    out["inference_memory"] = inf
    verdicts["inference memory controlled"] = bool(
        inf["peak_first_two_thirds_mib"] and inf["peak_last_third_mib"] is not None
        and inf["peak_last_third_mib"] <= args.max_peak_ratio * inf["peak_first_two_thirds_mib"]
        and inf.get("peak_over_uncontrolled_ratio", 0.0) <= args.max_uncontrolled_share
    )

    out["actions"] = dict(Counter(f"{a.get('policy')}:{a.get('outcome')}" for a in d.actions))
    out["verdicts"] = verdicts
    return out


def render(r: dict[str, Any]) -> str:
    lines = [f"soak check: {r['trace']}  ({r['duration_s']} s, {r['ticks']} ticks, policy {r['policy']}: "
             f"{', '.join(r['policies'] or [])})"]
    for title, key in (("trace complete", "complete"), ("sidecar RSS flat", "sidecar_rss"),
                       ("inference memory controlled", "inference_memory")):
        ok = r["verdicts"][title]
        lines.append(f"  {title}: {'PASS' if ok else 'FAIL'}")
        lines.extend(f"    {k}: {v}" for k, v in r[key].items())
    lines.append(f"  actions: {r['actions']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/soak_check.py", description=__doc__.split("\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--workload", type=Path, help="the demo's stdout (its workload summary line)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds ignored for the sidecar RSS (default 60)")
    ap.add_argument("--max-gap", type=float, default=2.0, help="longest tick gap allowed, s (default 2)")
    ap.add_argument("--max-sidecar-growth-mib", type=float, default=16.0, help="default 16")
    ap.add_argument("--max-sidecar-slope-mib-min", type=float, default=1.0, help="default 1")
    ap.add_argument("--max-peak-ratio", type=float, default=1.25, help="default 1.25")
    ap.add_argument("--max-uncontrolled-share", type=float, default=0.6, help="default 0.6")
    args = ap.parse_args(argv)
    try:
        d = read_trace(args.trace)
    except (OSError, TraceError) as exc:
        print(f"soak_check: cannot read {args.trace}: {exc}", file=sys.stderr)
        return 2
    work = workload_summary(args.workload) if args.workload else None
    if args.workload and work is None:
        print(f"soak_check: no workload summary line in {args.workload}", file=sys.stderr)
        return 2
    r = check(d, work, args)
    print(json.dumps(r) if args.json else render(r))
    return 0 if all(r["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
