"""What the NVIDIA probe records beyond the basics (issue 16): identity, energy, clocks and their reasons,
cadences, buses, health counters, XID events, MIG instances, graphics/MPS processes, which devices the
inference uses (``CUDA_VISIBLE_DEVICES``), and per-process figures that cannot be attributed (a PID
namespace, MIG without privileges, WDDM) — ``None`` with the reason, never 0.0."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from tests.fakes.fake_pynvml import FakeGpu, FakeMig, GiB, MiB, a100_80gb, h200, make_fake_pynvml, rtx_4090
from tuner.probes import nvidia
from tuner.probes.nvidia import NvidiaProbe, clock_reason_words, cuda_order, resolve_visible

ME = os.getpid()


def _probe(*gpus: FakeGpu, tree: Any = (ME,), **kw: Any) -> NvidiaProbe:
    probe_kw = {k: kw.pop(k) for k in ("proc", "root") if k in kw}
    p = NvidiaProbe(tree, nvml=make_fake_pynvml(gpus, **kw), **probe_kw)
    assert p.available() is None
    return p


def _proc_root(tmp_path: Path, *, ns: int = nvidia.INITIAL_PID_NS, env: dict[int, dict[str, str]] | None = None) -> str:
    """A procfs stand-in: ``self/ns/pid`` and ``<pid>/environ`` (the two files the probe reads there)."""
    (tmp_path / "self" / "ns").mkdir(parents=True)
    os.symlink(f"pid:[{ns}]", tmp_path / "self" / "ns" / "pid")
    for pid, variables in (env or {}).items():
        (tmp_path / str(pid)).mkdir()
        raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in {"PATH": "/usr/bin", **variables}.items())
        (tmp_path / str(pid) / "environ").write_bytes(raw)
    return str(tmp_path)


@pytest.fixture
def other() -> Iterator[int]:
    """A live process outside the watched tree."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


# -- identity -----------------------------------------------------------------------------------------------
def test_identity_goes_to_the_header() -> None:
    p = _probe(a100_80gb(), rtx_4090(), tree=None)
    d = p.describe()
    assert d["driver_version"] == "570.124.06" and d["cuda_driver_version"] == "12.8"
    gpu0, gpu1 = d["devices"]
    assert gpu0["name"] == "NVIDIA A100-SXM4-80GB" and gpu0["uuid"].startswith("GPU-")
    assert gpu0["pci_bus_id"] == "00000000:17:00.0" and gpu1["pci_bus_id"] == "00000000:37:00.0"
    assert gpu0["memory_total_bytes"] == 81920 * MiB and gpu0["mig_mode"] is False and gpu1["mig_mode"] is None
    assert gpu0["compute_capability"] == "8.0" and gpu0["sm_clock_max_hertz"] == 1410e6 and gpu0["nvlinks"] == 12
    assert "selection" not in d  # no tree: nothing to attribute
    assert "GPU 0 NVIDIA A100-SXM4-80GB" in p.summary() and "driver 570.124.06, CUDA 12.8" in p.summary()


# -- energy, power, clocks ------------------------------------------------------------------------------------
def test_energy_counter_follows_the_power_draw() -> None:
    gpu = h200(power_mw=250_000)
    p = _probe(gpu)
    e0 = p.sample(0.0).values["gpu_energy_joules_total/0"]
    t0 = time.monotonic()
    time.sleep(0.3)
    v = p.sample(0.3).values
    dt = time.monotonic() - t0
    assert e0 is not None and v["gpu_energy_joules_total/0"] is not None
    assert v["gpu_energy_joules_total/0"] - e0 == pytest.approx(250.0 * dt, rel=0.15)
    assert v["gpu_power_watts/0"] == 250.0


def test_energy_not_supported_before_volta_is_a_reason() -> None:
    p = _probe(a100_80gb(energy_supported=False))
    assert p.sample(0.0).values["gpu_energy_joules_total/0"] is None
    assert p.unsupported["gpu_energy_joules_total/0"] == "Not Supported (NVML, GPU 0)"


