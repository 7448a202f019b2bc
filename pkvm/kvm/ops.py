"""Platform op tables, modelled on ``kvm_x86_ops`` / ``kvm-x86-ops.h``.

A platform is a frozen :class:`PlatformOps`: a few facts about the VM type and one field per
kernel hook. Mandatory ops must be callables; optional ops default to the shared
:func:`_return0` (one given as ``None`` is swapped for it by :func:`register_platform`), like
``KVM_X86_OP_OPTIONAL_RET0``, so call sites never test for ``None``. Tables are checked once, at registration.

This module is the KVM layer's side of the op-table pattern: the KVM model (:mod:`pkvm.kvm`)
calls a platform only through the table it finds in :data:`PLATFORMS`, never by importing a
platform module. The platforms (:mod:`pkvm.platforms`, a layer above) build their tables and
hand them to :func:`install_platforms` when that package is imported, as a vendor module fills
``kvm_x86_ops`` at ``kvm_x86_vendor_init`` (``arch/x86/kvm/x86.c``); ``import pkvm`` imports
them, so a VM never sees an empty registry.

Every op's phase and lock are documented on the field.

Mirror-root ops (``set_external_spte``, ``remove_external_spte``, ``split_external_spte``) are
the TDP MMU's "external page table" hooks (``kvm_x86_ops.link_external_spt`` /
``set_external_spte`` / ``remove_external_spte``): the generic MMU edits the mirror root and calls
them so the platform can propagate the change (TDX: SEAMCALLs on the secure EPT).

Actors (:mod:`pkvm.actors.guest`, :mod:`pkvm.actors.vmm`) find a platform's flows through the
``guest_flows`` and ``vmm_flows`` factories: a new platform plugs its guest conversion protocol
(TDX: MapGPA + ACCEPT; SNP: page-state change + PVALIDATE) in there without touching the actors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pkvm.errors import PlatformRegistrationError

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM, Memslot, Vcpu

    FaultIsPrivate = Callable[[VM, int, bool], bool]
    InitVm = Callable[[VM], int]
    GmemPrepare = Callable[[VM, int, int, int, int], int]
    GmemInvalidate = Callable[[VM, int, int], int]
    GmemMaxMappingLevel = Callable[[VM, int, bool], int]
    MemAttrOp = Callable[[VM, Memslot, int, int, int], int]
    RmpFaultOp = Callable[[Vcpu, int, bool, bool, object], int]
    ExternalSpteOp = Callable[[VM, int, int, int, int], int]
    SplitExternalOp = Callable[[VM, int, int], int]
    MaxMappingLevel = Callable[[VM, int, bool], int]
    CreateVcpu = Callable[[VM, int], Any]
    CheckVm = Callable[[VM], int]
    FlowsFactory = Callable[[Any], Any]


def access_decides(fn: FaultIsPrivate) -> FaultIsPrivate:
    """Mark a ``fault_is_private`` op that returns the reported ``private`` bit unchanged (the
    access decides, as on SNP, TDX and the default VM type: docs/kernel-semantics.md §4.1).
    The typed fault path (``FaultPath`` in ``pkvm/_fault.pxi``) then reads the bit itself
    instead of calling the op on every fault; the op stays callable and must agree."""
    fn.access_decides = True  # type: ignore[attr-defined]
    return fn


def access_or_attribute(fn: FaultIsPrivate) -> FaultIsPrivate:
    """Mark a ``fault_is_private`` op that returns the reported ``private`` bit OR the gfn's
    ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` (``KVM_X86_SW_PROTECTED_VM``: docs/kernel-semantics.md
    §4.1). The typed fault path then computes it from the attribute word it reads on entry
    instead of calling the op on every fault; the op stays callable and must agree."""
    fn.access_or_attribute = True  # type: ignore[attr-defined]
    return fn


def _return0(*args: Any, **kwargs: Any) -> int:
    """The shared body of every absent optional op: do nothing, return 0."""
    return 0


@dataclass(frozen=True, slots=True)
class PlatformOps:
    """One VM type's facts and hooks.

    Facts:
        ``name`` (the ``vm_type`` string), ``vm_type`` (the KVM value), ``has_private_mem``
        (``kvm_arch_has_private_mem``: attributes, guest_memfd slots), ``has_protected_state``
        (SNP/TDX: no ``KVM_MEM_READONLY`` slots), ``has_mirror_root`` (TDX: private
        mappings live in a separate mirror root, so ``zap_filter`` matters), ``options`` (the
        names ``pkvm.VM(options=...)`` accepts for this type; ``init_vm`` reads them).

    Ops (``vm`` is the :class:`pkvm.VM`; ranges are half-open ``[start, end)`` gfns):

    ``fault_is_private(vm, gfn, private) -> bool`` — **mandatory**. Phase: fault entry
        (``kvm_mmu_do_page_fault``), before the sequence snapshot; no lock. Turns the
        access type the hardware reported into ``fault.is_private`` (docs/kernel-semantics.md
        §4.1). All platforms.
    ``init_vm(vm) -> int`` — optional. Phase: end of ``KVM_CREATE_VM``; no lock. Attaches
        platform state (SNP: the RMP table; TDX: the S-EPT).
    ``gmem_prepare(vm, gfn, pfn, order, nr) -> int`` — optional (``kvm_arch_gmem_prepare``).
        Phase: the fault's pfn lookup, inside ``kvm_gmem_get_pfn``, outside ``mmu_lock``,
        folio locked (§4.3). Prepares ``nr`` consecutive folios of ``2**order`` pages whose
        gfns start at ``gfn`` and pfns at ``pfn`` (both linear). Returns 0, or ``-errno``
        having prepared none of them; the caller then retries folio by folio to find the one
        that fails. SNP (RMPUPDATE to guest-owned).
    ``gmem_invalidate(vm, pfn_start, pfn_end) -> int`` — optional
        (``kvm_arch_gmem_invalidate``). Phase: a folio is freed (hole punch, file release),
        after the zap, outside ``mmu_lock``, under the file's invalidate lock (§4.7). SNP
        (RMPUPDATE back to hypervisor-owned, PSMASH if needed).
    ``gmem_max_mapping_level(vm, pfn, private) -> int`` — optional (6.19
        ``gmem_max_mapping_level``; 6.11-6.16 ``private_max_mapping_level``). Phase: the
        fault's hugepage adjust, under ``mmu_lock`` (read); only consulted when the folio
        order allows more than 4K. 0 means no cap (§3.5). SNP, TDX.
    ``update_mem_attr(vm, slot, attrs, start, end) -> int`` — optional; the RFC v8
        op (docs/kernel-semantics.md §7.7). Phase: after the attribute commit and the POST hook, after ``mmu_lock``
        is dropped, under ``slots_lock``; per slot-clipped range. Runs only under the
        ``rmp_update="eager-post"`` policy. SNP eager designs.
    ``set_mem_attr(vm, slot, attrs, start, end) -> int`` — optional; Isaku Yamahata's
        variant (``kvm_arch_set_memory_attributes``). Phase: inside the POST phase, under
        ``mmu_lock`` (write) and ``slots_lock``; per slot-clipped range. Runs only under
        ``rmp_update="eager-locked"``; sleeping here (a directmap mutex) is a bug the model
        counts. SNP eager designs.
    ``pre_set_mem_attr(vm, slot, attrs, start, end) -> int`` — optional; the pre phase of the
        split design of the RFC v8 debate (§7.7). Phase: ``KVM_SET_MEMORY_ATTRIBUTES`` after the short-circuit
        and before ``mmu_lock`` is taken (so before ``invalidate_begin``), under ``slots_lock``;
        per slot-clipped range; may sleep. Runs only under ``rmp_update="eager-split"``, which
        also runs ``set_mem_attr`` (under the lock) and ``update_mem_attr`` (after it). SNP.
    ``handle_rmp_fault(vcpu, gpa, private, write, result) -> int`` — optional
        (``sev_handle_rmp_fault``, called from ``npf_interception``). Phase: after the MMU
        fault handler returned > 0, when the #NPF error code has the RMP bit (§4.2 step 10);
        no MMU lock. A vCPU that tracks the bit has an ``rmp_npf`` attribute and gets the op
        only while it is true, as ``npf_interception`` tests ``PFERR_GUEST_RMP_MASK`` before
        calling; a vCPU without the attribute gets it after every positive return. SNP.
    ``max_mapping_level(vm, gfn, private) -> int`` — optional; a gfn-based cap next to
        ``gmem_max_mapping_level``. Phase: the fault's hugepage adjust, under ``mmu_lock``
        (read); consulted only when the folio order allows more than 4K. 0 means no cap.
        TDX with ``Policy.tdx_huge_pages`` (guest-inhibit bit, no promotion).
    ``set_external_spte(vm, start, end, level, pfn_delta) -> int`` — optional
        (``link_external_spt`` + ``set_external_spte``, §4.2 step 7). Phase: ``kvm_tdp_mmu_map``
        under ``mmu_lock`` (read), the new mirror-root leaves on gfns ``[start, end)`` at
        ``level`` (pfn = gfn + ``pfn_delta``) still frozen: link every missing non-leaf table of
        the external page table, then install the leaves. Returns 0, ``-EBUSY`` (nothing
        installed; the fault is retried) or ``-EIO`` (the platform bugged the VM). TDX.
    ``remove_external_spte(vm, start, end, level, pfn_delta) -> int`` — optional
        (``remove_external_spte``). Phase: a zap of mirror-root leaves ``[start, end)`` at
        ``level``, under ``mmu_lock`` (write), after the mirror SPTEs were cleared. TDX
        (BLOCK, TRACK + kick, REMOVE, WBINVD, clear per leaf, §6.3).
    ``split_external_spte(vm, gfn, level) -> int`` — optional; **beyond upstream** (TDX huge
        page series). Phase: before a zap that covers only part of the huge mirror leaf at
        ``level`` containing ``gfn``, under ``mmu_lock`` (write). TDX (BLOCK, TRACK, DEMOTE).
    ``create_vcpu(vm, vcpu_id) -> Vcpu`` — optional (``kvm_x86_ops.vcpu_create``). Phase:
        ``KVM_CREATE_VCPU``. Returns the platform's :class:`pkvm.Vcpu` subclass instance, which
        carries its guest instructions (TDX: ``map_gpa``, ``accept``), or 0 for a plain Vcpu.
    ``check_vm(vm) -> int`` — optional. Phase: ``vm.check()``, after the generic invariants;
        raises :class:`pkvm.InternalInvariantError` on a violation. TDX (S-EPT vs mirror root).
    ``guest_flows(guest) -> flows`` / ``vmm_flows(vmm) -> flows`` — optional factories of the
        per-platform actor flows (see :mod:`pkvm.actors.guest` and :mod:`pkvm.actors.vmm` for the protocols);
        0 selects the generic ``KVM_HC_MAP_GPA_RANGE`` flows. TDX.
    """

    name: str
    vm_type: int
    has_private_mem: bool
    fault_is_private: FaultIsPrivate
    has_protected_state: bool = False
    has_mirror_root: bool = False
    options: tuple[str, ...] = ()
    init_vm: InitVm = _return0
    gmem_prepare: GmemPrepare = _return0
    gmem_invalidate: GmemInvalidate = _return0
    gmem_max_mapping_level: GmemMaxMappingLevel = _return0
    update_mem_attr: MemAttrOp = _return0
    set_mem_attr: MemAttrOp = _return0
    pre_set_mem_attr: MemAttrOp = _return0
    handle_rmp_fault: RmpFaultOp = _return0
    max_mapping_level: MaxMappingLevel = _return0
    set_external_spte: ExternalSpteOp = _return0
    remove_external_spte: ExternalSpteOp = _return0
    split_external_spte: SplitExternalOp = _return0
    create_vcpu: CreateVcpu = _return0
    check_vm: CheckVm = _return0
    guest_flows: FlowsFactory = _return0
    vmm_flows: FlowsFactory = _return0


_MANDATORY = ("fault_is_private",)
_OPTIONAL_RET0 = (
    "init_vm", "gmem_prepare", "gmem_invalidate", "gmem_max_mapping_level",
    "update_mem_attr", "set_mem_attr", "pre_set_mem_attr", "handle_rmp_fault", "max_mapping_level",
    "set_external_spte", "remove_external_spte", "split_external_spte", "create_vcpu",
    "check_vm", "guest_flows", "vmm_flows",
)


def register_platform(ops: PlatformOps) -> PlatformOps:
    """Check an op table and return it with absent optional ops set to :func:`_return0`.

    Raises:
        PlatformRegistrationError: ``ops`` is not a PlatformOps, a mandatory op is missing,
            or an op is not callable.
    """
    if not isinstance(ops, PlatformOps):
        raise PlatformRegistrationError(f"expected a PlatformOps, got {type(ops).__name__}")
    for name in _MANDATORY:
        op = getattr(ops, name)
        if op is None:
            raise PlatformRegistrationError(f"platform {ops.name!r}: mandatory op {name} is missing")
        if not callable(op):
            raise PlatformRegistrationError(f"platform {ops.name!r}: op {name} is not callable: {op!r}")
    fill: dict[str, Any] = {}
    for name in _OPTIONAL_RET0:
        op = getattr(ops, name)
        if op is None:
            fill[name] = _return0
        elif not callable(op):
            raise PlatformRegistrationError(f"platform {ops.name!r}: op {name} is not callable: {op!r}")
    return dataclasses.replace(ops, **fill) if fill else ops


def is_implemented(op: object) -> bool:
    """Whether a registered op is a real implementation rather than :func:`_return0`."""
    return op is not _return0


#: VM type names accepted by ``pkvm.VM(vm_type=...)``, including unregistered ones
#: (``KVM_X86_*_VM`` in ``arch/x86/include/uapi/asm/kvm.h``).
VM_TYPE_NAMES: Mapping[str, int] = MappingProxyType(
    {"default": 0, "sw_protected": 1, "sev": 2, "sev_es": 3, "snp": 4, "tdx": 5}
)

# The one registry of the process, written once by install_platforms() and read-only after.
_installed: dict[int, PlatformOps] = {}

#: Registered platforms by ``vm_type``: a read-only view, filled when :mod:`pkvm.platforms` is
#: imported (which ``import pkvm`` does).
PLATFORMS: Mapping[int, PlatformOps] = MappingProxyType(_installed)


def install_platforms(tables: Iterable[PlatformOps]) -> None:
    """Check the op tables with :func:`register_platform` and make them :data:`PLATFORMS`.

    Called once per process, by :mod:`pkvm.platforms` at import. A refused call installs
    nothing.

    Raises:
        PlatformRegistrationError: the tables are installed already, two tables share a
            ``vm_type``, or a table fails :func:`register_platform`.
    """
    checked: dict[int, PlatformOps] = {}
    for table in tables:
        ops = register_platform(table)
        if ops.vm_type in checked:
            raise PlatformRegistrationError(
                f"platforms {checked[ops.vm_type].name!r} and {ops.name!r} share vm_type {ops.vm_type}")
        checked[ops.vm_type] = ops
    if _installed:
        raise PlatformRegistrationError("the platform op tables are installed already")
    _installed.update(checked)


def lookup_platform(vm_type: int) -> PlatformOps | None:
    """The registered platform of ``vm_type``, or None."""
    return PLATFORMS.get(vm_type)
