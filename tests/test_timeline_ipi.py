"""IPI stalls on the timeline (docs/timeline.md, "Interrupts and retries"): who a TLB-flush IPI
reaches, and how much of it a waiting actor's wait absorbs.

- A KVM request (``ipi("vm")``: ``kvm_flush_remote_tlbs``, TDX's removal kicks) sends an IPI
  only to vCPUs in guest mode (virt/kvm/kvm_main.c: kvm_make_vcpu_request,
  kvm_request_needs_ipi). A vCPU waiting for one of the kernel's locks, or asleep, is not in
  guest mode: it takes none, also right after the grant (it is still in the kernel).
- A kernel-range flush (``ipi("host")``: flush_tlb_all of a direct-map split) interrupts every
  CPU, but an actor waiting (for a lock, in a retry spin, asleep) is delayed only by the part of
  the IPI past the moment it would have resumed: ``max(0, T_ipi + ipi - T_wake)``, at most one
  IPI; an IPI after the wake stalls it in full.

Each scenario: vCPU0 takes ``slots_lock`` (vCPU1 then waits for it), works ``w1``, yields, sends
an IPI at its clock ``w1``, works ``w2`` and releases at ``w1 + w2``: vCPU1's wake."""

from __future__ import annotations

from typing import Any

import pytest

import pkvm
from pkvm.sim import Timeline, TimelineResult
from pkvm.sim.recorder import CAT_IPI_STALL, Recorder

from test_timeline_snapshots import _check, _check_monotone


def _vm() -> tuple[Any, Timeline, int, int]:
    vm = pkvm.VM("sw_protected", nr_vcpus=2)
    tl = Timeline(vm, recorder=Recorder())
    return vm, tl, vm.costs.ns("vmexit"), tl._ipi_ns


def _run_pair(tl: Timeline, vcpu0: Any, vcpu1: Any, *, check: bool = True) -> TimelineResult:
    """Run ``vcpu0`` and ``vcpu1`` as the two vCPUs of ``tl`` to the end; the result (checked
    against the snapshot invariants unless ``check`` is False)."""
    tl.spawn("vcpu0", vcpu0)
    tl.spawn("vcpu1", vcpu1)
    tl.run()
    r = tl.result()
    if check:
        _check(r, tl, inside=False, finished=True)
    return r


def _lock_scenario(scope: str, w1: int, w2: int, *, after: int | None = None,
                   snap_every: int = 0) -> tuple[TimelineResult, Timeline, int, int, list[TimelineResult]]:
    """vCPU1 waits for slots_lock while vCPU0, holding it, sends an IPI ``w1`` vmexit prices in,
    ``w2`` before its release. ``after``: instead, the IPI comes ``after`` vmexit prices after
    the release (on vCPU0's clock, before SimPy resumes vCPU1)."""
    vm, tl, ex, ipi = _vm()

    def vcpu0() -> None:
        tl.acquire("slots_lock")
        vm._charge("vmexit", w1)
        tl.sync()  # vCPU1 runs meanwhile and queues for the lock
        if after is None:
            tl.ipi(scope)
        vm._charge("vmexit", w2)
        tl.release("slots_lock")
        if after is not None:
            vm._charge("vmexit", after)
            tl.ipi(scope)
        vm._charge("vmexit", 1)

    def vcpu1() -> None:
        tl.acquire("slots_lock")
        vm._charge("vmexit", 2)
        tl.release("slots_lock")

    snaps: list[TimelineResult] = []
    if snap_every:
        def look() -> Any:
            while True:
                yield tl.env.timeout(snap_every)
                r = tl.result()
                _check(r, tl, inside=False)
                snaps.append(r)
                if r.critical_path_ns < int(tl.env.now):
                    return

        tl.env.process(look())
    r = _run_pair(tl, vcpu0, vcpu1)
    return r, tl, ex, ipi, snaps


def _ipi_slices(tl: Timeline, track: str) -> list[int]:
    rec = tl.recorder
    assert rec is not None
    return [int(e - s) for _n, s, e, cat, _a in rec.iter_slices(track) if cat == CAT_IPI_STALL]


