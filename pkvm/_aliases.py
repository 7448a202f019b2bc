"""The pre-layout module names (``pkvm.vm``, ``pkvm.costs``, ...) as aliases of the layered ones.

``import pkvm.vm`` and ``from pkvm.costs import CostModel`` keep working, and ``pkvm.vm is
pkvm.kvm.vm``: a meta-path finder answers for the old names only, and its loader returns the
module already imported under the new name instead of executing the file a second time (two
copies would carry two ``VM`` classes and break ``isinstance``). Nothing is imported until an old
name is asked for. See the "Layers" section of ``docs/design.md`` for why this is a finder and not
shim files.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType, ModuleType

#: Old public module name -> the module it now is.
ALIASES: Mapping[str, str] = MappingProxyType({
    "pkvm.costs": "pkvm.cost.model",
    "pkvm.ledger": "pkvm.cost.ledger",
    "pkvm.hostmem": "pkvm.host.hostmem",
    "pkvm.directmap": "pkvm.host.directmap",
    "pkvm.vm": "pkvm.kvm.vm",
    "pkvm.mmu": "pkvm.kvm.mmu",
    "pkvm.gmem": "pkvm.kvm.gmem",
    "pkvm.exits": "pkvm.kvm.exits",
    "pkvm.policy": "pkvm.kvm.policy",
    "pkvm.snp_constants": "pkvm.platforms.snp_constants",
    "pkvm.guest": "pkvm.actors.guest",
    "pkvm.vmm": "pkvm.actors.vmm",
    "pkvm.trace": "pkvm.experiments.trace",
    "pkvm.workloads": "pkvm.experiments.workloads",
    "pkvm.report": "pkvm.experiments.report",
})


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name by returning the module imported under its new name."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The module has run already. The import system stamped the alias spec on it; put back
        # the spec it was imported under, so ``module.__spec__.name`` stays the new name.
        module.__spec__ = self._spec


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the names in :data:`ALIASES` (and nothing else)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        new = ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put one :class:`AliasFinder` on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())


def resolve(name: str) -> ModuleType:
    """The module behind the old attribute name ``pkvm.<name>`` (for ``pkvm.__getattr__``)."""
    full = f"pkvm.{name}"
    if full not in ALIASES:
        raise AttributeError(f"module 'pkvm' has no attribute {name!r}")
    return importlib.import_module(full)
