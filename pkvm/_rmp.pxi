# ---------------------------------------------------------------------------------------------
# RmpTable: the SEV-SNP Reverse Map Table (included at the end of _core.pyx)
# ---------------------------------------------------------------------------------------------
#
# One logical RMP entry per 4K host page (docs/kernel-semantics.md §5.1): assigned, page size
# (4K/2M), ASID, GPA, immutable, validated, VMSA. Nothing is stored per page. The whole entry is
# packed into one 64-bit word on one RangeMap keyed by pfn (``ent``), so a run of pages whose
# entries are equal is one run, and an instruction that changes entries writes one map:
#
#   ent    entry word, default 0 = hypervisor-owned 4K entry:
#            bit  0      assigned
#            bits 1..16  ASID (< 2**16)
#            bit  17     page size 2M (the pagesize bit)
#            bit  18     immutable
#            bit  19     validated
#            bit  20     VMSA
#            bits 21..63 gfn - pfn as a 43-bit two's-complement delta
#          Bits 0..16 and 21..63 are the ownership word (``own``: what ``_own_word`` builds).
#          Storing the delta instead of the GPA makes linearly mapped pages (gfn = pfn + c)
#          share one word, so a guest whose memory is physically contiguous is one run however
#          large it is. Unassigned entries have GPA 0, ASID 0 (RMPUPDATE rejects anything
#          else, see docs/snp-rmp.md) and no immutable / validated / VMSA bit, so their word is
#          0, or just the pagesize bit for an unassigned 2M entry.
#   lock   1 while the entry is "in use" by another CPU: not RMP state, the hook that makes
#          FAIL_INUSE reachable (the later timeline mode sets it between interleaved steps);
#          a map of its own so that the entry words stay one run where nothing is locked,
#          and an empty lock map is skipped with one test.
#
# A 2M RMP entry is 512 consecutive 4K entries with the pagesize bit starting at a 2M-aligned
# pfn, equal in every field (their GPAs advance page by page, which the delta encoding stores as
# one word). The authoritative page size of a pfn is that of the 2M-aligned entry (§5.1,
# __snp_lookup_rmpentry); the invariant below makes it equal to the pfn's own.
#
# Every instruction checks the unchanged table first, then writes ``ent``: once over one
# half-open range for RMPUPDATE (twice where a 4K update cuts an unassigned 2M entry: the rest
# of that entry is demoted to 4K), once per stored run it changes for PSMASH, PVALIDATE and the
# firmware updates (they change some bits of each run and keep the others). The pools are
# reserved for all of an instruction's writes before the first (``RangeMap._reserve_n``), so a
# MemoryError can only happen before anything changed. An update of more than _RMW_UNITS runs
# is written _RMW_UNITS runs at a time, each group reserved before it is written (a reservation
# keeps spare nodes for the worst case of every write, and the pool keeps them afterwards): a
# MemoryError there leaves the groups before it written, which are whole instructions (runs of
# whole 2M entries for PSMASH, of whole pages for the others), the table consistent and the
# counters not yet updated.
#
# Invariants (RmpTable._check):
# - both maps are valid RangeMaps and cover only pfns below max_pfn;
# - ent: every stored word either has the assigned bit, with a gfn below 2**40 at both ends of
#   its run, or is exactly the pagesize bit (an unassigned 2M entry);
# - a run with the pagesize bit starts and ends on 2M boundaries (so a 2M entry is uniform
#   except for its per-page GPA, and 2M entries are whole aligned 512-page groups);
# - no run has both the pagesize and the VMSA bit (VMSA pages are 4K);
# - lock stores only the value 1.

from collections import namedtuple

from libc.stdint cimport int64_t

cdef enum:
    _OWN_ASID_SHIFT = 1
    _OWN_DELTA_SHIFT = 21
    _MASK_2M = 511
    _RMW_UNITS = 2               # runs an RMW writes per pool reservation (see the header)

# The flag bits of an entry word (the header above); _E_FLAGS covers them all.
cdef enum:
    _E_SIZE = 0x20000            # 1 << 17
    _E_IMM = 0x40000             # 1 << 18
    _E_VALID = 0x80000           # 1 << 19
    _E_VMSA = 0x100000           # 1 << 20
    _E_FLAGS = 0x1E0000          # bits 17..20

# Hardware return codes (AMD APM vol. 3 / kernel-semantics.md §5.3, §5.4, §5.6) and pkvm's fault outcomes;
# pkvm/platforms/snp_constants.py exports the same numbers to Python.
cdef enum:
    _RMP_FAIL_INPUT = 1
    _RMP_FAIL_PERMISSION = 2
    _RMP_FAIL_INUSE = 3
    _RMP_FAIL_OVERLAP = 4
    _PVAL_FAIL_INPUT = 1
    _PVAL_FAIL_SIZEMISMATCH = 6
    _PVAL_FAIL_NOUPDATE = 255
    _PVAL_NPF_RMP = 0x100
    _PVAL_NPF_SIZEM = 0x101

# Indices into RmpTable.cnt; _RMP_COUNTER_NAMES lists them in this order.
cdef enum:
    _C_RMPUPDATE = 0
    _C_RMPUPDATE_2M = 1
    _C_RMPUPDATE_FAIL = 2        # + code - 1, for codes 1..4
    _C_PSMASH = 6
    _C_PSMASH_FAIL = 7           # + code - 1, for codes 1..3
    _C_PVALIDATE = 10
    _C_PVALIDATE_2M = 11
    _C_PVALIDATE_FAIL_INPUT = 12
    _C_PVALIDATE_FAIL_SIZEMISMATCH = 13
    _C_PVALIDATE_FAIL_NOUPDATE = 14
    _C_PVALIDATE_NPF_RMP = 15
    _C_PVALIDATE_NPF_SIZEM = 16

_RMP_COUNTER_NAMES = (
    "rmpupdate", "rmpupdate_2m",
    "rmpupdate_fail_input", "rmpupdate_fail_permission", "rmpupdate_fail_inuse",
    "rmpupdate_fail_overlap",
    "psmash", "psmash_fail_input", "psmash_fail_permission", "psmash_fail_inuse",
    "pvalidate", "pvalidate_2m",
    "pvalidate_fail_input", "pvalidate_fail_sizemismatch", "pvalidate_fail_noupdate",
    "pvalidate_npf_rmp", "pvalidate_npf_sizem",
)

# RmpTable._scan kinds (what makes an entry word "bad")
cdef enum:
    _K_UPD4K = 0
    _K_UPD2M = 1
    _K_SMASH = 2
    _K_IMM = 3
    _K_NE = 4

# RmpMatch.fields bits
cdef enum:
    RMP_F_ASSIGNED = 1
    RMP_F_BIG = 2
    RMP_F_ASID = 4
    RMP_F_GPA = 8
    RMP_F_IMM = 16
    RMP_F_VALID = 32
    RMP_F_VMSA = 64

