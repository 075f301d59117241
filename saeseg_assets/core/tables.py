"""Markdown tables for Dagster metadata: one renderer, so that every table shows its numbers the same way.

Torch-free and Dagster-free; it takes a list of row dicts or a pandas DataFrame.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def markdown_table(rows: Iterable[dict], columns: Sequence[str] | None = None, headers: Sequence[str] | None = None,
                   max_rows: int | None = None) -> str:
    """`rows` (dicts, or a DataFrame) as a markdown table of `columns` (default: all, in order) under `headers`
    (default: the column names). Floats show 4 significant digits, booleans yes/no, None and NaN "-"; rows beyond
    `max_rows` are left out and counted under the table."""
    if hasattr(rows, "to_dict"):  # a DataFrame, recognised without importing pandas
        columns = list(rows.columns) if columns is None else columns
        rows = rows.to_dict(orient="records")
    rows = list(rows)
    if not rows:
        return "(no rows)"
    columns = list(rows[0]) if columns is None else list(columns)
    headers = columns if headers is None else list(headers)
    if len(headers) != len(columns):
        raise ValueError(f"{len(headers)} headers for {len(columns)} columns")
    shown = rows if max_rows is None else rows[:max_rows]
    lines = [_line(headers), "|" + "---|" * len(columns)]
    lines += [_line([_cell(row.get(c)) for c in columns]) for row in shown]
    if len(shown) < len(rows):
        left_out = len(rows) - len(shown)
        lines += ["", f"({left_out} more row{'s' if left_out > 1 else ''} not shown)"]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):  # before numbers: bool is an int
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "-" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def _line(cells: Sequence[str]) -> str:
    # A "|" inside a cell would end it, a line break the row.
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
