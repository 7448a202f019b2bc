"""SNP page-state changes in run form (``SnpGuestFlows.compress``, ``SnpVcpu._psc_runs``)
against the entry-by-entry path (``SnpVcpu.psc`` with one ``PscEntry`` per 4K or 2M entry):
the same results, counters, modeled time (per actor), attributes, RMP, folios and VMM
bookkeeping on random ranges, including requests the VMM fails (ranges outside every
memslot, docs/performance.md)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.platforms import PLATFORMS

if pkvm.KVM_X86_SNP_VM not in PLATFORMS:  # pragma: no cover
    pytest.skip("the snp VM type is not registered", allow_module_level=True)
from pkvm.platforms._snp_flows import psc_entries, psc_requests
from pkvm.platforms._snp_vcpu import (
    SNP_PAGE_STATE_PRIVATE,
    SNP_PAGE_STATE_SHARED,
    VMGEXIT_PSC_MAX_ENTRY,
    PscDesc,
    PscEntry,
    SnpVcpu,
)

SLOT_PAGES = 3 * 512 + 77  # two memslots with a hole between them: [0, SLOT) and [HOLE_END, ...)
HOLE_END = 4 * 512 + 5
END = HOLE_END + SLOT_PAGES


def _side(policy: str, order: int, compress: bool) -> tuple[pkvm.VM, pkvm.Vmm, pkvm.Guest]:
    pol = pkvm.Policy.preset("6.19").replace(rmp_update=policy, gmem_max_order=order)
    vm = pkvm.VM("snp", policy=pol, shared_backing="4k")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, SLOT_PAGES << 12)
    vmm.add_ram(HOLE_END << 12, SLOT_PAGES << 12)
    guest = pkvm.Guest(vm, vmm)
    guest.flows.compress = compress
    return vm, vmm, guest


def _state(vm: pkvm.VM, vmm: pkvm.Vmm, guest: pkvm.Guest) -> tuple[object, ...]:
    rmp = vm.snp.rmp
    return (dict(vm.stats), vm.modeled_ns, vm.cost_by_actor(), vm.attr_ioctls,
            [vm.get_memory_attributes(g) for g in range(0, END + 8, 7)],
            [tuple(rmp.lookup(vm.hostmem.start_pfn + p)) for p in range(0, 2 * SLOT_PAGES, 13)],
            vmm.conversions, vmm.failed_conversions, vmm.gfns_converted, vmm.last_failure,
            guest.flows.requests)


_range = st.tuples(st.integers(0, END + 600), st.integers(1, 2200))
_op = st.tuples(st.sampled_from(["psc", "convert", "accept"]), _range, st.booleans(), st.booleans())


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["fault-time", "eager-post", "eager-locked", "eager-split"]),
       order=st.sampled_from([0, 9]), ops=st.lists(_op, min_size=1, max_size=6))
def test_run_form_equals_entry_by_entry(policy: str, order: int, ops: list) -> None:
    sides = [_side(policy, order, compress) for compress in (True, False)]
    for kind, (gfn, n), private, huge in ops:
        out = []
        for vm, vmm, guest in sides:
            gpa, size = gfn << 12, n << 12
            try:
                if kind == "psc":
                    with vm.acting(guest.actor):
                        r = guest.flows.page_state_change(gpa, size, private, huge)
                elif kind == "convert":
                    r = guest.convert(gpa, size, private=private)
                else:
                    r = guest.accept(gpa, size, huge=huge)
            except pkvm.KvmError as exc:  # e.g. EBUSY: an earlier failure left the vCPU in an exit
                r = repr(exc)
            out.append((r, _state(vm, vmm, guest), _check(vm)))
        assert out[0] == out[1]


@pytest.mark.parametrize("shared, accept", [((0, 577), (65, 512)), ((0, 1100), (65, 1024)),
                                            ((0, 600), (70, 512)), ((0, 577), (1, 576))])
def test_run_form_charges_posts_walks_as_entry_by_entry(shared, accept) -> None:
    """Requests of 64 4K entries converting shared gfns back to private, from a gfn that is
    not the first of its 2M chunk: POST's 2M test walks each partly covered chunk from its
    first gfn (attr_check_gfn), so a request reaching the next chunk walks differently from
    the ones before it. The replayed stretch took every request of the stretch to walk as
    the first two did (attr_check_gfn 1,533 ns against 1,536; 195 against 7,131 at the
    second case); a stretch now ends with its 2M chunk (Hypothesis found the first case)."""
    out = []
    for compress in (True, False):
        vm, vmm, guest = _side("fault-time", 0, compress)
        with vm.acting(guest.actor):
            guest.flows.page_state_change(shared[0] << 12, shared[1] << 12, False, False)
        r = guest.accept(accept[0] << 12, accept[1] << 12, huge=False)
        out.append((r, _state(vm, vmm, guest)))
    assert out[0] == out[1]


def _check(vm: pkvm.VM) -> str:
    """``vm.check()``'s verdict (raw page-state changes without PVALIDATE can leave states the
    invariants reject; both paths must leave the same)."""
    try:
        vm.check()
    except AssertionError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_a_failed_request_names_the_run_it_stopped_at() -> None:
    """A to-private request whose second run starts in the memslot hole: KVM_SET_MEMORY_ATTRIBUTES
    is never reached (QEMU refuses a gpa in no memslot and stops the VM), the PSC never completes
    and the result names the run's first gpa, on both paths."""
    results = []
    for compress in (True, False):
        vm, vmm, guest = _side("fault-time", 0, compress)
        with vm.acting(guest.actor):
            results.append((guest.flows.page_state_change(3 * 512 << 12, (HOLE_END - 3 * 512) << 12,
                                                          True), dict(vm.stats), vmm.failed_conversions))
    assert results[0] == results[1]
    r = results[0][0]
    assert not r and r.step == "PSC" and r.gpa == 3 * 512 + 512 << 12, r
    assert r.status is None and not r.exit and "in no memslot" in r.detail
    assert results[0][2] == 1


