"""Slow, obviously-correct twins of :class:`pkvm.RangeMap`, used as test oracles and baselines.

This module plays the part of msgpack's ``fallback.py``: it re-implements the public API of the
typed core in plain Python so that tests can run the same operations on the core and on a model
whose correctness is easy to see, and so that benchmarks can show what the Cython core buys.

- :class:`DictRangeMap` stores one dict entry per key whose value is not ``default``.  Every
  operation is a loop over keys, so it is only usable for small key sets (a few thousand keys per
  operation), but each method is a few lines that can be checked by eye.  Runs are derived from
  the dict when asked for, never stored.
- :class:`SortedRangeMap` stores coalesced runs in a :class:`sortedcontainers.SortedDict`
  (``start -> (end, value)``).  Each operation is ``O(log n)`` plus the runs it touches; it is
  the best pure-Python peer and the benchmark baseline.

Both follow the core's contract exactly:

- Keys and values are ``uint64``; ranges are half-open ``[start, end)`` with
  ``0 <= start <= end <= 2**64 - 1``, so the key ``2**64 - 1`` is never stored and always reads
  as ``default``.
- Invariants: stored runs are non-empty, sorted, non-overlapping, never hold ``default``, and
  two touching runs never hold the same value (they are coalesced).
- Input is validated by the shared helpers below before anything changes, with the core's error
  contract (``TypeError`` for non-integers, ``OverflowError`` for values outside ``uint64``,
  ``ValueError`` for ``start > end`` and malformed arrays; every message names the argument).
  A call that raises leaves the map unchanged.
"""

from __future__ import annotations

import operator
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
from sortedcontainers import SortedDict  # type: ignore[import-untyped]  # no stubs

# The per-gfn reference VM (the KVM model's oracle) lives in its own module for size; it is
# re-exported here so that every slow, obviously-correct twin is found in one place.
from pkvm.testing.reference_vm import ReferenceVM

__all__ = ["UINT64_MAX", "DictRangeMap", "ReferenceVM", "SortedRangeMap"]

UINT64_MAX = 2**64 - 1
"""Largest ``uint64``: the largest valid ``end`` and a key that is never stored."""

Run = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------
# Validation shared by both twins (the core's error contract)
# ---------------------------------------------------------------------------------------------


def _as_int(obj: Any, name: str) -> int:
    """``obj`` as a Python int; anything with ``__index__`` (bool, numpy integers) qualifies."""
    try:
        return operator.index(obj)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(obj).__name__}") from None


def _as_uint64(obj: Any, name: str) -> int:
    """``obj`` as a Python int in ``[0, 2**64 - 1]``."""
    value = _as_int(obj, name)
    if not 0 <= value <= UINT64_MAX:
        raise OverflowError(f"{name} out of range for uint64: {value}")
    return value


def _as_range(start: Any, end: Any) -> tuple[int, int]:
    """Validate a half-open range ``[start, end)``."""
    start = _as_uint64(start, "start")
    end = _as_uint64(end, "end")
    if start > end:
        raise ValueError(f"start {start:#x} > end {end:#x}: ranges are half-open [start, end)")
    return start, end


def _as_run_key(key: Any) -> int:
    """Validate a key for :meth:`run_at`, which has no run to return for ``2**64 - 1``."""
    k = _as_uint64(key, "key")
    if k == UINT64_MAX:
        raise OverflowError(
            f"key {k:#x} is outside every run: run_at needs key < 2**64 - 1 "
            "(use get(key), which always returns default there)"
        )
    return k


def _as_uint64_array(obj: Any, name: str) -> np.ndarray:
    """``obj`` as a 1-D ``uint64`` array, with the scalar rules applied to each element.

    Integer arrays are range-checked as a whole; object arrays element by element.  Arrays of
    any other dtype (float, bool, complex, str, ...) are rejected.  A sequence that is not an
    array (a list, a tuple) is read exactly: when numpy would turn it into a non-integer dtype
    (``[1, 2**64 - 1]`` becomes float64, ``[]`` float64), its elements are checked one by one as
    scalars instead, so a list of Python ints is never rounded.
    """
    try:
        arr = np.asarray(obj)
        if not isinstance(obj, np.ndarray) and arr.dtype.kind not in "iu":
            arr = np.asarray(obj, dtype=object)
    except ValueError as exc:  # ragged nesting
        raise ValueError(f"{name} must be a 1-dimensional integer array: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, not {arr.ndim}-dimensional")
    kind = arr.dtype.kind
    if kind == "u":
        return arr.astype(np.uint64, copy=False)
    if kind == "i":
        negative = np.flatnonzero(arr < 0)
        if negative.size:
            i = int(negative[0])
            raise OverflowError(f"{name}[{i}] out of range for uint64: {int(arr[i])}")
        return arr.astype(np.uint64)
    if kind == "O":
        return np.array(
            [_as_uint64(item, f"{name}[{i}]") for i, item in enumerate(arr)], dtype=np.uint64
        )
    raise TypeError(f"{name} must be an array of integers, not of {arr.dtype}")


