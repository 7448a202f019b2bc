"""Builders shared by the KVM-model tests (not collected: no ``test_`` prefix)."""

import pathlib

import pkvm

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM = pkvm.KVM_MEM_GUEST_MEMFD
PUNCH = pkvm.FALLOC_FL_PUNCH_HOLE | pkvm.FALLOC_FL_KEEP_SIZE
MiB, GiB = 1 << 20, 1 << 30
#: A userspace address congruent with gpa 0 at every hugepage level.
UADDR = 1 << 40


def gmem_vm(size=4 * MiB, base=0, *, policy="6.19", shared_backing="thp", vm_type="sw_protected",
            uaddr=None, slot=0, gmem_size=None, pgoff=0):
    """A VM with one guest_memfd slot of ``size`` bytes at gpa ``base``; returns (vm, gmem, vcpu)."""
    vm = pkvm.VM(vm_type, policy=policy, shared_backing=shared_backing)
    gmem = vm.create_guest_memfd(gmem_size or size + pgoff)
    vm.set_user_memory_region2(slot, GMEM, base, size, UADDR + base if uaddr is None else uaddr, gmem, pgoff)
    return vm, gmem, vm.create_vcpu()


def shared_vm(size=4 * MiB, base=0, *, vm_type="sw_protected", shared_backing="thp", flags=0,
              uaddr=None, policy="6.19"):
    """A VM with one slot without guest_memfd; returns (vm, vcpu)."""
    vm = pkvm.VM(vm_type, policy=policy, shared_backing=shared_backing)
    vm.set_user_memory_region2(0, flags, base, size, UADDR + base if uaddr is None else uaddr)
    return vm, vm.create_vcpu()


def snapshot(vm):
    """Everything a failed call must leave untouched."""
    return (
        vm._attrs.ranges(),
        vm.mmu.sptes.ranges(),
        [(s.key, s.base_gfn, s.npages, s.flags, [m.ranges() for m in s.lpage.maps[2:]]) for s in vm.memslots],
        [(g.closed, g.folios.ranges(), g.bindings.ranges()) for g in vm._gmems],
        vm.stats,
        vm.modeled_ns,
        vm.cost_breakdown(),
        vm.mmu_invalidate_range,
        vm.hostmem.nr_allocated,
    )


def assert_core_constants(pxi: str, expect: dict[str, bool]) -> None:
    """The typed core repeats some kernel constants in ``pkvm/<pxi>`` (C code cannot import
    them): every line of ``expect`` is in the file and its value agrees (the dict's value)."""
    text = (pathlib.Path(pkvm.__file__).parent / pxi).read_text()
    for line, agrees in expect.items():
        assert line in text, f"{pxi} lacks {line!r}"
        assert agrees, f"{pxi}: {line!r} disagrees with the kernel's constant"


def beside_invalidation(vm, lo, hi, hold_ns, delay_ns, body):
    """Run ``body()`` as the timeline's ``vcpu0``, ``delay_ns`` in, while its ``vmm`` holds an
    MMU-notifier-style invalidation of gfns ``[lo, hi)`` open for ``hold_ns`` (begun and ended
    under ``mmu_lock`` for write, as kvm_mmu_notifier_invalidate_range_start / _end do).
    Returns ``(body's value, when it returned, when the invalidation ended, the result)``, times
    in ns since the timeline's start; checks the VM's invariants after the run."""
    from pkvm.sim import WRITE, Timeline

    tl = Timeline(vm)
    out = {}

    def notifier():
        tl.acquire("mmu_lock", WRITE)
        vm._invalidate_begin()
        vm._invalidate_range_add(lo, hi)
        tl.release("mmu_lock", WRITE)
        tl.sleep(hold_ns)
        tl.acquire("mmu_lock", WRITE)
        vm._invalidate_end()
        tl.release("mmu_lock", WRITE)
        out["end"] = tl.now_ns

    def vcpu():
        tl.sleep(delay_ns)
        out["value"] = body()
        out["done"] = tl.now_ns

    tl.spawn("vmm", notifier)
    tl.spawn("vcpu0", vcpu)
    tl.run()
    vm.check()
    return out["value"], out["done"], out["end"], tl.result()
