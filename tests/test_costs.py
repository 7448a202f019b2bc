"""Tests of pkvm.cost.model: the §0 table, profiles, overrides, serialisation and the Ledger."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm.cost.ledger import Ledger
from pkvm.cost.model import (
    MAX_NS,
    OPERATIONS,
    PROFILES,
    REFERENCE_FIGURES,
    Cost,
    CostModel,
    UnknownOperationError,
    format_table,
    parse_ns,
)
from pkvm.testing.strategies import cost_models

ROOT = Path(__file__).resolve().parents[1]

# docs/costs.md §0, transcribed by hand once: (row, operation, profile/host, default ns,
# low ns, high ns, confidence[, slope, slope low, slope high]). Profile None means "the same in
# every profile". Times are the spec's µs/ms converted to ns.
COST_ROWS = [
    (1, "vmexit", ("snp", "amd"), 500, 300, 800, "M"),
    (2, "userspace_exit", None, 1_000, 800, 2_000, "M"),
    (3, "vmexit", ("sw_protected", "intel"), 600, 400, 1_000, "E"),
    (4, "ghcb_exit", None, 2_000, 1_000, 4_000, "E"),
    (5, "vmexit", ("tdx", "intel"), 650, 500, 1_000, "L"),
    (6, "td_vmm_exit", None, 3_900, 3_000, 6_000, "L"),
    (7, "npf_fault", None, 1_500, 1_000, 3_000, "E"),
    (8, "npf_fault_alloc", None, 4_000, 2_000, 12_000, "L"),
    (9, "tdx_private_fault", None, 8_000, 6_000, 15_000, "M"),
    (10, "tdx_private_fault_storm", None, 150_000, 8_000, 153_000, "M"),
    (13, "tdx_accept_4k", None, 1_500, 1_000, 3_000, "E"),
    (14, "seamcall_aug", None, 4_300, 2_300, 11_300, "E"),
    (15, "seamcall_add", None, 3_000, 2_000, 6_000, "E"),
    (16, "seamcall_mr_extend", None, 10_000, 5_000, 30_000, "E"),
    (17, "seamcall_block", None, 1_000, 500, 3_000, "E"),
    (17, "seamcall_track", None, 1_000, 500, 3_000, "E"),
    (17, "seamcall_remove", None, 1_500, 500, 3_000, "E"),
    (18, "seamcall_wbinvd", None, 1_500, 1_000, 4_000, "E"),
    (19, "map_gpa", None, 15_000, 8_000, 40_000, "E"),
    (20, "ipi", None, 1_200, 1_000, 1_500, "M"),
    (20, "vcpu_kick", None, 1_200, 1_000, 1_500, "M"),
    (21, "remote_tlb_flush", None, 1_500, 1_000, 1_500, "E", 150, 100, 1_500),
    (22, "rmpupdate", None, 500, 200, 2_000, "E"),
    (23, "psmash", None, 1_000, 500, 5_000, "E"),
    (24, "pvalidate_4k", None, 300, 100, 1_000, "E"),
    (24, "pvalidate_2m", None, 1_000, 500, 3_000, "E"),
    (25, "rmpadjust", None, 300, 100, 1_000, "E"),
    (26, "psc_request", None, 10_000, 5_000, 50_000, "E"),
    (27, "psc_entry", None, 1_000, 500, 3_000, "E"),
    (28, "attr_store", None, 100, 50, 500, "E"),
    (29, "gmem_alloc_4k", None, 700, 400, 2_000, "E"),
    (29, "gmem_alloc_2m", None, 100_000, 50_000, 300_000, "E"),
    (29, "gmem_alloc_1g", None, 60_000_000, 30_000_000, 150_000_000, "E"),
    (30, "gmem_punch_4k", None, 1_500, 1_000, 5_000, "E"),
    (31, "directmap_split", None, 3_000, 1_000, 10_000, "E"),
    (32, "directmap_tlb_flush", None, 5_000, 5_000, 100_000, "E", 150, 100, 1_500),
]

# Rows that are not per-operation times: (row, name, value, low, high, unit prefix, confidence).
REFERENCE_ROWS = [
    (11, "tdx_accept_drain_1vcpu", 4.0, 3.0, 5.0, "s/GiB", "M"),
    (12, "tdx_accept_drain_32vcpu", 2.8, 2.0, 2.9, "s/GiB", "M"),
    (33, "directmap_fragmentation", -0.5, -3.0, 0.0, "% throughput", "M"),
    (34, "backing_4k_latency", 40.0, None, None, "ns", "M"),
    (34, "backing_4k_bandwidth", -36.0, None, None, "% RAM bandwidth", "M"),
    (35, "tdx_lazy_accept_boot_speedup_4g", 2.5, None, None, "x faster", "H"),
    (35, "tdx_lazy_accept_boot_speedup_64g", 4.0, None, None, "x faster", "H"),
]

# pkvm's additions (no §0 row): each must be an estimate with its derivation in the source.
ADDED = ["seamcall_sept_add", "zap_spte", "cache_flush_4k", "huge_page_split", "directmap_cpa_call",
         "sleep_in_atomic",
         "psp_launch_update", "pre_fault_page", "seamcall_aug_sept", "attr_check_gfn",
         "attr_check_2m"]

ALL_MODELS = [CostModel.default(p) for p in PROFILES] + [
    CostModel.default("sw_protected", host="intel"), CostModel.default("default", host="intel")]


def _id(row):
    return f"row{row[0]}-{row[1]}"


# ---- the §0 table ------------------------------------------------------------------------

@pytest.mark.parametrize("row", COST_ROWS, ids=_id)
def test_cost_row_matches_spec(row):
    """Each §0 time row has its default, range and confidence in the profiles it applies to."""
    number, op, where, value, low, high, conf, *slope = row
    models = [CostModel.default(where[0], host=where[1])] if where else ALL_MODELS
    for model in models:
        c = model[op]
        assert (c.row, c.value_ns, c.low_ns, c.high_ns, c.confidence) == (number, value, low, high, conf)
        assert (c.slope_ns, c.slope_low_ns, c.slope_high_ns) == (tuple(slope) or (None,) * 3)
        assert c.source and c.unit.startswith("per ")


@pytest.mark.parametrize("row", REFERENCE_ROWS, ids=_id)
def test_reference_row_matches_spec(row):
    """Each §0 row that is a rate, percentage or ratio is a reference figure with its values."""
    number, name, value, low, high, unit, conf = row
    f = REFERENCE_FIGURES[name]
    assert (f.row, f.value, f.low, f.high, f.confidence) == (number, value, low, high, conf)
    assert f.unit.startswith(unit) and f.source


def test_every_spec_row_is_represented():
    """Rows 1-35 all appear, as a cost in some profile or as a reference figure."""
    rows = {c.row for m in ALL_MODELS for c in m.values()} | {f.row for f in REFERENCE_FIGURES.values()}
    assert rows - {None} == set(range(1, 36))
    transcribed = {(r[0], r[1]) for r in COST_ROWS}
    in_models = {(c.row, c.name) for m in ALL_MODELS for c in m.values() if c.row is not None}
    assert in_models == transcribed


@pytest.mark.parametrize("op", ADDED)
def test_added_operations_are_marked_estimates(op):
    """Operations pkvm added have no row, confidence E, and say where the number came from."""
    c = CostModel.default()[op]
    assert c.row is None and c.confidence == "E"
    assert c.source.startswith(("pkvm estimate", "not a cost"))


def test_no_unlisted_operations():
    """The catalogue is exactly the transcribed rows plus pkvm's additions."""
    assert set(OPERATIONS) == {r[1] for r in COST_ROWS} | set(ADDED)
    assert len(OPERATIONS) == len(set(OPERATIONS))


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: f"{m.profile}-{m.host}")
def test_defaults_lie_in_their_ranges(model):
    """Every default value (and slope) is inside the range its source gives."""
    for c in model.values():
        assert c.low_ns <= c.value_ns <= c.high_ns, c.name
        if c.is_formula:
            assert c.slope_low_ns <= c.slope_ns <= c.slope_high_ns, c.name


