"""TD build: KVM_TDX_INIT_MEM_REGION in its 6.16 (premap then ADD) and 6.19 (ADD in the S-EPT hook)
forms, measurement, and KVM_TDX_FINALIZE_VM (kernel-semantics.md §6.3, App. A ``tdx_initial_image``)."""

import errno

import pytest
from tdxhelpers import PRIVATE, PUNCH, SHARED47, MiB, ops, seamcalls, td, tdx_snapshot, trace
from vmhelpers import GMEM, UADDR

import pkvm
from pkvm.constants import RETRY_LIMIT, TDX_EPT_ENTRY_STATE_INCORRECT

MEASURE = pkvm.KVM_TDX_MEASURE_MEMORY_REGION


@pytest.mark.parametrize("policy", ["6.16", "6.19"])
def test_init_mem_region_adds_measured_pages(policy):
    """Both forms end with MAPPED pages, one PAGE.ADD and 16 MR.EXTEND per page, prepared folios."""
    vm, vmm, gmem, vcpu = td(policy=policy, finalize=False)
    t = trace(vm)
    assert vm.tdx.init_mem_region(vcpu, 0x1000, 2, flags=MEASURE) == 2
    assert [e[0] for e in ops(t)] == ["TDH.MEM.SEPT.ADD"] * 3 + ["TDH.MEM.PAGE.ADD", "TDH.MR.EXTEND"]
    assert t[-1][1:3] == (1, 3) and vm.sept.state(1) == vm.sept.state(2) == "mapped"
    assert seamcalls(vm) == {"seamcall_sept_add": 3, "seamcall_add": 2, "seamcall_mr_extend": 32}
    assert vm.cost_breakdown()["seamcall_mr_extend"] == vm.costs.ns("seamcall_mr_extend", 2)  # per page
    assert gmem.folio(1)[2] and vm.tdx.nr_premapped == 0
    # 6.16's mirror mapping is a prefetch fault: pf_fixed counts it, pf_taken does not.
    assert (vm.stats["pf_taken"], vm.stats["pf_fixed"]) == (0, 2 if policy == "6.16" else 0)
    vm.check()
    vm.tdx.finalize_vm()
    assert vm.tdx.state == "runnable" and vm.stats["seamcall_mr_finalize"] == 1
    assert vcpu.access(0x1000, private=True, size=8192).ret == "done"  # ADDed pages need no ACCEPT


def test_unmeasured_region_has_no_mr_extend():
    """Without KVM_TDX_MEASURE_MEMORY_REGION there is no TDH.MR.EXTEND."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    vm.tdx.init_mem_region(vcpu, 0, 4)
    assert vm.stats["seamcall_mr_extend"] == 0 and vm.stats["seamcall_add"] == 4


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(gpa=0x800), "must be 4 KiB aligned"),
    (dict(source_addr=0x10), "must be 4 KiB aligned"),
    (dict(nr_pages=0), "non-empty private range"),
    (dict(gpa=SHARED47), "non-empty private range"),
    (dict(gpa=SHARED47 - 4096, nr_pages=2), "non-empty private range"),
    (dict(gpa=(1 << 64) - 4096, nr_pages=2), "non-empty private range"),
    (dict(flags=2), "flags 0x2"),
], ids=["unaligned-gpa", "unaligned-source", "no-pages", "shared-gpa", "ends-shared", "wraps", "unknown-flag"])
def test_init_mem_region_validation_is_einval_and_changes_nothing(kwargs, match):
    """Bad regions fail with EINVAL before any page is touched."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    args = dict(gpa=0, nr_pages=1, source_addr=0, flags=0) | kwargs
    before = tdx_snapshot(vm)
    with pytest.raises(pkvm.KvmError, match=match) as exc:
        vm.tdx.init_mem_region(vcpu, args.pop("gpa"), args.pop("nr_pages"), **args)
    assert exc.value.errno == errno.EINVAL and tdx_snapshot(vm) == before


