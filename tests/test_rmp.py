"""The SEV-SNP RMP table: RMPUPDATE/PSMASH/PVALIDATE return codes, 2M/4K interplay, range forms."""

import pickle

import pytest

from pkvm import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm._core import RmpEntry, RmpTable
from pkvm.platforms.snp_constants import (
    PSMASH_FAIL_INPUT,
    PSMASH_FAIL_INUSE,
    PSMASH_FAIL_PERMISSION,
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_NOUPDATE,
    PVALIDATE_FAIL_SIZEMISMATCH,
    PVALIDATE_NPF_RMP,
    PVALIDATE_NPF_SIZEM,
    PVALIDATE_SUCCESS,
    RMPUPDATE_FAIL_INPUT,
    RMPUPDATE_FAIL_INUSE,
    RMPUPDATE_FAIL_OVERLAP,
    RMPUPDATE_FAIL_PERMISSION,
    RMPUPDATE_SUCCESS,
)
from pkvm.testing.reference_snp import RefRmpTable

ASID = 7
R = 0x1000            # a 2M-aligned host pfn (region [R, R + 512))
GPA = 0x8000_0000     # a 2M-aligned guest address for R
FREE = RmpEntry(False, PG_LEVEL_4K, 0, 0, False, False, False)


def gpa_of(pfn):
    """The linear guest mapping the tests use: pfn R <-> GPA."""
    return GPA + (pfn - R) * 4096


def private(rmp, pfn, level=PG_LEVEL_4K, *, asid=ASID, immutable=False):
    """rmp_make_private at the test's linear GPA."""
    return rmp.rmpupdate(pfn, level, assigned=True, asid=asid, gpa=gpa_of(pfn),
                         immutable=immutable)


def snapshot(rmp):
    """Everything observable: entries (as runs) and counters."""
    return rmp.ranges(0, rmp.max_pfn), rmp.counters


@pytest.fixture
def rmp():
    """A 4 GiB table, hypervisor-owned everywhere."""
    table = RmpTable(max_pfn=1 << 20)
    yield table
    table._check()


# ---------------------------------------------------------------------------------------------
# Entries and lookup
# ---------------------------------------------------------------------------------------------

def test_fresh_table_is_hypervisor_owned_4k(rmp):
    """Every entry of a new table is unassigned, 4K, with every field 0."""
    assert rmp.lookup(0) == FREE
    assert rmp.lookup(rmp.max_pfn - 1) == FREE
    assert rmp.ranges() == [(0, rmp.max_pfn, FREE)]
    assert set(rmp.counters.values()) == {0}
    assert rmp.nruns == 0


def test_rmpupdate_4k_writes_the_entry(rmp):
    """A 4K RMPUPDATE assigns exactly one page with the given ASID, GPA and flags."""
    assert private(rmp, R + 3, immutable=True) == RMPUPDATE_SUCCESS
    assert rmp.lookup(R + 3) == RmpEntry(True, PG_LEVEL_4K, ASID, gpa_of(R + 3), True, False,
                                         False)
    assert rmp.lookup(R + 2) == FREE and rmp.lookup(R + 4) == FREE
    assert rmp.counters["rmpupdate"] == 1 and rmp.counters["rmpupdate_2m"] == 0


def test_rmpupdate_2m_writes_512_entries_with_per_page_gpa(rmp):
    """A 2M entry is 512 entries of level 2M whose GPAs advance page by page, in one run."""
    assert private(rmp, R, PG_LEVEL_2M) == RMPUPDATE_SUCCESS
    for p in (R, R + 1, R + 511):
        assert rmp.lookup(p) == RmpEntry(True, PG_LEVEL_2M, ASID, gpa_of(p), False, False, False)
    assert rmp.lookup(R + 512) == FREE
    assert rmp.ranges(R, 512) == [(R, R + 512, rmp.lookup(R))]
    assert rmp.counters["rmpupdate"] == 1 and rmp.counters["rmpupdate_2m"] == 1


def test_rmpupdate_clears_validated_and_vmsa(rmp):
    """RMPUPDATE always clears Validated and VMSA (§5.3), also re-assigning to the same owner."""
    private(rmp, R)
    assert rmp.pvalidate(R, PG_LEVEL_4K, asid=ASID, gpa=gpa_of(R), validate=True) == 0
    rmp.firmware_update(R, 1, vmsa=True)
    assert rmp.lookup(R).validated and rmp.lookup(R).vmsa
    assert private(rmp, R) == RMPUPDATE_SUCCESS
    assert not rmp.lookup(R).validated and not rmp.lookup(R).vmsa


