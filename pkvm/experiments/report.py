"""Reporting: experiment results as tables (rich or plain text), JSON and plots.

Pure functions over :class:`pkvm.experiments.Result` lists; nothing here prints, runs a
simulation or keeps state. :mod:`pkvm.cli` prints what these functions build.

- :func:`table` builds a ``rich`` table, one row per result (or one column per result, the
  transposed ``layout="columns"``), with the columns of :meth:`Result.row` that are present
  in at least one result: SNP, TDX and SW_PROTECTED rows differ. A value a result does not
  have prints as ``—``. Counts are right-aligned with thousands separators, times in human
  units (:func:`pkvm._units.format_ns`).
- :func:`phase_table` and :func:`op_table` break one result down by phase and by operation.
- :func:`render_text` and :func:`text_table` render without colour, at the natural width,
  trailing blanks stripped: the same text on every terminal and through a pipe.
- :func:`to_json` is the machine-readable report; :func:`plot` draws a PNG with matplotlib.

>>> from pkvm import experiments
>>> rs = experiments.compare(experiments.Config(memory="64M"), ["fault-time", "eager-post"])
>>> text = text_table(rs)
>>> "RMPUPDATEs" in text and "eager-post" in text
True
>>> [r["row"]["policy"] for r in to_json(rs)["results"]]
['fault-time', 'eager-post']
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pkvm._units import format_ns, format_size, time_unit
from pkvm.experiments import version as _version

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console, RenderableType
    from rich.table import Table

    from pkvm.experiments import Result

__all__ = ["table", "tables", "sweep_tables", "width", "text_table", "phase_table", "op_table", "render_text",
           "to_json", "plot"]

Layout = Literal["auto", "rows", "columns"]

#: Past this many vCPU actors a table shows the vCPUs' sum and maximum instead of one
#: column each: sixteen ``modeled vcpuN`` columns would bury the rest of the table.
MAX_VCPU_COLUMNS = 4
#: The same for the breakdowns of one run (:func:`phase_table`, :func:`op_table`), whose
#: columns are narrower: past this many vCPUs, the vCPUs' sum and the busiest one's figure.
MAX_VCPU_BREAKDOWN = 8
#: Operations :func:`plot` stacks by name; the rest of ``by_op`` is one "other" segment.
PLOT_TOP_OPS = 8
#: Width :func:`render_text` lays out at: wide enough that no table ever wraps.
_TEXT_WIDTH = 1000
_MISSING = "—"
_VCPU = re.compile(r"^vcpu(\d+)$")


# ---- cell formatting -------------------------------------------------------------------------


def _count(v: Any) -> str:
    return f"{v:,}"


def _percent(fraction: Any) -> str:
    """A fraction as a percentage with significant digits kept for tiny values:
    0 -> ``"0%"``, 1.5e-05 -> ``"0.0015%"``, 0.25 -> ``"25.0%"``."""
    pct = float(fraction) * 100.0
    if pct == 0.0:
        return "0%"
    if abs(pct) < 0.1:
        return f"{pct:.2g}%"
    return f"{pct:.1f}%"


def _seconds(s: Any) -> str:
    return format_ns(float(s) * 1e9)


def _rate(per_s: Any) -> str:
    """Events per second with an SI prefix: ``"86.6 M"``."""
    v = float(per_s)
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}"
    return f"{v:.3g}"


def _number(v: Any) -> str:
    """A value of a column pkvm does not know yet: counts get separators, floats 4 digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return _count(v) if isinstance(v, int) else f"{v:.4g}"


