"""``tuner export TRACE --to csv|parquet|perfetto OUT [--skip-bad]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuner.errors import UserError

FORMATS = ("csv", "parquet", "perfetto")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="convert a trace to CSV, Parquet or a Perfetto (Chrome trace-event JSON) file",
        description="Convert a trace: CSV (one row per tick), Parquet (ticks, plus OUT.events.parquet with "
        "events, actions and notes) or Perfetto JSON that opens at ui.perfetto.dev.",
    )
    p.add_argument("trace", metavar="TRACE", help="trace file (.jsonl)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("out", metavar="OUT", help="file to write")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed lines in the middle of the trace instead of stopping"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tuner.commands._common import check_not_a_trace, require_path
    from tuner.commands.report import check_output
    from tuner.outputs import export
    from tuner.trace import read_trace

    require_path(args.trace, "TRACE")
    require_path(args.out, "OUT")
    outputs = [args.out]
    if args.to == "parquet":
        outputs.append(str(export.events_path(Path(args.out))))
    for out in outputs:  # before reading: a wrong OUT fails fast and never replaces a recording
        check_output(out)
        check_not_a_trace(out, (args.trace,))
    try:
        data = read_trace(args.trace, skip_bad=args.skip_bad)
    except MemoryError:
        raise UserError(f"{args.trace}: too large to load into memory") from None
    except OSError as exc:
        raise UserError(f"cannot read {args.trace}: {exc.strerror or exc}") from None
    for w in data.warnings:
        print(f"tuner: warning: {w}", file=sys.stderr)
    written = export.export(data, args.to, args.out)
    print(f"tuner: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