def test_clock_event_reasons_are_words_when_they_change() -> None:
    gpu = a100_80gb()
    p = _probe(gpu)
    assert not [e for e in p.sample(0.0).events if e.kind == "gpu_clock_reasons"]  # none at the start: quiet
    gpu.clock_reasons = 0x4 | 0x40
    gpu.sm_clock_mhz, gpu.pstate = 1095, 2
    s = p.sample(0.1)
    [ev] = [e for e in s.events if e.kind == "gpu_clock_reasons"]
    assert ev.data == {"device": 0, "reasons": ["power cap", "HW thermal slowdown"], "mask": 0x44}
    assert s.values["gpu_clock_event_reasons/0"] == 2.0
    assert s.values["gpu_sm_clock_hertz/0"] == 1095e6 and s.values["gpu_pstate/0"] == 2.0
    assert not [e for e in p.sample(0.2).events if e.kind == "gpu_clock_reasons"]  # unchanged: no event
    gpu.clock_reasons = 0
    [ev] = [e for e in p.sample(0.3).events if e.kind == "gpu_clock_reasons"]
    assert ev.data["reasons"] == []
    assert clock_reason_words(0x1 | 0x10 | 0x8000) == ["idle", "sync boost", "other (0x8000)"]


def test_old_driver_uses_the_throttle_reasons_call_and_the_old_temperature_call() -> None:
    gpu = a100_80gb(clock_reasons=0x4)
    p = _probe(gpu, driver_has_event_reasons=False, driver_has_temperature_v=False)
    for k in range(3):
        v = p.sample(0.1 * k).values
        assert v["gpu_clock_event_reasons/0"] == 1.0 and v["gpu_temp_celsius/0"] == 54.0
    calls = p._nvml.calls  # type: ignore[union-attr]
    assert calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1 and calls["nvmlDeviceGetTemperatureV"] == 1
    assert calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3 and calls["nvmlDeviceGetTemperature"] == 3
    assert p.unsupported == {"gpu_retired_pages_total/0": "Not Supported (NVML, GPU 0)"}


def test_binding_without_temperature_v_uses_the_old_call() -> None:
    p = _probe(rtx_4090(), binding_has_temperature_v=False)
    assert p.sample(0.0).values["gpu_temp_celsius/0"] == 63.0
    assert p._nvml.calls["nvmlDeviceGetTemperature"] == 1  # type: ignore[union-attr]
    new = _probe(rtx_4090())
    new.sample(0.0)
    assert new._nvml.calls["nvmlDeviceGetTemperatureV"] == 1 and new._nvml.calls["nvmlDeviceGetTemperature"] == 0  # type: ignore[union-attr]


# -- cadences and buses -----------------------------------------------------------------------------------------
def test_cadences_identity_once_bus_each_second_health_each_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = a100_80gb(pcie_tx_kbps=100_000, pcie_rx_kbps=300_000, nvlink_tx_kibps=1000.0, nvlink_rx_kibps=0.0)
    p = _probe(gpu)
    calls = p._nvml.calls  # type: ignore[union-attr]
    names = calls["nvmlDeviceGetName"]
    first = p.sample(0.0).values
    assert first["gpu_ecc_corrected_errors_total/0"] == 0.0
    for k in range(4):
        v = p.sample(0.1 * (k + 1)).values
        assert "gpu_ecc_corrected_errors_total/0" not in v and "gpu_pcie_tx_bytes_per_second/0" not in v
        assert v["gpu_power_watts/0"] is not None and v["gpu_energy_joules_total/0"] is not None
    assert calls["nvmlDeviceGetTotalEccErrors"] == 2 and calls["nvmlDeviceGetFieldValues"] == 2  # + link count
    assert calls["nvmlDeviceGetName"] == names  # identity: once, at the start
    time.sleep(1.05)
    v = p.sample(1.5).values
    assert calls["nvmlDeviceGetFieldValues"] == 3
    assert v["gpu_pcie_tx_bytes_per_second/0"] == pytest.approx(100e6, rel=0.05)  # from the field counters
    assert v["gpu_pcie_rx_bytes_per_second/0"] == pytest.approx(300e6, rel=0.05)
    assert v["gpu_nvlink_tx_bytes_per_second/0"] == pytest.approx(1000.0 * 1024, rel=0.05)
    assert v["gpu_nvlink_rx_bytes_per_second/0"] == 0.0
    assert calls["nvmlDeviceGetPcieThroughput"] == 0  # counters: the 20 ms sampling call is not needed
    monkeypatch.setattr(nvidia, "HEALTH_EVERY_S", 0.0)
    assert p.sample(1.6).values["gpu_ecc_corrected_errors_total/0"] == 0.0
    assert calls["nvmlDeviceGetTotalEccErrors"] == 4


def test_pcie_without_field_counters_samples_once_a_second() -> None:
    gpu = rtx_4090(pcie_counters=False, pcie_tx_kbps=2000, pcie_rx_kbps=5000)
    p = _probe(gpu, driver_has_field_values=False)
    v = p.sample(0.0).values
    assert v["gpu_pcie_tx_bytes_per_second/0"] == 2000 * 1024.0 and v["gpu_pcie_rx_bytes_per_second/0"] == 5000 * 1024.0
    for k in range(3):
        p.sample(0.1 * (k + 1))
    assert p._nvml.calls["nvmlDeviceGetPcieThroughput"] == 2  # type: ignore[union-attr]  # TX + RX, once


