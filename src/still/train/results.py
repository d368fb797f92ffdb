"""Results: a JSON file next to a human-readable Markdown table, both written atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from still.train.io import atomic_write_text


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """A Markdown table of `rows` (dicts) in `columns` order (default: keys of the first row)."""
    if not rows:
        return f"{title}\n(no rows)\n" if title else "(no rows)\n"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    out = [line(columns), sep, *(line(r) for r in cells)]
    if title:
        out = [title, "", *out]
    return "\n".join(out) + "\n"


def write_results(directory: str | Path, name: str, rows: Sequence[dict[str, Any]], *,
                  columns: Sequence[str] | None = None, title: str | None = None,
                  meta: dict[str, Any] | None = None) -> str:
    """Write `<name>.json` (rows + meta) and `<name>.md` (the table) under `directory`; return the table."""
    directory = Path(directory)
    table = format_table(rows, columns, title)
    atomic_write_text(directory / f"{name}.json", json.dumps({"rows": list(rows), "meta": meta or {}}, indent=2) + "\n")
    atomic_write_text(directory / f"{name}.md", table)
    return table
