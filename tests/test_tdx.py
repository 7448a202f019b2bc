"""TDX platform: address split, the two roots, S-EPT states and the SEAMCALL sequences KVM issues
(kernel-semantics.md §2.5, §4.1, §4.5, §6.1-§6.5)."""

import errno

import pytest
from tdxhelpers import PRIVATE, PUNCH, SHARED47, GiB, MiB, ops, seamcalls, td, tdx_snapshot, trace

import pkvm
from pkvm.platforms import PLATFORMS

# -- creation, options, policies ---------------------------------------------------------------


def test_tdx_vm_is_registered_with_mirror_root():
    """KVM_X86_TDX_VM is a registered platform with private memory, protected state and a mirror root."""
    ops_ = PLATFORMS[pkvm.KVM_X86_TDX_VM]
    facts = (ops_.name, ops_.has_private_mem, ops_.has_protected_state, ops_.has_mirror_root)
    assert facts == ("tdx", True, True, True)
    vm = pkvm.VM(pkvm.KVM_X86_TDX_VM)
    assert vm.vm_type == 5 and vm.tdx.state == "initialized" and vm.sept.state(0) == "free"
    assert vm.check_extension(pkvm.KVM_CAP_MEMORY_ATTRIBUTES) == PRIVATE
    vm.check()


@pytest.mark.parametrize(("gpaw", "bit", "levels"), [(48, 47, 4), (52, 51, 5)], ids=["4-level", "5-level"])
def test_shared_bit_follows_gpaw(gpaw, bit, levels):
    """GPAW 48 puts the shared bit at 47 (4-level S-EPT), GPAW 52 at 51 (5-level), §6.1."""
    vm = pkvm.VM("tdx", options={"gpaw": gpaw})
    assert (vm.tdx.shared_bit, vm.tdx.shared_mask, vm.sept.levels) == (bit, 1 << bit, levels)
    assert vm.tdx.is_private_gpa((1 << bit) - 4096) and not vm.tdx.is_private_gpa(1 << bit)


def test_first_private_fault_adds_one_table_per_level_and_5_level_has_one_more():
    """A first private fault adds every S-EPT page table of its walk: 3 with 4-level EPT, 4 with 5-level."""
    for gpaw, tables in ((48, 3), (52, 4)):
        vm, vmm, gmem, vcpu = td(gpaw=gpaw)
        assert vcpu.page_fault(0x5000, private=True).ret == "fixed"
        assert vm.stats["seamcall_sept_add"] == tables and vm.sept.nr_tables() == tables


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(options={"gpaw": 50}), ValueError, r"options\['gpaw'\]=50 must be 48"),
    (dict(options={"gpaw": "48"}), ValueError, r"options\['gpaw'\]='48'"),
    (dict(options={"levels": 5}), TypeError, r"'levels' are not options of a tdx VM \(it takes: gpaw\)"),
    (dict(policy="6.8"), pkvm.KvmError, "KVM_X86_TDX_VM exists from Linux 6.16"),
    (dict(policy="rfc-v8"), pkvm.KvmError, "attr_ioctl='legacy-progress'"),
], ids=["gpaw-50", "gpaw-str", "unknown-option", "policy-6.8", "policy-rfc-v8"])
def test_bad_tdx_vm_arguments(kwargs, exc, match):
    """Bad options are TypeError/ValueError naming them; a pre-6.16 policy is KVM_CREATE_VM's EINVAL."""
    with pytest.raises(exc, match=match) as info:
        pkvm.VM("tdx", **kwargs)
    if exc is pkvm.KvmError:
        assert info.value.errno == errno.EINVAL


def test_other_vm_types_take_no_options():
    """options= is per VM type: SW_PROTECTED takes none."""
    with pytest.raises(TypeError, match="'gpaw' are not options of a sw_protected VM \\(it takes: none\\)"):
        pkvm.VM("sw_protected", options={"gpaw": 48})


