"""Which conclusions survive what we do not know: global sensitivity analysis of the cost model.

Most prices in the cost model are estimates with a documented range (``low_ns``..``high_ns``,
and a slope range for the formula costs; see ``docs/costs.md``). :func:`pkvm.experiments.sensitivity` samples
the model over those ranges with SALib, runs every policy on every sample, and reports how
the chosen metric is distributed per policy, how often each policy beats each other one, and
the Sobol' indices (or Morris elementary effects) of each price.

Sampling (:func:`price_space`):

- every price an analysed policy charges, and whose range is not a single value, varies; the
  others stay at the model's value;
- a price is sampled uniformly on its range, or log-uniformly when ``high / low > 10`` (so
  that each decade of a wide range is as likely; ``dist=`` forces one or the other);
- prices that are parts of one source figure (the same row of the cost table, such as the 4K
  and 2M PVALIDATE, or the three gmem allocation sizes) and the base and slope of one formula
  cost move together: one SALib variable per group, each member at the same quantile of its
  own range. The indices are then per group.

Evaluation: a metric that is a sum of operation counts times prices (``modeled_ns``,
``by_actor.*``, ``by_op.*``, ``by_actor_op.*.*``) is **re-priced**: one counting run per
policy (every price 1 ns) gives the operations per actor, and the metric for every sample is
one matrix product of sampled per-event prices and those counts, exact to the nanosecond,
because counts do not depend on prices in the summed model. The re-pricing is checked
against a simulation at the model's own prices first; if it disagrees, or for any other
metric (counters such as ``counters.mmu_lock_held_ns``, phase times, and the timeline's
critical path, waits and latencies), every sample is **simulated**. The result
says which was used.
"""

from __future__ import annotations

import difflib
import functools
import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pkvm._units import format_size
from pkvm.cost.model import CostModel, format_ns, parse_ns
from pkvm.experiments.execution import Runner
from pkvm.experiments.frames import config_columns

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from pkvm.experiments import Config, Result

__all__ = ["METHODS", "DISTRIBUTIONS", "MAX_SAMPLES", "Price", "Ledger", "SensitivityResult", "Simulation", "UnknownMetricError",
           "analyse", "is_repriceable", "plot", "price_space", "reprice"]

#: Analyses :func:`pkvm.experiments.sensitivity` runs: Sobol' indices, or a cheaper Morris screen.
METHODS = ("sobol", "morris")
#: How a price is sampled on its range (``auto``: log-uniform when high/low > 10).
DISTRIBUTIONS = ("auto", "uniform", "log-uniform")
#: The largest N :func:`pkvm.experiments.sensitivity` takes: its unit sample alone is N x (groups
#: + 2) x groups floats, 3 GB for 18 price groups at this N.
MAX_SAMPLES = 1 << 20
_LOG_RATIO = 10.0
#: Metrics that are sums of counts times prices (re-priceable exactly).
_LINEAR_PREFIXES = ("by_actor.", "by_op.", "by_actor_op.")


def is_repriceable(metric: str) -> bool:
    """True if ``metric`` is a sum of operation counts times prices in the summed model, so
    re-pricing a run's operation counts gives it exactly for any cost model."""
    return metric == "modeled_ns" or metric.startswith(_LINEAR_PREFIXES)


# ---- the price space ------------------------------------------------------------------------


@dataclass(frozen=True)
class Price:
    """One sampled price: ``name`` is ``op`` (the per-event value) or ``op.slope``.

    ``low``/``high`` in ns; ``dist`` ``"uniform"`` or ``"log-uniform"``; ``group`` the SALib
    variable it moves with; ``nominal`` the model's value; ``confidence`` as in the cost table.
    """

    name: str
    op: str
    part: str
    low: float
    high: float
    nominal: float
    dist: str
    group: str
    confidence: str

    def at(self, u: np.ndarray) -> np.ndarray:
        """The price at quantiles ``u`` (in [0, 1]) of its distribution."""
        if self.dist == "log-uniform":
            return np.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return self.low + u * (self.high - self.low)


