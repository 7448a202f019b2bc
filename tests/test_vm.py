"""VM façade: construction, capabilities, and the validation rules of kernel-semantics.md §2.1, §2.2 and §2.9."""

import errno

import pytest
from vmhelpers import GMEM, PRIVATE, UADDR, MiB, gmem_vm, shared_vm, snapshot

import pkvm
from pkvm.constants import KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES

# -- KVM_CREATE_VM --------------------------------------------------------------------------


@pytest.mark.parametrize("vm_type", [0, 1, 5, "default", "sw_protected", "tdx", pkvm.KVM_X86_SW_PROTECTED_VM],
                         ids=["0", "1", "5", "name-default", "name-sw_protected", "name-tdx", "constant"])
def test_create_vm_supported_types(vm_type):
    """DEFAULT, SW_PROTECTED and TDX VMs can be created by number or name."""
    vm = pkvm.VM(vm_type)
    assert vm.vm_type in (0, 1, 4, 5)
    vm.check()


@pytest.mark.parametrize("vm_type", [2, 3, 6, 99, "sev"],
                         ids=["sev", "sev-es", "6", "99", "name-sev"])
def test_create_vm_unsupported_type_is_einval(vm_type):
    """KVM_CREATE_VM with a type the model does not offer fails with EINVAL and names the supported ones."""
    with pytest.raises(pkvm.KvmError, match=r"unsupported VM type .*supported types: 0 \(default\), 1 \(sw_protected\)") as exc:
        pkvm.VM(vm_type)
    assert exc.value.errno == errno.EINVAL
    assert isinstance(exc.value, OSError)


def test_create_vm_bad_arguments():
    """Programming errors in the constructor raise TypeError/ValueError naming the argument."""
    with pytest.raises(ValueError, match="unknown vm_type 'bogus'"):
        pkvm.VM("bogus")
    with pytest.raises(TypeError, match="vm_type must be an int or a name"):
        pkvm.VM(1.0)
    with pytest.raises(ValueError, match="shared_backing='2m'"):
        pkvm.VM(1, shared_backing="2m")
    with pytest.raises(ValueError, match="nr_vcpus=0"):
        pkvm.VM(1, nr_vcpus=0)
    with pytest.raises(ValueError, match="bogus_op"):
        pkvm.VM(1, costs={"bogus_op": 1})
    with pytest.raises(ValueError, match="unknown policy preset 'linux'"):
        pkvm.VM(1, policy="linux")


def test_costs_override_changes_modeled_time():
    """``costs`` overrides the default latency of a pkvm.cost.model operation, or is a whole CostModel."""
    vm = pkvm.VM(1, costs={"attr_store": 7})
    vm.set_memory_attributes(0, 4 * 4096, PRIVATE)
    assert vm.cost_breakdown() == {"attr_store": 28}
    assert vm.modeled_ns == 28
    model = pkvm.CostModel.default("sw_protected").with_overrides("attr_store=1us")
    vm = pkvm.VM(1, costs=model)
    vm.set_memory_attributes(0, 4096, PRIVATE)
    assert vm.costs is model and vm.modeled_ns == 1000


# -- KVM_CHECK_EXTENSION (§2.1) -------------------------------------------------------------


@pytest.mark.parametrize(("vm_type", "attrs", "gmem"), [(0, 0, 0), (1, PRIVATE, 1)], ids=["default", "sw_protected"])
def test_check_extension_memory_attributes_and_guest_memfd(vm_type, attrs, gmem):
    """KVM_CAP_MEMORY_ATTRIBUTES is PRIVATE iff the VM has private memory; likewise KVM_CAP_GUEST_MEMFD."""
    vm = pkvm.VM(vm_type)
    assert vm.check_extension(pkvm.KVM_CAP_MEMORY_ATTRIBUTES) == attrs
    assert vm.check_extension(pkvm.KVM_CAP_GUEST_MEMFD) == gmem
    assert vm.check_extension(KVM_CAP_USER_MEMORY2) == 1
    assert vm.check_extension(KVM_CAP_MEMORY_FAULT_INFO) == 1
    assert vm.check_extension(KVM_CAP_VM_TYPES) == 0b110011
    assert vm.check_extension(12345) == 0


