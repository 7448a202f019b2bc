"""Structured events: what the model charged and decided, delivered to subscribers.

:meth:`pkvm.VM.subscribe` registers a callback that receives one :class:`Event` per charged
operation and per kernel decision (attribute change, zap, fault and its outcome, exit to
userspace, RMP / S-EPT change, retry, ...). ``docs/events.md`` lists every kind with its
fields; :data:`EVENT_KINDS` names them. With no subscriber, each emission point costs one
``is not None`` test.

The kernel-format trace (:class:`pkvm.experiments.trace.Tracer`) is one subscriber of this
stream: :meth:`pkvm.VM.trace` subscribes it to the kinds of :data:`TRACEPOINT_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from types import TracebackType

    from pkvm.kvm.vm import VM

__all__ = ["Event", "EVENT_KINDS", "Subscription", "TRACEPOINT_KINDS", "check_kinds"]

#: Every event kind, in the order of the table in ``docs/events.md``.
EVENT_KINDS: tuple[str, ...] = (
    # charged work (the only kinds whose ``ns`` is not 0)
    "charge", "uncharge",
    # kernel decisions
    "set_memory_attributes", "attr_change", "zap", "fault", "retry", "userspace_exit", "hypercall",
    "fallocate", "madvise", "rmp_change", "rmp_fault", "vmgexit_enter", "vmgexit_exit",
    "vmgexit_msr_enter", "vmgexit_msr_exit", "sept_change", "op_failed", "vm_dead",
    # the concurrent timeline's locks
    "lock_wait", "lock_hold",
)
_KINDS = frozenset(EVENT_KINDS)

#: The kernel tracepoint that formats each traced kind (``pkvm.experiments.trace``).
TRACEPOINT_KINDS: dict[str, str] = {
    "kvm_vm_set_mem_attributes": "set_memory_attributes",
    "kvm_page_fault": "fault",
    "kvm_userspace_exit": "userspace_exit",
    "kvm_hypercall": "hypercall",
    "sys_enter_fallocate": "fallocate",
    "sys_enter_madvise": "madvise",
    "kvm_rmp_fault": "rmp_fault",
    "kvm_vmgexit_enter": "vmgexit_enter",
    "kvm_vmgexit_exit": "vmgexit_exit",
    "kvm_vmgexit_msr_protocol_enter": "vmgexit_msr_enter",
    "kvm_vmgexit_msr_protocol_exit": "vmgexit_msr_exit",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One event (immutable: a frozen dataclass with slots). ``docs/events.md`` gives each
    kind's fields.

    ``t_ns``: the acting actor's clock when the event was emitted (:meth:`pkvm.VM.clock`; the
    timeline's time when one drives the VM); for a charge, the end of the charged work.
    ``actor``: ``"vmm"`` or ``"vcpuN"``. ``kind``: one of :data:`EVENT_KINDS`.
    ``gfn_start`` / ``gfn_end``: the gfns concerned, ``[gfn_start, gfn_end)``, or None.
    ``op``: the cost-model operation (charges), SEAMCALL or RMP instruction, or lock.
    ``count``: how many (operations, gfns, faults, leaves). ``ns``: modeled ns of the charged
    work (0 for every decision, so that the ``ns`` of all events sum to ``vm.modeled_ns``).
    ``result``: the outcome (a fault's ``"fixed"`` / ``"exit"`` ..., a status code), or None.
    ``args``: the kind's other values, in the order ``docs/events.md`` gives.
    """

    t_ns: int
    actor: str
    kind: str
    gfn_start: int | None = None
    gfn_end: int | None = None
    op: str | None = None
    count: int = 0
    ns: int = 0
    result: Any = None
    args: tuple[Any, ...] = ()


def check_kinds(kinds: object, what: str = "kinds") -> frozenset[str] | None:
    """Validate a ``kinds`` filter: None (every kind), one kind name or an iterable of them.

    Raises:
        TypeError: ``kinds`` is not None, a str or an iterable of str.
        ValueError: an unknown kind (the message lists the known ones), or no kind at all.
    """
    if kinds is None:
        return None
    if isinstance(kinds, str):
        names: tuple[object, ...] = (kinds,)
    elif isinstance(kinds, Iterable):
        names = tuple(kinds)
    else:
        raise TypeError(f"{what} must be None, an event kind or an iterable of them, not {type(kinds).__name__}")
    for k in names:
        if not isinstance(k, str):
            raise TypeError(f"{what} must hold str event kinds, not {type(k).__name__}")
    unknown = [k for k in names if k not in _KINDS]
    if unknown:
        raise ValueError(f"unknown event kind {unknown[0]!r} in {what}; the kinds are: {', '.join(EVENT_KINDS)}")
    if not names:
        raise ValueError(f"{what} is empty: pass None for every kind, or name at least one of: "
                         f"{', '.join(EVENT_KINDS)}")
    return frozenset(names)  # type: ignore[arg-type]


class Subscription:
    """A registered callback (:meth:`pkvm.VM.subscribe`). :meth:`close` (or leaving a
    ``with`` block) stops delivery; closing twice does nothing."""

    __slots__ = ("vm", "callback", "kinds")

    def __init__(self, vm: VM, callback: Callable[[Event], object], kinds: frozenset[str] | None) -> None:
        self.vm = vm
        #: The callable that receives each :class:`Event`.
        self.callback = callback
        #: The kinds delivered (None: every kind).
        self.kinds = kinds

    @property
    def active(self) -> bool:
        """Whether events are still delivered."""
        subs = self.vm._subs
        return subs is not None and self in subs

    def close(self) -> None:
        """Stop delivering events to the callback (``vm.unsubscribe(self)``)."""
        self.vm.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        kinds = "all kinds" if self.kinds is None else ", ".join(k for k in EVENT_KINDS if k in self.kinds)
        return f"<pkvm.Subscription {'active' if self.active else 'closed'} ({kinds}) of {self.callback!r}>"
