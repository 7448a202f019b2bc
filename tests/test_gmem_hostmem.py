"""The simulated host memory behind guest_memfd folios and the VMM's shared backing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.host.hostmem import HostMemory, SharedBacking, decode_delta, encode_delta


def test_next_fit_aligned_blocks():
    """Blocks are naturally aligned and handed out next-fit."""
    mem = HostMemory(start_pfn=0x100, nr_pages=0x2000)
    assert mem.alloc(3) == [(0x100, 3)]
    assert mem.alloc(1, 9) == [(0x200, 0x200)]
    assert mem.alloc(1) == [(0x400, 1)]
    assert mem.nr_allocated == 3 + 512 + 1
    mem._check()


def test_batch_equals_successive_single_allocations():
    """One call for N blocks returns what N single-block calls would: the batched-fault invariant."""
    a, b = HostMemory(0, 1 << 20), HostMemory(0, 1 << 20)
    for mem in (a, b):
        mem.alloc(5)
        mem.alloc(1, 9)
        mem.free(2, 2)
    got = a.alloc(700, 0)
    want = []
    for _ in range(700):
        (pfn, n), = b.alloc(1, 0)
        if want and want[-1][0] + want[-1][1] == pfn:
            want[-1] = (want[-1][0], want[-1][1] + 1)
        else:
            want.append((pfn, n))
    assert got == want
    assert a.alloc(1, 9) == b.alloc(1, 9)  # the cursors stay in step
    a._check()


def test_wraps_and_reuses_freed_memory():
    """Next-fit wraps to the start and reuses freed blocks once the end is reached."""
    mem = HostMemory(start_pfn=0, nr_pages=16)
    mem.alloc(16)
    mem.free(4, 4)
    assert mem.alloc(4) == [(4, 4)]
    with pytest.raises(pkvm.KvmError, match="host memory exhausted") as exc:
        mem.alloc(1)
    assert exc.value.errno == 12
    assert mem.nr_allocated == 16


def test_double_free_is_an_invariant_error():
    """Freeing pfns that are not allocated is pkvm's bug, not the simulated kernel's."""
    mem = HostMemory(0, 64)
    mem.alloc(4)
    with pytest.raises(pkvm.InternalInvariantError, match="freeing unallocated host pfns"):
        mem.free(2, 4)


def test_delta_encoding_round_trips():
    """Signed pfn deltas survive the RangeMap value encoding."""
    for d in (0, 1, -1, 1 << 40, -(1 << 40), (1 << 55) - 1, -(1 << 55)):
        assert decode_delta(encode_delta(d)) == d


def test_shared_backing_populates_whole_host_pages():
    """The first touch populates the whole aligned host page; runs stay linear."""
    mem = HostMemory(0, 1 << 20)
    thp = SharedBacking(mem, 9)
    assert thp.populate(5, 6) == 512
    assert thp.lookup(0) % 512 == 0 and thp.lookup(511) == thp.lookup(0) + 511
    assert thp.populate(0, 512) == 0
    assert thp.blocks_to_populate(0, 2048) == 1536
    assert thp.discard(0, 512) == 512 and thp.lookup(5) is None
    mem._check()


@pytest.mark.parametrize("args, exc, match", [
    ((-1,), ValueError, r"n_units=-1 must be in \[0, "),
    ((1 << 52,), ValueError, r"n_units=4503599627370496 must be in"),
    ((1, -1), ValueError, r"order=-1 must be in \[0, 18\]"),
    ((1, 19), ValueError, r"order=19 must be in \[0, 18\]"),
    (("1",), TypeError, r"n_units must be an int, not str"),
    ((1.0,), TypeError, r"n_units must be an int, not float"),
    ((True,), TypeError, r"n_units must be an int, not bool"),
    ((1, None), TypeError, r"order must be an int, not NoneType"),
])
def test_hostmem_alloc_refuses_bad_arguments_and_changes_nothing(args, exc, match):
    mem = HostMemory(0x100000, 1 << 20)
    mem.alloc(3)
    before = (mem.nr_allocated, list(mem._used.iter_ranges()), mem._cursor)
    with pytest.raises(exc, match=match):
        mem.alloc(*args)
    with pytest.raises(exc, match=match):
        mem.can_alloc(*args)
    assert (mem.nr_allocated, list(mem._used.iter_ranges()), mem._cursor) == before
    assert mem.alloc(1) == [(0x100003, 1)]


@pytest.mark.parametrize("args, exc, match", [
    ((-5, 2), ValueError, r"pfn=-5 must be in \[0, 2\*\*52\)"),
    ((0x100000, -1), ValueError, r"npages=-1 must be in"),
    ((0x100000, 1 << 70), ValueError, r"npages=\d+ must be in"),
    (("x", 1), TypeError, r"pfn must be an int, not str"),
])
def test_hostmem_free_refuses_bad_arguments_and_changes_nothing(args, exc, match):
    mem = HostMemory(0x100000, 1 << 20)
    mem.alloc(2)
    with pytest.raises(exc, match=match):
        mem.free(*args)
    assert mem.nr_allocated == 2 and mem.is_allocated(0x100001)


def _populate_reference(sb: SharedBacking, start: int, end: int) -> int | None:
    """The obviously correct populate: every unpopulated block of ``[start, end)``, in address
    order, one single-block allocation each; None (and nothing changed) if one would fail."""
    order = sb.order
    blocks = [blk for blk in range(start >> order, (end + (1 << order) - 1) >> order)
              if sb._map.get(blk << order) == 0]
    mem = sb._mem
    if not blocks:
        return 0
    if not mem.can_alloc(len(blocks), order):
        return None
    for blk in blocks:
        (pfn, n), = mem.alloc(1, order)
        sb._map.assign(blk << order, (blk + 1) << order, 1 | encode_delta(pfn - (blk << order)))
    sb.nr_populated += len(blocks) << order
    return len(blocks) << order


def _backing_state(sb: SharedBacking) -> tuple:
    mem = sb._mem
    return (list(sb._map.iter_ranges()), sb.nr_populated, list(mem._used.iter_ranges()),
            mem.nr_allocated, mem._cursor)



def _two_backings(pages, order):
    """Two shared backings of block order ``order``, each on a host memory of its own."""
    return [SharedBacking(HostMemory(0x100, pages), order) for _ in range(2)]


def _check_same(real, ref):
    """Both backings in the same state, and the first one's allocator consistent."""
    assert _backing_state(real) == _backing_state(ref)
    real._mem._check()