def test_includes_name_known_operations():
    """Composite rows list only real operations, and never themselves."""
    for c in CostModel.default().values():
        assert set(c.includes) <= set(OPERATIONS) - {c.name}
    assert CostModel.default()["tdx_private_fault"].includes == (
        "vmexit", "npf_fault", "seamcall_aug", "tdx_accept_4k")


def test_sleep_in_atomic_is_free():
    """sleep_in_atomic is a counter charged at 0 ns."""
    ledger = Ledger()
    assert ledger.charge("vmm", "sleep_in_atomic", 3) == 0
    assert ledger.counts() == {"sleep_in_atomic": 3} and ledger.total_ns == 0


# ---- profiles ----------------------------------------------------------------------------

@pytest.mark.parametrize("platform, host, row", [
    ("snp", "amd", 1), ("tdx", "intel", 5), ("sw_protected", "amd", 1),
    ("sw_protected", "intel", 3), ("default", "amd", 1), ("default", "intel", 3),
], ids=lambda x: str(x))
def test_profile_vmexit_row(platform, host, row):
    """vmexit uses row 1 on AMD, row 3 for a plain VM on Intel and row 5 for a TD."""
    m = CostModel.default(platform, host=host)
    assert (m.profile, m.host, m["vmexit"].row) == (platform, host, row)


def test_profiles_differ_only_where_documented():
    """Apart from vmexit, every profile prices every operation the same."""
    ref = CostModel.default("snp")
    for m in ALL_MODELS:
        assert [op for op in OPERATIONS if m[op] != ref[op]] == ([] if m["vmexit"].row == 1 else ["vmexit"])
    assert CostModel.default("tdx") != ref
    assert CostModel.default("sw_protected") != ref  # same costs, different profile name


def test_default_host_and_cache():
    """snp and plain VMs default to an AMD host, tdx to Intel; equal arguments share a model."""
    assert CostModel.default().profile == "snp" and CostModel.default().host == "amd"
    assert CostModel.default("tdx").host == "intel"
    assert CostModel.default("tdx") is CostModel.default("tdx", host="intel")


