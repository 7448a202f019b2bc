"""The guest actor: how a Linux guest converts and accepts its memory, per platform
(docs/kernel-semantics.md §7.5).

:class:`Guest` drives one vCPU of a :class:`pkvm.VM` and hands every exit to a
:class:`pkvm.Vmm`. The platform-specific protocol lives in a *flows* object obtained from the
platform (``PlatformOps.guest_flows(guest)``), which implements :class:`GuestFlows`:

* ``convert(gpa, size, private)`` — ``set_memory_encrypted`` / ``set_memory_decrypted``:
  TDX issues ``TDG.VP.VMCALL<MapGPA>`` (RETRY resumes at r11, at most 3 retries without
  progress) and, for to-private, accepts the range; SNP does PVALIDATE-rescind + page-state
  change, or page-state change + PVALIDATE (``SnpGuestFlows``, docs/snp.md);
* ``accept(gpa, size)`` — lazy acceptance of unaccepted (already private) memory: TDX runs
  ``tdx_accept_memory`` (``TDG.MEM.PAGE.ACCEPT`` trying 1G, then 2M, then 4K per aligned
  chunk); SNP runs ``snp_accept_memory`` (page-state change to private, then PVALIDATE).

Platforms without their own flows (SW_PROTECTED, DEFAULT) get :class:`HypercallGuestFlows`:
the ``KVM_HC_MAP_GPA_RANGE`` hypercall of the KVM selftests (§7.3) and nothing to accept.

To add a platform: write a class with ``convert`` and ``accept`` that uses the platform's
vCPU instructions and :meth:`Guest.execute` to get exits answered, and return it from the
platform's ``guest_flows`` op. Flows should be range-compressed (a run of pages in one state
handled in O(1)); TDX's ``_accept_bulk`` is the example.

:meth:`Guest.touch` is an ordinary guest access: an implicit-conversion exit
(``KVM_EXIT_MEMORY_FAULT``) is answered by the VMM and the access continues.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pkvm.actors.vmm import Vmm
from pkvm.constants import (
    KVM_EXIT_MEMORY_FAULT,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from pkvm.kvm.exits import CONVERTED, ConversionResult, ExitResult, step_failed
from pkvm.kvm.mmu import AccessResult
from pkvm.kvm.vm import VM, Vcpu

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.exits import GuestOpResult


class GuestFlows(Protocol):
    """The per-platform part of a Linux guest (``PlatformOps.guest_flows(guest)``).

    Both methods return a :class:`pkvm.ConversionResult` naming the step that failed (a plain
    bool is accepted too, and reported as a failure of step ``"flows"``)."""

    def convert(self, gpa: int, size: int, private: bool) -> ConversionResult | bool:
        """Convert ``[gpa, gpa + size)`` (alias-free) to private or shared."""

    def accept(self, gpa: int, size: int, huge: bool = True) -> ConversionResult | bool:
        """Accept the unaccepted private memory ``[gpa, gpa + size)``.
        ``huge=False``: 4K units only (where the platform's guest has such a mode)."""


class HypercallGuestFlows:
    """The KVM selftest guest (SW_PROTECTED): ``KVM_HC_MAP_GPA_RANGE`` (§7.3, §7.8)."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    def convert(self, gpa: int, size: int, private: bool) -> ConversionResult:
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if private else KVM_MAP_GPA_RANGE_DECRYPTED
        g = self.guest
        r = g.execute(g.vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, gpa, size >> PAGE_SHIFT, attrs))
        if r.ret == "done" and r.status == 0:
            return CONVERTED
        status = r.status or 0
        why = f"-{errno.errorcode.get((1 << 64) - status, '?')}" if status >> 63 else ""
        return step_failed("KVM_HC_MAP_GPA_RANGE", r, gpa, g.last_exit, why)

    def accept(self, gpa: int, size: int, huge: bool = True) -> ConversionResult:
        return CONVERTED  # nothing to accept: no hardware validation state


class Guest:
    """A Linux guest on ``vcpu`` (default: the VM's first vCPU, created if needed) whose exits
    ``vmm`` answers (default: a new :class:`pkvm.Vmm` of ``vm``).

    >>> import pkvm
    >>> vm = pkvm.VM("sw_protected")
    >>> vmm = pkvm.Vmm(vm)
    >>> _ = vmm.add_ram(0, 1 << 21)
    >>> guest = pkvm.Guest(vm, vmm)
    >>> bool(guest.convert(0x10000, 0x4000, private=False)), vm.get_memory_attributes(0x10)
    (True, 0)
    >>> guest.touch(0x10000, 0x4000, private=False).ret
    'done'
    """

    def __init__(self, vm: VM, vmm: Vmm | None = None, vcpu: Vcpu | None = None) -> None:
        if not isinstance(vm, VM):
            raise TypeError(f"vm must be a pkvm.VM, not {type(vm).__name__}")
        if vmm is not None and (not isinstance(vmm, Vmm) or vmm.vm is not vm):
            raise ValueError("vmm must be a pkvm.Vmm of the same VM")
        if vcpu is not None and (not isinstance(vcpu, Vcpu) or vcpu.vm is not vm):
            raise ValueError("vcpu must be a vCPU of the same VM")
        self.vm = vm
        self.vmm = vmm if vmm is not None else Vmm(vm)
        self.vcpu = vcpu if vcpu is not None else (vm.vcpus[0] if vm.vcpus else vm.create_vcpu())
        #: The actor modeled time is charged to while this guest runs (``vm.cost_by_actor()``).
        self.actor = f"vcpu{self.vcpu.id}"
        flows = vm.platform.guest_flows(self)
        self.flows: GuestFlows = flows if flows else HypercallGuestFlows(self)
        #: The VMM's answer, in the last :meth:`execute`, to the last exit that it refused or
        #: that carried an errno (a conversion that failed); None if every exit went cleanly.
        self.last_exit: ExitResult | None = None

    def __repr__(self) -> str:
        return f"<pkvm.Guest on vCPU {self.vcpu.id} of {self.vm!r}>"

    def execute(self, result: GuestOpResult,
                replay: Callable[[GuestOpResult], GuestOpResult] | None = None) -> GuestOpResult:
        """Finish a guest instruction: while it exits, let the VMM answer and ``KVM_RUN``
        again. Returns the completion, or the exit the VMM could not answer.

        ``replay`` (the platform flows' range form, ``pkvm.actors._steps``) sees each exit
        before it is answered and may return a later exit of the same instruction instead,
        having answered the ones between as one range operation."""
        if self.vm._in_callback:
            self.vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        r = result
        self.last_exit = None
        while r.ret == "exit":
            if replay is not None:
                r = replay(r)
            answer = self.vmm.handle_exit(self.vcpu, r)
            if not answer or answer.errno:
                self.last_exit = answer
            if not answer:
                return r
            r = self.vcpu.run()
        return r

    @staticmethod
    def _result(res: ConversionResult | bool) -> ConversionResult:
        if isinstance(res, ConversionResult):
            return res
        if res:
            return CONVERTED
        return ConversionResult(False, "flows", detail="the platform's guest flows reported a failure "
                                "without saying which step failed")

    @staticmethod
    def _range(gpa: int, size: int) -> None:
        if type(gpa) is not int or type(size) is not int:
            raise TypeError("gpa and size must be ints")
        # (a size of 2**64 fits none of the guest's requests: PSC entries, MapGPA, ACCEPT)
        if gpa < 0 or size <= 0 or (gpa | size) & (PAGE_SIZE - 1) or size >= 1 << 64 or gpa + size > 1 << 64:
            raise ValueError(f"[{gpa:#x}, +{size:#x}) must be a non-empty, 4 KiB aligned range below 2**64")

    def convert(self, gpa: int, size: int, *, private: bool) -> ConversionResult:
        """Convert the alias-free range ``[gpa, gpa + size)`` to private or shared, as the
        Linux guest does (the platform's flows). The result is truthy on success; on failure
        it names the step that failed, its status and where (:class:`pkvm.ConversionResult`).

        Raises:
            KvmError: EIO if the VM is (or becomes) dead.
            TypeError / ValueError: a bad range.
        """
        self._range(gpa, size)
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        sched = vm._sched
        lat = sched.latency_begin() if sched is not None else None
        # vm.acting(self.actor): a valid actor (this vCPU's); no call when it acts already
        prev = vm._actor
        if prev != self.actor:
            vm._set_actor(self.actor)
        try:
            return self._result(self.flows.convert(gpa, size, bool(private)))
        finally:
            if sched is not None:
                sched.latency_end("conversion", lat)
            if vm._actor != prev:
                vm._set_actor(prev)

    def accept(self, gpa: int, size: int, *, huge: bool = True) -> ConversionResult:
        """Accept unaccepted private memory ``[gpa, gpa + size)`` (lazy acceptance). The result
        is truthy on success, as for :meth:`convert`; a platform without acceptance has nothing
        to do. ``huge=False`` accepts in
        4K units only (SNP: 4K page-state entries and PVALIDATEs; TDX has no such mode and
        raises ValueError).

        Raises:
            KvmError: EIO if the VM is (or becomes) dead.
            TypeError / ValueError: a bad range.
        """
        if (type(gpa) is not int or type(size) is not int or gpa < 0 or size <= 0 or (gpa | size) & (PAGE_SIZE - 1)
                or gpa + size > 1 << 64):
            self._range(gpa, size)  # raises (the check inline: this runs once per accepted run)
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        prev = vm._actor  # vm.acting(self.actor), as in convert
        if prev != self.actor:
            vm._set_actor(self.actor)
        try:
            res = self.flows.accept(gpa, size, bool(huge))
        finally:
            if vm._actor != prev:
                vm._set_actor(prev)
        return res if type(res) is ConversionResult else self._result(res)

    def touch(self, gpa: int, size: int = PAGE_SIZE, *, private: bool, write: bool = False) -> AccessResult:
        """Access ``[gpa, gpa + size)``; implicit-conversion exits are answered by the VMM and
        the access goes on. Returns the totals, or the exit the VMM could not answer (and a
        dead VM's ``-EIO``)."""
        if (type(gpa) is not int or type(size) is not int or gpa < 0 or size <= 0 or (gpa | size) & (PAGE_SIZE - 1)
                or gpa + size > 1 << 64):
            self._range(gpa, size)  # raises (inline, as in accept)
        vm = self.vm
        if vm._in_callback:
            vm._nested_call()
        prev = vm._actor  # vm.acting(self.actor), as in convert
        if prev != self.actor:
            vm._set_actor(self.actor)
        try:
            # _touch's first access in line: a finished one is the totals already
            r = self.vcpu.access(gpa, private=private, write=write, size=size)
            return r if r.ret == "done" else self._touch(gpa, size, private, write, r)
        finally:
            if vm._actor != prev:
                vm._set_actor(prev)

    def _touch(self, gpa: int, size: int, private: bool, write: bool,
               first: AccessResult | None = None) -> AccessResult:
        """The access loop of :meth:`touch`; ``first``: the result of its first access, made
        already."""
        vcpu = self.vcpu
        done = faults = 0
        pos, end = gpa, gpa + size
        while True:
            if first is not None:
                r, first = first, None
            else:
                r = vcpu.access(pos, private=private, write=write, size=end - pos)
            done += r.pages_done
            faults += r.faults
            if r.ret == "done":
                # The first access's result is already the totals (a finished access has no
                # other fields set): no new object.
                return r if pos == gpa else AccessResult("done", done, faults)
            pos += r.pages_done << PAGE_SHIFT
            if r.exit_reason != KVM_EXIT_MEMORY_FAULT or not self.vmm.handle_exit(vcpu, r):
                return AccessResult(r.ret, done, faults, r.level, r.pfn, r.exit_reason, r.memory_fault, r.errno)
