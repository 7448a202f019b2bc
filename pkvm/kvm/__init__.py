"""The generic KVM model: the VM and its ioctls (:mod:`pkvm.kvm.vm`), memslots
(:mod:`pkvm.kvm.memslots`), the TDP MMU (:mod:`pkvm.kvm.mmu`), ``guest_memfd``
(:mod:`pkvm.kvm.gmem`), exits and hypercalls (:mod:`pkvm.kvm.exits`), design policies
(:mod:`pkvm.kvm.policy`), the invariant checker (:mod:`pkvm.kvm.check`) and batched calls
from numpy arrays (:mod:`pkvm.kvm.batch`).

See ``docs/kvm-model.md`` and the "Layers" section of ``docs/design.md``.
"""
