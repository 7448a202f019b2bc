"""Accounting: modeled time charged against a :class:`~pkvm.cost.model.CostModel`, per actor and op.

Split from :mod:`pkvm.cost.model` (which prices operations) along the seam between *what an
operation costs* and *who spent how much*. Invariants: sums are exact integer nanoseconds; a
:class:`LedgerSnapshot` restores the ledger exactly (a failed ioctl leaves no charge behind).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pkvm.cost.model import CostModel, _count
from pkvm.errors import InternalInvariantError

__all__ = ["Ledger", "LedgerSnapshot"]


class LedgerSnapshot:
    """A point a :class:`Ledger` can roll back to; from :meth:`Ledger.snapshot`.

    Open until passed to :meth:`Ledger.restore` or :meth:`Ledger.commit`, exactly once.
    """

    __slots__ = ("_ledger", "_open", "_pos", "_total")

    def __init__(self, ledger: Ledger, pos: int, total: int) -> None:
        self._ledger, self._pos, self._total, self._open = ledger, pos, total, True

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<LedgerSnapshot at {self._total} ns, {state}>"


class Ledger:
    """Modeled time charged per actor and operation, in whole nanoseconds.

    An actor is any string naming who spent the time: by convention ``"vmm"`` (the VMM's
    ioctl thread), ``"vcpu0"``, ``"vcpu1"``, ... and ``"host"`` (host-wide work such as a
    kernel TLB flush). A charge prices ``count`` events with the ledger's :class:`CostModel`
    (rounding as :meth:`CostModel.ns`) and adds them to one ``(actor, op)`` cell: two dict
    updates and an integer add. Sums are exact, so results are deterministic.

    A failed call rolls its charges back exactly with :meth:`snapshot` / :meth:`restore`,
    or with the :meth:`transaction` context manager. While no snapshot is open, a charge
    costs one extra branch; while one is, it also appends to an undo log.

    >>> ledger = Ledger(CostModel.default("snp"))
    >>> ledger.charge("vmm", "attr_store", 512), ledger.charge("vcpu0", "rmpupdate")
    (51200, 500)
    >>> ledger.total_ns, ledger.by_actor()
    (51700, {'vcpu0': 500, 'vmm': 51200})
    """

    __slots__ = ("_counts", "_flat", "_log", "_model", "_ns", "_open", "_total")

    def __init__(self, model: CostModel | None = None) -> None:
        self._model = CostModel.default() if model is None else model
        if not isinstance(self._model, CostModel):
            raise TypeError(f"model must be a CostModel, not {type(self._model).__name__}")
        # Per-event ns of every flat cost, so a charge is one dict lookup away from its price.
        self._flat: dict[str, int] = {op: c.event_ns() for op, c in self._model.items()
                                      if not c.is_formula}
        self._ns: dict[tuple[str, str], int] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._total = 0
        self._log: list[tuple[tuple[str, str], int, int, bool]] | None = None
        self._open: list[LedgerSnapshot] = []

    def __repr__(self) -> str:
        return f"<Ledger {self._total} ns in {len(self._ns)} cells, model {self._model.fingerprint()}>"

    @property
    def model(self) -> CostModel:
        """The cost model charges are priced with."""
        return self._model

    @property
    def total_ns(self) -> int:
        """All modeled time charged so far, in ns."""
        return self._total

    def charge(self, actor: str, op: str, count: int = 1, *, nr_vcpus: int | None = None,
               nr_cpus: int | None = None) -> int:
        """Charge ``count`` events of ``op`` to ``actor``; returns the ns charged.

        ``nr_vcpus`` / ``nr_cpus`` as in :meth:`CostModel.ns`. A count of 0 charges nothing
        and records nothing (but ``op`` is still checked).

        Raises:
            UnknownOperationError: ``op`` is not in the model.
            TypeError / ValueError: a bad count, or a formula cost without its count.
        """
        unit = self._flat.get(op)
        if unit is None:
            unit = self._model._event_ns(op, nr_vcpus, nr_cpus)
        if count.__class__ is not int or count <= 0:
            count = _count(count, "count")
            if count == 0:
                return 0
        ns = unit * count
        key = (actor, op)
        old = self._ns.get(key)
        if old is None:
            self._ns[key] = ns
            self._counts[key] = count
        else:
            self._ns[key] = old + ns
            self._counts[key] += count
        self._total += ns
        if self._log is not None:
            self._log.append((key, ns, count, old is None))
        return ns

    # -- views (sorted, so output does not depend on charge order) --------------------------

    def by_actor(self) -> dict[str, int]:
        """``{actor: ns}``, sorted by actor."""
        out: dict[str, int] = {}
        for (actor, _), ns in sorted(self._ns.items()):
            out[actor] = out.get(actor, 0) + ns
        return out

    def by_op(self) -> dict[str, int]:
        """``{operation: ns}``, sorted by operation."""
        out: dict[str, int] = {}
        for (_, op), ns in self._ns.items():
            out[op] = out.get(op, 0) + ns
        return dict(sorted(out.items()))

    def by_actor_op(self) -> dict[str, dict[str, int]]:
        """``{actor: {operation: ns}}``, both levels sorted."""
        out: dict[str, dict[str, int]] = {}
        for (actor, op), ns in sorted(self._ns.items()):
            out.setdefault(actor, {})[op] = ns
        return out

    def counts(self) -> dict[str, int]:
        """``{operation: events charged}``, sorted by operation (compare with ``vm.stats``)."""
        out: dict[str, int] = {}
        for (_, op), n in self._counts.items():
            out[op] = out.get(op, 0) + n
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able totals: ``cost_model`` (fingerprint), ``total_ns``, ``by_actor``,
        ``by_op``, ``counts`` and ``by_actor_op`` (``{actor: {op: {"ns", "count"}}}``)."""
        cells: dict[str, dict[str, dict[str, int]]] = {}
        for (actor, op), ns in sorted(self._ns.items()):
            cells.setdefault(actor, {})[op] = {"ns": ns, "count": self._counts[(actor, op)]}
        return {"cost_model": self._model.fingerprint(), "total_ns": self._total,
                "by_actor": self.by_actor(), "by_op": self.by_op(), "counts": self.counts(),
                "by_actor_op": cells}

    # -- rollback --------------------------------------------------------------------------

    def snapshot(self) -> LedgerSnapshot:
        """Mark the current state; end it with :meth:`restore` or :meth:`commit`.

        Snapshots nest. O(1); until the outermost one ends, each charge is also logged.
        """
        if self._log is None:
            self._log = []
        snap = LedgerSnapshot(self, len(self._log), self._total)
        self._open.append(snap)
        return snap

    def restore(self, snap: LedgerSnapshot) -> None:
        """Undo every charge made since ``snap`` and end it (and any snapshot opened after it).

        Afterwards every view equals what it was when ``snap`` was taken. O(charges undone).

        Raises:
            ValueError: ``snap`` is not an open snapshot of this ledger.
        """
        i = self._index(snap)
        log = self._log
        assert log is not None
        while len(log) > snap._pos:
            key, ns, count, created = log.pop()
            if created:
                del self._ns[key], self._counts[key]
            else:
                self._ns[key] -= ns
                self._counts[key] -= count
            self._total -= ns
        if self._total != snap._total:
            raise InternalInvariantError(f"ledger restored to {self._total} ns, not {snap._total}")
        self._close(i)

    def commit(self, snap: LedgerSnapshot) -> None:
        """Keep the charges made since ``snap`` and end it; it must be the innermost open one.

        Raises:
            ValueError: ``snap`` is not the innermost open snapshot of this ledger.
        """
        i = self._index(snap)
        if i != len(self._open) - 1:
            raise ValueError("commit the innermost open snapshot first")
        self._close(i)

    @contextmanager
    def transaction(self) -> Iterator[LedgerSnapshot]:
        """Context manager: commit on success, restore (and re-raise) on any exception.

        >>> ledger = Ledger()
        >>> try:
        ...     with ledger.transaction():
        ...         _ = ledger.charge("vmm", "attr_store", 4)
        ...         raise OSError("ioctl failed")
        ... except OSError:
        ...     pass
        >>> ledger.total_ns
        0
        """
        snap = self.snapshot()
        try:
            yield snap
        except BaseException:
            if snap._open:
                self.restore(snap)
            raise
        if snap._open:
            self.commit(snap)

    def _index(self, snap: LedgerSnapshot) -> int:
        if not isinstance(snap, LedgerSnapshot) or snap._ledger is not self or not snap._open:
            raise ValueError(f"{snap!r} is not an open snapshot of this ledger")
        return self._open.index(snap)

    def _close(self, i: int) -> None:
        for s in self._open[i:]:
            s._open = False
        del self._open[i:]
        if not self._open:
            self._log = None
