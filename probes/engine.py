"""The engine probe: what the serving engine itself reports on its Prometheus ``/metrics`` page.

An engine that preallocates its KV cache (vLLM, SGLang, TGI) shows no memory pressure in process or GPU
memory; the signals are its own: KV-cache usage, requests running and waiting, preemptions, its token
counters and latency histograms.  This probe scrapes them, in one vocabulary for vLLM (current and older
names), SGLang, TGI and the llama.cpp server.

**Scraping.**  ``GET <url>`` (by default the upstream's origin + ``/metrics``) on its own cadence
(``interval``, default 1 s), in its own thread, with a timeout and a size cap; ``sample()`` only returns
the values of the last good scrape, so a slow or dead engine never delays sampling.  Values older than
``stale_after`` are ``None``, the reason in ``reasons()`` and a trace note.  A 404 (or llama.cpp's 501
"start it with ``--metrics``") stops scraping, with a one-line hint naming the flag that turns the page on.

**Parsing.**  ``prometheus_client``'s text parser, fed only the lines of the families this probe maps
(a regular expression picks them: parsing the whole 55 KB vLLM page cost ~7 ms, the picked lines ~2 ms).
Its quirks, which the mapping follows: a counter family is named without ``_total`` while its samples keep
it, and a counter declared *without* ``_total`` (TGI, llama.cpp's ``n_tokens_max``) gets ``_total`` added to
its samples; histograms come as ``_bucket`` (``le``), ``_sum``, ``_count``.  Families it does not know are
ignored.

**Vocabulary** (keys per ``docs/conventions.md``; sources per engine in ``SOURCES``):

- ``engine_kv_cache_usage_ratio`` (0..1): vLLM ``kv_cache_usage_perc`` (older ``gpu_cache_usage_perc``),
  SGLang ``token_usage``, llama.cpp ``kv_cache_usage_ratio`` (builds before May 2025), TGI: the tokens its
  running batch reserves of its token budget (``tgi_batch_current_max_tokens / tgi_batch_max_total_tokens``);
- ``engine_requests_running``, ``engine_requests_waiting``: requests in the running batch / queued;
- ``engine_preemptions_total`` (vLLM only), ``engine_generation_tokens_total``, ``engine_prompt_tokens_total``:
  the engine's counters as it prints them (a decrease means it restarted);
- ``engine_generation_tokens_per_second``, ``engine_prompt_tokens_per_second``: counter deltas between the
  last two scrapes / their interval;
- ``engine_prefix_cache_hit_ratio``: prompt tokens served from the prefix cache / prompt tokens looked up,
  over the last ``window_s``;
- ``engine_{ttft,itl,tpot,queue,e2e}_{p50,p95}_seconds``: percentiles over the last ``window_s`` from the
  histograms' bucket deltas (Prometheus' ``histogram_quantile``: linear inside a bucket, so a p95 resolves
  only to the bucket edges, e.g. 0.05-0.075 s; keep the proxy's own ``req_*`` percentiles for SLOs);
  ``itl`` = inter-token latency (vLLM ``inter_token_latency_seconds``, older ``time_per_output_token_seconds``),
  ``tpot`` = a request's mean time per output token (TGI's includes the prefill);
  ``engine_ttft_mean_seconds``, ``engine_itl_mean_seconds``: ``_sum`` delta / ``_count`` delta (llama.cpp:
  its decode seconds / tokens predicted);
- ``engine_scrape_seconds``: how long the last scrape took (fetch and parse).

Counter deltas survive restarts: a counter that went down restarted from zero, so its new value is what it
counted since (Prometheus' ``rate()`` rule); a histogram whose count or buckets went down, or whose bucket
edges changed, likewise; a new process start time (llama.cpp's ``Process-Start-Time-Unix`` header, the
page's ``process_start_time_seconds``: vLLM) resets them all, since a new process may already have counted
past the old one's values.  A restart is a trace note.

**Devices.**  vLLM labels every series with ``model_name`` and ``engine`` (the engine index), SGLang with
``model_name`` (and ``dp_rank`` with data parallelism).  The keys above are over the whole server (sums;
the largest KV usage).  When there are several such label sets, the gauges and token rates are also given
per set, its varying labels as the key's device part: ``engine_requests_running/llama-3``, ``.../0``.
"""

from __future__ import annotations

import http.client
import math
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tuner.records import Sample, Value, unit_of

