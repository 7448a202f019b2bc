# The per-run objects of the guest's exits in the typed core (issue 16): ``Hypercall`` (the
# exit's ``run->hypercall``), ``GuestOpResult`` (what a guest instruction run through KVM
# returns) and ``ExitResult`` (how the VMM answered an exit). Included from _core.pyx;
# pkvm.kvm.exits re-exports them. Built as
# extension types so that creating one costs one C allocation instead of a dataclass
# ``__init__`` (a frozen dataclass pays an ``object.__setattr__`` call per field). They keep
# the dataclasses' fields, order, defaults, equality, hashing, repr, pattern matching and
# pickling; ``ExitResult.detail`` may be built only when it is first read.

@cython.final
@cython.freelist(8)
cdef class Hypercall:
    """``run->hypercall``: what KVM forwards to userspace on ``KVM_EXIT_HYPERCALL``.

    ``args`` are ``args[0..2]`` (for ``KVM_HC_MAP_GPA_RANGE``: gpa without any shared bit,
    number of 4K pages, ``KVM_MAP_GPA_RANGE_*`` attributes). KVM pre-zeroes ``ret``;
    userspace writes its result there before the next ``KVM_RUN`` (0 = success). Compared by
    value and unhashable (it is written to).
    """

    cdef public object nr, args, ret, flags

    __match_args__ = ("nr", "args", "ret", "flags")

    def __init__(self, nr, args, ret=0, flags=0):
        self.nr = nr
        self.args = args
        self.ret = ret
        self.flags = flags

    @property
    def gpa(self):
        """``args[0]``."""
        return self.args[0]

    @property
    def size(self):
        """``args[1]`` pages, in bytes."""
        return self.args[1] << 12

    cdef tuple _fields(self):
        return (self.nr, self.args, self.ret, self.flags)

    def __eq__(self, other):
        if type(other) is not Hypercall:
            return NotImplemented
        return self._fields() == (<Hypercall>other)._fields()

    def __ne__(self, other):
        if type(other) is not Hypercall:
            return NotImplemented
        return self._fields() != (<Hypercall>other)._fields()

    __hash__ = None  # mutable, as the dataclass (eq=True, frozen=False) was

    def __repr__(self):
        return "Hypercall(nr=%r, args=%r, ret=%r, flags=%r)" % self._fields()

    def __reduce__(self):
        return (Hypercall, self._fields())



@cython.final
@cython.freelist(8)
cdef class GuestOpResult:
    """Outcome of a guest instruction run through KVM.

    ``ret`` is ``"done"`` (the instruction completed; ``status`` is what the guest reads:
    TDVMCALL r10, TDCALL rax, hypercall rax, all as u64) or ``"exit"`` (``KVM_RUN`` returned
    to userspace: ``exit_reason`` with ``hypercall`` or ``memory_fault`` set, or a negative
    return with ``errno`` and no exit reason). ``value`` is a second output register (TDX r11:
    the gpa to resume or that failed). ``faults`` counts the EPT violations / NPFs the
    instruction took before this result. ``"rmp_loop"`` / ``"retry_loop"``: a step the kernel
    retries gave up after ``retries`` attempts (``pkvm.constants.RETRY_LIMIT``), ``loop`` names
    it and ``value`` holds the gpa it stopped at. Compared by value and unhashable; treat it as
    read-only (it is not frozen only because a result is built for every MapGPA chunk).
    """

    cdef public object errno "pkvm_errno"
    cdef public object ret, status, value, exit_reason, hypercall, memory_fault, faults
    cdef public object retries, loop

    __match_args__ = ("ret", "status", "value", "exit_reason", "hypercall", "memory_fault",
                      "errno", "faults", "retries", "loop")

    def __init__(self, ret, status=None, value=None, exit_reason=None, hypercall=None,
                 memory_fault=None, errno=None, faults=0, retries=0, loop=None):
        self.ret = ret
        self.status = status
        self.value = value
        self.exit_reason = exit_reason
        self.hypercall = hypercall
        self.memory_fault = memory_fault
        self.errno = errno
        self.faults = faults
        self.retries = retries
        self.loop = loop

    cdef tuple _fields(self):
        return (self.ret, self.status, self.value, self.exit_reason, self.hypercall,
                self.memory_fault, self.errno, self.faults, self.retries, self.loop)

    def __eq__(self, other):
        if type(other) is not GuestOpResult:
            return NotImplemented
        return self._fields() == (<GuestOpResult>other)._fields()

    def __ne__(self, other):
        if type(other) is not GuestOpResult:
            return NotImplemented
        return self._fields() != (<GuestOpResult>other)._fields()

    __hash__ = None  # mutable, as the dataclass (eq=True, frozen=False) was

    def __repr__(self):
        return ("GuestOpResult(ret=%r, status=%r, value=%r, exit_reason=%r, hypercall=%r, "
                "memory_fault=%r, errno=%r, faults=%r, retries=%r, loop=%r)" % self._fields())

    def __reduce__(self):
        return (GuestOpResult, self._fields())