# -- KVM_SET_MEMORY_ATTRIBUTES validation (§2.2) ---------------------------------------------

VALIDATION = [
    pytest.param(dict(flags=1), "flags 0x1 must be 0", id="rule2-flags-nonzero"),
    pytest.param(dict(attributes=1 << 4), "attributes 0x10 not supported", id="rule3-unknown-attribute-bit"),
    pytest.param(dict(size=0), "size 0x0 is empty", id="rule4-size-zero"),
    pytest.param(dict(address=(1 << 64) - 4096, size=8192), "wraps around 2\\*\\*64", id="rule5-wraps"),
    pytest.param(dict(address=(1 << 64) - 4096, size=4096), "wraps around 2\\*\\*64", id="rule5-ends-at-2**64"),
    pytest.param(dict(address=0x800), "is not 4 KiB aligned", id="rule6-unaligned-address"),
    pytest.param(dict(size=0x1800), "is not 4 KiB aligned", id="rule6-unaligned-size"),
    pytest.param(dict(flags=1, size=0, address=1), "flags 0x1", id="first-failing-check-wins-flags"),
    pytest.param(dict(attributes=3, size=0), "attributes 0x3", id="first-failing-check-wins-attributes"),
    pytest.param(dict(size=0, address=1), "size 0x0", id="first-failing-check-wins-size"),
]


@pytest.mark.parametrize(("kwargs", "match"), VALIDATION)
def test_set_memory_attributes_validation(kwargs, match):
    """Each §2.2 check fails with EINVAL in the kernel's order, and the failed call changes nothing."""
    vm, gmem, vcpu = gmem_vm()
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    before = snapshot(vm)
    args = dict(address=0x1000, size=0x1000, attributes=PRIVATE, flags=0) | kwargs
    with pytest.raises(pkvm.KvmError, match=match) as exc:
        vm.set_memory_attributes(**args)
    assert exc.value.errno == errno.EINVAL
    assert snapshot(vm) == before
    vm.check()


def test_set_memory_attributes_private_on_default_vm_is_einval():
    """A DEFAULT VM supports no attribute bits, so PRIVATE fails (§2.2 rule 3)."""
    vm = pkvm.VM(0)
    with pytest.raises(pkvm.KvmError, match="not supported by a default VM"):
        vm.set_memory_attributes(0, 4096, PRIVATE)


def test_set_memory_attributes_zero_on_default_vm_is_noop():
    """attributes=0 on a DEFAULT VM passes validation and is a no-op (§2.2 note)."""
    vm, vcpu = shared_vm(vm_type="default")
    vcpu.access(0, private=False, size=MiB)
    before = snapshot(vm)
    vm.set_memory_attributes(0, MiB, 0)
    assert snapshot(vm) == before


@pytest.mark.parametrize(("name", "value"), [("address", -1), ("size", 1 << 64), ("attributes", -8), ("flags", 1 << 64)])
def test_set_memory_attributes_non_u64_is_valueerror(name, value):
    """Arguments that do not fit the u64 ioctl fields are programming errors naming the argument."""
    vm = pkvm.VM(1)
    args = dict(address=0, size=4096, attributes=0, flags=0) | {name: value}
    with pytest.raises(ValueError, match=f"{name}=.* does not fit a u64"):
        vm.set_memory_attributes(**args)


def test_set_memory_attributes_wrong_type_is_typeerror():
    """A non-int argument raises TypeError naming it."""
    vm = pkvm.VM(1)
    with pytest.raises(TypeError, match="size must be an int, not float"):
        vm.set_memory_attributes(0, 4096.0, 0)


