"""The examples in the README, docs/ and the core's docstrings run as written."""

import doctest
from pathlib import Path

import pytest

import pkvm._core

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_markdown_examples(path):
    """Every ``>>>`` example in the file gives the output shown."""
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_core_docstring_examples():
    """The doctests in pkvm._core's docstrings pass."""
    result = doctest.testmod(pkvm._core)
    assert result.failed == 0
    assert result.attempted > 0