def test_make_shared_writes_all_zero_but_keeps_the_page_size(rmp):
    """rmp_make_shared at 2M leaves an unassigned 2M entry (only ``pagesize`` is set, §5.3)."""
    private(rmp, R, PG_LEVEL_2M)
    assert rmp.rmpupdate(R, PG_LEVEL_2M, assigned=False) == RMPUPDATE_SUCCESS
    assert rmp.lookup(R + 9) == FREE._replace(level=PG_LEVEL_2M)
    assert rmp.rmpupdate(R, PG_LEVEL_4K, assigned=False) == RMPUPDATE_SUCCESS
    assert rmp.lookup(R + 9) == FREE


def test_linear_private_memory_is_one_run_per_field(rmp):
    """Storing gfn - pfn makes a physically contiguous guest one run however large."""
    assert rmp.rmpupdate_range(0, 1 << 19, PG_LEVEL_4K, assigned=True, asid=1,
                               gpa=1 << 32) == (1 << 19, -1, 0)
    assert rmp.nruns == 1
    assert rmp.lookup((1 << 19) - 1).gpa == (1 << 32) + ((1 << 19) - 1) * 4096


# ---------------------------------------------------------------------------------------------
# RMPUPDATE return codes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pfn, level, fields", [
    pytest.param(R + 1, PG_LEVEL_2M, {"assigned": True, "asid": ASID, "gpa": GPA},
                 id="2m-unaligned-pfn"),
    pytest.param(R, PG_LEVEL_2M, {"assigned": True, "asid": ASID, "gpa": GPA + 4096},
                 id="2m-unaligned-gpa"),
    pytest.param(R + 1, PG_LEVEL_2M, {"assigned": False}, id="2m-shared-unaligned-pfn"),
    pytest.param(R, PG_LEVEL_4K, {"assigned": False, "asid": ASID}, id="shared-with-asid"),
    pytest.param(R, PG_LEVEL_4K, {"assigned": False, "gpa": GPA}, id="shared-with-gpa"),
    pytest.param(R, PG_LEVEL_4K, {"assigned": False, "immutable": True}, id="shared-immutable"),
])
def test_rmpupdate_fail_input(rmp, pfn, level, fields):
    """Bad operands return FAIL_INPUT (1) and change nothing but the failure counter."""
    before = rmp.ranges()
    assert rmp.rmpupdate(pfn, level, **fields) == RMPUPDATE_FAIL_INPUT
    assert rmp.ranges() == before
    assert rmp.counters["rmpupdate_fail_input"] == 1 and rmp.counters["rmpupdate"] == 0


def test_rmpupdate_2m_unaligned_at_the_table_end_is_fail_input():
    """An unaligned 2M operand is FAIL_INPUT even where 512 pages would not fit in the table."""
    rmp = RmpTable(max_pfn=1024)
    assert rmp.rmpupdate(1023, PG_LEVEL_2M, assigned=False) == RMPUPDATE_FAIL_INPUT


@pytest.mark.parametrize("case", ["4k-on-immutable", "2m-over-immutable-4k",
                                  "4k-inside-immutable-2m", "shared-on-immutable-2m"])
def test_rmpupdate_fail_permission(rmp, case):
    """Any immutable entry among the pages an RMPUPDATE writes gives FAIL_PERMISSION (2)."""
    if case == "4k-on-immutable":
        private(rmp, R + 5, immutable=True)
        args = (R + 5, PG_LEVEL_4K)
    elif case == "2m-over-immutable-4k":
        private(rmp, R + 511, immutable=True)
        args = (R, PG_LEVEL_2M)
    elif case == "4k-inside-immutable-2m":
        # Also an overlap; permission is checked first.
        private(rmp, R, PG_LEVEL_2M, immutable=True)
        args = (R + 7, PG_LEVEL_4K)
    else:
        private(rmp, R, PG_LEVEL_2M, immutable=True)
        args = (R, PG_LEVEL_2M)
    before = rmp.ranges()
    assert rmp.rmpupdate(*args, assigned=False) == RMPUPDATE_FAIL_PERMISSION
    assert rmp.ranges() == before
    assert rmp.counters["rmpupdate_fail_permission"] == 1


