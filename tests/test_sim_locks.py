"""pkvm.sim.locks: the kernel's mutex, queued rwlock and queued spinlock on SimPy, and their stats."""

import math

import pytest
import simpy
from hypothesis import given
from hypothesis import strategies as st

from pkvm.sim.locks import LockStats, Mutex, RWLock, SpinLock
from pkvm.sim.recorder import CAT_LOCK_HOLD, CAT_LOCK_WAIT, Recorder

MUTEX_KEYS = ["hold_ns", "wait_ns", "waits", "acquisitions", "wait_p50_ns", "wait_p99_ns",
              "wait_max_ns"]
RW_KEYS = ["hold_ns", "hold_write_ns", "hold_read_ns", "wait_ns", "waits", "acquisitions",
           "wait_p50_ns", "wait_p99_ns", "wait_max_ns"]


@pytest.fixture
def env():
    return simpy.Environment()


def _acquire(lock, mode, owner, count=1):
    if isinstance(lock, RWLock):
        return (lock.acquire_read if mode == "r" else lock.acquire_write)(owner, count)
    return lock.acquire(owner, count)


def _try_acquire(lock, mode, owner):
    if isinstance(lock, RWLock):
        return (lock.try_acquire_read if mode == "r" else lock.try_acquire_write)(owner)
    return lock.try_acquire(owner)


def _release(lock, mode, owner):
    if isinstance(lock, RWLock):
        (lock.release_read if mode == "r" else lock.release_write)(owner)
    else:
        lock.release(owner)


def actor(env, lock, log, owner, start, mode, hold):
    """Wait ``start``, take ``lock`` in ``mode``, hold it ``hold``; log (owner, granted, released)."""
    yield env.timeout(start)
    yield _acquire(lock, mode, owner)
    granted = env.now
    yield env.timeout(hold)
    _release(lock, mode, owner)
    log.append((owner, granted, env.now))


def entered(log):
    """{owner: time it got the lock}."""
    return {owner: granted for owner, granted, _ in log}


# ------------------------------------------------------------------ kinds and accounting flag


def test_spins_says_how_a_waiter_waits(env):
    """A mutex waiter sleeps; spinlock and rwlock (rwlock_t) waiters spin on their CPU."""
    assert Mutex(env, "m").spins is False
    assert SpinLock(env, "s").spins is True
    assert RWLock(env, "rw").spins is True


# ------------------------------------------------------------------ Mutex / SpinLock


@pytest.mark.parametrize("cls", [Mutex, SpinLock])
def test_uncontended_lock_has_no_waits(env, cls):
    """One owner taking a free lock three times: no waits, holds summed exactly."""
    lock = cls(env, "slots_lock")
    log = []

    def proc():
        for hold in (3, 5, 7):
            wait = yield lock.acquire("vmm")
            assert wait == 0
            yield env.timeout(hold)
            lock.release("vmm")
            log.append(hold)
            yield env.timeout(100)

    env.process(proc())
    env.run()
    assert lock.stats.as_dict() == {"hold_ns": 15, "wait_ns": 0, "waits": 0, "acquisitions": 3,
                                    "wait_p50_ns": 0, "wait_p99_ns": 0, "wait_max_ns": 0}
    assert list(lock.stats.as_dict()) == MUTEX_KEYS
    assert not lock.locked and lock.holder is None


def test_acquire_of_a_free_lock_is_already_triggered(env):
    """The event for a free lock is triggered on return, with value 0."""
    m = Mutex(env, "m")
    ev = m.acquire("a")
    assert ev.triggered and ev.value == 0
    assert m.holder == "a"
    ev2 = m.acquire("b")
    assert not ev2.triggered
    assert m.waiting == ("b",)


@pytest.mark.parametrize("cls", [Mutex, SpinLock])
def test_mutex_is_fifo(env, cls):
    """Waiters get the lock in the order they asked, each at the previous holder's release."""
    lock = cls(env, "m")
    log = []
    # "a" holds [0, 10); the others arrive in the order d, b, e, c while it is held.
    env.process(actor(env, lock, log, "a", 0, "w", 10))
    for owner, start in [("d", 1), ("b", 2), ("e", 3), ("c", 4)]:
        env.process(actor(env, lock, log, owner, start, "w", 2))
    env.run()
    assert [o for o, _, _ in log] == ["a", "d", "b", "e", "c"]
    assert entered(log) == {"a": 0, "d": 10, "b": 12, "e": 14, "c": 16}
    s = lock.stats
    assert s.waits == 4 and s.acquisitions == 5
    assert s.wait_ns == (10 - 1) + (12 - 2) + (14 - 3) + (16 - 4)
    assert s.hold_ns == 10 + 4 * 2
    # waits 9, 10, 11, 12: nearest-rank median is the 2nd smallest, p99 the 4th
    assert (s.wait_p50_ns, s.wait_p99_ns, s.wait_max_ns) == (10, 12, 12)


