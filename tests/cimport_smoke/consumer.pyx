# cython: language_level=3
"""A third-party Cython module built against an installed pkvm, using only ``pkvm.core``."""

from libc.stdint cimport uint64_t

from time import perf_counter_ns

from pkvm.core cimport (
    RangeMap,
    Run,
    RunCursor,
    rangemap_assign,
    rangemap_assign_many,
    rangemap_count,
    rangemap_cursor_init,
    rangemap_cursor_next,
    rangemap_default,
    rangemap_find_ne,
    rangemap_get,
    rangemap_get_many,
    rangemap_run_at,
)


def fill_every_other(RangeMap m, uint64_t n, uint64_t value):
    """Assign ``value`` to every even key below ``2 * n``, without the GIL."""
    cdef uint64_t i
    with nogil:
        for i in range(n):
            rangemap_assign(m, 2 * i, 2 * i + 1, value)
    return rangemap_get(m, 0), rangemap_count(m), rangemap_default(m)


def assign(RangeMap m, uint64_t start, uint64_t end, uint64_t value):
    rangemap_assign(m, start, end, value)


def find_ne(RangeMap m, uint64_t start, uint64_t end, uint64_t value):
    cdef uint64_t found
    if rangemap_find_ne(m, start, end, value, &found):
        return found
    return -1


def run_at(RangeMap m, uint64_t key):
    cdef Run r
    rangemap_run_at(m, key, &r)
    return (r.start, r.end, r.value)


def runs(RangeMap m, uint64_t start, uint64_t end):
    """The stored runs meeting ``[start, end)``, clipped, by a cursor walk."""
    cdef RunCursor c
    out = []
    cdef int more = rangemap_cursor_init(m, &c, start, end)
    while more:
        out.append((c.start, c.end, c.value))
        more = rangemap_cursor_next(m, &c)
    return out


def runs_changing(RangeMap m, uint64_t start, uint64_t end, uint64_t k, uint64_t v):
    """A cursor walk that assigns ``[k, k + 1) = v`` after the first run it sees."""
    cdef RunCursor c
    out = []
    cdef int more = rangemap_cursor_init(m, &c, start, end)
    while more:
        out.append((c.start, c.end, c.value))
        if len(out) == 1:
            rangemap_assign(m, k, k + 1, v)
        more = rangemap_cursor_next(m, &c)
    return out


def next_on(RangeMap walked, RangeMap other):
    """Start a cursor on ``walked`` and step it on ``other`` (refused)."""
    cdef RunCursor c
    rangemap_cursor_init(walked, &c, 0, 100)
    return rangemap_cursor_next(other, &c)


def assign_many(RangeMap m, const uint64_t[::1] s, const uint64_t[::1] e,
                const uint64_t[::1] v):
    rangemap_assign_many(m, s, e, v)


def get_many(RangeMap m, const uint64_t[::1] keys, uint64_t[::1] out):
    rangemap_get_many(m, keys, out)


def walk_cursor(RangeMap m, int repeat):
    """(runs, sum of values, best ns per run) walking every stored run with a cursor."""
    cdef RunCursor c
    cdef uint64_t n = 0, total = 0
    cdef int r, more
    best = None
    for r in range(repeat):
        t0 = perf_counter_ns()
        with nogil:
            n = 0
            total = 0
            more = rangemap_cursor_init(m, &c, 0, 0xFFFFFFFFFFFFFFFFULL)
            while more:
                n += 1
                total += c.value
                more = rangemap_cursor_next(m, &c)
        dt = perf_counter_ns() - t0
        best = dt if best is None or dt < best else best
    return n, total, best / max(n, 1)


def walk_descend(RangeMap m, int repeat):
    """The same walk re-descending from the root for each run (``rangemap_run_at``)."""
    cdef Run run
    cdef uint64_t n = 0, total = 0, key
    cdef uint64_t dflt = rangemap_default(m)
    cdef int r
    best = None
    for r in range(repeat):
        t0 = perf_counter_ns()
        with nogil:
            n = 0
            total = 0
            key = 0
            while key < 0xFFFFFFFFFFFFFFFFULL:
                rangemap_run_at(m, key, &run)
                if run.value != dflt:
                    n += 1
                    total += run.value
                key = run.end
        dt = perf_counter_ns() - t0
        best = dt if best is None or dt < best else best
    return n, total, best / max(n, 1)


def read_with_gil(RangeMap m, int n):
    """Every C-level read but ``rangemap_get``, n times, holding the GIL."""
    cdef uint64_t found
    cdef int i
    cdef RunCursor c
    cdef Run r
    for i in range(n):
        rangemap_find_ne(m, 0, 1 << 40, 0, &found)
        rangemap_run_at(m, 12345, &r)
        if rangemap_cursor_init(m, &c, 0, 1 << 40):
            rangemap_cursor_next(m, &c)
