"""TDX guest instructions: TDG.VP.VMCALL<MapGPA> (§7.2), TDG.MEM.PAGE.ACCEPT (§6.2) and the Linux
guest's flows built on them (§7.5)."""

import errno

import pytest
from tdxhelpers import PRIVATE, SHARED47, MiB, ops, seamcalls, td, tdx_snapshot, trace

import pkvm
from pkvm.constants import (
    TDVMCALL_STATUS_ALIGN_ERROR,
    TDVMCALL_STATUS_INVALID_OPERAND,
    TDVMCALL_STATUS_RETRY,
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED,
    TDX_OPERAND_INVALID,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
)
from pkvm.testing.reference_tdx import ReferenceTdx

K4, M2, G1 = pkvm.PG_LEVEL_4K, pkvm.PG_LEVEL_2M, pkvm.PG_LEVEL_1G
ENC, DEC = pkvm.KVM_MAP_GPA_RANGE_ENCRYPTED, pkvm.KVM_MAP_GPA_RANGE_DECRYPTED

# -- MapGPA ---------------------------------------------------------------------------------------


def test_map_gpa_without_exit_hypercall_is_subfunc_unsupported():
    """Without KVM_CAP_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE): SUBFUNC_UNSUPPORTED, r11 = gpa, no exit."""
    vm = pkvm.VM("tdx")
    vmm = pkvm.Vmm(vm, exit_hypercall=False)
    vmm.add_ram(0, 4 * MiB)
    vmm.launch()
    r = vm.vcpus[0].map_gpa(0x1000 | SHARED47, 4096)
    assert (r.ret, r.status, r.value) == ("done", TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED, 0x1000 | SHARED47)
    assert vm.stats["hypercall_exits"] == 0 and vm.cost_breakdown()["td_vmm_exit"] == vm.costs.ns("td_vmm_exit")


@pytest.mark.parametrize(("gpa", "size", "status"), [
    (0x1000, 0, TDVMCALL_STATUS_INVALID_OPERAND),
    (SHARED47 - 4096, 8192, TDVMCALL_STATUS_INVALID_OPERAND),
    ((1 << 48) - 4096, 8192, TDVMCALL_STATUS_INVALID_OPERAND),
    (1 << 48, 4096, TDVMCALL_STATUS_INVALID_OPERAND),
    ((1 << 64) - 4096, 8192, TDVMCALL_STATUS_INVALID_OPERAND),
    (0x800, 4096, TDVMCALL_STATUS_ALIGN_ERROR),
    (0x1000, 0x1800, TDVMCALL_STATUS_ALIGN_ERROR),
], ids=["size-0", "crosses-shared-bit", "ends-past-gpaw", "starts-past-gpaw", "wraps", "unaligned-gpa",
        "unaligned-size"])
def test_map_gpa_rejected_operands(gpa, size, status):
    """§7.2's checks, in order: range (INVALID_OPERAND) before alignment (ALIGN_ERROR); r11 = gpa; nothing changes."""
    vm, vmm, gmem, vcpu = td()
    before = tdx_snapshot(vm)
    r = vcpu.map_gpa(gpa, size)
    assert (r.ret, r.status, r.value) == ("done", status, gpa)
    after = tdx_snapshot(vm)
    assert after[0][:4] == before[0][:4] and after[1:] == before[1:]


def test_map_gpa_may_end_at_the_top_of_the_gpa_space():
    """tdx_map_gpa (arch/x86/kvm/vmx/tdx.c) tests the last byte, ``kvm_vcpu_is_legal_gpa(gpa +
    size - 1)`` (§7.2): the shared half's last page, ending exactly at 2**gpaw, is a legal
    range and exits to userspace (gpa without the shared bit, DECRYPTED)."""
    vm, vmm, gmem, vcpu = td()
    gpa = (1 << 48) - 4096
    r = vcpu.map_gpa(gpa, 4096)
    assert r.ret == "exit" and r.hypercall.args == (gpa & ~SHARED47, 1, DEC)


