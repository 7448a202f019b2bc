"""``KVM_X86_SNP_VM``: AMD SEV-SNP on the KVM model (docs/kernel-semantics.md §4.1, §4.4, §5,
§7.1, §7.7, §7.8).

What this platform adds (the RMP table and the direct map themselves are
:class:`pkvm._core.RmpTable` and :class:`pkvm.host.directmap.DirectMap`, see ``docs/snp-rmp.md``):

* **State** (``vm.snp``, also ``vm.rmp`` and ``vm.directmap``): the host's RMP, the host direct
  map with ``Policy.directmap``, the guest's ASID (``options={"asid": n}``, default 1) and the
  host CPU count that prices a kernel TLB flush (``options={"host_cpus": n}``, default 64).
* **The kernel's RMP wrappers** (§5.3, §5.8; in :mod:`._snp_rmp`, re-exported here):
  :func:`rmp_make_private` / :func:`rmp_make_shared`
  adjust the direct map first (policy ``split-4k``: split to 4K before a 4K update;
  ``unmap-restore``: unmap before assigning, restore after unassigning), execute RMPUPDATE over
  a whole range at once; a failure is counted (``rmpupdate_failures``), logged in
  ``vm.events`` (the kernel's ``pr_err``) and returned as ``-EFAULT``. ``FAIL_OVERLAP``, which
  Linux retries until another CPU releases the entry, is reported as a failure too (its message
  names ``RETRY_LIMIT``, docs/kvm-model.md): in a synchronous model nothing else could resolve it.
* **guest_memfd hooks**: ``gmem_prepare`` (§5.5: already assigned -> nothing; 2M iff the folio is
  2M and all 512 pfns are unassigned; else one 4K update), ``gmem_invalidate`` (§5.7: 2M update
  for a whole aligned 2M entry, else PSMASH then 4K, then a cache flush of every page made
  shared), ``gmem_max_mapping_level`` (the RMP level of the pfn, §3.5).
* **Faults**: ``fault_is_private`` is the C-bit of the access (§4.1); the RMP #NPF handler
  (§5.6) PSMASHes a 2M entry and zaps 512 gfns from the faulting one (``Policy.rmp_fault_zap
  ="2m-aligned"``: the 2M-aligned range, as a 2022 pre-guest_memfd RFC did), or does nothing
  (spurious). The
  access-time RMP check lives in :class:`pkvm.platforms._snp_vcpu.SnpVcpu`.
* **RMPUPDATE policies** (``Policy.rmp_update``, §7.7: the RFC v8 debate), in :mod:`._snp_policy`.
* **Launch** (§5.9): ``vm.snp.launch_update`` and ``vm.snp.launch_finish``.

Invariants (``vm.check()`` via :func:`snp_check_vm`): the RMP table's own invariants; no RMP
entry assigned to this guest outside guest_memfd folios except leaked pages; every private
SPTE maps pfns assigned to this guest at that GPA at an RMP level >= the SPTE level (under
``fault-time``, where the ioctl never touches the RMP; eager policies may transiently break it,
which is the race of the RFC v8 debate, §7.7); no shared SPTE maps an assigned pfn.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm._core import RangeMap, RmpTable, SnpPath
from pkvm.constants import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_SNP_VM,
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    RETRY_LIMIT,
)
from pkvm.errors import InternalInvariantError, KvmError
from pkvm.host.directmap import DirectMap
from pkvm.host.hostmem import decode_delta
from pkvm.kvm.mmu import SPTE_PRIVATE, spte_level
from pkvm.kvm.ops import PlatformOps, access_decides
from pkvm.platforms._snp_flows import SnpGuestFlows
from pkvm.platforms._snp_launch import (
    SNP_PAGE_TYPE_CPUID,
    SNP_PAGE_TYPE_NORMAL,
    SNP_PAGE_TYPE_SECRETS,
    SNP_PAGE_TYPE_UNMEASURED,
    SNP_PAGE_TYPE_ZERO,
    SnpVmmFlows,
    launch_finish,
    launch_update,
)
from pkvm.platforms._snp_policy import (
    snp_pre_set_mem_attr,
    snp_set_mem_attr,
    snp_update_mem_attr,
)
from pkvm.platforms._snp_rmp import _rmpupdate_injected, psmash, rmp_make_private, rmp_make_shared
from pkvm.platforms._snp_vcpu import SnpVcpu
from pkvm.platforms.snp_constants import (
    PSMASH_FAIL_INUSE,
    PSMASH_SUCCESS,
    RMP_PAGES_2M,
)

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.actors.guest import Guest
    from pkvm.actors.vmm import Vmm
    from pkvm.kvm.vm import VM, Vcpu

#: Counters an SNP VM adds to ``vm.stats`` (instructions, not pages, unless named ``_pages``).
SNP_STAT_KEYS = (
    "rmpupdate", "rmpupdate_2m", "rmpupdate_failures", "psmash", "psmash_failures",
    "rmp_fault", "rmp_fault_spurious", "pvalidate", "pvalidate_2m", "pvalidate_failures",
    "snp_vc", "directmap_splits", "directmap_unmaps", "directmap_restores", "directmap_cpa_calls",
    "directmap_tlb_flushes", "sleep_in_atomic", "cache_flush_pages", "psc_requests", "psc_entries",
    "snp_leaked_pages", "launch_update_pages",
)
#: Cost operations an SNP VM charges besides the generic ones (``directmap_tlb_flush`` is
#: priced with ``nr_cpus=host_cpus``).
SNP_CHARGED_OPS = ("rmpupdate", "psmash", "pvalidate_4k", "pvalidate_2m", "psc_request",
                   "cache_flush_4k", "directmap_split", "directmap_cpa_call", "sleep_in_atomic",
                   "psp_launch_update")

class SnpVm:
    """The SNP state of one VM (``vm.snp``): the host RMP and direct map, the ASID, launch state.

    ``atomic`` is True while a policy op runs under ``mmu_lock``: a direct-map change then
    counts as ``sleep_in_atomic`` if it may sleep (§5.8, §7.7). ``leaked`` holds the
    host pfns the kernel gave up on (``snp_leak_pages``): freed by guest_memfd but still
    assigned in the RMP.
    """

    _rmp: RmpTable
    _directmap: DirectMap
    #: The RMP wrappers' typed state (pkvm/_gmem.pxi), set by the platform's init.
    _path: SnpPath

    def __init__(self, vm: VM, asid: int, host_cpus: int) -> None:
        self.vm = vm
        self.asid = asid
        self.host_cpus = host_cpus
        mem = vm.hostmem
        self.rmp = RmpTable()
        self.directmap = DirectMap(ram=[(mem.start_pfn, mem.end_pfn)], policy=vm.policy.directmap)
        self.atomic = False
        self.leaked = RangeMap(0)
        #: ``pre_fault_allowed``: set by :meth:`launch_finish`.
        self.launched = False
        #: eager-split: the plans the pre phase computed, consumed under the lock / after it.
        self._split_plans: dict[tuple[int, int, int], list[tuple[str, int, int, int, int]]] = {}

    # The RMP and the direct map may be swapped for reference twins (tests): the typed wrappers
    # (``_path``, pkvm/_gmem.pxi) then go through the twins' methods.
    @property
    def rmp(self) -> RmpTable:
        """The host's RMP."""
        return self._rmp

    @rmp.setter
    def rmp(self, value: RmpTable) -> None:
        if self.vm._in_callback:
            self.vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        if isinstance(value, RmpTable):
            value._set_owner(self.vm)  # its mutators refuse from a callback too
        self._rmp = value
        if "_path" in self.__dict__:
            self._path.rebind()

    @property
    def directmap(self) -> DirectMap:
        """The host kernel's direct map."""
        return self._directmap

    @directmap.setter
    def directmap(self, value: DirectMap) -> None:
        if self.vm._in_callback:
            self.vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        if isinstance(value, DirectMap):
            value._owner = self.vm
        self._directmap = value
        if "_path" in self.__dict__:
            self._path.rebind()

    def __repr__(self) -> str:
        return f"<SnpVm asid={self.asid} rmp runs={self.rmp.nruns} directmap={self.directmap.policy}>"

    # -- launch (§5.9) ----------------------------------------------------------------------

    def launch_update(self, gpa: int, size: int, page_type: int = SNP_PAGE_TYPE_NORMAL,
                      flags: int = 0) -> int:
        """``KVM_SEV_SNP_LAUNCH_UPDATE`` on ``[gpa, gpa + size)``; returns the bytes done.

        See :func:`pkvm.platforms._snp_launch.launch_update` for the exact steps.
        """
        return launch_update(self, gpa, size, page_type, flags)

    def launch_finish(self) -> None:
        """``KVM_SEV_SNP_LAUNCH_FINISH``; see :func:`pkvm.platforms._snp_launch.launch_finish`."""
        launch_finish(self)


