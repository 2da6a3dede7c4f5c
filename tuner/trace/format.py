"""The trace format the other trace modules share: record kinds, header, encoding, limits, errors, file modes.

One JSON object a line.  The first line is the header; then records, each with a kind ``k``:

- ``tick``   ``{"k":"tick","t":1.2,"m":{metric: value},"p":{pid: {...}}}`` — one tick's readings
- ``skip``   ``{"k":"skip","t":1.3,"n":2}`` — ticks missed because the sampler was late
- ``event``  ``{"k":"event","t":1.4,"kind":"request","data":{...}}``
- ``action`` ``{"k":"action","t":1.5,"policy":...,"knob":...,"value":...,"outcome":...,...}``
- ``note``   ``{"k":"note","t":1.6,"level":"warn","msg":"..."}``
- ``end``    ``{"k":"end","t":9.0,"exit_code":0}``

Times are seconds since the trace started, on the monotonic clock; the header carries the wall-clock
start for display.  The writer flushes with ``os.write`` on every tick, so a reader (or a crash) sees
every completed tick; a torn last line is skipped with a warning.

Lines are encoded with ``orjson`` (the standard ``json`` module for what orjson refuses: integers beyond
64 bits, lone surrogates) and read with it (``json`` again for what orjson refuses but older writers
produced).  The format is plain JSON either way: non-ASCII text is UTF-8 rather than ``\\u`` escapes and
exponents are shorter (``1e-7``), which any JSON reader parses to the same values.

Metric keys renamed since a trace was written (``tuner.records.RENAMED``) read with today's names: every
reader passes records through ``renamed_record`` (``read_trace`` renames its columns once); the schema
did not change.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tuner import __version__
from tuner.records import renamed

SCHEMA_VERSION = 1
MAX_LINE_BYTES = 16 * 1024 * 1024
"""A longer line is corrupt (the largest real records — request events with text — are far below)."""
_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_INT_T = 2**53


class TraceError(Exception):
    """A trace that cannot be read; the message is one line, fit to show a user."""


def _round6(t: Any) -> Any:
    """``round(t, 6)`` (a tick's time as written), in a third of its time for the usual float times.

    ``round`` rounds the exact binary value to 6 decimals through a decimal string.  Here ``y = t * 1e6``
    is within 2**-14 of that exact value (|y| < 2**40); unless ``y`` is within 0.001 of a tie, the nearest
    integer ``k`` is the same for both, and ``k / 1e6`` (``k`` exact, one correctly rounded division) is
    the double nearest ``k``e-6, which is what ``round`` returns.  Zero (its sign) and the rest: ``round``."""
    if type(t) is float:
        y = t * 1e6
        if -1e12 < y < 1e12:
            k = round(y)
            if k and -0.499 < y - k < 0.499:
                return k / 1e6
    return round(t, 6)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


_json_dumps = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def _encode_std(rec: Mapping[str, Any]) -> bytes:
    """The standard library's encoding, for what orjson refuses (ints beyond 64 bits, lone surrogates)."""
    try:
        line = _json_dumps(rec)
    except ValueError:  # NaN/inf inside: replace them, a trace is strict JSON for other tools
        line = _json_dumps(json.loads(json.dumps(rec, default=str), parse_constant=lambda _: None))
    return line.encode()


def encode_record(rec: Mapping[str, Any]) -> bytes:
    """One record as one line of JSON (no newline).  NaN and infinities become ``null``."""
    try:
        return orjson.dumps(rec, default=str, option=_OPTS)
    except TypeError:
        return _encode_std(rec)


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses but json accepts (older writers: escaped lone surrogates, 1e400)
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def package_versions(names: Iterable[str] = ("psutil", "numpy", "textual", "torch", "nvidia-ml-py")) -> dict:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def make_header(
    *,
    probes: Mapping[str, Mapping[str, Any]],
    interval_s: float,
    command: list[str] | None = None,
    pid: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The first line of a trace: what was measured, where, with what, in which units."""
    units: dict[str, str] = {}
    for p in probes.values():
        units.update(p.get("metrics", {}))
    hdr: dict[str, Any] = {
        "k": "header",
        "schema": SCHEMA_VERSION,
        "tool": "inference-tuner",
        "version": __version__,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": package_versions(),
        "started_unix": time.time(),
        "interval_s": interval_s,
        "command": command,
        "pid": pid,
        "probes": {k: dict(v) for k, v in probes.items()},
        "units": units,
    }
    if extra:
        hdr.update(extra)
    return hdr


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (a trace can hold prompts and paths)."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_TRUNC; a trace is private
    except OSError:
        pass
    return fd


def check_header(rec: Mapping[str, Any], path: Path) -> None:
    if rec.get("k") != "header" or rec.get("tool") != "inference-tuner":
        raise TraceError(f"{path}: not an inference-tuner trace (the first line is not its header)")
    schema = rec.get("schema")
    if schema != SCHEMA_VERSION:
        raise TraceError(
            f"{path}: trace schema version {schema!r} is not supported (this tuner reads {SCHEMA_VERSION})"
        )


def renamed_header(hdr: dict[str, Any]) -> dict[str, Any]:
    """The header with the metric keys renamed since it was written (``tuner.records.RENAMED``) in its
    units and its probes' metric tables."""
    units = hdr.get("units")
    if type(units) is dict:
        hdr["units"] = renamed(units)
    probes = hdr.get("probes")
    if type(probes) is dict:
        for entry in probes.values():
            if type(entry) is dict and type(entry.get("metrics")) is dict:
                entry["metrics"] = renamed(entry["metrics"])
    return hdr


def renamed_procs(p: Any) -> Any:
    """A tick's ``"p"`` with per-process fields renamed (``RENAMED``); anything but a dict as it is."""
    if type(p) is not dict:
        return p
    return {pid: renamed(v) if type(v) is dict else v for pid, v in p.items()}


def renamed_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A record with the metric keys and per-process fields renamed since it was written (``RENAMED``):
    ``iter_records`` and ``TraceFollower`` pass every record through it (``read_trace`` renames its
    columns once instead).  A tick without old keys costs one set test."""
    k = rec.get("k")
    if k == "tick":
        m = rec.get("m")
        if type(m) is dict:
            new = renamed(m)
            if new is not m:  # an old trace: its processes' fields are old too
                rec["m"] = new
                if "p" in rec:
                    rec["p"] = renamed_procs(rec["p"])
    elif k == "header":
        renamed_header(rec)
    return rec


def _as_float(v: Any) -> float:
    """One metric value as ``_convert`` makes it: numbers as floats (+-inf for ints beyond float64), a
    string as numpy parses it (NaN if it cannot), anything else NaN."""
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    if isinstance(v, str):
        try:
            return float(np.array([v], dtype=np.float64)[0])
        except (TypeError, ValueError, OverflowError):
            return math.nan
    return math.nan
