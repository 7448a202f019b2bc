"""Structured events (vm.subscribe), the public actor and clock (vm.acting, vm.clock): docs/events.md."""

import os
import subprocess
import sys
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pkvm
from pkvm.sim import Timeline
from pkvm import experiments as E
from pkvm.experiments.trace import TRACE_EVENTS, Tracer
from pkvm.kvm.events import TRACEPOINT_KINDS

MiB = 1 << 20
PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
CHARGE_KINDS = {"charge", "uncharge"}


def _guest(platform, size=8 * MiB, sink=None, kinds=None):
    """A VM (subscribed from its creation when ``sink`` is given), its VMM with ``size`` bytes of
    RAM at gpa 0 (launched), and a guest on vCPU 0."""
    vm = pkvm.VM(platform, options={"gpaw": 48} if platform == "tdx" else None)
    sub = vm.subscribe(sink, kinds) if sink is not None else None
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, size)
    guest = pkvm.Guest(vm, vmm)
    vmm.launch([])
    return vm, vmm, guest, sub


def _ok(vm):
    """The per-actor ledgers agree with the clocks and the total."""
    by = vm.cost_by_actor()
    for actor, cells in by.items():
        assert vm.clock(actor) == sum(cells.values())
    assert sum(vm.actor_totals().values()) == vm.modeled_ns
    assert {a: t for a, t in vm.actor_totals().items() if a in by} == {a: sum(c.values()) for a, c in by.items()}


# -- every charged ns is in exactly one event ---------------------------------------------------

PAGES = 2048  # 8 MiB of RAM

OPS = st.lists(st.tuples(
    st.sampled_from(["to_private", "to_shared", "accept", "touch_private", "touch_shared", "discard",
                     "set_attributes", "vmm_convert"]),
    st.integers(0, PAGES - 1), st.integers(1, 600)), min_size=1, max_size=12)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(platform=st.sampled_from(["sw_protected", "snp", "tdx"]), ops=OPS)
def test_sum_of_event_ns_is_modeled_ns(platform, ops):
    """Random guest / VMM / direct calls: the ns of the events add up to vm.modeled_ns, per actor
    to vm.clock(actor) and per operation to vm.cost_breakdown(); each event's t_ns is its actor's
    clock right after the event (its running total of charged ns)."""
    events = []
    vm, vmm, guest, _sub = _guest(platform, sink=events.append)
    for op, page, npages in ops:
        gpa, size = page << 12, min(npages, PAGES - page) << 12
        try:
            if op == "to_private":
                guest.convert(gpa, size, private=True)
            elif op == "to_shared":
                guest.convert(gpa, size, private=False)
            elif op == "accept":
                guest.accept(gpa, size)
            elif op == "touch_private":
                guest.touch(gpa, size, private=True, write=True)
            elif op == "touch_shared":
                guest.touch(gpa, size, private=False)
            elif op == "discard":
                vmm.discard_ram(gpa, size)
            elif op == "set_attributes":
                vm.set_memory_attributes(gpa, size, PRIVATE if npages & 1 else 0)
            else:
                vmm.convert_memory(gpa, size, bool(npages & 1))
        except pkvm.KvmError:
            break  # a dead VM (TDX: touching unaccepted memory); the ledgers must still agree
    assert sum(e.ns for e in events) == vm.modeled_ns
    assert all(e.ns == 0 for e in events if e.kind not in CHARGE_KINDS)
    by_op = {}
    for e in events:
        if e.kind in CHARGE_KINDS:
            by_op[e.op] = by_op.get(e.op, 0) + e.ns
    assert {k: v for k, v in by_op.items() if v} == vm.cost_breakdown()
    running = {}
    for e in events:
        running[e.actor] = running.get(e.actor, 0) + e.ns
        assert e.t_ns == running[e.actor], e
    for actor, ns in running.items():
        assert vm.clock(actor) == ns
    assert set(running) <= {"vmm", "vcpu0"}
    assert {e.kind for e in events} <= set(pkvm.EVENT_KINDS)
    _ok(vm)


