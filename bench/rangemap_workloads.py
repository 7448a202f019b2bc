"""RangeMap workloads shared by ``bench_rangemap.py`` (pytest-benchmark) and ``report.py``.

The key space is ``2**28`` keys: the GFNs of a 1 TiB guest.  Every workload is built from a
seeded numpy generator, so every implementation (and every run) sees the same operations.

- **W1 boot**: ``assign(i*512, (i+1)*512, 8)`` for ``i`` in ``range(2**19)``, in order, as a
  guest accepting its memory 2 MiB at a time.  Ends as one run ``[0, 2**28)``.
- **W2 churn**: 1,000,000 single-key toggles between 0 and 8 at uniform random keys, then
  1,000,000 point lookups at other uniform random keys in the resulting state.  The toggle values
  are precomputed (8 on a key's odd-numbered occurrence, 0 on its even ones) so that each timed
  operation is exactly one ``assign``.
- **W3 mixed**: 200,000 rounds of: assign a random range of ``floor(2**U(0, 18))`` keys a value
  in ``{0, 8}``; then ask whether another such range uniformly holds a value in ``{0, 8}``
  (``find_ne(...) == -1``).
- **W4 bulk**: W2 through ``assign_many`` / ``get_many`` (one-key ranges).

Implementations (``impl`` ids):

- ``core``: :class:`pkvm.RangeMap`, one Python call per operation.
- ``core-bulk``: :class:`pkvm.RangeMap` through ``assign_many`` / ``get_many``.
- ``sorted``: :class:`pkvm.testing.reference.SortedRangeMap`, per operation, on the first
  ``SORTED_OPS[workload]`` operations only (it is 10-100x slower); compare it by ns/op.
- ``numpy`` / ``numpy-bulk``: one byte per key (``np.zeros(2**28, np.uint8)``, 256 MiB),
  updated by ``arr[k] = v`` / ``arr[s:e] = v`` per operation or by fancy indexing in bulk;
  W3 asks ``(arr[s:e] != v).any()``.  Arrays are zero-filled (every page touched) before the
  clock starts, so page faults on first touch are not timed.

Every case has a ``check`` that compares the result with a model (the numpy array, or expected
runs derived from the operation sequence), so a fast wrong answer fails.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import pkvm
from pkvm.testing.reference import SortedRangeMap

N_KEYS = 2**28
"""GFNs of a 1 TiB guest (4 KiB pages)."""

SEED = 20_240_601
VALUE = 8  # the value the workloads store (KVM_MEMORY_ATTRIBUTE_PRIVATE)

FULL_OPS = {"W1": 2**19, "W2": 1_000_000, "W3": 200_000}
"""Operations per workload for every implementation except ``sorted``."""

SORTED_OPS = {"W1": 2**17, "W2": 100_000, "W3": 50_000}
"""Operations per workload for ``sorted`` (a prefix of the same sequence)."""

IMPLS = {
    "W1": ["core", "core-bulk", "sorted", "numpy", "floor"],
    "W2-toggle": ["core", "sorted", "numpy", "floor"],
    "W2-lookup": ["core", "sorted", "numpy", "floor"],
    "W3": ["core", "sorted", "numpy", "floor"],
    "W4-toggle": ["core-bulk", "numpy-bulk"],
    "W4-lookup": ["core-bulk", "numpy-bulk"],
}
"""Implementations run on each workload; the pytest-benchmark groups merge W4's two parts."""


def _scaled(n: int, scale: float) -> int:
    return max(1, int(n * scale))


def fresh_array() -> np.ndarray:
    """A zero byte per key, with every page already touched."""
    arr = np.zeros(N_KEYS, dtype=np.uint8)
    arr.fill(0)
    return arr


def runs_of_array(arr: np.ndarray) -> list[tuple[int, int, int]]:
    """The non-zero runs of a byte-per-key array, as ``RangeMap.ranges()`` would return them."""
    change = np.flatnonzero(arr[1:] != arr[:-1]) + 1
    bounds = np.concatenate(([0], change, [arr.size]))
    starts, ends = bounds[:-1], bounds[1:]
    values = arr[starts]
    keep = values != 0
    return list(zip(starts[keep].tolist(), ends[keep].tolist(), values[keep].tolist(), strict=True))


