"""The nested page-fault path (kernel-semantics.md §4.1, §4.2, §4.6), the mapping level (§3.5) and Vcpu.access."""

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmhelpers import GMEM, PRIVATE, UADDR, GiB, MiB, assert_core_constants, gmem_vm, shared_vm

import pkvm
from pkvm import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.kvm.mmu import PageFault, fault_begin, fault_finish, fault_install, fault_is_stale, faultin_pfn

TiB = 1 << 40

# -- §3.5 maximum mapping level -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("backing", "size", "level"),
    [("4k", 4 * MiB, PG_LEVEL_4K), ("thp", 4 * MiB, PG_LEVEL_2M), ("hugetlb-2m", 4 * MiB, PG_LEVEL_2M),
     ("hugetlb-1g", 2 * GiB, PG_LEVEL_1G), ("hugetlb-1g", 4 * MiB, PG_LEVEL_2M)],
    ids=["4k", "thp", "hugetlb-2m", "hugetlb-1g", "hugetlb-1g-in-small-slot"],
)
def test_shared_level_follows_host_backing(backing, size, level):
    """A shared fault maps at min(lpage level, host page level of the backing) (§3.5)."""
    vm, vcpu = shared_vm(size, shared_backing=backing)
    r = vcpu.page_fault(0x5000, private=False)
    assert (r.ret, r.level) == ("fixed", level)
    vm.check()


@pytest.mark.parametrize(
    ("setup", "level"),
    [("incongruent", PG_LEVEL_4K), ("unaligned-head", PG_LEVEL_4K), ("dirty-logging", PG_LEVEL_4K),
     ("mixed-chunk", PG_LEVEL_4K), ("uniform-chunk", PG_LEVEL_2M)],
)
def test_shared_level_limited_by_lpage(setup, level):
    """disallow_lpage (incongruent HVA, unaligned slot head), MIXED and dirty logging force 4K (§3.5)."""
    base, uaddr, flags = 0, UADDR, 0
    if setup == "incongruent":
        uaddr = UADDR + 4096
    if setup == "unaligned-head":
        base = 4096
        uaddr = UADDR + 4096
    if setup == "dirty-logging":
        flags = pkvm.KVM_MEM_LOG_DIRTY_PAGES
    vm = pkvm.VM(1)
    vm.set_user_memory_region2(0, flags, base, 4 * MiB, uaddr)
    if setup == "mixed-chunk":
        vm.set_memory_attributes(0x100000, 4096, PRIVATE)
    r = vm.create_vcpu().page_fault(0x10000, private=False)
    assert r.level == level
    vm.check()


def test_private_level_is_4k_with_order0_folios():
    """Upstream guest_memfd hands out order-0 folios: private mappings are always 4K (§1, §3.5)."""
    vm, gmem, vcpu = gmem_vm(4 * MiB)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    assert vcpu.page_fault(0, private=True).level == PG_LEVEL_4K


def test_private_level_2m_with_order9_folios():
    """With gmem_max_order=9 a uniform private chunk maps at 2M from one aligned folio."""
    policy = pkvm.Policy.preset("6.19").replace(gmem_max_order=9)
    vm, gmem, vcpu = gmem_vm(4 * MiB, policy=policy)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    r = vcpu.page_fault(0x3000, private=True)
    assert r.level == PG_LEVEL_2M and r.pfn % 512 == 3
    assert gmem.folio(0)[1] == 9
    vm.check()


# -- §4.1 is_private -------------------------------------------------------------------------------


def test_sw_protected_private_bit_comes_from_attribute():
    """SW_PROTECTED ORs the attribute into the error code: a 'shared' access to private memory maps private (§4.1)."""
    vm, gmem, vcpu = gmem_vm()
    vm.set_memory_attributes(0, 4096, PRIVATE)
    r = vcpu.page_fault(0, private=False)
    assert r.ret == "fixed" and vm.mmu.lookup(0).private


