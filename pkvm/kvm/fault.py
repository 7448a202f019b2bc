"""``struct kvm_page_fault`` and the memory-fault exit a fault can end in.

Split out of :mod:`pkvm.kvm.mmu` because both the MMU's fault path and guest_memfd's pfn lookup
(:func:`pkvm.kvm.gmem.kvm_gmem_get_pfn`) fill these in, and the MMU calls guest_memfd (as
``mmu.c`` calls ``kvm_gmem_get_pfn``), not the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.constants import KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_SHIFT, PG_LEVEL_1G, PG_LEVEL_4K

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import Memslot

__all__ = ["PageFault", "memory_fault_exit"]


class PageFault:
    """``struct kvm_page_fault``, widened to a batch of identical faults ``[gfn, end)``."""

    __slots__ = ("gfn", "limit", "end", "private_access", "is_private", "write", "mmu_seq",
                 "slot", "delta", "max_level", "map_writable", "level", "ret", "errno",
                 "memory_fault", "nfaults", "host_level", "single", "order", "prefetch")

    def __init__(self, gfn: int, limit: int, private: bool, write: bool, prefetch: bool = False) -> None:
        self.gfn = gfn
        self.prefetch = prefetch    # kvm_tdp_map_page (KVM_PRE_FAULT_MEMORY): no exit, no pf_taken
        self.limit = limit          # batch may cover faults on gfns [gfn, limit)
        self.end = gfn + 1          # gfns whose faults this object accounts for
        self.private_access = private
        self.is_private = False
        self.write = write
        self.mmu_seq = 0
        self.slot: Memslot | None = None
        self.delta = 0              # pfn - gfn of the resolved backing
        self.max_level = PG_LEVEL_1G
        self.map_writable = True
        self.level = PG_LEVEL_4K
        self.ret = ""               # "" while the fault is still running
        self.errno = 0
        self.memory_fault: tuple[int, int, int] | None = None
        self.nfaults = 1
        self.host_level = PG_LEVEL_4K
        self.single = limit <= gfn + 1
        self.order = 0


def memory_fault_exit(f: PageFault, err: int) -> None:
    """``kvm_mmu_prepare_memory_fault_exit`` + a negative return (docs/kernel-semantics.md
    §4.6)."""
    f.ret = "exit"
    f.errno = err
    f.memory_fault = (f.gfn << PAGE_SHIFT, 1 << PAGE_SHIFT,
                      KVM_MEMORY_EXIT_FLAG_PRIVATE if f.is_private else 0)
    f.end = f.gfn + 1