def test_memslot_must_stay_below_shared_bit():
    """kvm_arch_prepare_memory_region: a TD's memslot may not reach the shared bit (EINVAL), state unchanged."""
    vm = pkvm.VM("tdx")
    gmem = vm.create_guest_memfd(4 * MiB)
    before = tdx_snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="shared bit") as exc:
        vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, SHARED47 - 2 * MiB, 4 * MiB, 1 << 40, gmem)
    assert exc.value.errno == errno.EINVAL and tdx_snapshot(vm) == before
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, SHARED47 - 4 * MiB, 4 * MiB, 1 << 40, gmem)
    with pytest.raises(pkvm.KvmError, match="memslot flags 0x2 not valid"):
        vm.set_user_memory_region2(1, pkvm.KVM_MEM_READONLY, 0, 4 * MiB, 1 << 40)  # protected state


def test_vcpu_cannot_run_before_finalize():
    """tdx_vcpu_pre_run: before KVM_TDX_FINALIZE_VM every KVM_RUN path fails with EINVAL."""
    vm, vmm, gmem, vcpu = td(finalize=False)
    calls = [lambda: vcpu.page_fault(0, private=True), lambda: vcpu.access(0, private=True),
             lambda: vcpu.map_gpa(0, 4096), lambda: vcpu.accept(0, pkvm.PG_LEVEL_4K),
             lambda: vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 0, 1, 0)]
    for call in calls:
        with pytest.raises(pkvm.KvmError, match="the TD is not finalized") as exc:
            call()
        assert exc.value.errno == errno.EINVAL


# -- faults: §4.1, §4.5 -------------------------------------------------------------------------


def test_private_fault_sequence_sept_add_then_aug_and_page_is_pending():
    """A private fault on a runnable TD: SEPT.ADD for each missing table (top-down), then PAGE.AUG (§4.5)."""
    vm, vmm, gmem, vcpu = td()
    t = trace(vm)
    r = vcpu.page_fault(0x201000, private=True)
    assert (r.ret, r.level) == ("fixed", pkvm.PG_LEVEL_4K)
    assert ops(t) == [("TDH.MEM.SEPT.ADD", 0, 1 << 27, 3), ("TDH.MEM.SEPT.ADD", 0, 1 << 18, 2),
                      ("TDH.MEM.SEPT.ADD", 0x200, 0x400, 1), ("TDH.MEM.PAGE.AUG", 0x201, 0x202, 1)]
    assert vm.sept.state(0x201) == "pending" and vm.sept.level(0x201) == pkvm.PG_LEVEL_4K
    assert vm.mmu.lookup(0x201).private
    t.clear()
    vcpu.page_fault(0x202000, private=True)  # same 2M chunk: its tables exist
    assert ops(t) == [("TDH.MEM.PAGE.AUG", 0x202, 0x203, 1)]
    vm.check()


def test_private_fault_on_present_mirror_leaf_is_spurious_write():
    """A TD private fault is handled as a write (§6.4), so a present leaf makes it spurious, not a re-AUG."""
    vm, vmm, gmem, vcpu = td()
    assert vcpu.accept(0x3000, pkvm.PG_LEVEL_4K).status == 0  # EPT violation, AUG, retried ACCEPT
    assert vcpu.page_fault(0x3000, private=True, write=False).ret == "spurious"
    assert vm.stats["seamcall_aug"] == 1


def test_shared_fault_maps_direct_root_without_seamcalls():
    """A shared-bit access to shared memory maps the direct root (a 2M THP leaf), no SEAMCALL."""
    vm, vmm, gmem, vcpu = td()
    vm.set_memory_attributes(2 * MiB, 2 * MiB, 0)
    r = vcpu.page_fault(2 * MiB + 0x5000, private=False)
    assert (r.ret, r.level) == ("fixed", pkvm.PG_LEVEL_2M)
    assert not vm.mmu.lookup(0x205).private and seamcalls(vm) == {"seamcall_mr_finalize": 1}


@pytest.mark.parametrize(("attr", "private"), [(PRIVATE, False), (0, True)], ids=["shared-access-to-private",
                                                                                  "private-access-to-shared"])
def test_access_type_mismatch_exits_with_alias_free_gpa(attr, private):
    """The fault type comes from the shared bit; a mismatch is KVM_EXIT_MEMORY_FAULT with the alias-free gpa."""
    vm, vmm, gmem, vcpu = td()
    vm.set_memory_attributes(0, 8 * MiB, attr)
    r = vcpu.page_fault(0x7000, private=private)
    assert (r.ret, r.errno, r.exit_reason) == ("exit", errno.EFAULT, pkvm.KVM_EXIT_MEMORY_FAULT)
    assert r.memory_fault == (0x7000, 4096, pkvm.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)