def _discard_or_alloc(pair, op, a, n):
    """The steps both populate tests take between populates, on both backings alike: a discard
    of ``[a, a + n)`` (both return the same), or an unrelated allocation of ``n % 4`` blocks
    where it fits."""
    real, ref = pair
    if op == "discard":
        assert real.discard(a, a + n) == ref.discard(a, a + n)
        return
    units = n % 4
    for sb in pair:
        if sb._mem.can_alloc(units, 0):
            sb._mem.alloc(units, 0)

@settings(max_examples=150, deadline=None)
@given(order=st.sampled_from([0, 1, 2]), pages=st.integers(8, 64),
       ops=st.lists(st.tuples(st.sampled_from(["populate", "discard", "alloc"]),
                              st.integers(0, 80), st.integers(1, 40)), max_size=12))
def test_populate_matches_block_by_block_first_touches(order, pages, ops):
    """SharedBacking.populate (the typed core's shared_populate) against one single-block
    allocation per unpopulated block, in address order, through random populates, discards
    and unrelated allocations; on ENOMEM nothing changes (state, counters, cursor)."""
    pair = _two_backings(pages, order)
    real, ref = pair
    for op, a, n in ops:
        if op == "populate":
            want = _populate_reference(ref, a, a + n)
            before = _backing_state(real)
            if want is None:
                with pytest.raises(pkvm.KvmError, match="host memory exhausted populating HVA pages"):
                    real.populate(a, a + n)
                assert _backing_state(real) == before
            else:
                assert real.populate(a, a + n) == want
        else:
            _discard_or_alloc(pair, op, a, n)
        _check_same(real, ref)


@settings(max_examples=150, deadline=None)
@given(order=st.sampled_from([0, 1, 2, 9]), pages=st.integers(8, 1100),
       ops=st.lists(st.tuples(st.sampled_from(["one", "one", "one", "discard", "alloc"]),
                              st.integers(0, 2100), st.integers(1, 40)), max_size=40))
def test_one_page_populate_matches_the_general_populate(order, pages, ops):
    """A one-page shared fault's populate (``_shared_populate1``: one lookup, one block
    allocated and written where the lookup landed) against the general populate of the same
    page, through random faults, discards and unrelated allocations: the same map, counters,
    allocator and cursor, the same word at the page; on ENOMEM both raise and nothing changes."""
    from pkvm._core import _shared_populate_one

    pair = _two_backings(pages, order)
    real, ref = pair
    for op, a, n in ops:
        if op == "one":
            before = _backing_state(real)
            try:
                want = (ref.populate(a, a + 1), ref._map.get(a))
            except pkvm.KvmError:
                with pytest.raises(pkvm.KvmError, match="host memory exhausted populating HVA pages"):
                    _shared_populate_one(real, a)
                assert _backing_state(real) == before
            else:
                assert _shared_populate_one(real, a) == want
        else:
            _discard_or_alloc(pair, op, a, n)
        _check_same(real, ref)
