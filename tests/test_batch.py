"""Batched calls have exactly the semantics of the same calls in a loop.

``vm.set_memory_attributes_many`` and ``vcpu.page_fault_many`` are run on one VM and the same
calls one by one (``try/except KvmError``) on its twin, built the same way: Hypothesis draws the
calls, often invalid (unaligned, out of range, unsupported attributes, empty, wrapping past
2**64), for SW_PROTECTED, SNP and TDX VMs under several policies. The twins must agree on every
call's result, the counters, the modeled time and its split by operation and actor, the
attributes, SPTEs and the rest of the state, the events delivered to ``vm.subscribe``, the
warnings in ``vm.events``, and ``vm.check()``. Array-level errors are named cases: they raise
before anything runs.
"""

import errno
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tdxhelpers import full_snapshot, td
from vmhelpers import GMEM, PRIVATE, UADDR

import pkvm
from pkvm.experiments.trace import Tracer

MiB = 1 << 20
SIZE = 8 * MiB
U64_MAX = (1 << 64) - 1

POLICIES = {"sw_protected": ["6.19", "6.8", "rfc-v8"],
            "snp": ["6.19", "eager-split", "eager-locked", "6.19+attr_ioctl=legacy-progress+rmp_update=eager-post"],
            "tdx": ["6.19", "tdx-huge-pages"]}
PLATFORM_POLICY = st.sampled_from([(p, pol) for p, pols in POLICIES.items() for pol in pols])


def build(platform, policy):
    """A VM with one guest_memfd slot over [0, SIZE), the lower quarter private; (vm, vcpu)."""
    if platform == "tdx":  # a finalized TD: RAM private and pending, as QEMU builds it
        vm, _vmm, _gmem, vcpu = td(SIZE, policy=policy)
        return vm, vcpu
    vm = pkvm.VM(platform, policy=policy)
    gmem = vm.create_guest_memfd(SIZE)
    vm.set_user_memory_region2(0, GMEM, 0, SIZE, UADDR, gmem, 0)
    vm.set_memory_attributes(0, SIZE // 4, PRIVATE)
    return vm, vm.create_vcpu()


def record(vm):
    """Subscribe to every event; returns the list that fills up."""
    seen = []
    vm.subscribe(seen.append)
    return seen


def state(vm):
    """Everything the batch and the loop must leave alike."""
    return full_snapshot(vm, dict(vm.actor_totals()), vm.attr_ioctls, vm.mmu_lock_ns, list(vm.events),
                         vm.mmu_invalidate_in_progress)


def loop_attrs(vm, gpas, sizes, attrs, flags=0):
    out = []
    for i, (g, s) in enumerate(zip(gpas, sizes)):
        a = attrs[i] if isinstance(attrs, list) else attrs
        try:
            vm.set_memory_attributes(g, s, a, flags)
        except pkvm.KvmError as e:
            out.append(e.errno)
        else:
            out.append(0)
    return out


def loop_faults(vcpu, gpas, private, write):
    """The loop of page_fault calls: (results, (errno, message) of the call that raised or None)."""
    out = []
    for i, g in enumerate(gpas):
        p = private[i] if isinstance(private, list) else private
        w = write[i] if isinstance(write, list) else write
        try:
            out.append(vcpu.page_fault(g, private=p, write=w))
        except pkvm.KvmError as e:
            return out, (e.errno, str(e))
    return out, None


def batch_faults(vcpu, gpas, private, write):
    p = np.array(private, dtype=bool) if isinstance(private, list) else private
    w = np.array(write, dtype=bool) if isinstance(write, list) else write
    try:
        b = vcpu.page_fault_many(np.array(gpas, dtype=np.uint64), private=p, write=w)
    except pkvm.FaultBatchError as e:
        assert isinstance(e, pkvm.KvmError) and e.index == len(e.batch)
        return list(e.batch), (e.errno, str(e))
    check_batch_arrays(b)
    return list(b), None


def check_batch_arrays(b):
    """The numpy fields agree with the results, element by element."""
    assert len(b) == len(b.ret) == len(b.level) == len(b.pfn) == len(b.errno) == len(b.retries)
    for i, r in enumerate(b):
        assert b[i] == r and b[i - len(b)] == r  # built from the rows: equal, not the same object
        assert pkvm.FaultBatch.RET_NAMES[b.ret[i]] == r.ret
        assert b.level[i] == (r.level or 0)
        assert b.pfn[i] == (-1 if r.pfn is None else r.pfn)
        assert b.errno[i] == (r.errno or 0)
        assert b.retries[i] == r.retries


# Addresses and sizes a workload generator or a fuzzer produces: mostly valid pages and runs
# inside and around the slot (often the same few pages, so that calls overlap), and every
# invalid kind the ioctl checks.
_PAGE = st.one_of(st.integers(0, 63), st.integers(0, (SIZE >> 12) + 512)).map(lambda p: p << 12)
_GPA = st.one_of(_PAGE, _PAGE, _PAGE, _PAGE, st.integers(0, SIZE + 0x3000),
                 st.sampled_from([U64_MAX & ~0xFFF, U64_MAX, 1 << 52, 1 << 63, (1 << 40) << 12]))
_SIZE = st.one_of(st.integers(1, 16).map(lambda p: p << 12), st.integers(1, 16).map(lambda p: p << 12),
                  st.sampled_from([0x200000, 0x400000, 0x1000]),
                  st.sampled_from([0, 0x800, 0x1001, U64_MAX & ~0xFFF, 1 << 63]))
_ATTR = st.sampled_from([0, 0, PRIVATE, PRIVATE, PRIVATE, 1, 0x10, PRIVATE | 1, 1 << 63])
_ATTR_CALLS = st.lists(st.tuples(_GPA, _SIZE, _ATTR), max_size=25)


def _attr_case(calls, broadcast):
    gpas = [g for g, _, _ in calls]
    sizes = [s for _, s, _ in calls]
    attrs = calls[0][2] if broadcast and calls else [a for _, _, a in calls]
    return gpas, sizes, attrs


@given(pp=PLATFORM_POLICY, calls=_ATTR_CALLS, broadcast=st.booleans(), flags=st.sampled_from([0, 0, 0, 1]),
       inject=st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(0, 600))))
