"""guest_memfd's pfn lookup, the host allocator and SNP's RMP wrappers in the typed core
(pkvm/_gmem.pxi), against plain-Python references and the Python constants."""

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm._core import DIRECTMAP_MODES, RangeMap, split_2m_runs
from pkvm.host.hostmem import HostMemory, encode_delta
from pkvm.kvm.gmem import _FOLIO_ORDER_SHIFT, FOLIO_PREPARED, FOLIO_PRESENT
from pkvm.platforms._snp_rmp import make_shared_range, rmpupdate_range

GiB = 1 << 30


def ref_plan(used: RangeMap, start: int, end: int, cursor: int, n_units: int, order: int):
    """Next-fit in aligned blocks, page by page: where ``n_units`` single-block allocations
    from ``cursor`` would land (wrapping once to ``start``), merged into runs; None if they do
    not all fit."""
    size = 1 << order
    taken: set[int] = set()
    out: list[tuple[int, int]] = []
    pos, wrapped = cursor, False
    for _ in range(n_units):
        while True:
            a = (pos + size - 1) & ~(size - 1)
            if wrapped and a >= cursor:
                return None
            if a + size > end:
                if wrapped:
                    return None
                wrapped, pos = True, start
                continue
            if used.find_ne(a, a + size, 0) == -1 and not taken & set(range(a, a + size)):
                break
            pos = a + size
        taken.update(range(a, a + size))
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((a, size))
        pos = a + size
    return out


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 40),
                              st.sampled_from([0, 0, 2, 3]), st.integers(0, 255)), max_size=25))
def test_allocator_matches_a_page_by_page_next_fit(ops):
    """``HostMemory.alloc`` (typed) hands out what page-by-page next-fit would, wraps once, and
    refuses (ENOMEM, nothing allocated) exactly when the blocks do not fit."""
    mem = HostMemory(start_pfn=8, nr_pages=248)
    for kind, n, order, at in ops:
        if kind == "free":
            if mem.is_allocated(at) and at >= 8:
                mem.free(at, 1)
            continue
        want = ref_plan(mem._used, mem.start_pfn, mem.end_pfn, mem._cursor, n, order) if n else []
        before = (mem.nr_allocated, mem._cursor, mem._used.ranges())
        if want is None:
            with pytest.raises(pkvm.KvmError, match=f"host memory exhausted allocating {n} x order-{order}"):
                mem.alloc(n, order)
            assert (mem.nr_allocated, mem._cursor, mem._used.ranges()) == before
        else:
            assert mem.alloc(n, order) == want
            assert mem.nr_allocated == before[0] + sum(c for _, c in want)
        mem._check()


def _copy_map(m: RangeMap, fanout: int) -> RangeMap:
    c = RangeMap(0, _finger=True, _fanout=fanout)
    for a, b, v in m.iter_ranges():
        c.assign(a, b, v)
    return c


@settings(max_examples=300, deadline=None)
@given(fanout=st.sampled_from([4, 5, 64]),
       holes=st.lists(st.integers(0, 1000), max_size=60),
       ops=st.lists(st.one_of(
           st.tuples(st.just("alloc"), st.integers(1, 12), st.sampled_from([0, 0, 0, 1, 3])),
           st.tuples(st.just("free"), st.integers(0, 1023), st.integers(1, 3)),
           st.tuples(st.just("cursor"), st.integers(0, 1023), st.just(0)),
           st.tuples(st.just("replace"), st.just(0), st.just(0))), max_size=60))
