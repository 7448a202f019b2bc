"""assign_many's three strategies agree with applying the same ranges one by one.

For 64 or more ranges assign_many sorts them; when they are disjoint or identical in start
order it either merges them with the stored runs into a fresh tree (many ranges) or applies
them in start order (few ranges into a big map); otherwise it keeps array order. Each path
must give exactly what sequential ``assign`` calls give.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pkvm
from pkvm.testing.reference import DictRangeMap

VALUES = [0, 1, 8, 9]


@st.composite
def bulk_case(draw):
    """A pre-populated map's ranges and a bulk batch designed to hit one chosen strategy."""
    span = draw(st.sampled_from([256, 4096]))
    base = draw(st.sampled_from([0, 2**40, 2**64 - 1 - 4096]))
    default = draw(st.sampled_from([0, 9]))
    pre = draw(st.lists(st.tuples(st.integers(0, span - 1), st.integers(1, 64),
                                  st.sampled_from(VALUES)), max_size=40))
    kind = draw(st.sampled_from(["disjoint", "duplicates", "overlapping"]))
    n = draw(st.integers(64, 200))
    if kind == "overlapping":
        batch = [(draw(st.integers(0, span - 1)), draw(st.integers(0, 40)),
                  draw(st.sampled_from(VALUES))) for _ in range(n)]
    else:
        cuts = sorted(draw(st.lists(st.integers(0, span), min_size=2 * n, max_size=2 * n)))
        batch = [(cuts[2 * i], cuts[2 * i + 1] - cuts[2 * i], draw(st.sampled_from(VALUES)))
                 for i in range(n)]
        if kind == "duplicates":
            batch += [(s, ln, draw(st.sampled_from(VALUES)))
                      for s, ln, _ in batch[: draw(st.integers(1, n))]]
        order = draw(st.permutations(range(len(batch))))
        batch = [batch[i] for i in order]
    return span, base, default, pre, batch


def _apply(m, base, span, ranges):
    for s, ln, v in ranges:
        m.assign(base + s, base + min(span, s + ln), v)


@given(bulk_case())
def test_assign_many_matches_sequential_assign(case):
    """Merge, sorted per-op and array-order paths all equal sequential assigns."""
    span, base, default, pre, batch = case
    got = pkvm.RangeMap(default, _fanout=8)
    want = DictRangeMap(default)
    for m in (got, want):
        _apply(m, base, span, pre)
    starts = np.array([base + s for s, _, _ in batch], dtype=np.uint64)
    ends = np.array([base + min(span, s + ln) for s, ln, _ in batch], dtype=np.uint64)
    values = np.array([v for _, _, v in batch], dtype=np.uint64)
    got.assign_many(starts, ends, values)
    _apply(want, base, span, batch)
    got._check()
    assert got.ranges() == want.ranges()
    assert len(got) == len(want)


def test_few_ranges_into_a_big_map_use_start_order():
    """64+ disjoint ranges into a map with far more runs give the sequential result."""
    m = pkvm.RangeMap()
    m.assign_many(np.arange(0, 200_000, 2, dtype=np.uint64),
                  np.arange(1, 200_001, 2, dtype=np.uint64), 8)
    ref = m.copy()
    rng = np.random.default_rng(3)
    starts = rng.choice(np.arange(0, 200_000, 3, dtype=np.uint64), 100, replace=False)
    m.assign_many(starts, starts + 2, 1)
    for s in starts.tolist():
        ref.assign(s, s + 2, 1)
    m._check()
    assert m == ref


@pytest.mark.parametrize("n", [64, 1000, 70_000])
def test_merge_into_empty_map_packs_leaves(n):
    """A bulk load into an empty map packs leaves full: memory near 16 bytes a run."""
    rng = np.random.default_rng(n)
    starts = rng.permutation(np.arange(0, 4 * n, 4, dtype=np.uint64))
    m = pkvm.RangeMap()
    m.assign_many(starts, starts + 1, 8)
    m._check()
    assert len(m) == n
    if n >= 70_000:
        assert m.nbytes < 18 * n + 256 * 1024


@st.composite
def keys_at_the_packing_boundary(draw):
    """Unsorted keys (with repeats) whose width puts key + index just inside or outside one word.

    The bulk calls radix-sort ``key << index_bits | index`` in one word when the key's
    significant bits plus the index's fit in 64, and keys and indices separately otherwise.
    """
    n = draw(st.integers(64, 300))
    index_bits = (n - 1).bit_length()
    key_bits = draw(st.sampled_from([64 - index_bits, 65 - index_bits, 28, 64]))
    top = 1 << (key_bits - 1)       # the highest bit is set on one key, so the width is exact
    keys = draw(st.lists(st.integers(0, (1 << key_bits) - 1), min_size=n - 1, max_size=n - 1))
    keys.append(top | draw(st.integers(0, top - 1)))
    keys += draw(st.lists(st.sampled_from(keys), max_size=n // 4))   # repeated keys
    return draw(st.permutations(keys))


@given(keys_at_the_packing_boundary(), st.data())
def test_get_many_unsorted_keys_either_sort(keys, data):
    """get_many of unsorted keys equals get() per key, on both sides of the packing limit."""
    m = pkvm.RangeMap(_fanout=8)
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=60)):
        end = min(k + data.draw(st.integers(1, 3)), 2**64 - 1)
        m.assign(k, end, data.draw(st.sampled_from(VALUES)))
    got = m.get_many(np.array(keys, dtype=np.uint64))
    assert got.tolist() == [m.get(k) for k in keys]


