"""Differential state machine for SNP: the range-compressed model against a per-page twin.

The twin is an SNP :class:`pkvm.VM` whose RMP and direct map are the per-pfn reference tables
of :mod:`pkvm.testing.reference_snp` (behind a small adapter), driven by a guest that issues one
instruction at a time (one PVALIDATE per 4K or 2M block with its own SIZEMISMATCH fallback,
one access per page). The model side uses the range forms (``pvalidate_range``, batched
faults, range RMP operations). Every rule runs on both; the RMP entries, direct map, SPTEs,
attributes, folios, results and the SNP counters must agree, and ``vm.check()`` must pass.
"""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import pkvm

from pkvm import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.platforms.snp_constants import PVALIDATE_FAIL_SIZEMISMATCH, PVALIDATE_SUCCESS
from pkvm.testing.reference_snp import RefDirectMap, RefRmpTable

PAGES = 2048  # 8 MiB of guest RAM: four 2M blocks
COMPARED = ("rmpupdate", "rmpupdate_2m", "psmash", "rmp_fault", "pvalidate", "pvalidate_2m",
            "pvalidate_failures", "directmap_splits", "directmap_unmaps", "directmap_restores",
            "directmap_cpa_calls", "sleep_in_atomic", "rmpupdate_failures", "cache_flush_pages",
            "psc_requests", "hypercall_exits", "gmem_pages_allocated", "gmem_pages_freed",
            "mem_attr_op_failures", "zapped_sptes", "snp_vc")


class RefRmp(RefRmpTable):
    """The per-pfn RMP with the query methods of :class:`pkvm._core.RmpTable`."""

    def _want(self, kw):
        return {k: v for k, v in kw.items() if v is not None}

    def find_ne(self, pfn, npages, **kw):
        return self.find(pfn, npages, False, **self._want(kw))

    def find_eq(self, pfn, npages, **kw):
        return self.find(pfn, npages, True, **self._want(kw))

    def ranges(self, pfn=0, npages=None):
        if npages is None:
            pages = sorted({p for p in self.entries} | {p - p % 512 + i for p in self.entries
                                                         if self.entries[p]["big"] for i in range(512)})
        else:
            pages = range(pfn, pfn + npages)
        out = []
        for p in pages:
            ent = self.lookup(p)
            if out and out[-1][1] == p:
                s, _e, first = out[-1]
                want = first._replace(gpa=first.gpa + (p - s) * 4096 if first.assigned else 0)
                if ent == want:
                    out[-1] = (s, p + 1, first)
                    continue
            out.append((p, p + 1, ent))
        return out

    def _check(self):
        pass


class RefDm(RefDirectMap):
    def is_present(self, pfn):
        return self.level(pfn) != 0

    def _check(self):
        pass


def rmp_state(rmp, pfns):
    return [tuple(rmp.lookup(p)) for p in pfns]


