"""Two or more builds of pkvm, side by side on the fragmented phases: each round runs every
build once, in turn, in a fresh process (``PYTHONPATH`` set to the build's checkout), and
prints each build's minimum over the rounds of the thread CPU ns per operation of the four
phases of ``bench_fragmented.py`` (to private, private fault, to shared, shared fault), then
every round's numbers.

Run: ``python3 bench/ab_builds.py CHECKOUT[,CHECKOUT...] [N] [--rounds R]
[--platform snp|sw_protected] [--batched]``, where each CHECKOUT is a source tree with its
extension built in place (``python3 setup.py build_ext --inplace``). Alternating fresh processes
spread the machine's drift over the builds alike; thread CPU time leaves out time spent
descheduled; the spread of one build's rounds says how large a difference has to be to count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_ONE_RUN = r'''
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1] + "/bench")
import bench_fragmented as b
gpas = b.gpas_for(int(sys.argv[2]))
vm, vcpu = b.pkvm_vm(sys.argv[3])
if sys.argv[4] == "one":
    t = b.time_phases(vm.set_memory_attributes, vcpu.page_fault, gpas, clock=time.thread_time)
else:
    a = np.asarray(gpas, dtype=np.uint64)
    n = len(gpas)
    sizes = np.full(n, 4096, dtype=np.uint64)
    t = []
    for attrs, private in ((b.PRIVATE, True), (0, False)):
        c = time.thread_time()
        vm.set_memory_attributes_many(a, sizes, np.full(n, attrs, dtype=np.uint64))
        t.append(time.thread_time() - c)
        c = time.thread_time()
        vcpu.page_fault_many(a, private=private)
        t.append(time.thread_time() - c)
print(json.dumps([x * 1e9 / len(gpas) for x in t]))
'''


def run_once(checkout: str, n: int, platform: str, mode: str) -> list[float]:
    """ns per op of the four phases, one fresh process on ``checkout``'s build."""
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([sys.executable, "-c", _ONE_RUN, checkout, str(n), platform, mode],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", help="comma-separated source trees, each built in place")
    ap.add_argument("n", nargs="?", type=int, default=500_000, help="pages (default 500,000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--platform", choices=("snp", "sw_protected"), default="snp")
    ap.add_argument("--batched", action="store_true",
                    help="time the batched calls instead of one call per page")
    args = ap.parse_args(argv)
    builds = [c for c in args.checkouts.split(",") if c]
    for c in builds:
        if not os.path.isfile(os.path.join(c, "bench", "bench_fragmented.py")):
            ap.error(f"checkouts: {c!r} is not a pkvm source tree (no bench/bench_fragmented.py)")
    if args.n < 1 or args.rounds < 1:
        ap.error("n and --rounds must be at least 1")
    mode = "many" if args.batched else "one"
    runs: dict[str, list[list[float]]] = {c: [] for c in builds}
    for _ in range(args.rounds):
        for c in builds:
            runs[c].append(run_once(c, args.n, args.platform, mode))
    print(f"{args.platform}, N = {args.n:,}, {'batched calls' if args.batched else 'one call each'}; "
          f"thread CPU ns per op, minimum of {args.rounds} alternating rounds\n")
    print("| build | to private | private fault | to shared | shared fault | every round |")
    print("|---|---:|---:|---:|---:|---|")
    for c in builds:
        best = [min(r[i] for r in runs[c]) for i in range(4)]
        every = " / ".join(" ".join(f"{x:,.0f}" for x in r) for r in runs[c])
        print(f"| {c} | " + " | ".join(f"{x:,.0f}" for x in best) + f" | {every} |")


if __name__ == "__main__":
    main()
