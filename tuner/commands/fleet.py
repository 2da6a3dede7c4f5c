"""``tuner fleet --prometheus URL``: every sidecar a Prometheus server scrapes, in one view (or ``--once``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from tuner.errors import UserError

if TYPE_CHECKING:
    from tuner.fleet import Fleet


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet",
        help="one view of every sidecar a Prometheus server scrapes (PromQL over its HTTP API)",
        description="A row per replica — TTFT p95 from the histograms, tokens/s, memory headroom and the binding "
        "limit, knobs, last action, OOM kills — and the fleet's totals and percentiles (histogram_quantile over "
        "the summed buckets).  s sorts, enter shows a replica's detail.  --once prints it (--json for scripts).",
    )
    p.add_argument("--prometheus", required=True, metavar="URL", help="the Prometheus server (http://HOST:9090)")
    p.add_argument("--match", default="", metavar="LABELS",
                   help='label matchers for every series, e.g. job="tuner",namespace="prod" (default: all)')
    p.add_argument("--by", default="instance", metavar="LABEL",
                   help="the label that tells replicas apart (default instance; pod under Kubernetes)")
    p.add_argument("--window", default="1m", metavar="DUR",
                   help="rate and percentile window, a Prometheus duration (default 1m: at least 4 scrapes)")
    p.add_argument("--refresh", type=float, default=5.0, metavar="S", help="seconds between refreshes (default 5)")
    p.add_argument("--sort", default="replica", metavar="COLUMN",
                   help="order of the rows: replica (default), status, ttft, tpot, tokens, requests, headroom, "
                   "binding, knobs, action (newest first), oom; replicas without the value last")  # fmt: skip
    p.add_argument("--reverse", action="store_true", help="the other way round (--sort)")
    p.add_argument("--once", action="store_true", help="print the fleet once as a table and exit (no terminal UI)")
    p.add_argument("--json", action="store_true", help="with --once: print it as JSON (implies --once)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per-query timeout (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tuner.fleet import PromClient, PromError, fetch_fleet
    from tuner.fleet.view import check_options

    if not (0.2 <= args.refresh <= 3600):
        raise UserError(f"--refresh {args.refresh:g} is out of range: 0.2 to 3600 s")
    if not (0.1 <= args.timeout <= 300):
        raise UserError(f"--timeout {args.timeout:g} is out of range: 0.1 to 300 s")
    from tuner.fleet.table import COLUMNS, sorted_rows

    keys = [c.key for c in COLUMNS]
    if args.sort not in keys:
        raise UserError(f"--sort {args.sort!r}: one of {', '.join(keys)}")
    try:
        client = PromClient(args.prometheus, timeout=args.timeout)
        check_options(args.by, args.window, args.match)
    except PromError as exc:
        raise UserError(str(exc)) from None

    def fetch() -> Fleet:
        return fetch_fleet(client, by=args.by, window=args.window, match=args.match)

    if args.once or args.json:
        try:
            fleet = fetch()
        except PromError as exc:
            raise UserError(str(exc)) from None
        if not fleet.replicas:
            from tuner.fleet.table import empty_text

            raise UserError(empty_text(fleet))
        fleet.replicas = sorted_rows(fleet.replicas, args.sort, args.reverse)
        if args.json:
            json.dump(fleet.to_json(), sys.stdout, indent=2, allow_nan=False)
            sys.stdout.write("\n")
        else:
            print(render_text(fleet))
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError("tuner fleet needs a terminal (stdin and stdout are not a tty); for text use --once "
                        "(--json for scripts)")  # fmt: skip
    from tuner.fleet import Replica
    from tuner.fleet.view import replica_detail
    from tuner.tui.fleet import FleetApp

    def light() -> Fleet:  # each refresh: the percentiles the rows and totals show; the rest on Enter
        return fetch_fleet(client, by=args.by, window=args.window, match=args.match, rows_only=True)

    def detail(r: Replica) -> Replica:
        return replica_detail(client, r, by=args.by, window=args.window, match=args.match)

    FleetApp(light, refresh=args.refresh, detail=detail, sort=args.sort, reverse=args.reverse).run()
    return 0


def render_text(fleet: Fleet) -> str:
    """The table ``--once`` prints: the view's columns, then the totals."""
    from tuner.fleet.table import COLUMNS, totals_text

    rows = [[c.title for c in COLUMNS]]
    rows += [[c.cell(r) for c in COLUMNS] for r in fleet.replicas]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    head = f"{fleet.prometheus}  window {fleet.window}  by {fleet.by}"
    return "\n".join([head, *lines, "", totals_text(fleet)])
