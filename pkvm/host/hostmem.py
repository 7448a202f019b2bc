"""Simulated host memory: the pfn allocator and the VMM's shared (HVA) backing.

:class:`HostMemory` hands out host page frames next-fit, in naturally aligned blocks of
``2**order`` pages, so a later order-9 guest_memfd folio or a THP gets a 2M-aligned pfn block
(the SNP RMP indexes these pfns). State is one :class:`~pkvm._core.RangeMap` of allocated
pfn runs: memory does not grow with the number of pages allocated.

:class:`SharedBacking` is the VMM's anonymous memory: HVA page -> pfn, populated a whole host
page (4K, 2M THP, 2M or 1G hugetlb) at a time on first touch, like GUP faulting in a page.

Invariants: allocated runs lie in ``[start_pfn, start_pfn + nr_pages)``; ``nr_allocated`` is
the number of allocated pfns; every populated HVA page maps to an allocated pfn.
"""

from __future__ import annotations

from pkvm._owned import refuse_nested
from pkvm._core import HostMemoryState, RangeMap, SharedBackingState, hostmem_alloc, hostmem_free, hostmem_plan, shared_discard, shared_populate
from pkvm.errors import InternalInvariantError

#: pkvm's simulated host memory starts above the first 4 GiB and holds 64 TiB by default.
DEFAULT_START_PFN = 1 << 20
DEFAULT_NR_PAGES = 1 << 34

# Encoding of a SharedBacking value: bit 0 "populated", bits 8.. the (pfn - hva page) delta as
# a 56-bit two's-complement number, so linearly mapped pages coalesce into one run.
_DELTA_SHIFT = 8
_DELTA_MASK = (1 << 56) - 1
_DELTA_SIGN = 1 << 55


def _check_ints(*args: tuple[str, object, int, str]) -> None:
    """Argument checks of the public allocator calls (the typed allocator trusts them): each
    ``(name, value, bound, shown)`` must be an int in ``[0, bound)``; ``shown`` is that range
    as the message names it."""
    for name, v, hi, shown in args:
        if type(v) is not int:
            raise TypeError(f"{name} must be an int, not {type(v).__name__}")
        if not 0 <= v < hi:
            raise ValueError(f"{name}={v!r} must be in {shown}")


def _check_units(n_units: object, order: object) -> None:
    """The argument checks of :meth:`HostMemory.alloc` and :meth:`HostMemory.can_alloc`."""
    _check_ints(("n_units", n_units, 1 << 52, f"[0, {(1 << 52) - 1}]"), ("order", order, 19, "[0, 18]"))


def encode_delta(delta: int) -> int:
    """Pack a signed pfn delta into the high bits of a RangeMap value."""
    return (delta & _DELTA_MASK) << _DELTA_SHIFT


def decode_delta(value: int) -> int:
    """Unpack the signed pfn delta of :func:`encode_delta`."""
    d = value >> _DELTA_SHIFT
    return d - (1 << 56) if d & _DELTA_SIGN else d


