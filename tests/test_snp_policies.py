"""The four ``Policy.rmp_update`` designs on one small conversion, with exact operation counts,
and the races they open or close (kernel-semantics.md §4.4, §7.7; docs/snp.md explains each
number)."""

import pytest
from vmhelpers import GMEM, PRIVATE, UADDR, MiB

import pkvm

from pkvm import PG_LEVEL_4K
from pkvm.platforms.snp_constants import PVALIDATE_SUCCESS

POLICIES = ("fault-time", "eager-post", "eager-locked", "eager-split")
KEYS = ("rmpupdate", "psmash", "directmap_cpa_calls", "directmap_splits", "directmap_unmaps",
        "directmap_restores", "sleep_in_atomic", "rmpupdate_failures", "mem_attr_op_failures",
        "zapped_sptes", "remote_tlb_flush")
GPA, SIZE = 0x10000, 0x4000  # gfns 0x10-0x13


def setup(rmp_update, directmap, order=0, gpa=GPA, size=SIZE):
    pol = pkvm.Policy.preset("6.19").replace(rmp_update=rmp_update, directmap=directmap, gmem_max_order=order)
    vm = pkvm.VM("snp", policy=pol, shared_backing="4k")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    vcpu = vm.create_vcpu()
    assert vcpu.pvalidate_range(gpa, size, True).status == PVALIDATE_SUCCESS
    return vm, gmem, vcpu


def delta(vm, before):
    now = vm.stats
    return {k: now[k] - before[k] for k in KEYS if now[k] != before[k]}


# Expected deltas of: the guest's rescind + KVM_SET_MEMORY_ATTRIBUTES(shared) without a hole
# punch, then KVM_SET_MEMORY_ATTRIBUTES(private), for 4 allocated, RMP-assigned 4K pages.
TO_SHARED = {
    ("fault-time", "split-4k"): {},
    ("fault-time", "unmap-restore"): {},
    ("eager-post", "split-4k"): {"rmpupdate": 4},
    ("eager-post", "unmap-restore"): {"rmpupdate": 4, "directmap_cpa_calls": 4, "directmap_restores": 4},
    ("eager-locked", "split-4k"): {"rmpupdate": 4},
    # no sleep under mmu_lock: the pages are mapped at 4K already, and RFC v8's _noflush
    # helpers sleep only to allocate a split's page-table page (a mutex only in v7's set_memory_p)
    ("eager-locked", "unmap-restore"): {"rmpupdate": 4, "directmap_cpa_calls": 4, "directmap_restores": 4},
    ("eager-split", "split-4k"): {"rmpupdate": 4},
    ("eager-split", "unmap-restore"): {"rmpupdate": 4, "directmap_cpa_calls": 4, "directmap_restores": 4},
}
TO_PRIVATE = {
    ("fault-time", "split-4k"): {},
    ("fault-time", "unmap-restore"): {},
    ("eager-post", "split-4k"): {"rmpupdate": 4},
    ("eager-post", "unmap-restore"): {"rmpupdate": 4, "directmap_cpa_calls": 4, "directmap_unmaps": 4},
    ("eager-locked", "split-4k"): {"rmpupdate": 4},
    ("eager-locked", "unmap-restore"): {"rmpupdate": 4, "directmap_cpa_calls": 4, "directmap_unmaps": 4},
    ("eager-split", "split-4k"): {"rmpupdate": 4},
    ("eager-split", "unmap-restore"): {"rmpupdate": 4, "directmap_cpa_calls": 4, "directmap_unmaps": 4},
}


