"""Benchmark of ``pkvm sensitivity`` (issue 15): a 10,000-sample Sobol' analysis of the default
SNP comparison (64 GiB boot, four policies) with the summed metric, target <= 10 s.

N = 10,000 base samples over the 8 price groups those runs charge is 10,000 x (8 + 2) =
100,000 cost models per policy, 400,000 in all. Re-pricing makes that one matrix product per
policy over the counting run's operations; the rest is eight simulations (a nominal and a
counting run per policy), SALib's sampling and its bootstrap of the indices.

Run: ``python3 bench/bench_sensitivity.py`` (a table: the API call by phase, then the whole
command line, Python start-up and imports included) or
``python3 -m pytest bench/bench_sensitivity.py --benchmark-only``. Each run asserts that
fault-time beats the eager designs on every sample, so a fast wrong answer fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pkvm import experiments as E
from pkvm.experiments import uncertainty as U

SAMPLES = 10_000


def analyse(samples: int = SAMPLES) -> U.SensitivityResult:
    res = E.sensitivity(E.Config(memory="64G"), samples=samples, seed=0, metric="modeled_ns")
    assert res.evaluation == "re-priced"
    rk = res.ranking().set_index(["a", "b"])
    assert rk.loc[("fault-time", "eager-post"), "a_beats_b"] == 1.0
    return res


def test_sensitivity_64g_10k(benchmark):
    benchmark.pedantic(analyse, rounds=1, iterations=1)


def _phases() -> list[tuple[str, float]]:
    """The API call's parts, timed separately (imports already done)."""
    cfg = E.Config(memory="64G")
    pols = list(E.PLATFORM_POLICIES["snp"])
    out = []
    t = _now()
    ledgers = [E.count_run(cfg.with_(policy=p), 0) for p in pols]
    runs = [E.run(cfg.with_(policy=p), 0) for p in pols]
    out.append(("8 simulations (nominal + counting, 4 policies)", _since(t)))
    model = cfg.cost_model()
    prices = U.price_space(model, set().union(*(lg.ops() for lg in ledgers)))
    groups = U._groups(prices)
    t = _now()
    unit = U._sample("sobol", groups, SAMPLES, 0)
    values = U.expand(prices, unit)
    out.append((f"SALib Sobol' sample ({len(values):,} x {len(groups)} groups) + price transform",
                _since(t)))
    t = _now()
    ys = {p: U.reprice(model, lg, prices, values, ["modeled_ns"])[:, 0] for p, lg in zip(pols, ledgers)}
    out.append((f"re-pricing: 4 matrix products ({len(values):,} samples)", _since(t)))
    assert all(U._reprices_nominal(model, lg, r) for lg, r in zip(ledgers, runs))
    t = _now()
    outputs = dict(ys)
    for i, a in enumerate(pols):
        for b in pols[i + 1:]:
            outputs[f"{a} - {b}"] = ys[a].astype(float) - ys[b].astype(float)
    U._indices("sobol", groups, unit, outputs, 0, 0.95)
    out.append(("SALib Sobol' analysis with bootstrap CIs (10 outputs, 3 distinct)", _since(t)))
    return out


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def main() -> None:
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| part | wall s | CPU s |")
    print("|---|---:|---:|")
    wall = cpu = 0.0
    for label, (w, c) in _phases():
        wall, cpu = wall + w, cpu + c
        print(f"| {label} | {w:.2f} | {c:.2f} |")
    print(f"| **sum of the parts** | **{wall:.2f}** | **{cpu:.2f}** |")
    t = _now()
    analyse()
    w, c = _since(t)
    print(f"| `experiments.sensitivity(Config(memory='64G'), samples=10_000)` | {w:.2f} | {c:.2f} |")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(E.__file__))))
    for args in (["--samples", str(SAMPLES)], ["--samples", str(SAMPLES), "--out", "/tmp/pkvm-bench-gsa.parquet"]):
        t0, r0 = time.perf_counter(), os.times()
        subprocess.run([sys.executable, "-m", "pkvm", "sensitivity", "--memory", "64G", "--metric", "modeled_ns", "-q", *args], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        r1 = os.times()
        child = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
        print(f"| `pkvm sensitivity --memory 64G {' '.join(args)}` (end to end, Python start-up and "
              f"imports included) | {time.perf_counter() - t0:.2f} | {child:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
