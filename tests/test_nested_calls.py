"""A call from an event callback into the VM that emitted the event (docs/events.md,
"Subscribing"): every state-changing entry point of the VM, its vCPUs, guest_memfds, actors and
batched calls raises KvmError(EDEADLK) and changes nothing, so the emitting call finishes
exactly as it does when the callback does nothing. Reads and (un)subscribing stay allowed."""

import errno
import inspect

import numpy as np
import pytest

import pkvm
from pkvm.actors.guest import HypercallGuestFlows
from pkvm.actors.vmm import _PlainLaunch
from pkvm.platforms._snp_flows import SnpGuestFlows
from pkvm.platforms._snp_launch import SnpVmmFlows
from pkvm.platforms._snp_vcpu import SnpVcpu
from pkvm.platforms._tdx_flows import TdxGuestFlows, TdxVmmFlows
from pkvm.platforms._tdx_vcpu import TdxVcpu
from pkvm.platforms.snp import SnpVm
from pkvm.platforms.tdx import TdxVm

from vmhelpers import snapshot

MiB, GiB = 1 << 20, 1 << 30
PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = pkvm.FALLOC_FL_PUNCH_HOLE | pkvm.FALLOC_FL_KEEP_SIZE
KEEP = pkvm.FALLOC_FL_KEEP_SIZE
PLATFORMS = ("sw_protected", "snp", "tdx")


class Ctx:
    """A launched VM with 8 MiB of private RAM at gpa 0, its VMM, a guest on vCPU 0 and a
    guest_memfd bound to nothing (``spare``)."""

    def __init__(self, platform):
        self.platform = platform
        self.vm = vm = pkvm.VM(platform, options={"gpaw": 48} if platform == "tdx" else None)
        self.vmm = pkvm.Vmm(vm)
        self.gmem = self.vmm.add_ram(0, 8 * MiB)
        self.guest = pkvm.Guest(vm, self.vmm)
        self.vmm.launch([])
        self.vcpu = vm.vcpus[0]
        self.spare = vm.create_guest_memfd(2 * MiB)
        self.guest.accept(0, 8 * MiB)

    def outer(self):
        """The emitting calls: a guest conversion with its exits, faults, a hole punch."""
        self.guest.convert(2 * MiB, 2 * MiB, private=False)
        self.guest.touch(2 * MiB, 2 * MiB, private=False, write=True)
        self.guest.convert(2 * MiB, 64 << 10, private=True)
        self.vmm.discard_ram(6 * MiB, MiB)
        self.vm.set_memory_attributes(5 * MiB, 4096, 0)

    def state(self):
        vm, vmm = self.vm, self.vmm
        return (snapshot(vm), vm.cost_by_actor(), dict(vm.actor_totals()), vm.actor, vm.events,
                vm.attr_ioctls, vm.vm_dead, vm.hypercall_exit_mask, len(vm.vcpus), len(vm._gmems),
                vmm.conversions, vmm.failed_conversions, vmm.gfns_converted, vmm.last_failure,
                [v._resume is None for v in vm.vcpus], vm._inject._armed if hasattr(vm._inject, "_armed") else None,
                self.spare.folios.ranges())


def _snp_only(ctx):
    return ctx.platform == "snp"


def _tdx_only(ctx):
    return ctx.platform == "tdx"


def _confidential(ctx):
    """SNP and TDX: SW_PROTECTED's launch and guest acceptance do nothing (no state to change)."""
    return ctx.platform != "sw_protected"


