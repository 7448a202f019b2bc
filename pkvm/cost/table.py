"""The default latency table of ``docs/costs.md`` §0, transcribed once, as plain data.

:mod:`pkvm.cost.model` turns these rows into :class:`pkvm.cost.model.Cost` objects; nothing else should
read this module. It is kept apart from :mod:`pkvm.cost.model` so the numbers and their derivations can
be reviewed against docs/costs.md without the machinery around them.

Conventions:

- Every time is in nanoseconds (the sources give µs and cycles; cycles were converted at
  2.5-3 GHz, docs/costs.md §1). ``low_ns``/``high_ns`` are the table's Range column.
- ``source`` is a short citation in our own words; the full discussion is in the docs/costs.md §1
  section named in the comment above each row.
- Rows without a §0 number (``row`` absent) were added by pkvm. Each has a derivation in the
  comment above it and confidence ``"E"``, as the confidence legend of docs/costs.md asks for estimates.
- ``includes`` names the operations whose cost a composite row already contains: charging
  both for the same event counts that work twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# One dict per operation, in the order of the §0 table (pkvm's additions next to their
# closest row). ``vmexit`` is filled in per profile from VMEXIT_BY_HOST below.
OPERATIONS: tuple[Mapping[str, Any], ...] = (
    # §1.3. Row 2 is a whole KVM_RUN ioctl around one trivial exit: ~1,350 cycles of world
    # switch plus ~600 cycles of kernel entry/exit bookkeeping on each side. The world switch
    # inside it is the same one ``npf_fault`` already contains; see ``includes``.
    {"name": "userspace_exit", "value_ns": 1_000, "low_ns": 800, "high_ns": 2_000,
     "unit": "per exit to userspace and back", "confidence": "M", "row": 2,
     "source": "M. Roth, LKML Dec 2020 (VMSAVE/VMLOAD host-state thread): KVM_RUN ioctl "
               "entry to exit 2,528-2,576 cycles",
     "includes": ("vmexit",)},
    # §1.2, §1.3: SEV-ES/SNP exit through the GHCB (#VC, VMGEXIT, back).
    {"name": "ghcb_exit", "value_ns": 2_000, "low_ns": 1_000, "high_ns": 4_000,
     "unit": "per GHCB exit round trip", "confidence": "E", "row": 4,
     "source": "no measurement found (TUM-DSE CVM_eval can measure it but ships no results); "
               "estimated as row 1's world switch plus the guest's #VC handler and GHCB copies"},
    # §1.3: CVM_eval's two-tier example output; the attribution to #VE + TDVMCALL is an
    # inference from the two tiers.
    {"name": "td_vmm_exit", "value_ns": 3_900, "low_ns": 3_000, "high_ns": 6_000,
     "unit": "per #VE + TDVMCALL round trip", "confidence": "L", "row": 6,
     "source": "TUM-DSE CVM_eval benchmarks/vmexit README example: CPUID leaf 1/0xB "
               "~10,400 cycles / 3.85 µs (TD reading inferred)"},
    # §1.3: "rows 1-3 plus the KVM MMU walk", so the exit is inside this figure.
    {"name": "npf_fault", "value_ns": 1_500, "low_ns": 1_000, "high_ns": 3_000,
     "unit": "per fault taken (host page present)", "confidence": "E", "row": 7,
     "source": "no single figure; a world switch (rows 1-3) plus the KVM TDP MMU walk",
     "includes": ("vmexit",)},
    # §1.3: an upper bound, since it includes zeroing and mmap_lock contention.
    {"name": "npf_fault_alloc", "value_ns": 4_000, "low_ns": 2_000, "high_ns": 12_000,
     "unit": "per fault that allocates and zeroes a 4K host page", "confidence": "L", "row": 8,
     "source": "KVM dirty_log_perf_test populate time: 16 vCPUs x 1 GiB in 3.1 s, ~12 µs "
               "per fault under mmap_lock contention (LKML)",
     "includes": ("vmexit", "npf_fault")},
    # §1.3, §1.4: measured end to end, so it contains the AUG and the guest's accept.
    {"name": "tdx_private_fault", "value_ns": 8_000, "low_ns": 6_000, "high_ns": 15_000,
     "unit": "per private 4K fault on an unaccepted page", "confidence": "M", "row": 9,
     "source": "Dstack-TEE/dstack PR #1220 (Granite Rapids, idle host): 8 µs per private "
               "4K fault",
     "includes": ("vmexit", "npf_fault", "seamcall_aug", "tdx_accept_4k")},
    # §1.3. The source gives only an upper bound ("up to 153 µs"); the low end is the idle
    # figure of row 9, since the storm cost grows from it with the exit rate.
    {"name": "tdx_private_fault_storm", "value_ns": 150_000, "low_ns": 8_000, "high_ns": 153_000,
     "unit": "per private 4K fault during an idle-vCPU exit storm", "confidence": "M", "row": 10,
     "source": "Dstack-TEE/dstack PR #1220: 153 µs late in SMP bring-up at 248 vCPUs "
               "(1.66 M HLT exits per 10 s)",
     "includes": ("vmexit", "npf_fault", "seamcall_aug", "tdx_accept_4k")},
    # §1.4. Rows 11-12 (drain rates) are reference figures, below.
    {"name": "tdx_accept_4k", "value_ns": 1_500, "low_ns": 1_000, "high_ns": 3_000,
     "unit": "per 4K TDG.MEM.PAGE.ACCEPT of an AUG'd page", "confidence": "E", "row": 13,
     "source": "no isolated figure; one part of row 9 (TDCALL plus page init under the TD key)"},
    # No isolated figure. Derived so that the parts pkvm charges for one private 4K fault on a
    # fresh page (npf_fault + seamcall_aug + tdx_accept_4k + gmem_alloc_4k) add up to the
    # measured row 9: 8 - 1.5 - 1.5 - 0.7 = 4.3 µs; the range is row 9's minus the same parts.
    {"name": "seamcall_aug", "value_ns": 4_300, "low_ns": 2_300, "high_ns": 11_300,
     "unit": "per TDH.MEM.PAGE.AUG (4K)", "confidence": "E", "row": 14,
     "source": "estimated: measured row 9 (8 µs per private 4K fault, Dstack-TEE/dstack PR #1220) "
               "minus npf_fault, tdx_accept_4k and gmem_alloc_4k, so the parts charge row 9"},
    {"name": "seamcall_add", "value_ns": 3_000, "low_ns": 2_000, "high_ns": 6_000,
     "unit": "per TDH.MEM.PAGE.ADD (4K, build time)", "confidence": "E", "row": 15,
     "source": "no figure; one SEAMCALL plus a 4 KiB copy into the private page"},
    {"name": "seamcall_mr_extend", "value_ns": 10_000, "low_ns": 5_000, "high_ns": 30_000,
     "unit": "per 4K page measured (16 TDH.MR.EXTEND of 256 B)", "confidence": "E", "row": 16,
     "source": "no figure; SHA-384 over 4 KiB plus 16 SEAMCALLs"},
    # pkvm's, for the concurrent timeline (docs/timeline.md): the part of each AUG during which
    # the TD's secure EPT is held exclusively, so that other vCPUs' private faults wait
    # (TDX_OPERAND_BUSY, then RET_PF_RETRY). Never charged by itself: it is inside
    # seamcall_aug (capped at it); the timeline serializes this much of every AUG.
    {"name": "seamcall_aug_sept", "value_ns": 1_800, "low_ns": 500, "high_ns": 4_300,
     "unit": "per TDH.MEM.PAGE.AUG: the share under the TD's S-EPT, serialized across vCPUs",
     "confidence": "E",
     "source": "pkvm estimate, calibrated, not measured: the 1 -> 32 vCPU speedups of accepting "
               "TD memory in Intel's lkvs tdx_mem_test baselines (1.7x-12x) bound the serialized "
               "share of a private fault (docs/calibration.md)"},
    # Row 17 gives three values in one row.
    {"name": "seamcall_block", "value_ns": 1_000, "low_ns": 500, "high_ns": 3_000,
     "unit": "per TDH.MEM.RANGE.BLOCK (4K)", "confidence": "E", "row": 17,
     "source": "no figure; must be followed by TRACK and a kick of every vCPU (rows 20-21)"},
    {"name": "seamcall_track", "value_ns": 1_000, "low_ns": 500, "high_ns": 3_000,
     "unit": "per TDH.MEM.TRACK", "confidence": "E", "row": 17,
     "source": "no figure; the vCPU kick that must follow is charged as remote_tlb_flush"},
    {"name": "seamcall_remove", "value_ns": 1_500, "low_ns": 500, "high_ns": 3_000,
     "unit": "per TDH.MEM.PAGE.REMOVE (4K)", "confidence": "E", "row": 17,
     "source": "no figure; estimated as one SEAMCALL round trip (row 17's BLOCK) plus the "
               "PAMT update of the freed page"},
    {"name": "seamcall_wbinvd", "value_ns": 1_500, "low_ns": 1_000, "high_ns": 4_000,
     "unit": "per TDH.PHYMEM.PAGE.WBINVD (4K)", "confidence": "E", "row": 18,
     "source": "no figure; estimated as a SEAMCALL round trip plus the write-back of one "
               "4 KiB page (cache_flush_4k's 0.2-0.4 µs)"},
    # pkvm addition. TDH.MEM.SEPT.ADD has the same shape as TDH.MEM.PAGE.AUG (row 14): one
    # SEAMCALL that takes a host 4K page, initialises it under the TD's key and links it into
    # the secure EPT (PAMT update included), with no data copy. So the value and range of
    # row 14 are used as they stand.
    {"name": "seamcall_sept_add", "value_ns": 2_000, "low_ns": 1_000, "high_ns": 4_000,
     "unit": "per TDH.MEM.SEPT.ADD (one S-EPT page)", "confidence": "E",
     "source": "pkvm estimate: same work as TDH.MEM.PAGE.AUG (row 14), a SEAMCALL that "
               "initialises and links one 4K page, no copy"},
    # §1.5: about three times row 6 plus an ioctl; per-GFN stores are charged separately as
    # attr_store ("row 19 + n x row 28" in the composition rules of docs/costs.md §0).
    {"name": "map_gpa", "value_ns": 15_000, "low_ns": 8_000, "high_ns": 40_000,
     "unit": "per MapGPA call (fixed part)", "confidence": "E", "row": 19,
     "source": "no figure; TDVMCALL, exit to the VMM, KVM_SET_MEMORY_ATTRIBUTES and back "
               "(~3 x row 6 plus an ioctl)",
     "includes": ("td_vmm_exit", "userspace_exit")},
    # §1.7: one measured figure, used both for a plain IPI and for a kick that waits.
    {"name": "ipi", "value_ns": 1_200, "low_ns": 1_000, "high_ns": 1_500,
     "unit": "per IPI round trip (send, deliver, ack)", "confidence": "M", "row": 20,
     "source": "J. Kohler, LKML (posted-interrupt patch): kvm-unit-tests vmexit_ipi at "
               "-smp 20, Xeon 8168, ~3,325-3,400 cycles"},
    {"name": "vcpu_kick", "value_ns": 1_200, "low_ns": 1_000, "high_ns": 1_500,
     "unit": "per vCPU kicked out of guest mode, one at a time", "confidence": "M", "row": 20,
     "source": "same figure as ipi (row 20); a kick of all vCPUs at once is remote_tlb_flush"},
    # §1.7: base + slope x targets. The table's Range column bounds only the slope; the base is
    # one IPI round trip, so its range is row 20's.
    {"name": "remote_tlb_flush", "value_ns": 1_500, "low_ns": 1_000, "high_ns": 1_500,
     "slope_ns": 150, "slope_low_ns": 100, "slope_high_ns": 1_500, "slope_per": "vcpu",
     "unit": "per flush, plus slope per target vCPU", "confidence": "E", "row": 21,
     "source": "base from the IPI round trip (row 20); slope estimated: 0.1-0.2 µs when acks "
               "arrive in parallel, up to a full IPI for slow targets (§1.7)",
     "includes": ("ipi", "vcpu_kick")},
    # §1.1 for rows 22-25.
    {"name": "rmpupdate", "value_ns": 500, "low_ns": 200, "high_ns": 2_000,
     "unit": "per RMPUPDATE (4K or 2M entry)", "confidence": "E", "row": 22,
     "source": "no public measurement; above a cache miss, below a world switch, plus a "
               "broadcast to all CPUs (A. Kalra, RMPOPT v2 thread)"},
    {"name": "psmash", "value_ns": 1_000, "low_ns": 500, "high_ns": 5_000,
     "unit": "per 2M RMP entry split into 512 x 4K", "confidence": "E", "row": 23,
     "source": "no measurement; writes 512 RMP entries (8 KiB)"},
    {"name": "pvalidate_4k", "value_ns": 300, "low_ns": 100, "high_ns": 1_000,
     "unit": "per 4K PVALIDATE", "confidence": "E", "row": 24,
     "source": "no measurement found; estimated as one RMP entry read-modify-write in the CPU "
               "(no exit, no broadcast): below rmpupdate"},
    {"name": "pvalidate_2m", "value_ns": 1_000, "low_ns": 500, "high_ns": 3_000,
     "unit": "per 2M PVALIDATE", "confidence": "E", "row": 24,
     "source": "no measurement; on a 4K RMP entry it fails with a size mismatch and becomes "
               "512 x pvalidate_4k (edk2 PR #12774)"},
    {"name": "rmpadjust", "value_ns": 300, "low_ns": 100, "high_ns": 1_000,
     "unit": "per 4K RMPADJUST", "confidence": "E", "row": 25,
     "source": "no measurement found; estimated like pvalidate_4k: one RMP entry "
               "read-modify-write in the CPU"},
    # §1.2: at least two privilege transitions and one userspace round trip per request.
    {"name": "psc_request", "value_ns": 10_000, "low_ns": 5_000, "high_ns": 50_000,
     "unit": "per GHCB page-state-change request (fixed part)", "confidence": "E", "row": 26,
     "source": "no figure; VMGEXIT, KVM, userspace, attributes ioctl and back (SNP host "
               "series, AMDSEV#225)",
     "includes": ("ghcb_exit", "userspace_exit")},
    {"name": "psc_entry", "value_ns": 1_000, "low_ns": 500, "high_ns": 3_000,
     "unit": "per 4K entry of a PSC request", "confidence": "E", "row": 27,
     "source": "estimate: RMPUPDATE plus bookkeeping; the MSR protocol moves one 4K page per "
               "exit (T. Lendacky, SNP unaccepted-memory v5)",
     "includes": ("rmpupdate",)},
    # §1.6: the store loop of kvm_vm_set_mem_attributes, one xa_store per GFN.
    {"name": "attr_store", "value_ns": 100, "low_ns": 50, "high_ns": 500,
     "unit": "per GFN stored by KVM_SET_MEMORY_ATTRIBUTES", "confidence": "E", "row": 28,
     "source": "estimate; per-GFN xa_store loop, which 'takes a long time for a larger "
               "guest' (M. Roth, AMDSEV#225)"},
    # pkvm addition. The ioctl's no-op test (kvm_range_has_memory_attributes, docs/costs.md
    # "What is an estimate") reads a to-private range index by index until the first gfn that
    # differs: the whole range when the call is a no-op. Its first read is a descent of the
    # xarray, part of the call's fixed overhead, which pkvm does not price on its own; each
    # further gfn is one xas_next step inside a 64-slot node plus a compare, ~5-8 cycles when
    # cached, plus a node change every 64 gfns; a fully private 1 TiB guest's xarray (~2.4 GiB,
    # §1.6) no longer fits in any cache and streams from DRAM at ~1-2 ns per gfn on top.
    {"name": "attr_check_gfn", "value_ns": 3, "low_ns": 1, "high_ns": 10,
     "unit": "per gfn the no-op check of KVM_SET_MEMORY_ATTRIBUTES steps to (to-private requests)",
     "confidence": "E",
     "source": "pkvm estimate: one xas_next and compare per gfn in kvm_range_has_memory_attributes "
               "(virt/kvm/kvm_main.c), 2-3 ns cached, plus 1-2 ns per gfn streaming a 1 TiB "
               "guest's 2.4 GiB attribute xarray from DRAM"},
    # pkvm addition. The POST hook of KVM_SET_MEMORY_ATTRIBUTES recomputes the 1G MIXED flag
    # of a partly covered head or tail chunk with hugepage_has_attrs (arch/x86/kvm/mmu/mmu.c),
    # which visits the chunk's 2M sub-chunks in order and, for each whose MIXED flag is clear,
    # looks up its first gfn (kvm_get_memory_attributes: an xa_load, a descent of the attribute
    # xarray from its root, 4-5 levels for 2^24-2^30 gfns) until one differs. ~2-3 ns a level
    # when the nodes are cached; each lookup lands in another leaf node (512 gfns apart), which a
    # large private guest's xarray does not keep cached: a DRAM miss, ~80 ns, at the worst.
    {"name": "attr_check_2m", "value_ns": 15, "low_ns": 5, "high_ns": 100,
     "unit": "per 2M sub-chunk whose first gfn the POST hook's 1G MIXED test looks up",
     "confidence": "E",
     "source": "pkvm estimate: one xa_load (kvm_get_memory_attributes) per 2M sub-chunk in "
               "hugepage_has_attrs at 1G (arch/x86/kvm/mmu/mmu.c), a 4-5 level descent, "
               "~10-15 ns cached, up to a DRAM miss per lookup"},
    # pkvm addition. The composition rules of §0 price "the zap of KVM mappings" at about
    # row 28 per page: one atomic write of a cached SPTE plus the changed-SPTE bookkeeping
    # (accessed/dirty, rmap and stats). A 2M or 1G leaf is still one SPTE. The TLB flush that
    # follows a zap is charged on its own, as remote_tlb_flush.
    {"name": "zap_spte", "value_ns": 100, "low_ns": 50, "high_ns": 500,
     "unit": "per zapped leaf SPTE", "confidence": "E",
     "source": "pkvm estimate from costs.md §0 ('the zap of KVM mappings ~row 28 per page'); "
               "TLB flush excluded"},
    # §1.9: zeroing is bandwidth bound (~25 GiB/s aggregate in Matlack's test).
    {"name": "gmem_alloc_4k", "value_ns": 700, "low_ns": 400, "high_ns": 2_000,
     "unit": "per 4K folio allocated and zeroed", "confidence": "E", "row": 29,
     "source": "estimate from zeroing bandwidth: 256 GiB of 1G hugetlb populated by 256 "
               "vCPUs in 10.2 s, ~25 GiB/s (D. Matlack, LKML)"},
    {"name": "gmem_alloc_2m", "value_ns": 100_000, "low_ns": 50_000, "high_ns": 300_000,
     "unit": "per 2M folio allocated and zeroed", "confidence": "E", "row": 29,
     "source": "estimate from zeroing bandwidth (row 29, D. Matlack, LKML)"},
    {"name": "gmem_alloc_1g", "value_ns": 60_000_000, "low_ns": 30_000_000, "high_ns": 150_000_000,
     "unit": "per 1G folio allocated and zeroed", "confidence": "E", "row": 29,
     "source": "estimate from zeroing bandwidth (row 29, D. Matlack, LKML)"},
    {"name": "gmem_punch_4k", "value_ns": 1_500, "low_ns": 1_000, "high_ns": 5_000,
     "unit": "per 4K page freed by a hole punch (vendor reclaim excluded)", "confidence": "E",
     "row": 30,
     "source": "estimate; page-cache removal plus the KVM invalidation range"},
    # pkvm addition. Flushing one 4 KiB page from the caches is 64 CLFLUSHOPTs and a fence.
    # Clean lines retire at a few ns each; dirty lines are written back at roughly 10-20 GB/s
    # per core, i.e. 0.2-0.4 µs for a fully dirty page. Row 18 (TDX's per-page WBINVD,
    # 1.5 µs) is the same work plus a SEAMCALL, which fits.
    {"name": "cache_flush_4k", "value_ns": 300, "low_ns": 100, "high_ns": 1_000,
     "unit": "per 4K page flushed on guest_memfd invalidate", "confidence": "E",
     "source": "pkvm estimate: 64 CLFLUSHOPT + fence; dirty write-back of 4 KiB at 10-20 "
               "GB/s is 0.2-0.4 µs (row 18 adds a SEAMCALL to the same work)"},
    # §1.8.
    {"name": "directmap_split", "value_ns": 3_000, "low_ns": 1_000, "high_ns": 10_000,
     "unit": "per 2M or 1G direct-map mapping split", "confidence": "E", "row": 31,
     "source": "estimate; allocate one page-table page and rewrite 512 entries"},
    # pkvm addition. One change_page_attr call on the direct map: set_memory_4k for a 2M
    # block still mapped large (split-4k), or one set_direct_map_{invalid,default}_noflush per
    # page (the RFC's unmap-restore): a page-table walk, static-protection and alias checks,
    # cpa_lock taken and dropped around the PTE write. The split (row 31) and its TLB flush
    # (row 32) are charged on top when the call splits.
    {"name": "directmap_cpa_call", "value_ns": 200, "low_ns": 100, "high_ns": 1_000,
     "unit": "per change_page_attr call on the direct map (split and flush excluded)",
     "confidence": "E",
     "source": "pkvm estimate: a cached 4-level walk, the static-protection and alias checks "
               "and an uncontended spinlock around one PTE write (arch/x86/mm/pat/"
               "set_memory.c: __change_page_attr_set_clr)"},
    # pkvm addition. Splitting a huge KVM SPTE into a table of 512 smaller ones is the same
    # work as row 31 (one page-table page allocated, 512 entries written), so row 31's value
    # and range are used. The TLB flush after it is charged separately.
    {"name": "huge_page_split", "value_ns": 3_000, "low_ns": 1_000, "high_ns": 10_000,
     "unit": "per huge SPTE split into 512 smaller ones", "confidence": "E",
     "source": "pkvm estimate: same work as a direct-map split (row 31)"},
    # §1.8: the same IPI model as row 21, to every host CPU. The table's Range column (5-100
    # µs) is for the whole flush; pkvm keeps it as the base's range (its upper end is loose)
    # and takes the slope's range from row 21.
    {"name": "directmap_tlb_flush", "value_ns": 5_000, "low_ns": 5_000, "high_ns": 100_000,
     "slope_ns": 150, "slope_low_ns": 100, "slope_high_ns": 1_500, "slope_per": "cpu",
     "unit": "per kernel-range flush, plus slope per host CPU", "confidence": "E", "row": 32,
     "source": "estimate; flush_tlb_kernel_range to all host CPUs with row 21's IPI model",
     "includes": ("ipi",)},
    # pkvm addition (issue 12). SNP_LAUNCH_UPDATE hands every page to the AMD security
    # processor (sev_gmem_post_populate issues SEV_CMD_SNP_LAUNCH_UPDATE per 4K page), which
    # hashes it into the launch digest and encrypts it in place. No public per-page figure was
    # found; the value is set so that a launch image of a few GiB takes tens of seconds, the
    # order reported for launch measurement of all guest memory. The RMPUPDATE that precedes
    # it is charged separately (rmpupdate).
    {"name": "psp_launch_update", "value_ns": 10_000, "low_ns": 3_000, "high_ns": 50_000,
     "unit": "per 4K page of SNP_LAUNCH_UPDATE (the PSP command)", "confidence": "E",
     "source": "pkvm estimate: no public per-page figure found (AMDESE/AMDSEV issues, the SNP host "
               "series searched); one PSP command per page (SHA-384 of 4 KiB into the launch "
               "digest, in-place encryption), set so a few GiB of image take tens of seconds"},
    # pkvm addition (issue 12). KVM_PRE_FAULT_MEMORY maps each page through kvm_tdp_map_page, a
    # prefetch fault: the TDP MMU walk of row 7 without the world switch of row 1 (the guest
    # never exits). Folio allocation and preparation are charged on their own rows.
    {"name": "pre_fault_page", "value_ns": 1_000, "low_ns": 500, "high_ns": 2_500,
     "unit": "per page mapped by KVM_PRE_FAULT_MEMORY", "confidence": "E",
     "source": "pkvm estimate: row 7 (npf_fault, 1.5 µs) minus row 1 (vmexit, 0.5 µs): the same "
               "fault path entered from an ioctl, without an exit"},
    # pkvm addition, and not a cost. ``sleep_in_atomic`` counts a design that would sleep
    # inside the MMU-lock analogue (impossible designs still run and count the violation:
    # docs/design.md#policies-and-kernel-versions). Its 0 ns entry lets it be charged like any other operation, so it
    # shows up in per-operation breakdowns without changing any modeled time.
    {"name": "sleep_in_atomic", "value_ns": 0, "low_ns": 0, "high_ns": 0,
     "unit": "per violation (a correctness counter, not a cost)", "confidence": "E",
     "source": "not a cost: counts a sleeping call in atomic context; 0 ns by definition"},
)

# Rows 1, 3 and 5 are one operation, ``vmexit``: an exit handled in the kernel. Which row
# applies depends on the host CPU and on whether the guest is a TD. See ``profile_vmexit``.
VMEXIT_BY_HOST: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # docs/costs.md §1.3: the AMD figure also stands for SNP's automatic exits (#NPF).
    "amd": {"name": "vmexit", "value_ns": 500, "low_ns": 300, "high_ns": 800,
            "unit": "per exit handled in the kernel", "confidence": "M", "row": 1,
            "source": "M. Roth, LKML Dec 2020: pre-VMRUN to post-VMRUN 1,344-1,376 cycles"},
    "intel": {"name": "vmexit", "value_ns": 600, "low_ns": 400, "high_ns": 1_000,
              "unit": "per exit handled in the kernel", "confidence": "E", "row": 3,
              "source": "no clean public figure; scaled from row 1 and the vmexit_ipi "
                        "figure (row 20)"},
    # A TD exit to KVM passes through the TDX module; row 5 (an exit the module handles
    # itself) is the part of it that was measured, so it is a lower bound for the whole.
    "intel-td": {"name": "vmexit", "value_ns": 650, "low_ns": 500, "high_ns": 1_000,
                 "unit": "per exit handled in the kernel", "confidence": "L", "row": 5,
                 "source": "TUM-DSE CVM_eval benchmarks/vmexit README example: CPUID leaf 0 "
                           "in a TD, 1,744 cycles / 646 ns"},
})

# Profile -> (host CPUs it may run on, the default host). SNP needs AMD and TDX needs Intel;
# SW_PROTECTED and plain VMs run on either, and default to AMD because row 1 is measured (M)
# while row 3 is an estimate (E).
PROFILE_HOSTS: Mapping[str, tuple[tuple[str, ...], str]] = MappingProxyType({
    "snp": (("amd",), "amd"),
    "tdx": (("intel",), "intel"),
    "sw_protected": (("amd", "intel"), "amd"),
    "default": (("amd", "intel"), "amd"),
})


def profile_vmexit(profile: str, host: str) -> Mapping[str, Any]:
    """The ``vmexit`` row for a profile on a host: row 5 for TDX, else row 1 (AMD) or 3."""
    return VMEXIT_BY_HOST["intel-td" if profile == "tdx" else host]


# Rows that are not per-operation times: drain rates, percentages and ratios. They are
# calibration targets for workloads (a simulated lazy-accept boot should land near rows
# 11-12), never charged.
REFERENCE_FIGURES: tuple[Mapping[str, Any], ...] = (
    {"name": "tdx_accept_drain_1vcpu", "value": 4.0, "low": 3.0, "high": 5.0, "unit": "s/GiB",
     "confidence": "M", "row": 11,
     "source": "intel/lkvs guest-test/tdx/tdx_mem_test.sh baselines: 8 G 24 s, 32 G 148 s, "
               "96 G 472 s (12-19 µs per 4K)"},
    {"name": "tdx_accept_drain_32vcpu", "value": 2.8, "low": 2.0, "high": 2.9, "unit": "s/GiB",
     "confidence": "M", "row": 12,
     "source": "same file, 32 vCPUs: 8 G 3-4 s, 32 G 65-85 s, 96 G 268-284 s (aggregate)"},
    {"name": "directmap_fragmentation", "value": -0.5, "low": -3.0, "high": 0.0,
     "unit": "% throughput, heavily fragmented direct map", "confidence": "M", "row": 33,
     "source": "S. Liu (Meta), LKML 2022 bpf_prog_pack: +0.5-0.9 % from less fragmentation; "
               "X. Zhengjun (Intel), LKML Jan 2021: 4K-only direct map lowest on average"},
    {"name": "backing_4k_latency", "value": 40.0, "low": None, "high": None,
     "unit": "ns extra memory latency, 4K vs 2M backing", "confidence": "M", "row": 34,
     "source": "AMDSEV#225 (M. Misono, 2024): SNP guest, 8 vCPU / 64 GB, MLC idle latency "
               "~40 ns higher without 2M THP backing"},
    {"name": "backing_4k_bandwidth", "value": -36.0, "low": None, "high": None,
     "unit": "% RAM bandwidth, 4K vs 2M backing", "confidence": "M", "row": 34,
     "source": "AMDSEV#225 (M. Misono, 2024): RamSpeed INT add at 64 % without 2M backing"},
    {"name": "tdx_lazy_accept_boot_speedup_4g", "value": 2.5, "low": None, "high": None,
     "unit": "x faster boot to shell, lazy vs eager accept, 4 GB TD", "confidence": "H", "row": 35,
     "source": "K. Shutemov, unaccepted memory v8 cover letter, LKML Dec 2022"},
    {"name": "tdx_lazy_accept_boot_speedup_64g", "value": 4.0, "low": None, "high": None,
     "unit": "x faster boot to shell, lazy vs eager accept, 64 GB TD", "confidence": "H", "row": 35,
     "source": "K. Shutemov, unaccepted memory v8 cover letter, LKML Dec 2022"},
)