def test_same_instant_requests_keep_their_order(env):
    """Requests made at the same modelled time are served in the order they were made."""
    m = Mutex(env, "m")
    log = []
    for owner in ["v3", "v1", "v2", "v0"]:
        env.process(actor(env, m, log, owner, 0, "w", 1))
    env.run()
    assert [o for o, _, _ in log] == ["v3", "v1", "v2", "v0"]
    assert entered(log) == {"v3": 0, "v1": 1, "v2": 2, "v0": 3}


def test_release_by_a_non_holder_raises_and_changes_nothing(env):
    """Releasing a mutex one does not hold is refused; holder, queue and stats stay."""
    m = Mutex(env, "slots_lock")
    m.acquire("a")
    m.acquire("b")
    before = m.stats.as_dict()
    with pytest.raises(RuntimeError, match=r"slots_lock: 'b' releases a lock it does not hold"):
        m.release("b")
    with pytest.raises(RuntimeError, match=r"'c' releases a lock it does not hold"):
        m.release("c")
    assert m.holder == "a" and m.waiting == ("b",) and m.stats.as_dict() == before
    m.release("a")
    assert m.holder == "b" and m.waiting == ()
    m.release("b")
    with pytest.raises(RuntimeError, match=r"holder: None"):
        m.release("b")


def test_recursive_or_double_acquire_raises(env):
    """Taking a mutex twice (held or already waiting) would deadlock the kernel: refused."""
    m = Mutex(env, "m")
    m.acquire("a")
    with pytest.raises(RuntimeError, match=r"'a' already holds the lock"):
        m.acquire("a")
    m.acquire("b")
    with pytest.raises(RuntimeError, match=r"'b' is already waiting"):
        m.acquire("b")
    assert m.waiting == ("b",) and m.stats.acquisitions == 1


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [({"owner": 3}, TypeError, r"owner must be a str, got int: 3"),
     ({"owner": "a", "count": 0}, ValueError, r"count must be >= 1, got 0"),
     ({"owner": "a", "count": 1.5}, TypeError, r"count must be an int, got float"),
     ({"owner": "a", "count": True}, TypeError, r"count must be an int, got bool")],
    ids=["owner-int", "count-0", "count-float", "count-bool"])
def test_bad_acquire_arguments_are_refused(env, kwargs, exc, match):
    """Bad owner/count: TypeError or ValueError, and the lock is untouched."""
    for lock in (Mutex(env, "m"), RWLock(env, "rw")):
        acquire = lock.acquire if isinstance(lock, Mutex) else lock.acquire_write
        with pytest.raises(exc, match=match):
            acquire(**kwargs)
        assert not lock.locked and lock.stats.acquisitions == 0


def test_bad_constructor_arguments(env):
    """A lock needs a simpy.Environment and a str name."""
    with pytest.raises(TypeError, match=r"env must be a simpy.Environment, got int"):
        Mutex(0, "m")
    with pytest.raises(TypeError, match=r"name must be a str, got NoneType"):
        RWLock(env, None)


def test_batch_counts_acquisitions_but_one_wait(env):
    """count=n: n acquisitions, one possible wait, one hold interval."""
    m = Mutex(env, "m")
    log = []
    env.process(actor(env, m, log, "a", 0, "w", 10))

    def batch():
        yield env.timeout(4)
        wait = yield m.acquire("vcpu0", count=512)
        assert wait == 6
        yield env.timeout(512 * 3)
        m.release("vcpu0")

    env.process(batch())
    env.run()
    assert m.stats.as_dict() == {"hold_ns": 10 + 1536, "wait_ns": 6, "waits": 1,
                                 "acquisitions": 513, "wait_p50_ns": 6, "wait_p99_ns": 6,
                                 "wait_max_ns": 6}


