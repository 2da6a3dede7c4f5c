"""Memory cleanup for the integrations: ``tuner.reclaim``'s steps, with the resident set size read through
psutil where ``/proc`` is missing.

The mechanism (steps, their order and measures) lives in ``tuner.reclaim`` because ``tuner.client`` runs it
for a ``cleanup`` command and must stay standard-library only; this module adds what may use more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuner import reclaim
from tuner.reclaim import STEPS, malloc_stats

__all__ = ["STEPS", "malloc_stats", "rss_bytes", "run_cleanup"]


def rss_bytes() -> int:
    """This process's resident set size, read the cheapest way available."""
    rss = reclaim.rss_bytes()
    if rss is not None:
        return rss
    import psutil

    return int(psutil.Process().memory_info().rss)


def run_cleanup(steps: Sequence[str], caches: Sequence[object]) -> dict[str, Any]:
    """``tuner.reclaim.run_cleanup`` measured with :func:`rss_bytes` (so every byte figure is an int)."""
    return reclaim.run_cleanup(steps, caches, rss=rss_bytes)
