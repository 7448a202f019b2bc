"""Kernel constants that pkvm reproduces, with the kernel's values.

Each constant carries the value of the Linux UAPI or internal header named in its comment
(``docs/kernel-semantics.md`` §2.1, §4.2, §4.6; ``include/uapi/linux/kvm.h``,
``arch/x86/include/uapi/asm/kvm.h``, ``include/uapi/linux/falloc.h``).
"""

from __future__ import annotations

#: ``KVM_X86_DEFAULT_VM``: an ordinary VM without private memory.
KVM_X86_DEFAULT_VM = 0
#: ``KVM_X86_SW_PROTECTED_VM``: the test-only VM type whose private memory is enforced by
#: nothing but KVM's own attribute checks (docs/kernel-semantics.md §2.1, §4.1).
KVM_X86_SW_PROTECTED_VM = 1
#: ``KVM_X86_SEV_VM`` (no private memory; not modelled).
KVM_X86_SEV_VM = 2
#: ``KVM_X86_SEV_ES_VM`` (no private memory; not modelled).
KVM_X86_SEV_ES_VM = 3
#: ``KVM_X86_SNP_VM``: AMD SEV-SNP.
KVM_X86_SNP_VM = 4
#: ``KVM_X86_TDX_VM``: Intel TDX.
KVM_X86_TDX_VM = 5

#: ``KVM_MEMORY_ATTRIBUTE_PRIVATE``: the only attribute bit KVM defines (docs/kernel-semantics.md §2.1).
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

#: ``KVM_MEM_LOG_DIRTY_PAGES`` memslot flag: dirty logging (forbids hugepage mappings, §3.5).
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
#: ``KVM_MEM_READONLY`` memslot flag: guest writes exit as emulated MMIO.
KVM_MEM_READONLY = 1 << 1
#: ``KVM_MEM_GUEST_MEMFD`` memslot flag: the slot's private backing is a guest_memfd.
KVM_MEM_GUEST_MEMFD = 1 << 2

#: ``KVM_EXIT_MEMORY_FAULT``: ``run->exit_reason`` of a memory-fault exit (kernel-semantics.md §4.6).
KVM_EXIT_MEMORY_FAULT = 39
#: ``KVM_EXIT_HYPERCALL``: ``run->exit_reason`` when a hypercall is forwarded to userspace (§7.2, §7.3).
KVM_EXIT_HYPERCALL = 3
#: ``KVM_EXIT_HYPERCALL_LONG_MODE``: ``run->hypercall.flags`` bit, the caller was in 64-bit mode.
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0
#: ``KVM_MEMORY_EXIT_FLAG_PRIVATE``: ``run->memory_fault.flags`` bit for a private access.
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

#: ``FALLOC_FL_KEEP_SIZE``: mandatory for every guest_memfd fallocate (docs/kernel-semantics.md §2.9).
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

#: ``KVM_HC_MAP_GPA_RANGE``: the hypercall number of a guest's shared/private conversion request
#: (``include/uapi/linux/kvm_para.h``; kernel-semantics.md §7.3). Also the ``nr`` of the TDX
#: MapGPA and SNP PSC exits.
KVM_HC_MAP_GPA_RANGE = 12
#: ``KVM_MAP_GPA_RANGE_ENCRYPTED``: bit 4 of the third argument, convert to private.
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
#: ``KVM_MAP_GPA_RANGE_DECRYPTED``: the same field without bit 4, convert to shared.
KVM_MAP_GPA_RANGE_DECRYPTED = 0
#: ``KVM_MAP_GPA_RANGE_PAGE_SZ_4K`` / ``_2M`` / ``_1G``: bits 3:0 of the third argument.
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 2
#: ``KVM_ENOSYS`` / ``KVM_EINVAL``: the guest-visible hypercall error numbers (``kvm_para.h``).
KVM_ENOSYS = 1000
KVM_EINVAL = 22
#: ``KVM_CAP_EXIT_HYPERCALL``: the bitmask of hypercalls forwarded to userspace (§7.3).
KVM_CAP_EXIT_HYPERCALL = 201
#: ``KVM_EXIT_HYPERCALL_VALID_MASK``: the only hypercall userspace may ask to handle.
KVM_EXIT_HYPERCALL_VALID_MASK = 1 << KVM_HC_MAP_GPA_RANGE

# -- Intel TDX (kernel-semantics.md §6, §7.2; ``arch/x86/include/asm/shared/tdx.h``,
#    ``arch/x86/kvm/vmx/tdx_errno.h``,
# ``arch/x86/include/uapi/asm/kvm.h``). Status codes are 64-bit: the class is bits 63:32, the low
# bits an operand id.

#: ``TDX_SHARED_BIT_PWL_4`` / ``_PWL_5``: the GPA shared bit with 4-level / 5-level secure EPT.
TDX_SHARED_BIT_PWL_4 = 47
TDX_SHARED_BIT_PWL_5 = 51
#: ``KVM_TDX_MEASURE_MEMORY_REGION``: ``KVM_TDX_INIT_MEM_REGION`` flag, extend MRTD over the pages.
KVM_TDX_MEASURE_MEMORY_REGION = 1 << 0
#: ``TDX_EXTENDMR_CHUNKSIZE``: bytes measured by one ``TDH.MR.EXTEND``.
TDX_EXTENDMR_CHUNKSIZE = 256
#: ``TDVMCALL_MAP_GPA``: the GHCI leaf of ``TDG.VP.VMCALL<MapGPA>``.
TDVMCALL_MAP_GPA = 0x10001
#: ``TDVMCALL_STATUS_*``: TDG.VP.VMCALL completion statuses returned in r10.
TDVMCALL_STATUS_SUCCESS = 0x0
TDVMCALL_STATUS_RETRY = 0x1
TDVMCALL_STATUS_INVALID_OPERAND = 0x8000000000000000
TDVMCALL_STATUS_ALIGN_ERROR = 0x8000000000000002
TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED = 0x8000000000000003
#: TDX module completion statuses (``tdx_errno.h``).
TDX_SUCCESS = 0x0
TDX_OPERAND_INVALID = 0xC000010000000000
TDX_OPERAND_BUSY = 0x8000020000000000
TDX_PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
TDX_EPT_WALK_FAILED = 0xC0000B0000000000
TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
TDX_PAGE_SIZE_MISMATCH = 0xC0000B0B00000000
#: ``TDX_OPERAND_ID_RCX``: operand id of the GPA argument in a status code.
TDX_OPERAND_ID_RCX = 0x01

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

#: ``enum kvm_gfn_range_filter``: which attribute's mappings an invalidation targets (§2.5).
KVM_FILTER_SHARED = 1 << 0
KVM_FILTER_PRIVATE = 1 << 1
KVM_FILTER_ALL = KVM_FILTER_SHARED | KVM_FILTER_PRIVATE

#: The bound on every loop the kernel retries until another thread acts: an RMP #NPF that
#: resolves nothing, ``PSMASH`` ``FAIL_INUSE`` (``snp_rmptable_psmash``), ``RMPUPDATE``
#: ``FAIL_OVERLAP`` (``rmpupdate``), ``TDX_OPERAND_BUSY`` and ``RET_PF_RETRY`` (the fault
#: path, ``kvm_tdp_mmu_map_private_pfn``). In the synchronous API no other thread can release
#: the holder, so after this many attempts the operation stops and says where
#: (``ret == "rmp_loop"`` or ``"retry_loop"``, ``retries``, ``loop``; docs/kvm-model.md). A
#: driver with other threads waits for the holder between attempts and uses the same bound.
RETRY_LIMIT = 64