#: Largest pfn + 1 (and gfn + 1) an RMP entry can describe: 52-bit physical addresses.
RMP_MAX_PFN = 1 << 40
cdef uint64_t _RMP_MAX_PFN = 1ULL << 40

RmpEntry = namedtuple("RmpEntry",
                      ["assigned", "level", "asid", "gpa", "immutable", "validated", "vmsa"],
                      module="pkvm._core")
RmpEntry.__doc__ = """One RMP entry as ``RmpTable.lookup`` reports it (an immutable snapshot).

``level`` is ``PG_LEVEL_4K`` (1) or ``PG_LEVEL_2M`` (2), taken from the 2M-aligned entry as
``snp_lookup_rmpentry`` does (kernel-semantics.md §5.1); ``gpa`` is in bytes and 0 when not assigned.
"""


cdef inline uint64_t _own_word(uint64_t pfn, uint64_t asid, uint64_t gfn) noexcept nogil:
    """The ownership word of ``pfn`` owned by ``asid`` at ``gfn`` (wrapping: two's complement)."""
    return 1 | (asid << _OWN_ASID_SHIFT) | ((gfn - pfn) << _OWN_DELTA_SHIFT)


cdef inline uint64_t _own_gfn(uint64_t own, uint64_t pfn) noexcept nogil:
    return pfn + <uint64_t>((<int64_t>own) >> _OWN_DELTA_SHIFT)


cdef inline uint64_t _own_asid(uint64_t own) noexcept nogil:
    return (own >> _OWN_ASID_SHIFT) & 0xFFFF


cdef inline uint64_t _umin(uint64_t a, uint64_t b) noexcept nogil:
    return a if a < b else b


cdef inline uint64_t _umax(uint64_t a, uint64_t b) noexcept nogil:
    return a if a > b else b


cdef inline bint _bad_4k(uint64_t w) noexcept nogil:
    """A 4K RMPUPDATE fails on this entry word: immutable, or an assigned 2M entry."""
    return (w & _E_IMM) != 0 or (w & (1 | _E_SIZE)) == (1 | _E_SIZE)


# -- argument validation (Python boundary) --------------------------------------------------------

cdef object _rmp_int(object o, str name, object lo, object hi):
    """``o`` as a Python int in ``[lo, hi)``: TypeError / ValueError naming ``name``."""
    if type(o) is not int:
        if isinstance(o, (float, complex, str, bytes)) or not hasattr(type(o), "__index__"):
            raise TypeError(f"{name} must be an integer, not {type(o).__name__}")
        o = operator.index(o)
    if o < lo or o >= hi:
        raise ValueError(f"{name} {o:#x} out of range [{lo:#x}, {hi:#x})")
    return o


cdef int _rmp_flag(object o, str name) except -1:
    """A 0/1 flag: ``bool`` or the ints 0 and 1."""
    if o is True:
        return 1
    if o is False:
        return 0
    if type(o) is not int and (isinstance(o, (float, complex, str, bytes))
                               or not hasattr(type(o), "__index__")):
        raise TypeError(f"{name} must be a bool, not {type(o).__name__}")
    o = operator.index(o)
    if o != 0 and o != 1:
        raise ValueError(f"{name} must be a bool (or 0/1), not {o}")
    return o


cdef int _rmp_level(object o) except -1:
    """1 for PG_LEVEL_4K, 2 for PG_LEVEL_2M; anything else is rejected naming ``level``."""
    if type(o) is not int and (isinstance(o, (float, complex, str, bytes, bool))
                               or not hasattr(type(o), "__index__")):
        raise TypeError(f"level must be an integer, not {type(o).__name__}")
    o = operator.index(o)
    if o != 1 and o != 2:
        raise ValueError(f"level must be PG_LEVEL_4K (1) or PG_LEVEL_2M (2), not {o}")
    return o


cdef object _rmp_gfn(object gpa, object npages):
    """The gfn of a 4K-aligned ``gpa`` whose ``npages`` pages stay below 2**52."""
    g = _rmp_int(gpa, "gpa", 0, 1 << 52)
    if g & 0xFFF:
        raise ValueError(f"gpa {g:#x} is not 4K-aligned")
    if (g >> 12) + npages > RMP_MAX_PFN:
        raise ValueError(f"gpa range [{g:#x}, {g + (npages << 12):#x}) passes 2**52")
    return g >> 12


