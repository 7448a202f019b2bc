"""RangeMap under threads: GIL-free bulk calls refuse conflicting use instead of crashing."""

import threading

import numpy as np
import pytest

import pkvm


def _run_bulk_while(m, bulk, probe):
    """Run ``bulk(m)`` in a thread and ``probe(m)`` repeatedly until it ends; collect outcomes."""
    outcomes = {"ok": 0, "refused": 0}
    done = threading.Event()

    def worker():
        try:
            while True:  # the probe's own bulk call may refuse this one; try again
                try:
                    bulk(m)
                    break
                except RuntimeError as e:
                    assert "another thread" in str(e)
        finally:
            done.set()

    t = threading.Thread(target=worker)
    t.start()
    while not done.is_set():
        try:
            probe(m)
            outcomes["ok"] += 1
        except RuntimeError as e:
            assert "another thread" in str(e)
            outcomes["refused"] += 1
    t.join()
    return outcomes


@pytest.fixture
def keys():
    rng = np.random.default_rng(7)
    return rng.integers(0, 2**28, 2_000_000, dtype=np.uint64)


@pytest.mark.parametrize(
    "probe",
    [
        lambda m: m.assign(5, 6, 8),
        lambda m: m.get(5),
        lambda m: m.find_ne(0, 100, 0),
        lambda m: m.ranges(0, 1000),
        lambda m: m.clear(),
        lambda m: m.copy(),
        lambda m: m._check(),
        lambda m: m.get_many(np.arange(100, dtype=np.uint64)),
    ],
    ids=["assign", "get", "find_ne", "ranges", "clear", "copy", "check", "get_many"],
)
def test_calls_during_assign_many_are_refused_or_safe(keys, probe):
    """While assign_many runs without the GIL, other threads' calls raise instead of racing."""
    m = pkvm.RangeMap()
    outcomes = _run_bulk_while(m, lambda m: m.assign_many(keys, keys + 1, 8), probe)
    m._check()
    # A probe may also run after the bulk call ended (a clear() then empties the map), but if
    # none succeeded, the bulk call's result must be intact.
    assert len(m) > 0 or outcomes["ok"] > 0
    assert outcomes["refused"] > 0


def test_writes_during_get_many_are_refused(keys):
    """A concurrent writer is refused while get_many reads without the GIL; readers may share."""
    m = pkvm.RangeMap()
    m.assign_many(keys[:200_000], keys[:200_000] + 1, 8)
    before = m.ranges()
    outcomes = _run_bulk_while(m, lambda m: m.get_many(keys), lambda m: m.assign(1, 2, 9))
    assert outcomes["refused"] > 0
    m._check()
    if outcomes["ok"] == 0:
        assert m.ranges() == before
    readers = _run_bulk_while(m, lambda m: m.get_many(keys), lambda m: m.get_many(keys[:10]))
    assert readers["refused"] == 0