# ------------------------------------------------------------------ RWLock (qrwlock)


def test_readers_share(env):
    """Readers on a free lock all enter at once; a writer waits for the last to leave."""
    rw = RWLock(env, "mmu_lock")
    log = []
    for i, hold in enumerate([5, 9, 7]):
        env.process(actor(env, rw, log, f"r{i}", 0, "r", hold))
    env.process(actor(env, rw, log, "w", 1, "w", 2))
    env.run()
    assert entered(log) == {"r0": 0, "r1": 0, "r2": 0, "w": 9}
    s = rw.stats
    assert (s.hold_ns, s.hold_read_ns, s.hold_write_ns) == (11, 21, 2)
    assert (s.waits, s.wait_ns, s.acquisitions) == (1, 8, 4)
    assert list(s.as_dict()) == RW_KEYS


def test_waiting_writer_blocks_a_later_reader(env):
    """qrwlock fairness: once a writer waits, a newly arriving reader queues behind it."""
    rw = RWLock(env, "mmu_lock")
    log = []
    env.process(actor(env, rw, log, "r1", 0, "r", 10))
    env.process(actor(env, rw, log, "w", 2, "w", 5))
    env.process(actor(env, rw, log, "r2", 4, "r", 1))

    def probe():
        yield env.timeout(4)
        yield env.timeout(0)  # after r2's request at t=4
        assert rw.readers == ("r1",) and rw.waiting == ("w", "r2")

    env.process(probe())
    env.run()
    # Without the fairness r2 would have entered at 4, beside r1.
    assert entered(log) == {"r1": 0, "w": 10, "r2": 15}


def test_reader_joins_readers_when_no_writer_waits(env):
    """Fast path: with only readers inside and nobody queued, a reader enters at once."""
    rw = RWLock(env, "mmu_lock")
    log = []
    env.process(actor(env, rw, log, "r1", 0, "r", 10))
    env.process(actor(env, rw, log, "r2", 3, "r", 10))
    env.run()
    assert entered(log) == {"r1": 0, "r2": 3}
    assert rw.stats.waits == 0
    assert (rw.stats.hold_ns, rw.stats.hold_read_ns) == (13, 20)


def test_readers_queued_behind_a_writer_enter_together(env):
    """Three readers queued behind a writer all enter when it releases."""
    rw = RWLock(env, "mmu_lock")
    log = []
    env.process(actor(env, rw, log, "w", 0, "w", 10))
    for i, (start, hold) in enumerate([(1, 4), (2, 6), (3, 5)]):
        env.process(actor(env, rw, log, f"r{i}", start, "r", hold))
    env.run()
    assert entered(log) == {"w": 0, "r0": 10, "r1": 10, "r2": 10}
    s = rw.stats
    assert s.wait_ns == 9 + 8 + 7 and s.waits == 3
    assert (s.hold_ns, s.hold_write_ns, s.hold_read_ns) == (16, 10, 15)
    assert (s.wait_p50_ns, s.wait_p99_ns, s.wait_max_ns) == (8, 9, 9)


def test_reader_batch_stops_at_the_next_writer(env):
    """Queue R R W R after a writer: the first two readers enter together, then W, then R."""
    rw = RWLock(env, "mmu_lock")
    log = []
    env.process(actor(env, rw, log, "w0", 0, "w", 10))
    env.process(actor(env, rw, log, "ra", 1, "r", 4))
    env.process(actor(env, rw, log, "rb", 2, "r", 6))
    env.process(actor(env, rw, log, "w1", 3, "w", 3))
    env.process(actor(env, rw, log, "rc", 4, "r", 2))
    env.run()
    assert entered(log) == {"w0": 0, "ra": 10, "rb": 10, "w1": 16, "rc": 19}
    assert rw.stats.hold_ns == 21 and rw.stats.hold_write_ns == 13


def test_writer_takes_a_free_lock_and_excludes_readers(env):
    """A writer on a free lock enters at once; readers and writers wait for it, FIFO."""
    rw = RWLock(env, "mmu_lock")
    log = []
    env.process(actor(env, rw, log, "w0", 0, "w", 5))
    env.process(actor(env, rw, log, "w1", 1, "w", 5))
    env.process(actor(env, rw, log, "r0", 2, "r", 5))
    env.run()
    assert entered(log) == {"w0": 0, "w1": 5, "r0": 10}