def _as_bulk_assign(starts: Any, ends: Any, values: Any) -> tuple[list[int], list[int], list[int]]:
    """Validate the arguments of ``assign_many`` and return them as lists of Python ints."""
    starts_arr = _as_uint64_array(starts, "starts")
    ends_arr = _as_uint64_array(ends, "ends")
    n = len(starts_arr)
    if len(ends_arr) != n:
        raise ValueError(f"starts and ends must have the same length: {n} != {len(ends_arr)}")
    if np.ndim(values) == 0:
        values_list = [_as_uint64(values, "values")] * n
    else:
        values_arr = _as_uint64_array(values, "values")
        if len(values_arr) != n:
            raise ValueError(
                "values must be a scalar or have the same length as starts: "
                f"{len(values_arr)} != {n}"
            )
        values_list = values_arr.tolist()
    backwards = np.flatnonzero(starts_arr > ends_arr)
    if backwards.size:
        i = int(backwards[0])
        raise ValueError(
            f"starts[{i}] {int(starts_arr[i]):#x} > ends[{i}] {int(ends_arr[i]):#x}: "
            "ranges are half-open [start, end)"
        )
    return starts_arr.tolist(), ends_arr.tolist(), values_list


def _rebuild(cls: type[_RangeMapBase], default: int, runs: list[Run]) -> _RangeMapBase:
    """Unpickle helper: a ``cls`` holding ``runs``."""
    return cls._from_runs(default, runs)


# ---------------------------------------------------------------------------------------------
# _RangeMapBase: public API, validation, then a call to the storage-specific private method
# ---------------------------------------------------------------------------------------------


