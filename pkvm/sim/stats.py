"""Weighted samples with exact nearest-rank percentiles.

:class:`Distribution` keeps latencies (or any real values) as a count per distinct value, so a
batch of ``n`` identical samples costs O(1) to add: the timeline compresses a run of identical
faults into one event and must not expand it again to report a p99. Memory follows the number
of distinct values, not the number of adds.

Percentiles use the **nearest-rank** method on the weighted samples: with ``N`` samples in all,
the ``q``-th percentile is the smallest sample value ``v`` such that at least
``ceil(q / 100 * N)`` samples are ``<= v`` (and the smallest sample for a rank of 0). The result
is always one of the sample values, never an interpolation between two, and it is exact: the
rank is computed in rational arithmetic, so ``p50`` of ``[1, 2]`` is ``1`` and ``p99`` of 100
samples is the 99th smallest. An empty distribution reports 0 for every statistic.

Invariants: ``count`` is the sum of the counts added; ``total`` the sum of ``value * count``
(exact for integer values); every statistic is a pure function of the multiset of samples, so
the order of ``add`` calls never changes a result. Values that compare equal are one value (an
``int`` and an equal ``float`` count together, reported as the first one added).
"""

from __future__ import annotations

import math
from typing import Any
from fractions import Fraction
from numbers import Integral, Real

import numpy as np

from pkvm._core import DistState

__all__ = ["Distribution"]

class Distribution(DistState):
    """A multiset of real values with weights, and its count, total, mean, max and percentiles.

    ``add(value, count)`` is O(1) (one dict update); reading a percentile sorts the distinct
    values once (O(k log k) for k distinct values) and caches the result until the next ``add``.

    >>> d = Distribution()
    >>> d.add(10, count=98); d.add(500); d.add(7000)
    >>> d.count, d.total, d.p50, d.p99, d.max
    (100, 8480, 10, 500, 7000)
    >>> d.as_dict()
    {'count': 100, 'p50': 10, 'p99': 500, 'max': 7000}
    """

    __slots__ = ()  # the state is the typed core's DistState: _hist, _count, _total, _max, _sorted

    # ---------------------------------------------------------------- updates

    def add(self, value: float, count: int = 1) -> None:
        """Add ``count`` samples equal to ``value``.

        ``value`` is kept as a Python ``int`` if it is integral (``numpy.int64`` included) and
        as a ``float`` otherwise, so every statistic is a plain, JSON-ready number.

        Runtime complexity: O(1).

        Raises:
            TypeError: ``value`` is not a real number, or ``count`` is not an int.
            ValueError: ``value`` is NaN or infinite, or ``count`` < 1. Nothing is added.
        """
        vt: type = type(value)
        if vt is not int:  # the common case (int ns) skips the slower checks
            if vt is bool or not isinstance(value, Real):
                raise TypeError(f"value must be a real number, got {vt.__name__}: {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"value must be finite, got {value!r}")
            # Store plain Python numbers (numpy scalars in, JSON-ready numbers out).
            value = int(value) if isinstance(value, Integral) else float(value)
        if type(count) is not int:
            if isinstance(count, bool) or not isinstance(count, Integral):
                raise TypeError(f"count must be an int, got {type(count).__name__}: {count!r}")
            count = int(count)
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._add(value, count)

    # ---------------------------------------------------------------- reads

    @property
    def count(self) -> int:
        """The number of samples (the sum of the counts added)."""
        return self._count

    @property
    def total(self) -> Any:
        """The sum of all samples, ``sum(value * count)``; 0 if empty."""
        return self._total

    @property
    def mean(self) -> float:
        """``total / count`` as a float; 0.0 if empty."""
        return self._total / self._count if self._count else 0.0

    @property
    def max(self) -> Any:
        """The largest sample; 0 if empty."""
        return self._max

    @property
    def p50(self) -> Any:
        """The median by nearest rank (the lower middle for an even count); 0 if empty."""
        return self.percentile(50)

    @property
    def p99(self) -> Any:
        """The 99th percentile by nearest rank; 0 if empty."""
        return self.percentile(99)

    def percentile(self, q: float) -> Any:
        """The ``q``-th percentile by nearest rank, ``0 <= q <= 100``; 0 if empty.

        The value returned is one of the samples (a Python int or float).

        Runtime complexity: O(k log k) for k distinct values on the first read after an
        ``add``, O(log k) after that.

        Raises:
            TypeError: ``q`` is not a real number.
            ValueError: ``q`` is outside ``[0, 100]``.
        """
        if isinstance(q, bool) or not isinstance(q, Real):
            raise TypeError(f"q must be a real number, got {type(q).__name__}: {q!r}")
        if not 0 <= q <= 100:
            raise ValueError(f"q must be in [0, 100], got {q!r}")
        if self._count == 0:
            return 0
        # str() of a float is the shortest decimal that round-trips: 99.9 means 999/10 exactly.
        exact_q = Fraction(str(q)) if isinstance(q, float) else Fraction(q)
        rank = max(math.ceil(exact_q * self._count / 100), 1)
        values, cum = self._sorted_view()
        return values[int(np.searchsorted(cum, rank, side="left"))]

    def _sorted_view(self) -> tuple[list[Any], np.ndarray]:
        """(the distinct values ascending, the cumulative counts in that order)."""
        if self._sorted is None:
            hist = self._hist
            values = sorted(hist)
            cum = np.cumsum(np.fromiter((hist[v] for v in values), dtype=np.int64, count=len(values)))
            self._sorted = (values, cum)
        return self._sorted

    def as_dict(self) -> dict[str, Any]:
        """``{"count", "p50", "p99", "max"}``, the summary a result table shows."""
        return {"count": self._count, "p50": self.p50, "p99": self.p99, "max": self._max}

    def __repr__(self) -> str:
        return (f"Distribution(count={self._count}, p50={self.p50!r}, p99={self.p99!r}, "
                f"max={self._max!r})")
