"""Scale benchmark of the SEV-SNP platform (issue 4): a 1 TiB SNP guest accepted lazily in 2M
chunks, half of it converted to shared and back, under every ``Policy.rmp_update``.

Run: ``python bench/bench_snp.py`` (a table: wall time, modeled time, counts, RMP bytes, the
process's max RSS so far) or ``python -m pytest bench/bench_snp.py --benchmark-only``. Each run asserts its
counts, so a fast wrong answer fails.
"""

import resource
import time

import pytest

import pkvm

TiB, GiB = 1 << 40, 1 << 30
POLICIES = ("fault-time", "eager-post", "eager-locked", "eager-split")


def run(policy, size=TiB, directmap="split-4k"):
    """Accept ``size`` bytes in 2M PSC/PVALIDATE chunks, convert the first half to shared and
    touch it, convert it back to private; returns the VM."""
    pol = pkvm.Policy.preset("6.19").replace(rmp_update=policy, directmap=directmap)
    vm = pkvm.VM("snp", policy=pol, shared_backing="4k")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, size)
    g = pkvm.Guest(vm, vmm)
    assert g.accept(0, size)
    half = size // 2
    assert g.convert(0, half, private=False)
    assert g.touch(0, half, private=False, write=True).ret == "done"
    assert g.convert(0, half, private=True)
    assert g.touch(0, size, private=True, write=True).ret == "done"
    pages = size >> 12
    st = vm.stats
    # accept: one 4K RMPUPDATE per page at the first private fault; to shared: one back per page
    # (hole punch, or the eager ioctl); back to private: one per page again.
    assert st["rmpupdate"] == pages + half // 4096 * 2
    assert st["pvalidate"] == pages + half // 4096 * 2
    return vm


@pytest.mark.parametrize("policy", POLICIES)
def test_tib_snp_guest(benchmark, policy):
    vm = benchmark.pedantic(run, args=(policy,), rounds=3, iterations=1)
    vm.check()


def main():
    print("| policy | directmap | wall s | modeled s | RMPUPDATEs | PVALIDATEs | PSC requests | "
          "direct-map splits | sleep_in_atomic | RMP bytes | max RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in (GiB, TiB):
        for policy in POLICIES:
            for dm in ("split-4k", "unmap-restore"):
                t = time.perf_counter()
                vm = run(policy, size, dm)
                wall = time.perf_counter() - t
                vm.check()
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                st = vm.stats
                print(f"| {policy} ({size // GiB} GiB) | {dm} | {wall:.2f} | {vm.modeled_ns / 1e9:.1f} | "
                      f"{st['rmpupdate']:,} | {st['pvalidate']:,} | {st['psc_requests']:,} | "
                      f"{st['directmap_splits']:,} | {st['sleep_in_atomic']:,} | {vm.rmp.nbytes:,} | "
                      f"{peak / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
