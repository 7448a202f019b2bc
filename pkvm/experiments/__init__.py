"""Experiments: run a workload on one configuration and get a self-describing result.

:func:`run` is pure: the same ``(config, seed)`` gives the same :class:`Result` (every counter
and modeled nanosecond; only the simulator's own wall time differs), it touches no global
state, and both the config and the result pickle, so sweeps can farm runs out to processes::

    >>> from pkvm import experiments
    >>> cfg = experiments.Config(platform="snp", memory="64M", workload="boot")
    >>> r = experiments.run(cfg, seed=1)
    >>> r.counters["pf_taken"] > 0, r.modeled_ns == sum(r.by_actor.values())
    (True, True)
    >>> [p.name for p in r.phases]
    ['launch', 'accept']

:func:`compare` runs one config under several policies; :func:`sweep` over memory sizes;
:func:`sweep_grid` over any grid of configuration fields; :func:`sensitivity` over the cost
model's price ranges. They all hand their runs to :mod:`pkvm.experiments.execution` (serial, or a Dask
cluster, with identical results). :meth:`Result.metrics` names every number a run measured,
and :func:`to_frame` tabulates results one row per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata as _metadata
from pathlib import Path
from typing import IO, Any, cast

from pkvm._files import _writes_through, atomic_output
from pkvm._units import format_size, parse_size
from pkvm.actors.guest import Guest
from pkvm.actors.vmm import Vmm, check_ram_fits
from pkvm.cost.model import CostModel
from pkvm.errors import KvmError, TracePlatformError
from pkvm.experiments import workloads as _workloads
from pkvm.experiments.execution import Runner
from pkvm.experiments.frames import config_columns, results_frame
from pkvm.experiments.uncertainty import Ledger, SensitivityResult, Simulation, UnknownMetricError, analyse, list_arg
from pkvm.experiments.replay import GUEST_ONLY_COUNTERS, trailer_prices
from pkvm.experiments.trace import Tracer, check_trace_events
from pkvm.experiments.workloads import PhaseRecord
from pkvm.kvm.policy import Policy, platform_mismatch, resolve_policy
from pkvm.kvm.vm import VM
from pkvm.sim import Timeline
from pkvm.sim.timeline import PAGEWISE_LOCK_MODELS, auto_batch_pages, check_batch_pages, check_pagewise_locks
from pkvm.sim.chrome import write_chrome_trace
from pkvm.sim.gantt import plot_gantt
from pkvm.sim.recorder import Recorder

__all__ = ["Config", "Result", "run", "run_many", "compare", "sweep", "sweep_grid", "grid_configs",
           "grid_fields", "to_frame", "sensitivity", "count_run", "run_metrics", "describe", "version",
           "DEFAULT_POLICIES", "PLATFORM_POLICIES", "PLATFORMS", "SHARED_BACKINGS", "platform_policies",
           "trace_size", "metric_name", "METRIC_ALIASES"]

#: The policies ``pkvm compare`` runs when none are given, per platform.
PLATFORM_POLICIES: Mapping[str, tuple[str, ...]] = {
    "snp": ("fault-time", "eager-post", "eager-locked", "eager-split"),
    "tdx": ("6.16", "6.19"),
    "sw_protected": ("6.8", "6.11", "6.16", "6.19"),
    "default": ("6.19",),
}
DEFAULT_POLICIES = PLATFORM_POLICIES["snp"]
#: Platforms an experiment runs on (the VM types with private memory).
PLATFORMS = ("snp", "tdx", "sw_protected")
#: How the VMM backs shared memory (``pkvm.VM(shared_backing=...)``).
SHARED_BACKINGS = ("4k", "thp", "hugetlb-2m", "hugetlb-1g")
_MIN_MEMORY = 8 << 20


def version() -> str:
    """The installed pkvm's version (``"0+unknown"`` from a source tree without metadata)."""
    try:
        return _metadata.version("pkvm")
    except Exception:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


