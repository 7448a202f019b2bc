"""Exits that repeat one step, answered as one range operation (``pkvm.actors._steps``), against
the per-exit path (``flows.compress_exits = False``): SEV-SNP page-state-change requests and TDX
MapGPA chunks on random ranges over random prior states (mapped, allocated, shared, half
converted, ranges that leave the memslots so that requests fail), without a timeline, on one
(uncontended) and with a second actor running (contended), and with an event subscriber. The
results, counters, modeled time and its breakdown, per-actor clocks, every map of the VM
(attributes, SPTEs, MIXED flags, folios, shared backing, RMP, S-EPT) and the timeline's
figures (critical path, actors, locks, latencies, races) must be identical
(docs/performance.md)."""

from __future__ import annotations

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.platforms import PLATFORMS
from pkvm.sim import Timeline
from vmhelpers import snapshot

if pkvm.KVM_X86_SNP_VM not in PLATFORMS or pkvm.KVM_X86_TDX_VM not in PLATFORMS:  # pragma: no cover
    pytest.skip("the snp / tdx VM types are not registered", allow_module_level=True)

# Two memslots with a hole between them (requests that reach the hole fail when converting to
# private: QEMU finds no memslot). SNP: big enough for stretches of 2M-entry requests (32,768
# pages each); TDX: 2M MapGPA chunks.
SNP_SLOT = 6 * 32768 + 4099
SNP_HOLE_END = SNP_SLOT + 3 * 512 + 7
SNP_END = SNP_HOLE_END + SNP_SLOT
TDX_SLOT = 40 * 512 + 3
TDX_HOLE_END = 48 * 512
TDX_END = TDX_HOLE_END + TDX_SLOT


def _snp_side(policy: str, order: int, backing: str, replay: bool) -> tuple[pkvm.VM, pkvm.Vmm, pkvm.Guest]:
    pol = pkvm.Policy.preset("6.19").replace(rmp_update=policy, gmem_max_order=order)
    vm = pkvm.VM("snp", policy=pol, shared_backing=backing)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, SNP_SLOT << 12)
    vmm.add_ram(SNP_HOLE_END << 12, SNP_SLOT << 12)
    vm.create_vcpu()
    vm.create_vcpu()
    guest = pkvm.Guest(vm, vmm)
    guest.flows.compress_exits = replay
    return vm, vmm, guest


def _tdx_side(policy: str, backing: str, replay: bool) -> tuple[pkvm.VM, pkvm.Vmm, pkvm.Guest]:
    vm = pkvm.VM("tdx", policy=policy, shared_backing=backing)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, TDX_SLOT << 12)
    vmm.add_ram(TDX_HOLE_END << 12, TDX_SLOT << 12)
    vm.create_vcpu()
    vm.create_vcpu()
    vmm.launch([(0, 1 << 20, True)])
    guest = pkvm.Guest(vm, vmm)
    guest.flows.compress_exits = replay
    return vm, vmm, guest


def _state(vm: pkvm.VM, vmm: pkvm.Vmm, guest: pkvm.Guest) -> tuple[object, ...]:
    out = [snapshot(vm), vm.cost_by_actor(), dict(vm.actor_totals()), vm.attr_ioctls, vm.mmu_lock_ns,
           vm.mmu_invalidate_in_progress, vm._shared.iter_runs(), list(vm.events), vm.vm_dead,
           vmm.conversions, vmm.failed_conversions, vmm.gfns_converted, vmm.last_failure,
           vm.hostmem.nr_allocated]
    if vm.platform.name == "snp":
        rmp = vm.snp.rmp
        out += [rmp.ranges(), dict(rmp.counters), guest.flows.requests]
    else:
        sept = vm.tdx.sept
        out += [sept.leaves.ranges(), [t.ranges() for t in sept.tables[1:]], sept.guest_inhibit.ranges(),
                guest.vcpu.map_gpa_next, guest.vcpu.map_gpa_end]
    return tuple(out)