@pytest.mark.parametrize("platform", ["sw_protected", "snp", "tdx"])
def test_kernel_decisions_are_reported(platform):
    """A conversion round trip reports the attribute change, the zap, the faults and their
    outcome, the exit to userspace and the platform's RMP / S-EPT changes."""
    events = []
    vm, vmm, guest, _ = _guest(platform, sink=events.append)
    guest.accept(0, 2 * MiB)
    guest.touch(0, 2 * MiB, private=True, write=True)
    guest.convert(0x1000, 0x1000, private=False)
    guest.touch(0x1000, 0x1000, private=False, write=True)
    kinds = {e.kind for e in events}
    assert {"charge", "set_memory_attributes", "attr_change", "zap", "fault", "userspace_exit"} <= kinds
    change = [e for e in events if e.kind == "attr_change" and e.gfn_start == 1]
    assert change and change[0].gfn_end == 2 and change[0].args == (0,) and change[0].count == 1
    faults = [e for e in events if e.kind == "fault"]
    assert {f.result for f in faults} <= {"fixed", "spurious", "retry", "emulate", "exit"}
    assert sum(f.count for f in faults) == vm.stats["pf_taken"] - vm.stats.get("tdx_accept_size_faults", 0)
    assert all(f.args[0] == 0 and f.actor == "vcpu0" for f in faults)
    zaps = [e for e in events if e.kind == "zap"]
    assert sum(z.count for z in zaps) == vm.stats["zapped_sptes"]
    if platform == "snp":
        rmp = [e for e in events if e.kind == "rmp_change" and e.op == "rmpupdate"]
        assert sum(e.count for e in rmp) == vm.stats["rmpupdate"]
    if platform == "tdx":
        aug = [e for e in events if e.kind == "sept_change" and e.op == "TDH.MEM.PAGE.AUG"]
        assert aug and sum(e.count for e in aug) == vm.stats["seamcall_aug"]
    flush = [e for e in events if e.kind == "charge" and e.op == "remote_tlb_flush"]
    assert len(flush) == vm.stats["remote_tlb_flush"]


def test_retry_and_vm_dead_are_reported():
    """A fault that meets an invalidation in progress retries (RET_PF_RETRY); a TD touching
    memory it has not accepted is killed (kvm_vm_dead)."""
    events = []
    vm, _vmm, guest, _ = _guest("sw_protected", sink=events.append)
    vm._invalidate_begin()
    vm._invalidate_range_add(0, 1 << 20)
    with vm.acting("vcpu0"):
        r = guest.vcpu.page_fault(0x1000, private=True)
    vm._invalidate_end()
    assert r.ret == "retry"
    retry = [e for e in events if e.kind == "retry"]
    assert [(e.gfn_start, e.gfn_end, e.op, e.actor) for e in retry] == [(1, 2, "fault", "vcpu0")]
    assert [e.result for e in events if e.kind == "fault"] == ["retry"]
    events.clear()
    vm, _vmm, guest, _ = _guest("tdx", sink=events.append)
    vm.set_memory_attributes(0, 8 * MiB, 0)
    r = guest.touch(0x1000, private=True)
    assert r.ret == "exit" and vm.vm_dead
    dead = [e for e in events if e.kind == "vm_dead"]
    assert len(dead) == 1 and dead[0].op == "kvm_vm_dead" and "before accepting" in dead[0].result


# -- filtering and the subscription's life -----------------------------------------------------


def test_kinds_filter_delivers_only_those_kinds():
    every, faults, attrs = [], [], []
    vm = pkvm.VM("snp")
    vm.subscribe(every.append)
    vm.subscribe(faults.append, kinds="fault")
    vm.subscribe(attrs.append, kinds=["set_memory_attributes", "attr_change"])
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    guest = pkvm.Guest(vm, vmm)
    guest.accept(0, 2 * MiB)
    assert faults and {e.kind for e in faults} == {"fault"}
    assert attrs and {e.kind for e in attrs} == {"set_memory_attributes", "attr_change"}
    assert faults == [e for e in every if e.kind == "fault"]
    assert attrs == [e for e in every if e.kind in ("set_memory_attributes", "attr_change")]


def test_subscribe_and_unsubscribe_during_a_run():
    """A callback may close its own subscription and open another; changes apply from the next
    event, and the new subscriber sees exactly the ns charged after it was opened."""
    vm = pkvm.VM("sw_protected")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 8 * MiB)
    guest = pkvm.Guest(vm, vmm)
    first, second = [], []
    opened = {}

    def once(ev):
        first.append(ev)
        if len(first) == 3:
            sub.close()
            opened["at"] = vm.modeled_ns
            opened["sub"] = vm.subscribe(second.append)

    sub = vm.subscribe(once)
    guest.touch(0, 4 * MiB, private=True, write=True)
    guest.convert(0, 2 * MiB, private=False)
    assert len(first) == 3 and not sub.active
    assert second and opened["sub"].active
    assert sum(e.ns for e in second) == vm.modeled_ns - opened["at"]
    with opened["sub"]:
        pass
    assert not opened["sub"].active and vm._subs is None
    n = len(second)
    guest.convert(0, 2 * MiB, private=True)
    assert len(second) == n
    sub.close()  # closing twice does nothing
    vm.unsubscribe(opened["sub"])