@dataclass(frozen=True)
class Config:
    """One experiment: platform, guest memory, workload (+ options), policy, costs.

    ``memory`` accepts a size string (``"64G"``) and is stored in bytes. ``options`` are the
    workload's (``{"accept": "4K"}``); ``costs`` single-operation overrides (``{"rmpupdate":
    "800ns"}``), applied over ``cost_file`` (a TOML or JSON cost model) or the platform's
    default model. ``policy`` is a preset or spec string (default: the current upstream kernel,
    ``fault-time`` on snp and ``6.19`` elsewhere). ``vcpus`` guest vCPUs run concurrently on the timeline (``docs/timeline.md``),
    on a host of ``host_cpus`` CPUs (interrupted by kernel TLB flushes; it also prices SNP's
    direct-map flush); ``batch_pages`` is the most pages a private fault batch covers while
    another actor runs (a power of two; see :class:`pkvm.sim.Timeline`), or None (the
    default) for :func:`pkvm.sim.timeline.auto_batch_pages` of the memory and vCPUs: 512
    pages where the simulation can afford it (up to 64 GiB with 32 vCPUs, 16 GiB with 64), else
    16384 (``batch_pages_used`` is the number, and what results report);
    ``pagewise_locks`` how the locks the kernel takes page by page (``cpa_lock``, the TDX
    S-EPT, ``mmu_lock`` for read in each fault) are modelled on the timeline, one of :data:`pkvm.sim.timeline.PAGEWISE_LOCK_MODELS`
    (``"interleaved"`` by default, or ``"batch"``: docs/timeline.md).
    ``discard=False`` makes the VMM keep both backings on conversion (see
    :class:`pkvm.Vmm`). ``trace`` is a path to write the kernel-format trace to (see
    :mod:`pkvm.experiments.trace`), or None; ``timeline`` a path for the Chrome trace-event JSON of the
    timeline and ``gantt`` one for its per-actor Gantt chart (PNG), or None; ``trace_events``
    the tracepoints the trace writes (names of :data:`pkvm.experiments.trace.TRACE_EVENTS`, or a
    comma-separated str of them; None: all).

    Raises (on construction):
        ValueError: any field out of range, with the field's name in the message.
        OSError: ``cost_file`` cannot be read (missing, a directory, no permission).
    """

    platform: str = "snp"
    memory: int | str = 64 << 30
    workload: str = "boot"
    options: Mapping[str, Any] = field(default_factory=dict)
    policy: str | None = None
    costs: Mapping[str, Any] = field(default_factory=dict)
    cost_file: str | None = None
    vcpus: int = 1
    shared_backing: str = "thp"
    discard: bool = True
    image: int | str = 2 << 20
    trace: str | None = None
    host_cpus: int = 64
    batch_pages: int | None = None
    pagewise_locks: str = "interleaved"
    timeline: str | None = None
    gantt: str | None = None
    trace_events: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform {self.platform!r} is not one of {', '.join(PLATFORMS)}")
        if not isinstance(self.workload, str):
            raise ValueError(f"workload {self.workload!r} must be a workload name (a str such as 'boot' or "
                             "'replay:FILE')")
        for name in ("options", "costs"):
            if not isinstance(getattr(self, name), Mapping):
                example = "{'ops': '5000'}" if name == "options" else "{'rmpupdate': '800ns'}"
                raise ValueError(f"{name} {getattr(self, name)!r} must be a mapping like {example}")
        mem = parse_size(self.memory)
        if mem < _MIN_MEMORY or mem & ((2 << 20) - 1):
            raise ValueError(f"memory {self.memory!r} must be a multiple of 2M, at least {format_size(_MIN_MEMORY)}")
        try:
            check_ram_fits(self.platform, mem)  # the q35 layout's end vs the guest physical address width
        except ValueError as exc:
            raise ValueError(f"memory {self.memory!r}: {exc}") from None
        object.__setattr__(self, "memory", mem)
        image = parse_size(self.image)
        if image & 0xFFF or image >= mem:
            raise ValueError(f"image {self.image!r} must be 4K aligned and smaller than memory")
        low_end = _workloads.ram_ranges(mem)[0][1]
        if image > low_end:  # the image is gpa [0, image): past low_end it would lie in the PCI hole
            raise ValueError(f"image {self.image!r} must fit in the RAM below the PCI hole: {format_size(mem)} of RAM "
                             f"has {format_size(low_end)} there on QEMU's q35 layout")
        object.__setattr__(self, "image", image)
        wl = _workloads.get(self.workload)
        opts = dict(self.options)
        parsed = _workloads.parse_options(wl, opts)  # validates; raw values are kept for display
        missing = [k for k, v in parsed.items() if v is None]
        if missing:
            raise ValueError(f"workload {self.workload!r} needs option {missing[0]!r} "
                             f"({wl.options[missing[0]].help})")
        _workloads.check_platform(self.workload, self.platform, parsed)
        _workloads.check_scale(self.workload, mem, image, parsed)
        object.__setattr__(self, "options", opts)
        object.__setattr__(self, "costs", dict(self.costs))
        try:
            object.__setattr__(self, "trace_events", check_trace_events(self.trace_events, "trace_events"))
        except TypeError as exc:  # a bad field is a ValueError here, as the docstring says
            raise ValueError(str(exc)) from None
        if type(self.vcpus) is not int or not 1 <= self.vcpus <= 1024:
            raise ValueError(f"vcpus {self.vcpus!r} must be an int in [1, 1024]")
        if type(self.host_cpus) is not int or not 1 <= self.host_cpus <= 8192:
            raise ValueError(f"host_cpus {self.host_cpus!r} must be an int in [1, 8192]")
        if self.batch_pages is not None:
            check_batch_pages(self.batch_pages, "batch_pages")
        check_pagewise_locks(self.pagewise_locks, "pagewise_locks")
        if self.vcpus > self.host_cpus:
            raise ValueError(f"vcpus {self.vcpus} exceed host_cpus {self.host_cpus}: the timeline runs each "
                             "vCPU thread on a host CPU of its own (give host_cpus >= vcpus)")
        if type(self.discard) is not bool:
            raise ValueError(f"discard {self.discard!r} must be a bool")
        for name in ("cost_file", "trace", "timeline", "gantt"):
            path = getattr(self, name)
            if path is not None and (not isinstance(path, (str, os.PathLike)) or not os.fspath(path)):
                # an int would be taken for a file descriptor by open(), a bytes path by nothing
                raise ValueError(f"{name} {path!r} must be None or a file name (a non-empty str or path)")
        if self.shared_backing not in SHARED_BACKINGS:
            raise ValueError(f"shared_backing {self.shared_backing!r} is not one of {', '.join(SHARED_BACKINGS)}")
        if self.policy is None:  # the current upstream kernel, under the name SNP users know
            object.__setattr__(self, "policy", "fault-time" if self.platform == "snp" else "6.19")
        _check_policy(self.platform, self.policy)
        if self.platform == "snp" and resolve_policy(str(self.policy)).gmem_max_order and image % (2 << 20):
            # LAUNCH_UPDATE populates whole folios: a 2M folio only partly in the image is refused.
            raise ValueError(f"image {format_size(image)} must be a multiple of 2M under policy {self.policy!r}: its "
                             "2M guest_memfd folios are launched whole")
        if self.platform == "tdx" and resolve_policy(str(self.policy)).gmem_max_order and image > 4096:
            # KVM_TDX_INIT_MEM_REGION would add a large folio's first page and refuse the next (EEXIST)
            raise ValueError(f"image {format_size(image)} must be 4K under policy {self.policy!r}: the TD build adds "
                             "only the first page of a large guest_memfd folio (docs/tdx.md, \"Why tdx-huge-pages "
                             "is not among the default TDX policies\")")
        self.cost_model()  # validates overrides and the file

    def cost_model(self) -> CostModel:
        """The cost model this config runs with.

        Raises:
            ValueError: the cost file is not a cost model (its messages name the file).
            OSError: the cost file cannot be read.
        """
        model = CostModel.default(self.platform)
        if self.cost_file is not None:
            path = os.fspath(self.cost_file)

            def load(base: CostModel | None) -> CostModel:
                if path.lower().endswith(".json"):  # MODEL.JSON too
                    return _json_cost_model(path, base)
                return CostModel.from_toml(Path(path), base=base)

            try:
                model = load(model)
            except ValueError as exc:
                # A file written for another platform (pkvm costs --platform tdx --toml): say
                # which platform it is for, in the options' words.
                try:
                    own = load(None).profile
                except (ValueError, OSError):
                    raise exc from None
                if own == self.platform or own not in PLATFORMS:
                    raise
                raise ValueError(f"{exc} (it is a {own} cost model: run it on platform {own}, "
                                 f"Config(platform={own!r}), --platform {own})") from None
        if self.costs:
            model = model.with_overrides(self.costs)
        return model

    @property
    def batch_pages_used(self) -> int:
        """``batch_pages``, or for None the size chosen by the memory and vCPUs
        (:func:`pkvm.sim.timeline.auto_batch_pages`)."""
        return auto_batch_pages(int(self.memory), self.vcpus) if self.batch_pages is None else self.batch_pages

    def with_(self, **changes: Any) -> Config:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory_text"] = format_size(self.memory)  # type: ignore[arg-type]
        d["batch_pages"] = self.batch_pages_used  # the size the run used, chosen or given
        d["batch_pages_auto"] = self.batch_pages is None
        return d


