"""The typed hot state (pkvm/_state.pxi): VM, Memslot, HostMemory and SharedBacking keep their
fields in C members of cdef base classes that the core reads and writes directly. Python sees
the same names and types as before, Python writes reach the core and the core's writes reach
Python, and copying and pickling keep every field."""

from __future__ import annotations

import copy
import dataclasses
import errno
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm._core import HostMemoryState, MemslotState, SharedBackingState, VmState
from pkvm.host.hostmem import HostMemory, SharedBacking
from pkvm.kvm.memslots import Memslot
from pkvm.kvm.vm import VM

from vmhelpers import gmem_vm, shared_vm

MiB = 1 << 20
PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
INVALID_GFN = (1 << 64) - 1


def test_the_python_classes_derive_from_the_typed_bases():
    assert issubclass(VM, VmState) and issubclass(Memslot, MemslotState)
    assert issubclass(HostMemory, HostMemoryState) and issubclass(SharedBacking, SharedBackingState)


def test_fields_keep_their_python_types():
    vm, gmem, vcpu = gmem_vm()
    assert vm._sched is None and vm._platform is vm.platform
    assert type(vm.vm_dead) is bool and vm.vm_dead is False
    assert type(vm.mmu_invalidate_in_progress) is int and vm.mmu_invalidate_in_progress == 0
    assert vm.mmu_invalidate_range == (INVALID_GFN, INVALID_GFN)
    assert all(type(x) is int for x in vm.mmu_invalidate_range)
    slot = vm.memslot(0)
    assert type(slot.flags) is int and slot.flags == pkvm.KVM_MEM_GUEST_MEMFD
    assert slot.invalid is False and slot.gmem_file is gmem
    hm = vm._hostmem
    assert [type(x) for x in (hm.start_pfn, hm.end_pfn, hm._cursor, hm.nr_allocated)] == [int] * 4
    assert hm._cpu_cursors is None and hm.cpu is None and type(hm._used) is pkvm.RangeMap
    sb = vm._shared
    assert sb._mem is hm and type(sb.order) is int and type(sb.nr_populated) is int
    assert type(vm.nr_vcpus) is int and vm.nr_vcpus == 1
    assert "vm_dead" not in vars(vm) and "_sched" not in vars(vm) and "nr_vcpus" not in vars(vm)


def test_python_writes_reach_the_fault_path():
    """The core reads what Python code writes (the dead flag, the invalidation state, a memslot's
    invalid flag)."""
    vm, vcpu = shared_vm()
    vm._invalidate_begin()
    vm._invalidate_range_add(0, 16)
    assert vm.mmu_invalidate_in_progress == 1 and vm.mmu_invalidate_range == (0, 16)
    assert vcpu.page_fault(0x5000, private=False).ret == "retry"
    vm._invalidate_end()
    assert vcpu.page_fault(0x5000, private=False).ret == "fixed"
    vm.memslot(0).invalid = True
    assert vcpu.page_fault(0x300000, private=False).ret == "retry"
    vm.memslot(0).invalid = False
    vm._kill("test")
    assert vm.vm_dead is True
    with pytest.raises(pkvm.KvmError, match="the VM is dead") as e:
        vcpu.page_fault(0x300000, private=False)
    assert e.value.errno == errno.EIO


def test_attribute_ioctl_writes_reach_python():
    """The attribute ioctl's invalidation (in C) leaves the counts and the range as the kernel
    does: in progress back to 0, the range that was zapped."""
    vm, gmem, vcpu = gmem_vm()
    vcpu.page_fault(0x1000, private=False)
    vm.set_memory_attributes(0x1000, 0x2000, PRIVATE)
    assert vm.mmu_invalidate_in_progress == 0 and type(vm.mmu_invalidate_in_progress) is int
    start, end = vm.mmu_invalidate_range
    assert start <= 1 and end >= 3 and (start, end) != (INVALID_GFN, INVALID_GFN)


