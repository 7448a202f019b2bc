"""What a many-vCPU run costs the simulator as the guest's memory grows: CPU seconds, SimPy
events and the critical path of one ``pkvm.experiments.run`` per configuration, at the
automatic fault batch (``Config.batch_pages=None``).

A guest loop that re-faults while another thread's invalidation lasts is simulated as one
wait, not as one event per re-fault (docs/timeline.md, "Interrupts and retries"); before
that, an eager SNP boot with 64 vCPUs took millions of SimPy events. The events column shows
whether a run is back to one event per re-fault; the CPU column shows how settling the
windows of the locks the kernel takes page by page grows with the memory
(docs/performance.md, "64 vCPUs as the memory grows").

Run: ``python3 bench/vcpu_scale.py`` (SNP ``eager-post`` and ``fault-time``, 64 vCPUs, 16G,
32G and 64G, seed 0). Options: ``--memory 16G,64G``, ``--vcpus 64``, ``--policies
eager-post``, ``--platform tdx --policies 6.19``, ``--seed N``, ``--host-cpus N`` (default 64, or the vCPUs
when more). Not part of the test run; the
larger sizes take minutes.
"""

from __future__ import annotations

import argparse
import sys
import time

import simpy

from pkvm import experiments as E


class _CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it processes."""

    steps = 0

    def step(self) -> None:
        type(self).steps += 1
        super().step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", default="16G,32G,64G", help="guest memory sizes, comma-separated")
    ap.add_argument("--vcpus", type=int, default=64)
    ap.add_argument("--host-cpus", type=int, default=None,
                    help="host CPUs (default: 64, or the vCPUs when more; each vCPU thread needs one)")
    ap.add_argument("--platform", default="snp")
    ap.add_argument("--policies", default="eager-post,fault-time")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    orig = simpy.Environment
    simpy.Environment = _CountingEnvironment  # type: ignore[misc]  # the timeline builds its own
    try:
        print(f"{'memory':>7} {'vCPUs':>5} {'policy':>12} {'CPU s':>9} {'SimPy events':>13} {'critical ms':>12}")
        for memory in a.memory.split(","):
            for policy in a.policies.split(","):
                cfg = E.Config(platform=a.platform, policy=policy, memory=memory, vcpus=a.vcpus,
                               host_cpus=a.host_cpus or max(64, a.vcpus))
                _CountingEnvironment.steps = 0
                t = time.process_time()
                r = E.run(cfg, seed=a.seed)
                cpu = time.process_time() - t
                print(f"{memory:>7} {a.vcpus:>5} {policy:>12} {cpu:9.2f} {_CountingEnvironment.steps:13,} "
                      f"{r.critical_path_ns / 1e6:12,.1f}", flush=True)
    finally:
        simpy.Environment = orig  # type: ignore[misc]
    return 0


if __name__ == "__main__":
    sys.exit(main())
