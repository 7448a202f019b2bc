"""Failure injection at the kernel's allocation sites (``vm.inject_failure``;
docs/kvm-model.md "Failure injection"). Each test is written from what the kernel does when
that allocation fails, and proves the all-or-nothing part with a snapshot."""

import errno

import pytest
from tdxhelpers import td
from vmhelpers import GMEM, PRIVATE, UADDR, MiB, gmem_vm, snapshot

import pkvm
from pkvm import PG_LEVEL_2M, PG_LEVEL_4K

ENOMEM = errno.ENOMEM
KEEP = pkvm.FALLOC_FL_KEEP_SIZE
# snapshot() fields that are state (not counters or modeled time).
STATE = (0, 1, 2, 3, 7, 8)


def _state(vm):
    snap = snapshot(vm)
    return tuple(snap[i] for i in STATE)


def _stat_delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before.get(k)}


# -- the API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, exc, match", [
    (("xa_store", ENOMEM), ValueError, "not one of xa_reserve"),
    (("xa_reserve", errno.EIO), ValueError, "cannot come from xa_reserve"),
    (("xa_reserve", "ENOMEM"), TypeError, "errno must be an int"),
    (("mmu_topup", ENOMEM, -1), ValueError, "must be >= 0"),
    (("mmu_topup", ENOMEM, 1, -2), ValueError, "must be >= 0"),
    (("mmu_topup", ENOMEM, 1.0), TypeError, "times must be an int"),
])
def test_inject_failure_validates_and_changes_nothing(args, exc, match):
    vm, _gmem, _vcpu = gmem_vm()
    site, err, *rest = args
    kw = dict(zip(("times", "after"), rest, strict=False))
    with pytest.raises(exc, match=match):
        vm.inject_failure(site, err, **kw)
    assert vm._inject.pending() == {}


def test_times_zero_disarms():
    vm, _gmem, _vcpu = gmem_vm()
    vm.inject_failure("xa_reserve", ENOMEM, times=3)
    vm.inject_failure("xa_reserve", ENOMEM, times=0)
    vm.set_memory_attributes(0, 0x1000, PRIVATE)
    assert vm.get_memory_attributes(0) == PRIVATE and vm._inject.fired["xa_reserve"] == 0


# -- xa_reserve in KVM_SET_MEMORY_ATTRIBUTES -------------------------------------------------------


@pytest.mark.parametrize("after", [0, 7, 511])
def test_xa_reserve_enomem_changes_nothing(after):
    """kvm_vm_set_mem_attributes reserves every gfn before the PRE zap: whichever reservation
    fails, the attributes, the SPTEs, mmu_invalidate_seq and modeled time are unchanged."""
    vm, _gmem, vcpu = gmem_vm(4 * MiB)
    assert vcpu.access(0, private=False, size=2 * MiB).ret == "done"  # shared SPTEs to zap
    before = snapshot(vm)
    vm.inject_failure("xa_reserve", ENOMEM, after=after)
    with pytest.raises(pkvm.KvmError, match=f"xa_reserve failed at gfn {after:#x}") as e:
        vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    assert e.value.errno == ENOMEM
    assert snapshot(vm) == before and vm.stats["mmu_invalidate_seq"] == before[4]["mmu_invalidate_seq"]
    vm.check()
    # Disarmed after one failure: the same ioctl now succeeds and zaps.
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    assert vm.get_memory_attributes(0) == PRIVATE and vm.mmu.lookup(0) is None
    vm.check()


def test_xa_reserve_counts_gfns_and_short_circuit_reserves_nothing():
    """One call per gfn: after=16 lets a 16-page ioctl through and fails the next one at its
    first gfn. An ioctl that changes nothing short-circuits before reserving."""
    vm, _gmem, _vcpu = gmem_vm()
    vm.inject_failure("xa_reserve", ENOMEM, after=16)
    vm.set_memory_attributes(0, 16 << 12, PRIVATE)
    vm.set_memory_attributes(0, 16 << 12, PRIVATE)  # short-circuit: no reservation
    assert vm._inject.pending() == {"xa_reserve": (0, 1, ENOMEM)}
    with pytest.raises(pkvm.KvmError, match="at gfn 0x10"):
        vm.set_memory_attributes(16 << 12, 0x1000, PRIVATE)
    assert vm.get_memory_attributes(16) == 0
    vm.check()


def test_times_counts_calls_after_a_batch_failure():
    """inject_failure: calls ``after + 1`` to ``after + times`` fail. A batch of calls (one
    ioctl reserving many gfns) that reaches call ``after + 1`` fails there, and the very next
    call is call ``after + 2``: it fails too, whatever ``after`` was."""
    vm, _gmem, _vcpu = gmem_vm()
    vm.inject_failure("xa_reserve", ENOMEM, times=2, after=2)
    with pytest.raises(pkvm.KvmError, match="at gfn 0x2"):
        vm.set_memory_attributes(0, 5 << 12, PRIVATE)
    with pytest.raises(pkvm.KvmError, match="at gfn 0x0"):
        vm.set_memory_attributes(0, 0x1000, PRIVATE)
    assert vm._inject.pending() == {}
    vm.set_memory_attributes(0, 0x1000, PRIVATE)
    assert vm.get_memory_attributes(0) == PRIVATE
    vm.check()


