"""Beyond upstream: ``Policy.tdx_huge_pages``, the TDX 2M private-mapping series (2M AUG, DEMOTE
before a partial conversion, the per-2M guest-inhibit bit, accept-size mismatch faults)."""

import pytest
from tdxhelpers import PUNCH, MiB, ops, seamcalls, td, trace

import pkvm
from pkvm.constants import TDX_PAGE_SIZE_MISMATCH

K4, M2, G1 = pkvm.PG_LEVEL_4K, pkvm.PG_LEVEL_2M, pkvm.PG_LEVEL_1G
HUGE = "tdx-huge-pages"


def test_2m_accept_augs_one_2m_page():
    """A 2M ACCEPT's EPT violation carries its level: KVM AUGs one 2M page (no PT), the accept succeeds."""
    vm, vmm, gmem, vcpu = td(policy=HUGE)
    t = trace(vm)
    r = vcpu.accept(2 * MiB, M2)
    assert (r.status, r.faults) == (0, 1)
    assert ops(t) == [("TDH.MEM.SEPT.ADD", 0, 1 << 27, 3), ("TDH.MEM.SEPT.ADD", 0, 1 << 18, 2),
                      ("TDH.MEM.PAGE.AUG", 0x200, 0x400, 2)]
    assert vm.sept.state(0x3FF) == "mapped" and vm.sept.level(0x200) == M2 and vm.stats["pages_2m"] == 1
    assert vm.stats["tdx_accepts_4k"] == 512 and vm.cost_breakdown()["seamcall_aug"] == vm.costs.ns("seamcall_aug")
    vm.check()


def test_linux_accept_loop_maps_2m_and_skips_mismatches():
    """tdx_accept_memory over 8 MiB with huge pages: four 2M AUGs, four 2M accepts, no 4K ones."""
    vm, vmm, gmem, vcpu = td(policy=HUGE)
    assert pkvm.Guest(vm, vmm).accept(0, 8 * MiB)
    assert seamcalls(vm) == {"seamcall_sept_add": 2, "seamcall_aug": 4, "seamcall_mr_finalize": 1,
                             "tdcall_accept": 4, "tdx_accepts_4k": 2048}
    assert vm.stats["pages_2m"] == 4


def test_1g_accept_is_capped_at_2m():
    """A 1G ACCEPT faults in a 2M page (the series' maximum), then fails with SIZE_MISMATCH."""
    vm, vmm, gmem, vcpu = td(1 << 30, policy=HUGE)
    r = vcpu.accept(0, G1)
    assert r.status == TDX_PAGE_SIZE_MISMATCH | 2 and vm.sept.level(0) == M2


def test_4k_accept_in_pending_2m_page_demotes_and_inhibits():
    """ACCEPT smaller than a PENDING 2M mapping: the accept-size fault DEMOTEs it and sets the guest-inhibit bit."""
    vm, vmm, gmem, vcpu = td(policy=HUGE, nr_vcpus=2)
    assert vcpu.page_fault(0x200000, private=True).level == M2  # no accept level: KVM maps 2M
    t = trace(vm)
    r = vcpu.accept(0x201000, K4)
    assert (r.status, r.faults) == (0, 1)
    assert ops(t) == [("TDH.MEM.RANGE.BLOCK", 0x200, 0x400, 2), ("TDH.MEM.TRACK", 0x200, 0x400, 2),
                      ("kick", 0x200, 0x400, 0), ("TDH.MEM.PAGE.DEMOTE", 0x200, 0x400, 2)]
    assert vm.sept.state(0x201) == "mapped" and vm.sept.state(0x200) == "pending" and vm.sept.level(0x200) == K4
    assert vm.sept.is_inhibited(0x3FF) and vm.stats["tdx_accept_size_faults"] == 1
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"], vm.stats["huge_page_splits"]) == (0, 512, 1)
    vm.check()


def test_inhibited_chunk_is_never_mapped_2m_again():
    """After a 4K accept in a chunk, later 2M accepts there map 4K and mismatch: no promotion."""
    vm, vmm, gmem, vcpu = td(policy=HUGE)
    assert vcpu.accept(0x400000, K4).status == 0  # 4K accept level: inhibit, map 4K
    assert vm.sept.is_inhibited(0x400)
    g = pkvm.Guest(vm, vmm)
    assert g.convert(0x400000, 4096, private=False) and g.convert(0x400000, 4096, private=True)
    assert vcpu.accept(0x400000, M2).status == TDX_PAGE_SIZE_MISMATCH | 1
    assert vm.stats["pages_2m"] == 0


def test_partial_conversion_of_2m_page_demotes_first():
    """Converting 4K of a MAPPED 2M page to shared: BLOCK/TRACK/DEMOTE the 2M page, then remove the 4K."""
    vm, vmm, gmem, vcpu = td(policy=HUGE)
    assert vcpu.accept(0, M2).status == 0
    t = trace(vm)
    vm.set_memory_attributes(0x5000, 4096, 0)
    assert [e[0] for e in ops(t)] == ["TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "kick", "TDH.MEM.PAGE.DEMOTE",
                                      "TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "kick", "TDH.MEM.PAGE.REMOVE",
                                      "TDH.PHYMEM.PAGE.WBINVD", "clear"]
    assert [e.level for e in t][:5] == [2, 2, 0, 2, 1]
    assert vm.sept.state(5) == "free" and vm.sept.state(6) == "mapped" and vm.stats["pages_4k"] == 511
    vm.check()


def test_partial_hole_punch_demotes_first():
    """A hole punch over part of a 2M private page splits it too; the rest stays mapped."""
    vm, vmm, gmem, vcpu = td(policy=HUGE)
    assert vcpu.accept(0, M2).status == 0
    gmem.fallocate(PUNCH, 0x1000, 0x1000)
    assert vm.stats["seamcall_demote"] == 1 and vm.sept.state(1) == "free" and vm.sept.state(2) == "mapped"
    # The 2M folio stays (a partial punch of a large folio keeps it), so the page can come back.
    assert gmem.folio(1) is not None
    vm.check()


def test_4k_accept_of_mapped_2m_page_is_size_mismatch():
    """ACCEPT smaller than a MAPPED leaf is TDX_PAGE_SIZE_MISMATCH (Table 8.2, leaf present)."""
    vm, vmm, gmem, vcpu = td(policy=HUGE)
    assert vcpu.accept(0, M2).status == 0
    assert vcpu.accept(0x1000, K4).status == TDX_PAGE_SIZE_MISMATCH | 1


@pytest.mark.parametrize("policy", ["6.19", pkvm.Policy.preset("6.19").replace(gmem_max_order=9)],
                         ids=["4k-folios", "2m-folios"])
def test_upstream_never_maps_private_2m(policy):
    """Without the series KVM maps private memory at 4K only, even on 2M folios, and never DEMOTEs."""
    vm, vmm, gmem, vcpu = td(policy=policy)
    g = pkvm.Guest(vm, vmm)
    assert g.accept(0, 8 * MiB) and g.convert(0x5000, 4096, private=False)
    assert vm.stats["pages_2m"] == 0 and vm.stats["seamcall_demote"] == 0 and vm.stats["seamcall_aug"] == 2048