# -- platform ops ---------------------------------------------------------------------------------


@access_decides
def snp_fault_is_private(vm: VM, gfn: int, private: bool) -> bool:
    """The #NPF error code's ``PFERR_GUEST_ENC_MASK``: the access used C=1 (§4.1)."""
    return private


def snp_init_vm(vm: VM) -> int:
    """``KVM_CREATE_VM`` + ``KVM_SEV_INIT2``: attach ``vm.snp`` / ``vm.rmp`` / ``vm.directmap``,
    register the SNP counters and costs.

    Raises:
        KvmError: EINVAL under a policy whose guest_memfd has no prepare hook
            (``prepare="none"``, the 6.8 kernel): private pages allocated by a fault could
            never be assigned in the RMP.
        ValueError: ``options["asid"]`` not in [1, 65535] or ``options["host_cpus"]`` < 1.
    """
    pol = vm.policy
    if pol.prepare == "none":
        raise KvmError(errno.EINVAL, "KVM_CREATE_VM: an SNP VM needs guest_memfd's prepare hook "
                       f"(policy prepare={pol.prepare!r}); use e.g. Policy.preset('6.19').replace("
                       "rmp_update=...)")
    asid = vm.options.get("asid", 1)
    if type(asid) is not int or not 1 <= asid <= 0xFFFF:
        raise ValueError(f"options['asid']={asid!r} must be an int in [1, 65535]")
    host_cpus = vm.options.get("host_cpus", 64)
    if type(host_cpus) is not int or host_cpus < 1:
        raise ValueError(f"options['host_cpus']={host_cpus!r} must be a positive int")
    snp = SnpVm(vm, asid, host_cpus)
    vm.snp = snp  # type: ignore[attr-defined]
    vm.rmp = snp.rmp  # type: ignore[attr-defined]
    vm.directmap = snp.directmap  # type: ignore[attr-defined]
    snp.leaked._set_owner(vm)  # (the RMP and the direct map: the setters above)
    for key in SNP_STAT_KEYS:
        vm._stats[key] = 0
    for op in SNP_CHARGED_OPS:
        vm._costs[op] = vm._cost_model.ns(op)
    vm._costs["directmap_tlb_flush"] = vm._cost_model.ns("directmap_tlb_flush", nr_cpus=host_cpus)
    # The RMP wrappers' typed state (pkvm/_gmem.pxi), with the Python steps of the rare paths.
    snp._path = SnpPath(vm, snp, snp_gmem_prepare, snp_gmem_invalidate, _rmpupdate_injected, psmash)
    return 0


