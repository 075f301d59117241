"""`suppression_report[c]`: suppress class c's latents, measure the probe with controls, a tuned setting and a
dose-response; report.json and its pictures per class."""

import json

import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..config import launchpad_config
from ..core.settings import SuppressionConfig
from ..partitions import CLASS_BACKFILL_POLICY, class_partitions
from ..recipe import artifact_metadata, check_same_dataset, latest_key, readable
from ..resources import Storage
from .latents import CLASS_LATENTS_FILE

# Of the report and summary folders; bump when a change makes old reports or summaries wrong (3: examples.npz, examples
# with ground truth and legend, summary heatmap, gallery and report.html).
REPORTS_VERSION = 3
REPORT_FILE = "report.json"
PICTURES = ("examples", "dose_response", "latent_count")  # PNG files beside a class's report, shown in its metadata

SuppressionReportConfig = launchpad_config("SuppressionReportConfig", SuppressionConfig)


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
    from ..core.store.artifacts import Spec

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
    from ..core.data.ade20k import class_by_key
    from ..core.data.cache import CACHE_FOLDER, ActivationCache
    from ..core.report.study_report import REPORT_VERSION, json_safe
    from ..core.store.artifacts import write_atomic
    from ..core.study.class_study import study_class
    from ..core.study.examples import validation_crops
    from ..core.study.suppression import load_model

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
    from ..core.report.study_pictures import (
        dose_response_png,
        examples_png,
        latent_count_png,
    )
    from ..core.report.study_report import tuned
    from ..core.store.artifacts import write_atomic
    from ..core.study.examples import class_examples, save_examples

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
    from ..core.report.study_report import describe_setting, tuned

    words = {"configured": describe_setting({"rule": report["rule"], "n_latents": len(report["latents"]),
                                             "mode": report["mode"], "scale": report["scale"]})}
    if (part := tuned(report)) is not None:
        words["tuned"] = describe_setting(part["setting"])
    return words


def _report_metadata(report: dict, folder) -> dict:
    from ..core.report.pictures import png_markdown
    from ..core.report.study_pictures import example_rows, legend_classes
    from ..core.report.study_report import (
        class_sentence,
        metric_values,
        report_markdown,
    )
    from ..core.study.examples import load_examples

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


