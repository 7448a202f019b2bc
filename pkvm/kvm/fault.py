"""``struct kvm_page_fault`` and the memory-fault exit a fault can end in.

Split out of :mod:`pkvm.kvm.mmu` because both the MMU's fault path and guest_memfd's pfn lookup
(:func:`pkvm.kvm.gmem.kvm_gmem_get_pfn`) fill these in, and the MMU calls guest_memfd (as
``mmu.c`` calls ``kvm_gmem_get_pfn``), not the other way round.
"""

from __future__ import annotations

from pkvm._core import PageFault as PageFault  # the typed core's (one C allocation per fault)
# ``kvm_mmu_prepare_memory_fault_exit`` + a negative return (docs/kernel-semantics.md §4.6):
# ``memory_fault_exit(f, err)`` sets ``f.ret = "exit"``, ``f.errno``, ``f.memory_fault = (gpa,
# 4096, KVM_MEMORY_EXIT_FLAG_PRIVATE if f.is_private else 0)`` and ``f.end = f.gfn + 1``; the
# typed core's, which its fault path calls too (pkvm/_fault.pxi).
from pkvm._core import memory_fault_exit as memory_fault_exit

__all__ = ["PageFault", "memory_fault_exit"]