cdef class RmpTable:
    """The SEV-SNP Reverse Map Table: one entry per host pfn, range-compressed.

    Models the host instructions RMPUPDATE and PSMASH and the guest instruction PVALIDATE with
    their return codes (docs/kernel-semantics.md §5.3, §5.4, §5.6; the rules it leaves
    open are documented in ``docs/snp-rmp.md``). Every instruction has a range form that runs
    ``npages`` (4K) or ``npages // 512`` (2M) instructions back to back, stopping at the first
    that does not succeed, and reports how many succeeded: N instructions, one call.

    All ranges are half-open: ``[pfn, pfn + npages)``. A fresh table is all hypervisor-owned
    4K entries. Instruction counters are in :attr:`counters`.

    Runtime complexity: every operation is O((k + 1) log n) for k field runs inside its range
    and n stored runs (so O(log n) on uniform memory, whatever ``npages``); memory O(n).
    The Python methods keep the GIL (each call is short), so threads see whole instructions.

    >>> rmp = RmpTable()
    >>> rmp.rmpupdate_range(0x200, 1024, 2, assigned=True, asid=1, gpa=0x4000_0000)
    (2, -1, 0)
    >>> e = rmp.lookup(0x201)
    >>> e.assigned, e.level, e.asid, hex(e.gpa), e.validated
    (True, 2, 1, '0x40001000', False)
    >>> rmp.pvalidate(0x201, 1, asid=1, gpa=0x4000_1000, validate=True)   # 4K on a 2M entry
    257
    >>> rmp.psmash(0x200), rmp.pvalidate(0x201, 1, asid=1, gpa=0x4000_1000, validate=True)
    (0, 0)
    """

    def _set_owner(self, vm):
        """Make this the RMP of ``vm`` (a weakref; None: of no VM): its public mutators then
        refuse from an event callback of ``vm``."""
        self._owner = None if vm is None else _weakref(vm)

    def __cinit__(self, max_pfn=RMP_MAX_PFN, *, _fanout=None):
        m = _rmp_int(max_pfn, "max_pfn", 1, RMP_MAX_PFN + 1)
        if m & _MASK_2M:
            raise ValueError(f"max_pfn {m:#x} is not a multiple of 512 (whole 2M entries)")
        self.max_pfn_ = m
        # The finger: an instruction reads and writes the entry map at the same pfn a few
        # times (the checks, the demotion test, the write); only the first read descends.
        self.ent = RangeMap(0, _fanout=_fanout, _finger=True)
        self.lock = RangeMap(0, _fanout=_fanout)
        memset(self.cnt, 0, sizeof(self.cnt))
        self.look_pos.leaf = NULL

    # -- helpers ---------------------------------------------------------------------------------

    cdef bint _is_2m_c(self, uint64_t pfn) noexcept nogil:
        """The authoritative page size of ``pfn``: that of its 2M-aligned entry (§5.1)."""
        return self.ent._get_c(pfn & ~(<uint64_t>_MASK_2M)) & _E_SIZE != 0

    cdef uint64_t _word_c(self, uint64_t pfn) noexcept nogil:
        """The entry word of ``pfn``; its run and position are kept for an RMPUPDATE of
        ``pfn`` that follows while the table is unchanged (``look_*``)."""
        self.look_run = self.ent._run_pos_c(pfn, &self.look_pos)
        self.look_pfn = pfn
        return self.look_run.value

    cdef RmpSeg _seg_c(self, uint64_t pfn, uint64_t limit) noexcept nogil:
        """The fields at ``pfn`` and how far (up to ``limit``) they all stay the same."""
        cdef RmpSeg s
        cdef Run r = self.ent._run_at_c(pfn)
        cdef uint64_t w = r.value
        s.own = w & ~(<uint64_t>_E_FLAGS)
        s.size = (w >> 17) & 1
        s.imm = (w >> 18) & 1
        s.valid = (w >> 19) & 1
        s.vmsa = (w >> 20) & 1
        s.start = pfn
        s.end = _umin(limit, r.end)
        return s

    cdef bint _locked(self, uint64_t s, uint64_t e, uint64_t *found) noexcept nogil:
        """First locked pfn of ``[s, e)``; 1 if any (one test while nothing is locked)."""
        return self.lock.count != 0 and self.lock._find_ne_c(s, e, 0, found)

    cdef int _scan(self, uint64_t s, uint64_t e, int kind, uint64_t want,
                   uint64_t *found) noexcept nogil:
        """First pfn of ``[s, e)`` whose entry word ``w`` is "bad" for ``kind``; 1 if any.

        ``_K_UPD4K``: immutable, or assigned 2M (a 4K RMPUPDATE fails there);
        ``_K_UPD2M``: immutable, or assigned 4K (a 2M RMPUPDATE fails there);
        ``_K_SMASH``: not 2M, or immutable (PSMASH fails there);
        ``_K_IMM``: immutable; ``_K_NE``: ``w & ~VMSA != want``.
        One run descent per stored run (and gap) crossed: O((k + 1) log n).
        """
        cdef Run r
        cdef uint64_t cur = s, w
        cdef bint bad
        while cur < e:
            r = self.ent._run_at_c(cur)
            w = r.value
            if kind == _K_UPD4K:
                bad = _bad_4k(w)
            elif kind == _K_UPD2M:
                bad = (w & _E_IMM) != 0 or (w & (1 | _E_SIZE)) == 1
            elif kind == _K_SMASH:
                bad = (w & _E_IMM) != 0 or (w & _E_SIZE) == 0
            elif kind == _K_IMM:
                bad = (w & _E_IMM) != 0
            else:
                bad = (w & ~(<uint64_t>_E_VMSA)) != want
            if bad:
                found[0] = cur
                return 1
            cur = r.end
        return 0

    cdef int _rmw(self, uint64_t s, uint64_t e, uint64_t clear, uint64_t set_) except -1 nogil:
        """``w := (w & ~clear) | set_`` on every stored run of ``[s, e)`` (gaps, words 0,
        are left alone: callers only set bits on assigned entries or clear them).

        The pools are reserved for the writes before the first (``_RMW_UNITS`` at a time)."""
        cdef Run r
        cdef uint64_t cur = s, nw, a, b
        cdef int k = 0, j
        # How many runs change: that many assigns to reserve for.
        while cur < e:
            r = self.ent._next_run_c(cur)
            if r.start >= e:
                break
            if (r.value & ~clear) | set_ != r.value:
                k += 1
            cur = r.end
        cur = s
        while k > 0 and cur < e:
            self.ent._reserve_n(_RMW_UNITS if k > _RMW_UNITS else k)
            k -= _RMW_UNITS
            for j in range(_RMW_UNITS):
                r = self.ent._next_run_c(cur)
                while r.start < e and (r.value & ~clear) | set_ == r.value:
                    r = self.ent._next_run_c(r.end)
                if r.start >= e:
                    cur = e
                    break
                a = _umax(r.start, cur)
                b = _umin(r.end, e)
                nw = (r.value & ~clear) | set_
                self.ent._assign_c(a, b, nw)
                cur = b
        return 0

    # -- instructions (C level) ------------------------------------------------------------------

    cdef int _rmpupdate_c(self, uint64_t pfn, uint64_t npages, bint big, bint assigned,
                          uint64_t asid, uint64_t gfn, bint immutable,
                          RmpResult *res) except -1 nogil:
        """RMPUPDATE each 4K page (or 2M region) of ``[pfn, pfn + npages)`` in order.

        The new entries are ``assigned`` to ``asid`` with GPAs ``gfn, gfn + 1, ...`` (ignored
        when not assigned, where ``asid``, ``gfn`` and ``immutable`` must be 0), page size 2M iff
        ``big``, ``immutable`` as given, validated and VMSA clear (§5.3). Stops at the first
        failing instruction. Checks, in priority order, per instruction:

        - FAIL_INPUT: unassigned with a nonzero field; 2M with an unaligned pfn or gfn;
        - FAIL_INUSE: a locked pfn among the pages written;
        - FAIL_PERMISSION: an immutable entry among them;
        - FAIL_OVERLAP: 4K inside an assigned 2M entry; 2M over a region holding an assigned
          4K entry.

        A 4K update inside an unassigned 2M entry succeeds and demotes the rest of that entry to
        unassigned 4K entries. Every instruction writes only its own page(s), so the first
        failure is found on the unchanged table and the successful prefix is written with one
        assign of the entry map (two when it demotes an unassigned 2M entry).
        """
        cdef uint64_t e = pfn + npages, m = e, f, x, lo, hi, r, word
        cdef Run r0
        cdef RunPos pos             # where r0's lookup landed (4K updates), for the write
        cdef int code = 0
        pos.leaf = NULL
        res.done = 0
        res.fail_pfn = 0
        res.code = 0
        if npages == 0:
            return 0
        if ((not assigned and (asid != 0 or gfn != 0 or immutable))
                or (big and ((pfn & _MASK_2M) or (assigned and (gfn & _MASK_2M))))):
            res.fail_pfn = pfn
            res.code = _RMP_FAIL_INPUT
            self.cnt[_C_RMPUPDATE_FAIL + _RMP_FAIL_INPUT - 1] += 1
            return 0
        if not big:
            # Instructions run in pfn order and only the demotion of an unassigned 2M entry
            # touches other pfns (and cannot create a failure), so the first failing pfn is
            # the first pfn that fails on the current table. Shrinking the search keeps the
            # priority order for a pfn that fails several checks (the lock first, then an
            # immutable entry, then an assigned 2M one).
            if self._locked(pfn, m, &x):
                m = x
                code = _RMP_FAIL_INUSE
            # The run at pfn is read once: the first check, below the demotion test, and its
            # position for the write (read already if _word_c read pfn last and the table is
            # unchanged since: the same run at the same position).
            if (pfn == self.look_pfn and self.look_pos.leaf != NULL
                    and self.look_pos.version == self.ent.version):
                r0 = self.look_run
                pos = self.look_pos
            else:
                r0 = self.ent._run_pos_c(pfn, &pos)
            x = pfn
            if _bad_4k(r0.value) or (r0.end < m and self._scan(r0.end, m, _K_UPD4K, 0, &x)):
                if x < m:
                    m = x
                    code = (_RMP_FAIL_PERMISSION if self.ent._get_c(x) & _E_IMM
                            else _RMP_FAIL_OVERLAP)
            f = m
        else:
            # A 2M instruction fails if any pfn of its region does; the first region holding
            # a failing pfn is the first failing instruction; its code is the highest-priority
            # check that fails anywhere in it.
            if self._locked(pfn, m, &x):
                m = x
            if self._scan(pfn, m, _K_UPD2M, 0, &x):
                m = x
            f = e
            if m < e:
                f = r = m & ~(<uint64_t>_MASK_2M)
                if self._locked(r, r + RMP_PAGES_2M, &x):
                    code = _RMP_FAIL_INUSE
                elif self._scan(r, r + RMP_PAGES_2M, _K_IMM, 0, &x):
                    code = _RMP_FAIL_PERMISSION
                else:
                    code = _RMP_FAIL_OVERLAP
        if f > pfn:
            word = _own_word(pfn, asid, gfn) if assigned else 0
            if big:
                word |= _E_SIZE
            if immutable:
                word |= _E_IMM
            lo = pfn
            hi = f
            if not big:
                # Unassigned 2M entries cut by the written pages become 4K entries (§5.3 is
                # silent; see docs/snp-rmp.md). Assigned ones failed with FAIL_OVERLAP above,
                # so the cut entries' words are exactly the pagesize bit.
                if r0.value & _E_SIZE:
                    lo = pfn & ~(<uint64_t>_MASK_2M)
                if (r0.value if f <= r0.end else self.ent._get_c(f - 1)) & _E_SIZE:
                    hi = ((f - 1) | _MASK_2M) + 1
            if word == 0 or (lo == pfn and hi == f):
                self.ent._put_c(&pos, lo, hi, word)
            else:
                self.ent._reserve_n(2)
                self.ent._assign_c(lo, hi, 0)
                self.ent._assign_c(pfn, f, word)
            res.done = (f - pfn) >> 9 if big else f - pfn
            self.cnt[_C_RMPUPDATE] += res.done
            if big:
                self.cnt[_C_RMPUPDATE_2M] += res.done
        if code:
            res.fail_pfn = f
            res.code = code
            self.cnt[_C_RMPUPDATE_FAIL + code - 1] += 1
        return 0

    cdef int _psmash_c(self, uint64_t pfn, uint64_t npages, RmpResult *res) except -1 nogil:
        """PSMASH each 2M region of ``[pfn, pfn + npages)`` in order (``npages % 512 == 0``).

        Splits a 2M entry into 512 4K entries keeping every field (the GPAs already advance
        per page), §5.4. Checks, in priority order: FAIL_INPUT (unaligned pfn, or the entry is
        4K), FAIL_INUSE (a locked pfn in the region), FAIL_PERMISSION (immutable).
        """
        cdef uint64_t e = pfn + npages, m = e, f = e, x, r
        cdef int code = 0
        res.done = 0
        res.fail_pfn = 0
        res.code = 0
        if npages == 0:
            return 0
        if pfn & _MASK_2M:
            res.fail_pfn = pfn
            res.code = _RMP_FAIL_INPUT
            self.cnt[_C_PSMASH_FAIL + _RMP_FAIL_INPUT - 1] += 1
            return 0
        if self._scan(pfn, m, _K_SMASH, 0, &x):
            m = x
        if self._locked(pfn, m, &x):
            m = x
        if m < e:
            f = r = m & ~(<uint64_t>_MASK_2M)
            if not self.ent._get_c(r) & _E_SIZE:
                code = _RMP_FAIL_INPUT
            elif self._locked(r, r + RMP_PAGES_2M, &x):
                code = _RMP_FAIL_INUSE
            else:
                code = _RMP_FAIL_PERMISSION
        if f > pfn:
            self._rmw(pfn, f, _E_SIZE, 0)
            res.done = (f - pfn) >> 9
            self.cnt[_C_PSMASH] += res.done
        if code:
            res.fail_pfn = f
            res.code = code
            self.cnt[_C_PSMASH_FAIL + code - 1] += 1
        return 0

    cdef int _pvalidate_c(self, uint64_t pfn, uint64_t npages, bint big, uint64_t asid,
                          uint64_t gfn, bint validate, RmpResult *res) except -1 nogil:
        """PVALIDATE each 4K page (or 2M region) of ``[pfn, pfn + npages)`` for guest ``asid``.

        ``pfn + i`` is the host page the guest's NPT maps ``gfn + i`` to. Outcomes, in priority
        order, per instruction (§5.6; choices in docs/snp-rmp.md):

        - FAIL_INPUT: 2M with an unaligned pfn or gfn;
        - NPF_RMP (an #NPF with the RMP bit, not a return code): the entry is not assigned to
          ``asid`` at this GPA, or is immutable;
        - FAIL_SIZEMISMATCH: 2M on a 4K entry; NPF_SIZEM (#NPF, RMP + SIZEM): 4K on a 2M entry;
        - FAIL_NOUPDATE: the validated bit already equals ``validate`` (rFLAGS.CF = 1);
        - success: validated := ``validate`` on the page (all 512 for 2M).

        For 2M the hardware checks the 2M-aligned entry; a 2M entry is uniform, so the region
        of the first pfn failing any check is the first failing instruction.
        """
        cdef uint64_t e = pfn + npages, m = e, f = e, x, r, w
        cdef uint64_t word = _own_word(pfn, asid, gfn)
        cdef int code = 0
        res.done = 0
        res.fail_pfn = 0
        res.code = 0
        if npages == 0:
            return 0
        if big and ((pfn & _MASK_2M) or (gfn & _MASK_2M)):
            res.fail_pfn = pfn
            res.code = _PVAL_FAIL_INPUT
            self.cnt[_C_PVALIDATE_FAIL_INPUT] += 1
            return 0
        # Linear pages of one guest share one ownership word, so "owned by asid at the right
        # GPA, not immutable, of the right size and not yet in the requested state" is one
        # word (the VMSA bit aside) for every pfn of the range.
        if self._scan(pfn, m, _K_NE, word | (_E_SIZE if big else 0) | (0 if validate else _E_VALID),
                      &x):
            m = x
        if m < e:
            f = r = m & ~(<uint64_t>_MASK_2M) if big else m
            w = self.ent._get_c(r)
            if w & ~(<uint64_t>_E_FLAGS) != word or w & _E_IMM:
                code = _PVAL_NPF_RMP
            elif big and not w & _E_SIZE:
                code = _PVAL_FAIL_SIZEMISMATCH
            elif not big and w & _E_SIZE:
                code = _PVAL_NPF_SIZEM
            else:
                code = _PVAL_FAIL_NOUPDATE
        if f > pfn:
            if validate:
                self._rmw(pfn, f, 0, _E_VALID)
            else:
                self._rmw(pfn, f, _E_VALID, 0)
            res.done = (f - pfn) >> 9 if big else f - pfn
            self.cnt[_C_PVALIDATE] += res.done
            if big:
                self.cnt[_C_PVALIDATE_2M] += res.done
        if code:
            res.fail_pfn = f
            res.code = code
            if code == _PVAL_NPF_RMP:
                self.cnt[_C_PVALIDATE_NPF_RMP] += 1
            elif code == _PVAL_NPF_SIZEM:
                self.cnt[_C_PVALIDATE_NPF_SIZEM] += 1
            elif code == _PVAL_FAIL_SIZEMISMATCH:
                self.cnt[_C_PVALIDATE_FAIL_SIZEMISMATCH] += 1
            else:
                self.cnt[_C_PVALIDATE_FAIL_NOUPDATE] += 1
        return 0

    cdef int _find_c(self, uint64_t s, uint64_t e, const RmpMatch *want, bint equal,
                     uint64_t *found) noexcept nogil:
        """First pfn of ``[s, e)`` whose entry matches ``want`` (``equal``) or does not; 1 if any.

        The GPA wanted at pfn ``p`` is ``want.gfn + (p - s)``; an unassigned entry reports GPA
        0, which can only be wanted at ``p == s`` with ``want.gfn == 0``.
        """
        cdef RmpSeg g
        cdef uint64_t cur = s
        cdef int fl = want.fields
        cdef bint ok, gpa_once
        while cur < e:
            g = self._seg_c(cur, e)
            ok = True
            if fl & RMP_F_ASSIGNED and (g.own != 0) != (want.assigned != 0):
                ok = False
            if fl & RMP_F_BIG and g.size != want.big:
                ok = False
            if fl & RMP_F_IMM and g.imm != want.imm:
                ok = False
            if fl & RMP_F_VALID and g.valid != want.valid:
                ok = False
            if fl & RMP_F_VMSA and g.vmsa != want.vmsa:
                ok = False
            if fl & RMP_F_ASID and (_own_asid(g.own) if g.own else 0) != want.asid:
                ok = False
            gpa_once = False
            if ok and fl & RMP_F_GPA:
                if g.own:
                    ok = _own_gfn(g.own, cur) == want.gfn + (cur - s)
                else:
                    # GPA 0 is wanted only at s itself, and only if want.gfn == 0.
                    ok = False
                    gpa_once = cur == s and want.gfn == 0
            if equal:
                if ok or gpa_once:
                    found[0] = cur
                    return 1
            elif not ok:
                if not gpa_once:
                    found[0] = cur
                    return 1
                if cur + 1 < e:
                    found[0] = cur + 1
                    return 1
                return 0
            cur = g.end
        return 0

    # -- Python API: instructions --------------------------------------------------------------

    def rmpupdate(self, pfn, level, *, assigned, asid=0, gpa=0, immutable=False):
        """Execute one RMPUPDATE on host page ``pfn`` and return its return code.

        The new entry: ``assigned`` to guest ``asid`` at ``gpa`` (bytes), page size ``level``
        (``PG_LEVEL_4K`` or ``PG_LEVEL_2M``), ``immutable``; validated and VMSA cleared.
        ``rmp_make_shared`` is ``assigned=False`` with every other field 0 (kernel-semantics.md §5.3).

        Returns ``RMPUPDATE_SUCCESS`` (0), ``RMPUPDATE_FAIL_INPUT`` (1),
        ``RMPUPDATE_FAIL_PERMISSION`` (2), ``RMPUPDATE_FAIL_INUSE`` (3) or
        ``RMPUPDATE_FAIL_OVERLAP`` (4) by the rules of :meth:`rmpupdate_range`.
        Runtime complexity: O(log n).

        Raises:
            TypeError, ValueError: an argument of the wrong type or out of range (named).
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p = _rmp_int(pfn, "pfn", 0, self.max_pfn_)
        cdef int lvl = _rmp_level(level)
        # An unaligned 2M operand is the instruction's FAIL_INPUT, even at the table's end.
        return _rmp_update(self, p, RMP_PAGES_2M if lvl == 2 else 1, lvl, assigned, asid, gpa,
                           immutable)[2]

    def rmpupdate_range(self, pfn, npages, level, *, assigned, asid=0, gpa=0, immutable=False):
        """RMPUPDATE every 4K page (or 2M region) of ``[pfn, pfn + npages)`` in order.

        Page ``pfn + i`` gets GPA ``gpa + i * 4096``. Stops at the first instruction that does
        not return 0 and returns ``(done, fail_pfn, code)``: instructions that succeeded,
        the pfn operand of the failing one (-1 if none) and its return code (0 if none).
        Checks per instruction, in order (docs/kernel-semantics.md §5.3; choices in docs/snp-rmp.md):

        - ``FAIL_INPUT``: not assigned but ``asid``, ``gpa`` or ``immutable`` nonzero; 2M with
          ``pfn`` or ``gpa`` not 2M-aligned;
        - ``FAIL_INUSE``: a page it writes is locked (:meth:`set_in_use`);
        - ``FAIL_PERMISSION``: a page it writes is immutable;
        - ``FAIL_OVERLAP``: 4K inside an assigned 2M entry; 2M over a region that holds an
          assigned 4K entry.

        A 4K update inside an unassigned 2M entry demotes that entry to 4K entries.

        Runtime complexity: O((k + 1) log n) for k field runs in the range.

        Raises:
            TypeError, ValueError: an argument of the wrong type or out of range (named), or
            ``npages`` not a multiple of 512 at 2M. Nothing changes.
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p, n
        cdef int lvl = _rmp_level(level)
        _rmp_range(self.max_pfn_, pfn, npages, &p, &n)
        if lvl == 2 and n & _MASK_2M:
            raise ValueError(f"npages {n:#x} is not a multiple of 512 for a 2M RMPUPDATE")
        return _rmp_update(self, p, n, lvl, assigned, asid, gpa, immutable)

    def psmash(self, pfn):
        """Execute one PSMASH on the 2M entry at ``pfn``; return its return code.

        0 on success, ``PSMASH_FAIL_INPUT`` (1) if ``pfn`` is not 2M-aligned or its entry is
        4K, ``PSMASH_FAIL_INUSE`` (3), ``PSMASH_FAIL_PERMISSION`` (2) for an immutable entry.
        Runtime complexity: O(log n).

        Raises:
            TypeError, ValueError: ``pfn`` of the wrong type or out of range.
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p = _rmp_int(pfn, "pfn", 0, self.max_pfn_)
        cdef RmpResult res
        self._psmash_c(p, RMP_PAGES_2M, &res)
        return res.code

    def psmash_range(self, pfn, npages):
        """PSMASH every 2M region of ``[pfn, pfn + npages)`` in order (``npages % 512 == 0``).

        Splits each 2M entry into 512 4K entries that keep all fields, including validated and
        the per-page GPA (docs/kernel-semantics.md §5.4). Returns ``(done, fail_pfn, code)`` as
        :meth:`rmpupdate_range`; the checks are those of :meth:`psmash`.

        Runtime complexity: O((k + 1) log n) for k field runs in the range.

        Raises:
            TypeError, ValueError: as :meth:`rmpupdate_range`. Nothing changes.
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p, n
        cdef RmpResult res
        _rmp_range(self.max_pfn_, pfn, npages, &p, &n)
        if n & _MASK_2M:
            raise ValueError(f"npages {n:#x} is not a multiple of 512 for PSMASH")
        self._psmash_c(p, n, &res)
        return (res.done, res.fail_pfn if res.code else -1, res.code)

    def pvalidate(self, pfn, level, *, asid, gpa, validate):
        """Execute one guest PVALIDATE of ``gpa`` (mapped to host page ``pfn``) for ``asid``.

        Returns ``PVALIDATE_SUCCESS`` (0), ``PVALIDATE_FAIL_INPUT`` (1),
        ``PVALIDATE_FAIL_SIZEMISMATCH`` (6) or ``PVALIDATE_FAIL_NOUPDATE`` (255, the CF=1
        "nothing changed" result), or one of pkvm's fault outcomes ``PVALIDATE_NPF_RMP``
        (0x100) / ``PVALIDATE_NPF_SIZEM`` (0x101): the instruction did not complete and raised
        a nested page fault with the RMP (and SIZEM) error-code bit. Rules as
        :meth:`pvalidate_range`. Runtime complexity: O(log n).

        Raises:
            TypeError, ValueError: an argument of the wrong type or out of range (named).
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p = _rmp_int(pfn, "pfn", 0, self.max_pfn_)
        cdef int lvl = _rmp_level(level)
        return _rmp_pvalidate(self, p, RMP_PAGES_2M if lvl == 2 else 1, lvl, asid, gpa,
                              validate)[2]

    def pvalidate_range(self, pfn, npages, level, *, asid, gpa, validate):
        """PVALIDATE every 4K page (or 2M region) of ``[pfn, pfn + npages)`` in order.

        Page ``pfn + i`` is the host page of guest address ``gpa + i * 4096``. Per
        instruction, in order (kernel-semantics.md §5.6; choices in docs/snp-rmp.md): ``FAIL_INPUT`` (2M with
        ``pfn`` or ``gpa`` unaligned); ``NPF_RMP`` (not assigned to ``asid`` at that GPA, or
        immutable); ``FAIL_SIZEMISMATCH`` (2M on a 4K entry) / ``NPF_SIZEM`` (4K on a 2M
        entry); ``FAIL_NOUPDATE`` (already in the requested state); else success. Returns
        ``(done, fail_pfn, code)`` as :meth:`rmpupdate_range`.

        Runtime complexity: O(log n).

        Raises:
            TypeError, ValueError: as :meth:`rmpupdate_range`. Nothing changes.
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p, n
        cdef int lvl = _rmp_level(level)
        _rmp_range(self.max_pfn_, pfn, npages, &p, &n)
        if lvl == 2 and n & _MASK_2M:
            raise ValueError(f"npages {n:#x} is not a multiple of 512 for a 2M PVALIDATE")
        return _rmp_pvalidate(self, p, n, lvl, asid, gpa, validate)

    def firmware_update(self, pfn, npages, *, immutable=None, validated=None, vmsa=None):
        """Set fields of assigned entries the way SNP firmware commands do.

        The x86 instructions cannot set ``immutable`` after the fact, ``validated`` for the
        guest, or ``vmsa``; the PSP firmware can (SNP_LAUNCH_UPDATE, VMSA
        pages, page reclaim; kernel-semantics.md §5.2, §5.9). Each field given (not ``None``) is written on
        every entry of ``[pfn, pfn + npages)``.

        Runtime complexity: O((k + 1) log n) for k ownership runs in the range.

        Raises:
            TypeError, ValueError: bad arguments; a page in the range is not assigned; the range
            cuts a 2M entry; ``vmsa=True`` on a 2M entry. Nothing changes.
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p, n, e, cur, clear, set_
        cdef Run r
        cdef int im = -1, va = -1, vm = -1
        _rmp_range(self.max_pfn_, pfn, npages, &p, &n)
        if immutable is not None:
            im = _rmp_flag(immutable, "immutable")
        if validated is not None:
            va = _rmp_flag(validated, "validated")
        if vmsa is not None:
            vm = _rmp_flag(vmsa, "vmsa")
        if n == 0:
            return
        e = p + n
        cur = p
        while cur < e:
            r = self.ent._run_at_c(cur)
            if r.value & 1 == 0:
                raise ValueError(f"pfn {cur:#x} is not assigned: firmware only updates "
                                 f"guest-owned entries in [{p:#x}, {e:#x})")
            cur = r.end
        if ((self.ent._get_c(p) & _E_SIZE and p & _MASK_2M)
                or (self.ent._get_c(e - 1) & _E_SIZE and e & _MASK_2M)):
            raise ValueError(f"[{p:#x}, {e:#x}) cuts a 2M RMP entry; cover whole 2M entries "
                             "or PSMASH first")
        cur = p
        while vm == 1 and cur < e:
            r = self.ent._run_at_c(cur)
            if r.value & _E_SIZE:
                raise ValueError(f"pfn {cur:#x} is a 2M entry: VMSA pages are 4K")
            cur = r.end
        clear = set_ = 0
        if im >= 0:
            clear |= _E_IMM
            set_ |= _E_IMM if im else 0
        if va >= 0:
            clear |= _E_VALID
            set_ |= _E_VALID if va else 0
        if vm >= 0:
            clear |= _E_VMSA
            set_ |= _E_VMSA if vm else 0
        self._rmw(p, e, clear, set_)

    # -- Python API: the in-use lock (test hook for FAIL_INUSE) --------------------------------

    def set_in_use(self, pfn, npages=1, in_use=True):
        """Mark ``[pfn, pfn + npages)`` as in use by another CPU (or clear it).

        While set, RMPUPDATE and PSMASH touching those pages fail with ``FAIL_INUSE`` (§5.3,
        §5.4). A test hook: the timeline never has two CPUs update one entry at once.
        Runtime complexity: O(log n).
        """
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        cdef uint64_t p, n
        cdef bint v = _rmp_flag(in_use, "in_use")
        _rmp_range(self.max_pfn_, pfn, npages, &p, &n)
        self.lock._assign_c(p, p + n, 1 if v else 0)

    def in_use(self, pfn):
        """Whether ``pfn``'s entry is locked (:meth:`set_in_use`). Runtime complexity: O(log n)."""
        cdef uint64_t p = _rmp_int(pfn, "pfn", 0, self.max_pfn_)
        return self.lock._get_c(p) != 0

    # -- Python API: queries --------------------------------------------------------------------

    @property
    def max_pfn(self):
        """One past the last pfn the table covers."""
        return self.max_pfn_

    def lookup(self, pfn):
        """The entry of host page ``pfn`` as an :class:`RmpEntry` (``snp_lookup_rmpentry``).

        ``level`` comes from the 2M-aligned entry (kernel-semantics.md §5.1). Runtime complexity: O(log n).
        """
        cdef uint64_t p = _rmp_int(pfn, "pfn", 0, self.max_pfn_)
        cdef uint64_t w = self._word_c(p)
        cdef uint64_t own = w & ~(<uint64_t>_E_FLAGS)
        return RmpEntry(own != 0, 2 if self._is_2m_c(p) else 1,
                        _own_asid(own) if own else 0,
                        _own_gfn(own, p) << 12 if own else 0,
                        w & _E_IMM != 0, w & _E_VALID != 0, w & _E_VMSA != 0)

    def ranges(self, pfn=0, npages=None):
        """Maximal runs ``(start, end, entry)`` of ``[pfn, pfn + npages)`` (whole table default).

        Within a run every field equals ``entry``'s except the GPA, which is
        ``entry.gpa + (p - start) * 4096`` for assigned pages. Runtime complexity: O(k log n).
        """
        cdef uint64_t p, n, e, cur
        cdef RmpSeg g
        if npages is None:
            npages = self.max_pfn_ - _rmp_int(pfn, "pfn", 0, self.max_pfn_)
        _rmp_range(self.max_pfn_, pfn, npages, &p, &n)
        e = p + n
        out = []
        cur = p
        while cur < e:
            g = self._seg_c(cur, e)
            out.append((cur, g.end, RmpEntry(
                g.own != 0, 2 if g.size else 1, _own_asid(g.own) if g.own else 0,
                _own_gfn(g.own, cur) << 12 if g.own else 0,
                g.imm != 0, g.valid != 0, g.vmsa != 0)))
            cur = g.end
        return out

    def find_ne(self, pfn, npages, *, assigned=None, level=None, asid=None, gpa=None,
                immutable=None, validated=None, vmsa=None):
        """The first pfn of ``[pfn, pfn + npages)`` whose entry differs from the given fields.

        Only fields that are not ``None`` are compared; ``gpa`` is the GPA wanted at ``pfn``
        and advances by 4096 per page (unassigned entries have GPA 0). -1 if every entry
        matches. ``find_ne(p, 512, assigned=False) == -1`` is ``sev_gmem_prepare``'s "all 512
        pfns unassigned" test (§5.5). Runtime complexity: O((k + 1) log n).
        """
        return _rmp_find(self, pfn, npages, False, assigned, level, asid, gpa, immutable,
                          validated, vmsa)

    def find_eq(self, pfn, npages, *, assigned=None, level=None, asid=None, gpa=None,
                immutable=None, validated=None, vmsa=None):
        """The first pfn of ``[pfn, pfn + npages)`` whose entry has all the given fields, or -1.

        Arguments as :meth:`find_ne`. Runtime complexity: O((k + 1) log n).
        """
        return _rmp_find(self, pfn, npages, True, assigned, level, asid, gpa, immutable,
                          validated, vmsa)

    @property
    def counters(self):
        """Instruction counters as a new dict (instructions, not pages).

        ``rmpupdate`` / ``psmash`` / ``pvalidate`` count instructions that succeeded
        (``*_2m`` those at 2M; a PVALIDATE succeeds only if it changed the validated bit);
        ``<insn>_fail_<code>`` and ``pvalidate_npf_*`` count the ones that did not.
        """
        return {name: self.cnt[i] for i, name in enumerate(_RMP_COUNTER_NAMES)}

    def reset_counters(self):
        """Set every counter to 0."""
        if self._owner is not None:
            _refuse_nested(self._owner)  # EDEADLK from an event callback of its VM
        memset(self.cnt, 0, sizeof(self.cnt))
        self.look_pos.leaf = NULL

    @property
    def nbytes(self):
        """Bytes of C memory owned by the table's maps (independent of the pages covered)."""
        return self.ent.nbytes + self.lock.nbytes

    @property
    def nruns(self):
        """Stored runs of the entry map and the in-use lock map (what memory grows with)."""
        return len(self.ent) + len(self.lock)

    def __repr__(self):
        return f"RmpTable(max_pfn={self.max_pfn_:#x}, runs={self.nruns})"

    def __reduce__(self):
        raise TypeError("RmpTable cannot be pickled")

    def _check(self):
        """Assert every invariant in the ``_rmp.pxi`` header; raise ``AssertionError``."""
        cdef uint64_t lim = self.max_pfn_
        for name, m in (("ent", self.ent), ("lock", self.lock)):
            m._check()
            runs = m.ranges()
            if runs:
                last = runs[len(runs) - 1]
                assert last[1] <= lim, f"{name} run {last[:2]} passes max_pfn {lim:#x}"
        for a, b, w in self.ent.ranges():
            if w & 1:
                own = w & ~_E_FLAGS
                assert _own_gfn(own, a) < _RMP_MAX_PFN and _own_gfn(own, b - 1) < _RMP_MAX_PFN, (
                    f"ent run [{a:#x}, {b:#x}) maps a gfn outside 2**40")
            else:
                assert w == _E_SIZE, (f"ent run [{a:#x}, {b:#x}) stores {w:#x}: unassigned "
                                      "entries have no field but the page size")
            if w & _E_SIZE:
                assert a & _MASK_2M == 0 and b & _MASK_2M == 0, (
                    f"2M entries [{a:#x}, {b:#x}) are not whole aligned 512-page groups")
                assert not w & _E_VMSA, f"VMSA bit on a 2M entry in [{a:#x}, {b:#x})"
        for a, b, v in self.lock.ranges():
            assert v == 1, f"lock run [{a:#x}, {b:#x}) stores {v}, not 1"


