"""TDX secure EPT (S-EPT) state and the SEAMCALLs that change it (docs/kernel-semantics.md §6.2, §6.3).

:class:`Sept` is what the TDX module keeps for one TD, range-compressed:

* **leaves** — one :class:`~pkvm._core.RangeMap` keyed by gfn (private GPA >> 12, shared bit
  clear). A value packs the S-EPT leaf state and its level: ``state | level << 3`` with state
  ``PENDING`` (AUG'd, not accepted), ``MAPPED``, ``BLOCKED``, ``PENDING_BLOCKED``; FREE is
  absent. A 2M leaf stores its value on all 512 gfns, so a run of equal leaves is one run.
* **tables** — the non-leaf S-EPT pages added with ``TDH.MEM.SEPT.ADD``, one RangeMap per table
  level keyed by the table's index: a level-1 table (PT) covers a 2M chunk (``gfn >> 9``), a
  level-2 table (PD) 1G (``gfn >> 18``), level 3 (PDPT) 512G (``gfn >> 27``), and with 5-level
  EPT level 4 (PML4) 256T (``gfn >> 36``). The root table exists from TD creation. Tables are
  only removed at teardown (``TDH.PHYMEM.PAGE.RECLAIM``, not modelled), so they persist after
  their leaves are removed.
* **guest_inhibit** — beyond upstream (TDX huge pages): 2M chunk numbers where the guest
  accepted at 4K, so KVM never maps them at 2M again (one-way).

:class:`Seamcalls` is the host side of the TDX module ABI that KVM calls: every SEAMCALL
counts in ``vm.stats`` (``seamcall_<name>``), is charged through the VM's cost model, can be
made to return ``TDX_OPERAND_BUSY`` (:meth:`Seamcalls.inject_busy`, a test hook) and is
recorded in an opt-in trace. A call "on N pages" stands for N SEAMCALLs, charged as N.

Invariants (:meth:`Sept._check`): leaf values are valid and 2M leaves are 2M-aligned; every
leaf's tables exist; guest-inhibit bits only with ``Policy.tdx_huge_pages``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from pkvm._core import RangeMap
from pkvm._owned import VmOwned, refuse_nested
from pkvm.constants import PG_LEVEL_2M, PG_LEVEL_4K, TDX_OPERAND_BUSY, TDX_SUCCESS
from pkvm.errors import InternalInvariantError

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

PENDING, MAPPED, BLOCKED, PENDING_BLOCKED = 1, 2, 3, 4
STATE_MASK = 7
LEVEL_SHIFT_BITS = 3
#: S-EPT leaf state names, as ``vm.sept.state(gfn)`` returns them.
STATE_NAMES = ("free", "pending", "mapped", "blocked", "pending_blocked")

#: gfn shift of the chunk one table of each level covers (index = table level).
TABLE_SHIFT = (0, 9, 18, 27, 36)

#: SEAMCALL short names -> (counter, charged cost operation or None, leaf name in the trace).
#: ``mr_extend`` counts SEAMCALLs (16 per page) but is charged per page, as its cost row is.
#: ``demote`` is priced by the mirror split's ``huge_page_split`` (no cost row of its own).
SEAMCALLS = {
    "sept_add": ("seamcall_sept_add", "seamcall_sept_add", "TDH.MEM.SEPT.ADD"),
    "aug": ("seamcall_aug", "seamcall_aug", "TDH.MEM.PAGE.AUG"),
    "add": ("seamcall_add", "seamcall_add", "TDH.MEM.PAGE.ADD"),
    "mr_extend": ("seamcall_mr_extend", None, "TDH.MR.EXTEND"),
    "block": ("seamcall_block", "seamcall_block", "TDH.MEM.RANGE.BLOCK"),
    "track": ("seamcall_track", "seamcall_track", "TDH.MEM.TRACK"),
    "remove": ("seamcall_remove", "seamcall_remove", "TDH.MEM.PAGE.REMOVE"),
    "wbinvd": ("seamcall_wbinvd", "seamcall_wbinvd", "TDH.PHYMEM.PAGE.WBINVD"),
    "demote": ("seamcall_demote", None, "TDH.MEM.PAGE.DEMOTE"),
    "mr_finalize": ("seamcall_mr_finalize", None, "TDH.MR.FINALIZE"),
}

#: Counters a TD adds to ``vm.stats``.
TDX_STAT_KEYS = (
    *(c for c, _op, _n in SEAMCALLS.values()), "seamcall_busy", "vcpu_kicks", "tdx_page_clears",
    "tdvmcall_map_gpa", "tdcall_accept", "tdx_accepts_4k", "tdx_accept_size_faults",
)
#: Cost operations a TD charges (besides the generic ones of :mod:`pkvm.kvm.vm`).
TDX_CHARGED_OPS = ("seamcall_sept_add", "seamcall_aug", "seamcall_add", "seamcall_mr_extend",
                   "seamcall_block", "seamcall_track", "seamcall_remove", "seamcall_wbinvd",
                   "vcpu_kick", "tdx_accept_4k", "map_gpa", "td_vmm_exit")


def leaf_value(state: int, level: int) -> int:
    """The leaves-map value of an S-EPT leaf."""
    return state | level << LEVEL_SHIFT_BITS


def leaf_state(value: int) -> int:
    return value & STATE_MASK


def leaf_level(value: int) -> int:
    return value >> LEVEL_SHIFT_BITS


class TraceEvent(NamedTuple):
    """One traced step: ``op`` (a SEAMCALL's name, ``"kick"`` for a kick of every vCPU, or
    ``"clear"``) on the gfns ``[start, end)`` at ``level``; ``status`` is what it returned.

    A run of identical per-page sequences is traced step by step over the whole run: read
    ``[BLOCK [s, e), TRACK [s, e), ...]`` as the same sequence repeated for every page.
    """

    op: str
    start: int
    end: int
    level: int
    status: int = TDX_SUCCESS


class Sept(VmOwned):
    """The S-EPT of one TD. ``levels`` is 4 (GPAW 48) or 5 (GPAW 52)."""

    __slots__ = ("leaves", "tables", "guest_inhibit", "levels")

    def __init__(self, levels: int) -> None:
        # _owner: the TD's VM (set by its init), or None: add_tables refuses from an event
        # callback of it (pkvm._owned)
        super().__init__()
        self.levels = levels
        self.leaves = RangeMap(0)
        #: table level -> RangeMap(table index -> 1); level ``levels`` is the root, always there.
        self.tables: list[RangeMap | None] = [None] + [RangeMap(0) for _ in range(1, levels)]
        self.guest_inhibit = RangeMap(0)

    # -- queries --------------------------------------------------------------------------

    def state(self, gfn: int) -> str:
        """``"free"``, ``"pending"``, ``"mapped"``, ``"blocked"`` or ``"pending_blocked"``.

        >>> Sept(4).state(0x1234)
        'free'
        """
        if type(gfn) is not int or gfn < 0:
            raise TypeError(f"gfn must be a non-negative int, not {gfn!r}")
        return STATE_NAMES[self.leaves.get(gfn) & STATE_MASK]

    def level(self, gfn: int) -> int:
        """The level (``PG_LEVEL_4K`` / ``PG_LEVEL_2M``) of the leaf holding ``gfn``, or 0."""
        return leaf_level(self.leaves.get(gfn))

    def has_table(self, table_level: int, gfn: int) -> bool:
        """Whether the level-``table_level`` S-EPT table covering ``gfn`` exists (the root
        always does)."""
        if table_level >= self.levels:
            return True
        return bool(self.tables[table_level].get(gfn >> TABLE_SHIFT[table_level]))  # type: ignore[union-attr]

    def nr_tables(self) -> int:
        """Non-leaf S-EPT pages added so far. Runtime complexity: O(k) for k table runs."""
        return sum(e - s for m in self.tables[1:] for s, e, _v in m.iter_ranges())  # type: ignore[union-attr, misc]

    def is_inhibited(self, gfn: int) -> bool:
        """Whether the guest-inhibit bit of ``gfn``'s 2M chunk is set (TDX huge pages)."""
        return bool(self.guest_inhibit.get(gfn >> 9))

    def runs(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, str, int]]:
        """Leaf runs ``(start, end, state, level)`` inside ``[start, end)``, clipped."""
        return [(s, e, STATE_NAMES[v & STATE_MASK], leaf_level(v)) for s, e, v in self.leaves.ranges(start, end)]

    def missing_tables(self, start: int, end: int, leaf_lvl: int) -> list[tuple[int, int, int]]:
        """Table runs ``(table level, first index, end index)`` that installing leaves of
        level ``leaf_lvl`` on gfns ``[start, end)`` must add, top-down (the walk's order)."""
        out = []
        for t in range(self.levels - 1, leaf_lvl - 1, -1):
            m = self.tables[t]
            sh = TABLE_SHIFT[t]
            a, b = start >> sh, ((end - 1) >> sh) + 1
            k = a
            while k < b:
                s, e, v = m.run_at(k)  # type: ignore[union-attr]
                e = min(e, b)
                if not v:
                    out.append((t, k, e))
                k = e
        return out

    def add_tables(self, runs: list[tuple[int, int, int]]) -> None:
        """Add the table runs ``(table level, first index, end index)`` (as :meth:`missing_tables`
        gives them)."""
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        for t, a, b in runs:
            self.tables[t].assign(a, b, 1)  # type: ignore[union-attr]

    # -- invariants -----------------------------------------------------------------------

    def _check(self, huge_pages: bool) -> None:
        """Assert the structural invariants; raises :class:`InternalInvariantError`."""
        for s, e, v in self.leaves.iter_ranges():
            st, lvl = v & STATE_MASK, leaf_level(v)
            if st not in (PENDING, MAPPED, BLOCKED, PENDING_BLOCKED) or lvl not in (PG_LEVEL_4K, PG_LEVEL_2M):
                raise InternalInvariantError(f"S-EPT leaves [{s:#x}, {e:#x}) have a bad value {v:#x}")
            if lvl == PG_LEVEL_2M and (s & 511 or e & 511):
                raise InternalInvariantError(f"2M S-EPT leaves on unaligned gfns [{s:#x}, {e:#x})")
            if self.missing_tables(s, e, lvl):
                raise InternalInvariantError(f"S-EPT leaves [{s:#x}, {e:#x}) lack a page table: "
                                             f"{self.missing_tables(s, e, lvl)[:2]}")
        if len(self.guest_inhibit) and not huge_pages:
            raise InternalInvariantError("guest-inhibit bits are set without Policy.tdx_huge_pages")
        try:
            self.leaves._check()
            self.guest_inhibit._check()
            for m in self.tables[1:]:
                m._check()  # type: ignore[union-attr]
        except AssertionError as exc:
            raise InternalInvariantError(f"S-EPT RangeMap structure: {exc}") from exc


