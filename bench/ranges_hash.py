"""Fingerprint of every observable figure of SNP and TDX runs, to compare two versions of the
simulator (docs/performance.md, "Page-state changes and MapGPA").

For each workload x vCPU count x policy of ``snp`` and ``tdx`` at ``--memory``, hashes the
:class:`pkvm.experiments.Result` figures that do not depend on the machine (counters, modeled
time and its breakdowns, per-actor clocks, phases without wall time, critical path, timeline
actors, locks, latencies, races, direct-map figures). Prints one line per run and the hash of
all of them; run it on each version (``PYTHONPATH=...``) and compare.

``--reference`` runs with the exit replay off (every PSC request and MapGPA chunk answered on
its own), the comparison within one version.

    python3 bench/ranges_hash.py --memory 1G
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from pkvm import KvmError
from pkvm import experiments as E

WORKLOADS = ("boot", "swiotlb", "virtio", "balloon", "migration", "mixed", "implicit")


def figures(res: Any) -> dict[str, Any]:
    phases = [(p.name, p.modeled_ns, p.elapsed_ns, sorted(p.by_actor.items()), sorted(p.counters.items()))
              for p in res.phases]
    return {"counters": res.counters, "modeled_ns": res.modeled_ns, "by_actor": res.by_actor,
            "by_op": res.by_op, "by_actor_op": res.by_actor_op, "directmap": res.directmap, "phases": phases,
            "critical_path_ns": res.critical_path_ns, "actors": res.actors, "locks": res.locks,
            "latency_ns": res.latency_ns, "races": res.races, "notes": list(res.notes)}


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Exit replay off (only in a version that has it)."""
    import pkvm.platforms._snp_flows as snp
    import pkvm.platforms._tdx_flows as tdx
    saved = snp.replayable, tdx.replayable
    snp.replayable = tdx.replayable = lambda vm: False  # type: ignore[assignment]
    try:
        yield
    finally:
        snp.replayable, tdx.replayable = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()
    total = hashlib.sha256()
    ctx = reference() if args.reference else contextlib.nullcontext()
    with ctx:
        for platform in ("snp", "tdx"):
            for workload in WORKLOADS:
                for vcpus in (1, 3):
                    for policy in E.PLATFORM_POLICIES[platform]:
                        cfg = E.Config(platform=platform, memory=args.memory, workload=workload, policy=policy,
                                       vcpus=vcpus)
                        try:
                            fig = figures(E.run(cfg))
                        except (ValueError, KvmError) as exc:
                            fig = {"error": f"{type(exc).__name__}: {exc}"}
                        h = hashlib.sha256(json.dumps(fig, sort_keys=True, default=str).encode()).hexdigest()
                        total.update(h.encode())
                        print(f"{platform} {workload} vcpus={vcpus} {policy}: {h[:16]}", flush=True)
    print(f"all: {total.hexdigest()}")


if __name__ == "__main__":
    main()