# -- Python-boundary helpers of RmpTable (validate everything, then one C call) ---------------

cdef object _rmp_range(uint64_t limit, object pfn, object npages, uint64_t *p, uint64_t *n):
    """Validate ``[pfn, pfn + npages)`` inside ``[0, limit)``; return ``npages`` as an int."""
    pv = _rmp_int(pfn, "pfn", 0, limit)
    nv = _rmp_int(npages, "npages", 0, limit + 1)
    if pv + nv > limit:
        raise ValueError(f"npages {nv:#x} from pfn {pv:#x} passes max_pfn {limit:#x}")
    p[0] = pv
    n[0] = nv
    return nv


cdef tuple _rmp_result(RmpResult *res):
    return (res.done, res.fail_pfn if res.code else -1, res.code)


cdef tuple _rmp_update(RmpTable t, uint64_t p, uint64_t n, int lvl, object assigned,
                       object asid, object gpa, object immutable):
    cdef bint asg = _rmp_flag(assigned, "assigned")
    cdef bint im = _rmp_flag(immutable, "immutable")
    cdef uint64_t a = _rmp_int(asid, "asid", 0, 1 << 16)
    cdef uint64_t g = _rmp_gfn(gpa, n)
    cdef RmpResult res
    t._rmpupdate_c(p, n, lvl == 2, asg, a, g, im, &res)
    return _rmp_result(&res)


