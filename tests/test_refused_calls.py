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


# -- ranges that end at 2**64, a bad launch image, a sleep past the clock (found by fuzzing) ------


def _guest(platform):
    if platform == "tdx":
        vm, vmm, _gmem, _vcpu = td(SIZE)
    else:
        vm = pkvm.VM(platform, policy="6.19")
        vmm = pkvm.Vmm(vm)
        vmm.add_ram(0, SIZE)
        vmm.launch([])
    return vm, vmm, pkvm.Guest(vm, vmm)


@pytest.mark.parametrize("platform", ["sw_protected", "snp", "tdx"])
def test_a_conversion_of_2_64_bytes_is_refused_before_anything_runs(platform):
    """``[0, 2**64)`` ends at 2**64 but its size fits no u64 (a PSC entry, MapGPA, QEMU's hwaddr,
    the ioctl's size): the guest refuses it up front on every platform. On SW_PROTECTED the
    hypercall used to run first, its exit left vCPU 0 stopped (every later guest call EBUSY)
    and the ioctl's ValueError came out of the VMM's answer."""
    vm, vmm, g = _guest(platform)
    assert g.accept(0x200000, 0x1000)  # (a page the guest owns, to convert afterwards)
    before = full_snapshot(vm, vmm.conversions)
    with pytest.raises(ValueError, match="below 2"):
        g.convert(0, 1 << 64, private=False)
    assert full_snapshot(vm, vmm.conversions) == before
    assert g.convert(0x200000, 0x1000, private=False)  # vCPU 0 is not left in an exit


def test_the_vmm_answers_a_conversion_of_2_64_bytes_with_einval():
    """``Vmm.convert_memory`` returns 0 or a negative errno: a size of 2**64 is -EINVAL (it
    raised the attribute ioctl's ValueError), and so is a memory-fault exit that asks for it."""
    vm, vmm, _g = _guest("sw_protected")
    attrs = vm.get_memory_attributes(0)
    assert vmm.convert_memory(0, 1 << 64, False) == -errno.EINVAL
    assert vmm.last_failure and vm.get_memory_attributes(0) == attrs
    exit_ = pkvm.FaultResult("exit", exit_reason=pkvm.KVM_EXIT_MEMORY_FAULT, memory_fault=(0, 1 << 64, 8),
                             errno=errno.EFAULT)
    assert not vmm.handle_exit(vm.vcpus[0], exit_)


@pytest.mark.parametrize("platform", ["sw_protected", "snp", "tdx"])
@pytest.mark.parametrize("image", [[(1, 0x1000, True)], [(0, 0, True)], [(-0x1000, 0x1000, True)], [(0, 0x1000)],
                                   [5], 7, [("0", 0x1000, True)]])
def test_a_refused_launch_image_creates_no_vcpu(platform, image):
    """``Vmm.launch`` checks its image before it creates vCPU 0 (it created it first)."""
    vm = pkvm.VM(platform, policy="6.19", options={"gpaw": 48} if platform == "tdx" else None)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, SIZE)
    before = full_snapshot(vm)
    with pytest.raises((TypeError, ValueError)):
        vmm.launch(image)
    assert not vm.vcpus and full_snapshot(vm) == before
    vmm.launch([[0, 0x1000, True]])  # a region as any 3-item sequence, as before
    assert len(vm.vcpus) == 1


def test_a_sleep_past_the_timelines_clock_is_a_value_error():
    """``Timeline.sleep`` bounds the clock it would reach (the core keeps it in C long longs):
    ValueError from the call, where ``2**64`` raised OverflowError later, out of ``run``."""
    from pkvm.sim import Timeline
    from pkvm.sim.timeline import MAX_CLOCK_NS

    tl = Timeline(pkvm.VM("sw_protected"))
    got = []

    def body():
        for ns in (1 << 64, MAX_CLOCK_NS, -1, 1.0):
            with pytest.raises(ValueError):
                tl.sleep(ns)
        tl.sleep(MAX_CLOCK_NS - 1)
        got.append(tl.now_ns)
        with pytest.raises(ValueError):
            tl.sleep(1)

    tl.spawn("a", body)
    tl.run()
    assert got == [MAX_CLOCK_NS - 1]


def test_tdx_is_private_gpa_checks_its_argument():
    """``vm.tdx.is_private_gpa`` takes a u64 int: numpy's int32 overflowed inside, and -1 or
    2**64 were answered."""
    import numpy as np

    td_ = pkvm.VM("tdx", options={"gpaw": 48}).tdx
    for bad, exc in ((np.int32(4096), TypeError), ("4096", TypeError), (True, TypeError), (1.0, TypeError),
                     (-1, ValueError), (1 << 64, ValueError)):
        with pytest.raises(exc):
            td_.is_private_gpa(bad)
    assert td_.is_private_gpa(0x1000) and not td_.is_private_gpa(0x1000 | 1 << 47)
