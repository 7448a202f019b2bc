"""The concurrent timeline: pkvm's actors on one SimPy clock, with the kernel's locks.

Every actor — each vCPU thread (guest code, and the VMM's handling of that vCPU's exits, as
QEMU does it on the vCPU thread) and the VMM's main-loop thread (``vmm``: memory setup,
launch, discards) — is a SimPy process. The KVM model stays synchronous; an actor runs the
model's code as a *steppable coroutine* (a greenlet) that yields to its SimPy process at the
kernel's synchronisation points: a lock acquired or released (``slots_lock``, ``mmu_lock``,
guest_memfd's invalidate lock, the direct map's ``cpa_lock``, the TDX S-EPT), a retry that
waits for another thread, and a request for the next task. At each yield the actor's clock
advances by the modeled time charged since its last yield (the cost model's prices), so a run
of N pages handled as one batch is one event with the summed duration, split only where a lock
or another actor's event intervenes. Without a timeline the same code runs to completion and
the clock is the sum of work (``vm.modeled_ns``), exactly as before.

Time-ordering rule (determinism): SimPy processes events that fall at the same time in the
order they were scheduled; actors are created in the order ``vmm``, ``vcpu0``, ``vcpu1``...,
and a lock's waiters are served FIFO (readers behind a waiting writer wait: the qrwlock rule).
Same configuration and seed, same timeline, byte for byte.

See ``docs/timeline.md`` for the model, what is approximated and the results it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import greenlet  # type: ignore[import-untyped,unused-ignore]  # no stubs unless types-greenlet
import simpy

from pkvm._core import SchedActor, SchedHooks, hold_union_add
from pkvm.errors import InternalInvariantError
from pkvm.sim.locks import Mutex, RWLock, SpinLock
from pkvm.sim.recorder import CAT_BUSY, CAT_IPI_STALL, CAT_LOCK_HOLD, CAT_LOCK_WAIT, Recorder
from pkvm.sim.stats import Distribution

__all__ = ["Timeline", "TimelineResult", "READ", "WRITE", "LOCKS", "LATENCY_KINDS", "RACE_KINDS", "PAGEWISE_LOCK_MODELS",
           "MAX_CLOCK_NS", "auto_batch_pages"]

READ, WRITE = 0, 1

#: The most a timeline's clock may reach, in ns since it was attached (Timeline.sleep): the
#: typed core keeps times in C long longs, with room for sums of them.
MAX_CLOCK_NS = 1 << 62

#: Timeline(batch_pages=): 64 MiB of 4K pages.
DEFAULT_BATCH_PAGES = 1 << 14
MAX_BATCH_PAGES = 1 << 30
#: auto_batch_pages: the finer batch (2 MiB of 4K pages), the most batches of it in the RAM
#: (64 GiB), the most simulation work it may cost, counted as those batches times vCPUs
#: squared (16 GiB with 64 vCPUs, 64 GiB with 32), and the most vCPUs it was checked for.
AUTO_BATCH_PAGES = 1 << 9
AUTO_BATCH_COUNT = 1 << 15
AUTO_BATCH_BUDGET = (1 << 13) * 64 ** 2
AUTO_BATCH_VCPUS = 64


def auto_batch_pages(memory: int, vcpus: int) -> int:
    """The fault batch ``Config(batch_pages=None)`` (the default) runs ``vcpus`` vCPUs with on
    ``memory`` bytes of RAM: :data:`AUTO_BATCH_PAGES` (512 pages, 2 MiB) where the
    simulation can afford it, else :data:`DEFAULT_BATCH_PAGES` (16384, 64 MiB).

    A batch is the window over which the interleaved model spreads its page-by-page
    acquisitions of ``cpa_lock`` and the S-EPT, and windows that are long against the run are
    settled unfairly (docs/timeline.md, "Choosing the batch"): against the page-by-page
    reference, 512 pages put SNP boots with 3 to 64 vCPUs and TDX boots with 8 to 64 within 3 %
    of its critical path but one (the eager SNP boot at 512 MiB with 64 vCPUs, 7 %), where 1024
    pages were up to 13 % above it (16 and 64 vCPUs) and 16384 up to 26 %. Sizes from 2048 to
    8192 pages are not used: such a window holds a few 2M splits of the direct map, and SNP
    ``fault-time``'s waits for them came out further from the reference than with either end. Settling a window costs about
    the square of the number of vCPUs, and each batch costs its own events besides, so 512 is
    taken while the RAM holds at most :data:`AUTO_BATCH_COUNT` batches of it (64 GiB) and
    ``(memory / 2 MiB) * vcpus ** 2`` stays within :data:`AUTO_BATCH_BUDGET`, what 16 GiB
    with 64 vCPUs makes (64 GiB with 32; about 6 s of CPU for an eager SNP boot at 16 GiB with
    64 vCPUs, against 0.2 s with 16384 pages). One vCPU has no other vCPU's windows to share
    these locks with, and keeps 16384; so do more than :data:`AUTO_BATCH_VCPUS`, the most the
    finer batch was checked for.

    >>> auto_batch_pages(1 << 30, 8), auto_batch_pages(64 << 30, 8), auto_batch_pages(128 << 30, 8)
    (512, 512, 16384)
    >>> auto_batch_pages(64 << 30, 32), auto_batch_pages(16 << 30, 64), auto_batch_pages(32 << 30, 64)
    (512, 512, 16384)
    >>> auto_batch_pages(1 << 30, 65), auto_batch_pages(1 << 40, 1)
    (16384, 16384)
    """
    if type(memory) is not int or memory < 0:
        raise ValueError(f"memory {memory!r} must be a non-negative int (bytes)")
    if type(vcpus) is not int or vcpus < 1:
        raise ValueError(f"vcpus {vcpus!r} must be a positive int")
    batches = (memory >> 12) // AUTO_BATCH_PAGES  # batches of AUTO_BATCH_PAGES in the RAM
    if 1 < vcpus <= AUTO_BATCH_VCPUS and batches <= AUTO_BATCH_COUNT and batches * vcpus ** 2 <= AUTO_BATCH_BUDGET:
        return AUTO_BATCH_PAGES
    return DEFAULT_BATCH_PAGES


#: Timeline(pagewise_locks=): how the locks the kernel takes once per page (``cpa_lock``, the
#: S-EPT, ``mmu_lock`` for read in each fault) are modelled. "interleaved": a window of work's
#: page holds interleave with the other actors' (their waits are the lock's excess and each
#: acquisition's queueing, ``SchedHooks._pw_settle``; a fault batch's reads of ``mmu_lock``
#: with the write holds, ``SchedHooks._release_rd``); "batch": a batch holds the lock once for all its pages and others
#: queue behind the whole hold (the model before 2026-12-05; with ``batch_pages=1`` it is a
#: page-by-page simulation).
PAGEWISE_LOCK_MODELS = ("interleaved", "batch")


def check_pagewise_locks(value: object, name: str) -> str:
    """``value`` if it is one of :data:`PAGEWISE_LOCK_MODELS`, else ValueError naming ``name``."""
    if type(value) is not str or value not in PAGEWISE_LOCK_MODELS:
        raise ValueError(f"{name} {value!r} must be one of {', '.join(PAGEWISE_LOCK_MODELS)}")
    return value


def check_batch_pages(value: object, name: str) -> int:
    """``value`` if it is a power-of-two int in [1, 2**30], else ValueError naming ``name``."""
    if type(value) is not int or not 1 <= value <= MAX_BATCH_PAGES or value & (value - 1):
        raise ValueError(f"{name} {value!r} must be a power of two from 1 to {MAX_BATCH_PAGES} (pages)")
    return value

#: The locks the model takes, with the kernel object each stands for.
LOCKS: Mapping[str, str] = {
    "slots_lock": "kvm->slots_lock (mutex): the whole KVM_SET_MEMORY_ATTRIBUTES ioctl, memslot updates",
    "mmu_lock": "kvm->mmu_lock (rwlock_t, a qrwlock on x86): TDP MMU faults read, invalidations write",
    "gmem_invalidate": "the guest_memfd mapping's invalidate_lock, taken exclusive to punch a hole "
                       "(faults' pfn lookup takes only the folio lock, 6.8-6.18)",
    "cpa_lock": "the host kernel's direct-map change (set_memory_*): one per host, serialises splits",
    "tdx_sept": "the TDX module's per-TD S-EPT lock: concurrent SEAMCALLs get TDX_OPERAND_BUSY and retry",
}
LATENCY_KINDS = ("fault", "attr_ioctl", "conversion", "exit")
RACE_KINDS = ("rmp_npf_loop", "rmp_npf_loop_ns", "pf_retry", "pf_retry_ns", "tdx_busy_retry", "rmp_inuse_retry")

# requests an actor's coroutine sends to its SimPy process (the core's _SCHED_ACQ ...)
_ACQ, _REL, _WAIT, _SYNC, _DONE = 0, 1, 2, 3, 4
# what an actor's SimPy process is in the middle of (SchedActor.flight; the core's _FL_NONE ...)
_FL_NONE, _FL_BUSY, _FL_IPI, _FL_LOCK, _FL_SPIN = 0, 1, 2, 3, 4


#: One actor's state and accounting (the typed core's class: the hooks read it on every call).
_Actor = SchedActor


class TimelineResult:
    """What a timeline run reports (see ``docs/timeline.md``)."""

    __slots__ = ("critical_path_ns", "actors", "locks", "latency_ns", "races")

    def __init__(self, critical_path_ns: int, actors: dict[str, dict[str, int]], locks: dict[str, dict[str, int]],
                 latency_ns: dict[str, dict[str, int]], races: dict[str, int]) -> None:
        self.critical_path_ns = critical_path_ns
        self.actors = actors
        self.locks = locks
        self.latency_ns = latency_ns
        self.races = races

    def to_dict(self) -> dict[str, Any]:
        return {"critical_path_ns": self.critical_path_ns, "actors": self.actors, "locks": self.locks,
                "latency_ns": self.latency_ns, "races": self.races}


class Timeline(SchedHooks):
    """Runs a VM's actors concurrently on a SimPy clock (``docs/timeline.md``).

    ``env``: a ``simpy.Environment`` to share with the caller's own processes (default: a new
    one). ``host_cpus``: host CPUs interrupted by a kernel-range TLB flush. ``recorder``: a
    :class:`pkvm.sim.recorder.Recorder` to collect slices for a Chrome trace or a Gantt chart.
    ``batch_pages``: the most pages a private fault batch covers while another actor is in a
    task (a power of two, default 16384: 64 MiB); smaller is finer-grained and slower, and the
    waits behind another vCPU's batch come in smaller pieces (docs/timeline.md, "Range
    compression survives"; :func:`auto_batch_pages` gives the size ``pkvm.experiments`` runs
    with, closer to the page-by-page reference: "Choosing the batch" there). ``pagewise_locks``: how the locks the kernel takes page by page
    (``cpa_lock``, the S-EPT) are modelled, :data:`PAGEWISE_LOCK_MODELS` ("interleaved", the
    default, or "batch"; docs/timeline.md, "Locks the kernel takes page by page"). ValueError
    for anything else.

    Attach it, create actors with :meth:`spawn` (a function run on an actor) or
    :meth:`start_vcpu` (a vCPU thread that takes tasks from :meth:`dispatch`), then run the
    environment. A VM has at most one timeline.

    The hooks the model calls on every lock and latency sample (``acquire``, ``release``,
    ``latency_begin``, ``latency_end``, ``work_ns``, ``contended``, ``sync``) are the typed
    core's (``pkvm/_sched.pxi``); they call back into this class for what needs SimPy. So are
    ``ipi`` and the per-task machinery (``dispatch``, the actors' SimPy processes ``_drive``,
    the vCPU thread's task loop, ``_wait``, ``_switch``, ``_sync``, ``changed``); the
    recorder's slices and making uncontended locks real holds (``_make_holds``) stay here.
    """

    def __init__(self, vm: Any, env: simpy.Environment | None = None, *, host_cpus: int = 64,
                 recorder: Any = None, batch_pages: int = DEFAULT_BATCH_PAGES,
                 pagewise_locks: str = "interleaved") -> None:
        if not all(hasattr(vm, a) for a in ("_modeled_ns", "costs", "_hostmem")):
            raise TypeError(f"vm must be a pkvm.VM, got {type(vm).__name__}")
        if env is not None and not isinstance(env, simpy.Environment):
            raise TypeError(f"env must be a simpy.Environment or None, got {type(env).__name__}")
        if recorder is not None and not isinstance(recorder, Recorder):
            raise TypeError(f"recorder must be a pkvm.sim.recorder.Recorder or None, got {type(recorder).__name__}")
        if getattr(vm, "_sched", None) is not None:
            raise ValueError("the VM already has a timeline attached")
        if type(host_cpus) is not int or host_cpus < 1:
            raise ValueError(f"host_cpus={host_cpus!r} must be a positive int")
        check_batch_pages(batch_pages, "batch_pages")
        check_pagewise_locks(pagewise_locks, "pagewise_locks")
        self.env = env if env is not None else simpy.Environment()
        self.vm = vm
        self.host_cpus = host_cpus
        #: The most pages a private fault batch covers while another actor is in a task.
        self.batch_pages = batch_pages
        self.recorder = recorder
        self._rwlock = RWLock  # for the typed hooks (the core imports nothing from pkvm.sim)
        self._t0 = self.env.now
        env_ = self.env
        heap = getattr(env_, "_queue", None)
        #: SimPy's event heap (``Environment._queue``) for ``_queue_empty``, if it is one.
        self._heap = heap if type(heap) is list else None
        self.locks: dict[str, Any] = {
            "slots_lock": Mutex(env_, "slots_lock"),
            "mmu_lock": RWLock(env_, "mmu_lock"),
            "gmem_invalidate": Mutex(env_, "gmem_invalidate"),
            "cpa_lock": SpinLock(env_, "cpa_lock"),
            "tdx_sept": SpinLock(env_, "tdx_sept"),
        }
        #: How the locks the kernel takes page by page are modelled (PAGEWISE_LOCK_MODELS).
        self.pagewise_locks = pagewise_locks
        if pagewise_locks == "interleaved":
            for name in ("cpa_lock", "tdx_sept"):
                self.locks[name].interleaved = True
                self.locks[name].spans = []
            # a fault batch's reads of mmu_lock interleave with the write holds (SchedHooks._release_rd)
            self.locks["mmu_lock"].wholds = []
            self.locks["mmu_lock"].trim_w = 64
        self._actors: dict[str, _Actor] = {}
        self._active = 0  # actors in a task
        self._current: _Actor | None = None
        self._mark: int = vm._modeled_ns
        #: ``int(env.now - t0)`` while an actor runs (SimPy's clock stands still meanwhile), so
        #: its clock is ``_now0 + vm._modeled_ns - _mark`` without asking SimPy (the hot hooks).
        self._now0 = 0
        self._main = greenlet.getcurrent()
        self._greenlet = greenlet.greenlet  # the actors' coroutines (the core's _drive makes them)
        self._changed: simpy.Event | None = None
        self.latency: dict[str, Distribution] = {k: Distribution() for k in LATENCY_KINDS}
        self.races: dict[str, int] = dict.fromkeys(RACE_KINDS, 0)
        #: While a list: every latency sample added, as ``(kind, total, w, n)``: its ns, and
        #: for a batch of ``n`` operations the first one's waits (``latency_end``). The VMM's
        #: exit replay reads the samples of one exit to add them again (docs/performance.md).
        self.latency_log: list[tuple[str, int, int, int]] | None = None
        self._end: int | None = None
        costs = vm.costs
        self._npf_ns = max(1, costs.ns("npf_fault"))
        self._ipi_ns = max(1, costs.ns("ipi"))  # the interrupted CPU's side of one IPI
        self._seamcall_retry_ns = max(1, costs.ns("vmexit"))
        #: ns of each TDX AUG that holds the TD's S-EPT exclusively (docs/timeline.md).
        self.sept_ns = costs.ns("seamcall_aug_sept") if "seamcall_aug_sept" in costs else 0
        vm._sched = self

    # -- public ---------------------------------------------------------------------------------

    def _refuse_from_callback(self) -> None:
        """``KvmError(EDEADLK)`` when called from an event callback of this timeline's VM
        (docs/events.md), as the VM's own entry points refuse, changing nothing: each public
        method here schedules, and a switch to another actor in the middle of the call that
        emitted the event would run that actor's VM calls while this one is part way through
        (one of them failed with EDEADLK, or the lock bookkeeping and ``mmu_invalidate``
        counts were left wrong)."""
        if self.vm._in_callback:
            self.vm._nested_call()

    @property
    def now_ns(self) -> int:
        """The running actor's clock: the SimPy time plus the work it has not yielded yet."""
        if self._current is None:
            return int(self.env.now - self._t0)
        return int(self._now0 + self.vm._modeled_ns - self._mark)

    @property
    def current(self) -> str | None:
        """The name of the actor whose code runs now (None outside any actor)."""
        return self._current.name if self._current is not None else None

    def spawn(self, name: str, fn: Callable[..., Any], *args: Any) -> simpy.Process:
        """Run ``fn(*args)`` on a new actor ``name``; returns its SimPy process."""
        self._refuse_from_callback()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        actor = self._new_actor(name, isinstance(name, str) and name.startswith("vcpu"))
        self._set_in_task(actor, True)  # runnable from now on: no one takes a lock uncontended
        proc: simpy.Process = self.env.process(self._drive(actor, self._call_once, (actor, fn, args)))
        return proc

    def start_vcpu(self, name: str) -> simpy.Process:
        """Start vCPU thread ``name``: it runs the tasks given to :meth:`dispatch`, in order.

        With two vCPU threads or more, each allocates host pages from a region of its own (the
        page allocator's per-CPU lists), so concurrent faults do not interleave their pfns."""
        self._refuse_from_callback()
        actor = self._new_actor(name, True)
        vcpus = [a.name for a in self._actors.values() if a.vcpu]
        if len(vcpus) >= 2:
            mem = self.vm._hostmem
            stride = max(1 << 18, ((mem.end_pfn - mem.start_pfn) // (len(vcpus) + 1)) & ~((1 << 18) - 1))
            mem.per_cpu({n: mem.start_pfn + (i + 1) * stride for i, n in enumerate(vcpus)})
        actor.idle = self.env.event()
        actor.idle.succeed()
        proc: simpy.Process = self.env.process(self._drive(actor, self._task_loop, (actor,)))
        return proc

    def sleep(self, ns: int) -> None:
        """From an actor: do nothing for ``ns`` of simulated time (idle, not a stall), from
        the end of the work it did before (its clock, :attr:`now_ns`).

        Raises:
            ValueError: ``ns`` is not a non-negative int, or would take the timeline's clock
                (ns since it was attached) to :data:`MAX_CLOCK_NS` or beyond.
            RuntimeError: not called from code running on a timeline actor."""
        self._refuse_from_callback()
        if type(ns) is not int or ns < 0:
            raise ValueError(f"ns={ns!r} must be a non-negative int")
        if self._current is None:
            raise RuntimeError("Timeline.sleep is for code running on a timeline actor")
        if self.now_ns + ns >= MAX_CLOCK_NS:  # the clocks are C long longs (SchedHooks)
            raise ValueError(f"ns={ns!r} would take the timeline's clock past 2**62 ns (about 146 years)")
        self._sync()  # the work before the sleep passes first: the sleep starts at its end
        self._wait(self.env.timeout(ns), idle=True, keep_task=True)

    def barrier(self) -> None:
        """From an actor: wait until every vCPU thread has finished its task."""
        self._refuse_from_callback()
        self._sync()
        for a in list(self._actors.values()):
            while a.idle is not None and (a.task is not None or not a.idle.triggered):
                self._wait(a.idle, idle=True)

    def stop(self) -> None:
        """From an actor: finish every vCPU thread (after its task) and record the end."""
        self._refuse_from_callback()
        self.barrier()
        self._sync()
        self._end = int(self.env.now - self._t0)
        for a in self._actors.values():
            if a.idle is not None:
                a.task = None
                if a.work is not None and not a.work.triggered:
                    a.work.succeed("stop")

    def run(self) -> None:
        """Run the environment until every actor finished; raise what an actor raised, or
        :class:`pkvm.InternalInvariantError` if actors are left waiting on each other."""
        self._refuse_from_callback()
        self.env.run()
        stuck = [a.name for a in self._actors.values() if a.glet is not None and not a.glet.dead]
        if stuck:
            held = {a.name: list(a.held) for a in self._actors.values() if a.held}
            raise InternalInvariantError(f"timeline deadlock: actors {', '.join(stuck)} wait forever "
                                         f"(locks held: {held or 'none'})")

    def result(self) -> TimelineResult:
        """The timeline's figures: after the run, or at any moment of it (a snapshot).

        After the run, the critical path ends when the last of this timeline's actors
        finished (``stop``, or its last task or function), not when the environment stopped:
        processes of the embedder's own, or another VM's timeline on the same environment,
        may run on after it. While an actor is unfinished, the figures are those up to now:
        SimPy's clock, or, called from an actor's code, that actor's clock (:attr:`now_ns`,
        which counts its work since it last yielded). Work, IPI stalls, lock waits, spins and
        lock holds in progress count up to that time, so busy + wait + idle = critical path
        for every actor at every moment. Taking a result changes nothing: the run goes on as
        if it had not been taken (``docs/timeline.md``, "Results mid-run")."""
        cur = self._current
        fin = self._last_done()
        if fin is None:
            end = self.now_ns
        else:
            end = fin if self._end is None else max(self._end, fin)
        t0 = self._t0
        actors = {}
        for name in sorted(self._actors, key=_actor_order):
            a = self._actors[name]
            busy, wait, lock_wait, ipi, spin = a.busy, a.wait, a.lock_wait, a.ipi, a.spin
            if a is cur:  # its work since it resumed (SimPy's clock stands still meanwhile)
                busy += self.vm._modeled_ns - self._mark
            else:  # what its SimPy process is in the middle of, up to ``end``
                fl = a.flight
                if fl == _FL_BUSY or fl == _FL_IPI:
                    ahead = int(a.flight_t - t0) - end  # counted when it started
                    if ahead > 0:
                        if fl == _FL_BUSY:
                            busy -= ahead
                        else:
                            wait -= ahead
                            ipi -= ahead
                elif fl == _FL_LOCK or fl == _FL_SPIN:
                    so_far = end - int(a.flight_t - t0)  # counted when it ends
                    if so_far > 0:
                        wait += so_far
                        if fl == _FL_LOCK:
                            lock_wait += so_far
                        else:
                            spin += so_far
            actors[name] = {"busy_ns": busy, "wait_ns": wait, "idle_ns": end - busy - wait, "lock_wait_ns": lock_wait,
                            "ipi_ns": ipi, "spin_ns": spin}
        locks = {n: self._lock_figures(n, lk, cur, end) for n, lk in self.locks.items()}
        return TimelineResult(end, actors, locks, {k: d.as_dict() for k, d in self.latency.items()},
                              dict(self.races))

    def _lock_figures(self, name: str, lk: Any, cur: _Actor | None, end: int) -> dict[str, Any]:
        """``lk``'s statistics up to ``end`` (ns since the timeline's start). They count a hold
        at its release, and an actor's work passes on SimPy's clock after its code ran: holds
        still open count up to ``end``, and the part after ``end`` of a hold its holder took
        and released uncontended in work still passing does not count yet. An RWLock's
        ``hold_ns`` is the length of the union of its holds up to ``end``: of the holds it
        counted (``hold_union``) and the open ones."""
        d: dict[str, Any] = lk.stats.as_dict()
        rw = isinstance(lk, RWLock)
        now = end + self._t0  # in SimPy's time
        hold = write = read = 0  # hold time to add: in all, for write, for read
        opened: list[int] = []  # an RWLock's open holds' starts (SimPy's time)

        def add(mode: int, t: int) -> None:
            nonlocal hold, read, write
            hold += t
            if mode == READ:
                read += t
            else:
                write += t

        if rw:
            if lk.writer is not None and now > lk._write_since:
                write = now - lk._write_since
                opened.append(lk._write_since)
            for t in lk._readers.values():
                if now > t:
                    read += now - t
                    opened.append(t)
        elif lk.holder is not None and now > lk._held_since:
            hold = now - lk._held_since
        for a in self._actors.values():
            if a is cur:
                if a.fast:  # taken uncontended since it resumed: not in the SimPy lock yet
                    for lock, mode, t in a.held:
                        if lock == name and t >= 0 and end > t:
                            add(mode, end - t)
                            opened.append(t + self._t0)
                continue
            for lock, mode, t, t_rel in a.fast_done:
                if lock == name and t_rel > end:
                    add(mode, -(t_rel - max(t, end)))
        if rw:
            # the union up to now (in place of the sum add() made): what hold_ns counted, less
            # its part after now, and the open holds' parts before now that it does not cover
            hold = -sum(e - (s if s > now else now) for s, e in lk.hold_union if e > now)
            if opened:
                lo = min(opened)
                union = [list(iv) for iv in lk.hold_union if iv[1] >= lo]
                for t in opened:
                    hold += hold_union_add(union, t, now)
        if hold:
            d["hold_ns"] += int(hold)
        if rw:
            if write:
                d["hold_write_ns"] += int(write)
            if read:
                d["hold_read_ns"] += int(read)
        return d

    def _last_done(self) -> int | None:
        """When the last actor finished; None while any is unfinished."""
        for a in self._actors.values():
            if a.idle is not None:  # a vCPU thread: unfinished while it has a task
                if a.in_task or a.task is not None or not a.idle.triggered:
                    return None
            elif a.glet is None or not a.glet.dead:  # spawned: unfinished until its function returns
                return None
        return max((a.done for a in self._actors.values()), default=int(self.env.now - self._t0))

    # -- hooks the model calls (cheap when not attached: the model tests vm._sched) ---------------

    def _acquire_slow(self, a: _Actor, lock: str, mode: int) -> None:
        """:meth:`acquire` when another actor is in a task or the lock is held: through the
        actor's SimPy process, first-come first-served."""
        a.hold(lock, mode, -1)
        a.acq_wait = 0
        self._switch(a, (_ACQ, self._take(a), lock, mode))
        # (the wait for this lock alone: waits owed for earlier windows and paid on the way,
        # lock_debt, are events of their own, SchedHooks._pw_wait)
        if self.vm._subs is not None and a.acq_wait:
            self.vm._emit("lock_wait", None, None, lock, 1, 0, "read" if mode == READ else "write",
                          (a.acq_wait,))

    def serialize(self, lock: str, ns: int) -> None:
        """The last ``ns`` of the running actor's pending work ran under ``lock``: the rest of
        it runs first, unlocked, then the lock is taken for those ``ns`` (released by
        :meth:`release`). For an operation priced as a whole of which only a part holds a lock
        (a TDX AUG and the TD's S-EPT)."""
        a = self._current
        if a is None:
            return
        vm = self.vm
        # At most the work pending since the last visibility point (sync), skipped or not.
        pending = vm._modeled_ns - (self._vis if self._skipped else self._mark)
        if ns > pending:  # ns = max(0, min(ns, pending)), without the two calls
            ns = pending
        if ns < 0:
            ns = 0
        lk = self.locks[lock]
        if lk.interleaved:  # never queued: its windows are settled (SchedHooks._pw_settle)
            a.hold(lock, WRITE, self._now0 + vm._modeled_ns - self._mark - ns)  # now_ns - ns
            lk.stats.acquisitions += 1
            return
        if (self._active <= a.in_task and not lk.locked
                and self._now0 + vm._modeled_ns - self._mark - ns >= lk.held_until):
            a.hold(lock, WRITE, self._now0 + vm._modeled_ns - self._mark - ns)  # now_ns - ns
            a.fast += 1
            lk.stats.acquisitions += 1
            return
        a.hold(lock, WRITE, -1)
        a.acq_wait = 0
        self._mark += ns  # the unlocked part goes first
        self._switch(a, (_ACQ, self._take(a), lock, WRITE))
        self._mark -= ns  # the locked part is still to run: it is advanced at the release
        if vm._subs is not None and a.acq_wait:  # (this lock's wait alone, as _acquire_slow)
            vm._emit("lock_wait", None, None, lock, 1, 0, "write", (a.acq_wait,))

    def _release_slow(self, a: _Actor, lock: str, mode: int) -> None:
        """:meth:`release` of a lock its SimPy lock knows (taken contended, or made a real
        hold when the actor yielded while holding it)."""
        self._switch(a, (_REL, self._take(a), lock, mode))
        t0 = a.grant_t.pop((lock, mode), None)
        if self.vm._subs is not None and t0 is not None:  # to the release (SchedActor.rel_t)
            self.vm._emit("lock_hold", None, None, lock, 1, 0, "read" if mode == READ else "write",
                          (a.rel_t - t0,))

    def _record_hold(self, a: _Actor, lock: str, mode: int, lk: Any, t: int, now: int) -> None:
        """The recorder's slice of a hold taken and released uncontended."""
        self.recorder.slice(a.name, f"hold {lock}" + (" (read)" if mode == READ and isinstance(lk, RWLock) else ""),
                            t, now, CAT_LOCK_HOLD)

    def _idle_now_ns(self) -> int:
        return int(self.env.now - self._t0)

    def holds(self, lock: str, mode: int = WRITE) -> bool:
        """Whether the running actor holds ``lock`` in ``mode``."""
        a = self._current
        return a is not None and any(h[0] == lock and h[1] == mode for h in a.held)

    def wait_changed(self, race: str, first: bool = True) -> bool:
        """A vCPU spins (re-faulting) until some other actor changes state; False (and no wait)
        if no other actor is running a task, i.e. nothing could ever end the spin. ``first``:
        this is the spin's first wait (the race is counted once, its time every time)."""
        a = self._current
        if a is None or not self.contended():
            return False
        if self._changed is None:
            self._changed = self.env.event()
        s0 = a.spin
        self._wait(self._changed)
        waited = a.spin - s0  # the spin alone: not the work still pending when it began
        if first:
            self.races[race] += 1
            if self.recorder is not None:  # where the spin began, after the pending work
                self.recorder.instant(a.name, race, int(self.env.now - waited - self._t0), "race")
        self.races[race + "_ns"] = self.races.get(race + "_ns", 0) + waited
        return True

    def retry_fault(self, gfn: int, prefetch: bool = False) -> bool:
        """RET_PF_RETRY on ``gfn``: the vCPU re-enters the guest and faults again, spinning
        while an invalidation covering ``gfn`` is in progress (``mmu_invalidate_retry_gfn``);
        the spin's re-faults are counted, its time is a stall. ``prefetch``: the retry loop of
        ``KVM_PRE_FAULT_MEMORY`` (``kvm_tdp_map_page``), whose faults count no ``pf_taken``
        or ``pf_retry``. True if it spun, or if an invalidation another thread ended during the
        fault turned it back (``mmu_invalidate_seq`` moved since the fault's snapshot): the
        caller's next attempt is not one of a loop that cannot end (a retry no invalidation
        explains, as on a memslot being deleted, is). With many vCPUs converting, one gfn can
        be turned back that way many times in a row; the kernel re-enters the guest each time
        and gets through, so those do not count towards ``RETRY_LIMIT``."""
        a = self._current
        vm = self.vm
        self.races["pf_retry"] += 1
        if a is None or not self.contended():
            return False
        s0 = a.spin
        while vm.mmu_invalidate_in_progress and vm._range_start <= gfn < vm._range_end:
            if self._changed is None:
                self._changed = self.env.event()
            self._wait(self._changed)
        waited = a.spin - s0  # the spin alone: not the work still pending when it began
        if self.recorder is not None and waited:  # where the spin began, after the pending work
            self.recorder.instant(a.name, "pf_retry", int(self.env.now - waited - self._t0), "race")
        spins = waited // self._npf_ns
        self.races["pf_retry"] += spins
        self.races["pf_retry_ns"] += waited
        if not prefetch:
            st = vm._stats
            st["pf_retry"] += spins
            st["pf_taken"] += spins
        return bool(waited > 0) or vm._stats["mmu_invalidate_seq"] != a.fault_seq

    # -- internals -----------------------------------------------------------------------------

    def _new_actor(self, name: str, vcpu: bool) -> _Actor:
        if not isinstance(name, str) or not name:
            raise TypeError(f"an actor's name must be a non-empty str, got {name!r}")
        if name in self._actors:
            raise ValueError(f"actor {name!r} exists")
        a = self._actors[name] = _Actor(name, vcpu)
        return a

    def _make_holds(self, a: _Actor) -> None:
        """Before ``a`` yields (``_switch``): the locks it took uncontended become real holds
        of their SimPy locks, granted at their own time, so whoever runs meanwhile sees them
        held."""
        for i, (lock, mode, t) in enumerate(a.held):
            if t < 0:
                continue
            lk = self.locks[lock]
            if lk.interleaved:  # never a SimPy hold (SchedHooks._pw_settle)
                continue
            ev = (lk.acquire_read(a.name) if mode == READ else lk.acquire_write(a.name)) \
                if isinstance(lk, RWLock) else lk.acquire(a.name)
            if not ev.triggered:
                raise InternalInvariantError(f"{lock} taken uncontended by {a.name} is held by another actor")
            lk.stats.acquisitions -= 1  # counted when it was taken
            # granted at its own time, t (at or after SimPy's: on a's clock), so SimPy's lock
            # counts the hold (and its slice) from there, as the core counts one it releases
            if isinstance(lk, RWLock):
                if mode == READ:
                    lk._readers[a.name] = t + self._t0
                else:
                    lk._write_since = t + self._t0
            else:
                lk._held_since = t + self._t0
            a.grant_t[(lock, mode)] = t
            a.held_granted(i)
        a.fast = 0

    # the recorder's slices of _drive (the typed core's: pkvm/_sched.pxi)

    def _rec_work(self, a: _Actor, dt: int) -> None:
        t = self.env.now - self._t0
        self.recorder.slice(a.name, "work", t, t + dt, CAT_BUSY)

    def _rec_ipi(self, a: _Actor, debt: int) -> None:
        t = self.env.now - self._t0
        self.recorder.slice(a.name, "IPI", t, t + debt, CAT_IPI_STALL)

    def _rec_lock_wait(self, a: _Actor, lock: str, t0: int, t1: int | None = None) -> None:
        """A ``wait LOCK`` slice from SimPy time ``t0`` to ``t1`` (default: now)."""
        end = self.env.now if t1 is None else t1
        self.recorder.slice(a.name, f"wait {lock}", t0 - self._t0, end - self._t0, CAT_LOCK_WAIT)

    def _rec_hold(self, a: _Actor, lock: str, mode: int, lk: Any, granted: int) -> None:
        self.recorder.slice(a.name, f"hold {lock}" + (" (read)" if mode == READ and isinstance(lk, RWLock) else ""),
                            granted, self.env.now - self._t0, CAT_LOCK_HOLD)

    def _rec_spin(self, a: _Actor, t0: int) -> None:
        self.recorder.slice(a.name, "spin", t0 - self._t0, self.env.now - self._t0, "spin")


def _actor_order(name: str) -> tuple[int, int, str]:
    if name.startswith("vcpu") and name[4:].isdigit():
        return (1, int(name[4:]), name)
    return (0, 0, name)