def test_allocations_in_a_row_grow_the_run_at_the_cursor_as_the_plan_would(fanout, holes, ops):
    """Allocations with nothing freed between them grow the run that ends at the cursor in place
    (``_hm_bump``, pkvm/_gmem.pxi) instead of planning: on a map of many leaves (runs kept apart
    by single allocated pages), with frees, cursor moves and a replaced map between them, each
    allocation is what the page-by-page reference plans, and the map stays well formed."""
    mem = HostMemory(start_pfn=0, nr_pages=1024)
    mem._used = RangeMap(0, _finger=True, _fanout=fanout)
    for h in sorted(set(holes)):  # isolated allocated pages: many runs, many leaves
        mem._used.assign(h, h + 1, 1)
        mem.nr_allocated += 1
    for kind, a, b in ops:
        if kind == "free":
            for pfn in range(a, min(a + b, 1024)):
                if mem.is_allocated(pfn):
                    mem.free(pfn, 1)
        elif kind == "cursor":
            mem._cursor = a
        elif kind == "replace":  # the same runs in a new map: the kept position is void
            mem._used = _copy_map(mem._used, fanout)
        else:
            want = ref_plan(mem._used, mem.start_pfn, mem.end_pfn, mem._cursor, a, b)
            before = (mem.nr_allocated, mem._cursor, mem._used.ranges())
            if want is None:
                with pytest.raises(pkvm.KvmError):
                    mem.alloc(a, b)
                assert (mem.nr_allocated, mem._cursor, mem._used.ranges()) == before
            else:
                assert mem.alloc(a, b) == want
                assert mem._cursor == want[-1][0] + want[-1][1]
        mem._check()
        mem._used._check()
        assert mem._used.ranges() == _copy_map(mem._used, 64).ranges()  # maximal runs


def test_a_run_of_single_page_allocations_stays_one_run():
    """4K allocations one after another (a fragmented guest's faults) grow one run, through a
    copy of the allocator too (its kept position is not carried over)."""
    import pickle

    mem = HostMemory(start_pfn=16, nr_pages=1 << 20)
    assert mem.alloc(1, 9) == [(512, 512)]  # (aligned: 16 to 511 stay free)
    got = [mem.alloc(1)[0] for _ in range(1000)]
    assert got == [(1024 + i, 1) for i in range(1000)]
    assert mem._used.ranges() == [(512, 1024 + 1000, 1)]
    twin = pickle.loads(pickle.dumps(mem))
    assert twin.alloc(3) == mem.alloc(3) == [(2024, 3)]
    assert twin._used.ranges() == mem._used.ranges() == [(512, 2027, 1)]
    mem._check()
    twin._check()


def test_per_cpu_cursors_leave_the_shared_one_alone():
    """A CPU with its own cursor allocates from it and advances only it."""
    mem = HostMemory(start_pfn=0, nr_pages=1 << 12)
    mem.per_cpu({"vcpu1": 1024})
    mem.cpu = "vcpu1"
    assert mem.alloc(3) == [(1024, 3)]
    assert (mem._cursor, mem._cpu_cursors["vcpu1"]) == (0, 1027)
    mem.cpu = None
    assert mem.alloc(2) == [(0, 2)]


@given(start=st.integers(0, 4096), n=st.integers(0, 4096))
def test_split_2m_runs_matches_a_page_walk(start, n):
    """Every page of ``[start, start + n)`` lies in exactly one piece: a 2M piece is a whole
    aligned 2M block, a 4K piece stays inside one partial block."""
    pieces = split_2m_runs(start, start + n)
    assert [p for a, b, _ in pieces for p in range(a, b)] == list(range(start, start + n))
    for a, b, level in pieces:
        if level == 2:
            assert a % 512 == 0 and b % 512 == 0 and b > a
        else:
            assert a // 512 == (b - 1) // 512 and (a % 512 or b % 512 or b - a < 512)