def test_rwlock_misuse_is_refused(env):
    """Wrong-mode or foreign releases and recursive acquisitions raise RuntimeError."""
    rw = RWLock(env, "mmu_lock")
    rw.acquire_read("r")
    rw.acquire_write("w")
    before = rw.stats.as_dict()
    with pytest.raises(RuntimeError, match=r"mmu_lock: 'r' releases a write hold it does not have"):
        rw.release_write("r")
    with pytest.raises(RuntimeError, match=r"'w' releases a read hold it does not have"):
        rw.release_read("w")
    with pytest.raises(RuntimeError, match=r"'r' already holds the lock"):
        rw.acquire_read("r")
    with pytest.raises(RuntimeError, match=r"'w' is already waiting"):
        rw.acquire_read("w")
    assert rw.readers == ("r",) and rw.writer is None and rw.waiting == ("w",)
    assert rw.stats.as_dict() == before
    rw.release_read("r")
    assert rw.writer == "w" and rw.readers == ()


def test_interrupted_waiter_keeps_its_place(env):
    """A waiter interrupted (an IPI) stays queued; re-yielding the event gets the lock in turn."""
    m = SpinLock(env, "kvm->mmu_lock")
    got = {}

    def holder():
        yield m.acquire("vcpu0")
        yield env.timeout(10)
        m.release("vcpu0")

    def waiter():
        yield env.timeout(1)
        ev = m.acquire("vcpu1")
        try:
            yield ev
        except simpy.Interrupt:
            yield env.timeout(20)  # the IPI handler runs past the hand-off at t=10
            got["resumed"] = env.now
            got["wait"] = yield ev  # already processed: resumes at once
        got["at"] = env.now
        m.release("vcpu1")

    def late():
        yield env.timeout(2)
        yield m.acquire("vcpu2")
        got["vcpu2"] = env.now
        m.release("vcpu2")

    env.process(holder())
    w = env.process(waiter())
    env.process(late())

    def ipi():
        yield env.timeout(5)
        w.interrupt("tlb shootdown")

    env.process(ipi())
    env.run()
    assert got == {"resumed": 25, "wait": 9, "at": 25, "vcpu2": 25}
    assert m.stats.wait_ns == 9 + 23 and m.stats.hold_ns == 10 + 15


# ------------------------------------------------------------------ trylock


def test_mutex_try_acquire(env):
    """try_acquire takes a free mutex (no wait); on a held one it fails and queues nothing."""
    m = Mutex(env, "m")
    assert m.try_acquire("a") is True and m.holder == "a"
    assert m.try_acquire("b") is False
    assert m.waiting == () and m.stats.acquisitions == 1
    with pytest.raises(RuntimeError, match=r"'a' already holds the lock"):
        m.try_acquire("a")
    m.acquire("b")
    m.release("a")
    assert m.try_acquire("c") is False  # b holds it now
    m.release("b")
    assert m.try_acquire("c", count=3) is True
    assert m.stats.acquisitions == 1 + 1 + 3 and m.stats.waits == 0


def test_rwlock_try_acquire_respects_fairness(env):
    """read_trylock joins readers, but not past a waiting writer; write_trylock needs a free lock."""
    rw = RWLock(env, "mmu_lock")
    assert rw.try_acquire_read("r1") and rw.try_acquire_read("r2")
    assert rw.try_acquire_write("w") is False and rw.queue == ()
    rw.acquire_write("w")
    assert rw.try_acquire_read("r3") is False  # a writer waits: r3 may not overtake it
    assert rw.queue == (("w", "write"),) and rw.readers == ("r1", "r2")
    rw.release_read("r1")
    rw.release_read("r2")
    assert rw.writer == "w"
    rw.release_write("w")
    assert rw.try_acquire_write("w2") is True
    assert rw.stats.acquisitions == 4


# ------------------------------------------------------------------ recorder


