"""Write a :class:`~pkvm.sim.recorder.Recorder` as Chrome trace-event JSON.

The output follows the JSON Object Format of Google's *Trace Event Format* document (the
format ``chrome://tracing`` and the Perfetto UI open)::

    {"traceEvents": [...], "displayTimeUnit": "ns", "otherData": {...}}

- one process (``pid`` 1), named by a ``process_name`` metadata event;
- one thread per recorder track, ``tid`` 1, 2, ... in track order, each named by a ``"M"``
  ``thread_name`` event and ordered by a ``thread_sort_index`` event; a slice that overlaps
  another of its track without nesting in it (which Perfetto does not accept on one thread)
  goes to an extra thread of that track, named ``"<track> (2)"``, ``"<track> (3)"`` ... with
  the track's sort index, its ``tid`` after every track's own;
- every slice as a complete event (``"ph": "X"``) and every instant as a thread-scoped
  instant event (``"ph": "i"``, ``"s": "t"``), with the recorder's ``cat`` and, when
  given, ``args``;
- ``ts`` and ``dur`` in microseconds, as the format requires: modelled ns / 1000 as floats,
  so nothing below a microsecond is lost.

Within a track, slices are written by start time, and among slices that start together the
longer first, so an enclosing slice always precedes the slices nested in it (a lock wait inside
a busy slice); instants follow the track's slices, by time. Ties keep the recording order.
The output is deterministic: the same recorder and metadata give the same bytes.

Events are encoded and written one at a time, so no string of the whole trace is ever built.
Written to a path, the file appears atomically (``pkvm._files.atomic_output``: a temporary file
beside the link-resolved target, then ``os.replace``): a failure leaves any previous file
untouched and no partial file behind. A device or a pipe is written in place.

Whether Perfetto renders a given file could not be checked where this was written (no
browser); the tests check the JSON structure and each event's required fields instead.
"""

from __future__ import annotations

import io
import json
import os
from typing import IO, Any, cast

from pkvm._files import atomic_output, output_path
from .recorder import Recorder

__all__ = ["write_chrome_trace"]

_PID = 1

# Compact, ASCII-only, key order as built: the same events always encode to the same bytes.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                           check_circular=True).encode


def write_chrome_trace(recorder: Recorder, path_or_file: str | os.PathLike[str] | IO[Any], *,
                       metadata: dict[str, Any] | None = None, process_name: str = "pkvm") -> None:
    """Write ``recorder`` as Chrome trace-event JSON to a path or an open file.

    ``metadata`` becomes the trace's ``otherData`` (``{}`` if None); ``process_name`` names
    the one process all tracks belong to. A file object may be text or binary; it is written
    to and flushed but not closed (and, unlike a path, not written atomically).

    Runtime complexity: O(n log n) for n events (each track's events are sorted).

    Raises:
        TypeError: ``recorder`` is not a Recorder, ``metadata`` not a dict, ``process_name``
            not a str, or an ``args``/``metadata`` value is not JSON-serializable.
        ValueError: an ``args`` or ``metadata`` value is NaN or infinite.
        FileNotFoundError: the directory of the path does not exist.
        OSError: the file cannot be written.
        With a path, nothing is written if any of these is raised.
    """
    if not isinstance(recorder, Recorder):
        raise TypeError(f"recorder must be a pkvm.sim.recorder.Recorder, "
                        f"got {type(recorder).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    if not isinstance(process_name, str):
        raise TypeError(f"process_name must be a str, got {type(process_name).__name__}")
    other = _encode({} if metadata is None else metadata)  # fail early, before any write

    if isinstance(path_or_file, (str, os.PathLike)):
        _write_atomically(recorder, os.fspath(path_or_file), other, process_name)
        return
    if not hasattr(path_or_file, "write"):
        raise TypeError(f"path_or_file must be a path or a file object, "
                        f"got {type(path_or_file).__name__}")
    if isinstance(path_or_file, io.TextIOBase):
        _write(recorder, path_or_file, other, process_name)
        path_or_file.flush()
        return
    # A binary file object: written through a text wrapper, detached afterwards.
    text = io.TextIOWrapper(cast(Any, path_or_file), encoding="utf-8", newline="\n")
    try:
        _write(recorder, text, other, process_name)
        text.flush()
    finally:
        text.detach()


def _write_atomically(recorder: Recorder, path: str, other: str, process_name: str) -> None:
    directory = os.path.dirname(output_path(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write the trace to {path!r}: "
                                f"directory {directory!r} does not exist")
    with atomic_output(path, ".json.tmp") as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        _write(recorder, f, other, process_name)


def _lanes(slices: list[Any]) -> list[int]:
    """The lane of each slice (given sorted by start, the longer first): 0 unless it overlaps
    a slice of lane 0 without nesting in it, then the first lane where it nests or follows.
    Perfetto and chrome://tracing accept only slices that nest on one thread; the timeline's
    tracks can hold one that does not (a lock taken uncontended part way through a work slice
    and held past its end), which Perfetto drops or misplaces."""
    stacks: list[list[Any]] = [[]]
    out = []
    for s in slices:
        start, end = s[1], s[2]
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                break
        else:
            stacks.append([])
            lane = len(stacks) - 1
            stack = stacks[lane]
        stack.append(end)
        out.append(lane)
    return out


def _write(recorder: Recorder, f: IO[str], other: str, process_name: str) -> None:
    write = f.write
    write('{"traceEvents":[\n')
    write(_encode({"name": "process_name", "ph": "M", "pid": _PID, "tid": 0,
                   "args": {"name": process_name}}))
    tracks = recorder.tracks
    # Enclosing slices first: by start, then the longer one; sorted() is stable.
    slices = {t: sorted(recorder.iter_slices(t), key=lambda s: (s[1], -s[2])) for t in tracks}
    lanes = {t: _lanes(slices[t]) for t in tracks}
    threads = [(index + 1, index, track) for index, track in enumerate(tracks)]
    extra: dict[tuple[str, int], int] = {}  # (track, lane > 0) -> tid, after every track's own
    for index, track in enumerate(tracks):
        for lane in range(1, max(lanes[track], default=0) + 1):
            extra[(track, lane)] = len(tracks) + len(extra) + 1
            threads.append((extra[(track, lane)], index, f"{track} ({lane + 1})"))
    for tid, index, name in threads:
        write(",\n")
        write(_encode({"name": "thread_name", "ph": "M", "pid": _PID, "tid": tid,
                       "args": {"name": name}}))
        write(",\n")
        write(_encode({"name": "thread_sort_index", "ph": "M", "pid": _PID, "tid": tid,
                       "args": {"sort_index": index}}))
    for index, track in enumerate(tracks):
        tid = index + 1
        for (name, start, end, cat, args), lane in zip(slices[track], lanes[track]):
            ev = {"name": name, "cat": cat, "ph": "X", "ts": start / 1000,
                  "dur": (end - start) / 1000, "pid": _PID,
                  "tid": extra[(track, lane)] if lane else tid}
            if args is not None:
                ev["args"] = args
            write(",\n")
            write(_encode(ev))
        for name, t, cat, args in sorted(recorder.iter_instants(track), key=lambda i: i[1]):
            ev = {"name": name, "cat": cat, "ph": "i", "s": "t", "ts": t / 1000,
                  "pid": _PID, "tid": tid}
            if args is not None:
                ev["args"] = args
            write(",\n")
            write(_encode(ev))
    write('\n],"displayTimeUnit":"ns","otherData":')
    write(other)
    write("}\n")
