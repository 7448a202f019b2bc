"""RangeMap's descent finger: the leaf of the last single-key call, reused while keys fall in it.

The finger must never change an answer: every call is compared with ``SortedRangeMap``, and
``RangeMap._check`` asserts after every step that a non-NULL finger is a leaf of the live tree.
Small fanouts (``_fanout=4``/``5``) make a few dozen runs a tree of several levels, so splits,
merges and root changes (which drop the finger) happen all the time; keys are drawn near the
previous key so that most calls can hit the finger.
"""

import pickle
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.testing.reference import SortedRangeMap

U64 = 2**64 - 1
SPAN = 400


def _covers(window, key):
    return window is not None and window[0] <= key < window[1]


def _step(m, ref, op, key, width, value):
    """Apply one operation to both maps; return whether the finger held ``key`` beforehand."""
    hit = _covers(m._finger_window(), key)
    if op == "assign":
        end = min(key + width, SPAN)
        m.assign(key, end, value)
        ref.assign(key, end, value)
    elif op == "get":
        assert m.get(key) == ref.get(key), key
    elif op == "find_ne":
        end = min(key + width, SPAN)
        assert m.find_ne(key, end, value) == ref.find_ne(key, end, value), (key, end, value)
    else:
        assert m.run_at(key) == ref.run_at(key), key
    if op != "assign":
        # a reader leaves the finger on the leaf that holds its key
        assert _covers(m._finger_window(), key), (op, key, m._finger_window())
    m._check()
    return hit


OPS = st.lists(
    st.tuples(
        st.sampled_from(["assign", "assign", "get", "find_ne", "run_at"]),
        st.one_of(st.just(0), st.integers(-3, 3), st.integers(-SPAN, SPAN)),  # key move
        st.integers(1, 12),  # range width
        st.sampled_from([0, 1, 8]),
    ),
    max_size=150,
)


@settings(max_examples=150, deadline=None)
@given(fanout=st.sampled_from([4, 5, 8]), default=st.sampled_from([0, 8]), ops=OPS)
def test_finger_never_changes_an_answer(fanout, default, ops):
    m = pkvm.RangeMap(default, _fanout=fanout, _finger=True)
    ref = SortedRangeMap(default)
    for k in range(0, SPAN, 7):  # a multi-level tree to start from
        m.assign(k, k + 3, 1 + k % 2)
        ref.assign(k, k + 3, 1 + k % 2)
    key = 0
    for op, move, width, value in ops:
        key = min(max(key + move, 0), SPAN - 1)
        _step(m, ref, op, key, width, value)
    assert m.ranges() == ref.ranges()


def test_finger_hits_misses_and_drops_across_splits_and_merges():
    """A seeded walk: hits, misses, and drops by splits and merges all happen, answers agree."""
    rng = np.random.default_rng(16)
    m = pkvm.RangeMap(0, _fanout=4, _finger=True)
    ref = SortedRangeMap(0)
    hits = misses = drops = 0
    key = 0
    for _ in range(4000):
        key = int(min(max(key + rng.integers(-4, 5), 0), SPAN - 1))
        if rng.random() < 0.05:
            key = int(rng.integers(0, SPAN))
        op = ["assign", "get", "find_ne", "run_at"][int(rng.integers(0, 4))]
        had = m._finger_window() is not None
        if _step(m, ref, op, key, int(rng.integers(1, 10)), int(rng.choice([0, 1, 8]))):
            hits += 1
        else:
            misses += 1
        if had and m._finger_window() is None:
            drops += 1
    assert m.ranges() == ref.ranges()
    assert hits > 1000 and misses > 100 and drops > 50, (hits, misses, drops)


