"""Benchmarks of the KVM model (issue 3): KVM_SET_MEMORY_ATTRIBUTES round trips, page faults, and
converting + touching a 1 TiB guest_memfd slot.

Run: ``python -m pytest bench/bench_vm.py --benchmark-only`` (add ``--benchmark-autosave`` to keep
the numbers). Each benchmark asserts what it computed, so a fast wrong answer fails. ``impl``
compares :class:`pkvm.VM` with the per-gfn :class:`~pkvm.testing.reference_vm.ReferenceVM` where the
reference can run at all.
"""

import pytest

import pkvm
from pkvm.testing.reference_vm import ReferenceVM

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
GMEM = pkvm.KVM_MEM_GUEST_MEMFD
UADDR = 1 << 40
GiB, TiB = 1 << 30, 1 << 40
CALLS = 20_000


def _per_call(benchmark, key, calls):
    """Record the best round's time per call (absent under --benchmark-disable)."""
    benchmark.extra_info["calls"] = calls
    if benchmark.stats is not None:
        benchmark.extra_info[key] = round(benchmark.stats.stats.min / calls * 1e6, 3)


def _vm(size, impl="core", **kw):
    vm = pkvm.VM("sw_protected", **kw) if impl == "core" else ReferenceVM("sw_protected", **kw)
    gmem = vm.create_guest_memfd(size)
    vm.set_user_memory_region2(0, GMEM, 0, size, UADDR, gmem, 0)
    return vm


@pytest.mark.benchmark(group="update")
@pytest.mark.parametrize("impl", ["core", "reference"])
def test_set_memory_attributes_4k_round_trip(benchmark, impl):
    """4K private -> shared round trips at scattered gfns of a 1 GiB slot (2 ioctls per round)."""
    vm = _vm(GiB, impl)
    sma = vm.set_memory_attributes
    n = CALLS if impl == "core" else CALLS // 20

    rounds = []

    def run():
        rounds.append(1)
        for i in range(n):
            a = (i * 7919 % 262144) << 12
            sma(a, 4096, PRIVATE)
            sma(a, 4096, 0)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _per_call(benchmark, "us_per_call", 2 * n)
    assert vm.stats["attr_stores"] == vm.stats["mmu_invalidate_seq"] == 2 * n * len(rounds)


@pytest.mark.benchmark(group="update")
def test_set_memory_attributes_2m_round_trip(benchmark):
    """2M-aligned private -> shared round trips in a 1 TiB slot."""
    vm = _vm(TiB)
    sma = vm.set_memory_attributes
    n = CALLS

    rounds = []

    def run():
        rounds.append(1)
        for i in range(n):
            a = (i * 7919 % 524288) << 21
            sma(a, 1 << 21, PRIVATE)
            sma(a, 1 << 21, 0)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _per_call(benchmark, "us_per_call", 2 * n)
    assert vm.stats["attr_stores"] == len(rounds) * 2 * n * 512
    vm.check()


@pytest.mark.benchmark(group="scenario")
def test_convert_1tib_in_2m_chunks(benchmark):
    """Convert a 1 TiB slot to private in 2M chunks: 524,288 ioctls (target <= 2 s)."""
    sizes = range(0, TiB, 1 << 21)

    def setup():
        return (_vm(TiB),), {}

    def run(vm):
        sma = vm.set_memory_attributes
        for a in sizes:
            sma(a, 1 << 21, PRIVATE)
        return vm

    vm = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert vm.stats["attr_stores"] == 1 << 28 and vm.stats["mmu_invalidate_seq"] == len(sizes)
    _per_call(benchmark, "us_per_call", len(sizes))
    if benchmark.stats is not None:
        benchmark.extra_info["gfns_per_s"] = (1 << 28) / benchmark.stats.stats.min


@pytest.mark.benchmark(group="scenario")
def test_convert_and_touch_1tib(benchmark):
    """set_memory_attributes(0, 1 TiB, PRIVATE) then access all of it privately: 2**28 faults."""

    def setup():
        vm = _vm(TiB)
        return (vm, vm.create_vcpu()), {}

    def run(vm, vcpu):
        vm.set_memory_attributes(0, TiB, PRIVATE)
        r = vcpu.access(0, private=True, size=TiB)
        assert r.faults == vm.stats["pages_4k"] == 1 << 28
        return r

    benchmark.pedantic(run, setup=setup, rounds=10, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["gfns_per_s"] = (1 << 28) / benchmark.stats.stats.min


@pytest.mark.benchmark(group="fault")
@pytest.mark.parametrize("impl", ["core", "reference"])
@pytest.mark.parametrize("kind", ["private-4k", "shared-2m"])
def test_page_fault(benchmark, impl, kind):
    """Single nested page faults that install a leaf (fault, then zap it so the next one installs)."""
    private = kind == "private-4k"
    vm = _vm(GiB, impl)
    if private:
        vm.set_memory_attributes(0, GiB, PRIVATE)
    if impl == "core":
        vcpu = vm.create_vcpu()
        fault = lambda g: vcpu.page_fault(g << 12, private=private)  # noqa: E731
        zap = vm.mmu.zap_range
    else:
        fault = lambda g: vm.page_fault(g, private, False)  # noqa: E731
        zap = vm.zap
    n = 5_000
    rounds = []

    def run():
        rounds.append(1)
        for i in range(n):
            g = i * 7919 % 262144
            fault(g)
            zap(g & -512, (g & -512) + 512)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _per_call(benchmark, "us_per_fault", n)
    assert vm.stats["pf_fixed"] == len(rounds) * n
