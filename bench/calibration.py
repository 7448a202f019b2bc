"""pkvm's critical path beside public multi-vCPU measurements (docs/calibration.md).

Run: ``python3 bench/calibration.py`` (about 5 s). Prints, for each published figure,
the configuration pkvm ran, pkvm's number and the published one, and their ratio.
"""

from __future__ import annotations

import sys
import time

from pkvm import experiments

GiB = 1 << 30


def _accept_s(platform: str, memory: str, vcpus: int, policy: str) -> float:
    cfg = experiments.Config(platform=platform, memory=memory, workload="boot", policy=policy, vcpus=vcpus,
                             host_cpus=max(64, vcpus))
    r = experiments.run(cfg)
    return next(p.elapsed_ns for p in r.phases if p.name == "accept") / 1e9


def main() -> int:
    t0 = time.perf_counter()
    print("# single vCPU: time to accept (and touch) all of guest memory")
    print(f"{'source':<34} {'config':<26} {'pkvm s':>8} {'published s':>12} {'ratio':>6}")
    singles = [
        ("lkvs tdx_mem_test (A1) 8G", "tdx", "8G", "6.19", 24.0),
        ("lkvs tdx_mem_test (A1) 32G", "tdx", "32G", "6.19", 148.0),
        ("J. Miao, LKML 2024 (A3) 8G", "tdx", "8G", "6.19", 15.479),
        ("J. Miao, LKML 2024 (A3) 64G", "tdx", "64G", "6.19", 133.379),
    ]
    for label, plat, mem, pol, published in singles:
        s = _accept_s(plat, mem, 1, pol)
        print(f"{label:<34} {plat + ' ' + mem + ' 1 vCPU ' + pol:<26} {s:8.1f} {published:12.1f} {published / s:6.2f}")
    print()
    print("# speedup of acceptance from 1 to 32 vCPUs (published range: lkvs A1, both stored baseline sets)")
    print(f"{'config':<22} {'1 vCPU s':>9} {'32 vCPUs s':>11} {'speedup':>8} {'published':>12}")
    for mem, lo, hi in (("8G", 24 / 4, 24 / 2), ("32G", 148 / 85, 148 / 29)):
        one, many = _accept_s("tdx", mem, 1, "6.19"), _accept_s("tdx", mem, 32, "6.19")
        print(f"{'tdx ' + mem + ' 6.19':<22} {one:9.1f} {many:11.1f} {one / many:8.2f} {lo:5.1f}-{hi:4.1f}x")
    for pol in ("fault-time", "eager-post"):
        one, many = _accept_s("snp", "32G", 1, pol), _accept_s("snp", "32G", 32, pol)
        print(f"{'snp 32G ' + pol:<22} {one:9.1f} {many:11.1f} {one / many:8.2f} {'(none public)':>12}")
    print(f"\n({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
