"""A second outside audit: the SimPy embedding API, the Dask execution layer, ``pkvm
sensitivity``, the timeline's Chrome trace and the tidy tables. Each test names the defect it
pins: what the old code did, and what it does now."""

import pytest

from pkvm import experiments as E

SMALL = E.Config(memory="64M", workload="swiotlb", options={"ops": "5"})


def test_sobol_confidence_intervals_are_seeded_at_seed_0():
    """SALib's ``sobol.analyze`` seeds its bootstrap only ``if seed:``, so with seed 0 (the
    default of ``pkvm sensitivity`` and of ``experiments.sensitivity``) the S1_conf and
    ST_conf columns changed from one run to the next (and between ``-j 1`` and ``-j 2``)."""
    runs = [E.sensitivity(SMALL, ["fault-time", "eager-post"], samples=4, seed=0, metric="modeled_ns")
            for _ in range(2)]
    assert runs[0].indices.equals(runs[1].indices)
    assert (runs[0].indices[["S1_conf", "ST_conf"]].to_numpy() > 0).any()


@pytest.mark.parametrize("address, message", [
    ("tls://127.0.0.1:1", "not usable here: tls:// needs TLS credentials"),
    ("ucx://127.0.0.1:1", "not usable here: this installation has no working UCX backend"),
    ("inproc://x", "not an address like tcp://host:8786 (inproc://x is not a scheduler of this process"),
    ("inproc://127.0.0.1/1/1", "is not a scheduler of this process"),
])
def test_a_scheduler_address_this_installation_cannot_dial_is_a_usage_error(capsys, monkeypatch, address,
                                                                             message):
    """``--scheduler tls://...`` (no TLS credentials configured) and ``ucx://...`` (no UCX
    backend) failed inside distributed with a TypeError, reported as "internal error ... a bug
    in pkvm" (exit 1) followed by a 10 s hang and a traceback from ``Client.__del__``;
    ``inproc://x`` waited 5 s and said no scheduler answered ("not enough values to unpack"),
    then printed the same traceback. Each is refused at once: exit 2, one line."""
    import time

    from pkvm.cli import main

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.delenv("DASK_DISTRIBUTED__COMM__TLS__CA_FILE", raising=False)
    t0 = time.monotonic()
    assert main(["compare", "--memory", "16M", "--scheduler", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pkvm: error: --scheduler {address}: ") and message in err, err
    assert err.count("\n") == 1 and time.monotonic() - t0 < 4
    with pytest.raises(ValueError, match="not usable here|is not a scheduler of this process"):
        E.execution.Runner(scheduler=address)


def _embedded(nr_vcpus=2):
    import pkvm

    vm = pkvm.VM("sw_protected", nr_vcpus=nr_vcpus)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 64 << 20)
    return vm, vmm, [pkvm.Guest(vm, vmm, vm.create_vcpu()) for _ in range(nr_vcpus)]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"env": "env"}, TypeError, "env must be a simpy.Environment or None, got str"),
    ({"recorder": "x"}, TypeError, "recorder must be a pkvm.sim.recorder.Recorder or None, got str"),
    ({"vm": "vm"}, TypeError, "vm must be a pkvm.VM, got str"),
])
def test_timeline_refuses_wrong_types_and_attaches_nothing(kwargs, exc, match):
    """``Timeline(vm, "env")`` and ``Timeline("vm")`` raised AttributeError (no documented
    type); ``recorder="x"`` was accepted and failed later, inside the run. TypeError now,
    and the VM is left without a timeline (another can be attached)."""
    from pkvm.sim import Timeline

    vm, _, _ = _embedded()
    args = {"vm": vm, **kwargs}
    with pytest.raises(exc, match=match):
        Timeline(args.pop("vm"), **args)
    assert vm._sched is None
    Timeline(vm)


