"""Batch-size policy, closed loop on the simulator with this machine's measured curve (67 tok/s @1,
190 @8, 420 @32, 419 @64; TTFT 0.06 s -> 2.6 s): it finds the knee, respects an SLO, survives OOMs."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from tests.replay.sim import QueueSim, Sim, SimActuator, SimTick
from tuner.core.agent import Agent
from tuner.core.arbiter import Arbiter
from tuner.policies.batch_size import BatchConfig, BatchSizePolicy
from tuner.records import Action, Applied, Event, Knobs


def run(sim: Sim, cfg: BatchConfig, ticks: int, agent: Agent | None = None) -> Agent:
    if agent is None:
        pol = BatchSizePolicy(cfg)
        agent = Agent(
            [pol], Arbiter(bounds=pol.bounds, cooldown_s={"batch_size": 2.0, "cleanup": 5.0}), SimActuator(sim), None
        )
    for _ in range(ticks):
        agent.step(sim.tick())
    return agent


def batch_moves(agent: Agent) -> list[Applied]:
    return [a for a in agent.applied if a.action.knob == "batch_size" and a.outcome == "applied"]


def test_finds_the_knee_not_the_largest_batch() -> None:
    sim = Sim(seed=5, batch_size=1, tokens_per_request=64)
    cfg = BatchConfig(min=1, max=256, start=1, measure_s=8.0, settle_s=1.0, knee_tolerance=0.05)
    agent = run(sim, cfg, 1500)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy)
    assert pol.phase == "hold"
    best = max(m.tokens_per_second for m in pol.measured.values())
    assert 24 <= sim.batch_size <= 32  # 64 is as fast as 32 at 2.8x the TTFT: the knee is at most 32
    assert pol.measured[sim.batch_size].tokens_per_second >= 0.95 * best
    assert 64 in pol.measured  # it looked past the knee to know it was one
    windows = len(batch_moves(agent))
    assert windows <= 10  # reached within 10 decision windows


def test_ttft_slo_caps_the_batch() -> None:
    sim = Sim(seed=6, batch_size=8, tokens_per_request=64)
    cfg = BatchConfig(min=1, max=128, measure_s=8.0, settle_s=1.0, slo_ttft_p95_s=0.5)
    agent = run(sim, cfg, 1500)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy)
    m = pol.measured[sim.batch_size]
    assert m.ttft_p95 is not None and m.ttft_p95 <= 0.5
    assert 8 <= sim.batch_size <= 20  # TTFT 0.45 s at 16 on this curve, 0.94 at 32
    assert all(a.action.value <= 32 for a in batch_moves(agent))


def test_oom_halves_marks_a_ceiling_cleans_up_and_never_retries_above() -> None:
    sim = Sim(seed=7, batch_size=8, tokens_per_request=64, oom_batch=24)
    cfg = BatchConfig(min=1, max=128, measure_s=8.0, settle_s=1.0)
    agent = run(sim, cfg, 2500)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy)
    assert pol.ceiling is not None and pol.ceiling <= 32
    oom_moves = [a for a in batch_moves(agent) if "out of memory" in a.action.reason]
    assert oom_moves and oom_moves[0].action.value <= 16
    assert any(a.action.knob == "cleanup" and a.outcome == "applied" for a in agent.applied)
    after = [a for a in batch_moves(agent) if a.t > oom_moves[-1].t]
    assert all(a.action.value < pol.ceiling for a in after)
    assert sim.batch_size < 24


def test_ceiling_is_lifted_when_memory_frees() -> None:
    from tuner.core.window import Window
    from tuner.records import Event, Knobs

    pol = BatchSizePolicy(BatchConfig(min=1, max=64, ceiling_release=0.1))
    w = Window(keys=["sys_mem_available_bytes", "sys_mem_total_bytes"])
    w.update(
        0.0, {"sys_mem_available_bytes": 10.0, "sys_mem_total_bytes": 100.0}, [Event(0.0, "oom", {"batch_size": 32})]
    )
    acts = pol.decide(w, Knobs(batch_size=32))
    assert [(a.knob, a.value) for a in acts] == [("batch_size", 16), ("cleanup", list(BatchConfig().cleanup_steps))]
    assert pol.ceiling == 32
    w.update(1.0, {"sys_mem_available_bytes": 15.0, "sys_mem_total_bytes": 100.0})
    pol.decide(w, Knobs(batch_size=16))
    assert pol.ceiling == 32  # 5 points more headroom: not enough
    w.update(2.0, {"sys_mem_available_bytes": 25.0, "sys_mem_total_bytes": 100.0})
    pol.decide(w, Knobs(batch_size=16))
    assert pol.ceiling is None


def test_a_drop_in_demand_does_not_move_the_held_knee() -> None:
    """Demand drops to 120 tok/s (batch 4 would serve it): the old policy re-searched from a quarter of the
    knee; the batch size is a cap, a smaller one saves nothing here and costs minutes of queueing when the
    load returns.  The knee holds."""
    sim = Sim(seed=8, batch_size=8, tokens_per_request=64)
    cfg = BatchConfig(min=1, max=128, measure_s=8.0, settle_s=1.0, retune_shift=0.3)
    agent = run(sim, cfg, 1500)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy) and pol.phase == "hold"
    knee, moves = sim.batch_size, len(batch_moves(agent))
    sim.demand_tok_s = 120.0
    run(sim, cfg, 1500, agent)
    assert sim.batch_size == knee and len(batch_moves(agent)) == moves


def test_queueing_is_not_counted_against_the_batch_size() -> None:
    """Under overload TTFT is mostly queue: a smaller batch would only lengthen it.  The SLO is judged on
    service time (TTFT minus queue), so an overloaded but fast batch stays feasible."""
    from tuner.core.window import Window
    from tuner.records import Event

    pol = BatchSizePolicy(BatchConfig(min=1, max=64, settle_s=0.0, measure_s=5.0, slo_ttft_p95_s=0.5))
    w = Window(keys=[])
    pol.changed_at = 0.0
    for i in range(1, 60):
        t = i * 0.1
        reqs = [Event(t, "request", {"tokens": 32, "ttft_seconds": 5.0 + 0.01 * i, "queue_seconds": 4.8 + 0.01 * i})]
        w.update(t, {}, reqs)
        m = pol._measure(w, 16)
        if m is not None:
            break
    assert m is not None and m.ttft_p95 is not None
    assert abs(m.ttft_p95 - 0.2) < 1e-6 and pol._feasible(m)


def static_batches(batch: int, n_batches: int, t0: float = 0.0, seed: int = 0) -> tuple[list[Event], float]:
    """Request events of a static-batching server (the demo): each batch's requests start together, each
    ends after its own length, the next batch starts when the longest has finished.  Returns the events
    (by end time) and the true tokens/s over the whole batches."""
    import random

    rng = random.Random(seed)
    events = []
    s = t0
    tokens = 0
    for _ in range(n_batches):
        lens = [rng.randint(32, 96) for _ in range(batch)]
        step = 0.005 + 0.0006 * batch
        prefill = 0.02 * batch
        for n in lens:
            end = s + prefill + n * step
            events.append(Event(end, "request", {"tokens": n, "queue_seconds": 1.0, "e2e_seconds": end - s + 1.0,
                                                 "ttft_seconds": 1.0 + prefill + step, "tpot_seconds": step}))
        tokens += sum(lens)
        s = s + prefill + max(lens) * step + 0.002
    events.sort(key=lambda e: e.t)
    return events, tokens / (s - 0.002 - t0)


def test_static_batches_are_measured_whole() -> None:
    """One static batch of 64 takes ~5 s: responses ending in a 10 s window swing with where the window
    falls.  The policy waits for ``min_batches`` whole batches and measures tokens over their span."""
    from tuner.core.window import Window

    events, true_rate = static_batches(64, 8, t0=1.05)
    pol = BatchSizePolicy(BatchConfig(min=1, max=64, settle_s=0.0, measure_s=5.0, min_batches=3))
    pol.changed_at = 1.0
    w = Window(keys=[])
    got = None
    i = 0
    t = 1.0
    while got is None and t < 60.0:
        t = round(t + 0.1, 6)
        new = []
        while i < len(events) and events[i].t <= t:
            new.append(events[i])
            i += 1
        w.update(t, {}, new)
        got = pol._measure(w, 64)
    assert got is not None
    starts = sorted({round(e.t - e.data["e2e_seconds"] + e.data["queue_seconds"], 6) for e in events})
    seen = events[:i]
    by_start: dict[float, list[Event]] = {}
    for e in seen:
        by_start.setdefault(round(e.t - e.data["e2e_seconds"] + e.data["queue_seconds"], 6), []).append(e)
    whole = [b for b in starts if len(by_start.get(b, [])) == 64]
    assert len(whole) == 3 and whole == starts[:3]  # three whole batches, and no more was waited for
    # a full batch (64 responses: no batch holds more) is whole at its last response, not at the next one's first
    assert t < min(e.t for e in events if round(e.t - e.data["e2e_seconds"] + e.data["queue_seconds"], 6)
                   == starts[3]) + 0.1
    # the batches measured are whole ones: the rate is theirs exactly (tokens over their span)
    toks = sum(e.data["tokens"] for b in whole for e in by_start[b])
    span = max(e.t for e in by_start[whole[-1]]) - whole[0]
    assert abs(got.tokens_per_second - toks / span) / (toks / span) < 1e-6, (got.tokens_per_second, toks / span)
    assert abs(got.tokens_per_second - true_rate) / true_rate < 0.1, (got.tokens_per_second, true_rate)
    # the naive figure (responses that ended / elapsed) swings with where the window ends: half-way into the
    # next batch, its longer answers not yet in, it is off by more than the whole batches' own spread
    mid = (whole[-1] + starts[4]) / 2 if len(starts) > 4 else t
    naive = sum(e.data["tokens"] for e in events if e.t <= mid) / (mid - 1.05)
    assert abs(naive - toks / span) / (toks / span) > abs(got.tokens_per_second - true_rate) / true_rate


def test_continuous_batching_falls_back_to_responses_per_window() -> None:
    """Overlapping requests (no batch boundaries): tokens of the responses that ended / the window."""
    from tuner.core.window import Window

    pol = BatchSizePolicy(BatchConfig(min=1, max=64, settle_s=0.0, measure_s=5.0))
    pol.changed_at = 0.0
    w = Window(keys=[])
    m = None
    for i in range(1, 80):
        t = i * 0.1
        ev = Event(t, "request", {"tokens": 10, "queue_seconds": 0.0, "e2e_seconds": 2.0 + 0.013 * (i % 7),
                                  "ttft_seconds": 0.1, "tpot_seconds": 0.01})
        w.update(t, {}, [ev])
        m = pol._measure(w, 8)
        if m is not None:
            break
    assert m is not None
    assert abs(m.tokens_per_second - 10 / 0.1) < 5


def test_a_rate_change_alone_moves_nothing_and_a_backlog_only_up() -> None:
    """Held at 16: completions at half the reference rate move nothing when requests are served as they come
    (no backlog); with a standing backlog (30 s queues) the only move is one step *up* from the held size, never a
    re-search from below it; with the queue shrinking, none."""
    from tuner.core.window import Window
    from tuner.policies.batch_size import Measurement

    def held(queue_s: float, shrink: float = 0.0) -> list[tuple[int, str]]:
        pol = BatchSizePolicy(BatchConfig(min=1, max=64, measure_s=10.0, retune_shift=0.3))
        pol.phase = "hold"
        pol.incumbent = 16
        pol.hold_ref = Measurement(16, 500.0, 0.5, 0.02, 80, rate=8.0, prompt_mean=100.0)
        w = Window(keys=[])
        acts = []
        for i in range(1, 101):  # 25 s of completions at 4/s: half the reference rate
            t = i * 0.25
            q = max(0.0, queue_s - shrink * t)
            ev = Event(t, "request", {"tokens": 64, "prompt_tokens": 100, "queue_seconds": q,
                                      "e2e_seconds": q + 2.0, "ttft_seconds": q + 0.3})
            w.update(t, {}, [ev])
            acts += pol.decide(w, Knobs(batch_size=16))
        return [(int(a.value), a.reason) for a in acts]

    assert held(0.5) == []
    up = held(30.0)
    assert [v for v, _ in up] == [32] and "backlog" in up[0][1]
    assert held(30.0, shrink=0.5) == []  # the held size works the queue off (H1: step-ups at -0.86..0 s/s)


def test_a_batch_begun_during_the_settle_time_does_not_turn_off_whole_batch_measuring() -> None:
    """The first batch of the new size began within the settle time: it is not counted, but the window still
    waits for whole batches after it instead of measuring partial responses."""
    from tuner.core.window import Window

    events, true_rate = static_batches(64, 8, t0=1.0, seed=3)
    pol = BatchSizePolicy(BatchConfig(min=1, max=64, settle_s=2.0, measure_s=5.0, min_batches=3))
    pol.changed_at = 0.0  # settle ends at 2.0, the first batch began at 1.0
    w = Window(keys=[])
    got, i, t = None, 0, 0.0
    while got is None and t < 60.0:
        t = round(t + 0.1, 6)
        new = []
        while i < len(events) and events[i].t <= t:
            new.append(events[i])
            i += 1
        w.update(t, {}, new)
        got = pol._measure(w, 64)
    assert got is not None and t > 15.0  # four batches of ~4 s: not after the first one's responses
    assert abs(got.tokens_per_second - true_rate) / true_rate < 0.1, (got.tokens_per_second, true_rate)


# -- noisy measurements: confirmation and the refinement's resolution -----------------------------------------
class Plant:
    """A server whose tokens/s follows ``curve`` (linear between the given sizes) times a per-visit factor:
    ``luck[(size, visit)]`` scales the visit-th stay at a size (1-based), as the other jobs of a shared host
    do to one measurement window.  Continuous batching (requests end at a steady rate), no queue."""

    def __init__(self, curve: dict[int, float], luck: dict[tuple[int, int], float], batch_size: int = 8) -> None:
        self.curve = sorted(curve.items())
        self.luck = luck
        self.batch_size = batch_size
        self.visits: dict[int, int] = {batch_size: 1}
        self.t = 0.0
        self.carry = 0.0
        self.n = 0

    def true_tok_s(self, b: int) -> float:
        xs = [x for x, _ in self.curve]
        ys = [y for _, y in self.curve]
        if b <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in itertools.pairwise(self.curve):
            if b <= x1:
                return y0 + (y1 - y0) * (b - x0) / (x1 - x0)
        return ys[-1]

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, object]]:
        if action.knob == "batch_size" and knobs.batch_size is not None and int(knobs.batch_size) != self.batch_size:
            self.batch_size = int(knobs.batch_size)
            self.visits[self.batch_size] = self.visits.get(self.batch_size, 0) + 1
        return "applied", {}

    def tick(self) -> SimTick:
        self.t = round(self.t + 0.25, 6)
        b = self.batch_size
        tok_s = self.true_tok_s(b) * self.luck.get((b, self.visits.get(b, 1)), 1.0)
        self.carry += tok_s / 64 * 0.25
        events = []
        while self.carry >= 1.0:
            self.carry -= 1.0
            self.n += 1
            events.append(Event(self.t, "request", {"id": f"r{self.n}", "tokens": 64, "prompt_tokens": 64,
                                                    "queue_seconds": 0.0, "ttft_seconds": 0.05, "e2e_seconds": 0.6,
                                                    "tpot_seconds": 0.01}))
        return SimTick(self.t, {"sys_mem_total_bytes": 8e9, "sys_mem_available_bytes": 6e9}, events)


def run_plant(plant: Plant, cfg: BatchConfig, ticks: int) -> Agent:
    pol = BatchSizePolicy(cfg)
    agent = Agent([pol], Arbiter(bounds=pol.bounds, cooldown_s={"batch_size": 2.0, "cleanup": 5.0}), plant, None)
    for _ in range(ticks):
        agent.step(plant.tick())
    return agent


# Like the demo on this machine: 32 is 20% below 64, 48 is 12% below (outside a 5% tolerance).
RISING = {1: 67.0, 8: 190.0, 16: 300.0, 32: 400.0, 48: 440.0, 64: 500.0}


def test_a_lucky_window_is_confirmed_before_the_knee_is_held() -> None:
    """One window at 48 ran 10% fast (the other jobs paused): 484 tok/s looks within 5% of 64's 500, but 48
    gives 440.  Before holding, the policy measures the rival (64) and the knee (48) again, back to back, and
    chooses from the pooled figures: it holds a size within 5% of the best, in at most 10 windows."""
    plant = Plant(RISING, {(48, 1): 1.10})
    cfg = BatchConfig(min=1, max=64, measure_s=8.0, settle_s=1.0, knee_tolerance=0.05)
    agent = run_plant(plant, cfg, 1600)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy) and pol.phase == "hold"
    assert plant.true_tok_s(plant.batch_size) >= 0.95 * plant.true_tok_s(64), plant.batch_size
    moves = batch_moves(agent)
    assert len(moves) <= 10
    confirming = [a for a in moves if "confirming" in a.action.reason]
    assert [a.action.value for a in confirming] == [64, 48]  # the rival, then the knee, back to back
    assert pol.measured[48].windows == 2 and pol.measured[64].windows >= 2


def test_a_confirmed_knee_below_the_best_is_kept() -> None:
    """The flat top (the issue's curve: 32 as fast as 64) with one lucky window at 64 (+6%: 32 then looks 7%
    slower, outside the 5% tolerance): the near miss below is measured again with 64 and the pooled
    figures choose the knee, not the wall."""
    plant = Plant({1: 67.0, 8: 190.0, 16: 300.0, 32: 420.0, 64: 419.0}, {(64, 1): 1.06})
    cfg = BatchConfig(min=1, max=64, measure_s=8.0, settle_s=1.0, knee_tolerance=0.05)
    agent = run_plant(plant, cfg, 1600)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy) and pol.phase == "hold"
    assert plant.batch_size == 32
    assert pol.measured[64].windows == 2
    assert len(batch_moves(agent)) <= 10


def test_refinement_stops_where_a_step_is_below_a_windows_noise() -> None:
    """The last demo run bisected 48, 56, 52, 54 between 32 and 64 (steps of 2% in tokens/s, a tenth of one
    window's noise there) and held 54 by chance.  Refinement stops when the gap to the neighbour is a quarter
    of the knee or less."""
    plant = Plant({1: 67.0, 8: 190.0, 16: 300.0, 32: 750.0, 48: 800.0, 56: 850.0, 64: 875.0}, {})
    cfg = BatchConfig(min=1, max=64, measure_s=8.0, settle_s=1.0, knee_tolerance=0.05)
    agent = run_plant(plant, cfg, 1600)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy) and pol.phase == "hold"
    above = sorted(b for b in pol.measured if b > 32)
    assert all(b2 - b1 >= 16 for b1, b2 in itertools.pairwise(above)), above
    assert plant.batch_size == 64


def test_measurements_of_one_size_are_pooled() -> None:
    from tuner.policies.batch_size import Measurement, _pool

    a = Measurement(48, 500.0, 0.5, 0.02, 40, rate=4.0, prompt_mean=100.0)
    b = Measurement(48, 400.0, 0.7, None, 30, rate=3.0, prompt_mean=90.0)
    p = _pool(_pool(a, b), Measurement(48, 600.0, 0.6, 0.04, 50, rate=5.0, prompt_mean=80.0))
    assert p.windows == 3 and abs(p.tokens_per_second - 500.0) < 1e-9
    assert p.ttft_p95 is not None and abs(p.ttft_p95 - 0.6) < 1e-9
    assert p.tpot_p95 is not None and abs(p.tpot_p95 - (0.02 * 2 + 0.04) / 3) < 1e-9
    assert (p.requests, p.rate, p.prompt_mean) == (120, 5.0, 80.0)


def test_refine_min_frac_out_of_range_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="refine_min_frac"):
        BatchSizePolicy(BatchConfig(refine_min_frac=1.5))


def test_a_small_rise_after_a_gain_is_explored_one_step_further() -> None:
    """On the demo a lucky window at 16 made 32 look only 4.6% faster (under ``min_gain``): exploring stopped
    at 32 and 64, 15% faster again, was never tried.  A rise right after a doubling that gained is looked
    past once more."""
    plant = Plant(RISING, {(16, 1): 1.30})  # 16 measures 390: 32's 400 is a rise of 2.6%
    cfg = BatchConfig(min=1, max=64, measure_s=8.0, settle_s=1.0, knee_tolerance=0.05, min_gain=0.05)
    agent = run_plant(plant, cfg, 1600)
    pol = agent.policies[0]
    assert isinstance(pol, BatchSizePolicy) and pol.phase == "hold"
    assert 64 in pol.measured
    assert plant.true_tok_s(plant.batch_size) >= 0.95 * plant.true_tok_s(64), plant.batch_size
    assert len(batch_moves(agent)) <= 10


# -- closed loop on a plant with a queue (tests/replay/sim.py: QueueSim) --------------------------------------
def interactive_agent(sim: object, **batch: object) -> Agent:
    """The interactive preset's batch and precision policies (and its agent table) driving ``sim``."""
    from tests.replay.sim import QueueActuator, QueueSim
    from tuner.core.policy_config import PRESET_DIR, build_agent, parse_policy, tomllib  # tomli before 3.11

    with open(PRESET_DIR / "interactive.toml", "rb") as f:
        preset = tomllib.load(f)
    data = {"agent": preset["agent"], "batch_size": {**preset["batch_size"], **batch},
            "precision": dict(preset["precision"])}
    assert isinstance(sim, QueueSim)
    return build_agent(parse_policy(data), QueueActuator(sim), None)


def demo_paced(rate: Callable[[float], float], seed: int, seconds: float, *, tuned: bool, batch: int = 8,
               **cfg: object) -> tuple[QueueSim, Agent | None]:
    """The plant at the demo's pace (~10 requests/s at batch 8) under ``rate`` for ``seconds``: left at ``batch``, or
    driven by the interactive preset (``cfg`` overrides its batch table)."""
    from tests.replay.sim import TOK_S, TTFT

    sim = QueueSim(seed=seed, rate=rate, tok_s=TOK_S * 5.0, ttft=TTFT / 5.0, batch_size=batch)
    return drive(sim, seconds, tuned, **cfg)


def drive(sim: QueueSim, seconds: float, tuned: bool, **batch: object) -> tuple[QueueSim, Agent | None]:
    """``sim`` for ``seconds``: left alone, or driven by the interactive preset (``batch`` overrides its table)."""
    agent = interactive_agent(sim, **batch) if tuned else None
    for _ in range(int(seconds / sim.dt)):
        tick = sim.tick()
        if agent is not None:
            agent.step(tick)
    return sim, agent


def closed_loop(rate: object, seconds: float, seed: int, tuned: bool, **batch: object) -> tuple[object, Agent | None]:
    return drive(QueueSim(seed=seed, rate=rate), seconds, tuned, **batch)  # type: ignore[arg-type]


def tokens_started_after(sim: object, t0: float) -> int:
    from tests.replay.sim import QueueSim

    assert isinstance(sim, QueueSim)
    return sum(r.tokens for r in sim.served if r.started >= t0)


def test_a_rate_step_up_re_tunes_upward_from_the_held_size_and_raises_throughput() -> None:
    """The demo's failure (seed 7): a change in the arrival rate made the policy re-search from batch 2 under
    full load, building minutes of queue.  Here the rate triples at 120 s (1.5x what batch 8 serves): the
    policy steps *up* from the size it held, never below it, and serves more than leaving the knob alone."""
    def rate(t: float) -> float:
        return 1.0 if t < 120 else 3.0

    fixed, _ = closed_loop(rate, 360, seed=3, tuned=False)
    sim, agent = closed_loop(rate, 360, seed=3, tuned=True)
    assert agent is not None
    moves = [a for a in batch_moves(agent) if a.t >= 120]
    # never back to 8 while the overload lasts: a step up answered early rests its 'before' figure on a batch or
    # two, and a gain within that figure's error once sent 16 back after three windows (169 tok/s against 145) and
    # the queue ran to 52 s
    assert moves and all(a.action.value > 8 for a in moves), [(a.t, a.action.value) for a in moves]
    assert "backlog" in moves[0].action.reason
    assert tokens_started_after(sim, 120) >= 1.2 * tokens_started_after(fixed, 120)
    assert sim.queue_p95() < fixed.queue_p95()  # type: ignore[attr-defined]


def test_a_rate_step_down_does_not_drop_the_batch_below_the_held_knee() -> None:
    """Overload (4 requests/s) finds a knee; the rate then falls to 0.5/s for 150 s and comes back: the
    batch never goes below the knee (it is a cap: at a low rate the batches are small anyway), so the
    returning load finds the knee in place."""
    def rate(t: float) -> float:
        return 0.5 if 200 <= t < 350 else 4.0

    _, agent = closed_loop(rate, 500, seed=4, tuned=True)
    assert agent is not None
    held = [a for a in batch_moves(agent) if a.t < 200][-1].action.value
    later = [a.action.value for a in batch_moves(agent) if a.t >= 200]
    assert held >= 16 and all(v >= held for v in later), (held, later)


def test_re_tuning_under_a_backlog_keeps_or_raises_throughput() -> None:
    """Under a standing overload every move the policy makes after the first search is judged on the queue:
    a step that did not raise throughput is undone at once, so the tuned run serves at least what fixed
    runs at the sizes it held serve (the other jobs' noise included: the same seed, the same machine)."""
    def rate(t: float) -> float:
        return 5.0

    sim, agent = closed_loop(rate, 400, seed=9, tuned=True)
    assert agent is not None
    moves = batch_moves(agent)
    t_settled = moves[-1].t
    held = moves[-1].action.value
    from tests.replay.sim import QueueSim

    fixed = QueueSim(seed=9, rate=rate, batch_size=int(held))
    for _ in range(int(400 / fixed.dt)):
        fixed.tick()
    assert tokens_started_after(sim, t_settled + 20) >= 0.95 * tokens_started_after(fixed, t_settled + 20)
    assert all(a.action.value >= 8 for a in moves)  # never below the start under overload


def _stable_workload(kind: str, lo: float, hi: float, t1: float, width: float) -> object:
    import math as m

    def rate(t: float) -> float:
        if kind == "step":
            return hi if t1 <= t < t1 + width else lo
        if kind == "burst":
            return lo * 3.0 if (t % 40.0) < width / 20.0 else lo
        if kind == "ramp":
            return lo + (hi - lo) * 0.5 * (1 - m.cos(2 * m.pi * t / 200.0))
        return lo

    return rate


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["steady", "step", "burst", "ramp"]),
    lo=st.floats(0.3, 1.4),
    span=st.floats(0.0, 0.6),
    t1=st.floats(20.0, 150.0),
    width=st.floats(20.0, 120.0),
    seed=st.integers(0, 10_000),
)
def test_property_tuned_queue_time_never_above_untuned_where_untuned_is_stable(
    kind: str, lo: float, span: float, t1: float, width: float, seed: int
) -> None:
    """Random workloads below what batch 8 serves (~1.9 requests/s on this plant): the interactive preset's
    batch and precision policies never make the queue-time p95 worse than leaving the knob at 8 by more than
    max(10%, 0.2 s)."""
    from hypothesis import assume

    from tests.replay.sim import QueueSim

    rate = _stable_workload(kind, lo, min(lo + span, 1.6), t1, width)
    untuned, _ = closed_loop(rate, 300, seed=seed, tuned=False)
    assert isinstance(untuned, QueueSim)
    assume(len(untuned.queue) < 20 and untuned.queue_p95() < 10.0)  # untuned stable
    tuned, _ = closed_loop(rate, 300, seed=seed, tuned=True)
    assert isinstance(tuned, QueueSim)
    base = untuned.queue_p95()
    assert tuned.queue_p95() <= base + max(0.1 * base, 0.2), (tuned.queue_p95(), base)


