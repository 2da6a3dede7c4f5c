"""Subcommands of the ``tuner`` CLI; each module has ``register(subparsers)``."""

import importlib
from types import ModuleType

# Order is the order in `tuner --help`.  A module that is missing (an optional part not installed)
# is skipped rather than breaking the whole CLI.
COMMANDS = ("probes", "run", "attach", "demo", "tui", "replay", "report", "compare", "export", "proxy", "fleet")


def load() -> list[ModuleType]:
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(f"tuner.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"tuner.commands.{name}":
                raise
    return mods