@pytest.mark.parametrize("directmap", ["split-4k", "unmap-restore"])
@pytest.mark.parametrize("policy", POLICIES)
def test_small_conversion_exact_counts(policy, directmap):
    vm, gmem, vcpu = setup(policy, directmap)
    # The first private faults: one 4K RMPUPDATE range of 4 pages in gmem_prepare, whatever
    # the policy; split-4k splits the 1G boot mapping to 2M and one 2M to 4K (1 CPA call),
    # unmap-restore unmaps the 4 pages one CPA call each (splitting the same two mappings).
    st = vm.stats
    assert (st["rmpupdate"], st["gmem_prepare"], st["directmap_splits"]) == (4, 4, 2)
    assert st["directmap_cpa_calls"] == (1 if directmap == "split-4k" else 4)
    assert st["directmap_unmaps"] == (0 if directmap == "split-4k" else 4)
    assert vcpu.pvalidate_range(GPA, SIZE, False).status == PVALIDATE_SUCCESS
    before = vm.stats
    vm.set_memory_attributes(GPA, SIZE, 0)
    d = delta(vm, before)
    assert d.pop("zapped_sptes") == 4 and d.pop("remote_tlb_flush") == 1
    assert d == TO_SHARED[policy, directmap]
    pfn = gmem.folio(0x10)[0]
    assert vm.rmp.lookup(pfn).assigned == (policy == "fault-time")  # §4.4: the ioctl leaves the RMP
    before = vm.stats
    vm.set_memory_attributes(GPA, SIZE, PRIVATE)
    assert delta(vm, before) == TO_PRIVATE[policy, directmap]  # nothing mapped: no zap
    assert vm.rmp.lookup(pfn) == (True, PG_LEVEL_4K, 1, GPA, False, False, False)
    # The guest validates again: the folio is prepared, so no gmem_prepare and no RMPUPDATE.
    before = vm.stats
    assert vcpu.pvalidate_range(GPA, SIZE, True).status == PVALIDATE_SUCCESS
    assert delta(vm, before) == {}
    assert vcpu.access(GPA, private=True, size=SIZE).ret == "done"
    vm.check()


@pytest.mark.parametrize("policy", POLICIES)
def test_2m_folio_conversion_counts(policy):
    """A 2M folio fully inside the range: eager to-shared uses one 2M RMPUPDATE, to-private
    one 2M RMPUPDATE; a 4K piece of it needs a PSMASH first."""
    vm, _gmem, vcpu = setup(policy, "split-4k", order=9, gpa=0, size=2 * MiB)
    assert vm.stats["rmpupdate_2m"] == 1 and vm.stats["pvalidate_2m"] == 1
    vcpu.pvalidate_range(0, 2 * MiB, False)
    before = vm.stats
    vm.set_memory_attributes(0, 2 * MiB, 0)
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    d = delta(vm, before)
    eager = policy != "fault-time"
    assert d.get("rmpupdate", 0) == (2 if eager else 0) and d.get("psmash", 0) == 0
    before = vm.stats
    vm.set_memory_attributes(0x1000, 0x1000, 0)  # one 4K page of the 2M entry
    d = delta(vm, before)
    assert d.get("psmash", 0) == (1 if eager else 0) and d.get("rmpupdate", 0) == (1 if eager else 0)
    vm.check()


def _phases(vm, start, end, attrs):
    ranges = vm._slot_maps[0].ranges(start, end)
    return ranges, [
        ("pre_lock", lambda: vm._attr_pre_lock(ranges, attrs) if vm._eager_split else None),
        ("pre", lambda: vm._attr_pre(ranges, attrs)),
        ("commit", lambda: vm._attr_commit(start, end, attrs)),
        ("post", lambda: vm._attr_post(ranges, attrs)),
        ("post_unlock", lambda: vm._attr_post_unlock(ranges, attrs) if vm._eager_post else None),
    ]


def test_eager_post_window_guest_loops_on_rmp_npf_until_rmpupdate():
    """M. Roth's race (§7.7): after the attribute store but before ``update_mem_attr``, the
    guest's fault maps the pfn per the xarray, its PVALIDATE takes an RMP #NPF that the handler
    treats as a no-op, and the guest loops until the post-unlock RMPUPDATE runs."""
    vm, _gmem, vcpu = setup("eager-post", "split-4k")
    vcpu.pvalidate_range(GPA, SIZE, False)
    vm.set_memory_attributes(GPA, SIZE, 0)  # eager: RMP shared now
    s, e = GPA >> 12, (GPA + SIZE) >> 12
    _, phases = _phases(vm, s, e, PRIVATE)
    for name, run in phases[:-1]:
        run()
    r = vcpu.pvalidate(GPA, PG_LEVEL_4K, True)
    assert r.ret == "rmp_loop" and vm.stats["rmp_fault"] == 1
    assert vm.mmu.lookup(s).private  # mapped per the attribute, RMP not assigned
    phases[-1][1]()  # update_mem_attr: RMPUPDATE after mmu_lock is dropped
    assert vcpu.pvalidate(GPA, PG_LEVEL_4K, True).status == PVALIDATE_SUCCESS
    vm.check()