def test_lock_records_waits_and_holds_on_the_owner_track(env):
    """With a recorder, a lock logs each wait (if > 0) and each hold as slices on the owner's track."""
    rec = Recorder()
    rw = RWLock(env, "mmu_lock", recorder=rec)
    log = []
    env.process(actor(env, rw, log, "vmm", 0, "w", 10))
    env.process(actor(env, rw, log, "vcpu0", 4, "r", 3))
    env.run()
    assert rec.tracks == ("vmm", "vcpu0")
    assert list(rec.iter_slices("vmm")) == [
        ("hold mmu_lock", 0, 10, CAT_LOCK_HOLD, {"lock": "mmu_lock", "mode": "write"})]
    assert list(rec.iter_slices("vcpu0")) == [
        ("wait mmu_lock", 4, 10, CAT_LOCK_WAIT, {"lock": "mmu_lock", "mode": "read"}),
        ("hold mmu_lock", 10, 13, CAT_LOCK_HOLD, {"lock": "mmu_lock", "mode": "read"})]


def test_mutex_records_without_a_mode(env):
    """A mutex records waits and holds too; its slices carry only the lock's name."""
    rec = Recorder()
    m = Mutex(env, "slots_lock", recorder=rec)
    log = []
    env.process(actor(env, m, log, "vmm", 0, "w", 10))
    env.process(actor(env, m, log, "vcpu0", 4, "w", 3))
    env.run()
    assert list(rec.iter_slices("vcpu0")) == [
        ("wait slots_lock", 4, 10, CAT_LOCK_WAIT, {"lock": "slots_lock"}),
        ("hold slots_lock", 10, 13, CAT_LOCK_HOLD, {"lock": "slots_lock"})]
    with pytest.raises(TypeError, match=r"recorder must be a pkvm.sim.recorder.Recorder or None, got list"):
        Mutex(env, "m", recorder=[])


# ------------------------------------------------------------------ properties

OPS = st.lists(st.tuples(st.integers(0, 12), st.sampled_from("rw"), st.integers(0, 12),
                         st.booleans()),
               min_size=1, max_size=4)
SCHEDULES = st.lists(OPS, min_size=1, max_size=5)


def _union_length(intervals):
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0)


def _nearest_rank(values, q):
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered) / 100), 1) - 1]


def _held(lock):
    """Whether ``lock`` is held, from its holders (what ``locked`` must say)."""
    if isinstance(lock, RWLock):
        return lock.writer is not None or bool(lock.readers)
    return lock.holder is not None


def _run_schedule(lock, schedule, exclusive):
    """Run one actor per op list; return per-acquisition records measured by the actors."""
    env = lock.env
    records = []  # (seq, owner, mode, requested, granted, released, wait_value)
    seq = iter(range(10**6))

    def proc(owner, ops):
        for delay, mode, hold, use_try in ops:
            mode = "w" if exclusive else mode
            yield env.timeout(delay)
            requested, n = env.now, next(seq)
            # try-then-acquire must behave exactly as acquire alone
            if use_try and _try_acquire(lock, mode, owner):
                wait = 0
            else:
                wait = yield _acquire(lock, mode, owner)
            granted = env.now
            assert lock.locked is _held(lock)
            yield env.timeout(hold)
            _release(lock, mode, owner)
            assert lock.locked is _held(lock)  # the attribute follows the holders
            # Work conservation: a lock with waiters is never left free, and a reader heads
            # the rwlock's queue only while a writer holds the lock.
            assert lock.locked or not lock.waiting
            if isinstance(lock, RWLock) and lock.queue and lock.queue[0][1] == "read":
                assert lock.writer is not None
            records.append((n, owner, mode, requested, granted, env.now, wait))

    for i, ops in enumerate(schedule):
        env.process(proc(f"a{i}", ops))
    env.run()
    return sorted(records)


def _check_common(stats, records):
    waits = [g - r for _, _, _, r, g, _, _ in records if g > r]
    assert all(w == g - r for _, _, _, r, g, _, w in records)
    assert stats.acquisitions == len(records)
    assert stats.waits == len(waits)
    assert stats.wait_ns == sum(waits)
    assert stats.wait_p50_ns == _nearest_rank(waits, 50)
    assert stats.wait_p99_ns == _nearest_rank(waits, 99)
    assert stats.wait_max_ns == max(waits, default=0)
    # FIFO: in request order, grant times never go back.
    grants = [g for _, _, _, _, g, _, _ in records]
    assert grants == sorted(grants)


@given(SCHEDULES, st.sampled_from([Mutex, SpinLock]))
def test_mutex_stats_match_the_actors_measurements(schedule, cls):
    """Random schedules: exclusion, FIFO, and stats equal to what the actors measured."""
    lock = cls(simpy.Environment(), "m")
    records = _run_schedule(lock, schedule, exclusive=True)
    _check_common(lock.stats, records)
    holds = sorted((g, e) for *_, g, e, _ in records)
    assert all(e1 <= g2 for (_, e1), (g2, _) in zip(holds, holds[1:]))
    assert lock.stats.hold_ns == sum(e - g for g, e in holds)
    assert not lock.locked and lock.waiting == ()


