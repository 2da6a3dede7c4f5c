"""Options shared by ``tuner run``, ``tuner attach`` and ``tuner demo``."""

from __future__ import annotations

import argparse

from tuner.session import SessionOptions, check_interval


def add_session_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recording")
    g.add_argument(
        "--interval",
        type=float,
        default=0.1,
        metavar="S",
        help="seconds between samples, 0.001-1 (default 0.1 = 10 Hz)",
    )
    g.add_argument("--trace", metavar="PATH", help="trace file to write (default ./traces/<UTC time>-<command>.jsonl)")
    g.add_argument("--headless", action="store_true", help="no TUI; print a summary at the end")
    g.add_argument("--prometheus", metavar="ADDR", help="serve /metrics for Prometheus on ADDR (e.g. 127.0.0.1:9464)")
    g.add_argument("--prometheus-public", action="store_true", help="allow --prometheus on a non-loopback address")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")


def session_options(args: argparse.Namespace) -> SessionOptions:
    return SessionOptions(
        interval=check_interval(args.interval),
        trace=args.trace,
        prometheus=args.prometheus,
        prometheus_public=args.prometheus_public,
        quiet=args.quiet,
    )
