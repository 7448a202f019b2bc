"""Global sensitivity analysis (pkvm.experiments.uncertainty): re-pricing equals re-simulation, the Sobol'
machinery recovers known indices, sampling follows the stated rules, bad input is refused."""

import functools
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm import experiments as E
from pkvm.experiments import uncertainty as U
from pkvm.cost.model import CostModel
from pkvm.experiments.frames import write_frame

CONFIGS = {
    "snp": [E.Config(platform="snp", memory="32M", policy=p) for p in E.PLATFORM_POLICIES["snp"]],
    "tdx": [E.Config(platform="tdx", memory="32M", policy=p) for p in E.PLATFORM_POLICIES["tdx"]],
    "sw": [E.Config(platform="sw_protected", memory="32M", workload="swiotlb", options={"ops": "40"},
                    policy="6.19")],
}


@functools.lru_cache(maxsize=None)
def _case(platform, which, vcpus, seed):
    """The config and its counting run (cached: Hypothesis draws the same cases often)."""
    cfgs = CONFIGS[platform]
    cfg = cfgs[which % len(cfgs)].with_(vcpus=vcpus)
    return cfg, E.count_run(cfg, seed)


@settings(max_examples=25)
@given(platform=st.sampled_from(sorted(CONFIGS)), which=st.integers(0, 3), vcpus=st.just(1),
       seed=st.integers(0, 2), data=st.data())
def test_repricing_equals_resimulation(platform, which, vcpus, seed, data):
    """One vCPU: nothing interleaves, the counts do not depend on the prices. (Several concurrent
    vCPUs interleave by the prices, and the analysis simulates every sample then: see
    test_concurrent_vcpus_are_simulated_per_sample.)"""
    """For random prices within (and beyond) their ranges, every summed metric re-priced from
    the counting run equals the one a full simulation at those prices measures, to the ns."""
    cfg, ledger = _case(platform, which, vcpus, seed)
    model = cfg.cost_model()
    prices = U.price_space(model, ledger.ops())
    values = np.array([[data.draw(st.floats(p.low * 0.5, p.high * 2, allow_nan=False), label=p.name)
                        for p in prices]])
    sim = E.run(cfg.with_(costs=U.overrides(prices, values[0])), seed).metrics(wall=False)
    names = sorted(m for m in sim if U.is_repriceable(m))
    got = U.reprice(model, ledger, prices, values, names)[0]
    assert dict(zip(names, got.tolist())) == {m: sim[m] for m in names}
    assert ledger.exact


def test_count_run_counts_events():
    cfg = CONFIGS["snp"][0]
    ledger = E.count_run(cfg, 0)
    r = E.run(cfg, 0)
    rmp = sum(c for (_, op), c in ledger.counts.items() if op == "rmpupdate")
    assert rmp == r.counters["rmpupdate"] > 0
    assert ledger.n == {"remote_tlb_flush": 1, "directmap_tlb_flush": 64}


def test_the_counting_run_does_what_the_simulated_run_does_at_64g_mixed():
    """``mixed`` at 64 GiB: without the timeline the counting run did one 2M balloon round trip
    more than the simulated run (the VMM's loop goes on once the vCPU took a task), so its
    study simulated every sample. The counting run now runs on the timeline too, and re-pricing
    its counts at the model's prices gives the simulated run's breakdown, cell by cell."""
    cfg = E.Config(platform="snp", memory="64G", workload="mixed", policy="fault-time")
    ledger = E.count_run(cfg, 0)
    r = E.run(cfg, 0)
    assert ledger.exact and U._reprices_nominal(cfg.cost_model(), ledger, r)
    assert sum(c for (_, op), c in ledger.counts.items() if op == "rmpupdate") == r.counters["rmpupdate"]


def _ishigami(x):
    a, b = 7.0, 0.1
    return np.sin(x[:, 0]) + a * np.sin(x[:, 1]) ** 2 + b * x[:, 2] ** 4 * np.sin(x[:, 0])


