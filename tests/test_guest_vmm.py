"""The actors: pkvm.Vmm answering exits as QEMU does (§7.4), pkvm.Guest running Linux's flows (§7.5),
the KVM_HC_MAP_GPA_RANGE hypercall (§7.3), and §7.8's end-to-end sequences."""

import errno

import pytest
from tdxhelpers import PRIVATE, SHARED47, MiB, ops, td, trace

import pkvm
from pkvm.constants import KVM_EINVAL, KVM_ENOSYS

ENC, DEC = pkvm.KVM_MAP_GPA_RANGE_ENCRYPTED, pkvm.KVM_MAP_GPA_RANGE_DECRYPTED
U64 = (1 << 64) - 1


def _sw(size=8 * MiB, shared_backing="thp"):
    vm = pkvm.VM("sw_protected", shared_backing=shared_backing)
    vmm = pkvm.Vmm(vm)
    gmem = vmm.add_ram(0, size)
    return vm, vmm, gmem, pkvm.Guest(vm, vmm)


# -- §7.8, TDX ------------------------------------------------------------------------------------


def test_tdx_shared_to_private_sequence():
    """§7.8 TDX shared->private: MapGPA -> exit -> VMM sets PRIVATE (zaps the shared EPT) -> ACCEPT ->
    EPT violation -> gmem page -> PAGE.AUG (PENDING) -> ACCEPT retried -> MAPPED."""
    vm, vmm, gmem, vcpu = td()
    vm.set_memory_attributes(0, 2 * MiB, 0)
    vcpu.access(0, private=False, write=True)  # the 2M are in use as shared memory (one THP leaf)
    assert vm.stats["pages_2m"] == 1
    r = vcpu.map_gpa(0, 4096)
    assert (r.exit_reason, r.hypercall.args) == (pkvm.KVM_EXIT_HYPERCALL, (0, 1, ENC))
    t = trace(vm)
    assert vmm.handle_exit(vcpu, r)
    assert vm.get_memory_attributes(0) == PRIVATE and vm.stats["pages_2m"] == 0 and t == []  # direct root only
    assert vm.hostmem.nr_allocated == 512  # MADV_DONTNEED of 4K inside a THP frees nothing in the model
    assert vcpu.run().status == 0
    r = vcpu.accept(0, pkvm.PG_LEVEL_4K)
    assert (r.status, r.faults) == (0, 1)
    assert [e[0] for e in ops(t)] == ["TDH.MEM.SEPT.ADD"] * 3 + ["TDH.MEM.PAGE.AUG"]
    assert vm.sept.state(0) == "mapped" and gmem.folio(0) is not None
    vm.check()


def test_tdx_private_to_shared_sequence():
    """§7.8 TDX private->shared: MapGPA(gpa|shared) -> exit -> VMM sets 0 -> BLOCK, TRACK+kick, REMOVE,
    WBINVD, clear -> VMM punches the hole -> shared access -> EPT violation -> HVA page in the shared EPT."""
    vm, vmm, gmem, vcpu = td(nr_vcpus=2)
    guest = pkvm.Guest(vm, vmm)
    assert guest.accept(0, 2 * MiB)
    r = vcpu.map_gpa(SHARED47 | 0x3000, 4096)
    assert r.hypercall.args == (0x3000, 1, DEC)
    t = trace(vm)
    assert vmm.handle_exit(vcpu, r)
    assert [e[0] for e in ops(t)] == ["TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "kick", "TDH.MEM.PAGE.REMOVE",
                                      "TDH.PHYMEM.PAGE.WBINVD", "clear"]
    assert gmem.folio(3) is None and vm.stats["gmem_pages_freed"] == 1
    assert vcpu.run().status == 0
    a = guest.touch(0x3000, private=False, write=True)
    assert (a.ret, a.faults) == ("done", 1) and not vm.mmu.lookup(3).private
    vm.check()


def test_tdx_implicit_conversion_by_touch():
    """§7.6: a shared access to private memory exits (KVM_EXIT_MEMORY_FAULT); the VMM converts; it goes on."""
    vm, vmm, gmem, vcpu = td()
    guest = pkvm.Guest(vm, vmm)
    r = guest.touch(0x10000, 3 * 4096, private=False)
    assert (r.ret, r.pages_done) == ("done", 3) and vm.stats["memory_fault_exits"] == 3
    assert vm.get_memory_attributes(0x11) == 0 and vmm.conversions == 3


