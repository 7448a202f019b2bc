"""Exits that repeat one step, answered as one range operation (docs/performance.md, "Page-state
changes and MapGPA").

A Linux guest converts a range in many exits that are the same step repeated: TDX MapGPA stops
in one ``KVM_HC_MAP_GPA_RANGE`` exit per 2 MiB chunk (``arch/x86/kvm/vmx/tdx.c``,
``tdx_map_gpa`` / ``tdx_complete_vmcall_map_gpa``), an SEV-SNP guest sends one page-state
change request per 64 entries and KVM exits once per run of them (``arch/x86/kvm/svm/sev.c``,
``snp_begin_psc`` / ``snp_complete_psc``). Each exit is answered by the VMM
(``kvm_convert_memory``: ``KVM_SET_MEMORY_ATTRIBUTES``, then the discard or the hole punch).

Where every chunk of a stretch starts from the same state and the conversion touches no
mapping and no memory (:func:`uniform_end`), every exit does the same work: the same
counters, charges, lock acquisitions and hold times, latency samples, except that POST's tests
may walk one exit further into the stretch than the exit before (by the same amount each time).
:class:`StepReplay` then runs the first two exits of the stretch on the ordinary path and
records what each added (:meth:`StepReplay.mark`), and a third if those two differ; if the
steps agree (equal, or growing by the same amount), the next ``k`` exits are answered as one
conversion of their union (the same final state: attributes, MIXED flags) with the accounting
of the ``k`` steps that follow the recorded ones added instead of what the union cost, and the stretch's last
exit runs on the ordinary path again (it leaves the invalidation range as the per-exit path
does). Nothing is replayed while anyone subscribes to the VM's events (a tracer included),
while a failure is armed, while another actor runs on the timeline, while the timeline records
slices, or on the legacy attribute ioctl.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pkvm.constants import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT
from pkvm.errors import InternalInvariantError

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.actors.vmm import Vmm
    from pkvm.kvm.vm import VM

#: Fewest exits a stretch must have to be replayed (two recorded, at least one replayed, the
#: last on the ordinary path; shorter ones are not worth the bookkeeping).
MIN_STEPS = 6
#: After a stretch was looked for in vain, the flows look again only after 1, 2, 4, ... exits,
#: at most this many: on memory where no stretch is uniform the search costs little.
MAX_BACKOFF = 64


def replayable(vm: VM) -> bool:
    """Whether exits may be replayed now: nothing observes them one by one (subscribers,
    the timeline's recorder), nothing makes one of them different (an armed failure, a
    pending attribute ioctl, the legacy ioctl), no other actor runs on the timeline."""
    if (vm._subs is not None or vm.vm_dead or vm._attr_op is not None or vm._legacy
            or vm._inject.pending()):
        return False
    sched = vm._sched
    return sched is None or (sched.recorder is None and not sched.contended())


def uniform_end(vm: VM, vmm: Vmm, start: int, end: int, private: bool, npages: int,
                extra: Callable[[int, int], int] | None = None) -> int:
    """The end of the longest stretch ``[start, e)`` of ``[start, end)`` (gfns) whose
    conversion to ``private``, ``npages`` gfns an exit, is the same work at every exit and
    touches no mapping and no memory: inside one memslot with a guest_memfd and one binding
    of it, one attribute value (if it changes, only under a policy without attribute-time RMP
    work), no SPTE, no guest_memfd folio, no populated shared backing. ``extra(s, e)`` cuts it
    further for a platform's own state. Returns ``start`` when there is no such stretch.
    O(log n).

    An exit that changes the attributes ends with POST's 2M and 1G tests of the chunks it
    covers in part (docs/kernel-semantics.md §3.2-§3.3), which walk each such chunk from its
    first gfn to the first that differs. Where the exits fall at a different place in their chunk each time (an
    exit that is not a whole number of chunks), that walk can differ from one exit to the
    next once the stretch reaches another chunk, though the first exits agreed: the stretch
    ends with the chunk ``start`` is in (the 1G chunk, and the 2M chunk for exits that are
    not whole 2M chunks). Inside it, the walk of an exit stops before the stretch (the same
    for every exit) or at the first gfn (sub-chunk) the stretch has not converted yet, one
    exit's worth further each time (:meth:`StepReplay.ready`)."""
    slot = vm._slot_at(start)
    if slot is None or slot.gmem is None or slot.gmem_file is None or slot.invalid or not vmm.discard:
        return start
    _s, e, _v = vm._slot_maps[0].run_at(start)
    e = min(e, end, slot.end_gfn)
    _s, ae, attrs = vm._attrs.run_at(start)
    e = min(e, ae)
    target = KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
    if attrs != target and (vm._eager_split or vm._eager_post or vm._eager_locked):
        return start
    x = vm._sptes.find_ne(start, e, 0)
    if x != -1:
        e = x
    off = slot.gmem_pgoff - slot.base_gfn
    gmem = slot.gmem
    _s, be, key = gmem.bindings.run_at(start + off)
    if key != slot.key + 1:
        return start
    e = min(e, be - off)
    if e <= start:
        return start
    x = gmem.folios.find_ne(start + off, e + off, 0)
    if x != -1:
        e = x - off
    if e <= start:
        return start
    hs = slot.hva_page(start)
    x = vm._shared._map.find_ne(hs, hs + (e - start), 0)
    if x != -1:
        e = start + (x - hs)
    if attrs != target:
        if npages % (1 << 18):
            e = min(e, ((start >> 18) + 1) << 18)
        if npages % 512:
            e = min(e, ((start >> 9) + 1) << 9)
    if extra is not None and e > start:
        e = extra(start, e)
    return max(e, start)


