"""The direct map's walks in the typed core (``pkvm._core.directmap_split`` / ``_invalidate`` /
``_restore``, called by ``DirectMap._split`` / ``_invalidate`` / ``_restore``): random sequences of RMPUPDATE wrapper calls give the per-mapping
reference's mappings, counters and fragmentation, on RAM whose boot layout mixes 4K, 2M and 1G
mappings."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm._core import RangeMap, directmap_invalidate, directmap_restore, directmap_split
from pkvm.host.directmap import DirectMap
from pkvm.testing.reference_snp import RefDirectMap

G = 1 << 18           # pfns per 1G
M = 1 << 9            # pfns per 2M
# 4K head, 2M pages, two 1G pages, 2M pages, a 4K tail; then a second RAM range
RAM = [(G - 2 * M - 256, 3 * G + 2 * M + 100), (4 * G + 7, 5 * G + M)]
LO, HI = RAM[0][0], RAM[1][1]


def _call(ram_pfn: int, n: int, level: int, assigned: bool) -> tuple[int, int, int, bool] | None:
    for a, b in RAM:
        if a <= ram_pfn < b:
            if level == PG_LEVEL_2M:
                p = (ram_pfn + M - 1) // M * M
                k = max(1, n // M) * M
                return (p, k, level, assigned) if a <= p and p + k <= b else None
            return ram_pfn, min(n, b - ram_pfn), level, assigned
    return None


_calls = st.lists(st.tuples(st.integers(LO, HI - 1), st.integers(1, 3 * M), st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M]),
                            st.booleans()), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(_calls, st.sampled_from(["split-4k", "unmap-restore"]))
def test_random_wrapper_calls_match_the_reference(calls, policy):
    dm, ref = DirectMap(RAM, policy), RefDirectMap(RAM, policy)
    for c in calls:
        args = _call(*c)
        if args is None:
            continue
        pfn, n, level, assigned = args
        got = [dm.before_rmpupdate(pfn, n, level, assigned=assigned), dm.after_rmpupdate(pfn, n, level, assigned=assigned)]
        want = [ref.before_rmpupdate(pfn, n, level, assigned=assigned),
                ref.after_rmpupdate(pfn, n, level, assigned=assigned)]
        assert got == want
        dm._check()
        assert dm.ranges() == ref.ranges()
        assert dm.counters == ref.counters
        assert dm.fragmented_pages() == ref.fragmented_pages()


def test_split_counts_and_changes():
    """One 1G page split around one touched 2M block: one 1G split, one 2M split, the whole
    1G block fragmented; a second call changes nothing."""
    m = RangeMap(0)
    m.assign(0, G, 3)
    orig = RangeMap(0)
    orig.assign(0, G, 3)
    assert directmap_split(m, orig, M + 5, M + 6) == (1, 1, G)
    assert m.ranges() == [(0, M, 2), (M, 2 * M, 1), (2 * M, G, 2)]
    assert directmap_split(m, orig, M + 5, M + 6) == (0, 0, 0)
    # a 2M page that was 2M at boot fragments its 512 pages; one from a split 1G page does not
    orig2 = RangeMap(0)
    orig2.assign(0, 4 * M, 2)
    m2 = RangeMap(0)
    m2.assign(0, 4 * M, 2)
    assert directmap_split(m2, orig2, M - 1, M + 1) == (0, 2, 2 * M)
    assert directmap_split(m, orig, 3 * M, 3 * M + 1) == (0, 1, 0)


def test_invalidate_and_restore_counts_and_changes():
    """Unmapping splits first and counts only pages that were present; restoring makes the
    absent pages present at 4K and counts them; present pages keep their mapping; each page
    is one CPA call."""
    m = RangeMap(0)
    m.assign(0, 2 * M, 2)
    orig = RangeMap(0)
    orig.assign(0, 2 * M, 2)
    cnt = dict.fromkeys(("directmap_splits", "directmap_unmaps", "directmap_restores", "directmap_cpa_calls"), 0)
    assert directmap_invalidate(m, orig, 10, 20, cnt) == M
    assert m.ranges() == [(0, 10, 1), (10, 20, 5), (20, M, 1), (M, 2 * M, 2)]
    assert cnt == {"directmap_splits": 1, "directmap_unmaps": 10, "directmap_restores": 0, "directmap_cpa_calls": 10}
    assert directmap_invalidate(m, orig, 15, 25, cnt) == 0  # 15..20 were absent already
    assert cnt["directmap_unmaps"] == 15 and cnt["directmap_cpa_calls"] == 20
    directmap_restore(m, 0, 2 * M, cnt)
    assert m.ranges() == [(0, M, 1), (M, 2 * M, 2)]
    assert cnt["directmap_restores"] == 15 and cnt["directmap_cpa_calls"] == 20 + 2 * M
    directmap_restore(m, 0, 2 * M, cnt)
    assert cnt["directmap_restores"] == 15
