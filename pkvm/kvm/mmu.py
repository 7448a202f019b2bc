"""The TDP MMU model: leaf SPTEs, large-page tracking and the nested page-fault path.

State (all range-compressed :class:`~pkvm._core.RangeMap` s, never one object per page):

* :class:`Mmu` — leaf SPTEs keyed by gfn. A value packs present, level, private and writable
  bits with the ``pfn - gfn`` delta (see :func:`make_spte`), so linearly mapped pages with
  equal flags coalesce into one run. A huge leaf at level L covers an L-aligned gfn block.
* :class:`LpageInfo` — per memslot and level (2M, 1G): chunk number (``gfn >> shift``) ->
  ``disallow_lpage`` word = reference count | ``KVM_LPAGE_MIXED_FLAG`` (docs/kernel-semantics.md §3.1).

The fault path (kernel-semantics.md §4.2) is split into the kernel's phases so that a timeline driver can
interleave them: :func:`fault_begin` (entry, ``is_private``, fast path), :func:`faultin_pfn`
(sequence snapshot, mismatch, slot checks, pfn lookup), :func:`fault_is_stale` (under
``mmu_lock``), :func:`fault_install` (hugepage adjust + install) and :func:`fault_finish`
(stats). One :class:`PageFault` may stand for N identical faults on consecutive gfns (a
"batch"): it is then accounted as N faults, which is how ``Vcpu.access`` stays O(log n).

Two roots (TDX): a VM whose platform has a mirror root keeps private mappings in the *mirror*
root and shared ones in the *direct* root. Both live in the one :class:`Mmu` map, told apart by
the leaf's ``SPTE_PRIVATE`` bit. That is exact because a gfn never has a leaf in both roots: a
leaf's private bit always equals the gfn's PRIVATE attribute (faults install only matching
leaves, and every conversion zaps at least the old type's root, §2.5), which ``vm.check()``
asserts. Zaps select roots with :func:`filter_to_root_types`; the mirror root's changes are
propagated through the platform's external-SPTE ops.

Invariants (checked by :meth:`Mmu._check`): leaf runs are aligned to their level; the
``pages_4k/2m/1g`` stats equal the number of leaves per level.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, NamedTuple, cast

from pkvm._core import AccessResult as AccessResult  # Vcpu.access's result: the typed core's light object
from pkvm._core import FaultResult as FaultResult  # the typed core's light result object
from pkvm._core import (
    FaultPath,
    RangeMap,
    _hugepage_has_attrs,
    _lpage_any_mixed,
    _lpage_clear_mixed,
    _mmu_drop_leaves,
    _mmu_make_spte,
    _mmu_map_leaf,
    _mmu_map_run,
    _mmu_split_to,
    _mmu_zap_range,
    fault_timeline,
)
from pkvm.constants import PG_LEVEL_1G, PG_LEVEL_2M
from pkvm.constants import KVM_FILTER_ALL, KVM_FILTER_PRIVATE, KVM_FILTER_SHARED  # noqa: F401  (also pkvm.kvm.mmu's)
from pkvm.errors import InternalInvariantError, KvmError
from pkvm._owned import VmOwned, refuse_nested
from pkvm.host.hostmem import decode_delta
from pkvm.kvm.fault import PageFault as PageFault  # re-exported: the fault-phase API
from pkvm.kvm.gmem import kvm_gmem_get_pfn
from pkvm.kvm.ops import is_implemented

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM, Memslot, Vcpu

#: gfn shift of each level (index = PG_LEVEL_*).
LEVEL_SHIFT = (0, 0, 9, 18)
#: ``KVM_LPAGE_MIXED_FLAG``: bit 31 of ``disallow_lpage``.
KVM_LPAGE_MIXED_FLAG = 1 << 31

SPTE_PRESENT = 1 << 0
SPTE_LEVEL_SHIFT = 1  # bits 1-2: PG_LEVEL_*
SPTE_PRIVATE = 1 << 3
SPTE_WRITABLE = 1 << 4
_SPTE_FLAGS = 0xFF

#: ``enum kvm_tdp_mmu_root_types``.
KVM_INVALID_ROOTS = 1 << 0
KVM_DIRECT_ROOTS = 1 << 1
KVM_MIRROR_ROOTS = 1 << 2
KVM_VALID_ROOTS = KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS


def filter_to_root_types(has_mirror_root: bool, attr_filter: int) -> int:
    """``kvm_gfn_range_filter_to_root_types`` plus the ``KVM_INVALID_ROOTS`` that
    ``kvm_tdp_mmu_unmap_gfn_range`` always adds.

    Without a mirror root every filter means the one direct root (which holds both kinds of
    mapping). pkvm never has an invalid root between operations: TDX mirror roots are only
    invalidated at teardown, and direct roots only by ``kvm_mmu_zap_all_fast``, which nothing
    modelled triggers for a TD (it disables the slot-zap-all quirk) and which zaps the invalid
    roots before it returns.
    """
    if not has_mirror_root:
        return KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS
    types = KVM_INVALID_ROOTS
    if attr_filter & KVM_FILTER_PRIVATE:
        types |= KVM_MIRROR_ROOTS
    if attr_filter & KVM_FILTER_SHARED:
        types |= KVM_DIRECT_ROOTS
    return types


def make_spte(delta: int, level: int, private: bool, writable: bool) -> int:
    """The RangeMap value of a present leaf mapping ``gfn -> gfn + delta`` at ``level``
    (``encode_delta(delta)`` and the flag bits; the typed core's, pkvm/_fault.pxi)."""
    return _mmu_make_spte(delta, level, bool(private), bool(writable))


def spte_level(value: int) -> int:
    """Level of an encoded present SPTE."""
    return (value >> SPTE_LEVEL_SHIFT) & 3


class Spte(NamedTuple):
    """A decoded leaf SPTE: the mapping of one gfn."""

    pfn: int
    level: int
    private: bool
    writable: bool


# ---------------------------------------------------------------------------------------------
# Leaf SPTEs


class Mmu(VmOwned):
    """The TDP MMU's leaf SPTEs of one root, range-compressed.

    Only one root is modelled: SW_PROTECTED (and SNP) keep shared and private mappings in
    one NPT, so the PRE hook's ``attr_filter`` never narrows a zap here (docs/kernel-semantics.md §2.5).
    """

    __slots__ = ("sptes", "_stats", "_charge")

    def __init__(self, stats: MutableMapping[str, int], charge: Callable[[str, int], None]) -> None:
        super().__init__()  # _owner: the VM (set by it); the mutators refuse from its callbacks
        self.sptes = RangeMap(0, _finger=True)
        self._stats = stats
        self._charge = charge  # charge(op, count): modeled time of the work done here

    def lookup(self, gfn: int) -> Spte | None:
        """The leaf mapping ``gfn``, or None. Runtime complexity: O(log n)."""
        v = self.sptes.get(gfn)
        if not v:
            return None
        return Spte(gfn + decode_delta(v), spte_level(v), bool(v & SPTE_PRIVATE), bool(v & SPTE_WRITABLE))

    def _drop_leaves(self, start: int, end: int) -> int:
        """Count and unaccount the leaves inside ``[start, end)`` (which must not cut one)."""
        return _mmu_drop_leaves(self.sptes, self._stats, start, end)

    def zap_range(self, start: int, end: int, types: int = KVM_VALID_ROOTS,
                  removed: list[tuple[int, int, int]] | None = None) -> int:
        """Zap every leaf of the roots in ``types`` that intersects ``[start, end)``; return
        how many were zapped.

        A huge leaf that straddles the range is zapped whole, as ``tdp_mmu_zap_leafs``
        does. ``types`` selects the direct root (shared leaves) and/or the mirror root
        (private leaves); it only narrows anything in a VM with a mirror root, whose caller
        also passes ``removed`` to collect the zapped mirror runs ``(start, end, value)``.
        Runtime complexity: O(log n + k) for k runs.
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        return _mmu_zap_range(self.sptes, self._stats, start, end, types, removed)

    def split_to(self, gfn: int, level: int) -> None:
        """Split the huge leaf containing ``gfn`` until the leaf there is at most ``level``.

        Models ``tdp_mmu_split_huge_page`` on the fault's walk down: the children map the same
        pfns, so no TLB flush is needed. (The typed core's, pkvm/_fault.pxi.)
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        _mmu_split_to(self.sptes, self._stats, gfn, level, self._charge)

    def map_leaf(self, gfn: int, level: int, value: int) -> tuple[bool, bool]:
        """Install one leaf at ``level`` covering ``gfn``; return ``(spurious, flush)``.

        An identical leaf already there makes the fault spurious. Smaller leaves inside the
        new leaf's block (a page table the huge leaf replaces) are dropped, which needs a TLB
        flush, as does overwriting a present leaf (``tdp_mmu_map_handle_target_level``).
        (The typed core's, pkvm/_fault.pxi.)
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        return _mmu_map_leaf(self.sptes, self._stats, gfn, level, value, self._charge)

    def map_run(self, start: int, end: int, level: int, value: int) -> None:
        """Install leaves at ``level`` over the unmapped, ``level``-aligned ``[start, end)``."""
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        _mmu_map_run(self.sptes, self._stats, start, end, level, value)

    def leaf_counts(self) -> tuple[int, int, int]:
        """Number of leaves at 4K, 2M and 1G."""
        counts = [0, 0, 0, 0]
        for s, e, v in self.sptes.iter_ranges():
            counts[spte_level(v)] += (e - s) >> LEVEL_SHIFT[spte_level(v)]
        return counts[1], counts[2], counts[3]

    def _check(self) -> None:
        """Assert leaf alignment and the per-level page counters."""
        for s, e, v in self.sptes.iter_ranges():
            level = spte_level(v)
            if not (v & SPTE_PRESENT) or level not in (1, 2, 3):
                raise InternalInvariantError(f"bad SPTE value {v:#x} on gfns [{s:#x}, {e:#x})")
            n = 1 << LEVEL_SHIFT[level]
            if s & (n - 1) or e & (n - 1):
                raise InternalInvariantError(f"level-{level} leaves on unaligned gfns [{s:#x}, {e:#x})")
        counts = self.leaf_counts()
        st = self._stats
        if counts != (st["pages_4k"], st["pages_2m"], st["pages_1g"]):
            raise InternalInvariantError(
                f"pages_4k/2m/1g stats {(st['pages_4k'], st['pages_2m'], st['pages_1g'])} != leaves {counts}"
            )


# ---------------------------------------------------------------------------------------------
# Large-page tracking


class LpageInfo(VmOwned):
    """``lpage_info`` of one memslot: per level, chunk number -> ``disallow_lpage`` word.

    Chunks are numbered absolutely (``gfn >> shift``); the kernel's slot-relative index is a
    bijection of it. Only :meth:`is_mixed`, :meth:`set_mixed` and :meth:`clear_mixed` know
    where the MIXED bit lives.
    """

    __slots__ = ("maps",)

    def __init__(self, base_gfn: int, npages: int, ugfn: int) -> None:
        super().__init__()  # _owner: the VM (set with the memslot); set_mixed / clear_mixed refuse from its callbacks
        # kernel-semantics.md §3.1 / kvm_alloc_memslot_metadata: head and tail chunks partially outside the
        # slot, and every chunk when GFN and HVA are incongruent, get disallow_lpage = 1.
        maps: list[RangeMap | None] = [None, None]
        end = base_gfn + npages
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            shift = LEVEL_SHIFT[level]
            mask = (1 << shift) - 1
            m = RangeMap(0, _finger=True)
            first, last = base_gfn >> shift, (end - 1) >> shift
            if (base_gfn ^ ugfn) & mask:
                m.assign(first, last + 1, 1)
            else:
                if base_gfn & mask:
                    m.assign(first, first + 1, 1)
                if end & mask:
                    m.assign(last, last + 1, 1)
            maps.append(m)
        # Indexed by level; the 4K slots (0 and 1) hold None and are never read.
        self.maps = cast("list[RangeMap]", maps)

    def word(self, gfn: int, level: int) -> int:
        """The whole ``disallow_lpage`` word of the chunk containing ``gfn``."""
        return self.maps[level].get(gfn >> LEVEL_SHIFT[level])

    def disallow_count(self, gfn: int, level: int) -> int:
        """The reference-count part of the word (reasons other than mixed attributes)."""
        return self.word(gfn, level) & ~KVM_LPAGE_MIXED_FLAG

    def is_mixed(self, gfn: int, level: int) -> bool:
        """``hugepage_test_mixed``."""
        return bool(self.word(gfn, level) & KVM_LPAGE_MIXED_FLAG)

    def set_mixed(self, gfn: int, level: int, mixed: bool) -> None:
        """``hugepage_set_mixed`` / ``hugepage_clear_mixed`` on one chunk."""
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        m = self.maps[level]
        idx = gfn >> LEVEL_SHIFT[level]
        v = m.get(idx)
        nv = (v | KVM_LPAGE_MIXED_FLAG) if mixed else (v & ~KVM_LPAGE_MIXED_FLAG)
        if nv != v:
            m.assign(idx, idx + 1, nv)

    def clear_mixed(self, first: int, last: int, level: int) -> None:
        """Clear MIXED on chunks ``[first, last)`` (chunk numbers, half-open)."""
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        _lpage_clear_mixed(self.maps[level], first, last)

    def any_mixed(self, first: int, last: int, level: int) -> bool:
        """Whether any chunk in ``[first, last)`` is MIXED."""
        return _lpage_any_mixed(self.maps[level], first, last)


def hugepage_has_attrs(attrs_map: RangeMap, lpage: LpageInfo, gfn: int, level: int, attrs: int) -> bool:
    """``hugepage_has_attrs`` (kernel-semantics.md §3.2) for the ``level`` chunk starting at ``gfn``.

    2M: every gfn has exactly ``attrs``. 1G: no 2M sub-chunk is MIXED and the *first* gfn of
    every sub-chunk has ``attrs`` (checked per attribute run, so O(log n + k)). Charges nothing
    (the POST hook's calls are charged in :func:`post_set_mixed`).
    """
    return _hugepage_has_attrs(attrs_map, lpage.maps[PG_LEVEL_2M], gfn, level, attrs)


def post_set_mixed(vm: VM, slot: Memslot, start: int, end: int, attrs: int) -> None:
    """``kvm_arch_post_set_memory_attributes`` on the slot-clipped ``[start, end)``.

    Per level, 2M first (1G consumes its results): the partially covered head chunk gets
    MIXED := !hugepage_has_attrs(new value), body chunks are cleared, the tail chunk is
    recomputed. What the tests read is charged (§3.2-§3.3): ``attr_check_gfn`` per gfn a 2M
    test steps to after its first (to private), ``attr_check_2m`` per 2M sub-chunk whose first
    gfn a 1G test looks up. The step runs in the typed core (``pkvm/_attr.pxi``). Runtime
    complexity: O(log n) for a range inside one 2M chunk.
    """
    vm._attr_path.post_set_mixed(slot, start, end, attrs)


# ---------------------------------------------------------------------------------------------
# The fault path


# The fault's phases are the typed core's (pkvm/_fault.pxi, ``FaultPath``, one per VM as
# ``vm._fault_path``); the functions below are their names in the model, which the timeline's
# driver (:func:`run_fault`) and the tests call.


def fault_begin(vm: VM, f: PageFault) -> None:
    """Entry (§4.2 steps 1-2): compute ``is_private`` and try the fast path.

    The gfn's attribute word is read once, here, into ``f.attr``: :func:`faultin_pfn` runs
    right after this phase in both drivers (nothing can change the attributes in between:
    the timeline only yields inside the pfn lookup), so its mismatch check reads the same
    value the kernel's second ``kvm_mem_is_private`` would."""
    vm._fault_path.begin(f)


def faultin_pfn(vm: VM, f: PageFault) -> None:
    """``kvm_mmu_faultin_pfn`` (§4.2 step 4): snapshot, mismatch, slot checks, pfn lookup
    (private: :func:`pkvm.kvm.gmem.kvm_gmem_get_pfn`; shared: the VMM's backing, populated
    on first touch, a batch clipped to uniform ``disallow_lpage`` runs at 2M and 1G).

    For a batch it also shrinks ``f.end`` to the gfns that take exactly this path.
    """
    vm._fault_path.faultin(f)


def max_mapping_level(vm: VM, f: PageFault) -> int:
    """``kvm_mmu_max_mapping_level`` + the skips of ``kvm_mmu_hugepage_adjust`` (§3.5)."""
    return vm._fault_path.max_level(f)


def fault_is_stale(vm: VM, f: PageFault) -> None:
    """``is_page_fault_stale`` under ``mmu_lock`` (§4.2 step 6): a racing invalidation."""
    vm._fault_path.stale(f)


def _set_external(vm: VM, f: PageFault, start: int, end: int, level: int) -> bool:
    """``set_external_spte_present`` for new mirror-root leaves on ``[start, end)``: the
    platform links missing tables and installs the leaves while the mirror SPTEs are frozen.
    On failure nothing is installed: ``-EBUSY`` retries the fault, anything else is fatal."""
    sched = vm._sched
    if sched is None:
        r = vm._platform.set_external_spte(vm, start, end, level, f.delta)
    else:
        # TDH.MEM.PAGE.AUG / SEPT.ADD: each AUG holds the TD's S-EPT for its seamcall_aug_sept
        # share, while other vCPUs' AUGs get TDX_OPERAND_BUSY and retry (docs/timeline.md).
        sched.sync()
        aug0 = vm._stats.get("seamcall_aug", 0)
        r = vm._platform.set_external_spte(vm, start, end, level, f.delta)
        augs = vm._stats.get("seamcall_aug", 0) - aug0
        if augs:
            sched.serialize("tdx_sept", augs * sched.sept_ns)
            sched.pagewise("tdx_sept", augs)  # the S-EPT is taken once per AUG
            sched.release("tdx_sept")
    if not r:
        return True
    f.end = f.gfn + 1
    f.nfaults = 1
    if r == -errno.EBUSY:
        f.ret = "retry"
    else:
        f.ret, f.errno = "exit", -r
    return False


def fault_install(vm: VM, f: PageFault) -> None:
    """``kvm_tdp_mmu_map`` (§4.2 step 7): hugepage adjust, then install the leaf or leaves.

    New private leaves of a VM with a mirror root are first propagated to the external page
    table (:func:`_set_external`); if that fails the mirror SPTEs keep their old value.
    """
    vm._fault_path.install(f)


def fault_finish(vm: VM, f: PageFault) -> FaultResult:
    """Post-processing in ``kvm_mmu_do_page_fault`` / ``kvm_mmu_page_fault`` (§4.2 step 9)."""
    return vm._fault_path.finish(f)


def _topup(vm: VM, f: PageFault, gfn: int) -> None:
    """``mmu_topup_memory_caches`` with a failure armed (``vm.inject_failure("mmu_topup")``): it
    runs per fault before ``kvm_mmu_faultin_pfn``, so the batch is one fault, and a failed
    top-up returns -ENOMEM having done nothing."""
    f.limit, f.single = gfn + 1, True
    hit = vm._inject.take("mmu_topup")
    if hit is not None:
        f.ret, f.errno, f.end = "exit", hit[1], gfn + 1


def run_fault(vcpu: Vcpu, gfn: int, limit: int, private: bool, write: bool,
              prefetch: bool = False) -> tuple[PageFault, FaultResult]:
    """Run every phase of one (batched) fault to completion.
    ``prefetch``: ``kvm_tdp_map_page`` from ``KVM_PRE_FAULT_MEMORY`` (no exit, no fault event).

    Without a timeline the driver is the typed core's (``FaultPath.run``); with one attached
    (:mod:`pkvm.sim`) it is the core's ``fault_timeline`` (pkvm/_sched.pxi), over the same
    phases with the timeline's hooks between them."""
    return vcpu.vm._fault_path.run(vcpu, gfn, limit, private, write, prefetch)


def _emit_fault(vcpu: Vcpu, f: PageFault, r: FaultResult, gfn: int, private: bool, write: bool,
                took: int) -> None:
    """The ``fault`` event of a fault that ran (and ``userspace_exit`` after an exit); ``took``
    is its modeled ns. Called by the drivers while the VM has subscribers."""
    vm = vcpu.vm
    n = f.nfaults if r.ret == "fixed" else 1
    step = max(1, (f.end - gfn) // n) if n > 1 else 1
    vm._emit("fault", gfn, gfn + n * step, None, n, 0, r.ret,
             (vcpu.id, step, private, write, bool(getattr(vcpu, "rmp_npf", False)), took))
    if r.ret == "exit":
        vm._emit("userspace_exit", gfn, gfn + 1, None, 1, 0, r.exit_reason or 0,
                 (r.exit_reason or 0, r.errno or 0))


def fault_path(vm: VM, base_fault: Callable[..., object], gpa_to_gfn: Callable[[object], int],
               alloc_op: str) -> FaultPath:
    """The typed fault path of ``vm`` (``vm._fault_path``), built once, after the platform's
    init: the core calls back into the functions of this module and of guest_memfd.
    ``base_fault`` is ``Vcpu._fault``; ``gpa_to_gfn`` ``page_fault``'s slow argument check;
    ``alloc_op`` the cost op of one host block of the VM's shared backing."""
    return FaultPath(vm, kvm_gmem_get_pfn, _set_external, _topup, fault_timeline, _emit_fault, base_fault,
                     gpa_to_gfn, is_implemented, KvmError, alloc_op)
