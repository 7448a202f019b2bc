"""The VM's typed counters (pkvm/_ledger.pxi) behave as the dict they replace: every mapping
operation against a plain dict driven by the same calls, unknown keys, and refusals (a key that
is not a str, a value that is not an int or does not fit an int64, removing a counter) that
change nothing."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping, MutableMapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import pkvm
from pkvm._core import _COUNTER_KEYS, Counters
from pkvm.kvm.vm import STAT_KEYS

KEYS = st.sampled_from(("pf_taken", "pf_fixed", "rmpupdate", "x", "psc_entries", "é"))
I64 = st.integers(-(1 << 63), (1 << 63) - 1)
SMALL = st.integers(-(1 << 40), 1 << 40)


def test_the_core_indices_are_stat_keys() -> None:
    """The core adds at fixed indices: the first keys of every VM's counters are STAT_KEYS."""
    assert _COUNTER_KEYS == STAT_KEYS
    for platform in ("sw_protected", "snp", "tdx"):
        vm = pkvm.VM(platform)
        assert type(vm._stats) is Counters
        assert tuple(vm._stats)[:len(STAT_KEYS)] == STAT_KEYS
        assert type(vm.stats) is dict and vm.stats == dict(vm._stats)


def test_counters_are_a_mutable_mapping() -> None:
    c = Counters(("a", "b"))
    assert isinstance(c, MutableMapping) and isinstance(c, Mapping)
    c["a"] += 5
    c["new"] = -3
    assert dict(c) == {"a": 5, "b": 0, "new": -3} and list(c) == ["a", "b", "new"]
    assert c == {"a": 5, "b": 0, "new": -3} and c != {"a": 5} and {"a": 5, "b": 0, "new": -3} == c
    assert (c == 3) is False and c != [1]
    assert list(c.keys()) == ["a", "b", "new"] and list(c.values()) == [5, 0, -3]
    assert list(c.items()) == [("a", 5), ("b", 0), ("new", -3)] and ("a", 5) in c.items()
    assert c.keys() & {"a", "zz"} == {"a"}
    assert c.get("zz") is None and c.get("zz", 7) == 7 and c.get("a", 7) == 5
    assert "a" in c and "zz" not in c
    for m in (c, {"a": 1}):  # as a dict: an unhashable key is a TypeError
        with pytest.raises(TypeError, match="unhashable"):
            [] in m  # noqa: B015
    assert repr(c) == "Counters({'a': 5, 'b': 0, 'new': -3})"
    assert type(c["a"]) is int and all(type(v) is int for v in c.values())
    with pytest.raises(TypeError, match="unhashable"):
        hash(c)
    for other in (copy.copy(c), copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert type(other) is Counters and other == c and list(other) == list(c)
        other["a"] = 0
        assert c["a"] == 5


def test_unknown_keys() -> None:
    c = Counters(("a",))
    with pytest.raises(KeyError, match="'zz'"):
        c["zz"]
    with pytest.raises(KeyError, match="'zz'"):
        c["zz"] += 1
    with pytest.raises(TypeError, match="unhashable"):
        c[[]]  # type: ignore[index]
    assert dict(c) == {"a": 0}
    assert c.setdefault("zz", 4) == 4 and c.setdefault("zz", 9) == 4 and list(c) == ["a", "zz"]


@pytest.mark.parametrize("call, match", [
    (lambda c: c.__setitem__(1, 0), "counter names must be str, not int"),
    (lambda c: c.__setitem__("a", 1.0), "counter 'a' must be an int, not float"),
    (lambda c: c.__setitem__("new", True), "counter 'new' must be an int, not bool"),
    (lambda c: c.__setitem__("a", "3"), "counter 'a' must be an int, not str"),
    (lambda c: c.__setitem__("a", 1 << 63), "does not fit an int64"),
    (lambda c: c.__setitem__("new", -(1 << 63) - 1), "does not fit an int64"),
    (lambda c: c.__delitem__("a"), "cannot be removed"),
    (lambda c: c.pop("a"), "cannot be removed"),
    (lambda c: c.pop("zz", 0), "cannot be removed"),
    (lambda c: c.popitem(), "cannot be removed"),
    (lambda c: c.clear(), "cannot be removed"),
    (lambda c: c.update({"b": 1, "a": 0.5}), "counter 'a' must be an int, not float"),
    (lambda c: c.update([("b", 1), ("c", 2, 3)]), "needs \\(key, value\\) pairs"),
    (lambda c: c.update(b=1, x=None), "counter 'x' must be an int, not NoneType"),
    (lambda c: c.setdefault("new", 0.0), "counter 'new' must be an int, not float"),
    (lambda c: Counters(("a", 3)), "counter names must be str, not int"),
])
def test_refusals_change_nothing(call, match) -> None:
    c = Counters(("a", "b"))
    c["a"] = 7
    before = list(c.items())
    with pytest.raises((TypeError, ValueError), match=match):
        call(c)
    assert list(c.items()) == before and len(c) == 2


def test_int_like_values_are_stored_as_int() -> None:
    import numpy as np

    c = Counters(("a",))
    c["a"] = np.int64(5)
    c["b"] = (1 << 63) - 1
    assert type(c["a"]) is int and c["a"] == 5 and c["b"] == (1 << 63) - 1
    c.update({"a": 1}, b=2)
    c.update([("c", 3)])
    assert dict(c) == {"a": 1, "b": 2, "c": 3}


class CountersVsDict(RuleBasedStateMachine):
    """Counters and a dict driven by the same calls stay equal (order included); a call the
    Counters refuses is one the dict would have taken a non-int value or removal for."""

    def __init__(self) -> None:
        super().__init__()
        self.c = Counters(("pf_taken", "pf_fixed"))
        self.d: dict[str, int] = dict.fromkeys(("pf_taken", "pf_fixed"), 0)

    @rule(key=KEYS, value=I64)
    def set(self, key: str, value: int) -> None:
        self.c[key] = value
        self.d[key] = value

    @rule(key=KEYS, n=SMALL)
    def add(self, key: str, n: int) -> None:
        if key in self.d and -(1 << 63) <= self.d[key] + n < (1 << 63):
            self.c[key] += n
            self.d[key] += n
        elif key not in self.d:
            with pytest.raises(KeyError, match=repr(key)):
                self.c[key] += n

    @rule(key=KEYS, default=st.none() | SMALL)
    def get(self, key: str, default: int | None) -> None:
        assert self.c.get(key, default) == self.d.get(key, default)
        assert (key in self.c) == (key in self.d)

    @rule(key=KEYS, default=SMALL)
    def setdefault(self, key: str, default: int) -> None:
        assert self.c.setdefault(key, default) == self.d.setdefault(key, default)

    @rule(pairs=st.lists(st.tuples(KEYS, I64), max_size=4))
    def update(self, pairs: list[tuple[str, int]]) -> None:
        self.c.update(pairs)
        self.d.update(pairs)

    @rule(key=KEYS, bad=st.sampled_from([1.5, None, "1", True, 1 << 64]))
    def refused(self, key: str, bad: object) -> None:
        with pytest.raises((TypeError, ValueError), match="counter"):
            self.c[key] = bad  # type: ignore[assignment]

    @rule(key=KEYS)
    def remove_refused(self, key: str) -> None:
        with pytest.raises(TypeError, match="cannot be removed"):
            del self.c[key]

    @invariant()
    def same(self) -> None:
        assert list(self.c.items()) == list(self.d.items())
        assert self.c == self.d and len(self.c) == len(self.d) and self.c.copy() == self.d
        assert list(self.c.keys()) == list(self.d.keys()) and list(self.c.values()) == list(self.d.values())


TestCountersVsDict = CountersVsDict.TestCase
TestCountersVsDict.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["map", "zap", "split"]), st.integers(0, 7),
                              st.sampled_from([1, 2])), max_size=12))
