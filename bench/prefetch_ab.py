"""What the per-page paths' software prefetch hints save, measured inside one process: the
fragmented phases of ``bench_fragmented.py`` (N random 4K pages of a 1 TiB guest), each phase's
pages taken in blocks, the VM's ``_prefetch`` switched on and off from block to block (the
order alternating), and each block timed by thread CPU time.

Both settings run on the same tree, at the same moment, on the same machine state, so the ratio
of one block to its neighbour is a paired measurement: on a machine whose timings move by up to
60 % between identical runs of separate processes (``ab_builds.py``), the median of these ratios
moves by about 1 % between runs. Results never depend on the setting (tests/test_prefetch.py);
only the time does.

With ``--batched`` each block is one batched call (``set_memory_attributes_many`` /
``page_fault_many``), where the hints also reach one call ahead.

Run: ``python3 bench/prefetch_ab.py [N] [--platform snp|sw_protected] [--block B] [--batched]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fragmented as b  # noqa: E402
import numpy as np  # noqa: E402

PHASE_NAMES = ("to private", "private fault", "to shared", "shared fault")


def measure(platform: str, n: int, block: int, batched: bool = False) -> list[tuple[float, float, list[float]]]:
    """Per phase: (ns per op with hints, ns per op without, the per-pair ratios on / off)."""
    gpas = b.gpas_for(n)
    arr = np.asarray(gpas, dtype=np.uint64)
    vm, vcpu = b.pkvm_vm(platform)
    sma, pf = vm.set_memory_attributes, vcpu.page_fault
    clock = time.thread_time
    out = []
    for phase in range(4):
        attrs = b.PRIVATE if phase == 0 else 0
        private = phase == 1
        tot = {True: 0.0, False: 0.0}
        ops = {True: 0, False: 0}
        ratios = []
        i = k = 0
        while i < n:
            t = {}
            for setting in ((True, False) if k % 2 == 0 else (False, True)):
                blk = gpas[i:i + block]
                vm._prefetch = setting
                if batched:
                    ba = arr[i:i + block]
                    if phase % 2 == 0:
                        sizes = np.full(len(ba), 4096, dtype=np.uint64)
                        t0 = clock()
                        vm.set_memory_attributes_many(ba, sizes, np.full(len(ba), attrs, dtype=np.uint64))
                    else:
                        t0 = clock()
                        vcpu.page_fault_many(ba, private=private)
                elif phase % 2 == 0:
                    t0 = clock()
                    for a in blk:
                        sma(a, 4096, attrs)
                else:
                    t0 = clock()
                    for a in blk:
                        pf(a, private=private)
                t[setting] = (clock() - t0, len(blk))
                i += len(blk)
                tot[setting] += t[setting][0]
                ops[setting] += len(blk)
            if t[True][1] == t[False][1] == block:
                ratios.append(t[True][0] / t[False][0])
            k += 1
        vm._prefetch = True
        out.append((tot[True] / ops[True] * 1e9, tot[False] / ops[False] * 1e9, sorted(ratios)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=1_000_000, help="pages (default 10**6)")
    ap.add_argument("--platform", choices=("snp", "sw_protected"), default="snp")
    ap.add_argument("--block", type=int, default=500, help="pages per block (default 500)")
    ap.add_argument("--batched", action="store_true", help="one batched call per block")
    args = ap.parse_args(argv)
    if args.n < 4 * args.block or args.block < 1:
        ap.error("n must be at least 4 blocks and --block at least 1")
    rows = measure(args.platform, args.n, args.block, args.batched)
    print(f"{args.platform}, N = {args.n:,}, blocks of {args.block}"
          f"{' (one batched call each)' if args.batched else ''}; thread CPU ns per op\n")
    print("| phase | hints on | hints off | on / off, median of pairs | quartiles |")
    print("|---|---:|---:|---:|---|")
    for name, (on, off, r) in zip(PHASE_NAMES, rows):
        q = statistics.quantiles(r, n=4)
        print(f"| {name} | {on:,.0f} | {off:,.0f} | {statistics.median(r):.3f} | {q[0]:.3f}-{q[2]:.3f} |")


if __name__ == "__main__":
    main()
