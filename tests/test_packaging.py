"""Packaging: the wheel and sdist carry what embedders need, and the core can be cimported."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import pkvm

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env=None):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
          "-q", "-w", str(out)], cwd=ROOT)
    (whl,) = out.glob("pkvm-*.whl")
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


def test_wheel_ships_pxd_pyi_and_marker(wheel_names):
    """The wheel carries _core.pxd (for cimport), _core.pyi and py.typed."""
    for name in ("pkvm/_core.pxd", "pkvm/_core.pyi", "pkvm/py.typed", "pkvm/__init__.py"):
        assert name in wheel_names
    assert any(n.startswith("pkvm/_core.") and n.endswith(".so") for n in wheel_names)


def test_wheel_ships_every_module(wheel_names):
    """Every module of the source tree, in every layer's subpackage, is in the wheel."""
    src = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pkvm").rglob("*.py")}
    assert src and src <= wheel_names, sorted(src - wheel_names)


def test_wheel_has_no_generated_c(wheel_names):
    """Generated C and annotation HTML never ship in a wheel."""
    assert not [n for n in wheel_names if n.endswith((".c", ".html"))]


def test_sdist_carries_cython_sources(tmp_path):
    """The sdist has the .pyx/.pxd sources and no generated .c, so it builds anywhere."""
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT)
    (sdist,) = tmp_path.glob("pkvm-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for name in ("pkvm/_core.pyx", "pkvm/_core.pxd", "pkvm/_core.pyi", "pkvm/py.typed",
                 "setup.py", "pyproject.toml", "README.md"):
        assert name in names
    assert "pkvm/_core.c" not in names


def test_cimport_consumer_builds_and_runs(tmp_path):
    """A separate Cython extension can cimport pkvm._core and call its cdef methods."""
    src = ROOT / "tests" / "cimport_smoke" / "consumer.pyx"
    (tmp_path / "consumer.pyx").write_text(src.read_text())
    include = str(Path(pkvm.__file__).resolve().parents[1])
    (tmp_path / "setup.py").write_text(
        "from setuptools import setup, Extension\n"
        "from Cython.Build import cythonize\n"
        f"setup(ext_modules=cythonize([Extension('consumer', ['consumer.pyx'])],"
        f" include_path=[{include!r}], compiler_directives={{'language_level': 3}}))\n"
    )
    _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path)
    code = (
        "import sys; sys.path.insert(0, '.'); import consumer, pkvm\n"
        "m = pkvm.RangeMap()\n"
        "assert consumer.fill_every_other(m, 1000, 8) == 8\n"
        "assert len(m) == 1000 and m.get(2) == 8 and m.get(3) == 0\n"
        "m._check(); print('ok')\n"
    )
    # Import the pkvm under test (not whatever pkvm happens to be installed).
    env = {**os.environ, "PYTHONPATH": include}
    assert _run([sys.executable, "-c", code], cwd=tmp_path, env=env).stdout.strip() == "ok"


def test_stub_matches_runtime(tmp_path):
    """mypy's stubtest finds _core.pyi consistent with the compiled module."""
    pytest.importorskip("mypy", reason="stubtest needs mypy (in the test extra)")
    # Only the stub is under test here; the rest of the package is type-checked elsewhere.
    cfg = tmp_path / "mypy.ini"
    cfg.write_text("[mypy]\nfollow_imports = silent\n")
    _run([sys.executable, "-m", "mypy.stubtest", "--mypy-config-file", str(cfg), "pkvm._core"],
         cwd=ROOT)
