"""``pkvm sweep``, ``pkvm sensitivity`` and the execution options of ``pkvm compare``, run as
``python -m pkvm`` through pipes: outputs, and one-line errors that leave nothing written."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import pkvm as _pkvm
from pkvm.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def pkvm(*args, cwd=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(_pkvm.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=path)  # this pkvm, from any directory
    return subprocess.run([sys.executable, "-m", "pkvm", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=180, check=False)


def ok(*args):
    p = pkvm(*args)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return p.stdout


def test_sensitivity_writes_json_table_and_plot(tmp_path):
    js, pq, png = tmp_path / "s.json", tmp_path / "s.parquet", tmp_path / "s.png"
    out = ok("sensitivity", "--memory", "32M", "--samples", "64", "--policies", "fault-time,eager-post",
             "--metric", "modeled_ns", "--json", str(js), "--out", str(pq), "--plot", str(png))
    assert "metric modeled_ns · sobol, N=64" in out and "re-priced (exact" in out
    assert "ranking: fraction of samples" in out and "Sobol' indices" in out
    # each group of tables says what its indices are of (the pairs' had no caption)
    assert "of each policy's modeled_ns" in out
    assert "of the difference of two policies' modeled_ns (what decides which is faster)\nprice" in out
    assert "directmap_tlb_flush" in out and "log-uniform" in out
    d = json.loads(js.read_text())
    assert d["evaluation"] == "re-priced" and d["metric"] == "modeled_ns"
    assert {r["policy"] for r in d["summary"]} == {"fault-time", "eager-post"}
    frame = pd.read_parquet(pq)
    assert len(frame) == 2 * d["evaluations"]
    assert {"policy", "sample", "seed", "price.rmpupdate", "modeled_ns", "by_actor.vcpu0", "memory"} <= set(frame.columns)
    assert png.read_bytes().startswith(PNG)


def test_sensitivity_of_a_simulated_metric_says_so(tmp_path):
    out = ok("sensitivity", "--memory", "16M", "--policies", "eager-locked", "--samples", "2",
             "--metric", "counters.mmu_lock_held_ns", "--vary", "rmpupdate", "--out", str(tmp_path / "s.csv"))
    assert "simulated per sample" in out
    assert "note: counters.mmu_lock_held_ns is not a sum of counts times prices" in out
    assert len(pd.read_csv(tmp_path / "s.csv")) == 2 * (1 + 2)


@pytest.mark.parametrize(("args", "status", "message"), [
    (["--samples", "0"], 2, "argument --samples: '0' is not a positive integer"),
    # ran the nominal and counting runs, then failed allocating 12.8 PiB (internal error, exit 1)
    (["--samples", "99999999999999"], 2, "--samples 99999999999999: at most 1048576 (2**20)"),
    (["--samples", "1048577", "--method", "morris"], 2, "--samples 1048577: at most 1048576"),
    (["--range", "rmpupdate=2us..200ns"], 2, "--range: range rmpupdate=2 µs..200 ns: low is above high"),
    (["--range", "bogus=1..2"], 2, "--range: unknown cost operation 'bogus'"),
    (["--vary", "rmpupdat"], 2, "--vary: unknown cost operation 'rmpupdat'; did you mean rmpupdate?"),
    (["--metric", "modeled"], 2, "--metric: metric 'modeled' is not a name runs measure: one of modeled_ns"),
    (["--method", "morris", "--samples", "1"], 2, "--samples 1: morris needs at least 2 trajectories"),
    (["--out", "OUT.txt"], 2, "--out OUT.txt: write .parquet or .csv, not .txt"),
    (["--scheduler", "tcp://127.0.0.1:9"], 1, "--scheduler tcp://127.0.0.1:9: no Dask scheduler answered within 5 s"),
])
def test_sensitivity_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, status, message):
    monkeypatch.chdir(tmp_path)
    outs = ["--json", "s.json", "--plot", "s.png"] + ([] if "--out" in args else ["--out", "s.parquet"])
    assert main(["sensitivity", "--memory", "16M", "--samples", "8", *args, *outs]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pkvm: error: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_sweep_grid_table_frame_and_small_multiples(tmp_path):
    pq, png = tmp_path / "g.parquet", tmp_path / "g.png"
    js = tmp_path / "g.json"
    out = ok("sweep", "--grid", "memory=16M,32M", "vcpus=1,2", "--policies", "fault-time,eager-post",
             "--out", str(pq), "--plot", str(png), "--json", str(js), "--seed", "3")
    d = json.loads(js.read_text())  # the keys compare's JSON has too (it lacked the last three)
    assert d["metric"] == "critical_path_ns" and d["seed"] == 3 and d["policies"] == ["fault-time", "eager-post"]
    assert d["cost_model"] and len(d["results"]) == 8
    lines = out.splitlines()
    assert "metric critical_path_ns" in lines[0]  # the default metric
    # its cells carry their unit (ms), so the column drops the name's _ns (it said critical_path_ns)
    assert lines[1].split() == ["memory", "vcpus", "policy", "critical_path"]
    assert lines[2].endswith(" ms")
    assert [ln.split()[:3] for ln in lines[2:4]] == [["16M", "1", "fault-time"], ["16M", "1", "eager-post"]]
    frame = pd.read_parquet(pq)
    assert len(frame) == 8 and frame["vcpus"].tolist()[:4] == [1, 1, 2, 2]
    assert png.read_bytes().startswith(PNG)


@pytest.mark.parametrize(("args", "message"), [
    (["--grid", "colour=red"], "--grid colour=red: 'colour' is not one of"),
    (["--grid", "memory=16M,16M"], "--grid: grid key 'memory' repeats a value"),
    # the same size spelt twice: two identical points, and --plot failed after the runs (exit 1)
    (["--grid", "memory=16M,16384K"], "--grid: grid key 'memory' repeats a value: 16M and 16384K are the same"),
    (["--grid", "image=2M,2048K"], "--grid: grid key 'image' repeats a value: 2M and 2048K are the same"),
    (["--grid", "vcpus=1,x"], "--grid vcpus=1,x: 'x' is not an integer"),
    (["--grid", "memory=3M"], "--grid: grid point memory=3M: memory '3M' must be a multiple of 2M"),
    (["--grid", "vcpus=1", "vcpus=2"], "--grid gives vcpus twice"),
    (["--grid", "vcpus=1", "--metric", "nope"], "--metric nope: not a name runs measure: one of modeled_ns"),
    # a text column of the table: formatting it as a number failed after the runs (exit 1)
    (["--grid", "vcpus=1", "--metric", "policy"], "--metric policy: a column of the configuration, not a number"),
    (["--grid", "vcpus=1", "--metric", "platform"], "--metric platform: a column of the configuration"),
    # numeric columns of the configuration: a sweep "measured" the seed and the vCPU count (exit 0)
    (["--grid", "vcpus=1", "--metric", "seed"], "--metric seed: a column of the configuration, not a number"),
    (["--grid", "vcpus=1", "--metric", "vcpus"], "--metric vcpus: a column of the configuration, not a number"),
    (["--grid", "vcpus=1", "--metric", "host_cpus"], "--metric host_cpus: a column of the configuration"),
    (["--grid", "vcpus=1", "--metric", ""], "--metric : not a name runs measure"),  # was the default metric
])
def test_sweep_bad_grid(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--memory", "16M", *args, "--out", "g.csv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_sweep_tells_auto_batch_pages_from_the_size_it_chose(tmp_path, capsys):
    """``--grid batch_pages=512,auto`` where auto takes 512: the table printed the two points
    alike (``512`` twice), the tidy table could not tell them apart, and ``--plot`` stopped
    after the runs with pandas' "cannot reindex on an axis with duplicate labels" (exit 1)."""
    png, csv = tmp_path / "g.png", tmp_path / "g.csv"
    assert main(["sweep", "--memory", "16M", "--vcpus", "2", "--policies", "fault-time", "--grid",
                 "batch_pages=512,auto", "--plot", str(png), "--out", str(csv), "-q"]) == 0
    out = capsys.readouterr().out
    assert [ln.split("  ")[0] for ln in out.splitlines()[2:]] == ["512", "auto (512)"]
    assert png.read_bytes().startswith(b"\x89PNG")
    frame = pd.read_csv(csv)
    assert list(frame["batch_pages"]) == [512, 512] and list(frame["batch_pages_auto"]) == [False, True]


