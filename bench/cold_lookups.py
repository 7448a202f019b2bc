"""Cold lookups from Python: ``RangeMap.get`` against ``dict.get`` on N single-key runs of a
large key space (the shape of fragmented memory's attribute and SPTE maps), the keys looked up
in the order they were stored and in a random order.

Run: ``python3 bench/cold_lookups.py [N]`` (N defaults to 10**6). Prints ns per lookup (best of
three passes) for each structure and order, and the bare loop's cost to subtract.

Why it is here (docs/performance.md, "Cold lookups and the order of the phases"): a dict keeps
its entries in insertion order, so looking keys up in the order they were stored walks its
entry array front to back, while a key-ordered tree visits its leaves at random either way.
``bench/bench_fragmented.py``'s default order (one order for every phase) is the first case.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pkvm import RangeMap


def best_ns(f, keys: list[int], passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        for k in keys:
            f(k)
        best = min(best, time.perf_counter() - t)
    return best / len(keys) * 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=10**6, help="keys (default 10**6)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"argument n: must be at least 1, not {args.n}")
    rng = np.random.default_rng(16)
    keys = rng.choice(1 << 28, size=args.n, replace=False)
    stored = keys.tolist()
    m = RangeMap()
    d: dict[int, int] = {}
    for k in stored:
        m.assign(k, k + 1, 1)
        d[k] = 1
    # the lookups use new int objects, as a model computing ``gpa >> 12`` per call does (a dict
    # then compares its stored key object by value, one more memory access)
    in_order = keys.tolist()
    shuffled = keys[rng.permutation(args.n)].tolist()
    print(f"N = {args.n:,} single-key runs of 2**28 keys; ns per lookup (best of 3)\n")
    print("| order | RangeMap.get | dict.get |")
    print("|---|---:|---:|")
    for name, keys in (("stored order", in_order), ("random order", shuffled)):
        print(f"| {name} | {best_ns(m.get, keys):,.0f} | {best_ns(d.get, keys):,.0f} |")
    print(f"| the bare loop | {best_ns(lambda k: None, stored):,.0f} | |")


if __name__ == "__main__":
    main()
