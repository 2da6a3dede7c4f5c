"""``tuner replay TRACE [--policy P] [--out TRACE] [--json]``: the policies re-run over a recording.

The recorded ticks and events go through a fresh agent with a dry-run actuator, on the trace's own
clock (tick times), in the order they were recorded: each tick with the events recorded after it,
exactly what the live agent saw.  Nothing reaches a process.  The decisions are printed with how they
differ from the actions recorded in the trace; ``--out`` writes a counterfactual trace (the recorded
samples and events, the replayed actions and knob columns).  Same trace + same policy = same output.

That trace is open loop: its metrics and requests are the recording's, which are what this policy would
have caused only up to the first tick where the replay's decisions differ from what the recording carried
out — ``divergence()``: a knob set (or a command sent) by one and not the other, or a knob column that
differs (e.g. a precision change the inference side refused).  A recording made with ``--observe-only``
(or with no channel to the process) changed nothing, so it diverges at the replay's first decision.  The
point is marked in the printed diff, in the trace (header ``replay_diverged_at`` / ``replay_diverged_why``,
and a ``warn`` note at that time) and from there in ``tuner report`` and ``tuner compare``.

Where the live channel had no client (the recorded ``chan_clients`` is 0), the replay's actuator fails
exactly as the live one did, so replaying a recording with its own policy makes its decisions.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.core.actuator import NO_CLIENT_COMMAND, NO_CLIENT_KNOBS, DryRunActuator
from tuner.errors import UserError
from tuner.records import Action, Applied, Event, Knobs
from tuner.trace import TraceError, TraceWriter, iter_records

CARRIED_OUT = ("applied", "clamped", "sent", "dry-run")
"""Outcomes of a decision that was carried out (``sent``: a command; older traces say ``applied``)."""
TOOK_EFFECT = ("applied", "clamped", "sent")
"""Outcomes of a live recording whose change reached the process (``dry-run`` changed nothing)."""
KNOB_COLUMNS = ("knob_temperature", "knob_repetition_penalty", "knob_batch_size", "knob_precision_bits")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="re-run policies over a recorded trace (dry run) and compare their decisions",
        description="Feed a trace's recorded samples and events through the policies with a dry-run actuator "
        "and the trace's own clock; print the decisions and how they differ from the recorded ones.",
    )
    p.add_argument("trace", metavar="TRACE", help="trace file (.jsonl)")
    p.add_argument(
        "--policy",
        metavar="P",
        help="preset (interactive, offline, edge) or TOML file; default: the policy the trace was recorded with",
    )
    p.add_argument("--out", metavar="TRACE", help="write a counterfactual trace: recorded samples + replayed actions")
    p.add_argument("--overwrite", action="store_true", help="replace --out TRACE when it is an existing trace")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines instead of stopping")
    p.set_defaults(func=run)


@dataclass
class ReplayTick:
    t: float
    values: dict[str, Any]
    events: list[Event]
    procs: dict[int, dict[str, Any]] = field(default_factory=dict)
    samples: list[Any] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    """The recorded actions written just before this tick (the live agent steps before the recorder)."""


@dataclass
class Recording:
    header: dict[str, Any]
    ticks: list[ReplayTick]
    actions: list[dict[str, Any]]
    notes: list[dict[str, Any]]
    end: dict[str, Any] | None
    warnings: list[str]


def load(path: str, *, skip_bad: bool = False) -> Recording:
    """The trace as the agent saw it live: each tick with the events recorded after it."""
    warnings: list[str] = []
    it: Iterator[dict[str, Any]] = iter_records(path, skip_bad=skip_bad, warnings=warnings)
    header = next(it)
    ticks: list[ReplayTick] = []
    actions: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    early: list[Event] = []
    before: list[dict[str, Any]] = []
    try:
        for rec in it:
            k = rec["k"]
            if k == "tick":
                m = rec.get("m")
                ticks.append(ReplayTick(float(rec["t"]), dict(m) if isinstance(m, dict) else {}, [], actions=before))
                before = []
            elif k == "event":
                e = Event(float(rec["t"]), str(rec.get("kind", "")), rec.get("data") or {})
                (ticks[-1].events if ticks else early).append(e)
            elif k == "action":
                actions.append(rec)
                before.append(rec)
            elif k == "note":
                notes.append(rec)
            elif k == "end":
                end = rec
    except (KeyError, TypeError, ValueError):
        raise TraceError(f"{path}: a malformed record (use --skip-bad to read past it)") from None
    if early and ticks:
        ticks[0].events[:0] = early
    return Recording(header, ticks, actions, notes, end, warnings)


class _Collector:
    """A writer for the agent: keeps the actions and notes of the current tick, in order."""

    def __init__(self) -> None:
        self.notes: list[tuple[float, str, str]] = []
        self.pending: list[Applied | tuple[float, str, str, dict[str, Any]]] = []

    def action(self, a: Applied) -> None:
        self.pending.append(a)

    def note(self, t: float, msg: str, level: str = "info", **data: Any) -> None:
        self.notes.append((t, msg, level))
        self.pending.append((t, msg, level, data))


class ReplayActuator(DryRunActuator):
    """A dry run that fails where the live ``ChannelActuator`` failed for want of a client: ``clients`` is the
    recorded ``chan_clients`` of the tick being replayed (None when not recorded: no channel, nothing fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.clients: float | None = None

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]:
        if self.clients == 0:
            command = action.knob in ("cleanup", "precision")
            return "failed", {"error": NO_CLIENT_COMMAND if command else NO_CLIENT_KNOBS}
        return super().apply(action, knobs)