def test_a_step_up_that_runs_slower_is_undone_at_once() -> None:
    """On the demo under the other jobs' load, batch 16 ran at half of 8's pace under a backlog; waiting for the
    whole window cost 13 s of it.  A plant where 16 is slower than 8: the step up from the held 8 is undone
    after a third of a window (and whole batches), not a whole one."""
    import numpy as np

    from tests.replay.sim import TOK_S, QueueSim

    fast = TOK_S * 5.0  # the demo's pace (950 tok/s at 8: ~10 requests/s)
    fast[4:] = fast[3] / 2  # 16 and above: half of 8's
    sim = QueueSim(seed=2, rate=lambda t: 5.0 if t < 60 else 13.0, tok_s=fast)
    agent = interactive_agent(sim)
    for _ in range(int(300 / sim.dt)):
        agent.step(sim.tick())
    moves = batch_moves(agent)
    ups = [i for i, a in enumerate(moves) if a.action.value == 16]
    assert ups, [(a.t, a.action.value) for a in moves]
    for i in ups:
        back = moves[i + 1]
        assert back.action.value == 8 and "at once" in back.action.reason, back.action.reason
        assert back.t - moves[i].t < 2.0 + 10.0 / 3 + 5.0, (moves[i].t, back.t)  # settle + a third + a batch
    assert np.all([a.action.value >= 8 for a in moves])
    # every trial costs throughput: after one judged no better, no step up from 8 (to any size) for 120 s
    starts = [a.t for a in moves if a.action.value > 8]
    assert all(b - a >= 120.0 for a, b in itertools.pairwise(starts)), starts


