"""The POST hook's MIXED recomputation reads the attributes, and that costs modeled time
(docs/kernel-semantics.md §3.2-§3.3, docs/costs.md ``attr_check_gfn`` and ``attr_check_2m``).

``kvm_arch_post_set_memory_attributes`` (arch/x86/kvm/mmu/mmu.c) runs, under ``mmu_lock`` for
write, ``hugepage_has_attrs`` on the partly covered head and tail chunk of each slot-clipped
piece. At 2M it is ``kvm_range_has_memory_attributes`` over the chunk's 512 gfns: to private,
gfn by gfn up to the first that differs (each gfn after the first one ``attr_check_gfn``, as in
the ioctl's no-op check); to shared, one ``xas_find`` (nothing). At 1G it visits the 512 2M
sub-chunks in order, reads each MIXED flag and, when it is clear, looks up the sub-chunk's first
gfn (one ``attr_check_2m``), up to the first sub-chunk that is MIXED or differs. Fully covered
chunks are cleared without a read.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

import pkvm
from pkvm.sim import Timeline
from pkvm.testing.reference_vm import ReferenceVM

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
GiB = 1 << 30
M = 1 << 20
G1 = GiB >> 12      # gfns per 1G chunk
P = 4096


def _vm(policy: str = "6.19", size: int = 4 * GiB, vm_type: str = "sw_protected",
        **kw: object) -> pkvm.VM:
    vm = pkvm.VM(vm_type, policy=policy, **kw)
    gmem = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, size, 1 << 44, gmem, 0)
    return vm


def _prices(vm: pkvm.VM) -> tuple[int, int]:
    return vm.costs["attr_check_gfn"].value_ns, vm.costs["attr_check_2m"].value_ns


def _walks(vm: pkvm.VM) -> tuple[int, int]:
    c = vm.cost_breakdown()
    return c.get("attr_check_gfn", 0), c.get("attr_check_2m", 0)


def _delta(vm: pkvm.VM, call: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """The walk charges, modeled ns and mmu_lock ns one call adds."""
    w0, l0, t0, m0 = *_walks(vm), vm.modeled_ns, vm.mmu_lock_ns
    vm.set_memory_attributes(*call)
    w1, l1 = _walks(vm)
    return w1 - w0, l1 - l0, vm.modeled_ns - t0, vm.mmu_lock_ns - m0


def _state(vm: pkvm.VM) -> tuple[object, ...]:
    return (vm.modeled_ns, vm.cost_breakdown(), dict(vm.stats), vm.mmu_lock_ns, vm.attr_ioctls)


def test_price_is_listed_with_a_valid_range() -> None:
    c = pkvm.CostModel.default("snp")["attr_check_2m"]
    assert (c.value_ns, c.low_ns, c.high_ns, c.confidence, c.row) == (15, 5, 100, "E", None)
    assert "hugepage_has_attrs" in c.source


@pytest.mark.parametrize("k", [1, 2, 7, 64, 300, 511])
def test_4k_conversion_walks_its_2m_chunk_to_the_first_mismatch(k: int) -> None:
    """Chunk [g, g + 512) private on [g, g + k) but for gfn t: making t private, the 2M walk
    stops at g + k, k gfns after its first. The chunk is the first of its 1G chunk and stays
    MIXED, so the 1G walk stops at its flag: no lookup. All of it is under mmu_lock."""
    vm = _vm()
    price, _ = _prices(vm)
    g = G1  # 1G-aligned: sub-chunk 0 of the second 1G chunk
    vm.set_memory_attributes(g * P, k * P, PRIVATE)
    t = g + k // 2
    vm.set_memory_attributes(t * P, P, 0)
    walk, loads, ns, lock = _delta(vm, (t * P, P, PRIVATE))
    assert (walk, loads) == (k * price, 0)
    store = vm.costs["attr_store"].value_ns
    assert ns == store + k * price  # no SPTE: nothing zapped, one gfn stored, the walk
    assert lock == k * price        # the walk is POST's, under mmu_lock
    vm.check()


def test_4k_conversion_completing_its_2m_chunk() -> None:
    """The 4K call that makes a 2M chunk uniform: its walk reads all 512 gfns (511 steps); the
    chunk is no longer MIXED, so the 1G walk looks it up and then the next sub-chunk, which
    is shared: two lookups."""
    vm = _vm()
    price, p2m = _prices(vm)
    g = G1
    vm.set_memory_attributes(g * P, 511 * P, PRIVATE)
    walk, loads, _ns, lock = _delta(vm, ((g + 511) * P, P, PRIVATE))
    assert (walk, loads) == (511 * price, 2 * p2m)
    assert lock == walk + loads
    vm.check()


def test_first_gfn_of_the_chunk_differs_walks_nothing() -> None:
    """A mismatch at the chunk's first gfn stops the 2M walk at its first read."""
    vm = _vm()
    g = G1 + 3 * 512
    walk, loads, _ns, _lock = _delta(vm, ((g + 100) * P, P, PRIVATE))
    assert walk == 0
    # 1G chunk from G1: sub-chunks 0-2 shared and clear, looked up, the first differs: one lookup
    assert loads == _prices(vm)[1]