@pytest.mark.parametrize("w2", [0, 1, 10])
def test_a_kvm_request_does_not_interrupt_a_vcpu_waiting_for_a_lock(w2: int) -> None:
    """The remote flush finds vCPU1 in the kernel, queued on slots_lock: no IPI, however close
    to its grant (w2 = 0: the grant comes with the flush; it is still handling its exit)."""
    r, tl, ex, _ipi, _ = _lock_scenario("vm", 5, w2)
    v1 = r.actors["vcpu1"]
    assert v1["ipi_ns"] == 0 and _ipi_slices(tl, "vcpu1") == []
    assert v1["lock_wait_ns"] == v1["wait_ns"] == (5 + w2) * ex
    assert r.critical_path_ns == (5 + w2 + 2) * ex  # vCPU1 runs right after the release


def test_a_host_flush_inside_a_lock_wait_is_absorbed() -> None:
    """flush_tlb_all interrupts vCPU1's CPU while it spins for the lock; the handler is over
    long before the lock comes free: the wait absorbs it, no stall."""
    r, tl, ex, ipi, _ = _lock_scenario("host", 5, 10)
    assert 10 * ex >= ipi  # the IPI ends before the release
    v1 = r.actors["vcpu1"]
    assert v1["ipi_ns"] == 0 and _ipi_slices(tl, "vcpu1") == []
    assert v1["wait_ns"] == v1["lock_wait_ns"] == 15 * ex
    assert r.critical_path_ns == 17 * ex


@pytest.mark.parametrize("w2", [0, 1, 2])
def test_a_host_flush_straddling_the_grant_stalls_for_its_part_past_it(w2: int) -> None:
    """The IPI at T_ipi = w1 ends at w1 + ipi, the lock comes free at T_wake = w1 + w2: vCPU1
    stalls for max(0, T_ipi + ipi - T_wake) = ipi - w2 (before: the whole IPI)."""
    r, tl, ex, ipi, _ = _lock_scenario("host", 5, w2)
    t_ipi, t_wake = 5 * ex, (5 + w2) * ex
    extra = max(0, t_ipi + ipi - t_wake)
    assert 0 < extra <= ipi
    v1 = r.actors["vcpu1"]
    assert v1["ipi_ns"] == extra
    assert v1["lock_wait_ns"] == t_wake
    assert v1["wait_ns"] == t_wake + extra
    assert _ipi_slices(tl, "vcpu1") == [extra]
    assert r.critical_path_ns == t_wake + extra + 2 * ex
    assert r.actors["vcpu0"]["ipi_ns"] == 0  # the sender is not interrupted by its own flush


@pytest.mark.parametrize("scope", ["vm", "host"])
def test_an_ipi_after_the_grant_stalls_in_full_if_it_interrupts(scope: str) -> None:
    """vCPU0 releases, works on and flushes before SimPy resumes vCPU1: by vCPU0's clock the
    flush comes after vCPU1's grant. A host flush then interrupts it in full, as before; a
    KVM request finds it still in the kernel, handling the exit the lock was part of."""
    r, tl, _ex, ipi, _ = _lock_scenario(scope, 5, 3, after=4)
    want = ipi if scope == "host" else 0
    assert r.actors["vcpu1"]["ipi_ns"] == want
    assert _ipi_slices(tl, "vcpu1") == ([want] if want else [])


def test_a_partly_absorbed_ipi_keeps_mid_run_results_consistent() -> None:
    """Results taken every 100 ns of the straddling scenario: the identities hold, nothing goes
    back, and the last equals the final result."""
    r, _tl, _ex, _ipi, snaps = _lock_scenario("host", 5, 1, snap_every=100)
    assert len(snaps) > 20
    _check_monotone(snaps + [r])
    assert snaps[-1].to_dict() == r.to_dict()


