"""``KVM_PRE_FAULT_MEMORY``: map guest memory ahead of the guest's accesses (docs/kvm-model.md).

``kvm_vcpu_pre_fault_memory`` (virt/kvm/kvm_main.c) checks the range (page aligned, non-empty,
not wrapping: else ``-EINVAL``) and calls ``kvm_arch_vcpu_pre_fault_memory``
(arch/x86/kvm/mmu/mmu.c) until the range is done or a call fails. That refuses with
``-EOPNOTSUPP`` until ``kvm->arch.pre_fault_allowed`` (set at VM creation for VMs without
protected state, by ``snp_launch_finish`` for SNP and by the TD's finalization for TDX), then
with ``-EINVAL`` for a TD's gpa that has the shared bit (``kvm_is_gfn_alias``: only the
alias-free half can be pre-faulted; a range that runs into it keeps the pages before), takes
the fault's type from the gfn's attribute, and maps the page with ``kvm_tdp_map_page``: a
*prefetch* fault that retries ``RET_PF_RETRY`` until a signal (``-EINTR``), turns
``RET_PF_EMULATE`` (no memslot) into ``-ENOENT``, and counts ``pf_fixed`` but not
``pf_taken``. A memslot being deleted or moved (``KVM_MEMSLOT_INVALID``) made the fault retry
until 6.17, so the pre-fault spun until a signal (``-EINTR``: the deletion waits for the SRCU
read side the ioctl holds); since 6.18 ``kvm_mmu_faultin_pfn`` fails a prefetch fault on such
a slot with ``-EAGAIN`` (``Policy.pre_fault_invalid_slot``). Nothing exits to userspace: an error is the ioctl's return value. The ioctl
returns 0 with the range advanced past the pages done, or the error when the first page
failed; pkvm returns the bytes done or raises.

Private pages come from guest_memfd and are prepared as a fault prepares them (SNP: the RMP
entry is assigned but not validated, so the guest still PVALIDATEs, without an #NPF).
Cost: ``pre_fault_page`` per page mapped (a fault without the world switch), plus the folio
allocation and preparation the fault path charges anyway; a fault that maps nothing (spurious,
retried, or failed as ``-ENOENT`` / ``-EFAULT`` / ``-EAGAIN`` / ``-EINTR``) costs one ``pre_fault_page``
too, since the kernel walked the fault path for it: a failed call keeps that time.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm.constants import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT, RETRY_LIMIT
from pkvm.errors import KvmError
from pkvm.kvm.mmu import run_fault

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import Vcpu

_U64_MAX = (1 << 64) - 1


def pre_fault_allowed(vcpu: Vcpu) -> bool:
    """``kvm->arch.pre_fault_allowed``: SNP after LAUNCH_FINISH, TDX once finalized, else True."""
    vm = vcpu.vm
    snp = getattr(vm, "snp", None)
    if snp is not None:
        return bool(snp.launched)
    tdx = getattr(vm, "tdx", None)
    if tdx is not None:
        return bool(tdx.runnable)
    return True


def pre_fault_memory(vcpu: Vcpu, gpa: int, size: int) -> int:
    """``KVM_PRE_FAULT_MEMORY`` on ``[gpa, gpa + size)`` (module docstring); bytes mapped."""
    vm = vcpu.vm
    for name, value in (("gpa", gpa), ("size", size)):
        if type(value) is not int:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"{name}={value:#x} does not fit a u64")
    vm._check_alive()
    if not vm.policy.pre_fault_memory:
        # Before 6.11 the ioctl number is unknown: kvm_vcpu_ioctl passes it to
        # kvm_arch_vcpu_ioctl, whose default answer is EINVAL, before anything is read.
        raise KvmError(errno.EINVAL, "KVM_PRE_FAULT_MEMORY: this kernel does not have the ioctl "
                       "(Linux 6.11+; Policy.pre_fault_memory is False)")
    if (gpa | size) & ((1 << PAGE_SHIFT) - 1) or not size or gpa + size > _U64_MAX:
        raise KvmError(errno.EINVAL, f"KVM_PRE_FAULT_MEMORY: [{gpa:#x}, +{size:#x}) must be a non-empty, "
                       "4 KiB aligned range that does not wrap")
    if not pre_fault_allowed(vcpu):
        raise KvmError(errno.EOPNOTSUPP, "KVM_PRE_FAULT_MEMORY before the guest is launched "
                       "(SNP: SNP_LAUNCH_FINISH; TDX: KVM_TDX_FINALIZE_VM)")
    gfn, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
    has_private = vm.platform.has_private_mem
    # kvm_is_gfn_alias: a TD's gfns with the shared bit (kvm_gfn_direct_bits) are refused.
    tdx = getattr(vm, "tdx", None)
    alias = tdx.shared_mask >> PAGE_SHIFT if tdx is not None else 0
    start = gfn
    err = 0
    while gfn < end:
        if gfn & alias:
            err = errno.EINVAL
            break
        _s, a_end, attr = vm._attrs.run_at(gfn)
        private = bool(has_private and attr & KVM_MEMORY_ATTRIBUTE_PRIVATE)
        limit = min(end, a_end)
        if alias and limit > alias:
            limit = max(gfn + 1, min(limit, (gfn | (alias - 1)) + 1))
        attempts = 0
        while attempts < RETRY_LIMIT:  # kvm_tdp_map_page: RET_PF_RETRY until a signal
            attempts += 1
            f, r = run_fault(vcpu, gfn, limit, private, False, prefetch=True)
            if r.ret != "retry":
                break
            if vm._sched is not None and vm._sched.retry_fault(gfn, prefetch=True):
                attempts -= 1  # another thread's invalidation, waited out on the timeline
        else:
            err = errno.EINTR
            break
        if r.ret in ("fixed", "spurious"):
            # The mapping may be huge: the call covers up to its end (clipped to the range).
            n = f.end - gfn if r.ret == "fixed" else 1
            if r.level is not None and r.level > 1:
                span = 1 << (9 * (r.level - 1))
                n = max(n, ((gfn & ~(span - 1)) + span) - gfn)
            gfn = min(end, gfn + n)
            continue
        err = r.errno or errno.EFAULT
        if vm.vm_dead:
            err = errno.EIO
        break
    if err and gfn == start:
        why = {errno.EAGAIN: " (its memslot is being deleted or moved: retry once that is done)",
               errno.EINTR: " (the fault kept retrying until a signal)"}.get(err, "")
        raise KvmError(err, f"KVM_PRE_FAULT_MEMORY at gpa {gfn << PAGE_SHIFT:#x}: "
                       f"{errno.errorcode.get(err, err)}{why}")
    return (gfn - start) << PAGE_SHIFT
