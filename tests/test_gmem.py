"""guest_memfd: creation and fallocate rules (kernel-semantics.md §2.9), folios and "prepared" tracking (§4.3),
hole punch and release (§4.7)."""

import dataclasses
import errno

import pytest
from vmhelpers import GMEM, PRIVATE, PUNCH, UADDR, MiB, gmem_vm, snapshot

import pkvm
from pkvm.platforms import register_platform
from pkvm.testing.reference_vm import ReferenceVM

KEEP = pkvm.FALLOC_FL_KEEP_SIZE


class HookLog:
    """A test platform: SW_PROTECTED plus recording gmem_prepare / gmem_invalidate ops."""

    def __init__(self, fail_gfn=None, err=-errno.EIO):
        self.prepared, self.invalidated = [], []
        self.fail_gfn, self.err = fail_gfn, err

    def prepare(self, vm, gfn, pfn, order, nr):
        if self.fail_gfn is not None and gfn <= self.fail_gfn < gfn + (nr << order):
            return self.err  # prepares nothing, as the op contract requires
        self.prepared.append((gfn, pfn, order, nr))
        return 0

    def invalidate(self, vm, start, end):
        self.invalidated.append((start, end))
        return 0

    def install(self, vm):
        """Swap the VM's platform for the recording one (test-only)."""
        vm._platform = register_platform(dataclasses.replace(
            vm.platform, name="sw_protected+hooks", gmem_prepare=self.prepare, gmem_invalidate=self.invalidate))
        return vm


# -- KVM_CREATE_GUEST_MEMFD --------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "flags", "match"), [
    pytest.param(0, 0, "size 0x0 must be a positive multiple", id="size-zero"),
    pytest.param(4097, 0, "size 0x1001", id="size-unaligned"),
    pytest.param(4096, pkvm.constants.GUEST_MEMFD_FLAG_MMAP, "flags 0x1 are not supported", id="mmap-flag"),
    pytest.param(4096, 1 << 7, "flags 0x80", id="unknown-flag"),
    # kvm_gmem_create's size is a loff_t: 2**63 and above is negative there (size <= 0: EINVAL)
    pytest.param(1 << 63, 0, "size 0x8000000000000000 must be a positive", id="size-negative-as-loff_t"),
])
def test_create_guest_memfd_validation(size, flags, match):
    """KVM_CREATE_GUEST_MEMFD rejects unknown flags and sizes that are not positive multiples of 4 KiB."""
    vm = pkvm.VM(1)
    with pytest.raises(pkvm.KvmError, match=match) as exc:
        vm.create_guest_memfd(size, flags)
    assert exc.value.errno == errno.EINVAL


# -- fallocate validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "offset", "length", "err", "match"), [
    pytest.param(0, 0, 4096, errno.EOPNOTSUPP, "pass FALLOC_FL_KEEP_SIZE", id="no-keep-size"),
    pytest.param(pkvm.FALLOC_FL_PUNCH_HOLE, 0, 4096, errno.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE", id="punch-without-keep-size"),
    pytest.param(KEEP | 0x10, 0, 4096, errno.EOPNOTSUPP, "supports only KEEP_SIZE and PUNCH_HOLE", id="zero-range-mode"),
    pytest.param(KEEP, 0x800, 4096, errno.EINVAL, "not 4 KiB aligned", id="unaligned-offset"),
    pytest.param(KEEP, 0, 0x800, errno.EINVAL, "not 4 KiB aligned", id="unaligned-length"),
    pytest.param(KEEP, 0, 0, errno.EINVAL, "must be >= 0 / > 0", id="length-zero"),
    pytest.param(KEEP, -4096, 4096, errno.EINVAL, "must be >= 0 / > 0", id="negative-offset"),
    pytest.param(KEEP, 2 * MiB, 4096, errno.EINVAL, "past the size", id="allocate-beyond-size"),
    pytest.param(KEEP, MiB, 2 * MiB, errno.EINVAL, "past the size", id="allocate-straddles-size"),
    pytest.param(KEEP, 1 << 63, 4096, errno.EFBIG, "MAX_LFS_FILESIZE", id="past-max-file-size"),
    # vfs_fallocate's EFBIG test is offset + len > s_maxbytes: a range ending exactly at
    # MAX_LFS_FILESIZE (2**63 - 1) passes it, and kvm_gmem_fallocate refuses the odd length.
    pytest.param(PUNCH, 4096, pkvm.constants.MAX_LFS_FILESIZE - 4096, errno.EINVAL, "not 4 KiB aligned",
                 id="ends-at-max-file-size"),
])
def test_fallocate_validation(mode, offset, length, err, match):
    """fallocate on a guest_memfd fails with the VFS/guest_memfd errno and changes nothing (§2.9)."""
    vm, gmem, _ = gmem_vm(2 * MiB)
    before = snapshot(vm)
    with pytest.raises(pkvm.KvmError, match=match) as exc:
        gmem.fallocate(mode, offset, length)
    assert exc.value.errno == err
    assert snapshot(vm) == before