def test_init_mem_region_argument_types():
    """The vCPU must be one of this VM; ints must be u64."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    with pytest.raises(TypeError, match="vcpu must be a pkvm.Vcpu"):
        vm.tdx.init_mem_region(None, 0, 1)
    with pytest.raises(ValueError, match="vcpu belongs to another VM"):
        vm.tdx.init_mem_region(pkvm.VM("tdx").create_vcpu(), 0, 1)
    with pytest.raises(TypeError, match="nr_pages must be an int"):
        vm.tdx.init_mem_region(vcpu, 0, 1.0)


@pytest.mark.parametrize(("setup", "err", "pages_done"), [
    ("shared", errno.EINVAL, 3),
    ("no-slot", errno.EINVAL, 3),
    ("populated", errno.EEXIST, 3),
    ("closed", errno.EFAULT, 0),
], ids=["not-private", "no-memslot", "already-populated", "gmem-closed"])
def test_init_mem_region_stops_with_progress(setup, err, pages_done):
    """A per-page failure keeps the pages already added and reports what remains (the region write-back)."""
    vm = pkvm.VM("tdx")
    vmm = pkvm.Vmm(vm)
    gmem = vmm.add_ram(0, 4 * MiB)
    vcpu = vm.create_vcpu()
    if setup == "shared":
        vm.set_memory_attributes(0x3000, 4096, 0)
    elif setup == "populated":
        vm.tdx.init_mem_region(vcpu, 0x3000, 1)
    elif setup == "closed":
        gmem.close()
    start = 4 * MiB - 0x3000 if setup == "no-slot" else 0
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, start, 6)
    assert exc.value.errno == err
    assert exc.value.progress == (start + pages_done * 4096, 6 - pages_done)
    assert vm.stats["seamcall_add"] == pages_done + (setup == "populated")
    vm.check()


TASK_SIZE_MAX = (1 << 47) - 4096  # x86_64, 4-level host paging (pkvm.constants.TASK_SIZE_MAX)


@pytest.mark.parametrize("policy", ["6.16", "6.19"])
@pytest.mark.parametrize(("source", "err", "pages_done"), [
    (0, errno.EFAULT, 0),
    (TASK_SIZE_MAX, errno.EFAULT, 0),
    ((1 << 64) - 4096, errno.EOVERFLOW, 0),
    (TASK_SIZE_MAX - 2 * 4096, errno.EFAULT, 2),
], ids=["null", "above-task-size", "wraps", "crosses-task-size"])
def test_init_mem_region_source_that_cannot_be_pinned(policy, source, err, pages_done):
    """tdx_gmem_post_populate (arch/x86/kvm/vmx/tdx.c, 6.16 and 6.19) first pins the page's
    source with get_user_pages_fast, whose gup_fast_fallback (mm/gup.c) refuses a range past
    TASK_SIZE_MAX (-EFAULT) or wrapping (-EOVERFLOW); address 0, which a VMM does not map, is
    pkvm's stand-in for an unmapped source (-EFAULT: no VMA). kvm_gmem_populate has found or
    allocated the folio by then (not prepared); nothing is mapped or added for that page, the
    pages before it stay added and the region written back says what remains. pkvm accepted
    such a source and added the pages."""
    vm, vmm, gmem, vcpu = td(policy=policy, finalize=False)
    nr_premapped = vm.tdx.nr_premapped
    with pytest.raises(pkvm.KvmError, match="get_user_pages_fast cannot pin the source page") as exc:
        vm.tdx.init_mem_region(vcpu, 0x1000, 4, source_addr=source, flags=MEASURE)
    assert exc.value.errno == err
    assert exc.value.progress == (0x1000 + pages_done * 4096, 4 - pages_done)
    assert vm.stats["seamcall_add"] == pages_done
    assert vm.tdx.nr_premapped == nr_premapped
    failed = 1 + pages_done
    assert vm.sept.state(failed) == "free" and vm.mmu.lookup(failed) is None
    assert gmem.folio(failed) is not None and not gmem.folio(failed)[2]  # allocated, not prepared
    vm.check()
    # the page is not EEXIST: a mapped source adds it and the rest
    assert vm.tdx.init_mem_region(vcpu, 0x1000 + pages_done * 4096, 4 - pages_done, source_addr=0x7f0000000000,
                                  flags=MEASURE) == 4 - pages_done
    vm.tdx.finalize_vm()


def test_init_mem_region_default_source_is_a_mapped_buffer():
    """source_addr=None (the default) stands for the VMM's mapped image: every page is added;
    an unaligned source is EINVAL among the ioctl's argument checks, before any page."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    assert vm.tdx.init_mem_region(vcpu, 0, 2) == 2
    before = tdx_snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="must be 4 KiB aligned") as exc:
        vm.tdx.init_mem_region(vcpu, 0x2000, 1, source_addr=0x7f0000000800)
    assert exc.value.errno == errno.EINVAL and tdx_snapshot(vm) == before
    with pytest.raises(TypeError):
        vm.tdx.init_mem_region(vcpu, 0x2000, 1, source_addr=1.0)


