"""``python -m tuner.demo.drive``: the demo's prompt stream sent to an OpenAI-compatible server (here the demo's
own server; against vLLM in tests/vllm)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.cli import tuner_env
from tests.test_demo_serve import DemoServer


def drive(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner.demo.drive", *args], capture_output=True, text=True, timeout=300, env=tuner_env()
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="needs torch (the torch extra): the demo server runs the built-in model")
def test_drive_sends_the_prompt_stream_and_reports_what_came_back() -> None:
    server = DemoServer()
    try:
        cp = drive(
            "--url", server.url, "--requests", "6", "--rate", "20", "--max-new-tokens", "24", "--plain", "--seed", "3"
        )
    finally:
        server.close()
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout.splitlines()[-1])
    assert out["requests_sent"] == out["requests_done"] == 6 and out["requests_failed"] == 0, out
    assert 6 <= out["tokens"] <= 6 * 24 and out["ttft_p50_seconds"] > 0
    assert out["seq_rep_4_mean"] is None or 0 <= out["seq_rep_4_mean"] <= 1


def test_drive_against_nothing_fails_every_request_and_says_why() -> None:
    """Also without torch: the drive only sends HTTP (the fast suite on other Pythons runs without the extra)."""
    cp = drive("--url", "http://127.0.0.1:9/v1", "--requests", "2", "--rate", "50", "--plain")
    assert cp.returncode == 1
    out = json.loads(cp.stdout.splitlines()[-1])
    assert out["requests_failed"] == 2 and out["requests_done"] == 0 and "ConnectError" in out["first_error"]


def test_drive_bad_options_are_one_line() -> None:
    for args, msg in (
        (("--rate", "0"), "--rate and --duration must be more than 0"),
        (("--temperature", "hot"), "--temperature: a number or 'none'"),
        (("--max-new-tokens", "300"), "need 1 <= --min-new-tokens <= --max-new-tokens < 256"),
    ):
        cp = drive("--url", "http://127.0.0.1:9/v1", *args)
        assert cp.returncode == 2 and msg in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