# -- mmu_topup_memory_caches in the fault path -----------------------------------------------------


@pytest.mark.parametrize("private", [False, True])
def test_mmu_topup_enomem_fails_the_fault_and_maps_nothing(private):
    """kvm_tdp_page_fault tops up its caches before kvm_mmu_faultin_pfn: -ENOMEM goes back to
    KVM_RUN with no exit information, no folio, no host page, no SPTE."""
    vm, _gmem, vcpu = gmem_vm()
    if private:
        vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    state, stats = _state(vm), vm.stats
    vm.inject_failure("mmu_topup", ENOMEM)
    r = vcpu.page_fault(0x5000, private=private)
    assert (r.ret, r.errno, r.exit_reason, r.memory_fault) == ("exit", ENOMEM, None, None)
    assert _state(vm) == state
    assert _stat_delta(stats, vm.stats) == {"pf_taken": 1}
    vm.check()
    assert vcpu.page_fault(0x5000, private=private).ret == "fixed"


def test_mmu_topup_after_n_faults_stops_an_access_there():
    """A batched access is N faults: with after=3 the first three pages are mapped, the fourth
    fault fails, and the access reports where it stopped."""
    vm, _gmem, vcpu = gmem_vm(shared_backing="4k")  # 4K host pages: one fault per page
    vm.inject_failure("mmu_topup", ENOMEM, after=3)
    r = vcpu.access(0, private=False, size=8 << 12)
    assert (r.ret, r.pages_done, r.errno) == ("exit", 3, ENOMEM)
    assert [vm.mmu.lookup(g) is not None for g in range(5)] == [True, True, True, False, False]
    vm.check()


# -- guest_memfd folio allocation ------------------------------------------------------------------


