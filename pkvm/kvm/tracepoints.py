"""The tracepoints the model emits: the interface a tracer implements.

A tracer is one subscriber of the VM's structured events (:meth:`pkvm.VM.subscribe`,
``docs/events.md``): :meth:`pkvm.VM.trace` subscribes :func:`deliver`, which calls one method
of the tracer per traced event (the kinds of :data:`pkvm.kvm.events.TRACEPOINT_KINDS`, or
those :meth:`Tracepoints.trace_kinds` narrows them to); what a tracer does with an event is its
own affair. This base class is the lower layer's side of that contract, as the kernel's
tracepoint declarations (``include/trace/events/kvm.h``, ``arch/x86/kvm/trace.h``) are separate
from the tools that format them: :class:`pkvm.experiments.trace.Tracer` (the ``trace-cmd
report`` text formats) subclasses it, and :meth:`pkvm.VM.trace` accepts any subclass. The KVM
layer never imports the experiments layer (see the "Layers" section of ``docs/design.md``).

Arguments are the model's own numbers (gfns, pfns, vCPU ids, errnos); formatting, error codes
and timestamps are the tracer's choice (``vm._modeled_ns`` is the modeled time of the event).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pkvm.kvm.events import TRACEPOINT_KINDS, Event

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

__all__ = ["Tracepoints", "deliver"]

_TRACED_KINDS = frozenset(TRACEPOINT_KINDS.values())


class Tracepoints(ABC):
    """One method per event. Subclass it and pass an instance to :meth:`pkvm.VM.trace`."""

    __slots__ = ()

    @abstractmethod
    def attach(self, vm: VM) -> None:
        """Called by :meth:`pkvm.VM.trace` before the first event of ``vm``."""

    def trace_kinds(self) -> frozenset[str]:
        """The event kinds to receive (default: every traced kind); a tracer that writes only
        some tracepoints narrows it, and is then not even called for the others."""
        return _TRACED_KINDS

    # -- KVM ioctls and exits (pkvm.kvm) ----------------------------------------------------------

    @abstractmethod
    def set_mem_attributes(self, start: int, end: int, attrs: int) -> None:
        """``kvm_vm_set_mem_attributes``: a ``KVM_SET_MEMORY_ATTRIBUTES`` that passed validation."""

    @abstractmethod
    def page_faults(self, vcpu_id: int, gfn: int, end: int, step: int, private: bool, write: bool,
                    rmp: bool, t0: int, t1: int) -> None:
        """``kvm_page_fault``: faults at ``gfn, gfn + step, ...`` below ``end``, timed t0 to t1."""

    @abstractmethod
    def userspace_exit(self, reason: int, err: int = 0) -> None:
        """``kvm_userspace_exit``: ``KVM_RUN`` returns to userspace (``err``: its -errno, or 0)."""

    @abstractmethod
    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int = 0) -> None:
        """``kvm_hypercall``: a hypercall KVM handles."""

    @abstractmethod
    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """``sys_enter_fallocate`` of a guest_memfd."""

    # -- the VMM (pkvm.actors.vmm) ----------------------------------------------------------------

    @abstractmethod
    def madvise(self, start: int, length: int, behavior: int) -> None:
        """``sys_enter_madvise``: the VMM discards shared backing."""

    # -- SEV-SNP (pkvm.platforms.snp) -------------------------------------------------------------

    @abstractmethod
    def rmp_fault(self, vcpu_id: int, gpa: int, pfn: int, private: bool, write: bool, rmp_level: int,
                  psmash_ret: int) -> None:
        """``kvm_rmp_fault``: ``sev_handle_rmp_fault`` on its way out."""

    @abstractmethod
    def vmgexit_enter(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        """``kvm_vmgexit_enter``: a GHCB-protocol VMGEXIT."""

    @abstractmethod
    def vmgexit_exit(self, vcpu_id: int, exit_reason: int, info1: int, info2: int) -> None:
        """``kvm_vmgexit_exit``: the GHCB request completes."""

    @abstractmethod
    def vmgexit_msr_enter(self, vcpu_id: int, ghcb_gpa: int) -> None:
        """``kvm_vmgexit_msr_protocol_enter``: an MSR-protocol VMGEXIT (``ghcb_gpa``: the MSR)."""

    @abstractmethod
    def vmgexit_msr_exit(self, vcpu_id: int, ghcb_gpa: int, result: int) -> None:
        """``kvm_vmgexit_msr_protocol_exit``."""


def _fault(tp: Tracepoints, vm: VM, ev: Event) -> None:
    vcpu_id, step, private, write, rmp, elapsed = ev.args
    t1 = vm._modeled_ns
    tp.page_faults(vcpu_id, ev.gfn_start, ev.gfn_end, step, private, write, rmp, t1 - elapsed, t1)  # type: ignore[arg-type]


_DISPATCH: dict[str, Callable[[Tracepoints, VM, Event], Any]] = {
    "fault": _fault,
    "set_memory_attributes": lambda tp, vm, ev: tp.set_mem_attributes(ev.gfn_start, ev.gfn_end, ev.args[0]),  # type: ignore[arg-type]
    "userspace_exit": lambda tp, vm, ev: tp.userspace_exit(*ev.args),
    "hypercall": lambda tp, vm, ev: tp.hypercall(*ev.args),
    "fallocate": lambda tp, vm, ev: tp.fallocate(*ev.args),
    "madvise": lambda tp, vm, ev: tp.madvise(*ev.args),
    "rmp_fault": lambda tp, vm, ev: tp.rmp_fault(*ev.args),
    "vmgexit_enter": lambda tp, vm, ev: tp.vmgexit_enter(*ev.args),
    "vmgexit_exit": lambda tp, vm, ev: tp.vmgexit_exit(*ev.args),
    "vmgexit_msr_enter": lambda tp, vm, ev: tp.vmgexit_msr_enter(*ev.args),
    "vmgexit_msr_exit": lambda tp, vm, ev: tp.vmgexit_msr_exit(*ev.args),
}


def deliver(tp: Tracepoints, vm: VM, ev: Event) -> None:
    """The subscriber :meth:`pkvm.VM.trace` registers: call ``tp``'s method for ``ev``
    (events of kinds that have no tracepoint are ignored)."""
    f = _DISPATCH.get(ev.kind)
    if f is not None:
        f(tp, vm, ev)