@dataclass
class Replayed:
    """What a replay decided, tick by tick, and where it stops being what the recording did."""

    decisions: list[Applied]
    notes: list[tuple[float, str, str]]
    diverged_at: float | None
    """The first tick time at which the replay's decisions differ from what the recording carried out;
    None when they never do (the recording's metrics are then what this policy caused, to the end)."""
    diverged_why: str | None
    per_tick: list[tuple[list[Applied | tuple[float, str, str, dict[str, Any]]], dict[str, Any]]]
    """Per recorded tick: the agent's records before it, and its knob columns (for ``--out``)."""


def _value_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) > 1e-9
    return a != b


def divergence(
    tick: ReplayTick, replayed: list[Applied], knob_cols: dict[str, Any], *, live: bool
) -> str | None:
    """Why this tick's replayed decisions differ from the recording's (None when they agree).

    ``live``: the recording's actions reached the process (not ``--observe-only``, a channel existed); an
    observe-only recording changed nothing, so any decision the replay carries out differs."""
    done = sorted(_key(a.action.knob, a.action.value) for a in replayed if a.outcome in CARRIED_OUT)
    rec = sorted(_key(r.get("knob", ""), r.get("value")) for r in tick.actions if r.get("outcome") in TOOK_EFFECT)
    if not live:
        rec = []
    if done != rec:
        only_rep = [x for x in done if x not in rec]
        only_rec = [x for x in rec if x not in done]
        parts = []
        if only_rep:
            parts.append(f"the replay carries out {', '.join(only_rep)}")
        if only_rec:
            parts.append(f"the recording carried out {', '.join(only_rec)}")
        if not live and not only_rec:
            parts.append("the recording changed nothing (observe-only or no channel to the process)")
        return "; ".join(parts)
    if live and any(k in tick.values for k in KNOB_COLUMNS):
        for k in KNOB_COLUMNS:
            a, b = tick.values.get(k), knob_cols.get(k)
            if _differs(a, b):
                return f"{k} was {_value_key(a)} in the recording, {_value_key(b)} in the replay"
    return None


