"""The real ``tuner tui`` in a real terminal (tmux): a writer process appends a trace at 10 Hz, the TUI
follows it, the numbers on screen change, and ``q`` leaves with the terminal restored."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TMUX = shutil.which("tmux")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run installs it)"),
]


class Tmux:
    def __init__(self, width: int = 120, height: int = 40) -> None:
        self.sock = f"tuner-test-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        env.update(PYTHONPATH=str(ROOT), TERM="xterm-256color", PS1="$ ")
        self.env = env
        self.run("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "t", "bash --norc --noprofile")
        self.run("set-option", "-g", "status", "off")

    def run(self, *args: str) -> str:
        assert TMUX is not None
        cp = subprocess.run([TMUX, "-L", self.sock, *args], capture_output=True, text=True, env=self.env, timeout=20)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout

    def send(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def wait(self, cond: Callable[[str], bool], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        s = self.screen()
        while not cond(s):
            if time.monotonic() > deadline:
                raise AssertionError("screen never matched:\n" + s)
            time.sleep(0.2)
            s = self.screen()
        return s

    def kill(self) -> None:
        assert TMUX is not None
        subprocess.run([TMUX, "-L", self.sock, "kill-server"], capture_output=True, timeout=20)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux()
    try:
        yield t
    finally:
        t.kill()


def test_follow_growing_trace_in_tmux(tmux: Tmux, tmp_path: Path) -> None:
    trace = tmp_path / "growing.jsonl"
    writer = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "helpers" / "make_synthetic_trace.py"),
            str(trace),
            "--seconds",
            "60",
            "--realtime",
        ],
        env=tmux.env,
    )
    try:
        deadline = time.monotonic() + 20
        while not (trace.exists() and trace.stat().st_size > 0):
            assert time.monotonic() < deadline, "writer did not start"
            time.sleep(0.05)
        tmux.send(f"cd {ROOT} && {sys.executable} -m tuner tui {trace}; echo TUI-EXIT=$?", "Enter")
        first = tmux.wait(lambda s: "CPU tree" in s and re.search(r"up 00:0[1-9]", s) is not None)
        up1 = re.search(r"up (\d\d:\d\d)", first)
        assert up1 and "FOLLOW" in first and "no GPU: NVML library not found" in first
        later = tmux.wait(lambda s: (m := re.search(r"up (\d\d:\d\d)", s)) is not None and m.group(1) > up1.group(1))
        assert "CPU tree" in later
        # live numbers change as the writer appends (uptime from trace time, the request table fills)
        tmux.wait(lambda s: re.search(r"\d\d:\d\d\s+r\d+", s) is not None, timeout=30)
        tmux.send("q")
        final = tmux.wait(lambda s: re.search(r"^TUI-EXIT=\d+", s, re.M) is not None, timeout=20)
        assert re.search(r"^TUI-EXIT=0$", final, re.M), final
        assert "FOLLOW" not in final and "CPU tree" not in final  # alternate screen left: the shell is back
        assert "Traceback" not in final
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.slow
def test_connect_to_running_demo_in_tmux(tmux: Tmux, tmp_path: Path) -> None:
    """Against a real ``tuner demo`` session: its observer socket feeds the TUI; q leaves the demo running."""
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuner",
            "demo",
            "--headless",
            "--duration",
            "60",
            "--rate",
            "2",
            "--trace",
            str(tmp_path / "demo.jsonl"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=tmux.env,
        cwd=tmp_path,
    )
    try:
        assert demo.stderr is not None
        sock = None
        deadline = time.monotonic() + 60
        while sock is None and time.monotonic() < deadline:
            line = demo.stderr.readline()
            if not line:
                break
            m = re.search(r"tuner tui --connect (\S+)", line)
            sock = m.group(1) if m else None
        assert sock, "the demo did not print its live-view socket"
        tmux.send(f"cd {ROOT} && {sys.executable} -m tuner tui --connect {sock}; echo TUI-EXIT=$?", "Enter")
        first = tmux.wait(lambda s: "LIVE" in s and "CPU tree" in s and re.search(r"up \d\d:\d\d", s) is not None)
        up1 = re.search(r"up (\d\d:\d\d)", first)
        assert up1 and "no GPU:" in first
        tmux.wait(lambda s: (m := re.search(r"up (\d\d:\d\d)", s)) is not None and m.group(1) > up1.group(1))
        tmux.wait(lambda s: "TTFT  p50" in s, timeout=60)  # requests measured by the demo's client
        tmux.send("q")
        final = tmux.wait(lambda s: re.search(r"^TUI-EXIT=\d+", s, re.M) is not None, timeout=20)
        assert re.search(r"^TUI-EXIT=0$", final, re.M), final
        assert demo.poll() is None  # the viewer leaving does not disturb the session
    finally:
        demo.terminate()
        try:
            demo.wait(timeout=20)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