def test_set_memory_attributes_many_is_the_loop(pp, calls, broadcast, flags, inject):
    a, b = build(*pp), build(*pp)
    (va, _), (vb, _) = a, b
    if inject is not None:  # an xa_reserve that fails part way (ENOMEM, nothing changed)
        for vm in (va, vb):
            vm.inject_failure("xa_reserve", errno.ENOMEM, times=inject[0], after=inject[1])
    ea, eb = record(va), record(vb)
    gpas, sizes, attrs = _attr_case(calls, broadcast)
    want = loop_attrs(va, gpas, sizes, attrs, flags)
    got = vb.set_memory_attributes_many(np.array(gpas, dtype=np.uint64), np.array(sizes, dtype=np.uint64),
                                        np.array(attrs, dtype=np.uint64) if isinstance(attrs, list) else attrs,
                                        flags)
    assert got.dtype == np.int32 and got.tolist() == want
    assert eb == ea
    assert state(vb) == state(va)
    va.check()
    vb.check()


@given(pp=PLATFORM_POLICY, calls=_ATTR_CALLS, size=st.sampled_from([0, 0x1000, 0x1800, 0x200000, 1 << 63]))
def test_a_scalar_size_is_every_calls_size(pp, calls, size):
    a, b = build(*pp), build(*pp)
    (va, _), (vb, _) = a, b
    ea, eb = record(va), record(vb)
    gpas, _, attrs = _attr_case(calls, True)
    want = loop_attrs(va, gpas, [size] * len(gpas), attrs, 0)
    got = vb.set_memory_attributes_many(np.array(gpas, dtype=np.uint64), size, attrs)
    assert got.tolist() == want
    assert eb == ea and state(vb) == state(va)
    vb.check()


