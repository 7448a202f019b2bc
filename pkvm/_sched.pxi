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


# A load is kept in fixed point, in units of 2^-48 of the lock's capacity (_LOAD_ONE), so that
# a window's rate taken out of the profile again (a window shifted or stalled and fitted anew)
# restores exactly the loads that were there (in floating point ``l + r - r`` drifts from
# ``l``), and neighbouring segments of the same load are merged into one (_prof_add). The
# largest load it holds is 2^15 (32,768 windows using the lock at once, each at most 1).
cdef double _LOAD_ONE = 281474976710656.0  # 2 ** 48
cdef double _LOAD_MAX = 32768.0


cdef inline long long _load_q(double v) noexcept:
    """The rate ``v`` (a share of the lock's capacity, |v| <= _LOAD_MAX) in fixed point."""
    return <long long>floor(v * _LOAD_ONE + 0.5)


cdef inline long long _load_qp(double v) noexcept:
    """_load_q of a rate ``v > 0`` (a piece's): the conversion truncates, which for a
    positive value is the floor."""
    return <long long>(v * _LOAD_ONE + 0.5)


# The profile is kept in blocks of at most _PB breakpoints, in time order (a block that fills
# is split in two; an emptied one is freed), so that a breakpoint inserted or removed moves at
# most a block, not the whole profile: with 64 vCPUs a settled window is taken out and fitted
# again many times (SchedHooks._pw_shift) while the profile holds thousands of breakpoints.
cdef enum:
    _PB = 256
    # From this many pieces on, _prof_add merges a window's pieces into the profile in one
    # pass (_prof_add_merged) instead of a search, a split and a pass per piece.
    _MERGE_MIN = 16

ctypedef struct _PBlock:
    Py_ssize_t n
    long long t[_PB]
    long long l[_PB]


@cython.final
@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class LoadProfile:
    """The rate at which an interleaved lock's settled windows use it, piecewise constant:
    ``loads[i]`` on ``[times[i], times[i + 1])``, the last from ``times[-1]`` on, 0 before
    ``times[0]`` (SchedHooks._pw_settle). The loads are kept in fixed point (2^-48 of the
    capacity); no two neighbouring segments have the same load (_prof_add merges them), so a
    profile holds a breakpoint only where the load changes. Typed blocks of breakpoints:
    settling a window splits and adds to it once per piece of the window (_prof_add), the
    timeline's hottest loop with many vCPUs. A position in it is a block and an index in that
    block, ``(0, -1)`` before the first breakpoint."""

    cdef _PBlock **b
    cdef long long *first  # each block's first breakpoint (contiguous, for the search)
    cdef Py_ssize_t nb, bcap
    cdef Py_ssize_t n  # breakpoints in all
    cdef readonly Py_ssize_t dropped  # breakpoints taken out (the past trimmed, segments averaged)
    cdef readonly Py_ssize_t averaged  # of those, the ones averaged away (_prof_coarsen: lossy)
    cdef readonly Py_ssize_t merged  # breakpoints between two segments of the same load, dropped (exact)

    def __dealloc__(self):
        self._clear()

    def __len__(self):
        return self.n

    @property
    def times(self):
        """The breakpoints, ns since the timeline's start (a copy)."""
        return [self.b[k].t[i] for k in range(self.nb) for i in range(self.b[k].n)]

    @property
    def loads(self):
        """The load from each breakpoint on, as a share of the lock's capacity (a copy; exact
        multiples of 2^-48)."""
        return [self.b[k].l[i] / _LOAD_ONE for k in range(self.nb) for i in range(self.b[k].n)]

    @property
    def blocks(self):
        """How many breakpoints each of its blocks holds (for tests and inspection)."""
        return [self.b[k].n for k in range(self.nb)]

    @staticmethod
    def from_segments(times, loads):
        """A profile with ``loads[i]`` from ``times[i]`` on (strictly increasing ints; finite
        loads of at most 32,768 in magnitude, each rounded to the nearest multiple of 2^-48;
        for tests and inspection: the timeline builds its own). Neighbours of the same load
        are kept as given."""
        cdef LoadProfile p = LoadProfile()
        cdef Py_ssize_t i, m
        cdef long long *t
        cdef long long *l
        times = list(times)
        loads = [float(v) for v in loads]
        m = len(times)
        if m != len(loads):
            raise ValueError(f"times and loads differ in length: {m} and {len(loads)}")
        for i in range(m):
            if i and times[i] <= times[i - 1]:
                raise ValueError(f"times must increase strictly; {times[i]} follows {times[i - 1]}")
            if not -_LOAD_MAX <= loads[i] <= _LOAD_MAX:  # (NaN fails too)
                raise ValueError(f"loads must be finite and at most {_LOAD_MAX:g} in magnitude, got {loads[i]}")
        t = <long long*>malloc((m + 1) * sizeof(long long))
        l = <long long*>malloc((m + 1) * sizeof(long long))
        try:
            if t == NULL or l == NULL:
                raise MemoryError()
            for i in range(m):
                t[i] = times[i]
                l[i] = _load_q(loads[i])
            p._rebuild(t, l, m)
        finally:
            free(t)
            free(l)
        return p

    def coarsen(self, Py_ssize_t keep):
        """Average neighbouring segments, oldest first, until at most ``keep`` breakpoints
        remain (what the timeline does past its bound; ``_prof_coarsen``)."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        _prof_coarsen(self, keep)

    def add(self, pieces, sign=1):
        """Add the ``(start, end, rate)`` pieces (ints ``0 <= start < end < 2**63``, ``0 < rate <=
        32768``)
        to the profile, each rate rounded to the nearest multiple of 2^-48; ``sign=-1`` takes
        them out (what settling a window does, ``_prof_add``; for tests and inspection).
        Every piece is checked before any is added: a refused call changes nothing."""
        cdef _Pieces q = _Pieces()
        cdef double r
        if sign not in (1, -1):
            raise ValueError(f"sign must be 1 or -1, got {sign!r}")
        for pc in pieces:
            start, end, rate = pc
            if type(start) is not int or type(end) is not int or not 0 <= start < end < 2**63:
                raise ValueError(f"a piece needs ints 0 <= start < end < 2**63, got {pc!r}")
            r = float(rate)
            if not 0.0 < r <= _LOAD_MAX:  # (NaN fails too)
                raise ValueError(f"a piece's rate must be in (0, {_LOAD_MAX:g}], got {rate!r}")
            q.add(start, end, r)
        _prof_add(self, q, <double>sign)

    def drop_before(self, x):
        """Take out every breakpoint before ``x`` (an int, ``0 <= x < 2**63``), which becomes
        one (the load from it on is unchanged): what the timeline does with the past no window
        can reach. How many were taken out (also added to ``dropped``)."""
        if type(x) is not int or not 0 <= x < 2**63:
            raise ValueError(f"x must be an int in [0, 2**63), got {x!r}")
        return self._drop_before(x)

    cdef void _clear(self) noexcept:
        cdef Py_ssize_t k
        for k in range(self.nb):
            free(self.b[k])
        free(self.b)
        free(self.first)
        self.b = NULL
        self.first = NULL
        self.nb = self.bcap = self.n = 0

    cdef int _rebuild(self, long long *t, long long *l, Py_ssize_t m) except -1:
        """Replace the breakpoints with the ``m`` of ``t`` / ``l`` (in order), blocks three
        quarters full."""
        cdef Py_ssize_t k, i, j = 0, per = (3 * _PB) // 4
        self._clear()
        while j < m:
            k = self._new_block(self.nb)
            i = 0
            while i < per and j < m:
                self.b[k].t[i] = t[j]
                self.b[k].l[i] = l[j]
                i += 1
                j += 1
            self.b[k].n = i
            self.first[k] = self.b[k].t[0]
            self.n += i
        return 0

    cdef Py_ssize_t _new_block(self, Py_ssize_t k) except -1:
        """An empty block at index ``k`` (the later ones move up one)."""
        cdef _PBlock **nb
        cdef long long *nf
        cdef _PBlock *blk
        cdef Py_ssize_t cap
        if self.nb == self.bcap:
            cap = self.bcap * 2 if self.bcap else 8
            nb = <_PBlock**>realloc(self.b, cap * sizeof(_PBlock*))
            if nb == NULL:
                raise MemoryError()
            self.b = nb
            nf = <long long*>realloc(self.first, cap * sizeof(long long))
            if nf == NULL:
                raise MemoryError()
            self.first = nf
            self.bcap = cap
        blk = <_PBlock*>malloc(sizeof(_PBlock))
        if blk == NULL:
            raise MemoryError()
        blk.n = 0
        memmove(&self.b[k + 1], &self.b[k], (self.nb - k) * sizeof(_PBlock*))
        memmove(&self.first[k + 1], &self.first[k], (self.nb - k) * sizeof(long long))
        self.b[k] = blk
        self.nb += 1
        return k

    cdef int _replace_blocks(self, Py_ssize_t k0, Py_ssize_t k1, long long *t, long long *l,
                             Py_ssize_t m) except -1:
        """Replace blocks ``k0`` to ``k1`` (none if ``k1 < k0``) with the ``m`` breakpoints
        of ``t`` / ``l`` (in order, between the blocks around), in blocks three quarters full
        (one if they fit in it); the caller keeps ``n``."""
        cdef Py_ssize_t old = k1 - k0 + 1 if k1 >= k0 else 0, nbl, k, i, j = 0, per, cap
        cdef _PBlock **nb
        cdef long long *nf
        cdef _PBlock *blk
        cdef _PBlock **fresh
        if m == 0:
            nbl = 0
        elif m <= _PB:
            nbl = 1
        else:
            nbl = (m + (3 * _PB) // 4 - 1) // ((3 * _PB) // 4)
        if self.nb - old + nbl > self.bcap:
            cap = self.bcap * 2 if self.bcap else 8
            while cap < self.nb - old + nbl:
                cap *= 2
            nb = <_PBlock**>realloc(self.b, cap * sizeof(_PBlock*))
            if nb == NULL:
                raise MemoryError()
            self.b = nb
            nf = <long long*>realloc(self.first, cap * sizeof(long long))
            if nf == NULL:
                raise MemoryError()
            self.first = nf
            self.bcap = cap
        # the new blocks first, so that running out of memory leaves the profile as it was
        fresh = <_PBlock**>malloc((nbl if nbl else 1) * sizeof(_PBlock*))
        if fresh == NULL:
            raise MemoryError()
        for k in range(nbl):
            fresh[k] = <_PBlock*>malloc(sizeof(_PBlock))
            if fresh[k] == NULL:
                for i in range(k):
                    free(fresh[i])
                free(fresh)
                raise MemoryError()
        for k in range(k0, k0 + old):
            free(self.b[k])
        memmove(&self.b[k0 + nbl], &self.b[k0 + old], (self.nb - k0 - old) * sizeof(_PBlock*))
        memmove(&self.first[k0 + nbl], &self.first[k0 + old], (self.nb - k0 - old) * sizeof(long long))
        self.nb += nbl - old
        for k in range(nbl):
            blk = fresh[k]
            per = m // nbl + (1 if k < m % nbl else 0)
            memcpy(blk.t, &t[j], per * sizeof(long long))
            memcpy(blk.l, &l[j], per * sizeof(long long))
            blk.n = per
            j += per
            self.b[k0 + k] = blk
            self.first[k0 + k] = blk.t[0]
        free(fresh)
        return 0

    cdef Py_ssize_t _insert(self, Py_ssize_t *pk, Py_ssize_t *pi, long long x, long long v) except -2:
        """Insert the breakpoint ``(x, v)`` at position ``(*pk, *pi)`` (where the breakpoint
        now there, if any, was; ``(k, n)`` of block ``k`` is its end; ``(0, 0)`` in an empty
        profile), which is updated to
        where it landed. A full block is split in two first, its upper half (from ``_PB //
        2`` on) to a new block after it: the index of the block split, -1 if none."""
        cdef Py_ssize_t k = pk[0], i = pi[0], h, split = -1
        cdef _PBlock *blk
        cdef _PBlock *nx
        if self.nb == 0:
            self._new_block(0)
        blk = self.b[k]
        if blk.n == _PB:  # split: the upper half to a new block after it
            h = _PB // 2
            self._new_block(k + 1)
            blk = self.b[k]
            nx = self.b[k + 1]
            memcpy(nx.t, &blk.t[h], (_PB - h) * sizeof(long long))
            memcpy(nx.l, &blk.l[h], (_PB - h) * sizeof(long long))
            nx.n = _PB - h
            blk.n = h
            self.first[k + 1] = nx.t[0]
            split = k
            if i > h:
                k += 1
                i -= h
                blk = nx
        memmove(&blk.t[i + 1], &blk.t[i], (blk.n - i) * sizeof(long long))
        memmove(&blk.l[i + 1], &blk.l[i], (blk.n - i) * sizeof(long long))
        blk.t[i] = x
        blk.l[i] = v
        blk.n += 1
        if i == 0:
            self.first[k] = x
        self.n += 1
        pk[0] = k
        pi[0] = i
        return split

    cdef void _remove_at(self, Py_ssize_t k, Py_ssize_t i) noexcept:
        """Take out the breakpoint at ``(k, i)`` (an emptied block is freed; the caller counts
        it)."""
        cdef _PBlock *blk = self.b[k]
        memmove(&blk.t[i], &blk.t[i + 1], (blk.n - i - 1) * sizeof(long long))
        memmove(&blk.l[i], &blk.l[i + 1], (blk.n - i - 1) * sizeof(long long))
        blk.n -= 1
        self.n -= 1
        if blk.n == 0:
            free(blk)
            memmove(&self.b[k], &self.b[k + 1], (self.nb - k - 1) * sizeof(_PBlock*))
            memmove(&self.first[k], &self.first[k + 1], (self.nb - k - 1) * sizeof(long long))
            self.nb -= 1
        elif i == 0:
            self.first[k] = blk.t[0]

    cdef Py_ssize_t _drop_before(self, long long x) except -1:
        """Take out every breakpoint before ``x``, which becomes one (the load from it on
        unchanged); how many were taken out (counted in ``dropped``)."""
        cdef Py_ssize_t k, i, j, m = 0
        cdef _PBlock *blk
        _prof_split(self, x, &k, &i)
        for j in range(k):
            m += self.b[j].n
            free(self.b[j])
        memmove(&self.b[0], &self.b[k], (self.nb - k) * sizeof(_PBlock*))
        memmove(&self.first[0], &self.first[k], (self.nb - k) * sizeof(long long))
        self.nb -= k
        if i > 0:
            blk = self.b[0]
            memmove(&blk.t[0], &blk.t[i], (blk.n - i) * sizeof(long long))
            memmove(&blk.l[0], &blk.l[i], (blk.n - i) * sizeof(long long))
            blk.n -= i
            self.first[0] = blk.t[0]
            m += i
        self.n -= m
        self.dropped += m
        return m


@cython.final  # (no subclass: add, declared inline, is called directly and inlined)
@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class _Pieces:
    """Where a window uses an interleaved lock: ``(start, end, rate)`` pieces in time order
    (SchedHooks._pw_settle; _prof_fit makes them, _prof_add adds them to a LoadProfile).
    Typed arrays, as LoadProfile; iterating gives the pieces as tuples."""

    cdef long long *s
    cdef long long *e
    cdef double *r
    cdef Py_ssize_t n, cap

    def __dealloc__(self):
        free(self.s)  # (one block: e and r point into it)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([(self.s[i], self.e[i], self.r[i]) for i in range(self.n)])

    cdef inline int add(self, long long s, long long e, double r) except -1:
        """Append the piece ``[s, e)`` at rate ``r``; one that continues the last piece at the
        same rate (``s`` its end, ``r`` its rate) extends it instead: the same use of the lock,
        in one piece (a window fitted across many stretches of the load profile at the rate it
        wants would otherwise keep a piece per stretch)."""
        if self.n and self.e[self.n - 1] == s and self.r[self.n - 1] == r and e >= s:
            self.e[self.n - 1] = e
            return 0
        if self.n == self.cap:
            self._reserve(self.n + 1)
        self.s[self.n] = s
        self.e[self.n] = e
        self.r[self.n] = r
        self.n += 1
        return 0

    cdef int _reserve(self, Py_ssize_t need) except -1:
        """Room for ``need`` pieces: ``s``, ``e`` and ``r`` are three stretches of one block,
        so a new window's first piece costs one allocation, not three (and a growth one copy
        into a new block, not three reallocations)."""
        cdef char *blk
        cdef Py_ssize_t cap = self.cap, n = self.n
        if need <= cap:
            return 0
        while cap < need:
            cap = cap * 2 if cap else 16
        blk = <char*>malloc(cap * (2 * sizeof(long long) + sizeof(double)))
        if blk == NULL:
            raise MemoryError()
        if n:
            memcpy(blk, self.s, n * sizeof(long long))
            memcpy(blk + cap * sizeof(long long), self.e, n * sizeof(long long))
            memcpy(blk + 2 * cap * sizeof(long long), self.r, n * sizeof(double))
        free(self.s)
        self.s = <long long*>blk
        self.e = <long long*>(blk + cap * sizeof(long long))
        self.r = <double*>(blk + 2 * cap * sizeof(long long))
        self.cap = cap
        return 0

    cdef int append_range(self, _Pieces o, Py_ssize_t i0, Py_ssize_t i1) except -1:
        """Append ``o``'s pieces ``i0`` to ``i1`` as they are (for pieces in time order that
        continue none of this one's: what :meth:`add` would do with each)."""
        cdef Py_ssize_t m = i1 - i0
        if m <= 0:
            return 0
        self._reserve(self.n + m)
        memcpy(&self.s[self.n], &o.s[i0], m * sizeof(long long))
        memcpy(&self.e[self.n], &o.e[i0], m * sizeof(long long))
        memcpy(&self.r[self.n], &o.r[i0], m * sizeof(double))
        self.n += m
        return 0

    cdef int extend(self, _Pieces o) except -1:
        cdef Py_ssize_t i
        for i in range(o.n):
            self.add(o.s[i], o.e[i], o.r[i])
        return 0


