"""guest_memfd: the private backing of a VM's memory (docs/kernel-semantics.md §2.9, §4.3, §4.7).

A :class:`GuestMemfd` has a size, bindings (file index ranges -> memslot) and folios. Folios
are range-compressed: one :class:`~pkvm._core.RangeMap` from file index to a value packing
present, "prepared" (the folio's up-to-date flag), the folio order and the ``pfn - index``
delta, so a run of folios allocated together is one run.

Invariants (:meth:`GuestMemfd._check`): folios lie inside the file; a folio of order o starts
on an o-aligned index and maps an o-aligned pfn block; every folio pfn is allocated in host
memory; bindings do not overlap and each matches its memslot; a closed file has no folios
and no bindings.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pkvm._core import GmemPath, RangeMap
from pkvm.constants import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    KVM_FILTER_PRIVATE,
    MAX_LFS_FILESIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from pkvm.errors import InternalInvariantError, KvmError
from pkvm.host.hostmem import decode_delta
from pkvm.kvm.fault import PageFault, memory_fault_exit
from pkvm.kvm.ops import is_implemented

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM, Memslot

FOLIO_PRESENT = 1 << 0
FOLIO_PREPARED = 1 << 1
_FOLIO_ORDER_SHIFT = 2  # bits 2-6
_FOLIO_ORDER_MASK = 0x1F


def folio_order(value: int) -> int:
    """Order of an encoded folio."""
    return (value >> _FOLIO_ORDER_SHIFT) & _FOLIO_ORDER_MASK


def _check_int(name: str, value: object) -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        value = int(value)
    return value


class GuestMemfd:
    """A guest_memfd file (``KVM_CREATE_GUEST_MEMFD``), bound to one VM.

    Create one with ``vm.create_guest_memfd(size)``. ``size`` is in bytes.
    """

    __slots__ = ("_vm", "fd", "size", "npages", "flags", "closed", "folios", "bindings")

    def __init__(self, vm: VM, fd: int, size: int, flags: int) -> None:
        self._vm = vm
        self.fd = fd
        self.size = size
        self.npages = size >> PAGE_SHIFT
        self.flags = flags
        self.closed = False
        self.folios = RangeMap(0, _finger=True)
        #: file index -> memslot key + 1 (``gmem->bindings``)
        self.bindings = RangeMap(0)
        # the VM's live state: their public writes refuse from an event callback of the VM
        self.folios._set_owner(vm)
        self.bindings._set_owner(vm)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.folios)} folio runs"
        return f"<GuestMemfd fd={self.fd} size={self.size:#x} {state}>"

    # -- folio queries --------------------------------------------------------------------

    def folio(self, index: int) -> tuple[int, int, bool] | None:
        """``(pfn, order, prepared)`` of the page at file ``index``, or None if no folio.

        Raises:
            TypeError: ``index`` is not an int.
            ValueError: ``index`` is negative or does not fit a u64.
        """
        if type(index) is not int or not 0 <= index < 1 << 64:
            index = _check_int("index", index)
            if not 0 <= index < 1 << 64:
                raise ValueError(f"index={index:#x} does not fit a u64")
        v = self.folios.get(index)
        if not v:
            return None
        return (index + decode_delta(v), folio_order(v), bool(v & FOLIO_PREPARED))

    @property
    def nr_pages_allocated(self) -> int:
        """Pages held by folios. Runtime complexity: O(k) for k folio runs."""
        return sum(e - s for s, e, v in self.folios.iter_ranges())

    # -- fallocate ------------------------------------------------------------------------

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` on the file: allocate folios, or punch a hole (§2.9, §4.7).

        The byte range is half-open ``[offset, offset + length)``. Allocation only creates
        folios (6.11+: neither zeroed nor prepared; 6.8: zeroed and up to date). A hole
        punch brackets the truncation with an invalidation: ``invalidate_begin``, zap every
        mapping of the bound gfns, free the folios (``gmem_invalidate`` op), then
        ``invalidate_end``. Attributes are not touched.

        Runtime complexity: O(log n + k) for k folio runs.

        Raises:
            KvmError: EBADF (closed: checked before the arguments, as the syscall resolves the
                descriptor first), EINVAL (negative offset, ``length <= 0``, unaligned,
                allocating past the size), EOPNOTSUPP (no ``KEEP_SIZE`` or unknown mode bits),
                EFBIG (past ``MAX_LFS_FILESIZE``), ENOMEM (host memory exhausted: folios are
                allocated one at a time in index order, and those before the first the host
                cannot give stay allocated, as in ``kvm_gmem_allocate``).
        """
        if self._vm._in_callback:
            self._vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        if type(mode) is not int or type(offset) is not int or type(length) is not int:
            mode, offset, length = _check_int("mode", mode), _check_int("offset", offset), _check_int("length", length)
        # The syscall resolves the descriptor first (ksys_fallocate: EBADF before any argument
        # is looked at), then vfs_fallocate's generic checks, then kvm_gmem_fallocate's.
        if self.closed:
            raise KvmError(errno.EBADF, f"guest_memfd fd {self.fd} is closed")
        if offset < 0 or length <= 0:
            raise KvmError(errno.EINVAL,
                           f"fallocate offset {offset:#x} / length {length:#x} must be >= 0 / > 0")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, f"guest_memfd supports only KEEP_SIZE and PUNCH_HOLE, not mode {mode:#x}")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP,
                           "PUNCH_HOLE needs KEEP_SIZE: use mode=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE")
        if offset + length > MAX_LFS_FILESIZE:
            raise KvmError(errno.EFBIG, f"[{offset:#x}, {offset + length:#x}) ends past MAX_LFS_FILESIZE")
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, "guest_memfd cannot change size: pass FALLOC_FL_KEEP_SIZE")
        if offset & (PAGE_SIZE - 1) or length & (PAGE_SIZE - 1):
            raise KvmError(errno.EINVAL, f"[{offset:#x}, {offset + length:#x}) is not 4 KiB aligned")
        start, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._punch_checked(start, end - start)
            return
        if end > self.npages:
            raise KvmError(errno.EINVAL,
                           f"allocating [{offset:#x}, {offset + length:#x}) past the size {self.size:#x}")
        self._allocate(start, end)
        vm = self._vm
        if vm._subs is not None:
            vm._emit("fallocate", None, None, None, length >> PAGE_SHIFT, 0, None, (self.fd, mode, offset, length))

    def _punch_checked(self, start: int, count: int) -> None:
        """``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` of the ``count > 0`` pages
        from index ``start`` once its checks passed (the file is open, the range is aligned,
        non-empty and below ``MAX_LFS_FILESIZE``, no event callback is running): the hole punch
        and its event (the VMM's discard calls it directly)."""
        vm = self._vm
        # self._punch_hole(...), without its frame (one per balloon run's discard)
        _gmem_path(vm).punch_hole(self, start, min(start + count, self.npages))
        if vm._subs is not None:
            vm._emit("fallocate", None, None, None, count, 0, None,
                     (self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start << PAGE_SHIFT,
                      count << PAGE_SHIFT))

    def _allocate(self, start: int, end: int) -> None:
        """``kvm_gmem_allocate``: create the missing folios in ``[start, end)``."""
        vm = self._vm
        order = vm._policy.gmem_max_order
        holes = [(s, e) for s, e, _v in _gaps(self.folios, start, end)]
        if not holes:
            return
        mem = vm._hostmem
        prepared = vm._policy.prepare == "none"
        # Folio by folio in index order, as kvm_gmem_allocate calls kvm_gmem_get_folio: at the
        # first folio the host cannot give, the call fails with ENOMEM and the folios before
        # it stay in the file (the kernel's own partial progress, as for an injected failure).
        for s, e in holes:
            idx = s
            for o, n in self._plan_units(s, e, order):
                fit = mem._units_that_fit(n, o)
                if fit:
                    self._alloc_folios(idx, fit, o, prepared)
                if fit < n:
                    idx += fit << o
                    raise KvmError(errno.ENOMEM, f"host memory exhausted allocating guest_memfd pages "
                                                 f"[{start:#x}, {end:#x}): no order-{o} folio for index "
                                                 f"{idx:#x} (the folios before it stay allocated)")
                idx += n << o

    def _plan_units(self, s: int, e: int, order: int) -> list[tuple[int, int]]:
        """Split the hole ``[s, e)`` into ``(order, count)`` folio runs, in index order."""
        if not order:
            return [(0, e - s)]
        size = 1 << order
        out: list[tuple[int, int]] = []
        i = s
        while i < e:
            a = i & ~(size - 1)
            if a == i and i + size <= e and i + size <= self.npages:
                n = (min(e, self.npages) - i) >> order
                out.append((order, n))
                i += n << order
            else:
                stop = min(e, (i + size) & ~(size - 1))
                out.append((0, stop - i))
                i = stop
        return out

    def _alloc_folios(self, index: int, count: int, order: int, prepared: bool) -> list[tuple[int, int]]:
        """Allocate ``count`` folios of ``order`` at ``index``; return the host pfn runs.

        Raises:
            KvmError: ENOMEM from an injected ``gmem_folio_alloc`` failure; the folios before
                the failing one are allocated, as ``kvm_gmem_get_folio`` calls one at a time.
        """
        return _gmem_path(self._vm).alloc_folios(self, index, count, order, prepared)  # pkvm/_gmem.pxi

    # -- hole punch and release -------------------------------------------------------------

    def _bound_gfn_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Slot-clipped gfn ranges of the bindings that intersect file indices ``[start, end)``."""
        return _gmem_path(self._vm).bound_gfn_ranges(self, start, end)  # pkvm/_gmem.pxi

    def _punch_hole(self, start: int, end: int) -> None:
        """``kvm_gmem_punch_hole`` on file indices ``[start, end)`` (already clipped)."""
        _gmem_path(self._vm).punch_hole(self, start, end)  # pkvm/_gmem.pxi

    def _truncate(self, start: int, end: int) -> None:
        """Free the folios wholly inside ``[start, end)``; a large folio only partly inside
        stays (its partial range would just be zeroed)."""
        _gmem_path(self._vm).truncate(self, start, end)  # pkvm/_gmem.pxi

    def close(self) -> None:
        """Close the last fd (``kvm_gmem_release``, §4.7), then free the inode's folios.

        Every bound memslot loses its file (later private faults there exit with EFAULT);
        the bindings' mappings are zapped inside one invalidation.

        Raises:
            KvmError: EBADF if the file is already closed.
        """
        if self._vm._in_callback:
            self._vm._nested_call()
        if self.closed:
            raise KvmError(errno.EBADF, f"guest_memfd fd {self.fd} is already closed")
        vm = self._vm
        ranges = self._bound_gfn_ranges(0, self.npages)
        for _s, _e, key in self.bindings.iter_ranges():
            vm._slots[key - 1].gmem_file = None
        if ranges:
            vm._invalidate_begin()
            flush = False
            for s, e in ranges:
                vm._invalidate_range_add(s, e)
                flush |= vm._zap(s, e, KVM_FILTER_PRIVATE) > 0  # kvm_gmem_invalidate_begin: private only
            if flush:
                vm._flush_remote_tlbs()
            vm._invalidate_end()
        self.bindings.clear()
        self.closed = True
        # The file held the only reference to the inode: eviction truncates every folio.
        self._truncate(0, self.npages)

    # -- bindings -----------------------------------------------------------------------------

    def _bind(self, slot: Memslot, pgoff: int) -> None:
        self.bindings.assign(pgoff, pgoff + slot.npages, slot.key + 1)

    def _unbind(self, slot: Memslot) -> None:
        if not self.closed:
            self.bindings.assign(slot.gmem_pgoff, slot.gmem_pgoff + slot.npages, 0)

    def _check(self) -> None:
        vm = self._vm
        if self.closed and (len(self.folios) or len(self.bindings)):
            raise InternalInvariantError(f"closed guest_memfd fd {self.fd} still has folios or bindings")
        for s, e, v in self.folios.iter_ranges():
            order = folio_order(v)
            size = 1 << order
            pfn = s + decode_delta(v)
            if not v & FOLIO_PRESENT or e > self.npages or s & (size - 1) or e & (size - 1) or pfn & (size - 1):
                raise InternalInvariantError(f"fd {self.fd}: bad folio run [{s:#x}, {e:#x}) value {v:#x}")
            if vm._hostmem._used.find_ne(pfn, pfn + (e - s), 1) != -1:
                raise InternalInvariantError(f"fd {self.fd}: folios [{s:#x}, {e:#x}) map unallocated pfns")
        for s, e, key in self.bindings.iter_ranges():
            slot = vm._slots.get(key - 1)
            if (slot is None or slot.gmem is not self or slot.gmem_pgoff > s
                    or s - slot.gmem_pgoff + (e - s) > slot.npages):
                raise InternalInvariantError(f"fd {self.fd}: binding [{s:#x}, {e:#x}) does not match a memslot")


def _gaps(m: RangeMap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Runs of absent keys in ``[start, end)`` as ``(s, e, 0)``."""
    k = start
    while k < end:
        s, e, v = m.run_at(k)
        e = min(e, end)
        if not v:
            yield (k, e, 0)
        k = e


