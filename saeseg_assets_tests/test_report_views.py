"""What a reader sees of the suppression study: rounded numbers, the classes table, the heatmap's grid, pictures with
a legend, and the self-contained HTML page; on hand-made reports whose numbers can be checked by eye."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import dagster as dg
import numpy as np
from PIL import Image
from pytest import approx

from saeseg_assets.core.report.html import markdown_html
from saeseg_assets.core.report.records import columns
from saeseg_assets.core.report.results import (
    ClassReport,
    RuleRow,
    ClassRow,
    Control,
    Interval,
    Measured,
    PixelFigures,
    Selection,
    Setting,
    SweepRow,
    Tuning,
)
from saeseg_assets.core.report.study_pictures import (
    example_rows,
    examples_png,
    label_panels_png,
    legend_classes,
    specificity_heatmap_png,
)
from saeseg_assets.core.report.summary import (
    class_rows,
    dose_rows,
    setting_counts,
    specificity_grid,
    study_summary,
    summary_rows,
)
from saeseg_assets.core.report.summary_page import summary_html
from saeseg_assets.core.report.tables import record_markdown, significant
from saeseg_assets.core.report.text import criteria_words
from saeseg_assets.core.settings import SuppressionSettings
from saeseg_assets.recipe import readable

RULE = "class-specific: at least 50% of the class's patches change prediction, ..."
CONFIGURED = Setting("f1", 3, "every_token", -2.0)
TUNED = Setting("f1", 5, "where_active", -4.0)
BEST = Setting("f1", 10, "every_token", -4.0)  # the best on the tuning images, before the one-SE rule


CONTROL = Control(0.1, 0.01, 0.2)  # both controls change 0.1 of the target patches, at most 0.2 in one draw


def measured(setting: Setting, target: float, specific: bool, iou_after: float = 0.25,
             resamples: str | None = None) -> Measured:
    """A setting measured on validation, with the controls of CONTROL and intervals; `resamples`: the verdict on
    each of 40 shared resamples (default: the verdict on all of them)."""
    control = replace(CONTROL, target_change_rate_ci=Interval(0.05, 0.15), other_change_rate_ci=Interval(0.0, 0.02))
    patch = SweepRow(setting, 12, target, 0.01, 0.1, control, control, specific, Interval(target - 0.1, target),
                     Interval(0.0, 0.02), "01"[specific] * 40 if resamples is None else resamples)
    pixels = PixelFigures(0.5, iou_after, iou_after - 0.5, Interval(-0.4, -0.2), 0.6, 0.3, 0.4, 0.4)
    return Measured(patch, tuple(range(1, setting.n_latents + 1)), (-1.0,) * setting.n_latents, 0.3, pixels, (), ())


def report(key: str, index: int, target: float, specific: bool, tuned_specific: bool | None) -> ClassReport:
    """An evaluated class: the configured setting (3 latents, -2 x max, every token), the sweep rows at N = 3 for two
    scales, and (unless `tuned_specific` is None) a tuned setting with one rule measured on validation, and the best
    on the tuning images (0.95 of the target patches changed there, 0.6 on validation, specific on 10 of 40
    resamples)."""
    sweep = tuple(SweepRow(Setting("f1", 3, "every_token", s), 12, target * abs(s) / 2, 0.01, 0.1, CONTROL, CONTROL,
                           specific=specific and s == -2.0, specific_resamples="01"[specific and s == -2.0] * 40)
                  for s in (-2.0, -1.0))
    sweep += (SweepRow(Setting("f1", 1, "every_token", -2.0), 4, 0.1, 0.0, 0.5),)  # other N: no controls
    tuning, tuned, per_rule, best = Tuning("no_tuning_images", "no held-out images"), None, {}, None
    if tuned_specific is not None:
        tuned = measured(TUNED, 0.9, tuned_specific)
        # On the tuning images the sweep's -2 x max at N = 3 changes 0.1 more of the target patches than on validation.
        on_tuning = SweepRow(CONFIGURED, 12, target + 0.1, 0.01, 0.1)
        tuning = Tuning("tuned", "", 10, 40, tuned.patch, {"f1": tuned.patch}, (tuned.patch, on_tuning),
                        best=SweepRow(BEST, 12, 0.95, 0.01, 0.05, CONTROL, CONTROL, specific=True),
                        best_margin_se=0.06)
        best = SweepRow(BEST, 12, 0.6, 0.03, 0.2, CONTROL, CONTROL, specific=False,
                        specific_resamples="0" * 30 + "1" * 10)
        per_rule = {"f1": SweepRow(TUNED, 12, 0.9, 0.02, 0.1, CONTROL, CONTROL, specific=tuned_specific,
                                   specific_resamples="01"[tuned_specific] * 40)}
    # grass, the one specific class: specific on 30 of the 40 shared resamples.
    configured = measured(CONFIGURED, target, specific, iou_after=math.nan,
                          resamples="1" * 30 + "0" * 10 if specific else None)
    return ClassReport(key, key[4:], index, "evaluated", "", Selection("f1", (1, 2, 3)), CONFIGURED, 4000, 40, RULE,
                       SuppressionSettings(), configured, tuning, tuned, per_rule, sweep, tuned_best=best)


REPORTS = [report("010_grass", 10, 0.8, True, True), report("003_sky", 3, 0.2, False, None),
           ClassReport("150_flag", "flag", 150, "absent_from_validation",
                       "no validation pixel carries this class: nothing to measure", Selection("f1", ()), CONFIGURED,
                       0, 0, RULE, SuppressionSettings())]


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
    assert [r.class_key for r in rows] == ["010_grass", "003_sky"]  # evaluated classes only
    assert rows[0].tuned_setting == "-4 x max on the tokens where they fire, 5 latents by f1"
    assert math.isnan(rows[0].target_iou_after) and rows[0].tuned_specific is True
    assert rows[1].tuned_setting == "not tuned" and rows[1].tuned_specific is None
    # The narrow view of the tuned settings, under the headings its fields give.
    assert columns(ClassRow, "classes_tuned") == {"class_key": "class", "tuned_setting": "tuned setting",
                                                  "tuned_target_change_rate": "tuned target",
                                                  "tuned_other_change_rate": "tuned other",
                                                  "tuned_specific": "tuned specific"}
    assert record_markdown(rows, ClassRow, "classes_tuned").splitlines()[3] == "| 003_sky | not tuned | - | - | - |"


def test_the_heatmap_grid_is_classes_by_sweep_settings_then_tuned_rules():
    grid = specificity_grid(REPORTS, ("f1", "activation_sum"))
    assert grid.rows == ("010_grass", "003_sky")
    assert grid.columns == ("-2", "-1", "f1", "activation_sum")
    assert grid.groups == (("every token, scale x max", 0, 2), ("tuned, per rule", 2, 4))
    assert grid.specific == ((True, False, True, None), (False, False, None, None))
    assert grid.target[0][:3] == (0.8, 0.4, 0.9) and grid.target[1][2] is None
    assert grid.other[0][:3] == (0.01, 0.01, 0.02)
    # grass at -1: target 0.4 < 0.5; sky's target 0.2 and 0.1 likewise; the specific cells fail nothing.
    assert grid.unmet == (("", "target", "", None), ("target", "target", None, None))
    assert grid.configured == 0  # -2 x max on every token: the first sweep column
    png = specificity_heatmap_png(grid, criteria_words(SuppressionSettings()))
    assert criteria_words(SuppressionSettings()) == ("T target < 0.5, O target < 3 x other, "
                                                     "C target < 2 x a control draw")
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


def test_the_summary_counts_the_configured_and_tuned_verdicts():
    rows = summary_rows(REPORTS)
    summary = study_summary(REPORTS, rows, setting_counts(dose_rows(REPORTS)), ("f1", "activation_sum"), n_stale=0)
    f = summary.figures
    assert (f.n_classes_evaluated, f.n_specific, f.n_tuned, f.n_specific_tuned, f.n_absent_from_validation) == (
        2, 1, 1, 1, 1)
    assert f.tuned == TUNED and f.mean_target_change_rate == 0.5 and math.isnan(f.mean_target_iou_after)
    assert (f.n_specific_oracle, f.oracle_setting) == (1, "-2 x max, every_token, 3 latents")
    assert [(r.rule, r.counts.n_classes, r.counts.n_specific) for r in summary.per_rule] == [
        ("f1", 1, 1), ("activation_sum", 0, 0)]
    # Per rule and per setting, the counts' intervals: grass tuned by f1 specific on every resample; no class for
    # activation_sum; at -2 x max grass is specific on all 40 of its sweep row's resamples.
    assert [r.counts.n_specific_ci for r in summary.per_rule][0] == Interval(1.0, 1.0)
    assert math.isnan(summary.per_rule[1].counts.n_specific_ci.low)
    assert [(c.scale, c.counts.n_specific, c.counts.n_specific_ci) for c in summary.per_setting] == [
        (-2.0, 1, Interval(1.0, 1.0)), (-1.0, 0, Interval(0.0, 0.0))]
    assert "| f1 | 14 |" not in record_markdown(summary.per_rule, RuleRow)
    assert "| f1 | 1 | 1 [1, 1] | 0.90 | 0.020 |" in record_markdown(summary.per_rule, RuleRow)
    # grass: specific on 30 of 40 resamples, sky on none: 10 resamples count 0, 30 count 1. Tuned: grass on all 40.
    assert (f.n_specific_ci, f.n_specific_tuned_ci) == (Interval(0.0, 1.0), Interval(1.0, 1.0))
    assert summary.result.startswith("At the original setting (-2 x max on every token, 3 latents by f1) 1 [0, 1] of "
                                     "2 present classes are class-specific (95% intervals over resampled validation "
                                     "images in brackets); at settings tuned per class")
    assert "5 latents by f1) 1 [1, 1] of 2." in summary.result
    # The tuning's overfit: the tuned setting changes 0.9 of grass's patches on validation as on the tuning images;
    # the best before the one-SE rule 0.95 there and 0.6 on validation, specific on 10 of the 40 resamples.
    assert (f.mean_tuned_target_gap, f.mean_tuned_other_gap) == (0.0, 0.0)
    assert (f.n_specific_best, f.n_specific_best_ci, f.mean_best_target_change_rate) == (0, Interval(0.0, 1.0), 0.6)
    assert (f.mean_best_target_gap, f.mean_best_other_gap) == (approx(0.35), approx(-0.02))
    assert ("before the one-standard-error rule: 0 [0, 1] class-specific, target 0.60, other 0.03 (against 0.95 and "
            "0.01 on the tuning images)") in summary.result
    # Unchosen: grass's one sweep setting measured on both, -2 x max at N = 3: 0.9 on the tuning images, 0.8 on
    # validation.
    assert (f.mean_unchosen_target_gap, f.mean_unchosen_other_gap) == (approx(0.1), 0.0)
    assert "none of them chosen: target 0.10, other 0.00. Mean TPP" in summary.result


def test_the_summary_page_is_self_contained():
    png = label_panels_png([], [("rgb", "image")], "none")
    summary = study_summary(REPORTS, summary_rows(REPORTS), setting_counts(dose_rows(REPORTS)), ("f1",), n_stale=0)
    page = summary_html(summary, class_rows(REPORTS), {"specificity": png}, REPORTS,
                        {"010_grass": {"examples": png}}, {"dataset": "the embedded default, NOT ADE20K"})
    assert summary.result in page and "1 [0, 1] of 2 present classes are class-specific" in page
    # What it is made from comes right after the headline; a class's table of both settings before its pictures.
    assert page.index(summary.result) < page.index("NOT ADE20K") < page.index("Evaluated classes")
    grass = page[page.index('id="010_grass"'):]
    assert grass.index("rand. lat. target") < grass.index("data:image") < grass.index("Validation sweep of the f1")
    assert page.count("data:image/png;base64") == 1 and page.count("data:image/jpeg;base64") == 1
    assert "Classes not evaluated (1)" in page and "150_flag" in page
    for remote in ("http:", "https:", "<link", "src=\"/", "@import", "url("):
        assert remote not in page, remote
    assert '<script src' not in page and 'id="010_grass"' in page


def test_small_rates_keep_two_significant_digits_and_zeros_read_zero():
    from saeseg_assets.core.report.tables import rate_text

    assert rate_text(0.0027, Interval(0.0016, 0.0041)) == "0.0027 [0.0016, 0.0041]"
    assert rate_text(0.97, Interval(0.93, 0.99)) == "0.97 [0.93, 0.99]"
    assert rate_text(0.056, Interval(0.04, 0.07)) == "0.056 [0.040, 0.070]"
    assert rate_text(0.0, Interval(0.0, 0.0)) == "0 [0, 0]"
    assert rate_text(0.3, Interval(math.nan, math.nan)) == "0.30"


def test_the_class_sentence_names_the_criterion_that_failed():
    from saeseg_assets.core.report.text import class_sentence

    # 003_sky: target 0.2 < 0.5. 010_grass: specific, nothing to name.
    sky, grass = class_sentence(REPORTS[1]), class_sentence(REPORTS[0])
    assert "not class-specific (target 0.20 < 0.5)" in sky
    assert "at the original setting (-2 x max on every token, 3 latents by f1) class-specific:" in grass
    # Target 0.6 against other 0.25: 0.6 < 3 x 0.25. Then other 0.01 but a control draw at 0.4: 0.6 < 2 x 0.4.
    base = measured(CONFIGURED, 0.6, False)
    over_other = replace(REPORTS[1], configured=replace(base, patch=replace(base.patch, other_change_rate=0.25)))
    assert "not class-specific (target 0.60 < 3 x other 0.25)" in class_sentence(over_other)
    loud = replace(base.patch.random_direction, target_change_max=0.4)
    control = replace(REPORTS[1], configured=replace(base, patch=replace(base.patch, random_direction=loud)))
    assert "not class-specific (target 0.60 < 2 x the largest random direction draw 0.40)" in class_sentence(control)


def test_the_classes_table_shows_each_rate_with_its_interval_in_one_cell():
    from saeseg_assets.core.report.results import CLASSES, CLASSES_TUNED

    narrow = record_markdown(class_rows(REPORTS), ClassRow, CLASSES)
    # grass: target 0.8 [0.7, 0.8], other 0.01 [0, 0.02], controls 0.1 [0.05, 0.15].
    assert "| 010_grass | 40 | 0.80 [0.70, 0.80] | 0.010 [0, 0.020] | 0.10 [0.05, 0.15] |" in narrow
    tuned = record_markdown(class_rows(REPORTS), ClassRow, CLASSES_TUNED)
    assert "0.90 [0.80, 0.90]" in tuned and "| 003_sky | not tuned | - | - | - |" in tuned
    whole = record_markdown(class_rows(REPORTS), ClassRow)
    assert "_ci_" not in whole and "0.80 [0.70, 0.80]" in whole


def test_the_upper_bound_counts_a_class_specific_at_any_measured_setting():
    from saeseg_assets.core.report.summary import upper_bound

    # sky is specific only at its tuned setting: no single sweep setting shows it, the upper bound does.
    sky = replace(report("003_sky", 3, 0.2, False, True), tuned_per_rule={})
    reports = [REPORTS[0], sky]
    summary = study_summary(reports, summary_rows(reports), setting_counts(dose_rows(reports)), ("f1",), n_stale=0)
    f = summary.figures
    assert upper_bound(reports) == f.n_specific_oracle == 2
    counts = [f.n_specific, f.n_specific_tuned, *(r.counts.n_specific for r in summary.per_rule),
              *(c.counts.n_specific for c in summary.per_setting)]
    assert f.n_specific_oracle >= max(counts)
    assert max(c.counts.n_specific for c in summary.per_setting) == 1


def test_count_intervals_refuse_reports_made_on_other_resamples():
    import pytest

    from saeseg_assets.core.report.summary import count_interval

    short = replace(REPORTS[1], configured=measured(CONFIGURED, 0.2, False, resamples="0" * 20))
    with pytest.raises(ValueError, match=r"hold verdicts on \[20, 40\] resamples"):
        count_interval([REPORTS[0].configured.patch, short.configured.patch])
