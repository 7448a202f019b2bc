"""``KVM_X86_DEFAULT_VM``: an ordinary VM without private memory.

No attributes can be set (the supported mask is 0), no guest_memfd memslot can be bound, and
every fault is shared unless the caller reports a private access, which the hardware of such a
VM never does (docs/kernel-semantics.md §2.1, §4.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.constants import KVM_X86_DEFAULT_VM
from pkvm.kvm.ops import PlatformOps, access_decides

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM


@access_decides
def default_fault_is_private(vm: VM, gfn: int, private: bool) -> bool:
    """``fault.is_private`` is the error code's private bit, as reported (§4.1)."""
    return private


OPS = PlatformOps(
    name="default",
    vm_type=KVM_X86_DEFAULT_VM,
    has_private_mem=False,
    fault_is_private=default_fault_is_private,
)