@pytest.mark.parametrize(("policy", "ret"), [("6.11", "exit"), ("6.8", "fixed")])
def test_private_access_to_shared_gfn(policy, ret):
    """A private access to a shared gfn exits (6.11+); 6.8 derives is_private from the attribute (§0.2, §4.1)."""
    vm, gmem, vcpu = gmem_vm(policy=policy)
    assert vcpu.page_fault(0, private=True).ret == ret


def test_default_vm_private_access_exits():
    """On a DEFAULT VM a reported private access never matches the (always shared) attributes."""
    vm, vcpu = shared_vm(vm_type="default")
    r = vcpu.page_fault(0, private=True)
    assert (r.ret, r.errno, r.memory_fault) == ("exit", errno.EFAULT, (0, 4096, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE))


# -- §4.2 / §4.6 exits and returns --------------------------------------------------------------


def test_mismatch_exit_fields():
    """A private/shared mismatch fills KVM_EXIT_MEMORY_FAULT (gpa, 4096, flags) and returns EFAULT (§4.2 4b, §4.6)."""
    vm, gmem, vcpu = gmem_vm()
    r = vcpu.page_fault(0x7234, private=True)
    assert r.ret == "exit" and r.errno == errno.EFAULT
    assert r.exit_reason == pkvm.KVM_EXIT_MEMORY_FAULT
    assert r.memory_fault == (0x7000, 4096, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    st = vm.stats
    assert (st["pf_taken"], st["pf_fixed"], st["memory_fault_exits"]) == (1, 0, 1)
    assert vm.cost_breakdown() == {"npf_fault": 1500, "userspace_exit": 1000}


def test_no_slot_private_exits_shared_emulates():
    """No memslot: a private fault exits with EFAULT, a shared one is MMIO emulation (§4.2 4c)."""
    vm = pkvm.VM(1)
    vcpu = vm.create_vcpu()
    vm.set_memory_attributes(0, 4096, PRIVATE)
    r = vcpu.page_fault(0, private=True)
    assert (r.ret, r.errno, r.exit_reason) == ("exit", errno.EFAULT, pkvm.KVM_EXIT_MEMORY_FAULT)
    r = vcpu.page_fault(0x10000, private=False)
    assert r.ret == "emulate" and vm.stats["pf_emulate"] == 1


def test_private_fault_in_slot_without_gmem_exits():
    """A private fault in a slot without guest_memfd exits with EFAULT (§4.2 4g)."""
    vm, vcpu = shared_vm()
    vm.set_memory_attributes(0, 4096, PRIVATE)
    r = vcpu.page_fault(0, private=True)
    assert (r.ret, r.errno, r.memory_fault[2]) == ("exit", errno.EFAULT, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE)


def test_closed_gmem_private_fault_exits_efault():
    """After the guest_memfd is closed, private faults in its slot exit with EFAULT (§4.3 step 1, §4.7)."""
    vm, gmem, vcpu = gmem_vm()
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    gmem.close()
    assert vm.stats["pages_4k"] == 0
    r = vcpu.page_fault(0, private=True)
    assert (r.ret, r.errno) == ("exit", errno.EFAULT)
    assert vcpu.page_fault(MiB, private=False).ret == "fixed"  # shared memory is unaffected
    vm.check()


def test_readonly_slot_write_emulates_read_maps_readonly():
    """A write to a READONLY slot is emulated; a read maps a non-writable SPTE."""
    vm, vcpu = shared_vm(flags=pkvm.KVM_MEM_READONLY, shared_backing="4k")
    assert vcpu.page_fault(0, private=False, write=True).ret == "emulate"
    assert vcpu.page_fault(0, private=False).ret == "fixed"
    assert not vm.mmu.lookup(0).writable
    assert vcpu.page_fault(0, private=False, write=True).ret == "emulate"
    r = vcpu.access(0, private=False, write=True, size=8192)
    assert (r.ret, r.pages_done, r.faults) == ("emulate", 0, 1)


def test_spurious_refault():
    """Faulting a gfn that already has the identical leaf is spurious (fast path for writes, §4.2 2, 7)."""
    vm, gmem, vcpu = gmem_vm()
    assert vcpu.page_fault(0, private=False).ret == "fixed"
    assert vcpu.page_fault(0, private=False).ret == "spurious"
    assert vcpu.page_fault(0, private=False, write=True).ret == "spurious"
    st = vm.stats
    assert (st["pf_taken"], st["pf_fixed"], st["pf_spurious"]) == (3, 1, 2)


def test_stale_fault_retries_while_invalidation_in_progress():
    """A fault on a gfn inside an in-progress invalidation returns RET_PF_RETRY (§2.8, §4.2 4f/6)."""
    vm, gmem, vcpu = gmem_vm(shared_backing="4k")
    vm._invalidate_begin()
    vm._invalidate_range_add(0, 16)
    assert vcpu.page_fault(0x5000, private=False).ret == "retry"
    assert vcpu.page_fault(0x20000, private=False).ret == "fixed"  # outside the range
    vm._invalidate_end()
    assert vcpu.page_fault(0x5000, private=False).ret == "fixed"
    assert vm.stats["pf_retry"] == 1


def test_stale_fault_retries_when_sequence_moved():
    """Phases run apart: an invalidation that completes between snapshot and install forces a retry (§4.2 6)."""
    vm, gmem, vcpu = gmem_vm()
    f = PageFault(3, 4, False, False)
    fault_begin(vm, f)
    faultin_pfn(vm, f)
    vm.set_memory_attributes(0x100000, 4096, PRIVATE)  # bumps mmu_invalidate_seq
    fault_is_stale(vm, f)
    assert f.ret == "retry"
    assert fault_finish(vm, f).ret == "retry"
    g = PageFault(3, 4, False, False)
    for phase in (fault_begin, faultin_pfn, fault_is_stale, fault_install):
        phase(vm, g)
    assert g.ret == "fixed"


def test_stale_check_looks_at_the_fault_gfn_only():
    """The retry check tests only the faulting gfn, so a 2M leaf may cover gfns under invalidation (§2.5, §2.8)."""
    vm, gmem, vcpu = gmem_vm()
    vm._invalidate_begin()
    vm._invalidate_range_add(0, 16)
    r = vcpu.page_fault(0x20000, private=False)
    assert (r.ret, r.level) == ("fixed", PG_LEVEL_2M)
    assert vm.mmu.lookup(5) is not None
    vm._invalidate_end()


def test_emulation_of_a_private_access_becomes_an_exit():
    """RET_PF_EMULATE on a private fault is turned into a memory-fault exit with EFAULT (§4.2 step 9)."""
    vm, gmem, vcpu = gmem_vm()
    f = PageFault(7, 8, True, False)
    f.is_private, f.ret = True, "emulate"
    r = fault_finish(vm, f)
    assert (r.ret, r.errno, r.memory_fault) == ("exit", errno.EFAULT, (0x7000, 4096, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE))
    st = vm.stats
    assert (st["pf_emulate"], st["memory_fault_exits"]) == (1, 1)


def test_invalid_slot_retries():
    """A fault hitting a memslot being deleted or moved retries (§4.2 4d)."""
    vm, vcpu = shared_vm()
    vm.memslot(0).invalid = True
    assert vcpu.page_fault(0, private=False).ret == "retry"
    vm.memslot(0).invalid = False


def test_hugepage_install_replaces_small_leaves_and_flushes():
    """Installing a 2M leaf over a page table of 4K leaves drops them and flushes TLBs (§4.2 7)."""
    vm, gmem, vcpu = gmem_vm(4 * MiB)
    vm.set_memory_attributes(0x100000, 4096, PRIVATE)  # chunk 0 MIXED: shared faults map 4K
    vcpu.access(0, private=False, size=0x10000)
    assert vm.stats["pages_4k"] == 16
    vm.set_memory_attributes(0x100000, 4096, 0)        # chunk uniform again; the 4K leaves stay
    assert vm.stats["pages_4k"] == 16
    r = vcpu.page_fault(0x20000, private=False)
    st = vm.stats
    assert r.level == PG_LEVEL_2M and st["pages_4k"] == 0 and st["pages_2m"] == 1
    assert st["zapped_sptes"] == 16 and st["remote_tlb_flush"] == 1
    vm.check()


def test_huge_leaf_split_when_goal_is_smaller():
    """A fault whose goal level is below an existing huge leaf splits it (tdp_mmu_split_huge_page)."""
    vm, vcpu = shared_vm(4 * MiB)
    vcpu.page_fault(0, private=False)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MiB, UADDR)  # goal now 4K
    r = vcpu.page_fault(0x3000, private=False)
    st = vm.stats
    assert (r.ret, r.level) == ("spurious", PG_LEVEL_4K)
    assert (st["pages_2m"], st["pages_4k"], st["huge_page_splits"]) == (0, 512, 1)
    vm.check()


