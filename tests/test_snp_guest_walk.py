"""The SNP guest's PVALIDATE range walk (``SnpVcpu.pvalidate_range``, the typed core's
``pkvm/_snp_guest.pxi``) against the instructions it stands for, one by one.

The reference is Linux's ``pvalidate_pages`` written out: a 2M PVALIDATE for every 2M-aligned
block the guest takes at 2M (``huge``), redone as 512 x 4K PVALIDATEs on ``FAIL_SIZEMISMATCH``,
a 4K PVALIDATE elsewhere, stopping at the first instruction that does not succeed; each
instruction is ``SnpVcpu.pvalidate``, re-executed after its #NPF exits are answered. Between
the walks, the two VMs go through the same discards, conversions and page-state changes, to
private and to shared, so leaves, folios, attributes and RMP entries are in every mix of states
(a PVALIDATE of a page with shared attributes takes one #NPF that exits to the VMM, which
converts the page; the walk must take that fault once, as the instruction does). Both sides
must end with the same outcome, counters, modeled time and RMP.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.constants import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.platforms.snp_constants import PVALIDATE_FAIL_SIZEMISMATCH, PVALIDATE_SUCCESS

PAGES = 4096  # one 16 MiB memslot


def _side(policy: str, order: int) -> tuple[pkvm.VM, pkvm.Vmm, pkvm.Guest]:
    pol = pkvm.Policy.preset("6.19").replace(rmp_update=policy, gmem_max_order=order)
    vm = pkvm.VM("snp", policy=pol, shared_backing="4k")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, PAGES << 12)
    return vm, vmm, pkvm.Guest(vm, vmm)


def _insn(vmm: pkvm.Vmm, vcpu: pkvm.Vcpu, gfn: int, level: int, validate: bool) -> object:
    r = vcpu.pvalidate(gfn << 12, level, validate)  # type: ignore[attr-defined]
    while r.ret == "exit" and vmm.handle_exit(vcpu, r):
        r = vcpu.run()
    return r


def _one_by_one(vmm: pkvm.Vmm, vcpu: pkvm.Vcpu, gfn: int, end: int, validate: bool,
                huge: bool) -> tuple[object, ...]:
    while gfn < end:
        if huge and not gfn & 511 and gfn + 512 <= end:
            r = _insn(vmm, vcpu, gfn, PG_LEVEL_2M, validate)
            if r.ret == "done" and r.status == PVALIDATE_FAIL_SIZEMISMATCH:  # type: ignore[attr-defined]
                for g in range(gfn, gfn + 512):
                    r = _insn(vmm, vcpu, g, PG_LEVEL_4K, validate)
                    if r.ret != "done" or r.status != PVALIDATE_SUCCESS:  # type: ignore[attr-defined]
                        return (r.ret, r.status, g)  # type: ignore[attr-defined]
            elif r.ret != "done" or r.status != PVALIDATE_SUCCESS:  # type: ignore[attr-defined]
                return (r.ret, r.status, gfn)  # type: ignore[attr-defined]
            gfn += 512
        else:
            r = _insn(vmm, vcpu, gfn, PG_LEVEL_4K, validate)
            if r.ret != "done" or r.status != PVALIDATE_SUCCESS:  # type: ignore[attr-defined]
                return (r.ret, r.status, gfn)  # type: ignore[attr-defined]
            gfn += 1
    return ("done", PVALIDATE_SUCCESS, end)


def _range_form(vmm: pkvm.Vmm, vcpu: pkvm.Vcpu, gfn: int, end: int, validate: bool,
                huge: bool) -> tuple[object, ...]:
    r = vcpu.pvalidate_range(gfn << 12, (end - gfn) << 12, validate, huge=huge)  # type: ignore[attr-defined]
    while r.ret == "exit" and vmm.handle_exit(vcpu, r):
        r = vcpu.run()
    return (r.ret, r.status, None if r.value is None else r.value >> 12)  # the gpa reached


_range = st.tuples(st.integers(0, PAGES - 1), st.sampled_from([1, 5, 511, 512, 600, 1024, 1100]))
_op = st.tuples(st.sampled_from(["pvalidate", "psc", "discard", "convert"]), _range, st.booleans(),
                st.booleans(), st.booleans())


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(["fault-time", "eager-post", "eager-locked", "eager-split"]),
       order=st.sampled_from([0, 9]), ops=st.lists(_op, min_size=1, max_size=10))
def test_pvalidate_range_is_its_instructions_one_by_one(policy: str, order: int, ops: list) -> None:
    sides = [_side(policy, order) for _ in range(2)]
    for kind, (gfn, n), validate, huge, private in ops:
        end = min(gfn + n, PAGES)
        out = []
        for i, (vm, vmm, guest) in enumerate(sides):
            with vm.acting(guest.actor):
                if kind == "pvalidate":
                    res: object = (_one_by_one if i else _range_form)(vmm, guest.vcpu, gfn, end, validate, huge)
                elif kind == "psc":
                    res = bool(guest.flows.page_state_change(gfn << 12, (end - gfn) << 12, private, huge))  # type: ignore[attr-defined]
                elif kind == "discard":
                    res = vmm.discard_ram(gfn << 12, (end - gfn) << 12)
                else:
                    res = vmm.convert_memory(gfn << 12, (end - gfn) << 12, private)
            rmp = vm.snp.rmp  # type: ignore[attr-defined]
            out.append((res, dict(vm.stats), vm.modeled_ns, vm.cost_by_actor(),
                        rmp.ranges(vm.hostmem.start_pfn, PAGES + 1024)))
        assert out[0] == out[1], (kind, gfn, end, validate, huge, private)


def test_pvalidate_of_a_shared_page_takes_one_fault() -> None:
    """The named case: a 4K page converted to shared, then rescinded by the range walk. The
    instruction's #NPF (private access, shared attributes) exits once with the memory-fault
    triple; the VMM converts the page and the re-executed PVALIDATE finds it unvalidated."""
    vm, vmm, guest = _side("fault-time", 0)
    vcpu = guest.vcpu
    with vm.acting(guest.actor):
        vmm.convert_memory(100 << 12, 1 << 12, False)
        before = dict(vm.stats)
        r = vcpu.pvalidate_range(100 << 12, 1 << 12, False, huge=False)  # type: ignore[attr-defined]
        assert (r.ret, r.memory_fault, r.faults) == ("exit", (100 << 12, 4096, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE), 1)
        assert vmm.handle_exit(vcpu, r)
        r = vcpu.run()
        delta = {k: v - before.get(k, 0) for k, v in vm.stats.items() if v != before.get(k, 0)}
    assert (r.ret, r.value) == ("done", 100 << 12)
    assert delta["memory_fault_exits"] == 1 and delta["pf_taken"] == 2, delta