@pytest.mark.parametrize("args, match", [
    (("sw-protected",), r"unknown cost profile 'sw-protected' \(did you mean sw_protected\?\)"),
    (("sev",), r"unknown cost profile 'sev'; profiles are snp, tdx"),
    (("snp", "intel"), r"profile 'snp' runs on host 'amd', not 'intel'"),
    (("tdx", "amd"), r"profile 'tdx' runs on host 'intel', not 'amd'"),
], ids=["typo", "unknown", "snp-on-intel", "tdx-on-amd"])
def test_bad_profile(args, match):
    """An unknown profile or an impossible host is a ValueError that says what is allowed."""
    with pytest.raises(ValueError, match=match):
        CostModel.default(args[0], host=args[1] if len(args) > 1 else None)


# ---- pricing and formula costs -----------------------------------------------------------

def test_ns_multiplies_flat_costs():
    """A flat cost times the count; a count of 0 is free."""
    m = CostModel.default()
    assert m.ns("rmpupdate") == 500
    assert m.ns("attr_store", 1 << 28) == 100 << 28
    assert m.ns("psmash", 0) == 0


@pytest.mark.parametrize("n", [0, 1, 2, 8, 64, 256])
def test_remote_tlb_flush_scales_with_vcpus(n):
    """remote_tlb_flush is 1.5 µs + 0.15 µs per target vCPU, per flush."""
    m = CostModel.default()
    assert m.ns("remote_tlb_flush", nr_vcpus=n) == 1_500 + 150 * n
    assert m.ns("remote_tlb_flush", 3, nr_vcpus=n) == 3 * (1_500 + 150 * n)


@pytest.mark.parametrize("n", [1, 16, 192])
def test_directmap_tlb_flush_scales_with_cpus(n):
    """directmap_tlb_flush is 5 µs + 0.15 µs per host CPU and takes nr_cpus, not nr_vcpus."""
    m = CostModel.default()
    assert m.ns("directmap_tlb_flush", nr_cpus=n, nr_vcpus=10_000) == 5_000 + 150 * n


def test_formula_cost_grows_with_targets():
    """More targets never make a flush cheaper, whatever the slope."""
    for model in (CostModel.default(), CostModel.default().with_overrides("remote_tlb_flush.slope=0")):
        costs = [model.ns("remote_tlb_flush", nr_vcpus=n) for n in range(64)]
        assert costs == sorted(costs)


@pytest.mark.parametrize("op, kw, exc, match", [
    ("remote_tlb_flush", {}, TypeError, r"remote_tlb_flush costs base \+ slope x vCPUs: pass nr_vcpus="),
    ("directmap_tlb_flush", {"nr_vcpus": 4}, TypeError, r"pass nr_cpus="),
    ("remote_tlb_flush", {"nr_vcpus": -1}, ValueError, r"nr_vcpus=-1 must be >= 0"),
    ("rmpupdate", {"count": -2}, ValueError, r"count=-2 must be >= 0"),
    ("rmpupdate", {"count": 1.5}, TypeError, r"count must be an int, not float"),
    ("rmpupdate", {"count": True}, TypeError, r"count must be an int, not bool"),
    ("rmpupdat", {}, UnknownOperationError, r"unknown cost operation 'rmpupdat'; did you mean rmpupdate\?"),
], ids=["no-nr_vcpus", "wrong-count", "negative-n", "negative-count", "float-count",
        "bool-count", "unknown-op"])
def test_ns_errors(op, kw, exc, match):
    """Bad arguments to ns() raise with a message naming the problem."""
    with pytest.raises(exc, match=match):
        CostModel.default().ns(op, **kw)


def test_unknown_operation_is_key_and_value_error():
    """An unknown name is a KeyError for the mapping and a ValueError for callers."""
    m = CostModel.default()
    assert "rmpupdate" in m and "nope" not in m and ["unhashable"] not in m
    with pytest.raises(KeyError, match="unknown cost operation 'xa_store'"):
        m["xa_store"]
    assert m.get("xa_store") is None
    with pytest.raises(ValueError, match="did you mean psc_entry"):
        m.ns("psc_entries")


# ---- overrides ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, ns", [
    ("800", 800), ("800ns", 800), (" 800 ns ", 800), ("0.8us", 800), ("0.8µs", 800),
    ("0.8μs", 800), ("0.0008ms", 800), ("8e-7s", 800), ("1_000ns", 1_000), ("2s", 2 * 10**9),
    ("0.5ns", 0.5), ("0.15us", 150), ("1.5 MS", 1_500_000), (800, 800), (800.0, 800), (2.5, 2.5),
], ids=str)
def test_override_unit_forms(text, ns):
    """Every accepted number/unit form gives the same ns, exactly (int when whole)."""
    m = CostModel.default().with_overrides({"rmpupdate": text})
    assert m["rmpupdate"].value_ns == ns and type(m["rmpupdate"].value_ns) is type(ns)
    assert m.with_overrides() is m


def test_override_forms_agree():
    """Strings, lists of strings, mappings and keywords are the same override."""
    base = CostModel.default()
    forms = [
        base.with_overrides("rmpupdate=800ns"),
        base.with_overrides(["rmpupdate=800ns"]),
        base.with_overrides({"rmpupdate": "0.8us"}),
        base.with_overrides({"rmpupdate.value": 800}),
        base.with_overrides(rmpupdate=800),
    ]
    assert all(f == forms[0] for f in forms)
    assert forms[0] != base and forms[0]["psmash"] is base["psmash"]


