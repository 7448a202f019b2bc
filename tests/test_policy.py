"""pkvm.Policy: knobs, presets and validation (docs/design.md#policies-and-kernel-versions, kernel-semantics.md Appendix A)."""

import dataclasses

import pytest

import pkvm
from pkvm.kvm.policy import resolve_policy


@pytest.mark.parametrize("name", ["6.8", "6.11", "6.16", "6.19", "fault-time", "eager-post", "rfc-v8", "eager-locked"])
def test_presets_exist(name):
    """Every preset of docs/design.md#policies-and-kernel-versions builds a valid Policy."""
    p = pkvm.Policy.preset(name)
    assert isinstance(p, pkvm.Policy)
    assert name in pkvm.Policy.presets()


@pytest.mark.parametrize("name", ["eager-post", "eager-locked", "eager-split"])
def test_design_presets_are_619_with_the_rmpupdate_moved(name):
    """A design preset differs from 6.19 only in where RMPUPDATE runs and the RFC direct map."""
    base = pkvm.Policy.preset("6.19")
    assert pkvm.Policy.preset(name) == base.replace(rmp_update=name, directmap="unmap-restore")


def test_preset_aliases():
    """fault-time is 6.19; rfc-v8 is the whole historical kernel, with the eager-post design."""
    assert pkvm.Policy.preset("fault-time") == pkvm.Policy.preset("6.19") == pkvm.Policy()
    rfc = pkvm.Policy.preset("rfc-v8")
    assert (rfc.rmp_update, rfc.directmap, rfc.prepare) == ("eager-post", "unmap-restore", "none")


@pytest.mark.parametrize(("name", "knobs"), [
    ("6.8", dict(prepare="none", zap_filter="all", hugepage_guard=False, mixed_head_in_slot="start-only",
                 private_fault_source="attributes")),
    ("6.11", dict(prepare="once-per-folio", zap_filter="all", hugepage_guard=False, mixed_head_in_slot="whole-chunk",
                  private_fault_source="access")),
    ("6.16", dict(prepare="once-per-folio", zap_filter="old-type", hugepage_guard=True)),
    ("6.19", dict(rmp_update="fault-time", directmap="split-4k", attr_ioctl="all-or-nothing", gmem_max_order=0)),
    ("rfc-v8", dict(rmp_update="eager-post", directmap="unmap-restore", attr_ioctl="legacy-progress")),
])
def test_preset_knobs_follow_the_timeline(name, knobs):
    """Presets switch the knobs at the versions of the kernel-semantics.md §0.2 timeline."""
    p = pkvm.Policy.preset(name)
    assert {k: getattr(p, k) for k in knobs} == knobs


@pytest.mark.parametrize(("knob", "value"), [
    ("rmp_update", "lazy"), ("directmap", "none"), ("prepare", "always"), ("zap_filter", "new-type"),
    ("hugepage_guard", 1), ("attr_ioctl", "partial"), ("gmem_max_order", 18), ("gmem_max_order", True),
    ("mixed_head_in_slot", "end-only"), ("private_fault_source", "rmp"),
])
def test_invalid_knob_value_is_valueerror(knob, value):
    """A knob value outside its choices raises ValueError naming the knob and the choices."""
    with pytest.raises(ValueError, match=f"Policy.{knob}=.* is not one of"):
        pkvm.Policy(**{knob: value})


def test_unknown_preset_and_knob():
    """Unknown preset names and knob names raise ValueError listing what exists."""
    with pytest.raises(ValueError, match="unknown policy preset '7.0'; presets are 6.11, 6.16"):
        pkvm.Policy.preset("7.0")
    with pytest.raises(ValueError, match="unknown Policy knob"):
        pkvm.Policy().replace(rmp="x")
    with pytest.raises(TypeError, match="policy must be a pkvm.Policy or a preset name"):
        resolve_policy(6.8)


def test_policy_is_frozen_and_replace_validates():
    """Policy is immutable; replace() returns a validated copy."""
    p = pkvm.Policy()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign"):
        p.prepare = "none"
    assert p.replace(gmem_max_order=9).gmem_max_order == 9
    with pytest.raises(ValueError, match="gmem_max_order=3"):
        p.replace(gmem_max_order=3)


def test_vm_accepts_policy_or_name():
    """VM(policy=...) takes a Policy or a preset name."""
    assert pkvm.VM(1, policy="6.8").policy == pkvm.Policy.preset("6.8")
    custom = pkvm.Policy().replace(hugepage_guard=False)
    assert pkvm.VM(1, policy=custom).policy is custom


def test_policy_spec_strings():
    from pkvm.kvm.policy import resolve_policy

    p = resolve_policy("eager-locked+directmap=split-4k+hugepage_guard=false")
    assert p == pkvm.Policy.preset("eager-locked").replace(directmap="split-4k", hugepage_guard=False)
    assert resolve_policy("6.19+gmem_max_order=9").gmem_max_order == 9
    vm = pkvm.VM("snp", policy="eager-post+directmap=split-4k")
    assert vm.policy.rmp_update == "eager-post" and vm.policy.directmap == "split-4k"


@pytest.mark.parametrize("spec, match", [
    ("eager-post+directmap", "knob=value"),
    ("eager-post+nope=1", "knob=value"),
    ("eager-post+directmap=huge", "not one of"),
    ("7.1+directmap=split-4k", "unknown policy preset"),
    ("6.19+gmem_max_order=3", "not one of"),
    # a knob given twice is ambiguous, whether the values differ or not
    ("eager-post+directmap=split-4k+directmap=unmap-restore",
     r"gives knob directmap twice \(directmap=split-4k and directmap=unmap-restore\)"),
    ("6.19+gmem_max_order=9+gmem_max_order=9", "gives knob gmem_max_order twice"),
])
def test_policy_spec_errors(spec, match):
    from pkvm.kvm.policy import resolve_policy

    with pytest.raises(ValueError, match=match):
        resolve_policy(spec)
