"""``KVM_SET_USER_MEMORY_REGION2`` (docs/kernel-semantics.md §2.9, §3.1, §4.7): validation, create, move,
flags-only change and delete, split out of :mod:`pkvm.kvm.vm` to keep that file readable.

Validation follows ``kvm_vm_ioctl_set_memory_region`` -> ``kvm_set_memory_region`` ->
``check_memory_region_flags`` -> ``kvm_gmem_bind`` in the kernel's order; nothing changes
until every check passed.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm.constants import (
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    KVM_X86_DEFAULT_VM,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    TASK_SIZE_MAX,
)
from pkvm._core import MemslotState
from pkvm.errors import KvmError
from pkvm.kvm.gmem import GuestMemfd
from pkvm.kvm.mmu import LEVEL_SHIFT, LpageInfo

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

_U64_MAX = (1 << 64) - 1


def _u64(name: str, value: object) -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        value = int(value)
    if value < 0 or value > _U64_MAX:
        raise ValueError(f"{name}={value:#x} does not fit a u64")
    return value


class Memslot(MemslotState):
    """One memslot (``struct kvm_memory_slot``): gfns ``[base_gfn, base_gfn + npages)``.

    ``gmem`` is the bound guest_memfd (or None) and ``gmem_file`` the slot's file pointer,
    which becomes None when the file is closed. ``lpage`` is its :class:`LpageInfo`.
    """

    # ``flags``, ``invalid`` and ``gmem_file`` are C members of MemslotState (pkvm/_state.pxi),
    # read by the fault path in C.
    __slots__ = ("key", "as_id", "id", "base_gfn", "npages", "end_gfn", "userspace_addr",
                 "gmem", "gmem_pgoff", "lpage", "_ugfn")

    def __init__(self, key: int, base_gfn: int, npages: int, userspace_addr: int, flags: int,
                 gmem: GuestMemfd | None, gmem_pgoff: int) -> None:
        self.key = key
        self.as_id, self.id = key >> 16, key & 0xFFFF
        self.base_gfn = base_gfn
        self.npages = npages
        self.end_gfn = base_gfn + npages
        self.userspace_addr = userspace_addr
        self.flags = flags
        self.gmem = gmem
        self.gmem_file = gmem
        self.gmem_pgoff = gmem_pgoff
        self._ugfn = userspace_addr >> PAGE_SHIFT
        self.lpage = LpageInfo(base_gfn, npages, self._ugfn)
        self.invalid = False

    def __repr__(self) -> str:
        return (f"<Memslot {self.as_id}:{self.id} gfns [{self.base_gfn:#x}, {self.end_gfn:#x}) "
                f"flags={self.flags:#x}{' gmem' if self.gmem else ''}>")

    def hva_page(self, gfn: int) -> int:
        """The userspace page number backing ``gfn`` (shared memory)."""
        return self._ugfn + (gfn - self.base_gfn)

    def is_mixed(self, gfn: int, level: int) -> bool:
        """Whether the ``level`` chunk containing ``gfn`` has the MIXED flag (§3.1)."""
        return self.lpage.is_mixed(gfn, level)

    def disallow_lpage(self, gfn: int, level: int) -> int:
        """The ``disallow_lpage`` count (without the MIXED bit) of the chunk holding ``gfn``."""
        return self.lpage.disallow_count(gfn, level)



def _einval(msg: str) -> KvmError:
    return KvmError(errno.EINVAL, msg)


def set_user_memory_region2(vm: VM, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                            userspace_addr: int, guest_memfd: GuestMemfd | None,
                            guest_memfd_offset: int, *, check_only: bool = False) -> None:
    """See :meth:`pkvm.VM.set_user_memory_region2`.

    ``check_only``: run the checks of a call that binds a new guest_memfd of this VM, of
    exactly ``guest_memfd_offset + memory_size`` bytes and not yet created (pass None), and
    change nothing: :class:`pkvm.Vmm` checks a memslot before it creates its guest_memfd.
    """
    slot = _u64("slot", slot)
    if slot >> 32:
        raise ValueError(f"slot={slot:#x} does not fit a u32")
    flags = _u64("flags", flags)
    if flags >> 32:
        raise ValueError(f"flags={flags:#x} does not fit a u32")
    gpa = _u64("guest_phys_addr", guest_phys_addr)
    size = _u64("memory_size", memory_size)
    uaddr = _u64("userspace_addr", userspace_addr)
    gmem_off = _u64("guest_memfd_offset", guest_memfd_offset)
    if guest_memfd is not None and not isinstance(guest_memfd, GuestMemfd):
        raise TypeError(f"guest_memfd must be a pkvm GuestMemfd or None, not {type(guest_memfd).__name__}")
    platform = vm._platform

    if slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
        raise _einval(f"slot id {slot & 0xFFFF} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
    # check_memory_region_flags
    valid = KVM_MEM_LOG_DIRTY_PAGES
    if platform.has_private_mem:
        valid |= KVM_MEM_GUEST_MEMFD
    if flags & KVM_MEM_GUEST_MEMFD:
        valid &= ~KVM_MEM_LOG_DIRTY_PAGES  # dirty logging of private memory is unsupported
    if not platform.has_protected_state and not flags & KVM_MEM_GUEST_MEMFD:
        valid |= KVM_MEM_READONLY
    if flags & ~valid:
        raise _einval(f"memslot flags {flags:#x} not valid for a {platform.name} VM (valid here: {valid:#x})")
    as_id = slot >> 16
    if size & (PAGE_SIZE - 1):
        raise _einval(f"memory_size {size:#x} is not 4 KiB aligned")
    if gpa & (PAGE_SIZE - 1):
        raise _einval(f"guest_phys_addr {gpa:#x} is not 4 KiB aligned")
    if uaddr & (PAGE_SIZE - 1) or uaddr + size > TASK_SIZE_MAX:
        raise _einval(f"userspace_addr range [{uaddr:#x}, {uaddr + size:#x}) is unaligned or not user memory")
    if flags & KVM_MEM_GUEST_MEMFD and (gmem_off & (PAGE_SIZE - 1) or gmem_off + size > _U64_MAX):
        raise _einval(f"guest_memfd_offset {gmem_off:#x} is unaligned or wraps")
    if as_id >= len(vm._slot_maps):
        raise _einval(f"address space {as_id} does not exist (this VM has {len(vm._slot_maps)})")
    if gpa + size > _U64_MAX:
        raise _einval(f"[{gpa:#x}, +{size:#x}) wraps around 2**64")
    if size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
        raise _einval(f"memory_size {size:#x} exceeds KVM_MEM_MAX_NR_PAGES pages")

    old = vm._slots.get(slot)
    if not size:
        if old is None:
            raise _einval(f"slot {slot:#x} does not exist, cannot delete it")
        if check_only:
            return
        _delete(vm, old)
        return
    base_gfn, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
    if old is None:
        change = "create"
    else:
        if flags & KVM_MEM_GUEST_MEMFD or old.flags & KVM_MEM_GUEST_MEMFD:
            raise _einval(f"slot {slot:#x}: guest_memfd memslots are immutable; delete it (memory_size=0) instead")
        if uaddr != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
            raise _einval(f"slot {slot:#x}: only the base address or dirty logging of a slot can change")
        if base_gfn != old.base_gfn:
            change = "move"
        elif flags != old.flags:
            change = "flags"
        else:
            return
    if change in ("create", "move"):
        for _s, _e, key in vm._slot_maps[as_id].iter_ranges(base_gfn, base_gfn + npages):
            if key - 1 != slot:
                other = vm._slots[key - 1]
                raise KvmError(errno.EEXIST, f"gfns [{base_gfn:#x}, {base_gfn + npages:#x}) overlap slot "
                               f"{other.key:#x} [{other.base_gfn:#x}, {other.end_gfn:#x})")
    gmem = None
    if flags & KVM_MEM_GUEST_MEMFD and not check_only:
        gmem = guest_memfd
        # kvm_gmem_bind
        if gmem is not None and gmem.closed:
            raise KvmError(errno.EBADF, f"guest_memfd fd {gmem.fd} is closed")
        if gmem is None:
            raise _einval("KVM_MEM_GUEST_MEMFD needs a guest_memfd")
        if gmem._vm is not vm:
            raise _einval(f"guest_memfd fd {gmem.fd} belongs to another VM")
        start = gmem_off >> PAGE_SHIFT
        if gmem_off + size > gmem.size:
            raise _einval(f"guest_memfd range [{gmem_off:#x}, {gmem_off + size:#x}) runs past its size {gmem.size:#x}")
        if gmem.bindings.find_ne(start, start + npages, 0) != -1:
            raise _einval(f"guest_memfd fd {gmem.fd} pages [{start:#x}, {start + npages:#x}) are already bound")

    # kvm_arch_prepare_memory_region: no gfn past kvm_mmu_max_gfn() (TDX: below the shared bit).
    if change in ("create", "move") and vm._gfn_limit is not None and base_gfn + npages > vm._gfn_limit:
        why = "; a TD's gfns stay below its shared bit" if platform.name == "tdx" else ""
        raise _einval(f"gfns [{base_gfn:#x}, {base_gfn + npages:#x}) reach past the largest gfn of this VM "
                      f"({vm._gfn_limit - 1:#x}, kvm_mmu_max_gfn(){why})")
    if check_only:
        return
    if change == "flags" and old is not None:
        old.flags = flags  # lpage_info is kept (KVM_MR_FLAGS_ONLY copies the metadata)
        return
    if change == "move" and old is not None:
        _delete(vm, old)
    new = Memslot(slot, base_gfn, npages, uaddr, flags, gmem, gmem_off >> PAGE_SHIFT)
    # its lpage_info's mutators and maps refuse from an event callback of the VM (docs/events.md)
    new.lpage._owner = vm
    for m in new.lpage.maps[PG_LEVEL_2M:]:
        m._set_owner(vm)
    if platform.has_private_mem:
        init_memslot_mixed(vm, new)
    if gmem is not None:
        gmem._bind(new, new.gmem_pgoff)
    vm._slots[slot] = new
    vm._slot_maps[as_id].assign(base_gfn, new.end_gfn, slot + 1)


def _delete(vm: VM, old: Memslot) -> None:
    """``KVM_MR_DELETE`` (a move deletes first): invalidate the slot, zap (its mappings, or
    every mapping of the VM: :func:`zaps_all`), unbind, free metadata."""
    old.invalid = True
    if zaps_all(vm):  # kvm_mmu_zap_all_fast: every root of both address spaces
        zapped = vm._zap(0, vm._gfn_limit or 1 << (52 - PAGE_SHIFT))
    else:
        zapped = vm._zap(old.base_gfn, old.end_gfn) if old.as_id == 0 else 0
    if zapped:
        vm._flush_remote_tlbs()
    vm._slot_maps[old.as_id].assign(old.base_gfn, old.end_gfn, 0)
    del vm._slots[old.key]
    if old.gmem is not None:
        old.gmem._unbind(old)


def zaps_all(vm: VM) -> bool:
    """Whether ``kvm_arch_flush_shadow_memslot`` zaps every mapping of ``vm`` when a memslot
    is deleted or moved (``kvm_mmu_zap_all_fast``, arch/x86/kvm/mmu/mmu.c): always before 6.12
    (``Policy.memslot_zap="all"``); from 6.12 only on a ``KVM_X86_DEFAULT_VM``, through the
    ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` quirk (``kvm_memslot_flush_zap_all``), which pkvm takes as
    enabled, the kernel's default. Never on a TD: the 6.12 change made TDX's memslot zap
    targeted before TDX was merged, and a zap of everything leaves its mirror root alone."""
    if vm._mirror:
        return False
    return vm.policy.memslot_zap == "all" or vm.vm_type == KVM_X86_DEFAULT_VM


def attr_edges(vm: VM, start: int, end: int) -> list[int]:
    """Gfns in ``(start, end)`` where the attribute value changes, sorted."""
    edges: list[int] = []
    for s, e, _v in vm._attrs.iter_ranges(start, end):
        if s > start and (not edges or edges[-1] != s):
            edges.append(s)
        if e < end:
            edges.append(e)
    return edges


def expected_mixed(vm: VM, slot: Memslot, level: int) -> list[int]:
    """Chunk numbers of the fully-inside ``level`` chunks of ``slot`` that must be MIXED.

    A chunk is uniform (§3.2) iff no attribute change falls strictly inside it; at 1G that
    also covers "no 2M sub-chunk is MIXED and every sub-chunk starts with the same value".
    """
    shift = LEVEL_SHIFT[level]
    mask = (1 << shift) - 1
    first_full = (slot.base_gfn + mask) >> shift
    last_full = slot.end_gfn >> shift
    out: list[int] = []
    for b in attr_edges(vm, slot.base_gfn, slot.end_gfn):
        if b & mask:
            c = b >> shift
            if first_full <= c < last_full and (not out or out[-1] != c):
                out.append(c)
    return out


def init_memslot_mixed(vm: VM, slot: Memslot) -> None:
    """``kvm_mmu_init_memslot_memory_attributes`` (§3.1), one edge at a time."""
    for level in (PG_LEVEL_2M, PG_LEVEL_1G):
        shift = LEVEL_SHIFT[level]
        for c in expected_mixed(vm, slot, level):
            slot.lpage.set_mixed(c << shift, level, True)
