"""SEV-SNP on the KVM model: platform ops, the access-time RMP check, PVALIDATE, page-state
changes, launch, invariants and the §7.8 end-to-end sequences (kernel-semantics.md §4.4, §5, §7)."""

import errno

import pytest
from vmhelpers import GMEM, PRIVATE, PUNCH, UADDR, MiB, snapshot

import pkvm

from pkvm import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.constants import (
    KVM_CAP_EXIT_HYPERCALL,
    KVM_EXIT_HYPERCALL,
    KVM_HC_MAP_GPA_RANGE,
)
from pkvm.platforms import _snp_vcpu as sv
from pkvm.platforms.snp_constants import (
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_NOUPDATE,
    PVALIDATE_FAIL_SIZEMISMATCH,
    PVALIDATE_SUCCESS,
)

ASID = 1


def snp_vm(size=4 * MiB, *, rmp_update="fault-time", directmap="split-4k", order=0, private=True,
           hypercall=True, shared_backing="4k"):
    pol = pkvm.Policy.preset("6.19").replace(rmp_update=rmp_update, directmap=directmap, gmem_max_order=order)
    vm = pkvm.VM("snp", policy=pol, shared_backing=shared_backing)
    gmem = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, GMEM, 0, size, UADDR, gmem, 0)
    if private:
        vm.set_memory_attributes(0, size, PRIVATE)
    if hypercall:
        vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    return vm, gmem, vm.create_vcpu()


def gpfn(gmem, index):
    return gmem.folio(index)[0]


# -- platform registration and state -------------------------------------------------------------


def test_snp_vm_has_rmp_directmap_and_counters():
    vm, _, vcpu = snp_vm()
    assert vm.vm_type == pkvm.KVM_X86_SNP_VM == 4
    assert vm.rmp is vm.snp.rmp and vm.directmap is vm.snp.directmap
    assert isinstance(vcpu, sv.SnpVcpu)
    for key in ("rmpupdate", "psmash", "rmp_fault", "directmap_splits", "directmap_unmaps",
                "directmap_restores", "sleep_in_atomic", "rmpupdate_failures"):
        assert vm.stats[key] == 0
    assert vm.check_extension(pkvm.KVM_CAP_MEMORY_ATTRIBUTES) == PRIVATE
    vm.check()


def test_snp_vm_options_and_policy_errors():
    with pytest.raises(ValueError):
        pkvm.VM("snp", policy="6.19", options={"asid": 0})
    with pytest.raises(ValueError):
        pkvm.VM("snp", policy="6.19", options={"host_cpus": 0})
    with pytest.raises(TypeError):
        pkvm.VM("snp", policy="6.19", options={"gpaw": 48})
    with pytest.raises(pkvm.KvmError) as e:
        pkvm.VM("snp", policy="6.8")  # no guest_memfd prepare hook
    assert e.value.errno == errno.EINVAL
    assert pkvm.VM("snp", policy="6.19", options={"asid": 7}).snp.asid == 7


def test_no_readonly_slots_protected_state():
    vm = pkvm.VM("snp", policy="6.19")
    with pytest.raises(pkvm.KvmError):
        vm.set_user_memory_region2(0, pkvm.KVM_MEM_READONLY, 0, 2 * MiB, UADDR)


# -- fault path: C-bit, gmem_prepare, max mapping level --------------------------------------------


def test_private_fault_assigns_4k_rmp_entry_at_fault_time():
    vm, gmem, vcpu = snp_vm()
    r = vcpu.page_fault(0x5000, private=True)
    assert r.ret == "fixed" and r.level == PG_LEVEL_4K
    pfn = gpfn(gmem, 5)
    assert vm.rmp.lookup(pfn) == (True, PG_LEVEL_4K, ASID, 0x5000, False, False, False)
    assert vm.stats["rmpupdate"] == 1 and vm.stats["gmem_prepare"] == 1
    # split-4k: the 1G boot mapping split to 2M, then the 2M one to 4K
    assert vm.stats["directmap_splits"] == 2 and vm.directmap.level(pfn) == PG_LEVEL_4K
    vm.check()


def test_c_bit_decides_private_shared_mismatch_exits():
    vm, _, vcpu = snp_vm()
    r = vcpu.page_fault(0x3000, private=False)  # C=0 access to a private gfn
    assert r.ret == "exit" and r.memory_fault == (0x3000, 0x1000, 0)
    assert vm.stats["rmpupdate"] == 0


def test_2m_folio_gets_2m_rmp_entry_and_2m_spte():
    vm, gmem, vcpu = snp_vm(order=9)
    r = vcpu.page_fault(0x200000 + 0x3000, private=True)
    assert r.ret == "fixed" and r.level == PG_LEVEL_2M
    pfn = gpfn(gmem, 512)
    assert pfn % 512 == 0
    assert vm.rmp.lookup(pfn + 3) == (True, PG_LEVEL_2M, ASID, 0x203000, False, False, False)
    assert vm.stats["rmpupdate"] == 1 and vm.stats["rmpupdate_2m"] == 1
    assert vm.stats["directmap_splits"] == 0  # 2M updates never split (§5.8)
    vm.check()


def test_2m_folio_with_an_assigned_page_gets_4k_head_entry():
    vm, gmem, vcpu = snp_vm(order=9)
    gmem.fallocate(pkvm.FALLOC_FL_KEEP_SIZE, 0, 2 * MiB)  # allocate the 2M folio, unprepared
    pfn = gpfn(gmem, 0)
    from pkvm.platforms.snp import rmp_make_private

    assert rmp_make_private(vm, pfn + 7, 7, 1, PG_LEVEL_4K) == 0
    r = vcpu.page_fault(0x1000, private=True)
    assert r.ret == "fixed" and r.level == PG_LEVEL_4K  # the RMP level caps the mapping
    assert vm.rmp.lookup(pfn).level == PG_LEVEL_4K and vm.rmp.lookup(pfn).assigned
    assert not vm.rmp.lookup(pfn + 1).assigned  # only the folio's head page (§5.5)


