"""Differential state machine: RmpTable + DirectMap against their per-page references.

Random RMPUPDATE / PSMASH / PVALIDATE range calls (4K and 2M, aligned or not, linear and skewed
GPAs, immutable pages, in-use locks), firmware updates and queries over a few 2M regions that
span a 4K-mapped head, 2M-mapped and 1G-mapped direct-map areas. After every step every entry,
counter and direct-map run must equal the reference, and both cores' ``_check()`` must pass.
The Hypothesis profile comes from ``HYPOTHESIS_PROFILE`` (see conftest.py).
"""

from hypothesis import strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pkvm import PG_LEVEL_2M, PG_LEVEL_4K
from pkvm._core import RmpTable
from pkvm.host.directmap import DIRECTMAP_POLICIES, DirectMap
from pkvm.testing.reference_snp import RefDirectMap, RefRmpTable

G = 1 << 18
M = 1 << 9
RAM = [(G - 2 * M - 256, 2 * G + 2 * M + 100)]
LO = G - 2 * M - 256          # 256 4K-mapped pages, then 2 regions in 2M pages, 2 in a 1G page
HI = G + 2 * M
REGIONS = [G - 2 * M, G - M, G, G + M]
MAX_PFN = 2 * G + 4 * M
OFFSET = {1: 1 << 32, 2: 1 << 34}   # guest a's linear GPA of pfn p: p * 4096 + OFFSET[a]

spans_4k = st.tuples(st.integers(LO, HI - 1), st.integers(0, 700))
spans_2m = st.tuples(st.integers(0, len(REGIONS) - 1), st.integers(0, len(REGIONS)),
                     st.integers(0, 511) | st.just(0) | st.just(0))
asids = st.sampled_from([1, 2])
skews = st.sampled_from([0, 0, 0, 0, 1, 512, -512])   # pages added to the linear GPA


def span(level, s4k, s2m):
    """``(pfn, npages)`` inside the domain: any 4K span, or whole regions (maybe unaligned)."""
    if level == PG_LEVEL_4K:
        pfn, n = s4k
        return pfn, min(n, HI - pfn)
    first, count, offset = s2m
    count = min(count, len(REGIONS) - first)
    if offset:
        return REGIONS[first] + offset, M        # an unaligned 2M operand: FAIL_INPUT
    return REGIONS[first], count * M


def gpa(pfn, asid, skew):
    return pfn * 4096 + OFFSET[asid] + skew * 4096


