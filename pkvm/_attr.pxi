# ---------------------------------------------------------------------------------------------
# The KVM_SET_MEMORY_ATTRIBUTES path in the typed core (included at the end of _core.pyx)
# ---------------------------------------------------------------------------------------------
#
# The kernel steps of the attribute ioctl (docs/kernel-semantics.md §2.4-§2.8, §3.2-§3.3) over
# the VM's typed state: the attribute map, the leaf SPTEs and the memslots' lpage_info maps are
# RangeMaps read and written through the C API, so a 4K conversion makes no Python call and
# builds no list or tuple on its way. ``pkvm.kvm.vm.VM`` stays the API and keeps the rare
# paths (the concurrent timeline, the legacy ioctl, injected failures, the platforms' eager
# hooks, a TDX mirror root's zaps), which call back into it; the phase methods that
# ``AttrIoctl`` and the timeline drive (``VM._attr_pre`` / ``_attr_commit`` / ``_attr_post``)
# and ``pkvm.kvm.mmu``'s ``post_set_mixed`` / ``hugepage_has_attrs`` / ``Mmu.zap_range`` are
# thin wrappers of the functions here: each step has one implementation.
#
# The VM's counters and modeled time are typed state (pkvm/_ledger.pxi: ``VM._stats`` is a
# Counters, ``VM._ledger`` the modeled-time Ledger) that this file adds to in C; the invalidation
# count and range, the timeline hook and the dead flag are C members of the VM's base class
# ``VmState`` (pkvm/_state.pxi), read and written here in C; the VM's other mutable scalars stay
# attributes of the Python VM object, read and written here in its instance dict.

# Kernel and pkvm constants this file needs (pkvm.constants / pkvm.kvm.mmu hold the originals;
# tests/test_attr_core.py asserts they agree).
cdef uint64_t _ATTR_PRIVATE = 1ULL << 3        # KVM_MEMORY_ATTRIBUTE_PRIVATE
cdef uint64_t _LPAGE_MIXED = 1ULL << 31        # KVM_LPAGE_MIXED_FLAG
cdef uint64_t _SPTE_PRIVATE = 1ULL << 3        # pkvm.kvm.mmu.SPTE_PRIVATE
cdef int _FILTER_SHARED = 1                    # KVM_FILTER_SHARED
cdef int _FILTER_PRIVATE = 2                   # KVM_FILTER_PRIVATE
cdef int _FILTER_ALL = 3                       # KVM_FILTER_ALL
cdef int _DIRECT_ROOTS = 2                     # KVM_DIRECT_ROOTS
cdef int _MIRROR_ROOTS = 4                     # KVM_MIRROR_ROOTS
cdef int _VALID_ROOTS = 6                      # KVM_VALID_ROOTS
cdef uint64_t _PAGE_MASK = 0xFFF
cdef uint64_t _INVALID_GFN = 0xFFFFFFFFFFFFFFFFULL


cdef inline int _mmu_invalidate_begin(VmState vs) except -1:
    """``kvm_mmu_invalidate_begin``: one more invalidation in progress; the first one starts
    with an empty range. (``VM._invalidate_begin``; the attribute ioctl's own begin,
    ``AttrPath._pre_begin``, keeps the range it reads in its ``_PreState``.)"""
    vs.mmu_invalidate_in_progress += 1
    if vs.mmu_invalidate_in_progress == 1:
        vs._range_start = vs._range_end = _INVALID_GFN
    return 0


cdef inline int _mmu_invalidate_range_add(VmState vs, uint64_t start, uint64_t end) except -1:
    """``kvm_mmu_invalidate_range_add``: the invalidation range grows to cover ``[start, end)``
    (``VM._invalidate_range_add``)."""
    if vs._range_start == _INVALID_GFN:
        vs._range_start, vs._range_end = start, end
    else:
        vs._range_start = min(vs._range_start, start)
        vs._range_end = max(vs._range_end, end)
    return 0


cdef inline int _spte_level(uint64_t v) noexcept nogil:
    return <int>((v >> 1) & 3)


cdef inline int _level_shift(int level) noexcept nogil:
    return 18 if level == 3 else 9 if level == 2 else 0


cdef inline int _assign1(RangeMap m, uint64_t key, uint64_t value) except -1:
    """``rangemap_assign(m, key, key + 1, value)`` for ``key < 2**64 - 1`` through
    ``RangeMap._assign1_c`` (one scan of the leaf; the same tree as ``_assign_c``)."""
    if m.bulk_writer or m.bulk_readers:
        return rangemap_assign(m, key, key + 1, value)  # the busy map's RuntimeError
    return m._assign1_c(key, value)


cdef inline int _assign1_p(RangeMap m, const RunPos *pos, uint64_t key, uint64_t value) except -1:
    """:func:`_assign1` from where a lookup of ``key`` landed (``_assign1_at``)."""
    if m.bulk_writer or m.bulk_readers:
        return rangemap_assign(m, key, key + 1, value)  # the busy map's RuntimeError
    return _assign1_at(m, pos, key, value)


cdef Leaf *_attr_leaf_at(RangeMap m, uint64_t key) noexcept nogil:
    """``_leaf_at`` (the finger, else a descent that moves it) for this file's lookups, a
    function of its own: more callers of the inline ``_leaf_at`` made the C compiler call it
    out of line from the fault path's lookups too (31 instructions more per private fault)."""
    cdef Leaf *lf
    if not m.fingered:
        return _descend_leaf(m, key)
    lf = _finger_leaf(m, key)
    if lf != NULL:
        return lf
    lf = _descend_leaf(m, key)
    pkvm_store_ptr(&m.finger, <void*>lf)
    return lf


cdef inline Leaf *_lookup_pos(RangeMap m, uint64_t key, RunPos *pos) noexcept nogil:
    """The lookup of ``key`` (the leaf it lands in, returned; its last run starting at or
    before ``key``, -1 if none, in ``pos.index``), with ``pos`` filled in for a write there
    (``_assign1_at``)."""
    cdef Leaf *lf = _attr_leaf_at(m, key)
    pos.leaf = <void*>lf
    pos.index = _ub(lf.starts, lf.n, key) - 1
    pos.version = m.version
    return lf


cdef inline uint64_t _get_pos(RangeMap m, uint64_t key, RunPos *pos) noexcept nogil:
    """``rangemap_get(m, key)`` (the same lookup), and in ``pos`` where it landed."""
    cdef Leaf *lf = _lookup_pos(m, key, pos)
    cdef int i = pos.index
    if i >= 0 and key < lf.ends[i]:
        return _val(lf, i)
    return m.dflt


def _rangemap_assign1_at(RangeMap m not None, uint64_t look, uint64_t key, uint64_t value,
                         list between=None):
    """A lookup of ``look`` (``_get_pos``), the one-key writes ``between`` (``(key, value)``
    pairs, through ``assign``), then ``m.assign(key, key + 1, value)`` through the write from
    the lookup's position (``_assign1_p``), for its tests: a position of another key or of an
    older version must fall back to the plain one-key assign."""
    cdef RunPos pos
    if key == U64_MAX or look == U64_MAX:
        raise OverflowError("key out of range for a one-key assign: 2**64 - 1")
    _get_pos(m, look, &pos)
    for k, v in between or ():
        m.assign(k, k + 1, v)
    _assign1_p(m, &pos, key, value)


def _rangemap_assign1(RangeMap m not None, uint64_t key, uint64_t value):
    """``m.assign(key, key + 1, value)`` through the core's one-key assign (for its tests)."""
    if key == U64_MAX:
        raise OverflowError("key out of range for a one-key assign: 2**64 - 1")
    _assign1(m, key, value)


# -- lpage_info (§3.1-§3.3) -----------------------------------------------------------------------

cdef int _any_mixed(RangeMap m, uint64_t first, uint64_t last) except -1:
    """Whether a chunk of ``[first, last)`` has the MIXED bit: the walk stops at the first
    stored word that has it, so it reads the words before that one only (coalesced runs of
    plain disallow counts; none in the common case)."""
    cdef RunCursor cur
    cdef int ok = rangemap_cursor_init(m, &cur, first, last)
    while ok == 1:
        if cur.value & _LPAGE_MIXED:
            return 1
        ok = rangemap_cursor_next(m, &cur)
    return 0


cdef int _clear_mixed(RangeMap m, uint64_t first, uint64_t last) except -1:
    """Clear MIXED on the chunks ``[first, last)``."""
    cdef RunCursor cur
    cdef int ok = rangemap_cursor_init(m, &cur, first, last)
    while ok == 1:
        if cur.value & _LPAGE_MIXED:
            rangemap_assign(m, cur.start, cur.end, cur.value & ~_LPAGE_MIXED)
        ok = rangemap_cursor_next(m, &cur)
    return 0


cdef inline int _set_mixed(RangeMap m, uint64_t idx, bint mixed) except -1:
    return _set_mixed_w(m, idx, mixed, _INVALID_GFN)


cdef inline int _set_mixed_w(RangeMap m, uint64_t idx, bint mixed, uint64_t w,
                             const RunPos *pos=NULL) except -1:
    """:func:`_set_mixed` with the word at ``idx`` if known (else ``_INVALID_GFN``); ``pos``:
    where the lookup that read the known word landed (the write goes there: ``_assign1_at``)."""
    cdef uint64_t v = rangemap_get(m, idx) if w == _INVALID_GFN else w
    cdef uint64_t nv = (v | _LPAGE_MIXED) if mixed else (v & ~_LPAGE_MIXED)
    if nv != v:
        if pos != NULL and w != _INVALID_GFN:
            _assign1_p(m, pos, idx, nv)
        else:
            _assign1(m, idx, nv)
    return 0


cdef inline uint64_t _steps_2m(uint64_t g, uint64_t attrs, bint uniform, uint64_t k) noexcept nogil:
    """What ``hugepage_has_attrs`` at 2M reads of the chunk at ``g`` (§3.2): its
    ``kvm_range_has_memory_attributes`` over the 512 gfns (the no-op check's function, §2.7)
    steps to the gfns after its first read (the descent) up to the first that differs from
    ``attrs`` (``k``), or to the last one for a uniform chunk: ``k - g`` or 511 of them. For
    ``attrs == 0`` it is one ``xas_find``: no step."""
    if not attrs:
        return 0
    return 511 if uniform else k - g


