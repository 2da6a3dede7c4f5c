"""Temperature policy, closed loop on the simulator: it measures the sign of d(repetition)/d(temperature)
and keeps repetition in the band, close to the requested temperature — whichever way the model goes."""

from __future__ import annotations

import dataclasses

import numpy as np

from tests.replay.sim import Sim, SimActuator
from tuner.core.agent import Agent
from tuner.core.arbiter import Arbiter
from tuner.policies.temperature import TemperatureConfig, TemperaturePolicy
from tuner.records import Knobs

CFG = TemperatureConfig(
    min=0.1, max=1.5, band_low=0.03, band_high=0.10, hysteresis=0.01, max_step=0.2, probe_step=0.1, min_requests=8
)


def run(sim: Sim, cfg: TemperatureConfig = CFG, ticks: int = 3000, cooldown: float = 5.0) -> tuple[Agent, list[float]]:
    pol = TemperaturePolicy(cfg)
    agent = Agent(
        [pol],
        Arbiter(bounds=pol.bounds, cooldown_s={"temperature": cooldown, "repetition_penalty": cooldown}),
        SimActuator(sim),
        None,
    )
    reps: list[float] = []
    for _ in range(ticks):
        tk = sim.tick()
        agent.step(tk)
        reps.extend(e.data["seq_rep_4"] for e in tk.events if e.kind == "request")
    return agent, reps


def band_share(reps: list[float], lo: float = 0.03, hi: float = 0.10, per: int = 20) -> float:
    """Share of windows of ``per`` responses whose mean repetition is inside the band."""
    ws = [float(np.mean(reps[i : i + per])) for i in range(0, len(reps) - per + 1, per)]
    return sum(lo <= x <= hi for x in ws) / len(ws)