def test_subscription_repr_and_context_manager():
    vm = pkvm.VM("sw_protected")
    got = []
    with vm.subscribe(got.append, ("zap", "fault")) as sub:
        assert sub.active and "active" in repr(sub) and "zap, fault" in repr(sub)
        vm.set_memory_attributes(0, 4096, PRIVATE)
    assert not sub.active and "closed" in repr(sub)
    vm.set_memory_attributes(0, 4096, 0)
    assert got == []  # no memslot: no zap and no fault


@pytest.mark.parametrize(("callback", "kinds", "exc", "match"), [
    (None, None, TypeError, "callback must be callable, not NoneType"),
    ("print", None, TypeError, "callback must be callable, not str"),
    (print, ["zap", "nope"], ValueError, r"unknown event kind 'nope' in kinds; the kinds are: charge, uncharge, "),
    (print, "flt", ValueError, r"unknown event kind 'flt'.*lock_wait, lock_hold"),
    (print, [], ValueError, "kinds is empty"),
    (print, 5, TypeError, "kinds must be None, an event kind or an iterable of them, not int"),
    (print, [b"zap"], TypeError, "kinds must hold str event kinds, not bytes"),
])
def test_bad_subscriptions_are_refused_and_change_nothing(callback, kinds, exc, match):
    vm = pkvm.VM("sw_protected")
    with pytest.raises(exc, match=match):
        vm.subscribe(callback, kinds)
    assert vm._subs is None
    kept = vm.subscribe(print, "zap")
    with pytest.raises(exc, match=match):
        vm.subscribe(callback, kinds)
    assert vm._subs == (kept,)


def test_bad_unsubscribe_and_emit():
    vm, other = pkvm.VM("sw_protected"), pkvm.VM("sw_protected")
    sub = vm.subscribe(print, "zap")
    with pytest.raises(TypeError, match="sub must be a pkvm.Subscription, not builtin_function_or_method"):
        vm.unsubscribe(print)
    with pytest.raises(ValueError, match="subscription of another VM"):
        other.unsubscribe(sub)
    assert sub.active
    with pytest.raises(ValueError, match="unknown event kind 'lock_spin'"):
        vm._emit("lock_spin")


def test_lock_kinds_and_the_timeline_clock():
    """The lock kinds are in the table and can be emitted by another layer; with a timeline
    attached (vm._sched), t_ns is the timeline's time."""
    assert {"lock_wait", "lock_hold"} <= set(pkvm.EVENT_KINDS)
    vm = pkvm.VM("sw_protected")
    got = []
    vm.subscribe(got.append, ("lock_wait", "lock_hold", "attr_change"))
    vm._emit("lock_wait", op="mmu_lock", result="write", args=(250,))
    assert got == [pkvm.Event(0, "vmm", "lock_wait", None, None, "mmu_lock", 0, 0, "write", (250,))]

    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 << 20, mark_private=False)
    vcpus = [vm.create_vcpu() for _ in range(2)]
    tl = Timeline(vm)
    start = vm.modeled_ns  # the timeline's clock starts at 0 here

    def convert() -> None:
        tl.sleep(123_456)
        vm.set_memory_attributes(0, 4096, PRIVATE)

    def touch() -> None:  # takes mmu_lock for read while the other waits to write
        vcpus[1].access(0x100000, private=False, size=1 << 20)

    tl.spawn("vcpu0", convert)
    tl.spawn("vcpu1", touch)
    tl.run()
    change = [e for e in got if e.kind == "attr_change"]
    assert len(change) == 1 and change[0].t_ns >= 123_456
    assert {e.op for e in got if e.kind == "lock_hold"} >= {"slots_lock", "mmu_lock"}
    assert all(e.args[0] >= 0 for e in got if e.kind in ("lock_hold", "lock_wait"))
    assert vm.modeled_ns > start


def _timeline_events(monkeypatch, kinds):
    """The events of ``kinds`` of every VM a Timeline is built for from now on (``E.run``)."""
    got: list[pkvm.Event] = []
    init = Timeline.__init__

    def subscribed(self, vm, *a, **k):
        init(self, vm, *a, **k)
        vm.subscribe(got.append, kinds)

    monkeypatch.setattr(Timeline, "__init__", subscribed)
    return got


