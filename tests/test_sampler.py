"""The sampler's fast-rate batches: captured at each deadline, processed in order, nothing lost or reordered."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tuner.core.sampler import Sampler, Tick
from tuner.records import Sample


class CaptureProbe:
    """Captures the moment it is asked; its values say which capture they were made from."""

    name = "cap"

    def __init__(self, slow_at: int | None = None, fail_from: int | None = None) -> None:
        self.captures: list[float] = []
        self.live = 0
        self.slow_at = slow_at
        self.fail_from = fail_from

    def available(self) -> str | None:
        return None

    def metrics(self) -> dict[str, str]:
        return {"cap_t_seconds": "seconds"}

    def capture(self, now: float) -> tuple[str, float]:
        n = len(self.captures)
        self.captures.append(now)
        if self.fail_from is not None and n >= self.fail_from:
            raise OSError(5, "Input/output error")
        if n == self.slow_at:
            time.sleep(0.06)  # this capture makes the next deadlines late
        return ("raw", now)

    def sample(self, now: float, captured: Any = None) -> Sample:
        if captured is None:
            self.live += 1
            return Sample(self.name, now, {"cap_t_seconds": now, "cap_live_count": 1})
        assert captured[0] == "raw"
        return Sample(self.name, now, {"cap_t_seconds": captured[1]})

    def close(self) -> None:
        pass


class PlainProbe:
    name = "plain"

    def __init__(self) -> None:
        self.calls = 0

    def available(self) -> str | None:
        return None

    def metrics(self) -> dict[str, str]:
        return {"plain_calls_count": "count"}

    def sample(self, now: float) -> Sample:
        self.calls += 1
        return Sample(self.name, now, {"plain_calls_count": self.calls})

    def close(self) -> None:
        pass


class PerBatchProbe(PlainProbe):
    """Like the output probe: statistics over seconds, read once a batch at fast rates."""

    name = "batch"
    per_batch = True

    def metrics(self) -> dict[str, str]:
        return {"batch_calls_count": "count"}

    def sample(self, now: float) -> Sample:
        self.calls += 1
        return Sample(self.name, now, {"batch_calls_count": self.calls})


def run_for(sampler: Sampler, seconds: float) -> None:
    sampler.start()
    time.sleep(seconds)
    sampler.stop()


def test_fast_rate_batches_keep_every_capture_in_order() -> None:
    cap, plain, per_batch = CaptureProbe(), PlainProbe(), PerBatchProbe()
    ticks: list[Tick] = []
    s = Sampler([cap, plain, per_batch], interval=0.01, hooks=[ticks.append])
    assert s.batch_n == 10
    run_for(s, 0.55)
    # every capture became a tick (the last partial batch is processed at stop), each from its own moment
    assert len(ticks) == len(cap.captures) >= 30
    assert [tk.values["cap_t_seconds"] for tk in ticks] == [tk.t for tk in ticks] == cap.captures
    assert all(b > a for a, b in zip(cap.captures, cap.captures[1:], strict=False))
    assert cap.live == 0
    finals = [i for i, tk in enumerate(ticks) if tk.final]
    assert finals[-1] == len(ticks) - 1
    assert all(b - a <= 10 for a, b in zip([-1, *finals], finals, strict=False))
    # a probe without capture is read whole at each moment; per-batch probes and the sidecar's own usage
    # once a batch, on its final tick
    assert [tk.values["plain_calls_count"] for tk in ticks] == list(range(1, len(ticks) + 1))
    assert per_batch.calls == len(finals)
    for tk in ticks:
        assert ("batch_calls_count" in tk.values) == tk.final
        assert ("self_rss_bytes" in tk.values) == tk.final
        assert "probe_cost_seconds/cap" in tk.values and "probe_cost_seconds/plain" in tk.values


def test_slow_rate_reads_everything_at_each_deadline() -> None:
    cap, plain, per_batch = CaptureProbe(), PlainProbe(), PerBatchProbe()
    ticks: list[Tick] = []
    s = Sampler([cap, plain, per_batch], interval=0.1, hooks=[ticks.append])
    assert s.batch_n == 1
    run_for(s, 0.45)
    assert len(ticks) >= 3 and all(tk.final for tk in ticks)
    assert cap.captures == [] and cap.live == plain.calls == per_batch.calls == len(ticks)
    assert all("self_rss_bytes" in tk.values for tk in ticks)


def test_a_late_capture_is_a_skip_recorded_after_the_ticks_before_it() -> None:
    cap = CaptureProbe(slow_at=14)
    order: list[tuple[str, float]] = []
    s = Sampler(
        [cap],
        interval=0.01,
        hooks=[lambda tk: order.append(("tick", tk.t))],
        on_skip=lambda t, n: order.append(("skip", t)),
    )
    run_for(s, 0.4)
    assert s.skipped >= 3
    assert any(kind == "skip" for kind, _ in order)
    assert [t for _, t in order] == sorted(t for _, t in order)  # the trace stays in time order
    assert sum(kind == "tick" for kind, _ in order) == len(cap.captures)


def test_a_failing_capture_is_the_probes_failure_and_the_rest_go_on() -> None:
    cap, plain = CaptureProbe(fail_from=3), PerBatchProbe()
    notes: list[str] = []
    ticks: list[Tick] = []
    s = Sampler([cap, plain], interval=0.01, hooks=[ticks.append], on_note=lambda t, m, lv: notes.append(m))
    run_for(s, 0.45)
    assert any("probe cap failed: OSError" in m for m in notes)
    assert any("probe cap disabled after 5 failures" in m for m in notes)
    assert len(cap.captures) <= 3 + 5 + 10  # no capture once disabled (at most a batch in flight)
    assert plain.calls >= 3 and ticks[-1].final and "batch_calls_count" in ticks[-1].values


@pytest.mark.parametrize("interval", [0.001, 0.02, 0.05, 1.0])
def test_batch_sizes(interval: float) -> None:
    s = Sampler([PlainProbe()], interval=interval)
    assert s.batch_n == {0.001: 100, 0.02: 5, 0.05: 2, 1.0: 1}[interval]


class SlowProbe(PlainProbe):
    name = "slow"

    def sample(self, now: float) -> Sample:
        time.sleep(0.004)  # over a quarter of a 10 ms interval
        return super().sample(now)


def test_a_probe_over_budget_moves_to_a_slower_cadence_in_batches_too() -> None:
    slow = SlowProbe()
    notes: list[str] = []
    ticks: list[Tick] = []
    s = Sampler([slow], interval=0.01, hooks=[ticks.append], on_note=lambda t, m, lv: notes.append(m))
    run_for(s, 0.8)
    assert any("probe slow costs" in m and "now sampled every 2 ticks" in m for m in notes)
    demoted = next(i for i, tk in enumerate(ticks) if "plain_calls_count" not in tk.values)
    later = [("plain_calls_count" in tk.values) for tk in ticks[demoted:]]
    assert 0.3 < sum(later) / len(later) < 0.7  # every other tick (or rarer, once demoted again)
