"""Where the presets differ (docs/workloads.md): ``pkvm policies`` lists every preset's knobs,
and the ``implicit`` workload separates SW_PROTECTED 6.8 from 6.11+, which count alike on the
other workloads; TDX 6.16 and 6.19 differ in the build's ``pf_fixed`` only."""

import os
import subprocess
import sys

import pytest

from pkvm import experiments as E
from pkvm.kvm.policy import _CHOICES, KNOB_SCOPE, Policy, preset_table


def test_every_knob_has_a_scope_and_the_table_matches_the_presets():
    names, table = preset_table()
    assert set(names) == set(Policy.presets()) and names[:4] == ("6.8", "6.11", "6.16", "6.19")
    assert [k for k, _s, _v in table] == list(_CHOICES) and set(KNOB_SCOPE) == set(_CHOICES)
    for knob, _scope, values in table:
        assert values == tuple(str(getattr(Policy.preset(n), knob)) for n in names)


def test_pkvm_policies_prints_the_table():
    p = subprocess.run([sys.executable, "-m", "pkvm", "policies"], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="80"), timeout=120, check=False)
    assert p.returncode == 0 and not p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:5] == ["knob", "6.8", "6.11", "6.16", "6.19"]
    pfs = next(ln.split() for ln in lines if ln.startswith("private_fault_source"))
    assert pfs[1:5] == ["attributes", "access", "access", "access"]


def _counters(platform, workload, policies, **options):
    cfg = E.Config(platform=platform, memory="16M", workload=workload, options=options)
    return {r.policy: (r.counters, r.modeled_ns) for r in E.compare(cfg, policies, seed=3)}


def test_implicit_workload_separates_sw_protected_68_from_611():
    """6.11+ takes the fault type from the access (private_fault_source="access"): a private
    touch of a shared page exits (KVM_EXIT_MEMORY_FAULT) and the VMM converts it. 6.8 takes it
    from the attribute: the page is mapped shared, nothing exits."""
    ops = 40
    res = _counters("sw_protected", "implicit", ["6.8", "6.11", "6.16", "6.19"], ops=str(ops))
    c68, c611 = res["6.8"][0], res["6.11"][0]
    assert c68["memory_fault_exits"] == 0 and c611["memory_fault_exits"] == ops
    assert c611["vmm_conversions"] - c68["vmm_conversions"] == ops
    # 6.11, 6.16 and 6.19 change nothing a synchronous SW_PROTECTED run can see.
    assert res["6.11"] == res["6.16"] == res["6.19"]


@pytest.mark.parametrize("workload", ["boot", "implicit"])
def test_tdx_616_and_619_differ_in_the_build_only(workload):
    """6.16 premaps the initial image with a prefetch fault (pf_fixed counts it) before
    TDH.MEM.PAGE.ADD; 6.19 adds it from the S-EPT hook. Same SEAMCALLs, same modeled time."""
    res = _counters("tdx", workload, ["6.16", "6.19"], **({"ops": "20"} if workload == "implicit" else {}))
    (a, ns_a), (b, ns_b) = res["6.16"], res["6.19"]
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"pf_fixed"} and a["pf_fixed"] - b["pf_fixed"] == a["seamcall_add"] > 0  # one per image page
    assert ns_a == ns_b
