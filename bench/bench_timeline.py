"""The concurrent timeline's cost (docs/performance.md, "The concurrent timeline").

Run: ``python3 bench/bench_timeline.py``. Not part of the test run.

1. The default comparison (SNP, 64G, boot, four policies): on the timeline (what ``pkvm compare``
   does) against the same workloads without a timeline (the sum model: every call runs to
   completion), in the same run; the ratio is what the timeline costs. Target: <= 2x.
2. A 1 TiB SNP boot with 8 vCPUs under the four policies. Target: <= 15 s.
"""

from __future__ import annotations

import sys
import time

from pkvm import experiments
from pkvm.experiments import workloads


def _sum_model(cfg: experiments.Config) -> None:
    wl = workloads.get(cfg.workload)
    _vm, ctx = experiments._build(cfg, 0, None)
    wl.run(ctx, **workloads.parse_options(wl, cfg.options))


def _best(fn, rounds: int = 5) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    base = experiments.Config(platform="snp", memory="64G", workload="boot")
    pols = experiments.PLATFORM_POLICIES["snp"]
    cfgs = [base.with_(policy=p) for p in pols]
    summed = _best(lambda: [_sum_model(c) for c in cfgs])
    timeline = _best(lambda: [experiments.run(c) for c in cfgs])
    print(f"default compare (snp 64G boot, 4 policies): sum model {summed:.3f} s, timeline {timeline:.3f} s, "
          f"ratio {timeline / summed:.2f}x (target <= 2x)")
    t = time.perf_counter()
    rows = []
    for p in pols:
        r = experiments.run(experiments.Config(platform="snp", memory="1T", workload="boot", policy=p, vcpus=8))
        rows.append((p, r.critical_path_ns / 1e9, r.modeled_ns / 1e9, r.wall_s))
    total = time.perf_counter() - t
    for p, crit, cpu, wall in rows:
        print(f"  1T 8 vCPUs {p:<13} critical path {crit:9.1f} s  CPU time {cpu:9.1f} s  wall {wall:5.2f} s")
    print(f"1 TiB SNP boot, 8 vCPUs, 4 policies: {total:.2f} s (target <= 15 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
