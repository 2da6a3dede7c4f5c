"""``tuner probes [--json]``: what was detected, one reading each, and why the others are unavailable."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from tuner.commands.attach import parse_pid
from tuner.probes.base import discover
from tuner.records import split_key, unit_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probes", help="list the probes, one reading each, and why any is unavailable")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pid", help="also read this process tree (default: this command's own process)")
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


def read_all(pid: int) -> list[dict[str, Any]]:
    probes, statuses = discover([pid])
    t0 = time.monotonic()
    for p in probes:  # a first reading primes the rate-based values (CPU ratio, utilization)
        try:
            p.sample(0.0)
        except Exception:
            pass
    time.sleep(0.2)
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
        readings[p.name] = entry
        p.close()
    out = []
    for st in statuses:
        item: dict[str, Any] = {"name": st.name, "available": st.available, "reason": st.reason}
        item.update(readings.get(st.name, {}))
        out.append(item)
    return out


def run(args: argparse.Namespace) -> int:
    pid = parse_pid(args.pid) if args.pid is not None else os.getpid()
    result = read_all(pid)
    if args.json:
        print(json.dumps({"pid": pid, "probes": result}, indent=2))
        return 0
    width = max(len(r["name"]) for r in result)
    for r in result:
        if not r["available"]:
            print(f"{r['name']:<{width}}  unavailable: {r['reason']}")
            continue
        if "error" in r:
            print(f"{r['name']:<{width}}  error: {r['error']}")
            continue
        print(f"{r['name']:<{width}}  ok")
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
        for metric, why in r.get("unsupported", {}).items():
            print(f"    {metric}: not supported ({why})")
    return 0
