"""Policies: pure decide(window, knobs) -> list[Action]; they never actuate."""
