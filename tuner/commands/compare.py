"""``tuner compare A B [--html OUT] [--json]``: two traces side by side, ratios B/A and a verdict per figure."""

from __future__ import annotations

import argparse
import json
import sys

from tuner.commands.report import check_output, load, write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two traces (before/after tuning, policy X vs Y): ratios B/A and a verdict per figure",
        description="Compare two traces figure by figure: the same numbers as 'tuner report' for A and B, "
        "the ratio B/A and whether B is better, worse or about the same.  A figure only one trace has is "
        "shown as missing on the other side.",
    )
    p.add_argument("a", metavar="A", help="the reference trace (before)")
    p.add_argument("b", metavar="B", help="the trace to judge against A (after)")
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML page with the figures side by side")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip malformed lines in the middle of a trace instead of stopping"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tuner.outputs.html_report import compare, render_compare, render_compare_text

    if args.html is not None:
        from tuner.commands._common import check_not_a_trace, require_path

        require_path(args.html, "--html")
        check_output(args.html)
        check_not_a_trace(args.html, (args.a, args.b), option="--html")
    a_data, a_sum = load(args.a, skip_bad=args.skip_bad)
    b_data, b_sum = load(args.b, skip_bad=args.skip_bad)
    result, pairs = compare(a_data, a_sum, b_data, b_sum, draw=bool(args.html))
    if args.html:
        write_text(args.html, render_compare(result, pairs, a_sum, b_sum))
        print(f"tuner: wrote {args.html}", file=sys.stderr)
    if args.json:
        json.dump(result, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(render_compare_text(result))
    return 0