_FAULT_GPA = st.one_of(st.integers(0, 15).map(lambda p: p << 12),
                       st.integers(0, (SIZE >> 12) + 256).map(lambda p: p << 12),
                       st.integers(0, SIZE + 0x100000),
                       st.sampled_from([(1 << 52) - 0x1000, 1 << 40]))
_FLAGS = st.one_of(st.booleans(), st.lists(st.booleans(), min_size=30, max_size=30))


@given(pp=PLATFORM_POLICY, before=_ATTR_CALLS, gpas=st.lists(_FAULT_GPA, max_size=30), private=_FLAGS,
       write=_FLAGS, acting=st.booleans())
def test_page_fault_many_is_the_loop(pp, before, gpas, private, write, acting):
    """Mixed private and shared, read and write faults, unmapped gfns (memory-fault exits), MMIO,
    and TDX private faults on pending pages, which kill the VM: the loop raises EIO at the next
    call, and so does the batch (FaultBatchError, with the results before it)."""
    a, b = build(*pp), build(*pp)
    (va, ca), (vb, cb) = a, b
    g, s, at = _attr_case(before, False)
    loop_attrs(va, g, s, at)
    vb.set_memory_attributes_many(g, s, np.array(at, dtype=np.uint64))
    n = len(gpas)
    private = private[:n] if isinstance(private, list) else private
    write = write[:n] if isinstance(write, list) else write
    ea, eb = record(va), record(vb)
    if acting:  # charged to the vCPU, as pkvm.Guest does
        with va.acting("vcpu0"):
            want = loop_faults(ca, gpas, private, write)
        with vb.acting("vcpu0"):
            got = batch_faults(cb, gpas, private, write)
    else:
        want = loop_faults(ca, gpas, private, write)
        got = batch_faults(cb, gpas, private, write)
    assert got == want
    assert eb == ea
    assert state(vb) == state(va)
    va.check()
    vb.check()


def test_dead_vm_batches_record_and_raise_eio():
    """A TD killed by a private access to a mapped, pending page: every later attribute call records
    EIO; the fault batch raises at its first call, with no result before it."""
    vm, _vmm, _gmem, vcpu = td(SIZE)
    assert vcpu.page_fault(0x1000, private=True).ret == "fixed"  # PAGE.AUG: mapped, pending
    assert vcpu.page_fault(0x1000, private=True).errno == errno.EIO and vm.vm_dead
    before = state(vm)
    assert vm.set_memory_attributes_many([0, 0x1001], [0x1000, 0x1000], 0).tolist() == [errno.EIO, errno.EIO]
    with pytest.raises(pkvm.FaultBatchError, match="the VM is dead") as e:
        vcpu.page_fault_many([0, 0x1000], private=False)
    assert e.value.errno == errno.EIO and e.value.index == 0 and len(e.value.batch) == 0
    back = pickle.loads(pickle.dumps(e.value))  # exceptions travel pickled (dask workers)
    assert (type(back), back.errno, str(back), back.index) == (pkvm.FaultBatchError, errno.EIO, str(e.value), 0)
    assert state(vm) == before


def test_vm_dying_mid_batch():
    """The VM dies inside call 1 (the kernel's kvm_vm_dead, reached from an event callback on
    both twins): calls 2 and 3 record EIO in the batch as in the loop."""
    twins = [build("sw_protected", "6.19") for _ in range(2)]
    for vm, _ in twins:
        def kill(ev, vm=vm):
            if ev.kind == "attr_change" and not vm.vm_dead and ev.gfn_start == 0x400:
                vm._kill("killed by the test")
        vm.subscribe(kill)
    args = ([0x200000, 0x400000, 0x600000, 0x600000], [0x1000] * 4, PRIVATE)
    want = loop_attrs(twins[0][0], *args)
    got = twins[1][0].set_memory_attributes_many(*args)
    assert want == got.tolist() == [0, 0, errno.EIO, errno.EIO]
    assert state(twins[1][0]) == state(twins[0][0])


