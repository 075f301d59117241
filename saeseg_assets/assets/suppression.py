"""`val_codes` (the shared validation pass), `suppression_report[c]` (suppress class c's latents, measure the probe
with controls and a dose-response; report.json per class) and `suppression_summary` (all classes)."""

import json
import warnings

import dagster as dg

from ..artifacts import (artifact_metadata, check_same_dataset, input_cache, input_folder, latest_key, latest_keys,
                         readable)
from ..automation import DOWNSTREAM_CONDITION
from ..config import launchpad_config
from ..core.settings import SuppressionConfig
from ..partitions import CLASS_BACKFILL_POLICY, class_partitions
from ..resources import Backbone, Storage
from .latents import CLASS_LATENTS_FILE, GALLERY_FILE

# Single-run backfills are what `--partition-range` needs; the beta notice would print at every definitions load.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

VERSION = 2  # of the codes folders' formats (val_codes, tuning_codes); bump when a change makes old codes wrong
# Of the report and summary folders; bump when a change makes old reports or summaries wrong (3: examples.npz, examples
# with ground truth and legend, summary heatmap, gallery and report.html).
REPORTS_VERSION = 3
REPORT_FILE = "report.json"
PICTURES = ("examples", "dose_response", "latent_count")  # PNG files beside a class's report, shown in its metadata

SuppressionReportConfig = launchpad_config("SuppressionReportConfig", SuppressionConfig)


@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("probe_checkpoint"), dg.AssetKey("val_activations")],
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          pool="gpu", automation_condition=DOWNSTREAM_CONDITION)
def val_codes(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone) -> dg.MaterializeResult:
    """The SAE's codes of every validation token stored per latent (CSC), and the probe's baseline logits and pixel
    predictions: one SAE pass for all 150 classes; each class then reads only its own latents' columns."""
    from ..core.probe import load_probe
    from ..core.sae import load_sae
    from ..core.store import Spec
    from ..core.val_codes import compute_val_codes, load_val_codes, save_val_codes

    sae_key, sae_folder = input_folder(context, storage, "sae_weights")
    probe_key, probe_folder = input_folder(context, storage, "probe_checkpoint")
    val_key, cache = input_cache(context, storage, "val_activations")
    spec = Spec("val_codes", VERSION, {},
                {"sae_weights": sae_key, "probe_checkpoint": probe_key, "val_activations": val_key})
    store = storage.store
    reused = store.exists("val_codes", spec.key)
    if not reused:
        codes = compute_val_codes(load_sae(sae_folder)[0], load_probe(probe_folder), cache, backbone.device,
                                  log=context.log.info)
        with store.write(spec) as work:
            save_val_codes(work, codes)
    folder = store.open("val_codes", spec.key)
    codes = load_val_codes(folder)
    return dg.MaterializeResult(
        metadata=readable({**artifact_metadata(spec.key, folder, reused), "n_tokens": codes.n_tokens,
                           "nonzero_codes": len(codes.values_M),
                           "codes_per_token": len(codes.values_M) / max(codes.n_tokens, 1)}),
        data_version=dg.DataVersion(spec.key),
    )