def test_health_counters_and_a_pending_row_remap() -> None:
    gpu = a100_80gb(ecc=(12, 1), remapped_rows=(3, 1, 1, 0))
    p = _probe(gpu)
    v = p.sample(0.0).values
    assert v["gpu_ecc_corrected_errors_total/0"] == 12.0 and v["gpu_ecc_uncorrected_errors_total/0"] == 1.0
    assert v["gpu_remapped_rows_total/0"] == 4.0
    notes = p.take_notes()
    assert ("GPU 0: a row remapping is pending (reset the GPU to apply it)", "warn") in notes
    volta = _probe(a100_80gb(name="Tesla V100-SXM2-32GB", remapped_rows=None, retired_pages={0: [1, 2], 1: [3]}))
    v = volta.sample(0.0).values
    assert v["gpu_retired_pages_total/0"] == 3.0 and v["gpu_remapped_rows_total/0"] is None


def test_xid_errors_are_events_counts_and_notes() -> None:
    p = _probe(a100_80gb(), rtx_4090(xid_supported=False))
    assert p.sample(0.0).values["gpu_xid_errors_total/0"] == 0.0
    assert "gpu_xid_errors_total/1" in p.unsupported
    p._nvml.fire_xid(0, 79)  # type: ignore[union-attr]
    deadline = time.monotonic() + 2.0
    events: list[Any] = []
    while not events and time.monotonic() < deadline:
        s = p.sample(0.1)
        events = [e for e in s.events if e.kind == "gpu_xid"]
        time.sleep(0.02)
    assert [e.data for e in events] == [{"device": 0, "xid": 79, "meaning": "GPU has fallen off the bus"}]
    assert s.values["gpu_xid_errors_total/0"] == 1.0
    assert ("GPU 0 reported XID 79 (GPU has fallen off the bus)", "warn") in p.take_notes()
    p.close()
    assert p._xid_thread is not None and not p._xid_thread.is_alive()


# -- processes -------------------------------------------------------------------------------------------------------
def test_graphics_and_mps_processes_count_for_the_tree(other: int) -> None:
    gpu = h200(
        processes=[(other, 3 * GiB)],
        graphics=[(ME, 100 * MiB)],
        mps=[(ME, 5 * GiB)],
        sm_util={ME: 20},
    )
    p = _probe(gpu)
    s = p.sample(0.0)
    v = s.values
    assert v["gpu_tree_mem_bytes/0"] == 5 * GiB  # one process in two lists: its memory once (the larger)
    assert v["gpu_tree_procs/0"] == 1.0 and v["gpu_other_procs/0"] == 1.0
    assert s.procs == {ME: {"gpu_mem_bytes/0": 5 * GiB, "gpu_sm_ratio/0": 0.2}}


def test_graphics_only_neighbours_do_not_compute(other: int) -> None:
    p = _probe(rtx_4090(processes=[(ME, GiB)], graphics=[(other, 80 * MiB)]))
    v = p.sample(0.0).values
    assert v["gpu_tree_procs/0"] == 1.0 and v["gpu_other_procs/0"] == 0.0  # Xorg draws; it does not compute


def test_mig_instances_have_their_own_memory_and_tree() -> None:
    migs = [FakeMig(1, 0, 40 * GiB, 12 * GiB, processes=[(ME, 11 * GiB)]), FakeMig(2, 0, 20 * GiB, 3 * GiB)]
    gpu = a100_80gb(mig=True, mig_devices=migs, mig_privileged=True, processes=[])
    p = _probe(gpu)
    keys = p.metrics()
    assert keys["gpu_mem_used_bytes/0:0"] == "bytes" and keys["gpu_tree_mem_bytes/0:1"] == "bytes"
    v = p.sample(0.0).values
    assert v["gpu_mem_used_bytes/0:0"] == 12 * GiB and v["gpu_mem_total_bytes/0:0"] == 40 * GiB
    assert v["gpu_mem_used_bytes/0:1"] == 3 * GiB
    assert v["gpu_tree_mem_bytes/0:0"] == 11 * GiB and v["gpu_tree_procs/0:0"] == 1.0
    assert v["gpu_tree_mem_bytes/0:1"] == 0.0
    assert v["gpu_tree_mem_bytes/0"] == 11 * GiB  # the parent's list (privileged) holds every instance's
    assert v["gpu_util_ratio/0"] is None  # MIG: no device utilization
    mig = p.describe()["devices"][0]["mig"]
    assert [m["key"] for m in mig] == ["0:0", "0:1"] and mig[0]["uuid"].startswith("MIG-")
    assert (mig[0]["gpu_instance_id"], mig[0]["compute_instance_id"]) == (1, 0)


