"""`val_codes` (the shared validation pass), `suppression_report[c]` (suppress class c's latents, measure the probe
with controls and a dose-response; report.json per class) and `suppression_summary` (all classes)."""

import json
import warnings

import dagster as dg

from ..artifacts import artifact_metadata, input_cache, input_folder, latest_key, latest_keys
from ..automation import DOWNSTREAM_CONDITION
from ..config import launchpad_config
from ..core.settings import SuppressionConfig
from ..partitions import class_partitions
from ..resources import Backbone, Storage
from .latents import CLASS_LATENTS_FILE

# Single-run backfills are what `--partition-range` needs; the beta notice would print at every definitions load.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

VERSION = 1  # of the folders' formats; bump when a change makes old codes, reports or summaries wrong
REPORT_FILE = "report.json"
PICTURES = ("examples", "dose_response")  # PNG files beside a class's report, shown in its metadata

SuppressionReportConfig = launchpad_config("SuppressionReportConfig", SuppressionConfig)


@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("probe_checkpoint"), dg.AssetKey("val_activations")],
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(),
          automation_condition=DOWNSTREAM_CONDITION)
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
        metadata={**artifact_metadata(spec.key, folder, reused), "n_tokens": codes.n_tokens,
                  "nonzero_codes": len(codes.values_M),
                  "codes_per_token": len(codes.values_M) / max(codes.n_tokens, 1)},
        data_version=dg.DataVersion(spec.key),
    )


@dg.asset(partitions_def=class_partitions, backfill_policy=dg.BackfillPolicy.single_run(),
          deps=[dg.AssetKey("class_latents"), dg.AssetKey("val_codes"), dg.AssetKey("latent_stats"),
                dg.AssetKey("baseline_metrics")], group_name="suppression", kinds={"json"},
          automation_condition=DOWNSTREAM_CONDITION)
def suppression_report(context: dg.AssetExecutionContext, config: SuppressionReportConfig,
                       storage: Storage) -> None:
    """Suppress class c's latents in the validation activations (error term kept), then the probe: pixel and patch
    metrics before and after, two seeded controls, a dose-response, and whether the effect is class-specific.
    Writes report.json (and its pictures) per class."""
    from ..core.store import Spec

    settings = config.settings()
    store = storage.store
    codes_key = latest_key(context.instance, "val_codes")
    stats_key = latest_key(context.instance, "latent_stats")
    made_from = store.inputs("val_codes", codes_key)
    if store.inputs("latent_stats", stats_key)["sae_weights"] != made_from["sae_weights"]:
        raise ValueError(f"latent_stats {stats_key} and val_codes {codes_key} were made from different SAEs: "
                         "materialize latent_stats and val_codes again")
    choice_keys = {key: latest_key(context.instance, "class_latents", key) for key in context.partition_keys}
    # Every class is checked before any report is written.
    if stale := [k for k, ck in choice_keys.items() if store.inputs("class_latents", ck, k)["latent_stats"] != stats_key]:
        raise ValueError(f"class_latents of {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''} were chosen from "
                         f"other latent statistics than latent_stats {stats_key}: materialize class_latents again")
    specs = {key: Spec("suppression_report", VERSION, settings.identity(),
                       {"class_latents": choice_keys[key], "val_codes": codes_key, "latent_stats": stats_key})
             for key in context.partition_keys}
    todo = [key for key, spec in specs.items() if not store.exists("suppression_report", spec.key, key)]
    if todo:
        _write_reports(context, storage, settings, {k: specs[k] for k in todo}, made_from)
    for key, spec in specs.items():
        folder = store.open("suppression_report", spec.key, key)
        report = json.loads((folder / REPORT_FILE).read_text())
        context.add_asset_metadata({**artifact_metadata(spec.key, folder, key not in todo),
                                    **_report_metadata(report, folder)}, partition_key=key)


