"""What the inference process loads when it imports ``tuner.client``: the standard library and a few tuner
modules, nothing third-party (the client lives inside users' inference, whose environment we do not own)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli import tuner_env

CLIENT_MODULES = {"tuner", "tuner.client", "tuner.records", "tuner.reclaim", "tuner.link", "tuner.link.wire"}

PROBE = """
import json, sys
before = set(sys.modules)
from tuner import client
after_import = set(sys.modules) - before
client.default_cleanup(["caches", "gc", "empty_cache", "malloc_trim"], [{}])  # what a cleanup command runs
after_cleanup = set(sys.modules) - before
print(json.dumps({"import": sorted(after_import), "cleanup": sorted(after_cleanup)}))
"""


def _foreign(modules: list[str]) -> list[str]:
    """Modules neither of the standard library nor tuner's."""
    return [m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "tuner"]


def test_importing_the_client_loads_only_the_standard_library_and_its_own_modules() -> None:
    cp = subprocess.run([sys.executable, "-c", PROBE], env=tuner_env(), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    for stage in ("import", "cleanup"):
        assert _foreign(got[stage]) == [], stage
        assert {m for m in got[stage] if m.split(".")[0] == "tuner"} == CLIENT_MODULES, stage


def test_the_check_sees_a_third_party_import() -> None:
    """The test above would fail if the client pulled in anything else (here: numpy, as a user's code might)."""
    code = PROBE.replace("from tuner import client", "from tuner import client\nimport numpy")
    cp = subprocess.run([sys.executable, "-c", code], env=tuner_env(), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "numpy" in _foreign(json.loads(cp.stdout)["import"])
