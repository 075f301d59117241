"""`val_codes` (validation work shared by all classes), `suppression_report[c]` (suppress class c's latents, measure
the probe with controls and a dose-response; suppression/<class_key>.json) and `suppression_summary` (all classes)."""

import hashlib
import json
import warnings

import dagster as dg
from pydantic import Field

from ..core.suppression_config import MODES, SuppressionConfig
from ..partitions import class_partitions
from ..resources import Backbone, Storage

# Single-run backfills are what `--partition-range` needs; the beta notice would print at every definitions load.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

CODES_FOLDER = "val_codes"
REPORTS_FOLDER = "suppression"
SUMMARY_FOLDER = "suppression_summary"
_DEFAULT = SuppressionConfig()


@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("probe_checkpoint"), dg.AssetKey("val_activations")],
          group_name="suppression", kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run())
def val_codes(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone) -> dg.MaterializeResult:
    """The SAE's codes of every validation token stored per latent (CSC), and the probe's baseline logits and pixel
    predictions: one SAE pass for all 150 classes; each class then reads only its own latents' columns."""
    from ..core.cache import ActivationCache
    from ..core.probe import load_probe
    from ..core.sae import load_sae
    from ..core.val_codes import compute_val_codes, load_val_codes, save_val_codes

    sae, sae_meta = load_sae(storage.path("sae"))
    probe = load_probe(storage.path("probe"))
    cache = ActivationCache(storage.cache_path("validation"))
    provenance = {"sae_sha256": sae_meta.get("weights_sha256", ""), "probe_sha256": _sha256(storage.path("probe",
                  "probe.safetensors")), "val_fingerprint": cache.fingerprint}
    folder = storage.path(CODES_FOLDER)
    try:
        existing = load_val_codes(folder)
        reused = all(existing.meta.get(k) == v for k, v in provenance.items())
    except Exception:  # missing or unreadable: compute afresh
        existing, reused = None, False
    if reused:
        codes = existing
        context.log.info(f"reusing {folder}: same SAE, probe and validation cache")
    else:
        codes = compute_val_codes(sae, probe, cache, backbone.device, log=context.log.info)
        save_val_codes(folder, codes, provenance)
    return dg.MaterializeResult(
        metadata={"n_tokens": codes.n_tokens, "nonzero_codes": len(codes.values_M),
                  "codes_per_token": len(codes.values_M) / max(codes.n_tokens, 1), "reused": reused,
                  "path": dg.MetadataValue.path(str(folder / "val_codes.safetensors"))},
        data_version=dg.DataVersion(hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]),
    )


class SuppressionReportConfig(dg.Config):
    """The configured setting, controls, dose-response sweep and the class-specificity thresholds."""

    scale: float = Field(default=_DEFAULT.scale, description="v_i = scale x max activation of latent i (training "
                         "tokens); -2 was the original plan, 0 is plain ablation.")
    mode: str = Field(default=_DEFAULT.mode, description=f"One of {MODES}: 'every_token' sets v_i on every token "
                      "(the original work); 'where_active' only on tokens where a chosen latent fires.")
    control_seeds: int = Field(default=_DEFAULT.control_seeds, description="Draws of each control, averaged.")
    seed: int = Field(default=_DEFAULT.seed, description="Seed of the controls (each class draws its own stream).")
    dose_scales: list[float] = Field(default=list(_DEFAULT.dose_scales), description="Scales of the dose-response.")
    dose_modes: list[str] = Field(default=list(_DEFAULT.dose_modes), description="Modes of the dose-response.")
    frequency_pool: int = Field(default=_DEFAULT.frequency_pool, description="A random-latent control draws among "
                                "this many latents nearest in firing frequency to each chosen one.")
    min_target_change: float = Field(default=_DEFAULT.min_target_change, description="Class-specific: target "
                                     "change rate at least this ...")
    other_factor: float = Field(default=_DEFAULT.other_factor, description="... and this times the other change rate")
    control_factor: float = Field(default=_DEFAULT.control_factor, description="... and this times the larger "
                                  "control target change rate.")

    def settings(self) -> SuppressionConfig:
        fields = SuppressionConfig.__dataclass_fields__
        values = {name: getattr(self, name) for name in fields}
        return SuppressionConfig(**{**values, "dose_scales": tuple(self.dose_scales),
                                    "dose_modes": tuple(self.dose_modes)})


