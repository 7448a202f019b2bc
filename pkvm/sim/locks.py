"""The kernel's locks as SimPy primitives, with hold and wait statistics.

Three locks, each owned by named actors (``owner`` is a string such as ``"vcpu3"``; it is
also the track a :class:`~pkvm.sim.recorder.Recorder` draws the owner's waits and holds on):

- :class:`Mutex`, the kernel's ``struct mutex`` (kernel/locking/mutex.c). Waiters sleep.
  Modelled as a strict FIFO hand-off: a waiter joins the tail of the wait list, as
  ``__mutex_lock_common()`` adds it with ``__mutex_add_waiter()``, and the unlock gives the
  lock straight to the first waiter, as ``__mutex_handoff()`` does once a waiter has set
  ``MUTEX_FLAG_HANDOFF``. *Simplification*: the real mutex also lets a running task take a
  free mutex ahead of sleeping waiters (the fast path, and optimistic spinning on the owner
  through the OSQ in ``mutex_optimistic_spin()``), so it is only eventually fair; the model
  never lets an arrival steal the lock from a queued waiter.
- :class:`RWLock`, x86's ``rwlock_t``, a queued rwlock (include/asm-generic/qrwlock.h,
  kernel/locking/qrwlock.c). Readers share; a writer excludes everyone. It is *fair*: a
  reader takes the fast path in ``queued_read_lock()`` only while no writer holds the lock or
  waits for it (``_QW_WMASK`` clear); otherwise ``queued_read_lock_slowpath()`` queues it on
  the lock's ``wait_lock``, behind any writer already queued, so readers cannot starve a
  writer. ``queued_write_lock()`` takes a free lock at once; otherwise
  ``queued_write_lock_slowpath()`` queues the writer, which, once at the head, sets
  ``_QW_WAITING`` and waits for the readers inside to drain. The wait queue is FIFO (the
  ``wait_lock`` is itself a queued spinlock). When the lock frees, the head of the queue gets
  it; a reader at the head passes ``wait_lock`` on as soon as it enters, so every reader
  directly behind it enters with it, up to the next writer. *Not modelled*: readers in
  interrupt context, which ``queued_read_lock_slowpath()`` lets in past a waiting writer
  without queueing.
- :class:`SpinLock`, ``spinlock_t`` as a queued spinlock (kernel/locking/qspinlock.c,
  ``queued_spin_lock_slowpath()``): waiters queue FIFO (the pending bit, then the MCS queue).
  It shares :class:`Mutex`'s FIFO hand-off; the difference is accounting.

``spins`` tells the engine how a waiter spends its wait: ``True`` (SpinLock, RWLock, as
``rwlock_t`` waiters spin) means busy on its CPU, ``False`` (Mutex) means asleep.

Acquiring returns a :class:`simpy.Event` to ``yield``; it is already triggered when the lock is
free, and its value is the time waited (0 then). The ``try_acquire*`` variants (the kernel's
``mutex_trylock``, ``read_trylock``, ``write_trylock``) take a free lock without creating an
event and otherwise change nothing, so ``if not lock.try_acquire(o): yield lock.acquire(o)``
behaves as ``yield lock.acquire(o)`` and costs no SimPy event when the lock is free.

Statistics (:class:`LockStats`) count an acquisition when it is granted and a hold when it is
released, so a hold still open at the end of a run is not in ``hold_ns``. Times are
``env.now`` differences: with integer timeouts (the engine's integer nanoseconds) every
statistic is an exact int.

A waiter keeps its place in the queue whatever happens to its process, as a spinning waiter
that takes an IPI stays queued in the kernel: if the engine interrupts a process while it
waits (``simpy.Interrupt``), the process must ``yield`` the same event again; if the lock was
granted meanwhile, the event is already processed and the process resumes at once. The grant
time, and so the wait, is when the lock was handed over, not when the process resumed.

Recording: given ``recorder=``, a lock records on the owner's track each wait longer than 0
(``"wait <name>"``, category ``lock_wait``) and each hold (``"hold <name>"``, ``lock_hold``),
with ``{"lock": name}`` as arguments (and ``"mode": "read" | "write"`` for an RWLock).

Misuse is a programming error and raises ``RuntimeError`` without changing the lock: releasing
a lock the owner does not hold (in that mode), or acquiring a lock the owner already holds or
waits for (the kernel would deadlock). ``owner`` must be a ``str`` (``TypeError``) and
``count`` an int >= 1 (``TypeError``/``ValueError``).

Batches: ``count=n`` on an acquisition says the grant stands for ``n`` back-to-back
acquisitions by the same owner with nobody else in between (the engine's range batches, e.g.
one vCPU faulting through a run of pages under ``mmu_lock``). Only the first of them can wait,
so ``acquisitions`` grows by ``n`` while the wait statistics see one acquisition; the hold is
the batch's one interval, the sum of the ``n`` holds.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import simpy

from pkvm._core import LockState, LockStatsState, hold_union_add

from .recorder import CAT_LOCK_HOLD, CAT_LOCK_WAIT, Recorder
from .stats import Distribution

__all__ = ["LockStats", "Mutex", "RWLock", "SpinLock"]

_READ = "read"
_WRITE = "write"


def _check_args(owner: object, count: object) -> None:
    """Validate an acquisition's arguments (cheap for the common ``str``, ``1``)."""
    if type(owner) is not str and not isinstance(owner, str):
        raise TypeError(f"owner must be a str, got {type(owner).__name__}: {owner!r}")
    if count == 1 and type(count) is int:
        return
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, got {type(count).__name__}: {count!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")


# How many intervals an RWLock's hold_union keeps before it prunes (RWLock._prune_union).
_UNION_KEEP = 64


def _check_owner(owner: object) -> None:
    if type(owner) is not str and not isinstance(owner, str):
        raise TypeError(f"owner must be a str, got {type(owner).__name__}: {owner!r}")


class LockStats(LockStatsState):
    """Hold and wait statistics of one lock.

    - ``hold_ns``: time the lock was held (for an RWLock, in any mode: the length of the union
      of the hold intervals);
    - ``hold_write_ns``, ``hold_read_ns`` (RWLock only): write holds, and read holds summed per
      holder (two readers together for 1 ms add 2 ms);
    - ``wait_ns``: the sum over acquisitions of the time from request to grant;
    - ``waits``: acquisitions that waited more than 0;
    - ``acquisitions``: acquisitions granted (a batch of ``count=n`` counts ``n``);
    - ``wait_p50_ns``, ``wait_p99_ns``, ``wait_max_ns``: the distribution of the waits over
      the acquisitions that waited (nearest rank, see :mod:`pkvm.sim.stats`); 0 if none did.
    """

    __slots__ = ()  # the fields are the typed core's LockStatsState (the timeline's hooks update them)

    def __init__(self, rw: bool = False) -> None:
        self.hold_ns: float = 0
        self.hold_write_ns: float = 0
        self.hold_read_ns: float = 0
        self.wait_ns: float = 0
        self.waits = 0
        self.acquisitions = 0
        self.wait_distribution = Distribution()
        self._rw = rw

    def _granted(self, wait: Any, count: int) -> None:
        self.acquisitions += count
        if wait:  # never negative: a grant comes at or after its request
            self.wait_ns += wait
            self.waits += 1
            self.wait_distribution._add(wait, 1)

    @property
    def wait_p50_ns(self) -> Any:
        """Median wait of the acquisitions that waited; 0 if none did."""
        return self.wait_distribution.p50

    @property
    def wait_p99_ns(self) -> Any:
        """99th-percentile wait of the acquisitions that waited; 0 if none did."""
        return self.wait_distribution.p99

    @property
    def wait_max_ns(self) -> Any:
        """Longest wait; 0 if none."""
        return self.wait_distribution.max

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a dict: the keys listed in the class docstring, in that order
        (``hold_write_ns``/``hold_read_ns`` only for an RWLock)."""
        d = {"hold_ns": self.hold_ns}
        if self._rw:
            d["hold_write_ns"] = self.hold_write_ns
            d["hold_read_ns"] = self.hold_read_ns
        d.update(wait_ns=self.wait_ns, waits=self.waits, acquisitions=self.acquisitions,
                 wait_p50_ns=self.wait_p50_ns, wait_p99_ns=self.wait_p99_ns,
                 wait_max_ns=self.wait_max_ns)
        return d

    def __repr__(self) -> str:
        return f"LockStats({self.as_dict()!r})"


class _Lock(LockState):
    """What every lock shares: the environment, the name, stats and the optional recorder."""

    spins = False
    stats: LockStats

    def __init__(self, env: simpy.Environment, name: str, *, recorder: Recorder | None = None) -> None:
        if not isinstance(env, simpy.Environment):
            raise TypeError(f"env must be a simpy.Environment, got {type(env).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
        if recorder is not None and not isinstance(recorder, Recorder):
            raise TypeError(f"recorder must be a pkvm.sim.recorder.Recorder or None, "
                            f"got {type(recorder).__name__}")
        self.env = env
        self.name = name
        self.recorder = recorder
        self._queue: deque[tuple[str, str, Any, Any, int]] = deque()  # (mode, owner, event, requested_at, count)
        self._queued: set[str] = set()  # the owners in _queue, for an O(1) misuse check
        # Recorded slices share one args dict per mode (a recorder keeps args by reference).
        self._rec_args: dict[str, dict[str, Any]] = {_WRITE: {"lock": name}}

    @property
    def waiting(self) -> tuple[str, ...]:
        """Owners queued for the lock, head first."""
        return tuple(w[1] for w in self._queue)

    def _enqueue(self, mode: str, owner: str, count: int) -> simpy.Event:
        event = self.env.event()
        self._queue.append((mode, owner, event, self.env.now, count))
        self._queued.add(owner)
        return event

    def _grant_now(self, count: int) -> simpy.Event:
        self.stats._granted(0, count)
        return self.env.event().succeed(0)

    def _grant_head(self) -> tuple[str, str, Any, Any, int]:
        """Pop the head of the queue and grant it: stats, recording, wake its process."""
        waiter = self._queue.popleft()
        mode, owner, event, requested_at, count = waiter
        self._queued.discard(owner)
        now = self.env.now
        wait = now - requested_at
        self.stats._granted(wait, count)
        if wait > 0 and self.recorder is not None:
            self.recorder.slice(owner, f"wait {self.name}", requested_at, now, CAT_LOCK_WAIT,
                                self._rec_args[mode])
        event.succeed(wait)
        return waiter

    def _record_hold(self, owner: str, mode: str, start: Any) -> None:
        """Record a hold; callers check ``self.recorder is not None`` first (hot path)."""
        assert self.recorder is not None
        self.recorder.slice(owner, f"hold {self.name}", start, self.env.now, CAT_LOCK_HOLD,
                            self._rec_args[mode])

    def _refuse_if_queued(self, owner: str) -> None:
        if owner in self._queued:
            raise RuntimeError(f"{self.name}: {owner!r} is already waiting for the lock; "
                               "a second acquisition would deadlock")


class Mutex(_Lock):
    """``struct mutex``: one holder, sleeping waiters, FIFO hand-off (see the module docstring).

    >>> env = simpy.Environment()
    >>> m = Mutex(env, "slots_lock")
    >>> def actor(name, hold):
    ...     yield m.acquire(name)
    ...     yield env.timeout(hold)
    ...     m.release(name)
    >>> _ = env.process(actor("a", 5)), env.process(actor("b", 3))
    >>> env.run()
    >>> m.stats.as_dict()
    {'hold_ns': 8, 'wait_ns': 5, 'waits': 1, 'acquisitions': 2, 'wait_p50_ns': 5, 'wait_p99_ns': 5, 'wait_max_ns': 5}
    """

    spins = False

    def __init__(self, env: simpy.Environment, name: str, *, recorder: Recorder | None = None) -> None:
        super().__init__(env, name, recorder=recorder)
        self.stats = LockStats()
        self._holder: str | None = None
        self._held_since: float = 0
        #: Whether the lock is held (kept with the holder: the timeline reads it on every
        #: acquisition, and an attribute costs less than a property).
        self.locked = False

    @property
    def holder(self) -> str | None:
        """The owner holding the lock, or None."""
        return self._holder

    def acquire(self, owner: str, count: int = 1) -> simpy.Event:
        """Request the lock for ``owner`` (``mutex_lock``); ``yield`` the event until granted.

        The event is already triggered if the lock is free and nobody waits; its value is the
        time waited. ``count=n`` stands for ``n`` back-to-back acquisitions (module docstring).

        Raises:
            TypeError, ValueError: bad ``owner`` or ``count``.
            RuntimeError: ``owner`` already holds or waits for the lock.
        """
        if self._free_for(owner, count):
            return self._grant_now(count)
        return self._enqueue(_WRITE, owner, count)

    def try_acquire(self, owner: str, count: int = 1) -> bool:
        """Take the lock at once if it is free and nobody waits (``mutex_trylock``).

        Returns True if ``owner`` now holds it (an acquisition with no wait); False, with
        nothing changed and nothing queued, otherwise. ``if not m.try_acquire(o): yield
        m.acquire(o)`` is equivalent to ``yield m.acquire(o)``, without an event when the lock
        is free.

        Raises:
            as :meth:`acquire`.
        """
        if self._free_for(owner, count):
            self.stats._granted(0, count)
            return True
        return False

    def _free_for(self, owner: str, count: int) -> bool:
        """Validate; if the lock is free and nobody waits, make ``owner`` the holder."""
        _check_args(owner, count)
        holder = self._holder
        if holder is None:
            if not self._queue:
                self._holder = owner
                self.locked = True
                self._held_since = self.env.now
                return True
            self._refuse_if_queued(owner)
            return False
        if holder == owner:
            raise RuntimeError(f"{self.name}: {owner!r} already holds the lock; "
                               "a recursive acquisition would deadlock")
        self._refuse_if_queued(owner)
        return False

    def release(self, owner: str) -> None:
        """Release the lock held by ``owner`` (``mutex_unlock``); the first waiter gets it now.

        Raises:
            TypeError: ``owner`` is not a str.
            RuntimeError: ``owner`` does not hold the lock.
        """
        if self._holder != owner:
            _check_owner(owner)
            raise RuntimeError(f"{self.name}: {owner!r} releases a lock it does not hold "
                               f"(holder: {self._holder!r})")
        now = self.env.now
        self.stats.hold_ns += now - self._held_since
        if self.recorder is not None:
            self._record_hold(owner, _WRITE, self._held_since)
        if self._queue:
            self._holder = self._grant_head()[1]
            self._held_since = now
        else:
            self._holder = None
            self.locked = False


class SpinLock(Mutex):
    """``spinlock_t`` (a queued spinlock): FIFO like :class:`Mutex`, but waiters spin.

    ``spins`` is True: a waiter keeps its CPU busy, so the engine accounts its wait as
    busy-spinning rather than sleep.
    """

    spins = True


class RWLock(_Lock):
    """``rwlock_t`` as the kernel's queued rwlock: shared readers, exclusive writers, fair FIFO.

    See the module docstring for the rules and their kernel sources. Waiters spin (``spins``).

    >>> env = simpy.Environment()
    >>> mmu_lock = RWLock(env, "mmu_lock")
    >>> order = []
    >>> def actor(name, mode, start, hold):
    ...     yield env.timeout(start)
    ...     acquire = mmu_lock.acquire_read if mode == "r" else mmu_lock.acquire_write
    ...     yield acquire(name)
    ...     order.append((env.now, name))
    ...     yield env.timeout(hold)
    ...     (mmu_lock.release_read if mode == "r" else mmu_lock.release_write)(name)
    >>> for args in [("r1", "r", 0, 10), ("w", "w", 1, 5), ("r2", "r", 2, 1), ("r3", "r", 3, 1)]:
    ...     _ = env.process(actor(*args))
    >>> env.run()
    >>> order   # r2 and r3 queue behind the waiting writer, then enter together
    [(0, 'r1'), (10, 'w'), (15, 'r2'), (15, 'r3')]
    """

    spins = True

    def __init__(self, env: simpy.Environment, name: str, *, recorder: Recorder | None = None) -> None:
        super().__init__(env, name, recorder=recorder)
        self.stats = LockStats(rw=True)
        self._rec_args = {m: {"lock": name, "mode": m} for m in (_READ, _WRITE)}
        self._writer: str | None = None
        self._write_since: float = 0
        self._readers: dict[str, float] = {}  # owner -> time its read hold began
        # hold_ns's holds, as a union (LockState.hold_union): each release adds its hold's part
        # that none counted yet covers, also the timeline's holds taken uncontended
        self.hold_union = []
        self.union_prune_at = _UNION_KEEP
        #: Whether the lock is held in either mode (kept with the holders, as Mutex.locked).
        self.locked = False

    @property
    def writer(self) -> str | None:
        """The owner holding the lock for write, or None."""
        return self._writer

    @property
    def readers(self) -> tuple[str, ...]:
        """The owners holding the lock for read, in the order they entered."""
        return tuple(self._readers)

    @property
    def queue(self) -> tuple[tuple[str, str], ...]:
        """``(owner, "read" | "write")`` for each queued request, head first."""
        return tuple((w[1], w[0]) for w in self._queue)

    def acquire_read(self, owner: str, count: int = 1) -> simpy.Event:
        """Request the lock for read (``read_lock``); ``yield`` the event.

        Granted at once if no writer holds the lock and nobody is queued (the fast path of
        ``queued_read_lock()``); otherwise queued FIFO, behind any queued writer.

        Raises:
            TypeError, ValueError: bad ``owner`` or ``count``.
            RuntimeError: ``owner`` already holds or waits for the lock.
        """
        if self._read_free_for(owner, count):
            return self._grant_now(count)
        return self._enqueue(_READ, owner, count)

    def acquire_write(self, owner: str, count: int = 1) -> simpy.Event:
        """Request the lock for write (``write_lock``); ``yield`` the event.

        Granted at once if the lock is free and nobody is queued (``queued_write_lock()``'s
        fast path); otherwise queued FIFO.

        Raises:
            TypeError, ValueError: bad ``owner`` or ``count``.
            RuntimeError: ``owner`` already holds or waits for the lock.
        """
        if self._write_free_for(owner, count):
            return self._grant_now(count)
        return self._enqueue(_WRITE, owner, count)

    def try_acquire_read(self, owner: str, count: int = 1) -> bool:
        """Take the lock for read at once if no writer holds or waits (``read_trylock``).

        Returns True if ``owner`` now holds it for read; False, with nothing changed and
        nothing queued, otherwise. ``if not rw.try_acquire_read(o): yield
        rw.acquire_read(o)`` is equivalent to ``yield rw.acquire_read(o)``.

        Raises:
            as :meth:`acquire_read`.
        """
        if self._read_free_for(owner, count):
            self.stats._granted(0, count)
            return True
        return False

    def try_acquire_write(self, owner: str, count: int = 1) -> bool:
        """Take the lock for write at once if it is free (``write_trylock``).

        Returns True if ``owner`` now holds it for write; False, with nothing changed and
        nothing queued, otherwise.

        Raises:
            as :meth:`acquire_write`.
        """
        if self._write_free_for(owner, count):
            self.stats._granted(0, count)
            return True
        return False

    def release_read(self, owner: str) -> None:
        """Release ``owner``'s read hold; if it was the last reader, the queue's head enters.

        Raises:
            TypeError: ``owner`` is not a str.
            RuntimeError: ``owner`` does not hold the lock for read.
        """
        readers = self._readers
        if owner not in readers:
            _check_owner(owner)
            raise RuntimeError(f"{self.name}: {owner!r} releases a read hold it does not have "
                               f"(readers: {list(readers)!r}, writer: {self._writer!r})")
        start = readers.pop(owner)
        self.stats.hold_read_ns += self.env.now - start
        self._hold_end(start)
        if self.recorder is not None:
            self._record_hold(owner, _READ, start)
        if not readers:
            self._freed()
            self.locked = self._writer is not None or bool(readers)

    def release_write(self, owner: str) -> None:
        """Release ``owner``'s write hold; the queue's head (and the readers behind it) enter.

        Raises:
            TypeError: ``owner`` is not a str.
            RuntimeError: ``owner`` does not hold the lock for write.
        """
        if self._writer != owner:
            _check_owner(owner)
            raise RuntimeError(f"{self.name}: {owner!r} releases a write hold it does not have "
                               f"(writer: {self._writer!r}, readers: {list(self._readers)!r})")
        self.stats.hold_write_ns += self.env.now - self._write_since
        self._hold_end(self._write_since)
        if self.recorder is not None:
            self._record_hold(owner, _WRITE, self._write_since)
        self._writer = None
        self._freed()
        self.locked = self._writer is not None or bool(self._readers)

    # ------------------------------------------------------------ internals

    def _check_acquire(self, owner: str, count: int) -> None:
        _check_args(owner, count)
        if owner == self._writer or owner in self._readers:
            raise RuntimeError(f"{self.name}: {owner!r} already holds the lock; "
                               "a recursive acquisition would deadlock")
        self._refuse_if_queued(owner)

    def _read_free_for(self, owner: str, count: int) -> bool:
        """Validate; if a reader may enter now, make ``owner`` one."""
        readers = self._readers
        if (type(owner) is not str or type(count) is not int or count != 1
                or owner in readers or owner == self._writer or owner in self._queued):
            self._check_acquire(owner, count)  # raises, unless only the count is unusual
        if self._writer is None and not self._queue:
            now = self.env.now
            readers[owner] = now
            self.locked = True
            return True
        return False

    def _write_free_for(self, owner: str, count: int) -> bool:
        """Validate; if the lock is free and nobody waits, make ``owner`` the writer."""
        if (type(owner) is not str or type(count) is not int or count != 1
                or owner in self._readers or owner == self._writer or owner in self._queued):
            self._check_acquire(owner, count)  # raises, unless only the count is unusual
        if self._writer is None and not self._readers and not self._queue:
            self._writer = owner
            self.locked = True
            self._write_since = self.env.now
            return True
        return False

    def _hold_end(self, start: float) -> None:
        """A hold from ``start`` ends now: ``hold_ns`` counts the part of it no hold counted
        before covers (readers share; a timeline's hold taken uncontended on its holder's
        clock, ahead of SimPy's, may overlap one this lock granted meanwhile)."""
        fr = self.hold_union
        assert fr is not None  # (an RWLock's is a list; LockState's type allows None)
        self.stats.hold_ns += hold_union_add(fr, start, self.env.now)
        if len(fr) > self.union_prune_at:
            self._prune_union()

    def _prune_union(self) -> None:
        """Drop the intervals of ``hold_union`` that no hold yet to be counted can reach:
        those that end by SimPy's time and by the start of every hold this lock has
        granted and not yet released (a hold not yet granted, or one a timeline takes
        uncontended, starts at SimPy's time or later: on its holder's clock, which runs at
        or ahead of SimPy's). Keeps the list short in a long run, whose holds rarely
        overlap; a prune that can drop little is not repeated until the list has doubled."""
        fr = self.hold_union
        assert fr is not None
        floor = self.env.now
        for s in self._readers.values():
            if s < floor:
                floor = s
        if self._writer is not None and self._write_since < floor:
            floor = self._write_since
        k = 0
        n = len(fr)
        while k < n and fr[k][1] <= floor:
            k += 1
        if k:
            del fr[:k]
        self.union_prune_at = max(_UNION_KEEP, 2 * len(fr))

    def _freed(self) -> None:
        """The lock just became free: hand it to the head of the queue, as the kernel does."""
        queue = self._queue
        if not queue:
            return
        now = self.env.now
        if queue[0][0] == _WRITE:
            self._writer = self._grant_head()[1]
            self._write_since = now
            return
        while queue and queue[0][0] == _READ:
            # Enter before waking, so the readers dict is complete when the first one runs.
            self._readers[queue[0][1]] = now
            self._grant_head()
