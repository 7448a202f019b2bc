"""An SNP guest's vCPU: the hardware RMP check on accesses, PVALIDATE and page-state changes
(docs/kernel-semantics.md §5.6, §7.1, §7.8).

:class:`SnpVcpu` refines :class:`pkvm.Vcpu`:

* **Access-time RMP check** (§5.6, unverified; pkvm's rules, checked in this order on
  a present NPT leaf):

  1. a C=0 (shared) access to a page assigned in the RMP -> #NPF with the RMP bit;
  2. a C=1 (private) access to a page not assigned to this ASID at this GPA, or whose RMP entry
     is larger or smaller than the NPT leaf (KVM's comment: an NPT mapping smaller than the 2M
     RMP entry faults) -> #NPF with the RMP bit;
  3. a C=1 access to an assigned page with Validated = 0 -> **#VC** in the guest, not an #NPF:
     KVM never sees it; :meth:`access` stops with ``ret == "vc"`` (``snp_vc`` counts them).

  An #NPF with the RMP bit runs the normal fault path (which turns a private/shared mismatch into
  ``KVM_EXIT_MEMORY_FAULT``, §5.6 step 1) and then ``sev_handle_rmp_fault`` (PSMASH + zap, or
  spurious). If it changed nothing (the entry is still wrong and the leaf still there) the
  hardware would fault again forever — the guest "loops on #NPF" until some other thread fixes
  the RMP (M. Roth's description of the RFC v8 race, §7.7). The synchronous driver has no other
  thread, so the access stops with ``ret == "rmp_loop"``.
* :meth:`SnpVcpu.pvalidate` — ``PVALIDATE``; :meth:`SnpVcpu.pvalidate_range` the range form the
  guest flows use (2M where aligned, 512 x 4K after ``FAIL_SIZEMISMATCH``).
* :meth:`SnpVcpu.psc_msr` — the GHCB MSR protocol page-state change; :meth:`SnpVcpu.psc` — the
  GHCB protocol (``SVM_VMGEXIT_PSC`` with a :class:`PscDesc`), both producing
  ``KVM_HC_MAP_GPA_RANGE`` hypercall exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkvm._core import (
    snp_psc_begin,
    snp_psc_runs,
    snp_pv_batch_end,
    snp_pv_fault_stop,
    snp_pval_count,
    snp_pvalidate_4k_run,
    snp_pvalidate_insn,
    snp_pvalidate_range,
    snp_usable_end,
)
from pkvm.constants import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    RETRY_LIMIT,
)
from pkvm.host.hostmem import decode_delta
from pkvm.kvm.exits import GuestOpResult, Hypercall, begin_insn, hypercall_exit
from pkvm.kvm.mmu import SPTE_PRIVATE, FaultResult, spte_level
from pkvm.kvm.vm import Vcpu, _u64
from pkvm.platforms.snp_constants import (
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_SIZEMISMATCH,
    PVALIDATE_NPF_RMP,
    PVALIDATE_NPF_SIZEM,
    PVALIDATE_SUCCESS,
    RMP_PAGES_2M,
)

#: GHCB MSR protocol (``arch/x86/include/asm/sev-common.h``, §7.1).
GHCB_MSR_PSC_REQ = 0x014
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_PSC_RESP_ERROR = 0x015 | (1 << 63)
#: ``SNP_PAGE_STATE_*`` operations of a PSC entry.
SNP_PAGE_STATE_PRIVATE = 1
SNP_PAGE_STATE_SHARED = 2
SNP_PAGE_STATE_PSMASH = 3
SNP_PAGE_STATE_UNSMASH = 4
#: The VMGEXIT exit code of a GHCB page-state change, and the GHCB MSR protocol request code.
SVM_VMGEXIT_PSC = 0x80000010
GHCB_MSR_PSC_REQ = 0x014

#: ``sw_exit_info_2`` codes of ``SVM_VMGEXIT_PSC``.
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
#: Entries a PSC buffer may index (KVM); the Linux guest uses at most ``VMGEXIT_PSC_MAX_ENTRY``.
VMGEXIT_PSC_MAX_COUNT = 253
VMGEXIT_PSC_MAX_ENTRY = 64



@dataclass(slots=True)
class PscEntry:
    """One ``struct psc_entry``: ``cur_page`` pages of it done, ``gfn``, ``op``, ``huge`` (2M)."""

    gfn: int
    op: int
    huge: bool = False
    cur_page: int = 0

    @property
    def npages(self) -> int:
        return RMP_PAGES_2M if self.huge else 1


@dataclass(slots=True)
class PscDesc:
    """``struct snp_psc_desc`` in the GHCB shared buffer: header ``cur_entry`` / ``end_entry``
    and the entries. KVM updates ``cur_entry`` and each entry's ``cur_page`` in place."""

    entries: list[PscEntry] = field(default_factory=list)
    cur_entry: int = 0
    end_entry: int = -1

    @classmethod
    def of(cls, entries: list[PscEntry]) -> PscDesc:
        return cls(list(entries), 0, len(entries) - 1)


