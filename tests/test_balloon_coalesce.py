"""``balloon``'s coalescing of its chunks into runs (``pkvm.experiments.workloads._coalesce``,
numpy for large rounds) gives the runs of the obvious loop, on both sides of its size cut."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from pkvm.experiments.workloads import _coalesce


def _reference(chunks):
    """Consecutive numbers share ``c - position``: one group per run."""
    runs = []
    for _key, group in itertools.groupby(enumerate(chunks), key=lambda ic: ic[1] - ic[0]):
        members = [c for _i, c in group]
        runs.append((members[0], members[-1] + 1))
    return runs


@given(st.sets(st.integers(0, 600), max_size=300))
def test_coalesce_is_the_loop(chunks):
    ordered = sorted(chunks)
    got = _coalesce(ordered)
    assert got == _reference(ordered)
    assert all(type(s) is int and type(e) is int for s, e in got)


def test_coalesce_edges():
    assert _coalesce([]) == []
    assert _coalesce(list(range(100))) == [(0, 100)]
    assert _coalesce(list(range(0, 200, 2))) == [(c, c + 1) for c in range(0, 200, 2)]
    assert _coalesce([5, 6, 7] + list(range(10, 80)) + [1 << 40]) == [(5, 8), (10, 80), (1 << 40, (1 << 40) + 1)]