def test_head_and_tail_both_partial() -> None:
    """A range over two 2M chunks, both partly covered: the head chunk's walk stops at its
    first mismatch (50), the tail's after the range (200); the 1G head stops at the MIXED
    head chunk's flag."""
    vm = _vm()
    price, _ = _prices(vm)
    g = G1
    vm.set_memory_attributes(g * P, 50 * P, PRIVATE)          # [g, g + 50) private
    walk, loads, _ns, lock = _delta(vm, ((g + 100) * P, 612 * P, PRIVATE))  # [g + 100, g + 712)
    assert (walk, loads) == ((50 + 200) * price, 0)
    assert lock == walk
    vm.check()


def test_head_and_tail_over_many_chunks_and_1g_tail() -> None:
    """Head and tail 2M walks and both 1G walks of a range across a 1G boundary: the counts
    are the reference twin's, which walks gfn by gfn."""
    vm = _vm(size=8 * GiB)
    ref = ReferenceVM("sw_protected", policy="6.19")
    rg = ref.create_guest_memfd(8 * GiB)
    ref.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 8 * GiB, 1 << 44, rg, 0)
    # not the twin's sizes: one 1G chunk's walk is 512 lookups at most, but the twin stores
    # per gfn; keep the ranges small and the chunks' other gfns uniform
    calls = [(G1 - 700, 1500, PRIVATE), (G1 - 700, 1500, 0), (G1 - 1, 2, PRIVATE),
             (G1 + 5, 3, PRIVATE), (G1 - 1024, 2048, PRIVATE), (G1 - 1024, 1, 0)]
    for g, n, a in calls:
        vm.set_memory_attributes(g * P, n * P, a)
        ref.set_memory_attributes(g * P, n * P, a)
        assert vm.cost_breakdown() == ref.cost, (g, n, a)
        assert vm.modeled_ns == ref.modeled_ns
    assert ref.cost["attr_check_gfn"] > 0 and ref.cost["attr_check_2m"] > 0
    vm.check()


def test_fully_covered_2m_chunk_has_no_2m_walk() -> None:
    """A 2M-aligned 2M range is a body chunk at 2M (cleared, no read); its 1G chunk is a
    partial head: the chunk, uniform private now, is looked up, then the next, shared."""
    vm = _vm()
    _price, p2m = _prices(vm)
    walk, loads, _ns, _lock = _delta(vm, (G1 * P, 2 * M, PRIVATE))
    assert (walk, loads) == (0, 2 * p2m)


def test_fully_covered_1g_chunk_reads_nothing() -> None:
    vm = _vm()
    assert _delta(vm, (G1 * P, GiB, PRIVATE))[:2] == (0, 0)
    assert _delta(vm, (G1 * P, 2 * GiB, 0))[:2] == (0, 0)
    assert "attr_check_2m" not in vm.cost_breakdown() and "attr_check_gfn" not in vm.cost_breakdown()


