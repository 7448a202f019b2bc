"""Test oracles for pkvm, importable by downstream tests (as ``numpy.testing`` is).

The slow, obviously-correct reference twins of the runtime: per-key range maps
(:mod:`pkvm.testing.reference`), a per-gfn VM (:mod:`pkvm.testing.reference_vm`), the SNP RMP
and direct map (:mod:`pkvm.testing.reference_snp`) and the TDX S-EPT
(:mod:`pkvm.testing.reference_tdx`); and Hypothesis strategies (:mod:`pkvm.testing.strategies`,
which needs ``hypothesis``; the range-map twins need ``sortedcontainers``: both are in the ``test``
extra). Runtime code never imports this package (an import-linter
contract in ``pyproject.toml``, run by ``tests/test_layers.py``).
"""
