"""The typed kernel paths' RangeMap descents at scale: batched calls on fragmented pages.

Usage::

    PYTHONPATH=$PWD python3 bench/rangemap_descents.py [N] [--rounds R] [--platform snp] [--faults]

N random 4K pages of a 1 TiB guest (``bench_fragmented.gpas_for``, default 300,000) are
converted by ``set_memory_attributes_many`` to private and back to shared on a fresh VM per
round; with ``--faults``, each conversion is followed by ``page_fault_many`` over the same pages.
Prints each phase's ns per page of thread CPU time (the best of ``--rounds`` rounds: on a shared
machine the minimum is the least disturbed) and the checkout measured. This is the workload whose
profile shows ``RangeMap._descend`` (each kernel step looks the same few maps up at one GFN);
it measures the descent finger (docs/performance.md, RangeMap section) with alternating builds
in one session.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pkvm  # noqa: E402
from bench_fragmented import gpas_for, pkvm_vm  # noqa: E402

PHASES = ("to private", "private fault", "to shared", "shared fault")
ATTR_PHASES = ("to private", "to shared")


def one_round(platform: str, a: np.ndarray, faults: bool) -> list[float]:
    """Seconds of each batched phase on a fresh VM."""
    vm, vcpu = pkvm_vm(platform)
    sizes = np.full(a.shape[0], 4096, dtype=np.uint64)
    out = []
    for attrs, private in ((8, True), (0, False)):
        gc.collect()
        t = time.thread_time()
        vm.set_memory_attributes_many(a, sizes, np.full(a.shape[0], attrs, dtype=np.uint64))
        out.append(time.thread_time() - t)
        if faults:
            t = time.thread_time()
            vcpu.page_fault_many(a, private=private)
            out.append(time.thread_time() - t)
    st = vm.stats
    n = a.shape[0]
    assert st["attr_stores"] == 2 * n, dict(st)
    assert st["pf_fixed"] + st["pf_spurious"] == (2 * n if faults else 0), dict(st)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--platform", default="snp")
    ap.add_argument("--faults", action="store_true", help="also time the batched faults")
    args = ap.parse_args(argv)
    a = np.asarray(gpas_for(args.n), dtype=np.uint64)
    phases = PHASES if args.faults else ATTR_PHASES
    rounds = [one_round(args.platform, a, args.faults) for _ in range(args.rounds)]
    cells = [f"{min(r[i] for r in rounds) / args.n * 1e9:,.0f}" for i in range(len(phases))]
    print(f"| {args.platform} N={args.n:,} ns/page | " + " | ".join(phases) + " |")
    print(f"| {os.path.dirname(os.path.dirname(pkvm.__file__))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
