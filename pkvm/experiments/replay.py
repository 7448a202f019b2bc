"""The ``replay`` workload: drive the model from a kernel trace (``trace-cmd report`` text).

Each traced event becomes the call that produces it (:mod:`pkvm.experiments.trace` lists the formats):

* ``kvm_vm_set_mem_attributes`` -> ``KVM_SET_MEMORY_ATTRIBUTES`` on the gfn range (VMM actor);
* ``sys_enter_fallocate`` on a guest_memfd -> ``fallocate`` (the VMM's hole punch, or an
  allocation); ``sys_enter_madvise(MADV_DONTNEED)`` inside guest RAM -> the shared backing is
  discarded;
* ``kvm_page_fault`` -> one nested page fault on that vCPU, the access type decoded from the
  error code (SNP: bit 34 / bit 49 private, bit 31 an RMP #NPF; TDX: the shared bit of the
  address; others: bit 49). Runs of faults on consecutive 4K pages of one vCPU with the same
  error code are replayed as one batch, which the model counts exactly like single faults;
* ``kvm_hypercall`` -> the hypercall on that vCPU; its exit is answered by the VMM events that
  follow in the trace, and it completes (``KVM_RUN``) before that vCPU's next event;
* ``kvm_userspace_exit`` -> nothing: exits are consequences the model derives itself. The
  replay counts the trace's exits and its own, and notes a difference.

The VM is built as the trace's ``# pkvm ...`` header says (platform, memory, image, vCPUs,
preallocation; pkvm's own ``--trace`` files carry it, and their trace starts after the build).
A trace without the header (e.g. from a real host) gets the config's memory in QEMU's q35
layout (one RAM slot up to 2.75 GiB: ``Context.ram``), marked private as QEMU does, and no
launch image. A header that disagrees with the config's
platform is an error: the error codes mean different things per platform.

What a replay cannot reproduce, because the kernel does not trace it: guest instructions that
do not trap (PVALIDATE, ``TDG.MEM.PAGE.ACCEPT``: the RMP *validated* bit and the S-EPT
*pending -> mapped* step), and the SNP page-state-change and TDX MapGPA exits to userspace
(traced only as ``kvm_userspace_exit``). The counters KVM keeps for those (``pvalidate*``,
``psc_*``, ``hypercall_exits`` on SNP/TDX, ``tdcall_accept``, ``tdvmcall_map_gpa`` ...) and
their modeled time are therefore not repeated; everything the kernel does in response to the
traced events is (:data:`GUEST_ONLY_COUNTERS` lists the exceptions).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from pkvm.constants import PAGE_SHIFT
from pkvm.cost.model import CostModel
from pkvm.errors import KvmError, TracePlatformError
from pkvm._units import format_ns
from pkvm.experiments.trace import (
    EPT_ACC_WRITE,
    PFERR_GUEST_ENC,
    PFERR_GUEST_RMP,
    PFERR_PRIVATE_ACCESS,
    PFERR_WRITE,
    check_file,
    parse_line,
    trailer_fields,
)

from pkvm.kvm.policy import Policy, resolve_policy
from pkvm.kvm.vm import VM, Vcpu

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.experiments.workloads import Context

#: Counters a replay cannot reproduce: guest-side instructions and untraced exits.
GUEST_ONLY_COUNTERS = frozenset({
    "pvalidate", "pvalidate_2m", "pvalidate_failures", "psc_requests", "psc_entries", "snp_vc",
    "hypercall_exits", "hypercalls", "tdcall_accept", "tdvmcall_map_gpa", "tdx_accepts_4k",
    "tdx_accept_size_faults", "vmm_conversions", "vmm_failed_conversions", "gfns_accessed",
    "rmp_fault_spurious",
})
_MADV_DONTNEED = 4


def _check_header(ctx: Context, hdr: dict[str, str], path: str) -> None:
    plat = hdr.get("platform")
    if plat is not None and plat != ctx.vm.platform.name:
        raise TracePlatformError(path, plat, ctx.vm.platform.name)
    for key, have in (("memory", ctx.memory), ("image", ctx.image), ("vcpus", len(ctx.guests))):
        if key in hdr and int(hdr[key]) != have:
            raise ValueError(f"{path}: the trace was recorded with {key}={hdr[key]}, this run has {key}={have}")


#: What each platform's guest does that no tracepoint in a replayable trace carries.
_UNTRACED_WORK = {
    "snp": "PVALIDATE, the page-state-change (PSC) requests with their #VC and exits to userspace",
    "tdx": "TDG.MEM.PAGE.ACCEPT and the MapGPA TDVMCALLs with their exits to userspace",
}
#: The tracepoints whose events a replay repeats (a trace written with a filter may lack some).
_REPLAYED = ("kvm_vm_set_mem_attributes", "kvm_page_fault", "kvm_hypercall", "sys_enter_fallocate",
             "sys_enter_madvise")
#: The largest guest physical address width (MAXPHYADDR) a VM has.
_GPA_BITS = 52


class _Replayer:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.vm = ctx.vm
        self.pending: dict[int, object] = {}
        self.trace_exits = 0
        self.own_exits = 0
        self.psc_events = 0
        self.skipped: dict[str, int] = {}
        td = getattr(self.vm, "tdx", None)
        self.shared_mask = (1 << td.shared_bit) if td is not None else 0
        self.platform = self.vm.platform.name
        self.run: tuple[int, int, int, bool, bool, bool] | None = None  # vcpu, gfn, end, priv, write, rmp
        self.run_line = 0   # trace line of the run's first fault
        self.err_line = 0   # set while a run is replayed: the line a failure is reported at

    def vcpu(self, vid: int) -> Vcpu:
        guests = self.ctx.guests
        if vid >= len(guests):
            raise ValueError(f"the trace has vCPU {vid}; this run has {len(guests)} vCPUs (the trace needs "
                             f"{vid + 1})")
        v = guests[vid].vcpu
        if vid in self.pending:  # KVM_RUN: complete the hypercall the VMM has answered
            del self.pending[vid]
            with self.vm.acting(f"vcpu{vid}"):
                v.run()
        return v

    # -- faults (batched) -------------------------------------------------------------------

    def fault(self, vid: int, address: int, code: int, line: int = 0) -> None:
        if not 0 <= address < 1 << 64 or not 0 <= code < 1 << 64:
            raise ValueError(f"kvm_page_fault: address {address:#x} / error_code {code:#x} is not a u64")
        if (address & ~self.shared_mask) >> _GPA_BITS:
            raise ValueError(f"kvm_page_fault: address {address:#x} is beyond the {_GPA_BITS}-bit guest "
                             "physical address space")
        if self.platform == "tdx":
            private = not address & self.shared_mask
            gfn = (address & ~self.shared_mask) >> PAGE_SHIFT
            write = bool(code & EPT_ACC_WRITE)
            rmp = False
        else:
            private = bool(code & (PFERR_PRIVATE_ACCESS | PFERR_GUEST_ENC))
            gfn = address >> PAGE_SHIFT
            write = bool(code & PFERR_WRITE)
            rmp = bool(code & PFERR_GUEST_RMP) and self.platform == "snp"
        r = self.run
        if r is not None and r[0] == vid and r[2] == gfn and r[3:] == (private, write, rmp) and not rmp:
            self.run = (vid, r[1], gfn + 1, private, write, rmp)
            return
        self.flush()
        self.run = (vid, gfn, gfn + 1, private, write, rmp)
        self.run_line = line

    def flush(self) -> None:
        r, self.run = self.run, None
        if r is None:
            return
        self.err_line = self.run_line  # a failure below belongs to the run's first line
        vid, gfn, end, private, write, rmp = r
        vcpu = self.vcpu(vid)
        vm = self.vm
        snp = self.platform == "snp"
        with vm.acting(f"vcpu{vid}"):
            while gfn < end:
                if rmp:
                    n, res = vcpu._rmp_npf(gfn, private, write)  # type: ignore[attr-defined]
                elif snp:
                    # The SNP vCPU narrows a batch to what a guest *access* could take without
                    # a #VC; a trace holds the faults themselves, so KVM's path alone decides.
                    n, res = Vcpu._fault(vcpu, gfn, end, private, write)
                else:
                    n, res = vcpu._fault(gfn, end, private, write)
                if res.ret == "exit":
                    self.own_exits += 1
                if res.ret == "fixed" and n > 1:
                    gfn += n
                else:
                    gfn += 1
        self.err_line = 0

    # -- the other events ---------------------------------------------------------------------

    def set_attributes(self, start: int, end: int, attrs: int) -> None:
        if not 0 <= start <= end <= 1 << (_GPA_BITS - PAGE_SHIFT) or not 0 <= attrs < 1 << 64:
            raise ValueError(f"kvm_vm_set_mem_attributes: gfns [{start:#x}, {end:#x}) attributes {attrs:#x} "
                             f"are not a range of the {_GPA_BITS}-bit guest physical address space")
        self.flush()
        with self.vm.acting("vmm"):
            self.vm.set_memory_attributes(start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, attrs)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        if not (0 <= fd < 1 << 32 and 0 <= mode < 1 << 32 and 0 <= offset < 1 << 63 and 0 <= length < 1 << 63):
            raise ValueError(f"sys_enter_fallocate: fd {fd:#x} mode {mode:#x} offset {offset:#x} len {length:#x} "
                             "do not fit the syscall's int, int, loff_t, loff_t")
        self.flush()
        gmems = [g for g in self.vm._gmems if not g.closed]
        target = next((g for g in gmems if g.fd == fd), None)
        if target is None and len(gmems) == 1:
            target = gmems[0]  # a foreign trace: the VMM's fd numbers are its own
        if target is None:
            self.skipped["sys_enter_fallocate"] = self.skipped.get("sys_enter_fallocate", 0) + 1
            return
        with self.vm.acting("vmm"):
            target.fallocate(mode, offset, length)

    def madvise(self, start: int, length: int, behavior: int) -> None:
        if not (0 <= start < 1 << 64 and 0 <= length < 1 << 64):
            raise ValueError(f"sys_enter_madvise: start {start:#x} len {length:#x} do not fit a u64")
        self.flush()
        if behavior != _MADV_DONTNEED:
            return
        vm = self.vm
        s, e = start >> PAGE_SHIFT, (start + length) >> PAGE_SHIFT
        for slot in vm.memslots:  # one madvise: one MMU notifier over the memslots it overlaps
            lo, hi = slot.hva_page(slot.base_gfn), slot.hva_page(slot.end_gfn)
            if max(s, lo) < min(e, hi):
                with vm.acting("vmm"):
                    vm._madvise_dontneed(s, e)
                return

    def hypercall(self, vid: int, nr: int, a0: int, a1: int, a2: int) -> None:
        if not all(0 <= v < 1 << 64 for v in (nr, a0, a1, a2)):
            raise ValueError(f"kvm_hypercall: nr {nr:#x} a0 {a0:#x} a1 {a1:#x} a2 {a2:#x} do not fit a u64")
        self.flush()
        vcpu = self.vcpu(vid)
        with self.vm.acting(f"vcpu{vid}"):
            r = vcpu.hypercall(nr, a0, a1, a2)
        if r.ret == "exit":
            self.own_exits += 1
            self.pending[vid] = r

    def finish(self) -> None:
        self.flush()
        for vid in list(self.pending):
            self.vcpu(vid)


def replay_file(ctx: Context, path: str) -> None:
    """Replay the trace at ``path`` into ``ctx`` (module docstring).

    Raises:
        ValueError: the file is not a trace (:func:`pkvm.trace.check_file` says why), a line
            does not parse or holds values no kernel traces (named by its number), or the
            header disagrees with the run.
        OSError: the file cannot be read.
        KvmError: a replayed event failed as the kernel would fail it (names the line).
    """
    if not os.path.exists(path):
        raise ValueError(f"replay file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"replay file {path!r} is not a regular file")
    hdr = check_file(path)
    _check_header(ctx, hdr, path)
    with ctx.phase("setup"):
        ctx.setup(prealloc=hdr.get("prealloc") == "1")
    size = os.path.getsize(path) or 1
    rp = _Replayer(ctx)
    done = 0
    with ctx.phase("replay"), open(path, encoding="utf-8-sig", errors="replace") as f:
        for no, line in enumerate(f, 1):
            # Fast path for the bulk of a trace: a fault needs only its body's three numbers.
            i = line.find(": kvm_page_fault:")
            if i >= 0 and not line.lstrip().startswith("#"):  # a '#' comment is no event
                toks = line[i + 17:].split()
                if len(toks) >= 8 and toks[0] == "vcpu" and toks[4] == "address" and toks[6] == "error_code":
                    try:
                        vid, address, code = int(toks[1]), int(toks[5], 16), int(toks[7], 16)
                    except ValueError:
                        pass  # not numbers: the full parser below names the problem
                    else:
                        _step(rp.fault, (vid, address, code, no), ctx, path, rp, no, "kvm_page_fault")
                        done += 1
                        if not done & 0xFFFF:
                            ctx.progress(no * 110 / size)  # ~110 bytes per trace-cmd line
                        continue
            try:
                ev = parse_line(line)
            except ValueError as exc:
                raise ValueError(f"{path} line {no}: {exc}") from None
            if ev is None:
                continue
            x = ev.fields
            name = ev.event
            if name == "kvm_page_fault":
                _step(rp.fault, (x["vcpu"], x["address"], x["error_code"], no), ctx, path, rp, no, name)
            elif name == "kvm_vm_set_mem_attributes":
                _step(rp.set_attributes, (x["start"], x["end"], x["attributes"]), ctx, path, rp, no, name)
            elif name == "sys_enter_fallocate":
                _step(rp.fallocate, (x["fd"], x["mode"], x["offset"], x["len"]), ctx, path, rp, no, name)
            elif name == "sys_enter_madvise":
                _step(rp.madvise, (x["start"], x["len_in"], x["behavior"]), ctx, path, rp, no, name)
            elif name == "kvm_hypercall":
                try:
                    vid = _task_vcpu(ev.comm)
                except ValueError as exc:
                    raise ValueError(f"{path} line {no}: {name}: {exc}") from None
                _step(rp.hypercall, (vid, x["nr"], x["a0"], x["a1"], x["a2"]), ctx, path, rp, no, name)
            elif name == "kvm_userspace_exit":
                rp.trace_exits += 1
            elif name in ("kvm_vmgexit_enter", "kvm_vmgexit_msr_protocol_enter"):
                rp.psc_events += 1
            done += 1
            if not done & 0xFFFF:
                ctx.progress(no * 110 / size)  # ~110 bytes per trace-cmd line
        _step(rp.finish, (), ctx, path, rp, 0, "kvm_page_fault")
    _notes(ctx, rp, hdr, path)


def _task_vcpu(comm: str) -> int:
    """The vCPU of a hypercall's task: N for QEMU's ``CPU N/KVM`` thread, 0 for a task that
    does not follow QEMU's naming (a trace from another VMM).

    Raises:
        ValueError: a ``CPU ...`` task whose vCPU number is not a decimal number.
    """
    if not comm.startswith("CPU "):
        return 0
    num = comm[4:].split("/", 1)[0].strip()
    if not (num.isdigit() and num.isascii()):
        raise ValueError(f"task {comm!r} is not QEMU's vCPU thread 'CPU N/KVM' (N a vCPU number)")
    return int(num)


def _step(call: Callable[..., None], args: tuple[int, ...], ctx: Context, path: str, rp: _Replayer,
          no: int, event: str) -> None:
    """``call(*args)`` for trace line ``no``; a failure names the line (for a batch of faults,
    the line of the batch's first fault)."""
    try:
        call(*args)
    except KvmError as exc:
        _reraise(exc, ctx, path, rp.err_line or no, event)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{path} line {rp.err_line or no}: {exc}") from None


def _notes(ctx: Context, rp: _Replayer, hdr: dict[str, str], path: str) -> None:
    """What the replay could not reproduce: exits, counters and modeled time (module docstring)."""
    platform = rp.platform
    kept = None if hdr.get("events") is None else set(hdr["events"].split(","))
    left_out = [] if kept is None else [n for n in _REPLAYED if n not in kept]
    if left_out:
        ctx.notes.append(f"the trace holds only the tracepoints {hdr['events']} (it was written with a tracepoint "
                         f"filter): the replay did not see the events of {', '.join(left_out)}, so its counters "
                         "and modeled time lack their work")
    if rp.trace_exits != rp.own_exits and (kept is None or "kvm_userspace_exit" in kept):
        ctx.notes.append(f"the trace has {_n(rp.trace_exits, 'exit')} to userspace; the replay took "
                         f"{rp.own_exits} (page-state-change and MapGPA exits are not replayed: no tracepoint "
                         "carries them)")
    if len(ctx.guests) > 1:
        ctx.notes.append(f"the trace comes from {len(ctx.guests)} concurrent vCPUs; the replay runs its events in "
                         "trace order on one thread, so what depends on their interleaving (pf_retry, pf_spurious, "
                         "pf_taken) or on each vCPU's host pages (the directmap_* counters) may differ")
    if rp.psc_events:
        ctx.notes.append(f"the trace has {_n(rp.psc_events, 'page-state-change request')} (kvm_vmgexit_*); "
                         "the replay does not repeat them (the guest's PVALIDATE around them is not traced)")
    for name, n in sorted(rp.skipped.items()):
        ctx.notes.append(f"{_n(n, name + ' event')} named no guest_memfd of this VM and "
                         f"{'was' if n == 1 else 'were'} skipped")
    untraced = _UNTRACED_WORK.get(platform, "guest work no tracepoint carries")
    end = trailer_fields(path) if hdr else {}
    if hdr and not end:  # pkvm writes its trailer last: a trace without one was cut short
        ctx.notes.append("the trace has pkvm's '# pkvm' header but not its '# pkvm end' trailer, which pkvm writes "
                         "last: it looks cut short, and the replay ran only the events it holds")
    stats = ctx.vm.stats
    lost = sorted(k for k in GUEST_ONLY_COUNTERS if k in stats)
    if lost and platform in _UNTRACED_WORK and not end:
        ctx.notes.append(f"counters not reproduced ({untraced}: no tracepoint carries them): {', '.join(lost)}")
    if _digits(end.get("modeled_ns", "")):
        orig, mine = int(end["modeled_ns"]), ctx.vm.modeled_ns
        # The replay's work re-priced at the trace's prices: what of the traced run it reproduced.
        # The rest of the traced run is the untraced work, kept at the prices it was modeled at.
        mine_by_op = at_trace_prices(ctx.vm, end)
        recorded = hdr.get("policy")
        if left_out:
            # The gap is then the left-out events' work too: it says nothing of the untraced work.
            ctx.notes.append(f"modeled time not compared: the traced run modeled {format_ns(orig)} and this replay "
                             f"{format_ns(mine)}, without the work of the events the trace left out as well as "
                             f"the {untraced}")
        elif recorded is not None and not _same_policy(recorded, ctx.vm.policy):
            # The gap is then the policies' difference too: it says nothing of the untraced work.
            ctx.notes.append(f"modeled time not compared: the trace was recorded under policy {recorded} (it "
                             f"modeled {format_ns(orig)}) and this replay runs another ({format_ns(mine)}), "
                             f"without the {untraced}; replay it under {recorded} to measure what is missing")
        elif mine_by_op is None:
            ctx.notes.append(f"modeled time not compared: the traced run modeled {format_ns(orig)} and this replay "
                             f"runs another cost model ({format_ns(mine)}), whose work it cannot re-price at the "
                             f"trace's prices (the trace records none, or an operation costs 0 ns here); replay "
                             f"it without cost overrides to measure the {untraced}")
        else:
            traced = sum(mine_by_op.values())
            missing = sorted(((int(v) - mine_by_op.get(k[3:], 0), k[3:]) for k, v in end.items()
                              if k.startswith("op.") and _digits(v)), reverse=True)
            parts = [f"{op} {format_ns(ns)}" for ns, op in missing if ns > 0]
            gap = orig - traced
            pct = f" ({100 * gap / orig:.1f} %)" if orig > 0 else ""
            what = f": {', '.join(parts)}" if parts else ""
            if gap and traced == mine:
                ctx.notes.append(f"modeled time not reproduced: the traced run modeled {format_ns(orig)}, the "
                                 f"replay {format_ns(mine)}; {format_ns(gap)}{pct} is {untraced}{what}")
            elif gap:
                ctx.notes.append(f"modeled time not reproduced: the traced run modeled {format_ns(orig)}, "
                                 f"{format_ns(traced)} of it the traced work this replay re-runs, which its "
                                 f"prices make {format_ns(mine)}; {format_ns(gap)}{pct} is {untraced} (at the "
                                 f"trace's prices){what}")
        counts = [f"{k[5:]} {int(v):,}" for k, v in sorted(end.items())
                  if k.startswith("stat.") and _digits(v) and int(v) != stats.get(k[5:], 0)]
        if counts:
            ctx.notes.append(f"counters of the traced run not reproduced: {', '.join(counts)}")
    elif platform in _UNTRACED_WORK:
        ctx.notes.append(f"modeled time not reproduced: {untraced} (the trace carries no pkvm total to "
                         "measure the difference against)")


def _digits(text: str) -> bool:
    """Whether ``text`` is ASCII decimal digits (``str.isdigit`` also takes "²", which ``int``
    refuses)."""
    return text.isdigit() and text.isascii()


def unit_price(vm: VM, op: str) -> int | None:
    """The modeled ns of one event of ``op`` in ``vm`` (every charge of an op is its count
    times this), or None when it has none: ``remote_tlb_flush`` charged with several target
    vCPU counts, or an op not priced yet."""
    if op == "remote_tlb_flush":
        prices = set(vm._flush_ns.values())
        return prices.pop() if len(prices) == 1 else None
    p = vm._costs.get(op)
    return p if type(p) is int else None


def trailer_prices(vm: VM) -> list[str]:
    """The trailer's ``cost_model=`` (the model's fingerprint) and ``price.OP=NS`` fields: the
    price of one event of each operation ``vm`` charged, so that a replay under other prices
    can re-price its work at these (:func:`at_trace_prices`)."""
    out = [f"cost_model={vm.costs.fingerprint()}"]
    for op, ns in sorted(vm.cost_breakdown().items()):
        p = unit_price(vm, op) if ns else None
        if p is not None:
            out.append(f"price.{op}={p}")
    return out


def at_trace_prices(vm: VM, end: dict[str, str]) -> dict[str, int] | None:
    """``vm.cost_breakdown()`` (a replay's modeled ns by op) re-priced at the prices of the
    trace whose trailer is ``end``: each op's count of events (its ns over this VM's price)
    times the trace's price. The same dict when the cost models are the same one (the
    fingerprints agree, or the trace records none and this VM runs the platform's default
    model, which a trace without prices is taken to have used). None when an op cannot be
    re-priced exactly: the trace records no prices, or none for that op, or a price is 0."""
    mine = vm.cost_breakdown()
    model = vm.costs.fingerprint()
    fp = end.get("cost_model")
    if fp is None:
        return mine if model == CostModel.default(vm.platform.name).fingerprint() else None
    if fp == model:
        return mine
    out: dict[str, int] = {}
    for op in sorted(set(mine) | {k[6:] for k in end if k.startswith("price.")}):
        ns = mine.get(op, 0)
        mp, tp_text = unit_price(vm, op), end.get(f"price.{op}", "")
        tp = int(tp_text) if _digits(tp_text) else None
        if mp is not None and tp is not None and (mp == tp or (mp and not ns % mp)):
            if ns:
                out[op] = ns if mp == tp else ns // mp * tp
        elif ns or (mp == 0 and tp):
            return None  # events this VM charged 0 ns for, or with no price to count them by
    return out


def _same_policy(recorded: str, policy: Policy) -> bool:
    """Whether the trace header's policy spec names ``policy`` (an unknown spec does not)."""
    try:
        return resolve_policy(recorded) == policy
    except ValueError:
        return False


def _reraise(exc: KvmError, ctx: Context, path: str, line: int, event: str) -> None:
    """Name the trace line whose replay failed. A dead VM's EIO keeps its errno and says why
    the VM died; a TD with several vCPUs is the known case (docs/timeline.md, "What is
    approximated": a TD's ACCEPTs are not traced, so the replay cannot tell which vCPU's accept
    served a fault)."""
    hint = ""
    if exc.errno == errno.EIO and ctx.vm.vm_dead and ctx.vm.platform.name == "tdx" and len(ctx.guests) > 1:
        hint = ("; a trace of several concurrent TDX vCPUs may not replay: their ACCEPTs are not traced, so "
                "the replay cannot tell which vCPU's accept served a fault (docs/timeline.md)")
    raise KvmError(exc.errno or errno.EINVAL, f"{path} line {line}: {event}: {exc.strerror}{hint}") from None


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
