"""`probe_checkpoint` (the linear segmentation probe: a sweep trained on the training activations, or imported) and
`baseline_metrics` (its per-class pixel metrics on the validation activations, the reference for suppression)."""

import dagster as dg
from pydantic import Field

from ..automation import DOWNSTREAM_CONDITION
from ..config import launchpad_config
from ..core.settings import SweepSettings
from ..recipe import Recipe, checkpoint_import, stage
from ..resources import Checkpoints, Compute, Storage

ProbeConfig = launchpad_config("ProbeConfig", SweepSettings, fixed={"probe_layer": "sae"}, import_path=(str, Field(
    default="", description="Probe checkpoint to import instead of training: a folder or probe.safetensors/.json of "
    "ours, or a reference .pt file. Empty means the checkpoints resource (env SAESEG_PROBE_CHECKPOINT), then the drop "
    "folder data/checkpoints/probe/; where none holds a checkpoint, the probe is trained here. Default: ''.")))


@dg.asset(deps=stage("probe_checkpoint", reads=("train_activations",), writes=("probe.model",)), group_name="probe",
          kinds={"pytorch", "safetensors"}, pool="gpu", backfill_policy=dg.BackfillPolicy.single_run())
def probe_checkpoint(context: dg.AssetExecutionContext, config: ProbeConfig, storage: Storage,
                     checkpoints: Checkpoints, compute: Compute) -> dg.MaterializeResult:
    """Linear probe Linear(d_model, 151) on patch activations: probe.safetensors + probe.json.

    Trained by an lr x weight-decay sweep on the training cache (all heads share each batch) and selected by pixel
    mIoU on held-out training images, or imported; reused when the same settings met the same inputs before.
    """
    from ..core.probe.model import Probe, check_d_model, load_probe, save_probe
    from ..core.probe.sweep import train_sweep

    recipe = Recipe(context, storage)
    _, cache = recipe.cache("train_activations")
    sweep = config.settings()
    with checkpoint_import(recipe, "probe", config.import_path or checkpoints.probe) as (checkpoint, out):
        out = out or recipe.output(sweep.identity())
        if not out.reused:
            with out.write() as work:
                if checkpoint:
                    origin = checkpoint.origin or checkpoint.source
                    # Read, and checked for shapes and finite values, before anything is saved.
                    imported = load_probe(checkpoint.source)
                    check_d_model(imported, cache, origin)
                    context.log.info(f"importing the probe from {origin}")
                    meta = {**imported.meta, "source": "imported", "imported_from": str(origin)}
                    save_probe(work, Probe(imported.weight_CD, imported.bias_C, meta))
                else:
                    save_probe(work, train_sweep(cache, sweep, compute.device, log=context.log.info).probe)
    return out.result(_probe_metadata(load_probe(out.folder).meta))


FinalProbeConfig = launchpad_config("FinalProbeConfig", SweepSettings, fixed={"probe_layer": "final"})


@dg.asset(deps=stage("final_probe_checkpoint", reads=("train_activations",), writes=("probe.model",)),
          group_name="probe", kinds={"pytorch", "safetensors"}, pool="gpu",
          backfill_policy=dg.BackfillPolicy.single_run(), automation_condition=DOWNSTREAM_CONDITION)
def final_probe_checkpoint(context: dg.AssetExecutionContext, config: FinalProbeConfig, storage: Storage,
                           compute: Compute) -> dg.MaterializeResult:
    """The linear probe on the backbone's final patch tokens (the cache's final_tokens; DINOv2: the final LayerNorm of
    the last hidden state, as the paper's demo reads them), trained by the same sweep as probe_checkpoint, the same
    chunks held out: probe.safetensors + probe.json. The propagated suppression study reads it."""
    from ..core.probe.model import load_probe, save_probe
    from ..core.probe.sweep import train_sweep

    recipe = Recipe(context, storage)
    _, cache = recipe.cache("train_activations")
    if not cache.settings.has_tail_tokens:
        raise dg.Failure(f"{cache.path} holds no final patch tokens (recorded without a backbone): a final-layer probe "
                         "needs a cache recorded by train_activations")
    out = recipe.output(config.settings().identity())
    if not out.reused:
        with out.write() as work:
            save_probe(work, train_sweep(cache, config.settings(), compute.device, log=context.log.info).probe)
    return out.result(_probe_metadata(load_probe(out.folder).meta))