ENGINES: dict[str, str] = {"vllm": "vLLM", "sglang": "SGLang", "tgi": "TGI", "llamacpp": "llama.cpp"}
PREFIXES: tuple[tuple[str, str], ...] = (("vllm:", "vllm"), ("sglang:", "sglang"), ("tgi_", "tgi"),
                                        ("llamacpp:", "llamacpp"))
FLAG_HINT = "llama.cpp serves it with --metrics, SGLang with --enable-metrics; vLLM and TGI by default"
DEVICE_LABELS: tuple[str, ...] = ("model_name", "engine", "dp_rank")
MAX_BYTES = 8 << 20
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p95", 0.95))
HISTOGRAMS: tuple[str, ...] = ("ttft", "itl", "tpot", "queue", "e2e")
MEANS: tuple[str, ...] = ("ttft", "itl")

GAUGE_KEYS: dict[str, str] = {
    "kv": "engine_kv_cache_usage_ratio",
    "running": "engine_requests_running",
    "waiting": "engine_requests_waiting",
}
COUNTER_KEYS: dict[str, str] = {
    "preempt": "engine_preemptions_total",
    "gen": "engine_generation_tokens_total",
    "prompt": "engine_prompt_tokens_total",
}
RATE_KEYS: dict[str, str] = {"gen": "engine_generation_tokens_per_second", "prompt": "engine_prompt_tokens_per_second"}
PREFIX_KEY = "engine_prefix_cache_hit_ratio"
SCRAPE_KEY = "engine_scrape_seconds"


def _hist_keys() -> list[str]:
    out = []
    for h in HISTOGRAMS:
        out += [f"engine_{h}_{q}_seconds" for q, _ in QUANTILES]
        if h in MEANS:
            out.append(f"engine_{h}_mean_seconds")
    return out


KEYS: tuple[str, ...] = (*GAUGE_KEYS.values(), *COUNTER_KEYS.values(), *RATE_KEYS.values(), PREFIX_KEY,
                         *_hist_keys(), SCRAPE_KEY)
PER_DEVICE: tuple[str, ...] = (*GAUGE_KEYS.values(), *RATE_KEYS.values())
"""Keys also given per device (label set) when there are several."""

# Where each slot comes from, per engine: family names (as the parser names families) in order of preference.
# Slots: gauges kv/running/waiting; counters preempt/gen/prompt/hits/queries (``queries`` may be absent:
# SGLang looks up every prompt token, llama.cpp counts cached and computed prompt tokens apart); histograms
# ttft/itl/tpot/queue/e2e; special: kv_used + kv_total (TGI), itl_seconds (llama.cpp decode seconds).
SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "vllm": {  # vllm/v1/metrics/loggers.py (0.32, @005a810, @a6f0308); real capture tests/data/vllm/
        "kv": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        "preempt": ("vllm:num_preemptions",),
        "gen": ("vllm:generation_tokens",),
        "prompt": ("vllm:prompt_tokens",),
        "hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
        "queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
        "ttft": ("vllm:time_to_first_token_seconds",),
        "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        "tpot": ("vllm:request_time_per_output_token_seconds",),
        "queue": ("vllm:request_queue_time_seconds",),
        "e2e": ("vllm:e2e_request_latency_seconds",),
    },
    "sglang": {  # python/sglang/srt/metrics/collector.py @93d04878
        "kv": ("sglang:token_usage",),
        "running": ("sglang:num_running_reqs",),
        "waiting": ("sglang:num_queue_reqs",),
        "gen": ("sglang:generation_tokens",),
        "prompt": ("sglang:prompt_tokens",),
        "hits": ("sglang:cached_tokens",),
        "ttft": ("sglang:time_to_first_token_seconds",),
        "itl": ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
        "queue": ("sglang:queue_time_seconds",),
        "e2e": ("sglang:e2e_request_latency_seconds",),
    },
    "tgi": {  # router/src/server.rs, backends/v3 @db931fcf (counters are histogram sums: finished requests)
        "kv_used": ("tgi_batch_current_max_tokens",),
        "kv_total": ("tgi_batch_max_total_tokens",),
        "running": ("tgi_batch_current_size",),
        "waiting": ("tgi_queue_size",),
        "gen": ("tgi_request_generated_tokens",),
        "prompt": ("tgi_request_input_length",),
        "tpot": ("tgi_request_mean_time_per_token_duration",),
        "queue": ("tgi_request_queue_duration",),
        "e2e": ("tgi_request_duration",),
    },
    "llamacpp": {  # tools/server/server-context.cpp @fb402660; kv gauge: examples/server/server.cpp @03d4bccb
        "kv": ("llamacpp:kv_cache_usage_ratio",),
        "running": ("llamacpp:requests_processing",),
        "waiting": ("llamacpp:requests_deferred",),
        "gen": ("llamacpp:tokens_predicted",),
        "prompt": ("llamacpp:prompt_tokens",),
        "hits": ("llamacpp:prompt_tokens_cached",),
        "itl_seconds": ("llamacpp:tokens_predicted_seconds",),
    },
}
SLOT_KEYS: dict[str, str] = {
    "kv": GAUGE_KEYS["kv"], "kv_used": GAUGE_KEYS["kv"], "kv_total": GAUGE_KEYS["kv"],
    "running": GAUGE_KEYS["running"], "waiting": GAUGE_KEYS["waiting"], "preempt": COUNTER_KEYS["preempt"],
    "gen": "engine_generation_tokens_total, _per_second", "prompt": "engine_prompt_tokens_total, _per_second",
    "hits": PREFIX_KEY, "queries": PREFIX_KEY, "itl_seconds": "engine_itl_mean_seconds",
    **{h: f"engine_{h}_p50/p95{'/mean' if h in MEANS else ''}_seconds" for h in HISTOGRAMS},
}
"""What each slot feeds, for ``tuner probes``."""
COUNTER_SLOTS: tuple[str, ...] = ("preempt", "gen", "prompt", "hits", "queries", "itl_seconds")
GAUGE_SLOTS: tuple[str, ...] = ("kv", "running", "waiting", "kv_used", "kv_total")

