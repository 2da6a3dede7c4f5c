"""CPU package energy from RAPL (``probes/rapl.py``) on canned powercap trees: Intel with DRAM and an MMIO
duplicate, AMD, a counter that wraps, a second package, counters readable by root only (read as another
user, for real), and this VM, which has none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cli import tuner_env
from tuner.probes.rapl import ROOT, RaplProbe

MAX = 262_143_328_850  # a real max_energy_range_uj (a Xeon's package zone)


def zone(root: Path, entry: str, name: str, uj: int, max_uj: int = MAX) -> Path:
    d = root / entry
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "enabled").write_text("1\n")
    return d


def set_uj(d: Path, uj: int) -> None:
    (d / "energy_uj").write_text(f"{uj}\n")


@pytest.fixture
def intel(tmp_path: Path) -> Path:
    zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    zone(tmp_path, "intel-rapl:0:0", "core", 400_000)
    zone(tmp_path, "intel-rapl:0:1", "uncore", 10_000)
    zone(tmp_path, "intel-rapl:0:2", "dram", 300_000)
    zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    zone(tmp_path, "intel-rapl:2", "psys", 9_000_000)
    zone(tmp_path, "intel-rapl-mmio:0", "package-0", 1_000_000)  # the same package again, through MMIO
    (tmp_path / "intel-rapl").mkdir()  # the control type folder
    return tmp_path


def test_intel_packages_and_dram(intel: Path) -> None:
    p = RaplProbe(str(intel))
    assert p.available() is None
    assert p.metrics() == {
        "cpu_package_energy_joules_total/0": "joules",
        "cpu_package_power_watts/0": "watts",
        "cpu_dram_energy_joules_total/0": "joules",
        "cpu_package_energy_joules_total/1": "joules",
        "cpu_package_power_watts/1": "watts",
    }
    first = p.sample(0.0).values
    assert first["cpu_package_energy_joules_total/0"] == 0.0 and first["cpu_package_power_watts/0"] is None
    set_uj(intel / "intel-rapl:0", 1_000_000 + 12_500_000)  # 12.5 J
    set_uj(intel / "intel-rapl:0:2", 300_000 + 2_000_000)
    time.sleep(0.1)
    v = p.sample(0.1).values
    assert v["cpu_package_energy_joules_total/0"] == pytest.approx(12.5)
    assert v["cpu_dram_energy_joules_total/0"] == pytest.approx(2.0)
    assert v["cpu_package_energy_joules_total/1"] == 0.0
    assert 12.5 / 0.3 < v["cpu_package_power_watts/0"] < 12.5 / 0.09  # type: ignore[operator]
    p.close()


def test_a_wrapping_counter_keeps_growing(tmp_path: Path) -> None:
    d = zone(tmp_path, "intel-rapl:0", "package-0", MAX - 1_000_000)
    p = RaplProbe(str(tmp_path))
    assert p.available() is None
    p.sample(0.0)
    set_uj(d, 2_000_000)  # wrapped: 1 J to the top, then 2 J (+1 uJ for the step to 0)
    assert p.sample(0.1).values["cpu_package_energy_joules_total/0"] == pytest.approx(3.0, abs=1e-5)
    set_uj(d, 4_000_000)
    assert p.sample(0.2).values["cpu_package_energy_joules_total/0"] == pytest.approx(5.0, abs=1e-5)


def test_amd_zones(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 7)  # Zen through intel_rapl_msr: same names, no DRAM zone
    zone(tmp_path, "amd-rapl:1", "package-1", 9)
    p = RaplProbe(str(tmp_path))
    assert p.available() is None
    assert sorted(p.metrics()) == [
        "cpu_package_energy_joules_total/0", "cpu_package_energy_joules_total/1",
        "cpu_package_power_watts/0", "cpu_package_power_watts/1",
    ]  # fmt: skip


def test_no_zones_is_a_reason(tmp_path: Path) -> None:
    assert RaplProbe(str(tmp_path / "missing")).available() == (
        f"no RAPL energy counters ({tmp_path / 'missing'} not found: the kernel or VM does not expose them)"
    )
    zone(tmp_path, "intel-rapl:0", "psys", 1)
    assert "no package zone" in (RaplProbe(str(tmp_path)).available() or "")


def test_this_vm_has_none() -> None:
    if os.path.isdir(ROOT) and any(n.startswith(("intel-rapl:", "amd-rapl:")) for n in os.listdir(ROOT)):
        pytest.skip("this machine exposes RAPL")
    reason = RaplProbe().available()
    assert reason is not None and reason.startswith("no RAPL energy counters")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file only root can read")
def test_root_only_counters_read_as_another_user() -> None:
    with tempfile.TemporaryDirectory() as tmp:  # (pytest's tmp_path is under a folder only root may enter)
        tree = Path(tmp) / "powercap"
        d = zone(tree, "intel-rapl:0", "package-0", 1)
        os.chmod(d / "energy_uj", 0o400)  # what Linux 5.10+ does
        for p in (Path(tmp), tree, d):
            os.chmod(p, 0o755)
        assert _as_nobody(tree) == (
            "RAPL energy counters are readable by root only (intel-rapl:0: Linux restricts energy_uj since 5.10, "
            "CVE-2020-8694); run the tuner as root"
        )


def _as_nobody(tree: Path) -> str:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes nobody, for real, and reads the tree with the module already imported
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.write(w, str(RaplProbe(str(tree)).available()).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = b""
    while chunk := os.read(r, 4096):
        got += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return got.decode()


def test_tuner_probes_lists_the_reason() -> None:
    cp = subprocess.run([sys.executable, "-m", "tuner", "probes", "--json"], env=tuner_env(), capture_output=True,
                        text=True, timeout=120)  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    [rapl] = [p for p in json.loads(cp.stdout)["probes"] if p["name"] == "rapl"]
    if rapl["available"]:
        assert any(k.startswith("cpu_package_energy_joules_total/") for k in rapl["values"])
    else:
        assert "RAPL" in rapl["reason"]
