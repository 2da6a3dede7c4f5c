"""The fleet as ``tuner fleet`` shows it, from PromQL over the series ``tuner.outputs.prometheus`` exports.

A replica is one value of the ``by`` label (default ``instance``: one scraped sidecar) among the series with
``tuner_info`` in the last hour (one that stopped answering stays listed, marked down).  Per replica:

- latencies from the histograms: ``histogram_quantile(q, sum by (instance, le) (rate(tuner_req_ttft_seconds_bucket
  [W])))`` — a percentile from buckets resolves to the bucket's edges (vLLM's boundaries), not to the request;
- tokens/s and requests/s: ``rate()`` of ``tuner_req_generation_tokens_sum`` and ``tuner_req_e2e_seconds_count``;
- memory: the binding limit and its headroom by the sidecar's own rule (``tuner.core.limits.terms``: the
  cgroup's limit against its working set, the host, each device the tree uses, the KV cache), on the latest
  values of the series it reads; ``tuner_mem_time_to_limit_seconds`` when a policy projected one;
- the knobs (``tuner_knob_*``), the last action (``tuner_last_action_timestamp_seconds``: the largest),
  actions by outcome, OOM kills (the larger of the cgroup's ``tuner_cgroup_oom_kills_total`` and the sidecar's
  ``tuner_events_total{kind="oom_kill"}`` — the command's own death, which the cgroup counter of a process that
  is gone may miss — and the same for their increase over the window).

Fleet totals: replicas (up), tokens/s and requests/s summed, percentiles from ``histogram_quantile`` over the
buckets summed across replicas (the only way percentiles add up), OOM kills summed, the least headroom.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tuner.core.limits import DictReader, terms
from tuner.fleet.promql import PromClient, PromError, Series

_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
_GAUGES = ("knob_.+", "cgroup_mem_.+", "cgroup_oom_kills_total", "sys_mem_.+", "gpu_mem_.+", "npu_mem_.+",
           "gpu_tree_.+", "engine_kv_cache_usage_ratio", "engine_requests_(running|waiting)", "mem_headroom_ratio",
           "mem_time_to_limit_seconds", "last_action_timestamp_seconds", "actions_total", "tree_rss_bytes")  # fmt: skip
"""The series read for the memory terms, the knobs and the actions (the tuner_ prefix left out)."""
ROW_QUANTILES = ("ttft_p95", "tpot_p95")
"""The percentiles the view's rows show (``COLUMNS``)."""
QUANTILES = (("ttft_p50", "tuner_req_ttft_seconds", 0.5), ("ttft_p95", "tuner_req_ttft_seconds", 0.95),
             ("ttft_p99", "tuner_req_ttft_seconds", 0.99), ("tpot_p95", "tuner_req_tpot_seconds", 0.95),
             ("e2e_p95", "tuner_req_e2e_seconds", 0.95))  # fmt: skip
PRECISION_BITS = {32: "fp32", 16: "16-bit", 8: "int8"}


@dataclass
class Replica:
    key: str
    """The ``by`` label's value (``instance``: ``host:port`` of the sidecar's ``/metrics``)."""
    labels: dict[str, str]
    up: bool | None = None
    """Prometheus' ``up`` for its target (None: not known by the ``by`` label)."""
    reporting: bool = True
    """``tuner_info`` is there now (False: seen in the last hour, not now)."""
    version: str | None = None
    policy: str | None = None
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    ttft_p99: float | None = None
    tpot_p95: float | None = None
    e2e_p95: float | None = None
    tokens_per_second: float | None = None
    requests_per_second: float | None = None
    headroom: float | None = None
    """Free share of the binding limit (0..1)."""
    binding: str | None = None
    """The binding limit, described (``cgroup /kubepods/pod1 working set 612 MiB of 640 MiB``)."""
    binding_name: str | None = None
    limits: list[dict[str, Any]] = field(default_factory=list)
    time_to_limit_seconds: float | None = None
    knobs: dict[str, float] = field(default_factory=dict)
    last_action: dict[str, Any] | None = None
    """``{policy, knob, outcome, unix, age_seconds}``."""
    actions: dict[str, float] = field(default_factory=dict)
    """Actions so far by outcome."""
    oom_kills: float | None = None
    oom_kills_window: float | None = None
    engine: dict[str, float] = field(default_factory=dict)

    def knobs_text(self) -> str:
        parts = []
        for name, v in sorted(self.knobs.items()):
            if name == "precision_bytes":
                parts.append(PRECISION_BITS.get(round(v * 8), f"{v * 8:g}-bit"))
            else:
                parts.append(f"{name.replace('_', ' ')} {v:g}")
        return ", ".join(parts)