#: (name, call(ctx), applies(ctx) or None): every public state-changing entry point.
ENTRIES = [
    # VM
    ("VM.set_memory_attributes", lambda c: c.vm.set_memory_attributes(7 * MiB, 4096, 0), None),
    ("VM.begin_set_memory_attributes", lambda c: c.vm.begin_set_memory_attributes(7 * MiB, 4096, 0), None),
    ("VM.set_memory_attributes_many",
     lambda c: c.vm.set_memory_attributes_many(np.array([7 * MiB], dtype=np.uint64), 4096, 0), None),
    ("VM.set_user_memory_region2",
     lambda c: c.vm.set_user_memory_region2(7, pkvm.KVM_MEM_GUEST_MEMFD, GiB, 2 * MiB, 1 << 41, c.spare, 0), None),
    ("VM.create_guest_memfd", lambda c: c.vm.create_guest_memfd(2 * MiB), None),
    ("VM.enable_cap", lambda c: c.vm.enable_cap(pkvm.KVM_CAP_EXIT_HYPERCALL, 0), None),
    ("VM.create_vcpu", lambda c: c.vm.create_vcpu(), None),
    ("VM.inject_failure", lambda c: c.vm.inject_failure("mmu_topup", errno.ENOMEM), None),
    ("VM.acting", lambda c: c.vm.acting("vcpu0"), None),
    # vCPU
    ("Vcpu.page_fault", lambda c: c.vcpu.page_fault(7 * MiB, private=True, write=True), None),
    ("Vcpu.page_fault_many", lambda c: c.vcpu.page_fault_many([7 * MiB], private=True, write=True), None),
    ("Vcpu.access", lambda c: c.vcpu.access(7 * MiB, private=True, write=True), None),
    ("Vcpu.pre_fault_memory", lambda c: c.vcpu.pre_fault_memory(7 * MiB, 4096), None),
    ("Vcpu.hypercall", lambda c: c.vcpu.hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, 7 * MiB, 1, 0), None),
    ("Vcpu.run", lambda c: c.vcpu.run(), None),
    ("Vcpu.map_gpa", lambda c: c.vcpu.map_gpa(7 * MiB | c.vm.tdx.shared_mask, 4096), _tdx_only),
    ("Vcpu.accept", lambda c: c.vcpu.accept(7 * MiB, pkvm.PG_LEVEL_4K), _tdx_only),
    ("SnpVcpu.pvalidate", lambda c: c.vcpu.pvalidate(7 * MiB, pkvm.PG_LEVEL_4K, False), _snp_only),
    ("SnpVcpu.pvalidate_range", lambda c: c.vcpu.pvalidate_range(7 * MiB, 4096, False), _snp_only),
    ("SnpVcpu.psc_msr", lambda c: c.vcpu.psc_msr(7 * MiB, 2), _snp_only),
    ("SnpVcpu.psc", lambda c: c.vcpu.psc(pkvm.PscDesc.of([pkvm.PscEntry(7 * MiB >> 12, 2)])), _snp_only),
    # guest_memfd
    ("GuestMemfd.fallocate", lambda c: c.spare.fallocate(KEEP, 0, 4096), None),
    ("GuestMemfd.fallocate(punch)", lambda c: c.gmem.fallocate(PUNCH, 7 * MiB, 4096), None),
    ("GuestMemfd.close", lambda c: c.spare.close(), None),
    # platform VM objects
    ("SnpVm.launch_update", lambda c: c.vm.snp.launch_update(7 * MiB, 4096), _snp_only),
    ("SnpVm.launch_finish", lambda c: c.vm.snp.launch_finish(), _snp_only),
    ("TdxVm.init_mem_region", lambda c: c.vm.tdx.init_mem_region(c.vcpu, 7 * MiB, 1), _tdx_only),
    ("TdxVm.finalize_vm", lambda c: c.vm.tdx.finalize_vm(), _tdx_only),
    ("TdxVm.inject_busy", lambda c: c.vm.tdx.inject_busy("aug"), _tdx_only),
    # the VMM
    ("Vmm.add_ram", lambda c: c.vmm.add_ram(GiB, 2 * MiB), None),
    ("Vmm.add_ram_layout", lambda c: c.vmm.add_ram_layout(64 * MiB), None),
    ("Vmm.launch", lambda c: c.vmm.launch([]), None),
    ("Vmm.handle_exit",
     lambda c: c.vmm.handle_exit(c.vcpu, pkvm.GuestOpResult(
         "exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL,
         hypercall=pkvm.Hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (7 * MiB, 1, 0), 0, 1))), None),
    ("Vmm.convert_memory", lambda c: c.vmm.convert_memory(7 * MiB, 4096, False), None),
    ("Vmm.discard_ram", lambda c: c.vmm.discard_ram(7 * MiB, 4096), None),
    ("VmmFlows.launch", lambda c: c.vmm.flows.launch([]), _confidential),
    # the guest
    ("Guest.execute", lambda c: c.guest.execute(pkvm.GuestOpResult(
        "exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL,
        hypercall=pkvm.Hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (7 * MiB, 1, 0), 0, 1))), None),
    ("Guest.convert", lambda c: c.guest.convert(7 * MiB, 4096, private=False), None),
    ("Guest.accept", lambda c: c.guest.accept(7 * MiB, 4096), None),
    ("Guest.touch", lambda c: c.guest.touch(7 * MiB, 4096, private=True, write=True), None),
    ("GuestFlows.convert", lambda c: c.guest.flows.convert(7 * MiB, 4096, False), None),
    ("GuestFlows.accept", lambda c: c.guest.flows.accept(7 * MiB, 4096), _confidential),
    ("SnpGuestFlows.page_state_change", lambda c: c.guest.flows.page_state_change(7 * MiB, 4096, False),
     _snp_only),
    ("SnpGuestFlows.pvalidate", lambda c: c.guest.flows.pvalidate(7 * MiB, 4096, False), _snp_only),
    ("TdxGuestFlows.map_gpa", lambda c: c.guest.flows.map_gpa(7 * MiB, 7 * MiB + 4096, False), _tdx_only),
    ("TdxGuestFlows.accept_memory", lambda c: c.guest.flows.accept_memory(7 * MiB, 7 * MiB + 4096), _tdx_only),
]

