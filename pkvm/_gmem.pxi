# ---------------------------------------------------------------------------------------------
# guest_memfd's pfn lookup and hole punch, the host allocator and SNP's RMP wrappers, typed
# (included at the end of _core.pyx)
# ---------------------------------------------------------------------------------------------
#
# The kernel steps of a private fault's pfn lookup (docs/kernel-semantics.md §4.3: folio
# lookup, allocation of a missing folio, the "prepared" check and the platform's prepare op),
# the host page allocator they allocate from, SEV-SNP's prepare (``sev_gmem_prepare`` ->
# ``rmp_make_private`` -> ``rmpupdate()`` with the direct-map work around it, §5.5, §5.8) and
# the hole punch's release of folios (``kvm_gmem_punch_hole`` -> ``sev_gmem_invalidate`` ->
# ``rmp_make_shared``, §4.7, §5.7), over typed state: the folio, allocator, RMP and direct-map
# maps are RangeMaps read and written through the C API, so a 4K private fault's lookup makes
# no Python call on its way.
#
# ``pkvm.kvm.gmem`` (``kvm_gmem_get_pfn``, ``GuestMemfd._alloc_folios`` / ``_truncate``),
# ``pkvm.host.hostmem.HostMemory`` (``_plan`` / ``alloc`` / ``free``) and
# ``pkvm.platforms._snp_rmp`` / ``pkvm.platforms.snp`` (``rmpupdate_range``, ``_directmap``,
# ``make_shared_range``, ``snp_gmem_prepare``, ``snp_gmem_invalidate``) are thin entries to
# the code here: each kernel step has one implementation. What stays in Python is called
# back: failure injection (``vm._inject``), the unmap-restore direct map and the split of a
# large direct mapping (``DirectMap``), PSMASH, the memory-fault exit, and the event and
# timeline hooks (``vm._emit``, ``vm._sched``).
#
# The VM's counters and modeled time are typed state (pkvm/_ledger.pxi), added to in C; its
# timeline hook and op table, the memslots' flags and files, the host allocator and the shared
# backing are C members of their classes' typed bases (pkvm/_state.pxi).

from types import MappingProxyType

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t

# pkvm.kvm.gmem's folio value bits and pkvm.host.hostmem's delta encoding (tests/test_gmem_core.py
# asserts they agree with the Python constants).
cdef uint64_t _FOLIO_PRESENT = 1
cdef uint64_t _FOLIO_PREPARED = 2
cdef int _FOLIO_ORDER_SHIFT = 2
cdef uint64_t _FOLIO_ORDER_MASK = 0x1F
cdef int _DELTA_SHIFT = 8
cdef uint64_t _DELTA_MASK = (1ULL << 56) - 1

# Policy.prepare
cdef enum:
    _PREP_NONE = 0
    _PREP_ONCE = 1
    _PREP_EVERY = 2

# The ``directmap`` argument of the RMP wrappers ("both", "before", "after", "none").
cdef enum:
    _DM_BOTH = 0
    _DM_BEFORE = 1
    _DM_AFTER = 2
    _DM_NONE = 3

_DM_NAMES = ("both", "before", "after", "none")
#: ``directmap`` argument name -> the code the typed wrappers take (an unknown name does no
#: direct-map work, as the string tests of the Python wrappers did).
DIRECTMAP_MODES = MappingProxyType({"both": _DM_BOTH, "before": _DM_BEFORE, "after": _DM_AFTER,
                                    "none": _DM_NONE})

cdef int _EFAULT = 14
cdef int _EINVAL = 22
cdef int _ENOMEM = 12


cdef inline uint64_t _folio_value(int64_t delta, int order, bint prepared) noexcept nogil:
    return ((<uint64_t>delta & _DELTA_MASK) << _DELTA_SHIFT | _FOLIO_PRESENT
            | (<uint64_t>order << _FOLIO_ORDER_SHIFT) | (_FOLIO_PREPARED if prepared else 0))


cdef inline int _folio_order(uint64_t v) noexcept nogil:
    return <int>((v >> _FOLIO_ORDER_SHIFT) & _FOLIO_ORDER_MASK)


# -- a small growable vector of (a, b, c) triples (plans and snapshots) --------------------------

cdef struct _Runs:
    Py_ssize_t n
    Py_ssize_t cap
    int64_t *a
    int64_t *b
    int64_t *c
    int64_t buf[12]


cdef inline void _runs_init(_Runs *r) noexcept:
    r.n = 0
    r.cap = 4
    r.a = &r.buf[0]
    r.b = &r.buf[4]
    r.c = &r.buf[8]


cdef inline void _runs_free(_Runs *r) noexcept:
    if r.a != &r.buf[0]:
        PyMem_Free(r.a)
    r.a = &r.buf[0]
    r.b = &r.buf[4]
    r.c = &r.buf[8]
    r.cap = 4
    r.n = 0


