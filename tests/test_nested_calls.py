"""A call from an event callback into the VM that emitted the event (docs/events.md,
"Subscribing"): every state-changing entry point of the VM, its vCPUs, guest_memfds, actors and
batched calls, and the mutators of the objects reachable from it (its RMP, direct map, host
memory, MMU, lpage_info, S-EPT, SEAMCALL layer, the RangeMaps it hands out, its kernel log)
raises KvmError(EDEADLK) and changes nothing, so the emitting call finishes exactly as it does
when the callback does nothing. Reads and (un)subscribing stay allowed."""

import copy
import errno
import inspect

import numpy as np
import pytest

import pkvm
from pkvm.actors.guest import HypercallGuestFlows
from pkvm.actors.vmm import _PlainLaunch
from pkvm._core import _mmu_make_spte
from pkvm.host.directmap import DirectMap
from pkvm.host.hostmem import HostMemory
from pkvm.kvm.memslots import Memslot
from pkvm.kvm.mmu import LpageInfo, Mmu
from pkvm.kvm.vm import _KernelLog
from pkvm.platforms._snp_flows import SnpGuestFlows
from pkvm.platforms._snp_launch import SnpVmmFlows
from pkvm.platforms._snp_vcpu import SnpVcpu
from pkvm.platforms._tdx_flows import TdxGuestFlows, TdxVmmFlows
from pkvm.platforms._tdx_sept import Seamcalls, Sept
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
                self.spare.folios.ranges(), self.platform_state())

    def platform_state(self):
        """What the objects reachable from the VM hold beyond ``snapshot``: the host memory,
        the RMP and direct map (SNP), the S-EPT and SEAMCALL layer (TDX), each with its counters."""
        vm = self.vm
        hm = vm.hostmem
        out = [hm._used.ranges(), hm._cursor, hm._cpu_cursors, hm.cpu, vm.clock("vmm"), vm.clock("vcpu0"),
               vm.mmu.leaf_counts()]
        if self.platform == "snp":
            out += [vm.rmp.ranges(), vm.rmp.counters, vm.rmp.in_use(hm.start_pfn), vm.directmap.ranges(),
                    vm.directmap.counters, vm.directmap.fragmented_pages(), vm.snp.leaked.ranges(),
                    vm.snp.rmp is vm.rmp, vm.snp.directmap is vm.directmap]
        if self.platform == "tdx":
            sept = vm.sept
            out += [sept.leaves.ranges(), sept.guest_inhibit.ranges(), [m.ranges() for m in sept.tables[1:]],
                    dict(vm.tdx.seamcalls._busy)]
        return out


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
    # -- the objects reachable from the VM (vm.mmu, vm.hostmem, vm.memslots, guest_memfds,
    # vm.rmp / vm.directmap / vm.snp, vm.sept / vm.tdx.seamcalls, vm.events)
    # the kernel log
    ("_KernelLog.append", lambda c: c.vm.events.append(("x", "y")), None),
    ("_KernelLog.extend", lambda c: c.vm.events.extend([("x", "y")]), None),
    ("_KernelLog.insert", lambda c: c.vm.events.insert(0, ("x", "y")), None),
    ("_KernelLog.pop", lambda c: c.vm.events.pop(), None),
    ("_KernelLog.remove", lambda c: c.vm.events.remove(("x", "y")), None),
    ("_KernelLog.clear", lambda c: c.vm.events.clear(), None),
    ("_KernelLog.sort", lambda c: c.vm.events.sort(), None),
    ("_KernelLog.reverse", lambda c: c.vm.events.reverse(), None),
    ("_KernelLog.__setitem__", lambda c: c.vm.events.__setitem__(slice(0, 0), [("x", "y")]), None),
    ("_KernelLog.__delitem__", lambda c: c.vm.events.__delitem__(slice(0, 1)), None),
    ("_KernelLog.__iadd__", lambda c: c.vm.events.__iadd__([("x", "y")]), None),
    ("_KernelLog.__imul__", lambda c: c.vm.events.__imul__(2), None),
    # the MMU and its leaf map
    ("Mmu.zap_range", lambda c: c.vm.mmu.zap_range(0, 512), None),
    ("Mmu.split_to", lambda c: c.vm.mmu.split_to(0, 1), None),
    ("Mmu.map_leaf", lambda c: c.vm.mmu.map_leaf(7 * MiB >> 12, 1, _mmu_make_spte(0, 1, False, True)), None),
    ("Mmu.map_run", lambda c: c.vm.mmu.map_run(1 << 20, (1 << 20) + 512, 1, _mmu_make_spte(0, 1, False, True)), None),
    ("RangeMap.assign", lambda c: c.vm.mmu.sptes.assign(1 << 20, (1 << 20) + 1, 1), None),
    ("RangeMap.assign(kw)", lambda c: c.vm.mmu.sptes.assign(1 << 20, (1 << 20) + 1, value=1), None),
    ("RangeMap.assign_many",
     lambda c: c.vm.mmu.sptes.assign_many(np.array([1 << 20], dtype=np.uint64), np.array([(1 << 20) + 1], dtype=np.uint64), 1),
     None),
    ("RangeMap.clear", lambda c: c.vm.mmu.sptes.clear(), None),
    # the host memory
    ("HostMemory.alloc", lambda c: c.vm.hostmem.alloc(1), None),
    ("HostMemory.free", lambda c: c.vm.hostmem.free(next((s for s, _e, _v in c.vm.hostmem._used.ranges()),
                                                          c.vm.hostmem.start_pfn), 1), None),
    ("HostMemory.per_cpu", lambda c: c.vm.hostmem.per_cpu({"vcpu0": c.vm.hostmem.start_pfn}), None),
    # a memslot's lpage_info and its maps, a guest_memfd's maps
    ("LpageInfo.set_mixed", lambda c: c.vm.memslots[0].lpage.set_mixed(0, 2, True), None),
    ("LpageInfo.clear_mixed", lambda c: c.vm.memslots[0].lpage.clear_mixed(0, 4, 2), None),
    ("RangeMap.assign(lpage)", lambda c: c.vm.memslots[0].lpage.maps[3].assign(0, 1, 1), None),
    ("RangeMap.assign(folios)", lambda c: c.spare.folios.assign(0, 1, 1), None),
    ("RangeMap.clear(bindings)", lambda c: c.gmem.bindings.clear(), None),
    # SNP: the RMP, the direct map, the leaked pages, the setters
    ("RmpTable.rmpupdate", lambda c: c.vm.rmp.rmpupdate(0x10, 1, assigned=False), _snp_only),
    ("RmpTable.rmpupdate_range", lambda c: c.vm.rmp.rmpupdate_range(0x10, 1, 1, assigned=True, asid=1), _snp_only),
    ("RmpTable.psmash", lambda c: c.vm.rmp.psmash(0x200), _snp_only),
    ("RmpTable.psmash_range", lambda c: c.vm.rmp.psmash_range(0x200, 512), _snp_only),
    ("RmpTable.pvalidate",
     lambda c: c.vm.rmp.pvalidate(c.gmem.folio(0)[0], 1, asid=1, gpa=0, validate=False), _snp_only),
    ("RmpTable.pvalidate_range",
     lambda c: c.vm.rmp.pvalidate_range(c.gmem.folio(0)[0], 1, 1, asid=1, gpa=0, validate=False), _snp_only),
    ("RmpTable.firmware_update",
     lambda c: c.vm.rmp.firmware_update(c.gmem.folio(0)[0], 1, immutable=True), _snp_only),
    ("RmpTable.set_in_use", lambda c: c.vm.rmp.set_in_use(c.vm.hostmem.start_pfn), _snp_only),
    ("RmpTable.reset_counters", lambda c: c.vm.rmp.reset_counters(), _snp_only),
    ("DirectMap.adjust", lambda c: c.vm.directmap.adjust(c.vm.hostmem.start_pfn + 4096), _snp_only),
    ("DirectMap.invalidate", lambda c: c.vm.directmap.invalidate(c.vm.hostmem.start_pfn + 4096), _snp_only),
    ("DirectMap.restore", lambda c: c.vm.directmap.restore(c.vm.hostmem.start_pfn), _snp_only),
    ("DirectMap.before_rmpupdate",
     lambda c: c.vm.directmap.before_rmpupdate(c.vm.hostmem.start_pfn + 4096, 1, 1, assigned=True), _snp_only),
    ("DirectMap.after_rmpupdate",
     lambda c: c.vm.directmap.after_rmpupdate(c.vm.hostmem.start_pfn, 1, 1, assigned=False), _snp_only),
    ("DirectMap.reset_counters", lambda c: c.vm.directmap.reset_counters(), _snp_only),
    ("RangeMap.assign(leaked)", lambda c: c.vm.snp.leaked.assign(0x10, 0x11, 1), _snp_only),
    ("SnpVm.rmp=", lambda c: setattr(c.vm.snp, "rmp", pkvm.RmpTable()), _snp_only),
    ("SnpVm.directmap=", lambda c: setattr(c.vm.snp, "directmap", DirectMap(c.vm.directmap.ram)), _snp_only),
    # TDX: the S-EPT and its maps, the SEAMCALL layer
    ("Sept.add_tables", lambda c: c.vm.sept.add_tables([(1, 1 << 21, (1 << 21) + 1)]), _tdx_only),
    ("RangeMap.assign(sept leaves)", lambda c: c.vm.sept.leaves.assign(1 << 20, (1 << 20) + 1, 1), _tdx_only),
    ("RangeMap.assign(sept tables)", lambda c: c.vm.sept.tables[2].assign(1 << 20, (1 << 20) + 1, 1), _tdx_only),
    ("RangeMap.assign(guest_inhibit)", lambda c: c.vm.sept.guest_inhibit.assign(0, 1, 1), _tdx_only),
    ("Seamcalls.call", lambda c: c.vm.tdx.seamcalls.call("aug"), _tdx_only),
    ("Seamcalls.mr_extend", lambda c: c.vm.tdx.seamcalls.mr_extend(1, 0), _tdx_only),
    ("Seamcalls.kick_all", lambda c: c.vm.tdx.seamcalls.kick_all(), _tdx_only),
    ("Seamcalls.clear", lambda c: c.vm.tdx.seamcalls.clear(1, 0), _tdx_only),
    ("Seamcalls.inject_busy", lambda c: c.vm.tdx.seamcalls.inject_busy("aug"), _tdx_only),
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
    except (ValueError, TypeError, IndexError):
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
    # the objects reachable from the VM: their reads
    "Mmu.lookup", "Mmu.leaf_counts", "LpageInfo.word", "LpageInfo.disallow_count", "LpageInfo.is_mixed",
    "LpageInfo.any_mixed", "Memslot.hva_page", "Memslot.is_mixed", "Memslot.disallow_lpage",
    "HostMemory.can_alloc", "HostMemory.is_allocated",
    "RangeMap.get", "RangeMap.find_ne", "RangeMap.run_at", "RangeMap.ranges", "RangeMap.iter_ranges",
    "RangeMap.get_many", "RangeMap.copy",  # (a copy belongs to no VM)
    "RmpTable.in_use", "RmpTable.lookup", "RmpTable.ranges", "RmpTable.find_ne", "RmpTable.find_eq",
    "DirectMap.level", "DirectMap.is_present", "DirectMap.boot_level", "DirectMap.ranges",
    "DirectMap.fragmented_pages", "DirectMap.fragmented_fraction",
    "Sept.state", "Sept.level", "Sept.has_table", "Sept.nr_tables", "Sept.is_inhibited", "Sept.runs",
    "Sept.missing_tables", "Seamcalls.armed",
    "_KernelLog.copy", "_KernelLog.count", "_KernelLog.index",
}


