"""KVM_PRE_FAULT_MEMORY (``vcpu.pre_fault_memory``), written from kvm_vcpu_pre_fault_memory
(virt/kvm/kvm_main.c) and kvm_arch_vcpu_pre_fault_memory (arch/x86/kvm/mmu/mmu.c), and the
SNP launch price (docs/costs.md)."""

import errno

import pytest
from tdxhelpers import td
from vmhelpers import GMEM, PRIVATE, UADDR, MiB, beside_invalidation, gmem_vm, snapshot

import pkvm


def _snp(launched=True, private=True):
    vm = pkvm.VM("snp", policy="6.19")
    gmem = vm.create_guest_memfd(8 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 8 * MiB, UADDR, gmem, 0)
    if private:
        vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    if launched:
        vm.snp.launch_finish()
    return vm, vm.create_vcpu()


@pytest.mark.parametrize("gpa, size", [(0x800, 0x1000), (0, 0x800), (0, 0), ((1 << 64) - 0x1000, 0x2000)])
def test_bad_ranges_are_einval_and_change_nothing(gpa, size):
    vm, vcpu = _snp()
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="non-empty, 4 KiB aligned range") as e:
        vcpu.pre_fault_memory(gpa, size)
    assert e.value.errno == errno.EINVAL and snapshot(vm) == before


def test_snp_before_launch_finish_is_eopnotsupp():
    """pre_fault_allowed is set by snp_launch_finish: before it the ioctl refuses."""
    vm, vcpu = _snp(launched=False)
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="before the guest is launched") as e:
        vcpu.pre_fault_memory(0, 0x1000)
    assert e.value.errno == errno.EOPNOTSUPP and snapshot(vm) == before


def test_tdx_before_finalize_is_eopnotsupp_after_it_maps_pending_pages():
    vm, vmm, gmem, vcpu = td(finalize=False)
    with pytest.raises(pkvm.KvmError, match="before the guest is launched"):
        vcpu.pre_fault_memory(0x100000, 0x1000)
    vm.tdx.finalize_vm()
    assert vcpu.pre_fault_memory(0x100000, 0x2000) == 0x2000
    assert vm.sept.state(0x100) == "pending" and vm.stats["pf_taken"] == 0
    vm.check()


def test_tdx_aliased_gpa_is_einval():
    """kvm_arch_vcpu_pre_fault_memory refuses a gfn with the TD's shared bit (kvm_is_gfn_alias):
    EINVAL, nothing mapped. A range that runs into the alias half keeps the pages before it
    (kvm_vcpu_pre_fault_memory returns success once a page was mapped)."""
    vm, vmm, gmem, vcpu = td()
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError) as e:
        vcpu.pre_fault_memory(1 << 47, 0x1000)
    assert e.value.errno == errno.EINVAL and snapshot(vm) == before
    with pytest.raises(pkvm.KvmError) as e:
        vcpu.pre_fault_memory((1 << 47) | 0x100000, 0x2000)
    assert e.value.errno == errno.EINVAL and snapshot(vm) == before
    vm2, vmm2, gmem2, vcpu2 = td(gpaw=52)
    with pytest.raises(pkvm.KvmError) as e:
        vcpu2.pre_fault_memory(1 << 51, 0x1000)
    assert e.value.errno == errno.EINVAL
    # Below the shared bit but outside the memslots: the fault finds no slot (ENOENT).
    with pytest.raises(pkvm.KvmError) as e:
        vcpu.pre_fault_memory((1 << 47) - 0x1000, 0x1000)
    assert e.value.errno == errno.ENOENT


def test_snp_prefault_spares_the_accept_its_npf_exits():
    """Lazy acceptance of a 4M chunk: without pre-faulting, each of the 1,024 4K PVALIDATEs
    (order-0 guest_memfd) takes an #NPF; after KVM_PRE_FAULT_MEMORY none does. The prefetch
    counts pf_fixed, never pf_taken, and each page costs pre_fault_page, not npf_fault."""
    vm, vcpu = _snp()
    assert vcpu.pre_fault_memory(0, 4 * MiB) == 4 * MiB
    assert (vm.stats["pf_fixed"], vm.stats["pf_taken"], vm.stats["memory_fault_exits"]) == (1024, 0, 0)
    cb = vm.cost_breakdown()
    assert cb["pre_fault_page"] == 1024 * vm.costs.ns("pre_fault_page") and "npf_fault" not in cb
    r = vcpu.pvalidate_range(0, 4 * MiB, True)
    assert (r.ret, r.status, r.faults) == ("done", 0, 0) and vm.stats["pf_taken"] == 0
    vm.check()
    vm2, vcpu2 = _snp()
    assert vcpu2.pvalidate_range(0, 4 * MiB, True).faults == 1024 == vm2.stats["pf_taken"]