@pytest.mark.parametrize("locked", [R, R + 300, R + 511], ids=["head", "middle", "tail"])
def test_rmpupdate_fail_inuse(rmp, locked):
    """A locked page among those written gives FAIL_INUSE (3), before any other check."""
    private(rmp, locked, immutable=True)       # immutable too: in-use wins
    rmp.set_in_use(locked)
    assert rmp.in_use(locked) and not rmp.in_use(locked + 1 if locked < R + 511 else R)
    assert rmp.rmpupdate(R, PG_LEVEL_2M, assigned=True, asid=ASID, gpa=GPA) == RMPUPDATE_FAIL_INUSE
    assert rmp.rmpupdate(locked, PG_LEVEL_4K, assigned=False) == RMPUPDATE_FAIL_INUSE
    rmp.set_in_use(locked, in_use=False)
    assert rmp.rmpupdate(locked, PG_LEVEL_4K, assigned=False) == RMPUPDATE_FAIL_PERMISSION
    assert rmp.counters["rmpupdate_fail_inuse"] == 2


@pytest.mark.parametrize("pfn", [R, R + 1, R + 511], ids=["aligned", "second", "last"])
def test_rmpupdate_4k_inside_assigned_2m_is_overlap(rmp, pfn):
    """A 4K update inside an assigned 2M entry returns FAIL_OVERLAP (4); PSMASH first."""
    private(rmp, R, PG_LEVEL_2M)
    before = rmp.ranges()
    assert rmp.rmpupdate(pfn, PG_LEVEL_4K, assigned=False) == RMPUPDATE_FAIL_OVERLAP
    assert rmp.ranges() == before
    assert rmp.psmash(R) == 0
    assert rmp.rmpupdate(pfn, PG_LEVEL_4K, assigned=False) == RMPUPDATE_SUCCESS


@pytest.mark.parametrize("assigned", [True, False], ids=["make-private", "make-shared"])
@pytest.mark.parametrize("pfn", [R, R + 200, R + 511], ids=["head", "middle", "tail"])
def test_rmpupdate_2m_over_assigned_4k_is_overlap(rmp, pfn, assigned):
    """A 2M update over a region holding an assigned 4K entry returns FAIL_OVERLAP."""
    private(rmp, pfn, asid=3)
    fields = {"assigned": True, "asid": ASID, "gpa": GPA} if assigned else {"assigned": False}
    assert rmp.rmpupdate(R, PG_LEVEL_2M, **fields) == RMPUPDATE_FAIL_OVERLAP
    assert rmp.lookup(pfn).asid == 3
    assert rmp.find_eq(R, 512, assigned=True) == pfn


@pytest.mark.parametrize("prior", ["unassigned-4k", "unassigned-2m", "assigned-2m",
                                   "validated-2m"])
def test_rmpupdate_2m_over_compatible_region_succeeds(rmp, prior):
    """Unassigned 4K/2M entries and a whole assigned 2M entry can be replaced by a 2M update."""
    if prior == "unassigned-2m":
        rmp.rmpupdate(R, PG_LEVEL_2M, assigned=False)
    elif prior in ("assigned-2m", "validated-2m"):
        private(rmp, R, PG_LEVEL_2M, asid=3)
        if prior == "validated-2m":
            rmp.pvalidate(R, PG_LEVEL_2M, asid=3, gpa=GPA, validate=True)
    assert private(rmp, R, PG_LEVEL_2M) == RMPUPDATE_SUCCESS
    assert rmp.lookup(R + 100) == RmpEntry(True, PG_LEVEL_2M, ASID, gpa_of(R + 100), False,
                                           False, False)


@pytest.mark.parametrize("pfn", [R, R + 17, R + 511], ids=["aligned", "inside", "last"])
def test_rmpupdate_4k_inside_unassigned_2m_demotes_it(rmp, pfn):
    """A 4K update inside a hypervisor-owned 2M entry succeeds; the region becomes 4K entries."""
    rmp.rmpupdate(R, PG_LEVEL_2M, assigned=False)
    assert private(rmp, pfn) == RMPUPDATE_SUCCESS
    assert rmp.lookup(pfn) == RmpEntry(True, PG_LEVEL_4K, ASID, gpa_of(pfn), False, False, False)
    for other in (R, R + 255, R + 511):
        if other != pfn:
            assert rmp.lookup(other) == FREE


BEFORE = {
    "free": lambda t, p: None,
    "immutable": lambda t, p: private(t, p, immutable=True),
    "in-assigned-2m": lambda t, p: private(t, R, PG_LEVEL_2M),
}
BETWEEN = {
    "nothing": lambda t, p: None,
    "neighbour-updated": lambda t, p: private(t, p + 1 if p < R + 511 else p - 1),
    "self-updated": lambda t, p: private(t, p, asid=3),
    "in-use": lambda t, p: t.set_in_use(p),
    "made-immutable": lambda t, p: private(t, p, immutable=True),
    "2m-entry": lambda t, p: private(t, R, PG_LEVEL_2M),
    "unassigned-2m": lambda t, p: t.rmpupdate(R, PG_LEVEL_2M, assigned=False),
    "psmashed": lambda t, p: t.psmash(R),
    "made-shared": lambda t, p: t.rmpupdate(p, PG_LEVEL_4K, assigned=False),
}