def test_set_memory_attributes_outside_memslots():
    """Attributes can be set on gfns without a memslot: no invalidation happens (§2.2 note, §2.4)."""
    vm = pkvm.VM(1)
    vm.set_memory_attributes(1 << 40, 1 << 30, PRIVATE)
    assert vm.get_memory_attributes((1 << 40 >> 12) + 5) == PRIVATE
    st = vm.stats
    assert st["mmu_invalidate_seq"] == 0 and st["attr_stores"] == 1 << 18
    assert vm.mmu_invalidate_range == (2**64 - 1, 2**64 - 1)
    vm.check()


# -- KVM_SET_USER_MEMORY_REGION2 validation (§2.9) -------------------------------------------


def _other_vm_gmem():
    return pkvm.VM(1).create_guest_memfd(4 * MiB)


SLOT_ERRORS = [
    pytest.param(dict(slot=32764), errno.EINVAL, "KVM_USER_MEM_SLOTS", id="slot-id-out-of-range"),
    pytest.param(dict(slot=1 << 16), errno.EINVAL, "address space 1 does not exist", id="private-vm-has-one-address-space"),
    pytest.param(dict(flags=GMEM | pkvm.KVM_MEM_READONLY), errno.EINVAL, "memslot flags 0x6 not valid", id="gmem-with-readonly"),
    pytest.param(dict(flags=GMEM | pkvm.KVM_MEM_LOG_DIRTY_PAGES), errno.EINVAL, "memslot flags 0x5 not valid", id="gmem-with-dirty-logging"),
    pytest.param(dict(flags=1 << 5), errno.EINVAL, "memslot flags 0x20 not valid", id="unknown-flag"),
    pytest.param(dict(memory_size=4 * MiB + 1), errno.EINVAL, "memory_size .* not 4 KiB aligned", id="unaligned-size"),
    pytest.param(dict(guest_phys_addr=0x800), errno.EINVAL, "guest_phys_addr 0x800", id="unaligned-gpa"),
    pytest.param(dict(userspace_addr=0x10), errno.EINVAL, "userspace_addr", id="unaligned-hva"),
    pytest.param(dict(userspace_addr=1 << 47), errno.EINVAL, "not user memory", id="hva-beyond-task-size"),
    pytest.param(dict(guest_memfd_offset=0x800), errno.EINVAL, "guest_memfd_offset 0x800", id="unaligned-gmem-offset"),
    pytest.param(dict(guest_phys_addr=(1 << 64) - 4096), errno.EINVAL, "wraps around", id="gpa-wraps"),
    pytest.param(dict(memory_size=1 << 43), errno.EINVAL, "KVM_MEM_MAX_NR_PAGES", id="too-large"),
    pytest.param(dict(guest_memfd=None), errno.EINVAL, "needs a guest_memfd", id="gmem-flag-without-file"),
    pytest.param(dict(guest_memfd=_other_vm_gmem), errno.EINVAL, "belongs to another VM", id="gmem-of-another-vm"),
    pytest.param(dict(guest_memfd_offset=4096), errno.EINVAL, "runs past its size", id="binding-past-file-size"),
]


@pytest.mark.parametrize(("kwargs", "err", "match"), SLOT_ERRORS)
def test_set_user_memory_region2_validation(kwargs, err, match):
    """Each memslot rule of §2.9 fails with the kernel's errno and changes nothing."""
    vm = pkvm.VM(1)
    gmem = vm.create_guest_memfd(4 * MiB)
    args = dict(slot=0, flags=GMEM, guest_phys_addr=0, memory_size=4 * MiB, userspace_addr=UADDR,
                guest_memfd=gmem, guest_memfd_offset=0) | kwargs
    if callable(args["guest_memfd"]):
        args["guest_memfd"] = args["guest_memfd"]()
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match=match) as exc:
        vm.set_user_memory_region2(**args)
    assert exc.value.errno == err
    assert snapshot(vm) == before


