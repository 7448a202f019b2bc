"""KVM's host MMU notifier on a discard of the VMM's shared backing (docs/kernel-semantics.md
§4.7): ``MADV_DONTNEED`` (``Vmm`` on a conversion to private and on a balloon inflate; a
replayed ``madvise``) runs ``kvm_mmu_notifier_invalidate_range_start`` / ``_end``
(``virt/kvm/kvm_main.c``): one invalidation over every memslot the HVA range overlaps, the
gfns' leaves zapped (the SHARED filter from ~6.14, which spares only TDX's mirror root), a TLB
flush if anything was zapped, and ``mmu_invalidate_seq`` bumped, populated or not."""

from __future__ import annotations

import pytest

import pkvm
from pkvm.actors.vmm import Vmm
from pkvm.sim.timeline import Timeline

MiB = 1 << 20
PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE


def _hva_range(vm: pkvm.VM, slot_id: int = 0) -> tuple[int, int]:
    slot = vm.memslot(slot_id)
    h = slot.hva_page(slot.base_gfn)
    return h, h + slot.npages


def test_discard_of_mapped_shared_memory_zaps_its_sptes():
    """The audit's pin (it was a strict xfail): pkvm's VMM discard freed the host pages of a
    DEFAULT VM's shared memory but left the SPTEs that mapped them."""
    vm = pkvm.VM("default", policy="6.19")
    vmm = Vmm(vm)
    vmm.add_ram_layout(1 << 30)
    assert vm.create_vcpu().access(0x200000, private=False, size=0x1000).ret == "done"
    vmm.discard_ram(0x200000, 0x200000)
    assert vm.mmu.lookup(0x200) is None
    vm.check()


@pytest.mark.parametrize("policy", ["6.8", "6.19"])
def test_default_vm_discard_unmaps_and_counts(policy):
    """Mapped shared memory discarded: every leaf in range zapped (counted and priced once
    each), one TLB flush, ``mmu_invalidate_seq`` + 1; the pages leave the host allocator and
    ``vm.check()`` holds. Leaves outside the range stay."""
    vm = pkvm.VM("default", policy=policy, shared_backing="4k")
    vmm = Vmm(vm)
    vmm.add_ram(0, 16 * MiB)
    assert vm.create_vcpu().access(0, private=False, size=8 * MiB).ret == "done"
    st, cost, used = dict(vm.stats), vm.cost_breakdown(), vm.hostmem.nr_allocated
    vmm.discard_ram(2 * MiB, 4 * MiB)
    moved = {k: vm.stats[k] - st[k] for k in vm.stats if vm.stats[k] != st[k]}
    assert moved == {"mmu_invalidate_seq": 1, "zapped_sptes": 1024, "pages_4k": -1024,
                     "remote_tlb_flush": 1, "remote_tlb_flush_requests": 1}
    cb = vm.cost_breakdown()
    assert cb["zap_spte"] - cost.get("zap_spte", 0) == 1024 * vm.costs.ns("zap_spte")
    assert cb["remote_tlb_flush"] - cost.get("remote_tlb_flush", 0) == vm.costs.ns("remote_tlb_flush", nr_vcpus=1)
    assert vm.hostmem.nr_allocated == used - 1024
    assert [vm.mmu.lookup(g) is None for g in (0x1ff, 0x200, 0x5ff, 0x600)] == [False, True, True, False]
    assert vm.mmu_invalidate_in_progress == 0
    vm.check()


@pytest.mark.parametrize("platform", ["default", "sw_protected", "snp", "tdx"])
def test_seq_moves_once_per_discard_that_overlaps_a_memslot(platform):
    """One ``mmu_invalidate_seq`` bump per madvise that overlaps a memslot, populated or not,
    and however many memslots it overlaps; none (and no lock taken) for one that overlaps none."""
    vm = pkvm.VM(platform)
    vmm = Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    vmm.add_ram(4 * MiB, 4 * MiB)  # the next memslot, at the next free HVA (1 GiB aligned)
    lo0, hi0 = _hva_range(vm, 0)
    lo1, hi1 = _hva_range(vm, 1)
    seq = vm.stats["mmu_invalidate_seq"]
    vm._madvise_dontneed(lo0, lo0 + 1)  # nothing populated there
    assert vm.stats["mmu_invalidate_seq"] == seq + 1
    vm._madvise_dontneed(lo0, hi1)  # both memslots (and the hole between their HVAs): one pair
    assert vm.stats["mmu_invalidate_seq"] == seq + 2
    vm._madvise_dontneed(hi1, hi1 + 512)  # past every memslot
    vm._madvise_dontneed(lo0 - 512, lo0)
    assert vm.stats["mmu_invalidate_seq"] == seq + 2
    assert vm.mmu_invalidate_in_progress == 0
    vm.check()


