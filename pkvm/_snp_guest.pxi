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


cdef int _pv_count(vm, int level, int code, count) except -1:
    """``SnpVcpu._pval_count``: count and charge ``count`` PVALIDATEs at ``level`` that ended
    with ``code`` (``vm._charge``, then the counters)."""
    vm._charge("pvalidate_2m" if level == _PV_2M else "pvalidate_4k", count)
    st = vm._stats
    if code == _PV_SUCCESS:
        st["pvalidate"] += count
        if level == _PV_2M:
            st["pvalidate_2m"] += count
    else:
        st["pvalidate_failures"] += count
    return 0


def snp_pval_count(vm, int level, int code, count):
    """``SnpVcpu._pval_count`` (see :func:`_pv_count`)."""
    _pv_count(vm, level, code, count)


cdef uint64_t _pv_batch_end(vm, uint64_t gfn, uint64_t end, bint validated) except? 0:
    """``SnpVcpu._batch_end``: the walk is :func:`snp_batch_end`'s."""
    slot = vm._slot_at(gfn)
    if slot is None or slot.gmem is None or end <= gfn + 1:
        return gfn + 1
    snp = vm.snp
    off = slot.gmem_pgoff - slot.base_gfn
    cdef uint64_t se = slot.end_gfn
    if se < end:
        end = se
    if end <= gfn + 1:
        return gfn + 1
    return snp_batch_end(slot.gmem.folios, snp._rmp, off, gfn, end, validated, snp.asid)


def snp_pv_batch_end(vm, uint64_t gfn, uint64_t end, bint validated):
    """``SnpVcpu._batch_end`` (see :func:`_pv_batch_end`)."""
    return _pv_batch_end(vm, gfn, end, validated)


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
        done, _fail, code = snp._rmp.pvalidate_range(pfn, e - gfn, _PV_4K, asid=snp.asid,
                                                     gpa=gfn << 12, validate=validate)
        if done:
            _pv_count(vm, _PV_4K, _PV_SUCCESS, done)
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


def snp_pvalidate_range(vcpu, uint64_t gfn, uint64_t end, bint validate, bint huge):
    """``SnpVcpu._pvalidate_range_body``: the guest's PVALIDATE loop over ``[gfn, end)``
    (2M where the guest would use 2M, 4K elsewhere); ``done`` with status 0 and ``value`` the
    end, or the first failing or exiting instruction's result."""
    vm = vcpu.vm
    snp = vm.snp
    rmp = snp._rmp  # snp.rmp, without the property
    cdef RangeMap sptes = <RangeMap?>vm._mmu.sptes
    cdef Run run
    cdef uint64_t e, v, pfn = 0, p1, v1, nxt, stop, k, n2
    cdef bint big
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
                n, r = vm._fault_path.fault(vcpu, gfn, _pv_batch_end(vm, gfn, stop, not validate), True, False)
                faults += n
                if _pv_fault_ok(r):
                    continue
                return vcpu._stopped(vcpu._pvalidate(gfn << 12, _PV_4K, validate, faults), gfn)
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
            n, r = vm._fault_path.fault(vcpu, gfn, gfn + 1, True, False)
            faults += n
            if not _pv_fault_ok(r):
                return vcpu._stopped(vcpu._pvalidate(gfn << 12, _PV_2M, validate, faults), gfn)
            v1 = rangemap_get(sptes, gfn)
            if v1:
                p1 = <uint64_t>(<int64_t>gfn + _decode_delta(v1))
                if (v1 & _F_SPTE_PRIVATE and not p1 & 511 and e > gfn + 1
                        and rmp.find_ne(p1, 1, validated=validate) != -1):  # its 4K retry succeeds
                    n, r = vm._fault_path.fault(vcpu, gfn + 1, _pv_batch_end(vm, gfn + 1, e, not validate),
                                                True, False)
                    faults += n
            continue
        if v:
            pfn = <uint64_t>(<int64_t>gfn + _decode_delta(v))
        if (v and v & _F_SPTE_PRIVATE and e - gfn >= 512 and _f_level(v) == _PV_2M
                and rmp.lookup(pfn).level == _PV_2M):
            # A run of 2M leaves over 2M RMP entries: one range operation.
            n2 = (e - gfn) >> 9
            done, _fail, code = rmp.pvalidate_range(pfn, n2 << 9, _PV_2M, asid=snp.asid,
                                                    gpa=gfn << 12, validate=validate)
            if done:
                _pv_count(vm, _PV_2M, _PV_SUCCESS, done)
                gfn += (<uint64_t>done) << 9
            if code:
                op = vcpu._pvalidate(gfn << 12, _PV_2M, validate, 0)
                if (<GuestOpResult?>op).ret != "done" or (<GuestOpResult>op).status != _PV_SUCCESS:
                    return vcpu._stopped(op, gfn)
                gfn += 512
            continue
        if (v and v & _F_SPTE_PRIVATE and e - gfn >= 512 and _f_level(v) == _PV_4K
                and not pfn & 511 and rmp.find_ne(pfn, e - gfn, level=_PV_4K, assigned=True,
                                                  asid=snp.asid, gpa=gfn << 12) == -1):
            # 4K leaves over 4K RMP entries: every 2M PVALIDATE fails with SIZEMISMATCH and
            # is redone as 512 x 4K; the blocks up to the first 4K failure are counted.
            k = (e - gfn) >> 9
            r2 = _pv_4k_run(vcpu, vm, snp, sptes, gfn, gfn + (k << 9), validate)
            if r2 is None:
                failed_blocks = k
            else:
                failed_blocks = ((((<GuestOpResult?>r2).value or 0) >> 12) - gfn >> 9) + 1
            _pv_count(vm, _PV_2M, _PV_FAIL_SIZEMISMATCH, failed_blocks)
            if r2 is not None:
                return r2
            gfn += k << 9
            continue
        # Anything else (no leaf, a shared leaf, mixed sizes): one 2M PVALIDATE at a time.
        op = vcpu._pvalidate(gfn << 12, _PV_2M, validate, faults)
        faults = 0
        if ((<GuestOpResult?>op).ret != "done"
                or (op.status != _PV_SUCCESS and op.status != _PV_FAIL_SIZEMISMATCH)):
            return vcpu._stopped(op, gfn)
        if op.status == _PV_FAIL_SIZEMISMATCH:
            r2 = vcpu._pvalidate_range(gfn, gfn + 512, validate, False)
            if (<GuestOpResult?>r2).ret != "done" or (<GuestOpResult>r2).status != _PV_SUCCESS:
                return r2
        gfn += 512
    return GuestOpResult("done", _PV_SUCCESS, end << 12, None, None, None, None, faults)
