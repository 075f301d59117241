"""`latent_stats` (one SAE pass over the training activations: counts, sums, top patches) and `class_latents[c]`
(each class's latents by a documented rule, with a patch gallery; one class_latents.json per class)."""

import json

import dagster as dg

from ..automation import DOWNSTREAM_CONDITION
from ..config import launchpad_config
from ..core.settings import SelectionConfig, StatsConfig
from ..partitions import CLASS_BACKFILL_POLICY, class_partitions
from ..recipe import artifact_metadata, input_cache, input_folder
from ..resources import Backbone, Storage

VERSION = 2  # of the folders' formats; bump when a change makes old statistics or choices wrong (2: top patches
# from distinct images)
CLASS_LATENTS_FILE = "class_latents.json"
GALLERY_FILE = "gallery.png"

LatentStatsConfig = launchpad_config("LatentStatsConfig", StatsConfig)
ClassLatentsConfig = launchpad_config("ClassLatentsConfig", SelectionConfig)


@dg.asset(deps=[dg.AssetKey("sae_weights"), dg.AssetKey("train_activations")], group_name="latents",
          kinds={"pytorch", "safetensors"}, backfill_policy=dg.BackfillPolicy.single_run(), pool="gpu",
          automation_condition=DOWNSTREAM_CONDITION)
def latent_stats(context: dg.AssetExecutionContext, config: LatentStatsConfig, storage: Storage,
                 backbone: Backbone) -> dg.MaterializeResult:
    """Per latent: firing frequency, max and mean activation, top training patches; per (class, latent): activation
    sum and firing count over patches of that majority label (all, and pure ones); per class: patch counts."""
    import numpy as np

    from ..core.sae.model import load_sae
    from ..core.store.artifacts import Spec
    from ..core.study.latent_stats import (
        compute_latent_stats,
        dense_mask,
        load_latent_stats,
        save_latent_stats,
    )

    sae_key, sae_folder = input_folder(context, storage, "sae_weights")
    train_key, cache = input_cache(context, storage, "train_activations")
    settings = config.settings(device=config.device or backbone.device)
    spec = Spec("latent_stats", VERSION, settings.identity(),
                {"sae_weights": sae_key, "train_activations": train_key})
    store = storage.store
    reused = store.exists("latent_stats", spec.key)
    if not reused:
        sae, _ = load_sae(sae_folder)
        stats = compute_latent_stats(sae, cache, settings, log=context.log.info)
        with store.write(spec) as work:
            save_latent_stats(work, stats)
    folder = store.open("latent_stats", spec.key)
    stats = load_latent_stats(folder)
    freq = stats.frequency_S
    live = freq[freq > 0]
    return dg.MaterializeResult(
        metadata={
            **artifact_metadata(spec.key, folder, reused),
            "n_tokens": stats.n_tokens,
            "d_sae": stats.d_sae,
            "dead_fraction": float((stats.fire_count_S == 0).mean()),
            "dense_fraction": float(dense_mask(freq).mean()),
            "median_frequency_of_live": float(np.median(live)) if len(live) else float("nan"),
            "classes_in_training": int((stats.class_patches_C[1:] > 0).sum()),
            "pure_patch_fraction": float(stats.pure_patches_C.sum() / max(stats.n_tokens, 1)),
        },
        data_version=dg.DataVersion(spec.key),
    )


@dg.asset(partitions_def=class_partitions, backfill_policy=CLASS_BACKFILL_POLICY,
          deps=[dg.AssetKey("latent_stats"), dg.AssetKey("probe_checkpoint")], group_name="latents", kinds={"json"},
          automation_condition=DOWNSTREAM_CONDITION)