def test_to_shared_2m_walk_is_one_find_but_1g_looks_up() -> None:
    """To shared, the 2M test is one xas_find (no step); the 1G test still looks each clear
    sub-chunk's first gfn up: here every sub-chunk is shared again, so all 512."""
    vm = _vm()
    _price, p2m = _prices(vm)
    g = G1 + 5 * 512 + 17
    vm.set_memory_attributes(g * P, P, PRIVATE)
    walk, loads, _ns, lock = _delta(vm, (g * P, P, 0))
    assert (walk, loads) == (0, 512 * p2m)
    assert lock == loads
    vm.check()


def test_6_8_head_test_reads_a_1g_chunk_past_the_slot() -> None:
    """v6.8.1 tests only the head chunk's start against the slot (§3.3): with a 4 MiB slot the
    1G head chunk sticks out and is recomputed (one lookup: sub-chunk 0 is shared), where 6.9
    and later skip it."""
    calls = (((512 + 5) * P, P, PRIVATE),)
    out = {}
    for policy in ("6.8", "6.11", "6.19"):
        vm = _vm(policy, size=4 * M)
        out[policy] = _delta(vm, calls[0])[:2]
        vm.check()
    price, p2m = _prices(vm)
    assert out["6.8"] == (0, p2m)
    assert out["6.11"] == out["6.19"] == (0, 0)


def test_6_8_and_later_agree_inside_the_slot() -> None:
    """Inside the slot every version reads the same: [G1, G1 + 6) private, G1 + 6 shared."""
    for policy in ("6.8", "6.11", "6.19"):
        vm = _vm(policy)
        vm.set_memory_attributes(G1 * P, 5 * P, PRIVATE)
        assert _delta(vm, ((G1 + 5) * P, P, PRIVATE))[:2] == (6 * _prices(vm)[0], 0)


REFUSED = [
    ((G1 * P, P, PRIVATE, 1), errno.EINVAL),        # flags
    ((G1 * P, P, 1 << 1, 0), errno.EINVAL),         # unsupported attribute
    ((G1 * P, 0, PRIVATE, 0), errno.EINVAL),        # size 0
    ((G1 * P + 0x800, P, PRIVATE, 0), errno.EINVAL),  # unaligned
]


@pytest.mark.parametrize(("args", "err"), REFUSED)
def test_refused_calls_charge_nothing(args: tuple[int, int, int, int], err: int) -> None:
    vm = _vm()
    vm.set_memory_attributes(G1 * P, 100 * P, PRIVATE)
    before = _state(vm)
    with pytest.raises(pkvm.KvmError) as e:
        vm.set_memory_attributes(*args)
    assert e.value.errno == err
    assert _state(vm) == before


def test_failed_reservation_charges_no_post_walk() -> None:
    vm = _vm()
    price, _ = _prices(vm)
    vm.set_memory_attributes(G1 * P, 100 * P, PRIVATE)
    before = _state(vm)
    vm.inject_failure("xa_reserve", errno.ENOMEM)
    with pytest.raises(pkvm.KvmError):
        vm.set_memory_attributes((G1 + 300) * P, P, PRIVATE)
    assert _state(vm)[:4] == before[:4]
    walk, _loads, _ns, _lock = _delta(vm, ((G1 + 300) * P, P, PRIVATE))
    assert walk == 100 * price  # disarmed: the walk stops at G1 + 100


def test_charge_events_are_emitted() -> None:
    vm = _vm()
    price, p2m = _prices(vm)
    vm.set_memory_attributes(G1 * P, 511 * P, PRIVATE)
    seen: list[tuple[str, int, int]] = []
    vm.subscribe(lambda ev: seen.append((ev.op, ev.count, ev.ns)) if ev.kind == "charge" else None)
    vm.set_memory_attributes((G1 + 511) * P, P, PRIVATE)
    assert [s for s in seen if s[0].startswith("attr_check")] == [
        ("attr_check_gfn", 511, 511 * price), ("attr_check_2m", 2, 2 * p2m)]


