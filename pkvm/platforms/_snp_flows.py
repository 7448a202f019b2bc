"""The Linux SNP guest's conversion and acceptance flows (kernel-semantics.md §7.1, §7.5; ``SnpGuestFlows``).

Plugged into :class:`pkvm.Guest` through ``PlatformOps.guest_flows``
(``arch/x86/coco/sev/core.c :: __set_pages_state, snp_accept_memory``):

* to shared: PVALIDATE rescind **first** (so the guest never has a validated page the host
  owns), then the page-state change;
* to private: page-state change **first**, then PVALIDATE (under the final design the
  PVALIDATE's own #NPF makes the page private in the RMP, §7.8);
* accept (lazy acceptance of memory that is already private): ``snp_accept_memory`` = a
  to-private page-state change + PVALIDATE;
* page-state changes use the GHCB protocol: a 2M entry for every 2M-aligned 2M block, 4K
  entries elsewhere, at most ``VMGEXIT_PSC_MAX_ENTRY`` (64) entries per request; on return the
  guest requires ``sw_exit_info_2 == 0`` (``vmgexit_psc``), else it would terminate
  (``GHCB_TERM_PSC``: the flow returns a failed :class:`pkvm.ConversionResult` of step
  ``"PSC"`` with that status), and ``cur_entry > end_entry`` (the Linux guest issues the
  VMGEXIT again while entries remain; KVM never answers 0 before the last one, so pkvm
  reports that case as a failure);
* the order of the Linux guest's ``__set_pages_state`` (request by request, 64 entries at a
  time: to private a request's PSC then its PVALIDATEs, to shared the reverse) when the
  conversion starts while another actor runs on the timeline (``_request_by_request``);
  **departure** otherwise: the PVALIDATEs of the whole range run before (to shared) or after
  (to private) all of its requests. Same PVALIDATEs, requests and exits, another order (what
  depends on the interleaving, e.g. a later request's zap of mappings an earlier request's
  PVALIDATEs faulted in, can differ; docs/snp.md);
* PVALIDATE at 2M for those 2M blocks, redone as 512 x 4K on ``FAIL_SIZEMISMATCH``.

Entries are generated lazily one request at a time, so memory does not grow with the range.
Each request is built as its runs of entries (at most three: 4K, 2M, 4K; :func:`psc_requests`)
and ``SnpVcpu._psc_runs`` walks them run by run, with the exits, counters, charges and events
``SnpVcpu.psc`` gives for the same entries (``snp_begin_psc`` makes one exit per run of
contiguous same-size entries either way); while a tracer is attached or another actor runs on
the timeline, the requests go entry by entry (docs/performance.md). A stretch of whole one-run
requests that repeat one step on fresh memory is answered as one range operation with every
request's exit and accounting (``pkvm.actors._steps``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from pkvm.actors._steps import MAX_BACKOFF, MIN_STEPS, StepReplay, convert_silently, replayable, uniform_end
from pkvm.constants import PAGE_SHIFT
from pkvm.kvm.exits import CONVERTED, ConversionResult, step_failed
from pkvm.platforms.snp_constants import (
    PVALIDATE_FAIL_INPUT,
    PVALIDATE_FAIL_NOUPDATE,
    PVALIDATE_FAIL_SIZEMISMATCH,
    RMP_PAGES_2M,
)
from pkvm.platforms._snp_vcpu import (
    SNP_PAGE_STATE_PRIVATE,
    SNP_PAGE_STATE_SHARED,
    VMGEXIT_PSC_ERROR_GENERIC,
    VMGEXIT_PSC_ERROR_INVALID_ENTRY,
    VMGEXIT_PSC_ERROR_INVALID_HDR,
    VMGEXIT_PSC_MAX_ENTRY,
    PscDesc,
    PscEntry,
)

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.actors.guest import Guest


def psc_segments(gfn: int, end: int, huge: bool = True) -> list[tuple[int, int, bool]]:
    """The entries :func:`psc_entries` yields for ``[gfn, end)``, as at most three runs
    ``(gfn, entries, huge)``: 4K entries up to the first 2M boundary, 2M entries, 4K entries."""
    a = (gfn + 511) & ~511
    if not huge or a + 512 > end:
        return [(gfn, end - gfn, False)] if end > gfn else []
    m = (end - a) >> 9
    tail = a + (m << 9)
    segs = [(gfn, a - gfn, False)] if a > gfn else []
    segs.append((a, m, True))
    if end > tail:
        segs.append((tail, end - tail, False))
    return segs


def psc_requests(gfn: int, end: int, huge: bool = True) -> Iterator[list[tuple[int, int, bool]]]:
    """The guest's PSC requests for ``[gfn, end)`` (``VMGEXIT_PSC_MAX_ENTRY`` entries each, the
    entries of :func:`psc_entries`), each as its runs ``(gfn, entries, huge)``. O(1) per
    request."""
    for runs, _same in psc_request_runs(gfn, end, huge):
        yield runs


def psc_request_runs(gfn: int, end: int, huge: bool = True) -> Iterator[tuple[list[tuple[int, int, bool]], int]]:
    """:func:`psc_requests`, each with the number of requests from it on (itself included)
    that are one full run of ``VMGEXIT_PSC_MAX_ENTRY`` contiguous entries of its size (1 for
    any other request): the requests the flows may answer as one range operation."""
    runs: list[tuple[int, int, bool]] = []
    room = VMGEXIT_PSC_MAX_ENTRY
    for g, n, big in psc_segments(gfn, end, huge):
        step = RMP_PAGES_2M if big else 1
        if room == VMGEXIT_PSC_MAX_ENTRY and n >= VMGEXIT_PSC_MAX_ENTRY:
            full = n // VMGEXIT_PSC_MAX_ENTRY
            for j in range(full):
                yield [(g, VMGEXIT_PSC_MAX_ENTRY, big)], full - j
                g += VMGEXIT_PSC_MAX_ENTRY * step
            n -= full * VMGEXIT_PSC_MAX_ENTRY
        while n:
            k = min(n, room)
            runs.append((g, k, big))
            g += k * step
            n -= k
            room -= k
            if not room:
                yield runs, 1
                runs, room = [], VMGEXIT_PSC_MAX_ENTRY
    if runs:
        yield runs, 1


def _request_entries(runs: list[tuple[int, int, bool]], op: int) -> list[PscEntry]:
    """The entries of a request given as its runs ``(gfn, entries, huge)`` (:func:`psc_requests`)."""
    return [PscEntry(rg + i * (RMP_PAGES_2M if big else 1), op, big) for rg, n, big in runs for i in range(n)]


def psc_entries(gfn: int, end: int, op: int, huge: bool = True) -> Iterator[PscEntry]:
    """The guest's PSC entries for ``[gfn, end)``: 2M where aligned (if ``huge``), 4K elsewhere."""
    while gfn < end:
        if huge and not gfn & 511 and gfn + 512 <= end:
            yield PscEntry(gfn, op, True)
            gfn += 512
        else:
            yield PscEntry(gfn, op, False)
            gfn += 1