def _do(guest: pkvm.Guest, op: tuple[object, ...]) -> object:
    kind, gfn, n, private, huge = op
    gpa, size = gfn << 12, n << 12
    try:
        if kind == "convert":
            return guest.convert(gpa, size, private=private)
        if kind == "accept":
            return guest.accept(gpa, size, huge=huge or guest.vm.platform.name == "tdx")
        if kind == "touch":
            return guest.touch(gpa, size, private=private, write=True)
        guest.vmm.discard_ram(gpa, size)
        return None
    except (pkvm.KvmError, ValueError) as exc:  # e.g. EBUSY: an earlier failure left the vCPU in an exit
        return repr(exc)


def _run(side: tuple[pkvm.VM, pkvm.Vmm, pkvm.Guest], ops: list, mode: str) -> tuple[object, ...]:
    vm, vmm, guest = side
    results: list[object] = []
    if mode == "none":
        for op in ops:
            results.append((_do(guest, op), _state(vm, vmm, guest)))
        return (results,)
    tl = Timeline(vm, simpy.Environment())
    other = pkvm.Guest(vm, vmm, vm.vcpus[1])

    def main() -> None:
        for op in ops:
            results.append((_do(guest, op), _state(vm, vmm, guest)))

    def noise() -> None:  # a second vCPU touching shared memory at the far end meanwhile
        for i in range(40):
            try:
                other.touch(((TDX_END if vm.platform.name == "tdx" else SNP_END) - 64 + i) << 12, 4096,
                            private=False)
            except pkvm.KvmError as exc:  # the guest killed the VM
                results.append(repr(exc))
                return
            tl.sleep(5_000)

    tl.spawn("vcpu0", main)
    if mode == "contended":
        tl.spawn("vcpu1", noise)
    tl.run()
    return results, tl.result().to_dict()


def _ops(end: int, big: int) -> st.SearchStrategy[list[tuple[object, ...]]]:
    """Conversions, acceptances and discards of up to ``big`` pages, touches of a few pages."""
    ranged = st.tuples(st.sampled_from(["convert", "convert", "accept", "discard"]), st.integers(0, end + 64),
                       st.integers(1, big), st.booleans(), st.booleans())
    touch = st.tuples(st.just("touch"), st.integers(0, end), st.integers(1, 40), st.booleans(), st.booleans())
    return st.lists(st.one_of(ranged, ranged, touch), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(["fault-time", "eager-post", "eager-locked", "eager-split"]),
       order=st.sampled_from([0, 9]), backing=st.sampled_from(["4k", "thp"]),
       mode=st.sampled_from(["none", "timeline", "contended"]), ops=_ops(SNP_END, 3 * 32768))
def test_snp_replay_equals_per_exit(policy: str, order: int, backing: str, mode: str, ops: list) -> None:
    sides = [_run(_snp_side(policy, order, backing, replay), ops, mode) for replay in (True, False)]
    assert sides[0] == sides[1]


@settings(max_examples=25, deadline=None)
@given(policy=st.sampled_from(["6.16", "6.19"]), backing=st.sampled_from(["4k", "thp"]),
       mode=st.sampled_from(["none", "timeline", "contended"]), ops=_ops(TDX_END, 30 * 512))
def test_tdx_replay_equals_per_exit(policy: str, backing: str, mode: str, ops: list) -> None:
    sides = [_run(_tdx_side(policy, backing, replay), ops, mode) for replay in (True, False)]
    assert sides[0] == sides[1]


def _exits(vm: pkvm.VM) -> int:
    return vm.stats["hypercall_exits"]