# (row key, header, formatter), in :meth:`Result.row` order. Headers break onto two lines
# where that keeps the 20-odd columns of an SNP table narrow.
_COUNTERS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("critical_path_ns", "critical\npath", format_ns),
    ("vcpu_stall_ns", "vCPU\nstall", format_ns),
    ("fault_p99_ns", "fault\np99", format_ns),
    ("conversions", "conversions", _count),
    ("gfns_converted", "GFNs\nconverted", _count),
    ("faults", "faults", _count),
    ("memory_fault_exits", "memory-fault\nexits", _count),
    ("rmpupdates", "RMPUPDATEs", _count),
    ("seamcalls", "SEAMCALLs", _count),
    ("psmashes", "PSMASHes", _count),
    ("rmp_faults", "RMP\nfaults", _count),
    ("zaps", "zaps", _count),
    ("tlb_flushes", "TLB\nflushes", _count),
    ("mmu_lock_ns", "mmu_lock\nheld", format_ns),
    ("directmap_tlb_flushes", "direct-map\nTLB flushes", _count),
    ("directmap_splits", "direct-map\nsplits", _count),
    ("directmap_fragmented", "direct-map\nfragmented", _percent),
    ("sleep_in_atomic", "sleep in\natomic", _count),
)
_KNOWN = {"policy", "modeled_ns", "wall_s", "gfns_per_s"} | {k for k, _, _ in _COUNTERS}


class _Col:
    """One metric of the results table: header, and how to get its text from a result."""

    __slots__ = ("key", "header", "cell", "section_end")

    def __init__(self, key: str, header: str, cell: Callable[[Result, dict[str, Any]], str]) -> None:
        self.key = key
        self.header = header
        self.cell = cell
        self.section_end = False


def _field(key: str, fmt: Callable[[Any], str]) -> Callable[[Result, dict[str, Any]], str]:
    def cell(_r: Result, row: dict[str, Any]) -> str:
        return fmt(row[key]) if key in row else _MISSING
    return cell


def _actor_order(actor: str) -> tuple[int, int, str]:
    """``vmm`` first, then ``vcpu0``, ``vcpu1``, ... numerically, then anything else."""
    if actor == "vmm":
        return (0, 0, actor)
    m = _VCPU.match(actor)
    return (1, int(m.group(1)), actor) if m else (2, 0, actor)


def _vcpus(results: Iterable[Result]) -> set[str]:
    """Every vCPU of the runs' VMs (``vcpu0`` .. ``vcpuN-1``), those that did no work included:
    ``by_actor`` has only the actors charged, and a small guest leaves some vCPUs idle (16 MiB
    with 16 vCPUs: 7 of them work)."""
    return {f"vcpu{i}" for r in results for i in range(int(r.config.vcpus))}


def _actors(results: Sequence[Result]) -> list[str]:
    seen = {a for r in results for a in r.by_actor} | _vcpus(results)
    return sorted(seen, key=_actor_order)


def _actor_cell(actor: str) -> Callable[[Result, dict[str, Any]], str]:
    """One actor's CPU time: 0 for a vCPU of the run's VM that did no work."""
    def cell(r: Result, row: dict[str, Any]) -> str:
        key = f"modeled_ns_{actor}"
        if key in row:
            return format_ns(row[key])
        return format_ns(0) if actor in _vcpus([r]) else _MISSING
    return cell


def _columns(results: Sequence[Result], rows: list[dict[str, Any]]) -> list[_Col]:
    """The metric columns (everything but the row label), for the keys the rows have."""
    present = {k for row in rows for k in row}
    cols = [_Col(k, h, _field(k, f)) for k, h, f in _COUNTERS if k in present]
    if len(cols) >= 3 and cols[2].key == "fault_p99_ns":
        cols[2].section_end = True  # the timeline's figures lead, then the work counters
    # A counter Result.row() gains later still shows, before the modeled times.
    extra = [k for row in rows for k in row if k not in _KNOWN and not k.startswith("modeled_ns_")]
    cols += [_Col(k, k.replace("_", " "), _field(k, _number)) for k in dict.fromkeys(extra)]
    if cols:
        cols[-1].section_end = True
    cols.append(_Col("modeled_ns", "CPU time\ntotal", _field("modeled_ns", format_ns)))
    actors = _actors(results)
    vcpus = [a for a in actors if _VCPU.match(a)]
    for a in actors:
        if a in vcpus and len(vcpus) > MAX_VCPU_COLUMNS:
            continue
        cols.append(_Col(f"modeled_ns_{a}", f"CPU time\n{a}", _actor_cell(a)))
    if len(vcpus) > MAX_VCPU_COLUMNS:
        def vcpu_sum(r: Result, _row: dict[str, Any]) -> str:
            return format_ns(sum(ns for a, ns in r.by_actor.items() if _VCPU.match(a)))

        def vcpu_max(r: Result, _row: dict[str, Any]) -> str:
            return format_ns(max((ns for a, ns in r.by_actor.items() if _VCPU.match(a)), default=0))

        cols.append(_Col("modeled_ns_vcpus", f"CPU time\n{len(vcpus)} vCPUs", vcpu_sum))
        cols.append(_Col("modeled_ns_vcpu_max", "CPU time\nbusiest vCPU", vcpu_max))
    cols[-1].section_end = True
    cols.append(_Col("wall_s", "wall", _field("wall_s", _seconds)))
    cols.append(_Col("gfns_per_s", "GFNs/s", _field("gfns_per_s", _rate)))
    return cols


