"""`suppression_summary`: every class's report together, in tables, pictures and one self-contained report.html."""

import json

import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..recipe import artifact_metadata, latest_key, latest_keys, readable
from ..resources import Storage
from .latents import GALLERY_FILE
from .reports import PICTURES, REPORT_FILE, REPORTS_VERSION


@dg.asset(deps=[dg.AssetKey("suppression_report")], group_name="suppression", kinds={"pandas"},
          backfill_policy=dg.BackfillPolicy.single_run(), automation_condition=DOWNSTREAM_CONDITION)
def suppression_summary(context: dg.AssetExecutionContext, storage: Storage) -> dg.MaterializeResult:
    """All class reports together: the headline in words, the evaluated classes in tables, a classes x settings
    heatmap of the verdicts, one example per class, change rates against both controls, counts per setting and per
    rule, and report.html, the whole study in one self-contained file (its classes table sorts by a click)."""
    from ..core.store.artifacts import Spec

    store = storage.store
    codes_key = latest_key(context.instance, "val_codes")
    report_keys = latest_keys(context.instance, "suppression_report")
    current = {c: k for c, k in report_keys.items()
               if store.inputs("suppression_report", k, c)["val_codes"] == codes_key}
    if stale := sorted(set(report_keys) - set(current)):
        context.log.warning(f"left out {len(stale)} report(s) made from other validation codes than val_codes "
                            f"{codes_key}: {', '.join(stale[:10])}")
    spec = Spec("suppression_summary", REPORTS_VERSION, {},
                {"val_codes": codes_key, **{f"suppression_report/{c}": k for c, k in current.items()}})
    reused = store.exists("suppression_summary", spec.key)
    if not reused:
        folders = {c: store.open("suppression_report", k, c) for c, k in sorted(current.items())}
        reports = [json.loads((folder / REPORT_FILE).read_text()) for folder in folders.values()]
        galleries = {r["class_key"]: store.path("class_latents", r["inputs"]["class_latents"], r["class_key"])
                     / GALLERY_FILE for r in reports}
        with store.write(spec) as work:
            _write_summary(work, reports, folders, galleries, n_stale=len(stale))
    folder = store.open("suppression_summary", spec.key)
    return dg.MaterializeResult(metadata=readable(_summary_metadata(spec.key, folder, reused)),
                                data_version=dg.DataVersion(spec.key))