cdef inline bint _rmp_asid_ok(object asid, uint64_t *out) except -1:
    """``asid`` is an int that ``_rmp_int(asid, "asid", 0, 1 << 16)`` passes: its value in
    ``out``."""
    cdef int64_t v
    if type(asid) is int and _as_i64(asid, &v) and 0 <= v < (1 << 16):
        out[0] = <uint64_t>v
        return True
    return False


cdef inline bint _rmp_gpa_ok(uint64_t gpa, uint64_t npages) noexcept:
    """``_rmp_gfn(gpa, npages)`` passes (``npages`` below 2**63): the gfn is ``gpa >> 12``."""
    return gpa < (1ULL << 52) and not gpa & 0xFFF and (gpa >> 12) + npages <= _RMP_MAX_PFN


cdef tuple _rmp_pvalidate_u(RmpTable t, uint64_t p, uint64_t n, int lvl, object asid, uint64_t gpa,
                            bint validate):
    """:func:`_rmp_pvalidate` with the gpa and the flag as C values (the PVALIDATE walk's);
    an ASID or gpa its checks would refuse goes to it (its error)."""
    cdef uint64_t a
    cdef RmpResult res
    if n < (1ULL << 62) and _rmp_asid_ok(asid, &a) and _rmp_gpa_ok(gpa, n):
        t._pvalidate_c(p, n, lvl == 2, a, gpa >> 12, validate, &res)
        return _rmp_result(&res)
    return _rmp_pvalidate(t, p, n, lvl, asid, gpa, validate)


