"""``tuner report TRACE [--json] [--skip-bad]``: summary statistics, memory trend and leak verdict."""

from __future__ import annotations

import argparse
import json
import sys

from tuner.errors import UserError


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
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed lines in the middle of the trace instead of stopping"
    )
    p.set_defaults(func=run)


def load_summary(path: str, *, skip_bad: bool) -> dict:
    """Read and summarize a trace; reader warnings go to stderr.  Shared with future outputs (HTML)."""
    from tuner.report import summarize
    from tuner.trace import read_trace

    try:
        data = read_trace(path, skip_bad=skip_bad)
    except MemoryError:
        raise UserError(f"{path}: too large to load into memory") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    for w in data.warnings:
        print(f"tuner: warning: {w}", file=sys.stderr)
    return summarize(data)


def run(args: argparse.Namespace) -> int:
    summary = load_summary(args.trace, skip_bad=args.skip_bad)
    if args.json:
        json.dump(summary, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        from tuner.report import render_text

        print(render_text(summary))
    return 0
