# cython: language_level=3
"""pkvm's stable C API, for Cython extensions: ``from pkvm.core cimport ...``.

Documented in ``docs/embedding.md``. Everything here keeps its name and meaning across
releases; the declarations in ``pkvm/_core.pxd`` (node layout, pools, helpers) are private.

``RangeMap`` is the Python-level ``pkvm.RangeMap``: a map from half-open ``uint64`` key ranges
``[start, end)`` to ``uint64`` values, stored as coalesced runs of non-default values.

Error convention: a function declared ``except -1`` returns -1 with a Python exception set
(``ValueError`` for ``start > end`` or a cursor used on another map, ``OverflowError`` for the
key ``2**64 - 1`` in ``rangemap_run_at``, ``MemoryError``, ``RuntimeError`` while a bulk call
runs in another thread: a change during any bulk call, a read during one that changes the map);
a refused call changes nothing. The ``nogil`` functions may be called without the GIL; they
acquire it only to raise. The ``RuntimeError`` is reliable only for a caller holding the GIL: a
caller that reads without it a map another thread may change must lock the map itself.

A ``RunCursor`` walks the stored runs of a window leaf to leaf: each step reads the next slot
of the current leaf, with no descent from the root. Read ``start``, ``end`` (clipped to the
window) and ``value``; the other fields are private. The cursor borrows the map: keep a
reference to it for as long as the cursor is used. If the map changes between two steps, the
next step re-descends and continues after the last run returned, in the changed map.
"""

from libc.stdint cimport uint64_t

from pkvm._core cimport (
    RangeMap,
    Run,
    RunCursor,
    rangemap_assign,
    rangemap_assign_array,
    rangemap_count,
    rangemap_cursor_init,
    rangemap_cursor_next,
    rangemap_default,
    rangemap_find_ne,
    rangemap_get,
    rangemap_get_array,
    rangemap_run_at,
)


cdef inline int rangemap_assign_many(RangeMap m, const uint64_t[::1] starts,
                                     const uint64_t[::1] ends,
                                     const uint64_t[::1] values) except -1:
    """``rangemap_assign`` for every ``i`` in order; all entries are validated first.

    ValueError if the lengths differ or some ``starts[i] > ends[i]``. Needs the GIL (the
    merge itself runs without it).
    """
    cdef Py_ssize_t n = starts.shape[0]
    if ends.shape[0] != n or values.shape[0] != n:
        raise ValueError("starts, ends and values must have the same length "
                         f"({n}, {ends.shape[0]}, {values.shape[0]})")
    if n == 0:
        return 0
    return rangemap_assign_array(m, &starts[0], &ends[0], &values[0], n)


cdef inline int rangemap_get_many(RangeMap m, const uint64_t[::1] keys,
                                  uint64_t[::1] out) except -1:
    """``out[i] = rangemap_get(m, keys[i])`` for every ``i``; ValueError if lengths differ.

    Needs the GIL (the lookups run without it).
    """
    cdef Py_ssize_t n = keys.shape[0]
    if out.shape[0] != n:
        raise ValueError(f"keys and out must have the same length ({n}, {out.shape[0]})")
    if n == 0:
        return 0
    return rangemap_get_array(m, &keys[0], &out[0], n)