cdef tuple _rmp_pvalidate(RmpTable t, uint64_t p, uint64_t n, int lvl, object asid,
                          object gpa, object validate):
    cdef bint v = _rmp_flag(validate, "validate")
    cdef uint64_t a = _rmp_int(asid, "asid", 0, 1 << 16)
    cdef uint64_t g = _rmp_gfn(gpa, n)
    cdef RmpResult res
    t._pvalidate_c(p, n, lvl == 2, a, g, v, &res)
    return _rmp_result(&res)


cdef inline void _rmp_want(RmpMatch *want, int assigned, int level, bint has_asid, uint64_t asid,
                           bint has_gfn, uint64_t gfn, int immutable, int validated,
                           int vmsa) noexcept:
    """The fields an RMP query compares, checked already: each flag 0 or 1 and ``level`` 1 or 2,
    -1 for a field not compared (``has_asid`` / ``has_gfn`` False for those two)."""
    memset(want, 0, sizeof(RmpMatch))
    if assigned >= 0:
        want.fields |= RMP_F_ASSIGNED
        want.assigned = <uint64_t>assigned
    if level >= 0:
        want.fields |= RMP_F_BIG
        want.big = level == 2
    if has_asid:
        want.fields |= RMP_F_ASID
        want.asid = asid
    if has_gfn:
        want.fields |= RMP_F_GPA
        want.gfn = gfn
    if immutable >= 0:
        want.fields |= RMP_F_IMM
        want.imm = <uint64_t>immutable
    if validated >= 0:
        want.fields |= RMP_F_VALID
        want.valid = <uint64_t>validated
    if vmsa >= 0:
        want.fields |= RMP_F_VMSA
        want.vmsa = <uint64_t>vmsa


