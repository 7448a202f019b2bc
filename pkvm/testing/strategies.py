"""Hypothesis strategies for tests of pkvm and of code built on it (needs ``hypothesis``, a test
dependency: ``pip install 'pkvm[test]'``).

>>> from hypothesis import given
>>> from pkvm.testing.strategies import cost_models
>>> @given(cost_models())
... def test_round_trip(model):
...     assert type(model).from_toml(model.to_toml()) == model
>>> test_round_trip()
"""

from __future__ import annotations

from hypothesis import strategies as st

from pkvm.cost.model import MAX_NS, OPERATIONS, PROFILES, CostModel

__all__ = ["cost_models", "nanoseconds"]


def nanoseconds() -> st.SearchStrategy[int | float]:
    """A latency a cost override accepts: whole or fractional ns in ``[0, MAX_NS]`` (60 s)."""
    return st.one_of(st.integers(0, MAX_NS), st.floats(0, MAX_NS, allow_nan=False, allow_infinity=False))


@st.composite
def cost_models(draw: st.DrawFn, max_values: int = 8, max_slopes: int = 2) -> CostModel:
    """The default :class:`~pkvm.cost.model.CostModel` of a random profile with up to
    ``max_values`` random value overrides and ``max_slopes`` random slope overrides."""
    formula_ops = [op for op in OPERATIONS if CostModel.default()[op].is_formula]
    platform = draw(st.sampled_from(PROFILES))
    values = draw(st.dictionaries(st.sampled_from(OPERATIONS), nanoseconds(), max_size=max_values))
    slopes = draw(st.dictionaries(st.sampled_from(formula_ops), nanoseconds(), max_size=max_slopes))
    return CostModel.default(platform).with_overrides(
        {**values, **{f"{op}.slope": v for op, v in slopes.items()}})