@cython.final
@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class _Window:
    """A settled window of an interleaved lock (``LockState.spans``; SchedHooks._pw_settle):
    its actor's name, its ``[start, end)`` (ns since the timeline's start, its waits
    included), its holds (``h`` ns over ``n`` acquisitions, of which ``ns`` single holds of
    ``hs`` ns), the waits counted for it so far (``wait_ns`` over ``waits`` samples,
    SchedHooks._pw_count), its length without waits (``dt``) and where it used the lock."""

    cdef readonly object actor
    cdef readonly long long start, end, h, n, hs, ns, wait_ns, waits, dt
    cdef readonly _Pieces pieces


cdef _Window _window(actor, long long start, long long end, long long h, long long n, long long hs,
                     long long ns, long long dt, _Pieces pieces):
    cdef _Window w = _Window.__new__(_Window)
    w.actor = actor
    w.start = start
    w.end = end
    w.h = h
    w.n = n
    w.hs = hs
    w.ns = ns
    w.wait_ns = 0
    w.waits = 0
    w.dt = dt
    w.pieces = pieces
    return w


cdef enum:  # LockStatsState's figures kept in C (its _fc / _fo)
    _FIG_ACQ = 0, _FIG_HOLD = 1, _FIG_HOLD_R = 2, _FIG_HOLD_W = 3, _NFIG = 4


@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class LockStatsState:
    """The fields of :class:`pkvm.sim.locks.LockStats` (its base class), which the timeline's
    hooks update on every acquisition and release.

    ``acquisitions``, ``hold_ns``, ``hold_read_ns`` and ``hold_write_ns`` are int64 fields
    (``_fc``) while they hold ints that fit, and Python objects (``_fo``, None while in C)
    otherwise: each reads back as the int (or other number) the Python arithmetic made
    (``_fig_add``)."""

    cdef public object wait_ns, waits
    cdef public object wait_distribution
    cdef public bint _rw
    cdef int64_t _fc[_NFIG]
    cdef list _fo

    def __cinit__(self, *args, **kwargs):
        self._fo = [None] * _NFIG

    property acquisitions:
        def __get__(self):
            return _fig_get(self, _FIG_ACQ)

        def __set__(self, value):
            _fig_set(self, _FIG_ACQ, value)

    property hold_ns:
        def __get__(self):
            return _fig_get(self, _FIG_HOLD)

        def __set__(self, value):
            _fig_set(self, _FIG_HOLD, value)

    property hold_read_ns:
        def __get__(self):
            return _fig_get(self, _FIG_HOLD_R)

        def __set__(self, value):
            _fig_set(self, _FIG_HOLD_R, value)

    property hold_write_ns:
        def __get__(self):
            return _fig_get(self, _FIG_HOLD_W)

        def __set__(self, value):
            _fig_set(self, _FIG_HOLD_W, value)


cdef inline object _fig_get(LockStatsState st, int i):
    """Figure ``i`` of ``st`` (a Python int from its int64 field, or its object)."""
    o = (<list>st._fo)[i]
    return st._fc[i] if o is None else o


cdef int _fig_set(LockStatsState st, int i, value) except -1:
    cdef int64_t x
    if type(value) is int and _as_i64(value, &x):
        st._fc[i] = x
        (<list>st._fo)[i] = None
    else:
        (<list>st._fo)[i] = value
    return 0


cdef inline int _fig_add_i(LockStatsState st, int i, int64_t n) except -1:
    """Figure ``i`` ``+= n``, in C while it stays in int64."""
    cdef int64_t r
    if (<list>st._fo)[i] is None and not pkvm_add_ovf(st._fc[i], n, &r):
        st._fc[i] = r
        return 0
    return _fig_set(st, i, _fig_get(st, i) + n)


cdef int _fig_add(LockStatsState st, int i, value) except -1:
    """Figure ``i`` ``+= value`` (any number: Python's arithmetic where it is not two int64s)."""
    cdef int64_t x
    if type(value) is int and _as_i64(value, &x):
        return _fig_add_i(st, i, x)
    return _fig_set(st, i, _fig_get(st, i) + value)


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
    # An RWLock's holds counted in stats.hold_ns, in either mode and whoever counted them (the
    # timeline's hooks for a hold taken and released uncontended, SimPy's lock for the others),
    # as disjoint [start, end] intervals in SimPy's time, in order: hold_ns is the length of
    # their union. Holds overlap where readers share, and where a hold taken uncontended on its
    # holder's clock (ahead of SimPy's) overlaps one SimPy granted meanwhile; each hold adds
    # only the part no interval covers yet (_union_add). Intervals no later hold can reach
    # back to are dropped (pkvm.sim.locks.RWLock._prune_union) once the list is longer than
    # ``union_prune_at``. None on the other locks.
    cdef public list hold_union
    cdef public Py_ssize_t union_prune_at
    # A lock the kernel takes once per page (``_PAGEWISE_LOCKS``) under
    # ``Timeline(pagewise_locks="interleaved")``: its holds never queue in SimPy; each window of
    # work that held it (``SchedHooks.pw_begin`` / ``pw_end``) is settled against the others'
    # (``SchedHooks._pw_settle``), and ``spans`` keeps the settled windows (actor, start, end,
    # holds, where it used the lock: ``_pw_settle``'s list), ns since the timeline's start,
    # until no window can overlap them. False / None on the other locks and under ``pagewise_locks="batch"``.
    cdef public bint interleaved
    cdef public list spans
    # ``mmu_lock`` under ``pagewise_locks="interleaved"``: the write holds the timeline has
    # seen, ``(start, end, actor)`` in ns since its start, for the fault batches whose reads
    # interleave with them (SchedHooks._rd_round), kept until no batch can overlap them
    # (``trim_w``: the length at which to trim next). None on the other locks and otherwise.
    cdef public list wholds
    cdef public Py_ssize_t trim_w
    # ... and the lock's load profile, the rate at which the settled windows use it
    # (LoadProfile; SchedHooks._pw_settle, _prof_fit, _prof_add). None on the other locks.
    cdef public LoadProfile prof
    # When to try trimming them again (SchedHooks._pw_settle): the windows kept, the profile's
    # breakpoints; raised to twice what a trim left, so a trim that finds nothing to drop is
    # not repeated at every window.
    cdef public Py_ssize_t trim_spans, trim_prof


@cython.final
@cython.auto_pickle(False)  # live simulation state: never pickled
cdef class _RdWin:
    """A fault batch whose reads of ``mmu_lock`` interleave with other actors' write holds
    (SchedHooks._release_rd), with rounds still to settle: ``stage`` 1, the part ``[lo, hi)``
    in which its install ran after its release in SimPy (due once SimPy's clock passes
    ``hi``); 2, the stretches in which its actor pays what it owes (SchedHooks._pay_lock_debt).
    ``g`` and ``p``: the batch's free time between its acquisitions and its period, ns per
    fault; ``sp``: the window its waits count for (the lock's statistics); ``owed``: the stall
    of the holds before its release, still to go on its actor's clock (SchedHooks._pw_end)."""

    cdef long long lo, hi, owed
    cdef int stage
    cdef double g, p
    cdef _Window sp


cdef int _rd_clip(list iv, long long s, long long e, long long lo, long long hi, long long xs,
                  long long xe) except -1:
    """Append to ``iv`` the part of the write hold ``[s, e)`` in ``[lo, hi)`` outside
    ``[xs, xe)``, as ``(start, end, began before lo)``."""
    cdef bint before = s < lo
    if s < lo:
        s = lo
    if e > hi:
        e = hi
    if e <= s:
        return 0
    if xe > xs and s < xe and e > xs:
        if s < xs:
            iv.append((s, xs, before))
        if e > xe:
            iv.append((xe, e, False))
        return 0
    iv.append((s, e, before))
    return 0


@cython.auto_pickle(False)  # pickled by __getstate__ / __setstate__ (a subclass keeps its type)
cdef class DistState:
    """The state of :class:`pkvm.sim.stats.Distribution` (its base class): a count per
    distinct value (``_hist``), the number of samples, their sum and maximum, and the sorted
    view a percentile read caches (None after an add). The timeline's hooks add samples at C
    level (four or five per balloon chunk).

    Kept in C while it can be (the Python views are built when read, with the same values
    and types): the samples of int64 values and counts added since ``_hist`` was last read
    wait in a table of int64 pairs (``_pv`` / ``_pc``, in the order their values were first
    added, found through the open-addressing index ``_pix``) and go into the dict when it is
    read, and the count, sum and maximum are int64 fields while they are ints that fit
    (``_cs``). Any other sample (a float, an int past int64, a count of less than 1), a
    removal, or an overflow moves the table into the dict and the three figures into Python
    objects first, then runs the Python arithmetic; the figures come back into C when they
    fit again."""

    cdef dict _h                   # the histogram's dict (the samples not in the table)
    cdef int64_t *_pv              # the table: values ...
    cdef int64_t *_pc              # ... and how many samples of each, in first-add order
    cdef Py_ssize_t _pn, _pcap     # its entries, and the room for them
    cdef Py_ssize_t *_pix          # index: slot -> entry + 1 (0: empty), linear probing
    cdef Py_ssize_t _pmask         # its slots - 1 (a power of two minus one; -1: none yet)
    cdef bint _cs                  # count, total and max in _cn, _ct, _cm (else _on, _ot, _om)
    cdef int64_t _cn, _ct, _cm
    cdef object _on, _ot, _om
    cdef public object _sorted

    def __cinit__(self):
        self._h = {}  # value -> how many samples have it
        self._pmask = -1
        self._cs = True
        self._cn = 0
        self._ct = 0
        self._cm = 0
        self._sorted = None

    def __dealloc__(self):
        free(self._pv)
        free(self._pc)
        free(self._pix)

    property _hist:
        """The count per distinct value (a dict; the table's samples moved into it first)."""
        def __get__(self):
            self._flush()
            return self._h

        def __set__(self, dict value):
            self._pn = 0
            self._pix_clear()
            self._h = value

    property _count:
        def __get__(self):
            return self._cn if self._cs else self._on

        def __set__(self, value):
            self._to_obj()
            self._on = value
            self._try_c()

    property _total:
        def __get__(self):
            return self._ct if self._cs else self._ot

        def __set__(self, value):
            self._to_obj()
            self._ot = value
            self._try_c()

    property _max:
        def __get__(self):
            return self._cm if self._cs else self._om

        def __set__(self, value):
            self._to_obj()
            self._om = value
            self._try_c()

    def __getstate__(self):
        return (self._hist, self._count, self._total, self._max)

    def __setstate__(self, state):
        self._to_obj()
        self._hist, self._on, self._ot, self._om = state
        self._try_c()
        self._sorted = None

    def _add(self, value, count):
        """Add without validation, for callers inside pkvm that pass checked values (the
        timeline's hooks, on every latency sample)."""
        self._add_c(value, count)

    cdef int _pix_clear(self) except -1:
        if self._pmask >= 0:
            memset(self._pix, 0, (self._pmask + 1) * sizeof(Py_ssize_t))
        return 0

    cdef int _flush(self) except -1:
        """Move the table's samples into the dict (``hist[v] = hist.get(v, 0) + n``, in the
        order their values were first added, as the adds would have)."""
        cdef Py_ssize_t i = 0, n = self._pn
        cdef dict hist = self._h
        cdef PyObject *old
        if not n:
            return 0
        try:
            while i < n:
                v = self._pv[i]
                old = PyDict_GetItemWithError(hist, v)
                if old is NULL:
                    hist[v] = self._pc[i]
                else:
                    hist[v] = <object>old + self._pc[i]
                i += 1  # (each store either happens or leaves the dict as it was)
        finally:
            # The entries moved leave the table; if a store failed (MemoryError, or a key of
            # the dict whose comparison raised), the rest stay in it, in order, for the next
            # read: no sample is lost or counted twice.
            if i < n:
                memmove(self._pv, self._pv + i, (n - i) * sizeof(int64_t))
                memmove(self._pc, self._pc + i, (n - i) * sizeof(int64_t))
            self._pn = n - i
            self._reindex()
        return 0

    cdef int _reindex(self) except -1:
        """The index of the table's ``_pn`` entries, built again (none: cleared)."""
        cdef Py_ssize_t i, s
        self._pix_clear()
        for i in range(self._pn):
            s = _dist_slot(self._pv[i], self._pmask)
            while self._pix[s]:
                s = (s + 1) & self._pmask
            self._pix[s] = i + 1
        return 0

    cdef int _to_obj(self) except -1:
        """The table into the dict, the count, total and max into Python objects."""
        self._flush()
        if self._cs:
            self._on = self._cn
            self._ot = self._ct
            self._om = self._cm
            self._cs = False
        return 0

    cdef int _try_c(self) except -1:
        """The count, total and max back into C if all three are ints that fit an int64."""
        cdef int64_t n, t, m
        if (not self._cs and type(self._on) is int and type(self._ot) is int
                and type(self._om) is int and _as_i64(self._on, &n) and _as_i64(self._ot, &t)
                and _as_i64(self._om, &m)):
            self._cn = n
            self._ct = t
            self._cm = m
            self._on = self._ot = self._om = None
            self._cs = True
        return 0

    cdef int _grow(self) except -1:
        """Room for one more entry in the table, and an index at most half full."""
        cdef Py_ssize_t cap, slots
        cdef int64_t *pv
        cdef int64_t *pc
        cdef Py_ssize_t *ix
        if self._pn == self._pcap:
            cap = self._pcap * 2 if self._pcap else 16
            pv = <int64_t *>realloc(self._pv, cap * sizeof(int64_t))
            if pv is NULL:
                raise MemoryError()
            self._pv = pv
            pc = <int64_t *>realloc(self._pc, cap * sizeof(int64_t))
            if pc is NULL:
                raise MemoryError()
            self._pc = pc
            self._pcap = cap
        if 2 * (self._pn + 1) > self._pmask + 1:
            slots = (self._pmask + 1) * 2 if self._pmask >= 0 else 32
            ix = <Py_ssize_t *>calloc(slots, sizeof(Py_ssize_t))
            if ix is NULL:
                raise MemoryError()
            free(self._pix)
            self._pix = ix
            self._pmask = slots - 1
            self._reindex()
        return 0

    cdef bint _add_i64(self, int64_t v, int64_t c) except -1:
        """Add ``c`` >= 1 samples of ``v`` in C; False (nothing changed) if a figure or the
        value's count in the table would leave int64."""
        cdef int64_t n, t, vc
        cdef Py_ssize_t s = 0, e = 0
        if pkvm_add_ovf(self._cn, c, &n):
            return False
        if c == 1:
            if pkvm_add_ovf(self._ct, v, &t):
                return False
        elif pkvm_mul_ovf(v, c, &vc) or pkvm_add_ovf(self._ct, vc, &t):
            return False
        if self._pmask >= 0:
            s = _dist_slot(v, self._pmask)
            while True:
                e = self._pix[s]
                if not e or self._pv[e - 1] == v:
                    break
                s = (s + 1) & self._pmask
        if e:
            if pkvm_add_ovf(self._pc[e - 1], c, &vc):
                return False
            self._pc[e - 1] = vc
        else:
            if self._pmask < 0 or self._pn == self._pcap or 2 * (self._pn + 1) > self._pmask + 1:
                self._grow()
                s = _dist_slot(v, self._pmask)
                while self._pix[s]:
                    s = (s + 1) & self._pmask
            self._pv[self._pn] = v
            self._pc[self._pn] = c
            self._pn += 1
            self._pix[s] = self._pn
        if v > self._cm or not self._cn:
            self._cm = v
        self._cn = n
        self._ct = t
        return True

    cdef int _remove_n(self, value, long long k) except -1:
        """Take back ``k`` samples of ``value`` (they must be there); the maximum follows."""
        self._to_obj()
        n = self._h[value]
        if n == k:
            del self._h[value]
        else:
            self._h[value] = n - k
        self._on -= k
        self._ot -= value * k
        if value >= self._om:
            self._om = max(self._h) if self._h else 0
        self._sorted = None
        self._try_c()
        return 0

    cdef int _remove_c(self, value) except -1:
        """Take back one sample of ``value`` (it must be there); the maximum follows."""
        return self._remove_n(value, 1)

    cdef int _add_ll(self, int64_t v, int64_t c) except -1:
        """:meth:`_add_c` of an int64 value and count, boxed only if it cannot stay in C."""
        if self._cs and c >= 1 and self._add_i64(v, c):
            self._sorted = None
            return 0
        return self._add_c(v, c)

    cdef int _add_c(self, value, count) except -1:
        cdef int64_t v, c
        if (self._cs and type(value) is int and type(count) is int and _as_i64(value, &v)
                and _as_i64(count, &c) and c >= 1 and self._add_i64(v, c)):
            self._sorted = None
            return 0
        # any other sample, through the dict and Python objects (the table first, for the order)
        self._to_obj()
        cdef dict hist = self._h
        cdef PyObject *old = PyDict_GetItemWithError(hist, value)  # (except? NULL: raises)
        if old is NULL:
            hist[value] = count if type(count) is int else 0 + count
        else:
            hist[value] = <object>old + count
        if value > self._om or not self._on:
            self._om = value
        self._on += count
        self._ot += value if type(count) is int and type(value) is int and count == 1 else value * count
        self._sorted = None
        self._try_c()
        return 0