def _write_summary(folder, reports: list[dict], report_folders: dict, galleries: dict, n_stale: int) -> None:
    """summary.csv, dose_response.csv, specific_counts.csv, rules.csv, classes.json, summary.json, the pictures of
    core.summary_page.SUMMARY_PICTURES and report.html."""
    from ..core.report.study_pictures import (
        change_rates_png,
        example_rows,
        label_panels_png,
        specific_counts_png,
        specificity_heatmap_png,
    )
    from ..core.report.study_report import (
        class_rows,
        describe_setting,
        dose_table,
        headline,
        json_safe,
        rule_table,
        specific_counts,
        specificity_grid,
        summary_sentence,
        summary_table,
    )
    from ..core.report.summary_page import REPORT_HTML, SUMMARY_PICTURES, summary_html
    from ..core.settings import RULES
    from ..core.store.artifacts import write_atomic
    from ..core.study.examples import EXAMPLES_FILE, load_examples

    table, dose = summary_table(reports), dose_table(reports)
    counts, rules = specific_counts(dose), rule_table(reports, RULES)
    evaluated = [r for r in reports if r["status"] == "evaluated"]
    configured = sorted({describe_setting({"rule": r["rule"], "n_latents": len(r["latents"]), "mode": r["mode"],
                                           "scale": r["scale"]}) for r in evaluated})
    label = "; ".join(configured) or "none"
    figures = {**headline(reports, table, counts), "configured_setting": label, "n_stale": n_stale}
    figures = {"result": summary_sentence(figures, label), **figures}
    write_atomic(folder / "summary.csv", table.to_csv(index=False).encode())
    write_atomic(folder / "dose_response.csv", dose.to_csv(index=False).encode())
    write_atomic(folder / "specific_counts.csv", counts.to_csv(index=False).encode())
    write_atomic(folder / "rules.csv", rules.to_csv(index=False).encode())
    write_atomic(folder / "classes.json", json.dumps(json_safe(class_rows(reports)), indent=2).encode())
    write_atomic(folder / "summary.json", json.dumps(json_safe(figures), indent=2).encode())
    pictures = {"change_rates": change_rates_png(
        table["class_key"].tolist(), table["target_change_rate"].tolist(), table["other_change_rate"].tolist(),
        table["random_latents_target_change_rate"].tolist(), table["random_direction_target_change_rate"].tolist(),
        table["specific"].tolist(), f"change rates per class ({label})"),
        "specific_per_setting": specific_counts_png(counts.to_dict(orient="records"), len(table),
                                                    "class-specific classes per validation setting (optimistic)")}
    grid = specificity_grid(reports, RULES)
    pictures["specificity"] = specificity_heatmap_png(grid["rows"], grid["columns"], grid["specific"], grid["target"],
                                                      grid["title"], grid["groups"])
    # One row per evaluated class: its first example (the image with the most class pixels), original setting.
    rows = []
    for r in evaluated:
        if (report_folders[r["class_key"]] / EXAMPLES_FILE).exists():
            first = example_rows(load_examples(report_folders[r["class_key"]]), {"configured": ""})[0][:1]
            rows += [{**row, "label": r["class_key"]} for row in first]
    pictures["class_examples"] = label_panels_png(
        rows, [("rgb", "image"), ("ground_truth", "ground truth"), ("baseline", "before"),
               ("configured", "after (original setting)")],
        f"one validation image per class, before and after suppression\n({label})", size=1.7)
    for name in SUMMARY_PICTURES:
        write_atomic(folder / f"{name}.png", pictures[name])
    class_pictures = {key: {name: path.read_bytes() for name in PICTURES if (path := f / f"{name}.png").exists()}
                      for key, f in report_folders.items()}
    for key, path in galleries.items():
        if key in class_pictures and path.exists():
            class_pictures[key]["gallery"] = path.read_bytes()
    page = summary_html(figures, class_rows(reports), {"Per ranking rule, each at its own tuned setting "
                                                       "(validation)": rules.to_dict(orient="records"),
                                                       "Per validation setting": counts.to_dict(orient="records")},
                        pictures, reports, class_pictures)
    write_atomic(folder / REPORT_HTML, page.encode())


def _summary_metadata(key: str, folder, reused: bool) -> dict:
    """The headline first, then the report's path, the classes (two narrow tables: Dagster 1.13 shows metadata tables
    unsorted and cuts wide ones off; report.html has the whole table, sortable), the pictures, the other tables."""
    import pandas as pd

    from ..core.report.pictures import png_markdown
    from ..core.report.study_report import CLASS_COLUMNS, CLASS_TABLE_NOTE, CLASS_VIEWS
    from ..core.report.summary_page import REPORT_HTML, SUMMARY_PICTURES
    from ..core.report.tables import markdown_table

    figures = json.loads((folder / "summary.json").read_text())
    figures = {k: ("" if v is None else v) for k, v in figures.items()}
    rows = json.loads((folder / "classes.json").read_text())
    classes = {name: dg.MetadataValue.md(markdown_table(rows, columns, [CLASS_COLUMNS[c] for c in columns]) +
                                         f"\n\n{CLASS_TABLE_NOTE}.")
               for name, columns in CLASS_VIEWS.items()}
    rules = pd.read_csv(folder / "rules.csv")
    counts = pd.read_csv(folder / "specific_counts.csv")
    return {"result": dg.MetadataValue.text(figures.pop("result")),
            "report_html": dg.MetadataValue.path(str(folder / REPORT_HTML)), **classes,
            **{name: dg.MetadataValue.md(png_markdown((folder / f"{name}.png").read_bytes(), title))
               for name, title in SUMMARY_PICTURES.items()},
            "per_rule": dg.MetadataValue.md(markdown_table(rules, headers=[
                "rule", "classes", "specific", "mean target", "mean other", "most common tuned setting"])),
            "specific_counts": dg.MetadataValue.md(markdown_table(counts, headers=[
                "N", "mode", "scale", "classes", "specific", "mean target", "mean other"])),
            **figures, **artifact_metadata(key, folder, reused)}
