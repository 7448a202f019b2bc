"""A refused public API call changes nothing, and raises only a documented type.

Hypothesis drives a VM of each platform through random sequences of public calls with
arguments that are often wrong (negative, beyond a u64, unaligned, the wrong type, out of
the memslot). Every call either succeeds, or raises ``KvmError``, ``ValueError`` or
``TypeError`` and leaves the VM exactly as it was: counters, modeled time and its split by
actor, attributes, SPTEs, memslots, guest_memfd folios and allocation counts, the RMP (SNP)
and ``vm.check()``. The one refusal the kernel itself does not undo is named and tested on its
own: ``SNP_LAUNCH_UPDATE`` on a gfn that is not private keeps the guest_memfd folio that
``kvm_gmem_populate`` allocated before it looked at the attribute.
"""

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tdxhelpers import full_snapshot, td
from vmhelpers import GMEM, PRIVATE, UADDR

import pkvm

MiB = 1 << 20
SIZE = 4 * MiB
_ALLOWED = (pkvm.KvmError, ValueError, TypeError)

# Integers a fuzzer reaches for: in range, at the edges, beyond a u64, negative.
_INT = st.one_of(
    st.integers(0, SIZE + 0x3000).map(lambda a: a & ~0xFFF), st.integers(0, SIZE + 0x3000),
    st.sampled_from([-1, -0x1000, 1 << 64, (1 << 64) - 1, (1 << 64) - 0x1000, 1 << 52, 1 << 63]),
)
_ARG = st.one_of(_INT, _INT, _INT, st.sampled_from([None, "0x1000", 1.5, True]))