# The attribute run at the first gfn of a 1G chunk, clipped to the chunk, remembered per chunk
# (``AttrPath.memo1g``, direct-mapped by chunk number): POST's 1G test starts there (_walk_1g),
# far from the gfns a small call reads. Only AttrPath writes the attribute map, and each write
# updates or forgets the entries it touches (``AttrPath._memo_write``), so a remembered run is
# the map's; ``vm.check()`` compares every entry with the map.
cdef enum:
    _MEMO_1G = 2048         # entries (a power of two): every 1G chunk of a 2 TiB guest


cdef struct _Run1G:
    uint64_t tag            # the chunk number + 1; 0: no entry
    uint64_t hi             # the first gfn after the chunk's first whose value differs, or the
                            # chunk's end: every gfn of [chunk start, hi) has ``value``
    uint64_t value


cdef inline int _run_1g(RangeMap amap, uint64_t g, _Run1G *memo, uint64_t *hi, uint64_t *value) except -1:
    """The run at ``g`` (a 1G chunk's first gfn) clipped to the chunk, from ``memo`` (the
    chunk's entry, or NULL) when it holds it, else from the map (and then remembered)."""
    cdef Run r
    cdef uint64_t lim = g + (1ULL << 18)
    if memo != NULL and memo.tag == (g >> 18) + 1:
        hi[0] = memo.hi
        value[0] = memo.value
        return 0
    rangemap_run_at(amap, g, &r)
    hi[0] = r.end if r.end < lim else lim
    value[0] = r.value
    if memo != NULL:
        memo.tag = (g >> 18) + 1
        memo.hi = hi[0]
        memo.value = r.value
    return 0


cdef int _walk_1g(RangeMap amap, RangeMap m2, uint64_t g, uint64_t attrs, bint inside,
                  uint64_t *loads, _Run1G *memo) except -1:
    """``hugepage_has_attrs`` at 1G for the chunk at ``g`` (§3.2), and what it reads: it visits
    the 512 2M sub-chunks in order, reads each one's MIXED flag and, when the flag is clear,
    the attributes of its first gfn (``kvm_get_memory_attributes``, one ``xa_load``), and stops
    at the first sub-chunk that is MIXED or whose first gfn differs from ``attrs``. Returns
    whether the chunk is uniform (no sub-chunk stopped it); adds the lookups it made to
    ``loads[0]``: ``min(a + 1, m)`` for ``a`` the first sub-chunk whose first gfn differs and
    ``m`` the first MIXED one (512 when there is none), 512 for a uniform chunk.

    ``inside``: the 1G chunk lies inside its memslot, after the POST hook recomputed its 2M
    sub-chunks, so every sub-chunk's MIXED flag says whether it is uniform (§3.4): the
    sub-chunks before the first gfn ``k`` that differs are uniform with ``attrs`` (clear, and
    looked up); ``k``'s sub-chunk stops the walk, at its flag when it is not uniform (``k`` is
    not its first gfn, or the run at ``k`` ends inside it: runs are coalesced), else after its
    lookup. The run at the chunk's first gfn (``memo``: the chunk's remembered run, see
    ``_Run1G``; NULL: none) and, only when it has ``attrs`` and ends at a sub-chunk's first gfn,
    the run there; no read of ``m2``. Otherwise (a 6.8.1 head
    chunk sticking out of the slot, or any chunk from ``pkvm.kvm.mmu.hugepage_has_attrs``) the
    flags are read: the first stored MIXED word of ``m2``, then the first gfns of the
    sub-chunks before it, per mismatching attribute run. O(log n + runs) either way."""
    cdef uint64_t k, c0 = g >> 9, jm = 512, ja = 512, lim, s, e, sub, hi, v
    cdef Run r
    cdef RunCursor cur
    cdef int ok
    if inside:
        # k, the first gfn that differs, is where the chunk's first run ends, or its first gfn
        _run_1g(amap, g, memo, &hi, &v)
        if v == attrs:
            if hi >= g + (1ULL << 18):
                loads[0] += 512
                return 1
            k = hi
            ja = (k - g) >> 9
            if k & 511:
                loads[0] += ja  # k's sub-chunk is not uniform: MIXED, its flag stops the walk
                return 0
            rangemap_run_at(amap, k, &r)  # k starts a sub-chunk: is it uniform?
            hi = r.end
        else:
            k = g
            ja = 0
        loads[0] += ja + (1 if hi >= k + 512 else 0)  # uniform: clear, looked up, differs
        return 0
    ok = rangemap_cursor_init(m2, &cur, c0, c0 + 512)
    while ok == 1:
        if cur.value & _LPAGE_MIXED:
            jm = cur.start - c0
            break
        ok = rangemap_cursor_next(m2, &cur)
    lim = g + (jm << 9)
    s = g
    while s < lim and rangemap_find_ne(amap, s, lim, attrs, &k):
        sub = (k + 511) & ~(<uint64_t>511)  # the first sub-chunk start at or after k
        if sub == k:
            ja = (k - g) >> 9
            break
        rangemap_run_at(amap, k, &r)
        e = r.end if r.end < lim else lim
        if sub < e:  # the mismatching run covers a sub-chunk's first gfn
            ja = (sub - g) >> 9
            break
        s = e
    loads[0] += ja + 1 if ja < jm else jm
    return ja == 512 and jm == 512


cdef inline int _walk_1g_memo(RangeMap amap, RangeMap m2, uint64_t g, uint64_t attrs, bint inside,
                              uint64_t *loads, _Run1G *memo) except -1:
    """:func:`_walk_1g` with its two common cases in line: the chunk inside its memslot and its
    first run remembered (``memo`` holds it) with another value than ``attrs`` (the walk stops
    at the first sub-chunk), or with ``attrs`` but ending inside a sub-chunk (which is MIXED:
    the walk stops at its flag). Any other case is :func:`_walk_1g`'s. The same result and the
    same ``loads``."""
    cdef uint64_t hi
    if inside and memo != NULL and memo.tag == (g >> 18) + 1:
        hi = memo.hi
        if memo.value != attrs:
            loads[0] += 1 if hi >= g + 512 else 0  # the first sub-chunk: clear, looked up, differs
            return 0
        if hi & 511:  # (so hi is before the chunk's end)
            loads[0] += (hi - g) >> 9
            return 0
    return _walk_1g(amap, m2, g, attrs, inside, loads, memo)


cdef inline Run _run_beside(RangeMap m, uint64_t key, bint beside, uint64_t *lo,
                            uint64_t *hi, RunPos *pos) noexcept nogil:
    """``rangemap_run_at(m, key)`` for ``key < 2**64 - 1`` (the same lookup). With ``beside``
    and ``key`` in a stored run (not a gap), also where the stored runs next to that one are,
    as far as its leaf shows them: ``lo`` the end of the one before (0: there is none;
    ``U64_MAX``: it is in another leaf, not read), ``hi`` the start of the one after
    (``U64_MAX``: none; 0: in another leaf). Otherwise ``lo`` and ``hi`` are left as they are.
    ``pos``: where the lookup landed (``_assign1_at``)."""
    cdef Leaf *lf = _lookup_pos(m, key, pos)
    cdef int i = pos.index
    if beside and i >= 0 and key < lf.ends[i]:
        if i > 0:
            lo[0] = lf.ends[i - 1]
        else:
            lo[0] = 0 if lf.prev == NULL else U64_MAX
        if i + 1 < lf.n:
            hi[0] = lf.starts[i + 1]
        else:
            hi[0] = U64_MAX if lf.next == NULL else 0
    return _leaf_run(m, lf, i, key)


cdef int _has_attrs(RangeMap amap, RangeMap m2, uint64_t gfn, int level, uint64_t attrs) except -1:
    """``hugepage_has_attrs`` for the ``level`` chunk starting at ``gfn`` (§3.2): 2M, every gfn
    has ``attrs``; 1G, :func:`_walk_1g` (no 2M sub-chunk is MIXED and the first gfn of every
    sub-chunk has ``attrs``), its flags read."""
    cdef uint64_t k, loads = 0
    if level == 2:
        return not rangemap_find_ne(amap, gfn, gfn + 512, attrs, &k)
    return _walk_1g(amap, m2, gfn, attrs, False, &loads, NULL)


cdef int _post_set_mixed(RangeMap amap, RangeMap m2, RangeMap m1, uint64_t base,
                         uint64_t slot_end, bint whole_chunk, uint64_t start, uint64_t end,
                         uint64_t attrs, uint64_t w2, uint64_t w1, bint mixed2, uint64_t k2,
                         uint64_t *walk, _Run1G *memo1g) except -1:
    """``kvm_arch_post_set_memory_attributes`` on the slot-clipped ``[start, end)`` (§3.3).

    Per level, 2M first (1G reads its results): the partially covered head chunk gets
    MIXED := !hugepage_has_attrs(new value), body chunks are cleared, the tail chunk is
    recomputed. What each ``hugepage_has_attrs`` reads is added to ``walk``: ``walk[0]``, the
    gfns the 2M walks step to after their first (:func:`_steps_2m`), ``walk[1]``, the 2M
    sub-chunks whose first gfn the 1G tests look up (:func:`_walk_1g`); body chunks are
    cleared without a read.

    ``w2`` / ``w1``: the 2M / 1G lpage word of ``start``'s chunks if the caller read them
    already (they are what the maps hold), else ``_INVALID_GFN`` (no word has every bit set);
    a range inside one 2M chunk then reads neither map before writing it. ``mixed2``: the
    caller knows that a gfn of ``start``'s 2M chunk outside ``[start, end)`` has attributes
    other than ``attrs`` (that chunk is not uniform: no read of the attribute map when the
    walk has no steps to count, ``attrs == 0``). ``k2``: the first gfn of that chunk whose
    attributes differ from ``attrs``, if the caller knows it from the runs it read (else
    ``_INVALID_GFN``): the chunk is not uniform and its walk stops there, no read.
    ``memo1g``: the VM's remembered runs at 1G chunks' first gfns (``AttrPath.memo1g``), or NULL.
    """
    cdef uint64_t g, idx, v, k = 0, n, last, dummy
    cdef int level, shift, i
    cdef bint uniform
    cdef RangeMap m
    g = start & ~(<uint64_t>511)
    if end - g <= 512:
        # One 2M chunk (head, or body if fully covered) and its 1G chunk (a partial head).
        # (AttrPath._quiet1 writes this branch out for one gfn.)
        if end - start < 512:
            if g >= base and (not whole_chunk or g + 512 <= slot_end):
                if k2 != _INVALID_GFN:
                    uniform = False
                    k = k2
                elif mixed2 and not attrs:
                    uniform = False
                else:
                    uniform = not rangemap_find_ne(amap, g, g + 512, attrs, &k)
                walk[0] += _steps_2m(g, attrs, uniform, k)
                _set_mixed_w(m2, g >> 9, not uniform, w2)
        else:
            idx = g >> 9
            v = rangemap_get(m2, idx) if w2 == _INVALID_GFN else w2
            if v & _LPAGE_MIXED:
                rangemap_assign(m2, idx, idx + 1, v & ~_LPAGE_MIXED)
        g = start & ~((1ULL << 18) - 1)
        if g >= base and (not whole_chunk or g + (1ULL << 18) <= slot_end):
            uniform = _walk_1g_memo(amap, m2, g, attrs, g + (1ULL << 18) <= slot_end, &walk[1],
                                    &memo1g[(g >> 18) & (_MEMO_1G - 1)] if memo1g != NULL else NULL)
            _set_mixed_w(m1, g >> 18, not uniform, w1)
        return 0
    for level in range(2, 4):
        shift = _level_shift(level)
        n = 1ULL << shift
        m = m2 if level == 2 else m1
        g = start & ~(n - 1)
        for i in range(2):  # i == 0: the head chunk, i == 1: the tail chunk
            if i == 0:
                if g == start and g + n <= end:
                    continue
                if not (g >= base and (not whole_chunk or g + n <= slot_end)):
                    g += n
                    continue
            else:
                if g + n <= end:  # body: uniform now
                    last = end >> shift
                    if rangemap_find_ne(m, g >> shift, last, 0, &dummy):
                        _clear_mixed(m, g >> shift, last)
                    g = last << shift
                if not (g < end and g + n <= slot_end):
                    continue
            if level == 2:
                uniform = not rangemap_find_ne(amap, g, g + n, attrs, &k)
                walk[0] += _steps_2m(g, attrs, uniform, k)
            else:
                uniform = _walk_1g(amap, m2, g, attrs, g + n <= slot_end, &walk[1],
                                   &memo1g[(g >> 18) & (_MEMO_1G - 1)] if memo1g != NULL else NULL)
            _set_mixed(m, g >> shift, not uniform)
            if i == 0:
                g += n
    return 0


