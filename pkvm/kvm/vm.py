"""The KVM VM model: memslots, attributes, the invalidation protocol, vCPUs and accounting.

:class:`VM` is the façade of docs/kernel-semantics.md §2-§4 for ``KVM_X86_DEFAULT_VM`` and
``KVM_X86_SW_PROTECTED_VM`` (SNP and TDX plug in through :mod:`pkvm.platforms`). Every call
validates fully before it changes anything, so a failed call changes nothing. Operations are
written as the kernel's phases (``_attr_pre`` / ``_attr_commit`` / ``_attr_post`` /
``_attr_post_unlock``; the fault phases live in :mod:`pkvm.kvm.mmu`) so that a timeline driver can
interleave them.

State: attributes in one :class:`~pkvm._core.RangeMap` (gfn -> bitmask, 0 never stored);
memslots with range-compressed ``lpage_info``; one TDP root (:class:`pkvm.kvm.mmu.Mmu`);
guest_memfd files; simulated host memory; ``mmu_invalidate_seq`` / ``_in_progress`` /
``_range_start`` / ``_range_end`` (§2.8); counters and a modeled clock.

Invariants: see :meth:`VM.check`.
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from types import MappingProxyType, TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from pkvm._core import (AttrIoctlMethod, AttrPath, Cells, Counters, Ledger, LedgerTotal, PageFaultMethod, RangeMap,
                        VmState)
from pkvm.constants import (
    KVM_CAP_EXIT_HYPERCALL,
    KVM_FILTER_ALL,
    KVM_FILTER_SHARED,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_MAX_VCPUS,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_DEFAULT_VM,
    MAX_LFS_FILESIZE,
    PAGE_SHIFT,
    PAGE_SIZE,
    RETRY_LIMIT,
)
from pkvm.cost.model import CostModel
from pkvm.errors import InternalInvariantError, KvmError
from pkvm.host.hostmem import HostMemory, SharedBacking, decode_delta
from pkvm.kvm import batch as _batch
from pkvm.kvm import check as _vm_check
from pkvm.kvm.batch import FaultBatch
from pkvm.kvm.events import EVENT_KINDS, Event, Subscription, check_kinds
from pkvm.kvm.exits import GuestOpResult, begin_insn, kvm_emulate_hypercall
from pkvm.kvm.gmem import GuestMemfd
from pkvm.kvm.inject import FailureInjector
from pkvm.kvm.memslots import Memslot as Memslot  # re-exported: pkvm.kvm.vm.Memslot
from pkvm.kvm.memslots import set_user_memory_region2
from pkvm.kvm.mmu import (
    KVM_MIRROR_ROOTS,
    LEVEL_SHIFT,
    SPTE_PRIVATE,
    SPTE_WRITABLE,
    AccessResult,
    FaultResult,
    Mmu,
    filter_to_root_types,
    fault_path,
    post_set_mixed,
    spte_level,
)
from pkvm.kvm.ops import PLATFORMS, VM_TYPE_NAMES, PlatformOps
from pkvm.kvm.policy import Policy, resolve_policy
from pkvm.kvm.prefault import pre_fault_memory as _pre_fault_memory
from pkvm.kvm.tracepoints import Tracepoints, deliver

U64_MAX = (1 << 64) - 1
INVALID_GFN = U64_MAX  # the kernel's INVALID_GPA sentinel of mmu_invalidate_range_*

#: Counter names in ``vm.stats``: KVM's where KVM has one (kernel-semantics.md §8.1), then pkvm's own.
STAT_KEYS = (
    "pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "remote_tlb_flush",
    "remote_tlb_flush_requests", "pages_4k", "pages_2m", "pages_1g", "mmu_invalidate_seq",
    "pf_retry", "memory_fault_exits", "attr_stores", "zapped_sptes", "huge_page_splits",
    "gmem_pages_allocated", "gmem_pages_freed", "gmem_prepare", "gmem_invalidate",
    "shared_pages_populated", "mem_attr_op_failures", "hypercalls", "hypercall_exits",
)

#: Operations this layer charges, with the ``vm.stats`` counter each follows (names and default
#: values are :mod:`pkvm.cost.model`', from ``docs/costs.md`` §0).
CHARGED_OPS = ("npf_fault", "userspace_exit", "attr_store", "attr_check_gfn", "attr_check_2m", "zap_spte",
               "remote_tlb_flush",
               "gmem_alloc_4k", "gmem_alloc_2m", "gmem_alloc_1g", "gmem_punch_4k", "huge_page_split",
               "vmexit", "pre_fault_page")
_ALLOC_OP = MappingProxyType({0: "gmem_alloc_4k", 9: "gmem_alloc_2m", 18: "gmem_alloc_1g"})

#: Operations a vCPU runs in guest mode (``vcpu->mode == IN_GUEST_MODE``): the guest's own
#: instructions that take no exit (PVALIDATE, RMPADJUST; a TD's ACCEPT, a TDCALL the TDX
#: module serves inside the TD's run). Everything else a vCPU thread is charged for is host
#: code (an exit, a fault handler, QEMU's handling of an exit), during which a KVM request sends
#: it no IPI (docs/timeline.md, "Interrupts and retries"; the Ledger's guest-mode ns).
GUEST_MODE_OPS = frozenset({"pvalidate_4k", "pvalidate_2m", "rmpadjust", "tdx_accept_4k"})

_SHARED_BACKING_ORDER = MappingProxyType({"4k": 0, "thp": 9, "hugetlb-2m": 9, "hugetlb-1g": 18})


def _u64(name: str, value: object) -> int:
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        value = int(value)
    if value < 0 or value > U64_MAX:
        raise ValueError(f"{name}={value:#x} does not fit a u64")
    return value


class VM(VmState):
    """A KVM virtual machine (``KVM_CREATE_VM``).

    ``vm_type`` is a ``KVM_X86_*_VM`` value or its name; ``policy`` a :class:`Policy` or a
    preset name; ``costs`` a :class:`pkvm.CostModel`, None (the platform's defaults from
    ``docs/costs.md``) or overrides for them (``{"attr_store": 80}``, ``"npf_fault=2us"``);
    ``shared_backing`` the VMM's host page size for shared
    memory (``"4k"``, ``"thp"``, ``"hugetlb-2m"``, ``"hugetlb-1g"``); ``nr_vcpus`` the number
    of vCPUs the cost model assumes run the guest (the per-vCPU term of a TLB flush).
    ``seed`` is recorded for the randomized parts of later layers; this layer is
    deterministic. ``options`` are the VM type's own settings (``KVM_CREATE_VM`` plus the
    platform's init ioctl; TDX: ``{"gpaw": 48 or 52}``, see :mod:`pkvm.platforms.tdx`).

    A VM the kernel kills (``kvm_vm_dead``, e.g. a TD guest touching a page it has not
    accepted) or finds a bug in (``KVM_BUG_ON``) has ``vm_dead`` set, and every later VM and
    vCPU call raises ``KvmError(EIO)``; guest_memfd calls still work, as on a file.

    >>> vm = VM("sw_protected")
    >>> vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES)
    8

    Raises:
        KvmError: EINVAL for a VM type pkvm does not (yet) model, like ``KVM_CREATE_VM``.
        ValueError / TypeError: bad ``policy``, ``costs`` (an unknown operation is a ValueError),
            ``shared_backing``, ``nr_vcpus``; ``options`` the VM type does not take (TypeError).
    """

    # The hot state every fault reads (``_sched``, ``_platform``, ``vm_dead``,
    # ``mmu_invalidate_in_progress``, ``_range_start`` / ``_range_end``) and ``nr_vcpus`` (which
    # every remote TLB flush reads) live in C members of the base class pkvm._core.VmState
    # (pkvm/_state.pxi), not in the instance dict: the core reads and writes them in C, Python
    # by name as before.

    def __init__(self, vm_type: int | str = KVM_X86_DEFAULT_VM, policy: Policy | str = "fault-time",
                 costs: CostModel | Mapping[str, object] | None = None, seed: int = 0, shared_backing: str = "thp",
                 nr_vcpus: int = 1, options: Mapping[str, object] | None = None) -> None:
        self._platform: PlatformOps = _resolve_platform(vm_type)
        options = dict(options or {})
        unknown = sorted(set(options) - set(self._platform.options))
        if unknown:
            takes = ", ".join(self._platform.options) or "none"
            raise TypeError(f"options {', '.join(map(repr, unknown))} are not options of a {self._platform.name} VM "
                            f"(it takes: {takes})")
        self._policy = resolve_policy(policy)
        if shared_backing not in _SHARED_BACKING_ORDER:
            raise ValueError(f"shared_backing={shared_backing!r} is not one of {', '.join(_SHARED_BACKING_ORDER)}")
        if type(nr_vcpus) is not int or not 1 <= nr_vcpus <= KVM_MAX_VCPUS:
            raise ValueError(f"nr_vcpus={nr_vcpus!r} must be an int in [1, {KVM_MAX_VCPUS}]")
        if type(seed) is not int:
            raise TypeError(f"seed must be an int, not {type(seed).__name__}")
        if isinstance(costs, CostModel):
            model = costs
        else:
            model = CostModel.default(self._platform.name)
            if costs is not None:
                model = model.with_overrides(costs)
        self._cost_model = model
        # One event of each charged op, in whole ns; N events cost N times that (pkvm.cost.model).
        self._costs = {op: model.ns(op) for op in CHARGED_OPS if op != "remote_tlb_flush"}
        self._flush_ns: dict[int, int] = {}
        self._attr_store_ns = self._costs["attr_store"]
        #: The modeled time, typed (pkvm/_ledger.pxi): ``_modeled_ns`` (a property) is its
        #: total; it holds ``_costs`` and the acting actor's ``_cost_ns``; the core charges in C.
        self._ledger = Ledger(self, self._costs, GUEST_MODE_OPS)
        # Modeled ns per actor and op (Cells: mappings op -> ns, typed); _cost_ns is the current
        # actor's (see _set_actor).
        self._actor = "vmm"
        self._cost_ns: Cells = self._ledger.cells
        self._actor_ns: dict[str, Cells] = {"vmm": self._cost_ns}
        # Per-actor clocks (vm.clock): _actor_tot[a] is a's modeled ns up to its last switch
        # away; the acting actor's clock adds what was charged since _actor_mark. O(1) to read,
        # nothing to do per charge.
        self._actor_tot: dict[str, int] = {"vmm": 0}
        self._actor_mark = 0
        #: Event subscribers (:meth:`subscribe`): a tuple, or None when there are none (every
        #: emission point tests this).
        self._subs: tuple[Subscription, ...] | None = None
        #: The kind of the event whose callback runs (for the EDEADLK message; the flag itself,
        #: ``_in_callback``, is VmState's typed field).
        self._callback_kind: str | None = None
        self._trace_sub: Subscription | None = None
        #: The attached :class:`pkvm.kvm.tracepoints.Tracepoints` (such as a
        #: :class:`pkvm.experiments.trace.Tracer`), or None; it is one subscriber of the events.
        self._tracer: Tracepoints | None = None
        #: The attached :class:`pkvm.sim.Timeline`, or None: the model calls it at the kernel's
        #: lock and retry points (every call site tests this, like the tracer).
        self._sched: Any = None
        #: Failures armed with :meth:`inject_failure` (pkvm.kvm.inject).
        self._inject = FailureInjector()
        self.seed = seed
        self.nr_vcpus = nr_vcpus
        self.shared_backing = shared_backing
        #: The counters, typed (pkvm/_ledger.pxi): the core adds to them at fixed indices.
        self._stats = Counters(STAT_KEYS)
        self._attrs = RangeMap(0, _finger=True)
        self._mmu = Mmu(self._stats, self._charge)
        self._hostmem = HostMemory()
        self._shared = SharedBacking(self._hostmem, _SHARED_BACKING_ORDER[shared_backing])
        # The objects reachable from the VM whose public mutators change its state know it:
        # they refuse from an event callback of it (KvmError(EDEADLK), docs/events.md). The
        # platform's init, memslots and guest_memfds do the same for theirs.
        self._mmu._owner = self._hostmem._owner = self
        self._mmu.sptes._set_owner(self)
        self._slots: dict[int, Memslot] = {}
        nr_as = 1 if self._platform.has_private_mem else 2  # kvm_arch_nr_memslot_as_ids
        self._slot_maps = [RangeMap(0) for _ in range(nr_as)]  # gfn -> slot key + 1
        self._gmems: list[GuestMemfd] = []
        self._vcpus: list[Vcpu] = []
        self._next_fd = 3
        self._supported_attrs = KVM_MEMORY_ATTRIBUTE_PRIVATE if self._platform.has_private_mem else 0
        self.mmu_invalidate_in_progress = 0
        self._range_start = self._range_end = INVALID_GFN
        # Policy knobs read on hot paths, resolved once (the policy is immutable).
        pol = self._policy
        self._guard = pol.hugepage_guard
        self._whole_chunk = pol.mixed_head_in_slot == "whole-chunk"
        self._eager_split = pol.rmp_update == "eager-split"
        self._eager_post = pol.rmp_update in ("eager-post", "eager-split")
        self._eager_locked = pol.rmp_update in ("eager-locked", "eager-split")
        self._legacy = pol.attr_ioctl == "legacy-progress"
        self._sptes = self._mmu.sptes
        #: Warnings the simulated kernel would only log (e.g. a failing ``update_mem_attr``): a
        #: list whose changes refuse from an event callback of this VM (docs/events.md).
        self.events: list[tuple[str, str]] = _KernelLog(self)
        #: ``kvm->vm_dead`` / ``kvm->vm_bugged``: set by :meth:`_kill` / :meth:`_bug`.
        self.vm_dead = False
        self.vm_bugged = False
        #: ``KVM_CAP_EXIT_HYPERCALL`` mask enabled by userspace (hypercalls forwarded to it).
        self.hypercall_exit_mask = 0
        self.options: Mapping[str, object] = MappingProxyType(options)
        self._mirror = self._platform.has_mirror_root
        # kvm_mmu_max_gfn() + 1: the 52-bit guest physical address space the fault path serves
        # (page_fault's bound), narrowed by a platform whose gfns stop lower (TDX: the shared bit)
        self._gfn_limit: int | None = 1 << (52 - PAGE_SHIFT)
        self._platform.init_vm(self)
        #: The attribute ioctl's kernel steps over this VM's typed state (pkvm/_attr.pxi); built
        #: last, once the platform's init has set its costs.
        self._attr_path = AttrPath(self)
        #: The nested page fault's phases over this VM's typed state (pkvm/_fault.pxi).
        self._fault_path = fault_path(self, Vcpu._fault, _gpa_to_gfn, _ALLOC_OP[self._shared.order])

    def __repr__(self) -> str:
        return f"<pkvm.VM {self._platform.name} policy={self._policy} slots={len(self._slots)}>"

    # -- properties -------------------------------------------------------------------------

    @property
    def vm_type(self) -> int:
        """The ``KVM_X86_*_VM`` value."""
        return self._platform.vm_type

    @property
    def platform(self) -> PlatformOps:
        """The registered op table of this VM type."""
        return self._platform

    @property
    def policy(self) -> Policy:
        """The :class:`Policy` in force."""
        return self._policy

    @property
    def stats(self) -> Mapping[str, int]:
        """A snapshot of every counter (KVM's names first, then pkvm's)."""
        return self._stats.copy()

    @property
    def modeled_ns(self) -> int:
        """Total modeled time of every completed operation, in ns."""
        return self._ledger.modeled_ns

    #: The modeled ns so far: the ledger's total, read and set in C (other layers use it).
    _modeled_ns = LedgerTotal()

    def cost_breakdown(self) -> dict[str, int]:
        """Modeled ns per :mod:`pkvm.cost.model` operation (``npf_fault``, ``attr_store``, ...)."""
        out: dict[str, int] = {}
        for cells in self._actor_ns.values():
            for op, ns in cells.items():
                out[op] = out.get(op, 0) + ns
        return out

    def cost_by_actor(self) -> dict[str, dict[str, int]]:
        """Modeled ns per actor, then per operation: ``{"vmm": {...}, "vcpu0": {...}}``.

        The actor is whoever the work ran for: ``"vmm"`` (the VMM's ioctl and syscall thread;
        also every call made directly on the VM) and ``"vcpuN"`` while :class:`pkvm.Guest`
        runs guest code on vCPU N (faults, exits handled in KVM, guest instructions). The
        :class:`pkvm.Vmm` switches back to ``"vmm"`` while it answers an exit.
        """
        return {a: dict(c) for a, c in sorted(self._actor_ns.items()) if c}

    # -- the public actor and clock ------------------------------------------------------------

    @property
    def actor(self) -> str:
        """Who is acting: ``"vmm"`` or ``"vcpuN"`` (see :meth:`acting`)."""
        return self._actor

    def _check_actor(self, actor: object) -> str:
        if type(actor) is not str:
            raise TypeError(f"actor must be a str ('vmm' or 'vcpuN'), not {type(actor).__name__}")
        if actor in self._actor_ns or actor == "vmm":
            return actor  # has acted before: valid (vCPUs are never destroyed)
        n = actor[4:]
        if actor.startswith("vcpu") and n.isdecimal() and n.isascii() and str(int(n)) == n \
                and int(n) < len(self._vcpus):
            return actor
        have = f"vcpu0 to vcpu{len(self._vcpus) - 1}" if self._vcpus else "no vCPU yet"
        raise ValueError(f"actor {actor!r} is not 'vmm' or 'vcpuN' of an existing vCPU (this VM has {have})")

    def acting(self, actor: str) -> _Acting:
        """A context manager: inside ``with vm.acting("vcpu1"):`` the VM's work is charged to
        ``actor`` (``"vmm"``, or ``"vcpuN"`` for an existing vCPU N); the previous actor is
        restored on leaving, also on an exception. Blocks nest.

        >>> vm = VM("sw_protected"); _ = vm.create_vcpu()
        >>> with vm.acting("vcpu0"):
        ...     vm.actor
        'vcpu0'
        >>> vm.actor
        'vmm'

        Raises:
            TypeError: ``actor`` is not a str.
            ValueError: any other name (nothing changes).
        """
        if self._in_callback:
            self._nested_call()
        return _Acting(self, self._check_actor(actor))

    def clock(self, actor: str | None = None) -> int:
        """``actor``'s modeled ns so far (default: the acting actor); O(1). Equals the sum of
        ``cost_by_actor()[actor]``; 0 for an existing vCPU that has not acted.

        Raises:
            TypeError / ValueError: as :meth:`acting`.
        """
        cur = self._actor
        if actor is None or actor == cur:
            return self._actor_tot[cur] + self._modeled_ns - self._actor_mark
        tot = self._actor_tot.get(actor)
        if tot is None:
            self._check_actor(actor)
            return 0
        return tot

    def actor_totals(self) -> Mapping[str, int]:
        """A live read-only view ``{actor: clock(actor)}`` of every actor that has acted
        (``"vmm"`` always): nothing is copied, each read is O(1)."""
        return _ActorClocks(self)

    # -- structured events (docs/events.md) -----------------------------------------------------

    def subscribe(self, callback: Callable[[Event], object], kinds: str | Iterable[str] | None = None) -> Subscription:
        """Call ``callback(event)`` with each :class:`pkvm.Event` of the ``kinds`` given (one
        name, an iterable of names, or None for all of :data:`pkvm.EVENT_KINDS`), from now
        until the returned :class:`pkvm.Subscription` is closed (``sub.close()``, leaving its
        ``with`` block, or :meth:`unsubscribe`). ``docs/events.md`` describes every kind.

        Callbacks run synchronously, in subscription order, after the state change they report;
        they may read the VM and subscribe and unsubscribe (effective from the next event). A
        callback must not raise: its exception propagates out of the VM call that emitted the
        event. A call from a callback into this VM that would change it (an ioctl, a fault, a
        memslot or guest_memfd change, a guest instruction, a :class:`pkvm.Vmm` or
        :class:`pkvm.Guest` operation, :meth:`acting`, :meth:`inject_failure`, a batched call,
        a mutator of an object the VM hands out as its live state: ``vm.events``, ``vm.mmu``,
        ``vm.hostmem``, a memslot's ``lpage``, ``vm.rmp``, ``vm.directmap``, ``vm.sept``,
        ``vm.tdx.seamcalls`` and their RangeMaps; docs/events.md lists them)
        raises ``KvmError(EDEADLK)`` and changes nothing: the emitting call is part way through
        and holds the VM's locks, on which the kernel's nested ioctl would block. A callback
        that catches it lets the emitting call finish exactly as without the attempt.

        Raises:
            TypeError: ``callback`` is not callable, or ``kinds`` is not a str / iterable of str.
            ValueError: an unknown kind (the message lists the known ones) or an empty ``kinds``.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        sub = Subscription(self, callback, check_kinds(kinds))
        self._subs = (*(self._subs or ()), sub)
        self._ledger.traced = True
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering events to ``sub`` (nothing happens if it is already closed).

        Raises:
            TypeError: ``sub`` is not a :class:`pkvm.Subscription`.
            ValueError: ``sub`` belongs to another VM.
        """
        if not isinstance(sub, Subscription):
            raise TypeError(f"sub must be a pkvm.Subscription, not {type(sub).__name__}")
        if sub.vm is not self:
            raise ValueError("sub is a subscription of another VM")
        subs = self._subs
        if subs is not None and sub in subs:
            rest = tuple(s for s in subs if s is not sub)
            self._subs = rest or None
            self._ledger.traced = self._subs is not None

    def _emit(self, kind: str, gfn_start: int | None = None, gfn_end: int | None = None, op: str | None = None,
              count: int = 0, ns: int = 0, result: object = None, args: tuple[object, ...] = ()) -> None:
        """Deliver one event to the subscribers that want ``kind``. Emission points test
        ``vm._subs is not None`` first; other layers (the timeline) call this directly."""
        subs = self._subs
        if subs is None:
            return
        if kind not in _EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; the kinds are: {', '.join(EVENT_KINDS)}")
        ev = None
        # While a callback runs, every state-changing entry point of this VM (its vCPUs,
        # guest_memfds and actors) refuses with EDEADLK (:meth:`_nested_call`); reset in the
        # finally, also when a callback raises. Restored, not cleared: an emission from inside
        # a callback (none is reachable through the public API) leaves the outer one's flag.
        outer = self._in_callback
        self._in_callback = True
        try:
            for sub in subs:
                if sub.kinds is None or kind in sub.kinds:
                    if ev is None:
                        sched = getattr(self, "_sched", None)
                        t = sched.now_ns if sched is not None else (
                            self._actor_tot[self._actor] + self._modeled_ns - self._actor_mark)
                        ev = Event(t, self._actor, kind, gfn_start, gfn_end, op, count, ns, result, args)
                    self._callback_kind = kind
                    sub.callback(ev)
        finally:
            self._in_callback = outer

    def trace(self, tracer: Tracepoints | None) -> None:
        """Attach a tracer (or detach with None): from now on every traced event goes to it. Off,
        tracing costs one test per event. ``tracer`` is a :class:`pkvm.experiments.trace.Tracer`
        (the kernel's text formats, kernel-semantics.md §8.2) or any other :class:`pkvm.kvm.tracepoints.Tracepoints`."""
        if tracer is not None and not isinstance(tracer, Tracepoints):
            raise TypeError(f"tracer must be a pkvm.kvm.tracepoints.Tracepoints (such as "
                            f"pkvm.experiments.trace.Tracer) or None, not {type(tracer).__name__}")
        kinds = None
        if tracer is not None:
            kinds = check_kinds(tracer.trace_kinds(), "tracer.trace_kinds()")
            tracer.attach(self)
        if self._trace_sub is not None:
            self._trace_sub.close()
            self._trace_sub = None
        if tracer is not None:
            self._trace_sub = self.subscribe(partial(deliver, tracer, self), kinds)
        self._tracer = tracer

    @property
    def costs(self) -> CostModel:
        """The :class:`pkvm.CostModel` that prices this VM's operations."""
        return self._cost_model

    @property
    def mmu_invalidate_range(self) -> tuple[int, int]:
        """``(mmu_invalidate_range_start, _end)`` as the kernel leaves them (INVALID = 2**64-1)."""
        return (self._range_start, self._range_end)

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        return tuple(self._vcpus)

    def memslot(self, slot: int) -> Memslot | None:
        """The memslot with id ``slot`` (``as_id << 16 | id``), or None."""
        return self._slots.get(slot)

    @property
    def memslots(self) -> tuple[Memslot, ...]:
        """Every memslot, by key."""
        return tuple(self._slots[k] for k in sorted(self._slots))

    @property
    def mmu(self) -> Mmu:
        """The TDP MMU model (``vm.mmu.lookup(gfn)`` gives the leaf SPTE)."""
        return self._mmu

    @property
    def hostmem(self) -> HostMemory:
        """The simulated host memory that backs this VM."""
        return self._hostmem

    # -- accounting ---------------------------------------------------------------------------

    def _charge(self, op: str, n: int) -> None:
        """``n`` events of ``op`` at their price, on the acting actor (the ``charge`` event)."""
        self._ledger.charge(op, n)

    def _charge_alloc(self, npages: int, order: int) -> None:
        """Charge the allocation of ``npages`` pages in host pages / folios of ``order``."""
        self._charge(_ALLOC_OP[order], npages >> order)

    def _uncharge_alloc(self, npages: int, order: int) -> None:
        op = _ALLOC_OP[order]
        ns = self._costs[op] * (npages >> order)
        self._cost_ns[op] -= ns
        if not self._cost_ns[op]:
            del self._cost_ns[op]
        self._modeled_ns -= ns
        if self._subs is not None:
            self._emit("uncharge", None, None, op, npages >> order, -ns)

    def _flush_remote_tlbs(self) -> None:
        """``kvm_flush_remote_tlbs``: every request is modelled as sent (vCPUs in guest mode)."""
        self._attr_path.flush_remote_tlbs()  # pkvm/_attr.pxi

    def _zap(self, start: int, end: int, attr_filter: int = KVM_FILTER_ALL) -> int:
        """``kvm_unmap_gfn_range`` on ``[start, end)``; return the number of leaves zapped.

        ``attr_filter`` (``KVM_FILTER_SHARED`` / ``_PRIVATE``) selects the roots of a VM with a
        mirror root (§2.5); other VMs have one root and zap everything. Mirror leaves go
        through the platform: huge leaves only partly inside the range are split first
        (``split_external_spte``), then every zapped run is removed (``remove_external_spte``).
        """
        return self._attr_path.zap(start, end, attr_filter)

    def _madvise_dontneed(self, start: int, end: int) -> int:
        """``MADV_DONTNEED`` on the HVA pages ``[start, end)`` of the VMM's shared backing, as
        the host MM runs it for a VM: bracketed by KVM's MMU notifier
        (``kvm_mmu_notifier_invalidate_range_start`` / ``_end``, ``virt/kvm/kvm_main.c``),
        which, when the range overlaps a memslot, zaps the gfns it maps under ``mmu_lock``
        (with a TLB flush if anything was mapped) and bumps ``mmu_invalidate_seq``; returns
        the pages freed (``AttrPath.madvise_dontneed``, pkvm/_attr.pxi; docs/kernel-semantics.md
        §4.7). The one entry for every discard of the shared backing: ``pkvm.Vmm`` and the
        trace replay call it."""
        return self._attr_path.madvise_dontneed(self._shared, start, end)

    def _zap_mirror(self, start: int, end: int, attr_filter: int) -> int:
        """The zap of :meth:`_zap` in a VM with a mirror root, without its accounting."""
        mmu, platform = self._mmu, self._platform
        types = filter_to_root_types(True, attr_filter)
        if types & KVM_MIRROR_ROOTS:
            for g in (start, end - 1):
                v = mmu.sptes.get(g)
                if v & SPTE_PRIVATE and spte_level(v) > 1:
                    size = 1 << LEVEL_SHIFT[spte_level(v)]
                    base = g & -size
                    if base < start or base + size > end:
                        platform.split_external_spte(self, g, spte_level(v))
                        mmu.split_to(g, spte_level(v) - 1)
        removed: list[tuple[int, int, int]] = []
        n = mmu.zap_range(start, end, types, removed)
        for s, e, v in removed:
            platform.remove_external_spte(self, s, e, spte_level(v), decode_delta(v))
        return n

    # -- kvm_vm_dead / KVM_BUG_ON --------------------------------------------------------------

    def _check_alive(self) -> None:
        """The entry check of a state-changing call: EIO if the VM is dead (the kernel tests
        ``kvm->vm_dead`` before it takes any lock), then EDEADLK from an event callback
        (:meth:`_nested_call`). Callers on hot paths test ``vm_dead or _in_callback`` first."""
        if self.vm_dead:
            why = "KVM_BUG_ON" if self.vm_bugged else "kvm_vm_dead"
            raise KvmError(errno.EIO, f"the VM is dead ({why}: {self.events[-1][1] if self.events else ''}); "
                           "every VM and vCPU ioctl fails with EIO")
        if self._in_callback:
            self._nested_call()

    def _nested_call(self) -> None:
        """Refuse a call made from an event callback of this VM (docs/events.md): the call
        that emitted the event is part way through, holding what the kernel would hold as
        locks; a nested ioctl would block on them (``kvm_vm_ioctl_set_mem_attributes`` on
        ``kvm->slots_lock``, a fault on ``kvm->mmu_lock``, ...), in one thread forever.
        Nothing has changed when this raises."""
        raise KvmError(errno.EDEADLK, f"called from an event callback of this VM (a {self._callback_kind!r} "
                       "event): the call that emitted it holds the VM's locks; record what you need and "
                       "act after that call returns")

    def _kill(self, reason: str) -> None:
        """``kvm_vm_dead``: later VM and vCPU ioctls fail with EIO; ``reason`` goes to ``events``."""
        self.vm_dead = True
        # (list.append: the kernel's own log line, also when a death is reached from an event
        # callback, which _KernelLog refuses to a caller's append)
        list.append(self.events, ("kvm_vm_dead", reason))
        if self._subs is not None:
            self._emit("vm_dead", op="kvm_vm_dead", result=reason)

    def _bug(self, reason: str) -> None:
        """``KVM_BUG_ON`` / ``kvm_vm_bugged``: the VM is marked bugged and dead."""
        self.vm_bugged = True
        self.vm_dead = True
        list.append(self.events, ("kvm_vm_bugged", reason))
        if self._subs is not None:
            self._emit("vm_dead", op="kvm_vm_bugged", result=reason)

    # -- the invalidation protocol (§2.8) -----------------------------------------------------

    # _invalidate_begin / _invalidate_range_add (kvm_mmu_invalidate_begin / _range_add): the
    # VmState methods, whose C functions the hole punch also calls (pkvm/_attr.pxi)

    def _invalidate_end(self) -> None:
        self._stats["mmu_invalidate_seq"] += 1
        self.mmu_invalidate_in_progress -= 1
        if self.mmu_invalidate_in_progress < 0:
            raise InternalInvariantError("mmu_invalidate_in_progress went negative")
        if self._sched is not None:
            self._sched.changed()

    # -- memslot lookup ---------------------------------------------------------------------

    def _slot_at(self, gfn: int) -> Memslot | None:
        key = self._slot_maps[0].get(gfn)
        return self._slots[key - 1] if key else None

    def _slot_ranges(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Slot-clipped pieces ``(s, e, slot key + 1)`` of ``[start, end)``, every address space
        (``kvm_handle_gfn_range``); ``self._slots[key - 1]`` is the memslot."""
        maps = self._slot_maps
        if len(maps) == 1:
            return maps[0].ranges(start, end)
        return [r for m in maps for r in m.ranges(start, end)]

    # -- KVM_SET_MEMORY_ATTRIBUTES (§2) ---------------------------------------------------------

    @property
    def attr_ioctls(self) -> int:
        """``KVM_SET_MEMORY_ATTRIBUTES`` calls that passed validation (short-circuited ones too).
        Kept in the attribute path's typed state (pkvm/_attr.pxi); set only to an int in
        [0, 2**63) (TypeError / ValueError otherwise, the count unchanged)."""
        return self._attr_path.ioctls

    @attr_ioctls.setter
    def attr_ioctls(self, value: int) -> None:
        self._attr_path.ioctls = value

    @property
    def mmu_lock_ns(self) -> int:
        """Modeled ns of work done while holding ``mmu_lock`` for write: the attribute ioctl's
        PRE (zap) and POST (MIXED update, and the eager-locked op) phases and guest_memfd
        invalidations. vCPU faults wait for the lock meanwhile (they take it for read). Kept
        in the attribute path's typed state (pkvm/_attr.pxi); set only to an int or a float
        (TypeError otherwise, the total unchanged)."""
        ns: int = self._attr_path.mmu_lock_ns
        return ns

    @mmu_lock_ns.setter
    def mmu_lock_ns(self, value: int) -> None:
        self._attr_path.mmu_lock_ns = value

    @property
    def _attr_op(self) -> AttrIoctl | None:
        """The unfinished :class:`AttrIoctl` of :meth:`begin_set_memory_attributes`, or None
        (kept in the attribute path's typed state, which tests it on every ioctl)."""
        op: AttrIoctl | None = self._attr_path.attr_op
        return op

    @_attr_op.setter
    def _attr_op(self, op: AttrIoctl | None) -> None:
        self._attr_path.attr_op = op

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` on the gpas ``[address, address + size)``.

        Semantics (kernel-semantics.md §2.4): if every gfn already has ``attributes`` nothing happens (no
        zap, flush or sequence bump). Otherwise the PRE phase zaps each slot-clipped piece
        inside one invalidation (begun lazily at the first memslot), the attributes are
        stored for every gfn (``attr_stores`` counts them), and the POST phase ends the
        invalidation and recomputes the MIXED flags (§3.3). Gfns outside memslots still get
        the attribute. All or nothing.

        Runtime complexity: O(log n + k) for k runs touched.

        >>> vm = VM("sw_protected")
        >>> vm.set_memory_attributes(0x200000, 0x1000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        >>> vm.get_memory_attributes(0x200)
        8

        Raises:
            KvmError: EINVAL, in the kernel's order (§2.2): ``flags != 0``, unsupported
                attribute bits, ``size == 0``, wrap-around past 2**64, unaligned address or size;
                EDEADLK while a :meth:`begin_set_memory_attributes` ioctl is unfinished, or
                from an event callback of this VM (:meth:`subscribe`).
            TypeError / ValueError: an argument is not an int or does not fit a u64.
        """
        self._attr_path.ioctl(address, size, attributes, flags)

    def _set_attrs_checked(self, start: int, end: int, attributes: int) -> None:
        """:meth:`set_memory_attributes` after its argument checks, on the gfns ``[start, end)``.

        For callers that validated once at their own boundary (the batched calls): the VM is
        alive, ``start < end <= 2**52`` and ``attributes`` are supported ones (what
        :meth:`_attr_check` returns for accepted arguments). Everything else is the ioctl's:
        EDEADLK while a :meth:`begin_set_memory_attributes` ioctl is unfinished, the call
        counted and traced, the short-circuit, injected failures, the phases, the timeline.
        """
        self._attr_path.checked(start, end, attributes)

    def _attr_xa_reserve(self, start: int, end: int) -> None:
        """An armed ``xa_reserve`` failure (pkvm.kvm.inject), checked before the PRE zap."""
        hit = self._inject.take("xa_reserve", end - start)
        if hit is not None:
            # kvm_vm_set_mem_attributes reserves every gfn's xarray slot before the PRE zap: a
            # failed xa_reserve returns before anything changed (reserved slots are invisible).
            raise KvmError(hit[1], f"xa_reserve failed at gfn {start + hit[0]:#x} (injected): nothing changed")

    def _attr_check(self, address: int, size: int, attributes: int, flags: int) -> tuple[int, int, int]:
        """The ioctl's checks, in the kernel's order; the gfn range and the attributes."""
        if self.vm_dead or self._in_callback:
            self._check_alive()
        if not type(address) is type(size) is type(attributes) is type(flags) is int or (
                (address | size | attributes | flags) >> 64):  # also true for negative values
            address, size = _u64("address", address), _u64("size", size)
            attributes, flags = _u64("attributes", attributes), _u64("flags", flags)
        if flags:
            raise KvmError(errno.EINVAL, f"flags {flags:#x} must be 0")
        if attributes & ~self._supported_attrs:
            raise KvmError(errno.EINVAL, f"attributes {attributes:#x} not supported by a {self._platform.name} VM "
                           f"(supported: {self._supported_attrs:#x})")
        if not size:
            raise KvmError(errno.EINVAL, f"size 0x0 is empty: [{address:#x}, {address:#x})")
        end_addr = address + size
        if end_addr > U64_MAX:
            raise KvmError(errno.EINVAL, f"[{address:#x}, {address:#x} + {size:#x}) wraps around 2**64")
        if (address | size) & (PAGE_SIZE - 1):
            raise KvmError(errno.EINVAL, f"[{address:#x}, {end_addr:#x}) is not 4 KiB aligned")
        return address >> PAGE_SHIFT, end_addr >> PAGE_SHIFT, attributes

    def begin_set_memory_attributes(self, address: int, size: int, attributes: int,
                                    flags: int = 0) -> AttrIoctl:
        """``KVM_SET_MEMORY_ATTRIBUTES``, stopped after its first phase: returns an
        :class:`AttrIoctl` to run the rest phase by phase (``begin``, ``pre``, ``commit``,
        ``post``, ``end``; ``docs/kvm-model.md``). Between two phases a test or an embedder can
        run another vCPU's fault, as the kernel allows (``slots_lock`` is held, ``mmu_lock`` is
        not): that is the window the 6.15+ head/tail-chunk guard protects. Until the returned
        ioctl has finished, calls that need ``slots_lock`` (another attribute ioctl, a memslot
        change) raise ``KvmError(EDEADLK)``: in one thread they would wait forever.

        >>> vm = VM("sw_protected")
        >>> op = vm.begin_set_memory_attributes(0x200000, 0x1000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        >>> op.phase, op.step(), op.step(), vm.get_memory_attributes(0x200)
        ('begin', 'pre', 'commit', 8)
        >>> op.finish(), op.done
        ('end', True)

        Raises:
            As :meth:`set_memory_attributes` (nothing has changed then), and ``KvmError(EDEADLK)``.
        """
        start, end, attributes = self._attr_check(address, size, attributes, flags)
        self._attr_free()
        self.attr_ioctls += 1
        if self._subs is not None:  # traced on entry, before the short-circuit (6.17+)
            self._emit("set_memory_attributes", start, end, None, end - start, 0, None, (attributes,))
        op = AttrIoctl(self, start, end, attributes)
        if not op.done:
            self._attr_op = op
        return op

    def _attr_free(self) -> None:
        if self._attr_op is not None:
            raise KvmError(errno.EDEADLK, "an unfinished KVM_SET_MEMORY_ATTRIBUTES holds slots_lock "
                           f"(phase {self._attr_op.phase!r}); finish it first (op.finish())")

    def _attr_timeline(self, sched: Any, start: int, end: int, attrs: int, lat: Any) -> None:
        """The ioctl's phases at the kernel's lock points, for the concurrent timeline: the whole
        ioctl under ``slots_lock``; PRE and POST each under ``mmu_lock`` for write, dropped in
        between (the store runs with only ``slots_lock``, while the invalidation is in
        progress); the RFC v8 post-unlock op after the lock is dropped, still under
        ``slots_lock`` (docs/timeline.md). The phases are :class:`AttrIoctl`'s. The typed
        ioctl (``AttrPath._timeline``, pkvm/_attr.pxi) began the latency sample ``lat``, took
        ``slots_lock`` and found the call no §2.7 short-circuit; this releases the lock and
        ends the sample."""
        op = AttrIoctl(self, start, end, attrs, _checked=True)
        locked = bool(op._ranges)
        op._before_lock()
        while not op.done:
            take = locked and op.next in (("post",) if self._legacy else ("pre", "post"))
            if take:
                sched.acquire("mmu_lock")
            op.step()
            if take:
                sched.release("mmu_lock")
        sched.release("slots_lock")
        sched.latency_end("attr_ioctl", lat)

    def _attr_legacy(self, start: int, end: int, attrs: int) -> None:
        """The UPM-era ioctl of the RFC v8 series (docs/kernel-semantics.md §2.6, "historical").

        No short-circuit; ``invalidate_begin`` and ``range_add(start, end)`` whether or not a
        memslot intersects; the store; then, under the lock, per memslot piece the zap and the
        MIXED update (``kvm_mem_attrs_changed``), one flush, ``invalidate_end``; then the
        post-lock op. The kernel wrote back ``address = end``, ``size = 0`` (its store could
        fail part way; pkvm's cannot, so the progress is always complete).
        """
        ranges = self._slot_ranges(start, end)
        if ranges and self._eager_split:
            self._attr_pre_lock(ranges, attrs)
        self._invalidate_begin()
        self._invalidate_range_add(start, end)
        self._attr_commit(start, end, attrs)
        t0 = self._modeled_ns
        self._attr_legacy_locked(ranges, attrs)
        self.mmu_lock_ns += self._modeled_ns - t0
        self._invalidate_end()
        if ranges and self._eager_post:
            self._attr_post_unlock(ranges, attrs)

    def _attr_legacy_locked(self, ranges: list[tuple[int, int, int]], attrs: int) -> None:
        """The legacy ioctl's part under ``mmu_lock``: per memslot piece the zap, the MIXED update
        and the eager-locked op (``kvm_mem_attrs_changed``), then one flush."""
        zapped = 0
        for s, e, key in ranges:
            slot = self._slots[key - 1]
            zapped += self._zap(s, e)
            post_set_mixed(self, slot, s, e, attrs)
            if self._eager_locked:
                r = self._platform.set_mem_attr(self, slot, attrs, s, e)
                if r:
                    self._op_failed("set_mem_attr", slot, attrs, s, e, r)
        if zapped:
            self._flush_remote_tlbs()

    def _attr_pre_lock(self, ranges: list[tuple[int, int, int]], attrs: int) -> None:
        """Before ``mmu_lock`` is taken: the ``pre_set_mem_attr`` op per slot-clipped piece
        (``rmp_update="eager-split"``: the direct-map change that may sleep, §7.7)."""
        for s, e, key in ranges:
            slot = self._slots[key - 1]
            r = self._platform.pre_set_mem_attr(self, slot, attrs, s, e)
            if r:
                self._op_failed("pre_set_mem_attr", slot, attrs, s, e, r)

    def _attr_pre(self, ranges: list[tuple[int, int, int]], attrs: int) -> None:
        """PRE phase: ``kvm_pre_set_memory_attributes`` per slot-clipped piece (§2.4, §2.5).

        ``invalidate_begin`` runs once, when the lock is taken at the first intersecting
        slot; each piece is added to the invalidation range (plus, with the 6.15+ guard, its
        partially covered head/tail hugepages that are not MIXED) and zapped. One TLB flush
        covers the phase. Helpers are inlined: this is the ioctl's hot path.
        """
        self._attr_path.pre(ranges, attrs)

    def _attr_commit(self, start: int, end: int, attrs: int) -> None:
        """The store: one ``xa_store`` per gfn in the kernel, one range assignment here."""
        self._attr_path.commit(start, end, attrs)

    def _attr_post(self, ranges: list[tuple[int, int, int]], attrs: int) -> None:
        """POST phase: ``invalidate_end`` at lock time, then MIXED recomputation (§3.3)."""
        self._attr_path.post(ranges, attrs)

    def _attr_post_unlock(self, ranges: list[tuple[int, int, int]], attrs: int) -> None:
        """After ``mmu_lock`` is dropped: the RFC v8 ``update_mem_attr`` op (§7.7)."""
        for s, e, key in ranges:
            slot = self._slots[key - 1]
            r = self._platform.update_mem_attr(self, slot, attrs, s, e)
            if r:
                self._op_failed("update_mem_attr", slot, attrs, s, e, r)

    def _op_failed(self, op: str, slot: Memslot, attrs: int, s: int, e: int, r: int) -> None:
        # The kernel only pr_warn_ratelimited()s; pkvm records and counts it, so it shows.
        self._stats["mem_attr_op_failures"] += 1
        self.events.append((op, f"failed to update gfns [{s:#x}, {e:#x}) with attributes {attrs:#x}: {r}"))
        if self._subs is not None:
            self._emit("op_failed", s, e, op, e - s, 0, r, (attrs,))

    def get_memory_attributes(self, gfn: int) -> int:
        """The attribute bitmask of ``gfn`` (introspection; KVM has no GET ioctl).

        Raises:
            TypeError: ``gfn`` is not an int.
            ValueError: ``gfn`` is negative or does not fit a u64.
        """
        return self._attrs.get(_u64("gfn", gfn))

    # -- memslots (§2.9) ------------------------------------------------------------------------

    def set_user_memory_region2(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int = 0, guest_memfd: GuestMemfd | None = None,
                                guest_memfd_offset: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``: create, move, re-flag or (``memory_size=0``) delete a slot.

        The slot covers gfns ``[guest_phys_addr >> 12, (guest_phys_addr + memory_size) >> 12)``.
        Creation initializes ``lpage_info`` (§3.1); deletion and moves zap the old range.

        Raises:
            KvmError: with the kernel's errno (§2.9): EINVAL for bad flags / alignment /
                wrap-around / slot id / size, an invalid guest_memfd, an overlapping binding or
                a change to a guest_memfd slot; EEXIST when the gpa range overlaps another
                slot; EBADF for a closed guest_memfd.
        """
        self._check_alive()
        self._attr_free()  # the memslot update takes slots_lock
        set_user_memory_region2(self, slot, flags, guest_phys_addr, memory_size, userspace_addr,
                                guest_memfd, guest_memfd_offset)

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``: a guest_memfd of ``size`` bytes bound to this VM.

        Raises:
            KvmError: EINVAL for unknown flag bits (pkvm offers none: gmem-only memslots are
                not modelled) or a size that is not a positive multiple of 4 KiB.
        """
        self._check_alive()
        size, flags = self._gmem_args(size, flags)
        gmem = GuestMemfd(self, self._next_fd, size, flags)
        self._next_fd += 1
        self._gmems.append(gmem)
        return gmem

    @staticmethod
    def _gmem_args(size: object, flags: object) -> tuple[int, int]:
        """:meth:`create_guest_memfd`'s argument checks (the VMM runs them before it creates
        anything); the size and flags."""
        size, flags = _u64("size", size), _u64("flags", flags)
        if flags:
            raise KvmError(errno.EINVAL, f"guest_memfd flags {flags:#x} are not supported (valid: 0x0)")
        if size == 0 or size > MAX_LFS_FILESIZE or size & (PAGE_SIZE - 1):
            raise KvmError(errno.EINVAL, f"guest_memfd size {size:#x} must be a positive multiple of 4 KiB")
        return size, flags

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd; unknown capabilities give 0. A query: allowed
        from an event callback."""
        if self.vm_dead:
            self._check_alive()
        cap = _u64("cap", cap)
        if cap == KVM_CAP_EXIT_HYPERCALL:
            return KVM_EXIT_HYPERCALL_VALID_MASK
        if cap == KVM_CAP_MEMORY_ATTRIBUTES:
            return self._supported_attrs
        if cap == KVM_CAP_GUEST_MEMFD:
            return int(self._platform.has_private_mem)
        if cap in (KVM_CAP_USER_MEMORY2, KVM_CAP_MEMORY_FAULT_INFO):
            return 1
        if cap == KVM_CAP_VM_TYPES:
            return sum(1 << t for t in PLATFORMS)
        return 0

    def enable_cap(self, cap: int, args0: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM. Only ``KVM_CAP_EXIT_HYPERCALL`` is modelled: ``args0``
        is the mask of hypercalls to forward to userspace (``1 << KVM_HC_MAP_GPA_RANGE``).

        Raises:
            KvmError: EINVAL for another capability or a bit outside
                ``KVM_EXIT_HYPERCALL_VALID_MASK`` (§7.3).
        """
        self._check_alive()
        cap, args0 = _u64("cap", cap), _u64("args0", args0)
        if cap != KVM_CAP_EXIT_HYPERCALL:
            raise KvmError(errno.EINVAL, f"KVM_ENABLE_CAP: capability {cap} cannot be enabled on a VM in pkvm "
                           f"(only KVM_CAP_EXIT_HYPERCALL = {KVM_CAP_EXIT_HYPERCALL})")
        if args0 & ~KVM_EXIT_HYPERCALL_VALID_MASK:
            raise KvmError(errno.EINVAL, f"KVM_CAP_EXIT_HYPERCALL mask {args0:#x} has bits outside "
                           f"{KVM_EXIT_HYPERCALL_VALID_MASK:#x}")
        self.hypercall_exit_mask = args0

    # -- vCPUs ------------------------------------------------------------------------------------

    def create_vcpu(self) -> Vcpu:
        """``KVM_CREATE_VCPU`` with the next id.

        Raises:
            KvmError: EINVAL past ``KVM_MAX_VCPUS``; EIO for a TD already finalized
                (``tdx_vcpu_create``).
        """
        self._check_alive()
        if len(self._vcpus) >= KVM_MAX_VCPUS:
            raise KvmError(errno.EINVAL, f"a VM has at most {KVM_MAX_VCPUS} vCPUs")
        vcpu = self._platform.create_vcpu(self, len(self._vcpus)) or Vcpu(self, len(self._vcpus))
        self._vcpus.append(vcpu)
        return vcpu

    # -- failure injection ---------------------------------------------------------------------

    def inject_failure(self, site: str, err: int, *, times: int = 1, after: int = 0) -> None:
        """Make the kernel's allocation at ``site`` fail with ``err``: calls ``after + 1`` to
        ``after + times`` from now fail, the others succeed; ``times=0`` disarms the site.

        Sites (docs/kvm-model.md, "Failure injection"; a call is counted in the kernel's unit):
        ``"xa_reserve"`` (one gfn of ``KVM_SET_MEMORY_ATTRIBUTES``: ``ENOMEM``, nothing
        changed), ``"mmu_topup"`` (one fault: ``KVM_RUN`` returns ``-ENOMEM``, nothing mapped),
        ``"gmem_folio_alloc"`` (one guest_memfd folio allocated: a fault exits with
        ``-ENOMEM``; fallocate and populate keep what they did before it) and ``"set_memory"``
        (one direct-map CPA call before an SNP RMPUPDATE: that RMPUPDATE is not done). Only
        ``errno.ENOMEM`` is accepted: it is what these allocations return.

        >>> import errno
        >>> vm = VM("sw_protected")
        >>> vm.inject_failure("xa_reserve", errno.ENOMEM)
        >>> vm.set_memory_attributes(0, 0x1000, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        Traceback (most recent call last):
        ...
        pkvm.errors.KvmError: [ENOMEM] xa_reserve failed at gfn 0x0 (injected): nothing changed (Cannot allocate memory)

        Raises:
            ValueError: an unknown site, an errno the site cannot return, a negative count.
            TypeError: ``err``, ``times`` or ``after`` not an int.
        """
        if self._in_callback:
            self._nested_call()
        self._inject.arm(site, err, times, after)

    # -- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        """Assert every cross-structure invariant.

        §3.4 MIXED flags and the §3.1 disallow counts of every chunk fully inside a slot;
        SPTEs only in memslots, aligned, agreeing with the attributes, backed by the folio
        or HVA page they name, at a level the chunk allows; ``pages_*`` stats; guest_memfd
        folios and bindings; host memory accounting; no invalidation left in progress.

        Raises:
            InternalInvariantError: naming the first violation found.
        """
        _vm_check.check_vm(self)
        self._platform.check_vm(self)

    # -- batched calls (docs/embedding.md, "Batched calls") ---------------------------------------

    def set_memory_attributes_many(self, gpas: object, sizes: object, attributes: object,
                                   flags: int = 0) -> npt.NDArray[np.int32]:
        """Many ``KVM_SET_MEMORY_ATTRIBUTES`` calls from arrays: element ``i`` is exactly
        ``set_memory_attributes(gpas[i], sizes[i], attributes[i], flags)``, in order, and the
        result's ``i``-th int32 is its errno (0: it succeeded). A call that would raise
        :class:`pkvm.KvmError` records its errno and changes nothing, and the batch goes on,
        as a loop with ``try/except KvmError`` would: EINVAL for a bad range or attribute or
        ``flags != 0``, EDEADLK while a :meth:`begin_set_memory_attributes` ioctl is unfinished,
        an injected ENOMEM, and EIO for every call once the VM is dead (also if it dies
        mid-batch). State, counters, modeled time, actor clocks and events are the loop's.

        ``gpas`` is a 1-D integer array (or sequence); ``sizes`` and ``attributes`` are each
        such an array of the same length, or an int for every call. The arrays are checked once,
        before any call runs; then the calls run in the typed core without checking the
        arguments again. Under a timeline or with a tracer attached the batch is the loop.

        >>> import numpy as np
        >>> vm = VM("sw_protected")
        >>> gpas = np.array([0x200000, 0x201001, 0x400000], dtype=np.uint64)
        >>> vm.set_memory_attributes_many(gpas, [0x1000] * 3, KVM_MEMORY_ATTRIBUTE_PRIVATE).tolist()
        [0, 22, 0]

        Raises:
            TypeError: an array is not of an integer dtype, or a scalar ``sizes`` /
                ``attributes`` / ``flags`` is not an int (nothing has run).
            ValueError: an array is not 1-D, the lengths differ, or a value is negative or does
                not fit a u64 (nothing has run).
            Any exception other than ``KvmError`` that a call raises (an event callback's, say)
                propagates, as from the loop: the calls before it have run.
            KvmError: EDEADLK from an event callback of this VM, before any call runs.
        """
        if self._in_callback:
            self._nested_call()  # the whole batch, before its arrays are read
        return _batch.set_memory_attributes_many(self, gpas, sizes, attributes, flags)


# On a VM, ``set_memory_attributes`` is its AttrPath's C entry, called with no Python frame of its
# own (pkvm/_attr.pxi); on the class it is still the method defined above (docstring, signature).
setattr(VM, "set_memory_attributes", AttrIoctlMethod(VM.set_memory_attributes))

_EVENT_KINDS = frozenset(EVENT_KINDS)


def _log_mutator(name: str) -> Any:
    base = getattr(list, name)

    def method(self: _KernelLog, *args: Any) -> Any:
        vm = self._vm()
        if vm is not None and vm._in_callback:
            vm._nested_call()  # EDEADLK from an event callback of the VM (docs/events.md)
        return base(self, *args)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = base.__doc__
    return method


class _KernelLog(list):  # type: ignore[type-arg]
    """``vm.events``: a list of ``(source, message)`` pairs whose changes (``append``,
    ``extend``, ``insert``, ``pop``, ``remove``, ``clear``, ``sort``, ``reverse``, item and
    slice assignment and deletion, ``+=``, ``*=``) raise ``KvmError(EDEADLK)`` from an event
    callback of its VM, as the VM's own entries do. It compares equal to a list of the same
    items; a copy (``list(vm.events)``, ``copy.copy``, pickling) is a plain list."""

    __slots__ = ("_vm",)

    def __init__(self, vm: VM) -> None:
        super().__init__()
        self._vm = weakref.ref(vm)  # (a weakref: the log does not keep its VM alive)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (list, (list(self),))

    for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
                  "__setitem__", "__delitem__", "__iadd__", "__imul__"):
        locals()[_name] = _log_mutator(_name)
    del _name


class _Acting:
    """The context manager of :meth:`VM.acting`."""

    __slots__ = ("_vm", "_actor", "_prev")

    def __init__(self, vm: VM, actor: str) -> None:
        self._vm = vm
        self._actor = actor
        self._prev: list[str] = []

    def __enter__(self) -> str:
        self._prev.append(self._vm._set_actor(self._actor))
        return self._actor

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._vm._set_actor(self._prev.pop())


class _ActorClocks(Mapping[str, int]):
    """The live view of :meth:`VM.actor_totals`."""

    __slots__ = ("_vm",)

    def __init__(self, vm: VM) -> None:
        self._vm = vm

    def __getitem__(self, actor: str) -> int:
        if actor not in self._vm._actor_tot:
            raise KeyError(actor)
        return self._vm.clock(actor)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._vm._actor_tot))

    def __len__(self) -> int:
        return len(self._vm._actor_tot)

    def __repr__(self) -> str:
        return f"actor_totals({dict(self)!r})"


def _resolve_platform(vm_type: int | str) -> PlatformOps:
    if isinstance(vm_type, str):
        if vm_type not in VM_TYPE_NAMES:
            raise ValueError(f"unknown vm_type {vm_type!r}; names are {', '.join(VM_TYPE_NAMES)}")
        value = VM_TYPE_NAMES[vm_type]
    elif type(vm_type) is int or (isinstance(vm_type, int) and not isinstance(vm_type, bool)):
        value = int(vm_type)
    else:
        raise TypeError(f"vm_type must be an int or a name, not {type(vm_type).__name__}")
    ops = PLATFORMS.get(value)
    if ops is None:
        supported = ", ".join(f"{t} ({p.name})" for t, p in sorted(PLATFORMS.items()))
        raise KvmError(errno.EINVAL, f"KVM_CREATE_VM: unsupported VM type {vm_type!r}; supported types: {supported}")
    return ops


class Vcpu:
    """A vCPU (``KVM_CREATE_VCPU``). Create one with :meth:`VM.create_vcpu`.

    Platforms with guest instructions of their own subclass it (TDX: ``map_gpa``, ``accept``;
    see :mod:`pkvm.platforms.tdx`) through the ``create_vcpu`` op. Subclasses refine two
    hooks: :meth:`_fault` (the exit handler that runs a nested page fault) and
    :meth:`_usable_end` (whether an existing mapping lets a guest access complete).
    """

    # _page_fault: this vCPU's typed page-fault entry (pkvm._core.VcpuFault), set on the first
    # read of ``page_fault``; _hc_flags: ``run->hypercall.flags`` as this vCPU's last
    # KVM_EXIT_HYPERCALL left it (kvm_run is zeroed at KVM_CREATE_VCPU; SNP's page-state-change
    # exits do not write the field, so they show this value again; docs/snp.md)
    __slots__ = ("vm", "id", "_resume", "_page_fault", "_hc_flags")

    def __init__(self, vm: VM, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        #: ``complete_userspace_io``: what the next :meth:`run` does (None: nothing pending).
        self._resume: Callable[[], GuestOpResult] | None = None
        self._hc_flags = 0

    def __repr__(self) -> str:
        return f"<pkvm.Vcpu {self.id} of {self.vm!r}>"

    @property
    def guest_state_protected(self) -> bool:
        """``vcpu->arch.guest_state_protected``: KVM cannot read this vCPU's registers, so it
        takes every hypercall as 64-bit (``is_64_bit_hypercall``, arch/x86/kvm/x86.h) whatever
        ``long_mode`` says. False for a plain or SW_PROTECTED VM's vCPU; an SNP vCPU's once
        ``SNP_LAUNCH_FINISH`` encrypted its save area; a TD's always (docs/kernel-semantics.md
        §7.3). Read-only."""
        return False

    # -- hooks for platform vCPUs ---------------------------------------------------------

    #: A subclass whose :meth:`_fault` runs one page (``limit == gfn + 1``) exactly as this
    #: class's does while one of its slots is None names that slot here, in the class that
    #: defines ``_fault``: ``page_fault`` then runs the typed fault without calling it.
    _fault_detour: str | None = None

    def _fault(self, gfn: int, limit: int, private: bool, write: bool) -> tuple[int, FaultResult]:
        """The exit handler of a nested page fault on ``gfn`` (a batch up to ``limit``);
        returns ``(faults taken, result)``."""
        return self.vm._fault_path.fault(self, gfn, limit, private, write)

    def _usable_end(self, gfn: int, stop: int, spte: int, private: bool, write: bool) -> int:
        """The end of the prefix of ``[gfn, stop)`` (one present SPTE run of value ``spte``)
        that a guest access of this type completes without a fault: all of it, unless a write
        meets a read-only leaf. The access type does not matter here (no hardware check)."""
        return stop if not write or spte & SPTE_WRITABLE else gfn

    # -- nested page faults and accesses --------------------------------------------------

    def page_fault(self, gpa: int, *, private: bool, write: bool = False) -> FaultResult:
        """One nested page fault on ``gpa`` (docs/kernel-semantics.md §4.2), run to completion.

        ``private`` is the access type the hardware reports (SNP: C-bit; TDX: shared bit
        clear; SW_PROTECTED: ORed with the gfn's attribute by KVM). The result says whether
        the fault was fixed (and at which level and pfn), spurious, retried, emulated, or
        exited to userspace (with ``KVM_EXIT_MEMORY_FAULT`` data and an errno).

        Runtime complexity: O(log n).

        Raises:
            KvmError: EIO if the VM is dead; EDEADLK from an event callback of the VM.
            TypeError / ValueError: ``gpa`` is not an int in [0, 2**52 pages), or ``private``
                / ``write`` are not bools.
        """
        # The checks (as _gpa_to_gfn's, then the bools, then the dead VM) and the fault
        # (self._fault(gfn, gfn + 1, private, write)[1]) are the typed core's.
        return self.vm._fault_path.page_fault(self, gpa, private, write)

    def access(self, gpa: int, *, private: bool, write: bool = False, size: int = PAGE_SIZE) -> AccessResult:
        """A guest access to the bytes ``[gpa, gpa + size)``: faults only where no usable
        mapping exists.

        Pages are walked in order; a page is usable if it has a present leaf SPTE (writable,
        for a write; platforms may add conditions, e.g. TDX: the root of the access type and
        an accepted S-EPT page). The walk stops at the first fault that does not fix the
        mapping (an exit to userspace, or MMIO emulation). N unmapped pages in one state are
        faulted as one batch: counted as N faults (``pf_taken``) at O(log n) cost.

        Raises:
            KvmError: EIO if the VM is dead; EDEADLK from an event callback of the VM.
            TypeError / ValueError: as :meth:`page_fault`; ``size`` must be > 0.
        """
        if type(gpa) is int and 0 <= gpa < _MAX_GPA:
            gfn = gpa >> PAGE_SHIFT  # _gpa_to_gfn(gpa) of an int it accepts
        else:
            gfn = _gpa_to_gfn(gpa)
        if type(private) is not bool or type(write) is not bool:
            raise TypeError("private and write must be bools")
        if type(size) is not int or size <= 0:
            raise ValueError(f"size={size!r} must be a positive int")
        end = (gpa + size + PAGE_SIZE - 1) >> PAGE_SHIFT
        if end > _MAX_GFN:
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) runs past the 52-bit guest physical address space")
        if self.vm.vm_dead or self.vm._in_callback:
            self.vm._check_alive()
        sptes = self.vm._mmu.sptes
        done = faults = 0
        stuck, stuck_gfn = 0, -1  # faults in a row on one gfn with no page done
        while gfn < end:
            s, e, v = sptes.run_at(gfn)
            if v:
                u = self._usable_end(gfn, e if e < end else end, v, private, write)
                if u > gfn:
                    done += u - gfn
                    gfn = u
                    continue
            n, r = self._fault(gfn, gfn + 1 if v else min(e, end), private, write)
            faults += n
            if r.ret == "retry" and self.vm._sched is not None and self.vm._sched.retry_fault(gfn):
                continue  # re-faulted once the invalidation ended
            if r.ret in ("fixed", "spurious", "retry"):
                # The hardware re-executes the access; in the synchronous API nothing else can
                # change what it meets, so a gfn that keeps faulting is a loop (RETRY_LIMIT).
                stuck, stuck_gfn = (stuck + 1, gfn) if gfn == stuck_gfn else (1, gfn)
                if stuck >= RETRY_LIMIT:
                    if r.ret == "retry":  # an invalidation stays open (a phased ioctl, mid-way)
                        return AccessResult("retry", done, faults, retries=stuck, loop="RET_PF_RETRY")
                    ret, loop = self._loop_kind(gfn, r.ret)
                    return AccessResult(ret, done, faults, r.level, r.pfn, retries=stuck, loop=loop)
                continue
            return AccessResult(r.ret, done, faults, r.level, r.pfn, r.exit_reason, r.memory_fault, r.errno,
                                r.retries, r.loop)
        return AccessResult("done", done, faults)

    def _loop_kind(self, gfn: int, last: str) -> tuple[str, str]:
        """``(ret, loop)`` of an access stopped because ``gfn`` kept faulting (``last``: the
        last fault's ``ret``). Platform vCPUs name their own loops (SNP: ``rmp_loop``)."""
        return "retry_loop", "RET_PF_RETRY" if last == "retry" else "#NPF refault"

    def pre_fault_memory(self, gpa: int, size: int) -> int:
        """``KVM_PRE_FAULT_MEMORY`` on ``[gpa, gpa + size)``; returns the bytes mapped.

        See :func:`pkvm.kvm.prefault.pre_fault_memory` (virt/kvm/kvm_main.c
        ``kvm_vcpu_pre_fault_memory``, arch/x86/kvm/mmu/mmu.c
        ``kvm_arch_vcpu_pre_fault_memory``).

        Raises:
            KvmError: EINVAL (a kernel before 6.11, ``Policy.pre_fault_memory`` False: the
                ioctl does not exist; an unaligned, empty or wrapping range), EOPNOTSUPP (not
                yet allowed: an SNP guest before LAUNCH_FINISH, a TD before finalization), EINVAL for a
                TD's gpa with the shared bit (kvm_is_gfn_alias), EIO (dead VM),
                or the first page's error (ENOENT outside memslots, EFAULT, ENOMEM; on a
                memslot being deleted or moved, EAGAIN from 6.18, ``Policy.pre_fault_invalid_slot``,
                and EINTR before, as a signal would end the kernel's retry loop).
            TypeError / ValueError: an argument is not a u64 int.
        """
        return _pre_fault_memory(self, gpa, size)

    # -- guest instructions and KVM_RUN -----------------------------------------------------

    def hypercall(self, nr: int, a0: int = 0, a1: int = 0, a2: int = 0, *, long_mode: bool = True) -> GuestOpResult:
        """The guest executes a KVM hypercall (``VMCALL``; docs/kernel-semantics.md §7.3).

        ``KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)`` exits to userspace (``KVM_EXIT_HYPERCALL``)
        if the VMM enabled ``KVM_CAP_EXIT_HYPERCALL`` for it; answer the exit, then
        :meth:`run` completes it with the guest's RAX in ``status``. Without the capability RAX
        is ``-KVM_ENOSYS``, with bad arguments ``-KVM_EINVAL`` (both as u64), and nothing exits.

        Raises:
            KvmError: EIO if the VM is dead; EBUSY if an exit is still pending; EDEADLK from an
                event callback of the VM.
            TypeError / ValueError: an argument is not a u64 int.
        """
        nr, a0, a1, a2 = _u64("nr", nr), _u64("a0", a0), _u64("a1", a1), _u64("a2", a2)
        if type(long_mode) is not bool:
            raise TypeError("long_mode must be a bool")
        begin_insn(self)
        return kvm_emulate_hypercall(self, nr, a0, a1, a2, long_mode)

    def run(self) -> GuestOpResult:
        """``KVM_RUN``: resume the guest instruction that exited to userspace.

        Runs the pending completion (``complete_userspace_io``: e.g. the next MapGPA chunk, or
        the hypercall's return value) or re-executes the instruction that took a memory-fault
        exit. Returns the next exit or the instruction's completion; ``ret == "done"`` with
        ``status`` None when nothing was pending. ``page_fault`` and ``access`` leave nothing
        pending: after their exits the caller simply repeats them.

        Raises:
            KvmError: EIO if the VM is dead; EDEADLK from an event callback of the VM.
        """
        if self.vm.vm_dead or self.vm._in_callback:
            self.vm._check_alive()  # raises EIO / EDEADLK
        resume, self._resume = self._resume, None
        if resume is None:
            return GuestOpResult("done")
        return resume()

    def map_gpa(self, gpa: int, size: int) -> GuestOpResult:
        """TDX guest: ``TDG.VP.VMCALL<MapGPA>`` (kernel-semantics.md §7.2); see :mod:`pkvm.platforms.tdx`.

        Raises:
            TypeError: the VM type has no MapGPA (only TDX does).
        """
        raise TypeError(f"map_gpa is a TDX guest operation (TDG.VP.VMCALL<MapGPA>); a {self.vm.platform.name} VM "
                        "has none: use vcpu.hypercall(KVM_HC_MAP_GPA_RANGE, ...) or pkvm.Guest")

    def accept(self, gpa: int, level: int) -> GuestOpResult:
        """TDX guest: ``TDG.MEM.PAGE.ACCEPT`` (kernel-semantics.md §6.2, §7.5); see :mod:`pkvm.platforms.tdx`.

        Raises:
            TypeError: the VM type has no ACCEPT (only TDX does).
        """
        raise TypeError(f"accept is a TDX guest operation (TDG.MEM.PAGE.ACCEPT); a {self.vm.platform.name} VM has none")

    # -- batched calls (docs/embedding.md, "Batched calls") ---------------------------------------

    def page_fault_many(self, gpas: object, *, private: object, write: object = False) -> FaultBatch:
        """Many nested page faults from an array: element ``i`` is exactly
        ``page_fault(gpas[i], private=..., write=...)``, in order; returns a
        :class:`pkvm.FaultBatch` whose ``batch[i]`` is the :class:`FaultResult` that call
        returned, with the fields also as numpy arrays (``batch.ret``, ``level``, ``pfn``,
        ``errno``, ``retries``). State, counters, modeled time, actor clocks and events are the
        loop's.

        ``gpas`` is a 1-D integer array (or sequence) of addresses in the 52-bit guest physical
        address space; ``private`` and ``write`` are each a bool for every call or a 1-D bool
        array of the same length. The arrays are checked once, before any fault runs; then the
        faults run in the typed core without checking the arguments again. Under a timeline or
        with a tracer attached the batch is the loop.

        Where the loop would raise (a dead VM: EIO; a TD not yet finalized: EINVAL), the batch
        stops there too and raises :class:`pkvm.FaultBatchError`, a ``KvmError`` with the same
        errno and message, whose ``batch`` holds the results of the calls before it (``index``
        of them): a fault that kills the VM returns its result, and the call after it raises.

        >>> vm = VM("sw_protected")
        >>> vm.set_user_memory_region2(0, 0, 0, 1 << 21, 1 << 30)
        >>> batch = vm.create_vcpu().page_fault_many([0x1000, 0x2000, 0x3000], private=[False, False, True])
        >>> [r.ret for r in batch], batch.level.tolist(), batch.errno.tolist()
        (['fixed', 'spurious', 'exit'], [2, 2, 0], [0, 0, 14])

        Raises:
            FaultBatchError: as described above.
            TypeError: ``gpas`` is not of an integer dtype; ``private`` / ``write`` are not a
                bool or a bool array (nothing has run).
            ValueError: an array is not 1-D, the lengths differ, or an address is negative or
                outside the 52-bit space (nothing has run).
        """
        return _batch.page_fault_many(self, gpas, private, write, Vcpu._fault_entry_check)

    def _fault_entry_check(self) -> None:
        """What :meth:`page_fault` checks before the fault, besides its arguments: that the
        VM is alive. A vCPU class that overrides ``page_fault`` overrides this with its own
        checks, or the batched call falls back to calling ``page_fault`` per element."""
        if self.vm.vm_dead or self.vm._in_callback:
            self.vm._check_alive()


# On a vCPU, ``page_fault`` is its typed entry's C function, called with no Python frame of its
# own (pkvm/_fault.pxi); on the class it is still the method defined above (docstring, signature).
setattr(Vcpu, "page_fault", PageFaultMethod(Vcpu.page_fault))

_MAX_GFN = 1 << 40  # 52-bit guest physical addresses
_MAX_GPA = _MAX_GFN << PAGE_SHIFT  # the gpas _gpa_to_gfn accepts are below it
#: Re-faults an access makes while an invalidation keeps its gfn stale, in the synchronous driver
#: (nothing there ends an invalidation but the caller); then it returns ``ret="retry"``.
_MAX_RETRIES = RETRY_LIMIT  # pkvm.constants: the one bound on retried loops

#: The phases of ``KVM_SET_MEMORY_ATTRIBUTES`` (docs/kvm-model.md).
ATTR_PHASES = ("begin", "pre", "commit", "post", "end")


class AttrIoctl:
    """``KVM_SET_MEMORY_ATTRIBUTES`` run phase by phase (:meth:`VM.begin_set_memory_attributes`).

    ``begin`` has run when it is created: the checks, ``slots_lock`` taken, the call counted and
    traced, the no-op check (``noop``: every gfn already has the attributes, and nothing else
    happens; its walk of a to-private range is charged, ``attr_check_gfn``, §2.7). Then
    :meth:`step` runs, in order:

    - ``pre``: the eager-split policy's direct-map work, then, under ``mmu_lock``,
      ``invalidate_begin``, the zap of every slot-clipped piece and one TLB flush
      (``kvm_pre_set_memory_attributes``); the legacy ioctl only begins the invalidation;
    - ``commit``: the store of every gfn's attributes (``xa_store``), without ``mmu_lock``: a
      fault on a covered gfn now retries (the invalidation is in progress);
    - ``post``: under ``mmu_lock``, ``invalidate_end`` and the MIXED recomputation, and the
      eager-locked op (``kvm_arch_post_set_memory_attributes``); the legacy ioctl zaps here;
    - ``end``: after ``mmu_lock`` is dropped, the eager-post op (RFC v8 ``update_mem_attr``);
      ``slots_lock`` is released.

    Every phase does exactly what the one-call ioctl does in it: the same counters and modeled
    time. ``phase`` is the last phase that ran, ``next`` the one :meth:`step` runs next.
    """

    __slots__ = ("vm", "start", "end", "attributes", "phase", "noop", "_ranges", "_pre_locked")

    def __init__(self, vm: VM, start: int, end: int, attributes: int, _checked: bool = False) -> None:
        self.vm = vm
        self.start, self.end, self.attributes = start, end, attributes
        self.phase = "begin"
        self._pre_locked = False
        legacy = vm._legacy
        # The no-op check and its walk's charge (§2.7); ``_checked``: the caller (the timeline's
        # ioctl, pkvm/_attr.pxi) ran both and found the call no no-op. The legacy ioctl has none.
        self.noop = not legacy and not _checked and bool(vm._attr_path.noop_check(start, end, attributes))
        if self.noop:
            self._ranges: list[tuple[int, int, int]] = []
            self.phase = "end"  # the short-circuit returns at once
        elif legacy:
            self._ranges = vm._slot_ranges(start, end)
        else:
            maps = vm._slot_maps
            self._ranges = maps[0].ranges(start, end) if len(maps) == 1 else vm._slot_ranges(start, end)

    def __repr__(self) -> str:
        return (f"<pkvm.AttrIoctl [{self.start:#x}, {self.end:#x}) attributes {self.attributes:#x}, "
                f"after {self.phase!r}>")

    @property
    def done(self) -> bool:
        """Whether the ioctl has returned (``end`` ran, or it was a no-op)."""
        return self.phase == "end"

    @property
    def next(self) -> str | None:
        """The phase :meth:`step` runs next (None when done)."""
        i = ATTR_PHASES.index(self.phase)
        return ATTR_PHASES[i + 1] if i + 1 < len(ATTR_PHASES) else None

    def _before_lock(self) -> None:
        """The eager-split direct-map work that runs before ``mmu_lock`` is taken (once)."""
        vm = self.vm
        if not self._pre_locked and self._ranges and vm._eager_split:
            vm._attr_pre_lock(self._ranges, self.attributes)
        self._pre_locked = True

    def step(self) -> str:
        """Run the next phase; return its name.

        Raises:
            ValueError: the ioctl has finished.
        """
        nxt = self.next
        if nxt is None:
            raise ValueError(f"{self!r} has finished: no phase after 'end'")
        if self.vm._in_callback:
            self.vm._nested_call()
        vm, ranges, attrs = self.vm, self._ranges, self.attributes
        sched = vm._sched
        clock = sched.work_ns if sched is not None else (lambda: vm._modeled_ns)
        if vm._legacy:
            if nxt == "pre":
                self._before_lock()
                vm._invalidate_begin()
                vm._invalidate_range_add(self.start, self.end)
            elif nxt == "commit":
                vm._attr_commit(self.start, self.end, attrs)
            elif nxt == "post":
                t0 = clock()
                vm._attr_legacy_locked(ranges, attrs)
                vm.mmu_lock_ns += clock() - t0
                vm._invalidate_end()
            elif ranges and vm._eager_post:
                vm._attr_post_unlock(ranges, attrs)
        elif nxt == "pre":
            self._before_lock()
            t0 = clock()
            vm._attr_pre(ranges, attrs)
            vm.mmu_lock_ns += clock() - t0
        elif nxt == "commit":
            vm._attr_commit(self.start, self.end, attrs)  # under slots_lock only
        elif nxt == "post":
            t0 = clock()
            vm._attr_post(ranges, attrs)
            vm.mmu_lock_ns += clock() - t0
        elif ranges and vm._eager_post:
            vm._attr_post_unlock(ranges, attrs)
        self.phase = nxt
        if nxt == "end" and vm._attr_op is self:
            vm._attr_op = None
        return nxt

    def run_to(self, phase: str) -> str:
        """Run phases until ``phase`` has run; return it.

        Raises:
            ValueError: ``phase`` is not a phase, or it has already run.
        """
        if phase not in ATTR_PHASES:
            raise ValueError(f"phase {phase!r} is not one of {', '.join(ATTR_PHASES)}")
        if ATTR_PHASES.index(phase) <= ATTR_PHASES.index(self.phase) and not (phase == "end" and self.done):
            raise ValueError(f"phase {phase!r} has already run ({self!r})")
        while self.phase != phase:
            self.step()
        return phase

    def finish(self) -> str:
        """Run the remaining phases (the ioctl returns); return ``"end"``."""
        while not self.done:
            self.step()
        return "end"


def _gpa_to_gfn(gpa: object) -> int:
    if type(gpa) is not int:
        if isinstance(gpa, bool) or not isinstance(gpa, int):
            raise TypeError(f"gpa must be an int, not {type(gpa).__name__}")
        gpa = int(gpa)
    if gpa < 0 or gpa >> PAGE_SHIFT >= _MAX_GFN:
        raise ValueError(f"gpa={gpa:#x} is outside the 52-bit guest physical address space")
    return gpa >> PAGE_SHIFT
