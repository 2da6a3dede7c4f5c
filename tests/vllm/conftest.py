"""Fixtures of the end-to-end tests against a real vLLM (``make test-vllm``; marker ``vllm``).

``VLLM_LAB`` names a folder where ``vllm-lab install`` put vLLM (``$VLLM_LAB/venv``); without it every test
here is skipped with that reason.  One server for the whole run (it takes ~40 s to ~3 min to start).
``VLLM_TEST_URL=http://HOST:PORT`` uses a server already serving the export instead (for working on the tests).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli import tuner
from tests.vllm.lab import MAX_SEQS, VLLMServer, existing, lab_python, start_vllm


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vllm") / "demo-hf"
    cp = tuner("demo", "--export-hf", str(out), "--quiet", timeout=300)
    assert cp.returncode == 0, cp.stderr
    return out


@pytest.fixture(scope="session")
def vllm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    if os.environ.get("VLLM_TEST_URL"):
        yield existing(os.environ["VLLM_TEST_URL"])
        return
    python = lab_python()
    if python is None:
        pytest.skip("no vLLM: set VLLM_LAB to a folder vllm-lab installed it into (make test-vllm does)")
    demo_export: Path = request.getfixturevalue("demo_export")
    # --max-num-seqs 32: more streams than that wait in vLLM's own queue (num_requests_waiting)
    server = start_vllm(python, demo_export, tmp_path_factory.mktemp("vllm-run"), "--max-num-seqs", str(MAX_SEQS))
    print(f"\nvLLM ready in {server.started_seconds:.0f} s (pid {server.pid}, {server.root})")
    yield server
    server.stop()
