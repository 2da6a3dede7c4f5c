"""``tuner run [options] -- CMD ...``: start CMD under the sidecar and record it until it exits."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from tuner.commands._common import add_session_options, redact_command, session_options
from tuner.core.session import Session, SessionOptions
from tuner.errors import UserError
from tuner.probes.cgroup import OomState, earlier_kills, judge_exit, oom_baseline, read_oom_state
from tuner.trace import default_trace_path

GRACE_S = 5.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="start a command under the tuner and record it",
        description="Start CMD with TUNER_SOCKET set, sample its process tree until it exits, write the trace, "
        "and exit with CMD's exit code.",
    )
    add_session_options(p)
    add_engine_metrics_option(p)
    p.add_argument(
        "--tui",
        action="store_true",
        help="show the live dashboard while CMD runs (CMD's own output goes to TRACE.log); q closes the view",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command to run")
    p.set_defaults(func=run)


def add_engine_metrics_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine-metrics",
        metavar="URL",
        help="also scrape a serving engine's Prometheus page (vLLM, SGLang, TGI, llama.cpp), e.g. "
        "http://127.0.0.1:8000/metrics, once a second",
    )


def engine_metrics_url(text: str | None) -> str | None:
    """``--engine-metrics URL`` checked (``/metrics`` added to a bare origin); a one-line error when bad."""
    if text is None:
        return None
    from tuner.probes.engine import check_url

    try:
        return check_url(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None


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


def start_child(cmd: list[str], env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen[bytes]:
    try:
        if log_path is None:
            return subprocess.Popen(cmd, env=env)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the TUI owns the terminal: the command writes here instead
            return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
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
    if not cmd[0].strip():
        raise UserError(f"the command name {cmd[0]!r} is empty: use 'tuner run [options] -- CMD ...'")
    opts = session_options(args)
    opts.engine_metrics = engine_metrics_url(args.engine_metrics)
    if args.tui and args.headless:
        raise UserError("--tui and --headless contradict each other: choose one")
    return supervise(cmd, opts, headless=args.headless, tui=args.tui)


def want_tui(tui: bool) -> bool:
    """The dashboard needs a terminal on both ends; refuse clearly rather than draw into a pipe."""
    if tui and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError("--tui needs a terminal (stdin and stdout are not a tty): use --headless")
    return tui


def supervise(
    cmd: list[str],
    opts: SessionOptions,
    *,
    headless: bool = True,
    tui: bool = False,
    stop_on_quit: bool = False,
    env: dict[str, str] | None = None,
) -> int:
    """Start ``cmd`` beside a recording session and wait for it; returns its exit code.

    With ``tui`` the dashboard runs in the foreground while the child's output goes to ``TRACE.log``;
    quitting the dashboard stops the child when ``stop_on_quit`` (the demo), else recording goes on
    headless until the command exits (``tuner run --tui``).
    """
    tui = want_tui(tui)
    child_env = dict(os.environ if env is None else env)
    t0 = time.monotonic()
    log_path: Path | None = None
    if tui:
        trace_path = Path(opts.trace) if opts.trace else default_trace_path(cmd)
        opts.trace = str(trace_path)
        log_path = trace_path.with_suffix(".log")
    channel = open_channel()
    if channel is not None:
        child_env["TUNER_SOCKET"] = channel.path
    oom_before = oom_baseline(os.getpid())  # the command starts in this cgroup: its OOM-kill count now
    oom_earlier = earlier_kills(os.getpid()) if oom_before is not None else None
    try:
        child = start_child(cmd, child_env, log_path)
    except BaseException:
        if channel is not None:
            channel.close()
        raise
    stopper = ChildStopper(child)
    old = {s: signal.signal(s, stopper.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    session: Session | None = None
    try:
        recorded, redacted = redact_command(cmd, opts.record_text)
        if redacted:
            opts.extra_header["command_redacted"] = redacted
        try:
            session = Session(opts, command=recorded, roots=[child.pid], t0=t0, channel=channel)
        except BaseException:
            child.terminate()
            child.wait()
            if channel is not None:
                channel.close()
            raise
        earlier_oom(session, oom_earlier)
        try:
            session.start()
            if tui:
                run_dashboard(session, child, stopper, stop_on_quit=stop_on_quit, log_path=log_path)
            rc = wait_child(child, stopper.escalate)
        except BaseException as exc:
            # The sidecar itself failed late: the command runs on (it must not suffer for it), and what
            # was recorded so far is closed with an end record that says why.
            _finish_after_failure(session, exc)
            raise
        code = exit_code_of(rc)
        oom = judge_exit(os.path.basename(cmd[0]), child.pid, -rc if rc < 0 else 0, oom_before,
                         oom_now(session, oom_before))  # fmt: skip
        events = [("oom_kill", oom.data)] if oom is not None else []
        path = session.finish(events=events, exit_code=code, stopped_by_signal=stopper.signalled_at is not None)
        if oom is not None and not opts.quiet:
            print(f"tuner: {oom.message}", file=sys.stderr)
        if not opts.quiet:
            print(f"tuner: {cmd[0]} exited with code {code}; trace written to {path}", file=sys.stderr)
            if headless:
                print_brief_summary(path)
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def oom_now(session: Session, before: OomState | None) -> OomState | None:
    """The OOM-kill count of the watched process's memory cgroup now (the cgroup probe's, else the one read
    at the start); the process may be gone, its cgroup is not."""
    for p in session.probes:
        mem = getattr(getattr(p, "loc", None), "memory", None)
        if p.name == "cgroup" and mem is not None:
            return read_oom_state(mem)
    return oom_baseline(os.getpid()) if before is not None else None


def earlier_oom(session: Session, got: tuple[str, int] | None) -> None:
    """A start in a cgroup whose OOM-kill counter was not zero (``earlier_kills``, read before the command
    started: a command killed in its first second is this run's, not an earlier one's) names the earlier kill
    (the sidecar may have died with the process it watched: its own trace then ends without a word)."""
    if got is None:
        return
    path, kills = got
    msg = (f"cgroup {path} has had {kills} OOM kill(s) before this start: an earlier run in it was most likely "
           "ended by the kernel OOM killer (tuner report TRACE of that run says more)")  # fmt: skip
    session.log(msg)
    session.writer.note(0.0, msg, "warn", cgroup=path, oom_kills=kills)


def wait_child(child: subprocess.Popen[Any], every: Any, period: float = 0.2) -> int:
    """Wait for ``child`` to exit, calling ``every()`` each ``period`` s (signal escalation).

    ``Popen.wait(timeout)`` polls with sleeps of 0.5-50 ms (~45 wake-ups a second measured here, 0.3% of
    a core for the sidecar's main thread); a pidfd (Linux >= 5.3) sleeps until the exit or the period ends.
    """
    import select

    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            if pidfd is not None:
                select.select([pidfd], [], [], period)
                rc = child.poll()
                if rc is not None:
                    return rc
            else:
                try:
                    return child.wait(timeout=period)
                except subprocess.TimeoutExpired:
                    pass
            every()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _finish_after_failure(session: Session, exc: BaseException) -> None:
    try:
        session.finish(error=f"{type(exc).__name__}: {exc}", sidecar_failed=True)
    except Exception:
        pass  # the trace is flushed tick by tick: what is on disk stays readable even without the end record


def run_dashboard(
    session: Session,
    child: subprocess.Popen[bytes],
    stopper: ChildStopper,
    *,
    stop_on_quit: bool,
    log_path: Path | None,
) -> None:
    """The TUI in the foreground, fed by the session's live feed (the same one ``tuner tui --connect`` reads)."""
    path = session.observer_path
    if path is None:
        session.log("no live feed for the dashboard; recording headless")
        return
    from tuner.tui.app import run_live

    try:
        run_live(path)
    except Exception as exc:  # the dashboard failing must not lose the recording or the child
        session.log(f"dashboard stopped: {type(exc).__name__}: {exc}; recording goes on")
    if child.poll() is None:
        if stop_on_quit:
            stopper.handler(signal.SIGTERM, None)
        else:
            session.log("view closed; still recording until the command exits (Ctrl-C stops it)")
    if log_path is not None:
        session.log(f"the command's output is in {log_path}")


def open_channel() -> Any:
    """The socket the inference's ``tuner.client`` talks to (its path goes into ``TUNER_SOCKET``)."""
    from tuner.link.channel import ChannelServer

    try:
        server = ChannelServer()
        server.start()
    except OSError as exc:
        raise UserError(f"cannot open the client channel socket: {exc.strerror or exc}") from None
    return server


def print_brief_summary(path: object) -> None:
    """A few lines for the terminal; `tuner report` has the full picture."""
    try:
        from tuner.outputs.report import render_text, summarize
        from tuner.trace import read_trace

        print(render_text(summarize(read_trace(str(path)))), file=sys.stderr)
    except Exception as exc:  # the recording is what matters; a summary failure must not change the exit code
        print(f"tuner: (no summary: {exc})", file=sys.stderr)