#: Pages of the largest range that may be one request of 2M entries (head and tail 4K
#: entries aside): ranges up to this size are checked for the single-request path.
_ONE_REQUEST_2M = VMGEXIT_PSC_MAX_ENTRY * RMP_PAGES_2M + 2 * RMP_PAGES_2M
#: Bytes of the largest run of whole 2M blocks that is one request (64 2M entries).
_ONE_REQUEST_2M_BYTES = VMGEXIT_PSC_MAX_ENTRY << 21

_PVALIDATE_NAMES = {
    PVALIDATE_FAIL_INPUT: "FAIL_INPUT",
    PVALIDATE_FAIL_SIZEMISMATCH: "FAIL_SIZEMISMATCH",
    PVALIDATE_FAIL_NOUPDATE: "FAIL_NOUPDATE: the page was already in the requested state",
}
_PSC_NAMES = {
    VMGEXIT_PSC_ERROR_GENERIC: "VMGEXIT_PSC_ERROR_GENERIC",
    VMGEXIT_PSC_ERROR_INVALID_HDR: "VMGEXIT_PSC_ERROR_INVALID_HDR",
    VMGEXIT_PSC_ERROR_INVALID_ENTRY: "VMGEXIT_PSC_ERROR_INVALID_ENTRY",
}


