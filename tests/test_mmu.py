"""Large-page tracking (kernel-semantics.md §3), the PRE/POST phases of KVM_SET_MEMORY_ATTRIBUTES (§2.4-2.8)
and the TDP MMU leaves they act on."""

import pytest
from vmhelpers import GMEM, PRIVATE, UADDR, GiB, MiB, gmem_vm, shared_vm

import pkvm
from pkvm import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.kvm.mmu import KVM_LPAGE_MIXED_FLAG, LpageInfo, hugepage_has_attrs
from pkvm.testing.reference_vm import ReferenceVM

INVALID = 2**64 - 1

# -- §3.1 initialization ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "npages", "ugfn", "expect_2m", "expect_1g"),
    [
        pytest.param(0, 1024, 0, {0: 0, 1: 0}, {0: 1}, id="aligned-2m-unaligned-tail-1g"),
        pytest.param(5, 1024, 5, {0: 1, 1: 0, 2: 1}, {0: 1}, id="unaligned-head"),
        pytest.param(512, 700, 512, {1: 0, 2: 1}, {0: 1}, id="unaligned-tail"),
        pytest.param(0, 1024, 1, {0: 1, 1: 1}, {0: 1}, id="incongruent-hva"),
        pytest.param(0, 1 << 19, 0, {0: 0, 1023: 0}, {0: 0, 1: 0}, id="two-whole-1g"),
        pytest.param(100, 50, 100, {0: 1}, {0: 1}, id="head-and-tail-same-chunk"),
    ],
)
def test_lpage_init_disallow_counts(base, npages, ugfn, expect_2m, expect_1g):
    """Head/tail chunks partly outside the slot, and every chunk of an incongruent slot, get count 1 (§3.1)."""
    lp = LpageInfo(base, npages, ugfn)
    for idx, want in expect_2m.items():
        assert lp.disallow_count(idx << 9, PG_LEVEL_2M) == want
    for idx, want in expect_1g.items():
        assert lp.disallow_count(idx << 18, PG_LEVEL_1G) == want


def test_lpage_init_computes_mixed_from_existing_attributes():
    """A slot created over existing attributes gets MIXED for every non-uniform fully-inside chunk (§3.1)."""
    vm = pkvm.VM(1)
    vm.set_memory_attributes(5 << 12, 4096, PRIVATE)               # gfn 5: 2M chunk 0 mixed
    vm.set_memory_attributes(1024 << 12, 512 << 12, PRIVATE)      # 2M chunk 2 uniform private
    gmem = vm.create_guest_memfd(GiB)
    vm.set_user_memory_region2(0, GMEM, 0, GiB, UADDR, gmem)
    slot = vm.memslot(0)
    assert slot.is_mixed(0, PG_LEVEL_2M)
    assert not slot.is_mixed(512, PG_LEVEL_2M)
    assert not slot.is_mixed(1024, PG_LEVEL_2M)
    assert slot.is_mixed(0, PG_LEVEL_1G)  # "1G-from-mixed-2M"
    vm.check()


def test_lpage_init_1g_from_2m_aligned_change():
    """A 1G chunk whose 2M sub-chunks are uniform but differ is MIXED at 1G only."""
    vm = pkvm.VM(1)
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    gmem = vm.create_guest_memfd(GiB)
    vm.set_user_memory_region2(0, GMEM, 0, GiB, UADDR, gmem)
    slot = vm.memslot(0)
    assert not slot.is_mixed(0, PG_LEVEL_2M) and not slot.is_mixed(512, PG_LEVEL_2M)
    assert slot.is_mixed(0, PG_LEVEL_1G)


def test_default_vm_has_no_mixed_tracking():
    """kvm_mmu_init_memslot_memory_attributes runs only for VMs with private memory."""
    vm, _ = shared_vm(vm_type="default")
    assert not vm.memslot(0).is_mixed(0, PG_LEVEL_2M)


# -- §3.2 / §3.3 / §3.6 --------------------------------------------------------------------------


def test_worked_example_3_6():
    """The worked example of kernel-semantics.md §3.6, step by step."""
    vm, gmem, _ = gmem_vm(1024 << 12, uaddr=UADDR)
    slot = vm.memslot(0)
    assert slot.disallow_lpage(0, PG_LEVEL_1G) == 1
    vm.set_memory_attributes(5 << 12, 4096, PRIVATE)
    assert slot.is_mixed(0, PG_LEVEL_2M) and not slot.is_mixed(512, PG_LEVEL_2M)
    assert not slot.is_mixed(0, PG_LEVEL_1G)  # chunk not fully inside: skipped
    vm.set_memory_attributes(0, 512 << 12, PRIVATE)
    assert not slot.is_mixed(0, PG_LEVEL_2M)
    vm.set_memory_attributes(0, 1024 << 12, 0)
    assert not slot.is_mixed(0, PG_LEVEL_2M) and not slot.is_mixed(512, PG_LEVEL_2M)
    vm.check()