def _psc_field(what: str, value: object, bits: int, low: int = 0) -> None:
    if type(value) is not int:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value < 1 << bits:
        raise ValueError(f"{what}={value} does not fit its {bits}-bit field of the GHCB page-state buffer")


def _check_psc_desc(desc: PscDesc) -> None:
    """:meth:`SnpVcpu.psc`'s boundary: the descriptor's fields hold what ``struct
    snp_psc_desc`` can (the walk indexes ``entries`` with them: a negative ``cur_entry`` would
    wrap around the list, a negative ``cur_page`` move the gfn back)."""
    _psc_field("desc.cur_entry", desc.cur_entry, 16)
    _psc_field("desc.end_entry", desc.end_entry, 16, -1)
    if not isinstance(desc.entries, (list, tuple)):
        raise TypeError(f"desc.entries must be a list of PscEntry, not {type(desc.entries).__name__}")
    for i, ent in enumerate(desc.entries):
        if not isinstance(ent, PscEntry):
            raise TypeError(f"desc.entries[{i}] must be a PscEntry, not {type(ent).__name__}")
        _psc_field(f"desc.entries[{i}].gfn", ent.gfn, 40)
        _psc_field(f"desc.entries[{i}].op", ent.op, 4)
        _psc_field(f"desc.entries[{i}].cur_page", ent.cur_page, 12)
        if type(ent.huge) is not bool:
            raise TypeError(f"desc.entries[{i}].huge must be a bool, not {type(ent.huge).__name__}")


