"""`suppression_summary`: every class's report together, in tables, pictures and one self-contained report.html."""

import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..recipe import Recipe, stage
from ..resources import Storage
from .latents import GALLERY_FILE
from .reports import PICTURES, REPORT_FILE

SUMMARY_FILE, CLASSES_FILE, MECHANISMS_FILE = "summary.json", "classes.json", "mechanisms.json"
LATEST_REPORT = "report.html"  # under the data folder: a link to the latest summary's report.html
# The summary's figures shown as entries of their own (the rest are in its "figures" table): the counts, the most
# common tuned setting, the TPP means.
HEADLINE_FIGURES = ("n_classes_evaluated", "n_specific", "n_tuned", "n_absent_from_validation", "n_without_latents",
                    "n_stale", "tuned_", "mean_tpp_score", "mean_tuned_tpp_score")


@dg.asset(deps=stage("suppression_summary", reads=("suppression_report", "propagated_report", "val_codes",
                                                  "baseline_metrics"),
                     writes=("report.results", "report.summary", "report.study_pictures", "report.summary_page",
                             "report.mechanisms")),
          group_name="suppression", kinds={"pandas"},
          backfill_policy=dg.BackfillPolicy.single_run(), automation_condition=DOWNSTREAM_CONDITION)
def suppression_summary(context: dg.AssetExecutionContext, storage: Storage) -> dg.MaterializeResult:
    """All class reports together: the headline in words, the evaluated classes in tables, a classes x settings
    heatmap of the verdicts, one example per class, change rates against both controls, counts per setting and per
    rule, and report.html, the whole study in one self-contained file (its classes table sorts by a click)."""
    from ..core.report.results import ClassReport, read_result
    from ..core.report.summary_page import REPORT_HTML
    from ..core.store.artifacts import link_atomic

    store = storage.store
    recipe = Recipe(context, storage)
    codes_key, baseline_key = recipe.key_of("val_codes"), recipe.key_of("baseline_metrics")
    current, stale = {}, []
    for asset in ("suppression_report", "propagated_report"):  # the propagated reports are optional
        report_keys = recipe.partition_keys(asset)
        current[asset] = {c: k for c, k in report_keys.items()
                          if store.inputs(asset, k, c)["val_codes"] == codes_key}
        if left_out := sorted(set(report_keys) - set(current[asset])):
            context.log.warning(f"left out {len(left_out)} {asset}(s) made from other validation codes than "
                                f"val_codes {codes_key}: {', '.join(left_out[:10])}")
        stale += left_out if asset == "suppression_report" else []
    out = recipe.output({}, {f"{asset}/{c}": k for asset, keys in current.items() for c, k in keys.items()})
    if not out.reused:
        folders = {c: store.open("suppression_report", k, c) for c, k in sorted(current["suppression_report"].items())}
        propagated = {c: store.open("propagated_report", k, c)
                      for c, k in sorted(current["propagated_report"].items())}
        reports = [read_result(folder / REPORT_FILE, ClassReport) for folder in folders.values()]
        galleries = {r.class_key: store.path("class_latents", r.inputs["class_latents"], r.class_key) / GALLERY_FILE
                     for r in reports}
        provenance = _provenance(storage, codes_key, baseline_key, reports, out.spec.key,
                                 sorted(set(current["suppression_report"].values())))
        with out.write() as work:
            _write_summary(work, reports, folders, galleries, provenance, n_stale=len(stale), propagated=propagated)
    link_atomic(storage.root / LATEST_REPORT, out.folder / REPORT_HTML)
    metadata = _summary_metadata(out.folder)
    context.log.info(f"{metadata['result'].value}\nreport: {out.folder / REPORT_HTML} (latest: "
                     f"{storage.root / LATEST_REPORT})")
    return out.result(metadata)