def test_mmu_over_a_dict_counts_as_over_counters(ops: list[tuple[str, int, int]]) -> None:
    """An ``Mmu`` built over a plain dict (the tests' and an embedder's way) counts exactly
    what the same calls count in a VM's Counters."""
    from pkvm.kvm import mmu

    keys = ("pages_4k", "pages_2m", "pages_1g", "zapped_sptes", "huge_page_splits")
    a = mmu.Mmu(dict.fromkeys(keys, 0), lambda op, n: None)
    b = mmu.Mmu(Counters(STAT_KEYS), lambda op, n: None)
    for m in (a, b):
        for op, chunk, level in ops:
            base = chunk * 512
            if op == "map":
                m.map_leaf(base + (0 if level == 2 else 3), level, mmu.make_spte(0, level, False, True))
            elif op == "zap":
                m.zap_range(base, base + 1)
            elif m.sptes.get(base):
                m.split_to(base, 1)
    assert {k: b._stats[k] for k in keys} == a._stats
    assert a.sptes.ranges() == b.sptes.ranges()


# -- the modeled-time ledger ---------------------------------------------------------------------

OPS = ("npf_fault", "attr_store", "rmpupdate")
PRICES = st.integers(0, 60 * 10**9)  # whole ns of one event, up to the cost model's MAX_NS (60 s)
COUNTS = st.integers(0, 1 << 40) | st.integers(0, (1 << 64) - 1)


