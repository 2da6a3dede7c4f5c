"""Running the real ``tuner`` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tuner_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TUNER_SOCKET", None)
    env.update(extra)
    return env


@cache
def cannot_run_as_nobody() -> str | None:
    """Why this Python cannot be started as user nobody (uid 65534) with ``setpriv``, or None when it can: a test
    that drops to nobody skips with this reason (pyenv's interpreters under /root, mode 0700, load their libpython
    from there)."""
    if os.geteuid() != 0:
        return "needs root to drop to another user"
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "setpriv not installed"
    cp = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", ""],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    if cp.returncode != 0:
        return f"this Python does not start as nobody: {(cp.stderr.strip().splitlines() or ['?'])[-1][:100]}"
    return None


def tuner(*args: str, timeout: float = 120, cwd: Path | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tuner_env(),
        cwd=cwd,
        **kw,  # type: ignore[arg-type]
    )


def tuner_popen(*args: str, cwd: Path | None = None, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tuner", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=tuner_env(),
        cwd=cwd,
        **kw,  # type: ignore[call-overload]
    )


def assert_one_line_error(cp: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert cp.returncode == code, (cp.returncode, cp.stdout, cp.stderr)
    err = cp.stderr.strip()
    assert "Traceback" not in cp.stderr, cp.stderr
    assert len(err.splitlines()) == 1, cp.stderr
    return err
