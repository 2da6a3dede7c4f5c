"""Series of N sidecars, as ``tuner.outputs.prometheus`` names them, written as OpenMetrics with timestamps for
``promtool tsdb create-blocks-from openmetrics`` — 100 replicas' worth of a fleet without 100 processes.

Replica ``i`` (``instance="10.0.<i // 250>.<i % 250>:9464"``, ``job="tuner"``) over ``minutes`` at one sample every
``step`` seconds: requests at ``rate(i)`` per second, each with a TTFT of ``ttft(i)`` and ``tokens(i)`` generated
tokens (so its tokens/s is exact and its TTFT p95 falls in a known bucket), a cgroup limit and working set
(its headroom), a host, a batch-size knob, actions, OOM kills.  ``expected(i)`` is what the fleet view must show.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from pathlib import Path

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1_000_000)
GIB = 1 << 30


def instance(i: int) -> str:
    return f"10.0.{i // 250}.{i % 250}:9464"


def rate(i: int) -> float:
    return 0.5 + (i % 10) * 0.25  # requests per second


def ttft(i: int) -> float:
    return (0.03, 0.07, 0.2, 0.6, 1.5)[i % 5]


def tokens(i: int) -> int:
    return 20 + (i % 7) * 10


def limits(i: int) -> tuple[float, float]:
    """(cgroup limit, working set) bytes: headroom 1 - ws/limit."""
    limit = (4 + i % 4) * GIB
    return float(limit), float(limit * (0.3 + (i % 6) * 0.1))


def expected(i: int, t_end: float) -> dict[str, object]:
    limit, ws = limits(i)
    b = bisect.bisect_left(TTFT_BUCKETS, ttft(i))
    return {
        "key": instance(i),
        "tokens_per_second": rate(i) * tokens(i),
        "requests_per_second": rate(i),
        "ttft_bucket": (TTFT_BUCKETS[b - 1] if b else 0.0, TTFT_BUCKETS[b]),
        "headroom": 1 - ws / limit,
        "binding_name": "cgroup",
        "knobs": {"batch_size": float(8 * (1 + i % 4))},
        "last_action": {"policy": "batch_size", "knob": "batch_size", "outcome": "applied", "unix": t_end - 30 - i},
        "oom_kills": float(i % 3 == 0),
    }


def _labels(i: int, **extra: str) -> str:
    items = {"instance": instance(i), "job": "tuner", **extra}
    return "{" + ",".join(f'{k}="{v}"' for k, v in items.items()) + "}"


def lines(n: int, t_end: float, *, minutes: float = 10, step: float = 15) -> Iterator[str]:
    times = [t_end - k * step for k in range(int(minutes * 60 / step), -1, -1)]
    t0 = times[0]

    def family(name: str, kind: str) -> Iterator[str]:
        yield f"# TYPE {name} {kind}"

    yield from family("tuner", "info")
    for i in range(n):
        info = _labels(i, version="0.1.0", python="3.11.7", policy="offline", probes="cgroup,cpu")
        for t in times:
            yield f"tuner_info{info} 1 {t}"
    for name, fn in (
        ("tuner_cgroup_mem_limit_bytes", lambda i: limits(i)[0]),
        ("tuner_cgroup_mem_working_set_bytes", lambda i: limits(i)[1]),
        ("tuner_sys_mem_total_bytes", lambda i: 64.0 * GIB),
        ("tuner_sys_mem_available_bytes", lambda i: 48.0 * GIB),
        ("tuner_knob_batch_size", lambda i: float(8 * (1 + i % 4))),
    ):
        yield from family(name, "gauge")
        for i in range(n):
            for t in times:
                yield f"{name}{_labels(i)} {fn(i)} {t}"
    yield from family("tuner_cgroup_oom_kills", "counter")
    for i in range(n):
        for t in times:
            yield f"tuner_cgroup_oom_kills_total{_labels(i)} {float(i % 3 == 0)} {t}"
    yield from family("tuner_actions", "counter")
    for i in range(n):
        for t in times:
            yield f"tuner_actions_total{_labels(i, policy='batch_size', knob='batch_size', outcome='applied')} 3 {t}"
    yield from family("tuner_last_action_timestamp_seconds", "gauge")
    for i in range(n):
        for t in times:
            lbl = _labels(i, policy="batch_size", knob="batch_size", outcome="applied")
            yield f"tuner_last_action_timestamp_seconds{lbl} {t_end - 30 - i} {t}"
    for name, bounds, value in (("tuner_req_ttft_seconds", TTFT_BUCKETS, ttft),
                                ("tuner_req_e2e_seconds", TTFT_BUCKETS, lambda i: ttft(i) + 0.5),
                                ("tuner_req_generation_tokens", TOKEN_BUCKETS,
                                 lambda i: float(tokens(i)))):  # fmt: skip
        yield from family(name, "histogram")
        for i in range(n):
            v = value(i)
            b = bisect.bisect_left(bounds, v)
            for t in times:
                count = rate(i) * (t - t0)  # exact rates (a counter need not be whole)
                for j, le in enumerate((*bounds, math.inf)):
                    le_s = "+Inf" if le == math.inf else repr(float(le))
                    yield f"{name}_bucket{_labels(i, le=le_s)} {count if j >= b else 0} {t}"
                yield f"{name}_sum{_labels(i)} {count * v} {t}"
                yield f"{name}_count{_labels(i)} {count} {t}"
    yield "# EOF"


def write(path: Path, n: int, t_end: float, **kw: float) -> None:
    with open(path, "w") as f:
        for line in lines(n, t_end, **kw):
            f.write(line + "\n")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def from_page(page: str, n: int, t_end: float, *, minutes: float = 10, step: float = 15) -> Iterator[str]:
    """A real sidecar's ``/metrics`` page (text format) as ``n`` replicas' series: every series the page has, for
    each replica (``instance(i)``, ``job="tuner"``), at one sample every ``step`` seconds over ``minutes``.
    Counters and histograms grow linearly to the page's value times ``1 + (i % 10) / 10`` at ``t_end`` (buckets
    stay ordered); gauges keep the page's value.  What a fleet of such sidecars costs Prometheus to answer."""
    from prometheus_client.parser import text_string_to_metric_families

    times = [t_end - k * step for k in range(int(minutes * 60 / step), -1, -1)]
    for fam in text_string_to_metric_families(page):
        yield f"# TYPE {fam.name} {fam.type}"
        grows = fam.type in ("counter", "histogram")
        metrics: dict[tuple[tuple[str, str], ...], list[tuple[str, dict[str, str], float]]] = {}
        for s in fam.samples:  # one metric per label set without le: its samples stay together at each time
            if s.name.endswith("_created"):
                continue
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            metrics.setdefault(key, []).append((s.name, dict(s.labels), float(s.value)))
        for i in range(n):
            scale = 1 + (i % 10) / 10
            for samples in metrics.values():
                for k, t in enumerate(times):
                    frac = scale * (k + 1) / len(times) if grows else 1.0
                    for name, labels, value in samples:
                        items = {"instance": instance(i), "job": "tuner", **labels}
                        if "le" in labels:
                            items["le"] = "+Inf" if labels["le"] in ("+Inf", "inf") else repr(float(labels["le"]))
                        lbl = ",".join(f'{a}="{_escape(b)}"' for a, b in items.items())
                        yield f"{name}{{{lbl}}} {value * frac!r} {t}"
    yield "# EOF"


def write_page(path: Path, page: str, n: int, t_end: float, **kw: float) -> None:
    with open(path, "w") as f:
        for line in from_page(page, n, t_end, **kw):
            f.write(line + "\n")