def test_sobol_recovers_the_ishigami_indices():
    """The Ishigami function's analytic indices: S1 = (0.314, 0.442, 0), ST = (0.558, 0.442, 0.244)."""
    groups = ["x1", "x2", "x3"]
    unit = U._sample("sobol", groups, 4096, seed=3)
    y = _ishigami(-math.pi + 2 * math.pi * unit)
    idx = U._indices("sobol", groups, unit, {"f": y}, seed=3, conf_level=0.95).set_index("price")
    assert idx["S1"].to_numpy() == pytest.approx([0.3139, 0.4424, 0.0], abs=0.04)
    assert idx["ST"].to_numpy() == pytest.approx([0.5576, 0.4424, 0.2437], abs=0.04)


def test_sensitivity_of_the_summed_model_matches_its_analytic_indices():
    """fault-time's modeled_ns is linear in independent uniform group quantiles, so group g's
    first-order and total index are both var_g / sum(var), var_g = (sum of count x width)^2 / 12."""
    cfg = CONFIGS["snp"][0]
    res = E.sensitivity(cfg, ["fault-time"], samples=2048, seed=5, dist="uniform", metric="modeled_ns")
    assert res.evaluation == "re-priced"
    ledger = E.count_run(cfg, 5)
    counts: dict = {}
    for (_, op), c in ledger.counts.items():
        counts[op] = counts.get(op, 0) + c
    var = {}
    for p in res.prices:
        width = (p.high - p.low) * (ledger.n.get(p.op, 0) if p.part == "slope" else 1)
        var[p.group] = var.get(p.group, 0.0) + counts.get(p.op, 0) * width
    total = sum(v * v for v in var.values())
    want = {g: v * v / total for g, v in var.items()}
    idx = res.indices.set_index("price")
    for g, w in want.items():
        assert idx.loc[g, "S1"] == pytest.approx(w, abs=0.05), g
        assert idx.loc[g, "ST"] == pytest.approx(w, abs=0.05), g
    summary = res.summary().iloc[0]
    mean_prices = {p.name: (p.low + p.high) / 2 for p in res.prices}
    expected_mean = U.reprice(cfg.cost_model(), ledger, res.prices, np.array([[mean_prices[p.name] for p in res.prices]]),
                              ["modeled_ns"])[0, 0]
    assert summary["mean"] == pytest.approx(expected_mean, rel=0.01)


def test_ranking_and_summary_are_consistent():
    res = E.sensitivity(CONFIGS["snp"][0], ["fault-time", "eager-post", "eager-split"], samples=64, seed=1,
                        metric="modeled_ns")
    rk = res.ranking().set_index(["a", "b"])
    for a, b in [("fault-time", "eager-post"), ("eager-post", "eager-split")]:
        total = rk.loc[(a, b), "a_beats_b"] + rk.loc[(b, a), "a_beats_b"] + rk.loc[(a, b), "tie"]
        assert total == pytest.approx(1.0)
    ya, yb = res.y["fault-time"], res.y["eager-post"]
    assert rk.loc[("fault-time", "eager-post"), "a_beats_b"] == np.mean(ya < yb)
    # the two eager designs charge the same operations: they tie on every sample
    assert rk.loc[("eager-post", "eager-split"), "tie"] == 1.0
    assert any("constant over every sample" in n for n in res.notes)
    frame = res.to_frame()
    assert len(frame) == 3 * len(res.values)
    assert {"policy", "seed", "sample", "evaluation", "modeled_ns", "price.rmpupdate"} <= set(frame.columns)


