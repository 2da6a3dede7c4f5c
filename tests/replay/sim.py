"""A small, deterministic model of an inference server driven by the knobs, for policy tests and for
the synthetic traces under ``tests/replay/``.

Shapes are the ones measured on this machine (``../shared/STYLE.md``): tokens/s against batch size
67 @1, 190 @8, 420 @32, 419 @64 with TTFT 0.06 s -> 2.6 s; int8 saves ~64% of the weights and runs
1.4x faster, bf16 halves them and runs 3.5x slower; repetition (seq-rep-4) falls with temperature
(the ``slope_sign`` parameter flips it, to test that the policy measures rather than assumes).
Not a benchmark: a plant for closed-loop tests.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuner.records import Action, Event, Knobs

BATCH = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256], dtype=float)
TOK_S = np.array([67, 100, 140, 190, 300, 420, 419, 415, 410], dtype=float)
TTFT = np.array([0.06, 0.08, 0.12, 0.2, 0.45, 0.94, 2.6, 5.5, 11.0], dtype=float)
SPEED = {"fp32": 1.0, "bf16": 1 / 3.5, "fp16": 1 / 3.5, "int8": 1.41}
WEIGHTS = {"fp32": 1.0, "bf16": 0.5, "fp16": 0.5, "int8": 0.36}
QUALITY = {"fp32": (0.0, 1.0), "bf16": (0.004, 0.99), "fp16": (0.004, 0.99), "int8": (0.02, 0.95)}


def curve(b: float, table: np.ndarray) -> float:
    return float(np.interp(math.log2(max(b, 1.0)), np.log2(BATCH), table))


@dataclass
class SimTick:
    t: float
    values: dict[str, Any]
    events: list[Event]
    procs: dict[int, dict[str, Any]] = field(default_factory=dict)
    samples: list[Any] = field(default_factory=list)


@dataclass
class Sim:
    seed: int = 0
    dt: float = 0.1
    temperature: float = 0.7
    batch_size: int = 8
    precision: str = "fp32"
    repetition_penalty: float = 1.0
    slope_sign: float = -1.0
    rep_at_07: float = 0.06
    rep_slope: float = 0.25
    rep_noise: float = 0.02
    """Standard deviation of one response's seq-rep-4 around the plant's curve."""
    mem_total: float = 8e9
    mem_used_base: float = 3e9
    weights_bytes: float = 1.5e9
    per_seq_bytes: float = 40e6
    leak_per_request: float = 0.0
    oom_batch: int | None = None
    demand_tok_s: float | None = None
    """Open-loop demand in tokens/s (None: more than any batch size can serve)."""
    prompt_tokens: float = 64.0
    tokens_per_request: int = 32
    kl_extra: float = 0.0
    t: float = 0.0
    done: int = 0
    leaked: float = 0.0
    cache: float = 0.0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=4000))
    pending: list[Event] = field(default_factory=list)
    _carry: float = 0.0
    _rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    @property
    def rng(self) -> np.random.Generator:
        assert self._rng is not None
        return self._rng

    # -- what the inference side does with the knobs ------------------------------------------------
    def apply_knobs(self, k: Knobs) -> None:
        if k.temperature is not None:
            self.temperature = float(k.temperature)
        if k.batch_size is not None:
            self.batch_size = int(k.batch_size)
        if k.repetition_penalty is not None:
            self.repetition_penalty = float(k.repetition_penalty)

    def command(self, cid: str, action: Action) -> None:
        """Run a command as the client would between batches; its result arrives next tick."""
        if action.knob == "cleanup":
            before = self.rss()
            self.leaked *= 0.02
            self.cache = 0.0
            after = self.rss()
            res: dict[str, Any] = {
                "reclaimed_bytes": before - after,
                "rss_before_bytes": before,
                "rss_after_bytes": after,
                "steps": [{"step": s, "reclaimed_bytes": 0, "seconds": 0.01} for s in action.value],
            }
            self.pending.append(
                Event(self.t, "command_result", {"id": cid, "cmd": "cleanup", "ok": True, "result": res, "error": None})
            )
        elif action.knob == "precision":
            p = str(action.value)
            kl, top1 = QUALITY[p]
            kl += self.kl_extra if p != "fp32" else 0.0
            res = {
                "precision": p,
                "previous": self.precision,
                "kl": kl,
                "top1": top1,
                "changed": True,
                "param_bytes_before": self.weights_bytes * WEIGHTS[self.precision],
                "param_bytes_after": self.weights_bytes * WEIGHTS[p],
            }
            self.precision = p
            self.pending.append(
                Event(
                    self.t, "command_result", {"id": cid, "cmd": "precision", "ok": True, "result": res, "error": None}
                )
            )

    def rss(self) -> float:
        return (
            self.mem_used_base
            + self.weights_bytes * WEIGHTS[self.precision]
            + self.batch_size * self.per_seq_bytes
            + self.leaked
            + self.cache
        )

    def rep(self, temp: float) -> float:
        r = self.rep_at_07 + self.slope_sign * self.rep_slope * (temp - 0.7) - 0.3 * (self.repetition_penalty - 1.0)
        return min(1.0, max(0.0, r))

    # -- one tick -----------------------------------------------------------------------------------
    def tick(self) -> SimTick:
        self.t = round(self.t + self.dt, 6)
        t = self.t
        events: list[Event] = list(self.pending)
        self.pending.clear()
        b = self.batch_size
        if self.oom_batch is not None and b >= self.oom_batch:
            events.append(Event(t, "oom", {"pid": 1, "batch_size": b}))
            self.batch_size = max(1, b // 2)  # the client retries smaller on its own
            b = self.batch_size
        speed = SPEED[self.precision]
        tok_s = curve(b, TOK_S) * speed
        if self.demand_tok_s is not None:
            tok_s = min(tok_s, self.demand_tok_s)
        rate = tok_s / self.tokens_per_request
        self._carry += rate * self.dt
        n = int(self._carry)
        self._carry -= n
        for _ in range(n):
            ttft = curve(b, TTFT) / speed * float(self.rng.lognormal(0.0, 0.1))
            rep = min(1.0, max(0.0, self.rep(self.temperature) + float(self.rng.normal(0.0, self.rep_noise))))
            d = {
                "id": f"r{self.done}",
                "pid": 1,
                "prompt_tokens": int(self.prompt_tokens),
                "tokens": self.tokens_per_request,
                "queue_seconds": 0.0,
                "ttft_seconds": ttft,
                "tpot_seconds": 1.0 / max(tok_s / max(b, 1), 1e-3),
                "e2e_seconds": ttft + 0.5,
                "tokens_per_second": tok_s / max(b, 1),
                "seq_rep_4": rep,
                "rep_32": rep / 2,
                "loop": False,
                "batch_size": b,
                "temperature": self.temperature,
                "precision": self.precision,
            }
            self.done += 1
            self.leaked += self.leak_per_request
            self.cache += 0.2e6
            self.recent.append({"t": t, **d})
            events.append(Event(t, "request", d))
        while self.recent and self.recent[0]["t"] < t - 10.0:
            self.recent.popleft()
        win = list(self.recent)
        v: dict[str, Any] = {}
        if win:
            ttfts = sorted(r["ttft_seconds"] for r in win)
            tpots = sorted(r["tpot_seconds"] for r in win)
            v["req_ttft_p95_seconds"] = _pct(ttfts, 0.95)
            v["req_ttft_p50_seconds"] = _pct(ttfts, 0.5)
            v["req_tpot_p95_seconds"] = _pct(tpots, 0.95)
            span = min(10.0, t)
            v["req_tokens_per_second"] = sum(r["tokens"] for r in win) / span
            v["req_requests_per_second"] = len(win) / span
            v["req_seq_rep_4_ratio"] = sum(r["seq_rep_4"] for r in win) / len(win)
        else:
            for k in (
                "req_ttft_p95_seconds",
                "req_ttft_p50_seconds",
                "req_tpot_p95_seconds",
                "req_tokens_per_second",
                "req_requests_per_second",
                "req_seq_rep_4_ratio",
            ):
                v[k] = None
        v["req_done_total"] = float(self.done)
        rss = self.rss() + float(self.rng.normal(0.0, 2e6))
        v["tree_rss_bytes"] = rss
        v["sys_mem_total_bytes"] = self.mem_total
        v["sys_mem_available_bytes"] = max(0.0, self.mem_total - rss)
        alloc = self.weights_bytes * WEIGHTS[self.precision] + self.leaked + b * self.per_seq_bytes * 0.8
        v["alloc_allocated_bytes"] = alloc
        v["alloc_reserved_bytes"] = alloc + self.cache
        v["tree_cpu_ratio"] = 1.8
        return SimTick(t, v, events)


def _pct(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile of a sorted list (what the output probe reports)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class SimActuator:
    """Carries the agent's decisions into the simulator, like ``ChannelActuator`` into a client."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.n = 0

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]:
        if action.knob in ("cleanup", "precision"):
            self.n += 1
            cid = f"c{self.n}"
            self.sim.command(cid, action)
            return "applied", {"command_id": cid}
        self.sim.apply_knobs(knobs)
        return "applied", {}


