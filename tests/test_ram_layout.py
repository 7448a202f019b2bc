"""Guests past one memslot: RAM laid out as QEMU's q35 machine does (hw/i386/pc_q35.c
``pc_q35_init``; slots split as ``kvm_set_phys_mem`` splits them), and the limit the guest
physical address width puts on it (docs/kvm-model.md)."""

import subprocess
import sys

import pytest

import pkvm
from pkvm import experiments as E
from pkvm.actors.vmm import FOUR_GIB, MAX_SLOT_BYTES, Q35_LOWMEM, check_ram_fits, q35_ram_layout

GiB, TiB = 1 << 30, 1 << 40


def test_q35_split_below_and_above_4g():
    # Below 0xb0000000 RAM stays whole (lowmem 2.75 GiB); from it on, 2 GiB below 4 GiB.
    assert q35_ram_layout(0xB0000000 - (2 << 20)) == [(0, 0xB0000000 - (2 << 20), 0)]
    assert q35_ram_layout(0xB0000000) == [(0, Q35_LOWMEM, 0), (FOUR_GIB, 0xB0000000 - Q35_LOWMEM, Q35_LOWMEM)]
    assert q35_ram_layout(64 << 20) == [(0, 64 << 20, 0)]


def test_no_memslot_exceeds_kvm_mem_max_nr_pages():
    """KVM refuses a memslot of more than KVM_MEM_MAX_NR_PAGES pages (EINVAL); the layout
    splits RAM above 4 GiB into 1G-aligned slots below that cap, contiguous in gpa and in the
    RAM block."""
    assert MAX_SLOT_BYTES >> 12 <= pkvm.constants.KVM_MEM_MAX_NR_PAGES and not MAX_SLOT_BYTES % GiB
    for memory in (8 * TiB, 16 * TiB, 64 * TiB):
        layout = q35_ram_layout(memory)
        assert sum(s for _g, s, _o in layout) == memory
        assert all(s <= MAX_SLOT_BYTES and not g % GiB for g, s, _o in layout)
        for (g0, s0, o0), (g1, _s1, o1) in zip(layout[1:], layout[2:]):
            assert (g1, o1) == (g0 + s0, o0 + s0)
        assert len(layout) == 1 + -(-(memory - Q35_LOWMEM) // MAX_SLOT_BYTES)


@pytest.mark.parametrize("platform, memory, match", [
    ("tdx", 128 * TiB, "past the TDX private address space \\(GPAW 48: below the shared bit 47\\)"),
    ("snp", 1 << 50, "VMM's address space"),
    ("sw_protected", 1 << 50, "VMM's address space"),
])
def test_ram_beyond_the_limit_is_refused_with_one_line(platform, memory, match):
    with pytest.raises(ValueError, match=match):
        check_ram_fits(platform, memory)
    with pytest.raises(ValueError, match=f"memory {memory!r}: .*at most \\d+ GiB of RAM fits"):
        E.Config(platform=platform, memory=memory, workload="boot")


def test_cli_refuses_1p_with_one_line_and_exit_2():
    p = subprocess.run([sys.executable, "-m", "pkvm", "run", "--platform", "tdx", "--memory", "1P"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkvm: error: --memory '1P'") and "shared bit 47" in lines[0]


def test_3g_guest_boots_around_the_pci_hole():
    r = E.run(E.Config(platform="sw_protected", memory="3G", workload="boot"))
    assert r.counters["gfns_accessed"] == 2 * ((3 * GiB - (2 << 20)) >> 12)  # accepted, then touched
    cfg = E.Config(platform="sw_protected", memory="3G", workload="mixed", options={"ops": "200"})
    vm, ctx = E._build(cfg, 0, None)
    assert ctx.ram == [(0, 2 * GiB), (4 * GiB, 5 * GiB)]
    pkvm.experiments.workloads.WORKLOADS["mixed"].run(ctx, ops=200, prealloc=False)
    assert [(s.base_gfn << 12, s.npages << 12) for s in vm.memslots] == [(0, 2 * GiB), (4 * GiB, GiB)]
    assert vm.get_memory_attributes((3 * GiB) >> 12) == 0  # the hole has no RAM
    vm.check()


@pytest.mark.parametrize("memory", ["16T", "64T"])
def test_tdx_guests_past_one_memslot_boot_range_compressed(memory):
    r = E.run(E.Config(platform="tdx", memory=memory, workload="boot"))
    size = pkvm._units.parse_size(memory)
    assert r.counters["gfns_accessed"] == 2 * ((size - (2 << 20)) >> 12)
    assert r.wall_s < 30


@pytest.mark.parametrize("memory", [10**40, 1 << 64, "1000000000000P"])
def test_absurd_ram_is_refused_without_laying_it_out(monkeypatch, memory):
    """The q35 layout of 1e40 bytes would be ~1e27 memslots (the process hangs, then runs out of
    memory): the size is refused from the layout's end, computed before the layout."""
    from pkvm.actors import vmm

    real = vmm.q35_ram_layout

    def bounded(size):
        assert size < 1 << 52, "laid out RAM past every guest physical address space"
        return real(size)

    monkeypatch.setattr(vmm, "q35_ram_layout", bounded)
    for platform in ("snp", "tdx", "sw_protected"):
        with pytest.raises(ValueError, match="at most \\d+ GiB of RAM fits"):
            E.Config(platform=platform, memory=memory, workload="boot")


@pytest.mark.parametrize("platform, memory, image", [("snp", "4G", "3G"), ("tdx", "4G", "2050M"),
                                                     ("sw_protected", "64G", "2G+4K"), ("snp", "2816M", "2052M")])
def test_an_image_past_the_low_ram_is_refused_by_config(platform, memory, image):
    """The image is gpa [0, image): with 2.75 GiB of RAM or more, RAM below the PCI hole ends at
    2 GiB, and an image past it reached the launch flow, which failed with EINVAL (exit 1, "gfn
    0x80000 is not in a guest_memfd memslot") after the VM was built. Config refuses it."""
    image = (2 << 30) + 4096 if image == "2G+4K" else image
    with pytest.raises(ValueError, match="must fit in the RAM below the PCI hole: .* has 2G there"):
        E.Config(platform=platform, memory=memory, image=image)
    E.Config(platform=platform, memory=memory, image="2G")  # the whole low RAM is fine
