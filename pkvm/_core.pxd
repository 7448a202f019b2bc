# cython: language_level=3
"""C-level declarations of pkvm's typed core (private: the layout may change in any release).

Other Cython code should ``cimport`` the stable public API from ``pkvm.core`` instead (see
``pkvm/core.pxd`` and ``docs/embedding.md``); this file is what ``_core.pyx`` itself needs.

``RangeMap`` is a B+tree of coalesced half-open runs ``[start, end)`` of ``uint64`` keys with
``uint64`` values. Only runs whose value differs from the map's default are stored. Every leaf
keeps its runs in three parallel arrays; a leaf whose runs all share one value keeps that value
once (``uval``) and has no value array at all, which halves the memory of the common
"one attribute value in a sea of default" state.

Invariants (checked by ``RangeMap._check``):
- runs are sorted, non-empty and non-overlapping: ``start < end <= next.start``;
- runs are coalesced: ``end == next.start`` implies the two values differ;
- no stored run has the default value;
- ``Inner.keys[i]`` is exactly the smallest run start in ``children[i]``'s subtree;
- every leaf is at depth ``height``; only a root leaf may be empty;
- leaves form a doubly linked list in key order.

Contract of the ``cdef`` methods: they trust their arguments (``start <= end`` etc. were
validated by the Python-level wrappers). ``except -1`` methods can fail only with
``MemoryError``, which is raised before anything changes; the ``noexcept`` ones cannot fail.
"""

from libc.stdint cimport int64_t, uint64_t

cdef enum:
    LEAF_CAP = 64       # runs per leaf (1 KiB of keys)
    INNER_CAP = 64      # children per inner node
    MAX_HEIGHT = 24     # inner levels; 4 ** 24 runs would not fit in memory at the minimum fanout


cdef struct Leaf:
    uint64_t starts[LEAF_CAP]   # first key of each run (inclusive), strictly ascending
    uint64_t ends[LEAF_CAP]     # one past the last key of each run (exclusive)
    uint64_t *vals              # value per run (LEAF_CAP slots), or NULL when all equal uval
    uint64_t uval               # the common value of every run when vals is NULL
    int n                       # runs in use
    Leaf *prev                  # left neighbour in key order, NULL for the first leaf
    Leaf *next                  # right neighbour in key order, NULL for the last leaf


cdef struct Inner:
    uint64_t keys[INNER_CAP]    # keys[i] = smallest run start in children[i]'s subtree
    void *children[INNER_CAP]   # Leaf* when this node is at height 1, Inner* above
    int n                       # children in use (>= 1)


cdef struct Path:
    Inner *node[MAX_HEIGHT]     # node[0] is the root; node[height-1] is the leaf's parent
    int idx[MAX_HEIGHT]         # child index taken at each level


cdef struct Run:
    uint64_t start              # first key (inclusive)
    uint64_t end                # one past the last key (exclusive)
    uint64_t value              # the run's value (may equal the default for gaps)


cdef struct RunCursor:
    # A walk over the stored runs of a window, leaf to leaf (public: ``pkvm.core``).
    uint64_t start              # the current run, clipped to the window (valid after a 1)
    uint64_t end
    uint64_t value
    # private to pkvm: where the walk is and what it walks
    void *leaf                  # Leaf* of the current run; NULL once the walk is over
    int index                   # the run's index in that leaf
    uint64_t stop               # end of the window (exclusive)
    uint64_t version            # the map's version when ``leaf`` was read
    void *owner                 # the map walked (borrowed)


cdef struct RunPos:
    # Where a lookup landed (RangeMap._run_pos_c), for a write right after it (_put_c)
    void *leaf                  # Leaf* the key fell in
    int index                   # its last run with start <= key, or -1
    uint64_t version            # the map's version then (the position is void once it moves)


cdef struct Builder:
    # Streams sorted runs into new, full leaves (RangeMap's merge and bulk-load paths).
    void **leaves               # leaves built so far, in key order (grown by doubling)
    Py_ssize_t n                # leaves built
    Py_ssize_t cap              # slots in ``leaves``
    Py_ssize_t runs             # runs written
    Py_ssize_t vals             # value arrays allocated
    int fill                    # runs per leaf
    bint have                   # ``pend`` holds a run not yet written (it may still grow)
    Run pend                    # the last run, kept back so that the next can coalesce
    uint64_t dflt               # the map's default (never written)


