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

from pkvm.actors._steps import MAX_BACKOFF, MIN_STEPS, StepReplay, convert_silently, replayable, uniform_end
from pkvm.kvm.exits import CONVERTED, ConversionResult, GuestOpResult, step_failed
from pkvm.platforms._tdx_vcpu import TDX_MAP_GPA_MAX_LEN
from pkvm.constants import (
    KVM_MAP_GPA_RANGE_ENCRYPTED,
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
_CHUNK_PAGES = TDX_MAP_GPA_MAX_LEN >> PAGE_SHIFT
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
        #: Answer a stretch of MapGPA chunks that repeat one step as one range operation
        #: (:class:`_MapGpaReplay`); False answers every chunk's exit on its own (the
        #: reference the tests compare against). Same exits, counters and modeled time.
        self.compress_exits = True

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
            replay = _MapGpaReplay(g) if self.compress_exits else None
            try:
                r = g.execute(g.vcpu.map_gpa(start, end - start), replay)
            finally:
                if replay is not None:
                    replay.replay.end()
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


class _MapGpaReplay:
    """The ``replay`` hook of one MapGPA's :meth:`pkvm.Guest.execute` (``pkvm.actors._steps``).

    KVM forwards a MapGPA in ``TDX_MAP_GPA_MAX_LEN`` chunks, one ``KVM_HC_MAP_GPA_RANGE`` exit
    each (``tdx_map_gpa``; ``tdx_complete_vmcall_map_gpa`` sends the next). On a stretch of
    whole chunks whose conversions are the same step (``uniform_end``), the first two (or
    three, where the steps grow) are answered as usual and recorded; if they agree
    (``StepReplay.ready``), the chunks after them up to the stretch's
    last are converted as one range with their accounting, and the vCPU is left in the exit
    of the last chunk, which is answered as usual."""

    __slots__ = ("guest", "replay", "plan", "plan_gpa", "tried", "misses")

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.replay = StepReplay(guest.vm, guest.vmm)
        self.plan = 0  # chunks in the stretch being recorded (0: none)
        self.plan_gpa = 0
        self.tried = 0  # no stretch is looked for below this gpa again
        self.misses = 0  # stretches looked for in vain in a row

    def _eligible(self) -> bool:
        vcpu = self.guest.vcpu
        td = self.guest.vm.tdx  # type: ignore[attr-defined]
        return (not vcpu.pending_interrupts and td.seamcalls.trace is None  # type: ignore[attr-defined]
                and not td.seamcalls._busy and replayable(self.guest.vm))

    def _sept_end(self, start: int, end: int) -> int:
        x = self.guest.vm.tdx.sept.leaves.find_ne(start, end, 0)  # type: ignore[attr-defined]
        return end if x == -1 else x

    def __call__(self, r: GuestOpResult) -> GuestOpResult:
        hc = r.hypercall
        vcpu = self.guest.vcpu
        if hc is None:
            return r
        gpa = vcpu.map_gpa_next  # type: ignore[attr-defined]
        if not self.plan:
            left = (vcpu.map_gpa_end - gpa) // TDX_MAP_GPA_MAX_LEN  # type: ignore[attr-defined]
            if left < MIN_STEPS or gpa < self.tried or not self._eligible():
                return r
            g = self.guest
            gfn = hc.gpa >> PAGE_SHIFT
            private = bool(hc.args[2] & KVM_MAP_GPA_RANGE_ENCRYPTED)
            ue = uniform_end(g.vm, g.vmm, gfn, gfn + left * _CHUNK_PAGES, private, _CHUNK_PAGES,
                             self._sept_end)
            n = (ue - gfn) // _CHUNK_PAGES
            if n < MIN_STEPS:
                # Not here: look again past this stretch, and after ever more chunks (at most
                # MAX_BACKOFF) while none is found, so non-uniform memory pays little for it.
                self.tried = gpa + max(n, min(1 << self.misses, MAX_BACKOFF)) * TDX_MAP_GPA_MAX_LEN
                self.misses += 1
                return r
            self.misses = 0
            self.tried = gpa + n * TDX_MAP_GPA_MAX_LEN
            self.plan, self.plan_gpa = n, gpa
            self.replay.begin()
        marks = self.replay.mark()
        if marks < 3:
            return r
        verdict = self.replay.ready()
        if verdict is None:
            return r  # the steps differ: one more chunk is recorded
        n = self.plan
        self.plan = 0
        if not verdict or not self._eligible():
            self.replay.end()
            return r
        k = n - marks  # chunks marks - 1 .. n - 2; the last one is answered as usual
        gfn = hc.gpa >> PAGE_SHIFT
        private = bool(hc.args[2] & KVM_MAP_GPA_RANGE_ENCRYPTED)
        last = self.plan_gpa + (n - 1) * TDX_MAP_GPA_MAX_LEN

        def silent() -> GuestOpResult:
            convert_silently(self.guest.vmm, gfn, k * _CHUNK_PAGES, private)
            vcpu.map_gpa_next = last  # type: ignore[attr-defined]
            vcpu._resume = None  # the completions of chunks 2 .. n - 2 ran
            return vcpu._map_gpa_exit(first=False)  # type: ignore[attr-defined,no-any-return]

        return self.replay.skip(k, silent)  # type: ignore[no-any-return]


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
