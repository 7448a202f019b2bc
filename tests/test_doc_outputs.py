"""The outputs the README and docs/ show are what the commands print today.

The README's comparison tables, docs/workloads.md's trace excerpt and docs/calibration.md's
tables against public measurements are a reader's first figures; the model's changes move them, and nothing else re-runs them (an audit on
2026-12-06 found figures in docs/ a day stale). Each shown line must be a line of the live
output, but for the simulator's own speed (``wall``, ``GFNs/s``), which varies by run, and the
``...`` that marks rows left out.
"""

import pathlib
import re
import shlex

import pytest
from test_docs import _blocks as _fenced

from pkvm import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
_VARIES = ("wall", "GFNs/s")


def _blocks(path: pathlib.Path) -> list[list[str]]:
    """The lines of every fenced block of ``path`` (test_docs' reading of them)."""
    return [text.splitlines() for _lang, _line, text in _fenced(path)]


def _compare_blocks() -> list[tuple[str, list[str]]]:
    """(command line, shown lines) of the README's ``pkvm compare`` output blocks: the default
    comparison's (the block after the set-up commands, no ``$`` line) and those that start
    with ``$ python3 -m pkvm compare``."""
    out = []
    for lines in _blocks(ROOT / "README.md"):
        if lines and lines[0].startswith("pkvm ") and " · " in lines[0]:
            out.append(("python3 -m pkvm compare", lines))
        elif lines and lines[0].startswith("$ python3 -m pkvm compare"):
            out.append((lines[0][2:], lines[1:]))
    return out


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[str]:
    assert cli.main(argv) == 0
    return [ln.rstrip() for ln in capsys.readouterr().out.splitlines()]


def _check(shown: list[str], live: list[str], where: str) -> None:
    have = set(live)
    for ln in shown:
        s = ln.strip()
        if not s or s == "..." or s.split("  ")[0].strip() in _VARIES:
            continue
        assert ln.rstrip() in have, f"{where}: the docs show\n{ln}\nwhich the command no longer prints; it prints\n" + \
            "\n".join(x for x in live if x.split("  ")[0].strip() == s.split("  ")[0].strip())


def test_the_readme_blocks_are_found() -> None:
    assert len(_compare_blocks()) >= 3


