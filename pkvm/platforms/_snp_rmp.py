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

from pkvm.constants import PAGE_SHIFT, PG_LEVEL_2M, PG_LEVEL_4K, RETRY_LIMIT
from pkvm.platforms.snp_constants import (
    PSMASH_FAIL_INUSE,
    PSMASH_SUCCESS,
    RMP_PAGES_2M,
    RMPUPDATE_FAIL_OVERLAP,
)

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

__all__ = ["make_shared_range", "psmash", "rmp_make_private", "rmp_make_shared", "rmpupdate_range"]


def _split_2m_runs(start: int, end: int) -> list[tuple[int, int, int]]:
    """``[start, end)`` cut at 2M boundaries into (s, e, level): the whole aligned 2M blocks as
    one 2M piece, each partial 2M block as its own 4K piece."""
    up = (start + RMP_PAGES_2M - 1) & ~(RMP_PAGES_2M - 1)
    down = end & ~(RMP_PAGES_2M - 1)
    out = []
    if up > start:
        out.append((start, min(up, end), PG_LEVEL_4K))
    if down > up:
        out.append((up, down, PG_LEVEL_2M))
    if end > down >= up:
        out.append((max(down, start), end, PG_LEVEL_4K))
    return out


def _directmap(vm: VM, method: str, pfn: int, npages: int, level: int, assigned: bool) -> int:
    """Run one direct-map dispatcher (``"before_rmpupdate"`` or ``"after_rmpupdate"``) and
    account its counters; returns its CPA calls. The pfns come from the host allocator (RAM)
    and the level from the RMP wrappers, so the dispatcher's own argument checks are skipped."""
    snp = vm.snp  # type: ignore[attr-defined]
    dm = snp.directmap
    sched = vm._sched
    if sched is not None:
        sched.acquire("cpa_lock")  # set_memory_*: one direct-map change at a time per host
    cnt = dm._cnt
    s0, u0, r0 = cnt["directmap_splits"], cnt["directmap_unmaps"], cnt["directmap_restores"]
    calls: int
    if method == "before_rmpupdate":
        calls = dm._before_rmpupdate(pfn, npages, level, assigned)
    else:
        calls = dm._after_rmpupdate(pfn, npages, level, assigned)
    if not calls:
        if sched is not None:
            sched.release("cpa_lock")
        return 0
    st = vm._stats
    splits = cnt["directmap_splits"] - s0
    unmaps = cnt["directmap_unmaps"] - u0
    restores = cnt["directmap_restores"] - r0
    st["directmap_splits"] += splits
    st["directmap_unmaps"] += unmaps
    st["directmap_restores"] += restores
    st["directmap_cpa_calls"] += calls
    if splits:
        vm._charge("directmap_split", splits)
    # A kernel-range TLB flush per set_memory_4k call (split-4k), per RMPUPDATE wrapper call
    # that unmapped or restored pages (unmap-restore: the _noflush helpers, one flush after).
    if dm._policy == "split-4k":
        flushes = calls
    else:
        flushes = (npages >> 9 if level == PG_LEVEL_2M else npages) if unmaps or restores else 0
    if flushes:
        st["directmap_tlb_flushes"] += flushes
        vm._charge("directmap_tlb_flush", flushes)
    if snp.atomic and (sched is None or sched.holds("mmu_lock")):
        st["sleep_in_atomic"] += calls  # each CPA call takes cpa_lock (a mutex) under mmu_lock
        vm._charge("sleep_in_atomic", calls)
        vm.events.append(("sleep_in_atomic", (f"BUG: scheduling while atomic: {calls} direct-map "
                          f"change(s) for pfns [{pfn:#x}, {pfn + npages:#x}) under mmu_lock")))
    if sched is not None:
        if flushes:
            sched.ipi("host", flushes)  # flush_tlb_kernel_range: an IPI to every host CPU
        sched.release("cpa_lock")
    return calls


def rmpupdate_range(vm: VM, pfn: int, npages: int, level: int, assigned: bool, gfn: int = 0,
                    immutable: bool = False, directmap: str = "both") -> int:
    """``rmpupdate()`` for every 4K (or 2M) entry of ``[pfn, pfn + npages)``: 0 or ``-EFAULT``.

    ``directmap`` selects the direct-map work done here: ``"both"`` (the wrapper's own
    ``adjust_direct_map`` / RFC invalidate + restore), ``"before"``, ``"after"`` or ``"none"``
    (the eager-split policy moves it to other phases). On a failing instruction the pages
    before it stay updated (the caller loops page by page, as the kernel does) and the failure
    is counted in ``rmpupdate_failures`` and logged in ``vm.events``.
    """
    if vm._inject._armed and directmap in ("both", "before") and vm._inject.armed("set_memory"):
        return _rmpupdate_injected(vm, pfn, npages, level, assigned, gfn, immutable, directmap)
    return _rmpupdate_body(vm, pfn, npages, level, assigned, gfn, immutable, directmap)


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
    snp = vm.snp  # type: ignore[attr-defined]
    if directmap in ("both", "before"):
        _directmap(vm, "before_rmpupdate", pfn, npages, level, assigned)
    if assigned:
        done, fail, code = snp.rmp.rmpupdate_range(pfn, npages, level, assigned=True, asid=snp.asid,
                                                   gpa=gfn << PAGE_SHIFT, immutable=immutable)
    else:
        done, fail, code = snp.rmp.rmpupdate_range(pfn, npages, level, assigned=False)
    st = vm._stats
    if done and vm._sched is not None:
        vm._sched.changed()  # a vCPU looping on RMP #NPF may now go on
    if done:
        st["rmpupdate"] += done
        if level == PG_LEVEL_2M:
            st["rmpupdate_2m"] += done
        vm._charge("rmpupdate", done)
    if vm._subs is not None:
        span = done << (9 if level == PG_LEVEL_2M else 0)
        vm._emit("rmp_change", gfn if assigned else None, gfn + span if assigned else None, "rmpupdate", done, 0,
                 code, (pfn, pfn + span, level, assigned))
    if code:
        st["rmpupdate_failures"] += 1
        how = (f" (still FAIL_OVERLAP after {RETRY_LIMIT} attempts; rmpupdate() retries it until "
               "another CPU releases the entry)" if code == RMPUPDATE_FAIL_OVERLAP else "")
        vm.events.append(("rmpupdate", f"RMPUPDATE failed for pfn {fail:#x} level {level}: code {code}{how}"))
        if directmap in ("both", "after") and done:
            _directmap(vm, "after_rmpupdate", pfn, done << (9 if level == PG_LEVEL_2M else 0), level, assigned)
        return -errno.EFAULT
    if directmap in ("both", "after"):
        _directmap(vm, "after_rmpupdate", pfn, npages, level, assigned)
    return 0


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
    snp = vm.snp  # type: ignore[attr-defined]
    rmp = snp.rmp
    ret = 0
    for s, e, ent in rmp.ranges(pfn_start, pfn_end - pfn_start):
        if not ent.assigned:
            continue
        if ent.level == PG_LEVEL_2M:
            # A run of 2M entries: its ends may cut an entry that continues outside the range.
            pieces = _split_2m_runs(s, e)
            for a, b, lvl in pieces:
                if lvl == PG_LEVEL_4K:
                    psmash(vm, a)
        else:
            pieces = [(s, e, PG_LEVEL_4K)]
        for a, b, lvl in pieces:
            r = rmp_make_shared(vm, a, b - a, lvl, directmap)
            if r:
                ret = ret or r
                continue
            if flush:
                vm._stats["cache_flush_pages"] += b - a
                vm._charge("cache_flush_4k", b - a)
    return ret