def test_access_uses_root_of_its_type():
    """A private mapping does not serve a shared access (and vice versa): the walk is per root."""
    vm, vmm, gmem, vcpu = td()
    pkvm.Guest(vm, vmm).accept(0, 8 * MiB)
    assert vcpu.access(0, private=True, size=8 * MiB).ret == "done"
    r = vcpu.access(0, private=False)
    assert (r.ret, r.memory_fault) == ("exit", (0, 4096, 0))


def test_gmem_max_mapping_level_is_4k_private_and_uncapped_shared():
    """tdx_gmem_max_mapping_level: 4K for private memory, no cap (0) for shared (§4.5)."""
    op = PLATFORMS[5].gmem_max_mapping_level
    vm = pkvm.VM("tdx")
    assert op(vm, 0x1000, True) == pkvm.PG_LEVEL_4K and op(vm, 0x1000, False) == 0
    vm, vmm, gmem, vcpu = td(policy=pkvm.Policy.preset("6.19").replace(gmem_max_order=9))
    assert vcpu.page_fault(0, private=True).level == pkvm.PG_LEVEL_4K  # even on a 2M folio


# -- the guest touching unaccepted memory: §6.4 -----------------------------------------------


def test_access_to_pending_page_kills_the_td():
    """A guest access to a PENDING page is fatal: kvm_vm_dead, -EIO now, KvmError(EIO) on every later call."""
    vm, vmm, gmem, vcpu = td()
    r = vcpu.access(0x10000, private=True, size=3 * 4096)
    assert (r.ret, r.errno, r.exit_reason, r.pages_done, r.faults) == ("exit", errno.EIO, None, 0, 2)
    assert vm.vm_dead and not vm.vm_bugged and vm.sept.state(0x10) == "pending"
    assert vm.events[-1] == ("kvm_vm_dead", "Guest access before accepting 0x10000 on vCPU 0")
    assert vm.stats["seamcall_aug"] == 1  # the guest stopped at the first page
    vm.check()
    calls = [lambda: vm.set_memory_attributes(0, 4096, 0), lambda: vm.create_vcpu(), lambda: vm.check_extension(1),
             lambda: vm.create_guest_memfd(4096), lambda: vm.set_user_memory_region2(1, 0, 0, 0),
             lambda: vm.enable_cap(pkvm.KVM_CAP_EXIT_HYPERCALL, 0), lambda: vcpu.page_fault(0, private=False),
             lambda: vcpu.access(0, private=False), lambda: vcpu.map_gpa(0, 4096),
             lambda: vcpu.accept(0, 1), lambda: vcpu.run(), lambda: vm.tdx.finalize_vm(),
             lambda: vm.tdx.init_mem_region(vcpu, 0, 1)]
    for call in calls:
        with pytest.raises(pkvm.KvmError, match="the VM is dead") as exc:
            call()
        assert exc.value.errno == errno.EIO
    gmem.fallocate(PUNCH, 0, 2 * MiB)  # a guest_memfd is a file: it still works
    assert vm.sept.state(0x10) == "free"


def test_private_page_fault_on_pending_page_kills_too():
    """page_fault(private=True) on a PENDING page is that same 'access before accepting' EPT violation."""
    vm, vmm, gmem, vcpu = td()
    vcpu.page_fault(0x1000, private=True)
    r = vcpu.page_fault(0x1000, private=True)
    assert (r.ret, r.errno) == ("exit", errno.EIO) and vm.vm_dead


# -- zaps: §2.5 filter, §6.3 removal, §4.7 --------------------------------------------------------


def _accepted_td(**kw):
    vm, vmm, gmem, vcpu = td(**kw)
    assert pkvm.Guest(vm, vmm).accept(0, 8 * MiB)
    return vm, vmm, gmem, vcpu


