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


def directmap_split(RangeMap m, RangeMap orig, uint64_t s, uint64_t e):
    """Split the mappings of ``m`` (pfn -> level, bit 2 not present) covering ``[s, e)`` down
    to 4K: a 1G mapping becomes 2M mappings around the 2M blocks the range touches, those
    become 4K. ``orig`` is the boot layout (pfn -> level). Returns ``(1G splits, 2M splits,
    pages newly fragmented)``: a 1G split fragments its whole 1G block, a 2M split of a block
    that was 2M at boot its 2M block (one split from a 1G page was counted with that page).
    The changes are made after the walk, in the walk's order."""
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
    return n1g, n2m, frag