# -- Vcpu.access -----------------------------------------------------------------------------------


def test_access_counts_faults_only_where_unmapped():
    """access() faults only pages without a usable mapping and counts one fault per installed leaf."""
    vm, gmem, vcpu = gmem_vm(4 * MiB, shared_backing="4k")
    r = vcpu.access(0, private=False, size=MiB)
    assert (r.ret, r.pages_done, r.faults) == ("done", 256, 256)
    r = vcpu.access(0, private=False, size=2 * MiB)
    assert (r.pages_done, r.faults) == (512, 256)


def test_access_thp_counts_one_fault_per_2m():
    """With THP backing a shared 4 MiB access takes one fault per 2M leaf."""
    vm, vcpu = shared_vm(8 * MiB)
    r = vcpu.access(0x1000, private=False, size=6 * MiB)
    assert (r.pages_done, r.faults) == (1536, 4)
    assert vm.stats["pages_2m"] == 4


def test_access_stops_at_first_exit():
    """A multi-page access stops at the first exit and reports pages_done and that page's exit."""
    vm, gmem, vcpu = gmem_vm(4 * MiB)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    vm.set_memory_attributes(0x80000, 4096, 0)
    r = vcpu.access(0, private=True, size=MiB)
    assert (r.ret, r.pages_done, r.faults) == ("exit", 128, 129)
    assert r.memory_fault == (0x80000, 4096, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert r.exit_reason == pkvm.KVM_EXIT_MEMORY_FAULT and r.errno == errno.EFAULT


def test_access_validation():
    """access() rejects non-bool flags and bad sizes."""
    vm, vcpu = shared_vm()
    with pytest.raises(TypeError, match="private and write must be bools"):
        vcpu.access(0, private=1)
    with pytest.raises(ValueError, match="size=0 must be a positive int"):
        vcpu.access(0, private=False, size=0)
    with pytest.raises(ValueError, match="outside the 52-bit"):
        vcpu.page_fault(1 << 52, private=False)


@pytest.mark.parametrize("gpa", [0, 0xFFF, (1 << 30) + 5, (1 << 52) - 1, 1 << 52, (1 << 60) - 1, 1 << 60,
                                 1 << 64, -1, -(1 << 40), True, 2.0, "0"])
def test_page_fault_takes_the_gpas_gpa_to_gfn_does(gpa):
    """page_fault reads a small exact int from its digits; every gpa gets the gfn, or the
    error, that the full check (vm._gpa_to_gfn) gives."""
    from pkvm.kvm.vm import _gpa_to_gfn
    a, va = shared_vm(vm_type="default")
    b, vb = shared_vm(vm_type="default")
    try:
        want = ("ok", vb.page_fault(_gpa_to_gfn(gpa) << 12, private=False))
    except (TypeError, ValueError) as e:
        want = (type(e), str(e))
    try:
        got = ("ok", va.page_fault(gpa, private=False))
    except (TypeError, ValueError) as e:
        got = (type(e), str(e))
    assert got == want


def test_1tib_convert_and_touch_is_range_compressed():
    """1 TiB: set PRIVATE then touch it all counts 2**28 faults and 4K leaves in O(log n) memory."""
    vm = pkvm.VM(1)
    gmem = vm.create_guest_memfd(TiB)
    vm.set_user_memory_region2(0, GMEM, 0, TiB, UADDR, gmem)
    vm.set_memory_attributes(0, TiB, PRIVATE)
    r = vm.create_vcpu().access(0, private=True, size=TiB)
    st = vm.stats
    assert r.faults == r.pages_done == st["pf_taken"] == st["pf_fixed"] == st["pages_4k"] == 1 << 28
    assert st["gmem_pages_allocated"] == 1 << 28
    assert len(vm.mmu.sptes) == 1 and len(gmem.folios) == 1
    vm.check()


# -- the result object --------------------------------------------------------------------------


def test_fault_result_is_an_immutable_value():
    """FaultResult (a typed-core object since issue 16) keeps the frozen dataclass's contract:
    keyword and positional construction with the documented defaults, equality and hash by
    value, read-only fields, pickling, a repr naming every field, and class patterns."""
    import pickle

    vm, vcpu = shared_vm(4 * MiB)
    r = vcpu.page_fault(0x5000, private=False)
    same = pkvm.FaultResult("fixed", r.level, r.pfn)
    assert r == same and hash(r) == hash(same) and r != pkvm.FaultResult("spurious", r.level, r.pfn)
    assert r != ("fixed", r.level, r.pfn)  # only another FaultResult compares equal
    assert (r.exit_reason, r.memory_fault, r.errno, r.retries, r.loop) == (None, None, None, 0, None)
    assert pickle.loads(pickle.dumps(r)) == r
    assert repr(pkvm.FaultResult("exit", errno=14)) == (
        "FaultResult(ret='exit', level=None, pfn=None, exit_reason=None, memory_fault=None, errno=14, "
        "retries=0, loop=None)")
    with pytest.raises(AttributeError, match="not writable"):
        r.ret = "retry"
    match r:
        case pkvm.FaultResult("fixed", level, pfn):
            assert (level, pfn) == (r.level, r.pfn)
        case _:
            pytest.fail("a fixed fault must match FaultResult('fixed', level, pfn)")


# -- the typed fault path (pkvm/_fault.pxi) -----------------------------------------------------


def test_the_fault_core_constants_are_the_kernel_ones():
    """pkvm/_fault.pxi repeats these values (C code cannot import them): they must agree."""
    from pkvm import constants as c
    from pkvm.kvm import mmu

    assert_core_constants("_fault.pxi", {
        "_F_SPTE_PRESENT = 1\n": mmu.SPTE_PRESENT == 1,
        "_F_SPTE_PRIVATE = 1ULL << 3\n": mmu.SPTE_PRIVATE == 1 << 3,
        "_F_SPTE_WRITABLE = 1ULL << 4\n": mmu.SPTE_WRITABLE == 1 << 4,
        "_F_ATTR_PRIVATE = 1ULL << 3 ": c.KVM_MEMORY_ATTRIBUTE_PRIVATE == 1 << 3,
        "_F_MEM_LOG_DIRTY = 1 ": c.KVM_MEM_LOG_DIRTY_PAGES == 1,
        "_F_MEM_READONLY = 2 ": c.KVM_MEM_READONLY == 2,
        "_F_EXIT_MEMORY_FAULT = 39 ": c.KVM_EXIT_MEMORY_FAULT == 39,
        "_F_EFAULT = 14\n": errno.EFAULT == 14,
        "_F_ENOENT = 2\n": errno.ENOENT == 2,
        "8 if f.is_private else 0)  # KVM_MEMORY_EXIT_FLAG_PRIVATE": c.KVM_MEMORY_EXIT_FLAG_PRIVATE == 8,
    })


@settings(max_examples=200, deadline=None)
@given(delta=st.integers(-(1 << 55), (1 << 55) - 1), level=st.sampled_from([1, 2, 3]),
       private=st.booleans(), writable=st.booleans())
def test_make_spte_is_the_documented_encoding(delta, level, private, writable):
    """The core's leaf encoding against its definition (pkvm.kvm.mmu's module docstring):
    ``encode_delta(delta)`` | present | level << 1 | private << 3 | writable << 4."""
    from pkvm.host.hostmem import decode_delta, encode_delta
    from pkvm.kvm import mmu

    v = mmu.make_spte(delta, level, private, writable)
    assert v == (encode_delta(delta) | 1 | level << 1 | (8 if private else 0) | (16 if writable else 0))
    assert decode_delta(v) == delta and mmu.spte_level(v) == level
    if v:  # what Mmu.lookup decodes is what was encoded
        m = mmu.Mmu(dict.fromkeys(("pages_4k", "pages_2m", "pages_1g"), 0), lambda op, n: None)
        m.map_run(0, 1 << 18, level, v)
        assert m.lookup(5) == mmu.Spte(5 + delta, level, private, writable)


def test_page_fault_fields_are_typed_but_named():
    """PageFault's fields are C-typed: read and written by name (guest_memfd's pfn lookup does),
    and a value of the wrong type or range is refused."""
    f = PageFault(7, 9, True, False)
    assert (f.gfn, f.limit, f.end, f.private_access, f.write, f.single, f.ret, f.slot) == (
        7, 9, 8, True, False, False, "", None)
    f.delta, f.order, f.errno, f.single = -5, 9, errno.EIO, True
    assert (f.delta, f.order, f.errno, f.single) == (-5, 9, errno.EIO, True)
    with pytest.raises(OverflowError, match="negative|convert"):
        f.gfn = -1
    with pytest.raises(TypeError, match="integer"):
        f.level = "2M"


def test_a_vcpu_class_with_its_own_fault_handler_is_called():
    """page_fault and page_fault_many run the typed fault only for a vCPU class whose ``_fault``
    is the base one (or that names a ``_fault_detour`` slot that is None); any other
    ``_fault`` is called, per call."""
    calls = []

    class Counting(pkvm.Vcpu):
        __slots__ = ()

        def _fault(self, gfn, limit, private, write):
            calls.append((gfn, limit, private, write))
            return pkvm.Vcpu._fault(self, gfn, limit, private, write)

    vm, _ = shared_vm(4 * MiB)
    twin, vcpu = shared_vm(4 * MiB)
    mine = Counting(vm, 7)
    assert mine.page_fault(0x3000, private=False) == vcpu.page_fault(0x3000, private=False)
    assert calls == [(3, 4, False, False)]
    batch = mine.page_fault_many([0x5000, 0x203000], private=False, write=True)
    assert calls[1:] == [(5, 6, False, True), (0x203, 0x204, False, True)]
    assert list(batch) == [vcpu.page_fault(g, private=False, write=True) for g in (0x5000, 0x203000)]
    assert vm.stats == twin.stats and vm.modeled_ns == twin.modeled_ns


def test_snp_rmp_stop_takes_the_platform_detour():
    """SnpVcpu names ``_rmp_stop`` as its detour: while it is set, page_fault runs SnpVcpu._fault
    (here: the RMP check's #VC), not the base fault."""
    vm = pkvm.VM("snp", policy="6.19")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vcpu = vm.create_vcpu()
    vcpu._rmp_stop = (5, "vc")
    assert vcpu.page_fault(0x5000, private=True) == pkvm.FaultResult("vc")
    assert vcpu._rmp_stop is None and vm.stats["snp_vc"] == 1 and vm.stats["pf_taken"] == 0
    assert vcpu.page_fault(0x5000, private=False).ret == "fixed"  # the base fault again


def _call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``: its result, or its exception's type and message."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError, pkvm.KvmError) as e:
        return type(e), str(e)


def test_page_fault_on_a_vcpu_is_its_entrys_c_function():
    """On a vCPU, ``page_fault`` is its VcpuFault entry's builtin (built on the first read, kept
    in the vCPU's slot); on the class it is the documented Python method. Every form of call
    gives what the Python method gives on a twin VM: the usual ones in C, any other (all
    keywords, a keyword dict, a wrong call) through the method, with its errors."""
    from pkvm._core import PageFaultMethod, VcpuFault

    assert isinstance(pkvm.Vcpu.__dict__["page_fault"], PageFaultMethod)
    assert pkvm.Vcpu.page_fault.__doc__.startswith("One nested page fault on ``gpa``")
    (a, va), (b, vb) = shared_vm(), shared_vm()
    m = va.page_fault
    assert type(m.__self__) is VcpuFault and va.page_fault is m and m.__name__ == "page_fault"
    calls = [
        ((0x1000,), {"private": False}),
        ((0x2000,), {"private": False, "write": True}),
        ((0x3000,), {"write": True, "private": False}),
        ((), {"gpa": 0x4000, "private": False}),
        ((0x5000,), dict([("private", False)])),
        ((0x6000,), {}),
        ((0x6000, False), {}),
        ((0x6000,), {"private": False, "size": 1}),
        ((0x6000,), {"private": 0}),
        ((0x6000,), {"private": False, "write": None}),
        (("0x6000",), {"private": False}),
        ((-4096,), {"private": False}),
    ]
    for args, kwargs in calls:
        assert _call(va.page_fault, *args, **kwargs) == _call(pkvm.Vcpu.page_fault, vb, *args, **kwargs)
    assert a.stats == b.stats and a.modeled_ns == b.modeled_ns
    a._kill("test")
    b._kill("test")
    assert _call(va.page_fault, 0x1000, private=False) == _call(pkvm.Vcpu.page_fault, vb, 0x1000, private=False)


def test_a_copied_vcpu_gets_an_entry_of_its_own():
    """A copy of a vCPU copies its slots, the entry too; the copy's ``page_fault`` is a new
    entry for the copy (the fault runs for the vCPU it is read on)."""
    import copy

    seen = []

    class Mine(pkvm.Vcpu):
        __slots__ = ()

        def _fault(self, gfn, limit, private, write):
            seen.append(self)
            return pkvm.Vcpu._fault(self, gfn, limit, private, write)

    vm, _ = shared_vm()
    v = Mine(vm, 3)
    v.page_fault(0x1000, private=False)
    c = copy.copy(v)
    assert c.page_fault.__self__ is not v.page_fault.__self__
    c.page_fault(0x2000, private=False)
    assert seen == [v, c]


def test_the_descriptor_falls_back_to_the_method_without_a_path():
    """Read on an object with no FaultPath of its VM (or no ``_page_fault`` slot), the
    descriptor binds the Python method; it refuses a non-callable."""
    from pkvm._core import PageFaultMethod

    class Half:
        vm = None

    h = Half()
    m = PageFaultMethod(pkvm.Vcpu.page_fault).__get__(h, Half)
    assert m.__func__ is pkvm.Vcpu.page_fault and m.__self__ is h
    vm, vcpu = shared_vm()
    h.vm = vm  # a VM with a path, on an object without the slot
    assert PageFaultMethod(pkvm.Vcpu.page_fault).__get__(h, Half).__self__ is h
    with pytest.raises(TypeError, match="needs a function, not int"):
        PageFaultMethod(3)


@pytest.mark.parametrize("backing", ["4k", "thp"])
@pytest.mark.parametrize("size", [1, 3, 700], ids=["page", "pages", "blocks"])
def test_a_shared_fault_maps_the_page_the_backing_holds(backing, size):
    """A shared fault populates the page's host block if it has none and maps the pfn the
    shared backing holds for the page, whether the block was populated before (by an earlier
    fault or a touch), now, or by the same access as its neighbours."""
    vm, vcpu = shared_vm(8 * MiB, shared_backing=backing)
    sb = vm._shared
    hva0 = UADDR >> 12
    sb.populate(hva0 + 600, hva0 + 601)  # a block touched before any fault
    for gfn in (600, 601, 5, 1023, 1300):
        vcpu.access(gfn << 12, private=False, size=size << 12)
        for g in (gfn, gfn + size - 1):
            r = vcpu.page_fault(g << 12, private=False)
            assert r.pfn == sb.lookup(hva0 + g) is not None
    vm.check()
