"""Workloads: what a confidential guest and its VMM do to guest memory, deterministic from a seed.

Every workload drives the :class:`pkvm.Guest` and :class:`pkvm.Vmm` actors, never the KVM
model directly, so one workload runs unchanged on SNP, TDX and SW_PROTECTED VMs. A workload is
a function ``run(ctx, **options)`` registered in :data:`WORKLOADS` with a description and its
options (name -> :class:`Option`). :class:`Context` gives it the VM, the VMM, one guest per
vCPU, a seeded ``random.Random`` and :meth:`Context.phase` to split the run into phases the
result reports separately.

Memory layout: RAM as QEMU's q35 machine lays it out (``Context.ram``): one slot ``[0, memory)``
up to 2.75 GiB, else ``[0, 2G)`` and ``[4G, 4G + memory - 2G)`` in memslots of at most
``pkvm.actors.vmm.MAX_SLOT_BYTES``; the firmware image (``image`` bytes, default 2 MiB)
sits at its start and is built by the platform's launch flow (SNP ``LAUNCH_UPDATE``, TDX
``INIT_MEM_REGION``). Workloads pick pages in RAM order and map them to gpas around the hole.

=============  =================================================================================
``boot``       The VMM marks all RAM private (QEMU's ``kvm_set_phys_mem``), launches, and the
               guest accepts all of it, as lazy acceptance eventually does (``accept=2M``: 2 MiB
               units, PVALIDATE / ACCEPT at 2M where possible; ``accept=4K``: 4K only), and
               writes to it (accepted pages are mapped: faults only on SW_PROTECTED).
``swiotlb``    Boot, then bounce-buffer churn: ``ops`` times a random 4K page goes private ->
               shared, is touched ``touches`` times (the device's DMA), and goes back.
``virtio``     Boot, then ``cycles`` device resets: each device's rings and buffer pool are
               allocated, converted to shared, used, and converted back on teardown.
``balloon``    Boot, then ``cycles`` inflate / deflate rounds: the VMM discards ``fraction`` of
               RAM in ``chunk`` units (punch the guest_memfd hole, drop the shared backing), and
               the guest later re-accepts and re-touches it, faulting it back in.
``migration``  The destination of a migration: the incoming VMM builds RAM private, restores the
               source's shared ranges (SWIOTLB pool and device buffers), and the resumed guest
               re-accepts its resident private memory and touches its shared buffers.
``mixed``      Boot with the SWIOTLB pool shared, then ``ops`` random actions: bounce-buffer
               churn, virtio ring setup / teardown, balloon rounds, and implicit conversions
               (the guest touches a private page as shared without converting it first).
``replay``     Replays a kernel trace (``trace-cmd report`` text; see :mod:`pkvm.experiments.trace`).
=============  =================================================================================

Choices the kernel reference does not make (documented in ``docs/workloads.md``): the SWIOTLB pool
is min(6 % of RAM, 1 GiB) as the Linux CVM guest sizes it; random pages are drawn uniformly
from RAM above the image; vCPUs take turns (round-robin) in the order actions are drawn.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from pkvm._core import RangeMap
from pkvm._units import format_size, parse_decimal, parse_size
from pkvm.actors.vmm import q35_ram_layout
from pkvm.constants import FALLOC_FL_KEEP_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT, PAGE_SIZE
from pkvm.errors import ConfigError, KvmError
from pkvm.kvm.exits import CONVERTED, ConversionResult
from pkvm.experiments.replay import replay_file

if TYPE_CHECKING:  # pragma: no cover
    from pkvm.actors.guest import Guest
    from pkvm.actors.vmm import Vmm
    from pkvm.kvm.vm import VM

__all__ = ["WORKLOADS", "Context", "Option", "Workload", "get", "parse_options", "ram_ranges"]

MiB = 1 << 20
GiB = 1 << 30
P2M = 2 * MiB


# -- options ---------------------------------------------------------------------------------------


def _bool(text: object) -> bool:
    if type(text) is bool:
        return text
    s = str(text).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false)")


def _nonneg_int(text: object) -> int:
    """An int, or its text in ASCII decimal digits (:func:`pkvm._units.parse_decimal`: not
    ``5_000``, ``0x10``, ``0b11`` or other scripts' digits, which ``int(text, 0)`` took)."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a non-negative integer")
    try:
        v = text if isinstance(text, int) else parse_decimal(str(text))
    except ValueError:
        raise ValueError("expected a non-negative integer such as 5000 (decimal digits 0-9 only)") from None
    if v < 0:
        raise ValueError(f"{v} is negative; expected a non-negative integer")
    return v


def _shown_count(n: int) -> str:
    """``n`` as the option listing shows a cap: ``10^9`` for a power of ten, else digits."""
    k = len(str(n)) - 1
    return f"10^{k}" if n >= 10**4 and n == 10**k else str(n)


@dataclass(frozen=True)
class _Count:
    """The parser of a count option: a non-negative integer of at most ``most``, a cap that
    keeps a run finite in practice (docs/workloads.md, "Caps on counts", gives each one's
    reason); a larger count was accepted and ran for years."""

    most: int

    def __call__(self, text: object) -> int:
        v = _nonneg_int(text)
        if v > self.most:
            raise ValueError(f"{v} is more than {_shown_count(self.most)}; expected an integer from 0 to "
                             f"{_shown_count(self.most)}")
        return v


def _count(default: int, most: int, help: str) -> Option:
    """A count option of at most ``most``; its help text says the range."""
    return Option(default, _Count(most), f"{help} (0 to {_shown_count(most)})")


def _fraction(text: object) -> float:
    if isinstance(text, bool):  # float(True) is 1.0: all of RAM
        raise ValueError(f"{text!r} is not a fraction in [0, 1]")
    try:
        v = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("expected a fraction in [0, 1] such as 0.25") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{text!r} is not a fraction in [0, 1]")
    return v


def _granule(text: object) -> int:
    v = parse_size(text)  # type: ignore[arg-type]
    if v not in (PAGE_SIZE, P2M):
        raise ValueError(f"{text!r} must be 4K or 2M")
    return v


def _page_size(text: object) -> int:
    v = parse_size(text)  # type: ignore[arg-type]
    if v <= 0 or v & (PAGE_SIZE - 1):
        raise ValueError(f"{text!r} must be a positive multiple of 4K")
    return v


def _text(text: object) -> str:
    if not isinstance(text, str) or not text:
        raise ValueError(f"{text!r} is not a non-empty string")
    return text


@dataclass(frozen=True)
class Option:
    """A workload option: default value, parser (text or value -> value), help text."""

    default: Any
    parse: Callable[[object], Any]
    help: str

    def show(self, value: Any) -> str:
        """The value as a user would type it."""
        if self.parse in (_granule, _page_size):
            return format_size(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


@dataclass(frozen=True)
class Workload:
    """A registered workload: ``run(ctx, **options)``."""

    name: str
    description: str
    options: Mapping[str, Option]
    run: Callable[..., None]
    #: Count options whose loops nest: the run repeats its innermost step their product
    #: times (each factor at least 1), which is capped as an ``ops`` count is.
    nested: tuple[str, ...] = ()


def parse_options(workload: Workload, given: Mapping[str, object]) -> dict[str, Any]:
    """Every option of ``workload`` with ``given`` parsed over the defaults.

    Raises:
        ValueError: an unknown option (listing the known ones) or a bad value.
    """
    unknown = sorted(set(given) - set(workload.options))
    if unknown:
        known = ", ".join(workload.options) or "none"
        raise ValueError(f"workload {workload.name!r} has no option {unknown[0]!r} (options: {known})")
    out: dict[str, Any] = {}
    for name, opt in workload.options.items():
        if name in given:
            try:
                out[name] = opt.parse(given[name])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"workload {workload.name!r} option {name}={given[name]!r}: {exc}") from None
        else:
            out[name] = opt.default
    steps = math.prod(max(out[k], 1) for k in workload.nested)
    if steps > _MAX_OPS:
        shown = " x ".join(f"{k}={out[k]}" for k in workload.nested)
        raise ValueError(f"workload {workload.name!r} options {shown}: the run would repeat its innermost step "
                         f"{steps} times, more than {_shown_count(_MAX_OPS)}; lower one of them")
    return out


# -- context ---------------------------------------------------------------------------------------


@dataclass
class PhaseRecord:
    """What one phase of a run did: modeled ns (total and per actor), the time it took on the
    timeline, wall seconds, and the counters it changed (deltas)."""

    name: str
    modeled_ns: int = 0
    #: Time the phase took on the timeline (without one: its modeled work, the same thing).
    elapsed_ns: int = 0
    by_actor: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)


