"""``tuner probes [--json]``: what was detected, one reading each, and why the others are unavailable."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from tuner.commands.attach import parse_pid
from tuner.probes.base import ProbeStatus, discover
from tuner.records import split_key, unit_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probes", help="list the probes, one reading each, and why any is unavailable")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pid", help="also read this process tree (default: this command's own process)")
    p.add_argument("--engine-metrics", metavar="URL",
                   help="also read a serving engine's Prometheus page and show what was recognised")
    p.set_defaults(func=run)


def humanize(key: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    unit = unit_of(key)
    if unit == "bytes":
        for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(v) >= div:
                return f"{v / div:.1f} {suffix}"
        return f"{v:.0f} B"
    if unit == "ratio":
        return f"{v * 100:.1f}%"
    if unit == "seconds":
        return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "celsius":
        return f"{v:.0f} °C"
    if unit == "watts":
        return f"{v:.1f} W"
    if unit == "hertz":
        return f"{v / 1e6:.0f} MHz"
    return f"{v:g}"


def read_all(pid: int, engine_url: str | None = None) -> list[dict[str, Any]]:
    probes, statuses = discover([pid])
    engine = None
    if engine_url is not None:
        from tuner.probes.engine import EngineProbe

        engine = EngineProbe(engine_url, autostart=False, timeout=5.0)
        engine.scrape_once()
    t0 = time.monotonic()
    for p in probes:  # a first reading primes the rate-based values (CPU ratio, utilization)
        try:
            p.sample(0.0)
        except Exception:
            pass
    time.sleep(0.2)
    if engine is not None:
        statuses.append(_engine_reading(engine))
        probes.append(engine)
    readings: dict[str, dict[str, Any]] = {}
    for p in probes:
        entry: dict[str, Any] = {}
        try:
            s = p.sample(time.monotonic() - t0)
            entry["values"] = dict(s.values)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        unsupported = getattr(p, "unsupported", None)
        if unsupported:
            entry["unsupported"] = dict(unsupported)
        for attr in ("summary", "describe"):  # what the probe reads (the cgroup probe: which cgroup, version)
            fn = getattr(p, attr, None)
            if fn is not None:
                try:
                    entry["detail" if attr == "describe" else "summary"] = fn()
                except Exception:
                    pass
        notes = getattr(p, "take_notes", None)
        if notes is not None:
            try:
                entry["notes"] = [msg for msg, _ in notes()]
            except Exception:
                pass
        if p is engine:  # the page's values only: the vocabulary's other keys are listed as recognised or not
            entry["values"] = {k: v for k, v in entry.get("values", {}).items() if v is not None}
        readings[p.name] = entry
        p.close()
    out = []
    for st in statuses:
        item: dict[str, Any] = {"name": st.name, "available": st.available, "reason": st.reason}
        item.update(readings.get(st.name, {}))
        out.append(item)
    return out


def memory_limits(result: list[dict[str, Any]]) -> dict[str, Any]:
    """Every memory limit that can end the process, tightest first, from one reading of each probe."""
    from tuner.core import limits

    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for r in result:
        values.update(r.get("values") or {})
        mem = (r.get("detail") or {}).get("memory") if r["name"] == "cgroup" else None
        if isinstance(mem, dict) and isinstance(mem.get("path"), str):
            labels["cgroup"] = mem["path"]
    terms = limits.terms(limits.DictReader(values, labels))
    return {
        "binding": terms[0].describe() if terms else None,
        "terms": [{"name": t.name, "limit": t.describe(), "headroom": round(t.headroom, 4)} for t in terms],
    }


def _engine_reading(engine: Any) -> ProbeStatus:
    """The second scrape (rates need two) and whether the page gave anything."""
    reason = engine.available()
    if reason is None:
        engine.scrape_once()
        reason = engine.status()
    return ProbeStatus(engine.name, reason)


def run(args: argparse.Namespace) -> int:
    from tuner.commands.run import engine_metrics_url

    pid = parse_pid(args.pid) if args.pid is not None else os.getpid()
    result = read_all(pid, engine_metrics_url(args.engine_metrics))
    mem = memory_limits(result)
    if args.json:
        print(json.dumps({"pid": pid, "probes": result, "memory_limits": mem}, indent=2))
        return 0
    width = max(len(r["name"]) for r in result)
    for r in result:
        if not r["available"]:
            print(f"{r['name']:<{width}}  unavailable: {r['reason']}")
            continue
        if "error" in r:
            print(f"{r['name']:<{width}}  error: {r['error']}")
            continue
        summary = f"  {r['summary']}" if r.get("summary") else ""
        print(f"{r['name']:<{width}}  ok{summary}")
        values: dict[str, Any] = r.get("values", {})
        groups: dict[str, list[str]] = {}
        for key, v in values.items():
            name, dev = split_key(key)
            label = f"{name}[{dev}]" if dev is not None else name
            groups.setdefault(name.split("_")[0], []).append(f"{label}={humanize(key, v)}")
        for items in groups.values():
            line = "    "
            for it in items:
                if len(line) + len(it) > 100:
                    print(line.rstrip())
                    line = "    "
                line += it + "  "
            print(line.rstrip())
        by_reason: dict[str, list[str]] = {}
        for metric, why in r.get("unsupported", {}).items():
            by_reason.setdefault(str(why), []).append(metric)
        for why, metrics in by_reason.items():
            print(f"    not read: {', '.join(metrics)} ({why})")
        if r["name"] == "engine":
            _print_engine(r.get("detail"))
        for note in r.get("notes", []):
            print(f"    note: {note}")
    if mem["terms"]:
        print("memory limits (tightest first; the first one binds):")
        for t in mem["terms"]:
            print(f"    {t['limit']}  ({t['headroom']:.0%} free)")
    return 0


def _print_engine(d: dict[str, Any] | None) -> None:
    if not d:
        return
    from tuner.probes.engine import ENGINES, SLOT_KEYS

    name = ENGINES.get(str(d.get("engine")), "no engine")
    print(f"    {name} at {d['url']}: {len(d['recognised'])} of {d['families']} families recognised")
    for family, slot in d["recognised"].items():
        print(f"      {family} -> {SLOT_KEYS.get(slot, slot)}")
