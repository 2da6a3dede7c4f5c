"""Probes: one module per source.  Each probe says whether it is available and, if not, why."""

if __name__ != "tuner.probes":  # pragma: no cover - a stale ``import probes`` (see docs/design.md, "Packaging")
    raise ImportError(f"import tuner.probes, not {__name__}: this folder is installed as part of the tuner package")