def test_repetition_falls_with_temperature_policy_goes_up_and_stays_in_band() -> None:
    # seq-rep-4 0.06 at 0.7 and falling 0.25 per unit: at 0.3 it is 0.16 (too repetitive)
    sim = Sim(seed=1, temperature=0.3, slope_sign=-1.0, tokens_per_request=64)
    agent, reps = run(sim)
    pol = agent.policies[0]
    assert isinstance(pol, TemperaturePolicy)
    assert pol.sign == -1  # measured, from its own probes
    assert 0.5 <= sim.temperature <= 0.95  # 0.03..0.10 band <=> 0.54..0.82 on this plant
    assert band_share(reps[len(reps) // 3 :]) >= 0.9
    assert abs(sim.temperature - 0.3) < 0.55  # as close to the request as the band allows: not the maximum
    acts = [a for a in agent.applied if a.outcome == "applied"]
    assert acts[0].action.reason.startswith("probe")  # it probed first: it did not know the sign


def test_repetition_rises_with_temperature_policy_goes_down() -> None:
    # a model where repetition RISES with temperature (the field report): the policy must go the other way
    sim = Sim(seed=2, temperature=1.2, slope_sign=+1.0, rep_at_07=0.0, rep_slope=0.25, tokens_per_request=64)
    agent, reps = run(sim)
    pol = agent.policies[0]
    assert isinstance(pol, TemperaturePolicy)
    assert pol.sign == +1
    assert sim.temperature < 1.2
    assert band_share(reps[len(reps) // 2 :]) >= 0.9


def test_in_band_it_returns_toward_the_requested_temperature() -> None:
    # requested 0.5, currently 1.0; repetition is flat-low everywhere: in band at any temperature
    sim = Sim(seed=3, temperature=1.0, slope_sign=-1.0, rep_at_07=0.06, rep_slope=0.0, tokens_per_request=64)
    cfg = TemperatureConfig(requested=0.5, min=0.1, max=1.5, band_low=0.03, band_high=0.10, min_requests=8)
    run(sim, cfg, ticks=2000)
    assert abs(sim.temperature - 0.5) < 1e-6


def test_at_the_bound_the_repetition_penalty_goes_up_within_its_bounds() -> None:
    # repetition too high everywhere the temperature may go (cap 0.4): only the penalty is left
    sim = Sim(seed=4, temperature=0.3, slope_sign=-1.0, rep_at_07=0.25, rep_slope=0.25, tokens_per_request=64)
    cfg = TemperatureConfig(
        min=0.1, max=0.4, band_low=0.03, band_high=0.10, min_requests=8, penalty_max=1.2, penalty_step=0.05
    )
    agent, _ = run(sim, cfg, ticks=3000)
    assert sim.temperature == 0.4
    assert 1.0 < sim.repetition_penalty <= 1.2
    assert all(a.action.value <= 1.2 for a in agent.applied if a.action.knob == "repetition_penalty")


def test_decide_is_quiet_without_responses() -> None:
    from tuner.core.window import Window

    pol = TemperaturePolicy(CFG)
    w = Window(keys=[])
    for i in range(50):
        w.update(i * 0.1, {})
        assert pol.decide(w, Knobs(temperature=0.7)) == []
        assert pol.decide(w, Knobs()) == []


def _edge_window(mean: float, spread: float, n: int = 50, known: bool = False) -> object:
    """``n`` responses at T 0.8 with this mean and spread; ``known``: 50 more at T 0.7 before them, 0.08 higher
    (spread 0.02): a falling slope (-0.8/unit) the fit establishes."""
    from tuner.core.window import Window
    from tuner.records import Event

    w = Window(keys=["req_seq_rep_4_ratio"])
    if known:
        rng0 = np.random.default_rng(1)
        lo = rng0.normal(0.0, 1.0, 50)
        for i, v in enumerate(mean + 0.08 + 0.02 * (lo - lo.mean()) / lo.std()):
            ev = Event(0.1 * i, "request", {"temperature": 0.7, "seq_rep_4": float(v), "tokens": 64})
            w.update(0.1 * i, {}, [ev])
    rng = np.random.default_rng(0)
    vals = rng.normal(0.0, 1.0, n)
    vals = mean + spread * (vals - vals.mean()) / vals.std()  # exactly this mean and spread
    for i, v in enumerate(vals):
        t = 1.0 + 0.2 * i
        w.update(t, {}, [Event(t, "request", {"temperature": 0.8, "seq_rep_4": float(v), "tokens": 64})])
    return w


EDGE_CFG = TemperatureConfig(requested=0.5, min=0.2, max=1.0, band_low=0.02, band_high=0.10, hysteresis=0.01,
                             min_requests=8, window_responses=40)  # fmt: skip
"""One policy at T 0.8 asked for 0.5, for the decisions near the band's upper edge."""


def test_edge_z_keeps_the_band_one_standard_error_inside() -> None:
    """Mean 0.09 in a 0.02-0.10 band, but responses spread 0.15: windows of 50 swing +-0.02 around it and
    every third one is out.  With ``edge_z = 1`` that is too near the edge: with the slope's sign known it moves
    away from it, without it holds (issue 14: probing up from inside the band ran T hot); with ``edge_z = 0`` it
    is in the band (and heads back toward the requested 0.5).  (The window margin, on by default, is off here:
    the next test covers it.)"""
    cfg = dataclasses.replace(EDGE_CFG, window_responses=0)
    plain = TemperaturePolicy(cfg)
    acts = plain.decide(_edge_window(0.09, 0.15), Knobs(temperature=0.8))  # type: ignore[arg-type]
    assert [a.knob for a in acts] == ["temperature"] and acts[0].value < 0.8 and "in band" in acts[0].reason
    edge = TemperaturePolicy(TemperatureConfig(**{**cfg.__dict__, "edge_z": 1.0}))
    assert edge.decide(_edge_window(0.09, 0.15), Knobs(temperature=0.8)) == [] and edge.phase == "track"  # type: ignore[arg-type]
    edge = TemperaturePolicy(TemperatureConfig(**{**cfg.__dict__, "edge_z": 1.0}))
    acts = edge.decide(_edge_window(0.09, 0.15, known=True), Knobs(temperature=0.8))  # type: ignore[arg-type]
    assert [a.knob for a in acts] == ["temperature"] and acts[0].value > 0.8  # away from the edge
    assert acts[0].evidence["seq_rep_4_se"] > 0.015
    # a tight spread: the same mean is one standard error inside: in the band
    tight = TemperaturePolicy(TemperatureConfig(**{**cfg.__dict__, "edge_z": 1.0}))
    acts = tight.decide(_edge_window(0.09, 0.02), Knobs(temperature=0.8))  # type: ignore[arg-type]
    assert [a.knob for a in acts] == ["temperature"] and acts[0].value < 0.8 and "in band" in acts[0].reason


def test_window_margin_keeps_the_mean_where_windows_stay_in_the_band() -> None:
    """The band is judged on windows of ~40 responses.  Responses spread 0.15 around a mean of 0.095: such
    windows swing +-0.03 (1.28 standard errors), so 0.095 is too near the edge — with the slope's sign known it
    moves away, to just inside the margin (0.06: T +0.05, the smallest correction), not to the band's centre;
    without a known sign, or with the mean (0.09) within its own standard error of the margin, it holds (issue
    14: in H1 this rule ran T at 0.85-0.9 for a request of 0.5).  Spread 0.02 leaves room (0.004): in the band,
    it heads back toward the requested 0.5."""
    cfg = EDGE_CFG
    acts = TemperaturePolicy(cfg).decide(_edge_window(0.095, 0.15, known=True), Knobs(temperature=0.8))  # type: ignore[arg-type]
    assert [a.knob for a in acts] == ["temperature"] and abs(acts[0].value - 0.85) < 1e-9
    assert 0.029 < acts[0].evidence["window_margin"] < 0.032  # 1.28 * 0.15 * sqrt(50/49) / sqrt(40)
    assert "in the band but within 0.03" in acts[0].reason and "upper edge" in acts[0].reason  # not "above"
    for w in (_edge_window(0.095, 0.15), _edge_window(0.09, 0.15, known=True)):
        pol = TemperaturePolicy(cfg)
        assert pol.decide(w, Knobs(temperature=0.8)) == [] and pol.phase == "track"  # type: ignore[arg-type]
    acts = TemperaturePolicy(cfg).decide(_edge_window(0.09, 0.02), Knobs(temperature=0.8))  # type: ignore[arg-type]
    assert [a.knob for a in acts] == ["temperature"] and acts[0].value < 0.8 and "in band" in acts[0].reason


def noisy_run(seed: int, noise: float, t_max: float) -> tuple[Sim, tuple[Agent, list[float]]]:
    """Asked for T 0.3 on a plant whose band (0.02-0.10) lies at T 0.54-0.86, responses spread ``noise``."""
    sim = Sim(seed=seed, temperature=0.3, slope_sign=-1.0, tokens_per_request=64, rep_noise=noise)
    cfg = TemperatureConfig(requested=0.3, min=0.1, max=t_max, band_low=0.02, band_high=0.10, hysteresis=0.01,
                            max_step=0.15, min_requests=8, window_responses=40)  # fmt: skip
    return sim, run(sim, cfg, ticks=6000)


def test_noisy_responses_windows_stay_in_the_band_closed_loop() -> None:
    """Per-response repetition spread 0.1 (the demo's is heavy-tailed): with the window margin >= 95% of
    40-response windows are in the band after the first third, without going to the maximum temperature."""
    for seed in (1, 2):
        sim, (_, reps) = noisy_run(seed, noise=0.1, t_max=1.5)
        assert band_share(reps[len(reps) // 3 :], 0.02, 0.10, per=40) >= 0.95, seed
        assert 0.54 <= sim.temperature <= 1.0  # the band's temperatures on this plant, not the cap (1.5)


def test_a_measured_sign_is_kept_when_a_noisy_fit_loses_significance() -> None:
    """Heavy noise makes the local fit insignificant now and then.  Once the sign was measured, the policy
    corrects with it instead of probing from scratch (the demo walked from T 1.0 down to 0.5 that way, every
    window out of the band); without the memory these seeds probe again later."""
    for seed in (1, 2):
        _, (agent, _) = noisy_run(seed, noise=0.12, t_max=1.0)
        reasons = [a.action.reason for a in agent.applied if a.action.knob == "temperature"]
        known = next(i for i, r in enumerate(reasons) if not r.startswith("probe"))
        assert len(reasons) > known + 10
        assert not [r for r in reasons[known:] if r.startswith("probe")], seed
        pol = agent.policies[0]
        assert isinstance(pol, TemperaturePolicy) and pol.known_sign == -1


def _two_groups(temps_means: list[tuple[float, float]], spread: float, n: int = 20) -> object:
    from tuner.core.window import Window
    from tuner.records import Event

    w = Window(keys=["req_seq_rep_4_ratio"])
    t = 0.0
    for k, (temp, mean) in enumerate(temps_means):
        v = np.random.default_rng(k).normal(0.0, 1.0, n)
        for x in mean + spread * (v - v.mean()) / v.std():
            t += 0.1
            w.update(t, {}, [Event(t, "request", {"temperature": temp, "seq_rep_4": float(x), "tokens": 64})])
    return w


def test_a_slope_within_its_errors_does_not_set_the_direction() -> None:
    """H1, 101 steady (a spent seed): a rising slope remembered from an earlier fit (+0.795) and a fit then at
    +0.59 +- 0.35 lowered T 0.56 -> 0.29 with repetition above the band, for 32 s.  Here the fit is +0.30 +- 0.32
    with repetition at 0.19: the policy probes the prior's way (up: repetition falls as T rises), it does not
    act on the remembered sign; a rising slope needs 3 standard errors to set the direction (2.5 does not)."""
    cfg = TemperatureConfig(requested=0.5, min=0.2, max=1.0, band_low=0.02, band_high=0.10, min_requests=8)
    pol = TemperaturePolicy(cfg)
    pol.known_sign, pol.known_slope = 1, 0.795
    acts = pol.decide(_two_groups([(0.5, 0.16), (0.6, 0.19)], 0.1), Knobs(temperature=0.6))  # type: ignore[arg-type]
    assert pol.sign == 0 and pol.slope is not None and 0 < pol.slope < 2 * (pol.slope_se or 0)
    assert [a.knob for a in acts] == ["temperature"] and acts[0].value > 0.6 and acts[0].reason.startswith("probe")
    pol = TemperaturePolicy(cfg)  # +2.5 standard errors: not enough against the prior
    acts = pol.decide(_two_groups([(0.5, 0.13), (0.6, 0.19)], 0.074), Knobs(temperature=0.6))  # type: ignore[arg-type]
    assert pol.slope is not None and 2.0 < pol.slope / (pol.slope_se or 1) < 3.0, (pol.slope, pol.slope_se)
    assert pol.sign == 0 and acts and acts[0].value > 0.6


def test_a_steep_first_slope_still_moves_by_a_useful_step() -> None:
    """H1, 103 ramp: a first fit of -1.77/unit made the steps toward the band +0.02-0.04 (45 s at its edge).  The
    smallest correction is 0.05."""
    cfg = TemperatureConfig(requested=0.5, min=0.2, max=1.0, band_low=0.02, band_high=0.10, min_requests=8,
                            window_responses=0)  # fmt: skip
    pol = TemperaturePolicy(cfg)
    acts = pol.decide(_two_groups([(0.5, 0.29), (0.6, 0.113)], 0.01), Knobs(temperature=0.6))  # type: ignore[arg-type]
    assert pol.sign == -1 and abs((pol.slope or 0) + 1.77) < 0.01
    assert [a.knob for a in acts] == ["temperature"] and abs(acts[0].value - 0.65) < 1e-9  # Newton: +0.024


def test_penalty_first_keeps_the_requested_temperature_where_the_penalty_suffices() -> None:
    """The interactive preset's ``penalty_first`` (issue 14: H1's tuned runs sat at T 0.83-0.91 for a request of
    0.5).  Asked for 0.3 on a plant where repetition is 0.16 there and the penalty takes 0.09 off at 1.3: the
    penalty goes up (1.1, 1.2, 1.3) before any temperature move, the band holds, and T stays at the request; where
    the penalty is not enough (0.22 at 0.3), the temperature moves only after the penalty reached its maximum."""
    cfg = dataclasses.replace(CFG, requested=0.3, penalty_first=True, penalty_step=0.1, penalty_max=1.3)
    sim = Sim(seed=1, temperature=0.3, slope_sign=-1.0, tokens_per_request=64)
    agent, reps = run(sim, cfg)
    moves = [a.action for a in agent.applied if a.outcome == "applied"]
    assert [a.value for a in moves[:3]] == [1.1, 1.2, 1.3] and all(a.knob == "repetition_penalty" for a in moves[:3])
    assert abs(sim.temperature - 0.3) < 1e-9 and band_share(reps[len(reps) // 3 :]) >= 0.9
    steep = Sim(seed=2, temperature=0.3, slope_sign=-1.0, rep_slope=0.4, tokens_per_request=64)
    agent, reps = run(steep, cfg)
    moves = [a.action for a in agent.applied if a.outcome == "applied"]
    first_t = next(i for i, a in enumerate(moves) if a.knob == "temperature")
    assert [a.value for a in moves[:first_t]] == [1.1, 1.2, 1.3]
    assert 0.3 < steep.temperature <= 0.6 and band_share(reps[len(reps) // 3 :]) >= 0.9
    without = Sim(seed=2, temperature=0.3, slope_sign=-1.0, rep_slope=0.4, tokens_per_request=64)
    run(without, dataclasses.replace(cfg, penalty_first=False))
    assert without.temperature > steep.temperature  # temperature alone goes further from the request


def test_penalty_first_brings_the_temperature_back_before_easing_the_penalty() -> None:
    """Hot (T 0.9, requested 0.3) with the penalty at 1.3 and repetition under the band at every temperature (0.05
    without the penalty, flat in T): the temperature comes back to the request first; the penalty eases only
    there, until repetition is back in the band."""
    cfg = dataclasses.replace(CFG, requested=0.3, penalty_first=True, penalty_step=0.1, penalty_max=1.3)
    sim = Sim(seed=3, temperature=0.9, slope_sign=-1.0, rep_at_07=0.05, rep_slope=0.0, tokens_per_request=64)
    sim.repetition_penalty = 1.3
    pol = TemperaturePolicy(cfg)
    agent = Agent([pol], Arbiter(bounds=pol.bounds, cooldown_s={"temperature": 5.0, "repetition_penalty": 5.0}),
                  SimActuator(sim), None, knobs=Knobs(repetition_penalty=1.3))  # fmt: skip
    for _ in range(3000):
        agent.step(sim.tick())
    moves = [(a.action.knob, a.action.value) for a in agent.applied if a.outcome == "applied"]
    first_p = next(i for i, (k, _) in enumerate(moves) if k == "repetition_penalty")
    assert all(k == "temperature" for k, _ in moves[:first_p]) and moves[first_p - 1][1] == 0.3, moves
    assert [v for k, v in moves if k == "repetition_penalty"] == [1.2, 1.1, 1.0], moves
    assert abs(sim.temperature - 0.3) < 1e-9 and sim.repetition_penalty == 1.0


def test_penalty_at_its_top_near_the_upper_edge_probes_the_priors_way() -> None:
    """H3 (issue 14): penalty at 1.3, T at the request, the mean 0.076-0.087 — in the band, but within the
    windows' swing of its upper edge, so 14 of 25 runs lost a 10 s window just above it; with no measured sign
    the policy held.  Asked for 0.3 on a plant where, with the penalty at 1.3, responses at 0.3 average ~0.088
    and spread 0.1 (the margin for 40-response windows: 0.02): once the penalty is at its top the prior
    (repetition falls as T rises) sends a probe up within a minute and 40-response windows stay in the band;
    with no prior it holds at 0.3 until a noisy mean happens to read above the band (478 s) and a quarter of the
    windows are out."""
    cfg = TemperatureConfig(requested=0.3, min=0.1, max=1.0, band_low=0.02, band_high=0.10, hysteresis=0.01,
                            max_step=0.15, min_requests=8, window_responses=40, penalty_first=True,
                            penalty_step=0.15, penalty_max=1.3)  # fmt: skip
    shares, first = {}, {}
    for prior in ("falls", "none"):
        sim = Sim(seed=5, temperature=0.3, slope_sign=-1.0, rep_at_07=0.065, rep_slope=0.25, tokens_per_request=64,
                  rep_noise=0.1)  # fmt: skip
        agent, reps = run(sim, dataclasses.replace(cfg, prior=prior), ticks=6000)
        done = [a for a in agent.applied if a.outcome == "applied"]
        assert [a.action.value for a in done[:2]] == [1.15, 1.3]
        assert all(a.action.knob == "repetition_penalty" for a in done[:2])
        shares[prior] = band_share(reps[len(reps) // 3 :], 0.02, 0.10, per=40)
        first[prior] = next(a for a in done if a.action.knob == "temperature")
    probe = first["falls"]
    assert probe.t < 100 and probe.action.value > 0.3, probe
    assert probe.action.reason.startswith("probe") and "in the band but within" in probe.action.reason
    assert first["none"].t > 300 and shares["none"] < 0.85 <= 0.95 <= shares["falls"], (first, shares)