def test_timeline_spawn_and_dispatch_refuse_bad_arguments_and_change_nothing():
    """``tl.spawn(123, fn)`` raised AttributeError; ``tl.spawn("a", "not callable")`` was
    accepted and failed inside ``env.run()`` with the actor left registered;
    ``tl.dispatch("nope", fn)`` raised KeyError and ``dispatch`` to an actor made by ``spawn``
    (not a vCPU thread) AttributeError. Each is a TypeError or ValueError now, before anything
    is created, and the timeline runs as if it had not been called."""
    import simpy

    from pkvm.sim import Timeline

    def run(bad):
        vm, _, gs = _embedded()
        env = simpy.Environment()
        tl = Timeline(vm, env)
        tl.start_vcpu("vcpu0")
        if bad:
            for call, exc in [(lambda: tl.spawn(123, lambda: None), TypeError),
                              (lambda: tl.spawn("", lambda: None), TypeError),
                              (lambda: tl.spawn("vcpu1", "not callable"), TypeError),
                              (lambda: tl.start_vcpu(None), TypeError),
                              (lambda: tl.dispatch("nope", lambda: None), ValueError),
                              (lambda: tl.dispatch("vcpu0", 42), TypeError)]:
                with pytest.raises(exc):
                    call()

        def main():
            tl.dispatch("vcpu0", lambda: gs[0].touch(0, 8 << 20, private=True))
            if bad:
                with pytest.raises(ValueError, match="'helper' is not a vCPU thread of this timeline"):
                    tl.dispatch("helper", lambda: None)
            tl.stop()

        tl.spawn("helper", lambda: None)
        tl.spawn("vmm", main)
        env.run()
        return tl.result().to_dict(), vm.stats

    assert run(True) == run(False)


def _misnested(events):
    """Slices of one thread that overlap without nesting, in exact ns (ts and dur are µs)."""
    import collections

    by_tid = collections.defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            start = round(e["ts"] * 1000)
            by_tid[e["tid"]].append((start, start + round(e["dur"] * 1000), e["name"]))
    bad = []
    for tid, slices in by_tid.items():
        stack = []
        for s, e, name in sorted(slices, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1][1] <= s:
                stack.pop()
            if stack and e > stack[-1][1]:
                bad.append((tid, name, s, e, stack[-1]))
            stack.append((s, e, name))
    return bad


@pytest.mark.parametrize("argv, overlaps", [
    (["--vcpus", "2", "--option", "prealloc=true", "--policy", "eager-post"], True),
    # (this run's slices nest without an extra thread since cpa_lock is taken only where the
    # kernel makes a direct-map call; with batches of 64 MiB: the default 4 MiB ones overlap)
    (["--vcpus", "2", "--workload", "swiotlb", "--policy", "eager-locked", "-o", "ops=20",
      "--batch-pages", "16384"], False),
    (["--vcpus", "2", "--workload", "swiotlb", "--policy", "eager-locked", "-o", "ops=20"], True),
])
def test_timeline_trace_slices_nest_on_every_thread(capsys, tmp_path, argv, overlaps):
    """Perfetto (and chrome://tracing) accept only slices that nest on one thread. ``pkvm run
    --timeline`` wrote, on the vmm or a vCPU track, a ``hold slots_lock`` that began part way
    through a ``work`` slice (the lock taken uncontended) and ended after it: a slice Perfetto
    drops or misplaces. Such a slice now goes to an extra thread of the track, "vmm (2)";
    every slice is still written, once."""
    import json

    from pkvm.cli import main

    path = tmp_path / "tl.json"
    assert main(["run", "--memory", "64M", *argv, "--timeline", str(path), "-q"]) == 0
    capsys.readouterr()
    events = json.loads(path.read_text())["traceEvents"]
    assert _misnested(events) == []
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    extra = [n for n in names.values() if n.endswith(" (2)")]
    assert bool(extra) == overlaps and all(x[:-4] in names.values() for x in extra)
    order = {e["tid"]: e["args"]["sort_index"] for e in events if e["ph"] == "M" and e["name"] == "thread_sort_index"}
    own = {n: t for t, n in names.items()}
    for x in extra:  # beside its own track, holding the slice that did not nest there
        assert order[own[x]] == order[own[x[:-4]]]
        # (a hold of slots_lock taken uncontended, or of cpa_lock: a batch's page holds are one
        # slice, docs/timeline.md, "What is approximated")
        assert any(e["ph"] == "X" and e["tid"] == own[x] and e["name"] in ("hold slots_lock", "hold cpa_lock")
                   for e in events)


