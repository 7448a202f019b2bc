"""The fault path's single-descent write (``RangeMap._run_pos_c`` then ``RangeMap._put_c``).

A lookup records where it landed; the write right after it goes there without a second
descent while the map is unchanged, and is an ordinary assign otherwise. Whatever the case, the
result must be the plain ``assign``'s: the same runs, the same node and value-array counts and
the same spare-node pools (``nbytes``), which a twin map given the plain calls checks. Small
fanouts make a few dozen runs a tree of several levels, so full leaves, leaf edges, merges that
would rebalance and stale positions all happen.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm._core import _rangemap_lookup_put

SPAN = 300


def _pair(default, fanout, finger, runs):
    a = pkvm.RangeMap(default, _fanout=fanout, _finger=finger)
    b = pkvm.RangeMap(default, _fanout=fanout, _finger=finger)
    for s, w, v in runs:
        a.assign(s, min(s + w, SPAN), v)
        b.assign(s, min(s + w, SPAN), v)
    return a, b


RUNS = st.lists(st.tuples(st.integers(0, SPAN - 1), st.integers(1, 6), st.sampled_from([0, 1, 2, 7])),
                min_size=10, max_size=120)
PUTS = st.lists(
    st.tuples(
        st.integers(0, SPAN - 1),                   # the key looked up
        st.integers(-2, 2),                         # the write's start, from the key
        st.integers(0, 4),                          # its width (0: an empty range)
        st.sampled_from([0, 1, 2, 7]),              # its value
        st.one_of(st.none(), st.tuples(st.integers(0, SPAN - 1), st.integers(1, 4),
                                       st.sampled_from([0, 1, 7]))),  # an assign in between
    ),
    min_size=10, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([0, 7]), st.sampled_from([4, 5, 8, 64]), st.booleans(), RUNS, PUTS)
def test_put_is_the_plain_assign(default, fanout, finger, runs, puts):
    got, want = _pair(default, fanout, finger, runs)
    for key, ds, width, value, between in puts:
        start = max(0, key + ds)
        end = start + width
        run = _rangemap_lookup_put(got, key, start, end, value,
                                   None if between is None else (between[0], between[0] + between[1], between[2]))
        assert run == want.run_at(key)
        if between is not None:
            want.assign(between[0], between[0] + between[1], between[2])
        want.assign(start, end, value)
        got._check()
        assert got == want
        assert list(got.ranges()) == list(want.ranges())
        assert len(got) == len(want)
        assert got.nbytes == want.nbytes
        assert got._depth() == want._depth()


@pytest.mark.parametrize("fanout", [4, 8, 64])
@pytest.mark.parametrize("pattern", ["random", "ascending", "alloc"])
def test_fault_patterns_against_the_plain_assign(fanout, pattern):
    """The fault path's writes, many of them: one page at a random key (SPTEs, folios), pages
    in ascending order with values that differ (RMP entries) or are equal (the allocator's
    used map, one run growing at its end); the twin takes the plain assigns."""
    rng = random.Random(fanout * 31 + len(pattern))
    got = pkvm.RangeMap(0, _fanout=fanout, _finger=True)
    want = pkvm.RangeMap(0, _fanout=fanout, _finger=True)
    for n in range(1500):
        if pattern == "random":
            key = rng.randrange(4000)
            value = rng.choice([1, 2, 3 + key])
        elif pattern == "ascending":
            key = 2 * n + rng.randrange(2)
            value = rng.choice([1, 5 + n])
        else:
            key = n + (n // 200) * 3
            value = 1
        assert _rangemap_lookup_put(got, key, key, key + 1, value) == want.run_at(key)
        want.assign(key, key + 1, value)
        if rng.random() < 0.05:  # an unmap or a conversion back now and then
            k = rng.randrange(4000)
            w = rng.randrange(1, 5)
            got.assign(k, k + w, 0)
            want.assign(k, k + w, 0)
        if n % 100 == 0:
            got._check()
            assert got == want and got.nbytes == want.nbytes
    got._check()
    assert list(got.ranges()) == list(want.ranges())
    assert got.nbytes == want.nbytes and got._depth() == want._depth()


def test_put_into_a_gap_inserts_extends_and_merges():
    """The fast cases by name: a new run in a gap, a run touching an equal left or right
    neighbour (extended), and one touching both (merged into one)."""
    m = pkvm.RangeMap(0, _fanout=8)
    m.assign(10, 12, 5)
    m.assign(20, 22, 5)
    assert _rangemap_lookup_put(m, 15, 15, 16, 9) == (12, 20, 0)   # insert
    assert _rangemap_lookup_put(m, 12, 12, 13, 5) == (12, 15, 0)   # extend the left run
    assert _rangemap_lookup_put(m, 19, 19, 20, 5) == (16, 20, 0)   # extend the right run
    assert _rangemap_lookup_put(m, 13, 13, 15, 5) == (13, 15, 0)   # merge with the left only (9 at 15)
    assert list(m.ranges()) == [(10, 15, 5), (15, 16, 9), (19, 22, 5)]
    assert _rangemap_lookup_put(m, 16, 16, 19, 5) == (16, 19, 0)   # merge both sides
    assert list(m.ranges()) == [(10, 15, 5), (15, 16, 9), (16, 22, 5)]
    m._check()


def test_stale_position_is_an_ordinary_assign():
    """A change between the lookup and the write voids the position: the write still lands
    where the plain assign puts it (here the change splits the looked-up leaf's neighbourhood)."""
    m = pkvm.RangeMap(0, _fanout=4)
    for k in range(0, 40, 2):
        m.assign(k, k + 1, k + 1)
    ref = m.copy()
    _rangemap_lookup_put(m, 9, 9, 10, 99, between=(0, 40, 3))
    ref.assign(0, 40, 3)
    ref.assign(9, 10, 99)
    assert m == ref
    m._check()


def test_lookup_put_refuses_bad_ranges():
    m = pkvm.RangeMap(0)
    with pytest.raises(ValueError, match="start 0x5 > end 0x4"):
        _rangemap_lookup_put(m, 5, 5, 4, 1)
    with pytest.raises(OverflowError, match="key out of range for run_at"):
        _rangemap_lookup_put(m, 2**64 - 1, 0, 1, 1)
    assert len(m) == 0
