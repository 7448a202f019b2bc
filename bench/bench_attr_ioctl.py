"""The attribute ioctl on fragmented memory (issue 16, item 1): the "to private" and "to shared"
phases of ``bench/bench_fragmented.py`` (N random 4K pages of a 1 TiB guest, faulted in between,
untimed), timed in **CPU time** of this process (``time.process_time``) rather than wall time,
against the dict-per-GFN baseline in the same process, R rounds alternating the two models; the
median round is printed. CPU time is what to read on a shared machine: other jobs' load changes
wall time by 2-5x there, the process's own CPU time much less (cache pressure remains).

Run: ``python3 bench/bench_attr_ioctl.py [N] [--rounds R] [--platforms snp,sw_protected]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_fragmented as bf  # noqa: E402


def pkvm_round(platform: str, gpas: list[int]) -> tuple[float, float]:
    """CPU seconds of the "to private" and "to shared" phases (faults in between untimed)."""
    vm, vcpu = bf.pkvm_vm(platform)
    t = bf.time_phases(vm.set_memory_attributes, vcpu.page_fault, gpas, time.process_time, phases=3)
    assert vm.stats["attr_stores"] == 2 * len(gpas)
    return t[0], t[2]


def dict_round(platform: str, gpas: list[int]) -> tuple[float, float]:
    t = bf.run_dict(platform, gpas, time.process_time)
    return t[0], t[2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--platforms", default="snp,sw_protected")
    args = ap.parse_args(argv)
    gpas = bf.gpas_for(args.n)
    n = len(gpas)
    print(f"N = {n:,} random 4K pages of a 1 TiB guest; CPU ns per ioctl, median of {args.rounds} rounds\n")
    print("| platform | dict baseline: to private | to shared | pkvm: to private | to shared |")
    print("|---|---:|---:|---:|---:|")
    for platform in args.platforms.split(","):
        d, p = [], []
        for _ in range(args.rounds):
            d.append(dict_round(platform, gpas))
            p.append(pkvm_round(platform, gpas))
        dm = [statistics.median(x[i] for x in d) / n * 1e9 for i in (0, 1)]
        pm = [statistics.median(x[i] for x in p) / n * 1e9 for i in (0, 1)]
        print(f"| {platform} | {dm[0]:,.0f} | {dm[1]:,.0f} | {pm[0]:,.0f} ({pm[0] / dm[0]:.2f}×) | "
              f"{pm[1]:,.0f} ({pm[1] / dm[1]:.2f}×) |")


if __name__ == "__main__":
    main()
