"""Memory cleanup inside the inference process, cheapest step first, each step timed and measured.

Steps: ``caches`` (``obj.clear()`` on registered caches), ``gc`` (``gc.collect()``), ``empty_cache``
(the CUDA caching allocator, when torch with CUDA is already loaded: torch is found in ``sys.modules``,
never imported here), ``malloc_trim`` (glibc ``malloc_trim(0)`` through ``ctypes``: hands freed heap
pages back to the kernel).  Reclaimed bytes are the drop in resident set size (``/proc/self/statm``)
across the step; a step that cannot run reports ``skipped`` with the reason instead of failing.

What ``tuner.client`` runs for a ``cleanup`` command by default, so it is standard library only (``ctypes``
is imported at the first step that needs it); ``tuner.integrations.cleanup`` builds on it.  Nothing here is
reversible or needs to be: a step frees memory nothing references any more, or empties a cache that
refills as it is used.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

STEPS: tuple[str, ...] = ("caches", "gc", "empty_cache", "malloc_trim")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc: Any = None
_libc_reason: str | None = None
_mallinfo2_fn: Any = None  # False once known to be missing


def rss_bytes() -> int | None:
    """This process's resident set size from ``/proc/self/statm``; None where there is no such file."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def libc() -> tuple[Any, str | None]:
    """The C library through ``ctypes`` (loaded once), or None and why not."""
    global _libc, _libc_reason
    if _libc is not None or _libc_reason is not None:
        return _libc, _libc_reason
    if not sys.platform.startswith("linux"):
        _libc_reason = f"malloc_trim is glibc-only (platform {sys.platform})"
        return None, _libc_reason
    import ctypes
    import ctypes.util

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
    lib, reason = libc()
    if lib is None:
        return reason, {}
    return None, {"released": bool(lib.malloc_trim(0))}


_ACTIONS: dict[str, Callable[[Sequence[object]], tuple[str | None, dict[str, Any]]]] = {
    "caches": _clear_caches,
    "gc": _gc,
    "empty_cache": _empty_cache,
    "malloc_trim": _malloc_trim,
}


def _minus(a: int | None, b: int | None) -> int | None:
    return a - b if a is not None and b is not None else None


def run_cleanup(
    steps: Sequence[str], caches: Sequence[object], *, rss: Callable[[], int | None] = rss_bytes
) -> dict[str, Any]:
    """Run the requested steps in cheapest-first order; unknown step names raise ``ValueError``.

    Returns ``{"steps": [{"step", "reclaimed_bytes", "seconds", ...}], "reclaimed_bytes",
    "rss_before_bytes", "rss_after_bytes"}``; a step that could not run has ``"skipped": reason``; byte
    figures are None where ``rss()`` cannot read the resident set size.
    """
    unknown = [s for s in steps if s not in _ACTIONS]
    if unknown:
        raise ValueError(f"unknown cleanup step(s) {', '.join(map(repr, unknown))}: use {', '.join(STEPS)}")
    ordered = [s for s in STEPS if s in set(steps)]
    rss_start = rss()
    results: list[dict[str, Any]] = []
    for step in ordered:
        before = rss()
        t = time.monotonic()
        skipped, extra = _ACTIONS[step](caches)
        seconds = time.monotonic() - t
        after = rss()
        entry: dict[str, Any] = {"step": step, "reclaimed_bytes": _minus(before, after), "seconds": seconds, **extra}
        if skipped is not None:
            entry["skipped"] = skipped
        results.append(entry)
    rss_end = rss()
    return {
        "steps": results,
        "reclaimed_bytes": _minus(rss_start, rss_end),
        "rss_before_bytes": rss_start,
        "rss_after_bytes": rss_end,
    }


def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` with its result type declared (once), or None where it does not exist."""
    global _mallinfo2_fn
    if _mallinfo2_fn is None:
        lib, _ = libc()
        fn = getattr(lib, "mallinfo2", None) if lib is not None else None
        if fn is None:
            _mallinfo2_fn = False
        else:
            import ctypes

            class MallInfo2(ctypes.Structure):
                _fields_ = [
                    (name, ctypes.c_size_t)
                    for name in (
                        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                        "keepcost",
                    )
                ]  # fmt: skip

            fn.restype = MallInfo2
            fn.argtypes = []
            _mallinfo2_fn = fn
    return _mallinfo2_fn or None


def malloc_stats() -> dict[str, int] | None:
    """glibc heap figures (``mallinfo2``): ``allocated_bytes`` in use by the program, ``reserved_bytes`` held
    from the kernel (arenas + mmapped chunks), ``free_bytes`` = reserved - allocated (fragmentation and
    trimmable free space).  ``None`` where the C library has no ``mallinfo2`` (musl, macOS, glibc < 2.33)."""
    fn = _mallinfo2()
    if fn is None:
        return None
    mi = fn()
    allocated = int(mi.uordblks + mi.hblkhd)
    reserved = int(mi.arena + mi.hblkhd)
    return {"allocated_bytes": allocated, "reserved_bytes": reserved, "free_bytes": reserved - allocated}
