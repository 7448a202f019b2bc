"""The no-op check of KVM_SET_MEMORY_ATTRIBUTES costs modeled time (docs/kernel-semantics.md
§2.7, docs/costs.md ``attr_check_gfn``).

``kvm_range_has_memory_attributes`` (virt/kvm/kvm_main.c) answers a to-private request by
reading the range gfn by gfn until the first one that differs: the whole range when the call is a
no-op. Its first read is the xarray descent (part of the call's fixed overhead, not priced); every
later gfn it steps to is one ``attr_check_gfn``. A to-shared request is one ``xas_find`` and a
one-gfn request one ``xa_load``: no walk. Refused calls charge nothing.
"""

from __future__ import annotations

import errno

import pytest

import pkvm
from pkvm.sim import Timeline
from pkvm.testing.reference_vm import ReferenceVM

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
TiB = 1 << 40
GiB = 1 << 30
M = 1 << 20
PAGES_1T = TiB >> 12


def _vm(policy: str = "6.19", slot: bool = False, **kw: object) -> tuple[pkvm.VM, int]:
    """A SW_PROTECTED VM and the walk's price. Without ``slot`` the VM has no memslot: the
    attributes are set all the same (§2.2), and no POST phase runs, whose MIXED tests charge
    ``attr_check_gfn`` too (§3.3, tests/test_post_walk.py): the walk charged is the check's."""
    vm = pkvm.VM("sw_protected", policy=policy, **kw)
    if slot:
        gmem = vm.create_guest_memfd(TiB)
        vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, TiB, 1 << 44, gmem, 0)
    costs = vm.costs
    return vm, costs["attr_check_gfn"].value_ns if "attr_check_gfn" in costs else 3


def _walk_ns(vm: pkvm.VM) -> int:
    return vm.cost_breakdown().get("attr_check_gfn", 0)


def _state(vm: pkvm.VM) -> tuple[object, ...]:
    return (vm.modeled_ns, vm.cost_breakdown(), dict(vm.stats), vm.mmu_lock_ns, vm.attr_ioctls)


def test_price_is_listed_with_a_valid_range() -> None:
    c = pkvm.CostModel.default("snp")["attr_check_gfn"]
    assert (c.value_ns, c.low_ns, c.high_ns, c.confidence, c.row) == (3, 1, 10, "E", None)
    assert 0 < c.low_ns <= c.value_ns <= c.high_ns
    assert "kvm_range_has_memory_attributes" in c.source


def test_noop_to_private_of_1tib_walks_every_gfn_after_the_first() -> None:
    """2**28 - 1 steps: repeating a 1 TiB conversion to private is not free."""
    vm, price = _vm(slot=True)  # whole chunks: POST reads nothing
    vm.set_memory_attributes(0, TiB, PRIVATE)
    assert _walk_ns(vm) == 0  # the first gfn was shared: the walk stopped at once
    before = _state(vm)
    vm.set_memory_attributes(0, TiB, PRIVATE)
    assert vm.modeled_ns - before[0] == price * (PAGES_1T - 1)
    assert _walk_ns(vm) == price * (PAGES_1T - 1)
    # nothing else happened: no zap, flush, store or sequence bump; not under mmu_lock
    stats = dict(vm.stats)
    assert stats == before[2] and vm.mmu_lock_ns == before[3] and vm.attr_ioctls == before[4] + 1
    vm.check()


def test_noop_to_shared_is_the_descent_only() -> None:
    vm, _price = _vm()
    before = _state(vm)
    vm.set_memory_attributes(0, TiB, 0)  # every gfn shared already: one xas_find
    assert vm.modeled_ns == before[0] and vm.cost_breakdown() == before[1]
    assert "attr_check_gfn" not in vm.cost_breakdown()


def test_one_gfn_noop_is_one_lookup() -> None:
    vm, _price = _vm()
    vm.set_memory_attributes(0x5000, 0x1000, PRIVATE)
    before = _state(vm)
    vm.set_memory_attributes(0x5000, 0x1000, PRIVATE)
    assert _state(vm)[:2] == before[:2]


