"""RmpTable's packed entry word: instructions that write many runs, and the demotion write.

Every RMP entry is one word on one map (``pkvm/_rmp.pxi``): an RMPUPDATE is one write, but
PSMASH, PVALIDATE and the firmware updates rewrite some bits of every run they cover (in groups
of ``_RMW_UNITS`` runs), and a 4K RMPUPDATE that cuts an unassigned 2M entry writes twice. These
properties build tables of many runs (per-page owners and skewed GPAs, so that neighbouring
entries never coalesce) and check every entry, counter and run against ``RefRmpTable``.
"""

from hypothesis import given
from hypothesis import strategies as st

from pkvm import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm._core import RmpTable
from pkvm.testing.reference_snp import RefRmpTable

M = 512
BASE = 8 * M                  # a 2M-aligned pfn
MAX_PFN = 64 * M


def _both(rmp, ref, name, *args, **kwargs):
    got = getattr(rmp, name)(*args, **kwargs)
    want = getattr(ref, name)(*args, **kwargs)
    assert got == want, (name, args, kwargs)
    return got


def _same(rmp, ref, lo, hi):
    rmp._check()
    assert rmp.counters == ref.counters
    for p in range(lo, hi):
        assert tuple(rmp.lookup(p)) == tuple(ref.lookup(p)), hex(p)


# owners: per 4K page (or per 2M block), 0 = leave unassigned, else (asid, skew in pages)
owners = st.sampled_from([0, (1, 0), (1, 3), (2, 0), (2, 7)])


@given(pages=st.lists(owners, min_size=1, max_size=40), data=st.data())
def test_firmware_update_and_pvalidate_over_many_4k_runs(pages, data):
    """Setting a bit on k > _RMW_UNITS runs writes each run once and keeps the others."""
    rmp, ref = RmpTable(MAX_PFN), RefRmpTable(MAX_PFN)
    for i, o in enumerate(pages):
        if o:
            asid, skew = o
            gpa = (BASE + i + skew) * 4096 + (asid << 32)
            _both(rmp, ref, "rmpupdate", BASE + i, PG_LEVEL_4K, assigned=True, asid=asid,
                  gpa=gpa)
    n = len(pages)
    if all(pages):
        fields = data.draw(st.fixed_dictionaries(
            {}, optional={"immutable": st.booleans(), "validated": st.booleans(),
                          "vmsa": st.booleans()}))
        _both(rmp, ref, "firmware_update", BASE, n, **fields)
    else:
        # a gap (an unassigned page) refuses the whole update, naming it; nothing changes
        before = rmp.ranges(BASE, n)
        try:
            rmp.firmware_update(BASE, n, validated=True)
        except ValueError as exc:
            assert "is not assigned" in str(exc)
        else:
            raise AssertionError("firmware_update over an unassigned page was accepted")
        assert rmp.ranges(BASE, n) == before
    # PVALIDATE each page as its own owner: flips the validated bit of one run at a time
    for i, o in enumerate(pages):
        if o and data.draw(st.booleans()):
            asid, skew = o
            gpa = (BASE + i + skew) * 4096 + (asid << 32)
            _both(rmp, ref, "pvalidate_range", BASE + i, 1, PG_LEVEL_4K, asid=asid, gpa=gpa,
                  validate=data.draw(st.booleans()))
    _same(rmp, ref, BASE - 1, BASE + n + 1)


@given(blocks=st.lists(owners, min_size=1, max_size=24), lock=st.none() | st.integers(0, 23),
       imm=st.none() | st.integers(0, 23))
def test_psmash_range_over_many_2m_runs(blocks, lock, imm):
    """PSMASH over many 2M entries of different owners clears the pagesize bit run by run."""
    rmp, ref = RmpTable(MAX_PFN), RefRmpTable(MAX_PFN)
    for i, o in enumerate(blocks):
        pfn = BASE + i * M
        if o:
            asid, skew = o
            gpa = (pfn + skew * M) * 4096 + (asid << 32)
            _both(rmp, ref, "rmpupdate", pfn, PG_LEVEL_2M, assigned=True, asid=asid, gpa=gpa,
                  immutable=imm == i)
        else:
            _both(rmp, ref, "rmpupdate", pfn, PG_LEVEL_2M, assigned=False)
    if lock is not None and lock < len(blocks):
        _both(rmp, ref, "set_in_use", BASE + lock * M + 5)
    _both(rmp, ref, "psmash_range", BASE, len(blocks) * M)
    _same(rmp, ref, BASE - 1, BASE + len(blocks) * M + 1)


@given(offset=st.integers(0, M - 1), n=st.integers(1, 3 * M), assigned=st.booleans(),
       asid=st.sampled_from([1, 2]), skew=st.sampled_from([0, 1, -M]),
       neighbours=st.booleans())
def test_4k_update_inside_unassigned_2m_entries_demotes_them(offset, n, assigned, asid, skew,
                                                              neighbours):
    """A 4K RMPUPDATE cutting unassigned 2M entries: the written pages get the new entry, the
    rest of every cut entry becomes unassigned 4K entries, untouched entries stay 2M."""
    rmp, ref = RmpTable(MAX_PFN), RefRmpTable(MAX_PFN)
    lo, hi = BASE - M, BASE + 4 * M
    for b in range(lo, hi, M):
        if neighbours or BASE <= b < BASE + 3 * M:
            _both(rmp, ref, "rmpupdate", b, PG_LEVEL_2M, assigned=False)
    pfn = BASE + offset
    n = min(n, BASE + 3 * M - pfn)
    kw = {"asid": asid, "gpa": (pfn + skew + M) * 4096} if assigned else {}
    _both(rmp, ref, "rmpupdate_range", pfn, n, PG_LEVEL_4K, assigned=assigned, **kw)
    _same(rmp, ref, lo, hi)


def test_one_run_for_a_validated_linear_guest():
    """Owner, page size, immutable, validated and VMSA share one stored run per uniform range."""
    rmp = RmpTable(MAX_PFN)
    assert rmp.rmpupdate_range(BASE, 4 * M, PG_LEVEL_2M, assigned=True, asid=1,
                               gpa=BASE * 4096) == (4, -1, 0)
    assert rmp.pvalidate_range(BASE, 4 * M, PG_LEVEL_2M, asid=1, gpa=BASE * 4096,
                               validate=True) == (4, -1, 0)
    rmp.firmware_update(BASE, 4 * M, immutable=True)
    assert rmp.nruns == 1
    rmp.firmware_update(BASE + M, M, immutable=False)
    assert rmp.nruns == 3
    assert rmp.lookup(BASE + M + 3).immutable is False
    assert rmp.lookup(BASE + 2 * M).immutable is True
    rmp._check()
