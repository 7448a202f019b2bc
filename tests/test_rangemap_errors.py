"""The error contract of :class:`pkvm.RangeMap` and its twins: bad input raises, changes nothing.

- A non-integer (float, str, None, Decimal, a float array) raises ``TypeError``.
- A value outside ``uint64`` (negative, or above ``2**64 - 1``, ``end == 2**64`` included)
  raises ``OverflowError``; so does ``run_at(2**64 - 1)``.
- ``start > end``, arrays that are not 1-D or differ in length raise ``ValueError``.

Every message names the offending argument (and, for ``starts[i] > ends[i]``, the index), and
every bulk call is validated in full before anything changes: the bad element is always last.
"""

from decimal import Decimal

import numpy as np
import pytest

from pkvm.testing.reference import UINT64_MAX as U64

# ---------------------------------------------------------------------------------------------
# Bad input: the error names the argument and the map is unchanged
# ---------------------------------------------------------------------------------------------

BAD_SCALAR_CALLS = [
    pytest.param(lambda m: m.assign(1.0, 2, 8), TypeError, r"\bstart\b", id="assign-start-float"),
    pytest.param(lambda m: m.assign(1, "2", 8), TypeError, r"\bend\b", id="assign-end-str"),
    pytest.param(lambda m: m.assign(1, 2, None), TypeError, r"\bvalue\b", id="assign-value-None"),
    pytest.param(
        lambda m: m.assign(Decimal(1), 2, 8), TypeError, r"\bstart\b", id="assign-start-Decimal"
    ),
    pytest.param(
        lambda m: m.assign(np.float64(1), 2, 8),
        TypeError,
        r"\bstart\b",
        id="assign-start-np.float64",
    ),
    pytest.param(
        lambda m: m.assign(-1, 2, 8), OverflowError, r"\bstart\b", id="assign-start-negative"
    ),
    pytest.param(lambda m: m.assign(0, 2**64, 8), OverflowError, r"\bend\b", id="assign-end-2**64"),
    pytest.param(
        lambda m: m.assign(0, 2, 2**64), OverflowError, r"\bvalue\b", id="assign-value-2**64"
    ),
    pytest.param(
        lambda m: m.assign(0, 2, -1), OverflowError, r"\bvalue\b", id="assign-value-negative"
    ),
    pytest.param(
        lambda m: m.assign(0x10, 0x5, 8),
        ValueError,
        r"\bstart\b.*\bend\b",
        id="assign-start-after-end",
    ),
    pytest.param(lambda m: m.get("1"), TypeError, r"\bkey\b", id="get-key-str"),
    pytest.param(lambda m: m.get(-1), OverflowError, r"\bkey\b", id="get-key-negative"),
    pytest.param(lambda m: m.get(2**64), OverflowError, r"\bkey\b", id="get-key-2**64"),
    pytest.param(
        lambda m: m.find_ne(0, 10, 1.5), TypeError, r"\bvalue\b", id="find_ne-value-float"
    ),
    pytest.param(
        lambda m: m.find_ne(-1, 10, 1), OverflowError, r"\bstart\b", id="find_ne-start-negative"
    ),
    pytest.param(
        lambda m: m.find_ne(0, 2**64, 1), OverflowError, r"\bend\b", id="find_ne-end-2**64"
    ),
    pytest.param(
        lambda m: m.find_ne(10, 0, 1),
        ValueError,
        r"\bstart\b.*\bend\b",
        id="find_ne-start-after-end",
    ),
    pytest.param(lambda m: m.run_at(U64), OverflowError, r"\bkey\b", id="run_at-key-uint64-max"),
    pytest.param(lambda m: m.run_at(-1), OverflowError, r"\bkey\b", id="run_at-key-negative"),
    pytest.param(lambda m: m.run_at(1.0), TypeError, r"\bkey\b", id="run_at-key-float"),
    pytest.param(lambda m: m.ranges(-1), OverflowError, r"\bstart\b", id="ranges-start-negative"),
    pytest.param(lambda m: m.ranges(0, 2**64), OverflowError, r"\bend\b", id="ranges-end-2**64"),
    pytest.param(
        lambda m: m.ranges(5, 3), ValueError, r"\bstart\b.*\bend\b", id="ranges-start-after-end"
    ),
    pytest.param(lambda m: m.ranges(0.0), TypeError, r"\bstart\b", id="ranges-start-float"),
    pytest.param(
        lambda m: list(m.iter_ranges(0, -1)),
        OverflowError,
        r"\bend\b",
        id="iter_ranges-end-negative",
    ),
]


