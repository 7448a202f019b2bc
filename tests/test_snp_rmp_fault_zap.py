"""The zap range of ``sev_handle_rmp_fault`` (arch/x86/kvm/svm/sev.c): after a PSMASH, 6.11+
zaps ``[gfn, gfn + PTRS_PER_PMD)`` from the faulting gfn itself, as RFC v7 and v8 already did;
``Policy.rmp_fault_zap="2m-aligned"`` (no preset) keeps the 2M-aligned range of the June 2022
"Part2 v6" handler (docs/snp.md)."""

import pytest
from vmhelpers import UADDR

import pkvm
from pkvm import PG_LEVEL_2M, PG_LEVEL_4K

MiB = 1 << 20


def _mixed_2m_chunk(policy):
    """A 2M folio under one 2M RMP entry; the chunk made mixed, then gfns 2..9 faulted in at 4K
    and the next chunk (one 2M leaf at gfn 512). Returns (vm, vcpu, pfn of gfn 0)."""
    vm = pkvm.VM("snp", policy=policy)
    gm = vm.create_guest_memfd(4 * MiB)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, userspace_addr=UADDR, guest_memfd=gm)
    vm.set_memory_attributes(0, 4 * MiB, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    v = vm.create_vcpu()
    f = v.page_fault(0, private=True)
    assert f.level == PG_LEVEL_2M and vm.rmp.lookup(f.pfn).level == PG_LEVEL_2M
    vm.set_memory_attributes(0x1000, 0x1000, 0)  # gfn 1 shared: the first chunk is mixed
    for g in range(2, 10):
        assert v.page_fault(g << 12, private=True).ret == "fixed"
    assert v.page_fault(512 << 12, private=True).level == PG_LEVEL_2M  # the next chunk: one 2M leaf
    assert vm.mmu.lookup(2).level == PG_LEVEL_4K
    return vm, v, f.pfn


def _mapped(vm, gfns):
    return [g for g in gfns if vm.mmu.lookup(g) is not None]


@pytest.mark.parametrize("policy", ["6.19+gmem_max_order=9", "6.11+gmem_max_order=9",
                                    "6.16+gmem_max_order=9"])
def test_rmp_fault_zaps_from_the_faulting_gfn(policy):
    """4K NPT leaf over the 2M RMP entry: the access at gfn 5 takes an RMP #NPF; PSMASH, then
    kvm_zap_gfn_range(gfn 5, gfn 5 + 512): gfns 2..4 keep their leaves, 5..9 and the next
    chunk's 512..515 (inside [5, 517)) lose them."""
    vm, v, pfn = _mixed_2m_chunk(policy)
    assert pkvm.Policy.preset(policy.split("+")[0]).rmp_fault_zap == "from-gfn"
    r = v.access(5 << 12, private=True)
    assert r.ret == "vc"  # after PSMASH + zap + refault: a 4K entry, not validated
    assert vm.stats["psmash"] == 1 and vm.rmp.lookup(pfn).level == PG_LEVEL_4K
    assert _mapped(vm, range(2, 10)) == [2, 3, 4, 5]  # 5 was faulted in again by the refault
    assert _mapped(vm, range(512, 516)) == []
    vm.check()


def test_rfc_v8_zaps_from_the_faulting_gfn():
    """RFC v8's handler ("[PATCH RFC v8 44/56] KVM: SVM: Add support to handle the RMP nested
    page fault", M. Roth, 20 Feb 2023) sets gfn = gpa >> PAGE_SHIFT and zaps [gfn, gfn +
    PTRS_PER_PMD), as 6.11+ does; only the pre-guest_memfd "Part2 v6" handler (June 2022)
    rounded the gfn down to 2M. The rfc-v8 preset said "2m-aligned" until 2026-12-07."""
    assert pkvm.Policy.preset("rfc-v8").rmp_fault_zap == "from-gfn"
    assert all(pkvm.Policy.preset(p).rmp_fault_zap == "from-gfn" for p in pkvm.Policy.presets())


def test_2m_aligned_zap_rounds_the_gfn_down():
    """rmp_fault_zap="2m-aligned" rounds the gfn down to 2M: [0, 512) is zapped, the next chunk
    is not."""
    vm, v, pfn = _mixed_2m_chunk("6.19+gmem_max_order=9+rmp_fault_zap=2m-aligned")
    assert v.access(5 << 12, private=True).ret == "vc"
    assert _mapped(vm, range(2, 10)) == [5]
    assert _mapped(vm, range(512, 516)) == [512, 513, 514, 515]
    vm.check()


def test_rmp_fault_zap_is_one_invalidation_under_mmu_lock():
    """kvm_zap_gfn_range (arch/x86/kvm/mmu/mmu.c) takes mmu_lock for write and brackets the zap
    and its flush with one invalidation: mmu_invalidate_seq moves by one, and on the timeline
    the zap is work under mmu_lock held for write (before, it ran with no lock and no
    invalidation, so a concurrent fault could not see it)."""
    from pkvm.sim import Timeline

    vm, v, _pfn = _mixed_2m_chunk("6.19+gmem_max_order=9")
    seq = vm.stats["mmu_invalidate_seq"]
    held = vm.mmu_lock_ns
    tl = Timeline(vm)
    out = {}
    tl.spawn("vcpu0", lambda: out.setdefault("r", v.access(5 << 12, private=True)))
    tl.run()
    assert out["r"].ret == "vc"
    assert vm.stats["mmu_invalidate_seq"] == seq + 1
    assert vm.mmu_invalidate_in_progress == 0
    assert tl.locks["mmu_lock"].stats.hold_write_ns > 0
    assert vm.mmu_lock_ns > held
    vm.check()


def test_rmp_fault_trace_level_after_a_failed_psmash(monkeypatch):
    """After a failed PSMASH, sev_handle_rmp_fault (arch/x86/kvm/svm/sev.c) looks the entry up
    again into the same rmp_level its trace point prints: when another CPU split the entry
    first (the lookup finds it 4K and assigned) kvm_rmp_fault says 4K, with no zap. The model
    printed the first lookup's 2M. Another CPU's PSMASH is stood in for by a PSMASH that splits
    and then reports failure, as the losing CPU's instruction would (the entry is no longer 2M)."""
    import pkvm.platforms.snp as snp_mod
    from pkvm.platforms.snp_constants import PSMASH_FAIL_INPUT

    vm, v, pfn = _mixed_2m_chunk("6.19+gmem_max_order=9")
    real = snp_mod.psmash

    def lost_race(vm_, p):
        assert real(vm_, p) == 0  # the other CPU's PSMASH
        return PSMASH_FAIL_INPUT  # ours then finds a 4K entry

    monkeypatch.setattr(snp_mod, "psmash", lost_race)
    events = []
    vm.subscribe(events.append, kinds="rmp_fault")
    before = _mapped(vm, range(2, 10))
    v.access(5 << 12, private=True)
    traced = [e.args for e in events]
    assert traced and traced[0][5] == PG_LEVEL_4K and traced[0][6] == PSMASH_FAIL_INPUT
    assert _mapped(vm, range(2, 10)) == before  # resolved: nothing zapped
    vm.check()