def test_map_gpa_exits_in_2m_chunks_without_shared_bit():
    """MapGPA exits once per 2 MiB chunk (from gpa, not aligned), gpa stripped of the shared bit, DECRYPTED."""
    vm, vmm, gmem, vcpu = td(8 * MiB)
    gpa = (0x1000 | SHARED47)
    r = vcpu.map_gpa(gpa, 5 * MiB)
    seen = []
    while r.ret == "exit":
        hc = r.hypercall
        assert (r.exit_reason, hc.nr, hc.flags) == (pkvm.KVM_EXIT_HYPERCALL, pkvm.KVM_HC_MAP_GPA_RANGE, 1)
        assert hc.ret == 0
        seen.append(hc.args)
        assert vmm.handle_exit(vcpu, r)
        r = vcpu.run()
    assert seen == [(0x1000, 512, DEC), (0x201000, 512, DEC), (0x401000, 256, DEC)]
    assert (r.status, r.value) == (0, None)
    assert vm.get_memory_attributes(0x1) == 0 and vm.get_memory_attributes(0x501) == PRIVATE
    cb = vm.cost_breakdown()
    assert cb["map_gpa"] == vm.costs.ns("map_gpa") and vm.stats["hypercall_exits"] == 3
    assert vm.stats["tdvmcall_map_gpa"] == 1


def test_map_gpa_private_direction_is_encrypted():
    """A private gpa (shared bit clear) asks for ENCRYPTED."""
    vm, vmm, gmem, vcpu = td()
    vm.set_memory_attributes(0, 4 * MiB, 0)
    r = vcpu.map_gpa(0x2000, 4096)
    assert r.hypercall.args == (0x2000, 1, ENC)


def test_map_gpa_failed_chunk_is_invalid_operand_at_that_chunk():
    """A nonzero hypercall.ret ends MapGPA with INVALID_OPERAND and r11 = the chunk's gpa (with its shared bit)."""
    vm, vmm, gmem, vcpu = td()
    gpa = SHARED47 | 0x100000
    r = vcpu.map_gpa(gpa, 4 * MiB)
    r.hypercall.ret = 0
    r = vcpu.run()
    r.hypercall.ret = 1  # the VMM failed the second chunk
    r = vcpu.run()
    assert (r.ret, r.status, r.value) == ("done", TDVMCALL_STATUS_INVALID_OPERAND, gpa + 2 * MiB)


def test_map_gpa_pending_interrupt_returns_retry_with_next_gpa():
    """A pending interrupt between chunks: RETRY with r11 = next gpa; the Linux guest resumes there."""
    vm, vmm, gmem, vcpu = td()
    vcpu.pending_interrupts = 1
    r = vcpu.map_gpa(SHARED47, 4 * MiB)
    r = pkvm.Guest(vm, vmm).execute(r)
    assert (r.status, r.value) == (TDVMCALL_STATUS_RETRY, SHARED47 + 2 * MiB) and vcpu.pending_interrupts == 0
    assert vm.get_memory_attributes(0x200) == PRIVATE  # the second chunk was not converted
    vcpu.pending_interrupts = 1
    guest = pkvm.Guest(vm, vmm)
    assert guest.convert(0, 6 * MiB, private=False)  # RETRY handled by tdx_map_gpa's loop
    assert vm.get_memory_attributes(0x5FF) == 0 and vm.stats["tdvmcall_map_gpa"] == 3


def test_guest_instruction_while_exit_pending_is_ebusy():
    """The guest cannot run another instruction while its vCPU is stopped in an exit."""
    vm, vmm, gmem, vcpu = td()
    vcpu.map_gpa(SHARED47, 4096)
    with pytest.raises(pkvm.KvmError, match="stopped in an exit") as exc:
        vcpu.accept(0, K4)
    assert exc.value.errno == errno.EBUSY
    assert vcpu.run().status == 0 and vcpu.run().ret == "done"  # nothing pending any more


def test_td_hypercall_is_always_64_bit():
    """A TD's guest state is protected, so is_64_bit_hypercall is true whatever the caller's mode
    (arch/x86/kvm/x86.h; tdx_emulate_vmcall): long_mode=False still exits with the long-mode
    flag, keeps the high argument bits and gets the whole 64-bit ret back."""
    vm, vmm, gmem, vcpu = td()
    r = vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (1 << 32) | 0x1000, 1, 0, long_mode=False)
    assert r.ret == "exit" and r.hypercall.flags == pkvm.constants.KVM_EXIT_HYPERCALL_LONG_MODE
    assert r.hypercall.args == ((1 << 32) | 0x1000, 1, 0)
    r.hypercall.ret = (1 << 64) - 1
    assert vcpu.run().status == (1 << 64) - 1
    with pytest.raises(TypeError):
        vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0, 1, 0, long_mode=0)