# -- leaf SPTEs (§2.5) ----------------------------------------------------------------------------

cdef object _drop_leaves(RangeMap m, Counters st, uint64_t start, uint64_t end):
    """Count and unaccount the leaves inside ``[start, end)`` (which must not cut one)."""
    cdef RunCursor cur
    cdef uint64_t counts[4]
    cdef int level
    counts[0] = counts[1] = counts[2] = counts[3] = 0
    cdef int ok = rangemap_cursor_init(m, &cur, start, end)
    while ok == 1:
        level = _spte_level(cur.value)
        counts[level] += (cur.end - cur.start) >> _level_shift(level)
        ok = rangemap_cursor_next(m, &cur)
    for level in range(1, 4):
        if counts[level]:
            st.v[S_PAGES_4K + level - 1] -= <int64_t>counts[level]
    return counts[0] + counts[1] + counts[2] + counts[3]


cdef inline int _zap_4k(RangeMap m, Counters st, uint64_t gfn, const RunPos *pos=NULL) except -1:
    """The one 4K leaf at ``gfn`` dropped and counted (a zap of one gfn whose leaf is 4K);
    returns 1, the leaves zapped. ``pos``: where a lookup of ``gfn`` landed (``_assign1_at``)."""
    st.v[S_PAGES_4K] -= 1
    if pos != NULL:
        _assign1_p(m, pos, gfn, 0)
    else:
        _assign1(m, gfn, 0)
    st.v[S_ZAPPED_SPTES] += 1
    return 1


cdef object _zap_range(RangeMap m, Counters st, uint64_t start, uint64_t end, int types, object removed):
    """``Mmu.zap_range``: zap every leaf of the roots in ``types`` meeting ``[start, end)`` (a
    huge leaf straddling it whole); ``removed`` collects zapped mirror runs."""
    cdef uint64_t k, v, n, s, e
    cdef int root, ok
    cdef RunCursor cur
    if end - start == 1 and removed is None and types & _VALID_ROOTS == _VALID_ROOTS:
        # One gfn (the fragmented case): one read; a 4K leaf is dropped at once.
        v = rangemap_get(m, start)
        if not v:
            return 0
        if _spte_level(v) == 1:
            return _zap_4k(m, st, start)
    if not rangemap_find_ne(m, start, end, 0, &k):
        return 0
    v = rangemap_get(m, start)
    if v and _spte_level(v) > 1:
        start &= ~((1ULL << _level_shift(_spte_level(v))) - 1)
    v = rangemap_get(m, end - 1)
    if v and _spte_level(v) > 1:
        n = 1ULL << _level_shift(_spte_level(v))
        end = (end + n - 1) & ~(n - 1)
    if removed is None and types & _VALID_ROOTS == _VALID_ROOTS:
        zapped = _drop_leaves(m, st, start, end)
        rangemap_assign(m, start, end, 0)
    else:
        zapped = 0
        ok = rangemap_cursor_init(m, &cur, start, end)
        while ok == 1:
            s, e, v = cur.start, cur.end, cur.value
            root = _MIRROR_ROOTS if v & _SPTE_PRIVATE else _DIRECT_ROOTS
            if types & root:
                zapped += _drop_leaves(m, st, s, e)
                rangemap_assign(m, s, e, 0)
                if removed is not None and root == _MIRROR_ROOTS:
                    removed.append((s, e, v))
            ok = rangemap_cursor_next(m, &cur)
    st.v[S_ZAPPED_SPTES] += <int64_t>zapped
    return zapped


def _mmu_zap_range(RangeMap sptes, stats, uint64_t start, uint64_t end, int types, removed):
    """``pkvm.kvm.mmu.Mmu.zap_range`` (its arguments are trusted)."""
    cdef Counters c = _scratch_counters(stats)
    n = _zap_range(sptes, c, start, end, types, removed)
    _settle_counters(c, stats)
    return n


def _mmu_drop_leaves(RangeMap sptes, stats, uint64_t start, uint64_t end):
    """``pkvm.kvm.mmu.Mmu._drop_leaves`` (its arguments are trusted)."""
    cdef Counters c = _scratch_counters(stats)
    n = _drop_leaves(sptes, c, start, end)
    _settle_counters(c, stats)
    return n


def _lpage_any_mixed(RangeMap m, uint64_t first, uint64_t last):
    """``pkvm.kvm.mmu.LpageInfo.any_mixed`` on one level's map."""
    return bool(_any_mixed(m, first, last))


def _lpage_clear_mixed(RangeMap m, uint64_t first, uint64_t last):
    """``pkvm.kvm.mmu.LpageInfo.clear_mixed`` on one level's map."""
    _clear_mixed(m, first, last)


def _hugepage_has_attrs(RangeMap amap, RangeMap m2, uint64_t gfn, int level, uint64_t attrs):
    """``pkvm.kvm.mmu.hugepage_has_attrs`` (``m2`` is the memslot's 2M lpage map)."""
    return bool(_has_attrs(amap, m2, gfn, level, attrs))


# -- the ioctl -------------------------------------------------------------------------------------

cdef inline uint64_t _ull(object o) noexcept:
    """``_as_ull`` of an exact int: read from its digits when it has at most two (below 2**60;
    every 4K page of a 52-bit address space), else the C API's conversion (which sets
    OverflowError for a negative or too large value, as ``_as_ull`` does)."""
    cdef uint64_t v
    if pkvm_small_u64(o, &v):
        return v
    return _as_ull(o)


cdef struct _PreState:
    uint64_t rs             # the invalidation range being built
    uint64_t re
    uint64_t zapped         # leaves zapped by the phase
    uint64_t head2          # the 2M lpage word of the next piece's head chunk if read already,
                            # else _INVALID_GFN (no word has every bit set)
    uint64_t head1          # the 1G lpage word of the last piece's head chunk if read, else
                            # _INVALID_GFN
    int attr_filter


