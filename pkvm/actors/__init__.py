"""The two actors that drive a VM: the guest kernel (:mod:`pkvm.actors.guest`) and the VMM
(:mod:`pkvm.actors.vmm`), with the flow protocols a platform plugs its conversion protocol into.

See ``docs/kvm-model.md`` and the "Layers" section of ``docs/design.md``.
"""