def test_mig_without_privileges_is_none_with_the_reason() -> None:
    migs = [FakeMig(1, 0, 40 * GiB, 12 * GiB, processes=[(ME, 11 * GiB)])]
    p = _probe(a100_80gb(mig=True, mig_devices=migs))
    for k in range(3):
        v = p.sample(0.1 * k).values
        assert v["gpu_tree_mem_bytes/0:0"] is None and v["gpu_tree_mem_bytes/0"] is None  # never 0.0
        assert v["gpu_mem_used_bytes/0:0"] == 12 * GiB
    assert "MIG without privileges" in p.unsupported["gpu_tree_mem_bytes/0:0"]
    assert "MIG without privileges" in p.unsupported["gpu_tree_mem_bytes/0"]
    assert "MIG without privileges" in (p.describe()["attribution"] or "")


def test_mig_switched_on_then_off_mid_run(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = a100_80gb(processes=[(ME, GiB)])
    p = _probe(gpu)
    assert p.sample(0.0).values["gpu_util_ratio/0"] == pytest.approx(0.87)
    gpu.mig, gpu.mig_devices = True, [FakeMig(1, 0, 40 * GiB, 2 * GiB)]
    monkeypatch.setattr(nvidia, "HEALTH_EVERY_S", 0.0)
    v = p.sample(0.1).values
    assert v["gpu_util_ratio/0"] is None and "gpu_util_ratio/0" in p.unsupported
    v = p.sample(0.2).values
    assert v["gpu_mem_used_bytes/0:0"] == 2 * GiB and "gpu_mem_used_bytes/0:0" in p.metrics()
    assert any("MIG mode switched on" in m for m, _ in p.take_notes())
    gpu.mig = False
    p.sample(0.3)
    v = p.sample(0.4).values
    assert v["gpu_util_ratio/0"] == pytest.approx(0.87)  # asked again: MIG no longer forbids it
    assert "gpu_util_ratio/0" not in p.unsupported and "gpu_mem_used_bytes/0:0" not in p.metrics()


def test_another_pid_namespace_makes_per_process_figures_unknown(tmp_path: Path) -> None:
    proc = _proc_root(tmp_path, ns=4026532198)
    p = _probe(a100_80gb(processes=[(ME, 4 * GiB)], sm_util={ME: 50}), proc=proc)
    s = p.sample(0.0)
    for key in ("gpu_tree_mem_bytes/0", "gpu_tree_sm_ratio/0", "gpu_tree_procs/0", "gpu_other_procs/0"):
        assert s.values[key] is None  # not 0.0: the tree's share is unknown
        assert "PID namespace other than the host's (pid:[4026532198])" in p.unsupported[key]
    assert s.procs is None
    assert s.values["gpu_mem_used_bytes/0"] == 61234 * MiB
    assert "PID namespace" in p.describe()["attribution"]
    notes = [m for m, _ in p.take_notes()]
    assert any(m.startswith("gpu_tree_mem_bytes/0, gpu_tree_sm_ratio/0") for m in notes)


def test_wddm_has_no_per_process_memory() -> None:
    p = _probe(rtx_4090(driver_model=pynvml.NVML_DRIVER_WDDM, processes=[(ME, GiB)]))
    v = p.sample(0.0).values
    assert v["gpu_tree_mem_bytes/0"] is None and "WDDM" in p.unsupported["gpu_tree_mem_bytes/0"]
    assert p.describe()["devices"][0]["driver_model"] == "WDDM"


# -- which devices the inference uses ------------------------------------------------------------------------
def _two(**kw: Any) -> list[FakeGpu]:
    return [a100_80gb(), rtx_4090(**kw)]


@pytest.mark.parametrize(
    ("env", "visible"),
    [
        ({}, ["1", "0"]),  # in CUDA's order: fastest first
        ({"CUDA_VISIBLE_DEVICES": "1"}, ["0"]),  # fastest first: the 4090 (8.9) is CUDA's device 0
        ({"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ["1"]),
        ({"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ["0", "1"]),
        ({"CUDA_VISIBLE_DEVICES": "GPU-5a0e0001"}, ["1"]),  # a UUID prefix
        ({"CUDA_VISIBLE_DEVICES": "GPU-5a0e000"}, []),  # ambiguous prefix: names nothing, the list ends
        ({"CUDA_VISIBLE_DEVICES": "1,bogus,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ["1"]),
        ({"CUDA_VISIBLE_DEVICES": "0,0"}, []),  # a device twice: CUDA refuses the list
        ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
        ({"CUDA_VISIBLE_DEVICES": ""}, []),
        ({"CUDA_VISIBLE_DEVICES": "2"}, []),
    ],
)
def test_cuda_visible_devices_of_the_watched_process(tmp_path: Path, env: dict[str, str], visible: list[str]) -> None:
    proc = _proc_root(tmp_path, env={4242: env})
    p = _probe(*_two(), tree=[4242], proc=proc)
    sel = p.describe()["selection"]
    assert sel["visible"] == visible and sel["pid"] == 4242
    v = p.sample(0.0).values
    assert [k for k in ("0", "1") if v[f"gpu_tree_cuda_devices/{k}"] == 1.0] == sorted(visible)
    # two different models: the fastest-first order is an estimate, and the header says so
    assert ("order_note" in sel) == (env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID")


def test_mig_uuid_in_cuda_visible_devices(tmp_path: Path) -> None:
    migs = [FakeMig(1, 0, 40 * GiB, GiB), FakeMig(2, 0, 20 * GiB, GiB)]
    gpus = [a100_80gb(mig=True, mig_devices=migs, mig_privileged=True), a100_80gb()]
    nvml = make_fake_pynvml(gpus)
    uuid = gpus[0].mig_devices[1].uuid
    proc = _proc_root(tmp_path, env={4242: {"CUDA_VISIBLE_DEVICES": uuid[:12]}, 4243: {}})
    p = NvidiaProbe([4242], nvml=nvml, proc=proc)
    assert p.available() is None
    assert p.describe()["selection"]["visible"] == ["0:1"]
    v = p.sample(0.0).values
    assert v["gpu_tree_cuda_devices/0:1"] == 1.0 and v["gpu_tree_cuda_devices/0:0"] == 0.0
    assert v["gpu_tree_cuda_devices/1"] == 0.0
    q = NvidiaProbe([4243], nvml=make_fake_pynvml(gpus), proc=proc)  # unset: the MIG GPU's first instance only
    assert q.available() is None and q.describe()["selection"]["visible"] == ["0:0"]


def test_environ_not_readable_is_a_reason(tmp_path: Path) -> None:
    p = _probe(a100_80gb(), tree=[4242], proc=_proc_root(tmp_path))
    assert "cannot read /proc/4242/environ" in p.describe()["selection"]["reason"]
    assert p.sample(0.0).values["gpu_tree_cuda_devices/0"] is None
    assert "cannot read /proc/4242/environ" in p.unsupported["gpu_tree_cuda_devices/0"]


def test_cuda_order_and_resolution() -> None:
    devs = [
        {"index": 0, "name": "A", "pci_bus_id": "00000000:3B:00.0", "compute_capability": "8.0", "cores": 6912,
         "sm_clock_max_hertz": 1.41e9},
        {"index": 1, "name": "B", "pci_bus_id": "00000000:1A:00.0", "compute_capability": "8.0", "cores": 10752,
         "sm_clock_max_hertz": 1.98e9},
        {"index": 2, "name": "A", "pci_bus_id": "00000000:86:00.0", "compute_capability": "7.0", "cores": 5120,
         "sm_clock_max_hertz": 1.53e9},
    ]  # fmt: skip
    assert cuda_order(devs, "PCI_BUS_ID") == ([1, 0, 2], True)
    assert cuda_order(devs, "FASTEST_FIRST") == ([1, 0, 2], False)
    assert cuda_order(devs[::2], "FASTEST_FIRST") == ([0, 2], True)  # by name, the same model
    same = [dict(d, name="A", compute_capability="8.0", cores=1, sm_clock_max_hertz=1.0) for d in devs]
    assert cuda_order(same, "FASTEST_FIRST") == ([1, 0, 2], True)  # identical GPUs: PCI order
    for d, u in zip(devs, ("GPU-aa11", "GPU-bb22", "GPU-aa33"), strict=True):
        d["uuid"] = u
    assert resolve_visible("2,0", [1, 0, 2], devs) == ["2", "1"]
    assert resolve_visible("GPU-bb,GPU-aa3", [1, 0, 2], devs) == ["1", "2"]
    assert resolve_visible("GPU-aa", [1, 0, 2], devs) == []  # ambiguous
    assert resolve_visible("1abc", [1, 0, 2], devs) == ["0"]  # CUDA reads the leading number