def test_a_metric_that_is_not_a_sum_is_simulated_per_sample():
    cfg = E.Config(memory="16M", policy="eager-locked")
    res = E.sensitivity(cfg, ["eager-locked", "eager-post"], metric="counters.mmu_lock_held_ns", samples=2,
                        seed=0, vary=["rmpupdate", "attr_store"], keep_metrics=True)
    assert res.evaluation == "simulated"
    assert any("not a sum of counts times prices" in n for n in res.notes)
    u = res.values[3]
    direct = E.run(cfg.with_(costs=U.overrides(res.prices, u)), 0).counters["mmu_lock_held_ns"]
    assert res.y["eager-locked"][3] == direct
    assert res.extra_metrics["eager-locked"]["modeled_ns"].shape == (len(res.values),)
    with pytest.raises(ValueError, match="cannot be re-priced exactly"):
        E.sensitivity(cfg, ["eager-locked"], metric="counters.mmu_lock_held_ns", samples=2,
                      evaluation="reprice", vary=["rmpupdate"])


def test_simulated_samples_ship_back_only_the_metric_unless_all_are_kept():
    """A simulated sample returned every metric of its run (264 for a small mixed boot, 9 KB
    pickled), shipped from the worker and held in the client for every sample, when the
    analysis reads one of them: 20,000 samples held half a GB. Now only the metric comes back,
    unless ``keep_metrics`` (``--out``) asks for every one."""
    from pkvm.experiments.execution import Runner

    class Recording(Runner):
        def map(self, fn, tasks, labels, progress=None, **kwargs):
            out = super().map(fn, tasks, labels, progress, **kwargs)
            shipped.extend(r for r in out if isinstance(r, dict))
            return out

    cfg = E.Config(memory="16M")
    for keep in (False, True):
        shipped: list = []
        res = E.sensitivity(cfg, ["fault-time"], metric="counters.mmu_lock_held_ns", samples=2, seed=0,
                            vary=["rmpupdate"], keep_metrics=keep, runner=Recording())
        assert len(shipped) == len(res.values) == 6
        if keep:
            assert all(len(r) > 100 for r in shipped) and "modeled_ns" in res.extra_metrics["fault-time"]
        else:
            assert all(set(r) == {"counters.mmu_lock_held_ns"} for r in shipped) and not res.extra_metrics
            assert list(res.y["fault-time"]) == [r["counters.mmu_lock_held_ns"] for r in shipped]


def test_morris_screen_ranks_the_dominant_price_first():
    res = E.sensitivity(CONFIGS["snp"][1], ["eager-post"], method="morris", samples=20, seed=2)
    idx = res.indices.sort_values("mu_star", ascending=False)
    # a 32M boot: the 512 image pages of SNP_LAUNCH_UPDATE at 3-50 µs each move the total by up
    # to 24 ms, more than any other price's count times its range (npf_fault's 7,680 faults at
    # 1-3 µs: 15 ms), so its elementary effects are the largest
    assert idx.iloc[0]["price"] == "psp_launch_update"
    assert idx.iloc[1]["price"] == "npf_fault"
    assert len(res.values) == 20 * (len(res.groups) + 1)