def test_finalize_rules():
    """KVM_TDX_FINALIZE_VM: once only; busy MR.FINALIZE is EBUSY; after it no more INIT_MEM_REGION."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    vm.tdx.inject_busy("mr_finalize")
    with pytest.raises(pkvm.KvmError, match="TDH.MR.FINALIZE returned TDX_OPERAND_BUSY") as exc:
        vm.tdx.finalize_vm()
    assert exc.value.errno == errno.EBUSY and vm.tdx.state == "initialized"
    vm.tdx.finalize_vm()
    for call in (vm.tdx.finalize_vm, lambda: vm.tdx.init_mem_region(vcpu, 0, 1)):
        with pytest.raises(pkvm.KvmError, match="already") as exc:
            call()
        assert exc.value.errno == errno.EINVAL


def test_616_busy_add_leaves_page_premapped_and_blocks_finalize():
    """6.16: a busy PAGE.ADD after the premap fails the ioctl (EBUSY); nr_premapped stops finalization."""
    vm, vmm, gmem, vcpu = td(policy="6.16", finalize=False)
    vm.tdx.init_mem_region(vcpu, 0, 1)
    vm.tdx.inject_busy("add")
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0x1000, 2)
    assert (exc.value.errno, exc.value.progress) == (errno.EBUSY, (0x1000, 2))
    assert vm.tdx.nr_premapped == 1 and vm.sept.state(1) == "free" and vm.mmu.lookup(1) is not None
    vm.check()
    with pytest.raises(pkvm.KvmError, match="premapped pages still wait") as exc:
        vm.tdx.finalize_vm()
    # The premap made the folio up to date, so populate cannot retry the page: EEXIST.
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0x1000, 1)
    assert exc.value.errno == errno.EEXIST
    # Zapping the premapped page: BLOCK finds no S-EPT leaf (ENTRY_STATE_INCORRECT), the count goes back.
    t = trace(vm)
    gmem.fallocate(PUNCH, 0x1000, 0x1000)
    assert [(e.op, e.status) for e in t] == [("TDH.MEM.RANGE.BLOCK", TDX_EPT_ENTRY_STATE_INCORRECT)]
    assert vm.tdx.nr_premapped == 0 and not vm.vm_dead
    vm.tdx.finalize_vm()
    vm.check()


def test_616_busy_walk_until_a_signal_still_prepares_the_folio():
    """6.16: the premap is a prefetch fault (kvm_tdp_map_page), whose fault-in step gets the pfn
    from guest_memfd (kvm_gmem_get_pfn: zero, mark up to date) before the walk. A walk that stays
    TDX_OPERAND_BUSY until a signal (EINTR) so leaves the folio prepared though nothing was
    mapped or counted: the page cannot be populated again (EEXIST), and the TD still finalizes.
    6.19 maps the pfn populate found without asking guest_memfd again, so its folio stays
    unprepared (test_retry_bounds.py: test_tdx_init_mem_region_busy_walk_is_bounded)."""
    vm, vmm, gmem, vcpu = td(policy="6.16", finalize=False)
    vm.tdx.inject_busy("sept_add", RETRY_LIMIT)
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0x1000, 1)
    assert (exc.value.errno, exc.value.progress) == (errno.EINTR, (0x1000, 1))
    assert gmem.folio(1)[2], "the premap fault's guest_memfd lookup prepared the folio"
    assert vm.tdx.nr_premapped == 0 and vm.mmu.lookup(1) is None and vm.sept.state(1) == "free"
    assert vm.stats["seamcall_add"] == 0 and vm.stats["pf_fixed"] == 0
    vm.check()
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0x1000, 1)
    assert exc.value.errno == errno.EEXIST
    assert vm.tdx.init_mem_region(vcpu, 0x2000, 1) == 1
    vm.tdx.finalize_vm()
    vm.check()


def test_619_busy_add_is_retried_inside_the_ioctl():
    """6.19: a busy PAGE.ADD in the S-EPT hook is RET_PF_RETRY; kvm_tdp_mmu_map_private_pfn loops."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    vm.tdx.inject_busy("add", 2)
    t = trace(vm)
    assert vm.tdx.init_mem_region(vcpu, 0, 1) == 1
    assert [e[0] for e in ops(t)][-3:] == ["TDH.MEM.PAGE.ADD BUSY", "TDH.MEM.PAGE.ADD BUSY", "TDH.MEM.PAGE.ADD"]


def test_zap_before_finalize_skips_track():
    """Removing an ADDed page before finalization: no TRACK, no kick (no vCPU has run)."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    vm.tdx.init_mem_region(vcpu, 0, 1)
    t = trace(vm)
    vm.set_memory_attributes(0, 4096, 0)
    assert [e[0] for e in ops(t)] == ["TDH.MEM.RANGE.BLOCK", "TDH.MEM.PAGE.REMOVE", "TDH.PHYMEM.PAGE.WBINVD",
                                      "clear"]
    assert vm.stats["vcpu_kicks"] == 0


def test_measure_failure_bugs_the_vm():
    """TDH.MR.EXTEND failing is a TDX_BUG_ON: EIO, and the page is not counted."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    vm.tdx.inject_busy("mr_extend")
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0, 2, flags=MEASURE)
    assert exc.value.errno == errno.EIO and exc.value.progress == (0, 2) and vm.vm_bugged
    vm.check()


