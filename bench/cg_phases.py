"""Instructions per operation of ``bench_fragmented``'s four phases, for ``callgrind``.

Runs the first K phases (to private, private fault, to shared, shared fault) over N random 4K
pages of a 1 TiB guest, one call each or as batched calls (``--batched``). Instructions per
operation of phase K are the whole-program totals of runs K and K - 1, differenced, over N::

    for k in 0 1 2 3 4; do
      PYTHONHASHSEED=0 OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD valgrind --tool=callgrind \\
          --callgrind-out-file=cg.$k python3.11 bench/cg_phases.py snp 20000 $k --batched
    done

(``python3.11`` the interpreter binary itself, not a shim: valgrind follows the real one.)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fragmented as bf  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("platform", choices=("snp", "sw_protected"))
    ap.add_argument("n", type=int, help="random pages")
    ap.add_argument("k", type=int, choices=range(5), help="phases to run (0-4)")
    ap.add_argument("--batched", action="store_true", help="each phase as one batched call")
    a = ap.parse_args(argv)
    gpas = bf.gpas_for(a.n)
    vm, vcpu = bf.pkvm_vm(a.platform)
    if not a.batched:
        bf.time_phases(vm.set_memory_attributes, vcpu.page_fault, gpas, phases=a.k)
        return
    arr = np.asarray(gpas, dtype=np.uint64)
    sizes = np.full(a.n, 4096, dtype=np.uint64)
    for i in range(a.k):
        if i % 2 == 0:  # to private, to shared
            vm.set_memory_attributes_many(arr, sizes, np.full(a.n, bf.PRIVATE if i == 0 else 0, dtype=np.uint64))
        else:  # private fault, shared fault
            vcpu.page_fault_many(arr, private=i == 1)


if __name__ == "__main__":
    main()
