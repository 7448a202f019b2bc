"""Policies: which kernel design (or version) pkvm reproduces.

A :class:`Policy` is a frozen set of knobs, each named after the behaviour it changes (docs/kernel-semantics.md
Appendix A, §0.2, §10). Presets name kernel versions (``"6.8"`` ... ``"6.19"``) and the
historical designs of the 2023 ``update_mem_attr`` debate: ``"rfc-v8"`` is that whole kernel;
``"eager-post"``, ``"eager-locked"`` and ``"eager-split"`` are the 6.19 kernel with only the
RMPUPDATE moved (and the RFC direct map), so that a comparison isolates the design. Invariant: every field holds one of the values listed in ``_CHOICES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

_CHOICES: Mapping[str, tuple[object, ...]] = MappingProxyType(
    {
        "rmp_update": ("fault-time", "eager-post", "eager-locked", "eager-split"),
        "directmap": ("split-4k", "unmap-restore"),
        "prepare": ("none", "once-per-folio", "every-lookup"),
        "zap_filter": ("all", "old-type"),
        "hugepage_guard": (False, True),
        "attr_ioctl": ("all-or-nothing", "legacy-progress"),
        "gmem_max_order": (0, 9),
        "mixed_head_in_slot": ("start-only", "whole-chunk"),
        "private_fault_source": ("attributes", "access"),
        "tdx_initial_image": ("premap-then-add", "add-in-sept-hook"),
        "tdx_huge_pages": (False, True),
        "rmp_fault_zap": ("from-gfn", "2m-aligned"),
        "pre_fault_memory": (False, True),
        "pre_fault_invalid_slot": ("retry", "eagain"),
        "snp_launch_zero_len": ("no-op", "einval"),
        "memslot_zap": ("all", "slot"),
    }
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The knobs that select a kernel design. Build one from a preset with :meth:`preset`.

    Knobs (docs/kernel-semantics.md section in brackets):

    ``rmp_update``
        When SNP assigns a page to the guest in the RMP: ``"fault-time"`` (final upstream, in
        ``gmem_prepare`` during the private fault, §4.4), ``"eager-post"`` (RFC v8: the
        ``update_mem_attr`` op after the MMU lock is dropped, §7.7) or
        ``"eager-locked"`` (the ``set_mem_attr`` op inside the MMU lock, §7.7) or
        ``"eager-split"`` (direct-map change in a pre phase before the MMU lock, RMPUPDATE in
        ``set_mem_attr`` under it, direct-map restore after it; §7.7). SNP only.
    ``directmap``
        How SNP keeps the host direct map safe: ``"split-4k"`` (final) or
        ``"unmap-restore"`` (RFC). SNP only.
    ``prepare``
        guest_memfd "prepared" tracking (§4.3, §10.1): ``"none"`` (6.8: folios are zeroed
        and marked up to date when created, no arch hook), ``"once-per-folio"`` (6.11-6.19:
        zero and prepare on the first fault lookup) or ``"every-lookup"`` (master: zero once,
        call the arch hook on every lookup).
    ``zap_filter``
        Which roots the PRE hook zaps (§2.5): ``"all"`` (6.8/6.11) or ``"old-type"``
        (6.14+, only the old attribute's root). Only VMs with a mirror root (TDX) can tell.
    ``hugepage_guard``
        The head/tail hugepage addition to the invalidation range (§2.5 step 2; 6.15+, so the
        "6.16" and "6.19" presets have it, "6.11" does not).
    ``attr_ioctl``
        ``"all-or-nothing"`` (6.8+: short-circuit, reserve, PRE zap, store, POST; §2.4-2.6)
        or ``"legacy-progress"`` (the UPM-era ioctl of the RFC v8 series: no short-circuit,
        an invalidation even outside memslots, store, then zap + MIXED update under the lock;
        it reported progress because its store could fail part way).
    ``gmem_max_order``
        Largest guest_memfd folio order: 0 upstream, 9 to study 2M folios (§10.3).
    ``mixed_head_in_slot``
        POST hook head-chunk test (§3.3 step 2): ``"start-only"`` (v6.8.1 checks only that the
        chunk starts in the slot) or ``"whole-chunk"`` (6.9+, and later 6.8.y stable releases,
        also require it to end there).
    ``private_fault_source``
        Where a fault's ``is_private`` comes from (§4.1): ``"attributes"`` (6.8: the
        attribute of the gfn for every VM) or ``"access"`` (6.11+: the access type, i.e. the
        platform's ``fault_is_private`` op).
    ``tdx_initial_image``
        How ``KVM_TDX_INIT_MEM_REGION`` adds the initial image (§6.3, App. A): ``"premap-then-add"``
        (6.16: map the mirror EPT first, counted in ``nr_premapped``, then ``TDH.MEM.PAGE.ADD``;
        finalization fails while pages are premapped) or ``"add-in-sept-hook"`` (6.19:
        ``PAGE.ADD`` inside the S-EPT set hook). TDX only.
    ``tdx_huge_pages``
        **Beyond upstream.** The TDX 2M private-mapping series (Y. Zhao, RFC Apr 2025 / v3 Jan
        2026, unmerged as of 6.19): 2M ``PAGE.AUG``, ``DEMOTE`` before a partial conversion, the
        per-2M guest-inhibit bit and accept-size mismatch faults. Needs ``gmem_max_order=9``
        (2M guest_memfd folios) to map anything at 2M. TDX only.
    ``rmp_fault_zap``
        The gfns ``sev_handle_rmp_fault`` zaps after a PSMASH: ``"from-gfn"`` (every preset:
        ``[gfn, gfn + PTRS_PER_PMD)`` from the faulting gfn itself, in 6.11+ and already in
        the RMP #NPF handler of RFC v7 and v8) or ``"2m-aligned"`` (the 2M-aligned range
        holding the gfn, as the pre-guest_memfd handler of the "Part2 v6" series, June 2022,
        rounded it; no preset). SNP only.
    ``pre_fault_memory``
        Whether the kernel has the ``KVM_PRE_FAULT_MEMORY`` vCPU ioctl (6.11+: added with
        ``kvm_vcpu_pre_fault_memory`` in virt/kvm/kvm_main.c and x86's
        ``kvm_arch_vcpu_pre_fault_memory``). Without it the ioctl number is unknown and
        ``kvm_arch_vcpu_ioctl`` answers ``EINVAL`` (``Vcpu.pre_fault_memory``).
    ``pre_fault_invalid_slot``
        What ``KVM_PRE_FAULT_MEMORY`` does on a memslot that is being deleted or moved
        (``KVM_MEMSLOT_INVALID``): ``"retry"`` (6.11-6.17: ``kvm_mmu_faultin_pfn`` returns
        ``RET_PF_RETRY`` and ``kvm_tdp_map_page`` loops until a signal, ``EINTR``) or
        ``"eagain"`` (6.18+: ``kvm_mmu_faultin_pfn`` fails a prefetch fault with ``-EAGAIN``).
        Only a pre-fault racing a memslot deletion can tell.
    ``snp_launch_zero_len``
        What ``KVM_SEV_SNP_LAUNCH_UPDATE`` does with a ``len`` of 0 (§5.9): ``"no-op"``
        (6.11-6.17: the ioctl's checks let it through, ``kvm_gmem_populate`` gets no pages and
        returns 0, so the call succeeds having done nothing) or ``"einval"`` (6.18+: the ioctl
        refuses it among its parameter checks). SNP only.
    ``memslot_zap``
        What deleting or moving a memslot zaps (``kvm_arch_flush_shadow_memslot``, §4.7):
        ``"all"`` (6.8-6.11: every mapping of the VM, ``kvm_mmu_zap_all_fast``, whatever the
        VM type) or ``"slot"`` (6.12+: only the slot's, except on a ``KVM_X86_DEFAULT_VM``,
        where the ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` quirk, on unless userspace disables it, still
        zaps everything). A TD zaps only the slot under either (no kernel with TDX zaps it all).

    >>> Policy.preset("6.8").hugepage_guard
    False
    >>> Policy.preset("6.19") == Policy.preset("fault-time")
    True

    Raises:
        ValueError: a knob has a value outside its choices.
    """

    rmp_update: str = "fault-time"
    directmap: str = "split-4k"
    prepare: str = "once-per-folio"
    zap_filter: str = "old-type"
    hugepage_guard: bool = True
    attr_ioctl: str = "all-or-nothing"
    gmem_max_order: int = 0
    mixed_head_in_slot: str = "whole-chunk"
    private_fault_source: str = "access"
    tdx_initial_image: str = "add-in-sept-hook"
    tdx_huge_pages: bool = False
    rmp_fault_zap: str = "from-gfn"
    pre_fault_memory: bool = True
    pre_fault_invalid_slot: str = "eagain"
    snp_launch_zero_len: str = "einval"
    memslot_zap: str = "slot"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = _CHOICES[f.name]
            # bool is an int: compare types too so that gmem_max_order=True is rejected.
            if not any(type(value) is type(c) and value == c for c in choices):
                raise ValueError(
                    f"Policy.{f.name}={value!r} is not one of {', '.join(map(repr, choices))}"
                )

    @classmethod
    def preset(cls, name: str) -> Policy:
        """The policy of a kernel version or historical design, by name.

        Raises:
            ValueError: ``name`` is not a preset; the message lists the presets.
        """
        if not isinstance(name, str):
            raise TypeError(f"policy preset name must be a str, not {type(name).__name__}")
        try:
            knobs = _PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown policy preset {name!r}; presets are {', '.join(sorted(_PRESETS))}"
            ) from None
        return cls(**knobs)

    @staticmethod
    def presets() -> tuple[str, ...]:
        """Names accepted by :meth:`preset`, sorted."""
        return tuple(sorted(_PRESETS))

    def replace(self, **changes: object) -> Policy:
        """A copy with some knobs changed (validated like the constructor).

        Raises:
            ValueError: an unknown knob name or an invalid value.
        """
        unknown = sorted(set(changes) - set(_CHOICES))
        if unknown:
            raise ValueError(f"unknown Policy knob(s) {', '.join(unknown)}; knobs are {', '.join(_CHOICES)}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


#: Where each knob can change what pkvm counts (``pkvm policies``; docs/workloads.md).
KNOB_SCOPE: Mapping[str, str] = MappingProxyType({
    "rmp_update": "SNP",
    "directmap": "SNP",
    "prepare": "all (when pages are zeroed / prepared)",
    "zap_filter": "TDX (mirror root only)",
    "hugepage_guard": "all, only while an invalidation races a fault",
    "attr_ioctl": "all",
    "gmem_max_order": "all",
    "mixed_head_in_slot": "all, memslot edges not 2M-aligned",
    "private_fault_source": "SW_PROTECTED (workload implicit)",
    "tdx_initial_image": "TDX build (pf_fixed, a busy PAGE.ADD)",
    "tdx_huge_pages": "TDX",
    "rmp_fault_zap": "SNP (RMP #NPF after a PSMASH)",
    "pre_fault_memory": "all, the KVM_PRE_FAULT_MEMORY ioctl (no workload uses it)",
    "pre_fault_invalid_slot": "all, KVM_PRE_FAULT_MEMORY racing a memslot deletion (no workload does)",
    "snp_launch_zero_len": "SNP, KVM_SEV_SNP_LAUNCH_UPDATE with len 0 (no workload does)",
    "memslot_zap": "SNP, SW_PROTECTED, memslot delete or move (no workload does)",
})


def preset_table() -> tuple[tuple[str, ...], list[tuple[str, str, tuple[str, ...]]]]:
    """The preset names (kernel versions in version order, then the designs) and, for every
    knob, ``(knob, where it matters, value per preset)``: what ``pkvm policies`` prints."""
    def key(name: str) -> tuple[int, tuple[int, ...], str]:
        parts = name.split(".")
        if all(p.isdigit() for p in parts):
            return (0, tuple(int(p) for p in parts), name)
        return (1, (), name)

    names = tuple(sorted(Policy.presets(), key=key))
    pols = [Policy.preset(n) for n in names]
    return names, [(k, KNOB_SCOPE[k], tuple(str(getattr(p, k)) for p in pols)) for k in _CHOICES]


def _build_presets() -> Mapping[str, Mapping[str, Any]]:
    """Knob values of every preset, as read-only mappings (no module-level mutable state)."""
    v6_8 = dict(
        rmp_update="fault-time", directmap="split-4k", prepare="none", zap_filter="all",
        hugepage_guard=False, attr_ioctl="all-or-nothing", gmem_max_order=0,
        mixed_head_in_slot="start-only", private_fault_source="attributes",
        tdx_initial_image="premap-then-add", tdx_huge_pages=False, rmp_fault_zap="from-gfn",
        pre_fault_memory=False, pre_fault_invalid_slot="retry", snp_launch_zero_len="no-op",
        memslot_zap="all",
    )
    v6_11 = dict(v6_8, prepare="once-per-folio", mixed_head_in_slot="whole-chunk", private_fault_source="access",
                 pre_fault_memory=True)
    v6_16 = dict(v6_11, zap_filter="old-type", hugepage_guard=True, memslot_zap="slot")
    v6_19 = dict(v6_16, tdx_initial_image="add-in-sept-hook", pre_fault_invalid_slot="eagain",
                 snp_launch_zero_len="einval")
    # RFC v8 of the SNP host series (LKML, Feb-Mar 2023; kernel-semantics.md §7.7): RMPUPDATE from the post-lock
    # update_mem_attr op, direct map unmapped/restored around it, the UPM-era ioctl, no prepare
    # hook and none of the later MMU fixes.
    rfc_v8 = dict(v6_8, rmp_update="eager-post", directmap="unmap-restore", attr_ioctl="legacy-progress",
                  private_fault_source="access")
    # The design presets compare *where the RMPUPDATE happens* and nothing else: the 6.19 kernel
    # with the RMPUPDATE moved out of gmem_prepare, and the RFC-era direct map that the eager
    # designs were written for (unmap before making private, restore after making shared). So
    # they run on SNP VMs, whose 6.19 guest_memfd has the prepare hook; "rfc-v8" stays the
    # whole historical kernel (UPM-era ioctl, no prepare hook).
    eager = dict(v6_19, directmap="unmap-restore")
    presets = {
        "6.8": v6_8, "6.11": v6_11, "6.16": v6_16, "6.19": v6_19, "fault-time": v6_19,
        "rfc-v8": rfc_v8,
        "eager-post": dict(eager, rmp_update="eager-post"),
        "eager-locked": dict(eager, rmp_update="eager-locked"),
        "eager-split": dict(eager, rmp_update="eager-split"),
        # Beyond upstream: 6.19 plus the TDX huge page series, on 2M guest_memfd folios.
        "tdx-huge-pages": dict(v6_19, gmem_max_order=9, tdx_huge_pages=True),
    }
    return MappingProxyType({name: MappingProxyType(knobs) for name, knobs in presets.items()})


_PRESETS = _build_presets()


#: Presets that name one platform's design, with that platform. On another platform the knobs
#: that make them differ are not read, so they would run 6.19 under another name.
_PRESET_PLATFORM = MappingProxyType({
    "fault-time": "snp", "eager-post": "snp", "eager-locked": "snp", "eager-split": "snp",
    "tdx-huge-pages": "tdx",
})
#: Knobs only one platform reads.
_KNOB_PLATFORM = MappingProxyType({
    "rmp_update": "snp", "directmap": "snp", "tdx_huge_pages": "tdx", "tdx_initial_image": "tdx",
    "snp_launch_zero_len": "snp",
})


def platform_mismatch(spec: str, platform: str) -> str | None:
    """Why the policy spec ``spec`` (``"PRESET+knob=value..."``, already valid) means nothing
    on ``platform`` (``"snp"``, ``"tdx"``, ``"sw_protected"``, ...), or None if it does: a
    preset named for another platform's design, or a knob only another platform reads."""
    name, *changes = spec.split("+")
    owner = _PRESET_PLATFORM.get(name.strip())
    if owner is not None and owner != platform:
        return (f"{name.strip()!r} is {_a(owner)} {owner} design, and {_a(platform)} {platform} VM does not read "
                "the knobs that make it one")
    for ch in changes:
        knob = ch.partition("=")[0].strip()
        owner = _KNOB_PLATFORM.get(knob)
        if owner is not None and owner != platform:
            return f"knob {knob} is read only by {_a(owner)} {owner} VM"
    return None


def _a(platform: str) -> str:
    """The article before a platform name as it is read aloud (an S-N-P, a T-D-X)."""
    return "an" if platform in ("snp", "sev", "sev_es") else "a"


def resolve_policy(policy: Policy | str) -> Policy:
    """``policy`` itself if it is a :class:`Policy`, else the policy a spec string names: a
    preset, optionally with knobs changed, ``"PRESET+knob=value+knob=value"``.

    >>> resolve_policy("eager-post+directmap=split-4k").directmap
    'split-4k'
    >>> resolve_policy("6.19+gmem_max_order=9").gmem_max_order
    9

    Raises:
        ValueError: an unknown preset or knob, a knob given twice, or a value outside the
            knob's choices.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        name, *changes = policy.split("+")
        base = Policy.preset(name.strip())
        if not changes:
            return base
        knobs: dict[str, object] = {}
        given: dict[str, str] = {}
        for ch in changes:
            knob, eq, text = ch.partition("=")
            knob, text = knob.strip(), text.strip()
            if not eq or knob not in _CHOICES:
                raise ValueError(f"policy {policy!r}: {ch!r} is not knob=value; knobs are {', '.join(_CHOICES)}")
            if knob in given:
                raise ValueError(f"policy {policy!r} gives knob {knob} twice ({given[knob]} and {ch.strip()}); "
                                 "give each knob once")
            given[knob] = ch.strip()
            match = [c for c in _CHOICES[knob] if str(c).lower() == text.lower()]
            if not match:
                raise ValueError(f"policy {policy!r}: {knob}={text!r} is not one of "
                                 f"{', '.join(str(c) for c in _CHOICES[knob])}")
            knobs[knob] = match[0]
        return base.replace(**knobs)
    raise TypeError(f"policy must be a pkvm.Policy or a preset name, not {type(policy).__name__}")
