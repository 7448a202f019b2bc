"""The kernel's SNP RMP wrappers (docs/kernel-semantics.md §5.3, §5.4, §5.8): ``rmpupdate()``
over a range with the direct-map work around it, ``rmp_make_private`` / ``rmp_make_shared``,
PSMASH and the return of a freed range to the hypervisor.

Split out of :mod:`pkvm.platforms.snp` so that the platform's op table (``snp``), the RMPUPDATE
policies (``_snp_policy``) and the launch (``_snp_launch``) all import them from below, not
from each other. :mod:`pkvm.platforms.snp` re-exports the public ones.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm._core import DIRECTMAP_MODES, split_2m_runs
from pkvm.constants import PG_LEVEL_2M, PG_LEVEL_4K, RETRY_LIMIT
from pkvm.platforms.snp_constants import (
    PSMASH_FAIL_INUSE,
    PSMASH_SUCCESS,
    RMP_PAGES_2M,
)

_DM_NONE = DIRECTMAP_MODES["none"]

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

__all__ = ["make_shared_range", "psmash", "rmp_make_private", "rmp_make_shared", "rmpupdate_range"]


#: ``[start, end)`` cut at 2M boundaries into ``(s, e, level)``: the whole aligned 2M blocks as
#: one 2M piece, each partial 2M block as its own 4K piece (pkvm/_gmem.pxi).
_split_2m_runs = split_2m_runs


def _directmap(vm: VM, method: str, pfn: int, npages: int, level: int, assigned: bool) -> int:
    """Run one direct-map dispatcher (``"before_rmpupdate"`` or ``"after_rmpupdate"``) and
    account its counters; returns its CPA calls. The pfns come from the host allocator (RAM)
    and the level from the RMP wrappers, so the dispatcher's own argument checks are skipped.

    Runs in the typed core (``SnpPath.directmap``, pkvm/_gmem.pxi): the splits, unmaps and
    restores the dispatcher made are added to ``vm.stats`` and charged, with one kernel-range
    TLB flush per CPA call (split-4k) or per RMPUPDATE that unmapped or restored pages
    (unmap-restore); a CPA call under ``mmu_lock`` in an atomic policy counts as
    ``sleep_in_atomic``."""
    return vm.snp._path.directmap(method == "before_rmpupdate", pfn, npages, level, assigned)  # type: ignore[attr-defined, no-any-return]


def rmpupdate_range(vm: VM, pfn: int, npages: int, level: int, assigned: bool, gfn: int = 0,
                    immutable: bool = False, directmap: str = "both") -> int:
    """``rmpupdate()`` for every 4K (or 2M) entry of ``[pfn, pfn + npages)``: 0 or ``-EFAULT``.

    ``directmap`` selects the direct-map work done here: ``"both"`` (the wrapper's own
    ``adjust_direct_map`` / RFC invalidate + restore), ``"before"``, ``"after"`` or ``"none"``
    (the eager-split policy moves it to other phases). On a failing instruction the pages
    before it stay updated (the caller loops page by page, as the kernel does) and the failure
    is counted in ``rmpupdate_failures`` and logged in ``vm.events``.
    """
    return vm.snp._path.rmpupdate_range(pfn, npages, level, assigned, gfn, immutable,  # type: ignore[attr-defined, no-any-return]
                                        DIRECTMAP_MODES.get(directmap, _DM_NONE))


def _cpa_calls_before(vm: VM, pfn: int, npages: int, level: int, assigned: bool) -> int:
    """The direct-map CPA calls ``rmpupdate()`` makes before one RMPUPDATE (no change made):
    split-4k: ``set_memory_4k`` when a 4K update meets a 2M/1G mapping (``adjust_direct_map``);
    unmap-restore: one invalidation per page being assigned."""
    dm = vm.snp.directmap  # type: ignore[attr-defined]
    if dm.policy == "split-4k":
        return 1 if level == PG_LEVEL_4K and dm.level(pfn) > PG_LEVEL_4K else 0
    return npages if assigned else 0


def _rmpupdate_injected(vm: VM, pfn: int, npages: int, level: int, assigned: bool, gfn: int,
                        immutable: bool, directmap: str) -> int:
    """:func:`rmpupdate_range` entry by entry while a ``set_memory`` failure is armed: the
    entry whose direct-map call fails gets no RMPUPDATE (``rmpupdate()`` returns -EFAULT before
    the instruction); the entries before it are done."""
    step = RMP_PAGES_2M if level == PG_LEVEL_2M else 1
    for i in range(0, npages, step):
        calls = _cpa_calls_before(vm, pfn + i, step, level, assigned)
        hit = vm._inject.take("set_memory", calls) if calls else None
        if hit is not None:
            vm.events.append(("rmpupdate", f"direct-map change before the RMPUPDATE of pfn {pfn + i:#x} "
                              f"failed ({errno.errorcode[hit[1]]}, injected): -EFAULT, entry unchanged"))
            return -errno.EFAULT
        r = _rmpupdate_body(vm, pfn + i, step, level, assigned, gfn + i, immutable, directmap)
        if r:
            return r
    return 0


def _rmpupdate_body(vm: VM, pfn: int, npages: int, level: int, assigned: bool, gfn: int,
                    immutable: bool, directmap: str) -> int:
    """:func:`rmpupdate_range` without the injected-failure check, in the typed core
    (``SnpPath.body``, pkvm/_gmem.pxi): the direct-map work before, the RMPUPDATEs
    (``rmpupdate``, ``rmpupdate_2m`` counted and charged; a failure counted in
    ``rmpupdate_failures`` and logged in ``vm.events``), the direct-map work after for the
    entries done."""
    return vm.snp._path.body(pfn, npages, level, assigned, gfn, immutable,  # type: ignore[attr-defined, no-any-return]
                             DIRECTMAP_MODES.get(directmap, _DM_NONE))


def rmp_make_private(vm: VM, pfn: int, gfn: int, npages: int, level: int, immutable: bool = False,
                     directmap: str = "both") -> int:
    """``rmp_make_private`` over a range: assigned to this guest's ASID at ``gfn``."""
    return rmpupdate_range(vm, pfn, npages, level, True, gfn, immutable, directmap)


