"""Two or more builds of pkvm, side by side on the fragmented phases: each round runs every
build once, in turn, in a fresh process (``PYTHONPATH`` set to the build's checkout), and
prints each build's minimum over the rounds of the thread CPU ns per operation of the four
phases of ``bench_fragmented.py`` (to private, private fault, to shared, shared fault), then
every round's numbers, then each build's time over the first build's paired by round (median
and quartiles), plainly and with each phase first divided by the other three phases of the
same process (which cancels a process the machine ran slower as a whole).

Run: ``python3 bench/ab_builds.py CHECKOUT[,CHECKOUT...] [N] [--rounds R]
[--platform snp|sw_protected] [--batched]``, where each CHECKOUT is a source tree with its
extension built in place (``python3 setup.py build_ext --inplace``); every build is timed by
this script's own ``bench_fragmented.py``, so builds older than the harness compare too.
Alternating fresh processes spread the machine's drift over the builds alike; thread CPU time leaves out time spent
descheduled; the spread of one build's rounds says how large a difference has to be to count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# One build's run, in a fresh process: the timing harness is this script's own
# bench_fragmented.py (the same for every build), the pkvm the checkout's (checked). The process
# starts in the checkout, so that the directory ``-c`` puts first on sys.path is the checkout too.
_ONE_RUN = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import bench_fragmented as b
import pkvm
checkout = os.path.realpath(sys.argv[2])
if not os.path.realpath(pkvm.__file__).startswith(checkout + os.sep):
    sys.exit(f"imported {pkvm.__file__}, not the build in {checkout}")
gpas = b.gpas_for(int(sys.argv[3]))
if sys.argv[5] == "one":
    vm, vcpu = b.pkvm_vm(sys.argv[4])
    t = b.time_phases(vm.set_memory_attributes, vcpu.page_fault, gpas, clock=time.thread_time)
else:
    t = b.run_pkvm_batched(sys.argv[4], [gpas] * 4, clock=time.thread_time)
print(json.dumps([x * 1e9 / len(gpas) for x in t]))
'''


def run_once(checkout: str, n: int, platform: str, mode: str) -> list[float]:
    """ns per op of the four phases, one fresh process on ``checkout``'s build."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    out = subprocess.run([sys.executable, "-c", _ONE_RUN, here, checkout, str(n), platform, mode],
                         env=env, cwd=checkout, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ab_builds.py: the run on {checkout} failed: {out.stderr.strip()[-500:]}")
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
        if not os.path.isfile(os.path.join(c, "pkvm", "__init__.py")):
            ap.error(f"checkouts: {c!r} is not a pkvm source tree (no pkvm/__init__.py)")
    if args.n < 1 or args.rounds < 1:
        ap.error("n and --rounds must be at least 1")
    mode = "many" if args.batched else "one"
    runs: dict[str, list[list[float]]] = {c: [] for c in builds}
    for k in range(args.rounds):
        # every other round in reverse order, so that no build always runs first (a process
        # that follows another runs on a machine that state left warm or cold)
        for c in (builds if k % 2 == 0 else builds[::-1]):
            runs[c].append(run_once(c, args.n, args.platform, mode))
    print(f"{args.platform}, N = {args.n:,}, {'batched calls' if args.batched else 'one call each'}; "
          f"thread CPU ns per op, minimum of {args.rounds} alternating rounds (every other one in reverse order)\n")
    print("| build | to private | private fault | to shared | shared fault | every round |")
    print("|---|---:|---:|---:|---:|---|")
    for c in builds:
        best = [min(r[i] for r in runs[c]) for i in range(4)]
        every = " / ".join(" ".join(f"{x:,.0f}" for x in r) for r in runs[c])
        print(f"| {c} | " + " | ".join(f"{x:,.0f}" for x in best) + f" | {every} |")
    if len(builds) > 1 and args.rounds >= 2:
        # Each round's time over the first build's in the same round: the median and the
        # quartiles say how large a difference the machine resolves (run a build against itself
        # through another path, e.g. a symlink, to see the spread of no difference).
        print("\n| build / first build, paired by round | to private | private fault | to shared | shared fault |")
        print("|---|---:|---:|---:|---:|")
        base = runs[builds[0]]
        for c in builds[1:]:
            cells = []
            for i in range(4):
                r = [y[i] / x[i] for x, y in zip(base, runs[c])]
                q = statistics.quantiles(r, n=4)
                cells.append(f"{statistics.median(r):.3f} ({q[0]:.2f}-{q[2]:.2f})")
            print(f"| {c} | " + " | ".join(cells) + " |")
        # The same, each phase first divided by the sum of the other three phases of its own
        # process: a process the machine ran slower as a whole (another job, a cold start)
        # cancels out, which steadies the ratio of a change that touches one phase only (at
        # 10^6 pages the plain ratio swings by about 15 % on the 2-core development machine).
        print("\n| build / first build, paired by round, each phase over its process's other three "
              "| to private | private fault | to shared | shared fault |")
        print("|---|---:|---:|---:|---:|")
        for c in builds[1:]:
            cells = []
            for i in range(4):
                r = [(y[i] / (sum(y) - y[i])) / (x[i] / (sum(x) - x[i])) for x, y in zip(base, runs[c])]
                q = statistics.quantiles(r, n=4)
                cells.append(f"{statistics.median(r):.3f} ({q[0]:.2f}-{q[2]:.2f})")
            print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
