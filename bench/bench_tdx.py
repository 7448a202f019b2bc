"""Scale benchmarks of the TDX platform (issue 5).

* ``boot``: a 1 TiB TD as QEMU and a Linux guest bring it up: all RAM private, a 4 MiB measured
  image (``KVM_TDX_INIT_MEM_REGION``), finalize, then lazy acceptance of everything else
  (``tdx_accept_memory``: 1G / 2M / 4K attempts; 2**28 EPT violations, PAGE.AUGs and ACCEPTs).
* ``convert``: the same TD with its RAM left shared by the VMM; the guest converts all of it to
  private (MapGPA: 524,288 2 MiB exits answered by ``pkvm.Vmm``) and accepts it.
* ``to-shared``: a fresh 1 TiB TD (private, nothing accepted) converted to shared by the guest
  (MapGPA: 524,288 exits, answered as stretches of one 1G chunk each, ``pkvm.actors._steps``),
  and the same at 16 GiB with the replay off, which must give every figure the replay gives.
* ``round-trip``: 64 GiB of an accepted TD converted to shared (removal sequence + hole punch
  per page, 32,768 exits) and back.
* ``memory``: the bytes of every range map after ``boot`` at 1 GiB and at 1 TiB (equal: the
  state is the same few runs).
* ``reference``: the lazy acceptance of 64 MiB by the per-gfn :class:`ReferenceTdx`, TDCALL by
  TDCALL, against pkvm (same counters).

Run: ``python bench/bench_tdx.py`` (a table) or
``python -m pytest bench/bench_tdx.py --benchmark-only``. Every run asserts its counts, so a
fast wrong answer fails.
"""

import resource
import time

import pytest

import pkvm
from pkvm.testing.reference_tdx import ReferenceTdx

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
IMAGE = 4 * MiB


def _td(size, shared=False):
    vm = pkvm.VM("tdx", nr_vcpus=8)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, size)
    vmm.launch([(0, IMAGE, True)])
    if shared:
        vm.set_memory_attributes(IMAGE, size - IMAGE, 0)
    return vm, vmm, pkvm.Guest(vm, vmm)


def boot(size=TiB):
    """Lazy acceptance of everything but the image; returns the VM."""
    vm, vmm, guest = _td(size)
    assert guest.accept(IMAGE, size - IMAGE)
    pages = (size - IMAGE) >> 12
    st = vm.stats
    assert st["tdx_accepts_4k"] == st["seamcall_aug"] == st["pf_fixed"] == pages
    assert st["seamcall_add"] == IMAGE >> 12 and st["seamcall_mr_extend"] == (IMAGE >> 12) * 16
    assert len(vm.sept.leaves) == 1
    return vm


def convert(size=TiB):
    """The guest converts its shared RAM to private (MapGPA) and accepts it."""
    vm, vmm, guest = _td(size, shared=True)
    assert guest.convert(IMAGE, size - IMAGE, private=True)
    st = vm.stats
    assert st["hypercall_exits"] == (size - IMAGE) >> 21 and st["tdx_accepts_4k"] == (size - IMAGE) >> 12
    return vm


def to_shared(size=TiB, replay=True):
    """The guest converts all of a fresh TD to shared (MapGPA, one exit per 2 MiB); returns
    the VM and what must not depend on the replay."""
    vm = pkvm.VM("tdx", nr_vcpus=8)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, size)
    vmm.launch()
    guest = pkvm.Guest(vm, vmm)
    guest.flows.compress_exits = replay
    assert guest.convert(0, size, private=False)
    assert vm.stats["hypercall_exits"] == size >> 21 and vmm.conversions == size >> 21
    return vm, (vm.modeled_ns, vm.cost_by_actor(), dict(vm.stats), vm.mmu_lock_ns, vm.attr_ioctls,
                vmm.gfns_converted, vm._attrs.ranges())


def round_trip(size=64 * GiB):
    """Convert ``size`` of an accepted TD to shared and back to private."""
    vm, vmm, guest = _td(size + IMAGE)
    assert guest.accept(IMAGE, size)
    t = time.perf_counter()
    assert guest.convert(IMAGE, size, private=False)
    t_shared = time.perf_counter() - t
    t = time.perf_counter()
    assert guest.convert(IMAGE, size, private=True)
    t_private = time.perf_counter() - t
    st = vm.stats
    assert st["seamcall_remove"] == size >> 12 and st["gmem_pages_freed"] == size >> 12
    return vm, t_shared, t_private


def state_bytes(vm):
    """Bytes of C memory held by every range map of the VM."""
    maps = [vm._attrs, vm.mmu.sptes, vm.sept.leaves, vm.sept.guest_inhibit, vm.hostmem._used, vm._shared._map,
            *vm.sept.tables[1:], *(g.folios for g in vm._gmems), *(g.bindings for g in vm._gmems)]
    for slot in vm.memslots:
        maps += slot.lpage.maps[2:]
    return sum(m.nbytes for m in maps)