def test_tdx_private_touch_of_unaccepted_memory_kills():
    """An implicit conversion to private is not enough on TDX: the page is PENDING until ACCEPT, so the TD dies."""
    vm, vmm, gmem, vcpu = td()
    vm.set_memory_attributes(0, 8 * MiB, 0)
    r = pkvm.Guest(vm, vmm).touch(0x1000, private=True)
    assert (r.ret, r.errno) == ("exit", errno.EIO) and vm.vm_dead and vm.get_memory_attributes(1) == PRIVATE


# -- §7.8, SW_PROTECTED --------------------------------------------------------------------------------


def test_sw_protected_hypercall_sequence():
    """§7.8 SW_PROTECTED: KVM_HC_MAP_GPA_RANGE -> exit -> VMM sets attributes -> ret=0 -> the guest resumes;
    the next access takes is_private from the attribute."""
    vm, vmm, gmem, guest = _sw()
    vcpu = guest.vcpu
    r = vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0x4000, 2, DEC)
    assert (r.exit_reason, r.hypercall.args, r.hypercall.flags) == (pkvm.KVM_EXIT_HYPERCALL, (0x4000, 2, DEC), 1)
    assert vmm.handle_exit(vcpu, r) and r.hypercall.ret == 0
    assert vcpu.run().status == 0
    assert vm.get_memory_attributes(4) == vm.get_memory_attributes(5) == 0 and gmem.folio(4) is None
    r = vcpu.page_fault(0x4000, private=True)  # a private access to a shared gfn: implicit conversion exit
    assert (r.ret, r.memory_fault) == ("exit", (0x4000, 4096, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE))
    assert vcpu.page_fault(0x4000, private=False).ret == "fixed" and not vm.mmu.lookup(4).private
    assert vm.stats["hypercalls"] == 1 and vm.stats["hypercall_exits"] == 1


def test_sw_protected_guest_flows_round_trip():
    """Platforms without flows of their own use the hypercall flows; nothing to accept."""
    vm, vmm, gmem, guest = _sw()
    assert isinstance(guest.flows, pkvm.actors.guest.HypercallGuestFlows)
    assert guest.convert(0, 2 * MiB, private=False) and guest.touch(0, 2 * MiB, private=False).ret == "done"
    assert guest.convert(0, 2 * MiB, private=True) and guest.accept(0, 2 * MiB)
    assert guest.touch(0, 2 * MiB, private=True).ret == "done" and vm.stats["pages_4k"] == 512
    vm.check()


@pytest.mark.parametrize(("args", "status"), [
    ((pkvm.KVM_HC_MAP_GPA_RANGE, 0x800, 1, 0), -KVM_EINVAL & U64),
    ((pkvm.KVM_HC_MAP_GPA_RANGE, 0x1000, 0, 0), -KVM_EINVAL & U64),
    ((pkvm.KVM_HC_MAP_GPA_RANGE, 0x1000, U64, 0), -KVM_EINVAL & U64),
    ((99, 0, 0, 0), -KVM_ENOSYS & U64),
], ids=["unaligned", "no-pages", "gfn-overflow", "unknown-nr"])
def test_hypercall_errors_complete_in_kernel(args, status):
    """§7.3: bad arguments -> RAX = -KVM_EINVAL, unknown hypercalls -> -KVM_ENOSYS, no exit."""
    vm, vmm, gmem, guest = _sw()
    r = guest.vcpu.hypercall(*args)
    assert (r.ret, r.status) == ("done", status) and vm.stats["hypercall_exits"] == 0


def test_hypercall_gfn_overflow_test_is_a_wrap_test():
    """____kvm_emulate_hypercall (arch/x86/kvm/x86.c) refuses KVM_HC_MAP_GPA_RANGE when
    ``gpa_to_gfn(gpa) + npages <= gpa_to_gfn(gpa)`` (§7.3), i.e. only when the u64 sum wraps:
    a range whose last gfn + 1 is exactly 2**64 - 1 still exits to userspace, one page more is
    -KVM_EINVAL. The exit costs one vmexit and one userspace_exit (docs/costs.md)."""
    vm, vmm, gmem, guest = _sw()
    vcpu = guest.vcpu
    before = vm.cost_breakdown()
    r = vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0x1000, U64 - 1, 0)
    assert r.ret == "exit" and r.hypercall.args == (0x1000, U64 - 1, 0)
    cb = vm.cost_breakdown()
    assert cb.get("userspace_exit", 0) - before.get("userspace_exit", 0) == vm.costs.ns("userspace_exit")
    assert cb.get("vmexit", 0) - before.get("vmexit", 0) == vm.costs.ns("vmexit")
    r.hypercall.ret = 22
    assert vcpu.run().status == 22
    r = vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0x2000, U64 - 1, 0)
    assert (r.ret, r.status) == ("done", -KVM_EINVAL & U64)


