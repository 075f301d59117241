"""The typed results and their one format: a class report, the summary and the classes table written as strict JSON
(NaN as null) and read back into the same records; refused when of another format; flattened into table columns."""

from __future__ import annotations

import json
import math

import pytest

from saeseg_assets.core.report.records import columns, flat, json_safe
from saeseg_assets.core.report.results import (
    FORMAT_VERSION,
    ClassReport,
    ClassRow,
    ClassTable,
    DoseRow,
    Interval,
    Selection,
    Setting,
    SettingCount,
    StudySummary,
    SummaryFigures,
    SummaryRow,
    SweepRow,
    read_result,
    write_result,
)
from saeseg_assets.core.report.summary import class_rows, setting_counts, study_summary, summary_rows
from saeseg_assets.core.report.tables import record_csv
from saeseg_assets.core.settings import SuppressionSettings
from saeseg_assets.core.study.class_study import study_class
from saeseg_assets_tests.test_suppression import tiny_world


def strict(text: str):
    """JSON as a strict reader takes it: NaN or Infinity in the file fail."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))


def same(a, b) -> bool:
    """Records equal field by field, NaN equal to NaN."""
    return json_safe(a) == json_safe(b)


def test_a_studied_report_reads_back_into_the_same_records(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    _, _, _, tuning = tiny_world(tmp_path / "tuning")
    config = SuppressionSettings(control_seeds=2, n_latents=(1, 2), tuning_candidates=2)
    rankings = {"f1": (0, 4), "activation_sum": (4,), "probe_aware": (0,)}
    report = study_class(model, tuning, 10, Selection("f1", (0,), (0.5,)), rankings, config)
    assert report.evaluated and report.tuned is not None and report.dose_response
    path = tmp_path / "report.json"
    write_result(path, report)
    data = strict(path.read_text())
    assert data["format_version"] == FORMAT_VERSION and data["status"] == "evaluated"
    back = read_result(path, ClassReport)
    assert same(back, report) and isinstance(back, ClassReport) and back.config == config
    assert back.configured.patch.random_latents.target_change_rate_ci == report.configured.patch.random_latents \
        .target_change_rate_ci
    assert back.tuning.per_rule.keys() == report.tuning.per_rule.keys() and back.setting == report.setting
    absent = study_class(model, None, 150, Selection("f1", (0,)), {"f1": (0,)}, config)
    write_result(path, absent)
    assert same(read_result(path, ClassReport), absent) and read_result(path, ClassReport).configured is None


def test_nan_is_null_in_the_file_and_nan_again_in_the_record(tmp_path):
    row = SweepRow(Setting("f1", 3, "every_token", -2.0), 0, math.nan, 0.25, math.inf,
                   target_change_rate_ci=Interval(math.nan, 0.5))
    nan = Interval(math.nan, math.nan)
    figures = SummaryFigures(0, 0, nan, 0, nan, 0, None, 0, 150, 0, *([math.nan] * 10), 0, nan, *([math.nan] * 8), 0,
                             "none", "none", 0)
    summary = StudySummary("No class was evaluated.", figures, (),
                           tuple(setting_counts([DoseRow("010_grass", row)])))
    write_result(tmp_path / "summary.json", summary)
    data = strict((tmp_path / "summary.json").read_text())
    assert data["figures"]["mean_tpp_score"] is None and data["figures"]["tuned"] is None
    assert data["figures"]["n_specific_ci"] == {"low": None, "high": None}
    back = read_result(tmp_path / "summary.json", StudySummary)
    assert math.isnan(back.figures.mean_tpp_score) and back.figures.tuned is None and same(back, summary)
    assert back.per_setting == () and isinstance(back.figures, SummaryFigures)  # no row with controls: no count
    ci, none = Interval(0.9, 1.0), Interval(math.nan, math.nan)
    rows = [ClassRow("010_grass", "grass", 5, 1.0, ci, 0.0, ci, 0.1, ci, 0.2, ci, 0.5, math.nan, 0.3, True,
                     "not tuned", math.nan, none, math.nan, none, None)]
    write_result(tmp_path / "classes.json", ClassTable(tuple(rows)))
    assert strict((tmp_path / "classes.json").read_text())["rows"][0]["target_iou_after"] is None
    assert same(read_result(tmp_path / "classes.json", ClassTable).rows, rows)


def test_a_file_of_another_format_is_refused_naming_it(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"report_version": 2, "class_key": "010_grass"}))
    with pytest.raises(ValueError, match=f"{path}: not a ClassReport of format version {FORMAT_VERSION}"):
        read_result(path, ClassReport)
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, "rows": [{"class_key": "010_grass", "iou": 1}]}))
    with pytest.raises(ValueError, match="ClassRow: unknown field"):
        read_result(path, ClassTable).rows


def test_table_columns_come_from_the_fields():
    """Nested records stand under `<field>_<name>`, INLINE ones under their own names; lists of records and the
    settings are not cells."""
    names = list(columns(SummaryRow))
    assert names[:9] == ["class_index", "class_key", "class_name", "target_patches", "target_pixels", "rule",
                         "n_latents", "mode", "scale"]
    for name in ("target_change_rate_ci_low", "random_latents_target_change_max",
                 "random_direction_other_change_rate_ci_high", "target_iou_change_ci_low", "latents", "values",
                 "tuned_rule", "tuned_tpp_score", "tuned_random_latents_target_change_rate_ci_low"):
        assert name in names, name
    assert not [n for n in names if "most_moved" in n or "per_seed" in n]
    assert columns(SettingCount)["n_latents"] == "N"
    row = flat(SweepRow(Setting("f1", 3, "every_token", -2.0), 7, 0.5, 0.1, 0.0))
    assert row["scale"] == -2.0 and row["random_latents_target_change_rate"] is None and row["specific"] is None


def test_summary_rows_as_csv_keep_full_precision_and_join_latents(tmp_path):
    _, _, _, model = tiny_world(tmp_path)
    report = study_class(model, None, 10, Selection("f1", (0, 1)), {"f1": (0, 1)}, SuppressionSettings(control_seeds=2))
    rows = summary_rows([report])
    header, line = record_csv(rows, SummaryRow).decode().splitlines()
    cells = dict(zip(header.split(","), line.split(",")))
    assert cells["latents"] == "0 1" and cells["class_key"] == "010_grass" and cells["tuned_rule"] == ""
    assert float(cells["target_change_rate"]) == report.configured.patch.target_change_rate
    assert class_rows([report])[0].tuned_setting == "not tuned"
    summary = study_summary([report], rows, [], ("f1",), n_stale=0)
    assert summary.figures.n_tuned == 0 and "no class could be tuned" in summary.result
