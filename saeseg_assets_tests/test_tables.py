"""The one markdown-table renderer of the metadata: number formats, gaps, escaping, frames, the row limit."""

from __future__ import annotations

import numpy as np
import pandas as pd

from saeseg_assets.core.report.results import Setting, SweepRow
from saeseg_assets.core.report.tables import markdown_table
from saeseg_assets.core.report.text import dose_markdown


def test_numbers_flags_and_gaps_have_one_format():
    rows = [{"name": "wall", "iou": 0.123456, "n": 7, "specific": True, "scale": -2.0},
            {"name": "a|b", "iou": float("nan"), "n": None, "specific": np.bool_(False), "scale": np.float32(1e-5)}]
    assert markdown_table(rows) == "\n".join([
        "| name | iou | n | specific | scale |",
        "|---|---|---|---|---|",
        "| wall | 0.1235 | 7 | yes | -2 |",
        "| a\\|b | - | - | no | 1e-05 |",
    ])


def test_a_frame_with_chosen_columns_headers_and_a_row_limit():
    frame = pd.DataFrame({"a": [1, 2, 3], "b": [0.5, 0.25, 2 / 3], "c": ["x", "y", "z"]})
    assert markdown_table(frame, ["c", "b"], headers=["class", "share"], max_rows=2) == "\n".join([
        "| class | share |", "|---|---|", "| x | 0.5 |", "| y | 0.25 |", "", "(1 more row not shown)"])
    assert markdown_table(frame).splitlines()[4] == "| 3 | 0.6667 | z |"
    assert markdown_table([]) == markdown_table(frame.iloc[:0]) == "(no rows)"


def test_the_dose_response_table_uses_it_with_short_headers():
    row = SweepRow(Setting("f1", 3, "every_token", -2.0), 7, 0.98765, 0.0, float("nan"), specific=True)
    header, _, line = dose_markdown((row,)).splitlines()
    assert header == ("| N | mode | scale | target change | other change | target patch acc. | rand. latents max | "
                      "rand. dir. max | specific |")
    assert line == "| 3 | every_token | -2 | 0.9877 | 0 | - | - | - | yes |"