def test_hypercall_without_capability_is_enosys_and_ret_truncated_for_32_bit():
    """Without KVM_CAP_EXIT_HYPERCALL the hypercall is -KVM_ENOSYS; a 32-bit caller sees ret cut to 32 bits."""
    vm = pkvm.VM("sw_protected")
    vcpu = vm.create_vcpu()
    assert vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0, 1, 0).status == -KVM_ENOSYS & U64
    vm.enable_cap(pkvm.KVM_CAP_EXIT_HYPERCALL, 1 << pkvm.KVM_HC_MAP_GPA_RANGE)
    r = vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0, 1, 0, long_mode=False)
    assert r.hypercall.flags == 0
    r.hypercall.ret = U64
    assert vcpu.run().status == 0xFFFFFFFF


def test_32_bit_hypercall_arguments_are_cut_to_32_bits():
    """____kvm_emulate_hypercall masks nr and the arguments to 32 bits for a 32-bit caller:
    the exit carries the low halves (a gfn that would overflow in 64 bits does not)."""
    vm = pkvm.VM("sw_protected")
    vcpu = vm.create_vcpu()
    vm.enable_cap(pkvm.KVM_CAP_EXIT_HYPERCALL, 1 << pkvm.KVM_HC_MAP_GPA_RANGE)
    r = vcpu.hypercall((1 << 40) | pkvm.KVM_HC_MAP_GPA_RANGE, (7 << 32) | 0x3000, (1 << 33) | 2, (1 << 35) | 0x10,
                       long_mode=False)
    assert r.ret == "exit" and r.hypercall.args == (0x3000, 2, 0x10) and r.hypercall.flags == 0
    vcpu.run()
    # The in-kernel answers are cut to 32 bits as well (complete_hypercall_exit).
    assert vcpu.hypercall(99, long_mode=False).status == -KVM_ENOSYS & 0xFFFFFFFF
    assert vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0x800, 1, 0, long_mode=False).status == -KVM_EINVAL & 0xFFFFFFFF
    # In 64-bit mode the high bits count: nr is unknown, so the hypercall completes with -KVM_ENOSYS.
    r = vcpu.hypercall((1 << 40) | pkvm.KVM_HC_MAP_GPA_RANGE, 0x3000, 2, 0)
    assert (r.ret, r.status) == ("done", -KVM_ENOSYS & U64)


def test_enable_cap_and_check_extension():
    """KVM_CAP_EXIT_HYPERCALL: CHECK_EXTENSION gives 1 << 12; ENABLE_CAP refuses other bits or caps (EINVAL)."""
    vm = pkvm.VM("sw_protected")
    assert vm.check_extension(pkvm.KVM_CAP_EXIT_HYPERCALL) == 1 << 12
    for cap, mask in ((pkvm.KVM_CAP_EXIT_HYPERCALL, 1 << 11), (pkvm.KVM_CAP_GUEST_MEMFD, 0)):
        with pytest.raises(pkvm.KvmError, match="KVM_CAP_EXIT_HYPERCALL") as exc:
            vm.enable_cap(cap, mask)
        assert exc.value.errno == errno.EINVAL and vm.hypercall_exit_mask == 0


# -- pkvm.Vmm --------------------------------------------------------------------------------------


def test_add_ram_is_kvm_set_phys_mem():
    """add_ram: a guest_memfd slot marked private (private-memory VMs), a plain slot otherwise."""
    vm, vmm, gmem, guest = _sw()
    slot = vm.memslot(0)
    assert slot.gmem is gmem and slot.userspace_addr % (1 << 30) == 0 and vm.get_memory_attributes(0) == PRIVATE
    plain = pkvm.VM("default")
    assert pkvm.Vmm(plain).add_ram(0, 2 * MiB) is None and plain.memslot(0).gmem is None


