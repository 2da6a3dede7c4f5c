"""Energy per generated token: the energy counters of the GPUs the inference uses over the tokens it generated.

The counter (``gpu_energy_joules_total/<i>``, ``tuner.probes.nvidia``) is the *device's*: when another process
computes on a device the watched tree uses (``gpu_other_procs/<i>`` > 0), or that cannot be told (the probe
could not attribute processes: a PID namespace, MIG without privileges), the figure is ``None`` with the
reason — never a share of someone else's joules.  The devices the tree uses are ``tuner.core.limits``'s rule
(it holds a context or memory there; else what its ``CUDA_VISIBLE_DEVICES`` shows it); a MIG instance's energy
is its parent GPU's.  Tokens are the ``tokens`` of ``request`` events (``tuner.client``).

- Live: ``EnergyPerToken.step`` is a tick hook (the session runs it when the NVIDIA probe does): on final ticks
  it adds ``gpu_energy_per_token_joules`` — joules over the last ``WINDOW_S`` seconds / tokens finished in them
  — which the trace, the live view and Prometheus then carry; a reason for ``None`` is a note when it changes.
- Whole run: ``over_run(columns, times, tokens)`` for ``tuner report`` (restarts of a counter are skipped:
  only its increases are summed), with the CPU packages' energy (``cpu_package_energy_joules_total/<n>``,
  ``tuner.probes.rapl``) beside it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tuner.core.limits import DictReader, ValueReader, tree_uses_gpu

KEY = "gpu_energy_per_token_joules"
WINDOW_S = 30.0
TOKEN_FIELDS = ("tokens", "output_tokens", "completion_tokens")
_ENERGY = "gpu_energy_joules_total/"


def request_tokens(data: Mapping[str, Any]) -> float | None:
    """Generated tokens a ``request`` event reports (its first token field that is a number)."""
    for f in TOKEN_FIELDS:
        v = data.get(f)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def devices_used(r: ValueReader) -> list[str]:
    """The physical GPUs (with an energy counter) whose energy the inference's work spends: those it uses, or
    whose MIG instance it uses."""
    out = []
    keys = list(r.keys)
    for key in keys:
        if not key.startswith(_ENERGY):
            continue
        dev = key[len(_ENERGY):]
        children = {k.split("/", 1)[1] for k in keys if k.startswith(("gpu_tree_procs/", "gpu_tree_cuda_devices/"))
                    and k.split("/", 1)[1].startswith(f"{dev}:")}  # fmt: skip
        if tree_uses_gpu(r, dev) or any(tree_uses_gpu(r, c) for c in children):
            out.append(dev)
    return out


def shared_reason(r: ValueReader, devices: Iterable[str]) -> str | None:
    """Why the devices' energy is not the inference's alone (None: it is)."""
    for d in devices:
        others = r.latest(f"gpu_other_procs/{d}")
        if others:
            n = int(others)
            return f"{n} other process{'es' if n > 1 else ''} compute{'' if n > 1 else 's'} on GPU {d} (its energy " \
                   "counter is the device's)"  # fmt: skip
        if others is None and r.latest(f"gpu_tree_procs/{d}") is None:
            return f"cannot tell whether other processes compute on GPU {d} (processes there cannot be attributed)"
    return None


class EnergyPerToken:
    """The live figure (see the module docstring).  ``on_note(t, msg, level)``: the trace's notes."""

    def __init__(self, on_note: Callable[[float, str, str], None] | None = None, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.on_note = on_note
        self._energy: dict[str, deque[tuple[float, float]]] = {}
        self._tokens: deque[tuple[float, float]] = deque()
        self._last: dict[str, Any] = {}
        self._said: str | None = None

    def step(self, tick: Any) -> None:
        t = float(tick.t)
        values = tick.values
        n = 0.0
        for e in tick.events:
            if e.kind == "request":
                n += request_tokens(e.data) or 0.0
        if n:
            self._tokens.append((t, n))
        for key, v in values.items():
            if key.startswith("gpu_"):
                self._last[key] = v
                if key.startswith(_ENERGY) and isinstance(v, (int, float)) and math.isfinite(v):
                    ring = self._energy.setdefault(key[len(_ENERGY):], deque())
                    if ring and v < ring[-1][1]:
                        ring.clear()  # the driver restarted: its counter too
                    ring.append((t, float(v)))
        if not tick.final:
            return
        start = t - self.window_s
        for ring in self._energy.values():
            while len(ring) > 2 and ring[1][0] <= start:
                ring.popleft()
        while self._tokens and self._tokens[0][0] <= start:
            self._tokens.popleft()
        r = DictReader(self._last)
        devs = devices_used(r)
        if not devs:
            return
        value, reason = None, shared_reason(r, devs)
        tokens = sum(n for _, n in self._tokens)
        if reason is None and tokens > 0:
            joules = 0.0
            for d in devs:
                got = self._energy.get(d)
                if not got or len(got) < 2:
                    joules = math.nan
                    break
                joules += got[-1][1] - got[0][1]
            value = joules / tokens if math.isfinite(joules) else None
        values[KEY] = value
        if reason != self._said:
            self._said = reason
            if self.on_note is not None:
                msg = f"energy per token not computed: {reason}" if reason else "energy per token computed again"
                self.on_note(t, msg, "info")


def over_run(columns: Mapping[str, np.ndarray], times: np.ndarray, tokens: Sequence[float]) -> dict[str, Any]:
    """The run's energy: ``{"devices", "gpu_joules", "gpu_mean_watts", "tokens", "joules_per_token", "reason",
    "cpu_package_joules", "cpu_joules_per_token"}`` (None where not known).  ``times``: the ticks' (the mean
    power is over the span the counters were read in)."""
    used = []
    shared: str | None = None
    for key in columns:
        if not key.startswith(_ENERGY):
            continue
        dev = key[len(_ENERGY):]
        devs = [dev, *{k.split("/", 1)[1] for k in columns if k.startswith("gpu_tree_procs/")
                       and k.split("/", 1)[1].startswith(f"{dev}:")}]  # fmt: skip
        if not any(_used_in_run(columns, d) for d in devs):
            continue
        used.append(dev)
        others = _finite(columns.get(f"gpu_other_procs/{dev}"))
        ours = _finite(columns.get(f"gpu_tree_procs/{dev}"))
        if shared is None and others.size and others.max() > 0:
            n = int(others.max())
            shared = f"other processes (up to {n}) computed on GPU {dev} (its energy counter is the device's)"
        elif shared is None and not others.size and not ours.size:
            shared = f"cannot tell whether other processes computed on GPU {dev} (processes could not be attributed)"
    gpu_j = sum((_increase(columns[f"{_ENERGY}{d}"]) for d in used), 0.0) if used else None
    span = None
    if used:
        t = np.asarray(times, dtype=np.float64)[np.isfinite(np.asarray(columns[f"{_ENERGY}{used[0]}"], dtype=float))]
        span = float(t[-1] - t[0]) if t.size >= 2 else None
    n_tok = float(sum(tokens))
    reason = shared
    if reason is None and gpu_j is not None and not n_tok:
        reason = "no generated tokens reported (requests come from tuner.client)"
    if not used:
        reason = "no GPU energy counter for a device the inference uses"
    cpu = [_increase(col) for k, col in columns.items() if k.startswith("cpu_package_energy_joules_total/")]
    cpu_j = float(sum(cpu)) if cpu else None
    return {
        "devices": used,
        "gpu_joules": gpu_j,
        "gpu_mean_watts": gpu_j / span if gpu_j is not None and span else None,
        "tokens": n_tok,
        "joules_per_token": gpu_j / n_tok if gpu_j is not None and n_tok and shared is None else None,
        "reason": reason if (shared is not None or not n_tok or not used) else None,
        "cpu_package_joules": cpu_j,
        "cpu_joules_per_token": cpu_j / n_tok if cpu_j is not None and n_tok else None,
    }


def _finite(col: np.ndarray | None) -> np.ndarray:
    if col is None:
        return np.empty(0)
    a = np.asarray(col, dtype=np.float64)
    return a[np.isfinite(a)]


def _used_in_run(columns: Mapping[str, np.ndarray], dev: str) -> bool:
    procs, mem = _finite(columns.get(f"gpu_tree_procs/{dev}")), _finite(columns.get(f"gpu_tree_mem_bytes/{dev}"))
    if procs.size or mem.size:
        return bool((procs > 0).any() or (mem > 0).any())
    cuda = _finite(columns.get(f"gpu_tree_cuda_devices/{dev}"))
    return not cuda.size or bool((cuda > 0).any())


def _increase(col: np.ndarray) -> float:
    """What a counter gained over the run (its decreases — restarts — skipped)."""
    a = _finite(col)
    if a.size < 2:
        return 0.0
    d = np.diff(a)
    return float(d[d > 0].sum())
