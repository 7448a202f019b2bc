"""Hypothesis state machines: :class:`pkvm.VM` against the per-gfn :class:`ReferenceVM`.

Every rule runs the same operation on both, then compares attributes, ``disallow_lpage``
words (count and MIXED), leaf SPTEs, guest_memfd folios, counters and modeled time, and runs
``vm.check()``. Profiles ``dev`` / ``ci`` (``HYPOTHESIS_PROFILE``) are registered in
``conftest.py``.
"""

import errno

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

import pkvm
from pkvm.testing.reference_vm import ReferenceVM

PRIVATE = pkvm.KVM_MEMORY_ATTRIBUTE_PRIVATE


def _scaled(cls):
    """The active profile's settings with a sixth of the examples: seven machines share CI."""
    base = settings.default
    cls.TestCase.settings = settings(base, max_examples=max(10, base.max_examples // 6))
    return cls.TestCase


class VmMachine(RuleBasedStateMachine):
    """Random memslot changes, conversions, faults, accesses, hole punches and closes."""

    UNIVERSE = 4096          # gfns the rules touch (8 2M chunks)
    MAX_OP = 4096            # largest range one rule touches
    vm_type = "sw_protected"
    shared_backing = "thp"
    policy = "6.19"

    gmems = Bundle("gmems")

    def __init__(self):
        super().__init__()
        self.vm = pkvm.VM(self.vm_type, policy=self.policy, shared_backing=self.shared_backing)
        self.ref = ReferenceVM(self.vm_type, policy=self.policy, shared_backing=self.shared_backing)
        self.vcpu = self.vm.create_vcpu()
        self.pairs = {}       # fd -> (GuestMemfd, RefGmem)
        self.next_off = {}    # fd -> first unbound page offset

    # -- strategies ---------------------------------------------------------------------------

    def _range(self, data, max_len=None):
        u = self.UNIVERSE
        max_len = max_len or self.MAX_OP
        start = data.draw(st.one_of(st.integers(0, u - 1), st.sampled_from(range(0, u, 512)),
                                    st.sampled_from([1, 511, 513, u - 1])))
        n = data.draw(st.one_of(st.integers(1, min(max_len, u + 64 - start)),
                                st.sampled_from([1, 2, 512, 1024, 2048])))
        return start, n

    def _gfn(self, data):
        """A gfn, usually inside a memslot."""
        slots = self.vm.memslots
        if slots and data.draw(st.integers(0, 9)):
            s = data.draw(st.sampled_from(slots))
            return data.draw(st.one_of(st.integers(s.base_gfn, s.end_gfn - 1),
                                       st.sampled_from([s.base_gfn, s.end_gfn - 1])))
        return data.draw(st.integers(0, self.UNIVERSE - 1))

    def _private(self, data, gfn):
        """The access type: usually the one the attributes ask for."""
        if data.draw(st.integers(0, 4)):
            return bool(self.vm.get_memory_attributes(gfn) & PRIVATE)
        return data.draw(st.booleans())

    @initialize(target=gmems)
    def first_slot(self):
        """Start with a 2M-aligned guest_memfd slot of 4 chunks (if the VM has private memory)."""
        if not self.vm.platform.has_private_mem:
            self.vm.set_user_memory_region2(0, 0, 0, 2048 << 12, 0x100000 << 12)
            self.ref.set_user_memory_region2(0, 0, 0, 2048 << 12, 0x100000 << 12)
            return None
        gm, rg = self.vm.create_guest_memfd(2048 << 12), self.ref.create_guest_memfd(2048 << 12)
        self.pairs[gm.fd] = (gm, rg)
        flags = pkvm.KVM_MEM_GUEST_MEMFD
        self.vm.set_user_memory_region2(0, flags, 0, 2048 << 12, 0x100000 << 12, gm, 0)
        self.ref.set_user_memory_region2(0, flags, 0, 2048 << 12, 0x100000 << 12, rg, 0)
        return gm.fd

    # -- rules --------------------------------------------------------------------------------

    @rule(target=gmems, data=st.data())
    def create_slot(self, data):
        """Create a memslot (guest_memfd-backed or not) where none exists."""
        free_ids = [i for i in range(4) if self.vm.memslot(i) is None]
        if not free_ids:
            return None
        sid = data.draw(st.sampled_from(free_ids))
        base, npages = self._range(data)
        taken = any(s.base_gfn < base + npages and base < s.end_gfn for s in self.vm.memslots)
        with_gmem = data.draw(st.booleans())
        skew = data.draw(st.sampled_from([0, 0, 0, 1, 512]))
        uaddr = (0x100000 + base + skew) << 12
        flags = pkvm.KVM_MEM_GUEST_MEMFD if with_gmem else data.draw(
            st.sampled_from([0, 0, pkvm.KVM_MEM_READONLY, pkvm.KVM_MEM_LOG_DIRTY_PAGES]))
        gm = rg = None
        pgoff = 0
        if with_gmem:
            pgoff = data.draw(st.sampled_from([0, 0, 1, 512]))
            size = (pgoff + npages + data.draw(st.integers(0, 600))) << 12
            gm, rg = self.vm.create_guest_memfd(size), self.ref.create_guest_memfd(size)
            self.pairs[gm.fd] = (gm, rg)
        if taken:
            with pytest.raises(pkvm.KvmError, match="overlap") as exc:
                self.vm.set_user_memory_region2(sid, flags, base << 12, npages << 12, uaddr, gm, pgoff << 12)
            assert exc.value.errno == errno.EEXIST
        else:
            self.vm.set_user_memory_region2(sid, flags, base << 12, npages << 12, uaddr, gm, pgoff << 12)
            self.ref.set_user_memory_region2(sid, flags, base << 12, npages << 12, uaddr, rg, pgoff << 12)
        return gm.fd if gm else None

    @rule(data=st.data())
    def delete_slot(self, data):
        """Delete a memslot."""
        slots = [s.key for s in self.vm.memslots]
        if slots:
            sid = data.draw(st.sampled_from(slots))
            self.vm.set_user_memory_region2(sid, 0, 0, 0)
            self.ref.set_user_memory_region2(sid, 0, 0, 0)

    @rule(data=st.data())
    def move_or_reflag_slot(self, data):
        """Move a non-guest_memfd slot, or toggle its dirty logging."""
        slots = [s for s in self.vm.memslots if not s.flags & pkvm.KVM_MEM_GUEST_MEMFD]
        if not slots:
            return
        s = data.draw(st.sampled_from(slots))
        if data.draw(st.booleans()):
            if s.flags & pkvm.KVM_MEM_READONLY:
                return
            flags = s.flags ^ pkvm.KVM_MEM_LOG_DIRTY_PAGES
            base = s.base_gfn
        else:
            flags = s.flags
            base = data.draw(st.integers(0, self.UNIVERSE))
            if any(o.key != s.key and o.base_gfn < base + s.npages and base < o.end_gfn for o in self.vm.memslots):
                return
        self.vm.set_user_memory_region2(s.key, flags, base << 12, s.npages << 12, s.userspace_addr)
        self.ref.set_user_memory_region2(s.key, flags, base << 12, s.npages << 12, s.userspace_addr)

    @rule(data=st.data(), private=st.booleans())
    def set_attrs(self, data, private):
        """KVM_SET_MEMORY_ATTRIBUTES on a random range (also outside memslots)."""
        if data.draw(st.booleans()):
            start, n = self._range(data)
        else:
            start = self._gfn(data)
            n = data.draw(st.sampled_from([1, 2, 511, 512, 513]))
        attrs = PRIVATE if private else 0
        self.vm.set_memory_attributes(start << 12, n << 12, attrs)
        self.ref.set_memory_attributes(start << 12, n << 12, attrs)

    @rule(data=st.data(), write=st.booleans())
    def fault(self, data, write):
        """One nested page fault."""
        gfn = self._gfn(data)
        private = self._private(data, gfn)
        r = self.vcpu.page_fault(gfn << 12, private=private, write=write)
        ret, err, flags = self.ref.page_fault(gfn, private, write)
        assert r.ret == ret
        if ret == "exit":
            assert r.errno == err
            assert (r.memory_fault[2] if r.memory_fault else None) == flags

    @rule(data=st.data(), write=st.booleans())
    def access(self, data, write):
        """A multi-page guest access, compared page for page."""
        if data.draw(st.booleans()):
            start, n = self._range(data)
        else:
            start = self._gfn(data)
            n = data.draw(st.integers(1, 2048))
        private = self._private(data, start)
        r = self.vcpu.access(start << 12, private=private, write=write, size=n << 12)
        ret, done, faults, err = self.ref.access(start, n, private, write)
        assert (r.ret, r.pages_done, r.faults) == (ret, done, faults)
        if ret == "exit":
            assert r.errno == err

    @rule(fd=gmems, data=st.data())
    def punch_hole(self, fd, data):
        """fallocate(PUNCH_HOLE | KEEP_SIZE) on a guest_memfd."""
        if fd is None or self.pairs[fd][0].closed:
            return
        gm, rg = self.pairs[fd]
        off = data.draw(st.integers(0, gm.npages))
        n = data.draw(st.integers(1, gm.npages + 8))
        mode = pkvm.FALLOC_FL_PUNCH_HOLE | pkvm.FALLOC_FL_KEEP_SIZE
        gm.fallocate(mode, off << 12, n << 12)
        self.ref.fallocate(rg, mode, off << 12, n << 12)

    @rule(fd=gmems, data=st.data())
    def allocate(self, fd, data):
        """fallocate(KEEP_SIZE) inside a guest_memfd."""
        if fd is None or self.pairs[fd][0].closed:
            return
        gm, rg = self.pairs[fd]
        off = data.draw(st.integers(0, gm.npages - 1))
        n = data.draw(st.integers(1, gm.npages - off))
        gm.fallocate(pkvm.FALLOC_FL_KEEP_SIZE, off << 12, n << 12)
        self.ref.fallocate(rg, pkvm.FALLOC_FL_KEEP_SIZE, off << 12, n << 12)

    @rule(fd=consumes(gmems))
    def close(self, fd):
        """Close a guest_memfd (its slots stay, private faults there then exit)."""
        if fd is None or self.pairs[fd][0].closed:
            return
        gm, rg = self.pairs[fd]
        gm.close()
        self.ref.close(rg)

    # -- comparison ---------------------------------------------------------------------------

    @invariant()
    def same_state(self):
        vm, ref = self.vm, self.ref
        vm.check()
        hi = 2 * self.UNIVERSE + 1024
        assert {g: v for s, e, v in vm._attrs.iter_ranges(0, hi) for g in range(s, e)} == \
            {g: v for g, v in ref.attrs.items() if g < hi}
        assert not any(g >= hi for g in ref.attrs)
        sptes = {}
        for s, e, _ in vm.mmu.sptes.iter_ranges():
            for g in range(s, e):
                sptes[g] = tuple(vm.mmu.lookup(g))
        assert sptes == ref.sptes
        assert sorted(s.key for s in vm.memslots) == sorted(ref.slots)
        for slot in vm.memslots:
            rs = ref.slots[slot.key]
            for level in (pkvm.PG_LEVEL_2M, pkvm.PG_LEVEL_1G):
                for g in rs.lpage[level]:
                    assert slot.lpage.word(g, level) == rs.lpage[level][g], (slot, level, hex(g))
        for gm, rg in self.pairs.values():
            got = {}
            for s, e, _v in gm.folios.iter_ranges():
                for i in range(s, e):
                    pfn, order, prepared = gm.folio(i)
                    got[i] = (pfn, order, prepared)
            want = {i: (f[0], f[1], rg.prepared[f[2]]) for i, f in rg.folios.items()}
            assert got == want
        assert vm.stats == ref.stats
        assert vm.modeled_ns == ref.modeled_ns
        assert vm.cost_breakdown() == ref.cost


TestVmStateMachine = _scaled(VmMachine)


class VmMachine611(VmMachine):
    """Same, under the 6.11 policy (whole-range zap, no hugepage guard)."""

    policy = "6.11"


TestVmStateMachine611 = _scaled(VmMachine611)


class VmMachine68Hugetlb(VmMachine):
    """6.8 (attribute-derived is_private, start-only head check) with 4K shared backing."""

    policy = "6.8"
    shared_backing = "4k"


TestVmStateMachine68 = _scaled(VmMachine68Hugetlb)


class VmMachineOrder9(VmMachine):
    """2M guest_memfd folios (``gmem_max_order=9``): hugepage private mappings."""

    policy = pkvm.Policy.preset("6.19").replace(gmem_max_order=9)


TestVmStateMachineOrder9 = _scaled(VmMachineOrder9)


class VmMachineRfcV8(VmMachine):
    """The RFC v8 design: the UPM-era attribute ioctl and 6.8's MMU."""

    policy = "rfc-v8"


TestVmStateMachineRfcV8 = _scaled(VmMachineRfcV8)


class DefaultVmMachine(VmMachine):
    """A DEFAULT VM: attributes stay 0; slots cannot bind guest_memfd."""

    vm_type = "default"

    @rule(target=VmMachine.gmems, data=st.data())
    def create_slot(self, data):
        free_ids = [i for i in range(4) if self.vm.memslot(i) is None]
        if not free_ids:
            return None
        sid = data.draw(st.sampled_from(free_ids))
        base, npages = self._range(data)
        if any(s.base_gfn < base + npages and base < s.end_gfn for s in self.vm.memslots):
            return None
        uaddr = (0x100000 + base + data.draw(st.sampled_from([0, 1]))) << 12
        self.vm.set_user_memory_region2(sid, 0, base << 12, npages << 12, uaddr)
        self.ref.set_user_memory_region2(sid, 0, base << 12, npages << 12, uaddr)
        return None

    @rule(data=st.data())
    def set_attrs(self, data):
        start, n = self._range(data)
        self.vm.set_memory_attributes(start << 12, n << 12, 0)
        self.ref.set_memory_attributes(start << 12, n << 12, 0)


TestDefaultVmStateMachine = _scaled(DefaultVmMachine)



class HugeVmMachine(VmMachine):
    """1G scale (two 1G chunks, hugetlb-1g shared backing): 1G MIXED tracking and 1G leaves.

    The reference is per gfn, so this machine runs fewer, coarser steps and compares SPTEs and
    attributes by totals, run edges and a sample instead of gfn by gfn.
    """

    UNIVERSE = 1 << 19
    MAX_OP = 1 << 19
    shared_backing = "hugetlb-1g"

    def _range(self, data, max_len=None):
        start = data.draw(st.one_of(st.sampled_from(range(0, self.UNIVERSE, 512)),
                                    st.sampled_from([0, 1, 511, 1 << 18, (1 << 18) - 1, (1 << 18) + 1]),
                                    st.integers(0, self.UNIVERSE - 1)))
        n = data.draw(st.one_of(st.sampled_from([1, 2, 511, 512, 1024, 1 << 18, 1 << 19]),
                                st.integers(1, 1 << 12)))
        return start, min(n, self.UNIVERSE + 1024 - start)

    @initialize(target=VmMachine.gmems)
    def first_slot(self):
        """A 1 GiB-aligned guest_memfd slot covering both 1G chunks."""
        size = self.UNIVERSE << 12
        gm, rg = self.vm.create_guest_memfd(size), self.ref.create_guest_memfd(size)
        self.pairs[gm.fd] = (gm, rg)
        self.vm.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, size, 1 << 40, gm, 0)
        self.ref.set_user_memory_region2(0, pkvm.KVM_MEM_GUEST_MEMFD, 0, size, 1 << 40, rg, 0)
        return gm.fd

    @rule(data=st.data(), write=st.booleans())
    def access(self, data, write):
        """A guest access of at most 4096 pages."""
        start = self._gfn(data)
        n = data.draw(st.integers(1, 4096))
        private = self._private(data, start)
        r = self.vcpu.access(start << 12, private=private, write=write, size=n << 12)
        assert (r.ret, r.pages_done, r.faults) == self.ref.access(start, n, private, write)[:3]

    @rule(fd=VmMachine.gmems, data=st.data())
    def allocate(self, fd, data):
        """Small fallocate(KEEP_SIZE) ranges only: the reference allocates page by page."""
        if fd is None or self.pairs[fd][0].closed:
            return
        gm, rg = self.pairs[fd]
        off = data.draw(st.integers(0, gm.npages - 1))
        n = data.draw(st.integers(1, min(4096, gm.npages - off)))
        gm.fallocate(pkvm.FALLOC_FL_KEEP_SIZE, off << 12, n << 12)
        self.ref.fallocate(rg, pkvm.FALLOC_FL_KEEP_SIZE, off << 12, n << 12)

    @invariant()
    def same_state(self):
        vm, ref = self.vm, self.ref
        vm.check()
        edges = {0, self.UNIVERSE - 1}
        n_private = 0
        for s, e, _v in vm._attrs.iter_ranges():
            edges.update((s, e - 1, e))
            n_private += e - s
        assert n_private == len(ref.attrs)
        n_mapped = 0
        for s, e, _ in vm.mmu.sptes.iter_ranges():
            edges.update((s, e - 1, e))
            n_mapped += e - s
        assert n_mapped == len(ref.sptes)
        edges.update(range(0, self.UNIVERSE, 7919))
        for g in edges:
            assert vm.get_memory_attributes(g) == ref.attrs.get(g, 0), hex(g)
            spte = vm.mmu.lookup(g)
            assert (tuple(spte) if spte else None) == ref.sptes.get(g), hex(g)
        for slot in vm.memslots:
            rs = ref.slots[slot.key]
            for level in (pkvm.PG_LEVEL_2M, pkvm.PG_LEVEL_1G):
                for g, word in rs.lpage[level].items():
                    assert slot.lpage.word(g, level) == word, (slot, level, hex(g))
        assert vm.stats == ref.stats
        assert vm.modeled_ns == ref.modeled_ns


HugeVmMachine.TestCase.settings = settings(
    settings.default, max_examples=max(3, settings.default.max_examples // 20), stateful_step_count=20)
TestHugeVmStateMachine = HugeVmMachine.TestCase
