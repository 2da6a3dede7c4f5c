"""``tuner proxy --upstream URL``: measure and tune an OpenAI-compatible server from in front of it."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuner.commands._common import add_session_options, session_options
from tuner.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proxy",
        help="measure and tune an OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama) as a proxy",
        description="Serve an OpenAI-compatible API on --listen that forwards to --upstream, records every "
        "request (queue time, TTFT, TPOT, tokens, repetition) into a trace and, with --policy, tunes "
        "temperature, concurrency and cleanup. Stop it with Ctrl-C.",
    )
    p.add_argument("--upstream", required=True, metavar="URL", help="the server's root URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--listen", default="127.0.0.1:8100", metavar="HOST:PORT",
                   help="where clients connect (default 127.0.0.1:8100; port 0 = any free port)")
    p.add_argument("--public", action="store_true", help="allow --listen on a non-loopback address")
    p.add_argument("--pid", type=int, metavar="PID", help="also sample the server's process tree (else system-wide)")
    p.add_argument("--tui", action="store_true", help="show the live dashboard; q stops the proxy")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=("auto", "vllm", "sglang", "tgi", "llamacpp"), default="auto",
                   help="the upstream's engine, which decides how knobs are sent (the repetition penalty's field "
                   "name) and what usage is asked for; auto (default): recognised from its /metrics page")
    e.add_argument("--engine-metrics", metavar="URL",
                   help="the engine's Prometheus page (default: the upstream's origin + /metrics), scraped once a "
                   "second: KV-cache usage, running and waiting requests, preemptions, the engine's token rate")
    e.add_argument("--no-engine-metrics", action="store_true", help="do not scrape the engine's /metrics")
    k = p.add_argument_group("knobs")
    k.add_argument("--temperature-mode", choices=("unset", "always"), default="unset",
                   help="temperature knob: only requests that set none (unset, default) or every request (always)")
    k.add_argument("--temperature-bounds", default="0:2", metavar="LO:HI",
                   help="the temperature the proxy sends stays within LO..HI (default 0:2)")
    k.add_argument("--max-concurrency", type=int, metavar="N",
                   help="at most N generation requests upstream at once (FIFO queue); the batch-size knob "
                   "may lower it, never raise it (default: unlimited)")
    k.add_argument("--shadow-concurrency", type=int, default=1, metavar="N",
                   help="with --consistency: shadow requests (the second answer of a sampled request, sent again "
                   "upstream and not returned) in flight at most (default 1)")
    k.add_argument("--cleanup-url", action="append", default=[], metavar="[METHOD ]PATH",
                   help="admin call the cleanup policy may make, e.g. /reset_prefix_cache (vLLM); repeatable; "
                   "default POST; off unless given")
    u = p.add_argument_group("upstream")
    u.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds without a byte from the upstream before 504 (default 600)")
    u.add_argument("--connect-timeout", type=float, default=5.0, metavar="S", help="default 5")
    u.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="N",
                   help="larger request bodies get 413 (default 8 MiB)")
    add_session_options(p)
    p.set_defaults(func=run)


def _bounds(text: str) -> tuple[float, float]:
    lo_s, sep, hi_s = text.partition(":")
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise UserError(f"--temperature-bounds {text!r}: use LO:HI, e.g. 0.2:1.2") from None
    if not sep or not (0.0 <= lo <= hi) or hi > 100:
        raise UserError(f"--temperature-bounds {text!r}: need 0 <= LO <= HI")
    return lo, hi


def _shadow_concurrency(args: argparse.Namespace) -> int:
    n = getattr(args, "shadow_concurrency", 1)
    if n < 1:
        raise UserError(f"--shadow-concurrency {n}: must be at least 1")
    return int(n)


def build_config(args: argparse.Namespace) -> Any:
    from tuner.commands.run import engine_metrics_url
    from tuner.probes.engine import metrics_url
    from tuner.proxy.server import ProxyConfig, parse_cleanup, parse_upstream

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise UserError("--max-concurrency must be at least 1")
    if args.timeout <= 0 or args.connect_timeout <= 0:
        raise UserError("--timeout and --connect-timeout must be positive")
    if args.max_body_bytes < 1024:
        raise UserError("--max-body-bytes must be at least 1024")
    upstream = parse_upstream(args.upstream)
    if args.no_engine_metrics and args.engine_metrics:
        raise UserError("--engine-metrics and --no-engine-metrics contradict each other: choose one")
    engine_metrics = None
    if not args.no_engine_metrics:
        engine_metrics = engine_metrics_url(args.engine_metrics) if args.engine_metrics else metrics_url(upstream)
    return ProxyConfig(
        upstream=upstream,
        temperature_mode=args.temperature_mode,
        temperature_bounds=_bounds(args.temperature_bounds),
        max_concurrency=args.max_concurrency,
        cleanup_urls=[parse_cleanup(s) for s in args.cleanup_url],
        max_body_bytes=args.max_body_bytes,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        shadow_concurrency=_shadow_concurrency(args),
        engine=args.engine,
        engine_metrics=engine_metrics,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY
        # only on sockets whose proto is TCP: without it Nagle + delayed ACK add 40 ms to small writes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
        sock.listen(2048)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def run(args: argparse.Namespace) -> int:
    from tuner.commands.attach import parse_pid
    from tuner.commands.run import print_brief_summary, want_tui
    from tuner.proxy.server import parse_listen

    host, port = parse_listen(args.listen, args.public)
    config = build_config(args)
    if args.tui and args.headless:
        raise UserError("--tui and --headless contradict each other: choose one")
    tui = want_tui(args.tui)
    if args.pid is not None:
        parse_pid(str(args.pid), allow_self=False)  # the same checks as attach: kernel threads, zombies, itself
    opts = session_options(args)
    sock = bind(host, port)
    path, _ = serve_proxy(config, opts, sock, roots=[args.pid] if args.pid else [], tui=tui,
                          command=["proxy", config.upstream])
    if not opts.quiet:
        print(f"tuner: proxy stopped; trace written to {path}", file=sys.stderr)
        if args.headless:
            print_brief_summary(path)
    return 0


def serve_proxy(
    config: Any,
    opts: Any,
    sock: socket.socket,
    *,
    roots: list[int],
    tui: bool,
    command: list[str],
    announce: Callable[[str], None] | None = None,
    stop_when: Callable[[], str | None] | None = None,
    before_finish: Callable[[], dict[str, Any]] | None = None,
) -> tuple[Path, str | None]:
    """Serve the proxy on ``sock`` under a session until Ctrl-C / SIGTERM (or ``stop_when`` gives a reason);
    returns the trace path and that reason.

    ``announce(url)`` runs once the proxy is up; ``before_finish()`` runs after it stopped serving and before
    the trace is closed, its dict going into the trace's end record (``tuner demo --serve`` stops its model
    server there).  ``sock`` is closed on the way out, whatever happens.
    """
    import uvicorn

    from tuner.core.arbiter import narrow_bounds
    from tuner.core.session import Session
    from tuner.proxy.server import Proxy, ProxyChannel

    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    listen_url = f"http://{shown}:{bound[1]}"
    opts.extra_header["proxy"] = {
        "upstream": config.upstream,
        "listen": listen_url,
        "temperature_mode": config.temperature_mode,
        "temperature_bounds": list(config.temperature_bounds),
        "max_concurrency": config.max_concurrency,
        "cleanup": [f"{m} {t}" for m, t in config.cleanup_urls],
        "engine": config.engine,
        "engine_metrics": config.engine_metrics,
        "token_unit": "usage.completion_tokens (the proxy asks for it: stream_options.include_usage, on vLLM "
        "continuous_usage_stats), else one per SSE chunk with output",
        "repetition_unit": "the engine's token ids when the stream carries them (token_ids), else "
                           "whitespace-separated words",
    }
    channel = ProxyChannel()
    extra: list[Any] = []
    if config.engine_metrics:
        from tuner.probes.engine import EngineProbe

        extra.append(EngineProbe(config.engine_metrics))
    try:
        session = Session(opts, command=command, roots=roots, channel=channel, extra_probes=extra)
    except BaseException:
        sock.close()
        channel.close()
        for p in extra:
            p.close()
        raise
    if session.agent is not None:  # the policy can only set what the proxy will use: clamp in the arbiter
        arbiter = session.agent.arbiter
        arbiter.bounds = narrow_bounds(arbiter.bounds, temperature=config.temperature_bounds,
                                       batch_max=config.max_concurrency)
    proxy = Proxy(config, channel, log=session.log)
    proxy.engine_probe = next((p for p in session.probes if p.name == "engine"), None)
    server = _server_class()(
        uvicorn.Config(proxy.app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                       timeout_keep_alive=30)
    )
    reason: list[str] = []
    done = threading.Event()

    def watch() -> None:
        assert stop_when is not None
        while not done.wait(0.2):
            why = stop_when()
            if why:
                reason.append(why)
                server.should_exit = True
                return

    session.start()
    end: dict[str, Any] = {}
    try:
        session.log(f"proxy listening on {listen_url}/v1 -> {config.upstream}")
        if stop_when is not None:
            threading.Thread(target=watch, name="tuner-proxy-watch", daemon=True).start()
        if announce is not None:
            announce(listen_url)
        if tui:
            thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tuner-proxy", daemon=True)
            thread.start()
            _dashboard(session)
            server.should_exit = True
            thread.join(timeout=10)
        else:
            server.run(sockets=[sock])
    finally:
        done.set()
        sock.close()
        try:
            if before_finish is not None:
                end = before_finish()
        finally:
            if proxy.shadow is not None:  # the shadow requests' tally (tuner.proxy.shadow)
                end = {**end, "shadow": proxy.shadow.stats()}
            path = session.finish(upstream=config.upstream, failed_requests=channel.failed, **end)
    return path, reason[0] if reason else None


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's, except that Ctrl-C / SIGTERM only stop serving: uvicorn would re-raise the signal after
        shutdown, killing the process before the session writes the end of the trace."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


def _dashboard(session: Any) -> None:
    path = session.observer_path
    if path is None:
        session.log("no live feed for the dashboard; proxying headless until Ctrl-C")
        threading.Event().wait()
    from tuner.tui.app import run_live

    try:
        run_live(path)
    except Exception as exc:
        session.log(f"dashboard stopped: {type(exc).__name__}: {exc}; stopping the proxy")
