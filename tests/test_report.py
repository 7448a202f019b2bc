"""pkvm.experiments.report: tables, JSON and plots built from experiment results."""

import doctest
import json

import pytest

import pkvm.experiments.report
from pkvm import experiments
from pkvm._units import format_ns
from pkvm.experiments import report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def snp_results():
    return experiments.compare(experiments.Config(platform="snp", memory="64M"))


@pytest.fixture(scope="module")
def tdx_results():
    return experiments.compare(experiments.Config(platform="tdx", memory="64M"))


@pytest.fixture(scope="module")
def sw_results():
    return experiments.compare(experiments.Config(platform="sw_protected", memory="64M"))


def header_line(text):
    """The words of the table's two header lines (single-line headers sit on the second)."""
    return " ".join(text.splitlines()[:2])


def test_text_table_has_a_row_per_policy(snp_results):
    """Each policy's row starts with its name, in the order run."""
    lines = report.text_table(snp_results).splitlines()
    body = [ln.split()[0] for ln in lines[3:]]
    assert body == list(experiments.PLATFORM_POLICIES["snp"])


def test_text_table_numbers_have_thousands_separators(snp_results):
    """Counts print with separators, right-aligned under their header."""
    text = report.text_table(snp_results)
    assert "16,384" in text  # GFNs converted at 64M
    lines = text.splitlines()
    header, row = lines[1], lines[3]
    col_end = header.index("RMPUPDATEs") + len("RMPUPDATEs")
    assert row[:col_end].endswith("16,384")


@pytest.mark.parametrize(("platform", "present", "absent"), [
    ("snp", ["RMPUPDATEs", "PSMASHes", "RMP", "direct-map", "sleep in"], ["SEAMCALLs"]),
    ("tdx", ["SEAMCALLs"], ["RMPUPDATEs", "PSMASHes", "direct-map"]),
    ("sw_protected", [], ["SEAMCALLs", "RMPUPDATEs", "direct-map"]),
], ids=["snp", "tdx", "sw_protected"])
def test_columns_follow_the_platform(platform, present, absent, request):
    """Only the counters a platform's rows have get a column."""
    results = request.getfixturevalue({"snp": "snp_results", "tdx": "tdx_results",
                                       "sw_protected": "sw_results"}[platform])
    head = header_line(report.text_table(results))
    for word in ["policy", "critical", "stall", "p99", "conversions", "faults", "zaps", "CPU time", "wall", "GFNs/s",
                 *present]:
        assert word in head
    for word in absent:
        assert word not in head


def test_modeled_time_per_actor(snp_results):
    """CPU time has a total column and one per actor, in human units; the timeline's critical
    path leads the row."""
    text = report.text_table(snp_results)
    assert "vmm" in header_line(text) and "vcpu0" in header_line(text)
    row = text.splitlines()[3]
    assert format_ns(snp_results[0].modeled_ns) in row
    assert row.split()[1:3] == format_ns(snp_results[0].critical_path_ns).split()


def test_mixed_platforms_get_a_platform_column(snp_results, tdx_results):
    """Results of different platforms share one table, missing counters shown as a dash."""
    text = report.text_table([snp_results[0], tdx_results[0]])
    assert text.splitlines()[1].split()[:2] == ["platform", "policy"]
    assert "RMPUPDATEs" in text and "SEAMCALLs" in text and "—" in text


def test_sweep_results_get_a_memory_column():
    """Results at several memory sizes are labelled with their size."""
    rs = experiments.sweep(experiments.Config(platform="sw_protected"), ["16M", "32M"], ["6.19"])
    lines = report.text_table(rs).splitlines()
    assert lines[1].split()[:2] == ["memory", "policy"]
    assert [ln.split()[0] for ln in lines[3:]] == ["16M", "32M"]


def test_columns_layout_has_a_column_per_policy(snp_results):
    """The transposed layout titles one column per policy and one row per metric."""
    text = report.text_table(snp_results, layout="columns")
    assert text.splitlines()[0].split() == list(experiments.PLATFORM_POLICIES["snp"])
    assert any(ln.split()[:1] == ["RMPUPDATEs"] for ln in text.splitlines())


