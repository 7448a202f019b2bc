"""Per-event traces in the kernel's tracepoint text formats (kernel-semantics.md §8.2), and their parser.

A :class:`Tracer` attached to a VM (``vm.trace(tracer)``) receives one call per event the
model emits, and formats it the way ``trace-cmd report`` prints the kernel's tracepoint::

      CPU 0/KVM-4097  [000]     0.000812: kvm_page_fault:       vcpu 0 rip 0x0 address 0x...
    qemu-system-x86-4096  [001]     0.000001: kvm_vm_set_mem_attributes: 0x00000000000000 -- ...

The task is the actor that did the work (``qemu-system-x86`` for the VMM's ioctl thread, ``CPU
N/KVM`` for vCPU N, as QEMU names its threads); the timestamp is the VM's modeled time in
seconds. Events and their formats:

=============================  ============================================================
``kvm_vm_set_mem_attributes``  ``%#016llx -- %#016llx [0x%lx]``: start gfn, end gfn, attributes
                               (one line per ``KVM_SET_MEMORY_ATTRIBUTES`` that passed
                               validation, short-circuited or not: the kernel traces on entry)
``kvm_page_fault``             ``vcpu %u rip 0x%lx address 0x%016llx error_code 0x%llx``: one
                               line per nested page fault (a batch of N faults is N lines)
``kvm_userspace_exit``         ``reason %s (%d)``: ``KVM_EXIT_HYPERCALL (3)``, or ``error (14)``
                               for a memory-fault exit (``KVM_RUN`` returns -EFAULT)
``kvm_hypercall``              ``nr 0x%lx a0 0x%lx a1 0x%lx a2 0x%lx a3 0x%lx``
``sys_enter_fallocate``        the syscall tracepoint of the VMM's guest_memfd ``fallocate``
``sys_enter_madvise``          the VMM's ``MADV_DONTNEED`` of shared backing it discards
``kvm_rmp_fault``              SNP: ``vcpu %u gpa %016llx pfn 0x%llx error_code 0x%llx rmp_level
                               %d psmash_ret %d``, as ``sev_handle_rmp_fault`` leaves (not when
                               the pfn was unassigned)
``kvm_vmgexit_enter`` /        SNP: a GHCB page-state change (exit_reason ``80000010``); the exit
``kvm_vmgexit_exit``           line carries ``sw_exit_info_2`` when the request completes
``kvm_vmgexit_msr_protocol_*`` SNP: an MSR-protocol page-state change (``ghcb_gpa`` is the MSR)
=============================  ============================================================

Error codes (``kvm_page_fault``): SNP passes the #NPF error code: bit 1 write, bit 32
``PFERR_GUEST_FINAL``, bit 34 ``PFERR_GUEST_ENC`` for a C-bit access, bit 31 ``PFERR_GUEST_RMP``
with bit 0 (present) for an RMP-check #NPF, and KVM's synthetic bit 49
``PFERR_PRIVATE_ACCESS`` for a private fault. TDX passes the exit qualification (bit 0 read,
bit 1 write, forced to write for a private gpa) and a shared gpa carries the shared bit.
SW_PROTECTED and DEFAULT VMs pass the plain #NPF bits; pkvm adds bit 49 when the access it
simulated was private (a real SW_PROTECTED fault never carries it: KVM derives private from
the attribute after the tracepoint), so that a replay repeats the same access.

What is *not* in a trace, because the kernel has no tracepoint for it in this set: guest
instructions that do not trap (PVALIDATE, ``TDG.MEM.PAGE.ACCEPT``), TDX MapGPA TDVMCALLs
(their exits to userspace are traced), the SPTE-level events of ``kvmmmu`` (pkvm counts them
instead: a trace with them would be several times larger), and memslot setup
(pkvm writes the memory layout as ``#``-comment header lines, which ``trace-cmd`` never prints
and the parser reads back). :func:`parse_line` reads any ``trace-cmd report`` line, including
the latency-flags column newer versions print, and returns None for events it does not know.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, NamedTuple

from pkvm.constants import PAGE_SHIFT
from pkvm.kvm.events import TRACEPOINT_KINDS
from pkvm.kvm.tracepoints import Tracepoints

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

__all__ = ["Tracer", "TraceEvent", "TRACE_EVENTS", "check_trace_events", "parse_line", "parse", "check_file",
           "trailer_fields", "PFERR_WRITE", "PFERR_PRIVATE_ACCESS",
           "PFERR_GUEST_ENC", "PFERR_GUEST_RMP", "PFERR_GUEST_FINAL", "PFERR_PRESENT"]

PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_GUEST_RMP = 1 << 31
PFERR_GUEST_FINAL = 1 << 32
PFERR_GUEST_ENC = 1 << 34
PFERR_PRIVATE_ACCESS = 1 << 49
EPT_ACC_READ = 1 << 0
EPT_ACC_WRITE = 1 << 1

KVM_EXIT_NAMES = {3: "KVM_EXIT_HYPERCALL", 39: "KVM_EXIT_MEMORY_FAULT"}
VMM_COMM = "qemu-system-x86"
VMM_PID = 4096
_FALLOC_FD_WIDTH = 8


#: The tracepoints a :class:`Tracer` writes (the names ``events=`` / ``--trace-events`` take).
TRACE_EVENTS: tuple[str, ...] = tuple(TRACEPOINT_KINDS)


def check_trace_events(events: object, what: str = "events") -> tuple[str, ...] | None:
    """Validate a tracepoint filter: None (every tracepoint) or an iterable of names of
    :data:`TRACE_EVENTS` (a str is one comma-separated list); returns them in that order.

    Raises:
        TypeError: not None, a str or an iterable of str.
        ValueError: an unknown name (the message lists the known ones), or none at all.
    """
    if events is None:
        return None
    if isinstance(events, str):
        names = [n.strip() for n in events.split(",")]
    elif isinstance(events, Iterable):
        names = list(events)
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"{what} must hold tracepoint names (str), not {type(n).__name__}")
    else:
        raise TypeError(f"{what} must be None or tracepoint names, not {type(events).__name__}")
    for n in names:
        if n not in TRACEPOINT_KINDS:
            raise ValueError(f"{what}: unknown tracepoint {n!r}; the tracepoints are: {', '.join(TRACE_EVENTS)}")
    if not names:
        raise ValueError(f"{what} names no tracepoint; the tracepoints are: {', '.join(TRACE_EVENTS)}")
    return tuple(n for n in TRACE_EVENTS if n in names)


def _comm(actor: str) -> tuple[str, int, int]:
    """``(comm, pid, cpu)`` of an actor: the VMM's main thread, or QEMU's vCPU thread."""
    if actor.startswith("vcpu") and actor[4:].isdigit():
        n = int(actor[4:])
        return f"CPU {n}/KVM", VMM_PID + 1 + n, n
    return VMM_COMM, VMM_PID, 0


def _task(actor: str) -> str:
    """The ``COMM-PID [CPU] `` prefix of a ``trace-cmd report`` line for ``actor``."""
    comm, pid, cpu = _comm(actor)
    return f"{comm:>16}-{pid:<5} [{cpu:03d}] "


def _stamp(ns: int) -> str:
    """A modeled timestamp as ``trace-cmd report`` prints it: seconds with microseconds."""
    return f"{ns // 1_000_000_000:6d}.{ns // 1000 % 1_000_000:06d}"


class Tracer(Tracepoints):
    """Formats events into ``trace-cmd report`` lines and writes them to ``sink``.

    The events are the tracepoints of :class:`pkvm.kvm.tracepoints.Tracepoints`.

    ``sink`` is a text file (anything with ``write``) or None to keep the lines in
    :attr:`lines`. ``header`` lines (without the leading ``#``) are written first. ``events``
    (None: all of :data:`TRACE_EVENTS`) names the tracepoints to write; the tracer subscribes
    to those events only (see ``docs/events.md``). A tracer serves one VM at a time; attach it
    with :meth:`pkvm.VM.trace`.

    Raises:
        TypeError / ValueError: ``events`` is not None or names of :data:`TRACE_EVENTS`.
    """

    def __init__(self, sink: IO[str] | None = None, header: Iterable[str] = (),
                 events: Iterable[str] | None = None) -> None:
        chosen = check_trace_events(events)
        #: The tracepoints written (all of :data:`TRACE_EVENTS` when not filtered).
        self.trace_events: tuple[str, ...] = TRACE_EVENTS if chosen is None else chosen
        self._kinds = frozenset(TRACEPOINT_KINDS[n] for n in self.trace_events)
        self.sink = sink
        self.lines: list[str] = []
        self.events = 0
        self._vm: VM | None = None
        self._shared_bit = 0
        self._platform = ""
        for h in header:
            self._emit_raw(f"# {h}")

    def trace_kinds(self) -> frozenset[str]:
        """The event kinds of the tracepoints this tracer writes."""
        return self._kinds

    def attach(self, vm: VM) -> None:
        """Called by :meth:`pkvm.VM.trace`."""
        self._vm = vm
        self._platform = vm.platform.name
        td = getattr(vm, "tdx", None)
        self._shared_bit = 1 << td.shared_bit if td is not None else 0

    def _emit_raw(self, line: str) -> None:
        if self.sink is None:
            self.lines.append(line)
        else:
            self.sink.write(line + "\n")

    def _emit(self, event: str, body: str, ns: int | None = None) -> None:
        vm = self._vm
        assert vm is not None
        if ns is None:
            ns = vm._modeled_ns
        self.events += 1
        self._emit_raw(f"{_task(vm._actor)}{_stamp(ns)}: {event + ':':<26} {body}")

    # -- events ----------------------------------------------------------------------------------

    def set_mem_attributes(self, start: int, end: int, attrs: int) -> None:
        self._emit("kvm_vm_set_mem_attributes", f"{_alt_hex16(start)} -- {_alt_hex16(end)} [{attrs:#x}]")

    def page_faults(self, vcpu_id: int, gfn: int, end: int, step: int, private: bool, write: bool,
                    rmp: bool, t0: int, t1: int) -> None:
        """Faults at ``gfn, gfn + step, ...`` below ``end`` (a batch), timed from t0 to t1."""
        if self._platform == "tdx":
            code = EPT_ACC_READ | (EPT_ACC_WRITE if write or private else 0)
            alias = 0 if private else self._shared_bit
        else:
            code = PFERR_GUEST_FINAL | (PFERR_WRITE if write else 0)
            alias = 0
            if private:
                code |= PFERR_PRIVATE_ACCESS
            if self._platform == "snp":
                if private:
                    code |= PFERR_GUEST_ENC
                if rmp:
                    code |= PFERR_GUEST_RMP | PFERR_PRESENT
        n = (end - gfn + step - 1) // step
        vm = self._vm
        assert vm is not None
        # The line of _emit, with everything but the timestamp and address built once.
        head = _task(vm._actor)
        mid = f": {'kvm_page_fault:':<26} vcpu {vcpu_id} rip 0x0 address "
        tail = f" error_code {code:#x}"
        span = t1 - t0
        out: list[str] = []
        for i in range(n):
            ns = t0 + span * i // n
            gpa = ((gfn + i * step) << PAGE_SHIFT) | alias
            out.append(f"{head}{_stamp(ns)}{mid}{gpa:#018x}{tail}")
            if len(out) == 4096:
                self._emit_many(out)
                out = []
        self._emit_many(out)
        self.events += n

    def _emit_many(self, lines: list[str]) -> None:
        if not lines:
            return
        if self.sink is None:
            self.lines.extend(lines)
        else:
            self.sink.write("\n".join(lines) + "\n")

    def rmp_fault(self, vcpu_id: int, gpa: int, pfn: int, private: bool, write: bool, rmp_level: int,
                  psmash_ret: int) -> None:
        code = PFERR_GUEST_RMP | PFERR_PRESENT | PFERR_GUEST_FINAL | (PFERR_WRITE if write else 0)
        if private:
            code |= PFERR_GUEST_ENC | PFERR_PRIVATE_ACCESS
        self._emit("kvm_rmp_fault", f"vcpu {vcpu_id} gpa {gpa:016x} pfn {pfn:#x} error_code {code:#x} "
                   f"rmp_level {rmp_level} psmash_ret {psmash_ret}")

    def vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self._emit("kvm_vmgexit_enter", f"vcpu {vcpu_id}, exit_reason {exit_reason:x}, exit_info1 {info1:x}, "
                   f"exit_info2 {info2:x}")

    def vmgexit_exit(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        self._emit("kvm_vmgexit_exit", f"vcpu {vcpu_id}, exit_reason {exit_reason:x}, exit_info1 {info1:x}, "
                   f"exit_info2 {info2:x}")

    def vmgexit_msr_enter(self, vcpu_id: int, ghcb_gpa: int) -> None:
        self._emit("kvm_vmgexit_msr_protocol_enter", f"vcpu {vcpu_id}, ghcb_gpa {ghcb_gpa:016x}")

    def vmgexit_msr_exit(self, vcpu_id: int, ghcb_gpa: int, result: int) -> None:
        self._emit("kvm_vmgexit_msr_protocol_exit", f"vcpu {vcpu_id}, ghcb_gpa {ghcb_gpa:016x}, result {result}")

    def userspace_exit(self, reason: int, err: int = 0) -> None:
        if err:
            self._emit("kvm_userspace_exit", f"reason error ({err})")
        else:
            self._emit("kvm_userspace_exit", f"reason {KVM_EXIT_NAMES.get(reason, 'UNKNOWN')} ({reason})")

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int = 0) -> None:
        self._emit("kvm_hypercall", f"nr {nr:#x} a0 {a0:#x} a1 {a1:#x} a2 {a2:#x} a3 {a3:#x}")

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._emit("sys_enter_fallocate", f"fd: {fd:#0{_FALLOC_FD_WIDTH + 2}x}, mode: {mode:#010x}, "
                   f"offset: {offset:#018x}, len: {length:#018x}")

    def madvise(self, start: int, length: int, behavior: int) -> None:
        self._emit("sys_enter_madvise", f"start: {start:#018x}, len_in: {length:#018x}, behavior: {behavior:#010x}")


# -- parsing -------------------------------------------------------------------------------------


class TraceEvent(NamedTuple):
    """One parsed line: ``event`` name, the task (``comm``, ``pid``), ``cpu``, timestamp in
    ns, and ``fields`` (the event's values as ints, by name)."""

    event: str
    comm: str
    pid: int
    cpu: int
    ns: int
    fields: dict[str, int]


#: Each known event's fields, in the order of its printk format. All but
#: ``kvm_vm_set_mem_attributes`` and ``kvm_userspace_exit`` print ``name value`` pairs.
_NAMES = {
    "kvm_page_fault": ("vcpu", "rip", "address", "error_code"),
    "kvm_hypercall": ("nr", "a0", "a1", "a2", "a3"),
    "sys_enter_fallocate": ("fd", "mode", "offset", "len"),
    "sys_enter_madvise": ("start", "len_in", "behavior"),
    "kvm_rmp_fault": ("vcpu", "gpa", "pfn", "error_code", "rmp_level", "psmash_ret"),
    "kvm_vmgexit_enter": ("vcpu", "exit_reason", "exit_info1", "exit_info2"),
    "kvm_vmgexit_exit": ("vcpu", "exit_reason", "exit_info1", "exit_info2"),
    "kvm_vmgexit_msr_protocol_enter": ("vcpu", "ghcb_gpa"),
    "kvm_vmgexit_msr_protocol_exit": ("vcpu", "ghcb_gpa", "result"),
    "kvm_vm_set_mem_attributes": ("start", "end", "attributes"),
    "kvm_userspace_exit": ("reason", "errno"),
}
#: Fields printed with %u / %d (the rest are hex, with or without 0x).
_DECIMAL = frozenset({"vcpu", "rmp_level", "psmash_ret", "result"})


def _pairs(event: str, body: str) -> dict[str, int]:
    names = _NAMES[event]
    toks = body.replace(",", " ").split()
    if len(toks) < 2 * len(names) or tuple(t.rstrip(":") for t in toks[0:2 * len(names):2]) != names:
        raise ValueError(f"{event}: cannot parse {body.strip()!r}")
    return {k: int(v, 10 if k in _DECIMAL else 16) for k, v in zip(names, toks[1:2 * len(names):2])}


def _attrs(body: str) -> dict[str, int]:
    toks = body.split()
    if len(toks) < 4 or toks[1] != "--" or not (toks[3].startswith("[") and toks[3].endswith("]")):
        raise ValueError(f"kvm_vm_set_mem_attributes: cannot parse {body.strip()!r}")
    return {"start": int(toks[0], 16), "end": int(toks[2], 16), "attributes": int(toks[3][1:-1], 16)}


def _exit(body: str) -> dict[str, int]:
    toks = body.split()
    if len(toks) < 3 or toks[0] != "reason" or not (toks[2].startswith("(") and toks[2].endswith(")")):
        raise ValueError(f"kvm_userspace_exit: cannot parse {body.strip()!r}")
    num = int(toks[2][1:-1])
    if toks[1] in ("error", "restart"):
        return {"reason": 0, "errno": num}
    return {"reason": num, "errno": 0}


def parse_line(line: str) -> TraceEvent | None:
    """Parse one ``trace-cmd report`` line: ``COMM-PID [CPU] [FLAGS] SECS.FRAC: EVENT: BODY``.
    None for blank, comment and header (``cpus=N``) lines and for events this module does not
    know.

    Raises:
        ValueError: a known event whose fields do not parse (names the event and the text).
    """
    rb = line.find("] ")
    if rb < 0 or line.lstrip().startswith("#"):
        return None
    lb = line.rfind("[", 0, rb)
    c1 = line.find(": ", rb)
    if lb <= 0 or c1 < 0:
        return None
    c2 = line.find(":", c1 + 2)
    if c2 < 0:
        return None
    event = line[c1 + 2:c2].strip()
    if event not in _NAMES:
        return None
    comm, dash, pid = line[:lb].strip().rpartition("-")
    stamp = line[rb + 1:c1].split()
    if not dash or not pid.isdigit() or not stamp:
        return None
    sec, dot, frac = stamp[-1].partition(".")
    cpu = line[lb + 1:rb]
    if not sec.isdigit() or not cpu.isdigit() or (dot and not frac.isdigit()):
        return None
    body = line[c2 + 1:]
    try:
        if event == "kvm_vm_set_mem_attributes":
            fields = _attrs(body)
        elif event == "kvm_userspace_exit":
            fields = _exit(body)
        else:
            fields = _pairs(event, body)
    except ValueError as exc:
        if str(exc).startswith(event):
            raise
        raise ValueError(f"{event}: cannot parse {body.strip()!r}") from None
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
    return TraceEvent(event, comm, int(pid), int(cpu), ns, fields)


def parse(lines: Iterable[str]) -> Iterator[tuple[int, TraceEvent]]:
    """Parse every line; yield ``(line number, event)`` for the events this module knows.

    Raises:
        ValueError: ``"line N: ..."`` for a known event that does not parse.
    """
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            ev = parse_line(line)
        except ValueError as exc:
            raise ValueError(f"line {no}: {exc}") from None
        if ev is not None:
            yield no, ev


def header_fields(lines: Iterable[str]) -> dict[str, str]:
    """``key=value`` pairs of the ``# pkvm ...`` header comment lines at the top of a trace."""
    out: dict[str, str] = {}
    for line in lines:
        s = line.strip()
        if not s or s.startswith("cpus=") or _empty_cpu(s):  # trace-cmd report's first lines
            continue
        if not s.startswith("#"):
            break
        body = s[1:].strip()
        if body.startswith("pkvm "):
            for tok in body[5:].split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    out[k] = v
    return out


#: ``# pkvm`` header fields that hold a whole number.
_HEADER_NUMBERS = ("memory", "image", "vcpus", "prealloc", "discard")
_HEADER_FLAGS = ("prealloc", "discard")  # written as 0 or 1
_HEAD_BYTES = 1 << 16


def _clip(text: str, n: int = 40) -> str:
    text = text.strip()
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def _alt_hex16(v: int) -> str:
    """``v`` as C's ``%#016llx`` prints it: ``0x`` and 14 digits at least, but 16 zeros for 0
    (the ``#`` flag adds no ``0x`` to a zero; Python's ``#016x`` does)."""
    return f"{v:#016x}" if v else "0000000000000000"


def _empty_cpu(line: str) -> bool:
    """Whether ``line`` is ``CPU N is empty``, which ``trace-cmd report`` prints before its
    ``cpus=N`` line for each CPU that recorded no event."""
    words = line.split()
    return len(words) == 4 and words[0] == "CPU" and words[1].isdigit() and words[1].isascii() and words[2:] == ["is", "empty"]


def _is_event_line(line: str) -> bool:
    """Whether ``line`` has the shape of a ``trace-cmd report`` event line,
    ``COMM-PID [CPU] [FLAGS] SECS.FRAC: EVENT: BODY``, whatever the event."""
    rb = line.find("] ")
    lb = line.rfind("[", 0, rb) if rb > 0 else -1
    if lb <= 0:
        return False
    c1 = line.find(": ", rb)
    if c1 < 0 or line.find(":", c1 + 2) < 0:
        return False
    comm, dash, pid = line[:lb].strip().rpartition("-")
    stamp = line[rb + 1:c1].split()
    return bool(dash and pid.isdigit() and line[lb + 1:rb].isdigit() and stamp
                and stamp[-1].replace(".", "", 1).isdigit())


def check_file(path: str) -> dict[str, str]:
    """Check that the file at ``path`` is a trace pkvm can replay; return its ``# pkvm`` header
    fields (empty for a trace from a real host).

    A trace is ``trace-cmd report`` text (or pkvm's ``--trace`` output): UTF-8 text whose first
    line, after any ``CPU N is empty`` lines, is ``cpus=N``, a ``#`` comment (pkvm's
    ``# pkvm ...`` header among them) or an event line, and which holds at least one event
    :func:`parse_line` knows (a pkvm trace may hold none: its header says what it is). The scan
    stops at the first known event.

    Raises:
        ValueError: one line saying why the file is not such a trace (empty, binary, not
            UTF-8, a first line that is no trace header, a header value that is not a number,
            a known event that does not parse, or no known event at all); names the file.
        OSError: the file cannot be read (a missing file, a directory).
    """
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a trace file", path)
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if not head.strip():
        raise ValueError(f"{path} is empty, not a trace (expected 'trace-cmd report' text or a "
                         "pkvm --trace file)")
    if b"\0" in head:
        raise ValueError(f"{path} is a binary file, not a trace: pkvm replays 'trace-cmd report' text "
                         "(run 'trace-cmd report' on a trace.dat first)")
    try:
        head[:-4].decode("utf-8") if len(head) == _HEAD_BYTES else head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}), not a trace: pkvm replays "
                         "'trace-cmd report' text") from None
    lines = head.decode("utf-8-sig", errors="replace").splitlines()
    first = next(((no, ln) for no, ln in enumerate(lines, 1)
                  if ln.strip() and not ln.lstrip().startswith("#") and not _empty_cpu(ln)), None)
    fields = header_fields(lines)
    if first is not None:
        no, ln = first
        s = ln.strip()
        if not (s.startswith("cpus=") and s[5:].isdigit()) and not _is_event_line(ln):
            raise ValueError(f"{path} is not a trace: line {no} {_clip(ln)} is neither a '# pkvm' header, "
                             "trace-cmd's 'cpus=N' nor an event line 'COMM-PID [CPU] SECS: EVENT: ...'")
    for key in _HEADER_NUMBERS:
        if key in fields and not (fields[key].isdigit() and fields[key].isascii()):  # "²".isdigit()
            raise ValueError(f"{path}: the '# pkvm' header's {key}={_clip(fields[key])} is not a whole number")
    for key in _HEADER_FLAGS:
        if key in fields and fields[key] not in ("0", "1"):
            raise ValueError(f"{path}: the '# pkvm' header's {key}={_clip(fields[key])} is not 0 or 1")
    if any(ln.lstrip().startswith("# pkvm ") for ln in lines[:64]):
        return fields
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for no, line in enumerate(f, 1):
            if ": kvm_" not in line and ": sys_enter_" not in line:
                continue
            try:
                if parse_line(line) is not None:
                    return fields
            except ValueError as exc:
                raise ValueError(f"{path} line {no}: {exc}") from None
    raise ValueError(f"{path} is not a trace pkvm can replay: it has none of the events "
                     f"{', '.join(sorted(_NAMES))}")


def trailer_fields(path: str) -> dict[str, str]:
    """``key=value`` pairs of the ``# pkvm end ...`` trailer line that pkvm writes at the end of
    a ``--trace`` file (the run's modeled total, its time by operation and the counters of guest
    work no tracepoint carries); empty when the file has none (a trace from a host)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _HEAD_BYTES))
        tail = f.read().decode("utf-8", errors="replace")
    out: dict[str, str] = {}
    for line in tail.splitlines():
        s = line.strip()
        if s.startswith("# pkvm end "):
            out = dict(tok.split("=", 1) for tok in s[len("# pkvm end "):].split() if "=" in tok)
    return out