cdef inline int64_t _floor_div(int64_t x, int64_t k) noexcept:
    """``x // k`` as Python rounds it (toward minus infinity), for ``k`` > 0."""
    cdef int64_t q = x / k
    if q * k != x and x < 0:
        q -= 1
    return q


cdef inline bint _i64_sum(p, m, s, z, int64_t *out) except -1:
    """Whether ``p - m + s - z`` of four ints is computed in int64 without overflow (the value in
    ``out``); False for anything else (the caller then computes it in Python)."""
    cdef int64_t vp, vm, vs, vz
    return (type(p) is int and type(m) is int and type(s) is int and type(z) is int
            and _as_i64(p, &vp) and _as_i64(m, &vm) and _as_i64(s, &vs) and _as_i64(z, &vz)
            and not pkvm_sub_ovf(vp, vm, out) and not pkvm_add_ovf(out[0], vs, out)
            and not pkvm_sub_ovf(out[0], vz, out))


cdef inline Py_ssize_t _dist_slot(int64_t v, Py_ssize_t mask) noexcept:
    """The first index slot of value ``v`` in a DistState's table (Fibonacci hashing)."""
    return <Py_ssize_t>((<uint64_t>v * <uint64_t>0x9E3779B97F4A7C15ULL) >> 32) & mask


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


def hold_union_add(list fr, s, e):
    """:func:`_union_add` for ``pkvm.sim.locks.RWLock``: add ``[s, e)`` to the disjoint
    intervals ``fr`` and return the part of it they did not cover."""
    return _union_add(fr, s, e)


cdef object _union_add(list fr, s, e):
    """Add ``[s, e)`` to ``fr`` (``LockState.hold_union``), a list of disjoint ``[start,
    end]`` intervals in order (those it overlaps or touches merge with it); return the part
    of it no interval covered yet, for ``hold_ns``, the length of the union of the holds. Two
    holds may overlap: readers share, and a hold taken uncontended on its holder's clock runs
    ahead of SimPy's, where SimPy may grant another meanwhile. Until 2026-12-05 two such read
    holds were counted twice, and until later on 2026-12-07 a write hold with a read hold."""
    cdef Py_ssize_t n = len(fr), lo = 0, hi = n, mid, j
    cdef list iv
    if s >= e:
        return 0
    while lo < hi:  # the first interval that starts after s
        mid = (lo + hi) >> 1
        if (<list>fr[mid])[0] <= s:
            lo = mid + 1
        else:
            hi = mid
    if lo > 0 and (<list>fr[lo - 1])[1] >= s:
        lo -= 1  # the one before reaches s
    j = lo
    a = s
    b = e
    cov = 0
    while j < n:
        iv = <list>fr[j]
        if iv[0] > e:
            break
        lo_ = iv[0] if iv[0] > s else s
        hi_ = iv[1] if iv[1] < e else e
        if hi_ > lo_:
            cov += hi_ - lo_
        if iv[0] < a:
            a = iv[0]
        if iv[1] > b:
            b = iv[1]
        j += 1
    if j > lo:
        del fr[lo + 1:j]
        fr[lo] = [a, b]
    else:
        fr.insert(lo, [a, b])
    return (e - s) - cov

# How many settled windows (breakpoints of the load profile) an interleaved lock keeps, plus
# 64 (256) per actor, before its oldest are coarsened (SchedHooks._pw_settle; "Bookkeeping" in
# docs/timeline.md). Trimming the past is exact and comes first; coarsening is lossy.
cdef Py_ssize_t _SPANS_MAX = 64
cdef Py_ssize_t _PROF_MAX = 1 << 18


cdef inline Py_ssize_t _blk_last_le(long long *bt, Py_ssize_t n, long long x, Py_ssize_t i) noexcept:
    """The last index of the block's breakpoints ``bt[:n]`` at or before ``x``, given that
    ``bt[i] <= x``: a few steps forward first (the pieces of a window come in time order,
    each from the last one's end), then a search without branches on the comparisons."""
    cdef Py_ssize_t j = i + 1, m, half
    while j < n and j <= i + 4 and bt[j] <= x:
        j += 1
    if j == n or bt[j] > x:
        return j - 1
    m = n - j  # bt[j] <= x: the answer is in [j, n)
    while m > 1:
        half = m >> 1
        j = j + half if bt[j + half] <= x else j
        m -= half
    return j


cdef inline void _prof_seek(LoadProfile p, long long x, Py_ssize_t *pk, Py_ssize_t *pi,
                            Py_ssize_t hk=-1, Py_ssize_t hi=0) noexcept:
    """The position of the profile's last breakpoint at or before ``x`` (the start of the
    segment holding it): ``(0, -1)`` if none. ``(hk, hi)``: a position at or before it where
    it may be near (the pieces of a window come in time order)."""
    cdef Py_ssize_t lo = 0, top = p.nb, mid, k
    cdef long long *first = p.first
    if 0 <= hk < top and first[hk] <= x and (hk + 1 == top or first[hk + 1] > x):
        k = hk
        if not (0 <= hi < p.b[k].n and p.b[k].t[hi] <= x):
            hi = 0
    else:
        while lo < top:  # the last block whose first breakpoint is at or before x
            mid = (lo + top) >> 1
            if first[mid] <= x:
                lo = mid + 1
            else:
                top = mid
        k = lo - 1
        if k < 0:
            pk[0] = 0
            pi[0] = -1
            return
        hi = 0
    pk[0] = k
    pi[0] = _blk_last_le(p.b[k].t, p.b[k].n, x, hi)


cdef inline bint _prof_next(LoadProfile p, Py_ssize_t *pk, Py_ssize_t *pi) noexcept:
    """Step a position to the next breakpoint; False (and the position past the end) if
    there is none."""
    cdef Py_ssize_t k = pk[0], i = pi[0] + 1
    if k < p.nb and i < p.b[k].n:
        pi[0] = i
        return True
    if k + 1 < p.nb:
        pk[0] = k + 1
        pi[0] = 0
        return True
    pk[0] = p.nb
    pi[0] = 0
    return False


cdef inline long long _prof_load_at(LoadProfile p, Py_ssize_t k, Py_ssize_t i) noexcept:
    """The load from the breakpoint at ``(k, i)`` on (0 before the first)."""
    return p.b[k].l[i] if i >= 0 else 0


cdef inline long long _prof_load_before(LoadProfile p, Py_ssize_t k, Py_ssize_t i) noexcept:
    """The load just before the breakpoint at ``(k, i)`` (0 before the first)."""
    if i > 0:
        return p.b[k].l[i - 1]
    if k > 0:
        return p.b[k - 1].l[p.b[k - 1].n - 1]
    return 0


cdef Py_ssize_t _prof_split(LoadProfile p, long long x, Py_ssize_t *pk, Py_ssize_t *pi,
                            Py_ssize_t hk=-1, Py_ssize_t hi=0) except -2:
    """Make ``x`` a breakpoint of the load profile ``p``, the load on each side unchanged; its
    position in ``(*pk, *pi)`` (``(hk, hi)``: a position at or before it, _prof_seek). The
    index of the block split to make room (LoadProfile._insert), -1 if none."""
    cdef Py_ssize_t k, i
    _prof_seek(p, x, &k, &i, hk, hi)
    if i >= 0 and p.b[k].t[i] == x:
        pk[0] = k
        pi[0] = i
        return -1
    cdef long long v = _prof_load_at(p, k, i)
    i += 1
    cdef Py_ssize_t split = p._insert(&k, &i, x, v)
    pk[0] = k
    pi[0] = i
    return split


cdef long long _prof_fit(LoadProfile p, long long t0, long long dt, double d, _Pieces pieces) except -1:
    """A window that starts at ``t0`` and alone would take ``dt`` ns using the lock at rate
    ``d``: where the profile's load leaves it less than ``d``, it goes at the speed the
    rest allows, ``(1 - load) / d``. Its end, and in ``pieces`` the ``(start, end, rate)``
    at which it uses the lock on the way."""
    cdef Py_ssize_t k, i, nk, ni
    cdef double need = <double>dt, l, sp, seg, r
    cdef long long t = t0, end, take
    _prof_seek(p, t0, &k, &i)  # the segment holding t0
    while need > 0.5:
        l = _prof_load_at(p, k, i) / _LOAD_ONE
        nk = k
        ni = i
        if _prof_next(p, &nk, &ni):
            end = p.b[nk].t[ni]
        else:
            end = -1  # the last segment: no end
        if l <= 1.0 - d:
            sp = 1.0
        elif l < 1.0:
            sp = (1.0 - l) / d
        else:
            sp = 0.0
        r = d * sp
        if sp > 0.0:
            seg = need / sp
            if end < 0 or <double>(end - t) >= seg:
                take = <long long>(seg + 0.5)
                if take < 1:
                    take = 1
                pieces.add(t, t + take, r)
                return t + take
            pieces.add(t, end, r)
            need -= sp * (end - t)
        elif end < 0:  # a saturated last segment cannot happen (every window ends); guard
            pieces.add(t, t + <long long>(need + 0.5), d)
            return t + <long long>(need + 0.5)
        t = end
        k = nk
        i = ni
    return t


cdef int _prof_fit_fair(LoadProfile p, long long t0, Py_ssize_t m, long long *dts, double *ds,
                        list rests, list ends, _Pieces total) except -1:
    """``m`` windows that start at ``t0``, window ``i`` alone taking ``dts[i]`` ns using the lock
    at rate ``ds[i]``, fitted together: in each stretch the capacity the profile's load leaves
    is shared max-min fair (each gets its rate, or an equal share of what is left when that is
    less), and a window goes at the speed its share allows. Window ``i``'s pieces go to
    ``rests[i]`` and its end to ``ends[i]``; to ``total``, their sum, as the profile takes it
    (each stretch at the sum of the windows' rates in fixed point, which a double holds
    exactly: adding it adds the rests, in one pass)."""
    cdef Py_ssize_t i, left, active = 0, k, j, nk, nj
    cdef long long qsum
    cdef long long t = t0, end, tau, take
    cdef double avail, l, share, give
    cdef double *need = <double*>malloc(m * sizeof(double))
    cdef double *alloc = <double*>malloc(m * sizeof(double))
    cdef char *done = <char*>malloc(m)
    if need == NULL or alloc == NULL or done == NULL:
        free(need)
        free(alloc)
        free(done)
        raise MemoryError()
    _prof_seek(p, t0, &k, &j)  # t0's segment
    try:
        for i in range(m):
            need[i] = <double>dts[i]
            done[i] = need[i] <= 0.5
            if done[i]:
                ends[i] = t0
            else:
                active += 1
        while active > 0:
            l = _prof_load_at(p, k, j) / _LOAD_ONE
            nk = k
            nj = j
            end = p.b[nk].t[nj] if _prof_next(p, &nk, &nj) else -1
            avail = 1.0 - l
            if avail < 0.0:
                avail = 0.0
            if end < 0 and avail <= 0.0:
                avail = 1.0  # a saturated last segment cannot happen (every window ends); guard
            # max-min fair shares: the smallest rates are met first
            for i in range(m):
                alloc[i] = 0.0
            left = active
            while left > 0 and avail > 1e-12:
                share = avail / left
                give = 0.0
                for i in range(m):
                    if not done[i] and alloc[i] == 0.0 and ds[i] <= share:
                        alloc[i] = ds[i]
                        give += ds[i]
                        left -= 1
                if give == 0.0:  # nobody is satisfied by an equal share: all take it
                    for i in range(m):
                        if not done[i] and alloc[i] == 0.0:
                            alloc[i] = share
                    left = 0
                    break
                avail -= give
            # the stretch: to the segment's end or the first window that finishes
            tau = end - t if end >= 0 else -1
            for i in range(m):
                if not done[i] and alloc[i] > 0.0:
                    take = <long long>(need[i] * ds[i] / alloc[i] + 0.5)
                    if take < 1:
                        take = 1
                    if tau < 0 or take < tau:
                        tau = take
            if tau < 0:  # nobody progresses in an open segment: guarded above
                tau = 1
            qsum = 0
            for i in range(m):
                if done[i] or alloc[i] <= 0.0:
                    continue
                qsum += _load_qp(alloc[i])
                (<_Pieces>rests[i]).add(t, t + tau, alloc[i])
                need[i] -= <double>tau * alloc[i] / ds[i]
                if need[i] <= 0.5:
                    done[i] = 1
                    ends[i] = t + tau
                    active -= 1
            if qsum > 0:
                total.add(t, t + tau, <double>qsum / _LOAD_ONE)
            t += tau
            if end >= 0 and t >= end:
                k = nk
                j = nj
    finally:
        free(need)
        free(alloc)
        free(done)
    return 0


ctypedef struct _Ev:
    long long t  # a time
    long long d  # the load's change there (fixed point)


cdef int _prof_merge(LoadProfile p, _Ev *ev, Py_ssize_t ne) except -1:
    """Add the changes of load ``ev[:ne]`` (in time order, one per time, none zero, summing
    to zero) to the load profile in one pass over the stretch they cover: the blocks that
    hold it are written anew (_replace_blocks), a breakpoint kept only where the load
    changes. The same profile as adding the pieces they come from one by one (the loads are
    fixed point, so the sums are exact, and the profile has one form for a given load)."""
    cdef Py_ssize_t k, i, ka, ia, kb, ib, k0, k1, nold = 0, nnew = 0, cap, oi, ei, L
    cdef long long tmin, tmax, prev, ocur, dcur, t, v
    cdef long long *ct = NULL
    cdef long long *cl = NULL
    cdef _PBlock *blk
    cdef bint more
    if ne == 0:
        return 0
    try:
        tmin = ev[0].t
        tmax = ev[ne - 1].t
        # the first breakpoint at or after tmin, and the load before it
        _prof_seek(p, tmin, &k, &i)
        if i >= 0 and p.b[k].t[i] == tmin:
            prev = _prof_load_before(p, k, i)
            ka = k
            ia = i
        elif i >= 0:
            prev = p.b[k].l[i]
            ka = k
            ia = i
            if not _prof_next(p, &ka, &ia):
                ka = p.nb
                ia = 0
        else:
            prev = 0
            ka = 0
            ia = 0
        # the blocks rewritten: from the one holding (ka, ia) (or the last) to the one holding
        # the first breakpoint after tmax (or the last)
        k0 = ka if ka < p.nb else p.nb - 1
        kb = ka
        ib = ia
        more = kb < p.nb
        while more and p.b[kb].t[ib] <= tmax:
            nold += 1
            more = _prof_next(p, &kb, &ib)
        if not more:
            kb = p.nb
            ib = 0
        k1 = kb if kb < p.nb else p.nb - 1
        cap = ne + nold + 1
        if k0 >= 0:
            for k in range(k0, k1 + 1):
                cap += p.b[k].n
        ct = <long long*>malloc(cap * sizeof(long long))
        cl = <long long*>malloc(cap * sizeof(long long))
        if ct == NULL or cl == NULL:
            raise MemoryError()
        L = 0
        # the blocks' breakpoints before (ka, ia)
        if k0 >= 0:
            k = k0
            while k <= k1 and (k < ka or ka >= p.nb):
                blk = p.b[k]
                memcpy(&ct[L], blk.t, blk.n * sizeof(long long))
                memcpy(&cl[L], blk.l, blk.n * sizeof(long long))
                L += blk.n
                k += 1
            if ka < p.nb and k == ka:
                memcpy(&ct[L], p.b[ka].t, ia * sizeof(long long))
                memcpy(&cl[L], p.b[ka].l, ia * sizeof(long long))
                L += ia
        # the old breakpoints in [tmin, tmax] merged with the changes
        ocur = prev
        dcur = 0
        ei = 0
        k = ka
        i = ia
        oi = 0
        while oi < nold or ei < ne:
            if oi < nold and (ei >= ne or p.b[k].t[i] <= ev[ei].t):
                t = p.b[k].t[i]
            else:
                t = ev[ei].t
            if oi < nold and p.b[k].t[i] == t:
                ocur = p.b[k].l[i]
                oi += 1
                _prof_next(p, &k, &i)
            if ei < ne and ev[ei].t == t:
                dcur += ev[ei].d
                ei += 1
            v = ocur + dcur
            if v != prev:
                ct[L] = t
                cl[L] = v
                L += 1
                nnew += 1
                prev = v
            else:
                p.merged += 1
        # the rest of the last block rewritten, from the first breakpoint after tmax
        if kb < p.nb:
            blk = p.b[kb]
            memcpy(&ct[L], &blk.t[ib], (blk.n - ib) * sizeof(long long))
            memcpy(&cl[L], &blk.l[ib], (blk.n - ib) * sizeof(long long))
            L += blk.n - ib
        p._replace_blocks(k0 if k0 >= 0 else 0, k1 if k0 >= 0 else -1, ct, cl, L)
        p.n += nnew - nold
    finally:
        free(ct)
        free(cl)
    return 0


