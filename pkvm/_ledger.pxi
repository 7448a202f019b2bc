# The VM's counters as typed state (``VM._stats``; ``vm.stats`` is a dict copy of them).
#
# The kernel paths of this core (pkvm/_fault.pxi, _attr.pxi, _gmem.pxi) add to a counter with
# one C add at an index fixed when the key was registered: the keys of pkvm.kvm.vm.STAT_KEYS
# have the indices S_* of pkvm/_core.pxd, a platform's own keys (SNP, TDX) the index that their
# registration gave them, resolved once when a path object is built. Python code sees a mutable
# mapping that behaves as the dict it replaces, with three refusals (each changes nothing): a
# key that is not a str, a value that is not an integer (a bool, a float) or does not fit an int64,
# and removing a counter (del, pop, popitem, clear).

from collections.abc import ItemsView, KeysView, Mapping, MutableMapping, ValuesView


cdef int64_t _counter_value(object key, object value) except? -1:
    """``value`` as an int64 counter value, or TypeError / ValueError naming ``key``."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise TypeError(f"counter {key!r} must be an int, not {type(value).__name__}")
        value = operator.index(value)  # an int subclass or a numpy integer: stored as an int
    if not -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"counter {key!r} = {value} does not fit an int64")
    return <int64_t>value


_NO_DEFAULT = object()

#: The keys of the indices ``S_*`` (pkvm/_core.pxd), in order: ``pkvm.kvm.vm.STAT_KEYS``.
_COUNTER_KEYS = (
    "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "remote_tlb_flush",
    "remote_tlb_flush_requests", "pages_4k", "pages_2m", "pages_1g", "mmu_invalidate_seq",
    "pf_retry", "memory_fault_exits", "attr_stores", "zapped_sptes", "huge_page_splits",
    "gmem_pages_allocated", "gmem_pages_freed", "gmem_prepare", "gmem_invalidate",
    "shared_pages_populated", "mem_attr_op_failures", "hypercalls", "hypercall_exits",
)


cdef Counters _vm_counters(object stats):
    """``stats`` (a VM's ``_stats``) if it is a :class:`Counters` whose first keys are
    :data:`_COUNTER_KEYS` (the paths add at the indices ``S_*``); TypeError otherwise."""
    if type(stats) is not Counters or (<Counters>stats).n < S_NBASE \
            or tuple((<Counters>stats).names[:S_NBASE]) != _COUNTER_KEYS:
        raise TypeError("a VM's _stats must be a pkvm._core.Counters built from STAT_KEYS")
    return <Counters>stats


cdef int _stat_add(object stats, str key, object n) except -1:
    """``stats[key] += n`` on a VM's ``_stats``: in C when it is a :class:`Counters` that has
    ``key`` and the sum stays an int64 (every counter the paths add to), else through the
    mapping."""
    cdef int64_t x
    if type(stats) is Counters and type(n) is int and _as_i64(n, &x):
        i = (<Counters>stats).index.get(key)
        if i is not None:
            return _stat_add_at(<Counters>stats, <Py_ssize_t>i, key, x)
    stats[key] += n
    return 0


cdef int _stat_add_n(Counters c, Py_ssize_t i, str key, object n) except -1:
    """``c[key] += n`` for the counter ``key`` at index ``i`` (:func:`_stat_add_at` for an int
    object)."""
    cdef int64_t x
    if type(n) is int and _as_i64(n, &x):
        return _stat_add_at(c, i, key, x)
    c[key] += n
    return 0


cdef int _stat_add_at(Counters c, Py_ssize_t i, str key, int64_t x) except -1:
    """``c[key] += x`` for the counter ``key`` at index ``i``: in C while the sum stays an int64
    (else through the mapping, which refuses it)."""
    # (the bound as an int64_t: a bare literal this large is a Python int to Cython, which
    # made the test two boxed ints and a Python subtraction per add)
    if x >= 0 and c.v[i] <= <int64_t>0x7FFFFFFFFFFFFFFF - x:
        c.v[i] += x
        return 0
    c[key] += x
    return 0


cdef Counters _scratch_counters(object stats):
    """The :class:`Counters` an ``Mmu`` helper adds to: ``stats`` itself, or for another
    mapping (an ``Mmu`` built over a plain dict) a scratch copy of its values at the indices
    ``S_*``, which :func:`_settle_counters` adds back."""
    if type(stats) is Counters and (<Counters>stats).n >= S_NBASE:
        return _vm_counters(stats)
    cdef Counters c = Counters(_COUNTER_KEYS)
    cdef Py_ssize_t i
    for i in range(S_NBASE):
        c.v[i] = _counter_value(_COUNTER_KEYS[i], stats.get(_COUNTER_KEYS[i], 0))
    return c


cdef int _settle_counters(Counters c, object stats) except -1:
    """Add what the helper added to the scratch ``c`` back to the mapping ``stats`` (a
    counter it does not have is a KeyError, as the dict's own ``+=`` was)."""
    if c is stats:
        return 0
    cdef Py_ssize_t i
    for i in range(S_NBASE):
        key = _COUNTER_KEYS[i]
        d = c.v[i] - _counter_value(key, stats.get(key, 0))
        if d:
            stats[key] = stats[key] + d
    return 0


@cython.final
@cython.auto_pickle(False)
cdef class Counters:
    """A VM's counters: a mutable mapping of str keys to int values, kept in a C array.

    ``Counters(keys)`` starts every key of ``keys`` at 0 (in that order, like
    ``dict.fromkeys(keys, 0)``). Assigning to a new key registers it at the end; a counter
    cannot be removed.

    >>> c = Counters(("pf_taken", "pf_fixed"))
    >>> c["pf_taken"] += 2; c["rmpupdate"] = 0
    >>> dict(c)
    {'pf_taken': 2, 'pf_fixed': 0, 'rmpupdate': 0}

    Raises (each refusal changes nothing):
        KeyError: reading a key that was never registered.
        TypeError: a key that is not a str, a value that is not an int (or is a bool),
            removing a counter.
        ValueError: a value that does not fit an int64.
    """

    def __cinit__(self):
        self.v = NULL
        self.n = self.cap = 0
        self.names = []
        self.index = {}

    def __init__(self, keys=()):
        for key in keys:
            if type(key) is not str:
                raise TypeError(f"counter names must be str, not {type(key).__name__}")
            if key not in self.index:
                self.slot(key)

    def __dealloc__(self):
        free(self.v)

    cdef Py_ssize_t slot(self, str key) except -1:
        """The index of ``key``, registered at the end (value 0) if it is new."""
        cdef object i = self.index.get(key)
        cdef int64_t *nv
        cdef Py_ssize_t cap
        if i is not None:
            return <Py_ssize_t>i
        if self.n == self.cap:
            cap = self.cap * 2 if self.cap else 32
            nv = <int64_t *>realloc(self.v, cap * sizeof(int64_t))
            if nv == NULL:
                raise MemoryError()
            self.v = nv
            self.cap = cap
        self.v[self.n] = 0
        self.names.append(key)
        self.index[key] = self.n
        self.n += 1
        return self.n - 1

    # -- the mapping ---------------------------------------------------------------------------

    def __getitem__(self, key):
        i = self.index.get(key)
        if i is None:
            raise KeyError(key)
        return self.v[<Py_ssize_t>i]

    def __setitem__(self, key, value):
        cdef int64_t x
        i = self.index.get(key)
        if i is not None and type(value) is int and _as_i64(value, &x):  # an existing counter
            self.v[<Py_ssize_t>i] = x
            return
        if type(key) is not str:
            raise TypeError(f"counter names must be str, not {type(key).__name__}")
        x = _counter_value(key, value)
        self.v[self.slot(key)] = x

    def __delitem__(self, key):
        raise TypeError(f"a VM's counters cannot be removed (tried to remove {key!r})")

    def __contains__(self, key):
        return key in self.index

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(tuple(self.names))

    def get(self, key, default=None):
        i = self.index.get(key)
        if i is None:
            return default
        return self.v[<Py_ssize_t>i]

    def keys(self):
        return KeysView(self)

    def values(self):
        return ValuesView(self)

    def items(self):
        return ItemsView(self)

    def copy(self):
        """A plain dict of the counters (what ``vm.stats`` returns)."""
        cdef Py_ssize_t i
        return {self.names[i]: self.v[i] for i in range(self.n)}

    def setdefault(self, key, default=None):
        i = self.index.get(key)
        if i is not None:
            return self.v[<Py_ssize_t>i]
        self[key] = default
        return self.v[self.n - 1]

    def update(self, other=(), **kwargs):
        """``dict.update``; every value is checked first, so a refused update changes nothing."""
        if isinstance(other, Mapping):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]
        else:
            pairs = [tuple(p) for p in other]
        pairs.extend(kwargs.items())
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"update needs (key, value) pairs, got {pair!r}")
            key, value = pair
            if type(key) is not str:
                raise TypeError(f"counter names must be str, not {type(key).__name__}")
            _counter_value(key, value)
        for key, value in pairs:
            self[key] = value

    def pop(self, key, default=_NO_DEFAULT):
        raise TypeError(f"a VM's counters cannot be removed (tried to pop {key!r})")

    def popitem(self):
        raise TypeError("a VM's counters cannot be removed (tried popitem)")

    def clear(self):
        raise TypeError("a VM's counters cannot be removed (tried clear)")

    def __eq__(self, other):
        if isinstance(other, Counters):
            return self.copy() == (<Counters>other).copy()
        if isinstance(other, Mapping):
            return self.copy() == dict(other)
        return NotImplemented

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    __hash__ = None

    def __repr__(self):
        return f"Counters({self.copy()!r})"

    def __reduce__(self):
        return (_counters_from_items, (tuple(self.copy().items()),))


