"""`suppression_report[c]`: suppress class c's latents, measure the probe with controls, a tuned setting and a
dose-response; report.json and its pictures per class."""

import json

import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..config import launchpad_config
from ..core.settings import SuppressionSettings
from ..partitions import CLASS_BACKFILL_POLICY, class_partitions
from ..recipe import Recipe, stage
from ..resources import Compute, Storage
from .latents import CLASS_LATENTS_FILE

REPORT_FILE = "report.json"
# PNG files beside a class's report, shown in its metadata
PICTURES = ("examples", "tradeoff", "dose_response", "latent_count")

SuppressionReportConfig = launchpad_config("SuppressionReportConfig", SuppressionSettings,
                                           fixed={"mechanism": "shortcut"})
PropagatedReportConfig = launchpad_config("PropagatedReportConfig", SuppressionSettings,
                                          fixed={"mechanism": "propagate"})
STUDY_INPUTS = ("class_latents", "val_codes", "tuning_codes", "latent_stats")
STUDY_WRITERS = ("report.results", "study.examples", "report.study_pictures")


@dg.asset(deps=stage("suppression_report", reads=STUDY_INPUTS, writes=STUDY_WRITERS),
          partitions_def=class_partitions, backfill_policy=CLASS_BACKFILL_POLICY, pool="gpu", group_name="suppression",
          kinds={"json"}, automation_condition=DOWNSTREAM_CONDITION)
def suppression_report(context: dg.AssetExecutionContext, config: SuppressionReportConfig,
                       storage: Storage, compute: Compute) -> None:
    """Suppress class c's latents in the validation activations (error term kept), then read the probe: the
    configured setting, and one tuned on held-out training images (rule, number of latents, mode, scale), each
    measured once on validation with controls, 95% bootstrap intervals and the TPP score; a latent-count sweep.
    Mechanism "shortcut": the probe reads the SAE's layer, so the edit is taken straight into its logits.
    Writes report.json (and its pictures) per class."""
    _class_reports(context, config.settings(), storage, compute)


@dg.asset(deps=stage("propagated_report", reads=(*STUDY_INPUTS, "final_probe_checkpoint"),
                     writes=(*STUDY_WRITERS, "data.tail")),
          partitions_def=class_partitions, backfill_policy=CLASS_BACKFILL_POLICY, pool="gpu", group_name="suppression",
          kinds={"json", "pytorch"}, automation_condition=DOWNSTREAM_CONDITION)
def propagated_report(context: dg.AssetExecutionContext, config: PropagatedReportConfig,
                      storage: Storage, compute: Compute) -> None:
    """The suppression study under mechanism "propagate": the same edit at the SAE's layer (error term kept), then
    the rest of the ViT (the later blocks and the final norm, loaded from the backbone the caches were recorded
    with; CLS and registers carried unedited) on every image the edit reaches, then the probe on the final layer
    (final_probe_checkpoint). The configured and the tuned setting with controls, 95% intervals and TPP; tuning on
    the held-out training images over a smaller grid (propagate_*); no validation sweep. report.json per class."""
    _class_reports(context, config.settings(), storage, compute, final_probe=True)


def _class_reports(context, settings: SuppressionSettings, storage: Storage, compute: Compute,
                   final_probe: bool = False) -> None:
    """The reports of the run's classes under `settings.mechanism`, each written unless its key exists: the inputs
    checked to come from one SAE, probe and dataset, every class checked before any report is written."""
    from ..core.data.cache import CACHE_FOLDER, ActivationCache, check_same_dataset
    from ..core.report.results import ClassReport, read_result

    store = storage.store
    recipe = Recipe(context, storage)
    keys = {a: recipe.key_of(a) for a in ("val_codes", "tuning_codes", "latent_stats")}
    made_from = store.inputs("val_codes", keys["val_codes"])
    tuning_from = store.inputs("tuning_codes", keys["tuning_codes"])
    stats_from = store.inputs("latent_stats", keys["latent_stats"])
    if not made_from["sae_weights"] == tuning_from["sae_weights"] == stats_from["sae_weights"]:
        raise ValueError(f"val_codes {keys['val_codes']}, tuning_codes {keys['tuning_codes']} and latent_stats "
                         f"{keys['latent_stats']} were made from different SAEs: materialize them again")
    if made_from["probe_checkpoint"] != tuning_from["probe_checkpoint"]:
        raise ValueError(f"val_codes {keys['val_codes']} and tuning_codes {keys['tuning_codes']} were made from "
                         "different probes: materialize them again")
    check_same_dataset(*(ActivationCache(store.open(asset, key) / CACHE_FOLDER) for asset, key in (
        ("train_activations", stats_from["train_activations"]), ("val_activations", made_from["val_activations"]))))
    probe_key = made_from["probe_checkpoint"]
    if final_probe:
        probe_key = recipe.key_of("final_probe_checkpoint")
        if store.inputs("final_probe_checkpoint", probe_key)["train_activations"] != tuning_from["train_activations"]:
            raise ValueError(f"final_probe_checkpoint {probe_key} was trained on another training cache than "
                             f"tuning_codes {keys['tuning_codes']} reads: materialize them again")
    choice_keys = {key: recipe.key_of("class_latents", key) for key in context.partition_keys}
    # Every class is checked before any report is written.
    expected = {"latent_stats": keys["latent_stats"], "probe_checkpoint": made_from["probe_checkpoint"]}
    if stale := [k for k, ck in choice_keys.items() if store.inputs("class_latents", ck, k) != expected]:
        raise ValueError(f"class_latents of {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''} were chosen from "
                         f"other latent statistics or another probe than latent_stats {keys['latent_stats']} and "
                         f"probe_checkpoint {made_from['probe_checkpoint']}: materialize class_latents again")
    outputs = {key: recipe.output(settings.identity(), {"class_latents": choice_keys[key]}, part=key)
               for key in context.partition_keys}
    if todo := {key: out for key, out in outputs.items() if not out.reused}:
        _write_reports(context, storage, settings, todo, made_from, tuning_from, probe_key, compute)
    for key, out in outputs.items():
        out.record(_report_metadata(read_result(out.folder / REPORT_FILE, ClassReport), out.folder))


