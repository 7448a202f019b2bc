"""``KVM_X86_SW_PROTECTED_VM``: private memory enforced only by KVM's attribute checks.

The hardware reports no access type, so ``kvm_mmu_page_fault`` ORs the private bit into the
error code whenever the gfn's attribute is PRIVATE: the attribute is the source of truth
(kernel-semantics.md §4.1, ``[L6.19] arch/x86/kvm/mmu/mmu.c :: kvm_mmu_page_fault``). There is no prepare or
invalidate hook and no cap on the mapping level (§3.5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.constants import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_SW_PROTECTED_VM
from pkvm.kvm.ops import PlatformOps, access_or_attribute

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM


@access_or_attribute
def sw_protected_fault_is_private(vm: VM, gfn: int, private: bool) -> bool:
    """The reported bit OR the gfn's PRIVATE attribute (the kernel sets the bit from it)."""
    return private or bool(vm.get_memory_attributes(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE)


OPS = PlatformOps(
    name="sw_protected",
    vm_type=KVM_X86_SW_PROTECTED_VM,
    has_private_mem=True,
    fault_is_private=sw_protected_fault_is_private,
)
