"""What a reader sees of the suppression study: rounded numbers, the classes table, the heatmap's grid, pictures with
a legend, and the self-contained HTML page; on hand-made reports whose numbers can be checked by eye."""

from __future__ import annotations

import io
import math

import dagster as dg
import numpy as np
from PIL import Image

from saeseg_assets.core.report.html import markdown_html
from saeseg_assets.core.report.study_pictures import (
    example_rows,
    examples_png,
    label_panels_png,
    legend_classes,
    specificity_heatmap_png,
)
from saeseg_assets.core.report.study_report import (
    CLASS_COLUMNS,
    class_rows,
    specificity_grid,
)
from saeseg_assets.core.report.summary_page import summary_html
from saeseg_assets.core.report.tables import significant
from saeseg_assets.recipe import readable

RULE = "class-specific: at least 50% of the class's patches change prediction, ..."


def report(key: str, index: int, target: float, specific: bool, tuned_specific: bool | None) -> dict:
    """An evaluated class: the configured setting (3 latents, -2 x max, every token), the sweep rows at N = 3 for two
    scales, and (unless `tuned_specific` is None) a tuned setting with one rule measured on validation."""
    sweep = [{"n_latents": 3, "mode": "every_token", "scale": s, "target_change_rate": target * abs(s) / 2,
              "other_change_rate": 0.01, "specific": specific and s == -2.0} for s in (-2.0, -1.0)]
    sweep.append({"n_latents": 1, "mode": "every_token", "scale": -2.0, "target_change_rate": 0.1,
                  "other_change_rate": 0.0, "specific": None})  # other N: no controls, not in the grid
    part = {"status": "not_tuned", "reason": "no held-out images"}
    if tuned_specific is not None:
        setting = {"rule": "f1", "n_latents": 5, "mode": "where_active", "scale": -4.0}
        part = {"status": "tuned", "setting": setting, "latents": [1, 2, 3, 4, 5],
                "metrics": {"target_change_rate": 0.9, "other_change_rate": 0.02, "specific": tuned_specific},
                "per_rule_validation": {"f1": {**setting, "target_change_rate": 0.9, "specific": tuned_specific}}}
    return {"status": "evaluated", "class_key": key, "class_name": key[4:], "class_index": index,
            "latents": [1, 2, 3], "rule": "f1", "mode": "every_token", "scale": -2.0, "target_patches": 40,
            "target_pixels": 4000, "specific": specific, "specificity_rule": RULE, "reason": "",
            "metrics": {"target_change_rate": target, "other_change_rate": 0.01, "specific": specific,
                        "target_iou_before": 0.5, "target_iou_after": math.nan, "tpp_score": 0.3},
            "tuned": part, "dose_response": sweep}


REPORTS = [report("010_grass", 10, 0.8, True, True), report("003_sky", 3, 0.2, False, None),
           {"status": "absent_from_validation", "class_key": "150_flag", "class_name": "flag", "class_index": 150,
            "reason": "no validation pixel carries this class: nothing to measure"}]


def test_numbers_round_to_four_significant_digits_everywhere_in_metadata():
    assert significant({"a": [2 / 3, np.float32(1e-5) / 3], "n": np.int64(7), "t": (1234567.0, True)}) == {
        "a": [0.6667, 3.333e-06], "n": 7, "t": (1235000.0, True)}
    assert math.isnan(significant(math.nan)) and significant(0.0) == 0.0
    metadata = readable({"x": 1 / 3, "f": dg.MetadataValue.float(2 / 3), "j": dg.MetadataValue.json({"y": [1 / 7]}),
                         "p": dg.MetadataValue.path("/a/b"), "n": 3, "s": "text"})
    assert metadata["x"] == 0.3333 and metadata["f"].value == 0.6667 and metadata["j"].data == {"y": [0.1429]}
    assert metadata["p"].value == "/a/b" and metadata["n"] == 3 and metadata["s"] == "text"