def test_removal_sequence_block_track_kick_remove_wbinvd_clear():
    """Zapping a mapped private page: BLOCK, TRACK, kick every vCPU, REMOVE, WBINVD, clear (§6.3)."""
    vm, vmm, gmem, vcpu = _accepted_td(nr_vcpus=4)
    t = trace(vm)
    vm.set_memory_attributes(0x5000, 4096, 0)
    assert ops(t) == [("TDH.MEM.RANGE.BLOCK", 5, 6, 1), ("TDH.MEM.TRACK", 5, 6, 1), ("kick", 5, 6, 0),
                      ("TDH.MEM.PAGE.REMOVE", 5, 6, 1), ("TDH.PHYMEM.PAGE.WBINVD", 5, 6, 1), ("clear", 5, 6, 1)]
    assert vm.sept.state(5) == "free" and vm.mmu.lookup(5) is None
    assert vm.stats["vcpu_kicks"] == 4 and vm.stats["remote_tlb_flush"] == 1
    assert gmem.folio(5) is not None  # the folio stays until the VMM punches the hole
    vm.check()


def test_removal_of_a_run_counts_per_page():
    """N pages in one state are removed at once, counted and charged as N of each SEAMCALL."""
    vm, vmm, gmem, vcpu = _accepted_td(nr_vcpus=2)
    before = dict(vm.stats), vm.cost_breakdown()
    vm.set_memory_attributes(2 * MiB, 2 * MiB, 0)
    st, cost = vm.stats, vm.cost_breakdown()
    for name in ("seamcall_block", "seamcall_track", "seamcall_remove", "seamcall_wbinvd", "tdx_page_clears"):
        assert st[name] - before[0][name] == 512
    assert st["vcpu_kicks"] - before[0]["vcpu_kicks"] == 1024
    m = vm.costs
    assert cost["seamcall_block"] - before[1].get("seamcall_block", 0) == m.ns("seamcall_block", 512)
    assert cost["vcpu_kick"] == m.ns("vcpu_kick", 1024)


def test_pending_page_removal_goes_through_pending_blocked():
    """A PENDING page (AUG'd, never accepted) is removed the same way; BLOCK makes it PENDING_BLOCKED."""
    vm, vmm, gmem, vcpu = td()
    vcpu.page_fault(0x1000, private=True)
    t = trace(vm)
    vm.set_memory_attributes(0x1000, 4096, 0)
    assert [e.op for e in t][:1] == ["TDH.MEM.RANGE.BLOCK"] and vm.sept.state(1) == "free"


@pytest.mark.parametrize("policy", ["6.19", pkvm.Policy.preset("6.19").replace(zap_filter="all")],
                         ids=["old-type", "all"])
def test_conversion_zap_filter(policy):
    """§2.5: converting to private zaps only direct leaves (old-type) or every root (all); to shared only mirror."""
    vm, vmm, gmem, vcpu = _accepted_td(policy=policy)
    vm.set_memory_attributes(4 * MiB, 2 * MiB, 0)
    vcpu.access(4 * MiB, private=False, size=2 * MiB)
    assert vm.stats["pages_2m"] == 1
    before = vm.stats["seamcall_block"]
    vm.set_memory_attributes(2 * MiB, 4 * MiB, PRIVATE)  # [2M, 4M) already private, [4M, 6M) shared
    assert vm.stats["pages_2m"] == 0  # the direct leaf went in both cases
    removed = vm.stats["seamcall_block"] - before
    assert removed == (512 if policy != "6.19" else 0)
    assert vm.sept.state(0x200) == ("free" if policy != "6.19" else "mapped")
    vm.check()


def test_to_shared_conversion_leaves_direct_root_alone():
    """Converting to shared zaps the mirror root only: a shared leaf elsewhere in the range survives."""
    vm, vmm, gmem, vcpu = _accepted_td()
    vm.set_memory_attributes(0x400000, 0x200000, 0)
    vcpu.access(0x400000, private=False)
    zapped = vm.stats["zapped_sptes"]
    vm.set_memory_attributes(0x3FF000, 0x201000, 0)  # covers one private page and the shared 2M
    assert vm.stats["zapped_sptes"] == zapped + 1 and vm.mmu.lookup(0x400) is not None


def test_hole_punch_zaps_mirror_only():
    """A guest_memfd hole punch invalidates private mappings only (§4.7): PAGE.REMOVE, the folio freed."""
    vm, vmm, gmem, vcpu = _accepted_td()
    vm.set_memory_attributes(0, 4096, 0)
    vcpu.access(0, private=False)
    gmem.fallocate(PUNCH, 0, 2 * MiB)
    assert vm.mmu.lookup(0) is not None and not vm.mmu.lookup(0).private
    assert vm.sept.state(1) == "free" and gmem.folio(1) is None and vm.stats["seamcall_remove"] == 512
    vm.check()


