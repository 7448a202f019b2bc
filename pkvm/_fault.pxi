# The nested page fault's objects in the typed core (issue 16): ``struct kvm_page_fault``
# (:class:`PageFault`) and the outcome ``Vcpu.page_fault`` returns (:class:`FaultResult`).
# Included from _core.pyx. Built as extension types so that creating one costs one C
# allocation instead of a Python ``__init__`` per field (a frozen dataclass pays an
# ``object.__setattr__`` call per field: it was the most expensive single step of a 4K
# fault). The fault path's phases live in pkvm/kvm/mmu.py and fill these in.

from cpython.ref cimport Py_REFCNT
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t

@cython.final
@cython.freelist(8)
@cython.auto_pickle(False)
cdef class PageFault:
    """``struct kvm_page_fault``, widened to a batch of identical faults ``[gfn, end)``.

    ``gfn`` / ``limit``: the faulting gfn and the end of the gfns a batch may cover;
    ``end``: the gfns this object accounts for; ``private_access``: the access type the
    hardware reported; ``attr``: the gfn's attribute word read on entry; ``is_private``, ``write``, ``prefetch`` (``kvm_tdp_map_page``
    from ``KVM_PRE_FAULT_MEMORY``: no exit, no ``pf_taken``); ``mmu_seq`` (the invalidation
    sequence snapshot); ``slot``; ``delta`` (pfn - gfn of the backing); ``max_level``,
    ``map_writable``, ``level``; ``ret`` ("" while running), ``errno``, ``memory_fault``;
    ``nfaults`` (faults this object stands for); ``host_level``; ``single`` (a batch of one);
    ``order`` (the guest_memfd folio order usable at ``gfn``).

    The numeric and flag fields are C-typed (read and written by name from Python as ints
    and bools); ``slot``, ``ret`` and ``memory_fault`` are objects.
    """

    cdef public uint64_t gfn, limit, end, attr, nfaults
    cdef public int64_t delta, mmu_seq
    cdef public bint private_access, is_private, write, prefetch, map_writable, single
    cdef public int errno "pkvm_errno"
    cdef public int max_level, level, host_level, order
    cdef public object slot, ret, memory_fault
    # the gfn's SPTE word as fault_begin read it, from which map (borrowed, compared only) and
    # where that lookup landed (with the map's version then): the install reuses the word and
    # writes at that position while the same map has not changed since (no second descent);
    # spte_map is NULL until fault_begin ran
    cdef uint64_t spte, spte_lo, spte_hi     # the word and its run [spte_lo, spte_hi)
    cdef RunPos spte_pos
    cdef void *spte_map

    def __init__(self, uint64_t gfn, uint64_t limit, bint private, bint write, bint prefetch=False):
        self._init(gfn, limit, private, write, prefetch)

    cdef inline int _init(self, uint64_t gfn, uint64_t limit, bint private, bint write,
                          bint prefetch) except -1:
        self.gfn = gfn
        self.prefetch = prefetch
        self.limit = limit
        self.end = gfn + 1
        self.private_access = private
        self.is_private = False
        self.write = write
        self.mmu_seq = 0
        self.slot = None
        self.delta = 0
        self.max_level = 3          # PG_LEVEL_1G
        self.map_writable = True
        self.level = 1              # PG_LEVEL_4K
        self.ret = ""
        self.errno = 0
        self.memory_fault = None
        self.nfaults = 1
        self.host_level = 1
        self.single = limit <= gfn + 1
        self.order = 0
        self.attr = 0
        self.spte_map = NULL
        return 0


cdef inline PageFault _new_fault(uint64_t gfn, uint64_t limit, bint private, bint write, bint prefetch):
    cdef PageFault f = PageFault.__new__(PageFault)
    f._init(gfn, limit, private, write, prefetch)
    return f


cdef inline bint _f_running(PageFault f) except -1:
    """``not f.ret``: the phases go on (an empty string, tested without Python's truth protocol)."""
    ret = f.ret
    if type(ret) is str:
        return PyUnicode_GET_LENGTH(ret) == 0
    return not ret


cdef bint _ret_eq(object ret, str name) except -1:
    return ret == name


cdef inline bint _ret_is(object ret, str name) except -1:
    """``ret == name`` for a fault's ``ret``: the literal itself, or (a str of another length)
    not it, without a string comparison; anything else compared as Python does."""
    if ret is name:
        return True
    if type(ret) is str and PyUnicode_GET_LENGTH(ret) != PyUnicode_GET_LENGTH(name):
        return False
    return _ret_eq(ret, name)


cdef int _memory_fault_exit(PageFault f, int err) except -1:
    """``kvm_mmu_prepare_memory_fault_exit`` + a negative return (docs/kernel-semantics.md
    §4.6): ``ret = "exit"``, ``errno``, the ``(gpa, size, flags)`` of the exit; the fault is
    one gfn."""
    f.ret = "exit"
    f.errno = err
    f.memory_fault = (f.gfn << 12, 4096, 8 if f.is_private else 0)  # KVM_MEMORY_EXIT_FLAG_PRIVATE
    f.end = f.gfn + 1
    return 0


def memory_fault_exit(PageFault f, int err):
    """``pkvm.kvm.fault.memory_fault_exit``: fill a memory-fault exit into ``f``."""
    _memory_fault_exit(f, err)


