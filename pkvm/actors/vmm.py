"""The VMM actor: what QEMU does for a confidential guest's memory (docs/kernel-semantics.md §7.4).

:class:`Vmm` owns the userspace side of a :class:`pkvm.VM`:

* :meth:`Vmm.add_ram` is ``kvm_set_phys_mem`` for guest_memfd-backed RAM: create the
  guest_memfd, add the memslot (with an HVA congruent to the gpa at 1 GiB), and mark the whole
  slot PRIVATE (``kvm_set_memory_attributes_private``) — QEMU's default for such RAM.
* :meth:`Vmm.handle_exit` answers the exits a conversion produces, as ``kvm_cpu_exec`` does:

  - ``KVM_EXIT_HYPERCALL`` with ``KVM_HC_MAP_GPA_RANGE`` (the SW_PROTECTED/KVM hypercall of
    §7.3, TDX MapGPA chunks of §7.2, SNP page-state changes of §7.1):
    ``kvm_handle_hc_map_gpa_range`` converts ``[args[0], args[0] + args[1] pages)`` to private
    if ``args[2]`` has ``KVM_MAP_GPA_RANGE_ENCRYPTED``, else to shared. It never writes
    ``hypercall.ret`` (KVM presets it to 0): a failed conversion is returned to
    ``kvm_cpu_exec``, which stops the VM (``RUN_STATE_INTERNAL_ERROR``), so the answer is falsy
    and the guest never reads a failure status;
  - ``KVM_EXIT_MEMORY_FAULT`` with errno EFAULT and flags within
    ``KVM_MEMORY_EXIT_FLAG_PRIVATE`` (an implicit conversion, §7.6): convert the page to the
    access's type; a failure stops the vCPU (``handle_exit`` returns False); QEMU stops the
    whole VM. Other errnos (EHWPOISON, ENOMEM, EIO) are fatal too.

* :meth:`Vmm.convert_memory` is ``kvm_convert_memory``: page-aligned and non-empty, else an
  error; a range outside every memslot is ignored when converting to shared (OVMF converts MMIO
  space) and an error when converting to private; a memslot without guest_memfd is an error.
  Then ``KVM_SET_MEMORY_ATTRIBUTES``; then, converting to private, discard the shared backing
  (``ram_block_discard_range``: ``MADV_DONTNEED``, skipped for hugetlb, whose pages stay
  allocated), or, converting to shared, punch the guest_memfd hole
  (``ram_block_discard_guest_memfd_range``), which frees the private pages (TDX) or returns
  them to the hypervisor in the RMP (SNP).
* :meth:`Vmm.launch` builds and starts the guest through the platform's VMM flows (TDX:
  ``KVM_TDX_INIT_MEM_REGION`` over the image, then ``KVM_TDX_FINALIZE_VM``; platforms without a
  launch protocol: nothing).

Per-platform VMM flows plug in through ``PlatformOps.vmm_flows(vmm)``, an object with
``launch(image)``; see :class:`VmmFlows`.

Choices where QEMU is more detailed than the model: the discard works on the memslot pieces of
the range and, like :class:`pkvm.host.hostmem.SharedBacking`, frees only whole host pages inside it
(a THP partly covered stays, where the kernel would split it). Each discard is one
``madvise`` per memslot piece (QEMU makes one per conversion, over the RAM block; the pieces
coincide unless a conversion crosses a memslot boundary), and runs KVM's MMU notifier
(``VM._madvise_dontneed``): an invalidation that zaps whatever still maps the range and bumps
``mmu_invalidate_seq``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from pkvm.constants import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_CAP_EXIT_HYPERCALL,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MEMORY_FAULT,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from pkvm.errors import KvmError
from pkvm.kvm import memslots as _memslots
from pkvm.kvm.exits import ExitResult, GuestOpResult, Hypercall
from pkvm.kvm.gmem import GuestMemfd
from pkvm.kvm.vm import VM

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.mmu import AccessResult, FaultResult
    from pkvm.kvm.vm import Memslot, Vcpu

GiB = 1 << 30
_U64_LIMIT = 1 << 64  # a range [gpa, gpa + size) must end at or below it
#: Where the VMM starts placing guest RAM in its address space (below ``TASK_SIZE_MAX``).
HVA_BASE = 1 << 40
#: Host page sizes whose memory ``ram_block_discard_range`` leaves alone (preallocated hugetlb).
_NO_DISCARD = ("hugetlb-2m", "hugetlb-1g")
MADV_DONTNEED = 4


def _converted(ret: int, gpa: int, size: int, private: bool, fail: str, last_failure: str) -> str:
    """The ``detail`` of the VMM's answer to an exit that asked for a conversion (built only
    when read: ``ExitResult._lazy``); ``last_failure`` is :attr:`Vmm.last_failure` then."""
    where = f"[{gpa:#x}, +{size:#x}) to {'private' if private else 'shared'}"
    if not ret:
        return f"converted {where}"
    return f"converting {where} failed with {errno.errorcode.get(-ret, -ret)}: {last_failure}{fail}"


#: QEMU q35 (hw/i386/pc_q35.c, ``pc_q35_init``): RAM that does not fit below 0xb0000000 is
#: split at 2 GiB (the rest goes above 4 GiB, leaving the PCI hole); smaller RAM stays whole.
Q35_LOWMEM_SPLIT = 0xB0000000
Q35_LOWMEM = 0x80000000
FOUR_GIB = 1 << 32
#: The largest memslot QEMU's ``kvm_set_phys_mem`` creates when a RAM section is split
#: (``kvm_max_slot_size``): KVM_MEM_MAX_NR_PAGES pages rounded down to 1 GiB, so that every
#: slot stays 1G-aligned for huge mappings (docs/kvm-model.md).
MAX_SLOT_BYTES = ((KVM_MEM_MAX_NR_PAGES << 12) // GiB) * GiB
#: ``TASK_SIZE_MAX`` with 4-level host paging: memslot HVAs must lie below it.
_TASK_SIZE_MAX = (1 << 47) - 4096


def _hva(next_hva: int, gpa: int) -> int:
    """The host address of a RAM memslot at ``gpa``: past ``next_hva``, aligned as ``gpa`` is
    within 1 GiB (so that huge pages line up)."""
    return ((next_hva + GiB - 1) & ~(GiB - 1)) + (gpa & (GiB - 1))


def q35_ram_layout(memory: int) -> list[tuple[int, int, int]]:
    """The memslots QEMU's q35 machine gives ``memory`` bytes of RAM, as ``(gpa, size, offset
    into the RAM block)``: ``below_4g = memory`` if ``memory < 0xb0000000`` else 2 GiB
    (``pc_q35_init``, hw/i386/pc_q35.c), the rest at 4 GiB; each piece split into memslots of
    at most :data:`MAX_SLOT_BYTES` (``kvm_set_phys_mem``, accel/kvm/kvm-all.c).

    >>> [(hex(g), s >> 30) for g, s, _ in q35_ram_layout(8 << 30)]
    [('0x0', 2), ('0x100000000', 6)]
    """
    below = memory if memory < Q35_LOWMEM_SPLIT else Q35_LOWMEM
    pieces = [(0, below, 0)]
    if memory > below:
        pieces.append((FOUR_GIB, memory - below, below))
    out: list[tuple[int, int, int]] = []
    for gpa, size, off in pieces:
        while size:
            n = min(size, MAX_SLOT_BYTES)
            out.append((gpa, n, off))
            gpa, size, off = gpa + n, size - n, off + n
    return out


def ram_limit(platform: str, gpaw: int = 48) -> tuple[int, str]:
    """``(bound, what)``: guest RAM must end at a gpa below ``bound`` on ``platform``. The
    guest physical address width: SNP 51 bits (the C-bit is bit 51, QEMU's ``cbitpos=51``);
    TDX private memory lies below the shared bit (47 with GPAW 48, the default; 51 with GPAW
    52); other VMs 52 bits (x86 MAXPHYADDR)."""
    if platform == "snp":
        return 1 << 51, "SNP guest physical address space (51 bits, below the C-bit at bit 51)"
    if platform == "tdx":
        bit = 51 if gpaw == 52 else 47
        return 1 << bit, f"TDX private address space (GPAW {gpaw}: below the shared bit {bit})"
    return 1 << 52, "52-bit guest physical address space"


def check_ram_fits(platform: str, memory: int, gpaw: int = 48) -> None:
    """Refuse ``memory`` bytes of RAM that the q35 layout cannot place: past the guest
    physical address width, or past the VMM's address space (HVAs below ``TASK_SIZE_MAX``).

    Raises:
        ValueError: one line naming the limit and the largest RAM that fits.
    """
    bound, what = ram_limit(platform, gpaw)
    # The layout's end, computed before the layout: an absurd size (1e40 bytes) would make it a
    # list of more memslots than memory holds.
    end = memory if memory < Q35_LOWMEM_SPLIT else memory + FOUR_GIB - Q35_LOWMEM
    most = bound - (FOUR_GIB - Q35_LOWMEM) if bound > FOUR_GIB else bound
    if end > bound:
        raise ValueError(f"on QEMU's q35 layout RAM would end at gpa {end:#x}, past the {what}; "
                         f"at most {most >> 30} GiB of RAM fits")
    hva_room = _TASK_SIZE_MAX - HVA_BASE - GiB * len(q35_ram_layout(memory))
    if memory > hva_room:
        raise ValueError(f"RAM does not fit in the VMM's address space (memslot HVAs "
                         f"below TASK_SIZE_MAX {_TASK_SIZE_MAX + 4096:#x}, 4-level host paging); at most "
                         f"{hva_room >> 30} GiB of RAM fits")


class VmmFlows(Protocol):
    """The per-platform part of the VMM (``PlatformOps.vmm_flows(vmm)`` returns one)."""

    def launch(self, image: list[tuple[int, int, bool]]) -> None:
        """Build the initial image (``(gpa, size, measure)`` regions) and start the guest."""


class _PlainLaunch:
    """Platforms without a launch protocol: the image is ordinary guest memory."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def launch(self, image: list[tuple[int, int, bool]]) -> None:
        return None


class Vmm:
    """QEMU for one :class:`pkvm.VM`. Enables ``KVM_CAP_EXIT_HYPERCALL`` for
    ``KVM_HC_MAP_GPA_RANGE`` (unless ``exit_hypercall=False``), as QEMU does for confidential
    guests.

    ``conversions`` / ``failed_conversions`` count :meth:`convert_memory` calls.

    >>> import pkvm
    >>> vm = pkvm.VM("sw_protected")
    >>> vmm = pkvm.Vmm(vm)
    >>> gmem = vmm.add_ram(0, 1 << 21)
    >>> vm.get_memory_attributes(0x1ff) == pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
    True
    >>> vmm.convert_memory(0x1000, 0x1000, to_private=False), vm.get_memory_attributes(1)
    (0, 0)
    """

    def __init__(self, vm: VM, *, exit_hypercall: bool = True, discard: bool = True) -> None:
        if not isinstance(vm, VM):
            raise TypeError(f"vm must be a pkvm.VM, not {type(vm).__name__}")
        if type(discard) is not bool:
            raise TypeError(f"discard must be a bool, not {type(discard).__name__}")
        self.vm = vm
        #: Whether a conversion discards the backing it leaves (QEMU's default). False keeps
        #: both backings allocated: the private folios survive a to-shared conversion, so a
        #: later to-private conversion finds them allocated and prepared (the regime the
        #: RFC-era eager designs were written for).
        self.discard = discard
        #: GFNs converted by successful :meth:`convert_memory` calls.
        self.gfns_converted = 0
        if exit_hypercall:
            vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
        self._next_slot = 0
        self._next_hva = HVA_BASE
        self.conversions = 0
        self.failed_conversions = 0
        #: Why the last failed :meth:`convert_memory` failed (one line; "" before any failure).
        self.last_failure = ""
        flows = vm.platform.vmm_flows(self)
        self.flows: VmmFlows = flows if flows else _PlainLaunch(self)

    def __repr__(self) -> str:
        return f"<pkvm.Vmm of {self.vm!r}>"

    # -- setup ---------------------------------------------------------------------------------

    def add_ram(self, gpa: int, size: int, *, slot: int | None = None, mark_private: bool = True,
                prealloc: bool = False) -> GuestMemfd | None:
        """Add ``size`` bytes of RAM at ``gpa`` (``kvm_set_phys_mem``): a guest_memfd and a
        ``KVM_MEM_GUEST_MEMFD`` memslot marked PRIVATE for a VM with private memory, a plain
        memslot otherwise. Returns the guest_memfd (or None).

        ``prealloc`` allocates the whole guest_memfd (``fallocate``) before the slot is
        marked private, as a VMM that preallocates guest memory would: the eager RMPUPDATE
        designs then find every page allocated at the attribute change (docs/kernel-semantics.md §7.7).
        ``mark_private=False`` leaves the attributes alone (a trace replay, whose trace holds
        the marking).

        Raises:
            KvmError: as ``create_guest_memfd`` / ``set_user_memory_region2`` /
                ``set_memory_attributes``.
        """
        if self.vm._in_callback:
            self.vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        with self.vm.acting("vmm"):
            return self._add_ram(gpa, size, slot, mark_private, prealloc)

    def _add_ram(self, gpa: int, size: int, slot: int | None, mark_private: bool,
                 prealloc: bool) -> GuestMemfd | None:
        vm = self.vm
        if slot is None:
            slot = self._next_slot
        self._check_ram(size, [(slot, gpa, size)])
        self._next_slot = max(self._next_slot, slot + 1)
        gmem = None
        if vm.platform.has_private_mem:
            gmem = vm.create_guest_memfd(size)
            if prealloc:
                gmem.fallocate(FALLOC_FL_KEEP_SIZE, 0, size)
        self._map_ram(slot, gpa, size, gmem, 0, mark_private)
        return gmem

    def _check_ram(self, block: int, pieces: list[tuple[int, int, int]]) -> None:
        """The checks of creating a RAM block of ``block`` bytes (a guest_memfd on a VM with
        private memory) and its ``(slot, gpa, size)`` memslots, made before anything is
        created: a refused :meth:`add_ram` or :meth:`add_ram_layout` changes nothing."""
        vm = self.vm
        vm._check_alive()
        private = vm.platform.has_private_mem
        if private:
            vm._gmem_args(block, 0)
        vm._attr_free()  # the memslot update takes slots_lock
        flags = KVM_MEM_GUEST_MEMFD if private else 0
        next_hva = self._next_hva
        for slot, gpa, size in pieces:
            gpa = _memslots._u64("guest_phys_addr", gpa)
            hva = _hva(next_hva, gpa)
            _memslots.set_user_memory_region2(vm, slot, flags, gpa, size, hva, None, 0, check_only=True)
            next_hva = hva + size

    def _map_ram(self, slot: int, gpa: int, size: int, gmem: GuestMemfd | None, offset: int,
                 mark_private: bool) -> None:
        """One RAM memslot at the next free host address (aligned as ``gpa`` is within 1 GiB):
        bound to ``gmem`` at ``offset`` and marked PRIVATE if asked, or a plain memslot."""
        vm = self.vm
        hva = _hva(self._next_hva, gpa)
        if gmem is not None:
            vm.set_user_memory_region2(slot, KVM_MEM_GUEST_MEMFD, gpa, size, hva, gmem, offset)
            if mark_private:
                vm.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        else:
            vm.set_user_memory_region2(slot, 0, gpa, size, hva)
        self._next_hva = hva + size

    def add_ram_layout(self, memory: int, *, mark_private: bool = True, prealloc_from: int | None = None
                       ) -> GuestMemfd | None:
        """Add ``memory`` bytes of RAM as QEMU's q35 machine does (:func:`q35_ram_layout`):
        one RAM block (one guest_memfd for a VM with private memory) mapped by one memslot per
        piece, at its offset in the block. ``prealloc_from`` fallocates the block from that
        offset on before anything is marked private. Returns the guest_memfd (or None).

        Raises:
            KvmError: as :meth:`add_ram`.
        """
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        if vm.platform.has_private_mem:
            vm._gmem_args(memory, 0)  # before the layout: a size beyond any file has none
        elif type(memory) is not int:
            raise TypeError(f"memory must be an int, not {type(memory).__name__}")
        layout = q35_ram_layout(memory)
        if prealloc_from is not None:
            if type(prealloc_from) is not int:
                raise TypeError(f"prealloc_from must be an int or None, not {type(prealloc_from).__name__}")
            if not 0 <= prealloc_from < memory or prealloc_from & (PAGE_SIZE - 1):
                # the fallocate(offset=prealloc_from, length=memory - prealloc_from) would refuse it
                raise KvmError(errno.EINVAL, f"prealloc_from {prealloc_from:#x} must be a 4 KiB aligned offset "
                               f"below the memory, {memory:#x}")
        self._check_ram(memory, [(self._next_slot + i, gpa, size) for i, (gpa, size, _off) in enumerate(layout)])
        prev = vm._set_actor("vmm")
        try:
            gmem = None
            if vm.platform.has_private_mem:
                gmem = vm.create_guest_memfd(memory)
                if prealloc_from is not None:
                    gmem.fallocate(FALLOC_FL_KEEP_SIZE, prealloc_from, memory - prealloc_from)
            for gpa, size, off in layout:
                slot = self._next_slot
                self._next_slot += 1
                self._map_ram(slot, gpa, size, gmem, off, mark_private)
            return gmem
        finally:
            vm._set_actor(prev)

    def launch(self, image: Iterable[tuple[int, int, bool]] = (), vcpu: Vcpu | None = None) -> None:
        """Build the guest's initial image and start it, through the platform's VMM flows.

        ``image`` lists ``(gpa, size, measure)`` regions of private RAM (TDX: added with
        ``KVM_TDX_INIT_MEM_REGION``, measured if ``measure``). Creates vCPU 0 if there is none.

        Raises:
            TypeError / ValueError: ``image`` is not an iterable of ``(gpa, size, measure)``
                with 4 KiB aligned gpa and size > 0, checked before anything is done (no vCPU is
                created for a refused image).
        """
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        regions = self._image_regions(image)
        if not vm.vcpus:
            vm.create_vcpu()
        with vm.acting("vmm"):
            self.flows.launch(regions)

    @staticmethod
    def _image_regions(image: Iterable[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
        """``image`` checked, as a list of ``(gpa, size, measure)`` (TypeError / ValueError)."""
        regions = []
        for item in image:
            try:
                gpa, size, measure = item
            except (TypeError, ValueError):
                raise TypeError(f"image region {item!r} must be a (gpa, size, measure) tuple") from None
            if (type(gpa) is not int or type(size) is not int or gpa < 0 or size <= 0 or (gpa | size) & (PAGE_SIZE - 1)
                    or gpa + size > _U64_LIMIT):
                raise ValueError(f"image region {item!r} must be (gpa, size, measure) with 4 KiB aligned "
                                 "gpa and size > 0, below 2**64")
            regions.append((gpa, size, bool(measure)))
        return regions

    # -- exits -----------------------------------------------------------------------------------

    def handle_exit(self, vcpu: Vcpu, result: GuestOpResult | AccessResult | FaultResult) -> ExitResult:
        """Answer one exit to userspace (``kvm_cpu_exec``); the :class:`pkvm.ExitResult` is
        truthy iff the vCPU may run on, and says what was done or why it was refused.

        ``result`` is a :class:`pkvm.kvm.exits.GuestOpResult` or a :class:`pkvm.AccessResult` /
        :class:`pkvm.FaultResult` with ``ret == "exit"``. After a truthy return the caller
        resumes the guest (``vcpu.run()`` for a guest instruction, or repeats the access).
        """
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        sched = vm._sched
        lat = sched.latency_begin() if sched is not None else None
        prev = vm._set_actor("vmm")  # vm.acting("vmm")
        try:
            if type(result) is GuestOpResult and result.exit_reason == KVM_EXIT_HYPERCALL:
                # every page-state change's exit: _handle_exit's answer without its dispatch
                hc = result.hypercall
                if hc is not None and hc.nr == KVM_HC_MAP_GPA_RANGE:
                    return self._map_gpa_range(hc)
            return self._handle_exit(result)
        finally:
            if sched is not None:
                sched.latency_end("exit", lat)
            vm._set_actor(prev)

    def _map_gpa_range(self, hc: Hypercall) -> ExitResult:
        """The answer to a ``KVM_HC_MAP_GPA_RANGE`` exit (``kvm_handle_hc_map_gpa_range``)."""
        private = bool(hc.args[2] & KVM_MAP_GPA_RANGE_ENCRYPTED)
        gpa, size = hc.gpa, hc.size
        ret = self._convert_memory(gpa, size, private)  # convert_memory: "vmm" acts already
        # QEMU never writes hypercall.ret (KVM presets it to 0): kvm_handle_hc_map_gpa_range
        # returns kvm_convert_memory's result, and a failure ends kvm_cpu_exec's loop, which
        # stops the VM (RUN_STATE_INTERNAL_ERROR). The guest never reads a failure.
        return ExitResult._lazy(ret == 0, "KVM_HC_MAP_GPA_RANGE", KVM_EXIT_HYPERCALL, -ret, _converted,
                                (ret, gpa, size, private, ": the VM stops (RUN_STATE_INTERNAL_ERROR)",
                                 self.last_failure))

    def _handle_exit(self, result: GuestOpResult | AccessResult | FaultResult) -> ExitResult:
        try:
            reason = result.exit_reason
        except AttributeError:
            raise TypeError(f"result must be a GuestOpResult, AccessResult or FaultResult, not "
                            f"{type(result).__name__}") from None
        hc = getattr(result, "hypercall", None)
        if reason == KVM_EXIT_HYPERCALL and hc is not None:
            if hc.nr != KVM_HC_MAP_GPA_RANGE:
                # kvm_handle_hypercall: -EINVAL stops the vCPU
                return ExitResult(False, "KVM_EXIT_HYPERCALL", reason, errno.EINVAL,
                                  f"hypercall {hc.nr} is not KVM_HC_MAP_GPA_RANGE: the vCPU stops")
            return self._map_gpa_range(hc)
        if reason == KVM_EXIT_MEMORY_FAULT and result.memory_fault is not None:
            gpa, size, flags = result.memory_fault
            if result.errno != errno.EFAULT:
                err = result.errno or 0
                return ExitResult(False, "KVM_EXIT_MEMORY_FAULT", reason, err,
                                  f"memory fault at gpa {gpa:#x} with errno "
                                  f"{errno.errorcode.get(err, err)}: fatal for the vCPU")
            if flags & ~KVM_MEMORY_EXIT_FLAG_PRIVATE:
                return ExitResult(False, "KVM_EXIT_MEMORY_FAULT", reason, 0,
                                  f"memory fault at gpa {gpa:#x} with unknown flags {flags:#x}")
            private = bool(flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)
            ret = self._convert_memory(gpa, size, private)  # as above
            return ExitResult._lazy(ret == 0, "KVM_EXIT_MEMORY_FAULT", reason, -ret, _converted,
                                    (ret, gpa, size, private, ": the VM stops (RUN_STATE_INTERNAL_ERROR)",
                                     self.last_failure))
        return ExitResult(False, "exit", reason, 0,
                          f"exit reason {reason} ({result.ret}) is not one the VMM answers")

    def convert_memory(self, gpa: int, size: int, to_private: bool) -> int:
        """``kvm_convert_memory``: convert ``[gpa, gpa + size)``; return 0 or a negative
        errno (see the module docstring for the steps and QEMU's special cases). From an event
        callback of the VM it raises ``KvmError(EDEADLK)`` instead, counting nothing."""
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        prev = vm._actor  # vm.acting("vmm"); no call when the VMM acts already
        if prev != "vmm":
            vm._set_actor("vmm")
        try:
            return self._convert_memory(gpa, size, to_private)
        finally:
            if vm._actor != prev:
                vm._set_actor(prev)

    def _convert_memory(self, gpa: int, size: int, to_private: bool) -> int:
        vm = self.vm
        self.conversions += 1
        # (a size of 2**64 fits no u64: hwaddr in QEMU, the ioctl's size in KVM)
        if (type(gpa) is not int or type(size) is not int or size <= 0 or gpa < 0 or (gpa | size) & (PAGE_SIZE - 1)
                or size >= _U64_LIMIT or gpa + size > _U64_LIMIT):
            return self._failed(-errno.EINVAL, "the range is not a page-aligned, non-empty u64 range")
        start, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        key = vm._slot_maps[0].get(start)  # vm._slot_at(start)
        if not key:
            if not to_private:
                return 0
            return self._failed(-errno.EINVAL, f"gpa {gpa:#x} is in no memslot")
        slot = vm._slots[key - 1]
        if slot.gmem is None:
            return self._failed(-errno.EINVAL, f"memslot {slot.id} has no guest_memfd")
        try:
            # vm.set_memory_attributes, without its Python frame
            vm._attr_path.ioctl(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE if to_private else 0, 0)
        except KvmError as exc:
            return self._failed(-exc.errno, f"KVM_SET_MEMORY_ATTRIBUTES: {exc}")
        self.gfns_converted += end - start
        if self.discard:
            for s, e, key in vm._slot_maps[0].ranges(start, end):
                piece = vm._slots[key - 1]
                if to_private:
                    self._discard_shared(piece, s, e)
                else:
                    self._punch(piece, s, e)
        return 0

    def _discard_shared(self, piece: Memslot, s: int, e: int) -> None:
        """``ram_block_discard_range`` of the shared backing (``MADV_DONTNEED``)."""
        vm = self.vm
        if vm.shared_backing in _NO_DISCARD:
            return
        hs = piece._ugfn - piece.base_gfn  # piece.hva_page(gfn) is gfn + hs
        # vm._madvise_dontneed(s + hs, e + hs), without its Python frame: with KVM's MMU
        # notifier (kvm_mmu_notifier_invalidate_range_start)
        vm._attr_path.madvise_dontneed(vm._shared, s + hs, e + hs)
        if vm._subs is not None:
            vm._emit("madvise", s, e, None, e - s, 0, None,
                     (piece.hva_page(s) << PAGE_SHIFT, (e - s) << PAGE_SHIFT, MADV_DONTNEED))

    def _punch(self, piece: Memslot, s: int, e: int) -> None:
        """``ram_block_discard_guest_memfd_range``: punch the guest_memfd hole."""
        gmem = piece.gmem
        if gmem is not None and piece.gmem_file is not None:
            off = piece.gmem_pgoff - piece.base_gfn
            if type(gmem) is GuestMemfd and not gmem.closed:
                # GuestMemfd.fallocate(PUNCH_HOLE | KEEP_SIZE, ...) after its checks: a range of
                # the slot's binding is non-negative, 4 KiB aligned, non-empty and far below
                # MAX_LFS_FILESIZE, and the callers refused a call from an event callback
                gmem._punch_checked(s + off, e - s)
            else:
                gmem.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (s + off) << PAGE_SHIFT,
                               (e - s) << PAGE_SHIFT)

    def discard_ram(self, gpa: int, size: int) -> None:
        """Give ``[gpa, gpa + size)`` back to the host (a balloon inflate): discard both
        backings — punch the guest_memfd hole (the private pages, as on a to-shared
        conversion) and drop the shared backing. The attributes stay; a later guest access
        faults the memory in again. A what-if: QEMU's virtio-balloon drops only the shared
        backing (``balloon_inflate_page`` → ``ram_block_discard_range``) and leaves the
        guest_memfd pages allocated (docs/kernel-semantics.md §7.4).

        Raises:
            ValueError: not a non-empty 4 KiB aligned range.
            KvmError: as ``fallocate``.
        """
        if (type(gpa) is not int or type(size) is not int or gpa < 0 or size <= 0 or (gpa | size) & (PAGE_SIZE - 1)
                or size >= _U64_LIMIT or gpa + size > _U64_LIMIT):
            raise ValueError(f"[{gpa!r}, +{size!r}) must be a non-empty, 4 KiB aligned range below 2**64")
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        prev = vm._actor  # vm.acting("vmm"), as in convert_memory
        if prev != "vmm":
            vm._set_actor("vmm")
        try:
            start, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
            for s, e, key in vm._slot_maps[0].ranges(start, end):
                piece = vm._slots[key - 1]
                self._punch(piece, s, e)
                self._discard_shared(piece, s, e)
        finally:
            if vm._actor != prev:
                vm._set_actor(prev)

    def _failed(self, ret: int, why: str) -> int:
        self.failed_conversions += 1
        self.last_failure = why
        return ret
