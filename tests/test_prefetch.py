"""The per-page paths' software prefetch hints (``VM._prefetch``) change timing, never results.

A fault asks for the leaves its later lookups read (the SPTE, the guest_memfd folio of the
memslot seen last, the shared backing block and the 2M word), and a one-page attribute ioctl
for its three leaves, before reading any of them (docs/performance.md, "Prefetching the
leaves of a call"). A hint descends inner nodes and touches nothing else, and a guess made for
the wrong memslot, for a deleted one or for a gfn outside every memslot only fetches lines
nobody reads. These tests run the same calls on a VM with the hints and on one without and
compare every result, the counters, the modeled time and the maps.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm

P = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
MiB2 = 1 << 21
GiB = 1 << 30
PLATFORMS = ["snp", "sw_protected", "tdx"]

# gfns in two memslots bound to one guest_memfd (slot 1 at a file offset), in the gap between
# them (no memslot: MMIO / memory-fault exits) and right at the slots' edges
_SLOT_GFNS = st.one_of(
    st.integers(0, (4 * MiB2 >> 12) - 1),
    st.integers(GiB >> 12, (GiB + 4 * MiB2 >> 12) - 1),
    st.sampled_from([(4 * MiB2 >> 12), (GiB >> 12) - 1, (GiB + 4 * MiB2 >> 12), 1 << 20]),
)

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("attrs"), _SLOT_GFNS, st.sampled_from([1, 1, 1, 2, 512]), st.sampled_from([0, P])),
        st.tuples(st.just("fault"), _SLOT_GFNS, st.booleans(), st.booleans()),
        st.tuples(st.just("many"), st.lists(_SLOT_GFNS, min_size=1, max_size=8), st.booleans(), st.booleans()),
        st.tuples(st.just("delete_slot"), st.sampled_from([0, 1]), st.just(0), st.just(0)),
    ),
    max_size=60,
)


def _vm(platform, prefetch):
    vm = pkvm.VM(platform)
    vm._prefetch = prefetch
    g = vm.create_guest_memfd(GiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB2, 1 << 40, g, 0)
    vm.set_user_memory_region2(1, pkvm.KVM_MEM_GUEST_MEMFD, GiB, 4 * MiB2, (1 << 40) + GiB, g, 4 * MiB2)
    vcpu = vm.create_vcpu()
    if platform == "tdx":
        vm.tdx.finalize_vm()
    return vm, g, vcpu


def _outcome(fn):
    try:
        return ("ok", fn())
    except (pkvm.KvmError, ValueError, TypeError) as e:
        return (type(e).__name__, getattr(e, "errno", None), str(e))


def _run(vm, g, vcpu, op):
    kind, a, b, c = op
    if kind == "attrs":
        return _outcome(lambda: vm.set_memory_attributes(a << 12, b << 12, c))
    if kind == "fault":
        return _outcome(lambda: vcpu.page_fault(a << 12, private=b, write=c))
    if kind == "many":
        def many():
            batch = vcpu.page_fault_many([x << 12 for x in a], private=b, write=c)
            return [batch[i] for i in range(len(batch))]
        return _outcome(many)
    base = 0 if a == 0 else GiB
    return _outcome(lambda: vm.set_user_memory_region2(a, pkvm.KVM_MEM_GUEST_MEMFD, base, 0,
                                                       (1 << 40) + base, g, 0))


def _state(vm):
    return (dict(vm.stats), vm.modeled_ns, vm._mmu.sptes.ranges(), vm._attrs.ranges())


@pytest.mark.parametrize("platform", PLATFORMS)
@settings(max_examples=40, deadline=None)
@given(ops=_OPS)
def test_results_do_not_depend_on_the_hints(platform, ops):
    on, off = _vm(platform, True), _vm(platform, False)
    for op in ops:
        assert _run(*on, op) == _run(*off, op), op
    assert _state(on[0]) == _state(off[0])
    on[0].check()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_fragmented_pages_give_the_same_maps(platform):
    """Random 4K pages through the four phases: the hints' fast case (cold leaves of large
    maps) compared call by call."""
    import random

    rng = random.Random(7)
    gfns = rng.sample(range(4 * MiB2 >> 12), 400) + rng.sample(range(GiB >> 12, (GiB + 4 * MiB2) >> 12), 400)
    on, off = _vm(platform, True), _vm(platform, False)
    for attrs, private in ((P, True), (0, False)):
        got = []
        for vm_, _, vcpu in (on, off):
            res = [vm_.set_memory_attributes(x << 12, 4096, attrs) for x in gfns]
            got.append(res + [vcpu.page_fault(x << 12, private=private) for x in gfns])
        assert got[0] == got[1]
    assert _state(on[0]) == _state(off[0])


def test_the_setting_is_on_by_default_and_per_vm():
    a, b = pkvm.VM("snp"), pkvm.VM("snp")
    assert a._prefetch is True and b._prefetch is True
    a._prefetch = False
    assert a._prefetch is False and b._prefetch is True