def test_a_latency_miss_under_a_backlog_is_not_answered_with_a_smaller_batch() -> None:
    """The demo on a host at load 15: the first window at 8 read a 3.4 s service TTFT with a standing backlog,
    and batch 4 then grew the queue.  Under a backlog the miss is the machine's, and a smaller size only
    lengthens the queue: the policy holds (and the precision policy, which needs a measured smaller batch,
    holds too)."""
    from tuner.core.window import Window

    pol = BatchSizePolicy(BatchConfig(min=1, max=64, measure_s=10.0, slo_ttft_p95_s=1.0))
    w = Window(keys=[])
    acts = pol.decide(w, Knobs())
    assert [a.value for a in acts] == [8]
    pol.feedback(Applied(0.0, acts[0], "applied", None))
    out = []
    for i in range(1, 161):  # 40 s: batches of 8 every 2 s, each request queued 20 s + i/4, 3.4 s of service
        t = i * 0.25
        ev = []
        if i % 8 == 0:
            q = 20.0 + t / 2
            ev = [Event(t, "request", {"tokens": 40, "prompt_tokens": 60, "queue_seconds": q, "batch_size": 8,
                                       "ttft_seconds": q + 3.4, "e2e_seconds": q + 3.6, "tpot_seconds": 0.005})
                  for _ in range(8)]
        w.update(t, {}, ev)
        out += pol.decide(w, Knobs(batch_size=8))
    assert all(a.value >= 8 for a in out), [(a.value, a.reason) for a in out]


