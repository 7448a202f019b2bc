"""An opt-in log of what each actor did and when: slices and instants on named tracks.

A :class:`Recorder` holds, per track (one per actor: ``"vcpu0"``, ``"vmm-main"``, ...), the
*slices* (an interval of modelled time with a name and a category, such as a batch of faults
or a lock hold) and the *instants* (a point in time, such as a race) recorded on it. Tracks
appear on first use and keep that order, which is the order the Chrome trace and the Gantt
chart show them in. An engine that is not asked for a timeline simply does not create a
recorder, so recording costs nothing unless it is wanted.

Storage is lean: each slice is one tuple ``(name, start_ns, end_ns, cat, args)`` and each
instant one tuple ``(name, t_ns, cat, args)``, appended to the track's list in O(1).
Slices on one track may nest (a lock wait inside a busy slice); nothing here checks nesting.

Categories are free strings; the ones the Gantt chart colours by name are ``CAT_BUSY``,
``CAT_LOCK_WAIT``, ``CAT_LOCK_HOLD`` and ``CAT_IPI_STALL`` (the locks of
:mod:`pkvm.sim.locks` record their waits and holds with the two lock categories).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any
from numbers import Real

__all__ = ["CAT_BUSY", "CAT_IPI_STALL", "CAT_LOCK_HOLD", "CAT_LOCK_WAIT", "Recorder"]

CAT_BUSY = "busy"
"""An actor doing work (its CPU is busy)."""
CAT_LOCK_WAIT = "lock_wait"
"""An actor waiting to acquire a lock."""
CAT_LOCK_HOLD = "lock_hold"
"""An actor holding a lock."""
CAT_IPI_STALL = "ipi_stall"
"""An actor stalled by an interrupt from another CPU (a TLB-shootdown IPI, for example)."""


class Recorder:
    """Slices and instants per track, in the order they were recorded.

    >>> r = Recorder()
    >>> r.slice("vcpu0", "fault x512", 0, 2_000, CAT_BUSY, {"pages": 512})
    >>> r.slice("vcpu0", "wait mmu_lock", 100, 400, CAT_LOCK_WAIT)
    >>> r.instant("vcpu1", "rmp_npf_loop", 1_500, "race")
    >>> r.tracks
    ('vcpu0', 'vcpu1')
    >>> list(r.iter_slices("vcpu0"))[1]
    ('wait mmu_lock', 100, 400, 'lock_wait', None)
    >>> len(r), r.span()
    (3, (0, 2000))
    """

    __slots__ = ("_tracks",)

    def __init__(self) -> None:
        # track name -> (slices, instants); a dict keeps the insertion order of the tracks.
        self._tracks: dict[str, tuple[list[Any], list[Any]]] = {}

    def _track(self, track: str) -> tuple[list[Any], list[Any]]:
        lists = self._tracks.get(track)
        if lists is None:
            if not isinstance(track, str):
                raise TypeError(f"track must be a str, got {type(track).__name__}: {track!r}")
            lists = self._tracks[track] = ([], [])
        return lists

    def add_track(self, track: str) -> None:
        """Create ``track`` now if it does not exist, to fix its place in the track order.

        Raises:
            TypeError: ``track`` is not a str.
        """
        self._track(track)

    def slice(self, track: str, name: str, start_ns: float, end_ns: float, cat: str,
              args: dict[str, Any] | None = None) -> None:
        """Record that ``track`` spent ``[start_ns, end_ns)`` in ``name`` (category ``cat``).

        ``args`` (a dict of JSON-serializable values) is kept by reference and written to the
        Chrome trace as the slice's arguments. Runtime complexity: O(1).

        Raises:
            TypeError: ``track``, ``name`` or ``cat`` is not a str, a time is not a real
                number, or ``args`` is neither None nor a dict.
            ValueError: a time is NaN or infinite, or ``end_ns < start_ns``. Nothing is
                recorded.
        """
        _check_event(name, cat, args)
        _check_time("start_ns", start_ns)
        _check_time("end_ns", end_ns)
        if end_ns < start_ns:
            raise ValueError(f"slice {name!r} on {track!r} ends before it starts: "
                             f"[{start_ns}, {end_ns})")
        self._track(track)[0].append((name, start_ns, end_ns, cat, args))

    def instant(self, track: str, name: str, t_ns: float, cat: str,
                args: dict[str, Any] | None = None) -> None:
        """Record a point event ``name`` (category ``cat``) at ``t_ns`` on ``track``.

        Runtime complexity: O(1).

        Raises:
            TypeError, ValueError: as for :meth:`slice`. Nothing is recorded.
        """
        _check_event(name, cat, args)
        _check_time("t_ns", t_ns)
        self._track(track)[1].append((name, t_ns, cat, args))

    @property
    def tracks(self) -> tuple[str, ...]:
        """Track names, in the order of their first use."""
        return tuple(self._tracks)

    def iter_slices(self, track: str) -> Iterator[tuple[Any, ...]]:
        """The slices of ``track`` as ``(name, start_ns, end_ns, cat, args)``, in recording
        order (nothing if the track does not exist)."""
        lists = self._tracks.get(track)
        return iter(lists[0]) if lists is not None else iter(())

    def iter_instants(self, track: str) -> Iterator[tuple[Any, ...]]:
        """The instants of ``track`` as ``(name, t_ns, cat, args)``, in recording order."""
        lists = self._tracks.get(track)
        return iter(lists[1]) if lists is not None else iter(())

    def n_slices(self, track: str | None = None) -> int:
        """The number of slices on ``track``, or on all tracks if None."""
        if track is not None:
            lists = self._tracks.get(track)
            return len(lists[0]) if lists is not None else 0
        return sum(len(s) for s, _ in self._tracks.values())

    def n_instants(self, track: str | None = None) -> int:
        """The number of instants on ``track``, or on all tracks if None."""
        if track is not None:
            lists = self._tracks.get(track)
            return len(lists[1]) if lists is not None else 0
        return sum(len(i) for _, i in self._tracks.values())

    def __len__(self) -> int:
        """The number of slices and instants on all tracks."""
        return self.n_slices() + self.n_instants()

    def span(self) -> tuple[float, float]:
        """``(first start, last end)`` over every slice and instant; ``(0, 0)`` if empty.

        Runtime complexity: O(n).
        """
        starts: list[float] = []
        ends: list[float] = []
        for slices, instants in self._tracks.values():
            if slices:
                starts.append(min(s[1] for s in slices))
                ends.append(max(s[2] for s in slices))
            if instants:
                times = [i[1] for i in instants]
                starts.append(min(times))
                ends.append(max(times))
        return (min(starts), max(ends)) if starts else (0, 0)

    def __repr__(self) -> str:
        return (f"Recorder(tracks={len(self._tracks)}, slices={self.n_slices()}, "
                f"instants={self.n_instants()})")


def _check_event(name: object, cat: object, args: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    if not isinstance(cat, str):
        raise TypeError(f"cat must be a str, got {type(cat).__name__}: {cat!r}")
    if args is not None and not isinstance(args, dict):
        raise TypeError(f"args must be a dict or None, got {type(args).__name__}")


def _check_time(what: str, t: object) -> None:
    if isinstance(t, bool) or not isinstance(t, Real):
        raise TypeError(f"{what} must be a real number of ns, got {type(t).__name__}: {t!r}")
    if not math.isfinite(t):
        raise ValueError(f"{what} must be finite, got {t!r}")