def test_gmem_prepare_batch_failure_changes_nothing():
    vm, gmem, vcpu = snp_vm()
    gmem.fallocate(pkvm.FALLOC_FL_KEEP_SIZE, 0, 0x10000)
    pfn = gpfn(gmem, 0)
    vm.rmp.set_in_use(pfn + 9)
    # The range PVALIDATE faults the 16 pages in as one batch; page 9 is locked, so the batch
    # prepares nothing and the pages are faulted (and validated) one by one up to page 9.
    r = vcpu.pvalidate_range(0, 0x10000, True)
    assert r.ret == "exit" and r.memory_fault[0] == 0x9000 and r.errno == errno.EINVAL
    assert r.value == 0x9000
    assert vm.rmp.find_ne(pfn, 9, assigned=True, validated=True) == -1
    assert not vm.rmp.lookup(pfn + 9).assigned and vm.stats["rmpupdate_failures"] >= 1
    vm.check()


# -- invalidate (§5.7) ------------------------------------------------------------------------------


def test_hole_punch_returns_pages_with_cache_flush():
    vm, gmem, vcpu = snp_vm()
    vcpu.pvalidate_range(0, 0x8000, True)
    pfn = gpfn(gmem, 0)
    n = vm.stats["rmpupdate"]
    gmem.fallocate(PUNCH, 0, 0x8000)
    assert vm.rmp.find_eq(pfn, 8, assigned=True) == -1
    assert vm.stats["rmpupdate"] == n + 8 and vm.stats["cache_flush_pages"] == 8
    vm.check()


def test_hole_punch_of_2m_entry_uses_one_2m_update():
    vm, gmem, vcpu = snp_vm(order=9)
    vcpu.page_fault(0, private=True)
    gmem.fallocate(PUNCH, 0, 2 * MiB)
    assert vm.stats["rmpupdate_2m"] == 2 and vm.stats["psmash"] == 0
    assert vm.stats["cache_flush_pages"] == 512
    vm.check()


def test_invalidate_of_part_of_a_2m_entry_psmashes_first():
    from pkvm.platforms.snp import snp_gmem_invalidate

    vm, gmem, vcpu = snp_vm(order=9)
    vcpu.page_fault(0, private=True)
    pfn = gpfn(gmem, 0)
    snp_gmem_invalidate(vm, pfn + 8, pfn + 16)
    assert vm.stats["psmash"] == 1
    assert vm.cost_breakdown()["psmash"] == vm.costs.ns("psmash")  # docs/costs.md: per 2M entry split
    assert vm.rmp.lookup(pfn).level == PG_LEVEL_4K and vm.rmp.lookup(pfn).assigned
    assert vm.rmp.find_eq(pfn + 8, 8, assigned=True) == -1
    assert vm.stats["cache_flush_pages"] == 8


def test_launched_page_freed_before_launch_finish_is_returned_not_leaked():
    """LAUNCH_UPDATE leaves a page Guest-Valid (not immutable): sev_gmem_post_populate
    (arch/x86/kvm/svm/sev.c) returns launched pages with a plain rmp_make_shared. Freeing one
    before LAUNCH_FINISH gives it back to the hypervisor; the model leaked it as immutable."""
    vm, gmem, _vcpu = snp_vm()
    assert vm.snp.launch_update(0, 0x2000) == 0x2000
    pfn = gpfn(gmem, 0)
    assert not vm.rmp.lookup(pfn).immutable and vm.rmp.lookup(pfn).validated
    gmem.fallocate(PUNCH, 0, 0x2000)  # before LAUNCH_FINISH
    assert vm.stats["snp_leaked_pages"] == 0 and vm.stats["rmpupdate_failures"] == 0
    assert vm.rmp.find_eq(pfn, 1, assigned=True) == -1
    vm.check()


def test_page_that_cannot_be_made_shared_is_leaked_on_free():
    vm, gmem, vcpu = snp_vm()
    assert vcpu.pvalidate(0, PG_LEVEL_4K, True).status == PVALIDATE_SUCCESS
    pfn = gpfn(gmem, 0)
    vm.rmp.set_in_use(pfn, 1, True)  # another CPU holds the entry: FAIL_INUSE, not retried
    gmem.fallocate(PUNCH, 0, 0x1000)
    assert vm.stats["snp_leaked_pages"] == 1 and vm.stats["rmpupdate_failures"] == 1
    assert vm.rmp.lookup(pfn).assigned
    vm.check()


# -- the RMP #NPF handler and the access-time check (§5.6) ----------------------------------------


def test_unvalidated_private_access_is_a_vc_not_an_npf():
    vm, _, vcpu = snp_vm()
    r = vcpu.access(0, private=True, size=0x4000)
    assert r.ret == "vc" and r.pages_done == 0 and vm.stats["snp_vc"] == 1
    assert vcpu.pvalidate_range(0, 0x4000, True).status == PVALIDATE_SUCCESS
    assert vcpu.access(0, private=True, size=0x4000).ret == "done"


