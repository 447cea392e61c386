"""mkdocs hook: docstring examples written as doctests (`>>>` lines) become code blocks.

The package's docstrings keep their examples as doctests, as Python's help() shows them;
Markdown would run them into a paragraph (and read the `*` of a glob as emphasis). The
extension is added to mkdocs' Markdown configuration, which mkdocstrings reuses for the
docstrings it renders. Indented doctests are already code blocks and are left alone.
"""

from __future__ import annotations

import re
from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor

_FLAGS = re.compile(r"\s*#\s*doctest:.*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


class _DoctestBlocks(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        fenced = False
        block: list[str] = []

        def flush() -> None:
            if block:
                out.extend(["", "```pycon", *block, "```", ""])
                block.clear()

        for line in lines:
            if _FENCE.match(line):
                fenced = not fenced
            if not fenced and (line.startswith(">>>") or (block and line.strip())):
                block.append(_FLAGS.sub("", line))
                continue
            flush()
            out.append(line)
        flush()
        return out


class DoctestBlocks(Extension):
    def extendMarkdown(self, md: Markdown) -> None:  # noqa: N802 (Python-Markdown's name)
        md.preprocessors.register(_DoctestBlocks(md), "graphfreeze_doctest_blocks", 30)


def on_config(config: Any) -> Any:
    config.markdown_extensions.append(DoctestBlocks())
    return config