WANTED: frozenset[str] = frozenset(n for table in SOURCES.values() for names in table.values() for n in names)
_ALT = "|".join(re.escape(n) for n in sorted(WANTED, key=len, reverse=True))
_PICK = re.compile(rf"^(?:# TYPE )?(?:{_ALT})(?:_total|_bucket|_sum|_count)?(?:[ {{\t]|$).*$", re.M)
"""The lines of the mapped families: their ``# TYPE`` line and samples (``# HELP`` lines are not needed)."""
_START = re.compile(r"^process_start_time_seconds (\S+)$", re.M)


def _unsupported(engine: str) -> dict[str, str]:
    """Keys the engine does not export at all, with why."""
    have = SOURCES[engine]
    name = ENGINES[engine]
    out: dict[str, str] = {}
    if "kv" not in have and "kv_used" not in have:
        out[GAUGE_KEYS["kv"]] = f"{name} exports no KV-cache usage"
    for slot, key in COUNTER_KEYS.items():
        if slot not in have:
            out[key] = f"{name} exports no such counter"
    if "hits" not in have:
        out[PREFIX_KEY] = f"{name} exports no prefix-cache counters"
    for h in HISTOGRAMS:
        src = h in have or (h == "itl" and "itl_seconds" in have)
        for q, _ in QUANTILES:
            if h not in have:
                out[f"engine_{h}_{q}_seconds"] = f"{name} exports no such histogram"
        if h in MEANS and not src:
            out[f"engine_{h}_mean_seconds"] = f"{name} exports no such histogram"
    if engine == "llamacpp":
        out[GAUGE_KEYS["kv"]] = "llama.cpp exports KV-cache usage only in builds before May 2025 (#13660)"
    return out


