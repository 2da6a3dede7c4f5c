"""Textual TUI: live dashboard and replay; it only consumes trace records."""

if __name__ != "tuner.tui":  # pragma: no cover - a stale ``import tui`` (see docs/design.md, "Packaging")
    raise ImportError(f"import tuner.tui, not {__name__}: this folder is installed as part of the tuner package")