CASES = [pytest.param(p, name, call, id=f"{p}-{name}") for p in PLATFORMS for name, call, applies in ENTRIES
         if applies is None or applies(type("C", (), {"platform": p})())]


def _run(platform, attempt):
    """The outer calls on a fresh context, with a callback (of every event) that runs
    ``attempt(ctx)`` and records what it raised; returns the context, the events, the errnos."""
    ctx = Ctx(platform)
    events, errs = [], []

    def callback(ev):
        events.append(ev)
        if attempt is not None:
            try:
                attempt(ctx)
            except pkvm.KvmError as e:
                errs.append(e.errno)
            else:
                errs.append(None)

    with ctx.vm.subscribe(callback):
        ctx.outer()
    return ctx, events, errs


@pytest.mark.parametrize("platform,name,call", CASES)
def test_a_nested_call_is_refused_and_changes_nothing(platform, name, call):
    ref, ref_events, _ = _run(platform, None)
    ctx, events, errs = _run(platform, call)
    assert errs and set(errs) == {errno.EDEADLK}, (name, sorted(set(errs), key=str))
    assert events == ref_events
    assert ctx.state() == ref.state()
    ctx.vm.check()
    # outside a callback the same call is not refused for being nested
    try:
        call(ctx)
    except pkvm.KvmError as e:
        assert e.errno != errno.EDEADLK
    except (ValueError, TypeError):
        pass


def _public(cls):
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)
            and not isinstance(v, (staticmethod, classmethod, property, type))}


#: Public methods that change nothing (reads, queries) or only the subscriptions: allowed.
ALLOWED = {
    "VM.subscribe", "VM.unsubscribe", "VM.trace", "VM.clock", "VM.actor_totals", "VM.cost_breakdown",
    "VM.cost_by_actor", "VM.memslot", "VM.get_memory_attributes", "VM.check_extension", "VM.check",
    "GuestMemfd.folio", "AttrIoctl.run_to", "AttrIoctl.finish",  # run step(), which refuses
    "TdxVm.is_private_gpa", "Vcpu.page_fault",  # (the C entry; listed under Vcpu above)
}


@pytest.mark.parametrize("cls", [pkvm.VM, pkvm.Vcpu, SnpVcpu, TdxVcpu, pkvm.GuestMemfd, pkvm.Vmm, pkvm.Guest,
                                 pkvm.AttrIoctl, SnpVm, TdxVm, HypercallGuestFlows, SnpGuestFlows,
                                 TdxGuestFlows, _PlainLaunch, SnpVmmFlows, TdxVmmFlows])
