"""Every workload against the page-by-page reference (docs/timeline.md, "Choosing the batch",
"Every workload against the reference").

For each workload and each of SNP ``fault-time``, SNP ``eager-post`` and TDX 6.19, at one memory
size and vCPU count, runs ``E.run(E.Config(platform, policy, memory, vcpus, workload), seed)``
at the default batch and the same with ``batch_pages=1, pagewise_locks="batch"`` (the
reference: every hold its own acquisition, queued in SimPy), each in a fresh interpreter, and
prints one line per run: the critical path and the vCPUs' summed stall against the
reference's, in %, ``mmu_lock``'s wait (ms) and waits, ``slots_lock``'s wait, and the CPU
seconds of each run.

    python3 bench/reference_survey.py --memory 512M --vcpus 32 [--cache ref.json]
        [--workloads boot,mixed] [--seed 1] [--only reference|model]

The reference costs 100-250 times the default's CPU; ``--cache FILE`` keeps its results
(JSON, keyed by platform, policy and workload, for this memory, vCPU count and seed) so that a
model change can be surveyed again against it at the default's cost. A cache is only valid for
the tree that wrote it as far as the reference is concerned: ``pagewise_locks="batch"`` is
the model's own reference, so a change to it (not to the default model) needs a new cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKLOADS = ("boot", "mixed", "balloon", "migration", "swiotlb", "virtio", "implicit")
PAIRS = (("snp", "fault-time"), ("snp", "eager-post"), ("tdx", "6.19"))

_RUN = r"""
import json, sys, time
from pkvm import experiments as E
platform, policy, workload, memory, vcpus, seed, ref = sys.argv[1:8]
kw = dict(batch_pages=1, pagewise_locks="batch") if ref == "1" else {}
t = time.process_time()
r = E.run(E.Config(platform=platform, policy=policy, memory=memory, vcpus=int(vcpus),
                   workload=workload, **kw), seed=int(seed))
stall = sum(a["wait_ns"] for k, a in r.actors.items() if k.startswith("vcpu"))
mmu, slots = r.locks["mmu_lock"], r.locks["slots_lock"]
print(json.dumps({"critical_path_ns": r.critical_path_ns, "stall_ns": stall,
                  "cpu_s": round(time.process_time() - t, 2),
                  "mmu_wait_ns": mmu.get("wait_ns", 0), "mmu_waits": mmu.get("waits", 0),
                  "slots_wait_ns": slots.get("wait_ns", 0)}))
"""


def run(platform: str, policy: str, workload: str, memory: str, vcpus: int, seed: int,
        reference: bool) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _RUN, platform, policy, workload, memory,
                          str(vcpus), str(seed), "1" if reference else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pct(x: float, ref: float) -> str:
    return f"{(x - ref) / ref * 100:+.1f} %" if ref else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--vcpus", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--cache", help="JSON file keeping the reference's results")
    ap.add_argument("--only", choices=("reference", "model"),
                    help="run only the reference (to fill the cache) or only the model")
    a = ap.parse_args(argv)
    refs: dict[str, dict[str, float]] = {}
    if a.cache and os.path.exists(a.cache):
        with open(a.cache) as f:
            refs = json.load(f)
    for workload in a.workloads.split(","):
        for platform, policy in PAIRS:
            key = f"{platform}/{policy}/{workload}/{a.memory}/{a.vcpus}/{a.seed}"
            if key not in refs and a.only != "model":
                refs[key] = run(platform, policy, workload, a.memory, a.vcpus, a.seed, True)
                if a.cache:
                    with open(a.cache, "w") as f:
                        json.dump(refs, f, indent=0, sort_keys=True)
            if a.only == "reference":
                print(key, refs[key], flush=True)
                continue
            if key not in refs:
                print(f"{key}: no reference (run without --only model first)", flush=True)
                continue
            m, r = run(platform, policy, workload, a.memory, a.vcpus, a.seed, False), refs[key]
            print(f"{platform}/{policy}/{workload}: critical path {m['critical_path_ns'] / 1e6:,.1f} ms "
                  f"({pct(m['critical_path_ns'], r['critical_path_ns'])} of {r['critical_path_ns'] / 1e6:,.1f}), "
                  f"stall {m['stall_ns'] / 1e6:,.1f} ms ({pct(m['stall_ns'], r['stall_ns'])} of {r['stall_ns'] / 1e6:,.1f}), "
                  f"mmu_lock {m['mmu_wait_ns'] / 1e6:.2f} ms / {m['mmu_waits']} waits "
                  f"(reference {r['mmu_wait_ns'] / 1e6:.2f} / {r['mmu_waits']}), "
                  f"slots_lock {m['slots_wait_ns'] / 1e6:.2f} ms ({r['slots_wait_ns'] / 1e6:.2f}), "
                  f"CPU {m['cpu_s']} s ({r['cpu_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