def _counters_from_items(items):
    """Unpickle a :class:`Counters`."""
    c = Counters()
    for key, value in items:
        c[key] = value
    return c


MutableMapping.register(Counters)


# -- the modeled-time ledger ------------------------------------------------------------------------

cdef extern from *:
    """
    static inline int pkvm_add_ovf(int64_t a, int64_t b, int64_t *r) { return __builtin_add_overflow(a, b, r); }
    static inline int pkvm_mul_ovf(int64_t a, int64_t b, int64_t *r) { return __builtin_mul_overflow(a, b, r); }
    static inline int pkvm_sub_ovf(int64_t a, int64_t b, int64_t *r) { return __builtin_sub_overflow(a, b, r); }
    """
    bint pkvm_add_ovf(int64_t a, int64_t b, int64_t *r) noexcept nogil
    bint pkvm_mul_ovf(int64_t a, int64_t b, int64_t *r) noexcept nogil
    bint pkvm_sub_ovf(int64_t a, int64_t b, int64_t *r) noexcept nogil

from cpython.long cimport PyLong_AsLongLongAndOverflow


cdef inline bint _as_i64(object x, int64_t *out) except -1:
    """Whether the int ``x`` fits an int64 (its value in ``out``)."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(x, &overflow)
    if overflow:
        return False
    out[0] = v
    return True


@cython.final
@cython.auto_pickle(False)  # a VM's live state: never pickled on its own
cdef class Ledger:
    """A VM's modeled time (``VM._ledger``): the total modeled ns (``VM._modeled_ns``, an
    int64 slot that becomes a Python int only if it ever leaves int64, so the value and its
    ``int`` type are those of the Python arithmetic it replaces), the acting actor's
    :class:`Cells` of ns per operation (``VM._cost_ns``; :meth:`VM._set_actor` swaps them), the
    price of one event of each operation (``VM._costs``) and whether the VM has event
    subscribers (each charge is then the ``charge`` event). The core's paths charge through its
    C methods; ``VM._charge`` is :meth:`charge`."""

    def __cinit__(self, *args):
        self.opindex = {}
        self.opnames = []
        self.cost = Cells(self)
        self.prices = {}
        self.ns = 0
        self.big = None
        self.traced = False
        self.guest_ops = frozenset()
        self.guest_ns = 0
        memset(self.gm, 0, sizeof(self.gm))

    def __init__(self, vm, dict prices not None, guest_ops=()):
        self.vm = vm
        self.prices = prices
        self.guest_ops = frozenset(guest_ops)
        for op, i in self.opindex.items():
            if i < 64:
                self.gm[i] = op in self.guest_ops

    cdef Py_ssize_t op_slot(self, str op) except -1:
        """The index of ``op`` in every :class:`Cells` of this VM (registered if new)."""
        i = self.opindex.get(op)
        if i is not None:
            return <Py_ssize_t>i
        n = len(self.opnames)
        self.opnames.append(op)
        self.opindex[op] = n
        if n < 64:
            self.gm[n] = op in self.guest_ops
        elif op in self.guest_ops:
            raise ValueError(f"guest-mode op {op!r} registered past the first 64 ops")
        return n

    cdef object now(self):
        """The modeled ns (a Python int; the last one made is reused while the total has not
        changed, as the timeline reads it several times between charges)."""
        if self.big is not None:
            return self.big
        if self.boxed is None or self.boxed_ns != self.ns:
            self.boxed = self.ns
            self.boxed_ns = self.ns
        return self.boxed

    @property
    def modeled_ns(self):
        return self.now()

    @modeled_ns.setter
    def modeled_ns(self, value):
        if type(value) is not int:
            raise TypeError(f"modeled ns must be an int, not {type(value).__name__}")
        cdef int64_t v
        if _as_i64(value, &v):
            self.ns = v
            self.big = None
        else:
            self.big = value

    @property
    def cells(self):
        """The acting actor's :class:`Cells` (``VM._cost_ns``)."""
        return self.cost

    def new_cells(self):
        """An empty :class:`Cells` of this VM (a new actor's)."""
        return Cells(self)

    def set_cost(self, Cells cost not None):
        """The acting actor's cells from now on (``VM._set_actor``)."""
        self.set_cost_c(cost)

    cdef int set_cost_c(self, Cells cost) except -1:
        if cost.ledger is not self:
            raise ValueError("the cells belong to another VM's ledger")
        self.cost = cost
        return 0

    cdef int add_c(self, str op, int64_t ns) except -1:
        """Add ``ns`` to ``op``'s cell of the acting actor and to the modeled ns."""
        return self.add_i(self.op_slot(op), ns)

    cdef int add_i(self, Py_ssize_t i, int64_t ns) except -1:
        """:meth:`add_c` for the op of index ``i``."""
        cdef Cells c = self.cost
        cdef int64_t t
        if i >= c.cap:
            c.grow(i + 1)
        if c.st[i] == 1 and not pkvm_add_ovf(c.v[i], ns, &t):
            c.v[i] = t
        elif c.st[i] == 0:
            c.order.append(self.opnames[i])
            c.v[i] = ns
            c.st[i] = 1
        else:
            op = self.opnames[i]
            c[op] = c[op] + ns
        if self.big is None and not pkvm_add_ovf(self.ns, ns, &t):
            self.ns = t
        else:
            self._add_big(ns)
        if i < 64 and self.gm[i]:
            self.guest_ns += ns
        return 0

    cdef inline bint add_fast(self, Py_ssize_t i, int64_t ns) noexcept:
        """:meth:`add_i` in its common case (the acting actor's cell of op ``i`` exists in
        int64, the modeled ns is an int64, neither sum overflows), both sums checked before
        either is written; False, with nothing written, in any other case (the caller then
        calls :meth:`add_i`)."""
        cdef Cells c = self.cost
        cdef int64_t t, u
        if (i < c.cap and c.st[i] == 1 and self.big is None and not pkvm_add_ovf(c.v[i], ns, &t)
                and not pkvm_add_ovf(self.ns, ns, &u)):
            c.v[i] = t
            self.ns = u
            if i < 64 and self.gm[i]:
                self.guest_ns += ns
            return True
        return False

    cdef int _add_big(self, object ns) except -1:
        t = (self.ns if self.big is None else self.big) + ns
        self.modeled_ns = t  # back to the int64 slot if it fits again
        return 0

    cdef int add(self, str op, object ns) except -1:
        """:meth:`add_c` for an int object ``ns`` of any size."""
        cdef int64_t v
        if type(ns) is int and _as_i64(ns, &v):
            return self.add_c(op, v)
        cost = self.cost
        cost[op] = cost.get(op, 0) + ns
        self._add_big(ns)
        return 0

    cdef int charge_c(self, str op, uint64_t n) except -1:
        """``VM._charge``: ``n`` events of ``op`` at its price, on the acting actor (and the
        ``charge`` event if traced)."""
        cdef int64_t price
        p = self.prices[op]
        if type(p) is int and _as_i64(p, &price):
            return self.charge_p(self.op_slot(op), price, n)
        return self._charge_slow(op, p, n)

    cdef int charge_p(self, Py_ssize_t i, int64_t price, uint64_t n) except -1:
        """:meth:`charge_c` for the op of index ``i`` (:meth:`op_slot`) with the price of one
        event already known (a path resolves the ops it charges once, when it is built: the
        VM's prices are fixed by then)."""
        cdef int64_t ns
        if n <= <uint64_t>0x7FFFFFFFFFFFFFFF and not pkvm_mul_ovf(price, <int64_t>n, &ns):
            if not self.add_fast(i, ns):
                self.add_i(i, ns)
            if self.traced:
                self.vm._emit("charge", None, None, self.opnames[i], n, ns)
            return 0
        return self._charge_slow(self.opnames[i], price, n)

    cdef int _charge_slow(self, str op, object price, object n) except -1:
        """A charge in Python ints (a product past int64)."""
        ns = price * n
        self.add(op, ns)
        if self.traced:
            self.vm._emit("charge", None, None, op, n, ns)
        return 0

    cdef int charge_obj(self, str op, object n) except -1:
        """:meth:`charge_c` for an int object ``n``."""
        cdef int64_t v
        if type(n) is int and _as_i64(n, &v) and v >= 0:
            return self.charge_c(op, <uint64_t>v)
        return self._charge_slow(op, self.prices[op], n)

    def charge(self, str op, n):
        """``VM._charge(op, n)``."""
        self.charge_obj(op, n)

    def __repr__(self):
        return f"<pkvm Ledger modeled_ns={self.modeled_ns}>"


