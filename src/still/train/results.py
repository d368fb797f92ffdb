"""Results: a JSON file next to a human-readable Markdown table, both written atomically.

NaN and infinities are written as Python's `json` writes them (`NaN`, `Infinity`): Python reads
them back, but stricter JSON parsers (JavaScript's `JSON.parse`) refuse them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from still.errors import StillError
from still.train.io import atomic_write_text, printable


def _cell(value: Any) -> str:
    """Floats to 4 significant digits, whole from 1e4 to 1e15 (12346, not 1.235e+04), and in
    exponent form beyond (a diverged perplexity of 1e30 stays short); text on one line, its `|`
    escaped, so that it stays in its cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if 1e4 <= abs(value) < 1e15 else f"{value:.4g}"
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def _scalar(value: Any) -> Any:
    """A NumPy scalar (np.float32, np.int64, ...) or a one-element tensor as a Python number; anything
    else as it is."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    return value


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with NumPy scalars and one-element tensors as Python numbers."""
    return {k: _scalar(v) for k, v in row.items()}


def _numpy_scalar(value: Any) -> Any:
    """For `json.dumps`: a NumPy scalar or one-element tensor anywhere in the rows or the meta data as
    a Python number."""
    scalar = _scalar(value)
    if scalar is not value:
        return scalar
    if isinstance(value, (np.ndarray, torch.Tensor)):  # (a probe: a confusion matrix in the meta, a TypeError)
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """A Markdown table of `rows` (dicts) in `columns` order (default: keys of the first row), as text
    that prints (`printable`: a file name's undecodable bytes as `\\xNN`)."""
    title = printable(title) if title is not None else None
    if not rows:
        return f"{title}\n(no rows)\n" if title else "(no rows)\n"
    rows = [_plain(r) for r in rows]
    columns = list(columns or rows[0].keys())
    headers = [printable(c) for c in columns]
    cells = [[printable(_cell(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    out = [line(headers), sep, *(line(r) for r in cells)]
    if title:
        out = [title, "", *out]
    return "\n".join(out) + "\n"


def as_recorded(path: str | Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any],
                timings: Sequence[str]) -> dict[str, Any]:
    """`meta` with its `timings` (keys of what this command timed, which a finished run run again
    times anew) as the results file at `path` records them, where it holds these rows and the rest
    of this meta: `write_results` then writes the bytes there already, which are left as they are (a
    probe: a distillation run again rewrote results.json for its timings, and failed on read-only
    media). Otherwise (other results, or none readable there) `meta` as it is."""
    try:
        recorded = json.loads(Path(path).read_text(encoding="utf-8"))
        mine = json.loads(json.dumps({"rows": list(rows), "meta": meta}, default=_numpy_scalar))
        same = (isinstance(recorded, dict) and isinstance(recorded.get("meta"), dict)
                and recorded.get("rows") == mine["rows"]
                and {k: v for k, v in recorded["meta"].items() if k not in timings}
                == {k: v for k, v in mine["meta"].items() if k not in timings}
                and all(key in recorded["meta"] for key in timings if key in meta))
    except (OSError, TypeError, ValueError):
        return meta
    return {k: recorded["meta"][k] if k in timings else v for k, v in meta.items()} if same else meta


def write_results(directory: str | Path, name: str, rows: Sequence[dict[str, Any]], *,
                  columns: Sequence[str] | None = None, title: str | None = None,
                  meta: dict[str, Any] | None = None, note: str | None = None) -> str:
    """Write `<name>.json` (rows + meta) and `<name>.md` (the table, and `note` in a line under it)
    under `directory`; return the table."""
    directory = Path(directory)
    table = format_table(rows, columns, title)
    try:
        data = json.dumps({"rows": list(rows), "meta": meta or {}}, indent=2, default=_numpy_scalar)
    except (TypeError, ValueError) as e:
        raise StillError(f"the results for {directory / name}.json cannot be written as JSON: {e}") from None
    atomic_write_text(directory / f"{name}.json", data + "\n")
    atomic_write_text(directory / f"{name}.md", table + (f"\n{printable(note)}\n" if note else ""))
    return table
