# cython: language_level=3
"""pkvm's typed core: ``RangeMap``, a B+tree of coalesced half-open ``uint64`` runs.

Layout and invariants are documented in ``_core.pxd``; the design (and what was rejected) in
``docs/design.md``. In short: leaves hold up to ``LEAF_CAP`` runs in parallel ``starts`` /
``ends`` arrays plus either a per-run value array or one shared value; inner nodes hold the
exact minimum start of each child, so a descent by key always lands in the leaf that holds the
last run starting at or before the key. Runs equal to the default are never stored.

Every mutation first reserves the nodes it could possibly need (``_reserve``); after that
nothing can fail, so a ``MemoryError`` never leaves a half-applied update behind.
"""

cimport cython
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.weakref cimport PyWeakref_GetObject
from libc.math cimport floor
from libc.limits cimport LLONG_MIN
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

import operator
from weakref import ref as _weakref

import numpy as np

cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    /* Issue loads for every cache line of [p, p + nbytes) so a node's lines arrive in
       parallel instead of one binary-search step at a time. */
    static inline void pkvm_prefetch_span(const void *p, size_t nbytes) {
        const char *c = (const char *)p;
        for (size_t off = 0; off < nbytes; off += 64)
            __builtin_prefetch(c + off);
    }
    /* Issue loads for every cache line that [p, p + nbytes) touches (from p's own line to the
       line of its last byte, whatever p's alignment). */
    static inline void pkvm_prefetch_lines(const void *p, size_t nbytes) {
        uintptr_t a = (uintptr_t)p & ~(uintptr_t)63, e = (uintptr_t)p + nbytes;
        for (; a < e; a += 64)
            __builtin_prefetch((const void *)a);
    }
    /* Rank of key in the ascending a[0:n] (how many elements are <= key, or < key) for a
       node's n <= 64 keys, in two rounds of independent loads instead of a chain of six
       dependent ones (correct for any n, linear in n / 8):
       the last key of each full block of 8 says which block holds the boundary (every block
       before it is entirely below the key), then that block's <= 8 keys are counted. */
    static inline int pkvm_count_le(const uint64_t *a, int n, uint64_t key) {
        int nb = n >> 3, b = 0, i, lo, hi, c;
        for (i = 0; i < nb; i++)
            b += a[8 * i + 7] <= key;
        lo = 8 * b;
        hi = lo + 8 < n ? lo + 8 : n;
        c = lo;
        for (i = lo; i < hi; i++)
            c += a[i] <= key;
        return c;
    }
    static inline int pkvm_count_lt(const uint64_t *a, int n, uint64_t key) {
        int nb = n >> 3, b = 0, i, lo, hi, c;
        for (i = 0; i < nb; i++)
            b += a[8 * i + 7] < key;
        lo = 8 * b;
        hi = lo + 8 < n ? lo + 8 : n;
        c = lo;
        for (i = lo; i < hi; i++)
            c += a[i] < key;
        return c;
    }
    /* The descent finger's one word (RangeMap.finger), loaded and stored whole: concurrent
       readers may race on it, and relaxed atomics make that race defined (no torn pointer). */
    static inline void *pkvm_load_ptr(void *const *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void pkvm_store_ptr(void **p, void *v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    """
    void pkvm_prefetch_span(const void *p, size_t nbytes) noexcept nogil
    void pkvm_prefetch_lines(const void *p, size_t nbytes) noexcept nogil
    void *pkvm_load_ptr(void *const *p) noexcept nogil
    void pkvm_store_ptr(void **p, void *v) noexcept nogil
    void __builtin_prefetch(const void *p) noexcept nogil
    int pkvm_count_le(const uint64_t *a, int n, uint64_t key) noexcept nogil
    int pkvm_count_lt(const uint64_t *a, int n, uint64_t key) noexcept nogil

cdef extern from *:
    """
    /* An exact int's value when it is small and non-negative, without a call: one or two
       30-bit digits (CPython < 3.12) or a compact int (3.12+, the unstable API made for it).
       0 means "not that simple": the caller falls back to PyLong_AsUnsignedLongLong. */
    #if PY_VERSION_HEX < 0x030B0000 && !defined(PYPY_VERSION)
    #include "longintrepr.h"    /* PyLongObject's digits (Python.h includes it from 3.11) */
    #endif
    static inline int pkvm_small_u64(PyObject *o, uint64_t *out) {
    #if PY_VERSION_HEX < 0x030C0000 && !defined(PYPY_VERSION)
        PyLongObject *l = (PyLongObject *)o;
        switch (Py_SIZE(o)) {
        case 0: *out = 0; return 1;
        case 1: *out = (uint64_t)l->ob_digit[0]; return 1;
        case 2: *out = ((uint64_t)l->ob_digit[1] << PyLong_SHIFT) | (uint64_t)l->ob_digit[0];
                return 1;
        }
        return 0;
    #elif PY_VERSION_HEX >= 0x030C0000 && !defined(PYPY_VERSION)
        if (PyUnstable_Long_IsCompact((PyLongObject *)o)) {
            Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
            if (v >= 0) { *out = (uint64_t)v; return 1; }
        }
        return 0;
    #else
        (void)o; (void)out;
        return 0;
    #endif
    }
    static inline int pkvm_small_u64p(PyObject *o, uint64_t *out) {
        return PyLong_CheckExact(o) && pkvm_small_u64(o, out);
    }
    """
    bint pkvm_small_u64(object o, uint64_t *out) noexcept
    bint pkvm_small_u64p(PyObject *o, uint64_t *out) noexcept

cdef extern from *:
    """
    /* RangeMap.assign, find_ne and get (and VcpuFault.page_fault, pkvm/_fault.pxi) as
       METH_FASTCALL | METH_KEYWORDS methods whose C function is the core's own entry
       (_assign_fast, _find_ne_fast, _get_fast in _core.pyx, _vcpu_fault_fast) instead of
       Cython's generated argument parser: a call of the usual form goes straight to the
       conversion and the core. pkvm_fastcall_override replaces the
       type's method descriptor `name` by one for `fn`, reusing the generated method's name
       and docstring (text signature included), and returns the generated descriptor (a new
       reference), which serves every other form of call (keywords, a wrong count). The
       method tables are written once, at import, and never change. */
    static PyMethodDef pkvm_fast_defs[4];
    static PyObject *pkvm_fastcall_override(PyObject *type, int slot, const char *name,
                                            void *fn) {
        PyTypeObject *tp = (PyTypeObject *)type;
        PyObject *orig = PyDict_GetItemString(tp->tp_dict, name);   /* borrowed */
        PyObject *descr;
        if (orig == NULL || !PyObject_TypeCheck(orig, &PyMethodDescr_Type)) {
            PyErr_Format(PyExc_RuntimeError, "%s.%s is not a method descriptor",
                         tp->tp_name, name);
            return NULL;
        }
        pkvm_fast_defs[slot] = *((PyMethodDescrObject *)orig)->d_method;
        pkvm_fast_defs[slot].ml_meth = (PyCFunction)(void (*)(void))fn;
        pkvm_fast_defs[slot].ml_flags = METH_FASTCALL | METH_KEYWORDS;
        descr = PyDescr_NewMethod(tp, &pkvm_fast_defs[slot]);
        if (descr == NULL)
            return NULL;
        Py_INCREF(orig);
        if (PyDict_SetItemString(tp->tp_dict, name, descr) < 0) {
            Py_DECREF(descr);
            Py_DECREF(orig);
            return NULL;
        }
        Py_DECREF(descr);
        PyType_Modified(tp);
        return orig;
    }
    """
    object pkvm_fastcall_override(object type, int slot, const char *name, void *fn)

cdef extern from *:
    """
    /* The memory of RangeMap's nodes (leaves, inner nodes and value arrays), for every map of
       the process: 64-byte slots carved in allocation order from chunks of 2 MiB aligned to
       2 MiB and advised MADV_HUGEPAGE. A node lookup in a large map lands on a cold leaf; with
       4 KiB pages nearly every one is also a TLB miss (and, in a VM, a two-dimensional page
       walk), which a 2 MiB page of nodes takes away where the kernel grants huge pages (THP
       "madvise" or "always"; elsewhere the chunks are ordinary pages). Slots are multiples of
       64 bytes after a 64-byte header, so a leaf's 64 starts fill exactly 8 cache lines.
       One chunk holds leaves, inner nodes and value arrays together, in the order they are
       made (as malloc's heap did): value arrays in chunks of their own made a lookup in a map
       with values (the SPTEs) slower.
       Each chunk keeps the slots given back on a free list per size and counts the slots in
       use. A chunk whose last slot comes back starts over (carved in order again) or, past
       PKVM_CHUNKS_SPARE such empty chunks, is unmapped: a map built after others were freed
       gets its nodes in order again instead of in the order the free lists hold them (with
       one free list for the process, W4's bulk calls after W2 and W3 took 20 % longer).
       Allocation takes from the current chunk, else the next chunk with room in the
       registry's order, else a new chunk. The lock is a spin flag (allocation is rare: pool
       refills and frees past RangeMap's pools, a map's teardown), reset in a forked child,
       which may have been forked while another thread held it. */
    #include <sys/mman.h>
    #include <pthread.h>
    #define PKVM_CHUNK ((size_t)2 << 20)
    #define PKVM_CHUNK_HDR ((size_t)64)     /* the chunk's pkvm_chunk, then its slots */
    #define PKVM_CHUNKS_SPARE 4             /* empty chunks kept mapped */
    #define PKVM_SLOT_NODE ((size_t)1088)   /* a Leaf (1064 bytes) or an Inner (1032), to 64 */
    #define PKVM_SLOT_VALS ((size_t)512)    /* a value array (LEAF_CAP uint64) */
    typedef struct {
        char *bump;             /* the chunk's never-used part starts here */
        void *free_node;        /* given-back node slots, linked through their first word */
        void *free_vals;        /* given-back value-array slots, likewise */
        size_t live;            /* slots handed out and not given back */
        size_t index;           /* in pkvm_nodes.chunks */
    } pkvm_chunk;
    static struct {
        pkvm_chunk **chunks;    /* every mapped chunk */
        size_t n, cap;
        size_t cur;             /* the chunk allocation tries first (< n when n > 0) */
        size_t empty;           /* chunks with no slot in use */
        char lock;
    } pkvm_nodes;
    static void pkvm_nodes_unlock_child(void) { __atomic_clear(&pkvm_nodes.lock, __ATOMIC_RELAXED); }
    static int pkvm_nodes_init(void) { return pthread_atfork(NULL, NULL, pkvm_nodes_unlock_child); }
    static void pkvm_chunk_reset(pkvm_chunk *c) {
        c->bump = (char *)c + PKVM_CHUNK_HDR;
        c->free_node = c->free_vals = NULL;
    }
    static pkvm_chunk *pkvm_chunk_new(void) {
        /* mapped twice the size, the parts around the aligned chunk given back */
        char *m, *a;
        pkvm_chunk *c, **grown;
        if (pkvm_nodes.n == pkvm_nodes.cap) {
            grown = (pkvm_chunk **)realloc(pkvm_nodes.chunks, (2 * pkvm_nodes.cap + 16) * sizeof(pkvm_chunk *));
            if (grown == NULL)
                return NULL;
            pkvm_nodes.chunks = grown;
            pkvm_nodes.cap = 2 * pkvm_nodes.cap + 16;
        }
        m = (char *)mmap(NULL, 2 * PKVM_CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == (char *)MAP_FAILED)
            return NULL;
        a = (char *)(((uintptr_t)m + PKVM_CHUNK - 1) & ~(uintptr_t)(PKVM_CHUNK - 1));
        if (a != m)
            munmap(m, (size_t)(a - m));
        munmap(a + PKVM_CHUNK, (size_t)(m + PKVM_CHUNK - a));
    #ifdef MADV_HUGEPAGE
        madvise(a, PKVM_CHUNK, MADV_HUGEPAGE);
    #endif
        c = (pkvm_chunk *)a;
        pkvm_chunk_reset(c);
        c->live = 0;
        c->index = pkvm_nodes.n;
        pkvm_nodes.chunks[pkvm_nodes.n++] = c;
        pkvm_nodes.empty++;
        return c;
    }
    /* A slot of ``size`` from chunk ``c``, or NULL when it has none. */
    static void *pkvm_chunk_take(pkvm_chunk *c, size_t size) {
        void **fl = size == PKVM_SLOT_VALS ? &c->free_vals : &c->free_node;
        void *p = *fl;
        if (p != NULL) {
            *fl = *(void **)p;
        } else if ((size_t)((char *)c + PKVM_CHUNK - c->bump) >= size) {
            p = c->bump;
            c->bump += size;
        } else {
            return NULL;
        }
        if (c->live++ == 0)
            pkvm_nodes.empty--;
        return p;
    }
    /* A slot of ``size`` (PKVM_SLOT_NODE or PKVM_SLOT_VALS), or NULL when out of memory. */
    static void *pkvm_nodes_alloc(size_t size) {
        void *p = NULL;
        size_t k, i;
        pkvm_chunk *c;
        while (__atomic_test_and_set(&pkvm_nodes.lock, __ATOMIC_ACQUIRE))
            ;
        for (k = 0; k < pkvm_nodes.n && p == NULL; k++) {   /* from the current one on */
            i = (pkvm_nodes.cur + k) % pkvm_nodes.n;
            p = pkvm_chunk_take(pkvm_nodes.chunks[i], size);
            if (p != NULL)
                pkvm_nodes.cur = i;
        }
        if (p == NULL && (c = pkvm_chunk_new()) != NULL) {
            pkvm_nodes.cur = c->index;
            p = pkvm_chunk_take(c, size);
        }
        __atomic_clear(&pkvm_nodes.lock, __ATOMIC_RELEASE);
        return p;
    }
    /* Give back a slot of ``size`` that pkvm_nodes_alloc returned (NULL: nothing). */
    static void pkvm_nodes_free(void *p, size_t size) {
        pkvm_chunk *c, *last;
        void **fl;
        if (p == NULL)
            return;
        c = (pkvm_chunk *)((uintptr_t)p & ~(uintptr_t)(PKVM_CHUNK - 1));
        fl = size == PKVM_SLOT_VALS ? &c->free_vals : &c->free_node;
        while (__atomic_test_and_set(&pkvm_nodes.lock, __ATOMIC_ACQUIRE))
            ;
        *(void **)p = *fl;
        *fl = p;
        if (--c->live == 0) {
            if (pkvm_nodes.empty >= PKVM_CHUNKS_SPARE && c->index != pkvm_nodes.cur) {
                /* unmapped; the registry's last chunk takes its place */
                last = pkvm_nodes.chunks[--pkvm_nodes.n];
                pkvm_nodes.chunks[c->index] = last;
                last->index = c->index;
                if (pkvm_nodes.cur == pkvm_nodes.n)
                    pkvm_nodes.cur = c->index;
                munmap((void *)c, PKVM_CHUNK);
            } else {
                pkvm_chunk_reset(c);
                pkvm_nodes.empty++;
            }
        }
        __atomic_clear(&pkvm_nodes.lock, __ATOMIC_RELEASE);
    }
    """
    size_t PKVM_SLOT_NODE
    size_t PKVM_SLOT_VALS
    int pkvm_nodes_init() noexcept nogil
    void *pkvm_nodes_alloc(size_t size) noexcept nogil
    void pkvm_nodes_free(void *p, size_t size) noexcept nogil

if pkvm_nodes_init() != 0:
    raise ImportError("pkvm._core: pthread_atfork failed")
if sizeof(Leaf) > PKVM_SLOT_NODE or sizeof(Inner) > PKVM_SLOT_NODE or LEAF_CAP * sizeof(uint64_t) > PKVM_SLOT_VALS:
    raise ImportError("pkvm._core: a node does not fit its slot (PKVM_SLOT_NODE / PKVM_SLOT_VALS)")


cdef inline Leaf *_leaf_alloc() noexcept nogil:
    """A leaf's memory (uninitialised), or NULL when out of memory."""
    return <Leaf*>pkvm_nodes_alloc(PKVM_SLOT_NODE)


cdef inline Inner *_inner_alloc() noexcept nogil:
    """An inner node's memory (uninitialised), or NULL when out of memory."""
    return <Inner*>pkvm_nodes_alloc(PKVM_SLOT_NODE)


cdef inline uint64_t *_vals_alloc() noexcept nogil:
    """A value array's memory (``LEAF_CAP`` uint64, uninitialised), or NULL when out of memory."""
    return <uint64_t*>pkvm_nodes_alloc(PKVM_SLOT_VALS)


cdef inline void _node_free(void *p) noexcept nogil:
    """Give back a leaf or an inner node (NULL: nothing)."""
    pkvm_nodes_free(p, PKVM_SLOT_NODE)


cdef inline void _vals_free(uint64_t *v) noexcept nogil:
    """Give back a value array (NULL: nothing)."""
    pkvm_nodes_free(<void*>v, PKVM_SLOT_VALS)


cdef extern from "Python.h":
    # The raw C-API call: it returns (unsigned long long)-1 and sets OverflowError for negative
    # or too-large ints; we turn that into a message that names the argument.
    unsigned long long _as_ull "PyLong_AsUnsignedLongLong"(object o) noexcept
    bint _is_exact_int "PyLong_CheckExact"(object o) noexcept
    void* PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept

UINT64_MAX = 0xFFFFFFFFFFFFFFFF
cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFFULL
cdef int POOL_MAX = 96          # spare nodes of each kind kept for reuse


# ---------------------------------------------------------------------------------------------
# Argument validation (Python boundary)
# ---------------------------------------------------------------------------------------------

cdef int _u64_slow(object o, str name, uint64_t *out) except -1:
    """``_u64`` for everything but a small exact int (out of line: the callers stay small)."""
    cdef unsigned long long v
    if _is_exact_int(o):
        v = _as_ull(o)
        if v == <unsigned long long>-1 and PyErr_Occurred() != NULL:
            PyErr_Clear()
            raise OverflowError(f"{name} out of range for uint64: {o}")
        out[0] = v
        return 0
    if isinstance(o, (float, complex, str, bytes)) or not hasattr(type(o), "__index__"):
        raise TypeError(f"{name} must be an integer, not {type(o).__name__}")
    return _u64(operator.index(o), name, out)


cdef inline int _u64(object o, str name, uint64_t *out) except -1:
    """Convert ``o`` to a uint64 into ``out``; TypeError/OverflowError name the argument."""
    if _is_exact_int(o) and pkvm_small_u64(o, out):
        return 0
    return _u64_slow(o, name, out)


cdef object _u64_array(object obj, str name):
    """Return ``obj`` as a C-contiguous 1-D uint64 numpy array, validating every element."""
    cdef uint64_t tmp
    arr = np.asarray(obj)
    if not isinstance(obj, np.ndarray) and arr.dtype.kind not in "uiO" and arr.size:
        # numpy reads a list mixing small ints with ints >= 2**63 as float64 (losing digits);
        # re-read such containers exactly and check each element with the scalar rules.
        arr = np.asarray(obj, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {arr.shape}")
    kind = arr.dtype.kind
    if kind == "u":
        return np.ascontiguousarray(arr, dtype=np.uint64)
    if kind == "i":
        if arr.size:
            neg = np.flatnonzero(arr < 0)
            if neg.size:
                i = int(neg[0])
                raise OverflowError(f"{name}[{i}] out of range for uint64: {int(arr[i])}")
        return np.ascontiguousarray(arr, dtype=np.uint64)
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if kind == "O":
        out = np.empty(arr.shape[0], dtype=np.uint64)
        for i in range(arr.shape[0]):
            _u64(arr[i], f"{name}[{i}]", &tmp)
            out[i] = tmp
        return out
    raise TypeError(f"{name} must be an array of integers, not {arr.dtype}")


# ---------------------------------------------------------------------------------------------
# Small inline helpers (searches and value access)
# ---------------------------------------------------------------------------------------------

cdef inline int _ub(const uint64_t *a, int n, uint64_t key) noexcept nogil:
    """Number of elements of the ascending ``a[0:n]`` that are ``<= key``."""
    return pkvm_count_le(a, n, key)


cdef inline int _lb(const uint64_t *a, int n, uint64_t key) noexcept nogil:
    """Number of elements of the ascending ``a[0:n]`` that are ``< key``."""
    return pkvm_count_lt(a, n, key)


cdef inline uint64_t _val(const Leaf *leaf, int i) noexcept nogil:
    return leaf.vals[i] if leaf.vals != NULL else leaf.uval


cdef inline Run _mkrun(uint64_t start, uint64_t end, uint64_t value) noexcept nogil:
    cdef Run r
    r.start = start
    r.end = end
    r.value = value
    return r


cdef inline int _make_reps(bint have, Run f, Run g, uint64_t s, uint64_t e, uint64_t v,
                           uint64_t dflt, Run *rep) noexcept nogil:
    """Replacement runs for assigning ``v`` over ``[s, e)``.

    ``f`` is the first run with ``end >= s`` and ``g`` the last with ``start <= e`` (touching
    runs included, so equal neighbours coalesce); ``have`` says whether any such run exists.
    Returns the number of runs written to ``rep`` (at most 3, in key order).
    """
    cdef int m = 0
    cdef uint64_t new_s = s, new_e = e
    cdef bint right = False
    if have:
        if f.start < s:
            if f.value == v:
                new_s = f.start
            else:
                rep[m] = _mkrun(f.start, s, f.value)
                m += 1
        if g.end > e:
            if g.value == v:
                new_e = g.end
            else:
                right = True
    if v != dflt:
        rep[m] = _mkrun(new_s, new_e, v)
        m += 1
    if right:
        rep[m] = _mkrun(e, g.end, g.value)
        m += 1
    return m


cdef inline bint _crosses_leaf(const Leaf *lf, int a, int b, uint64_t s, uint64_t e,
                               uint64_t v) noexcept nogil:
    """Whether assigning ``v`` over ``[s, e)``, which replaces runs ``a:b`` of ``lf``, reaches
    a neighbour leaf: a run there overlaps the range, or touches it with the same value (and
    would merge). A touching neighbour of another value is left as it is."""
    cdef const Leaf *nb
    if a == 0 and lf.prev != NULL:
        nb = lf.prev
        if nb.ends[nb.n - 1] > s or (nb.ends[nb.n - 1] == s and _val(nb, nb.n - 1) == v):
            return True
    if b == lf.n and lf.next != NULL:
        nb = lf.next
        if nb.starts[0] < e or (nb.starts[0] == e and _val(nb, 0) == v):
            return True
    return False


cdef inline int _leaf_reps(const Leaf *lf, int a, int b, uint64_t s, uint64_t e, uint64_t v,
                           uint64_t dflt, Run *rep) noexcept nogil:
    """``_make_reps`` for assigning ``v`` over ``[s, e)`` where the runs touching it are
    ``a:b`` of ``lf`` (none if ``a == b``)."""
    cdef Run f, g
    if b > a:
        f = _mkrun(lf.starts[a], lf.ends[a], _val(lf, a))
        g = _mkrun(lf.starts[b - 1], lf.ends[b - 1], _val(lf, b - 1))
    return _make_reps(b > a, f, g, s, e, v, dflt, rep)


cdef inline bint _reps_stored(const Leaf *lf, int a, int b, const Run *rep,
                              int m) noexcept nogil:
    """Whether the ``m`` replacement runs ``rep`` for runs ``a:b`` of ``lf`` are exactly the
    runs stored there (then the assign changes nothing)."""
    cdef int j
    if m != b - a:
        return False
    for j in range(m):
        if (rep[j].start != lf.starts[a + j] or rep[j].end != lf.ends[a + j]
                or rep[j].value != _val(lf, a + j)):
            return False
    return True


cdef int _pack_widths(const uint64_t *keys, Py_ssize_t n, int *kbits, int *ibits) noexcept nogil:
    """The significant bits of the largest key and of the largest index; 1 if they fit in a
    64-bit word together (then ``_radix_sort_packed`` applies)."""
    cdef uint64_t bits = 0
    cdef Py_ssize_t i
    cdef int kb = 0, ib = 0
    for i in range(n):
        bits |= keys[i]
    while kb < 64 and (bits >> kb) != 0:
        kb += 1
    while ib < 63 and (<uint64_t>(n - 1) >> ib) != 0:
        ib += 1
    kbits[0] = kb
    ibits[0] = ib
    return kb + ib <= 64


cdef inline void _digit_starts(Py_ssize_t *c) noexcept nogil:
    """Turn one radix pass's 256 digit counts into each digit's first output slot."""
    cdef Py_ssize_t tot = 0, x
    cdef int d
    for d in range(256):
        x = c[d]
        c[d] = tot
        tot += x


cdef uint64_t *_radix_sort_packed(const uint64_t *keys, Py_ssize_t n, int kbits,
                                  int ibits, const uint64_t *low=NULL) except NULL nogil:
    """The words ``key << ibits | index`` of ``keys``, sorted by key (ties in index order).

    A radix pass moves one word instead of a key and an index (half the scatter traffic and
    scratch memory of ``_radix_argsort``); only the key's digits are sorted on, and ties keep
    index order because LSD passes are stable. ``kbits + ibits <= 64`` (``_pack_widths``),
    ``ibits < 64``. With ``low``, the low field of word ``i`` is ``low[i]`` (which must fit
    in ``ibits`` bits) instead of ``i``. The caller frees the result.
    """
    cdef uint64_t *a = <uint64_t*>malloc(n * sizeof(uint64_t))
    cdef uint64_t *b = <uint64_t*>malloc(n * sizeof(uint64_t))
    cdef Py_ssize_t *cnt = <Py_ssize_t*>malloc(8 * 256 * sizeof(Py_ssize_t))
    cdef Py_ssize_t *c
    cdef uint64_t *t
    cdef uint64_t w
    cdef Py_ssize_t i
    cdef int shift, d, p, npass = (kbits + 7) // 8
    if a == NULL or b == NULL or cnt == NULL:
        free(a)
        free(b)
        free(cnt)
        with gil:
            raise MemoryError("RangeMap: out of memory sorting keys")
    memset(cnt, 0, 8 * 256 * sizeof(Py_ssize_t))
    for i in range(n):
        w = (keys[i] << ibits) | (low[i] if low != NULL else <uint64_t>i)
        a[i] = w
        for p in range(npass):
            cnt[p * 256 + <int>((w >> (ibits + 8 * p)) & 255)] += 1
    for p in range(npass):
        shift = ibits + 8 * p
        c = &cnt[p * 256]
        _digit_starts(c)
        for i in range(n):
            w = a[i]
            d = <int>((w >> shift) & 255)
            b[c[d]] = w
            c[d] += 1
        t = a
        a = b
        b = t
    free(b)
    free(cnt)
    return a


cdef int _radix_argsort(const uint64_t *keys, Py_ssize_t n, Py_ssize_t *perm,
                        uint64_t *sorted_keys) except -1 nogil:
    """Write to ``perm`` the stable ascending order of ``keys`` (LSD radix sort, 8-bit digits).

    ``sorted_keys`` (optional, may be NULL) receives ``keys`` in that order.

    The general case; keys and indices that fit in one word together take
    ``_radix_sort_packed``. One read pass builds every digit's histogram; digits no key uses
    are skipped, so GFN-sized
    keys (< 2**40) take at most five scatter passes; 256 buckets keep the
    scatter's write cursors within the TLB's reach. O(n) time, 4n words of scratch memory.
    """
    cdef uint64_t bits = 0, k
    cdef Py_ssize_t i
    for i in range(n):
        bits |= keys[i]
    cdef uint64_t *k1 = <uint64_t*>malloc(n * sizeof(uint64_t))
    cdef uint64_t *k2 = <uint64_t*>malloc(n * sizeof(uint64_t))
    cdef Py_ssize_t *i2 = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    cdef Py_ssize_t *cnt = <Py_ssize_t*>malloc(8 * 256 * sizeof(Py_ssize_t))
    cdef Py_ssize_t *i1 = perm
    cdef Py_ssize_t *ti
    cdef Py_ssize_t *c
    cdef uint64_t *tk
    cdef int shift, d, p, npass = 0
    if k1 == NULL or k2 == NULL or i2 == NULL or cnt == NULL:
        free(k1)
        free(k2)
        free(i2)
        free(cnt)
        with gil:
            raise MemoryError("RangeMap: out of memory sorting keys")
    while npass < 8 and (bits >> (8 * npass)) != 0:
        npass += 1
    memset(cnt, 0, 8 * 256 * sizeof(Py_ssize_t))
    for i in range(n):
        k = keys[i]
        k1[i] = k
        i1[i] = i
        for p in range(npass):
            cnt[p * 256 + <int>((k >> (8 * p)) & 255)] += 1
    for p in range(npass):
        shift = 8 * p
        c = &cnt[p * 256]
        _digit_starts(c)
        for i in range(n):
            d = <int>((k1[i] >> shift) & 255)
            k2[c[d]] = k1[i]
            i2[c[d]] = i1[i]
            c[d] += 1
        tk = k1
        k1 = k2
        k2 = tk
        ti = i1
        i1 = i2
        i2 = ti
    if i1 != perm:
        memcpy(perm, i1, n * sizeof(Py_ssize_t))
        i2 = i1
    if sorted_keys != NULL:
        memcpy(sorted_keys, k1, n * sizeof(uint64_t))
    free(k1)
    free(k2)
    free(i2)
    free(cnt)
    return 0


cdef bint _disjoint_in_order(const uint64_t *S, const uint64_t *E, Py_ssize_t n) noexcept nogil:
    """True if applying the ranges ``S/E`` (sorted stably by start) equals array order.

    That holds when each range ends at or before the next one starts or is exactly the same
    range (equal ranges keep their array order: later still wins).
    """
    cdef Py_ssize_t i
    for i in range(n - 1):
        if E[i] > S[i + 1] and not (S[i] == S[i + 1] and E[i] == E[i + 1]):
            return False
    return True


cdef void _gather(const uint64_t *src, const Py_ssize_t *P, uint64_t *dst,
                  Py_ssize_t n) noexcept nogil:
    """``dst[j] = src[P[j]]``: independent loads, prefetched a few iterations ahead."""
    cdef Py_ssize_t j
    for j in range(n):
        if j + 16 < n:
            __builtin_prefetch(&src[P[j + 16]])
        dst[j] = src[P[j]]


cdef bint _by_value(const uint64_t *S, const uint64_t *E, const uint64_t *V, Py_ssize_t n,
                    int kbits, int *vbits) noexcept nogil:
    """1 if every range has the first one's length and every value fits beside a key of
    ``kbits`` bits in one word (``*vbits``: the values' significant bits, below 64): then the
    sort can carry each range's value in place of its index and nothing is gathered."""
    cdef uint64_t length = E[0] - S[0], bits = 0
    cdef Py_ssize_t i
    cdef int vb = 0
    for i in range(n):
        if E[i] - S[i] != length:
            return False
        bits |= V[i]
    while vb < 64 and (bits >> vb) != 0:
        vb += 1
    vbits[0] = vb
    return vb < 64 and kbits + vb <= 64


cdef void _unpack_by_value(uint64_t *W, int vbits, uint64_t length, uint64_t *ES,
                           uint64_t *VS, Py_ssize_t n) noexcept nogil:
    """Unpack ``W`` (``key << vbits | value``, sorted) in place into the sorted starts, and
    write the matching ends (start + the common length) and values."""
    cdef uint64_t mask = ((<uint64_t>1) << vbits) - 1, w
    cdef Py_ssize_t j
    for j in range(n):
        w = W[j]
        W[j] = w >> vbits
        ES[j] = W[j] + length
        VS[j] = w & mask


cdef void _gather_runs(const uint64_t *S, const uint64_t *E, const uint64_t *V, uint64_t *W,
                       int ibits, uint64_t *ES, uint64_t *VS, Py_ssize_t n) noexcept nogil:
    """Unpack ``W`` (from ``_radix_sort_packed`` on ``S``) in place into the sorted starts and
    gather the matching ends and values into ``ES`` and ``VS``.

    The gathers are random reads; when every range has the same length, or every value is the
    same, the sorted ends or values are computed instead of read (one-key toggles, pages of one
    size, a scalar value).
    """
    cdef uint64_t mask = ((<uint64_t>1) << ibits) - 1
    cdef uint64_t length = E[0] - S[0], w
    cdef bint same_length = True, same_value = True
    cdef Py_ssize_t i, j
    for i in range(1, n):
        if E[i] - S[i] != length:
            same_length = False
            break
    for i in range(1, n):
        if V[i] != V[0]:
            same_value = False
            break
    for j in range(n):
        if j + 16 < n:
            if not same_length:
                __builtin_prefetch(&E[W[j + 16] & mask])
            if not same_value:
                __builtin_prefetch(&V[W[j + 16] & mask])
        w = W[j]
        W[j] = w >> ibits
        ES[j] = W[j] + length if same_length else E[w & mask]
        VS[j] = V[0] if same_value else V[w & mask]


cdef struct Cursor:
    # A walk over the stored runs in key order (RangeMap's merge path).
    Leaf *lf                    # leaf of the current run
    int i                       # its index in the leaf
    bint have                   # False once the walk is past the last run
    Run r                       # the current run (its start may be advanced by the caller)


cdef inline void _cur_load(Cursor *c) noexcept nogil:
    """Load the run at (lf, i), skipping to the next non-empty leaf as needed."""
    while c.lf != NULL and c.i >= c.lf.n:
        c.lf = c.lf.next
        c.i = 0
    c.have = c.lf != NULL
    if c.have:
        c.r = _mkrun(c.lf.starts[c.i], c.lf.ends[c.i], _val(c.lf, c.i))


cdef inline void _cur_next(Cursor *c) noexcept nogil:
    c.i += 1
    _cur_load(c)


cdef void _b_init(Builder *b, int fill, uint64_t dflt) noexcept nogil:
    b.leaves = NULL
    b.n = b.cap = b.runs = b.vals = 0
    b.fill = fill
    b.have = False
    b.dflt = dflt


cdef int _b_put(Builder *b, Run r) noexcept nogil:
    """Write one run into the current leaf, starting a new one when full; -1 on ENOMEM."""
    cdef Leaf *lf = <Leaf*>b.leaves[b.n - 1] if b.n > 0 else NULL
    cdef void **grown
    cdef int j
    if lf == NULL or lf.n == b.fill:
        if b.n == b.cap:
            grown = <void**>realloc(b.leaves, (2 * b.cap + 16) * sizeof(void*))
            if grown == NULL:
                return -1
            b.leaves = grown
            b.cap = 2 * b.cap + 16
        lf = _leaf_alloc()
        if lf == NULL:
            return -1
        lf.n = 0
        lf.vals = NULL
        lf.uval = r.value
        lf.next = NULL
        lf.prev = <Leaf*>b.leaves[b.n - 1] if b.n > 0 else NULL
        if lf.prev != NULL:
            lf.prev.next = lf
        b.leaves[b.n] = <void*>lf
        b.n += 1
    if lf.vals == NULL and r.value != lf.uval:
        lf.vals = _vals_alloc()
        if lf.vals == NULL:
            return -1
        b.vals += 1
        for j in range(lf.n):
            lf.vals[j] = lf.uval
    lf.starts[lf.n] = r.start
    lf.ends[lf.n] = r.end
    if lf.vals != NULL:
        lf.vals[lf.n] = r.value
    lf.n += 1
    b.runs += 1
    return 0


cdef inline int _b_emit(Builder *b, uint64_t s, uint64_t e, uint64_t v) noexcept nogil:
    """Append run ``[s, e) = v`` (skipping empty and default runs, coalescing); -1 on ENOMEM."""
    if s >= e or v == b.dflt:
        return 0
    if b.have and b.pend.end == s and b.pend.value == v:
        b.pend.end = e
        return 0
    if b.have and _b_put(b, b.pend) < 0:
        return -1
    b.pend = _mkrun(s, e, v)
    b.have = True
    return 0


cdef int _b_finish(Builder *b) noexcept nogil:
    """Write the pending run; make sure at least one (possibly empty) leaf exists."""
    cdef Leaf *lf
    if b.have:
        b.have = False
        if _b_put(b, b.pend) < 0:
            return -1
    if b.n == 0:
        b.leaves = <void**>malloc(sizeof(void*))
        lf = _leaf_alloc()
        if b.leaves == NULL or lf == NULL:
            _node_free(lf)
            return -1
        lf.n = 0
        lf.vals = NULL
        lf.uval = b.dflt
        lf.prev = lf.next = NULL
        b.leaves[0] = <void*>lf
        b.n = b.cap = 1
    return 0


cdef void _b_free(Builder *b) noexcept nogil:
    """Free everything a builder made (its leaves and their value arrays)."""
    _free_nodes(b.leaves, 0, b.n, 0)
    free(b.leaves)
    b.leaves = NULL
    b.n = 0


cdef void _free_nodes(void **level, Py_ssize_t lo, Py_ssize_t hi, int height) noexcept nogil:
    """Free the subtrees ``level[lo:hi]`` of the given height (``_bulk_load``'s error path)."""
    cdef Py_ssize_t i
    for i in range(lo, hi):
        _free_node(level[i], height)


cdef void _free_node(void *node, int height) noexcept nogil:
    cdef Inner *nd
    cdef Leaf *lf
    cdef int j
    if node == NULL:
        return
    if height == 0:
        lf = <Leaf*>node
        _vals_free(lf.vals)
        _node_free(lf)
        return
    nd = <Inner*>node
    for j in range(nd.n):
        _free_node(nd.children[j], height - 1)
    _node_free(nd)


# ---------------------------------------------------------------------------------------------
# RangeMap
# ---------------------------------------------------------------------------------------------

# The descent finger. The typed kernel paths look the same few maps up several times at one
# key (get then assign at a GFN; find_ne then assign), and at 10**6 runs each descent from the
# root is a chain of cache misses. ``RangeMap.finger`` remembers the leaf the last lookup or
# assign landed in; the next one whose key falls inside that leaf starts there.
#
# Opt-in (``RangeMap(..., _finger=True)``, kept by copy and pickle): on random keys the finger
# rarely hits and its unpredictable check costs more than the descents it saves (W3 through
# the C API measured 7 ns per step slower), so only the maps of the kernel's per-GFN paths use
# it. On every other map the only cost is a predictable test of ``fingered``.
# Users: _get_c, _run_at_c, _next_run_c (so find_ne), the C API cursor's seek, and _assign_c's
# entry; the range paths (_assign_slow, _insert_run, _erase_starts) descend as before.
# The typed paths' entry hints (_prefetch_finger) store the leaf their descent reached, so the
# lookup that follows the hint starts there instead of descending again.
#
# Correctness: a leaf L is the one a descent by ``key`` returns iff
#   (L.prev == NULL or L.starts[0] <= key) and (L.next == NULL or key < L.next.starts[0])
# (inner keys are exact subtree minima, so a descent lands in the last leaf whose first start
# is <= key, or in the first leaf). The finger tests the stronger right bound
# ``key < L.starts[L.n - 1]`` (runs do not overlap, so L.next.starts[0] >= L.ends[L.n - 1] >
# L.starts[L.n - 1]): it reads only L's own ``starts``, which a hint has asked for or the
# previous call left in cache, instead of the neighbour's, and it only loses the keys in L's
# last run and the gap after it (they descend: about one lookup in 40 on a leaf about two
# thirds full). The check reads the live
# contents of L, so it holds whatever changed inside leaves since the finger was stored.
# Every change of the tree's shape (a leaf or inner node taken or given, the root replaced,
# clear, bulk rebuild) first sets the finger to NULL, so a non-NULL finger is always a leaf of
# the live tree: a stale one never points at freed or pooled memory.
#
# Threads: concurrent readers are allowed (the public C API's nogil lookups) but changes are
# exclusive, so while any reader runs the shape cannot change, and every pointer a reader may
# store is a leaf of the live tree. The finger is one word loaded and stored with relaxed
# atomics (no torn value); no Path is ever stored, so a writer never depends on a reader's
# state: a writer that needs the path to its leaf (a split, a merge, a new first start)
# descends for it, which is the rare case. The GIL-free bulk readers (``_get_walk``) keep
# their own finger on the stack and neither read nor store this one.

cdef inline Leaf *_descend_leaf(RangeMap m, uint64_t key) noexcept nogil:
    """``_descend`` without recording the path (a reader's descent)."""
    cdef void *node = m.root
    cdef Inner *nd
    cdef int lvl, i
    for lvl in range(m.height):
        nd = <Inner*>node
        i = _ub(nd.keys, nd.n, key) - 1
        node = nd.children[i if i > 0 else 0]
    pkvm_prefetch_span((<Leaf*>node).ends, (<Leaf*>node).n * sizeof(uint64_t))
    return <Leaf*>node


cdef inline Leaf *_hint_leaf(RangeMap m, uint64_t key) noexcept nogil:
    """Ask for the lines a lookup of ``key`` reads first in its leaf (its count and its
    ``starts``) without waiting for them, and return that leaf: the inner nodes are descended
    (they stay warm in a large map; its leaves do not), the leaf itself is not read. A lookup
    issued a little later finds its lines arriving instead of starting the wait then. (Its
    loop is :func:`_descend_leaf`'s; one inline function for both cost the one-page ioctl 53
    and the private fault 27 more instructions a call under callgrind: gcc inlined them
    differently.)"""
    cdef void *node = m.root
    cdef Inner *nd
    cdef int lvl, i
    for lvl in range(m.height):
        nd = <Inner*>node
        i = _ub(nd.keys, nd.n, key) - 1
        node = nd.children[i if i > 0 else 0]
    pkvm_prefetch_lines(&(<Leaf*>node).n, sizeof(int))
    pkvm_prefetch_span((<Leaf*>node).starts, LEAF_CAP * sizeof(uint64_t))
    return <Leaf*>node


cdef inline void _prefetch_leaf(RangeMap m, uint64_t key) noexcept nogil:
    """:func:`_hint_leaf` for a lookup that does not come next in this map (a hint one call
    ahead: the lookups of the call between would find a wrong finger)."""
    _hint_leaf(m, key)


cdef inline void _prefetch_finger(RangeMap m, uint64_t key) noexcept nogil:
    """:func:`_hint_leaf` for a lookup of ``key`` that comes next in this map: the leaf the
    descent reached also becomes the finger (on a fingered map), so that lookup starts there
    instead of descending the inner nodes again. The finger's own check then reads the leaf's
    bounds (its first and last starts, which the hint asked for, and its neighbours'
    pointers), so a key the leaf does not hold still descends, and nothing but speed depends
    on the guess. The leaf's ``ends`` are not asked for: the lookup reads one of their lines,
    and asking for all eight (with the ``starts``, about 17 lines a map and 50 a fault) kept
    the cache's fill buffers full for lines nobody read."""
    cdef Leaf *lf = _hint_leaf(m, key)
    if m.fingered:
        pkvm_store_ptr(&m.finger, <void*>lf)


cdef inline Leaf *_finger_leaf(RangeMap m, uint64_t key) noexcept nogil:
    """The finger's leaf if ``key`` falls inside it (see above), else NULL."""
    cdef Leaf *lf = <Leaf*>pkvm_load_ptr(&m.finger)
    if (lf != NULL and (lf.prev == NULL or lf.starts[0] <= key)
            and (lf.next == NULL or (lf.n > 0 and key < lf.starts[lf.n - 1]))):
        return lf
    return NULL


cdef inline Run _leaf_run(RangeMap m, const Leaf *lf, int i, uint64_t key) noexcept nogil:
    """The maximal run containing ``key`` in ``lf``, whose last run starting at or before
    ``key`` is ``i`` (-1 if none): that run, or the gap of the default after it."""
    cdef uint64_t gs, ge
    if i >= 0 and key < lf.ends[i]:
        return _mkrun(lf.starts[i], lf.ends[i], _val(lf, i))
    gs = lf.ends[i] if i >= 0 else 0
    if i + 1 < lf.n:
        ge = lf.starts[i + 1]
    elif lf.next != NULL:
        ge = lf.next.starts[0]
    else:
        ge = U64_MAX
    return _mkrun(gs, ge, m.dflt)


cdef inline void _leaf_replace(RangeMap m, Leaf *lf, int a, int b, const Run *rep,
                               int cnt) noexcept nogil:
    """Replace runs ``a:b`` of ``lf`` by the ``cnt`` runs ``rep`` (the leaf has room), moving
    the runs after them once; the map's run count follows."""
    cdef int n = lf.n, delta = cnt - (b - a), j
    if delta != 0:
        memmove(&lf.starts[a + cnt], &lf.starts[b], (n - b) * sizeof(uint64_t))
        memmove(&lf.ends[a + cnt], &lf.ends[b], (n - b) * sizeof(uint64_t))
        if lf.vals != NULL:
            memmove(&lf.vals[a + cnt], &lf.vals[b], (n - b) * sizeof(uint64_t))
        lf.n = n + delta
        m.count += delta
    for j in range(cnt):
        m._leaf_write(lf, a + j, rep[j].start, rep[j].end, rep[j].value)


cdef inline Leaf *_leaf_at(RangeMap m, uint64_t key) noexcept nogil:
    """The leaf a descent by ``key`` returns, through the finger when it holds ``key``."""
    cdef Leaf *lf
    if not m.fingered:
        return _descend_leaf(m, key)
    lf = _finger_leaf(m, key)
    if lf != NULL:
        return lf
    lf = _descend_leaf(m, key)
    pkvm_store_ptr(&m.finger, <void*>lf)
    return lf


cdef inline void _drop_finger(RangeMap m) noexcept nogil:
    """The tree's shape is about to change (callers hold the map exclusively)."""
    pkvm_store_ptr(&m.finger, NULL)


cdef int _refuse_nested(object owner) except -1:
    """``owner`` is a weakref to the VM whose live state an object is: while an event callback
    of that VM runs (``VmState._in_callback``), a public mutator of the object raises
    ``KvmError(EDEADLK)`` through ``VM._nested_call`` and changes nothing (docs/events.md).
    The caller tests ``owner is not None`` first, so an object of no VM pays one compare."""
    cdef PyObject *p = PyWeakref_GetObject(owner)
    if p != <PyObject*>None and (<VmState>p)._in_callback:
        (<object>p)._nested_call()
    return 0


cdef inline int _assign1_in(RangeMap self, Leaf *lf, int i, uint64_t s, uint64_t v) except -1 nogil:
    """``RangeMap._assign1_c`` once its spare pools are topped up and its lookup landed: ``lf``
    the leaf a lookup of ``s`` returns, ``i`` its last run starting at or before ``s`` (-1:
    none); ``_assign1_c`` and ``_assign1_at`` both end here. tests/test_rangemap_assign1.py
    holds both to the general assign's tree."""
    cdef int n, a, b, k, m, j, delta
    cdef uint64_t e = s + 1, first
    cdef Run rep[3]
    n = lf.n
    first = lf.starts[0] if n > 0 else 0
    # a: the runs ending before s (ends ascend; run i - 1 ends at or before starts[i] <= s)
    if i < 0:
        a = 0
    elif lf.ends[i] < s:
        a = i + 1
    elif i > 0 and lf.ends[i - 1] == s:
        a = i - 1
    else:
        a = i
    # b: the runs starting at or before e (run i + 1 starts after s)
    b = i + 2 if i + 1 < n and lf.starts[i + 1] == e else i + 1
    if _crosses_leaf(lf, a, b, s, e, v):
        return self._assign_c(s, e, v)
    k = b - a
    m = _leaf_reps(lf, a, b, s, e, v, self.dflt, rep)
    if _reps_stored(lf, a, b, rep, m):
        self.version += 1
        return 0
    delta = m - k
    if n + delta > self.leaf_cap:
        return self._assign_c(s, e, v)
    if self.height > 0:
        if n + delta == 0 or (delta < 0 and n + delta < (self.leaf_cap >> 2)):
            return self._assign_c(s, e, v)
        if a == 0 and (rep[0].start if m > 0 else lf.starts[b]) != first:
            return self._assign_c(s, e, v)
    self.version += 1
    _leaf_replace(self, lf, a, b, rep, m)
    return 0


cdef inline int _assign1_at(RangeMap m, const RunPos *pos, uint64_t s, uint64_t v) except -1 nogil:
    """``m._assign1_c(s, v)`` where ``pos`` is what a lookup of ``s`` in ``m`` filled in
    (``_run_pos_c``, or a reader's own) while ``m`` is unchanged since (its version): the same
    write from that leaf and index, without looking ``s`` up again. A position of another
    version, or one whose index does not hold ``s`` in its leaf, is ``_assign1_c``'s."""
    cdef Leaf *lf = <Leaf*>pos.leaf
    cdef int i = pos.index
    if (lf == NULL or pos.version != m.version or i >= lf.n
            or (i >= 0 and lf.starts[i] > s) or (i + 1 < lf.n and lf.starts[i + 1] <= s)):
        return m._assign1_c(s, v)
    m._reserve()
    return _assign1_in(m, lf, i, s, v)


@cython.no_gc  # its one object field is a weakref (_owner), which cannot close a cycle
cdef class RangeMap:
    """A coalescing map from half-open ``uint64`` key ranges ``[start, end)`` to ``uint64`` values.

    Every key not covered by a stored run has ``default``. Adjacent runs with equal values
    merge, and runs whose value equals ``default`` are not stored, so the map's size is the
    number of maximal non-default runs, whatever the span of keys.

    Keys satisfy ``0 <= start <= end <= 2**64 - 1``; ``start == end`` is a no-op. The key
    ``2**64 - 1`` cannot be covered and always reads as ``default``.

    Runtime complexity: ``assign`` O(log n + k) for k replaced runs; ``get``, ``find_ne`` and
    ``run_at`` O(log n); memory O(n) for n stored runs.

    >>> m = RangeMap()
    >>> m.assign(0x100, 0x300, 8)
    >>> m.assign(0x200, 0x280, 0)
    >>> m.ranges()
    [(256, 512, 8), (640, 768, 8)]
    >>> m.find_ne(0x100, 0x300, 8)
    512
    """

    def __cinit__(self, default=0, *, _fanout=None, _finger=False):
        cdef uint64_t d
        cdef int cap = LEAF_CAP
        _u64(default, "default", &d)
        if _fanout is not None:
            if not isinstance(_fanout, int) or not (4 <= _fanout <= LEAF_CAP):
                raise ValueError(f"_fanout must be an int in [4, {LEAF_CAP}], not {_fanout!r}")
            cap = _fanout
        self.dflt = d
        self.fingered = bool(_finger)
        self.leaf_cap = cap
        self.inner_cap = cap if cap <= INNER_CAP else INNER_CAP
        self.pool_leaves = NULL
        self.pool_inner = NULL
        self.pool_vals = NULL
        self.root = NULL
        self._refill()
        self.root = self._take_leaf()
        self.first_leaf = <Leaf*>self.root
        self.height = 0
        self.count = 0

    def _set_owner(self, vm):
        """Make this map live state of ``vm`` (a weakref; None: of no VM): :meth:`assign`,
        :meth:`assign_many` and :meth:`clear` then refuse from an event callback of ``vm``
        (``KvmError(EDEADLK)``). A :meth:`copy` belongs to no VM."""
        self._owner = None if vm is None else _weakref(vm)

    def __dealloc__(self):
        cdef Leaf *lf
        cdef Inner *nd
        cdef uint64_t *v
        if self.root != NULL:
            self._free_subtree(self.root, self.height)
            self.root = NULL
        while self.pool_leaves != NULL:
            lf = self.pool_leaves
            self.pool_leaves = lf.next
            _node_free(lf)
        while self.pool_inner != NULL:
            nd = self.pool_inner
            self.pool_inner = <Inner*>nd.children[0]
            _node_free(nd)
        while self.pool_vals != NULL:
            v = self.pool_vals
            self.pool_vals = <uint64_t*><size_t>v[0]
            _vals_free(v)

    # -- node pools ------------------------------------------------------------------------------

    cdef int _reserve(self) except -1 nogil:
        # Worst case of one assign: 3 run inserts, each splitting a leaf and every inner level
        # (plus a new root), and a few value arrays for splits and merges.
        if (self.n_pool_leaves >= 4 and self.n_pool_inner >= 3 * self.height + 8
                and self.n_pool_vals >= 16):
            return 0
        return self._refill()

    cdef int _reserve_n(self, int n) except -1 nogil:
        """Top the pools up for ``n`` assigns in a row (n >= 1): each assign's own ``_reserve``
        then finds enough spare nodes and allocates nothing, so ``n`` assigns after this one
        call cannot fail (a caller that must write the map several times for one change)."""
        # The j-th assign (from 0) needs what one ``_reserve`` keeps at a height that the
        # assigns before it may have raised by j levels: 4 leaves, 3 * (height + j) + 8 inner
        # nodes and 16 value arrays; the sum over the n assigns.
        return self._fill_pools(4 * n, n * (3 * self.height + 8) + 3 * n * (n - 1) // 2, 16 * n)

    cdef int _refill(self) except -1 nogil:
        return self._fill_pools(4, 3 * self.height + 8, 16)

    cdef int _fill_pools(self, int64_t leaves, int64_t inner, int64_t vals) except -1 nogil:
        """Allocate spare nodes until the pools hold ``leaves`` leaves, ``inner`` inner nodes
        and ``vals`` value arrays (MemoryError, the pools keep what was allocated)."""
        cdef Leaf *lf
        cdef Inner *nd
        cdef uint64_t *v
        while self.n_pool_leaves < leaves:
            lf = _leaf_alloc()
            if lf == NULL:
                with gil:
                    raise MemoryError("RangeMap: out of memory allocating a leaf")
            lf.vals = NULL
            lf.next = self.pool_leaves
            self.pool_leaves = lf
            self.n_pool_leaves += 1
        while self.n_pool_inner < inner:
            nd = _inner_alloc()
            if nd == NULL:
                with gil:
                    raise MemoryError("RangeMap: out of memory allocating an inner node")
            nd.children[0] = <void*>self.pool_inner
            self.pool_inner = nd
            self.n_pool_inner += 1
        while self.n_pool_vals < vals:
            v = _vals_alloc()
            if v == NULL:
                with gil:
                    raise MemoryError("RangeMap: out of memory allocating a value array")
            v[0] = <uint64_t><size_t>self.pool_vals
            self.pool_vals = v
            self.n_pool_vals += 1
        return 0

    cdef Leaf *_take_leaf(self) noexcept nogil:
        cdef Leaf *lf = self.pool_leaves
        _drop_finger(self)
        self.pool_leaves = lf.next
        self.n_pool_leaves -= 1
        lf.n = 0
        lf.vals = NULL
        lf.uval = self.dflt
        lf.prev = NULL
        lf.next = NULL
        self.n_leaves += 1
        return lf

    cdef Inner *_take_inner(self) noexcept nogil:
        cdef Inner *nd = self.pool_inner
        _drop_finger(self)
        self.pool_inner = <Inner*>nd.children[0]
        self.n_pool_inner -= 1
        nd.n = 0
        self.n_inner += 1
        return nd

    cdef uint64_t *_take_vals(self) noexcept nogil:
        cdef uint64_t *v = self.pool_vals
        self.pool_vals = <uint64_t*><size_t>v[0]
        self.n_pool_vals -= 1
        self.n_vals += 1
        return v

    cdef void _give_vals(self, uint64_t *v) noexcept nogil:
        self.n_vals -= 1
        if self.n_pool_vals >= POOL_MAX:
            _vals_free(v)
            return
        v[0] = <uint64_t><size_t>self.pool_vals
        self.pool_vals = v
        self.n_pool_vals += 1

    cdef void _give_leaf(self, Leaf *lf) noexcept nogil:
        _drop_finger(self)
        if lf.vals != NULL:
            self._give_vals(lf.vals)
            lf.vals = NULL
        self.n_leaves -= 1
        if self.n_pool_leaves >= POOL_MAX:
            _node_free(lf)
            return
        lf.next = self.pool_leaves
        self.pool_leaves = lf
        self.n_pool_leaves += 1

    cdef void _give_inner(self, Inner *nd) noexcept nogil:
        _drop_finger(self)
        self.n_inner -= 1
        if self.n_pool_inner >= POOL_MAX:
            _node_free(nd)
            return
        nd.children[0] = <void*>self.pool_inner
        self.pool_inner = nd
        self.n_pool_inner += 1

    cdef void _free_subtree(self, void *node, int height) noexcept nogil:
        cdef Inner *nd
        cdef Leaf *lf
        cdef int i
        if height == 0:
            lf = <Leaf*>node
            if lf.vals != NULL:
                _vals_free(lf.vals)
                self.n_vals -= 1
            _node_free(lf)
            self.n_leaves -= 1
            return
        nd = <Inner*>node
        for i in range(nd.n):
            self._free_subtree(nd.children[i], height - 1)
        _node_free(nd)
        self.n_inner -= 1

    cdef void _reset(self) noexcept nogil:
        """Free every node and leave one empty root leaf (the pool must hold a leaf)."""
        self.version += 1
        _drop_finger(self)
        self._free_subtree(self.root, self.height)
        self.root = self._take_leaf()
        self.first_leaf = <Leaf*>self.root
        self.height = 0
        self.count = 0

    # -- descent and structure maintenance ---------------------------------------------------

    cdef Leaf *_descend(self, uint64_t key, Path *path) noexcept nogil:
        """The leaf holding the last run whose start is ``<= key`` (the first leaf if none)."""
        cdef void *node = self.root
        cdef Inner *nd
        cdef int lvl, i
        for lvl in range(self.height):
            nd = <Inner*>node
            i = _ub(nd.keys, nd.n, key) - 1
            if i < 0:
                i = 0
            path.node[lvl] = nd
            path.idx[lvl] = i
            node = nd.children[i]
        pkvm_prefetch_span((<Leaf*>node).ends, (<Leaf*>node).n * sizeof(uint64_t))
        return <Leaf*>node

    cdef void _fix_min(self, Path *path, int level, uint64_t key) noexcept nogil:
        """The subtree entered at ``path.idx[level]`` now starts at ``key``: fix the keys above."""
        cdef int lvl = level
        while lvl >= 0:
            path.node[lvl].keys[path.idx[lvl]] = key
            if path.idx[lvl] != 0:
                return
            lvl -= 1

    cdef void _leaf_write(self, Leaf *lf, int i, uint64_t start, uint64_t end,
                          uint64_t value) noexcept nogil:
        """Write run ``i`` of a leaf whose ``n`` already counts it."""
        cdef uint64_t *v
        cdef int j
        lf.starts[i] = start
        lf.ends[i] = end
        if lf.vals != NULL:
            lf.vals[i] = value
        elif value != lf.uval:
            if lf.n == 1:
                lf.uval = value
            else:
                v = self._take_vals()
                for j in range(lf.n):
                    v[j] = lf.uval
                v[i] = value
                lf.vals = v

    cdef void _leaf_shrink_vals(self, Leaf *lf) noexcept nogil:
        """Drop a leaf's value array when all its runs share one value."""
        cdef int j
        cdef uint64_t v0
        if lf.vals == NULL:
            return
        if lf.n > 0:
            v0 = lf.vals[0]
            for j in range(1, lf.n):
                if lf.vals[j] != v0:
                    return
            lf.uval = v0
        self._give_vals(lf.vals)
        lf.vals = NULL

    cdef void _leaf_append(self, Leaf *dst, Leaf *src) noexcept nogil:
        """Move every run of ``src`` to the end of ``dst`` (the caller checked capacity)."""
        cdef int j, n = dst.n, k = src.n
        cdef uint64_t *v
        memcpy(&dst.starts[n], &src.starts[0], k * sizeof(uint64_t))
        memcpy(&dst.ends[n], &src.ends[0], k * sizeof(uint64_t))
        if dst.vals == NULL and src.vals == NULL and (n == 0 or k == 0 or dst.uval == src.uval):
            if n == 0:
                dst.uval = src.uval
        else:
            if dst.vals == NULL:
                v = self._take_vals()
                for j in range(n):
                    v[j] = dst.uval
                dst.vals = v
            for j in range(k):
                dst.vals[n + j] = _val(src, j)
        dst.n = n + k
        src.n = 0

    cdef void _insert_child(self, Path *path, int level, uint64_t key, void *child) noexcept nogil:
        """Insert ``child`` (whose subtree starts at ``key``) right after ``path.idx[level]``."""
        cdef Inner *nd = path.node[level]
        cdef Inner *n2
        cdef Inner *nr
        cdef int pos = path.idx[level] + 1
        cdef int at, lvl
        cdef bint rightmost
        if nd.n < self.inner_cap:
            memmove(&nd.keys[pos + 1], &nd.keys[pos], (nd.n - pos) * sizeof(uint64_t))
            memmove(&nd.children[pos + 1], &nd.children[pos], (nd.n - pos) * sizeof(void*))
            nd.keys[pos] = key
            nd.children[pos] = child
            nd.n += 1
            return
        # Split. Appends at the right edge of the tree keep the left node full, so ordered
        # inserts (a guest booting front to back) build a densely packed tree.
        rightmost = pos == nd.n
        lvl = level - 1
        while rightmost and lvl >= 0:
            rightmost = path.idx[lvl] == path.node[lvl].n - 1
            lvl -= 1
        at = nd.n if rightmost else nd.n // 2
        n2 = self._take_inner()
        n2.n = nd.n - at
        memcpy(&n2.keys[0], &nd.keys[at], n2.n * sizeof(uint64_t))
        memcpy(&n2.children[0], &nd.children[at], n2.n * sizeof(void*))
        nd.n = at
        if pos <= at and not rightmost:
            memmove(&nd.keys[pos + 1], &nd.keys[pos], (nd.n - pos) * sizeof(uint64_t))
            memmove(&nd.children[pos + 1], &nd.children[pos], (nd.n - pos) * sizeof(void*))
            nd.keys[pos] = key
            nd.children[pos] = child
            nd.n += 1
        else:
            pos -= at
            memmove(&n2.keys[pos + 1], &n2.keys[pos], (n2.n - pos) * sizeof(uint64_t))
            memmove(&n2.children[pos + 1], &n2.children[pos], (n2.n - pos) * sizeof(void*))
            n2.keys[pos] = key
            n2.children[pos] = child
            n2.n += 1
        if level == 0:
            nr = self._take_inner()
            nr.n = 2
            nr.keys[0] = nd.keys[0]
            nr.children[0] = <void*>nd
            nr.keys[1] = n2.keys[0]
            nr.children[1] = <void*>n2
            self.root = <void*>nr
            self.height += 1
        else:
            self._insert_child(path, level - 1, n2.keys[0], <void*>n2)

    cdef void _remove_child(self, Path *path, int level) noexcept nogil:
        """Remove child ``path.idx[level]`` of ``path.node[level]`` (already freed or moved)."""
        cdef Inner *nd = path.node[level]
        cdef int i = path.idx[level]
        memmove(&nd.keys[i], &nd.keys[i + 1], (nd.n - i - 1) * sizeof(uint64_t))
        memmove(&nd.children[i], &nd.children[i + 1], (nd.n - i - 1) * sizeof(void*))
        nd.n -= 1
        if nd.n == 0:
            # Only reachable through single-child inner nodes; drop the node itself.
            self._give_inner(nd)
            if level == 0:
                self.root = <void*>self._take_leaf()
                self.first_leaf = <Leaf*>self.root
                self.height = 0
            else:
                self._remove_child(path, level - 1)
            return
        if i == 0 and level > 0:
            self._fix_min(path, level - 1, nd.keys[0])
        if level == 0:
            while self.height > 0 and (<Inner*>self.root).n == 1:
                nd = <Inner*>self.root
                self.root = nd.children[0]
                self.height -= 1
                self._give_inner(nd)
        elif nd.n < (self.inner_cap >> 2 if self.inner_cap >= 8 else 2):
            self._rebalance_inner(path, level)

    cdef void _rebalance_inner(self, Path *path, int level) noexcept nogil:
        """Merge an underfull inner node with a sibling under the same parent, if they fit."""
        cdef Inner *nd = path.node[level]
        cdef Inner *parent = path.node[level - 1]
        cdef Inner *sib
        cdef int i = path.idx[level - 1]
        cdef int limit = (self.inner_cap * 3) >> 2
        if i + 1 < parent.n:
            sib = <Inner*>parent.children[i + 1]
            if nd.n + sib.n <= limit:
                memcpy(&nd.keys[nd.n], &sib.keys[0], sib.n * sizeof(uint64_t))
                memcpy(&nd.children[nd.n], &sib.children[0], sib.n * sizeof(void*))
                nd.n += sib.n
                self._give_inner(sib)
                path.idx[level - 1] = i + 1
                self._remove_child(path, level - 1)
                return
        if i > 0:
            sib = <Inner*>parent.children[i - 1]
            if sib.n + nd.n <= limit:
                memcpy(&sib.keys[sib.n], &nd.keys[0], nd.n * sizeof(uint64_t))
                memcpy(&sib.children[sib.n], &nd.children[0], nd.n * sizeof(void*))
                sib.n += nd.n
                self._give_inner(nd)
                self._remove_child(path, level - 1)

    cdef void _remove_leaf(self, Leaf *lf, Path *path) noexcept nogil:
        """Unlink an empty non-root leaf and drop it from its parent."""
        if lf.prev != NULL:
            lf.prev.next = lf.next
        else:
            self.first_leaf = lf.next
        if lf.next != NULL:
            lf.next.prev = lf.prev
        self._give_leaf(lf)
        self._remove_child(path, self.height - 1)

    cdef void _rebalance_leaf(self, Leaf *lf, Path *path) noexcept nogil:
        """Merge an underfull leaf into a sibling under the same parent, if they fit.

        Merging (never borrowing) keeps this simple while bounding memory: a leaf stays at
        least a quarter full unless both neighbours are too full to take it.
        """
        cdef int h = self.height
        cdef Inner *parent
        cdef Leaf *sib
        cdef int i
        cdef int limit = (self.leaf_cap * 3) >> 2
        if h == 0 or lf.n >= (self.leaf_cap >> 2):
            return
        parent = path.node[h - 1]
        i = path.idx[h - 1]
        if i + 1 < parent.n:
            sib = <Leaf*>parent.children[i + 1]
            if lf.n + sib.n <= limit:
                self._leaf_append(lf, sib)
                path.idx[h - 1] = i + 1
                self._remove_leaf(sib, path)
                return
        if i > 0:
            sib = <Leaf*>parent.children[i - 1]
            if sib.n + lf.n <= limit:
                self._leaf_append(sib, lf)
                self._remove_leaf(lf, path)

    cdef void _insert_run(self, uint64_t s, uint64_t e, uint64_t v) noexcept nogil:
        """Insert a run that overlaps and touches no stored run (nodes were reserved)."""
        cdef Path path
        cdef Leaf *lf = self._descend(s, &path)
        cdef Leaf *r
        cdef Leaf *t
        cdef Inner *nr
        cdef int i = _lb(lf.starts, lf.n, s)
        cdef int at, j, n
        cdef uint64_t u0
        cdef bint uniform
        if lf.n < self.leaf_cap:
            memmove(&lf.starts[i + 1], &lf.starts[i], (lf.n - i) * sizeof(uint64_t))
            memmove(&lf.ends[i + 1], &lf.ends[i], (lf.n - i) * sizeof(uint64_t))
            if lf.vals != NULL:
                memmove(&lf.vals[i + 1], &lf.vals[i], (lf.n - i) * sizeof(uint64_t))
            lf.n += 1
            self._leaf_write(lf, i, s, e, v)
            self.count += 1
            if i == 0 and self.height > 0:
                self._fix_min(&path, self.height - 1, s)
            return
        # Split a full leaf; an append at the right edge keeps the left leaf full.
        n = lf.n
        at = n if (i == n and lf.next == NULL) else n // 2
        r = self._take_leaf()
        r.n = n - at
        memcpy(&r.starts[0], &lf.starts[at], r.n * sizeof(uint64_t))
        memcpy(&r.ends[0], &lf.ends[at], r.n * sizeof(uint64_t))
        if lf.vals != NULL:
            uniform = True
            u0 = lf.vals[at] if r.n > 0 else 0
            for j in range(at, n):
                if lf.vals[j] != u0:
                    uniform = False
                    break
            if uniform:
                r.uval = u0
            else:
                r.vals = self._take_vals()
                memcpy(&r.vals[0], &lf.vals[at], r.n * sizeof(uint64_t))
        else:
            r.uval = lf.uval
        lf.n = at
        self._leaf_shrink_vals(lf)
        r.prev = lf
        r.next = lf.next
        if lf.next != NULL:
            lf.next.prev = r
        lf.next = r
        if i < at:
            t = lf
        else:
            t = r
            i -= at
        memmove(&t.starts[i + 1], &t.starts[i], (t.n - i) * sizeof(uint64_t))
        memmove(&t.ends[i + 1], &t.ends[i], (t.n - i) * sizeof(uint64_t))
        if t.vals != NULL:
            memmove(&t.vals[i + 1], &t.vals[i], (t.n - i) * sizeof(uint64_t))
        t.n += 1
        self._leaf_write(t, i, s, e, v)
        self.count += 1
        if t == lf and i == 0 and self.height > 0:
            self._fix_min(&path, self.height - 1, s)
        if self.height == 0:
            nr = self._take_inner()
            nr.n = 2
            nr.keys[0] = lf.starts[0]
            nr.children[0] = <void*>lf
            nr.keys[1] = r.starts[0]
            nr.children[1] = <void*>r
            self.root = <void*>nr
            self.height = 1
        else:
            self._insert_child(&path, self.height - 1, r.starts[0], <void*>r)

    cdef void _erase_starts(self, uint64_t lo, uint64_t hi) noexcept nogil:
        """Remove every run whose start lies in ``[lo, hi]`` (inclusive), leaf by leaf."""
        cdef Path path
        cdef Leaf *lf
        cdef int a, b, k, n
        while True:
            lf = self._descend(lo, &path)
            a = _lb(lf.starts, lf.n, lo)
            if a == lf.n:
                if lf.next == NULL or lf.next.starts[0] > hi:
                    return
                lf = self._descend(lf.next.starts[0], &path)
                a = 0
            b = _ub(lf.starts, lf.n, hi)
            if b <= a:
                return
            n = lf.n
            k = b - a
            memmove(&lf.starts[a], &lf.starts[b], (n - b) * sizeof(uint64_t))
            memmove(&lf.ends[a], &lf.ends[b], (n - b) * sizeof(uint64_t))
            if lf.vals != NULL:
                memmove(&lf.vals[a], &lf.vals[b], (n - b) * sizeof(uint64_t))
            lf.n = n - k
            self.count -= k
            if lf.n == 0:
                if self.height > 0:
                    self._remove_leaf(lf, &path)
            else:
                if a == 0 and self.height > 0:
                    self._fix_min(&path, self.height - 1, lf.starts[0])
                self._rebalance_leaf(lf, &path)
            if b < n:
                return

    cdef int _assign_slow(self, uint64_t s, uint64_t e, uint64_t v) except -1 nogil:
        """General assign: the affected runs span leaves, or the result does not fit."""
        cdef Path path
        cdef Leaf *lf
        cdef int a, b, m, j
        cdef bint have = False
        cdef Run f, g
        cdef Run rep[3]
        # f: the first run with end >= s (it may be the last run of the previous leaf)
        lf = self._descend(s, &path)
        a = _lb(lf.ends, lf.n, s)
        if a == 0 and lf.prev != NULL and lf.prev.ends[lf.prev.n - 1] >= s:
            f = _mkrun(lf.prev.starts[lf.prev.n - 1], lf.prev.ends[lf.prev.n - 1],
                       _val(lf.prev, lf.prev.n - 1))
            have = True
        elif a < lf.n:
            f = _mkrun(lf.starts[a], lf.ends[a], _val(lf, a))
            have = True
        elif lf.next != NULL:
            f = _mkrun(lf.next.starts[0], lf.next.ends[0], _val(lf.next, 0))
            have = True
        if have and f.start > e:
            have = False
        if have:
            # g: the last run with start <= e (exists, since f.start <= e)
            lf = self._descend(e, &path)
            b = _ub(lf.starts, lf.n, e) - 1
            g = _mkrun(lf.starts[b], lf.ends[b], _val(lf, b))
        m = _make_reps(have, f, g, s, e, v, self.dflt, rep)
        if have:
            self._erase_starts(f.start, g.start)
        for j in range(m):
            self._insert_run(rep[j].start, rep[j].end, rep[j].value)
        return 0

    cdef int _assign_c(self, uint64_t s, uint64_t e, uint64_t v) except -1 nogil:
        """Set every key of ``[s, e)`` to ``v``; trusts ``s <= e``.

        The leaf comes through the finger. The path to it is needed only where inner nodes
        change (a new first start, a leaf emptied or underfull); then a descent by ``s`` lands
        in the same leaf, because no inner key has changed yet.
        """
        cdef Path path
        cdef Leaf *lf
        cdef int a, b, k, m, n, j, delta
        cdef uint64_t first
        cdef bint pathed
        cdef Run rep[3]
        self.version += 1
        if s >= e:
            return 0
        self._reserve()
        lf = _finger_leaf(self, s) if self.fingered else NULL
        pathed = lf == NULL
        if pathed:
            lf = self._descend(s, &path)
            if self.fingered:
                pkvm_store_ptr(&self.finger, <void*>lf)
        n = lf.n
        first = lf.starts[0] if n > 0 else 0
        a = _lb(lf.ends, n, s)            # first run with end >= s
        b = _ub(lf.starts, n, e)          # runs with start <= e
        # A touching or overlapping neighbour in another leaf sends us to the general path.
        if _crosses_leaf(lf, a, b, s, e, v):
            return self._assign_slow(s, e, v)
        k = b - a
        m = _leaf_reps(lf, a, b, s, e, v, self.dflt, rep)
        if _reps_stored(lf, a, b, rep, m):
            return 0  # nothing changes when the replacement is what is already stored
        delta = m - k
        if n + delta > self.leaf_cap:
            # Drop the replaced runs here (the leaf stays well filled), then insert with splits.
            memmove(&lf.starts[a], &lf.starts[b], (n - b) * sizeof(uint64_t))
            memmove(&lf.ends[a], &lf.ends[b], (n - b) * sizeof(uint64_t))
            if lf.vals != NULL:
                memmove(&lf.vals[a], &lf.vals[b], (n - b) * sizeof(uint64_t))
            lf.n = n - k
            self.count -= k
            if a == 0 and self.height > 0 and lf.starts[0] != first:
                if not pathed:
                    self._descend(s, &path)
                self._fix_min(&path, self.height - 1, lf.starts[0])
            for j in range(m):
                self._insert_run(rep[j].start, rep[j].end, rep[j].value)
            return 0
        _leaf_replace(self, lf, a, b, rep, m)
        if self.height == 0:
            return 0
        if lf.n == 0:
            if not pathed:
                self._descend(s, &path)
            self._remove_leaf(lf, &path)
            return 0
        if a == 0 and lf.starts[0] != first:
            if not pathed:
                self._descend(s, &path)
                pathed = True
            self._fix_min(&path, self.height - 1, lf.starts[0])
        if delta < 0 and lf.n < (self.leaf_cap >> 2):
            if not pathed:
                self._descend(s, &path)
            self._rebalance_leaf(lf, &path)
        return 0

    # -- queries -------------------------------------------------------------------------------

    cdef uint64_t _get_c(self, uint64_t key) noexcept nogil:
        cdef Leaf *lf = _leaf_at(self, key)
        cdef int i = _ub(lf.starts, lf.n, key) - 1
        if i >= 0 and key < lf.ends[i]:
            return _val(lf, i)
        return self.dflt

    cdef Run _run_at_c(self, uint64_t key) noexcept nogil:
        """The maximal run containing ``key`` (gaps are runs of the default); key < U64_MAX."""
        cdef Leaf *lf = _leaf_at(self, key)
        return _leaf_run(self, lf, _ub(lf.starts, lf.n, key) - 1, key)

    cdef Run _next_run_c(self, uint64_t key) noexcept nogil:
        """The first stored run with ``end > key``; ``start == end == U64_MAX`` if none."""
        cdef Leaf *lf = _leaf_at(self, key)
        cdef int i = _ub(lf.ends, lf.n, key)
        if i < lf.n:
            return _mkrun(lf.starts[i], lf.ends[i], _val(lf, i))
        if lf.next != NULL:
            return _mkrun(lf.next.starts[0], lf.next.ends[0], _val(lf.next, 0))
        return _mkrun(U64_MAX, U64_MAX, self.dflt)

    cdef int _find_ne_c(self, uint64_t s, uint64_t e, uint64_t v,
                        uint64_t *found) noexcept nogil:
        """Set ``found`` to the first key of ``[s, e)`` whose value is not ``v``; 1 if any.

        O(log n): runs are coalesced, so a non-default ``v`` must be one stored run covering
        the whole range, and a default ``v`` fails at the first stored run in the range.
        """
        cdef Run r
        if s >= e:
            return 0
        if v == self.dflt:
            r = self._next_run_c(s)
            if r.start < e:
                found[0] = r.start if r.start > s else s
                return 1
            return 0
        r = self._run_at_c(s)
        if r.value != v:
            found[0] = s
            return 1
        if r.end >= e:
            return 0
        found[0] = r.end
        return 1

    cdef void _get_sorted(self, const uint64_t *K, uint64_t *O, Py_ssize_t n) noexcept nogil:
        """Keys mostly ascending: ``O[i] = get(K[i])`` (see ``_get_walk``)."""
        self._get_walk(K, 0, 0, O, n)

    cdef void _get_walk(self, const uint64_t *K, int shift, uint64_t mask, uint64_t *O,
                        Py_ssize_t n) noexcept nogil:
        """Answer the keys ``K[i] >> shift``, mostly ascending, in one walk over the leaves.

        Stay in a leaf while the keys belong to it (a finger); within a leaf the run index only
        moves forward for ascending keys, so it is advanced by a short scan instead of a fresh
        search. The answer goes to ``O[K[i] & mask]`` if ``mask`` (packed words from
        ``_radix_sort_packed``) and to ``O[i]`` otherwise.
        """
        cdef Path path
        cdef Leaf *lf = NULL
        cdef uint64_t hi = 0, lo = 0, k
        cdef Py_ssize_t i
        cdef int j = -1
        for i in range(n):
            k = K[i] >> shift
            if lf == NULL or k >= hi or k < lo:
                lf = self._descend(k, &path)
                lo = lf.starts[0] if lf.prev != NULL and lf.n > 0 else 0
                hi = lf.next.starts[0] if lf.next != NULL else U64_MAX
                j = _ub(lf.starts, lf.n, k) - 1
            elif j >= 0 and k < lf.starts[j]:
                j = _ub(lf.starts, lf.n, k) - 1
            else:
                while j + 1 < lf.n and lf.starts[j + 1] <= k:
                    j += 1
            O[K[i] & mask if mask else i] = _val(lf, j) if j >= 0 and k < lf.ends[j] else self.dflt

    # -- bulk merge and bulk load ----------------------------------------------------------

    cdef int _merge_runs(self, const uint64_t *S, const uint64_t *E, const uint64_t *V,
                         Py_ssize_t m, Builder *out) noexcept nogil:
        """Stream the stored runs merged with ranges sorted stably by start into ``out``.

        The ranges must be pairwise disjoint or identical (``_disjoint_in_order``); of identical
        ranges the last wins, as in array order. Input overrides stored runs where
        they overlap; ``out`` coalesces and drops the default. O(len(self) + m); -1 on ENOMEM.
        """
        cdef Cursor c
        cdef uint64_t s, e, v
        cdef Py_ssize_t j
        c.lf = self.first_leaf
        c.i = 0
        _cur_load(&c)
        for j in range(m):
            s = S[j]
            e = E[j]
            v = V[j]
            if s >= e:
                continue
            if j + 1 < m and S[j + 1] == s and E[j + 1] == e:
                continue            # an identical later range overrides this one
            # stored runs before s, and the head of one that reaches into [s, e)
            while c.have and c.r.start < s:
                if _b_emit(out, c.r.start, c.r.end if c.r.end < s else s, c.r.value) < 0:
                    return -1
                if c.r.end > s:
                    c.r.start = s
                    break
                _cur_next(&c)
            # stored runs covered by [s, e); a run reaching past e keeps its tail
            while c.have and c.r.start < e:
                if c.r.end > e:
                    c.r.start = e
                    break
                _cur_next(&c)
            if _b_emit(out, s, e, v) < 0:
                return -1
        while c.have:
            if _b_emit(out, c.r.start, c.r.end, c.r.value) < 0:
                return -1
            _cur_next(&c)
        return 0

    cdef int _adopt(self, Builder *b) except -1 nogil:
        """Build inner levels over a builder's leaves and swap the result in for the tree.

        Everything is allocated before the old tree is freed, so a ``MemoryError`` (raised
        here, after freeing the builder) leaves the map exactly as it was.
        """
        cdef void **level = b.leaves
        cdef Py_ssize_t nlevel = b.n, nnext, per, extra, pos, i, j, c
        cdef Py_ssize_t made_inner = 0
        cdef Inner *nd
        cdef int height = 0, icap = self.inner_cap
        self.version += 1
        _drop_finger(self)
        while nlevel > 1:
            nnext = (nlevel + icap - 1) // icap
            per = nlevel // nnext
            extra = nlevel % nnext
            pos = 0
            for i in range(nnext):
                nd = _inner_alloc()
                if nd == NULL:
                    # level[0:i] hold this level's new nodes (owning level[0:pos]'s old
                    # entries); level[pos:nlevel] are subtrees not adopted yet.
                    _free_nodes(level, 0, i, height + 1)
                    _free_nodes(level, pos, nlevel, height)
                    free(level)
                    b.leaves = NULL
                    b.n = 0
                    with gil:
                        raise MemoryError("RangeMap: out of memory building the tree")
                c = per + (1 if i < extra else 0)
                nd.n = <int>c
                for j in range(c):
                    nd.children[j] = level[pos + j]
                    nd.keys[j] = _subtree_min(level[pos + j], height)
                pos += c
                level[i] = <void*>nd
                made_inner += 1
            nlevel = nnext
            height += 1
        self._free_subtree(self.root, self.height)
        self.root = level[0]
        self.height = height
        self.first_leaf = <Leaf*>self.root
        while height > 0:
            self.first_leaf = <Leaf*>(<Inner*>self.first_leaf).children[0]
            height -= 1
        self.count = b.runs
        self.n_leaves += b.n
        self.n_inner += made_inner
        self.n_vals += b.vals
        free(level)
        b.leaves = NULL
        b.n = 0
        return 0

    cdef int _bulk_load(self, const uint64_t *S, const uint64_t *E, const uint64_t *V,
                        Py_ssize_t n) except -1 nogil:
        """Replace the tree by one holding the sorted, disjoint runs ``S/E/V``, packed full."""
        cdef Builder b
        cdef Py_ssize_t i
        _b_init(&b, self.leaf_cap, self.dflt)
        for i in range(n):
            if _b_emit(&b, S[i], E[i], V[i]) < 0:
                break
        else:
            if _b_finish(&b) == 0:
                return self._adopt(&b)
        _b_free(&b)
        with gil:
            raise MemoryError("RangeMap: out of memory building the tree")

    cdef int _assign_merged(self, const uint64_t *S, const uint64_t *E, const uint64_t *V,
                            Py_ssize_t m) except -1 nogil:
        """assign_many's merge path: one pass over stored runs and ranges into a fresh tree."""
        cdef Builder b
        _b_init(&b, self.leaf_cap, self.dflt)
        if self._merge_runs(S, E, V, m, &b) == 0 and _b_finish(&b) == 0:
            return self._adopt(&b)
        _b_free(&b)
        with gil:
            raise MemoryError("RangeMap.assign_many: out of memory")

    # -- Python API ----------------------------------------------------------------------------

    @property
    def default(self):
        """The value of every key not covered by a stored run."""
        return self.dflt

    @property
    def nbytes(self):
        """Bytes of C memory owned by the map: nodes, value arrays and the spare-node pools."""
        return ((self.n_leaves + self.n_pool_leaves) * sizeof(Leaf)
                + (self.n_inner + self.n_pool_inner) * sizeof(Inner)
                + (self.n_vals + self.n_pool_vals) * LEAF_CAP * sizeof(uint64_t))

    def __len__(self):
        return self.count

    def __repr__(self):
        return f"RangeMap(default={self.dflt}, runs={self.count})"

    def _depth(self):
        """Test hook: the tree's height counting the leaf level (1 = a single leaf)."""
        return self.height + 1

    def _finger_window(self):
        """Test hook: the keys ``[lo, hi)`` whose descent lands in the finger's leaf, or None
        when the finger is dropped (``hi`` is ``2**64 - 1`` for the last leaf). The finger
        answers those up to the leaf's last run end without a descent."""
        cdef Leaf *lf = <Leaf*>pkvm_load_ptr(&self.finger)
        if lf == NULL:
            return None
        return (lf.starts[0] if lf.prev != NULL else 0,
                lf.next.starts[0] if lf.next != NULL else U64_MAX)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def assign(self, start, end, value):
        """Set every key in the half-open ``[start, end)`` to ``value``.

        Neighbouring runs with the same value merge; assigning ``default`` deletes.
        ``start == end`` is a no-op.

        Runtime complexity: O(log n + k) for k runs replaced.

        Raises:
            TypeError: an argument is not an integer.
            OverflowError: an argument is negative or above ``2**64 - 1``.
            ValueError: ``start > end``.
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of the VM it belongs to
        _enter_write(self)
        cdef uint64_t s, e, v
        _u64(start, "start", &s)
        _u64(end, "end", &e)
        _u64(value, "value", &v)
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        self._assign_c(s, e, v)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get(self, key):
        """The value of ``key``. Runtime complexity: O(log n)."""
        _enter_read(self)
        cdef uint64_t k
        _u64(key, "key", &k)
        return self._get_c(k)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def find_ne(self, start, end, value):
        """The first key in the half-open ``[start, end)`` whose value is not ``value``, or -1.

        This is ``kvm_range_has_memory_attributes`` turned into a search: the range has the
        value everywhere iff the result is -1. Runtime complexity: O(log n).
        """
        _enter_read(self)
        cdef uint64_t s, e, v, found
        _u64(start, "start", &s)
        _u64(end, "end", &e)
        _u64(value, "value", &v)
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        if self._find_ne_c(s, e, v, &found):
            return found
        return -1

    def run_at(self, key):
        """The maximal run ``(start, end, value)`` containing ``key`` (half-open).

        Gaps between stored runs are runs of ``default``. ``key`` must be below ``2**64 - 1``.
        Runtime complexity: O(log n).
        """
        _enter_read(self)
        cdef uint64_t k
        cdef Run r
        _u64(key, "key", &k)
        if k == U64_MAX:
            raise OverflowError(f"key out of range for run_at: {k:#x} (must be < 2**64 - 1)")
        r = self._run_at_c(k)
        return (r.start, r.end, r.value)

    def ranges(self, start=0, end=None):
        """The stored runs intersecting the half-open ``[start, end)``, clipped, in key order.

        ``end=None`` means ``2**64 - 1``. Runtime complexity: O(log n + k).
        """
        _enter_read(self)
        cdef uint64_t s, e, cur
        cdef Path path
        cdef Leaf *lf
        cdef int i
        _u64(start, "start", &s)
        if end is None:
            e = U64_MAX
        else:
            _u64(end, "end", &e)
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        out = []
        if s == e:
            return out
        lf = self._descend(s, &path)
        i = _ub(lf.ends, lf.n, s)
        while lf != NULL:
            while i < lf.n:
                if lf.starts[i] >= e:
                    return out
                out.append((lf.starts[i] if lf.starts[i] > s else s,
                            lf.ends[i] if lf.ends[i] < e else e,
                            _val(lf, i)))
                i += 1
            lf = lf.next
            i = 0
        return out

    def iter_ranges(self, start=0, end=None):
        """Lazily yield what :meth:`ranges` returns.

        Each step looks the next run up afresh, so modifying the map while iterating is safe
        (the iteration sees the live map).
        """
        cdef uint64_t s, e, cur
        cdef Run r
        _u64(start, "start", &s)
        if end is None:
            e = U64_MAX
        else:
            _u64(end, "end", &e)
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        return self._iter(s, e)

    def _iter(self, uint64_t s, uint64_t e):
        cdef uint64_t cur = s
        cdef Run r
        while cur < e:
            _enter_read(self)
            r = self._next_run_c(cur)
            if r.start >= e:
                return
            yield (r.start if r.start > cur else cur, r.end if r.end < e else e, r.value)
            cur = r.end

    def assign_many(self, starts, ends, values):
        """``assign(starts[i], ends[i], values[i])`` for every ``i``, in array order.

        Later entries win. ``values`` may be a scalar. Every entry is validated before anything
        changes; the loop runs without the GIL.

        Raises:
            TypeError, OverflowError, ValueError: as :meth:`assign`, naming the array and index;
            ValueError also for arrays that are not 1-D or differ in length.
        """
        if self._owner is not None:
            _refuse_nested(self._owner)
        cdef uint64_t sv
        cdef const uint64_t[::1] S
        cdef const uint64_t[::1] E
        cdef const uint64_t[::1] V
        cdef Py_ssize_t i, n
        s_arr = _u64_array(starts, "starts")
        e_arr = _u64_array(ends, "ends")
        if np.ndim(values) == 0:
            _u64(values, "values", &sv)
            v_arr = np.full(s_arr.shape[0], sv, dtype=np.uint64)
        else:
            v_arr = _u64_array(values, "values")
        n = s_arr.shape[0]
        if e_arr.shape[0] != n or v_arr.shape[0] != n:
            raise ValueError("starts, ends and values must have the same length "
                             f"({n}, {e_arr.shape[0]}, {v_arr.shape[0]})")
        if n:
            S = s_arr
            E = e_arr
            V = v_arr
            rangemap_assign_array(self, &S[0], &E[0], &V[0], n)

    def get_many(self, keys):
        """The values of ``keys`` as a numpy ``uint64`` array (runs without the GIL).

        Sorted keys are answered in one pass over the leaves. Unsorted keys are sorted once
        (radix, O(n)), answered in key order and scattered back.
        """
        cdef const uint64_t[::1] K
        cdef uint64_t[::1] O
        cdef Py_ssize_t n
        k_arr = _u64_array(keys, "keys")
        n = k_arr.shape[0]
        out = np.empty(n, dtype=np.uint64)
        if n == 0:
            return out
        K = k_arr
        O = out
        rangemap_get_array(self, &K[0], &O[0], n)
        return out

    def clear(self):
        """Remove every run (all keys read ``default`` again) and release the nodes."""
        if self._owner is not None:
            _refuse_nested(self._owner)
        _enter_write(self)
        self._refill()      # _reset takes the new root leaf from the pool
        self._reset()
        self._trim_pools()

    def _trim_pools(self):
        cdef Leaf *lf
        cdef Inner *nd
        cdef uint64_t *v
        while self.n_pool_leaves > 4:
            lf = self.pool_leaves
            self.pool_leaves = lf.next
            self.n_pool_leaves -= 1
            _node_free(lf)
        while self.n_pool_inner > 3 * self.height + 8:
            nd = self.pool_inner
            self.pool_inner = <Inner*>nd.children[0]
            self.n_pool_inner -= 1
            _node_free(nd)
        while self.n_pool_vals > 16:
            v = self.pool_vals
            self.pool_vals = <uint64_t*><size_t>v[0]
            self.n_pool_vals -= 1
            _vals_free(v)

    def copy(self):
        """An independent map with the same default and runs, densely packed. O(n)."""
        _enter_read(self)
        cdef RangeMap other = RangeMap.__new__(RangeMap, self.dflt, _fanout=self.leaf_cap,
                                                    _finger=self.fingered)
        cdef const uint64_t[::1] S
        cdef const uint64_t[::1] E
        cdef const uint64_t[::1] V
        if self.count == 0:
            return other
        s, e, v = self._runs_arrays()
        S = s
        E = e
        V = v
        with nogil:
            other._bulk_load(&S[0], &E[0], &V[0], S.shape[0])
        return other

    def _runs_arrays(self):
        _enter_read(self)
        cdef Py_ssize_t n = self.count, k = 0
        cdef Leaf *lf = self.first_leaf
        cdef int i
        s = np.empty(n, dtype=np.uint64)
        e = np.empty(n, dtype=np.uint64)
        v = np.empty(n, dtype=np.uint64)
        cdef uint64_t[::1] S = s
        cdef uint64_t[::1] E = e
        cdef uint64_t[::1] V = v
        while lf != NULL:
            for i in range(lf.n):
                S[k] = lf.starts[i]
                E[k] = lf.ends[i]
                V[k] = _val(lf, i)
                k += 1
            lf = lf.next
        return s, e, v

    def __reduce__(self):
        s, e, v = self._runs_arrays()
        return (_rangemap_from_runs, (self.dflt, s, e, v, self.fingered))

    def __eq__(self, other):
        cdef RangeMap o
        cdef Leaf *a
        cdef Leaf *b
        cdef int i = 0, j = 0
        if not isinstance(other, RangeMap):
            return NotImplemented
        o = <RangeMap>other
        _enter_read(self)
        _enter_read(o)
        if o.dflt != self.dflt or o.count != self.count:
            return False
        a = self.first_leaf
        b = o.first_leaf
        while True:
            while a != NULL and i >= a.n:
                a = a.next
                i = 0
            while b != NULL and j >= b.n:
                b = b.next
                j = 0
            if a == NULL or b == NULL:
                return a == NULL and b == NULL
            if (a.starts[i] != b.starts[j] or a.ends[i] != b.ends[j]
                    or _val(a, i) != _val(b, j)):
                return False
            i += 1
            j += 1

    __hash__ = None

    def _check(self):
        """Assert every structural invariant (see ``_core.pxd``); raise ``AssertionError``."""
        _enter_read(self)
        cdef Py_ssize_t runs = 0, leaves = 0, nvals = 0
        cdef Leaf *lf = self.first_leaf
        cdef Leaf *prev = NULL
        cdef int i
        cdef bint have_last = False, finger_seen = self.finger == NULL
        cdef uint64_t last_end = 0, last_val = 0, v
        if self.height == 0:
            assert self.root == <void*>self.first_leaf, "root leaf is not the first leaf"
        inner = self._check_node(self.root, self.height, True)
        while lf != NULL:
            assert lf.prev == prev, f"leaf {leaves}: broken prev link"
            assert lf.n > 0 or (self.height == 0 and leaves == 0), f"leaf {leaves} is empty"
            assert lf.n <= self.leaf_cap, f"leaf {leaves} overfull ({lf.n})"
            finger_seen = finger_seen or self.finger == <void*>lf
            if lf.vals != NULL:
                nvals += 1
            for i in range(lf.n):
                v = _val(lf, i)
                assert lf.starts[i] < lf.ends[i], (
                    f"empty or inverted run [{lf.starts[i]:#x}, {lf.ends[i]:#x})")
                assert v != self.dflt, (
                    f"run [{lf.starts[i]:#x}, {lf.ends[i]:#x}) stores the default {v}")
                if have_last:
                    assert last_end <= lf.starts[i], (
                        f"run [{lf.starts[i]:#x}, {lf.ends[i]:#x}) overlaps the previous run "
                        f"ending at {last_end:#x}")
                    assert not (last_end == lf.starts[i] and last_val == v), (
                        f"run [{lf.starts[i]:#x}, {lf.ends[i]:#x}) not coalesced with its "
                        f"left neighbour (value {v})")
                have_last = True
                last_end = lf.ends[i]
                last_val = v
                runs += 1
            leaves += 1
            prev = lf
            lf = lf.next
        assert finger_seen, "the descent finger is not a leaf of the tree"
        assert runs == self.count, f"count {self.count} != {runs} runs in the leaves"
        assert leaves == self.n_leaves, f"n_leaves {self.n_leaves} != {leaves} linked leaves"
        assert inner == self.n_inner, f"n_inner {self.n_inner} != {inner} inner nodes"
        assert nvals == self.n_vals, f"n_vals {self.n_vals} != {nvals} value arrays"

    cdef Py_ssize_t _check_node(self, void *node, int height, bint is_root) except -1:
        """Check one subtree (keys are exact minima); return its number of inner nodes."""
        cdef Inner *nd
        cdef Py_ssize_t inner = 1
        cdef int i
        if height == 0:
            return 0
        nd = <Inner*>node
        assert 1 <= nd.n <= self.inner_cap, f"inner node with {nd.n} children"
        assert not is_root or nd.n >= 2, "inner root with a single child"
        for i in range(nd.n):
            assert nd.keys[i] == _subtree_min(nd.children[i], height - 1), (
                f"inner key {nd.keys[i]:#x} is not the minimum of child {i}")
            if i > 0:
                assert nd.keys[i - 1] < nd.keys[i], "inner keys not ascending"
            inner += self._check_node(nd.children[i], height - 1, False)
        return inner

    cdef int _assign1_c(self, uint64_t s, uint64_t v) except -1 nogil:
        """``_assign_c(s, s + 1, v)`` for one key ``s < 2**64 - 1``, with one scan of the leaf.

        The leaf and the runs the write replaces are those ``_assign_c`` finds (the runs
        touching ``[s, s + 1)`` follow from the last run starting at or before ``s``), and the
        cases ``_assign_c`` finishes inside that leaf are finished here with its steps (the
        same replacement runs written at the same slots in the same order), so the tree, its
        value arrays and its pools end as ``_assign_c`` leaves them. Every other case (a
        touching neighbour in another leaf, a leaf that would overflow, a new first start, an
        emptied or underfull leaf) is ``_assign_c`` itself.
        """
        cdef Leaf *lf
        self._reserve()
        lf = _leaf_at(self, s)
        return _assign1_in(self, lf, _ub(lf.starts, lf.n, s) - 1, s, v)  # (the last run starting at or before s)

    cdef Run _run_pos_c(self, uint64_t key, RunPos *pos) noexcept nogil:
        """``_run_at_c(key)``, and in ``pos`` where the lookup landed, so that a write of a
        range in that run right after it (:meth:`_put_c`) needs no second descent."""
        cdef Leaf *lf = _leaf_at(self, key)
        cdef int i = _ub(lf.starts, lf.n, key) - 1
        cdef int j = i if i > 0 else 0
        pos.leaf = <void*>lf
        pos.index = i
        pos.version = self.version
        if lf.vals != NULL and j < lf.n:
            # A write of a new run after run i (_put_c) shifts the values after it: ask for
            # their lines now, so that they arrive while the caller works (the search has
            # read the starts' lines and the descent asked for the ends').
            pkvm_prefetch_lines(&lf.vals[j], (lf.n - j) * sizeof(uint64_t))
        return _leaf_run(self, lf, i, key)

    cdef int _put_c(self, const RunPos *pos, uint64_t s, uint64_t e, uint64_t v) except -1 nogil:
        """``_assign_c(s, e, v)`` after :meth:`_run_pos_c` filled ``pos``; trusts ``s <= e``.

        While the map is unchanged since and ``[s, e)`` lies in a gap of ``pos``'s leaf after
        its first run (the fault path's case: a page written where nothing was stored), the
        run is written there at once: inserted, or merged into an equal neighbour that
        touches it. The result is the one ``_assign_c`` gives (the same runs, value arrays
        and spare-node pools); every other case (a stored run there, a full leaf, a neighbour
        in another leaf, a leaf that would be rebalanced) is ``_assign_c``'s."""
        cdef Leaf *lf = <Leaf*>pos.leaf
        cdef int i = pos.index, j = pos.index + 1, n
        cdef bint left, right
        if lf == NULL or pos.version != self.version or i < 0 or s >= e:
            return self._assign_c(s, e, v)
        n = lf.n
        # [s, e) in the gap between run i and run j (the next leaf's first run when j == n)
        if i >= n or lf.starts[i] > s or lf.ends[i] > s:
            return self._assign_c(s, e, v)
        if j < n:
            if lf.starts[j] < e:
                return self._assign_c(s, e, v)
        elif lf.next != NULL and lf.next.starts[0] <= e:
            return self._assign_c(s, e, v)
        left = v != self.dflt and lf.ends[i] == s and _val(lf, i) == v
        right = v != self.dflt and j < n and lf.starts[j] == e and _val(lf, j) == v
        if ((left and right and n - 1 < (self.leaf_cap >> 2) and self.height > 0)
                or (not left and not right and v != self.dflt and n >= self.leaf_cap)):
            return self._assign_c(s, e, v)  # (the leaf is rebalanced, or split)
        self.version += 1
        self._reserve()
        if v == self.dflt:
            return 0  # the gap already holds the default
        if left and right:
            lf.ends[i] = lf.ends[j]
            if n - j - 1 > 0:
                memmove(&lf.starts[j], &lf.starts[j + 1], (n - j - 1) * sizeof(uint64_t))
                memmove(&lf.ends[j], &lf.ends[j + 1], (n - j - 1) * sizeof(uint64_t))
                if lf.vals != NULL:
                    memmove(&lf.vals[j], &lf.vals[j + 1], (n - j - 1) * sizeof(uint64_t))
            lf.n = n - 1
            self.count -= 1
        elif left:
            lf.ends[i] = e
        elif right:
            lf.starts[j] = s
        else:
            if n > j:  # (an append at the leaf's end moves nothing)
                memmove(&lf.starts[j + 1], &lf.starts[j], (n - j) * sizeof(uint64_t))
                memmove(&lf.ends[j + 1], &lf.ends[j], (n - j) * sizeof(uint64_t))
                if lf.vals != NULL:
                    memmove(&lf.vals[j + 1], &lf.vals[j], (n - j) * sizeof(uint64_t))
            lf.n = n + 1
            self._leaf_write(lf, j, s, e, v)
            self.count += 1
        return 0


# The per-op entries of assign, find_ne and get (see pkvm_fastcall_override): a W3 step is two
# of these calls, and Cython's generated parser (keywords, argument references) cost about
# 6 ns a call over a plain METH_FASTCALL function. The checks and their order are the
# generated methods': the map's bulk-call guard, then start, end, value (or key), then
# start <= end.

cdef object _call_general(object method, object self, PyObject **args, Py_ssize_t nargs,
                          PyObject *kwnames):
    """Call the generated method (``method``, a descriptor) with the vectorcall arguments."""
    cdef Py_ssize_t i
    pos = [self]
    for i in range(nargs):
        pos.append(<object>args[i])
    kw = {}
    if kwnames != NULL:
        names = <tuple><object>kwnames
        for i in range(len(names)):
            kw[names[i]] = <object>args[nargs + i]
    return method(*pos, **kw)


cdef inline int _range_args(PyObject **args, uint64_t *s, uint64_t *e, uint64_t *v) except -1:
    """The three positional ints of ``assign`` / ``find_ne`` read into ``s, e, v`` (the small
    exact ints without a C-API call, the rest through ``_u64``'s checks and messages), ``s <= e``
    checked; returns 1 when ``start`` was a small exact int (its object can serve as a result)."""
    cdef bint start_is_int = pkvm_small_u64p(args[0], s)
    if not start_is_int:
        _u64(<object>args[0], "start", s)
    if not pkvm_small_u64p(args[1], e):
        _u64(<object>args[1], "end", e)
    if not pkvm_small_u64p(args[2], v):
        _u64(<object>args[2], "value", v)
    if s[0] > e[0]:
        raise ValueError(f"start {s[0]:#x} > end {e[0]:#x}")
    return start_is_int


cdef object _assign_fast(RangeMap self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    """``RangeMap.assign(start, end, value)``."""
    cdef uint64_t s, e, v
    if kwnames != NULL or nargs != 3:
        return _call_general(_assign_general, self, args, nargs, kwnames)
    if self._owner is not None:
        _refuse_nested(self._owner)
    _enter_write(self)
    _range_args(args, &s, &e, &v)
    self._assign_c(s, e, v)
    return None


cdef object _find_ne_fast(RangeMap self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    """``RangeMap.find_ne(start, end, value)``."""
    cdef uint64_t s, e, v, found
    cdef bint start_is_int
    if kwnames != NULL or nargs != 3:
        return _call_general(_find_ne_general, self, args, nargs, kwnames)
    _enter_read(self)
    start_is_int = _range_args(args, &s, &e, &v)
    if self._find_ne_c(s, e, v, &found):
        if found == s and start_is_int:
            # The answer is often the range's first key: the caller's own int (exact, equal)
            # serves as the result without allocating a new one.
            return <object>args[0]
        return found
    return -1


cdef object _get_fast(RangeMap self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    """``RangeMap.get(key)``."""
    cdef uint64_t k
    if kwnames != NULL or nargs != 1:
        return _call_general(_get_general, self, args, nargs, kwnames)
    _enter_read(self)
    if not pkvm_small_u64p(args[0], &k):
        _u64(<object>args[0], "key", &k)
    return self._get_c(k)


cdef object _assign_general = pkvm_fastcall_override(RangeMap, 0, "assign", <void*>_assign_fast)
cdef object _find_ne_general = pkvm_fastcall_override(RangeMap, 1, "find_ne",
                                                      <void*>_find_ne_fast)
cdef object _get_general = pkvm_fastcall_override(RangeMap, 2, "get", <void*>_get_fast)


cdef inline int _enter_read(RangeMap m) except -1:
    """Refuse to read a map that another thread is changing in a GIL-free bulk call."""
    if m.bulk_writer:
        raise RuntimeError("RangeMap is being changed by assign_many in another thread")
    return 0


cdef inline int _enter_write(RangeMap m) except -1:
    """Refuse to change a map that another thread is using in a GIL-free bulk call."""
    if m.bulk_writer or m.bulk_readers:
        raise RuntimeError("RangeMap is in use by a bulk call in another thread")
    return 0


# ---------------------------------------------------------------------------------------------
# The public C API (declared in _core.pxd, re-exported by core.pxd; docs/embedding.md)
# ---------------------------------------------------------------------------------------------

cdef int _busy(RangeMap m, bint write) except -1 nogil:
    with gil:
        if write:
            return _enter_write(m)
        return _enter_read(m)


cdef int _bad_range(uint64_t s, uint64_t e) except -1 nogil:
    with gil:
        raise ValueError(f"start {s:#x} > end {e:#x}")


cdef int rangemap_assign(RangeMap m, uint64_t start, uint64_t end,
                         uint64_t value) except -1 nogil:
    """``m.assign(start, end, value)``: ValueError if ``start > end``, MemoryError; else 0."""
    if start > end:
        return _bad_range(start, end)
    if m.bulk_writer or m.bulk_readers:
        return _busy(m, True)
    return m._assign_c(start, end, value)


cdef uint64_t rangemap_get(RangeMap m, uint64_t key) noexcept nogil:
    """``m.get(key)``."""
    return m._get_c(key)


cdef int rangemap_find_ne(RangeMap m, uint64_t start, uint64_t end, uint64_t value,
                          uint64_t *found) except -1 nogil:
    """1 and ``*found`` = the first key of ``[start, end)`` not ``value``; 0 if none."""
    if start > end:
        return _bad_range(start, end)
    if m.bulk_writer:
        return _busy(m, False)
    return m._find_ne_c(start, end, value, found)


cdef int rangemap_run_at(RangeMap m, uint64_t key, Run *out) except -1 nogil:
    """``*out`` = ``m.run_at(key)`` (gaps are runs of the default); OverflowError at 2**64-1."""
    if key == U64_MAX:
        with gil:
            raise OverflowError(f"key out of range for run_at: {key:#x} (must be < 2**64 - 1)")
    if m.bulk_writer:
        return _busy(m, False)
    out[0] = m._run_at_c(key)
    return 0


cdef struct RunMemo:
    # The run a lookup read last ([lo, hi) -> value) from the map ``map`` (NULL: none yet) at
    # its ``version``: a later lookup of a key in it needs no descent while the map is unchanged.
    void *map
    uint64_t version, lo, hi, value


cdef inline int _memo_get(RunMemo *c, RangeMap m, uint64_t key, uint64_t *out) except -1:
    """``*out = m.get(key)``, from the run ``c`` remembers while ``m`` is unchanged since it
    was read, else through a lookup of the run (remembered); OverflowError at 2**64 - 1."""
    cdef Run r
    if c.map == <void*>m and c.version == m.version and c.lo <= key < c.hi:
        out[0] = c.value
        return 0
    rangemap_run_at(m, key, &r)
    c.map = <void*>m
    c.version = m.version
    c.lo = r.start
    c.hi = r.end
    c.value = out[0] = r.value
    return 0


cdef uint64_t rangemap_default(RangeMap m) noexcept nogil:
    return m.dflt


cdef Py_ssize_t rangemap_count(RangeMap m) noexcept nogil:
    return m.count


cdef inline int _cursor_load(RangeMap m, RunCursor *c, uint64_t lo) noexcept nogil:
    """Point ``c`` at (leaf, index) or past it; 1 if a run of the window is there."""
    cdef Leaf *lf = <Leaf*>c.leaf
    cdef int i = c.index
    while lf != NULL and i >= lf.n:
        lf = lf.next
        i = 0
    if lf == NULL or lf.starts[i] >= c.stop:
        c.leaf = NULL
        return 0
    c.leaf = lf
    c.index = i
    c.start = lf.starts[i] if lf.starts[i] > lo else lo
    c.end = lf.ends[i] if lf.ends[i] < c.stop else c.stop
    c.value = _val(lf, i)
    return 1


cdef int _cursor_seek(RangeMap m, RunCursor *c, uint64_t lo) noexcept nogil:
    cdef Leaf *lf = _leaf_at(m, lo)
    c.version = m.version
    c.leaf = lf
    c.index = _ub(lf.ends, lf.n, lo)
    return _cursor_load(m, c, lo)


cdef int rangemap_cursor_init(RangeMap m, RunCursor *cur, uint64_t start,
                              uint64_t end) except -1 nogil:
    """Start a walk over the stored runs meeting ``[start, end)``; 1 if ``cur`` holds one."""
    if start > end:
        return _bad_range(start, end)
    if m.bulk_writer:
        return _busy(m, False)
    cur.owner = <void*>m
    cur.stop = end
    cur.start = cur.end = start
    cur.value = m.dflt
    if start == end:
        cur.leaf = NULL
        cur.version = m.version
        return 0
    return _cursor_seek(m, cur, start)


cdef int rangemap_cursor_next(RangeMap m, RunCursor *cur) except -1 nogil:
    """Step to the next stored run; 1 if ``cur`` holds one, 0 once the walk is over.

    A step reads the next slot of the current leaf (or the next leaf), without a descent. If
    the map changed since the last step, the walk re-descends and continues after ``cur.end``
    in the live map.
    """
    if cur.owner != <void*>m:
        with gil:
            raise ValueError("rangemap_cursor_next: the cursor walks another RangeMap")
    if cur.leaf == NULL:
        return 0
    if m.bulk_writer:
        return _busy(m, False)
    if cur.version != m.version:
        return _cursor_seek(m, cur, cur.end) if cur.end < cur.stop else _cursor_end(cur)
    cur.index += 1
    return _cursor_load(m, cur, 0)


cdef inline int _cursor_end(RunCursor *cur) noexcept nogil:
    cur.leaf = NULL
    return 0


cdef int rangemap_assign_array(RangeMap m, const uint64_t *S, const uint64_t *E,
                               const uint64_t *V, Py_ssize_t n) except -1:
    """``assign(S[i], E[i], V[i])`` for every ``i`` in order; validated before any change."""
    cdef Py_ssize_t *P = NULL
    cdef uint64_t *SS = NULL
    cdef uint64_t *ES = NULL
    cdef uint64_t *VS = NULL
    cdef bint ordered, packed, by_value
    cdef int kbits, ibits, vbits
    cdef uint64_t mask
    cdef Py_ssize_t i
    for i in range(n):
        if S[i] > E[i]:
            raise ValueError(f"starts[{i}] {S[i]:#x} > ends[{i}] {E[i]:#x}")
    _enter_write(m)
    if n == 0:
        return 0
    m.bulk_writer = True
    try:
        if n >= 64:
            # Sort the ranges by start (stably) and gather them into sorted arrays once, so
            # that the checks and the merge below read memory in order.
            # Ranges of one length with small values (one-page toggles) carry their value in
            # the sorted word in place of their index: nothing is gathered afterwards.
            packed = _pack_widths(S, n, &kbits, &ibits)
            by_value = _by_value(S, E, V, n, kbits, &vbits)
            if not packed and not by_value:
                P = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
                SS = <uint64_t*>malloc(n * sizeof(uint64_t))
            ES = <uint64_t*>malloc(n * sizeof(uint64_t))
            VS = <uint64_t*>malloc(n * sizeof(uint64_t))
            if ((not packed and not by_value and (P == NULL or SS == NULL))
                    or ES == NULL or VS == NULL):
                raise MemoryError("RangeMap.assign_many: out of memory")
            with nogil:
                if by_value:
                    SS = _radix_sort_packed(S, n, kbits, vbits, V)
                    _unpack_by_value(SS, vbits, E[0] - S[0], ES, VS, n)
                elif packed:
                    SS = _radix_sort_packed(S, n, kbits, ibits)
                    _gather_runs(S, E, V, SS, ibits, ES, VS, n)
                else:
                    _radix_argsort(S, n, P, SS)
                    _gather(E, P, ES, n)
                    _gather(V, P, VS, n)
                ordered = _disjoint_in_order(SS, ES, n)
            if ordered and 4 * n >= m.count:
                # Many ranges: one merge pass with the stored runs, then a fresh tree.
                with nogil:
                    m._assign_merged(SS, ES, VS, n)
            elif ordered:
                # Few ranges into a big map: same result as array order (no partial
                # overlaps), and consecutive descents share their cache-hot path.
                with nogil:
                    for i in range(n):
                        m._assign_c(SS[i], ES[i], VS[i])
            else:
                with nogil:
                    for i in range(n):
                        m._assign_c(S[i], E[i], V[i])
        else:
            with nogil:
                for i in range(n):
                    m._assign_c(S[i], E[i], V[i])
    finally:
        m.bulk_writer = False
        free(P)
        free(SS)
        free(ES)
        free(VS)
    return 0


cdef int rangemap_get_array(RangeMap m, const uint64_t *K, uint64_t *O,
                            Py_ssize_t n) except -1:
    """``O[i] = get(K[i])`` for every ``i`` (runs without the GIL).

    Sorted keys are answered in one pass over the leaves. Unsorted keys are sorted once
    (radix, O(n)), answered in key order and scattered back.
    """
    cdef bint sorted_keys = True
    cdef Py_ssize_t i
    cdef Py_ssize_t *P
    cdef uint64_t *SK
    cdef uint64_t *SO
    cdef uint64_t *W = NULL
    cdef int kbits, ibits
    _enter_read(m)
    if n == 0:
        return 0
    for i in range(1, n):
        if K[i] < K[i - 1]:
            sorted_keys = False
            break
    if sorted_keys or n < 64:
        m.bulk_readers += 1
        try:
            with nogil:
                m._get_sorted(K, O, n)
        finally:
            m.bulk_readers -= 1
        return 0
    if _pack_widths(K, n, &kbits, &ibits):
        m.bulk_readers += 1
        try:
            with nogil:
                W = _radix_sort_packed(K, n, kbits, ibits)
                m._get_walk(W, ibits, ((<uint64_t>1) << ibits) - 1, O, n)
        finally:
            m.bulk_readers -= 1
            free(W)
        return 0
    P = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    SK = <uint64_t*>malloc(n * sizeof(uint64_t))
    SO = <uint64_t*>malloc(n * sizeof(uint64_t))
    m.bulk_readers += 1
    try:
        if P == NULL or SK == NULL or SO == NULL:
            raise MemoryError("RangeMap.get_many: out of memory")
        with nogil:
            _radix_argsort(K, n, P, SK)
            m._get_sorted(SK, SO, n)
            for i in range(n):
                O[P[i]] = SO[i]
    finally:
        m.bulk_readers -= 1
        free(P)
        free(SK)
        free(SO)
    return 0


cdef uint64_t _subtree_min(void *node, int height) noexcept nogil:
    while height > 0:
        node = (<Inner*>node).children[0]
        height -= 1
    return (<Leaf*>node).starts[0] if (<Leaf*>node).n > 0 else 0


def _rangemap_from_runs(default, starts, ends, values, finger=False):
    """Unpickling helper: rebuild a map from its sorted, coalesced runs."""
    m = RangeMap(default, _finger=finger)
    m.assign_many(starts, ends, values)
    return m

include "_rmp.pxi"
include "_fault.pxi"
include "_batch.pxi"
include "_attr.pxi"
include "_sched.pxi"
include "_gmem.pxi"
include "_results.pxi"
include "_directmap.pxi"
include "_snp_walk.pxi"
include "_ledger.pxi"
include "_state.pxi"
include "_snp_guest.pxi"