def test_punch_hole_beyond_size_is_noop():
    """Punching a hole at or beyond the file size succeeds and does nothing (§2.9)."""
    vm, gmem, _ = gmem_vm(2 * MiB)
    gmem.fallocate(KEEP, 0, 2 * MiB)
    before = snapshot(vm)
    gmem.fallocate(PUNCH, 2 * MiB, 4 * MiB)
    assert snapshot(vm) == before


def test_closed_file_operations_are_ebadf():
    """fallocate and close on a closed guest_memfd fail with EBADF."""
    vm, gmem, _ = gmem_vm()
    gmem.close()
    with pytest.raises(pkvm.KvmError, match="is closed") as exc:
        gmem.fallocate(KEEP, 0, 4096)
    assert exc.value.errno == errno.EBADF
    with pytest.raises(pkvm.KvmError, match="already closed"):
        gmem.close()


# -- allocation and "prepared" (§4.3) -----------------------------------------------------------------


@pytest.mark.parametrize(("policy", "prepared"), [("6.8", True), ("6.11", False), ("6.19", False)])
def test_fallocate_allocates_without_preparing(policy, prepared):
    """fallocate only allocates folios; from 6.11 on it neither zeroes nor prepares them (§4.3)."""
    vm, gmem, _ = gmem_vm(2 * MiB, policy=policy)
    gmem.fallocate(KEEP, 0, MiB)
    assert gmem.nr_pages_allocated == 256
    assert gmem.folio(5)[2] is prepared
    assert gmem.folio(300) is None
    gmem.fallocate(KEEP, 0, 2 * MiB)  # existing folios are kept
    assert gmem.nr_pages_allocated == 512 and vm.stats["gmem_pages_allocated"] == 512
    vm.check()


def test_once_per_folio_prepares_on_first_fault_only():
    """6.11-6.19: a folio is prepared by its first private fault and never again, even across conversions (§10.1)."""
    hooks = HookLog()
    vm, gmem, vcpu = gmem_vm(2 * MiB)
    hooks.install(vm)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    assert sum(nr for *_, nr in hooks.prepared) == 256 and vm.stats["gmem_prepare"] == 256
    vm.set_memory_attributes(0, MiB, 0)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    assert vm.stats["gmem_prepare"] == 256
    assert gmem.folio(0)[2]


def test_every_lookup_calls_prepare_on_each_fault():
    """master: the arch prepare hook runs on every kvm_gmem_get_pfn, including slow-path re-faults (§4.3)."""
    hooks = HookLog()
    vm, gmem, vcpu = gmem_vm(2 * MiB, policy=pkvm.Policy.preset("6.19").replace(prepare="every-lookup"))
    hooks.install(vm)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.page_fault(0, private=True)
    vcpu.page_fault(0, private=True)              # read re-fault: slow path, lookup again
    vcpu.page_fault(0, private=True, write=True)  # write re-fault: fast path, no lookup
    assert vm.stats["gmem_prepare"] == 2


def test_prepare_failure_exits_and_leaves_folio_unprepared():
    """A prepare error becomes a memory-fault exit with that errno; the folio stays allocated, unprepared (§4.3)."""
    hooks = HookLog(fail_gfn=0)
    vm, gmem, vcpu = gmem_vm(2 * MiB)
    hooks.install(vm)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    r = vcpu.page_fault(0, private=True)
    assert (r.ret, r.errno, r.exit_reason) == ("exit", errno.EIO, pkvm.KVM_EXIT_MEMORY_FAULT)
    assert gmem.folio(0)[2] is False and vm.stats["gmem_pages_allocated"] == 1
    hooks.fail_gfn = None
    assert vcpu.page_fault(0, private=True).ret == "fixed"
    vm.check()


def test_batched_access_prepare_failure_matches_per_page_reference():
    """A prepare failure in the middle of a batched access stops exactly where per-page faults would."""
    hooks = HookLog(fail_gfn=77)
    vm, gmem, vcpu = gmem_vm(2 * MiB)
    hooks.install(vm)
    ref = ReferenceVM("sw_protected")
    ref.platform = ref._platform = vm.platform
    rg = ref.create_guest_memfd(2 * MiB)
    ref.set_user_memory_region2(0, GMEM, 0, 2 * MiB, UADDR, rg, 0)
    for v in (vm, ref):
        v.set_memory_attributes(0, MiB, PRIVATE)
    r = vcpu.access(0, private=True, size=MiB)
    assert ref.access(0, 256, True, False) == (r.ret, r.pages_done, r.faults, r.errno) == ("exit", 77, 78, errno.EIO)
    assert vm.stats == ref.stats
    assert {i: gmem.folio(i)[0] for i in range(256) if gmem.folio(i)} == {i: f[0] for i, f in rg.folios.items()}
    vm.check()


