"""pytest-benchmark suite: pkvm.RangeMap against its peers on 1 TiB-guest workloads.

Workloads, implementations and result checks are defined in ``rangemap_workloads.py`` (shared
with ``report.py``).  Each benchmark runs 5 rounds of one call, each round on fresh state from
an untimed setup, and then checks the last round's result against a model, so a fast wrong
answer fails.  ``sorted`` runs fewer operations than the others; compare implementations by the
``ns_per_op`` entry of ``extra_info`` (in ``--benchmark-json`` / ``--benchmark-autosave``
output) or with ``python bench/report.py``, which prints ns/op directly.
"""

import gc

import pytest
import rangemap_workloads as wl

ROUNDS = 5


def run_case(benchmark, data, workload, impl):
    """Benchmark one case, check its result and record its per-op cost."""
    case = wl.make_case(data, workload, impl)
    gc.collect()
    result = benchmark.pedantic(
        case.run, setup=lambda: (case.setup(), {}), rounds=ROUNDS, iterations=1
    )
    case.check(result)
    benchmark.extra_info.update(workload=workload, impl=impl, ops=case.ops)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ns_per_op"] = round(benchmark.stats.stats.median / case.ops * 1e9, 1)


@pytest.mark.benchmark(group="W1")
@pytest.mark.parametrize("impl", wl.IMPLS["W1"])
def test_w1_boot(benchmark, workload_data, impl):
    """W1: 2**19 in-order 512-key assigns that coalesce into one run."""
    run_case(benchmark, workload_data, "W1", impl)


@pytest.mark.benchmark(group="W2-toggle")
@pytest.mark.parametrize("impl", wl.IMPLS["W2-toggle"])
def test_w2_toggle(benchmark, workload_data, impl):
    """W2: 1,000,000 single-key toggles at uniform random keys, from an empty map."""
    run_case(benchmark, workload_data, "W2-toggle", impl)


@pytest.mark.benchmark(group="W2-lookup")
@pytest.mark.parametrize("impl", wl.IMPLS["W2-lookup"])
def test_w2_lookup(benchmark, workload_data, impl):
    """W2: 1,000,000 point lookups at uniform random keys in the post-toggle state."""
    run_case(benchmark, workload_data, "W2-lookup", impl)


@pytest.mark.benchmark(group="W3")
@pytest.mark.parametrize("impl", wl.IMPLS["W3"])
def test_w3_mixed(benchmark, workload_data, impl):
    """W3: 200,000 rounds of a random-length range assign and a uniformity query."""
    run_case(benchmark, workload_data, "W3", impl)


@pytest.mark.benchmark(group="W4")
@pytest.mark.parametrize("impl", wl.IMPLS["W4-toggle"])
def test_w4_toggle_bulk(benchmark, workload_data, impl):
    """W4: W2's toggles in one assign_many call (or one fancy-indexed store)."""
    run_case(benchmark, workload_data, "W4-toggle", impl)


@pytest.mark.benchmark(group="W4")
@pytest.mark.parametrize("impl", wl.IMPLS["W4-lookup"])
def test_w4_lookup_bulk(benchmark, workload_data, impl):
    """W4: W2's lookups in one get_many call (or one fancy-indexed load)."""
    run_case(benchmark, workload_data, "W4-lookup", impl)


@pytest.mark.benchmark(group="W2-memory")
@pytest.mark.parametrize("impl", ["core", "sorted", "numpy"])
def test_w2_memory(benchmark, workload_data, impl):
    """Memory of the post-W2 state (about a million runs): nbytes and RSS growth in extra_info.

    Times one build of the state (see ``build_w2_state``); the RSS growth comes from building
    it again in a fresh interpreter, where freed memory cannot hide it.
    """
    data = workload_data
    expected = data.w2_runs(data.ops("W2-toggle", "core"))
    gc.collect()
    state = benchmark.pedantic(wl.build_w2_state, args=(impl, data), rounds=1, iterations=1)
    wl.check_runs(expected)(state)
    nbytes = wl.nbytes_of(state)
    del state
    fresh = wl.measure_w2_memory(impl, data.scale)
    assert fresh["nbytes"] == nbytes or impl == "sorted"  # sorted's estimate counts int objects
    benchmark.extra_info.update(
        workload="W2",
        impl=impl,
        runs=len(expected),
        nbytes=nbytes,
        bytes_per_run=round(nbytes / len(expected), 1),
        rss_growth_bytes=fresh["rss_growth"],
    )