def test_map_gpa_argument_types():
    """Programming errors name the argument; map_gpa/accept on another VM type are TypeErrors."""
    vm, vmm, gmem, vcpu = td()
    with pytest.raises(TypeError, match="gpa must be an int"):
        vcpu.map_gpa("0", 4096)
    with pytest.raises(ValueError, match="size=-0x1 does not fit a u64"):
        vcpu.map_gpa(0, -1)
    with pytest.raises(ValueError, match="level=4 must be PG_LEVEL_4K"):
        vcpu.accept(0, 4)
    sw = pkvm.VM("sw_protected").create_vcpu()
    with pytest.raises(TypeError, match="map_gpa is a TDX guest operation"):
        sw.map_gpa(0, 4096)
    with pytest.raises(TypeError, match="accept is a TDX guest operation"):
        sw.accept(0, K4)


# -- ACCEPT ------------------------------------------------------------------------------------------


def test_accept_4k_faults_augs_and_accepts():
    """ACCEPT on a missing entry: EPT violation -> AUG (PENDING) -> retried ACCEPT -> MAPPED (§7.8)."""
    vm, vmm, gmem, vcpu = td()
    t = trace(vm)
    r = vcpu.accept(0x3000, K4)
    assert (r.ret, r.status, r.faults) == ("done", 0, 1) and vm.sept.state(3) == "mapped"
    assert [e[0] for e in ops(t)] == ["TDH.MEM.SEPT.ADD"] * 3 + ["TDH.MEM.PAGE.AUG"]
    assert vm.stats["tdx_accepts_4k"] == 1 and vm.stats["pf_fixed"] == 1
    r = vcpu.accept(0x3000, K4)
    assert r.status == TDX_PAGE_ALREADY_ACCEPTED
    assert vcpu.access(0x3000, private=True, write=True).ret == "done"


def test_accept_larger_than_mapping_is_size_mismatch():
    """2M / 1G accepts where KVM maps 4K: the first faults in one 4K page, then TDX_PAGE_SIZE_MISMATCH."""
    vm, vmm, gmem, vcpu = td(4 * MiB)
    r = vcpu.accept(2 * MiB, M2)
    assert (r.status, r.faults) == (TDX_PAGE_SIZE_MISMATCH | 1, 1) and vm.sept.state(0x200) == "pending"
    assert vcpu.accept(2 * MiB, M2).status == TDX_PAGE_SIZE_MISMATCH | 1  # the PT exists now: no fault
    assert vcpu.accept(0x200000, K4).status == 0


@pytest.mark.parametrize(("gpa", "level"), [(0x1000, M2), (0x800, K4), (SHARED47, K4), (1 << 48, K4)],
                         ids=["misaligned-2m", "misaligned-4k", "shared-gpa", "past-gpaw"])
def test_accept_operand_invalid(gpa, level):
    """A misaligned, shared or out-of-range gpa: TDX_OPERAND_INVALID (RCX), nothing changes."""
    vm, vmm, gmem, vcpu = td()
    r = vcpu.accept(gpa, level)
    assert r.status == TDX_OPERAND_INVALID | 1 and vm.stats["pf_taken"] == 0


def test_accept_of_shared_memory_exits_then_resumes():
    """ACCEPT of a shared gfn: the EPT violation's mismatch is a memory-fault exit; run() re-executes it."""
    vm, vmm, gmem, vcpu = td()
    vm.set_memory_attributes(0, 4 * MiB, 0)
    r = vcpu.accept(0x5000, K4)
    assert (r.ret, r.exit_reason, r.memory_fault, r.errno) == (
        "exit", pkvm.KVM_EXIT_MEMORY_FAULT, (0x5000, 4096, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE), errno.EFAULT)
    assert vmm.handle_exit(vcpu, r)  # QEMU converts the page to private
    r = vcpu.run()
    assert (r.ret, r.status) == ("done", 0) and vm.sept.state(5) == "mapped"


# -- the Linux flows, against the per-gfn reference -------------------------------------------------


@pytest.mark.parametrize(("start", "npages"), [(0, 2048), (1, 1500), (511, 514), (0x200, 1), (300, 1024)],
                         ids=["aligned-8M", "odd", "straddle", "one", "mid"])
