"""Shared fixtures and Hypothesis profiles for the pkvm test suite.

Hypothesis profiles, chosen with the ``HYPOTHESIS_PROFILE`` environment variable:

- ``dev`` (default): few examples, so the whole suite stays fast on a laptop.
- ``ci`` (``.ci/run``): many more examples and longer state-machine runs, derandomized: the
  same commit always runs the same examples, so CI's verdict is the code's, not the draw's.
- ``explore``: as many examples again as ``ci``, drawn at random; run it by hand to look for
  what the fixed draw misses (``HYPOTHESIS_PROFILE=explore python3 -m pytest -q -n auto``),
  and keep each failure it finds as a named test.

Neither profile has a deadline: the suite runs on shared 2-core machines where a single slow
example says nothing about the code.
"""

import contextlib
import os
import warnings

import pytest
from hypothesis import settings

import pkvm
from pkvm.testing.reference import DictRangeMap, SortedRangeMap

# When a Hypothesis test fails, its pytest plugin imports libcst to suggest an @example patch;
# importing libcst emits a DeprecationWarning (from mypy_extensions) that ``filterwarnings =
# ["error"]`` turns into an INTERNALERROR which hides the real failure. Import it here, quietly.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import libcst  # noqa: F401

settings.register_profile("dev", max_examples=40, stateful_step_count=40, deadline=None)
settings.register_profile("ci", max_examples=500, stateful_step_count=100, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=1000, stateful_step_count=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

RANGEMAP_IMPLS = {
    "core": pkvm.RangeMap,
    "sorted": SortedRangeMap,
    "dict": DictRangeMap,
}
"""Every implementation of the RangeMap API, by short name (the pytest id)."""


@pytest.fixture(scope="session", params=list(RANGEMAP_IMPLS), ids=list(RANGEMAP_IMPLS))
def rangemap_cls(request):
    """A RangeMap implementation: the Cython core, or one of its two pure-Python twins.

    Session-scoped because it is a class, not state, so Hypothesis tests may use it.
    """
    return RANGEMAP_IMPLS[request.param]


@pytest.fixture
def populated(rangemap_cls):
    """Build a ``rangemap_cls`` map with three runs, one of them ending at ``2**64 - 1``.

    Call it as ``populated()`` or ``populated(default=5)``.
    """

    def build(default=0):
        m = rangemap_cls(default=default)
        m.assign(0x10, 0x20, 8)
        m.assign(0x30, 0x40, 1)
        m.assign(2**64 - 5, 2**64 - 1, 8)
        return m

    return build
