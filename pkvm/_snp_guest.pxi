# The SNP guest vCPU's PVALIDATE range walk (pkvm/platforms/_snp_vcpu.py: SnpVcpu's
# _pvalidate_range_body, _pvalidate_4k_run, _pval_count), typed (included from _core.pyx).
#
# What a guest's pvalidate_pages does over a range, run by run of nested mappings: 2M
# PVALIDATEs over 2M leaves on 2M RMP entries as one range operation, 2M PVALIDATEs that fail
# with FAIL_SIZEMISMATCH over 4K leaves redone as 4K ones, fresh blocks faulted in as batches
# (SnpVcpu._batch_end). The rare paths -- a single PVALIDATE that takes an RMP #NPF, exits or
# fails, a shared leaf -- are SnpVcpu's Python methods, called from here; the RMP is queried
# through its methods (it may be a reference twin in tests). The same calls, counters, charges
# and results, in the same order, as the Python walk this replaces (docs/performance.md).

cdef int _PV_4K = 1, _PV_2M = 2  # PG_LEVEL_4K, PG_LEVEL_2M
cdef int _PV_SUCCESS = 0, _PV_FAIL_SIZEMISMATCH = 6  # pkvm.platforms.snp_constants


cdef inline bint _pv_fault_ok(r) except -1:
    """``r.ret in ("fixed", "spurious", "retry")`` of a fault's result."""
    ret = (<FaultResult?>r).ret
    return ret == "fixed" or ret == "spurious" or ret == "retry"


cdef int _PV_RETRY_LIMIT = 64  # pkvm.constants.RETRY_LIMIT (tests/test_retry_bounds.py)


cdef int _pv_retried(vm, r, uint64_t gfn) except -1:
    """After a PVALIDATE's #NPF ``r`` at ``gfn``: 0 if it did not return ``RET_PF_RETRY``; 1 if
    it did and, on a timeline, the vCPU spun until another thread's invalidation covering
    ``gfn`` ended (``Timeline.retry_fault``, as every other guest access does); 2 if nothing
    it could wait for explains the retry (no timeline, or no other thread to end it), so
    that re-faulting may never end (:func:`_pv_stuck`)."""
    if (<FaultResult?>r).ret != "retry":
        return 0
    sched = vm._sched
    if sched is not None and sched.retry_fault(gfn):
        return 1
    return 2


cdef object _pv_stuck(vcpu, uint64_t gfn, int *stuck, uint64_t *stuck_gfn, faults):
    """A retry at ``gfn`` that nothing it could wait for explains (:func:`_pv_retried` 2):
    counted with the ones before it at the same gfn; after ``RETRY_LIMIT`` of them in a row
    the walk stops as one PVALIDATE would (``SnpVcpu._pvalidate``: ``rmp_loop``), else None."""
    if gfn != stuck_gfn[0]:
        stuck_gfn[0] = gfn
        stuck[0] = 0
    stuck[0] += 1
    if stuck[0] < _PV_RETRY_LIMIT:
        return None
    return vcpu._stopped(GuestOpResult("rmp_loop", None, gfn << 12, None, None, None, None, faults,
                                       _PV_RETRY_LIMIT, "PVALIDATE #NPF refault"), gfn)


cdef object _pv_fault_stop(r, uint64_t gfn, faults):
    """The result of the PVALIDATE at ``gfn`` whose #NPF is the fault ``r`` (neither fixed,
    spurious nor retried), as ``SnpVcpu._pvalidate`` gives it: the walk faulted the page in
    for the instruction, so that fault is the instruction's and is not taken again."""
    cdef FaultResult f = <FaultResult?>r
    if f.ret == "exit":
        return GuestOpResult("exit", None, None, f.exit_reason, None, f.memory_fault, f.errno, faults)
    return GuestOpResult(f.ret, None, gfn << 12, None, None, None, f.errno, faults, f.retries, f.loop)