def test_4k_npt_over_2m_rmp_entry_psmashes_and_zaps():
    vm, gmem, vcpu = snp_vm(order=9)
    assert vcpu.pvalidate(0, PG_LEVEL_2M, True).status == PVALIDATE_SUCCESS
    assert vm.mmu.lookup(0).level == PG_LEVEL_2M
    # Make the 2M chunk MIXED: converting gfn 511 to shared zaps the 2M leaf.
    vm.set_memory_attributes(511 << 12, 0x1000, 0)
    r = vcpu.access(0, private=True, size=0x2000)
    assert r.ret == "done"
    # First fault maps 4K (MIXED); the access then takes an RMP #NPF: PSMASH + zap; refault.
    assert vm.stats["rmp_fault"] == 1 and vm.stats["psmash"] == 1
    assert vm.rmp.lookup(gpfn(gmem, 0)).level == PG_LEVEL_4K
    assert vm.mmu.lookup(0).level == PG_LEVEL_4K
    vm.check()


def test_rmp_fault_psmash_lost_to_another_cpu_does_not_zap(monkeypatch):
    """sev_handle_rmp_fault (arch/x86/kvm/svm/sev.c): when its PSMASH fails but a second look
    finds the entry already split to 4K and assigned (another CPU won the PSMASH), the fault is
    resolved and the handler skips the zap. The model zapped 512 gfns anyway."""
    import pkvm.platforms.snp as snp_mod
    from pkvm.platforms.snp_constants import PSMASH_FAIL_INPUT

    vm, gmem, vcpu = snp_vm(order=9)
    assert vcpu.pvalidate(0, PG_LEVEL_2M, True).status == PVALIDATE_SUCCESS
    vm.set_memory_attributes(511 << 12, 0x1000, 0)  # MIXED chunk: the next fault maps 4K
    real = snp_mod.psmash

    def lost_race(vm_, pfn):
        real(vm_, pfn)  # "another CPU" splits the entry ...
        return PSMASH_FAIL_INPUT  # ... so this CPU's PSMASH finds no 2M entry

    monkeypatch.setattr(snp_mod, "psmash", lost_race)
    zapped = vm.stats["zapped_sptes"]
    r = vcpu.access(0, private=True, size=0x2000)
    assert r.ret == "done"
    assert vm.stats["rmp_fault"] == 1 and vm.rmp.lookup(gpfn(gmem, 0)).level == PG_LEVEL_4K
    assert vm.stats["zapped_sptes"] == zapped  # resolved: nothing zapped
    assert not [e for e in vm.events if e[0] == "rmp_fault"]  # and no warning
    vm.check()


def test_spurious_rmp_fault_on_4k_entry_loops():
    vm, gmem, vcpu = snp_vm()
    assert vcpu.pvalidate(0, PG_LEVEL_4K, True).status == PVALIDATE_SUCCESS
    from pkvm.platforms.snp import rmp_make_shared

    rmp_make_shared(vm, gpfn(gmem, 0), 1, PG_LEVEL_4K)  # the host takes the page back behind KVM
    r = vcpu.access(0, private=True)
    assert r.ret == "rmp_loop" and vm.stats["rmp_fault"] == 1
    with pytest.raises(pkvm.InternalInvariantError):
        vm.check()


# -- PVALIDATE ------------------------------------------------------------------------------------------


def test_pvalidate_codes():
    vm, _gmem, vcpu = snp_vm()
    assert vcpu.pvalidate(0x1000, PG_LEVEL_2M, True).status == PVALIDATE_FAIL_INPUT
    r = vcpu.pvalidate(0, PG_LEVEL_2M, True)  # 4K RMP entry (order-0 folio)
    assert r.status == PVALIDATE_FAIL_SIZEMISMATCH and r.faults == 1
    assert vcpu.pvalidate(0, PG_LEVEL_4K, True).status == PVALIDATE_SUCCESS
    assert vcpu.pvalidate(0, PG_LEVEL_4K, True).status == PVALIDATE_FAIL_NOUPDATE
    assert vcpu.pvalidate(0, PG_LEVEL_4K, False).status == PVALIDATE_SUCCESS
    assert vm.stats["pvalidate"] == 2 and vm.stats["pvalidate_failures"] == 3


def test_pvalidate_4k_on_2m_entry_psmashes():
    vm, gmem, vcpu = snp_vm(order=9)
    r = vcpu.pvalidate(0x5000, PG_LEVEL_4K, True)
    assert r.status == PVALIDATE_SUCCESS
    assert vm.stats["psmash"] == 1 and vm.stats["rmp_fault"] == 1
    pfn = gpfn(gmem, 0)
    assert vm.rmp.lookup(pfn + 5).validated and not vm.rmp.lookup(pfn + 4).validated
    vm.check()


