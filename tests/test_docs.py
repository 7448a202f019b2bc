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


# ---- everything else a reader copies: code blocks and command lines ----------------------------
#
# The ``>>>`` examples above run. The rest of what the README and docs/ show is checked without
# running it, in a few seconds: every ```python block compiles and imports only names that exist,
# the Cython block cimports only what pkvm/core.pxd declares, every ``pkvm SUBCOMMAND --flag``
# (in shell blocks, in inline code and in the command line's own --help examples) names a real
# subcommand and real options and parses, and every bench/, tests/, pkvm/ or docs/ path a
# command or inline code names exists.

import argparse  # noqa: E402
import ast  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402

from pkvm import cli  # noqa: E402

_FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1\2[ \t]*$", re.M | re.S)
_SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
# A command line in a block: ``pkvm SUB``, ``python3 -m pkvm SUB`` (also after ``$ `` or a
# profiler's ``--``), the subcommand a lower-case word (so "pkvm 0.1.0 · snp ..." is output).
_CMD = re.compile(r"(?:^\s*(?:\$\s+)?|\s(?:--|&&|;)\s+)(?:python3[\d.]*\s+(?:-X\s+\S+\s+)*-m\s+pkvm|pkvm)\s+([a-z]\S*.*)$")
_INLINE_CMD = re.compile(r"^(?:python3\s+-m\s+)?pkvm\s+([a-z]\S*.*)$", re.S)
_PATH = re.compile(r"(?<![\w./-])((?:bench|tests|pkvm|docs)/[\w/.-]*\w\.(?:py|pyx|pxd|pxi|md|png|toml|txt|json))(?![\w.])")


def _blocks(path):
    """(language, first line number, text) of every fenced block of ``path``."""
    text = path.read_text()
    for m in _FENCE.finditer(text):
        yield m.group(3).lower(), text.count("\n", 0, m.start(4)) + 1, m.group(4)


def _prose(path):
    """``path``'s text with its fenced blocks blanked (line numbers kept)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())


def _inline_code(path):
    """(line number, text) of every inline code span outside fenced blocks; a span may wrap."""
    text = _prose(path)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        yield text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def _subparsers():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def _argv(command):
    """The words of one shell command, up to a pipe, a redirection or the next command."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    words = []
    for w in lex:
        if w and set(w) <= set("|&;<>()"):
            break
        words.append(w)
    return words


def _command_problems(argv, full_parse):
    """What is wrong with ``pkvm ARGV``: an unknown subcommand or option, or (``full_parse``)
    arguments the parser refuses."""
    parser, subs = _subparsers()
    if not argv or argv[0] not in subs:
        return [f"unknown subcommand {argv[:1]} (known: {', '.join(subs)})"]
    known = {s for a in subs[argv[0]]._actions for s in a.option_strings}
    problems = [f"{argv[0]} has no option {w.split('=')[0]}" for w in argv[1:]
                if re.match(r"--?[A-Za-z]", w) and w.split("=")[0] not in known]
    if full_parse and not problems:
        try:
            parser.parse_args(cli._join_dash_values(parser, list(argv)))
        except cli.UsageError as e:
            problems.append(f"refused: {e}")
    return problems


def _doc_commands():
    """(where, argv, full_parse) of every pkvm command line in the README and docs/."""
    for path in DOCS:
        for lang, line, text in _blocks(path):
            if lang not in _SHELL_LANGS:
                continue
            text = re.sub(r"\\\n", " ", text)
            for i, row in enumerate(text.splitlines()):
                m = _CMD.search(row)
                if m:
                    yield f"{path.name}:{line + i}", _argv(m.group(1)), True
        for line, span in _inline_code(path):
            m = _INLINE_CMD.match(span)
            if m:
                # Inline mentions may name an option without its value (`pkvm sweep --grid`).
                yield f"{path.name}:{line}", _argv(m.group(1)), False


def _help_commands():
    """(where, argv) of every ``pkvm ...`` example in the command line's help texts."""
    parser, subs = _subparsers()
    for name, p in [("pkvm --help", parser), *((f"pkvm {n} --help", s) for n, s in subs.items())]:
        for row in (p.epilog or "").splitlines():
            m = re.match(r"\s*pkvm\s+(.*)$", row)
            if m:
                yield name, _argv(m.group(1))


def test_doc_commands_name_real_subcommands_and_options():
    """Every ``pkvm SUBCOMMAND --flag ...`` the README and docs/ show names a subcommand and
    options the command line has; a command in a shell block also parses as written."""
    found = list(_doc_commands())
    assert len(found) > 40
    bad = [f"{where}: pkvm {' '.join(argv)}: {p}"
           for where, argv, full in found for p in _command_problems(argv, full)]
    assert not bad, "\n".join(bad)


def test_help_examples_parse():
    """The examples in ``pkvm --help`` (and any subcommand's epilog) parse as written."""
    found = list(_help_commands())
    assert len(found) >= 5
    bad = [f"{where}: pkvm {' '.join(argv)}: {p}" for where, argv in found
           for p in _command_problems(argv, True)]
    assert not bad, "\n".join(bad)


def _python_blocks():
    for path in DOCS:
        for lang, line, text in _blocks(path):
            if lang in ("python", "py", "pycon"):
                yield f"{path.name}:{line}", text


