"""The layers of ``docs/design.md`` ("Layers") hold: one direction of imports, checked by
import-linter's contracts in ``pyproject.toml``, plus what those contracts cannot say."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pkvm"
#: The only modules still imported inside a function: optional or version-dependent ones, and
#: the heavy libraries only some commands need (distributed, pandas and SALib cost ~1, ~1 and
#: ~3.5 s to import here; ``pkvm compare`` on one core needs none of them).
LAZY_OK = ("rich", "matplotlib", "distributed", "pandas", "SALib")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([*cmd, "--no-cache", "--no-logo", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_lint_imports_keeps_every_contract():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken." in out.stdout


def test_contracts_catch_an_upward_import_and_a_runtime_use_of_the_oracles(tmp_path):
    """The contracts are not vacuous: a copy of the tree with one upward import (kvm -> experiments,
    as the Tracer was) and one runtime import of pkvm.testing breaks both."""
    shutil.copytree(PKG, tmp_path / "pkvm", ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "pkvm" / "kvm" / "vm.py", "a", encoding="utf-8") as f:
        f.write("\nfrom pkvm.experiments.trace import Tracer  # noqa: E402\n")
    with open(tmp_path / "pkvm" / "cli.py", "a", encoding="utf-8") as f:
        f.write("\nfrom pkvm.testing import reference  # noqa: E402\n")
    out = _lint_imports(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Contracts: 0 kept, 2 broken." in out.stdout
    assert "pkvm.kvm.vm -> pkvm.experiments.trace" in out.stdout
    assert "pkvm.cli -> pkvm.testing" in out.stdout


def test_every_subpackage_is_in_a_contract():
    """A new subpackage cannot escape the layers: each one is a layer, or is pkvm.testing."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    subpackages = {f"pkvm.{p.parent.name}" for p in PKG.glob("*/__init__.py")}
    modules = {f"pkvm.{p.stem}" for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert subpackages - named == {"pkvm.testing"}
    assert modules <= named
    forbidden = next(c for c in _contracts() if c["type"] == "forbidden")
    assert set(forbidden["source_modules"]) == named and forbidden["forbidden_modules"] == ["pkvm.testing"]


def _sccs(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_sccs_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        graph.add_import(importer=a, imported=b)
    assert _sccs(graph) == [["a", "b", "c"]]


def test_no_import_cycle_at_run_time(monkeypatch):
    """Leaving out TYPE_CHECKING imports (annotations only), the package's imports form no
    cycle, so import order never matters. Within a layer, annotations may still refer both ways."""
    monkeypatch.syspath_prepend(str(ROOT))
    graph = grimp.build_graph("pkvm", exclude_type_checking_imports=True, cache_dir=None)
    assert "pkvm.kvm.vm" in graph.modules
    assert _sccs(graph) == []


def test_no_pkvm_import_inside_a_function():
    """Imports inside functions remain only for optional dependencies loaded lazily."""
    lazy = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] not in LAZY_OK:
                        lazy.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert lazy == []


#: What the typed core may import of pkvm (only ever inside a function, when it runs): the
#: other modules of the bottom layer it raises with or reads a constant from.
CORE_IMPORTS_OK = ("pkvm.errors", "pkvm.constants")


def _core_pkvm_imports(text: str) -> list[str]:
    """The pkvm modules a Cython source imports (``from pkvm.X import`` / ``import pkvm.X``;
    ``cimport`` lines are declarations, not imports)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:from\s+(pkvm(?:\.\w+)*)\s+import\s|import\s+(pkvm(?:\.\w+)*))", line)
        if m and " cimport " not in line:
            out.append(m.group(1) or m.group(2))
    return out


def test_the_core_imports_nothing_above_the_bottom_layer():
    """grimp does not read the Cython core, so no contract covers it: its sources import only
    ``pkvm.errors`` and ``pkvm.constants`` (``SnpPath.rebind`` imported ``pkvm.host.directmap``
    to tell a DirectMap, a layer above; the class now carries a mark instead)."""
    assert _core_pkvm_imports("        from pkvm.host.directmap import DirectMap\n") == ["pkvm.host.directmap"]
    assert _core_pkvm_imports("from pkvm.core cimport RangeMap\n") == []
    found = [f"{p.name}: {mod}" for p in sorted([*PKG.glob("*.pyx"), *PKG.glob("*.pxi")])
             for mod in _core_pkvm_imports(p.read_text(encoding="utf-8")) if mod not in CORE_IMPORTS_OK]
    assert found == []