def test_a_remote_flush_reads_the_vcpu_counts_at_each_flush():
    """An ioctl's remote TLB flush targets max(VM.nr_vcpus, vCPUs created), both read when it
    flushes: a vCPU created, or ``nr_vcpus`` written from Python, between two ioctls prices the
    next flush by the new count."""
    vm, gmem, vcpu = gmem_vm(vm_type="snp", policy="fault-time")
    model = vm.costs

    def flush_ns(gfn: int) -> int:
        """The remote-flush ns the ioctl that zaps ``gfn``'s private leaf charges."""
        vm.set_memory_attributes(gfn << 12, 0x1000, PRIVATE)
        assert vcpu.page_fault(gfn << 12, private=True).ret == "fixed"
        before = vm.cost_breakdown().get("remote_tlb_flush", 0)
        vm.set_memory_attributes(gfn << 12, 0x1000, 0)  # zaps the leaf: flush_on_ret
        return vm.cost_breakdown()["remote_tlb_flush"] - before

    assert flush_ns(1) == model.ns("remote_tlb_flush", nr_vcpus=1)
    vm.create_vcpu()
    vm.create_vcpu()
    assert flush_ns(2) == model.ns("remote_tlb_flush", nr_vcpus=3)
    vm.nr_vcpus = 5
    assert flush_ns(3) == model.ns("remote_tlb_flush", nr_vcpus=5)
    vm.nr_vcpus = 2
    assert flush_ns(4) == model.ns("remote_tlb_flush", nr_vcpus=3)
    assert sorted(vm._flush_ns) == [1, 3, 5]


def test_a_recreated_memslot_replaces_the_one_the_fault_path_read_last():
    """Delete slot 0 and create it again over other host memory: the next fault maps the new
    slot's memory, not the deleted one's."""
    vm, vcpu = shared_vm(2 * MiB, vm_type="default", uaddr=1 << 32)
    r1 = vcpu.page_fault(0x1000, private=False)
    assert r1.ret == "fixed" and r1.pfn == vm._shared.lookup((1 << 20) + 1)
    vm.set_user_memory_region2(0, 0, 0, 0, 0)
    vm.set_user_memory_region2(0, 0, 0, 2 * MiB, 1 << 33)
    r2 = vcpu.page_fault(0x1000, private=False)
    assert r2.ret == "fixed" and r2.pfn == vm._shared.lookup((1 << 21) + 1) != r1.pfn


def _state(obj, names):
    return {n: getattr(obj, n) for n in names}


def test_hostmem_and_shared_backing_copy_and_pickle_every_field():
    mem = HostMemory(0x100, 1 << 16)
    mem.alloc(3, 0)
    sb = SharedBacking(mem, 9)
    sb.populate(0, 5)
    names = ("start_pfn", "end_pfn", "_cursor", "nr_allocated", "_cpu_cursors", "cpu")
    for clone in (copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        m2 = clone(mem)
        assert type(m2) is HostMemory and _state(m2, names) == _state(mem, names)
        assert list(m2._used.iter_ranges()) == list(mem._used.iter_ranges())
        s2 = clone(sb)
        assert type(s2) is SharedBacking and (s2.order, s2.nr_populated) == (9, 512)
        assert list(s2._map.iter_ranges()) == list(sb._map.iter_ranges())
        assert s2._mem.nr_allocated == mem.nr_allocated
    assert copy.copy(sb)._mem is mem and copy.deepcopy(sb)._mem is not mem


def test_memslot_and_vm_copy_keep_every_field():
    vm, vcpu = shared_vm()
    slot = vm.memslot(0)
    names = ("key", "as_id", "id", "base_gfn", "npages", "end_gfn", "userspace_addr", "flags", "gmem",
             "gmem_file", "gmem_pgoff", "invalid", "_ugfn")
    for clone in (copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        s2 = clone(slot)
        assert type(s2) is Memslot and _state(s2, names) == _state(slot, names)
    vm._invalidate_begin()
    vm._invalidate_range_add(3, 9)
    v2 = copy.copy(vm)
    assert type(v2) is VM and v2._platform is vm._platform and v2._attrs is vm._attrs
    assert (v2.mmu_invalidate_in_progress, v2.mmu_invalidate_range, v2.vm_dead) == (1, (3, 9), False)
    assert v2.nr_vcpus == vm.nr_vcpus == 1
    vm._invalidate_end()


def test_setstate_refuses_what_is_not_a_dict():
    with pytest.raises(TypeError, match="HostMemory.__setstate__ takes a dict, not list"):
        HostMemory().__setstate__([])


def test_hostmem_bounds_that_do_not_fit_refused():
    with pytest.raises(ValueError, match="bad host memory"):
        HostMemory(1 << 62, 1 << 62)


class _PropVcpu(pkvm.Vcpu):
    """A vCPU whose ``rmp_npf`` is a property, not a slot: the fault path asks Python."""

    __slots__ = ()
    calls = 0

    @property
    def rmp_npf(self):
        type(self).calls += 1
        return False


def test_vcpu_attribute_that_is_not_a_slot_goes_through_getattr():
    vm = pkvm.VM("snp")
    g = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, 1 << 40, g, 0)
    v = _PropVcpu(vm, 7)
    _PropVcpu.calls = 0
    vm.set_memory_attributes(0, 0x1000, PRIVATE)
    assert v.page_fault(0, private=True).ret == "fixed"
    assert v.page_fault(0x1000, private=False).ret == "fixed"
    assert _PropVcpu.calls == 2  # each fault's handler test asked the property


def _sw_unmarked(vm, gfn, private):
    """SW_PROTECTED's fault_is_private without the access_or_attribute mark: always called."""
    return private or bool(vm.get_memory_attributes(gfn) & PRIVATE)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1023), st.booleans(), st.sampled_from(["attr", "fault"])),
                min_size=1, max_size=40))