class _DuplicateKey(Exception):
    """A JSON object with a key twice (``json`` keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _json_cost_model(path: str, base: CostModel | None) -> CostModel:
    """The cost model of the JSON file at ``path`` over ``base``; every error names the file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ValueError(f"cost model JSON {path}: the file is not UTF-8 text") from None
    except _DuplicateKey as exc:
        raise ValueError(f"bad cost model JSON in {path}: the key {exc.args[0]!r} appears twice in one object "
                         "(a TOML file refuses that too)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad cost model JSON in {path}: {exc}") from None
    except RecursionError:
        raise ValueError(f"bad cost model JSON in {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"cost model JSON {path} holds a {type(data).__name__}, not an object "
                         "like {\"overrides\": {\"rmpupdate\": \"800ns\"}}")
    try:
        return CostModel.from_dict(data, base=base)
    except ValueError as exc:
        raise ValueError(f"cost model JSON {path}: {exc}") from None


def _check_policy(platform: str, policy: object) -> None:
    """ValueError unless ``policy`` (a spec string) names a policy that ``platform`` runs and
    distinguishes from 6.19; the message lists the presets that platform runs."""
    if not isinstance(policy, str):
        raise ValueError(f"policy {policy!r} must be a preset name or spec string like '6.19+gmem_max_order=9'")
    try:  # KVM_CREATE_VM: an unknown preset is a ValueError; a platform refusing it, EINVAL
        VM(platform, policy=policy)
        why = platform_mismatch(policy, platform)
    except KvmError as exc:
        why = (exc.strerror or str(exc)).split("; use ")[0]
    if why is not None:
        article = "an" if platform == "snp" else "a"
        raise ValueError(f"policy {policy!r} cannot run on {article} {platform} VM ({why}); {platform} policies: "
                         f"{', '.join(platform_policies(platform))}")


def platform_policies(platform: str) -> tuple[str, ...]:
    """The policy presets ``platform`` runs and tells apart from 6.19 by name, in preset order."""
    out = []
    for name in Policy.presets():
        if platform_mismatch(name, platform) is not None:
            continue
        try:
            VM(platform, policy=name)
        except KvmError:
            continue
        out.append(name)
    return tuple(out)


