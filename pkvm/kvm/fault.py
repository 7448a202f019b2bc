"""``struct kvm_page_fault`` and the memory-fault exit a fault can end in.

Split out of :mod:`pkvm.kvm.mmu` because both the MMU's fault path and guest_memfd's pfn lookup
(:func:`pkvm.kvm.gmem.kvm_gmem_get_pfn`) fill these in, and the MMU calls guest_memfd (as
``mmu.c`` calls ``kvm_gmem_get_pfn``), not the other way round.
"""

from __future__ import annotations

from pkvm._core import PageFault as PageFault  # the typed core's (one C allocation per fault)
from pkvm.constants import KVM_MEMORY_EXIT_FLAG_PRIVATE, PAGE_SHIFT

__all__ = ["PageFault", "memory_fault_exit"]


def memory_fault_exit(f: PageFault, err: int) -> None:
    """``kvm_mmu_prepare_memory_fault_exit`` + a negative return (docs/kernel-semantics.md
    §4.6)."""
    f.ret = "exit"
    f.errno = err
    f.memory_fault = (f.gfn << PAGE_SHIFT, 1 << PAGE_SHIFT,
                      KVM_MEMORY_EXIT_FLAG_PRIVATE if f.is_private else 0)
    f.end = f.gfn + 1
