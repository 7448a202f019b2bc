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


class _RaisesOnce:
    """A histogram key with the hash of ``value`` whose first comparison raises: the move of
    the C table into the dict fails at that value's entry."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.armed = True

    def __hash__(self) -> int:
        return hash(self.value)

    def __eq__(self, other: object) -> bool:
        if self.armed:
            self.armed = False
            raise MemoryError("injected")
        return False


@pytest.mark.parametrize("at", [0, 1, 2])
def test_a_failed_move_of_the_c_table_keeps_the_samples_not_moved(at):
    """Reading the histogram moves the table's samples into the dict one value at a time; if a
    store fails part way (here: the dict's comparison with a key raises, as a MemoryError in a
    resize would), the values moved stay moved and the rest stay in the table, in order, for
    the next read: nothing is lost or counted twice, and adds keep working in between."""
    values = [10, 20, 30]
    d = Distribution()
    key = _RaisesOnce(values[at])
    d._hist = {key: 1}
    for v in values:
        d._add(v, 2)
    with pytest.raises(MemoryError, match="injected"):
        d._hist
    d._add(20, 1)
    d._add(40, 1)
    hist = d._hist
    assert hist.pop(key) == 1
    assert hist == {10: 2, 20: 3, 30: 2, 40: 1}
    # The values before the failing one reached the dict first: the order stays first-add's.
    assert list(hist) == [10, 20, 30, 40]
    assert (d._count, d._total, d._max) == (8, 10 * 2 + 20 * 3 + 30 * 2 + 40, 40)