cdef Py_ssize_t _ev_from(_Pieces pieces, bint neg, Py_ssize_t j0, _Ev *ev) noexcept:
    """Into ``ev`` (room for two per piece), the changes of load that adding (``neg``: taking
    out) ``pieces`` from the ``j0``-th on makes, in time order, one per time, none zero (each
    piece's rate in fixed point, as _prof_add takes it): how many, or -1 if the pieces are
    not in time order."""
    cdef Py_ssize_t j, w = 0
    cdef long long q, s, e, last = LLONG_MIN
    for j in range(j0, pieces.n):
        s = pieces.s[j]
        e = pieces.e[j]
        if e <= s or pieces.r[j] <= 0.0:
            continue
        q = _load_qp(pieces.r[j])
        if q == 0:
            continue
        if s < last:
            return -1
        last = e
        if neg:
            q = -q
        if w and ev[w - 1].t == s:
            ev[w - 1].d += q
            if ev[w - 1].d == 0:
                w -= 1
        else:
            ev[w].t = s
            ev[w].d = q
            w += 1
        ev[w].t = e
        ev[w].d = -q
        w += 1
    return w


cdef int _prof_add_merged(LoadProfile p, _Pieces pieces, double sign, Py_ssize_t j0) except -1:
    """_prof_add for a window's many pieces, in one pass (_prof_merge): 1 if added, 0 if they
    are not in time order (then the caller adds them one by one)."""
    cdef Py_ssize_t w
    cdef _Ev *ev = <_Ev*>malloc(2 * (pieces.n - j0) * sizeof(_Ev))
    if ev == NULL:
        raise MemoryError()
    try:
        w = _ev_from(pieces, sign < 0.0, j0, ev)
        if w < 0:
            return 0
        if w:
            _prof_merge(p, ev, w)
    finally:
        free(ev)
    return 1


cdef int _prof_add(LoadProfile p, _Pieces pieces, double sign=1.0, Py_ssize_t j0=0) except -1:
    """Add each ``(start, end, rate)`` of ``pieces`` (from the ``j0``-th on) to the load
    profile (``sign=-1``: take them out of it; the same pieces taken out restore the loads
    exactly). A breakpoint at
    which the load no longer changes is dropped, so the profile stays as short as the load
    it describes (windows taken out and fitted again elsewhere would otherwise leave one at
    each end they had). From _MERGE_MIN pieces on, in time order (a window's always are), in
    one pass (_prof_add_merged): the same profile."""
    cdef Py_ssize_t j, ka, ia, kb = -1, ib = 0, k, i, e
    cdef long long r
    cdef _PBlock *blk
    if pieces.n - j0 >= _MERGE_MIN and _prof_add_merged(p, pieces, sign, j0):
        return 0
    for j in range(j0, pieces.n):
        if pieces.e[j] <= pieces.s[j] or pieces.r[j] <= 0.0:
            continue
        r = _load_qp(pieces.r[j])
        if r == 0:
            continue
        if sign < 0.0:
            r = -r
        _prof_split(p, pieces.s[j], &ka, &ia, kb, ib)
        if _prof_split(p, pieces.e[j], &kb, &ib, ka, ia) == ka and ia >= _PB // 2:
            ka += 1  # the start's block was split: it went to the upper half
            ia -= _PB // 2
        k = ka
        i = ia
        while k < kb or (k == kb and i < ib):
            blk = p.b[k]
            e = blk.n if k < kb else ib
            while i < e:
                blk.l[i] += r
                i += 1
            k += 1
            i = 0
        # only the two ends can have become equal to their neighbours: inside, every segment
        # moved by the same amount (0 before the first breakpoint)
        if p.b[kb].l[ib] == _prof_load_before(p, kb, ib):
            p._remove_at(kb, ib)
            p.merged += 1
        if p.b[ka].l[ia] == _prof_load_before(p, ka, ia):
            p._remove_at(ka, ia)
            p.merged += 1
        # (kb, ib): where the next piece may start; if a breakpoint was taken out it may no
        # longer be a position at or before it: _prof_seek checks its hint
    return 0


cdef int _spans_coarsen(list spans, Py_ssize_t keep) except -1:
    """Merge neighbouring settled windows of the same actor, oldest first, until at most
    ``keep`` remain (or no two neighbours share an actor): one window over both, with both
    holds; its wait samples are no longer re-spread (:meth:`SchedHooks._pw_count`). One pass
    that builds the list anew (the same merges in the same order as merging in place, which
    moved the list's tail for each window merged away)."""
    cdef Py_ssize_t n = len(spans), left = n, j
    cdef _Window x, y
    cdef list out
    if n <= keep or n < 2:
        return 0
    out = []
    x = <_Window>spans[0]
    for j in range(1, n):
        y = <_Window>spans[j]
        if left > keep and x.actor == y.actor:
            x = _window(x.actor, x.start if x.start < y.start else y.start,
                        x.end if x.end > y.end else y.end, x.h + y.h, x.n + y.n,
                        x.hs + y.hs, x.ns + y.ns, x.dt + y.dt, _pieces_merge(x.pieces, y.pieces))
            left -= 1
        else:
            out.append(x)
            x = y
    out.append(x)
    if left < n:
        spans[:] = out
    return 0


cdef _Pieces _pieces_merge(_Pieces x, _Pieces y):
    """Where two merged windows used the lock (``x``'s pieces, then ``y``'s), as one piece at
    their average rate over the stretch from the first's start to the last's end (bounded,
    for _spans_coarsen)."""
    cdef long long a, b
    cdef double u = 0.0
    cdef _Pieces m = _Pieces(), q
    cdef Py_ssize_t i
    if x.n:
        a = x.s[0]
        b = x.e[0]
    elif y.n:
        a = y.s[0]
        b = y.e[0]
    else:
        return m
    for q in (x, y):
        for i in range(q.n):
            if q.s[i] < a:
                a = q.s[i]
            if q.e[i] > b:
                b = q.e[i]
            u += <double>(q.e[i] - q.s[i]) * q.r[i]
    if b > a:
        m.add(a, b, u / <double>(b - a))
    return m


cdef long long _free_slot(list busy, long long x, long long dur) except -1:
    """The earliest ``t >= x`` at which none of the ``busy`` intervals (``(start, end)``,
    sorted by start) meets ``[t, t + dur)``."""
    cdef tuple iv
    cdef long long s, e
    for iv in busy:
        s = iv[0]
        e = iv[1]
        if e <= x:
            continue
        if s >= x + dur:
            break
        x = e
    return x


cdef inline Py_ssize_t _pieces_from(_Pieces pieces, long long a) noexcept:
    """The first of a window's pieces that ends after ``a`` (``pieces.n``: none), by
    bisection. A window's pieces are in time order, each from the last one's end on: every
    maker appends them so (_prof_fit, _prof_fit_fair, the split of a stalled window,
    _pieces_merge)."""
    cdef Py_ssize_t lo = 0, hi = pieces.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if pieces.e[mid] <= a:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef double _pieces_use(_Pieces pieces, long long a, long long b) except? -1.0:
    """The lock time the ``(start, end, rate)`` pieces of a window use in ``[a, b)`` (only
    the pieces that meet it are visited: a window of 64 vCPUs' boot keeps tens of thousands)."""
    cdef double u = 0.0
    cdef long long x, y
    cdef Py_ssize_t i
    for i in range(_pieces_from(pieces, a), pieces.n):
        x = pieces.s[i]
        if x >= b:
            break
        y = pieces.e[i]
        if x < a:
            x = a
        if y > b:
            y = b
        if y > x:
            u += <double>(y - x) * pieces.r[i]
    return u


cdef int _prof_coarsen(LoadProfile p, Py_ssize_t keep) except -1:
    """Average neighbouring segments of a load profile, oldest first, until at most ``keep``
    breakpoints remain (the last, open-ended segment stays as it is).

    A pass merges the segments in pairs, ``[t0, t2)`` from ``[t0, t1)`` and ``[t1, t2)``, then
    ``[t2, t4)``, ..., each at their time-weighted average load, and stops when ``keep`` is
    reached; while too many remain, the next pass starts again from the oldest. Each pass
    compacts the arrays in place (one read and one write index), so it costs its length, not
    a move of the whole profile per breakpoint dropped."""
    cdef Py_ssize_t r, w, n0, m, k, i, n = p.n, dropped = 0
    cdef long long a, b, c, v
    if not (n > keep and 2 < n):
        return 0
    cdef long long *pt = <long long*>malloc(n * sizeof(long long))
    cdef long long *pl = <long long*>malloc(n * sizeof(long long))
    if pt == NULL or pl == NULL:
        free(pt)
        free(pl)
        raise MemoryError()
    w = 0
    for k in range(p.nb):
        for i in range(p.b[k].n):
            pt[w] = p.b[k].t[i]
            pl[w] = p.b[k].l[i]
            w += 1
    while n > keep and 2 < n:
        n0 = n
        r = 0
        w = 0
        # the profile is out[0:w] then in[r:n0]; its length is w + n0 - r
        while w + n0 - r > keep and r + 2 < n0:
            a = pt[r]
            b = pt[r + 1]
            c = pt[r + 2]
            v = pl[r]
            if c > a:  # (in floating point, rounded back to the fixed point)
                v = <long long>floor((<double>pl[r] * (b - a) + <double>pl[r + 1] * (c - b)) / (c - a) + 0.5)
            pt[w] = a
            pl[w] = v
            w += 1
            r += 2
        m = n0 - r
        memmove(&pt[w], &pt[r], m * sizeof(long long))
        memmove(&pl[w], &pl[r], m * sizeof(long long))
        n = w + m
        dropped += r - w
    try:
        p._rebuild(pt, pl, n)
    finally:
        free(pt)
        free(pl)
    p.dropped += dropped
    p.averaged += dropped
    return 0


cdef inline long long _rest_len(_Window sp, double u) noexcept:
    """The time a stalled window's rest (``u`` ns of lock use) takes with the lock to itself:
    the work it has left, at the rate the window uses the lock while it works (``h / dt``), and
    at least ``u``. (Until 2026-12-06 it was spread over what the window had left until its
    end, the waits already owed included, so a window that had waited went on at that diluted
    rate after the hold even where the lock was free: docs/timeline.md, "A window of a single
    hold".)"""
    cdef double x = u
    if sp.h > 0 and sp.dt > sp.h:
        x = u * <double>sp.dt / <double>sp.h
    cdef long long ov = <long long>x
    if <double>ov < x:
        ov += 1
    return ov if ov > 0 else 1


cdef inline double _meet_p(double c, double p, double g) noexcept:
    """The probability that a thread which acquires a lock every ``p`` ns and leaves it free
    ``g`` ns of each period (its own hold is ``p - g``) meets a hold of ``c`` ns that begins at
    a random moment of its period: certain when the hold outlasts the free gap, else ``c / p``
    (docs/timeline.md, "Locks the kernel takes page by page")."""
    if c >= g:
        return 1.0
    return c / p if p > 0.0 else 1.0


cdef inline double _meet_w(double c, double p, double g) noexcept:
    """The mean wait of that thread for that hold: a hold that begins in the thread's own hold
    goes next, and the thread waits ``max(0, c - g)`` at its next acquisition; one that begins
    ``v`` ns before that acquisition (``v`` even in ``[0, g)``) makes it wait ``max(0, c - v)``.
    Averaged over the period: ``c - g (p - g / 2) / p`` when ``c >= g``, else ``c^2 / 2p``
    (half a hold times the chance to meet it)."""
    if p <= 0.0:
        return c
    if c >= g:
        return c - g * (p - 0.5 * g) / p
    return c * c / (2.0 * p)


cdef inline long long _lock_free_at(LockState lk, mode):
    """When (ns since the timeline's start) the holds ``lk``'s holders took and released
    uncontended let an acquisition in ``mode`` in: a reader waits only for writers."""
    if mode == 0 and lk.stats._rw:
        return lk.written_until
    return lk.held_until


ctypedef struct _Holds:
    # A list of (lock, mode, t, t2) entries in C arrays (SchedActor's ``held`` and
    # ``fast_done``): the locks and modes are owned references; ``n`` entries, room for ``cap``.
    # ``lk``: the LockState an entry of ``held`` was taken on (SchedHooks._acquire; an owned
    # reference), NULL where it is not known (the entries Python added, and ``fast_done``'s).
    PyObject **lock
    PyObject **mode
    PyObject **lk
    int64_t *t
    int64_t *t2
    Py_ssize_t n, cap


cdef int _holds_push(_Holds *h, lock, mode, int64_t t, int64_t t2, PyObject *lk) except -1:
    """Append ``(lock, mode, t, t2)`` to ``h``, with ``lk`` (a LockState or NULL)."""
    cdef Py_ssize_t cap
    cdef void *p
    if h.n == h.cap:
        cap = h.cap * 2 if h.cap else 8
        p = realloc(h.lock, cap * sizeof(PyObject *))
        if p is NULL:
            raise MemoryError()
        h.lock = <PyObject **>p
        p = realloc(h.mode, cap * sizeof(PyObject *))
        if p is NULL:
            raise MemoryError()
        h.mode = <PyObject **>p
        p = realloc(h.lk, cap * sizeof(PyObject *))
        if p is NULL:
            raise MemoryError()
        h.lk = <PyObject **>p
        p = realloc(h.t, cap * sizeof(int64_t))
        if p is NULL:
            raise MemoryError()
        h.t = <int64_t *>p
        p = realloc(h.t2, cap * sizeof(int64_t))
        if p is NULL:
            raise MemoryError()
        h.t2 = <int64_t *>p
        h.cap = cap
    _incref(<PyObject *>lock)
    _incref(<PyObject *>mode)
    if lk is not NULL:
        _incref(lk)
    h.lock[h.n] = <PyObject *>lock
    h.mode[h.n] = <PyObject *>mode
    h.lk[h.n] = lk
    h.t[h.n] = t
    h.t2[h.n] = t2
    h.n += 1
    return 0


cdef int _holds_clear(_Holds *h) except -1:
    """Empty ``h`` (its arrays stay for the next entries)."""
    cdef Py_ssize_t i, n = h.n
    h.n = 0
    for i in range(n):
        _decref(h.lock[i])
        _decref(h.mode[i])
        if h.lk[i] is not NULL:
            _decref(h.lk[i])
    return 0


