"""Policy presets and TOML files: the presets load and build; every kind of bad file is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, tuner
from tuner.core.actuator import DryRunActuator
from tuner.core.policy_config import PRESETS, build_agent, load_policy
from tuner.errors import UserError


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_build(name: str) -> None:
    cfg = load_policy(name)
    agent = build_agent(cfg, DryRunActuator(), None)
    assert cfg.name == name and agent.policies
    assert set(agent.enabled) == set(cfg.policies)


def test_presets_follow_the_scenarios() -> None:
    inter, off, edge = (load_policy(n) for n in PRESETS)
    assert inter.policies["batch_size"].slo_ttft_p95_s is not None  # latency SLO
    assert inter.policies["temperature"].max <= 1.0  # temperature capped
    assert off.enabled["precision"] is False and off.policies["cleanup"].leak_watch  # full precision, leak watch
    assert edge.agent.priority.index("precision") < edge.agent.priority.index("batch_size")  # precision first


BAD = [
    ("", "empty file"),
    ("[batch_size]\nmin = 1\nmax = 8\nbogus = 3\n", "unknown key batch_size.bogus"),
    ("[mystery]\n", "unknown table [mystery]"),
    ("[batch_size]\nmin = 'one'\n", "batch_size.min must be an integer"),
    ("[batch_size]\nmin = 64\nmax = 8\n", "inverted bounds: batch_size.min = 64 is above batch_size.max = 8"),
    ("[temperature]\nmin = 0.2\nmax = 9.0\n", "temperature.max = 9 is out of range (0 to 5)"),
    ("[temperature]\nband_low = 0.3\nband_high = 0.1\n", "inverted bounds: temperature.band_low"),
    ("[precision]\nladder = ['int8', 'fp32']\n", "must go from more bits to fewer"),
    ("[cleanup]\nsteps = ['gc', 'reboot']\n", "unknown cleanup step 'reboot'"),
    ("[agent]\ncooldown_s = { warp = 3 }\n[cleanup]\n", "unknown knob 'warp'"),
    ("[agent]\npriority = ['cleanup']\n", "no policy table"),
    ("[batch_size\n", "invalid TOML"),
    ("[cleanup]\nenabled = 'yes'\n", "cleanup.enabled must be true or false"),
    ("[cleanup]\nevery_s = 8\n", "cleanup.every_s = 8 is shorter than the cleanup cooldown"),
]


@pytest.mark.parametrize(("text", "msg"), BAD)
def test_bad_files_are_one_line_user_errors(tmp_path: Path, text: str, msg: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(UserError) as ei:
        load_policy(str(f))
    assert msg in str(ei.value)
    assert "\n" not in str(ei.value)


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_policy(str(tmp_path / "nope.toml"))
    with pytest.raises(UserError, match="unknown policy 'fast'"):
        load_policy("fast")


def test_optional_settings_turn_off_with_false(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[batch_size]\nslo_ttft_p95_s = false\n[cleanup]\nevery_s = 60\nleak_watch = false\n")
    g = tmp_path / "q.toml"
    g.write_text("[agent]\ncooldown_s = { cleanup = 5 }\n[cleanup]\nevery_s = 8\n")
    assert load_policy(str(g)).policies["cleanup"].every_s == 8.0
    cfg = load_policy(str(f))
    assert cfg.policies["batch_size"].slo_ttft_p95_s is None
    assert cfg.policies["cleanup"].every_s == 60.0 and not cfg.policies["cleanup"].leak_watch


def test_cli_reports_a_bad_policy_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("[batch_size]\nmin = 64\nmax = 8\n")
    trace = Path(__file__).parent / "replay" / "edge_oom.jsonl"
    err = assert_one_line_error(tuner("replay", str(trace), "--policy", str(f)))
    assert err == f"tuner: policy file {f}: inverted bounds: batch_size.min = 64 is above batch_size.max = 8"