@pytest.mark.parametrize("pfn", [R, R + 17, R + 511], ids=["aligned", "inside", "last"])
@pytest.mark.parametrize("between", list(BETWEEN))
@pytest.mark.parametrize("before", list(BEFORE))
def test_rmpupdate_after_a_lookup_sees_every_change_since(pfn, before, between):
    """A 4K RMPUPDATE of the pfn looked up last starts from that lookup's entry while the table
    is unchanged: whatever changed in between (the pfn, a neighbour, the lock map, the 2M
    entry around it) or not, the outcome and the entries are the reference table's, and a
    refused update changes nothing."""
    core, ref = RmpTable(max_pfn=1 << 20), RefRmpTable(max_pfn=1 << 20)
    for t in (core, ref):
        private(t, R + 700)  # a stored run after the region, in the same leaf
        BEFORE[before](t, pfn)
        t.lookup(pfn)
        BETWEEN[between](t, pfn)
    runs, counters = core.ranges(0, core.max_pfn), core.counters
    code = private(core, pfn)
    assert code == private(ref, pfn)
    assert [core.lookup(p) for p in range(R - 8, R + 720)] == [ref.lookup(p) for p in range(R - 8, R + 720)]
    if code != RMPUPDATE_SUCCESS:
        assert core.ranges(0, core.max_pfn) == runs
    assert core.counters["rmpupdate"] == counters["rmpupdate"] + (code == RMPUPDATE_SUCCESS)
    core._check()


# ---------------------------------------------------------------------------------------------
# PSMASH
# ---------------------------------------------------------------------------------------------

def test_psmash_keeps_every_field(rmp):
    """PSMASH makes 512 4K entries with all fields, Validated and per-page GPA too (§5.4)."""
    private(rmp, R, PG_LEVEL_2M)
    rmp.pvalidate(R, PG_LEVEL_2M, asid=ASID, gpa=GPA, validate=True)
    assert rmp.psmash(R) == 0
    for p in (R, R + 1, R + 511):
        assert rmp.lookup(p) == RmpEntry(True, PG_LEVEL_4K, ASID, gpa_of(p), False, True, False)
    assert rmp.counters["psmash"] == 1


def test_psmash_unassigned_2m_entry(rmp):
    """A hypervisor-owned 2M entry can be smashed too (only the page size changes)."""
    rmp.rmpupdate(R, PG_LEVEL_2M, assigned=False)
    assert rmp.psmash(R) == 0
    assert rmp.lookup(R + 3) == FREE


@pytest.mark.parametrize("case, code", [
    ("unaligned", PSMASH_FAIL_INPUT),
    ("4k-entry", PSMASH_FAIL_INPUT),
    ("in-use", PSMASH_FAIL_INUSE),
    ("immutable", PSMASH_FAIL_PERMISSION),
])
def test_psmash_failures(rmp, case, code):
    """PSMASH: FAIL_INPUT (unaligned or not a 2M entry), FAIL_INUSE, FAIL_PERMISSION."""
    private(rmp, R, PG_LEVEL_2M, immutable=case == "immutable")
    pfn = R
    if case == "unaligned":
        pfn = R + 1
    elif case == "4k-entry":
        pfn = R + 512
    elif case == "in-use":
        rmp.set_in_use(R + 400)
    before = rmp.ranges()
    assert rmp.psmash(pfn) == code
    assert rmp.ranges() == before
    assert sum(v for k, v in rmp.counters.items() if k.startswith("psmash_fail")) == 1


# ---------------------------------------------------------------------------------------------
# PVALIDATE
# ---------------------------------------------------------------------------------------------

def test_pvalidate_validates_and_rescinds(rmp):
    """PVALIDATE sets and clears Validated; no change is FAIL_NOUPDATE (255, CF=1)."""
    private(rmp, R)
    pv = {"asid": ASID, "gpa": gpa_of(R)}
    assert rmp.pvalidate(R, PG_LEVEL_4K, **pv, validate=True) == PVALIDATE_SUCCESS
    assert rmp.lookup(R).validated
    assert rmp.pvalidate(R, PG_LEVEL_4K, **pv, validate=True) == PVALIDATE_FAIL_NOUPDATE
    assert rmp.pvalidate(R, PG_LEVEL_4K, **pv, validate=False) == PVALIDATE_SUCCESS
    assert rmp.pvalidate(R, PG_LEVEL_4K, **pv, validate=False) == PVALIDATE_FAIL_NOUPDATE
    assert rmp.counters["pvalidate"] == 2 and rmp.counters["pvalidate_fail_noupdate"] == 2