def snp_pv_fault_stop(r, uint64_t gfn, faults):
    """``SnpVcpu._pvalidate``'s result for an #NPF that did not map the page (see
    :func:`_pv_fault_stop`)."""
    return _pv_fault_stop(r, gfn, faults)


cdef int _pv_count(snp, int level, int code, count) except -1:
    """``SnpVcpu._pval_count``: count and charge ``count`` PVALIDATEs at ``level`` that ended
    with ``code`` (``vm._charge``, then the counters) on ``snp`` (``vm.snp``), with the ops
    and counters its :class:`SnpPath` resolved."""
    cdef SnpPath p = <SnpPath?>snp._path
    if level == _PV_2M:
        _charge_op(p.ledger, &p.o_pv2m, "pvalidate_2m", count)  # VM._charge
    else:
        _charge_op(p.ledger, &p.o_pv4k, "pvalidate_4k", count)
    if code == _PV_SUCCESS:
        _stat_add_n(p.stats, p.i_pvalidate, "pvalidate", count)
        if level == _PV_2M:
            _stat_add_n(p.stats, p.i_pvalidate_2m, "pvalidate_2m", count)
    else:
        _stat_add_n(p.stats, p.i_pvalidate_failures, "pvalidate_failures", count)
    return 0


def snp_pval_count(vm, int level, int code, count):
    """``SnpVcpu._pval_count`` (see :func:`_pv_count`)."""
    _pv_count(vm.snp, level, code, count)


cdef uint64_t _pv_batch_end(vm, uint64_t gfn, uint64_t end, bint validated) except? 0:
    """``SnpVcpu._batch_end``: the walk is :func:`snp_batch_end`'s."""
    # vm._slot_at(gfn), without its Python frame (once per fresh block a PVALIDATE faults)
    cdef uint64_t key = rangemap_get(<RangeMap?>vm._slot_maps[0], gfn)
    slot = vm._slots[key - 1] if key else None
    if slot is None or slot.gmem is None or end <= gfn + 1:
        return gfn + 1
    snp = vm.snp
    off = slot.gmem_pgoff - slot.base_gfn
    cdef uint64_t se = slot.end_gfn
    if se < end:
        end = se
    if end <= gfn + 1:
        return gfn + 1
    return _snp_batch_end(slot.gmem.folios, snp._rmp, off, gfn, end, validated, snp.asid)


def snp_pv_batch_end(vm, uint64_t gfn, uint64_t end, bint validated):
    """``SnpVcpu._batch_end`` (see :func:`_pv_batch_end`)."""
    return _pv_batch_end(vm, gfn, end, validated)


cdef tuple _pv_fault(vm, vcpu, uint64_t gfn, uint64_t limit):
    """``vm._fault_path.fault(vcpu, gfn, limit, True, False)`` (the private #NPF of a
    PVALIDATE, batched over ``[gfn, limit)``): the core's :class:`FaultPath` in C."""
    fp = vm._fault_path
    if type(fp) is FaultPath:
        return (<FaultPath>fp)._fault(vcpu, gfn, limit, True, False)
    return fp.fault(vcpu, gfn, limit, True, False)


cdef object _pv_rmp_pvalidate(rmp, uint64_t pfn, uint64_t n, int level, asid, uint64_t gpa,
                              bint validate):
    """``rmp.pvalidate_range(pfn, n, level, asid=asid, gpa=gpa, validate=validate)``: the
    core's :class:`RmpTable` answers in C for a range inside the table (a 2M one in whole 2M
    entries); a reference twin, or a range the method refuses, goes through the method."""
    cdef RmpTable t
    if type(rmp) is RmpTable:
        t = <RmpTable>rmp
        if pfn < t.max_pfn_ and n <= t.max_pfn_ - pfn and not (level == _PV_2M and n & _MASK_2M):
            return _rmp_pvalidate_u(t, pfn, n, level, asid, gpa, validate)
    return rmp.pvalidate_range(pfn, n, level, asid=asid, gpa=gpa, validate=validate)