def test_fault_time_has_no_window():
    """Under fault-time the page stays assigned across the round trip, so no phase boundary
    exposes an unassigned mapped page (§4.4)."""
    vm, _gmem, vcpu = setup("fault-time", "split-4k")
    vcpu.pvalidate_range(GPA, SIZE, False)
    vm.set_memory_attributes(GPA, SIZE, 0)
    s, e = GPA >> 12, (GPA + SIZE) >> 12
    _, phases = _phases(vm, s, e, PRIVATE)
    for name, run in phases:
        run()
        if name == "post":
            assert vcpu.pvalidate(GPA, PG_LEVEL_4K, True).status == PVALIDATE_SUCCESS
    assert vm.stats["rmp_fault"] == 0
    vm.check()


def test_eager_split_phases_do_directmap_outside_the_lock():
    vm, gmem, vcpu = setup("eager-split", "unmap-restore")
    vcpu.pvalidate_range(GPA, SIZE, False)
    vm.set_memory_attributes(GPA, SIZE, 0)
    pfn = gmem.folio(0x10)[0]
    assert vm.directmap.is_present(pfn) and not vm.rmp.lookup(pfn).assigned
    s, e = GPA >> 12, (GPA + SIZE) >> 12
    _, phases = _phases(vm, s, e, PRIVATE)
    phases[0][1]()  # pre phase: unmapped, RMP not yet assigned
    assert not vm.directmap.is_present(pfn) and not vm.rmp.lookup(pfn).assigned
    assert vm.mmu_invalidate_in_progress == 0
    for name, run in phases[1:4]:
        run()
    assert vm.rmp.lookup(pfn).assigned  # RMPUPDATE under the lock, after the seq bump
    phases[4][1]()
    assert vm.stats["sleep_in_atomic"] == 0 and vm.stats["mem_attr_op_failures"] == 0
    vm.check()


@pytest.mark.parametrize("directmap, sleeps", [("split-4k", 1), ("unmap-restore", 2)])
def test_eager_locked_counts_sleep_in_atomic_and_events(directmap, sleeps):
    """eager-locked makes the direct-map changes under ``mmu_lock``; the ones that may sleep
    count ``sleep_in_atomic`` and log: every ``set_memory_4k`` (``vm_unmap_aliases`` takes a
    mutex), and of RFC v8's ``_noflush`` calls only those that split (``split_large_page``
    allocates with ``GFP_KERNEL``; kernel-semantics.md §5.8). Four allocated pages made private
    in one ioctl: split-4k makes one call (1G -> 2M -> 4K), unmap-restore four, of which the
    first splits twice. Made shared again, the pages are restored at 4K: no sleep."""
    pol = pkvm.Policy.preset("6.19").replace(rmp_update="eager-locked", directmap=directmap)
    vm = pkvm.VM("snp", policy=pol, shared_backing="4k")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 4 * MiB, UADDR, gmem, 0)
    gmem.fallocate(pkvm.FALLOC_FL_KEEP_SIZE, GPA, SIZE)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    st = vm.stats
    assert (st["rmpupdate"], st["directmap_splits"]) == (4, 2)
    assert st["directmap_cpa_calls"] == (1 if directmap == "split-4k" else 4)
    assert st["sleep_in_atomic"] == sleeps
    assert sum(kind == "sleep_in_atomic" for kind, _ in vm.events) == 1
    vm.set_memory_attributes(GPA, SIZE, 0)
    assert vm.stats["sleep_in_atomic"] == sleeps