def test_a_whole_snp_stretch_is_replayed_with_its_exits() -> None:
    """Accepting a fresh 1 GiB slot piece with 2M entries: eight requests of 64 entries, one exit
    each; the replay answers requests 2..6 at once and every figure matches."""
    out = []
    for replay in (True, False):
        vm, vmm, guest = _snp_side("fault-time", 0, "thp", replay)
        calls = []
        orig = vmm._convert_memory  # what the exits and the replay's union run
        vmm._convert_memory = lambda gpa, size, p: calls.append(size) or orig(gpa, size, p)  # type: ignore[method-assign]
        r = guest.accept(0, 6 * 32768 << 12)
        out.append((bool(r), _exits(vm), guest.flows.requests, _state(vm, vmm, guest), len(calls)))
    assert out[0][:4] == out[1][:4]
    assert out[0][1] == 6 and out[0][2] == 6
    assert out[1][4] == 6 and out[0][4] == 4  # two recorded, three replayed as one, the last


def test_a_whole_mapgpa_is_replayed_with_its_exits() -> None:
    """A 38-chunk MapGPA to shared on fresh memory: 38 exits counted, 4 answered one by one."""
    out = []
    for replay in (True, False):
        vm, vmm, guest = _tdx_side("6.19", "thp", replay)
        calls = []
        orig = vmm._convert_memory  # what the exits and the replay's union run
        vmm._convert_memory = lambda gpa, size, p: calls.append(size) or orig(gpa, size, p)  # type: ignore[method-assign]
        r = guest.convert(512 << 12, 38 * 512 << 12, private=False)
        out.append((bool(r), _exits(vm), _state(vm, vmm, guest), len(calls)))
    assert out[0][:3] == out[1][:3]
    assert out[0][0] and out[0][1] == 38
    assert out[1][3] == 38 and out[0][3] == 4


@pytest.mark.parametrize("platform", ["snp", "tdx"])
def test_subscribers_see_every_exit(platform: str) -> None:
    """With a subscriber attached nothing is replayed: the event streams are identical."""
    streams = []
    for replay in (True, False):
        vm, vmm, guest = (_snp_side("fault-time", 0, "thp", replay) if platform == "snp"
                          else _tdx_side("6.19", "thp", replay))
        events: list[tuple[object, ...]] = []
        vm.subscribe(lambda ev: events.append((ev.t_ns, ev.actor, ev.kind, ev.gfn_start, ev.gfn_end,
                                               ev.op, ev.count, ev.ns, ev.result, ev.args)))
        if platform == "snp":
            r = guest.accept(0, 6 * 32768 << 12)
        else:
            r = guest.convert(0, 30 * 512 << 12, private=False)
        streams.append((bool(r), events, _state(vm, vmm, guest)))
    assert streams[0] == streams[1]
    assert [e[2] for e in streams[0][1]].count("userspace_exit") >= 6


def test_an_armed_failure_stops_the_replay() -> None:
    """An xa_reserve failure armed for the 5th ioctl: the replay stays off, the 5th chunk's
    conversion fails (ENOMEM at gfn 0x800), MapGPA ends with INVALID_OPERAND, both paths alike."""
    out = []
    for replay in (True, False):
        vm, vmm, guest = _tdx_side("6.19", "thp", replay)
        vm.inject_failure("xa_reserve", 12, after=4 * 512)
        r = guest.convert(0, 20 * 512 << 12, private=False)
        out.append((r, _state(vm, vmm, guest)))
    assert out[0] == out[1]
    r = out[0][0]
    assert not r and r.step == "MapGPA" and r.errno == 12, r
    assert "xa_reserve failed at gfn 0x800" in r.detail


def _hists(tl: Timeline) -> dict[str, dict[int, int]]:
    return {k: dict(d._hist) for k, d in tl.latency.items()}


