"""The probe contract and discovery.

A probe has a ``name``, ``available()`` (``None`` when it can sample, else the one-line reason why not),
``metrics()`` (metric key -> unit; keys follow ``tuner.records``), ``sample(now)`` returning a
``Sample`` whose missing values are ``None``, and ``close()``.  Optionally ``capture(now)``: a cheap raw
read taken at a fast tick's moment, handed back later as ``sample(now, captured)`` (the sampler batches
fast rates; see ``tuner.sampler``).  Vendor libraries are imported lazily,
inside the probe's own module, so discovering an absent GPU costs microseconds and prints nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tuner.records import Sample


@runtime_checkable
class Probe(Protocol):
    name: str

    def available(self) -> str | None:
        """``None`` when the probe works; otherwise why it does not (one line)."""

    def metrics(self) -> dict[str, str]:
        """Metric key -> unit, for the trace header."""

    def sample(self, now: float) -> Sample:
        """One reading at trace time ``now``; missing values are ``None``."""

    def close(self) -> None:
        """Release what the probe holds (file handles, library sessions)."""


@dataclass(frozen=True)
class ProbeStatus:
    name: str
    reason: str | None  # None: available

    @property
    def available(self) -> bool:
        return self.reason is None


def discover(
    pids: Sequence[int] | None = None, *, include: Sequence[str] | None = None
) -> tuple[list[Probe], list[ProbeStatus]]:
    """Build every probe once and ask it whether it works.

    ``pids`` are the roots of the process trees to watch (``None``: system-wide only).  Returns the
    available probes and a status for every probe, with the reason for each unavailable one.
    """
    from tuner.probes.cgroup import CgroupProbe
    from tuner.probes.cpu import CpuProbe
    from tuner.probes.npu import AscendNpuProbe, IntelNpuProbe
    from tuner.probes.nvidia import NvidiaProbe
    from tuner.probes.rapl import RaplProbe

    cpu = CpuProbe(list(pids or []))
    # the device probes attribute per-process figures to the live tree the CPU probe tracks (servers
    # fork workers after start); without target PIDs they report devices only
    tree = cpu.pids if pids else None
    # the memory limit that can kill the process is its cgroup's (the root's: children inherit it)
    cgroup = CgroupProbe(pids[0] if pids else None)
    gpu = NvidiaProbe(tree, root=pids[0] if pids else None)  # the root's CUDA_VISIBLE_DEVICES: what CUDA shows it
    candidates: list[Probe] = [cpu, cgroup, gpu, RaplProbe(), AscendNpuProbe(tree), IntelNpuProbe()]
    if include is not None:
        candidates = [p for p in candidates if p.name in include]
    usable: list[Probe] = []
    statuses: list[ProbeStatus] = []
    for p in candidates:
        try:
            reason = p.available()
        except Exception as exc:  # a probe must never take the tuner down
            reason = f"probe failed to start: {type(exc).__name__}: {exc}"
        statuses.append(ProbeStatus(p.name, reason))
        if reason is None:
            usable.append(p)
        else:
            p.close()
    return usable, statuses
