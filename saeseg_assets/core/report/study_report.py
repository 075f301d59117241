"""What the suppression reports say: the metadata values of a class, its account in words and tables, and the
summary over all classes (tables, counts per setting and per rule, the headline sentence)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

from .tables import markdown_table

REPORT_VERSION = 2
# The configured setting's figures (validation), by the names the metadata uses.
METRIC_NAMES = ("target_iou_before", "target_iou_after", "target_accuracy_before", "target_accuracy_after",
                "other_miou_before", "other_miou_after", "target_change_rate", "other_change_rate",
                "random_latents_target_change_rate", "random_latents_other_change_rate",
                "random_direction_target_change_rate", "random_direction_other_change_rate", "tpp_score")
RATES = ("target_change_rate", "other_change_rate", "random_latents_target_change_rate",
         "random_latents_other_change_rate", "random_direction_target_change_rate",
         "random_direction_other_change_rate", "target_iou_change")
INTERVAL_NAMES = tuple(f"{r}_ci_{end}" for r in RATES for end in ("low", "high"))
TUNED_NAMES = ("target_change_rate", "other_change_rate", "tpp_score", "target_iou_before", "target_iou_after",
               "random_latents_target_change_rate", "random_direction_target_change_rate", *INTERVAL_NAMES)
DOSE_COLUMNS = ("n_latents", "mode", "scale", "target_change_rate", "other_change_rate", "target_patch_accuracy",
                "random_latents_target_change_max", "random_direction_target_change_max", "specific")


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


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def tuned(report: dict) -> dict | None:
    """The tuned setting's part of a report, if the class could be tuned."""
    part = report.get("tuned") or {}
    return part if part.get("status") == "tuned" else None


def metric_values(report: dict) -> dict:
    """The metadata of one evaluated class: the configured setting's figures with intervals, and the tuned
    setting's under `tuned_...` (NaN where undefined)."""
    metrics = report.get("metrics", {})
    values = {name: _number(metrics.get(name)) for name in (*METRIC_NAMES, *INTERVAL_NAMES)}
    part = tuned(report)
    if part is None:
        return values
    s = part["setting"]
    values.update({"tuned_rule": s["rule"], "tuned_n_latents": int(s["n_latents"]), "tuned_mode": s["mode"],
                   "tuned_scale": float(s["scale"]), "tuned_specific": bool(part["metrics"]["specific"])})
    values.update({f"tuned_{name}": _number(part["metrics"].get(name)) for name in TUNED_NAMES})
    return values