def test_a_latency_miss_without_room_to_spare_is_held() -> None:
    """No backlog yet, but full batches and a wait creeping up (+0.02 s/s, inside the noise): a smaller size
    would serve fewer requests a second (on the demo the ramp's peak: batch 4 then grew the wait +0.46 s/s).
    With the same miss and part-full batches, a flat wait, the step down is taken."""
    import random

    from tuner.core.window import Window

    def moves(size: int, creep: float) -> list[int]:
        pol = BatchSizePolicy(BatchConfig(min=1, max=64, measure_s=10.0, slo_ttft_p95_s=1.0))
        pol.phase, pol.incumbent, pol.changed_at = "hold", 8, 0.0
        w = Window(keys=[])
        rng = random.Random(1)
        out = []
        for i in range(1, 161):
            t = i * 0.25
            ev = []
            if i % 8 == 0:
                q = 0.5 + creep * t + rng.uniform(-0.3, 0.3)
                ev = [Event(t, "request", {"tokens": 40, "prompt_tokens": 60, "queue_seconds": q, "batch_size": size,
                                           "ttft_seconds": q + 1.5, "e2e_seconds": q + 1.7, "tpot_seconds": 0.005})
                      for _ in range(size)]
            w.update(t, {}, ev)
            out += [int(a.value) for a in pol.decide(w, Knobs(batch_size=8))]
        return out

    assert moves(size=8, creep=0.02) == []
    assert moves(size=5, creep=0.0)[:1] == [4]