def test_edeadlk_while_a_phased_ioctl_is_open():
    twins = [build("snp", "6.19") for _ in range(2)]
    for vm, _ in twins:
        vm.begin_set_memory_attributes(0x200000, 0x1000, PRIVATE).step()
    args = ([0x300000, 0x300001], [0x1000, 0x1000], [PRIVATE, PRIVATE])
    want = loop_attrs(twins[0][0], *args)
    got = twins[1][0].set_memory_attributes_many(*args)
    assert want == got.tolist() == [errno.EDEADLK, errno.EINVAL]
    assert state(twins[1][0]) == state(twins[0][0])


def test_td_not_finalized_raises_einval_like_page_fault():
    vm, _vmm, _gmem, vcpu = td(SIZE, finalize=False)
    with pytest.raises(pkvm.KvmError, match="the TD is not finalized") as loop:
        vcpu.page_fault(0x1000, private=False)
    with pytest.raises(pkvm.FaultBatchError, match="the TD is not finalized") as batch:
        vcpu.page_fault_many([0x1000], private=False)
    assert batch.value.errno == loop.value.errno == errno.EINVAL and batch.value.index == 0


def test_tracer_attached_takes_the_loop_and_traces_the_same():
    """With a tracer attached the batch is the loop: the same trace text."""
    import io
    outs = []
    for batched in (False, True):
        vm, vcpu = build("snp", "6.19")
        sink = io.StringIO()
        vm.trace(Tracer(sink))
        gpas = [0x200000, 0x201000, 0x7FF001, SIZE]
        if batched:
            vm.set_memory_attributes_many(gpas, [0x1000] * 4, PRIVATE)
            vcpu.page_fault_many(gpas, private=True, write=[True, False, False, True])
        else:
            loop_attrs(vm, gpas, [0x1000] * 4, PRIVATE)
            loop_faults(vcpu, gpas, True, [True, False, False, True])
        outs.append((sink.getvalue(), state(vm)))
    assert outs[0] == outs[1] and "kvm_page_fault" in outs[0][0]


def test_fault_batch_is_a_sequence():
    gpas, private = [0, 0x1000, SIZE, SIZE + 0x1000, 0x1000], [True, True, False, True, True]
    vm, vcpu = build("sw_protected", "6.19")
    want, _ = loop_faults(vcpu, gpas, private, False)
    vm, vcpu = build("sw_protected", "6.19")
    b = vcpu.page_fault_many(gpas, private=private)
    assert list(b) == want and [r.ret for r in b] == ["fixed", "fixed", "emulate", "exit", "spurious"]
    assert isinstance(b[1:3], pkvm.FaultBatch) and list(b[1:3]) == want[1:3] and b[-1] == list(b)[-1]
    check_batch_arrays(b)
    assert b.ret.tolist() == [0, 0, 3, 4, 1] and b.errno.tolist() == [0, 0, 0, errno.EFAULT, 0]
    assert b.ret.dtype == np.int8 and b.pfn.dtype == np.int64 and "fixed=2" in repr(b)


def test_empty_batches_change_nothing():
    vm, vcpu = build("snp", "6.19")
    before = state(vm)
    assert vm.set_memory_attributes_many([], [], PRIVATE).tolist() == []
    assert len(vcpu.page_fault_many(np.array([], dtype=np.uint64), private=True)) == 0
    assert state(vm) == before