class _RangeMapBase(ABC):
    """Public methods shared by the twins; subclasses supply the ``_`` methods on valid input."""

    __slots__ = ("_default",)

    def __init__(self, default: int = 0) -> None:
        self._default = _as_uint64(default, "default")

    # Storage-specific methods.  Arguments are already validated Python ints.
    def _reserve(self, start: int, end: int) -> None:
        """Raise, before anything changes, if ``_assign(start, end, ...)`` could not complete."""

    @abstractmethod
    def _assign(self, start: int, end: int, value: int) -> None:
        ...

    @abstractmethod
    def _get(self, key: int) -> int:
        ...

    @abstractmethod
    def _find_ne(self, start: int, end: int, value: int) -> int:
        ...

    @abstractmethod
    def _run_at(self, key: int) -> Run:
        ...

    @abstractmethod
    def _iter(self, start: int, end: int) -> Iterator[Run]:
        ...

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def clear(self) -> None:
        """Remove every stored run, so every key reads as ``default``."""

    @abstractmethod
    def _check(self) -> None:
        """Raise ``AssertionError`` naming the offending run if an invariant does not hold."""

    @classmethod
    def _from_runs(cls, default: int, runs: Iterable[Run]) -> _RangeMapBase:
        """A map holding ``runs``: ``(start, end, value)`` triples as returned by :meth:`ranges`."""
        new = cls(default)
        for start, end, value in runs:
            new._assign(start, end, value)
        return new

    # Public API.
    @property
    def default(self) -> int:
        """Value of every key not covered by a stored run."""
        return self._default

    def assign(self, start: int, end: int, value: int) -> None:
        """Set every key in the half-open range ``[start, end)`` to ``value``.

        ``start == end`` is a no-op.  Assigning ``default`` deletes; touching runs with equal
        values merge.
        """
        start, end = _as_range(start, end)
        value = _as_uint64(value, "value")
        self._reserve(start, end)
        self._assign(start, end, value)

    def get(self, key: int) -> int:
        """Value of ``key`` (``default`` if no stored run covers it)."""
        return self._get(_as_uint64(key, "key"))

    def find_ne(self, start: int, end: int, value: int) -> int:
        """First key in the half-open range ``[start, end)`` whose value is not ``value``, or -1."""
        start, end = _as_range(start, end)
        value = _as_uint64(value, "value")
        return self._find_ne(start, end, value)

    def run_at(self, key: int) -> Run:
        """The maximal run ``(start, end, value)`` containing ``key``; gaps are runs of ``default``.

        ``key`` must be below ``2**64 - 1``; the returned ``end`` is at most ``2**64 - 1``.
        """
        return self._run_at(_as_run_key(key))

    def ranges(self, start: int = 0, end: int | None = None) -> list[Run]:
        """Stored runs intersecting the half-open range ``[start, end)``, clipped to it, in order.

        ``end=None`` means ``2**64 - 1``.
        """
        return list(self.iter_ranges(start, end))

    def iter_ranges(self, start: int = 0, end: int | None = None) -> Iterator[Run]:
        """Like :meth:`ranges` but lazy; arguments are validated at call time.

        The map must not be modified while iterating.
        """
        start, end = _as_range(start, UINT64_MAX if end is None else end)
        return self._iter(start, end)

    def assign_many(
        self, starts: npt.ArrayLike, ends: npt.ArrayLike, values: npt.ArrayLike | int
    ) -> None:
        """:meth:`assign` for every ``i`` in array order (later entries win).

        Everything is validated before anything changes; ``values`` may be a scalar.
        """
        starts_list, ends_list, values_list = _as_bulk_assign(starts, ends, values)
        for start, end in zip(starts_list, ends_list, strict=True):
            self._reserve(start, end)
        for start, end, value in zip(starts_list, ends_list, values_list, strict=True):
            self._assign(start, end, value)

    def get_many(self, keys: npt.ArrayLike) -> npt.NDArray[np.uint64]:
        """Values of ``keys`` as a ``uint64`` array."""
        keys_list = _as_uint64_array(keys, "keys").tolist()
        return np.array([self._get(key) for key in keys_list], dtype=np.uint64)

    def copy(self) -> _RangeMapBase:
        """An independent map with the same default and runs."""
        return self._from_runs(self._default, self._iter(0, UINT64_MAX))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._default == other._default and self.ranges() == other.ranges()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self._default, self.ranges())

    def __repr__(self) -> str:
        shown = 4
        runs = []
        for i, (start, end, value) in enumerate(self._iter(0, UINT64_MAX)):
            if i == shown:
                runs.append("...")
                break
            runs.append(f"[{start:#x}, {end:#x}): {value:#x}")
        name = type(self).__name__
        return f"{name}(default={self._default:#x}) <{len(self)} runs: {', '.join(runs)}>"


# ---------------------------------------------------------------------------------------------
# DictRangeMap: one dict entry per non-default key
# ---------------------------------------------------------------------------------------------