def test_pvalidate_2m_on_2m_entry_validates_512_pages(rmp):
    """A 2M PVALIDATE on a 2M entry validates the whole entry."""
    private(rmp, R, PG_LEVEL_2M)
    assert rmp.pvalidate(R, PG_LEVEL_2M, asid=ASID, gpa=GPA, validate=True) == 0
    assert rmp.find_ne(R, 512, validated=True) == -1
    assert rmp.counters["pvalidate_2m"] == 1


def test_pvalidate_2m_on_4k_entries_is_sizemismatch_then_512_4k(rmp):
    """2M on 4K entries is FAIL_SIZEMISMATCH (6); the Linux guest then does 512 x 4K (§5.6)."""
    rmp.rmpupdate_range(R, 512, PG_LEVEL_4K, assigned=True, asid=ASID, gpa=GPA)
    assert rmp.pvalidate(R, PG_LEVEL_2M, asid=ASID, gpa=GPA, validate=True) == \
        PVALIDATE_FAIL_SIZEMISMATCH
    assert rmp.pvalidate_range(R, 512, PG_LEVEL_4K, asid=ASID, gpa=GPA,
                               validate=True) == (512, -1, 0)
    assert rmp.counters["pvalidate_fail_sizemismatch"] == 1 and rmp.counters["pvalidate"] == 512


def test_pvalidate_4k_on_2m_entry_is_npf_sizem(rmp):
    """4K on a 2M entry raises an #NPF with RMP+SIZEM; after PSMASH it succeeds (§5.6)."""
    private(rmp, R, PG_LEVEL_2M)
    pv = {"asid": ASID, "gpa": gpa_of(R + 5), "validate": True}
    assert rmp.pvalidate(R + 5, PG_LEVEL_4K, **pv) == PVALIDATE_NPF_SIZEM
    assert not rmp.lookup(R + 5).validated
    assert rmp.psmash(R) == 0
    assert rmp.pvalidate(R + 5, PG_LEVEL_4K, **pv) == PVALIDATE_SUCCESS


@pytest.mark.parametrize("case", ["unassigned", "other-asid", "other-gpa", "immutable",
                                  "unassigned-2m"])
def test_pvalidate_not_owned_is_npf_rmp(rmp, case):
    """A page not assigned to this ASID at this GPA (or immutable) faults with the RMP bit."""
    if case == "other-asid":
        private(rmp, R, asid=ASID + 1)
    elif case == "other-gpa":
        rmp.rmpupdate(R, PG_LEVEL_4K, assigned=True, asid=ASID, gpa=GPA + 4096)
    elif case == "immutable":
        private(rmp, R, immutable=True)
    elif case == "unassigned-2m":
        rmp.rmpupdate(R, PG_LEVEL_2M, assigned=False)
    before = rmp.ranges()
    assert rmp.pvalidate(R, PG_LEVEL_4K, asid=ASID, gpa=GPA, validate=True) == PVALIDATE_NPF_RMP
    assert rmp.ranges() == before
    assert rmp.counters["pvalidate_npf_rmp"] == 1


def test_pvalidate_ownership_is_checked_before_size(rmp):
    """2M on someone else's 4K entries is an RMP fault, not a size mismatch."""
    private(rmp, R, asid=ASID + 1)
    assert rmp.pvalidate(R, PG_LEVEL_2M, asid=ASID, gpa=GPA, validate=True) == PVALIDATE_NPF_RMP


@pytest.mark.parametrize("pfn, gpa", [(R + 1, GPA), (R, GPA + 4096)],
                         ids=["unaligned-pfn", "unaligned-gpa"])
def test_pvalidate_2m_unaligned_is_fail_input(rmp, pfn, gpa):
    """A 2M PVALIDATE of an unaligned address returns FAIL_INPUT (1)."""
    private(rmp, R, PG_LEVEL_2M)
    assert rmp.pvalidate(pfn, PG_LEVEL_2M, asid=ASID, gpa=gpa, validate=True) == \
        PVALIDATE_FAIL_INPUT


# ---------------------------------------------------------------------------------------------
# Range forms: equivalent to the instructions one by one
# ---------------------------------------------------------------------------------------------

def _setup_mixed(rmp):
    """Regions R..R+4: 2M private, 4K private with a hole, immutable page, locked page."""
    private(rmp, R, PG_LEVEL_2M)
    rmp.rmpupdate_range(R + 512, 512, PG_LEVEL_4K, assigned=True, asid=ASID, gpa=gpa_of(R + 512))
    rmp.rmpupdate(R + 700, PG_LEVEL_4K, assigned=False)
    private(rmp, R + 1100, immutable=True)
    rmp.set_in_use(R + 1800)
    private(rmp, R + 1536, PG_LEVEL_2M)