def test_price_space_rules():
    model = CostModel.default("snp")
    ps = {p.name: p for p in U.price_space(model, ["directmap_tlb_flush", "pvalidate_4k", "pvalidate_2m",
                                                   "rmpupdate", "sleep_in_atomic"])}
    # high/low = 20 > 10: log-uniform; 10: uniform
    assert ps["directmap_tlb_flush"].dist == "log-uniform" and ps["rmpupdate"].dist == "uniform"
    assert ps["pvalidate_4k"].dist == "uniform"
    # parts of one source row, and base and slope of one formula, move together
    assert ps["pvalidate_4k"].group == ps["pvalidate_2m"].group == "pvalidate_4k+pvalidate_2m"
    assert ps["directmap_tlb_flush.slope"].group == "directmap_tlb_flush"
    assert "sleep_in_atomic" not in ps  # a single value: nothing to vary
    u = np.array([[0.0, 0.5, 1.0]]).T
    vals = U.expand([ps["pvalidate_4k"], ps["pvalidate_2m"]], u)
    assert vals.tolist() == [[100.0, 500.0], [550.0, 1750.0], [1000.0, 3000.0]]
    logp = ps["directmap_tlb_flush"]
    assert logp.at(np.array([0.5]))[0] == pytest.approx(math.sqrt(5_000 * 100_000))
    pinned = U.price_space(model, ["rmpupdate"], ranges={"rmpupdate": "800ns..800ns"}, dist="log-uniform")
    assert [(p.name, p.low, p.high, p.dist) for p in pinned] == [("rmpupdate", 800.0, 800.0, "uniform")]
    assert U.expand(pinned, np.array([[0.0], [0.7]])).tolist() == [[800.0], [800.0]]
    narrowed = U.price_space(model, ["rmpupdate"], ranges={"rmpupdate": "300ns..3us"}, dist="log-uniform")
    assert (narrowed[0].low, narrowed[0].high, narrowed[0].dist) == (300.0, 3000.0, "log-uniform")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ranges": {"rmpupdate": "2us..200ns"}}, r"range rmpupdate=2 µs..200 ns: low is above high"),
    ({"ranges": {"rmpupdat": "1..2"}}, r"unknown cost operation 'rmpupdat'.*did you mean rmpupdate"),
    ({"ranges": {"rmpupdate": "200ns"}}, r"is not LOW..HIGH"),
    ({"ranges": {"rmpupdate.slope": "1..2"}}, r"rmpupdate has no slope"),
    ({"vary": ["psmash.value"]}, r"use psmash or psmash.slope"),
    ({"ranges": {"rmpupdate": "0..2us"}, "dist": "log-uniform"}, r"log-uniform range cannot start at 0 ns"),
    ({"dist": "normal"}, r"dist 'normal' is not one of auto, uniform, log-uniform"),
])
def test_price_space_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        U.price_space(CostModel.default("snp"), ["rmpupdate"], **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"samples": 0}, "samples 0 must be a positive int"),
    ({"method": "fast"}, "method 'fast' is not one of sobol, morris"),
    ({"method": "morris", "samples": 1}, "samples 1 must be a positive int >= 2 for morris"),
    ({"samples": 10**14}, "samples 100000000000000 is more than 1,048,576"),  # MemoryError after the runs
    ({"metric": "modeled_nss"}, "metric 'modeled_nss' is not a name runs measure: .*; did you mean modeled_ns"),
    ({"evaluation": "guess"}, "evaluation 'guess' is not auto, reprice or simulate"),
    ({"ranges": {"psmash": "5..1"}}, "low is above high"),
])
def test_sensitivity_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        E.sensitivity(CONFIGS["snp"][0], ["fault-time"], **kwargs)


def test_metrics_flatten_every_numeric_field():
    r = E.run(CONFIGS["snp"][0], 0)
    m = r.metrics()
    assert m["modeled_ns"] == r.modeled_ns
    assert m["by_actor.vcpu0"] == r.by_actor["vcpu0"]
    assert m["by_actor_op.vcpu0.npf_fault"] == r.by_actor_op["vcpu0"]["npf_fault"]
    assert m["counters.rmpupdate"] == r.counters["rmpupdate"]
    assert m["phases.accept.modeled_ns"] == next(p.modeled_ns for p in r.phases if p.name == "accept")
    assert "wall_s" in m and "wall_s" not in r.metrics(wall=False)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())


def test_metrics_of_a_recurring_phase_are_its_sum():
    """``balloon`` records ``inflate`` and ``deflate`` once per cycle: their metrics are the
    sums over the cycles, so the phases' metrics add up to the run's (the last cycle's
    overwrote the others: 149.0 ms of 190.9 ms at 128 MiB)."""
    r = E.run(E.Config(platform="snp", memory="128M", workload="balloon"), 0)
    m = r.metrics(wall=False)
    names = [p.name for p in r.phases]
    assert names.count("inflate") == names.count("deflate") == 2
    for name in set(names):
        same = [p for p in r.phases if p.name == name]
        assert m[f"phases.{name}.modeled_ns"] == sum(p.modeled_ns for p in same)
        assert m[f"phases.{name}.elapsed_ns"] == sum(p.elapsed_ns for p in same)
        for k in {k for p in same for k in p.counters}:
            assert m[f"phases.{name}.counters.{k}"] == sum(p.counters.get(k, 0) for p in same)
    phase_names = set(names)
    assert sum(m[f"phases.{n}.modeled_ns"] for n in phase_names) == r.modeled_ns
    assert sum(m[f"phases.{n}.elapsed_ns"] for n in phase_names) == r.critical_path_ns


