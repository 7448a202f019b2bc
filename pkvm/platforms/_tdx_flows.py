"""The TDX actors' flows: the Linux TD guest (``arch/x86/coco/tdx``) and QEMU's TD build.

:class:`TdxGuestFlows` (for :class:`pkvm.Guest`):

* ``convert`` is ``tdx_enc_status_changed``: ``tdx_map_gpa`` (MapGPA; on RETRY resume at r11
  when it lies in the range, at most 3 retries without progress), then for to-private
  ``tdx_accept_memory``;
* ``accept`` is ``tdx_accept_memory`` (lazy acceptance, no MapGPA: the memory is already
  private): per position, ``try_accept_one`` at 1G, then 2M, then 4K, each only when the
  position is aligned and that much is left. Runs of pages in one S-EPT state go through
  ``TdxVcpu._accept_bulk`` (same counts as the instruction-by-instruction loop, O(1) per run).

:class:`TdxVmmFlows` (for :class:`pkvm.Vmm`): ``launch`` adds the image with
``KVM_TDX_INIT_MEM_REGION`` (measured regions with ``KVM_TDX_MEASURE_MEMORY_REGION``) and
finalizes the TD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm.kvm.exits import CONVERTED, ConversionResult, GuestOpResult, step_failed
from pkvm.constants import (
    KVM_TDX_MEASURE_MEMORY_REGION,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    TDVMCALL_STATUS_ALIGN_ERROR,
    TDVMCALL_STATUS_INVALID_OPERAND,
    TDVMCALL_STATUS_RETRY,
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED,
    TDX_SUCCESS,
)

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.actors.guest import Guest
    from pkvm.actors.vmm import Vmm

#: ``tdx_map_gpa``'s ``max_retries_per_page``.
MAP_GPA_MAX_RETRIES = 3
_LEVEL_SHIFT = (0, 0, 9, 18)
_TDVMCALL_NAMES = {
    TDVMCALL_STATUS_INVALID_OPERAND: "TDVMCALL_STATUS_INVALID_OPERAND",
    TDVMCALL_STATUS_ALIGN_ERROR: "TDVMCALL_STATUS_ALIGN_ERROR",
    TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED: "TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED",
}


class TdxGuestFlows:
    """The Linux TD guest's conversion and acceptance (see the module docstring)."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.td = guest.vm.tdx  # type: ignore[attr-defined]

    def convert(self, gpa: int, size: int, private: bool) -> ConversionResult:
        """``tdx_enc_status_changed``."""
        res = self.map_gpa(gpa, gpa + size, private)
        if res and private:
            return self.accept_memory(gpa, gpa + size)
        return res

    def accept(self, gpa: int, size: int, huge: bool = True) -> ConversionResult:
        """Lazy acceptance: ``tdx_accept_memory`` alone. The Linux TD guest always tries 1G,
        then 2M, then 4K (``try_accept_one``): it has no 4K-only mode, so ``huge=False`` is
        refused."""
        if not huge:
            raise ValueError("a TDX guest accepts with 1G -> 2M -> 4K attempts (try_accept_one); "
                             "4K-only acceptance is an SNP guest choice")
        return self.accept_memory(gpa, gpa + size)

    def map_gpa(self, start: int, end: int, enc: bool) -> ConversionResult:
        """``tdx_map_gpa``: MapGPA ``[start, end)``, with the shared bit set for to-shared."""
        if not enc:
            start |= self.td.shared_mask
            end |= self.td.shared_mask
        g = self.guest
        retries = 0
        r = GuestOpResult("done", TDVMCALL_STATUS_RETRY)
        while retries < MAP_GPA_MAX_RETRIES:
            r = g.execute(g.vcpu.map_gpa(start, end - start))
            if r.ret != "done":
                return step_failed("MapGPA", r, start, g.last_exit)  # the vCPU is stopped
            if r.status != TDVMCALL_STATUS_RETRY:
                if r.status == 0:
                    return CONVERTED
                return step_failed("MapGPA", r, start, g.last_exit, _TDVMCALL_NAMES.get(r.status or 0, ""))
            fail = r.value
            if fail is None or fail < start or fail >= end:
                # r11 comes from the untrusted VMM: sanity-check it
                return step_failed("MapGPA", r, start, None,
                                   f"RETRY with r11 {fail!r} outside [{start:#x}, {end:#x})")
            if fail == start:
                retries += 1  # a retry without forward progress
                continue
            start = fail
            retries = 0
        return step_failed("MapGPA", r, start, None,
                           f"RETRY {MAP_GPA_MAX_RETRIES} times without progress")

    def accept_memory(self, start: int, end: int) -> ConversionResult:
        """``tdx_accept_memory``: accept ``[start, end)`` (bytes, alias-free)."""
        vcpu = self.guest.vcpu
        end_gfn = end >> PAGE_SHIFT
        pos = start
        while pos < end:
            n = vcpu._accept_bulk(pos >> PAGE_SHIFT, end_gfn)  # type: ignore[attr-defined]
            if n:
                pos += n << PAGE_SHIFT
                continue
            last: GuestOpResult | None = None
            for level in (PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K):
                size, r = self._try_accept_one(pos, end - pos, level)
                if r is not None and r.ret != "done":
                    # the vCPU is stuck in an exit the VMM could not answer
                    return step_failed("TDG.MEM.PAGE.ACCEPT", r, pos, self.guest.last_exit)
                last = r if r is not None else last
                if size:
                    break
            if not size:
                # every size failed: the last (smallest) attempt's status
                r = last if last is not None else GuestOpResult("done", 0)
                return step_failed("TDG.MEM.PAGE.ACCEPT", r, pos, None, "no page size was accepted")
            pos += size
        return CONVERTED

    def _try_accept_one(self, start: int, length: int, level: int) -> tuple[int, GuestOpResult | None]:
        """``try_accept_one``: one ``TDG.MEM.PAGE.ACCEPT``; the bytes accepted (0 if it failed
        or was not tried: misaligned or too little left) and the instruction's result (None if
        not tried)."""
        size = 1 << (PAGE_SHIFT + _LEVEL_SHIFT[level])
        if start & (size - 1) or length < size:
            return 0, None
        g = self.guest
        r = g.execute(g.vcpu.accept(start, level))
        if r.ret != "done":
            return 0, r
        return (size if r.status == TDX_SUCCESS else 0), r


class TdxVmmFlows:
    """QEMU's TD launch (``tdx_finalize_vm`` and the ``KVM_TDX_INIT_MEM_REGION`` calls before)."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def launch(self, image: list[tuple[int, int, bool]]) -> None:
        """Add every ``(gpa, size, measure)`` region of the image, then finalize the TD."""
        vm = self.vmm.vm
        vcpu = vm.vcpus[0]
        for gpa, size, measure in image:
            vm.tdx.init_mem_region(vcpu, gpa, size >> PAGE_SHIFT,  # type: ignore[attr-defined]
                                   flags=KVM_TDX_MEASURE_MEMORY_REGION if measure else 0)
        vm.tdx.finalize_vm()  # type: ignore[attr-defined]