@dataclass
class Fleet:
    prometheus: str
    at: float
    """Unix time of the queries."""
    window: str
    by: str
    match: str
    replicas: list[Replica]
    totals: dict[str, Any]
    query_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_options(by: str, window: str, match: str) -> str:
    """Validate ``--by``, ``--window`` and ``--match``; returns the matchers without braces."""
    if not _LABEL.fullmatch(by):
        raise PromError(f"--by {by!r} is not a label name")
    if not _DURATION.fullmatch(window):
        raise PromError(f"--window {window!r} is not a Prometheus duration (30s, 1m, 5m, 1h)")
    m = match.strip()
    if m.startswith("{") and m.endswith("}"):
        m = m[1:-1].strip()
    if "{" in m or "}" in m:
        raise PromError(f"--match {match!r}: give label matchers, e.g. job=\"tuner\",namespace=\"prod\"")
    return m


def queries(by: str, window: str, match: str, *, rows_only: bool = False) -> dict[str, str]:
    """Every query of one refresh, by name (``rows_only``: of the percentiles only those the rows and the totals
    line show; ``replica_detail`` fetches the rest for one replica)."""
    m = check_options(by, window, match)
    sel = "{" + m + "}"
    comma = f", {m}" if m else ""
    q: dict[str, str] = {
        "info": f"last_over_time(tuner_info{sel}[1h])",
        "info_now": f"tuner_info{sel}",
        "up": f"up{sel}",
        # the last value within 5 minutes: a replica that went away keeps its last figures (an OOM kill) for that long
        "gauges": 'last_over_time({__name__=~"tuner_(' + "|".join(_GAUGES) + ')"' + comma + "}[5m])",
        "tokens": f"sum by ({by}) (rate(tuner_req_generation_tokens_sum{sel}[{window}]))",
        "requests": f"sum by ({by}) (rate(tuner_req_e2e_seconds_count{sel}[{window}]))",
        "oom_window": f"sum by ({by}) (increase(tuner_cgroup_oom_kills_total{sel}[{window}]))",
        "oom_events": f'sum by ({by}) (last_over_time(tuner_events_total{{kind="oom_kill"{comma}}}[5m]))',
        "oom_events_window": f'sum by ({by}) (increase(tuner_events_total{{kind="oom_kill"{comma}}}[{window}]))',
        "fleet_tokens": f"sum(rate(tuner_req_generation_tokens_sum{sel}[{window}]))",
        "fleet_requests": f"sum(rate(tuner_req_e2e_seconds_count{sel}[{window}]))",
    }
    for name, metric, quant in QUANTILES:
        if rows_only and name not in ROW_QUANTILES:
            continue
        q[name] = f"histogram_quantile({quant}, sum by ({by}, le) (rate({metric}_bucket{sel}[{window}])))"
        q["fleet_" + name] = f"histogram_quantile({quant}, sum by (le) (rate({metric}_bucket{sel}[{window}])))"
    if rows_only:  # the fleet's TTFT p50 and p99 are in the totals line
        for name, metric, quant in QUANTILES:
            if name in ("ttft_p50", "ttft_p99"):
                q["fleet_" + name] = f"histogram_quantile({quant}, sum by (le) (rate({metric}_bucket{sel}[{window}])))"
    return q


def replica_detail(client: PromClient, r: Replica, *, by: str = "instance", window: str = "1m", match: str = "",
                   at: float | None = None) -> Replica:  # fmt: skip
    """``r`` with every percentile of ``QUANTILES`` (one replica's buckets: a few small queries), for the
    detail of a view that refreshes only the rows' percentiles (``fetch_fleet(rows_only=True)``)."""
    m = check_options(by, window, match)
    value = r.key.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    sel = "{" + (m + ", " if m else "") + f'{by}="{value}"' + "}"
    qs = {name: f"histogram_quantile({quant}, sum by (le) (rate({metric}_bucket{sel}[{window}])))"
          for name, metric, quant in QUANTILES}  # fmt: skip
    res = client.query_many(qs, at)
    out = replace(r)
    for name, got in res.items():
        setattr(out, name, got[0].value if got else None)
    return out


