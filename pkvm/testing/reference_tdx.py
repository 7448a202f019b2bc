"""A slow, obviously-correct twin of a TDX :class:`pkvm.VM`: S-EPT state per gfn.

:class:`ReferenceTdx` extends :class:`pkvm.testing.reference_vm.ReferenceVM` with what the TDX
platform adds (kernel-semantics.md §6, §7.2, §7.5), written the way the kernel and the TDX module read,
one page and one SEAMCALL at a time, with plain dicts and sets:

* ``sept``: gfn -> ``(state, level)`` (``"pending"``, ``"mapped"``, ``"blocked"``,
  ``"pending_blocked"``; FREE is absent); ``tables``: ``(table level, index)`` of every
  S-EPT page table added; ``inhibit``: 2M chunks with the guest-inhibit bit;
* the mirror root is the ``private`` leaves of ``sptes``; zaps honour the attribute filter;
* every private fault is one page: SEPT.ADD per missing table, then AUG / ADD / premap;
* every zapped mirror leaf runs BLOCK, TRACK + kick, REMOVE, WBINVD, clear, each step with the
  ``tdh_do_no_vcpus`` BUSY retry;
* ``accept`` is ``TDG.MEM.PAGE.ACCEPT`` instruction by instruction; ``accept_memory`` is the
  Linux guest's loop over it (1G, 2M, 4K per position), with no bulk shortcut;
* ``map_gpa`` / ``map_gpa_complete`` are MapGPA and its per-chunk completion;
  ``convert_memory`` is QEMU's answer to a conversion exit;
* ``init_mem_region`` / ``finalize`` build the TD (6.16 premap then ADD, or 6.19 ADD in
  the hook).

It shares nothing mutable with :mod:`pkvm.platforms.tdx`; it reuses constants and the cost
table. Use it only at small sizes.
"""

from __future__ import annotations

import errno
from typing import Any

from pkvm.constants import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    TDVMCALL_STATUS_ALIGN_ERROR,
    TDVMCALL_STATUS_INVALID_OPERAND,
    TDVMCALL_STATUS_RETRY,
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED,
    TDVMCALL_STATUS_SUCCESS,
    TDX_OPERAND_ID_RCX,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
)
from pkvm.cost.model import CostModel
from pkvm.errors import KvmError
from pkvm.platforms._tdx_sept import TDX_STAT_KEYS
from pkvm.testing.reference_vm import (
    FILTER_ALL,
    FILTER_PRIVATE,
    FILTER_SHARED,
    PAGES,
    Outcome,
    RefGmem,
    RefSlot,
    ReferenceVM,
)

_COST = {"sept_add": "seamcall_sept_add", "aug": "seamcall_aug", "add": "seamcall_add", "block": "seamcall_block",
         "track": "seamcall_track", "remove": "seamcall_remove", "wbinvd": "seamcall_wbinvd"}
_SHIFT = {1: 9, 2: 18, 3: 27, 4: 36}  # gfn shift of one S-EPT table of each level
_CHUNK = 2 << 20


