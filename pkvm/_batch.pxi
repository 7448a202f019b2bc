# ---------------------------------------------------------------------------------------------
# Batched calls: the per-element loop of VM.set_memory_attributes_many (Vcpu.page_fault_many's is
# FaultPath.calls, pkvm/_fault.pxi)
# (included at the end of _core.pyx; the public methods and their validation are pkvm.kvm.batch)
# ---------------------------------------------------------------------------------------------
#
# The arrays arrive validated and converted once (contiguous uint64 / uint8). Each loop reads
# them as typed memoryviews, so an element costs no Python object until the call that needs one:
# the attribute loop makes the ioctl's argument checks in C (a refused call boxes nothing), and
# only the calls that pass them box their gfn range to call the model's per-call entry point.
# The core knows nothing of the KVM model: the VM, the entry points and the error class come in
# as arguments.

from libc.errno cimport EINVAL, EIO
from libc.stdint cimport int32_t, uint8_t


@cython.boundscheck(False)
def _attr_calls(const uint64_t[::1] gpas, const uint64_t[::1] sizes, const uint64_t[::1] attrs,
                uint64_t flags, uint64_t supported, object vm, object body, object error,
                int32_t[::1] out):
    """Run ``KVM_SET_MEMORY_ATTRIBUTES`` once per element, in order; ``out[i]`` gets the errno
    of call ``i`` (0: it succeeded). ``attrs`` holds one value per call, or one value for all.

    Per call, in the ioctl's order: ``vm.vm_dead`` gives EIO (and every later call too: a dead
    VM stays dead); ``flags``, attribute bits outside ``supported``, an empty range, a range
    that wraps past 2**64 and an unaligned address or size give EINVAL; otherwise
    ``body(start_gfn, end_gfn, attributes)`` runs the ioctl (the VM's :class:`AttrPath` is
    called as ``checked`` in C, with no Python call per element), and an ``error`` it raises
    gives that error's ``errno``. Any other exception propagates (the calls before it have
    run)."""
    cdef Py_ssize_t i, n = gpas.shape[0]
    cdef Py_ssize_t step = 0 if attrs.shape[0] == 1 and n != 1 else 1
    cdef uint64_t a, s, at
    cdef uint64_t bad_attrs = ~supported
    cdef AttrPath path = body if type(body) is AttrPath else None
    cdef VmState vs = path.vs if path is not None and path.vm is vm else None  # vm_dead in C
    if sizes.shape[0] != n or out.shape[0] != n or (step and attrs.shape[0] != n):
        raise ValueError("_attr_calls: the arrays' lengths differ")
    for i in range(n):
        if (vs.vm_dead if vs is not None else vm.vm_dead):
            out[i:] = EIO
            return
        a = gpas[i]
        s = sizes[i]
        at = attrs[i * step]
        if flags or at & bad_attrs or s == 0 or s > U64_MAX - a or (a | s) & 0xFFF:
            out[i] = EINVAL
            continue
        try:
            if path is not None:
                path._checked(a >> 12, (a + s) >> 12, at)
            else:
                body(a >> 12, (a + s) >> 12, at)
        except error as e:
            out[i] = e.errno
        else:
            out[i] = 0