cdef int _runs_push(_Runs *r, int64_t a, int64_t b, int64_t c) except -1:
    cdef int64_t *p
    cdef Py_ssize_t cap
    if r.n == r.cap:
        cap = r.cap * 2
        p = <int64_t *>PyMem_Malloc(3 * cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        memcpy(p, r.a, r.n * sizeof(int64_t))
        memcpy(p + cap, r.b, r.n * sizeof(int64_t))
        memcpy(p + 2 * cap, r.c, r.n * sizeof(int64_t))
        if r.a != &r.buf[0]:
            PyMem_Free(r.a)
        r.a = p
        r.b = p + cap
        r.c = p + 2 * cap
        r.cap = cap
    r.a[r.n] = a
    r.b[r.n] = b
    r.c[r.n] = c
    r.n += 1
    return 0


cdef list _runs_list(_Runs *r):
    """The runs ``(a, b)`` as a list of tuples (the Python-facing plan)."""
    cdef Py_ssize_t i
    return [(r.a[i], r.b[i]) for i in range(r.n)]


# -- the host page allocator (pkvm.host.hostmem.HostMemory) ---------------------------------------

cdef int _hm_plan(RangeMap used, int64_t start, int64_t end, int64_t cursor, int64_t n_units,
                  int order, _Runs *out, RunPos *at=NULL) except -1:
    """``HostMemory._plan``: where ``n_units`` blocks of ``2**order`` pages would go, next-fit
    from ``cursor``, as pfn runs ``(pfn, npages)`` in ``out``; 1, or 0 if they do not fit.

    Signed arithmetic throughout, as the Python original's (pfns stay far below 2**62).
    ``at`` (or NULL): where the last lookup landed, for :func:`_hm_alloc`'s write."""
    cdef int64_t size = 1LL << order, remaining = n_units, pos = cursor, origin = cursor
    cdef int64_t a, e, units, take
    cdef bint wrapped = False
    cdef Run r
    out.n = 0
    while remaining:
        if wrapped and pos >= origin:
            return 0
        a = (pos + size - 1) & ~(size - 1)
        if wrapped and a + size > origin:
            # after the wrap a block must end by the walk's origin: none is left (without
            # this check an unaligned origin gave a negative unit count and never ended)
            return 0
        if a + size > end:
            if wrapped:
                return 0
            wrapped = True
            pos = start
            continue
        r = used._run_pos_c(<uint64_t>a, at) if at != NULL else used._run_at_c(<uint64_t>a)
        # (the last gap's run ends at 2**64 - 1: compared unsigned first)
        e = end if r.end > <uint64_t>end else <int64_t>r.end
        if r.value:
            pos = e
            continue
        if wrapped and e > origin:
            e = origin
        units = (e - a) >> order
        if units == 0:
            pos = e if e > a else a + size
            continue
        take = units if units < remaining else remaining
        if out.n and out.a[out.n - 1] + out.b[out.n - 1] == a:
            out.b[out.n - 1] += take << order
        else:
            _runs_push(out, a, take << order, 0)
        remaining -= take
        pos = a + (take << order)
    return 1


cdef int _hm_alloc(HostMemoryState hm, int64_t n_units, int order, _Runs *out) except -1:
    """``HostMemory.alloc`` into ``out``: 0, or ENOMEM (nothing allocated then). The
    allocator's fields are C members of ``hm`` (pkvm/_state.pxi); only a per-CPU cursor is
    read from its dict."""
    cdef Py_ssize_t i
    cdef int64_t total = 0, cursor, last
    cdef bint percpu = False
    cdef RangeMap used = hm._used
    cdef RunPos pos
    out.n = 0
    if n_units == 0:
        return 0
    cursors = hm._cpu_cursors
    if cursors is None and _hm_bump(hm, used, n_units, order, out):
        return 0
    if cursors is not None:
        cpu = hm.cpu
        percpu = cpu in cursors
    cursor = cursors[cpu] if percpu else hm._cursor
    if not _hm_plan(used, hm.start_pfn, hm.end_pfn, cursor, n_units, order, out, &pos):
        return _ENOMEM
    if out.n == 1:  # (one run: it lies in the gap the plan's last lookup found)
        _rm_put(used, &pos, <uint64_t>out.a[0], <uint64_t>(out.a[0] + out.b[0]), 1)
        total = out.b[0]
    else:
        for i in range(out.n):
            rangemap_assign(used, <uint64_t>out.a[i], <uint64_t>(out.a[i] + out.b[i]), 1)
            total += out.b[i]
    hm.nr_allocated += total
    last = out.a[out.n - 1] + out.b[out.n - 1]
    if percpu:
        cursors[cpu] = last
        hm._bump_leaf = NULL
    else:
        hm._cursor = last
        # where the run that ends at the cursor now is, for the next call's _hm_bump
        used._run_pos_c(<uint64_t>(last - 1), &pos)
        hm._bump_leaf = pos.leaf
        hm._bump_idx = pos.index
        hm._bump_ver = used.version
        hm._bump_map = used
    return 0


cdef inline bint _hm_bump(HostMemoryState hm, RangeMap used, int64_t n_units, int order,
                          _Runs *out) except -1:
    """:func:`_hm_alloc`'s next-fit from one shared cursor where the free gap right after the
    cursor takes all ``n_units`` blocks (a run of allocations with nothing freed between them:
    a fragmented guest's faults): the run of ``used`` that ends at the cursor grows in place,
    found where the previous allocation left it (``hm._bump_*``) instead of by a lookup and a
    write. 1 if done; 0 if not applicable, nothing changed then (the plan decides).

    What it does is what :func:`_hm_plan` and the write after it do then: the plan's walk
    starts at the aligned cursor, finds the gap ``[cursor, next run)`` and takes the blocks from
    its start, and the write merges them into the run on the left (``RangeMap._put_c``: the
    version moves, the spare-node pools are topped up). A block that would reach the next run
    (a merge on both sides) or the end of memory is left to the plan."""
    cdef Leaf *lf = <Leaf*>hm._bump_leaf
    cdef int i = hm._bump_idx
    cdef int64_t cursor = hm._cursor, new_end
    cdef uint64_t nxt
    if (lf == NULL or hm._bump_map is not used or hm._bump_ver != used.version
            or used.bulk_writer or used.bulk_readers
            or n_units <= 0 or n_units > (1LL << 40) or cursor & ((1LL << order) - 1)):
        return 0
    if i < 0 or i >= lf.n or lf.ends[i] != <uint64_t>cursor or _val(lf, i) != 1:
        return 0
    new_end = cursor + (n_units << order)
    if new_end > hm.end_pfn or cursor < hm.start_pfn:
        return 0
    if i + 1 < lf.n:
        nxt = lf.starts[i + 1]
    elif lf.next != NULL:
        nxt = lf.next.starts[0]
    else:
        nxt = U64_MAX
    if <uint64_t>new_end >= nxt:
        return 0
    used.version += 1
    used._reserve()
    lf.ends[i] = <uint64_t>new_end
    out.n = 0
    _runs_push(out, cursor, new_end - cursor, 0)
    hm.nr_allocated += new_end - cursor
    hm._cursor = new_end
    hm._bump_ver = used.version
    return 1


cdef int _hm_free(HostMemoryState hm, uint64_t pfn, int64_t npages) except -1:
    """``HostMemory.free``."""
    cdef uint64_t x
    cdef RangeMap used = hm._used
    if npages <= 0:
        return 0
    if rangemap_find_ne(used, pfn, pfn + <uint64_t>npages, 1, &x):
        from pkvm.errors import InternalInvariantError
        raise InternalInvariantError(f"freeing unallocated host pfns in [{pfn:#x}, {pfn + npages:#x})")
    rangemap_assign(used, pfn, pfn + <uint64_t>npages, 0)
    hm.nr_allocated -= npages
    return 0


def hostmem_plan(RangeMap used, int64_t start, int64_t end, int64_t cursor, int64_t n_units,
                 int order, bint partial=False):
    """``pkvm.host.hostmem.HostMemory._plan``: a list of ``(pfn, npages)`` runs, or None when
    they do not all fit; with ``partial``, the runs of the blocks the walk found either way
    (those the first single-block allocations in a row would get)."""
    cdef _Runs r
    _runs_init(&r)
    try:
        if not _hm_plan(used, start, end, cursor, n_units, order, &r) and not partial:
            return None
        return _runs_list(&r)
    finally:
        _runs_free(&r)


def hostmem_alloc(HostMemoryState hm, int64_t n_units, int order):
    """``pkvm.host.hostmem.HostMemory.alloc``."""
    cdef _Runs r
    _runs_init(&r)
    try:
        if _hm_alloc(hm, n_units, order, &r):
            from pkvm.errors import KvmError
            raise KvmError(_ENOMEM, f"host memory exhausted allocating {n_units} x order-{order} blocks")
        return _runs_list(&r)
    finally:
        _runs_free(&r)


def hostmem_free(HostMemoryState hm, uint64_t pfn, int64_t npages):
    """``pkvm.host.hostmem.HostMemory.free``."""
    _hm_free(hm, pfn, npages)


# -- SEV-SNP: the kernel's RMP wrappers (pkvm.platforms._snp_rmp) ---------------------------------

cdef int _split_2m(uint64_t start, uint64_t end, uint64_t *pa, uint64_t *pb, int *pl) noexcept nogil:
    """``[start, end)`` cut at 2M boundaries into at most 3 pieces ``(pa, pb, pl)``: the whole
    aligned 2M blocks as one 2M piece (level 2), each partial 2M block as its own 4K piece
    (level 1); returns the number of pieces."""
    cdef uint64_t up = (start + RMP_PAGES_2M - 1) & ~(<uint64_t>_MASK_2M)
    cdef uint64_t down = end & ~(<uint64_t>_MASK_2M)
    cdef int n = 0
    if up > start:
        pa[n] = start
        pb[n] = up if up < end else end
        pl[n] = 1
        n += 1
    if down > up:
        pa[n] = up
        pb[n] = down
        pl[n] = 2
        n += 1
    if end > down >= up:
        pa[n] = down if down > start else start
        pb[n] = end
        pl[n] = 1
        n += 1
    return n


def split_2m_runs(uint64_t start, uint64_t end):
    """``pkvm.platforms._snp_rmp._split_2m_runs``: ``[start, end)`` cut at 2M boundaries
    into ``(s, e, level)`` pieces (whole aligned 2M blocks as one 2M piece, each partial 2M
    block a 4K piece)."""
    cdef uint64_t pa[3]
    cdef uint64_t pb[3]
    cdef int pl[3]
    cdef int i, n = _split_2m(start, end, pa, pb, pl)
    return [(pa[i], pb[i], pl[i]) for i in range(n)]


@cython.final
@cython.auto_pickle(False)  # a VM's live state: never pickled on its own
cdef class SnpPath:
    """The typed state of one SNP VM's RMP wrappers (``vm.snp._path``), built by the
    platform's init: the RMP, the direct map's maps and counters, the ASID, the VM's counter and
    cost dicts, and the Python functions of the rare paths (an armed ``set_memory`` failure,
    PSMASH) and the op-table entries it stands for (``prepare`` / ``invalidate``)."""

    cdef object vm, snp, dm, rmp_obj, injected, psmash_fn
    cdef VmState vs             # the VM itself, typed (its timeline hook)
    cdef readonly object prepare_op, invalidate_op
    cdef dict d, costs, armed, dm_cnt
    cdef Counters stats
    cdef Ledger ledger
    cdef OpPrice o_rmpupdate    # rmpupdate, resolved for _charge_op_u
    # the direct map's ops and the cache flush, resolved for _charge_op; the guest's
    # PVALIDATEs and page-state-change requests (pkvm/_snp_guest.pxi: _pv_count, _psc_begin)
    cdef OpPrice o_cpa_call, o_dm_split, o_dm_flush, o_cache_flush, o_pv4k, o_pv2m, o_psc
    cdef Py_ssize_t i_pvalidate, i_pvalidate_2m, i_pvalidate_failures, i_psc_requests
    # the indices of SNP_STAT_KEYS' counters this path adds to (registered by snp_init_vm)
    cdef Py_ssize_t i_dm_splits, i_dm_unmaps, i_dm_restores, i_dm_cpa_calls, i_dm_tlb_flushes
    cdef Py_ssize_t i_sleep_atomic, i_rmpupdate, i_rmpupdate_2m, i_rmpupdate_failures
    cdef Py_ssize_t i_cache_flush_pages, i_leaked_pages
    cdef RmpTable rmp           # None while ``snp.rmp`` is not an RmpTable (a reference twin)
    cdef RangeMap dm_map        # None while ``snp.directmap`` is not a DirectMap
    cdef RangeMap dm_orig       # its boot layout (None likewise)
    cdef RunMemo dm_run         # the run of dm_map read last (_dm_all_4k of one page)
    cdef RangeMap leaked
    cdef uint64_t asid
    cdef bint split4k

    def __init__(self, vm, snp, prepare, invalidate, injected, psmash):
        d = vm.__dict__
        self.vm = vm
        self.vs = <VmState?>vm
        self.d = d
        self.snp = snp
        cdef Counters st = _vm_counters(d["_stats"])
        self.stats = st
        ix = st.index
        self.i_dm_splits = ix["directmap_splits"]
        self.i_dm_unmaps = ix["directmap_unmaps"]
        self.i_dm_restores = ix["directmap_restores"]
        self.i_dm_cpa_calls = ix["directmap_cpa_calls"]
        self.i_dm_tlb_flushes = ix["directmap_tlb_flushes"]
        self.i_sleep_atomic = ix["sleep_in_atomic"]
        self.i_rmpupdate = ix["rmpupdate"]
        self.i_rmpupdate_2m = ix["rmpupdate_2m"]
        self.i_rmpupdate_failures = ix["rmpupdate_failures"]
        self.i_cache_flush_pages = ix["cache_flush_pages"]
        self.i_leaked_pages = ix["snp_leaked_pages"]
        self.costs = d["_costs"]
        self.ledger = d["_ledger"]
        _op_price(&self.o_rmpupdate, self.ledger, self.costs, "rmpupdate")
        _op_price(&self.o_cpa_call, self.ledger, self.costs, "directmap_cpa_call")
        _op_price(&self.o_dm_split, self.ledger, self.costs, "directmap_split")
        _op_price(&self.o_dm_flush, self.ledger, self.costs, "directmap_tlb_flush")
        _op_price(&self.o_cache_flush, self.ledger, self.costs, "cache_flush_4k")
        _op_price(&self.o_pv4k, self.ledger, self.costs, "pvalidate_4k")
        _op_price(&self.o_pv2m, self.ledger, self.costs, "pvalidate_2m")
        _op_price(&self.o_psc, self.ledger, self.costs, "psc_request")
        self.i_pvalidate = ix["pvalidate"]
        self.i_pvalidate_2m = ix["pvalidate_2m"]
        self.i_pvalidate_failures = ix["pvalidate_failures"]
        self.i_psc_requests = ix["psc_requests"]
        self.armed = d["_inject"]._armed
        self.asid = snp.asid
        self.leaked = snp.leaked
        self.prepare_op = prepare
        self.invalidate_op = invalidate
        self.injected = injected
        self.psmash_fn = psmash
        self.rebind()

    def rebind(self):
        """Read ``snp.rmp`` and ``snp.directmap`` again (``SnpVm`` calls this when one is
        replaced). Objects of other types than RmpTable / DirectMap (the reference twins of
        the tests) are used through their Python methods. A DirectMap is known by the mark
        its class carries in its own namespace (``DirectMap._core_walks``), not by importing
        ``pkvm.host.directmap``, a layer above the core."""
        snp = self.snp
        self.rmp_obj = snp.rmp
        self.rmp = snp.rmp if type(snp.rmp) is RmpTable else None
        dm = snp.directmap
        self.dm = dm
        typed = type(dm).__dict__.get("_core_walks") is True
        self.dm_map = dm._map if typed else None
        self.dm_orig = dm._orig if typed else None
        self.dm_run.map = NULL
        self.dm_cnt = dm._cnt
        self.split4k = dm._policy == "split-4k"

    # -- RMP reads, typed or through a twin's methods --------------------------------------------

    cdef int _segments(self, uint64_t pfn, uint64_t n, int want, _Runs *out) except -1:
        """The segments of ``[pfn, pfn + n)`` as ``RmpTable.ranges`` cuts them, before any
        change: ``(s, e, 2M?)`` into ``out`` for the assigned ones (``want`` 1) or the
        unassigned ones (``want`` 0)."""
        cdef RmpTable rmp = self.rmp
        cdef uint64_t cur, end
        cdef RmpSeg g
        out.n = 0
        if rmp is None:
            for s, e, ent in self.rmp_obj.ranges(pfn, n):
                if (1 if ent.assigned else 0) == want:
                    _runs_push(out, s, e, 1 if ent.level == 2 else 0)
            return 0
        if pfn >= rmp.max_pfn_ or n > rmp.max_pfn_ - pfn:
            rmp.ranges(pfn, n)  # raises the named error
        cur = pfn
        end = pfn + n
        while cur < end:
            g = rmp._seg_c(cur, end)
            if (1 if g.own else 0) == want:
                _runs_push(out, cur, g.end, g.size)
            cur = g.end
        return 0

    cdef int _assigned(self, uint64_t pfn) except -1:
        """``rmp.lookup(pfn).assigned`` (read through ``RmpTable._word_c``: an RMPUPDATE of
        ``pfn`` right after it needs no second lookup)."""
        if self.rmp is None or pfn >= self.rmp.max_pfn_:
            return 1 if self.rmp_obj.lookup(pfn).assigned else 0
        return self.rmp._word_c(pfn) & 1

    cdef int64_t _find_assigned(self, uint64_t pfn, uint64_t n, bint assigned) except -2:
        """``rmp.find_ne(pfn, n, assigned=not assigned)``: the first pfn of the range that is
        (``assigned``) or is not assigned, or -1."""
        cdef uint64_t x
        cdef RmpMatch want
        if self.rmp is None or pfn >= self.rmp.max_pfn_ or n > self.rmp.max_pfn_ - pfn:
            return self.rmp_obj.find_ne(pfn, n, assigned=not assigned)
        memset(&want, 0, sizeof(want))
        want.fields = RMP_F_ASSIGNED
        want.assigned = 0 if assigned else 1
        if self.rmp._find_c(pfn, pfn + n, &want, False, &x):
            return <int64_t>x
        return -1

    cdef inline int _charge(self, str op, object n) except -1:
        return self.ledger.charge_obj(op, n)  # VM._charge

    cdef object _directmap(self, bint before, uint64_t pfn, uint64_t npages, int level,
                           bint assigned):
        """``_snp_rmp._directmap``: one direct-map dispatcher (before or after the
        RMPUPDATEs) and its counters; returns its CPA calls."""
        cdef int easy = self._dm_easy(before, npages, level)
        cdef bint quick = easy == 1 or (easy == 2 and self._dm_all_4k(pfn, npages))
        cdef SchedHooks sched = <SchedHooks?>self.vs._sched if self.vs._sched is not None else None
        # No CPA call, so no cpa_lock: adjust_direct_map returns before set_memory_4k for a 2M
        # update or a page the direct map already maps at 4K, and nothing runs after the
        # instruction; the RFC's rmpupdate() unmaps only before an update that assigns and
        # restores only after one that does not (docs/kernel-semantics.md §5.8).
        if quick or (self.dm_map is not None and not self.split4k and (before != assigned or npages == 0)):
            return 0
        if sched is not None:
            sched._acquire("cpa_lock", 1)  # set_memory_*: one direct-map change at a time per host
        cdef uint64_t n_splits = 0, n_unmaps = 0, n_restores = 0
        cnt = self.dm_cnt
        if easy == 2:
            # split-4k before 4K RMPUPDATEs over pages not all at 4K, on a DirectMap:
            # DirectMap._before_rmpupdate -> _adjust, the same C function
            calls = _dm_split_4k(self.dm_map, self.dm_orig, cnt, self.dm, pfn, pfn + npages, &n_splits)
            splits = n_splits
            unmaps = restores = 0
        elif self.dm_map is not None:
            # unmap-restore on a DirectMap: what DirectMap._before_rmpupdate / _after_rmpupdate
            # call, in C
            calls = _dm_unmap_restore(self.dm, self.dm_map, self.dm_orig, cnt, before, assigned,
                                      pfn, pfn + npages, &n_splits, &n_unmaps, &n_restores)
            splits, unmaps, restores = n_splits, n_unmaps, n_restores
        else:
            s0, u0, r0 = cnt["directmap_splits"], cnt["directmap_unmaps"], cnt["directmap_restores"]
            if before:
                calls = self.dm._before_rmpupdate(pfn, npages, level, assigned)
            else:
                calls = self.dm._after_rmpupdate(pfn, npages, level, assigned)
            splits = cnt["directmap_splits"] - s0
            unmaps = cnt["directmap_unmaps"] - u0
            restores = cnt["directmap_restores"] - r0
        if not calls:
            if sched is not None:
                sched._pagewise("cpa_lock", 0)
                sched._release("cpa_lock", 1)
            return 0
        cdef Counters st = self.stats
        st.v[self.i_dm_splits] += <int64_t>splits
        st.v[self.i_dm_unmaps] += <int64_t>unmaps
        st.v[self.i_dm_restores] += <int64_t>restores
        st.v[self.i_dm_cpa_calls] += <int64_t>calls
        _charge_op(self.ledger, &self.o_cpa_call, "directmap_cpa_call", calls)  # each under cpa_lock (held here)
        cdef long long long0 = _vm_ns(sched) if sched is not None and splits else 0
        if splits:
            _charge_op(self.ledger, &self.o_dm_split, "directmap_split", splits)
        # A global TLB flush per split, under cpa_lock (__split_large_page's flush_tlb_all): a
        # 4K update inside a 1G mapping splits twice and flushes twice. Nothing else flushes:
        # set_memory_4k changes no entry after its splits (no CPA_FLUSHTLB, so no cpa_flush),
        # and the RFC's unmap / restore go through the _noflush helpers page by page
        # (docs/kernel-semantics.md §5.8).
        flushes = splits
        if flushes:
            st.v[self.i_dm_tlb_flushes] += <int64_t>flushes
            _charge_op(self.ledger, &self.o_dm_flush, "directmap_tlb_flush", flushes)
        # The calls that may sleep: every set_memory_4k (change_page_attr_set_clr runs
        # vm_unmap_aliases, which takes the vmap_purge_lock mutex); of the RFC's _noflush
        # helpers only those that split (split_large_page drops cpa_lock, a spinlock, to
        # allocate the page-table page with GFP_KERNEL).
        sleeps = calls if self.split4k else splits
        if sleeps and self.snp.atomic and (sched is None or sched.holds("mmu_lock")):
            st.v[self.i_sleep_atomic] += <int64_t>sleeps
            self._charge("sleep_in_atomic", sleeps)
            self.vm.events.append(("sleep_in_atomic", (f"BUG: sleeping function called from invalid context: "
                                   f"{sleeps} direct-map change(s) for pfns [{pfn:#x}, {pfn + npages:#x}) "
                                   f"under mmu_lock")))
        if sched is not None:
            if flushes:
                sched._ipi("host", flushes)  # flush_tlb_all: an IPI to every host CPU
            # the kernel takes cpa_lock once per CPA call; the splits (each with its flush) are
            # long single holds among them (an interleaved lock's window: SchedHooks._pw_settle)
            sched._pagewise("cpa_lock", calls, <long long>splits if splits else -1,
                            _vm_ns(sched) - long0 if splits else 0)
            sched._release("cpa_lock", 1)
        return calls

    cdef inline int _dm_easy(self, bint before, uint64_t npages, int level) noexcept:
        """Whether the dispatcher has nothing to do, as far as its arguments say: split-4k's
        need no call into the direct map after the instruction or before a 2M one (1), nor
        before 4K ones over pages all mapped at 4K already (2: look at the pages;
        DirectMap._adjust / _split change nothing then); 0 otherwise."""
        if not self.split4k or self.dm_map is None:
            return 0
        if not before or level == 2 or npages == 0:
            return 1
        return 2

    cdef inline bint _dm_all_4k(self, uint64_t pfn, uint64_t npages) except -1:
        """Whether the direct map maps every page of ``[pfn, pfn + npages)`` at 4K already."""
        cdef RunCursor cur
        cdef int ok
        cdef uint64_t v
        if npages == 1:
            # (a fragmented guest's faults take pfns in order: the run of 4K mappings read
            # last holds the next one, until the fault that splits the next 2M block)
            _memo_get(&self.dm_run, self.dm_map, pfn, &v)
            return v & 3 < 2
        ok = rangemap_cursor_init(self.dm_map, &cur, pfn, pfn + npages)
        while ok == 1:
            if cur.value & 3 >= 2:
                return False
            ok = rangemap_cursor_next(self.dm_map, &cur)
        return True

    cdef inline bint _dm_idle(self, bint before, uint64_t pfn, uint64_t npages, int level) except -1:
        """Whether :meth:`_directmap` would do nothing and return 0: its quick case tested
        before the call (one page looked at, no walk of runs). No lock is taken then either,
        timeline or not (no CPA call, no ``cpa_lock``)."""
        cdef int easy = self._dm_easy(before, npages, level)
        return easy == 1 or (easy == 2 and npages == 1 and self._dm_all_4k(pfn, 1))

    def directmap(self, bint before, uint64_t pfn, uint64_t npages, int level, bint assigned):
        """``pkvm.platforms._snp_rmp._directmap``."""
        return self._directmap(before, pfn, npages, level, assigned)

    cpdef int rmpupdate_range(self, uint64_t pfn, uint64_t npages, int level, bint assigned,
                              uint64_t gfn=0, bint immutable=False, int dm=_DM_BOTH) except? -1000:
        """``pkvm.platforms._snp_rmp.rmpupdate_range`` (``dm`` is a :data:`DIRECTMAP_MODES`
        code): an armed ``set_memory`` failure goes entry by entry through the Python
        ``_rmpupdate_injected``."""
        if self.vs._sched is not None:
            return self._update_window(pfn, npages, level, assigned, gfn, immutable, dm)
        if not self.armed:  # (nothing armed: _update's work is the body's)
            return self.body(pfn, npages, level, assigned, gfn, immutable, dm)
        return self._update(pfn, npages, level, assigned, gfn, immutable, dm)

    cdef int _update_window(self, uint64_t pfn, uint64_t npages, int level, bint assigned, uint64_t gfn,
                            bint immutable, int dm) except? -1000:
        """:meth:`_update` under a timeline: the range is a window over which the kernel's
        page-by-page direct-map calls (and so cpa_lock) interleave with its RMPUPDATEs
        (SchedHooks.pw_begin; inside a fault batch, the batch's window counts). A function of
        its own so that :meth:`rmpupdate_range` without a timeline carries no try/finally."""
        cdef SchedHooks sched = <SchedHooks?>self.vs._sched
        sched._pw_begin()
        try:
            return self._update(pfn, npages, level, assigned, gfn, immutable, dm)
        finally:
            sched._pw_end()

    cdef inline int _update(self, uint64_t pfn, uint64_t npages, int level, bint assigned, uint64_t gfn,
                            bint immutable, int dm) except? -1000:
        """:meth:`rmpupdate_range`'s work: :meth:`body`, or the injected path when armed."""
        if self.armed and (dm == _DM_BOTH or dm == _DM_BEFORE) and "set_memory" in self.armed:
            return self.injected(self.vm, pfn, npages, level, assigned, gfn, immutable, _DM_NAMES[dm])
        return self.body(pfn, npages, level, assigned, gfn, immutable, dm)

    cpdef int body(self, uint64_t pfn, uint64_t npages, int level, bint assigned, uint64_t gfn,
                   bint immutable, int dm) except? -1000:
        """``pkvm.platforms._snp_rmp._rmpupdate_body``: the direct-map work before, the
        RMPUPDATEs, their accounting, the direct-map work after; 0 or ``-EFAULT``. (The rare
        steps, a twin's table, the event and a failure, are functions of their own: this one
        holds no Python object.)"""
        cdef RmpResult res
        cdef RmpTable rmp = self.rmp
        if (dm == _DM_BOTH or dm == _DM_BEFORE) and not self._dm_idle(True, pfn, npages, level):
            self._directmap(True, pfn, npages, level, assigned)
        if rmp is None or (level != 1 and level != 2) or pfn >= rmp.max_pfn_ or npages > rmp.max_pfn_ - pfn or (
                level == 2 and npages & _MASK_2M) or (assigned and (gfn >= _RMP_MAX_PFN or gfn + npages > _RMP_MAX_PFN)):
            self._twin_update(pfn, npages, level, assigned, gfn, immutable, &res)
        elif assigned:
            rmp._rmpupdate_c(pfn, npages, level == 2, True, self.asid, gfn, immutable, &res)
        else:
            rmp._rmpupdate_c(pfn, npages, level == 2, False, 0, 0, False, &res)
        cdef uint64_t done = res.done
        cdef Counters st = self.stats
        if done:
            if self.vs._sched is not None:
                (<SchedHooks?>self.vs._sched)._changed_c()  # a vCPU looping on RMP #NPF may now go on
            st.v[self.i_rmpupdate] += <int64_t>done
            if level == 2:
                st.v[self.i_rmpupdate_2m] += <int64_t>done
            _charge_op_u(self.ledger, &self.o_rmpupdate, "rmpupdate", done)
        if self.ledger.traced:
            self._emit_update(pfn, level, assigned, gfn, &res)
        if res.code:
            return self._update_failed(pfn, level, assigned, dm, &res)
        if (dm == _DM_BOTH or dm == _DM_AFTER) and not self._dm_idle(False, pfn, npages, level):
            self._directmap(False, pfn, npages, level, assigned)
        return 0

    cdef int _twin_update(self, uint64_t pfn, uint64_t npages, int level, bint assigned, uint64_t gfn,
                          bint immutable, RmpResult *res) except -1:
        """:meth:`body`'s RMPUPDATEs on a twin, or out of the table (RmpTable.rmpupdate_range
        raises the named error), into ``res``."""
        cdef int64_t fail
        if assigned:
            t = self.rmp_obj.rmpupdate_range(pfn, npages, level, assigned=True, asid=self.asid,
                                             gpa=gfn << 12, immutable=immutable)
        else:
            t = self.rmp_obj.rmpupdate_range(pfn, npages, level, assigned=False)
        res.done, fail, res.code = t
        res.fail_pfn = <uint64_t>fail if res.code else 0
        return 0

    cdef int _emit_update(self, uint64_t pfn, int level, bint assigned, uint64_t gfn,
                          const RmpResult *res) except -1:
        """:meth:`body`'s ``rmp_change`` event."""
        cdef uint64_t done = res.done
        cdef uint64_t span = done << (9 if level == 2 else 0)
        self.vm._emit("rmp_change", gfn if assigned else None, gfn + span if assigned else None,
                      "rmpupdate", done, 0, res.code, (pfn, pfn + span, level, assigned))
        return 0

    cdef int _update_failed(self, uint64_t pfn, int level, bint assigned, int dm,
                            const RmpResult *res) except? -1000:
        """:meth:`body` after an RMPUPDATE failed (``res.code``): counted, the event of the VM,
        the direct-map work after the instructions that succeeded; ``-EFAULT``."""
        cdef uint64_t done = res.done
        cdef int code = res.code
        cdef int64_t fail = <int64_t>res.fail_pfn
        self.stats.v[self.i_rmpupdate_failures] += 1
        if code == _RMP_FAIL_OVERLAP:
            from pkvm.constants import RETRY_LIMIT
            how = (f" (still FAIL_OVERLAP after {RETRY_LIMIT} attempts; rmpupdate() retries it until "
                   "another CPU releases the entry)")
        else:
            how = ""
        self.vm.events.append(("rmpupdate", f"RMPUPDATE failed for pfn {fail:#x} level {level}: code {code}{how}"))
        if (dm == _DM_BOTH or dm == _DM_AFTER) and done:
            self._directmap(False, pfn, done << (9 if level == 2 else 0), level, assigned)
        return -_EFAULT

    cdef int _check_range(self, uint64_t pfn, uint64_t npages) except -1:
        """Raise RmpTable's named ValueError for a range outside the table."""
        if pfn >= self.rmp.max_pfn_ or npages > self.rmp.max_pfn_ - pfn:
            self.rmp.ranges(pfn, npages)
        return 0

    cpdef int gmem_prepare(self, uint64_t gfn, uint64_t pfn, int order, uint64_t nr) except? -1000:
        """``pkvm.platforms.snp.snp_gmem_prepare`` (``sev_gmem_prepare``, §5.5)."""
        cdef uint64_t base
        cdef int64_t x
        cdef Py_ssize_t i, j
        cdef _Runs todo
        cdef int r
        if order:
            base = pfn & ~(<uint64_t>_MASK_2M)
            if self._assigned(pfn):
                return 0
            if order >= 9 and self._find_assigned(base, RMP_PAGES_2M, True) == -1:
                r = self.rmpupdate_range(base, RMP_PAGES_2M, 2, True, gfn & ~(<uint64_t>_MASK_2M))
            else:
                r = self.rmpupdate_range(pfn, 1, 1, True, gfn)
            return -_EINVAL if r else 0
        if nr == 1 and self.rmp is not None and pfn < self.rmp.max_pfn_:
            # one 4K folio (a fragmented fault): what _segments would find, from one lookup
            # (_assigned's, which the RMPUPDATE right after starts from)
            if self.rmp._word_c(pfn) & 1:
                return 0
            return -_EINVAL if self.rmpupdate_range(pfn, 1, 1, True, gfn) else 0
        _runs_init(&todo)
        try:
            self._segments(pfn, nr, 0, &todo)
            for i in range(todo.n):
                r = self.rmpupdate_range(todo.a[i], todo.b[i] - todo.a[i], 1, True, gfn + (todo.a[i] - pfn))
                if r:
                    if nr > 1:
                        # Undo the batch: the entries after the failing one are unchanged;
                        # those before it (this run's prefix included) go back to
                        # hypervisor-owned at 4K.
                        for j in range(i):
                            self.rmpupdate_range(todo.a[j], todo.b[j] - todo.a[j], 1, False)
                        x = self._find_assigned(todo.a[i], todo.b[i] - todo.a[i], False)
                        if x > todo.a[i]:
                            self.rmpupdate_range(todo.a[i], x - todo.a[i], 1, False)
                    return -_EINVAL
            return 0
        finally:
            _runs_free(&todo)

    cpdef int make_shared_range(self, uint64_t pfn_start, uint64_t pfn_end, bint flush,
                                int dm=_DM_BOTH) except? -1000:
        """``pkvm.platforms._snp_rmp.make_shared_range`` (§5.7)."""
        cdef uint64_t s, e
        cdef _Runs segs
        cdef Py_ssize_t i, k, npieces
        cdef uint64_t pa[3]
        cdef uint64_t pb[3]
        cdef int pl[3]
        cdef int r, ret = 0
        if pfn_end < pfn_start:
            self.rmp_obj.ranges(pfn_start, <object>pfn_end - <object>pfn_start)  # the named error
        _runs_init(&segs)
        try:
            self._segments(pfn_start, pfn_end - pfn_start, 1, &segs)
            for i in range(segs.n):
                s = segs.a[i]
                e = segs.b[i]
                if segs.c[i]:
                    # A run of 2M entries: its ends may cut an entry that continues outside the
                    # range.
                    npieces = _split_2m(s, e, pa, pb, pl)
                    for k in range(npieces):
                        if pl[k] == 1:
                            self.psmash_fn(self.vm, pa[k])
                else:
                    pa[0] = s
                    pb[0] = e
                    pl[0] = 1
                    npieces = 1
                for k in range(npieces):
                    r = self.rmpupdate_range(pa[k], pb[k] - pa[k], pl[k], False, 0, False, dm)
                    if r:
                        ret = ret or r
                        continue
                    if flush:
                        self.stats.v[self.i_cache_flush_pages] += <int64_t>(pb[k] - pa[k])
                        _charge_op(self.ledger, &self.o_cache_flush, "cache_flush_4k", pb[k] - pa[k])
            return ret
        finally:
            _runs_free(&segs)

    cpdef int gmem_invalidate(self, uint64_t pfn_start, uint64_t pfn_end) except? -1000:
        """``pkvm.platforms.snp.snp_gmem_invalidate`` (``sev_gmem_invalidate``, §5.7): a page
        that cannot be made shared is leaked (stays assigned, recorded in ``snp.leaked``)."""
        cdef _Runs segs
        cdef Py_ssize_t i
        if self.make_shared_range(pfn_start, pfn_end, True, _DM_BOTH):
            _runs_init(&segs)
            try:
                self._segments(pfn_start, pfn_end - pfn_start, 1, &segs)
                for i in range(segs.n):
                    rangemap_assign(self.leaked, segs.a[i], segs.b[i], 1)
                    self.stats.v[self.i_leaked_pages] += <int64_t>(segs.b[i] - segs.a[i])
            finally:
                _runs_free(&segs)
        return 0


# -- guest_memfd (pkvm.kvm.gmem) ------------------------------------------------------------------

cdef inline str _alloc_op(int order):
    """The cost op of allocating one guest_memfd folio of ``2**order`` pages, or None (the VM
    charges other orders itself)."""
    if order == 0:
        return "gmem_alloc_4k"
    if order == 9:
        return "gmem_alloc_2m"
    if order == 18:
        return "gmem_alloc_1g"
    return None


@cython.final
@cython.auto_pickle(False)  # a VM's live state: never pickled on its own
cdef class GmemPath:
    """The typed state of one VM's guest_memfd steps (``vm._gmem_path``, built on first use by
    ``pkvm.kvm.gmem``): the host allocator's map, the VM's counter and cost dicts, the policy's
    guest_memfd knobs, the platform's prepare / invalidate ops (SNP's as a :class:`SnpPath`)
    and the Python functions of the rare paths. The methods trust their arguments."""

    cdef object vm, platform, prepare_op, invalidate_op, is_implemented, mfe
    cdef VmState vs             # the VM itself, typed: its hot fields are C members
    cdef HostMemoryState hm     # the host allocator (its fields are C members)
    cdef dict d, costs, armed
    cdef Counters stats
    cdef Ledger ledger
    cdef OpPrice o_alloc[3]     # gmem_alloc_4k / _2m / _1g, resolved for _charge_op_u
    cdef OpPrice o_punch        # gmem_punch_4k, resolved for _charge_op
    cdef int max_order, mode
    cdef bint has_prepare, has_invalidate
    cdef SnpPath snp_prep, snp_inval
    # the memslot read last (memslots never change these fields) and its guest_memfd's maps
    cdef object c_slot, c_gmem
    cdef MemslotState c_ms      # the same memslot, typed (its file pointer)
    cdef RangeMap c_folios, c_bindings
    cdef int64_t c_base, c_pgoff, c_key, c_npages
    # the binding run (file indices -> memslot key + 1) read last
    cdef RunMemo bind
    cdef str err_msg

    def __init__(self, vm, is_implemented, memory_fault_exit):
        d = vm.__dict__
        self.vm = vm
        self.vs = <VmState?>vm
        self.d = d
        self.stats = _vm_counters(d["_stats"])
        self.costs = d["_costs"]
        self.ledger = d["_ledger"]
        for k in range(3):
            _op_price(&self.o_alloc[k], self.ledger, self.costs, _alloc_op(9 * k))
        _op_price(&self.o_punch, self.ledger, self.costs, "gmem_punch_4k")
        self.armed = d["_inject"]._armed
        self.hm = <HostMemoryState?>d["_hostmem"]
        policy = d["_policy"]
        self.max_order = policy.gmem_max_order
        self.mode = {"none": _PREP_NONE, "once-per-folio": _PREP_ONCE,
                     "every-lookup": _PREP_EVERY}[policy.prepare]
        self.is_implemented = is_implemented
        self.mfe = memory_fault_exit
        self.c_slot = None
        self.bind.map = NULL
        self._ops(self.vs._platform)

    cdef int _ops(self, platform) except -1:
        """Read the platform's guest_memfd ops (again after a test swapped the op table)."""
        self.platform = platform
        self.prepare_op = platform.gmem_prepare
        self.invalidate_op = platform.gmem_invalidate
        self.has_prepare = self.is_implemented(self.prepare_op)
        self.has_invalidate = self.is_implemented(self.invalidate_op)
        snp = self.d.get("snp")
        path = getattr(snp, "_path", None) if snp is not None else None
        self.snp_prep = path if path is not None and path.prepare_op is self.prepare_op else None
        self.snp_inval = path if path is not None and path.invalidate_op is self.invalidate_op else None
        return 0

    cdef inline int _sync(self) except -1:
        platform = self.vs._platform
        if platform is not self.platform:
            self._ops(platform)
        return 0

    cdef int _slot(self, slot) except -1:
        if slot is not self.c_slot:
            gmem = slot.gmem
            self.c_gmem = gmem
            if gmem is not None:
                self.c_folios = gmem.folios
                self.c_bindings = gmem.bindings
                self.c_npages = gmem.npages
            self.c_base = slot.base_gfn
            self.c_pgoff = slot.gmem_pgoff
            self.c_key = slot.key
            self.c_ms = <MemslotState?>slot
            self.c_slot = slot
        return 0

    cdef inline int _charge(self, str op, object n) except -1:
        return self.ledger.charge_obj(op, n)  # VM._charge

    # -- allocation ---------------------------------------------------------------------------

    cdef int _alloc(self, RangeMap folios, int64_t index, int64_t count, int order, bint prepared,
                    _Runs *plan, const RunPos *pos=NULL) except -1:
        """``GuestMemfd._alloc_folios`` into ``plan``: 0, or the errno of a failure (its message
        in ``err_msg``; the folios before an injected failure are allocated)."""
        cdef Py_ssize_t k
        cdef int64_t i
        cdef int r
        if self.armed and "gmem_folio_alloc" in self.armed:
            hit = self.d["_inject"].take("gmem_folio_alloc", count)
            if hit is not None:
                if hit[0]:
                    r = self._alloc(folios, index, hit[0], order, prepared, plan, pos)
                    if r:
                        return r
                self.err_msg = (f"guest_memfd folio allocation failed at index "
                                f"{index + (hit[0] << order):#x} (injected)")
                return hit[1]
        if _hm_alloc(self.hm, count, order, plan):
            self.err_msg = f"host memory exhausted allocating {count} x order-{order} blocks"
            return _ENOMEM
        i = index
        for k in range(plan.n):
            if k == 0 and pos != NULL:  # (where the caller's lookup of index landed)
                _rm_put(folios, pos, <uint64_t>i, <uint64_t>(i + plan.b[k]),
                        _folio_value(plan.a[k] - i, order, prepared))
            else:
                rangemap_assign(folios, <uint64_t>i, <uint64_t>(i + plan.b[k]),
                                _folio_value(plan.a[k] - i, order, prepared))
            i += plan.b[k]
        self.stats.v[S_GMEM_PAGES_ALLOCATED] += count << order
        op = _alloc_op(order)
        if op is None:
            self.vm._charge_alloc(count << order, order)
        elif count >= 0:
            _charge_op_u(self.ledger, &self.o_alloc[order // 9], op, <uint64_t>count)
        else:
            self._charge(op, count)
        return 0

    def alloc_folios(self, gmem, int64_t index, int64_t count, int order, bint prepared):
        """``pkvm.kvm.gmem.GuestMemfd._alloc_folios``: the host pfn runs, or KvmError."""
        cdef _Runs plan
        cdef int r
        _runs_init(&plan)
        try:
            r = self._alloc(gmem.folios, index, count, order, prepared, &plan)
            if r:
                from pkvm.errors import KvmError
                raise KvmError(r, self.err_msg)
            return _runs_list(&plan)
        finally:
            _runs_free(&plan)

    cdef int _undo(self, RangeMap folios, int64_t first, _Runs *plan, int64_t cursor,
                   int order) except -1:
        """Give back the folios a failed batch allocated, restoring the allocator's cursor."""
        cdef Py_ssize_t k
        cdef int64_t idx = first, total = 0
        for k in range(plan.n):
            _hm_free(self.hm, plan.a[k], plan.b[k])
            rangemap_assign(folios, idx, idx + plan.b[k], 0)
            idx += plan.b[k]
            total += plan.b[k]
        self.hm._cursor = cursor
        self.stats.v[S_GMEM_PAGES_ALLOCATED] -= total
        self.vm._uncharge_alloc(total, order)
        return 0

    # -- the fault's pfn lookup ---------------------------------------------------------------

    def get_pfn(self, PageFault f, int64_t end):
        """``pkvm.kvm.gmem.kvm_gmem_get_pfn`` (``kvm_mmu_faultin_pfn_gmem`` +
        ``kvm_gmem_get_pfn``, §4.3) for the gfns ``[f.gfn, end)``: the end of the gfns
        ``f`` now accounts for."""
        return self._get_pfn(f, end)

    cdef inline void _prefetch_folio(self, uint64_t gfn) noexcept:
        """Start the wait for the folio lookup of a private fault at ``gfn`` in the memslot
        seen last (:meth:`_get_pfn` reads that leaf after the fault's own lookups): a fault in
        another memslot only asks for lines it does not use."""
        if self.c_folios is not None and <int64_t>gfn >= self.c_base:
            _prefetch_finger(self.c_folios, <uint64_t>(<int64_t>gfn - self.c_base + self.c_pgoff))

    cdef int64_t _get_pfn(self, PageFault f, int64_t end) except -1:
        """:meth:`get_pfn` (the fault path calls it directly)."""
        cdef int64_t gfn, index, first, fi, gfn_f, delta, nf, size, a, cursor = 0
        cdef uint64_t v, x
        cdef int order, r, err
        cdef bint prepared, allocated = False, pre_marked = False
        cdef Run run
        cdef RunPos fpos            # where the folio lookup landed, for the allocation's write
        cdef RangeMap folios
        cdef _Runs plan
        self._sync()
        slot = f.slot
        gfn = f.gfn
        self._slot(slot)
        if self.c_gmem is None or self.c_ms.gmem_file is None:
            # a private access to a slot without guest_memfd, or the file was closed
            self.mfe(f, _EFAULT)
            return gfn + 1
        index = gfn - self.c_base + self.c_pgoff
        _memo_get(&self.bind, self.c_bindings, <uint64_t>index, &v)
        if v != <uint64_t>(self.c_key + 1):
            self.mfe(f, 5)  # EIO
            return gfn + 1
        folios = self.c_folios
        run = folios._run_pos_c(index, &fpos)
        v = run.value
        if (f.single or (v and _folio_order(v)) or (not v and self.max_order)
                or (self.armed and ("gmem_folio_alloc" in self.armed or "set_memory" in self.armed))):
            end = gfn + 1  # one fault at a time
            f.single = True
        else:
            x = run.end - <uint64_t>index  # (unsigned: the last gap's run ends at 2**64 - 1)
            if x < <uint64_t>(end - gfn):
                end = gfn + <int64_t>x
        _runs_init(&plan)
        try:
            if not v:
                order = 0
                if self.max_order:
                    size = 1LL << self.max_order
                    a = index & ~(size - 1)
                    if a + size <= self.c_npages and not rangemap_find_ne(folios, a, a + size, 0, &x):
                        order = self.max_order
                cursor = self.hm._cursor
                first = index if not order else index & ~((1LL << order) - 1)
                prepared = self.mode == _PREP_NONE
                if not prepared and (order or end == gfn + 1):
                    # One folio: the lookup below marks it prepared (kvm_gmem_mark_prepared)
                    # once the prepare op succeeds, so store it marked at once; a failing op
                    # takes the mark back below (pre_marked), so the map ends as before.
                    pre_marked = self.has_prepare
                    prepared = True
                err = self._alloc(folios, first, 1 if order else end - gfn, order, prepared, &plan, &fpos)
                if err:
                    self.mfe(f, err)
                    return gfn + 1
                if not order:
                    end = gfn + plan.b[0]
                allocated = True
                # The folio now at index: the first pfn run of the plan starts at ``first``.
                v = _folio_value(plan.a[0] - first, order, prepared)
            order = _folio_order(v)
            size = 1LL << order
            fi = index & ~(size - 1)
            gfn_f = gfn - (index - fi)
            delta = _decode_delta(v)
            nf = 1 if order else end - gfn
            if self.mode != _PREP_NONE and (self.mode == _PREP_EVERY or not v & _FOLIO_PREPARED or pre_marked):
                if not self.has_prepare:
                    r = 0
                elif self.snp_prep is not None:
                    r = self.snp_prep.gmem_prepare(gfn_f, fi + delta, order, nf)
                else:
                    r = self.prepare_op(self.vm, gfn_f, fi + delta, order, nf)
                if r:
                    if nf > 1:
                        # The op prepared nothing; retry folio by folio like per-page faults.
                        if allocated:
                            self._undo(folios, first, &plan, cursor, order)
                        f.single = True
                        return self._get_pfn(f, gfn + 1)
                    if self.mode == _PREP_EVERY:
                        if not pre_marked:
                            rangemap_assign(folios, fi, fi + size, v | _FOLIO_PREPARED)
                    elif pre_marked:
                        rangemap_assign(folios, fi, fi + size, v & ~_FOLIO_PREPARED)
                    self.mfe(f, -r)
                    return gfn + 1
                if self.has_prepare:
                    self.stats.v[S_GMEM_PREPARE] += <int64_t>nf
                if not v & _FOLIO_PREPARED:
                    rangemap_assign(folios, fi, fi + (nf << order), v | _FOLIO_PREPARED)
            f.delta = index + delta - gfn
            f.order = order if not (gfn - index) & (size - 1) else 0
            return end
        finally:
            _runs_free(&plan)

    # -- the hole punch's release of folios ---------------------------------------------------

    def truncate(self, gmem, int64_t start, int64_t end):
        """``pkvm.kvm.gmem.GuestMemfd._truncate``: free the folios wholly inside
        ``[start, end)``; a large folio only partly inside stays (its partial range would just
        be zeroed)."""
        self._truncate(gmem, start, end)

    cdef int _truncate(self, gmem, int64_t start, int64_t end) except -1:
        """:meth:`truncate`."""
        cdef RangeMap folios = gmem.folios
        cdef RunCursor cur
        cdef int ok, order
        cdef int64_t size, a, b, pfn, freed = 0
        self._sync()
        if start >= end:
            return 0
        ok = rangemap_cursor_init(folios, &cur, start, end)
        while ok == 1:
            order = _folio_order(cur.value)
            size = 1LL << order
            # Runs are clipped to [start, end) and folios are aligned: keep whole folios only.
            a = (<int64_t>cur.start + size - 1) & ~(size - 1)
            b = <int64_t>cur.end & ~(size - 1)
            if a < b:
                pfn = a + _decode_delta(cur.value)
                if self.has_invalidate:
                    if self.snp_inval is not None:
                        self.snp_inval.gmem_invalidate(pfn, pfn + (b - a))
                    else:
                        self.invalidate_op(self.vm, pfn, pfn + (b - a))
                    _stat_add_at(self.stats, S_GMEM_INVALIDATE, "gmem_invalidate", (b - a) >> order)
                _hm_free(self.hm, pfn, b - a)
                rangemap_assign(folios, a, b, 0)
                freed += b - a
            ok = rangemap_cursor_next(folios, &cur)
        if freed:
            _stat_add_at(self.stats, S_GMEM_PAGES_FREED, "gmem_pages_freed", freed)
            _charge_op(self.ledger, &self.o_punch, "gmem_punch_4k", freed)
        return 0

    cdef list _bound_ranges(self, gmem, int64_t start, int64_t end):
        """The slot-clipped gfn ranges ``(s, e)`` of the bindings that meet file indices
        ``[start, end)``."""
        cdef RangeMap bindings = gmem.bindings
        cdef RunCursor cur
        cdef int64_t base
        cdef int ok
        ranges = []
        slots = self.d["_slots"]
        ok = rangemap_cursor_init(bindings, &cur, start, end)
        while ok == 1:
            slot = slots[cur.value - 1]
            base = slot.base_gfn - slot.gmem_pgoff
            ranges.append((base + <int64_t>cur.start, base + <int64_t>cur.end))
            ok = rangemap_cursor_next(bindings, &cur)
        return ranges

    def bound_gfn_ranges(self, gmem, int64_t start, int64_t end):
        """``pkvm.kvm.gmem.GuestMemfd._bound_gfn_ranges``."""
        return self._bound_ranges(gmem, start, end)

    def punch_hole(self, gmem, int64_t start, int64_t end):
        """``pkvm.kvm.gmem.GuestMemfd._punch_hole`` (``kvm_gmem_punch_hole``, §4.7) on file
        indices ``[start, end)`` (already clipped): under the file's invalidate lock, an MMU
        invalidation around the zap of the bound gfns' private mappings, then the release of
        the folios (:meth:`truncate`). The VM's invalidation steps (``VM._invalidate_begin``,
        ``_invalidate_range_add``: the same C functions; ``_invalidate_end``: the attribute
        path's ``_post_begin``), zap and flush run here in C."""
        cdef bint flush = False
        cdef VmState vs = self.vs
        cdef SchedHooks sched
        cdef AttrPath ap
        cdef int64_t s, e
        if start >= end:
            return
        sched = <SchedHooks?>vs._sched if vs._sched is not None else None
        if sched is not None:
            sched._acquire("gmem_invalidate", 1)  # filemap_invalidate_lock: exclusive
        ranges = self._bound_ranges(gmem, start, end)
        if ranges:
            ap = <AttrPath?>self.vm._attr_path
            if sched is not None:
                sched._acquire("mmu_lock", 1)
            _mmu_invalidate_begin(vs)
            t0 = sched._work_ns() if sched is not None else self.ledger.now()
            for s, e in ranges:  # kvm_gmem_invalidate_begin zaps under mmu_lock (write)
                _mmu_invalidate_range_add(vs, s, e)
                ap.quiet = False
                if ap._zap(s, e, _FILTER_PRIVATE) > 0:  # only private mappings (§4.7)
                    flush = True
            if flush:
                ap.quiet = False
                ap._flush()
            ap._add_lock((sched._work_ns() if sched is not None else self.ledger.now()) - t0)
            if sched is not None:
                sched._release("mmu_lock", 1)
        self._truncate(gmem, start, end)
        if ranges:
            if sched is not None:
                sched._acquire("mmu_lock", 1)
            ap._post_begin()  # kvm_mmu_invalidate_end
            if sched is not None:
                sched._release("mmu_lock", 1)
        if sched is not None:
            sched._release("gmem_invalidate", 1)


# -- the VMM's shared backing --------------------------------------------------------------------

cdef inline uint64_t _sb_value(int64_t delta) noexcept:
    """A populated SharedBacking value: bit 0 set, the pfn delta as 56-bit two's complement
    from bit 8 (``pkvm.host.hostmem.encode_delta``)."""
    return 1 | (((<uint64_t>delta) & _DELTA_MASK) << _DELTA_SHIFT)


def shared_discard(SharedBackingState sb, uint64_t start, uint64_t end):
    """``MADV_DONTNEED`` on whole host pages inside the HVA pages ``[start, end)``: each
    populated run there goes back to the host allocator and becomes unpopulated; returns the
    pages freed. Nothing populated there (the usual case of private memory) changes nothing.
    (``pkvm.host.hostmem.SharedBacking.discard``.)"""
    return _shared_discard(sb, start, end)


cdef int64_t _shared_discard(SharedBackingState sb, uint64_t start, uint64_t end) except -1:
    """:func:`shared_discard` (the MMU notifier's discard calls it directly)."""
    cdef int order = sb.order
    cdef uint64_t a = ((start + (1ULL << order) - 1) >> order) << order
    cdef uint64_t b = (end >> order) << order
    cdef uint64_t x
    cdef int64_t freed = 0
    cdef RangeMap m = sb._map
    cdef RunCursor cur
    cdef int ok
    if a >= b or not rangemap_find_ne(m, a, b, 0, &x):
        return 0  # no whole host page inside the range, or nothing populated there
    ok = rangemap_cursor_init(m, &cur, a, b)
    while ok == 1:
        _hm_free(sb._mem, <uint64_t>(<int64_t>cur.start + _decode_delta(cur.value)), <int64_t>(cur.end - cur.start))
        freed += <int64_t>(cur.end - cur.start)
        ok = rangemap_cursor_next(m, &cur)
    rangemap_assign(m, a, b, 0)
    sb.nr_populated -= freed
    return freed


def shared_populate(SharedBackingState sb, uint64_t start, uint64_t end):
    """``pkvm.host.hostmem.SharedBacking.populate``: allocate every unpopulated host block of
    the HVA pages ``[start, end)`` in address order; the number of pages allocated.

    All or nothing: several unpopulated runs are planned together first, so ENOMEM
    (``KvmError``) populates nothing; one run is one allocation, itself all or nothing."""
    return _shared_populate(sb, start, end, NULL)


cdef int64_t _shared_populate(SharedBackingState sb, uint64_t start, uint64_t end,
                              uint64_t *word) except -1:
    """:func:`shared_populate` (the fault path calls it directly); ``word``, if not NULL,
    gets the map's word at ``start`` afterwards (the fault maps that page)."""
    cdef int order = sb.order
    cdef uint64_t mask = (1ULL << order) - 1
    cdef uint64_t a = start >> order
    cdef uint64_t b = (end >> order) + ((end & mask) != 0)
    cdef uint64_t blk, ea, hva, v, units = 0, w = 0
    cdef RangeMap m = sb._map
    cdef HostMemoryState mem
    cdef Run r
    cdef RunPos pos             # where the last lookup landed, for the first write
    cdef _Runs todo, plan
    cdef Py_ssize_t i, j
    if m is None:
        raise TypeError("SharedBacking._map must be a RangeMap")
    _runs_init(&todo)
    _runs_init(&plan)
    try:
        blk = a
        while blk < b:
            if (blk << order) == U64_MAX:
                rangemap_run_at(m, blk << order, &r)  # (raises the named OverflowError)
            r = m._run_pos_c(blk << order, &pos)
            if blk == a:
                w = r.value  # (start's block: run edges fall on block boundaries, see below)
            # blocks are populated whole, so run edges fall on block boundaries
            ea = (r.end >> order) + ((r.end & mask) != 0)
            if ea > b:
                ea = b
            if not r.value:
                _runs_push(&todo, <int64_t>blk, <int64_t>ea, 0)
                units += ea - blk
            blk = ea
        if todo.n == 0:
            if word != NULL:
                word[0] = w
            return 0
        mem = sb._mem
        if mem is None:
            raise TypeError("SharedBacking._mem must be a HostMemory")
        if todo.n > 1 and not _hm_plan(mem._used, mem.start_pfn, mem.end_pfn, mem._cursor,
                                       <int64_t>units, order, &plan):
            _populate_enomem(start, end)
        for i in range(todo.n):
            if _hm_alloc(mem, todo.b[i] - todo.a[i], order, &plan):
                _populate_enomem(start, end)
            blk = <uint64_t>todo.a[i]
            for j in range(plan.n):
                hva = blk << order
                v = _sb_value(plan.a[j] - <int64_t>hva)
                if blk == a:
                    w = v  # start's block, populated here (a run holds one word)
                if i == 0 and j == 0:  # (one block to populate: it lies in the last gap looked up)
                    _rm_put(m, &pos, hva, hva + <uint64_t>plan.b[j], v)
                else:
                    rangemap_assign(m, hva, hva + <uint64_t>plan.b[j], v)
                blk += <uint64_t>plan.b[j] >> order
        sb.nr_populated += <int64_t>(units << order)
        if word != NULL:
            word[0] = w
        return <int64_t>(units << order)
    finally:
        _runs_free(&todo)
        _runs_free(&plan)


cdef int64_t _shared_populate1(SharedBackingState sb, uint64_t hva, uint64_t *word) except -2:
    """:func:`_shared_populate` of the one HVA page ``hva`` (a one-page shared fault) in its
    common cases, with the same steps: the lookup of its block, and when the block is not
    populated one allocation of one block written where that lookup landed; ``word`` gets the
    map's word at ``hva``. -1, with nothing changed, where the general function must run
    (no map or allocator, a key past the map's range, an allocation that does not fit: it
    then repeats the lookup and raises)."""
    cdef int order = sb.order
    cdef uint64_t blk = (hva >> order) << order, w = 0
    cdef RangeMap m = sb._map
    cdef HostMemoryState mem = sb._mem
    cdef RunPos pos
    cdef Run r
    cdef _Runs plan
    if m is None or mem is None or blk == U64_MAX:
        return -1
    r = m._run_pos_c(blk, &pos)
    if r.value:
        word[0] = r.value
        return 0
    # (one block is one contiguous run: the plan stays in its own buffer, nothing to free)
    _runs_init(&plan)
    if _hm_alloc(mem, 1, order, &plan):
        return -1  # (ENOMEM: nothing allocated)
    w = _sb_value(plan.a[0] - <int64_t>blk)
    _rm_put(m, &pos, blk, blk + <uint64_t>plan.b[0], w)
    sb.nr_populated += 1LL << order
    word[0] = w
    return 1LL << order


def _shared_populate_one(SharedBackingState sb, uint64_t hva):
    """What a one-page shared fault does to the backing (pkvm/_fault.pxi): ``(pages
    populated, the map's word at hva)``, through :func:`_shared_populate1`, and through
    :func:`_shared_populate` where that declines (for the tests)."""
    cdef uint64_t w = 0
    cdef int64_t n = _shared_populate1(sb, hva, &w)
    if n < 0:
        if hva == U64_MAX:
            raise OverflowError("hva out of range")
        n = _shared_populate(sb, hva, hva + 1, &w)
    return n, w


cdef int _populate_enomem(uint64_t start, uint64_t end) except -1:
    from pkvm.errors import KvmError
    raise KvmError(_ENOMEM, f"host memory exhausted populating HVA pages [{start:#x}, {end:#x})")
