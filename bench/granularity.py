"""How the multi-vCPU timeline figures depend on ``batch_pages``, against the page-level reference.

On the concurrent timeline a batch of pages runs as one stretch of work, where the kernel
takes ``cpa_lock`` and the TDX S-EPT once per page (per CPA call, per AUG). Under
``pagewise_locks="interleaved"`` (the default) a batch's page holds are spread over its window
and settled against the other vCPUs' (the lock's capacity and each acquisition's queueing);
under ``pagewise_locks="batch"`` a batch holds the lock once for all its pages and others
queue behind the whole hold, which at ``batch_pages=1`` is the page-level reference: every
hold stands for one kernel acquisition (docs/timeline.md, "Locks the kernel takes page by
page"). This prints, per scenario, one row per ``batch_pages`` value: critical path, vCPU
stall, ``cpa_lock`` wait / waits / acquisitions, ``tdx_sept`` wait, fault latency p99 and max,
and the run's wall time.

Run: ``python3 bench/granularity.py`` (1G, 8 vCPUs, batch_pages 16384,4096,512,64,8,1, the
default model; several minutes, batch_pages 1 being the slowest), and the reference:
``python3 bench/granularity.py --batch-pages 1 --set pagewise_locks=batch``. Not part of the
test run. Options: ``--scenarios snp-eager-post,tdx-boot`` (default: all of them),
``--batch-pages 16384,1``, ``--memory 512M``, ``--vcpus 4``, ``--seed 2``, and ``--set
KEY=VALUE`` (repeatable), an extra ``pkvm.experiments.Config`` field for every run (the value
read as a Python literal, else as a string), e.g. ``--set host_cpus=4``.

Scenarios: SNP ``boot`` under ``eager-post``, ``fault-time``, ``eager-locked``; TDX ``boot``
(its default policy); SNP ``migration`` under ``eager-post`` with 3 vCPUs (its own count,
whatever ``--vcpus`` says). Run only when named: SNP ``mixed`` under ``eager-post`` and
``eager-locked`` (``snp-mixed-eager-post``, ``snp-mixed-eager-locked``): boot and migration
convert no range through ``KVM_SET_MEMORY_ATTRIBUTES`` here, so the eager presets' own ops
(and ``eager-locked`` boot's figures are ``eager-post`` boot's) show only in ``mixed``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import time
from typing import Any

from pkvm import experiments as E
from pkvm.sim.timeline import check_batch_pages

#: name -> (Config fields, vCPUs or None for --vcpus)
SCENARIOS: dict[str, tuple[dict[str, Any], int | None]] = {
    "snp-eager-post": ({"platform": "snp", "workload": "boot", "policy": "eager-post"}, None),
    "snp-fault-time": ({"platform": "snp", "workload": "boot", "policy": "fault-time"}, None),
    "snp-eager-locked": ({"platform": "snp", "workload": "boot", "policy": "eager-locked"}, None),
    "tdx-boot": ({"platform": "tdx", "workload": "boot"}, None),
    "snp-migration": ({"platform": "snp", "workload": "migration", "policy": "eager-post"}, 3),
    # not run unless named: boot converts no range through KVM_SET_MEMORY_ATTRIBUTES, so the
    # eager ops themselves (eager-locked's under mmu_lock, eager-post's after it) run only here
    "snp-mixed-eager-post": ({"platform": "snp", "workload": "mixed", "policy": "eager-post"}, None),
    "snp-mixed-eager-locked": ({"platform": "snp", "workload": "mixed", "policy": "eager-locked"}, None),
}
#: the scenarios run when --scenarios is not given
DEFAULT_SCENARIOS = ("snp-eager-post", "snp-fault-time", "snp-eager-locked", "tdx-boot", "snp-migration")

COLUMNS = ("batch_pages", "crit ms", "stall ms", "cpa wait ms", "cpa waits", "cpa acq",
           "sept wait ms", "fault p99 us", "fault max us", "wall s")


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def row(cfg: E.Config, seed: int) -> tuple[str, ...]:
    """One table row: ``cfg`` run once on the timeline."""
    t = time.perf_counter()
    r = E.run(cfg, seed=seed)
    wall = time.perf_counter() - t
    cpa = r.locks.get("cpa_lock", {})
    sept = r.locks.get("tdx_sept", {})
    fault = r.latency_ns.get("fault", {})
    return (str(cfg.batch_pages), _ms(r.critical_path_ns), _ms(r.vcpu_stall_ns),
            _ms(cpa.get("wait_ns", 0)), str(cpa.get("waits", 0)), str(cpa.get("acquisitions", 0)),
            _ms(sept.get("wait_ns", 0)), f"{fault.get('p99', 0) / 1e3:.2f}",
            f"{fault.get('max', 0) / 1e3:.2f}", f"{wall:.1f}")


def _print_row(cells: tuple[str, ...]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def _fail(msg: str) -> None:
    print(f"granularity.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(E.Config)}
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            _fail(f"--set {item!r}: expected KEY=VALUE")
        if key not in fields:
            _fail(f"--set {key}: not a Config field (one of {', '.join(sorted(fields))})")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                    help=f"comma-separated, from {', '.join(SCENARIOS)} (default: {', '.join(DEFAULT_SCENARIOS)})")
    ap.add_argument("--batch-pages", default="16384,4096,512,64,8,1",
                    help="comma-separated powers of two (default 16384,4096,512,64,8,1)")
    ap.add_argument("--memory", default="1G", help="guest memory (default 1G)")
    ap.add_argument("--vcpus", type=int, default=8, help="vCPUs (default 8; migration runs 3)")
    ap.add_argument("--seed", type=int, default=1, help="seed (default 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra Config field for every run (repeatable)")
    args = ap.parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    for n in names:
        if n not in SCENARIOS:
            _fail(f"--scenarios {n!r}: one of {', '.join(SCENARIOS)}")
    if not names:
        _fail("--scenarios: name at least one scenario")
    try:
        bps = [check_batch_pages(int(b), "--batch-pages") for b in args.batch_pages.split(",")]
    except ValueError as exc:
        _fail(str(exc) if "power of two" in str(exc) else
              f"--batch-pages {args.batch_pages!r}: comma-separated powers of two from 1 to 2**30")
    if args.vcpus < 2:
        _fail(f"--vcpus {args.vcpus}: at least 2 (one vCPU never contends)")
    extra = _parse_sets(args.set)
    for name in names:
        fields, vcpus = SCENARIOS[name]
        kw = {"memory": args.memory, "vcpus": vcpus or args.vcpus, **fields, **extra}
        try:
            E.Config(**{**kw, "batch_pages": bps[0]})
        except (TypeError, ValueError) as exc:
            _fail(f"{name}: {exc}")
        print(f"\n### {name}: {', '.join(f'{k}={v}' for k, v in kw.items())}, seed {args.seed}\n", flush=True)
        _print_row(COLUMNS)
        _print_row(tuple("---" for _ in COLUMNS))
        for bp in bps:
            _print_row(row(E.Config(**{**kw, "batch_pages": bp}), args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
