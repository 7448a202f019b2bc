"""Timeline.result() at any moment of a run (docs/timeline.md, "Results mid-run"): a snapshot up to
now in which every actor's time adds up, nothing is negative and work in progress counts up to
now; taking one changes nothing. And the accounting identities of a finished run's result."""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm import experiments
from pkvm.experiments import workloads
from pkvm.sim import Timeline, TimelineResult
from pkvm.sim.recorder import Recorder

M = 1 << 20

_SMALL_OPTS = {"swiotlb": {"ops": "60"}, "mixed": {"ops": "60"}, "virtio": {"cycles": "3"},
               "balloon": {"cycles": "1"}, "migration": {}, "boot": {}}


#: The holds of one lock never overlap (test_a_lock_is_never_held_by_two_actors_at_once).
_OVERLAPPING_HOLDS = False


def _figures(r: TimelineResult) -> dict[str, Any]:
    return r.to_dict()


def _check(r: TimelineResult, tl: Timeline, *, inside: bool, finished: bool = False) -> None:
    """The identities every result satisfies, mid-run or at the end."""
    crit = r.critical_path_ns
    env_ns = int(tl.env.now - tl._t0)
    assert crit >= 0
    if inside:  # from an actor's code: that actor's clock
        assert crit == tl.now_ns >= env_ns
    else:
        assert crit <= env_ns
    busy = 0
    for name, a in r.actors.items():
        for k, v in a.items():
            assert v >= 0, (name, k, v, r.actors)
        assert a["busy_ns"] + a["wait_ns"] + a["idle_ns"] == crit, (name, a, crit)
        assert a["wait_ns"] == a["lock_wait_ns"] + a["ipi_ns"] + a["spin_ns"], (name, a)
        busy += a["busy_ns"]
    assert busy <= tl.vm.modeled_ns
    busy_and_stalled = sum(a["busy_ns"] + a["wait_ns"] for a in r.actors.values())
    lock_waits = 0
    for name, lk in r.locks.items():
        for k, v in lk.items():
            assert v >= 0, (name, k, v)
        # Every hold lies in its holder's busy or stalled time; that the holds of one lock never
        # overlap (hold_ns <= crit) is test_a_lock_is_never_held_by_two_actors_at_once's.
        assert lk["hold_ns"] <= busy_and_stalled, (name, lk, busy_and_stalled)
        # An interleaved pagewise lock's holds (cpa_lock, the S-EPT: docs/timeline.md) stand for
        # page holds spread over their windows, whose waits come at the windows' ends: mid-run
        # they may overlap; at the end the lock's capacity holds them (its windows' waits).
        if not _OVERLAPPING_HOLDS and (finished or not tl.locks[name].interleaved):
            assert lk["hold_ns"] <= crit, (name, lk, crit)
        if "hold_write_ns" in lk:
            assert lk["hold_write_ns"] <= lk["hold_ns"], (name, lk)
            assert (lk["hold_ns"] == 0) == (lk["hold_write_ns"] + lk["hold_read_ns"] == 0), (name, lk)
        assert lk["waits"] <= lk["acquisitions"], (name, lk)
        assert (lk["waits"] == 0) == (lk["wait_ns"] == 0), (name, lk)
        assert lk["wait_p50_ns"] <= lk["wait_p99_ns"] <= lk["wait_max_ns"] <= lk["wait_ns"], (name, lk)
        lock_waits += lk["wait_ns"]
    actor_lock_waits = sum(a["lock_wait_ns"] for a in r.actors.values())
    assert lock_waits <= actor_lock_waits  # a lock counts a wait at its grant, an actor up to now
    if finished:
        assert lock_waits == actor_lock_waits
    for k, v in r.races.items():
        assert v >= 0, (k, v)
    for kind, d in r.latency_ns.items():
        assert d["count"] >= 0 and 0 <= d["p50"] <= d["p99"] <= d["max"], (kind, d)


def _check_monotone(rs: list[TimelineResult]) -> None:
    """Snapshots taken at SimPy times, in order: nothing counted goes back."""
    for a, b in zip(rs, rs[1:]):
        assert a.critical_path_ns <= b.critical_path_ns
        for name, fa in a.actors.items():
            fb = b.actors[name]
            for k in ("busy_ns", "wait_ns", "lock_wait_ns", "ipi_ns", "spin_ns"):
                assert fa[k] <= fb[k], (name, k, fa, fb)
        for name, la in a.locks.items():
            lb = b.locks[name]
            for k in ("hold_ns", "wait_ns", "waits", "acquisitions"):
                assert la[k] <= lb[k], (name, k, la, lb)
        for kind, d in a.latency_ns.items():
            assert d["count"] <= b.latency_ns[kind]["count"]
        for k, v in a.races.items():
            assert v <= b.races[k]