class ReferenceTdx(ReferenceVM):
    """Per-gfn twin of ``pkvm.VM("tdx", ...)``."""

    def __init__(self, policy: Any = "6.19", shared_backing: str = "thp", nr_vcpus: int = 1, gpaw: int = 48) -> None:
        super().__init__("tdx", policy, shared_backing, nr_vcpus)
        self.costs = CostModel.default("tdx")
        self.backing = shared_backing
        self.stats.update(dict.fromkeys(TDX_STAT_KEYS, 0))
        self.gpaw = gpaw
        self.shared_bit = 51 if gpaw == 52 else 47
        self.levels = 5 if gpaw == 52 else 4
        self.sept: dict[int, tuple[str, int]] = {}          # gfn -> (state, level)
        self.tables: set[tuple[int, int]] = set()     # (table level, index)
        self.inhibit: set[int] = set()    # 2M chunk numbers
        self.runnable = False
        self.nr_premapped = 0
        self.premap = self.policy.tdx_initial_image == "premap-then-add"
        self.huge = self.policy.tdx_huge_pages
        self.dead = self.bugged = False
        self.busy: dict[str, int] = {}
        self.vcpus = 0
        self.populating = False
        self.accept_level = 0
        self.hc_enabled = False
        self.pending_interrupts = 0
        self.mg_next = self.mg_end = 0

    # -- SEAMCALLs --------------------------------------------------------------------------

    def sc(self, name: str, n: int = 1) -> str:
        """``n`` calls of a SEAMCALL: "busy" (only the first is made) or "ok"."""
        counter = "seamcall_" + name
        if self.busy.get(name):
            self.busy[name] -= 1
            self.stats[counter] += 1
            self.stats["seamcall_busy"] += 1
            if name in _COST:
                self.charge(_COST[name])
            return "busy"
        self.stats[counter] += n
        if name in _COST:
            self.charge(_COST[name], n)
        return "ok"

    def kick(self) -> None:
        n = max(self.nr_vcpus, self.vcpus)
        self.stats["vcpu_kicks"] += n
        self.charge("vcpu_kick", n)

    def no_vcpus(self, name: str) -> str:
        st = self.sc(name)
        if st == "busy":
            self.kick()
            st = self.sc(name)
        return st

    def bug(self) -> None:
        self.bugged = self.dead = True

    def check_alive(self) -> None:
        if self.dead:
            raise KvmError(errno.EIO, "dead")

    def check_runnable(self) -> None:
        self.check_alive()
        if not self.runnable:
            raise KvmError(errno.EINVAL, "not finalized")

    def create_vcpu(self) -> None:
        self.check_alive()
        if self.runnable:  # tdx_vcpu_create: only before KVM_TDX_FINALIZE_VM
            raise KvmError(errno.EIO, "finalized")
        self.vcpus += 1

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        self.check_alive()
        super().set_memory_attributes(address, size, attributes, flags)

    def set_user_memory_region2(self, slot: int, flags: int, gpa: int, size: int, uaddr: int = 0, gmem: RefGmem | None = None, gmem_off: int = 0) -> None:
        self.check_alive()
        super().set_user_memory_region2(slot, flags, gpa, size, uaddr, gmem, gmem_off)

    # -- the mirror root ----------------------------------------------------------------------

    def link_and_set(self, gfn: int, level: int) -> str:
        """SEPT.ADD for the missing tables (top-down), then the leaf SEAMCALL; a status."""
        for t in range(self.levels - 1, level - 1, -1):
            key = (t, gfn >> _SHIFT[t])
            if key not in self.tables:
                if self.sc("sept_add") == "busy":
                    return "busy"
                self.tables.add(key)
        base = gfn - gfn % PAGES[level]
        if self.runnable:
            if self.sc("aug") == "busy":
                return "busy"
            for g in range(base, base + PAGES[level]):
                self.sept[g] = ("pending", level)
        elif self.premap:
            self.nr_premapped += 1
        else:
            if not self.populating:
                self.bug()
                return "bug"
            if self.sc("add") == "busy":
                return "busy"
            for g in range(base, base + PAGES[level]):
                self.sept[g] = ("mapped", level)
        return "ok"

    def _install(self, gfn: int, pfn: int, level: int, private: bool, writable: bool) -> Outcome:
        if private and self.sptes.get(gfn) != (pfn, level, private, writable):
            st = self.link_and_set(gfn, level)
            if st == "busy":
                return ("retry", 0, None)
            if st == "bug":
                return ("exit", errno.EIO, None)
        return super()._install(gfn, pfn, level, private, writable)

    def _level_cap(self, gfn: int, pfn: int, is_private: bool, max_level: int) -> int:
        if not is_private:
            return super()._level_cap(gfn, pfn, is_private, max_level)
        # Private: 4K, unless the huge-page series allows this 2M chunk.
        if (not self.huge or self.accept_level == PG_LEVEL_4K or (gfn >> 9) in self.inhibit
                or (1, gfn >> 9) in self.tables):
            return PG_LEVEL_4K
        return min(max_level, PG_LEVEL_2M)

    def zap(self, s: int, e: int, filt: int = FILTER_ALL) -> int:
        take = {True: bool(filt & FILTER_PRIVATE), False: bool(filt & FILTER_SHARED)}
        if filt & FILTER_PRIVATE:
            for g in (s, e - 1):
                spte = self.sptes.get(g)
                if spte and spte[2] and spte[1] == PG_LEVEL_2M:
                    base = g - g % 512
                    if base < s or base + 512 > e:
                        self.demote(base)
                        self.split_mirror(base)
        n = 0
        for g in range(s, e):
            spte = self.sptes.get(g)
            if not spte or not take[spte[2]]:
                continue
            level = spte[1]
            base = g - g % PAGES[level]
            self.drop_leaf(g)
            n += 1
            if spte[2]:
                self.remove_private(base, level)
        self.stats["zapped_sptes"] += n
        if n:
            self.charge("zap_spte", n)
        return n

    def remove_private(self, base: int, level: int) -> None:
        """``tdx_sept_remove_private_spte`` for the leaf at ``base``."""
        n = PAGES[level]
        ent = self.sept.get(base)
        if ent is None:  # 6.16: premapped, BLOCK finds no leaf
            st = self.no_vcpus("block")
            if st == "ok" and self.premap and not self.runnable and self.nr_premapped >= 1:
                self.nr_premapped -= 1
            else:
                self.bug()
            return
        if ent[1] != level or ent[0] not in ("pending", "mapped"):
            return  # left behind by a failed SEAMCALL: the VM is bugged
        if self.no_vcpus("block") != "ok":
            self.bug()
            return
        for g in range(base, base + n):
            self.sept[g] = ("blocked" if ent[0] == "mapped" else "pending_blocked", level)
        tracked = True
        if self.runnable:
            if self.no_vcpus("track") != "ok":
                self.bug()
                tracked = False
            self.kick()
        if self.no_vcpus("remove") != "ok" or not tracked:
            self.bug()
            return
        for g in range(base, base + n):
            del self.sept[g]
        if self.sc("wbinvd", n) != "ok":
            self.bug()
            return
        self.stats["tdx_page_clears"] += n

    def demote(self, base: int) -> bool:
        """Beyond upstream: BLOCK (2M), TRACK + kick, DEMOTE of the S-EPT leaf; True if it worked."""
        state, level = self.sept.get(base, ("free", 0))
        if level != PG_LEVEL_2M or state not in ("pending", "mapped"):
            return False  # left behind by a failed SEAMCALL: the VM is bugged
        if self.no_vcpus("block") != "ok":
            self.bug()
            return False
        if self.runnable:
            if self.no_vcpus("track") != "ok":
                self.bug()
            self.kick()
        if self.no_vcpus("demote") != "ok":
            for g in range(base, base + 512):
                self.sept[g] = ("blocked" if state == "mapped" else "pending_blocked", PG_LEVEL_2M)
            self.bug()
            return False
        for g in range(base, base + 512):
            self.sept[g] = (state, PG_LEVEL_4K)
        self.tables.add((1, base >> 9))
        return True

    def split_mirror(self, base: int) -> None:
        """``tdp_mmu_split_huge_page`` of the 2M mirror leaf at ``base``."""
        for g in range(base, base + 512):
            p, _, pr, w = self.sptes[g]
            self.sptes[g] = (p, PG_LEVEL_4K, pr, w)
        self.stats["pages_2m"] -= 1
        self.stats["pages_4k"] += 512
        self.stats["huge_page_splits"] += 1
        self.charge("huge_page_split")

    # -- faults and accesses (tdx_handle_ept_violation) ----------------------------------------

    def page_fault(self, gfn: int, private: bool, write: bool) -> Outcome:
        self.check_runnable()
        if private:
            if self.sept.get(gfn, ("free",))[0] == "pending":
                self.charge("vmexit")
                self.charge("userspace_exit")
                self.dead = True
                return ("exit", errno.EIO, None)
            write = True
        return super().page_fault(gfn, private, write)

    def usable(self, g: int, private: bool, write: bool) -> bool:
        spte = self.sptes.get(g)
        if not spte or spte[2] != private:
            return False
        if private:
            return self.sept.get(g, ("free", 0))[0] == "mapped"
        return not write or spte[3]

    def access(self, gfn: int, npages: int, private: bool, write: bool) -> Outcome:
        self.check_runnable()
        done = faults = 0
        for g in range(gfn, gfn + npages):
            while not self.usable(g, private, write):
                ret, err, _ = self.page_fault(g, private, write)
                faults += 1
                if ret not in ("fixed", "spurious", "retry"):
                    return (ret, done, faults, err)
            done += 1
        return ("done", done, faults, 0)

    # -- TDG.MEM.PAGE.ACCEPT -------------------------------------------------------------------

    def _status(self, status: int, faults: int) -> Outcome:
        self.stats["tdcall_accept"] += 1
        self.charge("vmexit")
        return ("done", status, faults, None)

    def accept(self, gpa: int, level: int) -> Outcome:
        """Returns ``("done", status, faults, None)`` or ``("exit", None, faults, errno)``."""
        self.check_runnable()
        n = PAGES[level]
        if gpa % (n << PAGE_SHIFT) or gpa >> self.shared_bit & 1 or gpa >> self.gpaw:
            return self._status(TDX_OPERAND_INVALID | TDX_OPERAND_ID_RCX, 0)
        gfn = gpa >> PAGE_SHIFT
        faults = 0
        while True:
            ent = self.sept.get(gfn)
            if ent:
                st, lvl = ent
                if lvl == level and st == "pending":
                    for g in range(gfn, gfn + n):
                        self.sept[g] = ("mapped", level)
                    self.stats["tdcall_accept"] += 1
                    self.stats["tdx_accepts_4k"] += n
                    self.charge("tdx_accept_4k", n)
                    return ("done", 0, faults, None)
                if lvl == level and st == "mapped":
                    return self._status(TDX_PAGE_ALREADY_ACCEPTED | (level - 1), faults)
                if lvl > level and st == "pending":
                    self.stats["tdx_accept_size_faults"] += 1
                    self.stats["pf_taken"] += 1
                    self.stats["pf_retry"] += 1
                    self.charge("npf_fault")
                    self.inhibit.add(gfn >> 9)
                    faults += 1
                    if not self.demote(gfn - gfn % PAGES[lvl]):
                        return ("exit", None, faults, errno.EIO)
                    self.split_mirror(gfn - gfn % PAGES[lvl])
                    continue
                return self._status(TDX_PAGE_SIZE_MISMATCH | (max(lvl, level) - 1), faults)
            if level > PG_LEVEL_4K and (level - 1, gfn >> _SHIFT[level - 1]) in self.tables:
                return self._status(TDX_PAGE_SIZE_MISMATCH | (level - 1), faults)
            if self.huge and level == PG_LEVEL_4K:
                self.inhibit.add(gfn >> 9)
            self.accept_level = level
            try:
                ret, err, _ = self.page_fault(gfn, True, True)
            finally:
                self.accept_level = 0
            faults += 1
            if ret in ("fixed", "spurious", "retry"):
                continue
            return ("exit", None, faults, err)

    def accept_memory(self, start: int, end: int) -> bool:
        """Linux ``tdx_accept_memory(start, end)``, TDCALL by TDCALL; memory-fault exits are
        answered with :meth:`convert_memory`. Returns True on success."""
        pos = start
        while pos < end:
            size = 0
            for level in (3, 2, 1):
                sz = PAGES[level] << PAGE_SHIFT
                if pos % sz or end - pos < sz:
                    continue
                while True:
                    r = self.accept(pos, level)
                    if r[0] == "exit":
                        if r[3] != errno.EFAULT or self.dead or not self._answer_fault(pos):
                            return False
                        continue
                    break
                if r[1] == 0:
                    size = sz
                    break
            if not size:
                return False
            pos += size
        return True

    def _answer_fault(self, gpa: int) -> bool:
        return self.convert_memory(gpa & ~0xFFF, 4096, True) == 0

    # -- TDG.VP.VMCALL<MapGPA> -----------------------------------------------------------------

    def map_gpa(self, gpa: int, size: int) -> Outcome:
        """Returns ``("done", r10, r11)`` or ``("exit", (gpa, npages, attrs))``."""
        self.check_runnable()
        self.stats["tdvmcall_map_gpa"] += 1
        if not self.hc_enabled:
            self.charge("td_vmm_exit")
            return ("done", TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, gpa)
        end = gpa + size
        shared = 1 << self.shared_bit
        if (end >= 1 << 64 or end <= gpa or gpa >= 1 << self.gpaw or end - 1 >= 1 << self.gpaw
                or bool(gpa & shared) != bool((end - 1) & shared)):
            self.charge("td_vmm_exit")
            return ("done", TDVMCALL_STATUS_INVALID_OPERAND, gpa)
        if gpa % 4096 or size % 4096:
            self.charge("td_vmm_exit")
            return ("done", TDVMCALL_STATUS_ALIGN_ERROR, gpa)
        self.mg_next, self.mg_end = gpa, end
        self.charge("map_gpa")
        return self._mg_exit()

    def _mg_exit(self) -> Outcome:
        gpa = self.mg_next
        size = min(self.mg_end - gpa, _CHUNK)
        self.stats["hypercall_exits"] += 1
        shared = 1 << self.shared_bit
        attrs = KVM_MAP_GPA_RANGE_DECRYPTED if gpa & shared else KVM_MAP_GPA_RANGE_ENCRYPTED
        return ("exit", (gpa & ~shared, size >> PAGE_SHIFT, attrs))

    def map_gpa_complete(self, ret: int) -> Outcome:
        self.check_alive()
        if ret:
            return ("done", TDVMCALL_STATUS_INVALID_OPERAND, self.mg_next)
        self.mg_next += _CHUNK
        if self.mg_next >= self.mg_end:
            return ("done", TDVMCALL_STATUS_SUCCESS, None)
        if self.pending_interrupts:
            self.pending_interrupts -= 1
            return ("done", TDVMCALL_STATUS_RETRY, self.mg_next)
        self.charge("userspace_exit")
        return self._mg_exit()

    def map_gpa_answered(self, gpa: int, size: int) -> tuple[Any, Any]:
        """MapGPA with every chunk answered by :meth:`convert_memory`; the final ``(r10, r11)``,
        or ``(None, None)`` when a conversion fails: QEMU then stops the VM instead of
        completing the exit (``kvm_cpu_exec``), so the guest reads no status."""
        r = self.map_gpa(gpa, size)
        while r[0] == "exit":
            g, npages, attrs = r[1]
            ret = self.convert_memory(g, npages << PAGE_SHIFT, bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED))
            if ret:
                return None, None
            r = self.map_gpa_complete(ret)
        return r[1], r[2]

    def guest_map_gpa(self, start: int, end: int, enc: bool) -> bool:
        """Linux ``tdx_map_gpa``: RETRY resumes at r11, 3 retries without progress at most."""
        if not enc:
            start |= 1 << self.shared_bit
            end |= 1 << self.shared_bit
        retries = 0
        while retries < 3:
            status, r11 = self.map_gpa_answered(start, end - start)
            if status != TDVMCALL_STATUS_RETRY:
                return bool(status == 0)
            if r11 is None or r11 < start or r11 >= end:
                return False
            if r11 == start:
                retries += 1
                continue
            start, retries = r11, 0
        return False

    def guest_convert(self, gpa: int, size: int, private: bool) -> bool:
        """Linux ``tdx_enc_status_changed``."""
        if not self.guest_map_gpa(gpa, gpa + size, private):
            return False
        return self.accept_memory(gpa, gpa + size) if private else True

    # -- QEMU's kvm_convert_memory --------------------------------------------------------------

    def convert_memory(self, gpa: int, size: int, to_private: bool) -> int:
        if gpa % 4096 or size % 4096 or not size:
            return -errno.EINVAL
        start, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        slot = self.slot_of(start)
        if slot is None:
            return 0 if not to_private else -errno.EINVAL
        if slot.gmem is None:
            return -errno.EINVAL
        try:
            self.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0)
        except KvmError as exc:
            return -exc.errno
        for s, e, piece in self.pieces(start, end):
            if to_private:
                self.discard(piece, s, e)
            elif piece.gmem is not None and piece.file is not None:
                off = piece.pgoff - piece.base
                self.fallocate(piece.gmem, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (s + off) << PAGE_SHIFT,
                               (e - s) << PAGE_SHIFT)
        return 0

    def discard(self, slot: RefSlot, s: int, e: int) -> None:
        """``MADV_DONTNEED`` of the slot's HVA range (not hugetlb), with the MMU notifier."""
        if self.backing in ("hugetlb-2m", "hugetlb-1g"):
            return
        h0 = slot.uaddr // 4096 + s - slot.base
        self.madvise_dontneed(h0, h0 + (e - s))

    # -- the TD build ----------------------------------------------------------------------------

    def init_mem_region(self, gfn: int, npages: int, measure: bool) -> tuple[int, int]:
        """Returns ``(pages done, errno or 0)``."""
        self.check_alive()
        if self.runnable:
            raise KvmError(errno.EINVAL, "finalized")
        for i in range(npages):
            err = self.populate_one(gfn + i, measure)
            if err:
                return i, err
        return npages, 0

    def populate_one(self, gfn: int, measure: bool) -> int:
        slot = self.slot_of(gfn)
        if slot is None or slot.gmem is None:
            return errno.EINVAL
        if slot.file is None:
            return errno.EFAULT
        gmem = slot.gmem
        index = gfn - slot.base + slot.pgoff
        if gmem.bindings.get(index) != slot.key:
            return errno.EIO
        pfn, order, fstart = self.folio_at(gmem, index)
        if gmem.prepared[fstart]:
            return errno.EEXIST
        if not self.attrs.get(gfn, 0) & KVM_MEMORY_ATTRIBUTE_PRIVATE:
            return errno.EINVAL
        writable = not slot.flags & KVM_MEM_READONLY
        if self.premap:
            gmem.prepared[fstart] = True  # the premap fault's kvm_gmem_get_pfn, before its walk
        self.populating = not self.premap
        try:
            while True:
                st = self.link_and_set(gfn, PG_LEVEL_4K)
                if st != "busy":
                    break
        finally:
            self.populating = False
        if st == "bug":
            return errno.EIO
        self.sptes[gfn] = (pfn, PG_LEVEL_4K, True, writable)
        self.stats["pages_4k"] += 1
        if self.premap:
            self.stats["pf_fixed"] += 1
            if self.sc("add") == "busy":
                return errno.EBUSY
            self.sept[gfn] = ("mapped", PG_LEVEL_4K)
            self.nr_premapped -= 1
        if measure:
            if self.busy.get("mr_extend"):
                self.sc("mr_extend")
                if not self.premap:  # 6.19: TDX_BUG_ON; 6.16: -EIO only
                    self.bug()
                return errno.EIO
            self.stats["seamcall_mr_extend"] += 16
            self.charge("seamcall_mr_extend")
        gmem.prepared[fstart] = True
        return 0

    def finalize(self) -> None:
        self.check_alive()
        if self.runnable or (self.premap and self.nr_premapped):
            raise KvmError(errno.EINVAL, "finalize")
        if self.sc("mr_finalize") == "busy":
            raise KvmError(errno.EBUSY, "finalize")
        self.runnable = True


__all__ = ["ReferenceTdx"]