def _provenance(storage: Storage, codes_key: str, baseline_key: str, reports: list, key: str,
                report_keys: list[str]) -> dict[str, str]:
    """Where the study's numbers come from, for report.html: the data, the backbone, the SAE and the probe with
    their figures, the settings, every input's key and the command that makes it again."""
    import json

    from ..core.data.cache import CACHE_FOLDER, ActivationCache
    from ..core.store.artifacts import ArtifactMissing

    store = storage.store

    def read(asset: str, key: str, name: str) -> dict | None:
        """A JSON file of an input, or None where that input left none (an imported SAE is evaluated, a probe's
        baseline measured, by their own assets)."""
        try:
            return json.loads((store.open(asset, key) / name).read_text())
        except (ArtifactMissing, FileNotFoundError):
            return None

    made = store.inputs("val_codes", codes_key)
    cache = ActivationCache(store.open("val_activations", made["val_activations"]) / CACHE_FOLDER)
    val = {**cache.attrs, "n_images": cache.n_images}
    sae = read("sae_weights", made["sae_weights"], "sae.json") or {}
    fit = read("sae_weights", made["sae_weights"], "evaluation.json")
    probe = read("probe_checkpoint", made["probe_checkpoint"], "probe.json") or {}
    baseline = read("baseline_metrics", baseline_key, "baseline_metrics.json")
    embedded = not storage.ade20k_root
    first = next((r for r in reports if r.inputs), None)
    inputs = {**made, "baseline_metrics": baseline_key, **(first.inputs if first else {})}
    inputs.pop("class_latents", None)
    if first is not None:
        inputs["train_activations"] = store.inputs("latent_stats", first.inputs["latent_stats"])["train_activations"]
    sae_source = (f"imported from {sae['imported_from']}" if sae.get("imported_from") else
                  f"trained here on {sae.get('tokens_trained', 0):,} tokens")
    probe_source = (f"imported from {probe['imported_from']}" if probe.get("imported_from") else
                    f"trained here (lr {probe.get('lr')}, weight decay {probe.get('weight_decay')}, chosen by mIoU "
                    f"{probe.get('selection_miou', float('nan')):.3f} on held-out training images)")
    settings = reports[0].config.identity() if reports else {}
    env = "" if embedded else f"SAESEG_ADE20K_ROOT={storage.ade20k_root} "
    env += "" if val.get("backbone_source") == "embedded" else f"SAESEG_BACKBONE={val.get('backbone_source')} "
    return {
        "dataset": (f"the embedded default, real photographs in ADE20K's format, NOT ADE20K ({val.get('dataset_root')})"
                    if embedded else f"ADE20K at {val.get('dataset_root')}"),
        "validation images": f"{val['n_images']} (fingerprint {val.get('dataset_fingerprint', '')})",
        "backbone": f"{val.get('backbone')} ({val.get('backbone_source')}), output of block {val.get('layer')} "
                    f"(0-based), {val.get('crop_size')} px crops",
        "SAE": f"{sae.get('architecture')}, {sae.get('d_sae', 0):,} latents over d_model {sae.get('d_model')}"
               + (f", k {sae['k']}" if sae.get("k") else "") + f"; {sae_source}",
        "SAE on validation": (f"FVU {fit['fvu']:.4f}, L0 {fit['l0']:.1f}, dead {fit['dead_fraction']:.2%}, dense "
                              f"{fit['dense_fraction']:.2%} ({fit['n_tokens']:,} tokens)" if fit else
                              f"not recorded (sae_weights {made['sae_weights']} has no evaluation.json)"),
        "probe": f"linear, {probe_source}",
        "probe on validation": (f"mIoU {baseline['miou']:.4f} (pixels, {baseline['n_classes_present']} classes "
                                f"present), patch mIoU {baseline['patch_miou']:.4f}" if baseline else
                                f"not recorded (no baseline_metrics.json under baseline_metrics {baseline_key})"),
        "suppression settings": json.dumps(settings, sort_keys=True),
        "input keys": ", ".join(f"{asset} {k}" for asset, k in sorted(inputs.items())),
        "this summary": f"suppression_summary {key}" + (f", reports {', '.join(report_keys)}" if report_keys else ""),
        "made again by": f"{env}make demo (the same commands: README, \"Using it\")",
    }


