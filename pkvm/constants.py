"""Kernel constants that pkvm reproduces, with the kernel's values.

Each constant carries the value of the Linux UAPI or internal header named in its comment
(spec ``kernel-semantics.md`` §2.1, §4.2, §4.6; ``include/uapi/linux/kvm.h``,
``arch/x86/include/uapi/asm/kvm.h``, ``include/uapi/linux/falloc.h``).
"""

from __future__ import annotations

#: ``KVM_X86_DEFAULT_VM``: an ordinary VM without private memory.
KVM_X86_DEFAULT_VM = 0
#: ``KVM_X86_SW_PROTECTED_VM``: the test-only VM type whose private memory is enforced by
#: nothing but KVM's own attribute checks (spec §2.1, §4.1).
KVM_X86_SW_PROTECTED_VM = 1
#: ``KVM_X86_SEV_VM`` (no private memory; not modelled).
KVM_X86_SEV_VM = 2
#: ``KVM_X86_SEV_ES_VM`` (no private memory; not modelled).
KVM_X86_SEV_ES_VM = 3
#: ``KVM_X86_SNP_VM``: AMD SEV-SNP.
KVM_X86_SNP_VM = 4
#: ``KVM_X86_TDX_VM``: Intel TDX.
KVM_X86_TDX_VM = 5

#: ``KVM_MEMORY_ATTRIBUTE_PRIVATE``: the only attribute bit KVM defines (spec §2.1).
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

#: ``KVM_MEM_LOG_DIRTY_PAGES`` memslot flag: dirty logging (forbids hugepage mappings, §3.5).
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
#: ``KVM_MEM_READONLY`` memslot flag: guest writes exit as emulated MMIO.
KVM_MEM_READONLY = 1 << 1
#: ``KVM_MEM_GUEST_MEMFD`` memslot flag: the slot's private backing is a guest_memfd.
KVM_MEM_GUEST_MEMFD = 1 << 2

#: ``KVM_EXIT_MEMORY_FAULT``: ``run->exit_reason`` of a memory-fault exit (spec §4.6).
KVM_EXIT_MEMORY_FAULT = 39
#: ``KVM_MEMORY_EXIT_FLAG_PRIVATE``: ``run->memory_fault.flags`` bit for a private access.
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

#: ``FALLOC_FL_KEEP_SIZE``: mandatory for every guest_memfd fallocate (spec §2.9).
FALLOC_FL_KEEP_SIZE = 0x01
#: ``FALLOC_FL_PUNCH_HOLE``: free the range (guest_memfd: invalidate, zap, free; §4.7).
FALLOC_FL_PUNCH_HOLE = 0x02

#: ``KVM_CAP_USER_MEMORY2``: ``KVM_SET_USER_MEMORY_REGION2`` is available.
KVM_CAP_USER_MEMORY2 = 231
#: ``KVM_CAP_MEMORY_FAULT_INFO``: ``KVM_EXIT_MEMORY_FAULT`` carries gpa/size/flags.
KVM_CAP_MEMORY_FAULT_INFO = 232
#: ``KVM_CAP_MEMORY_ATTRIBUTES``: on a VM, the attribute bits it supports (§2.1).
KVM_CAP_MEMORY_ATTRIBUTES = 233
#: ``KVM_CAP_GUEST_MEMFD``: 1 if the VM can bind guest_memfd memslots.
KVM_CAP_GUEST_MEMFD = 234
#: ``KVM_CAP_VM_TYPES``: bitmask of the VM types ``KVM_CREATE_VM`` accepts.
KVM_CAP_VM_TYPES = 235

#: x86 page-table levels (``enum pg_level``).
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3

#: ``PAGE_SHIFT`` / ``PAGE_SIZE`` of x86.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

#: ``KVM_USER_MEM_SLOTS`` on x86 (``KVM_MAX_NR_USER_MEMSLOTS``): valid slot ids are below it.
KVM_USER_MEM_SLOTS = 32764
#: ``KVM_MEM_MAX_NR_PAGES`` on x86_64: the largest memslot, in pages.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
#: ``KVM_MAX_VCPUS`` on x86.
KVM_MAX_VCPUS = 4096
#: ``TASK_SIZE_MAX`` of x86_64 with 4-level paging: ``access_ok()`` limit for memslot HVAs.
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE
#: ``MAX_LFS_FILESIZE`` on 64-bit: ``vfs_fallocate`` returns ``EFBIG`` past it.
MAX_LFS_FILESIZE = (1 << 63) - 1
#: ``GUEST_MEMFD_FLAG_MMAP`` / ``GUEST_MEMFD_FLAG_INIT_SHARED`` (6.18+); not offered by pkvm
#: (gmem-only memslots are not modelled), so ``create_guest_memfd`` rejects them with EINVAL.
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

#: Largest guest physical address + 1 that the u64 ioctl fields can express.
U64_LIMIT = 1 << 64
