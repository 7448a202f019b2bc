"""Tidy results: one ``pandas.DataFrame`` row per (configuration, policy, sample), and writing
it to ``.parquet`` (pyarrow) or ``.csv`` without ever leaving a half-written file.

Columns of :func:`results_frame`: the configuration (``platform``, ``memory`` in bytes,
``memory_text``, ``workload``, ``options`` as ``k=v,...`` text, ``policy``, ``vcpus``,
``shared_backing``, ``discard``, ``image``, ``cost_file``, ``costs`` as text, ``batch_pages``
(the size the run used) and ``batch_pages_auto`` (whether pkvm chose it), and any field
:class:`pkvm.experiments.Config` gains later), ``seed``, ``cost_fingerprint``, ``pkvm_version``,
then every metric of :meth:`pkvm.experiments.Result.metrics` under its dotted name
(``modeled_ns``, ``counters.rmpupdate``, ``by_actor.vcpu0`` ...). A metric a run lacks (an
actor that did nothing) is 0 there, since nothing was measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pkvm._files import atomic_output, output_path
from pkvm._units import format_size, time_unit

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from pkvm.experiments import Config, Result

__all__ = ["FRAME_FORMATS", "config_columns", "results_frame", "write_frame"]

#: File extensions :func:`write_frame` writes.
FRAME_FORMATS = (".parquet", ".csv")


#: Config fields that say what a run writes, not what it runs: no column of the tidy table.
_OUTPUT_FIELDS = ("trace", "timeline", "gantt", "trace_events")


def _text(value: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in value.items())


def config_columns(config: Config) -> dict[str, Any]:
    """The configuration of one run as flat columns (mappings as ``k=v,...`` text; the
    outputs are left out: ``trace``, ``timeline`` and ``gantt`` name files and
    ``trace_events`` what the trace file holds, not what ran)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in _OUTPUT_FIELDS:
            continue
        v = config.batch_pages_used if f.name == "batch_pages" else getattr(config, f.name)
        if isinstance(v, Mapping):
            v = _text(v)
        out[f.name] = v
        if f.name == "memory":
            out["memory_text"] = format_size(int(v))
        elif f.name == "batch_pages":  # the size used; whether pkvm chose it (as in the JSON's config)
            out["batch_pages_auto"] = config.batch_pages is None
    return out


def results_frame(results: Sequence[Result], *, template: Config | None = None) -> pd.DataFrame:
    """One row per result (see the module docstring for the columns). With no results, the
    columns every table has (those of ``template``'s configuration, ``seed``,
    ``cost_fingerprint``, ``pkvm_version``) and no rows."""
    import pandas as pd

    rows = []
    for r in results:
        row = config_columns(r.config)
        row.update(seed=r.seed, cost_fingerprint=r.cost_fingerprint, pkvm_version=r.version)
        row.update(r.metrics())
        rows.append(row)
    if not rows:  # no results: the columns every table has, with no rows (no metrics known)
        columns = [*(config_columns(template) if template is not None else ()), "seed", "cost_fingerprint",
                   "pkvm_version"]
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    frame = pd.DataFrame(rows)
    metric_cols = [c for c in frame.columns if "." in c or c.endswith(("_ns", "_s"))]
    # A metric some run lacks is NaN there, which made the column float64 (ns and counts as
    # floats); it is 0, and a column of ints stays int64.
    ints = [c for c in metric_cols if frame[c].isna().any()
            and all(type(row[c]) is int for row in rows if c in row)]
    frame[metric_cols] = frame[metric_cols].fillna(0)
    if ints:
        frame[ints] = frame[ints].astype("int64")
    return frame


