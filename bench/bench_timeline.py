"""The concurrent timeline's cost (docs/performance.md, "The concurrent timeline").

Run: ``python3 bench/bench_timeline.py``. Not part of the test run.

1. The default comparison (SNP, 64G, boot, four policies): on the timeline (what ``pkvm compare``
   does) against the same workloads without a timeline (the sum model: every call runs to
   completion), in the same run; the ratio is what the timeline costs. Target: <= 2x.
2. A 1 TiB SNP boot with 8 vCPUs under the four policies. Target: <= 15 s.

``--workload W --memory M --policy P [--rounds R]`` instead compares one run of that workload
(SNP, one vCPU) on the timeline and as the sum model, in CPU seconds, alternating, R rounds
(docs/performance.md, "Balloon at 1 TiB: where a chunk's time goes":
``--workload balloon --memory 1T --policy fault-time --rounds 3``), and times the timeline's
hand-off of a task alone: a ``vmm`` actor dispatching ``--tasks`` tasks (200,000) that each
charge one price to a one-vCPU timeline.
"""

from __future__ import annotations

import argparse
import sys
import time

import pkvm
from pkvm import experiments
from pkvm.experiments import workloads
from pkvm.sim.timeline import Timeline


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


def _cpu(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.process_time()
    fn()
    return time.process_time() - t


def handoff_us(tasks: int) -> float:
    """CPU microseconds per task a ``vmm`` actor dispatches to a one-vCPU timeline."""
    vm = pkvm.VM()
    vm.create_vcpu()
    tl = Timeline(vm)
    tl.start_vcpu("vcpu0")

    def task() -> None:
        vm._charge("npf_fault", 1)

    def main_loop() -> None:
        for _ in range(tasks):
            tl.dispatch("vcpu0", task)
        tl.stop()

    tl.spawn("vmm", main_loop)
    return _cpu(tl.run) / tasks * 1e6


def one_workload(workload: str, memory: str, policy: str, rounds: int, tasks: int) -> int:
    cfg = experiments.Config(platform="snp", memory=memory, workload=workload, policy=policy)
    for i in range(rounds):
        on = _cpu(lambda: experiments.run(cfg))
        off = _cpu(lambda: _sum_model(cfg))
        print(f"round {i + 1}: {workload} snp {memory} {policy}: on the timeline {on:.2f} s CPU, "
              f"sum model {off:.2f} s CPU, timeline share {1 - off / on:.0%}")
    print(f"hand-off: {handoff_us(tasks):.2f} us CPU per dispatched task ({tasks} tasks)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", help="compare one SNP run of this workload instead (see the docstring)")
    ap.add_argument("--memory", default="64G")
    ap.add_argument("--policy", default="fault-time")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=200_000)
    a = ap.parse_args(argv)
    if a.workload:
        return one_workload(a.workload, a.memory, a.policy, a.rounds, a.tasks)
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
