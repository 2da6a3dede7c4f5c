"""``tuner replay TRACE [--policy P] [--out TRACE] [--json]``: the policies re-run over a recording.

The recorded ticks and events go through a fresh agent with a dry-run actuator, on the trace's own
clock (tick times), in the order they were recorded: each tick with the events recorded after it,
exactly what the live agent saw.  Nothing reaches a process.  The decisions are printed with how they
differ from the actions recorded in the trace; ``--out`` writes a counterfactual trace (the recorded
samples and events, the replayed actions and knob columns).  Same trace + same policy = same output.
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

from tuner.errors import UserError
from tuner.records import Applied, Event
from tuner.trace import TraceError, TraceWriter, iter_records

CARRIED_OUT = ("applied", "clamped", "dry-run")
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
    try:
        for rec in it:
            k = rec["k"]
            if k == "tick":
                m = rec.get("m")
                ticks.append(ReplayTick(float(rec["t"]), dict(m) if isinstance(m, dict) else {}, []))
            elif k == "event":
                e = Event(float(rec["t"]), str(rec.get("kind", "")), rec.get("data") or {})
                (ticks[-1].events if ticks else early).append(e)
            elif k == "action":
                actions.append(rec)
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
    """A writer for the agent: keeps the actions and notes, optionally forwards to a TraceWriter."""

    def __init__(self, out: TraceWriter | None) -> None:
        self.out = out
        self.notes: list[tuple[float, str, str]] = []

    def action(self, a: Applied) -> None:
        if self.out is not None:
            self.out.action(a)

    def note(self, t: float, msg: str, level: str = "info", **data: Any) -> None:
        self.notes.append((t, msg, level))
        if self.out is not None:
            self.out.note(t, msg, level, **data)


def replay(
    rec: Recording, config: Any, out: TraceWriter | None = None
) -> tuple[list[Applied], list[tuple[float, str, str]]]:
    """Run the agent for ``config`` over ``rec`` with a dry-run actuator; returns (decisions, notes)."""
    from tuner.core.actuator import DryRunActuator
    from tuner.core.policy_config import build_agent

    writer = _Collector(out)
    agent = build_agent(config, DryRunActuator(), writer, observe_only=True)
    tk = ReplayTick(0.0, {}, [])  # one object, refilled: the agent keeps nothing of it
    for tick in rec.ticks:
        values = dict(tick.values)  # a copy: the agent adds its own knob columns
        for k in KNOB_COLUMNS:
            values.pop(k, None)
        tk.t, tk.values, tk.events = tick.t, values, tick.events
        agent.step(tk)
        if out is not None:
            out.tick(tick.t, tk.values)
            for e in tick.events:
                out.event(e)
    if out is not None:
        for n in rec.notes:
            out.write(n)
        if rec.end is not None:
            out.write(rec.end)
    return agent.applied, writer.notes


def _key(knob: str, value: Any) -> str:
    return f"{knob}={json.dumps(value, sort_keys=True)}"


def diff(recorded: list[dict[str, Any]], replayed: list[Applied]) -> dict[str, Any]:
    """Decisions carried out (applied / clamped / dry-run) compared in order, per knob and value."""
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
    out: TraceWriter | None = None
    if args.out:
        header = {**rec.header, "policy": policy, "observe_only": True, "replay_of": str(args.trace)}
        try:
            out = TraceWriter(args.out, header)
        except OSError as exc:
            raise UserError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    try:
        decisions, notes = replay(rec, config, out)
    finally:
        if out is not None:
            out.close()
    d = diff(rec.actions, decisions)
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
                }
                for a in decisions
            ],
            "notes": [{"t": t, "msg": m, "level": lv} for t, m, lv in notes],
            "diff": d,
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
    if out is not None:
        print(f"counterfactual trace written to {args.out}")
    return 0