def kvm_gmem_get_pfn(vm: VM, f: PageFault, end: int) -> int:
    """``kvm_mmu_faultin_pfn_gmem`` + ``kvm_gmem_get_pfn`` for the gfns ``[f.gfn, end)``.

    Resolves (allocating and preparing per ``Policy.prepare``, §4.3) the folios, sets
    ``f.delta`` and ``f.order`` and returns the end of the batch it could serve; on failure
    it fills a memory-fault exit in ``f``.

    The steps run in the typed core (``GmemPath.get_pfn``, pkvm/_gmem.pxi): a private access
    to a slot without guest_memfd, or whose file was closed, exits with EFAULT, an index the
    file does not bind to this slot with EIO. A batch of faults is served one folio run at a
    time (one fault at a time on a large folio, with a large ``gmem_max_order``, or while a
    failure is armed). A missing folio is allocated: an order-``gmem_max_order`` folio when
    its aligned block is in the file and empty, else order-0 folios for the batch. A folio
    not yet prepared (every lookup under ``prepare="every-lookup"``) goes through the
    platform's ``gmem_prepare`` op; if the op fails on a batch, the batch's new folios are
    given back and the fault is retried for one page.
    """
    try:
        path = vm._gmem_path  # type: ignore[attr-defined]
    except AttributeError:
        path = _gmem_path(vm)
    return path.get_pfn(f, end)  # type: ignore[no-any-return]