def test_phase_by_phase_and_legacy_charge_the_same_walk() -> None:
    """The phase-by-phase ioctl charges POST's walk in its ``post`` phase; the UPM-era ioctl
    recomputes MIXED with the same step (pkvm models it so) and charges it too."""
    a, b = _vm(), _vm()
    for vm in (a, b):
        vm.set_memory_attributes(G1 * P, 300 * P, PRIVATE)
    op = b.begin_set_memory_attributes((G1 + 400) * P, P, PRIVATE)
    w = _walks(b)
    op.run_to("commit")
    assert _walks(b) == w
    op.run_to("post")
    assert _walks(b)[0] - w[0] == 300 * _prices(b)[0]
    op.finish()
    a.set_memory_attributes((G1 + 400) * P, P, PRIVATE)
    assert _state(a) == _state(b)
    legacy = _vm("rfc-v8")
    legacy.set_memory_attributes(G1 * P, 300 * P, PRIVATE)
    assert _delta(legacy, ((G1 + 400) * P, P, PRIVATE))[0] == 300 * _prices(legacy)[0]


def test_timeline_charges_the_walk_inside_the_mmu_lock_hold() -> None:
    vm, sync = _vm(), _vm()
    price, _ = _prices(vm)
    for v in (vm, sync):
        v.set_memory_attributes(G1 * P, 300 * P, PRIVATE)
    sync.set_memory_attributes((G1 + 400) * P, P, PRIVATE)
    tl = Timeline(vm)
    tl.spawn("vmm", lambda: vm.set_memory_attributes((G1 + 400) * P, P, PRIVATE))
    tl.run()
    assert vm.modeled_ns == sync.modeled_ns and vm.cost_breakdown() == sync.cost_breakdown()
    assert tl.result().locks["mmu_lock"]["hold_ns"] == 300 * price  # nothing zapped: the walk
    vm.check()


@pytest.mark.parametrize("platform", ["sw_protected", "snp"])
def test_batched_calls_give_the_loops_results(platform: str) -> None:
    """``set_memory_attributes_many`` gives exactly the loop's charges, both directions, in
    fragmented memory (two pages of a 2M chunk, 1G chunks with many MIXED sub-chunks)."""
    rng = np.random.default_rng(7)
    gfns = rng.choice(4 * G1, size=3000, replace=False)
    gfns = np.concatenate([gfns, gfns[:500] + 1, [G1, G1 + 1, 2 * G1 + 511]])
    gfns = np.unique(gfns)
    rng.shuffle(gfns)
    a, b = _vm(vm_type=platform), _vm(vm_type=platform)
    n = len(gfns)
    gpas = (gfns.astype(np.uint64) << np.uint64(12))
    sizes = np.full(n, P, dtype=np.uint64)
    for attrs in (PRIVATE, 0):
        a.set_memory_attributes_many(gpas, sizes, np.full(n, attrs, dtype=np.uint64))
        for g in gfns:
            b.set_memory_attributes(int(g) << 12, P, attrs)
        assert _state(a) == _state(b)
    assert _walks(a)[0] > 0 and _walks(a)[1] > 0
    a.check()


@pytest.mark.parametrize("policy", ["6.8", "6.11", "6.19", "rfc-v8"])
def test_reference_twin_agrees(policy: str) -> None:
    """The per-gfn reference walks gfn by gfn and sub-chunk by sub-chunk and charges the same,
    with a slot smaller than a 1G chunk (6.8's head test reads past it) and one that is not."""
    rng = np.random.default_rng(3)
    for size in (4 * M, GiB + 2 * M):
        vm = pkvm.VM("sw_protected", policy=policy)
        ref = ReferenceVM("sw_protected", policy=policy)
        gmem = vm.create_guest_memfd(size)
        vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, size, 1 << 40, gmem, 0)
        rg = ref.create_guest_memfd(size)
        ref.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, size, 1 << 40, rg, 0)
        pages = size >> 12
        for _ in range(60):
            g = int(rng.integers(0, pages))
            n = int(min(pages - g, rng.choice([1, 1, 3, 511, 512, 700])))
            a = int(rng.choice([0, PRIVATE]))
            vm.set_memory_attributes(g * P, n * P, a)
            ref.set_memory_attributes(g * P, n * P, a)
            assert vm.cost_breakdown() == ref.cost, (size, g, n, a)
            assert vm.modeled_ns == ref.modeled_ns
        vm.check()