class DictRangeMap(_RangeMapBase):
    """Per-key model of :class:`pkvm.RangeMap`: ``{key: value}`` for every non-default key.

    Runs exist only as a view computed by :meth:`ranges`.  Operations cost ``O(keys touched)``
    or ``O(keys stored)``; use it for key sets of a few thousand keys.  An ``assign`` over more
    than ``MAX_ASSIGN_KEYS`` keys raises ``ValueError`` instead of exhausting memory (the core
    and :class:`SortedRangeMap` accept it).  No ``nbytes``.

    >>> m = DictRangeMap()
    >>> m.assign(0x10, 0x20, 8)
    >>> m.assign(0x18, 0x20, 0)
    >>> m.ranges()
    [(16, 24, 8)]
    """

    __slots__ = ("_values",)

    MAX_ASSIGN_KEYS = 1 << 22
    """Largest range :meth:`assign` will walk key by key."""

    def __init__(self, default: int = 0) -> None:
        super().__init__(default)
        self._values: dict[int, int] = {}

    def _reserve(self, start: int, end: int) -> None:
        if end - start > self.MAX_ASSIGN_KEYS:
            raise ValueError(
                f"DictRangeMap stores one entry per key: [{start:#x}, {end:#x}) has "
                f"{end - start} keys, more than MAX_ASSIGN_KEYS ({self.MAX_ASSIGN_KEYS})"
            )

    def _assign(self, start: int, end: int, value: int) -> None:
        for key in range(start, end):
            if value == self._default:
                self._values.pop(key, None)
            else:
                self._values[key] = value

    def _get(self, key: int) -> int:
        return self._values.get(key, self._default)

    def _find_ne(self, start: int, end: int, value: int) -> int:
        if value == self._default:
            # Every stored key differs from default.
            return min((key for key in self._values if start <= key < end), default=-1)
        # Keys equal to a non-default value are stored, so this walks at most len(self) keys.
        for key in range(start, end):
            if self._get(key) != value:
                return key
        return -1

    def _run_at(self, key: int) -> Run:
        if key in self._values:
            value = self._values[key]
            start, end = key, key + 1
            while start > 0 and self._values.get(start - 1) == value:
                start -= 1
            while self._values.get(end) == value:  # stops by 2**64 - 1, which is never stored
                end += 1
            return start, end, value
        start = max((k + 1 for k in self._values if k < key), default=0)
        end = min((k for k in self._values if k > key), default=UINT64_MAX)
        return start, end, self._default

    def _iter(self, start: int, end: int) -> Iterator[Run]:
        run: list[int] | None = None
        for key in sorted(k for k in self._values if start <= k < end):
            value = self._values[key]
            if run is not None and run[1] == key and run[2] == value:
                run[1] = key + 1
                continue
            if run is not None:
                yield run[0], run[1], run[2]
            run = [key, key + 1, value]
        if run is not None:
            yield run[0], run[1], run[2]

    def __len__(self) -> int:
        return sum(1 for _ in self._iter(0, UINT64_MAX))

    def clear(self) -> None:
        """Remove every stored key."""
        self._values.clear()

    def copy(self) -> DictRangeMap:
        """An independent map with the same default and keys."""
        new = DictRangeMap(self._default)
        new._values = dict(self._values)
        return new

    def _check(self) -> None:
        """Assert every stored key is a valid key (never ``2**64 - 1``) with a non-default value."""
        for key, value in self._values.items():
            if not (type(key) is int and 0 <= key < UINT64_MAX):
                raise AssertionError(f"stored key {key!r} is not in [0, 2**64 - 1)")
            if not (type(value) is int and 0 <= value <= UINT64_MAX):
                raise AssertionError(f"key {key:#x} holds {value!r}, not a uint64")
            if value == self._default:
                raise AssertionError(f"key {key:#x} stores the default {value:#x}")


# ---------------------------------------------------------------------------------------------
# SortedRangeMap: coalesced runs in a SortedDict
# ---------------------------------------------------------------------------------------------