def _raises_and_changes_nothing(m, call, exc, match):
    """``call(m)`` raises ``exc`` matching ``match`` and leaves the populated map as it was."""
    before = m.ranges()
    with pytest.raises(exc, match=match):
        call(m)
    assert m.ranges() == before
    assert len(m) == 3
    m._check()


@pytest.mark.parametrize(("call", "exc", "match"), BAD_SCALAR_CALLS)
def test_bad_scalar_input_raises_and_changes_nothing(rangemap_cls, call, exc, match, populated):
    """A bad scalar argument raises an error naming it, and the map is unchanged."""
    _raises_and_changes_nothing(populated(), call, exc, match)


# ---------------------------------------------------------------------------------------------
# Call forms: assign, find_ne and get take their arguments positionally or by keyword
# ---------------------------------------------------------------------------------------------
# RangeMap's assign, find_ne and get have a C entry for positional arguments (pkvm/_core.pyx,
# pkvm_fastcall_override) and hand every other form to the generated method; both must agree.


class _Int(int):
    """An int subclass: not an exact int, so it takes the general conversion."""


CALL_FORMS = [
    pytest.param(lambda m, s, e, v: m.assign(s, e, v), id="positional"),
    pytest.param(lambda m, s, e, v: m.assign(start=s, end=e, value=v), id="keywords"),
    pytest.param(lambda m, s, e, v: m.assign(s, value=v, end=e), id="mixed"),
    pytest.param(lambda m, s, e, v: type(m).assign(m, s, e, v), id="unbound"),
    pytest.param(lambda m, s, e, v: m.assign(_Int(s), np.uint64(e), _Int(v)), id="int-like"),
]
FIND_FORMS = [
    pytest.param(lambda m, s, e, v: m.find_ne(s, e, v), id="positional"),
    pytest.param(lambda m, s, e, v: m.find_ne(start=s, end=e, value=v), id="keywords"),
    pytest.param(lambda m, s, e, v: m.find_ne(s, e, value=v), id="mixed"),
    pytest.param(lambda m, s, e, v: type(m).find_ne(m, s, e, v), id="unbound"),
    pytest.param(lambda m, s, e, v: m.find_ne(np.uint64(s), _Int(e), _Int(v)), id="int-like"),
]
# (start, end, value) steps; keys near 2**64 are not small ints (the general conversion)
STEPS = [(0x10, 0x18, 0), (0x14, 0x34, 8), (0x2, 0x3, 1), (2**64 - 9, 2**64 - 3, 1), (0, 0, 8)]


@pytest.mark.parametrize("assign", CALL_FORMS)
@pytest.mark.parametrize("find_ne", FIND_FORMS)
def test_call_forms_agree(rangemap_cls, populated, assign, find_ne):
    """Every call form of assign, find_ne and get gives what the positional call gives."""
    m, want = populated(), populated()
    for s, e, v in STEPS:
        assign(m, s, e, v)
        want.assign(s, e, v)
        assert m.ranges() == want.ranges()
        for q in [(0, 0x40, 0), (0x10, 0x20, 8), (0x14, 0x18, 8), (2**62, 2**64 - 1, 8)]:
            assert find_ne(m, *q) == want.find_ne(*q)
        for k in [0, 0x14, 0x33, 2**64 - 4, 2**64 - 1]:
            got = {m.get(k), m.get(key=k), type(m).get(m, k), m.get(_Int(k)), m.get(np.uint64(k))}
            assert got == {want.get(k)}
    m._check()


