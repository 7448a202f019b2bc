"""The commands of docs/profiling.md work where perf and py-spy exist (skipped elsewhere)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pkvm

# A workload that spends its time in the core, with a named Python function above it.
WORK = """\
import numpy as np
import pkvm


def fill(m, s):
    for i in range(15):
        m.assign_many(s, s + 1, i % 3 + 1)


fill(pkvm.RangeMap(), np.arange(0, 1 << 21, 2, dtype=np.uint64))
"""


def _run(args, cwd):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture
def perf(tmp_path):
    exe = shutil.which("perf")
    if exe is None:
        pytest.skip("perf is not installed")
    probe = subprocess.run([exe, "record", "-q", "-o", str(tmp_path / "probe.data"), "--", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"perf record is not allowed here: {probe.stderr.strip()[:200]}")
    return exe


@pytest.fixture
def work(tmp_path):
    path = tmp_path / "work.py"
    path.write_text(WORK)
    return path


def test_perf_record_resolves_core_symbols(perf, work, tmp_path):
    """perf record -g names the core's C functions (the default build keeps -g)."""
    data = str(tmp_path / "perf.data")
    _run([perf, "record", "-q", "-F", "999", "-g", "-o", data, "--", sys.executable, str(work)],
         cwd=tmp_path)
    out = _run([perf, "report", "-i", data, "--no-children", "--sort", "dso,sym", "-g", "none",
                "--stdio"], cwd=tmp_path).stdout
    assert re.search(r"_core\.cpython-\S+\.so\s+\[\.\] __pyx_f_4pkvm_5_core_8RangeMap_", out), \
        out[:3000]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="python -X perf needs Python 3.12+")
def test_perf_shows_python_frames_with_x_perf(perf, work, tmp_path):
    """With -X perf and --call-graph dwarf, Python functions appear as py:: frames."""
    data = str(tmp_path / "perf.data")
    _run([perf, "record", "-q", "-F", "999", "--call-graph", "dwarf,65528", "-o", data, "--",
          sys.executable, "-X", "perf", str(work)], cwd=tmp_path)
    out = _run([perf, "report", "-i", data, "--children", "--sort", "sym", "-g", "none",
                "--stdio"], cwd=tmp_path).stdout
    assert re.search(r"py::fill:\S*work\.py", out), out[:3000]


def test_py_spy_native_shows_core_frames(work, tmp_path):
    """py-spy --native shows the core's functions under the Python caller, with .pyx lines
    when the generated _core.c sits next to the source (an in-place or profiling build)."""
    exe = shutil.which("py-spy")
    if exe is None:
        pytest.skip("py-spy is not installed")
    raw = tmp_path / "spy.txt"
    proc = subprocess.run([exe, "record", "--native", "--rate", "250", "--format", "raw",
                           "-o", str(raw), "--", sys.executable, str(work)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ermission" in proc.stderr:
        pytest.skip(f"py-spy may not trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = raw.read_text()
    assert re.search(r"fill \(work\.py:\d+\);assign_many", text), text[:3000]
    if (Path(pkvm.__file__).parent / "_core.c").exists():
        assert re.search(r"RangeMap__\w+ \(pkvm/_core\.pyx:\d+\)", text), text[:3000]
    else:
        assert "RangeMap__" in text, text[:3000]
