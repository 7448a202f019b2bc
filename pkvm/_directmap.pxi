# The host direct map's split to 4K (pkvm/host/directmap.py, DirectMap._split), typed (included
# from _core.pyx). SNP's RMPUPDATE wrapper splits the direct map before every 4K RMPUPDATE of a
# page still mapped at 2M or 1G (adjust_direct_map, arch/x86/virt/svm/sev.c): every fresh page a
# balloon run faults in. DirectMap._split calls this; it is the one implementation.

cdef uint64_t _DM_P2M = 1 << 9
cdef uint64_t _DM_P1G = 1 << 18


cdef inline uint64_t _dm_down(uint64_t x, uint64_t size) noexcept nogil:
    return x - x % size


cdef inline uint64_t _dm_up(uint64_t x, uint64_t size) noexcept nogil:
    return (x + size - 1) // size * size


cdef int _dm_split(RangeMap m, RangeMap orig, uint64_t s, uint64_t e, uint64_t *n1g_out,
                   uint64_t *n2m_out, uint64_t *frag_out) except -1:
    """:func:`directmap_split`'s walk and changes; adds its counts to the outputs."""
    cdef uint64_t cur = s, stop, m0, m1, g0, g1, n1g = 0, n2m = 0, frag = 0
    cdef uint64_t level
    cdef Run r
    cdef RunCursor c
    cdef int ok
    cdef list plan = []
    while cur < e:
        rangemap_run_at(m, cur, &r)
        stop = r.end if r.end < e else e
        level = r.value & 3
        if level >= 2:
            m0 = _dm_down(cur, _DM_P2M)
            m1 = _dm_up(stop, _DM_P2M)
            n2m += (m1 - m0) // _DM_P2M
            if level == 3:
                g0 = _dm_down(cur, _DM_P1G)
                g1 = _dm_up(stop, _DM_P1G)
                n1g += (g1 - g0) // _DM_P1G
                frag += g1 - g0
                plan.append((g0, m0, 2))
                plan.append((m1, g1, 2))
            else:
                # each 2M page that was 2M at boot becomes fragmented now
                ok = rangemap_cursor_init(orig, &c, m0, m1)
                while ok == 1:
                    if c.value == 2:
                        frag += c.end - c.start
                    ok = rangemap_cursor_next(orig, &c)
            plan.append((m0, m1, 1))
        cur = stop
    for a, b, value in plan:
        rangemap_assign(m, a, b, value)
    n1g_out[0] += n1g
    n2m_out[0] += n2m
    frag_out[0] += frag
    return 0


def directmap_split(RangeMap m, RangeMap orig, uint64_t s, uint64_t e):
    """Split the mappings of ``m`` (pfn -> level, bit 2 not present) covering ``[s, e)`` down
    to 4K: a 1G mapping becomes 2M mappings around the 2M blocks the range touches, those
    become 4K. ``orig`` is the boot layout (pfn -> level). Returns ``(1G splits, 2M splits,
    pages newly fragmented)``: a 1G split fragments its whole 1G block, a 2M split of a block
    that was 2M at boot its 2M block (one split from a 1G page was counted with that page).
    The changes are made after the walk, in the walk's order."""
    cdef uint64_t n1g = 0, n2m = 0, frag = 0
    _dm_split(m, orig, s, e, &n1g, &n2m, &frag)
    return n1g, n2m, frag


cdef uint64_t _dm_split_4k(RangeMap m, RangeMap orig, dict cnt, dm, uint64_t s, uint64_t e,
                           uint64_t *splits) except? 0xFFFFFFFFFFFFFFFF:
    """``set_memory_4k`` on every 2M block ``[s, e)`` touches (``DirectMap._adjust`` of 4K
    RMPUPDATEs): the split walk (:func:`_dm_split`), its splits added to ``cnt``'s
    ``directmap_splits``, one CPA call per 2M block split to ``directmap_cpa_calls``, the pages
    newly fragmented to ``dm._fragmented``. Sets ``splits`` (1G and 2M) and returns the CPA
    calls."""
    cdef uint64_t n1g = 0, n2m = 0, frag = 0
    _dm_split(m, orig, s, e, &n1g, &n2m, &frag)
    if frag:
        dm._fragmented += frag
    cnt["directmap_splits"] += n1g + n2m
    cnt["directmap_cpa_calls"] += n2m
    splits[0] = n1g + n2m
    return n2m


def directmap_split_4k(dm, uint64_t s, uint64_t e):
    """:func:`_dm_split_4k` on ``dm``'s maps and counters (``DirectMap._adjust``); returns the
    CPA calls."""
    cdef uint64_t splits
    return _dm_split_4k(<RangeMap?>dm._map, <RangeMap?>dm._orig, <dict?>dm._cnt, dm, s, e, &splits)


