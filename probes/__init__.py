"""Probes: one module per source.  Each probe says whether it is available and, if not, why."""