def test_sweep_prints_a_count_whole(capsys):
    """A count is exact, and ``pkvm sweep --metric counters.rmpupdate`` prints it as the
    comparison table does, ``16,777,216``; it printed ``1.678e+07`` (4 significant digits)."""
    assert main(["sweep", "--grid", "memory=16M,64G", "--policies", "fault-time", "--metric",
                 "counters.rmpupdate", "-q"]) == 0
    cells = [ln.split()[-1] for ln in capsys.readouterr().out.splitlines()[2:]]
    assert cells == ["4,096", "16,777,216"]


def test_sweep_prints_times_to_3_digits_as_compare_does(capsys):
    """A time in ``pkvm sweep``'s table reads as in ``pkvm compare``'s, to 3 significant digits
    (``36.1 ms``); the sweep printed 4 (``36.12 ms``, the cost model's formatter for prices)."""
    argv = ["--platform", "tdx", "--memory", "16M", "--policies", "6.19", "-q"]
    assert main(["sweep", "--grid", "memory=16M", *argv]) == 0
    swept = capsys.readouterr().out.splitlines()[2].split()[-2:]
    assert main(["compare", *argv]) == 0
    table = capsys.readouterr().out.splitlines()
    compared = table[-1].split()[1:3]  # the critical path, the table's first metric
    assert swept == compared and len(swept[0].replace(".", "")) == 3, (swept, compared)


