"""Every cross-reference in the README, docs/, pkvm's docstrings and comments and the CLI's
``--help`` texts resolves inside the repository.

Checked: relative markdown links (and their ``#anchor``), repository paths written in text
(``docs/...``, ``pkvm/...``, ``tests/...``, ``bench/...``), and "§N.M" section citations. A
citation resolves to the document named right before it (``docs/kernel-semantics.md §2.4``,
``costs.md`` §0, ``[tdx.md](tdx.md) §3``); a bare "§N.M" resolves to the last document so named
earlier in the same text (a Python file, one ``--help`` text, or a markdown paragraph), else to
the document a markdown file declares ("§ numbers refer to X.md"), else, in a markdown file, to
that file itself. The resolved document must have a heading numbered N.M. Text must also not
point outside the repository (the house references users never see).
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from pkvm import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_HEADING_NUMBER = re.compile(r"^§?\s*(\d+(?:\.\d+)*)\.?(?:\s|$)")
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]\n]*\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|pkvm|tests|bench)/[\w./-]*[\w])(?![\w*{])(?:#([\w-]+))?")
_DOC_NAME = r"(?P<doc>[\w./-]*[\w-]\.md)(?:#[\w-]*)?"
_SECTION = r"§\s?\d+(?:\.\d+)*"
# A document name, optionally closed by backticks or a markdown link, then a list of sections.
_EXPLICIT = re.compile(
    _DOC_NAME + r"[`)\]]*(?:'s)?\s*(?:\(|,)?\s*(?:Appendix [A-Z][,;]?\s*)?(?P<secs>" + _SECTION
    + r"(?:\s*(?:,|;|-|–|and|or|to|/)\s*(?:" + _SECTION + r"|\d+(?:\.\d+)*))*)"
)
_DECLARATION = re.compile(r"§\s*(?:numbers|references|citations)[^.]{0,80}?\b" + _DOC_NAME)
_SECTION_TOKEN = re.compile(r"§\s?(\d+(?:\.\d+)*)")
# Pointers to the house references outside the repository, which users never see.
_OUTSIDE = re.compile(
    r"\.\./shared|shared/(?:spec|design|seed)|\bspec/costs\.md|(?i:\bspec\s+`*§)"
    r"|\bARCHITECTURE\b|\bSTYLE\b|(?i:\bseed thread\b)"
)


@dataclass(frozen=True)
class Text:
    """One unit of text to check: where it comes from, and the directory links are relative to."""

    where: str
    body: str
    base: Path
    markdown: bool
    own_doc: Path | None = None


def _strip_fences(text: str) -> str:
    """The markdown text with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def _headings(path: Path) -> list[str]:
    return [m.group(2) for line in _strip_fences(path.read_text(encoding="utf-8")).splitlines()
            if (m := _HEADING.match(line))]


