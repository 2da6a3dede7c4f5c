"""Real cgroups for tests: made only *under the test process's own* memory cgroup (v1) or v2 cgroup, never at a
controller's root, and removed afterwards — leftovers of a crashed run (their creator's PID is gone) too.

``V1Memory.get()`` / ``Unified.get()`` skip the test with the reason when the hierarchy is absent or not
writable (not root, a read-only mount, no v1 memory controller).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PREFIX = "tuner-test-"
MIB = 1 << 20


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fstype, super options) of the cgroup mounts."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) >= 5 and b and b[0] in ("cgroup", "cgroup2"):
                out.append((a[3], a[4], b[0], b[2] if len(b) > 2 else ""))
    return out


def _own_path(controller: str | None) -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, ctl, path = line.rstrip("\n").split(":", 2)
            if controller is None and hid == "0" and ctl == "":
                return path
            if controller is not None and controller in ctl.split(","):
                return path
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(d: Path, home: Path) -> None:
    """Remove cgroup ``d`` and everything under it; processes still in it go back to ``home``."""
    if not d.is_dir():
        return
    for child in [c for c in d.iterdir() if c.is_dir()]:
        remove_tree(child, home)
    for _ in range(50):
        try:
            pids = (d / "cgroup.procs").read_text().split()
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(OSError):
                (home / "cgroup.procs").write_text(pid)
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)  # a process still exiting keeps it busy a moment


class _Hierarchy:
    """Test cgroups under ``own`` (the test process's cgroup in one hierarchy)."""

    def __init__(self, own: Path) -> None:
        self.own = own
        self.made: list[Path] = []
        self._n = 0
        for d in own.glob(f"{PREFIX}*"):  # leftovers of a run that died: their creator is gone
            try:
                creator = int(d.name[len(PREFIX) :].split("-", 1)[0])
            except ValueError:
                continue
            if not _alive(creator):
                remove_tree(d, own)

    def make(self, parent: Path | None = None, **files: str | int) -> Path:
        """A new cgroup under ``parent`` (default: the test process's own), with ``files`` written."""
        self._n += 1
        base = parent if parent is not None else self.own
        d = base / f"{PREFIX}{os.getpid()}-{self._n}"
        d.mkdir()
        if parent is None:
            self.made.append(d)
        for name, value in files.items():
            (d / name.replace("__", ".")).write_text(str(value))
        return d

    @staticmethod
    def add(d: Path, pid: int) -> None:
        (d / "cgroup.procs").write_text(str(pid))

    def cleanup(self) -> None:
        for d in reversed(self.made):
            remove_tree(d, self.own)
        self.made.clear()

    def popen(self, d: Path, args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start ``args`` already inside cgroup ``d`` (it writes itself there before exec)."""
        shell = f'echo $$ > "{d}/cgroup.procs" && exec "$@"'
        return subprocess.Popen(["sh", "-c", shell, "sh", *args], **kw)  # type: ignore[call-overload]


class V1Memory(_Hierarchy):
    @classmethod
    def get(cls) -> V1Memory:
        if os.geteuid() != 0:
            pytest.skip("making a memory cgroup needs root")
        mount = next((m for m in _mounts() if m[2] == "cgroup" and "memory" in m[3].split(",")), None)
        path = _own_path("memory")
        if mount is None or path is None:
            pytest.skip("no cgroup v1 memory controller mounted here")
        root = mount[0].rstrip("/")
        rel = path[len(root) :] if root and path.startswith(root) else path
        own = Path(mount[1]) / rel.lstrip("/")
        if not os.access(own, os.W_OK):
            pytest.skip(f"{own} is not writable")
        return cls(own)


class Unified(_Hierarchy):
    @classmethod
    def get(cls) -> Unified:
        if os.geteuid() != 0:
            pytest.skip("making a cgroup needs root")
        mount = next((m for m in _mounts() if m[2] == "cgroup2"), None)
        path = _own_path(None)
        if mount is None or path is None:
            pytest.skip("no cgroup2 (unified) hierarchy mounted here")
        own = Path(mount[1]) / path.lstrip("/")
        if not os.access(own, os.W_OK):
            pytest.skip(f"{own} is not writable")
        return cls(own)


@contextlib.contextmanager
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that sleeps until killed."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def kernel_v1(d: Path) -> dict[str, int]:
    """The kernel's own v1 figures for ``d``: usage and memory.stat."""
    out = {"usage": int((d / "memory.usage_in_bytes").read_text())}
    for line in (d / "memory.stat").read_text().splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out