def _labels(results: Sequence[Result]) -> tuple[list[str], list[str]]:
    """Row-label headers and one label per result: the policy, preceded by the platform and
    the memory when the results differ in those (the label titles a transposed column)."""
    heads = []
    if len({r.config.platform for r in results}) > 1:
        heads.append("platform")
    if len({r.config.memory for r in results}) > 1:
        heads.append("memory")
    heads.append("policy")
    return heads, [" ".join(_label_parts(r, heads)) for r in results]


def _label_parts(r: Result, heads: Sequence[str]) -> list[str]:
    values = {"platform": r.config.platform, "memory": format_size(r.config.memory),  # type: ignore[arg-type]
              "policy": r.policy}
    return [values[h] for h in heads]


# ---- tables ----------------------------------------------------------------------------------


def table(results: Sequence[Result], *, console: Console | None = None, layout: Layout = "auto") -> Table:
    """The comparison table: one row per result (``layout="rows"``), or one column per result
    (``"columns"``: a row per metric, which fits a narrow terminal).

    ``"auto"`` picks rows unless they are wider than ``console`` (without a console: rows).
    The columns are policy (plus platform / memory when the results differ in them), the
    counters of :meth:`Result.row` present in any result, modeled time in total and per
    actor (``vmm``, ``vcpuN``; past :data:`MAX_VCPU_COLUMNS` vCPUs their sum and the busiest
    one), wall time and GFNs/s.

    Raises:
        ValueError: no results, or an unknown layout.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    if not results:
        raise ValueError("no results to tabulate")
    if layout not in ("auto", "rows", "columns"):
        raise ValueError(f"layout {layout!r} is not 'auto', 'rows' or 'columns'")
    rows = [r.row() for r in results]
    cols = _columns(results, rows)
    heads, labels = _labels(results)
    if layout != "columns":
        t = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)
        for h in heads:
            t.add_column(h, no_wrap=True, style="bold" if h == "policy" else None)
        for c in cols:
            t.add_column(c.header, justify="right", no_wrap=True)
        for r, row in zip(results, rows):
            t.add_row(*(Text(x) for x in _label_parts(r, heads)), *(Text(c.cell(r, row)) for c in cols))
        if layout == "rows" or console is None:
            return t
        if width(t, console) <= console.width:
            return t
    return _column_table(cols, labels, results, rows)


def _column_table(cols: Sequence[_Col], labels: Sequence[str], results: Sequence[Result],
                  rows: Sequence[dict[str, Any]]) -> Table:
    """The column layout of :func:`table`: a row per metric, a column per result."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)
    t.add_column("", no_wrap=True)
    for label in labels:
        t.add_column(label, justify="right", no_wrap=True)
    for c in cols:
        t.add_row(Text(c.header.replace("\n", " ")), *(Text(c.cell(r, row)) for r, row in zip(results, rows)),
                  end_section=c.section_end)
    return t