def test_memslot_limits_are_inclusive():
    """The two size limits of kvm_set_memory_region (virt/kvm/kvm_main.c, §2.9) refuse only what
    goes *past* them: ``access_ok(userspace_addr, memory_size)`` accepts a range that ends
    exactly at TASK_SIZE_MAX, and ``memory_size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES`` accepts
    a slot of exactly KVM_MEM_MAX_NR_PAGES pages (one page more is EINVAL)."""
    from pkvm.constants import KVM_MEM_MAX_NR_PAGES, TASK_SIZE_MAX
    vm = pkvm.VM(0)
    vm.set_user_memory_region2(0, 0, 0, 2 * MiB, TASK_SIZE_MAX - 2 * MiB)
    assert vm.memslot(0).userspace_addr + 2 * MiB == TASK_SIZE_MAX
    with pytest.raises(pkvm.KvmError, match="not user memory") as exc:
        vm.set_user_memory_region2(1, 0, 4 * MiB, 2 * MiB, TASK_SIZE_MAX - 2 * MiB + 0x1000)
    assert exc.value.errno == errno.EINVAL
    big = KVM_MEM_MAX_NR_PAGES << 12
    vm.set_user_memory_region2(2, 0, 1 << 40, big, UADDR)
    assert vm.memslot(2).npages == KVM_MEM_MAX_NR_PAGES
    with pytest.raises(pkvm.KvmError, match="KVM_MEM_MAX_NR_PAGES") as exc:
        vm.set_user_memory_region2(3, 0, 1 << 44, big + 0x1000, UADDR)
    assert exc.value.errno == errno.EINVAL
    vm.check()


def test_gpa_overlap_is_eexist():
    """A new slot whose gpa range overlaps another slot fails with EEXIST."""
    vm, _ = shared_vm(4 * MiB)
    with pytest.raises(pkvm.KvmError, match="overlap slot 0x0") as exc:
        vm.set_user_memory_region2(1, 0, 2 * MiB, 4 * MiB, UADDR)
    assert exc.value.errno == errno.EEXIST


def test_overlapping_gmem_bindings_are_einval():
    """Two slots binding overlapping ranges of one guest_memfd fail with EINVAL."""
    vm, gmem, _ = gmem_vm(2 * MiB, gmem_size=4 * MiB)
    with pytest.raises(pkvm.KvmError, match="already bound") as exc:
        vm.set_user_memory_region2(1, GMEM, 8 * MiB, 2 * MiB, UADDR, gmem, MiB)
    assert exc.value.errno == errno.EINVAL
    vm.set_user_memory_region2(1, GMEM, 8 * MiB, 2 * MiB, UADDR, gmem, 2 * MiB)  # the free half is fine
    vm.check()


@pytest.mark.parametrize("change", ["move", "flags", "same", "drop-gmem-flag"])
def test_gmem_slot_is_immutable(change):
    """A guest_memfd slot cannot be moved or re-flagged, even to identical values: delete it instead."""
    vm, gmem, _ = gmem_vm(2 * MiB)
    args = dict(slot=0, flags=GMEM, guest_phys_addr=0, memory_size=2 * MiB, userspace_addr=UADDR,
                guest_memfd=gmem)
    args |= {"move": dict(guest_phys_addr=4 * MiB), "flags": dict(flags=GMEM | 1), "same": {},
             "drop-gmem-flag": dict(flags=0)}[change]
    with pytest.raises(pkvm.KvmError, match="immutable|not valid") as exc:
        vm.set_user_memory_region2(**args)
    assert exc.value.errno == errno.EINVAL


def test_gmem_slot_on_default_vm_is_einval():
    """A DEFAULT VM has no private memory, so KVM_MEM_GUEST_MEMFD is an invalid flag."""
    vm = pkvm.VM(0)
    gmem = vm.create_guest_memfd(MiB)
    with pytest.raises(pkvm.KvmError, match="not valid for a default VM"):
        vm.set_user_memory_region2(0, GMEM, 0, MiB, UADDR, gmem)


def test_default_vm_has_smm_address_space():
    """A DEFAULT VM has two address spaces: slot ``1 << 16`` lives in the second one."""
    vm = pkvm.VM(0)
    vm.set_user_memory_region2(0, 0, 0, MiB, UADDR)
    vm.set_user_memory_region2(1 << 16, 0, 0, MiB, UADDR)
    assert vm.memslot(1 << 16).as_id == 1
    vm.check()


