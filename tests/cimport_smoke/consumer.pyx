# cython: language_level=3
"""A third-party Cython module that cimports pkvm's core and calls its C-level methods."""

from libc.stdint cimport uint64_t

from pkvm._core cimport RangeMap


def fill_every_other(RangeMap m, uint64_t n, uint64_t value):
    """Assign ``value`` to every even key below ``2 * n`` through the C-level API."""
    cdef uint64_t i
    with nogil:
        for i in range(n):
            m._assign_c(2 * i, 2 * i + 1, value)
    return m._get_c(0)
