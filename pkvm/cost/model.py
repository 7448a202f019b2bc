"""The cost model: what each simulated operation costs in modeled host time, and who paid it.

pkvm counts operations (``vm.stats``); this module turns counts into nanoseconds. A
:class:`CostModel` maps each operation name to a :class:`Cost` (value, range, unit, source and
confidence, from ``docs/costs.md`` §0); a :class:`pkvm.cost.ledger.Ledger` charges counted
operations against a model and attributes the time to an actor (``"vmm"``, ``"vcpu0"``, ``"host"`` ...).

Invariants:

- A model is immutable and always holds exactly the operations in :data:`OPERATIONS`, so any
  model can price any operation. Overrides return a new model.
- Every charge is a whole number of nanoseconds: one event's cost (base, plus slope times the
  vCPU or CPU count for formula costs) is rounded once, half to even, and then multiplied by
  the count. So charging N events at once equals charging one event N times, which keeps the
  range-compressed simulator and the per-page reference in exact agreement.
- Composite rows (those with ``includes``) already contain the operations they list: charge
  either the composite or its parts for one event, never both.

Operations, with the ``vm.stats`` counter each is charged against. Counters marked
*(proposed)* do not exist yet; the name is the one this module suggests.

=========================  ====  =========================================================
operation                  row   counter (count unit)
=========================  ====  =========================================================
``vmexit``                 1/3/5 *(proposed)* ``vmexits``: exits handled in the kernel that
                                 no other charged operation includes (a fault does)
``userspace_exit``         2     ``memory_fault_exits``, and other exits to userspace not
                                 inside ``map_gpa`` / ``psc_request``
``ghcb_exit``              4     *(proposed)* ``ghcb_exits`` (SNP), PSC exits excluded
``td_vmm_exit``            6     *(proposed)* ``tdvmcalls`` (TDX), MapGPA excluded
``npf_fault``              7     ``pf_taken`` (also ``rmp_fault``); on TDX only shared faults
``npf_fault_alloc``        8     composite for a plain VM: a fault that also populated a page
                                 (``shared_pages_populated``) instead of ``npf_fault`` +
                                 ``gmem_alloc_4k``
``tdx_private_fault``      9     ``pf_taken`` for TDX private faults (composite: contains
                                 ``seamcall_aug`` and ``tdx_accept_4k``)
``tdx_private_fault_storm`` 10   the same, when a timeline model sees an idle-vCPU exit storm
``tdx_accept_4k``          13    ``tdx_accepts_4k``
``seamcall_aug``           14    ``seamcall_aug``
``seamcall_add``           15    ``seamcall_add``
``seamcall_mr_extend``     16    4K pages measured (``seamcall_mr_extend`` counts the
                                 SEAMCALLs, 16 per page)
``seamcall_block``         17    ``seamcall_block``
``seamcall_track``         17    ``seamcall_track``
``seamcall_remove``        17    ``seamcall_remove``
``seamcall_wbinvd``        18    ``seamcall_wbinvd``
``seamcall_sept_add``      —     ``seamcall_sept_add``
``map_gpa``                19    TDX MapGPA calls accepted (``tdvmcall_map_gpa`` counts
                                 every call, refused ones too)
``ipi``                    20    *(proposed)* ``ipis``
``vcpu_kick``              20    ``vcpu_kicks`` (one per vCPU kicked)
``remote_tlb_flush``       21    ``remote_tlb_flush``; ``nr_vcpus=`` target vCPUs
``rmpupdate``              22    ``rmpupdate``
``psmash``                 23    ``psmash``
``pvalidate_4k``           24    4K PVALIDATEs executed, failed ones too (``pvalidate``
                                 and ``pvalidate_failures`` count both sizes)
``pvalidate_2m``           24    2M PVALIDATEs executed, failed ones too (``pvalidate_2m``
                                 counts the successful ones)
``rmpadjust``              25    *(proposed)* ``rmpadjust``
``psc_request``            26    ``psc_requests``
``psc_entry``              27    ``psc_entries`` (contains its ``rmpupdate``; not charged:
                                 the parts are)
``attr_store``             28    ``attr_stores`` (GFNs)
``attr_check_gfn``         —     no counter: the gfns the ioctl's no-op check steps to past
                                 the first, to-private calls only, and those the POST hook's
                                 2M MIXED tests step to (its ns over the price)
``attr_check_2m``          —     no counter: the 2M sub-chunks whose first gfn the POST
                                 hook's 1G MIXED tests look up (its ns over the price)
``zap_spte``               —     ``zapped_sptes`` (leaf SPTEs, any level)
``gmem_alloc_4k/_2m/_1g``  29    ``gmem_pages_allocated`` in folios: pages >> order
``gmem_punch_4k``          30    ``gmem_pages_freed`` (4K pages)
``cache_flush_4k``         —     ``cache_flush_pages`` (SNP gmem invalidate)
``directmap_split``        31    ``directmap_splits``
``directmap_cpa_call``     —     ``directmap_cpa_calls``
``huge_page_split``        —     ``huge_page_splits``
``directmap_tlb_flush``    32    ``directmap_tlb_flushes``; ``nr_cpus=`` host CPUs
``psp_launch_update``      —     ``launch_update_pages`` (SNP_LAUNCH_UPDATE, per 4K page)
``pre_fault_page``         —     pages mapped by ``KVM_PRE_FAULT_MEMORY`` (``pf_fixed``)
``sleep_in_atomic``        —     ``sleep_in_atomic`` (0 ns: a correctness counter)
=========================  ====  =========================================================

Rows 11, 12, 33, 34 and 35 are rates, percentages and ratios rather than per-operation times;
they are in :data:`REFERENCE_FIGURES`, as calibration targets that are never charged.

Profiles (:meth:`CostModel.default`) differ only where the platform changes the number: the
``vmexit`` row is 1 on an AMD host (``snp``, and ``sw_protected``/``default`` by default), 3
on an Intel host for a normal VM, and 5 for a TD (``tdx``). The fault rows 7, 8 and 9 are
separate operations rather than one per-profile value, because row 9 is an end-to-end TDX
figure that already contains the AUG and the accept which the TDX model also counts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import operator
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from pkvm.cost import table as _table
from pkvm.errors import PkvmError

__all__ = [
    "CONFIDENCES",
    "OPERATIONS",
    "PROFILES",
    "REFERENCE_FIGURES",
    "Cost",
    "CostModel",
    "CostRow",
    "ReferenceFigure",
    "UnknownOperationError",
    "format_ns",
    "format_table",
    "parse_ns",
    "MAX_NS",
]

Number = int | float

#: Confidence letters of ``docs/costs.md``: H measured on the operation by its maintainers,
#: M measured on a larger path or one machine, L indirect or nearby figure, E estimate.
CONFIDENCES = ("H", "M", "L", "E")

#: Profile names accepted by :meth:`CostModel.default` (``"default"`` is a plain VM).
PROFILES: tuple[str, ...] = tuple(_table.PROFILE_HOSTS)

#: Every operation a model prices, in the order of the ``docs/costs.md`` §0 table.
OPERATIONS: tuple[str, ...] = ("vmexit", *(row["name"] for row in _table.OPERATIONS))

#: Version of the ``to_dict`` / ``to_toml`` layout.
FORMAT = 1

_SLOPE_ARG = {"vcpu": ("nr_vcpus", "vCPUs"), "cpu": ("nr_cpus", "host CPUs")}
_NS_FIELDS = ("value_ns", "low_ns", "high_ns", "slope_ns", "slope_low_ns", "slope_high_ns")
_SLOPE_FIELDS = ("slope_ns", "slope_low_ns", "slope_high_ns", "slope_per")
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")


class UnknownOperationError(PkvmError, KeyError, ValueError):
    """An operation name the cost model does not know; the message suggests close names.

    It is a ``KeyError`` (a model is a mapping) and a ``ValueError`` (a bad override item).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ---- parsing and formatting times -------------------------------------------------------