def test_conversion_to_private_bumps_seq_for_the_ioctl_and_the_discard():
    """QEMU's ``kvm_convert_memory`` to private: the attribute ioctl's invalidation, then the
    discard's; a conversion whose attributes are already private short-circuits the ioctl
    (no bump) and still discards (one bump); a hugetlb backing is not discarded (none)."""
    vm = pkvm.VM("sw_protected")
    vmm = Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    assert vmm.convert_memory(0, 2 * MiB, False) == 0
    seq = vm.stats["mmu_invalidate_seq"]
    assert vmm.convert_memory(0, 2 * MiB, True) == 0
    assert vm.stats["mmu_invalidate_seq"] == seq + 2
    assert vmm.convert_memory(0, 2 * MiB, True) == 0
    assert vm.stats["mmu_invalidate_seq"] == seq + 3
    vm2 = pkvm.VM("sw_protected", shared_backing="hugetlb-2m")
    vmm2 = Vmm(vm2)
    vmm2.add_ram(0, 4 * MiB)
    seq = vm2.stats["mmu_invalidate_seq"]
    assert vmm2.convert_memory(0, 2 * MiB, True) == 0
    assert vm2.stats["mmu_invalidate_seq"] == seq


@pytest.mark.parametrize(("platform", "policy", "private_zapped"), [
    ("sw_protected", "6.8", True), ("sw_protected", "6.19", True),  # one root: the filter spares nothing
    ("snp", "6.19", True),
    ("tdx", "6.19", False),  # the SHARED filter: the direct root only, the mirror root is spared
    ("tdx", "6.19+zap_filter=all", True),  # no filter (pre-6.14 kvm_unmap_gfn_range): every root
])
def test_private_mappings_and_the_filter(platform, policy, private_zapped):
    """A discard over memory mapped private (a to-private conversion of memory already
    private: the ioctl short-circuits, QEMU discards anyway)."""
    vm = pkvm.VM(platform, policy=policy)
    vmm = Vmm(vm)
    vmm.add_ram(0, 8 * MiB)
    vm.create_vcpu()
    vmm.launch(())
    g = pkvm.Guest(vm, vmm, vm.vcpus[0])
    assert g.accept(0, 8 * MiB) and g.touch(0, 2 * MiB, private=True).ret == "done"
    assert g.convert(4 * MiB, 2 * MiB, private=False) and g.touch(4 * MiB, 2 * MiB, private=False).ret == "done"
    assert vm.mmu.lookup(0) is not None and vm.mmu.lookup(0x400) is not None
    seq = vm.stats["mmu_invalidate_seq"]
    assert vmm.convert_memory(0, 2 * MiB, True) == 0
    assert vm.stats["mmu_invalidate_seq"] == seq + 1
    assert (vm.mmu.lookup(0) is None) == private_zapped
    assert vm.mmu.lookup(0x400) is not None  # outside the discarded range
    lo, hi = _hva_range(vm)
    vm._madvise_dontneed(lo + 0x400, lo + 0x600)  # the shared range: zapped on every VM
    assert vm.mmu.lookup(0x400) is None
    vm.check()


def test_replayed_madvise_runs_the_notifier_once():
    """The trace replay's ``madvise`` is one syscall: one notifier pair over every memslot it
    overlaps (the VMM's own discards go through the same ``VM._madvise_dontneed``)."""
    from pkvm.experiments.replay import _Replayer

    vm = pkvm.VM("default", policy="6.19", shared_backing="4k")
    vmm = Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    vmm.add_ram(4 * MiB, 4 * MiB)
    assert vm.create_vcpu().access(0, private=False, size=8 * MiB).ret == "done"
    rp = _Replayer.__new__(_Replayer)  # only what madvise reads
    rp.vm, rp.run = vm, None
    lo0, _ = _hva_range(vm, 0)
    _, hi1 = _hva_range(vm, 1)
    rp.madvise(lo0 << 12, (hi1 - lo0) << 12, 4)  # MADV_DONTNEED over both memslots
    assert vm.stats["mmu_invalidate_seq"] == 1 and vm.stats["remote_tlb_flush"] == 1
    assert vm.stats["zapped_sptes"] == 2048 and vm.mmu.sptes.ranges() == []
    rp.madvise(lo0 << 12, 4096, 8)  # not MADV_DONTNEED: ignored
    assert vm.stats["mmu_invalidate_seq"] == 1
    vm.check()