def _write_reports(context, storage: Storage, settings: SuppressionConfig, specs: dict, made_from: dict) -> None:
    """Evaluates the classes of `specs` on the model their shared inputs give, each into its own folder."""
    from ..core.ade20k import class_by_key
    from ..core.cache import CACHE_FOLDER, ActivationCache
    from ..core.store import write_atomic
    from ..core.suppression import evaluate_class, load_model
    from ..core.suppression_report import REPORT_VERSION, json_safe

    store = storage.store
    first = next(iter(specs.values()))
    cache = ActivationCache(store.open("val_activations", made_from["val_activations"]) / CACHE_FOLDER)
    model = load_model(store.open("sae_weights", made_from["sae_weights"]),
                       store.open("probe_checkpoint", made_from["probe_checkpoint"]),
                       store.open("latent_stats", first.inputs["latent_stats"]),
                       store.open("val_codes", first.inputs["val_codes"]), cache)
    for key, spec in specs.items():
        ade_class = class_by_key(key)
        choice = json.loads((store.open("class_latents", spec.inputs["class_latents"], key)
                             / CLASS_LATENTS_FILE).read_text())
        evaluation = evaluate_class(model, ade_class.index, tuple(choice["latents"]), settings)
        report = json_safe({"report_version": REPORT_VERSION, "class_key": key, "class_name": ade_class.name,
                            **evaluation, "selection": {"rule": choice["rule"], "scores": choice["scores"]},
                            "inputs": spec.inputs})
        with store.write(spec, part=key) as work:
            write_atomic(work / REPORT_FILE, json.dumps(report, indent=2).encode())
            if report["status"] == "evaluated":
                write_atomic(work / "examples.png", _examples_png(report, model, cache, settings))
                write_atomic(work / "dose_response.png", _dose_png(report))
        context.log.info(f"{key}: {report['status']}" + (f", specific={report['specific']}"
                                                          if report["status"] == "evaluated" else ""))


def _report_metadata(report: dict, folder) -> dict:
    from ..core.pictures import png_markdown
    from ..core.suppression_report import metric_values, report_markdown

    metadata = {"status": report["status"], "latents": dg.MetadataValue.json(report["latents"]),
                "scale": float(report["scale"]), "mode": report["mode"],
                "specific": bool(report.get("specific", False)),
                "summary": dg.MetadataValue.md(report_markdown(report, report["class_name"]))}
    if report["status"] != "evaluated":
        metadata["reason"] = report["reason"]
        return metadata
    metadata.update(metric_values(report))
    for name in PICTURES:
        png = (folder / f"{name}.png").read_bytes()
        metadata[name] = dg.MetadataValue.md(png_markdown(png, f"{report['class_key']} {name.replace('_', '-')}"))
    return metadata


def _examples_png(report: dict, model, cache, settings: SuppressionConfig) -> bytes:
    """image | baseline prediction | suppressed prediction for the 3 images with the most class-c pixels."""
    from ..core.ade20k import DatasetError, list_split, load_sample
    from ..core.suppression import edit_shift, example_images, example_predictions, latent_edit
    from ..core.suppression_pictures import suppression_examples_png

    c = report["class_index"]
    images = example_images(model, c)
    shift = edit_shift(model, latent_edit(model, tuple(report["latents"]), settings.scale, settings.mode))
    crop = int(cache.attrs["crop_size"])
    before, after = example_predictions(model, shift, images, crop)
    ids = cache.image_ids()
    try:
        samples = {s.image_id: s for s in list_split(cache.attrs.get("dataset_root", ""), "validation")}
        rgb = [load_sample(samples[ids[i]], crop)[0] for i in images]
    except (DatasetError, KeyError, OSError):
        rgb = [None] * len(images)
    captions = [f"{ids[i]} ({int(model.pixels_BC[i, c])} px)" for i in images]
    title = (f"{report['class_key']}: latents {report['latents']} at {settings.scale:g} x max, {settings.mode}")
    return suppression_examples_png(rgb, list(before.numpy()), list(after.numpy()), captions, title)


def _dose_png(report: dict) -> bytes:
    from ..core.suppression_pictures import dose_response_png

    return dose_response_png(report["dose_response"], f"{report['class_key']}: dose-response")


@dg.asset(deps=[dg.AssetKey("suppression_report")], group_name="suppression", kinds={"pandas"},
          backfill_policy=dg.BackfillPolicy.single_run(), automation_condition=DOWNSTREAM_CONDITION)