def snp_gmem_prepare(vm: VM, gfn: int, pfn: int, order: int, nr: int) -> int:
    """``sev_gmem_prepare`` for ``nr`` folios of ``2**order`` pages (§5.5).

    An assigned pfn is left alone. A 2M folio whose 512 pfns are all unassigned gets one 2M
    RMPUPDATE; otherwise only the folio's head page gets a 4K one (the kernel's ``(pfn, gfn)``).
    A batch of order-0 folios updates every unassigned run at 4K. Failure: ``-EINVAL``, having
    changed nothing for a batch (``nr > 1``: the pages done are made shared again, and the
    caller retries folio by folio).
    """
    return vm.snp._path.gmem_prepare(gfn, pfn, order, nr)  # type: ignore[attr-defined, no-any-return]


def snp_gmem_invalidate(vm: VM, pfn_start: int, pfn_end: int) -> int:
    """``sev_gmem_invalidate`` on freed folios ``[pfn_start, pfn_end)`` (§5.7). A page that
    cannot be made shared (immutable, in use) is leaked: it stays assigned and is freed anyway
    (the kernel only warns); pkvm records it in ``vm.snp.leaked`` / ``snp_leaked_pages``, a
    count the kernel does not keep on this path (no ``snp_leak_pages`` call)."""
    return vm.snp._path.gmem_invalidate(pfn_start, pfn_end)  # type: ignore[attr-defined, no-any-return]


def snp_gmem_max_mapping_level(vm: VM, pfn: int, private: bool) -> int:
    """``sev_gmem_max_mapping_level``: the RMP level of an assigned pfn, else 4K (§3.5)."""
    if not private:
        return 0
    ent = vm.snp.rmp.lookup(pfn)  # type: ignore[attr-defined]
    return ent.level if ent.assigned else PG_LEVEL_4K