cdef uint64_t _dm_invalidate(RangeMap m, RangeMap orig, uint64_t s, uint64_t e, dict cnt,
                            uint64_t *splits, uint64_t *unmaps) except? 0xFFFFFFFFFFFFFFFF:
    """``invalidate_direct_map`` of ``[s, e)`` (``DirectMap._invalidate``): split the large
    mappings in the way (:func:`directmap_split`), then make every page not present (4K,
    bit 2). Adds the splits (1G and 2M), the pages that were present and one CPA call per
    page to ``cnt``'s ``directmap_splits``, ``directmap_unmaps``, ``directmap_cpa_calls``, and
    sets ``splits`` and ``unmaps`` to the first two; returns the pages newly fragmented."""
    cdef uint64_t n1g = 0, n2m = 0, frag = 0, present = 0
    cdef RunCursor c
    cdef int ok
    _dm_split(m, orig, s, e, &n1g, &n2m, &frag)
    ok = rangemap_cursor_init(m, &c, s, e)
    while ok == 1:
        if not c.value & 4:
            present += c.end - c.start
        ok = rangemap_cursor_next(m, &c)
    rangemap_assign(m, s, e, 1 | 4)
    cnt["directmap_splits"] += n1g + n2m
    cnt["directmap_unmaps"] += present
    cnt["directmap_cpa_calls"] += e - s
    splits[0] = n1g + n2m
    unmaps[0] = present
    return frag


def directmap_invalidate(RangeMap m, RangeMap orig, uint64_t s, uint64_t e, dict cnt):
    """:func:`_dm_invalidate` (``DirectMap._invalidate``): returns the pages newly fragmented."""
    cdef uint64_t splits, unmaps
    return _dm_invalidate(m, orig, s, e, cnt, &splits, &unmaps)


cdef uint64_t _dm_restore(RangeMap m, uint64_t s, uint64_t e, dict cnt) except? 0xFFFFFFFFFFFFFFFF:
    """``restore_direct_map`` of ``[s, e)`` (``DirectMap._restore``): every page not present
    there becomes present at 4K (present pages keep their mapping). Adds the pages restored
    and one CPA call per page to ``cnt``'s ``directmap_restores``, ``directmap_cpa_calls``;
    returns the pages restored."""
    cdef uint64_t restored = 0
    cdef RunCursor c
    cdef int ok
    cdef list absent = []
    ok = rangemap_cursor_init(m, &c, s, e)
    while ok == 1:
        if c.value & 4:
            absent.append((c.start, c.end))
        ok = rangemap_cursor_next(m, &c)
    for a, b in absent:
        rangemap_assign(m, a, b, 1)
        restored += b - a
    cnt["directmap_restores"] += restored
    cnt["directmap_cpa_calls"] += e - s
    return restored


def directmap_restore(RangeMap m, uint64_t s, uint64_t e, dict cnt):
    """:func:`_dm_restore` (``DirectMap._restore``)."""
    _dm_restore(m, s, e, cnt)


cdef uint64_t _dm_unmap_restore(dm, RangeMap m, RangeMap orig, dict cnt, bint before, bint assigned,
                                uint64_t s, uint64_t e, uint64_t *splits, uint64_t *unmaps,
                                uint64_t *restores) except? 0xFFFFFFFFFFFFFFFF:
    """The RFC direct map's part of ``rmpupdate()`` on ``[s, e)`` (``DirectMap``'s
    ``_before_rmpupdate`` / ``_after_rmpupdate`` under ``"unmap-restore"``): before RMPUPDATEs
    that make the pages guest-owned, :func:`_dm_invalidate` (the pages newly fragmented added
    to ``dm._fragmented``); after ones that give them back, :func:`_dm_restore`; nothing
    otherwise. Sets the splits, unmaps and restores; returns the CPA calls (one per page)."""
    cdef uint64_t frag
    splits[0] = unmaps[0] = restores[0] = 0
    if e <= s:
        return 0
    if before and assigned:
        frag = _dm_invalidate(m, orig, s, e, cnt, splits, unmaps)
        if frag:
            dm._fragmented += frag
    elif not before and not assigned:
        restores[0] = _dm_restore(m, s, e, cnt)
    else:
        return 0
    return e - s


def directmap_unmap_restore(dm, bint before, bint assigned, uint64_t s, uint64_t e):
    """:func:`_dm_unmap_restore` on ``dm``'s maps and counters; returns the CPA calls."""
    cdef uint64_t splits, unmaps, restores
    return _dm_unmap_restore(dm, <RangeMap?>dm._map, <RangeMap?>dm._orig, <dict?>dm._cnt, before,
                             assigned, s, e, &splits, &unmaps, &restores)
