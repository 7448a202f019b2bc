"""KVM_SET_MEMORY_ATTRIBUTES in its kernel phases (VM.begin_set_memory_attributes, AttrIoctl)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
M = 1 << 20


def _vm(platform: str, policy: str | pkvm.Policy) -> tuple[pkvm.VM, pkvm.Vcpu]:
    vm = pkvm.VM(platform, policy=policy)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 8 * M, mark_private=False)
    return vm, vm.create_vcpu()


def _state(vm: pkvm.VM) -> tuple:
    attrs = tuple(vm._attrs.ranges(0, 1 << 40))
    sptes = tuple(vm.mmu.sptes.ranges(0, 1 << 40))
    return dict(vm.stats), vm.modeled_ns, vm.mmu_lock_ns, vm.attr_ioctls, attrs, sptes, tuple(vm.events)


_OPS = st.lists(st.tuples(st.integers(0, 2047), st.integers(1, 700), st.booleans(), st.integers(0, 2047),
                          st.booleans()), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(platform_policy=st.sampled_from([
    ("sw_protected", "6.8"), ("sw_protected", "6.11"), ("sw_protected", "6.16"), ("sw_protected", "6.19"),
    ("sw_protected", pkvm.Policy.preset("6.19").replace(attr_ioctl="legacy-progress")),
    ("snp", "fault-time"), ("snp", "eager-post"), ("snp", "eager-locked"), ("snp", "eager-split"),
    ("snp", pkvm.Policy.preset("eager-post").replace(attr_ioctl="legacy-progress"))]), ops=_OPS)
def test_phases_do_what_the_one_call_ioctl_does(platform_policy: tuple, ops: list) -> None:
    """The same conversions and faults, once through the ioctl and once phase by phase: the same
    attributes, mappings, counters, modeled time and logged events."""
    platform, policy = platform_policy
    a, va = _vm(platform, policy)
    b, vb = _vm(platform, policy)
    for start, n, private, fault_gfn, fault_private in ops:
        n = min(n, 2048 - start)
        attrs = PRIVATE if private else 0
        a.set_memory_attributes(start << 12, n << 12, attrs)
        op = b.begin_set_memory_attributes(start << 12, n << 12, attrs)
        assert op.finish() == "end" and op.done
        ra = va.page_fault(fault_gfn << 12, private=fault_private)
        rb = vb.page_fault(fault_gfn << 12, private=fault_private)
        assert ra == rb
        assert _state(a) == _state(b)
    b.check()


def test_a_fault_between_phases_retries_while_the_invalidation_covers_it() -> None:
    vm, v = _vm("sw_protected", "6.19")
    op = vm.begin_set_memory_attributes(0x400000, 0x200000, PRIVATE)
    assert v.page_fault(0x400000, private=False).ret == "fixed"   # before PRE: a shared mapping
    assert op.step() == "pre"                                      # zapped; invalidation begun
    assert v.page_fault(0x400000, private=False).ret == "retry"
    assert op.step() == "commit"
    assert vm.get_memory_attributes(0x400) == PRIVATE
    before = vm.stats["pf_retry"]
    assert v.page_fault(0x401000, private=True).ret == "retry"     # private now, still invalidating
    assert vm.stats["pf_retry"] == before + 1
    assert v.page_fault(0x700000, private=False).ret == "fixed"    # outside the range: no retry
    assert op.step() == "post"
    assert v.page_fault(0x401000, private=True).ret == "fixed"
    assert op.step() == "end" and op.done
    r = v.access(0x400000, private=True, size=0x200000)
    assert r.ret == "done"
    vm.check()


@pytest.mark.parametrize("policy,guarded", [("6.11", False), ("6.16", True), ("6.19", True)])
def test_the_6_16_head_chunk_guard(policy: str, guarded: bool) -> None:
    """Converting one 4K page of a 2M chunk: a shared fault elsewhere in that chunk, placed after
    the store but before POST marks the chunk MIXED, would map the whole chunk with one 2M shared
    leaf. 6.16 adds the partially covered head/tail chunks to the invalidation range
    (``kvm_arch_pre_set_memory_attributes``), so the fault retries; 6.11 maps it, leaving a
    shared leaf over the now-private page (``vm.check()`` reports it)."""
    vm, v = _vm("sw_protected", policy)
    op = vm.begin_set_memory_attributes(0x201000, 0x1000, PRIVATE)
    op.run_to("commit")
    r = v.page_fault(0x300000, private=False)
    op.finish()
    if guarded:
        assert r.ret == "retry"
        assert vm.mmu.lookup(0x201) is None
        vm.check()
    else:
        assert r.ret == "fixed" and r.level == pkvm.PG_LEVEL_2M
        leaf = vm.mmu.lookup(0x201)
        assert leaf is not None and leaf.level == pkvm.PG_LEVEL_2M and not leaf.private
        assert vm.get_memory_attributes(0x201) == PRIVATE
        with pytest.raises(pkvm.InternalInvariantError, match="shared SPTE on gfn 0x201"):
            vm.check()


def test_slots_lock_is_held_until_the_ioctl_ends() -> None:
    vm, _v = _vm("sw_protected", "6.19")
    op = vm.begin_set_memory_attributes(0, 0x10000, PRIVATE)
    op.step()
    snap = _state(vm)
    with pytest.raises(pkvm.KvmError, match="unfinished KVM_SET_MEMORY_ATTRIBUTES holds slots_lock") as e:
        vm.set_memory_attributes(0x20000, 0x1000, PRIVATE)
    assert e.value.errno == errno.EDEADLK
    with pytest.raises(pkvm.KvmError, match="holds slots_lock"):
        vm.begin_set_memory_attributes(0x20000, 0x1000, PRIVATE)
    with pytest.raises(pkvm.KvmError, match="holds slots_lock"):
        vm.set_user_memory_region2(1, 0, 1 << 32, 2 * M, userspace_addr=1 << 40)
    assert _state(vm) == snap
    op.finish()
    vm.set_memory_attributes(0x20000, 0x1000, PRIVATE)  # free again


def test_a_no_op_ioctl_is_done_at_once_and_counted() -> None:
    vm, _v = _vm("sw_protected", "6.19")
    seq = vm.stats["mmu_invalidate_seq"]
    op = vm.begin_set_memory_attributes(0, 0x1000, 0)  # already shared
    assert op.noop and op.done and op.next is None
    assert vm.attr_ioctls == 1 and vm.stats["mmu_invalidate_seq"] == seq
    vm.set_memory_attributes(0, 0x1000, PRIVATE)  # nothing holds slots_lock


def test_bad_phase_requests() -> None:
    vm, _v = _vm("sw_protected", "6.19")
    op = vm.begin_set_memory_attributes(0, 0x1000, PRIVATE)
    with pytest.raises(ValueError, match="phase 'zap' is not one of begin, pre, commit, post, end"):
        op.run_to("zap")
    op.run_to("commit")
    with pytest.raises(ValueError, match="phase 'pre' has already run"):
        op.run_to("pre")
    op.finish()
    with pytest.raises(ValueError, match="has finished: no phase after 'end'"):
        op.step()
    with pytest.raises(pkvm.KvmError, match="is not 4 KiB aligned"):
        vm.begin_set_memory_attributes(1, 0x1000, PRIVATE)
    assert vm._attr_op is None