@dg.asset(deps=stage("baseline_metrics", reads=("probe_checkpoint", "val_activations"), writes=("probe.evaluation",)),
          group_name="probe", kinds={"pytorch", "pandas"}, pool="gpu", backfill_policy=dg.BackfillPolicy.single_run(),
          automation_condition=DOWNSTREAM_CONDITION)
def baseline_metrics(context: dg.AssetExecutionContext, storage: Storage, compute: Compute) -> dg.MaterializeResult:
    """The probe on the validation activations, pixel level (bilinear upsampling, argmax over 1..150, label 0
    ignored): baseline_metrics.csv, one row per class present or predicted (columns in docs/formats.md)."""
    from ..core.probe.evaluation import evaluate_probe, load_baseline, save_baseline
    from ..core.probe.model import check_d_model, load_probe
    from ..core.report.pictures import class_iou_bars_png, png_markdown
    from ..core.report.tables import markdown_table

    recipe = Recipe(context, storage)
    _, probe_folder = recipe.folder("probe_checkpoint")
    _, cache = recipe.cache("val_activations")
    out = recipe.output({})
    if not out.reused:
        probe = load_probe(probe_folder)
        check_d_model(probe, cache, probe_folder)
        evaluation = evaluate_probe(cache, probe, compute.device)
        with out.write() as work:
            save_baseline(work, evaluation)
    table, overall = load_baseline(out.folder)
    present = table[table["present"]]
    context.log.info(f"baseline mIoU {overall['miou']:.3f} over {overall['n_classes_present']} classes")
    chart = class_iou_bars_png(present["class_key"].tolist(), present["iou"].tolist(),
                               title=f"baseline IoU per class (mIoU {overall['miou']:.3f})")
    columns = ["class_key", "iou", "accuracy", "precision", "gt_pixels", "pred_pixels", "patch_accuracy"]
    return out.result({
        **{name: overall[name] for name in ("miou", "pixel_accuracy", "n_classes_present", "patch_miou",
                                            "patch_accuracy")},
        "n_predicted_absent": int((~table["present"]).sum()),
        "classes": dg.MetadataValue.md(markdown_table(present[columns].to_dict(orient="records"))),
        "iou_chart": dg.MetadataValue.md(png_markdown(chart, "per-class IoU")),
    })


def _probe_metadata(meta: dict) -> dict:
    from ..core.report.pictures import png_markdown, sweep_heatmap_png
    from ..core.report.tables import markdown_table

    metadata: dict = {"source": meta.get("source", "unknown"), "d_model": int(meta.get("d_model", 0))}
    for key in ("lr", "weight_decay", "selection_miou", "seconds"):
        if isinstance(meta.get(key), (int, float)):  # an imported reference probe knows none of these
            metadata[key] = float(meta[key])
    if "imported_from" in meta:
        metadata["imported_from"] = dg.MetadataValue.path(meta["imported_from"])
    sweep = meta.get("sweep") or []
    if sweep:
        columns = ["lr", "weight_decay", "selection_miou", "selection_pixel_accuracy", "train_loss", "selected"]
        metadata["sweep"] = dg.MetadataValue.md(markdown_table([{c: row.get(c) for c in columns} for row in sweep]))
        lrs = sorted({row["lr"] for row in sweep})
        wds = sorted({row["weight_decay"] for row in sweep}, reverse=True)
        score = {(row["lr"], row["weight_decay"]): row["selection_miou"] for row in sweep}
        grid = [[score.get((lr, wd), float("nan")) for wd in wds] for lr in lrs]
        metadata["sweep_heatmap"] = dg.MetadataValue.md(png_markdown(sweep_heatmap_png(lrs, wds, grid), "sweep"))
    return metadata