@cython.final
@cython.freelist(8)
cdef class ExitResult:
    """How the VMM answered one exit (:meth:`pkvm.Vmm.handle_exit`); truthy iff the vCPU may
    run on.

    ``step`` names the exit handled (``"KVM_HC_MAP_GPA_RANGE"``, ``"KVM_EXIT_MEMORY_FAULT"``,
    ``"KVM_EXIT_HYPERCALL"`` for another hypercall, ``"exit"`` for anything else). ``errno``
    is 0, or the positive errno of what failed: the conversion (``kvm_convert_memory``), or the
    exit's own errno for a memory fault the VMM cannot handle. A failed conversion for a
    ``KVM_HC_MAP_GPA_RANGE`` exit still resumes the vCPU (``handled``): the guest reads
    ``-errno`` in ``hypercall.ret``. ``detail`` says what happened in one line. Immutable,
    hashable, compared by value.
    """

    cdef readonly object errno "pkvm_errno"
    cdef readonly object handled, step, exit_reason
    cdef object _detail   # the line, once built
    cdef object _why      # None, or a callable building the line from _args (the VMM's answers)
    cdef tuple _args

    __match_args__ = ("handled", "step", "exit_reason", "errno", "detail")

    def __init__(self, handled, step, exit_reason=None, errno=0, detail=""):
        self.handled = handled
        self.step = step
        self.exit_reason = exit_reason
        self.errno = errno
        self._detail = detail

    @staticmethod
    def _lazy(handled, step, exit_reason, errno, why, tuple args):
        """The answer whose ``detail`` is ``why(*args)``, built when first read (``why``
        must be a pure function of ``args``)."""
        cdef ExitResult r = ExitResult.__new__(ExitResult)
        r.handled = handled
        r.step = step
        r.exit_reason = exit_reason
        r.errno = errno
        r._why = why
        r._args = args
        return r

    @property
    def detail(self):
        if self._why is not None:
            self._detail = self._why(*self._args)
            self._why = None
            self._args = None
        return self._detail

    cdef tuple _fields(self):
        return (self.handled, self.step, self.exit_reason, self.errno, self.detail)

    def __bool__(self):
        return bool(self.handled)

    def __eq__(self, other):
        if type(other) is not ExitResult:
            return NotImplemented
        return self._fields() == (<ExitResult>other)._fields()

    def __ne__(self, other):
        if type(other) is not ExitResult:
            return NotImplemented
        return self._fields() != (<ExitResult>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return "ExitResult(handled=%r, step=%r, exit_reason=%r, errno=%r, detail=%r)" % self._fields()

    def __reduce__(self):
        return (ExitResult, self._fields())


@cython.final
@cython.freelist(8)
cdef class AccessResult:
    """Outcome of ``Vcpu.access``: ``pages_done`` pages completed, ``faults`` faults taken.

    ``ret`` is ``"done"`` when every page was accessed, else the ``ret`` of the fault that
    stopped the walk (``"exit"`` or ``"emulate"``), whose exit fields are copied here, or
    ``"rmp_loop"`` / ``"retry_loop"`` when the page at ``gpa + pages_done * 4K`` kept faulting
    without progress: ``retries`` attempts (at most ``pkvm.constants.RETRY_LIMIT``), ``loop``
    naming the step the kernel would keep retrying. Immutable, hashable, compared by value
    (``pkvm.kvm.mmu`` re-exports it; it replaced a frozen dataclass with these fields).
    """

    cdef readonly object errno "pkvm_errno"
    cdef readonly object ret, pages_done, faults, level, pfn, exit_reason, memory_fault, retries, loop

    __match_args__ = ("ret", "pages_done", "faults", "level", "pfn", "exit_reason", "memory_fault",
                      "errno", "retries", "loop")

    def __init__(self, ret, pages_done, faults, level=None, pfn=None, exit_reason=None,
                 memory_fault=None, errno=None, retries=0, loop=None):
        self.ret = ret
        self.pages_done = pages_done
        self.faults = faults
        self.level = level
        self.pfn = pfn
        self.exit_reason = exit_reason
        self.memory_fault = memory_fault
        self.errno = errno
        self.retries = retries
        self.loop = loop

    cdef tuple _fields(self):
        return (self.ret, self.pages_done, self.faults, self.level, self.pfn, self.exit_reason,
                self.memory_fault, self.errno, self.retries, self.loop)

    def __eq__(self, other):
        if type(other) is not AccessResult:
            return NotImplemented
        return self._fields() == (<AccessResult>other)._fields()

    def __ne__(self, other):
        if type(other) is not AccessResult:
            return NotImplemented
        return self._fields() != (<AccessResult>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return ("AccessResult(ret=%r, pages_done=%r, faults=%r, level=%r, pfn=%r, exit_reason=%r, "
                "memory_fault=%r, errno=%r, retries=%r, loop=%r)" % self._fields())

    def __reduce__(self):
        return (AccessResult, self._fields())


# -- the entry of a guest instruction and the hypercall exit (pkvm.kvm.exits) -------------------
#
# Every guest instruction of the platforms' vCPUs begins with begin_insn, and every hypercall
# forwarded to userspace (KVM_HC_MAP_GPA_RANGE: SNP's page-state changes, TDX's MapGPA) stops
# in hypercall_exit: in C, so the PVALIDATE walk and the page-state change's runs
# (pkvm/_snp_guest.pxi) call them without a Python frame. pkvm.kvm.exits exports them.

cdef int _EBUSY = 16                 # errno.EBUSY
cdef int _KVM_EXIT_HYPERCALL = 3     # pkvm.constants.KVM_EXIT_HYPERCALL


def begin_insn(vcpu):
    """Entry of a guest instruction: the VM must be alive and no exit may be pending.

    Raises:
        KvmError: EIO if the VM is dead; EBUSY if ``vcpu`` is stopped in an exit."""
    _begin_insn(vcpu)


cdef int _begin_insn(vcpu) except -1:
    vm = vcpu.vm
    if vm.vm_dead or vm._in_callback:
        vm._check_alive()  # raises EIO, or EDEADLK from an event callback of the VM
    if vcpu._resume is not None:
        from pkvm.errors import KvmError
        raise KvmError(_EBUSY, f"vCPU {vcpu.id} is stopped in an exit to userspace: answer it and "
                       "call vcpu.run() before the guest can execute another instruction")
    return 0


def hypercall_exit(vcpu, hc, complete, faults=0):
    """Stop ``vcpu`` in a ``KVM_EXIT_HYPERCALL`` carrying ``hc``; ``complete`` runs at the next
    ``KVM_RUN`` (``complete_userspace_io``). Counts the exit; the caller charges it (the cost
    of an exit depends on the instruction: ``userspace_exit``, or TDX's ``map_gpa``). Records
    ``hc.flags`` as what the vCPU's ``run->hypercall.flags`` now holds (``Vcpu._hc_flags``)."""
    return _hypercall_exit(vcpu, hc, complete, faults)


cdef object _hypercall_exit(vcpu, hc, complete, faults):
    vm = vcpu.vm
    _stat_add(vm._stats, "hypercall_exits", 1)
    vcpu._hc_flags = hc.flags  # what kvm_run now holds (Vcpu._hc_flags)
    if vm._subs is not None:
        vm._emit("userspace_exit", None, None, None, 1, 0, _KVM_EXIT_HYPERCALL, (_KVM_EXIT_HYPERCALL, 0))
    vcpu._resume = complete
    return GuestOpResult("exit", None, None, _KVM_EXIT_HYPERCALL, hc, None, None, faults)
