"""``vcpu.page_fault_many`` with nobody subscribed is the loop of ``page_fault`` calls.

With no subscriber and no tracer the typed loop (``FaultPath.calls``) stores each fault's
result straight into the batch's arrays and builds a ``FaultResult`` only for a result the
arrays cannot hold (a memory-fault exit) or for the RMP-fault handler that takes one; with a
subscriber (tests/test_batch.py) it builds one per fault for the ``fault`` event. Here the
twins have no subscriber: every call's result, the counters (values and their int types), the
modeled time and the rest of the state must agree, after the whole batch and, in the
element-by-element mode, after every call.
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from test_batch import _ATTR_CALLS, _FAULT_GPA, PLATFORM_POLICY, _attr_case, build, loop_attrs, state

import pkvm


def typed(vm):
    """The counters and the modeled time with their types (JSON output tells 1 from 1.0)."""
    return sorted((k, type(v).__name__, v) for k, v in vm.stats.items()), type(vm.modeled_ns).__name__


def one(vcpu, g, p, w):
    """``page_fault``'s result, or the ``(errno, message)`` it raised."""
    try:
        return vcpu.page_fault(g, private=p, write=w)
    except pkvm.KvmError as e:
        return e.errno, str(e)


def batched(vcpu, gpas, private, write):
    """``page_fault_many``'s results (a list), then the ``(errno, message)`` it raised, if any."""
    try:
        b = vcpu.page_fault_many(np.array(gpas, dtype=np.uint64), private=np.array(private, dtype=bool),
                                 write=np.array(write, dtype=bool))
    except pkvm.FaultBatchError as e:
        assert e.index == len(e.batch)
        return [*e.batch, (e.errno, str(e))]
    rows = list(zip(b.ret.tolist(), b.level.tolist(), b.pfn.tolist(), b.errno.tolist(), b.retries.tolist(),
                    strict=True))
    assert rows == [(pkvm.FaultBatch.RET_NAMES.index(r.ret), r.level or 0, -1 if r.pfn is None else r.pfn,
                     r.errno or 0, r.retries) for r in b]
    return list(b)


_CALLS = st.lists(st.tuples(_FAULT_GPA, st.booleans(), st.booleans()), max_size=30)


@given(pp=PLATFORM_POLICY, before=_ATTR_CALLS, calls=_CALLS, again=st.booleans(), each=st.booleans())
def test_untraced_page_fault_many_is_the_loop(pp, before, calls, again, each):
    """Private and shared, read and write faults on random pages (often the same: spurious
    faults, huge-page splits), unmapped gfns (memory-fault exits), MMIO, TDX faults that kill
    the VM; ``again`` runs the calls twice (the second round on mapped pages)."""
    (va, ca), (vb, cb) = build(*pp), build(*pp)
    g, s, at = _attr_case(before, False)
    loop_attrs(va, g, s, at)
    loop_attrs(vb, g, s, at)
    calls = calls * 2 if again else calls
    want = []
    for gpa, p, w in calls:
        want.append(one(ca, gpa, p, w))
        if each:
            got = batched(cb, [gpa], [p], [w])
            assert got == want[-1:]
            assert typed(vb) == typed(va) and state(vb) == state(va)
        if type(want[-1]) is tuple:
            break
    if not each:
        got = batched(cb, [c[0] for c in calls], [c[1] for c in calls], [c[2] for c in calls])
        assert got == want
    assert typed(vb) == typed(va)
    assert state(vb) == state(va)
    va.check()
    vb.check()