cdef void _holds_free(_Holds *h) noexcept:
    """Empty ``h`` and free its arrays."""
    cdef Py_ssize_t i
    for i in range(h.n):
        _decref(h.lock[i])
        _decref(h.mode[i])
        if h.lk[i] is not NULL:
            _decref(h.lk[i])
    h.n = h.cap = 0
    free(h.lock)
    free(h.mode)
    free(h.lk)
    free(h.t)
    free(h.t2)
    h.lock = h.mode = h.lk = NULL
    h.t = h.t2 = NULL


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
    # the share of its last stretch of work (the one in flight) that ran in guest mode
    # (Ledger.guest_ns): the chance that a KVM request's IPI finds it there (SchedHooks._ipi)
    cdef public double guest_share
    cdef public list ipi_in
    # ``fast_done`` in C: the entries' locks and modes (owned references), grants (``t``) and
    # releases (``t2``)
    cdef _Holds _fd
    # ``held`` in C: the entries' locks and modes (owned references) and their grant times
    # (``t``; -1: a hold its SimPy lock knows; ``t2`` unused)
    cdef _Holds _hd
    cdef public bint in_task, vcpu
    cdef public int absorb
    cdef public Py_ssize_t fast
    # the last grant of a lock in _PAGEWISE_LOCKS that went through SimPy: the lock's
    # acquisition count after it, and its wait (SchedHooks.pagewise spreads it over the pages)
    cdef public long long pw_acq, pw_wait
    # Interleaved pagewise locks (LockState.interleaved): the window over which the kernel's
    # page-by-page acquisitions interleave with the rest of the work (SchedHooks.pw_begin /
    # pw_end; nested windows count as the outermost): its depth and its start on the actor's
    # clock, the holds in it per lock (lock -> [hold ns, acquisitions, first hold's start, single
    # holds' ns, single holds]), the acquisitions the next release stands for and how many of
    # them are long single holds, in how many ns (SchedHooks._pagewise; -1: one, and a hold of
    # one acquisition is a single hold); the wait it owes for them (on its clock already when
    # its own window settled it; SchedHooks._pw_settle), passed on SimPy's at its next yield,
    # and its parts as ``(lock, lock state, window, ns, waits)`` (SchedHooks._pw_count).
    cdef public int pw_depth
    cdef public long long pw_t0, pw_calls, pw_long_n, pw_long_ns, lock_debt
    cdef public dict pw_acc
    cdef public list debts
    # ``mmu_invalidate_seq`` as this actor's last fault snapshotted it before its pfn lookup
    # (fault_timeline): a RET_PF_RETRY with the seq moved since was turned back by an
    # invalidation another thread ended meanwhile (Timeline.retry_fault)
    cdef public int64_t fault_seq
    # A fault batch's reads of mmu_lock, interleaved with other actors' write holds
    # (SchedHooks._release_rd): its rounds still to settle (an _RdWin, or None), and when its
    # last acquisition of mmu_lock for read was asked for and granted through SimPy (ns since
    # the timeline's start; _drive)
    cdef public object rd
    cdef public long long rd_req, rd_grant
    # what its last acquisition through SimPy waited for that lock alone (_drive), without
    # the waits it paid on the way for earlier windows (lock_debt): its lock_wait event; and
    # when (ns since the timeline's start) its last release through SimPy let the lock go,
    # before any wait it owed for earlier windows passed after it: its lock_hold event's end
    cdef public long long acq_wait, rel_t

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
        _holds_clear(&self._hd)
        self.fast = 0
        self.grant_t = {}
        self.vcpu = vcpu
        self.charge_to = name if vcpu else "vmm"
        self.flight = _FL_NONE
        self.flight_t = 0
        self.guest_share = 1.0
        _holds_clear(&self._fd)
        self.pw_acq = -1
        self.pw_wait = 0
        self.pw_depth = 0
        self.pw_t0 = 0
        self.pw_calls = -1
        self.pw_long_n = -1
        self.pw_long_ns = 0
        self.lock_debt = 0
        self.pw_acc = {}
        self.debts = []
        self.absorb = _AB_NONE
        self.ipi_in = []
        self.rd = None
        self.rd_req = 0
        self.rd_grant = 0
        self.acq_wait = 0
        self.rel_t = 0

    def __dealloc__(self):
        _holds_free(&self._hd)
        _holds_free(&self._fd)

    property fast_done:
        """The holds taken and released uncontended since it last resumed, as ``(lock, mode,
        grant, release)`` (a new list; ``_fast_done_add``)."""
        def __get__(self):
            cdef Py_ssize_t i
            return [(<object>self._fd.lock[i], <object>self._fd.mode[i], self._fd.t[i], self._fd.t2[i])
                    for i in range(self._fd.n)]

        def __set__(self, value):
            cdef list entries = [(e[0], e[1], <int64_t>e[2], <int64_t>e[3]) for e in value]
            _holds_clear(&self._fd)
            for e in entries:
                _holds_push(&self._fd, e[0], e[1], e[2], e[3], NULL)

    property held:
        """The locks it holds, as ``(lock, mode, grant time if taken uncontended, else -1)``,
        oldest first (a new list; :meth:`hold` adds one)."""
        def __get__(self):
            cdef Py_ssize_t i
            return [(<object>self._hd.lock[i], <object>self._hd.mode[i], self._hd.t[i]) for i in range(self._hd.n)]

        def __set__(self, value):
            cdef list entries = [(e[0], e[1], <int64_t>e[2]) for e in value]
            _holds_clear(&self._hd)
            for e in entries:
                _holds_push(&self._hd, e[0], e[1], e[2], 0, NULL)

    def hold(self, lock, mode, int64_t t):
        """Add ``(lock, mode, t)`` to :attr:`held` (``t``: the grant time of a hold taken
        uncontended, -1 for one its SimPy lock knows)."""
        _holds_push(&self._hd, lock, mode, t, 0, NULL)

    def held_granted(self, Py_ssize_t i):
        """Entry ``i`` of :attr:`held` is now a hold its SimPy lock knows (grant time -1)."""
        if not 0 <= i < self._hd.n:
            raise IndexError(f"held entry {i} of {self._hd.n}")
        self._hd.t[i] = -1


cdef extern from *:
    """
    static inline void pkvm_incref(PyObject *o) { Py_INCREF(o); }
    static inline void pkvm_decref(PyObject *o) { Py_DECREF(o); }
    """
    void _incref "pkvm_incref"(PyObject *o) noexcept
    void _decref "pkvm_decref"(PyObject *o)


cdef long long _held_take(SchedActor a, lock, mode, PyObject **lk, bint *crossed=NULL) except? -2:
    """Take ``a``'s latest entry of ``(lock, mode)`` out of ``a.held`` and return its grant
    time (-1: a hold its SimPy lock knows); the usual case is the last one (LIFO). ``*lk``
    (when ``lk`` is not NULL) gets the entry's LockState, a reference the caller owns, or
    NULL; ``*crossed`` (when not NULL) whether the hold, taken uncontended, was held at a
    visibility point whose yield was skipped (``t2`` of the entry: SchedHooks._vis_cut).

    Raises:
        RuntimeError: ``a`` does not hold ``lock`` in ``mode``."""
    cdef _Holds *h = &a._hd
    cdef Py_ssize_t i = h.n - 1, k
    cdef PyObject *hl
    cdef PyObject *hm
    cdef PyObject *hk
    cdef long long t
    while i >= 0:
        hl = h.lock[i]
        hm = h.mode[i]
        # (the same name and mode objects as a rule: the identity test spares the comparisons)
        if ((hl == <PyObject *>lock or <object>hl == lock)
                and (hm == <PyObject *>mode or <object>hm == mode)):
            t = h.t[i]
            hk = h.lk[i]
            if crossed is not NULL:
                crossed[0] = h.t2[i] != 0
            for k in range(i, h.n - 1):
                h.lock[k] = h.lock[k + 1]
                h.mode[k] = h.mode[k + 1]
                h.lk[k] = h.lk[k + 1]
                h.t[k] = h.t[k + 1]
                h.t2[k] = h.t2[k + 1]
            h.n -= 1
            _decref(hl)
            _decref(hm)
            if lk is not NULL:
                lk[0] = hk
            elif hk is not NULL:
                _decref(hk)
            return t
        i -= 1
    raise RuntimeError(f"{a.name} releases {lock}, which it does not hold")


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
    cdef _Holds *h = &a._fd
    cdef Py_ssize_t n = h.n
    cdef PyObject *fl
    cdef PyObject *fm
    if n and t_rel > t:
        fl = h.lock[n - 1]
        fm = h.mode[n - 1]
        if (h.t2[n - 1] == t and (fl == <PyObject *>lock or <object>fl == lock)
                and (fm == <PyObject *>mode or <object>fm == mode) and h.t[n - 1] <= t):
            h.t2[n - 1] = t_rel
            return 0
    _holds_push(h, lock, mode, t, t_rel, NULL)
    return 0


cdef enum:
    _INV_RING = 64  # the invalidations SchedHooks keeps (its _inv_* arrays)


cdef inline Ledger _hook_led(SchedHooks h):
    """``h.vm``'s :class:`Ledger` (kept in ``h._led``), None if it has none."""
    cdef Ledger led = h._led
    if led is None or led.vm is not h.vm:
        v = getattr(h.vm, "_ledger", None)
        led = h._led = v if type(v) is Ledger and (<Ledger>v).vm is h.vm else None
    return led


cdef inline Ledger _hook_ledger(SchedHooks h):
    """``h.vm``'s :class:`Ledger` while its total is an int64 (None: read ``vm._modeled_ns``)."""
    cdef Ledger led = _hook_led(h)
    return led if led is not None and led.big is None else None


cdef inline bint _led_ok(SchedHooks h) noexcept:
    """``h._led`` is ``h.vm``'s ledger and its total an int64 (the hooks' usual case, tested
    on a borrowed pointer: no reference counting)."""
    cdef PyObject *p = <PyObject *>h._led
    return (p != <PyObject *>None and <PyObject *>(<Ledger>p).vm == <PyObject *>h.vm
            and <PyObject *>(<Ledger>p).big == <PyObject *>None)


cdef inline long long _vm_ns(SchedHooks h) except? -1:
    """``<long long>h.vm._modeled_ns``, read from the VM's ledger in C."""
    if _led_ok(h):
        return h._led.ns
    cdef Ledger led = _hook_ledger(h)
    if led is not None:
        return led.ns
    return <long long>h.vm._modeled_ns


cdef inline long long _vm_guest_ns(SchedHooks h) except? -1:
    """The ns the VM's ledger charged to ops run in guest mode (``Ledger.guest_ns``; 0 without
    a typed ledger)."""
    cdef Ledger led = _hook_led(h)
    return led.guest_ns if led is not None else 0


cdef inline int _vm_ns_is(SchedHooks h, long long mark) except -1:
    """``h.vm._modeled_ns == mark``, read from the VM's ledger in C."""
    if _led_ok(h):
        return h._led.ns == mark
    cdef Ledger led = _hook_ledger(h)
    if led is not None:
        return led.ns == mark
    return h.vm._modeled_ns == mark


cdef inline LockState _lock_of(SchedHooks h, lock):
    """``<LockState?>h.locks[lock]``: the LockState of the lock named ``lock``."""
    return <LockState?>h.locks[lock]


cdef object _env_look(SchedHooks h):
    """Note in ``h._env_own`` whether ``h.env``'s ``now`` is SimPy's own property
    (``Environment.now``, which returns ``self._now``), and SimPy's ``Event`` class and its
    ``PENDING`` value for :func:`_ev_triggered`."""
    env = h.env
    h._env_seen = env
    import simpy.core
    import simpy.events
    h._env_own = type(env).now is simpy.core.Environment.__dict__.get("now")
    h._ev_cls = simpy.events.Event
    h._ev_pending = simpy.events.PENDING
    return env


cdef inline object _env_now(SchedHooks h):
    """``h.env.now``, SimPy's time, read as the attribute ``_now`` where that is what its
    ``now`` property returns: without a Python frame per read. (Not through the environment's
    ``__dict__``: asking for it makes the instance's dict an object of its own, and every
    ``self._now`` in SimPy's loop then takes the interpreter's slower path.)"""
    env = h.env
    if env is not h._env_seen:
        _env_look(h)
    if h._env_own:
        return env._now
    return env.now


cdef inline bint _ev_triggered(SchedHooks h, ev) except -1:
    """``ev.triggered``; for a plain SimPy ``Event`` (``env.event()``) read as its property
    does, ``ev._value is not PENDING``, without a Python frame."""
    if h.env is not h._env_seen:
        _env_look(h)
    if type(ev) is h._ev_cls:
        return ev._value is not h._ev_pending
    return True if ev.triggered else False