def _parse_range(name: str, text: object) -> tuple[float, float]:
    if isinstance(text, str):
        lo_s, sep, hi_s = text.partition("..")
        if not sep:
            raise ValueError(f"range {name}={text!r} is not LOW..HIGH (e.g. rmpupdate=200ns..2us)")
        lo, hi = parse_ns(lo_s, item=f"range {name}"), parse_ns(hi_s, item=f"range {name}")
    else:
        pair = tuple(text) if isinstance(text, (tuple, list)) else ()
        if len(pair) != 2:
            raise ValueError(f"range {name}={text!r} is not LOW..HIGH or (low, high)")
        lo_v, hi_v = pair
        lo, hi = parse_ns(lo_v, item=f"range {name}"), parse_ns(hi_v, item=f"range {name}")
    if lo > hi:
        raise ValueError(f"range {name}={format_ns(lo)}..{format_ns(hi)}: low is above high")
    return float(lo), float(hi)


def list_arg(value: Any, what: str, example: str) -> list[Any]:
    """``list(value)`` for an argument that takes a list of names: a str (which ``list()``
    would split into characters, "unknown policy preset 'f'") or something not iterable is a
    ValueError naming ``what``."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be a list such as {example}, not the str {value!r}")
    try:
        return list(value)
    except TypeError:
        raise ValueError(f"{what} must be a list such as {example}, not {type(value).__name__}") from None


def _check_price_name(model: CostModel, name: str) -> tuple[str, str]:
    if not isinstance(name, str):
        raise ValueError(f"price name {name!r} must be a str such as 'rmpupdate' or 'remote_tlb_flush.slope'")
    op, _, part = name.partition(".")
    cost = model[op]  # UnknownOperationError (a ValueError) names close operations
    if part not in ("", "slope"):
        raise ValueError(f"price {name!r}: use {op} or {op}.slope")
    if part == "slope" and not cost.is_formula:
        raise ValueError(f"price {name!r}: {op} has no slope")
    return op, part or "value"


def price_space(model: CostModel, ops: Iterable[str], *, ranges: Mapping[str, object] | None = None,
                vary: Iterable[str] | None = None, dist: str = "auto") -> list[Price]:
    """The prices to sample, in cost-table order.

    ``ops``: the operations the analysed runs charge (the others cannot matter). ``vary``
    restricts the sampled prices to these names (``op`` or ``op.slope``; default: every price
    of ``ops`` with a range). ``ranges`` replaces ranges (``{"rmpupdate": "200ns..2us"}`` or
    ``(200, 2000)``); a price named there is sampled even if no run charges it.

    Raises:
        ValueError: an unknown price (close names suggested), a malformed range or one with
            low above high, a log-uniform range starting at 0, or an unknown ``dist``.
    """
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist {dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
    if ranges is not None and not isinstance(ranges, Mapping):
        raise ValueError(f"ranges must map price names to LOW..HIGH, such as {{'rmpupdate': '200ns..2us'}}, "
                         f"not {type(ranges).__name__}")
    ranges = dict(ranges or {})
    parsed = {}
    for name, text in ranges.items():
        _check_price_name(model, name)
        parsed[name] = _parse_range(name, text)
    wanted: set[str] | None = None
    if vary is not None:
        wanted = set()
        for name in list_arg(vary, "vary", "['rmpupdate', 'npf_fault']"):
            _check_price_name(model, name)
            wanted.add(name)
    charged = set(ops) | {n.partition(".")[0] for n in parsed} | {n.partition(".")[0] for n in wanted or ()}
    by_row: dict[int, list[str]] = {}
    for op, cost in model.items():
        if cost.row is not None:
            by_row.setdefault(cost.row, []).append(op)
    out: list[Price] = []
    for op, cost in model.items():
        if op not in charged:
            continue
        parts: list[tuple[str, str, float, float, float]] = [
            ("value", op, float(cost.low_ns), float(cost.high_ns), float(cost.value_ns))]
        if cost.is_formula:
            assert cost.slope_low_ns is not None and cost.slope_high_ns is not None and cost.slope_ns is not None
            parts.append(("slope", f"{op}.slope", float(cost.slope_low_ns), float(cost.slope_high_ns),
                          float(cost.slope_ns)))
        for part, name, low, high, nominal in parts:
            if wanted is not None and name not in wanted and name not in parsed:
                continue
            low, high = parsed.get(name, (low, high))
            if low == high and name not in parsed:
                continue  # a single value: nothing to vary (a one-point --range pins the price there)
            d = dist
            if low == high:
                d = "uniform"
            elif d == "auto":
                d = "log-uniform" if low > 0 and high / low > _LOG_RATIO else "uniform"
            if d == "log-uniform" and low <= 0:
                raise ValueError(f"price {name}: a log-uniform range cannot start at {format_ns(low)}")
            members = [o for o in by_row.get(cost.row, [op]) if o in charged] if cost.row is not None else [op]
            group = "+".join(members)
            out.append(Price(name, op, part, low, high, nominal, d, group, cost.confidence))
    return out


def _groups(prices: Sequence[Price]) -> list[str]:
    seen: list[str] = []
    for p in prices:
        if p.group not in seen:
            seen.append(p.group)
    return seen


def expand(prices: Sequence[Price], unit: np.ndarray) -> np.ndarray:
    """Price values (samples x prices) from SALib's unit samples (samples x groups): every
    price at its group's quantile."""
    groups = _groups(prices)
    col = {g: i for i, g in enumerate(groups)}
    out = np.empty((unit.shape[0], len(prices)))
    for j, p in enumerate(prices):
        out[:, j] = p.at(unit[:, col[p.group]])
    return out


