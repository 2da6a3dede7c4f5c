"""The fleet as text: the view's columns (``COLUMNS``), their order, and the totals line — shared by the
terminal UI (``tuner.tui.fleet``) and ``tuner fleet --once``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuner.fleet.view import Fleet, Replica, natural


def secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def age(s: float) -> str:
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def status(r: Replica) -> str:
    """``up`` / ``down`` by Prometheus' ``up`` for the sidecar's target; ``reporting`` when its series are there
    but no ``up`` carries the ``--by`` label (series remote-written or federated, or blocks)."""
    if r.up is False or not r.reporting:
        return "down"
    return "up" if r.up else "reporting"


def last_action_text(r: Replica) -> str:
    a = r.last_action
    if not a:
        return "-"
    return f"{a['knob']} {a['outcome']} {age(a['age_seconds'])}"


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    cell: Callable[[Replica], str]
    sort: Callable[[Replica], Any]
    """The sort key (None sorts last whichever the direction)."""


COLUMNS: tuple[Column, ...] = (
    Column("replica", "replica", lambda r: r.key, lambda r: natural(r.key)),
    Column("status", "status", status, status),
    Column("ttft", "TTFT p95", lambda r: secs(r.ttft_p95), lambda r: r.ttft_p95),
    Column("tpot", "TPOT p95", lambda r: secs(r.tpot_p95), lambda r: r.tpot_p95),
    Column("tokens", "tok/s", lambda r: num(r.tokens_per_second), lambda r: r.tokens_per_second),
    Column("requests", "req/s", lambda r: num(r.requests_per_second, "{:.2f}"), lambda r: r.requests_per_second),
    Column("headroom", "headroom", lambda r: pct(r.headroom), lambda r: r.headroom),
    Column("binding", "binding limit", lambda r: r.binding or "-", lambda r: r.binding_name),
    Column("knobs", "knobs", lambda r: r.knobs_text() or "-", lambda r: r.knobs_text()),
    Column("action", "last action", last_action_text,
           lambda r: -(r.last_action or {}).get("unix", 0.0) if r.last_action else None),
    Column("oom", "OOM kills", lambda r: num(r.oom_kills, "{:.0f}"), lambda r: r.oom_kills),
)  # fmt: skip


def sorted_rows(rows: list[Replica], column: str, reverse: bool) -> list[Replica]:
    """Rows by ``column`` (``Column.key``); replicas without a value last either way."""
    col = next(c for c in COLUMNS if c.key == column)
    have = [r for r in rows if col.sort(r) is not None]
    none = [r for r in rows if col.sort(r) is None]
    return sorted(have, key=col.sort, reverse=reverse) + sorted(none, key=lambda r: natural(r.key))


def totals_text(f: Fleet) -> str:
    t = f.totals
    return (f"{t['replicas']} replicas ({t['up']} up, {t['reporting']} reporting) · "
            f"{num(t['tokens_per_second'])} tok/s · {num(t['requests_per_second'], '{:.2f}')} req/s · "
            f"TTFT p50/p95/p99 {secs(t['ttft_p50'])} / {secs(t['ttft_p95'])} / {secs(t['ttft_p99'])} · "
            f"TPOT p95 {secs(t['tpot_p95'])} · least headroom {pct(t['min_headroom'])} · "
            f"OOM kills {num(t['oom_kills'], '{:.0f}')}")  # fmt: skip


def empty_text(fleet: Fleet) -> str:
    """Why there is nothing to show, in one line."""
    where = f" matching {{{fleet.match}}}" if fleet.match else ""
    return (f"no tuner sidecars at {fleet.prometheus}: no tuner_info series{where} in the last hour (is Prometheus "
            "scraping the sidecars' --prometheus ADDR?)")  # fmt: skip