def _run(cfg: experiments.Config, seed: int, at: list[int], *, take: bool = True,
         inside_every: int = 0, record: bool = False,
         probe: Callable[[TimelineResult], object] | None = None) -> tuple[TimelineResult, dict[str, int], list[TimelineResult], Timeline]:
    """``cfg``'s workload on the timeline as ``experiments.run`` runs it, with a process of the
    embedder's own that wakes at each of the SimPy times ``at`` and (``take``) takes a result
    there. ``inside_every``: also take one from the actors' code at every ``inside_every``-th
    event the model emits (a subscriber, which runs on the actor that emits), and pass it to
    ``probe``. ``record``: with a
    recorder (every visibility point yields)."""
    wl = workloads.get(cfg.workload)
    opts = workloads.parse_options(wl, cfg.options)
    vm, ctx = experiments._build(cfg, seed, None)
    tl = Timeline(vm, host_cpus=cfg.host_cpus, recorder=Recorder() if record else None,
                  batch_pages=cfg.batch_pages_used, pagewise_locks=cfg.pagewise_locks)
    ctx.timeline = tl
    for g in ctx.guests:
        tl.start_vcpu(g.actor)
    snaps: list[TimelineResult] = []

    def main_loop() -> None:
        wl.run(ctx, **opts)
        tl.stop()

    def monitor() -> Any:
        for t in sorted(at):
            if t > tl.env.now:
                yield tl.env.timeout(t - tl.env.now)
            if take:
                r = tl.result()
                _check(r, tl, inside=False)
                snaps.append(r)

    if at:
        tl.env.process(monitor())
    if inside_every:
        n = [0]

        def inside(_ev: Any) -> None:
            n[0] += 1
            if tl.current is not None and n[0] % inside_every == 0:
                x = tl.result()
                _check(x, tl, inside=True)
                if probe is not None:
                    probe(x)

        vm.subscribe(inside)
    tl.spawn("vmm", main_loop)
    tl.run()
    r = tl.result()
    _check(r, tl, inside=False, finished=True)
    return r, ctx.counters(), snaps, tl


def _config(platform: str, workload: str, vcpus: int, pick: int) -> experiments.Config:
    pols = experiments.PLATFORM_POLICIES[platform]
    return experiments.Config(platform=platform, memory="128M", workload=workload, policy=pols[pick % len(pols)],
                              vcpus=vcpus, options=_SMALL_OPTS[workload])


def _two_guests() -> tuple[pkvm.VM, pkvm.Guest, pkvm.Guest, simpy.Environment, Timeline]:
    """A SW_PROTECTED VM with 64M of RAM, two guests (one per vCPU) and a timeline on its own
    SimPy environment."""
    vm = pkvm.VM("sw_protected", nr_vcpus=2)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 64 * M)
    g0, g1 = (pkvm.Guest(vm, vmm, vm.create_vcpu()) for _ in range(2))
    env = simpy.Environment()
    return vm, g0, g1, env, Timeline(vm, env)


# -- the regression: negative idle mid-run -------------------------------------------------------


def test_result_mid_run_counts_work_in_progress_up_to_now_not_negative_idle() -> None:
    """The docs' embedding example, looked at 1 µs in: vCPU0 is 1 µs into an 18 ms batch of
    faults. Its busy time was counted for the whole batch when the batch started, so the old
    result reported an idle time of -18 ms; it is 1 µs of work, no idle."""
    vm, g0, g1, env, tl = _two_guests()
    seen: list[TimelineResult] = []

    def look() -> Any:
        yield env.timeout(1000)
        seen.append(tl.result())

    env.process(look())
    tl.spawn("vcpu0", lambda: g0.touch(0, 32 * M, private=True))
    tl.spawn("vcpu1", lambda: g1.convert(32 * M, 8 * M, private=False))
    env.run()
    (r,) = seen
    assert r.critical_path_ns == 1000
    assert r.actors["vcpu0"] == {"busy_ns": 1000, "wait_ns": 0, "idle_ns": 0, "lock_wait_ns": 0, "ipi_ns": 0,
                                 "spin_ns": 0}
    assert r.actors["vcpu1"]["busy_ns"] == 1000 and r.actors["vcpu1"]["idle_ns"] == 0
    _check(r, tl, inside=False)
    end = tl.result()
    assert end.critical_path_ns == 18023900 and end.actors["vcpu0"]["busy_ns"] == 18023900


