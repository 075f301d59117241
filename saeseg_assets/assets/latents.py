"""`latent_stats` (one SAE pass over the training activations: counts, sums, top patches; latent_stats/*) and
`class_latents[c]` (each class's latents by a documented rule, with a patch gallery; class_latents/<class_key>.json)."""

import hashlib
import json
import warnings

import dagster as dg
from pydantic import Field

from ..partitions import class_partitions
from ..resources import Backbone, Storage

# Single-run backfills are what `--partition-range` needs; the beta notice would print at every definitions load.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

STATS_FOLDER = "latent_stats"
CLASS_LATENTS_FOLDER = "class_latents"


class LatentStatsConfig(dg.Config):
    """How the statistics pass runs."""

    purity: float = Field(default=0.9, description="A patch is pure when this share of its pixels carries its "
                          "majority label; the f1 rule scores on pure patches only.")
    top_patches: int = Field(default=8, description="Top-activating training patches kept per latent (galleries).")
    block_images: int = Field(default=16, description="Images encoded per step.")


@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("train_activations")], group_name="suppression",
          kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run())
def latent_stats(context: dg.AssetExecutionContext, config: LatentStatsConfig, storage: Storage,
                 backbone: Backbone) -> dg.MaterializeResult:
    """Per latent: firing frequency, max and mean activation, top training patches; per (class, latent): activation
    sum and firing count over patches of that majority label (all, and pure ones); per class: patch counts."""
    from ..core.cache import ActivationCache
    from ..core.latents import StatsConfig, compute_latent_stats, load_latent_stats, save_latent_stats
    from ..core.sae import load_sae

    sae, sae_meta = load_sae(storage.path("sae"))
    cache = ActivationCache(storage.cache_path("training"))
    provenance = {"sae_sha256": sae_meta.get("weights_sha256", ""), "train_fingerprint": cache.fingerprint,
                  "purity": config.purity, "top_patches": config.top_patches}
    folder = storage.path(STATS_FOLDER)
    stats = _reusable_stats(folder, provenance, load_latent_stats)
    if stats is not None:
        context.log.info(f"reusing {folder}: same SAE, cache and settings")
    else:
        settings = StatsConfig(config.purity, config.top_patches, config.block_images, backbone.device)
        stats = compute_latent_stats(sae, cache, settings, log=context.log.info)
        save_latent_stats(folder, stats, provenance)
    freq = stats.frequency_S
    present = [int(c) for c in (stats.class_patches_C[1:] > 0).nonzero()[0] + 1]
    version = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    return dg.MaterializeResult(
        metadata={
            "n_tokens": stats.n_tokens,
            "d_sae": stats.d_sae,
            "dead_fraction": float((stats.fire_count_S == 0).mean()),
            "dense_fraction": float((freq >= 1e-2).mean()),
            "median_frequency_of_live": float(_median(freq[freq > 0])),
            "classes_in_training": len(present),
            "pure_patch_fraction": float(stats.pure_patches_C.sum() / max(stats.n_tokens, 1)),
            "path": dg.MetadataValue.path(str(folder / "latent_stats.safetensors")),
        },
        data_version=dg.DataVersion(version),
    )


def _reusable_stats(folder, provenance: dict, load):
    try:
        stats = load(folder)
    except Exception:  # missing or unreadable: compute afresh
        return None
    return stats if all(stats.meta.get(k) == v for k, v in provenance.items()) else None


def _median(values) -> float:
    import numpy as np

    return float(np.median(values)) if len(values) else float("nan")


class ClassLatentsConfig(dg.Config):
    """How each class's latents are chosen from `latent_stats`."""

    rule: str = Field(default="f1", description="'f1' (default): F1 of 'latent fires' against 'patch is class c' "
                      "over pure training patches; 'activation_sum': sum of activations over class-c patches after "
                      "dropping dense latents. On the embedded data f1's latents fire on far more held-out class-c "
                      "patches (README, 'Choosing class latents').")
    k: int = Field(default=3, description="Latents kept per class.")
    dense_frequency: float = Field(default=1e-2, description="'activation_sum' drops latents firing on at least "
                                   "this share of training tokens.")
    gallery_patches: int = Field(default=6, description="Top-activating training patches shown per latent.")


