"""Builders shared by the TDX tests (not collected: no ``test_`` prefix)."""

from vmhelpers import snapshot

import pkvm

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = pkvm.FALLOC_FL_PUNCH_HOLE | pkvm.FALLOC_FL_KEEP_SIZE
MiB, GiB = 1 << 20, 1 << 30
SHARED47 = 1 << 47


def td(size=8 * MiB, *, policy="6.19", image=(), finalize=True, nr_vcpus=1, shared_backing="thp", gpaw=48,
       vcpus=1):
    """A TD with ``size`` bytes of private RAM at gpa 0 (QEMU style); returns (vm, vmm, gmem, vcpu)."""
    vm = pkvm.VM("tdx", policy=policy, nr_vcpus=nr_vcpus, shared_backing=shared_backing, options={"gpaw": gpaw})
    vmm = pkvm.Vmm(vm)
    gmem = vmm.add_ram(0, size)
    for _ in range(vcpus):
        vm.create_vcpu()
    if finalize:
        vmm.launch(image)
    return vm, vmm, gmem, vm.vcpus[0]


def trace(vm):
    """Start recording SEAMCALLs; returns the list that fills up."""
    vm.tdx.trace = []
    return vm.tdx.trace


def ops(events):
    """``(op, start, end, level)`` of traced events, with the busy ones marked."""
    return [(e.op + (" BUSY" if e.status == pkvm.constants.TDX_OPERAND_BUSY else ""), e.start, e.end, e.level)
            for e in events]


def tdx_snapshot(vm):
    """Everything a failed call must leave untouched, TD state included."""
    sept = vm.sept
    return (snapshot(vm), sept.leaves.ranges(), [t.ranges() for t in sept.tables[1:]], sept.guest_inhibit.ranges(),
            vm.tdx.state, vm.tdx.nr_premapped, vm.vm_dead)


def full_snapshot(vm, *extra):
    """Everything a refused call must leave as it was (and a batch and its loop alike): the
    VM's snapshot, its cost by actor, whether it is dead, the RMP (SNP), the TD's state (TDX),
    and ``extra``."""
    more = [vm.cost_by_actor(), vm.vm_dead, *extra]
    rmp = getattr(vm, "rmp", None)
    if rmp is not None:
        more.append(rmp.ranges())
    if vm.platform.name == "tdx":
        more.append(tdx_snapshot(vm)[1:])
    return snapshot(vm), more


def seamcalls(vm):
    """The nonzero TDX counters."""
    return {k: v for k, v in vm.stats.items() if v and (k.startswith(("seamcall", "tdx_", "tdcall", "tdvmcall"))
                                                         or k == "vcpu_kicks")}
