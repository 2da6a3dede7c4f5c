"""Policies: pure decide(window, knobs) -> list[Action]; they never actuate."""

if __name__ != "tuner.policies":  # pragma: no cover - a stale ``import policies`` (see docs/design.md, "Packaging")
    raise ImportError(f"import tuner.policies, not {__name__}: this folder is installed as part of the tuner package")