def test_write_frame_is_atomic(tmp_path):
    path = tmp_path / "t.parquet"
    write_frame(pd.DataFrame({"a": [1, 2]}), str(path))
    assert pd.read_parquet(path)["a"].tolist() == [1, 2]
    bad = pd.DataFrame({"a": [object(), object()]})  # pyarrow cannot store arbitrary objects
    with pytest.raises(Exception, match="object"):
        write_frame(bad, str(path))
    assert pd.read_parquet(path)["a"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]
    with pytest.raises(ValueError, match=r"--out .*t.txt: write .parquet or .csv, not .txt"):
        write_frame(pd.DataFrame({"a": [1]}), str(tmp_path / "t.txt"))


def test_config_columns_are_what_ran():
    """A tidy row's configuration is what ran: the batch size chosen for ``batch_pages=None``
    (512 pages for 16M with 2 vCPUs), the memory also as text, and no output paths."""
    from pkvm.experiments.frames import config_columns

    cols = config_columns(E.Config(memory="16M", vcpus=2, timeline="t.json"))
    assert (cols["batch_pages"], cols["memory"], cols["memory_text"]) == (512, 16 << 20, "16M")
    assert "timeline" not in cols and "gantt" not in cols


def test_results_frame_fills_a_metric_a_run_lacks_with_an_int_zero():
    """A metric some run lacks is 0 there, and a column of int ns stays int64, dotted or not."""
    from types import SimpleNamespace

    from pkvm.experiments.frames import results_frame

    cfg = E.Config(memory="16M")

    def fake(metrics):
        return SimpleNamespace(config=cfg, seed=1, cost_fingerprint="f", version="v", metrics=lambda: metrics)

    frame = results_frame([fake({"modeled_ns": 5, "spin_ns": 3, "by_actor.vcpu1": 7}), fake({"modeled_ns": 6})])
    assert frame["spin_ns"].tolist() == [3, 0] and str(frame["spin_ns"].dtype) == "int64"
    assert frame["by_actor.vcpu1"].tolist() == [7, 0] and str(frame["by_actor.vcpu1"].dtype) == "int64"


def test_check_frame_path_takes_the_extension_in_any_case_and_refuses_a_directory(tmp_path):
    """``.CSV`` is a CSV; a directory is not a file to write."""
    from pkvm.experiments.frames import check_frame_path

    check_frame_path(str(tmp_path / "T.CSV"))
    check_frame_path(str(tmp_path / "t.Parquet"))
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(ValueError, match=r"d.csv: it is a directory"):
        check_frame_path(str(tmp_path / "d.csv"))


def test_is_time_metric():
    """Times in ns (breakdowns, latency percentiles) are times; a latency count is not."""
    from pkvm.experiments.frames import is_time_metric

    assert all(is_time_metric(m) for m in ("modeled_ns", "by_actor.vcpu0", "by_op.npf_fault",
                                           "by_actor_op.vcpu0.npf_fault", "latency_ns.fault.p99"))
    assert not any(is_time_metric(m) for m in ("latency_ns.fault.count", "counters.rmpupdate"))


