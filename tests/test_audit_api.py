"""Bad input at the Python API's edges that the hypothesis fuzz of ``test_refused_calls.py``
does not reach: the actors (``Vmm``, ``Guest``), ``GuestMemfd.folio``, ``CostModel.default``
and ``experiments.Config``. Each raises only its documented exception types, and a refused
call changes nothing (the same snapshot as the fuzz compares)."""

import errno

import pytest
from tdxhelpers import full_snapshot

import pkvm
from pkvm import experiments

MiB = 1 << 20
U64 = 1 << 64


def _actors(platform="sw_protected"):
    vm = pkvm.VM(platform, policy="6.19")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    return vm, vmm, pkvm.Guest(vm, vmm)


# -- GuestMemfd.folio ------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [-1, U64, 1 << 100])
def test_gmem_folio_out_of_range_is_a_value_error(index):
    """``gmem.folio(-1)`` raised the RangeMap's OverflowError; as ``vm.get_memory_attributes``,
    an index that is not a u64 is a ValueError naming it."""
    vm, vmm, _ = _actors()
    gmem = vm._gmems[0]
    with pytest.raises(ValueError, match="index") as e:
        gmem.folio(index)
    assert not isinstance(e.value, OverflowError)
    with pytest.raises(TypeError, match="index must be an int, not str"):
        gmem.folio("0")  # type: ignore[arg-type]
    assert gmem.folio(0) is None and gmem.folio(U64 - 1) is None


# -- CostModel.default ------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["snp", "default", "sw_protected"])
@pytest.mark.parametrize("host", ["arm", 5, ""])
def test_cost_model_default_unknown_host_is_a_value_error(profile, host):
    """``CostModel.default("snp", host="arm")`` raised KeyError('arm'): the docstring
    promises ValueError for a host the platform cannot run on."""
    with pytest.raises(ValueError, match=f"profile '{profile}' runs on host"):
        pkvm.CostModel.default(profile, host=host)


def test_cost_model_default_unhashable_host_is_a_value_error():
    with pytest.raises(ValueError, match="runs on host"):
        pkvm.CostModel.default("snp", host=[])  # type: ignore[arg-type]


# -- experiments.Config ------------------------------------------------------------------------------

_BASE = dict(platform="snp", memory="64M", workload="swiotlb", options={"ops": "5"})


@pytest.mark.parametrize("field, value", [
    ("workload", []), ("workload", None), ("workload", 5),
    ("options", None), ("options", 1), ("options", "ops=5"), ("options", [("ops", "5")]),
    ("costs", None), ("costs", 1.5), ("costs", "rmpupdate=1us"),
    ("trace_events", 3), ("trace_events", [3]),
])
def test_config_wrong_type_is_a_value_error_naming_the_field(field, value):
    """``Config(options=None)`` raised "TypeError: 'NoneType' object is not iterable",
    ``Config(workload=[])`` "unhashable type: 'list'": neither names the field nor is the
    ValueError the docstring promises for any bad field."""
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        experiments.Config(**{**_BASE, field: value})


# -- Vmm.add_ram / add_ram_layout: all or nothing ------------------------------------------------------

@pytest.mark.parametrize("platform", ["sw_protected", "snp", "tdx"])
@pytest.mark.parametrize("kwargs", [
    dict(gpa=0x1000, size=2 * MiB),                 # overlaps slot 0: EEXIST
    dict(gpa=1 << 32, size=2 * MiB, slot=0),        # slot 0 exists (a guest_memfd slot): EINVAL
    dict(gpa=1 << 32, size=2 * MiB, slot=1 << 40),  # not a u32: ValueError
    dict(gpa=1 << 32, size=2 * MiB, slot=-1),
    dict(gpa=1 << 32, size=2 * MiB, slot=True),     # TypeError
    dict(gpa=0x1001, size=2 * MiB),                 # unaligned: EINVAL
    dict(gpa=True, size=2 * MiB),
    dict(gpa=1.0, size=2 * MiB),
    dict(gpa=-0x1000, size=2 * MiB),
    dict(gpa=U64 - 0x1000, size=2 * MiB),           # wraps
    dict(gpa=1 << 52, size=2 * MiB),                # past the guest's largest gfn
    dict(gpa=0x1000, size=2 * MiB, prealloc=True),
    dict(gpa=1 << 52, size=2 * MiB, prealloc=True),
])
def test_a_refused_add_ram_changes_nothing(platform, kwargs):
    """``vmm.add_ram`` created the guest_memfd (and with ``prealloc`` allocated all of it,
    charging the modeled time) before the memslot was refused: the VM kept a stray file,
    host memory and time, and the VMM its slot counter. Every check now runs before
    anything is created."""
    vm = pkvm.VM(platform, policy="6.19")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    before, slot = full_snapshot(vm, len(vm._gmems)), vmm._next_slot
    with pytest.raises((pkvm.KvmError, ValueError, TypeError)):
        vmm.add_ram(**kwargs)
    assert full_snapshot(vm, len(vm._gmems)) == before
    assert vmm._next_slot == slot
    vmm.add_ram(1 << 32, 2 * MiB, prealloc=True)  # and the VMM goes on as before
    assert vm.memslot(1) is not None
    vm.check()


