"""The base of the Python objects reachable from a VM whose public mutators change that VM's
state (its MMU, lpage_info, direct map, S-EPT): they know the VM (``_owner``, set by it) and
refuse from an event callback of it with ``KvmError(EDEADLK)`` (docs/events.md, "Subscribing").

A copy (``copy.copy``, ``copy.deepcopy``, pickling) belongs to no VM, as ``RangeMap.copy()``
does: the owner is not part of the copied state, so copying never drags the VM along.
"""

from __future__ import annotations

from typing import Any


def refuse_nested(owner: Any) -> None:
    """``KvmError(EDEADLK)`` (through ``VM._nested_call``) if ``owner``, the VM an object
    belongs to, is running an event callback; nothing for an object of no VM (None)."""
    if owner is not None and owner._in_callback:
        owner._nested_call()


class VmOwned:
    """``_owner``: the VM, or None (an object made on its own, or a copy)."""

    __slots__ = ("_owner",)

    def __init__(self) -> None:
        self._owner: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for cls in type(self).__mro__:
            for name in cls.__dict__.get("__slots__", ()):
                if name != "_owner" and hasattr(self, name):
                    state[name] = getattr(self, name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._owner = None