def test_a_step_up_is_judged_on_tokens_per_second_not_on_the_queue_growth() -> None:
    """Under a backlog the server's pace is its tokens/s; the wait's growth in a window is arrivals minus that
    pace, and arrivals vary: on the demo (burst workload) a step 8 -> 13 ran at 624 tok/s against 449 and was
    undone because a burst grew the queue faster in its window.  Faster beyond the noise: kept."""
    from tuner.core.window import Window
    from tuner.policies.batch_size import Measurement

    pol = BatchSizePolicy(BatchConfig(min=1, max=64, slo_ttft_p95_s=1.0))
    before = Measurement(8, 449.0, 0.4, 0.01, 120, rate=9.0, prompt_mean=60.0, queue_p50=47.9, queue_growth=0.21,
                         backlog=True, saturated=True, occupancy=1.0)
    pol.measured = {8: before}
    pol.trial = {"kind": "up", "from": 8, "before": before, "windows": 0, "pooled": None}
    pol.phase, pol.next_phase = "measure", "judge"
    burst = Measurement(13, 624.0, 0.6, 0.01, 150, rate=11.0, prompt_mean=60.0, queue_p50=52.0, queue_growth=0.45,
                        backlog=True, saturated=True, occupancy=1.0)
    w = Window(keys=[])
    w.update(100.0, {})
    acts = pol._judge(w, 13, burst)
    assert acts == [] and pol.phase == "hold" and pol.incumbent == 13
    slower = Measurement(13, 380.0, 0.6, 0.01, 150, rate=7.0, prompt_mean=60.0, queue_p50=52.0, queue_growth=0.1,
                         backlog=True, saturated=True, occupancy=1.0)
    pol.trial = {"kind": "up", "from": 8, "before": before, "windows": 0, "pooled": None}
    pol.phase, pol.next_phase = "measure", "judge"
    assert [a.value for a in pol._judge(w, 13, slower)] == [8]