def test_partial_progress_and_first_page_errors():
    """A failure after some pages returns what was done; on the first page it is the error
    (-ENOENT outside memslots, from RET_PF_EMULATE)."""
    vm, vcpu = _snp()
    assert vcpu.pre_fault_memory(8 * MiB - 0x2000, 0x4000) == 0x2000  # runs off the memslot
    with pytest.raises(pkvm.KvmError, match="ENOENT") as e:
        vcpu.pre_fault_memory(8 * MiB, 0x1000)
    assert e.value.errno == errno.ENOENT
    vm.check()


def test_shared_pages_of_a_plain_vm_are_allowed_at_once():
    vm, _gmem, vcpu = gmem_vm()
    assert vcpu.pre_fault_memory(0, 0x3000) == 0x3000  # a 2M THP mapping may cover more
    assert vm.mmu.lookup(2) is not None and vm.stats["pf_taken"] == 0
    vm.check()


def test_a_page_inside_a_huge_mapping_advances_to_its_end():
    """kvm_arch_vcpu_pre_fault_memory (arch/x86/kvm/mmu/mmu.c) returns
    ``min(size, end - gpa)`` with ``end`` the end of the mapping level's huge page: a range that
    starts inside a 2M mapping is done up to the 2M boundary by one call of the fault path
    (one pre_fault_page), not page by page."""
    vm, _gmem, vcpu = gmem_vm(policy="6.19")
    assert vcpu.pre_fault_memory(0, 0x1000) == 0x1000
    assert vm.mmu.lookup(0).level == 2
    price = vm.costs.ns("pre_fault_page")
    assert vm.cost_breakdown()["pre_fault_page"] == price
    assert vcpu.pre_fault_memory(0x1000, 2 * MiB - 0x1000) == 2 * MiB - 0x1000
    assert vm.cost_breakdown()["pre_fault_page"] == 2 * price
    assert vm.stats["pf_fixed"] == 1 and vm.stats["pf_taken"] == 0


def test_snp_launch_update_charges_the_psp_per_page():
    """sev_gmem_post_populate issues one SEV_CMD_SNP_LAUNCH_UPDATE per 4K page."""
    vm, vcpu = _snp(launched=False)
    assert vm.snp.launch_update(0, 0x4000) == 0x4000
    assert vm.cost_breakdown()["psp_launch_update"] == 4 * vm.costs.ns("psp_launch_update") == 40_000



@pytest.mark.parametrize("preset", ["6.8", "rfc-v8"])
def test_no_pre_fault_ioctl_before_6_11(preset):
    """KVM_PRE_FAULT_MEMORY arrived in 6.11: on an older kernel the ioctl number is unknown and
    kvm_arch_vcpu_ioctl answers EINVAL before reading anything; nothing is mapped or counted."""
    vm, _gmem, vcpu = gmem_vm(policy=preset)
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="does not have the ioctl") as e:
        vcpu.pre_fault_memory(0, 2 * MiB)
    assert e.value.errno == errno.EINVAL and snapshot(vm) == before
    vm, _gmem, vcpu = gmem_vm(policy="6.11")
    assert vcpu.pre_fault_memory(0, 2 * MiB) == 2 * MiB


# -- a pre-fault racing a memslot deletion (KVM_MEMSLOT_INVALID) ---------------------------------

def _deleting(vm):
    """Mark memslot 0 as the kernel does while KVM_MR_DELETE / KVM_MR_MOVE is in progress
    (kvm_invalidate_memslot installs a copy with KVM_MEMSLOT_INVALID)."""
    vm.memslot(0).invalid = True


@pytest.mark.parametrize("preset, err, attempts", [
    ("6.11", errno.EINTR, pkvm.constants.RETRY_LIMIT),
    ("6.16", errno.EINTR, pkvm.constants.RETRY_LIMIT),
    ("6.19", errno.EAGAIN, 1),
])
def test_pre_fault_on_a_memslot_being_deleted(preset, err, attempts):
    """kvm_mmu_faultin_pfn (arch/x86/kvm/mmu/mmu.c) answers a fault on a slot being deleted or
    moved with RET_PF_RETRY. Until 6.17 kvm_tdp_map_page retried it until a signal (EINTR: the
    deletion waits for the SRCU read side the ioctl holds, so nothing else ends the loop); since
    6.18 a prefetch fault fails with -EAGAIN at once. Either way nothing is mapped or counted:
    the call keeps only the modeled time of its attempts, like any pre-fault that walked the
    fault path and failed. Once the deletion is done the gpa has no memslot: ENOENT."""
    vm, _gmem, vcpu = gmem_vm(policy=preset)
    _deleting(vm)
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError) as e:
        vcpu.pre_fault_memory(0, 0x1000)
    assert e.value.errno == err
    after = snapshot(vm)
    assert after[:5] == before[:5] and after[7:] == before[7:]
    price = vm.costs.ns("pre_fault_page")
    assert after[5] - before[5] == attempts * price
    assert {k: v - before[6].get(k, 0) for k, v in after[6].items() if before[6].get(k) != v} == {
        "pre_fault_page": attempts * price}
    vm.set_user_memory_region2(0, GMEM, 0, 0, UADDR)  # the deletion completes
    with pytest.raises(pkvm.KvmError) as e:
        vcpu.pre_fault_memory(0, 0x1000)
    assert e.value.errno == errno.ENOENT