def test_add_ram_keeps_the_errno_of_the_call_that_refuses():
    vm, vmm, _ = _actors()
    with pytest.raises(pkvm.KvmError) as e:
        vmm.add_ram(0x1000, 2 * MiB)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(pkvm.KvmError, match="guest_memfd size 0x0") as e:
        vmm.add_ram(1 << 32, 0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(pkvm.KvmError, match="not 4 KiB aligned") as e:
        vmm.add_ram((1 << 32) + 0x800, 2 * MiB)
    vm._kill("test")
    with pytest.raises(pkvm.KvmError) as e:
        vmm.add_ram(1 << 32, 2 * MiB)
    assert e.value.errno == errno.EIO


@pytest.mark.parametrize("platform", ["sw_protected", "snp"])
@pytest.mark.parametrize("memory, prealloc_from", [(1 << 52, None), (1 << 52, 0), (64 * MiB, 128 * MiB),
                                                   (64 * MiB, 0x1001), (64 * MiB, -0x1000)])
def test_a_refused_add_ram_layout_changes_nothing(platform, memory, prealloc_from):
    """The same for ``add_ram_layout``: a layout past the VM's gfns left a guest_memfd (and
    its preallocation) behind; a ``prealloc_from`` past the memory or unaligned left the
    guest_memfd behind."""
    vm = pkvm.VM(platform, policy="6.19")
    vmm = pkvm.Vmm(vm)
    before = full_snapshot(vm, len(vm._gmems))
    with pytest.raises((pkvm.KvmError, ValueError, TypeError)):
        vmm.add_ram_layout(memory, prealloc_from=prealloc_from)
    assert full_snapshot(vm, len(vm._gmems)) == before and vmm._next_slot == 0
    vmm.add_ram_layout(64 * MiB, prealloc_from=32 * MiB)
    vm.check()


# -- Vmm.convert_memory / discard_ram / handle_exit ------------------------------------------------

@pytest.mark.parametrize("gpa, size", [(-0x1000, 0x1000), (0x1000, -0x1000), (1 << 80, 0x1000),
                                       (U64 - 0x1000, 0x2000)])
def test_convert_memory_out_of_range_returns_einval(gpa, size):
    """``vmm.convert_memory(-0x1000, ...)`` raised the RangeMap's OverflowError, ``size=-0x1000``
    a ValueError: the call returns a negative errno (QEMU's ``kvm_convert_memory``), and a
    range that is no u64 range is ``-EINVAL`` with nothing changed."""
    vm, vmm, _ = _actors()
    before = full_snapshot(vm)
    assert vmm.convert_memory(gpa, size, True) == -errno.EINVAL
    assert vmm.convert_memory(gpa, size, False) == -errno.EINVAL
    assert full_snapshot(vm) == before


@pytest.mark.parametrize("gpa, size", [(1 << 80, 0x1000), (U64 - 0x1000, 0x2000), (0x1000, U64)])
def test_discard_ram_out_of_range_is_a_value_error(gpa, size):
    """``vmm.discard_ram(1 << 80, 0x1000)`` raised OverflowError from the memslot map."""
    vm, vmm, _ = _actors()
    before = full_snapshot(vm)
    with pytest.raises(ValueError, match="4 KiB aligned range"):
        vmm.discard_ram(gpa, size)
    assert full_snapshot(vm) == before


@pytest.mark.parametrize("result", [None, 0, "exit", object()])
def test_handle_exit_of_something_else_is_a_type_error(result):
    """``vmm.handle_exit(vcpu, None)`` raised AttributeError ('NoneType' object has no
    attribute 'exit_reason')."""
    vm, vmm, guest = _actors()
    before = full_snapshot(vm)
    with pytest.raises(TypeError, match="result must be"):
        vmm.handle_exit(guest.vcpu, result)
    assert full_snapshot(vm) == before


# -- Guest: a range past 2**64 ------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["sw_protected", "snp", "tdx"])
@pytest.mark.parametrize("call", ["convert", "accept", "touch"])
@pytest.mark.parametrize("gpa, size", [(0x200000, U64), (1 << 80, 0x1000), (U64 - 0x1000, 0x2000)])
def test_guest_range_past_a_u64_is_refused_before_the_guest_runs(platform, call, gpa, size):
    """``guest.convert(0x200000, 2**64, private=False)`` ran the guest's hypercall (a VM exit
    and a userspace exit charged to the vCPU) and then raised ValueError from the VMM's
    ioctl: the range is checked first now, as the docstring's "a bad range" says."""
    if platform == "tdx":
        from tdxhelpers import td
        vm, vmm, _gmem, vcpu = td(4 * MiB)
        guest = pkvm.Guest(vm, vmm, vcpu)
    else:
        vm, vmm, guest = _actors(platform)
    before = full_snapshot(vm)
    kw = {"convert": {"private": False}, "accept": {}, "touch": {"private": True}}[call]
    with pytest.raises(ValueError, match="range"):
        getattr(guest, call)(gpa, size, **kw)
    assert full_snapshot(vm) == before


# -- KVM_SET_USER_MEMORY_REGION2 past the guest physical address space -----------------------------

@pytest.mark.parametrize("platform", ["sw_protected", "snp", "default"])
@pytest.mark.parametrize("gpa, size", [(1 << 52, 0x1000), ((1 << 52) - 0x1000, 0x2000), (1 << 63, 1 << 21)])
def test_a_memslot_past_52_bits_is_einval(platform, gpa, size):
    """A memslot at gpa 2**52 was created on every VM but a TD, though no fault can reach it
    (``page_fault`` refuses gpas past 52 bits): ``kvm_arch_prepare_memory_region`` refuses a
    slot that ends past ``kvm_mmu_max_gfn()`` with EINVAL, and nothing changes."""
    vm = pkvm.VM(platform, policy="6.19")
    vm.set_user_memory_region2(0, 0, 0, 2 * MiB, 1 << 40)
    before = full_snapshot(vm)
    with pytest.raises(pkvm.KvmError, match="kvm_mmu_max_gfn") as e:
        vm.set_user_memory_region2(1, 0, gpa, size, 1 << 41)
    assert e.value.errno == errno.EINVAL and full_snapshot(vm) == before
    with pytest.raises(pkvm.KvmError, match="kvm_mmu_max_gfn"):  # a move there, too
        vm.set_user_memory_region2(0, 0, (1 << 52) - 0x1000, 2 * MiB, 1 << 40)
    assert full_snapshot(vm) == before
    vm.set_user_memory_region2(1, 0, (1 << 52) - 2 * MiB, 2 * MiB, 1 << 41)  # the last 2M fits
    assert vm.create_vcpu().page_fault((1 << 52) - 0x1000, private=False).ret == "fixed"
    vm.check()


def test_a_failed_pre_fault_keeps_one_attempt_and_nothing_else():
    """``KVM_PRE_FAULT_MEMORY`` outside memslots fails with ENOENT after the fault path ran: as
    docs/kvm-model.md says, the call keeps one ``pre_fault_page`` of modeled time and changes
    nothing else (no SPTE, attribute, memslot, folio or counter)."""
    vm, _vmm, guest = _actors()
    before = full_snapshot(vm)
    with pytest.raises(pkvm.KvmError) as e:
        guest.vcpu.pre_fault_memory(1 << 40, 0x1000)
    assert e.value.errno == errno.ENOENT
    after = full_snapshot(vm)
    assert after[0][:5] == before[0][:5] and after[0][7:] == before[0][7:]
    assert after[0][5] - before[0][5] == vm.costs.ns("pre_fault_page")
    assert {k: v for k, v in after[0][6].items() if before[0][6].get(k) != v} == {
        "pre_fault_page": vm.costs.ns("pre_fault_page")}


# -- SNP: the GHCB page-state-change descriptor --------------------------------------------------

def _snp_guest():
    vm = pkvm.VM("snp", policy="fault-time")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 4 * MiB)
    vmm.launch([])
    return vm, vm.vcpus[0]


