"""The layers' imports point one way (docs/design.md, "Layers and packaging"), read from the source with ast.

Every import counts: at the top, inside functions (lazy), under ``TYPE_CHECKING``, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.  ``probes/``, ``policies/`` and
``tui/`` are read as ``tuner.probes``, ``tuner.policies`` and ``tuner.tui`` (what the links in ``tuner/`` install).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each module's layer: the longest matching prefix.  An import must go to a lower layer, stay inside its own prefix
# (a package's modules among themselves), or go to the same layer in the same folder; no cycles either way.  A
# new top-level module needs a row.
LAYERS: dict[str, int] = {
    # types, errors and what the inference side runs without the sidecar: standard library only
    "tuner": 0,  # the package itself (``__version__``)
    "tuner.records": 0,
    "tuner.errors": 0,
    "tuner.reclaim": 0,
    # what a policy reads and judges with, and what reports compute from it: the window, statistics, memory
    # limits, energy (records and numpy only)
    "tuner.core.window": 1,
    "tuner.core.stats": 1,
    "tuner.core.limits": 1,
    "tuner.core.energy": 1,
    # measuring, deciding, the record of a run, the wire between processes
    "tuner.probes": 2,
    "tuner.policies": 2,
    "tuner.trace": 2,
    "tuner.link": 2,
    "tuner.quality": 2,  # semantic consistency: the quality probe, its backends, the scorer child process
    "tuner.fleet": 2,  # the fleet from PromQL (what tuner fleet shows; its Textual app is tuner.tui.fleet)
    # the loop; what leaves a session; the TUI; the client the inference imports
    "tuner.core": 3,
    "tuner.outputs": 3,
    "tuner.tui": 3,
    "tuner.client": 3,
    # one run assembled (sampler + agent + trace + exporters + live feed); the proxy (it carries out actions
    # the loop decides); code inside the inference
    "tuner.core.session": 4,
    "tuner.proxy": 4,
    "tuner.integrations": 4,
    # the demo workload; the subcommands; the CLI that finds them
    "tuner.demo": 5,
    "tuner.commands": 6,
    "tuner.cli": 7,
    "tuner.__main__": 8,
}

BELOW_THE_LOOP = ("tuner.probes", "tuner.policies")
THE_LOOP_AND_ABOVE = (
    "tuner.core", "tuner.outputs", "tuner.link", "tuner.proxy", "tuner.commands", "tuner.cli", "tuner.tui",
    "tuner.integrations", "tuner.demo", "tuner.client", "tuner.trace",
)  # fmt: skip
POLICY_INPUTS = ("tuner.core.window", "tuner.core.stats", "tuner.core.limits", "tuner.core.energy")
"""What a policy reads (``decide(window, knobs)``) and judges with (statistics, memory limits): layer 1, below the
policies, though their files sit in ``tuner/core/`` with the loop that fills the window."""
TORCH_SCORER = "tuner.quality.backends"
"""The consistency scorer's backends: torch and transformers, in the scorer's own process (a child of the sidecar)."""
CLIENT_MAY_IMPORT = ("tuner", "tuner.records", "tuner.link", "tuner.link.wire", "tuner.reclaim")
"""Project modules the client may load (``tuner`` and ``tuner.link`` are the packages around them); each of
them may import only the standard library and this list."""


@dataclass(frozen=True)
class Import:
    target: str
    """The imported name, dotted in full (``from a.b import c`` is ``a.b.c``: a module or a name in one)."""
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "tuner":
        parts.insert(0, "tuner")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def project_modules() -> dict[str, Path]:
    """Every module of the package, the linked folders read from where their files live."""
    mods: dict[str, Path] = {}
    for top in ("tuner", "probes", "policies", "tui"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).parts
            if top == "tuner" and rel[1] in ("probes", "policies", "tui"):
                continue  # through a link: read once, from the real folder
            mods[module_name(path)] = path
    assert {"tuner.client", "tuner.probes.base", "tuner.policies.base", "tuner.tui.app"} <= mods.keys()
    return mods


def _literal(node: ast.expr) -> str | None:
    """A literal module name (an f-string's constant head: ``f"tuner.commands.{x}"`` -> ``tuner.commands``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".") or None
    return None


@cache
def imports_of(name: str) -> tuple[tuple[Import, ...], tuple[int, ...]]:
    """The module's imports, and the lines of dynamic imports whose name is not a literal."""
    path = project_modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    opaque: list[int] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += [Import(f"{module}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if fname in ("import_module", "__import__") and node.args:
                target = _literal(node.args[0])
                if target is None:
                    opaque.append(node.lineno)
                else:
                    found.append(Import(target, node.lineno))
    return tuple(found), tuple(opaque)


def within(target: str, prefixes: tuple[str, ...] | str) -> bool:
    """``target`` is one of ``prefixes`` or inside one (``tuner.core.window`` is within ``tuner.core``)."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def project_module(target: str) -> str | None:
    """The project module an imported name lives in (``tuner.trace.read_trace`` -> ``tuner.trace``)."""
    mods = project_modules()
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def layer_of(name: str) -> tuple[str, int]:
    """The longest ``LAYERS`` prefix of a module, and its layer."""
    best = max((p for p in LAYERS if within(name, p)), key=len, default=None)
    assert best is not None, f"{name} has no layer: add its row to LAYERS in tests/test_layers.py (and the picture)"
    return best, LAYERS[best]


def where(name: str, imp: Import) -> str:
    return f"{project_modules()[name].relative_to(ROOT)}:{imp.line} imports {imp.target}"


def test_every_module_has_a_layer_and_imports_point_down() -> None:
    wrong = []
    for name in project_modules():
        own, level = layer_of(name)
        for imp in imports_of(name)[0]:
            target = project_module(imp.target)
            if target is None or target == name or within(name, target):
                continue  # outside the project, itself, or its own package's __init__ (``from tuner import x``)
            to, to_level = layer_of(target)
            same_folder = to_level == level and target.rpartition(".")[0] == name.rpartition(".")[0]
            if to != own and to_level >= level and not same_folder:
                wrong.append(f"{where(name, imp)} (layer {to_level} {to}, from layer {level} {own})")
    assert not wrong, "imports pointing up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules() -> None:
    edges = {
        name: {t for imp in imports_of(name)[0] if (t := project_module(imp.target)) and t != name
               and not within(name, t)}
        for name in project_modules()
    }  # fmt: skip
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for name in sorted(edges):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_probes_and_policies_never_import_the_loop_or_what_sits_above_it() -> None:
    wrong = [
        where(name, imp)
        for name in project_modules()
        if within(name, BELOW_THE_LOOP)
        for imp in imports_of(name)[0]
        if within(imp.target, THE_LOOP_AND_ABOVE) and not within(imp.target, POLICY_INPUTS)
    ]
    assert not wrong, "\n".join(wrong)
    for name in POLICY_INPUTS:  # what policies may read imports nothing of the loop either
        wrong = [
            where(name, imp)
            for imp in imports_of(name)[0]
            if within(imp.target, "tuner") and not within(imp.target, ("tuner.records", *POLICY_INPUTS))
        ]
        assert not wrong, "\n".join(wrong)  # fmt: skip


def test_vendor_and_ui_libraries_stay_in_their_module() -> None:
    """pynvml only in the NVIDIA probe; the TUI never reaches a vendor library or the probe that wraps it; textual
    only in the TUI (the agent never imports it); torch only on the inference side and in the consistency scorer's
    own process (``tuner.quality.backends``, loaded by ``python -m tuner.quality.scorer``, a child of the sidecar)."""
    rules = [
        (("pynvml",), lambda n: n == "tuner.probes.nvidia"),
        (("tuner.probes.nvidia", "nvitop"), lambda n: not within(n, "tuner.tui")),
        (("textual",), lambda n: within(n, "tuner.tui")),
        (("torch", "transformers"), lambda n: within(n, ("tuner.integrations", "tuner.demo", TORCH_SCORER))),
    ]
    wrong = [
        where(name, imp)
        for name in project_modules()
        for imp in imports_of(name)[0]
        for targets, allowed in rules
        if within(imp.target, targets) and not allowed(name)
    ]
    assert not wrong, "\n".join(wrong)


def test_client_imports_only_the_standard_library_records_and_the_wire() -> None:
    seen: set[str] = set()
    todo = ["tuner.client"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found, opaque = imports_of(name)
        assert not opaque, (
            f"{project_modules()[name].relative_to(ROOT)}:{opaque[0]}: a dynamic import cannot be checked"
        )
        for imp in found:
            top = imp.target.partition(".")[0]
            if top == "tuner":
                target = project_module(imp.target)
                assert target in CLIENT_MAY_IMPORT, where(name, imp) + " (not stdlib-only: the client must not load it)"
                todo.append(target)
            else:
                assert top in sys.stdlib_module_names or top == "__future__", where(name, imp) + " (not stdlib)"


def test_importing_the_client_loads_no_third_party_module() -> None:
    """What the inference pays for ``from tuner import client``: the standard library and our stdlib-only modules."""
    code = ("import json, sys; before = set(sys.modules); from tuner import client; "
            "print(json.dumps(sorted(set(sys.modules) - before)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "tuner.client" in loaded
    foreign = [m for m in loaded if m.partition(".")[0] not in (*sys.stdlib_module_names, "tuner")]
    ours = [m for m in loaded if m.partition(".")[0] == "tuner"]
    assert not foreign, foreign
    assert set(ours) <= {*CLIENT_MAY_IMPORT, "tuner.client"}, ours