def width(renderable: RenderableType, console: Console) -> int:
    """How many columns ``renderable`` takes laid out without limit (``Console.measure``
    clamps to the console's own width)."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(_TEXT_WIDTH), renderable).maximum


def tables(results: Sequence[Result], *, console: Console | None = None, layout: Layout = "auto") -> list[Table]:
    """:func:`table`, for a terminal: with ``"auto"``, when neither layout fits ``console``, the
    column layout split into several tables of as many results as fit (each with the metric
    labels), so that no cell is cut short. Otherwise the one table of :func:`table`.

    Raises:
        ValueError: as :func:`table`.
    """
    t = table(results, console=console, layout=layout)
    if layout != "auto" or console is None or width(t, console) <= console.width:
        return [t]
    rows = [r.row() for r in results]
    cols = _columns(results, rows)
    _heads, labels = _labels(results)
    out: list[Table] = []
    i = 0
    while i < len(results):
        k = len(results) - i
        while k > 1 and width(_column_table(cols, labels[i:i + k], results[i:i + k], rows[i:i + k]),
                              console) > console.width:
            k -= 1
        out.append(_column_table(cols, labels[i:i + k], results[i:i + k], rows[i:i + k]))
        i += k
    return out


def sweep_tables(batches: Sequence[Sequence[Result]], *, console: Console | None = None,
                 layout: Layout = "auto") -> list[list[Table]]:
    """:func:`tables` for each batch of a sweep (one memory size's results each), in one layout
    for them all: with ``"auto"`` on ``console``, rows if every batch's rows fit, else the
    column layout, split into tables of the same number of results in every batch when some
    batch's columns do not fit either (as many as fit in every batch). Each batch choosing its
    own layout printed one size's table in rows and the next one's in columns.

    Raises:
        ValueError: as :func:`table`, for any batch.
    """
    if layout != "auto" or console is None or len(batches) < 2:
        return [tables(b, console=console, layout=layout) for b in batches]
    fits = console.width
    for whole in ("rows", "columns"):  # one table per batch, if every batch's fits
        built = [table(b, layout=whole) for b in batches]
        if all(width(t, console) <= fits for t in built):
            return [[t] for t in built]
    prepared = []
    for b in batches:
        rows = [r.row() for r in b]
        prepared.append((b, rows, _columns(b, rows), _labels(b)[1]))

    def chunks(k: int) -> list[list[Table]]:
        return [[_column_table(cols, labels[i:i + k], b[i:i + k], rows[i:i + k]) for i in range(0, len(b), k)]
                for b, rows, cols, labels in prepared]

    k = max(len(b) for b in batches)
    while k > 1:
        k -= 1
        out = chunks(k)
        if all(width(t, console) <= fits for ts in out for t in ts):
            return out
    return chunks(1)


def _breakdown(actors: Iterable[str], limit: int = MAX_VCPU_BREAKDOWN) -> tuple[list[str], list[str]]:
    """The actor columns of a run's breakdown, in :func:`_actor_order`, and their headers:
    one per actor, or past ``limit`` vCPUs, in the vCPUs' place, their sum (``"N vCPUs"``) and
    the busiest vCPU's figure (``"busiest vCPU"``): ``(columns, headers)``, the vCPUs' columns
    named ``"*vcpus"`` / ``"*busiest"`` (:func:`_breakdown_cells` fills them)."""
    order = sorted(actors, key=_actor_order)
    vcpus = [a for a in order if _VCPU.match(a)]
    if len(vcpus) <= limit:
        return order, list(order)
    cols: list[str] = []
    heads: list[str] = []
    for a in order:
        if a == vcpus[0]:
            cols += ["*vcpus", "*busiest"]
            heads += [f"{len(vcpus)} vCPUs", "busiest vCPU"]
        elif a not in vcpus:
            cols.append(a)
            heads.append(a)
    return cols, heads


def _breakdown_cells(cols: Sequence[str], values: Mapping[str, int]) -> list[int | None]:
    """``values`` (ns by actor) in the columns of :func:`_breakdown`; None where an actor has
    none (and for the vCPUs' columns when no vCPU has any)."""
    vc = [ns for a, ns in values.items() if _VCPU.match(a)]
    out: list[int | None] = []
    for c in cols:
        if c == "*vcpus":
            out.append(sum(vc) if vc else None)
        elif c == "*busiest":
            out.append(max(vc) if vc else None)
        else:
            out.append(values.get(c))
    return out


def phase_table(result: Result, *, fold: bool | None = None) -> Table:
    """One result's phases: time on the timeline, CPU time in total and per actor (past
    :data:`MAX_VCPU_BREAKDOWN` vCPUs, or with ``fold=True`` past one, their sum and the busiest
    one's), wall time."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    cols, heads = _breakdown({a for p in result.phases for a in p.by_actor} | _vcpus([result]),
                             1 if fold else MAX_VCPU_BREAKDOWN)
    t = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, title="phases", title_justify="left")
    t.add_column("phase", no_wrap=True)
    t.add_column("elapsed", justify="right", no_wrap=True)
    t.add_column("CPU time", justify="right", no_wrap=True)
    for h in heads:
        t.add_column(h, justify="right", no_wrap=True)
    t.add_column("wall", justify="right", no_wrap=True)
    for p in result.phases:
        t.add_row(Text(p.name), Text(format_ns(p.elapsed_ns)), Text(format_ns(p.modeled_ns)),
                  *(Text(_MISSING if v is None else format_ns(v)) for v in _breakdown_cells(cols, p.by_actor)),
                  Text(_seconds(p.wall_s)))
    return t


def op_table(result: Result, *, fold: bool | None = None) -> Table:
    """One result's modeled time by operation (largest first), its share, and per actor (past
    :data:`MAX_VCPU_BREAKDOWN` vCPUs, or with ``fold=True`` past one, their sum and the busiest
    one's: in each row the vCPU that spent the most on that operation, in the footer the vCPU
    that spent the most)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    cols, heads = _breakdown(set(result.by_actor_op) | _vcpus([result]), 1 if fold else MAX_VCPU_BREAKDOWN)
    total = result.modeled_ns
    t = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, show_footer=True,
              title="modeled time by operation", title_justify="left")
    t.add_column("operation", "total", no_wrap=True)
    t.add_column("modeled", format_ns(total), justify="right", no_wrap=True)
    t.add_column("share", "100%" if total else _MISSING, justify="right", no_wrap=True)
    foot = _breakdown_cells(cols, {a: result.by_actor.get(a, 0)
                                   for a in set(result.by_actor_op) | _vcpus([result])})
    for h, v in zip(heads, foot):
        t.add_column(h, format_ns(v or 0), justify="right", no_wrap=True)
    for op, ns in sorted(result.by_op.items(), key=lambda kv: (-kv[1], kv[0])):
        share = f"{100.0 * ns / total:.1f}%" if total else _MISSING
        per = _breakdown_cells(cols, {a: v for a, ops in result.by_actor_op.items() if (v := ops.get(op))})
        t.add_row(Text(op), Text(format_ns(ns)), Text(share),
                  *(Text(format_ns(v) if v else _MISSING) for v in per))
    return t


