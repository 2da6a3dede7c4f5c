"""Convert a trace to CSV, Parquet or Perfetto (Chrome trace-event JSON).

- CSV: one row per tick; ``t`` then the metric keys sorted; an empty cell where a value is missing.
- Parquet (pyarrow): ``OUT`` holds the ticks (``t`` + one float64 column per metric, nulls where missing);
  ``OUT.events.parquet`` (next to it: ``<stem>.events.parquet``) holds events, actions and notes as rows
  ``t, k, kind, data`` where ``data`` is the record's JSON.
- Perfetto: ``{"traceEvents": [...], "displayTimeUnit": "ms"}`` that ui.perfetto.dev and
  chrome://tracing open.  Counters (``"ph":"C"``) grouped into one track per metric name with one series
  per device; requests as complete slices (``"ph":"X"``, from start to end, TTFT and tokens in ``args``) on
  one thread per concurrent lane so overlapping requests do not nest wrongly; actions and notes as instants
  (``"ph":"i"``); each watched process's own values (RSS, CPU) as counters on a track named after it;
  process and thread names as metadata (``"ph":"M"``).  ``ts`` is in microseconds.
"""

from __future__ import annotations

import csv
import heapq
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tuner.errors import UserError
from tuner.records import split_key
from tuner.trace import TraceData

FORMATS = ("csv", "parquet", "perfetto")

PID_TUNER = 1
"""Perfetto process that holds the tuner's own tracks (counters, requests, actions)."""
TID_COUNTERS, TID_ACTIONS, TID_NOTES, TID_REQUESTS = 1, 2, 3, 100


def export(data: TraceData, fmt: str, out: str | Path) -> list[Path]:
    """Write ``data`` as ``fmt`` to ``out``; returns the files written.  Raises ``UserError`` (one line)."""
    path = Path(out)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            return [write_csv(data, path)]
        if fmt == "parquet":
            return write_parquet(data, path)
        return [write_perfetto(data, path)]
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return ""
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def write_csv(data: TraceData, path: Path) -> Path:
    keys = sorted(data.columns)
    cols = [np.asarray(data.columns[k], dtype=np.float64) for k in keys]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["t", *keys])
        for i, t in enumerate(np.asarray(data.times, dtype=np.float64)):
            w.writerow([_fmt(float(t)), *(_fmt(float(c[i])) for c in cols)])
    return path


def events_path(path: Path) -> Path:
    """``run.parquet`` -> ``run.events.parquet``."""
    stem = path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.name
    return path.with_name(stem + ".events.parquet")


def write_parquet(data: TraceData, path: Path) -> list[Path]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet export needs pyarrow: pip install 'inference-tuner[export]'") from None
    keys = sorted(data.columns)
    arrays = {"t": pa.array(np.asarray(data.times, dtype=np.float64))}
    for k in keys:
        col = np.asarray(data.columns[k], dtype=np.float64)
        arrays[k] = pa.array(col, mask=~np.isfinite(col))
    pq.write_table(pa.table(arrays), path)

    rows: list[tuple[float, str, str, str]] = []
    for e in data.events:
        rows.append((e.t, "event", e.kind, json.dumps(dict(e.data), default=str)))
    for a in data.actions:
        rest = {k: v for k, v in a.items() if k not in ("k", "t")}
        rows.append((float(a.get("t", 0.0)), "action", str(a.get("knob")), json.dumps(rest, default=str)))
    for n in data.notes:
        rest = {k: v for k, v in n.items() if k not in ("k", "t")}
        rows.append((float(n.get("t", 0.0)), "note", str(n.get("level")), json.dumps(rest, default=str)))
    rows.sort(key=lambda r: r[0])
    schema = pa.schema([("t", pa.float64()), ("k", pa.string()), ("kind", pa.string()), ("data", pa.string())])
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(schema.names)}, schema=schema)
    ev = events_path(path)
    pq.write_table(table, ev)
    return [path, ev]


# -- Perfetto ---------------------------------------------------------------------------------------


def _us(t: float) -> float:
    return round(t * 1e6, 3)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _counter_events(data: TraceData) -> Iterable[dict[str, Any]]:
    """One counter track per metric name; devices (``gpu_util_ratio/0``, ``/1``) are series of that track."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(data.columns):
        name, dev = split_key(key)
        groups.setdefault(name, []).append((key, dev if dev is not None else "value"))
    times = np.asarray(data.times, dtype=np.float64)
    for name, members in groups.items():
        cols = [(series, np.asarray(data.columns[key], dtype=np.float64)) for key, series in members]
        for i, t in enumerate(times):
            args = {series: float(c[i]) for series, c in cols if math.isfinite(c[i])}
            if args:
                yield {
                    "ph": "C",
                    "name": name,
                    "ts": _us(float(t)),
                    "pid": PID_TUNER,
                    "tid": TID_COUNTERS,
                    "args": args,
                }


def _process_events(data: TraceData) -> Iterable[dict[str, Any]]:
    """Per-process counters (RSS, CPU, ...) on each watched process's own track, named after it."""
    named: set[int] = set()
    for t, procs in data.procs:
        if not isinstance(procs, dict):
            continue
        for pid_s, fields in procs.items():
            try:
                pid = int(pid_s)
            except ValueError:
                continue
            if pid == PID_TUNER or not isinstance(fields, dict):
                continue  # pid 1 would share the tuner's own track
            if pid not in named:
                named.add(pid)
                yield {"ph": "M", "name": "process_name", "ts": 0, "pid": pid, "tid": 0,
                       "args": {"name": f"{fields.get('name', 'process')} ({pid})"}}  # fmt: skip
            for fld, v in fields.items():
                num = _num(v)
                if num is not None and fld not in ("pid", "ppid"):  # ids are not measurements
                    yield {"ph": "C", "name": fld, "ts": _us(t), "pid": pid, "tid": 0, "args": {"value": num}}