@pytest.mark.parametrize("preset", ["6.16", "6.19"])
def test_pre_fault_keeps_the_pages_before_a_memslot_being_deleted(preset):
    """kvm_vcpu_pre_fault_memory (virt/kvm/kvm_main.c) reports success once a page was mapped:
    a range that runs into a slot being deleted returns the bytes before it, with EAGAIN (6.18+)
    or EINTR (before) swallowed."""
    vm = pkvm.VM("sw_protected", policy=preset)
    vm.set_user_memory_region2(0, 0, 4 * MiB, 4 * MiB, UADDR + 4 * MiB)
    vm.set_user_memory_region2(1, 0, 0, 4 * MiB, UADDR)
    vcpu = vm.create_vcpu()
    _deleting(vm)  # memslot 0, the upper one
    assert vcpu.pre_fault_memory(4 * MiB - 0x1000, 0x2000) == 0x1000
    assert vm.mmu.lookup(1023) is not None and vm.mmu.lookup(1024) is None
    vm.memslot(0).invalid = False  # (vm.check refuses a slot left marked between ioctls)
    vm.check()


def test_snp_private_pre_fault_on_a_memslot_being_deleted_is_eagain():
    """The slot check comes before guest_memfd is asked for the page (kvm_mmu_faultin_pfn): on
    6.19 an SNP private pre-fault gets EAGAIN with no folio allocated and no RMP entry changed."""
    vm, vcpu = _snp()
    _deleting(vm)
    before, rmp = snapshot(vm), vm.rmp.ranges()
    with pytest.raises(pkvm.KvmError, match="being deleted or moved") as e:
        vcpu.pre_fault_memory(0, 2 * MiB)
    assert e.value.errno == errno.EAGAIN and vm.rmp.ranges() == rmp
    after = snapshot(vm)
    assert after[:5] == before[:5] and after[5] - before[5] == vm.costs.ns("pre_fault_page")


def test_pre_fault_on_the_timeline_waits_out_another_threads_invalidation():
    """kvm_tdp_map_page (arch/x86/kvm/mmu/mmu.c) retries RET_PF_RETRY until the fault goes
    through or a signal comes: while another thread's invalidation covers the page the
    ioctl loops, and it maps the page once that ends. On the timeline the loop is a spin
    (Timeline.retry_fault): the call succeeds after the invalidation, and its retries count
    no pf_taken or pf_retry (prefetch faults are not counted, kvm_mmu_do_page_fault). It
    used to give up after RETRY_LIMIT attempts within a few µs and fail with EINTR, though no
    signal ever came."""
    vm, _gmem, vcpu = gmem_vm(policy="6.19")
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    hold = 5_000_000
    mapped, done, end, r = beside_invalidation(vm, 0, 512, hold, 1_000,
                                               lambda: vcpu.pre_fault_memory(0, 0x1000))
    assert mapped == 0x1000 and done >= end
    assert vm.mmu.sptes.get(0)
    assert vm.stats["pf_taken"] == 0 and vm.stats["pf_retry"] == 0
    assert hold - 10_000 < r.races["pf_retry_ns"] <= hold


def test_pre_fault_turned_back_by_more_invalidations_than_the_retry_limit_still_maps():
    """Each time another thread's invalidation of the page ends during the pre-fault's fault
    (mmu_invalidate_seq moved since its snapshot), kvm_tdp_map_page retries and gets through
    once the invalidations stop: a retry another thread explains is not one of a loop that
    cannot end, so RETRY_LIMIT does not cut it short (it used to count every retry and fail
    with EINTR after RETRY_LIMIT of them, though no signal ever came)."""
    from pkvm.sim import WRITE, Timeline

    vm, _gmem, vcpu = gmem_vm(policy="6.19")
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    tl = Timeline(vm)
    n = 3 * pkvm.constants.RETRY_LIMIT
    out = {}

    def notifier():  # short invalidations of the page, back to back
        for _ in range(n):
            tl.acquire("mmu_lock", WRITE)
            vm._invalidate_begin()
            vm._invalidate_range_add(0, 512)
            tl.release("mmu_lock", WRITE)
            tl.sleep(500)
            tl.acquire("mmu_lock", WRITE)
            vm._invalidate_end()
            tl.release("mmu_lock", WRITE)
            tl.sleep(500)
        out["end"] = tl.now_ns

    def vcpu0():
        tl.sleep(1_000)
        out["mapped"] = vcpu.pre_fault_memory(0, 0x1000)
        out["done"] = tl.now_ns

    tl.spawn("vmm", notifier)
    tl.spawn("vcpu0", vcpu0)
    tl.run()
    r = tl.result()
    assert out["mapped"] == 0x1000 and out["done"] > out["end"]
    assert r.races["pf_retry"] > pkvm.constants.RETRY_LIMIT
    assert vm.mmu.sptes.get(0)
    vm.check()