def test_a_first_search_step_that_runs_slower_under_a_backlog_is_undone_at_once() -> None:
    """H1 (101 burst, a spent seed): the first search stepped 8 -> 16 under a backlog and 16 ran 30 s at 169 tok/s
    against 473 at 8 before its whole window (and three whole batches) was in.  The same plant as above, loaded
    from the start: the search's step is undone after a third of a window and a batch, and never tried again."""
    from tests.replay.sim import TOK_S, QueueSim

    fast = TOK_S * 5.0
    fast[4:] = fast[3] / 2  # 16 and above: half of 8's
    sim = QueueSim(seed=4, rate=lambda t: 13.0, tok_s=fast)
    agent = interactive_agent(sim)
    for _ in range(int(200 / sim.dt)):
        agent.step(sim.tick())
    moves = batch_moves(agent)
    ups = [i for i, a in enumerate(moves) if a.action.value > 8]
    assert len(ups) == 1, [(a.t, a.action.value, a.action.reason) for a in moves]
    up, back = moves[ups[0]], moves[ups[0] + 1]
    assert back.action.value == 8 and "back at once" in back.action.reason, back.action.reason
    assert back.t - up.t < 2.0 + 10.0 / 3 + 5.0, (up.t, back.t)  # settle + a third + a batch
    assert sim.batch_size == 8


