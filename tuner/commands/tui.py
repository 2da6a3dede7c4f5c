"""``tuner tui TRACE`` (follow a growing trace, replay a finished one) or ``tuner tui --connect SOCKET``."""

from __future__ import annotations

import argparse
import sys

from tuner.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tui",
        help="live dashboard of a running session, or replay of a recorded trace",
        description="Terminal dashboard.  With TRACE: follow a growing trace file, or replay a finished one "
        "(with a scrubber, speed 0.5x-64x, n = next action).  With --connect SOCKET: the live feed of a "
        "running 'tuner run'/'tuner demo' (it prints the socket), where d disables/enables a policy.  "
        "Press ? for the keys.",
    )
    p.add_argument("trace", metavar="TRACE", nargs="?", help="trace file (.jsonl) to follow or replay")
    p.add_argument("--connect", metavar="SOCKET", help="observer socket of a running session")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.trace is not None and not args.trace.strip()) or (args.connect is not None and not args.connect.strip()):
        raise UserError("an empty TRACE or SOCKET: give a file name")
    if bool(args.trace) == bool(args.connect):
        raise UserError("give either a TRACE file or --connect SOCKET (one of them)")
    from tuner.tui.app import TunerApp
    from tuner.tui.source import FileSource, RecordSource, SocketSource

    source: RecordSource = SocketSource(args.connect) if args.connect else FileSource(args.trace)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Textual would draw escape codes into a pipe and wait for keys that never come.
        source.close()
        what = f"tuner report {args.trace}" if args.trace else "tuner report TRACE once it ends"
        raise UserError(f"tuner tui needs a terminal (stdin and stdout are not a tty); for text use '{what}'")
    TunerApp(source).run()
    return 0
