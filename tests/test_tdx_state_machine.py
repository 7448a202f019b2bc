"""Hypothesis state machines: a TDX :class:`pkvm.VM` (+ ``pkvm.Vmm`` / ``pkvm.Guest``) against the
per-gfn :class:`pkvm.testing.reference_tdx.ReferenceTdx`.

Each rule runs one operation on both (the TD build, conversions by the VMM and by the guest's
MapGPA, accepts and lazy acceptance, faults, accesses, hole punches, memslot changes, injected
TDX_OPERAND_BUSY), then compares attributes, every SPTE (mirror and direct root), every S-EPT
leaf (state and level), the S-EPT page tables, guest-inhibit bits, folios, ``nr_premapped``,
all counters, modeled time and the cost breakdown, and runs ``vm.check()``. Errors must match
errno for errno (a dead VM answers EIO to both). Profiles: ``HYPOTHESIS_PROFILE=dev|ci``.
"""

import errno

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import pkvm
from pkvm.constants import KVM_TDX_MEASURE_MEMORY_REGION, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from pkvm.platforms._tdx_sept import STATE_NAMES, leaf_level
from pkvm.testing.reference_tdx import ReferenceTdx

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE
PUNCH = pkvm.FALLOC_FL_PUNCH_HOLE | pkvm.FALLOC_FL_KEEP_SIZE
SEAMCALL_NAMES = ["sept_add", "aug", "add", "block", "track", "remove", "wbinvd", "demote", "mr_extend", "mr_finalize"]
_PAGES = {PG_LEVEL_4K: 1, PG_LEVEL_2M: 512, PG_LEVEL_1G: 1 << 18}


def both(real, ref):
    """Run ``real()`` and ``ref()``; they must both return or both raise with one errno."""
    out = []
    for fn in (real, ref):
        try:
            out.append(("ok", fn()))
        except pkvm.KvmError as exc:
            out.append(("err", exc.errno))
    assert out[0][0] == out[1][0], out
    if out[0][0] == "err":
        assert out[0][1] == out[1][1], out
        return None
    return out[0][1], out[1][1]


