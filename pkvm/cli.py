"""The ``pkvm`` command line: run experiments and print, save or plot their results.

Subcommands (``pkvm SUBCOMMAND --help`` for every option)::

    pkvm compare [--platform snp] [--memory 64G] [--workload boot] [--policies a,b] ...
    pkvm run     [--policy fault-time] ...          one policy, with phase and operation breakdowns
    pkvm sweep   --grid memory=16G,64G vcpus=1,8    every policy at every grid point (tidy table)
    pkvm sensitivity [--samples 1024] ...           which conclusions survive the price ranges
    pkvm workloads                                  the workloads and their options
    pkvm costs   [--platform snp] [--cost K=V] ...  the cost model with its sources
    pkvm policies                                   every preset's knobs, and where each matters

Output: tables go to stdout (``rich`` on a terminal; plain text through a pipe, so that the
output of a script is the same everywhere); the progress bar, the names of the files written
and errors go to stderr. The progress bar is shown only when stderr is a terminal.

Exit status: 0 on success; 2 for a usage error (a bad option or file, a configuration that
:class:`pkvm.experiments.Config` rejects: every input is checked before anything runs, or one
the run finds it cannot build, :class:`pkvm.ConfigError`: a workload that needs more memory
than the guest has above its image); 1 when
a run or a file operation fails (writing standard output too; and ``--scheduler ADDRESS`` when
no Dask scheduler answers there within 5 s, what answers is not one, no worker joins it within
30 s, or its workers run another pkvm, Python or Dask: a malformed address is a usage error, 2);
130 on Ctrl-C. Every error is one line, ``pkvm: error:
<message>``, with control characters escaped. An unexpected exception (a bug in pkvm) is one
line too; set ``PKVM_DEBUG=1`` in the environment to get its traceback, for the bug report.

``--trace`` says how large the trace will be before writing it, and refuses a trace larger
than ``--trace-max-size`` (default 1G) unless that is raised.

A replay (``--workload replay:PATH``) of a trace that pkvm wrote takes the platform, memory,
image and vCPU count from the trace's ``# pkvm`` header; an option that gives another value
is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import numbers
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import IO, TYPE_CHECKING, Any, NoReturn

from pkvm import _launch, experiments
from pkvm._files import atomic_output, check_creatable, output_path
from pkvm._units import format_ns as format_time
from pkvm._units import format_size, parse_decimal, parse_size
from pkvm.cost.model import format_ns, format_table
from pkvm.errors import ConfigError, PkvmError, TracePlatformError
from pkvm.experiments import report, workloads
from pkvm.experiments.execution import Runner, check_address, max_jobs
from pkvm.experiments.frames import check_frame_path, is_time_metric, plot_grid
from pkvm.experiments.uncertainty import (DISTRIBUTIONS, MAX_SAMPLES, METHODS, UnknownMetricError, plot,
                                         price_space)
from pkvm.experiments.trace import TRACE_EVENTS, check_file, check_trace_events, header_fields
from pkvm.kvm.policy import preset_table
from pkvm.sim.timeline import PAGEWISE_LOCK_MODELS

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import RenderableType

    from pkvm.experiments import Config, Result

__all__ = ["main"]

_PROG = "pkvm"
_REPLAY_EPILOG = ("With --workload replay:PATH, a trace written by pkvm --trace also sets the platform, "
                  "memory, image and vCPUs it was recorded with (an option that gives another value is "
                  "refused: a replay runs the VM its trace recorded).")
_LAYOUTS = ("auto", "rows", "columns")
#: The trace size ``--trace`` writes without being told more (``--trace-max-size``).
_TRACE_MAX_DEFAULT = "1G"
#: Defaults of the options that shape the VM. A replay takes what its trace's ``# pkvm``
#: header recorded instead (the replay refuses a VM of another shape), unless they are given.
_VM_DEFAULTS: dict[str, Any] = {"platform": "snp", "memory": "64G", "image": "2M", "vcpus": 1}


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of printing the
    usage block and exiting, so that every error reaches the user as one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ---- argument types --------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return key.strip(), value.strip()


def _once(flag: str, pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """``NAME=VALUE`` options as a dict; a name given twice is refused (which would count?)."""
    out: dict[str, str] = {}
    for key, value in pairs:
        if key in out:
            raise UsageError(f"{flag} gives {key} twice ({key}={out[key]} and {key}={value})")
        out[key] = value
    return out


def _seed(text: str) -> int:
    try:
        return parse_decimal(text)  # ASCII digits only: not 5_000, 0x10, +5 (int() takes them)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer in decimal digits "
                                         "(such as 7)") from None


def _positive_int(text: str) -> int:
    try:
        v = parse_decimal(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer in decimal digits (such as 4)")
    return v


def _batch_pages(text: str) -> int | None:
    """``--batch-pages``: ``auto`` (None: chosen by the memory and vCPUs) or a positive decimal int (its
    power-of-two check is Config's, whose message names the option)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or a power of two in decimal digits (such as 1024)") from None


def _size(text: str) -> str:
    """A size like 64G, checked here so that the error names the option; kept as typed, so
    that the messages of :class:`Config` quote it as the user wrote it."""
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _name_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list like a,b,c")
    return names


# ---- the parser ------------------------------------------------------------------------------


def _experiment_options(single_policy: bool) -> _Parser:
    """The options ``compare`` and ``run`` share (an argparse parent parser)."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("experiment")
    g.add_argument("--platform", choices=experiments.PLATFORMS, default=None,
                   help=f"confidential-VM platform to simulate (default: {_VM_DEFAULTS['platform']})")
    g.add_argument("--memory", type=_size, default=None, metavar="SIZE",
                   help="guest RAM, a multiple of 2M such as 256M, 64G or 1T "
                        f"(default: {_VM_DEFAULTS['memory']})")
    names = ", ".join(workloads.WORKLOADS)
    g.add_argument("--workload", default="boot", metavar="NAME",
                   help=f"what the guest and VMM do: {names}; 'replay:PATH' replays a trace file "
                        "(see 'pkvm workloads'; default: %(default)s)")
    g.add_argument("-o", "--option", action="append", type=_key_value, default=[], metavar="NAME=VALUE",
                   help="a workload option, e.g. accept=4K or file=trace.txt (repeatable)")
    if single_policy:
        g.add_argument("--policy", default=None, metavar="NAME",
                       help="the kernel design or version to model, e.g. fault-time, eager-post, 6.8, "
                            "6.19 (default: the current upstream design, fault-time on snp and 6.19 "
                            "elsewhere)")
    else:
        g.add_argument("--policies", type=_name_list, default=None, metavar="A,B,...",
                       help="policies to compare, comma-separated (default: "
                            + "; ".join(f"{k}: {','.join(v)}" for k, v in _platform_policies()) + ")")
        g.add_argument("--sweep-memory", type=_name_list, default=None, metavar="SIZE,SIZE,...",
                       help="repeat the comparison at each guest memory size (e.g. 1G,16G,256G,1T), "
                            "one table per size, all in one layout; --plot then draws the critical path "
                            "against memory")
        _add_execution_options(g)
    g.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help="random seed; the same seed gives the same counters and modeled times "
                        "(default: %(default)s)")
    g.add_argument("--cost", action="append", type=_key_value, default=[], metavar="OP=TIME",
                   help="override one operation's cost, e.g. rmpupdate=800ns (repeatable; see 'pkvm costs')")
    g.add_argument("--costs", default=None, metavar="FILE",
                   help="cost model file (.toml, or .json) to start from instead of the platform's defaults; "
                        "'pkvm costs --toml' writes one")
    g.add_argument("--vcpus", type=_positive_int, default=None, metavar="N",
                   help="guest vCPUs; they run concurrently on the timeline, each taking the guest's work "
                        f"in turn (default: {_VM_DEFAULTS['vcpus']})")
    g.add_argument("--host-cpus", type=_positive_int, default=64, metavar="N",
                   help="host CPUs: every one is interrupted by a kernel TLB flush, which also prices SNP's "
                        "direct-map flush; at least --vcpus (default: %(default)s)")
    g.add_argument("--batch-pages", type=_batch_pages, default=None, metavar="N|auto",
                   help="the most 4K pages a private fault batch covers while another actor runs on the "
                        "timeline, a power of two: smaller is finer-grained and slower; auto (the default) "
                        "takes 512 (2 MiB) where the simulation can afford it (up to 64G with 32 vCPUs, "
                        "16G with 64), else 16384 (docs/timeline.md, \"Choosing the batch\")")
    g.add_argument("--pagewise-locks", default="interleaved", choices=PAGEWISE_LOCK_MODELS,
                   help="how the locks the kernel takes page by page (cpa_lock, the TDX S-EPT, mmu_lock for "
                        "read in each fault) are modelled on the timeline: 'interleaved', a batch's page holds "
                        "interleave with the other vCPUs' (a fault batch's reads with the writers); 'batch', a "
                        "batch holds the lock once for all its pages and others queue behind it (with "
                        "--batch-pages 1, page by page) (docs/timeline.md; default: %(default)s)")
    g.add_argument("--shared-backing", default="thp", choices=experiments.SHARED_BACKINGS,
                   help="host memory backing shared guest pages (default: %(default)s)")
    g.add_argument("--image", type=_size, default=None, metavar="SIZE",
                   help="firmware image at guest address 0, built by the launch flow "
                        f"(default: {_VM_DEFAULTS['image']})")
    g.add_argument("--no-discard", dest="discard", action="store_false",
                   help="the VMM keeps both backings on conversion instead of discarding the old one")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT.json", default=None,
                   help="write every result (config, seed, cost model, counters, breakdowns) as JSON "
                        "(- for standard output; the tables then go to stderr)")
    o.add_argument("--plot", metavar="OUT.png", default=None,
                   help="draw modeled time per policy, split by actor (VMM, vCPUs) and by operation, with "
                        "each policy's critical path, to a PNG"
                        + ("" if single_policy else " (with --sweep-memory: the critical path against memory)"))
    o.add_argument("--trace", metavar="OUT.txt", default=None,
                   help="write a kernel-format trace ('trace-cmd report' text), one line per event, "
                   "as large as the kernel's would be (a 64G boot: ~16.8 M lines, ~2.3 GB, ~20 s); the "
                   "size is estimated and printed first" + (
                       "" if single_policy else "; with several policies one file per policy, "
                       "OUT.<policy>.txt (with --sweep-memory, OUT.<size>.<policy>.txt)"))
    o.add_argument("--timeline", metavar="OUT.json", default=None,
                   help="write the concurrent timeline as Chrome trace-event JSON (open it in Perfetto UI or "
                        "chrome://tracing): a track per actor, lock waits and holds, races" + (
                       "" if single_policy else "; with several policies OUT.<policy>.json (with "
                       "--sweep-memory, OUT.<size>.<policy>.json)"))
    o.add_argument("--gantt", metavar="OUT.png", default=None,
                   help="draw the timeline as a per-actor Gantt chart" + (
                       "" if single_policy else "; with several policies OUT.<policy>.png (with "
                       "--sweep-memory, OUT.<size>.<policy>.png)"))
    o.add_argument("--trace-events", metavar="EVENT,...", default=None,
                   help="with --trace, write only these tracepoints (comma-separated; default: all): "
                        + ", ".join(TRACE_EVENTS))
    if not single_policy:
        o.add_argument("--out", metavar="OUT.parquet", default=None,
                       help="write the tidy table, one row per run (configuration, seed and every "
                            "metric as columns), as .parquet or .csv")
    o.add_argument("--trace-max-size", type=_size, default=_TRACE_MAX_DEFAULT, metavar="SIZE",
                   help="refuse to start when --trace would write more than SIZE in all "
                        "(default: %(default)s)")
    o.add_argument("--layout", choices=_LAYOUTS, default="auto",
                   help=("table shape: rows (one row for the run), columns (one column, a row per "
                         "metric), or auto: rows when they fit the terminal, else columns (off a "
                         "terminal: rows)" if single_policy else
                         "table shape: rows (one row per policy), columns (one column per policy, a "
                         "row per metric), or auto: rows when they fit the terminal, else columns, "
                         "split into several tables when even those do not fit (off a terminal: "
                         "rows); with --sweep-memory, auto picks one shape for every size's table "
                         "(rows only if every size's rows fit), so on a terminal the tables appear "
                         "once the last size has run")
                        + " (default: %(default)s)")
    o.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no list of the files written")
    return p


def _platform_policies() -> list[tuple[str, tuple[str, ...]]]:
    return [(k, v) for k, v in experiments.PLATFORM_POLICIES.items() if k in experiments.PLATFORMS]


def _default_policy(platform: str) -> str:
    """``pkvm run``'s policy: the current upstream kernel, under the name SNP users know it by
    (the ``fault-time`` preset is the ``6.19`` kernel)."""
    return "fault-time" if platform == "snp" else experiments.PLATFORM_POLICIES["default"][0]


def build_parser() -> argparse.ArgumentParser:
    """The ``pkvm`` argument parser (errors raise :class:`UsageError`)."""
    fmt = argparse.HelpFormatter
    parser = _Parser(
        prog=_PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="pkvm simulates Linux KVM shared/private memory conversion for confidential\n"
                    "VMs (SEV-SNP, TDX, SW_PROTECTED) and models what each kernel design costs.",
        epilog="examples:\n"
               "  pkvm compare --memory 64G\n"
               "  pkvm compare --platform tdx --workload swiotlb --option ops=5000 --json out.json\n"
               "  pkvm compare --sweep-memory 1G,16G,256G --plot sweep.png\n"
               "  pkvm run --policy eager-post --cost rmpupdate=800ns\n"
               "  pkvm sweep --grid memory=16G,64G vcpus=1,8 --plot grid.png --out grid.parquet\n"
               "  pkvm sensitivity --memory 64G --metric modeled_ns --samples 1024 --plot gsa.png\n"
               "  pkvm costs --platform snp --toml > snp.toml")
    parser.add_argument("--version", action="version", version=f"{_PROG} {experiments.version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    c = sub.add_parser(
        "compare", parents=[_experiment_options(single_policy=False)], formatter_class=fmt,
        help="run one workload under several policies and tabulate them",
        epilog=_REPLAY_EPILOG,
        description="Run one workload under several policies (same seed, same cost model) and print "
                    "one table row per policy: conversions, faults, platform operations, zaps, TLB "
                    "flushes, direct-map damage, modeled time in total and per actor, wall time.")
    c.set_defaults(handler=_cmd_compare)

    r = sub.add_parser(
        "run", parents=[_experiment_options(single_policy=True)], formatter_class=fmt,
        help="run one workload under one policy, with per-phase and per-operation breakdowns",
        epilog=_REPLAY_EPILOG,
        description="Run one workload under one policy and print its table row, the modeled and wall "
                    "time of each phase, and the modeled time by operation and actor.")
    r.set_defaults(handler=_cmd_run)

    _add_sweep_parser(sub)
    _add_sensitivity_parser(sub)

    w = sub.add_parser("workloads", formatter_class=fmt, help="list the workloads and their options",
                       description="List the workloads with their descriptions and options "
                                   "(default value and meaning). Set options with --option NAME=VALUE.")
    w.set_defaults(handler=_cmd_workloads)
    pp = sub.add_parser("policies", formatter_class=fmt, help="list the policy presets and their knobs",
                        description="List every policy preset's knobs, with where each knob can change "
                                    "the counts (docs/workloads.md).")
    pp.set_defaults(handler=_cmd_policies)

    k = sub.add_parser("costs", formatter_class=fmt, help="print the cost model with its sources",
                       description="Print the cost model a run would use: each operation's value, "
                                   "plausible range, unit, confidence (H/M/L measured, E estimate), "
                                   "row of docs/costs.md and source.")
    k.add_argument("--platform", choices=experiments.PLATFORMS, default="snp",
                   help="platform profile (default: %(default)s)")
    k.add_argument("--cost", action="append", type=_key_value, default=[], metavar="OP=TIME",
                   help="override one operation's cost, e.g. rmpupdate=800ns (repeatable)")
    k.add_argument("--costs", default=None, metavar="FILE",
                   help="cost model file (.toml or .json) to start from")
    fmt_group = k.add_mutually_exclusive_group()
    fmt_group.add_argument("--toml", action="store_true",
                           help="print the model as TOML, to edit and pass back with --costs")
    fmt_group.add_argument("--markdown", action="store_true", help="print a Markdown table")
    k.set_defaults(handler=_cmd_costs)
    return parser


# ---- configuration ---------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    """The :class:`Config` the options describe (raises :class:`UsageError` when it is bad).

    Its policy is the first to compare (``compare``) or the one to run (``run``)."""
    for flag, name in _OUTPUTS:
        path = getattr(args, name, None)
        if path is not None and not path.strip():
            raise UsageError(f"{flag} needs a file name, e.g. {flag} OUT{_OUTPUT_EXAMPLE[flag]}")
    workload = args.workload
    options = _once("--option", args.option)
    if workload.startswith("replay:"):
        workload, path = "replay", workload[len("replay:"):]
        if not path:
            raise UsageError("--workload replay:PATH needs a path")
        if "file" in options and options["file"] != path:
            raise UsageError("--workload replay:PATH and --option file=... name different files")
        options["file"] = path
    if workload == "replay" and "file" in options:
        _check_replay_file(options["file"])
    recorded = _recorded_shape(options["file"]) if workload == "replay" and "file" in options else {}
    _check_replay_shape(args, recorded, options.get("file", ""))
    _check_recorded_shape(recorded, options.get("file", ""))
    shape: dict[str, Any] = {}
    for key, default in _VM_DEFAULTS.items():
        given = getattr(args, key)
        shape[key] = given if given is not None else recorded.get(key, default)
    _check_cost_file("--costs", args.costs)
    if hasattr(args, "policies"):
        policy = (args.policies or experiments.PLATFORM_POLICIES[shape["platform"]])[0]
    else:
        policy = args.policy if args.policy is not None else _default_policy(shape["platform"])
    trace_events = None
    if args.trace_events is not None:
        if args.trace is None:
            raise UsageError(f"--trace-events {args.trace_events} needs --trace OUT.txt (the trace it filters)")
        try:
            trace_events = check_trace_events(args.trace_events, "--trace-events")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    # An option without a default (replay's file) is required; said in the command line's
    # terms before Config says it in its own ("needs option 'file'").
    wl = workloads.WORKLOADS.get(workload)
    for name, opt in (wl.options.items() if wl is not None else ()):
        if opt.default is None and name not in options:
            hint = " (or --workload replay:PATH)" if workload == "replay" else ""
            raise UsageError(f"--workload {workload} needs --option {name}=...{hint}: {opt.help}")
    try:
        config = experiments.Config(
            **shape, workload=workload, options=options, policy=policy, costs=_once("--cost", args.cost),
            cost_file=args.costs, shared_backing=args.shared_backing, discard=args.discard, trace=args.trace,
            host_cpus=args.host_cpus, batch_pages=args.batch_pages, pagewise_locks=args.pagewise_locks,
            timeline=args.timeline, gantt=args.gantt,
            trace_events=trace_events)
    except (ValueError, OSError) as exc:
        message = _as_option(_message(exc))
        if not message.startswith("-"):
            blamed = _blame(args, shape, workload, options, policy)
            message = f"{blamed}: {message}" if blamed else message
        raise UsageError(message) from None
    return config


def _blame(args: argparse.Namespace, shape: dict[str, Any], workload: str, options: dict[str, str],
           policy: str) -> str | None:
    """The option whose value :class:`Config` refused, found by checking each on its own with
    the other options at their defaults, so that the message can name it (``unknown workload
    'x'`` is the ``--workload``'s, ``bad duration ...`` a ``--cost``'s); None when no option
    alone is refused (a combination is: the message names its fields)."""
    platform = shape["platform"]

    def refused(**fields: Any) -> bool:
        try:
            experiments.Config(platform=platform, **fields)
        except (ValueError, OSError):
            return True
        return False

    if workload not in workloads.WORKLOADS:
        return "--workload"
    if workload != "replay" and refused(memory=shape["memory"], image=shape["image"], workload=workload,
                                        options=options):
        return "--option" if options and not refused(memory=shape["memory"], image=shape["image"],
                                                     workload=workload) else "--workload"
    if args.cost and refused(costs=_once("--cost", args.cost)):
        return "--cost"
    if args.costs is not None and refused(cost_file=args.costs):
        return f"--costs {args.costs}"
    if refused(policy=policy):
        return "--policies" if hasattr(args, "policies") else "--policy"
    return None


def _check_input_file(given: str, path: str) -> None:
    """The input file ``path`` (``given`` is the argument as typed) exists, is a regular file
    and can be read."""
    if not os.path.exists(path):
        raise UsageError(f"{given}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{given}: is a directory, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{given}: is not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{given}: permission denied")


def _check_cost_file(option: str, path: str | None) -> None:
    """``--costs FILE``: a readable regular file (its contents are checked by :class:`Config`)."""
    if path is not None:
        _check_input_file(f"{option} {path}", path)


def _check_replay_file(path: str) -> None:
    """``--workload replay:PATH``: a readable file that is a trace (:func:`pkvm.experiments.trace.check_file`)
    of a VM pkvm runs."""
    _check_input_file(f"--workload replay:{path}", path)
    try:
        fields = check_file(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--workload replay:{path}: {_message(exc)}") from None
    if fields.get("platform", "snp") not in experiments.PLATFORMS:
        raise UsageError(f"--workload replay:{path}: its '# pkvm' header's platform={fields['platform']!r} is "
                         f"not one of {', '.join(experiments.PLATFORMS)}")


def _check_replay_shape(args: argparse.Namespace, recorded: dict[str, Any], path: str) -> None:
    """A replay runs the VM its trace's ``# pkvm`` header recorded: an option that says
    otherwise (or ``--sweep-memory``) is refused here, before anything runs."""
    if not recorded:
        return
    if getattr(args, "sweep_memory", None):
        raise UsageError(f"--sweep-memory {','.join(args.sweep_memory)}: a replay runs at the memory its trace "
                         f"{path} was recorded with ({format_size(recorded.get('memory', 0))}); drop --sweep-memory")
    for key in ("platform", "memory", "image", "vcpus"):
        given = getattr(args, key)
        if given is None or key not in recorded:
            continue
        value = parse_size(given) if key in ("memory", "image") else given
        if value != recorded[key]:
            shown = format_size(recorded[key]) if key in ("memory", "image") else recorded[key]
            raise UsageError(f"--{key} {given}: the trace {path} was recorded with {key} {shown}; a replay "
                             f"runs the VM its trace recorded (drop --{key})")


def _check_recorded_shape(recorded: dict[str, Any], path: str) -> None:
    """The VM a trace's ``# pkvm`` header records is one pkvm builds (``memory=0`` is not):
    the message names the trace, not the option the value would otherwise stand for."""
    if not recorded:
        return
    try:
        experiments.Config(**{**_VM_DEFAULTS, **recorded})
    except (ValueError, OSError) as exc:
        raise UsageError(f"--workload replay:{path}: its '# pkvm' header records a VM pkvm does not build: "
                         f"{_message(exc)}") from None


def _check_replay_grid(grid: dict[str, str], points: Sequence[Config]) -> None:
    """``--grid``: a replay runs the VM its trace's header recorded, at every grid point too
    (a platform, memory, image or vCPU count on the grid that differs is refused before
    anything runs)."""
    for pt in points:
        if pt.workload != "replay":
            continue
        path = pt.options.get("file", "")
        recorded = _recorded_shape(path)
        for key in ("platform", "memory", "image", "vcpus"):
            if key in grid and key in recorded and getattr(pt, key) != recorded[key]:
                shown = format_size(recorded[key]) if key in ("memory", "image") else recorded[key]
                raise UsageError(f"--grid {key}={grid[key]}: the trace {path} was recorded with {key} {shown}; a "
                                 f"replay runs the VM its trace recorded (leave {key} out of --grid)")


def _check_memory_options(args: argparse.Namespace) -> None:
    """``--sweep-memory`` sets the memory of every run: with ``--memory`` it is ambiguous."""
    if getattr(args, "sweep_memory", None) and args.memory is not None:
        raise UsageError(f"--memory {args.memory} and --sweep-memory {','.join(args.sweep_memory)} both set the "
                         "guest memory; give one of them")


def _check_trace_size(args: argparse.Namespace, configs: Sequence[Config]) -> None:
    """``--trace``: say how much it will write, and refuse more than ``--trace-max-size``."""
    if args.trace is None:
        return
    cap = parse_size(args.trace_max_size)
    lines = size = 0
    for config in configs:
        n, b = experiments.trace_size(config, args.seed)
        lines, size = lines + n, size + b
    files = f"{len(configs)} files" if len(configs) > 1 else args.trace
    what = f"about {_human_bytes(size)} ({_human_count(lines)} lines) of trace to {files}"
    if size > cap:
        need = format_size(-(-size // (1 << 30)) << 30)
        raise UsageError(f"--trace {args.trace}: the run would write {what}, more than --trace-max-size "
                         f"{args.trace_max_size}; pass --trace-max-size {need} to write it, or trace a "
                         "smaller --memory")
    _info(args, f"writing {what}")


def _human_count(n: int) -> str:
    """``n`` to three significant digits or so: 16.8 M, 48.1 k, 512."""
    for unit, scale in (("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n}"


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _recorded_shape(path: str) -> dict[str, Any]:
    """What the ``# pkvm`` header of the trace at ``path`` says about the VM's shape
    (nothing when the file has no such header or cannot be read: the replay reports that)."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            fields = header_fields(islice(f, 64))
    except OSError:
        return {}
    shape: dict[str, Any] = {}
    if fields.get("platform") in experiments.PLATFORMS:
        shape["platform"] = fields["platform"]
    for key in ("memory", "image", "vcpus"):
        if fields.get(key, "").isdigit() and fields[key].isascii():  # ("²".isdigit(); int() refuses it)
            shape[key] = int(fields[key])
    return shape


def _policies(args: argparse.Namespace, base: Config) -> list[str]:
    policies = args.policies or list(experiments.PLATFORM_POLICIES[base.platform])
    seen: set[str] = set()
    for p in policies:
        if p in seen:
            raise UsageError(f"policy {p!r} is given twice in --policies")
        seen.add(p)
        try:
            base.with_(policy=p, trace=None)
        except ValueError as exc:
            raise UsageError(f"--policies: {_message(exc)}") from None
    return policies


def _memories(text: list[str] | None, base: Config) -> list[int]:
    out: list[int] = []
    for m in text or []:
        try:
            size = parse_size(m)
            base.with_(memory=m)
        except ValueError as exc:
            raise UsageError(f"--sweep-memory: {_message(exc)}") from None
        if size in out:
            raise UsageError(f"--sweep-memory lists {m} twice")
        out.append(size)
    return out


#: The options that name a file to write, with their attribute in the parsed arguments.
_OUTPUTS = (("--json", "json"), ("--plot", "plot"), ("--trace", "trace"), ("--timeline", "timeline"),
            ("--gantt", "gantt"), ("--out", "out"))


def _check_outputs(args: argparse.Namespace, config: Config, policies: Sequence[str] = (),
                   memories: Sequence[int] = ()) -> None:
    """Fail before a long run, not after it, when an output cannot be created, or would
    overwrite an input of the run or another output (``config``, ``policies`` and
    ``memories`` say which files the run reads and writes)."""
    given: list[tuple[str, str]] = [(flag, getattr(args, name)) for flag, name in _OUTPUTS
                                    if getattr(args, name, None) is not None]
    for flag, path in given:
        if path == "-" and flag != "--json":
            raise UsageError(f"{flag} -: only --json writes to standard output; name a file "
                             f"(e.g. OUT{_OUTPUT_EXAMPLE[flag]})")
    given = [(flag, path) for flag, path in given if path != "-"]  # --json -: standard output
    _check_distinct(args, config, given, policies, memories)
    for flag, path in given:
        try:
            os.stat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # a loop of symbolic links, a file used as a directory
            raise UsageError(f"{flag} {path}: cannot write it: {exc.strerror}") from None
        target = output_path(path)  # a symbolic link's target gets the content
        parent = os.path.dirname(target)
        if not os.path.isdir(parent) and os.path.islink(path):
            raise UsageError(f"{flag} {path}: a symbolic link to {target}, which cannot be created: "
                             f"directory {parent} does not exist")
        for name in dict.fromkeys([path, *_output_names(flag, path, policies, memories)]):
            real = output_path(name)
            if os.path.isfile(real) and not os.access(real, os.W_OK):
                # the rename of the temporary file would replace a file open() may not write
                shown = "" if name == path else f" (it writes {name})"
                raise UsageError(f"{flag} {path}: cannot write it{shown}: permission denied (the file is "
                                 "read-only)")
        if flag == "--out":  # _check_frame_out
            if os.path.isdir(parent) and not os.path.isdir(path):
                _check_creatable(flag, path, policies, memories)
            continue
        if not os.path.isdir(parent):
            raise UsageError(f"{flag} {path}: cannot write it: directory {parent} does not exist")
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path}: cannot write it: it is a directory")
        _check_creatable(flag, path, policies, memories)
    if args.gantt is not None and os.path.splitext(args.gantt)[1].lower() not in (".png", ""):
        raise UsageError(f"--gantt {args.gantt}: the Gantt chart is a PNG (name it OUT.png)")
    if args.plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        ext = os.path.splitext(args.plot)[1].lstrip(".").lower()
        known = FigureCanvasBase.get_supported_filetypes()
        if not ext:  # matplotlib would pick PNG and write OUT.png, not OUT
            raise UsageError(f"--plot {args.plot}: name the format with an extension, e.g. {args.plot}.png")
        if ext not in known:
            raise UsageError(f"--plot {args.plot}: cannot draw .{ext} files (use .png, or one of "
                             f"{', '.join(sorted(known))})")


