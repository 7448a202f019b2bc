"""The kernel direct map under SNP: boot layout, both policies, counters, fragmentation."""

import doctest

import pytest

import pkvm.host.directmap
from pkvm import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.host.directmap import DEFAULT_RAM, DIRECTMAP_POLICIES, DirectMap, boot_layout
from pkvm.testing.reference_snp import RefDirectMap

G = 1 << 18           # pfns per 1G
M = 1 << 9            # pfns per 2M
# 4K head [G - 2M - 256, G - 2M), two 2M pages, one 1G page, two 2M pages, a 100-page 4K tail.
RAM = [(G - 2 * M - 256, 2 * G + 2 * M + 100)]


def dm_pair(policy):
    """The direct map and its per-mapping reference on RAM."""
    return DirectMap(RAM, policy), RefDirectMap(RAM, policy)


def assert_same(dm, ref):
    """Same mappings, counters and fragmentation; invariants hold."""
    dm._check()
    assert dm.ranges() == ref.ranges()
    assert dm.counters == ref.counters
    assert dm.fragmented_pages() == ref.fragmented_pages()


@pytest.mark.parametrize("start, end, expected", [
    pytest.param(0, G, [(0, G, 3)], id="aligned-1g"),
    pytest.param(100, 2 * M, [(100, M, 1), (M, 2 * M, 2)], id="unaligned-head"),
    pytest.param(0, M + 7, [(0, M, 2), (M, M + 7, 1)], id="unaligned-tail"),
    pytest.param(3, 200, [(3, 200, 1)], id="smaller-than-2m"),
    pytest.param(M + 1, 2 * M - 1, [(M + 1, 2 * M - 1, 1)], id="inside-one-2m-block"),
    pytest.param(G - M, 2 * G + M, [(G - M, G, 2), (G, 2 * G, 3), (2 * G, 2 * G + M, 2)],
                 id="2m-1g-2m"),
])
def test_boot_layout(start, end, expected):
    """Boot mappings follow split_mem_range: 4K head, 2M, 1G, 2M, 4K tail."""
    assert boot_layout(start, end) == expected


def test_fresh_map_has_boot_levels_and_no_fragmentation():
    """Before any RMPUPDATE every page is mapped at its boot level."""
    dm = DirectMap(RAM)
    pfns = (G - 2 * M - 257, G - 2 * M - 256, G - 2 * M, G, 2 * G, 2 * G + 2 * M)
    assert [dm.level(p) for p in pfns] == [0, PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, PG_LEVEL_2M,
                                           PG_LEVEL_4K]
    assert dm.fragmented_fraction() == 0.0
    assert dm.ram_pages == 2 * G + 2 * M + 100 - (G - 2 * M - 256)
    dm._check()


def test_split_4k_splits_1g_then_2m_once_per_block():
    """A 4K RMPUPDATE in a 1G page: 1G -> 2M -> 4K (two splits, one set_memory_4k call)."""
    dm = DirectMap(RAM)
    assert dm.before_rmpupdate(G + 5, 1, PG_LEVEL_4K, assigned=True) == 1
    assert dm.level(G + 5) == PG_LEVEL_4K and dm.level(G + M) == PG_LEVEL_2M
    assert dm.counters["directmap_splits"] == 2
    assert dm.before_rmpupdate(G + 6, 1, PG_LEVEL_4K, assigned=True) == 0   # already 4K
    assert dm.before_rmpupdate(G + M + 1, 1, PG_LEVEL_4K, assigned=False) == 1
    assert dm.counters == {"directmap_splits": 3, "directmap_unmaps": 0,
                           "directmap_restores": 0, "directmap_cpa_calls": 2}
    assert dm.fragmented_pages() == G
    dm._check()


def test_split_4k_leaves_2m_updates_alone_and_never_recoalesces():
    """2M RMPUPDATEs need no change (§5.8); pages split for 4K updates stay 4K afterwards."""
    dm = DirectMap(RAM)
    assert dm.before_rmpupdate(G, M, PG_LEVEL_2M, assigned=True) == 0
    assert dm.level(G) == PG_LEVEL_1G
    dm.before_rmpupdate(G - M, M, PG_LEVEL_4K, assigned=True)
    dm.before_rmpupdate(G - M, M, PG_LEVEL_4K, assigned=False)
    dm.after_rmpupdate(G - M, M, PG_LEVEL_4K, assigned=False)
    assert dm.level(G - M) == PG_LEVEL_4K and dm.is_present(G - M)
    assert dm.fragmented_pages() == M
    assert dm.counters["directmap_unmaps"] == dm.counters["directmap_restores"] == 0


def test_unmap_restore_unmaps_on_assign_and_restores_at_4k():
    """RFC policy: not-present before shared->private, present (4K) again after private->shared."""
    dm = DirectMap(RAM, "unmap-restore")
    assert dm.before_rmpupdate(G, M, PG_LEVEL_2M, assigned=True) == M       # one CPA per page
    assert dm.after_rmpupdate(G, M, PG_LEVEL_2M, assigned=True) == 0
    assert not dm.is_present(G) and dm.level(G + M - 1) == 0 and dm.level(G + M) == PG_LEVEL_2M
    assert dm.counters == {"directmap_splits": 2, "directmap_unmaps": M,
                           "directmap_restores": 0, "directmap_cpa_calls": M}
    assert dm.before_rmpupdate(G, M, PG_LEVEL_2M, assigned=False) == 0
    assert dm.after_rmpupdate(G, M, PG_LEVEL_2M, assigned=False) == M
    assert dm.level(G) == PG_LEVEL_4K
    assert dm.counters["directmap_restores"] == M and dm.counters["directmap_cpa_calls"] == 2 * M
    dm._check()


