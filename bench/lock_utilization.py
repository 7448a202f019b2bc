"""How busy ``cpa_lock`` (or the S-EPT) is in a boot's accept phase, by fault batch, against the page-by-page reference.

When the lock is what bounds a multi-vCPU boot (the eager SNP designs take it for every page
they take out of the direct map), the page-by-page reference (``--pagewise-locks batch
--batch-pages 1``) keeps it busy for the whole accept phase: its holds add up to the phase's
length. The interleaved model settles windows in the order their vCPUs finish them and leaves
some of that time idle (docs/timeline.md, "Settling in order, not in time"); this prints how
much, as the holds' share of the accept phase, with the critical path beside it.

Run: ``python3 bench/lock_utilization.py`` (SNP ``eager-post`` boot, 512M with 32 vCPUs and
256M with 64, seed 1; under a minute). Options: ``--configs 1G:64`` (memory:vCPUs),
``--batch-pages 16384,1024,512,256``, ``--platform tdx --policy 6.19 --lock tdx_sept``. Not part
of the test run.
"""

from __future__ import annotations

import argparse
import sys

from pkvm import experiments as E


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="512M:32,256M:64", help="memory:vCPUs, comma-separated")
    ap.add_argument("--batch-pages", default="16384,1024,512,256")
    ap.add_argument("--platform", default="snp")
    ap.add_argument("--policy", default="eager-post")
    ap.add_argument("--lock", default="cpa_lock")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    runs = [(int(b), "interleaved") for b in a.batch_pages.split(",")] + [(1, "batch")]
    print(f"{'memory':>7} {'vCPUs':>5} {'model':>22} {'critical ms':>12} {'accept ms':>10} {'holds ms':>9} {'busy':>6}")
    for item in a.configs.split(","):
        memory, vcpus = item.split(":")
        for b, model in runs:
            cfg = E.Config(platform=a.platform, policy=a.policy, memory=memory, vcpus=int(vcpus),
                           batch_pages=b, pagewise_locks=model)
            r = E.run(cfg, seed=a.seed)
            accept = next(p.elapsed_ns for p in r.phases if p.name == "accept")
            hold = r.locks[a.lock]["hold_ns"]
            label = "reference (batch, 1)" if model == "batch" else f"interleaved, {b}"
            print(f"{memory:>7} {vcpus:>5} {label:>22} {r.critical_path_ns / 1e6:12.2f} {accept / 1e6:10.2f} "
                  f"{hold / 1e6:9.2f} {hold / accept:6.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
