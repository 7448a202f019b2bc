# The nested page fault's objects in the typed core (issue 16): ``struct kvm_page_fault``
# (:class:`PageFault`) and the outcome ``Vcpu.page_fault`` returns (:class:`FaultResult`).
# Included from _core.pyx. Built as extension types so that creating one costs one C
# allocation instead of a Python ``__init__`` per field (a frozen dataclass pays an
# ``object.__setattr__`` call per field: it was the most expensive single step of a 4K
# fault). The fault path's phases live in pkvm/kvm/mmu.py and fill these in.

@cython.final
@cython.freelist(8)
@cython.auto_pickle(False)
cdef class PageFault:
    """``struct kvm_page_fault``, widened to a batch of identical faults ``[gfn, end)``.

    ``gfn`` / ``limit``: the faulting gfn and the end of the gfns a batch may cover;
    ``end``: the gfns this object accounts for; ``private_access``: the access type the
    hardware reported; ``attr``: the gfn's attribute word read on entry; ``is_private``, ``write``, ``prefetch`` (``kvm_tdp_map_page``
    from ``KVM_PRE_FAULT_MEMORY``: no exit, no ``pf_taken``); ``mmu_seq`` (the invalidation
    sequence snapshot); ``slot``; ``delta`` (pfn - gfn of the backing); ``max_level``,
    ``map_writable``, ``level``; ``ret`` ("" while running), ``errno``, ``memory_fault``;
    ``nfaults`` (faults this object stands for); ``host_level``; ``single`` (a batch of one);
    ``order`` (the guest_memfd folio order usable at ``gfn``).
    """

    cdef public object gfn, limit, end, private_access, is_private, write, mmu_seq, slot, delta
    cdef public object errno "pkvm_errno"
    cdef public object max_level, map_writable, level, ret, memory_fault, nfaults
    cdef public object host_level, single, order, prefetch, attr

    def __init__(self, gfn, limit, private, write, prefetch=False):
        self.gfn = gfn
        self.prefetch = prefetch
        self.limit = limit
        self.end = gfn + 1
        self.private_access = private
        self.is_private = False
        self.write = write
        self.mmu_seq = 0
        self.slot = None
        self.delta = 0
        self.max_level = 3          # PG_LEVEL_1G
        self.map_writable = True
        self.level = 1              # PG_LEVEL_4K
        self.ret = ""
        self.errno = 0
        self.memory_fault = None
        self.nfaults = 1
        self.host_level = 1
        self.single = limit <= gfn + 1
        self.order = 0
        self.attr = 0


@cython.final
@cython.freelist(8)
cdef class FaultResult:
    """Outcome of ``Vcpu.page_fault`` (immutable, hashable, compared by value).

    ``ret`` is ``"fixed"``, ``"retry"``, ``"spurious"``, ``"emulate"`` or ``"exit"`` (a
    negative return from ``KVM_RUN``: ``errno`` says which; ``exit_reason`` is
    ``KVM_EXIT_MEMORY_FAULT`` when ``memory_fault = (gpa, size, flags)`` was filled in).
    ``level``/``pfn`` describe the installed (or already present) leaf. ``"rmp_loop"`` /
    ``"retry_loop"``: a step the kernel retries until another thread acts gave up after
    ``retries`` attempts (``pkvm.constants.RETRY_LIMIT``); ``loop`` names the step.
    """

    cdef readonly object errno "pkvm_errno"
    cdef readonly object ret, level, pfn, exit_reason, memory_fault, retries, loop

    __match_args__ = ("ret", "level", "pfn", "exit_reason", "memory_fault", "errno", "retries", "loop")

    def __init__(self, ret, level=None, pfn=None, exit_reason=None, memory_fault=None, errno=None,
                 retries=0, loop=None):
        self.ret = ret
        self.level = level
        self.pfn = pfn
        self.exit_reason = exit_reason
        self.memory_fault = memory_fault
        self.errno = errno
        self.retries = retries
        self.loop = loop

    cdef tuple _fields(self):
        return (self.ret, self.level, self.pfn, self.exit_reason, self.memory_fault, self.errno,
                self.retries, self.loop)

    def __eq__(self, other):
        if type(other) is not FaultResult:
            return NotImplemented
        return self._fields() == (<FaultResult>other)._fields()

    def __ne__(self, other):
        if type(other) is not FaultResult:
            return NotImplemented
        return self._fields() != (<FaultResult>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return ("FaultResult(ret=%r, level=%r, pfn=%r, exit_reason=%r, memory_fault=%r, errno=%r, "
                "retries=%r, loop=%r)" % self._fields())

    def __reduce__(self):
        return (FaultResult, self._fields())
