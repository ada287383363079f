"""docs/derivations.md against numpy_gpt2/ops.py: the page derives every backward and links the code.

Three checks, all read from the files (no hard-coded list of ops): every top-level ``*_backward`` function of
ops.py has a section heading naming it in backticks; every line link ``[`name`](../numpy_gpt2/ops.py#La-Lb)``
spans exactly that function (its ``def`` line to its last line), and a failure prints the range to write; every
``*_forward`` and ``*_backward`` function is linked at least once.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPS = REPO / "numpy_gpt2" / "ops.py"
PAGE = REPO / "docs" / "derivations.md"
OPS_FROM_PAGE = "../numpy_gpt2/ops.py"  # how the page (in docs/) addresses ops.py

LINK = re.compile(r"\[`(?P<name>\w+)`\]\(\.\./numpy_gpt2/ops\.py#L(?P<start>\d+)-L(?P<end>\d+)\)")
ANY_LINE_LINK = re.compile(r"\[[^\]]*\]\(\.\./numpy_gpt2/ops\.py#[^)]*\)")
HEADING = re.compile(r"^#{1,6}\s.*$", re.MULTILINE)


def function_lines() -> dict[str, tuple[int, int]]:
    """Top-level functions of ops.py -> (line of the ``def``, last line)."""
    tree = ast.parse(OPS.read_text(encoding="utf-8"), filename=str(OPS))
    return {
        node.name: (node.lineno, node.end_lineno)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


FUNCTIONS = function_lines()
PAGE_TEXT = PAGE.read_text(encoding="utf-8")
BACKWARDS = sorted(name for name in FUNCTIONS if name.endswith("_backward"))
PAIRED = sorted(name for name in FUNCTIONS if name.endswith(("_forward", "_backward")))
LINKS = [(m["name"], int(m["start"]), int(m["end"]), PAGE_TEXT.count("\n", 0, m.start()) + 1)
         for m in LINK.finditer(PAGE_TEXT)]


def link_for(name: str) -> str:
    start, end = FUNCTIONS[name]
    return f"[`{name}`]({OPS_FROM_PAGE}#L{start}-L{end})"


def test_ops_has_forward_backward_pairs():
    """Guards the parametrised tests below against collecting nothing."""
    assert BACKWARDS, f"no *_backward function found in {OPS}"
    assert LINKS, f"no [`name`]({OPS_FROM_PAGE}#La-Lb) link found in {PAGE}"


@pytest.mark.parametrize("name", BACKWARDS)
def test_every_backward_has_a_section(name):
    has_section = any(f"`{name}`" in heading for heading in HEADING.findall(PAGE_TEXT))
    assert has_section, (
        f"{PAGE.relative_to(REPO)} has no section heading naming `{name}` in backticks; "
        f"add one, e.g. '## ... — `{name.removesuffix('_backward')}_forward` / `{name}`'"
    )


@pytest.mark.parametrize("name,start,end,line", LINKS, ids=[f"{n}@page-line-{ln}" for n, _, _, ln in LINKS])
def test_link_spans_exactly_its_function(name, start, end, line):
    where = f"{PAGE.relative_to(REPO)}:{line}"
    assert name in FUNCTIONS, f"{where} links `{name}`, which is not a top-level function of ops.py"
    assert (start, end) == FUNCTIONS[name], (
        f"{where} links `{name}` to L{start}-L{end}, but it spans L{FUNCTIONS[name][0]}-L{FUNCTIONS[name][1]}: "
        f"write {link_for(name)}"
    )


def test_every_line_link_to_ops_has_the_checked_form():
    """A link to ops.py lines that LINK does not match (one line, odd text) would escape the check above."""
    unchecked = [link for link in ANY_LINE_LINK.findall(PAGE_TEXT) if not LINK.fullmatch(link)]
    assert not unchecked, f"write these as [`name`]({OPS_FROM_PAGE}#L<def line>-L<last line>): {unchecked}"


@pytest.mark.parametrize("name", PAIRED)
def test_every_forward_and_backward_is_linked(name):
    linked = {link_name for link_name, _, _, _ in LINKS}
    assert name in linked, f"{PAGE.relative_to(REPO)} never links `{name}`; add {link_for(name)}"
