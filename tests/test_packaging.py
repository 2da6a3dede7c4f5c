"""The packaging choice, proved (docs/design.md, "Layers and packaging").

``probes/``, ``policies/`` and ``tui/`` live at the top of the repository and are installed only as
``tuner.probes``, ``tuner.policies`` and ``tuner.tui`` through links inside ``tuner/``: the wheel holds one
top-level package, a bare ``import probes`` from a checkout fails with a one-line reason, and mypy follows
imports across the links (a type error in a probe is reported where ``tuner/`` calls it).  Each check runs on
a copy of the checkout's tracked files in a temporary folder, so nothing is built or cached in the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINKED = ("probes", "policies", "tui")


def tracked_copy(dst: Path) -> Path:
    """The checkout's tracked files (as they are in the work tree) copied to ``dst``, links kept as links."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, names.decode().split("\0")):
        src, out = ROOT / rel, dst / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree, not yet committed
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, out)
    return dst


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tracked_copy(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("wheel")
    cp = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
        cwd=src, capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr[-2000:]
    (whl,) = out.glob("inference_tuner-*.whl")
    return whl


def test_the_links_are_links() -> None:
    for name in LINKED:
        link = ROOT / "tuner" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", f"tuner/{name} must link to ../{name}"


def test_wheel_holds_only_the_tuner_package_with_the_linked_folders_inside(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tuner"}, sorted(tops)
    for name in LINKED:
        files = {p.name for p in (ROOT / name).iterdir() if p.suffix in (".py", ".tcss")}
        inside = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"tuner/{name}/") and n.count("/") == 2}
        assert files and files <= inside, (name, sorted(files - inside))
    presets = {p.name for p in (ROOT / "policies" / "presets").glob("*.toml")}
    assert presets and {f"tuner/policies/presets/{p}" for p in presets} <= set(names)


def test_the_installed_wheel_imports_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Installed (no links any more: real folders inside ``tuner/``), the linked packages import, the presets load,
    and no generic top-level ``probes``/``policies``/``tui`` exists to collide with a user's."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
    cp = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=300, env=clean_env())
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "tuner"]
    assert not (target / "tuner" / "probes").is_symlink() and (target / "tuner" / "probes" / "base.py").is_file()
    code = (
        "import importlib.util, tuner, tuner.probes.base, tuner.policies.base, tuner.tui.source\n"
        "from tuner.core.policy_config import load_policy\n"
        "assert load_policy('interactive').policies\n"
        "print(tuner.__file__)\n"
        "print([n for n in ('probes', 'policies', 'tui') if importlib.util.find_spec(n) is not None])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=clean_env(PYTHONPATH=str(target)))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    where, generic = run.stdout.splitlines()
    assert Path(where).is_relative_to(target) and generic == "[]"


@pytest.mark.parametrize("name", LINKED)
def test_a_bare_import_of_a_linked_folder_fails_with_one_line(name: str) -> None:
    """From the checkout's root the top-level folder is importable by its bare name; it refuses, naming the fix."""
    cp = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, env=clean_env(PYTHONPATH=str(ROOT)))  # fmt: skip
    assert cp.returncode != 0
    assert cp.stderr.splitlines()[-1] == (
        f"ImportError: import tuner.{name}, not {name}: this folder is installed as part of the tuner package"
    )


@pytest.mark.slow
def test_mypy_reports_a_probe_type_error_where_tuner_calls_it(tmp_path: Path) -> None:
    """Break ``discover()``'s return type in ``probes/base.py``; mypy must report it in ``tuner/commands/probes.py``,
    which unpacks that result (an import mypy could not follow would be ``Any`` under ``ignore_missing_imports``
    and say nothing).  The unbroken copy is the control: no error there."""
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    src = tracked_copy(tmp_path / "checkout")

    def mypy() -> str:
        cp = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                             "tuner/commands/probes.py"], cwd=src, capture_output=True, text=True, timeout=600,
                            env=clean_env())  # fmt: skip
        return cp.stdout

    before = mypy()
    assert "tuner/commands/probes.py" not in before, before
    base = src / "probes" / "base.py"
    text = base.read_text()
    sig = ") -> tuple[list[Probe], list[ProbeStatus]]:"
    assert text.count(sig) == 1, "discover()'s signature changed: update this test"
    base.write_text(text.replace(sig, ") -> int:"))
    after = mypy()
    assert "tuner/commands/probes.py:" in after and '"int" object is not iterable' in after, after
