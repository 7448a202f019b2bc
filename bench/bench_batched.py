"""The floors of the batched calls (issue 16): what ``vm.set_memory_attributes_many`` and
``vcpu.page_fault_many`` cost per element around the model's own work, against the same calls
one by one, on N random 4K pages of a 1 TiB SNP guest (``bench_fragmented.py``'s pages).

Run: ``python3 bench/bench_batched.py [N]`` (N defaults to 200,000). Times are the process's
CPU time (``time.process_time``), which other jobs on a shared machine inflate far less than
wall time; each row is the best of three rounds (one for faults), in ns per call:

- *refused*: every call fails the ioctl's argument checks (an unaligned size), so the batch never
  leaves the typed loop: the loop's own floor;
- *no-op*: every page already has the attributes asked for, so each call is the ioctl's
  short-circuit (one range-map query): the floor of a call that reaches the model;
- *fault on a mapped page*: the private fault on a page an earlier fault mapped;
- the four phases of ``bench_fragmented.py`` (to private, private fault, to shared, shared
  fault), each on a fresh VM per mode.

Each row checks what it computed (every errno, every fault's result).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pkvm  # noqa: E402
from bench_fragmented import gpas_for, pkvm_vm  # noqa: E402

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE


def best(fn: Callable[[], object], n: int, rounds: int = 3) -> float:
    t = min(_timed(fn) for _ in range(rounds))
    return t / n * 1e9


def _timed(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def fragmented(gl: list[int], gpas: np.ndarray, sizes: np.ndarray) -> list[tuple[str, float, float]]:
    """The four phases of bench_fragmented.py, one call each and batched, on fresh VMs."""
    n = len(gl)
    one, many = [], []
    vm, vcpu = pkvm_vm("snp")
    sma, pf = vm.set_memory_attributes, vcpu.page_fault
    def convert(attrs: int) -> None:
        for a in gl:
            sma(a, 4096, attrs)

    def fault(private: bool) -> None:
        for a in gl:  # each result dropped, as a caller of one call each would
            pf(a, private=private)

    for attrs, private in ((PRIVATE, True), (0, False)):
        one.append(_timed(lambda: convert(attrs)))
        one.append(_timed(lambda: fault(private)))
    st1 = vm.stats
    vm, vcpu = pkvm_vm("snp")
    for attrs, private in ((PRIVATE, True), (0, False)):
        many.append(_timed(lambda: vm.set_memory_attributes_many(gpas, sizes, attrs)))
        many.append(_timed(lambda: vcpu.page_fault_many(gpas, private=private)))
    assert vm.stats == st1 and st1["attr_stores"] == 2 * n, (vm.stats, st1)
    vm.check()
    names = ("fragmented: to private", "fragmented: private fault", "fragmented: to shared",
             "fragmented: shared fault")
    return [(name, a / n * 1e9, b / n * 1e9) for name, a, b in zip(names, one, many)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=200_000, help="pages (default 200,000)")
    n = ap.parse_args(argv).n
    gl = gpas_for(n)
    gpas = np.asarray(gl, dtype=np.uint64)
    sizes = np.full(n, 4096, dtype=np.uint64)
    vm, vcpu = pkvm_vm("snp")
    sma, pf = vm.set_memory_attributes, vcpu.page_fault

    def refused_loop() -> None:
        for a in gl:
            try:
                sma(a, 4097, PRIVATE)
            except pkvm.KvmError:
                pass

    def noop_loop() -> None:
        for a in gl:
            sma(a, 4096, 0)

    assert (vm.set_memory_attributes_many(gpas, sizes + 1, PRIVATE) == errno.EINVAL).all()
    assert not vm.set_memory_attributes_many(gpas, sizes, 0).any()
    rows = [
        ("refused (EINVAL)", best(refused_loop, n),
         best(lambda: vm.set_memory_attributes_many(gpas, sizes + 1, PRIVATE), n)),
        ("no-op (short-circuit)", best(noop_loop, n), best(lambda: vm.set_memory_attributes_many(gpas, sizes, 0), n)),
    ]
    assert vm.stats["attr_stores"] == 0
    vm.set_memory_attributes_many(gpas, sizes, PRIVATE)
    first = vcpu.page_fault_many(gpas, private=True)
    assert (first.ret == first.RET_NAMES.index("fixed")).all()

    def fault_loop() -> None:
        for a in gl:
            pf(a, private=True)

    rows.append(("fault on a mapped page", best(fault_loop, n, 1),
                 best(lambda: vcpu.page_fault_many(gpas, private=True), n, 1)))
    rows += fragmented(gl, gpas, sizes)
    print(f"N = {n:,} random 4K pages of a 1 TiB SNP guest; CPU ns per call, best of 3 (faults: 1)\n")
    print("| calls | one call each | batched | batched / one call each |")
    print("|---|---:|---:|---:|")
    for name, one, many in rows:
        print(f"| {name} | {one:,.0f} | {many:,.0f} | {many / one:.2f} |")
    print()


if __name__ == "__main__":
    main()