@pytest.mark.parametrize("desc, exc, match", [
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, 1)], cur_entry=-1, end_entry=0), ValueError, "desc.cur_entry=-1"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, 1)], cur_entry="0", end_entry=0), TypeError, "desc.cur_entry"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, 1)], cur_entry=0, end_entry=None), TypeError, "desc.end_entry"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, 1)], cur_entry=0, end_entry=-2), ValueError, "desc.end_entry=-2"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, 1, cur_page=-5)], 0, 0), ValueError, r"entries\[0\].cur_page=-5"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(-1, 1)], 0, 0), ValueError, r"entries\[0\].gfn=-1"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1 << 40, 1)], 0, 0), ValueError, r"entries\[0\].gfn"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry("1", 1)], 0, 0), TypeError, r"entries\[0\].gfn must be an int"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, True)], 0, 0), TypeError, r"entries\[0\].op must be an int, not bool"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, 1, huge="x")], 0, 0), TypeError, r"entries\[0\].huge must be a bool"),
    (lambda: pkvm.PscDesc([pkvm.PscEntry(1, 1), 5], 0, 1), TypeError, r"entries\[1\] must be a PscEntry"),
    (lambda: pkvm.PscDesc.of("1"), TypeError, r"entries\[0\] must be a PscEntry, not str"),
])
def test_a_malformed_psc_descriptor_is_refused_before_it_runs(desc, exc, match):
    """``vcpu.psc`` walked a descriptor it never checked: ``cur_entry=-1`` processed the last
    entry (Python's negative index), ``cur_page=-5`` converted gfns before the entry's, a str
    gfn raised TypeError after the exit was charged, a non-entry AttributeError. Fields that
    do not fit ``struct snp_psc_desc`` are refused first, and nothing changes."""
    vm, vcpu = _snp_guest()
    before = full_snapshot(vm)
    with pytest.raises(exc, match=match):
        vcpu.psc(desc())
    assert full_snapshot(vm) == before
    assert vcpu.psc(pkvm.PscDesc.of([pkvm.PscEntry(0x200, 2, True)])).ret == "exit"  # still usable