class RmpMachine(RuleBasedStateMachine):
    """Drive the cores and the references with the same calls; compare after every step."""

    @initialize(policy=st.sampled_from(DIRECTMAP_POLICIES), fanout=st.sampled_from([None, 4]))
    def setup(self, policy, fanout):
        self.rmp = RmpTable(MAX_PFN, _fanout=fanout)
        self.ref = RefRmpTable(MAX_PFN)
        self.dm = DirectMap(RAM, policy)
        self.ref_dm = RefDirectMap(RAM, policy)

    def _both(self, name, *args, **kwargs):
        """Call ``name`` on the core and the reference RMP; results must agree."""
        got = getattr(self.rmp, name)(*args, **kwargs)
        want = getattr(self.ref, name)(*args, **kwargs)
        assert got == want, f"{name}{args} {kwargs}: core {got}, reference {want}"
        return got

    def _both_dm(self, name, *args, **kwargs):
        got = getattr(self.dm, name)(*args, **kwargs)
        want = getattr(self.ref_dm, name)(*args, **kwargs)
        assert got == want, f"directmap {name}{args} {kwargs}: core {got}, reference {want}"
        return got

    @rule(level=st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M]), s4k=spans_4k, s2m=spans_2m,
          assigned=st.sampled_from([True, True, False]), asid=asids, skew=skews,
          immutable=st.sampled_from([False] * 5 + [True]),
          junk=st.sampled_from([False] * 9 + [True]))
    def rmpupdate(self, level, s4k, s2m, assigned, asid, skew, immutable, junk):
        pfn, n = span(level, s4k, s2m)
        if assigned:
            fields = {"assigned": True, "asid": asid, "gpa": gpa(pfn, asid, skew),
                      "immutable": immutable}
        else:
            fields = {"assigned": False, "asid": asid if junk else 0}
        aligned = level == PG_LEVEL_4K or pfn % M == 0
        if aligned:   # the kernel's adjust_direct_map would -EINVAL an unaligned 2M update
            self._both_dm("before_rmpupdate", pfn, n, level, assigned=assigned)
        done, _, _ = self._both("rmpupdate_range", pfn, n, level, **fields)
        if aligned and done:
            pages = done * (M if level == PG_LEVEL_2M else 1)
            self._both_dm("after_rmpupdate", pfn, pages, level, assigned=assigned)

    @rule(s2m=spans_2m)
    def psmash(self, s2m):
        pfn, n = span(PG_LEVEL_2M, None, s2m)
        self._both("psmash_range", pfn, n)

    @rule(level=st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M]), s4k=spans_4k, s2m=spans_2m,
          asid=asids, skew=skews, validate=st.booleans(), owner=st.booleans(), data=st.data())
    def pvalidate(self, level, s4k, s2m, asid, skew, validate, owner, data):
        pfn, n = span(level, s4k, s2m)
        owned = sorted(p for p, e in self.ref.entries.items() if e["assigned"])
        if owner and owned:
            # Start at a guest-owned page, as its owner at its GPA, so that the size checks,
            # the no-update result and success are reached, not only the ownership fault.
            pfn = data.draw(st.sampled_from(owned), label="owned pfn")
            if level == PG_LEVEL_2M:
                pfn -= pfn % M
                n = M if pfn >= REGIONS[0] else 0
            else:
                n = min(data.draw(st.integers(1, 8) | st.just(n), label="npages"), HI - pfn)
            entry = self.ref.lookup(pfn)
            if entry.assigned:
                asid, address = entry.asid, entry.gpa
            else:                                   # the aligned page of a partly owned region
                address = gpa(pfn, asid, skew)
        else:
            address = gpa(pfn, asid, skew)
        self._both("pvalidate_range", pfn, n, level, asid=asid, gpa=address, validate=validate)

    @rule(pfn=st.integers(LO, HI - 1), n=st.integers(1, 3), in_use=st.booleans())
    def set_in_use(self, pfn, n, in_use):
        self._both("set_in_use", pfn, n, in_use)

    @rule(level=st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M]), s4k=spans_4k, s2m=spans_2m,
          immutable=st.none() | st.booleans(), validated=st.none() | st.booleans(),
          vmsa=st.none() | st.booleans())
    def firmware_update(self, level, s4k, s2m, immutable, validated, vmsa):
        pfn, n = span(level, s4k, s2m)
        outcome = []
        for t in (self.rmp, self.ref):
            try:
                t.firmware_update(pfn, n, immutable=immutable, validated=validated, vmsa=vmsa)
                outcome.append("ok")
            except ValueError:
                outcome.append("ValueError")
        assert outcome[0] == outcome[1], f"firmware_update({pfn:#x}, {n}): {outcome}"

    @rule(s4k=spans_4k, equal=st.booleans(), data=st.data())
    def find(self, s4k, equal, data):
        pfn, n = span(PG_LEVEL_4K, s4k, None)
        entry = self.ref.lookup(pfn)._asdict()
        names = data.draw(st.sets(st.sampled_from(sorted(entry))), label="fields")
        want = {k: entry[k] for k in names}
        if "gpa" in want and data.draw(st.booleans(), label="other gpa"):
            want["gpa"] += 4096
        got = (self.rmp.find_eq if equal else self.rmp.find_ne)(pfn, n, **want)
        assert got == self.ref.find(pfn, n, equal, **want), (pfn, n, equal, want)

    @rule(pfn=st.integers(LO, HI - 1))
    def lookup(self, pfn):
        self._both("lookup", pfn)
        self._both("in_use", pfn)

    @rule(s4k=spans_4k)
    def directmap_adjust(self, s4k):
        pfn, n = span(PG_LEVEL_4K, s4k, None)
        self._both_dm("adjust", pfn, n)

    @invariant()
    def agree(self):
        if not hasattr(self, "rmp"):
            return
        self.rmp._check()
        self.dm._check()
        assert self.rmp.counters == self.ref.counters
        assert self.rmp.ranges(LO, HI - LO) == self._ref_runs()
        assert self.rmp.find_ne(0, LO, assigned=False, level=PG_LEVEL_4K) == -1
        assert self.rmp.find_ne(HI, MAX_PFN - HI, assigned=False, level=PG_LEVEL_4K) == -1
        assert self.dm.ranges() == self.ref_dm.ranges()
        assert self.dm.counters == self.ref_dm.counters
        assert self.dm.fragmented_pages() == self.ref_dm.fragmented_pages()

    def _ref_runs(self):
        """The reference's entries over the domain as maximal runs, in ``RmpTable.ranges`` form."""
        runs = []
        for p in range(LO, HI):
            e = self.ref.lookup(p)
            if runs:
                s, _, first = runs[-1]
                expect = first._replace(gpa=first.gpa + (p - s) * 4096) if first.assigned else first
                if e == expect:
                    runs[-1] = (s, p + 1, first)
                    continue
            runs.append((p, p + 1, e))
        return runs


TestRmpStateMachine = RmpMachine.TestCase
# Every step compares all 1,792 entries of the domain pfn by pfn, so a step costs far more than
# in the other machines; cap the example count to keep the "ci" profile near a minute.
TestRmpStateMachine.settings = settings(
    TestRmpStateMachine.settings, max_examples=min(settings.default.max_examples, 150)
)