cdef object _rmp_find(RmpTable t, object pfn, object npages, bint equal, object assigned,
                      object level, object asid, object gpa, object immutable,
                      object validated, object vmsa):
    cdef uint64_t p, n, found
    cdef RmpMatch want
    nv = _rmp_range(t.max_pfn_, pfn, npages, &p, &n)
    _rmp_want(&want, -1 if assigned is None else <int>_rmp_flag(assigned, "assigned"),
              -1 if level is None else _rmp_level(level),
              asid is not None, 0 if asid is None else _rmp_int(asid, "asid", 0, 1 << 16),
              gpa is not None, 0 if gpa is None else _rmp_gfn(gpa, nv),
              -1 if immutable is None else <int>_rmp_flag(immutable, "immutable"),
              -1 if validated is None else <int>_rmp_flag(validated, "validated"),
              -1 if vmsa is None else <int>_rmp_flag(vmsa, "vmsa"))
    if t._find_c(p, p + n, &want, equal, &found):
        return found
    return -1


cdef int64_t _rmp_find_u(RmpTable t, uint64_t pfn, uint64_t npages, bint equal, int assigned,
                         int level, object asid, bint has_gpa, uint64_t gpa,
                         int validated) except -2:
    """:func:`_rmp_find` for the core's walks, with C values and no boxed ints: ``assigned`` and
    ``validated`` 0 or 1, ``level`` 1 or 2, each -1 for a field not compared, as ``asid`` None
    and ``has_gpa`` False (immutable and VMSA not compared). Where a check of
    :func:`_rmp_find` would refuse a value, the call is :func:`_rmp_find`'s (its error)."""
    cdef RmpMatch want
    cdef uint64_t found, a = 0
    if (pfn < t.max_pfn_ and npages <= t.max_pfn_ - pfn and assigned <= 1 and validated <= 1
            and (level == -1 or level == 1 or level == 2)
            and (asid is None or _rmp_asid_ok(asid, &a)) and (not has_gpa or _rmp_gpa_ok(gpa, npages))):
        _rmp_want(&want, assigned, level, asid is not None, a, has_gpa, gpa >> 12, -1, validated, -1)
        if t._find_c(pfn, pfn + npages, &want, equal, &found):
            return <int64_t>found
        return -1
    return _rmp_find(t, pfn, npages, equal, None if assigned < 0 else assigned,
                     None if level < 0 else level, asid, gpa if has_gpa else None, None,
                     None if validated < 0 else validated, None)