@dataclass(frozen=True)
class Result:
    """Everything one run measured; plain data (pickles, and :meth:`to_dict` is JSON-able).

    ``counters``: ``vm.stats`` plus ``conversions`` (``KVM_SET_MEMORY_ATTRIBUTES`` calls),
    ``gfns_converted`` (per-gfn attribute stores), ``vmm_conversions``, ``gfns_accessed``;
    ``modeled_ns`` with ``by_actor`` / ``by_op`` / ``by_actor_op`` breakdowns (ns);
    ``directmap`` (SNP: ``fragmented_fraction``, a float, and ``fragmented_pages``, an int); ``phases``;
    ``wall_s`` (the simulator's own time); ``cost_model`` (the full model, as a dict) and its
    ``cost_fingerprint``; ``notes`` (e.g. what a replay could not reproduce).

    The concurrent timeline's figures (``docs/timeline.md``): ``critical_path_ns`` (when the
    workload's last actor finished: the guest's boot time); ``actors`` (per thread ``busy_ns``,
    ``wait_ns`` (``lock_wait_ns`` + ``ipi_ns`` + ``spin_ns``), ``idle_ns``, adding up to the
    critical path; the busy times add up to ``modeled_ns``, the CPU time); ``locks`` (per lock
    ``hold_ns``, ``wait_ns``, ``waits``, ``acquisitions``, ``wait_p50_ns``, ``wait_p99_ns``,
    ``wait_max_ns``, and for ``mmu_lock`` ``hold_write_ns`` and ``hold_read_ns``); ``latency_ns`` (per kind ``fault``,
    ``attr_ioctl``, ``conversion``, ``exit``: ``count``, ``p50``, ``p99``, ``max``); ``races``
    (``rmp_npf_loop`` faults that hit the eager-post window and ``rmp_npf_loop_ns`` they looped,
    ``pf_retry`` / ``pf_retry_ns``, ``tdx_busy_retry``, ``rmp_inuse_retry``).
    """

    config: Config
    seed: int
    version: str
    counters: dict[str, int]
    modeled_ns: int
    by_actor: dict[str, int]
    by_op: dict[str, int]
    by_actor_op: dict[str, dict[str, int]]
    directmap: dict[str, float | int]
    phases: tuple[PhaseRecord, ...]
    wall_s: float
    cost_model: dict[str, Any]
    cost_fingerprint: str
    notes: tuple[str, ...] = ()
    critical_path_ns: int = 0
    actors: dict[str, dict[str, int]] = field(default_factory=dict)
    locks: dict[str, dict[str, int]] = field(default_factory=dict)
    latency_ns: dict[str, dict[str, int]] = field(default_factory=dict)
    races: dict[str, int] = field(default_factory=dict)

    @property
    def policy(self) -> str:
        return str(self.config.policy)

    @property
    def gfns_per_s(self) -> float:
        """GFNs the simulator processed (converted + accepted/touched) per wall second."""
        n = self.counters.get("gfns_converted", 0) + self.counters.get("gfns_accessed", 0)
        return n / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def vcpu_stall_ns(self) -> int:
        """The vCPUs' summed stall on the timeline: time blocked on a lock, an IPI or a retry."""
        return sum(v["wait_ns"] for a, v in self.actors.items() if a.startswith("vcpu"))

    def row(self) -> dict[str, Any]:
        """The comparison-table row: the headline counters, in table order."""
        c = self.counters
        seamcalls = sum(v for k, v in c.items() if k.startswith("seamcall_") and k != "seamcall_busy")
        row: dict[str, Any] = {
            "policy": self.config.policy,
            "critical_path_ns": self.critical_path_ns,
            "vcpu_stall_ns": self.vcpu_stall_ns,
            "fault_p99_ns": self.latency_ns.get("fault", {}).get("p99", 0),
            "conversions": c.get("conversions", 0),
            "gfns_converted": c.get("gfns_converted", 0),
            "faults": c.get("pf_taken", 0),
            "memory_fault_exits": c.get("memory_fault_exits", 0),
        }
        if self.config.platform == "snp":
            row["rmpupdates"] = c.get("rmpupdate", 0)
            row["psmashes"] = c.get("psmash", 0)
            row["rmp_faults"] = c.get("rmp_fault", 0)
        elif self.config.platform == "tdx":
            row["seamcalls"] = seamcalls
        row["zaps"] = c.get("zapped_sptes", 0)
        row["tlb_flushes"] = c.get("remote_tlb_flush", 0)
        row["mmu_lock_ns"] = c.get("mmu_lock_held_ns", 0)
        if self.config.platform == "snp":
            row["directmap_tlb_flushes"] = c.get("directmap_tlb_flushes", 0)
            row["directmap_splits"] = c.get("directmap_splits", 0)
            row["directmap_fragmented"] = self.directmap.get("fragmented_fraction", 0.0)
            row["sleep_in_atomic"] = c.get("sleep_in_atomic", 0)
        row["modeled_ns"] = self.modeled_ns
        for actor, ns in self.by_actor.items():
            row[f"modeled_ns_{actor}"] = ns
        row["wall_s"] = self.wall_s
        row["gfns_per_s"] = self.gfns_per_s
        return row

    def metrics(self, *, wall: bool = True) -> dict[str, float]:
        """Every number this run measured, flattened to dotted names: ``modeled_ns``,
        ``counters.rmpupdate``, ``by_actor.vcpu0``, ``by_op.attr_store``,
        ``by_actor_op.vcpu0.npf_fault``, ``directmap.fragmented_fraction``,
        ``phases.accept.modeled_ns``, ``wall_s``, ``gfns_per_s`` ... Any numeric field of the
        result (and any numeric value nested in its dicts and records) is included, so fields
        added later are addressable the same way. Booleans and text are left out. A phase
        that recurs (``balloon``'s ``inflate`` and ``deflate``, once per cycle) is the sum of its
        occurrences, so the phases' figures add up to the run's.
        ``wall=False`` leaves out the simulator's own time (``wall_s``, ``phases.*.wall_s``,
        ``gfns_per_s``), which is all that differs between two runs of the same config and seed.

        >>> r = run(Config(memory="64M"), seed=1)
        >>> m = r.metrics()
        >>> m["modeled_ns"] == r.modeled_ns, m["counters.rmpupdate"] == r.counters["rmpupdate"]
        (True, True)
        """
        out: dict[str, float] = {}
        for f in dataclasses.fields(self):
            if f.name not in _NOT_METRICS:
                _flatten(f.name, getattr(self, f.name), out)
        out["gfns_per_s"] = self.gfns_per_s
        if self.actors:  # the comparison table's vCPU stall (a run on the timeline)
            out["vcpu_stall_ns"] = self.vcpu_stall_ns
        if not wall:
            out = {k: v for k, v in out.items() if not is_wall_metric(k)}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: configuration, seed, pkvm version, cost model, every counter, the
        modeled-time breakdowns, phases, wall time and the table row."""
        return {
            "pkvm_version": self.version,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "cost_model": self.cost_model,
            "cost_fingerprint": self.cost_fingerprint,
            "row": self.row(),
            "counters": dict(self.counters),
            "modeled_ns": self.modeled_ns,
            "by_actor": dict(self.by_actor),
            "by_op": dict(self.by_op),
            "by_actor_op": {a: dict(c) for a, c in self.by_actor_op.items()},
            "directmap": dict(self.directmap),
            "phases": [asdict(p) for p in self.phases],
            "wall_s": self.wall_s,
            "gfns_per_s": self.gfns_per_s,
            "notes": list(self.notes),
            "critical_path_ns": self.critical_path_ns,
            "actors": {a: dict(v) for a, v in self.actors.items()},
            "locks": {n: dict(v) for n, v in self.locks.items()},
            "latency_ns": {k: dict(v) for k, v in self.latency_ns.items()},
            "races": dict(self.races),
        }


#: Result fields that describe the run rather than measure it.
_NOT_METRICS = frozenset({"config", "seed", "version", "cost_model", "cost_fingerprint", "notes"})
#: The comparison table's names of metrics that :meth:`Result.metrics` spells otherwise.
METRIC_ALIASES: Mapping[str, str] = {"fault_p99_ns": "latency_ns.fault.p99"}
#: Metrics that are one number (the result's number fields, and the two :meth:`Result.metrics`
#: adds), and the fields whose metrics are dotted names under them, from :class:`Result`.
_SCALAR_METRICS = tuple(f.name for f in dataclasses.fields(Result) if f.name not in _NOT_METRICS
                        and f.type in ("int", "float")) + ("vcpu_stall_ns", "gfns_per_s")
_METRIC_FAMILIES = tuple(f.name for f in dataclasses.fields(Result) if f.name not in _NOT_METRICS
                         and f.type not in ("int", "float"))


def metric_name(metric: str) -> str:
    """``metric`` as :meth:`Result.metrics` names it (an alias of :data:`METRIC_ALIASES`
    resolved), checked before anything runs for what can be checked without runs: one of the
    one-number metrics (``modeled_ns``, ``critical_path_ns``, ``vcpu_stall_ns``, ``wall_s``,
    ``gfns_per_s``) or a dotted name under one of the result's fields (``counters.rmpupdate``,
    ``latency_ns.fault.p99`` ...). Whether the runs measure it is known only after them.

    >>> metric_name("fault_p99_ns"), metric_name("counters.rmpupdate")
    ('latency_ns.fault.p99', 'counters.rmpupdate')

    Raises:
        ValueError: not a str, or a name no run measures (its message lists the names).
    """
    if not isinstance(metric, str):
        raise ValueError(f"metric {metric!r} must be a dotted name such as 'modeled_ns'")
    name = METRIC_ALIASES.get(metric, metric)
    head, dot, rest = name.partition(".")
    if (not dot and head in _SCALAR_METRICS) or (dot and rest and head in _METRIC_FAMILIES):
        return name
    if name in config_columns(Config()) or name in ("seed", "policy", "cost_fingerprint", "pkvm_version"):
        raise ValueError(f"metric {metric!r} is a column of the configuration, not a number the runs measure "
                         "(e.g. modeled_ns, by_actor.vcpu0, counters.rmpupdate)")
    close = difflib.get_close_matches(name, [*_SCALAR_METRICS, *METRIC_ALIASES], n=3, cutoff=0.6)
    raise ValueError(f"metric {metric!r} is not a name runs measure: one of {', '.join(_SCALAR_METRICS)}, "
                     f"or a dotted name under {', '.join(_METRIC_FAMILIES)} (e.g. counters.rmpupdate, "
                     f"latency_ns.fault.p99){'; aliases: ' + ', '.join(METRIC_ALIASES) if METRIC_ALIASES else ''}"
                     + (f"; did you mean {', '.join(close)}?" if close else ""))


def is_wall_metric(name: str) -> bool:
    """True for a metric of the simulator's own speed (``wall_s``, ``phases.X.wall_s``,
    ``gfns_per_s``): the only metrics that vary between runs of the same config and seed."""
    return name == "gfns_per_s" or name == "wall_s" or name.endswith(".wall_s")


def _flatten(name: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        out[name] = value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{name}.{k}", v, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _flatten(f"{name}.{f.name}", getattr(value, f.name), out)
    elif isinstance(value, (tuple, list)):
        seen: set[str] = set()
        for i, v in enumerate(value):
            key = getattr(v, "name", None)
            if isinstance(key, str) and key in seen:
                # a name that recurs (balloon's inflate and deflate, once per cycle): the sum,
                # so that the phases' figures still add up to the run's
                part: dict[str, float] = {}
                _flatten(f"{name}.{key}", v, part)
                for k, x in part.items():
                    out[k] = out.get(k, 0) + x
                continue
            if isinstance(key, str):
                seen.add(key)
            _flatten(f"{name}.{key if isinstance(key, str) else i}", v, out)
    else:
        try:  # numpy scalars and other numbers
            out[name] = float(value)
        except (TypeError, ValueError):
            return


def _build(config: Config, seed: int, progress: Callable[[float], None] | None) -> tuple[Any, Any]:
    options = {"host_cpus": config.host_cpus} if config.platform == "snp" else None
    vm = VM(config.platform, policy=str(config.policy), costs=config.cost_model(), seed=seed,
            shared_backing=config.shared_backing, nr_vcpus=config.vcpus, options=options)
    vmm = Vmm(vm, discard=config.discard)
    vcpus = [vm.create_vcpu() for _ in range(config.vcpus)]
    guests = [Guest(vm, vmm, v) for v in vcpus]
    ctx = _workloads.Context(vm, vmm, guests, seed, config.memory, config.image,  # type: ignore[arg-type]
                             progress)
    return vm, ctx


def run(config: Config, seed: int = 0, *, progress: Callable[[float], None] | None = None) -> Result:
    """Run ``config``'s workload with ``seed``; return its :class:`Result`.

    ``progress`` (optional) is called with the fraction done, for progress bars.

    Raises:
        ValueError: a bad config or seed, or a replay file that does not parse.
        pkvm.TracePlatformError: (a :class:`pkvm.ConfigError`, a ValueError) a replay's
            trace records a VM of another platform than ``config.platform``; the message
            says which ``Config(platform=...)`` replays it, or that pkvm does not simulate
            the recorded one.
        KvmError: the workload hit an error the simulated kernel or guest would report.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a pkvm.experiments.Config, not {type(config).__name__}")
    if type(seed) is not int or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative int")
    wl = _workloads.get(config.workload)
    opts = _workloads.parse_options(wl, config.options)
    t0 = time.perf_counter()
    vm, ctx = _build(config, seed, progress)
    sink = None
    with _naming_output("trace", config.trace), contextlib.ExitStack() as files:
        if config.trace is not None:
            # A regular file is written whole (a temporary file renamed over it once the run
            # succeeded): a run that fails leaves the previous file as it was, no part of a
            # trace. A pipe or a device is streamed to, as the trace is made.
            name = os.fspath(config.trace)
            target = name if _writes_through(name) else files.enter_context(atomic_output(name))
            sink = files.enter_context(open(target, "w", encoding="utf-8"))
        try:
            if sink is not None:
                sink.write(f"cpus={config.vcpus + 1}\n")
                tracer = Tracer(sink, header=[_trace_header(config, opts)], events=config.trace_events)
                vm.trace(tracer)
            tl = _run_timeline(config, vm, ctx, wl, opts)
            ctx.progress_span = (0.0, 1.0)
            ctx.progress(1.0)  # done (a workload's own last report may fall short of it)
            if sink is not None:
                sink.write(_trace_trailer(vm))
        finally:
            if sink is not None:
                vm.trace(None)
    wall = time.perf_counter() - t0
    tres = tl.result()
    if tl.recorder is not None:
        _write_timeline_outputs(config, tl)
    model = vm.costs
    dm: dict[str, float | int] = {}
    directmap = getattr(vm, "directmap", None)
    if directmap is not None:
        dm = {"fragmented_fraction": float(directmap.fragmented_fraction()),
              "fragmented_pages": int(directmap.fragmented_pages())}
    by_actor_op = vm.cost_by_actor()
    return Result(
        config=config, seed=seed, version=version(), counters=ctx.counters(), modeled_ns=vm.modeled_ns,
        by_actor={a: sum(c.values()) for a, c in by_actor_op.items()},
        by_op=dict(sorted(vm.cost_breakdown().items())), by_actor_op=by_actor_op, directmap=dm,
        phases=tuple(ctx.phases), wall_s=wall, cost_model=model.to_dict(),
        cost_fingerprint=model.fingerprint(), notes=tuple(ctx.notes), critical_path_ns=tres.critical_path_ns,
        actors=tres.actors, locks=tres.locks, latency_ns=tres.latency_ns, races=tres.races)


