"""Every loop the kernel retries until another thread acts is bounded in the synchronous API
(``pkvm.constants.RETRY_LIMIT``) and reports where it stopped (docs/kvm-model.md, docs/snp.md)."""

import errno

import pytest
from tdxhelpers import td, tdx_snapshot
from vmhelpers import UADDR

import pkvm
from pkvm import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.constants import RETRY_LIMIT

MiB = 1 << 20


def _snp_2m_in_use():
    """The issue's hang: a 2M folio mapped by a 2M RMP entry, the 2M chunk made mixed (4K NPT
    leaves), and the RMP entry held in use by another CPU."""
    vm = pkvm.VM("snp", policy="6.19+gmem_max_order=9")
    gm = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, userspace_addr=UADDR, guest_memfd=gm)
    vm.set_memory_attributes(0, 4 * MiB, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    v = vm.create_vcpu()
    f = v.page_fault(0, private=True)
    assert (f.ret, f.level) == ("fixed", PG_LEVEL_2M) and vm.rmp.lookup(f.pfn).level == PG_LEVEL_2M
    vm.set_memory_attributes(0x1000, 0x1000, 0)
    vm.rmp.set_in_use(f.pfn, 512)
    return vm, v, f.pfn


def test_retry_limit_is_one_public_constant():
    assert pkvm.constants.RETRY_LIMIT == RETRY_LIMIT and type(RETRY_LIMIT) is int and RETRY_LIMIT > 1


def test_access_needing_a_split_of_an_in_use_2m_rmp_entry_stops_with_rmp_loop():
    """sev_handle_rmp_fault -> snp_rmptable_psmash spins on FAIL_INUSE: the vCPU never reaches
    the zap. The access stops with rmp_loop after RETRY_LIMIT attempts, naming the PSMASH."""
    vm, v, pfn = _snp_2m_in_use()
    assert v.page_fault(0x2000, private=True).level == PG_LEVEL_4K
    r = v.access(0x2000, private=True)
    assert (r.ret, r.pages_done, r.retries) == ("rmp_loop", 0, RETRY_LIMIT)
    assert "PSMASH FAIL_INUSE" in r.loop
    assert vm.stats["psmash_failures"] == 1 and vm.stats["rmp_fault"] == 1
    assert vm.rmp.lookup(pfn).level == PG_LEVEL_2M  # nothing split
    assert vm.mmu.lookup(2) is not None  # nothing zapped: the kernel never got past the PSMASH
    assert any("FAIL_INUSE" in m and str(RETRY_LIMIT) in m for _k, m in vm.events)
    vm.check()
    # Once the holder releases the entry the same access gets past the PSMASH + zap + refault
    # and meets the page's Validated = 0: a #VC in the guest (the page was never validated).
    vm.rmp.set_in_use(pfn, 512, False)
    assert v.access(0x2000, private=True).ret == "vc"
    assert vm.rmp.lookup(pfn + 2).level == PG_LEVEL_4K and vm.stats["psmash"] == 1
    vm.check()


def test_pvalidate_on_in_use_2m_entry_stops_with_rmp_loop():
    """A 4K PVALIDATE inside a 2M RMP entry needs the PSMASH too (NPF_SIZEM): same stop."""
    vm, v, _pfn = _snp_2m_in_use()
    r = v.pvalidate(0x2000, PG_LEVEL_4K, True)
    assert (r.ret, r.retries, r.value) == ("rmp_loop", RETRY_LIMIT, 0x2000)
    assert "PSMASH" in r.loop
    vm.check()


def test_tdx_accept_with_aug_always_busy_stops_with_retry_loop():
    """PAGE.AUG returning TDX_OPERAND_BUSY makes the EPT violation RET_PF_RETRY; the TDCALL
    re-executes. With the BUSY never released the ACCEPT stops after RETRY_LIMIT attempts."""
    vm, vmm, gmem, vcpu = td()
    vm.tdx.inject_busy("aug", 10 * RETRY_LIMIT)
    r = vcpu.accept(0x4000, PG_LEVEL_4K)
    assert (r.ret, r.retries, r.value) == ("retry_loop", RETRY_LIMIT, 0x4000)
    assert "RET_PF_RETRY" in r.loop
    assert vm.stats["pf_retry"] == RETRY_LIMIT and vm.sept.state(4) == "free"
    vm.check()
    vm.tdx.inject_busy("aug", 0)
    assert vcpu.accept(0x4000, PG_LEVEL_4K).status == pkvm.constants.TDX_SUCCESS


def test_access_with_aug_always_busy_stops_with_retry_loop():
    vm, vmm, gmem, vcpu = td()
    vm.tdx.inject_busy("aug", 10 * RETRY_LIMIT)
    r = vcpu.access(0x4000, private=True)  # a fault that keeps returning RET_PF_RETRY: ret "retry"
    assert (r.ret, r.pages_done, r.retries, r.loop) == ("retry", 0, RETRY_LIMIT, "RET_PF_RETRY")
    vm.check()


def test_tdx_init_mem_region_busy_walk_is_bounded():
    """kvm_tdp_mmu_map_private_pfn loops while the walk returns RET_PF_RETRY until a signal
    (-EINTR). A SEPT.ADD that stays busy stops the ioctl with EINTR and nothing added."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    vm.tdx.inject_busy("sept_add", 10 * RETRY_LIMIT)
    before = tdx_snapshot(vm)
    with pytest.raises(pkvm.KvmError, match=f"TDX_OPERAND_BUSY for {RETRY_LIMIT} attempts") as exc:
        vm.tdx.init_mem_region(vcpu, 0, 1)
    assert exc.value.errno == errno.EINTR and exc.value.progress == (0, 1)
    assert vm.stats["seamcall_busy"] == RETRY_LIMIT
    after = tdx_snapshot(vm)
    # Only the counters of the busy SEAMCALLs moved; the S-EPT, the MMU and the folios did not.
    assert after[1:] == before[1:] and after[0][:2] == before[0][:2]
    vm.check()


def test_the_core_pvalidate_walk_has_the_same_bound():
    """pkvm/_snp_guest.pxi repeats RETRY_LIMIT for the PVALIDATE walk (C code cannot import it)."""
    from vmhelpers import assert_core_constants

    assert_core_constants("_snp_guest.pxi", {"_PV_RETRY_LIMIT = 64  # pkvm.constants.RETRY_LIMIT": RETRY_LIMIT == 64})


@pytest.mark.parametrize("form", ["range", "one"])
def test_pvalidate_under_an_invalidation_left_open_stops_with_rmp_loop(form):
    """A PVALIDATE whose #NPF meets an invalidation nobody will end (one begun and left open,
    as a phased ioctl stopped mid-way leaves it) retries (RET_PF_RETRY) without end in the
    kernel; in the synchronous API it stops after RETRY_LIMIT attempts, the range walk of the
    core as the single instruction does. The range walk used to re-fault forever."""
    vm = pkvm.VM("snp", nr_vcpus=1)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 64 << 20)
    vcpu = vm.create_vcpu()
    gpa = 20 << 20
    vm.set_memory_attributes(gpa, 2 << 20, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm._invalidate_begin()
    vm._invalidate_range_add(gpa >> 12, (gpa >> 12) + 512)
    if form == "range":
        r = vcpu.pvalidate_range(gpa, 2 << 20, True)
    else:
        r = vcpu.pvalidate(gpa, PG_LEVEL_4K, True)
    assert (r.ret, r.value, r.retries, r.loop) == ("rmp_loop", gpa, RETRY_LIMIT, "PVALIDATE #NPF refault")
    assert r.faults == RETRY_LIMIT
    assert vm.stats["pf_retry"] == RETRY_LIMIT and vm.stats["pvalidate"] == 0


@pytest.mark.parametrize("platform,policy,workload,vcpus", [("snp", "fault-time", "swiotlb", 32),
                                                             ("snp", "eager-post", "implicit", 64),
                                                             ("tdx", "6.19", "swiotlb", 64),
                                                             ("sw_protected", "6.19", "swiotlb", 32)])
def test_faults_turned_back_by_other_threads_invalidations_are_not_a_loop(platform, policy, workload, vcpus):
    """On the timeline a fault whose pfn lookup another thread's invalidation ended during is
    turned back (``mmu_invalidate_seq`` moved: RET_PF_RETRY) and re-faults at once, as the
    kernel's does; it is not a loop that cannot end. With 32 vCPUs converting bounce buffers at
    once one gfn was turned back that way 64 times in a row, and the run ended with EIO as if
    the guest had hung (``Timeline.retry_fault`` counted only the retries it spun out). Each
    case failed so before 2026-12-06 (evening), at 1 GiB with these vCPUs."""
    from pkvm import experiments as E

    r = E.run(E.Config(platform=platform, policy=policy, memory="1G", vcpus=vcpus, workload=workload))
    assert r.critical_path_ns > 0 and r.races["pf_retry"] > 0