def heading_numbers(path: Path) -> set[str]:
    """The section numbers ("2", "2.4", "0") the headings of a markdown file carry."""
    return {m.group(1) for h in _headings(path) if (m := _HEADING_NUMBER.match(h))}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_~]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of a markdown file (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for h in _headings(path):
        s = _slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def _resolve_doc(name: str, text: Text) -> Path | None:
    """The markdown file a document name in ``text`` means, or None if there is none."""
    candidates = [ROOT / name, text.base / name, DOCS / name] if "/" in name else [
        text.base / name, DOCS / name, ROOT / name]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def _paragraphs(body: str) -> list[tuple[int, str]]:
    """(offset, paragraph) pairs of a markdown body, split at blank lines."""
    out, pos = [], 0
    for chunk in re.split(r"(\n[ \t]*\n)", body):
        if chunk.strip() and not re.fullmatch(r"\n[ \t]*\n", chunk):
            out.append((pos, chunk))
        pos += len(chunk)
    return out


def section_problems(text: Text) -> list[str]:
    """Every "§N.M" in ``text`` that does not resolve to a numbered heading of a document."""
    problems = []
    body = _strip_fences(text.body) if text.markdown else text.body
    declared = None
    if text.markdown:
        m = _DECLARATION.search(body)
        if m:
            declared = _resolve_doc(m.group("doc"), text)
            if declared is None:
                problems.append(f"{text.where}: § numbers declared to refer to missing {m.group('doc')}")
    units = _paragraphs(body) if text.markdown else [(0, body)]
    for _, unit in units:
        explicit = []  # (start of the section list, end, doc path or None, doc name)
        for m in _EXPLICIT.finditer(unit):
            explicit.append((m.start("secs"), m.end("secs"), _resolve_doc(m.group("doc"), text),
                             m.group("doc")))
        for tok in _SECTION_TOKEN.finditer(unit):
            number = tok.group(1)
            owner = [e for e in explicit if e[0] <= tok.start() < e[1]]
            earlier = [e for e in explicit if e[1] <= tok.start()]
            if owner:
                doc, name = owner[0][2], owner[0][3]
            elif earlier:
                doc, name = earlier[-1][2], earlier[-1][3]
            elif declared is not None:
                doc, name = declared, declared.name
            elif text.markdown and text.own_doc is not None:
                doc, name = text.own_doc, text.own_doc.name
            else:
                line = unit[max(0, tok.start() - 60):tok.end() + 20].replace("\n", " ")
                problems.append(f"{text.where}: §{number} names no document: ...{line}...")
                continue
            if doc is None:
                problems.append(f"{text.where}: §{number} cites {name}, which is not in the repository")
            elif number not in heading_numbers(doc):
                problems.append(f"{text.where}: §{number} cites {doc.relative_to(ROOT)}, "
                                "which has no heading with that number")
    return problems


def link_problems(text: Text) -> list[str]:
    """Markdown links and repository paths in ``text`` that point at nothing."""
    problems = []
    body = _strip_fences(text.body) if text.markdown else text.body
    if text.markdown:
        for m in _LINK.finditer(body):
            target = m.group(1) or m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto: ...
            path_part, _, anchor = target.partition("#")
            dest = (text.base / path_part).resolve() if path_part else text.own_doc
            if dest is None or not dest.exists():
                problems.append(f"{text.where}: link to missing {target}")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{text.where}: link to {target}: no heading has that anchor")
    for m in _REPO_PATH.finditer(body):
        path, anchor = m.group(1).rstrip("."), m.group(2)
        if not (ROOT / path).exists():
            problems.append(f"{text.where}: {path} is not in the repository")
        elif anchor and path.endswith(".md") and anchor not in anchors(ROOT / path):
            problems.append(f"{text.where}: {path}#{anchor}: no heading has that anchor")
    for m in _OUTSIDE.finditer(body):
        line = body[max(0, m.start() - 40):m.end() + 20].replace("\n", " ")
        problems.append(f"{text.where}: points outside the repository: ...{line}...")
    return problems


def problems(text: Text) -> list[str]:
    return link_problems(text) + section_problems(text)


# -- collecting the texts ---------------------------------------------------------------------


def _markdown_texts() -> list[Text]:
    files = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    return [Text(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8"), p.parent, True, p.resolve())
            for p in files]


def _python_prose(source: str) -> str:
    """The docstrings, other bare strings and comments of a Python file, in file order."""
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            pieces.append((node.lineno, node.value.value))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            pieces.append((tok.start[0], tok.string))
    return "\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def _cython_prose(source: str) -> str:
    """Triple-quoted strings and comments of a Cython file, in file order."""
    pat = re.compile(r'("""|\'\'\')(.*?)\1|#[^\n]*', re.S)
    return "\n".join(m.group(2) if m.group(1) else m.group(0) for m in pat.finditer(source))


def _source_texts() -> list[Text]:
    out = []
    for p in sorted((ROOT / "pkvm").rglob("*")):
        if p.suffix == ".py":
            body = _python_prose(p.read_text(encoding="utf-8"))
        elif p.suffix in (".pyx", ".pxd", ".pxi", ".pyi"):
            body = _cython_prose(p.read_text(encoding="utf-8"))
        else:
            continue
        out.append(Text(str(p.relative_to(ROOT)), body, ROOT, False))
    return out


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    assert code in (0, None), f"pkvm {' '.join(argv)} exited {code}"
    assert out.getvalue().startswith("usage:"), out.getvalue()[:200]
    return out.getvalue()


def _subcommands() -> list[str]:
    import argparse

    parser = cli.build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(name for a in actions for name in a.choices)


def _help_texts() -> list[Text]:
    return [Text(f"pkvm {' '.join(argv)}", _help(argv), ROOT, False)
            for argv in [["--help"], *([c, "--help"] for c in _subcommands())]]


# -- the checks -------------------------------------------------------------------------------


def test_there_are_subcommands_and_numbered_docs():
    """The collection is not vacuous: help texts of every subcommand and numbered references."""
    assert {"run", "compare", "costs"} <= set(_subcommands())
    assert {"2.4", "5.6", "7.7", "10.1"} <= heading_numbers(DOCS / "kernel-semantics.md")
    assert {"0", "1.7"} <= heading_numbers(DOCS / "costs.md")


@pytest.mark.parametrize("text", _markdown_texts(), ids=lambda t: t.where)
def test_markdown_references_resolve(text):
    assert problems(text) == []


def test_source_docstrings_and_comments_resolve():
    found = [p for t in _source_texts() for p in problems(t)]
    assert found == []


def test_help_texts_resolve():
    found = [p for t in _help_texts() for p in problems(t)]
    assert found == []


# -- the checker catches what it must -----------------------------------------------------------


def _md(body: str) -> Text:
    return Text("fake.md", body, DOCS, True, (DOCS / "design.md").resolve())


def _py(body: str) -> Text:
    return Text("fake.py", body, ROOT, False)


@pytest.mark.parametrize("body, expected", [
    ("See docs/no-such-file.md for more.", "docs/no-such-file.md is not in the repository"),
    ("See [it](no-such-file.md).", "link to missing no-such-file.md"),
    ("See [it](kernel-semantics.md#no-such-heading).", "no heading has that anchor"),
    ("See docs/design.md#no-such-heading.", "docs/design.md#no-such-heading: no heading has that anchor"),
    ("Per `kernel-semantics.md` §99.1.", "§99.1 cites docs/kernel-semantics.md, which has no heading"),
    ("Per missing-doc.md §2.4.", "§2.4 cites missing-doc.md, which is not in the repository"),
    ("Per the spec §2.4.", "points outside the repository"),
    ("Per ../shared/spec/kernel-semantics.md.", "points outside the repository"),
])
def test_checker_finds_a_dangling_reference_in_markdown(body, expected):
    found = problems(_md(body))
    assert len(found) >= 1 and any(expected in p for p in found), found


def test_checker_resolves_bare_sections_by_the_last_named_document():
    """A bare § after ``docs/costs.md`` §0 resolves to costs.md, which has no §2.4."""
    ok = "Per docs/kernel-semantics.md §2.9, then §4.7 and §3.1."
    assert problems(_py(ok)) == []
    bad = "Per docs/kernel-semantics.md §2.9; prices from docs/costs.md §0; the zap of §2.5."
    assert problems(_py(bad)) == [
        "fake.py: §2.5 cites docs/costs.md, which has no heading with that number"]


def test_checker_refuses_a_bare_section_outside_markdown():
    """In a docstring or help text, a § with no document named before it is dangling."""
    assert problems(_py("The PRE hook (§2.5) zaps.")) == [
        "fake.py: §2.5 names no document: ...The PRE hook (§2.5) zaps....",
    ]


def test_checker_accepts_good_references():
    body = ("See [kernel-semantics.md](kernel-semantics.md#25-the-x86-pre-hook) §2.5, §2.7 and "
            "docs/tdx.md; `pkvm/kvm/vm.py`; docs/design.md#layers; ![plot](img/compare-boot.png).")
    assert problems(_md(body)) == []