def test_measure_failure_on_6_16_is_eio_without_bugging_the_vm():
    """6.16's tdx_gmem_post_populate returns -EIO when TDH.MR.EXTEND fails, after PAGE.ADD
    succeeded and nr_premapped went down; no KVM_BUG_ON (6.19 added it). The page stays added
    and its folio prepared (the premap fault prepared it), so a retry is EEXIST; the other
    pages can still be added and the TD finalized."""
    vm, vmm, gmem, vcpu = td(policy="6.16", finalize=False)
    vm.tdx.inject_busy("mr_extend")
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0, 2, flags=MEASURE)
    assert exc.value.errno == errno.EIO and exc.value.progress == (0, 2)
    assert not vm.vm_bugged and not vm.vm_dead and "bugged" not in str(exc.value)
    assert vm.sept.state(0) == "mapped" and vm.tdx.nr_premapped == 0 and gmem.folio(0)[2]
    assert vm.stats["seamcall_add"] == 1 and vm.stats["seamcall_mr_extend"] == 1
    vm.check()
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0, 2, flags=MEASURE)
    assert exc.value.errno == errno.EEXIST
    assert vm.tdx.init_mem_region(vcpu, 0x1000, 1, flags=MEASURE) == 1
    vm.tdx.finalize_vm()
    assert vm.tdx.runnable
    vm.check()


def test_no_vcpu_is_created_after_finalize():
    """tdx_vcpu_create refuses a TD that is not TD_STATE_INITIALIZED: after KVM_TDX_FINALIZE_VM,
    KVM_CREATE_VCPU fails with EIO and changes nothing; before it, vCPUs are created freely."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    assert vm.create_vcpu().id == 1
    vm.tdx.finalize_vm()
    before = tdx_snapshot(vm)
    with pytest.raises(pkvm.KvmError) as exc:
        vm.create_vcpu()
    assert exc.value.errno == errno.EIO and len(vm.vcpus) == 2 and tdx_snapshot(vm) == before


def test_vmm_launch_builds_and_finalizes():
    """pkvm.Vmm.launch runs INIT_MEM_REGION over the image and finalizes (QEMU's TD launch)."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    vmm.launch([(0, 64 * 4096, True), (2 * MiB, 4096, False)])
    assert vm.tdx.runnable and vm.stats["seamcall_add"] == 65 and vm.stats["seamcall_mr_extend"] == 64 * 16
    with pytest.raises(ValueError, match="must be \\(gpa, size, measure\\)"):
        vmm.launch([(0x10, 4096, False)])


def test_build_only_touches_private_memory():
    """A VMM that forgot to mark RAM private: INIT_MEM_REGION fails EINVAL at the first page."""
    vm = pkvm.VM("tdx")
    gmem = vm.create_guest_memfd(2 * MiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 2 * MiB, 1 << 40, gmem)
    vcpu = vm.create_vcpu()
    with pytest.raises(pkvm.KvmError) as exc:
        vm.tdx.init_mem_region(vcpu, 0, 1)
    assert exc.value.errno == errno.EINVAL and gmem.folio(0) is not None  # the folio was allocated first
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    assert vm.tdx.init_mem_region(vcpu, 0, 1) == 1


def test_init_mem_region_across_two_memslots_uses_each_slots_file():
    """tdx_vcpu_init_mem_region (arch/x86/kvm/vmx/tdx.c) calls kvm_gmem_populate one page at a
    time, and kvm_gmem_populate (virt/kvm/guest_memfd.c) looks the memslot up for its gfn and
    clips the count to it: a region that crosses into the next memslot takes each page's folio
    from that page's own slot's guest_memfd, never past the first file's binding."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    g1 = vm.create_guest_memfd(2 * MiB)
    vm.set_user_memory_region2(5, GMEM, 8 * MiB, 2 * MiB, UADDR + 64 * MiB, g1, 0)
    vm.set_memory_attributes(8 * MiB, 2 * MiB, PRIVATE)
    assert vm.tdx.init_mem_region(vcpu, 8 * MiB - 0x2000, 4) == 4
    assert [(s, e) for s, e, _v in gmem.folios.ranges()][-1] == (2046, 2048)
    assert [(s, e) for s, e, _v in g1.folios.ranges()] == [(0, 2)]
    assert [vm.sept.state(g) for g in range(2046, 2050)] == ["mapped"] * 4
    vm.check()