RANGE_OPS = [
    pytest.param("rmpupdate_range", (R, 2048, PG_LEVEL_4K),
                 {"assigned": True, "asid": 2, "gpa": 1 << 30}, id="rmpupdate-4k"),
    pytest.param("rmpupdate_range", (R + 512, 1024, PG_LEVEL_4K),
                 {"assigned": False}, id="rmpupdate-4k-shared"),
    pytest.param("rmpupdate_range", (R, 2048, PG_LEVEL_2M),
                 {"assigned": True, "asid": 2, "gpa": 1 << 30}, id="rmpupdate-2m"),
    pytest.param("rmpupdate_range", (R + 1024, 1024, PG_LEVEL_2M),
                 {"assigned": False}, id="rmpupdate-2m-shared"),
    pytest.param("psmash_range", (R, 2048), {}, id="psmash"),
    pytest.param("psmash_range", (R + 1536, 512), {}, id="psmash-locked"),
    pytest.param("pvalidate_range", (R, 2048, PG_LEVEL_4K),
                 {"asid": ASID, "gpa": GPA, "validate": True}, id="pvalidate-4k"),
    pytest.param("pvalidate_range", (R + 512, 512, PG_LEVEL_4K),
                 {"asid": ASID, "gpa": gpa_of(R + 512), "validate": True}, id="pvalidate-4k-hole"),
    pytest.param("pvalidate_range", (R, 2048, PG_LEVEL_2M),
                 {"asid": ASID, "gpa": GPA, "validate": True}, id="pvalidate-2m"),
]


@pytest.mark.parametrize("method, args, kwargs", RANGE_OPS)
def test_range_form_equals_instruction_loop(method, args, kwargs):
    """A range call ends in the same state, counters and result as the instructions one by one."""
    core, ref = RmpTable(max_pfn=1 << 16), RefRmpTable(max_pfn=1 << 16)
    for t in (core, ref):
        _setup_mixed(t)
    assert getattr(core, method)(*args, **kwargs) == getattr(ref, method)(*args, **kwargs)
    assert core.counters == ref.counters
    assert [core.lookup(p) for p in range(R, R + 2048)] == \
        [ref.lookup(p) for p in range(R, R + 2048)]
    core._check()


def test_range_form_reports_progress_and_first_failure(rmp):
    """``(done, fail_pfn, code)``: instructions done, the failing operand and its code."""
    private(rmp, R + 600, immutable=True)
    assert rmp.rmpupdate_range(R, 1024, PG_LEVEL_4K, assigned=True, asid=ASID, gpa=GPA) == \
        (600, R + 600, RMPUPDATE_FAIL_PERMISSION)
    assert rmp.lookup(R + 599).assigned and rmp.lookup(R + 601) == FREE
    assert rmp.rmpupdate_range(R, 0, PG_LEVEL_4K, assigned=False) == (0, -1, 0)


# ---------------------------------------------------------------------------------------------
# Queries, firmware writes, counters
# ---------------------------------------------------------------------------------------------

def test_find_ne_and_find_eq(rmp):
    """find_ne/find_eq compare only the given fields; the GPA advances with the pfn."""
    private(rmp, R, PG_LEVEL_2M)
    rmp.rmpupdate_range(R + 512, 512, PG_LEVEL_4K, assigned=True, asid=ASID, gpa=gpa_of(R + 512))
    assert rmp.find_ne(R, 1024, assigned=True, asid=ASID, gpa=GPA) == -1
    assert rmp.find_ne(R, 1024, level=PG_LEVEL_2M) == R + 512
    assert rmp.find_eq(R, 1024, level=PG_LEVEL_4K) == R + 512
    assert rmp.find_ne(R, 1024, gpa=GPA + 4096) == R
    assert rmp.find_eq(R - 5, 2000, assigned=False, level=PG_LEVEL_4K) == R - 5
    assert rmp.find_eq(R, 1024, validated=True) == -1
    assert rmp.find_ne(R + 1024, 512, assigned=False) == -1     # sev_gmem_prepare's test


def test_find_gpa_on_unassigned_entries(rmp):
    """Unassigned entries report GPA 0, which only matches where the wanted GPA is 0."""
    assert rmp.find_eq(5, 10, gpa=0) == 5
    assert rmp.find_ne(5, 10, gpa=0) == 6
    assert rmp.find_ne(5, 1, gpa=0) == -1
    assert rmp.find_eq(5, 10, gpa=4096) == -1