@given(keys_at_the_packing_boundary(), st.data())
def test_assign_many_one_key_ranges_either_sort(keys, data):
    """One-key toggles (repeats: the last wins) equal sequential assigns, both sort paths."""
    keys = [k for k in keys if k < 2**64 - 1]
    values = data.draw(st.lists(st.sampled_from(VALUES), min_size=len(keys), max_size=len(keys)))
    got = pkvm.RangeMap(_fanout=8)
    want = DictRangeMap()
    arr = np.array(keys, dtype=np.uint64)
    got.assign_many(arr, arr + np.uint64(1), np.array(values, dtype=np.uint64))
    for k, v in zip(keys, values, strict=True):
        want.assign(k, k + 1, v)
    got._check()
    assert got.ranges() == want.ranges()


@given(st.data(), st.booleans(), st.booleans())
def test_assign_many_uniform_lengths_or_values(data, same_length, same_value):
    """Batches whose lengths or values are all equal (computed, not gathered, once sorted)
    equal sequential assigns, with or without partial overlaps."""
    n = data.draw(st.integers(64, 200))
    starts = data.draw(st.lists(st.integers(0, 4096), min_size=n, max_size=n))
    if same_length:
        lengths = [data.draw(st.integers(0, 5))] * n
    else:
        lengths = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    if same_value:
        values = [data.draw(st.sampled_from(VALUES))] * n
    else:
        values = data.draw(st.lists(st.sampled_from(VALUES), min_size=n, max_size=n))
    got = pkvm.RangeMap(_fanout=8)
    want = DictRangeMap()
    for s, ln, v in data.draw(st.lists(st.tuples(st.integers(0, 4096), st.integers(1, 9),
                                                 st.sampled_from(VALUES)), max_size=30)):
        got.assign(s, s + ln, v)
        want.assign(s, s + ln, v)
    got.assign_many(np.array(starts, dtype=np.uint64),
                    np.array([s + ln for s, ln in zip(starts, lengths, strict=True)],
                             dtype=np.uint64),
                    np.array(values, dtype=np.uint64))
    for s, ln, v in zip(starts, lengths, values, strict=True):
        want.assign(s, s + ln, v)
    got._check()
    assert got.ranges() == want.ranges()


@st.composite
def values_at_the_packing_boundary(draw):
    """Equal-length ranges (repeated starts) whose values are just inside or outside the bits
    left beside the largest start in one word.

    With one length, assign_many sorts ``start << value_bits | value`` when the starts' and the
    values' significant bits fit in 64 (no gather afterwards), and by index otherwise.
    """
    n = draw(st.integers(64, 200))
    key_bits = draw(st.sampled_from([0, 1, 12, 40, 63]))
    room = 64 - key_bits
    value_bits = draw(st.sampled_from([0, 1, 4, room - 1, room, room + 1, 64]))
    value_bits = max(0, min(64, value_bits))
    key_top = (1 << key_bits) - 1
    length = draw(st.integers(0, 3))
    starts = draw(st.lists(st.integers(0, max(0, key_top - 3)), min_size=n, max_size=n))
    if key_bits:
        starts[0] = key_top - 3 if key_top >= 3 else key_top   # near the top: the width is exact
        length = min(length, key_top - starts[0])
    starts += draw(st.lists(st.sampled_from(starts), max_size=n // 4))    # repeats: last wins
    value_top = (1 << value_bits) - 1
    values = draw(st.lists(st.integers(0, value_top), min_size=len(starts),
                           max_size=len(starts)))
    if value_bits:
        values[draw(st.integers(0, len(values) - 1))] = value_top    # the width is exact
    order = draw(st.permutations(range(len(starts))))
    return [starts[i] for i in order], length, [values[i] for i in order]


@given(values_at_the_packing_boundary(), st.sampled_from([0, 9]))
def test_assign_many_one_length_values_either_sort(case, default):
    """Equal-length batches equal sequential assigns on both sides of the value-packing limit."""
    starts, length, values = case
    got = pkvm.RangeMap(default, _fanout=8)
    want = DictRangeMap(default)
    arr = np.array(starts, dtype=np.uint64)
    got.assign_many(arr, arr + np.uint64(length), np.array(values, dtype=np.uint64))
    for s, v in zip(starts, values, strict=True):
        want.assign(s, s + length, v)
    got._check()
    assert got.ranges() == want.ranges()
