"""`probe_checkpoint` (the linear segmentation probe: a sweep trained on the training activations, or imported) and
`baseline_metrics` (its per-class pixel metrics on the validation activations, the reference for suppression)."""

import hashlib
import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from ..resources import Backbone, Checkpoints, Storage

BASELINE_TABLE = "baseline_metrics.csv"
BASELINE_SUMMARY = "baseline_metrics.json"


class ProbeConfig(dg.Config):
    """Hyperparameters of the probe sweep; the defaults are the original experiment's grid."""

    lrs: list[float] = Field(default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                             description="AdamW learning rates; one head per (lr, weight decay) pair.")
    weight_decays: list[float] = Field(default=[1e-1, 1e-3, 1e-5], description="AdamW (decoupled) weight decays.")
    epochs: int = Field(default=10, description="Passes over the training images (held-out chunks excluded).")
    batch_size: int = Field(default=1024, description="Patch tokens per optimizer step, shared by all heads.")
    held_out_fraction: float = Field(
        default=0.2, description="Share of the training cache's chunks held out to select the head by pixel mIoU "
        "(validation is never used for training or selection).")
    seed: int = Field(default=0, description="Seed of the held-out draw and the token shuffling.")
    target: str = Field(
        default="soft", description="'soft': each patch's pixel-label shares (per-pixel cross-entropy of "
        "nearest-upsampled logits); 'majority': the patch's majority label. Label 0 is ignored either way.")
    device: str = Field(default="", description="Training device; empty: the backbone resource's (SAESEG_DEVICE).")
    import_path: str = Field(
        default="", description="Import this probe instead of training one; overrides the checkpoints resource "
        "(SAESEG_PROBE_CHECKPOINT). A folder or probe.safetensors/.json (ours), or a reference .pt file.")


@dg.asset(group_name="probe", kinds={"pytorch", "safetensors"}, deps=["train_activations"])
def probe_checkpoint(context: dg.AssetExecutionContext, config: ProbeConfig, storage: Storage,
                     checkpoints: Checkpoints, backbone: Backbone) -> dg.MaterializeResult:
    """Linear probe Linear(d_model, 151) on patch activations: `probe/probe.safetensors` + `probe/probe.json`.

    Trained by an lr x weight-decay sweep on the training cache (all heads share each batch) and selected by pixel
    mIoU on held-out training images; reused when the same config already ran on the same cache; or imported.
    """
    from ..core.cache import ActivationCache
    from ..core.probe import (Probe, SweepConfig, check_d_model, find_reusable, load_probe, save_probe,
                              train_sweep)

    cache = ActivationCache(storage.cache_path("training"))
    folder = storage.path("probe")
    from ..automation import checkpoint_to_import

    source = checkpoint_to_import("probe", storage, config.import_path or checkpoints.probe)
    reused = False
    if source:
        imported = load_probe(source)
        check_d_model(imported, cache, source)
        origin = str(Path(source).expanduser().resolve())
        context.log.info(f"importing the probe from {origin}")
        meta = {**imported.meta, "source": "imported", "imported_from": origin}
        weights = save_probe(folder, Probe(imported.weight_CD, imported.bias_C, meta))
    else:
        sweep = SweepConfig(lrs=tuple(config.lrs), weight_decays=tuple(config.weight_decays), epochs=config.epochs,
                            batch_size=config.batch_size, held_out_fraction=config.held_out_fraction,
                            seed=config.seed, target=config.target, device=config.device or backbone.device)
        weights = folder / "probe.safetensors"
        reused = find_reusable(folder, sweep.training_key(cache.fingerprint)) is not None
        if reused:
            context.log.info(f"reusing {weights}: trained with the same settings on the same training cache")
        else:
            weights = save_probe(folder, train_sweep(cache, sweep, log=context.log.info).probe)
    probe = load_probe(folder)
    return dg.MaterializeResult(metadata=_probe_metadata(probe.meta, weights, reused),
                                data_version=dg.DataVersion(_sha256(weights)))