def overrides(prices: Sequence[Price], row: np.ndarray) -> dict[str, float]:
    """The ``Config.costs`` overrides of one sample (``{"rmpupdate": 812.5, ...}``)."""
    return {p.name: float(v) for p, v in zip(prices, row)}


# ---- counting and re-pricing ----------------------------------------------------------------


@dataclass(frozen=True)
class Simulation:
    """What the analysis runs, given by :mod:`pkvm.experiments` (which this module does not
    import: it sits below the package's run functions). Each is a module-level function, so
    that it runs on a Dask worker.

    ``run(config, seed) -> Result``; ``count(config, seed) -> Ledger`` (the counting run:
    every price 1 ns); ``sample(config, seed, costs) -> metrics`` (one simulated sample:
    ``Result.metrics(wall=False)`` with these price overrides); ``describe(config, seed) -> str``.
    """

    run: Callable[..., Any]
    count: Callable[..., Ledger]
    sample: Callable[..., dict[str, float]]
    describe: Callable[..., str]


@dataclass(frozen=True)
class Ledger:
    """The operations one run performed: ``counts[(actor, op)]`` events, and for a formula cost
    the ``n`` (target vCPUs or host CPUs) each event was priced with. ``exact`` is False when
    one formula op was charged with several ``n`` (then re-pricing is not exact)."""

    counts: dict[tuple[str, str], int]
    n: dict[str, int]
    exact: bool = True

    def ops(self) -> set[str]:
        return {op for (_, op), c in self.counts.items() if c}


def linear_metrics(ledger: Ledger) -> dict[str, dict[str, int]]:
    """``{metric: {op: count}}`` for every re-priceable metric of a run with this ledger."""
    out: dict[str, dict[str, int]] = {"modeled_ns": {}}

    def add(metric: str, op: str, c: int) -> None:
        cell = out.setdefault(metric, {})
        cell[op] = cell.get(op, 0) + c

    for (actor, op), c in sorted(ledger.counts.items()):
        add("modeled_ns", op, c)
        add(f"by_actor.{actor}", op, c)
        add(f"by_op.{op}", op, c)
        add(f"by_actor_op.{actor}.{op}", op, c)
    return out


def unit_prices(model: CostModel, prices: Sequence[Price], values: np.ndarray, ops: Sequence[str],
                n: Mapping[str, int]) -> np.ndarray:
    """Whole ns per event of each of ``ops`` (samples x ops), rounded half to even exactly as
    :meth:`pkvm.cost.model.Cost.event_ns` rounds: ``value (+ slope * n)``."""
    col = {p.name: j for j, p in enumerate(prices)}
    nsamp = values.shape[0]
    out = np.empty((nsamp, len(ops)))
    for k, op in enumerate(ops):
        cost = model[op]
        v = values[:, col[op]] if op in col else np.full(nsamp, float(cost.value_ns))
        if cost.is_formula:
            slope = float(cost.slope_ns or 0)
            s = values[:, col[f"{op}.slope"]] if f"{op}.slope" in col else np.full(nsamp, slope)
            v = v + s * float(n.get(op, 0))
        out[:, k] = np.rint(v)
    return out