class TdxMachine(RuleBasedStateMachine):
    """A TD with two guest_memfd slots: build, finalize, then guest and VMM activity."""

    UNIVERSE = 4096          # gfns the rules touch (8 2M chunks); slot 0 [0, 2048), slot 1 [2048, 3072)
    policy = "6.19"
    shared_backing = "thp"
    nr_vcpus = 2
    gpaw = 48

    def __init__(self):
        super().__init__()
        opts = {"gpaw": self.gpaw}
        self.vm = pkvm.VM("tdx", policy=self.policy, shared_backing=self.shared_backing,
                          nr_vcpus=self.nr_vcpus, options=opts)
        self.ref = ReferenceTdx(self.policy, self.shared_backing, self.nr_vcpus, gpaw=self.gpaw)
        self.vmm = pkvm.Vmm(self.vm)
        self.ref.hc_enabled = True
        self.vcpu = self.vm.create_vcpu()
        self.ref.create_vcpu()
        self.guest = pkvm.Guest(self.vm, self.vmm, self.vcpu)
        self.pairs = []

    # -- helpers ------------------------------------------------------------------------------

    @property
    def runnable(self):
        return self.vm.tdx.runnable and not self.vm.vm_dead

    def _slot(self, sid, base, npages, pgoff=0, private=True):
        gm = self.vm.create_guest_memfd((npages + pgoff) << 12)
        rg = self.ref.create_guest_memfd((npages + pgoff) << 12)
        uaddr, flag = (0x100000 + base) << 12, pkvm.KVM_MEM_GUEST_MEMFD
        self.vm.set_user_memory_region2(sid, flag, base << 12, npages << 12, uaddr, gm, pgoff << 12)
        self.ref.set_user_memory_region2(sid, flag, base << 12, npages << 12, uaddr, rg, pgoff << 12)
        self.pairs.append((gm, rg))
        if private:
            self.vm.set_memory_attributes(base << 12, npages << 12, PRIVATE)
            self.ref.set_memory_attributes(base << 12, npages << 12, PRIVATE)

    def _range(self, data, max_len=1024):
        start = data.draw(st.one_of(st.integers(0, self.UNIVERSE - 1), st.sampled_from(range(0, self.UNIVERSE, 512)),
                                    st.sampled_from([1, 511, 513, 2047, 2048, 3071])))
        n = data.draw(st.one_of(st.integers(1, max_len), st.sampled_from([1, 2, 511, 512, 1024])))
        return start, min(n, self.UNIVERSE + 64 - start)

    @initialize(data=st.data())
    def setup(self, data):
        """Two guest_memfd slots marked private, as QEMU's kvm_set_phys_mem does; usually a
        small image is added and the TD finalized (QEMU's launch), else the rules build it."""
        self._slot(0, 0, 2048)
        self._slot(1, 2048, 1024, pgoff=512)
        if data.draw(st.integers(0, 3)):
            n, measure = data.draw(st.integers(1, 16)), data.draw(st.booleans())
            if self.vm.policy.gmem_max_order:
                n = 1  # populate marks the whole 2M folio prepared: its other pages are EEXIST
            flags = KVM_TDX_MEASURE_MEMORY_REGION if measure else 0
            assert self.vm.tdx.init_mem_region(self.vcpu, 0, n, flags=flags) == n
            assert self.ref.init_mem_region(0, n, measure) == (n, 0)
            self.vm.tdx.finalize_vm()
            self.ref.finalize()

    # -- the TD build ---------------------------------------------------------------------------

    @precondition(lambda self: not self.vm.tdx.runnable)
    @rule(data=st.data(), measure=st.booleans())
    def build(self, data, measure):
        """KVM_TDX_INIT_MEM_REGION on a small region (also outside slots or not private)."""
        start = data.draw(st.one_of(st.integers(0, 3200), st.sampled_from([0, 2047, 2048])))
        n = data.draw(st.integers(1, 40))

        def real():
            try:
                return self.vm.tdx.init_mem_region(self.vcpu, start << 12, n,
                                                   flags=KVM_TDX_MEASURE_MEMORY_REGION if measure else 0), 0
            except pkvm.KvmError as exc:
                if not hasattr(exc, "progress"):
                    raise
                return n - exc.progress[1], exc.errno

        res = both(real, lambda: self.ref.init_mem_region(start, n, measure))
        if res:
            assert res[0] == res[1]

    @precondition(lambda self: not self.vm.tdx.runnable)
    @rule()
    def finalize(self):
        """KVM_TDX_FINALIZE_VM."""
        both(self.vm.tdx.finalize_vm, self.ref.finalize)

    # -- VMM ------------------------------------------------------------------------------------

    @rule(data=st.data(), private=st.booleans())
    def set_attrs(self, data, private):
        """KVM_SET_MEMORY_ATTRIBUTES directly (no discard / punch)."""
        start, n = self._range(data, 2048)
        attrs = PRIVATE if private else 0
        both(lambda: self.vm.set_memory_attributes(start << 12, n << 12, attrs),
             lambda: self.ref.set_memory_attributes(start << 12, n << 12, attrs))

    @rule(data=st.data(), private=st.booleans())
    def vmm_convert(self, data, private):
        """QEMU's kvm_convert_memory (attributes, then discard or punch)."""
        start, n = self._range(data)
        res = both(lambda: self.vmm.convert_memory(start << 12, n << 12, private),
                   lambda: self.ref.convert_memory(start << 12, n << 12, private))
        if res:
            assert res[0] == res[1]

    @rule(data=st.data())
    def punch_hole(self, data):
        """fallocate(PUNCH_HOLE) on a guest_memfd: zaps the mirror root only."""
        gm, rg = data.draw(st.sampled_from(self.pairs))
        if gm.closed:
            return
        off = data.draw(st.integers(0, gm.npages))
        n = data.draw(st.integers(1, gm.npages + 8))
        gm.fallocate(PUNCH, off << 12, n << 12)
        self.ref.fallocate(rg, PUNCH, off << 12, n << 12)

    @rule(data=st.data())
    def busy(self, data):
        """Make the next calls of a SEAMCALL return TDX_OPERAND_BUSY."""
        name = data.draw(st.sampled_from(SEAMCALL_NAMES))
        times = data.draw(st.sampled_from([1, 1, 2]))
        self.vm.tdx.inject_busy(name, times)
        self.ref.busy[name] = self.ref.busy.get(name, 0) + times

    @rule()
    def clear_busy(self):
        """Drop pending BUSY injections (so later rules see a quiet TDX module)."""
        for name in SEAMCALL_NAMES:
            self.vm.tdx.inject_busy(name, 0)
        self.ref.busy.clear()

    @rule()
    def delete_slot1(self):
        """Delete slot 1 (zaps both roots), if it exists."""
        if self.vm.memslot(1) is None or self.vm.vm_dead:
            return
        self.vm.set_user_memory_region2(1, 0, 0, 0)
        self.ref.set_user_memory_region2(1, 0, 0, 0)

    # -- guest ----------------------------------------------------------------------------------

    @precondition(lambda self: self.runnable)
    @rule(data=st.data(), write=st.booleans())
    def fault(self, data, write):
        """One EPT violation (rarely a private one on a pending page, which kills the TD)."""
        gfn = data.draw(st.integers(0, self.UNIVERSE - 1))
        private = bool(self.vm.get_memory_attributes(gfn) & PRIVATE) if data.draw(st.integers(0, 3)) else \
            data.draw(st.booleans())
        if private and self.vm.sept.state(gfn) == "pending" and data.draw(st.integers(0, 29)):
            return  # kill the TD only now and then
        res = both(lambda: self.vcpu.page_fault(gfn << 12, private=private, write=write),
                   lambda: self.ref.page_fault(gfn, private, write))
        if res:
            r, (ret, err, flags) = res
            assert r.ret == ret
            if ret == "exit":
                assert r.errno == err and (r.memory_fault[2] if r.memory_fault else None) == flags

    @precondition(lambda self: self.runnable)
    @rule(data=st.data(), write=st.booleans())
    def access(self, data, write):
        """A guest access; private ones avoid PENDING pages most of the time."""
        start, n = self._range(data, 600)
        private = data.draw(st.booleans())
        if private and data.draw(st.integers(0, 29)):
            for g in range(start, start + n):
                if self.vm.sept.state(g) != "mapped":
                    n = g - start
                    break
            if not n:
                return
        res = both(lambda: self.vcpu.access(start << 12, private=private, write=write, size=n << 12),
                   lambda: self.ref.access(start, n, private, write))
        if res:
            r, want = res
            assert (r.ret, r.pages_done, r.faults) == want[:3]

    @precondition(lambda self: self.runnable)
    @rule(data=st.data())
    def accept(self, data):
        """One TDG.MEM.PAGE.ACCEPT (unanswered exits stay pending: the VMM answers next)."""
        level = data.draw(st.sampled_from([PG_LEVEL_4K, PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G]))
        gfn = data.draw(st.integers(0, self.UNIVERSE - 1))
        if data.draw(st.integers(0, 5)):
            gfn &= ~(_PAGES[level] - 1)

        def real():
            r = self.guest.execute(self.vcpu.accept(gfn << 12, level))
            if r.ret == "exit":
                self.vcpu._resume = None  # the test drops the stuck TDCALL
            return r

        def ref():
            while True:
                r = self.ref.accept(gfn << 12, level)
                if (r[0] == "exit" and r[3] == errno.EFAULT and not self.ref.dead
                        and self.ref._answer_fault(gfn << 12)):
                    continue
                return r

        res = both(real, ref)
        if res:
            r, want = res
            assert r.ret == want[0]
            if r.ret == "done":
                assert r.status == want[1]

    @precondition(lambda self: self.runnable)
    @rule(data=st.data())
    def lazy_accept(self, data):
        """The Linux guest's tdx_accept_memory over a range (bulk vs TDCALL by TDCALL)."""
        start, n = self._range(data)
        res = both(lambda: bool(self.guest.accept(start << 12, n << 12)),
                   lambda: self.ref.accept_memory(start << 12, (start + n) << 12))
        self.vcpu._resume = None  # a TDCALL stuck in an exit the VMM refused is dropped
        if res:
            assert res[0] == res[1]

    @precondition(lambda self: self.runnable)
    @rule(data=st.data(), private=st.booleans(), interrupts=st.sampled_from([0, 0, 1, 2]))
    def guest_convert(self, data, private, interrupts):
        """set_memory_encrypted/decrypted: MapGPA (answered by the VMM), then accept."""
        start, n = self._range(data, 1500)
        self.vcpu.pending_interrupts = self.ref.pending_interrupts = interrupts
        res = both(lambda: bool(self.guest.convert(start << 12, n << 12, private=private)),
                   lambda: self.ref.guest_convert(start << 12, n << 12, private))
        self.vcpu._resume = None
        if res:
            assert res[0] == res[1]

    @precondition(lambda self: self.runnable)
    @rule(data=st.data())
    def raw_map_gpa(self, data):
        """MapGPA with odd operands: every TDVMCALL status of §7.2."""
        shared = self.vm.tdx.shared_mask
        gpa = data.draw(st.one_of(st.integers(0, self.UNIVERSE) .map(lambda g: g << 12),
                                  st.sampled_from([0x800, shared, shared - 4096, (1 << self.gpaw) - 4096,
                                                   (1 << 64) - 4096])))
        if data.draw(st.booleans()):
            gpa |= shared
        size = data.draw(st.sampled_from([0, 4096, 0x1800, 2 << 20, (2 << 20) + 4096, 5 << 20, (1 << 64) - 4096]))
        self.vcpu.pending_interrupts = self.ref.pending_interrupts = data.draw(st.sampled_from([0, 1]))

        def real():
            r = self.guest.execute(self.vcpu.map_gpa(gpa & ((1 << 64) - 1), size))
            return r.status, r.value

        res = both(real, lambda: self.ref.map_gpa_answered(gpa & ((1 << 64) - 1), size))
        self.vcpu._resume = None
        if res:
            assert res[0] == res[1]

    # -- comparison ---------------------------------------------------------------------------

    @invariant()
    def same_state(self):
        vm, ref = self.vm, self.ref
        vm.check()
        assert vm.vm_dead == ref.dead and vm.vm_bugged == ref.bugged
        hi = 2 * self.UNIVERSE
        assert {g: v for s, e, v in vm._attrs.iter_ranges(0, hi) for g in range(s, e)} == ref.attrs
        sptes = {g: tuple(vm.mmu.lookup(g)) for s, e, _ in vm.mmu.sptes.iter_ranges() for g in range(s, e)}
        assert sptes == ref.sptes
        sept = {g: (STATE_NAMES[v & 7], leaf_level(v)) for s, e, v in vm.sept.leaves.iter_ranges() for g in range(s, e)}
        assert sept == ref.sept
        tables = {(t, i) for t in range(1, vm.sept.levels) for s, e, _ in vm.sept.tables[t].iter_ranges()
                  for i in range(s, e)}
        assert tables == ref.tables
        assert {c for s, e, _ in vm.sept.guest_inhibit.iter_ranges() for c in range(s, e)} == ref.inhibit
        assert vm.tdx.nr_premapped == ref.nr_premapped
        assert vm.tdx.runnable == ref.runnable
        for gm, rg in self.pairs:
            got = {i: gm.folio(i) for s, e, _ in gm.folios.iter_ranges() for i in range(s, e)}
            want = {i: (f[0], f[1], rg.prepared[f[2]]) for i, f in rg.folios.items()}
            assert got == want
        assert vm.stats == ref.stats
        assert vm.cost_breakdown() == ref.cost
        assert vm.modeled_ns == ref.modeled_ns


