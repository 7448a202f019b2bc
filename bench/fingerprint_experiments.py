"""A before/after fingerprint of ``pkvm.experiments.run`` for a change that must not change
what the model computes (the attribute-ioctl work of issue 16).

Runs every workload × platform × policy preset × 1 and 3 vCPUs at 1 GiB (seed 0) and hashes,
per run, the counters, modeled ns, the cost breakdown (by op and by actor and op), the
critical path, the per-actor figures, locks, latencies and races; a run the model refuses
records its exception type and message instead. Prints one line per run and the hash of them
all; run it on the old and the new tree and compare (``diff`` the outputs).

Run (from the repository root): ``PYTHONPATH=$PWD python3 bench/fingerprint_experiments.py [--memory 1G] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import pkvm
from pkvm import experiments
from pkvm.experiments import workloads


def fingerprint(**config: object) -> str:
    try:
        r = experiments.run(experiments.Config(**config))  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - a refusal is part of the fingerprint
        return f"error {type(exc).__name__}: {exc}"
    data = {
        "counters": r.counters, "modeled_ns": r.modeled_ns, "by_op": r.by_op,
        "by_actor": r.by_actor, "by_actor_op": r.by_actor_op,
        "critical_path_ns": r.critical_path_ns, "actors": r.actors, "locks": r.locks,
        "latency_ns": r.latency_ns, "races": r.races, "directmap": r.directmap,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = []
    for wl in workloads.WORKLOADS:
        for platform in ("snp", "tdx", "sw_protected"):
            for policy in pkvm.Policy.presets():
                for vcpus in (1, 3):
                    fp = fingerprint(platform=platform, memory=args.memory, workload=wl, policy=policy,
                                     vcpus=vcpus)
                    lines.append(f"{wl} {platform} {policy} {vcpus} {fp}")
                    print(lines[-1], flush=True)
    total = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    print("total", total)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + f"\ntotal {total}\n")


if __name__ == "__main__":
    sys.exit(main())