def rmp_make_shared(vm: VM, pfn: int, npages: int, level: int, directmap: str = "both") -> int:
    """``rmp_make_shared`` over a range: hypervisor-owned, every field zero but the size."""
    return rmpupdate_range(vm, pfn, npages, level, False, directmap=directmap)


def psmash(vm: VM, pfn: int) -> int:
    """``snp_rmptable_psmash``: PSMASH the 2M entry holding ``pfn``, retrying FAIL_INUSE.
    In the synchronous API nothing releases an entry in use, so after ``RETRY_LIMIT``
    attempts the failure is counted once and returned (the caller reports where it stopped)."""
    snp = vm.snp  # type: ignore[attr-defined]
    base = pfn & ~(RMP_PAGES_2M - 1)
    code: int = snp.rmp.psmash(base)
    st = vm._stats
    if code == PSMASH_SUCCESS:
        st["psmash"] += 1
        vm._charge("psmash", 1)
    else:
        st["psmash_failures"] += 1
        why = (f" (still FAIL_INUSE after {RETRY_LIMIT} attempts; KVM retries it until the entry is "
               "released)" if code == PSMASH_FAIL_INUSE else "")
        vm.events.append(("psmash", f"PSMASH failed for pfn {base:#x}: code {code}{why}"))
    if vm._subs is not None:
        vm._emit("rmp_change", None, None, "psmash", 1 if code == PSMASH_SUCCESS else 0, 0, code,
                 (base, base + RMP_PAGES_2M, PG_LEVEL_2M, True))
    return code


def make_shared_range(vm: VM, pfn_start: int, pfn_end: int, flush: bool, directmap: str = "both") -> int:
    """Return every assigned page of ``[pfn_start, pfn_end)`` to the hypervisor (§5.7): a 2M
    RMPUPDATE for each whole 2M entry inside the range, else PSMASH the 2M entry first (a
    failure is counted but the 4K updates go on, as the kernel's WARN does) and 4K RMPUPDATEs;
    then, if ``flush``, a cache flush of the pages made shared. Unassigned pages are skipped.
    Returns 0 or the first error. O(k log n) for k RMP runs."""
    return vm.snp._path.make_shared_range(pfn_start, pfn_end, flush,  # type: ignore[attr-defined, no-any-return]
                                          DIRECTMAP_MODES.get(directmap, _DM_NONE))