def render_text(renderable: RenderableType, *, width: int = _TEXT_WIDTH) -> str:
    """``renderable`` as plain text: no colour or styles, laid out ``width`` columns wide,
    trailing blanks stripped from every line."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, no_color=True,
                      highlight=False, emoji=False, markup=False, legacy_windows=False, soft_wrap=False)
    console.print(renderable)
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def text_table(results: Sequence[Result], *, layout: Layout = "rows") -> str:
    """:func:`table` as plain text (see :func:`render_text`): for files, pipes and docs."""
    return render_text(table(results, layout=layout))


# ---- JSON ------------------------------------------------------------------------------------


def to_json(results: Sequence[Result], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-able report: ``{"pkvm_version", **extra, "results": [Result.to_dict(), ...]}``.

    ``extra`` carries what the caller knows about the whole set (the CLI puts the command line,
    the base config, seed and policies there).

    Raises:
        ValueError: ``extra`` uses the key ``pkvm_version`` or ``results``.
    """

    extra = dict(extra or {})
    clash = sorted({"pkvm_version", "results"} & set(extra))
    if clash:
        raise ValueError(f"extra may not set {', '.join(clash)}: the report fills them in")
    return {"pkvm_version": _version(), **extra, "results": [r.to_dict() for r in results]}


# ---- plots -----------------------------------------------------------------------------------


def _title(results: Sequence[Result], *, memory: bool) -> str:
    def distinct(values: Sequence[str]) -> str:
        return "/".join(dict.fromkeys(values))

    parts = [distinct([r.config.platform for r in results]), distinct([r.config.workload for r in results])]
    if memory:
        parts.append(distinct([format_size(r.config.memory) for r in results]))  # type: ignore[arg-type]
    vcpus = list(dict.fromkeys(r.config.vcpus for r in results))
    if vcpus != [1]:
        parts.append("/".join(str(v) for v in vcpus) + " vCPUs")
    return " · ".join(parts)