def test_order9_fallocate_and_partial_punch():
    """With 2M folios, fallocate uses aligned order-9 folios and a partial punch keeps the large folio."""
    vm, gmem, vcpu = gmem_vm(4 * MiB, policy=pkvm.Policy.preset("6.19").replace(gmem_max_order=9))
    gmem.fallocate(KEEP, 4096, 4 * MiB - 4096)
    assert gmem.folio(1)[1] == 0 and gmem.folio(512)[1] == 9 and gmem.folio(512)[0] % 512 == 0
    gmem.fallocate(PUNCH, 2 * MiB, 4096)
    assert gmem.folio(512) is not None
    gmem.fallocate(PUNCH, 2 * MiB, 2 * MiB)
    assert gmem.folio(512) is None
    vm.check()


# -- hole punch and release (§4.7) ---------------------------------------------------------------------


def test_punch_hole_invalidates_zaps_and_frees():
    """A hole punch: one invalidation, zap of every mapping in the bound range, folios freed, attributes kept."""
    hooks = HookLog()
    vm, gmem, vcpu = gmem_vm(2 * MiB, shared_backing="4k")
    hooks.install(vm)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    vcpu.access(MiB, private=False, size=MiB)
    seq = vm.stats["mmu_invalidate_seq"]
    gmem.fallocate(PUNCH, 0, 2 * MiB)
    st = vm.stats
    assert st["mmu_invalidate_seq"] == seq + 1
    assert st["pages_4k"] == 0 and st["zapped_sptes"] == 512  # attr_filter is moot with one root
    assert st["gmem_pages_freed"] == 256 and gmem.nr_pages_allocated == 0
    assert st["gmem_invalidate"] == 256 and hooks.invalidated
    assert vm.get_memory_attributes(0) == PRIVATE
    assert vm.mmu_invalidate_range == (0, 512)
    r = vcpu.page_fault(0, private=True)  # a fresh page
    assert r.ret == "fixed" and vm.stats["gmem_pages_allocated"] == 257
    vm.check()


def test_punch_hole_outside_bindings_needs_no_invalidation():
    """Punching file pages no memslot binds frees them without an invalidation."""
    vm, gmem, _ = gmem_vm(MiB, gmem_size=2 * MiB)
    gmem.fallocate(KEEP, 0, 2 * MiB)
    gmem.fallocate(PUNCH, MiB, MiB)
    st = vm.stats
    assert st["mmu_invalidate_seq"] == 0 and st["gmem_pages_freed"] == 256


def test_punch_hole_with_offset_binding():
    """The zapped gfns are the binding's: index - pgoff + base_gfn."""
    vm, gmem, vcpu = gmem_vm(MiB, base=8 * MiB, pgoff=MiB)
    vm.set_memory_attributes(8 * MiB, MiB, PRIVATE)
    vcpu.access(8 * MiB, private=True, size=MiB)
    gmem.fallocate(PUNCH, MiB + 4096, 4096)
    assert vm.mmu.lookup(8 * MiB // 4096 + 1) is None and vm.mmu.lookup(8 * MiB // 4096) is not None
    assert vm.mmu_invalidate_range == (2049, 2050)
    vm.check()


def test_close_zaps_bindings_and_frees_folios():
    """Closing the last fd zaps the bound mappings in one invalidation and frees every folio (§4.7)."""
    vm, gmem, vcpu = gmem_vm(2 * MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    vcpu.access(0, private=True, size=MiB)
    gmem.close()
    st = vm.stats
    assert st["pages_4k"] == 0 and st["mmu_invalidate_seq"] == 2 and st["gmem_pages_freed"] == 256
    assert vm.memslot(0).gmem_file is None
    vm.set_user_memory_region2(0, GMEM, 0, 0)  # the slot can still be deleted
    vm.check()


def test_binding_survives_slot_recreation():
    """Deleting a slot unbinds its range; a new slot can bind it again and finds the old folios."""
    vm, gmem, vcpu = gmem_vm(MiB)
    vm.set_memory_attributes(0, MiB, PRIVATE)
    pfn = vcpu.page_fault(0, private=True).pfn
    vm.set_user_memory_region2(0, GMEM, 0, 0)
    vm.set_user_memory_region2(0, GMEM, 0, MiB, UADDR, gmem)
    assert vcpu.page_fault(0, private=True).pfn == pfn
    vm.check()