def test_eager_failures_are_only_counted():
    vm, gmem, vcpu = setup("eager-post", "split-4k")
    vcpu.pvalidate_range(GPA, SIZE, False)
    pfn = gmem.folio(0x10)[0]
    vm.rmp.set_in_use(pfn + 2)
    vm.set_memory_attributes(GPA, SIZE, 0)  # does not raise
    assert vm.stats["rmpupdate_failures"] == 1 and vm.stats["mem_attr_op_failures"] == 1
    assert vm.get_memory_attributes(0x12) == 0
    assert not vm.rmp.lookup(pfn + 1).assigned and vm.rmp.lookup(pfn + 2).assigned


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_the_guest_flows(policy):
    pol = pkvm.Policy.preset("6.19").replace(rmp_update=policy, directmap="unmap-restore")
    vm = pkvm.VM("snp", policy=pol, shared_backing="4k")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 8 * MiB)
    g = pkvm.Guest(vm, vmm)
    assert g.accept(0, 8 * MiB)
    assert g.convert(2 * MiB, 2 * MiB, private=False)
    assert g.touch(2 * MiB, 2 * MiB, private=False, write=True).ret == "done"
    assert g.convert(2 * MiB, 2 * MiB, private=True)
    assert g.touch(0, 8 * MiB, private=True, write=True).ret == "done"
    st = vm.stats
    assert st["rmpupdate"] == 2048 + 512 + 512 and st["rmpupdate_failures"] == 0
    # eager-locked's restores and unmaps under mmu_lock find the pages mapped at 4K (the first
    # faults split them): RFC v8's _noflush calls do not sleep then (kernel-semantics.md §5.8)
    assert st["sleep_in_atomic"] == 0
    vm.check()


@pytest.mark.parametrize("directmap", ["split-4k", "unmap-restore"])
def test_direct_map_flushes_once_per_split_and_prices_each_cpa_call(directmap):
    """The kernel flushes every CPU's TLB inside ``__split_large_page`` (``flush_tlb_all`` under
    ``cpa_lock``), once per split; nothing else flushes. ``set_memory_4k`` changes no entry after
    its splits (no ``CPA_FLUSHTLB``, no ``cpa_flush``), and RFC v8's unmap / restore go through
    the ``_noflush`` helpers page by page (arch/x86/mm/pat/set_memory.c:
    ``change_page_attr_set_clr``, ``__split_large_page``; kernel-semantics.md §5.8). The first
    private faults of ``setup`` split the 1G boot mapping to 2M and one 2M block to 4K: two
    splits, two flushes, under either design, and one CPA call (split-4k) or four (one per
    page, unmap-restore), each priced ``directmap_cpa_call``. Converting the four pages to
    shared and back under an eager design unmaps / restores them page by page: four CPA
    calls each way and no flush (the mapping is 4K already)."""
    vm, gmem, vcpu = setup("eager-post", directmap)
    st, costs = vm.stats, vm.cost_breakdown()
    calls = 1 if directmap == "split-4k" else 4
    assert (st["directmap_splits"], st["directmap_tlb_flushes"], st["directmap_cpa_calls"]) == (2, 2, calls)
    assert costs["directmap_tlb_flush"] == 2 * vm.costs.ns("directmap_tlb_flush", nr_cpus=vm.snp.host_cpus)
    assert costs["directmap_cpa_call"] == calls * vm.costs.ns("directmap_cpa_call") == calls * 200
    assert vcpu.pvalidate_range(GPA, SIZE, False).status == PVALIDATE_SUCCESS
    before = vm.stats
    vm.set_memory_attributes(GPA, SIZE, 0)
    vm.set_memory_attributes(GPA, SIZE, PRIVATE)
    after = vm.stats
    assert after["directmap_tlb_flushes"] == before["directmap_tlb_flushes"]
    assert after["directmap_cpa_calls"] - before["directmap_cpa_calls"] == (0 if directmap == "split-4k" else 8)