@cython.final  # (no subclass: its methods call each other directly, not through a vtable)
@cython.auto_pickle(False)  # a VM's live state: never pickled on its own
cdef class AttrPath:
    """The typed state of one VM's ``KVM_SET_MEMORY_ATTRIBUTES`` path (``VM._attr_path``).

    Built once per VM, after the platform's init: it holds the VM's maps, its counter and
    cost dicts and its policy knobs (all fixed for the VM's life), and the VM's instance dict
    for the scalars that change. The methods trust their arguments: ``ioctl`` validates
    (refusals go to ``VM._attr_check``, which raises in the kernel's order), ``checked``
    assumes a validated, non-empty gfn range of supported attributes on a live VM.
    """

    cdef object vm
    cdef VmState vs                 # the same VM, typed (its C members)
    cdef dict d
    cdef RangeMap attrs, sptes, slot0
    cdef dict slots, costs, armed, flush_cache
    cdef Counters stats
    cdef Ledger ledger
    cdef list vcpus
    cdef object store_ns, zap_ns
    # the price of one gfn the no-op check steps to (attr_check_gfn), and in int64 when it is
    # an int that fits (``walk_i64``)
    cdef object walk_ns
    cdef int64_t walk_i
    cdef bint walk_i64
    # the price of one lookup of a 2M sub-chunk's first gfn by the POST hook's 1G test
    # (attr_check_2m) in int64, -1 when it does not fit (Ledger.charge_p / charge_c)
    cdef int64_t load_i
    # the walk's price an int64 and load_i in [0, 2**31): _charge_loads_fast applies
    cdef bint post_small
    # the same prices in int64 when both are ints that fit (``prices_i64``; see _quiet1)
    cdef int64_t store_i, zap_i
    cdef bint prices_i64
    cdef uint64_t supported
    cdef bint one_as, guard, whole_chunk, eager_split, eager_post, eager_locked, legacy, mirror
    cdef bint filter_all
    # no platform hook inside the phases (no mirror root's zaps, no eager-locked op): with no
    # subscriber and no timeline, nothing outside the core runs during a call (see _quiet)
    cdef bint hookless
    # True while a fast-path ioctl that began with no subscriber runs and nothing it called back
    # into has run: no event can have been emitted, so no callback can have subscribed
    cdef bint quiet
    # the typed fields of the memslot read last (memslots never change these fields)
    cdef object c_slot
    cdef MemslotState c_ms          # the same memslot, typed (its invalid flag)
    cdef RangeMap c_m2, c_m1
    cdef uint64_t c_base, c_end, c_key
    # the ledger's indices of the ops the phases charge (Ledger.op_slot, resolved once)
    cdef Py_ssize_t i_store, i_zap, i_flush, i_walk, i_load
    # the last remote TLB flush priced (its vCPU count, -1 before the first, and ns;
    # flush_cache holds them all)
    cdef int64_t fl_n
    cdef object fl_ns
    cdef int64_t fl_i               # fl_ns in int64 when ``fl_i64`` (an int that fits)
    cdef bint fl_i64
    # ``VM.attr_ioctls`` and ``VM._attr_op`` (the VM's properties of those names read and
    # write them here): the calls that passed validation, and the unfinished phase-by-phase
    # ioctl (pkvm.kvm.vm.AttrIoctl) or None
    cdef int64_t n_ioctls
    cdef object op
    # ``VM.mmu_lock_ns`` (its property reads and writes it here): ``lock_ns`` while it is an
    # int that fits int64 (``lock_big`` None), else ``lock_big`` (any other number)
    cdef int64_t lock_ns
    cdef object lock_big
    # ``VM.set_memory_attributes`` on the VM: :meth:`ioctl` bound to this path as a
    # METH_FASTCALL builtin whose C function is :func:`_ioctl_fast` (built once)
    cdef object bound_ioctl
    # the attribute runs at 1G chunks' first gfns that POST's 1G tests read (see _Run1G); last,
    # so that the fields above share their cache lines
    # where _checked's lookups of a one-page call's gfn landed in the attribute and SPTE maps,
    # for _quiet1's writes there (each checked against its map's version)
    cdef RunPos a_pos, s_pos, m2_pos    # (m2_pos: in the memslot's 2M map, c_m2)
    cdef _Run1G memo1g[_MEMO_1G]

    def __init__(self, vm):
        d = vm.__dict__
        self.vm = vm
        self.vs = <VmState?>vm
        self.d = d
        self.attrs = d["_attrs"]
        self.sptes = d["_sptes"]
        maps = d["_slot_maps"]
        self.one_as = len(maps) == 1
        self.slot0 = maps[0]
        self.slots = d["_slots"]
        self.stats = _vm_counters(d["_stats"])
        self.costs = d["_costs"]
        self.ledger = d["_ledger"]
        self.armed = d["_inject"]._armed
        self.store_ns = d["_attr_store_ns"]
        self.zap_ns = self.costs["zap_spte"]
        self.walk_ns = self.costs["attr_check_gfn"]
        self.walk_i64 = type(self.walk_ns) is int and _as_i64(self.walk_ns, &self.walk_i)
        self.prices_i64 = (type(self.store_ns) is int and _as_i64(self.store_ns, &self.store_i)
                           and type(self.zap_ns) is int and _as_i64(self.zap_ns, &self.zap_i))
        self.vcpus = d["_vcpus"]
        self.flush_cache = d["_flush_ns"]
        self.supported = d["_supported_attrs"]
        self.guard = d["_guard"]
        self.whole_chunk = d["_whole_chunk"]
        self.eager_split = d["_eager_split"]
        self.eager_post = d["_eager_post"]
        self.eager_locked = d["_eager_locked"]
        self.legacy = d["_legacy"]
        self.mirror = d["_mirror"]
        self.filter_all = d["_policy"].zap_filter == "all"
        self.hookless = not self.mirror and not self.eager_locked
        self.c_slot = None
        self.i_store = self.ledger.op_slot("attr_store")
        self.i_zap = self.ledger.op_slot("zap_spte")
        self.i_flush = self.ledger.op_slot("remote_tlb_flush")
        self.i_walk = self.ledger.op_slot("attr_check_gfn")
        self.i_load = self.ledger.op_slot("attr_check_2m")
        self.load_i = _price(self.costs, "attr_check_2m")
        self.post_small = self.walk_i64 and 0 <= self.load_i < (1 << 31)
        self.fl_n = -1
        self.fl_ns = None
        self.n_ioctls = 0
        self.op = None
        self.lock_ns = 0
        self.lock_big = None
        self.bound_ioctl = pkvm_attr_ioctl_bind(self)

    @property
    def ioctls(self):
        """``VM.attr_ioctls``."""
        return self.n_ioctls

    @ioctls.setter
    def ioctls(self, value):
        cdef int64_t v
        if type(value) is not int:
            raise TypeError(f"attr_ioctls must be an int, not {type(value).__name__}")
        if not _as_i64(value, &v) or v < 0:
            raise ValueError(f"attr_ioctls must be a count in [0, 2**63), not {value}")
        self.n_ioctls = v

    @property
    def mmu_lock_ns(self):
        """``VM.mmu_lock_ns``."""
        return self.lock_ns if self.lock_big is None else self.lock_big

    @mmu_lock_ns.setter
    def mmu_lock_ns(self, value):
        cdef int64_t v
        if type(value) is int and _as_i64(value, &v):
            self.lock_ns = v
            self.lock_big = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self.lock_big = value
        else:
            raise TypeError(f"mmu_lock_ns must be an int or a float, not {type(value).__name__}")

    cdef inline bint _add_lock_i(self, int64_t ns) noexcept:
        """``mmu_lock_ns += ns`` in int64 if the total is an int64 and the sum fits; False
        (nothing added) otherwise."""
        cdef int64_t t
        if self.lock_big is None and not pkvm_add_ovf(self.lock_ns, ns, &t):
            self.lock_ns = t
            return True
        return False

    cdef int _add_lock(self, object ns) except -1:
        """``mmu_lock_ns += ns``: in int64 while both are ints that fit, else as Python adds."""
        cdef int64_t v
        if type(ns) is int and _as_i64(ns, &v) and self._add_lock_i(v):
            return 0
        self.mmu_lock_ns = (self.lock_ns if self.lock_big is None else self.lock_big) + ns
        return 0

    @property
    def attr_op(self):
        """``VM._attr_op``."""
        return self.op

    @attr_op.setter
    def attr_op(self, value):
        self.op = value

    cdef inline int _slot(self, uint64_t key) except -1:
        """The memslot of slot-map value ``key`` (its key + 1) in the ``c_*`` fields. The one
        read last is kept while it is valid: a memslot leaves ``VM._slots`` only invalid
        (``memslots._delete`` marks it first), so a valid one of this key is still the one the
        dict holds (a flags change keeps the object and its maps)."""
        if key == self.c_key and self.c_ms is not None and not self.c_ms.invalid:
            return 0
        slot = self.slots[key - 1]
        self.c_key = key
        self.c_ms = <MemslotState?>slot
        if slot is not self.c_slot:
            maps = slot.lpage.maps
            self.c_m2 = maps[2]
            self.c_m1 = maps[3]
            self.c_base = slot.base_gfn
            self.c_end = slot.end_gfn
            self.c_slot = slot
        return 0

    cdef inline bint _traced(self) except -1:
        """Whether the VM has event subscribers (``VM._subs``)."""
        return not self.quiet and self.ledger.traced

    cdef inline int _add_ns(self, str op, object ns) except -1:
        return self.ledger.add(op, ns)

    cdef inline int _add_at(self, Py_ssize_t i, str op, object ns) except -1:
        """:meth:`_add_ns` for the op of ledger index ``i`` (no lookup of its name)."""
        cdef int64_t v
        if type(ns) is int and _as_i64(ns, &v):
            return self.ledger.add_i(i, v)
        return self.ledger.add(op, ns)

    # -- the remembered runs at 1G chunks' first gfns (_Run1G) -----------------------------------

    cdef inline int _memo_write(self, uint64_t s, uint64_t e, uint64_t a) except -1:
        """``[s, e)`` of the attribute map now holds ``a``: update or forget the remembered
        runs of the 1G chunks the write touches (a chunk's run changes only if the write starts
        at or before its end)."""
        cdef uint64_t c, g1, lim
        cdef _Run1G *m
        if ((e - 1) >> 18) - (s >> 18) >= _MEMO_1G:
            memset(self.memo1g, 0, sizeof(self.memo1g))
            return 0
        for c in range(s >> 18, ((e - 1) >> 18) + 1):
            m = &self.memo1g[c & (_MEMO_1G - 1)]
            if m.tag != c + 1 or s > m.hi:
                continue
            g1 = c << 18
            lim = g1 + (1ULL << 18)
            if s <= g1:  # the chunk's first gfn is written
                if e >= lim:
                    m.hi = lim
                    m.value = a
                else:
                    m.tag = 0  # how far its new run reaches is not known here
            elif a == m.value:
                if e > m.hi:
                    m.tag = 0  # the run grows past its end, maybe into the next one
            elif s < m.hi:
                m.hi = s  # cut short
        return 0

    cdef inline void _memo_write1(self, uint64_t s, uint64_t a) noexcept:
        """:meth:`_memo_write` for ``[s, s + 1)``: one chunk, whose run changes only if ``s`` is
        at or before its end."""
        cdef _Run1G *m = &self.memo1g[(s >> 18) & (_MEMO_1G - 1)]
        if m.tag != (s >> 18) + 1 or s > m.hi:
            return
        if not s & ((1ULL << 18) - 1):
            m.tag = 0  # the chunk's first gfn: how far its new run reaches is not known here
        elif a == m.value:
            if s == m.hi:
                m.tag = 0  # the run grows past its end, maybe into the next one
        elif s < m.hi:
            m.hi = s  # cut short

    def memo_check(self):
        """``vm.check()``: every remembered run at a 1G chunk's first gfn is the map's."""
        cdef int i
        cdef Run r
        cdef uint64_t g1, lim
        from pkvm.errors import InternalInvariantError
        for i in range(_MEMO_1G):
            if not self.memo1g[i].tag:
                continue
            g1 = (self.memo1g[i].tag - 1) << 18
            lim = g1 + (1ULL << 18)
            rangemap_run_at(self.attrs, g1, &r)
            if (self.memo1g[i].value != r.value or self.memo1g[i].hi != (r.end if r.end < lim else lim)
                    or (self.memo1g[i].tag - 1) & (_MEMO_1G - 1) != <uint64_t>i):
                raise InternalInvariantError(
                    f"the run remembered at gfn {g1:#x} ([{g1:#x}, {self.memo1g[i].hi:#x}) = "
                    f"{self.memo1g[i].value:#x}) is not the attribute map's ([{r.start:#x}, {r.end:#x}) = {r.value:#x})")

    # -- the no-op check (§2.7) ----------------------------------------------------------------

    cdef bint _noop(self, uint64_t start, uint64_t end, uint64_t attrs, uint64_t *steps) except -1:
        """``kvm_range_has_memory_attributes(start, end, ~0, attrs)`` (``virt/kvm/kvm_main.c``):
        whether every gfn of ``[start, end)`` has ``attrs`` already. ``steps``: the gfns its
        index-by-index walk steps to after the first one (whose read is the descent): for
        ``attrs != 0`` and more than one gfn, up to the first gfn that differs, or to the last
        one when none does; 0 for ``attrs == 0`` (one ``xas_find``) and for one gfn (one
        ``xa_load``). O(log n + runs) on the range-compressed map, never per gfn."""
        cdef uint64_t k
        steps[0] = 0
        if end - start == 1:
            return rangemap_get(self.attrs, start) == attrs
        if not rangemap_find_ne(self.attrs, start, end, attrs, &k):
            if attrs:
                steps[0] = end - start - 1
            return True
        if attrs:
            steps[0] = k - start
        return False

    cdef int _charge_walk(self, uint64_t steps) except -1:
        """Charge ``steps`` gfns of the no-op check's walk (``attr_check_gfn``; nothing for 0)."""
        cdef int64_t ns
        if not steps:
            return 0
        if (self.walk_i64 and steps <= <uint64_t>0x7FFFFFFFFFFFFFFF
                and not pkvm_mul_ovf(self.walk_i, <int64_t>steps, &ns)):
            self.ledger.add_i(self.i_walk, ns)
            big = None
        else:
            big = self.walk_ns * steps
            self._add_at(self.i_walk, "attr_check_gfn", big)
        if self._traced():
            self.vm._emit("charge", None, None, "attr_check_gfn", steps, ns if big is None else big)
        return 0

    cdef int _charge_post(self, uint64_t steps, uint64_t loads, bint lock) except -1:
        """Charge what the POST hook's ``hugepage_has_attrs`` read (§3.3; ``walk`` of
        :func:`_post_set_mixed`): ``steps`` gfns its 2M walks stepped to after their first
        (``attr_check_gfn``, the no-op check's step) and ``loads`` 2M sub-chunk lookups of its
        1G tests (``attr_check_2m``). ``lock``: also add them to ``mmu_lock_ns`` (the quiet
        paths, which sum the lock's time themselves; the others time the phase)."""
        cdef int64_t a = 0, b = 0, t
        if steps:
            self._charge_walk(steps)
        if loads:
            if self.load_i >= 0:
                self.ledger.charge_p(self.i_load, self.load_i, loads)
            else:
                self.ledger.charge_c("attr_check_2m", loads)
        if lock and (steps or loads):
            if (self.walk_i64 and self.load_i >= 0 and steps <= <uint64_t>0x7FFFFFFFFFFFFFFF
                    and not pkvm_mul_ovf(self.walk_i, <int64_t>steps, &a)
                    and not pkvm_mul_ovf(self.load_i, <int64_t>loads, &b)
                    and not pkvm_add_ovf(a, b, &t) and self._add_lock_i(t)):
                return 0
            self._add_lock(self.walk_ns * steps + self.costs["attr_check_2m"] * loads)
        return 0

    cdef inline bint _charge_loads_fast(self, uint64_t loads) noexcept:
        """``_charge_post(0, loads, True)`` (the 1G test's lookups, no 2M step) in its common
        case: no subscriber, ``post_small``, ``loads < 2**32``, ``mmu_lock_ns`` in int64 and
        :meth:`Ledger.add_fast`'s case, no sum that overflows, all checked before anything is
        written; then the same cell, modeled ns and lock time as :meth:`_charge_post`. False,
        with nothing written, in any other case (the caller then calls :meth:`_charge_post`)."""
        cdef int64_t b, lk
        if self.ledger.traced or not self.post_small or loads >> 32 or self.lock_big is not None:
            return False
        b = self.load_i * <int64_t>loads  # below 2**63: load_i < 2**31
        if pkvm_add_ovf(self.lock_ns, b, &lk) or not self.ledger.add_fast(self.i_load, b):
            return False
        self.lock_ns = lk
        return True

    def noop_check(self, uint64_t start, uint64_t end, uint64_t attrs):
        """The no-op check of :class:`pkvm.kvm.vm.AttrIoctl`'s ``begin``: whether the call is a
        no-op; its walk is charged."""
        cdef uint64_t steps
        self.quiet = False
        noop = self._noop(start, end, attrs, &steps)
        self._charge_walk(steps)
        return noop

    # -- the phases ---------------------------------------------------------------------------

    cdef object _zap(self, uint64_t start, uint64_t end, int attr_filter):
        """``VM._zap`` (``kvm_unmap_gfn_range``) and its accounting; a mirror root's zap is the
        VM's ``_zap_mirror`` (the platform's external-SPTE ops)."""
        if self.mirror:
            n = self.vm._zap_mirror(start, end, attr_filter)
        else:
            n = _zap_range(self.sptes, self.stats, start, end, _VALID_ROOTS, None)
        if n:
            ns = self.zap_ns * n
            self._add_at(self.i_zap, "zap_spte", ns)
            if self._traced():
                self.vm._emit("charge", None, None, "zap_spte", n, ns)
        if self._traced():
            self.vm._emit("zap", start, end, None, n, 0, None, (attr_filter,))
        return n

    cdef int64_t _flush_counted(self) except -1:
        """``kvm_flush_remote_tlbs`` counted (every request is modelled as sent: vCPUs in guest
        mode); returns the number of vCPUs it is priced by, ``max(VM.nr_vcpus, vCPUs
        created)`` (both read at each flush: a vCPU created since the last one counts)."""
        cdef Counters st = self.stats
        cdef int64_t n = self.vs.nr_vcpus
        cdef int64_t nv = len(self.vcpus)
        st.v[S_REMOTE_TLB_FLUSH_REQUESTS] += 1
        st.v[S_REMOTE_TLB_FLUSH] += 1
        return nv if nv > n else n

    cdef object _flush_price(self, int64_t n):
        """The modeled ns of a remote TLB flush to ``n`` vCPUs (cached per ``n``)."""
        if n == self.fl_n:
            return self.fl_ns
        ns = self.flush_cache.get(n)
        if ns is None:
            ns = self.flush_cache[n] = self.d["_cost_model"].ns("remote_tlb_flush", nr_vcpus=n)
        self.fl_n, self.fl_ns = n, ns
        self.fl_i64 = type(ns) is int and _as_i64(ns, &self.fl_i)
        return ns

    cdef int _flush(self) except -1:
        """``kvm_flush_remote_tlbs`` and its accounting."""
        cdef int64_t n = self._flush_counted()
        ns = self._flush_price(n)
        self._add_at(self.i_flush, "remote_tlb_flush", ns)
        if self._traced():
            self.vm._emit("charge", None, None, "remote_tlb_flush", 1, ns, None, (n,))
        sched = self.vs._sched
        if sched is not None:
            (<SchedHooks?>sched)._ipi("vm", 1)  # the flush IPI interrupts every other vCPU in guest mode
        return 0

    def flush_remote_tlbs(self):
        """``VM._flush_remote_tlbs``."""
        self.quiet = False
        self._flush()

    cdef int _pre_begin(self, _PreState *ps, uint64_t attrs) except -1:
        cdef VmState vs = self.vs
        vs.mmu_invalidate_in_progress += 1
        if vs.mmu_invalidate_in_progress == 1:
            ps.rs = ps.re = _INVALID_GFN
        else:
            ps.rs = vs._range_start
            ps.re = vs._range_end
        ps.zapped = 0
        ps.head2 = ps.head1 = _INVALID_GFN
        # §2.5 step 3 (6.14+): zap only the old attribute's mappings (a VM without a mirror
        # root has one root that holds both kinds, so the filter narrows nothing there).
        if self.filter_all:
            ps.attr_filter = _FILTER_ALL
        else:
            ps.attr_filter = _FILTER_SHARED if attrs & _ATTR_PRIVATE else _FILTER_PRIVATE
        return 0

    cdef int _pre_piece(self, _PreState *ps, uint64_t s, uint64_t e, uint64_t key) except -1:
        """One slot-clipped piece of ``kvm_pre_set_memory_attributes``: the range added to the
        invalidation (:meth:`_pre_range`), then the zap."""
        cdef uint64_t dummy
        self._pre_range(ps, s, e, key)
        if (rangemap_get(self.sptes, s) != 0 if e - s == 1 else rangemap_find_ne(self.sptes, s, e, 0, &dummy)):
            ps.zapped += self._zap(s, e, ps.attr_filter)
        return 0

    cdef int _pre_range(self, _PreState *ps, uint64_t s, uint64_t e, uint64_t key) except -1:
        """The piece's range added to the invalidation (with the 6.15+ guard, also its partially
        covered head/tail hugepages that are not MIXED)."""
        cdef uint64_t hs, he, base, send, n, w
        cdef RangeMap m
        cdef int level
        if ps.rs == _INVALID_GFN:
            ps.rs, ps.re = s, e
        else:
            if s < ps.rs:
                ps.rs = s
            if e > ps.re:
                ps.re = e
        ps.head1 = _INVALID_GFN
        if self.guard:
            if key:  # 0: the caller resolved the slot
                self._slot(key)
            base, send = self.c_base, self.c_end
            for level in range(2, 4):
                n = 1ULL << _level_shift(level)
                m = self.c_m2 if level == 2 else self.c_m1
                hs = s & ~(n - 1)
                he = (e - 1) & ~(n - 1)
                if (hs != s or hs + n > e) and hs >= base and hs + n <= send:
                    if level == 2 and ps.head2 != _INVALID_GFN:
                        w = ps.head2
                    else:
                        w = rangemap_get(m, hs >> _level_shift(level))
                        if level == 3:
                            ps.head1 = w
                    if not w & _LPAGE_MIXED:
                        if hs < ps.rs:
                            ps.rs = hs
                        if hs + n > ps.re:
                            ps.re = hs + n
                if (he != hs and he + n > e and he + n <= send
                        and not rangemap_get(m, he >> _level_shift(level)) & _LPAGE_MIXED):
                    if he < ps.rs:
                        ps.rs = he
                    if he + n > ps.re:
                        ps.re = he + n
        ps.head2 = _INVALID_GFN
        return 0

    cdef int _pre_end(self, _PreState *ps) except -1:
        cdef VmState vs = self.vs
        vs._range_start = ps.rs
        vs._range_end = ps.re
        if ps.zapped:
            self._flush()  # flush_on_ret, before the lock is dropped
        return 0

    cdef int _commit(self, uint64_t start, uint64_t end, uint64_t attrs) except -1:
        """The store: one ``xa_store`` per gfn in the kernel, one range assignment here."""
        rangemap_assign(self.attrs, start, end, attrs)
        self._memo_write(start, end, attrs)
        n = end - start
        self.stats.v[S_ATTR_STORES] += <int64_t>n
        ns = self.store_ns * n
        self._add_at(self.i_store, "attr_store", ns)
        if self._traced():
            self.vm._emit("charge", start, end, "attr_store", n, ns)
            self.vm._emit("attr_change", start, end, None, n, 0, None, (attrs,))
        return 0

    cdef int _post_begin(self) except -1:
        cdef VmState vs = self.vs
        self.stats.v[S_MMU_INVALIDATE_SEQ] += 1  # kvm_mmu_invalidate_end
        vs.mmu_invalidate_in_progress -= 1
        if vs.mmu_invalidate_in_progress < 0:
            from pkvm.errors import InternalInvariantError
            raise InternalInvariantError("mmu_invalidate_in_progress went negative")
        sched = vs._sched
        if sched is not None:
            (<SchedHooks?>sched)._changed_c()  # spinning faults go on, to wait for mmu_lock
        return 0

    cdef int _post_piece(self, uint64_t s, uint64_t e, uint64_t key, uint64_t attrs) except -1:
        cdef uint64_t walk[2]
        walk[0] = walk[1] = 0
        self._slot(key)
        _post_set_mixed(self.attrs, self.c_m2, self.c_m1, self.c_base, self.c_end,
                        self.whole_chunk, s, e, attrs, _INVALID_GFN, _INVALID_GFN, False,
                        _INVALID_GFN, walk, self.memo1g)
        self._charge_post(walk[0], walk[1], False)  # under mmu_lock: the caller times the phase
        if self.eager_locked:
            vm = self.vm
            slot = self.c_slot
            r = vm._platform.set_mem_attr(vm, slot, attrs, s, e)
            if r:
                vm._op_failed("set_mem_attr", slot, attrs, s, e, r)
        return 0

    cdef object _quiet_zap(self, _PreState *ps, uint64_t s, uint64_t e, object zap_ns):
        """:meth:`_quiet`'s zap of one piece: its leaves dropped and counted; returns the
        phase's zap ns so far (None while nothing was zapped)."""
        n = _zap_range(self.sptes, self.stats, s, e, _VALID_ROOTS, None)
        if not n:
            return zap_ns
        ps.zapped += n
        ns = self.zap_ns if n == 1 else self.zap_ns * n  # no int object made for the count 1
        return ns if zap_ns is None else zap_ns + ns

    cdef int _quiet(self, uint64_t start, uint64_t end, uint64_t attrs, bint read, uint64_t key,
                    uint64_t spte, uint64_t head2, bint mixed2, uint64_t k2) except -1:
        """:meth:`checked`'s phases where nothing outside the core runs between them (one
        address space, no subscriber, no timeline, no platform hook in the phases, no
        invalidation in progress): the same steps, with the VM's scalars read and written
        once per call instead of once per step.

        ``mmu_invalidate_in_progress`` goes 0 -> 1 -> 0 with nobody to read it in between, so
        it is not written; the charges are summed and added to the cost dict and the clocks
        at the end, in the order the phases make them (zap, flush, store), so the dict's
        keys, its values and the modeled time are those of the step-by-step path.

        ``read``: :meth:`checked` read the one gfn's slot key + 1 (``key``, 0 outside every
        memslot; the slot resolved), SPTE (``spte``) and the 2M lpage word of its chunk
        (``head2``) already: the one piece needs no cursor, a 4K leaf is zapped without a
        read, and POST writes the lpage words PRE read without reading them again (nothing
        between PRE and POST writes an lpage map); ``mixed2``: the gfn's old attribute run
        covers another gfn of its 2M chunk (which then stays not uniform: POST reads no
        attribute for it when the walk has no steps to count); ``k2``: the first gfn of that
        chunk whose attributes differ after the store, if the runs read show it (else
        ``_INVALID_GFN``). POST's walk (:meth:`_charge_post`) is charged after the store and
        counted in the lock's time.
        """
        cdef RunCursor cur
        cdef _PreState ps
        cdef uint64_t s, e, n, dummy
        cdef uint64_t walk[2]
        cdef int ok = 0
        walk[0] = walk[1] = 0
        d = self.d
        cdef Counters st = self.stats
        sptes = self.sptes
        zap_ns = flush_ns = None
        if read:
            slotted = key != 0
        else:
            ok = rangemap_cursor_init(self.slot0, &cur, start, end)
            slotted = ok == 1
        if slotted:
            # PRE (kvm_pre_set_memory_attributes per piece, inside one invalidation)
            ps.rs = ps.re = _INVALID_GFN
            ps.zapped = 0
            ps.head1 = _INVALID_GFN
            if read:
                ps.head2 = head2
                self._pre_range(&ps, start, end, 0)
                if spte and _spte_level(spte) == 1:
                    # _zap_range's one-gfn 4K case, with the leaf read already
                    ps.zapped = _zap_4k(sptes, st, start)
                    zap_ns = self.zap_ns
                elif spte:
                    zap_ns = self._quiet_zap(&ps, start, end, zap_ns)
            else:
                ps.head2 = _INVALID_GFN
            while not read and ok == 1:
                s, e = cur.start, cur.end
                self._pre_range(&ps, s, e, cur.value)
                if (rangemap_get(sptes, s) != 0 if e - s == 1 else rangemap_find_ne(sptes, s, e, 0, &dummy)):
                    zap_ns = self._quiet_zap(&ps, s, e, zap_ns)
                ok = rangemap_cursor_next(self.slot0, &cur)
            self.vs._range_start = ps.rs
            self.vs._range_end = ps.re
            if ps.zapped:
                flush_ns = self._flush_price(self._flush_counted())  # flush_on_ret
        # the store, under slots_lock only
        rangemap_assign(self.attrs, start, end, attrs)
        self._memo_write(start, end, attrs)
        n = end - start
        if n == 1:  # no int object made for the count
            st.v[S_ATTR_STORES] += 1
            store_ns = self.store_ns
        else:
            st.v[S_ATTR_STORES] += <int64_t>n
            store_ns = self.store_ns * n
        if slotted:
            # POST: invalidate_end, then MIXED per piece
            st.v[S_MMU_INVALIDATE_SEQ] += 1
            if read:
                _post_set_mixed(self.attrs, self.c_m2, self.c_m1, self.c_base, self.c_end,
                                self.whole_chunk, start, end, attrs, head2, ps.head1, mixed2, k2, walk,
                                self.memo1g)
            else:
                ok = rangemap_cursor_init(self.slot0, &cur, start, end)
            while not read and ok == 1:
                self._slot(cur.value)
                _post_set_mixed(self.attrs, self.c_m2, self.c_m1, self.c_base, self.c_end,
                                self.whole_chunk, cur.start, cur.end, attrs, _INVALID_GFN, _INVALID_GFN, False,
                                _INVALID_GFN, walk, self.memo1g)
                ok = rangemap_cursor_next(self.slot0, &cur)
        if zap_ns is not None:
            self._add_at(self.i_zap, "zap_spte", zap_ns)
        if flush_ns is not None:
            self._add_at(self.i_flush, "remote_tlb_flush", flush_ns)
        self._add_at(self.i_store, "attr_store", store_ns)
        if zap_ns is not None:  # the PRE phase's zap and flush ran under mmu_lock
            self._add_lock_ns(zap_ns, flush_ns)
        self._charge_post(walk[0], walk[1], True)  # POST's walk, under mmu_lock
        return 0

    cdef int _quiet1(self, uint64_t gfn, uint64_t attrs, uint64_t key, uint64_t spte,
                     uint64_t head2, bint mixed2, uint64_t k2, int u0) except -1:
        """:meth:`_quiet` with ``read`` (one gfn, its slot key, SPTE, 2M lpage word and
        ``mixed2`` read by :meth:`checked`) where the gfn's leaf, if any, is a 4K one and the
        store and zap prices are int64 (``prices_i64``): the same steps, reads, writes and
        charges in the same order, with the phase's ns in C integers and PRE's guard on the
        one gfn's two head chunks written out (its tail chunks are its head chunks).
        ``u0``: for ``attrs == 0``, whether the gfn's 2M chunk is uniform once the store ran,
        as :meth:`_checked` saw it from the runs beside the gfn's (1 or 0; -1: not seen, the
        2M test looks)."""
        cdef Counters st = self.stats
        cdef VmState vs = self.vs
        cdef uint64_t rs, re, hs, w, head1 = _INVALID_GFN, k = 0, steps = 0, loads = 0
        cdef int64_t t
        cdef bint zapped = False, uniform
        cdef RunPos m1_pos
        if key:
            # PRE: the invalidation range (_pre_range's guard on the one gfn's two head chunks,
            # written out: its tail chunks are its head chunks), then the zap of a 4K leaf
            rs = gfn
            re = gfn + 1
            if self.guard:
                hs = gfn & ~(<uint64_t>511)
                if hs >= self.c_base and hs + 512 <= self.c_end:
                    w = head2 if head2 != _INVALID_GFN else rangemap_get(self.c_m2, gfn >> 9)
                    if not w & _LPAGE_MIXED:
                        rs = hs
                        re = hs + 512
                hs = gfn & ~((1ULL << 18) - 1)
                if hs >= self.c_base and hs + (1ULL << 18) <= self.c_end:
                    head1 = _get_pos(self.c_m1, gfn >> 18, &m1_pos)
                    if not head1 & _LPAGE_MIXED:
                        rs = hs  # the 1G chunk holds the 2M one
                        re = hs + (1ULL << 18)
            if spte:  # written where _checked's lookup landed
                zapped = _zap_4k(self.sptes, st, gfn, &self.s_pos)
            vs._range_start = rs
            vs._range_end = re
            if zapped:
                flush_ns = self._flush_price(self._flush_counted())  # flush_on_ret
        # the store, under slots_lock only
        _assign1_p(self.attrs, &self.a_pos, gfn, attrs)
        self._memo_write1(gfn, attrs)
        st.v[S_ATTR_STORES] += 1
        if key:
            # POST: invalidate_end, then MIXED: _post_set_mixed's branch for a range inside one
            # 2M chunk, written out for [gfn, gfn + 1) (the same reads, writes and counts)
            st.v[S_MMU_INVALIDATE_SEQ] += 1
            hs = gfn & ~(<uint64_t>511)
            if hs >= self.c_base and (not self.whole_chunk or hs + 512 <= self.c_end):
                if k2 != _INVALID_GFN:
                    uniform = False
                    k = k2
                elif mixed2 and not attrs:
                    uniform = False
                elif u0 >= 0:  # (attrs == 0: no step to count, k is not needed)
                    uniform = u0
                else:
                    uniform = not rangemap_find_ne(self.attrs, hs, hs + 512, attrs, &k)
                steps = _steps_2m(hs, attrs, uniform, k)
                _set_mixed_w(self.c_m2, hs >> 9, not uniform, head2, &self.m2_pos)  # (_checked read head2)
            hs = gfn & ~((1ULL << 18) - 1)
            if hs >= self.c_base and (not self.whole_chunk or hs + (1ULL << 18) <= self.c_end):
                uniform = _walk_1g_memo(self.attrs, self.c_m2, hs, attrs, hs + (1ULL << 18) <= self.c_end,
                                        &loads, &self.memo1g[(hs >> 18) & (_MEMO_1G - 1)])
                _set_mixed_w(self.c_m1, hs >> 18, not uniform, head1, &m1_pos)  # (PRE read head1)
        if zapped:
            if not self.ledger.add_fast(self.i_zap, self.zap_i):
                self.ledger.add_i(self.i_zap, self.zap_i)
            if self.fl_i64:  # flush_ns is fl_ns (_flush_price just returned it)
                if not self.ledger.add_fast(self.i_flush, self.fl_i):
                    self.ledger.add_i(self.i_flush, self.fl_i)
            else:
                self._add_at(self.i_flush, "remote_tlb_flush", flush_ns)
        if not self.ledger.add_fast(self.i_store, self.store_i):
            self.ledger.add_i(self.i_store, self.store_i)
        if zapped:  # the PRE phase's zap and flush ran under mmu_lock
            # _add_lock_ns(zap_ns, flush_ns) with both in int64
            if not (self.fl_i64 and not pkvm_add_ovf(self.zap_i, self.fl_i, &t) and self._add_lock_i(t)):
                self._add_lock_ns(self.zap_ns, flush_ns)
        if steps or (loads and not self._charge_loads_fast(loads)):
            self._charge_post(steps, loads, True)  # POST's walk, under mmu_lock
        return 0

    cdef int _add_lock_ns(self, object zap_ns, object flush_ns) except -1:
        """``mmu_lock_ns += zap_ns + flush_ns`` (``flush_ns`` None: no flush) if the sum is
        not 0; summed in int64 when every term is an int that fits (the result an int, as
        Python's sum), else in Python arithmetic."""
        cdef int64_t z, f = 0, t
        if (type(zap_ns) is int and _as_i64(zap_ns, &z)
                and (flush_ns is None or (type(flush_ns) is int and _as_i64(flush_ns, &f)))
                and not pkvm_add_ovf(z, f, &t)):
            if not t:
                return 0
            if self._add_lock_i(t):
                return 0
        lock = zap_ns if flush_ns is None else zap_ns + flush_ns
        if lock:
            self._add_lock(lock)
        return 0

    # -- entry points -------------------------------------------------------------------------

    def pre(self, list ranges, uint64_t attrs):
        """``VM._attr_pre``: PRE over the slot-clipped pieces ``(s, e, slot key + 1)``."""
        self.quiet = False
        cdef _PreState ps
        if not ranges:
            return  # no memslot: no lock, no invalidate_begin
        self._pre_begin(&ps, attrs)
        for s, e, key in ranges:
            self._pre_piece(&ps, s, e, key)
        self._pre_end(&ps)

    def commit(self, uint64_t start, uint64_t end, uint64_t attrs):
        """``VM._attr_commit``."""
        self.quiet = False
        self._commit(start, end, attrs)

    def post(self, list ranges, uint64_t attrs):
        """``VM._attr_post``: ``invalidate_end``, then MIXED per piece (and the eager-locked op)."""
        self.quiet = False
        if not ranges:
            return
        self._post_begin()
        for s, e, key in ranges:
            self._post_piece(s, e, key, attrs)

    def post_set_mixed(self, slot, uint64_t start, uint64_t end, uint64_t attrs):
        """``pkvm.kvm.mmu.post_set_mixed`` on one slot-clipped piece."""
        cdef uint64_t walk[2]
        walk[0] = walk[1] = 0
        self.quiet = False
        lp = slot.lpage.maps
        _post_set_mixed(self.attrs, lp[2], lp[3], slot.base_gfn, slot.end_gfn, self.whole_chunk,
                        start, end, attrs, _INVALID_GFN, _INVALID_GFN, False, _INVALID_GFN, walk,
                        self.memo1g)
        self._charge_post(walk[0], walk[1], False)  # the caller times its lock hold

    def zap(self, uint64_t start, uint64_t end, int attr_filter):
        """``VM._zap``."""
        self.quiet = False
        return self._zap(start, end, attr_filter)

    def madvise_dontneed(self, SharedBackingState sb, uint64_t start, uint64_t end):
        """``VM._madvise_dontneed``: ``MADV_DONTNEED`` on the HVA pages ``[start, end)`` of the
        VMM's shared backing ``sb``, bracketed by the MMU notifier KVM registers on the VMM's
        mm (docs/kernel-semantics.md §4.7); returns the pages freed.

        ``kvm_mmu_notifier_invalidate_range_start`` (``virt/kvm/kvm_main.c``) walks every
        memslot of every address space whose HVA range overlaps (``__kvm_handle_hva_range``);
        at the first one it takes ``mmu_lock`` for write and runs ``kvm_mmu_invalidate_begin``;
        per memslot, ``kvm_mmu_unmap_gfn_range``: the gfns join the invalidation range and
        their leaves are zapped (``kvm_unmap_gfn_range``; the SHARED filter from ~6.14, which
        spares only a mirror root, TDX's private one; before it, every root). One TLB flush if
        anything was zapped (``flush_on_ret``), then the lock is dropped. The MM frees the
        pages (:func:`shared_discard`); ``..._invalidate_range_end`` takes the lock again for
        ``kvm_mmu_invalidate_end``, which bumps ``mmu_invalidate_seq``. A range that overlaps
        no memslot takes no lock and changes nothing in KVM. Only address space 0 has SPTEs
        in pkvm (SMM faults are not modelled): other address spaces' memslots join the
        invalidation and zap nothing."""
        cdef VmState vs = self.vs
        cdef SchedHooks sched = <SchedHooks?>vs._sched if vs._sched is not None else None
        cdef uint64_t u, n, a, b, s, e, dummy
        cdef bint flush = False
        cdef int attr_filter = _FILTER_ALL if self.filter_all else _FILTER_SHARED
        self.quiet = False
        pieces = []
        if start < end:
            for slot in self.slots.values():  # kvm_for_each_memslot_in_hva_range, per address space
                u = slot._ugfn
                n = slot.npages
                a = start if start > u else u
                b = end if end < u + n else u + n
                if a < b:
                    s = <uint64_t>slot.base_gfn + (a - u)
                    pieces.append((slot.as_id, s, s + (b - a)))
        if pieces:
            if sched is not None:
                sched._acquire("mmu_lock", 1)
            _mmu_invalidate_begin(vs)
            t0 = None  # the work under the lock starts with the first zap (begin costs nothing)
            for as_id, s, e in pieces:
                _mmu_invalidate_range_add(vs, s, e)
                if as_id == 0 and rangemap_find_ne(self.sptes, s, e, 0, &dummy):
                    if t0 is None:
                        t0 = sched._work_ns() if sched is not None else self.ledger.now()
                    if self._zap(s, e, attr_filter) > 0:
                        flush = True
            if flush:
                self._flush()
            if t0 is not None:
                self._add_lock((sched._work_ns() if sched is not None else self.ledger.now()) - t0)
            if sched is not None:
                sched._release("mmu_lock", 1)
        freed = _shared_discard(sb, start, end)
        if pieces:
            if sched is not None:
                sched._acquire("mmu_lock", 1)
            self._post_begin()  # kvm_mmu_invalidate_end
            if sched is not None:
                sched._release("mmu_lock", 1)
        return freed

    @cython.binding(False)  # a method descriptor (see _ioctl_fast)
    def ioctl(self, address, size, attributes, flags=0):
        """``VM.set_memory_attributes``: the checks, then :meth:`checked`.

        Arguments that pass every check in the fast test below go on; anything else goes to
        ``VM._attr_check``, the one implementation of the refusals (in the kernel's order).
        """
        self._ioctl(address, size, attributes, flags)

    cdef int _ioctl(self, object address, object size, object attributes, object flags) except -1:
        """:meth:`ioctl`'s body (also the bound fast entry's, :func:`_ioctl_fast`)."""
        cdef uint64_t a, sz, at, fl
        cdef bint ok = False
        if self.vs.vm_dead or self.vs._in_callback:  # EIO, or EDEADLK from an event callback
            self.vm._check_alive()
        if _is_exact_int(address) and _is_exact_int(size) and _is_exact_int(attributes) and _is_exact_int(flags):
            a = _ull(address)
            sz = _ull(size)
            at = _ull(attributes)
            fl = _ull(flags)
            if PyErr_Occurred():
                PyErr_Clear()
            else:
                ok = (not fl and not at & ~self.supported and sz != 0 and sz <= U64_MAX - a
                      and not (a | sz) & _PAGE_MASK)
        if ok:
            return self._checked(a >> 12, (a + sz) >> 12, at)
        start, end, attrs = self.vm._attr_check(address, size, attributes, flags)
        return self._checked(start, end, attrs)

    def checked(self, uint64_t start, uint64_t end, uint64_t attrs):
        """``VM._set_attrs_checked``: everything the ioctl does after its argument checks."""
        self._checked(start, end, attrs)

    cdef inline void _hint(self, uint64_t gfn) noexcept:
        """Ask for the leaves a one-page call at ``gfn`` reads (its attribute run, its SPTE,
        the 2M word in the memslot seen last) before reading any (see
        ``FaultPath._prefetch_leaves``): their waits overlap."""
        if self.c_m2 is not None:
            _prefetch_finger(self.c_m2, gfn >> 9)
        _prefetch_finger(self.attrs, gfn)
        _prefetch_finger(self.sptes, gfn)

    cdef int _timeline(self, sched, uint64_t start, uint64_t end, uint64_t attrs) except -1:
        """The ioctl on the concurrent timeline: the whole ioctl under ``slots_lock``, its
        latency sampled. The §2.7 short-circuit (every gfn has ``attrs`` already, read once
        the lock is held: another actor may change them while this one waits for it) runs
        nothing else under the lock; otherwise the phases are ``VM._attr_timeline``'s."""
        cdef SchedHooks h = <SchedHooks?>sched  # the VM's pkvm.sim.Timeline
        cdef uint64_t steps = 0
        lat = h._latency_begin()
        h._acquire("slots_lock", 1)
        if not self.legacy:
            noop = self._noop(start, end, attrs, &steps)
            self._charge_walk(steps)  # part of the slots_lock hold
            if noop:
                h._release("slots_lock", 1)
                h._latency_end("attr_ioctl", lat, 1)
                return 0
        self.vm._attr_timeline(sched, start, end, attrs, lat)
        return 0

    cdef int _checked(self, uint64_t start, uint64_t end, uint64_t attrs) except -1:
        """:meth:`checked` (the ioctl's and the batched loop's call, in C)."""
        cdef uint64_t cur_attrs = 0, spte = 0, head2 = _INVALID_GFN, key = 0, g, steps = 0
        cdef uint64_t k2 = _INVALID_GFN, nb_lo = 0, nb_hi = 0
        cdef bint mixed2 = False
        cdef int u0 = -1
        cdef Run ar
        cdef RunCursor cur
        cdef _PreState ps
        cdef int ok
        cdef bint read = end - start == 1 and self.one_as
        if read:
            # The words of the one gfn the call reads, read together: the descents (of large
            # maps, in fragmented memory) overlap instead of running one after the other.
            key = rangemap_get(self.slot0, start)
            if key:
                self._slot(key)
            if self.vs._prefetch:
                self._hint(start)
            if key:
                head2 = _get_pos(self.c_m2, start >> 9, &self.m2_pos)
            # the value and the run around it (and, for a conversion to shared, where the
            # stored runs beside it end and begin, as far as its leaf shows them)
            ar = _run_beside(self.attrs, start, not attrs, &nb_lo, &nb_hi, &self.a_pos)
            cur_attrs = ar.value
            # another gfn of the 2M chunk [g, g + 512) in the run: max(run start, g) < start or
            # min(run end, g + 512) > start + 1
            g = start & ~(<uint64_t>511)
            mixed2 = (ar.start < start and g < start) or (ar.end > start + 1 and g + 512 > start + 1)
            # the first gfn of that chunk that differs from ``attrs`` once the store ran, where the
            # run shows it (a call that is no no-op: the old value differs): the chunk's first gfn
            # if the run covers it, else the gfn after ``start`` if the chunk begins at ``start``
            if ar.start <= g < start:
                k2 = g
            elif g == start and ar.end > start + 1:
                k2 = start + 1
            if not attrs and cur_attrs:
                # to shared (0, the map's default): once the store ran the chunk is uniform
                # unless what is left of the run meets it (mixed2) or a stored run beside it
                # does (runs are coalesced and gaps hold 0); a neighbour in another leaf is
                # not read here (then POST's 2M test looks)
                if mixed2 or (nb_lo != U64_MAX and nb_lo > g) or (nb_hi != 0 and nb_hi < g + 512):
                    u0 = 0
                elif nb_lo <= g and nb_hi >= g + 512:
                    u0 = 1
            spte = _get_pos(self.sptes, start, &self.s_pos)
        vm = self.vm
        if self.op is not None:
            vm._attr_free()  # EDEADLK
        self.n_ioctls += 1
        self.quiet = False
        subs = self.ledger.traced
        if subs:  # traced on entry, before the short-circuit (6.17+)
            vm._emit("set_memory_attributes", start, end, None, end - start, 0, None, (attrs,))
            read = False  # a callback ran: read again (its calls into the VM are refused, EDEADLK; vm._kill is not)
        sched = self.vs._sched
        if sched is not None:
            self._timeline(sched, start, end, attrs)
            return 0
        if self.legacy:
            vm._attr_legacy(start, end, attrs)
            return 0
        if read:
            if cur_attrs == attrs:
                return 0  # §2.7 short-circuit (one gfn: no walk)
        elif self._noop(start, end, attrs, &steps):
            self._charge_walk(steps)  # the walk ran under slots_lock
            return 0  # §2.7 short-circuit
        if self.armed and "xa_reserve" in self.armed:
            vm._attr_xa_reserve(start, end)
            read = False  # Python ran: read again
            subs = self.ledger.traced
        if steps:
            # the walk up to the first gfn that differs, charged once the reservation passed (a
            # failed call changes no modeled time) and before the phases (not under mmu_lock)
            self._charge_walk(steps)
        if not self.one_as or self.eager_split or self.eager_post:
            ranges = vm._slot_ranges(start, end)
            if ranges and self.eager_split:
                vm._attr_pre_lock(ranges, attrs)
            t0 = self.ledger.now()
            self.pre(ranges, attrs)
            t1 = self.ledger.now()
            self._commit(start, end, attrs)  # under slots_lock only
            t2 = self.ledger.now()
            self.post(ranges, attrs)
            self._add_lock(t1 - t0)  # (old + pre) + post, as the Python sum it replaces
            self._add_lock(self.ledger.now() - t2)
            if ranges and self.eager_post:
                vm._attr_post_unlock(ranges, attrs)
            return 0
        # One address space and no hook outside the lock: the pieces are read from the slot map
        # twice (it cannot change under slots_lock) instead of being built into a list.
        if self.hookless and not subs and self.vs.mmu_invalidate_in_progress == 0:
            if read and self.prices_i64 and (not spte or _spte_level(spte) == 1):
                self._quiet1(start, attrs, key, spte, head2, mixed2, k2, u0)
            else:
                self._quiet(start, end, attrs, read, key, spte, head2, mixed2, k2)
            return 0
        self.quiet = not self.ledger.traced
        t0 = self.ledger.now()
        ok = rangemap_cursor_init(self.slot0, &cur, start, end)
        if ok == 1:
            self._pre_begin(&ps, attrs)
            while ok == 1:
                self._pre_piece(&ps, cur.start, cur.end, cur.value)
                ok = rangemap_cursor_next(self.slot0, &cur)
            self._pre_end(&ps)
        t1 = self.ledger.now()
        self._commit(start, end, attrs)  # under slots_lock only
        t2 = self.ledger.now()
        ok = rangemap_cursor_init(self.slot0, &cur, start, end)
        if ok == 1:
            self._post_begin()
            while ok == 1:
                self._post_piece(cur.start, cur.end, cur.value, attrs)
                ok = rangemap_cursor_next(self.slot0, &cur)
        if t1 != t0 or self.ledger.now() != t2:
            self._add_lock(t1 - t0)  # (old + pre) + post, as the Python sum it replaces
            self._add_lock(self.ledger.now() - t2)
        self.quiet = False
        return 0