def test_unmap_restore_counts_calls_on_pages_already_in_that_state():
    """Re-assigning unmapped pages or restoring present ones still makes the CPA calls."""
    dm = DirectMap(RAM, "unmap-restore")
    dm.invalidate(G - 10, 4)
    assert dm.invalidate(G - 10, 8) == 8
    assert dm.counters["directmap_unmaps"] == 8
    assert dm.restore(G - 100, 200) == 200
    assert dm.counters["directmap_restores"] == 8
    assert dm.level(G + 50) == PG_LEVEL_1G          # present large pages are preserved


@pytest.mark.parametrize("policy", DIRECTMAP_POLICIES)
def test_range_forms_match_the_per_mapping_reference(policy):
    """A sequence of range updates gives the reference's mappings, counters and fragmentation."""
    dm, ref = dm_pair(policy)
    steps = [
        (G - 2 * M - 256, 256 + 3 * M, PG_LEVEL_4K, True),
        (G - 2 * M, 2 * M, PG_LEVEL_2M, False),
        (G + 7 * M, 2 * M, PG_LEVEL_2M, True),
        (2 * G - 3, 600, PG_LEVEL_4K, True),
        (2 * G - 3, 600, PG_LEVEL_4K, False),
        (2 * G + M, M, PG_LEVEL_2M, False),
    ]
    for pfn, n, level, assigned in steps:
        for t in (dm, ref):
            a = t.before_rmpupdate(pfn, n, level, assigned=assigned)
            b = t.after_rmpupdate(pfn, n, level, assigned=assigned)
            if t is dm:
                got = (a, b)
            else:
                assert got == (a, b)
        assert_same(dm, ref)
    assert 0 < dm.fragmented_fraction() == ref.fragmented_fraction() < 1


def test_per_page_calls_equal_one_range_call():
    """Updating pages one by one and as one range makes the same changes and counts."""
    one, many = DirectMap(RAM), DirectMap(RAM)
    one.adjust(G - 300, 900)
    for p in range(G - 300, G + 600):
        many.adjust(p)
    assert one.ranges() == many.ranges() and one.counters == many.counters


@pytest.mark.parametrize("call, exc, match", [
    (lambda d: d.adjust(G - 2 * M - 257), ValueError, r"\[0x3faff, 0x3fb00\) is not all RAM"),
    (lambda d: d.adjust(2 * G + 2 * M + 99, 2), ValueError, "is not all RAM"),
    (lambda d: d.adjust(G, 1, PG_LEVEL_1G), ValueError, "level must be PG_LEVEL_4K"),
    (lambda d: d.adjust(G + 1, M, PG_LEVEL_2M), ValueError, "2M-aligned pfn and npages"),
    (lambda d: d.invalidate(G, -1), ValueError, "npages must be >= 0"),
    (lambda d: d.restore("G"), TypeError, "pfn must be an integer"),
    (lambda d: d.before_rmpupdate(G, 1.0, PG_LEVEL_4K, assigned=True), TypeError,
     "npages must be an integer"),
    (lambda d: d.after_rmpupdate(G, M, 7, assigned=False), ValueError, "level must be"),
])
def test_bad_arguments_raise_and_change_nothing(call, exc, match):
    """Invalid pfns (the kernel's -EINVAL), levels and types raise, naming the problem."""
    dm = DirectMap(RAM, "unmap-restore")
    dm.invalidate(G, 10)
    before = (dm.ranges(), dm.counters, dm.fragmented_pages())
    with pytest.raises(exc, match=match):
        call(dm)
    assert (dm.ranges(), dm.counters, dm.fragmented_pages()) == before


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"policy": "lazy"}, ValueError, "policy must be one of"),
    ({"ram": [(5, 5)]}, ValueError, r"ram\[0\] \[0x5, 0x5\) is empty"),
    ({"ram": [(0, 10), (5, 20)]}, ValueError, "ram ranges overlap at pfn 0x5"),
    ({"ram": [7]}, TypeError, r"ram\[0\] must be a \(start_pfn, end_pfn\) pair"),
    ({"ram": [(0, "x")]}, TypeError, r"ram\[0\] end must be an integer"),
])
def test_bad_construction(kwargs, exc, match):
    """Unknown policies and malformed RAM layouts are rejected."""
    with pytest.raises(exc, match=match):
        DirectMap(**kwargs)


def test_touching_ram_ranges_merge():
    """RAM given in touching pieces is one range (as memblock merges them)."""
    dm = DirectMap([(G, G + M), (0, G)])
    assert dm.ram == [(0, G + M)]
    assert dm.level(0) == PG_LEVEL_1G


def test_default_ram_is_the_host_allocators_range():
    """Without a layout the direct map covers HostMemory's default pfns."""
    from pkvm.host import hostmem

    assert DEFAULT_RAM == ((hostmem.DEFAULT_START_PFN,
                            hostmem.DEFAULT_START_PFN + hostmem.DEFAULT_NR_PAGES),)


def test_tib_of_4k_updates_is_cheap():
    """Splitting the direct map under 1 TiB of 4K updates costs a few runs, not 2**28 pages."""
    dm = DirectMap()
    start = DEFAULT_RAM[0][0]
    assert dm.before_rmpupdate(start, 1 << 28, PG_LEVEL_4K, assigned=True) == 1 << 19
    assert dm.counters["directmap_splits"] == (1 << 19) + (1 << 10)
    assert dm.fragmented_fraction() == 1 / 64
    assert len(dm.ranges()) == 2
    dm._check()


def test_module_doctests():
    """The examples in pkvm.host.directmap's docstrings run as written."""
    result = doctest.testmod(pkvm.host.directmap)
    assert result.failed == 0 and result.attempted > 0
