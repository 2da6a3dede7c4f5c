"""The agent loop, one tick at a time: window -> policies -> arbiter -> actuator -> trace.

``Agent.step(tick)`` is a sampler hook.  The session calls it *before* the recorder, so the knob
columns it adds to ``tick.values`` (``knob_temperature``, ``knob_repetition_penalty``,
``knob_batch_size``, ``knob_precision_bits``) are written with the tick.  Replay feeds it the recorded
ticks the same way; the agent cannot tell the two apart.

Safety: a policy that raises, or proposes an action outside its knobs/bounds, is disabled with a
warning note in the trace; the other policies and the recording go on.  Policies can be switched off
and on while running (``set_enabled``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from tuner.core.actuator import Actuator
from tuner.core.arbiter import Arbiter
from tuner.core.window import Window
from tuner.policies.base import COMMAND_KNOBS, Policy
from tuner.records import BITS, Action, Applied, Event, Knobs

KNOB_COLUMNS: tuple[tuple[str, str], ...] = (
    ("temperature", "knob_temperature"),
    ("repetition_penalty", "knob_repetition_penalty"),
    ("batch_size", "knob_batch_size"),
)
PENDING_LIMIT = 64
CARRIED_OUT = ("applied", "clamped", "sent", "pending", "dry-run")
"""Outcomes after which the agent's knobs hold the new value (``sent``: a command on its way; ``pending``: a
knob the next request carries; see ``tuner.core.actuator`` for what each outcome means)."""
NOT_TAKEN = ("failed", "not supported", "rejected by upstream")
"""Outcomes after which nothing changed: no cooldown starts, and the same one again is recorded once."""


class TickLike(Protocol):
    t: float
    values: dict[str, Any]
    events: list[Event]


class Writer(Protocol):
    def action(self, a: Applied) -> None: ...
    def note(self, t: float, msg: str, level: str = "info", **data: Any) -> None: ...


class Agent:
    def __init__(
        self,
        policies: Sequence[Policy],
        arbiter: Arbiter,
        actuator: Actuator,
        writer: Writer | None,
        clock: Callable[[], float] | None = None,
        *,
        knobs: Knobs | None = None,
        window: Window | None = None,
        observe_only: bool = False,
        say: Callable[[str], None] | None = None,
    ) -> None:
        names = [p.name for p in policies]
        if len(set(names)) != len(names):
            raise ValueError(f"policy names must be unique: {names}")
        self.policies = list(policies)
        self.arbiter = arbiter
        self.say = say
        """Where an early warning goes besides the trace (the session's stderr line)."""
        self._warned_episode: float | None = None
        self.actuator = actuator
        self.writer = writer
        self.clock = clock
        """Optional: the time of actions; by default the tick's own time (trace time, live or replayed)."""
        self.knobs = knobs or Knobs()
        self.observe_only = observe_only
        keys: set[str] = {"sys_mem_available_bytes", "sys_mem_total_bytes"}
        prefixes: set[str] = {"gpu_mem_", "npu_mem_"}
        for p in self.policies:
            keys.update(p.keys)
            prefixes.update(p.prefixes)
        self.window = window or Window(keys=keys, prefixes=tuple(sorted(prefixes)))
        self.enabled: dict[str, bool] = dict.fromkeys(names, True)
        self.disabled_reason: dict[str, str] = {}
        self.pending: dict[str, tuple[Policy, Action, Any]] = {}
        """Commands sent and not answered yet: command id -> (policy, action, previous value)."""
        self.applied: list[Applied] = []
        """Every decision carried out or rejected this run (bounded); replay reads it."""
        self.errors = 0
        self.steps = 0
        self._last_rejected: dict[tuple[str, str], Any] = {}
        self._last_failed: dict[tuple[str, str], tuple[str, str]] = {}
        self._changed_before: dict[str, float] = {}
        self.step_seconds = 0.0
        self._due: dict[str, float] = {}
        self._next_due = -math.inf
        self._cols: dict[str, Any] = {}
        self._cols_for: Knobs | None = None

    # -- control ------------------------------------------------------------------------------------
    def set_enabled(self, name: str, enabled: bool) -> None:
        if name not in self.enabled:
            raise KeyError(f"no policy named {name!r} (running: {', '.join(self.enabled) or 'none'})")
        self.enabled[name] = bool(enabled)
        self._due.pop(name, None)
        self._next_due = -math.inf
        if enabled:
            self.disabled_reason.pop(name, None)

    def status(self) -> dict[str, Any]:
        return {
            p.name: {"enabled": self.enabled[p.name], "reason": self.disabled_reason.get(p.name), **p.status()}
            for p in self.policies
        }

    # -- the loop -----------------------------------------------------------------------------------
    def step(self, tick: TickLike) -> None:
        start = time.perf_counter()
        # trace time as the trace stores it (microseconds): live and replay then see the very same numbers
        tt = round(tick.t, 6)
        t = tt if self.clock is None else self.clock()
        w = self.window
        w.update(tt, tick.values, tick.events)
        if w.new_requests:
            self._learn_from_requests(tick.events)
        for e in w.events:
            if e.kind == "command_result":
                self._command_result(t, e)
        if not w.events and t < self._next_due:  # the fast path: no event, no policy due
            self._write_knobs(tick.values)
            self.steps += 1
            self.step_seconds = time.perf_counter() - start
            return
        proposals: list[Action] = []
        urgent = bool(w.events)
        due = self._due
        for p in self.policies:
            if not self.enabled[p.name]:
                continue
            if not urgent and t < due.get(p.name, -1e18):
                continue
            due[p.name] = t + p.interval_s
            try:
                acts = p.decide(w, self.knobs)
                for a in acts:
                    bad = p.allows(a) if isinstance(a, Action) else f"returned {type(a).__name__}, not an Action"
                    if bad:
                        raise _OutOfBounds(bad)
            except Exception as exc:
                self._disable(t, p, exc)
                continue
            proposals.extend(acts)
        self._next_due = min(due.values(), default=t)
        if proposals:
            headroom, _ = w.headroom()
            self._changed_before = dict(self.arbiter.last_change)
            try:
                decisions = self.arbiter.resolve(t, proposals, self.knobs, headroom)
            except Exception as exc:  # never expected; if it happens, act on nothing this tick and say so
                decisions = []
                self.errors += 1
                if self.writer is not None:
                    self.writer.note(t, f"arbiter failed, no action this tick: {type(exc).__name__}: {exc}", "warn")
            for d in decisions:
                self._carry_out(t, d.action, d.outcome, d.why)
        self._write_knobs(tick.values)
        self.steps += 1
        self.step_seconds = time.perf_counter() - start

    # -- helpers ------------------------------------------------------------------------------------
    def _learn_from_requests(self, events: Sequence[Event]) -> None:
        """Knobs the agent has not set yet take the values the inference side reports using, so the
        policies start from the truth (the user's own temperature and precision)."""
        k = self.knobs
        if k.temperature is not None and k.precision is not None:
            return
        for e in events:
            if e.kind != "request":
                continue
            tv, pv = e.data.get("temperature"), e.data.get("precision")
            if k.temperature is None and isinstance(tv, (int, float)) and not isinstance(tv, bool) and tv == tv:
                k = replace(k, temperature=float(tv))
            if k.precision is None and pv in BITS:
                k = replace(k, precision=str(pv))
        self.knobs = k

    def _disable(self, t: float, p: Policy, exc: Exception) -> None:
        self.enabled[p.name] = False
        self._due.pop(p.name, None)
        self.errors += 1
        why = str(exc) if isinstance(exc, _OutOfBounds) else f"{type(exc).__name__}: {exc}"
        self.disabled_reason[p.name] = why
        if self.writer is not None:
            self.writer.note(t, f"policy {p.name} disabled: {why}", "warn", policy=p.name)

    def _policy(self, name: str) -> Policy | None:
        for p in self.policies:
            if p.name == name:
                return p
        return None

    def _carry_out(self, t: float, action: Action, verdict: str, why: str) -> None:
        action = self._name_limit(action)
        policy = self._policy(action.policy)
        previous = getattr(self.knobs, action.knob, None) if action.knob != "cleanup" else None
        if verdict == "rejected":
            applied = Applied(t, action, "rejected", previous, {"why": why})
            key = (action.policy, action.knob)
            if self._last_rejected.get(key) != (action.value, why.split(":")[0]):
                self._last_rejected[key] = (action.value, why.split(":")[0])
                self._record(applied)
                self.window.add_action(applied)
            self._feedback(policy, applied)
            return
        self._last_rejected.pop((action.policy, action.knob), None)
        new_knobs = self.knobs
        if action.knob != "cleanup":
            new_knobs = replace(self.knobs, **{action.knob: action.value})
        outcome, result = self.actuator.apply(action, new_knobs)
        if verdict == "clamped" and outcome == "applied":
            outcome = "clamped"
        if why:
            result = {**result, "why": why}
        key = (action.policy, action.knob)
        if outcome in NOT_TAKEN:
            # nothing changed, so no cooldown starts (the arbiter counted the change when it accepted it)
            last = self._changed_before.get(action.knob)
            if last is None:
                self.arbiter.last_change.pop(action.knob, None)
            else:
                self.arbiter.last_change[action.knob] = last
            # the same failure again (a policy retrying while no client is connected): recorded once
            sig = (repr(action.value), f"{outcome}: {result.get('error')}")
            if self._last_failed.get(key) == sig:
                self._feedback(policy, Applied(t, action, outcome, previous, result))
                return
            self._last_failed[key] = sig
        else:
            self._last_failed.pop(key, None)
        if outcome in CARRIED_OUT:
            self.knobs = new_knobs
            cid = result.get("command_id")
            if cid and (action.knob in COMMAND_KNOBS or outcome == "pending") and policy is not None:
                if len(self.pending) >= PENDING_LIMIT:
                    self.pending.pop(next(iter(self.pending)))
                self.pending[str(cid)] = (policy, action, previous)
        applied = Applied(t, action, outcome, previous, result)
        self._record(applied)
        self.window.add_action(applied)
        self._feedback(policy, applied)

    def _warn_early(self) -> None:
        """Once per episode of memory pressure: a warning note (and line) with the projected time to the limit."""
        mp = self.window.memory_pressure()
        if mp is None or not mp.fresh or mp.since == self._warned_episode:
            return
        self._warned_episode = mp.since
        msg = f"memory: {mp.describe()} — within the {mp.horizon_s:g} s horizon"
        if self.writer is not None:
            self.writer.note(self.window.t, msg, "warn", **mp.evidence())
        if self.say is not None:
            self.say(msg)

    def _name_limit(self, action: Action) -> Action:
        """Every action's evidence names the binding memory limit and how close it is (and, under memory
        pressure, the projected time to it)."""
        if "limit" in action.evidence:
            return action
        b = self.window.binding()
        if b is None:
            return action
        ev: dict[str, Any] = {**action.evidence, "limit": b.describe(), "limit_headroom": round(b.headroom, 4)}
        mp = self.window.memory_pressure()
        if mp is not None:
            for k, v in mp.evidence().items():
                ev.setdefault(k, v)
        return replace(action, evidence=ev)

    def _feedback(self, policy: Policy | None, applied: Applied) -> None:
        if policy is None or not self.enabled.get(policy.name, False):
            return
        try:
            policy.feedback(applied)
        except Exception as exc:  # a policy's bug never stops the agent
            self._disable(applied.t, policy, exc)

    def _command_result(self, t: float, e: Event) -> None:
        d = e.data
        entry = self.pending.pop(str(d.get("id")), None)
        if entry is None:
            return
        policy, action, previous = entry
        ok = bool(d.get("ok"))
        result: Mapping[str, Any] = d.get("result") or {}
        error = d.get("error")
        if not ok and action.knob == "precision":
            self.knobs = replace(self.knobs, precision=previous)  # the client refused: nothing changed
        elif not ok and action.knob not in COMMAND_KNOBS and getattr(self.knobs, action.knob, None) == action.value:
            self.knobs = replace(self.knobs, **{action.knob: previous})  # a pending knob the inference refused
        out = dict(result)
        if error:
            out["error"] = error
        # the inference side may name the outcome (the proxy: ``applied`` / ``rejected by upstream`` for a pending
        # knob, ``not supported`` for an admin call the engine does not serve); else done / refused
        named = result.get("outcome")
        outcome = named if isinstance(named, str) and named else ("done" if ok else "refused")
        self._record(Applied(t, action, outcome, previous, out))
        try:
            policy.on_result(t, action, ok, result, error if isinstance(error, str) else None)
        except Exception as exc:
            self._disable(t, policy, exc)

    def _record(self, a: Applied) -> None:
        if len(self.applied) < 100_000:
            self.applied.append(a)
        if self.writer is not None:
            self.writer.action(a)

    def _write_knobs(self, values: dict[str, Any]) -> None:
        """The knob columns, and on each projection the binding limit's headroom and projected time to it."""
        limit_cols = self.window.limit_columns()
        if limit_cols:
            values.update(limit_cols)
            self._warn_early()
        k = self.knobs
        if k is not self._cols_for:  # Knobs is frozen: a new object is a change
            cols: dict[str, Any] = {}
            for name, col in KNOB_COLUMNS:
                v = getattr(k, name)
                if v is not None:
                    cols[col] = v
            if k.precision is not None:
                cols["knob_precision_bits"] = BITS.get(k.precision)
            self._cols, self._cols_for = cols, k
        values.update(self._cols)


class _OutOfBounds(Exception):
    pass