cdef object _pv_4k_run(vcpu, vm, snp, RangeMap sptes, uint64_t gfn, uint64_t end, bint validate):
    """``SnpVcpu._pvalidate_4k_run``: 4K PVALIDATEs over ``[gfn, end)`` inside one private
    leaf run; None on success."""
    cdef Run run
    cdef uint64_t e, v, pfn
    while gfn < end:
        rangemap_run_at(sptes, gfn, &run)
        e = run.end if run.end < end else end
        v = run.value
        if not v or not v & _F_SPTE_PRIVATE:
            r = vcpu._pvalidate_range(gfn, e, validate, False)
            if (<GuestOpResult?>r).ret != "done" or (<GuestOpResult>r).status != _PV_SUCCESS:
                return r
            gfn = e
            continue
        pfn = <uint64_t>(<int64_t>gfn + _decode_delta(v))
        # A 4K PVALIDATE on a 2M RMP entry stops the range with NPF_SIZEM; the single path
        # below then takes the #NPF (PSMASH + zap) and re-executes.
        done, _fail, code = _pv_rmp_pvalidate(snp._rmp, pfn, e - gfn, _PV_4K, snp.asid, gfn << 12, validate)
        if done:
            _pv_count(snp, _PV_4K, _PV_SUCCESS, done)
            gfn += <uint64_t>done
        if code == 0 and gfn == e:
            continue
        r = vcpu._pvalidate(gfn << 12, _PV_4K, validate, 0)
        if (<GuestOpResult?>r).ret != "done" or (<GuestOpResult>r).status != _PV_SUCCESS:
            return GuestOpResult(r.ret, r.status, gfn << 12, r.exit_reason, None, r.memory_fault,
                                 r.errno, r.faults, r.retries, r.loop)
        gfn += 1
    return None


def snp_pvalidate_4k_run(vcpu, uint64_t gfn, uint64_t end, bint validate):
    """``SnpVcpu._pvalidate_4k_run`` (see :func:`_pv_4k_run`)."""
    vm = vcpu.vm
    return _pv_4k_run(vcpu, vm, vm.snp, <RangeMap?>vm._mmu.sptes, gfn, end, validate)


@cython.final
@cython.auto_pickle(False)  # a pending continuation of live simulation state
cdef class _PvRangeResume:
    """``KVM_RUN`` after a PVALIDATE range exited: the faulting PVALIDATE is re-executed and
    the guest's loop goes on from there (``vcpu._pvalidate_range(at, end, ...)``)."""

    cdef object vcpu, at, end, validate, huge

    def __call__(self):
        return self.vcpu._pvalidate_range(self.at, self.end, self.validate, self.huge)


def snp_pvalidate_insn(vcpu, uint64_t gfn, uint64_t end, bint validate, bint huge):
    """``SnpVcpu._pvalidate_insn``: the instruction begins (:func:`begin_insn`), then
    :func:`snp_pvalidate_range` over ``[gfn, end)``, for a caller that checked the range."""
    _begin_insn(vcpu)
    return _pv_range(vcpu, gfn, end, validate, huge)


def snp_pvalidate_range(vcpu, uint64_t gfn, uint64_t end, bint validate, bint huge):
    """``SnpVcpu._pvalidate_range``: the walk (:func:`_pv_range_body`); after an exit, the
    vCPU's continuation resumes it at the gpa the exit reports."""
    return _pv_range(vcpu, gfn, end, validate, huge)


cdef object _pv_range(vcpu, uint64_t gfn, uint64_t end, bint validate, bint huge):
    """:func:`snp_pvalidate_range`."""
    cdef _PvRangeResume resume
    r = _pv_range_body(vcpu, gfn, end, validate, huge)
    if (<GuestOpResult?>r).ret == "exit":
        value = (<GuestOpResult>r).value
        resume = _PvRangeResume.__new__(_PvRangeResume)
        resume.vcpu = vcpu
        resume.at = (value if value is not None else gfn << 12) >> 12
        resume.end = end
        resume.validate = validate
        resume.huge = huge
        vcpu._resume = resume
    return r