# ``AttrPath.ioctl`` bound to a path as a builtin method whose C function is _ioctl_fast: a call
# with its three or four arguments positional goes straight to the checks and the core (no
# generated argument parser); any other form of call goes through the generated method. The
# method table entry is AttrPath.ioctl's own (name, docstring, text signature) with the C
# function and flags replaced, written once at import.
cdef extern from *:
    """
    static PyMethodDef pkvm_attr_ioctl_def;
    static PyObject *pkvm_attr_ioctl_init(PyObject *type, void *fn) {
        PyTypeObject *tp = (PyTypeObject *)type;
        PyObject *orig = PyDict_GetItemString(tp->tp_dict, "ioctl");   /* borrowed */
        if (orig == NULL || !PyObject_TypeCheck(orig, &PyMethodDescr_Type)) {
            PyErr_Format(PyExc_RuntimeError, "%s.ioctl is not a method descriptor", tp->tp_name);
            return NULL;
        }
        pkvm_attr_ioctl_def = *((PyMethodDescrObject *)orig)->d_method;
        pkvm_attr_ioctl_def.ml_meth = (PyCFunction)(void (*)(void))fn;
        pkvm_attr_ioctl_def.ml_flags = METH_FASTCALL | METH_KEYWORDS;
        Py_INCREF(orig);
        return orig;
    }
    static PyObject *pkvm_attr_ioctl_bind(PyObject *self) {
        return PyCFunction_New(&pkvm_attr_ioctl_def, self);
    }
    """
    object pkvm_attr_ioctl_init(object type, void *fn)
    object pkvm_attr_ioctl_bind(object self)