def test_auto_layout_transposes_when_rows_do_not_fit(snp_results):
    """layout="auto" keeps rows on a wide console and transposes on a narrow one."""
    from rich.console import Console

    wide = report.table(snp_results, console=Console(width=400), layout="auto")
    narrow = report.table(snp_results, console=Console(width=80), layout="auto")
    assert wide.columns[0].header == "policy"
    assert [c.header for c in narrow.columns[1:]] == list(experiments.PLATFORM_POLICIES["snp"])


def test_many_vcpus_collapse_to_sum_and_busiest():
    """Past MAX_VCPU_COLUMNS vCPUs, the table shows their sum and the busiest instead."""
    n = report.MAX_VCPU_COLUMNS + 1
    r = experiments.run(experiments.Config(platform="tdx", memory="64M", vcpus=n))
    head = header_line(report.text_table([r]))
    assert f"{n} vCPUs" in head and "busiest vCPU" in head and "vcpu0" not in head


def test_run_breakdowns_fold_many_vcpus_into_their_sum_and_the_busiest():
    """Past MAX_VCPU_BREAKDOWN vCPUs, the phase and operation tables show the vCPUs' sum and
    the busiest vCPU's figure (per row: the vCPU that spent the most on it) instead of one
    column each; the vmm keeps its own; up to that many, every vCPU has a column."""
    n = report.MAX_VCPU_BREAKDOWN + 1
    r = experiments.run(experiments.Config(platform="snp", memory="128M", vcpus=n))
    vc = {a: ns for a, ns in r.by_actor.items() if a.startswith("vcpu")}
    assert len(vc) == n and len(set(vc.values())) > 1  # the busiest is not any vCPU
    cols, heads = report._breakdown(r.by_actor_op)
    assert heads == ["vmm", f"{n} vCPUs", "busiest vCPU"]
    ops = report.render_text(report.op_table(r))
    assert "vcpu0" not in ops and f"{n} vCPUs" in ops and "busiest vCPU" in ops
    footer = report._breakdown_cells(cols, r.by_actor)
    assert footer == [r.by_actor["vmm"], sum(vc.values()), max(vc.values())]
    for op in r.by_op:
        per = [ops_[op] for a, ops_ in r.by_actor_op.items() if a.startswith("vcpu") and ops_.get(op)]
        cells = report._breakdown_cells(cols, {a: v for a, o in r.by_actor_op.items() if (v := o.get(op))})
        assert cells[1:] == ([sum(per), max(per)] if per else [None, None]), op
    phases = report.render_text(report.phase_table(r))
    assert "vcpu0" not in phases and "busiest vCPU" in phases
    few = experiments.run(experiments.Config(platform="snp", memory="128M", vcpus=report.MAX_VCPU_BREAKDOWN))
    head = [ln for ln in report.render_text(report.op_table(few)).splitlines() if ln.lstrip().startswith("operation")][0]
    assert f"vcpu{report.MAX_VCPU_BREAKDOWN - 1}" in head and "busiest" not in head


def test_table_rejects_bad_input(snp_results):
    """No results, or an unknown layout, is a ValueError."""
    with pytest.raises(ValueError, match="no results"):
        report.table([])
    with pytest.raises(ValueError, match="layout 'sideways'"):
        report.table(snp_results, layout="sideways")


def test_phase_and_op_tables(snp_results):
    """A run breaks down by phase and by operation; the operation shares add up."""
    r = snp_results[0]
    phases = report.render_text(report.phase_table(r))
    assert "launch" in phases and "accept" in phases
    ops = report.render_text(report.op_table(r))
    for op in r.by_op:
        assert op in ops
    assert "100%" in ops


def test_percent_keeps_small_fractions_visible():
    """A tiny fragmentation is not rounded to zero."""
    assert report._percent(0) == "0%"
    assert report._percent(1.52587890625e-05) == "0.0015%"
    assert report._percent(0.25) == "25.0%"


def test_render_text_has_no_colour_or_trailing_blanks(snp_results):
    """Plain text: no escape sequences, no trailing spaces."""
    text = report.text_table(snp_results)
    assert "\x1b" not in text
    assert all(ln == ln.rstrip() for ln in text.splitlines())