def fetch_fleet(client: PromClient, *, by: str = "instance", window: str = "1m", match: str = "",
                at: float | None = None, rows_only: bool = False) -> Fleet:  # fmt: skip
    """One refresh: every query at once, folded into replicas and totals.  ``PromError`` (one line) when
    Prometheus cannot be asked.  ``rows_only``: the percentiles the view's rows and totals line show, not the
    detail's (what the terminal UI refreshes; ``replica_detail`` on demand)."""
    started = time.monotonic()
    when = time.time() if at is None else at
    res = client.query_many(queries(by, window, match, rows_only=rows_only), when)
    took = time.monotonic() - started
    replicas: dict[str, Replica] = {}
    for s in res["info"]:
        key = s.labels.get(by)
        if key is None:
            continue
        r = replicas.setdefault(key, Replica(key, _target_labels(s.labels), reporting=False))
        r.version, r.policy = s.labels.get("version"), s.labels.get("policy")
    for s in res["info_now"]:
        if (key := s.labels.get(by)) in replicas:
            replicas[key].reporting = True
    for s in res["up"]:
        key = s.labels.get(by)
        if key in replicas and s.value is not None:
            r = replicas[key]
            r.up = bool(s.value) if r.up is None else (r.up or bool(s.value))
    values: dict[str, dict[str, float]] = {}
    last_actions: dict[str, list[Series]] = {}
    for s in res["gauges"]:
        key = s.labels.get(by)
        if key not in replicas or s.value is None:
            continue
        name = s.labels.get("__name__", "")[len("tuner_"):]
        if name == "last_action_timestamp_seconds":
            last_actions.setdefault(key, []).append(s)
            continue
        if name == "actions_total":
            out = s.labels.get("outcome", "?")
            replicas[key].actions[out] = replicas[key].actions.get(out, 0.0) + s.value
            continue
        dev = s.labels.get("device")
        values.setdefault(key, {})[f"{name}/{dev}" if dev else name] = s.value
    for key, r in replicas.items():
        _fold_values(r, values.get(key, {}), when)
        acts = last_actions.get(key)
        if acts:
            last = max(acts, key=lambda x: x.value or 0.0)
            assert last.value is not None
            r.last_action = {"policy": last.labels.get("policy"), "knob": last.labels.get("knob"),
                             "outcome": last.labels.get("outcome"), "unix": last.value,
                             "age_seconds": max(0.0, when - last.value)}  # fmt: skip
    for name, attr in (("tokens", "tokens_per_second"), ("requests", "requests_per_second"),
                       ("oom_window", "oom_kills_window"), *((n, n) for n, _, _ in QUANTILES)):  # fmt: skip
        for s in res.get(name, ()):
            if (key := s.labels.get(by)) in replicas:
                setattr(replicas[key], attr, s.value)
    for name, attr in (("oom_events", "oom_kills"), ("oom_events_window", "oom_kills_window")):
        for s in res[name]:
            if (key := s.labels.get(by)) in replicas and s.value is not None:
                now = getattr(replicas[key], attr)
                setattr(replicas[key], attr, s.value if now is None else max(now, s.value))
    rows = sorted(replicas.values(), key=lambda r: natural(r.key))
    totals = _totals(rows, res)
    return Fleet(client.url, when, window, by, match, rows, totals, round(took, 4))


def natural(key: str) -> tuple[Any, ...]:
    """``10.0.0.9:9464`` before ``10.0.0.10:9464``; ``pod-2`` before ``pod-10``."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", key)))


def _target_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels that name the sidecar (the scrape's), without ``tuner_info``'s own."""
    return {k: v for k, v in labels.items() if k not in ("__name__", "version", "python", "policy", "probes")}


def _fold_values(r: Replica, values: dict[str, float], now: float) -> None:
    r.knobs = {k[len("knob_"):]: v for k, v in values.items() if k.startswith("knob_") and "/" not in k}
    r.oom_kills = values.get("cgroup_oom_kills_total")
    r.time_to_limit_seconds = values.get("mem_time_to_limit_seconds")
    r.engine = {k: v for k, v in values.items() if k.startswith("engine_")}
    ts = terms(DictReader(values))
    r.limits = [{"name": t.name, "used": t.used, "limit": t.limit, "unit": t.unit, "headroom": round(t.headroom, 6),
                 "describe": t.describe()} for t in ts]  # fmt: skip
    if ts:
        r.binding_name, r.binding, r.headroom = ts[0].name, ts[0].describe(), ts[0].headroom
    elif values.get("mem_headroom_ratio") is not None:
        r.headroom = values["mem_headroom_ratio"]


def _totals(rows: list[Replica], res: dict[str, list[Series]]) -> dict[str, Any]:
    def one(name: str) -> float | None:
        got = res[name]
        return got[0].value if got else None

    heads = [r.headroom for r in rows if r.headroom is not None and r.reporting]
    ooms = [r.oom_kills for r in rows if r.oom_kills is not None]
    out: dict[str, Any] = {
        "replicas": len(rows),
        "up": sum(1 for r in rows if r.up),
        "reporting": sum(1 for r in rows if r.reporting),
        "tokens_per_second": one("fleet_tokens"),
        "requests_per_second": one("fleet_requests"),
        "oom_kills": sum(ooms) if ooms else None,
        "oom_kills_window": sum(r.oom_kills_window or 0.0 for r in rows),
        "min_headroom": min(heads) if heads else None,
    }
    for name, _, _ in QUANTILES:
        out[name] = one("fleet_" + name) if "fleet_" + name in res else None
    return out