# -- sensitivity: the counting run splits time by actor as the run does --------------------------

@pytest.mark.parametrize("platform", ["snp", "tdx"])
@pytest.mark.parametrize("workload", ["mixed", "implicit"])
def test_a_counting_run_charges_the_actor_the_run_charges(platform, workload):
    """``count_run`` runs the workload without the timeline, where ``Context.run_on`` ran the
    vCPU's task in the caller's actor: the implicit round trip's PVALIDATE (SNP) was charged to
    the VMM, not vcpu0. Re-pricing then did not reproduce the simulated run, and every
    ``pkvm sensitivity --workload mixed`` (or implicit) simulated every sample instead (docs/
    sensitivity.md's 64 GiB mixed row, 61,440 samples per policy, would take days)."""
    import numpy as np

    from pkvm.experiments.uncertainty import _reprices_nominal, linear_metrics, reprice

    cfg = experiments.Config(platform=platform, memory="64M", workload=workload, options={"ops": "200"})
    result, ledger = experiments.run(cfg, 0), experiments.count_run(cfg, 0)
    lin = sorted(linear_metrics(ledger))
    got = dict(zip(lin, reprice(cfg.cost_model(), ledger, [], np.zeros((1, 0)), lin)[0]))
    want = result.metrics(wall=False)
    assert {m: int(v) for m, v in got.items() if m.startswith("by_actor")} == {
        m: v for m, v in want.items() if m.startswith("by_actor") and m in got}
    assert _reprices_nominal(cfg.cost_model(), ledger, result)