@pytest.mark.parametrize(("gpa", "size", "to_private", "ret"), [
    (0x800, 4096, True, -errno.EINVAL),
    (0x1000, 0, True, -errno.EINVAL),
    (64 * MiB, 4096, False, 0),
    (64 * MiB, 4096, True, -errno.EINVAL),
], ids=["unaligned", "empty", "outside-ram-to-shared", "outside-ram-to-private"])
def test_convert_memory_special_cases(gpa, size, to_private, ret):
    """kvm_convert_memory: alignment and size errors; outside RAM, to-shared is ignored, to-private fails."""
    vm, vmm, gmem, guest = _sw()
    assert vmm.convert_memory(gpa, size, to_private) == ret


def test_convert_memory_refuses_ram_without_guest_memfd():
    """Converting RAM that has no guest_memfd is an error (QEMU reports it)."""
    vm = pkvm.VM("sw_protected")
    vm.set_user_memory_region2(0, 0, 0, 2 * MiB, 1 << 40)
    assert pkvm.Vmm(vm).convert_memory(0, 4096, False) == -errno.EINVAL


@pytest.mark.parametrize(("backing", "freed"), [("4k", 1), ("thp", 512), ("hugetlb-2m", 0)])
def test_to_private_discards_shared_backing_except_hugetlb(backing, freed):
    """ram_block_discard_range frees whole host pages of the range; hugetlb is preallocated and kept."""
    vm, vmm, gmem, guest = _sw(shared_backing=backing)
    assert guest.convert(0, 2 * MiB, private=False) and guest.touch(0, 2 * MiB, private=False).ret == "done"
    held = vm.hostmem.nr_allocated
    assert vmm.convert_memory(0, 4096 if backing == "4k" else 2 * MiB, True) == 0
    assert held - vm.hostmem.nr_allocated == freed
    vm.check()


def test_handle_exit_refuses_what_qemu_refuses():
    """Unknown hypercalls, memory faults with another errno or unknown flags stop the vCPU."""
    vm, vmm, gmem, guest = _sw()
    r = pkvm.GuestOpResult("exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL, hypercall=pkvm.Hypercall(9, (0, 0, 0)))
    a = vmm.handle_exit(guest.vcpu, r)
    assert not a and (a.step, a.errno) == ("KVM_EXIT_HYPERCALL", errno.EINVAL) and "hypercall 9" in a.detail
    for err, flags, why in ((133, 0, "errno 133"), (errno.EFAULT, 1, "unknown flags 0x1")):  # 133: EHWPOISON
        r = pkvm.GuestOpResult("exit", exit_reason=pkvm.KVM_EXIT_MEMORY_FAULT, memory_fault=(0, 4096, flags), errno=err)
        a = vmm.handle_exit(guest.vcpu, r)
        assert not a and a.step == "KVM_EXIT_MEMORY_FAULT" and why in a.detail
    a = vmm.handle_exit(guest.vcpu, pkvm.GuestOpResult("done"))
    assert not a and a.step == "exit" and "not one the VMM answers" in a.detail
    assert vm.get_memory_attributes(0) == PRIVATE and vmm.failed_conversions == 0  # nothing changed


# -- results that say why ------------------------------------------------------------------------


def test_conversion_results_name_the_failing_step():
    """Guest.convert/accept return a ConversionResult: truthy on success; on failure the step,
    the status the guest read, where, and the VMM's answer when the VMM failed a conversion."""
    vm = pkvm.VM("snp", policy="6.19")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 8 * MiB)
    vmm.launch()
    guest = pkvm.Guest(vm, vmm)
    ok = guest.accept(0, 2 * MiB)
    assert ok and ok.ok and ok.step is None
    # PVALIDATE of pages already validated: FAIL_NOUPDATE, with no kernel event to explain it.
    r = guest.convert(0x1000, 0x3000, private=True)
    assert not r and (r.step, r.status, r.gpa, r.errno, r.exit) == (
        "PVALIDATE", pkvm.PVALIDATE_FAIL_NOUPDATE, 0x1000, 0, None)
    assert "FAIL_NOUPDATE" in r.detail and vm.events == []
    # A page-state change the VMM cannot carry out (no memslot): QEMU stops the VM, so the PSC
    # never completes; the result carries the VMM's errno and reason.
    r = guest.convert(16 * MiB, 0x1000, private=True)
    assert (r.ok, r.step, r.status, r.gpa, r.errno) == (False, "PSC", None, 16 * MiB, errno.EINVAL)
    assert not r.exit and r.exit.errno == errno.EINVAL and "in no memslot" in r.exit.detail
    assert "in no memslot" in r.detail and "in no memslot" in vmm.last_failure

    vm, vmm, gmem, guest = _sw()
    # A guest hypercall KVM itself refuses (no pages) reads -KVM_EINVAL, with no VMM involved.
    r = guest.flows.convert(0x1000, 0, True)
    assert (r.ok, r.step, r.status, r.errno) == (False, "KVM_HC_MAP_GPA_RANGE", -KVM_EINVAL & U64, 0)
    assert "-EINVAL" in r.detail
    assert guest.convert(0, 0x1000, private=False) and vm.get_memory_attributes(0) == 0