def snp_handle_rmp_fault(vcpu: Vcpu, gpa: int, private: bool, write: bool, result: object) -> int:
    """``sev_handle_rmp_fault`` (§5.6 step 2). Runs only when the #NPF carried the RMP bit,
    which :class:`~pkvm.platforms._snp_vcpu.SnpVcpu` records in ``vcpu.rmp_npf``."""
    if not getattr(vcpu, "rmp_npf", False):
        return 0
    vcpu.rmp_npf = False  # type: ignore[attr-defined]
    vm = vcpu.vm
    snp = vm.snp  # type: ignore[attr-defined]
    gfn = gpa >> PAGE_SHIFT
    st = vm._stats
    st["rmp_fault"] += 1
    if not vm.get_memory_attributes(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE:
        vm.events.append(("rmp_fault", f"RMP fault on non-private gfn {gfn:#x}"))
        return 0
    slot = vm._slot_at(gfn)
    if slot is None or slot.gmem is None or slot.gmem_file is None:
        vm.events.append(("rmp_fault", f"RMP fault on gfn {gfn:#x} without guest_memfd"))
        return 0
    folio = slot.gmem.folio(gfn - slot.base_gfn + slot.gmem_pgoff)
    if folio is None:
        vm.events.append(("rmp_fault", f"RMP fault on gfn {gfn:#x}: no guest_memfd page"))
        return 0
    pfn = folio[0]
    ent = snp.rmp.lookup(pfn)
    if not ent.assigned:
        vm.events.append(("rmp_fault", f"RMP fault on gfn {gfn:#x}: pfn {pfn:#x} not assigned"))
        return 0
    if ent.level == PG_LEVEL_4K:
        st["rmp_fault_spurious"] += 1
        if vm._subs is not None:
            vm._emit("rmp_fault", gfn, gfn + 1, None, 1, 0, 0, (vcpu.id, gpa, pfn, private, write, PG_LEVEL_4K, 0))
        return 0
    ret = psmash(vm, pfn)
    if ret == PSMASH_FAIL_INUSE:
        # snp_rmptable_psmash spins until the entry is released: the vCPU never gets to the
        # zap. The synchronous API stops here (SnpVcpu reports rmp_loop with the count).
        vcpu.rmp_stuck = ("PSMASH FAIL_INUSE (snp_rmptable_psmash)", RETRY_LIMIT)  # type: ignore[attr-defined]
        return 0
    # The level the trace point prints: the first lookup's, or the second one's after a failed
    # PSMASH (sev_handle_rmp_fault reads the entry again into the same rmp_level).
    level = PG_LEVEL_2M
    if ret != PSMASH_SUCCESS:
        ent = snp.rmp.lookup(pfn)
        level = ent.level
        if ent.assigned and ent.level == PG_LEVEL_4K:
            # Another CPU split the entry first: the fault is resolved, and the kernel goes
            # straight to its trace point without zapping anything (sev_handle_rmp_fault).
            if vm._subs is not None:
                vm._emit("rmp_fault", gfn, gfn + 1, None, 1, 0, ret,
                         (vcpu.id, gpa, pfn, private, write, level, ret))
            return 0
        vm.events.append(("rmp_fault", f"PSMASH of pfn {pfn:#x} failed on an RMP fault"))
    # 6.11+ (and RFC v7/v8): kvm_zap_gfn_range(kvm, gfn, gfn + PTRS_PER_PMD) from the faulting
    # gfn itself; Policy.rmp_fault_zap="2m-aligned" (no preset; the June 2022 "Part2 v6"
    # handler): the 2M-aligned range holding it.
    base = gfn & ~(RMP_PAGES_2M - 1) if vm.policy.rmp_fault_zap == "2m-aligned" else gfn
    # kvm_zap_gfn_range (arch/x86/kvm/mmu/mmu.c): mmu_lock for write around one invalidation
    # of the range (begin, range_add, the zap, a flush if anything was zapped, end), as the
    # other zaps of docs/timeline.md's lock table.
    sched = vm._sched
    if sched is not None:
        sched.acquire("mmu_lock")
        t0 = sched.work_ns()
    else:
        t0 = vm._modeled_ns
    vm._invalidate_begin()
    vm._invalidate_range_add(base, base + RMP_PAGES_2M)
    if vm._zap(base, base + RMP_PAGES_2M):
        vm._flush_remote_tlbs()
    vm._invalidate_end()
    vm.mmu_lock_ns += (sched.work_ns() if sched is not None else vm._modeled_ns) - t0
    if sched is not None:
        sched.release("mmu_lock")
    if vm._subs is not None:  # traced on the way out, unless the entry was not assigned (§5.6)
        vm._emit("rmp_fault", gfn, gfn + 1, None, 1, 0, ret, (vcpu.id, gpa, pfn, private, write, level, ret))
    return 0


def snp_create_vcpu(vm: VM, vcpu_id: int) -> Vcpu:

    return SnpVcpu(vm, vcpu_id)


def snp_guest_flows(guest: Guest) -> SnpGuestFlows:
    """The SNP guest's conversion protocol (page-state change + PVALIDATE)."""
    return SnpGuestFlows(guest)


def snp_vmm_flows(vmm: Vmm) -> SnpVmmFlows:
    """The VMM's side of the SNP protocol."""
    return SnpVmmFlows(vmm)


def snp_check_vm(vm: VM) -> int:
    """The SNP invariants (module docstring). Raises :class:`pkvm.InternalInvariantError`."""
    snp = vm.snp  # type: ignore[attr-defined]
    rmp = snp.rmp
    try:
        rmp._check()
        snp.directmap._check()
    except AssertionError as exc:
        raise InternalInvariantError(f"SNP: {exc}") from None
    # Every assigned run belongs to this guest and lies in a guest_memfd folio (or is leaked).
    owned = RangeMap(0)
    for g in vm._gmems:
        for s, e, v in g.folios.ranges(0, g.npages):
            if v:
                d = decode_delta(v)
                owned.assign(s + d, e + d, 1)
    for s, e, v in snp.leaked.ranges(0, rmp.max_pfn):
        if v:
            owned.assign(s, e, 1)
    for s, e, ent in rmp.ranges():
        if not ent.assigned:
            continue
        if ent.asid != snp.asid:
            raise InternalInvariantError(f"SNP: pfns [{s:#x}, {e:#x}) assigned to ASID {ent.asid}, "
                                         f"not this guest's {snp.asid}")
        bad = owned.find_ne(s, e, 1)
        if bad != -1:
            raise InternalInvariantError(f"SNP: pfn {bad:#x} is assigned in the RMP but is neither a "
                                         "guest_memfd page nor leaked")
    final = vm.policy.rmp_update == "fault-time"
    for s, e, v in vm._mmu.sptes.ranges(0, 1 << 40):
        if not v:
            continue
        d = decode_delta(v)
        if v & SPTE_PRIVATE:
            if not final:
                continue
            lvl = spte_level(v)
            bad = rmp.find_ne(s + d, e - s, assigned=True, asid=snp.asid, gpa=s << PAGE_SHIFT)
            if bad != -1:
                raise InternalInvariantError(f"SNP: private SPTE of gfn {bad - d:#x} maps pfn {bad:#x}, "
                                             f"which the RMP does not assign to ASID {snp.asid} at that GPA")
            if lvl == PG_LEVEL_2M and rmp.find_ne(s + d, e - s, level=PG_LEVEL_2M) != -1:
                raise InternalInvariantError(f"SNP: 2M private SPTE over 4K RMP entries at gfn {s:#x}")
        elif rmp.find_eq(s + d, e - s, assigned=True) != -1:
            raise InternalInvariantError(f"SNP: shared SPTE at gfns [{s:#x}, {e:#x}) maps a guest-owned pfn")
    return 0



OPS = PlatformOps(
    name="snp",
    vm_type=KVM_X86_SNP_VM,
    has_private_mem=True,
    has_protected_state=True,
    options=("asid", "host_cpus"),
    fault_is_private=snp_fault_is_private,
    init_vm=snp_init_vm,
    gmem_prepare=snp_gmem_prepare,
    gmem_invalidate=snp_gmem_invalidate,
    gmem_max_mapping_level=snp_gmem_max_mapping_level,
    update_mem_attr=snp_update_mem_attr,
    set_mem_attr=snp_set_mem_attr,
    pre_set_mem_attr=snp_pre_set_mem_attr,
    handle_rmp_fault=snp_handle_rmp_fault,
    create_vcpu=snp_create_vcpu,
    check_vm=snp_check_vm,
    guest_flows=snp_guest_flows,
    vmm_flows=snp_vmm_flows,
)

__all__ = ["OPS", "SNP_PAGE_TYPE_CPUID", "SNP_PAGE_TYPE_NORMAL", "SNP_PAGE_TYPE_SECRETS", "SNP_PAGE_TYPE_UNMEASURED",
           "SNP_PAGE_TYPE_ZERO", "SNP_STAT_KEYS", "SnpVm", "psmash", "rmp_make_private", "rmp_make_shared"]