cdef int64_t _pv_find_ne(rmp, uint64_t pfn, uint64_t n, int assigned, int level, asid,
                         bint has_gpa, uint64_t gpa, int validated) except -2:
    """``rmp.find_ne(pfn, n, ...)`` with the fields compared (``assigned`` / ``validated`` 0 or
    1 and ``level``: -1 for none; ``asid`` None, ``has_gpa`` False for none): the core's
    :class:`RmpTable` answers in C (:func:`_rmp_find_u`), a reference twin through its
    method."""
    if type(rmp) is RmpTable:
        return _rmp_find_u(<RmpTable>rmp, pfn, n, False, assigned, level, asid, has_gpa, gpa, validated)
    return rmp.find_ne(pfn, n, assigned=None if assigned < 0 else assigned == 1,
                       level=None if level < 0 else level, asid=asid, gpa=gpa if has_gpa else None,
                       validated=None if validated < 0 else validated == 1)


cdef object _pv_range_body(vcpu, uint64_t gfn, uint64_t end, bint validate, bint huge):
    """The guest's PVALIDATE loop over ``[gfn, end)`` (2M where the guest would use 2M, 4K
    elsewhere); ``done`` with status 0 and ``value`` the end, or the first failing or exiting
    instruction's result."""
    vm = vcpu.vm
    snp = vm.snp
    rmp = snp._rmp  # snp.rmp, without the property
    cdef RangeMap sptes = <RangeMap?>vm._mmu.sptes
    cdef Run run
    cdef uint64_t e, v, pfn = 0, p1, v1, nxt, stop, k, n2
    cdef bint big
    cdef int stuck = 0, retried
    cdef uint64_t stuck_gfn = <uint64_t>-1
    faults = 0
    while gfn < end:
        rangemap_run_at(sptes, gfn, &run)
        e = run.end if run.end < end else end
        v = run.value
        big = huge and not gfn & 511 and gfn + 512 <= end  # the guest's choice of size
        if not big:
            # 4K PVALIDATEs up to the next 2M block the guest would do at 2M.
            nxt = (gfn + 511) & ~(<uint64_t>511)
            stop = nxt if huge and nxt > gfn and nxt + 512 <= end else end
            if stop > e:
                stop = e  # min(e, stop)
            if not v:
                # Each PVALIDATE takes its own #NPF; a batch of them is faulted in at once
                # where that cannot change the outcome (_batch_end).
                n, r = _pv_fault(vm, vcpu, gfn, _pv_batch_end(vm, gfn, stop, not validate))
                faults += n
                if _pv_fault_ok(r):
                    if _pv_retried(vm, r, gfn) == 2:
                        halt = _pv_stuck(vcpu, gfn, &stuck, &stuck_gfn, faults)
                        if halt is not None:
                            return halt
                    continue
                return vcpu._stopped(_pv_fault_stop(r, gfn, faults), gfn)
            if not v & _F_SPTE_PRIVATE:
                return vcpu._stopped(vcpu._pvalidate(gfn << 12, _PV_4K, validate, faults), gfn)
            r2 = _pv_4k_run(vcpu, vm, snp, sptes, gfn, stop, validate)
            if r2 is not None:
                return r2
            gfn = stop
            continue
        if not v and not vm._policy.gmem_max_order:
            # Order-0 folios only: the 2M PVALIDATE of a fresh block faults its first page
            # (one 4K RMP entry). If that pfn is 2M-aligned and the entry is this guest's,
            # the instruction fails with SIZEMISMATCH and the 4K retries fault the other
            # pages in order, as do the next blocks (consecutive allocations): fault the
            # batch at once and let the 4K-leaf range form below replay the instructions.
            n, r = _pv_fault(vm, vcpu, gfn, gfn + 1)
            faults += n
            if not _pv_fault_ok(r):
                return vcpu._stopped(_pv_fault_stop(r, gfn, faults), gfn)
            retried = _pv_retried(vm, r, gfn)
            if retried == 2:
                halt = _pv_stuck(vcpu, gfn, &stuck, &stuck_gfn, faults)
                if halt is not None:
                    return halt
            if retried:
                continue
            v1 = rangemap_get(sptes, gfn)
            if v1:
                p1 = <uint64_t>(<int64_t>gfn + _decode_delta(v1))
                if (v1 & _F_SPTE_PRIVATE and not p1 & 511 and e > gfn + 1
                        and _pv_find_ne(rmp, p1, 1, -1, -1, None, False, 0, validate) != -1):  # its 4K retry succeeds
                    n, r = _pv_fault(vm, vcpu, gfn + 1, _pv_batch_end(vm, gfn + 1, e, not validate))
                    faults += n
                    _pv_retried(vm, r, gfn + 1)  # (the next pass faults gfn + 1 again, counted there)
            continue
        if v:
            pfn = <uint64_t>(<int64_t>gfn + _decode_delta(v))
        if (v and v & _F_SPTE_PRIVATE and e - gfn >= 512 and _f_level(v) == _PV_2M
                and rmp.lookup(pfn).level == _PV_2M):
            # A run of 2M leaves over 2M RMP entries: one range operation.
            n2 = (e - gfn) >> 9
            done, _fail, code = _pv_rmp_pvalidate(rmp, pfn, n2 << 9, _PV_2M, snp.asid, gfn << 12, validate)
            if done:
                _pv_count(snp, _PV_2M, _PV_SUCCESS, done)
                gfn += (<uint64_t>done) << 9
            if code:
                op = vcpu._pvalidate(gfn << 12, _PV_2M, validate, 0)
                if (<GuestOpResult?>op).ret != "done" or (<GuestOpResult>op).status != _PV_SUCCESS:
                    return vcpu._stopped(op, gfn)
                gfn += 512
            continue
        if (v and v & _F_SPTE_PRIVATE and e - gfn >= 512 and _f_level(v) == _PV_4K
                and not pfn & 511 and _pv_find_ne(rmp, pfn, e - gfn, 1, _PV_4K, snp.asid,
                                                  True, gfn << 12, -1) == -1):
            # 4K leaves over 4K RMP entries: every 2M PVALIDATE fails with SIZEMISMATCH and
            # is redone as 512 x 4K; the blocks up to the first 4K failure are counted.
            k = (e - gfn) >> 9
            r2 = _pv_4k_run(vcpu, vm, snp, sptes, gfn, gfn + (k << 9), validate)
            if r2 is None:
                failed_blocks = k
            else:
                failed_blocks = ((((<GuestOpResult?>r2).value or 0) >> 12) - gfn >> 9) + 1
            _pv_count(snp, _PV_2M, _PV_FAIL_SIZEMISMATCH, failed_blocks)
            if r2 is not None:
                return r2
            gfn += k << 9
            continue
        if (v and v & _F_SPTE_PRIVATE and _f_level(v) == _PV_4K and pfn & 511
                and _pv_find_ne(rmp, pfn, 1, 1, _PV_2M, snp.asid, True, gfn << 12, -1) != -1):
            # A 2M PVALIDATE through a private 4K leaf of a pfn that is not 2M-aligned, and no
            # 2M RMP entry of this guest there (which would be SnpVcpu._pvalidate's #NPF first):
            # FAIL_SIZEMISMATCH, counted as the method counts it, without calling it. (A
            # 2M-aligned pfn went to the range forms above, or goes to the method.)
            _pv_count(snp, _PV_2M, _PV_FAIL_SIZEMISMATCH, 1)
            status = _PV_FAIL_SIZEMISMATCH
        else:
            # Anything else (no leaf, a shared leaf, mixed sizes): one 2M PVALIDATE at a time.
            op = vcpu._pvalidate(gfn << 12, _PV_2M, validate, faults)
            if ((<GuestOpResult?>op).ret != "done"
                    or (op.status != _PV_SUCCESS and op.status != _PV_FAIL_SIZEMISMATCH)):
                return vcpu._stopped(op, gfn)
            status = op.status
        faults = 0
        if status == _PV_FAIL_SIZEMISMATCH:  # the guest redoes the block as 512 x 4K
            r2 = vcpu._pvalidate_range(gfn, gfn + 512, validate, False)
            if (<GuestOpResult?>r2).ret != "done" or (<GuestOpResult>r2).status != _PV_SUCCESS:
                return r2
        gfn += 512
    return GuestOpResult("done", _PV_SUCCESS, end << 12, None, None, None, None, faults)