@dg.asset(group_name="probe", kinds={"pytorch", "pandas"}, deps=["probe_checkpoint", "val_activations"])
def baseline_metrics(context: dg.AssetExecutionContext, storage: Storage, backbone: Backbone) -> dg.MaterializeResult:
    """The probe on the validation activations, pixel level (bilinear upsampling, argmax over 1..150, label 0
    ignored): `baseline/baseline_metrics.csv`, one row per class present or predicted (columns in the README)."""
    from ..core.cache import ActivationCache
    from ..core.checkpoints import write_atomic
    from ..core.pictures import class_iou_bars_png, png_markdown
    from ..core.probe import baseline_table, check_d_model, evaluate_probe, load_probe, summary

    cache = ActivationCache(storage.cache_path("validation"))
    probe_folder = storage.path("probe")
    probe = load_probe(probe_folder)
    check_d_model(probe, cache, probe_folder)
    evaluation = evaluate_probe(cache, probe, backbone.device)
    table = baseline_table(evaluation)
    overall = summary(evaluation)
    probe_hash = _sha256(probe_folder / "probe.safetensors")
    out = storage.path("baseline")
    write_atomic(out / BASELINE_TABLE, table.to_csv(index=False).encode())
    write_atomic(out / BASELINE_SUMMARY, json.dumps(
        {**overall, "probe_sha256": probe_hash, "val_cache": {"path": str(cache.path), "fingerprint": cache.fingerprint},
         "table": BASELINE_TABLE}, indent=2).encode())
    present = table[table["present"]]
    context.log.info(f"baseline mIoU {overall['miou']:.3f} over {overall['n_classes_present']} classes")
    chart = class_iou_bars_png([f"{k}" for k in present["class_key"]], present["iou"].tolist(),
                               title=f"baseline IoU per class (mIoU {overall['miou']:.3f})")
    columns = ["class_key", "iou", "accuracy", "precision", "gt_pixels", "pred_pixels", "patch_accuracy"]
    return dg.MaterializeResult(
        metadata={
            "miou": overall["miou"],
            "pixel_accuracy": overall["pixel_accuracy"],
            "n_classes_present": overall["n_classes_present"],
            "patch_miou": overall["patch_miou"],
            "patch_accuracy": overall["patch_accuracy"],
            "n_predicted_absent": int((~table["present"]).sum()),
            "classes": dg.MetadataValue.md(_markdown_table(present[columns].to_dict(orient="records"))),
            "iou_chart": dg.MetadataValue.md(png_markdown(chart, "per-class IoU")),
            "path": dg.MetadataValue.path(str(out / BASELINE_TABLE)),
            "val_fingerprint": cache.fingerprint,
        },
        data_version=dg.DataVersion(hashlib.sha256(f"{probe_hash}:{cache.fingerprint}".encode()).hexdigest()[:16]),
    )


def _probe_metadata(meta: dict, weights: Path, reused: bool) -> dict:
    from ..core.pictures import png_markdown, sweep_heatmap_png

    metadata: dict = {"source": meta.get("source", "unknown"), "reused": reused,
                      "path": dg.MetadataValue.path(str(weights)), "d_model": int(meta.get("d_model", 0))}
    for key in ("lr", "weight_decay", "selection_miou", "seconds"):
        if isinstance(meta.get(key), (int, float)):  # an imported reference probe knows none of these
            metadata[key] = float(meta[key])
    if "imported_from" in meta:
        metadata["imported_from"] = dg.MetadataValue.path(meta["imported_from"])
    sweep = meta.get("sweep") or []
    if sweep:
        columns = ["lr", "weight_decay", "selection_miou", "selection_pixel_accuracy", "train_loss", "selected"]
        metadata["sweep"] = dg.MetadataValue.md(_markdown_table([{c: row.get(c) for c in columns} for row in sweep]))
        lrs = sorted({row["lr"] for row in sweep})
        wds = sorted({row["weight_decay"] for row in sweep}, reverse=True)
        score = {(row["lr"], row["weight_decay"]): row["selection_miou"] for row in sweep}
        grid = [[score.get((lr, wd), float("nan")) for wd in wds] for lr in lrs]
        metadata["sweep_heatmap"] = dg.MetadataValue.md(png_markdown(sweep_heatmap_png(lrs, wds, grid), "sweep"))
    if "train_cache" in meta:
        metadata["train_fingerprint"] = meta["train_cache"].get("fingerprint", "")
    return metadata


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(empty)"
    columns = list(rows[0])

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
