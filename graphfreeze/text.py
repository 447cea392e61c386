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


def human(n: int) -> str:
    """A count in k / M / G: 1234567 -> '1.2 M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def count_list(counts: dict[str, int], limit: int | None = None) -> str:
    """'MatMul x4, Mul x2' (most first, at most `limit` kinds), or 'none'."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = items if limit is None else items[:limit]
    text = ", ".join(f"{op} x{n}" for op, n in shown) or "none"
    return text + (f", ... ({len(items) - len(shown)} more types)" if len(shown) < len(items) else "")