# -- the GHCB page-state change in run form (SnpVcpu._psc_runs, _psc_begin) ----------------------
#
# A request given as its runs of contiguous same-size entries: the VMGEXIT is counted, charged
# and announced, then each run is one KVM_HC_MAP_GPA_RANGE exit whose completion (at the next
# KVM_RUN) starts the next run. The instruction's entry check and the exit are the core's
# begin_insn and hypercall_exit (pkvm/_results.pxi, what pkvm.kvm.exits exports).

cdef int _PSC_PRIVATE = 1                        # SNP_PAGE_STATE_PRIVATE
cdef int _HC_MAP_GPA_RANGE = 12                  # KVM_HC_MAP_GPA_RANGE
cdef int _MAP_GPA_ENCRYPTED = 1 << 4             # KVM_MAP_GPA_RANGE_ENCRYPTED (DECRYPTED: 0)
cdef int _MAP_GPA_SZ_2M = 1                      # KVM_MAP_GPA_RANGE_PAGE_SZ_2M (4K: 0)
_VMGEXIT_PSC = 0x80000010                        # SVM_VMGEXIT_PSC
_PSC_ERROR_GENERIC = 0x100 << 32                 # VMGEXIT_PSC_ERROR_GENERIC


cdef bint _psc_begin(vcpu) except -1:
    """``SnpVcpu._psc_begin``: the instruction begins (:func:`begin_insn`), the request is
    counted, charged and announced; whether the guest may use the protocol."""
    _begin_insn(vcpu)
    vm = vcpu.vm
    cdef SnpPath p = <SnpPath?>vm.snp._path  # the ops and counters it resolved
    _stat_add_at(p.stats, p.i_psc_requests, "psc_requests", 1)
    _charge_op(p.ledger, &p.o_psc, "psc_request", 1)  # VM._charge
    if vm._subs is not None:
        vm._emit("vmgexit_enter", None, None, None, 1, 0, None, (vcpu.id, _VMGEXIT_PSC, 0, 0))
    return bool(vm.hypercall_exit_mask & (1 << _HC_MAP_GPA_RANGE))