def test_delete_missing_slot_is_einval():
    """memory_size=0 on a slot that does not exist fails with EINVAL."""
    vm = pkvm.VM(1)
    with pytest.raises(pkvm.KvmError, match="does not exist, cannot delete") as exc:
        vm.set_user_memory_region2(3, 0, 0, 0)
    assert exc.value.errno == errno.EINVAL


def test_modify_slot_rules():
    """Only the base gfn (move) or dirty logging (flags) of a normal slot may change; identical is a no-op."""
    vm, _ = shared_vm(2 * MiB)
    with pytest.raises(pkvm.KvmError, match="only the base address or dirty logging"):
        vm.set_user_memory_region2(0, 0, 0, 4 * MiB, UADDR)
    with pytest.raises(pkvm.KvmError, match="only the base address or dirty logging"):
        vm.set_user_memory_region2(0, pkvm.KVM_MEM_READONLY, 0, 2 * MiB, UADDR)
    vm.set_user_memory_region2(0, 0, 0, 2 * MiB, UADDR)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, UADDR)
    assert vm.memslot(0).flags == pkvm.KVM_MEM_LOG_DIRTY_PAGES
    vm.set_user_memory_region2(0, 0, 8 * MiB, 2 * MiB, UADDR)
    assert vm.memslot(0).base_gfn == 8 * MiB >> 12
    vm.check()


def test_closed_gmem_is_ebadf_when_binding():
    """Binding a closed guest_memfd fails like a closed fd: EBADF."""
    vm = pkvm.VM(1)
    gmem = vm.create_guest_memfd(MiB)
    gmem.close()
    with pytest.raises(pkvm.KvmError, match="is closed") as exc:
        vm.set_user_memory_region2(0, GMEM, 0, MiB, UADDR, gmem)
    assert exc.value.errno == errno.EBADF