def test_pvalidate_on_shared_gfn_exits_then_reexecutes():
    vm, _gmem, vcpu = snp_vm(private=False)
    vmm = pkvm.Vmm(vm, exit_hypercall=False)
    r = vcpu.pvalidate(0x2000, PG_LEVEL_4K, True)
    assert r.ret == "exit" and r.memory_fault == (0x2000, 0x1000, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert vmm.handle_exit(vcpu, r)
    r = vcpu.run()
    assert r.ret == "done" and r.status == PVALIDATE_SUCCESS
    assert vm.get_memory_attributes(2) == PRIVATE


@pytest.mark.parametrize("bad", [
    {"gpa": -1, "level": PG_LEVEL_4K, "validate": True},
    {"gpa": 0, "level": 3, "validate": True},
    {"gpa": 0, "level": PG_LEVEL_4K, "validate": 1},
    {"gpa": "0", "level": PG_LEVEL_4K, "validate": True},
])
def test_pvalidate_bad_input_changes_nothing(bad):
    vm, _, vcpu = snp_vm()
    before = snapshot(vm)
    with pytest.raises((TypeError, ValueError)):
        vcpu.pvalidate(**bad)
    assert snapshot(vm) == before


def test_pvalidate_range_bad_input():
    vm, _, vcpu = snp_vm()
    before = snapshot(vm)
    for args in [(0x10, 0x1000, True), (0, 0, True), (0, 0x1000, 1)]:
        with pytest.raises((TypeError, ValueError)):
            vcpu.pvalidate_range(*args)
    assert snapshot(vm) == before


# -- page-state changes (§7.1) -----------------------------------------------------------------------


def test_psc_msr_protocol():
    vm, _, vcpu = snp_vm(private=False, hypercall=False)
    assert vcpu.psc_msr(0x3000, 1).status == sv.GHCB_MSR_PSC_RESP_ERROR  # not enabled
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    assert vcpu.psc_msr(0x3000, 5).status == sv.GHCB_MSR_PSC_RESP_ERROR  # bad op
    r = vcpu.psc_msr(0x3000, sv.SNP_PAGE_STATE_PRIVATE)
    assert r.ret == "exit" and r.exit_reason == KVM_EXIT_HYPERCALL
    assert r.hypercall.args == (0x3000, 1, 0x10)
    with pytest.raises(pkvm.KvmError):
        vcpu.psc_msr(0x4000, 1)  # an exit is pending
    vm.set_memory_attributes(0x3000, 0x1000, PRIVATE)
    assert vcpu.run().status == sv.GHCB_MSR_PSC_RESP
    r = vcpu.psc_msr(0x3000, sv.SNP_PAGE_STATE_SHARED)
    assert r.hypercall.args == (0x3000, 1, 0)
    r.hypercall.ret = 22
    assert vcpu.run().status == sv.GHCB_MSR_PSC_RESP_ERROR
    assert vm.stats["psc_requests"] == 4


def test_psc_msr_gfn_field_is_40_bits():
    """snp_begin_psc_msr (arch/x86/kvm/svm/sev.c) reads the gfn from the GHCB MSR's 40-bit
    GHCB_MSR_PSC_REQ_GFN field: a gpa bit at or above 52 is not part of the request, and the
    exit names the gpa without it."""
    vm, _, vcpu = snp_vm(private=False)
    r = vcpu.psc_msr((1 << 52) | 0x3000, sv.SNP_PAGE_STATE_PRIVATE)
    assert r.ret == "exit" and r.hypercall.args == (0x3000, 1, 0x10)


def test_psc_msr_operation_field_is_4_bits():
    """snp_begin_psc_msr (arch/x86/kvm/svm/sev.c) reads the operation with
    GHCB_MSR_PSC_REQ_TO_OP, bits 55:52 of the GHCB MSR: an op of 0x11 is the MSR value with
    op 1 (private), not an unknown operation. The model compared the whole int with 1 and 2."""
    vm, _, vcpu = snp_vm(private=False)
    r = vcpu.psc_msr(0x3000, 0x10 | sv.SNP_PAGE_STATE_PRIVATE)
    assert r.ret == "exit" and r.hypercall.args == (0x3000, 1, 0x10)


def E(gfn, op=sv.SNP_PAGE_STATE_PRIVATE, huge=False, cur=0):
    return sv.PscEntry(gfn, op, huge, cur)


def test_psc_ghcb_errors():
    vm, _, vcpu = snp_vm(private=False, hypercall=False)
    assert vcpu.psc(sv.PscDesc.of([E(0)])).status == sv.VMGEXIT_PSC_ERROR_GENERIC
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    big = sv.PscDesc([E(i) for i in range(254)], 0, 253)
    assert vcpu.psc(big).status == sv.VMGEXIT_PSC_ERROR_INVALID_HDR
    assert vcpu.psc(sv.PscDesc.of([E(3, huge=True)])).status == sv.VMGEXIT_PSC_ERROR_INVALID_ENTRY
    assert vcpu.psc(sv.PscDesc.of([E(0, cur=2)])).status == sv.VMGEXIT_PSC_ERROR_INVALID_ENTRY
    with pytest.raises(TypeError):
        vcpu.psc([E(0)])


def test_psc_ghcb_coalesces_and_reports_progress():
    vm, _, vcpu = snp_vm(private=False)
    shared = sv.SNP_PAGE_STATE_SHARED
    desc = sv.PscDesc.of([E(0, huge=True, cur=100), E(512, huge=True), E(1024, huge=True),
                          E(2000), E(2001), E(5, sv.SNP_PAGE_STATE_PSMASH), E(7, shared), E(9, shared)])
    r = vcpu.psc(desc)
    # the partly done 2M entry alone, as 4K pages (412 of them), its size flag still the
    # entry's 2M bit (snp_begin_psc); then 512+1024 coalesced at 2M
    assert r.hypercall.args == ((100) << 12, 412, 0x11)
    r = vcpu.run()
    assert desc.cur_entry == 1 and desc.entries[0].cur_page == 512
    assert r.hypercall.args == (512 << 12, 1024, 0x11)
    r = vcpu.run()
    assert r.hypercall.args == (2000 << 12, 2, 0x10)
    r = vcpu.run()
    assert desc.cur_entry == 6  # the PSMASH entry was skipped without an exit
    assert r.hypercall.args == (7 << 12, 1, 0)
    assert desc.entries[5].cur_page == 1
    r = vcpu.run()
    assert r.hypercall.args == (9 << 12, 1, 0)  # not contiguous with 7: its own exit
    r.hypercall.ret = 1
    r = vcpu.run()
    assert r.ret == "done" and r.status == sv.VMGEXIT_PSC_ERROR_GENERIC
    assert desc.cur_entry == 7 and vm.stats["hypercall_exits"] == 5


def test_psc_ghcb_partly_done_2m_entry_coalesces_as_the_kernel_does():
    """snp_begin_psc (arch/x86/kvm/svm/sev.c) compares a following entry's gfn with the first
    entry's own gfn plus the pages it has counted: after a 2M entry with cur_page 100 it
    coalesces a 4K entry at gfn 412 (one exit of 413 pages from gfn 100), not one at gfn 512.
    The exit's size flag is the first entry's 2M bit. The model compared against the adjusted
    gfn and used the 4K flag."""
    vm, _, vcpu = snp_vm(private=False)
    desc = sv.PscDesc.of([E(0, huge=True, cur=100), E(412)])
    r = vcpu.psc(desc)
    assert r.hypercall.args == (100 << 12, 413, 0x11)
    assert vcpu.run().status == 0 and desc.cur_entry == 2
    assert [e.cur_page for e in desc.entries] == [512, 1]
    desc = sv.PscDesc.of([E(1024, huge=True, cur=100), E(1536)])
    r = vcpu.psc(desc)
    assert r.hypercall.args == ((1024 + 100) << 12, 412, 0x11)  # gfn 1536 is not "contiguous"
    r = vcpu.run()
    assert r.hypercall.args == (1536 << 12, 1, 0x10)
    assert vcpu.run().status == 0 and desc.cur_entry == 2
    assert vm.stats["hypercall_exits"] == 3


def test_psc_ghcb_skips_done_entries_and_stops_coalescing_at_one():
    """snp_begin_psc (arch/x86/kvm/svm/sev.c): an entry whose cur_page equals its page count is
    done and skipped (only cur_page *past* it is VMGEXIT_PSC_ERROR_INVALID_ENTRY), and the
    coalescing loop stops at a following entry with a nonzero cur_page (``entry.cur_page``
    breaks it), so that entry is not counted into the exit."""
    vm, _, vcpu = snp_vm(private=False)
    desc = sv.PscDesc.of([E(5, cur=1), E(6)])
    r = vcpu.psc(desc)
    assert r.ret == "exit" and r.hypercall.args == (6 << 12, 1, 0x10)
    assert vcpu.run().status == 0 and desc.cur_entry == 2
    desc = sv.PscDesc.of([E(8), E(9, cur=1), E(10)])
    r = vcpu.psc(desc)
    assert r.hypercall.args == (8 << 12, 1, 0x10)  # not 2 pages: entry 1 has cur_page 1
    r = vcpu.run()
    assert r.hypercall.args == (10 << 12, 1, 0x10)
    assert vcpu.run().status == 0 and desc.cur_entry == 3
    assert vm.stats["hypercall_exits"] == 3


def test_psc_ghcb_hypercall_exit_disabled_during_the_exit():
    """snp_complete_one_psc (arch/x86/kvm/svm/sev.c) marks the in-flight entries done, then
    calls snp_begin_psc again, whose first test is user_exit_on_hypercall(KVM_HC_MAP_GPA_RANGE):
    if userspace disabled the exit (KVM_ENABLE_CAP may change it at any time) while the vCPU
    was in it, the request ends with VMGEXIT_PSC_ERROR_GENERIC, even when nothing was left.
    The model went on with the next range (another exit) or answered 0."""
    vm, _, vcpu = snp_vm(private=False)
    desc = sv.PscDesc.of([E(8), E(10)])
    assert vcpu.psc(desc).hypercall.args == (8 << 12, 1, 0x10)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 0)
    r = vcpu.run()
    assert r.ret == "done" and r.status == sv.VMGEXIT_PSC_ERROR_GENERIC
    assert desc.cur_entry == 1 and [e.cur_page for e in desc.entries] == [1, 0]
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    desc = sv.PscDesc.of([E(8)])
    assert vcpu.psc(desc).ret == "exit"
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 0)
    r = vcpu.run()  # the last range: still GENERIC
    assert r.status == sv.VMGEXIT_PSC_ERROR_GENERIC and desc.cur_entry == 1
    # the range-compressed form the guest flows use answers the same
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    at = [0]
    r = vcpu._psc_runs([(8, 1, False), (10, 1, False)], sv.SNP_PAGE_STATE_PRIVATE, at)
    assert r.ret == "exit" and r.hypercall.args == (8 << 12, 1, 0x10)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 0)
    r = vcpu.run()
    assert r.ret == "done" and r.status == sv.VMGEXIT_PSC_ERROR_GENERIC and at[0] == 1
    assert vm.stats["hypercall_exits"] == 3