def _scaled(cls, weight):
    """The active profile's settings, sized so that the four machines fit the profile's budget:
    ``dev`` (40 examples, 40 steps) runs ``weight`` x 20 examples, ``ci`` (500 examples, 100
    steps) ``weight`` x 80."""
    base = settings.default
    per_machine = 80 if base.max_examples >= 200 else 20
    cls.TestCase.settings = settings(base, max_examples=max(8, int(per_machine * weight)))
    return cls.TestCase


TestTdxStateMachine = _scaled(TdxMachine, 1.5)


class TdxMachine616(TdxMachine):
    """6.16: premap then ADD (nr_premapped), inline BUSY handling."""

    policy = "6.16"


TestTdxStateMachine616 = _scaled(TdxMachine616, 0.75)


class TdxMachineZapAll(TdxMachine):
    """zap_filter="all" (6.8-6.11's PRE hook on a TD): conversions zap both roots."""

    policy = pkvm.Policy.preset("6.19").replace(zap_filter="all")
    shared_backing = "4k"
    nr_vcpus = 4
    gpaw = 52


TestTdxStateMachineZapAll = _scaled(TdxMachineZapAll, 0.75)


class TdxMachineHuge(TdxMachine):
    """Beyond upstream: the TDX huge page series on 2M guest_memfd folios."""

    policy = "tdx-huge-pages"


TestTdxStateMachineHuge = _scaled(TdxMachineHuge, 1)
