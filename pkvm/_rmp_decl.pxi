# C-level declaration of the SEV-SNP RMP table (included at the end of ``_core.pxd``).
#
# ``RmpTable`` keeps one logical RMP entry per host pfn (docs/kernel-semantics.md §5.1), packed
# into one word on one ``RangeMap`` so that a TiB of identically-owned pages is one run and an
# instruction writes one map. The encoding and the invariants are documented at the top of
# ``_rmp.pxi``.
#
# Contract of the ``cdef`` methods (as for ``RangeMap``): they trust their arguments (pfns below
# ``max_pfn``, ``npages`` a multiple of 512 for 2M operations, GPAs passed as gfns below 2**40,
# ASIDs below 2**16). ``except -1`` methods can fail only with ``MemoryError``, raised before
# anything changes (the pools are reserved for all of an instruction's writes first);
# the hardware outcome of an instruction is reported in ``RmpResult``, never raised.

cdef enum:
    RMP_PAGES_2M = 512          # 4K pages per 2M RMP entry
    RMP_NR_COUNTERS = 17        # length of RmpTable.cnt (names: _RMP_COUNTER_NAMES in _rmp.pxi)


cdef struct RmpResult:
    uint64_t done               # instructions that succeeded (4K pages, or 2M regions)
    uint64_t fail_pfn           # pfn operand of the first failing instruction (if code != 0)
    int code                    # 0, or that instruction's return code / pkvm fault outcome


cdef struct RmpSeg:
    uint64_t start              # first pfn of the segment (inclusive)
    uint64_t end                # one past the last pfn (exclusive)
    uint64_t own                # ownership word (assigned, asid, gfn - pfn); 0 = hypervisor
    uint64_t size               # 1 if the entries' page size is 2M, else 0
    uint64_t imm                # 1 if immutable
    uint64_t valid              # 1 if validated
    uint64_t vmsa               # 1 if the VMSA bit is set


cdef struct RmpMatch:
    int fields                  # RMP_F_* bits (see _rmp.pxi): which fields are compared
    uint64_t assigned           # wanted values (0/1) of the compared flag fields ...
    uint64_t big                # ... page size 2M
    uint64_t imm
    uint64_t valid
    uint64_t vmsa
    uint64_t asid               # wanted ASID
    uint64_t gfn                # wanted gfn at the range's first pfn; advances with the pfn


cdef class RmpTable:
    cdef RangeMap ent           # pfn -> entry word (see _rmp.pxi); default 0 = hypervisor 4K
    cdef RangeMap lock          # pfn -> 1 while the entry is "in use" (not RMP state; test hook)
    cdef uint64_t max_pfn_      # the table covers pfns [0, max_pfn_); a multiple of 512
    cdef uint64_t cnt[RMP_NR_COUNTERS]  # instruction counters by outcome (instructions, not pages)
    # The entry run the last _word_c read (at pfn ``look_pfn``) and where in ``ent`` it landed:
    # a 4K RMPUPDATE of that pfn while ``ent`` is unchanged (``look_pos.version``) starts from
    # it instead of a second lookup (the fault's "assigned?" test, then its RMPUPDATE)
    cdef uint64_t look_pfn
    cdef Run look_run
    cdef RunPos look_pos
    # A weakref to the VM whose RMP this is (set by SNP's init), or None: the public mutators
    # refuse from an event callback of that VM (KvmError(EDEADLK), docs/events.md)
    cdef object _owner

    # -- C-level API (trusting; see above) ----------------------------------------------------
    cdef int _rmpupdate_c(self, uint64_t pfn, uint64_t npages, bint big, bint assigned,
                          uint64_t asid, uint64_t gfn, bint immutable,
                          RmpResult *res) except -1 nogil
    cdef int _psmash_c(self, uint64_t pfn, uint64_t npages, RmpResult *res) except -1 nogil
    cdef int _pvalidate_c(self, uint64_t pfn, uint64_t npages, bint big, uint64_t asid,
                          uint64_t gfn, bint validate, RmpResult *res) except -1 nogil
    cdef RmpSeg _seg_c(self, uint64_t pfn, uint64_t limit) noexcept nogil
    cdef int _find_c(self, uint64_t start, uint64_t end, const RmpMatch *want, bint equal,
                     uint64_t *found) noexcept nogil
    cdef bint _is_2m_c(self, uint64_t pfn) noexcept nogil
    cdef uint64_t _word_c(self, uint64_t pfn) noexcept nogil

    # -- internals -------------------------------------------------------------------------------
    cdef bint _locked(self, uint64_t start, uint64_t end, uint64_t *found) noexcept nogil
    cdef int _scan(self, uint64_t start, uint64_t end, int kind, uint64_t want,
                   uint64_t *found) noexcept nogil
    cdef int _rmw(self, uint64_t start, uint64_t end, uint64_t clear, uint64_t set_) except -1 nogil