def _write_summary(folder, reports: list, report_folders: dict, galleries: dict, provenance: dict,
                   n_stale: int, propagated: dict) -> None:
    """summary.csv, dose_response.csv, specific_counts.csv, rules.csv, classes.json, summary.json, the pictures of
    core.summary_page.SUMMARY_PICTURES, the mechanisms side by side (`propagated`: the folders of the classes'
    propagated reports) and report.html."""
    from ..core.report.results import (
        ClassTable,
        DoseRow,
        RuleRow,
        SettingCount,
        SummaryRow,
        write_result,
    )
    from ..core.report.study_pictures import (
        change_rates_png,
        example_rows,
        label_panels_png,
        specific_counts_png,
        specificity_heatmap_png,
    )
    from ..core.report.summary import (
        class_rows,
        dose_rows,
        evaluated,
        setting_counts,
        specificity_grid,
        study_summary,
        summary_rows,
    )
    from ..core.report.summary_page import REPORT_HTML, SUMMARY_PICTURES, summary_html
    from ..core.report.tables import record_csv
    from ..core.report.text import criteria_words
    from ..core.settings import TUNING_RULES
    from ..core.store.artifacts import write_atomic
    from ..core.study.examples import EXAMPLES_FILE, load_examples

    rows, dose = summary_rows(reports), dose_rows(reports)
    counts = setting_counts(dose)
    # The rules the reports were tuned with, in the settings' order.
    rules = tuple(rule for rule in TUNING_RULES if any(rule in r.config.tuning_rules for r in reports))
    summary = study_summary(reports, rows, counts, rules, n_stale)
    label = summary.figures.configured_setting
    write_atomic(folder / "summary.csv", record_csv(rows, SummaryRow))
    write_atomic(folder / "dose_response.csv", record_csv(dose, DoseRow))
    write_atomic(folder / "specific_counts.csv", record_csv(counts, SettingCount))
    write_atomic(folder / "rules.csv", record_csv(summary.per_rule, RuleRow))
    write_result(folder / CLASSES_FILE, ClassTable(tuple(class_rows(reports))))
    write_result(folder / SUMMARY_FILE, summary)
    pictures = {"change_rates": change_rates_png(rows, f"change rates per class ({label})"),
                "specific_per_setting": specific_counts_png(counts, len(rows), "class-specific classes per validation "
                                                            "setting (optimistic)"),
                "specificity": specificity_heatmap_png(specificity_grid(reports, rules),
                                                       criteria_words(evaluated(reports)[0].config) if rows else "")}
    # One row per evaluated class: its first example (the image with the most class pixels), original setting.
    examples = []
    for r in evaluated(reports):
        if (report_folders[r.class_key] / EXAMPLES_FILE).exists():
            first = example_rows(load_examples(report_folders[r.class_key]), {"configured": ""})[0][:1]
            examples += [{**row, "label": r.class_key} for row in first]
    pictures["class_examples"] = label_panels_png(
        examples, [("rgb", "image"), ("ground_truth", "ground truth"), ("baseline", "before"),
                   ("configured", "after (original setting)")],
        f"one validation image per class, before and after suppression\n({label})", size=1.7)
    for name in SUMMARY_PICTURES:
        write_atomic(folder / f"{name}.png", pictures[name])
    class_pictures = {key: {name: path.read_bytes() for name in PICTURES if (path := f / f"{name}.png").exists()}
                      for key, f in report_folders.items()}
    for key, path in galleries.items():
        if key in class_pictures and path.exists():
            class_pictures[key]["gallery"] = path.read_bytes()
    mechanisms, per_class = _write_mechanisms(folder, reports, propagated)
    page = summary_html(summary, class_rows(reports), pictures, reports, class_pictures, provenance, mechanisms,
                        per_class)
    write_atomic(folder / REPORT_HTML, page.encode())


