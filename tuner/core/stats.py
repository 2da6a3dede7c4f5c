"""Robust trend statistics for traces (numpy only): Theil-Sen slope, Mann-Kendall test, leak verdict.

Why these and not a least-squares fit or "last minus first": memory series of inference processes are
full of steps (a batch allocates, the allocator caches, a cleanup frees), so a least-squares slope is
dragged by outliers and a first/last difference only tells where the sawtooth happened to be when the
recording stopped.  Theil-Sen (the median of all pairwise slopes) ignores up to ~29% of wild points,
and Mann-Kendall asks only whether later values tend to be larger than earlier ones, with no
assumption about the noise.  ``leak_verdict`` combines them with a minimum practical effect so a
statistically significant but harmless drift is not called a leak.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MAX_PAIRS = 1_000_000
"""Theil-Sen looks at every pair up to this many pairs (n ~ 1414), then at this many sampled pairs."""

ENVELOPE_BINS = 12
"""How many equal-width stretches of the window the lower envelope has (fewer for short series)."""

MIN_BINS = 6
"""Fewest envelope points a verdict is made on: below 6 Mann-Kendall cannot reach p < 0.01 at all."""


def _finite_xy(x: Iterable[float], y: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in length ({xa.size} != {ya.size})")
    ok = np.isfinite(xa) & np.isfinite(ya)
    return xa[ok], ya[ok]


def theil_sen(x: Iterable[float], y: Iterable[float], *, max_pairs: int = MAX_PAIRS) -> tuple[float, float]:
    """``(slope, intercept)``: the median of the slopes of all pairs of points with different x, and the
    median of ``y - slope * x``.  Non-finite points are ignored.

    Up to ``max_pairs`` pairs every pair is used (exact estimator).  Beyond that, ``max_pairs`` pairs are
    drawn with a fixed seed, so the cost is bounded and the result is deterministic for given data; the
    median of a million sampled slopes is within a fraction of a percent (in rank) of the exact one.
    Returns ``(nan, nan)`` when fewer than two distinct x values remain.
    """
    xa, ya = _finite_xy(x, y)
    n = xa.size
    if n < 2:
        return math.nan, math.nan
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(0x7E11)
        i = rng.integers(0, n, size=max_pairs)
        j = rng.integers(0, n, size=max_pairs)
    dx = xa[j] - xa[i]
    keep = dx != 0
    if not keep.any():
        return math.nan, math.nan
    slopes = (ya[j][keep] - ya[i][keep]) / dx[keep]
    slope = float(np.median(slopes))
    intercept = float(np.median(ya - slope * xa))
    return slope, intercept


def _mk_s(ranks: np.ndarray) -> int:
    """Mann-Kendall S = sum over i<j of sign(r[j] - r[i]) for integer ranks, in O(n log^2 n).

    Bottom-up merge levels: at level ``w`` every pair whose members sit in the two halves of one block
    of size ``2w`` is counted once, by a vectorised ``searchsorted`` of each right-half element into
    its sorted left half (keys are ``block * (n + 1) + rank`` so one global search serves all blocks).
    """
    n = ranks.size
    stride = np.int64(n + 1)
    idx = np.arange(n, dtype=np.int64)
    r = ranks.astype(np.int64)
    s = 0
    w = 1
    while w < n:
        block = idx // (2 * w)
        left = ((idx // w) % 2) == 0
        lkeys = np.sort(block[left] * stride + r[left])
        rb = block[~left] * stride
        q = rb + r[~left]
        start = np.searchsorted(lkeys, rb, side="left")
        less = np.searchsorted(lkeys, q, side="left") - start
        greater = np.searchsorted(lkeys, rb + stride, side="left") - np.searchsorted(lkeys, q, side="right")
        s += int(less.sum()) - int(greater.sum())
        w *= 2
    return s


def mann_kendall(y: Iterable[float]) -> tuple[int, float, float]:
    """``(S, z, p_value)`` of the Mann-Kendall trend test on ``y`` in order (non-finite values dropped).

    ``S = sum_{i<j} sign(y_j - y_i)``; its variance under "no trend" with ties corrected is
    ``(n(n-1)(2n+5) - sum_t t(t-1)(2t+5)) / 18`` over the tie groups ``t``; ``z`` uses the continuity
    correction (``S - 1`` or ``S + 1``) and the p-value is two-sided from the normal approximation.
    Fewer than 3 values, or all equal: ``(S, 0.0, 1.0)``.
    """
    ya = np.asarray(y, dtype=np.float64).ravel()
    ya = ya[np.isfinite(ya)]
    n = ya.size
    if n < 2:
        return 0, 0.0, 1.0
    _, ranks, counts = np.unique(ya, return_inverse=True, return_counts=True)
    s = _mk_s(ranks.ravel())
    t = counts.astype(np.float64)
    var = (n * (n - 1) * (2 * n + 5) - float(np.sum(t * (t - 1) * (2 * t + 5)))) / 18.0
    if n < 3 or var <= 0:
        return s, 0.0, 1.0
    if s > 0:
        z = (s - 1) / math.sqrt(var)
    elif s < 0:
        z = (s + 1) / math.sqrt(var)
    else:
        z = 0.0
    p = math.erfc(abs(z) / math.sqrt(2.0))
    return s, z, min(1.0, p)


def percentiles(values: Iterable[float], qs: Sequence[float] = (50.0, 95.0)) -> dict[float, float | None]:
    """``{q: value}`` over the finite values (linear interpolation); ``None`` for each q when empty."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {float(q): None for q in qs}
    got = np.percentile(a, list(qs))
    return {float(q): float(v) for q, v in zip(qs, np.atleast_1d(got), strict=True)}