@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("probe_checkpoint"), dg.AssetKey("train_activations")],
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          pool="gpu", automation_condition=DOWNSTREAM_CONDITION)
def tuning_codes(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone) -> dg.MaterializeResult:
    """The tuning split of the suppression study: the SAE's codes and the probe's logits on the held-out training
    images (the chunks the probe sweep held out for its own selection; for an imported probe, the same draw), in the
    layout of val_codes. Tuning reads these, never validation."""
    from ..core.probe import load_probe, split_held_out
    from ..core.sae import load_sae
    from ..core.settings import SweepConfig
    from ..core.store import Spec
    from ..core.val_codes import compute_val_codes, load_val_codes, save_val_codes

    sae_key, sae_folder = input_folder(context, storage, "sae_weights")
    probe_key, probe_folder = input_folder(context, storage, "probe_checkpoint")
    train_key, cache = input_cache(context, storage, "train_activations")
    probe = load_probe(probe_folder)
    held, note = probe.meta.get("held_out_images"), "the chunks the probe sweep held out"
    if not held:
        default = SweepConfig()
        try:
            held, note = split_held_out(cache, default.held_out_fraction, default.seed)[1], "the probe sweep's draw"
        except ValueError:  # a cache of one chunk: nothing can be held out of it
            held, note = [(0, cache.n_images)], "all training images (one chunk: none could be held out)"
            context.log.warning(f"{cache.path} holds one chunk: tuning uses all training images, which the probe "
                                "may have been trained on (never validation)")
    spans = [tuple(int(x) for x in span) for span in held]
    spec = Spec("tuning_codes", VERSION, {"spans": [list(s) for s in spans]},
                {"sae_weights": sae_key, "probe_checkpoint": probe_key, "train_activations": train_key})
    store = storage.store
    reused = store.exists("tuning_codes", spec.key)
    if not reused:
        codes = compute_val_codes(load_sae(sae_folder)[0], probe, cache, backbone.device, log=context.log.info,
                                  spans=spans)
        with store.write(spec) as work:
            save_val_codes(work, codes)
    folder = store.open("tuning_codes", spec.key)
    codes = load_val_codes(folder)
    return dg.MaterializeResult(
        metadata=readable({**artifact_metadata(spec.key, folder, reused), "n_images": sum(b - a for a, b in spans),
                           "n_tokens": codes.n_tokens, "images": dg.MetadataValue.json([list(s) for s in spans]),
                           "which_images": note}),
        data_version=dg.DataVersion(spec.key),
    )


@dg.asset(partitions_def=class_partitions, backfill_policy=CLASS_BACKFILL_POLICY, pool="gpu",
          deps=[dg.AssetKey("class_latents"), dg.AssetKey("val_codes"), dg.AssetKey("tuning_codes"),
                dg.AssetKey("latent_stats"), dg.AssetKey("baseline_metrics")], group_name="suppression", kinds={"json"},
          automation_condition=DOWNSTREAM_CONDITION)
def suppression_report(context: dg.AssetExecutionContext, config: SuppressionReportConfig,
                       storage: Storage) -> None:
    """Suppress class c's latents in the validation activations (error term kept), then read the probe: the
    configured setting, and one tuned on held-out training images (rule, number of latents, mode, scale), each
    measured once on validation with controls, 95% bootstrap intervals and the TPP score; a latent-count sweep.
    Writes report.json (and its pictures) per class."""
    from ..core.store import Spec

    settings = config.settings()
    store = storage.store
    keys = {a: latest_key(context.instance, a) for a in ("val_codes", "tuning_codes", "latent_stats")}
    made_from = store.inputs("val_codes", keys["val_codes"])
    tuning_from = store.inputs("tuning_codes", keys["tuning_codes"])
    stats_from = store.inputs("latent_stats", keys["latent_stats"])
    if not made_from["sae_weights"] == tuning_from["sae_weights"] == stats_from["sae_weights"]:
        raise ValueError(f"val_codes {keys['val_codes']}, tuning_codes {keys['tuning_codes']} and latent_stats "
                         f"{keys['latent_stats']} were made from different SAEs: materialize them again")
    if made_from["probe_checkpoint"] != tuning_from["probe_checkpoint"]:
        raise ValueError(f"val_codes {keys['val_codes']} and tuning_codes {keys['tuning_codes']} were made from "
                         "different probes: materialize them again")
    check_same_dataset(storage, stats_from["train_activations"], made_from["val_activations"])
    choice_keys = {key: latest_key(context.instance, "class_latents", key) for key in context.partition_keys}
    # Every class is checked before any report is written.
    expected = {"latent_stats": keys["latent_stats"], "probe_checkpoint": made_from["probe_checkpoint"]}
    if stale := [k for k, ck in choice_keys.items() if store.inputs("class_latents", ck, k) != expected]:
        raise ValueError(f"class_latents of {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''} were chosen from "
                         f"other latent statistics or another probe than latent_stats {keys['latent_stats']} and "
                         f"probe_checkpoint {made_from['probe_checkpoint']}: materialize class_latents again")
    specs = {key: Spec("suppression_report", REPORTS_VERSION, settings.identity(),
                       {"class_latents": choice_keys[key], **keys})
             for key in context.partition_keys}
    todo = [key for key, spec in specs.items() if not store.exists("suppression_report", spec.key, key)]
    if todo:
        _write_reports(context, storage, settings, {k: specs[k] for k in todo}, made_from, tuning_from)
    for key, spec in specs.items():
        folder = store.open("suppression_report", spec.key, key)
        report = json.loads((folder / REPORT_FILE).read_text())
        context.add_asset_metadata(readable({**_report_metadata(report, folder),
                                             **artifact_metadata(spec.key, folder, key not in todo)}),
                                   partition_key=key)


