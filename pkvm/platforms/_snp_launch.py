"""SNP launch: ``KVM_SEV_SNP_LAUNCH_UPDATE`` / ``LAUNCH_FINISH`` and the VMM's launch flow
(docs/kernel-semantics.md §5.9).

:func:`launch_update` (``snp_launch_update`` + ``kvm_gmem_populate`` + ``sev_gmem_post_populate``):

1. ``len`` 4K aligned (and the gpa), ``flags == 0``, ``type`` one of NORMAL, ZERO, UNMEASURED,
   SECRETS, CPUID, and LAUNCH_FINISH not yet done; else ``-EINVAL``. From 6.18 also ``len``
   nonzero (``Policy.snp_launch_zero_len="einval"``); before, a zero ``len`` passes, and after
   the memslot checks of step 2 the call returns 0 having done nothing (``kvm_gmem_populate``
   gets a count of 0: its test refused only a negative one).
2. The first gfn's memslot must be guest_memfd-backed (``-EINVAL``). The range is clipped to
   that memslot.
3. Folio by folio (allocated if missing, never prepared): ``-EEXIST`` if already prepared;
   every gfn must have the PRIVATE attribute (``-EINVAL``); every pfn must be unassigned in the
   RMP (``-EEXIST``); then ``rmp_make_private(4K, immutable=True)`` for each page (Pre-Guest)
   and the firmware's LAUNCH_UPDATE, which leaves the page Guest-Valid: validated and no
   longer immutable (pkvm models the firmware as never failing). The kernel relies on that:
   ``sev_gmem_post_populate`` returns the call's earlier, already launched pages with a plain
   ``rmp_make_shared`` and reclaims through the firmware only the page whose LAUNCH_UPDATE
   failed. The folio is marked prepared. A 2M folio is populated whole: one that is
   only partly inside the range stops the call (``-EINVAL``, pkvm's choice).
4. Partial progress: the call returns the bytes done when a later folio fails
   (``kvm_gmem_populate`` returns the count). If the first page fails, ``kvm_gmem_populate``
   returns its internal errno and ``snp_launch_update`` (arch/x86/kvm/svm/sev.c) reports
   ``-EIO`` to userspace with the firmware's error in ``struct kvm_sev_cmd.error`` (0 here:
   the firmware was never reached). pkvm raises ``KvmError(EIO)`` with ``.error`` (that field)
   and ``.populate_errno`` (the internal errno, for diagnostics).

:func:`launch_finish` sets ``launched`` (KVM's ``pre_fault_allowed``) and marks the vCPUs that
exist then as having protected state (``snp_launch_update_vmsa`` encrypts each one's VMSA and
sets its ``guest_state_protected``; KVM then takes their hypercalls as 64-bit); it changes no
RMP entry (pkvm does not model the VMSA pages, whose encryption ``snp_launch_finish`` issues
before the firmware's LAUNCH_FINISH).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm.constants import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT, PG_LEVEL_4K
from pkvm.errors import KvmError
from pkvm.kvm.gmem import FOLIO_PREPARED, gmem_get_folios
from pkvm.kvm.vm import _u64
from pkvm.platforms._snp_rmp import rmp_make_private
from pkvm.platforms._snp_vcpu import SnpVcpu

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.platforms.snp import SnpVm


#: ``KVM_SEV_SNP_PAGE_TYPE_*`` of ``SNP_LAUNCH_UPDATE`` (§5.9).
SNP_PAGE_TYPE_NORMAL = 1
SNP_PAGE_TYPE_ZERO = 3
SNP_PAGE_TYPE_UNMEASURED = 4
SNP_PAGE_TYPE_SECRETS = 5
SNP_PAGE_TYPE_CPUID = 6
_PAGE_TYPES = (SNP_PAGE_TYPE_NORMAL, SNP_PAGE_TYPE_ZERO, SNP_PAGE_TYPE_UNMEASURED,
               SNP_PAGE_TYPE_SECRETS, SNP_PAGE_TYPE_CPUID)


def launch_update(snp: SnpVm, gpa: int, size: int, page_type: int, flags: int) -> int:
    """Populate ``[gpa, gpa + size)``; returns the bytes done (module docstring).

    Raises:
        KvmError: EINVAL for bad parameters (``size`` 0 under ``snp_launch_zero_len="einval"``),
            after LAUNCH_FINISH, or a first gfn outside a guest_memfd memslot; EIO
            (``.error == 0``, ``.populate_errno`` the cause) when the first page cannot be
            populated; EIO if the VM is dead.
        TypeError / ValueError: an argument is not a u64 int.
    """
    vm = snp.vm
    vm._check_alive()
    gpa, size = _u64("gpa", gpa), _u64("size", size)
    page_type, flags = _u64("page_type", page_type), _u64("flags", flags)
    if snp.launched:
        raise KvmError(errno.EINVAL, "SNP_LAUNCH_UPDATE after SNP_LAUNCH_FINISH")
    if (gpa | size) & 0xFFF or flags or page_type not in _PAGE_TYPES or \
            (not size and vm.policy.snp_launch_zero_len == "einval"):
        raise KvmError(errno.EINVAL, f"SNP_LAUNCH_UPDATE: bad parameters gpa={gpa:#x} len={size:#x} "
                       f"type={page_type} flags={flags:#x}")
    gfn = gpa >> PAGE_SHIFT
    slot = vm._slot_at(gfn)
    if slot is None or slot.gmem is None:
        raise KvmError(errno.EINVAL, f"SNP_LAUNCH_UPDATE: gfn {gfn:#x} is not in a guest_memfd memslot")
    if slot.gmem_file is None:  # kvm_gmem_populate: kvm_gmem_get_file failed, -EFAULT
        raise _populate_failed(errno.EFAULT, gfn, "the guest_memfd was closed")
    if not size:  # before 6.18: kvm_gmem_populate populates no page and returns 0
        return 0
    end = min((gpa + size) >> PAGE_SHIFT, slot.end_gfn)
    gmem = slot.gmem
    off = slot.gmem_pgoff - slot.base_gfn
    rmp = snp.rmp
    done = 0
    err = 0
    g = gfn
    while g < end:
        idx = g + off
        try:
            pfn, order, prepared, iend = gmem_get_folios(vm, gmem, idx, end + off)
        except KvmError as exc:
            err = exc.errno
            break
        if order:
            size_f = 1 << order
            if idx & (size_f - 1) or idx + size_f > end + off:
                err = errno.EINVAL
                break
            iend = idx + size_f
        n = iend - idx
        if prepared:
            err = errno.EEXIST
            break
        bad = vm._attrs.find_ne(g, g + n, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        if bad != -1:
            n = bad - g
            err = errno.EINVAL
        busy = rmp.find_ne(pfn, n, assigned=False) if n else -1
        if busy != -1:
            n = busy - pfn
            err = errno.EEXIST
        if order and err:
            break
        if n:
            if rmp_make_private(vm, pfn, g, n, PG_LEVEL_4K, immutable=True):
                err = errno.EIO
                break
            rmp.firmware_update(pfn, n, immutable=False, validated=True)  # Pre-Guest -> Guest-Valid
            vm._charge("psp_launch_update", n)  # SEV_CMD_SNP_LAUNCH_UPDATE, one per 4K page
            v = gmem.folios.get(idx)
            gmem.folios.assign(idx, idx + n, v | FOLIO_PREPARED)
            vm._stats["launch_update_pages"] += n
            done += n
            g += n
        if err:
            break
    if err and not done:
        raise _populate_failed(err, g, "the first page could not be populated")
    return done << PAGE_SHIFT


def _populate_failed(err: int, gfn: int, why: str) -> KvmError:
    """``snp_launch_update`` when ``kvm_gmem_populate`` returned ``-err``: ``-EIO`` for
    userspace, ``argp->error`` = the firmware error (0: the firmware was not reached)."""
    exc = KvmError(errno.EIO, f"SNP_LAUNCH_UPDATE at gfn {gfn:#x}: {why} (kvm_gmem_populate: "
                   f"-{errno.errorcode.get(err, err)}; firmware error 0)")
    exc.error = 0  # type: ignore[attr-defined]
    exc.populate_errno = err  # type: ignore[attr-defined]
    return exc


def launch_finish(snp: SnpVm) -> None:
    """``KVM_SEV_SNP_LAUNCH_FINISH`` (module docstring).

    Raises:
        KvmError: EINVAL if already finished; EIO if the VM is dead.
    """
    snp.vm._check_alive()
    if snp.launched:
        raise KvmError(errno.EINVAL, "SNP_LAUNCH_FINISH: the guest is already launched")
    # snp_launch_update_vmsa: every vCPU that exists now gets guest_state_protected.
    for vcpu in snp.vm._vcpus:
        if isinstance(vcpu, SnpVcpu):
            vcpu._protected = True
    snp.launched = True


class SnpVmmFlows:
    """The VMM's SNP launch (QEMU's ``sev_snp_launch_finish`` / ``sev_snp_launch_update``,
    target/i386/sev.c): per image region, ``KVM_SET_MEMORY_ATTRIBUTES(PRIVATE)`` first (QEMU
    does it for every region, although ``kvm_set_phys_mem`` made the slot private already:
    the kernel then short-circuits it), then LAUNCH_UPDATE (looping on partial progress;
    ``measure`` selects NORMAL vs UNMEASURED pages); then LAUNCH_FINISH. A failure raises
    (QEMU exits). OVMF's metadata pages (ZERO, SECRETS, CPUID) are not modelled."""

    def __init__(self, vmm: object) -> None:
        self.vmm = vmm

    def launch(self, image: list[tuple[int, int, bool]]) -> None:
        vm = self.vmm.vm  # type: ignore[attr-defined]
        snp = vm.snp
        for gpa, size, measure in image:
            vm.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            while size:
                n = snp.launch_update(gpa, size, SNP_PAGE_TYPE_NORMAL if measure else SNP_PAGE_TYPE_UNMEASURED)
                gpa += n
                size -= n
        snp.launch_finish()
