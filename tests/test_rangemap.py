"""Behaviour of :class:`pkvm.RangeMap` and its pure-Python twins in :mod:`pkvm.testing.reference`.

Every test runs on all three implementations through the ``rangemap_cls`` fixture (ids
``core``, ``sorted``, ``dict``), so the twins are held to the same contract they are used to
check.  The error contract is in ``test_rangemap_errors.py``; the state machine and the
large-scale tests of the core are in ``test_rangemap_machine.py``.
"""

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm.testing.reference import UINT64_MAX as U64
from pkvm.testing.reference import DictRangeMap

VALUES = [0, 1, 8, U64]
"""Values for the property tests: few, so that equal neighbours (and coalescing) are common."""


class Index:
    """An integer-like object that is not an int: only ``__index__``."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value


# ---------------------------------------------------------------------------------------------
# Named edge cases
# ---------------------------------------------------------------------------------------------

EDGE_CASES = {}
HUGE_EDGE_CASES = set()


def edge_case(name, huge=False):
    """Register the decorated function as the edge case with pytest id ``name``.

    ``huge`` cases assign ranges of more than ``DictRangeMap.MAX_ASSIGN_KEYS`` keys, which the
    per-key model refuses.
    """

    def register(fn):
        EDGE_CASES[name] = fn
        if huge:
            HUGE_EDGE_CASES.add(fn)
        return fn

    return register


@edge_case("split-middle")
def _split_middle(cls):
    """Assigning another value inside a run splits it into three runs."""
    m = cls()
    m.assign(0x100, 0x200, 8)
    m.assign(0x140, 0x180, 1)
    assert m.ranges() == [(0x100, 0x140, 8), (0x140, 0x180, 1), (0x180, 0x200, 8)]
    assert len(m) == 3
    return m


@edge_case("overwrite-many-runs")
def _overwrite_many_runs(cls):
    """One assign over a hundred runs replaces them all, keeping the uncovered edge runs."""
    m = cls()
    for i in range(100):
        m.assign(2 * i, 2 * i + 1, 1 if i % 2 else 8)
    assert len(m) == 100
    m.assign(1, 198, 9)
    assert m.ranges() == [(0, 1, 8), (1, 198, 9), (198, 199, 1)]
    assert len(m) == 3
    return m


@edge_case("coalesce-both-neighbours")
def _coalesce_both_neighbours(cls):
    """Filling the gap between two equal runs merges all three into one run."""
    m = cls()
    m.assign(0, 10, 8)
    m.assign(20, 30, 8)
    m.assign(10, 20, 8)
    assert m.ranges() == [(0, 30, 8)]
    assert len(m) == 1
    assert m.run_at(15) == (0, 30, 8)
    return m


@edge_case("assign-default-deletes")
def _assign_default_deletes(cls):
    """Assigning the default punches a hole; assigning it over everything empties the map."""
    m = cls()
    m.assign(0, 30, 8)
    m.assign(10, 20, 0)
    assert m.ranges() == [(0, 10, 8), (20, 30, 8)]
    m.assign(0, 30, 0)
    assert m.ranges() == []
    assert len(m) == 0
    return m


@edge_case("empty-range-noop")
def _empty_range_noop(cls):
    """``start == end`` changes nothing, finds nothing and returns no runs, even inside a run."""
    m = cls()
    m.assign(0, 10, 8)
    m.assign(5, 5, 1)
    m.assign(5, 5, 0)
    assert m.ranges() == [(0, 10, 8)]
    assert m.find_ne(7, 7, 1) == -1
    assert m.ranges(5, 5) == []
    m.assign_many([3], [3], 1)
    assert m.ranges() == [(0, 10, 8)]
    return m


@edge_case("clear-repeatedly")
def _clear_repeatedly(cls):
    """clear() on an empty or just-cleared map, again and again, leaves a working empty map."""
    m = cls(default=8)
    for _ in range(10):
        m.clear()
    m.assign(0, 10, 1)
    for _ in range(10):
        m.clear()
    assert m.ranges() == []
    assert len(m) == 0
    m.assign(5, 6, 1)
    assert m.ranges() == [(5, 6, 1)]
    return m


@edge_case("touching-runs-different-values")
def _touching_runs_different_values(cls):
    """Touching runs with different values stay two runs."""
    m = cls()
    m.assign(0, 10, 8)
    m.assign(10, 20, 1)
    assert len(m) == 2
    assert m.run_at(9) == (0, 10, 8)
    assert m.run_at(10) == (10, 20, 1)
    assert m.find_ne(0, 20, 8) == 10
    return m


@edge_case("key-uint64-max-is-default")
def _key_uint64_max_is_default(cls):
    """The key ``2**64 - 1`` is never covered; the run just below it ends at ``2**64 - 1``."""
    m = cls()
    m.assign(U64 - 10, U64, 8)
    assert m.get(U64) == 0
    assert m.get(U64 - 1) == 8
    assert m.ranges() == [(U64 - 10, U64, 8)]
    assert m.run_at(U64 - 1) == (U64 - 10, U64, 8)
    assert m.find_ne(U64 - 10, U64, 8) == -1
    assert m.ranges(U64, U64) == []
    return m


@edge_case("whole-key-space", huge=True)
def _whole_key_space(cls):
    """``assign(0, 2**64 - 1, v)`` covers every assignable key in one run."""
    m = cls()
    m.assign(0, U64, 8)
    assert m.ranges() == [(0, U64, 8)]
    assert m.find_ne(0, U64, 8) == -1
    assert m.run_at(0) == (0, U64, 8)
    m.assign(1, U64 - 1, 0)
    assert m.ranges() == [(0, 1, 8), (U64 - 1, U64, 8)]
    return m


@edge_case("nonzero-default")
def _nonzero_default(cls):
    """With ``default=8``, 8 is never stored and 0 is an ordinary value."""
    m = cls(default=8)
    assert m.default == 8
    assert m.get(5) == 8
    assert m.ranges() == []
    m.assign(0, 10, 0)
    assert m.ranges() == [(0, 10, 0)]
    m.assign(5, 10, 8)
    assert m.ranges() == [(0, 5, 0)]
    assert m.find_ne(0, 10, 8) == 0
    assert m.find_ne(5, 100, 8) == -1
    assert m.run_at(7) == (5, U64, 8)
    assert len(m) == 1
    return m


@edge_case("run-at-gap-bounds")
def _run_at_gap_bounds(cls):
    """Gaps are runs of the default bounded by stored runs, key 0 and ``2**64 - 1``."""
    m = cls()
    assert m.run_at(0) == (0, U64, 0)
    m.assign(10, 20, 8)
    assert m.run_at(5) == (0, 10, 0)
    assert m.run_at(25) == (20, U64, 0)
    assert m.run_at(U64 - 1) == (20, U64, 0)
    return m


@edge_case("find-ne-gaps-and-runs")
def _find_ne_gaps_and_runs(cls):
    """find_ne returns the first differing key whether it is in a gap or a run."""
    m = cls()
    m.assign(10, 20, 8)
    assert m.find_ne(0, 30, 0) == 10
    assert m.find_ne(10, 20, 8) == -1
    assert m.find_ne(10, 21, 8) == 20
    assert m.find_ne(0, 10, 0) == -1
    assert m.find_ne(15, 25, 8) == 20
    assert m.find_ne(5, 15, 8) == 5
    return m


@edge_case("ranges-clipped-to-window")
def _ranges_clipped_to_window(cls):
    """ranges() and iter_ranges() clip runs to the window and omit the default."""
    m = cls()
    m.assign(0, 10, 8)
    m.assign(20, 30, 1)
    assert m.ranges(5, 25) == [(5, 10, 8), (20, 25, 1)]
    assert m.ranges(10, 20) == []
    assert m.ranges(25) == [(25, 30, 1)]
    assert m.ranges(0, None) == m.ranges()
    assert list(m.iter_ranges(5, 25)) == m.ranges(5, 25)
    return m


@edge_case("extend-and-trim")
def _extend_and_trim(cls):
    """Overlapping equal values extend a run; the default trims its head."""
    m = cls()
    m.assign(10, 20, 8)
    m.assign(15, 25, 8)
    assert m.ranges() == [(10, 25, 8)]
    m.assign(5, 12, 8)
    assert m.ranges() == [(5, 25, 8)]
    m.assign(5, 8, 0)
    assert m.ranges() == [(8, 25, 8)]
    return m


@edge_case("same-value-inside-run-noop")
def _same_value_inside_run_noop(cls):
    """Re-assigning a run's own value inside it leaves one run."""
    m = cls()
    m.assign(0, 100, 8)
    m.assign(10, 20, 8)
    assert m.ranges() == [(0, 100, 8)]
    assert len(m) == 1
    return m


