# The SNP vCPU's batch bound (pkvm/platforms/_snp_vcpu.py, SnpVcpu._batch_end), typed
# (included from _core.pyx): the walk over a memslot's guest_memfd folios and their RMP
# entries that decides how many private faults a PVALIDATE or an access may take as one batch.
# SnpVcpu._batch_end calls this; it is the one implementation of the walk.


def snp_batch_end(RangeMap folios, rmp, int64_t off, uint64_t gfn, uint64_t end,
                  bint validated, asid):
    """The end of the prefix of ``[gfn, end)`` (gfns of one memslot, ``end`` past ``gfn``)
    whose pages all qualify, at least ``gfn + 1``. ``folios`` maps guest_memfd page offsets
    (``gfn + off``) to folio words (the pfn delta in bits 8..63; 0: no folio). ``validated``:
    every page needs a folio whose RMP entries are assigned to ``asid`` at their GPA and
    validated; else no page may be validated (pages without a folio qualify). ``rmp`` is
    the core's ``RmpTable`` (queried at C level) or a reference twin (its ``find_ne`` /
    ``find_eq``, the tests' RMP)."""
    return _snp_batch_end(folios, rmp, off, gfn, end, validated, asid)


cdef uint64_t _snp_batch_end(RangeMap folios, rmp, int64_t off, uint64_t gfn, uint64_t end,
                             bint validated, asid) except? 0:
    """:func:`snp_batch_end` (the PVALIDATE walk's ``_pv_batch_end`` calls it directly)."""
    cdef uint64_t g = gfn, e
    cdef int64_t d
    cdef Run r
    cdef bint typed = type(rmp) is RmpTable
    while g < end:
        rangemap_run_at(folios, <uint64_t>(<int64_t>g + off), &r)
        # e = min(r.end - off, end), without wrapping at a run that reaches 2**64 - 1
        e = end if r.end >= <uint64_t>(<int64_t>end + off) else <uint64_t>(<int64_t>r.end - off)
        if not r.value:
            if validated:
                break
        else:
            d = _decode_delta(r.value) + off
            if not typed:
                if validated:
                    bad = rmp.find_ne(<int64_t>g + d, e - g, assigned=True, asid=asid, gpa=g << 12,
                                      validated=True)
                else:
                    bad = rmp.find_eq(<int64_t>g + d, e - g, validated=True)
            elif validated:
                bad = _rmp_find(<RmpTable>rmp, <int64_t>g + d, e - g, False, True, None, asid, g << 12,
                                None, True, None)
            else:
                bad = _rmp_find(<RmpTable>rmp, <int64_t>g + d, e - g, True, None, None, None, None,
                                None, True, None)
            if bad != -1:
                g = <uint64_t>(<int64_t>bad - d)
                break
        g = e
    return g if g > gfn + 1 else gfn + 1