def test_gmem_folio_enomem_in_a_private_fault_exits_with_nothing_allocated():
    """kvm_gmem_get_folio fails inside kvm_gmem_get_pfn: the fault exits to userspace with
    KVM_EXIT_MEMORY_FAULT and -ENOMEM; no folio, no host page, no SPTE."""
    vm, gmem, vcpu = gmem_vm()
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    state, stats = _state(vm), vm.stats
    vm.inject_failure("gmem_folio_alloc", ENOMEM)
    r = vcpu.page_fault(0x3000, private=True)
    assert (r.ret, r.errno, r.exit_reason) == ("exit", ENOMEM, pkvm.KVM_EXIT_MEMORY_FAULT)
    assert r.memory_fault == (0x3000, 0x1000, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert _state(vm) == state and gmem.folio(3) is None
    assert _stat_delta(stats, vm.stats) == {"pf_taken": 1, "memory_fault_exits": 1}
    vm.check()


def test_gmem_folio_enomem_in_fallocate_keeps_the_folios_before_it():
    """kvm_gmem_allocate allocates folio by folio and returns the error, keeping the folios it
    already added (fallocate is not all-or-nothing in the kernel)."""
    vm, gmem, _vcpu = gmem_vm()
    vm.inject_failure("gmem_folio_alloc", ENOMEM, after=2)
    with pytest.raises(pkvm.KvmError, match="index 0x2 \\(injected\\)") as e:
        gmem.fallocate(KEEP, 0, 8 << 12)
    assert e.value.errno == ENOMEM
    assert [gmem.folio(i) is not None for i in range(4)] == [True, True, False, False]
    assert vm.stats["gmem_pages_allocated"] == 2
    vm.check()


@pytest.mark.parametrize("policy", ["6.19", "tdx-huge-pages"])
def test_fallocate_on_exhausted_host_memory_keeps_the_folios_before_it(policy):
    """The same partial progress when the host itself runs out: with room for three more
    pages, a fallocate of eight allocates the first three folios in index order and fails
    with ENOMEM at the fourth (kvm_gmem_allocate stops at the first kvm_gmem_get_folio that
    fails and keeps the folios before it)."""
    vm_type = "tdx" if policy == "tdx-huge-pages" else "sw_protected"
    vm = pkvm.VM(vm_type, policy=policy)
    gmem = vm.create_guest_memfd(4 * MiB)
    mem = vm._hostmem
    filler = mem.alloc(mem.end_pfn - mem.start_pfn - 3)  # all but three pages of the host
    assert mem.can_alloc(3) and not mem.can_alloc(4)
    with pytest.raises(pkvm.KvmError, match="no order-0 folio for index 0x3") as e:
        gmem.fallocate(KEEP, 0, 8 << 12)
    assert e.value.errno == ENOMEM
    assert [gmem.folio(i) is not None for i in range(5)] == [True, True, True, False, False]
    assert vm.stats["gmem_pages_allocated"] == 3 and not mem.can_alloc(1)
    # a later call finds those three and fails at once on the fourth
    with pytest.raises(pkvm.KvmError, match="no order-0 folio for index 0x3"):
        gmem.fallocate(KEEP, 0, 8 << 12)
    assert vm.stats["gmem_pages_allocated"] == 3
    for pfn, n in filler:  # (the filler is no guest's memory: vm.check counts every host page)
        mem.free(pfn, n)
    vm.check()


def test_fallocate_of_huge_folios_stops_at_the_first_the_host_cannot_give():
    """With 2M folios (tdx-huge-pages) and room for one 2M block, a 6M fallocate allocates the
    first 2M folio and fails at the second, whose index the error names."""
    vm = pkvm.VM("tdx", policy="tdx-huge-pages")
    gmem = vm.create_guest_memfd(8 * MiB)
    mem = vm._hostmem
    assert mem.start_pfn % 512 == 0 and mem.end_pfn % 512 == 0
    filler = mem.alloc(mem.end_pfn - mem.start_pfn - 512)  # leaves one aligned 2M block
    assert mem.can_alloc(1, 9) and not mem.can_alloc(2, 9)
    with pytest.raises(pkvm.KvmError, match="no order-9 folio for index 0x200") as e:
        gmem.fallocate(KEEP, 0, 6 * MiB)
    assert e.value.errno == ENOMEM
    assert gmem.folio(0) is not None and gmem.folio(0x1FF) is not None and gmem.folio(0x200) is None
    assert vm.stats["gmem_pages_allocated"] == 512
    for pfn, n in filler:
        mem.free(pfn, n)
    vm.check()


def test_gmem_folio_enomem_in_snp_launch_update_first_page_and_later():
    """kvm_gmem_populate: a failure on the first page is the ioctl's -EIO (error 0); a later
    one returns the pages done."""
    vm = pkvm.VM("snp", policy="6.19")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    state = _state(vm)
    vm.inject_failure("gmem_folio_alloc", ENOMEM)
    with pytest.raises(pkvm.KvmError, match="kvm_gmem_populate: -ENOMEM") as e:
        vm.snp.launch_update(0, 0x4000)
    assert (e.value.errno, e.value.error) == (errno.EIO, 0)
    assert _state(vm) == state
    vm.inject_failure("gmem_folio_alloc", ENOMEM, after=2)
    assert vm.snp.launch_update(0, 0x4000) == 0x2000
    assert vm.stats["launch_update_pages"] == 2
    vm.check()


@pytest.mark.parametrize("free", [0, 2])
def test_tdx_init_mem_region_on_exhausted_host_memory_adds_the_pages_it_can(free):
    """KVM_TDX_INIT_MEM_REGION goes through kvm_gmem_populate too: with host memory for
    ``free`` of the four pages, those are added and the ENOMEM's progress is what remains."""
    vm, _vmm, gmem, vcpu = td(finalize=False)
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    mem = vm._hostmem
    filler = mem.alloc(mem.end_pfn - mem.start_pfn - mem.nr_allocated - free)
    with pytest.raises(pkvm.KvmError, match="host memory is exhausted") as e:
        vm.tdx.init_mem_region(vcpu, 0, 4)
    assert e.value.errno == ENOMEM and e.value.progress == (free << 12, 4 - free)
    assert [gmem.folio(i) is not None for i in range(4)] == [i < free for i in range(4)]
    for pfn, n in filler:  # (the filler is no guest's memory: vm.check counts every host page)
        mem.free(pfn, n)
    vm.check()


@pytest.mark.parametrize("free", [0, 2])
def test_snp_launch_update_on_exhausted_host_memory_populates_the_pages_it_can(free):
    """kvm_gmem_populate takes a folio per page: with host memory for ``free`` of the four
    pages, those are populated and the call returns them; with none, the first page fails
    (the ioctl's -EIO, firmware error 0), as for an injected failure."""
    vm = pkvm.VM("snp", policy="6.19")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    mem = vm._hostmem
    filler = mem.alloc(mem.end_pfn - mem.start_pfn - mem.nr_allocated - free)
    assert not mem.can_alloc(free + 1)
    if free:
        assert vm.snp.launch_update(0, 0x4000) == free << 12
    else:
        with pytest.raises(pkvm.KvmError, match="kvm_gmem_populate: -ENOMEM") as e:
            vm.snp.launch_update(0, 0x4000)
        assert (e.value.errno, e.value.error) == (errno.EIO, 0)
    assert vm.stats["launch_update_pages"] == free
    assert [gmem.folio(i) is not None for i in range(4)] == [i < free for i in range(4)]
    for pfn, n in filler:  # (the filler is no guest's memory: vm.check counts every host page)
        mem.free(pfn, n)
    vm.check()


def test_gmem_folio_enomem_in_tdx_init_mem_region():
    vm, vmm, gmem, vcpu = td(finalize=False)
    vm.inject_failure("gmem_folio_alloc", ENOMEM, after=1)
    with pytest.raises(pkvm.KvmError) as e:
        vm.tdx.init_mem_region(vcpu, 0, 4)
    assert e.value.errno == ENOMEM and e.value.progress == (0x1000, 3)  # one page added
    assert vm.sept.state(0) == "mapped" and vm.sept.state(1) == "free"
    vm.check()


# -- set_memory_* in the direct map (SNP) ----------------------------------------------------------


@pytest.mark.parametrize("directmap", ["split-4k", "unmap-restore"])
def test_set_memory_enomem_fails_the_rmpupdate_and_the_fault(directmap):
    """rmpupdate() changes the direct map first (adjust_direct_map / the RFC's invalidation);
    when that fails it returns -EFAULT before the RMPUPDATE: sev_gmem_prepare fails (-EINVAL),
    the fault exits, the RMP, the direct map and the NPT are unchanged. The folio the fault
    allocated stays in the file, as kvm_gmem_get_pfn leaves it."""
    pol = pkvm.Policy.preset("6.19").replace(directmap=directmap)
    vm = pkvm.VM("snp", policy=pol)
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    vcpu = vm.create_vcpu()
    rmp, dm = vm.rmp.ranges(), vm.directmap.ranges()
    sptes, attrs = vm.mmu.sptes.ranges(), vm._attrs.ranges()
    vm.inject_failure("set_memory", ENOMEM)
    r = vcpu.page_fault(0x7000, private=True)
    assert (r.ret, r.errno, r.exit_reason) == ("exit", errno.EINVAL, pkvm.KVM_EXIT_MEMORY_FAULT)
    assert (vm.rmp.ranges(), vm.directmap.ranges()) == (rmp, dm)
    assert (vm.mmu.sptes.ranges(), vm._attrs.ranges()) == (sptes, attrs)
    assert vm.stats["rmpupdate"] == 0 and vm._inject.fired["set_memory"] == 1
    assert any("injected" in m for _k, m in vm.events)
    vm.check()
    r = vcpu.page_fault(0x7000, private=True)
    assert r.ret == "fixed" and vm.rmp.lookup(r.pfn).assigned and r.level == PG_LEVEL_4K
    vm.check()


def test_unmap_restore_makes_no_direct_map_call_before_a_page_goes_back_to_shared():
    """Under the RFC's unmap-restore the direct-map change before an RMPUPDATE is the
    invalidation of a page being assigned; a page given back to the host (the folio freed by
    a hole punch: rmp_make_shared) is restored after its RMPUPDATE, so an armed set_memory
    failure is not reached there: the entry becomes shared and the failure stays armed."""
    pol = pkvm.Policy.preset("6.19").replace(directmap="unmap-restore")
    vm = pkvm.VM("snp", policy=pol)
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    vcpu = vm.create_vcpu()
    pfn = vcpu.page_fault(0x7000, private=True).pfn
    vm.inject_failure("set_memory", ENOMEM)
    vm.set_memory_attributes(0x7000, 0x1000, 0)
    gmem.fallocate(pkvm.FALLOC_FL_PUNCH_HOLE | KEEP, 0x7000, 0x1000)
    assert not vm.rmp.lookup(pfn).assigned and vm.stats["rmpupdate"] == 2
    assert vm._inject.fired["set_memory"] == 0
    vm.check()


def test_set_memory_counts_cpa_calls():
    """split-4k: only a 4K update inside a 2M direct-map mapping calls set_memory_4k; the
    second page of the same 2M block needs no call, so after=1 fails the next block's."""
    vm = pkvm.VM("snp", policy="6.19")
    gmem = vm.create_guest_memfd(8 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 8 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    vcpu = vm.create_vcpu()
    vm.inject_failure("set_memory", ENOMEM, after=1)
    assert vcpu.page_fault(0, private=True).ret == "fixed"        # splits block 0: call 1
    assert vcpu.page_fault(0x1000, private=True).ret == "fixed"   # same block: no call
    pfn_next = None
    for g in range(2, 2048):  # the first gfn whose page lies in another 2M direct-map block
        vcpu.page_fault(g << 12, private=True)
        if vm._inject.fired["set_memory"]:
            pfn_next = g
            break
    assert pfn_next is not None and vm.mmu.lookup(pfn_next) is None
    assert vm.directmap.level(gmem.folio(pfn_next)[0]) == PG_LEVEL_2M
    vm.check()
