"""``--prometheus ADDR``: serve the session at ``/metrics`` for a Prometheus server to scrape.

Built on prometheus-client with its own ``CollectorRegistry`` (nothing global, no process/platform
collectors mixed in) and one custom collector that renders at scrape time what the sampler thread left:
the latest tick (one reference swapped per tick), counters, and histogram bucket counts (a few integer
increments per finished request).  The sampler never waits on a scrape.

Series, by Prometheus' naming conventions (``promtool check metrics`` is clean; the metric keys'
rules in ``docs/conventions.md`` were chosen so that they map one to one):

- ``tuner_info{version,python,policy,probes} 1``: who is talking, on one series.  No series carries a
  host, command line or PID of the session (Prometheus adds ``instance`` and ``job`` when it scrapes;
  command lines explode cardinality and can hold secrets).
- a tick key ``<name>`` -> gauge ``tuner_<name>`` (``tuner_tree_rss_bytes``); ``<name>/<device>`` ->
  ``tuner_<name>{device="<device>"}`` (``tuner_gpu_util_ratio{device="0"}``; the probe's name for
  ``probe_cost_seconds/<probe>``: ``{probe="cpu"}``).  A key ending in ``_total`` is a counter
  (``tuner_tree_cpu_seconds_total``, ``tuner_req_done_total``, ``tuner_chan_dropped_total``).  A unit
  Prometheus has no place for is converted to its base unit (``CONVERTED``: ``knob_precision_bits`` ->
  ``tuner_knob_precision_bytes``, bytes per weight value).
- per process: ``tuner_process_<field>{pid,name}`` by the same rules (``tuner_process_rss_bytes``,
  ``tuner_process_cpu_seconds_total``, ``tuner_process_gpu_mem_bytes{pid,name,device}``); the process's
  PID and name identify these series only.
- one observation per finished request (the output probe's ``request`` events), histograms with vLLM's
  bucket boundaries (``HISTOGRAMS``): ``tuner_req_ttft_seconds``, ``tuner_req_tpot_seconds`` (the
  request's mean time per output token after the first), ``tuner_req_queue_seconds``,
  ``tuner_req_e2e_seconds``, ``tuner_req_prompt_tokens``, ``tuner_req_generation_tokens``.
  ``rate(tuner_req_generation_tokens_sum[1m])`` is tokens per second, ``histogram_quantile`` the
  percentiles, over any set of replicas.
- ``tuner_ticks_total``, ``tuner_skipped_ticks_total``, ``tuner_events_total{kind}``.
- policy actions (the trace's ``action`` records, through ``trace_line``): ``tuner_actions_total{policy,knob,
  outcome}`` and ``tuner_last_action_timestamp_seconds{policy,knob,outcome}`` (wall clock): the last action of
  a replica is the series with the largest timestamp (``tuner fleet`` shows it).

At the end (``close``) ``/metrics`` stays up for a last scrape (``linger``): until every server that scraped it
in the last 10 minutes has scraped once more, at most ``linger`` seconds (default: two of the scrape intervals
seen; nothing when nobody scraped) — so the last counters, an OOM kill, are not lost between two scrapes.

Left out of ``/metrics`` (they stay in the trace): CPU ratios in cores' worth (``tree_cpu_ratio``,
``self_cpu_ratio``, per-process ``cpu_ratio``: a gauge above 1 — their ``*_cpu_seconds_total`` counters
stand in, ``rate()`` gives cores); the windowed percentiles ``req_*_p50_*``/``req_*_p95_*`` (quantiles
cannot be added across replicas: the histograms stand in; ``engine_*_p50_seconds`` likewise, the engine's
own histograms are on its own ``/metrics``) and the windowed rates ``req_tokens_per_second``/
``req_requests_per_second`` (``rate()`` of the histograms' ``_sum``/``_count``) and any ``<x>_per_second``
whose counter ``<x>_total`` is in the tick (``engine_generation_tokens_per_second``).
Consistency (``--consistency``): ``tuner_quality_self_consistency_ratio{backend="minilm"}`` and the relevance and
reference consistency likewise (the backend that produced a figure is its label), ``tuner_quality_scored_total``,
``tuner_quality_dropped_total``, ``tuner_quality_scorer_rss_bytes`` ...
Kept although windowed: the means ``req_seq_rep_4_ratio``, ``req_rep_32_ratio``, ``req_loop_ratio``,
``req_distinct_2_ratio`` and ``req_batch_occupancy_ratio`` — the quality signals the policies steer by,
with no per-request counter to stand in for them (a mean over the last ``window_s``; averaging them
across replicas weighs replicas equally).

A missing value (None) is left out of the scrape rather than exported as NaN.
"""

