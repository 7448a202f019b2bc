"""A slow, obviously-correct twin of :class:`pkvm.VM`: every structure is a dict per gfn.

It implements the same kernel rules (docs/kernel-semantics.md §2-§4) one page at a time, the
way the kernel's C code reads, with no range compression: attributes, ``disallow_lpage`` words,
SPTEs, folios and HVA pages are dict entries, and ``access`` faults page by page. Tests drive it and the real
model with the same operations and compare attributes, MIXED flags, SPTEs and counters. Use it
only at small sizes (it costs O(pages) per operation).

It shares nothing mutable with :mod:`pkvm.kvm.vm`; it reuses the platform op tables, the policy
and the cost table, which are data.
"""

from __future__ import annotations

import errno
from types import MappingProxyType
from typing import Any

from pkvm.constants import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_X86_DEFAULT_VM,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
)
from pkvm.cost.model import CostModel
from pkvm.errors import KvmError
from pkvm.host.hostmem import DEFAULT_NR_PAGES, DEFAULT_START_PFN
from pkvm.kvm.policy import resolve_policy
from pkvm.kvm.vm import STAT_KEYS
from pkvm.platforms import PLATFORMS, VM_TYPE_NAMES, is_implemented

PAGES = MappingProxyType({PG_LEVEL_4K: 1, PG_LEVEL_2M: 512, PG_LEVEL_1G: 512 * 512})
#: ``KVM_FILTER_SHARED`` / ``KVM_FILTER_PRIVATE``: which attribute's mappings a zap targets.
FILTER_SHARED, FILTER_PRIVATE = 1, 2
FILTER_ALL = FILTER_SHARED | FILTER_PRIVATE
MIXED = 1 << 31
#: What the fault and access methods return: plain tuples, compared field by field in the tests.
Outcome = tuple[Any, ...]
_ORDER = MappingProxyType({"4k": 0, "thp": 9, "hugetlb-2m": 9, "hugetlb-1g": 18})


def _level_for_order(order: int) -> int:
    return PG_LEVEL_1G if order >= 18 else PG_LEVEL_2M if order >= 9 else PG_LEVEL_4K


class RefSlot:
    def __init__(self, key: int, base: int, npages: int, uaddr: int, flags: int, gmem: RefGmem | None, pgoff: int) -> None:
        self.key, self.base, self.npages, self.uaddr = key, base, npages, uaddr
        self.end = base + npages
        self.flags, self.gmem, self.file, self.pgoff = flags, gmem, gmem, pgoff
        self.lpage: dict[int, dict[int, int]] = {PG_LEVEL_2M: {}, PG_LEVEL_1G: {}}  # level -> {chunk start gfn: word}
        for level, words in self.lpage.items():
            n = PAGES[level]
            first = base - base % n
            for g in range(first, self.end, n):
                words[g] = 0
            if (base - (uaddr >> PAGE_SHIFT)) % n:
                for g in words:
                    words[g] = 1
            if base % n:
                words[first] = 1
            if self.end % n:
                words[(self.end - 1) - (self.end - 1) % n] = 1


class RefGmem:
    def __init__(self, vm: ReferenceVM, fd: int, size: int) -> None:
        self.vm, self.fd, self.size, self.npages = vm, fd, size, size >> PAGE_SHIFT
        self.folios: dict[int, list[int]] = {}    # index -> [pfn of this page, folio order, folio start index]
        self.prepared: dict[int, bool] = {}  # folio start index -> bool
        self.bindings: dict[int, int] = {}  # index -> slot key
        self.closed = False


