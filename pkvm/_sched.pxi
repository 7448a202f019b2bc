# The concurrent timeline's per-call hooks, typed (included from _core.pyx).
#
# pkvm/sim/timeline.py's Timeline derives from SchedHooks and its actors are SchedActor
# objects. The model calls these hooks at every lock it takes and releases and around every
# fault, attribute ioctl, exit and conversion (about forty calls per balloon run): here they
# read typed state instead of instance dictionaries. Everything that involves SimPy (a lock
# taken or released under contention, a clock that must advance, the recorder) stays in the
# Python subclass, which these hooks call: _acquire_slow, _release_slow, _record_hold, _sync,
# _idle_now_ns. The rules are docs/timeline.md's; the behaviour is exactly
# that of the Python hooks they replace (same values, same order of effects).


@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class LockStatsState:
    """The fields of :class:`pkvm.sim.locks.LockStats` (its base class), which the timeline's
    hooks update on every acquisition and release."""

    cdef public object hold_ns, hold_write_ns, hold_read_ns, wait_ns, waits, acquisitions
    cdef public object wait_distribution
    cdef public bint _rw


@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class LockState:
    """What the timeline's hooks read of a lock on every acquisition (the base class of
    ``pkvm.sim.locks``' locks): whether it is held, and its statistics.

    ``held_until`` (``written_until``): when (ns since the timeline's start) the last hold in
    any mode (for write) taken and released uncontended ended. Such a hold is taken and
    released on its holder's clock, which runs ahead of SimPy's while its work passes; an
    actor that SimPy runs meanwhile and that asks for the lock before that time waits until
    then (``_lock_free_at``), as it would have for a hold SimPy knew of."""

    cdef public bint locked
    cdef public LockStatsState stats
    cdef public long long held_until, written_until
    # An RWLock's read holds taken and released uncontended, as [start, end) in SimPy's time,
    # already in stats.hold_ns: a reader SimPy lets in meanwhile (readers share) overlaps them,
    # and the lock's busy period then leaves that overlap out of hold_ns (the union of the
    # holds; pkvm.sim.locks.RWLock._covered). None on the other locks.
    cdef public list fast_reads


@cython.auto_pickle(False)  # pickled by __getstate__ / __setstate__ (a subclass keeps its type)
cdef class DistState:
    """The state of :class:`pkvm.sim.stats.Distribution` (its base class): a count per
    distinct value (``_hist``), the number of samples, their sum and maximum, and the sorted
    view a percentile read caches (None after an add). The timeline's latency hook adds a
    sample at C level (about five per balloon run)."""

    cdef public dict _hist
    cdef public object _count, _total, _max, _sorted

    def __cinit__(self):
        self._hist = {}  # value -> how many samples have it
        self._count = 0
        self._total = 0
        self._max = 0
        self._sorted = None

    def __getstate__(self):
        return (self._hist, self._count, self._total, self._max)

    def __setstate__(self, state):
        self._hist, self._count, self._total, self._max = state
        self._sorted = None

    def _add(self, value, count):
        """Add without validation, for callers inside pkvm that pass checked values (the
        timeline's hooks, on every latency sample: one dict update and four fields)."""
        self._add_c(value, count)

    cdef int _remove_c(self, value) except -1:
        """Take back one sample of ``value`` (it must be there); the maximum follows."""
        n = self._hist[value]
        if n == 1:
            del self._hist[value]
        else:
            self._hist[value] = n - 1
        self._count -= 1
        self._total -= value
        if value >= self._max:  # it may have been the only one at the top
            self._max = max(self._hist) if self._hist else 0
        self._sorted = None
        return 0

    cdef int _add_c(self, value, count) except -1:
        hist = self._hist
        hist[value] = hist.get(value, 0) + count
        if value > self._max or not self._count:
            self._max = value
        self._count += count
        self._total += value * count
        self._sorted = None
        return 0


# the requests an actor's coroutine sends to its SimPy process (pkvm/sim/timeline.py's _ACQ ...)
cdef int _SCHED_ACQ = 0, _SCHED_REL = 1, _SCHED_WAIT = 2, _SCHED_SYNC = 3, _SCHED_DONE = 4
# what an actor's SimPy process is in the middle of (SchedActor.flight; pkvm/sim/timeline.py's _FL_*)
cdef int _FL_NONE = 0, _FL_BUSY = 1, _FL_IPI = 2, _FL_LOCK = 3, _FL_SPIN = 4
# what an actor waits as (SchedActor.absorb): not waiting; in the kernel or off its CPU (a lock
# wait, a sleep: outside guest mode, so a KVM request sends it no IPI); re-entering the guest
# between re-faults (a retry spin). A waiting actor's IPIs delay it only past its wake.
cdef int _AB_NONE = 0, _AB_HOST = 1, _AB_GUEST = 2
_SCHED_INFINITY = float("inf")  # simpy.core.Infinity: the time of an empty event queue


#: Locks the kernel takes once per page (a direct-map change per ``set_memory_*`` call, an
#: S-EPT SEAMCALL per AUG) that a batch holds for all its pages: a wait for one of them is the
#: waits of the batch's pages, spread over its latency samples (SchedHooks.latency_end).
_PAGEWISE_LOCKS = frozenset({"cpa_lock", "tdx_sept"})


cdef int _lock_wait_longer(LockStatsState st, w, long long early) except -1:
    """An acquisition waited ``early`` ns for a hold taken and released uncontended
    (``LockState.held_until``), then ``w`` ns in the SimPy lock (None: granted at once), which
    the lock's statistics counted as a wait of its own: they count one wait of the sum."""
    cdef DistState d = <DistState?>st.wait_distribution
    if w is not None and w:
        d._remove_c(w)
        st.wait_ns -= w
        st.waits -= 1
    else:
        w = 0
    st.wait_ns += w + early
    st.waits += 1
    d._add_c(w + early, 1)
    return 0