class SortedRangeMap(_RangeMapBase):
    """:class:`pkvm.RangeMap` on a :class:`~sortedcontainers.SortedDict`: ``start -> (end, value)``.

    Runtime complexity: ``O(log n + k)`` for ``assign`` (``k`` runs overwritten) and
    ``ranges`` (``k`` runs returned); ``O(log n)`` for ``get``, ``find_ne`` and ``run_at``;
    ``O(1)`` for ``len``.

    >>> m = SortedRangeMap()
    >>> m.assign(0x10, 0x20, 8)
    >>> m.assign(0x20, 0x30, 8)
    >>> m.run_at(0x2f), len(m)
    ((16, 48, 8), 1)
    """

    __slots__ = ("_runs",)

    def __init__(self, default: int = 0) -> None:
        super().__init__(default)
        self._runs: SortedDict = SortedDict()

    @classmethod
    def _from_runs(cls, default: int, runs: Iterable[Run]) -> SortedRangeMap:
        """A map holding ``runs``, trusted to be valid (sorted, disjoint, coalesced, non-default).

        Builds the SortedDict in one sort instead of ``n`` inserts.
        """
        new = cls(default)
        new._runs = SortedDict((start, (end, value)) for start, end, value in runs)
        return new

    def _assign(self, start: int, end: int, value: int) -> None:
        if start == end:
            return
        runs = self._runs
        store = value != self._default
        new_start, new_end = start, end
        # The run starting before `start`, if any, may cover, overlap or touch [start, end).
        i = runs.bisect_left(start)
        if i:
            left_start, (left_end, left_value) = runs.peekitem(i - 1)
            if left_end > end:  # [start, end) lies strictly inside it
                if left_value == value:
                    return
                runs[left_start] = (start, left_value)
                runs[end] = (left_end, left_value)
                if store:
                    runs[start] = (end, value)
                return
            if left_end >= start and left_value == value:  # overlaps or touches: absorb it
                new_start = left_start
                del runs[left_start]
            elif left_end > start:  # overlaps with another value: keep its head
                runs[left_start] = (start, left_value)
        # Runs starting in [start, end]; the one starting at `end` only touches.
        for run_start in list(runs.irange(start, end)):
            run_end, run_value = runs[run_start]
            if run_start == end and run_value != value:
                break
            del runs[run_start]
            if run_end > end:
                if run_value == value:
                    new_end = run_end
                else:  # keep its tail
                    runs[end] = (run_end, run_value)
        if store:
            runs[new_start] = (new_end, value)

    def _get(self, key: int) -> int:
        i = self._runs.bisect_right(key)
        if i:
            _, (end, value) = self._runs.peekitem(i - 1)
            if key < end:
                return int(value)
        return self._default

    def _find_ne(self, start: int, end: int, value: int) -> int:
        if start == end:
            return -1
        runs = self._runs
        default_differs = self._default != value
        pos = start  # every key in [start, pos) holds `value`
        i = runs.bisect_right(start)
        if i:
            _, (run_end, run_value) = runs.peekitem(i - 1)
            if run_end > start:
                if run_value != value:
                    return start
                pos = run_end
        # Equal runs are coalesced, so this loop returns after at most two runs unless value is
        # the default, in which case it returns at the first run.
        for run_start in runs.irange(pos, end, inclusive=(True, False)):
            if run_start > pos and default_differs:
                return pos
            run_end, run_value = runs[run_start]
            if run_value != value:
                return int(run_start)
            pos = run_end
        if pos < end and default_differs:
            return pos
        return -1

    def _run_at(self, key: int) -> Run:
        runs = self._runs
        i = runs.bisect_right(key)
        gap_start = 0
        if i:
            run_start, (run_end, run_value) = runs.peekitem(i - 1)
            if key < run_end:
                return run_start, run_end, run_value
            gap_start = run_end
        gap_end = runs.peekitem(i)[0] if i < len(runs) else UINT64_MAX
        return gap_start, gap_end, self._default

    def _iter(self, start: int, end: int) -> Iterator[Run]:
        if start == end:
            return
        runs = self._runs
        i = runs.bisect_left(start)  # runs[:i] start before `start`; the last may overlap it
        if i:
            _, (run_end, run_value) = runs.peekitem(i - 1)
            if run_end > start:
                yield start, min(run_end, end), run_value
        for run_start in runs.irange(start, end, inclusive=(True, False)):
            run_end, run_value = runs[run_start]
            yield run_start, min(run_end, end), run_value

    def __len__(self) -> int:
        return len(self._runs)

    def clear(self) -> None:
        """Remove every stored run."""
        self._runs.clear()

    def copy(self) -> SortedRangeMap:
        """An independent map with the same default and runs."""
        new = SortedRangeMap(self._default)
        new._runs = self._runs.copy()
        return new

    @property
    def nbytes(self) -> int:
        """Approximate bytes of Python objects owned by the map.

        ``sys.getsizeof`` of the SortedDict (its hash table), of sortedcontainers' internal key
        lists, and of each run's ``(end, value)`` tuple and int objects, except CPython's shared
        small ints (-5 to 256).  Other ints shared with outside objects are counted as owned;
        allocator overhead is not counted.  ``O(n)``.
        """

        def int_size(x: int) -> int:
            return 0 if -5 <= x <= 256 else sys.getsizeof(x)

        runs = self._runs
        keys = runs._list  # sortedcontainers internals (stable since 2.0): a list of key lists
        total = sys.getsizeof(runs) + sys.getsizeof(keys._lists) + sys.getsizeof(keys._maxes)
        total += sys.getsizeof(keys._index) + sum(map(sys.getsizeof, keys._lists))
        for start, run in runs.items():
            total += int_size(start) + int_size(run[0]) + int_size(run[1]) + sys.getsizeof(run)
        return total

    def _check(self) -> None:
        """Assert runs are non-empty, disjoint, coalesced, in uint64 and never hold default."""
        prev: Run | None = None
        for start, (end, value) in self._runs.items():
            run = f"[{start:#x}, {end:#x}): {value:#x}"
            if not 0 <= start < end <= UINT64_MAX:
                raise AssertionError(f"run {run} is empty or outside [0, 2**64 - 1)")
            if not 0 <= value <= UINT64_MAX:
                raise AssertionError(f"run {run} holds a value outside uint64")
            if value == self._default:
                raise AssertionError(f"run {run} stores the default")
            if prev is not None:
                if prev[1] > start:
                    raise AssertionError(
                        f"run {run} overlaps the previous run ending at {prev[1]:#x}"
                    )
                if prev[1] == start and prev[2] == value:
                    raise AssertionError(f"run {run} is not coalesced with the previous run")
            prev = (start, end, value)