@edge_case("overlap-three-runs")
def _overlap_three_runs(cls):
    """A range over three runs keeps the first's head and the last's tail."""
    m = cls()
    m.assign(0, 10, 1)
    m.assign(10, 20, 2)
    m.assign(20, 30, 3)
    m.assign(5, 25, 9)
    assert m.ranges() == [(0, 5, 1), (5, 25, 9), (25, 30, 3)]
    return m


@edge_case("value-uint64-max")
def _value_uint64_max(cls):
    """``2**64 - 1`` is an ordinary value."""
    m = cls()
    m.assign(3, 4, U64)
    assert m.get(3) == U64
    assert m.ranges() == [(3, 4, U64)]
    assert m.get_many(np.array([3], dtype=np.uint64)).tolist() == [U64]
    return m


@edge_case("later-bulk-entries-win")
def _later_bulk_entries_win(cls):
    """assign_many applies entries in array order, so later entries overwrite earlier ones."""
    m = cls()
    m.assign_many(
        np.array([0, 5], dtype=np.uint64),
        np.array([10, 15], dtype=np.uint64),
        np.array([1, 2], dtype=np.uint64),
    )
    assert m.ranges() == [(0, 5, 1), (5, 15, 2)]
    return m


@pytest.mark.parametrize("case", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_case(rangemap_cls, case):
    """Each named boundary case holds, and the map's invariants hold afterwards."""
    if case in HUGE_EDGE_CASES and rangemap_cls is DictRangeMap:
        with pytest.raises(ValueError, match="MAX_ASSIGN_KEYS"):
            case(rangemap_cls)
        return
    case(rangemap_cls)._check()


def test_len_counts_maximal_runs(rangemap_cls):
    """len() counts coalesced, non-default runs; differing neighbours count separately."""
    m = rangemap_cls()
    m.assign(0, 5, 8)
    m.assign(5, 10, 8)
    m.assign(10, 15, 1)
    m.assign(20, 25, 1)
    assert len(m) == 3
    m.clear()
    assert len(m) == 0
    assert m.ranges() == []


def test_results_are_python_ints(rangemap_cls):
    """Queries return Python ints, also for numpy-integer arguments."""
    m = rangemap_cls()
    m.assign(np.uint64(2), np.int64(5), np.uint8(7))
    results = [m.get(np.uint64(3)), m.find_ne(0, 5, 7), *m.run_at(np.uint64(3)), *m.ranges()[0]]
    assert results == [7, 0, 2, 5, 7, 2, 5, 7]
    assert all(type(x) is int for x in results)


# ---------------------------------------------------------------------------------------------
# Accepted integer-like input
# ---------------------------------------------------------------------------------------------

SCALAR_CONVERSIONS = [
    pytest.param(int, id="int"),
    pytest.param(np.uint64, id="np.uint64"),
    pytest.param(np.int64, id="np.int64"),
    pytest.param(np.uint16, id="np.uint16"),
    pytest.param(Index, id="__index__"),
]


@pytest.mark.parametrize("conv", SCALAR_CONVERSIONS)
def test_integer_like_scalars_accepted(rangemap_cls, conv):
    """Numpy integers and objects with __index__ work wherever an int does."""
    m = rangemap_cls(default=conv(0))
    m.assign(conv(2), conv(5), conv(7))
    assert m.get(conv(3)) == 7
    assert m.find_ne(conv(2), conv(5), conv(7)) == -1
    assert m.run_at(conv(3)) == (2, 5, 7)
    assert m.ranges(conv(0), conv(10)) == [(2, 5, 7)]
    assert list(m.iter_ranges(conv(3))) == [(3, 5, 7)]


def test_bool_scalars_accepted(rangemap_cls):
    """bool is an int: ``assign(False, True, True)`` sets key 0 to 1."""
    m = rangemap_cls(default=False)
    m.assign(False, True, True)
    assert m.ranges() == [(0, 1, 1)]
    assert m.get(False) == 1


def test_uint64_max_as_numpy_scalar(rangemap_cls):
    """``np.uint64(2**64 - 1)`` is a valid end, key and value."""
    m = rangemap_cls()
    m.assign(np.uint64(U64 - 1), np.uint64(U64), np.uint64(U64))
    assert m.get(np.uint64(U64 - 1)) == U64
    assert m.get(np.uint64(U64)) == 0


BULK_CONTAINERS = [
    pytest.param(lambda xs: np.array(xs, dtype=np.uint64), id="uint64"),
    pytest.param(lambda xs: np.array(xs, dtype=np.int32), id="int32"),
    pytest.param(lambda xs: np.array(xs, dtype=np.uint8), id="uint8"),
    pytest.param(lambda xs: np.array(xs, dtype=">u8"), id="big-endian-uint64"),
    pytest.param(lambda xs: np.repeat(np.array(xs, dtype=np.uint64), 2)[::2], id="strided"),
    pytest.param(lambda xs: _readonly(np.array(xs, dtype=np.uint64)), id="readonly"),
    pytest.param(lambda xs: np.array(xs, dtype=object), id="object"),
    pytest.param(list, id="list"),
    pytest.param(tuple, id="tuple"),
]


def _readonly(arr):
    arr.flags.writeable = False
    return arr


@pytest.mark.parametrize("container", BULK_CONTAINERS)
def test_bulk_containers_accepted(rangemap_cls, container):
    """assign_many and get_many take any 1-D integer array or sequence of ints."""
    m = rangemap_cls()
    m.assign_many(container([1, 5, 20]), container([3, 9, 21]), container([7, 8, 9]))
    assert m.ranges() == [(1, 3, 7), (5, 9, 8), (20, 21, 9)]
    got = m.get_many(container([0, 1, 5, 20, 21]))
    assert got.dtype == np.uint64
    assert got.tolist() == [0, 7, 8, 9, 0]


@pytest.mark.parametrize(
    "empty",
    [
        pytest.param(lambda: np.array([], dtype=np.uint64), id="uint64"),
        pytest.param(list, id="list"),
        pytest.param(tuple, id="tuple"),
    ],
)
def test_bulk_empty_input_is_noop(rangemap_cls, empty, populated):
    """Empty bulk input changes nothing and get_many returns an empty uint64 array."""
    m = populated()
    before = m.ranges()
    m.assign_many(empty(), empty(), empty())
    m.assign_many(empty(), empty(), 8)
    assert m.ranges() == before
    got = m.get_many(empty())
    assert got.dtype == np.uint64
    assert got.shape == (0,)


def test_python_lists_are_read_exactly(rangemap_cls):
    """Lists of ints are read exactly, although numpy would make ``[1, 2**64 - 1]`` float64."""
    m = rangemap_cls()
    m.assign_many([1, U64 - 2], [2, U64], [8, U64 - 1])
    assert m.ranges() == [(1, 2, 8), (U64 - 2, U64, U64 - 1)]
    assert m.get_many([1, U64 - 1, U64]).tolist() == [8, U64 - 1, 0]


# ---------------------------------------------------------------------------------------------
# Bulk operations equal the scalar ones
# ---------------------------------------------------------------------------------------------

ARRAY_KINDS = ["uint64", "int64", "list"]
BASES = {"low": 0, "mid": 2**62, "int64-top": 2**63 - 1 - 64, "uint64-top": U64 - 64}


def _to_kind(xs, kind):
    return list(xs) if kind == "list" else np.array(xs, dtype=kind)


@st.composite
def bulk_assign_args(draw, kind):
    """``(triples, base)`` for assign_many: ranges in a 64-key window, values from VALUES."""
    int64 = kind == "int64"
    base = draw(st.sampled_from([b for b in BASES.values() if not (int64 and b > 2**63 - 65)]))
    values = st.sampled_from([v for v in VALUES if not (int64 and v > 2**63 - 1)])
    triples = []
    for _ in range(draw(st.integers(0, 10))):
        a, b = draw(st.integers(0, 64)), draw(st.integers(0, 64))
        triples.append((base + min(a, b), base + max(a, b), draw(values)))
    broadcast = draw(st.one_of(st.none(), values))
    return triples, base, broadcast


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@given(data=st.data())
def test_assign_many_equals_sequential_assign(rangemap_cls, kind, data):
    """assign_many(starts, ends, values) == assign() per entry in order; scalars broadcast."""
    triples, base, broadcast = data.draw(bulk_assign_args(kind))
    bulk, scalar = rangemap_cls(), rangemap_cls()
    starts = [t[0] for t in triples]
    ends = [t[1] for t in triples]
    values = [t[2] for t in triples] if broadcast is None else [broadcast] * len(triples)
    # Empty lists have their own test (test_bulk_empty_input_is_noop).
    container = kind if triples else "uint64"

    def as_kind(xs):
        return _to_kind(xs, container)

    values_arg = as_kind(values) if broadcast is None else broadcast
    bulk.assign_many(as_kind(starts), as_kind(ends), values_arg)
    for start, end, value in zip(starts, ends, values, strict=True):
        scalar.assign(start, end, value)
    assert bulk.ranges() == scalar.ranges()
    assert len(bulk) == len(scalar)
    bulk._check()
    keys = [base + i for i in range(0, 66, 3)]
    got = bulk.get_many(_to_kind(keys, kind))
    assert got.dtype == np.uint64
    assert got.tolist() == [scalar.get(k) for k in keys]


# ---------------------------------------------------------------------------------------------
# Copying, pickling, equality
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_roundtrip(rangemap_cls, protocol, populated):
    """Pickling keeps the default and every run, and the clone is independent."""
    m = populated(default=5)
    clone = pickle.loads(pickle.dumps(m, protocol=protocol))
    assert type(clone) is type(m)
    assert clone == m
    assert clone.default == 5
    assert clone.ranges() == m.ranges()
    clone._check()
    clone.assign(0, 0x100, 1)
    assert m.ranges() == populated(default=5).ranges()


@pytest.mark.parametrize("how", ["method", "copy.copy", "copy.deepcopy"])
def test_copy_is_independent(rangemap_cls, how, populated):
    """A copy compares equal, and changing either side leaves the other alone."""
    m = populated(default=5)
    clone = {
        "method": m.copy,
        "copy.copy": lambda: copy.copy(m),
        "copy.deepcopy": lambda: copy.deepcopy(m),
    }[how]()
    assert type(clone) is type(m)
    assert clone == m
    assert clone.default == 5
    clone.assign(0, 0x100, 7)
    assert m.get(0x18) == 8
    m.clear()
    assert clone.get(0x18) == 7
    assert len(clone) == 2
    clone._check()


def test_equality_is_by_content(rangemap_cls):
    """Maps with the same default and runs are equal, however they were built."""
    a, b = rangemap_cls(), rangemap_cls()
    a.assign(0, 10, 8)
    b.assign(5, 10, 8)
    b.assign(0, 6, 8)
    assert a == b
    assert not a != b
    b.assign(9, 10, 1)
    assert a != b
    assert rangemap_cls(default=0) != rangemap_cls(default=8)
    assert a != a.ranges()
    assert a != None  # noqa: E711 -- exercising __eq__ with a foreign type


def test_unhashable(rangemap_cls):
    """A mutable map is not hashable."""
    with pytest.raises(TypeError, match="unhashable"):
        hash(rangemap_cls())


def test_repr_names_the_type(rangemap_cls, populated):
    """repr() works on empty and non-empty maps and names the type."""
    assert type(rangemap_cls()).__name__ in repr(rangemap_cls())
    assert type(rangemap_cls()).__name__ in repr(populated())
