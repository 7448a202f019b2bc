"""The four ``Policy.rmp_update`` designs of SNP, as phase functions (docs/kernel-semantics.md
§4.4; the RFC v8 debate of §7.7).

Each eager design turns one slot-clipped piece ``[s, e)`` of a ``KVM_SET_MEMORY_ATTRIBUTES``
call into a *plan*: the exact instruction sequence for the guest_memfd pages already allocated
in the piece (pages never allocated are skipped; their first private fault assigns them through
``gmem_prepare``). Plans are built by :func:`plan_piece`; the phases below execute them.

``plan_piece`` (``sev_update_mem_attr`` of RFC v8 48/56, range-compressed):

* to private: every allocated pfn that is not yet assigned gets ``rmp_make_private`` at its gfn,
  at 2M for each whole aligned 2M block of a 2M folio inside the piece, else at 4K. An already
  assigned pfn is skipped (pkvm's choice: a second RMPUPDATE would clear Validated on a page the
  guest already validated; the RFC's op updates it again).
* to shared: every assigned pfn gets ``rmp_make_shared``: a whole 2M entry inside the piece at
  2M, otherwise PSMASH the 2M entry first, then 4K (the RFC's op goes at 4K only).

The RFC's op stops at its first failure; a plan goes on (docs/snp.md lists these departures).

Steps are ``(kind, pfn, npages, level, gfn)`` with kind ``"private"``, ``"shared"`` or
``"psmash"``. Failures are only counted (``mem_attr_op_failures`` and ``rmpupdate_failures``),
as the kernel only warned.

Phases (``vm.py`` calls them; each runs per slot-clipped piece):

============== ============================ ============================= ======================
policy         pre phase (before mmu_lock)  under mmu_lock (POST hook,    after mmu_lock dropped
               ``pre_set_mem_attr``         after the seq bump)           ``update_mem_attr``
                                            ``set_mem_attr``
============== ============================ ============================= ======================
fault-time     —                            —                             —
eager-post     —                            —                             plan + direct map +
                                                                          RMPUPDATE + direct map
eager-locked   —                            plan + direct map (counted    —
                                            ``sleep_in_atomic``) +
                                            RMPUPDATE + direct map
eager-split    plan + direct-map "before"   RMPUPDATE / PSMASH only       direct-map "after"
               (split / unmap)                                            (restore)
============== ============================ ============================= ======================

Under ``fault-time`` the ioctl never touches the RMP: ``gmem_prepare`` assigns at the first
private fault and ``gmem_invalidate`` returns pages when the folio is freed (§4.4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.constants import KVM_MEMORY_ATTRIBUTE_PRIVATE, PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.host.hostmem import decode_delta
from pkvm.kvm.gmem import folio_order
from pkvm.platforms._snp_rmp import _directmap, _split_2m_runs, psmash, rmp_make_private, rmp_make_shared
from pkvm.platforms.snp_constants import RMP_PAGES_2M

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM, Memslot

Step = tuple[str, int, int, int, int]


def plan_piece(vm: VM, slot: Memslot, attrs: int, s: int, e: int) -> list[Step]:
    """The instruction sequence of one slot-clipped piece (module docstring). O(k log n)."""
    gmem = slot.gmem
    if gmem is None or slot.gmem_file is None:
        return []
    rmp = vm.snp.rmp  # type: ignore[attr-defined]
    to_private = bool(attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE)
    off = slot.gmem_pgoff - slot.base_gfn
    steps: list[Step] = []
    for fs, fe, v in gmem.folios.ranges(s + off, e + off):
        if not v:
            continue
        big = folio_order(v) >= 9
        d = decode_delta(v)
        gd = d + off  # pfn - gfn
        for rs, re_, ent in rmp.ranges(fs + d, fe - fs):
            if to_private:
                if ent.assigned:
                    continue
                for a, b, lvl in (_split_2m_runs(rs, re_) if big else [(rs, re_, PG_LEVEL_4K)]):
                    steps.append(("private", a, b - a, lvl, a - gd))
            else:
                if not ent.assigned:
                    continue
                if ent.level == PG_LEVEL_2M:
                    for a, b, lvl in _split_2m_runs(rs, re_):
                        if lvl == PG_LEVEL_4K:
                            steps.append(("psmash", a & ~(RMP_PAGES_2M - 1), RMP_PAGES_2M, PG_LEVEL_2M, 0))
                        steps.append(("shared", a, b - a, lvl, 0))
                else:
                    steps.append(("shared", rs, re_ - rs, PG_LEVEL_4K, 0))
    return steps


def run_plan(vm: VM, steps: list[Step], directmap: str) -> int:
    """Execute ``steps``; ``directmap`` as :func:`pkvm.platforms._snp_rmp.rmpupdate_range`
    (``"before"`` / ``"after"`` run only that direct-map half and no instruction)."""
    ret = 0
    sched = vm._sched
    if sched is not None and directmap == "both" and not vm.snp.atomic and sched.contended():  # type: ignore[attr-defined]
        # On the timeline, while another actor runs, the post-unlock op lands 2M at a time:
        # each chunk's RMPUPDATEs become visible when the chunk starts (docs/timeline.md).
        steps = [c for st in steps for c in _chunks_2m(st)]
    for kind, pfn, n, lvl, gfn in steps:
        if sched is not None and directmap == "both":
            sched.sync()
        if directmap in ("before", "after"):
            if kind != "psmash":
                method = "before_rmpupdate" if directmap == "before" else "after_rmpupdate"
                _directmap(vm, method, pfn, n, lvl, kind == "private")
            continue
        if kind == "psmash":
            psmash(vm, pfn)
            continue
        if kind == "private":
            r = rmp_make_private(vm, pfn, gfn, n, lvl, directmap=directmap)
        else:
            r = rmp_make_shared(vm, pfn, n, lvl, directmap=directmap)
        ret = ret or r
    return ret


def _chunks_2m(step: Step) -> list[Step]:
    """A 4K-level RMPUPDATE step cut at 2M pfn boundaries (other steps stay whole)."""
    kind, pfn, n, lvl, gfn = step
    if kind == "psmash" or lvl != PG_LEVEL_4K or n <= RMP_PAGES_2M:
        return [step]
    out: list[Step] = []
    end = pfn + n
    while pfn < end:
        nxt = min(end, (pfn | (RMP_PAGES_2M - 1)) + 1)
        out.append((kind, pfn, nxt - pfn, lvl, gfn))
        gfn += (nxt - pfn) if kind == "private" else 0
        pfn = nxt
    return out


def snp_pre_set_mem_attr(vm: VM, slot: Memslot, attrs: int, s: int, e: int) -> int:
    """eager-split pre phase: plan the piece and do the direct-map half that precedes the
    RMPUPDATE (split or unmap) while sleeping is still allowed."""
    if vm.policy.rmp_update != "eager-split":
        return 0
    steps = plan_piece(vm, slot, attrs, s, e)
    vm.snp._split_plans[(slot.key, s, e)] = steps  # type: ignore[attr-defined]
    return run_plan(vm, steps, "before")


def snp_set_mem_attr(vm: VM, slot: Memslot, attrs: int, s: int, e: int) -> int:
    """Under ``mmu_lock``: eager-locked runs the whole plan (counting every direct-map change
    as ``sleep_in_atomic``); eager-split runs only the RMP instructions of its plan."""
    pol = vm.policy.rmp_update
    snp = vm.snp  # type: ignore[attr-defined]
    if pol == "eager-locked":
        steps, dm = plan_piece(vm, slot, attrs, s, e), "both"
    elif pol == "eager-split":
        steps, dm = snp._split_plans.get((slot.key, s, e), []), "none"
    else:
        return 0
    snp.atomic = True
    try:
        return run_plan(vm, steps, dm)
    finally:
        snp.atomic = False


def snp_update_mem_attr(vm: VM, slot: Memslot, attrs: int, s: int, e: int) -> int:
    """After ``mmu_lock`` is dropped: eager-post runs the whole plan (RFC v8
    ``update_mem_attr``); eager-split restores the direct map of its plan."""
    pol = vm.policy.rmp_update
    if pol == "eager-post":
        return run_plan(vm, plan_piece(vm, slot, attrs, s, e), "both")
    if pol == "eager-split":
        steps = vm.snp._split_plans.pop((slot.key, s, e), [])  # type: ignore[attr-defined]
        return run_plan(vm, steps, "after")
    return 0
