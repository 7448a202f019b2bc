"""The platforms: one op table (:class:`pkvm.kvm.ops.PlatformOps`) per VM type, and the code
behind its hooks.

``default`` and ``sw_protected`` are the plain KVM types; ``snp`` (SEV-SNP: the RMP, PVALIDATE,
page-state changes) and ``tdx`` (the S-EPT, MapGPA, ACCEPT) are the confidential ones. Importing
this package installs the tables into the KVM layer's registry
(:func:`pkvm.kvm.ops.install_platforms`, the ``kvm_x86_ops`` pattern): the KVM model and the
actors reach a platform only through that table. The registry's names are re-exported here.
See ``docs/kvm-model.md``, ``docs/snp.md``, ``docs/tdx.md`` and the "Layers" section of
``docs/design.md``.
"""

from __future__ import annotations

from pkvm.kvm.ops import (
    PLATFORMS,
    VM_TYPE_NAMES,
    PlatformOps,
    _return0,
    install_platforms,
    is_implemented,
    lookup_platform,
    register_platform,
)
from pkvm.platforms import default as _default
from pkvm.platforms import snp as _snp
from pkvm.platforms import sw_protected as _sw_protected
from pkvm.platforms import tdx as _tdx

__all__ = ["PLATFORMS", "VM_TYPE_NAMES", "PlatformOps", "install_platforms", "is_implemented",
           "lookup_platform", "register_platform"]

install_platforms((_default.OPS, _sw_protected.OPS, _snp.OPS, _tdx.OPS))