def test_every_public_method_is_an_entry_or_allowed(cls):
    """The table above is the whole public surface: a new public method must be added to it
    (refused from a callback) or to ALLOWED (a read)."""
    prefix = {HypercallGuestFlows: "GuestFlows", SnpGuestFlows: "SnpGuestFlows", TdxGuestFlows: "TdxGuestFlows",
              _PlainLaunch: "VmmFlows", SnpVmmFlows: "VmmFlows", TdxVmmFlows: "VmmFlows",
              SnpVcpu: "SnpVcpu", TdxVcpu: "Vcpu"}.get(cls, cls.__name__)
    covered = {n for n, _c, _a in ENTRIES} | ALLOWED | {"AttrIoctl.step"}
    missing = []
    for m in _public(cls):
        names = {f"{prefix}.{m}", f"Vcpu.{m}", f"GuestFlows.{m}"}
        if not names & covered:
            missing.append(f"{prefix}.{m}")
    assert not missing


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_phased_ioctl_step_from_a_callback_is_refused(platform):
    """AttrIoctl.step (and run_to / finish, which call it) of an open phased ioctl: refused
    from a callback of a fault, and the fault and the ioctl finish as without the attempt."""
    def run(nested):
        ctx = Ctx(platform)
        op = ctx.vm.begin_set_memory_attributes(7 * MiB, 4096, 0)
        errs = []

        def callback(ev):
            if nested:
                for f in (op.step, op.finish, lambda: op.run_to("end")):
                    try:
                        f()
                    except pkvm.KvmError as e:
                        errs.append(e.errno)
        with ctx.vm.subscribe(callback):
            ctx.vmm.discard_ram(6 * MiB, MiB)  # (a hole punch: no slots_lock)
            ctx.guest.touch(6 * MiB, 64 << 10, private=True, write=True)
        assert op.phase == "begin"
        op.finish()
        return ctx, errs

    ref, _ = run(False)
    ctx, errs = run(True)
    assert errs and set(errs) == {errno.EDEADLK}
    assert ctx.state() == ref.state()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_reads_and_subscriptions_stay_allowed(platform):
    ctx = Ctx(platform)
    vm = ctx.vm
    seen, extra = [], []

    def callback(ev):
        seen.append((vm.stats["attr_stores"], vm.clock(), vm.get_memory_attributes(0x200), vm.modeled_ns,
                     vm.check_extension(pkvm.KVM_CAP_MEMORY_ATTRIBUTES), vm.memslot(0) is not None,
                     ctx.gmem.folio(0), dict(vm.actor_totals()), vm.cost_breakdown(), vm.actor))
        if len(seen) == 1:
            sub = vm.subscribe(extra.append, "fault")
            vm.unsubscribe(sub)
            vm.subscribe(extra.append, "attr_change")

    with vm.subscribe(callback):
        ctx.outer()
    assert seen and extra and all(e.kind == "attr_change" for e in extra)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_flag_is_reset_when_a_callback_raises(platform):
    ctx = Ctx(platform)
    vm = ctx.vm

    def boom(ev):
        raise RuntimeError("callback failed")

    sub = vm.subscribe(boom, "attr_change")
    with pytest.raises(RuntimeError):
        vm.set_memory_attributes(7 * MiB, 4096, 0)
    sub.close()
    assert not vm._in_callback
    vm.set_memory_attributes(7 * MiB + 4096, 4096, 0)  # not refused
    ctx.vcpu.page_fault(7 * MiB + 4096, private=False)
    assert vm.get_memory_attributes((7 * MiB + 4096) >> 12) == 0


def test_another_vm_may_be_called_from_a_callback():
    """The refusal is per VM: a callback of one VM drives another."""
    a, b = Ctx("sw_protected"), Ctx("sw_protected")
    with a.vm.subscribe(lambda ev: b.vm.set_memory_attributes(7 * MiB, 4096, 0), "attr_change"):
        a.vm.set_memory_attributes(6 * MiB, 4096, 0)
    assert b.vm.get_memory_attributes(7 * MiB >> 12) == 0


