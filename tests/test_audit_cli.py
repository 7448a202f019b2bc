"""Command-line cases the fuzz of ``test_cli_fuzz.py`` does not generate: outputs to a full
device, a run that fails after its trace file was opened, a price chosen to vary that has no
range. Each ends with exit 1 or 2 and one ``pkvm: error:`` line naming what failed, and leaves
no partial output behind."""

import json
import os

import pytest

from pkvm.cli import main

SMALL = ["--memory", "64M"]


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    errors = [ln for ln in lines if ln.startswith("pkvm: error: ")]
    assert "Traceback" not in err
    if code:
        assert len(errors) == 1 and lines[-1] == errors[0], err
    return code, out, err


def _good_trace(capsys, tmp_path):
    path = tmp_path / "good.txt"
    code, _, err = _run(capsys, ["run", *SMALL, "--trace", str(path), "-q"])
    assert code == 0, err
    return path.read_text().splitlines()


def test_a_failed_replay_keeps_the_old_trace_file(capsys, monkeypatch, tmp_path):
    """``pkvm run --workload replay:bad.txt --trace out.txt`` truncated out.txt when the run
    began and, when the replay stopped at a bad line (exit 1), left a partial trace in its
    place: the previous content was lost. The trace is written whole now, as --json is."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    lines = _good_trace(capsys, tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines[:50] + [
        "  CPU 0/KVM-7 [000] 1.0: kvm_page_fault: vcpu 9 rip 0x0 address 0x1000 error_code 0x2"]) + "\n")
    out = tmp_path / "out.txt"
    out.write_text("old content\n")
    before = sorted(os.listdir(tmp_path))
    code, _, err = _run(capsys, ["run", *SMALL, "--workload", "replay:bad.txt", "--trace", "out.txt"])
    assert code == 1 and "bad.txt line 51" in err
    assert out.read_text() == "old content\n"
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left either
    # a run that succeeds replaces it whole
    code, _, err = _run(capsys, ["run", *SMALL, "--workload", "replay:good.txt", "--trace", "out.txt", "-q"])
    assert code == 0, err
    assert out.read_text().startswith("cpus=2\n# pkvm ") and sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("flag, name", [("--trace", "/dev/full"), ("--timeline", "/dev/full"),
                                        ("--gantt", "/dev/full")])
def test_a_full_device_names_the_file(capsys, monkeypatch, flag, name):
    """``--trace /dev/full`` (or --timeline, --gantt) failed with "pkvm: error: [Errno 28] No
    space left on device", naming neither the option nor the file (--json names it)."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    code, _, err = _run(capsys, ["run", *SMALL, flag, name])
    assert code == 1
    assert f"cannot write {name}: No space left on device" in err.splitlines()[-1]


@pytest.mark.parametrize("argv", [
    ["run", *SMALL, "--json", "ro.json"],
    ["run", *SMALL, "--trace", "ro.json"],
    ["run", *SMALL, "--timeline", "ro.json"],
    ["compare", *SMALL, "--policies", "6.19", "--json", "ro.json"],
    ["sweep", *SMALL, "--policies", "6.19", "--grid", "vcpus=1", "--json", "ro.json"],
    ["sweep", *SMALL, "--policies", "6.19", "--grid", "vcpus=1", "--out", "ro.csv"],
])
def test_a_read_only_output_is_refused_not_replaced(capsys, monkeypatch, tmp_path, argv):
    """An output is written as a temporary file renamed over the target, which a directory
    the user may write allows even when the file is read-only: ``pkvm run --json ro.json``
    replaced a file of mode 0444 with a new writable one, where ``open()`` (and the shell's
    ``>``) fail with EACCES. Refused before anything runs. (Root may write any file: the test
    stands in for a user by making ``os.access`` say what it says to one.)"""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    name = "ro.csv" if "ro.csv" in argv else "ro.json"
    (tmp_path / name).write_text("keep\n")
    os.chmod(tmp_path / name, 0o444)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if mode & os.W_OK and os.path.samefile(p, tmp_path / name) else real_access(p, mode, **kw)))
    code, _, err = _run(capsys, argv)
    flag = argv[argv.index(name) - 1]
    assert (code, err.count("\n")) == (2, 1), err
    assert f"pkvm: error: {flag} {name}: cannot write it: permission denied (the file is read-only)" in err
    assert (tmp_path / name).read_text() == "keep\n" and sorted(os.listdir(tmp_path)) == [name]


_SENS = ["sensitivity", *SMALL, "--policies", "fault-time,eager-post", "--workload", "swiotlb", "-o", "ops=5",
         "--samples", "2"]


