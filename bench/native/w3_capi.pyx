# cython: language_level=3
"""W3 on pkvm.RangeMap through its public C API (``pkvm.core``), with no Python call per step.

Built and run by ``bench/native_report.py`` to split W3's time from Python into the core's
work and the cost of the two Python calls per step; see docs/performance.md.
"""

from libc.stdint cimport uint64_t

from pkvm.core cimport RangeMap, rangemap_assign, rangemap_find_ne


def w3(RangeMap m, const uint64_t[::1] S, const uint64_t[::1] E, const uint64_t[::1] V,
       const uint64_t[::1] QS, const uint64_t[::1] QE, const uint64_t[::1] QV):
    """Assign ``[S[i], E[i]) = V[i]`` then ask whether ``[QS[i], QE[i])`` is all ``QV[i]``,
    for every ``i``; the number of uniform answers."""
    cdef Py_ssize_t i, n = S.shape[0]
    cdef uint64_t found
    cdef Py_ssize_t uniform = 0
    for i in range(n):
        rangemap_assign(m, S[i], E[i], V[i])
        if rangemap_find_ne(m, QS[i], QE[i], QV[i], &found) == 0:
            uniform += 1
    return uniform