@pytest.mark.parametrize("platform,policy,workload,extra", [
    ("tdx", "6.19", "mixed", {}),
    ("snp", "eager-post", "mixed", {}),
    ("snp", "fault-time", "virtio", {}),
    ("tdx", "6.19", "mixed", {"batch_pages": 1, "pagewise_locks": "batch"}),
])
def test_lock_events_add_up_to_the_locks_statistics(monkeypatch, platform, policy, workload, extra):
    """Every wait and hold is one lock's, emitted once: per lock, the ``lock_wait`` events'
    waits add up to the lock's ``wait_ns``, and all of them to the actors' ``lock_wait_ns``;
    the ``lock_hold`` events' holds to its ``hold_ns`` (``mmu_lock``: the read ones to
    ``hold_read_ns``, the write ones to ``hold_write_ns``). (A vCPU that paid waits it owed for
    earlier windows of ``cpa_lock``, the S-EPT or ``mmu_lock`` on its way to a lock it queued
    for had them counted again in that lock's event: in TDX ``mixed``, 1 GiB with 8 vCPUs,
    ``slots_lock``'s events said 690.9 ms where it waited 389.0 ms; and a hold's event ran to
    the end of the waits that passed after its release.)"""
    got = _timeline_events(monkeypatch, ("lock_wait", "lock_hold"))
    r = E.run(E.Config(platform=platform, policy=policy, memory="256M", vcpus=3, workload=workload, **extra), seed=1)
    waits: dict[str, int] = {}
    holds: dict[tuple[str, str], int] = {}
    for e in got:
        if e.kind == "lock_wait":
            waits[e.op] = waits.get(e.op, 0) + e.args[0]
        else:
            holds[e.op, e.result] = holds.get((e.op, e.result), 0) + e.args[0]
    assert waits, "no lock waited"
    for lock, d in r.locks.items():
        assert waits.get(lock, 0) == d.get("wait_ns", 0), (lock, waits.get(lock, 0), d.get("wait_ns", 0))
        if lock == "mmu_lock":
            assert holds.get((lock, "read"), 0) == d["hold_read_ns"], lock
            assert holds.get((lock, "write"), 0) == d["hold_write_ns"], lock
        else:
            assert holds.get((lock, "write"), 0) == d.get("hold_ns", 0), (lock, holds.get((lock, "write"), 0), d)
    assert sum(waits.values()) == sum(a["lock_wait_ns"] for a in r.actors.values())


def test_retry_events_are_at_the_page_that_retried(monkeypatch):
    """On the timeline a fault that returned ``RET_PF_RETRY`` is a ``retry`` event at the page
    that retried; a fault called alone is also a ``fault`` event with the result ``"retry"``
    there, while the page of a fault batch that an invalidation overlapped is not (the batch's
    own ``fault`` event, after it, covers the pages before it). The spin's re-faults are counted without events. So ``pf_taken`` less the fault
    events' counts is ``pf_retry`` less the ``"retry"`` fault events, and the fault events'
    counts with the batches' retried pages are the fault latency samples. (The batch's
    ``retry`` event was at the batch's first page, which the batch had mapped.)"""
    got = _timeline_events(monkeypatch, ("fault", "retry"))
    r = E.run(E.Config(platform="snp", memory="256M", vcpus=3, workload="mixed"), seed=2)
    retried = [e for e in got if e.kind == "fault" and e.result == "retry"]
    retry = [e for e in got if e.kind == "retry"]
    alone = {(e.gfn_start, e.actor) for e in retried}
    assert all(e.count == 1 and e.gfn_end == e.gfn_start + 1 for e in retried)
    batched = [i for i, e in enumerate(got) if e.kind == "retry" and (e.gfn_start, e.actor) not in alone]
    assert len(retried) > 100 and len(batched) > 100
    for i in batched:  # the batch's own event (the same vCPU's next) ends at the page that retried
        nxt = next(e for e in got[i + 1:] if e.kind == "fault" and e.actor == got[i].actor)
        assert nxt.result == "fixed" and nxt.gfn_start < nxt.gfn_end == got[i].gfn_start, (got[i], nxt)
    faults = sum(e.count for e in got if e.kind == "fault")
    assert r.counters["pf_taken"] - faults == r.counters["pf_retry"] - len(retried)
    assert faults + len(batched) == r.latency_ns["fault"]["count"]
    assert len(retry) == len(retried) + len(batched)