def test_sensitivity_prints_times_to_3_digits_as_compare_does_and_prices_as_the_cost_model(capsys):
    """A time of the metric in ``pkvm sensitivity``'s per-policy table reads as in ``pkvm
    compare``'s, to 3 significant digits (``35.2 ms``); it printed 4 (``35.18 ms``, the cost
    model's formatter for prices). The prices table keeps that formatter: a price set to
    1234 ns reads ``1.234 µs``, as ``pkvm costs`` gives it."""
    argv = ["--platform", "tdx", "--memory", "16M", "--policies", "6.19", "--cost", "npf_fault=1234ns", "-q"]
    assert main(["sensitivity", "--samples", "2", *argv]) == 0  # the critical path, simulated per sample
    lines = capsys.readouterr().out.splitlines()
    price = next(ln for ln in lines if ln.startswith("npf_fault ")).split()
    row = lines[lines.index("critical_path_ns per policy") + 2].split()  # model's prices, mean, p5, p50, p95
    assert main(["compare", *argv]) == 0
    compared = capsys.readouterr().out.splitlines()[-1].split()[1:3]  # the critical path, the table's first metric
    assert price[-2:] == ["1.234", "µs"], price
    assert row[1:3] == compared, (row, compared)
    cells = [row[i] for i in range(1, len(row), 2)]
    assert len(cells) == 5 and all(len(c.replace(".", "").lstrip("0")) <= 3 for c in cells), row