def test_result_mid_run_counts_a_lock_wait_in_progress() -> None:
    """vCPU1 waits for slots_lock, which vCPU0's conversion holds: half-way through the wait,
    the wait so far is a stall (it was idle time), and the open hold counts up to now."""
    vm, g0, g1, env, tl = _two_guests()
    tl.spawn("vcpu0", lambda: g0.convert(0, 32 * M, private=False))
    tl.spawn("vcpu1", lambda: g1.convert(32 * M, 32 * M, private=False))
    seen: list[tuple[int, TimelineResult]] = []

    def look() -> Any:
        waiting = False
        while True:
            yield env.timeout(250)
            if tl.locks["slots_lock"].waiting:
                if waiting:  # at least 250 ns into the wait
                    seen.append((int(env.now), tl.result()))
                    return
                waiting = True

    env.process(look())
    env.run()
    assert seen, "vCPU1 never waited for slots_lock"
    t, r = seen[0]
    _check(r, tl, inside=False)
    v1 = r.actors["vcpu1"]
    assert v1["lock_wait_ns"] > 0 and v1["busy_ns"] + v1["lock_wait_ns"] == t
    assert r.locks["slots_lock"]["hold_ns"] > 0  # vCPU0's hold, still open
    assert r.locks["slots_lock"]["hold_ns"] <= t


def test_result_from_an_actor_is_at_its_clock() -> None:
    """From an actor's code the snapshot is at that actor's clock (``now_ns``): its work since
    it last yielded is busy time, and the locks it holds count up to then."""
    vm = pkvm.VM("sw_protected")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 64 * M)
    g0 = pkvm.Guest(vm, vmm, vm.create_vcpu())
    tl = Timeline(vm)
    seen: list[TimelineResult] = []

    def body() -> None:
        g0.touch(0, 16 * M, private=True)
        seen.append(tl.result())
        g0.convert(0, 8 * M, private=False)

    tl.spawn("vcpu0", body)
    tl.run()
    (r,) = seen
    assert r.critical_path_ns == r.actors["vcpu0"]["busy_ns"] > 0
    _check(tl.result(), tl, inside=False, finished=True)


# -- random points of random runs ----------------------------------------------------------------


_workload = st.sampled_from(sorted(_SMALL_OPTS))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(platform=st.sampled_from(experiments.PLATFORMS), workload=_workload, vcpus=st.integers(1, 4),
       seed=st.integers(0, 1000), pick=st.integers(0, 3),
       points=st.lists(st.floats(0, 1.05, allow_nan=False), min_size=1, max_size=12), record=st.booleans())
def test_results_mid_run_are_consistent_snapshots(platform: str, workload: str, vcpus: int, seed: int, pick: int,
                                                  points: list[float], record: bool) -> None:
    """At random SimPy times of a random run: every identity holds (``_check``), nothing counted
    goes back between snapshots, and the final result is the one of the same run without them
    (and of ``experiments.run``), with a recorder or without."""
    cfg = _config(platform, workload, vcpus, pick)
    plain = experiments.run(cfg, seed=seed)
    at = [int(p * plain.critical_path_ns) for p in points]
    r, counters, snaps, _tl = _run(cfg, seed, at, record=record)
    assert len(snaps) == len(at)
    _check_monotone(snaps + [r])
    assert counters == plain.counters
    assert r.critical_path_ns == plain.critical_path_ns
    assert (r.actors, r.locks, r.latency_ns, r.races) == (plain.actors, plain.locks, plain.latency_ns, plain.races)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(platform=st.sampled_from(experiments.PLATFORMS), workload=_workload, vcpus=st.integers(1, 4),
       seed=st.integers(0, 1000), pick=st.integers(0, 3), every=st.integers(1, 50),
       points=st.lists(st.floats(0, 1.0, allow_nan=False), min_size=1, max_size=8))
def test_taking_results_changes_nothing(platform: str, workload: str, vcpus: int, seed: int, pick: int, every: int,
                                        points: list[float]) -> None:
    """The same run, with the same observer processes, taking results mid-run (from the
    embedder's process and from the actors' own code) or not: identical figures and counters."""
    cfg = _config(platform, workload, vcpus, pick)
    crit = experiments.run(cfg, seed=seed).critical_path_ns
    at = [int(p * crit) for p in points]
    taken = _run(cfg, seed, at, take=True, inside_every=every)
    not_taken = _run(cfg, seed, at, take=False)
    assert _figures(taken[0]) == _figures(not_taken[0])
    assert taken[1] == not_taken[1]