cdef class RangeMap:
    cdef void *root                 # Leaf* when height == 0, else Inner*
    cdef int height                 # inner levels above the leaves
    cdef Leaf *first_leaf           # leftmost leaf
    cdef uint64_t dflt              # value of every key not covered by a stored run
    cdef Py_ssize_t count           # stored runs
    cdef Py_ssize_t n_leaves        # leaves allocated in the tree
    cdef Py_ssize_t n_inner         # inner nodes allocated in the tree
    cdef Py_ssize_t n_vals          # value arrays allocated in the tree
    cdef int leaf_cap               # runs per leaf (LEAF_CAP, smaller only for tests)
    cdef int inner_cap              # children per inner node (INNER_CAP, smaller only for tests)
    cdef int bulk_readers           # get_many calls running without the GIL
    cdef bint bulk_writer           # an assign_many running without the GIL
    cdef uint64_t version           # bumped by every change of the tree (cursors re-descend)
    # The descent finger: the leaf the last single-key lookup or assign landed in, reused while
    # later keys fall inside it; NULL after any change of the tree's shape. Read and written
    # only through pkvm_load_ptr / pkvm_store_ptr (concurrent readers; see _leaf_at).
    cdef void *finger
    cdef bint fingered              # this map keeps a finger (RangeMap(_finger=True))
    # free pools of spare nodes: reserve-then-commit keeps MemoryError from half-applying
    cdef Leaf *pool_leaves          # linked through Leaf.next
    cdef Inner *pool_inner          # linked through Inner.children[0]
    cdef uint64_t *pool_vals        # linked through vals[0]
    cdef int n_pool_leaves
    cdef int n_pool_inner
    cdef int n_pool_vals
    # A weakref to the VM whose live state this map is (set by the VM), or None: the map's
    # public writes (assign, assign_many, clear) from an event callback of that VM raise
    # KvmError(EDEADLK) (docs/events.md). A weakref, not the VM: RangeMap stays out of the
    # cycle collector (@cython.no_gc) and the map cannot keep its VM alive.
    cdef object _owner

    # -- C-level API (trusting; see the module docstring) ------------------------------------
    cdef int _assign_c(self, uint64_t start, uint64_t end, uint64_t value) except -1 nogil
    cdef uint64_t _get_c(self, uint64_t key) noexcept nogil
    cdef int _find_ne_c(self, uint64_t start, uint64_t end, uint64_t value,
                        uint64_t *found) noexcept nogil
    cdef Run _run_at_c(self, uint64_t key) noexcept nogil
    cdef Run _next_run_c(self, uint64_t key) noexcept nogil
    cdef void _get_sorted(self, const uint64_t *keys, uint64_t *out, Py_ssize_t n) noexcept nogil
    cdef void _get_walk(self, const uint64_t *keys, int shift, uint64_t mask, uint64_t *out,
                        Py_ssize_t n) noexcept nogil

    # -- internals ---------------------------------------------------------------------------
    cdef Leaf *_descend(self, uint64_t key, Path *path) noexcept nogil
    cdef int _reserve(self) except -1 nogil
    cdef int _reserve_n(self, int n) except -1 nogil
    cdef int _refill(self) except -1 nogil
    cdef int _fill_pools(self, int64_t leaves, int64_t inner, int64_t vals) except -1 nogil
    cdef int _assign_slow(self, uint64_t start, uint64_t end, uint64_t value) except -1 nogil
    cdef void _remove_leaf(self, Leaf *leaf, Path *path) noexcept nogil
    cdef void _leaf_append(self, Leaf *dst, Leaf *src) noexcept nogil
    cdef Leaf *_take_leaf(self) noexcept nogil
    cdef Inner *_take_inner(self) noexcept nogil
    cdef uint64_t *_take_vals(self) noexcept nogil
    cdef void _give_leaf(self, Leaf *leaf) noexcept nogil
    cdef void _give_inner(self, Inner *node) noexcept nogil
    cdef void _give_vals(self, uint64_t *vals) noexcept nogil
    cdef void _fix_min(self, Path *path, int level, uint64_t key) noexcept nogil
    cdef void _leaf_write(self, Leaf *leaf, int i, uint64_t start, uint64_t end,
                          uint64_t value) noexcept nogil
    cdef void _leaf_shrink_vals(self, Leaf *leaf) noexcept nogil
    cdef void _insert_child(self, Path *path, int level, uint64_t key, void *child) noexcept nogil
    cdef void _remove_child(self, Path *path, int level) noexcept nogil
    cdef void _rebalance_leaf(self, Leaf *leaf, Path *path) noexcept nogil
    cdef void _rebalance_inner(self, Path *path, int level) noexcept nogil
    cdef void _insert_run(self, uint64_t start, uint64_t end, uint64_t value) noexcept nogil
    cdef void _erase_starts(self, uint64_t lo, uint64_t hi) noexcept nogil
    cdef void _free_subtree(self, void *node, int height) noexcept nogil
    cdef void _reset(self) noexcept nogil
    cdef int _merge_runs(self, const uint64_t *S, const uint64_t *E, const uint64_t *V,
                         Py_ssize_t m, Builder *out) noexcept nogil
    cdef int _adopt(self, Builder *b) except -1 nogil
    cdef int _assign_merged(self, const uint64_t *S, const uint64_t *E, const uint64_t *V,
                            Py_ssize_t m) except -1 nogil
    cdef int _bulk_load(self, const uint64_t *S, const uint64_t *E, const uint64_t *V,
                        Py_ssize_t n) except -1 nogil
    cdef Py_ssize_t _check_node(self, void *node, int height, bint is_root) except -1
    # one key's assign with one scan of its leaf (the attribute ioctl's per-gfn writes)
    cdef int _assign1_c(self, uint64_t key, uint64_t value) except -1 nogil
    # one descent for a lookup and the write after it (the fault path's single-key writes)
    cdef Run _run_pos_c(self, uint64_t key, RunPos *pos) noexcept nogil
    cdef int _put_c(self, const RunPos *pos, uint64_t start, uint64_t end,
                    uint64_t value) except -1 nogil