def test_sw_protected_marked_op_equals_calling_it(steps):
    """SW_PROTECTED's op is marked ``access_or_attribute``: the core computes the reported bit
    OR the attribute instead of calling it. A VM whose op is an unmarked copy (called on every
    fault) gives the same results, counters and modeled time."""
    vms = []
    for marked in (True, False):
        vm, gmem, vcpu = gmem_vm()
        if not marked:
            vm._platform = dataclasses.replace(vm._platform, fault_is_private=_sw_unmarked)
        vms.append((vm, vcpu))
    out = []
    for vm, vcpu in vms:
        res = []
        for gfn, flag, kind in steps:
            if kind == "attr":
                vm.set_memory_attributes(gfn << 12, 4096, PRIVATE if flag else 0)
            else:
                res.append(vcpu.page_fault(gfn << 12, private=flag))
        out.append((res, dict(vm.stats), vm._modeled_ns))
    assert out[0] == out[1]


def test_a_detour_that_is_not_a_plain_slot_is_read_through_getattr():
    """A vCPU class's ``_fault_detour`` names the attribute that sends a fault to its own
    ``_fault`` while not None: a set slot is read in C, a property or an unset slot through
    Python's getattr (an unset slot raises AttributeError, as getattr does)."""
    calls = []

    class Slotted(pkvm.Vcpu):
        __slots__ = ("stop",)
        _fault_detour = "stop"

        def _fault(self, gfn, limit, private, write):
            calls.append(gfn)
            return pkvm.Vcpu._fault(self, gfn, limit, private, write)

    class Prop(Slotted):
        __slots__ = ()
        flag = None

        @property
        def stop(self):
            return type(self).flag

    vm, _ = shared_vm(4 * MiB)
    s = Slotted(vm, 5)
    with pytest.raises(AttributeError, match="stop"):
        s.page_fault(0x1000, private=False)
    s.stop = None
    assert s.page_fault(0x1000, private=False).ret == "fixed" and calls == []
    s.stop = "pending"
    assert s.page_fault(0x2000, private=False).ret in ("fixed", "spurious") and calls == [2]
    p = Prop(vm, 6)
    assert p.page_fault(0x3000, private=False).ret in ("fixed", "spurious") and calls == [2]
    Prop.flag = "pending"
    assert p.page_fault(0x4000, private=False).ret in ("fixed", "spurious") and calls == [2, 4]


def test_the_ledger_counts_the_guest_mode_ops_apart() -> None:
    """``Ledger.guest_ns`` (the timeline's share of guest code, docs/timeline.md "Interrupts and
    retries") adds exactly the ns charged to ``GUEST_MODE_OPS``, each of which the cost model
    prices, on any actor; every other charge leaves it alone."""
    from pkvm.kvm.vm import GUEST_MODE_OPS

    vm = pkvm.VM("snp")
    for op in GUEST_MODE_OPS:
        assert vm.costs.ns(op) > 0, op
    led = vm._ledger
    assert led.guest_ns == 0
    vm._charge("vmexit", 3)
    vm._charge("rmpupdate", 2)
    assert led.guest_ns == 0
    vm._charge("pvalidate_4k", 5)
    vm._charge("pvalidate_2m", 1)
    vm._set_actor("vcpu0")
    vm._charge("pvalidate_4k", 2)
    vm._charge("npf_fault", 1)
    want = 7 * vm._costs["pvalidate_4k"] + vm._costs["pvalidate_2m"]
    assert led.guest_ns == want
    assert vm._modeled_ns == want + 3 * vm._costs["vmexit"] + 2 * vm._costs["rmpupdate"] + vm._costs["npf_fault"]