def ram_ranges(memory: int) -> list[tuple[int, int]]:
    """A guest's RAM as gpa ranges ``[start, end)``, laid out as on QEMU's q35 machine (one range
    up to 2.75 GiB; else below 2 GiB and from 4 GiB): ``q35_ram_layout``'s memslots with touching
    ones joined."""
    ram: list[tuple[int, int]] = []
    for gpa, size, _off in q35_ram_layout(memory):
        if ram and ram[-1][1] == gpa:
            ram[-1] = (ram[-1][0], gpa + size)
        else:
            ram.append((gpa, gpa + size))
    return ram


#: The advice of a workload that does not fit, in the Python API's and the command line's terms.
_MORE_ROOM = ("give more memory (Config(memory=...), --memory), a smaller image (Config(image=...), "
              "--image) or smaller workload options (Config(options=...), -o)")


class Context:
    """What a workload runs against (built by :func:`pkvm.experiments.run`).

    Attributes: ``vm``, ``vmm``, ``guests`` (one :class:`pkvm.Guest` per vCPU), ``rng`` (a
    ``random.Random`` seeded from the run's seed), ``memory`` (RAM bytes), ``image`` (bytes of
    firmware image at gpa 0), ``gfns_accessed`` (pages the guest accepted or touched, for
    the simulator's GFNs/s), ``notes`` (lines the result reports, e.g. replay mismatches).
    """

    def __init__(self, vm: VM, vmm: Vmm, guests: list[Guest], seed: int, memory: int, image: int,
                 progress: Callable[[float], None] | None = None) -> None:
        self.vm = vm
        self.vmm = vmm
        self.guests = guests
        self.rng = random.Random(seed)
        self.memory = memory
        self.image = image
        #: Guest RAM as gpa ranges ``[start, end)`` (``ram_ranges``); ``ram_end`` is the last end.
        ram = ram_ranges(memory)
        self.ram = ram
        self.ram_end = ram[-1][1]
        self.gfns_accessed = 0
        self.notes: list[str] = []
        self.phases: list[PhaseRecord] = []
        self._phase_depth = 0  # phases open (a phase opened inside another is part of it)
        self.setup_done = False
        #: The guest's own view of which pages it made shared (1) — Linux never hands a shared
        #: page to the page allocator, so random picks avoid them.
        self.shared = RangeMap(0)
        #: Pages picked for a task that has not finished yet (1): a vCPU still works on them, so
        #: random picks avoid them too (nothing is ever reserved across a pick without a timeline).
        self.reserved = RangeMap(0)
        #: The :class:`pkvm.sim.Timeline` the run is on, or None (every call runs at once).
        self.timeline: Any = None
        self._turn = 0
        self._progress = progress
        #: The share of the run the fractions of :meth:`progress` fill (the boot before a
        #: workload's own work is its first tenth: _boot_first), and the last value reported.
        self.progress_span = (0.0, 1.0)
        self._progress_last = -1.0

    # -- helpers for workloads ---------------------------------------------------------------

    def guest(self) -> Guest:
        """The next guest vCPU, round-robin."""
        g = self.guests[self._turn % len(self.guests)]
        self._turn += 1
        return g

    def progress(self, fraction: float) -> None:
        """Report progress: ``fraction`` in [0, 1] of the current :attr:`progress_span` (drives
        the CLI's progress bar). What the callback sees never goes back; the run reports 1.0
        when it ends (``pkvm.experiments.run``)."""
        if self._progress is not None:
            lo, hi = self.progress_span
            value = lo + (hi - lo) * min(1.0, max(0.0, fraction))
            if value > self._progress_last:
                self._progress_last = value
                self._progress(value)

    def run_on(self, guest: Guest, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on ``guest``'s vCPU: at once without a timeline (or when already
        on that vCPU), acting as that vCPU; on the timeline, as the vCPU thread's next task (the
        caller goes on as soon as the vCPU took it)."""
        tl = self.timeline
        if tl is None:
            # Charged to the vCPU, as its thread on the timeline is: the time splits by actor
            # the same way with or without a timeline.
            with self.vm.acting(guest.actor):
                fn(*args)
            return
        cur = tl._current  # tl.current, without the property
        if cur is not None and cur.name == guest.actor:
            fn(*args)
        else:
            tl.dispatch(guest.actor, fn, *args)

    def reserve(self, gpa: int, size: int) -> None:
        """Keep ``[gpa, gpa + size)`` out of random picks until :meth:`release`."""
        self.reserved.assign(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, 1)

    def release(self, gpa: int, size: int) -> None:
        self.reserved.assign(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, 0)

    def barrier(self) -> None:
        """Wait until every vCPU finished its task (a no-op without a timeline)."""
        if self.timeline is not None:
            self.timeline.barrier()

    @contextmanager
    def phase(self, name: str) -> Iterator[PhaseRecord]:
        """Attribute the work done inside the ``with`` block to phase ``name``; on the timeline
        the phase starts and ends with every vCPU idle (``PhaseRecord.elapsed_ns``).

        A phase opened inside another (``mixed``'s balloon rounds, inside its ``steady``
        phase) is part of the enclosing one: it is not recorded on its own and does not stop
        the vCPUs, so the phases never overlap and add up to the run (the record it yields is
        not kept)."""
        rec = PhaseRecord(name)
        if self._phase_depth:
            self._phase_depth += 1
            try:
                yield rec
            finally:
                self._phase_depth -= 1
            return
        self._phase_depth = 1
        try:
            with self._top_phase(rec):
                yield rec
        finally:
            self._phase_depth = 0

    @contextmanager
    def _top_phase(self, rec: PhaseRecord) -> Iterator[PhaseRecord]:
        vm = self.vm
        self.barrier()
        tl = self.timeline
        e0 = tl.now_ns if tl is not None else vm.modeled_ns
        before = self.counters()
        ns0, actors0 = vm.modeled_ns, {a: sum(c.values()) for a, c in vm.cost_by_actor().items()}
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            self.barrier()
            rec.elapsed_ns = (tl.now_ns if tl is not None else vm.modeled_ns) - e0
            rec.wall_s = time.perf_counter() - t0
            rec.modeled_ns = vm.modeled_ns - ns0
            after = self.counters()
            rec.counters = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            actors = {a: sum(c.values()) for a, c in vm.cost_by_actor().items()}
            rec.by_actor = {a: ns - actors0.get(a, 0) for a, ns in actors.items() if ns != actors0.get(a, 0)}
            self.phases.append(rec)

    def counters(self) -> dict[str, int]:
        """``vm.stats`` plus the actors' counters (``conversions``, ``gfns_converted``, ...)."""
        vm, vmm = self.vm, self.vmm
        out = dict(vm.stats)
        out["conversions"] = vm.attr_ioctls
        out["gfns_converted"] = vm.stats["attr_stores"]
        out["vmm_conversions"] = vmm.conversions
        out["vmm_failed_conversions"] = vmm.failed_conversions
        out["gfns_accessed"] = self.gfns_accessed
        out["mmu_lock_held_ns"] = vm.mmu_lock_ns
        return out

    def setup(self, *, prealloc: bool = False, mark_private: bool = True) -> None:
        """Build the VM: RAM in the q35 layout of :attr:`ram` (private, optionally
        preallocated) and launch it with the firmware image. Runs once, untraced (a trace
        starts after it)."""
        if self.setup_done:
            return
        vm = self.vm
        tracer = vm._tracer
        vm.trace(None)
        try:
            private = vm.platform.has_private_mem
            if len(self.ram) > 1:  # QEMU q35: RAM split around the PCI hole / into memslots
                self.vmm.add_ram_layout(self.memory, mark_private=mark_private,
                                        prealloc_from=self.image if prealloc and private else None)
                gmem = None
            else:
                gmem = self.vmm.add_ram(0, self.memory, mark_private=mark_private and not prealloc)
            if prealloc and gmem is not None:
                # Everything but the image, which the launch populates itself (an allocated
                # folio there would be an error for SNP_LAUNCH_UPDATE / INIT_MEM_REGION
                # under the eager designs); then mark RAM private, as add_ram would have.
                gmem.fallocate(FALLOC_FL_KEEP_SIZE, self.image, self.memory - self.image)
                if mark_private:
                    with vm.acting("vmm"):
                        vm.set_memory_attributes(0, self.memory, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            # (a TD with large guest_memfd folios needs a 4K image: Config refuses a larger one)
            self.vmm.launch([(0, self.image, True)] if self.image and private else [])
        finally:
            vm.trace(tracer)
        self.setup_done = True

    def accept(self, guest: Guest, gpa: int, size: int, huge: bool = True) -> None:
        """The guest accepts ``[gpa, gpa + size)`` (``huge=False``: 4K units only), on its vCPU."""
        if size > 0:
            self.run_on(guest, self._accept, guest, gpa, size, huge)

    def _accept(self, guest: Guest, gpa: int, size: int, huge: bool) -> None:
        ok = guest.accept(gpa, size, huge=huge)
        if ok is not CONVERTED and not ok:  # the message only for a failure (once per accepted run)
            self._require(ok, f"accepting [{gpa:#x}, +{size:#x})")
        self.gfns_accessed += size >> PAGE_SHIFT

    def convert(self, guest: Guest, gpa: int, size: int, private: bool) -> None:
        self.run_on(guest, self._convert, guest, gpa, size, private)

    def _convert(self, guest: Guest, gpa: int, size: int, private: bool) -> None:
        ok = guest.convert(gpa, size, private=private)
        if ok is not CONVERTED and not ok:
            self._require(ok, f"converting [{gpa:#x}, +{size:#x}) to {'private' if private else 'shared'}")
        self.shared.assign(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, 0 if private else 1)

    def touch(self, guest: Guest, gpa: int, size: int, private: bool, write: bool = True) -> None:
        self.run_on(guest, self._touch, guest, gpa, size, private, write)

    def _touch(self, guest: Guest, gpa: int, size: int, private: bool, write: bool) -> None:
        r = guest.touch(gpa, size, private=private, write=write)
        if r.ret != "done":
            self._require(False, f"touching [{gpa:#x}, +{size:#x}) ({r.ret})")
        self.gfns_accessed += size >> PAGE_SHIFT

    def _require(self, ok: bool | ConversionResult, what: str) -> None:
        if not ok:
            vm = self.vm
            if isinstance(ok, ConversionResult) and ok.detail:
                why = ok.detail
            elif vm.events:
                why = f"{vm.events[-1][0]}: {vm.events[-1][1]}"
            else:
                why = (f"the {vm.platform.name} guest's flow got a failure status from KVM or the VMM "
                       f"(VMM conversions failed so far: {self.vmm.failed_conversions}); the simulated "
                       "Linux guest would terminate here")
            raise KvmError(5, f"workload step failed: {what}: {why}")  # EIO

    def random_page(self, lo: int | None = None, hi: int | None = None) -> int:
        """A uniformly random private 4K page in ``[lo, hi)`` (default: RAM above the image)."""
        lo = self.image if lo is None else lo
        hi = self.ram_end if hi is None else hi
        return self.random_region(PAGE_SIZE, PAGE_SIZE, lo, hi)

    def random_region(self, size: int, align: int = PAGE_SIZE, lo: int | None = None, hi: int | None = None) -> int:
        """A random ``align``-aligned gpa where ``size`` bytes of private RAM fit in
        ``[lo, hi)`` (default: above the image); drawn again while it overlaps shared pages.

        Raises:
            ConfigError: (a ValueError) the RAM above the image is too small for ``size``, or
                no such region after 1000 draws.
        """
        lo_gpa = self.image if lo is None else lo
        hi_gpa = self.ram_end if hi is None else hi
        lo = -(-lo_gpa // align)
        hi = (hi_gpa - size) // align
        if hi < lo:
            raise ConfigError(f"the workload needs a {format_size(size)} private region between gpa "
                             f"{lo_gpa:#x} and {hi_gpa:#x}, which {format_size(self.memory)} of RAM with a "
                             f"{format_size(self.image)} image does not leave: {_MORE_ROOM}")
        ram = self.ram
        for _ in range(1000):
            gpa = self.rng.randint(lo, hi) * align
            if len(ram) > 1 and not any(a <= gpa and gpa + size <= b for a, b in ram):
                continue  # in the PCI hole (q35 layout): draw again
            s, e = gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT
            if self.shared.find_ne(s, e, 0) == -1 and self.reserved.find_ne(s, e, 0) == -1:
                return gpa
        raise ConfigError(f"no private {format_size(size)} region left in {format_size(self.memory)} of RAM: "
                          f"{_MORE_ROOM}")

    def ram_pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """The gpa ranges ``[a, b)`` holding RAM bytes ``[start, end)`` counted in RAM order
        (offsets into the RAM block; equal to gpas when RAM is one range at 0)."""
        out = []
        off = 0
        for a, b in self.ram:
            lo, hi = max(start, off), min(end, off + (b - a))
            if lo < hi:
                out.append((a + lo - off, a + hi - off))
            off += b - a
        return out

    def ram_gpa(self, offset: int) -> int:
        """The gpa of RAM byte ``offset`` (RAM order)."""
        for a, b in self.ram:
            if offset < b - a:
                return a + offset
            offset -= b - a
        raise ValueError(f"RAM offset {offset:#x} is past the end of RAM")

    def private_runs(self, gpa: int, end: int) -> Iterator[tuple[int, int]]:
        """The ``(gpa, size)`` runs of ``[gpa, end)`` the guest has not made shared."""
        pos = gpa >> PAGE_SHIFT
        stop = end >> PAGE_SHIFT
        for s, e, _v in self.shared.ranges(pos, stop):
            if s > pos:
                yield pos << PAGE_SHIFT, (s - pos) << PAGE_SHIFT
            pos = e
        if pos < stop:
            yield pos << PAGE_SHIFT, (stop - pos) << PAGE_SHIFT

    def swiotlb_size(self) -> int:
        """Linux's SWIOTLB pool for a CVM: 6 % of RAM, capped at 1 GiB, 2 MiB aligned."""
        return max(P2M, min(GiB, self.memory * 6 // 100) & ~(P2M - 1))


# -- the workloads -----------------------------------------------------------------------------------


def _boot_first(ctx: Context, prealloc: bool) -> None:
    """The boot before a workload's own work: the first tenth of its progress."""
    ctx.progress_span = (0.0, 0.1)
    _boot_all(ctx, P2M, prealloc)
    ctx.progress_span = (0.1, 1.0)


def _boot_all(ctx: Context, accept: int = P2M, prealloc: bool = False) -> None:
    with ctx.phase("launch"):
        ctx.setup(prealloc=prealloc)
    with ctx.phase("accept"):
        _accept_all(ctx, accept)


def _accept_all(ctx: Context, accept: int = P2M) -> None:
    """The guest accepts RAM above the image, split evenly over the vCPUs."""
    start, end = ctx.image, ctx.memory
    if end <= start:
        return
    n = len(ctx.guests)
    span = -(-(end - start) // n)
    span = -(-span // P2M) * P2M
    for i, g in enumerate(ctx.guests):
        s = start + i * span
        e = min(end, s + span)
        pieces = ctx.ram_pieces(s, e)  # RAM offsets -> gpas (q35: around the PCI hole)
        if pieces:
            ctx.run_on(g, _accept_touch_pieces, ctx, g, pieces, accept == P2M)
        ctx.progress((i + 1) / n)


def _accept_touch(ctx: Context, g: Guest, gpa: int, size: int, huge: bool) -> None:
    # A task of g's vCPU (ctx.run_on): ctx.accept / ctx.touch would run these at once. The
    # bodies of ctx._accept and ctx._touch, in line (one task per balloon chunk).
    if size > 0:
        ok = g.accept(gpa, size, huge=huge)
        if ok is not CONVERTED and not ok:
            ctx._require(ok, f"accepting [{gpa:#x}, +{size:#x})")
        ctx.gfns_accessed += size >> PAGE_SHIFT
    r = g.touch(gpa, size, private=True, write=True)  # and uses it (the only faults on SW_PROTECTED)
    if r.ret != "done":
        ctx._require(False, f"touching [{gpa:#x}, +{size:#x}) ({r.ret})")
    ctx.gfns_accessed += size >> PAGE_SHIFT


def _accept_touch_pieces(ctx: Context, g: Guest, pieces: list[tuple[int, int]], huge: bool) -> None:
    for a, b in pieces:
        _accept_touch(ctx, g, a, b - a, huge)


def boot(ctx: Context, *, accept: int, prealloc: bool) -> None:
    _boot_all(ctx, accept, prealloc)


def _churn_one(ctx: Context, touches: int) -> None:
    g = ctx.guest()
    gpa = ctx.random_page()
    ctx.reserve(gpa, PAGE_SIZE)
    ctx.run_on(g, _churn_page, ctx, g, gpa, touches)


def _churn_page(ctx: Context, g: Guest, gpa: int, touches: int) -> None:
    ctx.convert(g, gpa, PAGE_SIZE, False)
    for _ in range(touches):
        ctx.touch(g, gpa, PAGE_SIZE, False)
    ctx.convert(g, gpa, PAGE_SIZE, True)
    ctx.touch(g, gpa, PAGE_SIZE, True)
    ctx.release(gpa, PAGE_SIZE)


def swiotlb(ctx: Context, *, ops: int, touches: int, prealloc: bool) -> None:
    _boot_first(ctx, prealloc)
    with ctx.phase("churn"):
        for i in range(ops):
            _churn_one(ctx, touches)
            if not i & 1023:
                ctx.progress(i / max(ops, 1))


def _device_regions(ctx: Context, g: Guest, queues: int, ring: int, buffers: int) -> list[tuple[int, int]]:
    """One device's allocations: per queue a ring and a buffer pool, placed at random in
    private memory and made shared (``dma_alloc_coherent`` -> ``set_memory_decrypted``)."""
    out = []
    for _ in range(queues):
        for size in (ring, buffers):
            gpa = ctx.random_region(size)
            ctx.reserve(gpa, size)
            ctx.convert(g, gpa, size, False)
            out.append((gpa, size))
    return out


def _device_io(ctx: Context, g: Guest, regions: list[tuple[int, int]]) -> None:
    for gpa, size in regions:
        ctx.touch(g, gpa, size, False)      # the driver and the device use them


def _device_teardown(ctx: Context, g: Guest, regions: list[tuple[int, int]]) -> None:
    for gpa, size in regions:
        ctx.convert(g, gpa, size, True)     # teardown: set_memory_encrypted
        ctx.touch(g, gpa, size, True)
        ctx.release(gpa, size)


def _virtio_cycle(ctx: Context, devices: int, queues: int, ring: int, buffers: int, io: int) -> None:
    live = []
    for _ in range(devices):
        g = ctx.guest()
        live.append((g, _device_regions(ctx, g, queues, ring, buffers)))
    for _ in range(io):
        for g, regions in live:
            ctx.run_on(g, _device_io, ctx, g, regions)
    for g, regions in live:
        ctx.run_on(g, _device_teardown, ctx, g, regions)


def virtio(ctx: Context, *, cycles: int, devices: int, queues: int, ring: int, buffers: int, io: int,
           prealloc: bool) -> None:
    _boot_first(ctx, prealloc)
    with ctx.phase("devices"):
        for c in range(cycles):
            _virtio_cycle(ctx, devices, queues, ring, buffers, io)
            ctx.progress((c + 1) / max(cycles, 1))


def _balloon_span(memory: int, image: int, chunk: int, fraction: float) -> tuple[int, int, int]:
    """``(lo, hi, k)``: a balloon round picks ``k`` of the RAM's chunks ``[lo, hi)`` (those
    after the image; RAM order)."""
    lo = -(-image // chunk)
    hi = memory // chunk
    return lo, hi, int((hi - lo) * fraction) if hi > lo else 0


def _balloon_round(ctx: Context, fraction: float, chunk: int) -> None:
    lo, hi, k = _balloon_span(ctx.memory, ctx.image, chunk, fraction)
    if not k:
        return
    shift = (chunk >> PAGE_SHIFT).bit_length() - 1
    # Chunks are numbered in RAM order; a chunk's gpa follows the q35 layout (identity for one range).
    gpas = sorted(_chunk_gpas(ctx, ctx.rng.sample(range(lo, hi), k), chunk))
    shared, reserved = ctx.shared, ctx.reserved
    if gpas and shared.find_ne(gpas[0] << shift, (gpas[-1] + 1) << shift, 0) == -1 and \
            reserved.find_ne(gpas[0] << shift, (gpas[-1] + 1) << shift, 0) == -1:
        picked = gpas  # no shared or reserved page anywhere among them (the filter keeps every chunk)
    else:  # private only, and not in use by a task still running (inside mixed's steady phase)
        picked = [c for c in gpas if shared.find_ne(c << shift, (c + 1) << shift, 0) == -1
                  and reserved.find_ne(c << shift, (c + 1) << shift, 0) == -1]
    runs = _coalesce(picked)  # adjacent chunks: the balloon hands back runs of pages
    for s, e in runs:  # the balloon's until the deflate has accepted them again (_deflate_run)
        ctx.reserve(s * chunk, (e - s) * chunk)
    with ctx.phase("inflate"):
        discard = ctx.vmm.discard_ram
        for s, e in runs:
            discard(s * chunk, (e - s) * chunk)
    with ctx.phase("deflate"):
        huge = chunk == P2M
        guests = ctx.guests
        tl = ctx.timeline
        if (len(runs) > 1 and len(guests) == 1 and tl is not None and tl.recorder is None
                and (tl._current is None or tl._current.name != guests[0].actor)):
            # One vCPU: the loop below hands each run to the vCPU's thread once it is free, so
            # the runs follow each other at its clock. Fewer tasks do the same without a
            # hand-off per run (the driver waits meanwhile: nothing else of the workload runs).
            # In a phase of its own (balloon) the phase ends when the last run has, and one task
            # takes them all. Inside mixed's steady phase the driver goes on to its next action
            # once it has handed the last run: all but the last are one task, the last one of
            # its own. A recorder draws each task's work as its own slice: with one, the runs go
            # one by one as before (tests/test_timeline_snapshots.py compares the two).
            g = guests[0]
            ctx._turn += len(runs)
            if ctx._phase_depth == 1:
                tl.dispatch(g.actor, _deflate_runs, ctx, g, runs, chunk, huge)
                return
            tl.dispatch(g.actor, _deflate_runs, ctx, g, runs[:-1], chunk, huge)
            s, e = runs[-1]
            tl.dispatch(g.actor, _deflate_run, ctx, g, s * chunk, (e - s) * chunk, huge)
            return
        for s, e in runs:
            g = guests[ctx._turn % len(guests)]  # ctx.guest(), in line
            ctx._turn += 1
            if tl is not None and (tl._current is None or tl._current.name != g.actor):
                tl.dispatch(g.actor, _deflate_run, ctx, g, s * chunk, (e - s) * chunk, huge)  # ctx.run_on's hand-off
            else:
                ctx.run_on(g, _deflate_run, ctx, g, s * chunk, (e - s) * chunk, huge)


def _deflate_runs(ctx: Context, g: Guest, runs: list[tuple[int, int]], chunk: int, huge: bool) -> None:
    """A task of g's vCPU: :func:`_deflate_run` for each of ``runs`` (chunk numbers), in order."""
    tl = ctx.timeline  # (only dispatched on a timeline: _balloon_round)
    for i, (s, e) in enumerate(runs):
        _deflate_run(ctx, g, s * chunk, (e - s) * chunk, huge)
        if i & 31 == 31:
            # Every 32 runs the vCPU's work passes on SimPy's clock, as it did at every task's
            # end: alone, the vCPU skips the yields at its visibility points and runs ahead of
            # that clock, and the pagewise locks keep every window after it (their lists grew
            # to their caps: 4 % more instructions a chunk, 29 MB more at 1 TiB).
            tl._sync()


def _deflate_run(ctx: Context, g: Guest, gpa: int, size: int, huge: bool) -> None:
    """A task of g's vCPU: it accepts and touches a run the balloon hands back, which random
    picks then may use again."""
    _accept_touch(ctx, g, gpa, size, huge)
    ctx.release(gpa, size)


def _coalesce(chunks: list[int]) -> list[tuple[int, int]]:
    """The runs ``(first, end)`` of consecutive numbers in the ascending, distinct ``chunks``
    (numpy finds the breaks: a balloon round at 1 TiB has about 130,000 chunks)."""
    if len(chunks) < 64:
        runs: list[tuple[int, int]] = []
        for c in chunks:
            if runs and runs[-1][1] == c:
                runs[-1] = (runs[-1][0], c + 1)
            else:
                runs.append((c, c + 1))
        return runs
    a = np.array(chunks, dtype=np.int64)
    breaks = np.flatnonzero(a[1:] != a[:-1] + 1) + 1  # where a run starts, after the first
    starts = a[np.concatenate(([0], breaks))]
    ends = a[np.concatenate((breaks - 1, [len(a) - 1]))] + 1
    return list(zip(starts.tolist(), ends.tolist()))


def _chunk_gpas(ctx: Context, chunks: list[int], chunk: int) -> list[int]:
    """``[ctx.ram_gpa(c * chunk) // chunk for c in chunks]``: with every RAM range starting and
    ending on a ``chunk`` boundary, a chunk's gpa is its RAM offset plus the holes before it."""
    ram = ctx.ram
    if any((a | b) % chunk for a, b in ram):
        return [ctx.ram_gpa(c * chunk) // chunk for c in chunks]
    if len(ram) == 1:
        base = ram[0][0] // chunk
        return [c + base for c in chunks] if base else chunks
    # (first chunk of the range in RAM order, the shift to its gpa) per range
    bounds = []
    off = 0
    for a, b in ram:
        bounds.append((off, a // chunk - off))
        off += (b - a) // chunk
    # the range of each chunk is the last one starting at or before it
    firsts = np.array([f for f, _ in bounds], dtype=np.int64)
    shifts = np.array([d for _, d in bounds], dtype=np.int64)
    arr = np.array(chunks, dtype=np.int64)
    return (arr + shifts[np.searchsorted(firsts, arr, side="right") - 1]).tolist()  # type: ignore[no-any-return]


def balloon(ctx: Context, *, cycles: int, fraction: float, chunk: int, prealloc: bool) -> None:
    _boot_first(ctx, prealloc)
    for c in range(cycles):
        _balloon_round(ctx, fraction, chunk)
        ctx.progress((c + 1) / max(cycles, 1))


def migration(ctx: Context, *, resident: float, devices: int, buffers: int, prealloc: bool) -> None:
    shared = [(ctx.image, ctx.swiotlb_size())] if ctx.memory - ctx.image > ctx.swiotlb_size() else []
    for gpa, size in shared:
        ctx.reserve(gpa, size)
    try:  # the source's device buffers: apart from each other and from the SWIOTLB pool
        for _ in range(devices):
            gpa = ctx.random_region(buffers)
            ctx.reserve(gpa, buffers)
            shared.append((gpa, buffers))
    finally:
        for gpa, size in shared:
            ctx.release(gpa, size)
    with ctx.phase("incoming"):
        ctx.setup(prealloc=prealloc)
        for gpa, size in shared:  # the source's shared ranges, restored before the guest runs
            ctx.vmm.convert_memory(gpa, size, False)
            ctx.shared.assign(gpa >> PAGE_SHIFT, (gpa + size) >> PAGE_SHIFT, 1)
    with ctx.phase("reaccept"):
        total = (ctx.memory - ctx.image) // P2M
        k = int(total * resident)
        start = ctx.image
        n = len(ctx.guests)
        per = -(-k // n) if n else 0
        for i, g in enumerate(ctx.guests):
            s = start + i * per * P2M
            e = min(start + k * P2M, s + per * P2M)
            if s >= e:  # more vCPUs than 2M chunks to re-accept: this one has none
                continue
            for a, b in ctx.ram_pieces(s, e):
                for gpa, size in ctx.private_runs(a, b):
                    ctx.accept(g, gpa, size)
    with ctx.phase("resume"):
        for gpa, size in shared:
            ctx.touch(ctx.guest(), gpa, size, False)


def mixed(ctx: Context, *, ops: int, prealloc: bool) -> None:
    _boot_first(ctx, prealloc)
    pool = ctx.swiotlb_size()
    if ctx.memory - ctx.image <= pool:  # no room for the pool: it stays private, like the rest
        pool = 0
    with ctx.phase("swiotlb-pool"):
        if pool:
            g = ctx.guest()
            ctx.run_on(g, _share_pool, ctx, g, ctx.image, pool)
    implicit = ctx.vm.platform.name in ("snp", "tdx")  # SW_PROTECTED derives the type from the attribute
    with ctx.phase("steady"):
        for i in range(ops):
            x = ctx.rng.random()
            if x < 0.6:
                _churn_one(ctx, 1)
            elif x < 0.8:
                _virtio_cycle(ctx, 1, 2, 4 * PAGE_SIZE, 64 * PAGE_SIZE, 2)
            elif x < 0.9:
                _balloon_round(ctx, 0.001, P2M)
            elif implicit:
                _implicit_round_trip(ctx, ctx.random_page(ctx.image + pool))
            else:
                _churn_one(ctx, 1)
            if not i & 255:
                ctx.progress(i / max(ops, 1))


def _share_pool(ctx: Context, g: Guest, gpa: int, size: int) -> None:
    ctx.convert(g, gpa, size, False)
    ctx.touch(g, gpa, size, False)


def _implicit_round_trip(ctx: Context, gpa: int) -> None:
    """The guest uses a private page as shared without a page-state change / MapGPA
    (docs/kernel-semantics.md §7.6):
    KVM exits with ``KVM_EXIT_MEMORY_FAULT`` and QEMU converts the page. An SNP guest that
    does this has already rescinded its validation (the first half of its to-shared flow):
    touching a validated page with the C-bit clear and converting it back later would leave
    a validated page for PVALIDATE to refuse (``FAIL_NOUPDATE``, a terminated guest). Then the
    guest converts the page back to private properly and uses it."""
    g = ctx.guest()
    ctx.reserve(gpa, PAGE_SIZE)
    ctx.run_on(g, _implicit_page, ctx, g, gpa)


def _implicit_page(ctx: Context, g: Guest, gpa: int) -> None:
    if ctx.vm.platform.name == "snp":
        ctx._require(g.flows.pvalidate(gpa, PAGE_SIZE, False), f"rescinding [{gpa:#x}, +0x1000)")  # type: ignore[attr-defined]
    ctx.touch(g, gpa, PAGE_SIZE, False)
    ctx.shared.assign(gpa >> PAGE_SHIFT, (gpa >> PAGE_SHIFT) + 1, 1)
    ctx.convert(g, gpa, PAGE_SIZE, True)
    ctx.touch(g, gpa, PAGE_SIZE, True)
    ctx.release(gpa, PAGE_SIZE)


def implicit(ctx: Context, *, ops: int, prealloc: bool) -> None:
    """Implicit conversions, the KVM selftests' way (``private_mem_conversions_test``): the
    guest touches a page with the access type its attribute does not have, without a
    page-state change or MapGPA first. SNP and TDX: a private page used as shared
    (:func:`_implicit_round_trip`). SW_PROTECTED reports an access as private when the gfn's
    attribute is (docs/kvm-model.md), so only the other direction can mismatch: a page made
    shared is touched as private. From 6.11 that exits (``KVM_EXIT_MEMORY_FAULT``) and the VMM
    converts it; 6.8 takes the type from the attribute (``private_fault_source``), maps the
    page shared and nothing exits. The guest then converts the page back properly."""
    _boot_first(ctx, prealloc)
    sw = ctx.vm.platform.name == "sw_protected"
    with ctx.phase("implicit"):
        for i in range(ops):
            if not sw:
                _implicit_round_trip(ctx, ctx.random_page())
            else:
                g = ctx.guest()
                gpa = ctx.random_page()
                ctx.convert(g, gpa, PAGE_SIZE, False)  # zaps the private mapping
                # Implicit: no conversion asked for. (A shared leaf would satisfy the access
                # without a fault: SW_PROTECTED has no hardware check of the access type.)
                ctx.touch(g, gpa, PAGE_SIZE, True)
                ctx.convert(g, gpa, PAGE_SIZE, True)
                ctx.touch(g, gpa, PAGE_SIZE, True)
            if not i & 255:
                ctx.progress(i / max(ops, 1))


def replay(ctx: Context, *, file: str) -> None:
    replay_file(ctx, file)


#: The most operations of an ``ops`` option: each takes tens of microseconds to simulate, so
#: 10^9 of them are about a day's run.
_MAX_OPS = 10**9
#: The most devices: the PCI functions of one PCI segment (256 buses x 32 slots x 8 functions).
_MAX_DEVICES = 65536

_PREALLOC = Option(False, _bool, "fallocate the guest_memfd before marking RAM private (eager designs "
                   "then convert allocated pages in the ioctl)")

WORKLOADS: Mapping[str, Workload] = MappingProxyType({w.name: w for w in (
    Workload("boot", "VMM marks all RAM private; the guest lazily accepts all of it and uses it",
             MappingProxyType({"accept": Option(P2M, _granule, "acceptance unit: 2M or 4K"),
                               "prealloc": _PREALLOC}), boot),
    Workload("swiotlb", "boot, then bounce-buffer churn: random 4K private->shared->private with touches",
             MappingProxyType({"ops": _count(2000, _MAX_OPS, "conversion round trips"),
                               "touches": _count(1, 10**6, "shared accesses per round trip"),
                               "prealloc": _PREALLOC}), swiotlb, ("ops", "touches")),
    Workload("virtio", "boot, then virtio devices set up and tear down shared rings and buffers",
             MappingProxyType({"cycles": _count(20, 10**7, "device reset cycles"),
                               "devices": _count(4, _MAX_DEVICES, "devices"),
                               "queues": _count(2, 1024, "virtqueues per device"),
                               "ring": Option(16 * 1024, _page_size, "ring size per queue"),
                               "buffers": Option(256 * 1024, _page_size, "buffer pool per queue"),
                               "io": _count(4, 10**6, "passes over the buffers per cycle"),
                               "prealloc": _PREALLOC}), virtio, ("cycles", "devices", "queues", "io")),
    Workload("balloon", "boot, then balloon inflate (VMM punches holes) and deflate (guest re-faults)",
             MappingProxyType({"cycles": _count(2, 10**5, "inflate/deflate rounds"),
                               "fraction": Option(0.25, _fraction, "fraction of RAM per round"),
                               "chunk": Option(P2M, _granule, "balloon unit: 2M or 4K"),
                               "prealloc": _PREALLOC}), balloon),
    Workload("migration", "migration destination: restore shared ranges, re-accept resident memory",
             MappingProxyType({"resident": Option(1.0, _fraction, "fraction of private RAM the guest re-accepts"),
                               "devices": _count(4, _MAX_DEVICES, "device buffer pools to restore as shared"),
                               "buffers": Option(P2M, _page_size, "buffer pool size per device"),
                               "prealloc": _PREALLOC}), migration),
    Workload("mixed", "boot with a shared SWIOTLB pool, then random churn, virtio, balloon and implicit "
             "conversions", MappingProxyType({"ops": _count(2000, _MAX_OPS, "random actions"),
                                              "prealloc": _PREALLOC}), mixed),
    Workload("implicit", "boot, then implicit conversions (a page touched with the other access type, no "
             "conversion asked for); separates SW_PROTECTED 6.8 from 6.11+",
             MappingProxyType({"ops": _count(500, _MAX_OPS, "implicit conversions"),
                               "prealloc": _PREALLOC}), implicit),
    Workload("replay", "replay a kernel trace (trace-cmd report text), e.g. one written by --trace",
             MappingProxyType({"file": Option(None, _text, "the trace file")}), replay),
)})


#: Options whose 4K value asks the guest to accept in 4K units only, which a TDX guest cannot:
#: it always tries 1G, then 2M, then 4K (``try_accept_one``).
_ACCEPT_UNIT_OPTIONS = (("boot", "accept"), ("balloon", "chunk"))


def check_platform(workload: str, platform: str, options: Mapping[str, Any]) -> None:
    """Refuse parsed ``options`` of ``workload`` that the ``platform``'s guest cannot follow,
    before anything runs.

    Raises:
        ValueError: names the option, its value and what the platform accepts.
    """
    if platform != "tdx":
        return
    for wl, name in _ACCEPT_UNIT_OPTIONS:
        if workload == wl and options.get(name) == PAGE_SIZE:
            raise ValueError(f"workload {wl!r} option {name}=4K: a TDX guest accepts 1G, then 2M, then "
                             f"4K (try_accept_one) and has no 4K-only mode; on tdx use {name}=2M "
                             "(4K is for snp)")


def check_scale(workload: str, memory: int, image: int, options: Mapping[str, Any]) -> None:
    """Refuse parsed ``options`` of ``workload`` whose work grows with the guest's RAM past the
    cap of nested counts (10^9, docs/workloads.md, "Caps on counts"), before anything runs:
    a ``balloon`` round hands back ``fraction`` of the RAM's ``chunk`` units
    (:func:`_balloon_span`), so ``cycles`` rounds handle ``cycles`` times that many.

    Raises:
        ValueError: names the options, the memory and the count they would reach.
    """
    if workload != "balloon":
        return
    chunk = options["chunk"]
    per_round = _balloon_span(memory, image, chunk, options["fraction"])[2]
    total = options["cycles"] * per_round
    if total > _MAX_OPS:
        raise ValueError(f"workload 'balloon' options cycles={options['cycles']}, fraction={options['fraction']}, "
                         f"chunk={format_size(chunk)} at {format_size(memory)} of memory: the rounds would hand "
                         f"back {total:,} chunks ({per_round:,} a round), more than {_shown_count(_MAX_OPS)}; "
                         + (f"lower cycles or fraction (at most {_MAX_OPS // per_round:,} rounds of this size)"
                            if per_round <= _MAX_OPS else "lower fraction, or use a 2M chunk"))


def get(name: str) -> Workload:
    """The workload called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    w = WORKLOADS.get(name)
    if w is None:
        raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    return w
