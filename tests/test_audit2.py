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