def _run_gib(platform: str, replay: bool, ops: list[tuple[object, ...]]) -> tuple[object, ...]:
    """``ops`` on a 3 GiB guest (one vCPU) on a timeline, the replay on or off: per op its
    result and :func:`_state`; then the timeline's figures, every latency sample, and how
    many conversions the VMM ran (fewer with the replay). An op ``("psc", gfn, n, private,
    huge)`` is the page-state change alone (SNP); ops are cut at the guest's end."""
    gib = 1 << 18
    vm = pkvm.VM(platform, policy="6.19" if platform == "tdx" else "fault-time")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 3 * gib << 12)
    vm.create_vcpu()
    if platform == "tdx":
        vmm.launch([(0, 1 << 20, True)])
    guest = pkvm.Guest(vm, vmm)
    guest.flows.compress_exits = replay
    tl = Timeline(vm, simpy.Environment())
    calls: list[int] = []
    orig = vmm._convert_memory  # what the exits and the replay's union run
    vmm._convert_memory = lambda gpa, size, p: calls.append(size) or orig(gpa, size, p)  # type: ignore[method-assign]
    results: list[object] = []

    def main() -> None:
        for kind, gfn, n, private, huge in ops:
            n = min(n, 3 * gib - gfn)  # type: ignore[operator]
            if n <= 0:
                continue
            if kind == "psc":
                with vm.acting(guest.actor):
                    r: object = guest.flows.page_state_change(gfn << 12, n << 12, private, huge)  # type: ignore[operator]
            else:
                r = _do(guest, (kind, gfn, n, private, huge))
            results.append((r, _state(vm, vmm, guest)))

    tl.spawn("vcpu0", main)
    tl.run()
    return results, tl.result().to_dict(), _hists(tl), len(calls)


