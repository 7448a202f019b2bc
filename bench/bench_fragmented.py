"""Fragmented memory (issue 16): N random 4K pages of a 1 TiB guest, each converted to private,
faulted private, converted back to shared and faulted shared, through the public API, in four
timed phases; the same script against the naive dict-per-GFN model in ``bench/dict_baseline.py``
in the same process, so the ratio is what to read (the machine is shared and noisy).

Run: ``python3 bench/bench_fragmented.py [N] [--platforms snp,sw_protected] [--order same]
[--repeat R]``
(N defaults to 10**6; about a minute per platform at that size). Prints a table of ns per operation, the
ratio pkvm / baseline per phase (lower is better; the issue's target is ≤ 0.5), the batched
calls where the VM offers them, and the process's RSS growth per fragmented page.

Each phase checks what it computed (every fault fixed, counters equal to N), so a fast wrong
answer fails.

``--order same`` (the default, the issue's script) visits the pages in one random order in every
phase. A dict stores its entries in insertion order, so there the later phases walk the dicts'
entry arrays front to back, which the baseline gains from and a key-ordered tree cannot.
``--order shuffled`` gives each phase its own random order (seeded), so neither model gains
from the order the phase before stored the pages in. ``--order sorted`` visits the same pages in
address order in every phase: not the issue's script, but the bound on what locality gives a
key-ordered model (each lookup lands next to the one before), and what a caller who does not
need the random order gains by sorting its batch (docs/performance.md, "Visiting order").
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pkvm  # noqa: E402
from dict_baseline import DictVM  # noqa: E402

TiB = 1 << 40
PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
PHASES = ("to private", "private fault", "to shared", "shared fault")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gpas_for(n: int, seed: int = 16) -> list[int]:
    """N distinct random 4K-aligned guest addresses of a 1 TiB guest, in random order."""
    rng = np.random.default_rng(seed)
    gfns = rng.choice(TiB >> 12, size=n, replace=False)
    return [int(g) << 12 for g in gfns]


def pkvm_vm(platform: str) -> tuple[pkvm.VM, pkvm.Vcpu]:
    vm = pkvm.VM(platform)
    gmem = vm.create_guest_memfd(TiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, TiB, 1 << 44, gmem, 0)
    return vm, vm.create_vcpu()


def rss_per_page(platform: str, n: int) -> float:
    """RSS growth per fragmented private page, in a fresh process (a process that already ran
    other phases reuses freed memory): N random pages converted to private and faulted."""
    code = ("import sys; sys.path.insert(0, %r); import bench_fragmented as b; "
            "print(b.run_pkvm(%r, b.gpas_for(%d), stop_after_private=True)[1])"
            % (os.path.dirname(os.path.abspath(__file__)), platform, n))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / n


def phase_orders(gpas: list[int], order: str = "same", seed: int = 21) -> list[list[int]]:
    """The pages each of the four phases visits, in visiting order: ``gpas`` for every phase
    (``"same"``), ``gpas`` for the first and a seeded shuffle of it for each other phase
    (``"shuffled"``), or ``gpas`` sorted by address for every phase (``"sorted"``)."""
    if order == "same":
        return [gpas] * len(PHASES)
    if order == "sorted":
        return [sorted(gpas)] * len(PHASES)
    if order != "shuffled":
        raise ValueError(f"order must be 'same', 'shuffled' or 'sorted', not {order!r}")
    rng = np.random.default_rng(seed)
    return [gpas] + [[gpas[j] for j in rng.permutation(len(gpas))] for _ in PHASES[1:]]


def time_phases(sma, pf, gpas: list[int] | list[list[int]], clock=time.perf_counter, phases: int = 4,
                after_private=None) -> list[float]:
    """Run the first ``phases`` of the four phases over ``gpas`` through ``sma``
    (``set_memory_attributes``) and ``pf`` (``page_fault``), one call per page; returns the
    ``clock`` seconds of each and checks each fault phase's last result. ``gpas`` is one list
    of addresses for every phase or, from :func:`phase_orders`, one list per phase.
    ``after_private`` is called, untimed, after the private faults."""
    orders = gpas if gpas and isinstance(gpas[0], list) else [gpas] * len(PHASES)
    times = []
    for i, (attrs, private) in enumerate(((PRIVATE, True), (0, False))):
        if 2 * i >= phases:
            break
        t = clock()
        for a in orders[2 * i]:
            sma(a, 4096, attrs)
        times.append(clock() - t)
        if 2 * i + 1 >= phases:
            break
        t = clock()
        for a in orders[2 * i + 1]:
            r = pf(a, private=private)
        times.append(clock() - t)
        ret = r.ret if hasattr(r, "ret") else r[0]
        # a shared fault inside a 2M shared mapping an earlier shared fault installed is spurious
        assert ret == "fixed" or (not private and ret == "spurious"), r
        if private and after_private is not None:
            after_private()
    return times


def run_pkvm(platform: str, gpas: list[int] | list[list[int]],
             stop_after_private: bool = False) -> tuple[list[float], int]:
    """The four phases one call at a time (``gpas`` as :func:`time_phases` takes it); returns
    (seconds per phase, RSS growth in bytes of the state after the private faults)."""
    gc.collect()
    rss0 = rss_bytes()
    vm, vcpu = pkvm_vm(platform)
    grown = []
    times = time_phases(vm.set_memory_attributes, vcpu.page_fault, gpas, phases=2 if stop_after_private else 4,
                        after_private=lambda: grown.append(rss_bytes() - rss0))
    if stop_after_private:
        return times, grown[0]
    n = len(gpas[0]) if isinstance(gpas[0], list) else len(gpas)
    st = vm.stats
    assert st["attr_stores"] == 2 * n and st["pf_fixed"] + st["pf_spurious"] == 2 * n, dict(st)
    vm.check()
    return times, grown[0]


def run_pkvm_batched(platform: str, orders: list[list[int]], clock=time.perf_counter) -> list[float] | None:
    """The same four phases as four batched calls (``set_memory_attributes_many`` and
    ``page_fault_many``; ``orders`` from :func:`phase_orders`), each timed by ``clock``, or
    None where the VM has no batched calls."""
    vm, vcpu = pkvm_vm(platform)
    if not hasattr(vm, "set_memory_attributes_many") or not hasattr(vcpu, "page_fault_many"):
        return None
    n = len(orders[0])
    a = [np.asarray(o, dtype=np.uint64) for o in orders]
    sizes = np.full(n, 4096, dtype=np.uint64)
    times = []
    for i, (attrs, private) in enumerate(((PRIVATE, True), (0, False))):
        t = clock()
        vm.set_memory_attributes_many(a[2 * i], sizes, np.full(n, attrs, dtype=np.uint64))
        times.append(clock() - t)
        t = clock()
        vcpu.page_fault_many(a[2 * i + 1], private=private)
        times.append(clock() - t)
    st = vm.stats
    assert st["attr_stores"] == 2 * n and st["pf_fixed"] + st["pf_spurious"] == 2 * n, dict(st)
    vm.check()
    return times


def run_dict(platform: str, gpas: list[int] | list[list[int]], clock=time.perf_counter) -> list[float]:
    vm = DictVM(TiB, snp=platform == "snp")
    times = time_phases(vm.set_memory_attributes, vm.page_fault, gpas, clock)
    n = len(gpas[0]) if isinstance(gpas[0], list) else len(gpas)
    assert vm.stats["attr_stores"] == 2 * n and vm.stats["pf_fixed"] == 2 * n
    return times


def _phase_min(runs: list[list[float]]) -> list[float]:
    """Each phase's shortest time over several runs of the same phases."""
    return [min(ts) for ts in zip(*runs)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=10**6, help="pages (default 10**6)")
    ap.add_argument("--platforms", default="snp,sw_protected")
    ap.add_argument("--order", choices=("same", "shuffled", "sorted"), default="same",
                    help="the pages' order in each phase: one random order for all (default), "
                         "each phase its own, or address order for all")
    ap.add_argument("--repeat", type=int, default=1, metavar="R",
                    help="rounds of the three models, in turn; each phase's time is its minimum "
                         "over the rounds (default 1: the issue's script)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, not {args.repeat}")
    gpas = gpas_for(args.n)
    n = len(gpas)
    orders = phase_orders(gpas, args.order)
    best = "" if args.repeat == 1 else f", the minimum of {args.repeat} rounds"
    print(f"N = {n:,} random 4K pages of a 1 TiB guest, phases in {args.order} order; ns per "
          f"operation{best} (ratio to the dict baseline in this run)\n")
    print("| platform | model | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---:|" * len(PHASES))
    for platform in args.platforms.split(","):
        rounds = []
        for _ in range(args.repeat):
            rounds.append((run_dict(platform, orders), run_pkvm(platform, orders)[0],
                           run_pkvm_batched(platform, orders)))
        base, one = (_phase_min([r[i] for r in rounds]) for i in (0, 1))
        batched = None if rounds[0][2] is None else _phase_min([r[2] for r in rounds])
        rows = [("dict-per-GFN baseline", base), ("pkvm, one call each", one)]
        if batched is not None:
            rows.append(("pkvm, batched calls", batched))
        for name, ts in rows:
            cells = []
            for t, b in zip(ts, base):
                c = f"{t / n * 1e9:,.0f}"
                if ts is not base:
                    c += f" ({t / b:.2f}×)"
                cells.append(c)
            print(f"| {platform} | {name} | " + " | ".join(cells) + " |")
        print(f"| {platform} | pkvm RSS growth per private fragmented page (fresh process) | "
              f"{rss_per_page(platform, n):.1f} B | | | |")
    print()


if __name__ == "__main__":
    main()