def _write_reports(context, storage: Storage, settings: SuppressionSettings, outputs: dict, made_from: dict,
                   tuning_from: dict, probe_key: str, compute: Compute) -> None:
    """Studies the classes of `outputs` on the models their shared inputs give (under propagate, with the backbone's
    tail after the caches' layer, loaded from the backbone they were recorded with, on the compute device), in the
    compute resource's worker processes side by side, each into its own folder as soon as it is done."""
    import time
    from dataclasses import replace

    from ..core.data.ade20k import class_by_key
    from ..core.data.cache import CACHE_FOLDER, ActivationCache
    from ..core.report.results import write_result
    from ..core.study.examples import validation_crops
    from ..core.study.model import load_model
    from ..core.study.workers import study_classes

    store = storage.store
    first = next(iter(outputs.values())).spec
    cache = ActivationCache(store.open("val_activations", made_from["val_activations"]) / CACHE_FOLDER)
    folders = {a: store.open(a, first.inputs[a]) for a in ("val_codes", "tuning_codes", "latent_stats")}
    train = ActivationCache(store.open("train_activations", tuning_from["train_activations"]) / CACHE_FOLDER)
    tail = None
    if settings.mechanism == "propagate":
        from ..core.data.backbone import load_backbone
        from ..core.data.tail import BackboneTail

        source, layer = str(cache.attrs["backbone_source"]), int(cache.attrs["layer"])
        tail = BackboneTail.of(load_backbone(source, storage.root, compute.device), layer)
        context.log.info(f"propagating through {tail.n_blocks} block(s) after block {layer} of {source} and its "
                         f"final norm ({cache.attrs.get('final_norm')}) on {compute.device}")
    sae_folder, probe_folder = store.open("sae_weights", made_from["sae_weights"]), store.open(
        "probe_checkpoint" if tail is None else "final_probe_checkpoint", probe_key)
    start = time.perf_counter()
    model = load_model(sae_folder, probe_folder, folders["latent_stats"], folders["val_codes"], cache, tail=tail)
    tuning = load_model(sae_folder, probe_folder, folders["latent_stats"], folders["tuning_codes"], train,
                        pixel=False, tail=tail)
    context.log.info(f"shared models ({settings.mechanism}) loaded in {time.perf_counter() - start:.1f} s")
    workers = min(compute.workers(), len(outputs))
    context.log.info(f"tuning on {tuning.n_images} held-out training images, evaluating on {model.n_images} "
                     f"validation images; {len(outputs)} classes in {workers} process{'es' if workers > 1 else ''}")
    load_rgb = validation_crops(cache.attrs.get("dataset_root", ""), int(cache.attrs["crop_size"]), context.log.warning)
    jobs = [(class_by_key(key).index, *_choice(store.open("class_latents", out.spec.inputs["class_latents"], key)))
            for key, out in outputs.items()]
    start = time.perf_counter()
    for done, ((key, out), (report, seconds)) in enumerate(zip(outputs.items(), study_classes(
            model, tuning, jobs, settings, workers)), 1):
        report = replace(report, inputs=out.spec.inputs)
        with out.write() as work:
            write_result(work / REPORT_FILE, report)
            if report.evaluated:
                _write_pictures(work, report, model, cache, load_rgb, settings)
        elapsed = time.perf_counter() - start
        context.log.info(f"{key}: {report.status}" + (f", specific={report.specific}" if report.evaluated else "")
                         + f" (studied in {seconds:.1f} s; {done}/{len(outputs)} after {elapsed:.0f} s)")