@dataclass(frozen=True)
class LeakVerdict:
    """The answer to "does this keep growing?" for one series.

    ``verdict`` is ``"leak"``, ``"no leak"`` or ``"insufficient data"``; ``slope`` is in ``unit`` (for
    example bytes per minute) and is the Theil-Sen slope of the lower envelope (NaN when not computed);
    ``p_value`` is the Mann-Kendall p-value on that envelope; ``n`` the number of samples used;
    ``reason`` one sentence for people.
    """

    verdict: str
    slope: float
    p_value: float
    n: int
    unit: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("slope", "p_value"):
            if not math.isfinite(d[k]):
                d[k] = None
        return d


def lower_envelope(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The minimum of ``y`` in each of ``bins`` equal-width stretches of ``x`` (empty stretches left out),
    at the stretch's centre: what the process held on to throughout that stretch."""
    lo, hi = float(x.min()), float(x.max())
    edges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    mins = np.full(bins, np.inf)
    np.minimum.at(mins, which, y)
    present = np.isfinite(mins)
    centres = (edges[:-1] + edges[1:]) / 2
    return centres[present], mins[present]


def leak_verdict(
    x: Iterable[float],
    y: Iterable[float],
    *,
    min_points: int = 20,
    min_span: float = 0.0,
    alpha: float = 0.01,
    min_rel_growth: float = 0.05,
    min_abs_growth: float = math.inf,
    unit: str = "per x",
) -> LeakVerdict:
    """Is ``y`` growing steadily with ``x`` (time in minutes, or thousands of requests)?

    A leak is memory that is never given back, so the test is on the **lower envelope**: the minimum of
    ``y`` in each of up to 12 equal stretches of the window.  Within a stretch that spans a whole
    allocate/free cycle the minimum is the cycle's floor, which a sawtooth keeps flat and a leak raises.
    Mann-Kendall on the raw samples of a sawtooth, by contrast, is significant by accident of phase: with
    two or three cycles in the window, every rising flank contributes a block of concordant pairs and
    nothing cancels them (``tests/test_stats.py`` shows p < 1e-6 on such a sawtooth).  On the envelope
    the same sawtooth leaves at most a few rising stretches against a flat floor, far from alpha = 0.01.

    "leak" needs all of:

    1. enough data: ``min_points`` finite samples, an x span of at least ``min_span``, and six stretches
       with samples (below six points Mann-Kendall cannot reach p < 0.01);
    2. significance: the envelope's Mann-Kendall S > 0 with two-sided p < ``alpha``;
    3. persistence: the Theil-Sen slope of the envelope's *second half* is at least a quarter of the
       whole window's slope and at least half the first half's, so growth that levels off (warm-up, a
       cache filling to its limit) is not a leak — while a leak that began mid-window still is;
    4. a practical effect: the growth over the window (slope x span) is at least ``min_rel_growth`` of
       the median level, or at least ``min_abs_growth`` (in y units), so a significant drift of a few
       kilobytes is not reported.

    Partial cycles cannot be told apart from growth: with less than about one full cycle in the window
    a rising flank *is* all there is to see.
    """
    xa, ya = _finite_xy(x, y)
    n = int(xa.size)
    nan = math.nan

    def verdict(v: str, slope: float, p: float, reason: str) -> LeakVerdict:
        return LeakVerdict(v, slope, p, n, unit, reason)

    if n < min_points:
        return verdict("insufficient data", nan, nan, f"{n} samples; at least {min_points} are needed")
    span = float(xa.max() - xa.min())
    if span <= 0 or span < min_span:
        return verdict(
            "insufficient data",
            nan,
            nan,
            f"the window spans {span:.3g} {_x_unit(unit)}; at least {min_span:.3g} is needed",
        )
    bins = min(ENVELOPE_BINS, n // 3)
    ex, ey = lower_envelope(xa, ya, bins) if bins >= MIN_BINS else (xa[:0], ya[:0])
    if ex.size < MIN_BINS:
        return verdict("insufficient data", nan, nan, "samples are too unevenly spread over the window")
    slope, _ = theil_sen(ex, ey)
    s, _, p = mann_kendall(ey)
    if not (s > 0 and p < alpha):
        return verdict("no leak", slope, p, f"no significant upward trend in the memory floor (p = {p:.2g})")
    half = ex.size // 2
    early_slope, _ = theil_sen(ex[:half], ey[:half])
    late_slope, _ = theil_sen(ex[half:], ey[half:])
    if not (slope > 0 and late_slope >= 0.25 * slope and late_slope >= 0.5 * early_slope):
        return verdict(
            "no leak",
            slope,
            p,
            "growth is levelling off: the floor rose in the first half of the window and much less in the second "
            "(warm-up or a cache filling up)",
        )
    growth = slope * span
    level = float(np.median(np.abs(ya)))
    if growth < min_rel_growth * level and growth < min_abs_growth:
        return verdict(
            "no leak",
            slope,
            p,
            f"a steady but small rise ({growth / level:.1%} of the level over the window)"
            if level
            else "a steady but negligible rise",
        )
    return verdict("leak", slope, p, f"the memory floor rose steadily (p = {p:.2g}) and kept rising to the end")


def _x_unit(unit: str) -> str:
    return unit.split("/", 1)[1] if "/" in unit else "x units"