def test_override_keeps_range_and_source():
    """An override replaces the value only; changed() and describe() report it."""
    m = CostModel.default().with_overrides("rmpupdate=5us", "remote_tlb_flush.slope=1.5us")
    c = m["rmpupdate"]
    assert (c.value_ns, c.low_ns, c.high_ns, c.row) == (5_000, 200, 2_000, 22)
    assert set(m.changed()) == {"rmpupdate", "remote_tlb_flush"}
    notes = {r.name: r.note for r in m.describe() if r.note}
    assert notes == {"rmpupdate": "override (snp: 500 ns)",
                     "remote_tlb_flush": "override (snp: 1.5 µs + 150 ns)"}
    assert m.ns("remote_tlb_flush", nr_vcpus=4) == 1_500 + 4 * 1_500


def test_later_override_wins():
    """When an operation is overridden twice, the last item wins."""
    m = CostModel.default().with_overrides(["psmash=1us", "psmash=3us"], psmash="2us")
    assert m["psmash"].value_ns == 2_000


@pytest.mark.parametrize("arg, match", [
    ("rmpupdat=800ns", r"unknown cost operation 'rmpupdat' in 'rmpupdat=800ns'; did you mean rmpupdate\?"),
    ("frobnicate=1", r"unknown cost operation 'frobnicate'.*; operations are vmexit, userspace_exit"),
    ("rmpupdate800ns", r"override 'rmpupdate800ns' is not of the form op=VALUE"),
    ("rmpupdate=800 parsecs", r"bad duration '800 parsecs' for 'rmpupdate=800 parsecs'"),
    ("rmpupdate=", r"bad duration '' for 'rmpupdate='"),
    ("rmpupdate=-5ns", r"bad duration '-5ns'"),
    ("rmpupdate=nan", r"bad duration 'nan'"),
    ("rmpupdate=inf", r"bad duration 'inf'"),
    ("rmpupdate=1..2us", r"bad duration '1..2us'"),
    ("rmpupdate.slope=1ns", r"rmpupdate has no slope; formula costs are remote_tlb_flush, directmap_tlb_flush"),
    ("rmpupdate.low=1ns", r"unknown part 'low'; use rmpupdate=VALUE or rmpupdate.slope=VALUE"),
    ({"rmpupdate": True}, r"bad duration True for 'rmpupdate=True'"),
    ({"rmpupdate": float("nan")}, r"must be between 0 ns and 60 s"),
    ({"rmpupdate": -1}, r"must be between 0 ns and 60 s"),
    ({"rmpupdate": None}, r"bad duration None .*not NoneType"),
    ("rmpupdate=1e30s", r"bad duration '1e30s' for 'rmpupdate=1e30s': must be between 0 ns and 60 s"),
    ("rmpupdate=1e400", r"bad duration '1e400' .*must be between 0 ns and 60 s"),
    ({"rmpupdate": 10**400}, r"bad duration 1000000000000000000000000000000000000\.\.\. .*between 0 ns and 60 s"),
    ("rmpupdate=61s", r"bad duration '61s'"),
], ids=["typo", "unknown", "no-equals", "bad-unit", "empty", "negative", "nan", "inf",
        "two-dots", "slope-on-flat", "unknown-part", "bool", "float-nan", "negative-int", "none",
        "1e30s", "1e400", "huge-int", "61s"])
def test_override_errors(arg, match):
    """A bad override is a ValueError that quotes the item (and suggests close names)."""
    with pytest.raises(ValueError, match=match):
        CostModel.default().with_overrides(arg)


def test_override_type_errors():
    """Overrides of the wrong container type are TypeErrors."""
    with pytest.raises(TypeError, match="overrides must be a mapping, a string or strings, not int"):
        CostModel.default().with_overrides(5)
    with pytest.raises(TypeError, match="override 5 must be a string"):
        CostModel.default().with_overrides([5])


@given(n=st.integers(0, 10**9), unit=st.sampled_from(["ns", "us", "µs", "ms", "s", ""]))
def test_parse_ns_is_exact(n, unit):
    """An integer with any unit parses to exactly n times the unit, as an int, up to 60 s;
    above that it is refused with the range."""
    scale = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 10**6, "s": 10**9, "": 1}[unit]
    if n * scale > MAX_NS:
        with pytest.raises(ValueError, match="must be between 0 ns and 60 s"):
            parse_ns(f"{n}{unit}")
        return
    assert parse_ns(f"{n}{unit}") == n * scale and type(parse_ns(f"{n}{unit}")) is int


@pytest.mark.parametrize("value, ns", [(np.float64(800.0), 800), (np.float64(0.5), 0.5), (800.0, 800)])
def test_parse_ns_takes_a_numpy_float(value, ns):
    """A numpy float64 is a float: its repr ('np.float64(800.0)') made Decimal raise
    decimal.InvalidOperation, an exception parse_ns does not document, from
    ``Config(costs={"rmpupdate": np.float64(800)})``."""
    assert parse_ns(value) == ns
    assert CostModel.default().with_overrides({"rmpupdate": value})["rmpupdate"].value_ns == ns


