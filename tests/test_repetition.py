"""Incremental repetition trackers == plain whole-sequence reference implementations (hypothesis)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.probes.repetition import Distinct2, LoopDetector, RepW, SeqRep4, response_repetition


# -- references: straight from the definitions, no cleverness -------------------------------------------
def ref_seq_rep_4(s: Sequence[int]) -> float | None:
    grams = [tuple(s[i : i + 4]) for i in range(len(s) - 3)]
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def ref_rep_w(s: Sequence[int], w: int = 32) -> float | None:
    if not s:
        return None
    return sum(1 for i in range(len(s)) if s[i] in s[max(0, i - w) : i]) / len(s)


def ref_loop(s: Sequence[int], min_n: int = 1, max_n: int = 8, repeats: int = 3) -> bool:
    for end in range(1, len(s) + 1):
        for k in range(min_n, max_n + 1):
            if repeats * k > end:
                continue
            block = s[end - k : end]
            if all(list(s[end - (r + 1) * k : end - r * k]) == list(block) for r in range(repeats)):
                return True
    return False


def ref_distinct_2(responses: Sequence[Sequence[int]], last: int, max_bigrams: int | None = None) -> float | None:
    """Over the longest suffix of at most ``last`` responses holding <= max_bigrams bigrams (>= 1 response)."""
    window = list(responses[-last:])
    while max_bigrams is not None and len(window) > 1 and sum(max(0, len(r) - 1) for r in window) > max_bigrams:
        window.pop(0)
    grams = [tuple(r[i : i + 2]) for r in window for i in range(len(r) - 1)]
    return len(set(grams)) / len(grams) if grams else None


# small alphabets so repeats and loops actually happen
tokens = st.lists(st.integers(0, 5), max_size=120) | st.lists(st.integers(0, 1000), max_size=60)


def approx(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-12)


@settings(max_examples=300, deadline=None)
@given(tokens)
def test_seq_rep_4_matches_reference_at_every_prefix(s: list[int]) -> None:
    t = SeqRep4()
    for i, tok in enumerate(s):
        t.push(tok)
        assert approx(t.value, ref_seq_rep_4(s[: i + 1]))
    assert approx(t.value, ref_seq_rep_4(s))


@settings(max_examples=300, deadline=None)
@given(tokens, st.sampled_from([1, 3, 32]))
def test_rep_w_matches_reference(s: list[int], w: int) -> None:
    t = RepW(w)
    t.extend(s)
    assert approx(t.value, ref_rep_w(s, w))


@settings(max_examples=300, deadline=None)
@given(tokens, st.integers(1, 4), st.integers(0, 6))
def test_loop_detector_matches_reference(s: list[int], min_n: int, extra: int) -> None:
    max_n = min_n + extra
    t = LoopDetector(min_n, max_n)
    for i, tok in enumerate(s):
        t.push(tok)
        if i % 7 == 0:  # the flag is exact at every prefix, not only at the end
            assert t.value == ref_loop(s[: i + 1], min_n, max_n)
    assert t.value == ref_loop(s, min_n, max_n)


@settings(max_examples=300, deadline=None)
@given(tokens)
def test_fused_pass_matches_references(s: list[int]) -> None:
    r = response_repetition(s)
    assert r.tokens == len(s)
    assert approx(r.seq_rep_4, ref_seq_rep_4(s))
    assert approx(r.rep_32, ref_rep_w(s, 32))
    assert r.loop == ref_loop(s)


@settings(max_examples=150, deadline=None)
@given(tokens, st.integers(1, 5), st.integers(1, 45), st.sampled_from([2, 8, 32]))
def test_fused_pass_any_loop_range_and_window(s: list[int], min_n: int, max_n: int, w: int) -> None:
    max_n = max(min_n, max_n)
    r = response_repetition(s, w=w, loop_min_n=min_n, loop_max_n=max_n)
    assert r.loop == ref_loop(s, min_n, max_n)
    assert approx(r.rep_32, ref_rep_w(s, w))


# hypothesis can find planted loops inside noise too
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 50), max_size=30),
    st.lists(st.integers(0, 50), min_size=1, max_size=8),
    st.integers(1, 4),
    st.lists(st.integers(0, 50), max_size=30),
)
def test_planted_loops(prefix: list[int], gram: list[int], times: int, suffix: list[int]) -> None:
    s = prefix + gram * times + suffix
    assert response_repetition(s).loop == ref_loop(s)
    if times >= 3:
        assert response_repetition(s).loop


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 6), max_size=20), max_size=15),
    st.integers(1, 5),
    st.none() | st.integers(1, 40),
)
def test_distinct_2_window_matches_reference(responses: list[list[int]], last: int, cap: int | None) -> None:
    d = Distinct2(last) if cap is None else Distinct2(last, max_bigrams=cap)
    for i, r in enumerate(responses):
        d.add_response(r)
        assert approx(d.value, ref_distinct_2(responses[: i + 1], last, cap))


def test_known_values() -> None:
    # "a b c d a b c d": 5 four-grams, 4 unique -> 0.2; tokens 5..8 repeat -> rep-32 = 0.5
    r = response_repetition([1, 2, 3, 4, 1, 2, 3, 4])
    assert r.seq_rep_4 == pytest.approx(0.2)
    assert r.rep_32 == pytest.approx(0.5)
    assert r.loop is False  # only twice
    assert response_repetition([1, 2, 3, 4] * 3).loop is True
    assert response_repetition([7, 7, 7]).loop is True
    assert response_repetition([7, 7]).loop is False
    assert response_repetition([]).rep_32 is None
    assert response_repetition([1, 2, 3]).seq_rep_4 is None
    d = LoopDetector()
    d.extend([9, 1, 2, 1, 2, 1, 2])
    assert d.looped and d.period == 2


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        LoopDetector(0, 3)
    with pytest.raises(ValueError):
        RepW(0)
    with pytest.raises(ValueError):
        Distinct2(0)
    with pytest.raises(ValueError):
        response_repetition([1], w=0)
    with pytest.raises(ValueError):
        response_repetition([1], loop_min_n=3, loop_max_n=2)
