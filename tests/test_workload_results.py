"""Every number ``balloon`` and ``mixed`` measure, pinned: a speed-up of the simulator (the
workloads, the actors, the timeline's lock hooks, the direct map) must leave all of them as
they were.

Where the golden files (tests/test_golden.py) pin counters, modeled time, phases, critical
path and races, these digests cover everything :meth:`pkvm.experiments.Result.metrics` reports
without the simulator's own time: also the cost breakdown by operation, each actor's busy,
wait and idle time, the lock statistics (hold, wait, acquisitions, percentiles) and the
latency distributions; with 1 and 3 vCPUs (contended locks), on each platform and on an SNP
policy of each direct-map handling (``split-4k``, ``unmap-restore``).

After a deliberate model change, print the new table with
``python3 tests/test_workload_results.py`` and say in the commit why the numbers moved.
``bench/workload_results_hash.py`` runs the same check over every workload, policy and 64 GiB.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from pkvm import experiments as E

#: (platform, policy, vcpus, workload, options) -> digest of the result's metrics.
CASES: dict[tuple[str, str, int, str, tuple[tuple[str, object], ...]], str] = {
    ('snp', 'fault-time', 1, 'balloon', ()): '55e7b3eb258e0481',
    ('snp', 'fault-time', 3, 'balloon', ()): '676042f34ab3a822',
    ('snp', 'eager-post', 1, 'balloon', (('chunk', '4K'),)): '9b1bee70b3b0f843',
    ('snp', 'eager-post', 3, 'mixed', (('ops', 150),)): '704408029cdde372',
    ('snp', 'fault-time', 3, 'mixed', (('ops', 150),)): 'd15002c1a7147a4f',
    ('tdx', '6.19', 1, 'balloon', ()): '865d50a4055f09f4',
    ('tdx', '6.19', 3, 'mixed', (('ops', 150),)): '39affbc49bdb9e55',
    ('sw_protected', '6.8', 3, 'balloon', ()): 'fec581a51b64f1d3',
    ('sw_protected', '6.19', 3, 'mixed', (('ops', 150),)): '02794c8c86a76af1',
}
MEMORY = "512M"


def digest(platform: str, policy: str, vcpus: int, workload: str,
           options: tuple[tuple[str, object], ...]) -> str:
    r = E.run(E.Config(platform=platform, memory=MEMORY, workload=workload, options=dict(options),
                       policy=policy, vcpus=vcpus), seed=3)
    blob = json.dumps({"metrics": r.metrics(wall=False), "notes": list(r.notes)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}cpu-{c[3]}")
def test_metrics_unchanged(case):
    assert digest(*case) == CASES[case], (
        f"{case}: the result's metrics changed (run python3 tests/test_workload_results.py for the new table)")


def test_digest_sees_a_lock_statistic():
    """The digest covers what the golden files do not: a run's lock statistics."""
    r = E.run(E.Config(platform="snp", memory="64M", workload="balloon", vcpus=3), seed=3)
    m = r.metrics(wall=False)
    assert any(k.startswith("locks.mmu_lock.") for k in m)
    assert any(k.startswith("latency_ns.fault.") for k in m)
    assert m["locks.cpa_lock.acquisitions"] > 0


if __name__ == "__main__":  # print the table for CASES
    for c in CASES:
        print(f"    {c!r}: {digest(*c)!r},")
    sys.exit(0)