def test_psc_ghcb_failed_range_still_traces_the_vmgexit_exit():
    """A range userspace fails ends the request with VMGEXIT_PSC_ERROR_GENERIC
    (snp_complete_one_psc -> snp_complete_psc); the vCPU then re-enters the guest and the kernel
    traces kvm_vmgexit_exit with that code (sev_es_unmap_ghcb), as for every completed
    VMGEXIT. The model left this one exit untraced, so enters and exits did not pair up."""
    vm, _, vcpu = snp_vm(private=False)
    events = []
    vm.subscribe(events.append, kinds=["vmgexit_enter", "vmgexit_exit"])
    r = vcpu.psc(sv.PscDesc.of([E(8)]))
    r.hypercall.ret = 1
    assert vcpu.run().status == sv.VMGEXIT_PSC_ERROR_GENERIC
    at = [0]
    r = vcpu._psc_runs([(8, 1, False)], sv.SNP_PAGE_STATE_PRIVATE, at)
    r.hypercall.ret = 1
    assert vcpu.run().status == sv.VMGEXIT_PSC_ERROR_GENERIC
    assert [e.kind for e in events] == ["vmgexit_enter", "vmgexit_exit"] * 2
    assert [e.args[3] for e in events if e.kind == "vmgexit_exit"] == [sv.VMGEXIT_PSC_ERROR_GENERIC] * 2


# -- §7.8 end-to-end sequences ---------------------------------------------------------------------


