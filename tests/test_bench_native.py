"""bench/native_report.py skips cleanly when its native reference cannot be built.

The absl::btree_map reference is a benchmark-only tool (docs/performance.md): without a C++
compiler or Abseil's headers the report must say why and exit 0, not fail or print a table.
"""

import os
import stat
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.append(str(BENCH))
import native_report  # noqa: E402


def test_missing_compiler_skips(monkeypatch, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert native_report.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("native_report: skipped, the absl reference is unavailable: ")
    assert "cannot run the C++ compiler '/nonexistent/g++'" in out
    assert "|" not in out  # no table


def test_missing_abseil_headers_skip(monkeypatch, capsys, tmp_path):
    # A compiler that fails as g++ does when Abseil's headers are not installed.
    fake = tmp_path / "fake-g++"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'absl_btree.cc:15:10: fatal error: absl/container/btree_map.h: "
        "No such file or directory' >&2\n"
        "exit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", os.fspath(fake))
    assert native_report.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "Abseil headers not found (install them with: apt-get install libabsl-dev)" in out
    assert "|" not in out


def test_rounds_below_five_refused(capsys):
    with pytest.raises(SystemExit, match="2"):
        native_report.main(["--rounds", "4"])
    assert "--rounds must be at least 5" in capsys.readouterr().err