# -- histograms ------------------------------------------------------------------------------------------
@dataclass
class Hist:
    """A histogram's cumulative buckets (``les`` ascending, the last ``inf``), sum and count."""

    les: tuple[float, ...]
    buckets: list[float]
    sum: float
    count: float

    def minus(self, base: Hist | None) -> Hist:
        if base is None or base.les != self.les:
            return self
        return Hist(self.les, [a - b for a, b in zip(self.buckets, base.buckets, strict=True)],
                    self.sum - base.sum, self.count - base.count)

    def plus(self, other: Hist) -> Hist:
        return Hist(self.les, [a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
                    self.sum + other.sum, self.count + other.count)

    def went_down(self, prev: Hist) -> bool:
        return (self.les != prev.les or self.count < prev.count
                or any(a < b for a, b in zip(self.buckets, prev.buckets, strict=True)))


def quantile(q: float, h: Hist) -> float | None:
    """Prometheus' ``histogram_quantile`` on cumulative buckets: linear inside the bucket the rank falls
    in (from 0 for the first bucket when its edge is positive); in the ``+Inf`` bucket, the largest finite
    edge.  None without observations."""
    total = h.buckets[-1] if h.buckets else 0.0
    if total <= 0 or len(h.les) < 2:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(h.les, h.buckets, strict=True):
        if c >= rank:
            if math.isinf(le):
                return h.les[-2]
            if c == prev_c:
                return le
            lo = prev_le if prev_le < le else le
            return lo + (le - lo) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return h.les[-2]


# -- one parsed scrape -------------------------------------------------------------------------------------
Device = tuple[str, ...]


@dataclass
class Parsed:
    """What one scrape holds, by slot and device: gauges, counters (raw), histograms; and which families."""

    engine: str | None
    gauges: dict[str, dict[Device, float]] = field(default_factory=dict)
    counters: dict[str, dict[Device, float]] = field(default_factory=dict)
    hists: dict[str, dict[Device, Hist]] = field(default_factory=dict)
    recognised: dict[str, str] = field(default_factory=dict)
    """Family -> the slot it fed."""
    families: int = 0
    """``# TYPE`` lines on the page (all families, known or not)."""


def _device(labels: Mapping[str, str]) -> Device:
    return tuple(labels.get(k, "") for k in DEVICE_LABELS)


def _engine_of(name: str) -> str | None:
    for prefix, engine in PREFIXES:
        if name.startswith(prefix):
            return engine
    return None


def parse(text: str) -> Parsed:
    """Map one ``/metrics`` page to slots.  Raises ``ValueError`` on text the parser rejects."""
    from prometheus_client.parser import text_string_to_metric_families

    picked = "\n".join(_PICK.findall(text))
    fams = {f.name: f for f in text_string_to_metric_families(picked)} if picked else {}
    counts: dict[str, int] = {}
    for name in fams:
        e = _engine_of(name)
        if e is not None:
            counts[e] = counts.get(e, 0) + 1
    engine = max(counts, key=lambda e: counts[e]) if counts else None
    out = Parsed(engine, families=text.count("# TYPE "))
    if engine is None:
        return out
    for slot, names in SOURCES[engine].items():
        for name in names:
            fam = fams.get(name)
            if fam is None:
                continue
            if slot in HISTOGRAMS and fam.type == "histogram":
                hs = _histograms(fam)
                if hs:
                    out.hists[slot] = hs
                    out.recognised[name] = slot
                    break
            elif slot in COUNTER_SLOTS or slot in GAUGE_SLOTS:
                vals = _values(fam)
                if vals:
                    (out.counters if slot in COUNTER_SLOTS else out.gauges)[slot] = vals
                    out.recognised[name] = slot
                    break
    return out


def _values(fam: Any) -> dict[Device, float]:
    """One number per device: a gauge's value, a counter's ``_total`` sample, a histogram's ``_sum`` (TGI's
    token counts); summed over the labels that are not a device (SGLang's ``tp_rank``, a ``pid``)."""
    name = fam.name
    wanted: tuple[str, ...]
    if fam.type == "counter":
        wanted = (name + "_total", name)
    elif fam.type == "histogram":
        wanted = (name + "_sum",)
    else:
        wanted = (name,)
    out: dict[Device, float] = {}
    for s in fam.samples:
        if s.name in wanted and math.isfinite(s.value):
            d = _device(s.labels)
            out[d] = out.get(d, 0.0) + float(s.value)
    return out


def _histograms(fam: Any) -> dict[Device, Hist]:
    name = fam.name
    parts: dict[Device, dict[str, Any]] = {}
    for s in fam.samples:
        labels = s.labels
        d = _device(labels)
        p = parts.setdefault(d, {"b": {}, "sum": 0.0, "count": 0.0})
        if s.name == name + "_bucket":
            try:
                le = float(labels.get("le", "nan"))
            except ValueError:
                continue
            if le == le:
                p["b"][le] = p["b"].get(le, 0.0) + float(s.value)
        elif s.name == name + "_sum":
            p["sum"] += float(s.value)
        elif s.name == name + "_count":
            p["count"] += float(s.value)
    out: dict[Device, Hist] = {}
    for d, p in parts.items():
        les = tuple(sorted(p["b"]))
        if not les or not math.isinf(les[-1]):
            continue
        out[d] = Hist(les, [p["b"][le] for le in les], p["sum"], p["count"])
    return out


# -- fetching --------------------------------------------------------------------------------------------
class ScrapeError(Exception):
    """A scrape that gave no page to parse (one line, shown to users)."""


class Stopped(ScrapeError):
    """The endpoint does not exist: scraping stops."""


@dataclass
class Page:
    status: int
    text: str
    headers: dict[str, str]


class Fetcher:
    """``GET url`` on one kept-alive connection (stdlib ``http.client``), bounded in time and size."""

    def __init__(self, url: str, *, timeout: float, max_bytes: int = MAX_BYTES) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{url!r}: use http://HOST:PORT/metrics")
        self.url = url
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def get(self) -> Page:
        deadline = time.monotonic() + self.timeout
        for attempt in (0, 1):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request("GET", self.target, headers={"Accept": "text/plain", "Accept-Encoding": "identity"})
                resp = conn.getresponse()
                break
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as exc:
                self.close()
                if reused and attempt == 0:
                    continue  # a kept-alive connection the server had closed: once more on a new one
                raise ScrapeError(_why(exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise ScrapeError(_why(exc)) from None
        else:  # pragma: no cover - the loop breaks or raises
            raise ScrapeError("no answer")
        headers = {k.lower(): v for k, v in resp.getheaders()}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            self.close()
            raise ScrapeError(f"answer of {int(length) >> 20} MiB is over the {self.max_bytes >> 20} MiB cap")
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ScrapeError(f"the answer took longer than {self.timeout:g} s")
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                chunk = resp.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise ScrapeError(f"answer over the {self.max_bytes >> 20} MiB cap")
                parts.append(chunk)
                if resp.length == 0:  # all of a sized answer read: read1 does not mark it done on its own
                    resp.read()
                    break
        except ScrapeError:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise ScrapeError(f"the answer took longer than {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ScrapeError(_why(exc)) from None
        if resp.will_close:
            self.close()
        body = b"".join(parts)
        return Page(resp.status, body.decode("utf-8", "replace"), headers)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{text}"


def metrics_url(upstream: str) -> str:
    """The upstream's origin + ``/metrics`` (``http://h:8000/v1`` -> ``http://h:8000/metrics``)."""
    u = urlsplit(upstream)
    return f"{u.scheme}://{u.netloc}/metrics"


def check_url(url: str) -> str:
    """A ``--engine-metrics`` URL as given, ``/metrics`` added when it has no path; ValueError if not HTTP."""
    u = urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--engine-metrics {url!r}: use http://HOST:PORT/metrics")
    try:
        _ = u.port
    except ValueError:
        raise ValueError(f"--engine-metrics {url!r}: the port must be a number") from None
    if u.path in ("", "/"):
        return f"{u.scheme}://{u.netloc}/metrics"
    return url.strip()


# -- the probe -------------------------------------------------------------------------------------------
Snapshot = dict[tuple[str, str, "Device"], Any]
"""``("c", slot, device) -> corrected cumulative value``, ``("h", slot, device) -> Hist`` (corrected)."""


class EngineProbe:
    name = "engine"

    def __init__(
        self,
        url: str,
        *,
        interval: float = 1.0,
        timeout: float = 2.0,
        stale_after: float | None = None,
        window_s: float = 10.0,
        max_bytes: int = MAX_BYTES,
        autostart: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.stale_after = stale_after if stale_after is not None else 3 * interval + timeout
        self.window_s = window_s
        self.clock = clock
        self.engine: str | None = None
        """``vllm``, ``sglang``, ``tgi`` or ``llamacpp`` once recognised on the page."""
        self.recognised: dict[str, str] = {}
        self.families = 0
        self.unsupported: dict[str, str] = {}
        self.scrapes = 0
        self.failures = 0
        self.restarts = 0
        self.error: str | None = None
        """Why the last scrape gave nothing (None after a good one)."""
        self.stopped: str | None = None
        self._reason: str | None = None
        try:
            self._fetcher: Fetcher | None = Fetcher(url, timeout=timeout, max_bytes=max_bytes)
        except ValueError as exc:
            self._fetcher = None
            self._reason = str(exc)
        self._lock = threading.Lock()
        self._scrape_lock = threading.Lock()
        self._values: dict[str, Value] = {}
        self._good_at: float | None = None
        self._notes: list[tuple[str, str]] = []
        self._state = "waiting"  # waiting | fresh | stale | stopped
        self._prev: Parsed | None = None
        self._acc: Snapshot = {}
        self._history: deque[tuple[float, Snapshot]] = deque(maxlen=max(4, int(window_s / interval) * 4 + 4))
        self._start_marker: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if autostart and self._reason is None:
            self.start()

    # -- the probe contract --------------------------------------------------------------------------
    def available(self) -> str | None:
        if self._reason is not None:
            return self._reason
        try:
            import prometheus_client.parser  # noqa: F401
        except ImportError:
            return "prometheus-client is not installed (pip install 'inference-tuner[proxy]')"
        return None

    def metrics(self) -> dict[str, str]:
        return {k: unit_of(k) for k in KEYS}

    def sample(self, now: float) -> Sample:
        """The last good scrape's values (never waits for a scrape); all None once they are stale."""
        with self._lock:
            values = self._values
            good = self._good_at
        mono = self.clock()
        if good is None or mono - good > self.stale_after or self.stopped:
            self._set_state("stopped" if self.stopped else ("waiting" if good is None else "stale"), mono)
            return Sample(self.name, now, dict.fromkeys(KEYS))
        self._set_state("fresh", mono)
        return Sample(self.name, now, dict(values))

    def take_notes(self) -> list[tuple[str, str]]:
        with self._lock:
            out, self._notes = self._notes, []
        return out

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=0.5)  # a scrape stuck in a read ends by its own timeout (daemon thread)
        if self._fetcher is not None and (t is None or not t.is_alive()):
            self._fetcher.close()

    # -- what people see -----------------------------------------------------------------------------
    def reasons(self) -> dict[str, str]:
        """Why each key of the current sample is None."""
        values = self.sample(0.0).values
        out: dict[str, str] = {}
        state = self.status()
        for k in KEYS:
            if values.get(k) is not None:
                continue
            if state is not None:
                out[k] = state
            elif k in self.unsupported:
                out[k] = self.unsupported[k]
            elif k in RATE_KEYS.values() or k == PREFIX_KEY or k.endswith(("_p50_seconds", "_p95_seconds",
                                                                         "_mean_seconds")):
                out[k] = f"nothing counted in the last {self.window_s:g} s (or one scrape so far)"
            else:
                out[k] = "not on the engine's page"
        return out

    def status(self) -> str | None:
        """None while the values are fresh; else why there are none (one line)."""
        if self._reason is not None:
            return self._reason
        if self.stopped:
            return self.stopped
        with self._lock:
            good = self._good_at
        if good is None:
            if self.error:
                return f"no engine metrics from {self.url}: {self.error}"
            return f"no scrape of {self.url} yet"
        age = self.clock() - good
        if age > self.stale_after:
            why = f" (last error: {self.error})" if self.error else ""
            return f"engine metrics stale: the last good scrape of {self.url} was {age:.1f} s ago{why}"
        return None

    def describe(self) -> dict[str, Any]:
        """What was recognised: the engine, each family's slot, the families left alone."""
        return {
            "url": self.url,
            "engine": self.engine,
            "recognised": dict(self.recognised),
            "families": self.families,
            "unsupported": dict(self.unsupported),
            "status": self.status(),
            "restarts": self.restarts,
        }

    # -- scraping ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and self._fetcher is not None:
            self._thread = threading.Thread(target=self._run, name="tuner-engine-scrape", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        start = self.clock()
        k = 0
        while not self._stop.is_set():
            self.scrape_once()
            if self.stopped:
                return
            k += 1
            now = self.clock()
            due = start + k * self.interval
            if due < now:  # a scrape longer than the interval: skip the missed turns, no bunching
                k = int((now - start) / self.interval) + 1
                due = start + k * self.interval
            if self._stop.wait(due - now):
                return

    def scrape_once(self) -> bool:
        """Fetch and parse once (the thread's turn; ``tuner probes`` and the proxy's cleanup, measuring what it
        freed, call it too: one scrape at a time).  True when good."""
        with self._scrape_lock:
            return self._scrape()

    def _scrape(self) -> bool:
        if self._fetcher is None or self.stopped:
            return False
        t0 = self.clock()
        f0 = time.perf_counter()
        try:
            page = self._fetcher.get()
        except ScrapeError as exc:
            self._failed(str(exc))
            return False
        if page.status in (404, 501):
            self.stopped = (f"{self.url} answered {page.status}: the server exports no metrics there "
                            f"({FLAG_HINT}); engine metrics not scraped")
            with self._lock:
                self._notes.append((self.stopped, "warn"))
            self._fetcher.close()
            return False
        if page.status != 200:
            self._failed(f"HTTP {page.status}")
            return False
        return self.feed(page.text, t0, page.headers, fetch_s=time.perf_counter() - f0)

    def feed(self, text: str, t: float, headers: Mapping[str, str] | None = None, fetch_s: float = 0.0) -> bool:
        """Parse one page taken at monotonic time ``t`` and publish its values.  True when it parsed."""
        start = time.perf_counter()
        try:
            parsed = parse(text)
        except Exception as exc:  # the parser raises ValueError and, on some garbage, other errors
            self._failed(f"not a Prometheus text page ({type(exc).__name__}: {str(exc)[:80]})")
            return False
        self.families = parsed.families
        if parsed.engine is None:
            self._failed(f"no vLLM, SGLang, TGI or llama.cpp metrics on the page ({parsed.families} families)")
            return False
        restarted = self._restarted(text, headers)
        values = self._values_from(parsed, t, restarted)
        values[SCRAPE_KEY] = fetch_s + time.perf_counter() - start
        new_engine = self.engine != parsed.engine
        with self._lock:
            self._values = values
            self._good_at = t
            self.error = None
            self.scrapes += 1
            if new_engine:
                self._notes.append((f"engine metrics: {ENGINES[parsed.engine]} at {self.url}, "
                                    f"{len(parsed.recognised)} of {parsed.families} families recognised", "info"))
        self.engine = parsed.engine
        self.recognised = parsed.recognised
        self.unsupported = _unsupported(parsed.engine)
        return True

    def _failed(self, why: str) -> None:
        with self._lock:
            self.error = why
            self.failures += 1
            if self.failures == 1 and self.scrapes == 0:
                self._notes.append((f"engine metrics: nothing from {self.url} yet ({why}); "
                                    f"trying every {self.interval:g} s", "info"))

    def _restarted(self, text: str, headers: Mapping[str, str] | None) -> bool:
        """A new server process: llama.cpp's ``Process-Start-Time-Unix`` header, or the page's own
        ``process_start_time_seconds`` (vLLM's API server), changed since the last scrape.  A restart cannot
        always be told from the counters: a new process that counted past the old one's values looks like
        growth (the two vLLM captures in the tests are such a pair)."""
        v = headers.get("process-start-time-unix") if headers else None
        if v is None:
            m = _START.search(text)
            v = m.group(1) if m else None
        if v is None:
            return False
        old, self._start_marker = self._start_marker, v
        return old is not None and old != v

    def _set_state(self, state: str, mono: float) -> None:
        if state == self._state:
            return
        old, self._state = self._state, state
        msg: str | None = None
        if state == "stale":
            msg = self.status()
        elif state == "fresh" and old == "stale":
            msg = f"engine metrics from {self.url} are fresh again"
        elif state == "waiting" and self.error and old != "waiting":
            msg = self.status()
        if msg:
            with self._lock:
                self._notes.append((msg, "warn" if state != "fresh" else "info"))

    # -- values --------------------------------------------------------------------------------------
    def _values_from(self, p: Parsed, t: float, restarted: bool) -> dict[str, Value]:
        """Fold one scrape into the restart-corrected cumulative counters and histograms (``_acc``) and the
        window history; returns the values to publish."""
        prev = self._prev
        if prev is not None and prev.engine != p.engine:
            prev = None  # another server answers there now: start afresh
            self._acc = {}
            self._history.clear()
        acc = dict(self._acc)
        went_down = False
        for slot, by_dev in p.counters.items():
            old = prev.counters.get(slot, {}) if prev is not None else {}
            for d, v in by_dev.items():
                o = old.get(d)
                if prev is None:
                    inc = 0.0  # the first sight: what it counted before is not this session's
                elif o is None or restarted:
                    inc = v  # new since the last scrape (or a new process): counted from zero
                elif v < o:
                    went_down, inc = True, v
                else:
                    inc = v - o
                acc[("c", slot, d)] = acc.get(("c", slot, d), 0.0) + inc
        for slot, hs in p.hists.items():
            oldh = prev.hists.get(slot, {}) if prev is not None else {}
            for d, h in hs.items():
                oh = oldh.get(d)
                key = ("h", slot, d)
                if prev is None:
                    hinc = Hist(h.les, [0.0] * len(h.les), 0.0, 0.0)
                elif oh is None or restarted:
                    hinc = h
                elif h.went_down(oh):
                    went_down, hinc = True, h
                else:
                    hinc = h.minus(oh)
                base = acc.get(key)
                acc[key] = hinc if base is None or base.les != h.les else base.plus(hinc)
        if went_down or restarted:
            self.restarts += 1
            why = "its process start time changed" if restarted else "its counters went down"
            with self._lock:
                self._notes.append((f"the engine at {self.url} restarted ({why}): rates count from its restart",
                                    "warn"))
        self._prev = p
        self._acc = acc
        self._history.append((t, acc))
        return self._compute(p, t)

    def _compute(self, p: Parsed, t: float) -> dict[str, Value]:
        v: dict[str, Value] = dict.fromkeys(KEYS)
        devices = sorted({d for by in (*p.gauges.values(), *p.counters.values()) for d in by})
        dev_names = _device_names(devices)
        # gauges
        for slot in ("running", "waiting"):
            by = p.gauges.get(slot)
            if by:
                v[GAUGE_KEYS[slot]] = float(sum(by.values()))
                if dev_names:
                    for d, x in by.items():
                        v[f"{GAUGE_KEYS[slot]}/{dev_names[d]}"] = float(x)
        kv: dict[Device, float] = dict(p.gauges.get("kv", {}))
        used, total = p.gauges.get("kv_used", {}), p.gauges.get("kv_total", {})
        for d, u in used.items():
            tot = total.get(d)
            if tot:
                kv[d] = u / tot
        if kv:
            v[GAUGE_KEYS["kv"]] = max(0.0, min(1.0, max(kv.values())))
            if dev_names:
                for d, x in kv.items():
                    v[f"{GAUGE_KEYS['kv']}/{dev_names[d]}"] = max(0.0, min(1.0, x))
        # raw counters
        for slot, key in COUNTER_KEYS.items():
            by = p.counters.get(slot)
            if by:
                v[key] = float(sum(by.values()))
        # rates: the last two scrapes
        hist = self._history
        if len(hist) >= 2:
            (t0, a0), (t1, a1) = hist[-2], hist[-1]
            dt = t1 - t0
            if dt > 0:
                for slot, key in RATE_KEYS.items():
                    if slot not in p.counters:
                        continue
                    by_dev = {d: _delta(a1, a0, ("c", slot, d)) for d in p.counters[slot]}
                    v[key] = sum(by_dev.values()) / dt
                    if dev_names:
                        for d, x in by_dev.items():
                            v[f"{key}/{dev_names[d]}"] = x / dt
        # window figures: the newest snapshot against the newest one at least window_s older (else the oldest)
        base = _window_base(hist, t - self.window_s)
        if base is not None:
            a0 = base[1]
            a1 = hist[-1][1]

            def csum(slot: str) -> float | None:
                if slot not in p.counters:
                    return None
                return sum(_delta(a1, a0, ("c", slot, d)) for d in p.counters[slot])

            hits, queries, prompt = csum("hits"), csum("queries"), csum("prompt")
            if p.engine == "sglang" and prompt is not None:
                hits, queries = hits or 0.0, prompt  # cached_tokens_total is absent until the first hit
            elif p.engine == "llamacpp" and hits is not None and prompt is not None:
                queries = hits + prompt  # prompt_tokens_total counts the computed tokens only
            if hits is not None and queries:
                v[PREFIX_KEY] = max(0.0, min(1.0, hits / queries))
            for slot in HISTOGRAMS:
                hs = p.hists.get(slot)
                if not hs:
                    continue
                merged: Hist | None = None
                for d in hs:
                    h1, h0 = a1.get(("h", slot, d)), a0.get(("h", slot, d))
                    if h1 is None:
                        continue
                    dh = h1.minus(h0)
                    merged = dh if merged is None else (merged.plus(dh) if merged.les == dh.les else merged)
                if merged is None:
                    continue
                for q, qv in QUANTILES:
                    v[f"engine_{slot}_{q}_seconds"] = quantile(qv, merged)
                if slot in MEANS and merged.count > 0:
                    v[f"engine_{slot}_mean_seconds"] = merged.sum / merged.count
            if p.engine == "llamacpp":
                secs, gen = csum("itl_seconds"), csum("gen")
                if secs is not None and gen:
                    v["engine_itl_mean_seconds"] = secs / gen
        return v


def _delta(a1: Snapshot, a0: Snapshot, key: tuple[str, str, Device]) -> float:
    return float(a1.get(key, 0.0)) - float(a0.get(key, 0.0))


def _window_base(hist: Iterable[tuple[float, Snapshot]], since: float) -> tuple[float, Snapshot] | None:
    items = list(hist)
    if len(items) < 2:
        return None
    base = items[0]
    for item in items[:-1]:
        if item[0] <= since:
            base = item
        else:
            break
    return base


def _device_names(devices: list[Device]) -> dict[Device, str]:
    """Device -> the values of its labels that differ between devices (empty with a single device)."""
    if len(devices) < 2:
        return {}
    varying = [i for i in range(len(DEVICE_LABELS)) if len({d[i] for d in devices}) > 1]
    return {d: ",".join(d[i] for i in varying) for d in devices}