def reference_accept(size=64 * MiB):
    """Per-gfn reference vs pkvm on the same lazy acceptance; returns (t_ref, t_core)."""
    ref = ReferenceTdx(nr_vcpus=8)
    rg = ref.create_guest_memfd(size)
    ref.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, size, 1 << 40, rg)
    ref.set_memory_attributes(0, size, PRIVATE)
    ref.create_vcpu()
    ref.finalize()
    t = time.perf_counter()
    assert ref.accept_memory(0, size)
    t_ref = time.perf_counter() - t
    vm = pkvm.VM("tdx", nr_vcpus=8)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, size)
    vmm.launch()
    t = time.perf_counter()
    assert pkvm.Guest(vm, vmm).accept(0, size)
    t_core = time.perf_counter() - t
    assert vm.stats == ref.stats and vm.modeled_ns == ref.modeled_ns
    return t_ref, t_core


# -- pytest-benchmark -------------------------------------------------------------------------


@pytest.mark.benchmark(group="scenario")
def test_boot_1tib(benchmark):
    """A 1 TiB TD booted with lazy acceptance of all of its memory."""
    benchmark.pedantic(boot, rounds=3, iterations=1)


@pytest.mark.benchmark(group="scenario")
def test_convert_1tib_to_private(benchmark):
    """A 1 TiB TD's shared RAM converted to private by the guest (524,288 MapGPA exits) and accepted."""
    benchmark.pedantic(convert, rounds=1, iterations=1)


@pytest.mark.benchmark(group="scenario")
def test_to_shared_1tib(benchmark):
    """A fresh 1 TiB TD converted to shared by the guest (524,288 MapGPA exits)."""
    benchmark.pedantic(to_shared, rounds=3, iterations=1)


@pytest.mark.benchmark(group="scenario")
def test_round_trip_64gib(benchmark):
    """64 GiB converted to shared (removal + hole punch per page) and back."""
    benchmark.pedantic(round_trip, rounds=1, iterations=1)


def test_memory_independent_of_guest_size():
    """The booted TD's state takes the same bytes at 1 GiB and 1 TiB."""
    assert state_bytes(boot(GiB)) == state_bytes(boot(TiB))


@pytest.mark.benchmark(group="scenario")
@pytest.mark.parametrize("impl", ["core", "reference"])
def test_lazy_accept_64mib(benchmark, impl):
    """Lazy acceptance of 64 MiB: pkvm (range-compressed) vs the per-gfn reference (TDCALL by TDCALL)."""
    def run():
        t_ref, t_core = reference_accept()
        return t_core if impl == "core" else t_ref

    benchmark.pedantic(run, rounds=1, iterations=1)


def main():
    rows = []

    def row(name, fn):
        t = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t
        rows.append((name, wall, out))
        return out

    vm = row("boot 1 TiB (lazy accept)", boot)
    print(f"{'workload':<40} {'wall s':>8} {'modeled s':>10}  notes")
    name, wall, vm = rows[-1]
    print(f"{name:<40} {wall:8.3f} {vm.modeled_ns / 1e9:10.1f}  {vm.stats['tdx_accepts_4k']:,} accepts, "
          f"{vm.stats['seamcall_sept_add']:,} SEPT.ADD, {state_bytes(vm):,} B of state")
    small = boot(GiB)
    print(f"{'boot 1 GiB':<40} {'':>8} {small.modeled_ns / 1e9:10.1f}  {state_bytes(small):,} B of state")
    vm = row("convert 1 TiB to private + accept", convert)
    name, wall, vm = rows[-1]
    print(f"{name:<40} {wall:8.3f} {vm.modeled_ns / 1e9:10.1f}  {vm.stats['hypercall_exits']:,} MapGPA exits, "
          f"{wall / vm.stats['hypercall_exits'] * 1e6:.1f} us per exit")
    vm, _figures = row("fresh 1 TiB to shared (MapGPA)", to_shared)
    name, wall, (vm, _figures) = rows[-1]
    print(f"{name:<40} {wall:8.3f} {vm.modeled_ns / 1e9:10.1f}  {vm.stats['hypercall_exits']:,} MapGPA exits")
    t = time.perf_counter()
    on = to_shared(16 * GiB)[1]
    t_on = time.perf_counter() - t
    t = time.perf_counter()
    off = to_shared(16 * GiB, replay=False)[1]
    t_off = time.perf_counter() - t
    assert on == off, "the replay must give the per-exit figures"
    print(f"{'16 GiB to shared: per exit / replayed':<40} {t_off:8.3f} {'':>10}  replayed {t_on * 1e3:.1f} ms, "
          f"{t_off / t_on:,.0f}x, every figure equal")
    vm, t_sh, t_pr = round_trip()
    n = 64 * GiB >> 21
    print(f"{'64 GiB to shared':<40} {t_sh:8.3f} {'':>10}  {t_sh / n * 1e6:.1f} us per 2M exit "
          f"(removal of 512 pages + hole punch)")
    print(f"{'64 GiB back to private + accept':<40} {t_pr:8.3f} {vm.modeled_ns / 1e9:10.1f}  "
          f"{t_pr / n * 1e6:.1f} us per 2M exit")
    t_ref, t_core = reference_accept()
    print(f"{'lazy accept 64 MiB: reference / pkvm':<40} {t_ref:8.3f} {'':>10}  pkvm {t_core * 1e3:.2f} ms, "
          f"{t_ref / t_core:,.0f}x")
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