cdef object _ioctl_fast(AttrPath self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    """``AttrPath.ioctl(address, size, attributes, flags=0)`` (``VM.set_memory_attributes``)."""
    if kwnames != NULL or nargs < 3 or nargs > 4:
        return _call_general(_ioctl_general, self, args, nargs, kwnames)
    self._ioctl(<object>args[0], <object>args[1], <object>args[2], <object>args[3] if nargs == 4 else 0)
    return None


cdef object _ioctl_general = pkvm_attr_ioctl_init(AttrPath, <void*>_ioctl_fast)


@cython.final
@cython.auto_pickle(False)
cdef class AttrIoctlMethod:
    """``VM.set_memory_attributes`` as a method descriptor: read on a VM whose
    :class:`AttrPath` is built, it is that path's bound :meth:`AttrPath.ioctl` (the ioctl
    called with no Python frame of its own); read on the class, or on a VM still being built,
    it is the Python method ``func`` (its docstring and signature, and the same call)."""

    cdef readonly object __func__

    def __init__(self, func):
        if not callable(func):
            raise TypeError(f"AttrIoctlMethod needs a function, not {type(func).__name__}")
        self.__func__ = func

    def __get__(self, obj, objtype):
        if obj is None:
            return self.__func__
        path = getattr(obj, "_attr_path", None)
        if type(path) is AttrPath and (<AttrPath>path).vm is obj:
            return (<AttrPath>path).bound_ioctl
        return self.__func__.__get__(obj, objtype)
