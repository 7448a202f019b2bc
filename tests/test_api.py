"""The public API does not move: the names of ``pkvm.__all__`` and the pre-layout module names.

The layered layout (``docs/design.md``, "Layers") moved every module into a subpackage; the old
dotted names stay importable as aliases that are the very same module objects.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import pkvm

PUBLIC_NAMES = {
    "ATTR_PHASES", "AccessResult", "AttrIoctl", "CostModel", "DirectMap", "DIRECTMAP_POLICIES", "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE", "FaultBatch", "FaultBatchError", "FaultResult", "Guest", "GuestMemfd", "GuestOpResult", "Hypercall",
    "InternalInvariantError", "KVM_CAP_EXIT_HYPERCALL", "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_MEMORY_ATTRIBUTES", "KVM_EXIT_HYPERCALL", "KVM_EXIT_MEMORY_FAULT",
    "KVM_HC_MAP_GPA_RANGE", "KVM_MAP_GPA_RANGE_DECRYPTED", "KVM_MAP_GPA_RANGE_ENCRYPTED",
    "KVM_MEM_GUEST_MEMFD", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE", "KVM_MEMORY_EXIT_FLAG_PRIVATE", "KVM_TDX_MEASURE_MEMORY_REGION",
    "KVM_X86_DEFAULT_VM", "KVM_X86_SNP_VM", "KVM_X86_SW_PROTECTED_VM", "KVM_X86_TDX_VM",
    "ConfigError", "KvmError", "Memslot", "PG_LEVEL_1G", "PG_LEVEL_2M", "PG_LEVEL_4K", "PkvmError",
    "PlatformRegistrationError", "Policy", "TracePlatformError", "PSMASH_FAIL_INPUT", "PSMASH_FAIL_INUSE",
    "PSMASH_FAIL_PERMISSION", "PSMASH_SUCCESS", "PVALIDATE_FAIL_INPUT", "PVALIDATE_FAIL_NOUPDATE",
    "PVALIDATE_FAIL_SIZEMISMATCH", "PVALIDATE_NPF_RMP", "PVALIDATE_NPF_SIZEM", "PVALIDATE_SUCCESS",
    "RangeMap", "RmpEntry", "RmpTable", "RMPUPDATE_FAIL_INPUT", "RMPUPDATE_FAIL_INUSE",
    "RMPUPDATE_FAIL_OVERLAP", "RMPUPDATE_FAIL_PERMISSION", "RMPUPDATE_SUCCESS", "Vcpu", "VM",
    "Vmm", "__version__",
    # structured events (docs/events.md)
    "Event", "EVENT_KINDS", "Subscription",
    # pkvm as a component (docs/embedding.md): results that say why, the fault and PSC objects
    "ConversionResult", "ExitResult", "PageFault", "PscDesc", "PscEntry",
}

#: Pre-layout public module name -> the module it is now.
OLD_MODULES = {
    "pkvm.costs": "pkvm.cost.model",
    "pkvm.ledger": "pkvm.cost.ledger",
    "pkvm.hostmem": "pkvm.host.hostmem",
    "pkvm.directmap": "pkvm.host.directmap",
    "pkvm.vm": "pkvm.kvm.vm",
    "pkvm.mmu": "pkvm.kvm.mmu",
    "pkvm.gmem": "pkvm.kvm.gmem",
    "pkvm.exits": "pkvm.kvm.exits",
    "pkvm.policy": "pkvm.kvm.policy",
    "pkvm.snp_constants": "pkvm.platforms.snp_constants",
    "pkvm.guest": "pkvm.actors.guest",
    "pkvm.vmm": "pkvm.actors.vmm",
    "pkvm.trace": "pkvm.experiments.trace",
    "pkvm.workloads": "pkvm.experiments.workloads",
    "pkvm.report": "pkvm.experiments.report",
}


def test_all_is_pinned():
    assert set(pkvm.__all__) == PUBLIC_NAMES
    assert len(pkvm.__all__) == len(PUBLIC_NAMES)
    for name in pkvm.__all__:
        assert getattr(pkvm, name) is not None, name


def test_public_classes_live_in_their_layer():
    assert pkvm.VM.__module__ == "pkvm.kvm.vm"
    assert pkvm.CostModel.__module__ == "pkvm.cost.model"
    assert pkvm.DirectMap.__module__ == "pkvm.host.directmap"
    assert pkvm.Guest.__module__ == "pkvm.actors.guest"
    assert pkvm.Vmm.__module__ == "pkvm.actors.vmm"


@pytest.mark.parametrize("old, new", sorted(OLD_MODULES.items()))
def test_old_module_name_is_the_new_module(old, new):
    mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)
    assert mod.__name__ == new and mod.__spec__.name == new
    assert sys.modules[old] is mod
    assert getattr(pkvm, old.split(".")[1]) is mod


def test_old_names_in_import_statements():
    import pkvm.vm
    from pkvm.costs import CostModel
    from pkvm.trace import Tracer

    assert pkvm.vm.VM is pkvm.VM
    assert CostModel is pkvm.CostModel
    assert Tracer is pkvm.experiments.trace.Tracer


def test_old_names_in_a_fresh_interpreter():
    """In a new process the old name alone (no new name imported first) gives the new module."""
    code = ("import pkvm.workloads as w, pkvm.report as r, sys; "
            "assert w is sys.modules['pkvm.experiments.workloads']; "
            "assert r is sys.modules['pkvm.experiments.report']; "
            "from pkvm.snp_constants import PVALIDATE_SUCCESS; print(w.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(pkvm.__file__).resolve().parents[1])
    assert out.stdout.strip() == "pkvm.experiments.workloads"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'pkvm' has no attribute 'no_such_module'"):
        pkvm.no_such_module  # noqa: B018
    with pytest.raises(ModuleNotFoundError, match="No module named 'pkvm.no_such_module'"):
        importlib.import_module("pkvm.no_such_module")


def test_private_old_names_are_gone():
    for name in ("pkvm._reference", "pkvm._memslots", "pkvm._vm_check", "pkvm._replay", "pkvm._cost_table"):
        with pytest.raises(ModuleNotFoundError, match=f"No module named '{name}'"):
            importlib.import_module(name)