class SnpMachine(RuleBasedStateMachine):
    @initialize(policy=st.sampled_from(["fault-time", "eager-post", "eager-locked", "eager-split"]),
                directmap=st.sampled_from(["split-4k", "unmap-restore"]), order=st.sampled_from([0, 9]))
    def setup(self, policy, directmap, order):
        pol = pkvm.Policy.preset("6.19").replace(rmp_update=policy, directmap=directmap, gmem_max_order=order)
        self.sides = []
        for ref in (False, True):
            vm = pkvm.VM("snp", policy=pol, shared_backing="4k")
            if ref:
                mem = vm.hostmem
                vm.snp.rmp = vm.rmp = RefRmp()
                vm.snp.directmap = vm.directmap = RefDm([(mem.start_pfn, mem.end_pfn)], directmap)
            vmm = pkvm.Vmm(vm)
            vmm.add_ram(0, PAGES << 12)
            guest = pkvm.Guest(vm, vmm)
            self.sides.append((vm, vmm, guest, ref))

    # -- guest operations, per side ----------------------------------------------------------------

    @staticmethod
    def _pval_ref(guest, gfn, end, validate):
        vcpu = guest.vcpu
        while gfn < end:
            if not gfn & 511 and gfn + 512 <= end:
                r = guest.execute(vcpu.pvalidate(gfn << 12, PG_LEVEL_2M, validate))
                if r.ret != "done" or r.status not in (PVALIDATE_SUCCESS, PVALIDATE_FAIL_SIZEMISMATCH):
                    return False
                if r.status == PVALIDATE_FAIL_SIZEMISMATCH:
                    for p in range(gfn, gfn + 512):
                        r = guest.execute(vcpu.pvalidate(p << 12, PG_LEVEL_4K, validate))
                        if r.ret != "done" or r.status:
                            return False
                gfn += 512
            else:
                r = guest.execute(vcpu.pvalidate(gfn << 12, PG_LEVEL_4K, validate))
                if r.ret != "done" or r.status:
                    return False
                gfn += 1
        return True

    def _each(self, model_fn, ref_fn):
        out = [ref_fn(*side) if side[3] else model_fn(*side) for side in self.sides]
        assert out[0] == out[1], out
        return out[0]

    @rule(data=st.data(), private=st.booleans())
    def convert(self, data, private):
        s, e = self._range(data)
        def model(vm, vmm, guest, ref):
            return bool(guest.convert(s << 12, (e - s) << 12, private=private))

        def refside(vm, vmm, guest, ref):
            f = guest.flows
            if private:
                return bool(f.page_state_change(s << 12, (e - s) << 12, True)) and self._pval_ref(guest, s, e, True)
            return self._pval_ref(guest, s, e, False) and bool(f.page_state_change(s << 12, (e - s) << 12, False))

        self._each(model, refside)

    @rule(data=st.data())
    def accept(self, data):
        s, e = self._range(data)

        def model(vm, vmm, guest, ref):
            return bool(guest.accept(s << 12, (e - s) << 12))

        def refside(vm, vmm, guest, ref):
            return bool(guest.flows.page_state_change(s << 12, (e - s) << 12, True)) and self._pval_ref(guest, s, e, True)

        self._each(model, refside)

    @rule(data=st.data(), private=st.booleans(), write=st.booleans())
    def touch(self, data, private, write):
        s, e = self._range(data)

        def model(vm, vmm, guest, ref):
            r = guest.vcpu.access(s << 12, private=private, write=write, size=(e - s) << 12)
            return r.ret, r.pages_done

        def refside(vm, vmm, guest, ref):
            done = 0
            for p in range(s, e):
                r = guest.vcpu.access(p << 12, private=private, write=write)
                if r.ret != "done":
                    return r.ret, done
                done += 1
            return "done", done

        self._each(model, refside)

    @rule(data=st.data(), private=st.booleans())
    def vmm_convert(self, data, private):
        """The VMM converts on its own (implicit conversion, §7.6): attributes + discard/punch."""
        s, e = self._range(data)
        self._each(lambda vm, vmm, g, ref: vmm.convert_memory(s << 12, (e - s) << 12, private),
                   lambda vm, vmm, g, ref: vmm.convert_memory(s << 12, (e - s) << 12, private))

    @rule(data=st.data(), private=st.booleans())
    def set_attributes_only(self, data, private):
        """KVM_SET_MEMORY_ATTRIBUTES without the hole punch (the eager policies' RMP work)."""
        s, e = self._range(data)
        attrs = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        self._each(lambda vm, *a: vm.set_memory_attributes(s << 12, (e - s) << 12, attrs),
                   lambda vm, *a: vm.set_memory_attributes(s << 12, (e - s) << 12, attrs))

    def _range(self, data):
        huge = data.draw(st.booleans())
        if huge:
            a = data.draw(st.integers(0, PAGES // 512 - 1)) * 512
            b = data.draw(st.integers(a // 512 + 1, PAGES // 512)) * 512
            return a, b
        a = data.draw(st.integers(0, PAGES - 1))
        b = data.draw(st.integers(a + 1, min(PAGES, a + 700)))
        return a, b

    # -- comparison --------------------------------------------------------------------------------------

    @invariant()
    def agree(self):
        if not hasattr(self, "sides"):
            return
        (vm, _, _, _), (rv, _, _, _) = self.sides
        assert vm.mmu.sptes.ranges() == rv.mmu.sptes.ranges()
        assert vm._attrs.ranges() == rv._attrs.ranges()
        assert vm._gmems[0].folios.ranges() == rv._gmems[0].folios.ranges()
        lo, hi = vm.hostmem.start_pfn, vm.hostmem.start_pfn + 2 * PAGES
        assert rmp_state(vm.rmp, range(lo, hi)) == rmp_state(rv.rmp, range(lo, hi))
        assert [vm.directmap.level(p) for p in range(lo, hi, 64)] == [rv.directmap.level(p) for p in range(lo, hi, 64)]
        a, b = vm.stats, rv.stats
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
        vm.check()
        rv.check()


TestSnpMachine = SnpMachine.TestCase
TestSnpMachine.settings = settings(settings.default, max_examples=max(10, settings.default.max_examples // 4),
                                   stateful_step_count=12)


def test_ref_adapter_matches_core_on_a_sample():
    """The adapter's range queries agree with the core table on a small mixed table."""
    from pkvm._core import RmpTable

    core, ref = RmpTable(), RefRmp()
    for t in (core, ref):
        t.rmpupdate_range(1024, 512, PG_LEVEL_2M, assigned=True, asid=1, gpa=0)
        t.rmpupdate_range(2048, 5, PG_LEVEL_4K, assigned=True, asid=1, gpa=1 << 21)
        t.pvalidate_range(2049, 2, PG_LEVEL_4K, asid=1, gpa=(1 << 21) + 4096, validate=True)
    for kw in [{"assigned": True}, {"validated": True}, {"level": PG_LEVEL_2M}]:
        assert core.find_ne(1000, 1100, **kw) == ref.find_ne(1000, 1100, **kw)
        assert core.find_eq(1000, 1100, **kw) == ref.find_eq(1000, 1100, **kw)
    got = [(s, e, tuple(x)) for s, e, x in ref.ranges(1000, 1100)]
    assert [(s, e, tuple(x)) for s, e, x in core.ranges(1000, 1100)] == got


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
