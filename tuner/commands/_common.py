"""Options shared by ``tuner run``, ``tuner attach`` and ``tuner demo``."""

from __future__ import annotations

import argparse

from tuner.errors import UserError
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
    g.add_argument(
        "--record-text",
        action="store_true",
        help="also record prompt/response text in the trace (off by default: traces hold numbers only)",
    )
    t = p.add_argument_group("tuning")
    t.add_argument(
        "--policy",
        metavar="P",
        help="run the policies of a preset (interactive, offline, edge) or a TOML file; default: observe only",
    )
    t.add_argument(
        "--observe-only",
        action="store_true",
        help="with --policy: record what the policies would do, change nothing",
    )


def session_options(args: argparse.Namespace) -> SessionOptions:
    """Validate everything before anything starts: a bad policy file must not leave a child running."""
    config = None
    if args.policy:
        from tuner.policy_config import load_policy

        config = load_policy(args.policy)  # raises a one-line UserError
    elif args.observe_only:
        raise UserError("--observe-only needs --policy P (without a policy nothing acts anyway)")
    if args.prometheus:
        from tuner.prometheus import parse_listen

        parse_listen(args.prometheus, args.prometheus_public)  # a bad address fails before a child starts
    return SessionOptions(
        interval=check_interval(args.interval),
        trace=args.trace,
        prometheus=args.prometheus,
        prometheus_public=args.prometheus_public,
        quiet=args.quiet,
        policy=args.policy,
        policy_config=config,
        observe_only=args.observe_only,
        record_text=args.record_text,
    )