def _vm(platform):
    if platform == "tdx":  # a finalized TD: RAM private, as QEMU builds it
        vm, _vmm, gmem, vcpu = td(SIZE)
        return vm, gmem, vcpu
    vm = pkvm.VM(platform, policy="6.19")
    gmem = vm.create_guest_memfd(SIZE)
    vm.set_user_memory_region2(0, GMEM, 0, SIZE, UADDR, gmem, 0)
    vm.set_memory_attributes(0, SIZE // 2, PRIVATE)
    return vm, gmem, vm.create_vcpu()


def _calls(vm, gmem, vcpu):
    """(name, callable taking drawn args, number of args) of the public calls under test."""
    calls = [
        ("set_memory_attributes", lambda a, b, c, d: vm.set_memory_attributes(a, b, c & PRIVATE
                                                                               if type(c) is int and c >= 0 else c, d), 4),
        ("get_memory_attributes", lambda a: vm.get_memory_attributes(a), 1),
        ("set_user_memory_region2", lambda a, b, c, d: vm.set_user_memory_region2(1, b, c, d, a), 4),
        ("create_guest_memfd", lambda a, b: vm.create_guest_memfd(a, b), 2),
        ("fallocate", lambda a, b, c: gmem.fallocate(a, b, c), 3),
        ("page_fault", lambda a, b: vcpu.page_fault(a, private=bool(b) if type(b) is int else b), 2),
        ("access", lambda a, b: vcpu.access(a, private=bool(b) if type(b) is int else b, size=0x1000), 2),
        ("hypercall", lambda a, b, c, d: vcpu.hypercall(12, a, b, c), 4),
        ("enable_cap", lambda a, b: vm.enable_cap(a, b), 2),
        ("check_extension", lambda a: vm.check_extension(a), 1),
    ]
    if vm.platform.name == "tdx":
        calls += [
            ("map_gpa", lambda a, b: vcpu.map_gpa(a, b), 2),
            ("accept", lambda a, b: vcpu.accept(a, b), 2),
        ]
    if vm.platform.name == "snp":
        calls += [
            ("launch_update", lambda a, b, c, d: vm.snp.launch_update(a, b, c if type(c) is not int else c & 7, d), 4),
            ("pvalidate", lambda a, b: vcpu.pvalidate(a, 0, bool(b) if type(b) is int else b), 2),
        ]
    return calls


@settings(deadline=None)
@given(platform=st.sampled_from(["sw_protected", "snp", "tdx"]), steps=st.lists(
    st.tuples(st.integers(0, 11), st.lists(_ARG, min_size=4, max_size=4)), min_size=1, max_size=25))
def test_refused_calls_change_nothing(platform, steps):
    """Across the API: success, or a documented exception and an unchanged VM."""
    vm, gmem, vcpu = _vm(platform)
    calls = _calls(vm, gmem, vcpu)
    for pick, args in steps:
        name, call, nargs = calls[pick % len(calls)]
        before = full_snapshot(vm)
        try:
            call(*args[:nargs])
        except _ALLOWED as exc:
            if vm.vm_dead:  # the kernel killed the VM (kvm_vm_dead): that is its answer
                return
            after = full_snapshot(vm)
            if name == "launch_update" and isinstance(exc, pkvm.KvmError):
                # kvm_gmem_populate allocates the folio before it checks the attribute: only the
                # allocation (count, folio, host memory, its modeled time) may have changed.
                assert after[0][0:3] == before[0][0:3] and after[1][2:] == before[1][2:], name
            else:
                assert after == before, (name, args[:nargs], exc)
        vm.check()


def test_get_memory_attributes_out_of_range_is_documented():
    """gfn -1 or 2**64: ValueError (not OverflowError); a str: TypeError."""
    vm, _, _ = _vm("sw_protected")
    for gfn in (-1, 1 << 64):
        with pytest.raises(ValueError, match="does not fit a u64"):
            vm.get_memory_attributes(gfn)
    with pytest.raises(TypeError, match="gfn must be an int, not str"):
        vm.get_memory_attributes("0")  # type: ignore[arg-type]


def test_refused_launch_update_keeps_only_the_populated_folio():
    """``SNP_LAUNCH_UPDATE`` on a gfn that is not PRIVATE fails with the first page, but
    ``kvm_gmem_populate`` (virt/kvm/guest_memfd.c) has already allocated its folio through
    ``__kvm_gmem_get_pfn`` -> ``kvm_gmem_get_folio`` (FGP_CREAT) before it checks the attribute,
    and only drops its reference: the folio stays in the file, unprepared, with no RMP change.
    pkvm keeps exactly that and nothing else; a second attempt changes nothing at all. The
    checks before the folio lookup (bad parameters, a gfn outside a guest_memfd slot) change
    nothing either."""
    vm, gmem, _ = _vm("snp")
    gpa = SIZE - 0x1000  # in the shared half
    before = full_snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="SNP_LAUNCH_UPDATE") as e:
        vm.snp.launch_update(gpa, 0x1000, 1, 0)
    assert e.value.errno in (errno.EINVAL, errno.EIO)
    after = full_snapshot(vm)
    idx = gpa >> 12
    assert gmem.folio(idx) is not None and not gmem.folio(idx)[2]  # allocated, not prepared
    assert vm.stats["gmem_pages_allocated"] == before[0][4]["gmem_pages_allocated"] + 1
    assert vm.stats["launch_update_pages"] == 0 and vm.stats["rmpupdate"] == 0
    assert after[1][2:] == before[1][2:]  # the RMP is untouched
    assert after[0][0:3] == before[0][0:3]  # attributes, SPTEs, memslots
    assert vm.cost_breakdown().keys() - before[0][6].keys() <= {"gmem_alloc_4k"}
    vm.check()
    again = full_snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="SNP_LAUNCH_UPDATE"):
        vm.snp.launch_update(gpa, 0x1000, 1, 0)
    assert full_snapshot(vm) == again
    for args in ((gpa, 0, 1, 0), (gpa + 1, 0x1000, 1, 0), (gpa, 0x1000, 9, 0), (gpa, 0x1000, 1, 1),
                 (SIZE, 0x1000, 1, 0)):
        with pytest.raises(pkvm.KvmError, match="SNP_LAUNCH_UPDATE"):
            vm.snp.launch_update(*args)
        assert full_snapshot(vm) == again, args
    vm.check()
