"""RangeMap's one-key assign (``RangeMap._assign1_c``, the attribute ioctl's per-gfn writes).

It finds the runs a one-key write replaces with one scan of the leaf and finishes the in-leaf
cases itself; everything else is the general ``_assign_c``. It must leave the tree exactly as
the general assign does: the same runs, the same leaves and value arrays (``nbytes``, the
tree's depth), the same descent finger. Two maps get the same operations, one through
``assign(k, k + 1, v)`` and one through the one-key entry, and are compared after every step;
small fanouts make splits, merges, new first starts and cross-leaf neighbours frequent.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm import RangeMap
from pkvm._core import _rangemap_assign1, _rangemap_assign1_at
from pkvm.testing.reference import SortedRangeMap

SPAN = 300

STEPS = st.lists(
    st.tuples(
        st.sampled_from(["one", "one", "one", "range", "get"]),
        st.one_of(st.integers(-2, 2), st.integers(-SPAN, SPAN)),  # key move
        st.integers(1, 9),  # width of a range assign
        st.sampled_from([0, 0, 1, 2, 8]),  # values (0 is the default: a delete)
    ),
    max_size=200,
)


def _same(a, b, ref):
    assert a.ranges() == b.ranges() == ref.ranges()
    assert len(a) == len(b)
    assert a.nbytes == b.nbytes
    assert a._depth() == b._depth()
    assert a._finger_window() == b._finger_window()
    a._check()
    b._check()


@settings(max_examples=150, deadline=None)
@given(fanout=st.sampled_from([4, 5, 8, 64]), finger=st.booleans(), steps=STEPS)
def test_one_key_assign_leaves_the_tree_of_the_general_assign(fanout, finger, steps):
    plain = RangeMap(0, _fanout=fanout, _finger=finger)
    one = RangeMap(0, _fanout=fanout, _finger=finger)
    ref = SortedRangeMap(0)
    key = SPAN // 2
    for op, move, width, value in steps:
        key = min(max(key + move, 0), SPAN - 1)
        if op == "one":
            plain.assign(key, key + 1, value)
            _rangemap_assign1(one, key, value)
            ref.assign(key, key + 1, value)
        elif op == "range":
            end = min(key + width, SPAN)
            for m in (plain, one, ref):
                m.assign(key, end, value)
        else:
            assert plain.get(key) == one.get(key) == ref.get(key)
        _same(plain, one, ref)


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(0, 4 * SPAN), min_size=1, max_size=300),
       value=st.sampled_from([1, 2**63, 2**64 - 1]))
def test_one_key_toggles_on_a_nonzero_default(keys, value):
    """Fragmented toggles (each key set, then set back to the default) on a map whose default
    is not 0, at the keys' ends of the key space too."""
    plain = RangeMap(5, _fanout=4, _finger=True)
    one = RangeMap(5, _fanout=4, _finger=True)
    ref = SortedRangeMap(5)
    top = 2**64 - 2  # the last key a one-key assign can write
    for k in keys + [top, 0]:
        k = top - k if k % 3 == 0 else k
        v = value if plain.get(k) == 5 else 5
        plain.assign(k, k + 1, v)
        _rangemap_assign1(one, k, v)
        ref.assign(k, k + 1, v)
    _same(plain, one, ref)


def test_one_key_assign_refuses_the_last_key():
    m = RangeMap()
    with pytest.raises(OverflowError, match="one-key assign: 2\\*\\*64 - 1"):
        _rangemap_assign1(m, 2**64 - 1, 1)
    assert m.ranges() == []


@settings(max_examples=150, deadline=None)
@given(fanout=st.sampled_from([4, 5, 8, 64]), finger=st.booleans(), steps=STEPS,
       looks=st.lists(st.tuples(st.sampled_from([0, 0, 0, 0, 1, -1, 3, -40]),
                                st.sampled_from([0, 0, 0, 1, 2, 12])), max_size=200))
def test_one_key_assign_from_a_lookup_leaves_the_tree_of_the_general_assign(fanout, finger, steps, looks):
    """The attribute ioctl's one-gfn writes go where its lookup of the gfn landed
    (``_assign1_at``): the same tree as the general assign, and a position of another key or
    one that a write in between made stale (some of them leave the version where a new lookup
    would find another leaf or index) is not used."""
    plain = RangeMap(0, _fanout=fanout, _finger=finger)
    one = RangeMap(0, _fanout=fanout, _finger=finger)
    key = SPAN // 2
    for (op, move, width, value), (off, nbetween) in zip(steps, looks + [(0, 0)] * len(steps)):
        key = min(max(key + move, 0), SPAN - 1)
        look = min(max(key + off, 0), SPAN - 1)
        between = [((key + 7 * j - 40) % SPAN, (value + j) % 3) for j in range(nbetween)]
        if op == "one":
            plain.get(look)
            for k, v in between:
                plain.assign(k, k + 1, v)
            plain.assign(key, key + 1, value)
            _rangemap_assign1_at(one, look, key, value, between)
        elif op == "range":
            end = min(key + width, SPAN)
            for m in (plain, one):
                m.assign(key, end, value)
        else:
            assert plain.get(key) == one.get(key)
        assert plain.ranges() == one.ranges()
        assert plain.nbytes == one.nbytes
        assert plain._depth() == one._depth()
        one._check()