BAD_CALL_FORMS = [
    pytest.param(lambda m: m.assign(1, 2), r"assign\(\)", id="assign-two-args"),
    pytest.param(lambda m: m.assign(1, 2, 8, 9), r"assign\(\)", id="assign-four-args"),
    pytest.param(lambda m: m.assign(1, 2, val=8), r"\bval\b", id="assign-unknown-keyword"),
    pytest.param(lambda m: m.assign(1, 2, 8, start=1), r"\bstart\b", id="assign-start-twice"),
    pytest.param(lambda m: m.find_ne(1, 2), r"find_ne\(\)", id="find_ne-two-args"),
    pytest.param(lambda m: m.find_ne(0, 1, 2, 3), r"find_ne\(\)", id="find_ne-four-args"),
    pytest.param(lambda m: m.find_ne(0, 1, v=2), r"\bv\b", id="find_ne-unknown-keyword"),
    pytest.param(lambda m: m.get(), r"get\(\)", id="get-no-args"),
    pytest.param(lambda m: m.get(1, 2), r"get\(\)", id="get-two-args"),
    pytest.param(lambda m: m.get(k=1), r"\bk\b", id="get-unknown-keyword"),
]


@pytest.mark.parametrize(("call", "match"), BAD_CALL_FORMS)
def test_bad_call_forms_raise_and_change_nothing(rangemap_cls, populated, call, match):
    """A wrong argument count or keyword raises TypeError naming it; the map is unchanged."""
    _raises_and_changes_nothing(populated(), call, TypeError, match)


def test_call_form_signatures():
    """The C entries keep the methods' names, docstrings and signatures."""
    import inspect

    import pkvm

    for name, params, doc in [
        ("assign", ["start", "end", "value"], "half-open ``[start, end)``"),
        ("find_ne", ["start", "end", "value"], "half-open ``[start, end)``"),
        ("get", ["key"], "The value of ``key``"),
    ]:
        method = getattr(pkvm.RangeMap, name)
        assert method.__name__ == name
        assert list(inspect.signature(method).parameters) == ["self", *params]
        assert doc in method.__doc__
        with pytest.raises(TypeError, match=rf"descriptor '{name}' .* doesn't apply to a 'int'"):
            method(5, *range(len(params)))


def test_call_forms_in_a_subclass():
    """A Python subclass inherits the C entries and may override them."""
    import pkvm

    class Logged(pkvm.RangeMap):
        def assign(self, start, end, value):
            self.calls = getattr(self, "calls", 0) + 1
            super().assign(start, end, value)

    m = Logged()
    m.assign(0x10, 0x20, 8)
    assert m.calls == 1
    assert m.ranges() == [(0x10, 0x20, 8)]
    assert m.find_ne(0x10, 0x20, 8) == -1
    assert m.find_ne(start=0x10, end=0x21, value=8) == 0x20


@pytest.mark.parametrize(
    ("default", "exc"),
    [
        pytest.param(-1, OverflowError, id="negative"),
        pytest.param(2**64, OverflowError, id="2**64"),
        pytest.param(1.5, TypeError, id="float"),
        pytest.param("8", TypeError, id="str"),
    ],
)
def test_bad_default_raises(rangemap_cls, default, exc):
    """The default is validated like a value, under the name 'default'."""
    with pytest.raises(exc, match=r"\bdefault\b"):
        rangemap_cls(default=default)


def _u64(xs):
    return np.array(xs, dtype=np.uint64)


# Five entries each; the bad element is the last, after four valid entries that would change
# the map if they were applied before validation finished.
S = [0x100, 0x110, 0x120, 0x130, 0x140]
E = [0x108, 0x118, 0x128, 0x138, 0x148]
V = [8, 8, 1, 1, 9]

