"""Type stubs for the typed core :mod:`pkvm._core`.

Keys are ``uint64``; ranges are half-open ``[start, end)`` with ``0 <= start <= end <= 2**64 - 1``
(so the key ``2**64 - 1`` itself can never be assigned and always reads as ``default``).
"""

from typing import Iterator

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

UINT64_MAX: int
__test__: dict[str, str]

@disjoint_base
class RangeMap:
    """A coalescing map from half-open ``uint64`` key ranges to ``uint64`` values.

    Keys not covered by a stored run have ``default``. Adjacent runs with equal values merge;
    runs whose value equals ``default`` are not stored.
    """

    def __new__(cls, default: int = 0, *, _fanout: int | None = None) -> RangeMap:
        """``_fanout`` (4..64) shrinks the nodes so that tests reach deep trees with few runs."""
    @property
    def default(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """Bytes of C memory owned by the map (nodes and value arrays)."""
    def __len__(self) -> int:
        """Number of stored (non-default, coalesced) runs."""
    def __repr__(self) -> str: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __reduce__(self) -> tuple[object, ...]: ...
    def assign(self, start: int, end: int, value: int) -> None:
        """Set every key in ``[start, end)`` to ``value``. ``start == end`` is a no-op."""
    def get(self, key: int) -> int: ...
    def find_ne(self, start: int, end: int, value: int) -> int:
        """First key in ``[start, end)`` whose value is not ``value``, or -1."""
    def run_at(self, key: int) -> tuple[int, int, int]:
        """The maximal run ``(start, end, value)`` that contains ``key``.

        Gaps between stored runs are runs of ``default``. ``key`` must be ``< 2**64 - 1``;
        ``end`` is at most ``2**64 - 1``.
        """
    def ranges(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
        """Stored runs that intersect ``[start, end)``, clipped to it, in key order."""
    def iter_ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Like :meth:`ranges` but lazy; the map must not be modified while iterating."""
    def assign_many(
        self,
        starts: npt.ArrayLike,
        ends: npt.ArrayLike,
        values: npt.ArrayLike | int,
    ) -> None:
        """``assign`` for every ``i`` in array order (later entries win).

        Everything is validated before anything changes; ``values`` may be a scalar.
        """
    def get_many(self, keys: npt.ArrayLike) -> npt.NDArray[np.uint64]: ...
    def clear(self) -> None: ...
    def copy(self) -> RangeMap: ...
    def _check(self) -> None:
        """Assert every structural invariant; raises ``AssertionError`` naming the bad run."""
    def _depth(self) -> int:
        """Test hook: height of the tree (1 = a single leaf)."""
