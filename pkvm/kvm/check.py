"""``VM.check()``: every cross-structure invariant of the KVM model, range by range.

Runtime complexity: O(k log n) for k runs in all maps; nothing is expanded per page.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from pkvm.constants import KVM_MEM_READONLY, KVM_MEMORY_ATTRIBUTE_PRIVATE, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.errors import InternalInvariantError
from pkvm.host.hostmem import decode_delta
from pkvm.kvm.gmem import FOLIO_PREPARED
from pkvm.kvm.memslots import expected_mixed
from pkvm.kvm.mmu import KVM_LPAGE_MIXED_FLAG, LEVEL_SHIFT, SPTE_PRIVATE, SPTE_WRITABLE, LpageInfo, spte_level

if TYPE_CHECKING:  # pragma: no cover
    from pkvm._core import RangeMap
    from pkvm.kvm.vm import VM, Memslot


def _fail(msg: str) -> None:
    raise InternalInvariantError(msg)


def _check_rangemaps(vm: VM) -> None:
    try:
        vm._attrs._check()
        vm._mmu.sptes._check()
        for m in vm._slot_maps:
            m._check()
        for slot in vm._slots.values():
            for m in slot.lpage.maps[PG_LEVEL_2M:]:
                m._check()
        for g in vm._gmems:
            g.folios._check()
            g.bindings._check()
    except AssertionError as exc:
        raise InternalInvariantError(f"RangeMap structure: {exc}") from exc
    path = getattr(vm, "_attr_path", None)
    if path is not None:
        path.memo_check()  # the attribute runs POST's 1G tests remember are the map's


def _count_runs(m: RangeMap) -> list[tuple[int, int, int]]:
    """Coalesced ``(start, end, count)`` runs of an lpage map, MIXED bit stripped, zeros dropped."""
    out: list[tuple[int, int, int]] = []
    for s, e, v in m.iter_ranges():
        c = v & ~KVM_LPAGE_MIXED_FLAG
        if not c:
            continue
        if out and out[-1][1] == s and out[-1][2] == c:
            out[-1] = (out[-1][0], e, c)
        else:
            out.append((s, e, c))
    return out


def _check_lpage(vm: VM, slot: Memslot) -> None:
    """docs/kernel-semantics.md §3.1 counts and the §3.4 MIXED invariant for every chunk fully
    inside ``slot``."""
    for level in (PG_LEVEL_2M, PG_LEVEL_1G):
        shift = LEVEL_SHIFT[level]
        m = slot.lpage.maps[level]
        first, last = slot.base_gfn >> shift, (slot.end_gfn - 1) >> shift
        for s, e, _v in m.iter_ranges():
            if s < first or e > last + 1:
                _fail(f"slot {slot.key:#x}: level-{level} lpage run [{s:#x}, {e:#x}) outside the slot")
        # Counts: exactly what slot creation set (§3.1), compared run by run with MIXED stripped.
        want_counts = _count_runs(LpageInfo(slot.base_gfn, slot.npages, slot._ugfn).maps[level])
        got_counts = _count_runs(m)
        if got_counts != want_counts:
            _fail(f"slot {slot.key:#x}: level-{level} disallow counts {got_counts[:4]} != {want_counts[:4]}")
        if not vm._platform.has_private_mem:
            continue
        full_a = (slot.base_gfn + (1 << shift) - 1) >> shift
        full_b = slot.end_gfn >> shift
        want = expected_mixed(vm, slot, level)
        for s, e, v in (m.iter_ranges(full_a, full_b) if full_a < full_b else ()):
            n_expected = bisect_left(want, e) - bisect_left(want, s)
            if v & KVM_LPAGE_MIXED_FLAG and n_expected != e - s:
                _fail(f"slot {slot.key:#x}: level-{level} chunks [{s:#x}, {e:#x}) are MIXED but uniform")
            if not v & KVM_LPAGE_MIXED_FLAG and n_expected:
                _fail(f"slot {slot.key:#x}: level-{level} chunks in [{s:#x}, {e:#x}) are mixed but not MIXED")
        for c in want:
            if not m.get(c) & KVM_LPAGE_MIXED_FLAG:
                _fail(f"slot {slot.key:#x}: level-{level} chunk {c:#x} has mixed attributes but no MIXED flag")


def _check_sptes(vm: VM) -> None:
    """Every leaf lies in a slot, agrees with attributes and points at its backing."""
    slot_map = vm._slot_maps[0]
    attrs = vm._attrs
    private_vm = vm._platform.has_private_mem
    for s, e, v in vm._mmu.sptes.iter_ranges():
        level = spte_level(v)
        private = bool(v & SPTE_PRIVATE)
        delta = decode_delta(v)
        k = s
        while k < e:
            ks, ke, key = slot_map.run_at(k)
            ke = min(ke, e)
            if not key:
                _fail(f"SPTEs on gfns [{k:#x}, {ke:#x}) outside every memslot")
            slot = vm._slots[key - 1]
            if (level > PG_LEVEL_4K and (k & ((1 << LEVEL_SHIFT[level]) - 1)
                                         or ke & ((1 << LEVEL_SHIFT[level]) - 1))):
                _fail(f"level-{level} leaf straddles slot {slot.key:#x} at [{k:#x}, {ke:#x})")
            want_attr = KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
            if private_vm and attrs.find_ne(k, ke, want_attr) != -1:
                bad = attrs.find_ne(k, ke, want_attr)
                _fail(f"{'private' if private else 'shared'} SPTE on gfn {bad:#x} whose attributes are "
                      f"{attrs.get(bad):#x}")
            if bool(v & SPTE_WRITABLE) == bool(slot.flags & KVM_MEM_READONLY):
                _fail(f"SPTEs [{k:#x}, {ke:#x}) writable={bool(v & SPTE_WRITABLE)} in slot flags {slot.flags:#x}")
            if level > PG_LEVEL_4K:
                for g in range(k, ke, 1 << LEVEL_SHIFT[level]):
                    if slot.lpage.word(g, level):
                        _fail(f"level-{level} leaf at gfn {g:#x} where disallow_lpage is "
                              f"{slot.lpage.word(g, level):#x}")
                    if ke - k > (1 << 30):
                        break  # a spot check suffices for enormous uniform runs
            if private:
                _check_private_backing(vm, slot, k, ke, delta)
            else:
                _check_shared_backing(vm, slot, k, ke, delta)
            k = ke


def _check_private_backing(vm: VM, slot: Memslot, s: int, e: int, delta: int) -> None:
    gmem = slot.gmem
    if gmem is None or slot.gmem_file is None:
        _fail(f"private SPTEs [{s:#x}, {e:#x}) in slot {slot.key:#x} without an open guest_memfd")
    off = slot.gmem_pgoff - slot.base_gfn
    i = s + off
    while i < e + off:
        fs, fe, fv = gmem.folios.run_at(i)  # type: ignore[union-attr]
        fe = min(fe, e + off)
        if not fv:
            _fail(f"private SPTEs on gfns from {i - off:#x} have no folio")
        if fv & FOLIO_PREPARED == 0 and not vm.vm_bugged:  # a bugged VM may stop half way
            _fail(f"private SPTE on gfn {i - off:#x} maps an unprepared folio")
        if i + decode_delta(fv) != i - off + delta:
            _fail(f"private SPTE on gfn {i - off:#x} maps pfn {i - off + delta:#x}, "
                  f"folio has {i + decode_delta(fv):#x}")
        i = fe


def _check_shared_backing(vm: VM, slot: Memslot, s: int, e: int, delta: int) -> None:
    h = slot.hva_page(s)
    end = slot.hva_page(e)
    while h < end:
        hs, he, d = vm._shared.run_at(h)
        he = min(he, end)
        g = h - slot._ugfn + slot.base_gfn
        if d is None:
            _fail(f"shared SPTE on gfn {g:#x} but its HVA page {h:#x} is not populated")
        if h + d != g + delta:
            _fail(f"shared SPTE on gfn {g:#x} maps pfn {g + delta:#x}, HVA page has {h + d:#x}")
        h = he


def check_vm(vm: VM) -> None:
    """See :meth:`pkvm.VM.check`."""
    _check_rangemaps(vm)
    if vm.mmu_invalidate_in_progress:
        _fail(f"mmu_invalidate_in_progress is {vm.mmu_invalidate_in_progress} between operations")
    vm._mmu._check()
    if not vm._platform.has_private_mem and len(vm._attrs):
        _fail("a VM without private memory has attributes")
    for slot in vm._slots.values():
        if slot.invalid:
            _fail(f"slot {slot.key:#x} is still marked invalid")
        m = vm._slot_maps[slot.as_id]
        if m.find_ne(slot.base_gfn, slot.end_gfn, slot.key + 1) != -1:
            _fail(f"slot map does not cover slot {slot.key:#x}")
        _check_lpage(vm, slot)
        if slot.gmem is not None and slot.gmem_file is not None:
            b = slot.gmem.bindings
            if b.find_ne(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages, slot.key + 1) != -1:
                _fail(f"slot {slot.key:#x} is not bound in guest_memfd fd {slot.gmem.fd}")
    _check_sptes(vm)
    for g in vm._gmems:
        g._check()
    vm._hostmem._check()
    held = sum(e - s for g in vm._gmems for s, e, v in g.folios.iter_ranges()) + vm._shared.nr_populated
    if held != vm._hostmem.nr_allocated:
        _fail(f"host memory has {vm._hostmem.nr_allocated} pages allocated, guest_memfd + HVA hold {held}")
    st = vm._stats
    if st["gmem_pages_allocated"] - st["gmem_pages_freed"] != held - vm._shared.nr_populated:
        _fail("gmem_pages_allocated - gmem_pages_freed does not match the folios held")