def test_conversion_result_of_a_refused_exit():
    """An exit the VMM refuses stops the guest: the result carries the VMM's answer."""

    class Refusing(pkvm.Vmm):
        def handle_exit(self, vcpu, result):
            return pkvm.ExitResult(False, "KVM_HC_MAP_GPA_RANGE", result.exit_reason, errno.EPERM, "test VMM")

    vm = pkvm.VM("sw_protected")
    vmm = Refusing(vm)
    vmm.add_ram(0, 2 * MiB)
    guest = pkvm.Guest(vm, vmm)
    r = guest.convert(0, 0x1000, private=False)
    assert (r.ok, r.step, r.status, r.gpa, r.errno) == (False, "KVM_HC_MAP_GPA_RANGE", None, 0, errno.EPERM)
    assert r.exit is guest.last_exit and r.exit.detail == "test VMM" and "refused: test VMM" in r.detail
    assert vm.get_memory_attributes(0) == PRIVATE


def test_flows_that_return_a_bool_still_say_it_failed():
    """Third-party flows returning a bare bool: False becomes a failed result of step "flows"."""
    vm, vmm, gmem, guest = _sw()

    class Flows:
        def convert(self, gpa, size, private):
            return False

        def accept(self, gpa, size, huge=True):
            return True

    guest.flows = Flows()
    r = guest.convert(0, 0x1000, private=False)
    assert (r.ok, r.step) == (False, "flows") and "without saying which step" in r.detail
    assert guest.accept(0, 0x1000).ok


def test_actor_argument_checks():
    """Guest/Vmm check what they are given."""
    vm, vmm, gmem, guest = _sw()
    with pytest.raises(TypeError, match="vm must be a pkvm.VM"):
        pkvm.Vmm(None)
    with pytest.raises(ValueError, match="vmm must be a pkvm.Vmm of the same VM"):
        pkvm.Guest(pkvm.VM("sw_protected"), vmm)
    with pytest.raises(ValueError, match="must be a non-empty, 4 KiB aligned range"):
        guest.convert(0x800, 4096, private=True)
    with pytest.raises(TypeError, match="gpa and size must be ints"):
        guest.accept(0, None)


def test_docstring_examples():
    """The doctests of the actors and the S-EPT module pass."""
    import doctest

    import pkvm.actors.guest
    import pkvm.platforms._tdx_sept
    import pkvm.actors.vmm

    for mod in (pkvm.actors.vmm, pkvm.actors.guest, pkvm.platforms._tdx_sept):
        result = doctest.testmod(mod)
        assert result.failed == 0 and result.attempted > 0, mod.__name__


def test_modeled_time_is_charged_to_the_actor_that_runs():
    vm = pkvm.VM("snp")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 8 << 20)
    guest = pkvm.Guest(vm, vmm)
    assert set(vm.cost_by_actor()) == {"vmm"}            # add_ram: the VMM's ioctls
    assert guest.accept(0x200000, 0x200000)
    assert set(vm.cost_by_actor()) == {"vmm", "vcpu0"}
    assert "rmpupdate" in vm.cost_by_actor()["vcpu0"]      # fault time: the vCPU pays
    before = vm.cost_by_actor()["vmm"].get("attr_store", 0)
    assert guest.convert(0x200000, 0x1000, private=False)
    by = vm.cost_by_actor()
    assert by["vmm"]["attr_store"] - before == 100         # the VMM's KVM_SET_MEMORY_ATTRIBUTES
    assert "attr_store" not in by["vcpu0"]
    assert by["vcpu0"]["psc_request"] > 0                  # the page-state change (its exit)
    assert vm.cost_breakdown() == {op: sum(c.get(op, 0) for c in by.values())
                                   for op in {o for c in by.values() for o in c}}
    assert sum(map(sum, (c.values() for c in by.values()))) == vm.modeled_ns
    assert vm._actor == "vmm"                               # restored after the guest ran