def test_a_rate_step_is_answered_while_the_queue_builds_not_a_window_later() -> None:
    """H2's step cells (2026-12-03): the demo's rate stepped from 0.5x to 1.3x what batch 8 serves; the policy
    stepped up to 16 ~25 s later (after a window diluted by the low rate, then two windows of a growing queue)
    and attained 41-48% against fixed 16's 89-97%.  On a plant at the demo's pace (~10 requests/s at 8), the
    same step: the requests in flight pass two batches and keep rising, and the step up comes within seconds,
    not at a window's end — most of fixed 16's attainment, far above leaving the knob at 8."""
    def run(tuned: bool, batch: int = 8, **cfg: object) -> tuple[QueueSim, Agent | None]:
        return demo_paced(lambda t: 13.0 if 30 <= t < 60 else 5.0, 2, 95, tuned=tuned, batch=batch, **cfg)

    untuned, _ = run(False)
    fixed16, _ = run(False, 16)
    tuned, agent = run(True)
    assert agent is not None
    ups = [a for a in batch_moves(agent) if a.t > 1.0]
    assert ups and ups[0].action.value == 16 and ups[0].t < 30 + 8, [(a.t, a.action.reason) for a in ups]
    assert "in flight" in ups[0].action.reason
    slo = 1.0
    assert tuned.attainment(slo) >= untuned.attainment(slo) + 0.25, (tuned.attainment(slo), untuned.attainment(slo))
    assert tuned.attainment(slo) >= fixed16.attainment(slo) - 0.15, (tuned.attainment(slo), fixed16.attainment(slo))
    # H3 (2026-12-04): the step up came 2.3-5.9 s after the step, with 2x the size in flight for 2 s; the preset's
    # 1.5x for 1 s answers sooner and attains more than that rule on the same plant
    slow, slow_agent = run(True, early_inflight_factor=2.0, early_inflight_s=2.0)
    assert slow_agent is not None
    slow_up = next(a for a in batch_moves(slow_agent) if a.t > 1.0)
    assert ups[0].t < slow_up.t and tuned.attainment(slo) > slow.attainment(slo), (
        ups[0].t, slow_up.t, tuned.attainment(slo), slow.attainment(slo))
    # H4 (2026-12-04): 2.9-4.8 s after the step with 1 s of 1.5x; the preset's 0.5 s, asked twice a second, answers
    # half a second sooner here (32.75 s against 33.25 s) and attains more (88.5% against 83.2%)
    second, second_agent = run(True, early_inflight_s=1.0)
    assert second_agent is not None
    second_up = next(a for a in batch_moves(second_agent) if a.t > 1.0)
    assert ups[0].t < second_up.t and tuned.attainment(slo) > second.attainment(slo), (
        ups[0].t, second_up.t, tuned.attainment(slo), second.attainment(slo))


def test_a_clump_s_step_up_does_not_hold_the_size_down_through_a_later_overload() -> None:
    """H5 (121 ramp, 2026-12-04): a clump of arrivals stepped 8 -> 16; the clump passed, 16 ran part-full (the
    demand's tokens/s, not its pace) and was judged 'no better' than one full batch of 8, and the retune wait then
    held 8 while the ramp overloaded it (33.7% attained).  Here a 4 s clump at 30 s, then a lasting overload from
    70 s: 16 cleared the clump's queue and is held (since H7: its part-full batches say the backlog went, not
    that 16 was not needed), so the overload finds 16 in place (or steps up from it within seconds)."""
    sim, agent = demo_paced(lambda t: 13.0 if (30 <= t < 34 or t >= 70) else 5.0, 3, 130, tuned=True)
    assert agent is not None
    moves = [(a.t, a.action.value, a.action.reason) for a in batch_moves(agent) if a.t > 1.0]
    assert moves and moves[0][1] == 16 and 30 < moves[0][0] < 40, moves  # the clump's step up
    assert all(v >= 16 for _, v, _ in moves), moves  # never back to 8: the overload finds 16 (or more)
    assert sim.attainment(1.0) >= 0.9, sim.attainment(1.0)  # (90.3% when 16 went back "not needed", H6)