class SnpVcpu(Vcpu):
    """An SNP guest's vCPU (module docstring). ``rmp_npf`` is set while KVM handles an #NPF whose
    error code has the RMP bit (read by ``sev_handle_rmp_fault``)."""

    __slots__ = ("_protected", "_rmp_gfn", "_rmp_stop", "rmp_npf", "rmp_stuck")

    def __init__(self, vm, vcpu_id: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vm, vcpu_id)
        self.rmp_npf = False
        #: Set by ``sev_handle_rmp_fault`` when a step it retries gave up: ``(loop, attempts)``.
        self.rmp_stuck: tuple[str, int] | None = None
        self._rmp_stop: tuple[int, str] | None = None
        self._rmp_gfn = -1  # the gfn of the last RMP #NPF
        self._protected = False  # set by SNP_LAUNCH_FINISH (pkvm.platforms._snp_launch)

    @property
    def guest_state_protected(self) -> bool:
        """Whether ``SNP_LAUNCH_FINISH`` encrypted this vCPU's save area
        (``snp_launch_update_vmsa``, arch/x86/kvm/svm/sev.c, covers the vCPUs that exist then;
        one created later stays unprotected)."""
        return self._protected

    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0, *, long_mode: bool = True) -> GuestOpResult:
        """A KVM hypercall from the SNP guest (:meth:`pkvm.Vcpu.hypercall`). Once
        ``SNP_LAUNCH_FINISH`` has encrypted this vCPU's save area (``snp_launch_update_vmsa``
        sets its ``guest_state_protected``), KVM cannot read the guest's mode and
        ``is_64_bit_hypercall`` is true whatever ``long_mode`` says (arch/x86/kvm/x86.h): the
        arguments keep their high bits and the whole 64-bit answer reaches RAX. Before the
        launch finishes (which pkvm lets a guest run in), and on a vCPU created after it,
        ``long_mode`` is honoured."""
        if type(long_mode) is not bool:
            raise TypeError("long_mode must be a bool")
        if self._protected:
            long_mode = True
        return super().hypercall(nr, a0, a1, a2, long_mode=long_mode)

    # -- the hardware RMP check ---------------------------------------------------------------

    def _rmp_verdict(self, gfn: int, n: int, spte: int, private: bool) -> tuple[int, str]:
        """The first gfn of ``[gfn, gfn + n)`` (one leaf run ``spte``) the RMP check stops at and
        why (``"npf"`` or ``"vc"``), or ``(gfn + n, "")``. O(log n)."""
        snp = self.vm.snp  # type: ignore[attr-defined]
        rmp = snp._rmp  # snp.rmp, without the property
        d = decode_delta(spte)
        pfn = gfn + d
        if not private:
            bad = rmp.find_eq(pfn, n, assigned=True)
            return (gfn + n, "") if bad == -1 else (bad - d, "npf")
        level = spte_level(spte)
        asid = snp.asid
        if rmp.find_ne(pfn, n, assigned=True, asid=asid, gpa=gfn << PAGE_SHIFT, level=level,
                       validated=True) == -1:
            return gfn + n, ""  # the usual case: every entry passes all three checks below
        npf = rmp.find_ne(pfn, n, assigned=True, asid=asid, gpa=gfn << PAGE_SHIFT)
        lvl = rmp.find_ne(pfn, n if npf == -1 else npf - pfn, level=level)
        if lvl != -1:
            npf = lvl
        vc = rmp.find_ne(pfn, n if npf == -1 else npf - pfn, validated=True)
        if vc != -1:
            return vc - d, "vc"
        if npf != -1:
            return npf - d, "npf"
        return gfn + n, ""

    #: The writable test, then the RMP check (:meth:`_rmp_verdict`; its usual case in the typed
    #: core, pkvm/_snp_guest.pxi); an RMP stop is left in ``_rmp_stop`` for :meth:`_fault`.
    _usable_end = snp_usable_end

    def _batch_end(self, gfn: int, end: int, validated: bool) -> int:
        """The end of the prefix of ``[gfn, end)`` whose private faults can be taken as one
        batch without changing the outcome of the per-page instruction sequence (a guest
        re-executes after every fault; batching is pkvm's shortcut). ``validated=True`` (an
        access, a rescind): every page must already have a guest_memfd page whose RMP entry is
        assigned to this guest at its GPA and validated. ``validated=False`` (a validation):
        no page may be validated yet (pages without a folio or RMP entry qualify: their fault
        creates an unvalidated entry). At least one page. O(k log n) for k folio runs."""
        return snp_pv_batch_end(self.vm, gfn, end, validated)  # the typed core's (pkvm/_snp_guest.pxi)

    _fault_detour = "_rmp_stop"  # one page with no RMP stop pending: the base fault

    def _fault(self, gfn: int, limit: int, private: bool, write: bool) -> tuple[int, FaultResult]:
        stop, self._rmp_stop = self._rmp_stop, None
        if stop is None or stop[0] != gfn:
            if private and limit > gfn + 1:
                limit = self._batch_end(gfn, limit, True)
            return Vcpu._fault(self, gfn, limit, private, write)
        vm = self.vm
        if stop[1] == "vc":
            vm._stats["snp_vc"] += 1
            return 0, FaultResult("vc")
        return self._rmp_npf(gfn, private, write)

    def _loop_kind(self, gfn: int, last: str) -> tuple[str, str]:
        if gfn == self._rmp_gfn:
            return "rmp_loop", "RMP #NPF (sev_handle_rmp_fault)"
        return super()._loop_kind(gfn, last)

    def _rmp_npf(self, gfn: int, private: bool, write: bool) -> tuple[int, FaultResult]:
        """An #NPF with the RMP bit on ``gfn``: the MMU fault path, then the RMP handler. A
        fault that left the leaf and the RMP entry as they were, or whose handler gave up on a
        step it retries (PSMASH ``FAIL_INUSE``, after ``RETRY_LIMIT`` attempts), is reported as
        ``rmp_loop``;
        on the concurrent timeline the vCPU instead keeps faulting until another thread changes
        the RMP (or nothing else runs that could), counted as a race (``rmp_npf_loop``)."""
        faults = loops = 0
        while True:
            n, r = self._rmp_npf_once(gfn, private, write)
            faults += n
            if r.ret != "rmp_loop":
                return faults, r
            sched = self.vm._sched
            if sched is None or not sched.wait_changed("rmp_npf_loop", loops == 0):
                return faults, r
            loops += 1
            # The hardware re-checks the access first: if another thread fixed the RMP entry
            # meanwhile, it completes without another #NPF.
            v = self.vm._mmu.sptes.get(gfn)
            if v and not self._rmp_verdict(gfn, 1, v, private)[1]:
                return faults, FaultResult("spurious", spte_level(v), gfn + decode_delta(v))

    def _rmp_npf_once(self, gfn: int, private: bool, write: bool) -> tuple[int, FaultResult]:
        vm = self.vm
        rmp = vm.snp.rmp  # type: ignore[attr-defined]
        v = vm._mmu.sptes.get(gfn)
        pfn = gfn + decode_delta(v) if v else -1
        before = (v, rmp.lookup(pfn) if v else None)
        self._rmp_gfn = gfn
        self.rmp_npf = True
        self.rmp_stuck = None
        try:
            n, r = super()._fault(gfn, gfn + 1, private, write)
        finally:
            self.rmp_npf = False
        stuck, self.rmp_stuck = self.rmp_stuck, None
        if stuck is not None:
            return n, FaultResult("rmp_loop", spte_level(v) if v else None, pfn, retries=stuck[1], loop=stuck[0])
        if r.ret in ("fixed", "spurious", "retry"):
            v2 = vm._mmu.sptes.get(gfn)
            # Nothing changed: the same leaf (or still none) over the same RMP entry. The
            # hardware would fault the same way on every retry: one attempt proves the loop.
            if v2 == v and (not v or rmp.lookup(pfn) == before[1]):
                return n, FaultResult("rmp_loop", spte_level(v) if v else None, pfn, retries=1,
                                      loop="RMP #NPF (sev_handle_rmp_fault)")
        return n, r

    # -- PVALIDATE (§5.6, §7.5) -------------------------------------------------------------------

    def pvalidate(self, gpa: int, level: int, validate: bool) -> GuestOpResult:
        """The guest's ``PVALIDATE`` of the private page (4K or 2M) at ``gpa``.

        The NPT walk comes first: with no private leaf for ``gpa`` the instruction takes a
        private #NPF (under the final design, that fault's ``gmem_prepare`` does the
        RMPUPDATE, §7.8) and re-executes. Returns ``ret == "done"`` with ``status`` the
        instruction's code (``PVALIDATE_SUCCESS``, ``_FAIL_INPUT``, ``_FAIL_SIZEMISMATCH``,
        ``_FAIL_NOUPDATE``); ``"exit"`` when the fault exited to userspace (answer it, then
        :meth:`run` re-executes the instruction); ``"rmp_loop"`` when an RMP #NPF cannot make
        progress; ``faults`` counts the #NPFs taken.

        Raises:
            KvmError: EIO if the VM is dead; EBUSY if an exit is pending; EDEADLK from an event
                callback of the VM.
            TypeError / ValueError: bad ``gpa``, ``level`` not PG_LEVEL_4K / PG_LEVEL_2M,
                ``validate`` not a bool.
        """
        gpa = _u64("gpa", gpa)
        if level not in (PG_LEVEL_4K, PG_LEVEL_2M) or type(level) is not int:
            raise ValueError(f"level={level!r} must be PG_LEVEL_4K (1) or PG_LEVEL_2M (2)")
        if type(validate) is not bool:
            raise TypeError("validate must be a bool")
        if gpa >> (PAGE_SHIFT + 40):
            raise ValueError(f"gpa={gpa:#x} is outside the 52-bit guest physical address space")
        begin_insn(self)
        return self._pvalidate(gpa, level, validate, 0)

    def _pvalidate(self, gpa: int, level: int, validate: bool, faults: int) -> GuestOpResult:
        vm = self.vm
        snp = vm.snp  # type: ignore[attr-defined]
        gfn = gpa >> PAGE_SHIFT
        if level == PG_LEVEL_2M and gfn & (RMP_PAGES_2M - 1):
            return self._pval_done(level, PVALIDATE_FAIL_INPUT, faults)
        sptes = vm._mmu.sptes
        attempts = 0
        while attempts < RETRY_LIMIT:
            attempts += 1
            v = sptes.get(gfn)
            if not v or not v & SPTE_PRIVATE:
                n, r = Vcpu._fault(self, gfn, gfn + 1, True, False)
                faults += n
                if r.ret == "retry" and vm._sched is not None and vm._sched.retry_fault(gfn):
                    # another thread's invalidation: re-faulted after it (a spin), not counted
                    attempts -= 1
                    continue
                if r.ret in ("fixed", "spurious", "retry"):
                    continue
                if r.ret == "exit":
                    self._resume = lambda: self._pvalidate(gpa, level, validate, 0)
                return snp_pv_fault_stop(r, gfn, faults)  # the typed core's (pkvm/_snp_guest.pxi)
            pfn = gfn + decode_delta(v)
            ent = snp.rmp.lookup(pfn)
            if (ent.assigned and ent.asid == snp.asid and ent.gpa == gfn << PAGE_SHIFT
                    and spte_level(v) < ent.level):
                code = PVALIDATE_NPF_RMP  # the NPT leaf is smaller than the 2M RMP entry
            elif level == PG_LEVEL_2M and spte_level(v) == PG_LEVEL_4K and pfn & (RMP_PAGES_2M - 1):
                # A 2M PVALIDATE through a 4K nested mapping is a page-size mismatch: the
                # translation gives no 2M page, so the RMP's alignment rule never applies (the
                # guest retries at 4K; docs/snp.md).
                code = PVALIDATE_FAIL_SIZEMISMATCH
            else:
                code = snp.rmp.pvalidate(pfn, level, asid=snp.asid, gpa=gfn << PAGE_SHIFT, validate=validate)
            if code in (PVALIDATE_NPF_RMP, PVALIDATE_NPF_SIZEM):
                n, r = self._rmp_npf(gfn, True, False)
                faults += n
                if r.ret == "exit":
                    self._resume = lambda: self._pvalidate(gpa, level, validate, 0)
                    return GuestOpResult("exit", exit_reason=r.exit_reason, memory_fault=r.memory_fault,
                                         errno=r.errno, faults=faults)
                if r.ret == "rmp_loop":
                    return GuestOpResult("rmp_loop", value=gpa, faults=faults, retries=r.retries, loop=r.loop)
                continue
            return self._pval_done(level, code, faults)
        return GuestOpResult("rmp_loop", value=gpa, faults=faults, retries=RETRY_LIMIT,
                             loop="PVALIDATE #NPF refault")

    def _pval_done(self, level: int, code: int, faults: int, count: int = 1) -> GuestOpResult:
        self._pval_count(level, code, count)
        return GuestOpResult("done", status=code, faults=faults)

    def _pval_count(self, level: int, code: int, count: int) -> None:
        """Count and charge ``count`` PVALIDATEs at ``level`` that ended with ``code``."""
        snp_pval_count(self.vm, level, code, count)  # the typed core's (pkvm/_snp_guest.pxi)

    def pvalidate_range(self, gpa: int, size: int, validate: bool, *, huge: bool = True) -> GuestOpResult:
        """``pvalidate_pages`` over ``[gpa, gpa + size)``: 2M PVALIDATEs for the 2M-aligned
        blocks when ``huge`` (a ``FAIL_SIZEMISMATCH`` block is redone as 512 x 4K), 4K
        elsewhere; stops at the first other failure. Range-compressed: a run of pages in one
        state is one table operation. Returns ``done`` with status 0, or the failing
        instruction's result (``status``, exit, ``rmp_loop``); ``value`` is the gpa reached.

        Raises:
            as :meth:`pvalidate`; ``size`` must be a positive multiple of 4 KiB.
        """
        gpa, size = _u64("gpa", gpa), _u64("size", size)
        if not size or (gpa | size) & 0xFFF:
            raise ValueError(f"[{gpa:#x}, +{size:#x}) must be a non-empty, 4 KiB aligned range")
        if type(validate) is not bool or type(huge) is not bool:
            raise TypeError("validate and huge must be bools")
        begin_insn(self)
        return self._pvalidate_range(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, validate, huge)

    def _pvalidate_insn(self, gfn: int, end: int, validate: bool, huge: bool) -> GuestOpResult:
        """:meth:`pvalidate_range` over ``[gfn, end)`` for a caller that checked the range
        (u64, 4 KiB aligned, non-empty) and passes bools: the guest flows."""
        return snp_pvalidate_insn(self, gfn, end, validate, huge)  # begin_insn, then self._pvalidate_range

    #: The range form (pkvm/_snp_guest.pxi): run by run of nested mappings, 2M PVALIDATEs over
    #: 2M leaves on 2M RMP entries as one range operation, 2M PVALIDATEs that fail with
    #: ``FAIL_SIZEMISMATCH`` over 4K leaves redone as 4K ones, fresh blocks faulted in as
    #: batches (:meth:`_batch_end`), single instructions (:meth:`_pvalidate`) where a run cannot
    #: be taken as one; after an exit, ``KVM_RUN`` re-executes the faulting PVALIDATE and the
    #: guest's loop goes on from there (``vcpu._resume``).
    _pvalidate_range = snp_pvalidate_range

    @staticmethod
    def _stopped(r: GuestOpResult, gfn: int) -> GuestOpResult:
        """``r`` (a failed or exiting single PVALIDATE at ``gfn``) as the range's result."""
        if r.ret == "done" and r.status == PVALIDATE_SUCCESS:
            return GuestOpResult("done", status=PVALIDATE_SUCCESS, value=(gfn + 1) << PAGE_SHIFT, faults=r.faults)
        return GuestOpResult(r.ret, r.status, gfn << PAGE_SHIFT, r.exit_reason, None, r.memory_fault,
                             r.errno, r.faults, r.retries, r.loop)

    #: 4K PVALIDATEs over ``[gfn, end)`` inside one private leaf run; None on success.
    _pvalidate_4k_run = snp_pvalidate_4k_run  # pkvm/_snp_guest.pxi

    # -- page-state changes (§7.1) ----------------------------------------------------------------

    def _psc_enabled(self) -> bool:
        return bool(self.vm.hypercall_exit_mask & (1 << KVM_HC_MAP_GPA_RANGE))

    def psc_msr(self, gpa: int, op: int) -> GuestOpResult:
        """GHCB MSR protocol page-state change of the 4K page at ``gpa`` (``op`` 1 private,
        2 shared; ``snp_begin_psc_msr``). ``status`` is the response MSR value:
        ``GHCB_MSR_PSC_RESP`` or ``GHCB_MSR_PSC_RESP_ERROR``.

        Raises:
            KvmError: EIO if the VM is dead; EBUSY if an exit is pending; EDEADLK from an event
                callback of the VM.
            TypeError / ValueError: ``gpa`` / ``op`` not u64 ints.
        """
        gpa, op = _u64("gpa", gpa), _u64("op", op)
        begin_insn(self)
        vm = self.vm
        vm._stats["psc_requests"] += 1
        vm._charge("psc_request", 1)
        gpa &= ~0xFFF & ((1 << 52) - 1)
        op &= 0xF  # GHCB_MSR_PSC_REQ_TO_OP: the MSR's operation field is bits 55:52
        if vm._subs is not None:  # the GHCB MSR value: gfn, operation, GHCB_MSR_PSC_REQ
            vm._emit("vmgexit_msr_enter", gpa >> 12, (gpa >> 12) + 1, None, 1, 0, None,
                     (self.id, gpa | op << 52 | GHCB_MSR_PSC_REQ))
        if op not in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED) or not self._psc_enabled():
            return self._msr_done(gpa, op, GHCB_MSR_PSC_RESP_ERROR)
        vm._stats["psc_entries"] += 1
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if op == SNP_PAGE_STATE_PRIVATE else KVM_MAP_GPA_RANGE_DECRYPTED
        # snp_begin_psc_msr does not write run->hypercall.flags: it keeps its last value
        hc = Hypercall(KVM_HC_MAP_GPA_RANGE, (gpa, 1, attrs | KVM_MAP_GPA_RANGE_PAGE_SZ_4K), 0,
                       self._hc_flags)

        def complete() -> GuestOpResult:  # snp_complete_psc_msr
            return self._msr_done(gpa, op, GHCB_MSR_PSC_RESP_ERROR if hc.ret else GHCB_MSR_PSC_RESP)

        return hypercall_exit(self, hc, complete)

    def _msr_done(self, gpa: int, op: int, status: int) -> GuestOpResult:
        vm = self.vm
        if vm._subs is not None:
            vm._emit("vmgexit_msr_exit", gpa >> 12, (gpa >> 12) + 1, None, 1, 0, status,
                     (self.id, gpa | op << 52 | GHCB_MSR_PSC_REQ, 1))
        return GuestOpResult("done", status=status)

    def psc(self, desc: PscDesc) -> GuestOpResult:
        """GHCB protocol page-state change (``SVM_VMGEXIT_PSC``, ``snp_begin_psc``): process
        ``desc`` from ``cur_entry``, coalescing contiguous entries of one operation and size
        into one ``KVM_HC_MAP_GPA_RANGE`` exit each. ``desc`` is updated in place (``cur_page``,
        ``cur_entry``) as KVM does in the shared buffer. The completion's ``status`` is
        ``sw_exit_info_2``: 0 or a ``VMGEXIT_PSC_ERROR_*`` code.

        Raises:
            KvmError: EIO if the VM is dead; EBUSY if an exit is pending; EDEADLK from an event
                callback of the VM.
            TypeError: ``desc`` is not a :class:`PscDesc`, an entry not a :class:`PscEntry`, or
                a field not an int (``huge``: a bool).
            ValueError: a field outside its width in the GHCB buffer (``cur_entry`` and
                ``end_entry`` 16 bits, ``end_entry`` -1 for none; an entry's ``gfn`` 40,
                ``op`` 4, ``cur_page`` 12). Nothing has run then.
        """
        if not isinstance(desc, PscDesc):
            raise TypeError(f"desc must be a PscDesc, not {type(desc).__name__}")
        _check_psc_desc(desc)
        return self._psc(desc)

    def _psc(self, desc: PscDesc) -> GuestOpResult:
        """:meth:`psc` of a descriptor known to be well formed (the guest flows build theirs)."""
        if not self._psc_begin():
            return self._psc_done(GuestOpResult("done", status=VMGEXIT_PSC_ERROR_GENERIC))
        if desc.end_entry >= VMGEXIT_PSC_MAX_COUNT or desc.end_entry >= len(desc.entries):
            return self._psc_done(GuestOpResult("done", status=VMGEXIT_PSC_ERROR_INVALID_HDR))
        return self._psc_next(desc)

    def _psc_runs(self, runs: list[tuple[int, int, bool]], op: int, at: list[int]) -> GuestOpResult:
        """:meth:`psc` of a fresh descriptor given as runs instead of entries (the guest flows'
        range-compressed form, docs/performance.md): ``runs`` lists ``(gfn, entries, huge)``
        in entry order, each a maximal run of contiguous entries of one size, all of
        operation ``op`` (private or shared), at most ``VMGEXIT_PSC_MAX_ENTRY`` entries in
        all, none started. Exactly what :meth:`psc` does with those entries: ``snp_begin_psc``
        coalesces each run into one ``KVM_HC_MAP_GPA_RANGE`` exit, and counters, modeled time,
        exits and trace events are the same; the walk is O(1) per run instead of per entry.
        ``at[0]`` is kept at the index of the run being processed (the descriptor's
        ``cur_entry`` points at its first entry).

        Raises:
            KvmError: EIO if the VM is dead; EBUSY if an exit is pending; EDEADLK from an event
                callback of the VM.
        """
        return snp_psc_runs(self, runs, op, at)  # pkvm/_snp_guest.pxi

    def _psc_begin(self) -> bool:
        """The VMGEXIT of a page-state-change request: the instruction begins, the request is
        counted, charged and announced; returns whether the guest may use the protocol
        (``snp_begin_psc`` fails the request with ``VMGEXIT_PSC_ERROR_GENERIC`` otherwise)."""
        return snp_psc_begin(self)  # pkvm/_snp_guest.pxi

    def _psc_done(self, r: GuestOpResult) -> GuestOpResult:
        """The VMGEXIT is complete (``sw_exit_info_2`` = ``r.status``): trace its exit."""
        vm = self.vm
        if vm._subs is not None and r.ret == "done":
            vm._emit("vmgexit_exit", None, None, None, 1, 0, r.status or 0, (self.id, SVM_VMGEXIT_PSC, 0, r.status or 0))
        return r

    def _psc_next(self, desc: PscDesc) -> GuestOpResult:
        return self._psc_done(self._psc_walk(desc))

    def _psc_walk(self, desc: PscDesc) -> GuestOpResult:
        vm = self.vm
        entries = desc.entries
        while True:
            idx = desc.cur_entry
            # Skip finished entries; validate the one to start from.
            while idx <= desc.end_entry:
                ent = entries[idx]
                npages = ent.npages
                if ent.cur_page > npages or ent.gfn & (npages - 1):
                    return GuestOpResult("done", status=VMGEXIT_PSC_ERROR_INVALID_ENTRY)
                if ent.cur_page == npages:
                    idx += 1
                    desc.cur_entry = idx
                    continue
                break
            if idx > desc.end_entry:
                return GuestOpResult("done", status=0)
            first = entries[idx]
            if first.op not in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED):
                first.cur_page = first.npages  # SMASH / UNSMASH: nothing for KVM to do
                desc.cur_entry = idx + 1
                continue
            gfn = first.gfn + first.cur_page
            npages = first.npages - first.cur_page
            huge = first.huge and not first.cur_page
            inflight = 1
            j = idx + 1
            # snp_begin_psc tests contiguity against the first entry's own gfn plus the pages
            # counted so far, so after a partly done 2M entry (cur_page c > 0, continued as 4K)
            # it expects the next entry at gfn + 512 - c, not gfn + 512: a kernel quirk kept
            # as is (Linux guests never send a partly done entry).
            while j <= desc.end_entry:
                nxt = entries[j]
                if (nxt.op != first.op or nxt.cur_page or nxt.huge != huge or nxt.gfn != first.gfn + npages
                        or nxt.gfn & (nxt.npages - 1)):
                    break
                npages += nxt.npages
                inflight += 1
                j += 1
            vm._stats["psc_entries"] += inflight
            attrs = (KVM_MAP_GPA_RANGE_ENCRYPTED if first.op == SNP_PAGE_STATE_PRIVATE
                     else KVM_MAP_GPA_RANGE_DECRYPTED)
            # The size flag is the first entry's page-size bit, even for a partly done 2M entry
            # that continues as 4K pages (snp_begin_psc).
            attrs |= KVM_MAP_GPA_RANGE_PAGE_SZ_2M if first.huge else KVM_MAP_GPA_RANGE_PAGE_SZ_4K
            # snp_begin_psc does not write run->hypercall.flags: it keeps its last value
            hc = Hypercall(KVM_HC_MAP_GPA_RANGE, (gfn << PAGE_SHIFT, npages, attrs), 0,
                           self._hc_flags)

            def complete(hc: Hypercall = hc, idx: int = idx, inflight: int = inflight) -> GuestOpResult:
                if hc.ret:  # snp_complete_one_psc: userspace failed the range
                    return self._psc_done(GuestOpResult("done", status=VMGEXIT_PSC_ERROR_GENERIC))
                for k in range(idx, idx + inflight):
                    entries[k].cur_page = entries[k].npages
                desc.cur_entry = idx + inflight
                # snp_complete_one_psc goes on through snp_begin_psc, whose first test is the
                # hypercall exit again: userspace may have disabled it meanwhile (even after the
                # last range, the answer is then GENERIC, not 0).
                if not self._psc_enabled():
                    return self._psc_done(GuestOpResult("done", status=VMGEXIT_PSC_ERROR_GENERIC))
                return self._psc_next(desc)

            return hypercall_exit(self, hc, complete)

