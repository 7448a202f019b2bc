"""Batched calls: many ``KVM_SET_MEMORY_ATTRIBUTES`` ioctls or nested page faults from numpy
arrays, with the semantics of the same calls made one by one in a loop (docs/embedding.md,
"Batched calls").

:meth:`pkvm.VM.set_memory_attributes_many` and :meth:`pkvm.Vcpu.page_fault_many` are the public
entry points; this module validates their arrays once, then hands them to the typed loops of
the core (``pkvm/_batch.pxi``; the faults' is ``FaultPath.calls``, ``pkvm/_fault.pxi``), which
call the model's per-call entry points without checking the arguments again. Under a timeline
(:mod:`pkvm.sim`) or with a tracer attached, the batch is the loop itself: the public call once
per element.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt

from pkvm._core import _attr_calls
from pkvm.errors import InternalInvariantError, KvmError
from pkvm.kvm.mmu import FaultResult

if TYPE_CHECKING:
    from pkvm.kvm.vm import VM, Vcpu

U64_MAX = (1 << 64) - 1
_MAX_GPA = 1 << 52  # page_fault's bound: a 52-bit guest physical address space

#: The ``ret`` values of :class:`pkvm.FaultResult`, in the order of :attr:`FaultBatch.ret`'s codes.
RET_NAMES = ("fixed", "spurious", "retry", "emulate", "exit", "vc", "rmp_loop", "retry_loop")
_RET_CODE = {name: i for i, name in enumerate(RET_NAMES)}


# -- array validation (the batch's boundary) ------------------------------------------------------

def _u64_array(name: str, value: object, n: int | None) -> npt.NDArray[np.uint64]:
    """``value`` as a contiguous uint64 array of ``n`` elements (any length if None)."""
    if isinstance(value, (list, tuple)):
        # Element by element: numpy would turn [0, 2**64 - 1] into float64.
        seq = list(value)
        for i, x in enumerate(seq):
            if type(x) is not int:
                if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
                    raise TypeError(f"{name}[{i}] must be an int, not {type(x).__name__}")
                x = seq[i] = int(x)
            if x < 0:
                raise ValueError(f"{name}[{i}] = {x} is negative (values must fit a u64)")
            if x > U64_MAX:
                raise ValueError(f"{name}[{i}] = {x:#x} does not fit a u64")
        value = np.array(seq, dtype=np.uint64)
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, not {arr.ndim}-D (shape {arr.shape})")
    if arr.dtype.kind not in "ui":
        raise TypeError(f"{name} must be an array of integers, not of dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} elements, gpas has {n}: the lengths must be equal")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        i = int(np.flatnonzero(arr < 0)[0])  # the first one, where the loop would stop
        raise ValueError(f"{name}[{i}] = {int(arr[i])} is negative (values must fit a u64)")
    return np.ascontiguousarray(arr, dtype=np.uint64)


def _u64_scalar(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int or a 1-D integer array, not {type(value).__name__}")
    v = int(value)
    if v < 0 or v > U64_MAX:
        raise ValueError(f"{name}={v:#x} does not fit a u64")
    return v


def _flag_array(name: str, value: object, n: int) -> npt.NDArray[np.uint8]:
    """A bool or a 1-D bool array of ``n`` elements, as uint8 (length 1 for a bool)."""
    if isinstance(value, (bool, np.bool_)):
        return np.array([bool(value)], dtype=np.uint8)
    if not isinstance(value, (np.ndarray, list, tuple)):
        raise TypeError(f"{name} must be a bool or a 1-D bool array, not {type(value).__name__}")
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a bool or a 1-D bool array, not {arr.ndim}-D (shape {arr.shape})")
    if arr.dtype != np.bool_ and not (arr.size == 0 and not isinstance(value, np.ndarray)):
        raise TypeError(f"{name} must be a bool or an array of dtype bool, not of dtype {arr.dtype}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} elements, gpas has {n}: the lengths must be equal")
    return np.ascontiguousarray(arr, dtype=np.uint8)


# -- KVM_SET_MEMORY_ATTRIBUTES, many times -----------------------------------------------------------

def set_memory_attributes_many(vm: VM, gpas: object, sizes: object, attributes: object,
                               flags: object = 0) -> npt.NDArray[np.int32]:
    """The body of :meth:`pkvm.VM.set_memory_attributes_many` (see there)."""
    g = _u64_array("gpas", gpas, None)
    n = g.shape[0]
    if isinstance(sizes, (np.ndarray, list, tuple)):
        s = _u64_array("sizes", sizes, n)
    else:
        s = np.full(n, _u64_scalar("sizes", sizes), dtype=np.uint64)
    if isinstance(attributes, (np.ndarray, list, tuple)):
        a = _u64_array("attributes", attributes, n)
    else:
        a = np.array([_u64_scalar("attributes", attributes)], dtype=np.uint64)
    f = _u64_scalar("flags", flags)
    out = np.zeros(n, dtype=np.int32)
    if vm._sched is not None or vm._tracer is not None:
        call = vm.set_memory_attributes
        al = a.tolist() * n if a.shape[0] == 1 and n != 1 else a.tolist()
        for i, (x, y, z) in enumerate(zip(g.tolist(), s.tolist(), al)):
            try:
                call(x, y, z, f)
            except KvmError as e:
                out[i] = e.errno
        return out
    _attr_calls(g, s, a, f, vm._supported_attrs, vm, vm._attr_path, KvmError, out)  # VM._set_attrs_checked's body
    return out


# -- nested page faults, many times ---------------------------------------------------------------

def _empty_rows(n: int) -> dict[str, npt.NDArray[Any]]:
    """The row arrays of ``n`` fault results (:class:`FaultBatch`'s fields), at their defaults."""
    return {"ret": np.empty(n, dtype=np.int8), "level": np.zeros(n, dtype=np.int8),
            "pfn": np.full(n, -1, dtype=np.int64), "errno": np.zeros(n, dtype=np.int32),
            "retries": np.zeros(n, dtype=np.int32)}


def _fill_row(arrays: dict[str, npt.NDArray[Any]], i: int, r: FaultResult) -> None:
    code = _RET_CODE.get(r.ret)
    if code is None:
        raise InternalInvariantError(f"fault result {r!r} has a ret outside FaultBatch.RET_NAMES")
    arrays["ret"][i] = code
    if r.level is not None:
        arrays["level"][i] = r.level
    if r.pfn is not None:
        arrays["pfn"][i] = r.pfn
    if r.errno is not None:
        arrays["errno"][i] = r.errno
    arrays["retries"][i] = r.retries


class FaultBatch(Sequence[FaultResult]):
    """The results of :meth:`pkvm.Vcpu.page_fault_many`: ``batch[i]`` is the
    :class:`pkvm.FaultResult` call ``i`` returned (equal to what ``vcpu.page_fault`` returns in
    a loop), ``len(batch)`` the number of calls; a slice is a ``FaultBatch`` too.

    The fields as numpy arrays, one element per call (built on first use):

    - ``ret``: int8 codes, ``RET_NAMES[code]`` is the ``ret`` string (``"fixed"``, ...);
    - ``level``: int8, the leaf's level (1 = 4K, 2 = 2M, 3 = 1G), 0 where ``level`` is None;
    - ``pfn``: int64, -1 where ``pfn`` is None;
    - ``errno``: int32, 0 where ``errno`` is None;
    - ``retries``: int32.
    """

    __slots__ = ("_results", "_arrays", "_extras", "_n")

    #: The ``ret`` strings, indexed by the codes of :attr:`ret`.
    RET_NAMES = RET_NAMES

    def __init__(self, results: Sequence[FaultResult]) -> None:
        self._results: tuple[FaultResult, ...] | None = tuple(results)
        self._arrays: dict[str, npt.NDArray[Any]] | None = None
        self._extras: dict[int, FaultResult] = {}
        self._n = len(self._results)

    @classmethod
    def _of_arrays(cls, arrays: dict[str, npt.NDArray[Any]], extras: dict[int, FaultResult],
                   n: int) -> FaultBatch:
        """The batch of ``n`` calls the typed loop stored as rows (``FaultPath.calls``): the
        results are built from them on demand, ``extras`` holds the ones rows cannot give."""
        b = cls.__new__(cls)
        b._results = None
        b._extras = extras
        b._n = n
        if extras:
            for i, r in extras.items():
                _fill_row(arrays, i, r)
        b._arrays = {k: v[:n] for k, v in arrays.items()}
        return b

    def __len__(self) -> int:
        return self._n

    def _at(self, i: int) -> FaultResult:
        r = self._extras.get(i)
        if r is not None:
            return r
        a = self._arrays
        assert a is not None
        lv, pfn, err = int(a["level"][i]), int(a["pfn"][i]), int(a["errno"][i])
        return FaultResult(RET_NAMES[a["ret"][i]], lv or None, None if pfn < 0 else pfn, None, None,
                           err or None, int(a["retries"][i]))

    @overload
    def __getitem__(self, i: int) -> FaultResult: ...
    @overload
    def __getitem__(self, i: slice) -> FaultBatch: ...
    def __getitem__(self, i: int | slice) -> FaultResult | FaultBatch:
        if isinstance(i, slice):
            return FaultBatch([self[j] for j in range(*i.indices(self._n))])
        if self._results is not None:
            return self._results[i]
        j = operator.index(i)
        if j < 0:
            j += self._n
        if not 0 <= j < self._n:
            raise IndexError("FaultBatch index out of range")
        return self._at(j)

    def __iter__(self) -> Iterator[FaultResult]:
        if self._results is not None:
            return iter(self._results)
        return (self._at(j) for j in range(self._n))

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for r in self:
            counts[r.ret] = counts.get(r.ret, 0) + 1
        inner = ", ".join(f"{k}={v}" for k, v in counts.items())
        return f"<pkvm.FaultBatch of {len(self)} faults: {inner or 'none'}>"

    def _array(self, name: str) -> npt.NDArray[Any]:
        arrays = self._arrays
        if arrays is None:
            rs = self._results
            assert rs is not None
            arrays = _empty_rows(len(rs))
            for i, r in enumerate(rs):
                _fill_row(arrays, i, r)
            self._arrays = arrays
        return arrays[name]

    @property
    def ret(self) -> npt.NDArray[np.int8]:
        """Each call's ``ret`` as a code into :attr:`RET_NAMES`."""
        return self._array("ret")

    @property
    def level(self) -> npt.NDArray[np.int8]:
        """Each call's leaf level (0: None)."""
        return self._array("level")

    @property
    def pfn(self) -> npt.NDArray[np.int64]:
        """Each call's pfn (-1: None)."""
        return self._array("pfn")

    @property
    def errno(self) -> npt.NDArray[np.int32]:
        """Each call's errno (0: None)."""
        return self._array("errno")

    @property
    def retries(self) -> npt.NDArray[np.int32]:
        """Each call's ``retries``."""
        return self._array("retries")


class FaultBatchError(KvmError):
    """:meth:`pkvm.Vcpu.page_fault_many` stopped where the loop would have raised: call
    ``index`` raised this ``KvmError`` (same ``errno`` and message as the loop's), after the
    calls before it ran; ``batch`` is their :class:`FaultBatch` (``len(batch) == index``)."""

    def __init__(self, err: KvmError, batch: FaultBatch) -> None:
        super().__init__(err.errno, err.strerror or "")
        self.batch = batch
        self.index = len(batch)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its parts (a dask worker's exception travels pickled).
        return (_fault_batch_error, (self.errno, self.strerror or "", tuple(self.batch)))


def _fault_batch_error(err: int, message: str, results: tuple[FaultResult, ...]) -> FaultBatchError:
    return FaultBatchError(KvmError(err, message), FaultBatch(results))


def page_fault_many(vcpu: Vcpu, gpas: object, private: object, write: object,
                    base_check: object) -> FaultBatch:
    """The body of :meth:`pkvm.Vcpu.page_fault_many` (see there). ``base_check`` is
    ``Vcpu._fault_entry_check``: a vCPU class that keeps it has the dead-VM check only, which
    the typed loop makes itself."""
    g = _u64_array("gpas", gpas, None)
    n = g.shape[0]
    if n and int(g.max()) >= _MAX_GPA:
        i = int(np.flatnonzero(g >= _MAX_GPA)[0])
        raise ValueError(f"gpas[{i}] = {int(g[i]):#x} is outside the 52-bit guest physical address space")
    p = _flag_array("private", private, n)
    w = _flag_array("write", write, n)
    vm = vcpu.vm
    if vm._in_callback:  # EDEADLK before any call runs, an empty batch too (as the ioctls' batch)
        try:
            vm._nested_call()
        except KvmError as e:
            raise FaultBatchError(e, FaultBatch([])) from e
    if vm._sched is not None or vm._tracer is not None or not _fast_faults(type(vcpu)):
        out: list[FaultResult] = []
        try:
            call = vcpu.page_fault
            pl = [bool(x) for x in p.tolist()]
            wl = [bool(x) for x in w.tolist()]
            for i, x in enumerate(g.tolist()):
                out.append(call(x, private=pl[i if len(pl) > 1 else 0], write=wl[i if len(wl) > 1 else 0]))
        except KvmError as e:
            raise FaultBatchError(e, FaultBatch(out)) from e
        return FaultBatch(out)
    check = None if type(vcpu)._fault_entry_check is base_check else vcpu._fault_entry_check
    rows = _empty_rows(n)
    extras: dict[int, FaultResult] = {}
    done = np.zeros(1, dtype=np.int64)
    try:
        vm._fault_path.calls(vcpu, g, p, w, check, _RET_CODE, rows["ret"], rows["level"], rows["pfn"],
                             rows["errno"], rows["retries"], extras, done)
    except KvmError as e:
        raise FaultBatchError(e, FaultBatch._of_arrays(rows, extras, int(done[0]))) from e
    return FaultBatch._of_arrays(rows, extras, n)


def _fast_faults(cls: type) -> bool:
    """Whether the class that defines ``cls``'s ``page_fault`` also says which checks it makes
    before the fault (``_fault_entry_check``): then the typed loop can skip ``page_fault``.
    Otherwise the batch calls ``page_fault`` itself."""
    for k in cls.__mro__:
        if "page_fault" in k.__dict__:
            return "_fault_entry_check" in k.__dict__
    return False