def class_latents(context: dg.AssetExecutionContext, config: ClassLatentsConfig, storage: Storage) -> None:
    """The top-k latents of each class by the configured rule, and every rule's ranking for the latent-count sweep:
    a class_latents.json per class (latent ids, scores, frequencies, max activations); an absent class gets an empty
    list and the reason."""
    from ..core.data.ade20k import class_by_key
    from ..core.probe.model import load_probe
    from ..core.report.pictures import png_markdown
    from ..core.report.study_pictures import class_gallery_png
    from ..core.sae.model import load_sae
    from ..core.settings import RULES
    from ..core.store.artifacts import Spec, write_atomic
    from ..core.study.latent_stats import (
        class_latents_record,
        load_latent_stats,
        margin_effects,
        select_class_latents,
        top_patches,
    )

    stats_key, stats_folder = input_folder(context, storage, "latent_stats")
    probe_key, probe_folder = input_folder(context, storage, "probe_checkpoint")
    selection = config.settings()
    spec = Spec("class_latents", VERSION, selection.identity(),
                {"latent_stats": stats_key, "probe_checkpoint": probe_key})
    store = storage.store
    todo = [key for key in context.partition_keys if not store.exists("class_latents", spec.key, key)]
    if todo:
        stats = load_latent_stats(stats_folder)
        made_from = store.inputs("latent_stats", stats_key)
        images = _TrainingImages(context, storage, made_from["train_activations"])
        W_dec_SD = load_sae(store.open("sae_weights", made_from["sae_weights"]))[0].W_dec_SD.detach().numpy()
        probe_W_CD = load_probe(probe_folder).weight_CD.numpy()
    for key in todo:
        ade_class = class_by_key(key)
        effect_S = margin_effects(W_dec_SD, probe_W_CD, stats.class_patches_C > 0, ade_class.index)
        chosen = select_class_latents(stats, ade_class.index, selection, margin_effect_S=effect_S)
        rankings = {rule: select_class_latents(stats, ade_class.index, selection, rule, selection.ranked, effect_S)
                    for rule in RULES}
        record = class_latents_record(chosen, key, ade_class.name, selection, stats.meta, rankings)
        with store.write(spec, part=key) as work:
            write_atomic(work / CLASS_LATENTS_FILE, json.dumps(record, indent=2).encode())
            if chosen.latents:
                tops = [(i, top_patches(stats, i)[: selection.gallery_patches]) for i in chosen.latents]
                write_atomic(work / GALLERY_FILE, class_gallery_png(
                    tops, images.load, images.grid, images.patch_size,
                    f"{key}: top training patches of its latents ({chosen.rule})"))
    for key in context.partition_keys:
        folder = store.open("class_latents", spec.key, key)
        record = json.loads((folder / CLASS_LATENTS_FILE).read_text())
        metadata = {**artifact_metadata(spec.key, folder, key not in todo), "status": record["status"],
                    "rule": record["rule"], "n_latents": len(record["latents"]),
                    "latents": dg.MetadataValue.md(_latent_table(record))}
        if record["reason"]:
            metadata["reason"] = record["reason"]
            context.log.info(f"{key}: {record['reason']}")
        if (folder / GALLERY_FILE).exists():
            gallery = (folder / GALLERY_FILE).read_bytes()
            metadata["gallery"] = dg.MetadataValue.md(png_markdown(gallery, f"{key} latent gallery"))
        context.add_asset_metadata(metadata, partition_key=key)


class _TrainingImages:
    """RGB crops of training images by cache index, read once each from the dataset the cache was recorded from."""

    def __init__(self, context, storage: Storage, train_key: str):
        from ..core.data.cache import CACHE_FOLDER, ActivationCache

        cache = ActivationCache(storage.store.open("train_activations", train_key) / CACHE_FOLDER)
        self.grid, self.crop = cache.grid, int(cache.attrs["crop_size"])
        self.patch_size = int(cache.attrs["patch_size"])
        self.root, self.ids = cache.attrs.get("dataset_root", ""), cache.image_ids()
        self.log = context.log
        self._samples, self._crops = None, {}

    def load(self, image_index: int):
        from ..core.data.ade20k import DatasetError, list_split, load_sample

        if image_index not in self._crops:
            try:
                if self._samples is None:
                    self._samples = {s.image_id: s for s in list_split(self.root, "training")}
                self._crops[image_index] = load_sample(self._samples[self.ids[image_index]], self.crop)[0]
            except (DatasetError, KeyError, IndexError, OSError) as exc:
                # A gallery is a view: a moved dataset shows blank tiles rather than failing the selection.
                self.log.warning(f"gallery: training image {image_index} of {self.root} unreadable ({exc}); "
                                 "its tiles stay blank")
                self._samples = self._samples or {}
                self._crops[image_index] = None
        return self._crops[image_index]


def _latent_table(record: dict) -> str:
    from ..core.report.tables import markdown_table

    if not record["latents"]:
        return f"(no latents: {record['reason']})"
    columns = ("latent", "frequency", "max_activation", "mean_activation", "precision", "recall", "pure_f1")
    rows = [{"latent": d["latent"], "score": score, **{c: d[c] for c in columns[1:]}}
            for score, d in zip(record["scores"], record["details"])]
    return markdown_table(rows)
