"""Failure injection at the kernel's allocation sites (``vm.inject_failure``; docs/kvm-model.md).

The kernel's allocations can fail, and each failure is observable from userspace. pkvm names
four sites, each counted in the unit the kernel calls it in:

=====================  ==============================================  ===========================
site                   kernel call (file, function)                    one call is
=====================  ==============================================  ===========================
``xa_reserve``         ``xa_reserve`` in ``kvm_vm_set_mem_attributes``  one gfn of the ioctl's range
                       (virt/kvm/kvm_main.c)
``mmu_topup``          ``mmu_topup_memory_caches`` in the TDP fault     one fault
                       path (arch/x86/kvm/mmu/mmu.c)
``gmem_folio_alloc``   ``kvm_gmem_get_folio`` allocating a folio        one folio allocated
                       (virt/kvm/guest_memfd.c)
``set_memory``         ``set_memory_4k`` / the RFC's direct-map         one CPA call made before an
                       invalidation in ``rmpupdate``'s                  RMPUPDATE
                       ``adjust_direct_map`` (arch/x86/virt/svm/sev.c)
=====================  ==============================================  ===========================

:class:`FailureInjector` holds, per site, how many calls still succeed (``after``), how many
then fail (``times``) and the errno. It is per VM: no module-level state.
"""

from __future__ import annotations

import errno as _errno
from types import MappingProxyType

#: Site name -> the errnos the kernel's call can return there (all allocations: ENOMEM).
SITES = MappingProxyType({
    "xa_reserve": (_errno.ENOMEM,),
    "mmu_topup": (_errno.ENOMEM,),
    "gmem_folio_alloc": (_errno.ENOMEM,),
    "set_memory": (_errno.ENOMEM,),
})


class FailureInjector:
    """Armed failures of one VM, by site (module docstring). ``fired[site]`` counts the
    calls made to fail so far."""

    __slots__ = ("_armed", "fired")

    def __init__(self) -> None:
        self._armed: dict[str, list[int]] = {}
        self.fired: dict[str, int] = dict.fromkeys(SITES, 0)

    def arm(self, site: object, err: object, times: object = 1, after: object = 0) -> None:
        """Make calls ``after + 1`` .. ``after + times`` of ``site`` (counted from now) fail
        with ``err``; ``times=0`` disarms the site.

        Raises:
            ValueError: an unknown site, an errno the site cannot return, a negative count.
            TypeError: a count or errno that is not an int.
        """
        if not isinstance(site, str) or site not in SITES:
            raise ValueError(f"site={site!r} is not one of {', '.join(SITES)}")
        for name, value in (("errno", err), ("times", times), ("after", after)):
            if type(value) is not int:
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if err not in SITES[site]:
            allowed = ", ".join(_errno.errorcode[e] for e in SITES[site])
            raise ValueError(f"errno={err!r} cannot come from {site} (it returns {allowed})")
        if times < 0 or after < 0:  # type: ignore[operator]
            raise ValueError(f"times={times!r} and after={after!r} must be >= 0")
        if times:
            self._armed[site] = [after, times, err]  # type: ignore[list-item]
        else:
            self._armed.pop(site, None)

    def armed(self, site: str) -> bool:
        """Whether a failure is pending at ``site`` (callers then work one call at a time)."""
        return site in self._armed

    def armed_any(self, *sites: str) -> bool:
        """Whether a failure is pending at any of ``sites``."""
        armed = self._armed
        return bool(armed) and any(s in armed for s in sites)

    def take(self, site: str, n: int = 1) -> tuple[int, int] | None:
        """Account ``n`` calls of ``site``. None if all succeed; else ``(ok, errno)``: the
        first ``ok`` calls succeed and call ``ok + 1`` fails (the caller stops there)."""
        a = self._armed.get(site)
        if a is None or n <= 0:
            return None
        if n <= a[0]:
            a[0] -= n
            return None
        ok, err = a[0], a[2]
        a[0] = 0
        a[1] -= 1
        if not a[1]:
            del self._armed[site]
        self.fired[site] += 1
        return ok, err

    def pending(self) -> dict[str, tuple[int, int, int]]:
        """``{site: (after, times, errno)}`` still armed."""
        return {s: (a[0], a[1], a[2]) for s, a in sorted(self._armed.items())}