@pytest.mark.parametrize("platform", ["snp", "tdx"])
def test_across_1g_boundaries(platform: str) -> None:
    """Stretches that cross 1G boundaries (the 1G MIXED flags change at each) on a 3 GiB guest
    with a few pages touched here and there, converted back and forth on a timeline: every map
    (2M and 1G MIXED flags included) and figure as on the per-exit path."""
    gib = 1 << 18
    ops: list[tuple[object, ...]] = [
        ("accept", 256, 3 * gib - 256, True, True), ("touch", gib + 7, 3, True, False),
        ("touch", 2 * gib - 600, 2, True, False),
        ("convert", gib // 2 + 1, 2 * gib, False, False), ("convert", gib - 512, gib + 1024, True, False),
        ("convert", 2 * gib + 512, gib // 4, True, False)]
    on, off = (_run_gib(platform, replay, ops) for replay in (True, False))
    assert on[:3] == off[:3]
    assert all(r or isinstance(r, pkvm.AccessResult) for r, _s in on[0] if r is not None), on[0]


@pytest.mark.parametrize("platform", ["snp", "tdx"])
def test_posts_1g_walk_is_charged_exit_by_exit_in_every_chunk(platform: str) -> None:
    """A 3 GiB conversion from a gfn that is not the first of its 1G chunk (TDX: to shared,
    back to private and to shared again in 2M MapGPA chunks; SNP: made shared, then accepted
    with 4K entries): POST's 1G test
    walks each partly covered 1G chunk from its first 2M sub-chunk (attr_check_2m), so once
    a stretch reaches the next 1G chunk its exits walk further each time. The replay took
    them to walk as the first two (TDX: 29.6 ms of attr_check_2m against 43.3 ms exit by
    exit; SNP: 23 µs against 78.6 ms); a stretch now ends with its 1G chunk."""
    out = []
    for replay in (True, False):
        vm = pkvm.VM(platform, policy="6.19")
        vmm = pkvm.Vmm(vm)
        vmm.add_ram(0, 3 << 30)
        guest = pkvm.Guest(vm, vmm)
        if platform == "tdx":
            vm.tdx.finalize_vm()
        guest.flows.compress_exits = replay
        lo = 0x41000
        if platform == "tdx":
            rs = [guest.convert(lo, (3 << 30) - lo, private=p) for p in (False, True, False)]
        else:  # shared, then accepted again with 4K entries
            with vm.acting(guest.actor):
                rs = [guest.flows.page_state_change(0, 3 << 30, False, False)]
            rs.append(guest.accept(lo, (3 << 30) - lo, huge=False))
        out.append((rs, vm.modeled_ns, vm.cost_by_actor(), dict(vm.stats), vmm.conversions))
    assert out[0] == out[1]


@pytest.mark.parametrize("case", ["tdx-from-chunk-start", "tdx-prefix-walked", "tdx-prefix-stops", "snp-2m-entries",
                                  "snp-4k-entries"])
def test_growing_steps_are_replayed_exactly(case: str) -> None:
    """Stretches whose exits walk further each time: POST's 1G test walks a chunk's 2M
    sub-chunks from its first, so a conversion from a chunk's first gfn (or after a prefix
    already converted, or with 2M-entry requests) walks one exit's worth more at each exit;
    with 4K-entry requests the 2M test walks gfn by gfn the same way. On a timeline (each exit
    adds an ``attr_ioctl`` and an ``exit`` latency sample, growing too) the replay must give
    every figure, map and latency sample of the per-exit path, and must have replayed. The
    control: a prefix whose walk stops before the stretch (every exit the same step)."""
    platform = case.split("-")[0]
    gib = 1 << 18
    ops = {"tdx-from-chunk-start": [("convert", gib, gib + gib // 2, False, False),
                                    ("convert", gib, gib, True, False)],
           "tdx-prefix-walked": [("convert", gib, 512 * 3, False, False),
                                 ("convert", gib + 512 * 3, gib // 2, False, False)],
           "tdx-prefix-stops": [("convert", gib + 512, 512 * 3, False, False),
                                ("convert", gib + 512 * 4, gib // 2, False, False)],
           "snp-2m-entries": [("psc", gib, 2 * gib, False, False),
                              ("accept", gib, gib + 16 * 512, True, True)],
           "snp-4k-entries": [("psc", 2 * gib, 4096, False, False),
                              ("accept", 2 * gib + 1024 + 64, 2048, True, False)]}[case]
    out = [_run_gib(platform, replay, ops) for replay in (True, False)]  # type: ignore[arg-type]
    assert out[0][:3] == out[1][:3]
    assert all(r for r, _s in out[0][0]), out[0][0]
    assert out[0][3] < out[1][3] - 2, (out[0][3], out[1][3])  # some exits were replayed


def _gib_ops(platform: str) -> st.SearchStrategy[list[tuple[object, ...]]]:
    """Operations on a 3 GiB guest over ranges of up to a GiB and a half that start on or near
    1G and 2M boundaries (where the POST walks grow), a few touches between them."""
    gib = 1 << 18
    start = st.builds(lambda c, s, o: c * gib + s * 512 + o, st.integers(0, 2), st.integers(0, 511),
                      st.sampled_from([0, 0, 0, 1, 64, 300]))
    size = st.builds(lambda s, o: s * 512 + o, st.integers(1, 768), st.sampled_from([0, 0, 0, 5, 64]))
    kinds = ["convert", "convert", "accept"] + (["psc"] if platform == "snp" else [])
    ranged = st.tuples(st.sampled_from(kinds), start, size, st.booleans(), st.booleans())
    touch = st.tuples(st.just("touch"), start, st.integers(1, 3), st.booleans(), st.booleans())
    return st.lists(st.one_of(ranged, ranged, touch), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), platform=st.sampled_from(["snp", "tdx"]))
def test_replay_equals_per_exit_where_walks_grow(data: st.DataObject, platform: str) -> None:
    """Random conversions, acceptances and page-state changes on a 3 GiB guest on a timeline,
    over ranges placed where POST's walks grow from exit to exit: the replay (growing steps
    included) and the per-exit path give the same results, maps, figures and latency samples."""
    ops = data.draw(_gib_ops(platform))
    on, off = (_run_gib(platform, replay, ops) for replay in (True, False))
    assert on[:3] == off[:3]