def test_chrome_trace_moves_only_what_does_not_nest():
    """The writer's lanes: nested and disjoint slices stay on the track's thread; a slice that
    overlaps one without nesting goes to the track's next thread, one that fits nowhere to a
    third."""
    import io
    import json

    from pkvm.sim.chrome import write_chrome_trace
    from pkvm.sim.recorder import CAT_BUSY, CAT_LOCK_HOLD, Recorder

    rec = Recorder()
    rec.slice("vmm", "work", 0, 10_000, CAT_BUSY)
    rec.slice("vmm", "inner", 2_000, 3_000, CAT_BUSY)
    rec.slice("vmm", "hold a", 5_000, 20_000, CAT_LOCK_HOLD)   # overlaps "work"
    rec.slice("vmm", "hold b", 8_000, 25_000, CAT_LOCK_HOLD)   # overlaps "work" and "hold a"
    rec.slice("vmm", "work", 10_000, 30_000, CAT_BUSY)
    rec.slice("vcpu0", "work", 0, 1_000, CAT_BUSY)
    out = io.StringIO()
    write_chrome_trace(rec, out)
    events = json.loads(out.getvalue())["traceEvents"]
    assert _misnested(events) == []
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {1: "vmm", 2: "vcpu0", 3: "vmm (2)", 4: "vmm (3)"}
    where = [(e["name"], e["tid"]) for e in events if e["ph"] == "X"]
    assert where == [("work", 1), ("inner", 1), ("hold a", 3), ("hold b", 4), ("work", 1), ("work", 2)]


def test_tidy_table_of_no_results_has_the_documented_columns(tmp_path):
    """``to_frame([])`` was a frame with no columns at all (and ``--out`` of it an empty
    file); it has the configuration columns, seed, cost_fingerprint and pkvm_version."""
    import pandas as pd

    from pkvm.experiments.frames import write_frame

    frame = E.to_frame([])
    assert len(frame) == 0
    assert {"platform", "memory", "memory_text", "workload", "options", "policy", "costs", "vcpus", "seed",
            "cost_fingerprint", "pkvm_version"} <= set(frame.columns)
    write_frame(frame, str(tmp_path / "e.parquet"))
    assert list(pd.read_parquet(tmp_path / "e.parquet").columns) == list(frame.columns)


def test_a_metric_some_runs_lack_stays_an_int_column(tmp_path):
    """A grid over vcpus=1,2: the 1-vCPU rows have no ``by_actor.vcpu1``; the column was
    filled with 0 but left float64 (nanoseconds and counts as floats, in the Parquet file
    too). It is int64 now, as the same column is when every run has it."""
    import pandas as pd

    from pkvm.experiments.frames import write_frame

    frame = E.to_frame(E.sweep_grid(E.Config(memory="32M", workload="swiotlb", options={"ops": "5"}),
                                    {"vcpus": [1, 2]}, ["fault-time"], seed=0))
    assert frame["by_actor.vcpu1"].dtype == "int64" and frame["by_actor.vcpu1"].iloc[0] == 0
    assert frame["by_actor.vcpu1"].iloc[1] > 0
    assert frame["phases.accept.by_actor.vcpu1"].dtype == "int64"
    write_frame(frame, str(tmp_path / "g.parquet"))
    assert pd.read_parquet(tmp_path / "g.parquet")["by_actor.vcpu1"].dtype == "int64"


def test_tidy_table_has_no_output_file_columns(capsys, tmp_path, monkeypatch):
    """``compare --timeline tl.json --trace-events kvm_page_fault --out x.csv`` wrote the
    output names as configuration columns (``timeline`` = tl.fault-time.json, and
    ``trace_events`` as the Python repr "('kvm_page_fault',)"), where the trace path was
    already left out because it names a file, not a configuration."""
    import pandas as pd

    from pkvm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--memory", "64M", "--workload", "swiotlb", "-o", "ops=5", "--policies",
                 "fault-time", "--trace", "t.txt", "--trace-events", "kvm_page_fault", "--timeline", "tl.json",
                 "--out", "x.csv", "-q"]) == 0
    capsys.readouterr()
    cols = set(pd.read_csv("x.csv").columns)
    assert not cols & {"trace", "timeline", "gantt", "trace_events"}
    assert {"platform", "memory", "policy", "modeled_ns"} <= cols