def _run_timeline(config: Config, vm: Any, ctx: Any, wl: Any, opts: Mapping[str, Any]) -> Any:
    """Run the workload on the concurrent timeline: the VMM's main loop drives it (the
    workload's code), one thread per vCPU takes its tasks (``docs/timeline.md``)."""

    rec = Recorder() if (config.timeline or config.gantt) else None
    tl = Timeline(vm, host_cpus=config.host_cpus, recorder=rec, batch_pages=config.batch_pages_used,
                  pagewise_locks=config.pagewise_locks)
    ctx.timeline = tl
    for g in ctx.guests:
        tl.start_vcpu(g.actor)

    def main_loop() -> None:
        _run_workload(wl, ctx, opts)
        tl.stop()

    tl.spawn("vmm", main_loop)
    tl.run()
    return tl


def _run_workload(wl: Any, ctx: Any, opts: Mapping[str, Any]) -> None:
    """The workload's code, with the advice of a replay's platform mismatch worded in this
    API's terms (the replay raises it without: :class:`pkvm.TracePlatformError`)."""
    try:
        wl.run(ctx, **opts)
    except TracePlatformError as exc:
        if exc.recorded in PLATFORMS:
            advice = f"replay it with Config(platform={exc.recorded!r})"
        else:
            advice = (f"pkvm does not simulate {exc.recorded!r}: Config(platform=...) is one of "
                      f"{', '.join(PLATFORMS)}")
        raise TracePlatformError(exc.path, exc.recorded, exc.platform, advice) from None


