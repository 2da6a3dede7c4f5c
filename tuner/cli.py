"""``tuner`` command line: argparse front end; each subcommand lives in ``tuner.commands``.

Whatever goes wrong reaches the user as one ``tuner: ...`` line on stderr and a non-zero exit code:
usage errors exit 2, a ``UserError`` with its own code, an unexpected exception 70 (``EX_SOFTWARE``)
with its type and message — the traceback only with ``TUNER_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from tuner import __version__
from tuner.errors import UserError
from tuner.trace import TraceError

INTERNAL_ERROR = 70
"""Exit code of an unexpected exception (a bug): ``EX_SOFTWARE`` from sysexits.h."""


def one_line(message: str) -> str:
    """``message`` on one line: a newline in user input (a file name, an option value) must not split
    the error, so line breaks and other control characters are shown escaped."""
    if message.isprintable():
        return message
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in message)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2, like every other bad input.
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def finite_float(text: str) -> float:
    """``type=`` for every float option: a number, and a finite one (``nan``/``inf`` parse as floats but
    no duration, rate, temperature or timeout means anything with them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _finite_floats(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _finite_floats(sub)


def build_parser() -> argparse.ArgumentParser:
    from tuner import commands

    parser = _Parser(prog="tuner", description="Resource profiling and runtime tuning for model inference.")
    parser.add_argument("--version", action="version", version=f"tuner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in commands.load():
        mod.register(sub)
    _finite_floats(parser)  # every float option of every subcommand, whoever registered it
    return parser


def _quiet_broken_pipe() -> None:
    """The reader of our output went away (``tuner report T | head``): stop without a second error when
    Python flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parse_args``, except that a stray argument is reported by the subcommand it was given to (its
    usage and ``tuner SUB --help``), not by the top-level parser."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        owner: argparse.ArgumentParser = parser
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            if isinstance(action, argparse._SubParsersAction):
                owner = action.choices.get(getattr(args, "command", None) or "", parser)
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except ModuleNotFoundError as exc:  # a required package missing from this environment
        print(f"tuner: a required package is not installed: {exc.name} (pip install inference-tuner)", file=sys.stderr)
        return 2
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, TraceError) as exc:
        print(f"tuner: {one_line(str(exc))}", file=sys.stderr)
        return int(getattr(exc, "code", 2))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _quiet_broken_pipe()
        return 0
    except Exception as exc:  # a bug: still one line for the user, the traceback on request
        if os.environ.get("TUNER_DEBUG"):
            raise
        detail = one_line(f"{type(exc).__name__}: {exc}")
        print(
            f"tuner: internal error: {detail} (TUNER_DEBUG=1 shows the traceback; please report it)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
