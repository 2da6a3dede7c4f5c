"""``tuner run [options] -- CMD ...``: start CMD under the sidecar and record it until it exits."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from tuner.commands._common import add_session_options, session_options
from tuner.errors import UserError
from tuner.session import Session

GRACE_S = 5.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="start a command under the tuner and record it",
        description="Start CMD with TUNER_SOCKET set, sample its process tree until it exits, write the trace, "
        "and exit with CMD's exit code.",
    )
    add_session_options(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command to run")
    p.set_defaults(func=run)


def exit_code_of(returncode: int) -> int:
    """A child killed by signal N exits the way a shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class ChildStopper:
    """Ctrl-C / SIGTERM: stop the child gracefully (SIGINT or SIGTERM, then SIGTERM, then SIGKILL)."""

    def __init__(self, child: subprocess.Popen[bytes]) -> None:
        self.child = child
        self.signalled_at: float | None = None
        self.stage = 0

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            if signum == signal.SIGINT and self._child_got_it_from_terminal():
                return  # the terminal already sent SIGINT to the whole foreground group
            self._send(signum)

    def _child_got_it_from_terminal(self) -> bool:
        try:
            return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp() == os.getpgid(self.child.pid)
        except OSError:
            return False

    def _send(self, sig: int) -> None:
        try:
            self.child.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass

    def escalate(self) -> None:
        if self.signalled_at is None or self.child.poll() is not None:
            return
        waited = time.monotonic() - self.signalled_at
        if self.stage == 0 and waited > GRACE_S:
            self.stage = 1
            self._send(signal.SIGTERM)
        elif self.stage == 1 and waited > 2 * GRACE_S:
            self.stage = 2
            self._send(signal.SIGKILL)


def start_child(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(cmd, env=env)
    except FileNotFoundError:
        raise UserError(f"command not found: {cmd[0]}", code=127) from None
    except PermissionError:
        raise UserError(f"permission denied: {cmd[0]}", code=126) from None
    except OSError as exc:
        raise UserError(f"cannot start {cmd[0]}: {exc.strerror or exc}", code=126) from None


def run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UserError("no command given: use 'tuner run [options] -- CMD ...'")
    opts = session_options(args)
    return supervise(cmd, opts, headless=args.headless)


def supervise(cmd: list[str], opts: object, *, headless: bool = True, env: dict[str, str] | None = None) -> int:
    from tuner.session import SessionOptions

    assert isinstance(opts, SessionOptions)
    child_env = dict(os.environ if env is None else env)
    t0 = time.monotonic()
    child = start_child(cmd, child_env)
    stopper = ChildStopper(child)
    old = {s: signal.signal(s, stopper.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    session: Session | None = None
    try:
        try:
            session = Session(opts, command=cmd, roots=[child.pid], t0=t0)
        except BaseException:
            child.terminate()
            child.wait()
            raise
        session.start()
        while True:
            try:
                rc = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                stopper.escalate()
        code = exit_code_of(rc)
        path = session.finish(exit_code=code, stopped_by_signal=stopper.signalled_at is not None)
        if not opts.quiet:
            print(f"tuner: {cmd[0]} exited with code {code}; trace written to {path}", file=sys.stderr)
            if headless:
                print_brief_summary(path)
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def print_brief_summary(path: object) -> None:
    """A few lines for the terminal; `tuner report` has the full picture."""
    try:
        from tuner.report import render_text, summarize
        from tuner.trace import read_trace

        print(render_text(summarize(read_trace(str(path)))), file=sys.stderr)
    except Exception as exc:  # the recording is what matters; a summary failure must not change the exit code
        print(f"tuner: (no summary: {exc})", file=sys.stderr)
