"""``balloon``'s coalescing of its chunks into runs (``pkvm.experiments.workloads._coalesce``,
numpy for large rounds) gives the runs of the obvious loop, on both sides of its size cut."""

from hypothesis import given
from hypothesis import strategies as st

from pkvm.experiments.workloads import _coalesce


def _reference(chunks):
    runs = []
    for c in chunks:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
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