# -- a plant with a queue: static batches served from a FIFO fed by a time-varying Poisson stream ---------------
RateFn = Callable[[float], float]


@dataclass
class Served:
    arrived: float
    started: float
    first: float
    end: float
    tokens: int
    batch: int
    prompt: int = 64


@dataclass
class QueueSim:
    """An inference server like the demo's: requests arrive as a Poisson stream of rate ``rate(t)`` (per
    second), wait in a FIFO queue (at most ``max_queue``; beyond it they are rejected), and are served in
    static batches of up to the ``batch_size`` knob (read when a batch starts, as the demo does): a batch of
    ``k`` takes ``prefill(k)`` then ``max(lengths)`` decode steps of ``k / tok_s(k)`` seconds; each request
    ends after its own length.  Full-batch tokens/s follow ``tok_s`` (default: this machine's measured curve,
    ``TOK_S``); the machine's other jobs scale every time by a slow factor (a smoothed random walk,
    ``drift`` its standard deviation, identical for every run of one ``seed``: tuned and untuned runs see the
    same arrivals and the same machine) times a per-batch noise (``batch_noise``).  int8 runs ``SPEED``
    times faster.  Ticks report what the output probe would (``req_*``) and finished ``request`` events."""

    seed: int = 0
    dt: float = 0.25
    batch_size: int = 8
    precision: str = "fp32"
    rate: RateFn = lambda t: 4.0
    prompt_tokens: RateFn = lambda t: 64.0
    min_new: int = 32
    max_new: int = 96
    tok_s: np.ndarray = field(default_factory=lambda: TOK_S.copy())
    ttft: np.ndarray = field(default_factory=lambda: TTFT.copy())
    drift: float = 0.10
    batch_noise: float = 0.05
    max_queue: int = 512
    mem_total: float = 8e9
    t: float = 0.0
    queue: deque[tuple[float, int, int]] = field(default_factory=deque)
    served: list[Served] = field(default_factory=list)
    rejected: int = 0
    arrived: int = 0
    pending: list[Event] = field(default_factory=list)
    _busy_until: float = 0.0
    _running: list[Served] = field(default_factory=list)
    _next_arrival: float = 0.0
    _recent: deque[Served] = field(default_factory=deque)
    _machine: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._arr_rng = np.random.default_rng([self.seed, 1])
        self._svc_rng = np.random.default_rng([self.seed, 2])
        steps = self._svc_rng.normal(0.0, 1.0, 4000)  # one a second: the other jobs' share of the machine
        walk = np.zeros(steps.size)
        for i in range(1, steps.size):  # AR(1), time constant ~20 s
            walk[i] = 0.95 * walk[i - 1] + math.sqrt(1 - 0.95**2) * steps[i]
        self._machine = np.exp(self.drift * walk)
        self._next_arrival = self._draw_gap(0.0)

    def _draw_gap(self, t: float) -> float:
        # thinning against a bound: exact for any rate function under it
        bound = 200.0
        while True:
            t += float(self._arr_rng.exponential(1.0 / bound))
            r = max(0.0, float(self.rate(t)))
            if self._arr_rng.random() * bound <= min(r, bound):
                return t

    def machine(self, t: float) -> float:
        assert self._machine is not None
        return float(self._machine[min(int(t), self._machine.size - 1)])

    def apply_knobs(self, k: Knobs) -> None:
        if k.batch_size is not None:
            self.batch_size = int(k.batch_size)

    def command(self, cid: str, action: Action) -> None:
        if action.knob == "precision":
            p = str(action.value)
            kl, top1 = QUALITY[p]
            res = {"precision": p, "previous": self.precision, "kl": kl, "top1": top1, "changed": True}
            self.precision = p
        else:
            res = {"reclaimed_bytes": 0, "steps": []}
        self.pending.append(Event(self.t, "command_result", {"id": cid, "cmd": action.knob, "ok": True,
                                                            "result": res, "error": None}))

    def _start_batch(self, at: float) -> None:
        k = min(self.batch_size, len(self.queue))
        jobs = [self.queue.popleft() for _ in range(k)]
        slow = self.machine(at) * float(self._svc_rng.lognormal(0.0, self.batch_noise)) / SPEED[self.precision]
        prompt = max(float(np.mean([p for _, p, _ in jobs])), 1.0)
        prefill = curve(k, self.ttft) * prompt / 64.0 * slow
        step = k / curve(k, self.tok_s) * slow
        for arrived, p, n in jobs:
            self._running.append(Served(arrived, at, at + prefill + step, at + prefill + n * step, n, k, p))
        self._busy_until = at + prefill + max(n for _, _, n in jobs) * step

    def _arrivals_until(self, t: float) -> None:
        while self._next_arrival <= t:
            a = self._next_arrival
            self.arrived += 1
            if len(self.queue) >= self.max_queue:
                self.rejected += 1
            else:
                n = int(self._arr_rng.integers(self.min_new, self.max_new + 1))
                self.queue.append((a, int(self.prompt_tokens(a)), n))
            self._next_arrival = self._draw_gap(a)

    def tick(self) -> SimTick:
        t_end = round(self.t + self.dt, 6)
        events: list[Event] = list(self.pending)
        self.pending.clear()
        while True:
            free = self._busy_until
            if free > t_end:
                break
            self._arrivals_until(max(free, self.t))
            if self.queue:
                self._start_batch(max(free, self.queue[0][0]))
                continue
            if self._next_arrival > t_end:
                break
            self._arrivals_until(self._next_arrival)
            self._busy_until = max(free, self.queue[0][0])
        self._arrivals_until(t_end)
        self.t = t_end
        done = [r for r in self._running if r.end <= t_end]
        self._running = [r for r in self._running if r.end > t_end]
        for r in sorted(done, key=lambda r: r.end):
            self.served.append(r)
            self._recent.append(r)
            n = r.tokens
            events.append(Event(round(r.end, 6), "request", {
                "id": f"r{len(self.served)}", "pid": 1, "prompt_tokens": r.prompt, "tokens": n,
                "queue_seconds": r.started - r.arrived, "ttft_seconds": r.first - r.arrived,
                "tpot_seconds": (r.end - r.first) / max(n - 1, 1), "e2e_seconds": r.end - r.arrived,
                "batch_size": r.batch, "temperature": 0.7, "precision": self.precision}))
        while self._recent and self._recent[0].end < t_end - 10.0:
            self._recent.popleft()
        v: dict[str, Any] = {"sys_mem_total_bytes": self.mem_total, "sys_mem_available_bytes": self.mem_total * 0.6,
                             "tree_rss_bytes": self.mem_total * 0.4,
                             "req_active": float(len(self.queue) + len(self._running))}
        win = list(self._recent)
        if win:
            ttfts = sorted(r.first - r.arrived for r in win)
            v["req_ttft_p95_seconds"] = _pct(ttfts, 0.95)
            v["req_tpot_p95_seconds"] = _pct(sorted((r.end - r.first) / max(r.tokens - 1, 1) for r in win), 0.95)
            v["req_tokens_per_second"] = sum(r.tokens for r in win) / min(10.0, t_end)
        return SimTick(t_end, v, events)

    # -- what a run achieved ----------------------------------------------------------------------------
    def queue_p95(self) -> float:
        waits = [r.started - r.arrived for r in self.served] + [self.t - a for a, _, _ in self.queue]
        return float(np.percentile(waits, 95)) if waits else 0.0

    def tokens(self) -> int:
        return sum(r.tokens for r in self.served)

    def attainment(self, slo: float) -> float:
        ok = sum(1 for r in self.served if r.first - r.arrived <= slo)
        return ok / max(self.arrived, 1)


class QueueActuator:
    """Carries the agent's decisions into a ``QueueSim``."""

    def __init__(self, sim: QueueSim) -> None:
        self.sim = sim
        self.n = 0

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]:
        if action.knob in ("cleanup", "precision"):
            self.n += 1
            cid = f"q{self.n}"
            self.sim.command(cid, action)
            return "applied", {"command_id": cid}
        self.sim.apply_knobs(knobs)
        return "applied", {}