@pytest.mark.parametrize("cls", [pkvm.VM, pkvm.Vcpu, SnpVcpu, TdxVcpu, pkvm.GuestMemfd, pkvm.Vmm, pkvm.Guest,
                                 pkvm.AttrIoctl, SnpVm, TdxVm, HypercallGuestFlows, SnpGuestFlows,
                                 TdxGuestFlows, _PlainLaunch, SnpVmmFlows, TdxVmmFlows,
                                 Mmu, LpageInfo, Memslot, HostMemory, pkvm.RangeMap, pkvm.RmpTable, DirectMap,
                                 Sept, Seamcalls, _KernelLog])
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
               "TdxGuestFlows": TdxGuestFlows, "_KernelLog": _KernelLog, "Mmu": Mmu, "LpageInfo": LpageInfo,
               "HostMemory": HostMemory, "RangeMap": pkvm.RangeMap, "RmpTable": pkvm.RmpTable,
               "DirectMap": DirectMap, "Sept": Sept, "Seamcalls": Seamcalls}
    for name, _c, _a in ENTRIES:
        cls, meth = name.split(".")
        meth = meth.split("(")[0]
        if meth.endswith("="):  # a property's setter
            assert getattr(classes[cls], meth[:-1]).fset is not None
            continue
        assert meth in vars(classes[cls]) or meth in vars(classes[cls].__mro__[1]), name
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


