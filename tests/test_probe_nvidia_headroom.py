"""Memory headroom per binding device (issue 16 §3): the GPU term of ``tuner.core.limits`` counts the devices
the watched tree uses — not another job's full GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.cli import tuner
from tests.fakes.fake_pynvml import GiB, MiB, a100_80gb, make_fake_pynvml, rtx_4090
from tests.test_probe_nvidia_deadline import _env
from tests.test_probe_nvidia_records import _proc_root
from tuner.core import limits
from tuner.core.limits import DictReader
from tuner.core.window import Window
from tuner.probes.nvidia import NvidiaProbe

ME = os.getpid()


def gpu(dev: str, used: float, total: float, **tree: float | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"gpu_mem_used_bytes/{dev}": used, f"gpu_mem_total_bytes/{dev}": total}
    out.update({f"{k}/{dev}": v for k, v in tree.items()})
    return out


def names(values: dict[str, Any]) -> list[str]:
    return [t.name for t in limits.terms(DictReader(values)) if t.name.startswith("gpu")]


def test_only_the_devices_the_tree_uses_are_terms() -> None:
    ours = gpu("0", 40 * GiB, 80 * GiB, gpu_tree_procs=1.0, gpu_tree_mem_bytes=30 * GiB, gpu_tree_cuda_devices=1.0)
    theirs = gpu("1", 79.5 * GiB, 80 * GiB, gpu_tree_procs=0.0, gpu_tree_mem_bytes=0.0, gpu_tree_cuda_devices=1.0)
    assert names({**ours, **theirs}) == ["gpu/0"]  # another job's full GPU is not our limit
    # the tree's memory alone says so (a context without memory figures: the process count)
    assert names({**gpu("0", 1, 2, gpu_tree_procs=1.0, gpu_tree_mem_bytes=None), **theirs}) == ["gpu/0"]
    # before the model is loaded the tree uses no GPU: no GPU term at all
    idle = gpu("0", 1 * GiB, 80 * GiB, gpu_tree_procs=0.0, gpu_tree_mem_bytes=0.0, gpu_tree_cuda_devices=1.0)
    assert names({**idle, **theirs}) == []


def test_unattributable_processes_fall_back_to_what_cuda_shows_the_process() -> None:
    # a PID namespace: the tree's figures are None; CUDA_VISIBLE_DEVICES shows it GPU 1 only
    a = gpu("0", 79 * GiB, 80 * GiB, gpu_tree_procs=None, gpu_tree_mem_bytes=None, gpu_tree_cuda_devices=0.0)
    b = gpu("1", 10 * GiB, 80 * GiB, gpu_tree_procs=None, gpu_tree_mem_bytes=None, gpu_tree_cuda_devices=1.0)
    assert names({**a, **b}) == ["gpu/1"]
    # no tree figures at all (tuner probes without a tree, an older trace): every device, as before
    assert names({**gpu("0", 1, 2), **gpu("1", 1, 4)}) == ["gpu/0", "gpu/1"]
    # an NPU is not filtered
    assert [t.name for t in limits.terms(DictReader({"npu_mem_used_bytes/0": 1.0, "npu_mem_total_bytes/0": 2.0}))] == [
        "npu/0"
    ]


def test_the_window_fed_by_the_probe_ignores_a_neighbours_rising_memory() -> None:
    ours, theirs = a100_80gb(processes=[(ME, 20 * GiB)], used_bytes=40 * GiB), a100_80gb(used_bytes=70 * GiB)
    p = NvidiaProbe([ME], nvml=make_fake_pynvml([ours, theirs]))
    assert p.available() is None
    w = Window(keys=[])
    w.horizon_s = 300.0
    for k in range(300):  # 30 s at 10 Hz: the neighbour leaks 30 MiB/s toward its full GPU
        theirs.used_bytes = int(70 * GiB + 30 * MiB * k / 10 * 10)
        w.update(k / 10, p.sample(k / 10).values)
    h, name = w.headroom()
    assert name == "gpu/0" and 0.49 < (h or 0) < 0.51
    w._projected_at = -1e9  # project now
    assert w.memory_pressure() is None
    # our own device leaking is a pressure (the same run, the other way round)
    w2 = Window(keys=[])
    w2.horizon_s = 300.0
    for k in range(300):
        ours.used_bytes = int(60 * GiB + 60 * MiB * k)
        w2.update(30 + k / 10, p.sample(30 + k / 10).values)
    mp = w2.memory_pressure()
    assert mp is not None and mp.term.name == "gpu/0"
    p.close()


def test_cuda_visible_devices_decides_in_a_pid_namespace(tmp_path: Path) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    proc = _proc_root(tmp_path, ns=4026532198, env={4242: env})
    p = NvidiaProbe([4242], nvml=make_fake_pynvml([a100_80gb(used_bytes=79 * GiB), rtx_4090()]), proc=proc)
    assert p.available() is None
    v = p.sample(0.0).values
    assert v["gpu_tree_mem_bytes/1"] is None and v["gpu_tree_cuda_devices/1"] == 1.0
    assert names(dict(v)) == ["gpu/1"]


def test_report_names_the_device_the_command_uses(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    spec = {
        "gpus": [
            {"preset": "h200", "used_bytes": 130 * GiB, "children_mem": 3 * GiB},  # ours: 9% free
            {"preset": "rtx_4090", "used_bytes": 24000 * MiB},  # another job's: 1% free
        ]
    }
    cp = subprocess.run(
        [sys.executable, "-m", "tuner", "run", "--headless", "--quiet", "--trace", str(trace), "--",
         sys.executable, "-c", "import time; time.sleep(2)"],
        env=_env(spec), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    rep = tuner("report", str(trace), "--json")
    assert rep.returncode == 0, rep.stderr
    limit = json.loads(rep.stdout)["memory_limit"]
    # closest while the command ran: its GPU at 7% free — never the other job's GPU at 1%
    assert limit["closest"]["limit"].startswith("gpu/0 memory used 130.0 GiB of 140.4 GiB")
    assert limit["name"] == "host"  # at the end the command has exited: it holds no GPU any more
