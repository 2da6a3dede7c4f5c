"""``tuner demo``: the built-in model serving a request stream, recorded (and tuned) like any user command.

The workload (``python -m tuner.demo.workload``) runs as a child under the sidecar through
:func:`tuner.commands.run.supervise`, exactly the path ``tuner run`` takes: same channel, probes, trace,
policies.  On a terminal the dashboard shows it live (when the TUI is installed); ``--headless`` prints
a summary at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from tuner.commands._common import add_session_options, session_options
from tuner.errors import UserError

DEFAULT_DURATION = 120.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in model on a request stream under the tuner",
        description="Serve a small built-in language model (trained on Python's own documentation) with a "
        "Poisson stream of prompts, under the sidecar, and record the run. Nothing is downloaded.",
    )
    add_session_options(p)
    w = p.add_argument_group("workload")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, metavar="S",
                   help=f"seconds of request arrivals (default {DEFAULT_DURATION:g}); queued requests are then served")
    g.add_argument("--requests", type=int, metavar="N", help="serve N requests instead of a duration")
    w.add_argument("--leak", action="store_true",
                   help="inject a memory leak: a per-request prefix cache that is never evicted (~1 MB a request)")
    w.add_argument("--seed", type=int, default=0, help="seed of arrivals, prompts and sampling (default 0)")
    w.add_argument("--rate", type=float, default=5.0, metavar="R", help="mean requests per second (default 5)")
    w.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="batch size while the batch policy has not set one (default 8)")
    w.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="the temperature the user asks for (default 0.8)")
    w.add_argument("--mirostat", action="store_true", help="sample with Mirostat v2 (eta 0.1) instead")
    w.add_argument("--mirostat-tau", type=float, default=5.0, metavar="BITS",
                   help="Mirostat's target surprise (default 5 as llama.cpp; this byte model needs ~0.5-1)")
    p.set_defaults(func=run)


def workload_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "tuner.demo.workload"]
    if args.requests is not None:
        if args.requests < 1:
            raise UserError(f"--requests {args.requests} must be at least 1")
        cmd += ["--requests", str(args.requests)]
    else:
        duration = DEFAULT_DURATION if args.duration is None else args.duration
        if not duration > 0:
            raise UserError(f"--duration {duration:g} must be more than 0 seconds")
        cmd += ["--duration", f"{duration:g}"]
    if args.rate <= 0:
        raise UserError(f"--rate {args.rate:g} must be more than 0 requests per second")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature:g} must be 0 (greedy) or more")
    cmd += ["--seed", str(args.seed), "--rate", f"{args.rate:g}", "--batch-size", str(args.batch_size),
            "--temperature", f"{args.temperature:g}"]
    if args.leak:
        cmd.append("--leak")
    if args.mirostat:
        if args.mirostat_tau <= 0:
            raise UserError(f"--mirostat-tau {args.mirostat_tau:g} must be more than 0 bits")
        cmd += ["--mirostat", "--mirostat-tau", f"{args.mirostat_tau:g}"]
    return cmd


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:
        raise UserError("tuner demo needs torch: pip install 'inference-tuner[torch]'")
    cmd = workload_command(args)
    opts = session_options(args)  # validates --policy before anything starts
    if not opts.trace:
        from tuner.trace import default_trace_path

        opts.trace = str(default_trace_path(["demo"]))  # traces/<UTC time>-demo.jsonl
    opts.extra_header["demo"] = {
        "workload": "tuner.demo.workload",
        "argv": cmd[3:],
        "policy": args.policy,
        "observe_only": bool(args.observe_only),
    }
    from tuner.commands.run import supervise

    tui = not args.headless and sys.stdin.isatty() and sys.stdout.isatty()
    if tui and importlib.util.find_spec("tui.app") is None:
        if not args.quiet:
            print("tuner: the dashboard is not installed here; running headless", file=sys.stderr)
        tui = False
    return supervise(cmd, opts, headless=not tui, tui=tui, stop_on_quit=True)