@pytest.mark.parametrize("call, match", [
    (lambda: E.compare(SMALL, "fault-time"), r"policies must be a list such as .*, not the str 'fault-time'"),
    (lambda: E.sweep(SMALL, ["64M"], "fault-time"), "policies must be a list"),
    (lambda: E.sweep(SMALL, "64M", ["fault-time"]), r"memories must be a list such as .*, not the str '64M'"),
    (lambda: E.sweep_grid(SMALL, {"vcpus": [1]}, "fault-time"), "policies must be a list"),
    (lambda: E.sweep_grid(SMALL, {"vcpus": 1}, ["fault-time"]), r"grid key 'vcpus' must be a list such as"),
    (lambda: E.sweep_grid(SMALL, [("vcpus", [1])], ["fault-time"]), "grid must map Config fields"),
    (lambda: E.sensitivity(SMALL, "fault-time", samples=2), "policies must be a list"),
    (lambda: E.sensitivity(SMALL, ["fault-time"], samples=2, vary="rmpupdate"),
     r"vary must be a list such as .*, not the str 'rmpupdate'"),
    (lambda: E.sensitivity(SMALL, ["fault-time"], samples=2, vary=[1]), "price name 1 must be a str"),
    (lambda: E.sensitivity(SMALL, ["fault-time"], samples=2, ranges={5: (1, 2)}), "price name 5 must be a str"),
    (lambda: E.sensitivity(SMALL, ["fault-time"], samples=2, ranges=[1]), "ranges must map price names"),
    (lambda: E.sensitivity(SMALL, ["fault-time"], samples=2, metric=5), "metric 5 must be a dotted name"),
    (lambda: E.sensitivity(SMALL, ["fault-time"], samples=2, conf_level="x"), "conf_level 'x' must be a number"),
])
def test_experiment_functions_refuse_a_str_for_a_list_and_wrong_types_with_value_error(monkeypatch, call, match):
    """``compare(config, "fault-time")`` split the str into characters and refused "unknown
    policy preset 'f'" (``sweep(config, "64M")``: "memory '6' must be ..."); ``vary="rmpupdate"``:
    "unknown cost operation 'r'". ``vary=[1]`` and ``ranges={5: ...}`` raised AttributeError,
    ``sweep_grid(config, {"vcpus": 1})`` and ``metric=5`` TypeError after the nominal runs,
    ``conf_level="x"`` TypeError: the documented type is ValueError, naming the argument, and
    nothing runs."""
    monkeypatch.setattr(E, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(ValueError, match=match):
        call()


def test_embedded_critical_path_ends_with_the_timelines_own_actors():
    """``tl.result().critical_path_ns`` was the environment's time when ``result()`` was
    called: on a shared environment, a device model of the embedder's that ran on after
    pkvm's actors, or a second VM's timeline, lengthened it (a VM whose vCPU finished at
    2.25 ms reported the 4.5 ms of the other VM, with 2.25 ms of idle). It ends when the
    timeline's last actor finished, as ``docs/timeline.md`` defines it."""
    import simpy

    from pkvm.sim import Timeline

    def alone(size):
        vm, _, gs = _embedded(1)
        env = simpy.Environment()
        tl = Timeline(vm, env)
        tl.spawn("vcpu0", lambda: gs[0].touch(0, size, private=True))
        env.run()
        return tl.result().to_dict()

    a, b = alone(8 << 20), alone(4 << 20)
    assert a["critical_path_ns"] > b["critical_path_ns"] > 0
    (vma, _, ga), (vmb, _, gb) = _embedded(1), _embedded(1)
    env = simpy.Environment()
    ta, tb = Timeline(vma, env), Timeline(vmb, env)
    ta.spawn("vcpu0", lambda: ga[0].touch(0, 8 << 20, private=True))
    tb.spawn("vcpu0", lambda: gb[0].touch(0, 4 << 20, private=True))

    def device():  # the embedder's own process, running on long after both
        yield env.timeout(10**9)
    env.process(device())
    env.run()
    assert env.now == 10**9
    assert ta.result().to_dict() == a and tb.result().to_dict() == b
    # a vCPU thread (start_vcpu) ends with its last task
    vm, _, gs = _embedded(1)
    env = simpy.Environment()
    tl = Timeline(vm, env)
    tl.start_vcpu("vcpu0")
    tl.dispatch("vcpu0", lambda: gs[0].touch(0, 4 << 20, private=True))
    env.process(device())
    env.run()
    r = tl.result()
    assert r.critical_path_ns == b["critical_path_ns"] and r.actors["vcpu0"]["idle_ns"] == 0


@pytest.mark.parametrize("timeout", [-1, 0, "x", float("nan"), float("inf"), True])
def test_runner_refuses_a_bad_connect_timeout_before_dialing(timeout):
    """``Runner(scheduler=..., connect_timeout=-1)`` dialled and failed with "could not convert
    string to float: '1-1'" after the wait; ``"x"`` or NaN raised KeyError ("Invalid time
    unit") from inside distributed. A ValueError naming it now, at construction."""
    with pytest.raises(ValueError, match="connect_timeout .* must be a positive number of seconds"):
        E.execution.Runner(scheduler="tcp://127.0.0.1:9", connect_timeout=timeout)


def test_a_cost_file_of_another_platform_names_the_platform_option(capsys, tmp_path, monkeypatch):
    """``pkvm costs --platform tdx --toml > tdx.toml`` then ``pkvm run --costs tdx.toml`` was
    refused with "... but this model is 'snp' on host 'amd'; remove its profile/host keys or
    make them match": the model came from --platform's default, which the message did not
    name. It says which platform the file is for and the option that selects it; with that
    option the file runs."""
    from pkvm.cli import main

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["costs", "--platform", "tdx", "--toml"]) == 0
    (tmp_path / "tdx.toml").write_text(capsys.readouterr().out)
    assert main(["run", "--memory", "64M", "--costs", "tdx.toml", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(it is a tdx cost model: run it on platform tdx" in err
    assert "--platform tdx)" in err
    assert main(["run", "--memory", "64M", "--platform", "tdx", "--costs", "tdx.toml", "-q"]) == 0
    with pytest.raises(ValueError, match=r"Config\(platform='tdx'\)"):
        E.Config(memory="64M", cost_file=str(tmp_path / "tdx.toml")).cost_model()


def test_a_grid_over_platform_runs_each_platforms_policies(capsys, monkeypatch):
    """``pkvm sweep --grid platform=snp,tdx`` (and ``sweep_grid(Config(), {"platform": [...]})``)
    was refused: "grid point platform=tdx: policy 'fault-time' cannot run on a tdx VM", the
    default policy Config gave the snp base, although platform is a documented grid key and
    the policies default to each point's platform's. Each point now runs its platform's
    policies; a policy given for every point is still checked against each."""
    from pkvm.cli import main

    monkeypatch.delenv("PKVM_DEBUG", raising=False)
    results = E.sweep_grid(E.Config(memory="64M"), {"platform": ["snp", "tdx"]})
    assert [(r.config.platform, r.config.policy) for r in results] == [
        ("snp", p) for p in E.PLATFORM_POLICIES["snp"]] + [("tdx", p) for p in E.PLATFORM_POLICIES["tdx"]]
    assert main(["sweep", "--memory", "64M", "--grid", "platform=snp,tdx", "-q"]) == 0
    out = capsys.readouterr().out
    assert "tdx       6.19" in out and "snp       fault-time" in out
    assert main(["sweep", "--memory", "64M", "--grid", "platform=snp,tdx", "--policies", "fault-time", "-q"]) == 2
    assert "policy 'fault-time' cannot run on a tdx VM" in capsys.readouterr().err


def test_dispatch_after_stop_is_refused_at_once():
    """``tl.dispatch`` after ``tl.stop()`` queued the task on a thread that had finished, and
    ``env.run()`` then reported "timeline deadlock"; it is a RuntimeError now, and the run
    ends as if it had not been called."""
    import simpy

    from pkvm.sim import Timeline

    def run(late):
        vm, _, gs = _embedded()
        env = simpy.Environment()
        tl = Timeline(vm, env)
        tl.start_vcpu("vcpu0")

        def main():
            tl.dispatch("vcpu0", lambda: gs[0].touch(0, 8 << 20, private=True))
            tl.stop()
            if late:
                with pytest.raises(RuntimeError, match="'vcpu0' was finished by stop"):
                    tl.dispatch("vcpu0", lambda: gs[0].touch(8 << 20, 4096, private=True))

        tl.spawn("vmm", main)
        tl.run()
        return tl.result().to_dict(), vm.stats

    assert run(True) == run(False)