def test_to_json(snp_results):
    """The report round-trips through JSON with version, extra keys and one entry per result."""
    d = json.loads(json.dumps(report.to_json(snp_results, {"command": ["pkvm", "compare"]})))
    assert list(d) == ["pkvm_version", "command", "results"]
    assert d["pkvm_version"] == snp_results[0].version
    assert [r["row"]["policy"] for r in d["results"]] == list(experiments.PLATFORM_POLICIES["snp"])
    first = d["results"][0]
    assert first["row"]["rmpupdates"] == snp_results[0].counters["rmpupdate"]
    assert first["cost_model"]["fingerprint"] == snp_results[0].cost_fingerprint


def test_to_json_keeps_its_own_keys(snp_results):
    """extra may not replace the version or the results."""
    with pytest.raises(ValueError, match="may not set results"):
        report.to_json(snp_results, {"results": []})


def _kept_figures(monkeypatch):
    """The figures ``Figure.savefig`` saves from now on, in order (they are still written)."""
    from matplotlib.figure import Figure

    figs = []
    real_savefig = Figure.savefig

    def keep(self, *a, **k):
        figs.append(self)
        return real_savefig(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figs


def test_plot_bars(snp_results, tmp_path):
    """The default plot is a PNG of stacked bars."""
    path = tmp_path / "bars.png"
    report.plot(snp_results, str(path))
    assert path.read_bytes().startswith(PNG)


def test_plot_splits_by_actor_and_wraps_long_policy_specs(tmp_path, monkeypatch):
    """The bar plot has a by-actor panel whose stacks are each result's by_actor (the VMM
    against the vCPUs), beside the by-operation panel; a long policy spec is wrapped at its
    ``+`` into short lines, and slanted labels do not overlap their neighbours."""
    cfg = experiments.Config(memory="64M", options={"prealloc": "1"})
    rs = experiments.compare(cfg, ["fault-time", "eager-post+directmap=split-4k", "eager-split+directmap=split-4k"])
    figs = _kept_figures(monkeypatch)
    path = tmp_path / "bars.png"
    report.plot(rs, str(path))
    assert path.read_bytes().startswith(PNG)
    actors, ops = figs[0].axes[:2]
    assert (actors.get_title(), ops.get_title()) == ("by actor", "by operation")
    labels = [t.get_text() for t in actors.get_xticklabels()]
    assert labels == ["fault-time", "eager-post\n+directmap=split-4k", "eager-split\n+directmap=split-4k"]
    # The actor stacks add up to each run's modeled time, VMM first.
    tops = {}
    for bar in actors.patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), bar.get_y() + bar.get_height())
    unit_scale = max(tops.values()) / max(r.modeled_ns for r in rs)
    for i, r in enumerate(rs):
        assert tops[i] == pytest.approx(r.modeled_ns * unit_scale)
    assert actors.get_legend().get_texts()[-1].get_text() == "VMM (ioctls)"
    # No two tick labels overlap once drawn.
    figs[0].canvas.draw()
    boxes = [t.get_window_extent() for t in ops.get_xticklabels()]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def test_plot_folds_many_vcpus_into_one_segment(tmp_path, monkeypatch):
    """Past MAX_VCPU_COLUMNS vCPUs the by-actor panel stacks the VMM and one segment for the
    vCPUs' sum, with a legend of two entries (with 32 vCPUs the legend had 33 and ran off the
    figure over the bars); up to that many, one segment per vCPU."""
    figs = _kept_figures(monkeypatch)
    n = report.MAX_VCPU_COLUMNS + 1
    r = experiments.run(experiments.Config(platform="snp", memory="64M", vcpus=n))
    vc = sum(ns for a, ns in r.by_actor.items() if a.startswith("vcpu"))
    assert report._plot_stack([r]) == [("VMM (ioctls)", [r.by_actor["vmm"]]), (f"{n} vCPUs", [vc])]
    report.plot([r], str(tmp_path / "many.png"))
    names = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert names == [f"{n} vCPUs", "VMM (ioctls)"]
    few = experiments.run(experiments.Config(platform="snp", memory="64M", vcpus=n - 1))
    assert [label for label, _ in report._plot_stack([few])] == ["VMM (ioctls)"] + [f"vcpu{i}" for i in range(n - 1)]