class HostMemory(HostMemoryState):
    """A next-fit allocator of host pfns in aligned power-of-two blocks.

    Runtime complexity: O(log n + k) per call for n allocated runs and k free runs visited.

    >>> mem = HostMemory(start_pfn=0x100, nr_pages=0x1000)
    >>> mem.alloc(1, 9)
    [(512, 512)]
    >>> mem.alloc(3, 0)
    [(1024, 3)]
    """

    # Every field is a C member of HostMemoryState (pkvm/_state.pxi), which the typed
    # allocator (pkvm/_gmem.pxi) reads and writes directly.
    __slots__ = ()

    def __init__(self, start_pfn: int = DEFAULT_START_PFN, nr_pages: int = DEFAULT_NR_PAGES) -> None:
        if start_pfn < 0 or nr_pages <= 0 or start_pfn + nr_pages >= 1 << 63:
            # (the allocator's bounds are signed 64-bit C fields)
            raise ValueError(f"bad host memory [{start_pfn:#x}, +{nr_pages:#x})")
        self._used = RangeMap(0, _finger=True)
        self.start_pfn = start_pfn
        self.end_pfn = start_pfn + nr_pages
        self._cursor = start_pfn
        self.nr_allocated = 0
        #: Per-CPU next-fit cursors (None: one cursor for everyone); ``cpu`` names the CPU that
        #: allocates now. See :meth:`per_cpu`.
        self._cpu_cursors: dict[str, int] | None = None
        self.cpu: str | None = None

    def per_cpu(self, cursors: dict[str, int]) -> None:
        """Give each named CPU a next-fit cursor of its own, starting where ``cursors`` says
        (the page allocator's per-CPU lists: pages a CPU allocates in a row stay together even
        while other CPUs allocate). Used by the concurrent timeline with several vCPU threads;
        a CPU not named uses the shared cursor."""
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        self._cpu_cursors = dict(cursors)

    def _plan(self, n_units: int, order: int) -> list[tuple[int, int]] | None:
        """Where ``n_units`` blocks of ``2**order`` pages would go, next-fit, or None.

        The typed core's ``hostmem_plan`` (pkvm/_gmem.pxi): from the cursor, take every free
        aligned block in pfn order up to the end of memory, then wrap around once to the
        start, stopping where the walk began."""
        return hostmem_plan(self._used, self.start_pfn, self.end_pfn, self._cursor, n_units, order)

    def _units_that_fit(self, n_units: int, order: int) -> int:
        """How many of ``n_units`` blocks of ``2**order`` pages :meth:`alloc` could give: the
        blocks the next-fit walk finds before it runs out, which is what that many
        single-block allocations in a row would get before the first one failed. The
        arguments are :meth:`alloc`'s, already checked."""
        runs = hostmem_plan(self._used, self.start_pfn, self.end_pfn, self._cursor, n_units, order, True)
        return sum(npages for _pfn, npages in runs or ()) >> order

    def can_alloc(self, n_units: int, order: int = 0) -> bool:
        """Whether :meth:`alloc` of the same arguments would succeed (the same argument
        errors)."""
        _check_units(n_units, order)
        return n_units == 0 or self._plan(n_units, order) is not None

    def alloc(self, n_units: int, order: int = 0) -> list[tuple[int, int]]:
        """Allocate ``n_units`` blocks of ``2**order`` pages; return ``[(pfn, npages), ...]``.

        The result is what ``n_units`` successive single-block calls would return, merged
        into contiguous runs.

        Raises:
            KvmError: ENOMEM when the memory is exhausted (nothing is allocated then).
            TypeError / ValueError: ``n_units`` is not an int >= 0 below 2**52, or ``order``
                is not an int in [0, 18] (4K, 2M and 1G blocks are orders 0, 9 and 18).
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        _check_units(n_units, order)
        return hostmem_alloc(self, n_units, order)  # pkvm/_gmem.pxi (the fault path's allocator)

    def free(self, pfn: int, npages: int) -> None:
        """Return ``[pfn, pfn + npages)`` to the allocator.

        Raises:
            InternalInvariantError: part of the range was not allocated (a double free).
            TypeError / ValueError: ``pfn`` or ``npages`` is not an int in [0, 2**52).
        """
        refuse_nested(self._owner)  # EDEADLK from an event callback of its VM (docs/events.md)
        _check_ints(("pfn", pfn, 1 << 52, "[0, 2**52)"), ("npages", npages, 1 << 52, "[0, 2**52)"))
        hostmem_free(self, pfn, npages)  # pkvm/_gmem.pxi

    def is_allocated(self, pfn: int) -> bool:
        """Whether host pfn ``pfn`` is currently allocated."""
        return self._used.get(pfn) == 1

    def _check(self) -> None:
        total = 0
        for s, e, v in self._used.iter_ranges():
            if v != 1 or s < self.start_pfn or e > self.end_pfn:
                raise InternalInvariantError(f"bad host memory run [{s:#x}, {e:#x}) = {v}")
            total += e - s
        if total != self.nr_allocated:
            raise InternalInvariantError(f"host memory counts {self.nr_allocated} pages, runs hold {total}")


class SharedBacking(SharedBackingState):
    """The VMM's shared memory: HVA page -> host pfn, populated one host page at a time.

    ``order`` is the host page order of the backing (0 for 4K, 9 for THP / hugetlb-2M, 18
    for hugetlb-1G): the first touch of any HVA page populates the whole naturally aligned
    block of ``2**order`` pages around it, with a single aligned pfn block.
    """

    # Every field is a C member of SharedBackingState (pkvm/_state.pxi), which the fault path
    # and the typed populate (pkvm/_gmem.pxi) read and write directly.
    __slots__ = ()

    def __init__(self, mem: HostMemory, order: int) -> None:
        self._map = RangeMap(0, _finger=True)
        self._mem = mem
        self.order = order
        self.nr_populated = 0

    def run_at(self, hva_page: int) -> tuple[int, int, int]:
        """``(start, end, pfn_delta_or_None)`` of the HVA run containing ``hva_page``.

        ``pfn = hva_page + delta`` inside a populated run; ``None`` marks an unpopulated run.
        """
        s, e, v = self._map.run_at(hva_page)
        return (s, e, decode_delta(v) if v else None)  # type: ignore[return-value]

    def lookup(self, hva_page: int) -> int | None:
        """The pfn backing ``hva_page``, or None if it was never touched."""
        v = self._map.get(hva_page)
        return hva_page + decode_delta(v) if v else None

    def blocks_to_populate(self, start: int, end: int) -> int:
        """How many host pages a touch of every HVA page in ``[start, end)`` would allocate."""
        order = self.order
        a = start >> order
        b = (end + (1 << order) - 1) >> order
        return sum(y - x for x, y in self._unpopulated_blocks(a, b)) << order

    def _unpopulated_blocks(self, a: int, b: int) -> list[tuple[int, int]]:
        """Runs ``[x, y)`` of block numbers in ``[a, b)`` whose block is not populated."""
        order = self.order
        out: list[tuple[int, int]] = []
        blk = a
        m = self._map
        while blk < b:
            s, e, v = m.run_at(blk << order)
            # Blocks are populated whole, so run edges fall on block boundaries.
            ea = min((e + (1 << order) - 1) >> order, b)
            if not v:
                out.append((blk, ea))
            blk = ea
        return out

    def populate(self, start: int, end: int) -> int:
        """Touch every HVA page in ``[start, end)``; return the number of pages allocated.

        Blocks are allocated in address order, as successive first touches would. The typed
        core's ``shared_populate`` (pkvm/_gmem.pxi): one run of unpopulated blocks is one
        allocation (all or nothing); several runs are planned together first.

        Raises:
            KvmError: ENOMEM if host memory runs out (nothing is populated then).
        """
        return shared_populate(self, start, end)

    #: ``MADV_DONTNEED`` on whole host pages inside ``[start, end)``; returns the pages freed
    #: (the typed core's ``shared_discard``, pkvm/_gmem.pxi).
    discard = shared_discard

    def iter_runs(self) -> list[tuple[int, int, int]]:
        """Populated runs ``(start, end, pfn_delta)`` in HVA order."""
        return [(s, e, decode_delta(v)) for s, e, v in self._map.iter_ranges()]