def test_gmem_close_zaps_mirror_only():
    """kvm_gmem_release (virt/kvm/guest_memfd.c) zaps the bindings through
    kvm_gmem_invalidate_begin with KVM_FILTER_PRIVATE (no INIT_SHARED; §4.7), as a hole punch
    does: on a TD the mirror root's private leaves go, the direct root's shared leaf stays
    (on a VM with one root the filter selects nothing: kvm_gfn_range_filter_to_root_types)."""
    vm, vmm, gmem, vcpu = _accepted_td()
    vm.set_memory_attributes(0, 4096, 0)
    vcpu.access(0, private=False)
    gmem.close()
    assert vm.mmu.lookup(0) is not None and not vm.mmu.lookup(0).private
    assert vm.mmu.lookup(1) is None and vm.sept.state(1) == "free"


def test_memslot_delete_zaps_both_roots():
    """Deleting a TD memslot zaps its shared and private leaves; S-EPT page tables stay (no RECLAIM)."""
    vm, vmm, gmem, vcpu = _accepted_td()
    vm.set_memory_attributes(0, 4096, 0)
    vcpu.access(0, private=False)
    tables = vm.sept.nr_tables()
    vm.set_user_memory_region2(0, 0, 0, 0)
    assert len(vm.mmu.sptes) == 0 and len(vm.sept.leaves) == 0 and vm.sept.nr_tables() == tables
    vm.check()


# -- tdh_do_no_vcpus: BUSY ---------------------------------------------------------------------


@pytest.mark.parametrize("step", ["block", "track", "remove"])
def test_busy_once_is_retried_with_vcpus_kicked(step):
    """One TDX_OPERAND_BUSY: wait_for_sept_zap, kick every vCPU, retry once; the removal completes."""
    vm, vmm, gmem, vcpu = _accepted_td(nr_vcpus=3)
    vm.tdx.inject_busy(step)
    t = trace(vm)
    vm.set_memory_attributes(0x2000, 4096, 0)
    names = {"block": "TDH.MEM.RANGE.BLOCK", "track": "TDH.MEM.TRACK", "remove": "TDH.MEM.PAGE.REMOVE"}
    seq = [e[0] for e in ops(t)]
    i = seq.index(names[step] + " BUSY")
    assert seq[i + 1:i + 3] == ["kick", names[step]]
    assert vm.sept.state(2) == "free" and not vm.vm_dead and not vm.tdx.wait_for_sept_zap
    assert vm.stats["seamcall_busy"] == 1 and vm.stats["vcpu_kicks"] == 6
    vm.check()


def test_busy_twice_bugs_the_vm_and_leaves_the_page_blocked():
    """BUSY after the retry is a TDX_BUG_ON: the VM is bugged (dead), the S-EPT page stays BLOCKED."""
    vm, vmm, gmem, vcpu = _accepted_td()
    vm.tdx.inject_busy("remove", 2)
    vm.set_memory_attributes(0x2000, 4096, 0)  # the ioctl itself returns 0
    assert vm.vm_bugged and vm.vm_dead and vm.sept.state(2) == "blocked"
    assert vm.events[-1][0] == "kvm_vm_bugged" and "TDH.MEM.PAGE.REMOVE" in vm.events[-1][1]
    vm.check()
    with pytest.raises(pkvm.KvmError, match="KVM_BUG_ON") as exc:
        vm.set_memory_attributes(0x3000, 4096, 0)
    assert exc.value.errno == errno.EIO


def test_busy_aug_retries_the_fault():
    """A busy PAGE.AUG fails the fault with -EBUSY: the mirror SPTE is restored and the fault retried."""
    vm, vmm, gmem, vcpu = td()
    vm.tdx.inject_busy("aug")
    t = trace(vm)
    r = vcpu.page_fault(0x4000, private=True)
    assert r.ret == "retry" and vm.mmu.lookup(4) is None and vm.sept.state(4) == "free"
    assert vcpu.page_fault(0x4000, private=True).ret == "fixed"
    assert [e[0] for e in ops(t)][-2:] == ["TDH.MEM.PAGE.AUG BUSY", "TDH.MEM.PAGE.AUG"]
    assert vm.stats["pf_retry"] == 1 and vm.stats["seamcall_aug"] == 2