def suppression_summary(context: dg.AssetExecutionContext, storage: Storage) -> dg.MaterializeResult:
    """All class reports together: a table over the classes present (before, after, controls), pooled figures, the
    per-class change rates against both controls, and the count of class-specific classes per scale and mode."""
    from ..core.store import Spec

    store = storage.store
    codes_key = latest_key(context.instance, "val_codes")
    report_keys = latest_keys(context.instance, "suppression_report")
    current = {c: k for c, k in report_keys.items()
               if store.inputs("suppression_report", k, c)["val_codes"] == codes_key}
    if stale := sorted(set(report_keys) - set(current)):
        context.log.warning(f"left out {len(stale)} report(s) made from other validation codes than val_codes "
                            f"{codes_key}: {', '.join(stale[:10])}")
    spec = Spec("suppression_summary", VERSION, {},
                {"val_codes": codes_key, **{f"suppression_report/{c}": k for c, k in current.items()}})
    reused = store.exists("suppression_summary", spec.key)
    if not reused:
        reports = [json.loads((store.open("suppression_report", k, c) / REPORT_FILE).read_text())
                   for c, k in sorted(current.items())]
        with store.write(spec) as work:
            _write_summary(work, reports, n_stale=len(stale))
    folder = store.open("suppression_summary", spec.key)
    headline = json.loads((folder / "summary.json").read_text())
    pictures = {name: (folder / f"{name}.png").read_bytes() for name in ("change_rates", "specific_per_setting")}
    return dg.MaterializeResult(metadata=_summary_metadata(spec.key, folder, reused, headline, pictures),
                                data_version=dg.DataVersion(spec.key))


def _write_summary(folder, reports: list[dict], n_stale: int) -> None:
    """summary.csv, dose_response.csv, specific_counts.csv, summary.json and two pictures."""
    from ..core.store import write_atomic
    from ..core.suppression_pictures import change_rates_png, specific_counts_png
    from ..core.suppression_report import best_setting, dose_table, specific_counts, summary_table

    table, dose = summary_table(reports), dose_table(reports)
    counts = specific_counts(dose)
    best_mode, best_scale, n_best = best_setting(counts)
    settings = sorted({(r["mode"], r["scale"]) for r in reports if r["status"] == "evaluated"})
    write_atomic(folder / "summary.csv", table.to_csv(index=False).encode())
    write_atomic(folder / "dose_response.csv", dose.to_csv(index=False).encode())
    write_atomic(folder / "specific_counts.csv", counts.to_csv(index=False).encode())
    pooled = {f"mean_{c}": float(table[c].mean()) if len(table) else float("nan")
              for c in ("target_change_rate", "other_change_rate", "random_latents_target_change_rate",
                        "random_direction_target_change_rate", "target_iou_before", "target_iou_after")}
    label = ", ".join(f"{m} {s:g}" for m, s in settings) or "none"
    headline = {"n_classes_evaluated": len(table), "n_specific": int(table["specific"].sum()) if len(table) else 0,
                "best_scale": best_scale, "best_mode": best_mode, "n_specific_best": n_best,
                "configured_setting": label,
                "n_absent_from_validation": sum(r["status"] == "absent_from_validation" for r in reports),
                "n_without_latents": sum(r["status"] == "no_latents" for r in reports), "n_stale": n_stale,
                **pooled}
    write_atomic(folder / "summary.json", json.dumps(headline, indent=2).encode())
    rates = change_rates_png(table["class_key"].tolist(), table["target_change_rate"].tolist(),
                             table["other_change_rate"].tolist(), table["random_latents_target_change_rate"].tolist(),
                             table["random_direction_target_change_rate"].tolist(), table["specific"].tolist(),
                             f"change rates per class ({label})")
    write_atomic(folder / "change_rates.png", rates)
    write_atomic(folder / "specific_per_setting.png",
                 specific_counts_png(counts.to_dict(orient="records"), len(table), "class-specific classes"))


def _summary_metadata(key: str, folder, reused: bool, headline: dict, pictures: dict[str, bytes]) -> dict:
    import pandas as pd

    from ..core.pictures import png_markdown
    from ..core.tables import markdown_table

    table = pd.read_csv(folder / "summary.csv")
    counts = pd.read_csv(folder / "specific_counts.csv")
    preview = ["class_key", "latents", "target_change_rate", "other_change_rate", "random_latents_target_change_rate",
               "random_direction_target_change_rate", "target_iou_before", "target_iou_after", "specific"]
    return {**artifact_metadata(key, folder, reused), **headline,
            "preview": dg.MetadataValue.md(markdown_table(table, preview)),
            "specific_counts": dg.MetadataValue.md(markdown_table(counts)),
            "change_rates": dg.MetadataValue.md(png_markdown(pictures["change_rates"], "change rates per class")),
            "specific_per_setting": dg.MetadataValue.md(png_markdown(pictures["specific_per_setting"],
                                                                     "class-specific classes per setting"))}
