"""Actuators carry out the arbiter's decisions: over the client channel, or not at all (dry run).

An actuator gets the action and the knobs *after* the change, and answers ``(outcome, result)``.  What
each outcome means, so that nothing that could not take effect is ever recorded as ``applied``:

- ``applied`` — a knob (temperature, repetition penalty, batch size) reached at least one connected client
  (``result["clients"]``: how many); the client swaps it in on arrival and uses it from its next request or
  batch.  The proxy is its own client: its knobs apply to every request from then on, within its limits
  (``--temperature-bounds``, ``--max-concurrency``; the session narrows the policy bounds to those, so the
  arbiter clamps first and the value recorded is the value used).
- ``sent`` — a command (``precision``, ``cleanup``) is on its way to the connected clients, which run it
  between batches (``c.poll()``); it has not taken effect yet.  Its ``command_id`` comes back later in a
  ``command_result`` event, recorded as ``done`` or ``refused`` (the agent routes it to the policy).
- ``failed`` — nothing happened: no client was connected, no client could take the message (its buffer
  full), or the channel knows at once that the command cannot run here (``CommandRefused``: the proxy has
  no way to change a server's precision, or no cleanup call configured); ``result["error"]`` says which.
- ``dry-run`` — nothing was meant to happen (``--observe-only``, ``tuner replay``).
- what a channel says of a knob it cannot simply take (``knob_outcome``; the proxy, for the repetition
  penalty): ``not supported`` (no form for it on this engine), ``rejected by upstream`` (the engine answered a
  4xx naming the field), or ``pending`` (it goes with the next request; a ``command_result`` follows, recorded
  as ``applied`` or ``rejected by upstream``).  A ``CommandRefused`` may name its outcome the same way (the
  proxy: ``not supported`` for an admin call the engine does not serve).

Not checked here: whether the inference code *uses* a knob it was given (``c.knobs``).  Each request event
records the temperature, batch size and precision it ran with, which is where that shows.
"""

from __future__ import annotations

from typing import Any, Protocol

from tuner.records import Action, Knobs


class CommandRefused(Exception):
    """Raised by a channel's ``send_command`` that knows at once the command cannot run; ``str()`` says why,
    ``outcome`` what to record (``failed``, or ``not supported``)."""

    def __init__(self, why: str, outcome: str = "failed") -> None:
        super().__init__(why)
        self.outcome = outcome


class Actuator(Protocol):
    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]: ...


class ChannelLike(Protocol):
    def broadcast_knobs(self, knobs: Knobs) -> int: ...
    def send_command(self, cmd: str, args: dict[str, Any]) -> str | None: ...


NO_CLIENT_KNOBS = "the knobs reached no client (none connected, or every client's send buffer was full)"
NO_CLIENT_COMMAND = "no client connected to run the command"


class ChannelActuator:
    """Knobs are broadcast to every connected client (and, once one took them, to clients that connect
    later); precision and cleanup are commands the client runs between batches (``c.poll()``)."""

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
                check = getattr(self.channel, "knob_outcome", None)
                verdict = check(action.knob, getattr(knobs, action.knob, None)) if check is not None else None
                if verdict is not None and verdict[0] != "pending":
                    return verdict
                # precision travels as a command, never as a knob the client would store unconfirmed
                n = self.channel.broadcast_knobs(
                    Knobs(knobs.temperature, knobs.repetition_penalty, knobs.batch_size, None)
                )
                if not n:
                    return "failed", {"error": NO_CLIENT_KNOBS}
                if verdict is not None:
                    return verdict[0], {**verdict[1], "clients": n}
                return "applied", {"clients": n}
        except CommandRefused as exc:
            return exc.outcome, {"error": str(exc)}
        except Exception as exc:  # a broken channel is an outcome, never a crash of the sampler thread
            return "failed", {"error": f"{type(exc).__name__}: {exc}"}
        if cid is None:
            return "failed", {"error": NO_CLIENT_COMMAND}
        return "sent", {"command_id": cid}


class DryRunActuator:
    """Changes nothing; records what would have been done (``--observe-only`` and ``tuner replay``)."""

    def __init__(self) -> None:
        self.log: list[tuple[Action, Knobs]] = []

    def apply(self, action: Action, knobs: Knobs) -> tuple[str, dict[str, Any]]:
        if len(self.log) < 10_000:
            self.log.append((action, knobs))
        return "dry-run", {}