def _rate(metrics: dict, name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    value = _number(metrics.get(name))
    interval = f" [{_number(low):.2f}, {_number(high):.2f}]" if low is not None and high is not None else ""
    return f"{value:.2f}{interval}"


def describe_setting(setting: dict) -> str:
    where = "every token" if setting["mode"] == "every_token" else "the tokens where they fire"
    n = int(setting["n_latents"])
    return f"{float(setting['scale']):g} x max on {where}, {n} latent{'s' * (n != 1)} by {setting['rule']}"


def class_sentence(report: dict) -> str:
    """One line that says what happened to this class, at the configured and the tuned setting."""
    name = report["class_name"]
    if report["status"] != "evaluated":
        return f"{name}: {report['reason']}."
    m = report["metrics"]
    configured = {"rule": report.get("rule", "f1"), "n_latents": len(report["latents"]), "mode": report["mode"],
                  "scale": report["scale"]}
    verdict = "class-specific" if report["specific"] else "not class-specific"
    sentence = (f"{name}: at the original setting ({describe_setting(configured)}) {verdict}: "
                f"{_rate(m, 'target_change_rate')} of its patches changed prediction against "
                f"{_rate(m, 'other_change_rate')} of the others (random latents "
                f"{_rate(m, 'random_latents_target_change_rate')}, random direction "
                f"{_rate(m, 'random_direction_target_change_rate')})")
    part = tuned(report)
    if part is None:
        reason = (report.get("tuned") or {}).get("reason", "not tuned")
        return f"{sentence}; no tuned setting ({reason})."
    t = part["metrics"]
    verdict = "class-specific" if t["specific"] else "not class-specific"
    return (f"{sentence}; at the setting tuned on held-out training images ({describe_setting(part['setting'])}) "
            f"{verdict}: {_rate(t, 'target_change_rate')} against {_rate(t, 'other_change_rate')}.")


def dose_markdown(report: dict) -> str:
    rows = report.get("dose_response") or []
    if not rows:
        return "(no dose-response: " + (report.get("reason") or "not evaluated") + ")"
    headers = ["N", "mode", "scale", "target change", "other change", "target patch acc.", "rand. latents max",
               "rand. dir. max", "specific"]
    return markdown_table(rows, DOSE_COLUMNS, headers)


def report_markdown(report: dict) -> str:
    """One class's account: the sentence, the rule, both settings with intervals, and the validation sweep."""
    lines = [class_sentence(report)]
    if report["status"] != "evaluated":
        return lines[0]
    settings = [("configured", report["metrics"])]
    if (part := tuned(report)) is not None:
        settings.append((f"tuned: {describe_setting(part['setting'])}", part["metrics"]))
    rows = [{"setting": label, **{r: _rate(m, r) for r in RATES}, "TPP": m.get("tpp_score"),
             "specific": m.get("specific")} for label, m in settings]
    lines += ["", f"Rule: {report['specificity_rule']}. Change rates are over patches (95% bootstrap intervals over "
              "validation images); IoU at pixel level.", "",
              markdown_table(rows, ["setting", *RATES, "TPP", "specific"],
                             ["setting", "target", "other", "rand. lat. target", "rand. lat. other", "rand. dir. target",
                              "rand. dir. other", "IoU change", "TPP", "specific"]),
              "", f"Validation sweep of the {report.get('rule', 'f1')} ranking (patch level; controls and verdict at "
              f"N = {len(report['latents'])}):", "", dose_markdown(report)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Summary


def _evaluated(reports: list[dict]) -> list[dict]:
    return [r for r in reports if r.get("status") == "evaluated"]


def summary_table(reports: list[dict]) -> pd.DataFrame:
    """One row per evaluated class: configured and tuned figures, controls, verdicts."""
    rows = [{"class_index": r["class_index"], "class_key": r["class_key"], "class_name": r["class_name"],
             "latents": " ".join(str(i) for i in r["latents"]), "target_patches": r["target_patches"],
             "target_pixels": r["target_pixels"], **metric_values(r), "specific": bool(r["specific"])}
            for r in _evaluated(reports)]
    columns = ["class_index", "class_key", "class_name", "latents", "target_patches", "target_pixels",
               *METRIC_NAMES, *INTERVAL_NAMES, "specific", "tuned_rule", "tuned_n_latents", "tuned_mode",
               "tuned_scale", "tuned_specific", *(f"tuned_{n}" for n in TUNED_NAMES)]
    return pd.DataFrame(rows, columns=columns)


def dose_table(reports: list[dict]) -> pd.DataFrame:
    """The validation sweep rows of every evaluated class, with its key."""
    rows = [{"class_key": r["class_key"], **{c: row.get(c) for c in DOSE_COLUMNS}}
            for r in _evaluated(reports) for row in r["dose_response"]]
    table = pd.DataFrame(rows, columns=["class_key", *DOSE_COLUMNS])
    for column in DOSE_COLUMNS[3:-1]:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def specific_counts(dose: pd.DataFrame) -> pd.DataFrame:
    """Per validation setting with controls (N, mode, scale): classes, class-specific ones, mean change rates."""
    columns = ["n_latents", "mode", "scale", "n_classes", "n_specific", "mean_target_change_rate",
               "mean_other_change_rate"]
    checked = dose[dose["specific"].notna()] if not dose.empty else dose
    if checked.empty:
        return pd.DataFrame(columns=columns)
    grouped = checked.assign(specific=checked["specific"].astype(bool)).groupby(["n_latents", "mode", "scale"],
                                                                                sort=False)
    return grouped.agg(n_classes=("class_key", "size"), n_specific=("specific", "sum"),
                       mean_target_change_rate=("target_change_rate", "mean"),
                       mean_other_change_rate=("other_change_rate", "mean")).reset_index()[columns]


def oracle(counts: pd.DataFrame) -> dict:
    """The validation setting with the most class-specific classes: chosen on the very images it is counted on, so
    optimistic; a diagnostic, never a result."""
    if counts.empty:
        return {"n_specific_oracle": 0, "oracle_setting": "none"}
    gap = (counts["mean_target_change_rate"] - counts["mean_other_change_rate"]).fillna(-np.inf)
    best = counts.assign(gap=gap, order=range(len(counts))).sort_values(
        ["n_specific", "gap", "order"], ascending=[False, False, True]).iloc[0]
    return {"n_specific_oracle": int(best["n_specific"]),
            "oracle_setting": f"{best['scale']:g} x max, {best['mode']}, {int(best['n_latents'])} latents"}


def rule_table(reports: list[dict], rules: tuple[str, ...]) -> pd.DataFrame:
    """Per ranking rule, each class at that rule's own tuned setting, measured on validation (patch level)."""
    rows = []
    for rule in rules:
        results = [t["per_rule_validation"][rule] for r in _evaluated(reports)
                   if (t := tuned(r)) is not None and rule in t.get("per_rule_validation", {})]
        rows.append({"rule": rule, "n_classes": len(results),
                     "n_specific": sum(bool(x.get("specific")) for x in results),
                     "mean_target_change_rate": _mean([x["target_change_rate"] for x in results]),
                     "mean_other_change_rate": _mean([x["other_change_rate"] for x in results]),
                     "most_common_setting": _most_common([describe_setting(x) for x in results])})
    return pd.DataFrame(rows, columns=["rule", "n_classes", "n_specific", "mean_target_change_rate",
                                       "mean_other_change_rate", "most_common_setting"])


def _mean(values: list) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else math.nan


def _most_common(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0] if values else "none"


def headline(reports: list[dict], table: pd.DataFrame, counts: pd.DataFrame) -> dict:
    """The summary's figures: counts at the configured and tuned settings, the most common tuned setting, mean
    TPP scores, pooled change rates, and the oracle diagnostic."""
    tuned_parts = [t for r in _evaluated(reports) if (t := tuned(r)) is not None]
    common = Counter(tuple(t["setting"][k] for k in ("rule", "n_latents", "mode", "scale")) for t in tuned_parts)
    rule, n_latents, mode, scale = common.most_common(1)[0][0] if common else ("", 0, "", math.nan)
    n = len(table)
    out = {"n_classes_evaluated": n, "n_specific": int(table["specific"].sum()) if n else 0,
           "n_specific_tuned": int(table["tuned_specific"].fillna(False).astype(bool).sum()) if n else 0,
           "n_tuned": len(tuned_parts), "tuned_rule": rule, "tuned_n_latents": int(n_latents), "tuned_mode": mode,
           "tuned_scale": float(scale), "n_classes_at_common_tuned_setting": common.most_common(1)[0][1] if common
           else 0, "n_absent_from_validation": sum(r["status"] == "absent_from_validation" for r in reports),
           "n_without_latents": sum(r["status"] == "no_latents" for r in reports)}
    for column in ("tpp_score", "tuned_tpp_score", "target_change_rate", "other_change_rate",
                   "random_latents_target_change_rate", "random_direction_target_change_rate",
                   "tuned_target_change_rate", "tuned_other_change_rate", "target_iou_before", "target_iou_after"):
        out[f"mean_{column}"] = _mean(table[column].tolist()) if n else math.nan
    return {**out, **oracle(counts)}


def summary_sentence(figures: dict, configured: str) -> str:
    """The summary in words, the counts first."""
    n = figures["n_classes_evaluated"]
    tuned_text = (f"at settings tuned per class on held-out training images (most often {figures['tuned_scale']:g} x "
                  f"max, {figures['tuned_mode']}, {figures['tuned_n_latents']} latents by {figures['tuned_rule']}) "
                  f"{figures['n_specific_tuned']} of {n}" if figures["n_tuned"] else "no class could be tuned")
    return (f"At the original setting ({configured}) {figures['n_specific']} of {n} present classes are "
            f"class-specific; {tuned_text}. Mean change rates at the original setting: target "
            f"{figures['mean_target_change_rate']:.2f}, other patches {figures['mean_other_change_rate']:.2f}, "
            f"random latents {figures['mean_random_latents_target_change_rate']:.2f}, a random direction of the "
            f"same norm {figures['mean_random_direction_target_change_rate']:.2f}; at the tuned settings target "
            f"{figures['mean_tuned_target_change_rate']:.2f}, other {figures['mean_tuned_other_change_rate']:.2f}. "
            f"Mean TPP score {figures['mean_tpp_score']:.2f} (original) and {figures['mean_tuned_tpp_score']:.2f} "
            f"(tuned).")


# ---------------------------------------------------------------------------------------------------------------
# Summary views


# The classes table (part of summary.csv, the tuned setting in words): column -> short heading. The UI shows it as
# two narrow tables (original and tuned setting; a wide one would be cut off), report.html whole and sortable.
CLASS_COLUMNS = {"class_key": "class", "class_name": "name", "target_patches": "patches",
                 "target_change_rate": "target", "other_change_rate": "other",
                 "random_latents_target_change_rate": "rand. latents", "random_direction_target_change_rate":
                 "rand. direction", "target_iou_before": "IoU before", "target_iou_after": "IoU after",
                 "tpp_score": "TPP", "specific": "specific", "tuned_setting": "tuned setting",
                 "tuned_target_change_rate": "tuned target", "tuned_other_change_rate": "tuned other",
                 "tuned_specific": "tuned specific"}
CLASS_VIEWS = {"classes": ("class_key", "target_patches", "target_change_rate", "other_change_rate",
                           "random_latents_target_change_rate", "random_direction_target_change_rate",
                           "target_iou_before", "target_iou_after", "tpp_score", "specific"),
               "classes_tuned": ("class_key", "tuned_setting", "tuned_target_change_rate", "tuned_other_change_rate",
                                 "tuned_specific")}
CLASS_TABLE_NOTE = ("target, other: share of the class's and of the other labelled patches whose prediction changed; "
                    "rand. latents, rand. direction: the target change rate under the two controls; IoU at pixel "
                    "level; TPP: targeted probe perturbation score")


def class_rows(reports: list[dict]) -> list[dict]:
    """One row per evaluated class, the columns of CLASS_COLUMNS; undefined numbers are None."""
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    rows = []
    for r in _evaluated(reports):
        values, part = metric_values(r), tuned(r)
        row = {"class_key": r["class_key"], "class_name": r["class_name"], "target_patches": int(r["target_patches"]),
               **values, "specific": bool(r["specific"]),
               "tuned_setting": describe_setting(part["setting"]) if part else "not tuned",
               "tuned_specific": bool(part["metrics"]["specific"]) if part else None}
        rows.append({name: clean(row.get(name)) for name in CLASS_COLUMNS})
    return rows


def specificity_grid(reports: list[dict], rules: tuple[str, ...]) -> dict:
    """Classes by settings for the heatmap: the validation sweep at the configured N (one column per scale and mode,
    with controls and verdicts), then each rule's own tuned setting measured on validation. Per cell the verdict
    (None: not measured) and the target change rate."""
    evaluated = _evaluated(reports)
    sweep = sorted({(row["mode"], float(row["scale"])) for r in evaluated for row in r["dose_response"]
                    if row.get("specific") is not None}, key=lambda ms: (ms[0] != "every_token", ms[0], ms[1]))
    columns = [f"{scale:g}" for _, scale in sweep] + list(rules)
    modes = list(dict.fromkeys(mode for mode, _ in sweep))
    groups = [(f"{mode.replace('_', ' ')}, scale x max", [m for m, _ in sweep].index(mode),
               len(sweep) - [m for m, _ in sweep][::-1].index(mode)) for mode in modes]
    groups.append(("tuned, per rule", len(sweep), len(sweep) + len(rules)))
    specific, target = [], []
    for r in evaluated:
        cells = {(row["mode"], float(row["scale"])): row for row in r["dose_response"]
                 if row.get("specific") is not None}
        per_rule = (tuned(r) or {}).get("per_rule_validation", {})
        found = [cells.get(setting) for setting in sweep] + [per_rule.get(rule) for rule in rules]
        specific.append([None if c is None else bool(c["specific"]) for c in found])
        target.append([None if c is None else _number(c.get("target_change_rate")) for c in found])
    n = len(evaluated[0]["latents"]) if evaluated else 0
    return {"rows": [r["class_key"] for r in evaluated], "columns": columns, "groups": groups,
            "specific": specific, "target": target,
            "title": f"class-specific or not, on validation: the sweep at N = {n} latents, then each rule's tuned "
                     "setting"}