@pytest.mark.parametrize("scope", ["vm", "host"])
def test_a_retry_spin_absorbs_an_ipi(scope: str) -> None:
    """vCPU1 spins (re-faulting: in and out of guest mode) until vCPU0 changes state. A flush
    that ends before the spin would have ended costs it nothing; one that runs past it, its
    part past it."""
    for w2, extra in ((10, 0), (1, None)):
        vm, tl, ex, ipi = _vm()

        def vcpu0(w2: int = w2) -> None:
            vm._charge("vmexit", 5)
            tl.sync()
            tl.ipi(scope)
            vm._charge("vmexit", w2)
            tl.sync()
            tl.changed()

        def vcpu1() -> None:
            assert tl.wait_changed("rmp_npf_loop")
            vm._charge("vmexit", 1)

        r = _run_pair(tl, vcpu0, vcpu1)
        want = max(0, ipi - w2 * ex) if extra is None else extra
        v1 = r.actors["vcpu1"]
        assert v1["spin_ns"] == (5 + w2) * ex
        assert v1["ipi_ns"] == want, (w2, v1)
        assert r.critical_path_ns == (5 + w2 + 1) * ex + want


def test_a_sleeping_actor_takes_no_kvm_request_and_absorbs_a_host_flush() -> None:
    """An actor asleep in its task (Timeline.sleep) is off its CPU: a KVM request sends it no
    IPI, and a host flush delays it only past its wake-up."""
    for scope, w1, sleep_ns, want in (("vm", 1, 1_000, 0), ("host", 1, 10_000, 0), ("host", 1, 1_000, None)):
        vm, tl, ex, ipi = _vm()

        def vcpu0(w1: int = w1, scope: str = scope) -> None:
            vm._charge("vmexit", w1)
            tl.sync()
            tl.ipi(scope)

        def vcpu1(sleep_ns: int = sleep_ns) -> None:
            tl.sleep(sleep_ns)
            vm._charge("vmexit", 1)

        r = _run_pair(tl, vcpu0, vcpu1)
        if want is None:
            want = w1 * ex + ipi - sleep_ns
        assert want >= 0
        assert r.actors["vcpu1"]["ipi_ns"] == want, (scope, sleep_ns, r.actors["vcpu1"])


def _running(platform: str, scope: str, pvalidates: int, exits: int) -> tuple[TimelineResult, int, int, int]:
    """vCPU1 works (``pvalidates`` PVALIDATEs, guest code, and ``exits`` vmexit prices, host
    code, in one stretch) while vCPU0 sends an IPI of ``scope``."""
    vm = pkvm.VM(platform, nr_vcpus=2)
    tl = Timeline(vm)
    ex, ipi = vm.costs.ns("vmexit"), tl._ipi_ns

    def vcpu0() -> None:
        vm._charge("vmexit", 1)
        tl.sync()
        tl.ipi(scope)

    def vcpu1() -> None:
        if pvalidates:
            vm._charge("pvalidate_4k", pvalidates)
        vm._charge("vmexit", exits)
        tl.sync()

    r = _run_pair(tl, vcpu0, vcpu1, check=False)
    return r, ex, ipi, pvalidates * vm.costs.ns("pvalidate_4k")


def test_a_running_vcpu_takes_a_kernel_flush_in_full() -> None:
    """A kernel-range flush interrupts every CPU: a vCPU that is not waiting (here: running host
    code) stalls for the whole IPI."""
    r, ex, ipi, _pv = _running("sw_protected", "host", 0, 20)
    assert r.actors["vcpu1"]["ipi_ns"] == ipi
    assert r.critical_path_ns == 20 * ex + ipi


def test_a_kvm_request_interrupts_a_running_vcpu_as_often_as_it_is_in_guest_mode() -> None:
    """A KVM request sends an IPI only to a vCPU in guest mode (virt/kvm/kvm_main.c:
    kvm_request_needs_ipi): a vCPU running host code (an exit's handling) takes none and finds
    the request at its next entry; one running guest code (PVALIDATE) takes it in full; one
    whose stretch of work mixes the two stalls for the IPI times the stretch's share of guest
    code. (Until 2026-12-05 every running vCPU stalled in full.)"""
    r, ex, ipi, _pv = _running("sw_protected", "vm", 0, 20)
    assert r.actors["vcpu1"]["ipi_ns"] == 0
    assert r.critical_path_ns == 20 * ex
    r, ex, ipi, pv = _running("snp", "vm", 40, 0)
    assert r.actors["vcpu1"]["ipi_ns"] == ipi
    r, ex, ipi, pv = _running("snp", "vm", 40, 20)
    assert r.actors["vcpu1"]["ipi_ns"] == round(ipi * pv / (pv + 20 * ex))
    assert 0 < r.actors["vcpu1"]["ipi_ns"] < ipi