def snp_psc_begin(vcpu):
    """``SnpVcpu._psc_begin`` (see :func:`_psc_begin`)."""
    return _psc_begin(vcpu)


@cython.final
@cython.auto_pickle(False)  # a pending continuation of live simulation state
cdef class _PscRunDone:
    """The completion of run ``k``'s exit (``snp_complete_one_psc``): a range userspace failed
    ends the request with ``VMGEXIT_PSC_ERROR_GENERIC``; so does a hypercall exit userspace
    disabled meanwhile (``snp_begin_psc``'s first test); otherwise the next run goes. Either
    end is traced (``vmgexit_exit``), as every completed VMGEXIT is."""

    cdef object vcpu, hc, k
    cdef list runs, at
    cdef int op

    def __call__(self):
        if self.hc.ret:
            return self.vcpu._psc_done(GuestOpResult("done", _PSC_ERROR_GENERIC))
        self.at[0] = self.k + 1
        if not self.vcpu.vm.hypercall_exit_mask & (1 << _HC_MAP_GPA_RANGE):
            # snp_begin_psc, reached again from snp_complete_one_psc, tests the hypercall exit
            # first: userspace disabled it while the vCPU was in the exit
            return self.vcpu._psc_done(GuestOpResult("done", _PSC_ERROR_GENERIC))
        r = _psc_run(self.vcpu, self.runs, self.op, self.at)
        return r if self.vcpu.vm._subs is None else self.vcpu._psc_done(r)