def _check_creatable(flag: str, path: str, policies: Sequence[str], memories: Sequence[int]) -> None:
    """Each file output ``flag`` writes can be created where it goes (a read-only file
    system, ``/proc``: the write failed after the run, naming a temporary file)."""
    for name in dict.fromkeys([path, *_output_names(flag, path, policies, memories)]):
        try:
            check_creatable(name)
        except OSError as exc:
            shown = "" if name == path else f" (it writes {name})"
            raise UsageError(f"{flag} {path}: cannot write it{shown}: cannot create a file in "
                             f"{exc.filename or os.path.dirname(output_path(name))}: "
                             f"{exc.strerror or exc}") from None


_OUTPUT_EXAMPLE = {"--json": ".json", "--plot": ".png", "--trace": ".txt", "--timeline": ".json",
                   "--gantt": ".png", "--out": ".parquet"}


def _file_key(path: str) -> Any:
    """What identifies the file ``path`` names: its device and inode when it exists, else its
    resolved path; None for an existing file that is not regular (``/dev/null``, a pipe), which
    any number of outputs may share."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _output_names(flag: str, path: str, policies: Sequence[str], memories: Sequence[int]) -> list[str]:
    """The files output ``flag`` writes for ``path``: a trace, timeline or Gantt chart is one
    file per size and policy (``out.<size>.<policy>.txt``), any other output the one file."""
    names = [path]
    if flag in ("--trace", "--timeline", "--gantt"):
        names = [_sweep_trace(path, m, policies) or path for m in memories] or [path]
        if len(policies) > 1:
            names = [experiments._trace_path(n, p, len(policies)) or n for n in names for p in policies]
    return names


def _check_distinct(args: argparse.Namespace, config: Config, given: Sequence[tuple[str, str]],
                    policies: Sequence[str], memories: Sequence[int]) -> None:
    """No two outputs write the same file, and none writes a file the run reads (the
    ``--costs`` file, the trace a replay replays): the run would destroy its own input."""
    inputs = [("--costs", args.costs)]
    if config.workload == "replay":
        inputs.append(("--workload replay:", config.options.get("file")))
    seen: dict[Any, tuple[str, str]] = {}
    for flag, path in inputs:
        if path:
            seen.setdefault(_file_key(path), (flag, path))
    for flag, path in given:
        for name in _output_names(flag, path, policies, memories):
            key = _file_key(name)
            if key is None:
                continue
            if key in seen:
                other_flag, other = seen[key]
                if (other_flag, other) in inputs:
                    shown = f"{other_flag}{other}" if other_flag.endswith(":") else f"{other_flag} {other}"
                    raise UsageError(f"{flag} {path}: would overwrite {name}, which the run reads ({shown})")
                raise UsageError(f"{flag} {path} and {other_flag} {other} would both write {name}")
            seen[key] = (flag, path)


def _sweep_trace(path: str | None, memory: int, policies: Sequence[str]) -> str | None:
    """The trace (timeline, Gantt chart) path to give :func:`pkvm.experiments.compare` at one
    sweep size, so that the files are named as :func:`pkvm.experiments.sweep` names them:
    ``out.<size>.<policy>.txt`` (compare adds the policy itself when there are several)."""
    if path is None:
        return None
    stem, ext = os.path.splitext(path)
    tag = format_size(memory) if len(policies) > 1 else f"{format_size(memory)}.{policies[0]}"
    return f"{stem}.{tag}{ext or '.txt'}"


# ---- output ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _writing(stream: IO[str]) -> Iterator[None]:
    """A failed write to a standard stream (``> /dev/full``: ENOSPC) as an OSError that says
    which stream; a reader that went away stays a BrokenPipeError (:func:`main` ends quietly)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        if exc.filename is not None:
            raise
        name = "standard error" if stream is sys.stderr else "standard output"
        raise OSError(exc.errno, f"cannot write to {name}: {exc.strerror or exc}") from None


