"""``pkvm.sim.stats.Distribution`` keeps its state in the typed core (``DistState``, which the
timeline's latency hook adds to at C level): adds through either entry agree, a pickled
distribution comes back equal and keeps working, and it has no per-instance dict."""

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm.sim.stats import Distribution

_samples = st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 50)), max_size=30)


def _stats(d):
    return d.count, d.total, d.max, d.p50, d.p99, d.percentile(10)


@given(_samples)
def test_add_and_internal_add_agree_and_pickle(samples):
    a, b = Distribution(), Distribution()
    for v, n in samples:
        a.add(v, count=n)
        b._add(v, n)
    assert _stats(a) == _stats(b)
    c = pickle.loads(pickle.dumps(a))
    assert type(c) is Distribution and _stats(c) == _stats(a)
    c.add(7, count=3)
    a.add(7, count=3)
    assert _stats(c) == _stats(a)


def test_no_instance_dict():
    d = Distribution()
    with pytest.raises(AttributeError, match="no attribute 'other'"):
        d.other = 1  # type: ignore[attr-defined]
    assert (d.count, d.total, d.max, d.p50) == (0, 0, 0, 0)
