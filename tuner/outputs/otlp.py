"""``--otlp URL``: the session's metrics and policy actions to an OpenTelemetry collector over OTLP/HTTP
(protobuf), with the OpenTelemetry SDK's data model and OTLP exporters (the ``otlp`` extra).

Conventions: the GenAI metrics of **semantic-conventions v1.41.0** (``SEMCONV_VERSION``; the last release
before the GenAI conventions moved to their own repository; all "Development"), ``schema_url``
``https://opentelemetry.io/schemas/1.41.0`` on the resource and the instrumentation scope.

- ``tuner proxy`` is a client of the server behind it: ``gen_ai.client.operation.duration`` (every request;
  ``error.type`` when it failed), ``gen_ai.client.operation.time_to_first_chunk`` and
  ``gen_ai.client.operation.time_per_output_chunk`` (streaming requests only, as the conventions say: one
  observation per output chunk after the first, the time since the previous one; chunks that arrived in
  one read count 0), attributes ``gen_ai.operation.name`` (``chat`` / ``text_completion`` by the route),
  ``gen_ai.provider.name`` (the engine behind it when known: ``vllm``, ``sglang``, ``tgi``, ``llamacpp``;
  else ``openai``, the API it speaks), ``gen_ai.request.model`` (as asked; at most ``MAX_MODELS`` values,
  then ``_OTHER``), ``server.address`` / ``server.port`` (the upstream).
- In-process (``tuner run`` / ``attach`` / ``demo`` with ``tuner.client``: the tuner sees the model itself):
  ``gen_ai.server.request.duration``, ``gen_ai.server.time_to_first_token``,
  ``gen_ai.server.time_per_output_token`` (successful requests), ``gen_ai.operation.name``
  ``text_completion`` unless the client says, ``gen_ai.provider.name`` ``local`` (a custom value: the model
  runs in the watched process).
- Both: ``gen_ai.client.token.usage`` with ``gen_ai.token.type`` ``input`` / ``output``.
- ``error.type``: the upstream's HTTP status (``500``, ``429``), ``timeout``, ``upstream_unavailable``,
  ``stream_broken`` (the upstream broke a stream off), ``cancelled`` (the client left).
- ``OTEL_SEMCONV_STABILITY_OPT_IN``: without ``gen_ai_latest_experimental`` every data point also carries
  the deprecated ``gen_ai.system`` (same value as ``gen_ai.provider.name``), so dashboards built on
  v1.36.0 or earlier keep working, as the conventions' transition plan asks; with it, only v1.41.0 names.
- The advised bucket boundaries (``TOKEN_BUCKETS``, ``DURATION_BUCKETS``, ``SERVER_TTFT_BUCKETS``,
  ``SERVER_TPOT_BUCKETS``); cumulative temporality, always (``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_
  PREFERENCE`` does not apply: these series are built here, cumulative from the session's start).

The tuner's own metrics under ``tuner.``: a key ``<name>_<unit>`` becomes ``tuner.<name>`` with the unit in
the unit field (``_bytes`` By, ``_seconds`` s, ``_ratio`` 1, ``_celsius`` Cel, ``_watts`` W, ``_joules`` J,
``_hertz`` Hz, ``_per_second`` 1/s; a count of things 1), a gauge, or a cumulative monotonic sum for
``_total`` (``tree_cpu_seconds_total`` -> ``tuner.tree_cpu`` in s); ``<name>/<device>`` carries the device
as ``tuner.device`` (``tuner.probe`` for ``probe_cost_seconds``); per process ``tuner.process.<field>``
with ``process.pid`` and ``process.executable.name``.  Left out as on ``/metrics``
(``tuner.outputs.prometheus``): cores'-worth CPU ratios, windowed percentiles and rates.  Also
``tuner.ticks``, ``tuner.skipped_ticks``, ``tuner.events`` (``tuner.event.kind``), and the exporter's own
``tuner.otlp.dropped`` / ``tuner.otlp.failures`` (``tuner.signal``: ``metrics`` / ``logs``).

Policy actions are log records with ``event_name`` ``tuner.policy.action`` (the LogRecord's EventName
field: the ``event.name`` attribute is deprecated in v1.41.0), flat attributes (``tuner.policy``,
``tuner.knob``, ``tuner.outcome``, ``tuner.value``, ``tuner.previous``) and the whole action — reason,
evidence, result — as the body (a map).

Never in the way: the sampler thread only updates counts under a lock held for microseconds (like the
Prometheus collector); one background thread builds and sends the data every ``OTEL_METRIC_EXPORT_INTERVAL``
ms (default 60000, the SDK's) and at the end.  Metrics are cumulative, so a failed export loses nothing but
that point in time; actions wait in a bounded queue (``MAX_PENDING_LOGS``; beyond it they are dropped and
counted).  The SDK's own logging (``opentelemetry.*``: a failed export, its retries) never prints a
traceback: it is turned into one line on stderr at most once a minute.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from tuner import __version__
from tuner.errors import UserError
from tuner.outputs.prometheus import LABEL_NAMES, LEFT_OUT, PROC_LEFT_OUT
from tuner.records import GENAI_DURATION_BUCKETS, split_key

SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
SCOPE = "inference-tuner"
TOKEN_BUCKETS = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                 16777216.0, 67108864.0)  # fmt: skip
DURATION_BUCKETS = GENAI_DURATION_BUCKETS
SERVER_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
SERVER_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
MAX_MODELS = 32
MAX_PENDING_LOGS = 1024
LOG_EVERY_S = 60.0
"""An export failure is said on stderr at most this often (with the count since)."""
CLOSE_WAIT_S = 5.0
"""At the end, the last export gets this long before the session goes on without it."""

_UNITS = (("_bytes", "By"), ("_seconds", "s"), ("_ratio", "1"), ("_celsius", "Cel"), ("_watts", "W"),
          ("_joules", "J"), ("_hertz", "Hz"), ("_bits", "bit"))  # fmt: skip
_QUANTILE_MARK = ("_p50_", "_p90_", "_p95_", "_p99_")

# (name, unit, description, buckets) of the GenAI histograms
CLIENT_DURATION = ("gen_ai.client.operation.duration", "s", "GenAI operation duration.", DURATION_BUCKETS)
CLIENT_TTFC = ("gen_ai.client.operation.time_to_first_chunk", "s",
               "Time to receive the first chunk, measured from when the client issues the generation request to "
               "when the first chunk is received in the response stream.", DURATION_BUCKETS)  # fmt: skip
CLIENT_TPOC = ("gen_ai.client.operation.time_per_output_chunk", "s",
               "Time per output chunk, recorded for each chunk received after the first one, measured as the time "
               "elapsed from the end of the previous chunk to the end of the current chunk.",
               DURATION_BUCKETS)  # fmt: skip
TOKEN_USAGE = ("gen_ai.client.token.usage", "{token}", "Number of input and output tokens used.", TOKEN_BUCKETS)
SERVER_DURATION = ("gen_ai.server.request.duration", "s",
                   "Generative AI server request duration such as time-to-last byte or last output token.",
                   DURATION_BUCKETS)  # fmt: skip
SERVER_TTFT = ("gen_ai.server.time_to_first_token", "s", "Time to generate first token for successful responses.",
               SERVER_TTFT_BUCKETS)  # fmt: skip
SERVER_TPOT = ("gen_ai.server.time_per_output_token", "s",
               "Time per output token generated after the first token for successful responses.",
               SERVER_TPOT_BUCKETS)  # fmt: skip
_Spec = tuple[str, str, str, tuple[float, ...]]
_ABORTED = {"upstream": "stream_broken", "client": "cancelled"}
_PROVIDERS = {"vllm": "vllm", "sglang": "sglang", "tgi": "tgi", "llamacpp": "llamacpp"}


def endpoints(url: str) -> tuple[str, str]:
    """``--otlp URL`` -> the metrics and logs endpoints: ``http://collector:4318`` -> ``.../v1/metrics`` and
    ``.../v1/logs`` (a URL ending in ``/v1/metrics`` or ``/v1/logs`` names the base the same way).  One-line
    ``UserError`` for anything but an http(s) URL with a host."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise UserError(f"--otlp {url!r} is not a URL (e.g. http://collector:4318)") from None
    if parts.scheme in ("grpc", "grpcs"):
        raise UserError(f"--otlp {url!r}: OTLP/gRPC is not supported; give the collector's OTLP/HTTP endpoint "
                        "(http://HOST:4318)")  # fmt: skip
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--otlp {url!r}: give an http:// or https:// URL with a host (e.g. http://collector:4318)")
    if parts.query or parts.fragment:
        raise UserError(f"--otlp {url!r}: a URL without ?query or #fragment")
    del port
    base = text.split("?")[0].rstrip("/")
    for suffix in ("/v1/metrics", "/v1/logs"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base + "/v1/metrics", base + "/v1/logs"


def check_available() -> None:
    """A one-line error before anything starts when the SDK or the exporter is not installed."""
    try:
        import opentelemetry.exporter.otlp.proto.http.metric_exporter
        import opentelemetry.sdk.metrics.export  # noqa: F401
    except ImportError:
        raise UserError("--otlp needs the OpenTelemetry SDK and its OTLP exporter: "
                        "pip install 'inference-tuner[otlp]'") from None  # fmt: skip


def otel_name(name: str) -> tuple[str, str, bool]:
    """A metric key's name (device part removed) -> (OpenTelemetry name, unit, is a cumulative counter)."""
    total = name.endswith("_total")
    stem = name[: -len("_total")] if total else name
    rate = stem.endswith("_per_second")
    if rate:
        stem = stem[: -len("_per_second")]
    unit = "1"
    for suffix, u in _UNITS:
        if stem.endswith(suffix):
            stem, unit = stem[: -len(suffix)], u
            break
    if rate:
        unit = f"{unit}/s"
    return f"tuner.{stem}", unit, total


def _finite(v: Any) -> float | int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**63 else float(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _number(v: Any) -> float | None:
    if type(v) in (int, float) and 0 <= v < math.inf:
        return float(v)
    return None


class _Hist:
    __slots__ = ("bounds", "counts", "max", "min", "n", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.n = 0
        self.min: float | None = None
        self.max: float | None = None

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.n += 1
        if self.min is None or v < self.min:
            self.min = v
        if self.max is None or v > self.max:
            self.max = v

    def merge(self, counts: list[int], total: float) -> None:
        """Bucket counts made elsewhere with the same bounds (the proxy's chunk gaps); min and max are then
        unknown."""
        for i, c in enumerate(counts):
            self.counts[i] += c
        self.n += sum(counts)
        self.sum += total
        self.min = self.max = None

    def copy(self) -> _Hist:
        h = _Hist.__new__(_Hist)
        h.bounds, h.counts, h.sum, h.n, h.min, h.max = self.bounds, list(self.counts), self.sum, self.n, self.min, \
            self.max  # fmt: skip
        return h


_Key = tuple[_Spec, tuple[tuple[str, Any], ...]]


class _OneLine(logging.Handler):
    """The SDK's log records (a failed export, its retries) as one line each to the owner, never a traceback."""

    def __init__(self, owner: OtlpExporter) -> None:
        super().__init__(logging.WARNING)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        self.owner._sdk_said((msg.splitlines() or [""])[0][:300])


class OtlpExporter:
    """Sends the session to an OTLP/HTTP collector from a background thread until ``close()``.  The same
    five methods as ``PrometheusExporter`` (``update``, ``count_tick``, ``count_skipped``, ``count_event``,
    ``close``) plus ``trace_line`` (a ``TraceWriter`` line listener: the actions)."""

    def __init__(
        self,
        url: str,
        header: Mapping[str, Any] | None = None,
        *,
        log: Callable[[str], None] | None = None,
        interval_s: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        check_available()
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        env = os.environ if environ is None else environ
        self.url = url
        self.metrics_url, self.logs_url = endpoints(url)
        self._log = log or (lambda msg: None)
        hdr = dict(header or {})
        self.latest_only = "gen_ai_latest_experimental" in [
            s.strip() for s in env.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")
        ]
        if interval_s is None:
            try:
                interval_s = float(env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")) / 1000
            except ValueError:
                interval_s = 60.0
        self.interval_s = interval_s if math.isfinite(interval_s) and interval_s > 0 else 60.0
        proxy = hdr.get("proxy")
        self.client_mode = isinstance(proxy, Mapping)
        self._server: dict[str, Any] = {}
        if self.client_mode:
            assert isinstance(proxy, Mapping)
            try:
                up = urlsplit(str(proxy.get("upstream") or ""))
                if up.hostname:
                    self._server = {"server.address": up.hostname,
                                    "server.port": up.port or (443 if up.scheme == "https" else 80)}  # fmt: skip
            except ValueError:
                pass
        started = hdr.get("started_unix")
        self._t0_unix = float(started) if isinstance(started, (int, float)) else time.time()
        self._start_ns = int(self._t0_unix * 1e9)
        self._models: set[str] = set()

        # OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME name the replica: Resource.create lets the attributes
        # given here win over them, so only what they leave out is filled in (a fleet sets service.instance.id
        # to the pod's name: it becomes the series' instance label in Prometheus, stable across restarts)
        given = {kv.split("=", 1)[0].strip() for kv in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",") if "=" in kv}
        defaults = {"service.version": __version__, "service.instance.id": str(uuid.uuid4()),
                    "host.name": socket.gethostname()}  # fmt: skip
        attrs: dict[str, Any] = {k: v for k, v in defaults.items() if k not in given}
        if "service.name" not in given and not env.get("OTEL_SERVICE_NAME"):
            attrs["service.name"] = "inference-tuner"
        self.resource = Resource.create(attrs, schema_url=SCHEMA_URL)
        self.scope = InstrumentationScope(SCOPE, __version__, SCHEMA_URL)

        self._lock = threading.Lock()
        self._values: Mapping[str, Any] = {}
        self._procs: Mapping[int, Mapping[str, Any]] = {}
        self._ticks = 0
        self._skipped = 0
        self._events: dict[str, int] = {}
        self._hists: dict[_Key, _Hist] = {}
        self._pending: deque[bytes] = deque()
        self.dropped_logs = 0
        self.failures = {"metrics": 0, "logs": 0}
        self.exports = {"metrics": 0, "logs": 0}
        self._failed_since_said = 0
        self._said_at = -math.inf
        self._failing = False

        self._handler = _OneLine(self)
        otel_logger = logging.getLogger("opentelemetry")
        self._saved = (otel_logger.propagate, otel_logger.level)
        otel_logger.addHandler(self._handler)
        otel_logger.propagate = False  # no traceback, nothing from the SDK printed as it likes
        if otel_logger.level == logging.NOTSET or otel_logger.level > logging.WARNING:
            otel_logger.setLevel(logging.WARNING)

        self._metric_exporter = OTLPMetricExporter(endpoint=self.metrics_url)
        self._log_exporter = OTLPLogExporter(endpoint=self.logs_url)
        self._wake = threading.Event()
        self._stop = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tuner-otlp", daemon=True)
        self._thread.start()

    # -- the sampler thread ------------------------------------------------------------------------------
    def update(self, values: Mapping[str, Any], procs: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        """The latest tick (kept by reference: the sampler makes new dicts every tick)."""
        self._values, self._procs = values, procs or {}

    def count_tick(self) -> None:
        with self._lock:
            self._ticks += 1

    def count_skipped(self, n: int) -> None:
        with self._lock:
            self._skipped += int(n)

    def count_event(self, kind: str, data: Mapping[str, Any] | None = None) -> None:
        """Count an event; a finished (``request``) or failed (``request_error``) request is one observation
        of each GenAI histogram it has a value for."""
        obs: list[tuple[_Key, float]] = []
        merge: tuple[_Key, list[int], float] | None = None
        if kind in ("request", "request_error") and isinstance(data, Mapping):
            obs, merge = self._observations(kind, data)
        with self._lock:
            self._events[kind] = self._events.get(kind, 0) + 1
            for key, v in obs:
                h = self._hists.get(key)
                if h is None:
                    h = self._hists[key] = _Hist(key[0][3])
                h.observe(v)
            if merge is not None:
                key, counts, total = merge
                h = self._hists.get(key)
                if h is None:
                    h = self._hists[key] = _Hist(key[0][3])
                h.merge(counts, total)

    def trace_line(self, line: bytes, kind: str) -> None:
        """A ``TraceWriter`` line listener: an action's line waits (bounded) to go out as a log record."""
        if kind != "action":
            return
        if len(self._pending) >= MAX_PENDING_LOGS:
            self.dropped_logs += 1
            return
        self._pending.append(line)
        self._wake.set()

    def _attrs(self, data: Mapping[str, Any]) -> dict[str, Any]:
        op = data.get("operation")
        out: dict[str, Any] = {"gen_ai.operation.name": op if isinstance(op, str) and op else (
            "chat" if self.client_mode else "text_completion")}  # fmt: skip
        if self.client_mode:
            engine = data.get("engine")
            provider = _PROVIDERS.get(engine, "openai") if isinstance(engine, str) else "openai"
        else:
            provider = "local"
        out["gen_ai.provider.name"] = provider
        if not self.latest_only:
            out["gen_ai.system"] = provider
        model = data.get("model")
        if isinstance(model, str) and model:
            if model not in self._models and len(self._models) >= MAX_MODELS:
                model = "_OTHER"
            else:
                self._models.add(model)
            out["gen_ai.request.model"] = model
        out.update(self._server)
        return out

    def _observations(
        self, kind: str, data: Mapping[str, Any]
    ) -> tuple[list[tuple[_Key, float]], tuple[_Key, list[int], float] | None]:
        attrs = self._attrs(data)
        base = tuple(sorted(attrs.items()))
        error: str | None = None
        if kind == "request_error":
            error = str(data.get("error") or "_OTHER")
        elif isinstance(data.get("aborted"), str):
            error = _ABORTED.get(data["aborted"], "_OTHER")
        with_error = tuple(sorted({**attrs, "error.type": error}.items())) if error else base
        obs: list[tuple[_Key, float]] = []
        merge: tuple[_Key, list[int], float] | None = None
        e2e = _number(data.get("e2e_seconds"))
        if e2e is not None:
            obs.append(((CLIENT_DURATION if self.client_mode else SERVER_DURATION, with_error), e2e))
        if kind == "request_error":
            return obs, None
        ttft, tpot = _number(data.get("ttft_seconds")), _number(data.get("tpot_seconds"))
        if self.client_mode:
            if data.get("stream") is True:
                if ttft is not None:
                    obs.append(((CLIENT_TTFC, base), ttft))
                gaps = data.get("chunk_gaps")
                if isinstance(gaps, Mapping):
                    counts, total = gaps.get("counts"), _number(gaps.get("sum"))
                    if isinstance(counts, list) and len(counts) == len(DURATION_BUCKETS) + 1 and total is not None \
                            and all(type(c) is int and c >= 0 for c in counts):  # fmt: skip
                        merge = ((CLIENT_TPOC, base), counts, total)
        elif error is None:
            if ttft is not None:
                obs.append(((SERVER_TTFT, base), ttft))
            if tpot is not None:
                obs.append(((SERVER_TPOT, base), tpot))
        for field, ttype in (("prompt_tokens", "input"), ("tokens", "output")):
            n = _number(data.get(field))
            if n is not None:
                obs.append(((TOKEN_USAGE, tuple(sorted({**attrs, "gen_ai.token.type": ttype}.items()))), n))
        return obs, merge

    # -- the export thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        next_metrics = time.monotonic() + self.interval_s
        last_logs = -math.inf
        while True:
            now = time.monotonic()
            wait = next_metrics - now
            if self._pending:
                wait = min(wait, last_logs + 1.0 - now)
            self._wake.wait(max(0.0, wait))
            self._wake.clear()
            now = time.monotonic()
            if self._stop:
                self._export_logs()
                self._export_metrics()
                return
            if self._pending and now - last_logs >= 1.0:  # actions go out within a second, batched
                last_logs = now
                self._export_logs()
            if now >= next_metrics:
                self._export_metrics()
                next_metrics += self.interval_s * max(1, math.ceil((now - next_metrics) / self.interval_s))

    def _export_metrics(self) -> None:
        try:
            data = self.collect()
            ok = self._metric_exporter.export(data).name == "SUCCESS"
        except Exception as exc:  # an encoding problem or a bug: said in one line, never a traceback
            self._sdk_said(f"{type(exc).__name__}: {exc}")
            ok = False
        self._result("metrics", ok)

    def _export_logs(self) -> None:
        lines: list[bytes] = []
        while self._pending:
            lines.append(self._pending.popleft())
        if not lines:
            return
        try:
            batch = [self._log_record(orjson.loads(ln)) for ln in lines]
            ok = self._log_exporter.export(batch).name == "SUCCESS"
        except Exception as exc:
            self._sdk_said(f"{type(exc).__name__}: {exc}")
            ok = False
        if not ok:
            self.dropped_logs += len(lines)  # logs are not cumulative: a failed batch is lost
        self._result("logs", ok)

    def _result(self, signal: str, ok: bool) -> None:
        if ok:
            self.exports[signal] += 1
            if self._failing:
                self._failing = False
                self._log(f"OTLP export to {self.url} works again")
        else:
            self.failures[signal] += 1
            self._failing = True

    def _sdk_said(self, msg: str) -> None:
        """What the SDK logged (or an export that raised): one line, at most once a ``LOG_EVERY_S``."""
        self._failed_since_said += 1
        now = time.monotonic()
        if now - self._said_at >= LOG_EVERY_S:
            more = f" ({self._failed_since_said - 1} more since)" if self._failed_since_said > 1 else ""
            self._log(f"OTLP export to {self.url}: {msg}{more}; sampling and recording go on")
            self._said_at = now
            self._failed_since_said = 0

    def _log_record(self, rec: Mapping[str, Any]) -> Any:
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.sdk._logs import ReadableLogRecord

        outcome = str(rec.get("outcome"))
        bad = outcome in ("failed", "refused", "rejected", "rejected by upstream", "not supported")
        t = rec.get("t")
        ts = int((self._t0_unix + float(t)) * 1e9) if isinstance(t, (int, float)) else time.time_ns()
        attrs: dict[str, Any] = {"tuner.policy": str(rec.get("policy")), "tuner.knob": str(rec.get("knob")),
                                 "tuner.outcome": outcome}  # fmt: skip
        for key in ("value", "previous"):
            v = _scalar(rec.get(key))
            if v is not None:
                attrs[f"tuner.{key}"] = v
        body = {k: _any_value(rec.get(k)) for k in ("policy", "knob", "value", "previous", "outcome", "reason",
                                                    "evidence", "result")}  # fmt: skip
        record = LogRecord(
            timestamp=ts,
            observed_timestamp=time.time_ns(),
            severity_number=SeverityNumber.WARN if bad else SeverityNumber.INFO,
            severity_text="WARN" if bad else "INFO",
            body=body,
            attributes=attrs,
            event_name="tuner.policy.action",
        )
        return ReadableLogRecord(log_record=record, resource=self.resource, instrumentation_scope=self.scope)

    def collect(self) -> Any:
        """The metrics as they stand now (``MetricsData``), cumulative since the session's start."""
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Gauge,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )

        with self._lock:
            values, procs = self._values, self._procs
            ticks, skipped, events = self._ticks, self._skipped, dict(self._events)
            hists = {k: h.copy() for k, h in self._hists.items()}
        now = time.time_ns()
        start = self._start_ns
        cum = AggregationTemporality.CUMULATIVE
        # name -> (unit, is counter, description, [(attributes, value)])
        series: dict[str, tuple[str, bool, str, list[tuple[dict[str, Any], float | int]]]] = {}

        def add(name: str, unit: str, counter: bool, desc: str, attrs: dict[str, Any], v: float | int) -> None:
            entry = series.get(name)
            if entry is not None and (entry[0], entry[1]) != (unit, counter):  # two keys, one name: keep both
                name = name + ("_total" if counter else "_value")
                entry = series.get(name)
            if entry is None:
                entry = series[name] = (unit, counter, desc, [])
            entry[3].append((attrs, v))

        names = {split_key(k)[0] for k in values}
        for key, raw in list(values.items()):
            v = _finite(raw)
            if v is None:
                continue
            name, dev = split_key(key)
            if name in LEFT_OUT or any(q in name for q in _QUANTILE_MARK):
                continue
            if name.endswith("_per_second") and name.removesuffix("_per_second") + "_total" in names:
                continue
            oname, unit, counter = otel_name(name)
            labels: dict[str, Any] = {} if dev is None else {f"tuner.{LABEL_NAMES.get(name, 'device')}": dev}
            add(oname, unit, counter, f"{name} (latest tick)" if not counter else name, labels, v)
        for pid, fields in list(procs.items()):
            pname = str(fields.get("name", ""))
            for fld, raw in list(fields.items()):
                name, dev = split_key(fld)
                if name in PROC_LEFT_OUT:
                    continue
                v = _finite(raw)
                if v is None:
                    continue
                oname, unit, counter = otel_name(name)
                attrs: dict[str, Any] = {"process.pid": int(pid), "process.executable.name": pname}
                if dev is not None:
                    attrs["tuner.device"] = dev
                add("tuner.process." + oname[len("tuner."):], unit, counter, f"per-process {name}", attrs, v)
        add("tuner.ticks", "1", True, "ticks sampled", {}, ticks)
        add("tuner.skipped_ticks", "1", True, "ticks missed because the sampler was late", {}, skipped)
        for kind, n in sorted(events.items()):
            add("tuner.events", "1", True, "trace events by kind", {"tuner.event.kind": kind}, n)
        for signal in ("metrics", "logs"):
            add("tuner.otlp.failures", "1", True, "failed OTLP exports", {"tuner.signal": signal},
                self.failures[signal])
        add("tuner.otlp.dropped", "1", True, "policy actions not exported (queue full or export failed)",
            {"tuner.signal": "logs"}, self.dropped_logs)

        metrics: list[Any] = []
        for name, (unit, counter, desc, points) in series.items():
            dps = [NumberDataPoint(attributes=a, start_time_unix_nano=start if counter else 0, time_unix_nano=now,
                                   value=v) for a, v in points]  # fmt: skip
            data = Sum(data_points=dps, aggregation_temporality=cum, is_monotonic=True) if counter else \
                Gauge(data_points=dps)  # fmt: skip
            metrics.append(Metric(name=name, description=desc, unit=unit, data=data))
        by_spec: dict[_Spec, list[Any]] = {}
        for (spec, attrs_t), h in hists.items():
            by_spec.setdefault(spec, []).append(HistogramDataPoint(
                attributes=dict(attrs_t), start_time_unix_nano=start, time_unix_nano=now, count=h.n, sum=h.sum,
                bucket_counts=list(h.counts), explicit_bounds=list(spec[3]),
                min=h.min, max=h.max))  # type: ignore[arg-type]  # fmt: skip  (None: unknown, left unset)
        for spec, hdps in by_spec.items():
            metrics.append(Metric(name=spec[0], description=spec[2], unit=spec[1],
                                  data=Histogram(data_points=hdps, aggregation_temporality=cum)))  # fmt: skip
        scope_metrics = ScopeMetrics(scope=self.scope, metrics=metrics, schema_url=SCHEMA_URL)
        return MetricsData(resource_metrics=[ResourceMetrics(resource=self.resource, scope_metrics=[scope_metrics],
                                                             schema_url=SCHEMA_URL)])  # fmt: skip

    def close(self) -> None:
        """One last export (metrics and the actions still waiting), for at most ``CLOSE_WAIT_S``; then stop."""
        if self._closed:
            return
        self._closed = True
        self._stop = True
        self._wake.set()
        self._thread.join(CLOSE_WAIT_S)
        left_behind = self._thread.is_alive()
        if left_behind:
            self._log(f"OTLP export to {self.url}: the last export did not finish in {CLOSE_WAIT_S:g} s; "
                      "left behind")  # fmt: skip
        for exp in (self._metric_exporter, self._log_exporter):
            try:
                exp.shutdown()
            except Exception:
                pass
        if left_behind:  # its retry still logs ("Shutdown in progress, aborting retry."): keep that on our route
            return
        otel_logger = logging.getLogger("opentelemetry")
        otel_logger.removeHandler(self._handler)
        otel_logger.propagate, level = self._saved
        otel_logger.setLevel(level)


def _scalar(v: Any) -> str | bool | int | float | None:
    if isinstance(v, (str, bool)):
        return v
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**63 else float(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


def _any_value(v: Any) -> Any:
    """A JSON value as an OTLP AnyValue can hold it (ints beyond 64 bits as floats, non-finite floats as None)."""
    if isinstance(v, Mapping):
        return {str(k): _any_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_any_value(x) for x in v]
    if v is None or isinstance(v, str):
        return v
    return _scalar(v)