@settings(max_examples=200, deadline=None)
@given(prices=st.tuples(PRICES, PRICES, PRICES),
       calls=st.lists(st.tuples(st.sampled_from(OPS), COUNTS), max_size=30),
       start=st.integers(-(1 << 70), 1 << 70))
def test_ledger_adds_as_python_ints(prices, calls, start) -> None:
    """Every charge adds price x n to the op's cell and to the total exactly as Python ints
    would, past int64 included (the total is an int, never a float), in first-charge order."""
    from pkvm._core import Ledger

    table = dict(zip(OPS, prices))
    led = Ledger(None, table)
    cost = led.cells
    led.modeled_ns = start
    want_cost: dict[str, int] = {}
    want = start
    for op, n in calls:
        led.charge(op, n)
        want_cost[op] = want_cost.get(op, 0) + table[op] * n
        want += table[op] * n
        assert type(led.modeled_ns) is int and led.modeled_ns == want
    assert list(cost.items()) == list(want_cost.items())
    assert all(type(v) is int for v in cost.values())


def test_ledger_refusals_change_nothing() -> None:
    from pkvm._core import Ledger

    led = Ledger(None, {"npf_fault": 7})
    cost = led.cells
    led.charge("npf_fault", 3)
    for bad in (1.0, "5", None):
        with pytest.raises(TypeError, match="modeled ns must be an int"):
            led.modeled_ns = bad  # type: ignore[assignment]
    with pytest.raises(KeyError, match="vmexit"):
        led.charge("vmexit", 1)
    assert led.modeled_ns == 21 and cost == {"npf_fault": 21}


def test_vm_modeled_time_past_int64_is_exact() -> None:
    """A 60 s attr_store over 1 TiB three times: 4.8e19 ns, past int64, still an exact int
    equal to the sum of the per-op cells."""
    vm = pkvm.VM("sw_protected", costs={"attr_store": "60s"})
    for i in range(3):
        vm.set_memory_attributes(0, 1 << 40, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE if i % 2 == 0 else 0)
    want = 3 * (1 << 28) * 60 * 10**9
    assert vm.modeled_ns == want and type(vm.modeled_ns) is int and want > (1 << 63)
    assert vm.cost_breakdown() == {"attr_store": want} and vm.clock() == want
    vm._modeled_ns = 5  # other layers set it (the exit replay): back in the int64 slot
    assert vm.modeled_ns == 5 and type(vm._modeled_ns) is int


