"""Plain-text pieces the reports share: shapes and aligned tables."""

from __future__ import annotations

from collections.abc import Sequence


def format_shape(shape: Sequence[int | None]) -> str:
    """(3, 4) -> '3x4'; () -> 'scalar'."""
    return "x".join(map(str, shape)) or "scalar"


def text_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> list[str]:
    """Aligned lines for a terminal: the header, a rule of dashes, then the rows.

    >>> print("\\n".join(text_table(("name", "n"), [("a", 1), ("bb", 22)])))
    name  n
    ----  --
    a     1
    bb    22
    """
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[object]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]