_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_TIME_RE = re.compile(r"\s*(?P<num>[0-9.][0-9._]*(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[^\s0-9.]*)\s*\Z")


def _norm(x: Number) -> Number:
    """``x`` as an int if it is integral (so 800.0 and 800 compare, hash and print alike)."""
    if type(x) is float and x.is_integer():
        return int(x)
    return x


#: The largest duration one event may cost: 60 s. Any operation pkvm prices takes micro- to
#: milliseconds; a larger value is a typo (``1e30s``) and would print as a 39-digit number.
MAX_NS = 60 * 1_000_000_000


def parse_ns(value: object, *, item: str = "value") -> Number:
    """A duration in nanoseconds from a number (ns) or a string such as ``"0.8us"``.

    Strings are a non-negative decimal number followed by an optional unit: ``ns`` (the
    default), ``us``/``µs``/``μs``, ``ms`` or ``s``; spaces around the unit are allowed. The
    result is an ``int`` when it is a whole number of ns, else a ``float``. Decimal arithmetic
    makes ``"0.15us"`` exactly 150.

    >>> parse_ns("0.8us"), parse_ns("1.5 ms"), parse_ns(250), parse_ns("0.5ns")
    (800, 1500000, 250, 0.5)

    Raises:
        ValueError: negative, not finite, above :data:`MAX_NS` (60 s), or not a duration;
        the message names ``item``.
    """
    # A wrong type is still a malformed *value* here (it came from a file or a command line),
    # so every failure is a ValueError.
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r} for {item}: expected ns or a string like '800ns'")  # noqa: TRY004
    if isinstance(value, (int, float, Decimal)):
        # repr of the float itself: a numpy float64 (a float subclass) spells 'np.float64(5.0)'
        dec = Decimal(value) if not isinstance(value, float) else Decimal(repr(float(value)))
    elif isinstance(value, str):
        m = _TIME_RE.match(value)
        scale = _UNIT_NS.get(m.group("unit").lower() or "ns") if m else None
        try:
            if m is None or scale is None:
                raise InvalidOperation
            dec = Decimal(m.group("num")) * scale
        except InvalidOperation:
            raise ValueError(f"bad duration {value!r} for {item}: expected a number with an "
                             f"optional unit ns, us, µs, ms or s (e.g. '800ns')") from None
    else:
        raise ValueError(f"bad duration {value!r} for {item}: expected a number of ns or a "  # noqa: TRY004
                         f"string like '800ns', not {type(value).__name__}")
    if not dec.is_finite() or dec < 0 or dec > MAX_NS:
        raise ValueError(f"bad duration {_short(value)} for {item}: must be between 0 ns and 60 s")
    return int(dec) if dec == dec.to_integral_value() else float(dec)


