"""pkvm: a fast, faithful simulator of Linux KVM shared/private guest-memory conversion.

See ``README.md`` and ``docs/``. Users import ``pkvm``; ``pkvm._core`` is the private typed core.
"""

from pkvm._core import RangeMap
from pkvm.constants import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_EXIT_MEMORY_FAULT,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
)
from pkvm.costs import CostModel
from pkvm.errors import InternalInvariantError, KvmError, PkvmError, PlatformRegistrationError
from pkvm.gmem import GuestMemfd
from pkvm.mmu import AccessResult, FaultResult
from pkvm.policy import Policy
from pkvm.vm import VM, Memslot, Vcpu

__version__ = "0.1.0"

__all__ = [
    "AccessResult",
    "CostModel",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FaultResult",
    "GuestMemfd",
    "InternalInvariantError",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_MEMORY_ATTRIBUTES",
    "KVM_EXIT_MEMORY_FAULT",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_X86_DEFAULT_VM",
    "KVM_X86_SNP_VM",
    "KVM_X86_SW_PROTECTED_VM",
    "KVM_X86_TDX_VM",
    "KvmError",
    "Memslot",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "PkvmError",
    "PlatformRegistrationError",
    "Policy",
    "RangeMap",
    "VM",
    "Vcpu",
    "__version__",
]
