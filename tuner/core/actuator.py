"""Actuators carry out the arbiter's decisions: over the client channel, or not at all (dry run).

An actuator gets the action and the knobs *after* the change, and answers ``(outcome, result)``:
``applied`` (sent), ``failed`` (e.g. no client connected to run a command) or ``dry-run``.  Commands
(``precision``, ``cleanup``) return their ``command_id``; the inference side's ``command_result`` comes
back later through the channel as an event, which the agent routes to the policy that asked.
"""

from __future__ import annotations

from typing import Any, Protocol

from tuner.records import Action, Knobs


class Actuator(Protocol):
    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]: ...


class ChannelLike(Protocol):
    def broadcast_knobs(self, knobs: Knobs) -> None: ...
    def send_command(self, cmd: str, args: dict[str, Any]) -> str | None: ...


class ChannelActuator:
    """Knobs are broadcast (every client, and clients that connect later, get them); precision and
    cleanup are commands the client runs between batches (``c.poll()``)."""

    def __init__(self, channel: ChannelLike) -> None:
        self.channel = channel

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]:
        try:
            if action.knob == "cleanup":
                steps = list(action.value) if isinstance(action.value, (list, tuple)) else []
                cid = self.channel.send_command("cleanup", {"steps": steps})
            elif action.knob == "precision":
                cid = self.channel.send_command("precision", {"precision": action.value})
            else:
                # precision travels as a command, never as a knob the client would store unconfirmed
                self.channel.broadcast_knobs(Knobs(knobs.temperature, knobs.repetition_penalty, knobs.batch_size, None))
                return "applied", {}
        except Exception as exc:  # a broken channel is an outcome, never a crash of the sampler thread
            return "failed", {"error": f"{type(exc).__name__}: {exc}"}
        if cid is None:
            return "failed", {"error": "no client connected to run the command"}
        return "applied", {"command_id": cid}


class DryRunActuator:
    """Changes nothing; records what would have been done (``--observe-only`` and ``tuner replay``)."""

    def __init__(self) -> None:
        self.log: list[tuple[Action, Knobs]] = []

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]:
        if len(self.log) < 10_000:
            self.log.append((action, knobs))
        return "dry-run", {}