def test_plot_sweep(tmp_path, monkeypatch):
    """The sweep plot is a PNG of the critical path (what the guest sees, the table's first row;
    it plotted the CPU time) against memory, one line per policy, and its title names the
    vCPUs."""
    figs = _kept_figures(monkeypatch)
    rs = experiments.sweep(experiments.Config(vcpus=4), ["16M", "32M", "64M"], ["fault-time", "eager-post"])
    path = tmp_path / "sweep.png"
    report.plot(rs, str(path), sweep=True)
    assert path.read_bytes().startswith(PNG)
    ax = figs[0].axes[0]
    assert ax.get_ylabel() == "critical path (s)" and "4 vCPUs" in ax.get_title()
    for line in ax.get_lines():
        want = [r.critical_path_ns / 1e9 for r in rs if r.policy == line.get_label()]
        assert list(line.get_ydata()) == pytest.approx(want)
    assert all(r.critical_path_ns < r.modeled_ns for r in rs)  # so it is not the CPU time


def test_plot_other_segment(tmp_path, snp_results, monkeypatch):
    """Operations past PLOT_TOP_OPS are drawn as one "other" segment without error."""
    monkeypatch.setattr(report, "PLOT_TOP_OPS", 2)
    path = tmp_path / "few.png"
    report.plot(snp_results, str(path))
    assert path.read_bytes().startswith(PNG)