def test_e2e_shared_to_private_4k():
    vm, gmem, vcpu = snp_vm(private=False)
    vmm = pkvm.Vmm(vm)
    vcpu.access(0x7000, private=False)  # shared page in use first
    seq = vm.stats["mmu_invalidate_seq"]
    # 1. PSC(op=private) -> KVM_EXIT_HYPERCALL(12, gpa, 1, 0x10)
    r = vcpu.psc(sv.PscDesc.of([E(7)]))
    assert r.hypercall.nr == 12 and r.hypercall.args == (0x7000, 1, 0x10)
    # 2. VMM: attributes (PRE zaps the shared SPTE, seq++ at POST), discard shared backing
    #    (the MMU notifier's invalidation: seq++ again)
    assert vmm.handle_exit(vcpu, r)
    assert vm.mmu.lookup(7) is None and vm.stats["mmu_invalidate_seq"] == seq + 2
    # 3. KVM completes the PSC
    r = vcpu.run()
    assert r.status == 0 and r.ret == "done"
    # 4. PVALIDATE -> #NPF(ENC) -> gmem alloc + prepare RMPUPDATE -> 4K SPTE; re-executed
    assert vm.stats["rmpupdate"] == 0
    r = vcpu.pvalidate(0x7000, PG_LEVEL_4K, True)
    assert r.status == PVALIDATE_SUCCESS and r.faults == 1
    pfn = gpfn(gmem, 7)
    assert vm.rmp.lookup(pfn) == (True, PG_LEVEL_4K, ASID, 0x7000, False, True, False)
    assert vm.stats["rmpupdate"] == 1 and vm.stats["pvalidate"] == 1
    # 5. usable with C=1
    assert vcpu.access(0x7000, private=True).ret == "done"
    vm.check()


def test_e2e_private_to_shared_4k():
    vm, gmem, vcpu = snp_vm()
    vmm = pkvm.Vmm(vm)
    vcpu.pvalidate(0x7000, PG_LEVEL_4K, True)
    pfn = gpfn(gmem, 7)
    # 1. rescind, then PSC(op=shared)
    assert vcpu.pvalidate(0x7000, PG_LEVEL_4K, False).status == PVALIDATE_SUCCESS
    r = vcpu.psc(sv.PscDesc.of([E(7, sv.SNP_PAGE_STATE_SHARED)]))
    assert r.hypercall.args == (0x7000, 1, 0)
    # 2. VMM: attributes 0 (zap) + PUNCH_HOLE -> invalidate -> RMPUPDATE shared + flush
    n = vm.stats["rmpupdate"]
    assert vmm.handle_exit(vcpu, r)
    assert vm.stats["rmpupdate"] == n + 1 and vm.stats["cache_flush_pages"] == 1
    assert not vm.rmp.lookup(pfn).assigned and gmem.folio(7) is None
    assert vcpu.run().status == 0
    # 3. C=0 access -> shared fault -> HVA page mapped
    r = vcpu.access(0x7000, private=False)
    assert r.ret == "done" and r.faults == 1
    vm.check()


def test_guest_flows_convert_round_trip():
    vm, _gmem, vcpu = snp_vm()
    vmm = pkvm.Vmm(vm)
    g = pkvm.Guest(vm, vmm, vcpu)
    assert g.accept(0, 4 * MiB)
    assert g.touch(0, 4 * MiB, private=True, write=True).ret == "done"
    assert g.convert(MiB, MiB, private=False)
    assert g.touch(MiB, MiB, private=False).ret == "done"
    assert g.convert(MiB, MiB, private=True)
    assert g.touch(0, 4 * MiB, private=True).ret == "done"
    st = vm.stats
    # accept: 2 x 2M PSC entries coalesced into one exit; 2 x SIZEMISMATCH + 1024 4K PVALIDATEs.
    # Each 1 MiB conversion: 256 4K entries = 4 requests of 64, each coalesced into one exit.
    assert st["psc_requests"] == 9 and st["hypercall_exits"] == 9
    assert st["pvalidate"] == 1024 + 256 + 256 and st["pvalidate_failures"] == 2
    assert st["rmpupdate"] == 1024 + 256 + 256
    vm.check()


# -- launch (§5.9) ----------------------------------------------------------------------------------


def test_launch_update_immutable_validated_then_finish():
    vm, gmem, vcpu = snp_vm()
    assert vm.snp.launch_update(0x10000, 0x4000) == 0x4000
    pfn = gpfn(gmem, 0x10)
    # Guest-Valid after LAUNCH_UPDATE: validated, no longer immutable (sev_gmem_post_populate).
    assert vm.rmp.lookup(pfn) == (True, PG_LEVEL_4K, ASID, 0x10000, False, True, False)
    assert gmem.folio(0x10)[2]  # prepared
    # An already-prepared first page: kvm_gmem_populate fails (-EEXIST); the ioctl says -EIO
    # with the firmware error field 0 (snp_launch_update).
    with pytest.raises(pkvm.KvmError, match="EEXIST; firmware error 0") as e:
        vm.snp.launch_update(0x10000, 0x1000)
    assert (e.value.errno, e.value.error, e.value.populate_errno) == (errno.EIO, 0, errno.EEXIST)
    vm.snp.launch_finish()
    assert vm.rmp.lookup(pfn) == (True, PG_LEVEL_4K, ASID, 0x10000, False, True, False)
    assert vcpu.access(0x10000, private=True, size=0x4000).ret == "done"  # no PVALIDATE needed
    with pytest.raises(pkvm.KvmError):
        vm.snp.launch_update(0x20000, 0x1000)
    with pytest.raises(pkvm.KvmError):
        vm.snp.launch_finish()
    vm.check()


