"""pkvm is typed: it passes ``mypy --strict``, and code using it type-checks after the README's
editable install (``editable_mode=compat``, README.md "Install modes")."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pkvm

pytest.importorskip("mypy", reason="mypy is in the test extra")

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
import pkvm

vm = pkvm.VM("snp", policy="6.19")
vmm = pkvm.Vmm(vm)
gmem: pkvm.GuestMemfd | None = vmm.add_ram(0, 8 << 20)
vmm.launch()
guest = pkvm.Guest(vm, vmm)
r: pkvm.ConversionResult = guest.accept(0, 2 << 20)
step: str | None = r.step
answer: pkvm.ExitResult | None = r.exit
m = pkvm.RangeMap()
m.assign(0, 10, 1)
n: int = m.get(3)
"""

BAD = """\
import pkvm

m = pkvm.RangeMap()
s: str = m.get(3)
"""


def _run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_pkvm_passes_mypy_strict(tmp_path):
    proc = _run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                 "pkvm"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("Success: no issues found")


def _source_files():
    """The checkout's files: git's list, or (unpacked sdist) the tree without build output."""
    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout:
        return proc.stdout.split()
    skip = {"__pycache__", ".hypothesis", "build", ".git"}
    return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_script_type_checks_after_the_readme_editable_install(tmp_path):
    """In a fresh venv, ``pip install -e . --config-settings editable_mode=compat`` of a copy of
    the checkout; mypy --strict then follows ``import pkvm`` into it: a correct script passes and
    a wrong one is caught (so pkvm's types were seen, not Any)."""
    src = tmp_path / "src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    # The built core, with its times, so that the install does not compile it again.
    core = Path(pkvm._core.__file__)
    for built in (ROOT / "pkvm" / "_core.c", core):
        if built.exists():
            shutil.copy2(built, src / "pkvm" / built.name)
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path).returncode == 0
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The packages of the environment running the tests (setuptools for the build, mypy) for
    # the new venv: --system-site-packages gives only the base interpreter's, and when that
    # environment is itself a venv on Python 3.12+ the base has no setuptools. A plain path
    # entry, not a site dir: that environment's own install of pkvm (a .pth) stays out.
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path, env=env)
    assert purelib.returncode == 0, purelib.stderr
    (Path(purelib.stdout.strip()) / "zz_test_parent_env.pth").write_text(
        "".join(p + "\n" for p in sys.path if p.endswith("-packages") and Path(p).is_dir()))
    proc = _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src),
                 "--config-settings", "editable_mode=compat"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    where = _run([py, "-c", "import pkvm; print(pkvm.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip() == str(src / "pkvm" / "__init__.py"), where
    for name, text in (("good.py", GOOD), ("bad.py", BAD)):
        (tmp_path / name).write_text(text)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    good = _run([py, "-m", "mypy", "--strict", *cache, "good.py"], cwd=tmp_path, env=env)
    assert good.returncode == 0, good.stdout[-3000:]
    bad = _run([py, "-m", "mypy", "--strict", *cache, "bad.py"], cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert 'bad.py:4: error: Incompatible types in assignment (expression has type "int", variable has type "str")' \
        in bad.stdout, bad.stdout