@dg.asset(partitions_def=class_partitions, backfill_policy=dg.BackfillPolicy.single_run(),
          deps=[dg.AssetKey("latent_stats")], group_name="suppression", kinds={"json"})
def class_latents(context: dg.AssetExecutionContext, config: ClassLatentsConfig, storage: Storage) -> None:
    """The top-k latents of each class by the configured rule: `class_latents/<class_key>.json` (latent ids, scores,
    frequencies, max activations); an absent class gets an empty mapping and the reason."""
    from ..core.ade20k import class_by_key
    from ..core.checkpoints import write_atomic
    from ..core.latents import SelectionConfig, class_latents_record, load_latent_stats, select_class_latents
    from ..core.latents import top_patches
    from ..core.pictures import png_markdown
    from ..core.suppression_pictures import class_gallery_png

    stats = load_latent_stats(storage.path(STATS_FOLDER))
    selection = SelectionConfig(rule=config.rule, k=config.k, dense_frequency=config.dense_frequency)
    images = _TrainingImages(storage)
    folder = storage.path(CLASS_LATENTS_FOLDER)
    for key in context.partition_keys:
        ade_class = class_by_key(key)
        chosen = select_class_latents(stats, ade_class.index, selection)
        record = class_latents_record(chosen, key, ade_class.name, selection, stats.meta)
        write_atomic(folder / f"{key}.json", json.dumps(record, indent=2).encode())
        metadata = {"status": record["status"], "rule": chosen.rule, "n_latents": len(chosen.latents),
                    "latents": dg.MetadataValue.md(_latent_table(record)),
                    "path": dg.MetadataValue.path(str(folder / f"{key}.json"))}
        if chosen.reason:
            metadata["reason"] = chosen.reason
            context.log.info(f"{key}: {chosen.reason}")
        if chosen.latents:
            tops = [(i, top_patches(stats, i)[: config.gallery_patches]) for i in chosen.latents]
            gallery = class_gallery_png(tops, images.load, images.grid, images.patch_size,
                                        f"{key}: top training patches of its latents ({chosen.rule})")
            metadata["gallery"] = dg.MetadataValue.md(png_markdown(gallery, f"{key} latent gallery"))
        context.add_asset_metadata(metadata, partition_key=key)


class _TrainingImages:
    """RGB crops of training images by cache index, read once each from the dataset the cache was recorded from."""

    def __init__(self, storage: Storage):
        from ..core.cache import ActivationCache

        cache = ActivationCache(storage.cache_path("training"))
        self.grid, self.crop = cache.grid, int(cache.attrs["crop_size"])
        self.patch_size = int(cache.attrs["patch_size"])
        self.root, self.ids = cache.attrs.get("dataset_root", ""), cache.image_ids()
        self._samples, self._crops = None, {}

    def load(self, image_index: int):
        from ..core.ade20k import DatasetError, list_split, load_sample

        if image_index not in self._crops:
            try:
                if self._samples is None:
                    self._samples = {s.image_id: s for s in list_split(self.root, "training")}
                self._crops[image_index] = load_sample(self._samples[self.ids[image_index]], self.crop)[0]
            except (DatasetError, KeyError, IndexError, OSError):
                # A gallery is a view: a moved dataset shows blank tiles rather than failing the selection.
                self._samples = self._samples or {}
                self._crops[image_index] = None
        return self._crops[image_index]


def _latent_table(record: dict) -> str:
    if not record["latents"]:
        return f"(no latents: {record['reason']})"
    lines = ["| latent | score | frequency | max act. | mean act. | precision | recall | pure F1 |",
             "|---|---|---|---|---|---|---|---|"]
    for score, d in zip(record["scores"], record["details"]):
        lines.append(f"| {d['latent']} | {score:.4g} | {d['frequency']:.3g} | {d['max_activation']:.3g} | "
                     f"{d['mean_activation']:.3g} | {d['precision']:.3f} | {d['recall']:.3f} | {d['pure_f1']:.3f} |")
    return "\n".join(lines)