def plot(results: Sequence[Result], path: str, *, sweep: bool = False) -> None:
    """Draw ``results`` to ``path`` (PNG, or another format matplotlib knows by the suffix).

    Without ``sweep``: two panels with one bar per result. Left, modeled time stacked by
    actor (the VMM's ioctls against the vCPUs: where the time is spent); right, stacked by
    operation (the :data:`PLOT_TOP_OPS` largest operations overall, the rest as "other"),
    total on top. Long policy specs are wrapped at each ``+`` so that the labels stay
    readable. With ``sweep`` (the results of :func:`pkvm.experiments.sweep`): the critical path
    (with one vCPU, the CPU time) against guest memory on log-log axes, one line per policy.

    Uses matplotlib's object API on the Agg canvas: no display is needed, and neither
    pyplot's global figure list nor the process's backend setting is touched.

    Raises:
        ValueError: no results, or a format matplotlib does not know.
        OSError: ``path`` cannot be written.
    """
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("no results to plot")
    if sweep:
        fig = Figure(figsize=(8.0, 4.8), layout="constrained")
        _plot_sweep(fig.add_subplot(), results)
    else:
        fig = Figure(figsize=(12.0, 5.2), layout="constrained")
        actors, ops = fig.subplots(1, 2, width_ratios=(1, 1.3))
        _plot_actors(actors, results)
        _plot_ops(ops, results)
        fig.suptitle(_title(results, memory=True), fontsize=10)
    fig.savefig(path, dpi=150)


def _tick_labels(results: Sequence[Result]) -> list[str]:
    """One x label per result, wrapped at each ``+`` of a policy spec and at spaces, so that
    ``eager-post+directmap=split-4k`` takes two short lines instead of one long one."""
    _heads, labels = _labels(results)
    return [label.replace(" ", "\n").replace("+", "\n+") for label in labels]


def _set_ticks(ax: Any, results: Sequence[Result]) -> None:
    """The wrapped labels; slanted when their lines are long for the bar width."""
    labels = _tick_labels(results)
    widest = max(len(line) for label in labels for line in label.split("\n"))
    if len(results) > 1 and widest * len(results) > 48:
        ax.set_xticks(range(len(results)), labels, fontsize=8, rotation=25, ha="right",
                      rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(results)), labels, fontsize=8)


def _plot_stack(results: Sequence[Result]) -> list[tuple[str, list[int]]]:
    """The segments of :func:`_plot_actors`' bars, bottom up: ``(label, ns per result)``, one
    per actor (the VMM first, then the vCPUs in order, then any other actor), or past
    :data:`MAX_VCPU_COLUMNS` vCPUs one segment for all of them (``"N vCPUs"``), as the table
    does (:func:`_breakdown`; the busiest vCPU does not stack)."""
    cols, heads = _breakdown({a for r in results for a in r.by_actor} | _vcpus(results), MAX_VCPU_COLUMNS)
    cells = [_breakdown_cells(cols, r.by_actor) for r in results]
    return [("VMM (ioctls)" if c == "vmm" else h, [row[i] or 0 for row in cells])
            for i, (c, h) in enumerate(zip(cols, heads)) if c != "*busiest"]


def _plot_actors(ax: Any, results: Sequence[Result]) -> None:
    """Modeled time per result, stacked by actor (VMM first, then the vCPUs: past
    :data:`MAX_VCPU_COLUMNS` of them, their sum)."""
    unit, scale = time_unit(max(r.modeled_ns for r in results))
    x = range(len(results))
    palette = {"VMM (ioctls)": "#3f3f3f"}
    bottoms = [0.0] * len(results)
    stack = _plot_stack(results)
    tallest = max(1e-9, max(r.modeled_ns for r in results) / scale)
    for i, (label, values) in enumerate(stack):
        heights = [v / scale for v in values]
        color = palette.get(label, ("#6baed6", "#2171b5", "#9ecae1", "#08519c")[i % 4])
        ax.bar(x, heights, bottom=bottoms, color=color, label=label, width=0.6)
        for j, (b, h) in enumerate(zip(bottoms, heights)):
            # a segment's time inside it, where it is tall enough and the bars wide enough
            if len(results) <= 5 and h > 0.06 * tallest:
                ax.annotate(format_ns(h * scale), (j, b + h / 2), ha="center", va="center", fontsize=7,
                            color="white")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    _set_ticks(ax, results)
    ax.set_ylabel(f"CPU time by actor ({unit})")
    # room above the bars for the legend (upper left): about 7 % of the axis per entry
    ax.set_ylim(0, max(1e-9, max(bottoms)) * (1.06 + 0.075 * len(stack)))
    ax.set_title("by actor", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], names[::-1], loc="upper left", frameon=False, fontsize=8)


