"""Per-class suppression reports as JSON files (`suppression/<class_key>.json`) and the summary over all classes:
file naming, the metadata values, markdown tables, and the pooled tables and counts of the summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .ade20k import class_by_key
from .tables import markdown_table

REPORT_VERSION = 1
# The metadata of the configured setting, by the names the issue fixes.
METRIC_NAMES = ("target_iou_before", "target_iou_after", "target_accuracy_before", "target_accuracy_after",
                "other_miou_before", "other_miou_after", "target_change_rate", "other_change_rate",
                "random_latents_target_change_rate", "random_latents_other_change_rate",
                "random_direction_target_change_rate", "random_direction_other_change_rate")
DOSE_COLUMNS = ("mode", "scale", "target_change_rate", "other_change_rate", "target_patch_accuracy",
                "random_latents_target_change_rate", "random_latents_other_change_rate",
                "random_direction_target_change_rate", "random_direction_other_change_rate", "specific")


def report_path(folder: Path, class_key: str) -> Path:
    return Path(folder) / f"{class_key}.json"


def key_from_path(path: Path) -> str:
    """The class key a report file is named after; raises KeyError for a file that is no class's report."""
    return class_by_key(Path(path).stem).key


def json_safe(value):
    """NaN and infinities become null: the files stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def read_reports(folder: Path) -> list[dict]:
    """Every class report in `folder`, in class order (files not named after a class are skipped)."""
    reports = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            key_from_path(path)
        except KeyError:
            continue
        reports.append(json.loads(path.read_text()))
    return sorted(reports, key=lambda r: r["class_index"])


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def metric_values(report: dict) -> dict[str, float]:
    """The configured setting's numbers under METRIC_NAMES (NaN where undefined)."""
    metrics = report.get("metrics", {})
    return {name: _number(metrics.get(name)) for name in METRIC_NAMES}


def dose_markdown(report: dict) -> str:
    rows = report.get("dose_response") or []
    if not rows:
        return "(no dose-response: " + (report.get("reason") or "not evaluated") + ")"
    short = {"random_latents": "rand. latents", "random_direction": "rand. dir.", "target": "target",
             "other": "other", "change_rate": "change", "patch_accuracy": "patch acc."}
    headers = []
    for column in DOSE_COLUMNS:
        label = column
        for long, brief in short.items():
            label = label.replace(long, brief)
        headers.append(label.replace("_", " "))
    return markdown_table(rows, DOSE_COLUMNS, headers)


def report_markdown(report: dict, class_name: str) -> str:
    """A short account of one class: what was done, the configured setting's numbers, and the sweep."""
    if report["status"] != "evaluated":
        return f"**{class_name}**: {report['reason']}."
    m = metric_values(report)
    verdict = "class-specific" if report["specific"] else "not class-specific"
    lines = [
        f"**{class_name}**: latents {report['latents']} set to {report['scale']:g} x their max activation, "
        f"mode `{report['mode']}`: **{verdict}**.",
        "",
        f"- target change rate {m['target_change_rate']:.3f} vs other {m['other_change_rate']:.3f}; controls: "
        f"random latents {m['random_latents_target_change_rate']:.3f} / {m['random_latents_other_change_rate']:.3f}, "
        f"random direction {m['random_direction_target_change_rate']:.3f} / "
        f"{m['random_direction_other_change_rate']:.3f} (target / other)",
        f"- target IoU {m['target_iou_before']:.3f} -> {m['target_iou_after']:.3f}, accuracy "
        f"{m['target_accuracy_before']:.3f} -> {m['target_accuracy_after']:.3f}; other mIoU "
        f"{m['other_miou_before']:.3f} -> {m['other_miou_after']:.3f}",
        f"- edited tokens where a chosen latent fires: {report['metrics'].get('active_tokens', 0)} of the validation "
        "tokens; in `every_token` mode all other tokens get the constant shift sum_i v_i W_dec[i]",
        "",
        "Dose-response (patch level; controls averaged over seeds):",
        "",
        dose_markdown(report),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Summary


def summary_table(reports: list[dict]) -> pd.DataFrame:
    """One row per evaluated class: configured-setting numbers, controls, verdict."""
    rows = []
    for r in reports:
        if r.get("status") != "evaluated":
            continue
        rows.append({"class_index": r["class_index"], "class_key": r["class_key"], "class_name": r["class_name"],
                     "latents": " ".join(str(i) for i in r["latents"]), "target_patches": r["target_patches"],
                     "target_pixels": r["target_pixels"], **metric_values(r), "specific": bool(r["specific"])})
    return pd.DataFrame(rows, columns=["class_index", "class_key", "class_name", "latents", "target_patches",
                                       "target_pixels", *METRIC_NAMES, "specific"])


def dose_table(reports: list[dict]) -> pd.DataFrame:
    """The dose-response rows of every evaluated class, with its key."""
    rows = [{"class_key": r["class_key"], **{c: row.get(c) for c in DOSE_COLUMNS}}
            for r in reports if r.get("status") == "evaluated" for row in r["dose_response"]]
    table = pd.DataFrame(rows, columns=["class_key", *DOSE_COLUMNS])
    for column in DOSE_COLUMNS[2:-1]:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def specific_counts(dose: pd.DataFrame) -> pd.DataFrame:
    """Per (mode, scale): classes evaluated, class-specific ones, and mean change rates (pooled over classes)."""
    if dose.empty:
        return pd.DataFrame(columns=["mode", "scale", "n_classes", "n_specific", "mean_target_change_rate",
                                     "mean_other_change_rate", "mean_random_latents_target_change_rate",
                                     "mean_random_direction_target_change_rate"])
    grouped = dose.assign(specific=dose["specific"].astype(bool)).groupby(["mode", "scale"], sort=False)
    return grouped.agg(n_classes=("class_key", "size"), n_specific=("specific", "sum"),
                       mean_target_change_rate=("target_change_rate", "mean"),
                       mean_other_change_rate=("other_change_rate", "mean"),
                       mean_random_latents_target_change_rate=("random_latents_target_change_rate", "mean"),
                       mean_random_direction_target_change_rate=("random_direction_target_change_rate", "mean"),
                       ).reset_index()


def best_setting(counts: pd.DataFrame) -> tuple[str, float, int]:
    """The (mode, scale) with the most class-specific classes; ties: the larger mean target - other change rate,
    then the sweep order."""
    if counts.empty:
        return "", float("nan"), 0
    gap = (counts["mean_target_change_rate"] - counts["mean_other_change_rate"]).fillna(-np.inf)
    ranked = counts.assign(gap=gap, order=range(len(counts))).sort_values(
        ["n_specific", "gap", "order"], ascending=[False, False, True])
    best = ranked.iloc[0]
    return str(best["mode"]), float(best["scale"]), int(best["n_specific"])


def table_markdown(table: pd.DataFrame, columns: list[str], max_rows: int = 160) -> str:
    """A summary table as markdown: `markdown_table`, at most one row per class by default."""
    return markdown_table(table, columns, max_rows=max_rows)
