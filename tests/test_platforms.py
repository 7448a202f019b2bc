"""Platform op tables: registration checks and the ops' call sites (docs/design.md#layers)."""

import dataclasses

import pytest
from vmhelpers import PRIVATE, MiB, gmem_vm

import pkvm
from pkvm.kvm import ops as kvm_ops
from pkvm.platforms import PLATFORMS, PlatformOps, _return0, install_platforms, is_implemented, register_platform

OPTIONAL = ["init_vm", "gmem_prepare", "gmem_invalidate", "gmem_max_mapping_level", "update_mem_attr",
            "set_mem_attr", "handle_rmp_fault", "max_mapping_level", "set_external_spte", "remove_external_spte",
            "split_external_spte", "create_vcpu", "check_vm", "guest_flows", "vmm_flows"]


def test_registered_platforms():
    """DEFAULT, SW_PROTECTED, SNP and TDX are registered by VM type."""
    assert {t: p.name for t, p in PLATFORMS.items()} == {0: "default", 1: "sw_protected", 4: "snp", 5: "tdx"}
    assert not PLATFORMS[0].has_private_mem and PLATFORMS[1].has_private_mem and PLATFORMS[5].has_mirror_root


@pytest.mark.parametrize("op", OPTIONAL)
def test_optional_ops_default_to_return0(op):
    """Absent optional ops become the shared return-0 op, so call sites never test for None."""
    for platform in (PLATFORMS[0], PLATFORMS[1]):
        fn = getattr(platform, op)
        assert fn is _return0 and fn(1, 2, 3) == 0 and not is_implemented(fn)


def test_mandatory_op_missing_is_registration_error():
    """A table without fault_is_private fails at registration, not at first call."""
    ops = PlatformOps(name="broken", vm_type=9, has_private_mem=True, fault_is_private=None)
    with pytest.raises(pkvm.PlatformRegistrationError, match="mandatory op fault_is_private is missing"):
        register_platform(ops)


def test_non_callable_op_is_registration_error():
    """Ops must be callables."""
    ops = dataclasses.replace(PLATFORMS[1], gmem_prepare=42)
    with pytest.raises(pkvm.PlatformRegistrationError, match="op gmem_prepare is not callable"):
        register_platform(ops)
    with pytest.raises(pkvm.PlatformRegistrationError, match="expected a PlatformOps"):
        register_platform(object())
    assert issubclass(pkvm.PlatformRegistrationError, TypeError)


def test_registry_is_the_kvm_layers_table():
    """pkvm.platforms fills the KVM layer's registry (kvm_x86_ops pattern); both name one view."""
    assert PLATFORMS is kvm_ops.PLATFORMS
    with pytest.raises(TypeError, match="does not support item assignment"):
        PLATFORMS[7] = PLATFORMS[1]  # type: ignore[index]


def test_install_platforms_is_once_and_refusals_change_nothing():
    """A second install, two tables of one vm_type or a broken table are refused; nothing changes."""
    before = dict(PLATFORMS)
    with pytest.raises(pkvm.PlatformRegistrationError, match="installed already"):
        install_platforms([dataclasses.replace(PLATFORMS[1], vm_type=7)])
    with pytest.raises(pkvm.PlatformRegistrationError, match="'sw_protected' and 'sw_protected' share vm_type 1"):
        install_platforms([PLATFORMS[1], PLATFORMS[1]])
    with pytest.raises(pkvm.PlatformRegistrationError, match="expected a PlatformOps"):
        install_platforms([object()])
    assert dict(PLATFORMS) == before


def _with_ops(vm, **ops):
    vm._platform = register_platform(dataclasses.replace(vm.platform, **ops))  # test-only swap
    return vm


@pytest.mark.parametrize(("policy", "op"), [("eager-post", "update_mem_attr"), ("eager-locked", "set_mem_attr")])
def test_mem_attr_ops_run_per_slot_piece_under_their_policy(policy, op):
    """update_mem_attr (after the lock) / set_mem_attr (under it) run once per slot-clipped piece."""
    calls = []
    vm, gmem, _ = gmem_vm(2 * MiB, policy=pkvm.Policy().replace(rmp_update=policy))
    _with_ops(vm, **{op: lambda vm, slot, attrs, s, e: calls.append((slot.id, attrs, s, e)) or 0})
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)
    vm.set_memory_attributes(0, 8 * MiB, PRIVATE)  # short-circuit: no call
    assert calls == [(0, PRIVATE, 0, 512)]