def test_launch_update_partial_progress_and_errors():
    vm, _gmem, _vcpu = snp_vm()
    vm.set_memory_attributes(0x3000, 0x1000, 0)
    assert vm.snp.launch_update(0, 0x8000) == 0x3000  # stops at the shared gfn
    # A non-PRIVATE first gfn: kvm_gmem_populate's -EINVAL becomes -EIO, firmware error 0.
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="EINVAL; firmware error 0") as e:
        vm.snp.launch_update(0x3000, 0x1000)
    assert (e.value.errno, e.value.error, e.value.populate_errno) == (errno.EIO, 0, errno.EINVAL)
    assert snapshot(vm) == before  # its folio was allocated by the call above, before the check
    before = snapshot(vm)
    for args in [(0x100, 0x1000), (0x8000, 0x1000, 2), (0x8000, 0x1000, 1, 1), (64 * MiB, 0x1000),
                 (0x8000, 0), (64 * MiB, 0)]:  # 6.18+: len 0 is a bad parameter
        with pytest.raises(pkvm.KvmError, match="bad parameters|not in a guest_memfd memslot") as e:
            vm.snp.launch_update(*args)
        assert e.value.errno == errno.EINVAL  # snp_launch_update's own checks, before populating
    assert snapshot(vm) == before
    with pytest.raises(ValueError):
        vm.snp.launch_update(-1, 0x1000)


