"""The tracepoints the model emits: the interface a tracer implements.

The KVM model, the platforms and the actors call one method of the attached tracer per event
(``vm._tracer``, None when tracing is off); what a tracer does with an event is its own affair.
This base class is the lower layer's side of that contract, as the kernel's tracepoint
declarations (``include/trace/events/kvm.h``, ``arch/x86/kvm/trace.h``) are separate from the
tools that format them: :class:`pkvm.experiments.trace.Tracer` (the ``trace-cmd report`` text
formats) subclasses it, and :meth:`pkvm.VM.trace` accepts any subclass. The KVM layer never
imports the experiments layer (see the "Layers" section of ``docs/design.md``).

Arguments are the model's own numbers (gfns, pfns, vCPU ids, errnos); formatting, error codes
and timestamps are the tracer's choice (``vm._modeled_ns`` is the modeled time of the event).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import VM

__all__ = ["Tracepoints"]


class Tracepoints(ABC):
    """One method per event. Subclass it and pass an instance to :meth:`pkvm.VM.trace`."""

    __slots__ = ()

    @abstractmethod
    def attach(self, vm: VM) -> None:
        """Called by :meth:`pkvm.VM.trace` before the first event of ``vm``."""

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
