"""Exits to userspace and the guest instructions that cause them: platform-neutral plumbing.

A guest instruction that KVM forwards to userspace (a hypercall, TDX's ``TDG.VP.VMCALL<MapGPA>``,
SNP's page-state change, or an access KVM cannot resolve) stops the vCPU in an *exit*: the vCPU
method returns a :class:`GuestOpResult` with ``ret == "exit"`` and the ``struct kvm_run`` data
(``exit_reason``, a mutable :class:`Hypercall` or ``memory_fault``). Userspace (the
:class:`pkvm.Vmm` actor, or a test) acts on it, writes ``hypercall.ret`` when there is one, and
calls :meth:`pkvm.Vcpu.run` (``KVM_RUN``): KVM then runs the instruction's completion callback
(``vcpu->arch.complete_userspace_io``) or re-executes the instruction, which either exits again
or completes with ``ret == "done"`` and the guest-visible ``status``.

This module also holds the generic ``KVM_HC_MAP_GPA_RANGE`` hypercall (kernel-semantics.md §7.3), which any VM
type can issue with :meth:`pkvm.Vcpu.hypercall` (SW_PROTECTED selftests use it; TDX reaches the
same exit through MapGPA, SNP through its page-state change).

Invariant: a vCPU has at most one pending continuation (``vcpu._resume``); a guest instruction
issued while one is pending is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm._core import ExitResult as ExitResult  # the typed core's light result objects
from pkvm._core import GuestOpResult as GuestOpResult
from pkvm._core import Hypercall as Hypercall
from pkvm._core import begin_insn as begin_insn  # the entry of a guest instruction, typed
from pkvm._core import hypercall_exit as hypercall_exit  # a KVM_EXIT_HYPERCALL stop, typed
from pkvm.constants import (
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_HC_MAP_GPA_RANGE,
    PAGE_SHIFT,
)

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.kvm.vm import Vcpu

U64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ConversionResult:
    """Outcome of :meth:`pkvm.Guest.convert` / :meth:`pkvm.Guest.accept`; truthy iff every
    page changed.

    On failure, ``step`` is the guest step that failed: ``"PSC"`` (SNP page-state change),
    ``"PVALIDATE"``, ``"MapGPA"`` (TDX ``TDG.VP.VMCALL<MapGPA>``), ``"TDG.MEM.PAGE.ACCEPT"``,
    ``"KVM_HC_MAP_GPA_RANGE"``, or ``"flows"`` for a platform flow that reports only a bool.
    ``status`` is what the guest read from that step (the PVALIDATE return code, the PSC's
    ``VMGEXIT_PSC_ERROR_*`` code, the TDVMCALL status in r10, the TDCALL status in rax, the
    hypercall's return value), ``None`` if the step never completed. ``gpa`` is where the step
    stopped. If an exit the VMM refused stopped the guest, ``exit`` is the VMM's answer and
    ``errno`` its errno (or that of a failed ``KVM_RUN``). ``detail`` says it in one line.
    """

    ok: bool
    step: str | None = None
    status: int | None = None
    gpa: int | None = None
    errno: int = 0
    exit: ExitResult | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok


#: The successful :class:`ConversionResult` (every success is alike).
CONVERTED = ConversionResult(True)


def step_failed(step: str, r: GuestOpResult, gpa: int, answer: ExitResult | None,
                why: str = "") -> ConversionResult:
    """The :class:`ConversionResult` of a guest ``step`` at ``gpa`` that ended in ``r``: an
    exit the VMM refused, or a completion with a failure status (``why`` names it).
    ``answer`` is the VMM's answer that refused the exit or carried an errno
    (:attr:`pkvm.Guest.last_exit`), if any."""
    if r.ret != "done":
        err = r.errno or (answer.errno if answer is not None else 0)
        if answer is not None and not answer:
            what = f"stopped in an exit the VMM refused: {answer.detail}"
        elif r.ret != "exit":
            what = f"ended with {r.ret!r}"
        else:
            what = f"stopped in exit {r.exit_reason} (errno {err})"
        return ConversionResult(False, step, None, gpa, err, answer, f"{step} at gpa {gpa:#x} {what}")
    status = r.status if r.status is not None else 0
    text = f"{step} at gpa {gpa:#x} failed with status {status:#x}" + (f" ({why})" if why else "")
    if answer is not None:
        text += f"; the VMM: {answer.detail}"
    return ConversionResult(False, step, status, gpa, answer.errno if answer is not None else 0,
                            answer, text)


def kvm_emulate_hypercall(vcpu: Vcpu, nr: int, a0: int, a1: int, a2: int, long_mode: bool) -> GuestOpResult:
    """``____kvm_emulate_hypercall`` for the hypercalls pkvm models (docs/kernel-semantics.md §7.3).

    A 32-bit caller's nr and arguments are cut to 32 bits (after the ``hypercall`` event, as
    the ``kvm_hypercall`` tracepoint sees them uncut), and so is its RAX. ``KVM_HC_MAP_GPA_RANGE``
    exits to userspace when it enabled ``KVM_CAP_EXIT_HYPERCALL`` for it and the arguments pass
    KVM's checks; the guest's RAX is then ``hypercall.ret`` (cut to 32 bits for a 32-bit
    caller). Otherwise RAX is ``-KVM_ENOSYS`` / ``-KVM_EINVAL``. Every call counts in
    ``hypercalls`` and is one exit handled in the kernel (``vmexit``).
    """
    vm = vcpu.vm
    vm._stats["hypercalls"] += 1
    vm._charge("vmexit", 1)
    if vm._subs is not None:
        vm._emit("hypercall", None, None, None, 1, 0, None, (nr, a0, a1, a2))
    rax = U64_MAX
    if not long_mode:  # after the kvm_hypercall tracepoint, as in 6.16-6.19
        nr, a0, a1, a2 = nr & 0xFFFFFFFF, a0 & 0xFFFFFFFF, a1 & 0xFFFFFFFF, a2 & 0xFFFFFFFF
        rax = 0xFFFFFFFF
    if nr != KVM_HC_MAP_GPA_RANGE or not vm.hypercall_exit_mask & (1 << KVM_HC_MAP_GPA_RANGE):
        return GuestOpResult("done", status=-KVM_ENOSYS & rax)
    gfn = a0 >> PAGE_SHIFT
    if a0 & ((1 << PAGE_SHIFT) - 1) or not a1 or gfn + a1 > U64_MAX:
        return GuestOpResult("done", status=-KVM_EINVAL & rax)
    hc = Hypercall(KVM_HC_MAP_GPA_RANGE, (a0, a1, a2), 0, KVM_EXIT_HYPERCALL_LONG_MODE if long_mode else 0)

    def complete() -> GuestOpResult:  # complete_hypercall_exit
        ret = hc.ret & U64_MAX
        if not long_mode:
            ret &= 0xFFFFFFFF
        return GuestOpResult("done", status=ret)

    vm._charge("userspace_exit", 1)
    return hypercall_exit(vcpu, hc, complete)