def _write_reports(context, storage: Storage, settings: SuppressionConfig, specs: dict, made_from: dict,
                   tuning_from: dict) -> None:
    """Studies the classes of `specs` on the models their shared inputs give, each into its own folder."""
    from ..core.ade20k import class_by_key
    from ..core.cache import CACHE_FOLDER, ActivationCache
    from ..core.examples import validation_crops
    from ..core.store import write_atomic
    from ..core.study import study_class
    from ..core.suppression import load_model
    from ..core.suppression_report import REPORT_VERSION, json_safe

    store = storage.store
    first = next(iter(specs.values()))
    cache = ActivationCache(store.open("val_activations", made_from["val_activations"]) / CACHE_FOLDER)
    folders = {a: store.open(a, first.inputs[a]) for a in ("val_codes", "tuning_codes", "latent_stats")}
    model = load_model(store.open("sae_weights", made_from["sae_weights"]),
                       store.open("probe_checkpoint", made_from["probe_checkpoint"]), folders["latent_stats"],
                       folders["val_codes"], cache)
    train = ActivationCache(store.open("train_activations", tuning_from["train_activations"]) / CACHE_FOLDER)
    tuning = load_model(store.open("sae_weights", made_from["sae_weights"]),
                        store.open("probe_checkpoint", made_from["probe_checkpoint"]), folders["latent_stats"],
                        folders["tuning_codes"], train, pixel=False)
    context.log.info(f"tuning on {tuning.n_images} held-out training images, evaluating on {model.n_images} "
                     "validation images")
    load_rgb = validation_crops(cache.attrs.get("dataset_root", ""), int(cache.attrs["crop_size"]))
    for key, spec in specs.items():
        ade_class = class_by_key(key)
        choice = json.loads((store.open("class_latents", spec.inputs["class_latents"], key)
                             / CLASS_LATENTS_FILE).read_text())
        rankings = {rule: tuple(r["latents"]) for rule, r in choice.get("rankings", {}).items()}
        evaluation = study_class(model, tuning, ade_class.index, tuple(choice["latents"]), choice["rule"], rankings,
                                 settings)
        report = json_safe({"report_version": REPORT_VERSION, "class_key": key, "class_name": ade_class.name,
                            **evaluation, "selection": {"rule": choice["rule"], "scores": choice["scores"]},
                            "inputs": spec.inputs})
        with store.write(spec, part=key) as work:
            write_atomic(work / REPORT_FILE, json.dumps(report, indent=2).encode())
            if report["status"] == "evaluated":
                _write_pictures(work, report, model, cache, load_rgb, settings)
        context.log.info(f"{key}: {report['status']}" + (f", specific={report['specific']}"
                                                          if report["status"] == "evaluated" else ""))