def reprice(model: CostModel, ledger: Ledger, prices: Sequence[Price], values: np.ndarray,
            metrics: Sequence[str]) -> np.ndarray:
    """``metrics`` (samples x metrics, whole ns as int64) of the run ``ledger`` counted, at
    every sample of ``values`` (samples x prices): one matrix product.

    Raises:
        ValueError: a metric that is not re-priceable (see :func:`is_repriceable`).
    """
    lin = linear_metrics(ledger)
    for m in metrics:
        if not is_repriceable(m):
            raise ValueError(f"metric {m!r} is not a sum of counts times prices; simulate it")
    ops = sorted({op for m in metrics for op in lin.get(m, {})})
    counts = np.array([[lin.get(m, {}).get(op, 0) for m in metrics] for op in ops], dtype=np.float64)
    if not ops:
        return np.zeros((values.shape[0], len(metrics)), dtype=np.int64)
    units = unit_prices(model, prices, values, ops, ledger.n)
    y = units @ counts.reshape(len(ops), len(metrics))
    if np.abs(y).max(initial=0) >= 2.0 ** 53:
        raise ValueError("re-priced totals exceed 2**53 ns and would lose precision")
    return np.rint(y).astype(np.int64)


# ---- the analysis ---------------------------------------------------------------------------


class UnknownMetricError(ValueError):
    """A ``metric`` name the runs do not measure; the message suggests close names."""


