"""What the fault path remembers between lookups must never outlive the state it describes.

A fault keeps the memslot run it read from the slot map, the guest_memfd binding run it checked,
the SPTE word ``fault_begin`` read (with where that lookup landed, for the install's write) and
the ``PageFault`` of the call before; each is used only while the map it came from is unchanged
(its version) and for the same slot. These tests change the state between faults in the ways
that must void them and compare with a VM that never had anything to remember.
"""

import pytest

import pkvm

P = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
MiB2 = 1 << 21


def _vm(platform):
    vm = pkvm.VM(platform)
    g = vm.create_guest_memfd(1 << 30)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, MiB2, 1 << 40, g, 0)
    vm.set_user_memory_region2(1, pkvm.KVM_MEM_GUEST_MEMFD, 1 << 30, MiB2, (1 << 40) + (1 << 30), g, MiB2)
    vm.set_memory_attributes(0, MiB2, P)
    vm.set_memory_attributes(1 << 30, MiB2, P)
    return vm, g, vm.create_vcpu()


@pytest.mark.parametrize("platform", ["sw_protected", "snp"])
def test_deleted_slot_is_seen_by_the_next_fault(platform):
    vm, g, vcpu = _vm(platform)
    assert vcpu.page_fault(0x1000, private=True).ret == "fixed"
    assert vcpu.page_fault((1 << 30) + 0x1000, private=True).ret == "fixed"
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 0, 1 << 40, g, 0)  # delete slot 0
    r = vcpu.page_fault(0x2000, private=True)
    assert (r.ret, r.errno, r.memory_fault) == ("exit", 14, (0x2000, 4096, 8))
    vm.set_memory_attributes(0x3000, 4096, 0)
    assert vcpu.page_fault(0x3000, private=False).ret == "emulate"  # no slot: MMIO
    # the other slot, bound to the same file, still faults (its binding run is read again)
    assert vcpu.page_fault((1 << 30) + 0x2000, private=True).ret == "fixed"


@pytest.mark.parametrize("platform", ["sw_protected", "snp"])
def test_faults_alternating_between_two_slots_of_one_file(platform):
    """Two memslots bound to one guest_memfd at different offsets: the binding run read for one
    slot is not the other's; each fault gets its own folio, as on a VM faulting each once."""
    vm, _, vcpu = _vm(platform)
    fresh, _, fresh_vcpu = _vm(platform)
    gpas = [0x1000, (1 << 30) + 0x1000, 0x5000, (1 << 30) + 0x5000, 0x1000]
    got = [vcpu.page_fault(a, private=True) for a in gpas]
    assert got[-1].ret == "spurious" or got[-1].ret == "fixed"
    for a, r in zip(gpas[:-1], got[:-1]):
        assert r.ret == "fixed"
    assert len({r.pfn for r in got[:-1]}) == 4
    want = [fresh_vcpu.page_fault(a, private=True) for a in gpas]
    assert got == want
    assert vm.stats == fresh.stats


def test_spte_changed_between_begin_and_install_is_read_again():
    """The timeline's driver runs fault_begin and the install as separate steps; an SPTE written
    in between (here: the same gfn faulted by another call) makes the install read the map
    again: the second install of the same leaf is spurious, not a second map."""
    from pkvm.kvm import mmu

    vm, _, vcpu = _vm("sw_protected")
    f = pkvm.kvm.fault.PageFault(1, 2, True, False)
    mmu.fault_begin(vm, f)
    mmu.faultin_pfn(vm, f)
    assert vcpu.page_fault(0x1000, private=True).ret == "fixed"  # maps gfn 1 meanwhile
    mmu.fault_install(vm, f)
    assert f.ret == "spurious"
    assert vm.stats["pages_4k"] == 1


def test_a_kept_page_fault_is_not_reused(monkeypatch):
    """The PageFault of a one-page fault is reused for the next call only when nothing kept a
    reference to it: one the fault-event hook keeps stays as it was."""
    from pkvm.kvm import mmu

    kept = []
    emit = mmu._emit_fault

    def keep(vcpu, f, r, gfn, private, write, took):
        kept.append((f, f.gfn))
        emit(vcpu, f, r, gfn, private, write, took)

    monkeypatch.setattr(mmu, "_emit_fault", keep)  # (read when the VM builds its fault path)
    vm, _, vcpu = _vm("sw_protected")
    vm.subscribe(lambda ev: None)
    for gpa in (0x1000, 0x2000, 0x3000):
        assert vcpu.page_fault(gpa, private=True).ret == "fixed"
    assert [gfn for _, gfn in kept] == [1, 2, 3]
    assert [f.gfn for f, _ in kept] == [1, 2, 3]
    assert len({id(f) for f, _ in kept}) == 3


@pytest.mark.parametrize("leaf, fault", [(0x1000, 0x9000), (0x9000, 0x1000), (0x1FF000, 0)])
def test_huge_leaf_over_a_block_with_a_4k_leaf_drops_it(leaf, fault):
    """A 2M leaf installed where the fault's lookup found no SPTE still drops the 4K leaves
    elsewhere in the block (before or after the faulting gfn): the lookup's empty run covers
    only part of the block, so the install searches it."""
    vm = pkvm.VM("sw_protected")
    g = vm.create_guest_memfd(1 << 30)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 1 << 30, 1 << 40, g, 0)
    vcpu = vm.create_vcpu()
    base = MiB2
    vm.set_memory_attributes(base + 0x5000, 4096, P)  # a mixed block: shared faults map 4K
    assert vcpu.page_fault(base + leaf, private=False).level == 1
    before = dict(vm.stats)
    vm.set_memory_attributes(base + 0x5000, 4096, 0)  # uniform again
    r = vcpu.page_fault(base + fault, private=False)
    assert (r.ret, r.level) == ("fixed", 2)
    after = vm.stats
    assert after["zapped_sptes"] - before["zapped_sptes"] == 1
    assert after["pages_4k"] - before["pages_4k"] == -1
    assert after["pages_2m"] - before["pages_2m"] == 1
    assert after["remote_tlb_flush"] - before["remote_tlb_flush"] == 1


def test_huge_leaf_over_an_empty_block_searches_nothing_and_drops_nothing():
    vm = pkvm.VM("sw_protected")
    g = vm.create_guest_memfd(1 << 30)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 1 << 30, 1 << 40, g, 0)
    vcpu = vm.create_vcpu()
    r = vcpu.page_fault(MiB2 + 0x3000, private=False)
    assert (r.ret, r.level) == ("fixed", 2)
    assert vm.stats["zapped_sptes"] == 0 and vm.stats["remote_tlb_flush"] == 0