def test_remembered_runs_follow_every_write() -> None:
    """The core remembers the attribute run at each 1G chunk's first gfn for the 1G walk
    (pkvm/_attr.pxi, ``_Run1G``); every kind of write updates or forgets it, and ``vm.check()``
    compares every remembered run with the map: writes that cover a chunk's first gfn, cut its
    run short, extend it with the same value, join the next run, span chunks, and one past the
    table's size (outside the slot: attributes need no memslot)."""
    vm = _vm()
    p1 = lambda g, n, a: vm.set_memory_attributes(g * P, n * P, a)  # noqa: E731
    ops = [(G1 + 700, 1, PRIVATE), (G1 + 100, 1, PRIVATE), (G1 + 101, 599, PRIVATE),
           (G1 + 100, 601, 0), (G1, 1, PRIVATE), (G1 + 1, 99, PRIVATE), (G1, 100, 0),
           (G1 - 5, 10, PRIVATE), (G1 + 5, 3, 0), (G1 + 8, 2 * G1, PRIVATE), (G1 + 4, 1, PRIVATE),
           (2 * G1 + 511, 2, 0), (3 * G1 - 1, 1, 0), (G1 + 300, 5, 0), (G1 + 100, 200, PRIVATE)]
    for g, n, a in ops:
        p1(g, n, a)
        p1(G1 + 9000, 1, PRIVATE if a == 0 else 0)  # a call whose 1G walk reads the run
        vm.check()
    p1(0, 2**31, PRIVATE)   # 8192 1G chunks: more than the table holds
    vm.check()
    p1(G1 + 77, 1, 0)
    vm.check()


def _attr_costs(c: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in c.items() if k.startswith("attr_")}