# -- the public C API (re-exported by pkvm/core.pxd; documented in docs/embedding.md) ---------
cdef int rangemap_assign(RangeMap m, uint64_t start, uint64_t end,
                         uint64_t value) except -1 nogil
cdef uint64_t rangemap_get(RangeMap m, uint64_t key) noexcept nogil
cdef int rangemap_find_ne(RangeMap m, uint64_t start, uint64_t end, uint64_t value,
                          uint64_t *found) except -1 nogil
cdef int rangemap_run_at(RangeMap m, uint64_t key, Run *out) except -1 nogil
cdef uint64_t rangemap_default(RangeMap m) noexcept nogil
cdef Py_ssize_t rangemap_count(RangeMap m) noexcept nogil
cdef int rangemap_cursor_init(RangeMap m, RunCursor *cur, uint64_t start,
                              uint64_t end) except -1 nogil
cdef int rangemap_cursor_next(RangeMap m, RunCursor *cur) except -1 nogil
cdef int rangemap_assign_array(RangeMap m, const uint64_t *starts, const uint64_t *ends,
                               const uint64_t *values, Py_ssize_t n) except -1
cdef int rangemap_get_array(RangeMap m, const uint64_t *keys, uint64_t *out,
                            Py_ssize_t n) except -1

include "_rmp_decl.pxi"


# -- the VM's counters (pkvm/_ledger.pxi) ------------------------------------------------------
cdef enum:
    # pkvm.kvm.vm.STAT_KEYS, in order: a Counters built from them has these indices
    S_PF_TAKEN, S_PF_FIXED, S_PF_EMULATE, S_PF_SPURIOUS, S_REMOTE_TLB_FLUSH,
    S_REMOTE_TLB_FLUSH_REQUESTS, S_PAGES_4K, S_PAGES_2M, S_PAGES_1G, S_MMU_INVALIDATE_SEQ,
    S_PF_RETRY, S_MEMORY_FAULT_EXITS, S_ATTR_STORES, S_ZAPPED_SPTES, S_HUGE_PAGE_SPLITS,
    S_GMEM_PAGES_ALLOCATED, S_GMEM_PAGES_FREED, S_GMEM_PREPARE, S_GMEM_INVALIDATE,
    S_SHARED_PAGES_POPULATED, S_MEM_ATTR_OP_FAILURES, S_HYPERCALLS, S_HYPERCALL_EXITS,
    S_NBASE


cdef class Counters:
    cdef int64_t *v                 # the values, by index
    cdef Py_ssize_t n               # keys registered
    cdef Py_ssize_t cap             # values allocated
    cdef list names                 # the keys, by index (registration order)
    cdef dict index                 # key -> index
    cdef Py_ssize_t slot(self, str key) except -1


# -- the VM's modeled-time ledger (pkvm/_ledger.pxi) -------------------------------------------
cdef class Cells


ctypedef struct OpPrice:
    Py_ssize_t i                    # an op's index in the ledger (Ledger.op_slot)
    int64_t p                       # the price of one event (-1: none that fits, charged by name)