def test_plot_rejects_no_results(tmp_path):
    """Plotting nothing is a ValueError, and no file is written."""
    with pytest.raises(ValueError, match="no results"):
        report.plot([], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_module_doctests():
    """The examples in pkvm.experiments.report's docstring run."""
    result = doctest.testmod(pkvm.experiments.report)
    assert result.failed == 0 and result.attempted > 0


def test_tables_split_the_columns_that_do_not_fit_and_cut_nothing():
    """On a terminal too narrow for either layout, ``tables`` gives the column layout in as many
    tables as it takes, each within the width, every result once, no cell cut short ("…"):
    ``table`` alone cut numbers and units short and could leave a policy's column out."""
    import io

    from rich.console import Console

    pols = ["6.11", "6.16", "6.19", "eager-locked", "eager-post", "eager-split", "fault-time"]
    rs = experiments.compare(experiments.Config(memory="64M", platform="snp"), pols[3:]) + \
        experiments.compare(experiments.Config(memory="64M", platform="tdx"), pols[1:3])
    for width in (60, 80, 120):
        console = Console(file=io.StringIO(), width=width, color_system=None)
        parts = report.tables(rs, console=console)
        if report.width(report.table(rs, console=console, layout="rows"), console) > width:
            assert all(report.width(t, console) <= width for t in parts), width
        labels = [c.header for t in parts for c in t.columns[1:]]
        assert sorted(labels) == sorted(" ".join(report._label_parts(r, ["platform", "policy"])) for r in rs)
        for t in parts:
            console.print(t)
        assert "…" not in console.file.getvalue()
    wide = Console(file=io.StringIO(), width=1000)
    assert len(report.tables(rs, console=wide)) == 1


def test_breakdowns_fold_when_a_column_each_does_not_fit(monkeypatch):
    """``pkvm run`` on a narrow terminal folds the vCPUs of its phase and operation tables
    into their sum and the busiest one (``fold=True``), and prints what is still too wide
    whole, for the terminal to wrap, rather than cut."""
    import io

    from rich.console import Console

    from pkvm.cli import _Output

    r = experiments.run(experiments.Config(platform="snp", memory="64M", vcpus=3))
    out = _Output(io.StringIO())
    out.console = Console(file=io.StringIO(), width=70, color_system=None)
    t = out.breakdown(report.op_table, r)
    assert [c.header for c in t.columns][3:] == ["vmm", "3 vCPUs", "busiest vCPU"]
    out.console = Console(file=io.StringIO(), width=400, color_system=None)
    assert "vcpu2" in [c.header for c in out.breakdown(report.op_table, r).columns]
    out.console = Console(file=io.StringIO(), width=30, color_system=None)
    out.print(report.op_table(r))
    assert "…" not in out.console.file.getvalue()


def _fixed_wall(results):
    """``results`` with a fixed wall time: the only figure that varies between runs, and one
    that changes a table's width."""
    import dataclasses

    return [dataclasses.replace(r, wall_s=0.001) for r in results]


def test_sweep_tables_use_one_layout_for_every_size():
    """A sweep's tables share one layout on a terminal: rows only if every size's rows fit,
    else columns for all, and one split of the columns for all when some size needs one.
    Before ``sweep_tables``, each size picked its own (``pkvm compare --sweep-memory
    64M,1G,8G`` on a 258-column terminal: 64M and 1G in rows, 8G in columns)."""
    import io

    from rich.console import Console

    small = _fixed_wall(experiments.compare(experiments.Config(memory="64M")))
    large = _fixed_wall(experiments.compare(experiments.Config(memory="8G")))
    probe = Console(file=io.StringIO(), width=1000)
    w_small, w_large = (report.width(report.table(b, layout="rows"), probe) for b in (small, large))
    assert w_small < w_large  # the larger size's counts are wider
    console = Console(file=io.StringIO(), width=w_small)
    # each on its own: the small size in rows, the large one in columns
    assert [len(t.columns) for t in report.tables(small, console=console)] != \
        [len(t.columns) for t in report.tables(large, console=console)]
    both = report.sweep_tables([small, large], console=console)
    assert [[len(t.columns) for t in ts] for ts in both] == [[1 + len(small)], [1 + len(large)]]  # columns
    wide = Console(file=io.StringIO(), width=w_large)
    assert all(len(ts) == 1 and ts[0].columns[0].header == "policy"
               for ts in report.sweep_tables([small, large], console=wide))  # rows
    for width in (40, 60):  # neither layout fits: the same split for every size, each within the width
        narrow = Console(file=io.StringIO(), width=width)
        split = report.sweep_tables([small, large], console=narrow)
        assert [len(t.columns) for t in split[0]] == [len(t.columns) for t in split[1]]
        assert len(split[0]) > 1
        assert all(report.width(t, narrow) <= width for ts in split for t in ts)
    # an explicit layout, or no console, as before
    assert [[len(t.columns) for t in ts] for ts in report.sweep_tables([small, large], layout="rows")] == \
        [[len(t.columns) for t in report.tables(small)], [len(t.columns) for t in report.tables(large)]]


def test_compare_sweep_memory_on_a_terminal_prints_one_layout(monkeypatch, capsys):
    """``pkvm compare --sweep-memory`` on a terminal as wide as the smaller size's rows prints
    every size in columns, not the smaller one in rows and the larger in columns."""
    import io

    from rich.console import Console

    from pkvm import cli

    class Tty(io.StringIO):
        def isatty(self):
            return True

    probe = Tty()
    monkeypatch.setattr(experiments, "compare", _wrap_fixed_wall(experiments.compare))
    small = experiments.compare(experiments.Config(memory="64M"))
    width = report.width(report.table(small, layout="rows"), Console(file=io.StringIO(), width=1000))
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setattr("sys.stdout", probe)
    assert cli.main(["compare", "--sweep-memory", "64M,8G", "--quiet"]) == 0
    text = probe.getvalue()
    assert text.count("critical path") == 2  # a row label of the column layout, once per size
    assert " policy " not in text  # no size in rows


def _wrap_fixed_wall(compare):
    def fixed(*args, **kwargs):
        return _fixed_wall(compare(*args, **kwargs))
    return fixed


def test_idle_vcpus_count_in_the_tables_and_the_plot():
    """A small guest leaves vCPUs idle (16 MiB with 16 vCPUs: 7 of them work; 8 MiB with 6:
    3). The tables counted only the vCPUs ``by_actor`` charged: the comparison table said
    "CPU time 7 vCPUs" under a header of 16 vCPUs, showed 6 vCPUs' run as three columns, and
    the plot's legend said "7 vCPUs"; the run's breakdowns left the idle vCPUs out. They count
    the VM's vCPUs (``pkvm compare --memory 16M --vcpus 16 --layout columns``)."""
    many = experiments.compare(experiments.Config(memory="16M", vcpus=16), ["fault-time"])
    assert len([a for a in many[0].by_actor if a.startswith("vcpu")]) < 16  # some are idle
    text = report.text_table(many, layout="columns")
    assert "CPU time 16 vCPUs" in text
    assert ("16 vCPUs", [sum(ns for a, ns in many[0].by_actor.items() if a.startswith("vcpu"))]) in \
        report._plot_stack(many)
    few = experiments.run(experiments.Config(memory="8M", vcpus=6))
    assert len([a for a in few.by_actor if a.startswith("vcpu")]) < 6
    text = report.text_table([few], layout="columns")
    assert "CPU time 6 vCPUs" in text and "CPU time vcpu0" not in text  # past four: folded
    for make in (report.phase_table, report.op_table):
        heads = [c.header for c in make(few).columns]
        assert [h for h in heads if h.startswith("vcpu")] == [f"vcpu{i}" for i in range(6)]
    three = experiments.run(experiments.Config(memory="8M", vcpus=3))
    lines = report.text_table([three], layout="columns").splitlines()
    assert [ln.split()[2] for ln in lines if ln.startswith(" CPU time vcpu")] == ["vcpu0", "vcpu1", "vcpu2"]


def test_a_terminal_sweep_that_fails_later_still_shows_what_ran(monkeypatch, capsys):
    """The sweep's tables wait for its last size on a terminal; a size that fails (or a
    Ctrl-C) after others ran still shows theirs, as the size-by-size printing did."""
    import io

    from pkvm import cli
    from pkvm.errors import KvmError

    class Tty(io.StringIO):
        def isatty(self):
            return True

    compare = experiments.compare
    calls = []

    def failing(config, *args, **kwargs):
        calls.append(config.memory)
        if len(calls) == 2:
            raise KvmError(5, "simulated failure")
        return compare(config, *args, **kwargs)

    probe = Tty()
    monkeypatch.setattr(experiments, "compare", failing)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr("sys.stdout", probe)
    assert cli.main(["compare", "--sweep-memory", "16M,32M", "--policies", "fault-time", "--quiet"]) == 1
    text = probe.getvalue()
    assert "16M RAM" in text and "32M RAM" not in text and "critical path" in text
    assert "simulated failure" in capsys.readouterr().err


# ---- what mutation testing found unchecked (2026-12-07) -----------------------------------------


def test_cell_formats_at_their_boundaries():
    """A rate reaches a prefix at exactly its scale; a value of a column pkvm does not know
    yet keeps separators for ints only, 4 digits for floats, and a bool as a word."""
    assert (report._rate(1e6), report._rate(999.0), report._rate(86.6e6), report._rate(1e9)) == \
        ("1 M", "999", "86.6 M", "1 G")
    assert report._number(1234567) == "1,234,567"
    assert report._number(12345.678) == "1.235e+04"
    assert (report._number(True), report._number("x")) == ("True", "x")


def test_actor_order_is_vmm_then_vcpus_numerically():
    """vcpu10 comes after vcpu2, anything else after the vCPUs."""
    actors = ["other", "vcpu10", "vcpu2", "vmm", "vcpu0"]
    assert sorted(actors, key=report._actor_order) == ["vmm", "vcpu0", "vcpu2", "vcpu10", "other"]


def _fake(by_actor):
    from types import SimpleNamespace
    vcpus = sum(1 for a in by_actor if a.startswith("vcpu"))
    return SimpleNamespace(by_actor=by_actor, config=SimpleNamespace(vcpus=vcpus))


def test_table_columns_per_vcpu_up_to_the_limit_then_sum_and_busiest():
    """Up to MAX_VCPU_COLUMNS vCPUs, a CPU-time column each; one more, their sum and the
    busiest one's; the timeline's figures end the first section."""
    n = report.MAX_VCPU_COLUMNS
    row = {"critical_path_ns": 1, "vcpu_stall_ns": 2, "fault_p99_ns": 3, "faults": 4, "modeled_ns": 10}
    few = _fake({"vmm": 1, **{f"vcpu{i}": 10 * (i + 1) for i in range(n)}})
    cols = report._columns([few], [row])
    keys = [c.key for c in cols]
    assert [f"modeled_ns_vcpu{i}" for i in range(n)] == [k for k in keys if k.startswith("modeled_ns_vcpu")]
    assert [c.key for c in cols if c.section_end][:1] == ["fault_p99_ns"]
    many = _fake({"vmm": 1, **{f"vcpu{i}": 10 * (i + 1) for i in range(n + 1)}})
    cols = {c.key: c for c in report._columns([many], [row])}
    assert "modeled_ns_vcpu0" not in cols
    assert cols["modeled_ns_vcpus"].cell(many, row) == format_ns(sum(10 * (i + 1) for i in range(n + 1)))
    assert cols["modeled_ns_vcpu_max"].cell(many, row) == format_ns(10 * (n + 1))


def test_breakdown_folds_only_past_its_limit():
    """``_breakdown`` keeps a column per vCPU up to ``limit`` of them, and folds one more."""
    n = report.MAX_VCPU_BREAKDOWN
    actors = ["vmm", *(f"vcpu{i}" for i in range(n))]
    assert report._breakdown(actors) == (actors, actors)
    assert report._breakdown([*actors, f"vcpu{n}"])[1] == ["vmm", f"{n + 1} vCPUs", "busiest vCPU"]


def test_breakdown_tables_fold_and_order(snp_results):
    """``fold=True`` folds the phase table past one vCPU; the operation table lists the
    operations largest first, each with its share to one decimal."""
    r = experiments.run(experiments.Config(platform="snp", memory="64M", vcpus=2))
    assert "2 vCPUs" in report.render_text(report.phase_table(r, fold=True))
    assert "2 vCPUs" not in report.render_text(report.phase_table(r))
    r = snp_results[0]
    lines = report.render_text(report.op_table(r)).splitlines()
    ranked = sorted(r.by_op.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [ln.split()[0] for ln in lines if ln.split() and ln.split()[0] in r.by_op]
    assert rows == [op for op, _ in ranked]
    op, ns = ranked[0]
    share = f"{100.0 * ns / r.modeled_ns:.1f}%"
    assert any(ln.split()[0] == op and share in ln.split() for ln in lines if ln.split())


def test_to_json_keeps_its_version(snp_results):
    """extra may not replace the version either."""
    with pytest.raises(ValueError, match="may not set pkvm_version"):
        report.to_json(snp_results, {"pkvm_version": "0"})


def test_plot_stacks_the_top_operations_and_the_rest_as_other(tmp_path, snp_results, monkeypatch):
    """With PLOT_TOP_OPS = 2, the operation panel's legend has the 2 largest operations and
    "other", read top-down like the stack (the largest at its bottom), then the critical path."""
    monkeypatch.setattr(report, "PLOT_TOP_OPS", 2)
    figs = _kept_figures(monkeypatch)
    report.plot(snp_results, str(tmp_path / "p.png"))
    totals: dict[str, int] = {}
    for r in snp_results:
        for op, ns in r.by_op.items():
            totals[op] = totals.get(op, 0) + ns
    top = [op for op, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))][:2]
    ops_ax = figs[0].axes[1]
    names = [t.get_text() for t in ops_ax.get_legend().get_texts()]
    assert names == ["other", top[1], top[0], "critical path"]


def test_plot_labels_the_critical_path_only_where_it_differs_from_the_total(tmp_path, snp_results, monkeypatch):
    """With one vCPU the critical path is the CPU time, which the total above each bar
    already says: the operation panel has one time label per bar, and with two vCPUs (a
    critical path below the total) a second one for the diamond."""
    figs = _kept_figures(monkeypatch)
    report.plot(snp_results, str(tmp_path / "one.png"))
    assert all(r.critical_path_ns == r.modeled_ns for r in snp_results)
    assert len(figs[0].axes[1].texts) == len(snp_results)
    two = [experiments.run(experiments.Config(platform="snp", memory="64M", vcpus=2))]
    assert two[0].critical_path_ns != two[0].modeled_ns
    report.plot(two, str(tmp_path / "two.png"))
    assert [t.get_text() for t in figs[1].axes[1].texts] == [format_ns(two[0].modeled_ns),
                                                              format_ns(two[0].critical_path_ns)]
