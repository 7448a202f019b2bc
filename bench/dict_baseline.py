"""The reference for the fragmented-page benchmark: a naive dict-per-GFN model of the same four
kernel operations, written the way a user would in an afternoon.

It is *not* pkvm and shares nothing with it. It keeps one dict entry per touched GFN for each
structure the kernel keeps (memory attributes, SPTEs, guest_memfd folios, the shared backing,
and for SEV-SNP the RMP), validates its arguments, and counts what the kernel would count
(attribute stores, zaps, invalidation sequence, faults, RMPUPDATEs). It has no large pages,
no MIXED tracking, no cost model, no events and no failure paths, which is why it is the
floor a faithful model has to beat, not a model to use: ``bench/bench_fragmented.py`` times
pkvm against it, phase by phase, in one process.
"""

from __future__ import annotations

import errno

PAGE_SHIFT = 12
PRIVATE = 1 << 3
RMP_SHARED, RMP_PRIVATE = 0, 1


class DictError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


class DictVM:
    """One memslot ``[0, size)`` backed by guest_memfd (private) and host memory (shared)."""

    def __init__(self, size: int, snp: bool) -> None:
        self.npages = size >> PAGE_SHIFT
        self.snp = snp
        self.attrs: dict[int, int] = {}          # gfn -> attributes (absent: 0)
        self.sptes: dict[int, tuple[int, bool]] = {}   # gfn -> (pfn, private)
        self.gmem: dict[int, int] = {}           # gfn -> pfn of its guest_memfd folio
        self.shared: dict[int, int] = {}         # gfn -> pfn of its shared (host) page
        self.rmp: dict[int, int] = {}            # pfn -> RMP state (absent: shared)
        self.next_pfn = 1 << 20
        self.stats = {"attr_stores": 0, "mmu_invalidate_seq": 0, "zapped": 0, "pf_taken": 0,
                      "pf_fixed": 0, "pf_exit": 0, "rmpupdate": 0, "gmem_alloc": 0}

    def _alloc(self) -> int:
        pfn = self.next_pfn
        self.next_pfn += 1
        return pfn

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        if type(address) is not int or type(size) is not int or type(attributes) is not int:
            raise TypeError("address, size and attributes must be ints")
        if address & 0xFFF or size & 0xFFF or size == 0 or attributes & ~PRIVATE:
            raise DictError(errno.EINVAL)
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        if end > self.npages:
            raise DictError(errno.EINVAL)
        st = self.stats
        st["mmu_invalidate_seq"] += 1
        attrs, sptes, rmp, gmem = self.attrs, self.sptes, self.rmp, self.gmem
        for gfn in range(start, end):
            if attrs.get(gfn, 0) == attributes:
                continue
            if sptes.pop(gfn, None) is not None:
                st["zapped"] += 1
            if attributes:
                attrs[gfn] = attributes
            else:
                del attrs[gfn]
                # to shared: SNP makes the private page shared again before it is freed
                pfn = gmem.pop(gfn, None)
                if pfn is not None and self.snp and rmp.pop(pfn, RMP_SHARED) != RMP_SHARED:
                    st["rmpupdate"] += 1
            st["attr_stores"] += 1

    def page_fault(self, gpa: int, private: bool) -> tuple[str, int]:
        if type(gpa) is not int or type(private) is not bool:
            raise TypeError("gpa must be an int and private a bool")
        gfn = gpa >> PAGE_SHIFT
        if gfn >= self.npages:
            raise DictError(errno.EFAULT)
        st = self.stats
        st["pf_taken"] += 1
        is_private = bool(self.attrs.get(gfn, 0) & PRIVATE)
        if is_private != private:
            st["pf_exit"] += 1
            return ("exit", errno.EFAULT)
        spte = self.sptes.get(gfn)
        if spte is not None and spte[1] == private:
            return ("spurious", spte[0])
        if private:
            pfn = self.gmem.get(gfn)
            if pfn is None:
                pfn = self.gmem[gfn] = self._alloc()
                st["gmem_alloc"] += 1
            if self.snp and self.rmp.get(pfn, RMP_SHARED) != RMP_PRIVATE:
                self.rmp[pfn] = RMP_PRIVATE
                st["rmpupdate"] += 1
        else:
            pfn = self.shared.get(gfn)
            if pfn is None:
                pfn = self.shared[gfn] = self._alloc()
        self.sptes[gfn] = (pfn, private)
        st["pf_fixed"] += 1
        return ("fixed", pfn)