def runs_of_keys(keys: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of ``VALUE`` covering exactly the sorted, distinct ``keys``."""
    if keys.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(keys) != 1)
    starts = keys[np.concatenate(([0], breaks + 1))]
    ends = keys[np.concatenate((breaks, [keys.size - 1]))] + 1
    return [(s, e, VALUE) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def toggle_values(keys: np.ndarray) -> np.ndarray:
    """For each position, ``VALUE`` if it is the key's 1st, 3rd, ... occurrence, else 0."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    group_start = np.maximum.accumulate(np.where(first, np.arange(keys.size), 0))
    occurrence = np.empty(keys.size, dtype=np.int64)
    occurrence[order] = np.arange(keys.size) - group_start
    return np.where(occurrence % 2 == 0, VALUE, 0).astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# Workload data
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)  # hashed by identity, for the lru_cache'd methods
class WorkloadData:
    """Operation sequences (numpy arrays and, for per-op loops, Python lists) and models."""

    scale: float = 1.0

    def ops(self, workload: str, impl: str) -> int:
        """How many operations ``impl`` runs on ``workload`` (W2-*, W4-* count as W2)."""
        key = workload[:2]
        sizes = SORTED_OPS if impl == "sorted" else FULL_OPS
        return _scaled(sizes["W2" if key == "W4" else key], self.scale)

    def _rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([SEED, stream])

    # W1 ----------------------------------------------------------------------------------------
    @functools.cached_property
    def w1_starts(self) -> np.ndarray:
        return np.arange(_scaled(FULL_OPS["W1"], self.scale), dtype=np.uint64) * np.uint64(512)

    @functools.cached_property
    def w1_ends(self) -> np.ndarray:
        return self.w1_starts + np.uint64(512)

    @functools.cached_property
    def w1_lists(self) -> tuple[list[int], list[int]]:
        return self.w1_starts.tolist(), self.w1_ends.tolist()

    # W2 / W4 -------------------------------------------------------------------------------------
    @functools.cached_property
    def w2_keys(self) -> np.ndarray:
        return self._rng(2).integers(
            0, N_KEYS, size=_scaled(FULL_OPS["W2"], self.scale), dtype=np.uint64
        )

    @functools.cached_property
    def w2_ends(self) -> np.ndarray:
        return self.w2_keys + np.uint64(1)

    @functools.cached_property
    def w2_values(self) -> np.ndarray:
        return toggle_values(self.w2_keys)

    @functools.cached_property
    def w2_lists(self) -> tuple[list[int], list[int], list[int]]:
        return self.w2_keys.tolist(), self.w2_ends.tolist(), self.w2_values.tolist()

    @functools.cached_property
    def w2_lookups(self) -> np.ndarray:
        return self._rng(22).integers(
            0, N_KEYS, size=_scaled(FULL_OPS["W2"], self.scale), dtype=np.uint64
        )

    @functools.cached_property
    def w2_lookup_list(self) -> list[int]:
        return self.w2_lookups.tolist()

    @functools.cache  # noqa: B019 -- one WorkloadData per session
    def w2_set_keys(self, n_ops: int) -> np.ndarray:
        """Sorted keys holding ``VALUE`` after the first ``n_ops`` toggles."""
        keys, counts = np.unique(self.w2_keys[:n_ops], return_counts=True)
        return keys[counts % 2 == 1]

    @functools.cache  # noqa: B019
    def w2_runs(self, n_ops: int) -> list[tuple[int, int, int]]:
        """``ranges()`` after the first ``n_ops`` toggles."""
        return runs_of_keys(self.w2_set_keys(n_ops))

    @functools.cache  # noqa: B019
    def w2_hits(self, n_lookups: int) -> int:
        """How many of the first ``n_lookups`` lookups find ``VALUE`` after all toggles."""
        full = self.w2_set_keys(self.w2_keys.size)
        return int(np.isin(self.w2_lookups[:n_lookups], full).sum())

    def w2_state(self, impl: str) -> Any:
        """The state after all W2 toggles, built once per implementation family (untimed)."""
        return self._w2_state(impl.split("-")[0])

    @functools.cache  # noqa: B019
    def _w2_state(self, family: str) -> Any:
        if family == "core":
            m = pkvm.RangeMap()
            m.assign_many(self.w2_keys, self.w2_ends, self.w2_values)  # the same tree as per-op
            return m
        if family == "sorted":
            return SortedRangeMap._from_runs(0, self.w2_runs(self.w2_keys.size))
        arr = fresh_array()
        arr[self.w2_set_keys(self.w2_keys.size)] = VALUE
        return arr

    # W3 ----------------------------------------------------------------------------------------
    def _w3_ranges(
        self, rng: np.random.Generator, n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lengths = np.floor(2.0 ** rng.uniform(0, 18, size=n)).astype(np.int64)
        starts = rng.integers(0, N_KEYS - lengths + 1)
        values = rng.choice(np.array([0, VALUE]), size=n)
        return starts, starts + lengths, values

    @functools.cached_property
    def w3_lists(self) -> tuple[list[int], ...]:
        """Assign starts, ends, values, then query starts, ends, values, as lists of ints."""
        rng = self._rng(3)
        n = _scaled(FULL_OPS["W3"], self.scale)
        return tuple(a.tolist() for a in (*self._w3_ranges(rng, n), *self._w3_ranges(rng, n)))

    @functools.cached_property
    def w3_model(self) -> dict[int, tuple[int, list[tuple[int, int, int]]]]:
        """``{n_ops: (uniform answers, final runs)}`` for both op counts, from a numpy array."""
        checkpoints = {self.ops("W3", "core"), self.ops("W3", "sorted")}
        arr = fresh_array()
        out = {}
        uniform = 0
        for i, (s, e, v, qs, qe, qv) in enumerate(zip(*self.w3_lists, strict=True), start=1):
            arr[s:e] = v
            uniform += not (arr[qs:qe] != qv).any()
            if i in checkpoints:
                out[i] = (uniform, runs_of_array(arr))
        return out


# ---------------------------------------------------------------------------------------------
# Cases: setup (untimed), run (timed), check (untimed)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One implementation on one workload."""

    workload: str
    impl: str
    ops: int
    setup: Callable[[], tuple[Any, ...]]  # fresh arguments for ``run``
    run: Callable[..., Any]
    check: Callable[[Any], None]  # raises AssertionError if ``run`` returned a wrong result


class CallFloor:
    """The fixed cost of a per-op loop: the same calls, each answered in O(1).

    Its ``assign``, ``get`` and ``find_ne`` are methods of an empty RangeMap taking the same
    integer arguments (``assign`` is the empty map's ``find_ne``, which converts and checks
    three integers and returns at once), so a loop over it costs what the interpreter, the
    argument objects and one core call cost -- the floor under any per-op implementation.
    """

    def __init__(self) -> None:
        self.empty = pkvm.RangeMap()
        self.assign = self.empty.find_ne
        self.get = self.empty.get
        self.find_ne = self.empty.find_ne

    def ranges(self) -> list[tuple[int, int, int]]:
        return self.empty.ranges()


def _new_map(impl: str) -> Any:
    if impl == "floor":
        return CallFloor()
    return SortedRangeMap() if impl == "sorted" else pkvm.RangeMap()


def _floor_check(expected: Any) -> Callable[[Any], None]:
    """The floor changes nothing: its map stays empty; lookups find nothing."""

    def check(result: Any) -> None:
        state = result[1] if isinstance(result, tuple) else result
        if isinstance(state, CallFloor):
            assert state.ranges() == [], "the call floor changed its map"
        if expected is not None:
            got = result[0] if isinstance(result, tuple) else result
            assert got == expected, f"call floor answered {got}, expected {expected}"

    return check


def check_runs(expected: list[tuple[int, int, int]]) -> Callable[[Any], None]:
    def check(state: Any) -> None:
        got = runs_of_array(state) if isinstance(state, np.ndarray) else state.ranges()
        assert len(got) == len(expected), f"{len(got)} runs, expected {len(expected)}"
        assert got == expected, "runs differ from the model"

    return check


def _check_equal(expected: Any) -> Callable[[Any], None]:
    def check(got: Any) -> None:
        assert got == expected, f"got {got}, expected {expected}"

    return check


# Per-op loops bind the method once, as hot Python loops do; numpy uses subscripts.


def _w1_map(m, starts, ends):
    assign = m.assign
    for s, e in zip(starts, ends, strict=True):
        assign(s, e, VALUE)
    return m


def _w1_map_bulk(m, starts, ends):
    m.assign_many(starts, ends, VALUE)
    return m


def _w1_numpy(arr, starts, ends):
    for s, e in zip(starts, ends, strict=True):
        arr[s:e] = VALUE
    return arr


def _w2_toggle_map(m, keys, ends, values):
    assign = m.assign
    for k, e, v in zip(keys, ends, values, strict=True):
        assign(k, e, v)
    return m


def _w2_toggle_numpy(arr, keys, values):
    for k, v in zip(keys, values, strict=True):
        arr[k] = v
    return arr


def _w2_lookup_map(m, keys):
    get = m.get
    hits = 0
    for k in keys:
        if get(k):
            hits += 1
    return hits


def _w2_lookup_numpy(arr, keys):
    hits = 0
    for k in keys:
        if arr[k]:
            hits += 1
    return hits


def _w3_map(m, a_starts, a_ends, a_values, q_starts, q_ends, q_values):
    assign, find_ne = m.assign, m.find_ne
    uniform = 0
    for s, e, v, qs, qe, qv in zip(
        a_starts, a_ends, a_values, q_starts, q_ends, q_values, strict=True
    ):
        assign(s, e, v)
        if find_ne(qs, qe, qv) < 0:
            uniform += 1
    return uniform, m


def _w3_numpy(arr, a_starts, a_ends, a_values, q_starts, q_ends, q_values):
    uniform = 0
    for s, e, v, qs, qe, qv in zip(
        a_starts, a_ends, a_values, q_starts, q_ends, q_values, strict=True
    ):
        arr[s:e] = v
        if not (arr[qs:qe] != qv).any():
            uniform += 1
    return uniform, arr


def _w4_toggle_map(m, keys, ends, values):
    m.assign_many(keys, ends, values)
    return m


def _w4_toggle_numpy(arr, keys, values):
    # Repeated keys: numpy assigns in index order for 1-D arrays, so the last toggle wins
    # (numpy does not promise this; the check would catch a change).
    arr[keys] = values
    return arr


def _w4_lookup_map(m, keys):
    return int(np.count_nonzero(m.get_many(keys)))


def _w4_lookup_numpy(arr, keys):
    return int(np.count_nonzero(arr[keys]))


def make_case(data: WorkloadData, workload: str, impl: str) -> Case:
    """The :class:`Case` for ``impl`` on ``workload`` (see ``IMPLS``)."""
    n = data.ops(workload, impl)
    if workload == "W1":
        check = check_runs([(0, n * 512, VALUE)])
        if impl == "core-bulk":
            return Case(
                workload,
                impl,
                n,
                lambda: (pkvm.RangeMap(), data.w1_starts[:n], data.w1_ends[:n]),
                _w1_map_bulk,
                check,
            )
        starts, ends = (x[:n] for x in data.w1_lists)
        if impl == "floor":
            check = _floor_check(None)
        if impl == "numpy":
            return Case(workload, impl, n, lambda: (fresh_array(), starts, ends), _w1_numpy, check)
        return Case(workload, impl, n, lambda: (_new_map(impl), starts, ends), _w1_map, check)

    if workload == "W2-toggle":
        keys, ends, values = (x[:n] for x in data.w2_lists)
        check = _floor_check(None) if impl == "floor" else check_runs(data.w2_runs(n))
        if impl == "numpy":
            return Case(
                workload, impl, n, lambda: (fresh_array(), keys, values), _w2_toggle_numpy, check
            )
        return Case(
            workload, impl, n, lambda: (_new_map(impl), keys, ends, values), _w2_toggle_map, check
        )

    if workload == "W2-lookup":
        keys = data.w2_lookup_list[:n]
        if impl == "floor":
            return Case(workload, impl, n, lambda: (CallFloor(), keys), _w2_lookup_map,
                        _floor_check(0))
        check = _check_equal(data.w2_hits(n))
        run = _w2_lookup_numpy if impl == "numpy" else _w2_lookup_map
        return Case(workload, impl, n, lambda: (data.w2_state(impl), keys), run, check)

    if workload == "W3":
        ops = [x[:n] for x in data.w3_lists]
        if impl == "floor":
            # On an empty map a query range is uniform exactly when it asks for the default 0.
            zeros = sum(1 for v in ops[5] if v == 0)
            return Case(workload, impl, n, lambda: (CallFloor(), *ops), _w3_map, _floor_check(zeros))
        uniform, runs = data.w3_model[n]
        final_state_ok = check_runs(runs)

        def check(result: tuple[int, Any]) -> None:
            assert result[0] == uniform, f"{result[0]} uniform answers, expected {uniform}"
            final_state_ok(result[1])

        if impl == "numpy":
            return Case(workload, impl, n, lambda: (fresh_array(), *ops), _w3_numpy, check)
        return Case(workload, impl, n, lambda: (_new_map(impl), *ops), _w3_map, check)

    if workload == "W4-toggle":
        check = check_runs(data.w2_runs(n))
        if impl == "numpy-bulk":
            return Case(
                workload,
                impl,
                n,
                lambda: (fresh_array(), data.w2_keys, data.w2_values),
                _w4_toggle_numpy,
                check,
            )
        return Case(
            workload,
            impl,
            n,
            lambda: (pkvm.RangeMap(), data.w2_keys, data.w2_ends, data.w2_values),
            _w4_toggle_map,
            check,
        )

    if workload == "W4-lookup":
        check = _check_equal(data.w2_hits(n))
        run = _w4_lookup_numpy if impl == "numpy-bulk" else _w4_lookup_map
        return Case(workload, impl, n, lambda: (data.w2_state(impl), data.w2_lookups), run, check)

    raise ValueError(f"unknown workload {workload!r}; expected one of {sorted(IMPLS)}")


# ---------------------------------------------------------------------------------------------
# Memory of the post-W2 state
# ---------------------------------------------------------------------------------------------


def build_w2_state(impl: str, data: WorkloadData) -> Any:
    """Build the post-W2 state the fastest way each implementation offers.

    ``assign_many`` of the toggles for the core, ``SortedRangeMap._from_runs`` (one sort, no
    per-run inserts) for sorted, one fancy-indexed store for numpy.
    """
    n = data.ops("W2-toggle", "core")
    if impl == "core":
        m = pkvm.RangeMap()
        m.assign_many(data.w2_keys[:n], data.w2_ends[:n], data.w2_values[:n])
        return m
    if impl == "sorted":
        return SortedRangeMap._from_runs(0, data.w2_runs(n))
    if impl == "numpy":
        arr = fresh_array()
        arr[data.w2_set_keys(n)] = VALUE
        return arr
    raise ValueError(f"unknown impl {impl!r}; expected 'core', 'sorted' or 'numpy'")


def nbytes_of(state: Any) -> int:
    """Bytes owned by a state: ``RangeMap.nbytes`` (exact C memory), ``SortedRangeMap.nbytes``
    (approximate), or the array's size."""
    return int(state.nbytes)


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _w2_memory_here(impl: str, scale: float) -> dict[str, Any]:
    data = WorkloadData(scale=scale)
    n = data.ops("W2-toggle", "core")
    expected = data.w2_runs(n)
    data.w2_set_keys(n), data.w2_ends, data.w2_values  # build the inputs before measuring
    gc.collect()
    before = rss_bytes()
    state = build_w2_state(impl, data)
    growth = rss_bytes() - before
    check_runs(expected)(state)
    return {"impl": impl, "runs": len(expected), "nbytes": nbytes_of(state), "rss_growth": growth}


def measure_w2_memory(impl: str, scale: float = 1.0) -> dict[str, Any]:
    """``runs``, ``nbytes`` and ``rss_growth`` of the post-W2 state, built in a fresh interpreter.

    A fresh process is needed because a long-lived one reuses memory that earlier work freed,
    which hides the growth.  For the same reason glibc's malloc gets fixed thresholds there:
    large temporaries (building the inputs) are unmapped when freed instead of staying resident
    for the state to reuse.  Objects the state shares with its inputs (sorted's int keys) are
    not part of the growth.
    """
    code = (
        "import json, rangemap_workloads as wl; "
        f"print(json.dumps(wl._w2_memory_here({impl!r}, {scale!r})))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)