@pytest.mark.parametrize("cmd,shown", _compare_blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_readme_comparison_outputs_are_current(capsys, monkeypatch, cmd, shown) -> None:
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    argv = shlex.split(cmd)[3:]  # after "python3 -m pkvm"
    if "--layout" not in argv:
        argv += ["--layout", "columns"]  # the README shows the narrow terminal's layout
    _check(shown, _run(capsys, argv), f"README.md, {cmd}")


def test_workloads_trace_excerpt_is_current(capsys, monkeypatch, tmp_path) -> None:
    """docs/workloads.md's excerpt of ``pkvm run --workload swiotlb --memory 64M --trace
    out.txt``: its lines, in its order, in the trace."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    shown = next(b for b in _blocks(ROOT / "docs" / "workloads.md") if b and "kvm_vmgexit_enter" in b[0])
    trace = tmp_path / "out.txt"
    _run(capsys, ["run", "--workload", "swiotlb", "--memory", "64M", "--trace", str(trace)])
    lines = [ln.rstrip() for ln in trace.read_text(encoding="utf-8").splitlines()]
    i = lines.index(shown[0].rstrip())
    assert lines[i:i + len(shown)] == [ln.rstrip() for ln in shown]


def test_calibration_table_is_current(capsys) -> None:
    """docs/calibration.md's two tables against ``python3 bench/calibration.py`` (about 5 s):
    pkvm's seconds as printed, its ratios and speedups to the digits the table gives them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibration", ROOT / "bench" / "calibration.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main() == 0
    live = capsys.readouterr().out.splitlines()
    doc = (ROOT / "docs" / "calibration.md").read_text(encoding="utf-8")
    # single vCPU: (pkvm s, ratio) in the order of the table and of the script
    shown = re.findall(r"^\| A\d, [^|]*\| `[^`]*` \| ([\d.]+) s \| [\d.]+ s \| ([\d.]+) \|$", doc, re.M)
    got = [ln.split()[-3::2] for ln in live if re.match(r"^(lkvs|J\. Miao)", ln)]
    assert len(shown) == len(got) == 4, (shown, got)
    for (s, ratio), (s2, ratio2) in zip(shown, got):
        assert (s, ratio) == (s2, ratio2), f"calibration.md shows {s} s / {ratio}, the script prints {s2} s / {ratio2}"
    # speedups: "one s / many s = X×" against the script's 1-vCPU s, 32-vCPU s, speedup
    shown2 = re.findall(r"^\| (?:TDX|SNP) [^|]*\| ([\d.]+) s / ([\d.]+) s = \**([\d.]+)×", doc, re.M)
    got2 = [ln.split()[3:6] for ln in live if re.match(r"^(tdx|snp) \d+G ", ln)]  # after "tdx 8G 6.19"
    assert len(shown2) == len(got2) == 4, (shown2, got2)
    for (one, many, x), (one2, many2, x2) in zip(shown2, got2):
        assert (one, many) == (one2, many2), f"calibration.md shows {one} s / {many} s, the script prints {one2} / {many2}"
        digits = len(x.split(".")[1]) if "." in x else 0
        assert abs(float(x) - float(x2)) <= 0.5 * 10 ** -digits + 1e-9, f"calibration.md shows {x}×, the script {x2}"


def _notes(block: list[str]) -> list[str]:
    """A block's ``note (...)`` lines, each unwrapped (its continuation lines are indented)."""
    out: list[str] = []
    for ln in block:
        if ln.startswith("note ("):
            out.append(ln.rstrip())
        elif ln.startswith("  ") and out:
            out[-1] += " " + ln.strip()
    return out


@pytest.mark.parametrize("memory,extra", [("1G", []), ("64M", ["--cost", "npf_fault=5us"])])
def test_workloads_replay_notes_are_current(capsys, monkeypatch, tmp_path, memory, extra) -> None:
    """docs/workloads.md's replay notes: a 1 GiB SNP boot's trace replayed, and a 64 MiB one
    replayed under ``--cost npf_fault=5us``; each shown note (wrapped there) is the start of a
    note the replay prints (a shown note may end in ``...``)."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    blocks = [_notes(b) for b in _blocks(ROOT / "docs" / "workloads.md")]
    repriced = memory != "1G"  # the 64 MiB note splits the traced run's time ("... of it the traced work")
    shown = next(n for n in blocks if n and "modeled time not reproduced" in n[0] and ("of it the" in n[0]) == repriced)
    trace = tmp_path / "t.txt"
    _run(capsys, ["run", "--memory", memory, "--trace", str(trace)])
    live = [ln.rstrip() for ln in _run(capsys, ["run", "--workload", f"replay:{trace}", "--memory", memory, *extra])
            if ln.startswith("note (")]
    for note in shown:
        head = note[:-3].rstrip() if note.endswith("...") else note
        assert any(ln.startswith(head) for ln in live), f"workloads.md shows\n{note}\nthe replay prints\n" + "\n".join(live)


def test_readme_direct_map_prose_is_current() -> None:
    """The README's sentence under the default comparison, "16.8 M per-page direct-map calls
    where upstream makes N (...), S s more (P %)", and the plot paragraph's "add their S s on
    the vCPU", against the runs: it said 32,832 calls (the split count; fault-time's
    ``set_memory_4k`` makes 32,768 calls) and 3.4 s (the runs differ by 3.35 s)."""
    from pkvm import experiments

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    m = re.search(r"([\d.]+) M per-page direct-map calls where upstream makes ([\d,]+)(?: \([^)]*\))?, "
                  r"([\d.]+) s more \((\d+) %\)", text)
    assert m is not None
    ft, ep = experiments.compare(experiments.Config(), ["fault-time", "eager-post"])
    calls = ep.counters["directmap_cpa_calls"]
    assert f"{calls / 1e6:.1f}" == m.group(1)
    assert f"{ft.counters['directmap_cpa_calls']:,}" == m.group(2)
    more = (ep.modeled_ns - ft.modeled_ns) / 1e9
    assert f"{more:.{len(m.group(3).split('.')[1])}f}" == m.group(3)
    assert f"{100 * more * 1e9 / ft.modeled_ns:.0f}" == m.group(4)
    on_vcpu = (ep.by_actor["vcpu0"] - ft.by_actor["vcpu0"]) / 1e9
    shown = re.search(r"per-page direct-map calls add their ([\d.]+) s on the vCPU", text)
    assert shown is not None and f"{on_vcpu:.{len(shown.group(1).split('.')[1])}f}" == shown.group(1)
