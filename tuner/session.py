"""A recording session: probes + sampler + trace writer (+ channel, Prometheus, observers, agent).

``tuner run``, ``tuner attach`` and ``tuner demo`` all go through here, so the demo takes exactly the
path a user's own command takes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probes.base import Probe, ProbeStatus, discover
from tuner.errors import UserError
from tuner.records import Event
from tuner.sampler import MAX_INTERVAL, MIN_INTERVAL, Sampler, Tick
from tuner.trace import TraceWriter, default_trace_path, make_header


@dataclass
class SessionOptions:
    interval: float = 0.1
    trace: str | None = None
    prometheus: str | None = None
    prometheus_public: bool = False
    quiet: bool = False
    extra_header: dict[str, Any] = field(default_factory=dict)


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
        t0: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.opts = opts
        self.command = command
        self.roots = roots
        self.t0 = time.monotonic() if t0 is None else t0
        self.log = log or (lambda msg: None if opts.quiet else print(f"tuner: {msg}", file=sys.stderr, flush=True))
        self.exporter: Any = None
        self._write_error_reported = False

        probes, statuses = discover(roots)
        self.statuses: list[ProbeStatus] = statuses
        for p in extra_probes or []:
            probes.append(p)
            self.statuses.append(ProbeStatus(p.name, None))
        self.probes = probes

        self.trace_path = Path(opts.trace) if opts.trace else default_trace_path(command)
        header = make_header(
            probes=self._probe_table(),
            interval_s=opts.interval,
            command=command,
            pid=roots[0] if roots else None,
            extra={"started_mono": self.t0, **opts.extra_header},
        )
        try:
            self.writer = TraceWriter(self.trace_path, header)
        except OSError as exc:
            raise UserError(f"cannot write trace {self.trace_path}: {exc.strerror or exc}") from None

        if opts.prometheus:
            from tuner.prometheus import PrometheusExporter, parse_listen

            addr = parse_listen(opts.prometheus, opts.prometheus_public)
            try:
                self.exporter = PrometheusExporter(addr)
            except OSError as exc:
                self.writer.close()
                raise UserError(
                    f"cannot serve Prometheus metrics on {opts.prometheus}: {exc.strerror or exc}"
                ) from None

        self.sampler = Sampler(
            probes,
            interval=opts.interval,
            t0=self.t0,
            hooks=[self._record],
            on_skip=self._on_skip,
            on_note=self._on_note,
        )

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
            table[st.name] = entry
        return table

    # -- per tick (sampler thread) --------------------------------------------------------------------
    def _record(self, tick: Tick) -> None:
        self.writer.tick(tick.t, tick.values, tick.procs)
        for e in tick.events:
            self.writer.event(e)
        if self.exporter is not None:
            self.exporter.update(tick.values, tick.procs)
            self.exporter.count_tick()
            for e in tick.events:
                self.exporter.count_event(e.kind)
        self._flush(tick.t)

    def _flush(self, t: float) -> None:
        ok = self.writer.flush()
        if not ok and not self._write_error_reported:
            self._write_error_reported = True
            self.log(f"{self.writer.error}; sampling goes on and recording resumes when it can")
        elif ok and self._write_error_reported:
            self._write_error_reported = False
            self.writer.note(t, "trace writing resumed", "info", dropped=self.writer.dropped)

    def _on_skip(self, t: float, n: int) -> None:
        self.writer.skip(t, n)
        if self.exporter is not None:
            self.exporter.count_skipped(n)

    def _on_note(self, t: float, msg: str, level: str) -> None:
        self.writer.note(t, msg, level)

    # -- lifecycle ----------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        unavailable = [f"{s.name} ({s.reason})" for s in self.statuses if not s.available]
        self.log(f"recording to {self.trace_path} every {self.opts.interval:g} s")
        if unavailable:
            self.log("not sampled: " + "; ".join(unavailable))
        self.sampler.start()

    def event(self, kind: str, **data: Any) -> None:
        """Record an event from outside the sampler thread (only while the sampler is stopped)."""
        self.writer.event(Event(self.now(), kind, data))

    def finish(self, **end: Any) -> Path:
        """Stop sampling, take one last tick, write the end record, close everything."""
        self.sampler.stop()
        try:
            self.sampler.tick()
        except Exception:
            pass
        self.writer.end(self.now(), ticks=self.sampler.ticks, skipped=self.sampler.skipped, **end)
        self.writer.close()
        self.sampler.close()
        if self.exporter is not None:
            self.exporter.close()
        if self.writer.error:
            self.log(self.writer.error)
        return self.trace_path


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
