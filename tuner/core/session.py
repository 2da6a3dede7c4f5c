"""A recording session: probes + sampler + trace writer (+ channel, Prometheus, observers, agent).

``tuner run``, ``tuner attach`` and ``tuner demo`` all go through here, so the demo takes exactly the
path a user's own command takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.core.sampler import MAX_INTERVAL, MIN_INTERVAL, Sampler, Tick
from tuner.errors import UserError
from tuner.probes.base import Probe, ProbeStatus, discover
from tuner.records import Event
from tuner.trace import TraceWriter, default_trace_path, make_header


@dataclass
class SessionOptions:
    interval: float = 0.1
    trace: str | None = None
    prometheus: str | None = None
    prometheus_public: bool = False
    prometheus_linger: float | None = None
    """At most how long ``/metrics`` stays up after the end for a last scrape (None: two scrape intervals)."""
    quiet: bool = False
    extra_header: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    """Preset name or TOML path; ``policy_config`` holds it loaded (validated before anything starts)."""
    policy_config: Any = None
    observe_only: bool = False
    record_text: bool = False
    observer: bool = True
    """Serve the live feed ``tuner tui --connect`` reads (a Unix socket next to the channel's)."""
    engine_metrics: str | None = None
    quality: Any = None
    """``--consistency``: a ``tuner.quality.probe.QualityOptions`` (None: consistency is not measured)."""
    """A serving engine's Prometheus page to scrape (``--engine-metrics URL``; ``tuner.probes.engine``)."""
    otlp: str | None = None
    """``--otlp URL``: metrics and policy actions to an OpenTelemetry collector (``tuner.outputs.otlp``)."""
    trace_rotate: Any = None
    """``tuner.trace.Rotation`` (``--trace-rotate``, ``--trace-keep``): the trace in segments; None: one file."""


class _HeldLimitColumns:
    """The agent writes the binding limit's ``mem_headroom_ratio`` and ``mem_time_to_limit_seconds`` with the tick
    of each projection (every ``PROJECT_EVERY_S``), not with every tick, so the trace stays small.  The exporters
    show the latest tick: without a hold a scrape caught them once in twenty at 10 Hz.  They get the last
    projection's values for ``HOLD_S`` (a projection tick without the time to limit means none is projected
    now: it is dropped; no projection for ``HOLD_S``, both are)."""

    COLUMNS = ("mem_headroom_ratio", "mem_time_to_limit_seconds")
    HOLD_S = 5.0

    def __init__(self) -> None:
        self._held: dict[str, Any] = {}
        self._at = 0.0

    def apply(self, t: float, values: Mapping[str, Any]) -> Mapping[str, Any]:
        fresh = {k: values[k] for k in self.COLUMNS if k in values}
        if fresh:
            self._held, self._at = fresh, t
            return values
        if not self._held or t - self._at > self.HOLD_S:
            return values
        return {**values, **self._held}


def _policy_header(config: Any) -> dict[str, Any]:
    """What the live view shows about the policy: its members (what ``d`` toggles) and target bands."""
    if config is None:
        return {}
    out: dict[str, Any] = {"policies": list(config.policies)}
    horizon = getattr(config.agent, "limit_horizon_s", None)
    if horizon is not None:
        out["limit_horizon_s"] = horizon
    t = config.policies.get("temperature")
    if t is not None:
        out["targets"] = {"req_seq_rep_4_ratio": [t.band_low, t.band_high]}
    return out


def check_interval(interval: float) -> float:
    if not (MIN_INTERVAL <= interval <= MAX_INTERVAL):
        raise UserError(
            f"--interval {interval:g} is out of range: use {MIN_INTERVAL:g} to {MAX_INTERVAL:g} s (1-1000 Hz)"
        )
    return interval


class Session:
    """Owns everything that runs beside the watched process."""

    def __init__(
        self,
        opts: SessionOptions,
        *,
        command: list[str] | None,
        roots: list[int],
        extra_probes: list[Probe] | None = None,
        channel: Any = None,
        t0: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.opts = opts
        self.command = command
        self.roots = roots
        self.t0 = time.monotonic() if t0 is None else t0
        self.log = log or (lambda msg: None if opts.quiet else print(f"tuner: {msg}", file=sys.stderr, flush=True))
        self.exporter: Any = None
        self.exporters: list[Any] = []  # Prometheus and/or OTLP: update, count_tick, count_skipped, count_event, close
        self._held_limits = _HeldLimitColumns()  # the projection columns, between projections (exporters only)
        self.channel = channel
        self.observer: Any = None
        self.agent: Any = None
        self._own_dir: str | None = None
        self._write_error_reported = False
        self._dropped_at_failure = 0

        probes, statuses = discover(roots)
        self.statuses: list[ProbeStatus] = statuses
        extra = list(extra_probes or [])
        if channel is not None:
            from tuner.probes.output import OutputProbe

            quality = self._quality_probe(channel)
            extra.append(OutputProbe(channel, t0=self.t0, record_text=opts.record_text,
                                     quality=quality.submit if quality is not None else None))
            if quality is not None:
                extra.append(quality)
        elif opts.quality is not None:
            self.log("--consistency: no client channel to this process (attach), so no text to score; not measured")
        if opts.engine_metrics:
            from tuner.probes.engine import EngineProbe

            extra.append(EngineProbe(opts.engine_metrics))
        for p in extra:
            reason = p.available()
            self.statuses.append(ProbeStatus(p.name, reason))
            if reason is None:
                probes.append(p)
            else:
                p.close()
        self.probes = probes

        self.trace_path = Path(opts.trace) if opts.trace else default_trace_path(command)
        observer_path = self._open_observer() if opts.observer else None
        header = make_header(
            probes=self._probe_table(),
            interval_s=opts.interval,
            command=command,
            pid=roots[0] if roots else None,
            extra={
                "started_mono": self.t0,
                "channel_socket": getattr(channel, "path", None),
                "observer_socket": observer_path,
                "policy": opts.policy,
                "observe_only": opts.observe_only,
                **_policy_header(opts.policy_config),
                **opts.extra_header,
            },
        )
        self.writer: TraceWriter
        try:
            if opts.trace_rotate is not None:
                from tuner.trace import RotatingTraceWriter

                self.writer = RotatingTraceWriter(self.trace_path, header, opts.trace_rotate, log=self.log)
            else:
                self.writer = TraceWriter(self.trace_path, header)
        except OSError as exc:
            self._close_observer()
            raise UserError(f"cannot write trace {self.trace_path}: {exc.strerror or exc}") from None
        if self.observer is not None:
            self.observer.publish(self.writer.header)
            self.writer.add_line_listener(self.observer.publish_line)

        if opts.prometheus:
            from tuner.outputs.prometheus import PrometheusExporter, parse_listen

            addr = parse_listen(opts.prometheus, opts.prometheus_public)
            try:
                self.exporter = PrometheusExporter(addr, self.writer.header, linger=opts.prometheus_linger,
                                                   log=self.log)  # fmt: skip
            except OSError as exc:
                self.writer.close()
                self._close_observer()
                raise UserError(
                    f"cannot serve Prometheus metrics on {opts.prometheus}: {exc.strerror or exc}"
                ) from None
            self.exporters.append(self.exporter)
            self.writer.add_line_listener(self.exporter.trace_line)  # policy actions (tuner_actions_total)
        if opts.otlp:
            from tuner.outputs.otlp import OtlpExporter

            otlp = OtlpExporter(opts.otlp, self.writer.header, log=self.log)
            self.exporters.append(otlp)
            self.writer.add_line_listener(otlp.trace_line)  # policy actions as log records

        hooks: list[Callable[[Tick], None]] = []
        if opts.policy_config is not None:
            self.agent = self._build_agent(opts.policy_config)
            hooks.append(self.agent.step)  # first: it adds the knob_* columns the recorder writes
        if any(p.name == "nvidia" for p in probes):  # gpu_energy_per_token_joules (tuner.core.energy)
            from tuner.core.energy import EnergyPerToken

            hooks.append(EnergyPerToken(self._on_note).step)
        hooks.append(self._record)
        self.sampler = Sampler(
            probes,
            interval=opts.interval,
            t0=self.t0,
            hooks=hooks,
            on_skip=self._on_skip,
            on_note=self._on_note,
        )

    def _quality_probe(self, channel: Any) -> Any:
        """The consistency probe and its scorer child (``--consistency``), the clients told the sampling rate."""
        q = self.opts.quality
        if q is None:
            return None
        from tuner.quality.probe import QualityProbe

        self.opts.extra_header["quality"] = q.header()
        probe = QualityProbe(q, t0=self.t0, record_text=self.opts.record_text, log=self.log)
        set_welcome = getattr(channel, "set_welcome", None)
        if set_welcome is not None:
            set_welcome(consistency_rate=q.rate, canary=list(q.canary) or None)
        return probe

    def _open_observer(self) -> str | None:
        """The live feed for ``tuner tui --connect``; the session records without it if it cannot open."""
        import tempfile

        try:
            from tuner.link.observe import ObserverServer

            chan_path = getattr(self.channel, "path", None)
            if isinstance(chan_path, str) and os.path.isdir(os.path.dirname(chan_path)):
                base = os.path.dirname(chan_path)  # the channel's private 0700 directory
            else:
                base = self._own_dir = tempfile.mkdtemp(prefix="tuner-")
            path = os.path.join(base, "observer.sock")
            self.observer = ObserverServer(path)
            self.observer.start()
        except (OSError, ImportError) as exc:
            self.observer = None
            self.log(f"live view unavailable ({getattr(exc, 'strerror', None) or exc}); recording goes on")
            return None
        return path

    def _close_observer(self) -> None:
        if self.observer is not None:
            try:
                self.observer.close()
            finally:
                self.observer = None
        if self._own_dir is not None:
            import shutil

            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def _build_agent(self, config: Any) -> Any:
        from tuner.core.actuator import ChannelActuator, DryRunActuator
        from tuner.core.policy_config import build_agent

        actuator: Any
        if self.opts.observe_only:
            actuator = DryRunActuator()
        elif self.channel is None:
            actuator = DryRunActuator()
            self.log("no client channel to this process (attach): policy decisions are recorded as dry-run")
        else:
            actuator = ChannelActuator(self.channel)
        return build_agent(config, actuator, self.writer, observe_only=self.opts.observe_only, say=self.log)

    def _handle_viewer_commands(self, t: float) -> None:
        for cmd in self.observer.drain_commands():
            if cmd.get("cmd") != "policy":
                continue
            name, enabled = str(cmd.get("name")), bool(cmd.get("enabled"))
            if self.agent is None:
                self.writer.note(t, f"viewer asked to {'enable' if enabled else 'disable'} policy {name}, "
                                 "but no policy runs (--policy not given)", "warn")
                continue
            try:
                self.agent.set_enabled(name, enabled)
            except (KeyError, ValueError) as exc:
                self.writer.note(t, f"viewer command ignored: {exc}", "warn")
            else:
                self.writer.note(t, f"policy {name} {'enabled' if enabled else 'disabled'} from the live view")

    def _probe_table(self) -> dict[str, dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        by_name = {p.name: p for p in self.probes}
        for st in self.statuses:
            entry: dict[str, Any] = {"available": st.available, "reason": st.reason, "metrics": {}}
            p = by_name.get(st.name)
            if p is not None:
                try:
                    entry["metrics"] = p.metrics()
                except Exception:
                    entry["metrics"] = {}
                describe = getattr(p, "describe", None)  # what the probe reads (the cgroup probe: which cgroup)
                if describe is not None:
                    try:
                        entry["detail"] = describe()
                    except Exception:
                        pass
            table[st.name] = entry
        return table

    # -- per tick (sampler thread) --------------------------------------------------------------------
    def _record(self, tick: Tick) -> None:
        if self.observer is not None:
            self._handle_viewer_commands(tick.t)
        self.writer.tick(tick.t, tick.values, tick.procs)
        for e in tick.events:
            self.writer.event(e)
        exported = self._held_limits.apply(tick.t, tick.values) if self.exporters else tick.values
        for ex in self.exporters:
            ex.update(exported, tick.procs)
            ex.count_tick()
            for e in tick.events:
                ex.count_event(e.kind, e.data)  # a request: one observation per histogram
        if tick.final:  # fast rates: once a batch (the sampler's ``batch_s``), not at every tick
            self._flush(tick.t)

    def _flush(self, t: float) -> None:
        """Write the tick out.  A failure (disk full, file system read-only, directory gone) is reported
        once on stderr and as a note that reaches the trace when writing works again; sampling,
        Prometheus and the live view go on meanwhile, the records waiting in memory (bounded)."""
        w = self.writer
        reopened = w.reopened
        ok = w.flush()
        if w.reopened != reopened:
            self.log(f"trace {w.path} was removed while recording; recording again into a new file there")
        if not ok and not self._write_error_reported:
            self._write_error_reported = True
            self._dropped_at_failure = w.dropped
            self.log(f"{w.error}; sampling goes on, records wait in memory and are written when it can")
            w.note(t, f"trace writing failed: {w.error}", "warn")
        elif ok and self._write_error_reported:
            self._write_error_reported = False
            dropped = w.dropped - self._dropped_at_failure
            lost = f"; {dropped} records that did not fit in memory were dropped" if dropped else ", nothing lost"
            self.log(f"trace writing resumed{lost}")
            w.note(t, "trace writing resumed", "info" if not dropped else "warn", dropped=dropped)
            w.flush()

    def _on_skip(self, t: float, n: int) -> None:
        self.writer.skip(t, n)
        for ex in self.exporters:
            ex.count_skipped(n)

    def _on_note(self, t: float, msg: str, level: str) -> None:
        self.writer.note(t, msg, level)

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def observer_path(self) -> str | None:
        return self.writer.header.get("observer_socket")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        unavailable = [f"{s.name} ({s.reason})" for s in self.statuses if not s.available]
        self.log(f"recording to {self.trace_path} every {self.opts.interval:g} s")
        if self.observer is not None:
            self.log(f"live view: tuner tui --connect {self.observer_path}")
        if unavailable:
            self.log("not sampled: " + "; ".join(unavailable))
        self.sampler.start()

    def event(self, kind: str, **data: Any) -> None:
        """Record an event from outside the sampler thread (only while the sampler is stopped)."""
        self.writer.event(Event(self.now(), kind, data))

    def finish(self, *, events: Sequence[tuple[str, Mapping[str, Any]]] = (), **end: Any) -> Path:
        """Stop sampling, take one last tick, write ``events`` (kind, data: e.g. the ``oom_kill`` that ended the
        command) and the end record, close everything."""
        self.sampler.stop()
        try:
            self.sampler.tick()
        except Exception:
            pass
        for kind, data in events:
            self.writer.event(Event(self.now(), kind, dict(data)))
            for ex in self.exporters:  # the last scrape (--prometheus-linger) or export sees it too
                ex.count_event(kind, data)
        self.writer.end(self.now(), ticks=self.sampler.ticks, skipped=self.sampler.skipped, **end)
        self.writer.close()
        self.sampler.close()
        with _signals_stop_lingering(self.exporters):  # Ctrl-C / SIGTERM end the wait for a last scrape
            for ex in self.exporters:
                ex.close()
        if self.channel is not None:
            self.channel.close()
        self._close_observer()
        if self.writer.error:  # still failing at the end: say what the trace lacks
            kib = self.writer.buffered_bytes / 1024
            self.log(f"trace {self.trace_path} is incomplete: its last {kib:,.0f} KiB of records could not be "
                     f"written ({self.writer.error})")
        return self.trace_path


@contextlib.contextmanager
def _signals_stop_lingering(exporters: Sequence[Any]) -> Iterator[None]:
    """While the exporters close (``/metrics`` may wait for a last scrape), SIGINT and SIGTERM end that wait
    instead of whatever the command's handlers would do (its child is gone by now)."""
    stoppers = [ex.stop_lingering for ex in exporters if hasattr(ex, "stop_lingering")]
    if not stoppers or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for stop in stoppers:
            stop()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def pid_exists_or_error(pid: int) -> None:
    """Raise a one-line UserError when ``pid`` is not a process we can watch."""
    import psutil

    if pid <= 0:
        raise UserError(f"{pid} is not a valid PID")
    try:
        p = psutil.Process(pid)
        p.memory_info()
        if sys.platform.startswith("linux"):
            p.num_fds()  # needs the same user (or root): what the CPU probe reads per process
    except psutil.NoSuchProcess:
        raise UserError(f"no process with PID {pid}") from None
    except psutil.AccessDenied:
        raise UserError(f"cannot read process {pid} (access denied): run tuner as the same user or as root") from None