@pytest.mark.parametrize("order", [0, 9])
def test_folio_values_use_the_python_encoding(order):
    """The folios the typed fault path stores decode with pkvm.kvm.gmem's constants."""
    vm = pkvm.VM("snp", policy=pkvm.Policy.preset("6.19").replace(gmem_max_order=order))
    gmem = vm.create_guest_memfd(64 << 21)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 64 << 21, 1 << 40, gmem, 0)
    vm.set_memory_attributes(0x201000, 4096, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    r = vm.create_vcpu().page_fault(0x201000, private=True)
    assert r.ret == "fixed"
    index = 0x201
    pfn, forder, prepared = gmem.folio(index)
    assert (forder, prepared) == (order, True)
    first = index & ~((1 << order) - 1)
    want = encode_delta(pfn - index) | FOLIO_PRESENT | (order << _FOLIO_ORDER_SHIFT) | FOLIO_PREPARED
    assert gmem.folios.get(first) == want
    assert vm.rmp.lookup(pfn).assigned and vm.stats["gmem_prepare"] == 1


def snp_vm():
    vm = pkvm.VM("snp")
    gmem = vm.create_guest_memfd(GiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, GiB, 1 << 40, gmem, 0)
    return vm, gmem


def test_rmp_wrapper_refuses_a_range_past_the_table_and_changes_nothing_in_the_rmp():
    """Arguments outside the RMP get RmpTable's named ValueError through the typed wrapper."""
    vm, _ = snp_vm()
    top = vm.rmp.max_pfn
    st0 = dict(vm.stats)
    with pytest.raises(ValueError, match="npages 0x2 from pfn"):
        rmpupdate_range(vm, top - 1, 2, 1, False, directmap="none")
    with pytest.raises(ValueError, match="pfn 0x.* out of range"):
        make_shared_range(vm, top, top + 1, flush=False)
    assert vm.rmp.nruns == 0 and dict(vm.stats) == st0


def test_unknown_directmap_mode_does_no_direct_map_work():
    """The wrappers' ``directmap`` names map to the typed codes; any other name means none."""
    assert DIRECTMAP_MODES == {"both": 0, "before": 1, "after": 2, "none": 3}
    vm, _ = snp_vm()
    pfn = vm.hostmem.start_pfn + 5
    assert rmpupdate_range(vm, pfn, 1, 1, True, 5, directmap="neither") == 0
    assert vm.stats["directmap_splits"] == 0 and vm.rmp.lookup(pfn).assigned
    assert rmpupdate_range(vm, pfn + 1, 1, 1, True, 6) == 0
    assert vm.stats["directmap_splits"] == 2  # 1G -> 2M -> 4K on the default path


def test_punch_hole_returns_pages_to_the_hypervisor_and_the_allocator():
    """The typed release: RMP entries back to shared (cache-flushed), pfns freed, counters."""
    vm, gmem = snp_vm()
    vcpu = vm.create_vcpu()
    vm.set_memory_attributes(0, 8 << 12, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    for g in range(8):
        assert vcpu.page_fault(g << 12, private=True).ret == "fixed"
    pfns = [gmem.folio(g)[0] for g in range(8)]
    held = vm.hostmem.nr_allocated
    gmem.fallocate(pkvm.FALLOC_FL_PUNCH_HOLE | pkvm.FALLOC_FL_KEEP_SIZE, 2 << 12, 4 << 12)
    assert [gmem.folio(g) is None for g in range(8)] == [False] * 2 + [True] * 4 + [False] * 2
    assert [vm.rmp.lookup(p).assigned for p in pfns] == [True] * 2 + [False] * 4 + [True] * 2
    st = vm.stats
    assert (st["gmem_pages_freed"], st["cache_flush_pages"], st["gmem_invalidate"]) == (4, 4, 4)
    assert vm.hostmem.nr_allocated == held - 4
    vm.check()


def test_injected_folio_failure_exits_the_fault_with_its_errno():
    """An armed ``gmem_folio_alloc`` failure goes through the Python injector: the fault exits
    with the armed errno and allocates nothing."""
    vm, gmem = snp_vm()
    vm.set_memory_attributes(0, 4096, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.inject_failure("gmem_folio_alloc", errno.ENOMEM)
    r = vm.create_vcpu().page_fault(0, private=True)
    assert (r.ret, r.errno) == ("exit", errno.ENOMEM)
    assert gmem.folio(0) is None and vm.stats["gmem_pages_allocated"] == 0


def test_allocator_wrap_stops_at_an_unaligned_origin():
    """Regression (found by the property above): after the wrap, the next-fit walk reached its
    unaligned origin (67) inside an order-3 block and computed a negative unit count, looping
    forever (MemoryError in the core). The walk ends there: ENOMEM, nothing allocated."""
    mem = HostMemory(start_pfn=8, nr_pages=248)
    assert mem.alloc(5, 3) == [(8, 40)]
    assert mem.alloc(19) == [(48, 19)]
    mem.free(64, 1)
    before = (mem.nr_allocated, mem._cursor, mem._used.ranges())
    with pytest.raises(pkvm.KvmError, match="host memory exhausted allocating 37 x order-3 blocks"):
        mem.alloc(37, 3)
    assert (mem.nr_allocated, mem._cursor, mem._used.ranges()) == before
    assert mem.alloc(23, 3) == [(72, 184)]
