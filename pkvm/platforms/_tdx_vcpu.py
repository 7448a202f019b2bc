"""A TD's vCPU: the TDX EPT-violation handler and the guest's MapGPA and ACCEPT (kernel-semantics.md §6.4,
§7.2, §7.5).

:class:`TdxVcpu` refines :class:`pkvm.Vcpu`:

* it only runs once the TD is finalized (``KVM_RUN`` fails with EINVAL before);
* an access walks the root of its type: a private access needs a mirror leaf whose S-EPT page
  is MAPPED (accepted), a shared access a direct leaf;
* ``tdx_handle_ept_violation``: a private access to a PENDING page ("guest access before
  accepting") kills the VM; any other private fault is handled as a write, page by page (the
  guest re-executes after each fault, so private faults are never batched);
* :meth:`TdxVcpu.map_gpa` is ``TDG.VP.VMCALL<MapGPA>`` (``tdx_map_gpa`` /
  ``__tdx_map_gpa`` / ``tdx_complete_vmcall_map_gpa``), :meth:`TdxVcpu.accept` is
  ``TDG.MEM.PAGE.ACCEPT`` (the TDX module's S-EPT walk, with EPT violations handled by KVM).

:meth:`TdxVcpu._accept_bulk` is the range-compressed form of the Linux guest's accept loop
(``tdx_accept_memory``: 1G, then 2M, then 4K per aligned chunk) over a run of pages in one
S-EPT state; it is what lets a 1 TiB TD be accepted in O(runs).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm.constants import (
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    PAGE_SHIFT,
    RETRY_LIMIT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    TDVMCALL_STATUS_ALIGN_ERROR,
    TDVMCALL_STATUS_INVALID_OPERAND,
    TDVMCALL_STATUS_RETRY,
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED,
    TDVMCALL_STATUS_SUCCESS,
    TDX_OPERAND_ID_RCX,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
    TDX_SUCCESS,
)
from pkvm.errors import InternalInvariantError, KvmError
from pkvm.kvm.exits import GuestOpResult, Hypercall, begin_insn, hypercall_exit
from pkvm.kvm.mmu import SPTE_PRIVATE, SPTE_WRITABLE, FaultResult, run_fault
from pkvm.kvm.vm import Vcpu, _u64
from pkvm.platforms._tdx_sept import MAPPED, PENDING, STATE_MASK, leaf_level, leaf_value

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.platforms.tdx import TdxVm

#: ``TDX_MAP_GPA_MAX_LEN``: KVM forwards a MapGPA to userspace in chunks of at most 2 MiB.
TDX_MAP_GPA_MAX_LEN = 2 << 20
_LEVEL_SHIFT = (0, 0, 9, 18)


class TdxVcpu(Vcpu):
    """``struct vcpu_tdx``. ``pending_interrupts`` is a test hook: while it is > 0, a MapGPA
    that still has chunks to do completes with ``TDVMCALL_STATUS_RETRY`` (and one interrupt
    is delivered, decrementing it), as when KVM sees a pending interrupt between chunks."""

    __slots__ = ("pending_interrupts", "map_gpa_next", "map_gpa_end")

    def __init__(self, vm, vcpu_id: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vm, vcpu_id)
        self.pending_interrupts = 0
        self.map_gpa_next = 0
        self.map_gpa_end = 0

    @property
    def _td(self) -> TdxVm:
        return self.vm.tdx  # type: ignore[attr-defined, no-any-return]

    def _check_runnable(self) -> None:
        """``tdx_vcpu_pre_run``: a TD vCPU runs only after ``KVM_TDX_FINALIZE_VM``."""
        if not self._td.runnable:
            raise KvmError(errno.EINVAL, "KVM_RUN: the TD is not finalized; call vm.tdx.finalize_vm() first")

    # -- KVM_RUN entry points of the base class ----------------------------------------------

    def page_fault(self, gpa: int, *, private: bool, write: bool = False) -> FaultResult:
        """An EPT violation on ``gpa`` (``| shared bit`` when ``private=False``); see
        :meth:`pkvm.Vcpu.page_fault`. A private fault on a PENDING page kills the VM."""
        self.vm._check_alive()
        self._check_runnable()
        return super().page_fault(gpa, private=private, write=write)

    def _fault_entry_check(self) -> None:
        """What :meth:`page_fault` checks before the fault: a live VM, then a finalized TD."""
        self.vm._check_alive()
        self._check_runnable()

    def access(self, gpa: int, *, private: bool, write: bool = False, size: int = 4096):  # type: ignore[no-untyped-def]
        """A guest access through the root of its type; see :meth:`pkvm.Vcpu.access`."""
        self.vm._check_alive()
        self._check_runnable()
        return super().access(gpa, private=private, write=write, size=size)

    @property
    def guest_state_protected(self) -> bool:
        """Always True: ``tdx_vcpu_create`` (arch/x86/kvm/vmx/tdx.c) sets it for every TD vCPU
        (only a TD with the DEBUG attribute would be readable, and KVM accepts no such TD)."""
        return True

    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0, *, long_mode: bool = True) -> GuestOpResult:
        """A KVM hypercall through ``TDG.VP.VMCALL`` (``tdx_emulate_vmcall``).

        A TD's guest state is protected, so ``is_64_bit_hypercall`` is true whatever
        ``long_mode`` says (arch/x86/kvm/x86.h): the arguments keep their high bits, the exit
        has ``KVM_EXIT_HYPERCALL_LONG_MODE`` and the whole 64-bit ``ret`` reaches r10."""
        if type(long_mode) is not bool:
            raise TypeError("long_mode must be a bool")
        self.vm._check_alive()
        self._check_runnable()
        return super().hypercall(nr, a0, a1, a2, long_mode=True)

    def _fault(self, gfn: int, limit: int, private: bool, write: bool) -> tuple[int, FaultResult]:
        """``tdx_handle_ept_violation`` (§6.4)."""
        if private:
            if self._td.sept.leaves.get(gfn) & STATE_MASK == PENDING:
                return 1, self._kill_unaccepted(gfn)
            write = True       # private pages are always RWX: handle the fault as a write
            limit = gfn + 1    # the guest re-executes after every fault
        return super()._fault(gfn, limit, private, write)

    def _kill_unaccepted(self, gfn: int) -> FaultResult:
        """"Guest access before accepting": ``kvm_vm_dead``, ``KVM_RUN`` returns -EIO."""
        vm = self.vm
        vm._charge("vmexit", 1)
        vm._charge("userspace_exit", 1)
        vm._kill(f"Guest access before accepting {gfn << PAGE_SHIFT:#x} on vCPU {self.id}")
        return FaultResult("exit", errno=errno.EIO)

    def _usable_end(self, gfn: int, stop: int, spte: int, private: bool, write: bool) -> int:
        """The walk uses the root of the access type; a private page must also be accepted."""
        if bool(spte & SPTE_PRIVATE) != private:
            return gfn
        if not private:
            return stop if not write or spte & SPTE_WRITABLE else gfn
        leaves = self._td.sept.leaves
        g = gfn
        while g < stop:
            _s, e, v = leaves.run_at(g)
            if v & STATE_MASK != MAPPED:
                return g
            g = e
        return stop

    # -- TDG.VP.VMCALL<MapGPA> (§7.2) ---------------------------------------------------------

    def map_gpa(self, gpa: int, size: int) -> GuestOpResult:
        """``TDG.VP.VMCALL<MapGPA>(gpa, size)``: ask to convert ``[gpa, gpa + size)``; the
        shared bit of ``gpa`` selects the direction (set: to shared).

        KVM checks, in order: ``KVM_CAP_EXIT_HYPERCALL`` for ``KVM_HC_MAP_GPA_RANGE``
        (else ``TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED``); no wrap-around, a non-empty range of
        legal GPAs (pkvm: below ``2**gpaw``; the kernel's bound is the vCPU's MAXPHYADDR, see
        docs/tdx.md) on one side of the shared bit (else
        ``INVALID_OPERAND``); 4K alignment (else ``ALIGN_ERROR``); r11 = ``gpa`` on these
        errors. Then it exits to userspace once per chunk of at most 2 MiB
        (``KVM_EXIT_HYPERCALL``: ``KVM_HC_MAP_GPA_RANGE``, gpa without the shared bit, pages,
        ``ENCRYPTED`` or ``DECRYPTED``). Answer each exit, then :meth:`run`: a nonzero
        ``hypercall.ret`` ends it with ``INVALID_OPERAND`` and r11 = the chunk's gpa; a
        pending interrupt between chunks ends it with ``RETRY`` and r11 = the next gpa; the
        last chunk completes with ``SUCCESS``. ``status`` is r10, ``value`` r11.

        Cost: ``map_gpa`` for a call that exits (its first exit included), ``userspace_exit``
        per further chunk, ``td_vmm_exit`` for a call KVM completes without exiting.

        Raises:
            KvmError: EIO (dead VM), EINVAL (TD not finalized), EBUSY (an exit is pending).
            TypeError / ValueError: ``gpa`` / ``size`` are not u64 ints.
        """
        gpa, size = _u64("gpa", gpa), _u64("size", size)
        begin_insn(self)
        self._check_runnable()
        vm, td = self.vm, self._td
        vm._stats["tdvmcall_map_gpa"] += 1
        if not vm.hypercall_exit_mask & (1 << KVM_HC_MAP_GPA_RANGE):
            return self._vmcall_done(TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, gpa)
        end = gpa + size
        limit = 1 << td.gpaw
        if (end > (1 << 64) - 1 or end <= gpa or gpa >= limit or end - 1 >= limit
                or td.is_private_gpa(gpa) != td.is_private_gpa(end - 1)):
            return self._vmcall_done(TDVMCALL_STATUS_INVALID_OPERAND, gpa)
        if (gpa | size) & ((1 << PAGE_SHIFT) - 1):
            return self._vmcall_done(TDVMCALL_STATUS_ALIGN_ERROR, gpa)
        self.map_gpa_next, self.map_gpa_end = gpa, end
        vm._charge("map_gpa", 1)
        return self._map_gpa_exit(first=True)

    def _vmcall_done(self, status: int, r11: int | None) -> GuestOpResult:
        """A TDVMCALL KVM completes without exiting to userspace."""
        self.vm._charge("td_vmm_exit", 1)
        return GuestOpResult("done", status=status, value=r11)

    def _map_gpa_exit(self, first: bool) -> GuestOpResult:
        """``__tdx_map_gpa``: exit to userspace with the next chunk."""
        shared = 1 << self._td.shared_bit
        gpa = self.map_gpa_next
        size = min(self.map_gpa_end - gpa, TDX_MAP_GPA_MAX_LEN)
        attrs = KVM_MAP_GPA_RANGE_DECRYPTED if gpa & shared else KVM_MAP_GPA_RANGE_ENCRYPTED
        hc = Hypercall(KVM_HC_MAP_GPA_RANGE, (gpa & ~shared, size >> PAGE_SHIFT, attrs), 0,
                       KVM_EXIT_HYPERCALL_LONG_MODE)
        if not first:
            self.vm._charge("userspace_exit", 1)
        return hypercall_exit(self, hc, lambda: self._complete_map_gpa(hc))

    def _complete_map_gpa(self, hc: Hypercall) -> GuestOpResult:
        """``tdx_complete_vmcall_map_gpa``, run by the next ``KVM_RUN``."""
        if hc.ret:
            return GuestOpResult("done", status=TDVMCALL_STATUS_INVALID_OPERAND, value=self.map_gpa_next)
        self.map_gpa_next += TDX_MAP_GPA_MAX_LEN
        if self.map_gpa_next >= self.map_gpa_end:
            return GuestOpResult("done", status=TDVMCALL_STATUS_SUCCESS)
        if self.pending_interrupts:
            self.pending_interrupts -= 1  # delivered when the guest resumes
            return GuestOpResult("done", status=TDVMCALL_STATUS_RETRY, value=self.map_gpa_next)
        return self._map_gpa_exit(first=False)

    # -- TDG.MEM.PAGE.ACCEPT (§6.2, §7.5) -------------------------------------------------------

    def accept(self, gpa: int, level: int) -> GuestOpResult:
        """``TDG.MEM.PAGE.ACCEPT(gpa, level)``: accept the private page(s) at ``gpa``.

        The TDX module walks the S-EPT down to ``level`` (Table 8.2 of its ABI, as quoted on
        the kvm list): a PENDING leaf of that size becomes MAPPED (``TDX_SUCCESS``; the page is
        initialized under the TD's key); a MAPPED one gives ``TDX_PAGE_ALREADY_ACCEPTED``; a
        page table at ``level`` (the host mapped smaller) or a MAPPED larger leaf gives
        ``TDX_PAGE_SIZE_MISMATCH``; a missing entry is an EPT violation: KVM handles a
        private fault (``PAGE.AUG``) and the TDCALL is retried. A larger PENDING leaf (huge
        pages only) is an accept-size fault: KVM DEMOTEs it, sets the chunk's guest-inhibit
        bit, and the TDCALL is retried. A misaligned or shared ``gpa`` gives
        ``TDX_OPERAND_INVALID``. If KVM has to exit to userspace (e.g. the gpa is not PRIVATE:
        a ``KVM_EXIT_MEMORY_FAULT`` implicit conversion), the result is that exit and
        :meth:`run` re-executes the TDCALL. ``status`` is the TDCALL's rax.

        Cost: ``tdx_accept_4k`` per 4K page accepted; a failing TDCALL is one TD exit handled
        by the TDX module (``vmexit``); EPT violations are faults (``npf_fault``).

        Raises:
            KvmError: EIO (dead VM), EINVAL (TD not finalized), EBUSY (an exit is pending).
            TypeError / ValueError: ``gpa`` not a u64 int; ``level`` not ``PG_LEVEL_4K`` /
                ``_2M`` / ``_1G``.
        """
        gpa = _u64("gpa", gpa)
        if type(level) is not int or level not in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G):
            raise ValueError(f"level={level!r} must be PG_LEVEL_4K, PG_LEVEL_2M or PG_LEVEL_1G")
        begin_insn(self)
        self._check_runnable()
        return self._accept(gpa, level)

    def _accept_status(self, status: int, faults: int) -> GuestOpResult:
        vm = self.vm
        vm._stats["tdcall_accept"] += 1
        vm._charge("vmexit", 1)
        return GuestOpResult("done", status=status, faults=faults)

    def _accept(self, gpa: int, level: int) -> GuestOpResult:
        vm, td = self.vm, self._td
        sept = td.sept
        npages = 1 << _LEVEL_SHIFT[level]
        if gpa & ((npages << PAGE_SHIFT) - 1) or not td.is_private_gpa(gpa) or gpa >> td.gpaw:
            return self._accept_status(TDX_OPERAND_INVALID | TDX_OPERAND_ID_RCX, 0)
        gfn = gpa >> PAGE_SHIFT
        faults = 0
        loop = "EPT violation refault"
        attempts = 0
        while attempts < RETRY_LIMIT:  # the TDCALL re-executes after each EPT violation
            attempts += 1
            v = sept.leaves.get(gfn)
            if v:
                lvl, st = leaf_level(v), v & STATE_MASK
                if lvl == level and st == PENDING:
                    sept.leaves.assign(gfn, gfn + npages, leaf_value(MAPPED, level))
                    vm._stats["tdcall_accept"] += 1
                    vm._stats["tdx_accepts_4k"] += npages
                    vm._charge("tdx_accept_4k", npages)
                    return GuestOpResult("done", status=TDX_SUCCESS, faults=faults)
                if lvl == level and st == MAPPED:
                    return self._accept_status(TDX_PAGE_ALREADY_ACCEPTED | (level - 1), faults)
                if lvl > level and st == PENDING:
                    faults += 1
                    if self._accept_size_fault(gfn, lvl):
                        continue
                    return GuestOpResult("exit", errno=errno.EIO, faults=faults)  # the split bugged the VM
                if lvl > level and st != MAPPED:
                    raise InternalInvariantError(f"ACCEPT of gfn {gfn:#x} hit a {sept.state(gfn)} S-EPT leaf")
                return self._accept_status(TDX_PAGE_SIZE_MISMATCH | (max(lvl, level) - 1), faults)
            if level > PG_LEVEL_4K and sept.has_table(level - 1, gfn):
                return self._accept_status(TDX_PAGE_SIZE_MISMATCH | (level - 1), faults)
            # EPT violation carrying the accept level: KVM maps the page, the TDCALL retries.
            if td.huge_pages and level == PG_LEVEL_4K:
                sept.guest_inhibit.assign(gfn >> 9, (gfn >> 9) + 1, 1)
            td._accept_level = level
            try:
                n, r = self._fault(gfn, gfn + 1, True, True)
            finally:
                td._accept_level = 0
            faults += n
            if r.ret == "retry" and vm._sched is not None and vm._sched.retry_fault(gfn):
                # another thread's invalidation: faulted again after it, not counted
                attempts -= 1
                continue
            if r.ret in ("fixed", "spurious", "retry"):
                # RET_PF_RETRY: e.g. a SEAMCALL that stays TDX_OPERAND_BUSY.
                loop = "RET_PF_RETRY (EPT violation of TDG.MEM.PAGE.ACCEPT)" if r.ret == "retry" else loop
                continue
            if not vm.vm_dead:
                self._resume = lambda: self._accept(gpa, level)  # the TDCALL re-executes
            return GuestOpResult("exit", exit_reason=r.exit_reason, memory_fault=r.memory_fault,
                                 errno=r.errno, faults=faults)
        return GuestOpResult("retry_loop", value=gpa, faults=faults, retries=RETRY_LIMIT, loop=loop)

    def _accept_size_fault(self, gfn: int, mapped_level: int) -> bool:
        """Beyond upstream (huge pages): the guest accepts at 4K inside a PENDING 2M leaf. The
        TDX module raises an EPT violation carrying the accept level; KVM sets the chunk's
        guest-inhibit bit, DEMOTEs the leaf (BLOCK, TRACK, DEMOTE) and returns RET_PF_RETRY.
        Returns False if a SEAMCALL of the split failed (the VM is then bugged: -EIO)."""
        vm, td = self.vm, self._td
        st = vm._stats
        st["tdx_accept_size_faults"] += 1
        st["pf_taken"] += 1
        st["pf_retry"] += 1
        vm._charge("npf_fault", 1)
        if vm._subs is not None:
            vm._emit("retry", gfn, gfn + 1, "tdx_accept_size", 1, 0, None, (self.id, mapped_level))
        td.sept.guest_inhibit.assign(gfn >> 9, (gfn >> 9) + 1, 1)
        if vm._platform.split_external_spte(vm, gfn, mapped_level):  # tdx_split_external_spte
            return False
        vm._mmu.split_to(gfn, mapped_level - 1)
        return True

    # -- the Linux accept loop, range-compressed -------------------------------------------------

    def _accept_bulk(self, gfn: int, end: int) -> int:
        """Run ``tdx_accept_memory`` from ``gfn`` (the request ends at ``end``) over the
        longest stretch whose outcome is the same for every page; return the pages done (0:
        take the instruction-by-instruction path).

        Upstream KVM maps private memory at 4K, so on a run of FREE or PENDING 4K pages the
        loop does, for each page ``p``: a 1G attempt if ``p`` is 1G-aligned with 1G left and a
        2M attempt if 2M-aligned with 2M left, each ending in ``TDX_PAGE_SIZE_MISMATCH`` (the
        EPT violation of the first attempt on a FREE page maps ``p`` at 4K, which creates the
        tables the attempts then find), then a successful 4K accept; a FREE page takes exactly
        one EPT violation (a ``PAGE.AUG``). The FREE pages' faults are one batched fault.
        """
        vm, td = self.vm, self._td
        if td.huge_pages or td.seamcalls.armed("sept_add", "aug"):
            return 0
        leaves = td.sept.leaves
        _s, e, v = leaves.run_at(gfn)
        e = min(e, end)
        st = v & STATE_MASK
        if st == 0:
            if vm._mmu.sptes.get(gfn):
                return 0
            e = self._private_fault_fixes(gfn, e)
            if e == gfn:
                return 0  # the fault may exit: take the instruction path, which stops there
            f, r = run_fault(self, gfn, e, True, True)
            if r.ret == "retry" and vm._sched is not None:
                vm._sched.retry_fault(gfn)  # raced with another thread: take the instruction path
                return 0
            if r.ret == "spurious" and vm._sched is not None:
                # another vCPU installed the leaf of gfn while this fault ran (the guest
                # accepts a range another vCPU accepts too): the TDCALL re-executes and finds
                # that leaf, on the instruction path
                return 0
            if r.ret != "fixed":
                raise InternalInvariantError(f"gfn {gfn:#x}: a private fault that had to be fixed returned {r}")
            return self._accept_run(gfn, f.end, end)
        if st == PENDING and leaf_level(v) == PG_LEVEL_4K:
            return self._accept_run(gfn, e, end)
        return 0

    def _private_fault_fixes(self, gfn: int, end: int) -> int:
        """The end of a stretch from ``gfn`` on which a private fault is certainly fixed (the
        checks of ``kvm_mmu_faultin_pfn`` pass and host memory suffices), or ``gfn``."""
        vm = self.vm
        _s, a_end, attr = vm._attrs.run_at(gfn)
        slot = vm._slot_at(gfn)
        if (not attr & KVM_MEMORY_ATTRIBUTE_PRIVATE or slot is None or slot.invalid or slot.gmem is None
                or slot.gmem_file is None or vm.mmu_invalidate_in_progress):
            return gfn
        off = slot.gmem_pgoff - slot.base_gfn
        _bs, b_end, key = slot.gmem.bindings.run_at(gfn + off)
        if key != slot.key + 1:
            return gfn
        end = min(end, a_end, slot.end_gfn, b_end - off)
        _fs, f_end, folio = slot.gmem.folios.run_at(gfn + off)
        if not folio:
            end = min(end, f_end - off)
            if vm._policy.gmem_max_order or not vm._hostmem.can_alloc(end - gfn):
                return gfn
        return end

    def _accept_run(self, gfn: int, stop: int, end: int) -> int:
        """Accept the PENDING 4K pages ``[gfn, stop)`` as the Linux loop would (see
        :meth:`_accept_bulk`); ``end`` is the end of the whole request."""
        vm, td = self.vm, self._td
        n = stop - gfn
        mismatches = 0
        for shift in (9, 18):
            size = 1 << shift
            first = (gfn + size - 1) & ~(size - 1)       # first aligned position >= gfn
            last = min(stop - 1, end - size)             # attempts need a whole chunk left
            if last >= first:
                mismatches += ((last - first) >> shift) + 1
        td.sept.leaves.assign(gfn, stop, leaf_value(MAPPED, PG_LEVEL_4K))
        st = vm._stats
        st["tdcall_accept"] += n + mismatches
        st["tdx_accepts_4k"] += n
        vm._charge("tdx_accept_4k", n)
        if mismatches:
            vm._charge("vmexit", mismatches)
        return n