def test_actor_is_restored_when_a_call_fails():
    vm = pkvm.VM("sw_protected")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 2 << 20)
    guest = pkvm.Guest(vm, vmm)
    with pytest.raises(ValueError, match="4 KiB aligned"):
        guest.convert(0x1001, 0x1000, private=False)
    vm._kill("test")
    with pytest.raises(pkvm.KvmError, match="dead"):
        guest.touch(0, private=True)
    assert vm._actor == "vmm"


def test_trace_of_direct_calls():
    from pkvm.experiments.trace import Tracer, parse

    vm = pkvm.VM("sw_protected")
    tr = Tracer()
    vm.trace(tr)
    gmem = vm.create_guest_memfd(4 << 20)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 << 20, 1 << 40, gmem)
    vm.set_memory_attributes(0, 4 << 20, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vm.set_memory_attributes(0, 4 << 20, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)   # short-circuits: still traced
    with pytest.raises(pkvm.KvmError, match="aligned"):
        vm.set_memory_attributes(1, 4096, 0)                                 # fails validation: not traced
    gmem.fallocate(pkvm.FALLOC_FL_PUNCH_HOLE | pkvm.FALLOC_FL_KEEP_SIZE, 0, 8192)
    events = [(ev.event, ev.comm, ev.fields) for _, ev in parse(tr.lines)]
    assert events == [
        ("kvm_vm_set_mem_attributes", "qemu-system-x86", {"start": 0, "end": 1024, "attributes": 8}),
        ("kvm_vm_set_mem_attributes", "qemu-system-x86", {"start": 0, "end": 1024, "attributes": 8}),
        ("sys_enter_fallocate", "qemu-system-x86", {"fd": gmem.fd, "mode": 3, "offset": 0, "len": 8192}),
    ]
    assert vm.attr_ioctls == 2
    vm.trace(None)
    vm.set_memory_attributes(0, 4096, 0)
    assert len(tr.lines) == 3
    with pytest.raises(TypeError, match="Tracer"):
        vm.trace("stdout")  # type: ignore[arg-type]


def test_snp_hypercall_is_64_bit_once_launched():
    """SNP_LAUNCH_FINISH encrypts the vCPUs' save areas (snp_launch_update_vmsa sets
    guest_state_protected), after which is_64_bit_hypercall is true whatever the guest's mode
    (arch/x86/kvm/x86.h): long_mode=False no longer cuts the arguments or the answer. Before
    the launch finishes, pkvm honours long_mode."""
    vm = pkvm.VM("snp")
    vcpu = vm.create_vcpu()
    vm.enable_cap(pkvm.KVM_CAP_EXIT_HYPERCALL, 1 << pkvm.KVM_HC_MAP_GPA_RANGE)
    assert vcpu.hypercall(99, long_mode=False).status == -KVM_ENOSYS & 0xFFFFFFFF
    vm.snp.launch_finish()
    assert vcpu.hypercall(99, long_mode=False).status == -KVM_ENOSYS & U64
    r = vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (1 << 32) | 0x1000, 1, 0, long_mode=False)
    assert r.ret == "exit" and r.hypercall.flags == pkvm.constants.KVM_EXIT_HYPERCALL_LONG_MODE
    assert r.hypercall.args == ((1 << 32) | 0x1000, 1, 0)
    with pytest.raises(TypeError):
        vcpu.hypercall(99, long_mode=0)


def _no_memslot_conversion(platform):
    """A guest on ``platform`` converting [16 MiB, +4K), past its 8 MiB of RAM, to private."""
    if platform == "tdx":
        vm, vmm, gmem, vcpu = td()
        guest = pkvm.Guest(vm, vmm)
    elif platform == "snp":
        vm = pkvm.VM("snp", policy="6.19")
        vmm = pkvm.Vmm(vm)
        vmm.add_ram(0, 8 * MiB)
        vmm.launch()
        guest = pkvm.Guest(vm, vmm)
    else:
        vm, vmm, gmem, guest = _sw()
    return vm, vmm, guest, guest.convert(16 * MiB, 0x1000, private=True)