@pytest.mark.parametrize("nested", ["[" * 5000 + "]" * 5000, "{a = " * 5000 + "1" + "}" * 5000],
                         ids=["arrays", "inline-tables"])
def test_deeply_nested_toml_is_a_value_error(tmp_path, nested):
    """tomllib recurses on nested arrays and inline tables: a deep enough file raised
    RecursionError (the CLI's 'internal error'), where a bad file is a ValueError naming it."""
    path = tmp_path / "deep.toml"
    path.write_text(f"x = {nested}\n")
    with pytest.raises(ValueError, match=f"bad cost model TOML in {path}: nested too deeply"):
        CostModel.from_toml(path)


# ---- serialisation -----------------------------------------------------------------------

@given(cost_models())
def test_toml_round_trip(model):
    """to_toml then from_toml gives an equal model with the same fingerprint."""
    back = CostModel.from_toml(model.to_toml())
    assert back == model and back.fingerprint() == model.fingerprint()
    assert hash(back) == hash(model)


@given(cost_models())
def test_dict_round_trip_through_json(model):
    """to_dict is JSON-able and from_dict reads it back to an equal model."""
    data = json.loads(json.dumps(model.to_dict()))
    assert data["fingerprint"] == model.fingerprint()
    assert CostModel.from_dict(data) == model


@given(cost_models(), cost_models())
def test_fingerprint_follows_equality(a, b):
    """Two models have the same fingerprint exactly when they are equal."""
    assert (a == b) == (a.fingerprint() == b.fingerprint())


def test_fingerprint_is_stable():
    """The fingerprint is a content hash: 16 hex digits, changed by any override."""
    m = CostModel.default()
    assert re.fullmatch(r"[0-9a-f]{16}", m.fingerprint())
    assert m.with_overrides("rmpupdate=500ns").fingerprint() == m.fingerprint()
    assert m.with_overrides("rmpupdate=501ns").fingerprint() != m.fingerprint()
    assert CostModel.default("sw_protected").fingerprint() != m.fingerprint()


def test_toml_file_and_partial_forms(tmp_path):
    """A TOML file may give only overrides or only some fields; the rest comes from the profile."""
    path = tmp_path / "lab.toml"
    path.write_text('profile = "tdx"\n[overrides]\nseamcall_aug = "3us"\n'
                    '"remote_tlb_flush.slope" = "1.5us"\n'
                    '[costs.rmpupdate]\nvalue_ns = "0.9us"\nsource = "our lab, 2026"\n'
                    'confidence = "H"\n', encoding="utf-8")
    for source in (path, str(path)):
        m = CostModel.from_toml(source)
        assert m.profile == "tdx" and m["seamcall_aug"].value_ns == 3_000
        assert m["remote_tlb_flush"].slope_ns == 1_500
        assert (m["rmpupdate"].value_ns, m["rmpupdate"].confidence) == (900, "H")
        assert set(m.changed()) == {"seamcall_aug", "remote_tlb_flush", "rmpupdate"}
    with pytest.raises(ValueError, match="cost model data is empty; give at least one of profile"):
        CostModel.from_toml("")
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match=r"cost model TOML in .*empty\.toml: cost model data is empty"):
        CostModel.from_toml(empty)


def test_toml_base_model():
    """base= applies a file to a chosen model; a file for another profile is refused."""
    base = CostModel.default("tdx")
    assert CostModel.from_toml("[overrides]\npsmash = 2000", base=base).profile == "tdx"
    # (the file's host is its profile's default one when it names none: it named the base's)
    with pytest.raises(ValueError, match="cost model data is for profile 'snp' on host 'amd', but this "
                                         "model is 'tdx' on host 'intel'; remove its profile/host keys"):
        CostModel.from_toml('profile = "snp"', base=base)
    with pytest.raises(ValueError, match="cost model data is for profile 'tdx' on host 'intel', but this "
                                         "model is 'snp' on host 'amd'"):
        CostModel.from_dict({"profile": "tdx"}, base=CostModel.default("snp"))


@pytest.mark.parametrize("text, exc, match", [
    ('host = "arm"', ValueError, "profile 'snp' runs on host 'amd', not 'arm'"),
    ("host = []", ValueError, r"profile 'snp' runs on host 'amd', not \[\]"),
    ('profile = "arm"', ValueError, "unknown cost profile 'arm'; profiles are"),
    ("profile = 3", ValueError, "unknown cost profile 3; profiles are"),
    ('[overrides]\nrmpupdate = 1e400', ValueError, "bad duration inf|must be between 0 ns and 60 s"),
    ('[costs.rmpupdate]\nvalue_ns = 100000000000000000000000', ValueError, "between 0 ns and 60 s"),
    ("[costs.rmpupdate]\nincludes = [1]", ValueError, "costs.rmpupdate"),
])
def test_from_toml_bad_shapes_are_value_errors(text, exc, match):
    """Whatever a TOML file holds, a bad one is a ValueError (never KeyError, TypeError or
    OverflowError), with and without a base model."""
    for base in (None, CostModel.default("snp")):
        with pytest.raises(exc, match=match):
            CostModel.from_toml(text, base=base)


