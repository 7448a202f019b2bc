"""Slow, obviously-correct twins of ``RmpTable`` and ``DirectMap``.

Test oracles in the sense of :mod:`pkvm.testing.reference`: the same operations, one Python object per
page, each rule written the way the kernel reference states it (kernel-semantics.md §5.1-§5.8, with the
choices of ``docs/snp-rmp.md``), so that a differential test can compare every entry and every
counter after every step. Only usable on small ranges (thousands of pages).

- :class:`RefRmpTable` keeps a dict ``pfn -> entry dict`` (absent = hypervisor-owned 4K entry)
  and executes each instruction on its 1 or 512 entries; range forms are plain loops over
  instructions that stop at the first non-zero code.
- :class:`RefDirectMap` keeps the direct map as a page table would: a dict from each mapping's
  first pfn to ``(level, present)``; a split replaces one mapping by 512 smaller ones.

Arguments are trusted (the core's validation is tested against the core itself).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any, ClassVar

from pkvm.constants import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.host.directmap import boot_layout
from pkvm.platforms.snp_constants import (
    PSMASH_FAIL_INPUT,
    PSMASH_FAIL_INUSE,
    PSMASH_FAIL_PERMISSION,
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_NOUPDATE,
    PVALIDATE_FAIL_SIZEMISMATCH,
    PVALIDATE_NPF_RMP,
    PVALIDATE_NPF_SIZEM,
    RMPUPDATE_FAIL_INPUT,
    RMPUPDATE_FAIL_INUSE,
    RMPUPDATE_FAIL_OVERLAP,
    RMPUPDATE_FAIL_PERMISSION,
)

__all__ = ["RefDirectMap", "RefRmpEntry", "RefRmpTable"]

RefRmpEntry = namedtuple("RefRmpEntry",
                         ["assigned", "level", "asid", "gpa", "immutable", "validated", "vmsa"])
"""Same fields, in the same order, as :class:`pkvm._core.RmpEntry` (tuples compare equal)."""

_FREE = {"assigned": False, "big": False, "asid": 0, "gpa": 0, "immutable": False,
         "validated": False, "vmsa": False}

_RMP_COUNTERS = (
    "rmpupdate", "rmpupdate_2m",
    "rmpupdate_fail_input", "rmpupdate_fail_permission", "rmpupdate_fail_inuse",
    "rmpupdate_fail_overlap",
    "psmash", "psmash_fail_input", "psmash_fail_permission", "psmash_fail_inuse",
    "pvalidate", "pvalidate_2m",
    "pvalidate_fail_input", "pvalidate_fail_sizemismatch", "pvalidate_fail_noupdate",
    "pvalidate_npf_rmp", "pvalidate_npf_sizem",
)
_RMPUPDATE_FAIL = {RMPUPDATE_FAIL_INPUT: "input", RMPUPDATE_FAIL_PERMISSION: "permission",
                   RMPUPDATE_FAIL_INUSE: "inuse", RMPUPDATE_FAIL_OVERLAP: "overlap"}
_PSMASH_FAIL = {PSMASH_FAIL_INPUT: "input", PSMASH_FAIL_PERMISSION: "permission",
                PSMASH_FAIL_INUSE: "inuse"}
_PVALIDATE_FAIL = {PVALIDATE_FAIL_INPUT: "fail_input",
                   PVALIDATE_FAIL_SIZEMISMATCH: "fail_sizemismatch",
                   PVALIDATE_FAIL_NOUPDATE: "fail_noupdate",
                   PVALIDATE_NPF_RMP: "npf_rmp", PVALIDATE_NPF_SIZEM: "npf_sizem"}


class RefRmpTable:
    """Per-page RMP: a dict of entry dicts, one per pfn that is not a default entry."""

    def __init__(self, max_pfn: int = 1 << 40) -> None:
        self.max_pfn = max_pfn
        self.entries: dict[int, dict[str, Any]] = {}
        self.locked: set[int] = set()
        self.counters = dict.fromkeys(_RMP_COUNTERS, 0)

    def _get(self, pfn: int) -> dict[str, Any]:
        return self.entries.get(pfn, _FREE)

    def _put(self, pfn: int, **fields: Any) -> None:
        entry = {**self._get(pfn), **fields}
        if entry == _FREE:
            self.entries.pop(pfn, None)
        else:
            self.entries[pfn] = entry

    @staticmethod
    def _region(pfn: int) -> range:
        base = pfn - pfn % 512
        return range(base, base + 512)

    def lookup(self, pfn: int) -> RefRmpEntry:
        """The entry; the level is read from the 2M-aligned entry (§5.1)."""
        e = self._get(pfn)
        big = self._get(pfn - pfn % 512)["big"]
        return RefRmpEntry(e["assigned"], PG_LEVEL_2M if big else PG_LEVEL_4K, e["asid"],
                           e["gpa"], e["immutable"], e["validated"], e["vmsa"])

    def set_in_use(self, pfn: int, npages: int = 1, in_use: bool = True) -> None:
        for p in range(pfn, pfn + npages):
            if in_use:
                self.locked.add(p)
            else:
                self.locked.discard(p)

    def in_use(self, pfn: int) -> bool:
        return pfn in self.locked

    # -- instructions -------------------------------------------------------------------------

    def rmpupdate(self, pfn: int, level: int, *, assigned: bool, asid: int = 0, gpa: int = 0,
                  immutable: bool = False) -> int:
        """One RMPUPDATE, rule by rule (§5.3 and docs/snp-rmp.md)."""
        code = self._rmpupdate(pfn, level, assigned, asid, gpa, immutable)
        if code:
            self.counters["rmpupdate_fail_" + _RMPUPDATE_FAIL[code]] += 1
        else:
            self.counters["rmpupdate"] += 1
            if level == PG_LEVEL_2M:
                self.counters["rmpupdate_2m"] += 1
        return code

    def _rmpupdate(self, pfn: int, level: int, assigned: bool, asid: int, gpa: int,
                   immutable: bool) -> int:
        big = level == PG_LEVEL_2M
        if not assigned and (asid or gpa or immutable):
            return RMPUPDATE_FAIL_INPUT
        if big and (pfn % 512 or (assigned and gpa % (512 * 4096))):
            return RMPUPDATE_FAIL_INPUT
        pages = self._region(pfn) if big else range(pfn, pfn + 1)
        if any(p in self.locked for p in pages):
            return RMPUPDATE_FAIL_INUSE
        if any(self._get(p)["immutable"] for p in pages):
            return RMPUPDATE_FAIL_PERMISSION
        head = self._get(pfn - pfn % 512)
        if big:
            # Any guest-owned 4K entry in the region conflicts with a new 2M entry.
            if any(self._get(p)["assigned"] and not self._get(p)["big"] for p in pages):
                return RMPUPDATE_FAIL_OVERLAP
        elif head["big"]:
            if head["assigned"]:
                return RMPUPDATE_FAIL_OVERLAP
            # An unassigned 2M entry: the region becomes 4K entries.
            for p in self._region(pfn):
                self._put(p, big=False)
        for i, p in enumerate(pages):
            self._put(p, assigned=bool(assigned), big=big, asid=asid if assigned else 0,
                      gpa=gpa + i * 4096 if assigned else 0, immutable=bool(immutable),
                      validated=False, vmsa=False)
        return 0

    def psmash(self, pfn: int) -> int:
        """One PSMASH (§5.4 and docs/snp-rmp.md)."""
        code = self._psmash(pfn)
        if code:
            self.counters["psmash_fail_" + _PSMASH_FAIL[code]] += 1
        else:
            self.counters["psmash"] += 1
        return code

    def _psmash(self, pfn: int) -> int:
        if pfn % 512 or not self._get(pfn)["big"]:
            return PSMASH_FAIL_INPUT
        if any(p in self.locked for p in self._region(pfn)):
            return PSMASH_FAIL_INUSE
        if self._get(pfn)["immutable"]:
            return PSMASH_FAIL_PERMISSION
        for p in self._region(pfn):
            self._put(p, big=False)
        return 0

    def pvalidate(self, pfn: int, level: int, *, asid: int, gpa: int, validate: bool) -> int:
        """One guest PVALIDATE (§5.6 and docs/snp-rmp.md)."""
        code = self._pvalidate(pfn, level, asid, gpa, validate)
        if code:
            self.counters["pvalidate_" + _PVALIDATE_FAIL[code]] += 1
        else:
            self.counters["pvalidate"] += 1
            if level == PG_LEVEL_2M:
                self.counters["pvalidate_2m"] += 1
        return code

    def _pvalidate(self, pfn: int, level: int, asid: int, gpa: int, validate: bool) -> int:
        big = level == PG_LEVEL_2M
        if big and (pfn % 512 or gpa % (512 * 4096)):
            return PVALIDATE_FAIL_INPUT
        e = self._get(pfn)
        if not e["assigned"] or e["asid"] != asid or e["gpa"] != gpa or e["immutable"]:
            return PVALIDATE_NPF_RMP
        entry_big = self._get(pfn - pfn % 512)["big"]
        if big and not entry_big:
            return PVALIDATE_FAIL_SIZEMISMATCH
        if not big and entry_big:
            return PVALIDATE_NPF_SIZEM
        if e["validated"] == bool(validate):
            return PVALIDATE_FAIL_NOUPDATE
        for p in (self._region(pfn) if big else [pfn]):
            self._put(p, validated=bool(validate))
        return 0

    # -- range forms: loops of instructions ----------------------------------------------------

    @staticmethod
    def _loop(step: int, pfn: int, npages: int, op: Any) -> tuple[int, int, int]:
        done = 0
        for i in range(0, npages, step):
            code = op(pfn + i, i)
            if code:
                return done, pfn + i, code
            done += 1
        return done, -1, 0

    def rmpupdate_range(self, pfn: int, npages: int, level: int, *, assigned: bool,
                        asid: int = 0, gpa: int = 0, immutable: bool = False
                        ) -> tuple[int, int, int]:
        step = 512 if level == PG_LEVEL_2M else 1
        return self._loop(step, pfn, npages, lambda p, i: self.rmpupdate(
            p, level, assigned=assigned, asid=asid, gpa=gpa + i * 4096 if assigned else gpa,
            immutable=immutable))

    def psmash_range(self, pfn: int, npages: int) -> tuple[int, int, int]:
        return self._loop(512, pfn, npages, lambda p, i: self.psmash(p))

    def pvalidate_range(self, pfn: int, npages: int, level: int, *, asid: int, gpa: int,
                        validate: bool) -> tuple[int, int, int]:
        step = 512 if level == PG_LEVEL_2M else 1
        return self._loop(step, pfn, npages, lambda p, i: self.pvalidate(
            p, level, asid=asid, gpa=gpa + i * 4096, validate=validate))

    def firmware_update(self, pfn: int, npages: int, *, immutable: bool | None = None,
                        validated: bool | None = None, vmsa: bool | None = None) -> None:
        fields = {k: bool(v) for k, v in
                  (("immutable", immutable), ("validated", validated), ("vmsa", vmsa))
                  if v is not None}
        pages = range(pfn, pfn + npages)
        if any(not self._get(p)["assigned"] for p in pages):
            raise ValueError("firmware only updates guest-owned entries")
        first, last = pfn, pfn + npages - 1
        if npages and ((self._get(first)["big"] and first % 512)
                       or (self._get(last)["big"] and (last + 1) % 512)):
            raise ValueError("range cuts a 2M RMP entry")
        if vmsa and any(self._get(p)["big"] for p in pages):
            raise ValueError("VMSA pages are 4K")
        for p in pages:
            self._put(p, **fields)

    # -- queries ------------------------------------------------------------------------------

    def find(self, pfn: int, npages: int, equal: bool, **want: Any) -> int:
        """First pfn whose entry has (``equal``) or lacks every wanted field; -1 if none."""
        for i, p in enumerate(range(pfn, pfn + npages)):
            e = self.lookup(p)._asdict()
            ok = all((e[k] == (v + i * 4096 if k == "gpa" else v)) for k, v in want.items())
            if ok == equal:
                return p
        return -1


class RefDirectMap:
    """Per-mapping direct map: ``{first pfn: (level, present)}``, split 512 at a time."""

    _PAGES: ClassVar[dict[int, int]] = {PG_LEVEL_4K: 1, PG_LEVEL_2M: 512, PG_LEVEL_1G: 512 * 512}

    def __init__(self, ram: list[tuple[int, int]], policy: str = "split-4k") -> None:
        self.policy = policy
        self.maps: dict[int, tuple[int, bool]] = {}
        self.boot: dict[int, int] = {}
        for a, b in sorted(ram):
            for s, e, level in boot_layout(a, b):
                for p in range(s, e, self._PAGES[level]):
                    self.maps[p] = (level, True)
                    self.boot[p] = level
        self.ram_pages = sum(b - a for a, b in ram)
        self.counters = {"directmap_splits": 0, "directmap_unmaps": 0,
                         "directmap_restores": 0, "directmap_cpa_calls": 0}
        self.fragmented: set[int] = set()   # first pfns of split boot-time large mappings

    def mapping(self, pfn: int) -> tuple[int, int, bool]:
        """``(first pfn, level, present)`` of the mapping covering ``pfn``."""
        for level in (PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K):
            base = pfn - pfn % self._PAGES[level]
            if base in self.maps and self.maps[base][0] == level:
                return (base, *self.maps[base])
        raise KeyError(pfn)

    def level(self, pfn: int) -> int:
        _, level, present = self.mapping(pfn)
        return level if present else 0

    def _split_page(self, pfn: int) -> None:
        """One split of the large mapping covering ``pfn`` into 512 of the next level."""
        base, level, present = self.mapping(pfn)
        del self.maps[base]
        small = self._PAGES[level - 1]
        for i in range(512):
            self.maps[base + i * small] = (level - 1, present)
        if base in self.boot and self.boot[base] == level:
            self.fragmented.add(base)
        self.counters["directmap_splits"] += 1

    def _to_4k(self, pfn: int) -> bool:
        """Split until ``pfn`` is mapped at 4K; True if anything was split."""
        split = False
        while self.mapping(pfn)[1] > PG_LEVEL_4K:
            self._split_page(pfn)
            split = True
        return split

    def adjust(self, pfn: int, npages: int = 1, level: int = PG_LEVEL_4K) -> int:
        """``adjust_direct_map`` once per RMPUPDATE (one per page at 4K)."""
        if level == PG_LEVEL_2M:
            return 0
        calls = 0
        for p in range(pfn, pfn + npages):
            if self.mapping(p)[2] and self._to_4k(p):   # set_memory_4k
                calls += 1
        self.counters["directmap_cpa_calls"] += calls
        return calls

    def invalidate(self, pfn: int, npages: int = 1) -> int:
        for p in range(pfn, pfn + npages):
            self._to_4k(p)
            if self.maps[p][1]:
                self.counters["directmap_unmaps"] += 1
            self.maps[p] = (PG_LEVEL_4K, False)
        self.counters["directmap_cpa_calls"] += npages
        return npages

    def restore(self, pfn: int, npages: int = 1) -> int:
        for p in range(pfn, pfn + npages):
            if not self.mapping(p)[2]:
                self.maps[p] = (PG_LEVEL_4K, True)
                self.counters["directmap_restores"] += 1
        self.counters["directmap_cpa_calls"] += npages
        return npages

    def before_rmpupdate(self, pfn: int, npages: int, level: int, *, assigned: bool) -> int:
        if self.policy == "split-4k":
            step = 512 if level == PG_LEVEL_2M else 1
            return sum(self.adjust(p, step, level) for p in range(pfn, pfn + npages, step))
        return self.invalidate(pfn, npages) if assigned else 0

    def after_rmpupdate(self, pfn: int, npages: int, level: int, *, assigned: bool) -> int:
        if self.policy == "split-4k" or assigned:
            return 0
        return self.restore(pfn, npages)

    # The entry points the SNP RMP wrappers call (pkvm.platforms._snp_rmp._directmap): the
    # checked-argument internals of pkvm.host.directmap.DirectMap and its counters dict.
    def _before_rmpupdate(self, pfn: int, npages: int, level: int, assigned: bool) -> int:
        return self.before_rmpupdate(pfn, npages, level, assigned=assigned)

    def _after_rmpupdate(self, pfn: int, npages: int, level: int, assigned: bool) -> int:
        return self.after_rmpupdate(pfn, npages, level, assigned=assigned)

    @property
    def _cnt(self) -> dict[str, int]:
        return self.counters

    @property
    def _policy(self) -> str:
        return self.policy

    def fragmented_pages(self) -> int:
        return sum(self._PAGES[self.boot[b]] for b in self.fragmented)

    def fragmented_fraction(self) -> float:
        return self.fragmented_pages() / self.ram_pages

    def ranges(self) -> list[tuple[int, int, int, bool]]:
        """Coalesced ``(start, end, level, present)`` runs, as :meth:`DirectMap.ranges`."""
        out: list[tuple[int, int, int, bool]] = []
        for base in sorted(self.maps):
            level, present = self.maps[base]
            end = base + self._PAGES[level]
            if out and out[-1][1] == base and out[-1][2:] == (level, present):
                out[-1] = (out[-1][0], end, level, present)
            else:
                out.append((base, end, level, present))
        return out
