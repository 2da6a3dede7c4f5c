"""``--prometheus ADDR``: serve the latest tick at ``/metrics`` for a Prometheus server to scrape.

Built on prometheus-client with its own ``CollectorRegistry`` (nothing global, no process/platform
collectors mixed in) and a custom collector that renders the latest tick on each scrape, so the sampler
thread only swaps one reference per tick and never waits on a scrape.

Naming (Prometheus conventions; ``docs/conventions.md`` for the keys):

- a metric key ``<name>`` -> gauge ``tuner_<name>`` with the unit suffix kept (``tuner_tree_rss_bytes``);
  ``<name>/<device>`` -> ``tuner_<name>{device="<device>"}`` (``tuner_gpu_util_ratio{device="0"}``);
- per-process values ``procs[pid][field]`` -> ``tuner_process_<field>{pid="...",name="..."}``
  (``tuner_process_rss_bytes``);
- counters: ``tuner_ticks_total``, ``tuner_skipped_ticks_total``, ``tuner_events_total{kind}``.

A missing value (None) is left out of the scrape rather than exported as NaN.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from tuner.errors import UserError
from tuner.records import split_key

PREFIX = "tuner_"
_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(name: str) -> str:
    """``gpu_util_ratio`` -> ``tuner_gpu_util_ratio`` (anything outside ``[a-zA-Z0-9_]`` becomes ``_``)."""
    return PREFIX + _BAD_CHARS.sub("_", name)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--prometheus: cannot resolve host {host!r}") from None
    addrs = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def parse_listen(text: str, public: bool) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (= 127.0.0.1) -> ``(host, port)``.

    A host that is not loopback is refused unless ``public`` (``--prometheus-public``): ``/metrics`` shows
    command lines' process names and memory figures to anyone who can reach the port.
    """
    s = text.strip()
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UserError(f"--prometheus {text!r}: expected [IPV6]:PORT, e.g. [::1]:9464")
        port_s = rest[1:]
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            raise UserError(f"--prometheus {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
        if ":" in host:
            raise UserError(f"--prometheus {text!r}: put an IPv6 address in brackets, e.g. [::1]:9464")
    if not port_s.isdigit() or not (1 <= int(port_s) <= 65535):
        raise UserError(f"--prometheus {text!r}: port must be a number from 1 to 65535")
    host = host or "127.0.0.1"
    if not public and not _is_loopback(host):
        raise UserError(
            f"--prometheus {text!r}: {host} is not a loopback address; add --prometheus-public to serve "
            "metrics beyond this machine"
        )
    return host, int(port_s)


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


class TunerCollector:
    """Renders the latest snapshot and the counters at scrape time (prometheus-client custom collector)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = _Snapshot({}, None)
        self._ticks = 0
        self._skipped = 0
        self._events: dict[str, int] = {}

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

    def count_event(self, kind: str) -> None:
        with self._lock:
            self._events[kind] = self._events.get(kind, 0) + 1

    # -- reader (the HTTP thread) --------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            snap, ticks, skipped, events = self._snap, self._ticks, self._skipped, dict(self._events)

        plain: dict[str, float] = {}
        by_device: dict[str, list[tuple[str, float]]] = {}
        for key, raw in snap.values.items():
            v = _finite(raw)
            if v is None:
                continue
            name, dev = split_key(key)
            if dev is None:
                plain[metric_name(name)] = v
            else:
                by_device.setdefault(metric_name(name), []).append((dev, v))
        for name, v in sorted(plain.items()):
            if name in by_device:  # a key both with and without a device: keep the labelled family
                by_device[name].append(("", v))
                continue
            yield GaugeMetricFamily(name, f"{name[len(PREFIX) :]} (latest tick)", value=v)
        for name, devs in sorted(by_device.items()):
            g = GaugeMetricFamily(name, f"{name[len(PREFIX) :]} per device (latest tick)", labels=["device"])
            for dev, v in devs:
                g.add_metric([dev], v)
            yield g

        per_field: dict[str, GaugeMetricFamily] = {}
        for pid, fields in sorted(snap.procs.items()):
            pname = str(fields.get("name", ""))
            for fld, raw in fields.items():
                if fld in ("name", "pid", "ppid"):  # labels and ids, not measurements
                    continue
                v = _finite(raw)
                if v is None:
                    continue
                mname = metric_name(f"process_{fld}")
                fam = per_field.get(mname)
                if fam is None:
                    fam = per_field[mname] = GaugeMetricFamily(
                        mname, f"per-process {fld} in the watched tree (latest tick)", labels=["pid", "name"]
                    )
                fam.add_metric([str(pid), pname], v)
        yield from per_field.values()

        yield CounterMetricFamily("tuner_ticks", "ticks sampled", value=ticks)
        yield CounterMetricFamily("tuner_skipped_ticks", "ticks missed because the sampler was late", value=skipped)
        ev = CounterMetricFamily("tuner_events", "trace events by kind", labels=["kind"])
        for kind, n in sorted(events.items()):
            ev.add_metric([kind], n)
        yield ev


class PrometheusExporter:
    """Serves ``/metrics`` on ``addr`` from a background thread until ``close()``.  Raises ``OSError`` when
    the address cannot be bound (the session turns it into a one-line error)."""

    def __init__(self, addr: tuple[str, int]) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise UserError("--prometheus needs prometheus-client: pip install 'inference-tuner[export]'") from None
        self.addr = addr
        self.collector = TunerCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)  # type: ignore[arg-type]
        host, port = addr
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_address[1])
        self._closed = False

    def update(self, values: Mapping[str, Any], procs: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        self.collector.update(values, procs)

    def count_tick(self) -> None:
        self.collector.count_tick()

    def count_skipped(self, n: int) -> None:
        self.collector.count_skipped(n)

    def count_event(self, kind: str) -> None:
        self.collector.count_event(kind)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