def _choice(folder):
    """The class's selection and every rule's ranking, from its class_latents.json."""
    from ..core.report.results import Selection

    choice = json.loads((folder / CLASS_LATENTS_FILE).read_text())
    rankings = {rule: tuple(r["latents"]) for rule, r in choice.get("rankings", {}).items()}
    return Selection(choice["rule"], tuple(choice["latents"]), tuple(choice["scores"])), rankings


def _write_pictures(work, report, model, cache, load_rgb, settings: SuppressionSettings) -> None:
    """examples.npz and the class's pictures: examples (ground truth, baseline, the configured and the tuned
    suppression), dose-response at the configured number of latents, the latent-count sweep, the trade-off of every
    validation setting."""
    from ..core.report.study_pictures import (
        dose_response_png,
        examples_png,
        latent_count_png,
        tradeoff_png,
    )
    from ..core.report.text import example_words
    from ..core.store.artifacts import write_atomic
    from ..core.study.examples import class_examples, save_examples

    key, setting = report.class_key, report.setting
    runs = {"configured": report.configured, **({"tuned": report.tuned} if report.tuned is not None else {})}
    arrays = class_examples(model, report.class_index, runs, cache.image_ids(), int(cache.attrs["crop_size"]),
                            load_rgb)
    save_examples(work, arrays)
    write_atomic(work / "examples.png", examples_png(arrays, key, example_words(report)))
    if not report.dose_response:  # under propagate there is no validation sweep
        return
    configured = [r for r in report.dose_response if r.setting.n_latents == setting.n_latents]
    write_atomic(work / "dose_response.png", dose_response_png(
        configured, f"{key}: dose-response, top {setting.n_latents} latents by {setting.rule} (validation)"))
    write_atomic(work / "latent_count.png", latent_count_png(
        list(report.dose_response), settings.scale, f"{key}: latent-count sweep ({setting.rule})"))
    write_atomic(work / "tradeoff.png", tradeoff_png(
        list(report.dose_response), {name: measured.patch for name, measured in runs.items()}, settings,
        f"{key}: what each validation setting costs ({setting.rule} ranking)"))


def _report_metadata(report, folder) -> dict:
    """The class's sentence first, its pictures and account, then every figure of its summary row (or, for a class not
    evaluated, its configured setting)."""
    from ..core.report.mechanisms import mechanism_note
    from ..core.report.pictures import png_markdown
    from ..core.report.records import flat
    from ..core.report.study_pictures import example_rows, legend_classes
    from ..core.report.summary import summary_rows
    from ..core.report.text import SWEEP_MARK, class_sentence, example_words, report_markdown
    from ..core.study.examples import load_examples

    sentence, details = (report_markdown(report).split("\n", 1) + [""])[:2]
    settings, sweep = details.split(SWEEP_MARK, 1) if SWEEP_MARK in details else (details, "")
    # The sentence, then one table of both settings with their controls and intervals.
    metadata = {"result": dg.MetadataValue.text(class_sentence(report))}
    if settings.strip():
        metadata["summary"] = dg.MetadataValue.md(settings.strip())
    metadata["mechanism"] = dg.MetadataValue.text(mechanism_note(report.config.mechanism))
    metadata.update({"status": report.status, "specific": report.specific,
                     "specificity_rule": dg.MetadataValue.text(report.specificity_rule)})
    if report.evaluated:
        legend = legend_classes(*example_rows(load_examples(folder), example_words(report)))
        metadata["legend"] = dg.MetadataValue.text("colours: " + ", ".join(text for _, text in legend))
        for name in (name for name in PICTURES if (folder / f"{name}.png").exists()):
            png = (folder / f"{name}.png").read_bytes()
            metadata[name] = dg.MetadataValue.md(png_markdown(png, f"{report.class_key} {name.replace('_', '-')}"))
        figures = flat(summary_rows([report])[0])
    else:
        metadata["reason"] = report.reason
        figures = {**flat(report.setting), "latents": list(report.selection.latents)}
    if sweep:
        metadata["sweep"] = dg.MetadataValue.md(SWEEP_MARK + sweep)
    # Intervals are in the summary table, the verdicts per resample feed the summary's count intervals (a thousand
    # characters unbroken would widen the UI's table to 8,000 px); the files keep them all.
    return {**metadata, **{name: value for name, value in figures.items()
                           if value is not None and "_ci_" not in name and not name.endswith("specific_resamples")}}
