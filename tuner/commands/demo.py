"""``tuner demo``: the built-in model serving a request stream, recorded (and tuned) like any user command.

The workload (``python -m tuner.demo.workload``) runs as a child under the sidecar through
:func:`tuner.commands.run.supervise`, exactly the path ``tuner run`` takes: same channel, probes, trace,
policies.  On a terminal the dashboard shows it live (when the TUI is installed); ``--headless`` prints
a summary at the end.

``tuner demo --serve`` instead runs the model as an OpenAI-compatible server (``python -m
tuner.demo.serve``, a child whose process tree is sampled) behind ``tuner proxy``'s proxy in this process,
and prints the URL to point an OpenAI client at: the requests come from the user, the path is the one
``tuner proxy`` takes in front of vLLM or llama.cpp.  Ctrl-C / SIGTERM (or ``--duration``) stops the proxy,
then the server, then closes the trace.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from tuner.commands._common import add_session_options, session_options
from tuner.errors import UserError

DEFAULT_DURATION = 120.0
DEFAULT_RATE = 5.0
WORKLOADS = ("steady", "step", "burst", "ramp", "mix")  # tuner.demo.workload.WORKLOADS (not imported: torch)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the built-in model on a request stream under the tuner",
        description="Serve a small built-in language model (trained on Python's own documentation) with a "
        "stream of prompts (Poisson, or shaped by --workload), under the sidecar, and record the run. Nothing "
        "is downloaded.",
    )
    add_session_options(p)
    w = p.add_argument_group("workload")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, metavar="S",
                   help=f"seconds of request arrivals (default {DEFAULT_DURATION:g}); queued requests are then served")
    g.add_argument("--requests", type=int, metavar="N", help="serve N requests instead of a duration")
    w.add_argument("--leak", nargs="?", const="reclaimable", choices=("reclaimable", "unreclaimable"),
                   help="inject a memory leak: a per-request prefix cache that is never evicted (~1 MB a request); "
                   "'--leak unreclaimable': one no cleanup step reaches (only a smaller batch or precision helps)")
    w.add_argument("--seed", type=int, default=0, help="seed of arrivals, prompts and sampling (default 0)")
    w.add_argument("--rate", type=float, metavar="R",
                   help=f"steady workload: mean requests per second (default {DEFAULT_RATE:g})")
    w.add_argument("--workload", choices=WORKLOADS, default="steady",
                   help="shape of the arrivals (default steady: Poisson at --rate); step, burst, ramp and mix are "
                   "set against the requests/s the demo measures it serves at the start: step 0.5x -> 1.3x -> "
                   "0.5x over thirds of the run, burst 0.5x with 5 s of 2.6x every 20 s, ramp a diurnal "
                   "0.5x -> 1.3x -> 0.5x, mix 0.8x with short prompts then long ones")
    w.add_argument("--capacity", type=float, metavar="RPS",
                   help="shaped workloads: take RPS requests/s as the capacity instead of measuring it "
                   "(e.g. the same stream for paired runs)")
    w.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="batch size while the batch policy has not set one (default 8)")
    w.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="the temperature the user asks for (default 0.8)")
    w.add_argument("--mirostat", action="store_true", help="sample with Mirostat v2 (eta 0.1) instead")
    w.add_argument("--mirostat-tau", type=float, default=5.0, metavar="BITS",
                   help="Mirostat's target surprise (default 5 as llama.cpp; this byte model needs ~0.5-1)")
    s = p.add_argument_group("serve (an OpenAI-compatible server behind the proxy, for your own client)")
    s.add_argument("--serve", action="store_true",
                   help="serve the model over the OpenAI API behind tuner's proxy and print the URL to use; "
                   "requests come from your client; Ctrl-C stops (--duration S: stop after S seconds)")
    s.add_argument("--listen", default="127.0.0.1:8100", metavar="HOST:PORT",
                   help="with --serve: where clients connect (default 127.0.0.1:8100; port 0 = any free port)")
    s.add_argument("--public", action="store_true", help="with --serve: allow --listen on a non-loopback address")
    e = p.add_argument_group("export")
    e.add_argument("--export-hf", metavar="DIR",
                   help="write the model in Hugging Face Llama format into DIR (new or empty) for an engine such "
                   "as vLLM to serve, then exit")
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
    if args.workload != "steady":
        if args.rate is not None:
            raise UserError(f"--rate sets the steady workload; --workload {args.workload} takes its rates from the "
                            "capacity measured at the start (--capacity RPS to give it)")
        if args.capacity is not None and not args.capacity > 0:
            raise UserError(f"--capacity {args.capacity:g} must be more than 0 requests per second")
    elif args.capacity is not None:
        raise UserError("--capacity sets the shaped workloads' rates; the steady workload takes --rate")
    rate = DEFAULT_RATE if args.rate is None else args.rate
    if rate <= 0:
        raise UserError(f"--rate {rate:g} must be more than 0 requests per second")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature:g} must be 0 (greedy) or more")
    if args.workload != "steady":
        cmd += ["--workload", args.workload]
        if args.capacity is not None:
            cmd += ["--capacity", f"{args.capacity:g}"]
    cmd += ["--seed", str(args.seed), "--rate", f"{rate:g}", "--batch-size", str(args.batch_size),
            "--temperature", f"{args.temperature:g}"]
    if args.leak:
        cmd += ["--leak"] if args.leak == "reclaimable" else ["--leak", args.leak]
    if args.mirostat:
        if args.mirostat_tau <= 0:
            raise UserError(f"--mirostat-tau {args.mirostat_tau:g} must be more than 0 bits")
        cmd += ["--mirostat", "--mirostat-tau", f"{args.mirostat_tau:g}"]
    return cmd


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:
        raise UserError("tuner demo needs torch: pip install 'inference-tuner[torch]'")
    if args.export_hf is not None:
        return run_export(args)
    if args.serve:
        return run_serve(args)
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
    if tui and importlib.util.find_spec("tuner.tui.app") is None:
        if not args.quiet:
            print("tuner: the dashboard is not installed here; running headless", file=sys.stderr)
        tui = False
    return supervise(cmd, opts, headless=not tui, tui=tui, stop_on_quit=True)


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tuner.demo.export_hf import export

    if args.serve:
        raise UserError("--export-hf writes the model and exits; run --serve separately")
    out = Path(args.export_hf)
    export(out)
    # stdout, even with --quiet: it is what the command is for
    print(f"tuner demo: Hugging Face Llama model written to {out}", flush=True)
    if not args.quiet:
        print(f"tuner: serve it with e.g. python -m vllm.entrypoints.openai.api_server --model {out} "
              "--served-model-name tuner-demo --dtype float32 --max-model-len 256", file=sys.stderr, flush=True)
    return 0


SERVER_START_S = 120.0  # loading the model: ~2 s on an idle machine, far more on a busy one


def _serve_checks(args: argparse.Namespace) -> float | None:
    """Options of the built-in workload make no sense with --serve (the requests come from the user)."""
    for flag, given in (("--requests", args.requests is not None), ("--leak", args.leak),
                        ("--mirostat", args.mirostat), ("--workload", args.workload != "steady"),
                        ("--capacity", args.capacity is not None)):
        if given:
            raise UserError(f"{flag} drives the built-in workload; with --serve the requests come from your client")
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"--duration {args.duration:g} must be more than 0 seconds")
    return args.duration


def _start_server(quiet: bool) -> tuple[subprocess.Popen[str], str, list[str]]:
    """``python -m tuner.demo.serve --port 0`` in its own session (Ctrl-C reaches the tuner only, which stops
    the proxy first, then the server); returns the process, its root URL and its command line."""
    cmd = [sys.executable, "-m", "tuner.demo.serve", "--port", "0"]

    def child_setup() -> None:  # runs in the child: die with the tuner even if it is SIGKILLed
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass

    env = {k: v for k, v in os.environ.items() if k != "TUNER_SOCKET"}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, preexec_fn=child_setup)
    assert proc.stderr is not None
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # keeps reading: the server's later messages go on to our stderr
        assert proc.stderr is not None
        for line in proc.stderr:
            if not ready.is_set():
                lines.append(line.rstrip())
                m = re.search(r"on (http://\S+)/v1\b", line)
                if m:
                    found.append(m.group(1))
                    ready.set()
                continue
            if not quiet:
                sys.stderr.write(line)
        ready.set()

    threading.Thread(target=pump, name="tuner-demo-server-stderr", daemon=True).start()
    deadline = time.monotonic() + SERVER_START_S
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            _stop_server(proc)
            raise UserError(f"the demo model server did not start within {SERVER_START_S:g} s")
    if not found:
        proc.wait(timeout=10)
        last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        raise UserError(f"the demo model server exited with code {proc.returncode} before serving: {last}")
    return proc, found[0], cmd


def _stop_server(proc: subprocess.Popen[str]) -> int | None:
    """SIGTERM, then SIGKILL after 10 s; the exit code (negative: the signal)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_serve(args: argparse.Namespace) -> int:
    from tuner.commands.proxy import bind, serve_proxy
    from tuner.commands.run import print_brief_summary
    from tuner.proxy.server import ProxyConfig, parse_listen

    duration = _serve_checks(args)
    host, port = parse_listen(args.listen, args.public)
    opts = session_options(args)  # validates --policy before anything starts
    if not opts.trace:
        from tuner.trace import default_trace_path

        opts.trace = str(default_trace_path(["demo"]))
    tui = not args.headless and sys.stdin.isatty() and sys.stdout.isatty()
    if tui and importlib.util.find_spec("tuner.tui.app") is None:
        if not args.quiet:
            print("tuner: the dashboard is not installed here; running headless", file=sys.stderr)
        tui = False
    sock = bind(host, port)  # before the server starts: a busy port is a one-line error, nothing left running
    try:
        proc, upstream, cmd = _start_server(args.quiet)
    except BaseException:
        sock.close()
        raise
    opts.extra_header["demo"] = {
        "server": "tuner.demo.serve",
        "argv": cmd[3:],
        "server_pid": proc.pid,
        "policy": args.policy,
        "observe_only": bool(args.observe_only),
    }
    started = time.monotonic()
    model = "tuner-demo"

    def announce(url: str) -> None:
        # stdout, even with --quiet: it is what the command is for
        print(f"tuner demo: OpenAI-compatible API at {url}/v1 (model {model!r}, any API key); Ctrl-C stops",
              flush=True)
        if not args.quiet:
            print(f"tuner: e.g. OpenAI(base_url=\"{url}/v1\", api_key=\"none\").chat.completions.create("
                  f"model=\"{model}\", messages=[...], stream=True)", file=sys.stderr, flush=True)

    def stop_when() -> str | None:
        if proc.poll() is not None:
            return f"the demo model server exited with code {proc.returncode}"
        if duration is not None and time.monotonic() - started >= duration:
            return "duration reached"
        return None

    def before_finish() -> dict[str, Any]:
        died = proc.poll()
        code = _stop_server(proc)
        return {"server_exit_code": code, "server_died": died is not None}

    try:
        path, reason = serve_proxy(ProxyConfig(upstream=upstream), opts, sock, roots=[proc.pid], tui=tui,
                                   command=["demo", "--serve"], announce=announce, stop_when=stop_when,
                                   before_finish=before_finish)
    finally:
        _stop_server(proc)
    died = reason is not None and reason.startswith("the demo model server")
    if died or not opts.quiet:
        print(f"tuner: {reason + '; ' if reason else ''}stopped; trace written to {path}", file=sys.stderr)
    if args.headless and not opts.quiet:
        print_brief_summary(path)
    return 1 if died else 0
