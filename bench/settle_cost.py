"""What a multi-vCPU run costs in CPU time at a small and at the old default fault batch.

The interleaved model of the locks the kernel takes page by page settles every window of a
vCPU's work against the other vCPUs' (docs/timeline.md, "Locks the kernel takes page by
page"); the number of windows grows as the batch shrinks, and settling one grows with the
number of vCPUs. ``auto_batch_pages`` (docs/timeline.md, "Choosing the batch") takes 512
pages where this cost stays within its budget. This prints, per configuration, the process
CPU seconds of one ``pkvm.experiments.run`` at each batch size and its critical path (which
a change that only speeds the settling up must leave exactly as it was).

Run: ``python3 bench/settle_cost.py`` (SNP ``boot`` under ``eager-post``, seed 1, the
configurations of docs/timeline.md's table). To compare two builds, run it with each on
``PYTHONPATH``. Options: ``--configs 8G:8,2G:32`` (memory:vCPUs), ``--batch-pages 512,16384``,
``--platform tdx --policy 6.19``. Not part of the test run.
"""

from __future__ import annotations

import argparse
import sys
import time

from pkvm import experiments as E

DEFAULT_CONFIGS = "8G:8,64G:8,8G:16,64G:16,2G:32,8G:32,1G:64"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="memory:vCPUs, comma-separated")
    ap.add_argument("--batch-pages", default="512,1024,16384")
    ap.add_argument("--platform", default="snp")
    ap.add_argument("--policy", default="eager-post")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch_pages.split(",")]
    print(f"{'memory':>7} {'vCPUs':>5} " + " ".join(f"{'CPU s @' + str(b):>13} {'critical ns':>14}" for b in batches))
    for item in a.configs.split(","):
        memory, vcpus = item.split(":")
        cells = []
        for b in batches:
            cfg = E.Config(platform=a.platform, policy=a.policy, memory=memory, vcpus=int(vcpus), batch_pages=b)
            t = time.process_time()
            r = E.run(cfg, seed=a.seed)
            cells.append(f"{time.process_time() - t:13.2f} {r.critical_path_ns:14,}")
        print(f"{memory:>7} {vcpus:>5} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