class SnpGuestFlows:
    """``convert`` / ``accept`` of an SNP Linux guest (module docstring)."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        #: GHCB requests issued and 2M PVALIDATE fallbacks, for tests and benchmarks.
        self.requests = 0
        #: Issue each request as its runs of entries (``SnpVcpu._psc_runs``, the default) or,
        #: if False, entry by entry (``SnpVcpu.psc``; the reference the tests compare against).
        #: Both give the same requests, exits, counters and modeled time.
        self.compress = True
        #: Answer a stretch of requests that repeat one step as one range operation
        #: (``pkvm.actors._steps``); False answers every request's exit on its own (the
        #: reference the tests compare against). Same exits, counters and modeled time.
        self.compress_exits = True

    def convert(self, gpa: int, size: int, private: bool) -> ConversionResult:
        sched = self.guest.vm._sched
        if sched is not None and sched.contended():  # self._contended(), in line
            return self._request_by_request(gpa, size, private, True)
        # ``a and b`` on results, testing the shared success first (no __bool__ call then).
        if private:
            r = self.page_state_change(gpa, size, True)
            return self.pvalidate(gpa, size, True) if r is CONVERTED or r else r
        r = self.pvalidate(gpa, size, False)
        return self.page_state_change(gpa, size, False) if r is CONVERTED or r else r

    def accept(self, gpa: int, size: int, huge: bool = True) -> ConversionResult:
        g = self.guest
        vm = g.vm
        sched = vm._sched
        if sched is not None and sched.contended():  # self._contended(), in line
            return self._request_by_request(gpa, size, True, huge)
        if huge and self.compress and vm._subs is None and not (gpa | size) & 0x1FFFFF and 0 < size <= _ONE_REQUEST_2M_BYTES:
            # page_state_change(gpa, size, True, huge) of whole 2M blocks that make one request:
            # psc_segments gives the one run of 2M entries, which goes as _one_request (no other
            # actor runs: tested just above)
            r = self._one_request(g, [(gpa >> PAGE_SHIFT, size >> 21, True)], SNP_PAGE_STATE_PRIVATE)
            return self.pvalidate(gpa, size, True, huge) if r is CONVERTED else r
        r = self.page_state_change(gpa, size, True, huge)  # then PVALIDATE, as in convert
        return self.pvalidate(gpa, size, True, huge) if r is CONVERTED or r else r

    def _contended(self) -> bool:
        """Another actor runs on the VM's timeline now: the conversion goes request by request
        (:meth:`_request_by_request`), in the Linux guest's order."""
        sched = self.guest.vm._sched
        return sched is not None and sched.contended()

    def _request_by_request(self, gpa: int, size: int, private: bool, huge: bool) -> ConversionResult:
        """``__set_pages_state`` as the Linux guest orders it: for each request of at most
        ``VMGEXIT_PSC_MAX_ENTRY`` entries, to private its PSC then the PVALIDATEs of its
        pages, to shared the rescinding PVALIDATEs then its PSC, then the next request.

        Taken when the conversion starts while another actor runs on the timeline, where the
        order shows (what another vCPU meets between two requests, the locks the steps take).
        Alone, the flows keep the range-compressed order (the whole range's PSC requests, then
        its PVALIDATEs, or the reverse): the same instructions, requests and exits, answered
        in O(1) per stretch of requests (docs/snp.md)."""
        g = self.guest
        gfn, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
        op = SNP_PAGE_STATE_PRIVATE if private else SNP_PAGE_STATE_SHARED
        for runs in psc_requests(gfn, end, huge):
            lo = runs[0][0]
            g_last, n_last, big_last = runs[-1]
            hi = g_last + n_last * (RMP_PAGES_2M if big_last else 1)
            if not private:
                r = self.pvalidate(lo << PAGE_SHIFT, (hi - lo) << PAGE_SHIFT, False, huge)
                if not (r is CONVERTED or r):
                    return r
            r = self._request(g, _request_entries(runs, op))
            if not (r is CONVERTED or r):
                return r
            if private:
                r = self.pvalidate(lo << PAGE_SHIFT, (hi - lo) << PAGE_SHIFT, True, huge)
                if not (r is CONVERTED or r):
                    return r
        return CONVERTED

    def page_state_change(self, gpa: int, size: int, private: bool,
                          huge: bool = True) -> ConversionResult:
        """``set_pages_state`` via the GHCB protocol, 64 entries per request."""
        g = self.guest
        op = SNP_PAGE_STATE_PRIVATE if private else SNP_PAGE_STATE_SHARED
        vm = g.vm
        if self.compress and vm._subs is None:
            gfn, end = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
            if 0 < end - gfn <= VMGEXIT_PSC_MAX_ENTRY or (huge and 0 < end - gfn <= _ONE_REQUEST_2M):
                runs = psc_segments(gfn, end, huge)
                if (runs[0][1] if len(runs) == 1 else sum([n for _g, n, _b in runs])) <= VMGEXIT_PSC_MAX_ENTRY:
                    sched = vm._sched
                    if sched is None or not sched.contended():
                        return self._one_request(g, runs, op)
            return self._page_state_change_runs(g, gfn, end, op, huge)
        batch: list[PscEntry] = []
        for ent in psc_entries(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, op, huge):
            batch.append(ent)
            if len(batch) == VMGEXIT_PSC_MAX_ENTRY:
                res = self._request(g, batch)
                if not res:
                    return res
                batch = []
        return self._request(g, batch) if batch else CONVERTED

    def _page_state_change_runs(self, g: Guest, gfn: int, end: int, op: int,
                                huge: bool) -> ConversionResult:
        """:meth:`page_state_change` with each request as its runs of entries (``psc_requests``,
        ``SnpVcpu._psc_runs``): the same requests, exits and counters, O(1) per request
        instead of per entry (docs/performance.md). Taken while nothing traces the VM; a
        tracer attached meanwhile, or another actor running on the timeline, sends the
        remaining requests through the entry-by-entry path. A stretch of full one-run
        requests whose conversions are the same step repeated is answered as one range
        operation with the requests' accounting (:class:`pkvm.actors._steps.StepReplay`)."""
        vm = g.vm
        sched = vm._sched
        at = [0]
        reqs = psc_request_runs(gfn, end, huge)
        replay = StepReplay(vm, g.vmm)
        plan = 0  # requests in the stretch being recorded (0: none)
        tried = gfn  # no stretch is looked for below this gfn again
        misses = 0  # stretches looked for in vain in a row
        try:
            for runs, same in reqs:
                if vm._subs is not None or (sched is not None and sched.contended()):
                    if plan:
                        replay.end()
                        plan = 0
                    res = self._request(g, _request_entries(runs, op))
                    if not res:
                        return res
                    continue
                if self.compress_exits:
                    rg, n, big = runs[0]
                    if not plan and same >= MIN_STEPS and rg >= tried and replayable(vm):
                        npages = n * (RMP_PAGES_2M if big else 1)
                        ue = uniform_end(vm, g.vmm, rg, rg + same * npages, op == SNP_PAGE_STATE_PRIVATE, npages)
                        plan = (ue - rg) // npages
                        if plan >= MIN_STEPS:
                            replay.begin()
                            plan_gfn = rg
                            misses = 0
                        else:
                            # Look again past this stretch, and after ever more requests (at
                            # most MAX_BACKOFF) while none is found.
                            tried = rg + max(plan, min(1 << misses, MAX_BACKOFF)) * npages
                            misses += 1
                            plan = 0
                    if plan:
                        marks = replay.mark()
                        # (None: fewer than three marks, or the steps differ and one more is recorded)
                        verdict = replay.ready() if marks >= 3 else None
                        if verdict is not None:
                            if verdict:
                                # requests marks - 1 .. plan - 2; the last one runs as usual
                                k = plan - marks
                                replay.skip(k, partial(convert_silently, g.vmm, rg, k * npages,
                                                       op == SNP_PAGE_STATE_PRIVATE))
                                self.requests += k
                                for _ in range(k - 1):
                                    next(reqs)
                                tried = plan_gfn + plan * npages
                                plan = 0
                                continue
                            replay.end()
                            tried = plan_gfn + plan * npages
                            plan = 0
                self.requests += 1
                r = g.execute(g.vcpu._psc_runs(runs, op, at))  # type: ignore[attr-defined]
                if r.ret == "done" and r.status == 0:
                    continue
                # The descriptor's cur_entry is the first entry of the run at[0] (cur_page 0).
                fail_gpa = runs[min(at[0], len(runs) - 1)][0] << PAGE_SHIFT
                return step_failed("PSC", r, fail_gpa, g.last_exit, _PSC_NAMES.get(r.status or 0, ""))
            return CONVERTED
        finally:
            if plan:
                replay.end()

    def _one_request(self, g: Guest, runs: list[tuple[int, int, bool]], op: int) -> ConversionResult:
        """:meth:`_page_state_change_runs` of a range that is one request (``runs``, at most
        ``VMGEXIT_PSC_MAX_ENTRY`` entries), taken while nothing traces the VM and no other
        actor runs on the timeline: the request goes as its runs, as there (a single request
        is never a stretch to replay), without the stretch bookkeeping."""
        at = [0]
        self.requests += 1
        r = g.execute(g.vcpu._psc_runs(runs, op, at))  # type: ignore[attr-defined]
        if r.ret == "done" and r.status == 0:
            return CONVERTED
        fail_gpa = runs[min(at[0], len(runs) - 1)][0] << PAGE_SHIFT
        return step_failed("PSC", r, fail_gpa, g.last_exit, _PSC_NAMES.get(r.status or 0, ""))

    def _request(self, g: Guest, batch: list[PscEntry]) -> ConversionResult:
        desc = PscDesc.of(batch)
        self.requests += 1
        r = g.execute(g.vcpu._psc(desc))  # type: ignore[attr-defined]  # built here: well formed
        if r.ret == "done" and r.status == 0 and desc.cur_entry > desc.end_entry:
            return CONVERTED
        i = min(max(desc.cur_entry, 0), len(batch) - 1)
        gpa = (batch[i].gfn + batch[i].cur_page) << PAGE_SHIFT
        if r.status:
            why = _PSC_NAMES.get(r.status, "")
        else:
            why = f"the hypervisor stopped at entry {desc.cur_entry} of {desc.end_entry + 1}: GHCB_TERM_PSC"
        return step_failed("PSC", r, gpa, g.last_exit, why)

    def pvalidate(self, gpa: int, size: int, validate: bool, huge: bool = True) -> ConversionResult:
        """``pvalidate_pages``: 2M where aligned (if ``huge``), 4K fallback; fails at the first
        PVALIDATE that does not change its page."""
        g = self.guest
        vcpu = g.vcpu
        if (type(gpa) is int and type(size) is int and gpa >= 0 and size > 0 and not (gpa | size) >> 64
                and not (gpa | size) & 0xFFF and type(validate) is bool and type(huge) is bool):
            # What pvalidate_range would accept (Guest checked the range): without its checks.
            r = vcpu._pvalidate_insn(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT,  # type: ignore[attr-defined]
                                     validate, huge)
            if r.ret == "exit" or g.vm._in_callback:
                r = g.execute(r)
            else:
                g.last_exit = None  # g.execute(r) of a completion: nothing to answer
        else:
            r = g.execute(vcpu.pvalidate_range(gpa, size, validate, huge=huge))  # type: ignore[attr-defined]
        if r.ret == "done" and r.status == 0:
            return CONVERTED
        at = r.value if r.value is not None else gpa
        return step_failed("PVALIDATE", r, at, g.last_exit, _PVALIDATE_NAMES.get(r.status or 0, ""))