def _block_source(text):
    """A block's code: the ``>>>`` examples' source, or the block itself."""
    if ">>>" not in text:
        return text
    return "".join(ex.source for ex in doctest.DocTestParser().get_examples(text))


def _is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # the parent is a module, not a package
        return False


def _import_problems(tree):
    """Names a block imports that do not exist (pkvm's are imported; others only looked up)."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [(node.module, [a.name for a in node.names])]
        else:
            continue
        for mod, names in mods:
            if mod.split(".")[0] != "pkvm":
                if not _is_module(mod.split(".")[0]):
                    problems.append(f"no module {mod}")
                continue
            try:
                m = importlib.import_module(mod)
            except ImportError as e:
                problems.append(f"import {mod}: {e}")
                continue
            for n in names:
                if n != "*" and not hasattr(m, n) and not _is_module(f"{mod}.{n}"):
                    problems.append(f"{mod} has no {n}")
    return problems


@pytest.mark.parametrize("where,text", list(_python_blocks()), ids=lambda v: v if ":" in v else "")
def test_python_blocks_compile_and_import_real_names(where, text):
    """Every ```python block compiles, and every name it imports from pkvm exists."""
    tree = compile(_block_source(text), where, "exec", ast.PyCF_ONLY_AST)
    compile(tree, where, "exec")
    assert not _import_problems(tree), _import_problems(tree)


def test_cython_blocks_cimport_the_c_api():
    """Every name a ```cython block cimports from ``pkvm.core`` is declared in pkvm/core.pxd."""
    pxd = (ROOT / "pkvm" / "core.pxd").read_text()
    blocks = [(f"{p.name}:{line}", text) for p in DOCS for lang, line, text in _blocks(p) if lang == "cython"]
    assert blocks
    for where, text in blocks:
        for m in re.finditer(r"^from\s+pkvm\.core\s+cimport\s+(.+)$", text, re.M):
            for name in (n.strip() for n in m.group(1).split(",")):
                assert re.search(rf"\b{name}\b", pxd), f"{where}: pkvm/core.pxd declares no {name}"


def test_paths_in_commands_and_inline_code_exist():
    """Every bench/, tests/, pkvm/ or docs/ file named in inline code or a shell block exists
    (diff blocks, which record old paths, are left out)."""
    missing = []
    for path in DOCS:
        texts = [(line, span) for line, span in _inline_code(path)]
        texts += [(line, text) for lang, line, text in _blocks(path) if lang in _SHELL_LANGS]
        for line, text in texts:
            missing += [f"{path.name}:{line}: {m}" for m in _PATH.findall(text) if not (ROOT / m).exists()]
    assert not missing, "\n".join(missing)


def test_help_sensitivity_examples_are_re_priced():
    """A ``pkvm sensitivity`` example in --help finishes in seconds: its metric is re-priced
    from one counting run per policy (the default metric, the critical path, is simulated per
    sample: 1024 base samples of a 64G boot would take hours)."""
    from pkvm.experiments.uncertainty import is_repriceable

    parser, _ = _subparsers()
    examples = [argv for _, argv in _help_commands() if argv[0] == "sensitivity"]
    assert examples
    for argv in examples:
        args = parser.parse_args(cli._join_dash_values(parser, list(argv)))
        assert args.metric is not None and is_repriceable(args.metric) and args.vcpus in (None, 1), argv


def _resolves(name):
    """Whether the dotted ``pkvm....`` name is a module, or an attribute reached from one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if (ROOT / Path(*parts[:i])).with_suffix(".pxd").exists() and i == len(parts):
            return True  # a cimport-only module: pkvm.core
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    else:
        return False
    for part in parts[i:]:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif hasattr(obj, "__path__") and _is_module(f"{obj.__name__}.{part}"):
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            return False
    return True


def test_inline_pkvm_names_exist():
    """Every ``pkvm.a.b`` a reader is pointed to in inline code exists (a one-letter last part
    is a placeholder: ``pkvm.vm.X``). performance.md is left out: its entries record the code
    of their day, names since moved included."""
    missing = []
    for path in DOCS:
        if path.name == "performance.md":
            continue
        for line, span in _inline_code(path):
            for m in re.finditer(r"(?<![\w.])pkvm(?:\.[A-Za-z_]\w*)+", span):
                name = m.group(0)
                if not re.search(r"\.[A-Z]$", name) and not _resolves(name):
                    missing.append(f"{path.name}:{line}: {name}")
    assert not missing, "\n".join(missing)


def test_sensitivity_md_lists_every_grid_key():
    """docs/sensitivity.md's list of ``pkvm sweep --grid`` keys names every key the command
    takes (``experiments.grid_fields()``): it left out ``batch_pages`` and ``pagewise_locks``,
    which ``pkvm sweep --help`` lists and ``--grid batch_pages=512,16384`` accepts."""
    import re

    from pkvm import experiments

    doc = (ROOT / "docs" / "sensitivity.md").read_text(encoding="utf-8")
    start = doc.index("Grid keys are")
    sentence = doc[start:doc.index(";", start)]
    assert set(re.findall(r"`(\w+)`", sentence)) >= set(experiments.grid_fields())