def _short(value: object) -> str:
    """``repr(value)``, cut to 40 characters (a 400-digit number stays readable)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fmt_num(x: float) -> str:
    return f"{x:.4g}"


def _split_unit(ns: Number) -> tuple[str, str]:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return _fmt_num(ns / scale), unit
    return _fmt_num(ns), "ns"


def format_ns(ns: Number) -> str:
    """``ns`` in the largest unit that keeps it >= 1, with up to 4 significant digits.

    >>> format_ns(500), format_ns(1_500), format_ns(60_000_000)
    ('500 ns', '1.5 µs', '60 ms')
    """
    num, unit = _split_unit(ns)
    return f"{num} {unit}"


def _format_range(low: Number, high: Number) -> str:
    (lo, lu), (hi, hu) = _split_unit(low), _split_unit(high)
    return f"{lo}–{hi} {hu}" if lu == hu else f"{lo} {lu}–{hi} {hu}"


# ---- Cost -------------------------------------------------------------------------------

def _ns_field(cost: str, field: str, value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"cost {cost!r}: {field} must be a number of ns, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value) or not 0 <= value <= MAX_NS:
        raise ValueError(f"cost {cost!r}: {field}={_short(value)} must be between 0 ns and 60 s")
    return _norm(value)


@dataclass(frozen=True, slots=True)
class Cost:
    """The modeled cost of one operation, with where the number comes from.

    Times are nanoseconds of host wall time (int when whole, else float). A *formula* cost
    (``slope_per`` set) costs ``value_ns + slope_ns * n`` per event, where ``n`` is the number
    of target vCPUs (``slope_per="vcpu"``) or host CPUs (``"cpu"``).

    Attributes:
        name: the operation name (see :data:`OPERATIONS`).
        value_ns: cost of one event (the base, for a formula cost).
        low_ns, high_ns: the plausible range of ``value_ns`` given by the source. An override
            may lie outside it; the range keeps recording what the source said.
        source: a short citation, in pkvm's words (the full story is in ``docs/costs.md``).
        confidence: ``"H"``, ``"M"``, ``"L"`` or ``"E"`` (see :data:`CONFIDENCES`).
        row: the ``docs/costs.md`` §0 row, or None for an estimate pkvm added.
        unit: what one count means, e.g. ``"per RMPUPDATE (4K or 2M entry)"``.
        slope_ns, slope_low_ns, slope_high_ns: per-vCPU / per-CPU term and its range.
        slope_per: ``"vcpu"`` or ``"cpu"`` for a formula cost, else None.
        includes: operations this composite cost already contains.

    Raises:
        TypeError / ValueError: a field of the wrong type or out of range; the message names
        the cost and the field.
    """

    name: str
    value_ns: Number
    low_ns: Number
    high_ns: Number
    source: str
    confidence: str
    row: int | None
    unit: str
    slope_ns: Number | None = None
    slope_low_ns: Number | None = None
    slope_high_ns: Number | None = None
    slope_per: str | None = None
    includes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"cost name {name!r} must be snake_case")
        for field in ("source", "unit"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"cost {name!r}: {field} must be a str")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"cost {name!r}: confidence {self.confidence!r} is not one of "
                             f"{', '.join(CONFIDENCES)}")
        if self.row is not None and (type(self.row) is not int or self.row < 1):
            raise ValueError(f"cost {name!r}: row {self.row!r} must be a positive int or None")
        has_slope = [getattr(self, f) is not None for f in _SLOPE_FIELDS]
        if any(has_slope) and not all(has_slope):
            raise ValueError(f"cost {name!r}: set all of {', '.join(_SLOPE_FIELDS)} or none")
        if self.slope_per is not None and self.slope_per not in _SLOPE_ARG:
            raise ValueError(f"cost {name!r}: slope_per {self.slope_per!r} is not 'vcpu' or 'cpu'")
        for field in _NS_FIELDS:
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, _ns_field(name, field, value))
        if self.low_ns > self.high_ns:
            raise ValueError(f"cost {name!r}: low_ns {self.low_ns} > high_ns {self.high_ns}")
        if self.slope_per is not None and self.slope_low_ns > self.slope_high_ns:  # type: ignore[operator]
            raise ValueError(f"cost {name!r}: slope_low_ns {self.slope_low_ns} > "
                             f"slope_high_ns {self.slope_high_ns}")
        includes = tuple(self.includes)
        if not all(isinstance(op, str) for op in includes):
            raise TypeError(f"cost {name!r}: includes must be operation names")
        object.__setattr__(self, "includes", includes)

    @property
    def is_formula(self) -> bool:
        """True if the cost has a per-vCPU or per-CPU term."""
        return self.slope_per is not None

    def event_ns(self, n: int | None = None) -> int:
        """Whole ns for one event: ``value_ns (+ slope_ns * n)``, rounded half to even.

        ``n`` (target vCPUs or host CPUs) is required for a formula cost and ignored otherwise.

        >>> CostModel.default()["remote_tlb_flush"].event_ns(4)
        2100

        Raises:
            TypeError: a formula cost without ``n``.
        """
        if self.slope_per is None:
            v = self.value_ns
        elif n is None:
            arg, what = _SLOPE_ARG[self.slope_per]
            raise TypeError(f"{self.name} costs base + slope x {what}: pass {arg}=")
        else:
            v = self.value_ns + self.slope_ns * n  # type: ignore[operator]
        return v if type(v) is int else round(v)


@dataclass(frozen=True, slots=True)
class ReferenceFigure:
    """A §0 row that is a rate, percentage or ratio: a calibration target, never charged.

    ``value``, ``low`` and ``high`` are in ``unit`` (``low``/``high`` None when the source gives
    no range). Other fields as in :class:`Cost`.
    """

    name: str
    value: float
    low: float | None
    high: float | None
    unit: str
    source: str
    confidence: str
    row: int


#: Rows 11, 12, 33, 34 and 35 of ``docs/costs.md`` §0, by name.
REFERENCE_FIGURES: Mapping[str, ReferenceFigure] = MappingProxyType(
    {row["name"]: ReferenceFigure(**row) for row in _table.REFERENCE_FIGURES})


# ---- CostModel --------------------------------------------------------------------------

class CostRow(NamedTuple):
    """One row of :meth:`CostModel.describe`: every field is display text."""

    name: str
    value: str        # e.g. "500 ns", or "1.5 µs + 150 ns × vCPUs"
    range: str        # e.g. "200 ns–2 µs"
    unit: str
    confidence: str
    row: str          # the docs/costs.md §0 row, or "—" for a pkvm estimate
    source: str
    note: str         # "" or "override (profile: 500 ns)"
    basis: str = ""   # "measured" (confidence H, M or L) or "estimated" (E): how the source reads


def _unknown(op: object, item: str | None = None) -> UnknownOperationError:
    where = f" in {item!r}" if item is not None and item != op else ""
    close = difflib.get_close_matches(op, OPERATIONS, n=3, cutoff=0.6) if isinstance(op, str) else []
    hint = f"did you mean {', '.join(close)}?" if close else f"operations are {', '.join(OPERATIONS)}"
    return UnknownOperationError(f"unknown cost operation {op!r}{where}; {hint}")


def _count(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        n = operator.index(value)  # type: ignore[arg-type]  # numpy ints pass, floats fail
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None
    if n < 0:
        raise ValueError(f"{what}={n} must be >= 0")
    return n


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)  # ints and finite floats; repr of a float reads back bit-identical


def _looks_like_toml(s: str) -> bool:
    return not s.strip() or "\n" in s or "=" in s or s.lstrip().startswith(("[", "#"))


@cache
def _default_model(profile: str, host: str) -> CostModel:
    rows = [_table.profile_vmexit(profile, host), *_table.OPERATIONS]
    return CostModel((Cost(**{"row": None, **row}) for row in rows), profile=profile, host=host)


class CostModel(Mapping[str, Cost]):
    """An immutable mapping from operation name to :class:`Cost`, for one platform profile.

    Build one with :meth:`default`, then derive variants with :meth:`with_overrides`,
    :meth:`from_toml` or :meth:`from_dict`. Price operations with :meth:`ns`, or charge them
    to actors with a :class:`Ledger`. Two models are equal when profile, host and every cost
    are equal; :meth:`fingerprint` is a stable hash of the same content.

    >>> m = CostModel.default("snp").with_overrides("rmpupdate=800ns")
    >>> m.ns("rmpupdate", 512), m.ns("remote_tlb_flush", nr_vcpus=8)
    (409600, 2700)

    Raises:
        ValueError: an unknown profile or host, or a cost set other than :data:`OPERATIONS`.
    """

    __slots__ = ("_costs", "_fingerprint", "_host", "_profile")

    def __init__(self, costs: Iterable[Cost] | Mapping[str, Cost], *, profile: str,
                 host: str) -> None:
        _check_profile(profile, host)
        items = list(costs.values() if isinstance(costs, Mapping) else costs)
        if isinstance(costs, Mapping):
            for key, cost in costs.items():
                if key != cost.name:
                    raise ValueError(f"cost stored under {key!r} is named {cost.name!r}")
        by_name: dict[str, Cost] = {}
        for cost in items:
            if not isinstance(cost, Cost):
                raise TypeError(f"costs must be Cost objects, not {type(cost).__name__}")
            if cost.name in by_name:
                raise ValueError(f"cost {cost.name!r} given twice")
            if cost.name not in OPERATIONS:
                raise _unknown(cost.name)
            by_name[cost.name] = cost
        missing = [op for op in OPERATIONS if op not in by_name]
        if missing:
            raise ValueError(f"cost model is missing {', '.join(missing)}")
        for cost in items:
            for op in cost.includes:
                if op not in by_name:
                    raise _unknown(op, f"{cost.name}.includes")
        self._costs: Mapping[str, Cost] = MappingProxyType({op: by_name[op] for op in OPERATIONS})
        self._profile = profile
        self._host = host
        self._fingerprint: str | None = None

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def default(cls, platform: str = "snp", *, host: str | None = None) -> CostModel:
        """The ``docs/costs.md`` §0 defaults for ``platform``.

        ``platform`` is one of :data:`PROFILES`: ``"snp"`` (AMD host), ``"tdx"`` (Intel host,
        TD exits), ``"sw_protected"`` or ``"default"`` (a plain VM; ``host="amd"`` by default,
        ``host="intel"`` selects the Intel exit row 3). Models are cached: same arguments,
        same object.

        >>> [CostModel.default(p)["vmexit"].row for p in ("snp", "tdx", "sw_protected")]
        [1, 5, 1]

        Raises:
            ValueError: unknown platform, or a host the platform cannot run on.
        """
        if not isinstance(platform, str) or platform not in _table.PROFILE_HOSTS:
            close = difflib.get_close_matches(str(platform), PROFILES, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown cost profile {platform!r}{hint}; profiles are "
                             f"{', '.join(PROFILES)}")
        if host is None:
            host = _table.PROFILE_HOSTS[platform][1]
        elif not isinstance(host, str) or host not in _table.PROFILE_HOSTS[platform][0]:
            _check_profile(platform, host)  # raises ValueError naming the hosts it runs on
        return _default_model(platform, host)

    def with_overrides(self, *overrides: Mapping[str, object] | Iterable[str] | str,
                       **kwargs: object) -> CostModel:
        """A copy of this model with some values replaced.

        Each positional argument is an ``"op=VALUE"`` string (the CLI's ``--cost`` form), a
        list of such strings, or a mapping ``{"op": VALUE}``; keyword arguments come last.
        Later items win. ``op.slope`` sets a formula
        cost's per-vCPU / per-CPU term (``op`` and ``op.value`` set the base). A VALUE is a
        number of ns or a string accepted by :func:`parse_ns` (``800``, ``"800ns"``,
        ``"0.8us"``, ``"0.8µs"``, ``"1ms"``, ``"2s"``). Range, source and confidence stay as
        they were; :meth:`changed` and :meth:`describe` show what was overridden.

        >>> m = CostModel.default()
        >>> m.with_overrides({"rmpupdate": "800ns"}) == m.with_overrides("rmpupdate=0.8us")
        True
        >>> m.with_overrides(["remote_tlb_flush.slope=1.5us"]).ns("remote_tlb_flush", nr_vcpus=2)
        4500

        Raises:
            UnknownOperationError (a ValueError): an unknown operation; lists close names.
            ValueError: a malformed item or value, or ``.slope`` on a cost without one; the
            message quotes the item.
        """
        items: list[tuple[str, object, object]] = []  # (item text, key, value)
        sources: list[object] = list(overrides)
        if kwargs:
            sources.append(kwargs)
        for src in sources:
            if isinstance(src, str):
                src = [src]
            if isinstance(src, Mapping):
                items.extend((f"{k}={v}", k, v) for k, v in src.items())
                continue
            try:
                iterator = iter(src)  # type: ignore[call-overload]
            except TypeError:
                raise TypeError(f"overrides must be a mapping, a string or strings, not "
                                f"{type(src).__name__}") from None
            for text in iterator:
                if not isinstance(text, str):
                    raise TypeError(f"override {text!r} must be a string 'op=VALUE'")
                name, sep, raw = text.partition("=")
                if not sep:
                    raise ValueError(f"override {text!r} is not of the form op=VALUE "
                                     f"(e.g. 'rmpupdate=800ns')")
                items.append((text, name.strip(), raw.strip()))
        changes: dict[str, dict[str, Number]] = {}
        for text, key, value in items:
            if not isinstance(key, str):
                raise _unknown(key, text)
            op, _, field = key.partition(".")
            cost = self._lookup(op, text)
            if field in ("", "value"):
                field = "value_ns"
            elif field == "slope":
                if not cost.is_formula:
                    formulas = ", ".join(c.name for c in self._costs.values() if c.is_formula)
                    raise ValueError(f"override {text!r}: {op} has no slope; formula costs "
                                     f"are {formulas}")
                field = "slope_ns"
            else:
                raise ValueError(f"override {text!r}: unknown part {field!r}; use {op}=VALUE "
                                 f"or {op}.slope=VALUE")
            changes.setdefault(op, {})[field] = parse_ns(value, item=repr(text))
        return self._replace({op: dataclasses.replace(self._costs[op], **fields)  # type: ignore[arg-type]
                              for op, fields in changes.items()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: CostModel | None = None) -> CostModel:
        """A model from :meth:`to_dict` output or a partial description of one.

        Keys: ``format`` (1), ``profile`` and ``host`` (select the starting model when
        ``base`` is None; default ``"snp"``), ``costs`` (``{op: {field: value}}``; any subset
        of :class:`Cost` fields, applied over the starting model; ``*_ns`` fields also accept
        strings like ``"800ns"``), ``overrides`` (``{"op" or "op.slope": VALUE}`` as in
        :meth:`with_overrides`) and ``fingerprint`` (informational, ignored). A formula
        cost's shape is fixed: ``slope_*`` fields only apply to costs that have a slope.

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: empty ``data`` (it would change nothing: a mistake, not a model),
            unknown keys, operations or fields, malformed values, an unknown ``profile`` or
            ``host``, or a ``profile``/``host`` that contradicts ``base``.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"cost model data must be a mapping, not {type(data).__name__}")
        if not data:
            raise ValueError("cost model data is empty; give at least one of profile, host, costs, "
                             "overrides (e.g. [overrides] rmpupdate = \"800ns\")")
        extra = set(data) - {"format", "profile", "host", "fingerprint", "costs", "overrides"}
        if extra:
            raise ValueError(f"unknown cost model keys {sorted(map(str, extra))}; keys are format, "
                             f"profile, host, costs, overrides, fingerprint")
        if type(data.get("format", FORMAT)) is not int or data.get("format", FORMAT) != FORMAT:  # not true, 1.0
            raise ValueError(f"cost model format {_short(data['format'])} is not {FORMAT}")
        profile, host = data.get("profile"), data.get("host")
        if profile is not None or host is not None:
            prof = profile if profile is not None else (base.profile if base is not None else "snp")
            _check_profile(prof, None, check_host=False)
            _check_profile(prof, host if host is not None else _table.PROFILE_HOSTS[prof][1])
        if base is None:
            base = cls.default("snp" if profile is None else profile, host=host)
        elif (profile is not None and profile != base.profile
              or host is not None and host != base.host):
            # (a profile given without a host means that profile's default host)
            data_host = host if host is not None else (
                _table.PROFILE_HOSTS[profile][1] if profile is not None else base.host)
            raise ValueError(f"cost model data is for profile {profile or base.profile!r} on host "
                             f"{data_host!r}, but this model is {base.profile!r} on host "
                             f"{base.host!r}; remove its profile/host keys or make them match")
        costs = data.get("costs", {})
        if not isinstance(costs, Mapping):
            raise ValueError("'costs' must map operation names to tables of fields")  # noqa: TRY004
        fields_ok = [f.name for f in dataclasses.fields(Cost)]
        changes: dict[str, Cost] = {}
        for op, fields in costs.items():
            cur = base._lookup(op, f"costs.{op}")
            if not isinstance(fields, Mapping):
                raise ValueError(f"costs.{op} must be a table of fields, not {fields!r}")  # noqa: TRY004
            kw: dict[str, Any] = {}
            for field, value in fields.items():
                item = f"costs.{op}.{field}"
                if field not in fields_ok:
                    raise ValueError(f"unknown field {item!r}; fields are {', '.join(fields_ok)}")
                if field == "name":
                    if value != op:
                        raise ValueError(f"{item} is {value!r}, not {op!r}")
                    continue
                if field in _SLOPE_FIELDS and not cur.is_formula:
                    raise ValueError(f"{item}: {op} has no slope")
                if field == "slope_per" and value != cur.slope_per:
                    raise ValueError(f"{item}: {op} scales per {cur.slope_per}, not {value!r}")
                if field in _NS_FIELDS:
                    value = parse_ns(value, item=item)
                elif field == "includes":
                    if isinstance(value, str) or not isinstance(value, (list, tuple)):
                        raise ValueError(f"{item} must be a list of operation names")
                    value = tuple(value)
                kw[field] = value
            try:
                changes[op] = dataclasses.replace(cur, **kw)
            except TypeError as e:
                raise ValueError(f"costs.{op}: {e}") from None
        model = base._replace(changes)
        overrides = data.get("overrides")
        if overrides is not None:
            if not isinstance(overrides, Mapping):
                raise ValueError("'overrides' must map 'op' or 'op.slope' to values")
            model = model.with_overrides(overrides)
        return model

    @classmethod
    def from_toml(cls, source: str | os.PathLike[str], *, base: CostModel | None = None) -> CostModel:
        """A model from TOML text or a TOML file, with the layout of :meth:`from_dict`.

        ``source`` is a path (a ``Path``, or a ``str`` with no newline, ``=`` or ``[``) or the
        TOML text itself. The smallest useful file is an ``[overrides]`` table:

        >>> CostModel.from_toml('[overrides]\\nrmpupdate = "800ns"')["rmpupdate"].value_ns
        800

        Raises:
            TypeError: ``source`` is neither a str nor a path.
            ValueError: invalid TOML, a file that is not UTF-8 text, or anything
            :meth:`from_dict` rejects (an empty file among them); a file's errors name it.
            OSError: the file cannot be read.
        """
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be TOML text or a path, not {type(source).__name__}")
        if isinstance(source, str) and _looks_like_toml(source):
            text, where = source, ""
        else:
            where = f" in {os.fspath(source)}"
            try:
                text = Path(source).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"bad cost model TOML{where}: the file is not UTF-8 text") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"bad cost model TOML{where}: {e}") from None
        except RecursionError:  # tomllib parses nested arrays and inline tables recursively
            raise ValueError(f"bad cost model TOML{where}: nested too deeply") from None
        try:
            return cls.from_dict(data, base=base)
        except ValueError as e:
            if not where:
                raise
            raise ValueError(f"cost model TOML{where}: {e}") from None

    # -- the mapping and its identity ------------------------------------------------------

    def __getitem__(self, op: str) -> Cost:
        return self._lookup(op)

    def __iter__(self) -> Iterator[str]:
        return iter(self._costs)

    def __len__(self) -> int:
        return len(self._costs)

    def __contains__(self, op: object) -> bool:
        try:
            return op in self._costs
        except TypeError:
            return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CostModel):
            return NotImplemented
        return (self._profile, self._host) == (other._profile, other._host) and \
            dict(self._costs) == dict(other._costs)

    def __hash__(self) -> int:
        return hash((self._profile, self._host, tuple(self._costs.values())))

    def __repr__(self) -> str:
        changed = len(self.changed())
        extra = f", {changed} overridden" if changed else ""
        return f"<CostModel {self._profile}/{self._host}: {len(self)} ops{extra}, {self.fingerprint()}>"

    @property
    def profile(self) -> str:
        """The platform profile this model started from (one of :data:`PROFILES`)."""
        return self._profile

    @property
    def host(self) -> str:
        """The host CPU vendor the profile assumes: ``"amd"`` or ``"intel"``."""
        return self._host

    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of the content (sha256 of canonical JSON).

        Equal models have equal fingerprints, in any process and on any machine.
        """
        if self._fingerprint is None:
            blob = json.dumps(self._body(), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False)
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprint

    def changed(self) -> dict[str, tuple[Cost, Cost]]:
        """``{op: (profile default, this model's cost)}`` for every cost that differs."""
        ref = _default_model(self._profile, self._host)
        return {op: (ref[op], c) for op, c in self._costs.items() if c != ref[op]}

    # -- pricing ---------------------------------------------------------------------------

    def ns(self, op: str, count: int = 1, *, nr_vcpus: int | None = None,
           nr_cpus: int | None = None) -> int:
        """Modeled whole ns for ``count`` events of ``op``.

        A formula cost needs its ``n``: ``nr_vcpus`` for ``remote_tlb_flush``, ``nr_cpus`` for
        ``directmap_tlb_flush``; the other argument is ignored, and both are ignored for a
        flat cost. One event is rounded once (half to even), then multiplied by ``count``.

        >>> m = CostModel.default()
        >>> m.ns("attr_store", 1 << 18), m.ns("directmap_tlb_flush", nr_cpus=64)
        (26214400, 14600)

        Raises:
            UnknownOperationError: ``op`` is not in :data:`OPERATIONS`.
            TypeError: a formula cost without its count, or a non-int count.
            ValueError: a negative count.
        """
        return self._event_ns(op, nr_vcpus, nr_cpus) * _count(count, "count")

    def _lookup(self, op: object, item: str | None = None) -> Cost:
        try:
            return self._costs[op]  # type: ignore[index]
        except (KeyError, TypeError):
            raise _unknown(op, item) from None

    def _event_ns(self, op: str, nr_vcpus: int | None, nr_cpus: int | None) -> int:
        cost = self._lookup(op)
        if cost.slope_per is None:
            return cost.event_ns()
        arg = nr_vcpus if cost.slope_per == "vcpu" else nr_cpus
        if arg is None:
            return cost.event_ns(None)  # raises TypeError naming the argument
        return cost.event_ns(_count(arg, _SLOPE_ARG[cost.slope_per][0]))

    def _replace(self, changes: Mapping[str, Cost]) -> CostModel:
        if not changes:
            return self
        return CostModel({**self._costs, **changes}, profile=self._profile, host=self._host)

    # -- output ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: ``format``, ``profile``, ``host``, ``fingerprint``, ``costs``.

        ``costs`` maps each operation to its :class:`Cost` fields (None fields left out);
        :meth:`from_dict` reads it back to an equal model. Record it with every result.
        """
        body = self._body()
        return {"format": body["format"], "profile": body["profile"], "host": body["host"],
                "fingerprint": self.fingerprint(), "costs": body["costs"]}

    def _body(self) -> dict[str, Any]:
        costs = {}
        for op, cost in self._costs.items():
            fields: dict[str, Any] = {}
            for f in dataclasses.fields(Cost):
                v = getattr(cost, f.name)
                if f.name != "name" and v is not None and v != ():
                    fields[f.name] = list(v) if isinstance(v, tuple) else v
            costs[op] = fields
        return {"format": FORMAT, "profile": self._profile, "host": self._host, "costs": costs}

    def to_toml(self) -> str:
        """The whole model as TOML text; :meth:`from_toml` reads it back to an equal model."""
        d = self.to_dict()
        lines = [
            "# pkvm cost model (pkvm.costs.CostModel.to_toml). Times in nanoseconds.",
            "# Confidence: H/M/L measured (see docs/costs.md), E estimate. row: docs/costs.md §0.",
            f"format = {FORMAT}",
            f"profile = {_toml_str(self._profile)}",
            f"host = {_toml_str(self._host)}",
            f"fingerprint = {_toml_str(d['fingerprint'])}  # informational; ignored on load",
        ]
        for op, fields in d["costs"].items():
            lines += ["", f"[costs.{op}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items()]
        return "\n".join(lines) + "\n"

    def describe(self) -> list[CostRow]:
        """One display row per operation, in :data:`OPERATIONS` order (for ``pkvm costs``).

        >>> row = CostModel.default("snp").describe()[0]
        >>> row.name, row.value, row.range, row.confidence, row.row
        ('vmexit', '500 ns', '300–800 ns', 'M', '1')
        """
        changed = self.changed()
        rows = []
        for op, c in self._costs.items():
            value, rng = format_ns(c.value_ns), _format_range(c.low_ns, c.high_ns)
            if c.is_formula:
                what = _SLOPE_ARG[c.slope_per][1]  # type: ignore[index]
                value += f" + {format_ns(c.slope_ns)} × {what}"  # type: ignore[arg-type]
                rng += f" + {_format_range(c.slope_low_ns, c.slope_high_ns)} × {what}"  # type: ignore[arg-type]
            note = ""
            if op in changed:
                ref = changed[op][0]
                note = f"override ({self._profile}: {format_ns(ref.value_ns)}"
                note += f" + {format_ns(ref.slope_ns)})" if ref.is_formula else ")"  # type: ignore[arg-type]
            rows.append(CostRow(op, value, rng, c.unit, c.confidence,
                                "—" if c.row is None else str(c.row), c.source, note,
                                "estimated" if c.confidence == "E" else "measured"))
        return rows


def _check_profile(profile: object, host: object, *, check_host: bool = True) -> None:
    """ValueError unless ``profile`` is known and (``check_host``) runs on ``host``."""
    if not isinstance(profile, str) or profile not in _table.PROFILE_HOSTS:
        raise ValueError(f"unknown cost profile {_short(profile)}; profiles are {', '.join(PROFILES)}")
    if not check_host:
        return
    hosts = _table.PROFILE_HOSTS[profile][0]
    if host not in hosts:
        raise ValueError(f"profile {profile!r} runs on host {' or '.join(map(repr, hosts))}, "
                         f"not {_short(host)}")


_TABLE_HEADER = ("operation", "value", "range", "unit", "basis", "conf", "row", "source")


def format_table(rows: Iterable[CostRow], *, style: str = "text") -> str:
    """Rows of :meth:`CostModel.describe` as a plain-text or Markdown table.

    ``style="text"`` aligns columns with spaces; ``"markdown"`` gives a pipe table (the one in
    ``docs/costs.md``). An override note is appended to the value.
    """
    body = [(r.name, f"{r.value} [{r.note}]" if r.note else r.value, r.range, r.unit, r.basis,
             r.confidence, r.row, r.source) for r in rows]
    if style == "markdown":
        def cell(s: str) -> str:
            return s.replace("|", "\\|")
        lines = ["| " + " | ".join(_TABLE_HEADER) + " |",
                 "|" + "|".join("---" for _ in _TABLE_HEADER) + "|"]
        lines += ["| " + " | ".join(cell(s) for s in r) + " |" for r in body]
        return "\n".join(lines) + "\n"
    if style != "text":
        raise ValueError(f"table style {style!r} is not 'text' or 'markdown'")
    widths = [max(len(r[i]) for r in [_TABLE_HEADER, *body]) for i in range(len(_TABLE_HEADER) - 1)]
    return "".join("  ".join(s.ljust(w) for s, w in zip(r, widths)) + "  " + r[-1] + "\n"
                   for r in [_TABLE_HEADER, *body])