def check_frame_path(path: str) -> None:
    """Refuse, before anything runs, a path :func:`write_frame` could not write.

    Raises:
        ValueError: the extension is not one of :data:`FRAME_FORMATS`, the directory does not
            exist, or the path is a directory.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in FRAME_FORMATS:
        raise ValueError(f"--out {path}: write .parquet or .csv, not {ext or 'a file without an extension'}")
    parent = os.path.dirname(output_path(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"--out {path}: it is a directory")


def write_frame(frame: pd.DataFrame, path: str) -> None:
    """Write ``frame`` to ``path`` (``.parquet`` with pyarrow, or ``.csv``) atomically
    (:func:`pkvm._files.atomic_output`): into a temporary file beside the file ``path`` names
    once its symbolic links are resolved, renamed over it only once it is complete, so a
    failure leaves any previous file as it was and no partial one; a device or a pipe is
    written in place.

    Raises:
        ValueError: as :func:`check_frame_path`.
        OSError: the file cannot be written.
    """
    check_frame_path(path)
    ext = os.path.splitext(path)[1].lower()
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        if ext == ".parquet":
            frame.to_parquet(f, engine="pyarrow", index=False)
        else:
            f.write(frame.to_csv(index=False).encode("utf-8"))


def is_time_metric(metric: str) -> bool:
    """Whether ``metric`` is in ns (``modeled_ns``, ``critical_path_ns``, the breakdowns of
    ``modeled_ns``, the latency percentiles ...), which tables and plots show in s, ms or µs."""
    return metric.endswith("_ns") or metric.startswith(("by_actor.", "by_op.", "by_actor_op.")) \
        or (metric.startswith("latency_ns.") and not metric.endswith(".count"))


def plot_grid(frame: pd.DataFrame, keys: Sequence[str], metric: str, path: str) -> None:
    """Small multiples of a grid sweep: ``metric`` against the first grid key with several
    values (x axis; log scale for memory), one line per policy, one panel per combination of
    the other keys. A policy has the same colour and marker in every panel, and one legend
    beside the panels names every policy; a time in ns is shown in s, ms or µs; a key of
    true/false values is categorical. Uses matplotlib's object API on the Agg canvas, as
    :func:`pkvm.experiments.report.plot` does: pyplot's state and the backend are untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    varying = [k for k in keys if frame[k].nunique() > 1] or list(keys[:1])
    xkey, facets = varying[0], varying[1:]
    combos = list(itertools.product(*(list(dict.fromkeys(frame[k])) for k in facets))) or [()]
    ncols = min(4, len(combos))
    nrows = (len(combos) + ncols - 1) // ncols
    fig = Figure(figsize=(3.6 * ncols + 2.3, 2.9 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    xs = list(dict.fromkeys(frame[xkey]))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    markers = "os^Dv<>P"
    colours = [f"C{i}" for i in range(10)]
    policies = list(dict.fromkeys(frame["policy"]))
    style = {p: (colours[i % len(colours)], markers[i % len(markers)]) for i, p in enumerate(policies)}
    values = frame[metric].to_numpy(dtype=float)
    finite = values[values == values]
    unit, scale = time_unit(float(abs(finite).max()) if finite.size else 0.0) if is_time_metric(metric) \
        else ("", 1.0)
    for ax, combo in zip(axes.flat, combos):
        sub = frame
        for k, v in zip(facets, combo):
            sub = sub[sub[k] == v]
        for pol, rows in sub.groupby("policy", sort=False):
            rows = rows.set_index(xkey).reindex(xs)
            xvals = xs if numeric else list(range(len(xs)))
            colour, marker = style[pol]
            ax.plot(xvals, rows[metric].to_numpy(dtype=float) / scale, marker=marker, color=colour, label=pol)
        if numeric:
            if xkey == "memory":
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [format_size(int(x)) for x in xs])
            elif len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
            else:
                ax.set_xticks(xs, [str(x) for x in xs])
        else:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_title(", ".join(f"{k}={format_size(int(v)) if k == 'memory' else v}"
                               for k, v in zip(facets, combo)) or metric, fontsize=9)
        ax.set_xlabel(xkey)
        ax.grid(alpha=0.3)
        if sub[metric].min() > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(combos):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(f"{metric.replace('_ns', '')} ({unit})" if unit else metric)
    handles = [Line2D([], [], color=c, marker=m, label=p) for p, (c, m) in style.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, title="policy", title_fontsize=7,
               frameon=False)
    fig.savefig(path, dpi=120)