def test_finger_dropped_by_every_shape_change():
    m = pkvm.RangeMap(0, _fanout=4, _finger=True)
    for k in range(0, 40, 2):
        m.assign(k, k + 1, 8)
    m.get(10)
    assert _covers(m._finger_window(), 10)
    m.assign(11, 12, 1)  # a full leaf of four runs splits
    assert m._finger_window() is None
    m.get(30)
    assert _covers(m._finger_window(), 30)
    m.assign(0, 40, 0)  # every leaf but one freed
    assert m._finger_window() is None and len(m) == 0
    m.get(5)
    assert m._finger_window() == (0, U64)  # the root leaf answers every key
    m.clear()
    assert m._finger_window() is None
    m.get(5)
    m.assign_many(np.arange(0, 400, 2, dtype=np.uint64), np.arange(1, 401, 2, dtype=np.uint64), 8)
    assert m._finger_window() is None  # the bulk merge builds a new tree
    assert m.get(6) == 8 and m.get(7) == 0
    m._check()


def test_copy_and_pickle_keep_the_opt_in():
    m = pkvm.RangeMap(0, _fanout=4, _finger=True)
    for k in range(0, 100, 3):
        m.assign(k, k + 1, 8)
    m.get(50)
    assert m._finger_window() is not None
    for other in (m.copy(), pickle.loads(pickle.dumps(m))):
        assert other == m
        other.get(50)
        assert _covers(other._finger_window(), 50)
        other._check()


def test_maps_without_the_opt_in_never_keep_a_finger():
    m = pkvm.RangeMap(0, _fanout=4)
    for k in range(0, 100, 3):
        m.assign(k, k + 1, 8)
        assert m.get(k) == 8 and m.find_ne(k, k + 1, 8) == -1
        assert m._finger_window() is None
    m._check()


def test_threads_sharing_the_finger_get_right_answers():
    """Readers in several threads move one map's finger between distant leaves while a
    GIL-free ``get_many`` walks the same map; every answer matches the model. Between rounds
    the main thread changes the map (changes are exclusive), dropping the finger."""
    m = pkvm.RangeMap(0, _fanout=4, _finger=True)
    ref = SortedRangeMap(0)
    rng = np.random.default_rng(3)
    errors = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(4):
            starts = rng.choice(2**20, size=300, replace=False).astype(np.uint64)
            for s in starts:
                v = int(rng.integers(1, 4))
                m.assign(int(s), int(s) + 2, v)
                ref.assign(int(s), int(s) + 2, v)
            m._check()
            probe = np.sort(rng.integers(0, 2**20, 4000, dtype=np.uint64))
            expect = [ref.get(int(k)) for k in probe]

            def reader(lo, step):
                try:
                    for i in range(lo, probe.shape[0], step):
                        k = int(probe[i])
                        if m.get(k) != expect[i]:
                            errors.append(("get", k))
                        if m.run_at(k) != ref.run_at(k):
                            errors.append(("run_at", k))
                except Exception as e:  # noqa: BLE001  (reported below)
                    errors.append(e)

            def bulk():
                for _ in range(20):
                    if list(m.get_many(probe)) != expect:
                        errors.append(("get_many", round_))

            threads = [threading.Thread(target=reader, args=(i, 4)) for i in range(4)]
            threads.append(threading.Thread(target=bulk))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            m._check()
    finally:
        sys.setswitchinterval(old)
    assert errors == []


@pytest.mark.parametrize("fanout", [4, None])
def test_key_ordered_assigns_then_reads_use_the_finger(fanout):
    """The typed kernel paths' pattern: get, then assign, then find_ne at one key."""
    m = pkvm.RangeMap(0, _finger=True) if fanout is None else pkvm.RangeMap(0, _fanout=fanout, _finger=True)
    ref = SortedRangeMap(0)
    for k in range(0, 5000, 5):
        assert m.get(k) == ref.get(k)
        m.assign(k, k + 1, 8)
        ref.assign(k, k + 1, 8)
        assert m.find_ne(k, k + 1, 8) == -1
        assert _covers(m._finger_window(), k)
    m._check()
    assert m.ranges() == ref.ranges()