cdef int _fast_read_add(list fr, s, e) except -1:
    """Append ``[s, e)`` to ``fr`` (``LockState.fast_reads``), merged into the last interval
    when it touches it (one actor's back-to-back holds)."""
    cdef Py_ssize_t n = len(fr)
    cdef list last
    if n:
        last = <list>fr[n - 1]
        if s <= last[1] and e >= last[0]:
            if s < last[0]:
                last[0] = s
            if e > last[1]:
                last[1] = e
            return 0
    fr.append([s, e])
    return 0


cdef inline long long _lock_free_at(LockState lk, mode):
    """When (ns since the timeline's start) the holds ``lk``'s holders took and released
    uncontended let an acquisition in ``mode`` in: a reader waits only for writers."""
    if mode == 0 and lk.stats._rw:
        return lk.written_until
    return lk.held_until


@cython.final
@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class SchedActor:
    """One actor of a timeline: a vCPU thread or the VMM's main loop (pkvm/sim/timeline.py).

    ``held`` lists the locks it holds as ``(lock, mode, grant time if taken uncontended, else
    -1)``; ``fast`` counts the entries taken uncontended (not yet known to the SimPy lock);
    ``grant_t`` maps ``(lock, mode)`` to the grant time of each lock the SimPy lock knows.
    ``busy``, ``wait`` (``lock_wait + ipi + spin``), ``lock_wait``, ``ipi``, ``spin`` are its
    accounting in ns (``page_wait``: the part of ``lock_wait`` spent on the locks the kernel
    takes page by page and a batch holds for all its pages, ``_PAGEWISE_LOCKS``); ``stall_debt`` the IPI stall it still owes; ``absorb``
    whether it is waiting (``_AB_HOST``: for a lock or in a sleep; ``_AB_GUEST``: in a retry
    spin; ``_AB_NONE``: not), and ``ipi_in`` the IPIs that came in meanwhile, as ``(end, ns)``
    on the senders' clocks (``SchedHooks._ipi``; at the wake, ``_ipi_wake`` makes the part of
    each that runs past it a stall owed); ``in_task`` whether it runs a
    task; ``charge_to`` the VM's cost centre while its code runs; ``done`` when (ns since the
    timeline's start) it last finished a task or its function.

    ``busy`` and ``wait`` (``ipi``) are counted when a stretch of work (an IPI stall) starts,
    a lock wait or a spin when it ends; ``flight`` and ``flight_t`` say what the actor's SimPy
    process is in the middle of, so that a result taken mid-run (``Timeline.result``) counts
    it up to that time: ``_FL_NONE``; ``_FL_BUSY`` or ``_FL_IPI``, ending at SimPy time
    ``flight_t``; ``_FL_LOCK`` or ``_FL_SPIN``, since SimPy time ``flight_t``. ``fast_done``
    lists the holds taken and released uncontended since it last resumed, as ``(lock, mode,
    grant, release)`` in ns since the timeline's start: the lock statistics count them at the
    release, which may lie ahead of SimPy's clock while the work they are part of passes
    (holds of no length left out, a hold that starts where the last one of its lock and mode
    ended merged into it: ``_fast_done_add``)."""

    cdef public object name, glet, task, work, idle, grant_t, charge_to
    cdef public object busy, wait, lock_wait, page_wait, ipi, spin, stall_debt, done, flight_t
    cdef public int flight
    cdef public list held, fast_done, ipi_in
    cdef public bint in_task, vcpu
    cdef public int absorb
    cdef public Py_ssize_t fast
    # the last grant of a lock in _PAGEWISE_LOCKS that went through SimPy: the lock's
    # acquisition count after it, and its wait (SchedHooks.pagewise spreads it over the pages)
    cdef public long long pw_acq, pw_wait

    def __init__(self, name, vcpu):
        self.name = name
        self.glet = None
        self.busy = 0
        self.wait = 0
        self.lock_wait = 0
        self.page_wait = 0
        self.ipi = 0
        self.spin = 0
        self.task = None
        self.work = None
        self.idle = None
        self.stall_debt = 0
        self.done = 0
        self.in_task = False
        self.held = []
        self.fast = 0
        self.grant_t = {}
        self.vcpu = vcpu
        self.charge_to = name if vcpu else "vmm"
        self.flight = _FL_NONE
        self.flight_t = 0
        self.fast_done = []
        self.pw_acq = -1
        self.pw_wait = 0
        self.absorb = _AB_NONE
        self.ipi_in = []


cdef int _fast_done_add(SchedActor a, lock, mode, long long t, long long t_rel) except -1:
    """Record in ``a.fast_done`` the uncontended hold ``[t, t_rel)`` of ``lock`` in ``mode``.

    ``Timeline._lock_figures`` takes from a hold ``(lock, mode, t, t_rel)`` the part after the
    result's time ``end``, ``t_rel - max(t, end)`` if ``t_rel > end``: a hold of no length
    takes nothing whatever ``end`` is, so it is not recorded (the caller skips it), and a hold
    that starts where the last one recorded, of the same lock and mode, ended takes from the
    two of them together exactly what one hold over both takes, so the two become one. The
    list grew by one entry per hold between two resumes of the actor (millions in a long
    uncontended stretch, where most holds are of no length or follow each other); it now
    grows only by a hold after a gap, and the figures are the same for every ``end``."""
    cdef list fd = a.fast_done
    cdef tuple last
    cdef Py_ssize_t n = len(fd)  # (the module is built with wraparound=False: no fd[-1])
    if n and t_rel > t:
        last = <tuple>fd[n - 1]
        if <long long>last[3] == t and last[0] == lock and last[1] == mode and <long long>last[2] <= t:
            fd[n - 1] = (lock, mode, last[2], t_rel)
            return 0
    fd.append((lock, mode, t, t_rel))
    return 0