# -- recording changes nothing ---------------------------------------------------------------------


def _measured(r: experiments.Result) -> dict[str, Any]:
    """Everything ``r.to_dict()`` holds but the simulator's own time and the timeline's file."""
    d = r.to_dict()
    d["config"].pop("timeline")
    for k in ("wall_s", "gfns_per_s"):
        d.pop(k)
        d["row"].pop(k)
    for p in d["phases"]:
        p.pop("wall_s")
    return d


def _with_and_without_recorder(cfg: experiments.Config, seed: int, tmp: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    rec = experiments.run(dataclasses.replace(cfg, timeline=str(tmp / "t.json")), seed=seed)
    return _measured(rec), _measured(experiments.run(cfg, seed=seed))


@pytest.mark.parametrize("seed", [904, 191])
def test_recording_does_not_move_a_fault_batch_s_wait_for_mmu_lock(tmp_path: Any, seed: int) -> None:
    """A recorder (``--timeline``) makes every visibility point a yield; without one a point
    no other actor could see is skipped (``SchedHooks.sync``). The skip did not look at a fault
    batch's interleaved reads of ``mmu_lock`` still to settle (``SchedActor.rd``): in TDX
    ``mixed`` at 128 MiB with 3 vCPUs, seed 904, vCPU1's batch at 147.5 ms had its round due;
    with a recorder the fault at 149.54 ms yielded and paid its 2,281 ns wait before taking
    ``mmu_lock``, without one the wait came 0.3 ms later, and vCPU2's round at the end was
    never paid (the run ended first): a critical path 2,281 ns shorter and 2 fewer waits of
    ``mmu_lock`` without a recorder. Seed 191 is the same with vCPU1."""
    rec, plain = _with_and_without_recorder(_config("tdx", "mixed", 3, 0), seed, tmp_path)
    assert rec["locks"]["mmu_lock"] == plain["locks"]["mmu_lock"]
    assert rec["critical_path_ns"] == plain["critical_path_ns"]
    assert rec == plain


@pytest.mark.parametrize(("platform", "policy", "vcpus", "seed"), [
    ("snp", "fault-time", 1, 1), ("snp", "eager-post", 1, 2), ("tdx", "6.19", 1, 2), ("snp", "fault-time", 2, 2),
    ("tdx", "6.19", 3, 5),
])
def test_recording_does_not_move_an_ipi_s_stall_beside_mixed_s_balloon_rounds(
        tmp_path: Any, platform: str, policy: str, vcpus: int, seed: int) -> None:
    """From 2 GiB ``mixed`` has balloon rounds, whose discards the VMM makes while a vCPU's
    task is under way; their TLB flushes stall a vCPU in guest mode by the IPI times the guest
    share of its stretch of work then (``SchedHooks._ipi``). Without a recorder the vCPU, alone
    at its visibility points, skipped their yields, and its share was that of all its work
    since it last yielded; with one, that of the work since its last visibility point. So a
    recorder moved the split of a vCPU's stall between IPIs and ``mmu_lock`` waits (SNP
    ``fault-time``, 2 GiB, seed 1: 1,400 ns of IPIs with one, 371 ns without, and ``slots_lock``
    held 1,029 ns longer). A skipped point now keeps the share a yield would have left
    (``SchedHooks._take_c``). So does the release of a lock held at a skipped point, which
    the yield would have made a real hold, released by a yield of its own: without it TDX
    with 3 vCPUs, seed 5, stalled vCPU2 for 614,400 ns of IPIs at a guest share of 0.21
    instead of 0.5 (``SchedHooks._vis_cut``)."""
    cfg = experiments.Config(platform=platform, memory="2G", workload="mixed", policy=policy, vcpus=vcpus,
                             options={"ops": "80"})
    rec, plain = _with_and_without_recorder(cfg, seed, tmp_path)
    assert rec["actors"] == plain["actors"]
    assert rec == plain


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(platform=st.sampled_from(experiments.PLATFORMS), vcpus=st.integers(1, 3), seed=st.integers(0, 1000),
       pick=st.integers(0, 3), memory=st.sampled_from(["2G", "3G"]))
def test_recording_changes_nothing_in_mixed_with_balloon_rounds(platform: str, vcpus: int, seed: int, pick: int,
                                                                 memory: str) -> None:
    """``test_recording_changes_nothing`` where ``mixed`` has balloon rounds (from 2 GiB): the
    VMM's discards run beside the vCPUs' tasks, which is where the skipped yields' guest shares
    showed (``test_recording_does_not_move_an_ipi_s_stall_beside_mixed_s_balloon_rounds``)."""
    pols = experiments.PLATFORM_POLICIES[platform]
    cfg = experiments.Config(platform=platform, memory=memory, workload="mixed", policy=pols[pick % len(pols)],
                             vcpus=vcpus, options={"ops": "40"})
    with tempfile.TemporaryDirectory() as tmp:
        rec, plain = _with_and_without_recorder(cfg, seed, pathlib.Path(tmp))
    assert rec == plain


def _count_deflate_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``workloads._deflate_runs`` to append the number of runs of each task it is
    handed to the list returned (the balloon's one-task paths)."""
    batches: list[int] = []
    real = workloads._deflate_runs

    def counted(ctx: Any, g: Any, runs: list[tuple[int, int]], chunk: int, huge: bool) -> None:
        batches.append(len(runs))
        real(ctx, g, runs, chunk, huge)

    monkeypatch.setattr(workloads, "_deflate_runs", counted)
    return batches


@pytest.mark.parametrize(("platform", "policy", "memory", "options"), [
    (platform, policy, memory, options)
    for platform, policy in [("snp", "fault-time"), ("snp", "eager-post"), ("snp", "eager-locked"), ("tdx", "6.19"),
                             ("sw_protected", "6.19")]
    for memory, options in [("256M", {"cycles": "2"}), ("64M", {"chunk": "4K"}), ("1G", {"cycles": "3", "fraction": "0.5"})]
    if not (platform == "tdx" and options.get("chunk") == "4K")  # a TD accepts 2M units at the least
])
def test_one_vcpu_s_balloon_runs_as_one_task_change_nothing(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, platform: str, policy: str, memory: str,
        options: dict[str, str]) -> None:
    """With one vCPU, ``balloon``'s deflate phase hands the vCPU one task for all the round's
    runs (``workloads._deflate_runs``) instead of a task per run; with a recorder it still
    hands them one by one. Both give every figure of the run."""
    batches = _count_deflate_batches(monkeypatch)
    cfg = experiments.Config(platform=platform, memory=memory, workload="balloon", policy=policy, vcpus=1,
                             options=options)
    for seed in (1, 2):
        batches.clear()
        rec, plain = _with_and_without_recorder(cfg, seed, tmp_path)
        assert batches and sum(batches) > len(batches), "the one-task path was not taken"
        assert rec == plain, seed


@pytest.mark.parametrize(("platform", "policy", "memory", "seed"), [
    ("snp", "fault-time", "8G", 1), ("snp", "eager-post", "8G", 2), ("snp", "eager-locked", "16G", 3),
    ("tdx", "6.19", "8G", 1), ("tdx", "6.16", "16G", 2), ("sw_protected", "6.19", "8G", 3),
])
def test_mixed_s_balloon_rounds_in_two_tasks_change_nothing(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, platform: str, policy: str, memory: str, seed: int) -> None:
    """Inside ``mixed``'s ``steady`` phase, with one vCPU, a balloon round's runs but the last go
    to the vCPU as one task (``workloads._deflate_runs``) and the last as a task of its own, so
    the driver goes on to its next action when it has handed the last run, as with a task per
    run; with a recorder each run is still a task. Both give every figure of the run. (A round
    has 0.1 % of the 2M chunks: 4 at 8 GiB, 8 at 16 GiB.)"""
    batches = _count_deflate_batches(monkeypatch)
    cfg = experiments.Config(platform=platform, memory=memory, workload="mixed", policy=policy, vcpus=1,
                             options={"ops": "150"})
    rec, plain = _with_and_without_recorder(cfg, seed, tmp_path)
    assert batches and max(batches) > 1, "the two-task path was not taken"
    assert rec == plain


@pytest.mark.parametrize("platform", ["snp", "tdx", "sw_protected"])
@pytest.mark.parametrize("workload", ["mixed", "balloon", "virtio"])
def test_recording_changes_nothing(tmp_path: Any, platform: str, workload: str) -> None:
    """With a recorder or without, every figure of the result is the same (docs/timeline.md,
    "A yield that nothing could see is not made"), with 2 and 3 vCPUs and a few seeds."""
    for vcpus in (2, 3):
        for seed in (1, 2, 3):
            rec, plain = _with_and_without_recorder(_config(platform, workload, vcpus, seed), seed, tmp_path)
            assert rec == plain, (vcpus, seed)


# -- a finished run's accounting ------------------------------------------------------------------


def _sync_run(cfg: experiments.Config, seed: int) -> tuple[dict[str, int], int]:
    wl = workloads.get(cfg.workload)
    vm, ctx = experiments._build(cfg, seed, None)
    wl.run(ctx, **workloads.parse_options(wl, cfg.options))
    return ctx.counters(), vm.modeled_ns


#: Workloads whose random picks never wait on a vCPU's task: with one vCPU, exactly the run
#: without a timeline. The others pick while a vCPU still works on an earlier pick, which a
#: pick avoids (``ctx.reserve``; docs/timeline.md: virtio at 128M, seed 3).
_PICKS_NOT_TIMED = {"boot", "balloon", "migration"}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(platform=st.sampled_from(experiments.PLATFORMS), workload=_workload, vcpus=st.integers(1, 4),
       seed=st.integers(0, 1000), pick=st.integers(0, 3))
def test_finished_run_accounting(platform: str, workload: str, vcpus: int, seed: int, pick: int) -> None:
    """At the end (``_check``: the critical path is at most the elapsed SimPy time, every
    actor's busy + stalled + idle time is the critical path, ...): the busy times add up to the modeled time, the locks' waits
    are the actors' lock waits, and with one vCPU every count is the run without a timeline's
    (and mmu_lock's write holds are the ``mmu_lock_held_ns`` counter)."""
    cfg = _config(platform, workload, vcpus, pick)
    r, counters, _snaps, tl = _run(cfg, seed, [])
    assert sum(a["busy_ns"] for a in r.actors.values()) == tl.vm.modeled_ns
    if vcpus == 1 and workload in _PICKS_NOT_TIMED:
        sync_counters, modeled = _sync_run(cfg, seed)
        assert counters == sync_counters
        assert r.critical_path_ns == modeled == tl.vm.modeled_ns
        assert r.locks["mmu_lock"]["hold_write_ns"] == counters["mmu_lock_held_ns"]


@pytest.mark.parametrize("model", ["batch", "interleaved"])
def test_a_lock_is_never_held_by_two_actors_at_once(model: str) -> None:
    """snp migration, 3 vCPUs, seed 231: vCPU0 takes cpa_lock uncontended (no other actor in a
    task) and holds it 82 ms of its own clock before it yields; meanwhile SimPy wakes the VMM (a
    vCPU's last work ended), which gives vCPU2 a task, and vCPU2 asks for cpa_lock in the middle
    of vCPU0's hold. It waits for the hold's end (``LockState.held_until``); it used to take the
    lock at once, the recorder's hold slices of cpa_lock overlapped, and the lock's hold_ns
    exceeded the critical path. Under ``pagewise_locks="interleaved"`` a batch's hold of
    cpa_lock stands for its page holds spread over its window (its slices may overlap another
    vCPU's); its hold_ns still fits in the critical path."""
    cfg = experiments.Config(platform="snp", memory="128M", workload="migration", policy="eager-post", vcpus=3)
    wl = workloads.get(cfg.workload)
    vm, ctx = experiments._build(cfg, 231, None)
    rec = Recorder()
    tl = Timeline(vm, host_cpus=cfg.host_cpus, recorder=rec, pagewise_locks=model)
    ctx.timeline = tl
    for g in ctx.guests:
        tl.start_vcpu(g.actor)

    def main_loop() -> None:
        wl.run(ctx, **workloads.parse_options(wl, cfg.options))
        tl.stop()

    tl.spawn("vmm", main_loop)
    tl.run()
    r = tl.result()
    for name in tl.locks:
        assert r.locks[name]["hold_ns"] <= r.critical_path_ns, name
        if tl.locks[name].interleaved:
            assert model == "interleaved" and name in ("cpa_lock", "tdx_sept")
            continue  # a batch's slice stands for its page holds, spread over its window
        holds = sorted((s[1], s[2], track) for track in rec.tracks for s in rec.iter_slices(track)
                       if s[0] == f"hold {name}")
        for (a0, a1, ta), (b0, b1, tb) in zip(holds, holds[1:]):
            assert b0 >= a1, f"{name} held by {ta} [{a0}, {a1}) and by {tb} from {b0}"
        assert r.locks[name]["hold_ns"] <= r.critical_path_ns, name


# -- the record of uncontended holds stays short ----------------------------------------------------


def _fast_done_watch(vm: Any) -> tuple[dict[str, int], Any]:
    """A callback (of every lock_hold) that records the longest ``fast_done`` list of the
    acting actor and checks the list's form: no hold of no length, no hold that starts where
    the previous one of its lock and mode ended (they are one)."""
    seen = {"max": 0, "holds": 0}

    def callback(ev: Any) -> None:
        tl = vm._sched
        a = tl._current if tl is not None else None
        if a is None:
            return
        seen["holds"] += 1
        fd = a.fast_done
        seen["max"] = max(seen["max"], len(fd))
        for i, (lock, mode, t, t_rel) in enumerate(fd):
            assert t_rel != t, fd[i]
            if i:
                p = fd[i - 1]
                assert not (p[0] == lock and p[1] == mode and p[3] == t and t_rel > t), (p, fd[i])

    return seen, callback


def test_uncontended_holds_of_one_long_task_keep_fast_done_short() -> None:
    """One vCPU takes mmu_lock uncontended for each of 20,000 faults in one task: the timeline
    kept every hold since the vCPU last resumed (20,000 entries, growing with the task); the
    holds of no length are not kept and back-to-back ones are merged, so the list stays short."""
    vm = pkvm.VM("sw_protected")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 128 * M)
    vcpu = vm.create_vcpu()
    tl = Timeline(vm)
    seen, callback = _fast_done_watch(vm)

    def work() -> None:
        for i in range(20000):
            vcpu.page_fault(i << 12, private=False, write=True)

    with vm.subscribe(callback, "lock_hold"):
        tl.spawn("vcpu0", work)
        tl.run()
    r = tl.result()
    assert r.locks["mmu_lock"]["acquisitions"] == 20000 == seen["holds"]
    assert seen["max"] <= 2


@pytest.mark.parametrize("platform,workload,policy,vcpus", [("snp", "balloon", "fault-time", 1),
                                                             ("snp", "balloon", "eager-locked", 2),
                                                             ("tdx", "balloon", "6.19", 1),
                                                             ("snp", "mixed", "eager-split", 2)])
def test_fast_done_has_the_folded_form_and_results_mid_run_hold(platform: str, workload: str, policy: str,
                                                                 vcpus: int) -> None:
    """On real runs: the list never holds a hold of no length nor two holds that are one, and
    results taken mid-run from a process of the environment keep their identities."""
    cfg = experiments.Config(platform=platform, memory="256M", workload=workload, policy=policy, vcpus=vcpus)
    from pkvm.experiments import _workloads

    wl = _workloads.get(cfg.workload)
    vm, ctx = experiments._build(cfg, 0, None)
    tl = Timeline(vm, host_cpus=cfg.host_cpus)
    ctx.timeline = tl
    for g in ctx.guests:
        tl.start_vcpu(g.actor)
    opts = _workloads.parse_options(wl, cfg.options)

    def main_loop() -> None:
        experiments._run_workload(wl, ctx, opts)
        tl.stop()

    def look() -> Any:
        for _ in range(300):
            yield tl.env.timeout(997_000)
            _check(tl.result(), tl, inside=False)

    seen, callback = _fast_done_watch(vm)
    with vm.subscribe(callback, "lock_hold"):
        tl.spawn("vmm", main_loop)
        tl.env.process(look())
        tl.run()
    assert seen["holds"] > 0


def test_overlapping_read_holds_count_once_in_the_union() -> None:
    """mmu_lock's hold_ns is the union of its holds. vCPU0 takes it for read uncontended on its
    own clock (a fault batch, ahead of SimPy's) while vCPU1, whom SimPy lets in meanwhile,
    holds it for read too: their overlap was counted twice (hold_ns 112.2 ms against an 83.8 ms
    critical path at the end; 62.0 ms against 58.6 ms half way)."""
    cfg = _config("tdx", "migration", 2, 0)
    plain = experiments.run(cfg, seed=259)
    r, _counters, snaps, _tl = _run(cfg, 259, [plain.critical_path_ns // 2, 58_635_587])  # _check each
    for x in (*snaps, r):
        lk = x.locks["mmu_lock"]
        assert lk["hold_ns"] <= x.critical_path_ns, (lk, x.critical_path_ns)
    lk = r.locks["mmu_lock"]
    assert lk["hold_ns"] < lk["hold_read_ns"]  # the readers overlapped: once in the union



def test_a_read_hold_taken_from_the_actors_code_counts_once_in_the_union() -> None:
    """The same union, in a result taken from an actor's code while its own read hold is open
    (not in SimPy's lock yet): vCPU1 holds mmu_lock for read from 62.6 ms on its clock, over
    vCPU0's uncontended read hold of 28.8 to 88.3 ms. The result counted vCPU1's hold whole
    (hold_ns 96.6 ms at vCPU1's 89.5 ms; found by test_taking_results_changes_nothing in CI,
    2026-12-07, at other times before migration drew its device pools apart); the union is
    71.0 ms there."""
    cfg = _config("tdx", "migration", 2, 0)
    seen: dict[int, int] = {}
    r, _counters, _snaps, _tl = _run(cfg, 367, [], inside_every=1,  # _check at every event
                                     probe=lambda x: seen.setdefault(x.critical_path_ns,
                                                                     x.locks["mmu_lock"]["hold_ns"]))
    assert seen[89_518_699] == 96_646_200 - (88_268_380 - 62_604_799)
    assert r.locks["mmu_lock"]["hold_ns"] < r.locks["mmu_lock"]["hold_read_ns"]


def _union_up_to(intervals: list[tuple[int, int]], end: int) -> int:
    """The length of the union of ``intervals`` before ``end`` (a slow reference)."""
    total, cur_s, cur_e = 0, None, None
    for s, e in sorted((s, min(e, end)) for s, e in intervals if s < end):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    return total + (cur_e - cur_s if cur_e is not None else 0)


@pytest.mark.parametrize("platform,workload,vcpus,seed,pick", [
    ("tdx", "mixed", 2, 0, 0), ("tdx", "mixed", 3, 0, 0), ("tdx", "mixed", 3, 904, 0),
    ("snp", "mixed", 2, 2, 2), ("tdx", "migration", 2, 367, 0), ("sw_protected", "virtio", 3, 1, 0)])
def test_mmu_lock_hold_ns_is_the_union_of_its_hold_slices(platform: str, workload: str, vcpus: int, seed: int,
                                                          pick: int) -> None:
    """``hold_ns`` of mmu_lock is the length of the union of its holds, in either mode: at the
    end and in results taken mid-run, it equals the union of the recorder's ``hold mmu_lock``
    slices up to that time, with a recorder and without one. Until later on 2026-12-07 a write hold
    taken uncontended (on its holder's clock, ahead of SimPy's) was added whole over a fault
    batch's read hold it overlapped: TDX ``mixed`` at 128 MiB with 2 vCPUs, seed 0, counted
    777.9 ms against the slices' 773.3 ms (the run's ``ops`` was the default 2,000 then)."""
    cfg = _config(platform, workload, vcpus, pick)
    plain = experiments.run(cfg, seed=seed)
    at = [plain.critical_path_ns * k // 5 for k in range(1, 5)]
    r, _counters, snaps, tl = _run(cfg, seed, at, record=True)
    assert tl.recorder is not None
    slices = [(s, e) for track in tl.recorder.tracks for name, s, e, _cat, _args in tl.recorder.iter_slices(track)
              if name.startswith("hold mmu_lock")]
    assert slices
    for x, t in (*zip(snaps, at), (r, 1 << 62)):
        assert x.locks["mmu_lock"]["hold_ns"] == _union_up_to(slices, t), t
    assert r.locks["mmu_lock"] == plain.locks["mmu_lock"]


@pytest.mark.parametrize("platform,vcpus", [("snp", 1), ("tdx", 1), ("tdx", 3)])
def test_mmu_lock_keeps_a_short_union_of_its_holds(platform: str, vcpus: int) -> None:
    """The union of the counted holds (``LockState.hold_union``) drops what no later hold can
    reach: with one vCPU every hold is taken uncontended and counted by the core, which prunes
    it (``RWLock._prune_union``) once the list passes 64; a run of some 850 acquisitions of
    ``mmu_lock`` keeps at most 64 intervals, and ``hold_ns`` is still the union of the holds
    (:func:`test_mmu_lock_hold_ns_is_the_union_of_its_hold_slices`)."""
    r, _counters, _snaps, tl = _run(_config(platform, "mixed", vcpus, 0), 0, [])
    lk = tl.locks["mmu_lock"]
    assert r.locks["mmu_lock"]["acquisitions"] > 500
    assert len(lk.hold_union) <= 64 < r.locks["mmu_lock"]["acquisitions"]
