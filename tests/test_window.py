"""The agent's window: bounded rings that agree with a plain list, time windows, requests, headroom."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner.core.window import Ring, Window
from tuner.records import Event


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(1, 20), xs=st.lists(st.floats(-1e6, 1e6), max_size=80), n=st.integers(0, 25))
def test_ring_last_matches_a_plain_list(cap: int, xs: list[float], n: int) -> None:
    r = Ring(cap)
    for x in xs:
        r.append(x)
    want = xs[-cap:][-n:] if n else []
    got = r.last(n).tolist()
    assert got == want
    assert r.last().tolist() == xs[-cap:]
    assert len(r) == min(len(xs), cap)
    if xs:
        assert r.latest() == xs[-1]


def test_values_over_the_last_seconds_and_missing_ticks() -> None:
    w = Window(capacity=50, keys=["a_ratio", "b_ratio"])
    for i in range(100):
        t = round(i * 0.1, 6)
        w.update(t, {"a_ratio": float(i), "b_ratio": None if i % 2 else 1.0, "other_ratio": 5.0})
    assert w.values("a_ratio").tolist() == [float(i) for i in range(50, 100)]  # bounded: the last 50
    assert w.values("a_ratio", 0.95).tolist() == [float(i) for i in range(90, 100)]
    assert w.mean("a_ratio", 0.35) == np.mean([96.0, 97.0, 98.0, 99.0])
    assert w.values("b_ratio", 1.0).tolist() == [1.0] * 5  # missing ticks are not values
    assert "other_ratio" not in w.series  # not tracked: not kept
    assert w.percentile("a_ratio", 50, 0.95) == 94.5
    assert w.current("b_ratio") is None and w.latest("b_ratio") == 1.0
    ts, vs = w.pairs("a_ratio", 0.25)
    assert ts.tolist() == [9.7, 9.8, 9.9] and vs.tolist() == [97.0, 98.0, 99.0]


def test_a_key_that_appears_later_lines_up_with_the_ticks() -> None:
    w = Window(capacity=8, keys=[], prefixes=("gpu_mem_",))
    for i in range(5):
        w.update(float(i), {"x": 1.0})
    for i in range(5, 12):
        w.update(float(i), {"gpu_mem_used_bytes/0": float(i), "gpu_mem_total_bytes/0": 100.0, "x": 1.0})
    ts, vs = w.pairs("gpu_mem_used_bytes/0")
    assert ts.tolist() == vs.tolist() == [float(i) for i in range(5, 12)]
    assert w.headroom() == (1 - 11 / 100, "gpu/0")


def test_headroom_is_the_tightest_device() -> None:
    w = Window(keys=["sys_mem_available_bytes", "sys_mem_total_bytes"], prefixes=("gpu_mem_",))
    assert w.headroom() == (None, None)
    w.update(
        0.0,
        {
            "sys_mem_available_bytes": 50.0,
            "sys_mem_total_bytes": 100.0,
            "gpu_mem_used_bytes/1": 90.0,
            "gpu_mem_total_bytes/1": 100.0,
        },
    )
    h, dev = w.headroom()
    assert dev == "gpu/1" and math.isclose(h or 0, 0.1)


def test_requests_and_events_are_split_and_bounded() -> None:
    w = Window(request_capacity=10, keys=[])
    evs = [Event(i * 0.01, "request", {"temperature": 0.5, "seq_rep_4": i / 100, "tokens": 10}) for i in range(25)]
    w.update(1.0, {}, [*evs, Event(1.0, "oom", {"batch_size": 8})])
    assert w.request_count == 25 and w.new_requests == 25
    assert [e.kind for e in w.events] == ["oom"]
    cols = w.request_columns()
    assert cols["seq_rep_4"].tolist() == [i / 100 for i in range(15, 25)]
    assert w.request_columns(since=0.2)["tokens"].tolist() == [10.0] * 4
    w.update(1.1, {})
    assert w.events == [] and w.new_requests == 0


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=40),
    st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6)), min_size=0, max_size=150),
    st.integers(min_value=0, max_value=150),
)
def test_latest_is_the_newest_kept_value_whatever_the_ring_and_the_pending_rows(
    cap: int, xs: list[float | None], read_at: int
) -> None:
    """``latest`` reads newest first without the ring's view; it must agree with a plain scan of the kept ticks,
    across the wrap-around and with rows still pending, read at any point of the stream."""
    w = Window(capacity=cap, keys=["a_ratio"])
    for i, x in enumerate(xs):
        w.update(float(i), {"a_ratio": x})
        if i == read_at or i == len(xs) - 1:
            kept = xs[max(0, i + 1 - cap) : i + 1]
            want = next((float(v) for v in reversed(kept) if v is not None), None)
            assert w.latest("a_ratio") == want