class ReferenceVM:
    """Per-gfn twin of :class:`pkvm.VM` (same constructor and methods, reference semantics)."""

    def __init__(self, vm_type: str | int = "default", policy: Any = "fault-time", shared_backing: str = "thp", nr_vcpus: int = 1) -> None:
        self.platform = PLATFORMS[VM_TYPE_NAMES[vm_type] if isinstance(vm_type, str) else vm_type]
        self.costs = CostModel.default(self.platform.name)
        self._platform = self.platform  # the op tables call vm.get_memory_attributes only
        self.policy = resolve_policy(policy)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.cost: dict[str, int] = {}
        self.modeled_ns = 0
        self.nr_vcpus = nr_vcpus
        self.attrs: dict[int, int] = {}
        self.slots: dict[int, RefSlot] = {}
        self.sptes: dict[int, tuple[int, int, bool, bool]] = {}       # gfn -> (pfn, level, private, writable)
        self.used: set[int] = set()     # allocated host pfns
        self.cursor = DEFAULT_START_PFN
        self.hva: dict[int, int] = {}         # hva page -> pfn
        self.hva_order = _ORDER[shared_backing]
        self.gmems: list[RefGmem] = []
        self.in_progress = 0
        self.range: tuple[int, int] | None = None
        self.supported = KVM_MEMORY_ATTRIBUTE_PRIVATE if self.platform.has_private_mem else 0

    # -- helpers ------------------------------------------------------------------------

    @property
    def _vm(self) -> Any:
        """This twin where a platform op expects a :class:`pkvm.VM` (the ops read only
        ``vm.get_memory_attributes``, which the twin has)."""
        return self

    def charge(self, op: str, n: int = 1) -> None:
        ns = self.costs.ns(op, n, nr_vcpus=self.nr_vcpus)
        self.cost[op] = self.cost.get(op, 0) + ns
        self.modeled_ns += ns

    def alloc_block(self, order: int) -> int:
        size = 1 << order
        a = -(-self.cursor // size) * size
        while any(p in self.used for p in range(a, a + size)):
            a += size
        assert a + size <= DEFAULT_START_PFN + DEFAULT_NR_PAGES
        self.used.update(range(a, a + size))
        self.cursor = a + size
        self.charge("gmem_alloc_1g" if order >= 18 else "gmem_alloc_2m" if order >= 9 else "gmem_alloc_4k")
        return a

    def get_memory_attributes(self, gfn: int) -> int:
        return self.attrs.get(gfn, 0)

    def slot_of(self, gfn: int) -> RefSlot | None:
        for slot in self.slots.values():
            if slot.key >> 16 == 0 and slot.base <= gfn < slot.end:
                return slot
        return None

    def flush(self) -> None:
        self.stats["remote_tlb_flush_requests"] += 1
        self.stats["remote_tlb_flush"] += 1
        self.charge("remote_tlb_flush")

    def begin(self) -> None:
        self.in_progress += 1
        if self.in_progress == 1:
            self.range = None

    def range_add(self, s: int, e: int) -> None:
        self.range = (s, e) if self.range is None else (min(self.range[0], s), max(self.range[1], e))

    def end(self) -> None:
        self.stats["mmu_invalidate_seq"] += 1
        self.in_progress -= 1

    def leaf_gfns(self, gfn: int) -> range:
        pfn, level, _, _ = self.sptes[gfn]
        n = PAGES[level]
        return range(gfn - gfn % n, gfn - gfn % n + n)

    def drop_leaf(self, gfn: int) -> None:
        level = self.sptes[gfn][1]
        for g in self.leaf_gfns(gfn):
            del self.sptes[g]
        self.stats[("pages_4k", "pages_2m", "pages_1g")[level - 1]] -= 1

    def zap(self, s: int, e: int, filt: int = FILTER_ALL) -> int:
        """Zap the leaves on ``[s, e)``; one root holds both kinds here, so ``filt`` is moot."""
        n = 0
        for g in range(s, e):
            if g in self.sptes:
                self.drop_leaf(g)
                n += 1
        self.stats["zapped_sptes"] += n
        if n:
            self.charge("zap_spte", n)
        return n

    # -- the host MMU notifier --------------------------------------------------------------

    def madvise_dontneed(self, h0: int, h1: int) -> None:
        """``MADV_DONTNEED`` on the hva pages ``[h0, h1)`` (the whole host pages inside), with
        KVM's MMU notifier around it: if a memslot overlaps, one invalidation over every
        overlapping memslot's gfns, their leaves zapped (SHARED filter from ~6.14: on a VM
        with one root, everything), a flush if any; then the pages freed; then
        ``invalidate_end`` (``kvm_mmu_notifier_invalidate_range_start`` / ``_end``)."""
        pieces = []
        for slot in self.slots.values():
            u = slot.uaddr >> PAGE_SHIFT
            a, b = max(h0, u), min(h1, u + slot.npages)
            if a < b:
                pieces.append((slot.key >> 16, slot.base + a - u, slot.base + b - u))
        if pieces:
            self.begin()
            filt = FILTER_ALL if self.policy.zap_filter == "all" else FILTER_SHARED
            flush = False
            for as_id, s, e in pieces:
                self.range_add(s, e)
                if as_id == 0:
                    flush |= self.zap(s, e, filt) > 0
            if flush:
                self.flush()
        size = 1 << self.hva_order
        for blk in range(-(-h0 // size) * size, h1 - size + 1, size):
            if blk in self.hva:
                for h in range(blk, blk + size):
                    self.used.discard(self.hva.pop(h))
        if pieces:
            self.end()

    # -- KVM_SET_MEMORY_ATTRIBUTES --------------------------------------------------------

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        if flags:
            raise KvmError(errno.EINVAL, "flags")
        if attributes & ~self.supported:
            raise KvmError(errno.EINVAL, "attributes")
        if size == 0:
            raise KvmError(errno.EINVAL, "size")
        if address + size >= 1 << 64:
            raise KvmError(errno.EINVAL, "wrap")
        if address % 4096 or size % 4096:
            raise KvmError(errno.EINVAL, "align")
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        if self.policy.attr_ioctl == "legacy-progress":
            self.begin()
            self.range_add(start, end)
            self.store(start, end, attributes)
            flush = False
            for s, e, slot in self.pieces(start, end):
                flush |= self.zap(s, e) > 0
                self.post(slot, s, e, attributes)
            if flush:
                self.flush()
            self.end()
            return
        # The no-op check (kvm_range_has_memory_attributes, §2.7): attributes 0 is one xas_find,
        # one gfn one xa_load; else the walk reads gfn by gfn until the first that differs. The
        # read of the first gfn is the descent (not priced); each later gfn the walk steps to
        # is one attr_check_gfn.
        noop, walked = True, 0
        for g in range(start, end):
            if attributes and end - start > 1 and g > start:
                walked += 1
            if self.attrs.get(g, 0) != attributes:
                noop = False
                break
        if walked:
            self.charge("attr_check_gfn", walked)
        if noop:
            return
        pieces = self.pieces(start, end)
        if pieces:
            self.begin()
            flush = False
            if self.policy.zap_filter == "all":
                filt = FILTER_ALL
            else:
                filt = FILTER_SHARED if attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE else FILTER_PRIVATE
            for s, e, slot in pieces:
                self.range_add(s, e)
                if self.policy.hugepage_guard:
                    self.guard(slot, s, e)
                flush |= self.zap(s, e, filt) > 0
            if flush:
                self.flush()
        self.store(start, end, attributes)
        if pieces:
            self.end()
            for s, e, slot in pieces:
                self.post(slot, s, e, attributes)

    def pieces(self, start: int, end: int) -> list[tuple[int, int, RefSlot]]:
        out = []
        for slot in sorted(self.slots.values(), key=lambda s: s.key):
            s, e = max(start, slot.base), min(end, slot.end)
            if s < e:
                out.append((s, e, slot))
        return out

    def store(self, start: int, end: int, attributes: int) -> None:
        for g in range(start, end):
            if attributes:
                self.attrs[g] = attributes
            else:
                self.attrs.pop(g, None)
        self.stats["attr_stores"] += end - start
        self.charge("attr_store", end - start)

    def guard(self, slot: RefSlot, start: int, end: int) -> None:
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            n = PAGES[level]
            hs, he = start - start % n, (end - 1) - (end - 1) % n
            if ((hs != start or hs + n > end) and hs >= slot.base and hs + n <= slot.end
                    and not slot.lpage[level][hs] & MIXED):
                self.range_add(hs, hs + n)
            if he != hs and he + n > end and he + n <= slot.end and not slot.lpage[level][he] & MIXED:
                self.range_add(he, he + n)

    def has_attrs(self, slot: RefSlot, g: int, level: int, attrs: int, charged: bool = False) -> bool:
        """``hugepage_has_attrs``, read as the kernel reads it; ``charged``: the POST hook's
        call, whose reads are charged (§3.3). At 2M, ``kvm_range_has_memory_attributes`` over
        the 512 gfns: attributes 0 is one ``xas_find`` (no step); otherwise gfn by gfn up to
        the first that differs, each gfn after the first one ``attr_check_gfn``. At 1G, per 2M
        sub-chunk in order its MIXED flag, then, if clear, the lookup of its first gfn (one
        ``attr_check_2m``), up to the first sub-chunk that is MIXED or differs."""
        ok = True
        if level == PG_LEVEL_2M:
            steps = 0
            for x in range(g, g + 512):
                if attrs and x > g:
                    steps += 1
                if self.attrs.get(x, 0) != attrs:
                    ok = False
                    break
            if charged and steps:
                self.charge("attr_check_gfn", steps)
            return ok
        loads = 0
        for sub in range(g, g + PAGES[PG_LEVEL_1G], 512):
            if slot.lpage[PG_LEVEL_2M].get(sub, 0) & MIXED:
                ok = False
                break
            loads += 1
            if self.attrs.get(sub, 0) != attrs:
                ok = False
                break
        if charged and loads:
            self.charge("attr_check_2m", loads)
        return ok

    def set_mixed(self, slot: RefSlot, g: int, level: int, mixed: bool) -> None:
        w = slot.lpage[level][g]
        slot.lpage[level][g] = (w | MIXED) if mixed else (w & ~MIXED)

    def post(self, slot: RefSlot, start: int, end: int, attrs: int) -> None:
        whole = self.policy.mixed_head_in_slot == "whole-chunk"
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            n = PAGES[level]
            g = start - start % n
            if g != start or g + n > end:
                if g >= slot.base and (not whole or g + n <= slot.end):
                    self.set_mixed(slot, g, level, not self.has_attrs(slot, g, level, attrs, True))
                g += n
            while g + n <= end:
                self.set_mixed(slot, g, level, False)
                g += n
            if g < end and g + n <= slot.end:
                self.set_mixed(slot, g, level, not self.has_attrs(slot, g, level, attrs, True))

    # -- memslots -------------------------------------------------------------------------

    def set_user_memory_region2(self, slot: int, flags: int, gpa: int, size: int, uaddr: int = 0, gmem: RefGmem | None = None, gmem_off: int = 0) -> None:
        """Valid calls only (validation is tested against the kernel table separately)."""
        old = self.slots.get(slot)
        if size == 0:
            assert old is not None, "valid calls only"
            self.delete(old)
            return
        if old is not None:
            if old.base == gpa >> PAGE_SHIFT:
                old.flags = flags
                return
            self.delete(old)
        new = RefSlot(slot, gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, uaddr, flags, gmem, gmem_off >> PAGE_SHIFT)
        if self.platform.has_private_mem:
            for level in (PG_LEVEL_2M, PG_LEVEL_1G):
                n = PAGES[level]
                for g in list(new.lpage[level]):
                    if g >= new.base and g + n <= new.end:
                        self.set_mixed(new, g, level, not self.has_attrs(new, g, level, self.attrs.get(g, 0)))
        if gmem is not None:
            for i in range(new.npages):
                gmem.bindings[new.pgoff + i] = slot
        self.slots[slot] = new

    def delete(self, old: RefSlot) -> None:
        # kvm_arch_flush_shadow_memslot: every mapping of the VM before 6.12, and after it on a
        # DEFAULT VM (the SLOT_ZAP_ALL quirk); else the slot's, in address space 0
        if self.policy.memslot_zap == "all" or self.platform.vm_type == KVM_X86_DEFAULT_VM:
            zapped = self.zap(min(self.sptes), max(self.sptes) + 1) if self.sptes else 0
        else:
            zapped = self.zap(old.base, old.end) if old.key >> 16 == 0 else 0
        if zapped:
            self.flush()
        del self.slots[old.key]
        if old.gmem is not None and not old.gmem.closed:
            for i in range(old.npages):
                del old.gmem.bindings[old.pgoff + i]

    # -- guest_memfd ------------------------------------------------------------------------

    def create_guest_memfd(self, size: int) -> RefGmem:
        g = RefGmem(self, len(self.gmems) + 3, size)
        self.gmems.append(g)
        return g

    def folio_at(self, gmem: RefGmem, index: int) -> list[int]:
        """The folio at file ``index``, allocating it as a lookup would (order-9 blocks when the
        policy allows and the aligned block is inside the file and empty): ``(pfn, order, start)``."""
        if index not in gmem.folios:
            order = self.policy.gmem_max_order
            size = 1 << order
            a = index - index % size
            if not (order and a + size <= gmem.npages
                    and not any(j in gmem.folios for j in range(a, a + size))):
                order = 0
            self.new_folio(gmem, index, order)
        return gmem.folios[index]

    def new_folio(self, gmem: RefGmem, index: int, order: int) -> None:
        start = index - index % (1 << order)
        pfn = self.alloc_block(order)
        for i in range(1 << order):
            gmem.folios[start + i] = [pfn + i, order, start]
        gmem.prepared[start] = self.policy.prepare == "none"
        self.stats["gmem_pages_allocated"] += 1 << order

    def fallocate(self, gmem: RefGmem, mode: int, offset: int, length: int) -> None:
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if mode & FALLOC_FL_PUNCH_HOLE:
            self.punch(gmem, start, min(end, gmem.npages))
            return
        assert mode == FALLOC_FL_KEEP_SIZE and end <= gmem.npages
        order = self.policy.gmem_max_order
        i = start
        while i < end:
            if i in gmem.folios:
                i += 1
                continue
            size = 1 << order
            if order and i % size == 0 and i + size <= end and i + size <= gmem.npages and \
                    not any(j in gmem.folios for j in range(i, i + size)):
                self.new_folio(gmem, i, order)
                i += size
            else:
                self.new_folio(gmem, i, 0)
                i += 1

    def bound_ranges(self, gmem: RefGmem, start: int, end: int) -> list[int]:
        out = []
        for i in range(start, end):
            key = gmem.bindings.get(i)
            if key is not None:
                slot = self.slots[key]
                out.append(slot.base + i - slot.pgoff)
        return out

    def punch(self, gmem: RefGmem, start: int, end: int) -> None:
        if start >= end:
            return
        gfns = self.bound_ranges(gmem, start, end)
        if gfns:
            self.invalidate_gfns(gfns)
        self.truncate(gmem, start, end)
        if gfns:
            self.end()

    def invalidate_gfns(self, gfns: list[int]) -> None:
        """Invalidate the bound gfns (in file order), zapping only private mappings (§4.7):
        consecutive gfns of one memslot are zapped as one range, as per binding."""
        self.begin()
        flush = False
        runs: list[list[int]] = []
        for g in gfns:
            if runs and runs[-1][1] == g and self.slot_of(g) is self.slot_of(g - 1):
                runs[-1][1] = g + 1
            else:
                runs.append([g, g + 1])
        for s, e in runs:
            self.range_add(s, e)
            flush |= self.zap(s, e, FILTER_PRIVATE) > 0
        if flush:
            self.flush()

    def truncate(self, gmem: RefGmem, start: int, end: int) -> None:
        freed = 0
        for i in sorted(gmem.folios):
            if not start <= i < end:
                continue
            pfn, order, fstart = gmem.folios[i]
            if fstart >= start and fstart + (1 << order) <= end:
                del gmem.folios[i]
                self.used.discard(pfn)
                freed += 1
                if i == fstart + (1 << order) - 1:
                    gmem.prepared.pop(fstart, None)
                    if is_implemented(self.platform.gmem_invalidate):
                        self.stats["gmem_invalidate"] += 1
        if freed:
            self.stats["gmem_pages_freed"] += freed
            self.charge("gmem_punch_4k", freed)

    def close(self, gmem: RefGmem) -> None:
        gfns = self.bound_ranges(gmem, 0, gmem.npages)
        for key in set(gmem.bindings.values()):
            self.slots[key].file = None
        if gfns:
            self.invalidate_gfns(gfns)
            self.end()
        gmem.bindings.clear()
        gmem.closed = True
        self.truncate(gmem, 0, gmem.npages)

    # -- faults -------------------------------------------------------------------------------

    def page_fault(self, gfn: int, private: bool, write: bool) -> Outcome:
        """One fault; returns ``(ret, errno, memory_fault_flags_or_None)``."""
        r = self._fault(gfn, private, write)
        st = self.stats
        st["pf_taken"] += 1
        self.charge("npf_fault")
        ret = r[0]
        if ret in ("fixed", "spurious", "emulate", "retry"):
            st[{"fixed": "pf_fixed", "spurious": "pf_spurious", "emulate": "pf_emulate", "retry": "pf_retry"}[ret]] += 1
        if ret == "exit":
            if r[2] is not None:
                st["memory_fault_exits"] += 1
            self.charge("userspace_exit")
        return r

    def _exit(self, is_private: bool, err: int) -> Outcome:
        return ("exit", err, KVM_MEMORY_EXIT_FLAG_PRIVATE if is_private else 0)

    def _fault(self, gfn: int, private: bool, write: bool) -> Outcome:
        attr_private = bool(self.attrs.get(gfn, 0) & KVM_MEMORY_ATTRIBUTE_PRIVATE)
        if self.policy.private_fault_source == "attributes":
            is_private = attr_private
        else:
            is_private = bool(self.platform.fault_is_private(self._vm, gfn, private))
        spte = self.sptes.get(gfn)
        if spte and not (self.platform.has_private_mem and is_private != attr_private) and write and spte[3]:
            return ("spurious", 0, None)
        seq = self.stats["mmu_invalidate_seq"]
        if is_private != attr_private:
            return self._exit(is_private, errno.EFAULT)
        slot = self.slot_of(gfn)
        if slot is None:
            return self._exit(True, errno.EFAULT) if is_private else ("emulate", 0, None)
        if is_private:
            r = self._gmem_pfn(slot, gfn)
            if isinstance(r, int):
                return self._exit(True, r)
            pfn, order = r
            max_level = _level_for_order(order)
        else:
            if write and slot.flags & KVM_MEM_READONLY:
                return ("emulate", 0, None)
            h = slot.uaddr // 4096 + gfn - slot.base
            if h not in self.hva:
                size = 1 << self.hva_order
                pfn0 = self.alloc_block(self.hva_order)
                for i in range(size):
                    self.hva[h - h % size + i] = pfn0 + i
                self.stats["shared_pages_populated"] += size
            pfn = self.hva[h]
            max_level = PG_LEVEL_1G
        if self.in_progress and self.range is not None and self.range[0] <= gfn < self.range[1] or self.stats["mmu_invalidate_seq"] != seq:
            return ("retry", 0, None)
        level = self._level(slot, gfn, pfn, is_private, max_level)
        writable = not slot.flags & KVM_MEM_READONLY
        return self._install(gfn, pfn, level, is_private, writable)

    def _gmem_pfn(self, slot: RefSlot, gfn: int) -> int | tuple[int, int]:
        if slot.gmem is None or slot.file is None:
            return errno.EFAULT
        gmem = slot.gmem
        index = gfn - slot.base + slot.pgoff
        if gmem.bindings.get(index) != slot.key:
            return errno.EIO
        pfn, order, fstart = self.folio_at(gmem, index)
        mode = self.policy.prepare
        op = self.platform.gmem_prepare
        if mode == "once-per-folio" and not gmem.prepared[fstart] or mode == "every-lookup":
            if is_implemented(op):
                r = op(self._vm, gfn - (index - fstart), pfn - (index - fstart), order, 1)
                if r:
                    if mode == "every-lookup":
                        gmem.prepared[fstart] = True
                    return -r
                self.stats["gmem_prepare"] += 1
            gmem.prepared[fstart] = True
        if (gfn - index) % (1 << order):
            order = 0
        return pfn, order

    def _level(self, slot: RefSlot, gfn: int, pfn: int, is_private: bool, max_level: int) -> int:
        """§3.5: the largest level lpage_info allows, capped by the backing's level."""
        if slot.flags & KVM_MEM_LOG_DIRTY_PAGES or max_level == PG_LEVEL_4K:
            return PG_LEVEL_4K
        level = max_level
        while level > PG_LEVEL_4K and slot.lpage[level][gfn - gfn % PAGES[level]]:
            level -= 1
        if level == PG_LEVEL_4K:
            return level
        return min(level, self._level_cap(gfn, pfn, is_private, max_level))

    def _level_cap(self, gfn: int, pfn: int, is_private: bool, max_level: int) -> int:
        """The backing's limit: gmem order and the platform cap if private, else the host page."""
        if is_private:
            cap = max_level
            limit = self.platform.gmem_max_mapping_level(self._vm, pfn, True)
            if limit:
                cap = min(cap, limit)
            return cap
        return _level_for_order(self.hva_order)

    def _install(self, gfn: int, pfn: int, level: int, private: bool, writable: bool) -> Outcome:
        # Split larger leaves on the way down.
        while gfn in self.sptes and self.sptes[gfn][1] > level:
            old_level = self.sptes[gfn][1]
            for g in self.leaf_gfns(gfn):
                p, _, pr, w = self.sptes[g]
                self.sptes[g] = (p, old_level - 1, pr, w)
            self.stats[("pages_4k", "pages_2m", "pages_1g")[old_level - 1]] -= 1
            self.stats[("pages_4k", "pages_2m", "pages_1g")[old_level - 2]] += 512
            self.stats["huge_page_splits"] += 1
            self.charge("huge_page_split")
        n = PAGES[level]
        base = gfn - gfn % n
        base_pfn = pfn - (gfn - base)
        new = {g: (base_pfn + (g - base), level, private, writable) for g in range(base, base + n)}
        if self.sptes.get(gfn) == new[gfn]:
            return ("spurious", 0, None)
        old = self.sptes.get(gfn)
        present = [g for g in range(base, base + n) if g in self.sptes]
        if present:
            dropped = 0
            for g in present:
                if g in self.sptes:
                    self.drop_leaf(g)
                    dropped += 1
            if not (old and old[1] == level):
                self.stats["zapped_sptes"] += dropped
            self.flush()
        self.sptes.update(new)
        self.stats[("pages_4k", "pages_2m", "pages_1g")[level - 1]] += 1
        return ("fixed", 0, None)

    def access(self, gfn: int, npages: int, private: bool, write: bool) -> Outcome:
        """Per-page walk; returns ``(ret, pages_done, faults, errno)``."""
        done = faults = 0
        for g in range(gfn, gfn + npages):
            while True:
                spte = self.sptes.get(g)
                if spte and (not write or spte[3]):
                    done += 1
                    break
                ret, err, _ = self.page_fault(g, private, write)
                faults += 1
                if ret not in ("fixed", "spurious", "retry"):
                    return (ret, done, faults, err)
        return ("done", done, faults, 0)

    def mixed(self, slot_key: int, gfn: int, level: int) -> int:
        slot = self.slots[slot_key]
        return slot.lpage[level][gfn - gfn % PAGES[level]]


__all__ = ["RefGmem", "RefSlot", "ReferenceVM"]