class _Output:
    """stdout: ``rich`` with colour on a terminal; otherwise plain text at the natural width."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.console = None
        if stream.isatty():
            from rich.console import Console

            self.console = Console(file=stream, highlight=False)

    def table(self, results: Sequence[Result], layout: str) -> RenderableType:
        """The comparison table; on a terminal too narrow for either layout, the column layout
        in as many tables as it takes (``report.tables``)."""
        if self.console is None:
            return report.table(results, layout=layout)  # type: ignore[arg-type]
        tables = report.tables(results, console=self.console, layout=layout)  # type: ignore[arg-type]
        return self._group(tables)

    def sweep_tables(self, batches: Sequence[Sequence[Result]], layout: str) -> list[RenderableType]:
        """:meth:`table` for each memory size of a sweep, all in the same layout on a terminal
        (``report.sweep_tables``)."""
        if self.console is None:
            return [self.table(b, layout) for b in batches]
        return [self._group(ts) for ts in
                report.sweep_tables(batches, console=self.console, layout=layout)]  # type: ignore[arg-type]

    @staticmethod
    def _group(tables: Sequence[RenderableType]) -> RenderableType:
        from rich.console import Group

        parts: list[RenderableType] = []
        for t in tables:
            parts += ["", t] if parts else [t]  # a blank line between the tables
        return parts[0] if len(parts) == 1 else Group(*parts)

    def layout_waits_for_all(self, layout: str, batches: int) -> bool:
        """Whether a sweep's tables wait for its last size: on a terminal with ``--layout
        auto``, the layout that fits every size is known only then."""
        return self.console is not None and layout == "auto" and batches > 1

    def breakdown(self, make: Callable[..., RenderableType], result: Result) -> RenderableType:
        """``make(result)`` (``report.phase_table`` / ``op_table``), with the vCPUs folded into
        their sum and the busiest one when a column each does not fit the terminal."""
        t = make(result)
        if self.console is not None and report.width(t, self.console) > self.console.width:
            return make(result, fold=True)
        return t

    def print(self, renderable: RenderableType | str = "") -> None:
        with _writing(self._stream):
            if self.console is not None:
                from rich.text import Text

                if isinstance(renderable, str):
                    self.console.print(Text(renderable))
                else:
                    # Never cut a cell short: wider than the terminal, it is printed whole and
                    # the terminal wraps its lines.
                    need, have = report.width(renderable, self.console), self.console.width
                    if need > have:
                        self.console.width = need  # (Console.print's width= is capped at the console's)
                        try:
                            self.console.print(renderable, crop=False)
                        finally:
                            self.console.width = have
                    else:
                        self.console.print(renderable)
            elif isinstance(renderable, str):
                self._stream.write(renderable + "\n")
            else:
                self._stream.write(report.render_text(renderable))
            self._stream.flush()

    def write(self, text: str) -> None:
        """Preformatted text, as is (no wrapping, which would break its columns)."""
        with _writing(self._stream):
            self._stream.write(text if text.endswith("\n") else text + "\n")
            self._stream.flush()


def _info(args: argparse.Namespace, line: str) -> None:
    if not getattr(args, "quiet", False):
        with contextlib.suppress(OSError):  # a note on stderr; a closed stderr does not fail the run
            print(line, file=sys.stderr, flush=True)


def _header(config: Config, seed: int, what: str) -> str:
    """One line naming everything the numbers depend on."""
    wl = workloads.WORKLOADS[config.workload]
    opts = workloads.parse_options(wl, config.options)
    shown = ", ".join(f"{k}={wl.options[k].show(v)}" for k, v in opts.items())
    model = config.cost_model()
    changed = model.changed()
    costs = f"cost model {model.profile} {model.fingerprint()}"
    if changed:
        costs += f" ({len(changed)} changed: {', '.join(changed)})"
    parts = [f"pkvm {experiments.version()}", config.platform, f"{format_size(int(config.memory))} RAM",
             f"workload {config.workload}" + (f" ({shown})" if shown else ""), what, f"seed {seed}", costs]
    # the settings that change the numbers, where they are not the defaults
    dflt = experiments.Config()
    extra = [f"{config.vcpus} vCPUs"] if config.vcpus != 1 else []
    if config.host_cpus != dflt.host_cpus:
        extra.append(f"{config.host_cpus} host CPUs")
    if int(config.image) != int(dflt.image):
        extra.append(f"image {format_size(int(config.image))}")
    if config.shared_backing != dflt.shared_backing:
        extra.append(f"shared backing {config.shared_backing}")
    if not config.discard:
        extra.append("no discard")
    if config.batch_pages is not None:
        extra.append(f"batch {config.batch_pages} pages")
    if config.pagewise_locks != dflt.pagewise_locks:
        extra.append(f"pagewise locks {config.pagewise_locks}")
    parts[3:3] = extra
    return " · ".join(parts)


def _notes(out: _Output, results: Sequence[Result]) -> None:
    """What the results say they could not reproduce (e.g. a replay's untraced exits)."""
    notes = [f"note ({r.policy}): {note}" for r in results for note in r.notes]
    if notes:
        out.print()
        out.print("\n".join(notes))


@contextlib.contextmanager
def _progress(enabled: bool, labels: Sequence[str],
              prefix: str = "") -> Iterator[Callable[[str, float], None] | None]:
    """A ``rich`` progress bar on stderr with one task per label (a policy), fed by
    :func:`pkvm.experiments.compare`'s ``progress(policy, fraction)``; every run reports 1.0
    when it is done (on a Dask cluster, runs finish in any order). Yields None (no callback)
    when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    order = list(labels)
    with bar:
        tasks = {label: bar.add_task(prefix + label, total=1.0) for label in order}

        def update(label: str, fraction: float) -> None:
            bar.update(tasks[label], completed=fraction)

        yield update


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _write_outputs(args: argparse.Namespace, argv: Sequence[str], base: Config, results: Sequence[Result],
                   policies: Sequence[str], memories: Sequence[int]) -> None:
    for r in results:
        if r.config.trace is not None:
            _info(args, f"wrote trace {r.config.trace}")
        if r.config.timeline is not None:
            _info(args, f"wrote timeline {r.config.timeline} (Chrome trace-event JSON: Perfetto UI, chrome://tracing)")
        if r.config.gantt is not None:
            _info(args, f"wrote Gantt chart {r.config.gantt}")
    if args.json is not None:
        config = base.to_dict()
        if len(policies) > 1:
            config["policy"] = None  # each result's config has its own; `policies` lists them
        if memories:
            # The runs' memory is sweep_memory's, each result's config says which (and, chosen by
            # the memory, its batch); the base's default memory was never run.
            config["memory"] = None
            if "memory_text" in config:
                config["memory_text"] = None
            if config.get("batch_pages_auto"):
                config["batch_pages"] = None
        extra: dict[str, Any] = {
            "command": [_PROG, *argv], "config": config, "seed": args.seed,
            "policies": list(policies), "cost_model": base.cost_model().to_dict()}
        if memories:
            extra["sweep_memory"] = [format_size(m) for m in memories]
        _write_json(args, report.to_json(results, extra))
    if args.plot is not None:
        _atomic(args.plot, lambda tmp: report.plot(results, tmp, sweep=bool(memories)))
        _info(args, f"wrote {args.plot}")


# ---- subcommands -----------------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace, argv: Sequence[str], out: _Output) -> int:
    _check_memory_options(args)
    base = _config(args)
    policies = _policies(args, base)
    memories = _memories(args.sweep_memory, base)
    _check_outputs(args, base, policies, memories)
    _check_frame_out(args)
    sizes = memories or [int(base.memory)]
    if args.trace is not None:
        _check_trace_size(args, [base.with_(memory=m, policy=p) for m in sizes for p in policies])
    results: list[Result] = []
    held: list[tuple[Config, list[Result]]] = []  # batches whose table waits for the sweep's last
    hold = out.layout_waits_for_all(args.layout, len(sizes))
    try:
        _run_sizes(args, out, base, policies, memories, sizes, results, held if hold else None)
    finally:  # what ran is shown, also when a later size fails or is interrupted
        if held:
            shown = out.sweep_tables([b for _c, b in held], args.layout)
            for i, ((config, batch), t) in enumerate(zip(held, shown)):
                _print_batch(out, args, config, policies, batch, i, t)
    _write_outputs(args, argv, base, results, policies, memories)
    if args.out is not None:
        _atomic(args.out, lambda tmp: _write_table(experiments.to_frame(results), tmp, args.out))
        _info(args, f"wrote {args.out}")
    return 0


def _run_sizes(args: argparse.Namespace, out: _Output, base: Config, policies: Sequence[str],
               memories: Sequence[int], sizes: Sequence[int], results: list[Result],
               held: list[tuple[Config, list[Result]]] | None) -> None:
    """Run every size's policies, one size at a time; print each size's table as it comes, or
    with ``held``, keep it there for the sweep's common layout."""
    with _runner(args, runs=len(policies)) as runner:  # one size's policies at a time
        for i, mem in enumerate(sizes):
            config, prefix = base, ""
            if memories:
                config = base.with_(memory=mem, trace=_sweep_trace(base.trace, mem, policies),
                                    timeline=_sweep_trace(base.timeline, mem, policies),
                                    gantt=_sweep_trace(base.gantt, mem, policies))
                prefix = f"{format_size(mem)} "
            with _progress(_show_progress(args), policies, prefix) as cb:
                batch = experiments.compare(config, policies, args.seed, progress=cb, runner=runner)
            results.extend(batch)
            if held is not None:
                held.append((config, batch))
            else:
                _print_batch(out, args, config, policies, batch, i)


def _print_batch(out: _Output, args: argparse.Namespace, config: Config, policies: Sequence[str],
                 batch: Sequence[Result], i: int, table: RenderableType | None = None) -> None:
    if i:
        out.print()
    n = len(policies)
    out.print(_header(config, args.seed, f"{n} policies" if n > 1 else f"policy {policies[0]}"))
    out.print(out.table(batch, args.layout) if table is None else table)
    _notes(out, batch)


def _cmd_run(args: argparse.Namespace, argv: Sequence[str], out: _Output) -> int:
    config = _config(args)
    policy = str(config.policy)
    _check_outputs(args, config, [policy])
    _check_trace_size(args, [config])
    with _progress(_show_progress(args), [policy]) as cb:
        result = experiments.run(config, args.seed,
                                 progress=None if cb is None else (lambda f: cb(policy, f)))
    out.print(_header(config, args.seed, f"policy {policy}"))
    out.print(out.table([result], args.layout))
    out.print()
    out.print(out.breakdown(report.phase_table, result))
    out.print()
    out.print(out.breakdown(report.op_table, result))
    _notes(out, [result])
    _write_outputs(args, argv, config, [result], [policy], [])
    return 0


def _cmd_workloads(args: argparse.Namespace, argv: Sequence[str], out: _Output) -> int:
    wls = workloads.WORKLOADS
    shown = {name: [(f"{k}={'(required)' if o.default is None else o.show(o.default)}", o.help)
                    for k, o in wl.options.items()] for name, wl in wls.items()}
    width = max(len(n) for n in wls)
    ow = max((len(s) for opts in shown.values() for s, _ in opts), default=0)
    lines: list[str] = []
    for name, wl in wls.items():
        lines.append(f"{name:<{width}}  {wl.description}")
        lines += [f"{'':<{width}}    {s:<{ow}}  {h}" for s, h in shown[name]]
    lines.append("")
    lines.append("Set options with --option NAME=VALUE, e.g. "
                 "pkvm compare --workload swiotlb --option ops=5000.")
    out.write("\n".join(lines))
    return 0


def _cmd_policies(args: argparse.Namespace, argv: Sequence[str], out: _Output) -> int:
    names, table = preset_table()
    rows = [("knob", *names, "matters on")] + [(k, *vals, scope) for k, scope, vals in table]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines += ["", "A spec string changes knobs of a preset: PRESET+knob=value, e.g. 6.19+gmem_max_order=9."]
    out.write("\n".join(lines))
    return 0


def _cmd_costs(args: argparse.Namespace, argv: Sequence[str], out: _Output) -> int:
    _check_cost_file("--costs", args.costs)
    try:
        config = experiments.Config(platform=args.platform, costs=_once("--cost", args.cost), cost_file=args.costs)
    except (ValueError, OSError) as exc:
        flag = "--cost"
        if args.costs is not None:
            try:
                experiments.Config(platform=args.platform, cost_file=args.costs)
            except (ValueError, OSError):
                flag = f"--costs {args.costs}"
        raise UsageError(f"{flag}: {_message(exc)}") from None
    model = config.cost_model()
    if args.toml:
        out.write(model.to_toml())
        return 0
    text = format_table(model.describe(), style="markdown" if args.markdown else "text").rstrip("\n")
    if not args.markdown:
        text = f"cost model {model.profile} (host {model.host}) {model.fingerprint()}\n\n{text}"
    out.write(text)
    return 0


# ---- execution and tidy output (compare, sweep, sensitivity) ----------------------------------


def _add_execution_options(g: argparse._ArgumentGroup) -> None:
    """``--jobs`` and ``--scheduler``: where the runs execute (:mod:`pkvm.experiments.execution`)."""
    g.add_argument("-j", "--jobs", type=_positive_int, default=1, metavar="N",
                   help="run on a local Dask cluster of N worker processes (1: serially in this "
                        "process); the results are identical (default: %(default)s)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://host:8786 (its workers need "
                        "the same pkvm installed); overrides --jobs. A malformed address is a usage "
                        "error (exit 2); no scheduler answering within 5 s, a server there that is "
                        "not one, no worker joining it within 30 s, or workers running another pkvm, "
                        "Python or Dask fail the run (exit 1)")


@contextlib.contextmanager
def _runner(args: argparse.Namespace, runs: int | None = None) -> Iterator[Any]:
    """The runner of ``-j`` / ``--scheduler``. ``runs``: the most runs that go to it at once,
    when known; a local cluster gets no more worker processes than that (``-j 8`` for four
    runs started eight, four of them idle), and one run goes serially in-process."""
    if args.scheduler is not None and not args.scheduler.strip():
        raise UsageError("--scheduler needs an address like tcp://host:8786")
    if args.scheduler is None and args.jobs > max_jobs():
        raise UsageError(f"-j/--jobs {args.jobs}: at most {max_jobs()} (4 worker processes per CPU)")
    if args.jobs > 1 or args.scheduler is not None:
        # The cluster's own log lines (heartbeats, shutdown) are not pkvm's output: a run that
        # fails reaches the user as one error line (RunError), the rest is noise on stderr.
        # distributed sets some loggers' levels itself when imported (distributed.client at
        # WARNING, tornado.application at ERROR): each is silenced, not only the parent.
        import distributed  # noqa: F401 - its logging set-up, before the levels below

        for name in ("distributed", "tornado", *logging.root.manager.loggerDict):
            if name.split(".")[0] in ("distributed", "tornado"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.scheduler is not None:
        try:
            check_address(args.scheduler.strip())
        except ValueError as exc:
            raise UsageError(f"--scheduler {args.scheduler}: {_message(exc)}") from None
    jobs = args.jobs if runs is None or args.scheduler is not None else max(1, min(args.jobs, runs))
    with Runner(jobs, args.scheduler, notice=_warning) as runner:
        yield runner


def _warning(line: str) -> None:
    """One ``pkvm: warning: ...`` line on stderr (a worker of --scheduler refused during the
    runs), even with -q: it is about where the runs ran, not a note on the results."""
    with contextlib.suppress(OSError):  # a closed stderr does not fail the run
        print(f"{_PROG}: warning: {_escape(line)}", file=sys.stderr, flush=True)


def _where(runner: Runner) -> str:
    """Where ``runner`` runs, after "runs" in a header: "serially in-process", "on a local
    Dask cluster of N worker processes", "on the Dask cluster at ADDRESS"."""
    if not runner.distributed:
        return runner.describe()
    return ("on the " if runner.scheduler is not None else "on a ") + runner.describe()


def _check_frame_out(args: argparse.Namespace) -> None:
    if getattr(args, "out", None) is not None:
        try:
            check_frame_path(args.out)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _atomic(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` whole (:func:`pkvm._files.atomic_output`): a failure leaves no partial
    file (and any previous one as it was)."""
    try:
        with atomic_output(path) as tmp:
            write(tmp)
    except OSError as exc:
        if exc.filename is None:  # ENOSPC, EIO: say which file
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def _write_table(frame: Any, tmp: str, path: str) -> None:
    """``frame`` to ``tmp`` in the format ``path``'s extension names."""
    if path.lower().endswith(".parquet"):
        frame.to_parquet(tmp, engine="pyarrow", index=False)
    else:
        frame.to_csv(tmp, index=False)


def _names_stdout(path: str) -> bool:
    """Whether ``path`` is this process's standard output (``/dev/stdout``, ``/proc/self/fd/1``,
    or the file stdout is redirected to)."""
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no such file; a stdout without a descriptor
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_json(args: argparse.Namespace, data: Any) -> None:
    """Write ``data`` to ``--json``: a file (and say so), or standard output for ``-`` (the
    tables went to stderr: :func:`main`)."""
    path = args.json
    if path == "-":
        with _writing(sys.stdout):
            json.dump(data, sys.stdout, indent=2)
            sys.stdout.write("\n")
            sys.stdout.flush()
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    _atomic(path, write)
    _info(args, f"wrote {path}")


def _study_options() -> _Parser:
    """The experiment options ``sweep`` and ``sensitivity`` share (a parent parser)."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("experiment")
    g.add_argument("--platform", choices=experiments.PLATFORMS, default=None,
                   help=f"confidential-VM platform to simulate (default: {_VM_DEFAULTS['platform']})")
    g.add_argument("--memory", type=_size, default=None, metavar="SIZE",
                   help=f"guest RAM, a multiple of 2M (default: {_VM_DEFAULTS['memory']})")
    g.add_argument("--workload", default="boot", metavar="NAME",
                   help=f"what the guest and VMM do: {', '.join(workloads.WORKLOADS)} (default: %(default)s)")
    g.add_argument("-o", "--option", action="append", type=_key_value, default=[], metavar="NAME=VALUE",
                   help="a workload option, e.g. ops=5000 (repeatable)")
    g.add_argument("--policies", type=_name_list, default=None, metavar="A,B,...",
                   help="policies to run, comma-separated (default: the platform's, as for compare)")
    g.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help="random seed of every run (default: %(default)s)")
    g.add_argument("--cost", action="append", type=_key_value, default=[], metavar="OP=TIME",
                   help="override one operation's cost, e.g. rmpupdate=800ns (repeatable)")
    g.add_argument("--costs", default=None, metavar="FILE", help="cost model file (.toml or .json)")
    g.add_argument("--vcpus", type=_positive_int, default=None, metavar="N",
                   help=f"guest vCPUs, running concurrently (default: {_VM_DEFAULTS['vcpus']})")
    g.add_argument("--host-cpus", type=_positive_int, default=64, metavar="N",
                   help="host CPUs, at least --vcpus (default: %(default)s)")
    g.add_argument("--batch-pages", type=_batch_pages, default=None, metavar="N|auto",
                   help="the most 4K pages a private fault batch covers while another actor runs, a "
                        "power of two, or auto (the default: by the memory and vCPUs, docs/timeline.md)")
    g.add_argument("--pagewise-locks", default="interleaved", choices=PAGEWISE_LOCK_MODELS,
                   help="how the locks the kernel takes page by page are modelled: interleaved or batch "
                        "(docs/timeline.md; default: %(default)s)")
    g.add_argument("--shared-backing", default="thp", choices=experiments.SHARED_BACKINGS,
                   help="host memory backing shared guest pages (default: %(default)s)")
    g.add_argument("--image", type=_size, default=None, metavar="SIZE",
                   help=f"firmware image at guest address 0 (default: {_VM_DEFAULTS['image']})")
    g.add_argument("--no-discard", dest="discard", action="store_false",
                   help="the VMM keeps both backings on conversion")
    g.add_argument("--metric", default=None, metavar="NAME",
                   help="the result to study, any dotted metric name: modeled_ns, by_actor.vcpu0, "
                        "counters.rmpupdate, ... (default: critical_path_ns when runs measure it, "
                        "else modeled_ns)")
    _add_execution_options(g)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT.json", default=None,
                   help="write the results as JSON (- for standard output; the tables then go to stderr)")
    o.add_argument("--out", metavar="OUT.parquet", default=None,
                   help="write the tidy table (one row per configuration, policy and sample) as "
                        ".parquet or .csv")
    o.add_argument("--plot", metavar="OUT.png", default=None, help="draw the results to a PNG")
    o.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no list of the files written")
    p.set_defaults(trace=None, layout="auto", timeline=None, gantt=None, trace_events=None)
    return p


def _study_config(args: argparse.Namespace) -> Config:
    for key in _VM_DEFAULTS:  # options the study parsers may not define
        if not hasattr(args, key):
            setattr(args, key, None)
    return _config(args)


def _fmt_value(metric: str, v: float) -> str:
    """A metric's value in the tables of ``pkvm sweep`` and ``pkvm sensitivity``: a time in ns
    (``frames.is_time_metric``) as the comparison table prints times, to 3 significant digits
    (``pkvm._units.format_ns``: ``36.1 ms``; the cost model's ``format_ns``, up to 4 digits, is
    for prices), a count (an integer) whole with thousands separators (``16,777,216``: exact, as
    the comparison table shows it, not ``1.678e+07``), anything else to 4 significant digits."""
    if is_time_metric(metric):
        return format_time(float(v)) if v >= 0 else "-" + format_time(-float(v))
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return f"{int(v):,}"
    return f"{v:.4g}"


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    right = right or [False] * len(headers)

    def line(r: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if rt else str(c).ljust(w)
                         for c, w, rt in zip(r, widths, right)).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


@contextlib.contextmanager
def _runs_progress(args: argparse.Namespace, runs: int) -> Iterator[Callable[[str, float], None] | None]:
    """One ``rich`` progress bar on stderr counting finished runs (when stderr is a terminal)."""
    if not _show_progress(args):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)
    with prog:
        task = prog.add_task("runs", total=runs)

        def update(label: str, fraction: float) -> None:
            if fraction >= 1.0:
                prog.advance(task)

        yield update


# ---- pkvm sweep ------------------------------------------------------------------------------


def _add_sweep_parser(sub: Any) -> None:
    s = sub.add_parser(
        "sweep", parents=[_study_options()], formatter_class=argparse.HelpFormatter,
        help="run every policy at every point of a grid of configurations (tidy table, small multiples)",
        description="Run every policy at every point of a grid (the product of the --grid values), "
                    "print the metric per point and policy, and write the tidy table (--out) and "
                    "small multiples (--plot: the metric against the first varying key, one panel "
                    "per combination of the others).")
    s.add_argument("--grid", nargs="+", required=True, type=_key_value, metavar="KEY=V1,V2",
                   help="grid axes, e.g. memory=16G,64G,256G vcpus=1,8,32 workload=boot,swiotlb; keys: "
                        + ", ".join(experiments.grid_fields()))
    s.set_defaults(handler=_cmd_sweep)


def _grid_values(key: str, text: str) -> list[Any]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise UsageError(f"--grid {key}={text}: not a comma-separated list like a,b,c")
    default = {f.name: f.default for f in dataclasses.fields(experiments.Config)}.get(key)
    out: list[Any] = []
    for v in values:
        if isinstance(default, bool):
            if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"--grid {key}={text}: {v!r} is not true or false")
            out.append(v.lower() in ("true", "1", "yes"))
        elif key == "batch_pages":  # auto (None: by the memory and vCPUs) or an int
            try:
                out.append(_batch_pages(v))
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"--grid {key}={text}: {exc}") from None
        elif isinstance(default, int) and key not in ("memory", "image"):
            try:
                out.append(parse_decimal(v))
            except ValueError:
                raise UsageError(f"--grid {key}={text}: {v!r} is not an integer in decimal digits") from None
        else:
            out.append(v)
    return out


def _cmd_sweep(args: argparse.Namespace, argv: Sequence[str], out: _Output) -> int:
    base = _study_config(args)
    grid: dict[str, list[Any]] = {}
    for key, text in args.grid:
        if key in grid:
            raise UsageError(f"--grid gives {key} twice")
        if key not in experiments.grid_fields():
            raise UsageError(f"--grid {key}={text}: {key!r} is not one of {', '.join(experiments.grid_fields())}")
        grid[key] = _grid_values(key, text)
    try:
        points = experiments.grid_configs(base, grid)
    except ValueError as exc:
        raise UsageError(f"--grid: {_message(exc)}") from None
    for pt in points:
        _policies(args, pt)
    if args.metric is not None:
        try:  # a name no run measures is refused before the runs
            args.metric = experiments.metric_name(args.metric)
        except ValueError as exc:
            raise UsageError(f"--metric {args.metric}: {_message(exc).partition(' is ')[2]}") from None
    _check_replay_grid(dict(args.grid), points)
    _check_outputs(args, base)
    _check_frame_out(args)
    runs = sum(len(args.policies or experiments.PLATFORM_POLICIES[pt.platform]) for pt in points)
    with _runner(args, runs=runs) as runner, _runs_progress(args, runs) as cb:
        results = experiments.sweep_grid(base, grid, args.policies, args.seed, runner=runner, progress=cb)
    frame = experiments.to_frame(results)
    metric = args.metric if args.metric is not None else (
        "critical_path_ns" if "critical_path_ns" in frame.columns else "modeled_ns")
    if metric not in frame.columns:
        close = difflib.get_close_matches(metric, list(frame.columns), n=3, cutoff=0.6)
        raise UsageError(f"--metric {metric}: not measured by these runs"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    measured = {k for r in results for k in r.metrics()}
    if frame[metric].dtype.kind not in "iuf" or metric not in measured:  # seed, vcpus: the configuration's
        raise UsageError(f"--metric {metric}: a column of the configuration, not a number the runs "
                         "measured (e.g. modeled_ns, by_actor.vcpu0, counters.rmpupdate)")
    keys = list(grid)
    shown = frame
    if "batch_pages" in keys and frame["batch_pages_auto"].any():
        # auto's size beside a given one (batch_pages=512,auto) would read as the same point twice
        shown = frame.copy()
        shown["batch_pages"] = [f"auto ({n})" if auto else str(n)
                                for n, auto in zip(frame["batch_pages"], frame["batch_pages_auto"])]
    rows = [[format_size(int(r[k])) if k in ("memory", "image") else str(r[k]) for k in keys]
            + [r["policy"], _fmt_value(metric, r[metric])] for r in shown.to_dict(orient="records")]
    grid_points = f"{len(points)} grid point" + ("s" if len(points) != 1 else "")
    n = len(results) // max(len(points), 1)
    if n * len(points) == len(results) and len({r.policy for r in results}) == n:  # the same policies at each
        grid_points += f" × {n} polic" + ("ies" if n != 1 else "y")
    else:  # a platform in the grid: each point runs its platform's policies
        grid_points += f" × their policies ({len(results)} runs)"
    out.print(f"pkvm {experiments.version()} · sweep of {grid_points} · "
              f"{base.workload if 'workload' not in grid else 'workloads'} · seed {args.seed} · "
              f"metric {metric} · runs {_where(runner)}")
    # a time's cells carry their unit (210 ms): the column drops the name's "_ns"
    col = metric[:-3] if is_time_metric(metric) and metric.endswith("_ns") else metric
    out.write(_text_table([*keys, "policy", col], rows, [False] * (len(keys) + 1) + [True]))
    if args.json is not None:
        _write_json(args, report.to_json(results, {"command": [_PROG, *argv], "grid": {
            k: [str(v) for v in vs] for k, vs in grid.items()}, "metric": metric, "seed": args.seed,
            "policies": list(args.policies) if args.policies else None,
            "cost_model": base.cost_model().to_dict()}))
    if args.out is not None:
        _atomic(args.out, lambda tmp: _write_table(frame, tmp, args.out))
        _info(args, f"wrote {args.out}")
    if args.plot is not None:
        _atomic(args.plot, lambda tmp: plot_grid(shown, keys, metric, tmp))
        _info(args, f"wrote {args.plot}")
    return 0


# ---- pkvm sensitivity ------------------------------------------------------------------------


def _add_sensitivity_parser(sub: Any) -> None:
    s = sub.add_parser(
        "sensitivity", parents=[_study_options()], formatter_class=argparse.HelpFormatter,
        help="which conclusions survive the cost model's price ranges (Sobol'/Morris with SALib)",
        description="Sample the cost model over each price's documented range, run every policy on "
                    "each sample and report the metric's distribution per policy, how often each "
                    "policy beats each other one, and Sobol' indices (or Morris effects) of each "
                    "price. Summed metrics (modeled_ns, by_actor.*, by_op.*) are re-priced exactly "
                    "from operation counts; any other metric is simulated per sample. See "
                    "docs/sensitivity.md.")
    a = s.add_argument_group("analysis")
    a.add_argument("--method", choices=METHODS, default="sobol",
                   help="sobol: first-order and total indices with confidence intervals, "
                        "N x (groups + 2) evaluations; morris: a cheap screen, N x (groups + 1) "
                        "(default: %(default)s)")
    a.add_argument("--samples", type=_positive_int, default=1024, metavar="N",
                   help="SALib's N: base samples (sobol; best a power of 2) or trajectories (morris), "
                        "at most 2**20 (default: %(default)s)")
    a.add_argument("--range", dest="ranges", action="append", type=_key_value, default=[],
                   metavar="PRICE=LOW..HIGH",
                   help="replace a price's range, e.g. rmpupdate=200ns..5us or "
                        "directmap_tlb_flush.slope=100ns..2us (repeatable)")
    a.add_argument("--vary", type=_name_list, default=None, metavar="PRICE,...",
                   help="vary only these prices (default: every price the runs charge that has a range)")
    a.add_argument("--dist", choices=DISTRIBUTIONS, default="auto",
                   help="how prices are sampled on their range; auto: log-uniform when high/low > 10, "
                        "else uniform (default: %(default)s)")
    a.add_argument("--evaluation", choices=("auto", "reprice", "simulate"), default="auto",
                   help="auto: re-price exactly when the metric is a sum of counts times prices, else "
                        "simulate every sample; reprice: refuse otherwise (default: %(default)s)")
    s.set_defaults(handler=_cmd_sensitivity)


def _cmd_sensitivity(args: argparse.Namespace, argv: Sequence[str], out: _Output) -> int:
    base = _study_config(args)
    policies = _policies(args, base)
    ranges: dict[str, str] = {}
    for name, text in args.ranges:
        if name in ranges:
            raise UsageError(f"--range gives {name} twice")
        ranges[name] = text
    try:
        space = price_space(base.cost_model(), (), ranges=ranges, vary=args.vary, dist=args.dist)
    except ValueError as exc:
        flag = "--range" if any(n in str(exc) for n in ranges) or "range" in str(exc) else "--vary"
        raise UsageError(f"{flag}: {_message(exc)}") from None
    if args.vary is not None and not space:  # the runs would find nothing to sample (exit 1)
        raise UsageError(f"--vary {','.join(args.vary)}: no price named has a range to sample (each has a "
                         "single value); give one with --range PRICE=LOW..HIGH")
    if args.method == "morris" and args.samples < 2:
        raise UsageError(f"--samples {args.samples}: morris needs at least 2 trajectories")
    if args.samples > MAX_SAMPLES:
        raise UsageError(f"--samples {args.samples}: at most {MAX_SAMPLES} (2**20); the sample matrices "
                         "of more would not fit in memory")
    _check_outputs(args, base)
    _check_frame_out(args)
    try:
        with _runner(args) as runner, _progress(_show_progress(args), policies) as cb:
            res = experiments.sensitivity(
                base, policies, metric=args.metric, method=args.method, samples=args.samples, seed=args.seed,
                ranges=ranges, vary=args.vary, dist=args.dist, evaluation=args.evaluation, runner=runner,
                progress=cb,
                keep_metrics=args.out is not None)
            where = _where(runner)
    except UnknownMetricError as exc:
        raise UsageError(f"--metric: {_message(exc)}") from None
    except ValueError as exc:
        if args.evaluation == "reprice" and "cannot be re-priced" in str(exc):
            raise UsageError(f"--evaluation reprice: {_message(exc)}") from None
        raise
    _print_sensitivity(out, res, base, where)
    if args.json is not None:
        _write_json(args, {"pkvm_version": experiments.version(), "command": [_PROG, *argv], **res.to_dict()})
    if args.out is not None:
        _atomic(args.out, lambda tmp: _write_table(res.to_frame(), tmp, args.out))
        _info(args, f"wrote {args.out}")
    if args.plot is not None:
        _atomic(args.plot, lambda tmp: plot(res, tmp))
        _info(args, f"wrote {args.plot}")
    return 0


def _all_zero(idx: Any, output: str) -> bool:
    sub = idx[idx["output"] == output].drop(columns=["output", "price"])
    return bool((sub.to_numpy(dtype=float) == 0).all())


def _print_sensitivity(out: _Output, res: Any, base: Config, where: str) -> None:
    m = res.metric
    n_eval = len(res.values)
    out.print(_header(base, res.seed, f"{len(res.policies)} policies"))
    how = ("re-priced (exact: a sum of operation counts times prices)" if res.evaluation == "re-priced"
           else "simulated per sample")
    out.print(f"metric {m} · {res.method}, N={res.base_samples} ({n_eval:,} cost samples per policy) · "
              f"{how} · runs {where}")
    out.print()
    # a price's range and model value are prices: the cost model's format (up to 4 digits, as
    # docs/costs.md and `pkvm costs` give them); the metric's times below are _fmt_value's (3)
    rows = [[p.name, p.group, f"{format_ns(p.low)}..{format_ns(p.high)}", p.dist, p.confidence,
             format_ns(p.nominal)] for p in res.prices]
    out.write("prices sampled\n" + _text_table(["price", "moves with", "range", "distribution", "conf", "model"],
                                               rows))
    out.print()
    summ = res.summary()
    rows = [[r["policy"]] + [_fmt_value(m, r[k]) for k in ("nominal", "mean", "p5", "p50", "p95")]
            for r in summ.to_dict(orient="records")]
    out.write(f"{m} per policy\n" + _text_table(["policy", "model's prices", "mean", "p5", "p50", "p95"], rows,
                                                [False] + [True] * 5))
    if len(res.policies) > 1:
        out.print()
        rk = res.ranking()
        cells = {(r["a"], r["b"]): r for r in rk.to_dict(orient="records")}
        rows = [[a] + ["—" if a == b else f"{cells[(a, b)]['a_beats_b']:.1%}" for b in res.policies]
                for a in res.policies]
        out.write(f"ranking: fraction of samples in which the row's {m} is lower than the column's\n"
                  + _text_table(["", *res.policies], rows, [False] + [True] * len(res.policies)))
    out.print()
    idx = res.indices
    fmt: Callable[[dict[str, Any]], str]
    if res.method == "sobol":
        head = "Sobol' indices: total ST (first-order S1), ± half the 95% confidence interval"
        fmt = (lambda r: f"{r['ST']:.2f}±{r['ST_conf']:.2f} ({r['S1']:.2f})")
    else:
        head = "Morris: mean absolute elementary effect mu* ± 95% confidence"
        fmt = (lambda r: f"{_fmt_value(m, r['mu_star'])}±{_fmt_value(m, r['mu_star_conf'])}")
    outputs = [o for o in dict.fromkeys(idx["output"]) if o in res.policies or not _all_zero(idx, o)]
    by = {(r["output"], r["price"]): r for r in idx.to_dict(orient="records")}
    pols = [o for o in outputs if o in res.policies]
    pairs = [o for o in outputs if o not in res.policies]
    for caption, group in ((f"{head}\nof each policy's {m}", pols),
                           (f"of the difference of two policies' {m} (what decides which is faster)", pairs)):
        for chunk_start in range(0, len(group), 4):
            chunk = group[chunk_start:chunk_start + 4]
            rows = [[g] + [fmt(by[(o, g)]) for o in chunk] for g in res.groups]
            if chunk_start == 0 and group is pairs:
                out.print()
            out.write((caption + "\n" if chunk_start == 0 else "") + _text_table(["price", *chunk], rows,
                                                                                [False] + [True] * len(chunk)))
    if res.notes:
        out.print()
        out.print("\n".join(f"note: {n}" for n in res.notes))


# ---- entry point -----------------------------------------------------------------------------


#: Config's fields that a message may start with, and the option that sets each.
_FIELD_OPTIONS = {"memory": "--memory", "image": "--image", "vcpus": "--vcpus", "host_cpus": "--host-cpus",
                  "batch_pages": "--batch-pages", "pagewise_locks": "--pagewise-locks",
                  "shared_backing": "--shared-backing", "platform": "--platform"}


def _as_option(message: str) -> str:
    """A :class:`pkvm.experiments.Config` message that starts with a field's name, worded with
    the option's: "host_cpus 99999 must be ..." is "--host-cpus 99999 must be ...", and a field
    with an underscore named further on is the option too."""
    field, sep, rest = message.partition(" ")
    option = _FIELD_OPTIONS.get(field)
    if option is None or not sep:
        return message
    # a field named further on, if it cannot be a plain word ("... exceed host_cpus 64")
    for name, opt in _FIELD_OPTIONS.items():
        if "_" in name:
            rest = re.sub(rf"\b{name}\b", opt, rest)
    return f"{option} {rest}"


def _message(exc: BaseException) -> str:
    """One line: the exception's text with newlines folded."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split("\n"))


def _escape(text: str) -> str:
    """``text`` with every character that is not printable (control characters, line and
    paragraph separators, lone surrogates, unassigned code points) shown as its Python
    escape, so that a message is one line of printable text whatever the user typed."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _fail(message: str) -> None:
    # stderr closed (2>&-) or full: the exit status is all that can say it
    with contextlib.suppress(OSError):
        print(f"{_PROG}: error: {_escape(message)}", file=sys.stderr, flush=True)


def _value_options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(option strings that take a value, every option string) of ``parser`` and its subcommands."""
    takes: set[str] = set()
    known: set[str] = set()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            known.update(action.option_strings)
            if action.option_strings and action.nargs is None and action.const is None \
                    and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                takes.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return takes, known


def _join_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--memory -4G`` as ``--memory=-4G``: argparse takes a value that starts with ``-`` for
    an option and reports "expected one argument"; joined, the option's own check names it."""
    takes, known = _value_options(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a in takes and nxt is not None and nxt.startswith("-") and nxt.split("=")[0] not in known:
            out.append(f"{a}={nxt}" if a.startswith("--") else a + nxt)
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pkvm`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit
    status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("PKVM_DEBUG", "") not in ("", "0")
    if sys.stderr is None:  # started with stderr closed (2>&-): errors go nowhere, the status says it
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - for the process's life
    if sys.stdout is None:  # >&-: the tables (and --help) have nowhere to go
        _fail("cannot write to standard output: it is closed")
        return 1
    try:
        _launch.release()  # a Ctrl-C from here on is the KeyboardInterrupt below
        for i, a in enumerate(argv):  # no C string holds one: open() failed on it after the run
            if not isinstance(a, str) or "\0" in a:
                raise UsageError(f"argument {i + 1}, {a!r}, " + ("contains a NUL byte, which no value or file name "
                                 "can hold" if isinstance(a, str) else f"is of type {type(a).__name__}, not a str"))
        parser = build_parser()
        try:
            args = parser.parse_args(_join_dash_values(parser, argv))
        except SystemExit as exc:  # --help and --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            raise UsageError("no command given; commands: compare, run, sweep, sensitivity, workloads, policies, costs "
                             "(see 'pkvm --help')")
        if getattr(args, "json", None) not in (None, "-") and _names_stdout(args.json):
            args.json = "-"  # --json /dev/stdout: the tables would have gone into the JSON
        # ``--json -``: the JSON document is standard output, so the tables go to stderr
        out = _Output(sys.stderr if getattr(args, "json", None) == "-" else sys.stdout)
        return int(args.handler(args, argv, out))
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except BrokenPipeError:
        # The reader went away (``pkvm compare | head``): stop quietly, and keep Python's
        # final flush of stdout from failing again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ValueError, OSError, PkvmError) as exc:
        if debug:
            raise
        mismatch = exc if isinstance(exc, TracePlatformError) else exc.__cause__
        if isinstance(mismatch, TracePlatformError):  # the command line's words, not Config's
            known = mismatch.recorded in experiments.PLATFORMS
            exc = TracePlatformError(
                f"--workload replay:{mismatch.path}", mismatch.recorded, mismatch.platform,
                f"a replay runs on the platform its trace recorded, {mismatch.recorded}" if known else
                f"--platform is one of {', '.join(experiments.PLATFORMS)}")
        _fail(_message(exc))
        # a configuration the run found it cannot build is the user's (also from a cluster,
        # where RunError carries it as the cause)
        return 2 if isinstance(exc, ConfigError) or isinstance(exc.__cause__, ConfigError) else 1
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            print(f"{_PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # a bug in pkvm: one line, the traceback with PKVM_DEBUG=1
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {_message(exc)} (a bug in pkvm; run with PKVM_DEBUG=1 "
              "for the traceback and report it)")
        return 1