@given(SCHEDULES)
def test_rwlock_stats_match_the_actors_measurements(schedule):
    """Random schedules: writers exclusive, FIFO grants, stats equal the actors' measurements."""
    lock = RWLock(simpy.Environment(), "mmu_lock")
    records = _run_schedule(lock, schedule, exclusive=False)
    _check_common(lock.stats, records)
    writes = [(g, e) for _, _, m, _, g, e, _ in records if m == "w"]
    reads = [(g, e) for _, _, m, _, g, e, _ in records if m == "r"]
    holds = writes + reads
    for i, (g, e) in enumerate(writes):  # nothing overlaps a write hold
        for j, (g2, e2) in enumerate(holds):
            if i != j and e > g and e2 > g2:
                assert e2 <= g or g2 >= e
    assert lock.stats.hold_write_ns == sum(e - g for g, e in writes)
    assert lock.stats.hold_read_ns == sum(e - g for g, e in reads)
    assert lock.stats.hold_ns == _union_length(writes + reads)
    # A reader that waited entered either at a writer's release, or with the readers
    # released from the queue together at a read release.
    releases = {e for *_, e, _ in records}
    assert all(g in releases for _, _, _, r, g, _, _ in records if g > r)
    assert not lock.locked and lock.waiting == ()


def test_lockstats_as_dict_keys():
    """as_dict() carries exactly the documented keys, RW ones only for an RWLock."""
    assert list(LockStats().as_dict()) == MUTEX_KEYS
    assert list(LockStats(rw=True).as_dict()) == RW_KEYS


# ------------------------------------------------------------------ batches, hand-offs and the union


def test_a_waiting_batch_is_one_sample_of_the_wait_distribution(env):
    """A batch (``count=n``) that waited adds its wait once to the wait distribution, not n
    times: its 99 acquisitions after the first cannot wait, so they must not drag p99 down
    to its wait."""
    m = Mutex(env, "m")

    def holder():
        yield m.acquire("a")
        yield env.timeout(10)
        m.release("a")

    def waiter(owner, count, hold):
        yield m.acquire(owner, count)
        yield env.timeout(hold)
        m.release(owner)

    env.process(holder())
    env.process(waiter("batch", 99, 1))  # waits 10, holds 10..11
    env.process(waiter("c", 1, 1))  # waits 11
    env.run()
    s = m.stats
    assert (s.acquisitions, s.waits, s.wait_ns) == (101, 2, 21)
    assert s.wait_distribution.count == 2
    assert (s.wait_p50_ns, s.wait_p99_ns, s.wait_max_ns) == (10, 11, 11)


@pytest.mark.parametrize(("kind", "mode"), [(Mutex, "w"), (SpinLock, "w"), (RWLock, "r"), (RWLock, "w")],
                         ids=["mutex", "spinlock", "rw-read", "rw-write"])
@pytest.mark.parametrize("try_first", [False, True], ids=["acquire", "try_acquire"])
def test_an_uncontended_batch_counts_all_its_acquisitions(env, kind, mode, try_first):
    """``count=n`` on a free lock is granted at once and counts n acquisitions and no wait,
    through the event path as through ``try_acquire*``."""
    lock = kind(env, "l")
    if kind is RWLock:
        acq = lock.acquire_read if mode == "r" else lock.acquire_write
        try_acq = lock.try_acquire_read if mode == "r" else lock.try_acquire_write
    else:
        acq, try_acq = lock.acquire, lock.try_acquire
    if try_first:
        assert try_acq("a", 4) is True
    else:
        ev = acq("a", 4)
        assert ev.triggered and ev.value == 0
    assert lock.locked
    assert (lock.stats.acquisitions, lock.stats.waits, lock.stats.wait_ns) == (4, 0, 0)
    assert lock.waiting == ()


