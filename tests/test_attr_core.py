"""The attribute ioctl's steps in the typed core (pkvm/_attr.pxi): its constants, its entry point
for callers that validated once, and its lpage_info / SPTE kernels against obvious references."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tdxhelpers import SHARED47, td
from vmhelpers import GMEM, MiB, UADDR, assert_core_constants, snapshot

import pkvm
from pkvm import constants as c
from pkvm._core import RangeMap
from pkvm.kvm import mmu

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE


def test_the_core_constants_are_the_kernel_ones() -> None:
    """pkvm/_attr.pxi repeats these values (C code cannot import them): they must agree."""
    assert_core_constants("_attr.pxi", {
        "_ATTR_PRIVATE = 1ULL << 3": c.KVM_MEMORY_ATTRIBUTE_PRIVATE == 1 << 3,
        "_LPAGE_MIXED = 1ULL << 31": mmu.KVM_LPAGE_MIXED_FLAG == 1 << 31,
        "_SPTE_PRIVATE = 1ULL << 3": mmu.SPTE_PRIVATE == 1 << 3,
        "_FILTER_SHARED = 1": c.KVM_FILTER_SHARED == 1,
        "_FILTER_PRIVATE = 2": c.KVM_FILTER_PRIVATE == 2,
        "_FILTER_ALL = 3": c.KVM_FILTER_ALL == 3,
        "_DIRECT_ROOTS = 2": mmu.KVM_DIRECT_ROOTS == 2,
        "_MIRROR_ROOTS = 4": mmu.KVM_MIRROR_ROOTS == 4,
        "_VALID_ROOTS = 6": mmu.KVM_VALID_ROOTS == 6,
    })
    assert mmu.spte_level(mmu.make_spte(0, 3, True, False)) == 3 and mmu.SPTE_LEVEL_SHIFT == 1


def _fault(vm: pkvm.VM, gpa: int, private: bool) -> object:
    """vCPU 0's fault at ``gpa``: its result, or the refusal's errno and message (a TD touching a
    page it has not accepted dies: two VMs compared must die alike)."""
    try:
        return vm.vcpus[0].page_fault(gpa, private=private)
    except pkvm.KvmError as e:
        return e.errno, str(e)


def _vm(platform: str, policy: str, vcpus: int = 1) -> pkvm.VM:
    if platform == "tdx":  # a TD gets its vCPUs before it is finalized (tdx_vcpu_create)
        return td(6 * MiB, policy=policy, vcpus=vcpus)[0]
    vm = pkvm.VM(platform, policy=policy)
    gmem = vm.create_guest_memfd(6 * MiB)
    # two slots with a hole between them, the second not 2M-aligned: head and tail chunks
    vm.set_user_memory_region2(0, GMEM, 0, 2 * MiB, UADDR, gmem, 0)
    vm.set_user_memory_region2(1, GMEM, 3 * MiB + 0x3000, 3 * MiB, UADDR + 3 * MiB + 0x3000, gmem, 2 * MiB)
    for _ in range(vcpus):
        vm.create_vcpu()
    return vm


_OPS = st.lists(st.tuples(st.integers(0, 1800), st.integers(1, 700), st.booleans(), st.integers(0, 1800),
                          st.booleans()), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(platform_policy=st.sampled_from([
    ("sw_protected", "6.8"), ("sw_protected", "6.16"), ("sw_protected", "6.19"), ("snp", "fault-time"),
    ("snp", "eager-post"), ("snp", "eager-locked"), ("snp", "eager-split"), ("tdx", "6.19"),
    ("tdx", "tdx-huge-pages")]), ops=_OPS)
def test_set_attrs_checked_is_the_ioctl_after_its_checks(platform_policy: tuple, ops: list) -> None:
    """``VM._set_attrs_checked(start, end, attrs)`` (the batched calls' entry point) does exactly
    what ``set_memory_attributes`` does with the same range, faults in between included."""
    platform, policy = platform_policy
    a, b = _vm(platform, policy), _vm(platform, policy)
    for gfn, n, private, fault_gfn, fault_private in ops:
        if a.vm_dead:
            break
        attrs = PRIVATE if private else 0
        a.set_memory_attributes(gfn << 12, n << 12, attrs)
        b._set_attrs_checked(gfn, gfn + n, attrs)
        gpa = fault_gfn << 12 | (SHARED47 if platform == "tdx" and not fault_private else 0)
        assert _fault(a, gpa, fault_private) == _fault(b, gpa, fault_private)
        assert snapshot(a) == snapshot(b)
        assert (a.attr_ioctls, a.mmu_lock_ns, a.events) == (b.attr_ioctls, b.mmu_lock_ns, b.events)
    if not a.vm_dead:
        a.check()
        b.check()


@settings(max_examples=30, deadline=None)
@given(platform_policy=st.sampled_from([
    ("sw_protected", "6.8"), ("sw_protected", "6.16"), ("sw_protected", "6.19"), ("snp", "fault-time"),
    ("snp", "eager-locked"), ("tdx", "6.19")]), vcpus=st.integers(1, 3), ops=_OPS)
def test_the_unobserved_ioctl_leaves_what_the_observed_one_does(platform_policy: tuple, vcpus: int,
                                                                 ops: list) -> None:
    """With no subscriber the ioctl writes the VM's scalars once per call (AttrPath._quiet); a
    subscriber makes it charge step by step. Both leave the same state: counters, modeled time
    (per op, with the ops in the same order), mmu_lock_ns, the invalidation range."""
    platform, policy = platform_policy
    a, b = _vm(platform, policy, vcpus), _vm(platform, policy, vcpus)
    seen: list = []
    b.subscribe(seen.append, kinds="set_memory_attributes")
    before = b.attr_ioctls  # a TD's setup made some

    for gfn, n, private, fault_gfn, fault_private in ops:
        if a.vm_dead:
            break
        attrs = PRIVATE if private else 0
        a.set_memory_attributes(gfn << 12, n << 12, attrs)
        b.set_memory_attributes(gfn << 12, n << 12, attrs)
        gpa = fault_gfn << 12 | (SHARED47 if platform == "tdx" and not fault_private else 0)
        assert _fault(a, gpa, fault_private) == _fault(b, gpa, fault_private)
        assert snapshot(a) == snapshot(b)
        assert list(a.cost_breakdown().items()) == list(b.cost_breakdown().items())
        assert (a.attr_ioctls, a.mmu_lock_ns, a.mmu_invalidate_in_progress, a.events) == (
            b.attr_ioctls, b.mmu_lock_ns, b.mmu_invalidate_in_progress, b.events)
    assert len(seen) == b.attr_ioctls - before > 0  # b ran observed
    if not a.vm_dead:
        a.check()
        b.check()


def test_set_attrs_checked_keeps_the_ioctls_own_refusal() -> None:
    """Still EDEADLK while a phase-by-phase ioctl holds slots_lock, and nothing changes."""
    vm = _vm("sw_protected", "6.19")
    op = vm.begin_set_memory_attributes(0, 0x1000, PRIVATE)
    before = (snapshot(vm), vm.attr_ioctls)
    with pytest.raises(pkvm.KvmError, match="unfinished KVM_SET_MEMORY_ATTRIBUTES") as e:
        vm._set_attrs_checked(5, 6, PRIVATE)
    assert e.value.errno == errno.EDEADLK and (snapshot(vm), vm.attr_ioctls) == before
    op.finish()
    vm._set_attrs_checked(5, 6, PRIVATE)
    assert vm.get_memory_attributes(5) == PRIVATE


@pytest.mark.parametrize("args, exc, match", [
    ((0x1000, 0x1000, PRIVATE, 1), pkvm.KvmError, "flags 0x1 must be 0"),
    ((0x1000, 0, PRIVATE, 0), pkvm.KvmError, "size 0x0 is empty"),
    ((0x1001, 0x1000, PRIVATE, 0), pkvm.KvmError, "not 4 KiB aligned"),
    ((0x1000, 0x1000, 1, 0), pkvm.KvmError, "attributes 0x1 not supported"),
    ((1 << 63, 1 << 63, PRIVATE, 0), pkvm.KvmError, "wraps around 2\\*\\*64"),
    ((-4096, 0x1000, PRIVATE, 0), ValueError, "address=-0x1000 does not fit a u64"),
    ((1 << 64, 0x1000, PRIVATE, 0), ValueError, "does not fit a u64"),
    ((0x1000, True, PRIVATE, 0), TypeError, "size must be an int, not bool"),
    ((0x1000, 4096.0, PRIVATE, 0), TypeError, "size must be an int, not float"),
])
def test_arguments_the_fast_check_does_not_accept_get_the_kernels_refusals(args: tuple, exc: type,
                                                                          match: str) -> None:
    vm = _vm("snp", "fault-time")
    before = (snapshot(vm), vm.attr_ioctls)
    with pytest.raises(exc, match=match):
        vm.set_memory_attributes(*args)
    assert (snapshot(vm), vm.attr_ioctls) == before


def test_an_int_subclass_is_accepted_as_its_value() -> None:
    class Gpa(int):
        pass

    vm = _vm("sw_protected", "6.19")
    vm.set_memory_attributes(Gpa(0x5000), Gpa(0x1000), PRIVATE)
    assert vm.get_memory_attributes(5) == PRIVATE and vm.stats["attr_stores"] == 1


_WORDS = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8),
                            st.sampled_from([0, 1, 2, mmu.KVM_LPAGE_MIXED_FLAG, mmu.KVM_LPAGE_MIXED_FLAG | 1])),
                  max_size=12)


@settings(max_examples=200, deadline=None)
@given(words=_WORDS, first=st.integers(0, 70), n=st.integers(0, 70))
def test_any_mixed_and_clear_mixed_against_every_word(words: list, first: int, n: int) -> None:
    lp = mmu.LpageInfo(0, 1 << 30, 0)
    m = lp.maps[pkvm.PG_LEVEL_2M]
    m.clear()
    for s, k, v in words:
        m.assign(s, s + k, v)
    naive = [m.get(i) for i in range(150)]
    last = first + n
    assert lp.any_mixed(first, last, pkvm.PG_LEVEL_2M) == any(
        naive[i] & mmu.KVM_LPAGE_MIXED_FLAG for i in range(first, last))
    lp.clear_mixed(first, last, pkvm.PG_LEVEL_2M)
    assert [m.get(i) for i in range(150)] == [
        w & ~mmu.KVM_LPAGE_MIXED_FLAG if first <= i < last else w for i, w in enumerate(naive)]
    m._check()


@settings(max_examples=150, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 1 << 18), st.integers(1, 3000)), max_size=6),
       mixed=st.lists(st.integers(0, 511), max_size=3), attrs=st.sampled_from([0, PRIVATE]))
def test_hugepage_has_attrs_is_the_kernels_definition(runs: list, mixed: list, attrs: int) -> None:
    """§3.2: 2M, every gfn has ``attrs``; 1G, no 2M sub-chunk MIXED and every sub-chunk's
    first gfn has ``attrs``."""
    amap = RangeMap(0)
    for s, k in runs:
        amap.assign(s, min(s + k, 1 << 18), PRIVATE)
    lp = mmu.LpageInfo(0, 1 << 30, 0)
    for i in mixed:
        lp.set_mixed(i << 9, pkvm.PG_LEVEL_2M, True)
    want_1g = not mixed and all(amap.get(i << 9) == attrs for i in range(512))
    assert mmu.hugepage_has_attrs(amap, lp, 0, pkvm.PG_LEVEL_1G, attrs) == want_1g
    for g in (0, 512, 1 << 17):
        want_2m = all(amap.get(x) == attrs for x in range(g, g + 512))
        assert mmu.hugepage_has_attrs(amap, lp, g, pkvm.PG_LEVEL_2M, attrs) == want_2m


@settings(max_examples=150, deadline=None)
@given(leaves=st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2]), st.booleans()), max_size=6),
       start=st.integers(0, 4095), n=st.sampled_from([1, 1, 2, 600]))
def test_zap_range_zaps_every_leaf_it_meets(leaves: list, start: int, n: int) -> None:
    """A zap of ``[start, start + n)`` (one gfn included) removes exactly the leaves meeting it,
    huge leaves whole, and counts them."""
    stats = dict.fromkeys(("pages_4k", "pages_2m", "pages_1g", "zapped_sptes"), 0)
    m = mmu.Mmu(stats, lambda op, n: None)
    for chunk, level, private in leaves:  # one leaf per 512-gfn chunk: whole 2M or a 4K page in it
        base = chunk * 512
        if level == 2:
            if m.sptes.find_ne(base, base + 512, 0) == -1:
                m.map_run(base, base + 512, 2, mmu.make_spte(0, 2, private, True))
        else:
            g = base + 7 * chunk
            if m.sptes.get(g) == 0 and m.sptes.find_ne(base, base + 512, 0) == -1:
                m.map_run(g, g + 1, 1, mmu.make_spte(0, 1, private, True))
    def leaves_of(runs: list) -> set:
        out = set()
        for s, e, v in runs:
            size = 1 << mmu.LEVEL_SHIFT[mmu.spte_level(v)]
            out |= {(g, g + size, v) for g in range(s, e, size)}
        return out

    before = leaves_of(m.sptes.ranges())
    end = min(start + n, 4096)
    hit = {(s, e, v) for s, e, v in before if s < end and e > start}
    assert m.zap_range(start, end) == len(hit)
    assert leaves_of(m.sptes.ranges()) == before - hit
    assert stats["zapped_sptes"] == len(hit)
    m._check()


def test_a_callback_that_calls_the_ioctl_on_entry_is_refused():
    """The one-gfn ioctl reads its gfn's words before it emits its entry event; a subscriber
    that tries to convert the gfn from that event gets EDEADLK (docs/events.md), and the outer
    ioctl goes on with the words it read: it converts the gfn once."""
    vm = _vm("snp", "fault-time")
    nested: list = []

    def convert_once(ev: pkvm.Event) -> None:
        if not nested:
            try:
                vm.set_memory_attributes(0x5000, 0x1000, PRIVATE)
            except pkvm.KvmError as e:
                nested.append(e.errno)

    with vm.subscribe(convert_once, kinds="set_memory_attributes"):
        vm.set_memory_attributes(0x5000, 0x1000, PRIVATE)
    assert nested == [errno.EDEADLK] and vm.attr_ioctls == 1
    assert vm.get_memory_attributes(5) == PRIVATE and vm.stats["attr_stores"] == 1
    vm.check()