def replay(rec: Recording, config: Any) -> Replayed:
    """Run the agent for ``config`` over ``rec`` with a dry-run actuator (one that fails where the live
    one had no client); returns the decisions, the notes and the first tick where they differ."""
    from tuner.core.arbiter import narrow_bounds
    from tuner.core.policy_config import build_agent

    writer = _Collector()
    actuator = ReplayActuator()
    live = not rec.header.get("observe_only")
    agent = build_agent(config, actuator, writer, observe_only=True)
    px = rec.header.get("proxy")
    if isinstance(px, dict):  # the live proxy session narrowed the bounds to its limits: so does its replay
        tb, cap = px.get("temperature_bounds"), px.get("max_concurrency")
        agent.arbiter.bounds = narrow_bounds(
            agent.arbiter.bounds,
            temperature=tb if isinstance(tb, list) and len(tb) == 2 else None,
            batch_max=cap if isinstance(cap, int) and not isinstance(cap, bool) else None,
        )
    tk = ReplayTick(0.0, {}, [])  # one object, refilled: the agent keeps nothing of it
    per_tick: list[tuple[list[Any], dict[str, Any]]] = []
    diverged_at: float | None = None
    why: str | None = None
    for tick in rec.ticks:
        values = dict(tick.values)  # a copy: the agent adds its own knob columns
        for k in KNOB_COLUMNS:
            values.pop(k, None)
        tk.t, tk.values, tk.events = tick.t, values, tick.events
        clients = tick.values.get("chan_clients")
        actuator.clients = float(clients) if live and isinstance(clients, (int, float)) else None
        n = len(agent.applied)
        agent.step(tk)
        cols = {k: values[k] for k in KNOB_COLUMNS if k in values}
        per_tick.append((writer.pending, cols))
        writer.pending = []
        if diverged_at is None:
            why = divergence(tick, agent.applied[n:], cols, live=live)
            if why is not None:
                diverged_at = tick.t
    return Replayed(agent.applied, writer.notes, diverged_at, why, per_tick)


def open_loop_sentence(diverged_at: float | None, why: str | None) -> str:
    """The one line every output shows about a counterfactual trace's metrics."""
    if diverged_at is None:
        return ("the replay's decisions are the recording's throughout (same knobs and commands at the same "
                "ticks): its metrics are what this policy caused")
    return (f"metrics after t={diverged_at:.2f} s are the recording's, not what this policy would have caused "
            f"(first difference: {why})")


def write_out(path: str, rec: Recording, result: Replayed, header: dict[str, Any]) -> None:
    """The counterfactual trace: the recorded ticks and events with the replay's actions, notes and knob
    columns, the divergence in the header and as a ``warn`` note at its tick."""
    header = {
        **header,
        "replay_diverged_at": result.diverged_at,
        "replay_diverged_why": result.diverged_why,
        "replay_open_loop": open_loop_sentence(result.diverged_at, result.diverged_why),
    }
    try:
        out = TraceWriter(path, header)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        for tick, (records, cols) in zip(rec.ticks, result.per_tick, strict=True):
            for r in records:
                if isinstance(r, Applied):
                    out.action(r)
                else:
                    out.note(r[0], r[1], r[2], **r[3])
            if result.diverged_at is not None and tick.t == result.diverged_at:
                out.note(tick.t, f"replay diverges from the recording here: "
                         f"{open_loop_sentence(result.diverged_at, result.diverged_why)}", "warn",
                         replay_diverged=True)
            values = dict(tick.values)
            for k in KNOB_COLUMNS:
                values.pop(k, None)
            values.update(cols)
            out.tick(tick.t, values)
            for e in tick.events:
                out.event(e)
        for n in rec.notes:
            out.write(n)
        if rec.end is not None:
            out.write(rec.end)
    finally:
        out.close()


def _key(knob: str, value: Any) -> str:
    return f"{knob}={json.dumps(value, sort_keys=True)}"


def diff(recorded: list[dict[str, Any]], replayed: list[Applied]) -> dict[str, Any]:
    """Decisions carried out (applied / clamped / sent / dry-run) compared in order, per knob and value."""
    a = [_key(r.get("knob", ""), r.get("value")) for r in recorded if r.get("outcome") in CARRIED_OUT]
    b = [_key(x.action.knob, x.action.value) for x in replayed if x.outcome in CARRIED_OUT]
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    same = sum(blk.size for blk in sm.get_matching_blocks())
    changes: list[dict[str, Any]] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op != "equal":
            changes.append({"op": op, "recorded": a[i1:i2], "replayed": b[j1:j2]})
    return {"recorded": len(a), "replayed": len(b), "same": same, "changes": changes}