def test_a_size_that_cleared_a_backlog_is_held_through_recurring_clumps() -> None:
    """H7 (134 mix, 132 and 134 burst, 135 mix; 2026-12-04): a step up to 16 drained the queue, 16 then ran
    part-full (38% in 134 mix: 296 tok/s, the demand's, against one full batch of 8 at 400), went back to 8 as
    "not needed", and the next clump built the queue again: 8 -> 16 -> 8 -> 16 in 90 s, 70.9% attained against
    fixed 16's 89.0%.  On the plant (~10 requests/s at 8), clumps of 14 requests/s for 5 s in every 20 s over 7:
    one step up, held, no round trip (before: 8 -> 16 -> 8 three times in 120 s, 84.4% against fixed 16's 98.2%;
    now 96.3%)."""
    def rate(t: float) -> float:
        return 14.0 if (t % 20.0) >= 15.0 else 7.0

    untuned, _ = demo_paced(rate, 5, 120, tuned=False)
    fixed16, _ = demo_paced(rate, 5, 120, tuned=False, batch=16)
    tuned, agent = demo_paced(rate, 5, 120, tuned=True)
    assert agent is not None
    moves = [(round(a.t, 1), a.action.value, a.action.reason) for a in batch_moves(agent) if a.t > 1.0]
    assert moves and moves[0][1] == 16 and moves[0][0] < 25, moves  # the first clump's step up
    assert [v for _, v, _ in moves] == [16], moves  # held: no way back to 8 between clumps
    slo = 1.0
    assert tuned.attainment(slo) > untuned.attainment(slo) + 0.15, (tuned.attainment(slo), untuned.attainment(slo))
    assert tuned.attainment(slo) >= fixed16.attainment(slo) - 0.05, (tuned.attainment(slo), fixed16.attainment(slo))


def test_a_closed_loops_standing_queue_is_not_answered_before_the_window_ends() -> None:
    """A closed loop (a fixed number of clients, each sending its next request when the last one ends) keeps
    as many requests in flight as it has clients, far above the batch size, and its queue stands: nothing
    builds, so nothing acts before the window has been measured whole (the in-flight rule waits for a rising
    count, the half-window rule for a growing wait)."""
    import numpy as np

    from tuner.core.window import Window

    pol = BatchSizePolicy(BatchConfig(min=1, max=64, measure_s=10.0))
    pol.phase, pol.incumbent, pol.changed_at = "hold", 8, 0.0
    w = Window(keys=["req_active"])
    rng = np.random.default_rng(0)
    out: list[Action] = []
    for i in range(1, 115):  # the window: from 2 s (settle) to 12 s
        t = i * 0.1
        q = 2.0 + float(rng.normal(0.0, 0.05))
        req = Event(t, "request", {"tokens": 32, "prompt_tokens": 64, "ttft_seconds": q + 0.3, "queue_seconds": q,
                                   "e2e_seconds": q + 1.0, "tpot_seconds": 0.02, "batch_size": 8})
        w.update(t, {"req_active": 40.0}, [req])
        out += pol.decide(w, Knobs(batch_size=8))
    assert out == [], [a.reason for a in out]


def test_under_a_backlog_a_faster_size_is_kept_though_its_own_ttft_misses_the_slo() -> None:
    """Dev seed 0, step shape (2026-12-04): under the rate step's backlog 16 ran 1074 tok/s against 774 at 8,
    and was undone because its service TTFT p95 missed the 1 s SLO — going back to 8 makes every waiting request
    wait longer.  Beyond the noise faster under a backlog: kept (the latency rule steps down once the backlog is
    gone).  Faster only within the noise, or with no backlog before: the SLO miss still sends it back."""
    from tuner.core.window import Window
    from tuner.policies.batch_size import Measurement

    def meas(batch: int, tps: float, ttft: float, backlog: bool) -> Measurement:
        return Measurement(batch=batch, tokens_per_second=tps, ttft_p95=ttft, tpot_p95=None, requests=200,
                           rate=12.0, prompt_mean=64.0, occupancy=1.0, queue_p50=3.0 if backlog else 0.1,
                           queue_growth=0.3 if backlog else 0.0, backlog=backlog, waits=backlog)  # fmt: skip

    def judged(before: Measurement, after: Measurement) -> tuple[list[Action], BatchSizePolicy]:
        pol = BatchSizePolicy(BatchConfig(min=1, max=64, slo_ttft_p95_s=1.0))
        pol.trial = {"kind": "up", "from": 8, "before": before, "windows": 0, "pooled": None}
        pol.phase, pol.incumbent, pol.changed_at = "measure", 8, 0.0
        w = Window(keys=["req_active"])
        w.update(20.0, {"req_active": 40.0}, [])
        return pol._judge(w, 16, after), pol

    acts, pol = judged(meas(8, 774.0, 0.6, True), meas(16, 1074.0, 1.4, True))
    assert acts == [] and pol.incumbent == 16 and pol.phase == "hold"
    acts, _ = judged(meas(8, 774.0, 0.6, True), meas(16, 800.0, 1.4, True))  # +3%: within the noise
    assert [a.value for a in acts] == [8] and "misses the latency SLO" in acts[0].reason
    acts, _ = judged(meas(8, 774.0, 0.6, False), meas(16, 1074.0, 1.4, False))  # no backlog: latency first
    assert [a.value for a in acts] == [8] and "misses the latency SLO" in acts[0].reason