def test_event_is_immutable():
    ev = pkvm.Event(1, "vmm", "zap")
    with pytest.raises(AttributeError):
        ev.ns = 5  # type: ignore[misc]
    assert ev.gfn_start is None and ev.count == 0 and ev.args == ()


# -- the trace is a subscriber -----------------------------------------------------------------


def _traced(platform, events=None, extra=None):
    vm = pkvm.VM(platform, options={"gpaw": 48} if platform == "tdx" else None)
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 8 * MiB)
    guest = pkvm.Guest(vm, vmm)
    vmm.launch([])
    tr = Tracer(events=events)
    vm.trace(tr)
    if extra is not None:
        vm.subscribe(extra)
    guest.accept(0, 4 * MiB)
    guest.touch(0, 4 * MiB, private=True, write=True)
    guest.convert(0x2000, 0x3000, private=False)
    guest.touch(0x2000, 0x3000, private=False, write=True)
    vmm.discard_ram(6 * MiB, MiB)
    return tr


@pytest.mark.parametrize("platform", ["sw_protected", "snp", "tdx"])
def test_filtered_trace_is_the_full_trace_without_the_other_lines(platform):
    full = _traced(platform).lines
    assert full == _traced(platform, events=TRACE_EVENTS).lines
    assert full == _traced(platform, extra=lambda ev: None).lines  # another subscriber changes nothing
    for keep in (["kvm_page_fault"], ["kvm_vm_set_mem_attributes", "kvm_userspace_exit"]):
        some = _traced(platform, events=keep).lines
        assert some == [ln for ln in full if any(f" {k}: " in ln for k in keep)]
        assert some


def test_a_tracer_with_bad_kinds_is_refused_and_the_old_one_stays():
    vm = pkvm.VM("sw_protected")
    good = Tracer()
    vm.trace(good)

    class Bad(Tracer):
        def trace_kinds(self):
            return frozenset({"kvm_page_fault"})  # a tracepoint name, not an event kind

    with pytest.raises(ValueError, match=r"unknown event kind 'kvm_page_fault' in tracer.trace_kinds\(\)"):
        vm.trace(Bad())
    assert vm._tracer is good
    vm.set_memory_attributes(0, 4096, PRIVATE)
    assert len(good.lines) == 1 and " kvm_vm_set_mem_attributes: " in good.lines[0]
    vm.trace(None)
    assert vm._subs is None


def test_tracer_event_names_are_checked():
    assert TRACE_EVENTS == tuple(TRACEPOINT_KINDS)
    with pytest.raises(ValueError, match=r"events: unknown tracepoint 'kvm_page_faults'; the tracepoints are: "
                                         r"kvm_vm_set_mem_attributes, kvm_page_fault, "):
        Tracer(events=["kvm_page_faults"])
    with pytest.raises(ValueError, match="events names no tracepoint"):
        Tracer(events=[])
    with pytest.raises(TypeError, match="events must be None or tracepoint names, not int"):
        Tracer(events=3)
    with pytest.raises(ValueError, match="trace_events: unknown tracepoint 'x'"):
        E.Config(trace_events=("x",))
    assert E.Config(trace_events="kvm_page_fault, kvm_hypercall").trace_events == ("kvm_page_fault", "kvm_hypercall")


def test_config_trace_events_filters_and_records_the_filter(tmp_path):
    full, some = tmp_path / "full.txt", tmp_path / "some.txt"
    E.run(E.Config(memory="64M", trace=str(full)), 0)
    E.run(E.Config(memory="64M", trace=str(some), trace_events=("kvm_page_fault",)), 0)
    fl, sl = full.read_text().splitlines(), some.read_text().splitlines()
    assert sl[1] == fl[1] + " events=kvm_page_fault"  # the # pkvm header records the filter
    assert sl[2:-1] == [ln for ln in fl[2:-1] if " kvm_page_fault: " in ln]
    assert sl[-1] == fl[-1] and sl[-1].startswith("# pkvm end modeled_ns=")  # the run's trailer, whole