def test_from_toml_source_type():
    with pytest.raises(TypeError, match="source must be TOML text or a path, not int"):
        CostModel.from_toml(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, match", [
    ("[costs.rmpupdat]\nvalue_ns = 1", r"unknown cost operation 'rmpupdat' in 'costs.rmpupdat'; did you mean rmpupdate"),
    ("[costs.rmpupdate]\nvalu_ns = 1", r"unknown field 'costs.rmpupdate.valu_ns'; fields are name, value_ns"),
    ("[costs.rmpupdate]\nvalue_ns = \"fast\"", r"bad duration 'fast' for costs.rmpupdate.value_ns"),
    ("[costs.rmpupdate]\nlow_ns = 5000", r"cost 'rmpupdate': low_ns 5000 > high_ns 2000"),
    ("[costs.rmpupdate]\nconfidence = \"X\"", r"confidence 'X' is not one of H, M, L, E"),
    ("[costs.rmpupdate]\nslope_ns = 5", r"costs.rmpupdate.slope_ns: rmpupdate has no slope"),
    ("[costs.remote_tlb_flush]\nslope_per = \"cpu\"", r"remote_tlb_flush scales per vcpu, not 'cpu'"),
    ("[costs.rmpupdate]\nunit = 5", r"costs.rmpupdate: cost 'rmpupdate': unit must be a str"),
    ("[costs.rmpupdate]\nincludes = [\"nothing\"]", r"unknown cost operation 'nothing' in 'rmpupdate.includes'"),
    ("[costs.rmpupdate]\nname = \"psmash\"", r"costs.rmpupdate.name is 'psmash', not 'rmpupdate'"),
    ("costs = 3", r"'costs' must map operation names"),
    ("overrides = 3", r"'overrides' must map"),
    ("format = 2", r"cost model format 2 is not 1"),
    ("format = true", r"cost model format True is not 1"),  # True == 1 was taken for format 1
    ("format = 1.0", r"cost model format 1.0 is not 1"),
    ("profile = \"sev\"", r"unknown cost profile 'sev'"),
    ("colour = \"blue\"", r"unknown cost model keys \['colour'\]"),
    ("[overrides]\nrmpupdate = \"fast\"", r"bad duration 'fast' for 'rmpupdate=fast'"),
    ("this is = not toml =", r"bad cost model TOML"),
], ids=["op-typo", "field-typo", "bad-duration", "low-above-high", "bad-confidence",
        "slope-on-flat", "slope-per", "bad-type", "bad-include", "bad-name", "costs-not-table",
        "overrides-not-table", "format", "format-bool", "format-float", "profile", "top-key", "bad-override", "syntax"])
def test_toml_errors(text, match):
    """Malformed TOML or content is a ValueError that names the key at fault."""
    with pytest.raises(ValueError, match=match):
        CostModel.from_toml(text)


def test_toml_missing_file(tmp_path):
    """A path that does not exist is an OSError, not a parse of the path as TOML."""
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        CostModel.from_toml(str(tmp_path / "missing.toml"))


def test_toml_strings_are_escaped():
    """Sources with quotes, backslashes and control characters survive the TOML round trip."""
    m = CostModel.from_dict({"costs": {"ipi": {"source": 'say "hi"\\ \t\n\x7f µ'}}})
    assert CostModel.from_toml(m.to_toml())["ipi"].source == 'say "hi"\\ \t\n\x7f µ'


def test_model_construction_checks_the_set_of_costs():
    """A CostModel holds exactly the catalogue: missing, duplicate or foreign costs are refused."""
    costs = list(CostModel.default().values())
    with pytest.raises(ValueError, match="cost model is missing sleep_in_atomic"):
        CostModel(costs[:-1], profile="snp", host="amd")
    with pytest.raises(ValueError, match="cost 'vmexit' given twice"):
        CostModel(costs + costs[:1], profile="snp", host="amd")
    with pytest.raises(ValueError, match="stored under 'ipi' is named 'vmexit'"):
        CostModel({"ipi": costs[0]}, profile="snp", host="amd")
    with pytest.raises(ValueError, match="must be snake_case"):
        Cost("Bad Name", 1, 0, 2, "s", "E", None, "per x")


# ---- describe and docs -------------------------------------------------------------------

def test_describe_rows():
    """describe() gives one display row per operation with readable value and range."""
    rows = {r.name: r for r in CostModel.default().describe()}
    assert list(rows) == list(OPERATIONS)
    assert rows["gmem_alloc_1g"][1:6] == ("60 ms", "30–150 ms", "per 1G folio allocated and zeroed", "E", "29")
    assert rows["remote_tlb_flush"].value == "1.5 µs + 150 ns × vCPUs"
    assert rows["directmap_tlb_flush"].range == "5–100 µs + 100 ns–1.5 µs × host CPUs"
    assert rows["zap_spte"].row == "—"
    text = format_table(CostModel.default().describe())
    assert text.splitlines()[0].split()[:3] == ["operation", "value", "range"]
    with pytest.raises(ValueError, match="table style 'html' is not 'text' or 'markdown'"):
        format_table([], style="html")


