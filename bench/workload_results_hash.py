"""Hash every measured number of the workloads' results, to show that a speed-up of the
simulator changed none of them.

Runs every workload on every platform, under each of the platform's default policies
(``pkvm.experiments.PLATFORM_POLICIES``), with 1 and 3 vCPUs, at 1 GiB; and ``balloon`` and
``mixed`` again at 64 GiB. For each run it hashes :meth:`pkvm.experiments.Result.metrics`
with ``wall=False`` (counters, modeled ns and its breakdowns by actor and operation, phases,
the direct map, critical path, actors, lock statistics, latency distributions, races) and
the result's notes. ``replay`` replays a trace the same configuration wrote of a short
``mixed`` run (``ops=50``); a run that fails (a multi-vCPU TDX replay can) hashes its error.

    python3 bench/workload_results_hash.py                  # print one line per run + the total
    python3 bench/workload_results_hash.py --out before.txt # also write the lines to a file
    python3 bench/workload_results_hash.py --quick          # 1 GiB only (no 64 GiB runs)
    python3 bench/workload_results_hash.py --workloads balloon,mixed
    python3 bench/workload_results_hash.py --quick --memory 16G   # another size
    python3 bench/workload_results_hash.py --quick --presets all  # every policy preset; the
                                                                  # refused ones hash their error
    python3 bench/workload_results_hash.py --no-exit-replay       # PSC / MapGPA exits one by one

Compare two trees' outputs with ``diff`` (``PYTHONPATH=<tree>`` selects the tree): identical files
mean identical results. ``--no-exit-replay`` compares within one tree: the exit replay of
``pkvm/actors/_steps.py`` against the per-exit path it stands for. Not part of the test run
(several minutes); ``tests/test_workload_results.py`` is its fast sibling.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pkvm
from pkvm import experiments as E
from pkvm.errors import KvmError

PLATFORMS = ("snp", "tdx", "sw_protected")
VCPUS = (1, 3)


def result_digest(r: E.Result) -> str:
    """sha256 (16 hex digits) of everything ``r`` measured except the simulator's own time."""
    blob = json.dumps({"metrics": r.metrics(wall=False), "notes": list(r.notes)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def policies(plat: str, presets: str) -> tuple[str, ...]:
    """The policies a run matrix uses: the platform's defaults, or every preset."""
    return tuple(pkvm.Policy.presets()) if presets == "all" else tuple(E.PLATFORM_POLICIES[plat])


def cases(quick: bool, only: list[str] | None = None, memory: str = "1G",
          presets: str = "defaults") -> list[tuple[str, str, str, int, str]]:
    """``(workload, platform, policy, vcpus, memory)`` of every run (of the ``only`` workloads)."""
    out = []
    for wl in E._workloads.WORKLOADS:
        for plat in PLATFORMS:
            for pol in policies(plat, presets):
                for n in VCPUS:
                    out.append((wl, plat, pol, n, memory))
    if not quick:
        for wl in ("balloon", "mixed"):
            for plat in PLATFORMS:
                for pol in policies(plat, presets):
                    for n in VCPUS:
                        out.append((wl, plat, pol, n, "64G"))
    return [c for c in out if only is None or c[0] in only]


@contextlib.contextmanager
def no_exit_replay() -> Iterator[None]:
    """Every SNP page-state-change request and TDX MapGPA chunk answered on its own."""
    import pkvm.platforms._snp_flows as snp
    import pkvm.platforms._tdx_flows as tdx
    saved = snp.replayable, tdx.replayable
    snp.replayable = tdx.replayable = lambda vm: False  # type: ignore[assignment]
    try:
        yield
    finally:
        snp.replayable, tdx.replayable = saved


def run_case(wl: str, plat: str, pol: str, n: int, mem: str, tmp: str) -> E.Result:
    if wl != "replay":
        return E.run(E.Config(platform=plat, memory=mem, workload=wl, policy=pol, vcpus=n))
    path = os.path.join(tmp, f"{plat}-{pol}-{n}-{mem}.trace")
    E.run(E.Config(platform=plat, memory=mem, workload="mixed", options={"ops": 50}, policy=pol, vcpus=n,
                   trace=path))
    try:
        return E.run(E.Config(platform=plat, memory=mem, workload="replay", options={"file": path}, policy=pol,
                              vcpus=n))
    finally:
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the lines to this file")
    ap.add_argument("--quick", action="store_true", help="1 GiB only")
    ap.add_argument("--workloads", help="comma-separated workloads to run (default: all)")
    ap.add_argument("--memory", default="1G", help="guest memory of the main matrix (default 1G)")
    ap.add_argument("--presets", choices=("defaults", "all"), default="defaults",
                    help="each platform's default policies, or every policy preset")
    ap.add_argument("--no-exit-replay", action="store_true",
                    help="answer PSC requests and MapGPA chunks one exit at a time")
    args = ap.parse_args(argv)
    only = args.workloads.split(",") if args.workloads else None
    unknown = sorted(set(only or ()) - set(E._workloads.WORKLOADS))
    if unknown:
        ap.error(f"--workloads: unknown workload {unknown[0]!r} (known: {', '.join(E._workloads.WORKLOADS)})")
    lines: list[str] = []
    total = hashlib.sha256()
    t0 = time.perf_counter()
    ctx = no_exit_replay() if args.no_exit_replay else contextlib.nullcontext()
    with ctx, tempfile.TemporaryDirectory() as tmp:
        for wl, plat, pol, n, mem in cases(args.quick, only, args.memory, args.presets):
            t = time.perf_counter()
            try:
                digest = result_digest(run_case(wl, plat, pol, n, mem, tmp))
            except (KvmError, ValueError) as exc:  # a refused run is a result too: its message,
                # without the temporary trace's directory (a replay's error names its file)
                msg = f"{type(exc).__name__}: {exc}".replace(tmp + os.sep, "")
                digest = "error " + hashlib.sha256(msg.encode()).hexdigest()[:16]
            line = f"{wl} {plat} {pol} vcpus={n} {mem} {digest}"
            total.update(line.encode())
            lines.append(line)
            print(f"{line}  ({time.perf_counter() - t:.2f} s)", flush=True)
    summary = f"total {total.hexdigest()[:16]} over {len(lines)} runs"
    print(f"{summary}  ({time.perf_counter() - t0:.1f} s)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines + [summary]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