@cython.final
@cython.freelist(8)
cdef class FaultResult:
    """Outcome of ``Vcpu.page_fault`` (immutable, hashable, compared by value).

    ``ret`` is ``"fixed"``, ``"retry"``, ``"spurious"``, ``"emulate"`` or ``"exit"`` (a
    negative return from ``KVM_RUN``: ``errno`` says which; ``exit_reason`` is
    ``KVM_EXIT_MEMORY_FAULT`` when ``memory_fault = (gpa, size, flags)`` was filled in).
    ``level``/``pfn`` describe the installed (or already present) leaf. ``"rmp_loop"`` /
    ``"retry_loop"``: a step the kernel retries until another thread acts gave up after
    ``retries`` attempts (``pkvm.constants.RETRY_LIMIT``); ``loop`` names the step.
    """

    cdef readonly object errno "pkvm_errno"
    cdef readonly object ret, level, pfn, exit_reason, memory_fault, retries, loop

    __match_args__ = ("ret", "level", "pfn", "exit_reason", "memory_fault", "errno", "retries", "loop")

    def __init__(self, ret, level=None, pfn=None, exit_reason=None, memory_fault=None, errno=None,
                 retries=0, loop=None):
        self.ret = ret
        self.level = level
        self.pfn = pfn
        self.exit_reason = exit_reason
        self.memory_fault = memory_fault
        self.errno = errno
        self.retries = retries
        self.loop = loop

    cdef tuple _fields(self):
        return (self.ret, self.level, self.pfn, self.exit_reason, self.memory_fault, self.errno,
                self.retries, self.loop)

    def __eq__(self, other):
        if type(other) is not FaultResult:
            return NotImplemented
        return self._fields() == (<FaultResult>other)._fields()

    def __ne__(self, other):
        if type(other) is not FaultResult:
            return NotImplemented
        return self._fields() != (<FaultResult>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return ("FaultResult(ret=%r, level=%r, pfn=%r, exit_reason=%r, memory_fault=%r, errno=%r, "
                "retries=%r, loop=%r)" % self._fields())

    def __reduce__(self):
        return (FaultResult, self._fields())


cdef inline FaultResult _result(object ret, object level=None, object pfn=None, object exit_reason=None,
                                object memory_fault=None, object err=None):
    cdef FaultResult r = FaultResult.__new__(FaultResult)
    r.ret = ret
    r.level = level
    r.pfn = pfn
    r.exit_reason = exit_reason
    r.memory_fault = memory_fault
    r.errno = err
    r.retries = 0
    r.loop = None
    return r


cdef struct _FaultOut:
    # A fault result's fields but ``ret`` (FaultPath._settle): each ``has_*`` False means None;
    # ``has_mf``: ``memory_fault`` is the PageFault's; ``retries`` is 0 and ``loop`` None.
    bint has_level, has_pfn, has_err, has_exit, has_mf
    int level, err, exit_reason
    int64_t pfn


cdef inline void _out_leaf(PageFault f, _FaultOut *o) noexcept:
    """The installed (or present) leaf's ``level`` and ``pfn`` into ``o``."""
    o.has_level = True
    o.level = f.level
    o.has_pfn = True
    o.pfn = <int64_t>f.gfn + f.delta


cdef FaultResult _result_of(object ret, PageFault f, _FaultOut *o):
    """The :class:`FaultResult` of ``ret`` and ``o`` (FaultPath._settle)."""
    return _result(ret, o.level if o.has_level else None, o.pfn if o.has_pfn else None,
                   o.exit_reason if o.has_exit else None, f.memory_fault if o.has_mf else None,
                   o.err if o.has_err else None)


# ---------------------------------------------------------------------------------------------
# Leaf SPTEs: the one implementation of pkvm.kvm.mmu's make_spte / Mmu.split_to / map_leaf / map_run
# ---------------------------------------------------------------------------------------------
#
# A leaf's RangeMap value (pkvm.kvm.mmu): bit 0 present, bits 1-2 the level, bit 3 private,
# bit 4 writable, bits 8-63 the signed ``pfn - gfn`` delta (pkvm.host.hostmem.encode_delta).

cdef uint64_t _F_SPTE_PRESENT = 1
cdef uint64_t _F_SPTE_PRIVATE = 1ULL << 3
cdef uint64_t _F_SPTE_WRITABLE = 1ULL << 4
cdef uint64_t _F_ATTR_PRIVATE = 1ULL << 3       # KVM_MEMORY_ATTRIBUTE_PRIVATE
cdef uint64_t _F_MEM_LOG_DIRTY = 1              # KVM_MEM_LOG_DIRTY_PAGES
cdef uint64_t _F_MEM_READONLY = 2               # KVM_MEM_READONLY
cdef int _F_EXIT_MEMORY_FAULT = 39              # KVM_EXIT_MEMORY_FAULT
cdef int _F_EFAULT = 14
cdef int _F_ENOENT = 2
cdef int _F_EAGAIN = 11


cdef inline int _f_level(uint64_t v) noexcept nogil:
    return <int>((v >> 1) & 3)


cdef inline int _f_shift(int level) noexcept nogil:
    return 18 if level == 3 else 9 if level == 2 else 0


cdef inline int64_t _decode_delta(uint64_t v) noexcept nogil:
    """The pfn delta of an SPTE, a folio word or a shared-backing word (one encoding, also
    pkvm/_gmem.pxi's): bits 8..63 hold it as 56-bit two's complement, so an arithmetic shift
    sign-extends it."""
    return (<int64_t>v) >> 8


cdef inline uint64_t _make_spte(int64_t delta, int level, bint private, bint writable) noexcept nogil:
    return ((<uint64_t>delta) << 8) | _F_SPTE_PRESENT | (<uint64_t>level << 1) \
        | (_F_SPTE_PRIVATE if private else 0) | (_F_SPTE_WRITABLE if writable else 0)


cdef inline int _level_for_order(int order) noexcept nogil:
    """``kvm_max_level_for_order``: >= 18 -> 1G, >= 9 -> 2M, else 4K."""
    return 3 if order >= 18 else 2 if order >= 9 else 1


cdef int _split_to(RangeMap m, Counters st, uint64_t gfn, int level, object charge) except -1:
    """``Mmu.split_to``: split the huge leaf holding ``gfn`` down to at most ``level``
    (``tdp_mmu_split_huge_page``; the children map the same pfns: no flush)."""
    cdef uint64_t v = rangemap_get(m, gfn), n, base
    cdef int old
    while v and _f_level(v) > level:
        old = _f_level(v)
        n = 1ULL << _f_shift(old)
        base = gfn & ~(n - 1)
        rangemap_assign(m, base, base + n, (v & ~(3ULL << 1)) | (<uint64_t>(old - 1) << 1))
        st.v[S_PAGES_4K + old - 1] -= 1
        st.v[S_PAGES_4K + old - 2] += 512
        st.v[S_HUGE_PAGE_SPLITS] += 1
        if type(charge) is Ledger:  # VM._charge, in C (the fault path passes the VM's ledger)
            (<Ledger>charge).charge_c("huge_page_split", 1)
        else:
            charge("huge_page_split", 1)
        v = rangemap_get(m, gfn)
    return 0


cdef inline int _rm_put(RangeMap m, const RunPos *pos, uint64_t start, uint64_t end,
                        uint64_t value) except -1:
    """``rangemap_assign(m, start, end, value)`` (``start <= end``) at the position a lookup
    just filled in (``RangeMap._run_pos_c``): no second descent while the map is unchanged."""
    if m.bulk_writer or m.bulk_readers:
        return _busy(m, True)
    return m._put_c(pos, start, end, value)


def _rangemap_lookup_put(RangeMap m, uint64_t key, uint64_t start, uint64_t end, uint64_t value,
                         between=None):
    """Test hook of the fault path's single-descent write: ``m.run_at(key)`` through
    ``RangeMap._run_pos_c``, then ``m.assign(start, end, value)`` through ``_put_c`` at that
    position; ``between`` (an ``(s, e, v)`` assign, or None) runs in between, which voids the
    position. Returns the run looked up as ``(start, end, value)``."""
    cdef RunPos pos
    cdef Run r
    if start > end:
        raise ValueError(f"start {start:#x} > end {end:#x}")
    if key == U64_MAX:
        raise OverflowError(f"key out of range for run_at: {key:#x} (must be < 2**64 - 1)")
    _enter_write(m)
    r = m._run_pos_c(key, &pos)
    if between is not None:
        m.assign(*between)
    _rm_put(m, &pos, start, end, value)
    return (r.start, r.end, r.value)


cdef int _map_leaf(RangeMap m, Counters st, uint64_t gfn, int level, uint64_t value, object charge) except -1:
    """``Mmu.map_leaf``: install one leaf at ``level`` covering ``gfn``. Returns 1 if the
    identical leaf was there (spurious), 2 if a TLB flush is needed, else 0."""
    return _map_leaf_at(m, st, gfn, level, value, charge, rangemap_get(m, gfn), NULL, 0, 0)


cdef int _map_leaf_at(RangeMap m, Counters st, uint64_t gfn, int level, uint64_t value, object charge,
                      uint64_t old, const RunPos *pos, uint64_t lo, uint64_t hi) except -1:
    """:func:`_map_leaf` given ``old``, the SPTE word at ``gfn`` now, where its lookup landed
    (``pos``, or NULL) and the run ``[lo, hi)`` of that word it found."""
    cdef uint64_t n, base, k
    cdef int flush = 0
    if old and _f_level(old) > level:
        _split_to(m, st, gfn, level, charge)
        old = rangemap_get(m, gfn)
    if old == value:
        return 1
    n = 1ULL << _f_shift(level)
    base = gfn & ~(n - 1)
    # (a huge leaf over a range the lookup found empty drops nothing: no search for leaves)
    if old or (n > 1 and not (pos != NULL and pos.version == m.version and lo <= base and base + n <= hi)
               and rangemap_find_ne(m, base, base + n, 0, &k)):
        flush = 2
        dropped = _drop_leaves(m, st, base, base + n)
        # Overwriting the leaf itself is not a zap; dropping a page table's leaves is.
        if not (old and _f_level(old) == level):
            st.v[S_ZAPPED_SPTES] += dropped
    if pos != NULL:
        _rm_put(m, pos, base, base + n, value)
    else:
        rangemap_assign(m, base, base + n, value)
    st.v[S_PAGES_4K + level - 1] += 1
    return flush


cdef int _map_run(RangeMap m, Counters st, uint64_t start, uint64_t end, int level, uint64_t value) except -1:
    """``Mmu.map_run``: leaves at ``level`` over the unmapped, ``level``-aligned ``[start, end)``."""
    rangemap_assign(m, start, end, value)
    st.v[S_PAGES_4K + level - 1] += <int64_t>((end - start) >> _f_shift(level))
    return 0


def _mmu_make_spte(int64_t delta, int level, bint private, bint writable):
    """``pkvm.kvm.mmu.make_spte``."""
    return _make_spte(delta, level, private, writable)


def _mmu_split_to(RangeMap sptes, stats, uint64_t gfn, int level, charge):
    """``pkvm.kvm.mmu.Mmu.split_to`` (its arguments are trusted)."""
    cdef Counters c = _scratch_counters(stats)
    try:
        _split_to(sptes, c, gfn, level, charge)
    finally:
        _settle_counters(c, stats)


def _mmu_map_leaf(RangeMap sptes, stats, uint64_t gfn, int level, uint64_t value, charge):
    """``pkvm.kvm.mmu.Mmu.map_leaf``: ``(spurious, flush)``."""
    cdef Counters c = _scratch_counters(stats)
    cdef int r
    try:
        r = _map_leaf(sptes, c, gfn, level, value, charge)
    finally:
        _settle_counters(c, stats)
    return r == 1, r == 2


def _mmu_map_run(RangeMap sptes, stats, uint64_t start, uint64_t end, int level, uint64_t value):
    """``pkvm.kvm.mmu.Mmu.map_run`` (its arguments are trusted)."""
    cdef Counters c = _scratch_counters(stats)
    _map_run(sptes, c, start, end, level, value)
    _settle_counters(c, stats)


# ---------------------------------------------------------------------------------------------
# The nested page fault's phases (docs/kernel-semantics.md §4.2)
# ---------------------------------------------------------------------------------------------

cdef int _store_result(FaultResult r, Py_ssize_t i, object code, int8_t[::1] ret, int8_t[::1] level,
                       int64_t[::1] pfn, int32_t[::1] err, int32_t[::1] retries,
                       dict extras) except -1:
    """One result of ``FaultPath.calls`` into its arrays (see there); ``code`` is its ``ret``'s
    code, or None. A result they cannot give back exactly gets the rows' defaults and goes to
    ``extras`` (``FaultBatch`` fills its rows from the object)."""
    lv, pf, er, rt = r.level, r.pfn, r.errno, r.retries
    if (code is not None and r.exit_reason is None and r.memory_fault is None and r.loop is None
            and (lv is None or (type(lv) is int and 1 <= lv <= 3))
            and (pf is None or (type(pf) is int and 0 <= pf < (1 << 62)))
            and (er is None or (type(er) is int and 0 < er < (1 << 31)))
            and type(rt) is int and 0 <= rt < (1 << 31)):
        ret[i] = code
        level[i] = 0 if lv is None else lv
        pfn[i] = -1 if pf is None else pf
        err[i] = 0 if er is None else er
        retries[i] = rt
        return 0
    ret[i] = -1
    level[i] = 0
    pfn[i] = -1
    err[i] = 0
    retries[i] = 0
    extras[i] = r
    return 0


cdef int _store_fields(object ret, PageFault f, _FaultOut *o, Py_ssize_t i, object code, int8_t[::1] rets,
                       int8_t[::1] level, int64_t[::1] pfn, int32_t[::1] err, int32_t[::1] retries,
                       dict extras) except -1:
    """:func:`_store_result` of the result ``ret`` and ``o`` make (:func:`_result_of`) without
    building it, unless it goes to ``extras``: the same test on the typed fields."""
    if (code is not None and not o.has_exit and not (o.has_mf and f.memory_fault is not None)
            and (not o.has_level or 1 <= o.level <= 3)
            and (not o.has_pfn or 0 <= o.pfn < (1LL << 62))
            and (not o.has_err or o.err > 0)):
        rets[i] = code
        level[i] = o.level if o.has_level else 0
        pfn[i] = o.pfn if o.has_pfn else -1
        err[i] = o.err if o.has_err else 0
        retries[i] = 0
        return 0
    return _store_result(_result_of(ret, f, o), i, code, rets, level, pfn, err, retries, extras)


# A vCPU's ``__slots__`` member read in C: the member descriptor (``PyMemberDescr_Type``) of a
# ``__slots__`` name holds the member's byte offset in the instance (``T_OBJECT_EX``: NULL while
# unset, when Python's getattr raises AttributeError).
cdef extern from *:
    """
    #include "structmember.h"
    /* the offset of a __slots__ member (a T_OBJECT_EX member descriptor), else -1 */
    static Py_ssize_t pkvm_member_offset(PyObject *descr) {
        PyMemberDef *m;
        if (Py_TYPE(descr) != &PyMemberDescr_Type) return -1;
        m = ((PyMemberDescrObject *)descr)->d_member;
        return m->type == T_OBJECT_EX ? m->offset : -1;
    }
    static int pkvm_generic_getattr(PyObject *cls) {
        return ((PyTypeObject *)cls)->tp_getattro == PyObject_GenericGetAttr;
    }
    """
    Py_ssize_t pkvm_member_offset(object descr)
    bint pkvm_generic_getattr(object cls)


cdef Py_ssize_t _member_offset(type cls, str name) except -2:
    """Where ``getattr(obj, name)`` reads for an instance of ``cls``: the byte offset of a
    ``__slots__`` member, or -1 when it takes Python's getattr (another kind of attribute, a
    class without the generic ``__getattribute__``)."""
    if not pkvm_generic_getattr(cls):
        return -1
    for k in cls.__mro__:
        kd = k.__dict__
        if name in kd:
            return pkvm_member_offset(kd[name])
    return -1


cdef inline PyObject *_member_at(object obj, Py_ssize_t off) noexcept:
    """The member at ``off`` (:func:`_member_offset`) of ``obj``, borrowed; NULL while unset."""
    return (<PyObject**>((<char*><PyObject*>obj) + off))[0]


cdef int _FP_GENERIC = 0      # the vCPU class's _fault is Vcpu._fault
cdef int _FP_DETOUR = 1       # ... is Vcpu._fault while the class's _fault_detour slot is None
cdef int _FP_PYTHON = 2       # ... is the class's own: call it


@cython.final
@cython.auto_pickle(False)  # a VM's live state: never pickled on its own
cdef class FaultPath:
    """The typed state of one VM's nested page-fault path (``VM._fault_path``).

    Built once per VM after the platform's init, like :class:`AttrPath`: it holds the VM's
    maps, counter and cost dicts, the shared backing, the platform's fault hooks and the
    policy knobs (all fixed for the VM's life), and reads the scalars that change (the
    timeline, the op table, the dead flag, the invalidation state) in the C members of the VM's
    base class :class:`VmState` (pkvm/_state.pxi). ``pkvm.kvm.mmu``'s phase functions (``fault_begin``, ``faultin_pfn``,
    ``max_mapping_level``, ``fault_is_stale``, ``fault_install``, ``fault_finish``) are
    wrappers of the methods here, which both drivers run: the synchronous one here
    (:meth:`run`) and the timeline's in ``pkvm.kvm.mmu.run_fault``.

    Constructed with the Python functions it calls out to (the core imports nothing of the
    KVM model): ``gmem_get_pfn`` (``pkvm.kvm.gmem.kvm_gmem_get_pfn``), ``set_external``
    (a mirror root's ``set_external_spte``), ``topup`` (an armed ``mmu_topup`` failure),
    ``timeline_run`` (the driver under a timeline), ``emit_fault`` (the ``fault`` event),
    ``base_fault`` (``Vcpu._fault``), ``gpa_to_gfn`` (``page_fault``'s slow argument check)
    and ``is_implemented`` (``pkvm.kvm.ops``: whether an optional platform op is real).
    """

    cdef object vm, platform, gmem_get_pfn, set_external, topup, timeline_run, emit_fault
    cdef bint tl_core           # timeline_run is the core's fault_timeline (called in C: _tl_run)
    cdef object base_fault, gpa_to_gfn, kvm_error, is_implemented
    cdef object fault_is_private, gmem_max_level, plat_max_level, handle_rmp
    cdef dict d, costs, slots, armed
    cdef VmState vs             # the VM itself, typed: its hot fields are C members
    cdef SharedBackingState shared  # the VMM's shared backing (its fields are C members)
    cdef Counters stats
    cdef Ledger ledger
    cdef OpPrice o_npf          # npf_fault, resolved for _charge_op_u
    cdef OpPrice o_salloc       # one shared host page (alloc_op), likewise
    cdef RangeMap attrs, sptes, slot0, shared_map
    cdef bint attr_source, has_private_mem, mirror, has_gmem_max, has_plat_max, has_rmp, access_decides
    cdef bint access_or_attr
    cdef bint prefault_eagain   # Policy.pre_fault_invalid_slot == "eagain" (6.18+)
    cdef int host_level
    cdef object alloc_op
    # the typed fields of the memslot read last (memslots never change these fields)
    cdef object c_slot
    cdef MemslotState c_ms      # the same memslot, typed (its flags, invalid flag and file)
    cdef RangeMap c_m2, c_m1
    cdef uint64_t c_base, c_end, c_ugfn, c_key
    # the slot0 run read last
    cdef RunMemo s0
    # the VM's GmemPath once built (pkvm.kvm.gmem builds it on first use and keeps it)
    cdef object gpath
    # a PageFault no one else holds, for the next one-page fault (_take_spare / _keep_spare)
    cdef PageFault spare
    # the vCPU class seen last and how its _fault runs one page (_FP_*)
    cdef object c_cls, c_detour
    cdef int c_mode
    # where its detour slot and its ``rmp_npf`` are (_member_offset; -1: Python's getattr)
    cdef Py_ssize_t c_doff, c_roff
    # page_fault_many's next gfn (``ahead``: one is set): the fault before it asks for that
    # gfn's attribute leaf right after its own attribute lookup (_begin)
    cdef uint64_t ahead_gfn
    cdef bint ahead

    def __init__(self, vm, gmem_get_pfn, set_external, topup, timeline_run, emit_fault, base_fault,
                 gpa_to_gfn, is_implemented, kvm_error, str alloc_op):
        d = vm.__dict__
        self.vm = vm
        self.vs = <VmState?>vm
        self.d = d
        plat = self.vs._platform
        self.attrs = d["_attrs"]
        self.sptes = d["_sptes"]
        self.slot0 = d["_slot_maps"][0]
        self.slots = d["_slots"]
        self.stats = _vm_counters(d["_stats"])
        self.costs = d["_costs"]
        self.ledger = d["_ledger"]
        _op_price(&self.o_npf, self.ledger, self.costs, "npf_fault")
        self.armed = d["_inject"]._armed
        shared = d["_shared"]
        self.shared = <SharedBackingState?>shared
        self.shared_map = shared._map
        self.host_level = _level_for_order(shared.order)
        self.alloc_op = alloc_op
        _op_price(&self.o_salloc, self.ledger, self.costs, alloc_op)
        self.attr_source = d["_policy"].private_fault_source == "attributes"
        self.prefault_eagain = d["_policy"].pre_fault_invalid_slot == "eagain"
        self.mirror = d["_mirror"]
        self.is_implemented = is_implemented
        self._load_platform(plat)
        self.gmem_get_pfn = gmem_get_pfn
        self.set_external = set_external
        self.topup = topup
        self.timeline_run = timeline_run
        self.tl_core = timeline_run is fault_timeline
        self.emit_fault = emit_fault
        self.base_fault = base_fault
        self.gpa_to_gfn = gpa_to_gfn
        self.kvm_error = kvm_error
        self.c_slot = None
        self.c_cls = None
        self.gpath = None
        self.s0.map = NULL  # (none yet: the first fault reads slot0)

    # -- helpers ---------------------------------------------------------------------------------

    cdef int _load_platform(self, object plat) except -1:
        """Read the platform's fault ops (again if ``vm._platform`` was swapped since)."""
        self.platform = plat
        self.has_private_mem = plat.has_private_mem
        self.fault_is_private = plat.fault_is_private
        # an op marked by pkvm.kvm.ops.access_decides returns the reported bit: read it here
        self.access_decides = getattr(plat.fault_is_private, "access_decides", False) is True
        # ... and one marked by pkvm.kvm.ops.access_or_attribute ORs in the gfn's attribute
        self.access_or_attr = getattr(plat.fault_is_private, "access_or_attribute", False) is True
        self.gmem_max_level = plat.gmem_max_mapping_level
        self.plat_max_level = plat.max_mapping_level
        self.handle_rmp = plat.handle_rmp_fault
        self.has_gmem_max = self.is_implemented(plat.gmem_max_mapping_level)
        self.has_plat_max = self.is_implemented(plat.max_mapping_level)
        self.has_rmp = self.is_implemented(plat.handle_rmp_fault)
        return 0

    cdef inline int _ops(self) except -1:
        plat = self.vs._platform
        if plat is not self.platform:
            self._load_platform(plat)
        return 0

    cdef inline int _slot(self, object slot) except -1:
        if slot is not self.c_slot:
            maps = slot.lpage.maps
            self.c_m2 = maps[2]
            self.c_m1 = maps[3]
            self.c_base = slot.base_gfn
            self.c_end = slot.end_gfn
            self.c_ugfn = slot._ugfn
            self.c_ms = <MemslotState?>slot
            self.c_key = slot.key
            self.c_slot = slot
        return 0

    cdef int _charge(self, str op, uint64_t n) except -1:
        """``VM._charge``: ``n`` events of ``op`` at the VM's cost, on the acting actor."""
        return self.ledger.charge_c(op, n)

    cdef bint _retry_gfn(self, int64_t mmu_seq, uint64_t gfn) except -1:
        """``mmu_invalidate_retry_gfn``: an invalidation covers ``gfn`` or finished since."""
        cdef VmState vs = self.vs
        if vs.mmu_invalidate_in_progress and vs._range_start <= gfn < vs._range_end:
            return True
        return self.stats.v[S_MMU_INVALIDATE_SEQ] != mmu_seq

    # -- the phases ------------------------------------------------------------------------------

    cdef inline void _prefetch_leaves(self, uint64_t gfn, bint private_access) noexcept:
        """Ask, at the fault's entry, for the leaves its lookups read: the attribute run's (read
        first, right after these hints), the SPTE's and,
        for a private access, the guest_memfd folio's (in the memslot seen last), for a shared
        one the shared backing block's and the 2M word's. In fragmented memory each is a
        cold leaf of a large map; asked for together with the attribute lookup that follows,
        their waits overlap instead of running one after the other. Only hints: nothing is
        read from the leaves asked for, and a guess in the wrong memslot only fetches lines
        unused."""
        cdef SharedBackingState sb = self.shared
        if _finger_leaf(self.attrs, gfn) == NULL:
            # the attribute leaf first (unless page_fault_many's hint already left the finger
            # on it): the lookup right after these hints reads it, so it waits the longest
            _prefetch_finger(self.attrs, gfn)
        _prefetch_finger(self.sptes, gfn)
        if private_access:
            if type(self.gpath) is GmemPath:
                (<GmemPath>self.gpath)._prefetch_folio(gfn)
        elif (self.c_m2 is not None and sb is not None and sb._map is not None
                and self.c_base <= gfn < self.c_end):
            _prefetch_finger(sb._map, (self.c_ugfn + (gfn - self.c_base)) & ~((1ULL << sb.order) - 1))
            _prefetch_finger(self.c_m2, gfn >> 9)

    cdef int _begin(self, PageFault f) except -1:
        """Entry (§4.2 steps 1-2): ``is_private`` and the fast path. The gfn's attribute word is
        read once, here, into ``f.attr``: the pfn lookup runs right after this phase in both
        drivers (the timeline only yields inside it), so its mismatch check reads the value the
        kernel's second ``kvm_mem_is_private`` would."""
        cdef uint64_t gfn = f.gfn, v
        cdef Run r
        if self.vs._prefetch:
            self._prefetch_leaves(gfn, f.private_access)
        cdef uint64_t attr = rangemap_get(self.attrs, gfn)
        cdef bint attr_private = (attr & _F_ATTR_PRIVATE) != 0
        f.attr = attr
        if self.ahead:
            # the next call's attribute leaf, with the finger left on it: nothing between here
            # and that call's lookup reads this map, and the rest of this fault overlaps the wait
            self.ahead = False
            _prefetch_finger(self.attrs, self.ahead_gfn)
        if self.attr_source:
            f.is_private = attr_private
        elif self.access_decides:
            f.is_private = f.private_access
        elif self.access_or_attr:
            f.is_private = f.private_access or attr_private
        else:
            f.is_private = bool(self.fault_is_private(self.vm, gfn, f.private_access))
        r = self.sptes._run_pos_c(gfn, &f.spte_pos)
        v = r.value
        f.spte = v
        f.spte_lo = r.start
        f.spte_hi = r.end
        f.spte_map = <void*>self.sptes
        if v:
            f.single = True
            # page_fault_can_be_fast: never on a private/shared mismatch of a private-mem VM;
            # for a present SPTE only write faults. An SPTE that already allows the write is
            # spurious.
            if (not (self.has_private_mem and f.is_private != attr_private)
                    and f.write and v & _F_SPTE_WRITABLE):
                f.ret = "spurious"
                f.level = _f_level(v)
                f.delta = _decode_delta(v)
        return 0

    cdef int _faultin(self, PageFault f) except -1:
        """``kvm_mmu_faultin_pfn`` (§4.2 step 4): snapshot, mismatch, slot checks, pfn lookup.
        For a batch it also shrinks ``f.end`` to the gfns that take exactly this path."""
        cdef uint64_t gfn = f.gfn, end, hva, key, flags, k, v, npages
        cdef int64_t npop
        cdef Run r
        cdef int level, shift
        cdef uint64_t cap = <uint64_t>-1
        cdef VmState vs = self.vs
        f.mmu_seq = self.stats.v[S_MMU_INVALIDATE_SEQ]
        if f.is_private != ((f.attr & _F_ATTR_PRIVATE) != 0):  # the attribute fault_begin read
            _memory_fault_exit(f, _F_EFAULT)
            return 0
        # the gfn's memslot key: the slot0 run read last while slot0 is unchanged (memslots
        # are few and large, so consecutive faults mostly fall in the same run)
        _memo_get(&self.s0, self.slot0, gfn, &key)
        if not key:
            if f.is_private:
                _memory_fault_exit(f, _F_EFAULT)
            else:
                f.ret = "emulate"  # MMIO (kvm_handle_noslot_fault); MMIO SPTEs are not cached
                f.end = gfn + 1
            return 0
        if key == self.c_key + 1 and self.c_ms is not None and not self.c_ms.invalid:
            # The memslot read last: a memslot leaves vm._slots only invalid (memslots._delete
            # marks it first), so a valid one of this key is still the one the dict holds.
            slot = self.c_slot
        else:
            slot = self.slots[key - 1]
            self._slot(slot)
        f.slot = slot
        if self.c_ms.invalid:
            # A slot being deleted or moved: RET_PF_RETRY, except that since 6.18 a prefetch
            # fault (KVM_PRE_FAULT_MEMORY) fails with -EAGAIN instead (kvm_mmu_faultin_pfn).
            if f.prefetch and self.prefault_eagain:
                f.ret = "exit"
                f.errno = _F_EAGAIN
                f.end = gfn + 1
                return 0
            f.ret = "retry"
            return 0
        if vs.mmu_invalidate_in_progress:
            if self._retry_gfn(f.mmu_seq, gfn):  # mmu_invalidate_retry_gfn_unsafe
                f.ret = "retry"
                return 0
            # An open invalidation turns back only the gfns of its range (the check looks at
            # the faulting gfn): the per-page faults of a batch below the range take this same
            # path up to its start, and above it all the way (docs/kvm-model.md, "Batched
            # faults"). With many vCPUs converting at once one is nearly always open.
            if gfn < vs._range_start:
                cap = vs._range_start
                if cap <= gfn + 1:
                    f.single = True
        end = gfn + 1
        if not f.single:
            rangemap_run_at(self.attrs, gfn, &r)
            end = min(f.limit, self.c_end, r.end, cap)
            rangemap_run_at(self.sptes, gfn, &r)
            end = min(end, r.end)
        flags = self.c_ms.flags
        if f.is_private:
            # kvm_gmem_get_pfn: its typed steps (GmemPath.get_pfn, pkvm/_gmem.pxi) called
            # directly once the VM has them; the Python entry builds them on first use.
            gp = self.gpath
            if gp is None:
                gp = self.d.get("_gmem_path")
                if type(gp) is GmemPath:
                    self.gpath = gp
            if type(gp) is GmemPath:
                end = <uint64_t>(<GmemPath>gp)._get_pfn(f, <int64_t>end)
            else:
                end = self.gmem_get_pfn(self.vm, f, end)
            if not _f_running(f):
                return 0
            f.max_level = _level_for_order(f.order)
            f.map_writable = not (flags & _F_MEM_READONLY)
        else:
            if f.write and flags & _F_MEM_READONLY:
                f.ret = "emulate"  # KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn
                f.end = gfn + 1
                return 0
            hva = self.c_ugfn + (gfn - self.c_base)
            smap = self.shared_map
            if not f.single:
                rangemap_run_at(smap, hva, &r)
                if r.end - hva < end - gfn:
                    end = gfn + (r.end - hva)
            f.host_level = self.host_level
            if self.host_level > 1 and not f.single:
                # disallow_lpage uniform over the batch at 2M and 1G
                for level in range(2, 4):
                    shift = _f_shift(level)
                    rangemap_run_at(self.c_m2 if level == 2 else self.c_m1, gfn >> shift, &r)
                    if r.end <= (end >> shift):  # (r.end << shift) < end, without overflow
                        end = r.end << shift
            npages = end - gfn
            # SharedBacking.populate (its lookup of the first block also gives the word at hva,
            # populated now or already)
            # (one page: its common cases without the general loop, -1 where that must run)
            npop = _shared_populate1(self.shared, hva, &v) if npages == 1 else -1
            if npop < 0:
                try:
                    npop = _shared_populate(self.shared, hva, hva + npages, &v)
                except self.kvm_error:
                    f.ret = "exit"  # GUP failed: -EFAULT
                    f.errno = _F_EFAULT
                    f.end = gfn + 1
                    return 0
            if npop:
                self.stats.v[S_SHARED_PAGES_POPULATED] += npop
                # VM._charge_alloc
                _charge_op_u(self.ledger, &self.o_salloc, self.alloc_op, <uint64_t>npop >> self.shared.order)
            f.delta = <int64_t>hva + _decode_delta(v) - <int64_t>gfn
            f.map_writable = not (flags & _F_MEM_READONLY)
        f.end = end
        return 0

    cdef int _max_level(self, PageFault f) except -1:
        """``kvm_mmu_max_mapping_level`` + the skips of ``kvm_mmu_hugepage_adjust`` (§3.5)."""
        cdef int top, level, cap
        self._slot(f.slot)
        if self.c_ms.flags & _F_MEM_LOG_DIRTY:
            return 1
        top = f.max_level if f.is_private else 3
        # (a shared fault's cap is the host level: at 4K the words below need not be read)
        if top == 1 or (not f.is_private and f.host_level == 1):
            return 1
        level = top
        while level > 1 and rangemap_get(self.c_m2 if level == 2 else self.c_m1, f.gfn >> _f_shift(level)):
            level -= 1
        if level == 1:
            return 1
        if f.is_private:
            cap = f.max_level
            if self.has_gmem_max:
                limit = self.gmem_max_level(self.vm, <int64_t>f.gfn + f.delta, True)
                if limit:
                    cap = min(cap, limit)
            if self.has_plat_max:
                limit = self.plat_max_level(self.vm, f.gfn, True)
                if limit:
                    cap = min(cap, limit)
        else:
            cap = f.host_level
        return min(level, cap)

    cdef int _stale(self, PageFault f) except -1:
        """``is_page_fault_stale`` under ``mmu_lock`` (§4.2 step 6): a racing invalidation."""
        if self._retry_gfn(f.mmu_seq, f.gfn):
            f.ret = "retry"
            f.end = f.gfn + 1
        return 0

    cdef int _install(self, PageFault f) except -1:
        """``kvm_tdp_mmu_map`` (§4.2 step 7): hugepage adjust, then the leaf or leaves. New
        private leaves of a VM with a mirror root first go to the external page table
        (``set_external_spte``, in Python); if that fails the mirror SPTEs keep their value."""
        cdef int level = self._max_level(f), shift, r
        cdef uint64_t gfn = f.gfn, n, whole, base, old
        cdef const RunPos *pos
        cdef uint64_t value = _make_spte(f.delta, level, f.is_private, f.map_writable)
        cdef bint external = f.is_private and self.mirror
        if level == 1 and f.end - gfn > 1:
            if external and not self.set_external(self.vm, f, gfn, f.end, level):
                return 0
            _map_run(self.sptes, self.stats, gfn, f.end, level, value)
            f.nfaults = f.end - gfn
        else:
            shift = _f_shift(level)
            n = 1ULL << shift
            whole = (f.end - gfn) >> shift if not gfn & (n - 1) else 0
            if whole > 1:
                if external and not self.set_external(self.vm, f, gfn, gfn + (whole << shift), level):
                    return 0
                _map_run(self.sptes, self.stats, gfn, gfn + (whole << shift), level, value)
                f.nfaults = whole
                f.end = gfn + (whole << shift)
            else:
                base = gfn & ~(n - 1)
                # the SPTE word fault_begin read, while the map is unchanged since
                pos = NULL
                if f.spte_map == <void*>self.sptes and f.spte_pos.version == self.sptes.version:
                    old = f.spte
                    pos = &f.spte_pos
                else:
                    old = rangemap_get(self.sptes, gfn)
                if (external and old != value
                        and not self.set_external(self.vm, f, base, base + n, level)):
                    return 0
                if external:
                    old = rangemap_get(self.sptes, gfn)  # (set_external_spte ran Python)
                    pos = NULL
                f.end = gfn + 1
                f.nfaults = 1
                r = _map_leaf_at(self.sptes, self.stats, gfn, level, value, self.ledger, old, pos,
                                 f.spte_lo, f.spte_hi)  # VM._charge
                if r == 2:
                    self.vm._flush_remote_tlbs()
                elif r == 1:
                    f.ret = "spurious"
        f.level = level
        if _f_running(f):
            f.ret = "fixed"
        return 0

    cdef inline int _taken(self, uint64_t n) except -1:
        """``n`` faults taken: counted and charged (``npf_fault``)."""
        self.stats.v[S_PF_TAKEN] += n
        _charge_op_u(self.ledger, &self.o_npf, "npf_fault", n)
        return 0

    cdef inline int _retry_counted(self, uint64_t gfn) except -1:
        """A fault at ``gfn`` returned ``RET_PF_RETRY``: counted, and the ``retry`` event."""
        self.stats.v[S_PF_RETRY] += 1
        if self.ledger.traced:
            self.vm._emit("retry", gfn, gfn + 1, "fault", 1)
        return 0

    cdef int _retried_one(self, uint64_t gfn) except -1:
        """The page ``gfn`` of a batch took ``RET_PF_RETRY`` and faults again (the timeline's
        batch that an invalidation overlapped, ``_batch_valid_end``): a fault taken and
        retried, counted and charged as :meth:`_settle` does a retried fault, with its
        ``retry`` event and no ``fault`` event (docs/events.md)."""
        self._taken(1)
        return self._retry_counted(gfn)

    cdef FaultResult _finish(self, PageFault f):
        """Post-processing in ``kvm_mmu_do_page_fault`` / ``kvm_mmu_page_fault`` (§4.2 step 9)."""
        cdef _FaultOut o
        ret = self._settle(f, &o)
        return _result_of(ret, f, &o)

    cdef object _settle(self, PageFault f, _FaultOut *o):
        """:meth:`_finish`'s counters and charges: returns the result's ``ret`` and fills in
        ``o`` its other fields (read with ``f``: :func:`_result_of`), so that a caller that
        stores them elsewhere (``FaultPath.calls``) need not build the result."""
        cdef Counters st = self.stats
        ret = f.ret
        cdef bint fixed = _ret_is(ret, "fixed")
        cdef uint64_t n = f.nfaults if fixed else 1
        o.has_level = o.has_pfn = o.has_err = o.has_exit = o.has_mf = False
        if f.prefetch:
            # kvm_mmu_do_page_fault(prefetch=true): pf_fixed only; nothing exits to userspace.
            if fixed:
                st.v[S_PF_FIXED] += n
                self._charge("pre_fault_page", n)
                _out_leaf(f, o)
                return ret
            self._charge("pre_fault_page", 1)
            if _ret_is(ret, "spurious"):
                _out_leaf(f, o)
                return ret
            if f.errno:
                o.has_err = True
                o.err = f.errno
            elif _ret_is(ret, "emulate"):
                o.has_err = True
                o.err = _F_ENOENT
            return ret
        self._taken(n)
        if fixed:
            st.v[S_PF_FIXED] += n
            _out_leaf(f, o)
            return ret
        if _ret_is(ret, "spurious"):
            st.v[S_PF_SPURIOUS] += 1
            _out_leaf(f, o)
            return ret
        if _ret_is(ret, "retry"):
            self._retry_counted(f.gfn)
            return ret
        if _ret_is(ret, "emulate"):
            st.v[S_PF_EMULATE] += 1
            if not f.is_private:
                return ret
            _memory_fault_exit(f, _F_EFAULT)  # KVM cannot emulate private accesses
            ret = "exit"
        if _ret_is(ret, "exit"):
            if f.memory_fault is not None:
                o.has_exit = True
                o.exit_reason = _F_EXIT_MEMORY_FAULT
                st.v[S_MEMORY_FAULT_EXITS] += 1
            self._charge("userspace_exit", 1)
            o.has_mf = True
            o.has_err = True
            o.err = f.errno
            return "exit"
        return ret

    cdef int _after(self, vcpu, PageFault f, FaultResult r, uint64_t gfn, bint private, bint write,
                    object took) except -1:
        """What ``npf_interception`` does after the MMU: the ``fault`` event (``took``: the
        fault's modeled ns) and, when the MMU returned > 0, the platform's RMP-fault handler."""
        if self.ledger.traced and not f.prefetch:
            self.emit_fault(vcpu, f, r, gfn, private, write, took)
        if not f.prefetch and self._takes_rmp(vcpu, r.ret):
            self.handle_rmp(vcpu, gfn << 12, f.is_private, write, r)
        return 0

    cdef inline bint _takes_rmp(self, vcpu, ret) except -1:
        """svm's npf_interception: the RMP-fault handler runs when the MMU returned > 0 and
        the #NPF error code has the RMP bit, which a vCPU that tracks it records as
        rmp_npf (one without the attribute gets the handler on every positive return)."""
        return (self.has_rmp and (_ret_is(ret, "fixed") or _ret_is(ret, "spurious") or _ret_is(ret, "retry"))
                and self._rmp_npf(vcpu))

    cdef inline bint _rmp_npf(self, vcpu) except -1:
        """``getattr(vcpu, "rmp_npf", True)``'s truth, the slot read in C for the class seen last."""
        cdef PyObject *p
        if type(vcpu) is self.c_cls and self.c_roff >= 0:
            p = _member_at(vcpu, self.c_roff)
            if p == NULL:
                return True  # unset: getattr's default
            if p == <PyObject*>True:
                return True
            if p == <PyObject*>False:
                return False
            return bool(<object>p)
        return bool(getattr(vcpu, "rmp_npf", True))

    # -- the synchronous driver ------------------------------------------------------------------

    cdef tuple _run(self, vcpu, uint64_t gfn, uint64_t limit, bint private, bint write, bint prefetch):
        """Every phase of one (batched) fault to completion: ``(f, result)``."""
        cdef PageFault f
        cdef VmState vs = self.vs
        self._ops()
        if vs._sched is not None:
            return self._tl_run(vcpu, gfn, limit, private, write, prefetch)
        f = _new_fault(gfn, limit, private, write, prefetch)
        return f, self._phases(vcpu, f, gfn, private, write)

    cdef inline tuple _tl_run(self, vcpu, uint64_t gfn, uint64_t limit, bint private, bint write,
                              bint prefetch):
        """``self.timeline_run(vcpu, gfn, limit, private, write, prefetch)``: the core's
        :func:`fault_timeline` at C level, on this path and the VM's timeline."""
        if self.tl_core:
            return _fault_timeline(vcpu, self.vm, <SchedHooks?>self.vs._sched, self, gfn, limit,
                                   private, write, prefetch)
        return self.timeline_run(vcpu, gfn, limit, private, write, prefetch)

    cdef FaultResult _run1(self, vcpu, uint64_t gfn, bint private, bint write):
        """:meth:`_run` of one page, not prefetched: the result alone (no tuple made). The
        PageFault is reused for the next call when nothing else kept a reference to it (as
        ``calls`` does), its object fields dropped meanwhile."""
        cdef PageFault f
        cdef FaultResult r
        cdef VmState vs = self.vs
        self._ops()
        if vs._sched is not None:
            return self._tl_run(vcpu, gfn, gfn + 1, private, write, False)[1]
        f = self._take_spare(gfn, private, write)
        r = self._phases(vcpu, f, gfn, private, write)
        if Py_REFCNT(f) == 1:  # nothing kept it: reuse it
            self._keep_spare(f)
        return r

    cdef inline PageFault _take_spare(self, uint64_t gfn, bint private, bint write):
        """A new one-page fault that is not prefetched: the spare one, initialized, if any."""
        cdef PageFault f = self.spare
        if f is None:
            return _new_fault(gfn, gfn + 1, private, write, False)
        self.spare = None
        f._init(gfn, gfn + 1, private, write, False)
        return f

    cdef inline void _keep_spare(self, PageFault f) noexcept:
        """Keep ``f``, which nothing else holds, for the next one-page fault (its object fields
        dropped meanwhile)."""
        f.slot = None
        f.memory_fault = None
        self.spare = f

    cdef int _mmu(self, PageFault f, uint64_t gfn) except -1:
        """The synchronous driver's MMU phases over the new ``f`` (entry to install)."""
        cdef VmState vs = self.vs
        self._begin(f)
        if _f_running(f) and self.armed and "mmu_topup" in self.armed:
            self.topup(self.vm, f, gfn)
        if _f_running(f):
            self._faultin(f)
        # is_page_fault_stale can only be true with an invalidation open or finished since the
        # snapshot: skip the call otherwise (most faults).
        if _f_running(f) and (vs.mmu_invalidate_in_progress or self.stats.v[S_MMU_INVALIDATE_SEQ] != f.mmu_seq):
            self._stale(f)
        if _f_running(f):
            self._install(f)
        return 0

    cdef FaultResult _phases(self, vcpu, PageFault f, uint64_t gfn, bint private, bint write):
        """The synchronous driver's phases over the new ``f`` (no timeline attached)."""
        cdef Ledger L = self.ledger
        cdef int64_t t0 = L.ns  # the modeled ns at entry (t0big when past int64)
        t0big = L.big
        self._mmu(f, gfn)
        cdef FaultResult r = self._finish(f)
        took = None  # the fault's modeled ns, made only for the fault event
        if L.traced and not f.prefetch:
            took = L.now() - (t0 if t0big is None else t0big)
        self._after(vcpu, f, r, gfn, private, write, took)
        return r

    cdef object _phases_into(self, vcpu, PageFault f, uint64_t gfn, bint private, bint write,
                             _FaultOut *o):
        """:meth:`_phases` of a fault that is not prefetched, for ``FaultPath.calls``: returns
        the result's ``ret`` and fills in ``o`` (:meth:`_settle`), or returns the result
        itself where the fault event or the RMP-fault handler took one (then ``o`` is unset)."""
        cdef Ledger L = self.ledger
        cdef int64_t t0 = L.ns
        cdef FaultResult r = None
        t0big = L.big
        self._mmu(f, gfn)
        ret = self._settle(f, o)
        # _after, with the result built only for the hooks that take it
        if L.traced:
            r = _result_of(ret, f, o)
            self.emit_fault(vcpu, f, r, gfn, private, write, L.now() - (t0 if t0big is None else t0big))
        if self._takes_rmp(vcpu, ret):
            if r is None:
                r = _result_of(ret, f, o)
            self.handle_rmp(vcpu, gfn << 12, f.is_private, write, r)
        return ret if r is None else r

    cdef inline int _mode(self, object cls) except -1:
        """How ``cls._fault`` runs one page (``_FP_*``): the class that defines ``_fault`` says,
        with ``_fault_detour``, which of its slots makes it leave the base fault."""
        cdef int mode = _FP_PYTHON
        if cls is not self.c_cls:
            detour = None
            for k in cls.__mro__:
                kd = k.__dict__
                if "_fault" in kd:
                    if kd["_fault"] is self.base_fault:
                        mode = _FP_GENERIC
                    elif kd.get("_fault_detour") is not None:
                        mode = _FP_DETOUR
                        detour = kd["_fault_detour"]
                    break
            self.c_doff = _member_offset(cls, detour) if detour is not None else -1
            self.c_roff = _member_offset(cls, "rmp_npf")
            self.c_cls = cls
            self.c_mode = mode
            self.c_detour = detour
        return self.c_mode

    cdef bint _generic(self, vcpu) except -1:
        """Whether ``vcpu._fault`` is the base fault (:meth:`_run1` runs it) for this call."""
        cdef int mode = self._mode(type(vcpu))
        cdef PyObject *p
        if mode == _FP_DETOUR:
            p = _member_at(vcpu, self.c_doff) if self.c_doff >= 0 else NULL
            if p != NULL:
                if p == <PyObject*>None:
                    mode = _FP_GENERIC
            elif getattr(vcpu, self.c_detour) is None:  # (an unset slot raises AttributeError)
                mode = _FP_GENERIC
        return mode == _FP_GENERIC

    cdef object _one(self, vcpu, uint64_t gfn, bint private, bint write):
        """``Vcpu.page_fault`` after its checks: ``vcpu._fault(gfn, gfn + 1, ...)[1]``."""
        if self._generic(vcpu):
            return self._run1(vcpu, gfn, private, write)
        return vcpu._fault(gfn, gfn + 1, private, write)[1]

    # -- entry points ----------------------------------------------------------------------------

    def page_fault(self, vcpu, gpa, private, write):
        """``Vcpu.page_fault``: the argument checks, the dead-VM check, then the fault."""
        return self._page_fault(vcpu, gpa, private, write)

    cdef object _page_fault(self, vcpu, object gpa, object private, object write):
        """:meth:`page_fault`'s body (also the vCPU entry's, :func:`_vcpu_fault_fast`)."""
        cdef uint64_t gfn, v
        if _is_exact_int(gpa) and pkvm_small_u64(gpa, &v) and v < (1ULL << 52):
            gfn = v >> 12  # an int in [0, 2**52), read from its digits
        else:
            gfn = self.gpa_to_gfn(gpa)  # converts an int-like, or raises
        if type(private) is not bool or type(write) is not bool:
            raise TypeError("private and write must be bools")
        if self.vs.vm_dead or self.vs._in_callback:  # EIO, or EDEADLK from an event callback
            self.vm._check_alive()
        return self._one(vcpu, gfn, private is True, write is True)

    def fault(self, vcpu, uint64_t gfn, uint64_t limit, bint private, bint write):
        """``Vcpu._fault``: ``(faults taken, result)``."""
        return self._fault(vcpu, gfn, limit, private, write)

    cdef tuple _fault(self, vcpu, uint64_t gfn, uint64_t limit, bint private, bint write):
        """:meth:`fault`, called in C by the SNP guest's PVALIDATE walk (pkvm/_snp_guest.pxi)."""
        f, r = self._run(vcpu, gfn, limit, private, write, False)
        return ((<PageFault>f).nfaults if (<FaultResult>r).ret == "fixed" else 1), r

    def run(self, vcpu, uint64_t gfn, uint64_t limit, bint private, bint write, bint prefetch=False):
        """``pkvm.kvm.mmu.run_fault``: ``(f, result)``."""
        return self._run(vcpu, gfn, limit, private, write, prefetch)

    def calls(self, vcpu, const uint64_t[::1] gpas, const uint8_t[::1] private, const uint8_t[::1] write,
              object check, dict codes, int8_t[::1] ret, int8_t[::1] level, int64_t[::1] pfn,
              int32_t[::1] err, int32_t[::1] retries, dict extras, int64_t[::1] done):
        """``Vcpu.page_fault_many``'s loop: ``check()`` (or, when None, the dead-VM check), then
        ``page_fault`` after its argument checks, per element. ``private`` / ``write`` hold
        one flag per call, or one flag for all.

        Call ``i``'s result goes into the arrays (``ret[i]`` its code in ``codes``, ``level``
        0 for None, ``pfn`` -1 for None, ``err`` 0 for None, ``retries``) and is dropped, so a
        batch keeps no object per call; a result the arrays cannot give back exactly (an exit
        reason, a memory-fault triple, a loop name) is kept as ``extras[i]`` too. A call that
        runs the base fault without a timeline writes its row from the finish's fields
        (:meth:`_phases_into`) and builds a ``FaultResult`` only for ``extras``, the fault
        event or the RMP-fault handler. ``done[0]`` counts the calls that returned, also when
        one raises."""
        cdef Py_ssize_t i = 0, n = gpas.shape[0]
        cdef Py_ssize_t sp = 0 if private.shape[0] == 1 and n != 1 else 1
        cdef Py_ssize_t sw = 0 if write.shape[0] == 1 and n != 1 else 1
        cdef FaultResult r
        last_ret = last_code = None  # the ret string of the call before and its code
        if (sp and private.shape[0] != n) or (sw and write.shape[0] != n):
            raise ValueError("FaultPath.calls: the arrays' lengths differ")
        if ret.shape[0] < n or level.shape[0] < n or pfn.shape[0] < n or err.shape[0] < n \
                or retries.shape[0] < n or done.shape[0] < 1:
            raise ValueError("FaultPath.calls: an output array is shorter than the calls")
        cdef VmState vs = self.vs
        cdef uint64_t gfn
        cdef bint p, w
        cdef _FaultOut o
        cdef PageFault f
        try:
            while i < n:
                if check is None:
                    if vs.vm_dead or vs._in_callback:
                        self.vm._check_alive()
                else:
                    check()
                gfn = gpas[i] >> 12
                p = private[i * sp] != 0
                w = write[i * sw] != 0
                if vs._prefetch and i + 1 < n:
                    # the next call's attribute leaf, the one its entry cannot ask for early:
                    # asked for by this call's _begin, after its own attribute lookup
                    self.ahead_gfn = gpas[i + 1] >> 12
                    self.ahead = True
                if self._generic(vcpu):
                    self._ops()  # (_run1, inline: the same phases without a FaultResult per call)
                    if vs._sched is None:
                        f = self._take_spare(gfn, p, w)
                        x = self._phases_into(vcpu, f, gfn, p, w, &o)
                        if type(x) is FaultResult:
                            r = <FaultResult>x
                        else:
                            if x is not last_ret:  # (most calls return the string the one before did)
                                last_code = codes.get(x)
                                last_ret = x
                            _store_fields(x, f, &o, i, last_code, ret, level, pfn, err, retries, extras)
                            r = None
                        x = None
                        if Py_REFCNT(f) == 1:  # nothing kept it: reuse it
                            self._keep_spare(f)
                        f = None
                    else:
                        r = self._tl_run(vcpu, gfn, gfn + 1, p, w, False)[1]
                else:
                    r = vcpu._fault(gfn, gfn + 1, p, w)[1]
                if r is not None:
                    rs = r.ret
                    if rs is not last_ret:
                        last_code = codes.get(rs)
                        last_ret = rs
                    _store_result(r, i, last_code, ret, level, pfn, err, retries, extras)
                self.ahead = False  # (a call that did not reach _begin: no hint outlives it)
                i += 1
        finally:
            self.ahead = False
            done[0] = i

    def after(self, vcpu, PageFault f, FaultResult r, uint64_t gfn, bint private, bint write, took):
        """The tail of ``run_fault`` (the event, the RMP-fault handler) for the timeline's driver."""
        self._ops()
        self._after(vcpu, f, r, gfn, private, write, took)

    # the phases, for pkvm.kvm.mmu's functions of the same names (the timeline's driver, tests)
    def begin(self, PageFault f):
        self._ops()
        self._begin(f)

    def faultin(self, PageFault f):
        self._ops()
        self._faultin(f)

    def max_level(self, PageFault f):
        self._ops()
        return self._max_level(f)

    def stale(self, PageFault f):
        self._ops()
        self._stale(f)

    def install(self, PageFault f):
        self._ops()
        self._install(f)

    def finish(self, PageFault f):
        self._ops()
        return self._finish(f)


# ``Vcpu.page_fault`` on a vCPU: its :class:`VcpuFault` entry's ``page_fault``, a METH_FASTCALL
# builtin whose C function is :func:`_vcpu_fault_fast` (the table entry is VcpuFault.page_fault's
# own with the C function replaced, written once at import): a call with ``gpa`` positional and
# ``private`` (and ``write``) by keyword goes to FaultPath's checks and the fault with no Python
# frame; any other form of call goes to the Python method, whose errors it keeps.

@cython.final
@cython.auto_pickle(False)  # a vCPU's live state: never pickled on its own
cdef class VcpuFault:
    """The page-fault entry of one vCPU (kept in its ``_page_fault`` slot by
    :class:`PageFaultMethod`): its VM's :class:`FaultPath`, the vCPU and the Python method
    ``func`` (``Vcpu.page_fault``); ``bound`` is :meth:`page_fault` bound to it, built once."""

    cdef FaultPath path
    cdef object vcpu, func
    cdef readonly object bound

    def __init__(self, FaultPath path not None, vcpu, func):
        self.path = path
        self.vcpu = vcpu
        self.func = func
        self.bound = self.page_fault

    @cython.binding(False)  # a method descriptor (see _vcpu_fault_fast)
    def page_fault(self, *args, **kwargs):
        """``Vcpu.page_fault(gpa, *, private, write=False)`` of this vCPU."""
        return self.func(self.vcpu, *args, **kwargs)


cdef object _vcpu_fault_fast(VcpuFault self, PyObject **args, Py_ssize_t nargs, PyObject *kwnames):
    """``VcpuFault.page_fault``: ``gpa`` and the keywords ``private`` and ``write`` (their names
    the interned strings a call site passes) read here; every other call goes to ``func``."""
    cdef Py_ssize_t nk = PyTuple_GET_SIZE(<object>kwnames) if kwnames != NULL else 0
    cdef Py_ssize_t i
    cdef PyObject *k
    cdef PyObject *priv = NULL
    cdef PyObject *wr = NULL
    if nargs == 1 and nk >= 1 and nk <= 2:
        for i in range(nk):
            k = PyTuple_GET_ITEM(<object>kwnames, i)
            if k == <PyObject*>_KW_PRIVATE and priv == NULL:
                priv = args[1 + i]
            elif k == <PyObject*>_KW_WRITE and wr == NULL:
                wr = args[1 + i]
            else:
                priv = NULL
                break
        if priv != NULL:
            return self.path._page_fault(self.vcpu, <object>args[0], <object>priv,
                                         <object>wr if wr != NULL else False)
    return _call_general(_vcpu_fault_general, self, args, nargs, kwnames)


cdef str _KW_PRIVATE = "private"
cdef str _KW_WRITE = "write"
cdef object _vcpu_fault_general = pkvm_fastcall_override(VcpuFault, 3, "page_fault",
                                                         <void*>_vcpu_fault_fast)


@cython.final
@cython.auto_pickle(False)
cdef class PageFaultMethod:
    """``Vcpu.page_fault`` as a descriptor: read on a vCPU whose VM has its
    :class:`FaultPath`, it is the vCPU's :class:`VcpuFault` entry's bound ``page_fault`` (the
    fault called with no Python frame of its own; the entry is built on the first read and
    kept in the vCPU's ``_page_fault`` slot); read on the class, or on a vCPU without a path
    or that slot, it is the Python method ``func`` (its docstring and signature, and the same
    call)."""

    cdef readonly object __func__
    cdef object c_cls           # the vCPU class read last, and where its _page_fault slot is
    cdef Py_ssize_t c_off       # (_member_offset; -1: no such slot)

    def __init__(self, func):
        if not callable(func):
            raise TypeError(f"PageFaultMethod needs a function, not {type(func).__name__}")
        self.__func__ = func
        self.c_off = -1

    def __get__(self, obj, objtype):
        cdef PyObject *p
        if obj is None:
            return self.__func__
        cls = type(obj)
        if cls is not self.c_cls:
            self.c_off = _member_offset(cls, "_page_fault")
            self.c_cls = cls
        if self.c_off >= 0:
            p = _member_at(obj, self.c_off)
            if p != NULL and type(<object>p) is VcpuFault and (<VcpuFault>p).vcpu is obj:
                return (<VcpuFault>p).bound  # (a copied vCPU's entry is its original's: rebuilt)
            vm = getattr(obj, "vm", None)
            path = getattr(vm, "_fault_path", None)
            if type(path) is FaultPath and (<FaultPath>path).vm is vm:
                e = VcpuFault(path, obj, self.__func__)
                setattr(obj, "_page_fault", e)
                return e.bound
        return self.__func__.__get__(obj, objtype)
