"""The host kernel below KVM: host physical memory (:mod:`pkvm.host.hostmem`) and the kernel
direct map (:mod:`pkvm.host.directmap`).

Neither knows about VMs; the KVM model and the platforms use both. See the "Layers" section of
``docs/design.md``.
"""