def _race(delay_ns: int, notifier: bool = True) -> tuple[pkvm.VM, object, pkvm.AccessResult]:
    """vCPU0 touches 64 MiB of shared memory (4K pages) while the VMM, ``delay_ns`` later,
    discards it (a balloon inflate of a DEFAULT VM)."""
    vm = pkvm.VM("default", policy="6.19", shared_backing="4k")
    vmm = Vmm(vm)
    vmm.add_ram(0, 64 * MiB)
    v = vm.create_vcpu()
    tl = Timeline(vm)
    out: dict[str, pkvm.AccessResult] = {}

    def vcpu0() -> None:
        out["r"] = v.access(0, private=False, size=64 * MiB)

    def vmm_thread() -> None:
        tl.sleep(delay_ns)
        vmm.discard_ram(0, 64 * MiB)

    tl.spawn("vcpu0", vcpu0)
    tl.spawn("vmm", vmm_thread)
    tl.run()
    return vm, tl.result(), out["r"]


def test_timeline_fault_in_flight_sees_the_invalidation():
    """On the timeline the notifier takes ``mmu_lock`` for write twice (start, end); a fault in
    flight when it runs sees the invalidation and retries (``is_page_fault_stale``), then maps
    the re-populated memory: no SPTE is left over a freed page."""
    vm, r, acc = _race(1_000)
    assert acc.ret == "done"
    assert r.races["pf_retry"] >= 1 and vm.stats["pf_retry"] >= 1
    assert vm.stats["mmu_invalidate_seq"] == 1
    vm.check()


def test_timeline_discard_after_the_touch_zaps_under_mmu_lock():
    vm, r, acc = _race(10_000_000_000)  # long after the touch finished
    assert acc.ret == "done" and vm.stats["pf_retry"] == 0
    assert vm.stats["zapped_sptes"] == 16384 and vm.stats["remote_tlb_flush"] == 1
    assert r.locks["mmu_lock"]["hold_write_ns"] > 0
    assert vm.mmu.lookup(0) is None
    vm.check()


# -- a batched fault beside an open invalidation -------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from vmhelpers import GMEM, UADDR, snapshot  # noqa: E402

_PAGES = 1024  # 4 MiB: two 2M blocks


def _vm_with_open_invalidation(platform, lo, hi):
    """A VM with a guest_memfd slot over [0, 4M) (the lower half private) and an invalidation
    of gfns ``[lo, hi)`` begun and left open, as another thread's would be."""
    vm = pkvm.VM(platform, policy="6.19")
    gmem = vm.create_guest_memfd(_PAGES << 12)
    vm.set_user_memory_region2(0, GMEM, 0, _PAGES << 12, UADDR, gmem, 0)
    vm.set_memory_attributes(0, _PAGES << 11, PRIVATE)
    vm._invalidate_begin()
    vm._invalidate_range_add(lo, hi)
    return vm, vm.create_vcpu()


def _batch_against_pages(batch_vcpu, loop_vcpu, start, end, private, state):
    """One access over gfns ``[start, end)`` on ``batch_vcpu``'s VM, and the same pages one per
    call (never a batch) on ``loop_vcpu``'s twin: the same result, faults, ``state(vm)`` and
    cost by actor; then each VM's invalidation ends and its invariants hold."""
    r = batch_vcpu.access(start << 12, private=private, size=(end - start) << 12)
    done = faults = 0
    ret = "done"
    for g in range(start, end):
        one = loop_vcpu.access(g << 12, private=private, size=1 << 12)
        faults += one.faults
        done += one.pages_done
        if one.ret != "done":
            ret = one.ret
            break
    assert (r.pages_done, r.faults) == (done, faults)
    assert (r.ret == "done") == (ret == "done")
    batch_vm, loop_vm = batch_vcpu.vm, loop_vcpu.vm
    assert state(batch_vm) == state(loop_vm)
    assert batch_vm.cost_by_actor() == loop_vm.cost_by_actor()
    for v in (batch_vm, loop_vm):
        v._invalidate_end()
        v.check()