def test_varying_only_prices_without_a_range_is_a_usage_error(capsys, monkeypatch):
    """``--vary sleep_in_atomic`` (a price with a single value) ran the nominal and counting
    runs and then failed as a run (exit 1) with "no price varies", naming no option."""
    from pkvm import experiments

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.setattr(experiments, "sensitivity", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    code, _, err = _run(capsys, [*_SENS, "--vary", "sleep_in_atomic"])
    assert (code, err.count("\n")) == (2, 1), err
    assert "pkvm: error: --vary sleep_in_atomic: no price named has a range to sample" in err


def test_a_reprice_refusal_does_not_claim_the_samples_ran(capsys, monkeypatch):
    """``--evaluation reprice`` with a metric that is not a sum of prices is refused before
    any sample runs, but the message said "..., so every sample was simulated". The note of
    an ``auto`` study that did simulate them still says so."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    code, _, err = _run(capsys, [*_SENS, "--vary", "rmpupdate", "--evaluation", "reprice", "--metric",
                                 "counters.rmpupdate"])
    assert (code, err.count("\n")) == (2, 1), err
    assert err == ("pkvm: error: --evaluation reprice: metric 'counters.rmpupdate' cannot be re-priced exactly: "
                   "counters.rmpupdate is not a sum of counts times prices\n")
    code, out, err = _run(capsys, [*_SENS, "--vary", "rmpupdate", "--metric", "counters.rmpupdate"])
    assert code == 0, err
    assert "counters.rmpupdate is not a sum of counts times prices, so every sample was simulated" in out


def test_a_replay_under_another_policy_does_not_blame_the_gap_on_pvalidate(capsys, monkeypatch, tmp_path):
    """README's ``compare --workload replay:out.fault-time.txt`` replays the trace under every
    policy; the note of each compared the replay's total with the recorded fault-time run and
    called the whole difference untraced guest work: "-234 ms (-415.2 %) is PVALIDATE, ...".
    Under another policy the gap is not compared; under the recorded one it still is."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, ["run", *SMALL, "--workload", "swiotlb", "-o", "ops=5", "--trace", "t.txt", "-q"])
    assert code == 0, err
    code, out, err = _run(capsys, ["compare", "--workload", "replay:t.txt", "--policies", "fault-time,eager-post"])
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if ln.startswith("note (") and "modeled time" in ln]
    assert len(notes) == 2, out
    assert notes[0].startswith("note (fault-time): modeled time not reproduced: the traced run modeled ")
    assert " is PVALIDATE" in notes[0] and "(-" not in notes[0]
    assert notes[1].startswith("note (eager-post): modeled time not compared: the trace was recorded under "
                               "policy fault-time")
    assert "is PVALIDATE" not in notes[1]


def test_the_readme_command_line_examples_run(capsys, monkeypatch, tmp_path):
    """README's "More of the command line" block, run as written (the cost file it names is
    the reader's own, so that line is skipped): its trace example ran into --trace-max-size at
    the default 64G (exit 2, 9.4 GB of trace), and the replay after it then found no file."""
    import pathlib
    import re
    import shlex

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"### More of the command line\n\n```sh\n(.*?)```", readme, re.S).group(1)
    ran = 0
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        assert argv[:3] == ["python3", "-m", "pkvm"], line
        if "my-host.toml" in argv:
            continue
        code, out, err = _run(capsys, [*argv[3:], "-q"] if argv[3] in ("compare", "run") else argv[3:])
        assert code == 0, (line, err)
        ran += 1
    assert ran == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out.eager-locked.txt", "out.eager-post.txt", "out.eager-split.txt", "out.fault-time.txt", "out.json"]


@pytest.mark.parametrize("argv, message", [
    (["run", *SMALL, "--host-cpus", "99999"], "pkvm: error: --host-cpus 99999 must be an int in [1, 8192]"),
    (["run", *SMALL, "--vcpus", "1025"], "pkvm: error: --vcpus 1025 must be an int in [1, 1024]"),
    (["run", "--memory", "1P"], "pkvm: error: --memory '1P': RAM does not fit in the VMM's address space"),
    (["run", *SMALL, "--image", "64M"], "pkvm: error: --image '64M' must be 4K aligned and smaller than memory"),
])
def test_a_config_error_names_the_option(capsys, monkeypatch, argv, message):
    """``--host-cpus 99999`` was refused as "host_cpus 99999 must be ...", the Python field's
    name: the command line names its own option, as README's "Errors" paragraph promises."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    code, _, err = _run(capsys, argv)
    assert (code, err.count("\n")) == (2, 1), err
    assert err.startswith(message), err


@pytest.mark.parametrize("argv", [
    ["compare", "--memory", "64M"],
    ["run", "--memory", "64M"],
    ["sweep", "--grid", "memory=64M,128M"],
])
def test_json_dash_is_standard_output_and_the_tables_go_to_stderr(argv, capsys, tmp_path, monkeypatch):
    """``--json -`` wrote a file named ``-`` (and ``/dev/stdout`` mixed the JSON with the
    table): now stdout is the JSON document alone, the tables go to stderr, no file appears."""
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--json", "-"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["pkvm_version"] and doc["command"][1:] == [*argv, "--json", "-"]
    assert "policy" in err  # the table
    assert not os.path.exists(tmp_path / "-")


@pytest.mark.parametrize("flag, example", [("--plot", "OUT.png"), ("--trace", "OUT.txt"), ("--timeline", "OUT.json")])
def test_dash_for_another_output_is_a_usage_error(flag, example, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--memory", "64M", flag, "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pkvm: error: {flag} -: only --json writes to standard output; name a file (e.g. {example})"]
    assert os.listdir(tmp_path) == []


def test_a_read_only_per_policy_trace_is_refused_not_replaced(capsys, monkeypatch, tmp_path):
    """With several policies ``--trace out.txt`` writes ``out.<policy>.txt``: a read-only one of
    those was replaced, since only ``out.txt`` itself was checked. (``os.access`` stands in for
    a user's, as in the test above.)"""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    ro = tmp_path / "out.eager-post.txt"
    ro.write_text("keep\n")
    os.chmod(ro, 0o444)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if mode & os.W_OK and os.path.samefile(p, ro) else real_access(p, mode, **kw)))
    code, _, err = _run(capsys, ["compare", *SMALL, "--policies", "fault-time,eager-post", "--trace", "out.txt"])
    assert (code, err.count("\n")) == (2, 1), err
    assert ("pkvm: error: --trace out.txt: cannot write it (it writes out.eager-post.txt): permission denied "
            "(the file is read-only)") in err
    assert ro.read_text() == "keep\n" and sorted(os.listdir(tmp_path)) == ["out.eager-post.txt"]
