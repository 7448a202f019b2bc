"""Print a markdown table of RangeMap workload costs (ns/op) for ``docs/performance.md``.

Usage::

    python bench/report.py            # full workloads (about two minutes)
    python bench/report.py --quick    # a tenth of the operations, for a smoke check

Runs the workloads of ``rangemap_workloads.py`` (the same cases as ``bench_rangemap.py``):
each case is set up untimed, run ``--rounds`` times (at least 5) under ``time.perf_counter``,
and checked against its model after the last round.  The table reports the median round divided
by the number of operations, and each implementation's ratio to RangeMap on the same workload
(RangeMap per-op for per-op rows, RangeMap bulk for W4).  A second table gives the memory of the
post-W2 state, measured in fresh interpreters.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from datetime import date
from importlib import metadata

import rangemap_workloads as wl

LABELS = {
    "core": "RangeMap",
    "core-bulk": "RangeMap, assign_many / get_many",
    "sorted": "SortedRangeMap (sortedcontainers)",
    "numpy": "numpy uint8 per key",
    "numpy-bulk": "numpy uint8 per key, fancy indexing",
    "floor": "call floor: the same loop, O(1) calls",
}
WORKLOADS = {
    "W1": "W1 boot: in-order 512-key assigns",
    "W2-toggle": "W2 churn: random one-key toggles",
    "W2-lookup": "W2 churn: random lookups",
    "W3": "W3 mixed: range assign + find_ne",
    "W4-toggle": "W4 bulk: W2 toggles",
    "W4-lookup": "W4 bulk: W2 lookups",
}


def time_case(case: wl.Case, rounds: int) -> float:
    """Median seconds of ``rounds`` runs of ``case``, each on fresh state; checks the last."""
    times = []
    result = None
    for _ in range(rounds):
        args = case.setup()
        gc.collect()
        start = time.perf_counter()
        result = case.run(*args)
        times.append(time.perf_counter() - start)
        del args
    case.check(result)
    return statistics.median(times)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def method(rounds: int, scale: float) -> str:
    """The method section: what was measured, how, and on what."""
    return "\n".join(
        [
            f"- Date: {date.today().isoformat()}; machine: {_cpu_model()}, {os.cpu_count()} CPUs "
            f"({platform.system()} {platform.release()})",
            f"- Python {platform.python_version()}, numpy {_version('numpy')}, "
            f"Cython {_version('Cython')}, sortedcontainers {_version('sortedcontainers')}, "
            f"pkvm {_version('pkvm')}",
            f"- Key space 2^28 (1 TiB guest); operation counts x{scale:g} of the full workloads; "
            f"SortedRangeMap runs a prefix of each sequence",
            f"- Each case: untimed setup on fresh state, {rounds} timed rounds "
            "(time.perf_counter), median round / operations; the last round's result is checked "
            "against a model",
        ]
    )


def timing_table(data: wl.WorkloadData, rounds: int) -> str:
    rows = [
        "| Workload | Implementation | Ops | ns/op | x RangeMap |",
        "|---|---|---:|---:|---:|",
    ]
    for workload, impls in wl.IMPLS.items():
        per_op = {}
        for impl in impls:
            case = wl.make_case(data, workload, impl)
            per_op[impl] = (case.ops, time_case(case, rounds) / case.ops * 1e9)
            print(f"  {workload:10} {impl:11} {per_op[impl][1]:10.1f} ns/op", file=sys.stderr)
        baseline = per_op["core"][1] if "core" in per_op else per_op["core-bulk"][1]
        for impl, (ops, ns) in per_op.items():
            ratio = ns / baseline
            rows.append(
                f"| {WORKLOADS[workload]} | {LABELS[impl]} | {ops:,} | {ns:,.1f} | {ratio:.2f} |"
            )
    return "\n".join(rows)


def memory_table(scale: float) -> str:
    rows = [
        "| Implementation | Runs | nbytes | Bytes per run | RSS growth |",
        "|---|---:|---:|---:|---:|",
    ]
    for impl in ("core", "sorted", "numpy"):
        m = wl.measure_w2_memory(impl, scale)
        rows.append(
            f"| {LABELS[impl]} | {m['runs']:,} | {m['nbytes']:,} | {m['nbytes'] / m['runs']:,.1f} "
            f"| {m['rss_growth'] / 2**20:,.1f} MiB |"
        )
    return "\n".join(rows)


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The options of the RangeMap reports (this one and ``native_report.py``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="run a tenth of the operations")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case (at least 5)")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    scale = 0.1 if args.quick else 1.0
    data = wl.WorkloadData(scale=scale)

    print("### Method\n")
    print(method(args.rounds, scale))
    print("\n### Time per operation (median)\n")
    print(timing_table(data, args.rounds))
    print("\n### Memory after W2 (post-toggle state)\n")
    print(
        "`nbytes` is RangeMap's own count of its C memory, SortedRangeMap's estimate from "
        "`sys.getsizeof`, and the array's size; RSS growth is measured in a fresh interpreter.\n"
    )
    print(memory_table(scale))


if __name__ == "__main__":
    main()