BAD_BULK_CALLS = [
    pytest.param(
        lambda m: m.assign_many(_u64(S).reshape(5, 1), _u64(E), 8),
        ValueError,
        r"\bstarts\b.*1-dimensional",
        id="starts-2d",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), np.uint64(5), 8),
        ValueError,
        r"\bends\b.*1-dimensional",
        id="ends-0d",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E[:4]), 8),
        ValueError,
        r"same length",
        id="ends-shorter",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E), _u64(V[:4])),
        ValueError,
        r"same length",
        id="values-shorter",
    ),
    pytest.param(
        lambda m: m.assign_many(np.array(S, dtype=float), _u64(E), 8),
        TypeError,
        r"\bstarts\b",
        id="starts-float-dtype",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), np.ones(5, dtype=bool), 8),
        TypeError,
        r"\bends\b",
        id="ends-bool-dtype",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E), np.array(V, dtype=complex)),
        TypeError,
        r"\bvalues\b",
        id="values-complex-dtype",
    ),
    pytest.param(
        lambda m: m.assign_many(np.array([str(s) for s in S]), _u64(E), 8),
        TypeError,
        r"\bstarts\b",
        id="starts-str-dtype",
    ),
    pytest.param(
        lambda m: m.assign_many(np.array([*S[:4], -1]), _u64(E), 8),
        OverflowError,
        r"\bstarts\b",
        id="starts-int64-negative-last",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), np.array([*E[:4], 2**64], dtype=object), 8),
        OverflowError,
        r"\bends\b",
        id="ends-object-2**64-last",
    ),
    pytest.param(
        lambda m: m.assign_many(np.array([*S[:4], 2.5], dtype=object), _u64(E), 8),
        TypeError,
        r"\bstarts\b",
        id="starts-object-float-last",
    ),
    pytest.param(
        lambda m: m.assign_many([U64 - 9, *S[1:4], -1], [U64 - 8, *E[1:]], 8),
        OverflowError,
        r"\bstarts\b",
        id="starts-list-mixing-negative-and-max",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64([*E[:4], 0x120]), 8),
        ValueError,
        r"(?=.*\bstarts\b)(?=.*\bends\b)(?=.*\b4\b)",
        id="start-after-end-last",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E), 8.0),
        TypeError,
        r"\bvalues\b",
        id="values-scalar-float",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E), -1),
        OverflowError,
        r"\bvalues\b",
        id="values-scalar-negative",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E), 2**64),
        OverflowError,
        r"\bvalues\b",
        id="values-scalar-2**64",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E), np.array([*V[:4], -1])),
        OverflowError,
        r"\bvalues\b",
        id="values-int64-negative-last",
    ),
    pytest.param(
        lambda m: m.assign_many(_u64(S), _u64(E), np.array([*V[:4], 2**64], dtype=object)),
        OverflowError,
        r"\bvalues\b",
        id="values-object-2**64-last",
    ),
    pytest.param(
        lambda m: m.get_many(_u64(S).reshape(5, 1)),
        ValueError,
        r"\bkeys\b.*1-dimensional",
        id="keys-2d",
    ),
    pytest.param(
        lambda m: m.get_many(np.array(S, dtype=float)),
        TypeError,
        r"\bkeys\b",
        id="keys-float-dtype",
    ),
    pytest.param(
        lambda m: m.get_many(np.array([*S[:4], -1])),
        OverflowError,
        r"\bkeys\b",
        id="keys-int64-negative-last",
    ),
    pytest.param(
        lambda m: m.get_many(np.array([*S[:4], "x"], dtype=object)),
        TypeError,
        r"\bkeys\b",
        id="keys-object-str-last",
    ),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_BULK_CALLS)
def test_bad_bulk_input_raises_and_changes_nothing(rangemap_cls, call, exc, match, populated):
    """A bad array raises an error naming it; even an error at the last entry changes nothing."""
    _raises_and_changes_nothing(populated(), call, exc, match)