def _fmt(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def run(args: argparse.Namespace) -> int:
    from tuner.commands._common import check_not_a_trace, require_path
    from tuner.commands.report import check_output
    from tuner.core.policy_config import load_policy

    require_path(args.trace, "TRACE")
    if args.policy is not None and not args.policy.strip():
        raise UserError("--policy '': give a preset (interactive, offline, edge) or a .toml file")
    if args.out is not None:
        require_path(args.out, "--out")
    if args.out:  # before the work: a wrong --out fails fast and never replaces a recording
        if Path(args.out).resolve() == Path(args.trace).resolve():
            raise UserError("--out must not be the trace being replayed")
        check_output(args.out)
        if not args.overwrite:
            try:
                check_not_a_trace(args.out, option="--out")
            except UserError as exc:
                raise UserError(f"{exc} (or add --overwrite)") from None
    rec = load(args.trace, skip_bad=args.skip_bad)
    for w in rec.warnings:
        print(f"tuner: warning: {w}", file=sys.stderr)
    policy = args.policy or rec.header.get("policy")
    if not policy:
        raise UserError(f"{args.trace} was recorded without a policy: give one with --policy P")
    try:
        config = load_policy(str(policy))
    except UserError as exc:
        if args.policy:
            raise
        raise UserError(f"the trace's policy {policy!r} cannot be loaded here ({exc}); give --policy P") from None
    if not rec.ticks:
        raise UserError(f"{args.trace} has no ticks to replay")
    result = replay(rec, config)
    decisions, notes = result.decisions, result.notes
    if args.out:
        header = {**rec.header, "policy": policy, "observe_only": True, "replay_of": str(args.trace)}
        write_out(args.out, rec, result, header)
    d = diff(rec.actions, decisions)
    d["diverged_at"] = result.diverged_at
    d["diverged_why"] = result.diverged_why
    if args.json:
        doc = {
            "trace": str(args.trace),
            "policy": str(policy),
            "ticks": len(rec.ticks),
            "decisions": [
                {
                    "t": a.t,
                    "policy": a.action.policy,
                    "knob": a.action.knob,
                    "value": a.action.value,
                    "previous": a.previous,
                    "outcome": a.outcome,
                    "reason": a.action.reason,
                    "evidence": dict(a.action.evidence),
                    "result": dict(a.result),
                }
                for a in decisions
            ],
            "notes": [{"t": t, "msg": m, "level": lv} for t, m, lv in notes],
            "diff": d,
            "diverged_at": result.diverged_at,
            "open_loop": open_loop_sentence(result.diverged_at, result.diverged_why),
        }
        print(json.dumps(doc, sort_keys=True))
        return 0
    print(f"replay of {args.trace} with policy {policy}: {len(rec.ticks)} ticks, {rec.ticks[-1].t:.1f} s")
    for a in decisions:
        what = (
            f"{a.action.knob} {_fmt(a.previous)} -> {_fmt(a.action.value)}"
            if a.action.knob != "cleanup"
            else f"cleanup {','.join(a.action.value) if isinstance(a.action.value, list) else a.action.value}"
        )
        print(f"{a.t:9.2f}  {a.action.policy:<12} {a.outcome:<8} {what}  ({a.action.reason})")
    for t, m, lv in notes:
        print(f"{t:9.2f}  {lv}: {m}")
    print(f"decisions: {d['replayed']} carried out in replay, {d['recorded']} in the recording, {d['same']} the same")
    for c in d["changes"]:
        rec_s = ", ".join(c["recorded"]) or "-"
        rep_s = ", ".join(c["replayed"]) or "-"
        print(f"  {c['op']}: recorded [{rec_s}] / replayed [{rep_s}]")
    if result.diverged_at is None:
        print("diverges: never — " + open_loop_sentence(None, None))
    else:
        print(f"diverges at t={result.diverged_at:.2f} s: {result.diverged_why}; in a --out trace, "
              + open_loop_sentence(result.diverged_at, result.diverged_why).split(" (first")[0])
    if args.out:
        print(f"counterfactual trace written to {args.out}")
    return 0