cdef int64_t _price(dict prices, str op) except -2:
    """The price of one event of ``op`` as an int64 for :meth:`Ledger.charge_p`, or -1 when
    ``op`` has none or it does not fit (the caller then charges through ``charge_c``)."""
    cdef int64_t v
    p = prices.get(op)
    if type(p) is int and _as_i64(p, &v) and v >= 0:
        return v
    return -1


cdef inline int _op_price(OpPrice *o, Ledger led, dict prices, str op) except -1:
    """Resolve ``op`` for :func:`_charge_op`: its index and price (a path resolves the ops it
    charges when it is built, as for :meth:`Ledger.charge_p`: the VM's prices are fixed by
    then)."""
    o.p = _price(prices, op)
    o.i = led.op_slot(op)
    return 0


cdef inline int _charge_op_u(Ledger led, const OpPrice *o, str op, uint64_t n) except -1:
    """``led.charge_c(op, n)`` (``VM._charge``) of an op resolved by :func:`_op_price`,
    without looking ``op`` up."""
    if o.p >= 0:
        return led.charge_p(o.i, o.p, n)
    return led.charge_c(op, n)


cdef inline int _charge_op(Ledger led, const OpPrice *o, str op, object n) except -1:
    """:func:`_charge_op_u` of an int object ``n`` (``led.charge_obj(op, n)``)."""
    cdef int64_t v
    if type(n) is int and _as_i64(n, &v) and v >= 0:
        return _charge_op_u(led, o, op, <uint64_t>v)
    return led.charge_obj(op, n)