cdef object _psc_run(vcpu, list runs, int op, list at):
    """Run ``at[0]`` of ``runs``: its ``KVM_HC_MAP_GPA_RANGE`` exit, or ``done`` after the last."""
    k = at[0]
    if k == len(runs):
        return GuestOpResult("done", 0)
    gfn, n, huge = runs[k]
    _stat_add(vcpu.vm._stats, "psc_entries", n)
    attrs = (_MAP_GPA_ENCRYPTED if op == _PSC_PRIVATE else 0) | (_MAP_GPA_SZ_2M if huge else 0)
    # snp_begin_psc leaves run->hypercall.flags as it was (docs/snp.md, "flags")
    hc = Hypercall(_HC_MAP_GPA_RANGE, (gfn << 12, n * 512 if huge else n, attrs), 0, vcpu._hc_flags)
    cdef _PscRunDone done = _PscRunDone.__new__(_PscRunDone)
    done.vcpu = vcpu
    done.hc = hc
    done.k = k
    done.runs = runs
    done.at = at
    done.op = op
    return _hypercall_exit(vcpu, hc, done, 0)


def snp_psc_runs(vcpu, list runs not None, int op, list at not None):
    """``SnpVcpu._psc_runs``: the request's VMGEXIT, then its runs' exits."""
    enabled = _psc_begin(vcpu)
    at[0] = 0
    if not enabled:
        return vcpu._psc_done(GuestOpResult("done", _PSC_ERROR_GENERIC))
    r = _psc_run(vcpu, runs, op, at)
    return r if vcpu.vm._subs is None else vcpu._psc_done(r)


# -- the hardware RMP check on a guest access (SnpVcpu._usable_end) ------------------------------

def snp_usable_end(vcpu, uint64_t gfn, uint64_t stop, uint64_t spte, bint private, bint write):
    """``SnpVcpu._usable_end``: the end of the prefix of ``[gfn, stop)`` (one present leaf run
    ``spte``) an access completes without a fault -- ``Vcpu._usable_end``'s writable test,
    then the RMP check. The usual case of a private access (every entry assigned to this
    guest at its GPA, at the leaf's size, validated) is one query of the core's RMP; anything
    else is ``SnpVcpu._rmp_verdict``'s, which records where and why the access stops."""
    vcpu._rmp_stop = None
    cdef uint64_t u = stop if not write or spte & _F_SPTE_WRITABLE else gfn  # Vcpu._usable_end
    cdef int64_t p
    if u <= gfn or (private and not spte & _F_SPTE_PRIVATE):
        return gfn if private and not spte & _F_SPTE_PRIVATE else u
    if private:
        snp = vcpu.vm.snp
        rmp = snp._rmp  # snp.rmp, without the property
        p = <int64_t>gfn + _decode_delta(spte)
        if type(rmp) is RmpTable and (_rmp_find_u(
                <RmpTable>rmp, <uint64_t>p, u - gfn, False, 1, _f_level(spte), snp.asid, True, gfn << 12,
                1) == -1 if p >= 0 else _rmp_find(
                <RmpTable>rmp, p, u - gfn, False, True, _f_level(spte), snp.asid, gfn << 12, None, True,
                None) == -1):
            return u
    end, why = vcpu._rmp_verdict(gfn, u - gfn, spte, private)
    if why:
        vcpu._rmp_stop = (end, why)
    return end