def _write_timeline_outputs(config: Config, tl: Any) -> None:
    meta = {"pkvm_version": version(), "platform": config.platform, "policy": config.policy,
            "memory": format_size(config.memory),  # type: ignore[arg-type]  # an int after __post_init__
            "workload": config.workload, "vcpus": config.vcpus,
            "host_cpus": config.host_cpus}
    if config.timeline:
        with _naming_output("timeline", config.timeline):
            write_chrome_trace(tl.recorder, config.timeline, metadata=meta)
    if config.gantt:
        with _naming_output("gantt", config.gantt):
            plot_gantt(tl.recorder, config.gantt, title=f"{config.policy}: {config.workload} "
                       f"{format_size(config.memory)}, {config.vcpus} vCPU{'s' if config.vcpus != 1 else ''}")  # type: ignore[arg-type]


@contextlib.contextmanager
def _naming_output(what: str, path: str | os.PathLike[str] | None) -> Iterator[None]:
    """An OSError of writing the output ``path`` that names no file (ENOSPC, EIO: the write
    or the close failed) names it: "cannot write PATH: No space left on device"."""
    try:
        yield
    except OSError as exc:
        if path is None or exc.filename is not None or exc.errno not in _WRITE_ERRNOS:
            raise
        raise OSError(exc.errno, f"cannot write {os.fspath(path)}: {exc.strerror or exc}") from None


#: The errnos of a write or close that failed for want of room or a device error.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _trace_header(config: Config, opts: Mapping[str, Any]) -> str:
    return (f"pkvm version={version()} platform={config.platform} memory={config.memory} "
            # (a spec's blanks are not part of it, and would split the header's key=value field)
            f"image={config.image} vcpus={config.vcpus} policy={''.join(str(config.policy).split())} "
            f"workload={config.workload} "
            f"prealloc={int(bool(opts.get('prealloc', False)))} shared_backing={config.shared_backing} "
            f"discard={int(config.discard)} setup=untraced"
            + ("" if config.trace_events is None else f" events={','.join(config.trace_events)}"))


def _trace_trailer(vm: Any) -> str:
    """The ``# pkvm end`` line a replay reads to say what it could not reproduce: the run's
    modeled total, its modeled ns by operation, the cost model's fingerprint and the price of
    one event of each operation (a replay under other prices re-prices its work at these) and
    the counters of guest-only work."""
    stats = vm.stats
    parts = [f"modeled_ns={vm.modeled_ns}"]
    parts += [f"op.{op}={ns}" for op, ns in sorted(vm.cost_breakdown().items()) if ns]
    parts += trailer_prices(vm)
    parts += [f"stat.{k}={stats[k]}" for k in sorted(GUEST_ONLY_COUNTERS) if stats.get(k)]
    return "# pkvm end " + " ".join(parts) + "\n"


def compare(config: Config, policies: Sequence[str] | None = None, seed: int = 0, *,
            progress: Callable[[str, float], None] | None = None, jobs: int = 1,
            scheduler: str | None = None, runner: Runner | None = None) -> list[Result]:
    """Run ``config`` once per policy (default: the platform's :data:`PLATFORM_POLICIES`),
    same seed; results in policy order. With ``config.trace`` set and several policies, each
    policy writes ``<stem>.<policy><suffix>``.

    Where the runs execute (:mod:`pkvm.experiments.execution`): ``runner`` if given; else ``jobs > 1``
    starts a local Dask cluster of that many worker processes and ``scheduler`` connects to
    an existing one; else they run serially here. The results are identical either way.
    ``progress(policy, fraction)`` reports each run (on a cluster, only when it finishes).
    """
    pols = _policies(policies, config.platform)
    cfgs = [config.with_(policy=pol, trace=_trace_path(config.trace, pol, len(pols)),
                         timeline=_trace_path(config.timeline, pol, len(pols)),
                         gantt=_trace_path(config.gantt, pol, len(pols))) for pol in pols]
    return run_many(cfgs, seed, progress=progress, labels=pols, jobs=jobs, scheduler=scheduler, runner=runner)


def run_many(configs: Sequence[Config], seed: int | Sequence[int] = 0, *,
             progress: Callable[[str, float], None] | None = None, labels: Sequence[str] | None = None,
             jobs: int = 1, scheduler: str | None = None, runner: Runner | None = None) -> list[Result]:
    """:func:`run` on every config (one seed for all, or one per config), in order, on
    ``runner`` (or a :class:`pkvm.experiments.execution.Runner` made from ``jobs`` and ``scheduler``).
    ``labels`` name the runs for ``progress`` (default: :func:`describe`); errors always name
    the run's configuration with :func:`describe`.

    Raises:
        ValueError: a bad ``jobs`` or seed.
        pkvm.experiments.execution.RunError: a run failed on a cluster (after a retry).
        pkvm.experiments.execution.SchedulerUnreachableError: ``scheduler`` did not answer.
    """
    seeds = [seed] * len(configs) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(seeds)} seeds")
    for s in seeds:
        if type(s) is not int or s < 0:
            raise ValueError(f"seed {s!r} must be a non-negative int")
    names = [describe(c, s) for c, s in zip(configs, seeds)]
    shown = list(labels) if labels is not None else names
    tasks = list(zip(configs, seeds))
    if runner is not None:
        return runner.map(run, tasks, shown, progress, pass_progress=True, names=names)
    with Runner(jobs, scheduler) as own:
        return own.map(run, tasks, shown, progress, pass_progress=True, names=names)