@pytest.mark.parametrize("preset", ["6.11", "6.16"])
def test_launch_update_of_len_0_before_6_18_does_nothing_and_succeeds(preset):
    """6.11-6.17: a zero len passes snp_launch_update's checks, the memslot checks still apply,
    and kvm_gmem_populate, given no pages (its test refused only a negative count), returns 0:
    the call succeeds having done nothing. (pkvm said EIO, reading kvm_gmem_populate's
    WARN_ON_ONCE(npages <= 0), which came in 6.18 with the ioctl's own test, arch/x86/kvm/svm/sev.c:
    snp_launch_update; docs/kernel-semantics.md §5.9.)"""
    vm = pkvm.VM("snp", policy=preset)
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    before = snapshot(vm)
    assert vm.snp.launch_update(0x8000, 0) == 0
    assert snapshot(vm) == before and vm.stats["launch_update_pages"] == 0
    with pytest.raises(pkvm.KvmError, match="not in a guest_memfd memslot") as e:  # the slot check
        vm.snp.launch_update(64 * MiB, 0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(pkvm.KvmError, match="bad parameters") as e:  # the others are as in 6.18+
        vm.snp.launch_update(0x8000, 0x800)
    assert e.value.errno == errno.EINVAL
    assert vm.snp.launch_update(0x8000, 0x1000) == 0x1000
    vm.check()


def test_launch_update_stops_at_the_memslot_end():
    """kvm_gmem_populate (virt/kvm/guest_memfd.c) clips the page count to the first gfn's memslot
    (``npages = min(npages, slot->npages - (start_gfn - slot->base_gfn))``): a range that runs
    into the next memslot returns the bytes up to the slot's end (the caller loops, §5.9), and
    the file of the first slot gets no folio past its binding."""
    vm = pkvm.VM("snp", policy="6.19")
    g0, g1 = vm.create_guest_memfd(8 * MiB), vm.create_guest_memfd(2 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 2 * MiB, UADDR, g0, 0)
    vm.set_user_memory_region2(1, GMEM, 2 * MiB, 2 * MiB, UADDR + 2 * MiB, g1, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    assert vm.snp.launch_update(2 * MiB - 0x2000, 0x4000) == 0x2000
    assert vm.stats["launch_update_pages"] == 2
    assert [(s, e) for s, e, _v in g0.folios.ranges()] == [(510, 512)] and g1.folios.ranges() == []
    assert vm.snp.launch_update(2 * MiB, 0x2000) == 0x2000  # the rest, from the next slot's file
    assert [(s, e) for s, e, _v in g1.folios.ranges()] == [(0, 2)]
    vm.check()


def test_launch_update_with_2m_folios_keeps_a_folio_already_in_the_block():
    """With 2M guest_memfd folios (gmem_max_order=9, the §10.3 study) populate allocates a
    large folio only when its aligned block is empty: the page cache refuses a large folio over
    a page already present (mm/filemap.c: __filemap_get_folio falls back to a smaller order),
    so a page fallocated at index 1 stays and index 0 gets an order-0 folio; nothing leaks."""
    vm = pkvm.VM("snp", policy="6.19+gmem_max_order=9")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    gmem.fallocate(pkvm.FALLOC_FL_KEEP_SIZE, 0x1000, 0x1000)
    kept = gmem.folio(1)
    assert vm.snp.launch_update(0, 0x1000) == 0x1000
    assert gmem.folio(0)[1:] == (0, True) and gmem.folio(1) == kept
    assert vm.hostmem.nr_allocated == 2
    vm.check()


def test_launch_update_stops_before_a_2m_folio_the_range_covers_in_part():
    """With 2M folios (gmem_max_order=9) populate launches a folio whole, so a range that
    ends inside one stops before it: the earlier folios are done and reported (the bytes of
    the whole folios), the cut folio is not launched and nothing past the range is touched.
    The kernel's populate warns on such a folio (it is never asked for one: upstream folios
    are 4K); a second call for the rest, starting at the folio, launches it whole."""
    vm = pkvm.VM("snp", policy="6.19+gmem_max_order=9")
    gmem = vm.create_guest_memfd(8 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 8 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    gmem.fallocate(pkvm.FALLOC_FL_KEEP_SIZE, 0, 8 * MiB)
    rmp_rest = [vm.rmp.lookup(gmem.folio(i)[0]) for i in (512, 1024)]
    assert vm.snp.launch_update(0, 3 * MiB) == 2 * MiB
    assert vm.stats["launch_update_pages"] == 512
    assert gmem.folio(0)[2] and not gmem.folio(512)[2]
    assert [vm.rmp.lookup(gmem.folio(i)[0]) for i in (512, 1024)] == rmp_rest
    assert vm.snp.launch_update(2 * MiB, 2 * MiB) == 2 * MiB
    assert vm.stats["launch_update_pages"] == 1024 and not gmem.folio(1024)[2]
    vm.check()


def test_vmm_launch_flow():
    vm = pkvm.VM("snp", policy="6.19")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    vmm.launch([(0, 0x10000, True), (0x100000, 0x2000, False)])
    assert vm.snp.launched and vm.stats["launch_update_pages"] == 18
    vm.check()


def test_vmm_launch_sets_each_region_private_first():
    """QEMU's sev_snp_launch_update sets each region's attributes PRIVATE before its
    SNP_LAUNCH_UPDATE loop (target/i386/sev.c), even though kvm_set_phys_mem made the slot
    private already: one KVM_SET_MEMORY_ATTRIBUTES per region, short-circuited then; and a
    region that is not private yet is made private rather than refused."""
    vm = pkvm.VM("snp", policy="6.19")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    before = vm.attr_ioctls
    vmm.launch([(0, 0x10000, True), (0x100000, 0x2000, False)])
    assert vm.attr_ioctls - before == 2 and vm.stats["launch_update_pages"] == 18
    vm = pkvm.VM("snp", policy="6.19")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB, mark_private=False)
    vmm.launch([(0x200000, 0x1000, True)])
    assert vm.get_memory_attributes(0x200) == pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    assert vm.get_memory_attributes(0x201) == 0 and vm.stats["launch_update_pages"] == 1
    vm.check()


# -- invariants --------------------------------------------------------------------------------------


def test_check_catches_rmp_owned_by_another_asid():
    vm, gmem, vcpu = snp_vm()
    vcpu.page_fault(0, private=True)
    pfn = gpfn(gmem, 0)
    vm.rmp.rmpupdate(pfn + 100, PG_LEVEL_4K, assigned=True, asid=2, gpa=0)  # not a gmem page
    with pytest.raises(pkvm.InternalInvariantError):
        vm.check()


def test_check_catches_shared_spte_on_assigned_pfn():
    vm, _gmem, vcpu = snp_vm(private=False)
    vcpu.access(0, private=False)
    pfn = vm.mmu.lookup(0).pfn
    vm.rmp.rmpupdate(pfn, PG_LEVEL_4K, assigned=True, asid=ASID, gpa=0)
    with pytest.raises(pkvm.InternalInvariantError):
        vm.check()


def test_docs_example():
    """The example at the top of docs/snp.md."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "snp.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/snp.md", "exec"), {})  # noqa: S102 -- our own doc example


def test_launch_update_closed_guest_memfd_is_eio():
    """kvm_gmem_populate finds no file (-EFAULT); snp_launch_update reports -EIO, error 0."""
    vm, gmem, _vcpu = snp_vm()
    gmem.close()
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="guest_memfd was closed") as e:
        vm.snp.launch_update(0, 0x1000)
    assert (e.value.errno, e.value.error, e.value.populate_errno) == (errno.EIO, 0, errno.EFAULT)
    assert snapshot(vm) == before


@pytest.mark.parametrize("preset", ["6.11", "6.16", "6.19"])
def test_psc_exits_leave_hypercall_flags_as_they_were(preset):
    """snp_begin_psc_msr and snp_begin_psc (arch/x86/kvm/svm/sev.c, 6.11 to 6.19) fill
    exit_reason, nr, ret (6.13+) and args[0..2] of run->hypercall but never its flags: userspace
    reads what the field last held. kvm_run is zeroed when the vCPU is created, so a vCPU's
    first PSC exits carry 0; after a KVM_HC_MAP_GPA_RANGE hypercall exit (whose flags
    ____kvm_emulate_hypercall in arch/x86/kvm/x86.c does write) they carry that value. pkvm
    reported KVM_EXIT_HYPERCALL_LONG_MODE on every PSC exit."""
    pol = pkvm.Policy.preset(preset)
    vm = pkvm.VM("snp", policy=pol)
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
    vcpu = vm.create_vcpu()
    shared = sv.SNP_PAGE_STATE_SHARED

    def flags_of_all_three():
        out = []
        r = vcpu.psc_msr(0x3000, shared)
        out.append(r.hypercall.flags)
        vcpu.run()
        r = vcpu.psc(sv.PscDesc.of([E(5, shared)]))
        out.append(r.hypercall.flags)
        vcpu.run()
        r = vcpu._psc_runs([(9, 1, False)], shared, [0])
        out.append(r.hypercall.flags)
        vcpu.run()
        return out

    assert flags_of_all_three() == [0, 0, 0]  # never written since KVM_CREATE_VCPU
    r = vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0x10000, 1, 0, long_mode=True)
    assert r.hypercall.flags == pkvm.constants.KVM_EXIT_HYPERCALL_LONG_MODE
    vcpu.run()
    assert flags_of_all_three() == [pkvm.constants.KVM_EXIT_HYPERCALL_LONG_MODE] * 3
    r = vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0x10000, 1, 0, long_mode=False)
    assert r.hypercall.flags == 0
    vcpu.run()
    assert flags_of_all_three() == [0, 0, 0]
    # a refused hypercall (bad arguments) exits nowhere and writes nothing
    r = vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0x10000, 1, 0, long_mode=True)
    vcpu.run()
    assert vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, 0x10001, 1, 0, long_mode=False).ret == "done"
    assert flags_of_all_three() == [pkvm.constants.KVM_EXIT_HYPERCALL_LONG_MODE] * 3
    # another vCPU has its own kvm_run
    vcpu = vm.create_vcpu()
    assert flags_of_all_three() == [0, 0, 0]