class _Snap:
    """What one exit adds to: the VM's counters and clocks, the VMM's, the timeline's."""

    __slots__ = ("stats", "cells", "clk", "actor", "modeled", "vm_counts", "vmm_counts", "locks", "log",
                 "races", "events")

    def __init__(self, vm: VM, vmm: Vmm) -> None:
        self.stats = dict(vm._stats)
        self.cells = {a: dict(c) for a, c in vm._actor_ns.items()}
        self.actor = vm._actor
        self.clk = dict(vm._actor_tot)  # every actor's clock (vm.clock)
        self.clk[vm._actor] += vm._modeled_ns - vm._actor_mark
        self.modeled = vm._modeled_ns
        self.vm_counts = (vm.attr_ioctls, vm.mmu_lock_ns)
        self.vmm_counts = (vmm.conversions, vmm.failed_conversions, vmm.gfns_converted)
        self.events = len(vm.events)
        sched = vm._sched
        if sched is None:
            self.locks: dict[str, tuple[Any, ...]] = {}
            self.log = 0
            self.races: dict[str, int] = {}
        else:
            self.locks = {n: (lk.stats.acquisitions, lk.stats.hold_ns, lk.stats.hold_write_ns, lk.stats.hold_read_ns,
                              lk.stats.wait_ns, lk.stats.waits) for n, lk in sched.locks.items()}
            self.log = len(sched.latency_log) if sched.latency_log is not None else 0
            self.races = dict(sched.races)


