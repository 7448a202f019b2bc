"""Where one configuration's vCPU stall goes, against the page-by-page reference
(docs/timeline.md, "Every workload against the reference": the stall gaps it names).

For one configuration, runs ``E.run(E.Config(...), seed)`` at the default batch and the same with
``batch_pages=1, pagewise_locks="batch"`` (the reference), each in a fresh interpreter, and
prints side by side:

- the critical path and the vCPUs' summed stall, split into lock waits, IPI stalls and retry
  spins (``TimelineResult.actors``);
- each lock's waits by mode, from the ``lock_wait`` events (which add up to the locks'
  statistics: ``tests/test_events.py::test_lock_events_add_up_to_the_locks_statistics``);
- the retry spins (``Timeline.retry_fault``) by how many invalidations were open when the fault
  was turned back (``mmu_invalidate_in_progress``: with two or more, the range checked is their
  union), with their time;
- how long invalidations were open in all, by how many at once, sampled after every SimPy step.

    python3 bench/stall_anatomy.py --platform snp --policy fault-time --workload virtio \\
        --memory 1G --vcpus 8 [--seed 1] [--only model|reference]

The hooks are this script's own (a subscriber on the VM, ``Timeline.retry_fault`` and
``simpy.Environment.step`` wrapped in the child process); the model runs unchanged. The
reference costs 10-250 times the default's CPU time (3.5 s for the example).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

_RUN = r"""
import collections, json, sys, time
import simpy
from pkvm import experiments as E
from pkvm.sim import timeline as T
platform, policy, workload, memory, vcpus, seed, ref = sys.argv[1:8]
kw = dict(batch_pages=1, pagewise_locks="batch") if ref == "1" else {}
vms, waits, spins, open_ns = [], collections.Counter(), collections.Counter(), collections.Counter()
init = T.Timeline.__init__
def _init(self, vm, *a, **k):
    init(self, vm, *a, **k)
    vms.append(vm)
    def sub(ev):
        waits[f"{ev.op} {ev.result}"] += ev.args[0]
        waits[f"{ev.op} {ev.result} #"] += 1
    vm.subscribe(sub, ("lock_wait",))
T.Timeline.__init__ = _init
retry = T.Timeline.retry_fault
def _retry(self, gfn, prefetch=False):
    a, vm = self._current, self.vm
    n = vm.mmu_invalidate_in_progress if vm.mmu_invalidate_in_progress and vm._range_start <= gfn < vm._range_end else 0
    s0 = a.spin if a is not None else 0
    r = retry(self, gfn, prefetch)
    spun = (a.spin - s0) if a is not None else 0
    if spun:
        k = str(min(n, 3))
        spins[k] += spun
        spins[k + " #"] += 1
    return r
T.Timeline.retry_fault = _retry
step = simpy.Environment.step
last = [0.0, 0]
def _step(self):
    step(self)
    if vms:
        n = vms[0].mmu_invalidate_in_progress
        if n != last[1]:
            open_ns[str(min(last[1], 3))] += self.now - last[0]
            last[0], last[1] = self.now, n
simpy.Environment.step = _step
t = time.process_time()
r = E.run(E.Config(platform=platform, policy=policy, memory=memory, vcpus=int(vcpus), workload=workload, **kw),
          seed=int(seed))
vc = [a for k, a in r.actors.items() if k.startswith("vcpu")]
print(json.dumps({"critical_path_ns": r.critical_path_ns, "cpu_s": round(time.process_time() - t, 2),
                  "stall_ns": sum(a["wait_ns"] for a in vc), "lock_wait_ns": sum(a["lock_wait_ns"] for a in vc),
                  "ipi_ns": sum(a["ipi_ns"] for a in vc), "spin_ns": sum(a["spin_ns"] for a in vc),
                  "waits": waits, "spins": spins, "open_ns": {k: int(v) for k, v in open_ns.items() if k != "0"}}))
"""


def run(a: argparse.Namespace, reference: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _RUN, a.platform, a.policy, a.workload, a.memory, str(a.vcpus),
                          str(a.seed), "1" if reference else "0"], capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return data


def _ms(ns: float) -> str:
    return f"{ns / 1e6:,.2f} ms"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platform", default="snp")
    ap.add_argument("--policy", default="fault-time")
    ap.add_argument("--workload", default="virtio")
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--vcpus", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=("model", "reference"))
    a = ap.parse_args(argv)
    cols = [("model", False), ("reference", True)]
    if a.only:
        cols = [c for c in cols if c[0] == a.only]
    res = {name: run(a, ref) for name, ref in cols}
    print(f"{a.platform} {a.policy} {a.workload}, {a.memory}, {a.vcpus} vCPUs, seed {a.seed}")
    print(f"{'':<34}" + "".join(f"{name:>24}" for name, _ in cols))

    def row(label: str, f: Callable[[dict[str, Any]], str]) -> None:
        print(f"{label:<34}" + "".join(f"{f(res[name]):>24}" for name, _ in cols))

    row("critical path", lambda r: _ms(r["critical_path_ns"]))
    row("vCPU stall", lambda r: _ms(r["stall_ns"]))
    row("  lock waits", lambda r: _ms(r["lock_wait_ns"]))
    row("  IPI stalls", lambda r: _ms(r["ipi_ns"]))
    row("  retry spins", lambda r: _ms(r["spin_ns"]))
    keys = sorted({k for r in res.values() for k in r["waits"] if not k.endswith(" #")})
    def counted(table: str, k: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r[table].get(k + ' #', 0):,} / {_ms(r[table].get(k, 0))}"

    def timed(k: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: _ms(r["open_ns"].get(k, 0))

    for k in keys:  # (every actor's: the VMM's answers to exits run on the vCPU threads)
        row(f"waits for {k}", counted("waits", k))
    for n in ("1", "2", "3"):
        many = f"{n}{'+' if n == '3' else ''} invalidation{'s' if n != '1' else ''}"
        row(f"spins, {many} open", counted("spins", n))
    for n in ("1", "2", "3"):
        row(f"open with {n}{'+' if n == '3' else ''} invalidation{'s' if n != '1' else ''}", timed(n))
    row("CPU", lambda r: f"{r['cpu_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
