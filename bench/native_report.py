"""RangeMap (from Python) against ``absl::btree_map`` (native C++), one run, one table.

Usage::

    PYTHONPATH=$PWD python3 bench/native_report.py          # full workloads (about a minute)
    PYTHONPATH=$PWD python3 bench/native_report.py --quick  # a tenth of the operations

(from a checkout: ``PYTHONPATH=$PWD`` makes the script import the checkout's build of pkvm, not
an installed one; the method section prints which one it measured).

Builds ``bench/native/absl_btree.cc`` with ``g++ -O2`` (Abseil's headers: ``apt-get install
libabsl-dev``), writes the W2/W3 operation sequences of ``rangemap_workloads.py`` (the same
seed) to a binary file, runs the native program on them, then times the same workloads on
:class:`pkvm.RangeMap` from Python (untimed setup, ``--rounds`` timed rounds, the median
round's thread CPU time, result checked against a model; the native program also reads its
thread's CPU clock). The native results are checked against the
same models. The table gives each workload's ns/op for both, the ratio RangeMap / absl, the
issue-16 target and whether it is met; then the RSS growth of the post-W2 state (from
``/proc/self/statm``, in a fresh process, not ``nbytes``).

Abseil is a benchmark-only reference (docs/performance.md), not a dependency of pkvm: without
a C++ compiler or its headers the script says so and exits 0 without a table.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import rangemap_workloads as wl

import pkvm
from report import method, parse_args

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "native", "absl_btree.cc")

TARGETS = {  # issue 16: RangeMap / absl native, in the same run
    "W3": 1.1,
    "W4-toggle": 0.6,
    "W4-lookup": 0.75,
}
RSS_TARGET = 26e6  # bytes, RangeMap's RSS growth after W2
ROWS = {
    # workload: (label, RangeMap impl)
    "W2-toggle": ("W2 toggle, per op", "core"),
    "W2-lookup": ("W2 lookup, per op", "core"),
    "W3": ("W3 assign + find_ne, per op", "core"),
    "W4-toggle": ("W4 toggle, bulk", "core-bulk"),
    "W4-lookup": ("W4 lookup, bulk", "core-bulk"),
}


class NativeUnavailable(Exception):
    """No C++ compiler or no Abseil headers: the native reference cannot be built."""


def build(out_dir: str) -> str:
    """Compile the native reference; its path, or :class:`NativeUnavailable`."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise NativeUnavailable("no C++ compiler (g++) on PATH")
    exe = os.path.join(out_dir, "absl_btree")
    try:
        done = subprocess.run(
            [cxx, "-O2", "-std=c++17", "-o", exe, SOURCE], capture_output=True, text=True
        )
    except OSError as exc:
        raise NativeUnavailable(f"cannot run the C++ compiler {cxx!r}: {exc}") from exc
    if done.returncode != 0:
        if "absl/container/btree_map.h" in done.stderr:
            raise NativeUnavailable(
                "Abseil headers not found (install them with: apt-get install libabsl-dev)"
            )
        raise NativeUnavailable(f"{cxx} failed:\n{done.stderr.strip()}")
    return exe


def build_capi(out_dir: str) -> Any:
    """Compile ``native/w3_capi.pyx`` against this checkout's ``pkvm/*.pxd``; the module, or
    :class:`NativeUnavailable` (no Cython or no compiler)."""
    try:
        from Cython.Build import cythonize
        from setuptools import Distribution, Extension
    except ImportError as exc:
        raise NativeUnavailable(f"Cython is not installed: {exc}") from exc
    root = os.path.dirname(os.path.dirname(os.path.abspath(pkvm.__file__)))
    src = os.path.join(out_dir, "w3_capi.pyx")
    shutil.copy(os.path.join(HERE, "native", "w3_capi.pyx"), src)
    ext = Extension("w3_capi", [src], extra_compile_args=["-O2"])
    dist = Distribution(
        {"ext_modules": cythonize([ext], include_path=[root], quiet=True, build_dir=out_dir)}
    )
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = out_dir
    cmd.build_temp = out_dir
    try:
        dist.run_command("build_ext")
    except Exception as exc:  # a compiler error surfaces as one of several distutils errors
        raise NativeUnavailable(f"building w3_capi failed: {exc}") from exc
    sys.path.insert(0, out_dir)
    try:
        import w3_capi
    finally:
        sys.path.remove(out_dir)
    return w3_capi


def capi_w3_ns(module: Any, data: wl.WorkloadData, rounds: int) -> float:
    """W3 through the C API: median thread CPU ns per step; checked against the model."""
    arrays = [np.asarray(x, dtype=np.uint64) for x in data.w3_lists]
    times = []
    uniform = -1
    for _ in range(rounds):
        m = pkvm.RangeMap()
        gc.collect()
        start = time.thread_time()
        uniform = module.w3(m, *arrays)
        times.append(time.thread_time() - start)
    want = data.w3_model[arrays[0].size][0]
    if uniform != want:
        raise AssertionError(f"W3 through the C API: {uniform} uniform answers, expected {want}")
    return statistics.median(times) / arrays[0].size * 1e9


def write_inputs(data: wl.WorkloadData, path: str) -> None:
    """The W2 and W3 sequences as the native program reads them (see absl_btree.cc)."""
    w3 = [np.asarray(x, dtype=np.uint64) for x in data.w3_lists]
    with open(path, "wb") as f:
        f.write(b"PKVMRMW1")
        np.array([data.w2_keys.size, w3[0].size], dtype=np.uint64).tofile(f)
        for arr in (data.w2_keys, data.w2_values, data.w2_lookups, *w3):
            np.ascontiguousarray(arr, dtype=np.uint64).tofile(f)