@settings(max_examples=200, deadline=None)
@given(gfn=st.integers(0, 1 << 20), n=st.integers(1, 70_000), huge=st.booleans())
def test_requests_hold_the_entries_of_psc_entries(gfn: int, n: int, huge: bool) -> None:
    """Each request's runs expand to the next VMGEXIT_PSC_MAX_ENTRY entries of psc_entries, and
    adjacent runs of one request never coalesce (they differ in size), so each is one exit."""
    entries = [(e.gfn, e.huge) for e in psc_entries(gfn, gfn + n, SNP_PAGE_STATE_PRIVATE, huge)]
    flat = []
    for runs in psc_requests(gfn, gfn + n, huge):
        count = sum(k for _g, k, _b in runs)
        assert 0 < count <= VMGEXIT_PSC_MAX_ENTRY
        assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))
        for g, k, big in runs:
            flat.extend((g + i * (512 if big else 1), big) for i in range(k))
        if len(flat) < len(entries):
            assert count == VMGEXIT_PSC_MAX_ENTRY
    assert flat == entries


def test_a_tracer_sees_the_same_events_either_way() -> None:
    """With a subscriber attached the flows take the entry-by-entry path; the run form emits
    the same events as ``psc`` with the same entries (a tracer attached while a request is in
    flight sees one stream), and so does a whole page-state change."""
    streams = []
    for compress in (True, False):
        vm, _vmm, guest = _side("eager-post", 9, compress)
        events: list[tuple[object, ...]] = []
        vm.subscribe(lambda ev: events.append((ev.t_ns, ev.actor, ev.kind, ev.gfn_start, ev.gfn_end,
                                               ev.op, ev.count, ev.ns, ev.result, ev.args)))
        with vm.acting(guest.actor):
            guest.flows.page_state_change(5 << 12, 1400 << 12, True)
            vcpu = guest.vcpu
            runs = next(psc_requests(700, 2700))  # 4K run, 2M run: two exits
            if compress:
                r = guest.execute(vcpu._psc_runs(runs, SNP_PAGE_STATE_SHARED, [0]))
            else:
                desc = PscDesc.of([PscEntry(e.gfn, SNP_PAGE_STATE_SHARED, e.huge)
                                   for e in psc_entries(700, 2700, SNP_PAGE_STATE_SHARED)][:VMGEXIT_PSC_MAX_ENTRY])
                r = guest.execute(vcpu.psc(desc))
        streams.append((events, r.ret, r.status, dict(vm.stats), vm.modeled_ns))
    kinds = [ev[2] for ev in streams[0][0]]
    assert kinds.count("vmgexit_enter") >= 2 and kinds.count("userspace_exit") >= 3
    assert streams[0] == streams[1]


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(["fault-time", "eager-post"]), order=st.sampled_from([0, 9]),
       ops=st.lists(st.tuples(_range, st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=5))
def test_flows_pvalidate_equals_the_checked_instruction(policy: str, order: int, ops: list) -> None:
    """The flows' PVALIDATE enters the instruction without re-checking the range Guest checked
    (``SnpVcpu._pvalidate_insn``); the other side goes through ``pvalidate_range`` and its
    checks: the same results and state, page-state changes in between included."""
    def checked(vcpu: SnpVcpu, gfn: int, end: int, validate: bool, huge: bool) -> object:
        return vcpu.pvalidate_range(gfn << 12, (end - gfn) << 12, validate, huge=huge)

    sides = [_side(policy, order, True) for _ in range(2)]
    for (gfn, n), validate, huge, psc_first in ops:
        out = []
        for i, (vm, vmm, guest) in enumerate(sides):
            with pytest.MonkeyPatch.context() as mp:
                if i:
                    mp.setattr(SnpVcpu, "_pvalidate_insn", checked)
                try:
                    with vm.acting(guest.actor):
                        if psc_first:
                            guest.flows.page_state_change(gfn << 12, n << 12, validate, huge)
                        r = guest.flows.pvalidate(gfn << 12, n << 12, validate, huge)
                except pkvm.KvmError as exc:
                    r = repr(exc)
            out.append((r, _state(vm, vmm, guest), _check(vm)))
        assert out[0] == out[1]


def test_flows_pvalidate_checks_what_guest_did_not() -> None:
    """Arguments Guest would have refused still meet pvalidate_range's checks."""
    _vm, _vmm, guest = _side("fault-time", 0, True)
    flows = guest.flows
    with pytest.raises(ValueError, match="does not fit a u64"):
        flows.pvalidate(-4096, 4096, True)
    with pytest.raises(ValueError, match="4 KiB aligned range"):
        flows.pvalidate(0, 100, True)
    with pytest.raises(TypeError, match="validate and huge must be bools"):
        flows.pvalidate(0, 4096, 1)