def test_post_head_body_tail():
    """POST sets MIXED on partial head/tail chunks and clears it on the covered body (§3.3)."""
    vm, gmem, _ = gmem_vm(8 * MiB)
    slot = vm.memslot(0)
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    vm.set_memory_attributes(0x1000, 6 * MiB, 0)   # head chunk 0 partial, body 1-2, tail chunk 3 partial
    assert [slot.is_mixed(c << 9, PG_LEVEL_2M) for c in range(4)] == [True, False, False, True]
    vm.set_memory_attributes(0, 8 * MiB, 0)
    assert [slot.is_mixed(c << 9, PG_LEVEL_2M) for c in range(4)] == [False] * 4
    vm.check()


def test_post_partial_chunk_uniform_when_rest_matches():
    """A partially covered chunk is uniform iff the part outside the range already had the new value."""
    vm, gmem, _ = gmem_vm(2 * MiB)
    slot = vm.memslot(0)
    vm.set_memory_attributes(0, 4096, PRIVATE)
    assert slot.is_mixed(0, PG_LEVEL_2M)
    vm.set_memory_attributes(4096, 2 * MiB - 4096, PRIVATE)
    assert not slot.is_mixed(0, PG_LEVEL_2M)


@pytest.mark.parametrize(("policy", "mixed"), [("6.8", True), ("6.11", False)], ids=["6.8-start-only", "6.11-whole-chunk"])
def test_hugepage_straddles_slot_end(policy, mixed):
    """The POST head chunk that starts in the slot but ends past it: 6.8 still sets MIXED, 6.11+ skips it."""
    vm, gmem, _ = gmem_vm(MiB, policy=policy)  # 256 pages: chunk 0 straddles the slot end
    vm.set_memory_attributes(4096, 4096, PRIVATE)
    assert vm.memslot(0).is_mixed(0, PG_LEVEL_2M) is mixed
    assert vm.memslot(0).disallow_lpage(0, PG_LEVEL_2M) == 1
    vm.check()


