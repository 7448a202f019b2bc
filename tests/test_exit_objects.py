"""The exit objects of the guest and the VMM (``Hypercall``, ``GuestOpResult``, ``ExitResult``,
extension types in the core, pkvm/_results.pxi) behave as the dataclasses they replaced: the
same fields and defaults, value equality, hashing (``ExitResult`` only), repr, pattern matching,
pickling and (``ExitResult``) immutability; a VMM answer's ``detail`` built when read says what
it would have said when the exit was answered."""

import errno
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pkvm
from pkvm.kvm.exits import ExitResult, GuestOpResult, Hypercall

MiB = 1 << 20

_opt_int = st.none() | st.integers(-(1 << 64), 1 << 64)
_guest_op = st.builds(
    GuestOpResult, st.sampled_from(["done", "exit", "rmp_loop", "retry_loop"]), _opt_int, _opt_int,
    _opt_int, st.none() | st.builds(Hypercall, st.integers(0, 20), st.tuples(*[st.integers(0, 1 << 52)] * 3)),
    st.none() | st.tuples(*[st.integers(0, 1 << 52)] * 3), _opt_int, st.integers(0, 9), st.integers(0, 9),
    st.none() | st.text(max_size=8))
_exit = st.builds(ExitResult, st.booleans(), st.sampled_from(["KVM_HC_MAP_GPA_RANGE", "exit"]), _opt_int,
                  st.integers(0, 200), st.text(max_size=12))

GUEST_OP_FIELDS = ("ret", "status", "value", "exit_reason", "hypercall", "memory_fault", "errno",
                   "faults", "retries", "loop")


def _fields(obj, names):
    return tuple(getattr(obj, n) for n in names)


def test_defaults_and_repr_are_the_dataclasses():
    assert repr(GuestOpResult("done")) == (
        "GuestOpResult(ret='done', status=None, value=None, exit_reason=None, hypercall=None, "
        "memory_fault=None, errno=None, faults=0, retries=0, loop=None)")
    assert repr(Hypercall(12, (0x1000, 2, 16))) == "Hypercall(nr=12, args=(4096, 2, 16), ret=0, flags=0)"
    assert repr(ExitResult(True, "exit")) == (
        "ExitResult(handled=True, step='exit', exit_reason=None, errno=0, detail='')")
    hc = Hypercall(12, (0x3000, 5, 0))
    assert (hc.gpa, hc.size) == (0x3000, 5 << 12)
    assert GuestOpResult.__match_args__ == GUEST_OP_FIELDS
    assert ExitResult.__match_args__ == ("handled", "step", "exit_reason", "errno", "detail")
    assert Hypercall.__match_args__ == ("nr", "args", "ret", "flags")


@given(_guest_op, _guest_op)
def test_guest_op_result_is_compared_by_value_and_pickles(a, b):
    assert (a == b) == (_fields(a, GUEST_OP_FIELDS) == _fields(b, GUEST_OP_FIELDS))
    assert (a != b) == (not a == b)
    assert pickle.loads(pickle.dumps(a)) == a
    assert GuestOpResult(*_fields(a, GUEST_OP_FIELDS)) == a
    assert a != _fields(a, GUEST_OP_FIELDS)  # never equal to another type


@given(_exit, _exit)
def test_exit_result_is_compared_and_hashed_by_value(a, b):
    names = ExitResult.__match_args__
    assert (a == b) == (_fields(a, names) == _fields(b, names))
    assert hash(a) == hash(_fields(a, names))
    assert bool(a) is a.handled
    assert pickle.loads(pickle.dumps(a)) == a


def test_mutability_is_the_dataclasses():
    r = GuestOpResult("done", status=0)
    r.status = 5
    hc = Hypercall(12, (0, 1, 0))
    hc.ret = 7  # userspace writes its answer
    assert (r.status, hc.ret) == (5, 7)
    for obj in (r, hc):
        with pytest.raises(TypeError, match="unhashable type"):
            hash(obj)
    a = ExitResult(False, "exit", 1, 0, "no")
    with pytest.raises(AttributeError, match="not writable"):
        a.handled = True  # type: ignore[misc]


def test_pattern_matching():
    match GuestOpResult("exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL, hypercall=Hypercall(12, (0x2000, 1, 0))):
        case GuestOpResult("exit", hypercall=Hypercall(12, (gpa, n, _))):
            assert (gpa, n) == (0x2000, 1)
        case _:
            pytest.fail("no match")
    match ExitResult(True, "KVM_HC_MAP_GPA_RANGE", 5, 0, "converted"):
        case ExitResult(True, step, _, 0, detail):
            assert (step, detail) == ("KVM_HC_MAP_GPA_RANGE", "converted")
        case _:
            pytest.fail("no match")


def test_lazy_detail_is_built_once_and_equals_the_eager_answer():
    calls = []

    def why(a, b):
        calls.append((a, b))
        return f"{a}+{b}"

    lazy = ExitResult._lazy(False, "exit", 3, errno.EINVAL, why, (1, 2))
    assert calls == []
    eager = ExitResult(False, "exit", 3, errno.EINVAL, "1+2")
    assert lazy == eager and hash(lazy) == hash(eager) and repr(lazy) == repr(eager)
    assert lazy.detail == "1+2" and calls == [(1, 2)]
    assert pickle.loads(pickle.dumps(lazy)) == eager


def test_vmm_answer_detail_is_what_it_was_when_answered():
    """The VMM's answer to a failed conversion names the failure of that conversion, even when
    read after later conversions failed for another reason."""
    vm = pkvm.VM("snp", policy="6.19")
    vmm = pkvm.Vmm(vm)
    vmm.add_ram(0, 8 * MiB)
    vmm.launch()
    guest = pkvm.Guest(vm, vmm)
    hc = Hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (16 * MiB, 1, pkvm.KVM_MAP_GPA_RANGE_ENCRYPTED))
    first = vmm.handle_exit(guest.vcpu, GuestOpResult("exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL, hypercall=hc))
    assert not first.handled and first.errno == errno.EINVAL and hc.ret == 0  # QEMU stops the VM
    vmm.convert_memory(0x1001, 0x1000, True)  # fails otherwise: not page-aligned
    assert "page-aligned" in vmm.last_failure
    assert first.detail == ("converting [0x1000000, +0x1000) to private failed with EINVAL: "
                            f"gpa {16 * MiB:#x} is in no memslot: the VM stops (RUN_STATE_INTERNAL_ERROR)")
    ok = vmm.handle_exit(guest.vcpu, GuestOpResult(
        "exit", exit_reason=pkvm.KVM_EXIT_HYPERCALL,
        hypercall=Hypercall(pkvm.KVM_HC_MAP_GPA_RANGE, (2 * MiB, 512, pkvm.KVM_MAP_GPA_RANGE_DECRYPTED))))
    assert ok and ok.errno == 0 and ok.detail == "converted [0x200000, +0x200000) to shared"
