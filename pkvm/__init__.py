"""pkvm: a fast, faithful simulator of Linux KVM shared/private guest-memory conversion.

See ``README.md`` and ``docs/``. Users import ``pkvm``; ``pkvm._core`` is the private typed core.
"""

from pkvm import _launch

_launch.guard()  # the command line's process: Ctrl-C while it imports is one line (pkvm._launch)

from pkvm import platforms  # noqa: E402, F401  (importing it installs the op tables: pkvm.kvm.ops)
from pkvm._core import RangeMap, RmpEntry, RmpTable
from pkvm.actors.guest import Guest
from pkvm.actors.vmm import Vmm
from pkvm.constants import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_CAP_EXIT_HYPERCALL,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MEMORY_FAULT,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_TDX_MEASURE_MEMORY_REGION,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
)
from pkvm.cost.model import CostModel
from pkvm.errors import (
    ConfigError,
    InternalInvariantError,
    KvmError,
    PkvmError,
    PlatformRegistrationError,
    TracePlatformError,
)
from pkvm.host.directmap import DIRECTMAP_POLICIES, DirectMap
from pkvm.kvm.batch import FaultBatch, FaultBatchError
from pkvm.kvm.events import EVENT_KINDS, Event, Subscription
from pkvm.kvm.exits import ConversionResult, ExitResult, GuestOpResult, Hypercall
from pkvm.kvm.fault import PageFault
from pkvm.kvm.gmem import GuestMemfd
from pkvm.kvm.mmu import AccessResult, FaultResult
from pkvm.kvm.policy import Policy
from pkvm.kvm.vm import ATTR_PHASES, VM, AttrIoctl, Memslot, Vcpu
from pkvm.platforms._snp_vcpu import PscDesc, PscEntry
from pkvm.platforms.snp_constants import (
    PSMASH_FAIL_INPUT,
    PSMASH_FAIL_INUSE,
    PSMASH_FAIL_PERMISSION,
    PSMASH_SUCCESS,
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_NOUPDATE,
    PVALIDATE_FAIL_SIZEMISMATCH,
    PVALIDATE_NPF_RMP,
    PVALIDATE_NPF_SIZEM,
    PVALIDATE_SUCCESS,
    RMPUPDATE_FAIL_INPUT,
    RMPUPDATE_FAIL_INUSE,
    RMPUPDATE_FAIL_OVERLAP,
    RMPUPDATE_FAIL_PERMISSION,
    RMPUPDATE_SUCCESS,
)

from pkvm import _aliases

_aliases.install()

__version__ = "0.1.0"

__all__ = [
    "ATTR_PHASES",
    "AccessResult",
    "AttrIoctl",
    "ConversionResult",
    "CostModel",
    "DirectMap",
    "DIRECTMAP_POLICIES",
    "Event",
    "EVENT_KINDS",
    "ExitResult",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FaultBatch",
    "FaultBatchError",
    "FaultResult",
    "Guest",
    "GuestMemfd",
    "GuestOpResult",
    "Hypercall",
    "InternalInvariantError",
    "KVM_CAP_EXIT_HYPERCALL",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_MEMORY_ATTRIBUTES",
    "KVM_EXIT_HYPERCALL",
    "KVM_EXIT_MEMORY_FAULT",
    "KVM_HC_MAP_GPA_RANGE",
    "KVM_MAP_GPA_RANGE_DECRYPTED",
    "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEMORY_EXIT_FLAG_PRIVATE",
    "KVM_TDX_MEASURE_MEMORY_REGION",
    "KVM_X86_DEFAULT_VM",
    "KVM_X86_SNP_VM",
    "KVM_X86_SW_PROTECTED_VM",
    "KVM_X86_TDX_VM",
    "ConfigError",
    "KvmError",
    "TracePlatformError",
    "Memslot",
    "PageFault",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "PkvmError",
    "PlatformRegistrationError",
    "Policy",
    "PscDesc",
    "PscEntry",
    "PSMASH_FAIL_INPUT",
    "PSMASH_FAIL_INUSE",
    "PSMASH_FAIL_PERMISSION",
    "PSMASH_SUCCESS",
    "PVALIDATE_FAIL_INPUT",
    "PVALIDATE_FAIL_NOUPDATE",
    "PVALIDATE_FAIL_SIZEMISMATCH",
    "PVALIDATE_NPF_RMP",
    "PVALIDATE_NPF_SIZEM",
    "PVALIDATE_SUCCESS",
    "RangeMap",
    "RmpEntry",
    "RmpTable",
    "RMPUPDATE_FAIL_INPUT",
    "RMPUPDATE_FAIL_INUSE",
    "RMPUPDATE_FAIL_OVERLAP",
    "RMPUPDATE_FAIL_PERMISSION",
    "RMPUPDATE_SUCCESS",
    "Subscription",
    "Vcpu",
    "VM",
    "Vmm",
    "__version__",
]


def __getattr__(name: str) -> object:
    """``pkvm.vm``, ``pkvm.costs``, ...: the pre-layout module names (:mod:`pkvm._aliases`)."""
    return _aliases.resolve(name)