@pytest.mark.parametrize("platform", ["sw_protected", "snp", "tdx"])
def test_a_failed_map_gpa_range_conversion_stops_the_vcpu(platform):
    """QEMU never hands a failed conversion back to the guest: kvm_handle_hc_map_gpa_range
    returns kvm_convert_memory's error to kvm_cpu_exec, which leaves its loop and stops the VM
    (RUN_STATE_INTERNAL_ERROR); hypercall.ret is not written (KVM presets it to 0). So the
    guest's PSC / MapGPA / hypercall never completes: the result has no status and carries the
    refused exit."""
    vm, vmm, guest, r = _no_memslot_conversion(platform)
    step = {"sw_protected": "KVM_HC_MAP_GPA_RANGE", "snp": "PSC", "tdx": "MapGPA"}[platform]
    assert (r.ok, r.step, r.status, r.gpa, r.errno) == (False, step, None, 16 * MiB, errno.EINVAL), r
    assert r.exit is not None and not r.exit and r.exit.step == "KVM_HC_MAP_GPA_RANGE"
    assert r.exit.errno == errno.EINVAL and "in no memslot" in r.exit.detail and "VM stops" in r.exit.detail
    assert "stopped in an exit the VMM refused" in r.detail
    assert vmm.failed_conversions == 1 and "in no memslot" in vmm.last_failure


def test_a_failed_hypercall_conversion_leaves_hypercall_ret_alone():
    """The VMM's answer to a KVM_HC_MAP_GPA_RANGE exit whose conversion fails is falsy and does
    not write hypercall.ret (QEMU never does; KVM's preset 0 stays)."""
    vm, vmm, gmem, guest = _sw()
    hc = pkvm.Hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (16 * MiB, 1, ENC))
    a = vmm.handle_exit(guest.vcpu, pkvm.GuestOpResult("exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL, hypercall=hc))
    assert not a and a.errno == errno.EINVAL and hc.ret == 0
    hc = pkvm.Hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (16 * MiB, 1, DEC))  # MMIO-like: ignored, success
    a = vmm.handle_exit(guest.vcpu, pkvm.GuestOpResult("exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL, hypercall=hc))
    assert a and a.errno == 0 and hc.ret == 0


def test_snp_hypercall_width_is_per_vcpu_as_launch_finish_left_it():
    """snp_launch_update_vmsa (arch/x86/kvm/svm/sev.c), run by SNP_LAUNCH_FINISH, encrypts the
    save area of each vCPU that exists then and sets its guest_state_protected; a vCPU created
    afterwards is not covered, so is_64_bit_hypercall (arch/x86/kvm/x86.h) reads its mode:
    pkvm honours its ``long_mode``, as it does before the launch finishes."""
    vm = pkvm.VM("snp")
    early = vm.create_vcpu()
    vm.enable_cap(pkvm.KVM_CAP_EXIT_HYPERCALL, 1 << pkvm.KVM_HC_MAP_GPA_RANGE)
    assert not early.guest_state_protected
    vm.snp.launch_finish()
    late = vm.create_vcpu()
    assert early.guest_state_protected and not late.guest_state_protected
    assert early.hypercall(99, long_mode=False).status == -KVM_ENOSYS & U64
    assert late.hypercall(99, long_mode=False).status == -KVM_ENOSYS & 0xFFFFFFFF
    assert late.hypercall(99).status == -KVM_ENOSYS & U64
    r = late.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (1 << 32) | 0x1000, 1, 0, long_mode=False)
    assert r.ret == "exit" and r.hypercall.flags == 0 and r.hypercall.args == (0x1000, 1, 0)
    # A refused LAUNCH_FINISH (the second) protects no one.
    with pytest.raises(pkvm.KvmError):
        vm.snp.launch_finish()
    assert not late.guest_state_protected
    with pytest.raises(AttributeError):
        late.guest_state_protected = True  # type: ignore[misc]


def test_vcpus_of_other_types_report_their_guest_state_protection():
    """guest_state_protected: a TD's vCPU from its creation (tdx_vcpu_create; KVM accepts no
    TD DEBUG attribute, which would leave it readable); a plain or SW_PROTECTED VM's never."""
    assert not pkvm.VM("sw_protected").create_vcpu().guest_state_protected
    assert not pkvm.VM("default").create_vcpu().guest_state_protected
    assert pkvm.VM("tdx").create_vcpu().guest_state_protected
