"""Theil-Sen, Mann-Kendall and the leak verdict on synthetic memory series, checked against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.core.stats import leak_verdict, mann_kendall, percentiles, theil_sen

MiB = 1024 * 1024


def ref_theil_sen(x: list[float], y: list[float]) -> float:
    slopes = [(y[j] - y[i]) / (x[j] - x[i]) for i in range(len(x)) for j in range(i + 1, len(x)) if x[j] != x[i]]
    return float(np.median(slopes))


def ref_mk_s(y: list[float]) -> int:
    return sum(int(np.sign(y[j] - y[i])) for i in range(len(y)) for j in range(i + 1, len(y)))


def ref_mk_var(y: list[float]) -> float:
    n = len(y)
    _, counts = np.unique(y, return_counts=True)
    return (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in counts)) / 18.0


small_ints = st.integers(min_value=-20, max_value=20)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(small_ints, small_ints), min_size=2, max_size=60))
def test_theil_sen_equals_the_pairwise_reference(pts: list[tuple[int, int]]) -> None:
    x = [float(a) for a, _ in pts]
    y = [float(b) for _, b in pts]
    slope, intercept = theil_sen(x, y)
    if len(set(x)) < 2:
        assert math.isnan(slope)
        return
    assert slope == pytest.approx(ref_theil_sen(x, y), abs=1e-12)
    assert intercept == pytest.approx(float(np.median(np.array(y) - slope * np.array(x))), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=5) | st.floats(-1e6, 1e6), min_size=0, max_size=80))
def test_mann_kendall_s_and_variance_equal_the_reference(values: list[float]) -> None:
    y = [float(v) for v in values]
    s, z, p = mann_kendall(y)
    assert s == (ref_mk_s(y) if len(y) >= 2 else 0)
    assert 0.0 <= p <= 1.0
    if len(y) >= 3 and ref_mk_var(y) > 0 and s != 0:
        expect_z = (s - math.copysign(1, s)) / math.sqrt(ref_mk_var(y))
        assert z == pytest.approx(expect_z)
        assert p == pytest.approx(math.erfc(abs(expect_z) / math.sqrt(2)))


def test_mann_kendall_on_a_long_series_matches_the_quadratic_reference() -> None:
    rng = np.random.default_rng(1)
    y = np.round(rng.normal(size=700), 1).tolist()  # plenty of ties
    assert mann_kendall(y)[0] == ref_mk_s(y)


def test_theil_sen_ignores_wild_points_and_nan() -> None:
    x = np.arange(100, dtype=float)
    y = 3.0 * x + 7.0
    y[::10] += 1e9  # 10% outliers
    y[5] = np.nan
    slope, intercept = theil_sen(x, y)
    assert slope == pytest.approx(3.0)
    assert intercept == pytest.approx(7.0)


def test_theil_sen_sampled_pairs_stay_close_on_large_input() -> None:
    rng = np.random.default_rng(2)
    x = np.arange(5000, dtype=float)
    y = 0.5 * x + rng.normal(scale=10, size=x.size)
    slope, _ = theil_sen(x, y, max_pairs=200_000)
    assert slope == pytest.approx(0.5, rel=0.01)


def test_percentiles_empty_and_values() -> None:
    assert percentiles([]) == {50.0: None, 95.0: None}
    got = percentiles([1, 2, 3, 4, float("nan")], (50.0,))
    assert got == {50.0: 2.5}


# -- leak verdict on series shaped like real memory --------------------------------------------------

T = np.arange(0, 300, 0.1)  # five minutes at 10 Hz
MIN = T / 60.0
BASE = 500 * MiB


def verdict(y: np.ndarray, **kw: object) -> str:
    return leak_verdict(MIN, y, min_span=0.5, min_abs_growth=64 * MiB, unit="bytes/min", **kw).verdict  # type: ignore[arg-type]


def test_linear_growth_with_noise_is_a_leak() -> None:
    rng = np.random.default_rng(3)
    y = BASE + 1 * MiB * T + rng.normal(scale=20 * MiB, size=T.size)
    v = leak_verdict(MIN, y, min_span=0.5, min_abs_growth=64 * MiB, unit="bytes/min")
    assert v.verdict == "leak", v
    assert v.slope == pytest.approx(60 * MiB, rel=0.15)  # 1 MiB/s = 60 MiB/min
    assert v.p_value < 0.01


@pytest.mark.parametrize("period_s", [3.0, 7.0, 20.0, 45.0])
def test_sawtooth_alloc_free_is_not_a_leak(period_s: float) -> None:
    rng = np.random.default_rng(4)
    phase = (T % period_s) / period_s
    y = BASE + 400 * MiB * phase + rng.normal(scale=2 * MiB, size=T.size)
    assert verdict(y) == "no leak"


def test_sawtooth_on_top_of_a_leak_is_a_leak() -> None:
    phase = (T % 10.0) / 10.0
    y = BASE + 400 * MiB * phase + 0.5 * MiB * T
    assert verdict(y) == "leak"


def test_a_single_step_up_is_not_called_a_steady_leak() -> None:
    y = np.where(T < 60, BASE, BASE + 300 * MiB).astype(float)
    assert verdict(y) == "no leak"


def test_warm_up_that_levels_off_is_not_a_leak() -> None:
    y = BASE + 800 * MiB * (1 - np.exp(-T / 20.0))
    assert verdict(y) == "no leak"


def test_constant_is_not_a_leak() -> None:
    assert verdict(np.full(T.size, float(BASE))) == "no leak"


def test_small_drift_is_not_a_leak() -> None:
    y = BASE + 1000.0 * T  # 300 kB over five minutes: significant, harmless
    v = leak_verdict(MIN, y, min_span=0.5, min_abs_growth=64 * MiB, unit="bytes/min")
    assert v.verdict == "no leak"
    assert "small" in v.reason


def test_too_little_data_says_so() -> None:
    v = leak_verdict(MIN[:10], np.arange(10.0), min_span=0.5)
    assert v.verdict == "insufficient data"
    v = leak_verdict(MIN[:100], np.arange(100.0), min_span=0.5)  # 10 s of samples
    assert v.verdict == "insufficient data"
    assert v.as_dict()["slope"] is None