def test_the_message_names_the_event():
    ctx = Ctx("sw_protected")
    msgs = []

    def callback(ev):
        try:
            ctx.vm.set_memory_attributes(7 * MiB, 4096, 0)
        except pkvm.KvmError as e:
            msgs.append(str(e))
    with ctx.vm.subscribe(callback, "attr_change"):
        ctx.vm.set_memory_attributes(6 * MiB, 4096, 0)
    assert len(msgs) == 1 and "(Resource deadlock avoided)" in msgs[0] and "'attr_change'" in msgs[0]
    assert msgs[0].startswith("[EDEADLK] ")  # the kernel's name, not errno's alias EDEADLOCK


def test_signatures_of_the_table_exist():
    """Every ENTRIES name is a real attribute (a renamed method fails here, not silently)."""
    classes = {"VM": pkvm.VM, "Vcpu": pkvm.Vcpu, "SnpVcpu": SnpVcpu, "GuestMemfd": pkvm.GuestMemfd,
               "SnpVm": SnpVm, "TdxVm": TdxVm, "Vmm": pkvm.Vmm, "Guest": pkvm.Guest,
               "VmmFlows": _PlainLaunch, "GuestFlows": HypercallGuestFlows, "SnpGuestFlows": SnpGuestFlows,
               "TdxGuestFlows": TdxGuestFlows}
    for name, _c, _a in ENTRIES:
        cls, meth = name.split(".")
        meth = meth.split("(")[0]
        assert inspect.isfunction(getattr(classes[cls], meth, None)) or callable(getattr(classes[cls], meth))


_TIMELINE_CALLS = {
    "sleep": lambda tl: tl.sleep(1000),
    "barrier": lambda tl: tl.barrier(),
    "stop": lambda tl: tl.stop(),
    "run": lambda tl: tl.run(),
    "dispatch": lambda tl: tl.dispatch("vcpu1", lambda: None),
    "spawn": lambda tl: tl.spawn("extra", lambda: None),
    "start_vcpu": lambda tl: tl.start_vcpu("vcpu9"),
}


def _timeline_run(call):
    """A two-vCPU ``mixed`` run on the concurrent timeline whose event callback, every 37th
    event that an actor emits, calls ``call(timeline)`` (None: does nothing); what the run
    measured, and the errors the calls raised."""
    from pkvm import experiments as E
    from pkvm.experiments import _workloads

    cfg = E.Config(memory="64M", workload="mixed", vcpus=2, options={"ops": "60"})
    wl = _workloads.get(cfg.workload)
    vm, ctx = E._build(cfg, 0, None)
    seen, raised = [0], []

    def callback(ev):
        seen[0] += 1
        tl = vm._sched
        if call is not None and seen[0] % 37 == 0 and tl is not None and tl.current is not None:
            try:
                call(tl)
            except pkvm.KvmError as exc:
                raised.append(exc.errno)

    with vm.subscribe(callback):
        tl = E._run_timeline(cfg, vm, ctx, wl, _workloads.parse_options(wl, cfg.options))
    vm.check()
    return (ctx.counters(), vm.cost_by_actor(), tl.result().to_dict(), seen[0]), raised


@pytest.mark.parametrize("method", sorted(_TIMELINE_CALLS))
def test_timeline_scheduling_from_a_callback_is_refused(method):
    """The timeline's scheduling calls from an event callback of its VM raise EDEADLK and
    change nothing, as the VM's own entry points do. They switched to another actor in the
    middle of the emitting call: that actor's next VM call failed with EDEADLK (the flag is
    the VM's), or lock bookkeeping went wrong ("releases a lock it does not hold"), or the
    run ended with ``mmu_invalidate_in_progress`` left at 1 (vm.check() failed)."""
    quiet, none = _timeline_run(None)
    tried, raised = _timeline_run(_TIMELINE_CALLS[method])
    assert none == [] and raised and set(raised) == {errno.EDEADLK}
    assert tried == quiet