def test_busy_sept_add_links_nothing():
    """A busy SEPT.ADD (the walk's first SEAMCALL) retries the fault with no table linked."""
    vm, vmm, gmem, vcpu = td()
    vm.tdx.inject_busy("sept_add")
    assert vcpu.page_fault(0, private=True).ret == "retry" and vm.sept.nr_tables() == 0
    assert vcpu.access(0, private=True).ret == "exit"  # then AUG, then the access kills (not accepted)
    assert vm.sept.nr_tables() == 3


def test_inject_busy_validates():
    """inject_busy names a SEAMCALL and a non-negative count."""
    vm = pkvm.VM("tdx")
    with pytest.raises(ValueError, match="seamcall='tdh' is not one of sept_add, aug"):
        vm.tdx.inject_busy("tdh")
    with pytest.raises(ValueError, match="times=-1"):
        vm.tdx.inject_busy("aug", -1)


# -- S-EPT state and range compression -----------------------------------------------------------


def test_sept_state_is_range_compressed():
    """A 1 GiB TD accepted with one hole is three S-EPT runs and a handful of table runs."""
    vm, vmm, gmem, vcpu = td(GiB)
    g = pkvm.Guest(vm, vmm)
    assert g.accept(0, GiB)
    vm.set_memory_attributes(GiB // 2, 4096, 0)
    assert len(vm.sept.leaves) == 2 and vm.sept.runs(0x1FFFF, 0x20002) == [
        (0x1FFFF, 0x20000, "mapped", 1), (0x20001, 0x20002, "mapped", 1)]
    assert sum(len(t) for t in vm.sept.tables[1:]) == 3 and vm.sept.nr_tables() == 512 + 2
    with pytest.raises(TypeError, match="gfn must be a non-negative int"):
        vm.sept.state(-1)


def test_costs_follow_the_counters():
    """Every SEAMCALL counter is charged through the VM's CostModel (overrides apply)."""
    vm = pkvm.VM("tdx", costs={"seamcall_aug": 7, "vcpu_kick": 11, "seamcall_sept_add": 5})
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    vmm.launch()
    vcpu = vm.vcpus[0]
    vcpu.page_fault(0, private=True)
    cb = vm.cost_breakdown()
    assert cb["seamcall_aug"] == 7 and cb["seamcall_sept_add"] == 15
    assert vm.modeled_ns == sum(cb.values())


def test_check_detects_sept_mirror_disagreement():
    """vm.check() cross-checks the mirror root against the S-EPT."""
    vm, vmm, gmem, vcpu = td()
    vcpu.page_fault(0, private=True)
    vm.sept.leaves.assign(0, 1, 0)  # corrupt: the S-EPT forgets the page
    with pytest.raises(pkvm.InternalInvariantError, match="have no S-EPT leaf"):
        vm.check()


def test_private_fault_on_a_fresh_page_costs_the_measured_row_9():
    """docs/costs.md: a TDX private 4K fault on an unaccepted page is priced at the measured
    tdx_private_fault (row 9, 8 µs): its parts (the EPT violation, PAGE.AUG, the accept and the
    guest_memfd page) add up to it, whether the page is accepted alone or by the Linux loop."""
    vm, vmm, gmem, vcpu = td()
    row9 = vm.costs.ns("tdx_private_fault")
    assert row9 == 8_000
    vcpu.accept(0x4000, pkvm.PG_LEVEL_4K)  # the S-EPT tables exist from here on
    before, ns0 = vm.cost_breakdown(), vm.modeled_ns
    assert vcpu.accept(0x5000, pkvm.PG_LEVEL_4K).status == pkvm.constants.TDX_SUCCESS
    after = vm.cost_breakdown()
    assert vm.modeled_ns - ns0 == row9
    assert {k for k in after if after[k] != before.get(k, 0)} == {"npf_fault", "seamcall_aug", "tdx_accept_4k",
                                                                   "gmem_alloc_4k"}
    vm.check()
