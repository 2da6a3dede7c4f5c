"""Memory cleanup inside the inference process, cheapest step first, each step timed and measured.

Steps: ``caches`` (``obj.clear()`` on registered caches), ``gc`` (``gc.collect()``), ``empty_cache``
(the CUDA caching allocator, when torch with CUDA is loaded), ``malloc_trim`` (glibc ``malloc_trim(0)``:
hands freed heap pages back to the kernel).  Reclaimed bytes are the drop in resident set size
(``/proc/self/statm``, else psutil) across the step; a step that cannot run reports ``skipped`` with the
reason instead of failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

STEPS = ("caches", "gc", "empty_cache", "malloc_trim")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc: Any = None
_libc_reason: str | None = None


def rss_bytes() -> int:
    """This process's resident set size, read the cheapest way available."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def _load_libc() -> tuple[Any, str | None]:
    global _libc, _libc_reason
    if _libc is not None or _libc_reason is not None:
        return _libc, _libc_reason
    if not sys.platform.startswith("linux"):
        _libc_reason = f"malloc_trim is glibc-only (platform {sys.platform})"
        return None, _libc_reason
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = lib.malloc_trim
    except (OSError, AttributeError) as exc:
        _libc_reason = f"no malloc_trim in the C library (not glibc?): {exc}"
        return None, _libc_reason
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    _libc = lib
    return _libc, None


def _clear_caches(caches: Sequence[object]) -> tuple[str | None, dict[str, Any]]:
    if not caches:
        return "no caches registered", {}
    entries = 0
    errors: list[str] = []
    for cache in caches:
        try:
            entries += len(cache)  # type: ignore[arg-type]
        except TypeError:
            pass
        try:
            cache.clear()  # type: ignore[attr-defined]
        except Exception as exc:  # one broken cache must not stop the others
            errors.append(f"{type(cache).__name__}: {exc}")
    extra: dict[str, Any] = {"caches": len(caches), "entries": entries}
    if errors:
        extra["errors"] = errors
    return None, extra


def _gc(_: Sequence[object]) -> tuple[str | None, dict[str, Any]]:
    return None, {"collected": gc.collect()}


def _empty_cache(_: Sequence[object]) -> tuple[str | None, dict[str, Any]]:
    torch = sys.modules.get("torch")
    if torch is None:
        return "torch is not loaded", {}
    try:
        if not torch.cuda.is_available():
            return "no CUDA device (CPU memory has no caching allocator to empty)", {}
        before = int(torch.cuda.memory_reserved())
        torch.cuda.empty_cache()
        return None, {"device_reclaimed_bytes": before - int(torch.cuda.memory_reserved())}
    except Exception as exc:
        return f"torch.cuda.empty_cache failed: {exc}", {}


def _malloc_trim(_: Sequence[object]) -> tuple[str | None, dict[str, Any]]:
    lib, reason = _load_libc()
    if lib is None:
        return reason, {}
    return None, {"released": bool(lib.malloc_trim(0))}


_ACTIONS: dict[str, Callable[[Sequence[object]], tuple[str | None, dict[str, Any]]]] = {
    "caches": _clear_caches,
    "gc": _gc,
    "empty_cache": _empty_cache,
    "malloc_trim": _malloc_trim,
}


def run_cleanup(steps: Sequence[str], caches: Sequence[object]) -> dict[str, Any]:
    """Run the requested steps in cheapest-first order; unknown step names raise ``ValueError``.

    Returns ``{"steps": [{"step", "reclaimed_bytes", "seconds", ...}], "reclaimed_bytes",
    "rss_before_bytes", "rss_after_bytes"}``; a step that could not run has ``"skipped": reason``.
    """
    unknown = [s for s in steps if s not in _ACTIONS]
    if unknown:
        raise ValueError(f"unknown cleanup step(s) {', '.join(map(repr, unknown))}: use {', '.join(STEPS)}")
    ordered = [s for s in STEPS if s in set(steps)]
    rss_start = rss_bytes()
    results: list[dict[str, Any]] = []
    for step in ordered:
        before = rss_bytes()
        t = time.monotonic()
        skipped, extra = _ACTIONS[step](caches)
        seconds = time.monotonic() - t
        after = rss_bytes()
        entry: dict[str, Any] = {"step": step, "reclaimed_bytes": before - after, "seconds": seconds, **extra}
        if skipped is not None:
            entry["skipped"] = skipped
        results.append(entry)
    rss_end = rss_bytes()
    return {
        "steps": results,
        "reclaimed_bytes": rss_start - rss_end,
        "rss_before_bytes": rss_start,
        "rss_after_bytes": rss_end,
    }


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]


def malloc_stats() -> dict[str, int] | None:
    """glibc heap figures (``mallinfo2``): ``allocated_bytes`` in use by the program, ``reserved_bytes`` held
    from the kernel (arenas + mmapped chunks), ``free_bytes`` = reserved - allocated (fragmentation and
    trimmable free space).  ``None`` where the C library has no ``mallinfo2`` (musl, macOS, glibc < 2.33)."""
    lib, _ = _load_libc()
    if lib is None:
        return None
    try:
        fn = lib.mallinfo2
    except AttributeError:
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    mi = fn()
    allocated = int(mi.uordblks + mi.hblkhd)
    reserved = int(mi.arena + mi.hblkhd)
    return {"allocated_bytes": allocated, "reserved_bytes": reserved, "free_bytes": reserved - allocated}