@pytest.mark.parametrize("k", [1, 2, 511, 512, 513, 100_000])
def test_partly_private_request_walks_up_to_the_first_mismatch(k: int) -> None:
    """The first k gfns are private already: the walk steps to gfn k (k steps), finds it shared
    and the call goes on to convert the whole range."""
    vm, price = _vm()
    n = 1 << 20
    vm.set_memory_attributes(0, k << 12, PRIVATE)
    w0 = _walk_ns(vm)
    store0 = vm.cost_breakdown()["attr_store"]
    vm.set_memory_attributes(0, n << 12, PRIVATE)
    assert _walk_ns(vm) - w0 == price * k
    assert vm.cost_breakdown()["attr_store"] - store0 == n * vm.costs["attr_store"].value_ns
    vm.check()


def test_mismatch_in_the_middle_of_private_runs() -> None:
    """Only the first run that differs counts, whatever follows it."""
    vm, price = _vm()
    vm.set_memory_attributes(0, 64 << 12, PRIVATE)
    vm.set_memory_attributes(80 << 12, 64 << 12, PRIVATE)
    w0 = _walk_ns(vm)
    vm.set_memory_attributes(0, 200 << 12, PRIVATE)  # gfns 64..79 are shared: stops at 64
    assert _walk_ns(vm) - w0 == 64 * price


def test_to_shared_request_never_walks() -> None:
    vm, _price = _vm()
    vm.set_memory_attributes(0, GiB, PRIVATE)
    vm.set_memory_attributes(GiB, GiB, PRIVATE)
    w0 = _walk_ns(vm)
    vm.set_memory_attributes(0, 4 * GiB, 0)  # entries present: xas_find returns at the first
    assert _walk_ns(vm) == w0


def test_override_and_past_int64() -> None:
    """The price follows overrides; a walk whose ns leave int64 is exact (Python ints)."""
    vm, price = _vm(costs={"attr_check_gfn": 7})
    assert price == 7
    vm.set_memory_attributes(0, TiB, PRIVATE)
    vm.set_memory_attributes(0, TiB, PRIVATE)
    assert _walk_ns(vm) == 7 * (PAGES_1T - 1)
    big = pkvm.VM("sw_protected", costs={"attr_check_gfn": "60s"})
    top = 1 << 52  # the whole 52-bit guest physical space: 2**40 gfns
    big.set_memory_attributes(0, top, PRIVATE)
    t0 = big.modeled_ns
    big.set_memory_attributes(0, top, PRIVATE)
    want = 60 * 10**9 * ((1 << 40) - 1)
    assert want >> 63
    assert big.modeled_ns - t0 == want and big.cost_breakdown()["attr_check_gfn"] == want


REFUSED = [
    ((0, TiB, PRIVATE, 1), errno.EINVAL),          # flags
    ((0, TiB, PRIVATE | 1, 0), errno.EINVAL),      # unsupported attribute bit
    ((0, 0, PRIVATE, 0), errno.EINVAL),            # size 0
    ((0x800, TiB, PRIVATE, 0), errno.EINVAL),      # unaligned address
    ((0, TiB + 0x800, PRIVATE, 0), errno.EINVAL),  # unaligned size
    (((1 << 64) - 0x1000, 0x2000, PRIVATE, 0), errno.EINVAL),  # wraps
]


@pytest.mark.parametrize(("args", "err"), REFUSED)
def test_refused_calls_charge_nothing(args: tuple[int, int, int, int], err: int) -> None:
    vm, _price = _vm()
    vm.set_memory_attributes(0, TiB, PRIVATE)
    before = _state(vm)
    with pytest.raises(pkvm.KvmError) as e:
        vm.set_memory_attributes(*args)
    assert e.value.errno == err
    assert _state(vm) == before


def test_failed_reservation_charges_no_walk() -> None:
    """ENOMEM from xa_reserve (after the check): the call changes nothing, modeled time included."""
    vm, price = _vm()
    vm.set_memory_attributes(0, 100 << 12, PRIVATE)
    before = _state(vm)
    vm.inject_failure("xa_reserve", errno.ENOMEM)
    with pytest.raises(pkvm.KvmError) as e:
        vm.set_memory_attributes(0, 200 << 12, PRIVATE)
    assert e.value.errno == errno.ENOMEM
    assert _state(vm)[:4] == before[:4]
    vm.set_memory_attributes(0, 200 << 12, PRIVATE)  # disarmed: now it walks 100 gfns
    assert _walk_ns(vm) == 100 * price


