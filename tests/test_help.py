"""``tuner --help`` and every subcommand's ``--help``: exit 0, usage on stdout, nothing on stderr, at any
terminal width; every option says what it does."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tests.cli import tuner_env
from tuner import __version__
from tuner.commands import COMMANDS, load

SUBCOMMANDS = [m.__name__.rsplit(".", 1)[1] for m in load()]


def _help(*args: str, columns: int = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=tuner_env(COLUMNS=str(columns)),
        stdin=subprocess.DEVNULL,
    )


def test_every_command_is_installed() -> None:
    assert list(COMMANDS) == SUBCOMMANDS


def test_top_level_help_lists_every_subcommand() -> None:
    cp = _help("--help")
    assert cp.returncode == 0 and cp.stderr == ""
    assert cp.stdout.startswith("usage: tuner ")
    for name in COMMANDS:
        assert f"    {name} " in cp.stdout or f"    {name}\n" in cp.stdout, name


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("sub", COMMANDS)
def test_subcommand_help_exits_0(sub: str, flag: str) -> None:
    cp = _help(sub, flag)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""
    assert cp.stdout.startswith(f"usage: tuner {sub}")
    assert "options:" in cp.stdout


@pytest.mark.parametrize("columns", [20, 40, 250])
@pytest.mark.parametrize("sub", ["", "run", "demo", "proxy", "export"])
def test_help_at_any_width(sub: str, columns: int) -> None:
    """argparse wraps usage lines by COLUMNS: a narrow terminal must not break any help page."""
    cp = _help(*([sub] if sub else []), "--help", columns=columns)
    assert cp.returncode == 0 and cp.stderr == "", (sub, columns, cp.stderr)
    assert cp.stdout.startswith("usage: tuner")


def test_version_and_bare_tuner() -> None:
    cp = _help("--version")
    assert cp.returncode == 0 and cp.stdout.strip() == f"tuner {__version__}"
    bare = _help()  # no subcommand: the help, and a usage-error exit code
    assert bare.returncode == 2 and bare.stdout.startswith("usage: tuner ") and "Traceback" not in bare.stderr


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    from tuner.cli import build_parser

    top = build_parser()
    out = [("tuner", top)]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += [(f"tuner {name}", p) for name, p in action.choices.items()]
    return out


@pytest.mark.parametrize(("prog", "parser"), _all_parsers(), ids=[p for p, _ in _all_parsers()])
def test_every_option_has_help(prog: str, parser: argparse.ArgumentParser) -> None:
    missing = [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction) and a.help in (None, "") and a.dest != "help"
    ]
    assert not missing, f"{prog}: options without help: {missing}"