from __future__ import annotations

import bisect
import itertools
import math
import platform
import re
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner import __version__
from tuner.errors import UserError
from tuner.link.addr import parse_listen as parse_address
from tuner.records import split_key

PREFIX = "tuner_"
_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")

LEFT_OUT = frozenset({"tree_cpu_ratio", "self_cpu_ratio", "req_tokens_per_second", "req_requests_per_second"})
"""Tick keys not exported (see the module docstring), besides the windowed percentiles (``_QUANTILE``)."""
_QUANTILE = re.compile(r"_p\d+_")
PROC_LEFT_OUT = frozenset({"name", "pid", "ppid", "cpu_ratio"})
"""Per-process fields that are labels, ids or a cores'-worth ratio (``cpu_seconds_total`` stands in)."""
CONVERTED: dict[str, tuple[str, float]] = {"knob_precision_bits": ("knob_precision_bytes", 1 / 8)}
"""Keys in a unit Prometheus has no place for -> (name in its base unit, factor): bits -> bytes per value."""
LABEL_NAMES: dict[str, str] = {
    "probe_cost_seconds": "probe",
    # consistency (tuner.quality.probe): the backend that produced the figure is a label, never left out
    "quality_self_consistency_ratio": "backend",
    "quality_relevance_ratio": "backend",
    "quality_reference_consistency_ratio": "backend",
}
"""The label a key's ``/<part>`` becomes where it is not a device."""
HELP: dict[str, str] = {
    "tree_cpu_seconds_total": "user+system CPU time of the watched process tree (each process since it started, "
    "plus the processes that left it); rate() gives cores busy",
    "self_cpu_seconds_total": "user+system CPU time of the tuner sidecar itself",
    "process_cpu_seconds_total": "user+system CPU time of one process of the watched tree since it started",
    "knob_precision_bytes": "bytes per weight value at the precision the tuner set (the trace's "
    "knob_precision_bits / 8)",
}


def _one_two_five(top: float) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``top`` (vLLM's ``build_1_2_5_buckets`` for token counts)."""
    out: list[float] = []
    mag = 1
    while True:
        for m in (1, 2, 5):
            if m * mag > top:
                return tuple(out)
            out.append(float(m * mag))
        mag *= 10


TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
"""vLLM's ``time_to_first_token_seconds`` buckets (the OpenTelemetry GenAI advice, extended)."""
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)  # fmt: skip
"""vLLM's ``time_per_output_token_seconds`` / ``inter_token_latency_seconds`` buckets."""
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
"""vLLM's request latency buckets (``e2e_request_latency_seconds``, ``request_queue_time_seconds``)."""
TOKEN_BUCKETS = _one_two_five(1_000_000)
"""Token counts per request: 1, 2, 5, ... 1M (vLLM's 1-2-5 series, which stops at the model's context)."""


@dataclass(frozen=True)
class HistogramSpec:
    name: str
    field: str
    """The ``request`` event's field observed (``probes/output.py``)."""
    buckets: tuple[float, ...]
    help: str


HISTOGRAMS: tuple[HistogramSpec, ...] = (
    HistogramSpec("req_ttft_seconds", "ttft_seconds", TTFT_BUCKETS, "time to first token, per finished request"),
    HistogramSpec("req_tpot_seconds", "tpot_seconds", TPOT_BUCKETS,
                  "mean time per output token after the first (inter-token latency), per finished request"),
    HistogramSpec("req_queue_seconds", "queue_seconds", REQUEST_BUCKETS,
                  "time from arrival to the start of work, per finished request"),
    HistogramSpec("req_e2e_seconds", "e2e_seconds", REQUEST_BUCKETS, "end-to-end latency, per finished request"),
    HistogramSpec("req_prompt_tokens", "prompt_tokens", TOKEN_BUCKETS, "prompt tokens, per finished request"),
    HistogramSpec("req_generation_tokens", "tokens", TOKEN_BUCKETS, "generated tokens, per finished request"),
)  # fmt: skip


def metric_name(name: str) -> str:
    """``gpu_util_ratio`` -> ``tuner_gpu_util_ratio`` (anything outside ``[a-zA-Z0-9_]`` becomes ``_``)."""
    return PREFIX + _BAD_CHARS.sub("_", name)


def parse_listen(text: str, public: bool) -> tuple[str, int]:
    """``--prometheus``: ``tuner.link.addr``'s rules.  A host that is not loopback is refused unless
    ``public`` (``--prometheus-public``): ``/metrics`` shows process names and memory figures to anyone who
    can reach the port.  Port 0 is refused: a scraper must know where to look."""
    return parse_address(
        text,
        public,
        option="--prometheus",
        public_flag="--prometheus-public",
        public_means="serve metrics beyond this machine",
        example_port=9464,
    )


