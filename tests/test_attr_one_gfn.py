"""The attribute ioctl's one-gfn fast path (pkvm/_attr.pxi, ``AttrPath._quiet`` with the words
``checked`` read: the 4K leaf zapped with the SPTE read, POST writing the 2M / 1G lpage words PRE
read without reading them again) against the step-by-step path, and ``VM.set_memory_attributes``
as the AttrPath's C entry (``AttrIoctlMethod``)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmhelpers import GMEM, UADDR, snapshot

import pkvm
from pkvm._core import AttrIoctlMethod

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
GiB = 1 << 30


def _vm(platform: str, policy: str) -> pkvm.VM:
    vm = pkvm.VM(platform, policy=policy)
    gmem = vm.create_guest_memfd(4 * GiB)
    # a slot of two whole 1G chunks, then one whose base and end cut a 2M and a 1G chunk
    vm.set_user_memory_region2(0, GMEM, 0, 2 * GiB, UADDR, gmem, 0)
    vm.set_user_memory_region2(1, GMEM, 2 * GiB + 0x203000, GiB, UADDR + 2 * GiB + 0x203000, gmem, 2 * GiB)
    vm.create_vcpu()
    return vm


# gfns clustered on a few 2M chunks of a few 1G chunks (both slots, their edges and the hole
# below the second one), so that chunks turn MIXED and uniform again
_GFN = st.builds(lambda g1, g2, off: (g1 << 18) + (g2 << 9) + off,
                 st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 1, 2, 511]),
                 st.sampled_from([0, 1, 3, 4, 255, 510, 511]))
_OPS = st.lists(st.tuples(_GFN, st.booleans(), st.booleans()), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(platform_policy=st.sampled_from([("sw_protected", "6.16"), ("sw_protected", "6.8"), ("snp", "fault-time")]),
       ops=_OPS)
def test_one_gfn_calls_are_the_step_by_step_path(platform_policy: tuple, ops: list) -> None:
    """One-gfn calls on a quiet VM (the fast path) leave every map, counter, clock and lock
    total exactly as on a VM with a subscriber (no fast path: each step reads its own words)."""
    a, b = _vm(*platform_policy), _vm(*platform_policy)
    b.subscribe(lambda ev: None)
    for gfn, private, fault in ops:
        gpa = gfn << 12
        attrs = PRIVATE if private else 0
        a.set_memory_attributes(gpa, 0x1000, attrs)
        b.set_memory_attributes(gpa, 0x1000, attrs)
        if fault:
            ra = _fault(a, gpa, private)
            rb = _fault(b, gpa, private)
            assert ra == rb
        assert snapshot(a) == snapshot(b)
        assert (a.mmu_lock_ns, a.attr_ioctls) == (b.mmu_lock_ns, b.attr_ioctls)
    a.check()


def _fault(vm: pkvm.VM, gpa: int, private: bool) -> object:
    try:
        return vm.vcpus[0].page_fault(gpa, private=private)
    except pkvm.KvmError as e:
        return e.errno, str(e)


def test_set_memory_attributes_is_the_paths_c_entry_on_a_vm() -> None:
    """On a VM the method is its AttrPath's ``ioctl`` (keywords and the default ``flags``
    accepted, refusals as documented); on the class it is the documented Python method."""
    vm = pkvm.VM("sw_protected")
    assert isinstance(pkvm.VM.__dict__["set_memory_attributes"], AttrIoctlMethod)
    assert pkvm.VM.set_memory_attributes.__doc__.startswith("``KVM_SET_MEMORY_ATTRIBUTES``")
    m = vm.set_memory_attributes
    assert m.__self__ is vm._attr_path and m.__name__ == "ioctl"
    vm.set_memory_attributes(address=0x200000, size=0x1000, attributes=PRIVATE)
    assert vm.get_memory_attributes(0x200) == PRIVATE
    pkvm.VM.set_memory_attributes(vm, 0x200000, 0x1000, 0)  # the class's function: same ioctl
    assert vm.get_memory_attributes(0x200) == 0 and vm.attr_ioctls == 2
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="flags 0x1 must be 0") as e:
        vm.set_memory_attributes(0x200000, 0x1000, PRIVATE, 1)
    assert e.value.errno == errno.EINVAL and snapshot(vm) == before
    with pytest.raises(pkvm.KvmError, match="is not 4 KiB aligned"):
        vm.set_memory_attributes(0x200001, 0x1000, PRIVATE)
    with pytest.raises(TypeError, match="address"):
        vm.set_memory_attributes("0x200000", 0x1000, PRIVATE)
    assert snapshot(vm) == before and vm.attr_ioctls == 2


def test_the_descriptor_falls_back_to_the_method_without_a_path() -> None:
    """Read on an object that has no AttrPath of its own (a VM still being built), the
    descriptor binds the Python method; it refuses a non-callable."""

    class Half:
        pass

    h = Half()
    m = AttrIoctlMethod(pkvm.VM.set_memory_attributes).__get__(h, Half)
    assert m.__func__ is pkvm.VM.set_memory_attributes and m.__self__ is h
    other = pkvm.VM("sw_protected")
    h._attr_path = other._attr_path  # another VM's path: not this object's
    assert AttrIoctlMethod(pkvm.VM.set_memory_attributes).__get__(h, Half).__self__ is h
    with pytest.raises(TypeError, match="needs a function, not int"):
        AttrIoctlMethod(3)


def test_attr_ioctls_and_the_unfinished_op_live_in_the_path() -> None:
    """``VM.attr_ioctls`` and ``VM._attr_op`` are the AttrPath's typed fields: the count goes
    up per validated call, takes an int count and refuses anything else unchanged; an
    unfinished phase-by-phase ioctl makes the next one EDEADLK until it finishes."""
    vm = pkvm.VM("sw_protected")
    assert vm.attr_ioctls == 0 and vm._attr_op is None
    vm.set_memory_attributes(0x200000, 0x1000, PRIVATE)
    vm.set_memory_attributes(0x200000, 0x1000, PRIVATE)  # short-circuited: counted too
    assert vm.attr_ioctls == 2 and type(vm.attr_ioctls) is int
    vm.attr_ioctls = 40
    assert vm.attr_ioctls == 40
    with pytest.raises(TypeError, match="attr_ioctls must be an int, not float"):
        vm.attr_ioctls = 1.0
    with pytest.raises(ValueError, match=r"attr_ioctls must be a count in \[0, 2\*\*63\), not -1"):
        vm.attr_ioctls = -1
    with pytest.raises(ValueError, match="not 9223372036854775808"):
        vm.attr_ioctls = 1 << 63
    assert vm.attr_ioctls == 40
    op = vm.begin_set_memory_attributes(0x400000, 0x1000, PRIVATE)
    assert vm._attr_op is op and vm.attr_ioctls == 41
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="unfinished") as e:
        vm.set_memory_attributes(0x600000, 0x1000, PRIVATE)
    assert e.value.errno == errno.EDEADLK and snapshot(vm) == before and vm.attr_ioctls == 41
    op.finish()
    assert vm._attr_op is None
    vm.set_memory_attributes(0x600000, 0x1000, PRIVATE)
    assert vm.attr_ioctls == 42 and vm.get_memory_attributes(0x600) == PRIVATE


def test_mmu_lock_ns_lives_in_the_path_with_python_arithmetic() -> None:
    """``VM.mmu_lock_ns`` is the AttrPath's typed total: the PRE zap and flush add to it as
    Python ints would (past int64 and as a float too), and it refuses a non-number unchanged."""
    vm = pkvm.VM("sw_protected")
    gmem = vm.create_guest_memfd(4 << 20)
    vm.set_user_memory_region2(0, GMEM, 0, 4 << 20, UADDR, gmem, 0)
    vcpu = vm.create_vcpu()

    def convert_faulted(gpa: int) -> int:
        """mmu_lock_ns added by converting a faulted shared page to private."""
        vcpu.page_fault(gpa, private=False)
        before = vm.mmu_lock_ns
        vm.set_memory_attributes(gpa, 0x1000, PRIVATE)
        return vm.mmu_lock_ns - before

    step = convert_faulted(0x1000)
    assert step > 0 and type(vm.mmu_lock_ns) is int
    vm.mmu_lock_ns = (1 << 63) - 1  # the next add leaves int64: a Python int, exact
    convert_faulted(0x201000)
    assert vm.mmu_lock_ns == (1 << 63) - 1 + step and type(vm.mmu_lock_ns) is int
    vm.mmu_lock_ns = 5  # back inside int64
    vm.mmu_lock_ns = 0.5
    convert_faulted(0x3000)
    assert vm.mmu_lock_ns == 0.5 + step and type(vm.mmu_lock_ns) is float
    with pytest.raises(TypeError, match="mmu_lock_ns must be an int or a float, not str"):
        vm.mmu_lock_ns = "1"
    with pytest.raises(TypeError, match="not bool"):
        vm.mmu_lock_ns = True
    assert vm.mmu_lock_ns == 0.5 + step


@pytest.mark.parametrize(("fill", "last"), [
    ((0x200, 0x3FF), 0x3FF),  # the gfn's old run starts at it and runs past the chunk's end
    ((0x201, 0x400), 0x200),  # the gfn's old run ends at it and starts before the chunk
    ((0x200, 0x300), 0x300),  # the old run covers more gfns of the chunk: it stays MIXED
])
def test_one_gfn_call_that_completes_or_not_a_2m_chunk(fill: tuple, last: int) -> None:
    """A one-gfn call whose old attribute run reaches past its 2M chunk on one side only: the
    chunk turns uniform (MIXED cleared) exactly when every other gfn of it has the new value."""
    a, b = _vm("sw_protected", "6.16"), _vm("sw_protected", "6.16")
    b.subscribe(lambda ev: None)
    for vm in (a, b):
        vm.set_memory_attributes(fill[0] << 12, (fill[1] - fill[0]) << 12, PRIVATE)
        vm.set_memory_attributes(last << 12, 0x1000, PRIVATE)
    assert snapshot(a) == snapshot(b)
    mixed = a.memslots[0].lpage.maps[2].get(1) & pkvm.kvm.mmu.KVM_LPAGE_MIXED_FLAG
    assert bool(mixed) == (fill[1] - fill[0] != 511)


def test_a_memslot_deleted_and_made_again_is_the_one_the_ioctl_updates() -> None:
    """The path keeps the memslot it read last only while it is valid: after the slot is
    deleted and created again under the same id (a new memslot, new lpage maps), a one-gfn
    call marks the new memslot's 2M chunk MIXED, not the old one's."""
    vm = pkvm.VM("sw_protected")
    gmem = vm.create_guest_memfd(4 << 20)
    vm.set_user_memory_region2(0, GMEM, 0, 4 << 20, UADDR, gmem, 0)
    vm.set_memory_attributes(0x1000, 0x1000, PRIVATE)  # the path now holds memslot 0
    old = vm.memslots[0]
    assert old.lpage.maps[2].get(0) & pkvm.kvm.mmu.KVM_LPAGE_MIXED_FLAG
    vm.set_user_memory_region2(0, GMEM, 0, 0, UADDR, gmem, 0)  # delete
    vm.set_user_memory_region2(0, GMEM, 0, 4 << 20, UADDR, gmem, 0)  # the same id again
    new = vm.memslots[0]
    assert new is not old and old.invalid
    vm.set_memory_attributes(0x201000, 0x1000, PRIVATE)
    assert new.lpage.maps[2].get(1) & pkvm.kvm.mmu.KVM_LPAGE_MIXED_FLAG
    assert not old.lpage.maps[2].get(1) & pkvm.kvm.mmu.KVM_LPAGE_MIXED_FLAG
    vm.check()


def test_the_bound_fast_entry_takes_every_form_of_call() -> None:
    """``vm.set_memory_attributes`` is built once per VM; three or four positional arguments
    go straight to the checks, keywords and wrong counts through the generated method, with
    the same refusals and nothing changed by a refused call."""
    vm = pkvm.VM("sw_protected")
    assert vm.set_memory_attributes is vm.set_memory_attributes
    vm.set_memory_attributes(0x200000, 0x1000, PRIVATE, 0)
    vm.set_memory_attributes(0x201000, 0x1000, attributes=PRIVATE, flags=0)
    assert vm.get_memory_attributes(0x200) == vm.get_memory_attributes(0x201) == PRIVATE
    assert vm.attr_ioctls == 2
    before = snapshot(vm)
    with pytest.raises(TypeError, match=r"at least 3 positional arguments \(2 given\)"):
        vm.set_memory_attributes(0x200000, 0x1000)
    with pytest.raises(TypeError, match=r"at most 4 positional arguments \(5 given\)"):
        vm.set_memory_attributes(0x200000, 0x1000, 0, 0, 0)
    with pytest.raises(pkvm.KvmError, match="flags 0x2 must be 0"):
        vm.set_memory_attributes(0x200000, 0x1000, 0, 2)
    assert snapshot(vm) == before and vm.attr_ioctls == 2
