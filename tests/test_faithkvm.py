"""Faithfulness checks of the generic KVM model against the kernel source (docs/kernel-semantics.md).

Each test pins one behaviour where pkvm disagreed with the kernel; the docstring names the kernel
file and function.
"""

from __future__ import annotations

import errno

import pytest

import pkvm
from pkvm.errors import KvmError


@pytest.mark.parametrize("mode, offset, length", [
    (0, 0, 0),                                              # length 0: vfs_fallocate's EINVAL
    (0x40, 0, 4096),                                        # unknown mode bit: EOPNOTSUPP
    (pkvm.FALLOC_FL_PUNCH_HOLE, 0, 4096),                   # PUNCH_HOLE without KEEP_SIZE
    (pkvm.FALLOC_FL_KEEP_SIZE, -4096, 4096),                # negative offset
])
def test_fallocate_closed_fd_is_ebadf_before_argument_checks(mode, offset, length):
    """fs/open.c: ksys_fallocate resolves the descriptor before vfs_fallocate looks at the
    arguments, so a closed guest_memfd gives EBADF whatever the mode, offset and length."""
    vm = pkvm.VM("sw_protected", policy="6.19")
    gmem = vm.create_guest_memfd(1 << 21)
    gmem.close()
    with pytest.raises(KvmError) as exc:
        gmem.fallocate(mode, offset, length)
    assert exc.value.errno == errno.EBADF
