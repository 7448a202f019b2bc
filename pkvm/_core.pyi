"""Type stubs for the typed core :mod:`pkvm._core`.

Keys are ``uint64``; ranges are half-open ``[start, end)`` with ``0 <= start <= end <= 2**64 - 1``
(so the key ``2**64 - 1`` itself can never be assigned and always reads as ``default``).
"""

from typing import Any, Callable, Iterator

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

UINT64_MAX: int
__test__: dict[str, str]
__pyx_capi__: dict[str, object]  # capsules of the C API (pkvm/core.pxd, docs/embedding.md)

@disjoint_base
class RangeMap:
    """A coalescing map from half-open ``uint64`` key ranges to ``uint64`` values.

    Keys not covered by a stored run have ``default``. Adjacent runs with equal values merge;
    runs whose value equals ``default`` are not stored.
    """

    def __new__(
        cls, default: int = 0, *, _fanout: int | None = None, _finger: bool = False
    ) -> RangeMap:
        """``_fanout`` (4..64) shrinks the nodes so that tests reach deep trees with few runs;
        ``_finger`` keeps a descent finger (the kernel's per-GFN maps, docs/performance.md)."""
    @property
    def default(self) -> int: ...
    @property
    def nbytes(self) -> int:
        """Bytes of C memory owned by the map (nodes and value arrays)."""
    def __len__(self) -> int:
        """Number of stored (non-default, coalesced) runs."""
    def __repr__(self) -> str: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __reduce__(self) -> tuple[object, ...]: ...
    def assign(self, start: int, end: int, value: int) -> None:
        """Set every key in ``[start, end)`` to ``value``. ``start == end`` is a no-op."""
    def get(self, key: int) -> int: ...
    def find_ne(self, start: int, end: int, value: int) -> int:
        """First key in ``[start, end)`` whose value is not ``value``, or -1."""
    def run_at(self, key: int) -> tuple[int, int, int]:
        """The maximal run ``(start, end, value)`` that contains ``key``.

        Gaps between stored runs are runs of ``default``. ``key`` must be ``< 2**64 - 1``;
        ``end`` is at most ``2**64 - 1``.
        """
    def ranges(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
        """Stored runs that intersect ``[start, end)``, clipped to it, in key order."""
    def iter_ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Like :meth:`ranges` but lazy; the map must not be modified while iterating."""
    def assign_many(
        self,
        starts: npt.ArrayLike,
        ends: npt.ArrayLike,
        values: npt.ArrayLike | int,
    ) -> None:
        """``assign`` for every ``i`` in array order (later entries win).

        Everything is validated before anything changes; ``values`` may be a scalar.
        """
    def get_many(self, keys: npt.ArrayLike) -> npt.NDArray[np.uint64]: ...
    def clear(self) -> None: ...
    def copy(self) -> RangeMap: ...
    def _check(self) -> None:
        """Assert every structural invariant; raises ``AssertionError`` naming the bad run."""
    def _depth(self) -> int:
        """Test hook: height of the tree (1 = a single leaf)."""
    def _finger_window(self) -> tuple[int, int] | None:
        """Test hook: the keys whose descent lands in the finger's leaf, or None."""

# -- SEV-SNP RMP table (pkvm/_rmp.pxi) ------------------------------------------------------------

from typing import NamedTuple

RMP_MAX_PFN: int

class RmpEntry(NamedTuple):
    """One RMP entry as :meth:`RmpTable.lookup` reports it (level from the 2M-aligned entry)."""

    assigned: bool
    level: int
    asid: int
    gpa: int
    immutable: bool
    validated: bool
    vmsa: bool

@disjoint_base
class RmpTable:
    """The SEV-SNP Reverse Map Table: one entry per host pfn, range-compressed.

    Ranges are half-open ``[pfn, pfn + npages)``; range forms return
    ``(done, fail_pfn, code)``: instructions that succeeded, the pfn operand of the first that
    did not (-1 if none) and its code (0 if none).
    """

    def __new__(cls, max_pfn: int = ..., *, _fanout: int | None = None) -> RmpTable: ...
    @property
    def max_pfn(self) -> int: ...
    @property
    def counters(self) -> dict[str, int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def nruns(self) -> int: ...
    def __reduce__(self) -> tuple[object, ...]: ...
    def rmpupdate(
        self, pfn: int, level: int, *, assigned: bool, asid: int = 0, gpa: int = 0,
        immutable: bool = False,
    ) -> int: ...
    def rmpupdate_range(
        self, pfn: int, npages: int, level: int, *, assigned: bool, asid: int = 0,
        gpa: int = 0, immutable: bool = False,
    ) -> tuple[int, int, int]: ...
    def psmash(self, pfn: int) -> int: ...
    def psmash_range(self, pfn: int, npages: int) -> tuple[int, int, int]: ...
    def pvalidate(self, pfn: int, level: int, *, asid: int, gpa: int, validate: bool) -> int: ...
    def pvalidate_range(
        self, pfn: int, npages: int, level: int, *, asid: int, gpa: int, validate: bool,
    ) -> tuple[int, int, int]: ...
    def firmware_update(
        self, pfn: int, npages: int, *, immutable: bool | None = None,
        validated: bool | None = None, vmsa: bool | None = None,
    ) -> None: ...
    def set_in_use(self, pfn: int, npages: int = 1, in_use: bool = True) -> None:
        """Test hook: RMPUPDATE/PSMASH on these pages return FAIL_INUSE while set."""
    def in_use(self, pfn: int) -> bool: ...
    def lookup(self, pfn: int) -> RmpEntry: ...
    def ranges(
        self, pfn: int = 0, npages: int | None = None,
    ) -> list[tuple[int, int, RmpEntry]]: ...
    def find_ne(
        self, pfn: int, npages: int, *, assigned: bool | None = None, level: int | None = None,
        asid: int | None = None, gpa: int | None = None, immutable: bool | None = None,
        validated: bool | None = None, vmsa: bool | None = None,
    ) -> int: ...
    def find_eq(
        self, pfn: int, npages: int, *, assigned: bool | None = None, level: int | None = None,
        asid: int | None = None, gpa: int | None = None, immutable: bool | None = None,
        validated: bool | None = None, vmsa: bool | None = None,
    ) -> int: ...
    def reset_counters(self) -> None: ...
    def _check(self) -> None:
        """Assert every RMP invariant; raises ``AssertionError`` naming the bad run."""

# -- batched calls (pkvm/_batch.pxi; the public methods are pkvm.kvm.batch's) ------------------------

def _attr_calls(
    gpas: npt.NDArray[np.uint64], sizes: npt.NDArray[np.uint64], attrs: npt.NDArray[np.uint64],
    flags: int, supported: int, vm: object, body: Callable[[int, int, int], object],
    error: type[BaseException], out: npt.NDArray[np.int32],
) -> None:
    """One ``KVM_SET_MEMORY_ATTRIBUTES`` per element; ``out[i]`` gets call ``i``'s errno."""

# -- the nested page fault's objects (pkvm/_fault.pxi) --------------------------------------------

from typing import Any, ClassVar, final

@final
class PageFault:
    """``struct kvm_page_fault``, widened to a batch of identical faults ``[gfn, end)``."""

    gfn: int
    limit: int
    end: int
    private_access: bool
    is_private: bool
    write: bool
    mmu_seq: int
    slot: Any
    delta: int
    max_level: int
    map_writable: bool
    level: int
    ret: str
    errno: int
    memory_fault: tuple[int, int, int] | None
    nfaults: int
    host_level: int
    single: bool
    order: int
    prefetch: bool
    attr: int
    def __init__(self, gfn: int, limit: int, private: bool, write: bool, prefetch: bool = False) -> None: ...

@final
class FaultResult:
    """Outcome of ``Vcpu.page_fault`` (immutable, hashable, compared by value)."""

    __match_args__: ClassVar[tuple[str, ...]]
    @property
    def ret(self) -> str: ...
    @property
    def level(self) -> int | None: ...
    @property
    def pfn(self) -> int | None: ...
    @property
    def exit_reason(self) -> int | None: ...
    @property
    def memory_fault(self) -> tuple[int, int, int] | None: ...
    @property
    def errno(self) -> int | None: ...
    @property
    def retries(self) -> int: ...
    @property
    def loop(self) -> str | None: ...
    def __init__(self, ret: str, level: int | None = None, pfn: int | None = None,
                 exit_reason: int | None = None, memory_fault: tuple[int, int, int] | None = None,
                 errno: int | None = None, retries: int = 0, loop: str | None = None) -> None: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...

def memory_fault_exit(f: PageFault, err: int) -> None:
    """``kvm_mmu_prepare_memory_fault_exit`` + a negative return: fill a memory-fault exit into ``f``."""

# -- the nested page fault's phases (pkvm/_fault.pxi); private to pkvm.kvm ---------------------------

def _mmu_make_spte(delta: int, level: int, private: bool, writable: bool) -> int: ...
def _mmu_split_to(sptes: RangeMap, stats: MutableMapping[str, int], gfn: int, level: int,
                  charge: Callable[[str, int], object]) -> None: ...
def _mmu_map_leaf(sptes: RangeMap, stats: MutableMapping[str, int], gfn: int, level: int, value: int,
                  charge: Callable[[str, int], object]) -> tuple[bool, bool]: ...
def _mmu_map_run(sptes: RangeMap, stats: MutableMapping[str, int], start: int, end: int, level: int, value: int) -> None: ...

@disjoint_base
class FaultPath:
    """The typed state of one VM's nested page-fault path (``VM._fault_path``)."""

    def __init__(self, vm: object, gmem_get_pfn: Callable[..., int], set_external: Callable[..., bool],
                 topup: Callable[..., None], timeline_run: Callable[..., tuple[PageFault, FaultResult]],
                 emit_fault: Callable[..., None], base_fault: Callable[..., object],
                 gpa_to_gfn: Callable[[object], int], is_implemented: Callable[[object], bool],
                 kvm_error: type[BaseException], alloc_op: str) -> None: ...
    def page_fault(self, vcpu: object, gpa: object, private: object, write: object) -> FaultResult: ...
    def fault(self, vcpu: object, gfn: int, limit: int, private: bool, write: bool) -> tuple[int, FaultResult]: ...
    def run(self, vcpu: object, gfn: int, limit: int, private: bool, write: bool,
            prefetch: bool = False) -> tuple[PageFault, FaultResult]: ...
    def calls(self, vcpu: object, gpas: npt.NDArray[np.uint64], private: npt.NDArray[np.uint8],
              write: npt.NDArray[np.uint8], check: Callable[[], object] | None, codes: dict[str, int],
              ret: npt.NDArray[np.int8], level: npt.NDArray[np.int8], pfn: npt.NDArray[np.int64],
              err: npt.NDArray[np.int32], retries: npt.NDArray[np.int32], extras: dict[int, FaultResult],
              done: npt.NDArray[np.int64]) -> None: ...
    def after(self, vcpu: object, f: PageFault, r: FaultResult, gfn: int, private: bool, write: bool,
              took: int) -> None: ...
    def begin(self, f: PageFault) -> None: ...
    def faultin(self, f: PageFault) -> None: ...
    def max_level(self, f: PageFault) -> int: ...
    def stale(self, f: PageFault) -> None: ...
    def install(self, f: PageFault) -> None: ...
    def finish(self, f: PageFault) -> FaultResult: ...

# -- the KVM_SET_MEMORY_ATTRIBUTES path (pkvm/_attr.pxi); private to pkvm.kvm -------------------

def _mmu_zap_range(
    sptes: RangeMap, stats: MutableMapping[str, int], start: int, end: int, types: int,
    removed: list[tuple[int, int, int]] | None,
) -> int: ...
def _mmu_drop_leaves(sptes: RangeMap, stats: MutableMapping[str, int], start: int, end: int) -> int: ...
def _lpage_any_mixed(m: RangeMap, first: int, last: int) -> bool: ...
def _lpage_clear_mixed(m: RangeMap, first: int, last: int) -> None: ...
def _hugepage_has_attrs(amap: RangeMap, m2: RangeMap, gfn: int, level: int, attrs: int) -> bool: ...

@disjoint_base
class AttrPath:
    """The typed state of one VM's ``KVM_SET_MEMORY_ATTRIBUTES`` path (``VM._attr_path``)."""

    def __init__(self, vm: object) -> None: ...
    def ioctl(self, address: int, size: int, attributes: int, flags: int) -> None: ...
    def checked(self, start: int, end: int, attrs: int) -> None: ...
    def pre(self, ranges: list[tuple[int, int, int]], attrs: int) -> None: ...
    def commit(self, start: int, end: int, attrs: int) -> None: ...
    def post(self, ranges: list[tuple[int, int, int]], attrs: int) -> None: ...
    def post_set_mixed(self, slot: object, start: int, end: int, attrs: int) -> None: ...
    def zap(self, start: int, end: int, attr_filter: int) -> int: ...
    def flush_remote_tlbs(self) -> None: ...

# -- the concurrent timeline's hooks (pkvm/_sched.pxi); private to pkvm.sim ------------------------

@final
class SchedActor:
    """One actor of a timeline (``pkvm.sim.timeline``): a vCPU thread or the VMM's main loop."""

    name: Any
    glet: Any
    task: Any
    work: Any
    idle: Any
    grant_t: Any
    charge_to: Any
    busy: Any
    wait: Any
    lock_wait: Any
    ipi: Any
    spin: Any
    stall_debt: Any
    held: list[Any]
    in_task: bool
    vcpu: bool
    fast: int
    def __init__(self, name: Any, vcpu: Any) -> None: ...

@disjoint_base
class LockStatsState:
    """The fields of :class:`pkvm.sim.locks.LockStats` (its base class)."""

    hold_ns: Any
    hold_write_ns: Any
    hold_read_ns: Any
    wait_ns: Any
    waits: Any
    acquisitions: Any
    wait_distribution: Any
    _rw: bool

@disjoint_base
class LockState:
    """What the timeline's hooks read of a lock (the base class of ``pkvm.sim.locks``' locks)."""

    locked: bool
    stats: LockStatsState

@disjoint_base
class DistState:
    """The state of :class:`pkvm.sim.stats.Distribution` (its base class)."""

    _hist: dict[Any, int]
    _count: int
    _total: Any
    _max: Any
    _sorted: tuple[list[Any], Any] | None
    def __getstate__(self) -> tuple[dict[Any, int], int, Any, Any]: ...
    def __setstate__(self, state: tuple[dict[Any, int], int, Any, Any]) -> None: ...
    def _add(self, value: Any, count: int) -> None: ...

@disjoint_base
class SchedHooks:
    """The hot hooks of :class:`pkvm.sim.Timeline` (its base class)."""

    vm: Any
    recorder: Any
    latency_log: Any
    _rwlock: Any
    locks: dict[Any, Any]
    latency: dict[Any, Any]
    _current: SchedActor | None
    _active: int
    _now0: int
    _mark: int
    _vis: int
    _skipped: bool
    env: Any
    _t0: Any
    _main: Any
    _greenlet: Any
    _changed: Any
    _actors: dict[str, SchedActor]
    def acquire(self, lock: Any, mode: Any = 1) -> None: ...
    def release(self, lock: Any, mode: Any = 1) -> None: ...
    def latency_begin(self) -> tuple[int, Any]: ...
    def latency_end(self, kind: Any, begin: Any, n: Any = 1) -> None: ...
    def work_ns(self) -> int: ...
    def contended(self) -> bool: ...
    def sync(self) -> None: ...
    def changed(self) -> None: ...
    def ipi(self, scope: str, n: int = 1) -> None: ...
    def dispatch(self, name: str, fn: Callable[..., Any], *args: Any) -> None: ...
    def _set_in_task(self, a: SchedActor, value: bool) -> None: ...
    def _take(self, a: SchedActor | None) -> int: ...
    def _sync(self) -> None: ...
    def _switch(self, a: SchedActor, req: tuple[Any, ...]) -> Any: ...
    def _wait(self, ev: Any, idle: bool = False, keep_task: bool = False) -> Any: ...
    def _call_once(self, a: SchedActor, fn: Callable[..., Any], args: tuple[Any, ...]) -> None: ...
    def _task_loop(self, a: SchedActor) -> None: ...
    def _resume(self, a: SchedActor) -> None: ...
    def _drive(self, a: SchedActor, body: Callable[..., Any], args: tuple[Any, ...]) -> Any: ...

def directmap_split(m: RangeMap, orig: RangeMap, s: int, e: int) -> tuple[int, int, int]: ...
def directmap_invalidate(m: RangeMap, orig: RangeMap, s: int, e: int, cnt: dict[str, int]) -> int: ...
def snp_batch_end(folios: RangeMap, rmp: Any, off: int, gfn: int, end: int, validated: bool,
                  asid: int) -> int: ...
def directmap_restore(m: RangeMap, s: int, e: int, cnt: dict[str, int]) -> None: ...
def fault_timeline(
    vcpu: Any, gfn: int, limit: int, private: bool, write: bool, prefetch: bool
) -> tuple[PageFault, FaultResult]: ...

# -- guest_memfd, the host allocator and SNP's RMP wrappers (pkvm/_gmem.pxi) ----------------------

from typing import Mapping

#: ``directmap`` argument name of the RMP wrappers -> the code :class:`SnpPath` takes.
DIRECTMAP_MODES: Mapping[str, int]

def hostmem_plan(
    used: RangeMap, start: int, end: int, cursor: int, n_units: int, order: int
) -> list[tuple[int, int]] | None: ...
def hostmem_alloc(hm: object, n_units: int, order: int) -> list[tuple[int, int]]: ...
def hostmem_free(hm: object, pfn: int, npages: int) -> None: ...
def shared_populate(sb: object, start: int, end: int) -> int: ...
def split_2m_runs(start: int, end: int) -> list[tuple[int, int, int]]: ...

@final
class SnpPath:
    """The typed state of one SNP VM's RMP wrappers (``vm.snp._path``)."""

    @property
    def prepare_op(self) -> Callable[..., int]: ...
    @property
    def invalidate_op(self) -> Callable[..., int]: ...
    def __init__(
        self,
        vm: object,
        snp: object,
        prepare: Callable[..., int],
        invalidate: Callable[..., int],
        injected: Callable[..., int],
        psmash: Callable[..., int],
    ) -> None: ...
    def rebind(self) -> None: ...
    def directmap(self, before: bool, pfn: int, npages: int, level: int, assigned: bool) -> int: ...
    def rmpupdate_range(
        self, pfn: int, npages: int, level: int, assigned: bool, gfn: int = 0, immutable: bool = False, dm: int = 0
    ) -> int: ...
    def body(
        self, pfn: int, npages: int, level: int, assigned: bool, gfn: int, immutable: bool, dm: int
    ) -> int: ...
    def gmem_prepare(self, gfn: int, pfn: int, order: int, nr: int) -> int: ...
    def make_shared_range(self, pfn_start: int, pfn_end: int, flush: bool, dm: int = 0) -> int: ...
    def gmem_invalidate(self, pfn_start: int, pfn_end: int) -> int: ...

@final
class GmemPath:
    """The typed state of one VM's guest_memfd steps (``vm._gmem_path``)."""

    def __init__(
        self, vm: object, is_implemented: Callable[[object], bool], memory_fault_exit: Callable[..., None]
    ) -> None: ...
    def alloc_folios(
        self, gmem: object, index: int, count: int, order: int, prepared: bool
    ) -> list[tuple[int, int]]: ...
    def get_pfn(self, f: PageFault, end_obj: int) -> int: ...
    def truncate(self, gmem: object, start: int, end: int) -> None: ...
    def bound_gfn_ranges(self, gmem: object, start: int, end: int) -> list[tuple[int, int]]: ...
    def punch_hole(self, gmem: object, start: int, end: int) -> None: ...

# -- the guest's and the VMM's per-run results (pkvm/_results.pxi); public via pkvm.kvm.exits ----

@final
class Hypercall:
    """``run->hypercall``: what KVM forwards to userspace on ``KVM_EXIT_HYPERCALL`` (compared
    by value, unhashable)."""

    __match_args__: ClassVar[tuple[str, ...]]
    nr: int
    args: tuple[int, int, int]
    ret: int
    flags: int
    def __init__(self, nr: int, args: tuple[int, int, int], ret: int = 0, flags: int = 0) -> None: ...
    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class GuestOpResult:
    """Outcome of a guest instruction run through KVM (compared by value, unhashable)."""

    __match_args__: ClassVar[tuple[str, ...]]
    ret: str
    status: int | None
    value: int | None
    exit_reason: int | None
    hypercall: Hypercall | None
    memory_fault: tuple[int, int, int] | None
    errno: int | None
    faults: int
    retries: int
    loop: str | None
    def __init__(self, ret: str, status: int | None = None, value: int | None = None,
                 exit_reason: int | None = None, hypercall: Hypercall | None = None,
                 memory_fault: tuple[int, int, int] | None = None, errno: int | None = None,
                 faults: int = 0, retries: int = 0, loop: str | None = None) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class AccessResult:
    """Outcome of ``Vcpu.access`` (immutable, hashable, compared by value)."""

    __match_args__: ClassVar[tuple[str, ...]]
    @property
    def ret(self) -> str: ...
    @property
    def pages_done(self) -> int: ...
    @property
    def faults(self) -> int: ...
    @property
    def level(self) -> int | None: ...
    @property
    def pfn(self) -> int | None: ...
    @property
    def exit_reason(self) -> int | None: ...
    @property
    def memory_fault(self) -> tuple[int, int, int] | None: ...
    @property
    def errno(self) -> int | None: ...
    @property
    def retries(self) -> int: ...
    @property
    def loop(self) -> str | None: ...
    def __init__(self, ret: str, pages_done: int, faults: int, level: int | None = None,
                 pfn: int | None = None, exit_reason: int | None = None,
                 memory_fault: tuple[int, int, int] | None = None, errno: int | None = None,
                 retries: int = 0, loop: str | None = None) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class ExitResult:
    """How the VMM answered one exit (immutable, hashable, compared by value); truthy iff the
    vCPU may run on."""

    __match_args__: ClassVar[tuple[str, ...]]
    @property
    def handled(self) -> bool: ...
    @property
    def step(self) -> str: ...
    @property
    def exit_reason(self) -> int | None: ...
    @property
    def errno(self) -> int: ...
    @property
    def detail(self) -> str: ...
    def __init__(self, handled: bool, step: str, exit_reason: int | None = None, errno: int = 0,
                 detail: str = "") -> None: ...
    @staticmethod
    def _lazy(handled: bool, step: str, exit_reason: int | None, errno: int,
              why: Callable[..., str], args: tuple[Any, ...]) -> ExitResult: ...
    def __bool__(self) -> bool: ...
    def __hash__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...

# -- the VM's counters (pkvm/_ledger.pxi) ---------------------------------------------------------

from collections.abc import ItemsView, Iterable, KeysView, MutableMapping, ValuesView
from typing import NoReturn

@final
class Counters(MutableMapping[str, int]):
    """A VM's counters (``VM._stats``): str keys, int64 values in a C array; new keys register
    at the end; a counter cannot be removed (TypeError)."""

    def __init__(self, keys: Iterable[str] = ()) -> None: ...
    def __getitem__(self, key: str, /) -> int: ...
    def __setitem__(self, key: str, value: int, /) -> None: ...
    def __delitem__(self, key: str, /) -> None: ...
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
    def get(self, key: str, default: Any = None) -> Any: ...
    def keys(self) -> KeysView[str]: ...
    def values(self) -> ValuesView[int]: ...
    def items(self) -> ItemsView[str, int]: ...
    def setdefault(self, key: str, default: Any = None) -> int: ...
    def update(self, other: Any = (), **kwargs: int) -> None: ...  # type: ignore[override]
    def pop(self, key: str, default: Any = ...) -> NoReturn: ...
    def popitem(self) -> NoReturn: ...
    def clear(self) -> NoReturn: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]
    def __reduce__(self) -> tuple[Any, ...]: ...
    def copy(self) -> dict[str, int]: ...

def _counters_from_items(items: Iterable[tuple[str, int]]) -> Counters: ...

_COUNTER_KEYS: tuple[str, ...]

@final
class Ledger:
    """A VM's modeled time (``VM._ledger``): the total (int64, a Python int past it), the
    acting actor's ns per operation, the prices and whether the VM is traced."""

    traced: bool
    @property
    def modeled_ns(self) -> int: ...
    @modeled_ns.setter
    def modeled_ns(self, value: int) -> None: ...
    def __init__(self, vm: Any, prices: dict[str, int], cost: dict[str, int]) -> None: ...
    def set_cost(self, cost: dict[str, int]) -> None: ...
    def charge(self, op: str, n: int) -> None: ...
