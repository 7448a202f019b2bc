"""Draw a :class:`~pkvm.sim.recorder.Recorder` as a per-track Gantt chart (PNG).

One row per track, in track order, top to bottom. Busy slices fill the row; the other
categories (lock holds, lock waits, IPI stalls, anything else) are drawn as narrower bars on
top, so a lock wait nested in a busy slice stays visible. Instants are markers above the
row. Colours are fixed for the known categories (``busy``, ``lock_wait``, ``lock_hold``,
``ipi_stall``) and taken in order from a qualitative palette for the others; a legend names
them. The time axis is in µs, ms or s, whichever suits the span, and starts at 0 (or at the
first event, if the events start late in the run).

Below one pixel nothing can be told apart: a row of short slices with short gaps between them
draws as one bar. Zoom in on the Chrome trace to see them.

Speed: before drawing, each (track, category)'s slices are merged wherever the gap between
them is under one pixel, and every bar is at least one pixel wide, so a chart of a million
slices draws as many bars as the image has pixels, not a million.

matplotlib is imported inside :func:`plot_gantt`, through its object-oriented API and the Agg
canvas, so importing this module costs nothing and no global pyplot state is touched.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pkvm._files import atomic_output, output_path
from .recorder import CAT_BUSY, CAT_IPI_STALL, CAT_LOCK_HOLD, CAT_LOCK_WAIT, Recorder

__all__ = ["plot_gantt"]

_KNOWN = {  # category -> (legend label, colour, drawn full height?)
    CAT_BUSY: ("busy", "#4c72b0", True),
    CAT_LOCK_HOLD: ("lock hold", "#55a868", False),
    CAT_LOCK_WAIT: ("lock wait", "#dd8452", False),
    CAT_IPI_STALL: ("IPI stall", "#c44e52", False),
}
_PALETTE = ["#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#2f4b7c",
            "#a05195"]
_INSTANT_COLOURS = ["#000000", "#d62728", "#9467bd", "#17becf", "#bcbd22"]
_WIDTH_IN = 12.0
_DPI = 100


def plot_gantt(recorder: Recorder, path: str | os.PathLike[str], *, title: str = "",
               max_tracks: int = 129) -> None:
    """Draw ``recorder`` as a Gantt chart and save it as a PNG at ``path``.

    Only the first ``max_tracks`` tracks are drawn (the title says how many were left out):
    by default the VMM and 128 vCPUs.
    The file appears atomically (``pkvm._files.atomic_output``: a temporary file, then
    ``os.replace``; a device or a pipe is written in place).

    Runtime complexity: O(n log n) for n slices, plus drawing at most a few bars per pixel
    column per row.

    Raises:
        TypeError: ``recorder`` is not a Recorder, ``title`` not a str, ``max_tracks`` not
            an int, or ``path`` not a path.
        ValueError: ``max_tracks`` < 1.
        FileNotFoundError: the directory of ``path`` does not exist.
        OSError: the file cannot be written.
    """
    if not isinstance(recorder, Recorder):
        raise TypeError(f"recorder must be a pkvm.sim.recorder.Recorder, "
                        f"got {type(recorder).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    if isinstance(max_tracks, bool) or not isinstance(max_tracks, int):
        raise TypeError(f"max_tracks must be an int, got {type(max_tracks).__name__}")
    if max_tracks < 1:
        raise ValueError(f"max_tracks must be >= 1, got {max_tracks}")
    path = os.fspath(path)
    directory = os.path.dirname(output_path(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write the chart to {path!r}: "
                                f"directory {directory!r} does not exist")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    all_tracks = recorder.tracks
    tracks = all_tracks[:max_tracks]
    first, t1 = (float(t) for t in recorder.span())
    # The axis starts at time 0 unless the events start late in the run (then at the first).
    t0 = 0.0 if 0 <= first <= 0.1 * (t1 - first) else first
    span = max(t1 - t0, 1.0)
    scale, unit = _time_unit(span)

    n = max(len(tracks), 1)
    height = min(max(2.0 + 0.32 * n, 3.0), 40.0)
    fig = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    bottom_in, top_in = 0.62, 0.42  # room for the time axis below, the title above
    ax = fig.add_axes((0.14, bottom_in / height, 0.70, 1 - (bottom_in + top_in) / height))
    px_ns = span / (_WIDTH_IN * 0.70 * _DPI)  # the width of one pixel in modelled time

    colours: dict[str, str] = {}
    inst_colours: dict[str, str] = {}
    for row, track in enumerate(tracks):
        y = len(tracks) - 1 - row  # first track on top
        by_cat: dict[str, list[Any]] = {}
        for _, start, end, cat, _ in recorder.iter_slices(track):
            by_cat.setdefault(cat, []).append((start, end))
        # Full-height categories first, the nested ones on top of them.
        for cat in sorted(by_cat, key=lambda c: (not _KNOWN.get(c, ("", "", False))[2],)):
            colour = _colour(cat, colours)
            full = _KNOWN.get(cat, ("", "", False))[2]
            h = 0.8 if full else 0.44
            spans = _merge_spans(np.asarray(by_cat[cat], dtype=np.float64), px_ns)
            bars = [((s - t0) / scale, w / scale) for s, w in spans]
            ax.broken_barh(bars, (y - h / 2, h), facecolors=colour, edgecolors="none")
        by_inst: dict[str, list[Any]] = {}
        for _, t, cat, _ in recorder.iter_instants(track):
            by_inst.setdefault(cat, []).append(t)
        for cat, ts in by_inst.items():
            colour = inst_colours.setdefault(
                cat, _INSTANT_COLOURS[len(inst_colours) % len(_INSTANT_COLOURS)])
            xs = (np.asarray(ts, dtype=np.float64) - t0) / scale
            ax.plot(xs, np.full(len(xs), y + 0.22), linestyle="none", marker="v",
                    markersize=7, color=colour, markeredgecolor="white",
                    markeredgewidth=0.6, zorder=5, clip_on=False)

    ax.set_yticks(range(len(tracks)))
    # the labels as large as a row leaves room for (0.32 in a row until the figure's cap)
    row_pt = 72.0 * height * (1 - (bottom_in + top_in) / height) / n
    fontsize = max(4.0, min(9.0, 0.55 * row_pt))
    ax.set_yticklabels(list(reversed(tracks)), fontsize=fontsize)
    ax.set_ylim(-0.7, max(len(tracks), 1) - 0.2)
    ax.set_xlim(0, span / scale * 1.01)
    ax.set_xlabel(f"time ({unit})" if t0 == 0 else f"time since {_fmt_start(t0)} ({unit})")
    ax.grid(axis="x", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)
    if len(all_tracks) > len(tracks):
        title = f"{title}  " if title else ""
        title += f"(first {len(tracks)} of {len(all_tracks)} tracks)"
    if title:
        ax.set_title(title, fontsize=11)
    if not tracks:
        ax.text(0.5, 0.5, "no events recorded", transform=ax.transAxes, ha="center",
                va="center")

    handles: list[Any] = [Patch(facecolor=c, label=_KNOWN.get(cat, (cat,))[0])
                     for cat, c in colours.items()]
    handles += [Line2D([], [], linestyle="none", marker="v", color=c, label=cat)
                for cat, c in inst_colours.items()]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
                  frameon=False)

    with atomic_output(path, ".png.tmp") as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png")


def _colour(cat: str, colours: dict[str, str]) -> str:
    if cat not in colours:
        known = _KNOWN.get(cat)
        unknown = sum(1 for c in colours if c not in _KNOWN)
        colours[cat] = known[1] if known else _PALETTE[unknown % len(_PALETTE)]
    return colours[cat]


def _merge_spans(intervals: np.ndarray, min_gap: float) -> list[tuple[float, float]]:
    """Merge ``[start, end)`` rows of ``intervals`` whose gap is under ``min_gap``.

    Returns ``(start, width)`` pairs, each at least ``min_gap`` wide, sorted by start; they
    cover every input interval. Overlapping and nested intervals merge too.
    """
    if len(intervals) == 0:
        return []
    intervals = intervals[np.argsort(intervals[:, 0], kind="stable")]
    starts, ends = intervals[:, 0], intervals[:, 1]
    reach = np.maximum.accumulate(ends)  # how far the intervals so far extend
    new = np.empty(len(starts), dtype=bool)
    new[0] = True
    new[1:] = starts[1:] >= reach[:-1] + min_gap
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(starts) - 1)
    g_start = starts[first]
    g_end = reach[last]
    widths = np.maximum(g_end - g_start, min_gap)
    return list(zip(g_start.tolist(), widths.tolist()))


def _time_unit(span_ns: float) -> tuple[float, str]:
    """(ns per unit, unit name) for an axis covering ``span_ns``."""
    if span_ns >= 1e9:
        return 1e9, "s"
    if span_ns >= 1e6:
        return 1e6, "ms"
    return 1e3, "µs"


def _fmt_start(t0_ns: float) -> str:
    scale, unit = _time_unit(abs(t0_ns))
    return f"{t0_ns / scale:g} {unit}"