@dg.asset(partitions_def=class_partitions, backfill_policy=dg.BackfillPolicy.single_run(),
          deps=[dg.AssetKey("class_latents"), dg.AssetKey("val_codes"), dg.AssetKey("latent_stats"),
                dg.AssetKey("baseline_metrics")], group_name="suppression", kinds={"json"})
def suppression_report(context: dg.AssetExecutionContext, config: SuppressionReportConfig,
                       storage: Storage) -> None:
    """Suppress class c's latents in the validation activations (error term kept), then the probe: pixel and patch
    metrics before and after, two seeded controls, a dose-response, and whether the effect is class-specific.
    Writes `suppression/<class_key>.json` per class."""
    from ..core.ade20k import class_by_key
    from ..core.cache import ActivationCache
    from ..core.checkpoints import write_atomic
    from ..core.suppression import evaluate_class, load_model
    from ..core.suppression_report import REPORT_VERSION, json_safe, report_path

    settings = config.settings()
    cache = ActivationCache(storage.cache_path("validation"))
    choices = {key: _class_choice(storage, key) for key in context.partition_keys}
    model = load_model(storage.path("sae"), storage.path("probe"), storage.path("latent_stats"),
                       storage.path(CODES_FOLDER), cache)
    inputs = {k: model.codes.meta.get(k) for k in ("sae_sha256", "probe_sha256", "val_fingerprint")}
    # Every class is checked before any report is written: a failed run leaves the previous reports intact.
    if stale := [k for k, c in choices.items() if c["latent_stats"].get("sae_sha256") != inputs["sae_sha256"]]:
        raise ValueError(f"class_latents of {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''} were chosen for "
                         f"another SAE than the one in {storage.path('sae')}: materialize class_latents again")
    for key in context.partition_keys:
        ade_class = class_by_key(key)
        choice = choices[key]
        evaluation = evaluate_class(model, ade_class.index, tuple(choice["latents"]), settings)
        report = json_safe({"report_version": REPORT_VERSION, "class_key": key, "class_name": ade_class.name,
                            **evaluation, "selection": {"rule": choice["rule"], "scores": choice["scores"]},
                            "inputs": inputs})
        write_atomic(report_path(storage.path(REPORTS_FOLDER), key), json.dumps(report, indent=2).encode())
        context.add_asset_metadata(_report_metadata(report, model, cache, settings, storage), partition_key=key)
        context.log.info(f"{key}: {report['status']}" + (f", specific={report['specific']}"
                                                          if report["status"] == "evaluated" else ""))


def _class_choice(storage: Storage, key: str) -> dict:
    path = storage.path("class_latents", f"{key}.json")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no latents chosen for {key}; materialize class_latents for it first")
    return json.loads(path.read_text())


def _report_metadata(report: dict, model, cache, settings: SuppressionConfig, storage: Storage) -> dict:
    from ..core.pictures import png_markdown
    from ..core.suppression_report import metric_values, report_markdown

    path = storage.path(REPORTS_FOLDER, f"{report['class_key']}.json")
    metadata = {"status": report["status"], "latents": dg.MetadataValue.json(report["latents"]),
                "scale": float(settings.scale), "mode": settings.mode,
                "specific": bool(report.get("specific", False)),
                "summary": dg.MetadataValue.md(report_markdown(report, report["class_name"])),
                "path": dg.MetadataValue.path(str(path))}
    if report["status"] != "evaluated":
        metadata["reason"] = report["reason"]
        return metadata
    metadata.update(metric_values(report))
    metadata["examples"] = dg.MetadataValue.md(png_markdown(_examples_png(report, model, cache, settings),
                                                            f"{report['class_key']} examples"))
    metadata["dose_response"] = dg.MetadataValue.md(png_markdown(_dose_png(report), "dose-response"))
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
          backfill_policy=dg.BackfillPolicy.single_run())
