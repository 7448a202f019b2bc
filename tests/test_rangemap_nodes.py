"""RangeMap's node memory (``pkvm_nodes_alloc`` in ``pkvm/_core.pyx``): one allocator for every
map of the process, whose chunks are shared by maps written from several threads at once, are
reused (or unmapped) once their nodes are freed, and still serve a forked child."""

import os
import threading

import numpy as np
import pytest

from pkvm import RangeMap


def _build(seed: int, n: int = 40_000) -> tuple[RangeMap, np.ndarray]:
    """A map of up to ``n`` isolated one-key runs at random even keys (values 1-8)."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 1 << 40, n, dtype=np.uint64)) * 2
    m = RangeMap(0)
    m.assign_many(keys, keys + 1, (keys & 7) + 1)
    return m, keys


def _check(m: RangeMap, keys: np.ndarray) -> None:
    assert len(m) == len(keys)
    assert (m.get_many(keys) == (keys & 7) + 1).all()
    assert not m.get_many(keys + 1).any()


def test_maps_grown_and_freed_from_several_threads_at_once():
    """Bulk writes run without the GIL, so maps of different threads take and give back nodes
    at the same time; every map still holds exactly its own runs."""
    errors = []

    def work(seed: int) -> None:
        try:
            for r in range(3):
                m, keys = _build(100 * seed + r)
                _check(m, keys)
                half = keys[::2]
                m.assign_many(half, half + 1, np.zeros(len(half), dtype=np.uint64))  # frees leaves
                _check(m, keys[1::2])
                c = m.copy()
                del m
                _check(c, keys[1::2])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_nodes_of_a_freed_map_serve_the_next_maps():
    """Maps built, freed and built again in turn (chunks emptied, restarted or unmapped) keep
    their runs, also beside a map that lives through all the rounds."""
    keep, kept_keys = _build(7)
    for r in range(4):
        maps = [_build(10 * r + j, 20_000 + 5_000 * j) for j in range(3)]
        for m, keys in maps:
            _check(m, keys)
        del maps[1]  # the middle map freed
        maps[0][0].clear()  # and the first one's nodes
        assert len(maps[0][0]) == 0
        _check(*maps[1])  # the last one
        _check(keep, kept_keys)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_builds_maps():
    """The allocator's lock is reset in a forked child: the child builds new maps and reads the
    parent's."""
    m, keys = _build(1)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            c, ckeys = _build(2)
            _check(c, ckeys)
            _check(m, keys)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _check(m, keys)
