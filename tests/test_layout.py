"""The shape of the code: every module imports on its own, and nothing imports the daemon.

Imports point down only (daemon -> features -> session/realtime/audio -> config/log):
a feature that needs the daemon is handed a small Protocol (control's Host,
announce's Stage, host's Shell), never `Daemon` itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "speakerd"
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")  # that one runs the CLI


def imported(path: Path) -> set[str]:
    """The speakerd modules a file imports (absolute names, any depth, lazy ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] == "speakerd"}


def test_no_module_but_the_cli_imports_the_daemon() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if p.name != "daemon.py" and p != PACKAGE / "cli.py"
                 and "speakerd.daemon" in imported(p)]
    assert offenders == []


def test_no_module_reaches_for_another_ones_private_names() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree)
                   if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                       "speakerd") for a in node.names}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     and (node.module or "").startswith("speakerd") else
                     [node.attr] if isinstance(node, ast.Attribute)
                     and isinstance(node.value, ast.Name) and node.value.id in aliases else [])
            if any(n.startswith("_") and not n.startswith("__") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_modules_are_small() -> None:
    # A module that outgrows this holds two jobs (STYLE.md, DESIGN.md's map).
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 470} == {}


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_on_its_own(module: str) -> None:
    # In a fresh interpreter, first: an import circle shows only when its module is
    # the first of the circle to be imported.
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
