"""The sampler: ticks on monotonic deadlines, asks each probe for a reading, hands the tick on.

- Deadlines are ``start + k * interval``: no drift, however long a tick takes.
- A tick that would start more than one interval late is not bunched up: the missed deadlines are
  recorded as skipped (``skip`` record) and sampling resumes on the next deadline.
- Each probe's cost is measured every time (``probe_cost_seconds/<probe>`` in the tick).  A probe whose
  median cost exceeds its budget (a share of the interval) moves to a slower cadence — every 2nd, 4th …
  tick — with a note in the trace; it never slows the other probes.
- A probe may say something worth a note in the trace (a device lost, a query no longer supported, a
  channel refusing peers or dropping messages): it has a ``take_notes() -> [(message, level)]`` method,
  called after each of its readings; the notes go to ``on_note`` (the trace's ``note`` records, which
  ``tuner report`` lists).  A probe that raises is noted and, after 5 failures, disabled; the others go on.
- The sidecar's own CPU and RSS are recorded too (``self_cpu_ratio``, ``self_rss_bytes``), so its cost
  is visible in every trace.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from probes.base import Probe
from tuner.records import Event, Sample

MIN_INTERVAL = 0.001  # 1000 Hz
MAX_INTERVAL = 1.0  # 1 Hz
MAX_DIVISOR = 64

TickHook = Callable[["Tick"], None]


@dataclass
class Tick:
    """One tick's merged readings, as handed to hooks (agent, Prometheus, observers)."""

    t: float
    samples: list[Sample]
    values: dict[str, Any]
    procs: dict[int, dict[str, Any]]
    events: list[Event]


@dataclass
class _ProbeSlot:
    probe: Probe
    divisor: int = 1
    costs: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    failures: int = 0
    disabled: str | None = None
    notes: Callable[[], Sequence[tuple[str, str]]] | None = None

    def __post_init__(self) -> None:
        self.notes = getattr(self.probe, "take_notes", None)


class _SelfUsage:
    """The sidecar's own CPU (``os.times``) and RSS (a kept-open ``/proc/self/statm``)."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._statm: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._statm = None
        self._last: tuple[float, float] | None = None

    def read(self, now: float) -> dict[str, float | None]:
        t = os.times()
        cpu = t.user + t.system
        ratio = None
        if self._last is not None and now > self._last[0]:
            ratio = max(0.0, (cpu - self._last[1]) / (now - self._last[0]))
        self._last = (now, cpu)
        rss = None
        if self._statm is not None:
            try:
                rss = float(int(os.pread(self._statm, 128, 0).split()[1]) * self._page)
            except (OSError, ValueError, IndexError):
                rss = None
        return {"self_cpu_ratio": ratio, "self_rss_bytes": rss}

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None


class Sampler:
    """Runs the probes on a fixed cadence.  ``t0`` is the monotonic origin of trace time."""

    def __init__(
        self,
        probes: Sequence[Probe],
        *,
        interval: float = 0.1,
        t0: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        budget_ratio: float = 0.25,
        hooks: Sequence[TickHook] = (),
        on_skip: Callable[[float, int], None] | None = None,
        on_note: Callable[[float, str, str], None] | None = None,
    ) -> None:
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise ValueError(f"interval must be between {MIN_INTERVAL} and {MAX_INTERVAL} s (1-1000 Hz)")
        self.interval = interval
        self.clock = clock
        self.t0 = clock() if t0 is None else t0
        self.budget_ratio = budget_ratio
        self.slots = [_ProbeSlot(p) for p in probes]
        self.hooks: list[TickHook] = list(hooks)
        self.on_skip = on_skip
        self.on_note = on_note
        self.ticks = 0
        self.skipped = 0
        self._self = _SelfUsage()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one tick ------------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> Tick:
        now = self.clock() if now is None else now
        t = now - self.t0
        samples: list[Sample] = []
        values: dict[str, Any] = {}
        procs: dict[int, dict[str, Any]] = {}
        events: list[Event] = []
        for slot in self.slots:
            if slot.disabled or self.ticks % slot.divisor:
                continue
            start = time.perf_counter()
            try:
                s = slot.probe.sample(t)
            except Exception as exc:  # a failing probe is reported and, if it keeps failing, dropped
                slot.failures += 1
                self._note(t, f"probe {slot.probe.name} failed: {type(exc).__name__}: {exc}", "warn")
                if slot.failures >= 5:
                    slot.disabled = f"failed {slot.failures} times"
                    self._note(t, f"probe {slot.probe.name} disabled after {slot.failures} failures", "warn")
                continue
            cost = time.perf_counter() - start
            if slot.notes is not None:
                try:
                    for msg, level in slot.notes():
                        self._note(t, msg, level)
                except Exception as exc:
                    self._note(t, f"probe {slot.probe.name} notes failed: {type(exc).__name__}: {exc}", "warn")
            slot.costs.append(cost)
            samples.append(s)
            values.update(s.values)
            values[f"probe_cost_seconds/{slot.probe.name}"] = cost
            if s.procs:
                for pid, pv in s.procs.items():
                    procs.setdefault(pid, {}).update(pv)
            events.extend(s.events)
            self._check_budget(slot, t)
        values.update(self._self.read(now))
        tick = Tick(t, samples, values, procs, events)
        self.ticks += 1
        for hook in list(self.hooks):
            try:
                hook(tick)
            except Exception as exc:
                self.hooks.remove(hook)
                self._note(
                    t, f"tick consumer {getattr(hook, '__qualname__', hook)} failed and was removed: {exc}", "warn"
                )
        return tick

    def _check_budget(self, slot: _ProbeSlot, t: float) -> None:
        if len(slot.costs) < slot.costs.maxlen or slot.divisor >= MAX_DIVISOR:  # type: ignore[operator]
            return
        med = sorted(slot.costs)[len(slot.costs) // 2]
        budget = self.budget_ratio * self.interval * slot.divisor
        if med > budget:
            slot.divisor *= 2
            slot.costs.clear()
            self._note(
                t,
                f"probe {slot.probe.name} costs {med * 1e3:.2f} ms a reading, over its budget of "
                f"{budget * 1e3:.2f} ms: now sampled every {slot.divisor} ticks",
                "warn",
            )

    def _note(self, t: float, msg: str, level: str) -> None:
        if self.on_note is not None:
            self.on_note(t, msg, level)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        """Tick until ``stop()``.  Runs in the calling thread."""
        deadline = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            if now < deadline:
                self._stop.wait(deadline - now)
                continue
            late = int((now - deadline) / self.interval)
            if late >= 1:
                self.skipped += late
                deadline += late * self.interval
                if self.on_skip is not None:
                    self.on_skip(now - self.t0, late)
            self.tick(now)
            deadline += self.interval

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="tuner-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking; probes with a ``finishing()`` method are told, so the last tick (the session takes
        one after this) collects everything still pending — e.g. every message queued on the channel."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for slot in self.slots:
            finishing = getattr(slot.probe, "finishing", None)
            if finishing is not None:
                try:
                    finishing()
                except Exception:
                    pass

    def close(self) -> None:
        self.stop()
        for slot in self.slots:
            try:
                slot.probe.close()
            except Exception:
                pass
        self._self.close()

    def probe_divisors(self) -> Mapping[str, int]:
        return {s.probe.name: s.divisor for s in self.slots}