class _Step:
    """What one exit added (``b - a``): ``num``, every figure that adds up, by key (zeros left
    out), and ``shape``, what must be the same at every exit of a stretch (the acting actor,
    the events and races added, each latency sample's kind, waits and batch size). Equal
    steps compare equal."""

    __slots__ = ("num", "shape")

    def __init__(self, a: _Snap, b: _Snap, log: list[tuple[str, int, int, int]] | None) -> None:
        num: dict[tuple[Any, ...], int] = {}

        def put(key: tuple[Any, ...], d: int) -> None:
            if d:
                num[key] = d

        for x, v in b.stats.items():
            put(("stats", x), v - a.stats.get(x, 0))
        for x, c in b.cells.items():
            ac = a.cells.get(x, {})
            for op, v in c.items():
                put(("cell", x, op), v - ac.get(op, 0))
        for x, v in b.clk.items():
            put(("clk", x), v - a.clk.get(x, 0))
        put(("modeled",), b.modeled - a.modeled)
        for i, (p, q) in enumerate(zip(a.vm_counts, b.vm_counts, strict=True)):
            put(("vm", i), q - p)
        for i, (p, q) in enumerate(zip(a.vmm_counts, b.vmm_counts, strict=True)):
            put(("vmm", i), q - p)
        for name, held in b.locks.items():
            for i, (p, q) in enumerate(zip(a.locks[name], held, strict=True)):
                put(("lock", name, i), q - p)
        samples = log[a.log:b.log] if log is not None else []
        for i, (_kind, total, _w, _n) in enumerate(samples):
            put(("sample", i), total)
        races = sorted((x, v - a.races.get(x, 0)) for x, v in b.races.items() if v != a.races.get(x, 0))
        self.num = num
        self.shape = (b.actor if a.actor == b.actor else None, b.events - a.events, tuple(races),
                      tuple((kind, w, n) for kind, _t, w, n in samples))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Step) and self.shape == other.shape and self.num == other.num

    __hash__ = None  # type: ignore[assignment]

    def clean(self) -> bool:
        """A step that may be repeated by arithmetic: no failed conversion, no warning, no
        race, no lock wait (each of those depends on more than the step's own state)."""
        actor, events, races, _samples = self.shape
        num = self.num
        return (actor is not None and not num.get(("vmm", 1)) and not events and not races
                and not any(k[0] == "lock" and k[2] >= 4 for k in num))


def _growth(d1: _Step, d2: _Step, d3: _Step) -> dict[tuple[Any, ...], int] | None:
    """How much each figure of three consecutive steps grows from one step to the next, if
    it grows by the same amount each time, by no less than zero, and nothing else differs
    (the shape, the VMM's counts); else None."""
    if not d1.shape == d2.shape == d3.shape:
        return None
    growth: dict[tuple[Any, ...], int] = {}
    for key in d1.num.keys() | d2.num.keys() | d3.num.keys():
        a, b, c = d1.num.get(key, 0), d2.num.get(key, 0), d3.num.get(key, 0)
        g = b - a
        if c - b != g or g < 0 or (g and key[0] == "vmm"):
            return None
        if g:
            growth[key] = g
    return growth