#: Every mutating method of list: the kernel log overrides each one.
_LIST_MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "__setitem__",
                  "__delitem__", "__iadd__", "__imul__"}


def test_the_kernel_log_guards_every_list_mutator():
    assert _LIST_MUTATORS <= set(vars(_KernelLog))
    # (the other public methods of list read: copy, count, index)
    assert {n for n in vars(list) if not n.startswith("_")} - _LIST_MUTATORS == {"copy", "count", "index"}
    vm = pkvm.VM("sw_protected")
    vm.events.append(("a", "b"))
    assert vm.events == [("a", "b")] and type(list(vm.events)) is list
    assert type(copy.copy(vm.events)) is list and copy.deepcopy(vm.events) == [("a", "b")]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_copies_and_objects_of_no_vm_may_be_changed_from_a_callback(platform):
    """The refusal is for the VM's live state: a copy of it, an object made on its own, and
    the objects of another VM change freely from a callback (the refusal is per VM)."""
    ctx, other = Ctx(platform), Ctx(platform)
    vm = ctx.vm
    done = []

    def callback(ev):
        if done:
            return
        sptes = vm.mmu.sptes.copy()
        sptes.assign(1 << 20, (1 << 20) + 1, 1)
        sptes.clear()
        log = list(vm.events)
        log.append(("x", "y"))
        lpage = copy.deepcopy(vm.memslots[0].lpage)
        lpage.set_mixed(0, 2, True)
        assert lpage.is_mixed(0, 2) and not vm.memslots[0].lpage.is_mixed(0, 2)
        mem = copy.deepcopy(vm.hostmem)  # (a shallow copy would share its allocation map)
        mem.alloc(1)
        HostMemory().alloc(1)
        pkvm.RangeMap().assign(0, 1, 1)
        rmp = pkvm.RmpTable()
        rmp.rmpupdate(0x10, 1, assigned=True, asid=1)
        other.vm.mmu.sptes.assign(1 << 20, (1 << 20) + 1, 0)
        other.vm.hostmem.alloc(1)
        other.vm.events.append(("x", "y"))
        if platform == "snp":
            dm = copy.deepcopy(vm.directmap)
            dm.reset_counters()
            dm.invalidate(vm.hostmem.start_pfn + 4096)
            other.vm.rmp.set_in_use(0x10)
            other.vm.directmap.reset_counters()
        if platform == "tdx":
            sept = copy.deepcopy(vm.sept)
            sept.add_tables([(1, 1 << 21, (1 << 21) + 1)])
            other.vm.tdx.seamcalls.kick_all()
        done.append(True)

    ref = Ctx(platform)
    with vm.subscribe(callback):
        ctx.outer()
    ref.outer()
    assert done and ctx.state() == ref.state()
    vm.check()


@pytest.mark.parametrize("platform", ("snp", "tdx"))
def test_a_pickled_or_copied_object_belongs_to_no_vm(platform):
    import pickle
    ctx = Ctx(platform)
    objs = [ctx.vm.memslots[0].lpage, ctx.vm.hostmem, ctx.vm.mmu.sptes]
    objs.append(ctx.vm.directmap if platform == "snp" else ctx.vm.sept)
    for obj in objs:
        assert obj._owner is ctx.vm if not isinstance(obj, pkvm.RangeMap) else True
        for clone in (copy.copy, copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
            c = clone(obj)
            if isinstance(c, pkvm.RangeMap):  # (its owner is C-only: a copy's writes are not refused)
                with ctx.vm.subscribe(lambda ev: c.assign(0, 1, 1), "attr_change"):
                    ctx.vm.set_memory_attributes(7 * MiB, 4096, 0)
                assert c.get(0) == 1
                ctx.vm.set_memory_attributes(7 * MiB, 4096, PRIVATE)
            else:
                assert c._owner is None