def test_mem_attr_ops_do_not_run_under_fault_time():
    """The final design calls neither eager op."""
    calls = []
    vm, gmem, _ = gmem_vm(2 * MiB, policy="fault-time")
    op = lambda *a: calls.append(a) or 0  # noqa: E731
    _with_ops(vm, update_mem_attr=op, set_mem_attr=op)
    vm.set_memory_attributes(0, 2 * MiB, PRIVATE)
    assert calls == []


def test_failing_post_lock_op_is_surfaced():
    """A failing update_mem_attr is not just logged: it is counted and recorded as an event."""
    vm, gmem, _ = gmem_vm(2 * MiB, policy="eager-post")
    _with_ops(vm, update_mem_attr=lambda *a: -5)
    vm.set_memory_attributes(0, 4096, PRIVATE)
    assert vm.stats["mem_attr_op_failures"] == 1
    assert vm.events[0][0] == "update_mem_attr" and "gfns [0x0, 0x1)" in vm.events[0][1]
    assert vm.get_memory_attributes(0) == PRIVATE  # the ioctl itself succeeded


def test_gmem_max_mapping_level_caps_private_hugepages():
    """gmem_max_mapping_level caps a private mapping that the folio order would allow at 2M (§3.5)."""
    vm, gmem, vcpu = gmem_vm(4 * MiB, policy=pkvm.Policy().replace(gmem_max_order=9))
    _with_ops(vm, gmem_max_mapping_level=lambda vm, pfn, private: pkvm.PG_LEVEL_4K)
    vm.set_memory_attributes(0, 4 * MiB, PRIVATE)
    assert vcpu.page_fault(0, private=True).level == pkvm.PG_LEVEL_4K


def test_rmp_fault_hook_runs_after_a_positive_return():
    """handle_rmp_fault runs after the MMU returned > 0 (fixed/spurious/retry), not after exits (§4.2 10)."""
    seen = []
    vm, gmem, vcpu = gmem_vm()
    _with_ops(vm, handle_rmp_fault=lambda vcpu, gpa, private, write, r: seen.append((gpa, r.ret)) or 0)
    vcpu.page_fault(0x1000, private=False)
    vcpu.page_fault(0x2000, private=True)  # mismatch exit
    assert seen == [(0x1000, "fixed")]


def test_rmp_fault_hook_waits_for_the_rmp_bit_on_a_vcpu_that_tracks_it():
    """npf_interception calls sev_handle_rmp_fault only when the #NPF's error code has the RMP
    bit: an SNP vCPU records it as rmp_npf, and a positive return without it calls nothing."""
    seen = []
    vm = pkvm.VM("snp")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, 1 << 40, gmem, 0)
    vcpu = vm.create_vcpu()
    _with_ops(vm, handle_rmp_fault=lambda vcpu, gpa, private, write, r: seen.append((gpa, r.ret)) or 0)
    assert vcpu.page_fault(0x1000, private=False).ret == "fixed" and seen == []
    vcpu.rmp_npf = True
    r = vcpu.page_fault(0x400000 - 0x1000, private=False)
    assert r.ret in ("fixed", "spurious") and seen == [(0x3FF000, r.ret)]


@pytest.mark.parametrize("name", ["default", "snp", "tdx", "sw_protected"])
def test_access_decides_marks_exactly_the_ops_that_return_the_reported_bit(name):
    """The typed fault path reads the reported bit itself for an op marked access_decides, so
    a marked op must return it unchanged; SW_PROTECTED's also reads the attributes: unmarked."""
    op = next(p for p in PLATFORMS.values() if p.name == name).fault_is_private
    marked = getattr(op, "access_decides", False) is True
    assert marked == (name != "sw_protected")
    vm = pkvm.VM("sw_protected")
    gmem = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, 1 << 40, gmem, 0)
    vm.set_memory_attributes(0, 4096, PRIVATE)
    for gfn in (0, 1):
        for private in (False, True):
            got = op(vm, gfn, private)
            assert got == private if marked else got == (private or gfn == 0)


def test_init_vm_runs_at_creation():
    """init_vm is the last step of KVM_CREATE_VM."""
    seen = []
    ops = register_platform(dataclasses.replace(PLATFORMS[1], init_vm=lambda vm: seen.append(vm) or 0))
    assert is_implemented(ops.init_vm)
    ops.init_vm("vm")
    assert seen == ["vm"]