def check_bindable(addr: tuple[str, int], shown: str | None = None) -> None:
    """Bind ``addr`` once and let go, so that a port already taken is a one-line error before the
    watched command starts (the exporter binds it for real a moment later, as ``http.server`` does:
    ``SO_REUSEADDR``, the first address ``getaddrinfo`` gives)."""
    host, port = addr
    label = shown if shown is not None else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except (OSError, UnicodeError, IndexError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise UserError(f"cannot serve Prometheus metrics on {label}: {why}") from None


class _Snapshot:
    __slots__ = ("procs", "values")

    def __init__(self, values: Mapping[str, Any], procs: Mapping[int, Mapping[str, Any]] | None) -> None:
        self.values = dict(values)
        self.procs = {pid: dict(v) for pid, v in (procs or {}).items()}


def _finite(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


_NUMBER = (int, float)


class _Histogram:
    """Bucket counts (not cumulative; the scrape adds them up), sum and count of one histogram."""

    __slots__ = ("bounds", "counts", "n", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1  # le: v <= bound
        self.sum += v
        self.n += 1

    def copy(self) -> _Histogram:
        h = _Histogram.__new__(_Histogram)
        h.bounds, h.counts, h.sum, h.n = self.bounds, list(self.counts), self.sum, self.n
        return h


def info_labels(header: Mapping[str, Any] | None) -> dict[str, str]:
    """``tuner_info``'s labels from a trace header: the tuner's version, Python, the policy preset (``file``
    for a TOML file: a path says nothing to a dashboard and may say too much) and the probes that run."""
    hdr = header or {}
    policy = hdr.get("policy")
    if not isinstance(policy, str) or not policy:
        policy_label = "none"
    elif "/" in policy or policy.endswith(".toml"):
        policy_label = "file"
    else:
        policy_label = policy
    probes = hdr.get("probes")
    running = sorted(k for k, v in probes.items() if isinstance(v, Mapping) and v.get("available")) \
        if isinstance(probes, Mapping) else []  # fmt: skip
    return {"version": __version__, "python": platform.python_version(), "policy": policy_label,
            "probes": ",".join(running)}  # fmt: skip


def _family(name: str, help_text: str, labels: Sequence[str]) -> Any:
    """An empty family for a key's (or per-process field's) name: a counter for ``*_total`` (named without
    it; prometheus-client adds it back), else a gauge."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    text = HELP.get(name, help_text)
    if name.endswith("_total"):
        return CounterMetricFamily(metric_name(name[: -len("_total")]), text, labels=labels)
    return GaugeMetricFamily(metric_name(name), text, labels=labels)


class TunerCollector:
    """Renders the latest snapshot, the counters and the histograms at scrape time (prometheus-client
    custom collector)."""

    def __init__(self, info: Mapping[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._snap = _Snapshot({}, None)
        self._ticks = 0
        self._skipped = 0
        self._events: dict[str, int] = {"oom_kill": 0}  # there from the start: increase() sees the first kill
        self._info = dict(info if info is not None else info_labels(None))
        self._hists = [_Histogram(h.buckets) for h in HISTOGRAMS]
        self._fields = [(spec.field, h) for spec, h in zip(HISTOGRAMS, self._hists, strict=True)]
        self._actions: dict[tuple[str, str, str], tuple[int, float]] = {}  # (policy, knob, outcome) -> count, unix
        self.started_unix = time.time()

    # -- writers (the sampler thread) ---------------------------------------------------------------
    def update(self, values: Mapping[str, Any], procs: Mapping[int, Mapping[str, Any]] | None) -> None:
        snap = _Snapshot(values, procs)  # built outside the lock; the swap is all the lock guards
        with self._lock:
            self._snap = snap

    def count_tick(self) -> None:
        with self._lock:
            self._ticks += 1

    def count_skipped(self, n: int) -> None:
        with self._lock:
            self._skipped += int(n)

    def count_event(self, kind: str, data: Mapping[str, Any] | None = None) -> None:
        """Count an event; a ``request`` event's ``data`` is one observation for each histogram whose field
        it has (a missing, non-numeric or negative value is not observed)."""
        obs: list[tuple[_Histogram, float]] = []
        if kind == "request" and isinstance(data, Mapping):
            for fld, h in self._fields:
                v: Any = data.get(fld)
                if type(v) in _NUMBER and 0 <= v < math.inf:  # not a bool, None, NaN, inf or negative
                    obs.append((h, float(v)))
        with self._lock:
            self._events[kind] = self._events.get(kind, 0) + 1
            for h, v in obs:
                h.observe(v)

    def count_action(self, rec: Mapping[str, Any]) -> None:
        """A policy action (a trace ``action`` record): counted by policy, knob and outcome, with its time."""
        key = (str(rec.get("policy")), str(rec.get("knob")), str(rec.get("outcome")))
        t = rec.get("t")
        when = self.started_unix + float(t) if isinstance(t, (int, float)) and math.isfinite(t) else time.time()
        with self._lock:
            n, last = self._actions.get(key, (0, when))
            self._actions[key] = (n + 1, max(last, when))

    # -- reader (the HTTP thread) --------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, InfoMetricFamily
        from prometheus_client.utils import floatToGoString

        with self._lock:
            snap, ticks, skipped, events = self._snap, self._ticks, self._skipped, dict(self._events)
            hists = [h.copy() for h in self._hists]
            actions = dict(self._actions)

        yield InfoMetricFamily("tuner", "the inference-tuner session serving these metrics", value=self._info)

        plain: dict[str, float] = {}
        by_label: dict[str, list[tuple[str, float]]] = {}
        names = {split_key(k)[0] for k in snap.values}
        for key, raw in snap.values.items():
            v = _finite(raw)
            if v is None:
                continue
            name, dev = split_key(key)
            if name in LEFT_OUT or _QUANTILE.search(name):
                continue
            if name.endswith("_per_second") and name.removesuffix("_per_second") + "_total" in names:
                continue  # a windowed rate of a counter that is exported: rate() of the counter instead
            if name in CONVERTED:
                name, factor = CONVERTED[name]
                v *= factor
            if dev is None:
                plain[name] = v
            else:
                by_label.setdefault(name, []).append((dev, v))
        for name, v in sorted(plain.items()):
            if name in by_label:  # a key both with and without a device: keep the labelled family
                by_label[name].append(("", v))
                continue
            fam = _family(name, f"{name} (latest tick)", [])
            fam.add_metric([], v)
            yield fam
        for name, devs in sorted(by_label.items()):
            label = LABEL_NAMES.get(name, "device")
            fam = _family(name, f"{name} per {label} (latest tick)", [label])
            for dev, v in devs:
                fam.add_metric([dev], v)
            yield fam

        per_field: dict[str, list[tuple[str, str, str | None, float]]] = {}
        for pid, fields in sorted(snap.procs.items()):
            pname = str(fields.get("name", ""))
            for fld, raw in fields.items():
                name, dev = split_key(fld)  # ``gpu_mem_bytes/0`` (the NVIDIA probe's per-process memory)
                if name in PROC_LEFT_OUT:
                    continue
                v = _finite(raw)
                if v is not None:
                    per_field.setdefault(name, []).append((str(pid), pname, dev, v))
        for name, rows in per_field.items():
            devices = any(dev is not None for _, _, dev, _ in rows)
            fam = _family(f"process_{name}", f"per-process {name} in the watched tree (latest tick)",
                          ["pid", "name", "device"] if devices else ["pid", "name"])  # fmt: skip
            for pid_s, pname, dev, v in rows:
                fam.add_metric([pid_s, pname, dev or ""] if devices else [pid_s, pname], v)
            yield fam

        for spec, h in zip(HISTOGRAMS, hists, strict=True):
            cum = 0
            buckets: list[tuple[str, float]] = []
            for bound, c in zip((*spec.buckets, math.inf), h.counts, strict=True):
                cum += c
                buckets.append((floatToGoString(bound), cum))
            yield HistogramMetricFamily(metric_name(spec.name), spec.help, buckets=buckets, sum_value=h.sum)

        yield CounterMetricFamily("tuner_ticks", "ticks sampled", value=ticks)
        yield CounterMetricFamily("tuner_skipped_ticks", "ticks missed because the sampler was late", value=skipped)
        ev = CounterMetricFamily("tuner_events", "trace events by kind", labels=["kind"])
        for kind, n in sorted(events.items()):
            ev.add_metric([kind], n)
        yield ev
        if actions:
            from prometheus_client.core import GaugeMetricFamily

            labels = ["policy", "knob", "outcome"]
            act = CounterMetricFamily("tuner_actions", "policy actions by policy, knob and outcome", labels=labels)
            last = GaugeMetricFamily("tuner_last_action_timestamp_seconds",
                                     "wall-clock time of the last policy action by policy, knob and outcome",
                                     labels=labels)  # fmt: skip
            for (policy, knob, outcome), (n, when) in sorted(actions.items()):
                act.add_metric([policy, knob, outcome], n)
                last.add_metric([policy, knob, outcome], when)
            yield act
            yield last


SCRAPERS_FORGOTTEN_S = 600.0
"""A server that has not scraped for this long is not waited for at the end."""
MAX_DEFAULT_LINGER_S = 300.0


class PrometheusExporter:
    """Serves ``/metrics`` on ``addr`` from a background thread until ``close()``.  Raises ``OSError`` when
    the address cannot be bound (the session turns it into a one-line error).  ``header``: the trace's
    header, for ``tuner_info``'s labels (``info_labels``).  ``linger``: at most how long ``close`` keeps
    ``/metrics`` up for a last scrape (None: two scrape intervals, as seen; 0: not at all); ``log`` hears that it
    does."""

    def __init__(
        self,
        addr: tuple[str, int],
        header: Mapping[str, Any] | None = None,
        *,
        linger: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
            from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler
        except ImportError:
            raise UserError("--prometheus needs prometheus-client: pip install 'inference-tuner[export]'") from None
        from wsgiref.simple_server import make_server

        self.addr = addr
        self.linger = linger
        self._log = log
        self.collector = TunerCollector(info_labels(header))
        started = (header or {}).get("started_unix")
        if isinstance(started, (int, float)):
            self.collector.started_unix = float(started)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)  # type: ignore[arg-type]
        self._scrapes: dict[str, list[float]] = {}  # scraper's address -> times of its last scrapes
        self._scraped = threading.Condition()
        app = make_wsgi_app(self.registry)

        def counted(environ: dict[str, Any], start_response: Any) -> Any:
            out = app(environ, start_response)  # rendered: this scrape has the values as they are now
            if environ.get("PATH_INFO", "/") in ("/", "/metrics"):
                with self._scraped:
                    times = self._scrapes.setdefault(str(environ.get("REMOTE_ADDR")), [])
                    times.append(time.monotonic())
                    del times[:-5]
                    self._scraped.notify_all()
            return out

        class Server(ThreadingWSGIServer):
            pass

        host, port = addr
        Server.address_family, host = _get_best_family(host, port)
        self._server = make_server(host, port, counted, Server, handler_class=_SilentHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="tuner-prometheus", daemon=True)
        self._thread.start()
        self.port = int(self._server.server_address[1])
        self._closed = False
        self._stop_lingering = False

    def scrape_interval(self) -> float | None:
        """The median time between two scrapes by one server, as seen; None before any second scrape."""
        with self._scraped:
            gaps = [b - a for times in self._scrapes.values() for a, b in itertools.pairwise(times)]
        return statistics.median(gaps) if gaps else None

    def _linger(self) -> None:
        """Wait (at most ``linger`` s) until every server that scraped lately has scraped again."""
        now = time.monotonic()
        with self._scraped:
            waiting = {a for a, times in self._scrapes.items() if now - times[-1] < SCRAPERS_FORGOTTEN_S}
        if self.linger is not None:
            limit = self.linger
        else:
            interval = self.scrape_interval()
            limit = min(2 * interval, MAX_DEFAULT_LINGER_S) if interval is not None else 0.0
        if limit <= 0 or not waiting:
            return
        if self._log is not None:
            self._log(f"keeping /metrics up for a last scrape (at most {limit:.0f} s; --prometheus-linger; "
                      "Ctrl-C stops it)")  # fmt: skip
        deadline = now + limit
        with self._scraped:
            while waiting and not self._stop_lingering and (left := deadline - time.monotonic()) > 0:
                waiting = {a for a in waiting if self._scrapes[a][-1] < now}
                if waiting:
                    self._scraped.wait(min(left, 0.2))  # (a signal handler only sets the flag: no lock there)

    def stop_lingering(self) -> None:
        """End the wait for a last scrape now (a signal handler calls it: it only sets a flag)."""
        self._stop_lingering = True

    def update(self, values: Mapping[str, Any], procs: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        self.collector.update(values, procs)

    def count_tick(self) -> None:
        self.collector.count_tick()

    def count_skipped(self, n: int) -> None:
        self.collector.count_skipped(n)

    def count_event(self, kind: str, data: Mapping[str, Any] | None = None) -> None:
        self.collector.count_event(kind, data)

    def trace_line(self, line: bytes, kind: str) -> None:
        """A ``TraceWriter`` line listener: the policy actions (``tuner_actions_total``)."""
        if kind == "action":
            import orjson

            self.collector.count_action(orjson.loads(line))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._linger()
        except KeyboardInterrupt:  # Ctrl-C while lingering: stop now
            pass
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