def _gmem_path(vm: VM) -> GmemPath:
    """The VM's typed guest_memfd steps, built on first use (after the platform's init)."""
    path = vm.__dict__.get("_gmem_path")
    if path is None:
        path = vm.__dict__["_gmem_path"] = GmemPath(vm, is_implemented, memory_fault_exit)
    return path


def gmem_get_folios(vm: VM, gmem: GuestMemfd, index: int, limit: int) -> tuple[int, int, bool, int]:
    """``__kvm_gmem_get_pfn`` for file indices ``[index, limit)``: find or allocate the folios,
    never preparing them (``kvm_gmem_populate``'s lookup).

    Returns ``(pfn of index, folio order, prepared, end)`` where ``[index, end)`` is served by
    one uniform folio run (a single index for a large folio). Allocation follows
    :func:`kvm_gmem_get_pfn`: an order-``gmem_max_order`` folio when its aligned block is in
    the file and empty, else order-0 folios for the whole hole up to ``limit``.

    Raises:
        KvmError: ENOMEM when host memory has no page left for ``index`` (nothing allocated
            then; with memory for only part of the hole, that part is allocated and returned).
    """
    folios = gmem.folios
    s, e, v = folios.run_at(index)
    if not v:
        order = 0
        max_order = vm._policy.gmem_max_order
        if max_order:
            size = 1 << max_order
            a = index & ~(size - 1)
            if a + size <= gmem.npages and folios.find_ne(a, a + size, 0) == -1:
                order = max_order
        first = index & ~((1 << order) - 1)
        # kvm_gmem_populate allocates page by page: with a failure armed, one folio at a time,
        # and with host memory for only some of the hole, those first (the caller's next page
        # then finds no memory and fails alone)
        count = 1 if order or vm._inject.armed("gmem_folio_alloc") else min(limit, e) - index
        if count > 1:
            count = max(1, vm._hostmem._units_that_fit(count, 0))
        gmem._alloc_folios(first, count, order, vm._policy.prepare == "none")
        s, e, v = folios.run_at(index)
    order = folio_order(v)
    end = index + 1 if order else min(limit, e)
    return index + decode_delta(v), order, bool(v & FOLIO_PREPARED), end
