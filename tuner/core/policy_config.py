"""Policy presets and files: TOML (``tomllib``), validated with one-line errors, built into an ``Agent``.

A file has an optional ``[agent]`` table (cooldowns, priority, memory-pressure threshold, the time-to-limit
horizon ``limit_horizon_s``) and one table per policy it runs (``[temperature]``, ``[batch_size]``,
``[precision]``, ``[cleanup]``); a policy without a table does not run; ``enabled = false`` loads it switched
off (the live view can switch it on).  Keys are the fields of the policies' config dataclasses; an optional
setting is turned off with ``false``.  Presets: ``policies/presets/{interactive,offline,edge}.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, published as tomli before it joined the standard library
    import tomli as tomllib

from tuner.errors import UserError
from tuner.policies.base import Bounds, Policy
from tuner.policies.batch_size import BatchConfig, BatchSizePolicy
from tuner.policies.cleanup import STEPS, CleanupConfig, CleanupPolicy
from tuner.policies.precision import PrecisionConfig, PrecisionPolicy
from tuner.policies.temperature import TemperatureConfig, TemperaturePolicy
from tuner.records import BITS, PRECISIONS

PRESET_DIR = Path(__file__).resolve().parents[1] / "policies" / "presets"
PRESETS: tuple[str, ...] = ("interactive", "offline", "edge")
KNOBS: tuple[str, ...] = ("temperature", "repetition_penalty", "batch_size", "precision", "cleanup")


@dataclass(frozen=True)
class AgentConfig:
    cooldown_s: dict[str, float] = field(
        default_factory=lambda: {
            "temperature": 10.0,
            "repetition_penalty": 10.0,
            "batch_size": 5.0,
            "precision": 60.0,
            "cleanup": 30.0,
        }
    )
    priority: tuple[str, ...] = ("cleanup", "precision", "batch_size", "temperature")
    pressure_headroom: float | None = 0.10
    limit_horizon_s: float | None = 120.0
    """Memory pressure: the binding memory limit is projected to be reached within this many seconds (the
    working set's floor trend; ``tuner.core.limits``) — cleanup first, then a smaller batch, then a lower
    precision.  ``false``: off."""


POLICY_CLASSES: dict[str, tuple[type, type[Policy]]] = {
    "temperature": (TemperatureConfig, TemperaturePolicy),
    "batch_size": (BatchConfig, BatchSizePolicy),
    "precision": (PrecisionConfig, PrecisionPolicy),
    "cleanup": (CleanupConfig, CleanupPolicy),
}


@dataclass(frozen=True)
class PolicyConfig:
    name: str
    source: str
    agent: AgentConfig
    policies: dict[str, Any]
    """Policy name -> its config dataclass, in file order."""
    enabled: dict[str, bool]

    def bounds(self) -> dict[str, Bounds]:
        b: dict[str, Bounds] = {}
        t = self.policies.get("temperature")
        if t is not None:
            b["temperature"] = Bounds(t.min, t.max)
            b["repetition_penalty"] = Bounds(t.penalty_min, t.penalty_max)
        bs = self.policies.get("batch_size")
        if bs is not None:
            b["batch_size"] = Bounds(bs.min, bs.max)
        p = self.policies.get("precision")
        if p is not None:
            b["precision"] = Bounds(choices=tuple(p.ladder))
        return b


# -- loading ----------------------------------------------------------------------------------------
def load_policy(name_or_path: str) -> PolicyConfig:
    """A preset by name (``interactive``, ``offline``, ``edge``) or a TOML file.  One-line UserError on
    anything wrong."""
    if name_or_path in PRESETS:
        path = PRESET_DIR / f"{name_or_path}.toml"
        label = name_or_path
    else:
        path = Path(name_or_path)
        label = str(path)
        if not path.suffix and not path.exists():
            raise UserError(f"unknown policy {name_or_path!r}: use one of {', '.join(PRESETS)} or a .toml file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"policy file {label}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"policy file {label}: is a directory") from None
    except PermissionError:
        raise UserError(f"policy file {label}: permission denied") from None
    if not raw.strip():
        raise UserError(f"policy file {label}: empty file (it needs at least one policy table, e.g. [batch_size])")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"policy file {label}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"policy file {label}: invalid TOML ({exc})") from None
    name = name_or_path if name_or_path in PRESETS else path.stem
    return parse_policy(data, name=name, source=label)


def parse_policy(data: dict[str, Any], *, name: str = "custom", source: str = "<dict>") -> PolicyConfig:
    def fail(msg: str) -> UserError:
        return UserError(f"policy file {source}: {msg}")

    unknown = [k for k in data if k != "agent" and k not in POLICY_CLASSES]
    if unknown:
        raise fail(f"unknown table [{unknown[0]}] (known: agent, {', '.join(POLICY_CLASSES)})")
    for k, v in data.items():
        if not isinstance(v, dict):
            raise fail(f"'{k}' must be a table ([{k}]), not a {type(v).__name__}")
    agent = _build(AgentConfig, data.get("agent", {}), "agent", fail)
    for knob, s in agent.cooldown_s.items():
        if knob not in KNOBS:
            raise fail(f"agent.cooldown_s: unknown knob {knob!r} (known: {', '.join(KNOBS)})")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not (0 <= s <= 3600):
            raise fail(f"agent.cooldown_s.{knob} = {s!r} is out of range (0 to 3600 seconds)")
    cool = dict(AgentConfig().cooldown_s)
    cool.update({k: float(v) for k, v in agent.cooldown_s.items()})
    agent = dataclasses.replace(agent, cooldown_s=cool)
    for p in agent.priority:
        if p not in POLICY_CLASSES:
            raise fail(f"agent.priority: unknown policy {p!r}")
    if agent.pressure_headroom is not None and not 0 <= agent.pressure_headroom <= 1:
        raise fail(f"agent.pressure_headroom = {agent.pressure_headroom} is out of range (0 to 1)")
    if agent.limit_horizon_s is not None and not 1 <= agent.limit_horizon_s <= 86_400:
        raise fail(f"agent.limit_horizon_s = {agent.limit_horizon_s:g} is out of range (1 to 86400 seconds)")
    policies: dict[str, Any] = {}
    enabled: dict[str, bool] = {}
    for pname, table in data.items():
        if pname == "agent":
            continue
        table = dict(table)
        en = table.pop("enabled", True)
        if not isinstance(en, bool):
            raise fail(f"{pname}.enabled must be true or false, not {en!r}")
        cfg_cls, _ = POLICY_CLASSES[pname]
        cfg = _build(cfg_cls, table, pname, fail)
        _check(pname, cfg, fail)
        policies[pname] = cfg
        enabled[pname] = en
    if not policies:
        raise fail("no policy table (add at least one of [temperature], [batch_size], [precision], [cleanup])")
    cl = policies.get("cleanup")
    if cl is not None and cl.every_s is not None and cl.every_s < cool["cleanup"]:
        raise fail(
            f"cleanup.every_s = {cl.every_s:g} is shorter than the cleanup cooldown (agent.cooldown_s.cleanup = "
            f"{cool['cleanup']:g}): lower the cooldown or lengthen the interval"
        )
    config = PolicyConfig(name=name, source=source, agent=agent, policies=policies, enabled=enabled)
    for pname, cfg in policies.items():  # built once now: a setting a policy rejects fails before a run starts
        try:
            POLICY_CLASSES[pname][1](cfg)  # type: ignore[call-arg]
        except Exception as exc:
            raise fail(f"[{pname}] cannot be used: {type(exc).__name__}: {exc}") from None
    return config


def _build(cls: type, table: dict[str, Any], section: str, fail: Any) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            raise fail(f"unknown key {section}.{key} (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", fail)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str, fail: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if value is False:
            return None
        return _coerce(value, inner[0], where, fail)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"{where} must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"{where} must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"{where} must be a number, not {value!r}")
        return float(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise fail(f"{where} must be a list of strings, not {value!r}")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(f"{where} must be a table, not {value!r}")
        return dict(value)
    return value


def _check(pname: str, cfg: Any, fail: Any) -> None:
    def rng(key: str, lo: float, hi: float) -> None:
        v = getattr(cfg, key)
        if v is not None and not lo <= v <= hi:
            raise fail(f"{pname}.{key} = {v:g} is out of range ({lo:g} to {hi:g})")

    def order(a: str, b: str) -> None:
        va, vb = getattr(cfg, a), getattr(cfg, b)
        if va is not None and vb is not None and va > vb:
            raise fail(f"inverted bounds: {pname}.{a} = {va:g} is above {pname}.{b} = {vb:g}")

    for f in dataclasses.fields(cfg):  # every setting is a size, a share, a count or a time: none is negative
        v = getattr(cfg, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise fail(f"{pname}.{f.name} = {v:g} must not be negative")
    if isinstance(cfg, TemperatureConfig):
        for k in ("min", "max", "requested"):
            rng(k, 0.0, 5.0)
        for k in ("band_low", "band_high", "hysteresis"):
            rng(k, 0.0, 1.0)
        rng("max_step", 0.001, 5.0)
        rng("probe_step", 0.001, 5.0)
        rng("penalty_min", 0.5, 3.0)
        rng("penalty_max", 0.5, 3.0)
        rng("penalty_step", 0.0, 1.0)
        rng("min_requests", 1, 100_000)
        rng("memory_s", 1.0, 86_400.0)
        rng("sign_z", 0.0, 10.0)
        rng("contrary_z", 0.0, 10.0)
        rng("min_correct_step", 0.0, 5.0)
        if cfg.prior not in ("falls", "rises", "none"):
            raise fail(f"{pname}.prior = {cfg.prior!r}: use falls, rises or none")
        rng("edge_z", 0.0, 10.0)
        rng("window_responses", 0, 100_000)
        rng("window_z", 0.0, 10.0)
        rng("dwell_min_s", 0.0, 86_400.0)
        rng("dwell_s", 0.0, 86_400.0)
        rng("local_span", 0.0, 5.0)
        rng("consistency_floor", 0.0, 1.0)
        rng("consistency_min", 1, 100_000)
        rng("consistency_wait_s", 0.0, 86_400.0)
        rng("consistency_z", 0.0, 10.0)
        order("min", "max")
        order("band_low", "band_high")
        order("penalty_min", "penalty_max")
        if cfg.requested is not None and not cfg.min <= cfg.requested <= cfg.max:
            raise fail(f"{pname}.requested = {cfg.requested:g} is outside [min, max] = [{cfg.min:g}, {cfg.max:g}]")
    elif isinstance(cfg, BatchConfig):
        rng("min", 1, 1 << 16)
        rng("max", 1, 1 << 16)
        order("min", "max")
        if cfg.start is not None and not cfg.min <= cfg.start <= cfg.max:
            raise fail(f"{pname}.start = {cfg.start} is outside [min, max] = [{cfg.min}, {cfg.max}]")
        for k in ("min_gain", "knee_tolerance", "min_headroom", "ceiling_release"):
            rng(k, 0.0, 1.0)
        rng("retune_shift", 0.01, 100.0)
        rng("measure_s", 0.1, 3600.0)
        rng("settle_s", 0.0, 3600.0)
        rng("min_requests", 1, 100_000)
        rng("slo_ttft_p95_s", 0.0, 3600.0)
        rng("slo_tpot_p95_s", 0.0, 3600.0)
        rng("max_wait_s", 0.0, 86_400.0)
        rng("refine_min_gap", 1, 1 << 16)
        rng("refine_min_frac", 0.0, 1.0)
        rng("min_batches", 1, 1000)
        _steps(pname, cfg.cleanup_steps, fail)
    elif isinstance(cfg, PrecisionConfig):
        if not cfg.ladder or any(p not in PRECISIONS for p in cfg.ladder):
            raise fail(f"{pname}.ladder must list precisions from {', '.join(PRECISIONS)}, got {list(cfg.ladder)}")

        bits = [BITS[p] for p in cfg.ladder]
        if bits != sorted(bits, reverse=True) or len(set(cfg.ladder)) != len(cfg.ladder):
            raise fail(f"{pname}.ladder must go from more bits to fewer without repeats, got {list(cfg.ladder)}")
        for k in ("min_headroom", "release_headroom", "max_slowdown", "min_top1"):
            rng(k, 0.0, 1.0)
        order("min_headroom", "release_headroom")
        rng("max_kl", 0.0, 100.0)
        rng("min_reference", 0.0, 1.0)
        rng("reference_wait_s", 0.0, 86_400.0)
        rng("hold_s", 0.0, 86_400.0)
        rng("slo_ttft_p95_s", 0.0, 3600.0)
        for k in ("trigger_s", "settle_s", "retry_s", "batch_tried_s"):
            rng(k, 0.0, 86_400.0)
    elif isinstance(cfg, CleanupConfig):
        rng("every_requests", 1, 10**9)
        rng("every_s", 0.1, 86_400.0)
        rng("min_requests", 20, 10**9)
        rng("alpha", 1e-9, 0.5)
        rng("max_backoff", 1, 1 << 20)
        rng("sample_every_s", 0.0, 3600.0)
        rng("check_every_s", 0.0, 86_400.0)
        rng("max_points", 10, 10_000_000)
        rng("min_rel_growth", 0.0, 10.0)
        rng("min_reclaim_bytes", 0.0, 1e15)
        rng("result_timeout_s", 0.1, 86_400.0)
        rng("projection_every_s", 1.0, 86_400.0)
        _steps(pname, cfg.steps, fail)


def _steps(pname: str, steps: tuple[str, ...], fail: Any) -> None:
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise fail(
            f"{pname}: unknown cleanup step {bad[0]!r} (use {', '.join(STEPS)})"
            if bad
            else f"{pname}: the cleanup steps list is empty"
        )


# -- building ---------------------------------------------------------------------------------------
def build_policies(config: PolicyConfig) -> list[Policy]:
    out: list[Policy] = []
    for pname, cfg in config.policies.items():
        _, cls = POLICY_CLASSES[pname]
        out.append(cls(cfg))  # type: ignore[call-arg]
    return out


def build_agent(config: PolicyConfig, actuator: Any, writer: Any, observe_only: bool = False, **kw: Any) -> Any:
    """The agent for ``config``: its policies (switched on as the file says), an arbiter with the
    configured bounds/cooldowns/priority, ``actuator`` (a dry run whatever it is when ``observe_only``)."""
    from tuner.core.actuator import DryRunActuator
    from tuner.core.agent import Agent
    from tuner.core.arbiter import Arbiter

    if observe_only and not isinstance(actuator, DryRunActuator):
        actuator = DryRunActuator()
    arbiter = Arbiter(
        bounds=config.bounds(),
        cooldown_s=dict(config.agent.cooldown_s),
        priority=tuple(config.agent.priority),
        pressure_headroom=config.agent.pressure_headroom,
    )
    agent = Agent(build_policies(config), arbiter, actuator, writer, observe_only=observe_only, **kw)
    agent.window.horizon_s = config.agent.limit_horizon_s
    for pname, en in config.enabled.items():
        if not en:
            agent.set_enabled(pname, False)
    return agent
