"""The host kernel's direct map, as SEV-SNP's RMPUPDATE wrapper changes it (kernel-semantics.md §5.8).

The direct map is the kernel's linear mapping of all RAM. A host *write* through a 2M or 1G
mapping that covers a guest-private 4K page raises an RMP #PF, so the kernel adjusts the direct
map around every RMPUPDATE. Two designs are modelled, selected by ``policy``:

``"split-4k"`` (final, 6.11+, ``adjust_direct_map``)
    Before a 4K RMPUPDATE, if the page is mapped by a 2M or 1G page, split that mapping down to
    4K (``set_memory_4k``: a 1G page becomes 512 2M pages, then the 2M page holding the pfn
    becomes 512 4K pages). 2M RMPUPDATEs need nothing. Pages stay mapped and mappings are never
    re-coalesced.
``"unmap-restore"`` (RFC v8-v11, 2023)
    Before an RMPUPDATE that assigns pages, make every page of the new entry not-present
    (``set_direct_map_invalid_noflush`` page by page, splitting large mappings on the way);
    after one that returns pages to the hypervisor, make them present again
    (``set_direct_map_default_noflush``). Restored pages stay 4K.

Every such change is a CPA (``change_page_attr``) call, which takes ``cpa_lock`` (a spinlock)
around its page-table change; ``set_memory_4k`` may sleep (``vm_unmap_aliases`` takes a mutex),
and so may a ``_noflush`` call that splits (the page-table page is allocated with ``GFP_KERNEL``)
(kernel-semantics.md §5.8, §7.7). The operations therefore return the number of CPA calls they
made; the SNP VM counts the ones that may sleep under the MMU lock (the eager-locked policy) as
``sleep_in_atomic``.

State is one :class:`~pkvm._core.RangeMap` from pfn to the mapping that covers it (level, and a
not-present bit for unmapped 4K pages), plus the boot-time layout it started from; memory grows
with the number of distinct runs, not with host memory. Every operation is O((k + 1) log n) for
k mapping runs in its range.

Invariants (:meth:`DirectMap._check`): exactly the RAM pfns are mapped or unmapped-4K; 1G
mappings cover whole aligned 1G blocks and 2M mappings whole aligned 2M blocks; only 4K pages are
ever not present; no page is mapped at a larger level than at boot; the fragmented-page count
equals the pages whose large boot mapping was split.

Like pkvm's other Python layers, every operation validates its arguments before changing
anything; a ``MemoryError`` from the range map while committing is treated as fatal.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from typing import Any

from pkvm._core import (RangeMap, directmap_invalidate, directmap_restore, directmap_split_4k,
                        directmap_unmap_restore)
from pkvm._owned import VmOwned, refuse_nested
from pkvm.constants import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

__all__ = ["DEFAULT_RAM", "DIRECTMAP_POLICIES", "DirectMap", "boot_layout"]

#: The direct-map policies, named after ``pkvm.Policy.directmap``.
DIRECTMAP_POLICIES = ("split-4k", "unmap-restore")

#: Host RAM when none is given: pfns ``[1 << 20, (1 << 20) + (1 << 34))`` (64 TiB above 4 GiB),
#: the range :class:`pkvm.host.hostmem.HostMemory` allocates from by default.
DEFAULT_RAM = ((1 << 20, (1 << 20) + (1 << 34)),)

_PAGES = {PG_LEVEL_4K: 1, PG_LEVEL_2M: 1 << 9, PG_LEVEL_1G: 1 << 18}
_P2M = 1 << 9
_P1G = 1 << 18
_ABSENT = 4  # value bit: the 4K page is not present (unmapped); the low bits hold the level
_LEVEL_MASK = 3

_COUNTER_NAMES = ("directmap_splits", "directmap_unmaps", "directmap_restores",
                  "directmap_cpa_calls")


def _down(x: int, size: int) -> int:
    return x - x % size


def _up(x: int, size: int) -> int:
    return -(-x // size) * size


def _as_int(obj: Any, name: str) -> int:
    if type(obj) is int:  # the common case, first
        return obj
    if isinstance(obj, (float, complex, str, bytes)):
        raise TypeError(f"{name} must be an integer, not {type(obj).__name__}")
    try:
        return operator.index(obj)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(obj).__name__}") from None


def boot_layout(start: int, end: int) -> list[tuple[int, int, int]]:
    """The boot-time mappings of the RAM range ``[start, end)`` as ``(start, end, level)``.

    Follows x86 ``split_mem_range``: 4K up to the first 2M boundary, 2M up to the first 1G
    boundary, 1G pages for whole 1G blocks, then 2M and a 4K tail. Empty pieces are omitted.

    >>> for start, end, level in boot_layout(0x3fe00, 0x80300):
    ...     print(hex(start), hex(end), level)
    0x3fe00 0x40000 2
    0x40000 0x80000 3
    0x80000 0x80200 2
    0x80200 0x80300 1
    """
    out: list[tuple[int, int, int]] = []

    def piece(a: int, b: int, level: int) -> None:
        if a < b:
            out.append((a, b, level))

    m0, m1 = min(_up(start, _P2M), end), max(_down(end, _P2M), start)
    if m0 >= m1:
        piece(start, end, PG_LEVEL_4K)
        return out
    g0, g1 = min(_up(start, _P1G), m1), max(_down(end, _P1G), m0)
    piece(start, m0, PG_LEVEL_4K)
    if g0 < g1:
        piece(m0, g0, PG_LEVEL_2M)
        piece(g0, g1, PG_LEVEL_1G)
        piece(g1, m1, PG_LEVEL_2M)
    else:
        piece(m0, m1, PG_LEVEL_2M)
    piece(m1, end, PG_LEVEL_4K)
    return out


class DirectMap(VmOwned):
    """The kernel direct map of host RAM and the SNP policy that maintains it.

    ``ram`` is an iterable of half-open pfn ranges ``[start, end)`` of host RAM (touching ranges
    merge); ``policy`` is ``"split-4k"`` or ``"unmap-restore"``. Counters (:attr:`counters`):
    ``directmap_splits`` (large mappings split, 1G -> 2M and 2M -> 4K each count one),
    ``directmap_unmaps`` / ``directmap_restores`` (pages made not-present / present again) and
    ``directmap_cpa_calls`` (CPA calls, each taking ``cpa_lock``).

    >>> dm = DirectMap(ram=[(0, 1 << 18)])
    >>> dm.level(5), dm.fragmented_fraction()
    (3, 0.0)
    >>> dm.before_rmpupdate(5, 1, 1, assigned=True)       # split 1G -> 2M -> 4K: one CPA call
    1
    >>> dm.level(5), dm.level(512), dm.counters["directmap_splits"]
    (1, 2, 2)
    """

    __slots__ = ("_cnt", "_fragmented", "_map", "_orig", "_policy", "_ram", "_ram_pages",
                 "_ram_starts")

    #: The typed core's SNP RMPUPDATE wrappers walk this class's maps in C (``SnpPath.rebind``,
    #: pkvm/_gmem.pxi, looks for this mark in the class's own namespace, so a subclass or a
    #: reference twin goes through its methods; the core need not import this layer above it).
    _core_walks = True

    def __init__(self, ram: Iterable[tuple[int, int]] = DEFAULT_RAM,
                 policy: str = "split-4k") -> None:
        if policy not in DIRECTMAP_POLICIES:
            raise ValueError(f"policy must be one of {DIRECTMAP_POLICIES}, not {policy!r}")
        super().__init__()  # _owner: the SNP VM (set by its init); the changes refuse from its callbacks
        ranges = []
        for i, r in enumerate(ram):
            try:
                a, b = r
            except (TypeError, ValueError):
                raise TypeError(
                    f"ram[{i}] must be a (start_pfn, end_pfn) pair, not {r!r}") from None
            a, b = _as_int(a, f"ram[{i}] start"), _as_int(b, f"ram[{i}] end")
            if not 0 <= a < b <= 1 << 40:
                raise ValueError(f"ram[{i}] [{a:#x}, {b:#x}) is empty or outside [0, 2**40)")
            ranges.append((a, b))
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and a < merged[-1][1]:
                raise ValueError(f"ram ranges overlap at pfn {a:#x}")
            if merged and a == merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        self._ram = merged
        self._ram_starts = [a for a, _ in merged]
        self._ram_pages = sum(b - a for a, b in merged)
        self._orig = RangeMap(0)
        for a, b in merged:
            for s, e, level in boot_layout(a, b):
                self._orig.assign(s, e, level)
        self._map = self._orig.copy()
        self._policy = policy
        self._cnt = dict.fromkeys(_COUNTER_NAMES, 0)
        self._fragmented = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def policy(self) -> str:
        """``"split-4k"`` or ``"unmap-restore"``."""
        return self._policy

    @property
    def ram(self) -> list[tuple[int, int]]:
        """The merged RAM ranges ``[start, end)``, in pfn order."""
        return list(self._ram)

    @property
    def ram_pages(self) -> int:
        """Number of RAM pages (the denominator of :meth:`fragmented_fraction`)."""
        return self._ram_pages

    def level(self, pfn: int) -> int:
        """Level of the mapping covering ``pfn`` (1, 2, 3), or 0 if unmapped or not RAM.

        Runtime complexity: O(log n).
        """
        v = self._map.get(_as_int(pfn, "pfn"))
        return 0 if v & _ABSENT else v & _LEVEL_MASK

    def is_present(self, pfn: int) -> bool:
        """Whether ``pfn`` is RAM and mapped. Runtime complexity: O(log n)."""
        v = self._map.get(_as_int(pfn, "pfn"))
        return v != 0 and not v & _ABSENT

    def boot_level(self, pfn: int) -> int:
        """Level of the boot-time mapping of ``pfn``, or 0 if not RAM."""
        return self._orig.get(_as_int(pfn, "pfn"))

    def ranges(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, int, bool]]:
        """Runs ``(start, end, level, present)`` of RAM in ``[start, end)`` (all RAM by default).

        Runtime complexity: O(log n + k) for k runs.
        """
        start = _as_int(start, "start")
        end = (1 << 40) if end is None else _as_int(end, "end")
        return [(a, b, v & _LEVEL_MASK, not v & _ABSENT)
                for a, b, v in self._map.ranges(start, end)]

    @property
    def counters(self) -> dict[str, int]:
        """The counters, as a new dict."""
        return dict(self._cnt)

    def reset_counters(self) -> None:
        """Set every counter to 0 (the fragmentation is state, not a counter)."""
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        for k in self._cnt:
            self._cnt[k] = 0

    def fragmented_pages(self) -> int:
        """RAM pages no longer mapped at their large (2M/1G) boot-time level."""
        return self._fragmented

    def fragmented_fraction(self) -> float:
        """:meth:`fragmented_pages` as a fraction of all RAM pages."""
        return self._fragmented / self._ram_pages

    @property
    def nbytes(self) -> int:
        """Bytes of C memory held by the range maps."""
        return self._map.nbytes + self._orig.nbytes

    def __repr__(self) -> str:
        return (f"DirectMap(policy={self._policy!r}, ram_pages={self._ram_pages:#x}, "
                f"runs={len(self._map)}, fragmented={self.fragmented_fraction():.3g})")

    # -- validation ---------------------------------------------------------------------------

    def _check_range(self, pfn: Any, npages: Any) -> tuple[int, int]:
        """``[pfn, pfn + npages)`` as ints, which must lie in RAM (else the kernel's -EINVAL)."""
        p = _as_int(pfn, "pfn")
        n = _as_int(npages, "npages")
        if n < 0:
            raise ValueError(f"npages must be >= 0, not {n}")
        if p < 0:
            raise ValueError(f"pfn must be >= 0, not {p}")
        if n:
            i = bisect.bisect_right(self._ram_starts, p) - 1
            if i < 0 or p + n > self._ram[i][1]:
                raise ValueError(f"pfn range [{p:#x}, {p + n:#x}) is not all RAM "
                                 "(pfn_valid() fails: the kernel returns -EINVAL)")
        return p, n

    @staticmethod
    def _check_level(level: Any, p: int, n: int) -> int:
        lvl = _as_int(level, "level")
        if lvl not in (PG_LEVEL_4K, PG_LEVEL_2M):
            raise ValueError(f"level must be PG_LEVEL_4K (1) or PG_LEVEL_2M (2), not {lvl}: "
                             "RMP entries are 4K or 2M")
        if lvl == PG_LEVEL_2M and (p % _P2M or n % _P2M):
            raise ValueError(f"a 2M update needs a 2M-aligned pfn and npages, not pfn {p:#x}, "
                             f"npages {n:#x}")
        return lvl

    # -- changes ------------------------------------------------------------------------------

    def adjust(self, pfn: int, npages: int = 1, level: int = PG_LEVEL_4K) -> int:
        """``adjust_direct_map`` for each RMPUPDATE of ``[pfn, pfn + npages)`` at ``level``.

        4K: split the 2M/1G mappings that cover the range down to 4K; 2M: nothing (kernel-semantics.md §5.8).
        Returns the number of CPA calls (``set_memory_4k``, one per 2M block split; each takes
        ``cpa_lock``). Runtime complexity: O((k + 1) log n).

        Raises:
            TypeError, ValueError: bad arguments, a pfn that is not RAM, a level other than
            4K/2M or an unaligned 2M range (the kernel's -EINVAL). Nothing changes.
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        p, n = self._check_range(pfn, npages)
        return self._adjust(p, n, self._check_level(level, p, n))

    def _adjust(self, p: int, n: int, lvl: int) -> int:
        """:meth:`adjust` of a range and level already checked."""
        if lvl == PG_LEVEL_2M or n == 0:
            return 0
        if n == 1 and self._map.get(p) & _LEVEL_MASK < PG_LEVEL_2M:
            return 0  # already mapped at 4K (or unmapped): nothing to split, no CPA call
        # Split every large mapping over the range down to 4K in the 2M blocks it touches, as
        # CPA does when one 4K page of each touched 2M block gets its own attributes (a 1G
        # page first becomes 512 2M pages, then each touched 2M page 512 4K pages): one CPA
        # call per 2M block split, every split counted (the typed core's walk, which the SNP
        # RMPUPDATE wrappers also call).
        return directmap_split_4k(self, p, p + n)

    def invalidate(self, pfn: int, npages: int = 1) -> int:
        """RFC ``invalidate_direct_map``: make ``[pfn, pfn + npages)`` not present, page by page.

        Large mappings in the way are split first. Returns the CPA calls made (one per page,
        each taking ``cpa_lock``). Runtime complexity: O((k + 1) log n).

        Raises:
            TypeError, ValueError: bad arguments or a pfn that is not RAM. Nothing changes.
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        p, n = self._check_range(pfn, npages)
        return self._invalidate(p, n)

    def _invalidate(self, p: int, n: int) -> int:
        """:meth:`invalidate` of a range already checked."""
        if n == 0:
            return 0
        # split, unmap, and the counters: the typed core's walk
        self._fragmented += directmap_invalidate(self._map, self._orig, p, p + n, self._cnt)
        return n

    def restore(self, pfn: int, npages: int = 1) -> int:
        """RFC ``restore_direct_map``: make ``[pfn, pfn + npages)`` present again, at 4K.

        Pages already present keep their mapping (CPA preserves a large page whose attributes
        do not change). Returns the CPA calls made (one per page, each taking ``cpa_lock``).
        Runtime complexity: O((k + 1) log n).

        Raises:
            TypeError, ValueError: bad arguments or a pfn that is not RAM. Nothing changes.
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        p, n = self._check_range(pfn, npages)
        return self._restore(p, n)

    def _restore(self, p: int, n: int) -> int:
        """:meth:`restore` of a range already checked."""
        if n == 0:
            return 0
        directmap_restore(self._map, p, p + n, self._cnt)  # absent -> 4K, and the counters
        return n

    def before_rmpupdate(self, pfn: int, npages: int, level: int, *, assigned: bool) -> int:
        """What the kernel's ``rmpupdate()`` does to the direct map before the instruction(s).

        For the RMPUPDATEs of ``[pfn, pfn + npages)`` at ``level`` making pages ``assigned``
        (guest-owned) or not: ``"split-4k"`` runs :meth:`adjust`; ``"unmap-restore"`` runs
        :meth:`invalidate` when ``assigned``. Returns the CPA calls made (mutex acquisitions).

        Raises:
            TypeError, ValueError: as :meth:`adjust`. Nothing changes.
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        p, n = self._check_range(pfn, npages)
        return self._before_rmpupdate(p, n, self._check_level(level, p, n), assigned)

    def _before_rmpupdate(self, p: int, n: int, lvl: int, assigned: bool) -> int:
        """:meth:`before_rmpupdate` on checked arguments (the SNP wrappers' internal entry:
        their pfns come from the host allocator, which hands out RAM only)."""
        if self._policy == "split-4k":
            return self._adjust(p, n, lvl)
        return directmap_unmap_restore(self, True, assigned, p, p + n)  # invalidate if assigned

    def after_rmpupdate(self, pfn: int, npages: int, level: int, *, assigned: bool) -> int:
        """What ``rmpupdate()`` does after RMPUPDATEs that succeeded on ``[pfn, pfn + npages)``.

        ``"unmap-restore"`` runs :meth:`restore` when the pages went back to the hypervisor
        (not ``assigned``); ``"split-4k"`` does nothing. Returns the CPA calls made.

        Raises:
            TypeError, ValueError: as :meth:`adjust`. Nothing changes.
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        p, n = self._check_range(pfn, npages)
        return self._after_rmpupdate(p, n, self._check_level(level, p, n), assigned)

    def _after_rmpupdate(self, p: int, n: int, lvl: int, assigned: bool) -> int:
        """:meth:`after_rmpupdate` on checked arguments."""
        if self._policy == "split-4k":
            return 0
        return directmap_unmap_restore(self, False, assigned, p, p + n)  # restore unless assigned

    # -- invariants ---------------------------------------------------------------------------

    def _check(self) -> None:
        """Assert the invariants in the module docstring; raise ``AssertionError``."""
        self._map._check()
        self._orig._check()
        covered = 0
        for a, b, v in self._map.ranges():
            i = bisect.bisect_right(self._ram_starts, a) - 1
            assert i >= 0 and b <= self._ram[i][1], f"mapping [{a:#x}, {b:#x}) outside RAM"
            covered += b - a
            level = v & _LEVEL_MASK
            assert level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G) and v & ~7 == 0, (
                f"[{a:#x}, {b:#x}) stores {v:#x}")
            assert not v & _ABSENT or level == PG_LEVEL_4K, (
                f"[{a:#x}, {b:#x}) is not present but mapped at level {level}")
            size = _PAGES[level]
            assert a % size == 0 and b % size == 0, (
                f"level-{level} mapping [{a:#x}, {b:#x}) is not made of whole aligned pages")
        assert covered == self._ram_pages, f"{covered:#x} pages mapped, {self._ram_pages:#x} RAM"
        frag = 0
        for a, b, boot in self._orig.ranges():
            for s, e, v in self._map.ranges(a, b):
                level = v & _LEVEL_MASK
                assert level <= boot, f"[{s:#x}, {e:#x}) mapped above its boot level {boot}"
                if boot >= PG_LEVEL_2M and (level != boot or v & _ABSENT):
                    frag += e - s
        assert frag == self._fragmented, (
            f"fragmented count {self._fragmented:#x} != {frag:#x} pages split")