cdef enum:
    _INV_RING = 64  # the invalidations SchedHooks keeps (its _inv_* arrays)


cdef inline Ledger _hook_ledger(SchedHooks h):
    """``h.vm``'s :class:`Ledger` while its total is an int64 (None: read ``vm._modeled_ns``)."""
    cdef Ledger led = h._led
    if led is None or led.vm is not h.vm:
        v = getattr(h.vm, "_ledger", None)
        led = h._led = v if type(v) is Ledger and (<Ledger>v).vm is h.vm else None
    return led if led is not None and led.big is None else None


cdef inline long long _vm_ns(SchedHooks h) except? -1:
    """``<long long>h.vm._modeled_ns``, read from the VM's ledger in C."""
    cdef Ledger led = _hook_ledger(h)
    if led is not None:
        return led.ns
    return <long long>h.vm._modeled_ns


cdef inline int _vm_ns_is(SchedHooks h, long long mark) except -1:
    """``h.vm._modeled_ns == mark``, read from the VM's ledger in C."""
    cdef Ledger led = _hook_ledger(h)
    if led is not None:
        return led.ns == mark
    return h.vm._modeled_ns == mark


@cython.auto_pickle(False)
cdef class SchedHooks:
    """The hot hooks of :class:`pkvm.sim.Timeline` (its base class; see that class).

    ``_current``: the actor whose code runs (None outside every actor); ``_active``: actors in
    a task; while an actor runs, its clock is ``_now0 + vm._modeled_ns - _mark`` (``_now0`` is
    the SimPy time when it resumed, which stands still while it runs); ``_skipped``: a
    :meth:`sync` was skipped since it resumed, the last one at ``vm._modeled_ns == _vis``."""

    cdef public object vm, recorder, latency_log, _rwlock
    cdef public dict locks, latency
    cdef public SchedActor _current
    cdef public Py_ssize_t _active
    cdef public long long _now0, _mark, _vis
    cdef public bint _skipped
    # the per-task machinery's state (set by Timeline.__init__): the SimPy environment, its time
    # when the timeline was attached, the main greenlet, the greenlet class, the event a
    # spinning vCPU waits on (None while none waits), the actors by name
    cdef public object env, _t0, _main, _greenlet, _changed
    # the most pages a private fault batch covers while another actor is in a task (a power of
    # two; Timeline(batch_pages=), docs/timeline.md "Range compression survives")
    cdef public uint64_t batch_pages
    cdef public dict _actors
    # The invalidations that ended while this timeline ran, for a fault batch whose pfn lookup
    # one of them overlapped (fault_timeline): entry ``q % _INV_RING`` holds the
    # ``mmu_invalidate_seq`` value ``q`` an end produced and ``mmu_invalidate_range_start`` /
    # ``_end`` as the end left them (the union of the nested ones still open, if any). An
    # entry whose seq is not ``q`` means the end that produced ``q`` went unrecorded.
    cdef int64_t _inv_seq[_INV_RING]
    cdef uint64_t _inv_lo[_INV_RING]
    cdef uint64_t _inv_hi[_INV_RING]
    cdef int64_t _inv_last
    # SimPy's event heap (``Environment._queue``) when it is a list, else None (_queue_empty_c)
    cdef public list _heap
    # vm's Ledger, read in C by _vm_ns / _vm_ns_is (taken again whenever vm is another object)
    cdef Ledger _led

    def acquire(self, lock, mode=1):
        """The running actor takes ``lock`` (``READ`` / ``WRITE`` for ``mmu_lock``), waiting
        first-come first-served. Uncontended -- no other actor in a task and the lock free --
        it is taken on the actor's own clock, without a round trip through SimPy (same
        result)."""
        self._acquire(lock, mode)

    cdef int _acquire(self, lock, mode) except -1:
        cdef SchedActor a = self._current
        cdef LockState lk
        if a is None:
            return 0
        lk = <LockState?>self.locks[lock]
        cdef long long now
        if self._active <= a.in_task and not lk.locked:
            now = self._now0 + _vm_ns(self) - self._mark
            if now >= _lock_free_at(lk, mode):
                a.held.append((lock, mode, now))
                a.fast += 1
                lk.stats.acquisitions += 1
                return 0
        self._acquire_slow(a, lock, mode)
        return 0

    def release(self, lock, mode=1):
        """The running actor releases ``lock`` taken in ``mode``.

        Raises:
            RuntimeError: it does not hold it."""
        self._release(lock, mode)

    cdef int _release(self, lock, mode) except -1:
        cdef SchedActor a = self._current
        cdef list held
        cdef tuple h
        cdef Py_ssize_t i
        cdef long long held_ns, t
        cdef Ledger led
        if a is None:
            return 0
        # The latest entry of (lock, mode) goes: the usual case is the last one (LIFO).
        held = a.held
        i = len(held) - 1
        while i >= 0:
            h = <tuple>held[i]
            if h[0] == lock and h[1] == mode:
                break
            i -= 1
        else:
            raise RuntimeError(f"{a.name} releases {lock}, which it does not hold")
        t_obj = h[2]
        del held[i]
        t = t_obj
        if t < 0:
            self._release_slow(a, lock, mode)
            return 0
        a.fast -= 1
        held_ns = self._now0 + _vm_ns(self) - self._mark - t  # now_ns - t
        if held_ns:  # for a result taken mid-run (_fast_done_add: kept short, exactly)
            _fast_done_add(a, lock, mode, t, t + held_ns)
        cdef LockState lks = <LockState?>self.locks[lock]
        if held_ns > 0:  # others SimPy runs before its end wait for it (_lock_free_at)
            if t + held_ns > lks.held_until:
                lks.held_until = t + held_ns
            if (mode != 0 or not lks.stats._rw) and t + held_ns > lks.written_until:
                lks.written_until = t + held_ns
            if mode == 0 and lks.fast_reads is not None:  # an RWLock's read: see LockState
                _fast_read_add(lks.fast_reads, t + self._t0, t + held_ns + self._t0)
        led = _hook_ledger(self)
        if led.traced if led is not None else self.vm._subs is not None:  # vm._subs is not None
            self.vm._emit("lock_hold", None, None, lock, 1, 0, "read" if mode == 0 else "write", (held_ns,))
        lk = self.locks[lock]
        cdef LockStatsState st = (<LockState?>lk).stats
        st.hold_ns += held_ns
        if st._rw:  # an RWLock's (LockStats(rw=True))
            if mode == 0:
                st.hold_read_ns += held_ns
            else:
                st.hold_write_ns += held_ns
        if self.recorder is not None:
            self._record_hold(a, lock, mode, lk, t_obj, t + held_ns)
        return 0

    def pagewise(self, lock, n):
        """The running actor's hold of ``lock`` (one of ``_PAGEWISE_LOCKS``), about to be
        released, stood for ``n`` acquisitions: the kernel takes the lock once per page (per
        ``set_memory_*`` call, per AUG), where a batch holds it once for all of them. The
        lock's statistics count ``n`` acquisitions, and the batch's wait, if it waited, as the
        waits of its ``n`` pages: ``n`` samples that add up to it (integer parts, the remainder
        one ns at a time), as the latency samples spread it (:meth:`latency_end`). ``wait_ns``
        is unchanged. Call it before :meth:`release`, with ``n`` <= 1 too (it forgets the
        grant)."""
        self._pagewise(lock, n)

    cdef int _pagewise(self, lock, long long n) except -1:
        cdef SchedActor a = self._current
        if a is None:
            return 0
        cdef LockStatsState st = (<LockState?>self.locks[lock]).stats
        cdef long long w = a.pw_wait if a.pw_acq == st.acquisitions else 0
        a.pw_acq = -1
        a.pw_wait = 0
        if n <= 1:
            return 0
        st.acquisitions += n - 1
        if w <= 0:
            return 0
        cdef DistState d = <DistState?>st.wait_distribution
        d._remove_c(w)
        cdef long long q = w // n, r = w % n
        if r:
            d._add_c(q + 1, r)
        if q:
            d._add_c(q, n - r)
        st.waits += (n if q else r) - 1
        return 0

    def latency_begin(self):
        """The start of a latency sample: ``(clock, the running actor's waits so far that a
        batch takes once)``."""
        return self._latency_begin()

    cdef tuple _latency_begin(self):
        cdef SchedActor a = self._current
        if a is None:
            return (self._idle_now_ns(), 0)
        return (self._now0 + _vm_ns(self) - self._mark, a.lock_wait - a.page_wait + a.spin)  # now_ns

    def latency_end(self, kind, begin, n=1):
        """Add the sample begun at ``begin`` to distribution ``kind``; ``n`` > 1: it stands
        for ``n`` operations. The first carries the waits the batch's first operation would
        have had alone: a lock held by someone else (a batch waits for it once, at its
        start) and a retry's spin. The rest of its time splits evenly: its work, the IPI
        stalls that came in while it ran, and its waits for the locks the kernel takes page by
        page (``_PAGEWISE_LOCKS``), which a batch holds for all its pages, so that its wait
        stands for the waits of each of its pages."""
        self._latency_end(kind, begin, n)

    cdef int _latency_end(self, kind, begin, n) except -1:
        cdef SchedActor a = self._current
        if a is None:
            return 0
        total = (self._now0 + _vm_ns(self) - self._mark) - begin[0]  # now_ns
        cdef DistState d = <DistState?>self.latency[kind]
        log = self.latency_log
        # Distribution._add: the samples are int ns and the counts ints >= 1 (add's checks).
        if n <= 1:
            d._add_c(total, 1)
            if log is not None:
                log.append((kind, total, 1))
        else:
            w = a.lock_wait - a.page_wait + a.spin - begin[1]
            each = (total - w) // n
            d._add_c(each + w, 1)
            d._add_c(each, n - 1)
            if log is not None:
                log.append((kind, each + w, 1))
                log.append((kind, each, n - 1))
        return 0

    def work_ns(self):
        """The running actor's own work so far (its busy time plus what it has not yielded)."""
        return self._work_ns()

    cdef object _work_ns(self):
        cdef SchedActor a = self._current
        if a is None:
            return int(self.vm._modeled_ns)
        return a.busy + (_vm_ns(self) - self._mark)

    def contended(self):
        """True if another actor is in a task now (worth splitting long work for)."""
        return self._contended()

    cdef bint _contended(self):
        cdef SchedActor a = self._current
        return self._active > (a.in_task if a is not None else 0)

    def sync(self):
        """A visibility point: advance the running actor's clock to its pending work.

        Skipped while nothing could run or look before the actor's next yield, which then
        advances its clock by the same total: no other actor in a task, no event scheduled in
        the environment, no IPI stall owed, no recorder (whose slices would show the split).
        Locks the actor took uncontended stay so: a hold's statistics are its release time
        minus its grant time either way (``Timeline._switch`` makes them real holds, granted
        at their own time, whenever the actor yields)."""
        self._sync_point()

    cdef int _sync_point(self) except -1:
        cdef SchedActor a = self._current
        if a is None:
            return 0
        if (self._active <= a.in_task and not a.stall_debt and self.recorder is None
                and self._queue_empty_c()):
            self._skipped = True  # Timeline.serialize: the work pending since this point
            self._vis = _vm_ns(self)
            return 0
        self._sync_c()
        return 0

    def _queue_empty(self):
        """No event is scheduled in the environment (:meth:`sync`)."""
        return self._queue_empty_c()

    cdef bint _queue_empty_c(self) except -1:
        """``env.peek() == Infinity``, read from SimPy's event heap when the environment has one
        (a list of ``(time, ...)`` entries, SimPy 4), without the call."""
        q = self._heap
        if q is None:
            return self.env.peek() == _SCHED_INFINITY
        return not q or (<tuple?>q[0])[0] == _SCHED_INFINITY

    def ipi(self, scope, n=1):
        """An IPI from the running actor: ``"vm"`` (a KVM request that waits, as a remote TLB
        flush: every other vCPU of the VM in a task stalls, except one waiting for a lock or
        asleep, which is outside guest mode), ``"host"`` (kernel-range flush: every other actor
        in a task stalls). An actor that is waiting stalls only for the part of the IPI that
        runs past its wake (``_ipi_wake``)."""
        self._ipi(scope, n)

    cdef int _ipi(self, scope, n) except -1:
        cdef SchedActor cur = self._current, a
        cdef bint host
        cdef long long t = -1
        if cur is None or self._active <= cur.in_task:
            return 0  # no other actor is in a task: none to stall
        ns = self._ipi_ns * n
        host = scope == "host"
        for a in self._actors.values():
            if a is cur or not a.in_task or not (a.vcpu or host):
                continue
            if a.absorb == _AB_NONE:
                a.stall_debt += ns  # paid at its next yield
            elif host or a.absorb == _AB_GUEST:
                # it is waiting: the IPI runs from the sender's clock on, and only its part
                # after the wake (not known yet) delays it
                if t < 0:
                    t = self._now0 + _vm_ns(self) - self._mark  # now_ns
                a.ipi_in.append((t + ns, ns))
            # else: a KVM request to a vCPU outside guest mode (waiting for a lock in the
            # kernel, or asleep) sends it no IPI (kvm_request_needs_ipi); it finds the request
            # at its next entry (docs/timeline.md)
        return 0

    cdef int _ipi_wake(self, SchedActor a) except -1:
        """``a`` stops waiting now (its SimPy process resumes at the grant, or at the end of the
        spin or the sleep): each IPI that came in while it waited delays it by its part after
        now, ``min(ns, max(0, end - now))`` (an IPI sent at or after now in full), owed as a
        stall at its next yield; the rest of it the wait absorbed."""
        cdef list q = a.ipi_in
        cdef long long now, over, ns, extra = 0
        cdef tuple e
        a.absorb = _AB_NONE
        if not q:
            return 0
        now = int(self.env.now - self._t0)
        for e in q:
            over = <long long>e[0] - now
            if over > 0:
                ns = e[1]
                extra += over if over < ns else ns
        a.ipi_in = []
        if extra:
            a.stall_debt += extra
        return 0

    # -- the per-task machinery: an actor's coroutine (a greenlet) and its SimPy process -------
    #
    # Timeline's (pkvm/sim/timeline.py): the requests an actor's coroutine sends to its SimPy
    # process at a lock, a wait or a task boundary, the process that serves them (_drive), the
    # vCPU thread's task loop and dispatch. What needs pkvm.sim (the recorder's slices, making
    # locks taken uncontended real holds) is Timeline's, called from here.

    def changed(self):
        """The model changed state others may wait on (an RMP entry, an invalidation ended)."""
        self._changed_c()

    cdef inline int _changed_c(self) except -1:
        self._note_inval()
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.succeed()
        return 0

    cdef int _note_inval(self) except -1:
        """Record the invalidation that ended, if ``mmu_invalidate_seq`` moved since the last
        record (every ``kvm_mmu_invalidate_end`` on the timeline calls :meth:`changed`)."""
        cdef Counters st = <Counters?>self.vm._stats
        cdef int64_t seq = st.v[S_MMU_INVALIDATE_SEQ]
        cdef VmState vs
        cdef Py_ssize_t i
        if seq != self._inv_last:
            vs = <VmState?>self.vm
            i = seq % _INV_RING
            self._inv_seq[i] = seq
            self._inv_lo[i] = vs._range_start
            self._inv_hi[i] = vs._range_end
            self._inv_last = seq
        return 0

    cdef uint64_t _inval_first(self, int64_t snap, int64_t now, uint64_t gfn, uint64_t end) except? 0:
        """The first gfn of ``[gfn, end)`` covered by an invalidation that ended after
        ``mmu_invalidate_seq`` was ``snap`` (it is ``now``): ``end`` if none did, ``gfn`` if
        one of those ends was not recorded."""
        cdef int64_t q
        cdef Py_ssize_t i
        cdef uint64_t first = end, lo, hi
        if now - snap > _INV_RING or now < snap:
            return gfn
        for q in range(snap + 1, now + 1):
            i = q % _INV_RING
            if self._inv_seq[i] != q:
                return gfn
            lo = self._inv_lo[i]
            hi = self._inv_hi[i]
            if lo < first and gfn < hi:
                first = lo if lo > gfn else gfn
        return first

    def _set_in_task(self, SchedActor a, value):
        self._set_in_task_c(a, value)

    cdef int _set_in_task_c(self, SchedActor a, bint value) except -1:
        if a.in_task != value:
            self._active += 1 if value else -1
            a.in_task = value
            if not value:
                self._changed_c()  # a spinning vCPU re-checks whether anyone could still help it
        return 0

    def _take(self, a):
        return self._take_c()

    cdef object _take_c(self):
        """The running actor's work since its last yield (and the mark moves to now)."""
        cdef long long m = _vm_ns(self)
        dt = m - self._mark
        self._mark = m
        return dt

    def _sync(self):
        self._sync_c()

    cdef int _sync_c(self) except -1:
        """Advance the running actor's clock to its pending work (a round trip to SimPy)."""
        cdef SchedActor a = self._current
        if a is None or (_vm_ns_is(self, self._mark) and not a.stall_debt):
            return 0
        self._switch_c(a, (_SCHED_SYNC, self._take_c()))
        return 0

    def _switch(self, SchedActor a, tuple req):
        """Yield to the actor's SimPy process; locks taken uncontended become real holds first
        (granted at their own time, Timeline._make_holds), so whoever runs meanwhile sees them
        held."""
        return self._switch_c(a, req)

    cdef object _switch_c(self, SchedActor a, tuple req):
        if a.fast:
            self._make_holds(a)
        return self._main.switch(req)

    def _wait(self, ev, idle=False, keep_task=False):
        return self._wait_c(ev, idle, keep_task)

    cdef object _wait_c(self, ev, bint idle, bint keep_task):
        """The running actor waits for ``ev``; ``idle``: as a thread without work (not in a
        task meanwhile, its time not counted as a wait), unless ``keep_task``."""
        cdef SchedActor a = self._current
        if a is None:
            raise RuntimeError("Timeline: only code running on a timeline actor can wait")
        if not idle or keep_task:
            return self._switch_c(a, (_SCHED_WAIT, self._take_c(), ev, idle))
        busy = a.in_task
        self._set_in_task_c(a, False)
        try:
            return self._switch_c(a, (_SCHED_WAIT, self._take_c(), ev, idle))
        finally:
            if not busy:
                self._set_in_task_c(a, False)
            elif not a.in_task:  # _set_in_task(a, True), inline
                self._active += 1
                a.in_task = True

    def dispatch(self, name, fn, *args):
        """From an actor: hand ``fn(*args)`` to vCPU thread ``name``, waiting until it is free.

        ValueError if ``name`` is not a vCPU thread (``start_vcpu``), TypeError if ``fn`` is
        not callable, RuntimeError once ``stop()`` has finished the thread, ``KvmError(EDEADLK)``
        from an event callback of the VM (docs/events.md); each changes nothing."""
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()  # as Timeline's other scheduling calls (pkvm/sim/timeline.py)
        cdef SchedActor target = self._actors.get(name) if isinstance(name, str) else None
        if target is None or target.idle is None:
            raise ValueError(f"dispatch: {name!r} is not a vCPU thread of this timeline (start one with "
                             f"start_vcpu; threads: {', '.join(a.name for a in self._actors.values() if a.idle is not None) or 'none'})")
        if not callable(fn):
            raise TypeError(f"dispatch: fn must be callable, got {type(fn).__name__}")
        if target.work is not None and target.work.triggered and target.work.value == "stop":
            # stop() finished the thread: a task handed to it now would wait forever
            raise RuntimeError(f"dispatch: vCPU thread {name!r} was finished by stop(); "
                               f"dispatch before stopping the timeline")
        cdef SchedActor a = self._current
        if a is not None and (not _vm_ns_is(self, self._mark) or a.stall_debt):
            self._sync_c()  # the task starts at the caller's clock
        while target.task is not None or not target.idle.triggered:
            self._wait_c(target.idle, True, False)
        target.task = (fn, args)
        if not target.in_task:  # _set_in_task(target, True): it has work from now on
            self._active += 1
            target.in_task = True
        target.idle = self.env.event()
        work = target.work
        if work is not None and not work.triggered:
            work.succeed()

    def _call_once(self, SchedActor a, fn, tuple args):
        self._set_in_task_c(a, True)
        try:
            fn(*args)
            self._sync_c()
        finally:
            self._set_in_task_c(a, False)

    def _task_loop(self, SchedActor a):
        while True:
            if a.task is None:
                a.work = self.env.event()
                if self._wait_c(a.work, True, False) == "stop" and a.task is None:
                    return
                continue
            fn, args = a.task
            if not a.in_task:  # _set_in_task(a, True)
                self._active += 1
                a.in_task = True
            try:
                fn(*args)
            finally:
                if a.in_task:  # _set_in_task(a, False), inline
                    self._active -= 1
                    a.in_task = False
                    self._changed_c()  # a spinning vCPU re-checks
            # One round trip: the pending work passes, the thread goes idle (a.task = None,
            # a.idle succeeds) and waits for its next task (a.work), in _drive (_DONE).
            if self._switch_c(a, (_SCHED_DONE, self._take_c())) == "stop" and a.task is None:
                return

    def _resume(self, SchedActor a):
        self._resume_c(a)

    cdef int _resume_c(self, SchedActor a) except -1:
        """``a``'s code runs again (SimPy's clock stands still until it yields)."""
        self._current = a
        self._now0 = int(self.env.now - self._t0)
        if a.fast_done:
            a.fast_done = []
        vm = self.vm
        self._mark = _vm_ns(self)
        self._skipped = False
        vm._hostmem.cpu = a.name
        if isinstance(vm, VmState):
            (<VmState>vm)._set_actor_c(a.charge_to)  # VM._set_actor, at C level
        elif vm._actor != a.charge_to:
            vm._set_actor(a.charge_to)
        return 0

    def _drive(self, SchedActor a, body, tuple args):
        """The SimPy process of actor ``a``: runs ``body(*args)`` in a greenlet and serves its
        requests (work passing as one timeout, an IPI stall owed, a lock, a wait, a task's end)."""
        env = self.env
        rec = self.recorder
        vm = self.vm
        g = self._greenlet(body, parent=self._main)
        a.glet = g

        def free(_ev):  # the end of a task's pending work (_DONE)
            a.task = None
            a.done = int(env.now - self._t0)
            a.idle.succeed()

        self._resume_c(a)
        req = g.switch(*args)
        locks = self.locks
        grants = a.grant_t
        rwlock = self._rwlock
        while not g.dead:
            self._current = None
            a.charge_to = vm._actor
            op, dt = req[0], req[1]
            if op == _SCHED_DONE and dt and not a.stall_debt:
                # The task is done: its pending work passes, then the thread goes idle. The
                # timeout's callback frees the thread (the same events in the same order as
                # resuming this process for it: no IPI can reach a thread outside a task, so
                # no stall follows); the process waits for its next task meanwhile.
                a.busy += dt
                a.flight = _FL_BUSY
                a.flight_t = env.now + dt
                if rec is not None:
                    self._rec_work(a, dt)
                env.timeout(dt).callbacks.append(free)
                ev = env.event()
                a.work = ev
                value = yield ev
                self._resume_c(a)
                req = g.switch(value)
                continue
            if dt:
                a.busy += dt
                a.flight = _FL_BUSY
                a.flight_t = env.now + dt
                if rec is not None:
                    self._rec_work(a, dt)
                yield env.timeout(dt)
            debt = a.stall_debt
            if debt:
                a.stall_debt = 0
                a.wait += debt
                a.ipi += debt
                a.flight = _FL_IPI
                a.flight_t = env.now + debt
                if rec is not None:
                    self._rec_ipi(a, debt)
                yield env.timeout(debt)
            value = None
            if op == _SCHED_ACQ:
                lk = locks[req[2]]
                t0 = env.now
                # a hold another actor took and released uncontended, on its clock ahead of
                # SimPy's, ends after now: wait for its end (LockState.held_until)
                early = _lock_free_at(<LockState>lk, req[3]) - int(t0 - self._t0)
                if early > 0:
                    a.flight = _FL_LOCK
                    a.flight_t = t0
                    a.absorb = _AB_HOST
                    yield env.timeout(early)
                ev = (lk.acquire_read(a.name) if req[3] == 0 else lk.acquire_write(a.name)) \
                    if isinstance(lk, rwlock) else lk.acquire(a.name)
                blocked = not ev.triggered
                if blocked:
                    a.flight = _FL_LOCK
                    a.flight_t = t0
                    a.absorb = _AB_HOST
                    w = yield ev
                    if early > 0:  # one wait: the lock's statistics saw only its second part
                        _lock_wait_longer(lk.stats, w, early)
                elif early > 0:
                    _lock_wait_longer(lk.stats, None, early)
                a.flight = _FL_NONE
                if blocked or early > 0:
                    self._ipi_wake(a)
                    waited = env.now - t0  # int ns: every delay is an int
                    a.wait += waited
                    a.lock_wait += waited
                    if req[2] in _PAGEWISE_LOCKS:
                        a.page_wait += waited
                    if req[2] == "tdx_sept":  # TDX_OPERAND_BUSY -> RET_PF_RETRY, re-tried locally
                        self.races["tdx_busy_retry"] += max(1, waited // self._seamcall_retry_ns)
                    if rec is not None:
                        self._rec_lock_wait(a, req[2], t0)
                grants[(req[2], req[3])] = int(env.now - self._t0)
                if req[2] in _PAGEWISE_LOCKS:  # for pagewise(): this grant and what it waited
                    a.pw_acq = lk.stats.acquisitions
                    a.pw_wait = env.now - t0 if (blocked or early > 0) else 0
            elif op == _SCHED_REL:
                lk = locks[req[2]]
                if rec is not None:
                    self._rec_hold(a, req[2], req[3], lk, grants[(req[2], req[3])])
                if isinstance(lk, rwlock):
                    (lk.release_read if req[3] == 0 else lk.release_write)(a.name)
                else:
                    lk.release(a.name)
            elif op == _SCHED_WAIT:
                ev = req[2]
                if not ev.processed:
                    t0 = env.now
                    if not req[3]:
                        a.flight = _FL_SPIN
                        a.flight_t = t0
                        a.absorb = _AB_GUEST
                    elif a.in_task:  # a sleep (Timeline.sleep: idle, in its task)
                        a.absorb = _AB_HOST
                    value = yield ev
                    a.flight = _FL_NONE
                    self._ipi_wake(a)
                    if not req[3]:
                        spun = env.now - t0  # int ns, as above
                        a.wait += spun
                        a.spin += spun
                        if rec is not None:
                            self._rec_spin(a, t0)
                else:
                    value = ev.value
            elif op == _SCHED_DONE:  # _task_loop: the task is done, the thread idles until the next
                a.task = None
                a.done = int(env.now - self._t0)
                a.idle.succeed()
                ev = env.event()
                a.work = ev
                value = yield ev
            self._resume_c(a)
            req = g.switch(value)
        self._current = None
        a.done = int(env.now - self._t0)


# -- the fault driver under a timeline ----------------------------------------------------------
#
# pkvm.kvm.mmu.run_fault with a timeline attached (FaultPath's timeline_run): the typed fault
# path's phases with the timeline's hooks between them, all called at C level. The staleness
# check and the install run under mmu_lock for read (the TDP MMU), after the pfn lookup's time
# has passed (a visibility point); the pfn lookup takes only the folio lock (docs/timeline.md).

cdef uint64_t _batch_valid_end(SchedHooks sched, FaultPath fp, PageFault f, uint64_t gfn,
                               uint64_t end) except? 0:
    """For a batch ``[gfn, end)`` at its staleness check: the end of the pages the kernel's
    faults, one page at a time, would have installed. In the kernel each page is a fault of
    its own, snapshotting ``mmu_invalidate_seq`` before its pfn lookup
    (``kvm_mmu_faultin_pfn``); an invalidation that ends while the batch's pages are looked
    up turns back the one page whose lookup it overlapped (``mmu_invalidate_retry_gfn``), not
    the pages before or after it, and one still open turns back the pages in its range while
    it lasts. So the pages before the first one an invalidation since the snapshot covered
    (ended, or still open) are mapped; from that page on they fault again. ``end`` when none
    covers the batch; ``gfn`` when the first page itself is covered, or when an end since the
    snapshot is not known (the batch is turned back)."""
    cdef VmState vs = fp.vs
    cdef uint64_t first
    if vs.mmu_invalidate_in_progress and vs._range_start <= gfn < vs._range_end:
        return gfn
    first = sched._inval_first(f.mmu_seq, fp.stats.v[S_MMU_INVALIDATE_SEQ], gfn, end)
    if vs.mmu_invalidate_in_progress and gfn < vs._range_start < first:
        first = vs._range_start
    return first


cdef int _raced_install(PageFault f, RangeMap sptes, uint64_t before) except -1:
    """Another vCPU installed leaves while this fault ran (possible only on the concurrent
    timeline): the TDP MMU's atomic SPTE update finds the leaf there. On the faulting gfn the
    fault is spurious (the guest re-executes and the access succeeds: ``tdp_mmu_map_handle_
    target_level``); a batch stops before the first page another vCPU mapped (those pages
    never faulted)."""
    cdef uint64_t gfn = f.gfn, k
    cdef uint64_t now = rangemap_get(sptes, gfn)
    if now != before:
        f.ret = "spurious" if now else "retry"
        f.end = gfn + 1
        f.nfaults = 1
        if now:
            f.level = _f_level(now)
            f.delta = _decode_delta(now)
        return 0
    if f.end > gfn + 1:
        if rangemap_find_ne(sptes, gfn + 1, f.end, 0, &k):
            f.end = k
    return 0


def fault_timeline(vcpu, uint64_t gfn, uint64_t limit, bint private, bint write, bint prefetch):
    """The driver of ``pkvm.kvm.mmu.run_fault`` under a timeline (``vm._sched``): every phase
    of one (batched) fault, ``(f, result)``. While other actors run, a batch of private faults
    ends at a boundary of ``sched.batch_pages`` pages (64M by default) (2M and 4K leaves only: the counters are those of the whole batch),
    so locks interleave between vCPUs."""
    vm = vcpu.vm
    cdef SchedHooks sched = <SchedHooks?>vm._sched
    cdef FaultPath fp = <FaultPath?>vm._fault_path
    cdef RangeMap sptes = fp.sptes
    t0 = sched._work_ns()  # this thread's own work
    cdef uint64_t cut = sched.batch_pages
    if private and cut and limit > gfn + cut and sched._contended():
        limit = (gfn + cut) & ~(cut - 1)
    cdef PageFault f = _new_fault(gfn, limit, private, write, prefetch)
    lat = sched._latency_begin()
    cdef uint64_t before = rangemap_get(sptes, gfn)
    fp._begin(f)
    if not f.ret and fp.armed and "mmu_topup" in fp.armed:
        fp.topup(vm, f, gfn)
    if not f.ret:
        fp._faultin(f)  # kvm_gmem_get_pfn: only the folio lock (docs/timeline.md)
        sched._sync_point()
    cdef uint64_t end0, keep
    cdef VmState vs = fp.vs
    cdef uint64_t retried = 0
    if not f.ret:
        sched._acquire("mmu_lock", 0)
        end0 = f.end
        fp._stale(f)
        if end0 > gfn + 1 and (f.ret or vs.mmu_invalidate_in_progress):
            # a batch that an invalidation overlapped maps the pages before the first one it
            # covers (_batch_valid_end); if the check turned the batch back, only the page
            # whose lookup the invalidation overlapped retried
            keep = _batch_valid_end(sched, fp, f, gfn, end0)
            if f.ret and keep > gfn:
                f.ret = ""
                fp._retried_one(f)
                sched.races["pf_retry"] += 1
                retried = 1
            if not f.ret:
                f.end = keep
        if not f.ret:
            _raced_install(f, sptes, before)
        if not f.ret:
            fp._install(f)
        sched._release("mmu_lock", 0)
    cdef FaultResult r = fp._finish(f)
    # (a page of the batch that retried is a sample of its own: the batch's time is spread
    # over it too)
    sched._latency_end("fault", lat, f.nfaults + retried if r.ret == "fixed" else 1 + retried)
    # the fault's own work, for the fault event (_after reads it only when it emits one)
    took = sched._work_ns() - t0 if fp.ledger.traced and not f.prefetch else None
    fp._after(vcpu, f, r, gfn, private, write, took)
    return f, r
