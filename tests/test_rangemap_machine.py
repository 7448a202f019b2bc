"""The core against its twins over long random operation sequences, and under memory stress.

- ``TestRangeMapMachine``: a Hypothesis state machine runs every operation on RangeMap,
  SortedRangeMap and DictRangeMap at once and compares everything observable after each step.
- ``test_core_matches_sorted_at_scale``: tens of thousands of runs, checked op by op against
  SortedRangeMap (DictRangeMap would be too slow).
- ``test_stress_fill_and_clear_memory_is_bounded``: millions of runs created and cleared.
"""

import os
import pickle

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import pkvm
from pkvm.testing.reference import UINT64_MAX as U64
from pkvm.testing.reference import DictRangeMap, SortedRangeMap

VALUES = [0, 1, 8, U64]
"""Few values, so that equal neighbours (and coalescing) are common; every default is one."""


# ---------------------------------------------------------------------------------------------
# State machine: the core and both twins, step by step
# ---------------------------------------------------------------------------------------------

VALUE = st.sampled_from(VALUES)


class RangeMapMachine(RuleBasedStateMachine):
    """Runs every operation on RangeMap, SortedRangeMap and DictRangeMap and compares them.

    Keys live in a window of ``span + 1`` keys starting at ``base``; ``base`` is 0, the middle
    of the key space, or ``2**64 - 1 - span`` so that ``end == 2**64 - 1`` is reachable.  The
    core's test hook ``_fanout`` (runs per leaf and children per inner node) is often set to 4
    or 5, so that even a few dozen runs make a tree of several levels whose nodes split, borrow
    and merge; the ``fragment`` rule makes hundreds of runs in one step.
    """

    def __init__(self):
        super().__init__()
        self.maps = {}
        self.base = 0
        self.span = 0

    @initialize(
        where=st.sampled_from(["low", "mid", "top"]),
        span=st.sampled_from([64, 2048]),
        default=st.sampled_from([0, 8, U64]),
        fanout=st.sampled_from([4, 5, 16, None]),
    )
    def create(self, where, span, default, fanout):
        self.span = span
        self.base = {"low": 0, "mid": 2**63 - span // 2, "top": U64 - span}[where]
        self.maps = {
            "core": pkvm.RangeMap(default)
            if fanout is None
            else pkvm.RangeMap(default, _fanout=fanout),
            "sorted": SortedRangeMap(default),
            "dict": DictRangeMap(default),
        }

    def _range(self, data):
        lo = data.draw(st.integers(0, self.span), label="start - base")
        hi = data.draw(st.integers(lo, self.span), label="end - base")
        return self.base + lo, self.base + hi

    def _key(self, data):
        return self.base + data.draw(st.integers(0, self.span), label="key - base")

    def _agree(self, what, query):
        results = {name: query(m) for name, m in self.maps.items()}
        expected = results["dict"]
        assert all(r == expected for r in results.values()), f"{what} differs: {results}"

    # Updates.
    @rule(data=st.data(), value=VALUE)
    def assign(self, data, value):
        start, end = self._range(data)
        for m in self.maps.values():
            m.assign(start, end, value)

    @rule(data=st.data(), container=st.sampled_from(["uint64", "object"]), broadcast=st.booleans())
    def assign_many(self, data, container, broadcast):
        triples = [
            (*self._range(data), data.draw(VALUE)) for _ in range(data.draw(st.integers(1, 6)))
        ]
        starts, ends, values = (
            np.array(col, dtype=container) for col in zip(*triples, strict=True)
        )
        values = data.draw(VALUE) if broadcast else values
        for m in self.maps.values():
            m.assign_many(starts, ends, values)

    @rule(data=st.data(), value=VALUE, step=st.sampled_from([2, 3]))
    def fragment(self, data, value, step):
        """Many isolated one-key runs (or holes, for the default) in one bulk call."""
        start, end = self._range(data)
        starts = np.uint64(start) + np.arange(0, end - start, step, dtype=np.uint64)
        for m in self.maps.values():
            m.assign_many(starts, starts + np.uint64(1), value)

    @rule()
    def clear(self):
        for m in self.maps.values():
            m.clear()

    @rule(data=st.data(), value=VALUE, adopt=st.booleans())
    def copy_then_compare(self, data, value, adopt):
        """Copies equal their originals, and changing a copy leaves the original alone."""
        copies = {name: m.copy() for name, m in self.maps.items()}
        before = {name: m.ranges() for name, m in self.maps.items()}
        for name, m in self.maps.items():
            assert type(copies[name]) is type(m)
            assert copies[name] == m
        start, end = self._range(data)
        for c in copies.values():
            c.assign(start, end, value)
        for name, m in self.maps.items():
            assert m.ranges() == before[name]
        if adopt:
            self.maps = copies

    @rule()
    def pickle_roundtrip(self):
        self.maps = {name: pickle.loads(pickle.dumps(m)) for name, m in self.maps.items()}

    # Queries with random arguments.
    @rule(data=st.data())
    def get(self, data):
        key = self._key(data)
        self._agree(f"get({key:#x})", lambda m: m.get(key))

    @rule(data=st.data())
    def get_many(self, data):
        keys = np.array(data.draw(st.lists(st.integers(0, self.span), max_size=8)), dtype=np.uint64)
        keys += np.uint64(self.base)
        self._agree(f"get_many({keys})", lambda m: m.get_many(keys).tolist())

    @rule(data=st.data(), value=VALUE)
    def find_ne(self, data, value):
        start, end = self._range(data)
        self._agree(
            f"find_ne({start:#x}, {end:#x}, {value:#x})", lambda m: m.find_ne(start, end, value)
        )

    @rule(data=st.data())
    def run_at(self, data):
        key = min(self._key(data), U64 - 1)
        self._agree(f"run_at({key:#x})", lambda m: m.run_at(key))

    @rule(data=st.data())
    def ranges(self, data):
        start, end = self._range(data)
        self._agree(f"ranges({start:#x}, {end:#x})", lambda m: m.ranges(start, end))
        self._agree(f"iter_ranges({start:#x}, {end:#x})", lambda m: list(m.iter_ranges(start, end)))

    # After every step.
    @invariant()
    def all_agree(self):
        if not self.maps:
            return
        for m in self.maps.values():
            m._check()
        self._agree("len", len)
        self._agree("ranges()", lambda m: m.ranges())
        self._agree("default", lambda m: m.default)
        base, span = self.base, self.span
        keys = sorted({0, base, base + span // 2, base + span - 1, base + span, U64})
        self._agree(f"get at {keys}", lambda m: [m.get(k) for k in keys])
        self._agree("run_at", lambda m: [m.run_at(k) for k in keys if k < U64])
        self._agree(
            "find_ne over the window", lambda m: [m.find_ne(base, base + span, v) for v in VALUES]
        )
        if span <= 64:
            every_key = np.uint64(base) + np.arange(span + 1, dtype=np.uint64)
            self._agree("get_many over the window", lambda m: m.get_many(every_key).tolist())


TestRangeMapMachine = RangeMapMachine.TestCase


# ---------------------------------------------------------------------------------------------
# The core at scale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "fanout"),
    [
        pytest.param("low", None, id="low"),
        pytest.param("top", None, id="top"),
        pytest.param("low", 4, id="low-fanout-4"),
    ],
)
def test_core_matches_sorted_at_scale(where, fanout):
    """With 30,000 runs (a multi-level tree), the core matches SortedRangeMap op by op."""
    rng = np.random.default_rng(0 if where == "low" else 1)
    n_runs = 30_000
    space = 4 * n_runs + 64
    base = 0 if where == "low" else U64 - space
    core = pkvm.RangeMap() if fanout is None else pkvm.RangeMap(_fanout=fanout)
    model = SortedRangeMap()
    # Two-key runs two keys apart, inserted in random order so nodes split everywhere.
    starts = np.uint64(base) + rng.permutation(np.arange(0, 4 * n_runs, 4, dtype=np.uint64))
    values = rng.choice(np.array([1, 8, 9], dtype=np.uint64), size=n_runs)
    for m in (core, model):
        m.assign_many(starts, starts + np.uint64(2), values)
    core._check()
    assert core._depth() >= 2
    assert core.ranges() == model.ranges()

    def same(method, *args):
        assert getattr(core, method)(*args) == getattr(model, method)(*args), (method, args)

    for step in range(4000):
        length = 1 if step % 2 else int(2 ** rng.uniform(0, 10))
        start = base + int(rng.integers(0, space - length))
        value = int(rng.choice([0, 1, 8, 9]))
        core.assign(start, start + length, value)
        model.assign(start, start + length, value)
        key = base + int(rng.integers(0, space))
        same("get", key)
        same("run_at", key)
        same("find_ne", key, min(key + length, U64), value)
        same("__len__")
        if step % 1000 == 0:
            core._check()
            same("ranges")
    # Tear down in random chunk order, so nodes underflow and merge all over the tree.
    chunk = 1024
    for i, c in enumerate(rng.permutation(space // chunk + 1)):
        start = base + int(c) * chunk
        end = min(start + chunk, base + space)
        core.assign(start, end, 0)
        model.assign(start, end, 0)
        same("__len__")
        if i % 16 == 0:
            core._check()
            same("ranges", max(base, start - chunk), min(end + chunk, U64))
    core._check()
    assert len(core) == 0
    assert core.ranges() == []


def _rss_bytes():
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def test_stress_fill_and_clear_memory_is_bounded():
    """Three rounds of 2M isolated runs and clear(): RSS and nbytes do not grow per round."""
    n = 2_000_000
    rng = np.random.default_rng(2)
    starts = rng.permutation(np.arange(0, 2 * n, 2, dtype=np.uint64))
    ends = starts + np.uint64(1)
    m = pkvm.RangeMap()
    empty_nbytes = m.nbytes
    rss_before = _rss_bytes()
    full_nbytes, rss_growth = [], []
    for _ in range(3):
        m.assign_many(starts, ends, 8)
        assert len(m) == n
        full_nbytes.append(m.nbytes)
        rss_growth.append(_rss_bytes() - rss_before)
        m.clear()
        assert len(m) == 0
        assert m.ranges() == []
        assert m.nbytes <= empty_nbytes + 64 * 1024
    m._check()
    # Every run needs at least its 8-byte start somewhere in the map's own memory.
    assert full_nbytes[0] >= 8 * n
    assert full_nbytes[2] <= full_nbytes[0]
    # Round 1 also warms the allocator up (glibc raises its mmap threshold after the first
    # large free and keeps later scratch buffers in its heap), so leaks are judged between the
    # warm rounds: a leak of one round's nodes (over 30 MiB here) would show as growth from
    # round 2 to round 3.
    assert rss_growth[2] <= rss_growth[1] + 8 * 2**20, rss_growth
    assert rss_growth[2] <= 3 * rss_growth[0] + 64 * 2**20, rss_growth
