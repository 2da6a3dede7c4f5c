"""CPU package energy from RAPL, through the kernel's powercap interface (``/sys/class/powercap``).

Zones ``intel-rapl:<n>`` are packages (their ``name`` is ``package-<n>``), ``intel-rapl:<n>:<m>`` their parts
(``core``, ``uncore``, ``dram``); AMD processors (Zen and later) expose their packages under the same names
through the ``intel_rapl_msr`` driver, and kernels that name the control type ``amd-rapl`` are read alike.
``intel-rapl-mmio:*`` repeats a package's counter through another interface and is skipped (it would count the
energy twice); so are ``psys`` (the whole platform) and the core/uncore parts (inside the package's figure).

Per package ``<n>``: ``cpu_package_energy_joules_total/<n>`` (``energy_uj``, a counter that wraps at
``max_energy_range_uj``: the total keeps growing across wraps), ``cpu_package_power_watts/<n>`` (its increase
between two readings over their time), ``cpu_dram_energy_joules_total/<n>`` where the package has a DRAM zone.

Missing is a reason, not a failure: no powercap zones (these VMs, most containers without ``/sys`` of the host),
or ``energy_uj`` readable by root only — Linux made it so in 5.10 (CVE-2020-8694, "Platypus").  ``root`` is the
powercap folder (tests run the probe on canned trees).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from tuner.records import Sample

ROOT = "/sys/class/powercap"
_ZONE = re.compile(r"^(?:intel|amd)-rapl:(\d+)(?::(\d+))?$")


@dataclass
class _Zone:
    key: str  # the metric key
    path: str
    fd: int | None
    range_uj: int
    last_uj: int | None = None
    total_uj: int = 0
    last_t: float | None = None


class RaplProbe:
    """RAPL energy counters per CPU package (see the module docstring)."""

    name = "rapl"

    def __init__(self, root: str = ROOT) -> None:
        self.root = root
        self._zones: list[_Zone] = []
        self._checked = False
        self._reason: str | None = None

    def available(self) -> str | None:
        if not self._checked:
            self._checked = True
            self._reason = self._open()
        return self._reason

    def _open(self) -> str | None:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return f"no RAPL energy counters ({self.root} not found: the kernel or VM does not expose them)"
        found: list[tuple[str, str]] = []
        packages: dict[str, str] = {}  # zone number -> package number (from its name)
        for entry in names:
            m = _ZONE.match(entry)
            if m is None:
                continue
            kind = _read(os.path.join(self.root, entry, "name"))
            if m.group(2) is None and kind is not None and kind.startswith("package-"):
                packages[m.group(1)] = kind.split("-", 1)[1]
                found.append(("cpu_package_energy_joules_total", entry))
            elif m.group(2) is not None and kind == "dram":
                found.append(("cpu_dram_energy_joules_total", entry))
        if not found:
            return f"no RAPL energy counters (no package zone under {self.root}: the kernel or VM does not expose them)"
        denied = []
        for name, entry in found:
            zone_no = _ZONE.match(entry).group(1)  # type: ignore[union-attr]
            pkg = packages.get(zone_no, zone_no)
            path = os.path.join(self.root, entry, "energy_uj")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                os.pread(fd, 32, 0)
            except PermissionError:
                denied.append(entry)
                continue
            except OSError:
                continue
            rng = _read(os.path.join(self.root, entry, "max_energy_range_uj"))
            self._zones.append(_Zone(f"{name}/{pkg}", path, fd, int(rng) if rng and rng.isdigit() else 0))
        if not self._zones:
            self.close()
            if denied:
                return (f"RAPL energy counters are readable by root only ({', '.join(denied)}: Linux restricts "
                        "energy_uj since 5.10, CVE-2020-8694); run the tuner as root")  # fmt: skip
            return f"no readable RAPL energy counter under {self.root}"
        return None

    def metrics(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for z in self._zones:
            out[z.key] = "joules"
            if z.key.startswith("cpu_package_"):
                out["cpu_package_power_watts/" + z.key.split("/", 1)[1]] = "watts"
        return out

    def sample(self, now: float) -> Sample:
        values: dict[str, float | None] = {}
        mono = time.monotonic()
        for z in self._zones:
            uj = _pread_int(z.fd)
            pkg = z.key.split("/", 1)[1]
            power_key = f"cpu_package_power_watts/{pkg}" if z.key.startswith("cpu_package_") else None
            if uj is None:
                values[z.key] = None
                if power_key:
                    values[power_key] = None
                continue
            gained = None
            if z.last_uj is not None:
                gained = uj - z.last_uj
                if gained < 0:  # the counter wrapped
                    gained += z.range_uj + 1 if z.range_uj else 0
                    gained = max(gained, 0)
                z.total_uj += gained
            power = None
            if gained is not None and z.last_t is not None and mono > z.last_t:
                power = gained / 1e6 / (mono - z.last_t)
            z.last_uj, z.last_t = uj, mono
            values[z.key] = z.total_uj / 1e6
            if power_key:
                values[power_key] = power
        return Sample(self.name, now, values)

    def close(self) -> None:
        for z in self._zones:
            if z.fd is not None:
                try:
                    os.close(z.fd)
                except OSError:
                    pass
                z.fd = None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _pread_int(fd: int | None) -> int | None:
    if fd is None:
        return None
    try:
        return int(os.pread(fd, 32, 0).strip())
    except (OSError, ValueError):
        return None
