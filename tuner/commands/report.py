"""``tuner report TRACE [--json] [--html OUT] [--skip-bad]``: summary statistics, memory trend, leak verdict."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.errors import UserError

if TYPE_CHECKING:
    from tuner.trace import TraceData


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarize a trace: resource statistics, memory trend, leak verdict, request latencies",
        description="Summarize a recorded trace: per-metric min/median/p95/max, peak RSS, memory trend per "
        "minute and per 1,000 requests with a leak verdict, request latencies and the actions taken.",
    )
    p.add_argument("trace", metavar="TRACE", help="trace file (.jsonl) written by tuner run/attach/demo")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    out.add_argument(
        "--html",
        metavar="OUT",
        help="also write a self-contained HTML report with plots to OUT (no network needed to view it)",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed lines in the middle of the trace instead of stopping"
    )
    p.set_defaults(func=run)


def load(path: str, *, skip_bad: bool) -> tuple[TraceData, dict[str, Any]]:
    """Read and summarize a trace; reader warnings go to stderr.  Shared with ``tuner compare``."""
    from tuner.commands._common import require_path
    from tuner.outputs.report import summarize
    from tuner.trace import read_trace

    require_path(path, "TRACE")
    try:
        data = read_trace(path, skip_bad=skip_bad)
    except MemoryError:
        raise UserError(f"{path}: too large to load into memory") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    for w in data.warnings:
        print(f"tuner: warning: {w}", file=sys.stderr)
    return data, summarize(data)


def check_output(path: str) -> None:
    """Refuse an output path that cannot be a file before doing the work (one-line error)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a directory: give a file name to write")
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"cannot write {p}: {parent} is not a directory")


def write_text(path: str, text: str) -> None:
    """Write an output file (via a temporary next to it): a one-line error when it cannot be written."""
    p = Path(path)
    check_output(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(p)
    except OSError as exc:
        raise UserError(f"cannot write {p}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.html is not None:
        from tuner.commands._common import check_not_a_trace, require_path

        require_path(args.html, "--html")
        check_output(args.html)
        check_not_a_trace(args.html, (args.trace,), option="--html")
    data, summary = load(args.trace, skip_bad=args.skip_bad)
    if args.html:
        from tuner.outputs.html_report import render_report

        write_text(args.html, render_report(data, summary))
        print(f"tuner: wrote {args.html}", file=sys.stderr)
    if args.json:
        json.dump(summary, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        from tuner.outputs.report import render_text

        print(render_text(summary))
    return 0