_G = np.array([0x1000, 0x2000], dtype=np.uint64)
_S = np.array([0x1000, 0x1000], dtype=np.uint64)


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda vm, v: vm.set_memory_attributes_many(_G.reshape(1, 2), _S.reshape(1, 2), 0), ValueError,
     r"gpas must be a 1-D array, not 2-D"),
    (lambda vm, v: vm.set_memory_attributes_many(np.uint64(0x1000), _S, 0), ValueError, r"gpas must be a 1-D array"),
    (lambda vm, v: vm.set_memory_attributes_many(_G.astype(float), _S, 0), TypeError,
     r"gpas must be an array of integers, not of dtype float64"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S.astype(bool), 0), TypeError,
     r"sizes must be an array of integers, not of dtype bool"),
    (lambda vm, v: vm.set_memory_attributes_many([0x1000, 1 << 64], [1, 1], 0), ValueError,
     r"gpas\[1\] = 0x10000000000000000 does not fit a u64"),
    (lambda vm, v: vm.set_memory_attributes_many(np.array([0x1000, 1 << 64], dtype=object), _S, 0), TypeError,
     r"gpas must be an array of integers, not of dtype object"),
    (lambda vm, v: vm.set_memory_attributes_many([0x1000, True], _S, 0), TypeError,
     r"gpas\[1\] must be an int, not bool"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, (0x1000, -0x1000), 0), ValueError,
     r"sizes\[1\] = -4096 is negative"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S[:1], 0), ValueError,
     r"sizes has 1 elements, gpas has 2: the lengths must be equal"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S, np.array([8], dtype=np.uint64)), ValueError,
     r"attributes has 1 elements, gpas has 2"),
    (lambda vm, v: vm.set_memory_attributes_many(np.array([0x1000, -0x2000, -1]), _S[[0, 1, 1]], 0), ValueError,
     r"gpas\[1\] = -8192 is negative"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S, -1), ValueError, r"attributes=-0x1 does not fit a u64"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, -1, 0), ValueError, r"sizes=-0x1 does not fit a u64"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, 4096.0, 0), TypeError,
     r"sizes must be an int or a 1-D integer array, not float"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S, True), TypeError,
     r"attributes must be an int or a 1-D integer array, not bool"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S, 8.0), TypeError, r"attributes must be an int .* not float"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S, 8, 1 << 64), ValueError, r"flags=0x10{16} does not fit a u64"),
    (lambda vm, v: vm.set_memory_attributes_many(_G, _S, 8, "0"), TypeError, r"flags must be an int .* not str"),
    (lambda vm, v: v.page_fault_many(_G, private=1), TypeError, r"private must be a bool or a 1-D bool array, not int"),
    (lambda vm, v: v.page_fault_many(_G, private=True, write=np.array([0, 1])), TypeError,
     r"write must be a bool or an array of dtype bool, not of dtype int64"),
    (lambda vm, v: v.page_fault_many(_G, private=np.array([True])), ValueError,
     r"private has 1 elements, gpas has 2: the lengths must be equal"),
    (lambda vm, v: v.page_fault_many(_G, private=np.ones((2, 1), dtype=bool)), ValueError,
     r"private must be a bool or a 1-D bool array, not 2-D"),
    (lambda vm, v: v.page_fault_many(np.array([0x1000, 1 << 52], dtype=np.uint64), private=False), ValueError,
     r"gpas\[1\] = 0x10000000000000 is outside the 52-bit guest physical address space"),
    (lambda vm, v: v.page_fault_many(np.array([-1, 0]), private=False), ValueError, r"gpas\[0\] = -1 is negative"),
    (lambda vm, v: v.page_fault_many(["0x1000"], private=False), TypeError, r"gpas\[0\] must be an int, not str"),
    (lambda vm, v: v.page_fault_many(np.array(["0x1000"]), private=False), TypeError,
     r"gpas must be an array of integers, not of dtype <U6"),
])
def test_array_errors_raise_before_anything_runs(call, exc, match):
    vm, vcpu = build("snp", "6.19")
    ev = record(vm)
    before = state(vm)
    with pytest.raises(exc, match=match):
        call(vm, vcpu)
    assert state(vm) == before and ev == []