def _write_pictures(work, report: dict, model, cache, load_rgb, settings: SuppressionConfig) -> None:
    """examples.npz and the class's pictures: examples (ground truth, baseline, the configured and the tuned
    suppression), dose-response at the configured number of latents, the latent-count sweep."""
    from ..core.examples import class_examples, save_examples
    from ..core.store import write_atomic
    from ..core.suppression_pictures import dose_response_png, examples_png, latent_count_png
    from ..core.suppression_report import tuned

    key, n = report["class_key"], len(report["latents"])
    runs = {"configured": {"latents": report["latents"], "scale": report["scale"], "mode": report["mode"]}}
    if (part := tuned(report)) is not None:
        runs["tuned"] = {"latents": part["latents"], **part["setting"]}
    arrays = class_examples(model, report["class_index"], runs, cache.image_ids(), int(cache.attrs["crop_size"]),
                            load_rgb)
    save_examples(work, arrays)
    write_atomic(work / "examples.png", examples_png(arrays, key, _setting_words(report)))
    configured = [r for r in report["dose_response"] if r["n_latents"] == n]
    write_atomic(work / "dose_response.png", dose_response_png(
        configured, f"{key}: dose-response, top {n} latents by {report['rule']} (validation)"))
    write_atomic(work / "latent_count.png", latent_count_png(
        report["dose_response"], settings.scale, f"{key}: latent-count sweep ({report['rule']})"))


def _setting_words(report: dict) -> dict[str, str]:
    """configured (and tuned) -> the setting in words, as the examples picture names them."""
    from ..core.suppression_report import describe_setting, tuned

    words = {"configured": describe_setting({"rule": report["rule"], "n_latents": len(report["latents"]),
                                             "mode": report["mode"], "scale": report["scale"]})}
    if (part := tuned(report)) is not None:
        words["tuned"] = describe_setting(part["setting"])
    return words


def _report_metadata(report: dict, folder) -> dict:
    from ..core.examples import load_examples
    from ..core.pictures import png_markdown
    from ..core.suppression_pictures import example_rows, legend_classes
    from ..core.suppression_report import class_sentence, metric_values, report_markdown

    metadata = {"result": dg.MetadataValue.text(class_sentence(report)), "status": report["status"],
                "specific": bool(report.get("specific", False)),
                "specificity_rule": dg.MetadataValue.text(report["specificity_rule"])}
    if report["status"] == "evaluated":
        legend = legend_classes(*example_rows(load_examples(folder), _setting_words(report)))
        metadata["legend"] = dg.MetadataValue.text("colours: " + ", ".join(text for _, text in legend))
        for name in PICTURES:
            png = (folder / f"{name}.png").read_bytes()
            metadata[name] = dg.MetadataValue.md(png_markdown(png, f"{report['class_key']} {name.replace('_', '-')}"))
    else:
        metadata["reason"] = report["reason"]
    metadata.update({"summary": dg.MetadataValue.md(report_markdown(report)),
                     "latents": dg.MetadataValue.json(report["latents"]), "scale": float(report["scale"]),
                     "mode": report["mode"]})
    if report["status"] == "evaluated":
        metadata.update(metric_values(report))
    return metadata


@dg.asset(deps=[dg.AssetKey("suppression_report")], group_name="suppression", kinds={"pandas"},
          backfill_policy=dg.BackfillPolicy.single_run(), automation_condition=DOWNSTREAM_CONDITION)
def suppression_summary(context: dg.AssetExecutionContext, storage: Storage) -> dg.MaterializeResult:
    """All class reports together: the headline in words, the evaluated classes in tables, a classes x settings
    heatmap of the verdicts, one example per class, change rates against both controls, counts per setting and per
    rule, and report.html, the whole study in one self-contained file (its classes table sorts by a click)."""
    from ..core.store import Spec

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
    from ..core.examples import EXAMPLES_FILE, load_examples
    from ..core.settings import RULES
    from ..core.store import write_atomic
    from ..core.summary_page import REPORT_HTML, SUMMARY_PICTURES, summary_html
    from ..core.suppression_pictures import (change_rates_png, example_rows, label_panels_png, specific_counts_png,
                                             specificity_heatmap_png)
    from ..core.suppression_report import (class_rows, describe_setting, dose_table, headline, json_safe, rule_table,
                                           specific_counts, specificity_grid, summary_sentence, summary_table)

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

    from ..core.pictures import png_markdown
    from ..core.summary_page import REPORT_HTML, SUMMARY_PICTURES
    from ..core.suppression_report import CLASS_COLUMNS, CLASS_TABLE_NOTE, CLASS_VIEWS
    from ..core.tables import markdown_table

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