def test_docs_table_is_generated():
    """The defaults table in docs/costs.md is exactly format_table(describe(), markdown)."""
    text = (ROOT / "docs" / "costs.md").read_text(encoding="utf-8")
    begin, end = "<!-- BEGIN costs-table -->\n", "<!-- END costs-table -->"
    table = text[text.index(begin) + len(begin):text.index(end)]
    assert table == format_table(CostModel.default("snp").describe(), style="markdown")


# ---- Ledger ------------------------------------------------------------------------------

def _charge_some(ledger):
    ledger.charge("vmm", "attr_store", 512)
    ledger.charge("vcpu0", "npf_fault", 3)
    ledger.charge("vcpu0", "rmpupdate", 3)
    ledger.charge("vcpu1", "npf_fault")
    ledger.charge("host", "directmap_tlb_flush", nr_cpus=8)
    ledger.charge("vmm", "remote_tlb_flush", 2, nr_vcpus=2)


def test_ledger_attribution_sums():
    """by_actor, by_op and by_actor_op partition the total exactly."""
    ledger = Ledger(CostModel.default("snp"))
    _charge_some(ledger)
    assert ledger.by_actor() == {"host": 6_200, "vcpu0": 6_000, "vcpu1": 1_500,
                                 "vmm": 51_200 + 2 * 1_800}
    assert ledger.by_op()["npf_fault"] == 6_000 and ledger.counts()["npf_fault"] == 4
    cells = ledger.by_actor_op()
    assert sum(ledger.by_actor().values()) == sum(ledger.by_op().values()) == ledger.total_ns
    assert sum(ns for ops in cells.values() for ns in ops.values()) == ledger.total_ns
    assert cells["vcpu0"] == {"npf_fault": 4_500, "rmpupdate": 1_500}


def test_ledger_matches_model_ns():
    """A charge returns exactly what CostModel.ns prices."""
    model = CostModel.default("tdx").with_overrides("seamcall_aug=2.5us")
    ledger = Ledger(model)
    assert ledger.charge("vcpu3", "seamcall_aug", 7) == model.ns("seamcall_aug", 7) == 17_500
    assert ledger.model is model


def test_ledger_errors_leave_it_untouched():
    """A rejected charge changes nothing; count 0 records nothing but still checks the name."""
    ledger = Ledger()
    _charge_some(ledger)
    before = ledger.to_dict()
    with pytest.raises(UnknownOperationError, match="did you mean rmpupdate"):
        ledger.charge("vmm", "rmpupdat", 0)
    with pytest.raises(TypeError, match="pass nr_vcpus="):
        ledger.charge("vmm", "remote_tlb_flush")
    with pytest.raises(ValueError, match="count=-1 must be >= 0"):
        ledger.charge("vmm", "psmash", -1)
    assert ledger.charge("vmm", "psmash", 0) == 0
    assert ledger.to_dict() == before


def test_ledger_is_deterministic():
    """The same charges in any order give identical, JSON-able results."""
    a, b = Ledger(), Ledger()
    _charge_some(a)
    b.charge("vmm", "remote_tlb_flush", 2, nr_vcpus=2)
    b.charge("host", "directmap_tlb_flush", nr_cpus=8)
    b.charge("vcpu1", "npf_fault")
    b.charge("vcpu0", "rmpupdate", 3)
    b.charge("vcpu0", "npf_fault", 3)
    b.charge("vmm", "attr_store", 512)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert a.to_dict()["cost_model"] == CostModel.default().fingerprint()


@given(value=st.floats(0, 1e6, allow_nan=False), slope=st.floats(0, 1e4, allow_nan=False),
       n=st.integers(0, 512), count=st.integers(0, 1_000))
def test_batched_charge_equals_repeated_charge(value, slope, n, count):
    """Charging N events at once equals N single charges, even for fractional costs."""
    model = CostModel.default().with_overrides({"rmpupdate": value, "remote_tlb_flush": value,
                                                "remote_tlb_flush.slope": slope})
    batched, single = Ledger(model), Ledger(model)
    batched.charge("vcpu0", "rmpupdate", count)
    batched.charge("vmm", "remote_tlb_flush", count, nr_vcpus=n)
    for _ in range(count):
        single.charge("vcpu0", "rmpupdate")
        single.charge("vmm", "remote_tlb_flush", nr_vcpus=n)
    assert batched.to_dict() == single.to_dict()
    assert batched.total_ns == count * (round(value) + round(value + slope * n))


def test_snapshot_restore_is_exact():
    """restore() undoes every later charge, including cells created after the snapshot."""
    ledger = Ledger()
    ledger.charge("vmm", "attr_store", 10)
    before = ledger.to_dict()
    snap = ledger.snapshot()
    _charge_some(ledger)
    ledger.charge("vcpu9", "sleep_in_atomic")
    ledger.restore(snap)
    assert ledger.to_dict() == before
    with pytest.raises(ValueError, match="is not an open snapshot of this ledger"):
        ledger.restore(snap)


