"""SEV-SNP instruction return codes and pkvm's outcome codes for the RMP table.

Values are the hardware's (AMD APM vol. 3, "RMPUPDATE", "PSMASH", "PVALIDATE") as Linux spells
them in ``arch/x86/include/asm/sev.h`` (``docs/kernel-semantics.md`` §5.3, §5.4, §5.6). §5.3
marks codes 1-3 unverified; the rules pkvm applies are in ``docs/snp-rmp.md``.
``pkvm._core.RmpTable`` returns exactly these numbers.
"""

from __future__ import annotations

#: RMPUPDATE succeeded.
RMPUPDATE_SUCCESS = 0
#: RMPUPDATE: bad operand (2M on an unaligned pfn or GPA; unassigned entry with fields set).
RMPUPDATE_FAIL_INPUT = 1
#: RMPUPDATE: a page it would write is immutable (firmware / pre-guest pages).
RMPUPDATE_FAIL_PERMISSION = 2
#: RMPUPDATE: a page it would write is in use by another CPU (retry later).
RMPUPDATE_FAIL_INUSE = 3
#: RMPUPDATE: 4K inside an assigned 2M entry, or 2M over assigned 4K entries. Linux's
#: ``rmpupdate()`` retries this code forever.
RMPUPDATE_FAIL_OVERLAP = 4

#: PSMASH succeeded.
PSMASH_SUCCESS = 0
#: PSMASH: pfn not 2M-aligned, or the entry is not a 2M entry.
PSMASH_FAIL_INPUT = 1
#: PSMASH: the 2M entry is immutable (pkvm's choice, docs/snp-rmp.md).
PSMASH_FAIL_PERMISSION = 2
#: PSMASH: a page of the 2M entry is in use by another CPU; KVM retries this code.
PSMASH_FAIL_INUSE = 3

#: PVALIDATE succeeded (the validated bit changed).
PVALIDATE_SUCCESS = 0
#: PVALIDATE: bad operand (2M on an unaligned address).
PVALIDATE_FAIL_INPUT = 1
#: PVALIDATE: 2M request on a 4K RMP entry; Linux guests retry as 512 x 4K.
PVALIDATE_FAIL_SIZEMISMATCH = 6
#: PVALIDATE left the validated bit unchanged (rFLAGS.CF = 1); Linux's software code 255.
PVALIDATE_FAIL_NOUPDATE = 255
#: pkvm outcome, not a return code: PVALIDATE raised an #NPF with the RMP error-code bit (the
#: page is not assigned to this guest at this GPA, or is immutable).
PVALIDATE_NPF_RMP = 0x100
#: pkvm outcome, not a return code: PVALIDATE at 4K on a 2M RMP entry raised an #NPF with the
#: RMP and SIZEM error-code bits (KVM then PSMASHes, §5.6).
PVALIDATE_NPF_SIZEM = 0x101

#: RMP entry page sizes as the RMP encodes them (``pagesize`` bit); pkvm's API uses PG_LEVEL_*.
RMP_PG_SIZE_4K = 0
RMP_PG_SIZE_2M = 1
#: 4K pages in a 2M RMP entry (``PTRS_PER_PMD``).
RMP_PAGES_2M = 512
