"""Cleanup policy: a measured leak triggers a cleanup (cheapest steps first), a sawtooth does not,
fragmentation gets only the steps that return free memory, nothing reclaimed -> exponential back-off."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np

from tuner.core.window import Window
from tuner.policies.cleanup import STEPS, CleanupConfig, CleanupPolicy
from tuner.records import Action, Applied, Knobs

KEYS = ["tree_rss_bytes", "alloc_allocated_bytes", "alloc_reserved_bytes", "req_done_total"]


def feed(
    pol: CleanupPolicy,
    seconds: int,
    rate: float,
    alloc: Callable[[float], float],
    reserved: Callable[[float], float] | None = None,
    rss: Callable[[float], float] | None = None,
    t0: float = 0.0,
    w: Window | None = None,
    done0: float = 0.0,
) -> tuple[list[Action], Window]:
    """One tick a second; ``alloc(requests)`` etc. give the memory figures."""
    w = w or Window(keys=KEYS)
    out: list[Action] = []
    for i in range(seconds):
        t = t0 + i
        done = done0 + rate * i
        v = {"req_done_total": done, "alloc_allocated_bytes": alloc(done)}
        v["alloc_reserved_bytes"] = reserved(done) if reserved else alloc(done) * 1.1
        v["tree_rss_bytes"] = rss(done) if rss else v["alloc_reserved_bytes"] + 5e8
        w.update(t, v)
        acts = pol.decide(w, Knobs())
        for a in acts:
            pol.feedback(Applied(t, a, "applied", None, {"command_id": "c"}))
        out += acts
    return out, w


def test_a_leak_triggers_a_cleanup_with_the_evidence() -> None:
    pol = CleanupPolicy(CleanupConfig(min_requests=1000))
    acts, _ = feed(pol, 600, 5.0, lambda n: 1e9 + 2e6 * n + 5e7 * np.sin(n / 40))  # 2 MB per request
    assert acts  # (no answer ever comes here, so after the result timeout it looks again)
    a = acts[0]
    assert a.value == list(STEPS) and a.evidence["trigger"] == "growth"
    assert a.evidence["allocated"]["verdict"] == "leak"
    assert a.evidence["requests"] >= 1000  # gated by the minimum window


def test_a_sawtooth_without_growth_is_left_alone() -> None:
    pol = CleanupPolicy(CleanupConfig(min_requests=1000))
    saw = lambda n: 1e9 + 3e8 * ((n % 400) / 400)  # noqa: E731 - allocate/free cycles, flat floor
    acts, _ = feed(pol, 1200, 5.0, saw)
    assert acts == []


def test_fragmentation_gets_only_the_steps_that_return_free_memory() -> None:
    pol = CleanupPolicy(CleanupConfig(min_requests=1000))
    acts, _ = feed(pol, 600, 5.0, lambda n: 1e9 + 1e6 * np.sin(n / 30), reserved=lambda n: 1.2e9 + 1e6 * n)
    assert acts
    assert acts[0].value == ["empty_cache", "malloc_trim"] and acts[0].evidence["trigger"] == "fragmentation"


def test_nothing_reclaimed_backs_off_exponentially_and_a_reclaim_resets() -> None:
    pol = CleanupPolicy(CleanupConfig(every_requests=100, leak_watch=False, min_reclaim_bytes=1e6))
    w = Window(keys=KEYS)
    times: list[float] = []
    done = 0.0
    for t in range(2000):
        done += 1.0
        w.update(float(t), {"req_done_total": done, "tree_rss_bytes": 1e9})
        for a in pol.decide(w, Knobs()):
            times.append(done)
            pol.feedback(Applied(float(t), a, "applied", None, {"command_id": "c"}))
            reclaimed = 0.0 if len(times) < 4 else 5e6
            pol.on_result(float(t) + 0.5, a, True, {"reclaimed_bytes": reclaimed}, None)
    gaps = np.diff(times).tolist()
    assert gaps[:4] == [200.0, 400.0, 800.0, 100.0]  # x2, x2, x2, then reset by a real reclaim


def test_periodic_by_seconds_and_a_missing_answer_counts_as_nothing() -> None:
    pol = CleanupPolicy(CleanupConfig(every_s=10.0, leak_watch=False, result_timeout_s=5.0))
    w = Window(keys=KEYS)
    sent: list[float] = []
    for t in range(60):
        w.update(float(t), {"tree_rss_bytes": 1e9})
        for a in pol.decide(w, Knobs()):
            sent.append(float(t))
            pol.feedback(Applied(float(t), a, "applied", None, {"command_id": "c"}))  # no result ever comes
    assert sent[:2] == [10.0, 36.0]  # 10 s, then more than 5 s waiting for the answer + 2x10 s of back-off
    assert pol.backoff >= 2


def test_a_batch_increase_is_not_read_as_a_leak() -> None:
    """Issue 14 fault 4 (H1, 104 step): the batch went 11 -> 22 and the RSS stepped up with it (the larger batch's
    working memory), then stayed flat; the series restarts at the change, so no cleanup.  The same step without a
    batch change (memory that grows on its own) is left to the leak test, which acts."""

    def run(knobs_at: Callable[[int], Knobs]) -> list[Action]:
        pol = CleanupPolicy(CleanupConfig(min_requests=1000, check_every_s=30))
        w = Window(keys=KEYS)
        out: list[Action] = []
        for i in range(900):
            done = 5.0 * i
            # flat at 1 GB with a sawtooth, and 150 MB more over the 40 s after the change (the larger batch's
            # buffers), then flat again
            step = 1.5e8 * min(1.0, max(0.0, (i - 300) / 40))
            v = {"req_done_total": done, "tree_rss_bytes": 1e9 + step + 2e7 * ((i % 37) / 37)}
            w.update(float(i), v)
            acts = pol.decide(w, knobs_at(i))
            for a in acts:
                pol.feedback(Applied(float(i), a, "applied", None, {"command_id": "c"}))
            out += acts
        return out

    assert run(lambda i: Knobs(batch_size=11 if i < 300 else 22)) == []
    before = run(lambda i: Knobs(batch_size=11))  # what the policy did before the fix, seeing no change
    assert before and before[0].evidence["trigger"] == "growth"


def test_a_leak_under_batch_changes_every_20_s_is_tested_at_the_configured_sampling() -> None:
    """Issue 14, leak by shape (seed 151 burst): the batch size changed every ~20 s, each change restarts the
    series, and the agent asks the policy once a second — sampled only at decide time, the series held one point
    a second, never the 20 a test needs before the next change: no leak test in 90 s while RSS grew +409% (here,
    sampled so, the first cleanup comes at 80 s, 20 s into the last batch size).  With
    10 ticks a second and ``sample_every_s`` 0.5, the series takes two points a second from the window and the leak
    (1 MB a request at 15 requests/s) is acted on within the first batch size it is measured at."""
    pol = CleanupPolicy(CleanupConfig(min_requests=150, check_every_s=10.0, sample_every_s=0.5))
    w = Window(keys=KEYS)
    out: list[tuple[float, Action]] = []
    for k in range(900):  # 90 s at 10 Hz
        t = k / 10
        done = 15.0 * t
        leak = 1e6 * done
        v = {"req_done_total": done, "alloc_allocated_bytes": 1e9 + leak + 2e7 * ((k % 13) / 13)}
        v["alloc_reserved_bytes"] = v["alloc_allocated_bytes"] * 1.1
        v["tree_rss_bytes"] = v["alloc_reserved_bytes"] + 5e8
        w.update(t, v)
        if k % 10:
            continue  # the agent asks once a second
        batch = 8 * 2 ** min(3, int(t // 20))  # 8, 16, 32, 64: a change every 20 s
        for a in pol.decide(w, Knobs(batch_size=batch)):
            out.append((t, a))
            pol.feedback(Applied(t, a, "sent", None, {"command_id": "c"}))
            pol.on_result(t + 0.3, a, True, {"reclaimed_bytes": 2e8}, None)
    assert out, "no cleanup in 90 s of a 1 MB-a-request leak"
    t0, first = out[0]
    assert first.evidence["trigger"] == "growth" and t0 < 20.0  # at the first batch size, before the change
    assert all(a.evidence["requests"] >= 150 for _, a in out)


def test_a_leak_cleanup_held_back_by_the_cooldown_goes_out_when_the_cooldown_ends() -> None:
    """Issue 14, leak by shape (seed 152 burst): the arbiter's 30 s cleanup cooldown rejected a leak-triggered
    cleanup at 42.2 s, the batch changed at 44.7 s and restarted the series, and the next cleanup came 21 s later
    (RSS floor +210% against untuned +381%).  Held back, the cleanup is proposed again at every decision (through
    the real arbiter here) and goes out the first second the cooldown allows, whatever the batch size did
    meanwhile."""
    from tuner.core.arbiter import Arbiter

    pol = CleanupPolicy(CleanupConfig(min_requests=150, check_every_s=10.0, sample_every_s=0.5))
    arb = Arbiter(cooldown_s={"cleanup": 30.0})
    w = Window(keys=KEYS)
    sent: list[float] = []
    rejected: list[float] = []
    for k in range(900):
        t = k / 10
        done = 15.0 * t
        v = {"req_done_total": done, "alloc_allocated_bytes": 1e9 + 1e6 * done + 2e7 * ((k % 13) / 13)}
        v["alloc_reserved_bytes"] = v["alloc_allocated_bytes"] * 1.1
        v["tree_rss_bytes"] = v["alloc_reserved_bytes"] + 5e8
        w.update(t, v)
        if k % 10:
            continue
        knobs = Knobs(batch_size=8 * 2 ** min(3, int(t // 20)))  # a change every 20 s, as in the burst
        for d in arb.resolve(t, pol.decide(w, knobs), knobs, None):
            pol.feedback(Applied(t, d.action, "sent" if d.outcome != "rejected" else "rejected", None, {}))
            if d.outcome == "rejected":
                rejected.append(t)
                continue
            sent.append(t)
            pol.on_result(t + 0.3, d.action, True, {"reclaimed_bytes": 2e8}, None)
    assert len(sent) >= 3 and rejected
    gaps = [b - a for a, b in pairwise(sent)]
    # held, then out as the cooldown ended, every time (waiting for the next test instead: 10, 50, 80 s — the series
    # restarted at 40 s, after the held one at 30 s)
    assert all(abs(g - 30.0) < 1.01 for g in gaps), (sent, rejected)


def _ramp_without_a_leak(host_free: bool, outside_heap_per_request: float = 0.0) -> tuple[list[Action], CleanupPolicy]:
    """Issue 14, leak by shape, seed 153 ramp without a leak, as its trace read: 20 s after the batch went 8 -> 16
    the batch filled up with the ramp; the C heap's allocated stayed at 115 MB, its reservation swung 137-201 MB
    (22-86 MB free) and the tree's RSS floor rose ~37 MB over ~280 requests.  ``outside_heap_per_request``: memory
    that grows outside the heap too (Python's arenas: a real leak the heap figures do not see)."""
    pol = CleanupPolicy(CleanupConfig(min_requests=150, check_every_s=10.0, sample_every_s=0.5))
    w = Window(keys=[*KEYS, "alloc_host_free_bytes"])
    out: list[Action] = []
    for k in range(400):  # 40 s at 10 Hz, the batch at 16 throughout
        t = k / 10
        done = 7.0 * t + 0.15 * t * t  # the ramp: 7 -> 19 requests a second
        allocated = 115e6 + 1e4 * (k % 7)
        reserved = allocated + 22e6 + 64e6 * ((k * 37) % 101) / 100  # 22-86 MB free, jumping about
        fill = 37e6 * min(1.0, done / 280)  # the batch's pages coming back into use
        rss = 297e6 + fill + outside_heap_per_request * done + 3e7 * ((k % 17) / 17)
        v = {"req_done_total": done, "alloc_allocated_bytes": allocated, "alloc_reserved_bytes": reserved}
        v["tree_rss_bytes"] = rss
        v["alloc_host_free_bytes"] = reserved - allocated if host_free else None
        w.update(t, v)
        if k % 10:
            continue
        for a in pol.decide(w, Knobs(batch_size=16)):
            out.append(a)
            pol.feedback(Applied(t, a, "sent", None, {"command_id": "c"}))
            pol.on_result(t + 0.2, a, True, {"reclaimed_bytes": 57e6}, None)
    return out, pol


def test_rss_rising_within_the_c_heaps_free_bytes_is_not_a_leak() -> None:
    """The host heap's figures say the rise is its own free pages back in use: no cleanup, and the status says
    why.  Before, a "growth" cleanup went out ("RSS grows ... per 1,000 requests"): gc for nothing, the trimmed
    pages in use again within a second."""
    acts, pol = _ramp_without_a_leak(host_free=True)
    assert acts == []
    assert pol.status()["held"] and "not a leak" in pol.status()["held"]


def test_rss_rising_past_the_heaps_free_bytes_or_without_host_figures_is_still_a_leak() -> None:
    # a device allocator's figures (or none said whose): the heap's free bytes are unknown, the RSS test acts
    acts, _ = _ramp_without_a_leak(host_free=False)
    assert acts and acts[0].evidence["trigger"] == "growth" and "RSS grows" in acts[0].reason
    # 1 MB a request outside the C heap (Python objects in pymalloc's arenas): more than the heap ever held free
    acts, _ = _ramp_without_a_leak(host_free=True, outside_heap_per_request=1e6)
    assert acts and acts[0].evidence["trigger"] == "growth" and "RSS grows" in acts[0].reason
