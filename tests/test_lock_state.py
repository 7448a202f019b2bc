"""The locks' hot state in the typed core (``LockState``: ``locked`` and ``stats``;
``LockStatsState``: the statistics' fields), which the timeline's hooks read and update at C
level: the Python locks keep it current, and a lock taken on the timeline's fast path (no
other actor in a task) is counted in the same fields."""

import pytest
import simpy

import pkvm
from pkvm._core import LockState, LockStatsState
from pkvm.sim import Timeline
from pkvm.sim.locks import LockStats, Mutex, RWLock, SpinLock


@pytest.mark.parametrize("cls", [Mutex, SpinLock, RWLock])
def test_locked_follows_the_holders(cls):
    env = simpy.Environment()
    lk = cls(env, "x")
    assert isinstance(lk, LockState) and isinstance(lk.stats, LockStatsState) and type(lk.stats) is LockStats
    acq = lk.acquire_write if cls is RWLock else lk.acquire
    rel = lk.release_write if cls is RWLock else lk.release
    assert acq("a").triggered and lk.locked is True
    rel("a")
    assert lk.locked is False and lk.stats.acquisitions == 1
    with pytest.raises(AttributeError, match="has no attribute 'other'"):
        lk.stats.other = 1  # type: ignore[attr-defined]


def test_fast_path_counts_in_the_same_fields():
    vm = pkvm.VM("sw_protected")
    tl = Timeline(vm)
    seen = {}

    def body():
        tl.acquire("slots_lock")
        seen["locked_during"] = tl.locks["slots_lock"].locked  # a fast-path hold: the SimPy lock is free
        vm._charge("vmexit", 3)
        tl.release("slots_lock")

    tl.spawn("vmm", body)
    tl.run()
    st = tl.locks["slots_lock"].stats
    assert seen["locked_during"] is False
    assert st.acquisitions == 1 and st.hold_ns == 3 * vm.costs.ns("vmexit") > 0