def suppression_summary(context: dg.AssetExecutionContext, storage: Storage) -> dg.MaterializeResult:
    """All class reports together: a table over the classes present (before, after, controls), pooled figures, the
    per-class change rates against both controls, and the count of class-specific classes per scale and mode."""
    from ..core.checkpoints import write_atomic
    from ..core.pictures import png_markdown
    from ..core.suppression_pictures import change_rates_png, specific_counts_png
    from ..core.suppression_report import (best_setting, dose_table, read_reports, specific_counts, summary_table,
                                           table_markdown)
    from ..core.val_codes import load_val_codes

    codes_meta = load_val_codes(storage.path(CODES_FOLDER)).meta
    current = {k: codes_meta.get(k) for k in ("sae_sha256", "probe_sha256", "val_fingerprint")}
    all_reports = read_reports(storage.path(REPORTS_FOLDER))
    reports = [r for r in all_reports if r.get("inputs") == current]
    if stale := [r["class_key"] for r in all_reports if r.get("inputs") != current]:
        context.log.warning(f"left out {len(stale)} report(s) made from other inputs: {', '.join(stale[:10])}")
    table, dose = summary_table(reports), dose_table(reports)
    counts = specific_counts(dose)
    best_mode, best_scale, n_best = best_setting(counts)
    settings = sorted({(r["mode"], r["scale"]) for r in reports if r["status"] == "evaluated"})
    out = storage.path(SUMMARY_FOLDER)
    write_atomic(out / "summary.csv", table.to_csv(index=False).encode())
    write_atomic(out / "dose_response.csv", dose.to_csv(index=False).encode())
    write_atomic(out / "specific_counts.csv", counts.to_csv(index=False).encode())
    pooled = {f"mean_{c}": float(table[c].mean()) if len(table) else float("nan")
              for c in ("target_change_rate", "other_change_rate", "random_latents_target_change_rate",
                        "random_direction_target_change_rate", "target_iou_before", "target_iou_after")}
    headline = {"n_classes_evaluated": len(table), "n_specific": int(table["specific"].sum()) if len(table) else 0,
                "best_scale": best_scale, "best_mode": best_mode, "n_specific_best": n_best,
                "configured_settings": [list(s) for s in settings],
                "n_absent_from_validation": sum(r["status"] == "absent_from_validation" for r in reports),
                "n_without_latents": sum(r["status"] == "no_latents" for r in reports), "n_stale": len(stale),
                **pooled}
    write_atomic(out / "summary.json", json.dumps(headline, indent=2).encode())
    label = ", ".join(f"{m} {s:g}" for m, s in settings) or "none"
    rates = change_rates_png(table["class_key"].tolist(), table["target_change_rate"].tolist(),
                             table["other_change_rate"].tolist(), table["random_latents_target_change_rate"].tolist(),
                             table["random_direction_target_change_rate"].tolist(), table["specific"].tolist(),
                             f"change rates per class ({label})")
    specific = specific_counts_png(counts.to_dict(orient="records"), len(table), "class-specific classes")
    preview = table_markdown(table, ["class_key", "latents", "target_change_rate", "other_change_rate",
                                     "random_latents_target_change_rate", "random_direction_target_change_rate",
                                     "target_iou_before", "target_iou_after", "specific"])
    counts_md = table_markdown(counts, list(counts.columns))
    return dg.MaterializeResult(metadata={
        **{k: v for k, v in headline.items() if k != "configured_settings"},
        "configured_setting": label,
        "preview": dg.MetadataValue.md(preview),
        "specific_counts": dg.MetadataValue.md(counts_md),
        "change_rates": dg.MetadataValue.md(png_markdown(rates, "change rates per class")),
        "specific_per_setting": dg.MetadataValue.md(png_markdown(specific, "class-specific classes per setting")),
        "path": dg.MetadataValue.path(str(out / "summary.csv")),
    })


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
