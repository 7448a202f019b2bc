# The typed hot state of three Python classes (issue 16), declared in _core.pxd. Included from
# _core.pyx. ``pkvm.kvm.vm.VM`` derives from :class:`VmState`, ``pkvm.kvm.memslots.Memslot``
# from :class:`MemslotState`, ``pkvm.host.hostmem.HostMemory`` from :class:`HostMemoryState` and
# ``pkvm.host.hostmem.SharedBacking`` from :class:`SharedBackingState`:
# the fields a nested page fault reads (the VM's timeline, op table, dead flag and invalidation
# state; a memslot's flags, invalid flag and file; the allocator's map, bounds, cursor and
# count) are C members, read and written in C by the fault path (pkvm/_fault.pxi), the
# guest_memfd steps and the allocator (pkvm/_gmem.pxi) and the attribute ioctl
# (pkvm/_attr.pxi) instead of through the instance dict or a slot descriptor. Python code
# reads and writes them by the same names, as ints, bools and objects, as before.
#
# Copying and pickling keep working as for the plain classes: ``__reduce_ex__`` gives the
# object's class and every attribute (the C members, the instance dict, the subclasses'
# ``__slots__``), and ``__setstate__`` sets them back by name.

import copyreg as _copyreg


cdef object _collect_state(object obj, tuple names):
    """Every attribute of ``obj``: ``names`` (its C members), its instance dict and the
    ``__slots__`` of its classes that are set."""
    state = {}
    for name in names:
        state[name] = getattr(obj, name)
    for k in type(obj).__mro__:
        slots = k.__dict__.get("__slots__", ())
        if isinstance(slots, str):
            slots = (slots,)
        for name in slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                state[name] = getattr(obj, name)
    d = getattr(obj, "__dict__", None)
    if d:
        state.update(d)
    return state


cdef int _restore_state(object obj, object state) except -1:
    if type(state) is not dict:
        raise TypeError(f"{type(obj).__name__}.__setstate__ takes a dict, not {type(state).__name__}")
    for name, value in (<dict>state).items():
        setattr(obj, name, value)
    return 0


@cython.auto_pickle(False)
cdef class VmState:
    """The typed hot state of a :class:`pkvm.kvm.vm.VM` (its base class): ``_sched`` (the
    attached timeline or None), ``_platform`` (the op table), ``vm_dead``,
    ``mmu_invalidate_in_progress``, ``_range_start`` / ``_range_end`` (the invalidation
    range, 2**64 - 1 when none), ``nr_vcpus`` (the vCPU count the VM was created for, which
    a remote TLB flush targets at least) and ``_prefetch``: whether the typed per-page paths
    issue software prefetches for the leaves a call is about to read (True; False only to
    measure what the hints save, ``bench/prefetch_ab.py``: every result is the same either
    way). The actor bookkeeping of :meth:`_set_actor` (``_actor``, ``_actor_ns``,
    ``_actor_tot``, ``_actor_mark``, ``_cost_ns``) is here too: the timeline switches the
    acting actor at every resume of a thread and the VMM at every exit it answers."""

    def __cinit__(self, *args, **kwargs):
        self._prefetch = True

    def _set_actor(self, actor):
        """Charge from now on to ``actor`` (unchecked: ``VM.acting`` is the public way);
        returns the previous actor (to restore it). The actor leaving has its clock
        (``_actor_tot``) advanced by what was charged since it took over; a new actor gets
        empty cells and a zero clock."""
        return self._set_actor_c(actor)

    cdef object _set_actor_c(self, actor):
        prev = self._actor
        if actor is prev or actor == prev:
            return prev
        cdef int64_t o, mk, r
        cells = self._actor_ns.get(actor)
        sched = self._sched
        if isinstance(sched, SchedHooks) and (<SchedHooks>sched).vm is self \
                and _led_ok(<SchedHooks>sched):
            led = (<SchedHooks>sched)._led  # the timeline's copy of self._ledger (_hook_led)
        else:
            led = self._ledger
        if cells is None:
            cells = self._actor_ns[actor] = (<Ledger?>led).new_cells()
            self._actor_tot[actor] = 0
        m = (<Ledger?>led).now()
        tot = self._actor_tot
        old = tot[prev]
        mark = self._actor_mark
        if (type(old) is int and type(mark) is int and (<Ledger>led).big is None
                and _as_i64(old, &o) and _as_i64(mark, &mk)
                and not pkvm_sub_ovf((<Ledger>led).ns, mk, &r) and not pkvm_add_ovf(o, r, &r)):
            tot[prev] = r  # old + (m - mark), in C
        else:
            tot[prev] = old + (m - mark)
        self._actor_mark = m
        self._actor = actor
        self._cost_ns = cells
        (<Ledger>led).set_cost_c(<Cells?>cells)
        return prev

    def _invalidate_begin(self):
        """``kvm_mmu_invalidate_begin`` (:func:`_mmu_invalidate_begin`)."""
        _mmu_invalidate_begin(self)

    def _invalidate_range_add(self, uint64_t start, uint64_t end):
        """``kvm_mmu_invalidate_range_add`` of ``[start, end)`` (:func:`_mmu_invalidate_range_add`)."""
        _mmu_invalidate_range_add(self, start, end)

    def __reduce_ex__(self, protocol):
        return (_copyreg.__newobj__, (type(self),),
                _collect_state(self, ("_sched", "_platform", "vm_dead", "mmu_invalidate_in_progress",
                                      "_range_start", "_range_end", "nr_vcpus", "_prefetch", "_actor",
                                      "_actor_ns", "_actor_tot", "_actor_mark", "_cost_ns")))

    def __setstate__(self, state):
        _restore_state(self, state)


@cython.auto_pickle(False)
cdef class MemslotState:
    """The typed hot state of a :class:`pkvm.kvm.memslots.Memslot` (its base class):
    ``flags``, ``invalid`` and ``gmem_file``."""

    def __reduce_ex__(self, protocol):
        return (_copyreg.__newobj__, (type(self),), _collect_state(self, ("flags", "invalid", "gmem_file")))

    def __setstate__(self, state):
        _restore_state(self, state)


@cython.auto_pickle(False)
cdef class HostMemoryState:
    """The state of a :class:`pkvm.host.hostmem.HostMemory` (its base class): ``_used`` (the
    allocated pfn runs), ``start_pfn`` / ``end_pfn``, ``_cursor``, ``nr_allocated``,
    ``_cpu_cursors`` and ``cpu``."""

    def __reduce_ex__(self, protocol):
        return (_copyreg.__newobj__, (type(self),),
                _collect_state(self, ("_used", "start_pfn", "end_pfn", "_cursor", "nr_allocated",
                                      "_cpu_cursors", "cpu")))

    def __setstate__(self, state):
        _restore_state(self, state)


@cython.auto_pickle(False)
cdef class SharedBackingState:
    """The state of a :class:`pkvm.host.hostmem.SharedBacking` (its base class): ``_map``
    (HVA page -> populated word), ``_mem`` (the allocator), ``order`` and ``nr_populated``."""

    def __reduce_ex__(self, protocol):
        return (_copyreg.__newobj__, (type(self),),
                _collect_state(self, ("_map", "_mem", "order", "nr_populated")))

    def __setstate__(self, state):
        _restore_state(self, state)