def test_delete_slot_zaps_and_flushes():
    """Deleting a slot zaps its mappings and flushes; attributes survive the slot (§1, §4.7)."""
    vm, gmem, vcpu = gmem_vm(2 * MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    vm.set_user_memory_region2(0, GMEM, 0, 0)
    st = vm.stats
    assert st["pages_4k"] == 0 and st["zapped_sptes"] == 256 and st["remote_tlb_flush"] == 1
    assert vm.get_memory_attributes(0) == PRIVATE
    r = vcpu.page_fault(0, private=True)
    assert (r.ret, r.errno, r.exit_reason) == ("exit", errno.EFAULT, pkvm.KVM_EXIT_MEMORY_FAULT)
    vm.check()


def test_create_vcpu_ids():
    """vCPUs get consecutive ids."""
    vm = pkvm.VM(1)
    assert [vm.create_vcpu().id for _ in range(3)] == [0, 1, 2]
    assert len(vm.vcpus) == 3


def test_create_vcpu_limit_is_kvm_max_vcpus():
    """kvm_vm_ioctl_create_vcpu (virt/kvm/kvm_main.c) refuses a vCPU once ``created_vcpus >=
    max_vcpus`` (KVM_MAX_VCPUS on x86): the KVM_MAX_VCPUS-th vCPU is created, one more is EINVAL."""
    from pkvm.constants import KVM_MAX_VCPUS
    vm = pkvm.VM(0)
    for _ in range(KVM_MAX_VCPUS):
        vm.create_vcpu()
    assert vm.vcpus[-1].id == KVM_MAX_VCPUS - 1
    with pytest.raises(pkvm.KvmError, match="at most") as exc:
        vm.create_vcpu()
    assert exc.value.errno == errno.EINVAL and len(vm.vcpus) == KVM_MAX_VCPUS


def test_stats_names_include_kvm_counters():
    """vm.stats carries KVM's counter names plus pkvm's own."""
    names = set(pkvm.VM(1).stats)
    assert {"pf_taken", "pf_fixed", "pf_spurious", "remote_tlb_flush", "remote_tlb_flush_requests", "pages_4k",
            "pages_2m", "pages_1g", "mmu_invalidate_seq", "memory_fault_exits", "attr_stores", "zapped_sptes"} <= names


def test_check_detects_corruption():
    """vm.check() raises InternalInvariantError naming a broken invariant (§3.4)."""
    vm, gmem, vcpu = gmem_vm(4 * MiB)
    vm.set_memory_attributes(0, 4096, PRIVATE)
    vm.check()
    vm.memslot(0).lpage.set_mixed(0, pkvm.PG_LEVEL_2M, False)
    with pytest.raises(pkvm.InternalInvariantError, match="mixed attributes but no MIXED flag|mixed but not MIXED"):
        vm.check()


@pytest.mark.parametrize("module", ["pkvm.kvm.vm", "pkvm.host.hostmem", "pkvm.kvm.policy", "pkvm.errors"])
def test_docstring_examples(module):
    """The doctests in the KVM model's docstrings pass."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_check_detects_wrong_disallow_count():
    """vm.check() compares every disallow_lpage count with what slot creation set (§3.1)."""
    vm, gmem, vcpu = gmem_vm(4 * MiB, base=4096, uaddr=UADDR + 4096)
    vm.check()
    vm.memslot(0).lpage.maps[pkvm.PG_LEVEL_2M].assign(1, 2, 1)
    with pytest.raises(pkvm.InternalInvariantError, match="level-2 disallow counts"):
        vm.check()


@pytest.mark.parametrize(("vm_type", "policy", "zaps_all"), [
    ("default", "6.19", True),        # the KVM_X86_QUIRK_SLOT_ZAP_ALL quirk, on by default
    ("default", "6.8", True),
    ("sw_protected", "6.8", True),    # before 6.12: kvm_mmu_zap_all_fast for every VM type
    ("sw_protected", "6.11", True),
    ("sw_protected", "6.16", False),  # 6.12+: only the slot's mappings
    ("sw_protected", "6.19", False),
    ("snp", "6.19", False),
])
def test_deleting_a_memslot_zaps_what_the_kernel_zaps(vm_type, policy, zaps_all):
    """``kvm_arch_flush_shadow_memslot`` (arch/x86/kvm/mmu/mmu.c): before 6.12 it zapped every
    mapping of the VM (``kvm_mmu_zap_all_fast``); from 6.12 only the slot's, except on a
    DEFAULT VM while the SLOT_ZAP_ALL quirk is on (``kvm_memslot_flush_zap_all``). pkvm zapped
    the slot's gfns on every VM and version, and nothing for an SMM slot (a mutation audit
    found it: docs/kernel-semantics.md §4.7)."""
    vm = pkvm.VM(vm_type, policy=policy)
    vm.set_user_memory_region2(0, 0, 0, 2 * MiB, UADDR)
    vm.set_user_memory_region2(1, 0, 4 * MiB, 2 * MiB, UADDR + 4 * MiB)
    v = vm.create_vcpu()
    v.page_fault(0, private=False)
    v.page_fault(4 * MiB, private=False)
    flushes = vm.stats["remote_tlb_flush"]
    vm.set_user_memory_region2(1, 0, 4 * MiB, 0)  # delete slot 1
    assert vm.mmu.lookup(4 << 8) is None
    assert (vm.mmu.lookup(0) is None) == zaps_all
    assert vm.stats["remote_tlb_flush"] == flushes + 1
    vm.check()


def test_deleting_an_smm_memslot_of_a_default_vm_zaps_everything():
    """An SMM memslot (address space 1) has no mappings of its own in pkvm, but its deletion
    runs the same zap of everything on a DEFAULT VM (pkvm zapped nothing)."""
    vm = pkvm.VM("default", policy="6.19")
    vm.set_user_memory_region2(0, 0, 0, 2 * MiB, UADDR)
    vm.set_user_memory_region2(1 << 16, 0, 0, 2 * MiB, UADDR + 8 * MiB)
    v = vm.create_vcpu()
    v.page_fault(0, private=False)
    vm.set_user_memory_region2(1 << 16, 0, 0, 0)
    assert vm.mmu.lookup(0) is None
    vm.check()