def _plot_ops(ax: Any, results: Sequence[Result]) -> None:
    import matplotlib

    totals: dict[str, int] = {}
    for r in results:
        for op, ns in r.by_op.items():
            totals[op] = totals.get(op, 0) + ns
    ranked = [op for op, ns in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])) if ns > 0]
    top = ranked[:PLOT_TOP_OPS]
    unit, scale = time_unit(max(r.modeled_ns for r in results))
    x = range(len(results))
    colors = matplotlib.colormaps["tab10"]
    bottoms = [0.0] * len(results)
    segments: list[tuple[str, list[int], Any]] = [
        (op, [r.by_op.get(op, 0) for r in results], colors(i % 10)) for i, op in enumerate(top)]
    if len(ranked) > len(top):
        rest = [sum(ns for op, ns in r.by_op.items() if op not in top) for r in results]
        segments.append(("other", rest, "0.7"))
    for op, values, color in segments:
        heights = [v / scale for v in values]
        ax.bar(x, heights, bottom=bottoms, color=color, label=op, width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, r in enumerate(results):
        ax.annotate(format_ns(r.modeled_ns), (i, r.modeled_ns / scale), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    crit = [r.critical_path_ns / scale for r in results]
    if any(crit):
        ax.scatter(list(x), crit, marker="D", s=36, color="black", zorder=3, label="critical path")
        for i, r in enumerate(results):
            if r.critical_path_ns != r.modeled_ns:  # (one vCPU: the total above the bar says it)
                ax.annotate(format_ns(r.critical_path_ns), (i, r.critical_path_ns / scale), xytext=(8, -3),
                            textcoords="offset points", ha="left", va="top", fontsize=7,
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.8})
    _set_ticks(ax, results)
    ax.set_ylabel(f"CPU time by operation, and critical path ({unit})")
    ax.set_ylim(0, max(1e-9, max(bottoms), max(crit)) * 1.12)
    ax.set_title("by operation", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    # Reversed, so the legend reads top-down like the stack.
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              fontsize=8, title="operation", title_fontsize=8)


def _plot_sweep(ax: Any, results: Sequence[Result]) -> None:
    """The critical path (what the guest sees, the table's first row; with one vCPU it is the
    CPU time) against guest memory, one line per policy."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lines: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r.critical_path_ns > 0:  # a log axis cannot show 0
            lines.setdefault(r.policy, []).append((int(r.config.memory), r.critical_path_ns / 1e9))
    memories = sorted({int(r.config.memory) for r in results})
    # Distinct markers and dashes too: policies with equal times draw on top of each other.
    markers, dashes = "os^Dv<>P", ("-", "--", "-.", ":")
    for i, (policy, points) in enumerate(lines.items()):
        points.sort()
        ax.plot([m for m, _ in points], [s for _, s in points], marker=markers[i % len(markers)],
                linestyle=dashes[i % len(dashes)], markersize=7 - min(i, 4), label=policy)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator([float(m) for m in memories]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_size(int(round(v)))))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(memories) == 1:  # one size: give the point some room instead of a zero-width axis
        ax.set_xlim(memories[0] / 2, memories[0] * 2)
    # plain numbers ("0.3", not "3×10^-1"); the minor ticks labelled only when the axis spans
    # less than two decades (else they crowd the decades' labels)
    def minor(v: float, _pos: int) -> str:
        lo, hi = ax.get_ylim()
        return f"{v:g}" if lo > 0 and hi / lo < 100 else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.set_xlabel("guest memory")
    ax.set_ylabel("critical path (s)")
    ax.set_title(_title(results, memory=False) + " · critical path vs guest memory")
    ax.grid(which="both", alpha=0.3)
    if lines:
        ax.legend(title="policy", fontsize=8, title_fontsize=8)