def _request_events(data: TraceData) -> tuple[list[dict[str, Any]], int]:
    """Requests as complete slices, each on the first free lane (thread) so concurrent requests show side
    by side.  Returns the events and the number of lanes used."""
    reqs = []
    for e in data.requests():
        d = e.data if isinstance(e.data, dict) else {}
        e2e = _num(d.get("e2e_seconds"))
        dur = max(0.0, e2e) if e2e is not None else 0.0
        start = e.t - dur
        if start < 0:  # began before the recording: clip to the trace start (ts must not be negative)
            d = {**d, "clipped_at_trace_start": True}
            start, dur = 0.0, max(0.0, e.t)
        reqs.append((start, dur, d))
    reqs.sort(key=lambda r: r[0])
    free: list[int] = []
    busy: list[tuple[float, int]] = []  # (end time, lane)
    lanes = 0
    out: list[dict[str, Any]] = []
    for start, dur, d in reqs:
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane = lanes
            lanes += 1
        heapq.heappush(busy, (start + dur, lane))
        args = {
            k: d.get(k)
            for k in (
                "id",
                "pid",
                "tokens",
                "prompt_tokens",
                "ttft_seconds",
                "tpot_seconds",
                "queue_seconds",
                "batch_size",
                "temperature",
                "precision",
                "loop",
            )
            if d.get(k) is not None
        }
        out.append(
            {
                "ph": "X",
                "name": f"request {d.get('id', '')}".strip(),
                "cat": "request",
                "ts": _us(start),
                "dur": _us(dur),
                "pid": PID_TUNER,
                "tid": TID_REQUESTS + lane,
                "args": args,
            }
        )
        ttft = _num(d.get("ttft_seconds"))
        if ttft is not None and 0 <= ttft <= dur:
            out.append(
                {
                    "ph": "i",
                    "s": "t",
                    "name": "first token",
                    "cat": "request",
                    "ts": _us(start + ttft),
                    "pid": PID_TUNER,
                    "tid": TID_REQUESTS + lane,
                }
            )
    return out, lanes


def perfetto_events(data: TraceData) -> list[dict[str, Any]]:
    cmd = data.header.get("command")
    title = " ".join(str(c) for c in cmd) if isinstance(cmd, list) else f"pid {data.header.get('pid')}"
    evs: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "ts": 0, "pid": PID_TUNER, "tid": 0, "args": {"name": f"tuner: {title}"}},
        {"ph": "M", "name": "thread_name", "ts": 0, "pid": PID_TUNER, "tid": TID_COUNTERS, "args": {"name": "metrics"}},
        {"ph": "M", "name": "thread_name", "ts": 0, "pid": PID_TUNER, "tid": TID_ACTIONS, "args": {"name": "actions"}},
        {"ph": "M", "name": "thread_name", "ts": 0, "pid": PID_TUNER, "tid": TID_NOTES, "args": {"name": "notes"}},
    ]
    evs.extend(_counter_events(data))
    evs.extend(_process_events(data))
    reqs, lanes = _request_events(data)
    for lane in range(lanes):
        evs.append(
            {
                "ph": "M",
                "name": "thread_name",
                "ts": 0,
                "pid": PID_TUNER,
                "tid": TID_REQUESTS + lane,
                "args": {"name": f"requests {lane + 1}"},
            }
        )
    evs.extend(reqs)
    for a in data.actions:
        t = _num(a.get("t")) or 0.0
        evs.append(
            {
                "ph": "i",
                "s": "p",
                "name": f"{a.get('knob')} -> {a.get('value')}",
                "cat": "action",
                "ts": _us(t),
                "pid": PID_TUNER,
                "tid": TID_ACTIONS,
                "args": {k: a.get(k) for k in ("policy", "knob", "value", "previous", "outcome", "reason")},
            }
        )
    for n in data.notes:
        t = _num(n.get("t")) or 0.0
        evs.append(
            {
                "ph": "i",
                "s": "t",
                "name": str(n.get("msg", "")),
                "cat": f"note.{n.get('level')}",
                "ts": _us(t),
                "pid": PID_TUNER,
                "tid": TID_NOTES,
                "args": {"level": n.get("level")},
            }
        )
    for e in data.events:
        if e.kind == "request":
            continue
        evs.append(
            {
                "ph": "i",
                "s": "p",
                "name": e.kind,
                "cat": "event",
                "ts": _us(e.t),
                "pid": PID_TUNER,
                "tid": TID_NOTES,
                "args": dict(e.data) if isinstance(e.data, dict) else {},
            }
        )
    return evs


def write_perfetto(data: TraceData, path: Path) -> Path:
    doc = {
        "traceEvents": perfetto_events(data),
        "displayTimeUnit": "ms",
        "metadata": {
            "tool": "inference-tuner",
            "started_unix": data.header.get("started_unix"),
            "host": data.header.get("host"),
        },
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"), default=str, allow_nan=False)
    return path