def test_lazy_accept_bulk_matches_instruction_by_instruction(start, npages):
    """tdx_accept_memory range-compressed gives the counters, time and state of the TDCALL-by-TDCALL loop."""
    vm, vmm, gmem, vcpu = td(8 * MiB, image=[(0, 4096, True)], nr_vcpus=2)
    ref = ReferenceTdx(nr_vcpus=2)
    rg = ref.create_guest_memfd(8 * MiB)
    ref.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 8 * MiB, 1 << 40, rg)
    ref.set_memory_attributes(0, 8 * MiB, PRIVATE)
    ref.create_vcpu()
    ref.init_mem_region(0, 1, True)
    ref.finalize()
    vcpu.accept(0x10000, K4)
    ref.accept(0x10000, K4)  # a few pages already accepted / pending in the middle
    vcpu.page_fault(0x11000, private=True)
    ref.page_fault(0x11, True, True)
    got = pkvm.Guest(vm, vmm).accept(start << 12, npages << 12)
    assert bool(got) == ref.accept_memory(start << 12, (start + npages) << 12)
    assert vm.stats == ref.stats and vm.cost_breakdown() == ref.cost
    assert {g: (s, lvl) for a, b, s, lvl in vm.sept.runs() for g in range(a, b)} == ref.sept


def test_accept_counts_the_linux_attempts():
    """Accepting a fresh 4 MiB: per 2M chunk one failed 2M TDCALL (and one fault), then 512 4K successes."""
    vm, vmm, gmem, vcpu = td(4 * MiB)
    assert pkvm.Guest(vm, vmm).accept(0, 4 * MiB)
    assert seamcalls(vm) == {"seamcall_sept_add": 4, "seamcall_aug": 1024, "seamcall_mr_finalize": 1,
                             "tdcall_accept": 1026, "tdx_accepts_4k": 1024}
    assert vm.stats["pf_taken"] == 1024
    m = vm.costs
    assert vm.cost_breakdown()["vmexit"] == m.ns("vmexit", 2)  # the two size mismatches


def test_accept_of_already_accepted_memory_fails():
    """Linux accepts only unaccepted memory: ALREADY_ACCEPTED at every size makes the loop fail."""
    vm, vmm, gmem, vcpu = td()
    g = pkvm.Guest(vm, vmm)
    assert g.accept(0, 8192) and not g.accept(0, 8192)


def test_convert_round_trip_frees_and_reallocates():
    """to shared: MapGPA, removal, hole punch; to private: MapGPA, discard, accept with fresh pages."""
    vm, vmm, gmem, vcpu = td()
    g = pkvm.Guest(vm, vmm)
    assert g.accept(0, 8 * MiB)
    assert g.convert(2 * MiB, 2 * MiB, private=False)
    assert vm.sept.state(0x200) == "free" and gmem.folio(0x200) is None
    assert g.touch(2 * MiB, 2 * MiB, private=False).ret == "done" and vm.stats["shared_pages_populated"] == 512
    assert g.convert(2 * MiB, 2 * MiB, private=True)
    assert vm.sept.state(0x3FF) == "mapped" and vm.stats["shared_pages_populated"] == 512
    assert vm.hostmem.nr_allocated == 2048  # the THP was discarded
    vm.check()


def test_guest_flows_fail_cleanly_when_vmm_refuses():
    """MapGPA of RAM without guest_memfd: QEMU fails the conversion and stops the VM, so MapGPA
    never completes (kvm_convert_memory, kvm_cpu_exec)."""
    vm, vmm, gmem, vcpu = td()
    vm.set_user_memory_region2(5, 0, 16 * MiB, 2 * MiB, 1 << 41)
    g = pkvm.Guest(vm, vmm)
    r = g.convert(16 * MiB, 4096, private=False)
    assert not r and r.status is None and not r.exit and vmm.failed_conversions == 1
    with pytest.raises(pkvm.KvmError) as exc:  # the vCPU stays stopped in the refused exit
        g.convert(64 * MiB, 4096, private=False)
    assert exc.value.errno == errno.EBUSY
    vm, vmm, gmem, vcpu = td()
    assert pkvm.Guest(vm, vmm).convert(64 * MiB, 4096, private=False)  # MMIO space: QEMU ignores a to-shared request


def test_one_tib_accept_is_a_few_runs():
    """A 1 TiB TD accepted in one call: 2**28 pages AUG'd and accepted, O(1) state."""
    vm, vmm, gmem, vcpu = td(1 << 40, image=[(0, MiB, True)])
    assert pkvm.Guest(vm, vmm).accept(MiB, (1 << 40) - MiB)
    assert vm.stats["tdx_accepts_4k"] == (1 << 28) - 256 and vm.stats["seamcall_add"] == 256
    assert len(vm.sept.leaves) == 1 and len(vm.mmu.sptes) <= 2
    assert vm.sept.nr_tables() == (1 << 19) + (1 << 10) + 2  # PTs, PDs, PDPTs
