"""The ``pkvm`` command line, run as ``python -m pkvm`` through pipes (so: no progress bar)."""

import json
import os
import re
import subprocess
import sys

import pytest

from pkvm import experiments
from pkvm.cli import main
from pkvm.experiments.workloads import WORKLOADS

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--memory", "64M"]


def pkvm(*args, cwd=None):
    """Run ``python -m pkvm ARGS``; return the CompletedProcess (text, both streams captured)."""
    env = dict(os.environ, COLUMNS="80")  # a narrow terminal must not change piped output
    return subprocess.run([sys.executable, "-m", "pkvm", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120, check=False)


def ok(*args, cwd=None):
    """Run pkvm and insist on success; return stdout."""
    p = pkvm(*args, cwd=cwd)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p.stdout


def rows(stdout):
    """The first word of each line of the first table's body (the policies)."""
    lines = stdout.splitlines()
    rule = next(i for i, ln in enumerate(lines) if ln.startswith("──"))
    body = []
    for ln in lines[rule + 1:]:
        if not ln.strip():
            break
        body.append(ln.split()[0])
    return body


def test_compare_prints_every_policy():
    """compare prints a header line and one row per default policy, in order."""
    out = ok("compare", *SMALL)
    first = out.splitlines()[0]
    assert first.startswith("pkvm ") and "snp" in first and "64M" in first and "seed 0" in first
    assert rows(out) == list(experiments.PLATFORM_POLICIES["snp"])
    assert "RMPUPDATEs" in out


def test_compare_policies_and_platform():
    """--platform and --policies choose what is compared."""
    out = ok("compare", *SMALL, "--platform", "tdx", "--policies", "6.19,6.16")
    assert rows(out) == ["6.19", "6.16"]
    assert "SEAMCALLs" in out and "RMPUPDATEs" not in out


def test_piped_output_ignores_the_terminal_width():
    """Through a pipe the table keeps one row per policy at its natural width."""
    out = ok("compare", *SMALL)
    assert max(len(ln) for ln in out.splitlines()) > 80


def test_layout_columns():
    """--layout columns puts the policies in the header."""
    out = ok("compare", *SMALL, "--layout", "columns")
    assert out.splitlines()[1].split() == list(experiments.PLATFORM_POLICIES["snp"])


def _layout_help(capsys, command):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    para = text[text.index("\n  --layout {"):text.index("-q, --quiet")]
    return " ".join(para.split())


def test_layout_help_says_what_auto_does_and_the_sweep_layout(capsys):
    """--layout's help named rows, columns and "rows when they fit", but not what auto does when
    the columns do not fit either (several tables), off a terminal (rows), or with
    --sweep-memory (one shape for every size, report.sweep_tables, so the tables wait for the
    last size on a terminal). pkvm run has a single result: no policies, no sweep there."""
    compare = _layout_help(capsys, "compare")
    for words in ("rows (one row per policy)", "columns (one column per policy, a row per metric)",
                  "split into several tables", "off a terminal: rows", "with --sweep-memory, auto picks "
                  "one shape for every size's table (rows only if every size's rows fit)",
                  "once the last size has run", "(default: auto)"):
        assert words in compare, words
    run = _layout_help(capsys, "run")
    assert "rows (one row for the run)" in run and "policy" not in run and "--sweep-memory" not in run


def test_compare_json(tmp_path):
    """--json writes the command line, config, seed, cost model, version and one result per policy."""
    path = tmp_path / "out.json"
    ok("compare", *SMALL, "--seed", "3", "--cost", "rmpupdate=800ns", "--json", str(path))
    d = json.loads(path.read_text())
    policies = list(experiments.PLATFORM_POLICIES["snp"])
    assert d["pkvm_version"] == experiments.version()
    assert d["command"][:2] == ["pkvm", "compare"]
    assert d["seed"] == 3 and d["policies"] == policies
    assert d["config"]["memory"] == 64 << 20 and d["config"]["costs"] == {"rmpupdate": "800ns"}
    assert d["cost_model"]["costs"]["rmpupdate"]["value_ns"] == 800
    assert [r["row"]["policy"] for r in d["results"]] == policies
    for r in d["results"]:
        assert r["seed"] == 3
        assert r["cost_model"]["fingerprint"] == d["cost_model"]["fingerprint"]
        for key in ("conversions", "gfns_converted", "faults", "rmpupdates", "modeled_ns"):
            assert isinstance(r["row"][key], int)


def test_json_matches_the_api(tmp_path):
    """The CLI's counters are the API's for the same config and seed."""
    path = tmp_path / "out.json"
    ok("compare", *SMALL, "--policies", "eager-post", "--json", str(path))
    d = json.loads(path.read_text())
    api = experiments.run(experiments.Config(memory="64M", policy="eager-post"))
    assert d["results"][0]["counters"] == api.counters
    assert d["results"][0]["modeled_ns"] == api.modeled_ns


def test_jobs_give_the_same_results(tmp_path):
    """--jobs 2 runs the policies on a local Dask cluster with the same counters and times."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    ok("compare", *SMALL, "--policies", "fault-time,eager-post", "--json", str(one))
    ok("compare", *SMALL, "--policies", "fault-time,eager-post", "--jobs", "2", "--json", str(two))
    a, b = (json.loads(p.read_text())["results"] for p in (one, two))
    assert [(r["counters"], r["by_op"]) for r in a] == [(r["counters"], r["by_op"]) for r in b]


def test_compare_plot(tmp_path):
    """--plot writes a PNG."""
    path = tmp_path / "bars.png"
    ok("compare", *SMALL, "--plot", str(path))
    assert path.read_bytes().startswith(PNG)


def test_sweep_memory(tmp_path):
    """--sweep-memory prints one table per size, and --plot draws the sweep."""
    png, js = tmp_path / "sweep.png", tmp_path / "sweep.json"
    out = ok("compare", "--sweep-memory", "64M,128M", "--policies", "fault-time,eager-post",
             "--plot", str(png), "--json", str(js))
    headers = [ln for ln in out.splitlines() if ln.startswith("pkvm ")]
    assert len(headers) == 2 and "64M" in headers[0] and "128M" in headers[1]
    assert png.read_bytes().startswith(PNG)
    d = json.loads(js.read_text())
    assert d["sweep_memory"] == ["64M", "128M"]
    # the top-level config is the sweep's: no memory of its own (it said the default 64 GiB,
    # which never ran), nor the batch that memory would choose
    assert d["config"]["memory"] is None and d["config"]["memory_text"] is None
    assert d["config"]["batch_pages"] is None and d["config"]["batch_pages_auto"] is True
    assert d["config"]["policy"] is None and d["policies"] == ["fault-time", "eager-post"]
    assert [(r["config"]["memory_text"], r["row"]["policy"]) for r in d["results"]] == [
        ("64M", "fault-time"), ("64M", "eager-post"), ("128M", "fault-time"), ("128M", "eager-post")]


def test_run_prints_phases_and_operations():
    """run prints the row, the phases and the modeled time by operation."""
    out = ok("run", *SMALL, "--policy", "eager-post")
    assert rows(out)[0] == "eager-post"
    assert "phases" in out and "launch" in out and "accept" in out
    assert "modeled time by operation" in out and "rmpupdate" in out and "100%" in out


def test_run_default_policy_is_upstream():
    """run without --policy models the current upstream kernel of the platform."""
    assert rows(ok("run", *SMALL))[0] == "fault-time"
    assert rows(ok("run", *SMALL, "--platform", "tdx"))[0] == "6.19"


def test_trace_then_replay(tmp_path):
    """--trace writes one file per policy; replay:PATH replays one with the recorded VM shape."""
    p = pkvm("compare", *SMALL, "--policies", "fault-time,eager-post", "--trace", "t.txt", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["t.eager-post.txt", "t.fault-time.txt"]
    assert "t.fault-time.txt" in p.stderr and "t.eager-post.txt" in p.stderr
    out = ok("run", "--workload", "replay:t.fault-time.txt", cwd=tmp_path)  # memory from the header
    assert "64M RAM" in out.splitlines()[0] and "workload replay" in out
    out = ok("compare", "--workload", "replay", "--option", "file=t.eager-post.txt", "--policies", "6.19",
             cwd=tmp_path)
    assert rows(out) == ["6.19"]


@pytest.mark.parametrize("field, value, said", [
    ("memory", "0", "memory 0 must be"), ("vcpus", "100000", "vcpus 100000 must be"),
    ("image", "1", "image 1 must be"),
])
def test_replay_of_a_header_pkvm_cannot_build_names_the_trace(tmp_path, field, value, said):
    """A '# pkvm' header value pkvm refuses is the trace's fault, not that of an option the
    user did not give: the message names the trace."""
    header = {"memory": "67108864", "image": "2097152", "vcpus": "1", field: value}
    (tmp_path / "t.txt").write_text(
        f"cpus=1\n# pkvm version=0.1.0 platform=snp memory={header['memory']} image={header['image']} "
        f"vcpus={header['vcpus']} policy=fault-time workload=boot prealloc=0\n")
    p = pkvm("run", "--workload", "replay:t.txt", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = p.stderr.splitlines()
    assert line.startswith("pkvm: error: --workload replay:t.txt: its '# pkvm' header records a VM pkvm does "
                           f"not build: {said}"), line


def test_trace_size_estimate_counts_lines_of_a_small_trace(tmp_path):
    """--trace says how many lines it will write: a trace of tens of thousands of lines was
    announced as "(0.0 M lines)"."""
    p = pkvm("run", *SMALL, "--workload", "swiotlb", "--trace", "t.txt", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    said = p.stderr.splitlines()[0]
    assert "0.0 M lines" not in said and " k lines) of trace to t.txt" in said, said
    estimate = float(said.split(" (", 1)[1].split(" k lines", 1)[0])
    assert abs(estimate * 1000 - len((tmp_path / "t.txt").read_text().splitlines())) < 0.1 * estimate * 1000


def test_replay_help_says_what_a_differing_option_does(tmp_path):
    """--help said options given "override" the trace's recorded VM; a replay refuses them."""
    ok("run", *SMALL, "--trace", "t.txt", cwd=tmp_path)
    p = pkvm("run", "--workload", "replay:t.txt", "--memory", "128M", cwd=tmp_path)
    assert p.returncode == 2 and "a replay runs the VM its trace recorded" in p.stderr
    for command in ("run", "compare"):
        text = " ".join(ok(command, "--help").split())
        assert "options given override them" not in text and "an option that gives another value is refused" in text


def test_sweep_traces_are_named_by_size_and_policy(tmp_path):
    """A sweep writes one trace per size and policy, named as experiments.sweep names them."""
    ok("compare", "--sweep-memory", "16M,32M", "--policies", "6.19", "--trace", "t.txt", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["t.16M.6.19.txt", "t.32M.6.19.txt"]


@pytest.mark.parametrize("policies", ["6.19", "6.16,6.19"])
def test_sweep_timelines_and_gantt_charts_are_named_by_size(tmp_path, policies):
    """--timeline and --gantt with --sweep-memory write one file per size and policy, as the
    trace does (one name per policy alone had the second size overwrite the first's)."""
    p = pkvm("compare", "--platform", "sw_protected", "--sweep-memory", "16M,32M", "--policies", policies,
             "--timeline", "tl.json", "--gantt", "g.png", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    want = [f"{stem}.{size}.{pol}.{ext}" for stem, ext in (("g", "png"), ("tl", "json"))
            for size in ("16M", "32M") for pol in policies.split(",")]
    assert sorted(os.listdir(tmp_path)) == sorted(want)


def test_quiet_lists_no_files(tmp_path):
    """--quiet keeps stderr empty."""
    p = pkvm("compare", *SMALL, "--policies", "6.19", "--json", str(tmp_path / "o.json"), "--quiet")
    assert p.returncode == 0 and p.stderr == ""


def test_workloads_lists_all():
    """workloads lists every workload with its options and their defaults."""
    out = ok("workloads")
    names = [ln.split()[0] for ln in out.splitlines() if ln and not ln.startswith(" ")]
    assert names[:len(WORKLOADS)] == list(WORKLOADS)
    assert len(WORKLOADS) == 8
    assert "accept=2M" in out and "file=(required)" in out


def test_costs_lists_sources():
    """costs prints every operation with value, range, confidence and source."""
    out = ok("costs")
    line = next(ln for ln in out.splitlines() if ln.startswith("rmpupdate "))
    assert "500 ns" in line and "RMPOPT" in line
    assert "source" in out and "conf" in out


def test_costs_overrides_and_toml(tmp_path):
    """--cost shows as an override; --toml output reads back with --costs."""
    assert "override" in ok("costs", "--cost", "rmpupdate=800ns")
    toml = ok("costs", "--platform", "tdx", "--toml", "--cost", "seamcall_aug=3us")
    path = tmp_path / "tdx.toml"
    path.write_text(toml)
    line = next(ln for ln in ok("costs", "--platform", "tdx", "--costs", str(path)).splitlines()
                if ln.startswith("seamcall_aug "))
    assert "3 µs" in line


def test_costs_markdown():
    """--markdown prints a pipe table."""
    assert ok("costs", "--markdown").splitlines()[0].startswith("| operation |")


@pytest.mark.parametrize("args", [[], ["compare"], ["run"], ["workloads"], ["costs"]],
                         ids=["top", "compare", "run", "workloads", "costs"])
def test_help(args):
    """--help works everywhere and describes the options."""
    out = ok(*args, "--help")
    assert out.startswith("usage: pkvm")
    if args in (["compare"], ["run"]):
        for opt in ("--platform", "--memory", "--workload", "--option", "--seed", "--cost", "--costs",
                    "--json", "--plot", "--trace", "--quiet"):
            assert opt in out


def test_help_says_the_sweep_plot_draws_the_critical_path():
    """``compare --sweep-memory ... --plot`` draws the critical path against memory
    (``report.plot(sweep=True)``, the README); the help of both options said modeled time,
    which is the CPU time, not the critical path, with more than one vCPU."""
    import re

    from pkvm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["compare"]
    helps = {o: next(a.help for a in sub._actions if o in a.option_strings) for o in ("--plot", "--sweep-memory")}
    for opt, text in helps.items():
        assert "critical path against memory" in text, opt
        assert not re.search(r"modeled time against memory", text), opt


def test_version():
    """--version prints the package version."""
    assert ok("--version").strip() == f"pkvm {experiments.version()}"


BAD = {
    "unknown-platform": (["compare", "--platform", "arm"], 2),
    "bad-memory": (["compare", "--memory", "12Q"], 2),
    "unaligned-memory": (["compare", "--memory", "3M"], 2),
    "unknown-policy": (["compare", *SMALL, "--policies", "fault-time,nope"], 2),
    "unknown-run-policy": (["run", *SMALL, "--policy", "nope"], 2),
    "unknown-workload": (["compare", "--workload", "nope"], 2),
    "unknown-option": (["compare", "--option", "nope=1"], 2),
    "bad-option-value": (["compare", "--option", "accept=3K"], 2),
    "option-without-value": (["compare", "--option", "accept"], 2),
    "bad-cost": (["compare", "--cost", "rmpupdate=fast"], 2),
    "unknown-cost": (["costs", "--cost", "rmpupdatee=1ns"], 2),
    "missing-cost-file": (["compare", "--costs", "no-such-costs.toml"], 2),
    "replay-without-file": (["run", "--workload", "replay"], 2),
    "missing-replay-file": (["compare", *SMALL, "--workload", "replay:no-such-trace.txt"], 2),
    "bad-seed": (["compare", "--seed", "-1"], 2),
    "bad-jobs": (["compare", "--jobs", "0"], 2),
    "bad-sweep": (["compare", "--sweep-memory", "64M,5M"], 2),
    "json-in-missing-dir": (["compare", *SMALL, "--json", "no/such/dir/out.json"], 2),
    "plot-unknown-format": (["compare", *SMALL, "--plot", "out.nope"], 2),
    "unknown-command": (["frobnicate"], 2),
    "no-command": ([], 2),
}


@pytest.mark.parametrize(("args", "status"), BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line(args, status, tmp_path):
    """Bad input: the documented status, one 'pkvm: error:' line on stderr, no traceback."""
    p = pkvm(*args, cwd=tmp_path)
    assert p.returncode == status, p.stderr
    assert p.stderr.endswith("\n") and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("pkvm: error: ")
    assert "Traceback" not in p.stdout + p.stderr
    assert os.listdir(tmp_path) == []  # nothing half-written


@pytest.mark.parametrize("command", [["compare"], ["run"], ["sweep", "--grid", "vcpus=1"]])
def test_replay_without_a_file_names_the_options(capsys, command):
    """``pkvm compare --workload replay`` said Config's words ("workload 'replay' needs option
    'file' (the trace file)"), naming no command-line argument; the line the CLI meant to print
    (after Config, so never reached) names --option file= and replay:PATH."""
    assert main([*command, "--workload", "replay", "--memory", "64M"]) == 2
    err = capsys.readouterr().err
    assert err == ("pkvm: error: --workload replay needs --option file=... (or --workload replay:PATH): "
                   "the trace file\n")


def test_main_returns_status(capsys):
    """main() returns the exit status instead of raising SystemExit (help included)."""
    assert main(["--help"]) == 0
    assert main(["compare", "--platform", "arm"]) == 2
    assert capsys.readouterr().err.startswith("pkvm: error: argument --platform")


def test_main_in_process(capsys):
    """main() can run a comparison in-process, printing plain text to a non-terminal stdout."""
    assert main(["compare", *SMALL, "--policies", "6.19", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert rows(out) == ["6.19"] and "\x1b" not in out


def test_runtime_error_is_one_line(monkeypatch, capsys):
    """An error the simulated kernel reports mid-run exits 1 with one line."""
    from pkvm.errors import KvmError

    def fail(*_args, **_kwargs):
        raise KvmError(5, "workload step failed: converting [0x1000, +0x1000) to shared")

    monkeypatch.setattr(experiments, "compare", fail)
    assert main(["compare", *SMALL]) == 1
    err = capsys.readouterr().err
    assert err == "pkvm: error: [EIO] workload step failed: converting [0x1000, +0x1000) to shared " \
                  "(Input/output error)\n"


def test_ctrl_c_exits_130(monkeypatch, capsys):
    """Ctrl-C during a run exits 130 with one line and no traceback."""
    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "run", interrupt)
    assert main(["run", *SMALL]) == 130
    assert capsys.readouterr().err == "pkvm: interrupted\n"


def test_progress_bar_follows_the_runs():
    """The progress callback accepts each policy's fractions in run order."""
    from pkvm.cli import _progress

    with _progress(False, ["a"]) as cb:
        assert cb is None
    with _progress(True, ["a", "b"]) as cb:
        cb("a", 0.5)
        cb("b", 0.25)
        cb("b", 1.0)


def test_the_header_names_every_setting_that_is_not_the_default():
    """The header line names what the numbers depend on: also the host CPUs, the image, the
    shared backing, discard, the batch and the pagewise locks when they are not the defaults
    (two runs that differ only in those printed the same header)."""
    plain = ok("run", *SMALL, "--vcpus", "2").splitlines()[0]
    assert "host CPUs" not in plain and "batch" not in plain and "image" not in plain
    head = ok("run", *SMALL, "--vcpus", "2", "--host-cpus", "128", "--batch-pages", "64", "--pagewise-locks",
              "batch", "--image", "4M", "--shared-backing", "hugetlb-2m", "--no-discard").splitlines()[0]
    for part in ("2 vCPUs", "128 host CPUs", "image 4M", "shared backing hugetlb-2m", "no discard",
                 "batch 64 pages", "pagewise locks batch"):
        assert f" · {part} · " in head, (part, head)


def _json_section():
    """docs/workloads.md's "The JSON report" section, and the keys it names in backticks."""
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "workloads.md").read_text(encoding="utf-8")
    start = doc.index("### The JSON report")
    section = doc[start:doc.index("**Default policies**", start)]
    fields = doc.index("`Config` fields:")  # the config's keys, which the section refers to
    fields = doc[fields:doc.index("\n\n", fields)]
    return set(re.findall(r"`([A-Za-z0-9_]+)`", section + fields)), section


@pytest.mark.parametrize("platform", ["snp", "tdx", "sw_protected"])
def test_every_json_key_is_documented(tmp_path, platform):
    """Every key ``compare --json`` writes (top level, each result, its config, row and phases)
    is named in docs/workloads.md's "The JSON report" (a config's in its list of ``Config``
    fields, which left out ``batch_pages`` and ``pagewise_locks``); no doc listed the result's ``row`` (its
    ``directmap_fragmented`` a fraction where the table shows a percentage, ``faults`` the
    retried faults included), ``wall_s``, ``gfns_per_s``, ``command`` or ``sweep_memory``."""
    named, _ = _json_section()
    out = tmp_path / "o.json"
    ok("compare", "--platform", platform, "--sweep-memory", "16M,32M", "--vcpus", "5", "--workload", "swiotlb",
       "-o", "ops=20", "--json", str(out))
    d = json.loads(out.read_text())
    keys = set(d) | set(d["config"])
    for r in d["results"]:
        keys |= set(r) | set(r["config"]) | {p for ph in r["phases"] for p in ph}
        keys |= {"modeled_ns_ACTOR" if k.startswith("modeled_ns_") else k for k in r["row"]}
        keys |= set(r["directmap"])
    assert sorted(keys - named) == []
    # the timeline's figures, in docs/timeline.md's "What comes out"
    import pathlib

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "timeline.md").read_text(encoding="utf-8")
    start = doc.index("## What comes out")
    table = doc[start:doc.index("### ", start)]
    rows = {line.split("|")[1].strip(" `"): set(re.findall(r"`([A-Za-z0-9_]+)`", line.split("|")[2]))
            for line in table.splitlines() if line.startswith("| `")}
    for field in ("actors", "locks", "latency_ns"):
        sub = {k for r in d["results"] for v in r[field].values() for k in v}
        assert sorted(sub - rows[field]) == [], field
    assert sorted({k for r in d["results"] for k in r["races"]} - rows["races"]) == []


def test_sweep_json_keys_are_documented(tmp_path):
    """``pkvm sweep --json``'s top-level keys (``grid``, ``metric``) are in the same section."""
    named, _ = _json_section()
    out = tmp_path / "s.json"
    ok("sweep", "--grid", "memory=16M", "--policies", "fault-time", "--json", str(out))
    assert sorted(set(json.loads(out.read_text())) - named) == []


def test_the_json_section_names_only_keys_there_are():
    """... and every key the section names in its tables is written (none left from an
    older layout)."""
    from pkvm.experiments import report

    named, section = _json_section()
    tables = {k for line in section.splitlines() if line.startswith("| `")
              for k in re.findall(r"`([A-Za-z0-9_]+)`", line.split("|")[1])}
    rs = experiments.compare(experiments.Config(memory="16M"), ["fault-time"])
    d = report.to_json(rs, {"command": [], "config": {}, "seed": 0, "policies": [], "cost_model": {},
                            "sweep_memory": []})
    assert sorted(tables - set(d) - set(d["results"][0])) == []


def test_result_docstring_names_the_timeline_keys():
    """``help(pkvm.experiments.Result)`` names every key of its timeline figures: it left out
    ``acquisitions``, mmu_lock's ``hold_write_ns`` / ``hold_read_ns`` and the parts of
    ``wait_ns`` (``lock_wait_ns``, ``ipi_ns``, ``spin_ns``)."""
    r = experiments.run(experiments.Config(memory="16M", vcpus=2))
    doc = experiments.Result.__doc__ or ""
    named = set(re.findall(r"``([A-Za-z0-9_]+)``", doc))
    keys = {k for field in (r.actors, r.locks, r.latency_ns) for v in field.values() for k in v} | set(r.races)
    assert sorted(keys - named) == []


@pytest.mark.parametrize("path", ["/dev/stdout", "/proc/self/fd/1"])
def test_json_to_dev_stdout_is_json_dash(path):
    """``--json /dev/stdout | jq`` is ``--json -``: the tables go to stderr. They went to
    standard output before the JSON, which no JSON reader could then parse."""
    p = pkvm("compare", "--memory", "16M", "--policies", "fault-time", "-q", "--json", path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["policies"] == ["fault-time"]
    assert "critical" in p.stderr

