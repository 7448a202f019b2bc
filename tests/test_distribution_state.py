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


# A sample: an int ns value with a count (most of them), a value or count past int64, a float,
# or a read of the histogram (which moves the core's C table of int64 samples into the dict).
_ops = st.lists(st.one_of(
    st.tuples(st.integers(-40, 40), st.integers(1, 5)),
    st.tuples(st.sampled_from([2**63 - 1, -2**63, 2**63, 2**70]), st.sampled_from([1, 2, 2**62])),
    st.tuples(st.integers(-3, 3), st.sampled_from([2**62, 2**63 - 1, 2**63 + 5])),
    st.tuples(st.sampled_from([5.0, 3.5, -0.5, 1e300]), st.integers(1, 3)),
    st.just("read"), st.just("pickle")), max_size=60)


@given(_ops)
def test_c_table_matches_python_arithmetic(ops):
    """Samples kept in C (int64 values and counts, and the count, total and max while they fit)
    read back as the dict and Python ints the Python arithmetic makes: the same keys in the same
    order with the same types, exact past int64, an int and an equal float one value."""
    d = Distribution()
    hist: dict = {}
    count = total = mx = 0
    for op in ops:
        if op == "read":
            assert list(d._hist.items()) == list(hist.items())
            continue
        if op == "pickle":
            d = pickle.loads(pickle.dumps(d))
            continue
        v, n = op
        d._add(v, n)
        hist[v] = hist[v] + n if v in hist else n
        if v > mx or not count:
            mx = v
        count += n
        total += v * n
        got = (d._count, d._total, d._max)
        assert got == (count, total, mx)
        assert [type(x) for x in got] == [type(x) for x in (count, total, mx)]
    assert list(d._hist.items()) == list(hist.items())
    assert [type(k) for k in d._hist] == [type(k) for k in hist]
    assert pickle.loads(pickle.dumps(d)).__getstate__() == (hist, count, total, mx)