def test_charge_events_carry_the_same_numbers() -> None:
    """With a subscriber, each C-path charge is the ``charge`` event (op, count, ns), and the
    events' ns sum to the modeled time; after unsubscribing nothing is delivered."""
    vm = pkvm.VM("sw_protected")
    gmem = vm.create_guest_memfd(1 << 30)
    vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, 1 << 30, 1 << 40, gmem, 0)
    vcpu = vm.create_vcpu()
    seen: list = []
    sub = vm.subscribe(seen.append, "charge")
    t0 = vm.modeled_ns
    vm.set_memory_attributes(0x5000, 4096, pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    vcpu.page_fault(0x5000, private=True)
    assert {e.op for e in seen} >= {"attr_store", "npf_fault"}
    assert sum(e.ns for e in seen) == vm.modeled_ns - t0
    assert all(type(e.ns) is int and e.ns == vm.costs.ns(e.op, e.count) for e in seen if e.op != "remote_tlb_flush")
    sub.close()
    n = len(seen)
    vcpu.page_fault(0x9000, private=False)
    assert len(seen) == n and vm.modeled_ns > t0


PRICE = {"npf_fault": 3, "attr_store": 100, "zap_spte": 7, "vmexit": 1}
CELL_OPS = st.sampled_from(tuple(PRICE))
BIG = st.integers(-(1 << 70), 1 << 70)


class CellsVsDict(RuleBasedStateMachine):
    """An actor's Cells and a dict driven by the same calls, the ledger's C adds among them,
    stay equal, insertion order included (a removed op comes back at the end)."""

    def __init__(self) -> None:
        super().__init__()
        from pkvm._core import Ledger

        self.led = Ledger(None, dict(PRICE))
        self.c = self.led.cells
        self.d: dict[str, int] = {}

    @rule(op=CELL_OPS, n=COUNTS)
    def charge(self, op: str, n: int) -> None:
        self.led.charge(op, n)
        self.d[op] = self.d.get(op, 0) + PRICE[op] * n

    @rule(op=CELL_OPS, value=BIG)
    def set(self, op: str, value: int) -> None:
        self.c[op] = value
        self.d[op] = value

    @rule(op=CELL_OPS)
    def delete(self, op: str) -> None:
        if op in self.d:
            del self.c[op]
            del self.d[op]
        else:
            with pytest.raises(KeyError, match=op):
                del self.c[op]

    @rule(op=CELL_OPS, default=st.none() | SMALL)
    def pop_get(self, op: str, default: int | None) -> None:
        assert self.c.get(op, default) == self.d.get(op, default)
        assert self.c.pop(op, default) == self.d.pop(op, default)

    @rule()
    def popitem(self) -> None:
        if self.d:
            assert self.c.popitem() == self.d.popitem()
        else:
            with pytest.raises(KeyError, match="empty"):
                self.c.popitem()

    @rule(op=CELL_OPS, bad=st.sampled_from([1.5, None, "1", True]))
    def refused(self, op: str, bad: object) -> None:
        with pytest.raises(TypeError, match="must be an int"):
            self.c[op] = bad  # type: ignore[assignment]

    @invariant()
    def same(self) -> None:
        assert list(self.c.items()) == list(self.d.items()) and self.c == self.d
        assert len(self.c) == len(self.d) and bool(self.c) == bool(self.d)
        assert all(type(v) is int for v in self.c.values())


TestCellsVsDict = CellsVsDict.TestCase
TestCellsVsDict.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_actor_cells_are_per_actor_and_typed() -> None:
    """Each actor's cells are a Cells of the VM's ledger; cost_by_actor and cost_breakdown read
    them as the dicts they were."""
    from pkvm._core import Cells

    vm = pkvm.VM("sw_protected")
    vm.create_vcpu()
    with vm.acting("vcpu0"):
        vm._charge("vmexit", 2)
    vm._charge("vmexit", 1)
    vm._charge("npf_fault", 1)
    assert all(type(c) is Cells for c in vm._actor_ns.values())
    vmexit, npf = vm.costs.ns("vmexit"), vm.costs.ns("npf_fault")
    assert vm.cost_by_actor() == {"vcpu0": {"vmexit": 2 * vmexit}, "vmm": {"vmexit": vmexit, "npf_fault": npf}}
    assert vm.cost_breakdown() == {"vmexit": 3 * vmexit, "npf_fault": npf}
    assert vm.clock("vcpu0") == 2 * vmexit and vm.modeled_ns == 3 * vmexit + npf
    other = pkvm.VM("sw_protected")
    with pytest.raises(ValueError, match="another VM's ledger"):
        vm._ledger.set_cost(other._ledger.cells)


def test_vm_modeled_ns_is_the_ledger_total() -> None:
    """``VM._modeled_ns`` reads and sets the ledger's total (the same int while nothing was
    charged); a non-int is refused and changes nothing."""
    from pkvm._core import LedgerTotal
    from pkvm.kvm.vm import VM

    assert isinstance(VM._modeled_ns, LedgerTotal)
    vm = pkvm.VM("sw_protected")
    vm._charge("vmexit", 3)
    t = vm._modeled_ns
    assert t == vm.modeled_ns == vm._ledger.modeled_ns == 3 * vm.costs.ns("vmexit") and type(t) is int
    with pytest.raises(TypeError, match="modeled ns must be an int"):
        vm._modeled_ns = 1.5  # type: ignore[assignment]
    assert vm._modeled_ns == t
    vm._modeled_ns = t + 10
    assert vm.modeled_ns == t + 10 and vm.clock() == t + 10