@pytest.mark.parametrize("policy", ["6.8", "6.19"])
def test_one_gfn_path_agrees_with_the_phase_path(policy: str) -> None:
    """A one-page call without subscribers takes the core's one-gfn path (``AttrPath._quiet1``:
    POST written out for the gfn, the remembered 1G run read in line, the charges added in
    line); a subscriber sends the same call through the phase-by-phase path
    (``_post_set_mixed`` and ``_charge_post``). Call by call, clustered so that every branch is
    taken: the 1G chunk's first run with the old value, with the new one ending inside a
    sub-chunk, at a sub-chunk's start (a read of the map) or covering the chunk; the chunk's
    first gfn written (its remembered run forgotten); 2M walks with steps (charged on the
    general path) and without; SPTEs zapped; a 1G chunk that sticks out of the slot (6.8 reads
    it, later policies do not). Both VMs hold the same state, charges, modeled and lock time,
    and the reference twin (no faults) charges the same for the attributes."""
    size = 2 * GiB + 6 * M
    rng = np.random.default_rng(16)
    fast = _vm(policy, size=size)
    slow = _vm(policy, size=size)
    ref = ReferenceVM("sw_protected", policy=policy)
    rg = ref.create_guest_memfd(size)
    ref.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, size, 1 << 44, rg, 0)
    seen: list[object] = []
    slow.subscribe(seen.append, "charge")
    vcpus = [vm.create_vcpu() for vm in (fast, slow)]
    windows = [(G1 - 4, 8), (G1, 600), (G1 + 1020, 40), (2 * G1 - 6, 12), (2 * G1, 1536),
               (G1 + 5000, 3)]
    setups = [(G1, 100), (G1, 512), (G1, G1), (G1 + 1024, 6), (2 * G1, 1024)]
    for step in range(1500):
        a = int(rng.choice([0, PRIVATE]))
        if step % 150 == 0:
            g, n = setups[(step // 150) % len(setups)]
        else:
            lo, w = windows[int(rng.integers(0, len(windows)))]
            g, n = lo + int(rng.integers(0, w)), 1
        for vm in (fast, slow, ref):
            vm.set_memory_attributes(g * P, n * P, a)
        assert _state(fast) == _state(slow), (step, g, n, a)
        assert _attr_costs(fast.cost_breakdown()) == _attr_costs(ref.cost), (step, g, n, a)
        if step % 7 == 0:  # a leaf to zap later (the fault goes where the attributes say)
            for vcpu in vcpus:
                vcpu.page_fault(g * P, private=bool(a))
            assert _state(fast) == _state(slow)
        if step % 100 == 0:
            fast.check()
    c = fast.cost_breakdown()
    assert c["attr_check_gfn"] > 0 and c["attr_check_2m"] > 0 and c["zap_spte"] > 0
    assert seen
    fast.check()
    slow.check()


def _lpage(vm: pkvm.VM) -> list[list[tuple[int, int, int]]]:
    """Every memslot's 2M and 1G lpage words, run by run."""
    return [list(m.iter_ranges()) for s in vm._slots.values() for m in s.lpage.maps[2:]]


def _words(vm: pkvm.VM, g: int) -> tuple[int, int]:
    """The 2M and 1G lpage words of gfn ``g``'s chunks (in slot 0)."""
    m2, m1 = vm._slots[0].lpage.maps[2:]
    return m2.get(g >> 9), m1.get(g >> 18)


@pytest.mark.parametrize("platform", ["sw_protected", "snp"])
def test_one_gfn_to_shared_sees_its_chunk_from_the_runs_beside(platform: str) -> None:
    """A one-page conversion to shared on the one-gfn path (no subscriber) tells whether its 2M
    chunk is uniform afterwards from the attribute runs next to the gfn's, read in the same
    leaf by the call's first lookup, and leaves it to POST's 2M test when a neighbour is in
    another leaf. Fragmented private pages (hundreds of leaves, so that a gfn's run is often
    the first or last of its leaf), some alone in their chunk, some with a private neighbour
    in the chunk before, after or both, converted back one by one in random order: the fast
    VM and the subscribed one (the phase path's ``find_ne``) hold the same MIXED words,
    charges, counters and time after every call, and both pass ``check()``."""
    size = 16 * GiB
    rng = np.random.default_rng(1616)
    fast = _vm(size=size, vm_type=platform)
    slow = _vm(size=size, vm_type=platform)
    slow.subscribe(lambda e: None, "charge")
    n_gfns = size >> 12
    lone = rng.choice(n_gfns // 512, 3000, replace=False) * 512 + rng.integers(0, 512, 3000)
    pages = set(int(g) for g in lone)
    for g in list(pages)[:1500]:  # a private neighbour in the same chunk, or just across its edge
        d = int(rng.choice([-300, -2, 2, 5, 300, 511, -511]))
        if 0 <= g + d < n_gfns:
            pages.add(g + d)
    for c in rng.choice(n_gfns // 512 - 2, 400, replace=False) + 1:  # the chunk's edges
        g, k = int(c) * 512, int(rng.integers(1, 511))
        pages.update([g + k, (g, g + 511, g - 1, g + 512)[int(c) % 4]])
    order = sorted(pages)
    for vm in (fast, slow):
        for g in order:
            vm.set_memory_attributes(g * P, P, PRIVATE)
        v = vm.create_vcpu()
        for g in order[::5]:  # some leaves to zap
            v.page_fault(g * P, private=True)
    assert _lpage(fast) == _lpage(slow)
    rng.shuffle(order)
    for i, g in enumerate(order):
        for vm in (fast, slow):
            vm.set_memory_attributes(g * P, P, 0)
        assert _state(fast) == _state(slow), (i, g)
        assert _words(fast, g) == _words(slow, g), (i, g)
        if i % 97 == 0:
            assert _lpage(fast) == _lpage(slow), (i, g)
    assert _lpage(fast) == _lpage(slow)
    fast.check()
    slow.check()
