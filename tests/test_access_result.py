"""``pkvm.AccessResult`` (``Vcpu.access``'s result, an extension type in the core,
pkvm/_results.pxi) keeps the public face of the frozen dataclass it replaced: the same fields,
order and defaults, value equality and hashing, repr, pattern matching, pickling and
immutability. The reference is that dataclass, defined here."""

import dataclasses
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vmhelpers import MiB, gmem_vm

import pkvm
from pkvm.kvm.mmu import AccessResult


@dataclasses.dataclass(frozen=True, slots=True)
class AccessResultRef:  # the frozen dataclass pkvm.AccessResult was (pkvm/kvm/mmu.py)
    ret: str
    pages_done: int
    faults: int
    level: int | None = None
    pfn: int | None = None
    exit_reason: int | None = None
    memory_fault: tuple[int, int, int] | None = None
    errno: int | None = None
    retries: int = 0
    loop: str | None = None


AccessResultRef.__qualname__ = "AccessResult"  # its repr names the class so, as it did in pkvm
FIELDS = tuple(f.name for f in dataclasses.fields(AccessResultRef))
_opt_int = st.none() | st.integers(-(1 << 64), 1 << 64)
_args = st.tuples(st.sampled_from(["done", "exit", "emulate", "rmp_loop", "retry_loop"]), st.integers(0, 1 << 40),
                  st.integers(0, 1 << 40), _opt_int, _opt_int, _opt_int,
                  st.none() | st.tuples(*[st.integers(0, 1 << 52)] * 3), _opt_int, st.integers(0, 9),
                  st.none() | st.sampled_from(["RET_PF_RETRY", "#NPF refault", "rmp"]))


def _fields(obj):
    return tuple(getattr(obj, n) for n in FIELDS)


def test_fields_defaults_and_repr_are_the_dataclasses():
    assert AccessResult.__match_args__ == FIELDS
    assert pkvm.AccessResult is AccessResult
    for args, kw in (((("done", 5, 1)), {}), (("exit", 0, 1, None, None, 39, (0x1000, 0x1000, 8), 14), {}),
                     (("retry_loop", 2, 9), {"retries": 9, "loop": "RET_PF_RETRY"})):
        assert repr(AccessResult(*args, **kw)) == repr(AccessResultRef(*args, **kw))
        assert _fields(AccessResult(*args, **kw)) == _fields(AccessResultRef(*args, **kw))
    with pytest.raises(TypeError, match="at least 3 positional arguments"):
        AccessResult("done")  # type: ignore[call-arg]  # the required fields, as the dataclass


@given(_args, _args)
def test_equality_hashing_and_pickling_are_by_value(a_args, b_args):
    a, b = AccessResult(*a_args), AccessResult(*b_args)
    ra, rb = AccessResultRef(*a_args), AccessResultRef(*b_args)
    assert _fields(a) == _fields(ra)
    assert repr(a) == repr(ra)
    assert (a == b) == (ra == rb)
    assert (a != b) == (ra != rb)
    assert hash(a) == hash(AccessResult(*a_args)) and hash(a) == hash(_fields(a))
    assert pickle.loads(pickle.dumps(a)) == a
    assert AccessResult(**dict(zip(FIELDS, a_args))) == a
    assert a != ra and a != _fields(a)  # never equal to another type


def test_immutable():
    r = AccessResult("done", 1, 0)
    for name in FIELDS:
        with pytest.raises(AttributeError, match="not writable"):
            setattr(r, name, 1)
    with pytest.raises(AttributeError, match="has no attribute"):
        r.other = 1  # type: ignore[attr-defined]  # no __dict__, as a slots dataclass
    assert _fields(r) == ("done", 1, 0, None, None, None, None, None, 0, None)


def test_pattern_matching_and_vcpu_access():
    vm, _gmem, vcpu = gmem_vm(4 * MiB)
    r = vcpu.access(0, private=False, write=True, size=2 * MiB)
    assert type(r) is AccessResult
    match r:
        case AccessResult("done", pages_done, faults):
            assert (pages_done, faults) == (512, r.faults) and faults >= 1
        case _:
            pytest.fail(f"unexpected {r!r}")