def _write_mechanisms(folder, reports: list, propagated: dict) -> tuple[list[str], dict[str, list[str]]]:
    """mechanisms.json, mechanisms.csv, mechanisms.png; report.html's section comparing the two mechanisms, and each
    class's section under propagate."""
    from ..core.report.html import heading, markdown_html, paragraph, png_img
    from ..core.report.mechanisms import comparison_markdown, comparison_png, compare, propagated_class_html
    from ..core.report.results import ClassReport, MechanismRow, read_result, write_result
    from ..core.report.tables import record_csv
    from ..core.store.artifacts import write_atomic

    theirs = [read_result(f / REPORT_FILE, ClassReport) for f in propagated.values()]
    comparison = compare(reports, theirs)
    write_result(folder / MECHANISMS_FILE, comparison)
    write_atomic(folder / "mechanisms.csv", record_csv(comparison.rows, MechanismRow))
    png = comparison_png(comparison, "change rates per class under both mechanisms (configured setting)")
    write_atomic(folder / "mechanisms.png", png)
    section = [heading(2, "Shortcut and propagate side by side"), paragraph(comparison.sentence),
               markdown_html(comparison_markdown(comparison)), png_img(png, "both mechanisms")]
    per_class = {r.class_key: propagated_class_html(r, (propagated[r.class_key] / "examples.png").read_bytes()
                                                    if (propagated[r.class_key] / "examples.png").exists() else None)
                 for r in theirs if r.evaluated}
    return section, per_class


def _summary_metadata(folder) -> dict:
    """The headline first, the classes (two narrow tables: Dagster 1.13 shows metadata tables unsorted and cuts wide
    ones off; report.html has the whole table, sortable), the pictures, the other tables; the folder of report.html
    is the recipe's `path`, last."""
    from ..core.report.pictures import png_markdown
    from ..core.report.records import flat
    from ..core.report.results import (
        CLASS_VIEWS,
        ClassRow,
        ClassTable,
        RuleRow,
        SettingCount,
        StudySummary,
        read_result,
    )
    from ..core.report.summary_page import SUMMARY_PICTURES
    from ..core.report.tables import markdown_table, record_markdown
    from ..core.report.text import CLASS_TABLE_NOTES

    from ..core.report.mechanisms import comparison_markdown
    from ..core.report.results import MechanismComparison

    summary = read_result(folder / SUMMARY_FILE, StudySummary)
    mechanisms = read_result(folder / MECHANISMS_FILE, MechanismComparison)
    rows = read_result(folder / CLASSES_FILE, ClassTable).rows
    classes = {view: dg.MetadataValue.md(record_markdown(rows, ClassRow, view) + f"\n\n{CLASS_TABLE_NOTES[view]}.")
               for view in CLASS_VIEWS}
    # Paths last: a long value widens the UI's column and cuts the headline off.
    return {"result": dg.MetadataValue.text(summary.result), **classes,
            **{name: dg.MetadataValue.md(png_markdown((folder / f"{name}.png").read_bytes(), title))
               for name, title in SUMMARY_PICTURES.items()},
            "mechanisms": dg.MetadataValue.text(mechanisms.sentence),
            "mechanisms_table": dg.MetadataValue.md(comparison_markdown(mechanisms)),
            "mechanisms_chart": dg.MetadataValue.md(png_markdown((folder / "mechanisms.png").read_bytes(),
                                                                 "both mechanisms")),
            **{name: getattr(mechanisms, name) for name in ("n_specific_shortcut", "n_specific_propagate",
                                                            "n_specific_tuned_shortcut", "n_specific_tuned_propagate")},
            "per_rule": dg.MetadataValue.md(record_markdown(summary.per_rule, RuleRow)),
            "specific_counts": dg.MetadataValue.md(record_markdown(summary.per_setting, SettingCount)),
            # The counts and the most common tuned setting as entries (numbers the UI can plot); every figure in one
            # table: long names in the key column would widen it and push the headline out of view.
            **{name: "" if value is None else value for name, value in flat(summary.figures).items()
               if name.startswith(HEADLINE_FIGURES) and "_ci_" not in name},
            "figures": dg.MetadataValue.md(markdown_table([{"figure": name, "value": value} for name, value in
                                                           flat(summary.figures).items()]))}
    # report.html lies in the output's folder, the `path` entry the recipe adds last: a second, longer path would
    # widen the UI's value column (Dagster shows a path unbroken) and cut the headline off on the right.
