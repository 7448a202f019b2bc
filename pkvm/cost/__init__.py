"""Modeled time: the cost table (:mod:`pkvm.cost.table`), the :class:`~pkvm.cost.model.CostModel`
built from it (:mod:`pkvm.cost.model`) and the per-actor :class:`~pkvm.cost.ledger.Ledger`.

This layer sits just above the typed core and knows nothing of KVM: every layer above charges
its operations here. See ``docs/costs.md`` and the "Layers" section of ``docs/design.md``.
"""