@settings(max_examples=60, deadline=None)
@given(platform=st.sampled_from(["sw_protected", "snp"]), lo=st.integers(0, _PAGES), n=st.integers(1, 600),
       start=st.integers(0, _PAGES - 1), npages=st.integers(1, 700), private=st.booleans())
def test_a_batch_beside_an_open_invalidation_matches_its_pages_one_by_one(platform, lo, n, start, npages, private):
    """While another thread's invalidation is open, the kernel's fault of each page retries only
    if the invalidation's range covers that page (``mmu_invalidate_retry_gfn``). A batched access
    maps the pages below the range (or above it) in one batch and stops at the first page the
    range covers, exactly as the same pages faulted one at a time do: the same result, faults,
    counters, SPTEs, folios, host pages and modeled time. (Until 2026-12-06 any open
    invalidation made every fault a single page: with 64 vCPUs converting at once one nearly
    always is, and a 1 TiB boot ran one page per event.)"""
    hi = min(lo + n, _PAGES)
    if private != (start < _PAGES // 2):
        start = (start + _PAGES // 2) % _PAGES  # the access's type matches the page's attribute
    end = min(start + npages, _PAGES // 2 if private else _PAGES)
    batch_vm, batch_vcpu = _vm_with_open_invalidation(platform, lo, hi)
    loop_vm, loop_vcpu = _vm_with_open_invalidation(platform, lo, hi)
    _batch_against_pages(batch_vcpu, loop_vcpu, start, end, private, snapshot)
    if platform == "snp":
        assert batch_vm.rmp.ranges() == loop_vm.rmp.ranges()


def test_a_batch_stops_at_an_open_invalidation_and_runs_whole_beside_it():
    """The batch is one fault below the open range (one ``fault`` event for its pages), stops
    at its first gfn (which retries), and runs whole above it."""
    vm, vcpu = _vm_with_open_invalidation("sw_protected", 100, 200)
    seen = []
    vm.subscribe(seen.append)
    r = vcpu.access(0, private=True, size=100 << 12)
    assert (r.ret, r.pages_done, r.faults) == ("done", 100, 100)
    assert [(e.gfn_start, e.gfn_end, e.count) for e in seen if e.kind == "fault"] == [(0, 100, 100)]
    seen.clear()
    r = vcpu.access(200 << 12, private=True, size=300 << 12)
    assert [(e.gfn_start, e.gfn_end, e.count) for e in seen if e.kind == "fault"] == [(200, 500, 300)]
    r = vcpu.access(100 << 12, private=True, size=1 << 12)
    assert r.ret != "done" and r.pages_done == 0 and vm.mmu.lookup(100) is None
    vm._invalidate_end()
    assert vcpu.access(100 << 12, private=True, size=100 << 12).ret == "done"
    vm.check()


@settings(deadline=None)
@given(lo=st.integers(0, _PAGES), n=st.integers(1, 600), start=st.integers(_PAGES // 2, _PAGES - 1),
       npages=st.integers(1, 600))
def test_a_td_shared_batch_beside_an_open_invalidation_matches_its_pages_one_by_one(lo, n, start, npages):
    """The same on a TD, over its shared half (4K shared backing, so a batch maps many 4K
    leaves through the shared root; a TD's private faults come one page per TDCALL): the batch
    and the pages one per call leave the same S-EPT, SPTEs, counters and modeled time."""
    from tdxhelpers import td, tdx_snapshot

    hi = min(lo + n, _PAGES)
    end = min(start + npages, _PAGES)
    vms = []
    for _ in range(2):
        vm, _vmm, _gmem, vcpu = td(_PAGES << 12, shared_backing="4k")
        vm.set_memory_attributes(_PAGES << 11, _PAGES << 11, 0)
        vm._invalidate_begin()
        vm._invalidate_range_add(lo, hi)
        vms.append((vm, vcpu))
    (batch_vm, batch_vcpu), (loop_vm, loop_vcpu) = vms
    _batch_against_pages(batch_vcpu, loop_vcpu, start, end, False, tdx_snapshot)