@cython.auto_pickle(False)
cdef class SchedHooks:
    """The hot hooks of :class:`pkvm.sim.Timeline` (its base class; see that class).

    ``_current``: the actor whose code runs (None outside every actor); ``_active``: actors in
    a task; while an actor runs, its clock is ``_now0 + vm._modeled_ns - _mark`` (``_now0`` is
    the SimPy time when it resumed, which stands still while it runs); ``_skipped``: a
    :meth:`sync` was skipped since it resumed, the last one (or the release of a hold held at
    one, :meth:`_vis_cut`) at ``vm._modeled_ns == _vis``."""

    cdef public object vm, recorder, latency_log, _rwlock
    cdef public dict locks, latency
    cdef public SchedActor _current
    cdef public Py_ssize_t _active
    cdef public long long _now0, _mark, _vis, _gmark
    cdef public bint _skipped
    # At the last place the actor did not yield where a yield would have been (_vis_cut: a
    # skipped sync, or the release of a hold held at one): _vis_g the guest-mode ns then,
    # _vis_mark the value of _mark then; _vis_share the guest share of the last stretch with
    # any work between two such places since the actor resumed (_vis_set: there was one): what
    # those yields would have left as the actor's guest_share (_take_c)
    cdef long long _vis_g, _vis_mark
    cdef double _vis_share
    cdef bint _vis_set
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
    # vm's counters (``VM._stats``, set once when the VM is made), read by _note_inval; taken
    # again whenever vm is another object (_st_vm)
    cdef Counters _st
    cdef object _st_vm
    # whether env's ``now`` is SimPy's property (which returns ``_now``), for _env_now; looked
    # at again whenever env is another object (_env_seen)
    cdef bint _env_own
    cdef object _env_seen
    # SimPy's Event class and its PENDING value (_env_look), for _ev_triggered
    cdef object _ev_cls, _ev_pending

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
        lk = _lock_of(self, lock)
        cdef long long now
        if lk.interleaved:  # never queued: its windows are settled (_pw_settle)
            _holds_push(&a._hd, lock, mode, self._now0 + _vm_ns(self) - self._mark, 0, <PyObject *>lk)  # now_ns
            _fig_add_i(lk.stats, _FIG_ACQ, 1)
            return 0
        if self._active <= a.in_task and not lk.locked:
            now = self._now0 + _vm_ns(self) - self._mark
            if now >= _lock_free_at(lk, mode):
                _holds_push(&a._hd, lock, mode, now, 0, <PyObject *>lk)
                a.fast += 1
                _fig_add_i(lk.stats, _FIG_ACQ, 1)
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
        cdef long long held_ns, t
        cdef Ledger led
        cdef PyObject *lkp = NULL
        cdef LockState lks
        cdef bint crossed = False
        if a is None:
            return 0
        t = _held_take(a, lock, mode, &lkp, &crossed)
        if lkp is not NULL:  # the LockState it was taken on (lks owns the entry's reference)
            lks = <LockState>lkp
            _decref(lkp)
        if t < 0:
            self._release_slow(a, lock, mode)
            return 0
        if crossed:
            # held at a skipped visibility point: its yield would have made the hold real, and
            # its release a yield of its own (_release_slow), which sets the guest share
            self._vis_cut(a, False)
        if lkp is NULL:  # (a hold Python added)
            lks = _lock_of(self, lock)
        union = None  # an RWLock hold's part outside the holds counted before (_union_add)
        held_ns = self._now0 + _vm_ns(self) - self._mark - t  # now_ns - t
        if held_ns:  # for a result taken mid-run (_fast_done_add: kept short, exactly)
            _fast_done_add(a, lock, mode, t, t + held_ns)
        if lks.interleaved:  # never a SimPy hold, nor one others wait for (_pw_settle)
            pass
        elif held_ns > 0:  # others SimPy runs before its end wait for it (_lock_free_at)
            if t + held_ns > lks.held_until:
                lks.held_until = t + held_ns
            if (mode != 0 or not lks.stats._rw) and t + held_ns > lks.written_until:
                lks.written_until = t + held_ns
            if lks.hold_union is not None:  # an RWLock's: see LockState
                union = _union_add(lks.hold_union, t + self._t0, t + held_ns + self._t0)
                if len(lks.hold_union) > lks.union_prune_at:
                    (<object>lks)._prune_union()
            if mode != 0 and lks.wholds is not None:  # for the batches' reads (_rd_round)
                self._rd_write_hold(a, lks, t, t + held_ns)
        led = _hook_ledger(self)
        if led.traced if led is not None else self.vm._subs is not None:  # vm._subs is not None
            self.vm._emit("lock_hold", None, None, lock, 1, 0, "read" if mode == 0 else "write", (held_ns,))
        cdef LockStatsState st = lks.stats
        if held_ns or union is not None:  # (a hold of no length adds 0: most of them)
            if union is None:
                _fig_add_i(st, _FIG_HOLD, held_ns)
            else:
                _fig_add(st, _FIG_HOLD, union)
            if st._rw:  # an RWLock's (LockStats(rw=True))
                _fig_add_i(st, _FIG_HOLD_R if mode == 0 else _FIG_HOLD_W, held_ns)
        if self.recorder is not None:
            self._record_hold(a, lock, mode, lks, t, t + held_ns)
        if lks.interleaved:
            return self._pw_hold(a, lock, lks, t, held_ns)
        a.fast -= 1
        return 0

    cdef int _pw_hold(self, SchedActor a, lock, LockState lk, long long t, long long held_ns) except -1:
        """A hold of an interleaved pagewise lock (``LockState.interleaved``) from ``t`` on the
        actor's clock, released (and counted) by :meth:`release`: its time and acquisitions go
        to the actor's window (settled at its end), or, outside every window, are a window of
        their own, settled now."""
        cdef long long n = a.pw_calls if a.pw_calls >= 0 else 1
        cdef long long nl = a.pw_long_n, hl = a.pw_long_ns
        cdef list acc
        a.pw_calls = -1
        a.pw_long_n = -1
        a.pw_long_ns = 0
        if held_ns <= 0 or n <= 0:
            return 0
        if nl < 0 or n == 1:  # the single holds among its acquisitions
            nl = 1 if n == 1 else 0
            hl = held_ns if n == 1 else 0
        if nl > n:
            nl = n
        if hl > held_ns or (nl == n and hl < held_ns):
            hl = held_ns
        if a.pw_depth > 0:
            # [hold ns, acquisitions, first hold's start, of which single holds: ns, count]
            acc = a.pw_acc.get(lock)
            if acc is None:
                a.pw_acc[lock] = [held_ns, n, t, hl, nl]
            else:
                acc[0] += held_ns
                acc[1] += n
                acc[3] += hl
                acc[4] += nl
            return 0
        self._pw_settle(a, lock, lk, t, t + held_ns, held_ns, n, hl, nl)
        return 0

    def pw_begin(self):
        """The running actor starts a window of work over which the kernel would take the
        interleaved pagewise locks page by page, between the rest of each page's work (a
        fault batch, an RMPUPDATE range with its direct-map calls). Windows nest; the
        outermost counts. Pair each with :meth:`pw_end`."""
        self._pw_begin()

    cdef int _pw_begin(self) except -1:
        cdef SchedActor a = self._current
        if a is None:
            return 0
        if a.pw_depth == 0:
            a.pw_t0 = self._now0 + _vm_ns(self) - self._mark  # now_ns
        a.pw_depth += 1
        return 0

    def pw_end(self):
        """The end of the window :meth:`pw_begin` started: at the outermost, the holds of each
        interleaved lock in it are settled against the other actors' (:meth:`_pw_settle`)."""
        self._pw_end()

    cdef int _pw_end(self) except -1:
        cdef SchedActor a = self._current
        cdef dict acc
        cdef list v
        if a is None or a.pw_depth <= 0:
            return 0
        cdef _RdWin rd
        a.pw_depth -= 1
        if a.pw_depth:
            return 0
        cdef long long t1 = self._now0 + _vm_ns(self) - self._mark  # now_ns
        if a.pw_acc:
            acc = a.pw_acc
            a.pw_acc = {}
            for lock, v in acc.items():
                if <long long>v[1] == 1:  # one hold: not spread over the window, it is where it is
                    self._pw_settle(a, lock, <LockState?>self.locks[lock], <long long>v[2],
                                    <long long>v[2] + <long long>v[0], <long long>v[0], 1, <long long>v[0], 1)
                else:
                    self._pw_settle(a, lock, <LockState?>self.locks[lock], a.pw_t0, t1, <long long>v[0],
                                    <long long>v[1], <long long>v[3], <long long>v[4])
        if a.rd is not None:
            rd = <_RdWin>a.rd
            if rd.owed:  # the stall of its fault batch's reads of mmu_lock (_release_rd)
                self._now0 += rd.owed  # on its clock: what follows starts after the wait
                rd.owed = 0
        return 0

    cdef int _pw_settle(self, SchedActor a, lock, LockState lk, long long t0, long long t1,
                        long long h, long long n, long long hs, long long ns) except -1:
        """Settle ``a``'s window ``[t0, t1)`` (its clock), in which it held ``lock`` for ``h``
        ns over ``n`` acquisitions (of which ``ns`` were holds of one acquisition each, ``hs``
        ns); docs/timeline.md, "Locks the kernel takes page by page".

        In the kernel a window's acquisitions are spread over it, between the rest of its
        work: it uses the lock at the rate ``d = h / (t1 - t0)``, one acquisition every ``p =
        (t1 - t0) / n``, leaving it free ``g = p - h / n`` of each period; its holds are of two
        kinds: its single holds (a split and its flush, one CPA call), ``hs / ns`` on average,
        and the holds a batch takes page by page, ``(h - hs) / (n - ns)``. Each settled window
        (``lk.spans``) keeps where it used the lock (its pieces, ``(start, end, rate)``), which
        make up the lock's load profile (``lk.prof``).

        - The queueing: one actor's acquisitions are one thread's, which stalls as a whole. It
          meets a page hold ``c`` of another window with the probability ``min(1, c / p)`` and
          waits half of it; a single hold it meets at its first acquisition after the hold
          began, and waits ``_meet_w`` (most of the hold when it outlasts ``g``). A window of
          one hold meets the hold in progress when it comes.
        - The capacity: a window of many holds goes through the load profile at the speed the
          rest leaves it (``_prof_fit``: where the load leaves less than ``d``, at ``(1 -
          load) / d``), so the lock is never used above its capacity; a window settled earlier
          keeps its rate. A window of one hold, after the hold it met, takes the first stretch
          the other single holds leave free (first come, first served), at the speed the
          windows of actors whose work is done leave it.

        The larger of the two is the window's wait. Each pair of overlapping windows is
        settled once, by the later of the two, so the earlier window's wait for this one's
        holds is settled here too, if its actor is still at work: owed at its next yield, and
        its window ends later by it. A window of one hold does not go around such a window's
        load: that window stalls at its next acquisition until the hold ends, and what it had
        left of its use of the lock comes after the hold, around the load there (the windows of
        several vCPUs the hold stalls together, sharing the capacity fairly: _pw_rests). A wait owed
        moves everything its actor did after that window (``_pw_shift``).

        A wait goes on the running actor's clock (what follows starts after it) and passes on
        SimPy's at its next yield (``lock_debt``, a lock wait). The lock's statistics count
        the capacity wait as the waits of the window's acquisitions, the queueing as the
        waits of as many as met a hold (at least one), spread evenly (as :meth:`pagewise`)."""
        cdef long long dt = t1 - t0, ta, a1, b1, x, w, wj, ws, e, s, ov, horizon, nj, hj, nsj, hsj, tend
        cdef double hits = 0.0, wq = 0.0, frac, pj, px, q, qq, c, qp, gx, gj
        cdef list busy
        cdef _Window sp
        cdef LoadProfile fp
        cdef SchedActor k
        cdef list spans = lk.spans
        cdef _Pieces pieces = _Pieces(), before, after, rest, pcs
        cdef double u
        cdef Py_ssize_t i, j, nsp, na
        cdef list stalled = None
        cdef set stalled_by = None
        if spans is None:
            spans = lk.spans = []
        if lk.prof is None:
            lk.prof = LoadProfile()
        if dt < h:
            dt = h
        if dt <= 0 or n <= 0:
            return 0
        name = a.name
        # the queueing: this window meets the holds of the settled windows it overlaps
        nsp = len(spans)
        px = <double>dt / n  # this window's period
        gx = <double>(dt - h) / n  # the lock's free time in each
        for i in range(nsp):
            sp = <_Window>spans[i]
            if sp.actor is name:
                continue
            s = sp.start
            e = sp.end
            hj = sp.h
            nj = sp.n
            if e <= s or nj <= 0 or hj <= 0 or (n == 1 and nj == 1):
                continue  # (a single hold meets another first come, first served: below)
            ov = (e if e < t1 else t1) - (s if s > t0 else t0)
            if ov <= 0:
                continue
            hsj = sp.hs
            nsj = sp.ns
            # the share of its holds inside this window: where it used the lock
            frac = _pieces_use(sp.pieces, t0, t1) / hj
            if frac > 1.0:
                frac = 1.0
            if nsj:  # its single holds that this window meets, and their waits
                c = <double>hsj / nsj
                if n > 1:  # this thread's acquisitions meet a long hold at the first after its start
                    hits += <double>nsj * frac * _meet_p(c, px, gx)
                    wq += <double>nsj * frac * _meet_w(c, px, gx)
                else:  # one acquisition: it meets the hold if it comes during it
                    q = <double>nsj * frac * (c / px if c < px else 1.0)
                    hits += q
                    wq += q * c * 0.5
            if nj > nsj:  # its page holds
                c = <double>(hj - hsj) / (nj - nsj)
                q = <double>(nj - nsj) * frac * (c / px if c < px else 1.0)
                hits += q
                wq += q * c * 0.5
        w = <long long>(wq + 0.5)
        # the capacity: a window against the load profile, where the larger of the two waits
        # counts. A single hold, after the page hold it met, against the other single holds
        # (first come, first served) and the windows of actors whose work is done, which
        # nothing can delay now; the windows of actors still at work wait for it (below).
        ta = t0 + w
        if n == 1:
            fp = LoadProfile()  # the windows that are done
            busy = []  # the single holds
            for i in range(nsp):
                sp = <_Window>spans[i]
                if sp.actor is name:
                    continue
                s = sp.start
                e = sp.end
                if e <= ta or e <= s:
                    continue
                if sp.n == 1:
                    pcs = sp.pieces
                    for j in range(pcs.n):
                        busy.append((pcs.s[j], pcs.e[j]))
                    continue
                k = self._actors.get(sp.actor)
                if k is None or not k.in_task:  # (its pieces that end by ta never meet it)
                    _prof_add(fp, sp.pieces, 1.0, _pieces_from(sp.pieces, ta))
            busy.sort()
            # A hold is one: the first stretch the single holds leave free for it, as long as
            # the done windows' load there makes it (it goes at the speed they allow).
            x = _free_slot(busy, ta, dt)
            for i in range(64):
                pieces = _Pieces()
                tend = _prof_fit(fp, x, dt, <double>h / dt, pieces)
                s = _free_slot(busy, x, tend - x)  # the stretch it took: still free?
                if s == x:
                    break
                x = s
        else:
            tend = _prof_fit(lk.prof, t0, dt, <double>h / dt, pieces)
        ws = tend - t1 if tend > t1 else 0
        if ws > w:
            w = ws
        _prof_add(lk.prof, pieces)
        a1 = pieces.s[0] if pieces.n else t0 + w  # where this window holds the lock
        b1 = pieces.e[pieces.n - 1] if pieces.n else t1 + w
        # ... and the other way: the windows of actors still at work meet this one's holds (its
        # actor's wait is owed at its next yield, and its window ends later by it). Each pair
        # of overlapping windows is settled once, here, by the later of the two.
        for i in range(nsp):
            sp = <_Window>spans[i]
            if sp.actor is name:
                continue
            s = sp.start
            e = sp.end
            hj = sp.h
            nj = sp.n
            if e <= s or nj <= 0:
                continue
            k = self._actors.get(sp.actor)
            if k is None or not k.in_task:  # its work is done: nothing of it can wait now
                continue
            pj = <double>sp.dt / nj  # its period, as it runs (without its waits)
            gj = <double>(sp.dt - hj) / nj
            if gj < 0.0:
                gj = 0.0
            if n == 1:
                # A single hold, where it runs after its wait: a window still acquiring when it
                # begins stalls at its next acquisition until it ends (a single hold meets
                # another single hold first come, first served, above), and what it had left
                # of its use of the lock comes after it.
                if e <= a1 or s >= b1 or nj == 1:  # (single holds: first come, first served)
                    continue
                x = s if s > a1 else a1
                before = _Pieces()
                after = _Pieces()
                u = 0.0
                pcs = sp.pieces
                # the pieces that end by x, the one across it, the rest
                j = _pieces_from(pcs, x)
                before.append_range(pcs, 0, j)
                if j < pcs.n and pcs.s[j] < x:
                    before.add(pcs.s[j], x, pcs.r[j])
                    after.add(x, pcs.e[j], pcs.r[j])
                    u += <double>(pcs.e[j] - x) * pcs.r[j]
                    j += 1
                after.append_range(pcs, j, pcs.n)
                while j < pcs.n:
                    u += <double>(pcs.e[j] - pcs.s[j]) * pcs.r[j]
                    j += 1
                if u <= 0.0:
                    continue  # no acquisition left
                c = <double>(b1 - x)
                q = _meet_p(c, pj, gj)
                # What it had left from x on, less the work it did before it stalled, after
                # this hold and around the load there at its own rate (_rest_len; _prof_fit:
                # never above capacity); its wait is where that ends.
                _prof_add(lk.prof, after, -1.0)
                if stalled is None:
                    stalled = []
                    stalled_by = set()
                if sp.actor in stalled_by:
                    self._pw_rest(k, lock, lk, sp, before, u, q, b1, None, -1)
                else:
                    stalled_by.add(sp.actor)
                    stalled.append((sp, k, before, u, q))
                continue
            else:
                ov = (e if e < t1 else t1) - (s if s > t0 else t0)
                if ov <= 0:
                    continue
                q = qq = 0.0
                if ns:
                    c = <double>hs / ns
                    if nj > 1:
                        q = <double>ns * ov / dt * _meet_p(c, pj, gj)
                        qq = <double>ns * ov / dt * _meet_w(c, pj, gj)
                    else:
                        q = <double>ns * ov / dt * (c / pj if c < pj else 1.0)
                        qq = q * c * 0.5
                if n > ns:
                    c = <double>(h - hs) / (n - ns)
                    qp = <double>(n - ns) * ov / dt * (c / pj if c < pj else 1.0)
                    q += qp
                    qq += qp * c * 0.5
            wj = <long long>(qq + 0.5)
            if wj > 0:
                sp.end = e + wj
                wj += self._pw_shift(lk, sp, e, wj)
                self._pw_wait(k, lock, lk, sp, wj, <long long>(q + 0.5))
        if stalled is not None:
            self._pw_rests(lock, lk, stalled, b1)
        if n == 1:  # one hold, first come first served: it runs after its wait
            sp = _window(name, t0 + w, t1 + w, h, n, hs, ns, dt, pieces)
        else:
            sp = _window(name, t0, t1 + w, h, n, hs, ns, dt, pieces)
        spans.append(sp)
        na = len(self._actors)
        if len(spans) > max(lk.trim_spans, 4 * na + 16) or lk.prof.n > max(lk.trim_prof, 8 * na + 32):
            # No window to come starts before SimPy's clock or an open window's start.
            horizon = int(_env_now(self) - self._t0)
            for k in self._actors.values():
                if k.pw_depth > 0 and k.pw_t0 < horizon:
                    horizon = k.pw_t0
            lk.spans = [wd for wd in spans if (<_Window>wd).end > horizon]
            lk.prof._drop_before(horizon)
            # Next time when the lists have doubled (or passed the per-actor floor): while
            # nothing is old enough to drop (a window held open, an actor alone ahead of
            # SimPy's clock) trimming at every window would cost the lists' length each.
            lk.trim_spans = 2 * len(lk.spans)
            lk.trim_prof = 2 * lk.prof.n
        # An actor alone runs ahead of SimPy's clock, which then does not move: nothing is
        # old enough to drop, and the lists would grow by a window each. Past these bounds the
        # oldest entries are coarsened instead (a window's neighbours of the same actor
        # merged, a profile's neighbouring segments averaged). Coarsening is lossy (an average
        # hides where the lock was saturated), so the bounds are high; since the profile keeps
        # a breakpoint only where the load changes, a 64-vCPU SNP boot of 512 GiB stays under
        # the profile's (docs/timeline.md, "Bookkeeping").
        if len(lk.spans) > _SPANS_MAX + 64 * na:
            _spans_coarsen(lk.spans, (_SPANS_MAX + 64 * na) // 2)
        if lk.prof.n > _PROF_MAX + 256 * na:
            _prof_coarsen(lk.prof, (_PROF_MAX + 256 * na) // 2)
        if w > 0:
            self._pw_wait(a, lock, lk, sp, w, n if ws >= w else <long long>(hits + 0.5))
            self._now0 += w  # the running actor's clock: what follows starts after the wait
        return 0

    cdef int _pw_rests(self, lock, LockState lk, list stalled, long long b1) except -1:
        """The running windows one single hold (ending at ``b1``) stalled, one per actor, their
        rests already out of the profile: one is fitted again alone (_pw_rest); several share
        the capacity the load leaves them from ``b1`` on, max-min fair (_prof_fit_fair), as
        the kernel's queued lock serves their acquisitions in turn; their rests go into the
        profile as their sum, in one pass."""
        cdef Py_ssize_t m = len(stalled), i
        cdef tuple st
        cdef _Window sp
        cdef list rests, ends
        cdef long long *dts
        cdef double *ds
        cdef long long ov
        cdef double u
        cdef _Pieces total
        if m == 1:
            st = <tuple>stalled[0]
            return self._pw_rest(<SchedActor>st[1], lock, lk, <_Window>st[0], <_Pieces>st[2],
                                 <double>st[3], <double>st[4], b1, None, -1)
        dts = <long long*>malloc(m * sizeof(long long))
        ds = <double*>malloc(m * sizeof(double))
        if dts == NULL or ds == NULL:
            free(dts)
            free(ds)
            raise MemoryError()
        rests = [_Pieces() for i in range(m)]
        ends = [0] * m
        total = _Pieces()  # their sum
        try:
            for i in range(m):
                st = <tuple>stalled[i]
                sp = <_Window>st[0]
                u = <double>st[3]
                ov = _rest_len(sp, u)
                dts[i] = ov
                ds[i] = u / <double>ov
            _prof_fit_fair(lk.prof, b1, m, dts, ds, rests, ends, total)
        finally:
            free(dts)
            free(ds)
        _prof_add(lk.prof, total)  # every rest, in one pass
        for i in range(m):
            st = <tuple>stalled[i]
            self._pw_rest(<SchedActor>st[1], lock, lk, <_Window>st[0], <_Pieces>st[2],
                          <double>st[3], <double>st[4], b1, <_Pieces>rests[i], <long long>ends[i])
        return 0

    cdef int _pw_rest(self, SchedActor k, lock, LockState lk, _Window sp, _Pieces before,
                      double u, double q, long long b1, _Pieces rest, long long tend) except -1:
        """A running window ``sp`` of actor ``k`` stalled by a single hold that ends at ``b1``:
        what it had left after its pieces ``before`` (``u`` ns of lock use, already out of the
        profile) is fitted again from ``b1`` around the load there, at the window's own rate
        (_rest_len), or was, into ``rest`` ending at ``tend``, and added. The window's pieces
        become ``before`` and the rest; its wait is where the rest ends past the window's end,
        and its later windows move by it."""
        cdef long long e = sp.end, ov, wj
        if rest is None:
            ov = _rest_len(sp, u)
            rest = _Pieces()
            tend = _prof_fit(lk.prof, b1, ov, u / <double>ov, rest)
            _prof_add(lk.prof, rest)
        wj = tend - e
        before.extend(rest)
        sp.pieces = before
        if wj <= 0:  # nothing to wait for; its rest stays after the hold (its old pieces were under it)
            return 0
        sp.end = e + wj
        wj += self._pw_shift(lk, sp, e, wj)
        self._pw_wait(k, lock, lk, sp, wj, <long long>(q + 0.5))
        return 0

    cdef long long _pw_shift(self, LockState lk, _Window sp, long long after, long long w) except -1:
        """The wait ``w`` owed for window ``sp`` moves everything its actor did after it: its
        settled windows that begin at or after ``after`` (the window's end before the wait),
        in order, start ``w`` ns later and are fitted again against the lock's load there
        (_prof_fit), which may make them wait longer. That further wait, for the actor to owe
        with ``w``."""
        cdef list later = None, spans = lk.spans
        cdef _Window x
        cdef _Pieces new
        cdef long long extra = 0, s0, e0, tend, dt
        cdef Py_ssize_t i = len(spans) - 1
        name = sp.actor
        # An actor's windows settle in the order of its clock: its later ones come after sp.
        while i >= 0:
            x = <_Window>spans[i]
            if x is sp:
                break
            if x.actor is name and x.start >= after:
                if later is None:
                    later = []
                later.append(x)
            i -= 1
        if later is None:
            return 0
        later.reverse()
        for x in later:
            _prof_add(lk.prof, x.pieces, -1.0)
            s0 = x.start + w + extra
            e0 = x.end + w + extra
            dt = x.dt
            new = _Pieces()
            if dt > 0 and x.h > 0:
                tend = _prof_fit(lk.prof, s0, dt, <double>x.h / dt, new)
            else:
                tend = s0
            _prof_add(lk.prof, new)
            if tend > e0:  # the load where it lands now makes it wait longer
                extra += tend - e0
                e0 = tend
            x.start = s0
            x.end = e0
            x.pieces = new
        return extra

    cdef int _pw_wait(self, SchedActor k, lock, LockState lk, _Window sp, long long w, long long m) except -1:
        """Actor ``k`` owes a wait of ``w`` ns for interleaved ``lock``, for its window ``sp``
        in ``lk.spans`` (:meth:`_pw_settle`), as the waits of ``m`` of its acquisitions:
        passed, and counted, at its next yield (:meth:`_pw_count`)."""
        if w <= 0:
            return 0
        k.lock_debt += w
        k.debts.append((lock, lk, sp, w, m))
        return 0

    cdef int _pw_count(self, lock, LockState lk, _Window sp, long long w, long long m) except -1:
        """The lock's statistics count a wait of ``w`` ns for window ``sp``, as the waits of
        ``m`` of its acquisitions, as it passes (:meth:`_drive`): a window's waits are samples
        of the wait distribution, its total wait spread evenly over at most its acquisitions
        (``sp.wait_ns`` ns over ``sp.waits`` samples so far), so a later wait of the same window
        re-spreads its total and the lock never counts more waits than acquisitions."""
        cdef LockStatsState st = lk.stats
        cdef DistState dist = <DistState?>st.wait_distribution
        cdef long long n = sp.n, W = sp.wait_ns, M = sp.waits, q, r, m2
        m2 = M + (m if m > 1 else 1)
        if m2 > n:
            m2 = n
        if M:  # take its samples out: W over M, evenly, as they went in
            q = W // M
            r = W % M
            if r:
                dist._remove_n(q + 1, r)
            if q:
                dist._remove_n(q, M - r)
        W += w
        q = W // m2
        r = W % m2
        if r:
            dist._add_c(q + 1, r)
        if q:
            dist._add_c(q, m2 - r)
        st.wait_ns += w
        st.waits += m2 - M
        sp.wait_ns = W
        sp.waits = m2
        if lock == "tdx_sept":  # TDX_OPERAND_BUSY -> RET_PF_RETRY, re-tried locally
            self.races["tdx_busy_retry"] += max(m if m > 1 else 1, w // self._seamcall_retry_ns)
        if self.vm._subs is not None:
            self.vm._emit("lock_wait", None, None, lock, 1, 0, "read" if lock == "mmu_lock" else "write", (w,))
        return 0

    cdef long long _rd_round(self, SchedActor a, LockState lk, long long lo, long long hi,
                             long long xs, long long xe, double g, double p, bint stalled,
                             long long *m) except -1:
        """What the write holds of ``mmu_lock`` by other actors in ``[lo, hi)`` (outside
        ``[xs, xe)``, where ``a`` waited for the lock through SimPy) cost a fault batch of
        ``a`` whose reads interleave with them: one read acquisition every ``p`` ns, the lock
        not held ``g`` ns of each (docs/timeline.md, "Interleaved reads of mmu_lock"). The
        holds are merged where they overlap or touch (a thread stalled by one stays stalled
        through the next). A hold that began before ``lo`` stalls the batch from ``lo`` on:
        for all of its part here if the batch was stalled already (``stalled``), else for
        what is left after its first acquisition, ``g`` after ``lo``; one that begins within
        costs the queueing's mean wait for a hold of its length (``_meet_w``: most of it when
        it outlasts ``g``). Returns the wait; ``m[0]``: the holds that made it wait."""
        cdef list iv = []
        cdef tuple h
        cdef long long s, e, cs, ce
        cdef bint cf
        cdef double w = 0.0, c, wi
        cdef Py_ssize_t i, n
        m[0] = 0
        if hi <= lo:
            return 0
        for h in lk.wholds:
            if h[2] is a:
                continue
            s = h[0]
            e = h[1]
            if e > lo and s < hi:
                _rd_clip(iv, s, e, lo, hi, xs, xe)
        o = <object>lk
        wr = o._writer
        if wr is not None and wr != a.name:  # a write hold in progress in SimPy
            s = int(o._write_since - self._t0)
            if s < hi:
                _rd_clip(iv, s, hi, lo, hi, xs, xe)
        n = len(iv)
        if n == 0:
            return 0
        if n > 1:
            iv.sort()
        h = <tuple>iv[0]
        cs = h[0]
        ce = h[1]
        cf = h[2]
        for i in range(1, n + 1):
            if i < n:
                h = <tuple>iv[i]
                s = h[0]
                e = h[1]
                if s <= ce:
                    if e > ce:
                        ce = e
                    continue
            c = <double>(ce - cs)
            if cf:
                wi = c if stalled else (c - g if c > g else 0.0)
            else:
                wi = _meet_w(c, p, g)
            if wi >= 0.5:
                w += wi
                m[0] += 1
            if i < n:
                cs = s
                ce = e
                cf = h[2]
        return <long long>(w + 0.5)

    cdef long long _rd_stall(self, SchedActor a, LockState lk, _Window sp, long long lo, long long hi,
                             long long xs, long long xe, double g, double p, bint stalled) except -1:
        """:meth:`_rd_round` over ``[lo, hi)``, its wait counted for the batch's window ``sp``
        (:meth:`_pw_wait`: owed by ``a``, in the lock's statistics); returns the wait."""
        cdef long long m = 0
        cdef long long w = self._rd_round(a, lk, lo, hi, xs, xe, g, p, stalled, &m)
        if w > 0:
            self._pw_wait(a, "mmu_lock", lk, sp, w, m)
        return w

    cdef int _rd_trim(self, LockState lk) except -1:
        """Drop the write holds no fault batch to come, nor one still settling, can
        overlap: those that ended before SimPy's clock and before every open window's start
        and every batch's round still due."""
        cdef long long horizon = int(_env_now(self) - self._t0)
        cdef SchedActor k
        cdef _RdWin rd
        for k in self._actors.values():
            if k.pw_depth > 0 and k.pw_t0 < horizon:
                horizon = k.pw_t0
            if k.rd is not None:
                rd = <_RdWin>k.rd
                if rd.lo < horizon:
                    horizon = rd.lo
        lk.wholds = [h for h in lk.wholds if <long long>(<tuple>h)[1] > horizon]
        lk.trim_w = 2 * len(lk.wholds)
        if lk.trim_w < 64:
            lk.trim_w = 64
        return 0

    cdef int _rd_write_hold(self, SchedActor a, LockState lk, long long s, long long e) except -1:
        """Record a write hold ``[s, e)`` of ``mmu_lock`` by ``a`` (``LockState.wholds``)."""
        if e <= s:
            return 0
        lk.wholds.append((s, e, a))
        if len(lk.wholds) > lk.trim_w:
            self._rd_trim(lk)
        return 0

    cdef bint _rd_on(self) except -1:
        """Whether the running actor's fault batch releases ``mmu_lock`` by
        :meth:`_release_rd`: its reads interleave with writers (``pagewise_locks=
        "interleaved"``) and another actor is in a task."""
        cdef SchedActor a = self._current
        if a is None or a.pw_depth <= 0:
            return False
        return (<LockState?>self.locks["mmu_lock"]).wholds is not None and self._active > a.in_task

    cdef int _release_rd(self, long long n) except -1:
        """The running actor's fault batch of ``n`` faults (4K pages, or 2M / 1G leaves)
        releases ``mmu_lock`` (read), taken for its staleness check and install
        (``fault_timeline``). In the kernel each of them is a fault that takes the lock for
        read around its own check and install, between the rest of its work; a writer waits
        for the hold in progress, and every vCPU whose next fault comes while the writer waits
        or holds it stalls until it is done. So the
        batch's hold is not one that writers queue behind: in SimPy it ends when its state
        changes are made (the install's time passes after the release, as the batch's work),
        and the write holds of other actors within the batch's window stall the batch
        (:meth:`_rd_round`): those before its release now, owed and put on its clock when its
        window ends (:meth:`_pw_end`, after its interleaved locks are settled, so their windows
        keep the length of its work); those while its install passes and while it pays what it
        owes at its next yields (``_RdWin``, :meth:`_drive`, :meth:`_pay_lock_debt`). The lock
        counts an acquisition per fault (docs/timeline.md, "Interleaved reads of mmu_lock")."""
        cdef SchedActor a = self._current
        cdef LockState lk = <LockState?>self.locks["mmu_lock"]
        cdef LockStatsState st = lk.stats
        cdef long long t, now, pend, rel, req, grant, end, ns, hw, work, wa, ev_ns
        cdef double p, g
        cdef _RdWin rd
        cdef _Window sp
        cdef Ledger led
        t = _held_take(a, "mmu_lock", 0, NULL)
        t0w = a.pw_t0
        now = self._now0 + _vm_ns(self) - self._mark
        if t >= 0:  # taken uncontended on its clock: no writer waits for its install
            rel = req = grant = t
            end = now
            hw = now - t
            a.fast -= 1
            ev_ns = end - grant
        else:
            # released in SimPy before the install's time passes (that time stays pending)
            pend = _vm_ns(self) - self._mark
            if pend < 0:
                pend = 0
            self._mark += pend
            self._switch_c(a, (_SCHED_REL, self._take_c(), "mmu_lock", 0))
            self._mark -= pend
            grant = a.grant_t.pop(("mmu_lock", 0), a.rd_grant)
            # when it asked, if this grant came through _drive; a hold made real at a yield
            # (Timeline._make_holds) was granted at its own time, without a wait
            req = a.rd_req if a.rd_grant == grant else grant
            if req > grant:
                req = grant
            rel = self._now0
            end = rel + pend
            hw = pend
            # (its event: the hold to its release in SimPy and its install, without waits
            # owed for earlier windows that passed after the release: SchedActor.rel_t)
            ev_ns = a.rel_t - grant + pend
        ns = end - grant  # the hold as the batch ran it (with what it paid on the way)
        # hw: its work under the lock (the check and the installs), without waits
        # the lock's statistics: the part of the hold after its release in SimPy (a read
        # hold's union with the others', as for one taken uncontended: _union_add)
        if end > rel:
            _fast_done_add(a, "mmu_lock", 0, rel, end)
            union = _union_add(lk.hold_union, rel + self._t0, end + self._t0)
            _fig_add(st, _FIG_HOLD, union)
            if len(lk.hold_union) > lk.union_prune_at:
                (<object>lk)._prune_union()
            _fig_add_i(st, _FIG_HOLD_R, end - rel)
            if self.recorder is not None:
                self._record_hold(a, "mmu_lock", 0, lk, rel, end)
        _fig_add_i(st, _FIG_ACQ, n - 1)
        led = _hook_ledger(self)
        if led.traced if led is not None else self.vm._subs is not None:
            self.vm._emit("lock_hold", None, None, "mmu_lock", 1, 0, "read", (ev_ns,))
        work = end - t0w - (grant - req)
        if work < n:
            work = n
        p = <double>work / n
        g = <double>(work - hw) / n
        if g < 0.0:
            g = 0.0
        sp = _window(a.name, t0w, end, ns, n, 0, 0, work, None)
        wa = self._rd_stall(a, lk, sp, t0w, rel, req, grant, g, p, False)
        rd = _RdWin.__new__(_RdWin)
        rd.owed = wa  # on its clock once its window's interleaved locks are settled (_pw_end)
        rd.lo = rel
        rd.hi = end
        rd.stage = 1
        rd.g = g
        rd.p = p
        rd.sp = sp
        a.rd = rd
        return 0

    cdef int _rd_after_work(self, SchedActor a) except -1:
        """At a yield of ``a`` (:meth:`_drive`), once its pending work has passed: the write
        holds within the install of its last fault batch (``_RdWin`` stage 1) stall it, owed
        now."""
        cdef _RdWin rd = <_RdWin>a.rd
        if rd.stage == 1:
            if int(_env_now(self) - self._t0) < rd.hi:
                return 0
            self._rd_stall(a, <LockState?>self.locks["mmu_lock"], rd.sp, rd.lo, rd.hi, 0, 0, rd.g, rd.p, True)
            rd.stage = 2
        if not a.lock_debt:
            a.rd = None
        return 0

    cdef int _rd_after_pay(self, SchedActor a, long long lo, long long hi) except -1:
        """``a`` paid what it owed over ``[lo, hi)`` (:meth:`_pay_lock_debt`); its last fault
        batch was still stalled meanwhile, so the write holds in that stretch stall it further
        (in the kernel the writers that queued meanwhile go after the page that waited, and
        the batch's next acquisition meets them). The rounds stop once one adds less than
        the batch's period: with writers holding the lock a share ``u`` of the time they shrink
        by about ``u`` each, and what the rest would add is below one fault's time."""
        cdef _RdWin rd = <_RdWin>a.rd
        cdef long long w
        if rd.stage != 2:
            return 0
        w = self._rd_stall(a, <LockState?>self.locks["mmu_lock"], rd.sp, lo, hi, 0, 0, rd.g, rd.p, True)
        if w < rd.p:  # the stall has run out, to within one fault of the batch: no more rounds
            a.rd = None
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

    cdef int _pagewise(self, lock, long long n, long long nl=-1, long long hl=0) except -1:
        """:meth:`pagewise`; ``nl`` of the ``n`` acquisitions are long single holds (a split
        and its flush) that took ``hl`` ns of the hold together (-1: only a hold of one
        acquisition is one), for an interleaved lock's window (:meth:`_pw_settle`)."""
        cdef SchedActor a = self._current
        if a is None:
            return 0
        cdef LockState lk = _lock_of(self, lock)
        cdef LockStatsState st = lk.stats
        if lk.interleaved:  # the release's hold stands for n acquisitions of its window
            if n > 1:
                _fig_add_i(st, _FIG_ACQ, n - 1)
            a.pw_calls = n if n > 0 else 0
            a.pw_long_n = nl
            a.pw_long_ns = hl
            return 0
        cdef long long w = a.pw_wait if a.pw_acq == _fig_get(st, _FIG_ACQ) else 0
        a.pw_acq = -1
        a.pw_wait = 0
        if n <= 1:
            return 0
        _fig_add_i(st, _FIG_ACQ, n - 1)
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
        cdef int64_t b, t, k, wc, x, q
        cdef DistState d
        if a is None:
            return 0
        cdef long long now = self._now0 + _vm_ns(self) - self._mark  # now_ns
        b0 = begin[0]
        if (self.latency_log is None and type(b0) is int and _as_i64(b0, &b) and b != LLONG_MIN
                and not pkvm_add_ovf(now, -b, &t)):
            # unlogged (the usual case): _latency_put's adds in C
            if n <= 1:  # a sample of one operation
                (<DistState?>self.latency[kind])._add_ll(t, 1)
                return 0
            if (type(n) is int and _as_i64(n, &k) and _i64_sum(a.lock_wait, a.page_wait, a.spin, begin[1], &wc)
                    and not pkvm_sub_ovf(t, wc, &x) and not pkvm_add_ovf(_floor_div(x, k), wc, &q)):
                # a batch of n: the first sample carries the waits w, (total - w) // n each
                d = <DistState?>self.latency[kind]
                d._add_ll(q, 1)
                d._add_ll(_floor_div(x, k), k - 1)
                return 0
        total = now - b0
        w = 0 if n <= 1 else a.lock_wait - a.page_wait + a.spin - begin[1]
        self._latency_put(kind, total, w, n, 1)
        log = self.latency_log
        if log is not None:
            log.append((kind, total, w, n))
        return 0

    cdef int _latency_put(self, kind, total, w, n, times) except -1:
        """``times`` samples of ``total`` ns (``n`` > 1: a batch of ``n`` operations whose
        first waited ``w`` ns; :meth:`latency_end`) in distribution ``kind``."""
        cdef DistState d = <DistState?>self.latency[kind]
        # Distribution._add: the samples are int ns and the counts ints >= 1 (add's checks).
        if n <= 1:
            d._add_c(total, times)
        else:
            each = (total - w) // n
            d._add_c(each + w, times)
            d._add_c(each, (n - 1) * times)
        return 0

    def latency_replay(self, kind, total, w, n, times, growth=0):
        """Add again, ``times`` times, a sample that :meth:`latency_end` logged as
        ``(kind, total, w, n)`` in ``latency_log`` (the exit replay, ``pkvm.actors._steps``);
        with ``growth``, the ``j``-th of them (from 1) is ``total + j * growth`` ns."""
        if not growth:
            self._latency_put(kind, total, w, n, times)
            return
        for j in range(1, times + 1):
            self._latency_put(kind, total + j * growth, w, n, 1)

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
        the environment, no IPI stall owed, no round of a fault batch's reads of ``mmu_lock``
        still to settle (``a.rd``: the yield would settle it, ``_rd_after_work``), no
        recorder (whose slices would show the split). Locks the actor took uncontended stay
        so: a hold's statistics are its release time minus its grant time either way
        (``Timeline._switch`` makes them real holds, granted at their own time, whenever the
        actor yields)."""
        self._sync_point()

    cdef int _sync_point(self) except -1:
        cdef SchedActor a = self._current
        if a is None:
            return 0
        # a.rd: a yield settles the last fault batch's stage-1 round (or forgets a stage-2 one
        # with nothing owed) before the actor goes on; skipped, the round came at a later yield
        # (its wait after work that should follow it) or never (a later batch's _release_rd
        # replaced it), so the skip was not the yield it stands for.
        if (self._active <= a.in_task and not a.stall_debt and not a.lock_debt and a.rd is None
                and self.recorder is None and self._queue_empty_c()):
            self._vis_cut(a, True)
            return 0
        self._sync_c()
        return 0

    cdef int _vis_cut(self, SchedActor a, bint point) except -1:
        """Where ``a`` would have yielded and did not (a skipped visibility point, or the release
        of a hold taken uncontended and held at one), and where it yields (_take_c): the guest
        share of its work since the last such place (or its resume), if it did any, is the one
        a yield would have left (``_vis_share``). At a point (``point``) after some work, the holds it took uncontended that a
        yield would have made real (Timeline._make_holds: all but the interleaved locks') are
        marked so (``t2``), for their release."""
        cdef long long m = _vm_ns(self), g = _vm_guest_ns(self), m0
        cdef _Holds *h
        cdef Py_ssize_t i
        cdef bint work = False  # any since the last such place: a yield here would switch
        if self._skipped:
            m0 = self._vis + (self._mark - self._vis_mark)
            if m > m0:
                self._vis_share = <double>(g - self._vis_g) / <double>(m - m0)
                self._vis_set = work = True
        elif m > self._mark:
            self._vis_share = <double>(g - self._gmark) / <double>(m - self._mark)
            self._vis_set = work = True
        self._skipped = True  # Timeline.serialize: the work pending since this point
        self._vis = m
        self._vis_g = g
        self._vis_mark = self._mark
        if point and work:  # (a point with nothing pending does not yield: SchedHooks._sync_c)
            h = &a._hd
            for i in range(h.n):
                if h.t[i] >= 0 and not h.t2[i] and not (
                        <LockState>h.lk[i] if h.lk[i] is not NULL else _lock_of(self, <object>h.lock[i])).interleaved:
                    h.t2[i] = 1
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
                if host:
                    a.stall_debt += ns  # paid at its next yield
                else:
                    # A KVM request interrupts a vCPU only in guest mode (kvm_request_needs_ipi):
                    # in its stretch of work, as often as that stretch ran guest code.
                    a.stall_debt += <long long>(ns * a.guest_share + 0.5)
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
        now = int(_env_now(self) - self._t0)
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
        if self._st is None or self._st_vm is not self.vm:
            self._st = <Counters?>self.vm._stats
            self._st_vm = self.vm
        cdef int64_t seq = self._st.v[S_MMU_INVALIDATE_SEQ]
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
        """The running actor's work since its last yield (and the mark moves to now); the
        share of it that ran in guest mode becomes the actor's ``guest_share``."""
        cdef long long m = _vm_ns(self), g = _vm_guest_ns(self)
        cdef long long d = m - self._mark
        cdef SchedActor a = self._current
        if d > 0 and a is not None:
            # The share of the work since the last place a yield was skipped (or since the
            # resume), else of the last stretch with any work between two of them: what a yield
            # at each of them would have left. (A share of all the work since the resume would
            # make an IPI's stall depend on whether a recorder made those yields.) With work
            # pending there is such a stretch (_vis_set).
            self._vis_cut(a, False)
            a.guest_share = self._vis_share
        self._gmark = g
        self._mark = m
        return d

    def _sync(self):
        self._sync_c()

    cdef int _sync_c(self) except -1:
        """Advance the running actor's clock to its pending work (a round trip to SimPy). Also
        with nothing pending and nothing owed while its last fault batch has a round of
        ``mmu_lock`` reads still to settle (``a.rd``): the round trip settles it
        (``_rd_after_work``) and pays its wait (neither the visibility point's skip,
        :meth:`_sync_point`, nor a task's end, :meth:`_drive`, goes without settling it)."""
        cdef SchedActor a = self._current
        if a is None or (_vm_ns_is(self, self._mark) and not a.stall_debt and not a.lock_debt
                         and a.rd is None):
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
        if target.work is not None and _ev_triggered(self, target.work) and target.work.value == "stop":
            # stop() finished the thread: a task handed to it now would wait forever
            raise RuntimeError(f"dispatch: vCPU thread {name!r} was finished by stop(); "
                               f"dispatch before stopping the timeline")
        cdef SchedActor a = self._current
        if a is not None and (not _vm_ns_is(self, self._mark) or a.stall_debt or a.lock_debt):
            self._sync_c()  # the task starts at the caller's clock
        while target.task is not None or not _ev_triggered(self, target.idle):
            self._wait_c(target.idle, True, False)
        target.task = (fn, args)
        if not target.in_task:  # _set_in_task(target, True): it has work from now on
            self._active += 1
            target.in_task = True
        target.idle = self.env.event()
        work = target.work
        if work is not None and not _ev_triggered(self, work):
            work.succeed()

    def _call_once(self, SchedActor a, fn, tuple args):
        """The body of an actor started with ``Timeline.spawn``: ``fn(*args)``, then its last
        yield, as a vCPU thread's task end (:meth:`_drive`, ``_DONE``): its pending work passes,
        then what it owes, and its last fault batch's round of ``mmu_lock`` reads still to
        settle (``a.rd``) is settled and paid before the actor ends (docs/timeline.md,
        "Interleaved reads of mmu_lock")."""
        cdef _RdWin rd
        self._set_in_task_c(a, True)
        try:
            fn(*args)
            self._sync_c()
            # a later window's settling owed it a wait while its last work (or the last wait)
            # passed; or a round is still due (_rd_after_work settles one only once SimPy's
            # clock has reached its end, which the actor's own clock is past: the yields here
            # pass the rest)
            while a.lock_debt or a.rd is not None:
                rd = <_RdWin?>a.rd if a.rd is not None else None
                t = _env_now(self)
                self._sync_c()
                if rd is not None and a.rd is rd and rd.stage == 1 and _env_now(self) == t:
                    from pkvm.errors import InternalInvariantError
                    raise InternalInvariantError(
                        f"{a.name}: a fault batch's round of mmu_lock reads ends at "
                        f"{rd.hi} ns, after the actor's work ({int(t - self._t0)} ns)")
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

    def _pay_lock_debt(self, SchedActor a, rec):
        """``a`` waits out what it owes for interleaved pagewise locks (_pw_settle): on its
        clock already when it settled its own window; owed for another's, its code goes on
        after it (and after any owed while this one passes). A SimPy generator (_drive)."""
        cdef long long debt = a.lock_debt
        cdef list owed
        env = self.env
        while debt:
            a.lock_debt = 0
            owed = a.debts
            a.debts = []
            t0 = _env_now(self)
            a.flight = _FL_LOCK
            a.flight_t = t0
            a.absorb = _AB_HOST
            yield env.timeout(debt)
            a.flight = _FL_NONE
            self._ipi_wake(a)
            a.wait += debt
            a.lock_wait += debt
            a.page_wait += debt
            if a.rd is not None:  # its last fault batch stalled meanwhile (_release_rd)
                self._rd_after_pay(a, int(t0 - self._t0), int(_env_now(self) - self._t0))
            for e in owed:  # the locks' statistics count them as they pass
                self._pw_count(e[0], e[1], e[2], e[3], e[4])
            if rec is not None:
                self._rec_debt_waits(a, owed, t0, _env_now(self))
            debt = a.lock_debt

    def _rec_debt_waits(self, SchedActor a, list owed, t0, t1):
        """The recorder's slices of a payment ``[t0, t1)`` (SimPy's time) of the waits ``owed``,
        one per lock in the order they were owed (neighbours of one lock merged), each as long
        as its waits, so that a lock's ``wait`` slices add up to its statistics (one slice named
        after the last lock put another lock's waits under it)."""
        cdef tuple e
        cdef long long w
        s = t0
        lock = None
        start = t0
        for e in owed:
            w = e[3]
            if w <= 0:
                continue
            if lock is not None and e[0] != lock:
                self._rec_lock_wait(a, lock, start, s)
                start = s
            lock = e[0]
            s = s + w if s + w < t1 else t1
        if lock is not None:
            self._rec_lock_wait(a, lock, start, t1)

    cdef list _debts_before(self, SchedActor a, long long grant):
        """Take out of ``a``'s lock debt the waits owed for windows that began before
        ``grant`` (when it took the lock it is releasing; ns since the timeline's start) and
        return them (None: there are none). In the kernel such a wait delayed the thread before
        it came to the lock, not inside its hold: a wait settled after the thread took the lock
        (another vCPU's window, settled later, that overlapped one of its earlier windows)
        passes after the release, so it does not lengthen a critical section others queue
        behind (docs/timeline.md, "Locks the kernel takes page by page")."""
        cdef list keep = [], later = None
        cdef tuple e
        for e in a.debts:
            if (<_Window>e[2]).start < grant:
                if later is None:
                    later = []
                later.append(e)
                a.lock_debt -= <long long>e[3]
            else:
                keep.append(e)
        if later is not None:
            a.debts = keep
        return later

    cdef int _resume_c(self, SchedActor a) except -1:
        """``a``'s code runs again (SimPy's clock stands still until it yields)."""
        self._current = a
        self._now0 = int(_env_now(self) - self._t0)
        if a._fd.n:
            _holds_clear(&a._fd)
        vm = self.vm
        self._mark = _vm_ns(self)
        self._gmark = _vm_guest_ns(self)
        self._skipped = False
        self._vis_set = False
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
            a.done = int(_env_now(self) - self._t0)
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
            if op == _SCHED_DONE and dt and not a.stall_debt and not a.lock_debt and a.rd is None:
                # The task is done: its pending work passes, then the thread goes idle. The
                # timeout's callback frees the thread (the same events in the same order as
                # resuming this process for it: no IPI can reach a thread outside a task, so
                # no stall follows); the process waits for its next task meanwhile. Not while
                # its last fault batch has a round of mmu_lock reads to settle (a.rd): resumed,
                # the process settles it once the work passed (_rd_after_work) and pays its wait
                # before the thread goes idle, where this path left it to a later task's first
                # yield (or to none: a later batch's _release_rd replaced it).
                a.busy += dt
                a.flight = _FL_BUSY
                a.flight_t = _env_now(self) + dt
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
                a.flight_t = _env_now(self) + dt
                if rec is not None:
                    self._rec_work(a, dt)
                yield env.timeout(dt)
            debt = a.stall_debt
            if debt:
                a.stall_debt = 0
                a.wait += debt
                a.ipi += debt
                a.flight = _FL_IPI
                a.flight_t = _env_now(self) + debt
                if rec is not None:
                    self._rec_ipi(a, debt)
                yield env.timeout(debt)
            if a.rd is not None:  # a fault batch's reads of mmu_lock (_release_rd)
                self._rd_after_work(a)
            later = None
            if a.lock_debt:
                if op == _SCHED_REL:  # the waits owed for windows before this hold: after it
                    later = self._debts_before(a, <long long>grants[(req[2], req[3])])
                if a.lock_debt:
                    yield from self._pay_lock_debt(a, rec)
            value = None
            if op == _SCHED_ACQ:
                lk = locks[req[2]]
                t0 = _env_now(self)
                if req[3] == 0 and (<LockState>lk).wholds is not None:  # (_release_rd)
                    a.rd_req = int(t0 - self._t0)
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
                    waited = _env_now(self) - t0  # int ns: every delay is an int
                    a.wait += waited
                    a.lock_wait += waited
                    a.acq_wait = waited
                    if req[2] in _PAGEWISE_LOCKS:
                        a.page_wait += waited
                    if req[2] == "tdx_sept":  # TDX_OPERAND_BUSY -> RET_PF_RETRY, re-tried locally
                        self.races["tdx_busy_retry"] += max(1, waited // self._seamcall_retry_ns)
                    if rec is not None:
                        self._rec_lock_wait(a, req[2], t0)
                grants[(req[2], req[3])] = int(_env_now(self) - self._t0)
                if req[3] == 0 and (<LockState>lk).wholds is not None:
                    a.rd_grant = int(_env_now(self) - self._t0)
                if req[2] in _PAGEWISE_LOCKS:  # for pagewise(): this grant and what it waited
                    a.pw_acq = _fig_get((<LockState>lk).stats, _FIG_ACQ)
                    a.pw_wait = _env_now(self) - t0 if (blocked or early > 0) else 0
            elif op == _SCHED_REL:
                lk = locks[req[2]]
                if rec is not None:
                    self._rec_hold(a, req[2], req[3], lk, grants[(req[2], req[3])])
                if req[3] != 0 and (<LockState>lk).wholds is not None:  # (_rd_round)
                    self._rd_write_hold(a, <LockState>lk, <long long>grants[(req[2], req[3])],
                                        int(_env_now(self) - self._t0))
                a.rel_t = int(_env_now(self) - self._t0)
                if isinstance(lk, rwlock):
                    (lk.release_read if req[3] == 0 else lk.release_write)(a.name)
                else:
                    lk.release(a.name)
                if later is not None:
                    for e in later:
                        a.lock_debt += <long long>(<tuple>e)[3]
                    a.debts[:0] = later
                    yield from self._pay_lock_debt(a, rec)
            elif op == _SCHED_WAIT:
                ev = req[2]
                if not ev.processed:
                    t0 = _env_now(self)
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
                        spun = _env_now(self) - t0  # int ns, as above
                        a.wait += spun
                        a.spin += spun
                        if rec is not None:
                            self._rec_spin(a, t0)
                else:
                    value = ev.value
            elif op == _SCHED_DONE:  # _task_loop: the task is done, the thread idles until the next
                a.task = None
                a.done = int(_env_now(self) - self._t0)
                a.idle.succeed()
                ev = env.event()
                a.work = ev
                value = yield ev
            self._resume_c(a)
            req = g.switch(value)
        self._current = None
        a.done = int(_env_now(self) - self._t0)


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
    return _fault_timeline(vcpu, vm, <SchedHooks?>vm._sched, <FaultPath?>vm._fault_path, gfn, limit,
                           private, write, prefetch)


cdef tuple _fault_timeline(vcpu, vm, SchedHooks sched, FaultPath fp, uint64_t gfn, uint64_t limit,
                           bint private, bint write, bint prefetch):
    """:func:`fault_timeline` on ``vm``'s timeline ``sched`` and fault path ``fp`` (the path's
    own calls pass themselves: ``FaultPath._tl_run``)."""
    cdef RangeMap sptes = fp.sptes
    t0 = sched._work_ns()  # this thread's own work
    cdef uint64_t cut = sched.batch_pages
    if private and cut and limit > gfn + cut and sched._contended():
        limit = (gfn + cut) & ~(cut - 1)
    cdef PageFault f = _new_fault(gfn, limit, private, write, prefetch)
    lat = sched._latency_begin()
    cdef uint64_t before, end0, keep
    cdef VmState vs
    cdef uint64_t retried = 0
    cdef FaultResult r
    # the batch is the window over which the kernel's page-by-page acquisitions of cpa_lock
    # and the S-EPT interleave with the rest of its faults (SchedHooks.pw_begin)
    sched._pw_begin()
    try:
        before = rangemap_get(sptes, gfn)
        fp._begin(f)
        if not f.ret and fp.armed and "mmu_topup" in fp.armed:
            fp.topup(vm, f, gfn)
        if not f.ret:
            fp._faultin(f)  # kvm_gmem_get_pfn: only the folio lock (docs/timeline.md)
            if sched._current is not None:
                sched._current.fault_seq = f.mmu_seq
            sched._sync_point()
        vs = fp.vs
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
                    fp._retried_one(keep)
                    sched.races["pf_retry"] += 1
                    retried = 1
                if not f.ret:
                    f.end = keep
            if not f.ret:
                _raced_install(f, sptes, before)
            if not f.ret:
                fp._install(f)
            # a batch of several faults (4K pages, or 2M leaves: f.nfaults) reads the lock
            # once per fault, interleaved with the writers
            if f.nfaults > 1 and f.ret == "fixed" and sched._rd_on():
                sched._release_rd(<long long>f.nfaults)
            else:
                sched._release("mmu_lock", 0)
        r = fp._finish(f)
    finally:
        sched._pw_end()
    # (a page of the batch that retried is a sample of its own: the batch's time is spread
    # over it too)
    sched._latency_end("fault", lat, f.nfaults + retried if r.ret == "fixed" else 1 + retried)
    # the fault's own work, for the fault event (_after reads it only when it emits one)
    took = sched._work_ns() - t0 if fp.ledger.traced and not f.prefetch else None
    fp._after(vcpu, f, r, gfn, private, write, took)
    return f, r