def run_native(exe: str, data: wl.WorkloadData, rounds: int, tmp: str) -> dict:
    """Run the native reference and check its answers against the Python-side models."""
    path = os.path.join(tmp, "workloads.bin")
    write_inputs(data, path)
    done = subprocess.run([exe, path, str(rounds)], capture_output=True, text=True, check=True)
    res = json.loads(done.stdout)
    n2, n3 = data.ops("W2-toggle", "core"), data.ops("W3", "core")
    uniform, runs = data.w3_model[n3]
    expected = {
        "w2_runs": len(data.w2_runs(n2)),
        "w4_runs": len(data.w2_runs(n2)),
        "w2_hits": data.w2_hits(n2),
        "w4_hits": data.w2_hits(n2),
        "w3_uniform": uniform,
        "w3_runs": len(runs),
    }
    for key, want in expected.items():
        if res[key] != want:
            raise AssertionError(f"absl native: {key} = {res[key]}, expected {want}")
    return res


def thread_time_case(case: wl.Case, rounds: int) -> float:
    """Median thread CPU seconds of ``rounds`` runs of ``case`` on fresh state; checks the last.

    Thread CPU time, as the native program measures: on a shared machine the time a process
    spends descheduled is not the map's (``report.time_case`` is the wall-clock twin).
    """
    times = []
    result = None
    for _ in range(rounds):
        args = case.setup()
        gc.collect()
        start = time.thread_time()
        result = case.run(*args)
        times.append(time.thread_time() - start)
        del args
    case.check(result)
    return statistics.median(times)


def rangemap_ns(data: wl.WorkloadData, rounds: int) -> dict[str, float]:
    out = {}
    for workload, (_, impl) in ROWS.items():
        case = wl.make_case(data, workload, impl)
        out[workload] = thread_time_case(case, rounds) / case.ops * 1e9
        print(f"  RangeMap {workload:10} {out[workload]:8.1f} ns/op", file=sys.stderr)
    return out


def table(ours: dict[str, float], native: dict, rss: dict) -> str:
    rows = [
        "| workload | RangeMap (Python) | absl::btree_map (native) | ratio | target | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for workload, (label, _) in ROWS.items():
        ratio = ours[workload] / native["ns"][workload]
        target = TARGETS.get(workload)
        tgt = f"≤ {target:g}×" if target else "—"
        met = "—" if target is None else ("met" if ratio <= target else "missed")
        rows.append(
            f"| {label} | {ours[workload]:,.1f} ns | {native['ns'][workload]:,.1f} ns "
            f"| {ratio:.2f}× | {tgt} | {met} |"
        )
    growth = rss["rss_growth"]
    rows.append(
        f"| RSS growth after W2 ({rss['runs']:,} runs) | {growth / 1e6:,.1f} MB "
        f"| {native['w2_rss_growth'] / 1e6:,.1f} MB | {growth / native['w2_rss_growth']:.2f}× "
        f"| ≤ 26 MB | {'met' if growth <= RSS_TARGET else 'missed'} |"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    scale = 0.1 if args.quick else 1.0
    data = wl.WorkloadData(scale=scale)
    with tempfile.TemporaryDirectory(prefix="pkvm-absl-") as tmp:
        try:
            exe = build(tmp)
        except NativeUnavailable as exc:
            print(f"native_report: skipped, the absl reference is unavailable: {exc}")
            return 0
        native = run_native(exe, data, args.rounds, tmp)
        try:
            capi = capi_w3_ns(build_capi(tmp), data, args.rounds)
        except NativeUnavailable as exc:
            print(f"native_report: no C-API row: {exc}", file=sys.stderr)
            capi = None
        ours = rangemap_ns(data, args.rounds)
        floor = thread_time_case(wl.make_case(data, "W3", "floor"), args.rounds)
        floor_ns = floor / data.ops("W3", "floor") * 1e9
    rss = wl.measure_w2_memory("core", scale)
    print("### Method\n")
    for line in method(args.rounds, scale).splitlines():
        if "SortedRangeMap" in line:
            line = line.split("; SortedRangeMap")[0]
        print(line.replace("(time.perf_counter)", "(thread CPU time)"))
    print(
        "- absl::btree_map<uint64_t, {end, value}> (Abseil "
        f"{_absl_version()}), g++ -O2, as a coalesced run map with RangeMap's semantics; "
        "per-op workloads in array order; bulk workloads: "
        "assign_many's and get_many's algorithms natively (radix sort of the keys, then a merge of "
        "the stored runs with the sorted ranges into a map built by appending at its end / a "
        "finger walk of the sorted keys; sort time included); every time is the thread's CPU "
        "time (CLOCK_THREAD_CPUTIME_ID, time.thread_time)"
    )
    print(f"- pkvm imported from {os.path.dirname(os.path.abspath(pkvm.__file__))}")
    print("\n### RangeMap against absl::btree_map, same run\n")
    print(table(ours, native, rss))
    print("\n### W3 split: the core and the Python calls\n")
    print("| W3, per step | ns | x absl native |\n|---|---:|---:|")
    absl = native["ns"]["W3"]
    rows = [("RangeMap from Python (the table above)", ours["W3"])]
    if capi is not None:
        rows.append(("RangeMap through the C API (`pkvm.core`), no Python", capi))
    rows.append(("call floor: the same Python loop, O(1) calls", floor_ns))
    rows.append(("absl::btree_map, native", absl))
    for label, ns in rows:
        print(f"| {label} | {ns:,.1f} | {ns / absl:.2f}× |")
    return 0


def _absl_version() -> str:
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libabsl-dev"], capture_output=True, text=True
        )
    except OSError:
        return "unknown version"
    return done.stdout.strip() or "unknown version"


if __name__ == "__main__":
    sys.exit(main())