@dataclass
class SensitivityResult:
    """What :func:`pkvm.experiments.sensitivity` found.

    Attributes:
        config: the analysed configuration (its ``policy`` is the first policy's).
        policies, metric, method, seed: as given (``metric`` resolved).
        evaluation: ``"re-priced"`` (exact) or ``"simulated"`` (every sample run).
        base_samples: SALib's N; ``unit`` (evaluations x groups) its sample; ``values``
            (evaluations x prices) the price values; ``y`` ``{policy: metric per evaluation}``.
        prices: the sampled :class:`Price` list.
        nominal: ``{policy: metric at the model's own prices}`` (simulated).
        indices: a ``pandas`` table of the indices (:meth:`summary` and :meth:`ranking` give
            the other two tables).
        notes: what the reader should know (e.g. why a metric was simulated).
    """

    config: Config
    policies: list[str]
    metric: str
    method: str
    seed: int
    evaluation: str
    base_samples: int
    prices: list[Price]
    unit: np.ndarray
    values: np.ndarray
    y: dict[str, np.ndarray]
    nominal: dict[str, float]
    indices: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    extra_metrics: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return _groups(self.prices)

    def summary(self) -> pd.DataFrame:
        """Per policy: the metric at the model's prices, its mean, p5, p50 and p95 over the
        samples, and its min and max."""
        import pandas as pd

        rows = []
        for pol in self.policies:
            y = self.y[pol].astype(float)
            p5, p50, p95 = np.percentile(y, [5, 50, 95])
            rows.append({"policy": pol, "nominal": self.nominal[pol], "mean": y.mean(), "p5": p5,
                         "p50": p50, "p95": p95, "min": y.min(), "max": y.max()})
        return pd.DataFrame(rows)

    def ranking(self) -> pd.DataFrame:
        """For each ordered pair of policies (A, B): the fraction of samples in which A's metric
        is strictly lower than B's (A beats B), and the fraction in which they tie."""
        import pandas as pd

        rows = []
        for a in self.policies:
            for b in self.policies:
                if a == b:
                    continue
                ya, yb = self.y[a], self.y[b]
                rows.append({"a": a, "b": b, "a_beats_b": float(np.mean(ya < yb)),
                             "tie": float(np.mean(ya == yb))})
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        """The tidy samples: one row per (policy, sample), with the configuration, ``seed``,
        ``sample``, each price (``price.rmpupdate`` ...), ``evaluation`` and the metrics."""
        import pandas as pd

        frames = []
        for pol in self.policies:
            cols: dict[str, Any] = {}
            for k, v in config_columns(self.config.with_(policy=pol)).items():
                cols[k] = [v] * len(self.values)
            cols["seed"] = self.seed
            cols["sample"] = np.arange(len(self.values))
            for j, p in enumerate(self.prices):
                cols[f"price.{p.name}"] = self.values[:, j]
            cols["evaluation"] = self.evaluation
            cols[self.metric] = self.y[pol]
            for m, arr in self.extra_metrics.get(pol, {}).items():
                if m != self.metric:
                    cols[m] = arr
            frames.append(pd.DataFrame(cols))
        frame = pd.concat(frames, ignore_index=True)
        # a metric one policy never counted (directmap_unmaps under fault-time) is 0 there, not
        # NaN, which means would skip, as in pkvm.experiments.to_frame
        metrics = {self.metric} | {m for d in self.extra_metrics.values() for m in d}
        have = [c for c in frame.columns if c in metrics]
        frame[have] = frame[have].fillna(0)
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: everything but the samples (those go to :meth:`to_frame`)."""
        def records(df: pd.DataFrame) -> list[dict[Hashable, Any]]:
            return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                    for r in df.to_dict(orient="records")]

        return {
            "config": self.config.to_dict(), "policies": self.policies, "metric": self.metric,
            "method": self.method, "seed": self.seed, "evaluation": self.evaluation,
            "base_samples": self.base_samples, "evaluations": int(len(self.values)),
            "prices": [p.__dict__ for p in self.prices], "nominal": self.nominal,
            "summary": records(self.summary()), "ranking": records(self.ranking()),
            "indices": records(self.indices), "notes": list(self.notes)}


def _resolve_metric(metric: str | None, available: Mapping[str, float]) -> str:
    if metric is None:
        return "critical_path_ns" if "critical_path_ns" in available else "modeled_ns"
    if metric not in available:
        close = difflib.get_close_matches(metric, list(available), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else \
            "metrics are the dotted names of Result.metrics(), e.g. modeled_ns, by_actor.vcpu0, counters.rmpupdate"
        raise UnknownMetricError(f"metric {metric!r} is not measured by these runs; {hint}")
    return metric


def _sample(method: str, groups: Sequence[str], n: int, seed: int) -> np.ndarray:
    problem = {"num_vars": len(groups), "names": list(groups), "bounds": [[0.0, 1.0]] * len(groups)}
    if method == "sobol":
        from SALib.sample import sobol

        with warnings.catch_warnings():  # N not a power of 2 (said in the result's notes)
            warnings.simplefilter("ignore", UserWarning)
            sample: np.ndarray = sobol.sample(problem, n, calc_second_order=False, seed=seed)
            return sample
    from SALib.sample import morris

    sample = morris.sample(problem, n, num_levels=4, seed=seed)
    return sample


def _indices(method: str, groups: Sequence[str], unit: np.ndarray, outputs: Mapping[str, np.ndarray],
             seed: int, conf_level: float) -> pd.DataFrame:
    import pandas as pd

    problem = {"num_vars": len(groups), "names": list(groups), "bounds": [[0.0, 1.0]] * len(groups)}
    rows = []
    done: dict[bytes, Any] = {}  # identical outputs (policies that tie everywhere) analysed once
    for out_name, y in outputs.items():
        y = np.asarray(y, dtype=float)
        constant = bool(np.all(y == y[0]))
        key = y.tobytes()
        if method == "sobol":
            if key in done:
                res = done[key]
            elif constant:
                res = {k: np.zeros(len(groups)) for k in ("S1", "S1_conf", "ST", "ST_conf")}
            else:
                from SALib.analyze import sobol

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    # A Generator, not the int: SALib seeds its bootstrap only ``if seed:``, so
                    # seed 0 (the default) drew the confidence intervals unseeded.
                    res = sobol.analyze(problem, y, calc_second_order=False, conf_level=conf_level,
                                        seed=np.random.default_rng(seed))
            done[key] = res
            for i, g in enumerate(groups):
                rows.append({"output": out_name, "price": g, "S1": float(res["S1"][i]),
                             "S1_conf": float(res["S1_conf"][i]), "ST": float(res["ST"][i]),
                             "ST_conf": float(res["ST_conf"][i])})
        else:
            if key in done:
                res = done[key]
            elif constant:
                res = {k: np.zeros(len(groups)) for k in ("mu_star", "mu_star_conf", "sigma")}
            else:
                from SALib.analyze import morris

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    res = morris.analyze(problem, unit, y, conf_level=conf_level, num_levels=4, seed=seed)
            done[key] = res
            for i, g in enumerate(groups):
                rows.append({"output": out_name, "price": g, "mu_star": float(res["mu_star"][i]),
                             "mu_star_conf": float(res["mu_star_conf"][i]), "sigma": float(res["sigma"][i])})
    return pd.DataFrame(rows)


def analyse(config: Config, policies: Sequence[str], sim: Simulation, *, metric: str | None = None,
                method: str = "sobol", samples: int = 1024, seed: int = 0,
                ranges: Mapping[str, object] | None = None, vary: Iterable[str] | None = None,
                dist: str = "auto", evaluation: str = "auto", conf_level: float = 0.95,
                jobs: int = 1, scheduler: str | None = None, runner: Runner | None = None,
                progress: Callable[[str, float], None] | None = None, keep_metrics: bool = False,
                ) -> SensitivityResult:
    """Sample ``config``'s cost model over its price ranges and run every policy on each sample
    (called as :func:`pkvm.experiments.sensitivity`, which fills in ``sim``).

    Args:
        config: the configuration (its cost model is the nominal one; its policy is ignored).
        policies: the policies to compare.
        sim: how to run, count and sample (:class:`Simulation`).
        metric: a dotted name of :meth:`pkvm.experiments.Result.metrics` (default:
            ``critical_path_ns`` when results have it, else ``modeled_ns``).
        method: ``"sobol"`` (first-order and total indices, with confidence intervals;
            ``samples * (groups + 2)`` evaluations) or ``"morris"`` (a screen: mean absolute
            elementary effect; ``samples * (groups + 1)`` evaluations).
        samples: SALib's N (base samples, or Morris trajectories), at most
            :data:`MAX_SAMPLES`. Sobol' sequences balance best when it is a power of 2.
        seed: the simulation seed of every run, and the seed of SALib's sampling and bootstrap.
        ranges, vary, dist: see :func:`price_space`.
        evaluation: ``"auto"`` (re-price when exact, else simulate), ``"reprice"`` (refuse a
            metric that cannot be re-priced exactly) or ``"simulate"``.
        jobs, scheduler, runner: where the runs go (:mod:`pkvm.experiments.execution`).
        keep_metrics: also keep every re-priceable metric (or, simulated, every metric) per
            sample, for :meth:`SensitivityResult.to_frame`.

    Raises:
        ValueError: bad arguments (named), an unknown metric or price, or a metric that
            ``evaluation="reprice"`` cannot re-price.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if type(samples) is not int or samples < 1 or (method == "morris" and samples < 2):
        raise ValueError(f"samples {samples!r} must be a positive int" + (" >= 2 for morris" if method == "morris" else ""))
    if samples > MAX_SAMPLES:
        raise ValueError(f"samples {samples} is more than {MAX_SAMPLES:,} (2**20): the sample matrices would not "
                         "fit in memory")
    if evaluation not in ("auto", "reprice", "simulate"):
        raise ValueError(f"evaluation {evaluation!r} is not auto, reprice or simulate")
    if type(seed) is not int or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative int")
    if isinstance(conf_level, bool) or not isinstance(conf_level, (int, float)) or not 0 < conf_level < 1:
        raise ValueError(f"conf_level {conf_level!r} must be a number in (0, 1)")
    if metric is not None and not isinstance(metric, str):
        raise ValueError(f"metric {metric!r} must be a dotted name such as 'modeled_ns', or None")
    pols = list_arg(policies, "policies", "['fault-time', 'eager-post']")
    if not pols or len(set(pols)) != len(pols):
        raise ValueError(f"policies {', '.join(pols) or '(none)'} must be distinct, and at least one")
    cfgs = [config.with_(policy=p, trace=None) for p in pols]
    model = config.cost_model()
    if ranges or vary is not None:  # bad price names fail before anything runs
        price_space(model, (), ranges=ranges, vary=vary, dist=dist)
    own = runner is None
    runner = runner if runner is not None else Runner(jobs, scheduler)
    try:
        runner.start()
        return _analyse(runner, sim, cfgs, pols, model, metric, method, samples, seed, ranges, vary, dist,
                        evaluation, conf_level, progress, keep_metrics)
    finally:
        if own:
            runner.close()


