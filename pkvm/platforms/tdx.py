"""``KVM_X86_TDX_VM``: Intel TDX trust domains (docs/kernel-semantics.md §4.1, §4.5, §6, §7.2, §7.5).

What this platform adds to the KVM model:

* **Address split** (§6.1). A TD's GPA has a *shared bit*: 47 with 4-level secure EPT (GPAW
  48, the default), 51 with 5-level (``pkvm.VM("tdx", options={"gpaw": 52})``). Memslots,
  attributes and S-EPT state are indexed by the alias-free gfn (shared bit stripped); memslots
  must lie below the shared bit. The public fault API passes alias-free gpas plus
  ``private=``: ``vcpu.page_fault(gpa, private=False)`` is an EPT violation at
  ``gpa | 1 << shared_bit``, ``private=True`` one at ``gpa``. Guest instructions take the
  guest's real GPAs: ``vcpu.map_gpa(gpa | vm.tdx.shared_mask, size)`` converts to shared.
* **Two roots** (§2.5). Shared mappings live in the direct root, private ones in the mirror
  root (one :class:`pkvm.kvm.mmu.Mmu` map; see its docstring). Converting to private zaps only
  direct leaves, to shared only mirror leaves (``Policy.zap_filter="old-type"``); a
  guest_memfd hole punch zaps only mirror leaves; memslot deletion zaps both.
* **S-EPT** (:mod:`._tdx_sept`, ``vm.sept``). A private fault installs a 4K mirror leaf: first
  ``TDH.MEM.SEPT.ADD`` for every S-EPT page table the walk lacks (counted once per table page),
  then ``TDH.MEM.PAGE.AUG`` (runnable TD: the page is PENDING until the guest accepts it) or,
  while the TD is built, ``TDH.MEM.PAGE.ADD`` (MAPPED). Zapping a mirror leaf runs
  BLOCK, TRACK + kick every vCPU, REMOVE, ``TDH.PHYMEM.PAGE.WBINVD`` and a MOVDIR64B clear,
  each of the first three through ``tdh_do_no_vcpus``: on ``TDX_OPERAND_BUSY`` set
  ``wait_for_sept_zap``, kick every vCPU, retry once; any remaining error bugs the VM.
* **Guest instructions** (:mod:`._tdx_vcpu`): ``vcpu.map_gpa`` (``TDG.VP.VMCALL<MapGPA>``),
  ``vcpu.accept`` (``TDG.MEM.PAGE.ACCEPT``); a guest access to a PENDING page kills the VM
  (§6.4).
* **TD build** (``vm.tdx``): ``init_mem_region`` (``KVM_TDX_INIT_MEM_REGION``, optionally
  measured with ``TDH.MR.EXTEND``) in the 6.16 "premap then ADD" or 6.19 "ADD in the S-EPT
  hook" form (``Policy.tdx_initial_image``), then ``finalize_vm`` (``KVM_TDX_FINALIZE_VM``):
  only a finalized (runnable) TD's vCPUs run.
* **Beyond upstream**: ``Policy.tdx_huge_pages`` models the TDX huge page series (2M AUG,
  DEMOTE before a partial zap, the per-2M guest-inhibit bit, accept-size mismatch faults).

Invariants (``vm.check()`` via :func:`tdx_check_vm`): every mirror leaf has an S-EPT leaf of
the same level in state PENDING or MAPPED (or, in the 6.16 build, none: the page is
premapped and counted in ``nr_premapped``); every S-EPT leaf has a mirror leaf; BLOCKED states
only survive in a bugged VM.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from pkvm.constants import (
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_TDX_MEASURE_MEMORY_REGION,
    KVM_X86_TDX_VM,
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    RETRY_LIMIT,
    TASK_SIZE_MAX,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_OPERAND_BUSY,
    TDX_SHARED_BIT_PWL_4,
    TDX_SHARED_BIT_PWL_5,
    TDX_SUCCESS,
)
from pkvm.errors import InternalInvariantError, KvmError
from pkvm.kvm.gmem import FOLIO_PREPARED, gmem_get_folios
from pkvm.kvm.mmu import SPTE_PRIVATE, make_spte, spte_level
from pkvm.kvm.ops import PlatformOps, access_decides
from pkvm.kvm.vm import Vcpu, _u64
from pkvm.platforms._tdx_flows import TdxGuestFlows, TdxVmmFlows
from pkvm.platforms._tdx_sept import (
    BLOCKED,
    MAPPED,
    PENDING,
    PENDING_BLOCKED,
    STATE_MASK,
    TABLE_SHIFT,
    TDX_CHARGED_OPS,
    TDX_STAT_KEYS,
    Seamcalls,
    Sept,
    TraceEvent,
    leaf_level,
    leaf_value,
)
from pkvm.platforms._tdx_vcpu import TdxVcpu

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

U64_MAX = (1 << 64) - 1
_LEVEL_SHIFT = (0, 0, 9, 18)
#: ``kvm_tdx->state``: built by ``KVM_TDX_INIT_MEM_REGION`` until ``KVM_TDX_FINALIZE_VM``.
TD_STATE_INITIALIZED, TD_STATE_RUNNABLE = "initialized", "runnable"
#: ``TDX_TLB_TRACKING_NOT_DONE``: what ``PAGE.REMOVE`` returns when no TRACK completed (``tdx_errno.h``).
TDX_TLB_TRACKING_NOT_DONE = 0xC0000B0800000000


class TdxVm:
    """``struct kvm_tdx``: a TD's KVM-side state and its VM-scope ioctls (``vm.tdx``).

    ``state`` is ``"initialized"`` until :meth:`finalize_vm`, then ``"runnable"``.
    ``nr_premapped`` counts mirror leaves waiting for their ``PAGE.ADD`` (6.16 build only).
    ``trace`` is an opt-in list of :class:`~pkvm.platforms._tdx_sept.TraceEvent` (assign a
    list to record SEAMCALLs and kicks in issue order).
    """

    __slots__ = ("_vm", "gpaw", "shared_bit", "state", "nr_premapped", "wait_for_sept_zap", "sept",
                 "seamcalls", "_populating", "_accept_level", "huge_pages", "premap")

    def __init__(self, vm: VM, gpaw: int) -> None:
        self._vm = vm
        self.gpaw = gpaw
        self.shared_bit = TDX_SHARED_BIT_PWL_5 if gpaw == 52 else TDX_SHARED_BIT_PWL_4
        self.state = TD_STATE_INITIALIZED
        self.nr_premapped = 0
        self.wait_for_sept_zap = False
        self.sept = Sept(5 if gpaw == 52 else 4)
        self.seamcalls = Seamcalls(vm)
        self._populating = False     # kvm_tdx->page_add_src is set (6.19 build)
        self._accept_level = 0       # accept level of the EPT violation being handled (huge pages)
        self.huge_pages = vm.policy.tdx_huge_pages
        self.premap = vm.policy.tdx_initial_image == "premap-then-add"

    def __repr__(self) -> str:
        return f"<TdxVm {self.state} gpaw={self.gpaw} nr_premapped={self.nr_premapped}>"

    # -- addresses ------------------------------------------------------------------------

    @property
    def shared_mask(self) -> int:
        """The GPA shared bit as a mask (``1 << 47`` or ``1 << 51``)."""
        return 1 << self.shared_bit

    def is_private_gpa(self, gpa: int) -> bool:
        """``vt_is_tdx_private_gpa``: the shared bit is clear.

        Raises:
            TypeError / ValueError: ``gpa`` is not an int in ``[0, 2**64)``."""
        if type(gpa) is not int or not 0 <= gpa < 1 << 64:
            gpa = _u64("gpa", gpa)
        return not gpa & (1 << self.shared_bit)

    @property
    def runnable(self) -> bool:
        return self.state == TD_STATE_RUNNABLE

    # -- test hooks ----------------------------------------------------------------------

    @property
    def trace(self) -> list[TraceEvent] | None:
        return self.seamcalls.trace

    @trace.setter
    def trace(self, value: list[TraceEvent] | None) -> None:
        self.seamcalls.trace = value

    def inject_busy(self, seamcall: str, times: int = 1) -> None:
        """Make the next ``times`` calls of ``seamcall`` (``"aug"``, ``"sept_add"``, ``"add"``,
        ``"block"``, ``"track"``, ``"remove"``, ``"wbinvd"``, ``"demote"``, ``"mr_extend"``,
        ``"mr_finalize"``) return ``TDX_OPERAND_BUSY``. See ``tdh_do_no_vcpus``.

        Raises:
            ValueError: an unknown SEAMCALL name or a negative count.
        """
        if self._vm._in_callback:
            self._vm._nested_call()
        self.seamcalls.inject_busy(seamcall, times)

    # -- KVM_TDX_INIT_MEM_REGION -----------------------------------------------------------

    def init_mem_region(self, vcpu: Vcpu, gpa: int, nr_pages: int, *, source_addr: int | None = None,
                        flags: int = 0) -> int:
        """``KVM_TDX_INIT_MEM_REGION`` (vCPU ioctl; kernel-semantics.md §6.3): add ``nr_pages`` pages of the
        initial image at the private ``gpa``, measuring them when ``flags`` has
        ``KVM_TDX_MEASURE_MEMORY_REGION`` (16 ``TDH.MR.EXTEND`` of 256 bytes per page).

        Page by page as ``kvm_gmem_populate``: the gfn must be in a guest_memfd memslot, its
        attribute PRIVATE and its folio not yet prepared; the folio is found or allocated,
        mapped in the mirror root and added (``TDH.MEM.PAGE.ADD``, the page becomes MAPPED),
        then marked prepared. 6.19 adds inside the S-EPT hook; 6.16 maps first (counted in
        ``nr_premapped``) and adds after. Uniform runs of pages are processed together.
        Returns the number of pages added (``nr_pages``).

        ``source_addr`` is the VMM's address of the image (page ``i`` is read from
        ``source_addr + i * 4096``). pkvm models no userspace memory: ``None`` (the default)
        stands for a buffer the VMM has mapped; an int is checked as ``get_user_pages_fast``
        checks it for each page, and ``0`` stands for the unmapped page it is in a VMM
        (docs/tdx.md, "TD build").

        Like the kernel, which writes the remaining region back, a failure part way keeps the
        pages already added: the :class:`KvmError` then has ``progress = (gpa, nr_pages)``
        of what remains.

        Raises:
            KvmError: EIO for a dead VM; EINVAL if the TD is finalized, for unknown ``flags``,
                an unaligned ``gpa`` / ``source_addr``, ``nr_pages == 0``, a wrapping range
                or one that is not private, a page outside guest_memfd memslots or not
                PRIVATE; EFAULT if the guest_memfd was closed, or for a source page that is
                ``0`` or ends above ``TASK_SIZE_MAX``; EOVERFLOW for a source page whose end
                wraps past 2**64; EEXIST for a page already
                populated or faulted in; EBUSY (6.16) if ``PAGE.ADD`` stayed busy; EIO if
                ``TDH.MR.EXTEND`` failed (6.19: the VM is bugged; 6.16: it is not, and the page
                stays added); EINTR if the S-EPT walk stayed busy for ``RETRY_LIMIT``
                attempts (nothing mapped; 6.16's premap fault has prepared the folio all the
                same, so that page is EEXIST afterwards); ENOMEM.
            TypeError / ValueError: bad argument types, or a vCPU of another VM.
        """
        vm = self._vm
        vm._check_alive()
        if not isinstance(vcpu, Vcpu):
            raise TypeError(f"vcpu must be a pkvm.Vcpu, not {type(vcpu).__name__}")
        if vcpu.vm is not vm:
            raise ValueError("vcpu belongs to another VM")
        gpa, nr_pages = _u64("gpa", gpa), _u64("nr_pages", nr_pages)
        src = None if source_addr is None else _u64("source_addr", source_addr)
        flags = _u64("flags", flags)
        source_addr = 0 if src is None else src  # for the alignment check and the messages
        if self.runnable:
            raise KvmError(errno.EINVAL, "KVM_TDX_INIT_MEM_REGION: the TD is already finalized")
        if flags & ~KVM_TDX_MEASURE_MEMORY_REGION:
            raise KvmError(errno.EINVAL, f"KVM_TDX_INIT_MEM_REGION: flags {flags:#x} (valid: "
                           f"KVM_TDX_MEASURE_MEMORY_REGION = {KVM_TDX_MEASURE_MEMORY_REGION:#x})")
        size = (nr_pages << PAGE_SHIFT) & U64_MAX
        last = (gpa + size - 1) & U64_MAX
        if (source_addr | gpa) & ((1 << PAGE_SHIFT) - 1) or not nr_pages or (gpa + size) & U64_MAX <= gpa \
                or not self.is_private_gpa(gpa) or not self.is_private_gpa(last):
            raise KvmError(errno.EINVAL, f"KVM_TDX_INIT_MEM_REGION: gpa {gpa:#x} / source {source_addr:#x} must be "
                           f"4 KiB aligned and [gpa, +{nr_pages:#x} pages) a non-empty private range")
        measure = bool(flags & KVM_TDX_MEASURE_MEMORY_REGION)
        gfn, left = gpa >> PAGE_SHIFT, nr_pages
        while left:
            # The source page of gfn (the kernel advances region.source_addr page by page)
            src_gfn = None if src is None else (src + (nr_pages - left) * (1 << PAGE_SHIFT)) & U64_MAX
            fit, src_err = (left, 0) if src_gfn is None else _source_pages(src_gfn, left)
            if fit:
                n, err = self._populate(gfn, fit, measure)
            else:
                n, err = self._populate(gfn, 1, measure, src_err)
            gfn += n
            left -= n
            if err:
                src_failed, err = err < 0, abs(err)
                why = _POPULATE_ERRORS.get(err, errno.errorcode.get(err))
                if src_failed:
                    why = (f"get_user_pages_fast cannot pin the source page at {src_gfn:#x} ("
                           + ("its end wraps past 2**64" if err == errno.EOVERFLOW else
                              "pkvm's stand-in for an unmapped source" if src_gfn == 0 else
                              f"it ends above TASK_SIZE_MAX {TASK_SIZE_MAX:#x}") + ")")
                if err == errno.EIO and not vm.vm_bugged:
                    why = ("the guest_memfd binding is not this memslot's, or (6.16) TDH.MR.EXTEND failed: "
                           "-EIO without bugging the VM, the page stays added")
                exc = KvmError(err, f"KVM_TDX_INIT_MEM_REGION stopped at gpa {gfn << PAGE_SHIFT:#x} "
                               f"with {left:#x} pages left: {why}")
                exc.progress = (gfn << PAGE_SHIFT, left)  # type: ignore[attr-defined]
                raise exc
        return nr_pages

    def _populate(self, gfn: int, limit: int, measure: bool, src_err: int = 0) -> tuple[int, int]:
        """``kvm_gmem_populate`` + ``tdx_gmem_post_populate`` for the longest uniform run of
        pages from ``gfn`` (at most ``limit``); returns ``(pages added, errno or 0)``.
        ``src_err``: ``get_user_pages_fast`` fails on the source of page ``gfn`` (``limit`` is
        then 1) with that errno, the first step of ``tdx_gmem_post_populate``, so after
        ``kvm_gmem_populate`` has found or allocated the folio and checked it; that failure
        returns ``(0, -src_err)``, negative to tell it from the same errno of another step."""
        vm = self._vm
        slot = vm._slot_at(gfn)
        if slot is None or slot.gmem is None:
            return 0, errno.EINVAL               # !kvm_slot_can_be_private
        if slot.gmem_file is None:
            return 0, errno.EFAULT               # kvm_gmem_get_file failed
        gmem = slot.gmem
        off = slot.gmem_pgoff - slot.base_gfn
        index = gfn + off
        if gmem.bindings.get(index) != slot.key + 1:
            return 0, errno.EIO
        end = min(gfn + limit, slot.end_gfn)
        sc = self.seamcalls
        if sc.armed("sept_add", "aug", "add", "mr_extend"):
            end = gfn + 1                        # one page at a time while a BUSY is pending
        # Per page the kernel finds (or allocates) the folio, then checks the attribute: a
        # page that is not PRIVATE still gets its folio.
        _s, a_end, attr = vm._attrs.run_at(gfn)
        private = attr & KVM_MEMORY_ATTRIBUTE_PRIVATE
        end = min(end, a_end) if private else gfn + 1
        try:
            pfn, order, prepared, fend = gmem_get_folios(vm, gmem, index, end + off)
        except KvmError as exc:
            return 0, exc.errno or errno.ENOMEM
        if prepared:
            return 0, errno.EEXIST
        if not private:
            return 0, errno.EINVAL
        if src_err:
            return 0, -src_err                   # tdx_gmem_post_populate: get_user_pages_fast
        end = min(end, fend - off)
        mmu = vm._mmu
        if mmu.sptes.find_ne(gfn, end, 0) != -1:
            raise InternalInvariantError(f"gfns [{gfn:#x}, {end:#x}) have mirror leaves but unprepared folios")
        delta = pfn - gfn
        value = make_spte(delta, PG_LEVEL_4K, True, not slot.flags & KVM_MEM_READONLY)
        n = end - gfn
        _fs, _fe, fv = gmem.folios.run_at(index)
        # What "prepared" marks: the whole folio (a large folio has one up-to-date flag).
        ps, pe = (index & -(1 << order), (index & -(1 << order)) + (1 << order)) if order else (index, end + off)
        if self.premap:
            # 6.16: kvm_tdp_map_page is a prefetch fault whose fault-in step gets the pfn from
            # guest_memfd again (kvm_gmem_get_pfn zeroes the folio and marks it up to date)
            # before the walk, on the first attempt: the folio is prepared even if the walk
            # then stays busy until a signal (-EINTR) and nothing is mapped.
            gmem.folios.assign(ps, pe, fv | FOLIO_PREPARED)
        # The mirror mapping: kvm_tdp_mmu_map_private_pfn (6.19) or kvm_tdp_map_page (6.16) loop
        # while the walk returns RET_PF_RETRY (a busy SEPT.ADD / AUG / ADD).
        # The kernel loop ends only on a signal (-EINTR); the synchronous API plays that signal
        # after RETRY_LIMIT busy attempts (nothing else could release the holder).
        self._populating = not self.premap
        try:
            for _attempt in range(RETRY_LIMIT):
                r = tdx_set_external_spte(vm, gfn, end, PG_LEVEL_4K, delta)
                if r != -errno.EBUSY:
                    break
            else:
                r = -errno.EINTR
        finally:
            self._populating = False
        if r:
            return 0, -r
        mmu.map_run(gfn, end, PG_LEVEL_4K, value)
        if self.premap:
            # kvm_tdp_map_page is a prefetch fault: pf_fixed counts it, pf_taken does not.
            vm._stats["pf_fixed"] += n
            st = sc.call("add", n, gfn, end, PG_LEVEL_4K)
            if st == TDX_OPERAND_BUSY:
                return 0, errno.EBUSY
            self.sept.leaves.assign(gfn, end, leaf_value(MAPPED, PG_LEVEL_4K))
            self.nr_premapped -= n
        if measure:
            st = sc.mr_extend(n, gfn)
            if st != TDX_SUCCESS:
                # post_populate failed: this page is not counted (its folio is not marked by
                # populate; 6.16's premap fault had already prepared it). 6.19 bugs the VM
                # (TDX_BUG_ON_2); 6.16 only returns -EIO, the page staying added.
                if not self.premap:
                    vm._bug(f"TDH.MR.EXTEND failed on gpa {gfn << PAGE_SHIFT:#x}: {st:#x}")
                return 0, errno.EIO
        if not self.premap:
            gmem.folios.assign(ps, pe, fv | FOLIO_PREPARED)  # kvm_gmem_mark_prepared
        return n, 0

    # -- KVM_TDX_FINALIZE_VM -----------------------------------------------------------------

    def finalize_vm(self) -> None:
        """``KVM_TDX_FINALIZE_VM``: ``TDH.MR.FINALIZE``; the TD becomes runnable.

        Raises:
            KvmError: EIO for a dead VM; EINVAL if already finalized or (6.16) pages are still
                premapped; EBUSY if ``TDH.MR.FINALIZE`` returned busy.
        """
        vm = self._vm
        vm._check_alive()
        if self.runnable:
            raise KvmError(errno.EINVAL, "KVM_TDX_FINALIZE_VM: the TD is already runnable")
        if self.premap and self.nr_premapped:
            raise KvmError(errno.EINVAL, f"KVM_TDX_FINALIZE_VM: {self.nr_premapped} premapped pages still wait "
                           "for TDH.MEM.PAGE.ADD (nr_premapped != 0)")
        if self.seamcalls.call("mr_finalize") == TDX_OPERAND_BUSY:
            raise KvmError(errno.EBUSY, "KVM_TDX_FINALIZE_VM: TDH.MR.FINALIZE returned TDX_OPERAND_BUSY")
        self.state = TD_STATE_RUNNABLE


def _source_pages(src: int, left: int) -> tuple[int, int]:
    """How many of ``left`` source pages from ``src`` (page aligned) ``get_user_pages_fast``
    can pin, and the errno it fails the next one with (0 if all ``left`` can be pinned).
    ``gup_fast_fallback`` (mm/gup.c) refuses a range whose end wraps (``-EOVERFLOW``) or lies
    above ``TASK_SIZE_MAX`` (``-EFAULT``) before looking at any page table; pkvm models no
    userspace mapping otherwise and takes address 0, which a VMM does not map, as unmapped
    (``-EFAULT`` from the slow path, which finds no VMA there)."""
    if src == 0:
        return 0, errno.EFAULT
    if src + (1 << PAGE_SHIFT) > U64_MAX:  # check_add_overflow: the end does not fit a u64
        return 0, errno.EOVERFLOW
    fit = (TASK_SIZE_MAX - src) >> PAGE_SHIFT if src < TASK_SIZE_MAX else 0
    return (left, 0) if fit >= left else (fit, errno.EFAULT)


_POPULATE_ERRORS = {
    errno.EINVAL: "the page is not in a guest_memfd memslot or its attribute is not PRIVATE",
    errno.EFAULT: "the guest_memfd is closed",
    errno.EEXIST: "the page was already populated or faulted in (its folio is prepared)",
    errno.EBUSY: "TDH.MEM.PAGE.ADD returned TDX_OPERAND_BUSY",
    errno.EINTR: f"the S-EPT walk stayed TDX_OPERAND_BUSY for {RETRY_LIMIT} attempts (the kernel retries "
                 "until a signal: -EINTR)",
    errno.ENOMEM: "host memory is exhausted",
    errno.EIO: "a SEAMCALL failed and the VM is bugged",
}


# ---------------------------------------------------------------------------------------------
# Platform ops


@access_decides
def tdx_fault_is_private(vm: VM, gfn: int, private: bool) -> bool:
    """``vt_is_tdx_private_gpa`` on the faulting GPA: private iff the shared bit is clear,
    which the public API expresses as ``private=`` on an alias-free gpa (§4.1)."""
    return private


def tdx_init_vm(vm: VM) -> int:
    """``KVM_CREATE_VM`` + ``KVM_TDX_INIT_VM``: attach the TD state, narrow the gfn space to
    below the shared bit, register the TDX counters and costs.

    Raises:
        KvmError: EINVAL under a policy of a kernel without TDX (6.8 / 6.11 / RFC v8 presets:
            attribute-derived ``is_private`` or the UPM-era ioctl).
        ValueError: ``options["gpaw"]`` is not 48 or 52.
    """
    pol = vm.policy
    if pol.private_fault_source != "access" or pol.attr_ioctl != "all-or-nothing":
        raise KvmError(errno.EINVAL, "KVM_CREATE_VM: KVM_X86_TDX_VM exists from Linux 6.16 on, but this policy "
                       f"describes an earlier kernel (private_fault_source={pol.private_fault_source!r}, "
                       f"attr_ioctl={pol.attr_ioctl!r}): use policy '6.16' or '6.19'")
    gpaw = vm.options.get("gpaw", 48)
    if type(gpaw) is not int or gpaw not in (48, 52):
        raise ValueError(f"options['gpaw']={gpaw!r} must be 48 (4-level EPT, shared bit 47) or 52 "
                         "(5-level EPT, shared bit 51)")
    td = TdxVm(vm, gpaw)
    vm.tdx = td  # type: ignore[attr-defined]
    vm.sept = td.sept  # type: ignore[attr-defined]
    # the S-EPT's mutators and maps refuse from an event callback of the VM (docs/events.md)
    td.sept._owner = vm
    for m in (td.sept.leaves, td.sept.guest_inhibit, *td.sept.tables[1:]):
        m._set_owner(vm)  # type: ignore[union-attr]
    vm._gfn_limit = 1 << (td.shared_bit - PAGE_SHIFT)
    for key in TDX_STAT_KEYS:
        vm._stats[key] = 0
    for op in TDX_CHARGED_OPS:
        vm._costs[op] = vm._cost_model.ns(op)
    return 0


def tdx_gmem_max_mapping_level(vm: VM, pfn: int, private: bool) -> int:
    """``tdx_gmem_max_mapping_level``: private memory maps at 4K (2M with the huge page
    series); shared memory is not capped."""
    if not private:
        return 0
    return PG_LEVEL_2M if vm.tdx.huge_pages else PG_LEVEL_4K  # type: ignore[attr-defined]


def tdx_max_mapping_level(vm: VM, gfn: int, private: bool) -> int:
    """Beyond upstream: the huge page series' gfn-based caps on a private 2M mapping.

    4K if the EPT violation carries a 4K accept level, if the guest-inhibit bit of the 2M
    chunk is set, or if the chunk already has an S-EPT page table (KVM never promotes).
    """
    td: TdxVm = vm.tdx  # type: ignore[attr-defined]
    if not private:
        return 0
    if not td.huge_pages or td._accept_level == PG_LEVEL_4K:
        return PG_LEVEL_4K
    sept = td.sept
    if sept.is_inhibited(gfn) or sept.has_table(1, gfn):
        return PG_LEVEL_4K
    return PG_LEVEL_2M


def tdx_set_external_spte(vm: VM, start: int, end: int, level: int, pfn_delta: int) -> int:
    """``tdx_sept_link_private_spt`` + ``tdx_sept_set_private_spte`` for new mirror leaves.

    SEPT.ADD every missing table (top-down), then per leaf: ``PAGE.AUG`` (runnable TD, the
    leaf becomes PENDING), ``PAGE.ADD`` (6.19 build, inside ``KVM_TDX_INIT_MEM_REGION``:
    MAPPED) or, in the 6.16 build, no SEAMCALL and ``nr_premapped += 1``. Returns ``-EBUSY``
    (nothing installed) when the first SEAMCALL is busy, ``-EIO`` when the VM is bugged.
    """
    td: TdxVm = vm.tdx  # type: ignore[attr-defined]
    if vm.vm_bugged:
        return -errno.EIO
    sept, sc = td.sept, td.seamcalls
    if sept.leaves.find_ne(start, end, 0) != -1:
        raise InternalInvariantError(f"new mirror leaves on gfns [{start:#x}, {end:#x}) already have S-EPT leaves")
    missing = sept.missing_tables(start, end, level)
    for t, a, b in missing:
        sh = TABLE_SHIFT[t]
        if sc.call("sept_add", b - a, a << sh, b << sh, t) == TDX_OPERAND_BUSY:
            return -errno.EBUSY  # always the walk's first call: nothing was linked
    sept.add_tables(missing)
    nleaves = (end - start) >> _LEVEL_SHIFT[level]
    if td.runnable:
        if sc.call("aug", nleaves, start, end, level) == TDX_OPERAND_BUSY:
            return -errno.EBUSY
        sept.leaves.assign(start, end, leaf_value(PENDING, level))
    elif td.premap:
        td.nr_premapped += nleaves  # tdx_mem_page_record_premap_cnt
    else:
        if not td._populating:
            vm._bug(f"TDH.MEM.PAGE.ADD on gpa {start << PAGE_SHIFT:#x} without a source page (TD not runnable)")
            return -errno.EIO
        if sc.call("add", nleaves, start, end, level) == TDX_OPERAND_BUSY:
            return -errno.EBUSY
        sept.leaves.assign(start, end, leaf_value(MAPPED, level))
    return 0


def _no_vcpus(vm: VM, td: TdxVm, name: str, start: int, end: int, level: int, status: int = TDX_SUCCESS) -> int:
    """``tdh_do_no_vcpus``: one retry with every vCPU kicked out (and kept out) after a BUSY."""
    sc = td.seamcalls
    st = sc.call(name, 1, start, end, level, status)
    if st == TDX_OPERAND_BUSY:
        td.wait_for_sept_zap = True
        sc.kick_all(1, start, end)
        st = sc.call(name, 1, start, end, level, status)
        td.wait_for_sept_zap = False
    return st


def _remove_one(vm: VM, td: TdxVm, g: int, level: int) -> None:
    """``tdx_sept_remove_private_spte`` for one leaf, with the BUSY handling of each step."""
    sept, sc = td.sept, td.seamcalls
    n = 1 << _LEVEL_SHIFT[level]
    e = g + n
    v = sept.leaves.get(g)
    st0 = v & STATE_MASK
    if not st0:
        _remove_premapped(vm, td, g, e, level, 1)
        return
    if st0 not in (PENDING, MAPPED) or leaf_level(v) != level:
        if vm.vm_bugged:
            return  # a failed SEAMCALL left this leaf behind: KVM has already given up on the VM
        raise InternalInvariantError(f"zapping a level-{level} mirror leaf at gfn {g:#x} whose S-EPT leaf is "
                                     f"{sept.state(g)} at level {leaf_level(v)}")
    st = _no_vcpus(vm, td, "block", g, e, level)
    if st != TDX_SUCCESS:
        vm._bug(f"TDH.MEM.RANGE.BLOCK failed on gpa {g << PAGE_SHIFT:#x}: {st:#x}")
        return
    sept.leaves.assign(g, e, leaf_value(BLOCKED if st0 == MAPPED else PENDING_BLOCKED, level))
    tracked = True
    if td.runnable:
        st = _no_vcpus(vm, td, "track", g, e, level)
        if st != TDX_SUCCESS:
            vm._bug(f"TDH.MEM.TRACK failed: {st:#x}")
            tracked = False
        sc.kick_all(1, g, e)
    st = _no_vcpus(vm, td, "remove", g, e, level, TDX_SUCCESS if tracked else TDX_TLB_TRACKING_NOT_DONE)
    if st != TDX_SUCCESS:
        vm._bug(f"TDH.MEM.PAGE.REMOVE failed on gpa {g << PAGE_SHIFT:#x}: {st:#x}")
        return
    sept.leaves.assign(g, e, 0)
    st = sc.call("wbinvd", n, g, e, PG_LEVEL_4K)
    if st != TDX_SUCCESS:
        vm._bug(f"TDH.PHYMEM.PAGE.WBINVD failed on gpa {g << PAGE_SHIFT:#x}: {st:#x}")
        return
    sc.clear(n, g)


def _remove_premapped(vm: VM, td: TdxVm, s: int, e: int, level: int, nleaves: int) -> None:
    """6.16: zapping premapped pages (no S-EPT leaf yet): BLOCK fails with
    ``TDX_EPT_ENTRY_STATE_INCORRECT`` (after the usual BUSY retry) and KVM just gives the
    ``nr_premapped`` count back."""
    incorrect = TDX_EPT_ENTRY_STATE_INCORRECT
    if nleaves == 1:
        st = _no_vcpus(vm, td, "block", s, e, level, incorrect)
    else:
        st = td.seamcalls.call("block", nleaves, s, e, level, incorrect)
    if st == incorrect and td.premap and not td.runnable and td.nr_premapped >= nleaves:
        td.nr_premapped -= nleaves
        return
    vm._bug(f"TDH.MEM.RANGE.BLOCK on gpa {s << PAGE_SHIFT:#x}: {st:#x} and no premapped page to account")


def tdx_remove_external_spte(vm: VM, start: int, end: int, level: int, pfn_delta: int) -> int:
    """``tdx_sept_remove_private_spte`` for every zapped mirror leaf in ``[start, end)``.

    Per leaf: BLOCK (MAPPED -> BLOCKED, PENDING -> PENDING_BLOCKED), TRACK and a kick of every
    vCPU (skipped before finalization: no vCPU has run), REMOVE (-> FREE), WBINVD per 4K page
    and a clear. Runs of leaves in one S-EPT state are done at once (N leaves = N of each);
    while a BUSY is injected the leaves go one by one through ``tdh_do_no_vcpus``.
    """
    td: TdxVm = vm.tdx  # type: ignore[attr-defined]
    sept, sc = td.sept, td.seamcalls
    size = 1 << _LEVEL_SHIFT[level]
    names = ("block", "remove", "wbinvd", "track") if td.runnable else ("block", "remove", "wbinvd")
    g = start
    while g < end:
        if sc.armed(*names):
            _remove_one(vm, td, g, level)
            g += size
            continue
        _s, e, v = sept.leaves.run_at(g)
        e = min(e, end)
        nl = (e - g) >> _LEVEL_SHIFT[level]
        st0 = v & STATE_MASK
        if not st0:
            _remove_premapped(vm, td, g, e, level, nl)
        elif st0 in (PENDING, MAPPED) and leaf_level(v) == level:
            sc.call("block", nl, g, e, level)
            sept.leaves.assign(g, e, leaf_value(BLOCKED if st0 == MAPPED else PENDING_BLOCKED, level))
            if td.runnable:
                sc.call("track", nl, g, e, level)
                sc.kick_all(nl, g, e)
            sc.call("remove", nl, g, e, level)
            sept.leaves.assign(g, e, 0)
            sc.call("wbinvd", e - g, g, e, PG_LEVEL_4K)
            sc.clear(e - g, g)
        elif vm.vm_bugged:
            pass  # a leaf a failed removal left BLOCKED: KVM has already given up on the VM
        else:
            raise InternalInvariantError(f"zapping level-{level} mirror leaves [{g:#x}, {e:#x}) whose S-EPT leaf "
                                         f"is {sept.state(g)} at level {leaf_level(v)}")
        g = e
    return 0


def tdx_split_external_spte(vm: VM, gfn: int, level: int) -> int:
    """Beyond upstream (TDX huge pages): ``tdx_sept_split_private_spte`` before a zap covers
    only part of a 2M mirror leaf: BLOCK (2M), TRACK + kick, ``TDH.MEM.PAGE.DEMOTE``. The 512
    new 4K leaves keep the 2M leaf's state (PENDING or MAPPED); the new page table is the page
    DEMOTE consumes (no SEPT.ADD)."""
    td: TdxVm = vm.tdx  # type: ignore[attr-defined]
    sept, sc = td.sept, td.seamcalls
    n = 1 << _LEVEL_SHIFT[level]
    base = gfn & ~(n - 1)
    v = sept.leaves.get(base)
    st0 = v & STATE_MASK
    if leaf_level(v) != level or st0 not in (PENDING, MAPPED):
        if vm.vm_bugged:
            return -errno.EIO  # left behind by a failed SEAMCALL: KVM has already given up on the VM
        raise InternalInvariantError(f"DEMOTE of gfn {base:#x}: S-EPT leaf is {sept.state(base)} "
                                     f"at level {leaf_level(v)}")
    st = _no_vcpus(vm, td, "block", base, base + n, level)
    if st != TDX_SUCCESS:
        vm._bug(f"TDH.MEM.RANGE.BLOCK (2M) failed on gpa {base << PAGE_SHIFT:#x}: {st:#x}")
        return -errno.EIO
    if td.runnable:
        if _no_vcpus(vm, td, "track", base, base + n, level) != TDX_SUCCESS:
            vm._bug("TDH.MEM.TRACK failed before a DEMOTE")
        sc.kick_all(1, base, base + n)
    st = _no_vcpus(vm, td, "demote", base, base + n, level)
    if st != TDX_SUCCESS:
        sept.leaves.assign(base, base + n, leaf_value(BLOCKED if st0 == MAPPED else PENDING_BLOCKED, level))
        vm._bug(f"TDH.MEM.PAGE.DEMOTE failed on gpa {base << PAGE_SHIFT:#x}: {st:#x}")
        return -errno.EIO
    sept.leaves.assign(base, base + n, leaf_value(st0, level - 1))
    sept.tables[level - 1].assign(base >> (9 * (level - 1)), (base >> (9 * (level - 1))) + 1, 1)  # type: ignore[union-attr]
    return 0


def tdx_create_vcpu(vm: VM, vcpu_id: int) -> Vcpu:
    """``KVM_CREATE_VCPU`` + ``KVM_TDX_INIT_VCPU``: a :class:`~._tdx_vcpu.TdxVcpu`.

    ``tdx_vcpu_create`` only accepts a TD that is initialized but not finalized (the TDX
    module adds no vCPU to a TD after ``TDH.MR.FINALIZE``): later it fails with ``-EIO``.

    Raises:
        KvmError: EIO once the TD is finalized.
    """
    if vm.tdx.runnable:  # type: ignore[attr-defined]
        raise KvmError(errno.EIO, "KVM_CREATE_VCPU: a TD gets its vCPUs before KVM_TDX_FINALIZE_VM "
                       "(tdx_vcpu_create: the TD is not in TD_STATE_INITIALIZED)")
    return TdxVcpu(vm, vcpu_id)


def tdx_check_vm(vm: VM) -> int:
    """The TDX invariants, range by range (see the module docstring)."""
    td: TdxVm = vm.tdx  # type: ignore[attr-defined]
    sept = td.sept
    sept._check(td.huge_pages)
    if vm.vm_bugged:
        return 0  # a failed SEAMCALL may have left the two out of step; KVM gave up on the VM
    leaves = sept.leaves
    premapped = 0
    for s, e, v in vm._mmu.sptes.iter_ranges():
        if not v & SPTE_PRIVATE:
            continue
        level = spte_level(v)
        k = s
        while k < e:
            ls, le, lv = leaves.run_at(k)
            le = min(le, e)
            st = lv & STATE_MASK
            if not st:
                if not (td.premap and not td.runnable):
                    raise InternalInvariantError(f"mirror leaves [{k:#x}, {le:#x}) have no S-EPT leaf")
                premapped += (le - k) >> _LEVEL_SHIFT[level]
            elif st not in (PENDING, MAPPED) or leaf_level(lv) != level:
                raise InternalInvariantError(f"mirror level-{level} leaves [{k:#x}, {le:#x}) have S-EPT leaf "
                                             f"{sept.state(k)} at level {leaf_level(lv)}")
            k = le
    if premapped != td.nr_premapped:
        raise InternalInvariantError(f"{premapped} premapped mirror leaves but nr_premapped = {td.nr_premapped}")
    sptes = vm._mmu.sptes
    for s, e, v in leaves.iter_ranges():
        k = s
        while k < e:
            ms, me, mv = sptes.run_at(k)
            me = min(me, e)
            if not mv & SPTE_PRIVATE:
                raise InternalInvariantError(f"S-EPT leaves [{k:#x}, {me:#x}) ({sept.state(k)}) have no mirror leaf")
            k = me
    return 0


def tdx_guest_flows(guest: Any) -> Any:
    """The TDX Linux guest's flows for :class:`pkvm.Guest`."""
    return TdxGuestFlows(guest)


def tdx_vmm_flows(vmm: Any) -> Any:
    """QEMU's TD build for :class:`pkvm.Vmm`."""
    return TdxVmmFlows(vmm)


OPS = PlatformOps(
    name="tdx",
    vm_type=KVM_X86_TDX_VM,
    has_private_mem=True,
    has_protected_state=True,
    has_mirror_root=True,
    options=("gpaw",),
    fault_is_private=tdx_fault_is_private,
    init_vm=tdx_init_vm,
    gmem_max_mapping_level=tdx_gmem_max_mapping_level,
    max_mapping_level=tdx_max_mapping_level,
    set_external_spte=tdx_set_external_spte,
    remove_external_spte=tdx_remove_external_spte,
    split_external_spte=tdx_split_external_spte,
    create_vcpu=tdx_create_vcpu,
    check_vm=tdx_check_vm,
    guest_flows=tdx_guest_flows,
    vmm_flows=tdx_vmm_flows,
)

__all__ = ["OPS", "TD_STATE_INITIALIZED", "TD_STATE_RUNNABLE", "TdxVm", "Sept", "TraceEvent"]