@cython.final
@cython.auto_pickle(False)  # a VM's live state: never pickled on its own
cdef class Cells:
    """One actor's modeled ns per operation (``VM._actor_ns[actor]``; the acting actor's is
    ``VM._cost_ns``): a mutable mapping of op names to ints that behaves as the dict it
    replaces (insertion order, a removed op re-inserted at the end, any int: a cell past int64
    is kept as a Python int), with the values in a C array at the op indices of the VM's
    :class:`Ledger`, which adds to them in C.

    Raises (each refusal changes nothing): KeyError for an op without a cell; TypeError for
    an op that is not a str or a value that is not an int (a bool, a float).
    """

    def __cinit__(self, *args):
        self.v = NULL
        self.st = NULL
        self.cap = 0
        self.order = []
        self.big = {}

    def __init__(self, Ledger ledger not None):
        self.ledger = ledger

    def __dealloc__(self):
        free(self.v)
        free(self.st)

    cdef int grow(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap = max(n, 2 * self.cap, 16)
        cdef int64_t *nv = <int64_t *>realloc(self.v, cap * sizeof(int64_t))
        if nv == NULL:
            raise MemoryError()
        self.v = nv
        cdef unsigned char *ns = <unsigned char *>realloc(self.st, cap)
        if ns == NULL:
            raise MemoryError()
        self.st = ns
        memset(ns + self.cap, 0, cap - self.cap)
        self.cap = cap
        return 0

    cdef Py_ssize_t _at(self, object op) except -2:
        """The index of ``op``'s cell, or -1 if it has none."""
        if self.ledger is None:
            raise TypeError("Cells(ledger) was not initialised")
        i = self.ledger.opindex.get(op)
        if i is None or <Py_ssize_t>i >= self.cap or not self.st[<Py_ssize_t>i]:
            return -1
        return <Py_ssize_t>i

    cdef object _value(self, Py_ssize_t i, object op):
        return self.v[i] if self.st[i] == 1 else self.big[op]

    def __getitem__(self, op):
        cdef Py_ssize_t i = self._at(op)
        if i < 0:
            raise KeyError(op)
        return self._value(i, op)

    def __setitem__(self, op, value):
        if type(op) is not str:
            raise TypeError(f"operation names must be str, not {type(op).__name__}")
        if type(value) is not int:
            if isinstance(value, bool) or not hasattr(type(value), "__index__"):
                raise TypeError(f"modeled ns of {op!r} must be an int, not {type(value).__name__}")
            value = operator.index(value)
        cdef int64_t x
        if self.ledger is None:
            raise TypeError("Cells(ledger) was not initialised")
        cdef Py_ssize_t i = self.ledger.op_slot(op)
        if i >= self.cap:
            self.grow(i + 1)
        if not self.st[i]:
            self.order.append(op)
        if _as_i64(value, &x):
            self.v[i] = x
            self.st[i] = 1
            self.big.pop(op, None)
        else:
            self.big[op] = value
            self.st[i] = 2

    def __delitem__(self, op):
        cdef Py_ssize_t i = self._at(op)
        if i < 0:
            raise KeyError(op)
        self.st[i] = 0
        self.order.remove(op)
        self.big.pop(op, None)

    def __contains__(self, op):
        return self._at(op) >= 0

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        return iter(tuple(self.order))

    def get(self, op, default=None):
        cdef Py_ssize_t i = self._at(op)
        return default if i < 0 else self._value(i, op)

    def keys(self):
        return KeysView(self)

    def values(self):
        return ValuesView(self)

    def items(self):
        return ItemsView(self)

    def copy(self):
        """A plain dict of the cells."""
        return {op: self[op] for op in self.order}

    def pop(self, op, default=_NO_DEFAULT):
        cdef Py_ssize_t i = self._at(op)
        if i < 0:
            if default is _NO_DEFAULT:
                raise KeyError(op)
            return default
        value = self._value(i, op)
        del self[op]
        return value

    def popitem(self):
        if not self.order:
            raise KeyError("popitem(): dictionary is empty")
        op = self.order[len(self.order) - 1]
        return op, self.pop(op)

    def clear(self):
        for op in tuple(self.order):
            del self[op]

    def setdefault(self, op, default=None):
        if op in self:
            return self[op]
        self[op] = default
        return self[op]

    def update(self, other=(), **kwargs):
        """``dict.update``; every pair is checked first, so a refused update changes nothing."""
        if isinstance(other, Mapping):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]
        else:
            pairs = [tuple(p) for p in other]
        pairs.extend(kwargs.items())
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"update needs (key, value) pairs, got {pair!r}")
            op, value = pair
            if type(op) is not str:
                raise TypeError(f"operation names must be str, not {type(op).__name__}")
            if isinstance(value, bool) or not hasattr(type(value), "__index__"):
                raise TypeError(f"modeled ns of {op!r} must be an int, not {type(value).__name__}")
        for op, value in pairs:
            self[op] = value

    def __eq__(self, other):
        if isinstance(other, Mapping):
            return self.copy() == dict(other)
        return NotImplemented

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    __hash__ = None

    def __repr__(self):
        return f"Cells({self.copy()!r})"


MutableMapping.register(Cells)


@cython.final
@cython.auto_pickle(False)
cdef class LedgerTotal:
    """``VM._modeled_ns``: a data descriptor that reads and sets the total of the instance's
    ``_ledger`` (a :class:`Ledger`) in C, without a Python frame (the timeline reads it at
    every switch)."""

    def __get__(self, obj, objtype):
        if obj is None:
            return self
        return (<Ledger?>obj._ledger).now()

    def __set__(self, obj, value):
        (<Ledger?>obj._ledger).modeled_ns = value
