"""Numbers and tables for metadata and files: one rounding (4 significant digits), one markdown renderer, so that every
number shows the same way, and typed rows as markdown or CSV. Torch-free and Dagster-free."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from types import SimpleNamespace

import numpy as np

DIGITS = 4  # significant digits of every number shown in metadata; the files keep full precision


def significant(value, digits: int = DIGITS):
    """`value` with its floats rounded to `digits` significant digits, inside lists, tuples and dicts too; numpy
    scalars become Python numbers, NaN and infinities stay, everything else is returned as it is."""
    if isinstance(value, (bool, np.bool_)):  # before numbers: bool is an int
        return bool(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if not math.isfinite(value) or value == 0 else float(f"{value:.{digits}g}")
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: significant(v, digits) for k, v in value.items()}
    if type(value) in (list, tuple):  # exactly: named tuples and records are left as they are
        rounded = [significant(v, digits) for v in value]
        return rounded if isinstance(value, list) else tuple(rounded)
    return value


def decimals_for(*values: float) -> int:
    """Decimals that show the largest of `values` with at least 2 significant digits (2 at most down to 0.1, at
    most 6): 0.97 -> 2, 0.056 -> 3, 0.0027 -> 4."""
    largest = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    if largest >= 0.1 or largest == 0:
        return 2
    return min(6, 1 - math.floor(math.log10(largest)))


def rate_text(value: float, ci=None) -> str:
    """A rate with its interval where one is defined, all to the decimals its largest part needs: 0.97 [0.93, 0.99],
    0.0027 [0.0016, 0.0041]; exact zeros as 0."""
    defined = ci is not None and math.isfinite(ci.low) and math.isfinite(ci.high)
    n = decimals_for(value, *((ci.low, ci.high) if defined else ()))

    def number(x: float) -> str:
        return "0" if x == 0 else f"{x:.{n}f}"

    return number(value) + (f" [{number(ci.low)}, {number(ci.high)}]" if defined else "")


def count_text(count: int, ci=None) -> str:
    """A count of classes with its 95% interval over resampled images: "5 [3, 6]"."""
    if ci is None or not (math.isfinite(ci.low) and math.isfinite(ci.high)):
        return str(count)
    return f"{count} [{ci.low:.0f}, {ci.high:.0f}]"


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
        return "-" if np.isnan(value) else f"{value:.{DIGITS}g}"
    return str(value)


def _line(cells: Sequence[str]) -> str:
    # A "|" inside a cell would end it, a line break the row.
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def record_markdown(rows: Iterable, kind: type, view: str | None = None) -> str:
    """Typed rows as a markdown table: the columns of their type (of `view` only, if given) under their headings. A
    rate with an interval beside it (`<rate>_ci` in the record) shows as one cell, 0.97 [0.93, 0.99]; a change rate
    without one (`*change_rate`) as `rate_text` writes it, 0.042."""
    from .records import columns, flat

    names = columns(kind, view)
    flats = [flat(row, kind) for row in rows]
    with_ci = [n for n in names if f"{n}_ci_low" in (flats[0] if flats else {})]
    rates = [n for n in names if n.endswith("change_rate") and n not in with_ci]
    for row in flats:
        for n in with_ci + rates:
            bounds = (SimpleNamespace(low=_number(row[f"{n}_ci_low"]), high=_number(row[f"{n}_ci_high"]))
                      if n in with_ci else None)
            if isinstance(row[n], float) and math.isfinite(row[n]):
                row[n] = rate_text(row[n], bounds)
            elif isinstance(row[n], int) and not isinstance(row[n], bool) and bounds is not None:
                row[n] = count_text(row[n], bounds)
    merged = {f"{n}_ci_{end}" for n in with_ci for end in ("low", "high")}
    shown = {n: h for n, h in names.items() if n not in merged}
    return markdown_table(flats, list(shown), list(shown.values()))



def _number(value) -> float:
    return math.nan if value is None else float(value)


def record_csv(rows: Iterable, kind: type) -> bytes:
    """Typed rows as CSV, one column per cell of their type (tuples of numbers space-separated), full precision."""
    import pandas as pd

    from .records import columns, flat

    def cell(value):
        return " ".join(str(v) for v in value) if isinstance(value, list) else value

    cells = [{name: cell(value) for name, value in flat(row, kind).items()} for row in rows]
    table = pd.DataFrame(cells, columns=list(columns(kind)))
    return table.to_csv(index=False).encode()