def test_a_hand_off_with_no_wait_records_no_wait_slice(env):
    """A waiter queued at the very time the holder releases is handed the lock with a wait
    of 0: no wait is counted and no ``wait`` slice recorded (only waits longer than 0 are)."""
    rec = Recorder()
    m = Mutex(env, "m", recorder=rec)

    def late():  # created first: at t=5 it asks before the holder releases
        yield env.timeout(5)
        ev = m.acquire("b")
        assert not ev.triggered  # a holds it: queued
        yield ev
        m.release("b")

    def holder():
        yield m.acquire("a")
        yield env.timeout(5)
        m.release("a")

    env.process(late())
    env.process(holder())
    env.run()
    assert (m.stats.acquisitions, m.stats.waits, m.stats.wait_ns, m.stats.wait_max_ns) == (2, 0, 0, 0)
    assert [s[3] for s in rec.iter_slices("b")] == [CAT_LOCK_HOLD]
    assert [(s[0], s[1], s[2]) for s in rec.iter_slices("b")] == [("hold m", 5, 5)]


@given(st.lists(st.integers(0, 40), min_size=0, max_size=12, unique=True),
       st.integers(0, 30), st.integers(0, 30))
def test_rwlock_hold_ns_is_the_union_with_the_timelines_holds(points, start, length):
    """``hold_ns`` is the union of the holds: holds a timeline took and released uncontended
    (in ``hold_union``, counted in ``hold_ns`` already) that overlap a reader this lock lets
    in are counted once. The reference: the length of the union of the intervals."""
    points = sorted(points)
    fast = [[points[i], points[i + 1]] for i in range(0, len(points) - 1, 2)]  # disjoint, in order
    env = simpy.Environment()
    lock = RWLock(env, "mmu_lock")
    lock.hold_union = [list(iv) for iv in fast]
    lock.stats.hold_ns = sum(e - s for s, e in fast)  # as the timeline's core counts them

    def reader():
        yield env.timeout(start)
        yield lock.acquire_read("r")
        yield env.timeout(length)
        lock.release_read("r")

    env.process(reader())
    env.run()
    assert lock.stats.hold_ns == _union_length([*map(tuple, fast), (start, start + length)])
    assert lock.stats.hold_read_ns == length


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50), st.integers(0, 20)), min_size=1, max_size=40),
       st.lists(st.integers(0, 80), max_size=10, unique=True))
def test_rwlock_hold_ns_is_the_union_of_every_hold(actors, points):
    """Readers and writers at random times, over holds a timeline counted already (disjoint
    intervals in ``hold_union``, as its core leaves them): ``hold_ns`` is the length of the
    union of all the holds, each granted hold from its grant to its release, whatever the
    modes (a writer's hold never overlaps another granted by this lock, but may overlap the
    timeline's), and the union the lock keeps is disjoint and in order."""
    points = sorted(points)
    fast = [(points[i], points[i + 1]) for i in range(0, len(points) - 1, 2)]
    env = simpy.Environment()
    lock = RWLock(env, "mmu_lock")
    lock.hold_union = [list(iv) for iv in fast]
    lock.stats.hold_ns = sum(e - s for s, e in fast)
    held = []

    def actor(i, write, start, length):
        yield env.timeout(start)
        yield lock.acquire_write(f"a{i}") if write else lock.acquire_read(f"a{i}")
        t = env.now
        yield env.timeout(length)
        lock.release_write(f"a{i}") if write else lock.release_read(f"a{i}")
        held.append((t, env.now))

    for i, (write, start, length) in enumerate(actors):
        env.process(actor(i, write, start, length))
    env.run()
    assert lock.stats.hold_ns == _union_length([*fast, *held])
    fr = lock.hold_union
    assert all(fr[k][1] < fr[k + 1][0] for k in range(len(fr) - 1)), fr


def test_rwlock_hold_union_stays_short_in_a_long_run():
    """Holds that never overlap (the common case: one vCPU) each add an interval; the lock
    drops the ones no later hold can reach (``RWLock._prune_union``), so a run of 10,000
    holds keeps a short list, and ``hold_ns`` is still exact."""
    env = simpy.Environment()
    lock = RWLock(env, "mmu_lock")

    def actor():
        for k in range(10_000):
            yield lock.acquire_read("r") if k % 3 else lock.acquire_write("r")
            yield env.timeout(2)
            lock.release_read("r") if k % 3 else lock.release_write("r")
            yield env.timeout(1)

    env.process(actor())
    env.run()
    assert lock.stats.hold_ns == 20_000
    assert len(lock.hold_union) <= 128