def test_timeline_batches_are_the_loop():
    """On the concurrent timeline (a vCPU faulting while the VMM converts), the batch is the loop
    of public calls: the same results, events, state and timeline result."""
    import simpy

    from pkvm.sim import Timeline
    gpas = [0x200000, 0x201000, 0x3FF000, 0x200000, 0x600001, SIZE]
    private = [True, False, True, False, True, False]
    outs = []
    for batched in (False, True):
        vm, vcpu = build("sw_protected", "6.19")
        env = simpy.Environment()
        tl = Timeline(vm, env)
        ev = record(vm)
        res = {}

        def vmm(vm=vm, res=res, batched=batched):
            if batched:
                res["attrs"] = vm.set_memory_attributes_many(gpas, [0x1000] * 6, PRIVATE).tolist()
            else:
                res["attrs"] = loop_attrs(vm, gpas, [0x1000] * 6, PRIVATE)

        def vcpu0(vcpu=vcpu, res=res, batched=batched):
            run = batch_faults if batched else loop_faults
            res["faults"] = run(vcpu, gpas, private, False)

        tl.spawn("vmm", vmm)
        tl.spawn("vcpu0", vcpu0)
        env.run()
        r = tl.result()
        outs.append((res, ev, state(vm), r.critical_path_ns, r.actors))
    assert outs[0] == outs[1]
    assert outs[0][0]["attrs"] == [0, 0, 0, 0, errno.EINVAL, 0] and len(outs[0][0]["faults"][0]) == 6


def test_a_vcpu_class_without_entry_checks_gets_page_fault_per_call():
    """A vCPU subclass that overrides page_fault but does not say what it checks before the
    fault (``_fault_entry_check``) gets its own page_fault called once per element."""
    calls = []

    class Counting(pkvm.Vcpu):
        __slots__ = ()

        def page_fault(self, gpa, *, private, write=False):
            calls.append((gpa, private, write))
            return super().page_fault(gpa, private=private, write=write)

    vm, _ = build("sw_protected", "6.19")
    b = Counting(vm, 0).page_fault_many([0x1000, 0x2000], private=[True, False], write=True)
    assert calls == [(0x1000, True, True), (0x2000, False, True)] and len(b) == 2
    td_vcpu = td(SIZE)[3]
    assert "_fault_entry_check" in type(td_vcpu).__dict__ and "page_fault" in type(td_vcpu).__dict__


def test_both_batched_calls_refuse_an_event_callback_also_when_empty():
    """From an event callback both batched calls raise EDEADLK before any call runs, also for
    an empty batch (``page_fault_many([])`` returned an empty batch there, while
    ``set_memory_attributes_many([])`` raised), ``page_fault_many`` as a FaultBatchError
    with index 0."""
    import errno as _errno

    vm = pkvm.VM("sw_protected", policy="6.19")
    gmem = vm.create_guest_memfd(1 << 30)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 1 << 30, 1 << 40, gmem)
    c = vm.create_vcpu()
    got: list[object] = []

    def cb(_e):
        if got:
            return
        for call in (lambda: vm.set_memory_attributes_many([], 0x1000, 8),
                     lambda: c.page_fault_many([], private=False),
                     lambda: c.page_fault_many([0, 4096], private=True)):
            try:
                got.append(call())
            except pkvm.KvmError as ex:
                got.append((type(ex).__name__, ex.errno, getattr(ex, "index", None)))

    vm.subscribe(cb)
    vm.set_memory_attributes(0, 0x1000, 8)
    assert got == [("KvmError", _errno.EDEADLK, None), ("FaultBatchError", _errno.EDEADLK, 0),
                   ("FaultBatchError", _errno.EDEADLK, 0)]