def test_firmware_update_sets_fields_of_assigned_entries(rmp):
    """firmware_update writes immutable/validated/vmsa, as SNP firmware commands do."""
    rmp.rmpupdate_range(R, 8, PG_LEVEL_4K, assigned=True, asid=ASID, gpa=GPA, immutable=True)
    rmp.firmware_update(R, 8, immutable=False, validated=True)
    rmp.firmware_update(R + 1, 1, vmsa=True)
    assert rmp.lookup(R) == RmpEntry(True, PG_LEVEL_4K, ASID, GPA, False, True, False)
    assert rmp.lookup(R + 1).vmsa
    private(rmp, R + 512, PG_LEVEL_2M)
    rmp.firmware_update(R + 512, 512, validated=True)
    assert rmp.lookup(R + 1000).validated


@pytest.mark.parametrize("args, kwargs, match", [
    ((R + 100, 1), {"validated": True}, r"pfn 0x1064 is not assigned"),
    ((R + 513, 10), {"validated": True}, r"cuts a 2M RMP entry"),
    ((R + 512, 512), {"vmsa": True}, r"VMSA pages are 4K"),
    ((R, 1), {"validated": 2}, r"validated must be a bool"),
])
def test_firmware_update_rejects_bad_requests(rmp, args, kwargs, match):
    """firmware_update refuses unassigned pages, cut 2M entries, 2M VMSA pages; nothing changes."""
    private(rmp, R)
    private(rmp, R + 512, PG_LEVEL_2M)
    before = snapshot(rmp)
    with pytest.raises(ValueError, match=match):
        rmp.firmware_update(*args, **kwargs)
    assert snapshot(rmp) == before


def test_counters_and_reset(rmp):
    """counters is a fresh dict of every counter; reset_counters zeroes them."""
    private(rmp, R)
    c = rmp.counters
    c["rmpupdate"] = 99
    assert rmp.counters["rmpupdate"] == 1
    assert {"rmpupdate", "rmpupdate_2m", "psmash", "pvalidate", "rmpupdate_fail_overlap",
            "pvalidate_fail_sizemismatch", "pvalidate_npf_sizem"} <= set(c)
    rmp.reset_counters()
    assert set(rmp.counters.values()) == {0}


def test_not_picklable_and_repr(rmp):
    """RmpTable says plainly that it cannot be pickled; its repr shows size and runs."""
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(rmp)
    assert repr(rmp) == "RmpTable(max_pfn=0x100000, runs=0)"


