"""A griffe extension: the reStructuredText habits of mtlzoo's docstrings, as Markdown.

The docstrings are Google style, with a few reST constructs that Python's own tools read
(``help()``, doctests) but Markdown does not. Before mkdocstrings renders a docstring this rewrites

- ``.. math::`` blocks to ``$$ ... $$`` (rendered to MathML by the ``mtlzoo_docs`` hook);
- ``:math:`x``` to ``$x$``;
- cross-reference roles (``:class:`~mtlzoo.protocol.Request```) to inline code (``Request``);
- a paragraph ending in ``::`` (a reST literal block follows) to one ending in ``:``;
- doctest blocks (``>>>`` lines and their output, up to a blank line) to fenced ``pycon`` code,
  so that an ``Example:`` admonition shows them as code (Markdown would read ``[a]`` then ``[b]``
  on the next line as a reference link).

The source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:[ \t]*\n|(?P=indent)[ \t]+\S.*\n?)+)",
                        re.MULTILINE)
MATH_ROLE = re.compile(r":math:`([^`]+)`")
ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj|const):`~?([^`]+)`")
LITERAL_INTRO = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _math_block(match: re.Match[str]) -> str:
    indent = match.group("indent")
    lines = [line.strip() for line in match.group("body").splitlines() if line.strip()]
    return f"{indent}$$\n" + "".join(f"{indent}{line}\n" for line in lines) + f"{indent}$$\n\n"


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).split("`")[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def fence_doctests(text: str) -> str:
    """Wrap every run of doctest lines (from a ``>>>`` line to the next blank line) in a ``pycon`` fence."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    fenced = False
    while index < len(lines):
        line = lines[index]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            fenced = not fenced
        if fenced or not stripped.startswith(">>>"):
            out.append(line)
            index += 1
            continue
        indent = line[: len(line) - len(stripped)]
        out.append(f"{indent}```pycon")
        while index < len(lines) and lines[index].strip():
            out.append(lines[index])
            index += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST constructs rewritten (see the module docstring)."""
    text = fence_doctests(text)
    text = MATH_BLOCK.sub(_math_block, text)
    text = MATH_ROLE.sub(r"$\1$", text)
    text = ROLE.sub(_role, text)
    return LITERAL_INTRO.sub(r"\1:", text)


class ReSTToMarkdown(griffe.Extension):
    """Rewrites every docstring griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
