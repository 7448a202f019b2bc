"""A fingerprint of every modelled number of ``pkvm.experiments.run`` over every workload x
platform x policy x {1, 3} vCPUs at 1 GiB: stats, modeled ns, cost breakdowns, critical path,
actors, locks, latency and races (everything but the simulator's own wall time).

Run it before and after a change that must not move any modelled number (a speed-up of the
simulator) and compare the printed digests:
``python3 bench/experiments_hash.py [--memory 1G] [--verbose]``. ``replay`` is left out (it needs
a trace file); workloads a platform refuses are listed as skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from pkvm import experiments
from pkvm.experiments import workloads


def digest(result: experiments.Result) -> str:
    d = result.to_dict()
    for key in ("wall_s", "gfns_per_s", "pkvm_version"):
        d.pop(key, None)
    d["row"] = {k: v for k, v in d["row"].items() if k not in ("wall_s", "gfns_per_s")}
    for p in d["phases"]:
        p.pop("wall_s", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=repr).encode()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--verbose", action="store_true", help="one digest per run")
    args = ap.parse_args()
    total = hashlib.sha256()
    for name in workloads.WORKLOADS:
        if name == "replay":
            continue
        for platform in experiments.PLATFORMS:
            for policy in experiments.PLATFORM_POLICIES[platform]:
                for vcpus in (1, 3):
                    key = f"{name} {platform} {policy} vcpus={vcpus}"
                    try:
                        cfg = experiments.Config(platform=platform, memory=args.memory, workload=name,
                                                 policy=policy, vcpus=vcpus)
                    except ValueError as exc:
                        h = f"skipped: {exc}"
                    else:
                        h = digest(experiments.run(cfg, seed=1))
                    total.update(f"{key} {h}\n".encode())
                    if args.verbose:
                        print(key, h, flush=True)
    print("all", total.hexdigest())


if __name__ == "__main__":
    main()
