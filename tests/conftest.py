"""Test-wide settings that must exist before any test module imports torch."""

from __future__ import annotations

import os

# OpenMP threads (torch on CPU) spin while they wait by default: on a 2-core machine where anything else runs,
# spinning threads starved each other (the demo decoded at 36 tok/s instead of 650, tests took 20x longer).
# Same choice as the demo workload; children started by tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
