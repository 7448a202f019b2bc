"""Inputs found by a systematic pass over every subcommand and flag (bad values of every
kind, files of every kind) that still failed after the run or named no argument.

- An output in a directory where no file can be created (``/proc``, a read-only file system)
  was found after the run, and the message named pkvm's temporary file
  (``[Errno 2] No such file or directory: '/proc/123/.pkvm-x1y2z3'``, exit 1). It is a
  usage error before anything runs, naming the option.
- An argument with a NUL byte (``main()`` called from Python; no shell passes one) ran, then
  failed with "embedded null byte", exit 1, naming nothing.
- A value the experiment configuration refuses (a workload, a workload option, a policy, a
  price, a cost file) was reported in the configuration's words, naming no option.
"""

import os

import pytest

from pkvm.cli import main

_UNCREATABLE = "/proc/self/pkvm-test-output"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize(("command", "flag", "ext"), [
    (c, f, e) for c in ("run", "compare") for f, e in (
        ("--json", ".json"), ("--plot", ".png"), ("--trace", ".txt"), ("--timeline", ".json"),
        ("--gantt", ".png"))] + [("compare", "--out", ".csv"), ("sweep", "--out", ".parquet"),
                                 ("sweep", "--json", ".json"), ("sensitivity", "--json", ".json")])
def test_an_output_where_no_file_can_be_created_is_refused_before_the_run(capsys, monkeypatch, command, flag, ext):
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    ran = []
    import pkvm.experiments as E

    monkeypatch.setattr(E, "_build", lambda *a, **k: ran.append(1) or (_ for _ in ()).throw(AssertionError("ran")))
    argv = {"run": ["run", "--memory", "16M"], "compare": ["compare", "--memory", "16M"],
            "sweep": ["sweep", "--grid", "memory=16M"],
            "sensitivity": ["sensitivity", "--memory", "16M", "--samples", "2"]}[command]
    path = _UNCREATABLE + ext
    assert main([*argv, "-q", flag, path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pkvm: error: {flag} {path}: cannot write it: cannot create a file in /proc/"), err
    assert err.count("\n") == 1 and ".pkvm-" not in err and not ran


@pytest.mark.parametrize("argv", [
    ["compare", "--json", "out\0.json"], ["run", "--memory", "\0"], ["costs", "--costs", "a\0"],
    ["compare", "--workload", "replay:\0"]])
def test_an_argument_with_a_nul_byte_is_a_usage_error(capsys, monkeypatch, argv):
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    i = next(i for i, a in enumerate(argv) if "\0" in a)
    assert err == (f"pkvm: error: argument {i + 1}, {argv[i]!r}, contains a NUL byte, which no value or file "
                   "name can hold\n")


@pytest.mark.parametrize(("argv", "start"), [
    (["compare", "--workload", "nope"], "--workload: unknown workload 'nope'"),
    (["run", "--workload", "swiotlb", "--option", "ops=-1"], "--option: workload 'swiotlb' option ops='-1'"),
    (["compare", "--option", "bogus=1"], "--option: workload 'boot' has no option 'bogus'"),
    (["compare", "--policies", "fault-time,nope"], "--policies: unknown policy preset 'nope'"),
    (["run", "--policy", "nope"], "--policy: unknown policy preset 'nope'"),
    (["run", "--platform", "tdx", "--policy", "fault-time"], "--policy: policy 'fault-time' cannot run on a tdx VM"),
    (["compare", "--cost", "rmpupdate=1X"], "--cost: bad duration '1X' for 'rmpupdate=1X'"),
    (["sweep", "--grid", "vcpus=1", "--cost", "nope=1ns"], "--cost: unknown cost operation 'nope'"),
    (["costs", "--cost", "rmpupdate=x"], "--cost: bad duration 'x'"),
    (["costs", "--costs", "@BAD"], "--costs @BAD: bad cost model JSON in @BAD"),
    (["run", "--costs", "@BAD", "--cost", "rmpupdate=1ns"], "--costs @BAD: bad cost model JSON in @BAD"),
    (["compare", "--batch-pages", "3"], "--batch-pages 3 must be a power of two from 1 to 1073741824"),
    (["sweep", "--grid", "vcpus=1", "--batch-pages", "3"], "--batch-pages 3 must be a power of two"),
    (["run", "--vcpus", "128"], "--vcpus 128 exceed --host-cpus 64: the timeline runs each vCPU thread on a "
                                "host CPU of its own (give --host-cpus >= vcpus)"),
])
def test_a_value_config_refuses_is_named_by_its_option(capsys, monkeypatch, tmp_path, argv, start):
    """A value that the experiment configuration refuses is reported with the option that
    gave it; the messages quoted the value but named no option ("unknown workload 'nope'")."""
    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    argv = [a.replace("@BAD", str(bad)) for a in argv]
    assert main([*argv, "--memory", "16M"] if argv[0] in ("run", "compare") else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pkvm: error: " + start.replace("@BAD", str(bad))), err
    assert err.count("\n") == 1