def test_legacy_ioctl_has_no_check() -> None:
    """The UPM-era ioctl (``attr_ioctl="legacy-progress"``) has no short-circuit, so no walk."""
    vm, _price = _vm("rfc-v8")
    vm.set_memory_attributes(0, GiB, PRIVATE)
    vm.set_memory_attributes(0, GiB, PRIVATE)
    assert "attr_check_gfn" not in vm.cost_breakdown()


def test_phase_by_phase_ioctl_charges_the_same() -> None:
    """``begin`` runs the check: a no-op op charges its walk and is done; a partly private one
    charges up to the first mismatch, and the whole ioctl costs what the one-call ioctl does."""
    a, price = _vm()
    b, _ = _vm()
    for vm in (a, b):
        vm.set_memory_attributes(0, 300 << 12, PRIVATE)
    w0 = _walk_ns(b)
    op = b.begin_set_memory_attributes(0, 300 << 12, PRIVATE)
    assert op.noop and op.done and _walk_ns(b) - w0 == 299 * price
    a.set_memory_attributes(0, 300 << 12, PRIVATE)
    assert _state(a) == _state(b)
    op = b.begin_set_memory_attributes(0, 1000 << 12, PRIVATE)
    assert not op.noop and _walk_ns(b) - w0 == (299 + 300) * price
    op.finish()
    a.set_memory_attributes(0, 1000 << 12, PRIVATE)
    assert _state(a) == _state(b)
    b.check()


def test_charge_event_is_emitted() -> None:
    vm, price = _vm()
    vm.set_memory_attributes(0, 16 << 12, PRIVATE)
    seen: list[tuple[str, int, int]] = []
    vm.subscribe(lambda ev: seen.append((ev.op, ev.count, ev.ns)) if ev.kind == "charge" else None)
    vm.set_memory_attributes(0, 16 << 12, PRIVATE)
    assert seen == [("attr_check_gfn", 15, 15 * price)]


@pytest.mark.parametrize("noop", [True, False])
def test_timeline_holds_slots_lock_for_the_walk(noop: bool) -> None:
    """On the concurrent timeline the walk runs under slots_lock: the lock's hold is the walk
    for a no-op, and contains it otherwise (whole chunks: POST reads nothing)."""
    vm, price = _vm(slot=True)
    vm.set_memory_attributes(0, GiB, PRIVATE)
    size = GiB if noop else 2 * GiB
    sync, _ = _vm(slot=True)
    sync.set_memory_attributes(0, GiB, PRIVATE)
    sync.set_memory_attributes(0, size, PRIVATE)
    tl = Timeline(vm)
    t0 = vm.modeled_ns
    tl.spawn("vmm", lambda: vm.set_memory_attributes(0, size, PRIVATE))
    tl.run()
    walk = price * ((GiB >> 12) - (1 if noop else 0))
    assert _walk_ns(vm) == walk
    assert vm.modeled_ns == sync.modeled_ns and vm.cost_breakdown() == sync.cost_breakdown()
    hold = tl.result().locks["slots_lock"]["hold_ns"]
    assert hold == (walk if noop else vm.modeled_ns - t0)
    assert hold >= walk
    vm.check()


@pytest.mark.parametrize("policy", ["6.8", "6.11", "6.19", "rfc-v8"])
def test_reference_twin_agrees(policy: str) -> None:
    """The per-gfn reference model walks gfn by gfn and charges the same."""
    calls = [(0, 64, PRIVATE), (0, 64, PRIVATE), (0, 128, PRIVATE), (32, 8, 0), (0, 128, PRIVATE),
             (0, 128, PRIVATE), (200, 1, PRIVATE), (200, 1, PRIVATE), (0, 256, 0), (0, 256, 0),
             (600, 512, PRIVATE), (600, 512, PRIVATE), (500, 700, PRIVATE)]
    vm = pkvm.VM("sw_protected", policy=policy)
    ref = ReferenceVM("sw_protected", policy=policy)
    gmem = vm.create_guest_memfd(8 * M)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * M, 1 << 40, gmem, 0)
    rg = ref.create_guest_memfd(8 * M)
    ref.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * M, 1 << 40, rg, 0)
    for g, n, a in calls:
        vm.set_memory_attributes(g << 12, n << 12, a)
        ref.set_memory_attributes(g << 12, n << 12, a)
        assert vm.modeled_ns == ref.modeled_ns
        assert vm.cost_breakdown() == ref.cost
    if policy != "rfc-v8":
        assert ref.cost["attr_check_gfn"] > 0