def describe(config: Config, seed: int | None = None) -> str:
    """One configuration in a few words, e.g. ``"snp 64G boot fault-time seed 0"``
    (names a run in progress bars and errors)."""
    parts = [config.platform, format_size(int(config.memory)), config.workload, str(config.policy)]
    if config.options:
        parts.append(",".join(f"{k}={v}" for k, v in config.options.items()))
    if config.vcpus != 1:
        parts.append(f"{config.vcpus} vCPUs")
    if config.costs:
        parts.append(f"{len(config.costs)} cost overrides")
    if seed is not None:
        parts.append(f"seed {seed}")
    return " ".join(parts)


def _policies(policies: Sequence[str] | None, platform: str) -> list[str]:
    """The policies to run: ``policies`` as a list (a str is refused, not split into
    characters), or the platform's when None or empty."""
    pols = list_arg(policies, "policies", "['fault-time', 'eager-post']") if policies is not None else []
    return pols or list(PLATFORM_POLICIES[platform])


def _trace_path(path: str | None, policy: str, n: int) -> str | None:
    if path is None or n == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.{policy}{ext or '.txt'}"


def sweep(config: Config, memories: Iterable[int | str], policies: Sequence[str] | None = None, seed: int = 0, *,
          progress: Callable[[str, float], None] | None = None, jobs: int = 1, scheduler: str | None = None,
          runner: Runner | None = None) -> list[Result]:
    """:func:`compare` at each guest memory size, in order (results flattened: by memory,
    then policy). ``jobs``, ``scheduler`` and ``runner`` as in :func:`compare`, over all the
    runs of the sweep."""
    pols = _policies(policies, config.platform)
    cfgs = []
    for mem in list_arg(memories, "memories", "['16G', '64G']"):
        base = config.with_(memory=mem)
        tag = f"{format_size(base.memory)}.{{}}"  # type: ignore[arg-type]
        cfgs += [base.with_(policy=pol, trace=_trace_path(base.trace, tag.format(pol), 2),
                            timeline=_trace_path(base.timeline, tag.format(pol), 2),
                            gantt=_trace_path(base.gantt, tag.format(pol), 2)) for pol in pols]
    return run_many(cfgs, seed, progress=progress, labels=[f"{format_size(c.memory)} {c.policy}" for c in cfgs],  # type: ignore[arg-type]
                    jobs=jobs, scheduler=scheduler, runner=runner)


#: Config fields a grid may not vary (each run's own; set them on the base config).
_NOT_GRID = frozenset({"options", "costs", "cost_file", "trace", "policy", "timeline", "gantt", "trace_events"})


def grid_fields() -> tuple[str, ...]:
    """The :class:`Config` fields :func:`sweep_grid` can vary (``policy`` is given separately)."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.name not in _NOT_GRID)


def grid_configs(config: Config, grid: Mapping[str, Sequence[Any]]) -> list[Config]:
    """Every combination of ``grid``'s values applied to ``config`` (the last key varies
    fastest), each validated.

    Raises:
        ValueError: an unknown field (the message lists :func:`grid_fields`), an empty list
            or a repeated value, or a combination :class:`Config` rejects (named).
    """
    fields = grid_fields()
    if not isinstance(grid, Mapping):
        raise ValueError(f"grid must map Config fields to lists of values, such as {{'vcpus': [1, 8]}}, "
                         f"not {type(grid).__name__}")
    grid = {key: list_arg(values, f"grid key {key!r}", "[1, 8]") if key in fields else values
            for key, values in grid.items()}
    for key, values in grid.items():
        if key not in fields:
            raise ValueError(f"grid key {key!r} is not one of {', '.join(fields)}")
        if not values:
            raise ValueError(f"grid key {key!r} has no values")
        if len(set(map(str, values))) != len(values):
            raise ValueError(f"grid key {key!r} repeats a value: {', '.join(map(str, values))}")
    out = []
    keys = list(grid)
    for key in keys:  # values that differ as written but not once read: 16M and 16384K
        seen: dict[Any, Any] = {}
        for v in grid[key]:
            try:
                read = getattr(config.with_(**{key: v}), key)
            except (ValueError, TypeError):
                continue  # refused below, with the point named
            if read in seen:
                raise ValueError(f"grid key {key!r} repeats a value: {seen[read]} and {v} are the same")
            seen.setdefault(read, v)
    for combo in itertools.product(*(grid[k] for k in keys)):
        changes = dict(zip(keys, combo))
        extra: dict[str, Any] = {}
        if changes.get("platform", config.platform) != config.platform:
            # The base's policy (Config's default for its own platform, such as fault-time) is
            # not the point's: every run sets its policy (sweep_grid), the point gets its default.
            extra["policy"] = None
        try:
            out.append(config.with_(**changes, **extra))
        except (ValueError, TypeError) as exc:
            where = " ".join(f"{k}={v}" for k, v in changes.items())
            raise ValueError(f"grid point {where}: {exc}") from None
    return out


def sweep_grid(config: Config, grid: Mapping[str, Sequence[Any]], policies: Sequence[str] | None = None,
               seed: int = 0, *, progress: Callable[[str, float], None] | None = None, jobs: int = 1,
               scheduler: str | None = None, runner: Runner | None = None) -> list[Result]:
    """Every policy at every point of ``grid`` (``{"memory": ["16G", "64G"], "vcpus": [1, 8]}``;
    keys from :func:`grid_fields`), same seed; results by grid point, then policy.
    ``policies`` default to the platform's (at each point). :func:`to_frame` tabulates them.
    ``jobs``, ``scheduler`` and ``runner`` as in :func:`compare`.

    Raises:
        ValueError: as :func:`grid_configs`, or a policy a grid point's platform refuses.
    """
    cfgs = []
    for point in grid_configs(config, grid):
        pols = _policies(policies, point.platform)
        for pol in pols:
            try:
                cfgs.append(point.with_(policy=pol, trace=None))
            except ValueError as exc:
                raise ValueError(f"grid point {describe(point)}: {exc}") from None
    return run_many(cfgs, seed, progress=progress, labels=[describe(c) for c in cfgs], jobs=jobs,
                    scheduler=scheduler, runner=runner)


def to_frame(results: Sequence[Result]) -> Any:
    """The tidy table of ``results``: one ``pandas.DataFrame`` row per result, with the
    configuration (``platform``, ``memory``, ``workload``, ``options``, ``policy``, ``vcpus``,
    ...), ``seed``, ``cost_fingerprint`` and every metric of :meth:`Result.metrics` as
    columns. Write it with :func:`pkvm.experiments.frames.write_frame`."""
    return results_frame(results, template=Config())


def _counting_costs(config: Config) -> dict[str, object]:
    costs: dict[str, object] = dict(config.costs)
    for op, cost in config.cost_model().items():
        costs[op] = 1
        if cost.is_formula:
            costs[f"{op}.slope"] = 0
    return costs


def count_run(config: Config, seed: int = 0) -> Ledger:
    """Run ``config`` with every price at 1 ns (and every slope at 0), so that each
    ``(actor, op)`` cell of modeled time is its count of events, and note the ``n`` (target
    vCPUs, host CPUs) each formula cost was charged with: the operation counts that
    :func:`pkvm.experiments.uncertainty.reprice` prices. ``exact`` is False if one formula
    cost was charged with several ``n``.

    The workload runs on the concurrent timeline, as :func:`run` runs it: the VMM's loop goes
    on once a vCPU has taken a task, so what the workload does next can depend on that
    interleaving (at 64 GiB ``mixed`` did one 2M balloon round trip more without it, and every
    sample of its study was simulated). Whether the counts then reproduce the simulated run
    at the model's prices is still checked before they are used."""
    cfg = config.with_(costs=_counting_costs(config), trace=None, timeline=None, gantt=None)
    wl = _workloads.get(cfg.workload)
    opts = _workloads.parse_options(wl, cfg.options)
    vm, ctx = _build(cfg, seed, None)
    _run_timeline(cfg, vm, ctx, wl, opts)
    counts = {(a, op): ns for a, cells in vm.cost_by_actor().items() for op, ns in cells.items()}
    n: dict[str, int] = {}
    flush_n = sorted(vm._flush_ns)  # the target-vCPU counts remote flushes were priced at
    exact = len(flush_n) <= 1
    n["remote_tlb_flush"] = flush_n[0] if flush_n else max(vm.nr_vcpus, len(vm.vcpus))
    snp = getattr(vm, "snp", None)
    if snp is not None:
        n["directmap_tlb_flush"] = snp.host_cpus
    elif any(op == "directmap_tlb_flush" for _, op in counts):
        exact = False
    return Ledger(counts, n, exact)