def test_nested_snapshots():
    """Snapshots nest: an inner commit keeps charges until the outer one is restored."""
    ledger = Ledger()
    outer = ledger.snapshot()
    ledger.charge("vmm", "psmash")
    inner = ledger.snapshot()
    ledger.charge("vmm", "psmash")
    with pytest.raises(ValueError, match="commit the innermost open snapshot first"):
        ledger.commit(outer)
    ledger.commit(inner)
    assert ledger.total_ns == 2_000
    inner2 = ledger.snapshot()
    ledger.charge("vcpu0", "rmpupdate")
    ledger.restore(outer)  # also ends inner2
    assert ledger.total_ns == 0 and ledger.to_dict()["by_actor_op"] == {}
    with pytest.raises(ValueError, match="not an open snapshot"):
        ledger.commit(inner2)
    with pytest.raises(ValueError, match="not an open snapshot"):
        Ledger().restore(ledger.snapshot())


def test_transaction_rolls_back_on_error():
    """transaction() keeps charges on success and rolls them back when the block raises."""
    ledger = Ledger()
    with ledger.transaction():
        ledger.charge("vmm", "attr_store", 4)
    with pytest.raises(OSError, match="EINVAL"), ledger.transaction():
        ledger.charge("vmm", "attr_store", 1_000)
        raise OSError("EINVAL")
    assert ledger.total_ns == 400 and ledger.counts() == {"attr_store": 4}


def test_module_docstring_examples():
    """The doctests in pkvm.cost.model's docstrings pass."""
    import doctest

    import pkvm.cost.model

    result = doctest.testmod(pkvm.cost.model)
    assert result.failed == 0 and result.attempted > 10


def test_cost_model_strategy_docstring():
    """The example in pkvm.testing.strategies (the shared cost-model strategy) runs."""
    import doctest

    import pkvm.testing.strategies

    result = doctest.testmod(pkvm.testing.strategies)
    assert result.failed == 0 and result.attempted > 0


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**400), st.floats(), st.text(max_size=8),
              st.sampled_from(["800ns", "1e30s", "rmpupdate", "snp", "amd", "intel", "tdx"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["format", "profile", "host", "costs", "overrides",
                                                             "rmpupdate", "value_ns", "slope_ns", "unit", "row",
                                                             "includes", "confidence", "x"]), inner, max_size=4)),
    max_leaves=12)


@given(data=st.dictionaries(st.sampled_from(["format", "profile", "host", "costs", "overrides", "fingerprint"]),
                            _JSON, max_size=4),
       with_base=st.booleans())
def test_from_dict_of_any_json_shape_is_a_model_or_a_value_error(data, with_base):
    """Whatever a cost file holds under the known keys, from_dict returns a model or raises
    ValueError: never KeyError, TypeError or OverflowError."""
    base = CostModel.default("snp") if with_base else None
    try:
        model = CostModel.from_dict(data, base=base)
    except ValueError:
        return
    assert isinstance(model, CostModel)
    for cost in model.values():
        assert 0 <= cost.value_ns <= MAX_NS


def test_every_price_says_measured_or_estimated_and_how():
    """pkvm costs: every row is 'measured' (confidence H/M/L, with its source) or
    'estimated' (E, with how); an estimate's source says how it was derived, not just that
    no figure exists."""
    rows = CostModel.default("snp").describe()
    assert {r.basis for r in rows} == {"measured", "estimated"}
    for r in rows:
        assert r.basis == ("estimated" if r.confidence == "E" else "measured"), r.name
        assert r.source.strip() not in ("no figure", "no measurement found", "no measurement"), r.name
    text = format_table(rows)
    assert text.splitlines()[0].split()[:6] == ["operation", "value", "range", "unit", "basis", "conf"]


@pytest.mark.parametrize("name", ["model.json", "MODEL.JSON", "model.Json"])
def test_a_json_cost_file_is_read_as_json_whatever_the_case_of_its_suffix(tmp_path, name):
    """``--costs FILE.json`` is read with ``from_dict``; ``MODEL.JSON`` was read as TOML and
    refused with "bad cost model TOML ... Invalid statement"."""
    from pkvm import experiments as E

    path = tmp_path / name
    path.write_text(json.dumps({"overrides": {"rmpupdate": "800ns"}}))
    model = E.Config(memory="64M", cost_file=str(path)).cost_model()
    assert model["rmpupdate"].value_ns == 800


def test_a_json_cost_file_with_a_key_twice_is_refused_as_a_toml_one_is(tmp_path):
    """JSON's parser keeps the last of two equal keys without a word; a TOML cost file with a
    key twice is refused. Both refuse it now, naming the file and the key."""
    from pkvm import experiments as E

    path = tmp_path / "m.json"
    path.write_text('{"overrides": {"rmpupdate": "800ns", "rmpupdate": "900ns"}}')
    with pytest.raises(ValueError, match=r"m\.json: the key 'rmpupdate' appears twice"):
        E.Config(memory="64M", cost_file=str(path)).cost_model()
    toml = tmp_path / "m.toml"
    toml.write_text('[overrides]\nrmpupdate = "800ns"\nrmpupdate = "900ns"\n')
    with pytest.raises(ValueError):
        E.Config(memory="64M", cost_file=str(toml)).cost_model()