def test_sensitivity_morris_prints_mu_star_to_3_digits(capsys):
    """Morris's mu* and its confidence are times of the metric (its change over a price's
    range), not prices: 3 significant digits, as the per-policy table's times."""
    argv = ["--platform", "tdx", "--memory", "16M", "--policies", "6.19", "--metric", "modeled_ns"]
    assert main(["sensitivity", "--samples", "2", "--method", "morris", *argv, "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("of each policy's modeled_ns") + 2
    cells = [ln.split(None, 1)[1].strip() for ln in lines[start:lines.index("", start)]]  # one per price group
    values = [v for c in cells for v in c.split("±")]
    assert len(values) >= 4 and all(len(v.split()[0].replace(".", "").lstrip("0")) <= 3 for v in values), cells
    assert any(len(v.split()[0].replace(".", "")) == 3 for v in values), cells


@pytest.mark.parametrize("argv, says", [
    (["--grid", "memory=16M,32M"], "sweep of 2 grid points × 4 policies ·"),
    (["--grid", "memory=16M", "--policies", "fault-time"], "sweep of 1 grid point × 1 policy ·"),
    (["--grid", "platform=snp,tdx", "--memory", "16M"], "sweep of 2 grid points × their policies (6 runs) ·"),
])
def test_sweep_header_counts_the_policies(capsys, argv, says):
    """The header says how many runs each grid point makes; it said "× policies" whatever the
    count, and a platform in the grid runs each platform's own policies."""
    assert main(["sweep", *argv, "-q"]) == 0
    assert says in capsys.readouterr().out.splitlines()[0]


def test_compare_out_and_local_cluster(tmp_path):
    """compare --jobs 2 (a local Dask cluster) gives the serial JSON, and --out the tidy rows."""
    one, two, csv = tmp_path / "1.json", tmp_path / "2.json", tmp_path / "c.csv"
    ok("compare", "--memory", "32M", "--policies", "fault-time,eager-post", "--json", str(one), "--out", str(csv))
    ok("compare", "--memory", "32M", "--policies", "fault-time,eager-post", "--jobs", "2", "--json", str(two))
    a, b = (json.loads(p.read_text())["results"] for p in (one, two))
    assert [(r["counters"], r["by_actor_op"], r["modeled_ns"]) for r in a] == [
        (r["counters"], r["by_actor_op"], r["modeled_ns"]) for r in b]
    frame = pd.read_csv(csv)
    assert frame["policy"].tolist() == ["fault-time", "eager-post"]
    assert frame["modeled_ns"].tolist() == [r["modeled_ns"] for r in a]


def test_compare_unreachable_scheduler_exits_1(tmp_path):
    p = pkvm("compare", "--memory", "16M", "--scheduler", "tcp://127.0.0.1:9", "--json", "x.json", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "no Dask scheduler answered within 5 s" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_sensitivity_defaults_to_the_critical_path_and_simulates_it():
    """With the timeline, runs measure critical_path_ns: the default metric, which is not a sum of
    counts times prices, so every sample is simulated and the output says so."""
    out = ok("sensitivity", "--memory", "16M", "--samples", "8", "--policies", "fault-time,eager-post")
    assert "metric critical_path_ns" in out
    assert "critical_path_ns is not a sum of counts times prices, so every sample was simulated" in out


def test_grid_plot_keeps_each_policy_s_style_across_panels(tmp_path, monkeypatch):
    """``plot_grid``: a policy has one colour and marker in every panel, one legend names every
    policy (the panels of a platform grid have different policies: the TDX lines were drawn
    in the SNP policies' styles and named by the first panel's legend only), a true/false key
    is categorical, a time in ns is plotted in s / ms / µs, and the process's matplotlib
    backend is left as it was."""
    import matplotlib
    from matplotlib.figure import Figure

    from pkvm.experiments.frames import plot_grid

    figs = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self) or real(self, *a, **k))
    rows = [{"platform": plat, "discard": d, "policy": pol, "critical_path_ns": 2e9 + i * 1e8}
            for plat, pols in (("snp", ["fault-time", "eager-post"]), ("tdx", ["6.16", "6.19"]))
            for i, pol in enumerate(pols) for d in (True, False)]
    backend = matplotlib.get_backend()
    plot_grid(pd.DataFrame(rows), ["discard", "platform"], "critical_path_ns", str(tmp_path / "g.png"))
    assert matplotlib.get_backend() == backend
    fig = figs[0]
    styles: dict[str, set[tuple[str, str]]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            styles.setdefault(line.get_label(), set()).add((str(line.get_color()), str(line.get_marker())))
    assert set(styles) == {"fault-time", "eager-post", "6.16", "6.19"}
    assert all(len(s) == 1 for s in styles.values())
    assert len({next(iter(s)) for s in styles.values()}) == 4  # four different styles
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fault-time", "eager-post", "6.16", "6.19"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["True", "False"]
    assert ax.get_ylabel() == "critical_path (s)"
    assert max(max(line.get_ydata()) for line in ax.get_lines()) < 10  # seconds, not ns
