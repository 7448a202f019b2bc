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
A trace without the header (e.g. from a real host) gets one RAM slot of the config's memory,
marked private as QEMU does, and no launch image. A header that disagrees with the config's
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
from typing import TYPE_CHECKING

from pkvm.constants import PAGE_SHIFT
from pkvm.errors import KvmError
from pkvm.experiments.trace import (
    EPT_ACC_WRITE,
    PFERR_GUEST_ENC,
    PFERR_GUEST_RMP,
    PFERR_PRIVATE_ACCESS,
    PFERR_WRITE,
    header_fields,
    parse_line,
)

from pkvm.kvm.vm import Vcpu

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
        raise ValueError(f"{path}: the trace is from a {plat} VM, not {ctx.vm.platform.name} "
                         f"(run with --platform {plat})")
    for key, have in (("memory", ctx.memory), ("image", ctx.image), ("vcpus", len(ctx.guests))):
        if key in hdr and int(hdr[key]) != have:
            raise ValueError(f"{path}: the trace was recorded with {key}={hdr[key]}, this run has {key}={have}")


class _Replayer:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.vm = ctx.vm
        self.pending: dict[int, object] = {}
        self.trace_exits = 0
        self.own_exits = 0
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
            raise ValueError(f"the trace has vCPU {vid}; this run has {len(guests)} (pass --vcpus {vid + 1})")
        v = guests[vid].vcpu
        if vid in self.pending:  # KVM_RUN: complete the hypercall the VMM has answered
            del self.pending[vid]
            with self.vm.acting(f"vcpu{vid}"):
                v.run()
        return v

    # -- faults (batched) -------------------------------------------------------------------

    def fault(self, vid: int, address: int, code: int, line: int = 0) -> None:
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
        self.flush()
        with self.vm.acting("vmm"):
            self.vm.set_memory_attributes(start << PAGE_SHIFT, (end - start) << PAGE_SHIFT, attrs)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
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
        self.flush()
        if behavior != _MADV_DONTNEED:
            return
        vm = self.vm
        s, e = start >> PAGE_SHIFT, (start + length) >> PAGE_SHIFT
        for slot in vm.memslots:
            lo, hi = slot.hva_page(slot.base_gfn), slot.hva_page(slot.end_gfn)
            a, b = max(s, lo), min(e, hi)
            if a < b:
                vm._shared.discard(a, b)

    def hypercall(self, vid: int, nr: int, a0: int, a1: int, a2: int) -> None:
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
        ValueError: the file does not parse, or its header disagrees with the run.
        OSError: the file cannot be read.
    """
    if not os.path.exists(path):
        raise ValueError(f"replay file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"replay file {path!r} is not a regular file")
    with open(path, encoding="utf-8", errors="replace") as f:
        head = [next(f, "") for _ in range(8)]
    hdr = header_fields(head)
    _check_header(ctx, hdr, path)
    with ctx.phase("setup"):
        ctx.setup(prealloc=hdr.get("prealloc") == "1")
    size = os.path.getsize(path) or 1
    rp = _Replayer(ctx)
    done = 0
    with ctx.phase("replay"), open(path, encoding="utf-8", errors="replace") as f:
        for no, line in enumerate(f, 1):
            # Fast path for the bulk of a trace: a fault needs only its body's three numbers.
            i = line.find(": kvm_page_fault:")
            if i >= 0:
                toks = line[i + 17:].split()
                if len(toks) >= 8 and toks[0] == "vcpu" and toks[4] == "address" and toks[6] == "error_code":
                    try:
                        rp.fault(int(toks[1]), int(toks[5], 16), int(toks[7], 16), no)
                    except KvmError as exc:
                        _reraise(exc, ctx, path, rp.err_line or no, "kvm_page_fault")
                    except ValueError:
                        pass  # not numbers: the full parser below names the problem
                    else:
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
            try:
                name = ev.event
                if name == "kvm_page_fault":
                    rp.fault(x["vcpu"], x["address"], x["error_code"], no)
                elif name == "kvm_vm_set_mem_attributes":
                    rp.set_attributes(x["start"], x["end"], x["attributes"])
                elif name == "sys_enter_fallocate":
                    rp.fallocate(x["fd"], x["mode"], x["offset"], x["len"])
                elif name == "sys_enter_madvise":
                    rp.madvise(x["start"], x["len_in"], x["behavior"])
                elif name == "kvm_hypercall":
                    vid = int(ev.comm.split()[1].split("/")[0]) if ev.comm.startswith("CPU ") else 0
                    rp.hypercall(vid, x["nr"], x["a0"], x["a1"], x["a2"])
                elif name == "kvm_userspace_exit":
                    rp.trace_exits += 1
            except KvmError as exc:
                _reraise(exc, ctx, path, rp.err_line or no, ev.event)
            done += 1
            if not done & 0xFFFF:
                ctx.progress(no * 110 / size)  # ~110 bytes per trace-cmd line
        try:
            rp.finish()
        except KvmError as exc:
            _reraise(exc, ctx, path, rp.err_line, "kvm_page_fault")
    if rp.trace_exits != rp.own_exits:
        ctx.notes.append(f"the trace has {_n(rp.trace_exits, 'exit')} to userspace; the replay took "
                         f"{rp.own_exits} (page-state-change and MapGPA exits are not replayed: no tracepoint "
                         "carries them)")
    if len(ctx.guests) > 1:
        ctx.notes.append(f"the trace comes from {len(ctx.guests)} concurrent vCPUs; the replay runs its events in "
                         "trace order on one thread, so what depends on their interleaving (pf_retry, pf_spurious, "
                         "pf_taken) or on each vCPU's host pages (the directmap_* counters) may differ")
    for name, n in sorted(rp.skipped.items()):
        ctx.notes.append(f"{_n(n, name + ' event')} named no guest_memfd of this VM and "
                         f"{'was' if n == 1 else 'were'} skipped")


def _reraise(exc: KvmError, ctx: Context, path: str, line: int, event: str) -> None:
    """Name the trace line whose replay failed (a dead VM's EIO passes through as it is)."""
    if exc.errno == errno.EIO and ctx.vm.vm_dead:
        raise exc
    raise KvmError(exc.errno or errno.EINVAL, f"{path} line {line}: {event}: {exc}") from None


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