def test_plot_grid_facets_only_keys_that_vary(tmp_path, monkeypatch):
    """A grid key with one value is no facet: one panel, titled by the metric."""
    from matplotlib.figure import Figure

    from pkvm.experiments.frames import plot_grid

    figs = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self) or real(self, *a, **k))
    frame = pd.DataFrame({"memory": [1 << 24, 1 << 25, 1 << 24, 1 << 25], "vcpus": [1, 1, 1, 1],
                          "policy": ["a", "a", "b", "b"], "modeled_ns": [1_000, 2_000, 1_500, 3_000]})
    plot_grid(frame, ["vcpus", "memory"], "modeled_ns", str(tmp_path / "g.png"))
    (ax,) = [a for a in figs[0].axes if a.get_visible()]
    assert ax.get_title() == "modeled_ns" and ax.get_xlabel() == "memory"


def test_concurrent_vcpus_are_simulated_per_sample():
    """With several vCPUs the interleaving, and so the work, can depend on the prices: the summed
    metric is simulated per sample, and the analysis says why."""
    r = E.sensitivity(E.Config(platform="sw_protected", memory="16M", vcpus=2), ["6.16", "6.19"],
                      metric="modeled_ns", samples=4)
    assert r.evaluation == "simulated"
    assert any("2 concurrent vCPUs" in n for n in r.notes)


def test_to_frame_has_0_for_a_metric_a_policy_never_counted():
    """A metric one policy's runs have and another's lack (``directmap_unmaps``: the eager
    designs' direct map) is 0 in the other's rows of ``to_frame``, not NaN, which pandas' means
    skip (``pkvm sensitivity --out``), as in ``pkvm.experiments.to_frame``."""
    res = E.sensitivity(E.Config(platform="snp", memory="16M"), ["fault-time", "eager-post"], method="morris",
                        samples=4, metric="critical_path_ns", seed=0, keep_metrics=True, evaluation="simulate")
    frame = res.to_frame()
    col = "phases.launch.counters.directmap_unmaps"
    assert col in frame.columns
    metrics = [c for c in frame.columns if "." in c and not c.startswith("price.")]
    assert not frame[metrics].isna().any().any()
    by = frame.groupby("policy")[col]
    assert by.min()["fault-time"] == by.max()["fault-time"] == 0 and by.min()["eager-post"] > 0


def test_metric_names_are_checked_before_anything_runs():
    """``metric_name`` resolves the table's names (``fault_p99_ns``) and refuses a name no run
    measures before the runs (a typo failed only after every run of a sweep); every metric a
    run reports passes it, and its families are the result's fields; the table's vCPU stall is
    a metric (``vcpu_stall_ns``)."""
    import dataclasses

    assert E.metric_name("fault_p99_ns") == "latency_ns.fault.p99"
    assert E.metric_name("vcpu_stall_ns") == "vcpu_stall_ns"
    r = E.run(E.Config(platform="snp", memory="16M", vcpus=2), 0)
    m = r.metrics()
    assert m["vcpu_stall_ns"] == r.vcpu_stall_ns
    assert all(E.metric_name(k) == k for k in m)
    fields = {f.name for f in dataclasses.fields(E.Result)} - E._NOT_METRICS
    assert fields <= set(E._SCALAR_METRICS) | set(E._METRIC_FAMILIES)
    for bad in ("foo.bar", "counters", "modeled_ns.x", "counters.", "", "config.memory"):
        with pytest.raises(ValueError, match="not a name runs measure"):
            E.metric_name(bad)
    for col in ("seed", "vcpus", "policy", "memory"):
        with pytest.raises(ValueError, match="a column of the configuration"):
            E.metric_name(col)
    with pytest.raises(U.UnknownMetricError, match="not a name runs measure"):
        E.sensitivity(E.Config(memory="16M"), ["fault-time"], metric="nope", samples=2,
                      jobs=1)


def test_sweep_refuses_an_unknown_metric_before_the_runs(capsys, monkeypatch):
    from pkvm.cli import main

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.setattr(E, "_build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    assert main(["sweep", "--grid", "vcpus=1,3", "--memory", "16M", "--metric", "foo.bar", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pkvm: error: --metric foo.bar: not a name runs measure: one of modeled_ns") and \
        err.count("\n") == 1
