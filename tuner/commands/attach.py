"""``tuner attach PID``: record a process that is already running, until it exits or Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType

import psutil

from tuner.commands._common import add_session_options, redact_command, session_options
from tuner.commands.run import (
    add_engine_metrics_option,
    earlier_oom,
    engine_metrics_url,
    oom_now,
    print_brief_summary,
)
from tuner.core.session import Session, pid_exists_or_error
from tuner.errors import UserError
from tuner.probes.cgroup import earlier_kills, judge_exit, oom_baseline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attach",
        help="record a running process and its children",
        description="Sample a running process tree until it exits (or Ctrl-C) and write the trace.",
    )
    add_session_options(p)
    add_engine_metrics_option(p)
    p.add_argument("pid", metavar="PID", help="process to watch")
    p.set_defaults(func=run)


def parse_pid(text: str, *, allow_self: bool = True) -> int:
    """A PID given on the command line: a whole number naming a process this user may read."""
    s = text.strip()
    if not s.lstrip("+-").isdigit() or not s.isascii():
        raise UserError(f"{text!r} is not a PID (a positive whole number)")
    pid = int(s)
    if pid > 2**31 - 1:  # larger than any pid_t: no such process, and psutil would overflow
        raise UserError(f"no process with PID {pid}")
    if not allow_self and pid == os.getpid():
        raise UserError(f"PID {pid} is this tuner process itself: give the PID of the inference to watch")
    pid_exists_or_error(pid)
    if _is_kernel_thread(pid):
        raise UserError(f"PID {pid} is a kernel thread, not a process with memory of its own to watch")
    try:
        zombie = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        zombie = False
    if zombie:
        raise UserError(f"process {pid} has already exited (a zombie its parent has not reaped): nothing to watch")
    return pid


def _is_kernel_thread(pid: int) -> bool:
    """Linux: the ``PF_KTHREAD`` flag in ``/proc/PID/stat`` (kernel threads show up as PIDs in a VM)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return bool(int(fields[6]) & 0x00200000)  # field 9 of stat: flags
    except (OSError, ValueError, IndexError):
        return False


def run(args: argparse.Namespace) -> int:
    pid = parse_pid(args.pid, allow_self=False)
    opts = session_options(args)
    opts.engine_metrics = engine_metrics_url(args.engine_metrics)
    try:
        proc = psutil.Process(pid)
        command = proc.cmdline() or [proc.name()]
    except psutil.Error:
        command = [str(pid)]
    command, redacted = redact_command(command, opts.record_text)
    if redacted:
        opts.extra_header["command_redacted"] = redacted
    oom_before = oom_baseline(pid)
    oom_earlier = earlier_kills(os.getpid()) if oom_before is not None else None
    session = Session(opts, command=command, roots=[pid])
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        earlier_oom(session, oom_earlier)
        session.start()
        signal_number: int | None = None
        while not stop.wait(0.2):
            if not psutil.pid_exists(pid) or _is_zombie(proc):
                signal_number = _exit_signal(pid)  # readable while it is a zombie, not once reaped
                break
        detached = stop.is_set()
        oom = None if detached else judge_exit(command[0].rsplit("/", 1)[-1] if command else str(pid), pid,
                                               signal_number, oom_before, oom_now(session, oom_before))  # fmt: skip
        path = session.finish(events=[("oom_kill", oom.data)] if oom is not None else [], detached=detached)
        if oom is not None and not opts.quiet:
            print(f"tuner: {oom.message}", file=sys.stderr)
        if not opts.quiet:
            why = "detached" if detached else f"process {pid} exited"
            print(f"tuner: {why}; trace written to {path}", file=sys.stderr)
            if args.headless:
                print_brief_summary(path)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _exit_signal(pid: int) -> int | None:
    """The signal that ended a zombie (0: it exited by itself), from ``/proc/PID/stat``'s exit code (field
    52, Linux >= 3.5); None once it is reaped or elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] != b"Z":
            return None
        return int(fields[49]) & 0x7F
    except (OSError, ValueError, IndexError):
        return None


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
