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
- The sidecar's own CPU and RSS are recorded too (``self_cpu_ratio``, ``self_cpu_seconds_total``,
  ``self_rss_bytes``), so its cost is visible in every trace.
- Fast rates (interval <= ``batch_s`` / 2, i.e. above 20 Hz by default) run in *batches*: at each deadline
  the probes that can ``capture(now)`` (the CPU probe: a few ``pread``s of raw ``/proc`` bytes) take their
  raw reading and the others (NVML, NPUs) their whole sample; every ``batch_s`` the captured ticks are
  turned into values and handed to the hooks in order, back to back.  Measured on this VM at 100 Hz: a
  whole tick cost ~500 us of CPU after each 10 ms sleep (every wake-up starts with a cold cache) against
  ~50 us in a batch.  Probes marked ``per_batch`` (the output probe: statistics over seconds) and the
  sidecar's own usage are read once a batch, on its last tick (``Tick.final``); the trace is flushed
  there too, so a batch (100 ms) is the most a crash can lose.  Tick times stay the moments of capture.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuner.probes.base import Probe
from tuner.records import Event, Sample

MIN_INTERVAL = 0.001  # 1000 Hz
MAX_INTERVAL = 1.0  # 1 Hz
MAX_DIVISOR = 64
SHORT_WAIT_S = 0.05  # a wait this short sleeps instead of waiting on the stop event
BATCH_S = 0.1  # fast rates are processed in batches of this length (see the module docstring)

TickHook = Callable[["Tick"], None]


@dataclass
class Tick:
    """One tick's merged readings, as handed to hooks (agent, Prometheus, observers)."""

    t: float
    samples: list[Sample]
    values: dict[str, Any]
    procs: dict[int, dict[str, Any]]
    events: list[Event]
    final: bool = True
    """False for a tick that has more of its batch after it (fast rates): consumers flush on final ticks."""


@dataclass
class _ProbeSlot:
    probe: Probe
    divisor: int = 1
    costs: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    failures: int = 0
    disabled: str | None = None
    notes: Callable[[], Sequence[tuple[str, str]]] | None = None
    capture: Callable[[float], Any] | None = None
    per_batch: bool = False
    turn: int = 0

    def __post_init__(self) -> None:
        self.notes = getattr(self.probe, "take_notes", None)
        self.capture = getattr(self.probe, "capture", None)
        self.per_batch = bool(getattr(self.probe, "per_batch", False))

    def due(self) -> bool:
        """Counts a turn; False on the turns a slower cadence (``divisor``) skips."""
        turn = self.turn
        self.turn += 1
        return not turn % self.divisor


@dataclass
class _Taken:
    """A whole sample taken at a fast tick's moment (a probe without ``capture``), and what it cost."""

    sample: Sample
    cost: float


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
        return {"self_cpu_ratio": ratio, "self_cpu_seconds_total": cpu, "self_rss_bytes": rss}

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
        batch_s: float = BATCH_S,
    ) -> None:
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise ValueError(f"interval must be between {MIN_INTERVAL} and {MAX_INTERVAL} s (1-1000 Hz)")
        self.interval = interval
        self.batch_n = round(batch_s / interval) if interval * 2 <= batch_s else 1
        """Ticks a batch holds (1: every tick is read and handed on at its deadline)."""
        self._pending: list[tuple[float, dict[int, Any]]] = []
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
    def tick(self, now: float | None = None, captured: dict[int, Any] | None = None, final: bool = True) -> Tick:
        """Read the probes and hand the tick to the hooks.  ``captured``: what the capturing probes read
        at ``now`` (slot index -> capture; fast rates), in which case the other probes and the sidecar's
        own usage are read only when ``final`` (the batch's last tick)."""
        now = self.clock() if now is None else now
        t = now - self.t0
        samples: list[Sample] = []
        values: dict[str, Any] = {}
        procs: dict[int, dict[str, Any]] = {}
        events: list[Event] = []
        for i, slot in enumerate(self.slots):
            if slot.disabled:
                continue
            cap = captured.get(i) if captured is not None else None
            if captured is not None and cap is None and not (slot.per_batch and final):
                continue  # a per-batch probe before the batch's end, or a turn its cadence skipped
            if not isinstance(cap, (_Taken, BaseException)) and not slot.due():  # (counted at capture)
                continue
            start = time.perf_counter()
            try:
                if isinstance(cap, BaseException):
                    raise cap
                if isinstance(cap, _Taken):
                    s, start = cap.sample, start - cap.cost
                elif cap is None:
                    s = slot.probe.sample(t)
                else:
                    s = slot.probe.sample(t, cap)  # type: ignore[call-arg]
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
        if final:
            values.update(self._self.read(now))
        tick = Tick(t, samples, values, procs, events, final)
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

    def capture(self, now: float | None = None) -> None:
        """A fast tick's moment: capturing probes take a raw reading, the others (but the per-batch ones)
        their whole sample; turned into a tick by ``drain``."""
        now = self.clock() if now is None else now
        t = now - self.t0
        caps: dict[int, Any] = {}
        for i, slot in enumerate(self.slots):
            if slot.disabled or slot.per_batch:
                continue
            try:
                if slot.capture is not None:
                    caps[i] = slot.capture(t)
                elif slot.due():
                    start = time.perf_counter()
                    s = slot.probe.sample(t)
                    caps[i] = _Taken(s, time.perf_counter() - start)
            except Exception as exc:  # reported as the probe's failure when the tick is processed
                caps[i] = exc
        self._pending.append((now, caps))

    def drain(self) -> None:
        """Process the captured ticks, oldest first; the last one is the batch's final tick."""
        pending, self._pending = self._pending, []
        last = len(pending) - 1
        for i, (now, caps) in enumerate(pending):
            self.tick(now, caps, final=i == last)

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
                wait = deadline - now
                if wait <= SHORT_WAIT_S:
                    time.sleep(wait)  # cheaper than Event.wait (~30 us a wake-up here); stop() waits this long
                else:
                    self._stop.wait(wait)
                continue
            late = int((now - deadline) / self.interval)
            if late >= 1:
                if self._pending:
                    self.drain()  # the trace stays in time order: the ticks before the gap first
                self.skipped += late
                deadline += late * self.interval
                if self.on_skip is not None:
                    self.on_skip(now - self.t0, late)
            if self.batch_n > 1:
                self.capture(now)
                if len(self._pending) >= self.batch_n:
                    self.drain()
            else:
                self.tick(now)
            deadline += self.interval
        if self._pending:
            self.drain()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="tuner-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking; probes with a ``finishing()`` method are told, so the last tick (the session takes
        one after this) collects everything still pending — e.g. every message queued on the channel."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._pending and (self._thread is None or not self._thread.is_alive()):
            self.drain()  # captured ticks are recorded, never dropped (the loop drains them as it ends)
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