def _cli(*args, cwd):
    """``python -m pkvm ARGS`` in ``cwd``, importing the pkvm under test."""
    here = os.path.dirname(os.path.dirname(pkvm.__file__))
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "pkvm", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--memory", "64M", "--trace", "t.txt", "--trace-events", "kvm_page_fault,bogus"],
     "pkvm: error: --trace-events: unknown tracepoint 'bogus'; the tracepoints are: kvm_vm_set_mem_attributes, "),
    (["compare", "--memory", "64M", "--trace-events", "kvm_page_fault"],
     "pkvm: error: --trace-events kvm_page_fault needs --trace OUT.txt"),
    (["compare", "--memory", "64M", "--trace", "t.txt", "--trace-events", ","],
     "pkvm: error: --trace-events: unknown tracepoint ''"),
])
def test_cli_trace_events_bad_input_is_one_line(args, message, tmp_path):
    p = _cli(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr
    assert os.listdir(tmp_path) == []


def test_cli_trace_events_writes_only_those(tmp_path):
    p = _cli("run", "--memory", "64M", "-q", "--trace", "t.txt", "--trace-events",
             "kvm_vm_set_mem_attributes,kvm_userspace_exit", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in (tmp_path / "t.txt").read_text().splitlines() if not ln.startswith(("#", "cpus="))]
    assert lines and all(" kvm_vm_set_mem_attributes: " in ln or " kvm_userspace_exit: " in ln for ln in lines)


# -- the actor and the clock -------------------------------------------------------------------


def test_acting_sets_and_restores_the_actor_also_on_exceptions():
    vm = pkvm.VM("sw_protected")
    vm.create_vcpu()
    vm.create_vcpu()
    assert vm.actor == "vmm"
    with vm.acting("vcpu1") as who:
        assert who == "vcpu1" and vm.actor == "vcpu1"
        with vm.acting("vcpu0"):
            assert vm.actor == "vcpu0"
        assert vm.actor == "vcpu1"
    assert vm.actor == "vmm"
    with pytest.raises(pkvm.KvmError, match="flags"), vm.acting("vcpu1"):
        vm.set_memory_attributes(0, 4096, PRIVATE, flags=1)
    assert vm.actor == "vmm"
    with pytest.raises(ZeroDivisionError), vm.acting("vcpu0"):
        vm.set_memory_attributes(0, 4096, PRIVATE)
        1 / 0  # noqa: B018
    assert vm.actor == "vmm"
    assert vm.cost_by_actor()["vcpu0"] == {"attr_store": 100}
    assert vm.clock("vcpu0") == 100 and vm.clock("vcpu1") == 0 and vm.clock() == vm.clock("vmm") == 0


@pytest.mark.parametrize(("name", "exc", "match"), [
    ("vcpu2", ValueError, r"actor 'vcpu2' is not 'vmm' or 'vcpuN' of an existing vCPU \(this VM has vcpu0 to vcpu1\)"),
    ("vcpu01", ValueError, "actor 'vcpu01' is not"),
    ("vcpu-1", ValueError, "actor 'vcpu-1' is not"),
    ("vcpu", ValueError, "actor 'vcpu' is not"),
    ("VMM", ValueError, "actor 'VMM' is not"),
    ("vcpu\u0661", ValueError, "is not 'vmm'"),
    (1, TypeError, "actor must be a str"),
    (None, TypeError, "actor must be a str"),
])
def test_bad_actors_are_refused_and_change_nothing(name, exc, match):
    vm = pkvm.VM("sw_protected")
    vm.create_vcpu()
    vm.create_vcpu()
    before = (vm.actor, dict(vm._actor_tot), set(vm._actor_ns))
    with pytest.raises(exc, match=match):
        vm.acting(name)
    if name is not None:  # clock(None) is the acting actor's clock
        with pytest.raises(exc, match=match):
            vm.clock(name)
    assert (vm.actor, dict(vm._actor_tot), set(vm._actor_ns)) == before
    with pytest.raises(ValueError, match=r"this VM has no vCPU yet"):
        pkvm.VM("sw_protected").acting("vcpu0")


def test_actor_totals_is_a_live_read_only_view():
    vm, vmm, guest, _ = _guest("snp")
    view = vm.actor_totals()
    assert isinstance(view, Mapping) and set(view) == {"vmm"}
    guest.accept(0, 2 * MiB)
    assert set(view) == {"vmm", "vcpu0"} and len(view) == 2
    assert view["vcpu0"] == vm.clock("vcpu0") > 0
    with pytest.raises(TypeError):
        view["vmm"] = 0  # type: ignore[index]
    with pytest.raises(KeyError):
        view["vcpu7"]  # noqa: B018
    assert "vcpu0" in repr(view)
    _ok(vm)