def _analyse(runner: Runner, sim: Simulation, cfgs: list[Config], pols: list[str], model: CostModel, metric: str | None,
             method: str, samples: int, seed: int, ranges: Mapping[str, object] | None,
             vary: Iterable[str] | None, dist: str, evaluation: str, conf_level: float,
             progress: Callable[[str, float], None] | None, keep_metrics: bool) -> SensitivityResult:
    notes: list[str] = []
    nominal_runs: list[Result] = runner.map(sim.run, [(c, seed) for c in cfgs], [f"{p} nominal" for p in pols],
                                            None)
    metrics0 = {p: r.metrics(wall=False) for p, r in zip(pols, nominal_runs)}
    available: dict[str, float] = {}
    for m in metrics0.values():
        available.update(m)
    metric = _resolve_metric(metric, available)
    ledgers: list[Ledger] = runner.map(sim.count, [(c, seed) for c in cfgs], [f"{p} counting" for p in pols],
                                       None)
    charged = set().union(*(lg.ops() for lg in ledgers))
    prices = price_space(model, charged, ranges=ranges, vary=vary, dist=dist)
    if not prices:
        raise ValueError("no price varies: every price these runs charge has a single value "
                         "(give ranges to vary)")
    groups = _groups(prices)
    unit = _sample(method, groups, samples, seed)
    values = expand(prices, unit)
    if method == "sobol" and samples & (samples - 1):
        notes.append(f"N={samples} is not a power of 2: Sobol' sequences are balanced only at powers of 2")
    mode = "simulated"
    reason = ""
    if evaluation != "simulate" and is_repriceable(metric) and cfgs[0].vcpus > 1:
        # Concurrent vCPUs interleave by the prices: which thread allocates which host pages, and
        # so the direct-map work, can change with them (docs/timeline.md).
        reason = (f"with {cfgs[0].vcpus} concurrent vCPUs the operation counts depend on the prices (the "
                  "interleaving)")
    elif evaluation != "simulate" and is_repriceable(metric):
        bad = [p for p, lg, r in zip(pols, ledgers, nominal_runs) if not lg.exact or not _reprices_nominal(
            model, lg, r)]
        if bad:
            reason = f"re-pricing did not reproduce the simulated {', '.join(bad)} at the model's prices"
        else:
            mode = "re-priced"
    elif evaluation != "simulate":
        reason = f"{metric} is not a sum of counts times prices"
    if evaluation == "reprice" and mode != "re-priced":
        raise ValueError(f"metric {metric!r} cannot be re-priced exactly: {reason or 'simulation requested'}")
    y: dict[str, np.ndarray] = {}
    extra: dict[str, dict[str, np.ndarray]] = {}
    if mode == "re-priced":
        notes.append(f"re-priced: {metric} is a sum of operation counts times prices; one counting run "
                     f"per policy, exact to the ns for every sample (checked against a simulation at the "
                     f"model's prices)")
        for pol, lg in zip(pols, ledgers):
            names = [metric]
            if keep_metrics:
                names += sorted(m for m in linear_metrics(lg) if m != metric)
            arr = reprice(model, lg, prices, values, names)
            y[pol] = arr[:, 0]
            if keep_metrics:
                extra[pol] = {m: arr[:, i] for i, m in enumerate(names)}
            if progress is not None:
                progress(pol, 1.0)
    else:
        if reason:  # said only once every sample was simulated (a refusal above runs none)
            notes.append(f"{reason}, so every sample was simulated")
        tasks, labels, owner = [], [], {}
        for pol, cfg in zip(pols, cfgs):
            for i, row in enumerate(values):
                tasks.append((cfg, seed, overrides(prices, row)))
                labels.append(f"sample {i} of {sim.describe(cfg, seed)}")
                owner[labels[-1]] = pol
        n = len(values)
        done = dict.fromkeys(pols, 0)

        def report(label: str, fraction: float) -> None:  # per policy: the fraction of its samples run
            if progress is not None and fraction >= 1.0:
                pol = owner[label]
                done[pol] += 1
                progress(pol, done[pol] / n)

        workers = max(1, runner.jobs) if runner.scheduler is None else 8
        chunk = max(1, min(64, len(tasks) // (workers * 4)))
        # Each sample measures every metric (hundreds, ~9 KB pickled); unless all are kept,
        # only the one analysed travels back from the worker and stays in memory here.
        fn = sim.sample if keep_metrics else functools.partial(_one_metric, sim.sample, metric)
        outs = runner.map(fn, tasks, labels, report, chunksize=chunk)
        for k, pol in enumerate(pols):
            rows = outs[k * n:(k + 1) * n]
            y[pol] = np.array([r.get(metric, 0.0) for r in rows])
            if keep_metrics:
                keys = sorted(set().union(*(r.keys() for r in rows)))
                extra[pol] = {m: np.array([r.get(m, 0.0) for r in rows]) for m in keys}
    outputs: dict[str, np.ndarray] = {pol: y[pol] for pol in pols}
    for i, a in enumerate(pols):
        for b in pols[i + 1:]:
            outputs[f"{a} - {b}"] = y[a].astype(float) - y[b].astype(float)
    indices = _indices(method, groups, unit, outputs, seed, conf_level)
    const = [o for o, v in outputs.items() if np.all(v == v[0])]
    if const:
        notes.append(f"constant over every sample (indices 0): {', '.join(const)}")
    return SensitivityResult(
        config=cfgs[0], policies=pols, metric=metric, method=method, seed=seed, evaluation=mode,
        base_samples=samples, prices=prices, unit=unit, values=values, y=y,
        nominal={p: float(metrics0[p].get(metric, 0.0)) for p in pols}, indices=indices, notes=notes,
        extra_metrics=extra)


def _one_metric(sample: Callable[..., dict[str, float]], metric: str, *args: Any) -> dict[str, float]:
    """``sample(*args)`` cut down to ``metric`` (on the worker: module level, so that it pickles)."""
    return {metric: sample(*args).get(metric, 0.0)}


def _reprices_nominal(model: CostModel, ledger: Ledger, result: Result) -> bool:
    """Re-pricing the counted run at the model's own prices gives the simulated breakdown."""
    lin = sorted(linear_metrics(ledger))
    got = reprice(model, ledger, [], np.zeros((1, 0)), lin)[0]
    want = result.metrics(wall=False)
    return all(int(g) == want.get(m, 0) for m, g in zip(lin, got)) and \
        all(want[m] == dict(zip(lin, got)).get(m, 0) for m in want if is_repriceable(m))


# ---- plot -----------------------------------------------------------------------------------


def plot(result: SensitivityResult, path: str) -> None:
    """Draw ``result`` to ``path``: the metric's distribution per policy (box plots, log scale
    when it spans more than a decade) and, per policy and per pair of policies, a bar chart of
    each price group's total Sobol' index (``ST``, with ``S1`` inside it and the confidence
    interval) or Morris ``mu*``. Uses matplotlib's object API on the Agg canvas: pyplot's
    state and the process's backend are untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pols = result.policies
    idx = result.indices
    nums = idx.drop(columns=["output", "price"])
    pairs = [o for o in idx["output"].unique()
             if o not in pols and (nums[idx["output"] == o].to_numpy(dtype=float) != 0).any()]
    panels = 2 if not pairs else 3
    fig = Figure(figsize=(6 + 4.5 * (panels - 1), 4.2 + 0.18 * len(result.groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    data = [np.asarray(result.y[p], dtype=float) / 1e9 for p in pols]
    ax.boxplot(data, whis=(5, 95), showfliers=False)
    ax.set_xticks(range(1, len(pols) + 1), pols, rotation=20, ha="right")
    lo = min(float(d.min()) for d in data)
    hi = max(float(d.max()) for d in data)
    if lo > 0 and hi / lo > 10:
        ax.set_yscale("log")
    timed = result.metric.endswith("_ns")
    ax.set_ylabel(f"{result.metric[:-3]} (s)" if timed else f"{result.metric} / 1e9")
    ax.set_title(f"{result.metric} over {len(result.values):,} cost samples\n(box: p25-p75, whiskers: p5-p95)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _bars(axes[1], result, pols, "per policy")
    if pairs:
        _bars(axes[2], result, pairs, "what decides each pair")
    fig.suptitle(f"pkvm sensitivity · {result.config.platform} {format_size(int(result.config.memory))} "
                 f"{result.config.workload} · {result.method} · {result.evaluation}", fontsize=10)
    fig.savefig(path, dpi=130)


def _bars(ax: Any, result: SensitivityResult, outputs: Sequence[str], title: str) -> None:
    idx = result.indices
    groups = result.groups
    width = 0.8 / max(1, len(outputs))
    ypos = np.arange(len(groups))
    key, conf = ("ST", "ST_conf") if result.method == "sobol" else ("mu_star", "mu_star_conf")
    for k, out in enumerate(outputs):
        sub = idx[idx["output"] == out].set_index("price").reindex(groups)
        vals = sub[key].to_numpy(dtype=float)
        errs = sub[conf].to_numpy(dtype=float)
        if result.method == "morris":
            vals, errs = vals / 1e9, errs / 1e9
        pos = ypos + (k - (len(outputs) - 1) / 2) * width
        ax.barh(pos, vals, height=width, xerr=errs, label=out, alpha=0.85, capsize=2)
        if result.method == "sobol":
            ax.barh(pos, sub["S1"].to_numpy(dtype=float), height=width * 0.4, color="black")
    ax.set_yticks(ypos, groups, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("total Sobol' index ST\n(inner black bar: first-order S1; whiskers: 95 % CI)"
                  if result.method == "sobol"
                  else f"Morris mu* ({result.metric}, s)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