def test_1g_post_uses_2m_results():
    """1G MIXED follows the 2M results computed just before it in the same POST (§3.2, §3.3)."""
    vm, gmem, _ = gmem_vm(GiB)
    slot = vm.memslot(0)
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    assert slot.is_mixed(0, PG_LEVEL_1G) and not slot.is_mixed(0, PG_LEVEL_2M)
    vm.set_memory_attributes(0, GiB, PRIVATE)
    assert not slot.is_mixed(0, PG_LEVEL_1G)
    vm.set_memory_attributes(GiB - 4096, 4096, 0)
    assert slot.is_mixed(GiB // 4096 - 1, PG_LEVEL_2M) and slot.is_mixed(0, PG_LEVEL_1G)
    vm.check()


def test_hugepage_has_attrs_1g_checks_first_gfn_of_each_subchunk():
    """At 1G only the MIXED bits and each 2M sub-chunk's first gfn are consulted (§3.2)."""
    from pkvm._core import RangeMap

    attrs = RangeMap()
    lp = LpageInfo(0, 1 << 19, 0)
    attrs.assign(1, 2, PRIVATE)  # not a sub-chunk's first gfn, and sub-chunk 0 is not flagged
    assert hugepage_has_attrs(attrs, lp, 0, PG_LEVEL_1G, 0)
    assert not hugepage_has_attrs(attrs, lp, 0, PG_LEVEL_2M, 0)
    lp.set_mixed(512 * 7, PG_LEVEL_2M, True)
    assert not hugepage_has_attrs(attrs, lp, 0, PG_LEVEL_1G, 0)
    attrs.assign(512 * 9, 512 * 9 + 1, PRIVATE)
    lp.set_mixed(512 * 7, PG_LEVEL_2M, False)
    assert not hugepage_has_attrs(attrs, lp, 0, PG_LEVEL_1G, 0)


def test_mixed_bit_is_bit_31():
    """The MIXED flag is bit 31 of disallow_lpage and leaves the count alone."""
    lp = LpageInfo(5, 1024, 5)
    lp.set_mixed(0, PG_LEVEL_2M, True)
    assert lp.word(0, PG_LEVEL_2M) == KVM_LPAGE_MIXED_FLAG | 1
    assert lp.disallow_count(0, PG_LEVEL_2M) == 1


# -- §2.4 / §2.5 / §2.7 / §2.8 -----------------------------------------------------------------


def test_short_circuit_changes_nothing():
    """Repeating a conversion changes nothing: no zap, no flush, no sequence bump, no stores
    (§2.7); its only cost is the no-op check's walk over the range (attr_check_gfn per gfn after
    the first), and a to-shared no-op has none."""
    vm, gmem, vcpu = gmem_vm()
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    before = (vm.stats, vm.modeled_ns)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    walk = vm.costs["attr_check_gfn"].value_ns * ((MiB >> 12) - 1)
    assert (vm.stats, vm.modeled_ns) == (before[0], before[1] + walk)
    vm.set_memory_attributes(MiB, MiB, 0)
    before = (vm.stats, vm.modeled_ns)
    vm.set_memory_attributes(MiB, MiB, 0)
    assert (vm.stats, vm.modeled_ns) == before


def test_partially_converted_range_is_processed_in_full():
    """A range partly in the target state is zapped and stored in full (§2.7)."""
    vm, gmem, vcpu = gmem_vm()
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    st = vm.stats
    assert st["zapped_sptes"] == 256 and st["pages_4k"] == 0
    assert st["attr_stores"] == 256 + 512
    assert st["mmu_invalidate_seq"] == 2


def test_one_invalidation_per_ioctl_across_slots():
    """Two intersecting slots share one begin/end pair: the sequence moves by one (§2.4, §2.8)."""
    vm = pkvm.VM(1)
    vm.set_user_memory_region2(0, 0, 0, MiB, UADDR)
    vm.set_user_memory_region2(1, 0, 4 * MiB, MiB, UADDR + 4 * MiB)
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    assert vm.stats["mmu_invalidate_seq"] == 1
    assert vm.mmu_invalidate_in_progress == 0
    assert vm.mmu_invalidate_range == (0, 4 * MiB // 4096 + 256)


def test_flush_only_when_pre_zapped():
    """PRE flushes remote TLBs once, and only if it zapped something (§2.4 flush_on_ret)."""
    vm, gmem, vcpu = gmem_vm()
    vm.set_memory_attributes(0, MiB, PRIVATE)
    assert vm.stats["remote_tlb_flush_requests"] == 0
    vcpu.access(0, private=True, size=MiB)
    vm.set_memory_attributes(0, MiB, 0)
    st = vm.stats
    assert st["remote_tlb_flush_requests"] == st["remote_tlb_flush"] == 1
    assert st["zapped_sptes"] == 256


def test_zap_even_without_guest_memfd():
    """PRE zaps shared mappings in slots without guest_memfd too (§2.5 rationale)."""
    vm, vcpu = shared_vm(2 * MiB, shared_backing="4k")
    vcpu.access(0, private=False, size=2 * MiB)
    vm.set_memory_attributes(0, 4096, PRIVATE)
    assert vm.stats["zapped_sptes"] == 1 and vm.mmu.lookup(0) is None and vm.mmu.lookup(1) is not None


def test_zap_takes_whole_huge_leaf():
    """Converting one 4K page inside a 2M mapping zaps the whole huge leaf (§2.5)."""
    vm, vcpu = shared_vm(4 * MiB)
    r = vcpu.page_fault(0, private=False)
    assert r.level == PG_LEVEL_2M and vm.stats["pages_2m"] == 1
    vm.set_memory_attributes(0x3000, 4096, PRIVATE)
    st = vm.stats
    assert st["pages_2m"] == 0 and st["zapped_sptes"] == 1 and st["remote_tlb_flush"] == 1


@pytest.mark.parametrize(("policy", "expect"), [("6.16", (0, 262144)), ("6.11", (3, 4))], ids=["6.16-guard", "6.11-no-guard"])
def test_hugepage_guard_widens_invalidation(policy, expect):
    """6.16+ adds the partially covered, non-MIXED head/tail hugepages to the invalidation range (§2.5)."""
    vm, gmem, _ = gmem_vm(GiB, policy=policy)
    vm.set_memory_attributes(3 << 12, 4096, PRIVATE)
    assert vm.mmu_invalidate_range == expect


def test_hugepage_guard_skips_mixed_chunks():
    """Chunks already MIXED need no guard: only the still-uniform 1G chunk widens the range (§2.5)."""
    vm, gmem, _ = gmem_vm(GiB)
    vm.set_memory_attributes(3 << 12, 4096, PRIVATE)
    vm.set_memory_attributes(5 << 12, 4096, PRIVATE)  # 2M chunk 0 and 1G chunk 0 are MIXED now
    assert vm.mmu_invalidate_range == (5, 6)


def test_hugepage_guard_tail_chunk():
    """The guard adds the tail chunk that extends past the range end when it lies in the slot."""
    vm, gmem, _ = gmem_vm(8 * MiB, policy="6.16")
    vm.set_memory_attributes(0, 3 * MiB, PRIVATE)
    assert vm.mmu_invalidate_range == (0, 1024)


def test_invalidation_sequence_and_in_progress():
    """begin/end bracket the store: seq increments once per ioctl and in_progress returns to 0 (§2.8)."""
    vm, gmem, _ = gmem_vm()
    for i in range(3):
        vm.set_memory_attributes(0, 4096, PRIVATE if i % 2 == 0 else 0)
    assert vm.stats["mmu_invalidate_seq"] == 3
    assert vm.mmu_invalidate_in_progress == 0


def test_attr_stores_count_every_gfn():
    """The kernel stores every gfn of a non-no-op range: attr_stores counts them and xa_store is charged."""
    vm = pkvm.VM(1)
    vm.set_memory_attributes(0, GiB, PRIVATE)
    assert vm.stats["attr_stores"] == 1 << 18
    assert vm.cost_breakdown()["attr_store"] == 100 << 18
    assert len(vm._attrs) == 1  # but one run in memory


def test_against_reference_at_1g():
    """A few 1G-scale conversions agree with the per-gfn reference in every MIXED word."""
    vm = pkvm.VM(1)
    ref = ReferenceVM("sw_protected")
    gmem = vm.create_guest_memfd(2 * GiB)
    rg = ref.create_guest_memfd(2 * GiB)
    vm.set_user_memory_region2(0, GMEM, 0, 2 * GiB - 4 * MiB, UADDR, gmem)
    ref.set_user_memory_region2(0, GMEM, 0, 2 * GiB - 4 * MiB, UADDR, rg)
    ops = [(0, GiB, PRIVATE), (GiB - 2 * MiB, 4 * MiB, 0), (5 << 12, 4096, 0), (0, 2 * MiB, PRIVATE),
           (GiB + 4096, 3 * MiB, PRIVATE), (GiB, GiB, PRIVATE), (0, 2 * GiB, 0)]
    slot = vm.memslot(0)
    for addr, size, attrs in ops:
        vm.set_memory_attributes(addr, size, attrs)
        ref.set_memory_attributes(addr, size, attrs)
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            for g, word in ref.slots[0].lpage[level].items():
                assert slot.lpage.word(g, level) == word, (addr, size, level, g)
        assert vm.stats == ref.stats
        assert vm.mmu_invalidate_range == ref.range
        vm.check()


def test_spte_runs_coalesce():
    """Linearly mapped 4K leaves coalesce: a 1 GiB private touch is one SPTE run (range compression)."""
    vm, gmem, vcpu = gmem_vm(GiB)
    vm.set_memory_attributes(0, GiB, PRIVATE)
    vcpu.access(0, private=True, size=GiB)
    assert len(vm.mmu.sptes) == 1
    assert vm.mmu.lookup(12345).level == PG_LEVEL_4K


def test_legacy_progress_ioctl_has_no_short_circuit():
    """The UPM-era ioctl (rfc-v8) invalidates on every call, even repeated ones and outside memslots (§2.6)."""
    vm, gmem, vcpu = gmem_vm(policy="rfc-v8")
    vm.set_memory_attributes(64 * MiB, 4096, PRIVATE)       # no memslot there: still an invalidation
    assert vm.stats["mmu_invalidate_seq"] == 1
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)               # no-op in 6.8+, a full pass here
    st = vm.stats
    assert st["mmu_invalidate_seq"] == 3 and st["zapped_sptes"] == 256 and st["attr_stores"] == 513
    assert vm.mmu_invalidate_range == (0, 256)
    vm.check()


def test_attrs_0_is_absent():
    """Attribute 0 is stored as absent, like the kernel's xarray: converting back leaves no runs (§1)."""
    vm = pkvm.VM(1)
    vm.set_memory_attributes(0, GiB, PRIVATE)
    vm.set_memory_attributes(0, GiB, 0)
    assert len(vm._attrs) == 0 and vm.get_memory_attributes(5) == 0