def test_class_rows_hold_the_table_columns_and_the_tuned_setting_in_words():
    rows = class_rows(REPORTS)
    assert [r["class_key"] for r in rows] == ["010_grass", "003_sky"]  # evaluated classes only
    assert list(rows[0]) == list(CLASS_COLUMNS)
    assert rows[0]["tuned_setting"] == "-4 x max on the tokens where they fire, 5 latents by f1"
    assert rows[0]["target_iou_after"] is None and rows[0]["tuned_specific"] is True  # NaN -> None
    assert rows[1]["tuned_setting"] == "not tuned" and rows[1]["tuned_specific"] is None


def test_the_heatmap_grid_is_classes_by_sweep_settings_then_tuned_rules():
    grid = specificity_grid(REPORTS, ("f1", "activation_sum"))
    assert grid["rows"] == ["010_grass", "003_sky"]
    assert grid["columns"] == ["-2", "-1", "f1", "activation_sum"]
    assert grid["groups"] == [("every token, scale x max", 0, 2), ("tuned, per rule", 2, 4)]
    assert grid["specific"] == [[True, False, True, None], [False, False, None, None]]
    assert grid["target"][0][:3] == [0.8, 0.4, 0.9] and grid["target"][1][2] is None
    png = specificity_heatmap_png(grid["rows"], grid["columns"], grid["specific"], grid["target"], "t", grid["groups"])
    assert Image.open(io.BytesIO(png)).size[0] > 300


def examples(n: int = 2, size: int = 8) -> dict[str, np.ndarray]:
    """Class 10 in the left half of the ground truth; the baseline finds it, the suppression turns it into sky (3)."""
    truth = np.full((n, size, size), 5, np.uint8)
    truth[:, :, : size // 2] = 10
    after = truth.copy()
    after[after == 10] = 3
    return {"class_index": np.asarray(10), "image_ids": np.asarray([f"val_{i}" for i in range(n)]),
            "ground_truth": truth, "baseline": truth.copy(), "configured": after, "has_rgb": np.asarray([True, False]),
            "rgb": np.zeros((n, size, size, 3), np.uint8)}


def test_the_legend_names_the_target_first_then_classes_by_area():
    rows, columns = example_rows(examples(), {"configured": "-2 x max on every token, 3 latents by f1",
                                             "tuned": "absent from the arrays: no column"})
    assert [name for name, _ in columns] == ["rgb", "ground_truth", "baseline", "configured"]
    assert rows[1]["rgb"] is None  # an unreadable image leaves a blank panel
    # grass (target) 3 panels x half; tree (5) 3 x half; sky (3) only after: one panel's half.
    assert legend_classes(rows, columns) == [(10, "grass (target, outlined)"), (5, "tree"), (3, "sky")]


def test_example_pictures_are_pngs_with_or_without_rows():
    png = examples_png(examples(), "010_grass", {"configured": "-2 x max on every token, 3 latents by f1"})
    width, height = Image.open(io.BytesIO(png)).size
    assert width > 600 and height > 300
    assert Image.open(io.BytesIO(label_panels_png([], [("rgb", "image")], "none"))).size[0] > 0


def test_markdown_tables_and_images_become_html():
    page = markdown_html("A sentence.\n\n| a | b |\n|---|---|\n| x\\|y | 0.5 |\n\n![pic](data:image/png;base64,AAA)")
    assert "<p>A sentence.</p>" in page and "<th>a</th><th>b</th>" in page and "<td>x|y</td><td>0.5</td>" in page
    assert '<img alt="pic" src="data:image/png;base64,AAA">' in page


def test_the_summary_page_is_self_contained():
    png = label_panels_png([], [("rgb", "image")], "none")
    page = summary_html({"result": "At the original setting 1 of 2 present classes are class-specific.", "n": 2},
                        class_rows(REPORTS), {"Per rule": [{"rule": "f1", "n_specific": 1}]}, {"specificity": png},
                        REPORTS, {"010_grass": {"examples": png}})
    assert "At the original setting 1 of 2 present classes are class-specific." in page
    assert page.count("data:image/png;base64") == 1 and page.count("data:image/jpeg;base64") == 1
    assert "Classes not evaluated (1)" in page and "150_flag" in page
    for remote in ("http:", "https:", "<link", "src=\"/", "@import", "url("):
        assert remote not in page, remote
    assert '<script src' not in page and 'id="010_grass"' in page