cdef class Ledger:
    cdef int64_t ns                 # the modeled ns, while ``big`` is None
    cdef object big                 # the modeled ns as a Python int once it left int64, else None
    cdef object boxed               # the last int object now() made, for ``boxed_ns``
    cdef int64_t boxed_ns
    cdef Cells cost                 # the acting actor's op -> ns (VM._cost_ns)
    cdef dict prices                # op -> ns of one event (VM._costs)
    cdef object vm                  # for the ``charge`` event
    cdef public bint traced         # VM._subs is not None
    cdef dict opindex               # op -> its index in every Cells of this VM
    cdef list opnames               # the ops, by index
    cdef frozenset guest_ops        # the ops a vCPU runs in guest mode (VM: GUEST_MODE_OPS)
    cdef unsigned char gm[64]       # gm[i]: op i (below 64) is one of them
    cdef public int64_t guest_ns    # ns charged to them, in total (the timeline's IPIs)
    cdef Py_ssize_t op_slot(self, str op) except -1
    cdef object now(self)
    cdef int add(self, str op, object ns) except -1
    cdef int add_c(self, str op, int64_t ns) except -1
    cdef int add_i(self, Py_ssize_t i, int64_t ns) except -1
    cdef inline bint add_fast(self, Py_ssize_t i, int64_t ns) noexcept
    cdef int _add_big(self, object ns) except -1
    cdef int charge_c(self, str op, uint64_t n) except -1
    cdef int charge_p(self, Py_ssize_t i, int64_t price, uint64_t n) except -1
    cdef int _charge_slow(self, str op, object price, object n) except -1
    cdef int charge_obj(self, str op, object n) except -1
    cdef int set_cost_c(self, Cells cost) except -1


cdef class Cells:
    cdef Ledger ledger              # the op index space
    cdef int64_t *v                 # the values, by op index
    cdef unsigned char *st          # 0: no cell, 1: in v, 2: in big (past int64)
    cdef Py_ssize_t cap             # ops allocated
    cdef list order                 # the ops that have a cell, in insertion order
    cdef dict big                   # op -> Python int, for a cell past int64
    cdef int grow(self, Py_ssize_t n) except -1
    cdef Py_ssize_t _at(self, object op) except -2
    cdef object _value(self, Py_ssize_t i, object op)


# -- the typed hot state of pkvm.kvm.vm.VM, pkvm.kvm.memslots.Memslot and pkvm.host.hostmem.HostMemory
# (pkvm/_state.pxi): the Python classes derive from these, so the fault path, the attribute ioctl
# and the allocator read and write these fields in C; Python reads and writes them by name.

cdef class VmState:
    cdef public object _sched               # the attached pkvm.sim.Timeline, or None
    cdef public object _platform            # the VM type's op table
    cdef public bint vm_dead                # kvm->vm_dead
    cdef public bint _in_callback           # (in vm_dead's padding) VM._emit is running an event callback: entries refuse (EDEADLK)
    cdef public int64_t mmu_invalidate_in_progress
    cdef public uint64_t _range_start, _range_end   # mmu_invalidate_range_start / _end
    cdef public int64_t nr_vcpus            # VM(nr_vcpus=): a remote TLB flush targets at least these
    cdef public bint _prefetch              # software prefetch hints on the per-page paths (True)
    cdef public object _actor               # who acts: "vmm" or "vcpuN" (VM._set_actor)
    cdef public dict _actor_ns              # actor -> its Cells of ns per op
    cdef public dict _actor_tot             # actor -> its modeled ns up to its last switch away
    cdef public object _actor_mark          # the modeled ns when the acting actor took over
    cdef public object _cost_ns             # the acting actor's Cells
    cdef object _set_actor_c(self, actor)


cdef class MemslotState:
    cdef public uint64_t flags              # KVM_MEM_* (u32)
    cdef public bint invalid                # KVM_MEMSLOT_INVALID (being deleted)
    cdef public object gmem_file            # the bound guest_memfd while its file is open, else None


cdef class HostMemoryState:
    cdef public RangeMap _used              # allocated pfn runs (value 1)
    cdef public int64_t start_pfn, end_pfn
    cdef public int64_t _cursor             # the next-fit cursor
    cdef public int64_t nr_allocated
    cdef public object _cpu_cursors         # per-CPU cursors (a dict), or None
    cdef public object cpu                  # the CPU that allocates now (a key of _cpu_cursors)
    cdef public object _owner               # the VM it backs (its public mutators refuse from a callback), or None
    # The bump position (pkvm/_gmem.pxi, _hm_alloc): the leaf and index of the run of _used that
    # ends at _cursor, valid while _used is the map _bump_map at version _bump_ver (NULL: none)
    cdef void *_bump_leaf
    cdef int _bump_idx
    cdef uint64_t _bump_ver
    cdef RangeMap _bump_map                 # (a reference: the map cannot go while it is kept)


cdef class SharedBackingState:
    cdef public RangeMap _map               # HVA page -> populated word (bit 0, pfn delta from bit 8)
    cdef public HostMemoryState _mem        # the allocator it populates from
    cdef public int order                   # the host page order (0, 9 or 18)
    cdef public int64_t nr_populated