class Seamcalls:
    """Counting, charging, BUSY injection and tracing of the SEAMCALLs KVM issues for one TD."""

    __slots__ = ("_vm", "_busy", "trace")

    def __init__(self, vm: VM) -> None:
        self._vm = vm
        self._busy: dict[str, int] = {}
        #: Opt-in list of :class:`TraceEvent`; None (the default) records nothing.
        self.trace: list[TraceEvent] | None = None

    def inject_busy(self, seamcall: str, times: int = 1) -> None:
        """Test hook: the next ``times`` calls of ``seamcall`` (a key of :data:`SEAMCALLS`:
        ``"aug"``, ``"block"``, ...) return ``TDX_OPERAND_BUSY`` and change nothing.

        Raises:
            ValueError: an unknown SEAMCALL or a negative count.
        """
        if self._vm._in_callback:
            self._vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        if seamcall not in SEAMCALLS:
            raise ValueError(f"seamcall={seamcall!r} is not one of {', '.join(SEAMCALLS)}")
        if type(times) is not int or times < 0:
            raise ValueError(f"times={times!r} must be a non-negative int")
        if times:
            self._busy[seamcall] = self._busy.get(seamcall, 0) + times
        else:
            self._busy.pop(seamcall, None)

    def armed(self, *names: str) -> bool:
        """Whether a BUSY is pending for any of ``names`` (then callers work page by page)."""
        busy = self._busy
        return bool(busy) and any(n in busy for n in names)

    def call(self, name: str, n: int = 1, start: int = 0, end: int = 0, level: int = 0,
             status: int = TDX_SUCCESS) -> int:
        """Issue ``n`` SEAMCALLs ``name`` (on the gfns ``[start, end)``); return the status.

        With a BUSY pending, only the first call is issued: it returns ``TDX_OPERAND_BUSY``
        and the caller changes nothing. ``status`` is what the calls return otherwise (the
        caller decides it from the S-EPT state; it is recorded in the trace).
        """
        if self._vm._in_callback:
            self._vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        vm = self._vm
        counter, op, leaf = SEAMCALLS[name]
        left = self._busy.get(name)
        if left:
            if left == 1:
                del self._busy[name]
            else:
                self._busy[name] = left - 1
            vm._stats[counter] += 1
            vm._stats["seamcall_busy"] += 1
            if op:
                vm._charge(op, 1)
            if vm._subs is not None:
                unit = (end - start) // n if n else 0
                vm._emit("sept_change", start, start + unit, leaf, 1, 0, TDX_OPERAND_BUSY, (level,))
            if self.trace is not None:
                unit = (end - start) // n if n else 0
                self.trace.append(TraceEvent(leaf, start, start + unit, level, TDX_OPERAND_BUSY))
            return TDX_OPERAND_BUSY
        vm._stats[counter] += n
        if op:
            vm._charge(op, n)
        if vm._subs is not None:
            vm._emit("sept_change", start, end, leaf, n, 0, status, (level,))
        if self.trace is not None:
            self.trace.append(TraceEvent(leaf, start, end, level, status))
        return status

    def mr_extend(self, npages: int, start: int) -> int:
        """``TDH.MR.EXTEND`` over ``npages`` pages: 16 SEAMCALLs (256 B each) per page,
        charged per page (``seamcall_mr_extend`` is priced per 4K page measured)."""
        if self._vm._in_callback:
            self._vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        st = self.call("mr_extend", npages * 16, start, start + npages, PG_LEVEL_4K)
        if st == TDX_SUCCESS:
            self._vm._charge("seamcall_mr_extend", npages)
        return st

    def kick_all(self, times: int = 1, start: int = 0, end: int = 0) -> None:
        """``kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)`` ``times`` times: every
        vCPU (``max(VM(nr_vcpus), created vCPUs)``) is kicked, one ``vcpu_kick`` each."""
        if self._vm._in_callback:
            self._vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        vm = self._vm
        n = max(vm.nr_vcpus, len(vm._vcpus)) * times
        vm._stats["vcpu_kicks"] += n
        vm._charge("vcpu_kick", n)
        sched = vm._sched
        if sched is not None:
            # KVM_REQ_OUTSIDE_GUEST_MODE waits for every vCPU in guest mode to exit
            # (virt/kvm/kvm_main.c: kvm_make_all_cpus_request): each request interrupts the
            # other vCPUs once, as a remote TLB flush does (docs/timeline.md)
            sched.ipi("vm", times)
        if self.trace is not None:
            self.trace.append(TraceEvent("kick", start, end, 0))

    def clear(self, npages: int, start: int) -> None:
        """``tdx_quirk_reset_page``: MOVDIR64B over the removed pages (counted, no cost row)."""
        if self._vm._in_callback:
            self._vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        self._vm._stats["tdx_page_clears"] += npages
        if self.trace is not None:
            self.trace.append(TraceEvent("clear", start, start + npages, PG_LEVEL_4K))