class StepReplay:
    """Records the first exits of a uniform stretch and answers the next ones as one range
    operation with the recorded accounting repeated (module docstring).

    Use: :meth:`begin`, then :meth:`mark` before each exit of the stretch is answered; from
    the third mark on, :meth:`ready` says whether the recorded steps repeat (two equal ones)
    or grow by the same amount each time (three whose differences agree), or that one more
    exit must be recorded to tell; :meth:`skip` then answers ``k`` exits through ``silent``
    (which changes the state as those ``k`` exits would, at any cost) and sets every counter
    and clock to the last mark plus the ``k`` steps that follow the recorded ones.
    :meth:`end` (also done by :meth:`skip`) stops recording.

    Steps grow where POST's 2M and 1G tests walk a chunk from its first gfn into what the
    stretch has converted so far (docs/kernel-semantics.md §3.3; :func:`uniform_end`): each
    exit walks ``npages`` gfns (or ``npages / 512`` sub-chunks) further than the one before,
    up to the stretch's last exit, which is answered on the ordinary path. Every figure an exit
    adds is then a sum of prices times counts that each grow by a fixed amount, so the ``i``-th
    step after the last recorded one is that step plus ``i`` times the growth."""

    __slots__ = ("vm", "vmm", "snaps", "growth")

    def __init__(self, vm: VM, vmm: Vmm) -> None:
        self.vm = vm
        self.vmm = vmm
        self.snaps: list[_Snap] = []
        self.growth: dict[tuple[Any, ...], int] = {}

    def begin(self) -> None:
        self.snaps = []
        self.growth = {}
        sched = self.vm._sched
        if sched is not None:
            sched.latency_log = []

    def end(self) -> None:
        self.snaps = []
        sched = self.vm._sched
        if sched is not None:
            sched.latency_log = None

    def mark(self) -> int:
        """Record the accounting now (before an exit is answered); returns the marks so far."""
        self.snaps.append(_Snap(self.vm, self.vmm))
        return len(self.snaps)

    def ready(self) -> bool | None:
        """After three marks: True if the two steps between them are equal and clean; None if
        they differ (one more exit is to be recorded); after four: True if the three steps
        grow by the same amount each time and are clean. False otherwise: no replay."""
        n = len(self.snaps)
        if n not in (3, 4) or not replayable(self.vm):
            return False
        log = self.vm._sched.latency_log if self.vm._sched is not None else None
        steps = [_Step(a, b, log) for a, b in zip(self.snaps, self.snaps[1:], strict=False)]
        if not steps[-1].clean():
            return False
        if n == 3:
            return True if steps[0] == steps[1] else None
        growth = _growth(*steps)
        if growth is None:
            return False
        self.growth = growth
        return True

    def skip(self, k: int, silent: Callable[[], Any]) -> Any:
        """Run ``silent()`` (the state change of ``k`` exits; its return value is returned)
        unobserved, then set the accounting to the last mark plus the ``k`` steps after the
        recorded ones: ``k`` times the last recorded step, plus its growth times
        ``1 + 2 + ... + k``."""
        vm, vmm = self.vm, self.vmm
        sched = vm._sched
        log = sched.latency_log if sched is not None else None
        b, c = self.snaps[-2], self.snaps[-1]
        step = _Step(b, c, log).num
        growth = self.growth
        tri = k * (k + 1) // 2

        def add(key: tuple[Any, ...]) -> int:
            return k * step.get(key, 0) + tri * growth.get(key, 0)

        samples = list(log[b.log:c.log]) if log is not None else []
        self.end()
        vm._sched = None  # the union is one ioctl: neither its locks nor its latency count
        try:
            out = silent()
        finally:
            vm._sched = sched
        st = vm._stats
        for key, v in c.stats.items():
            st[key] = v + add(("stats", key))
        for x, cell in vm._actor_ns.items():
            base = c.cells.get(x)
            if base is None:
                raise InternalInvariantError(f"actor {x!r} first acted in a replayed exit")
            for op in [op for op in cell if op not in base]:
                del cell[op]
            for op, v in base.items():
                cell[op] = v + add(("cell", x, op))
        if vm._actor != c.actor:
            raise InternalInvariantError(f"a replayed exit left {vm._actor!r} acting, not {c.actor!r}")
        tot = vm._actor_tot
        for x, v in c.clk.items():
            tot[x] = v + add(("clk", x))
        vm._modeled_ns = c.modeled + add(("modeled",))
        vm._actor_mark = vm._modeled_ns  # the acting actor's clock is all in _actor_tot
        vm.attr_ioctls = c.vm_counts[0] + add(("vm", 0))
        vm.mmu_lock_ns = c.vm_counts[1] + add(("vm", 1))
        vmm.conversions, vmm.failed_conversions, vmm.gfns_converted = (
            v + add(("vmm", i)) for i, v in enumerate(c.vmm_counts))
        if sched is not None:
            for n, ls in sched.locks.items():
                st4 = ls.stats
                st4.acquisitions += add(("lock", n, 0))
                st4.hold_ns += add(("lock", n, 1))
                st4.hold_write_ns += add(("lock", n, 2))
                st4.hold_read_ns += add(("lock", n, 3))
            for i, (kind, total, w, batch) in enumerate(samples):
                sched.latency_replay(kind, total, w, batch, k, growth.get(("sample", i), 0))
        return out


def convert_silently(vmm: Vmm, gfn: int, npages: int, private: bool) -> None:
    """The state change of ``kvm_convert_memory`` on ``[gfn, gfn + npages)`` for
    :meth:`StepReplay.skip` (its accounting is replaced there)."""
    ret = vmm.convert_memory(gfn << PAGE_SHIFT, npages << PAGE_SHIFT, private)
    if ret:
        raise InternalInvariantError(f"a replayed conversion of [{gfn:#x}, +{npages:#x}) failed "
                                     f"({ret}): {vmm.last_failure}")