def run_metrics(config: Config, seed: int, costs: Mapping[str, Any]) -> dict[str, float]:
    """:meth:`Result.metrics` (without wall time) of ``config`` run with ``costs`` overrides
    added: one simulated sample of a sensitivity analysis."""
    return run(config.with_(costs={**config.costs, **costs}, trace=None), seed).metrics(wall=False)


_SIMULATION = Simulation(run=run, count=count_run, sample=run_metrics, describe=describe)


def sensitivity(config: Config, policies: Sequence[str] | None = None, **kwargs: Any) -> SensitivityResult:
    """Global sensitivity analysis: sample ``config``'s cost model over its price ranges, run
    every policy (default: the platform's :data:`PLATFORM_POLICIES`) on each sample, and
    return the distributions, the ranking's stability and the Sobol' indices (or a Morris
    screen). Keyword arguments (``metric``, ``method``, ``samples``, ``seed``, ``ranges``,
    ``vary``, ``dist``, ``evaluation``, ``jobs``, ``scheduler``, ``runner``, ``progress``,
    ``keep_metrics``) are those of :func:`pkvm.experiments.uncertainty.analyse`; see
    ``docs/sensitivity.md``.

    Raises:
        ValueError: bad arguments (named), an unknown metric or price, or a metric that
            ``evaluation="reprice"`` cannot re-price.
    """
    pols = _policies(policies, config.platform)
    if isinstance(kwargs.get("metric"), str):
        try:  # a name no run measures, before anything runs; an alias resolved
            kwargs["metric"] = metric_name(kwargs["metric"])
        except ValueError as exc:
            raise UnknownMetricError(str(exc)) from None
    return analyse(config, pols, _SIMULATION, **kwargs)


class _CountingSink:
    """A text sink that only counts what a :class:`pkvm.trace.Tracer` would write."""

    def __init__(self) -> None:
        self.chars = 0
        self.lines = 0

    def write(self, text: str) -> int:
        self.chars += len(text)  # trace lines are ASCII: characters are bytes
        self.lines += text.count("\n")
        return len(text)


def _traced_size(config: Config, seed: int) -> tuple[int, int]:
    """``(lines, bytes)`` the trace of ``config`` has, by running it with a counting sink."""
    wl = _workloads.get(config.workload)
    opts = _workloads.parse_options(wl, config.options)
    quiet = config.with_(trace=None, timeline=None, gantt=None)
    vm, ctx = _build(quiet, seed, None)
    sink = _CountingSink()
    sink.write(f"cpus={config.vcpus + 1}\n")
    vm.trace(Tracer(cast(IO[str], sink), header=[_trace_header(config, opts)], events=config.trace_events))
    _run_timeline(quiet, vm, ctx, wl, opts)
    sink.write(_trace_trailer(vm))
    vm.trace(None)
    return sink.lines, sink.chars


def trace_size(config: Config, seed: int = 0) -> tuple[int, int]:
    """About how many ``(lines, bytes)`` the trace of ``run(config, seed)`` has, before writing it.

    A replay's trace is about as large as the file it replays. Otherwise the workload runs
    untraced-to-disk (its events only counted) at the config's memory when that is at most
    512M, else at two small sizes (128M and 256M, or more for a large image), and the counts
    are extrapolated linearly in memory: every workload's event count is a fixed part plus
    a part proportional to guest RAM (checked within 2 % for boot, swiotlb, balloon, mixed).

    Raises:
        ValueError: as :func:`run`.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a pkvm.experiments.Config, not {type(config).__name__}")
    if config.workload == "replay":
        size = os.path.getsize(config.options["file"])
        return size // 110, size  # ~110 bytes per trace-cmd line
    mem = int(config.memory)
    m1 = max(128 << 20, (2 * int(config.image) + (2 << 20) - 1) & ~((2 << 20) - 1))
    m2 = 2 * m1
    if mem <= 2 * m2:
        return _traced_size(config, seed)
    l1, b1 = _traced_size(config.with_(memory=m1), seed)
    l2, b2 = _traced_size(config.with_(memory=m2), seed)
    k = (mem - m1) / (m2 - m1)
    return max(l1, round(l1 + (l2 - l1) * k)), max(b1, round(b1 + (b2 - b1) * k))