def test_tib_of_memory_costs_what_one_region_does():
    """A 1 TiB range converts in O(log n): memory does not depend on its size."""
    small, big = RmpTable(), RmpTable()
    for t, n in ((small, 512), (big, 1 << 28)):
        assert t.rmpupdate_range(1 << 20, n, PG_LEVEL_2M, assigned=True, asid=1,
                                 gpa=0) == (n // 512, -1, 0)
        assert t.pvalidate_range(1 << 20, n, PG_LEVEL_2M, asid=1, gpa=0,
                                 validate=True) == (n // 512, -1, 0)
    assert big.nruns == small.nruns == 1  # one packed entry word: own, 2M, validated
    assert big.nbytes == small.nbytes
    big._check()


def test_deep_trees_with_small_fanout():
    """With 4-way nodes, many runs build deep field maps; every op agrees with the reference."""
    core, ref = RmpTable(max_pfn=1 << 14, _fanout=4), RefRmpTable(max_pfn=1 << 14)
    for t in (core, ref):
        for p in range(0, 4096, 3):
            t.rmpupdate(p, PG_LEVEL_4K, assigned=True, asid=1 + p % 5, gpa=p * 8192)
        t.pvalidate_range(0, 4096, PG_LEVEL_4K, asid=1, gpa=0, validate=True)
        t.rmpupdate_range(1000, 1000, PG_LEVEL_4K, assigned=False)
        t.rmpupdate_range(512, 1536, PG_LEVEL_2M, assigned=True, asid=9, gpa=1 << 30)
    assert core.counters == ref.counters
    assert [core.lookup(p) for p in range(4096)] == [ref.lookup(p) for p in range(4096)]
    core._check()


# ---------------------------------------------------------------------------------------------
# Programming errors: TypeError / ValueError naming the argument, nothing changed
# ---------------------------------------------------------------------------------------------

BAD_CALLS = [
    pytest.param("rmpupdate", (R, PG_LEVEL_4K), {"assigned": True, "asid": 1, "gpa": "0"},
                 TypeError, "gpa must be an integer", id="gpa-str"),
    pytest.param("rmpupdate", (1.5, PG_LEVEL_4K), {"assigned": True},
                 TypeError, "pfn must be an integer", id="pfn-float"),
    pytest.param("rmpupdate", (-1, PG_LEVEL_4K), {"assigned": True},
                 ValueError, "pfn -0x1 out of range", id="pfn-negative"),
    pytest.param("rmpupdate", (1 << 20, PG_LEVEL_4K), {"assigned": True},
                 ValueError, "pfn 0x100000 out of range", id="pfn-past-table"),
    pytest.param("rmpupdate", (R, 3), {"assigned": True},
                 ValueError, "level must be PG_LEVEL_4K", id="level-1g"),
    pytest.param("rmpupdate", (R, "4k"), {"assigned": True},
                 TypeError, "level must be an integer", id="level-str"),
    pytest.param("rmpupdate", (R, PG_LEVEL_4K), {"assigned": 2},
                 ValueError, "assigned must be a bool", id="assigned-2"),
    pytest.param("rmpupdate", (R, PG_LEVEL_4K), {"assigned": None},
                 TypeError, "assigned must be a bool", id="assigned-none"),
    pytest.param("rmpupdate", (R, PG_LEVEL_4K), {"assigned": True, "asid": 1 << 16},
                 ValueError, "asid 0x10000 out of range", id="asid-too-big"),
    pytest.param("rmpupdate", (R, PG_LEVEL_4K), {"assigned": True, "gpa": 0x1001},
                 ValueError, "gpa 0x1001 is not 4K-aligned", id="gpa-unaligned"),
    pytest.param("rmpupdate", (R, PG_LEVEL_4K), {"assigned": True, "gpa": 1 << 52},
                 ValueError, "gpa 0x10000000000000 out of range", id="gpa-too-big"),
    pytest.param("rmpupdate_range", (R, 1 << 20, PG_LEVEL_4K), {"assigned": False},
                 ValueError, "passes max_pfn", id="range-past-table"),
    pytest.param("rmpupdate_range", (R, 100, PG_LEVEL_2M), {"assigned": False},
                 ValueError, "npages 0x64 is not a multiple of 512", id="range-2m-partial"),
    pytest.param("rmpupdate_range", (R, -1, PG_LEVEL_4K), {"assigned": False},
                 ValueError, "npages -0x1 out of range", id="npages-negative"),
    pytest.param("rmpupdate_range", (R, 4, PG_LEVEL_4K),
                 {"assigned": True, "gpa": (1 << 52) - 4096},
                 ValueError, "passes 2\\*\\*52", id="gpa-range-past-limit"),
    pytest.param("psmash_range", (R, 10), {},
                 ValueError, "npages 0xa is not a multiple of 512", id="psmash-partial"),
    pytest.param("pvalidate", (R, PG_LEVEL_4K), {"asid": 1, "gpa": 0, "validate": "yes"},
                 TypeError, "validate must be a bool", id="validate-str"),
    pytest.param("pvalidate_range", (R, 3, PG_LEVEL_2M), {"asid": 1, "gpa": 0, "validate": True},
                 ValueError, "npages 0x3 is not a multiple of 512", id="pvalidate-2m-partial"),
    pytest.param("set_in_use", (R, 1, 5), {},
                 ValueError, "in_use must be a bool", id="in-use-5"),
    pytest.param("find_ne", (R, 10), {"level": 0},
                 ValueError, "level must be PG_LEVEL_4K", id="find-level-0"),
    pytest.param("lookup", ("1",), {},
                 TypeError, "pfn must be an integer", id="lookup-str"),
]


@pytest.mark.parametrize("method, args, kwargs, exc, match", BAD_CALLS)
def test_bad_arguments_raise_and_change_nothing(rmp, method, args, kwargs, exc, match):
    """Wrong types raise TypeError, bad values ValueError, naming the argument; nothing changes."""
    private(rmp, R, PG_LEVEL_2M)
    before = snapshot(rmp)
    with pytest.raises(exc, match=match):
        getattr(rmp, method)(*args, **kwargs)
    assert snapshot(rmp) == before


@pytest.mark.parametrize("max_pfn, exc, match", [
    (0, ValueError, "max_pfn 0x0 out of range"),
    (1000, ValueError, "not a multiple of 512"),
    ((1 << 40) + 512, ValueError, "out of range"),
    ("big", TypeError, "max_pfn must be an integer"),
])
def test_bad_table_size(max_pfn, exc, match):
    """max_pfn must be a positive multiple of 512 up to 2**40."""
    with pytest.raises(exc, match=match):
        RmpTable(max_pfn)
